//! One device connection in a shard's table: socket, TLS, session, and the I/O step that moves
//! bytes between them. No task and no buffer per connection at rest: the shard's driver runs a
//! connection's step when the readiness ring says its socket is ready, lending it the shard's
//! buffers for the step.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use bytes::BytesMut;
use tether_protocol::CodeVersion;
use tether_protocol::server::ServerSession;

use super::tlsconn::{CertDevice, OpenCx, TlsConn, TlsEnd};
use crate::metrics::{ErrorKind, ShardMetrics};
use tether_net::ring;
use tether_net::timer::TimerId;

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
    pub tls: TlsConn,
    pub session: ServerSession,
    /// Encrypted bytes not yet accepted by the socket. Empty (unallocated) at rest.
    pub out: Vec<u8>,
    /// Received bytes of an incomplete TLS record (detached mode). Empty at rest. Travels with
    /// the connection when it moves to its home shard.
    pub partial: Vec<u8>,
    /// The device the verified client certificate names, if any (set by the handshake).
    pub cert: CertDevice,
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
    /// The code version the device runs (its `Hello`'s, or what it installed since), for
    /// `tether devices show`.
    pub code_version: CodeVersion,
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
        keep_key_schedule: bool,
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
            if let Err(end) = self.open(now, &mut buf[..n], plain, keep_key_schedule, m) {
                return self.end(end, m);
            }
            if !self.tls_done && self.tls.handshake_done() {
                self.tls_done = true;
            }
            if n < buf.len() {
                // A short read drained the socket; new data raises a new ring completion.
                return IoOutcome::Idle;
            }
        }
        IoOutcome::More
    }

    /// Feeds the bytes in `partial` to TLS (those a connection brought from another shard),
    /// keeping what is still an incomplete record.
    pub fn open_carried(
        &mut self,
        now: Instant,
        plain: &mut [u8],
        keep_key_schedule: bool,
        m: &mut ShardMetrics,
    ) -> IoOutcome {
        if self.partial.is_empty() {
            return IoOutcome::Idle;
        }
        match self.open(now, &mut [], plain, keep_key_schedule, m) {
            Ok(()) => IoOutcome::Idle,
            Err(end) => self.end(end, m),
        }
    }

    /// Feeds received bytes to TLS, keeping an incomplete record for the next read.
    fn open(
        &mut self,
        now: Instant,
        data: &mut [u8],
        plain: &mut [u8],
        keep: bool,
        m: &mut ShardMetrics,
    ) -> Result<(), TlsEnd> {
        let mut cx = OpenCx {
            now,
            plain,
            session: &mut self.session,
            out: &mut self.out,
            keep_key_schedule: keep,
            cert: &mut self.cert,
            m,
        };
        let tls = &mut self.tls;
        if self.partial.is_empty() {
            let used = tls.open(data, &mut cx)?;
            if used < data.len() {
                self.partial.extend_from_slice(&data[used..]);
            }
        } else {
            self.partial.extend_from_slice(data);
            let mut pending = std::mem::take(&mut self.partial);
            let used = tls.open(&mut pending, &mut cx)?;
            pending.drain(..used);
            if !pending.is_empty() {
                self.partial = pending;
            }
        }
        Ok(())
    }

    fn end(&mut self, end: TlsEnd, m: &mut ShardMetrics) -> IoOutcome {
        match end {
            TlsEnd::PeerClosed => IoOutcome::Dead(None),
            TlsEnd::Failed => {
                // Send whatever alert TLS queued, best effort.
                let _ = self.flush(m);
                IoOutcome::Dead(Some(ErrorKind::Tls))
            }
        }
    }

    /// Moves the session's output through TLS to the socket. `scratch` is a shard buffer.
    pub fn write_step(&mut self, scratch: &mut BytesMut, m: &mut ShardMetrics) -> IoOutcome {
        scratch.clear();
        if self.session.poll_transmit(scratch) {
            if let Err(end) = self.tls.seal(scratch, &mut self.out) {
                return self.end(end, m);
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
