//! The control socket between the running process and its successor: `upgrade.sock` in the
//! data directory, mode 0600, accepting only peers of our own uid (checked with
//! `SO_PEERCRED` on both ends), carrying [`Msg`]s with descriptors beside them.
//!
//! Blocking: the handoff runs on a thread of its own, never on a shard.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::scm::{self, ScmError};
use super::wire::{Formats, Msg, WireError, negotiate};
use crate::fsutil::SECRET_MODE;

/// The control socket's file name in the data directory.
pub const SOCKET_NAME: &str = "upgrade.sock";
/// How long a send may block on a peer that does not read, unless changed with
/// [`ControlConn::set_send_timeout`].
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the control channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A system call on the socket or its file failed.
    #[error("upgrade control socket {path}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Another process listens on the control socket.
    #[error(
        "another process{} is listening on {path}: an upgrade is already under way",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    AlreadyListening {
        /// The socket's path.
        path: PathBuf,
        /// The listener's pid, if the kernel told.
        pid: Option<i32>,
    },
    /// Something other than a socket has the control socket's name.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The peer runs as another user; its connection was closed.
    #[error("refused control connection from uid {uid} (pid {pid}): only uid {ours} may take over")]
    PeerRefused {
        /// The peer's uid.
        uid: u32,
        /// The peer's pid.
        pid: i32,
        /// Our uid.
        ours: u32,
    },
    /// No connection came before the deadline.
    #[error("no control connection within {0:?}")]
    AcceptTimedOut(Duration),
    /// Framing or descriptor passing failed.
    #[error(transparent)]
    Scm(#[from] ScmError),
    /// A message was malformed, in the wrong format, or the formats do not meet.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A message other than the one the step expects.
    #[error("expected {expected} on the control socket, got {got}")]
    Unexpected {
        /// What the step expects.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The peer gave up the handoff.
    #[error("peer aborted the handoff: {0}")]
    PeerAborted(String),
}

impl ControlError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> ControlError + '_ {
        move |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether this is a receive that timed out before any byte of a message (the connection
    /// is still usable).
    pub fn is_clean_timeout(&self) -> bool {
        matches!(
            self,
            ControlError::Scm(ScmError::TimedOut) | ControlError::AcceptTimedOut(_)
        )
    }
}

/// The peer's credentials, as the kernel saw them at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// What the peer said in its hello, and the format both now use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    /// The peer's binary version.
    pub version: String,
    /// The pid it reports.
    pub pid: u32,
    /// The formats it speaks.
    pub formats: Formats,
    /// The negotiated format.
    pub format: u16,
}

fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    // SAFETY: an all-zero ucred is valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which lives for the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

fn our_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// The listening end, held by the running process. Dropping it removes the socket file (if it
/// is still this listener's).
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we bound, so drop removes only our own.
    file_id: (u64, u64),
}

