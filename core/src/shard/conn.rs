//! One device connection in a shard's table: socket, TLS, session, and the I/O step that moves
//! bytes between them. No task and no buffer per connection at rest: the shard's driver runs a
//! connection's step when the readiness ring says its socket is ready, lending it the shard's
//! buffers for the step.
//!
//! Its TLS, in either mode (the second half of this file): rustls' buffered
//! `ServerConnection` for the connection's life (`--tls-state buffered`), or a sans-IO
//! handshake that detaches into traffic keys and sequence numbers (`--tls-state detached`).
//! Both take received ciphertext and hand plaintext to the session, and seal the session's
//! output; nothing here owns a buffer at rest except rustls' own in buffered mode.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use bytes::BytesMut;
use rustls::pki_types::CertificateDer;
use rustls::{HandshakeKind, ServerConnection};
use tether_protocol::server::{Credential, ServerSession};
use tether_protocol::{CodeVersion, DeviceId};

use crate::metrics::{ErrorKind, ShardMetrics};
use tether_net::detached::{DetachedTls, Handshake};
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
    /// Paused while an upgrade hands it to the new process: not read, written or timed.
    pub handing: bool,
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

// The connection's TLS.

/// Why a connection must end, from the TLS layer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TlsEnd {
    /// The peer closed cleanly (close_notify).
    PeerClosed,
    /// A TLS error; an alert may have been queued to `out`.
    Failed,
}

/// What a connection's verified client certificate says, in 8 bytes (the connection keeps
/// this, not the certificate): none, the device it names, or a certificate naming no device.
/// Set once, when the handshake completes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CertDevice(u64);

impl CertDevice {
    /// 0: no certificate; `u64::MAX`: one naming no device; else the device id + 1
    /// ([`tether_net::tls::cert_device_id`] names no id above 2^64 − 3).
    const UNNAMED: u64 = u64::MAX;

    /// From the peer's verified chain (its first certificate is the device's).
    pub fn from_chain(chain: Option<&[CertificateDer<'_>]>) -> CertDevice {
        match chain.and_then(|c| c.first()) {
            None => CertDevice(0),
            Some(leaf) => tether_net::tls::cert_device_id(leaf)
                .and_then(|d| d.0.checked_add(1))
                .filter(|&n| n != CertDevice::UNNAMED)
                .map_or(CertDevice(CertDevice::UNNAMED), CertDevice),
        }
    }

    /// The credential for a `Hello` from this connection: the certificate's, if there was one,
    /// else `key` (the registered device's key) for its proof.
    pub fn credential<'a>(self, key: &'a tether_protocol::auth::DeviceKey) -> Credential<'a> {
        match self.0 {
            0 => Credential::Key(key),
            CertDevice::UNNAMED => Credential::Certificate(None),
            n => Credential::Certificate(Some(DeviceId(n - 1))),
        }
    }
}

/// What [`TlsConn::open`] works with besides the received bytes.
pub(crate) struct OpenCx<'a> {
    pub now: Instant,
    /// The shard's plaintext scratch buffer (buffered mode).
    pub plain: &'a mut [u8],
    pub session: &'a mut ServerSession,
    /// Where TLS appends what it must send.
    pub out: &'a mut Vec<u8>,
    /// Detached mode: keep rustls' key schedule after the handshake.
    pub keep_key_schedule: bool,
    /// Set from the client certificate when the handshake completes.
    pub cert: &'a mut CertDevice,
    pub m: &'a mut ShardMetrics,
}

/// A connection's TLS state.
pub(crate) enum TlsConn {
    /// rustls' buffered connection (≈ 7.7 KB for life).
    Buffered(Box<ServerConnection>),
    /// Detached mode, handshake in progress.
    Handshaking(Box<Handshake>),
    /// Detached mode: traffic keys and sequence numbers only.
    Detached(Box<DetachedTls>),
    /// Transitional placeholder while the handshake detaches.
    Gone,
}

