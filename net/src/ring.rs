//! A shard's own readiness ring: a second io_uring, next to glommio's, that holds one
//! multishot `POLL_ADD` per device socket and a multishot `ACCEPT` per listener.
//!
//! Public because both ends use it: the server's shards (`tether-core`) and loadgen's
//! simulated-device drivers (`tether-loadgen`, which forbids `unsafe` and so takes every
//! unsafe call it needs from here: the ring, `recv`/`send`, and the [`Doorbell`]).
//!
//! Why: glommio 0.9's `TcpStream` re-allocates a ~500 B poll source at every re-arm and offers
//! no multishot operations; a multishot poll costs nothing in
//! user space while the connection is idle and needs no re-arm after each read. Reads and writes
//! are plain non-blocking `recv`/`send` into shard buffers when the ring says a socket is ready.
//!
//! The ring posts every completion to an eventfd; the shard parks on that eventfd through
//! glommio's file API (the one public way to wait on a foreign fd), so glommio keeps owning the
//! executor, timers and cross-shard channels.
//!
//! Pitfalls handled here: a pending poll keeps a socket open after `close`, so every watch is
//! removed before its descriptor is dropped; descriptor numbers are reused at once, so each
//! watch carries the slot's generation in its `user_data` and stale completions are ignored.
//! No operation is ever dropped: when the kernel will not take a batch (older kernels refuse
//! submissions with `EBUSY` while completions overflowed), the completions are taken off the
//! queue and kept for the next drain, the submission is retried, and operations that still do not
//! fit wait in order in the ring's own queue. Completions the kernel could not post for want of
//! room are fetched by the next drain (an overflowed multishot watch ends; its owner re-arms it).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use glommio::io::BufferedFile;
use io_uring::{IoUring, opcode, squeue, types};

/// What a completion is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A device socket became readable (or hung up).
    Read,
    /// A device socket became writable again.
    Write,
    /// A listener produced a new connection (`result` is its descriptor).
    Accept,
    /// Acknowledgement of a removal or cancellation; nothing to do.
    Control,
}

/// One completion, decoded.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// What the operation was.
    pub kind: Kind,
    /// The slot (or listener number) the operation was made for.
    pub idx: usize,
    /// The slot's generation when the operation was made (see [`ring_generation`]).
    pub generation: u32,
    /// The operation's result: poll event bits, a new descriptor, or `-errno`.
    pub result: i32,
    /// Whether a multishot operation stays armed.
    pub more: bool,
}

const KIND_SHIFT: u32 = 62;
const GEN_MASK: u64 = 0x3fff_ffff;

fn user_data(kind: Kind, idx: usize, generation: u32) -> u64 {
    let k = match kind {
        Kind::Read => 0u64,
        Kind::Write => 1,
        Kind::Accept => 2,
        Kind::Control => 3,
    };
    (k << KIND_SHIFT) | ((generation as u64 & GEN_MASK) << 32) | (idx as u64 & 0xffff_ffff)
}

fn decode(ud: u64) -> (Kind, usize, u32) {
    let kind = match ud >> KIND_SHIFT {
        0 => Kind::Read,
        1 => Kind::Write,
        2 => Kind::Accept,
        _ => Kind::Control,
    };
    (
        kind,
        (ud & 0xffff_ffff) as usize,
        ((ud >> 32) & GEN_MASK) as u32,
    )
}

/// The generation as the ring carries it (30 bits), for comparing with completions.
pub fn ring_generation(g: u32) -> u32 {
    (g as u64 & GEN_MASK) as u32
}

/// A shard's readiness ring.
pub struct Ring {
    ring: IoUring,
    eventfd: OwnedFd,
    /// Operations the submission queue had no room for while the kernel would not take a batch
    /// (see [`Ring::submit`]): queued first, in order, at the next opportunity. Never dropped.
    /// At most the operations issued while the kernel refuses: a few per live connection.
    backlog: VecDeque<squeue::Entry>,
    /// Completions taken off the completion queue to let a submission through (the kernel
    /// refuses submissions while completions it could not post are pending); handed out first
    /// by [`Ring::drain`].
    held: Vec<Completion>,
    stats: RingStats,
    /// Tests: how many more batches the "kernel" refuses.
    #[cfg(test)]
    refuse: u32,
}

