//! One device connection in a shard's table: socket, TLS, session, and the I/O step that moves
//! bytes between them. No task and no buffer per connection: the shard's driver runs a
//! connection's step when the readiness ring says its socket is ready, lending it the shard's
//! buffers for the step.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use bytes::BytesMut;
use rustls::ServerConnection;
use tether_protocol::server::ServerSession;

use crate::metrics::{ErrorKind, ShardMetrics};
use crate::ring;
use crate::timer::TimerId;

/// How a connection's I/O step ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum IoOutcome {
    /// Nothing more to do until the socket is ready again.
    Idle,
    /// Input remains (the step's read budget ran out): run the step again soon.
    More,
    /// Output remains that the socket would not take: wait until it is writable.
    Blocked,
    /// The peer closed or the connection failed: drop it (after counting `ErrorKind`).
    Dead(Option<ErrorKind>),
}

/// A device connection owned by one shard.
pub(crate) struct Conn {
    pub fd: OwnedFd,
    pub tls: Box<ServerConnection>,
    pub session: ServerSession,
    /// Encrypted bytes not yet accepted by the socket. Empty (unallocated) at rest.
    pub out: Vec<u8>,
    /// Generation of this slot, to recognise stale timer entries and ring completions.
    pub generation: u32,
    /// The deadline the timing wheel holds for this connection, if any.
    pub armed: Option<(Instant, TimerId)>,
    /// TLS handshake counted.
    pub tls_done: bool,
    /// Closing: flush `out`, then drop.
    pub closing: bool,
    /// This connection is the device's registered session on its home shard.
    pub registered: bool,
    /// A write-readiness watch is armed on the ring.
    pub writing: bool,
}

/// Most reads one step takes before giving other connections a turn.
const READS_PER_STEP: usize = 16;

impl Conn {
    /// Reads what the socket has, through TLS into the session. `buf` is the shard's read
    /// buffer, lent for this call; `plain` its plaintext scratch buffer.
    pub fn read_step(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        plain: &mut [u8],
        m: &mut ShardMetrics,
    ) -> IoOutcome {
        for _ in 0..READS_PER_STEP {
            if self.closing {
                return IoOutcome::Idle;
            }
            let n = match ring::recv(self.fd.as_raw_fd(), buf) {
                Ok(0) => return IoOutcome::Dead(None),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return IoOutcome::Idle,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return IoOutcome::Dead(io_kind(&e)),
            };
            m.bytes_in += n as u64;
            if let Some(dead) = self.feed_tls(now, &buf[..n], plain, m) {
                return dead;
            }
            if n < buf.len() {
                // A short read drained the socket; new data raises a new ring completion.
                return IoOutcome::Idle;
            }
        }
        IoOutcome::More
    }

    fn feed_tls(
        &mut self,
        now: Instant,
        mut rd: &[u8],
        plain: &mut [u8],
        m: &mut ShardMetrics,
    ) -> Option<IoOutcome> {
        while !rd.is_empty() {
            if self.tls.read_tls(&mut rd).is_err() {
                return Some(IoOutcome::Dead(Some(ErrorKind::Tls)));
            }
            if self.tls.process_new_packets().is_err() {
                // Send the alert rustls queued, best effort, then drop.
                let _ = self.tls.write_tls(&mut self.out);
                let _ = self.flush(m);
                if !self.tls_done {
                    m.handshake_failures += 1;
                }
                return Some(IoOutcome::Dead(Some(ErrorKind::Tls)));
            }
            if !self.tls_done && !self.tls.is_handshaking() {
                self.tls_done = true;
                match self.tls.handshake_kind() {
                    Some(rustls::HandshakeKind::Resumed) => m.handshakes_resumed += 1,
                    _ => m.handshakes_full += 1,
                }
            }
            loop {
                match self.tls.reader().read(plain) {
                    Ok(0) => return Some(IoOutcome::Dead(None)), // close_notify
                    Ok(k) => self.session.handle_bytes(now, &plain[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return Some(IoOutcome::Dead(Some(ErrorKind::Tls))),
                }
            }
        }
        None
    }

    /// Moves the session's output through TLS to the socket. `scratch` is a shard buffer.
    pub fn write_step(&mut self, scratch: &mut BytesMut, m: &mut ShardMetrics) -> IoOutcome {
        scratch.clear();
        if self.session.poll_transmit(scratch) && self.tls.writer().write_all(scratch).is_err() {
            return IoOutcome::Dead(Some(ErrorKind::Tls));
        }
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut self.out).is_err() {
                return IoOutcome::Dead(Some(ErrorKind::Tls));
            }
        }
        self.flush(m)
    }

    /// Writes `out` to the socket as far as it goes without blocking.
    pub fn flush(&mut self, m: &mut ShardMetrics) -> IoOutcome {
        let mut done = 0;
        while done < self.out.len() {
            match ring::send(self.fd.as_raw_fd(), &self.out[done..]) {
                Ok(0) => return IoOutcome::Dead(Some(ErrorKind::Io)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return IoOutcome::Dead(io_kind(&e)),
            }
        }
        m.bytes_out += done as u64;
        if done == self.out.len() {
            // Hold no write buffer at rest.
            self.out = Vec::new();
            IoOutcome::Idle
        } else {
            self.out.drain(..done);
            IoOutcome::Blocked
        }
    }

    /// Whether everything queued has reached the socket.
    pub fn flushed(&self) -> bool {
        self.out.is_empty() && !self.tls.wants_write()
    }
}

/// Resets and broken pipes are how peers leave; only other errors are counted.
fn io_kind(e: &io::Error) -> Option<ErrorKind> {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => None,
        _ => Some(ErrorKind::Io),
    }
}
