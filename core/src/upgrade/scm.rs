//! Message framing with descriptors (SCM_RIGHTS) over a blocking Unix stream socket.
//!
//! A message is an 8-byte header — payload length (u32 BE), descriptor count (u16 BE), two
//! reserved zero bytes — followed by the payload. The descriptors travel as ancillary data on
//! the `sendmsg` that carries the header, so the kernel delivers them with the header's bytes.
//! The receiver reads exactly one message's bytes at a time, so a read never reaches into the
//! next message's descriptors.
//!
//! Every received descriptor is close-on-exec (`MSG_CMSG_CLOEXEC`) and owned (`OwnedFd`), so an
//! error path drops — closes — whatever arrived. A send refused by its checks sends nothing;
//! after any other error but a receive that timed out before the first byte
//! ([`ScmError::TimedOut`]), the stream's framing is lost and the caller closes the connection.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Most descriptors one message carries: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS: usize = 253;
/// Largest payload accepted, checked from the header before anything is allocated.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Length of the header in front of every payload.
pub const HEADER_LEN: usize = 8;

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum ScmError {
    /// The socket failed (including a send that timed out).
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// No byte of a message arrived before the deadline; the framing is intact.
    #[error("timed out waiting for a message on the control socket")]
    TimedOut,
    /// The deadline passed in the middle of a message; the framing is lost.
    #[error("timed out in the middle of a message on the control socket")]
    TimedOutMidMessage,
    /// More descriptors than one message can carry; nothing was sent.
    #[error("{0} descriptors in one message; SCM_RIGHTS carries at most {MAX_FDS}")]
    TooManyFds(usize),
    /// A payload over [`MAX_PAYLOAD`], to send or announced by a header.
    #[error("payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    PayloadTooLarge(usize),
    /// The header's reserved bytes are not zero.
    #[error("message header has non-zero reserved bytes {0:02x?}")]
    BadHeader([u8; 2]),
    /// The header announced a different number of descriptors than arrived with it; every
    /// descriptor that arrived was closed.
    #[error("message header announces {announced} descriptors but {received} arrived")]
    FdCountMismatch {
        /// Descriptors the header announced.
        announced: usize,
        /// Descriptors that arrived (and were closed).
        received: usize,
    },
    /// Descriptors arrived with payload bytes instead of with the header; they were closed.
    #[error("{0} descriptors arrived with payload bytes instead of the header")]
    FdsInPayload(usize),
    /// The kernel truncated the ancillary data (`MSG_CTRUNC`): some descriptors were lost.
    /// Those that did arrive were closed.
    #[error("ancillary data truncated (MSG_CTRUNC); the {0} descriptors that arrived were closed")]
    Truncated(usize),
    /// The peer closed the connection between messages.
    #[error("peer closed the control socket")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("peer closed the control socket {got} bytes into a {want}-byte read")]
    UnexpectedEof {
        /// Bytes of the current part (header or payload) received.
        got: usize,
        /// Bytes of the current part expected.
        want: usize,
    },
}

/// Encodes a header (exposed for tests that forge messages).
pub fn header(payload_len: u32, fd_count: u16) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&payload_len.to_be_bytes());
    h[4..6].copy_from_slice(&fd_count.to_be_bytes());
    h
}