/// What the ring had to do so that no operation was lost (counters since the ring was made).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Submissions refused with `EBUSY` (completions overflowed), retried after the completions
    /// were taken off the queue.
    pub busy_retries: u64,
    /// Operations that found the submission queue full and the kernel refusing a batch, kept
    /// in the ring's own queue and submitted later, in order.
    pub deferred: u64,
}

impl Ring {
    /// A ring with room for `entries` submissions per batch; completions signal an eventfd.
    pub fn new(entries: u32) -> io::Result<Ring> {
        // Completions for 20k idle sockets can pile up between two drains.
        Ring::with_completions(entries, entries.saturating_mul(8).max(4096))
    }

    /// A ring with room for `entries` submissions and `completions` posted completions (both
    /// rounded up to powers of two by the kernel).
    pub fn with_completions(entries: u32, completions: u32) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_cqsize(completions)
            .setup_clamp()
            // Completions wait for the shard's next syscall instead of interrupting it: by
            // default the kernel kicks a running thread with an inter-processor interrupt
            // for every socket that becomes ready, and a shard is always about to make a
            // syscall (recv, send, or parking on its doorbell).
            .setup_coop_taskrun()
            .build(entries)?;
        // SAFETY: eventfd returns a fresh descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Ring {
            ring,
            eventfd,
            backlog: VecDeque::new(),
            held: Vec::new(),
            stats: RingStats::default(),
            #[cfg(test)]
            refuse: 0,
        })
    }

    /// What the ring did so that no operation was lost.
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// Whether completions wait in the ring (taken off the kernel's queue to let a submission
    /// through) without a new eventfd signal: call [`drain`](Self::drain) again soon.
    pub fn has_held(&self) -> bool {
        !self.held.is_empty()
    }

    /// Operations waiting in the ring's own queue for the kernel to take them.
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    /// A duplicate of the completion eventfd, for the task that parks on it.
    pub fn eventfd(&self) -> io::Result<OwnedFd> {
        self.eventfd.try_clone()
    }

    /// Queues `e`. When the submission queue is full the batch goes to the kernel first; if the
    /// kernel will not take it, `e` waits in the ring's own queue (behind any earlier ones) for
    /// the next [`submit`](Self::submit). Never dropped: a lost removal would keep a closed
    /// socket open, a lost watch would leave a device unheard.
    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: as in `queue_backlog`: the entry references no user memory.
        if self.backlog.is_empty() && unsafe { self.ring.submission().push(&e) }.is_ok() {
            return;
        }
        self.backlog.push_back(e);
        if self.queue_backlog().is_err() {
            self.stats.deferred += 1;
        }
    }

    /// Moves the ring's own queue into the submission queue, in order, submitting batches as
    /// the queue fills. `Err` if the kernel refused a batch (what is left waits).
    fn queue_backlog(&mut self) -> io::Result<()> {
        while let Some(e) = self.backlog.front() {
            // SAFETY: the entries we push reference no user memory (polls, removals and
            // accepts without an address buffer), so nothing must outlive the submission.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                self.backlog.pop_front();
                continue;
            }
            // Submission queue full: hand the batch to the kernel and retry.
            self.enter()?;
            if self.ring.submission().is_full() {
                // The kernel took nothing of the batch.
                return Err(io::Error::from(io::ErrorKind::WouldBlock));
            }
        }
        Ok(())
    }

    /// Submits the submission queue. A kernel that cannot post completions (the completion
    /// queue overflowed and is still full) refuses submissions with `EBUSY`: the completions
    /// are then taken off the queue (kept for [`drain`](Self::drain)) and the submission retried.
    fn enter(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if self.refuse > 0 {
            self.refuse -= 1;
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        let mut fruitless = 0;
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.stats.busy_retries += 1;
                    let before = self.held.len();
                    take_completions(&mut self.ring, &mut self.held);
                    if self.held.len() == before {
                        // Nothing to make room with: the kernel is busy for another reason.
                        fruitless += 1;
                        if fruitless >= 3 {
                            return Err(e);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Watches `fd` for input (multishot) on behalf of slot `idx`.
    pub fn watch_read(&mut self, fd: RawFd, idx: usize, generation: u32) {
        let e = opcode::PollAdd::new(
            types::Fd(fd),
            (libc::POLLIN | libc::POLLRDHUP | libc::POLLERR | libc::POLLHUP) as u32,
        )
        .multi(true)
        .build()
        .user_data(user_data(Kind::Read, idx, generation));
        self.push(e);
    }

    /// Waits once for `fd` to become writable.
    pub fn watch_write(&mut self, fd: RawFd, idx: usize, generation: u32) {
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
            .build()
            .user_data(user_data(Kind::Write, idx, generation));
        self.push(e);
    }

    /// Removes every watch of slot `idx`; call before its descriptor is closed or moved.
    pub fn unwatch(&mut self, idx: usize, generation: u32, writing: bool) {
        let ctl = user_data(Kind::Control, idx, generation);
        self.push(
            opcode::PollRemove::new(user_data(Kind::Read, idx, generation))
                .build()
                .user_data(ctl),
        );
        if writing {
            self.push(
                opcode::PollRemove::new(user_data(Kind::Write, idx, generation))
                    .build()
                    .user_data(ctl),
            );
        }
    }

    /// Accepts connections on `listener` (multishot) for listener number `which`.
    pub fn accept(&mut self, listener: RawFd, which: usize) {
        let e = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(Kind::Accept, which, 0));
        self.push(e);
    }

    /// Accepts one connection on `listener` for listener number `which` (for a rate limit:
    /// a multishot accept takes everything waiting in the backlog at once).
    pub fn accept_one(&mut self, listener: RawFd, which: usize) {
        let e = opcode::Accept::new(
            types::Fd(listener),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
        .build()
        .user_data(user_data(Kind::Accept, which, 0));
        self.push(e);
    }

    /// Stops accepting on listener number `which`.
    pub fn cancel_accept(&mut self, which: usize) {
        let e = opcode::AsyncCancel::new(user_data(Kind::Accept, which, 0))
            .build()
            .user_data(user_data(Kind::Control, which, 0));
        self.push(e);
    }

    /// Hands queued operations to the kernel (one syscall per batch), the ring's own queue
    /// first. On `Err` nothing is lost: what the kernel did not take is submitted next time.
    pub fn submit(&mut self) -> io::Result<()> {
        self.queue_backlog()?;
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.enter()
    }

    /// Takes every posted completion: first those taken off the queue to let a submission
    /// through, then the queue's, then any the kernel could not post for want of room (it
    /// posts them at the next `io_uring_enter`, made here).
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.held);
        take_completions(&mut self.ring, out);
        // Each round makes room for a full queue; a bound keeps a flood from holding us here.
        for _ in 0..64 {
            if !self.ring.submission().cq_overflow() {
                return;
            }
            let before = out.len();
            // An enter posts overflowed completions (the crate asks for events on overflow);
            // it also submits what is queued, which is what queued operations are for.
            if self.ring.submit().is_err() {
                return;
            }
            take_completions(&mut self.ring, out);
            if out.len() == before {
                return;
            }
        }
    }
}

/// Takes every completion the kernel has posted to `ring`'s queue.
fn take_completions(ring: &mut IoUring, out: &mut Vec<Completion>) {
    for cqe in ring.completion() {
        let (kind, idx, generation) = decode(cqe.user_data());
        out.push(Completion {
            kind,
            idx,
            generation,
            result: cqe.result(),
            more: io_uring::cqueue::more(cqe.flags()),
        });
    }
}

/// The ring's completion eventfd, read through glommio's file API: `wait` resolves once the
/// ring has posted completions since the last wait. The one public way to park a glommio task
/// on another ring. Make it inside the shard's executor.
pub struct Doorbell {
    file: BufferedFile,
}

impl Doorbell {
    /// A doorbell on `ring`'s eventfd (a duplicate; the ring keeps its own).
    pub fn new(ring: &Ring) -> io::Result<Doorbell> {
        let fd = ring.eventfd()?;
        // SAFETY: `fd` is a fresh duplicate that we own; the file takes it over and closes it.
        let file = unsafe { BufferedFile::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
        Ok(Doorbell { file })
    }

    /// Waits until the ring signals (reads and resets the eventfd's counter).
    pub async fn wait(&self) -> io::Result<()> {
        self.file
            .read_at(0, 8)
            .await
            .map(drop)
            .map_err(io::Error::from)
    }
}

/// Reads from a non-blocking socket. `Ok(0)` is end of stream.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes to a non-blocking socket (no SIGPIPE).
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Fails with `AddrInUse` if something already listens on `addr`. Every shard binds its own
/// `SO_REUSEPORT` listener, and so would a second `tether serve` on the same port: without this
/// check it would start silently and take part of the devices. The probe binds without
/// `SO_REUSEPORT` (with `SO_REUSEADDR`, so connections of an earlier run still in TIME_WAIT do
/// not count) and is dropped at once. Port 0 (any free port) is not checked.
pub fn ensure_no_listener(addr: std::net::SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
}

/// A non-blocking, `SO_REUSEPORT`, `TCP_NODELAY` listener with a deep backlog.
pub fn listener(addr: std::net::SocketAddr, backlog: i32) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one syscall per
    // connection saved.
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_port_with_a_listener_is_refused() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        super::ensure_no_listener(addr).expect("nothing listens yet");
        let l = super::listener(addr, 16).unwrap();
        let e = super::ensure_no_listener(addr).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        drop(l);
        super::ensure_no_listener(addr).expect("free again");
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        super::ensure_no_listener(any).expect("port 0 is never checked");
    }

    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let l = std::net::TcpListener::from(listener("127.0.0.1:0".parse().unwrap(), 8).unwrap());
        l.set_nonblocking(false).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(s.nodelay().unwrap());
    }

    #[test]
    fn user_data_round_trips() {
        for kind in [Kind::Read, Kind::Write, Kind::Accept, Kind::Control] {
            let ud = user_data(kind, 123_456, 0x2abc_def0);
            assert_eq!(decode(ud), (kind, 123_456, 0x2abc_def0));
        }
        assert_eq!(ring_generation(u32::MAX), 0x3fff_ffff);
    }

    /// Drains `ring` (and submits what waits) until `done` holds for what was taken, or 10 s.
    fn drain_until(
        ring: &mut Ring,
        out: &mut Vec<Completion>,
        done: impl Fn(&[Completion]) -> bool,
    ) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done(out) && std::time::Instant::now() < end {
            ring.drain(out);
            let _ = ring.submit();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn no_operation_is_lost_when_the_queues_overflow() {
        // 4 submissions per batch, 8 posted completions: 64 watches on ready sockets overflow
        // the completion queue long before they are all submitted, and nothing is drained
        // meanwhile (the kernel then refuses submissions with EBUSY).
        const N: usize = 64;
        let mut ring = Ring::with_completions(4, 8).unwrap();
        let pairs: Vec<_> = (0..N)
            .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
            .collect();
        use std::io::Write;
        for (_, b) in &pairs {
            (&*b).write_all(b"x").unwrap();
        }
        for (i, (a, _)) in pairs.iter().enumerate() {
            ring.watch_read(a.as_raw_fd(), i, 1);
        }
        let _ = ring.submit();
        let mut out = vec![];
        let every = |out: &[Completion], f: &dyn Fn(&Completion) -> bool| {
            (0..N).all(|i| out.iter().any(|c| c.idx == i && f(c)))
        };
        // A multishot watch whose completion overflowed ends (`more` false; the shard re-arms
        // it): every watch reports its socket, armed or ended.
        let ready = |c: &Completion| c.kind == Kind::Read && c.result & libc::POLLIN as i32 != 0;
        drain_until(&mut ring, &mut out, |o| every(o, &ready));
        assert!(
            every(&out, &ready),
            "every watch reported its socket: {out:?}"
        );
        // Watches on idle sockets, then their removals: 2 completions each overflow the queue
        // the same way. Each removal must reach the kernel and find its watch (a lost watch
        // leaves a device unheard, a lost removal keeps a closed socket open).
        let idle: Vec<_> = (0..N)
            .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
            .collect();
        for (i, (a, _)) in idle.iter().enumerate() {
            ring.watch_read(a.as_raw_fd(), i, 2);
        }
        let _ = ring.submit();
        out.clear();
        for i in 0..N {
            ring.unwatch(i, 2, false);
        }
        let _ = ring.submit();
        let removed = |o: &[Completion]| {
            let ours = |f: &dyn Fn(&Completion) -> bool| {
                (0..N).all(|i| o.iter().any(|c| c.idx == i && c.generation == 2 && f(c)))
            };
            ours(&|c| c.kind == Kind::Read && !c.more && c.result == -libc::ECANCELED)
                && ours(&|c| c.kind == Kind::Control && c.result == 0)
        };
        drain_until(&mut ring, &mut out, removed);
        assert!(removed(&out), "every watch found and removed: {out:?}");
        assert_eq!(ring.backlog(), 0);
        assert!(!ring.has_held());
    }

    #[test]
    fn operations_the_kernel_refuses_wait_in_order_and_are_not_lost() {
        const N: usize = 20;
        let mut ring = Ring::with_completions(4, 64).unwrap();
        let pairs: Vec<_> = (0..N)
            .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
            .collect();
        use std::io::Write;
        for (_, b) in &pairs {
            (&*b).write_all(b"x").unwrap();
        }
        // The kernel refuses every batch for now: what does not fit the 4-entry queue waits.
        ring.refuse = u32::MAX;
        for (i, (a, _)) in pairs.iter().enumerate() {
            ring.watch_read(a.as_raw_fd(), i, 1);
        }
        assert!(ring.submit().is_err());
        assert_eq!(ring.backlog(), N - 4);
        assert_eq!(ring.stats().deferred, (N - 4) as u64);
        ring.refuse = 0;
        let mut out = vec![];
        drain_until(&mut ring, &mut out, |o| o.len() >= N);
        // Each watch once, in the order it was issued (ready sockets complete at submission).
        let order: Vec<usize> = out.iter().map(|c| c.idx).collect();
        assert_eq!(order, (0..N).collect::<Vec<_>>(), "{out:?}");
        assert!(
            out.iter()
                .all(|c| c.kind == Kind::Read && c.result & libc::POLLIN as i32 != 0)
        );
        assert_eq!(ring.backlog(), 0);
    }

    #[test]
    fn multishot_poll_reports_readiness_and_removal_quiets_it() {
        let mut ring = Ring::new(64).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        ring.watch_read(a.as_raw_fd(), 7, 3);
        ring.submit().unwrap();
        use std::io::Write;
        (&b).write_all(b"x").unwrap();
        let mut out = vec![];
        for _ in 0..100 {
            ring.drain(&mut out);
            if !out.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let c = out[0];
        assert_eq!((c.kind, c.idx, c.generation), (Kind::Read, 7, 3));
        assert!(c.more, "multishot poll stays armed");
        assert!(c.result & libc::POLLIN as i32 != 0);
        ring.unwatch(7, 3, false);
        ring.submit().unwrap();
        out.clear();
        for _ in 0..100 {
            ring.drain(&mut out);
            if out.iter().any(|c| c.kind == Kind::Read && !c.more) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            out.iter().any(|c| c.kind == Kind::Read && !c.more),
            "{out:?}"
        );
    }
}