impl ControlListener {
    /// Listens on `data_dir/upgrade.sock`, mode 0600. A stale socket file (nothing listening)
    /// is removed first; a live one, or a file that is not a socket, is refused.
    ///
    /// The socket is bound under a temporary name, restricted to 0600 and renamed into place,
    /// so the name never shows a socket with wider permissions.
    pub fn bind(data_dir: &Path) -> Result<ControlListener, ControlError> {
        let path = data_dir.join(SOCKET_NAME);
        match fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ControlError::NotASocket { path });
            }
            Ok(_) => match UnixStream::connect(&path) {
                Ok(s) => {
                    let pid = peer_cred(&s).ok().map(|c| c.pid);
                    return Err(ControlError::AlreadyListening { path, pid });
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    match fs::remove_file(&path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            return Err(ControlError::io(&path)(e));
                        }
                        _ => {}
                    }
                }
                Err(e) => return Err(ControlError::io(&path)(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ControlError::io(&path)(e)),
        }

        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tmp = data_dir.join(format!(
            ".{SOCKET_NAME}.{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let listener = UnixListener::bind(&tmp).map_err(ControlError::io(&tmp))?;
        let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(SECRET_MODE))
            .and_then(|()| fs::rename(&tmp, &path))
            .and_then(|()| fs::symlink_metadata(&path));
        match placed {
            Ok(m) => Ok(ControlListener {
                listener,
                path,
                file_id: (m.dev(), m.ino()),
            }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(ControlError::io(&path)(e))
            }
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for a connection and checks its peer runs as our uid; a peer of another uid is
    /// closed and refused ([`ControlError::PeerRefused`]) and the listener keeps listening.
    pub fn accept(&self) -> Result<ControlConn, ControlError> {
        self.accept_checked(None, our_uid())
    }

    /// [`accept`](Self::accept), giving up after `timeout`.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<ControlConn, ControlError> {
        self.accept_checked(Some(timeout), our_uid())
    }

    fn accept_checked(
        &self,
        timeout: Option<Duration>,
        uid: u32,
    ) -> Result<ControlConn, ControlError> {
        if let Some(t) = timeout {
            let deadline = Instant::now() + t;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let mut pfd = libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                // SAFETY: poll on one pollfd that lives for the call.
                let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
                if rc > 0 {
                    break;
                }
                if rc == 0 {
                    return Err(ControlError::AcceptTimedOut(t));
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(ControlError::io(&self.path)(e));
                }
            }
        }
        let (stream, _) = self
            .listener
            .accept()
            .map_err(ControlError::io(&self.path))?;
        let cred = peer_cred(&stream).map_err(ControlError::io(&self.path))?;
        if cred.uid != uid {
            drop(stream);
            return Err(ControlError::PeerRefused {
                uid: cred.uid,
                pid: cred.pid,
                ours: uid,
            });
        }
        ControlConn::new(stream, cred, &self.path)
    }
}

impl AsFd for ControlListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        // Only if the name still points at our socket: a successor may have bound its own.
        let ours =
            fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id);
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// One end of a control connection.
#[derive(Debug)]
pub struct ControlConn {
    stream: UnixStream,
    peer: PeerCred,
    /// The negotiated format, once the handshake is done.
    format: Option<u16>,
}

impl ControlConn {
    fn new(stream: UnixStream, peer: PeerCred, path: &Path) -> Result<ControlConn, ControlError> {
        stream
            .set_write_timeout(Some(DEFAULT_SEND_TIMEOUT))
            .map_err(ControlError::io(path))?;
        Ok(ControlConn {
            stream,
            peer,
            format: None,
        })
    }

    /// Connects to the control socket in `data_dir` (the successor's side) and checks the
    /// listener runs as our uid.
    pub fn connect(data_dir: &Path) -> Result<ControlConn, ControlError> {
        let path = data_dir.join(SOCKET_NAME);
        let stream = UnixStream::connect(&path).map_err(ControlError::io(&path))?;
        let cred = peer_cred(&stream).map_err(ControlError::io(&path))?;
        let ours = our_uid();
        if cred.uid != ours {
            return Err(ControlError::PeerRefused {
                uid: cred.uid,
                pid: cred.pid,
                ours,
            });
        }
        ControlConn::new(stream, cred, &path)
    }

    /// The peer's credentials.
    pub fn peer(&self) -> PeerCred {
        self.peer
    }

    /// The negotiated format (`None` before the handshake).
    pub fn format(&self) -> Option<u16> {
        self.format
    }

