//! One device connection in a shard's table: socket, TLS, session, and the I/O step that moves
//! bytes between them. No task per connection: the shard's driver polls a connection when its
//! index waker fires (see [`super::wake`]).

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::BytesMut;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::ServerConnection;
use tether_protocol::server::ServerSession;

use crate::metrics::{ErrorKind, ShardMetrics};
use crate::timer::TimerId;

/// How a connection's I/O step ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum IoOutcome {
    /// Nothing more to do until the socket is ready again.
    Idle,
    /// The peer closed or the connection failed: drop it (after counting `ErrorKind`).
    Dead(Option<ErrorKind>),
}

/// A device connection owned by one shard.
pub(crate) struct Conn {
    pub stream: TcpStream,
    pub tls: Box<ServerConnection>,
    pub session: ServerSession,
    pub waker: Waker,
    /// Encrypted bytes not yet accepted by the socket. Empty (unallocated) at rest.
    pub out: Vec<u8>,
    /// Generation of this slot, to recognise stale timer entries.
    pub generation: u32,
    /// The deadline the timing wheel holds for this connection, if any.
    pub armed: Option<(Instant, TimerId)>,
    /// TLS handshake counted.
    pub tls_done: bool,
    /// Closing: flush `out`, then drop.
    pub closing: bool,
    /// This connection is the device's registered session on its home shard.
    pub registered: bool,
}

impl Conn {
    /// Reads everything the socket has, through TLS into the session. `buf` is the shard's
    /// read buffer, lent for this call; `plain` its plaintext scratch buffer.
    pub fn read_step(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        plain: &mut [u8],
        m: &mut ShardMetrics,
    ) -> IoOutcome {
        let mut cx = Context::from_waker(&self.waker);
        // Bounded per wake, for fairness between connections; a busy connection re-queues
        // itself through its waker.
        for _ in 0..16 {
            if self.closing {
                return IoOutcome::Idle;
            }
            let n = match Pin::new(&mut self.stream).poll_read(&mut cx, buf) {
                Poll::Pending => return IoOutcome::Idle,
                Poll::Ready(Ok(0)) => return IoOutcome::Dead(None),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return IoOutcome::Dead(io_kind(&e)),
            };
            m.bytes_in += n as u64;
            let mut rd = &buf[..n];
            while !rd.is_empty() {
                if let Err(_e) = self.tls.read_tls(&mut rd) {
                    return IoOutcome::Dead(Some(ErrorKind::Tls));
                }
                if let Err(_e) = self.tls.process_new_packets() {
                    // Send the alert rustls queued, best effort, then drop.
                    let _ = self.tls.write_tls(&mut self.out);
                    self.flush(m);
                    if !self.tls_done {
                        m.handshake_failures += 1;
                    }
                    return IoOutcome::Dead(Some(ErrorKind::Tls));
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
                        Ok(0) => return IoOutcome::Dead(None), // close_notify
                        Ok(k) => self.session.handle_bytes(now, &plain[..k]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => return IoOutcome::Dead(Some(ErrorKind::Tls)),
                    }
                }
            }
        }
        // Still readable: come back after the others had their turn.
        self.waker.wake_by_ref();
        IoOutcome::Idle
    }

    /// Moves the session's output through TLS to the socket. `scratch` is a shard buffer.
    pub fn write_step(&mut self, scratch: &mut BytesMut, m: &mut ShardMetrics) -> IoOutcome {
        scratch.clear();
        let _ = self.session.poll_transmit(scratch);
        // rustls buffers at most 64 KiB of unsent data (its buffer limit) and accepts less
        // plaintext once that is reached, so move its records into `out` as we go: a burst
        // (code chunks, messages resent after a resume) may exceed the limit.
        let mut rest = &scratch[..];
        loop {
            let n = if rest.is_empty() {
                0
            } else {
                match self.tls.writer().write(rest) {
                    Ok(n) => n,
                    Err(_) => return IoOutcome::Dead(Some(ErrorKind::Tls)),
                }
            };
            rest = &rest[n..];
            let mut moved = false;
            while self.tls.wants_write() {
                if self.tls.write_tls(&mut self.out).is_err() {
                    return IoOutcome::Dead(Some(ErrorKind::Tls));
                }
                moved = true;
            }
            if rest.is_empty() {
                break;
            }
            if n == 0 && !moved {
                return IoOutcome::Dead(Some(ErrorKind::Tls)); // rustls takes nothing more
            }
        }
        self.flush(m)
    }

    /// Writes `out` to the socket as far as it goes without blocking.
    pub fn flush(&mut self, m: &mut ShardMetrics) -> IoOutcome {
        if self.out.is_empty() {
            return IoOutcome::Idle;
        }
        let mut cx = Context::from_waker(&self.waker);
        let mut done = 0;
        while done < self.out.len() {
            match Pin::new(&mut self.stream).poll_write(&mut cx, &self.out[done..]) {
                Poll::Ready(Ok(0)) => return IoOutcome::Dead(Some(ErrorKind::Io)),
                Poll::Ready(Ok(n)) => done += n,
                Poll::Ready(Err(e)) => return IoOutcome::Dead(io_kind(&e)),
                Poll::Pending => break,
            }
        }
        m.bytes_out += done as u64;
        if done == self.out.len() {
            // Hold no write buffer at rest.
            self.out = Vec::new();
        } else {
            self.out.drain(..done);
        }
        IoOutcome::Idle
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
