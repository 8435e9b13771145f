//! The upgrade control channel end to end, with a thread standing in for the new process: it
//! connects to `upgrade.sock`, handshakes, and receives the very listening sockets the old
//! process accepts on (not re-bound copies) and batches of session sockets, never more than
//! 253 descriptors a message; a binary of an unknown format is refused while the listener keeps
//! serving.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use tether_core::upgrade::control::{ControlConn, ControlError, ControlListener};
use tether_core::upgrade::scm::{MAX_FDS, ScmError};
use tether_core::upgrade::wire::{
    FORMAT, Formats, Msg, SessionEntry, WireError, batch_ranges, check_taken,
};

const T: Duration = Duration::from_secs(10);

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("tether-upg-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The inode behind a descriptor (sockets have one each).
fn inode(fd: &impl AsRawFd) -> u64 {
    // SAFETY: an all-zero stat is valid; fstat fills it for a descriptor we hold.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
    st.st_ino
}

/// How many descriptors of this process refer to socket inode `ino`, from `/proc/self/fd`
/// (exact whatever other tests open meanwhile).
fn open_copies(ino: u64) -> usize {
    let want = PathBuf::from(format!("socket:[{ino}]"));
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| *l == want)
        .count()
}

fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max.min(8192).max(r.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

#[test]
fn the_socket_file_is_the_owners_alone() {
    let dir = Dir::new("mode");
    let l = ControlListener::bind(dir.path()).unwrap();
    let mode = std::fs::metadata(dir.path().join("upgrade.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    drop(l);
    assert!(
        !dir.path().join("upgrade.sock").exists(),
        "drop removes the socket file"
    );
}

#[test]
fn the_new_process_accepts_on_the_very_listener_the_old_one_passed() {
    let dir = Dir::new("listener");
    let control = ControlListener::bind(dir.path()).unwrap();
    let device = TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = device.local_addr().unwrap();
    let device_ino = inode(&device);

    // A device connects before the handoff: it waits in the listener's backlog, which only
    // the same socket (not a re-bound one) still holds on the other side.
    let mut early = TcpStream::connect(addr).unwrap();
    early.write_all(b"early").unwrap();

    let data_dir = dir.path().to_path_buf();
    let new = thread::spawn(move || {
        let mut conn = ControlConn::connect(&data_dir).unwrap();
        let hello = conn.handshake("new-binary", T).unwrap();
        assert_eq!(hello.version, "old-binary");
        let (msg, fds) = conn.recv(T).unwrap();
        let Msg::Listeners {
            shards,
            device,
            agent,
            admin,
            ..
        } = msg
        else {
            panic!("expected listeners, got {msg:?}");
        };
        assert_eq!((shards, device.len(), agent.len(), admin), (1, 1, 1, None));
        assert_eq!(fds.len(), 2);
        // Take the descriptors by the indices the message names.
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut take = |i: u16| fds[usize::from(i)].take().unwrap();
        let listener = TcpListener::from(take(device[0]));
        let _agent = TcpListener::from(take(agent[0]));
        let received_ino = inode(&listener);
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"early", "the connection queued before the handoff");
        conn.send(&Msg::ListenersTaken, &[]).unwrap();
        // After the old process closed its copy, connections still come here.
        let (mut s, _) = listener.accept().unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"later");
        let (done, fds) = conn.recv(T).unwrap();
        assert_eq!((done, fds.len()), (Msg::Done, 0));
        conn.send(&Msg::Confirmed, &[]).unwrap();
        (received_ino, listener.local_addr().unwrap())
    });

    let mut conn = control.accept_timeout(T).unwrap();
    let hello = conn.handshake("old-binary", T).unwrap();
    assert_eq!(
        (hello.version.as_str(), hello.format),
        ("new-binary", FORMAT)
    );
    conn.send(
        &Msg::Listeners {
            shards: 1,
            device: vec![0],
            agent: vec![1],
            admin: None,
            lock: None,
        },
        &[device.as_fd(), agent.as_fd()],
    )
    .unwrap();
    let (taken, _) = conn.recv(T).unwrap();
    assert_eq!(taken, Msg::ListenersTaken);
    // The old process lets go of its copies; the socket lives on in the new one.
    drop(device);
    drop(agent);
    let mut later = TcpStream::connect(addr).unwrap();
    later.write_all(b"later").unwrap();
    conn.send(&Msg::Done, &[]).unwrap();
    let (confirmed, _) = conn.recv(T).unwrap();
    assert_eq!(confirmed, Msg::Confirmed);
    let (received_ino, received_addr) = new.join().unwrap();
    assert_eq!(received_ino, device_ino, "the same socket, not a new one");
    assert_eq!(received_addr, addr);
}

#[test]
fn three_hundred_sessions_go_in_batches_of_at_most_253_sockets() {
    raise_open_file_limit();
    let dir = Dir::new("batches");
    let control = ControlListener::bind(dir.path()).unwrap();
    const N: usize = 300;
    // Each session's socket is one end of a pair; the old process keeps the other end to see
    // which socket the new process writes to.
    let pairs: Vec<(UnixStream, UnixStream)> =
        (0..N).map(|_| UnixStream::pair().unwrap()).collect();
    let inodes: Vec<u64> = pairs.iter().map(|(s, _)| inode(s)).collect();
    let entries: Vec<SessionEntry> = (0..N as u64)
        .map(|d| SessionEntry {
            device: 1000 + d,
            tls: vec![d as u8; 40],
            session: d.to_be_bytes().to_vec(),
            out: vec![],
            partial: vec![1, 2],
        })
        .collect();

    let data_dir = dir.path().to_path_buf();
    let new = thread::spawn(move || {
        let mut conn = ControlConn::connect(&data_dir).unwrap();
        conn.handshake("new", T).unwrap();
        let mut sizes = Vec::new();
        loop {
            let (msg, fds) = conn.recv(T).unwrap();
            let Msg::Sessions { batch, entries } = msg else {
                assert_eq!(msg, Msg::Done);
                break;
            };
            assert!(fds.len() <= MAX_FDS);
            assert_eq!(fds.len(), entries.len());
            sizes.push(fds.len());
            let mut taken = Vec::new();
            let mut refused = Vec::new();
            for (e, fd) in entries.iter().zip(fds) {
                // Entry i's socket is descriptor i: say so through it.
                let mut s = UnixStream::from(fd);
                s.write_all(&e.device.to_be_bytes()).unwrap();
                if e.device % 100 == 7 {
                    refused.push((e.device, "buffered TLS mode".to_string()));
                } else {
                    taken.push(e.device);
                }
            }
            conn.send(
                &Msg::SessionsTaken {
                    batch,
                    taken,
                    refused,
                },
                &[],
            )
            .unwrap();
        }
        sizes
    });

    let mut conn = control.accept_timeout(T).unwrap();
    conn.handshake("old", T).unwrap();
    let all: Vec<_> = pairs.iter().map(|(s, _)| s.as_fd()).collect();
    let whole = Msg::Sessions {
        batch: 0,
        entries: entries.clone(),
    };
    // One message cannot carry 300 descriptors: refused before anything is sent.
    match conn.send(&whole, &all) {
        Err(ControlError::Scm(ScmError::TooManyFds(n))) => assert_eq!(n, N),
        other => panic!("expected a refusal of {N} descriptors, got {other:?}"),
    }
    let mut refused_total = 0;
    for (batch, range) in batch_ranges(N).enumerate() {
        let sent = Msg::Sessions {
            batch: batch as u32,
            entries: entries[range.clone()].to_vec(),
        };
        conn.send(&sent, &all[range]).unwrap();
        let (answer, fds) = conn.recv(T).unwrap();
        assert!(fds.is_empty());
        check_taken(&sent, &answer).unwrap();
        if let Msg::SessionsTaken { refused, .. } = answer {
            refused_total += refused.len();
        }
    }
    conn.send(&Msg::Done, &[]).unwrap();
    let sizes = new.join().unwrap();
    assert_eq!(
        sizes,
        vec![253, 47],
        "the first message is the first batch, not the refused one"
    );
    assert_eq!(refused_total, 3, "devices 1007, 1107, 1207");
    for (i, (_, peer)) in pairs.iter().enumerate() {
        let mut b = [0u8; 8];
        (&*peer).read_exact(&mut b).unwrap();
        assert_eq!(u64::from_be_bytes(b), 1000 + i as u64, "socket {i}");
    }
    // The new process closed what it received: only our own end of each socket is open.
    for (i, ino) in inodes.iter().enumerate() {
        assert_eq!(open_copies(*ino), 1, "socket {i} leaked a descriptor");
    }
}

#[test]
fn an_unknown_format_is_refused_and_the_listener_serves_the_next_binary() {
    let dir = Dir::new("mismatch");
    let control = ControlListener::bind(dir.path()).unwrap();

    let data_dir = dir.path().to_path_buf();
    let future = thread::spawn(move || {
        let mut conn = ControlConn::connect(&data_dir).unwrap();
        let e = conn
            .handshake_as(
                Formats {
                    format: 7,
                    oldest_readable: 7,
                },
                "from-the-future",
                T,
            )
            .unwrap_err();
        e.to_string()
    });
    let mut conn = control.accept_timeout(T).unwrap();
    let e = conn.handshake("old", T).unwrap_err();
    assert!(matches!(
        e,
        ControlError::Wire(WireError::NoCommonFormat { .. })
    ));
    assert_eq!(
        e.to_string(),
        "no common handoff format: peer speaks format 7 (reads 7..=7), we read 1..=1"
    );
    drop(conn);
    let theirs = future.join().unwrap();
    assert!(
        theirs.contains("peer speaks format 1 (reads 1..=1), we read 7..=7"),
        "{theirs}"
    );

    // The next connect, from a binary that speaks our format, goes through.
    let data_dir = dir.path().to_path_buf();
    let good = thread::spawn(move || {
        let mut conn = ControlConn::connect(&data_dir).unwrap();
        conn.handshake("good", T).unwrap();
        let (m, _) = conn.recv(T).unwrap();
        assert_eq!(m, Msg::Done);
        conn.send(&Msg::Confirmed, &[]).unwrap();
    });
    let mut conn = control.accept_timeout(T).unwrap();
    assert_eq!(conn.handshake("old", T).unwrap().version, "good");
    conn.send(&Msg::Done, &[]).unwrap();
    assert_eq!(conn.recv(T).unwrap().0, Msg::Confirmed);
    good.join().unwrap();
}

#[test]
fn a_new_process_that_dies_mid_handoff_leaves_the_old_one_serving() {
    let dir = Dir::new("dies");
    let control = ControlListener::bind(dir.path()).unwrap();
    let device = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = device.local_addr().unwrap();

    let data_dir = dir.path().to_path_buf();
    let new = thread::spawn(move || {
        let mut conn = ControlConn::connect(&data_dir).unwrap();
        conn.handshake("crashes", T).unwrap();
        let (_, fds) = conn.recv(T).unwrap();
        // Gone without a word, taking its copies of the listener with it.
        drop(fds);
    });
    let mut conn = control.accept_timeout(T).unwrap();
    conn.handshake("old", T).unwrap();
    let listeners = Msg::Listeners {
        shards: 1,
        device: vec![0],
        agent: vec![],
        admin: None,
        lock: None,
    };
    conn.send(&listeners, &[device.as_fd()]).unwrap();
    new.join().unwrap();
    match conn.recv(T) {
        Err(ControlError::Scm(ScmError::Closed)) => {}
        other => panic!("expected the peer gone, got {other:?}"),
    }
    // The old process still accepts on its listener, and on its control socket.
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"x").unwrap();
    let (mut s, _) = device.accept().unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
    let _next = ControlConn::connect(dir.path()).unwrap();
    control.accept_timeout(T).unwrap();
}