impl TlsConn {
    /// Whether the handshake is over.
    pub fn handshake_done(&self) -> bool {
        match self {
            TlsConn::Buffered(c) => !c.is_handshaking(),
            TlsConn::Handshaking(_) | TlsConn::Gone => false,
            TlsConn::Detached(_) => true,
        }
    }

    /// Processes received ciphertext `data` (the unconsumed bytes so far), hands plaintext to
    /// `session`, appends what TLS must send to `out`, and returns how many bytes of `data`
    /// it consumed (the rest is a partial record to keep for the next read).
    pub fn open(&mut self, data: &mut [u8], cx: &mut OpenCx<'_>) -> Result<usize, TlsEnd> {
        let OpenCx {
            now,
            plain,
            session,
            out,
            keep_key_schedule,
            cert,
            m,
        } = cx;
        let now = *now;
        let mut pos = 0;
        loop {
            match self {
                TlsConn::Buffered(c) => {
                    let was_handshaking = c.is_handshaking();
                    let r = open_buffered(c, now, data, plain, session, out, m);
                    if was_handshaking && !c.is_handshaking() {
                        **cert = CertDevice::from_chain(c.peer_certificates());
                    }
                    return r;
                }

                TlsConn::Handshaking(hs) => {
                    let mut early = Vec::new();
                    let p = hs.feed(&mut data[pos..], out, &mut early).map_err(|_| {
                        m.handshake_failures += 1;
                        TlsEnd::Failed
                    })?;
                    pos += p.consumed;
                    if !early.is_empty() {
                        session.handle_bytes(now, &early);
                    }
                    if !p.complete {
                        return Ok(pos);
                    }
                    count_handshake(hs.handshake_kind(), m);
                    // The certificate goes with the handshake: keep only the device it names.
                    **cert = CertDevice::from_chain(hs.peer_certificates());
                    let TlsConn::Handshaking(hs) = std::mem::replace(self, TlsConn::Gone) else {
                        return Err(TlsEnd::Failed);
                    };
                    let mut d = hs.detach(out).map_err(|_| TlsEnd::Failed)?;
                    if !*keep_key_schedule {
                        // ≈ 0.8 KB less per connection; a peer KeyUpdate then ends the
                        // connection with a clear error (the device reconnects and resumes).
                        d.forget_key_schedule();
                    }
                    *self = TlsConn::Detached(Box::new(d));
                }
                TlsConn::Detached(d) => {
                    let opened = d
                        .decrypt_in_place(&mut data[pos..], |p| session.handle_bytes(now, p))
                        .map_err(|_| TlsEnd::Failed)?;
                    pos += opened.consumed;
                    if opened.wants_write {
                        d.poll_transmit(out).map_err(|_| TlsEnd::Failed)?;
                    }
                    if opened.peer_closed {
                        return Err(TlsEnd::PeerClosed);
                    }
                    return Ok(pos);
                }
                TlsConn::Gone => return Err(TlsEnd::Failed),
            }
        }
    }

    /// Seals the session's output `plain` into `out`.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), TlsEnd> {
        match self {
            TlsConn::Buffered(c) => seal_buffered(c, plain, out),
            // Before the handshake ends only the Challenge (half-RTT data) or an error frame
            // is sent: sealed as soon as the keys allow.
            TlsConn::Handshaking(hs) => {
                hs.queue_half_rtt(plain);
                Ok(())
            }
            TlsConn::Detached(d) => d.encrypt(plain, out).map_err(|_| TlsEnd::Failed),
            TlsConn::Gone => Err(TlsEnd::Failed),
        }
    }

    /// Whether TLS holds bytes still to be moved to `out` (buffered mode only).
    pub fn wants_write(&self) -> bool {
        matches!(self, TlsConn::Buffered(c) if c.wants_write())
    }

    /// Queues close_notify.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) {
        match self {
            TlsConn::Buffered(c) => {
                c.send_close_notify();
                let _ = c.write_tls(out);
            }
            TlsConn::Detached(d) => {
                let _ = d.close_notify(out);
            }
            TlsConn::Handshaking(_) | TlsConn::Gone => {}
        }
    }
}