    /// Bounds how long a send may block on a peer that does not read.
    pub fn set_send_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.stream.set_write_timeout(Some(timeout))
    }

    /// Exchanges hellos (both sides send first, then read) and settles on the newest format
    /// both read. On no common format the peer gets an [`Msg::Abort`] saying why (best
    /// effort) and the error says both ranges.
    pub fn handshake(
        &mut self,
        version: &str,
        timeout: Duration,
    ) -> Result<PeerHello, ControlError> {
        self.handshake_as(Formats::OURS, version, timeout)
    }

    /// [`handshake`](Self::handshake) announcing `ours` instead of this binary's formats
    /// (tests of mismatched binaries).
    pub fn handshake_as(
        &mut self,
        ours: Formats,
        version: &str,
        timeout: Duration,
    ) -> Result<PeerHello, ControlError> {
        let hello = Msg::Hello {
            format: ours.format,
            oldest_readable: ours.oldest_readable,
            version: version.to_string(),
            pid: std::process::id(),
        };
        scm::send_msg(&self.stream, &hello.encode(ours.format)?, &[])?;
        let (msg, _) = self.recv(timeout)?;
        let (formats, version, pid) = match msg {
            Msg::Hello {
                format,
                oldest_readable,
                version,
                pid,
            } => (
                Formats {
                    format,
                    oldest_readable,
                },
                version,
                pid,
            ),
            Msg::Abort { reason } => return Err(ControlError::PeerAborted(reason)),
            other => {
                return Err(ControlError::Unexpected {
                    expected: "Hello",
                    got: other.kind(),
                });
            }
        };
        match negotiate(ours, formats) {
            Ok(format) => {
                self.format = Some(format);
                Ok(PeerHello {
                    version,
                    pid,
                    formats,
                    format,
                })
            }
            Err(e) => {
                let abort = Msg::Abort {
                    reason: e.to_string(),
                };
                // An abort's layout is frozen: the peer reads it whatever format it speaks.
                if let Ok(bytes) = abort.encode(ours.format) {
                    let _ = scm::send_msg(&self.stream, &bytes, &[]);
                }
                Err(e.into())
            }
        }
    }

    /// Sends `msg` with `fds` beside it. The descriptors must match what the message names
    /// ([`Msg::check_fds`]), at most [`scm::MAX_FDS`] of them; before the handshake only a
    /// hello or an abort may be sent. Nothing is sent when a check fails.
    pub fn send(&mut self, msg: &Msg, fds: &[BorrowedFd<'_>]) -> Result<(), ControlError> {
        msg.check_fds(fds.len())?;
        let format = match (self.format, msg) {
            (Some(f), _) => f,
            (None, Msg::Hello { format, .. }) => *format,
            (None, Msg::Abort { .. }) => super::wire::FORMAT,
            (None, other) => {
                return Err(ControlError::Unexpected {
                    expected: "a handshake first",
                    got: other.kind(),
                });
            }
        };
        scm::send_msg(&self.stream, &msg.encode(format)?, fds)?;
        Ok(())
    }

    /// Receives one message and the descriptors beside it, waiting at most `timeout`. The
    /// message is in the negotiated format and its descriptors match what it names, or this
    /// is an error (and the descriptors are closed). After any error but a clean timeout
    /// ([`ControlError::is_clean_timeout`]) the connection should be dropped.
    pub fn recv(&mut self, timeout: Duration) -> Result<(Msg, Vec<OwnedFd>), ControlError> {
        let (payload, fds) = scm::recv_msg(&self.stream, Some(Instant::now() + timeout))?;
        let (format, msg) = Msg::decode(&payload)?;
        match (self.format, &msg) {
            (_, Msg::Hello { .. } | Msg::Abort { .. }) => {}
            (Some(negotiated), _) if format != negotiated => {
                return Err(WireError::FormatChanged {
                    got: format,
                    negotiated,
                }
                .into());
            }
            (Some(_), _) => {}
            (None, other) => {
                return Err(ControlError::Unexpected {
                    expected: "Hello",
                    got: other.kind(),
                });
            }
        }
        msg.check_fds(fds.len())?;
        Ok((msg, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::TestDir;
    use crate::upgrade::wire::{FORMAT, SessionEntry};
    use std::io::Read;

    const T: Duration = Duration::from_secs(5);

    fn pipe() -> (fs::File, OwnedFd) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two new descriptors we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors from pipe2, owned by nothing else.
        unsafe { (fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn connected(dir: &Path) -> (ControlListener, ControlConn, ControlConn) {
        let l = ControlListener::bind(dir).unwrap();
        let client = ControlConn::connect(dir).unwrap();
        let server = l.accept_timeout(T).unwrap();
        (l, server, client)
    }

    fn handshaken(dir: &Path) -> (ControlListener, ControlConn, ControlConn) {
        let (l, mut server, mut client) = connected(dir);
        let t = std::thread::spawn(move || {
            client.handshake("new", T).unwrap();
            client
        });
        let hello = server.handshake("old", T).unwrap();
        assert_eq!(hello.version, "new");
        (l, server, t.join().unwrap())
    }

    #[test]
    fn the_socket_is_private_and_removed_on_drop() {
        let dir = TestDir::new("upgrade-bind");
        let l = ControlListener::bind(dir.path()).unwrap();
        let m = fs::metadata(l.path()).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(l.path(), dir.path().join("upgrade.sock"));
        // No temporary name is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("upgrade.sock")]);
        drop(l);
        assert!(!dir.path().join("upgrade.sock").exists());
    }

    #[test]
    fn a_stale_socket_is_replaced_but_a_live_one_or_a_plain_file_is_refused() {
        let dir = TestDir::new("upgrade-stale");
        let path = dir.path().join(SOCKET_NAME);
        // Stale: bound, then its listener gone without removing the file.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = ControlListener::bind(dir.path()).unwrap();

        match ControlListener::bind(dir.path()) {
            Err(e @ ControlError::AlreadyListening { pid: Some(p), .. }) => {
                assert_eq!(p, std::process::id() as i32);
                assert!(e.to_string().contains("already under way"), "{e}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // The refusal left the live listener's socket in place and working.
        assert!(path.exists());
        let _probe = live.accept_timeout(T).unwrap(); // the refusing bind's probe connection
        drop(live);
        assert!(!path.exists());

        fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            ControlListener::bind(dir.path()),
            Err(ControlError::NotASocket { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"not a socket");
    }

    #[test]
    fn drop_leaves_a_successors_socket_alone() {
        let dir = TestDir::new("upgrade-successor");
        let old = ControlListener::bind(dir.path()).unwrap();
        fs::remove_file(old.path()).unwrap();
        let new = ControlListener::bind(dir.path()).unwrap();
        drop(old);
        assert!(
            new.path().exists(),
            "the old listener's drop removed the new socket"
        );
        ControlConn::connect(dir.path()).unwrap();
    }

    #[test]
    fn a_peer_of_another_uid_is_refused_and_closed() {
        let dir = TestDir::new("upgrade-uid");
        let l = ControlListener::bind(dir.path()).unwrap();
        let mut client = ControlConn::connect(dir.path()).unwrap();
        // Pretend we run as another uid: our own peer is then a stranger.
        match l.accept_checked(Some(T), our_uid().wrapping_add(1)) {
            Err(ControlError::PeerRefused { uid, pid, .. }) => {
                assert_eq!(uid, our_uid());
                assert_eq!(pid, std::process::id() as i32);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(
            client.recv(T),
            Err(ControlError::Scm(ScmError::Closed))
        ));
        // The listener keeps serving.
        ControlConn::connect(dir.path()).unwrap();
        l.accept_timeout(T).unwrap();

        if our_uid() == 0 {
            refuses_a_real_process_of_another_uid(&l);
        }
    }

    /// As root: a forked child that drops to `nobody` connects and must see its connection
    /// closed; the socket is opened to others for this only (0600 would stop it at connect).
    fn refuses_a_real_process_of_another_uid(l: &ControlListener) {
        const NOBODY: u32 = 65534;
        fs::set_permissions(l.path(), fs::Permissions::from_mode(0o666)).unwrap();
        let c_path = std::ffi::CString::new(l.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: an all-zero sockaddr_un is valid; we copy a path shorter than sun_path.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = c_path.as_bytes();
        assert!(bytes.len() < addr.sun_path.len());
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: the child only makes async-signal-safe system calls on data prepared before
        // the fork, then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: see above; each call is a plain system call.
            unsafe {
                if libc::setgid(NOBODY) != 0 || libc::setuid(NOBODY) != 0 {
                    libc::_exit(10);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                    libc::_exit(11);
                }
                let mut b = 0u8;
                let n = libc::read(fd, &mut b as *mut u8 as *mut libc::c_void, 1);
                libc::_exit(if n == 0 { 0 } else { 12 });
            }
        }
        let refused = l.accept_timeout(T);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        fs::set_permissions(l.path(), fs::Permissions::from_mode(0o600)).unwrap();
        match refused {
            Err(ControlError::PeerRefused { uid, pid: p, .. }) => {
                assert_eq!((uid, p), (NOBODY, pid));
            }
            other => panic!("expected a refusal of uid {NOBODY}, got {other:?}"),
        }
        assert!(libc::WIFEXITED(status), "child status {status}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "the child saw its connection closed"
        );
    }

    #[test]
    fn handshake_settles_the_format_and_messages_flow_both_ways() {
        let dir = TestDir::new("upgrade-handshake");
        let (_l, mut server, mut client) = handshaken(dir.path());
        assert_eq!(server.format(), Some(FORMAT));
        assert_eq!(client.format(), Some(FORMAT));
        assert_eq!(server.peer().uid, our_uid());

        let (mut r, w) = pipe();
        let msg = Msg::Sessions {
            batch: 1,
            entries: vec![SessionEntry {
                device: 9,
                tls: vec![1],
                session: vec![2],
                out: vec![3],
                partial: vec![4],
            }],
        };
        server.send(&msg, &[w.as_fd()]).unwrap();
        let (got, fds) = client.recv(T).unwrap();
        assert_eq!(got, msg);
        drop(w);
        let mut w = std::fs::File::from(fds.into_iter().next().unwrap());
        std::io::Write::write_all(&mut w, b"!").unwrap();
        drop(w);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "!");

        client
            .send(
                &Msg::SessionsTaken {
                    batch: 1,
                    taken: vec![9],
                    refused: vec![],
                },
                &[],
            )
            .unwrap();
        let (answer, _) = server.recv(T).unwrap();
        crate::upgrade::wire::check_taken(&msg, &answer).unwrap();
    }

    #[test]
    fn a_format_mismatch_is_refused_on_both_sides_with_both_ranges() {
        let dir = TestDir::new("upgrade-mismatch");
        let (_l, mut server, mut client) = connected(dir.path());
        let t = std::thread::spawn(move || {
            client.handshake_as(
                Formats {
                    format: 7,
                    oldest_readable: 7,
                },
                "future",
                T,
            )
        });
        let e = server.handshake("old", T).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no common handoff format: peer speaks format 7 (reads 7..=7), we read 1..=1"
        );
        assert_eq!(server.format(), None);
        let theirs = t.join().unwrap().unwrap_err();
        assert!(
            theirs
                .to_string()
                .contains("peer speaks format 1 (reads 1..=1), we read 7..=7"),
            "{theirs}"
        );
        // Its abort, written in format 7, is still readable here (the layout is frozen).
        match server.recv(T) {
            Ok((Msg::Abort { reason }, fds)) => {
                assert!(fds.is_empty());
                assert!(reason.contains("we read 7..=7"), "{reason}");
            }
            other => panic!("expected the peer's abort, got {other:?}"),
        }
    }

    #[test]
    fn messages_before_the_handshake_and_wrong_descriptors_are_refused() {
        let dir = TestDir::new("upgrade-order");
        let (_l, mut server, client) = connected(dir.path());
        assert!(matches!(
            server.send(&Msg::Done, &[]),
            Err(ControlError::Unexpected { .. })
        ));
        // A peer that skips the hello is refused.
        scm::send_msg(&client.stream, &Msg::Done.encode(FORMAT).unwrap(), &[]).unwrap();
        assert!(matches!(
            server.recv(T),
            Err(ControlError::Unexpected {
                expected: "Hello",
                got: "Done"
            })
        ));
        let dir = TestDir::new("upgrade-order-2");
        let (_l, mut server, mut client) = handshaken(dir.path());
        let (_r, w) = pipe();
        // Sending: checked before anything goes out.
        assert!(matches!(
            server.send(&Msg::Done, &[w.as_fd()]),
            Err(ControlError::Wire(WireError::FdMismatch { .. }))
        ));
        // Receiving: a forged message whose descriptors do not match what it names.
        let forged = Msg::Listeners {
            shards: 1,
            device: vec![0, 1],
            agent: vec![],
            admin: None,
            lock: None,
        };
        scm::send_msg(
            &server.stream,
            &forged.encode(FORMAT).unwrap(),
            &[w.as_fd()],
        )
        .unwrap();
        assert!(matches!(
            client.recv(T),
            Err(ControlError::Wire(WireError::FdMismatch { fds: 1, .. }))
        ));
        // Garbage that frames correctly but is no message.
        scm::send_msg(&server.stream, b"garbage!", &[]).unwrap();
        assert!(matches!(
            client.recv(T),
            Err(ControlError::Wire(WireError::BadMagic(_)))
        ));
        let e = client.recv(Duration::from_millis(30)).unwrap_err();
        assert!(e.is_clean_timeout(), "{e}");
    }
}