/// Sends one message: header and `payload`, with `fds` as ancillary data on the header.
/// More than [`MAX_FDS`] descriptors or a payload over [`MAX_PAYLOAD`] is refused before
/// anything is sent. The descriptors stay the caller's (the kernel passes duplicates).
pub fn send_msg(
    stream: &UnixStream,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ScmError> {
    if fds.len() > MAX_FDS {
        return Err(ScmError::TooManyFds(fds.len()));
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(ScmError::PayloadTooLarge(payload.len()));
    }
    // Both fit: MAX_PAYLOAD < u32::MAX and MAX_FDS < u16::MAX.
    let h = header(payload.len() as u32, fds.len() as u16);
    send_raw(stream, &h, payload, fds)
}

/// Sends `first` then `rest` with `fds` on the first `sendmsg`, no framing checks (the framed
/// sender above, and tests that forge hostile messages).
pub(crate) fn send_raw(
    stream: &UnixStream,
    first: &[u8],
    rest: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ScmError> {
    if fds.len() > MAX_FDS {
        return Err(ScmError::TooManyFds(fds.len()));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd_bytes = mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is a pure computation on a length.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let total = first.len() + rest.len();
    let mut sent = 0usize;
    let mut with_fds = !raw.is_empty();
    while sent < total || with_fds {
        let (a, b) = if sent < first.len() {
            (&first[sent..], rest)
        } else {
            (&rest[sent - first.len()..], &[][..])
        };
        let mut iov = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut libc::c_void,
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            },
        ];
        // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = 2;
        if with_fds {
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` zeroed, 8-aligned bytes, enough for one
            // header and `fd_bytes` of data (CMSG_SPACE); we write within the first header.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr() as *const u8,
                    libc::CMSG_DATA(cmsg),
                    fd_bytes,
                );
            }
        }
        // SAFETY: msg points at live iovecs and control buffer for the call's duration.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ScmError::Io(e));
        }
        // Once sendmsg returned a count, the descriptors went with its first byte.
        with_fds = false;
        sent += n as usize;
    }
    Ok(())
}

/// Receives one message: its payload and the descriptors that came with its header. Waits
/// until `deadline` (forever if `None`); [`ScmError::TimedOut`] means nothing arrived and the
/// stream is still usable. Sets (and leaves) the stream's read timeout.
pub fn recv_msg(
    stream: &UnixStream,
    deadline: Option<Instant>,
) -> Result<(Vec<u8>, Vec<OwnedFd>), ScmError> {
    recv_msg_capacity(stream, deadline, MAX_FDS)
}

/// [`recv_msg`] with room for `capacity` descriptors in the control buffer (tests force
/// `MSG_CTRUNC` with a small one).
pub(crate) fn recv_msg_capacity(
    stream: &UnixStream,
    deadline: Option<Instant>,
    capacity: usize,
) -> Result<(Vec<u8>, Vec<OwnedFd>), ScmError> {
    let mut h = [0u8; HEADER_LEN];
    let mut fds = Vec::new();
    read_exact(stream, &mut h, deadline, capacity, &mut fds, true)?;
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let count = u16::from_be_bytes([h[4], h[5]]) as usize;
    if h[6..] != [0, 0] {
        return Err(ScmError::BadHeader([h[6], h[7]]));
    }
    if count != fds.len() {
        return Err(ScmError::FdCountMismatch {
            announced: count,
            received: fds.len(),
        });
    }
    if len > MAX_PAYLOAD {
        return Err(ScmError::PayloadTooLarge(len));
    }
    let mut payload = vec![0u8; len];
    let mut stray = Vec::new();
    read_exact(stream, &mut payload, deadline, capacity, &mut stray, false)?;
    if !stray.is_empty() {
        return Err(ScmError::FdsInPayload(stray.len()));
    }
    Ok((payload, fds))
}

/// Reads exactly `buf.len()` bytes, collecting descriptors into `fds`. `first` says whether
/// this is the start of a message (so a timeout or EOF before any byte is a clean one).
fn read_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
    capacity: usize,
    fds: &mut Vec<OwnedFd>,
    first: bool,
) -> Result<(), ScmError> {
    let mut got = 0;
    while got < buf.len() {
        let timeout = match deadline {
            None => None,
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Err(timed_out(first && got == 0)),
            },
        };
        stream.set_read_timeout(timeout)?;
        match recv_some(stream, &mut buf[got..], capacity, fds) {
            Ok(0) if first && got == 0 => return Err(ScmError::Closed),
            Ok(0) => {
                return Err(ScmError::UnexpectedEof {
                    got,
                    want: buf.len(),
                });
            }
            Ok(n) => got += n,
            Err(ScmError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(ScmError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out(first && got == 0));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn timed_out(clean: bool) -> ScmError {
    if clean {
        ScmError::TimedOut
    } else {
        ScmError::TimedOutMidMessage
    }
}

/// One `recvmsg`: bytes into `buf`, descriptors appended to `fds` (owned at once, so they are
/// closed on any error that follows).
fn recv_some(
    stream: &UnixStream,
    buf: &mut [u8],
    capacity: usize,
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, ScmError> {
    let cap_bytes = capacity * mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE is a pure computation on a length.
    let space = unsafe { libc::CMSG_SPACE(cap_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg points at `buf` and a control buffer of `space` bytes, both live.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(ScmError::Io(io::Error::last_os_error()));
    }
    let before = fds.len();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed cmsgs;
    // CMSG_FIRSTHDR/CMSG_NXTHDR stay within them. Each SCM_RIGHTS descriptor was installed in
    // this process for us and is owned by nothing else, so taking ownership is sound.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = data.offset_from(cmsg as *const u8) as usize;
                let len = ((*cmsg).cmsg_len as usize).saturating_sub(header);
                for i in 0..len / mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(
                        data.add(i * mem::size_of::<RawFd>()) as *const RawFd
                    );
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        let arrived = fds.len() - before;
        fds.truncate(before);
        return Err(ScmError::Truncated(arrived));
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::time::Duration;

    pub(crate) fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    /// A pipe; its write end is the descriptor tests pass around, its read end says (by EOF)
    /// when every copy of the write end is closed.
    struct Probe {
        read: std::fs::File,
        write: OwnedFd,
    }

    impl Probe {
        fn new() -> Probe {
            let mut fds = [0; 2];
            // SAFETY: pipe2 fills two new descriptors we then own.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: fresh descriptors from pipe2, owned by nothing else.
            unsafe {
                Probe {
                    read: std::fs::File::from_raw_fd(fds[0]),
                    write: OwnedFd::from_raw_fd(fds[1]),
                }
            }
        }

        /// How many descriptors in this process refer to this pipe (either end), counted in
        /// `/proc/self/fd` — exact even with other tests opening descriptors meanwhile.
        fn open_copies(&self) -> usize {
            let want =
                std::fs::read_link(format!("/proc/self/fd/{}", self.read.as_raw_fd())).unwrap();
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| *l == want)
                .count()
        }

        /// Closes our write end and says whether the reader sees end-of-file: no copy of the
        /// write end is left open anywhere.
        fn all_closed_after_drop(self) -> bool {
            let Probe { mut read, write } = self;
            drop(write);
            let fd = read.as_raw_fd();
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
            let mut b = [0u8; 1];
            matches!(read.read(&mut b), Ok(0))
        }
    }

    #[test]
    fn a_message_with_descriptors_round_trips() {
        let (a, b) = pair();
        let probe = Probe::new();
        let payload = b"hello, new process".to_vec();
        send_msg(&a, &payload, &[probe.write.as_fd(), probe.write.as_fd()]).unwrap();
        send_msg(&a, b"second", &[]).unwrap();
        let (got, fds) = recv_msg(&b, None).unwrap();
        assert_eq!(got, payload);
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            // SAFETY: fcntl on a descriptor we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert!(
                flags & libc::FD_CLOEXEC != 0,
                "received descriptors are close-on-exec"
            );
        }
        // The received descriptor is the same pipe: writing through it reaches the read end.
        let mut w = std::fs::File::from(fds.into_iter().next().unwrap());
        w.write_all(b"x").unwrap();
        let mut r = [0u8; 1];
        (&probe.read).read_exact(&mut r).unwrap();
        assert_eq!(&r, b"x");
        let (got, fds) = recv_msg(&b, None).unwrap();
        assert_eq!((got.as_slice(), fds.len()), (&b"second"[..], 0));
    }

    #[test]
    fn an_empty_payload_and_a_large_payload_round_trip() {
        let (a, b) = pair();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let big2 = big.clone();
        let t = std::thread::spawn(move || {
            send_msg(&a, &[], &[]).unwrap();
            send_msg(&a, &big2, &[]).unwrap();
        });
        assert_eq!(recv_msg(&b, None).unwrap().0, Vec::<u8>::new());
        assert_eq!(recv_msg(&b, None).unwrap().0, big);
        t.join().unwrap();
    }

    #[test]
    fn too_many_descriptors_are_refused_before_anything_is_sent() {
        let (a, b) = pair();
        let probe = Probe::new();
        let fds: Vec<_> = (0..MAX_FDS + 1).map(|_| probe.write.as_fd()).collect();
        assert!(matches!(
            send_msg(&a, b"x", &fds),
            Err(ScmError::TooManyFds(n)) if n == MAX_FDS + 1
        ));
        // Nothing went out: the next message is the first one the peer sees.
        send_msg(&a, b"next", &fds[..MAX_FDS]).unwrap();
        let (got, fds) = recv_msg(&b, None).unwrap();
        assert_eq!((got.as_slice(), fds.len()), (&b"next"[..], MAX_FDS));
        drop(fds);
        assert_eq!(probe.open_copies(), 2);
        assert!(probe.all_closed_after_drop());
    }

    #[test]
    fn an_oversized_payload_is_refused_to_send_and_to_receive() {
        let (a, b) = pair();
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert!(matches!(
            send_msg(&a, &big, &[]),
            Err(ScmError::PayloadTooLarge(n)) if n == MAX_PAYLOAD + 1
        ));
        // A forged header announcing 4 GiB is refused from the header, before allocating.
        send_raw(&a, &header(u32::MAX, 0), &[], &[]).unwrap();
        assert!(matches!(
            recv_msg(&b, None),
            Err(ScmError::PayloadTooLarge(n)) if n == u32::MAX as usize
        ));
    }

    #[test]
    fn a_header_fd_count_that_does_not_match_closes_every_descriptor_that_arrived() {
        for (announced, sent) in [(3u16, 1usize), (0, 2), (1, 4)] {
            let (a, b) = pair();
            let probe = Probe::new();
            let fds: Vec<_> = (0..sent).map(|_| probe.write.as_fd()).collect();
            send_raw(&a, &header(2, announced), b"ab", &fds).unwrap();
            drop(a);
            match recv_msg(&b, None) {
                Err(ScmError::FdCountMismatch {
                    announced: x,
                    received,
                }) => assert_eq!((x, received), (announced as usize, sent)),
                other => panic!("expected a mismatch, got {other:?}"),
            }
            drop(b); // nothing left in flight either
            assert_eq!(
                probe.open_copies(),
                2,
                "only the probe's own two ends remain"
            );
            assert!(probe.all_closed_after_drop());
        }
    }

    #[test]
    fn truncated_ancillary_data_is_an_error_and_leaks_nothing() {
        let (a, b) = pair();
        let probe = Probe::new();
        let fds: Vec<_> = (0..5).map(|_| probe.write.as_fd()).collect();
        send_msg(&a, b"five", &fds).unwrap();
        match recv_msg_capacity(&b, None, 2) {
            Err(ScmError::Truncated(n)) => assert!(n <= 2, "{n} arrived"),
            other => panic!("expected MSG_CTRUNC, got {other:?}"),
        }
        drop((a, b));
        assert_eq!(probe.open_copies(), 2);
        assert!(probe.all_closed_after_drop());
    }

    #[test]
    fn descriptors_riding_on_payload_bytes_are_refused_and_closed() {
        let (a, b) = pair();
        let probe = Probe::new();
        // The header goes alone, then payload bytes carry a descriptor.
        send_raw(&a, &header(3, 0), &[], &[]).unwrap();
        send_raw(&a, b"abc", &[], &[probe.write.as_fd()]).unwrap();
        assert!(matches!(recv_msg(&b, None), Err(ScmError::FdsInPayload(1))));
        drop((a, b));
        assert_eq!(probe.open_copies(), 2);
        assert!(probe.all_closed_after_drop());
    }

    #[test]
    fn a_bad_header_and_every_truncation_are_typed_errors() {
        let (a, b) = pair();
        let mut h = header(0, 0);
        h[7] = 1;
        send_raw(&a, &h, &[], &[]).unwrap();
        assert!(matches!(
            recv_msg(&b, None),
            Err(ScmError::BadHeader([0, 1]))
        ));

        for cut in 0..HEADER_LEN + 4 {
            let (a, b) = pair();
            let mut whole = header(4, 0).to_vec();
            whole.extend_from_slice(b"abcd");
            (&a).write_all(&whole[..cut]).unwrap();
            drop(a);
            match (cut, recv_msg(&b, None)) {
                (0, Err(ScmError::Closed)) => {}
                (1..HEADER_LEN, Err(ScmError::UnexpectedEof { got, want: 8 })) => {
                    assert_eq!(got, cut)
                }
                (_, Err(ScmError::UnexpectedEof { got, want: 4 })) => {
                    assert_eq!(got, cut - HEADER_LEN)
                }
                (_, other) => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_deadline_before_the_first_byte_is_a_clean_timeout() {
        let (a, b) = pair();
        let t0 = Instant::now();
        let deadline = Some(t0 + Duration::from_millis(50));
        assert!(matches!(recv_msg(&b, deadline), Err(ScmError::TimedOut)));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // The stream is still usable after a clean timeout.
        send_msg(&a, b"late", &[]).unwrap();
        assert_eq!(recv_msg(&b, deadline_in(1000)).unwrap().0, b"late");
        // Half a header, then silence: the framing is lost and said so.
        (&a).write_all(&header(1, 0)[..3]).unwrap();
        assert!(matches!(
            recv_msg(&b, deadline_in(50)),
            Err(ScmError::TimedOutMidMessage)
        ));
    }

    fn deadline_in(ms: u64) -> Option<Instant> {
        Some(Instant::now() + Duration::from_millis(ms))
    }
}