fn count_handshake(kind: Option<HandshakeKind>, m: &mut ShardMetrics) {
    match kind {
        Some(HandshakeKind::Resumed) => m.handshakes_resumed += 1,
        _ => m.handshakes_full += 1,
    }
}

fn open_buffered(
    c: &mut ServerConnection,
    now: Instant,
    data: &mut [u8],
    plain: &mut [u8],
    session: &mut ServerSession,
    out: &mut Vec<u8>,
    m: &mut ShardMetrics,
) -> Result<usize, TlsEnd> {
    let mut rd = &data[..];
    let was_handshaking = c.is_handshaking();
    while !rd.is_empty() {
        if c.read_tls(&mut rd).is_err() {
            return Err(TlsEnd::Failed);
        }
        if c.process_new_packets().is_err() {
            // Send the alert rustls queued, then close.
            let _ = c.write_tls(out);
            if c.is_handshaking() {
                m.handshake_failures += 1;
            }
            return Err(TlsEnd::Failed);
        }
        loop {
            match c.reader().read(plain) {
                Ok(0) => return Err(TlsEnd::PeerClosed),
                Ok(k) => session.handle_bytes(now, &plain[..k]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(TlsEnd::Failed),
            }
        }
    }
    if was_handshaking && !c.is_handshaking() {
        count_handshake(c.handshake_kind(), m);
    }
    // What rustls wants to send in answer (handshake flights, the half-RTT Challenge).
    while c.wants_write() {
        c.write_tls(out).map_err(|_| TlsEnd::Failed)?;
    }
    // rustls keeps what it did not process in its own buffer.
    Ok(data.len())
}

fn seal_buffered(c: &mut ServerConnection, plain: &[u8], out: &mut Vec<u8>) -> Result<(), TlsEnd> {
    // rustls buffers at most 64 KiB of unsent data (its buffer limit) and accepts less
    // plaintext once that is reached, so move its records into `out` as we go: a burst
    // (code chunks, messages resent after a resume) may exceed the limit.
    let mut rest = plain;
    loop {
        let n = if rest.is_empty() {
            0
        } else {
            c.writer().write(rest).map_err(|_| TlsEnd::Failed)?
        };
        rest = &rest[n..];
        let mut moved = false;
        while c.wants_write() {
            c.write_tls(out).map_err(|_| TlsEnd::Failed)?;
            moved = true;
        }
        if rest.is_empty() {
            return Ok(());
        }
        if n == 0 && !moved {
            return Err(TlsEnd::Failed); // rustls takes nothing more
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{DevPki, DeviceCa};
    use crate::testdir::TestDir;
    use tether_net::tls::load_certs;
    use tether_protocol::auth::DeviceKey;

    fn named(c: CertDevice) -> Option<Option<DeviceId>> {
        match c.credential(&DeviceKey([0; 32])) {
            Credential::Key(_) => None,
            Credential::Certificate(d) => Some(d),
        }
    }

    #[test]
    fn cert_device_packs_none_a_device_or_no_device() {
        let dir = TestDir::new("certdevice");
        let ca = DeviceCa::ensure(&dir.path().join("ca")).unwrap();
        for id in [0, 42, u64::MAX - 2] {
            let issued = ca.issue(DeviceId(id), dir.path()).unwrap();
            let chain = load_certs(&issued.cert, "device certificate").unwrap();
            let c = CertDevice::from_chain(Some(&chain));
            assert_eq!(named(c), Some(Some(DeviceId(id))));
        }
        assert_eq!(named(CertDevice::from_chain(None)), None);
        assert_eq!(named(CertDevice::from_chain(Some(&[]))), None);
        // A verified certificate that names no device (CN=localhost) vouches for none.
        let pki = DevPki::ensure(dir.path()).unwrap();
        let chain = load_certs(&pki.server_cert, "certificate").unwrap();
        assert_eq!(named(CertDevice::from_chain(Some(&chain))), Some(None));
        assert_eq!(std::mem::size_of::<CertDevice>(), 8);
    }
}
