//! A simulated device's TLS state behind one small enum, so what a device keeps after its
//! handshake (campaign key `tls_state`) can change without touching the device state machine.
//!
//! [`DeviceTls::Buffered`] keeps rustls' buffered `ClientConnection` for the connection's life
//! (`tls_state = "buffered"`). [`DeviceTls::Detached`] (`"detached"`, the default) runs the
//! handshake on rustls' unbuffered client (`tether_net::detached::ClientHandshake`), then
//! keeps only traffic keys and sequence numbers, the record layer on rustls' AEADs — the same
//! record layer as the server's. Input is decrypted in place in the shard's read buffer and
//! sealed records are appended to a shard buffer the caller sends; a device keeps a buffer
//! only for a record a read cut in two, or output the caller has not collected yet.
//!
//! Session tickets: the server sends its ticket once it has read our Finished, so it reaches
//! the detached state, which hands it to rustls' key schedule and so to the device's own ticket slot
//! ([`DeviceTickets`]; storms reconnect with resumption). Once the ticket is in — at once when the campaign does not
//! resume — the key schedule (≈ 0.8 KB) is forgotten: the server only sends a KeyUpdate near
//! the AEAD's limit, which an idle device never reaches; if it did, the device would count a
//! `read_tls_error` and reconnect.

use std::cell::RefCell;
use std::io::{self, Read as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind, NamedGroup};
use tether_net::detached::{ClientHandshake, DetachedClientTls};

use super::net::{lean_tls_err, tls_err};

/// What one [`DeviceTls::read`] found besides plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Opened {
    /// The server sent close_notify: nothing more will come.
    pub peer_closed: bool,
}

/// A device's TLS state.
pub(super) enum DeviceTls {
    /// rustls' buffered `ClientConnection`, kept for the connection's life (its buffers and
    /// key schedule are what detaching saves).
    Buffered(Box<ClientConnection>),
    /// The handshake on rustls' unbuffered client, then the detached record state.
    Detached(Box<Detached>),
}

/// A device's lean TLS state and the little it must carry between calls.
pub(super) struct Detached {
    state: Lean,
    /// Bytes in flight through this state, boxed so that a device at rest (both empty) pays
    /// 8 bytes for them, not 48.
    spill: Option<Box<Spill>>,
    resumed: bool,
    /// Keep rustls' key schedule until the server's session ticket came.
    wait_for_ticket: bool,
}

#[derive(Default)]
struct Spill {
    /// Bytes to send that no `seal` collected yet (handshake flights, KeyUpdate answers).
    pending: Vec<u8>,
    /// The front of a record a read cut in two.
    partial: Vec<u8>,
}

impl Detached {
    /// Releases the spill buffers once both are empty.
    fn settle(&mut self) {
        if self
            .spill
            .as_ref()
            .is_some_and(|s| s.pending.is_empty() && s.partial.is_empty())
        {
            self.spill = None;
        }
    }
}

enum Lean {
    Handshaking(Box<ClientHandshake>),
    Established(DetachedClientTls),
    /// Only while detaching, or after the handshake failed.
    Broken,
}

impl DeviceTls {
    /// A new client connection in the buffered state, its ClientHello queued.
    pub fn buffered(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<DeviceTls, rustls::Error> {
        Ok(DeviceTls::Buffered(Box::new(ClientConnection::new(
            config, name,
        )?)))
    }

    /// A new client connection that detaches after its handshake, its ClientHello queued.
    /// `resumption`: the config keeps session tickets, so hold rustls' key schedule until the
    /// server's ticket has been handed to it. The config must allow secret extraction.
    pub fn detached(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        resumption: bool,
    ) -> io::Result<DeviceTls> {
        let mut hs = ClientHandshake::new(config, name).map_err(lean_tls_err)?;
        let mut pending = Vec::new();
        let p = hs
            .feed(&mut [], &mut pending, |_| {})
            .map_err(lean_tls_err)?;
        debug_assert!(!p.complete);
        Ok(DeviceTls::Detached(Box::new(Detached {
            state: Lean::Handshaking(Box::new(hs)),
            spill: Some(Box::new(Spill {
                pending,
                partial: Vec::new(),
            })),
            resumed: false,
            wait_for_ticket: resumption,
        })))
    }

    /// Whether the finished handshake resumed a session (from a ticket).
    pub fn resumed(&self) -> bool {
        match self {
            DeviceTls::Buffered(c) => c.handshake_kind() == Some(HandshakeKind::Resumed),
            DeviceTls::Detached(d) => d.resumed,
        }
    }

    /// Whether the handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        match self {
            DeviceTls::Buffered(c) => c.is_handshaking(),
            DeviceTls::Detached(d) => matches!(d.state, Lean::Handshaking(_)),
        }
    }

    /// Feeds ciphertext read from the socket and hands every plaintext byte to `on_plain`.
    /// `data` is the shard's read buffer (a detached state decrypts in place); `plain` is shard
    /// scratch for the plaintext.
    pub fn read(
        &mut self,
        data: &mut [u8],
        plain: &mut [u8],
        mut on_plain: impl FnMut(&[u8]),
    ) -> io::Result<Opened> {
        match self {
            DeviceTls::Buffered(tls) => {
                let mut data: &[u8] = data;
                // Bounded: every pass consumes input (rustls takes at least one byte per call
                // unless its buffer is full, which processing frees).
                while !data.is_empty() {
                    tls.read_tls(&mut data)?;
                    let state = tls.process_new_packets().map_err(tls_err)?;
                    let mut left = state.plaintext_bytes_to_read();
                    while left > 0 {
                        let m = tls.reader().read(plain)?;
                        if m == 0 {
                            break;
                        }
                        on_plain(&plain[..m]);
                        left = left.saturating_sub(m);
                    }
                    if state.peer_has_closed() {
                        return Ok(Opened { peer_closed: true });
                    }
                }
                Ok(Opened { peer_closed: false })
            }
            DeviceTls::Detached(d) => d.read(data, on_plain),
        }
    }

    /// Seals `plain` (possibly empty) and appends every byte the state must send — handshake
    /// flights, alerts, records — to `out`.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        match self {
            DeviceTls::Buffered(tls) => {
                if !plain.is_empty() {
                    tls.writer().write_all(plain)?;
                }
                while tls.wants_write() {
                    tls.write_tls(out)?;
                }
                Ok(())
            }
            DeviceTls::Detached(d) => {
                if let Some(s) = d.spill.as_mut() {
                    out.extend_from_slice(&s.pending);
                    s.pending = Vec::new();
                }
                d.settle();
                match &mut d.state {
                    Lean::Established(tls) => tls.encrypt(plain, out).map_err(lean_tls_err),
                    _ if plain.is_empty() => Ok(()),
                    _ => Err(io::Error::other(
                        "application data before the TLS handshake",
                    )),
                }
            }
        }
    }

    /// Appends a close_notify alert to `out`.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        match self {
            DeviceTls::Buffered(tls) => {
                tls.send_close_notify();
                self.seal(&[], out)
            }
            DeviceTls::Detached(d) => match &mut d.state {
                Lean::Established(tls) => tls.close_notify(out).map_err(lean_tls_err),
                _ => Err(io::Error::other("no close_notify before the TLS handshake")),
            },
        }
    }
}

impl Detached {
    /// Opens what `data` holds (after any partial record kept from the last read), keeping
    /// a record cut at the end for the next call.
    fn read(&mut self, data: &mut [u8], on_plain: impl FnMut(&[u8])) -> io::Result<Opened> {
        let r = self.read_spilled(data, on_plain);
        self.settle();
        r
    }

    fn read_spilled(
        &mut self,
        data: &mut [u8],
        mut on_plain: impl FnMut(&[u8]),
    ) -> io::Result<Opened> {
        let partial = self
            .spill
            .as_mut()
            .map(|s| std::mem::take(&mut s.partial))
            .unwrap_or_default();
        if partial.is_empty() {
            let (consumed, opened) = self.open(data, &mut on_plain)?;
            if !opened.peer_closed && consumed < data.len() {
                self.spill.get_or_insert_with(Box::default).partial = data[consumed..].to_vec();
            }
            return Ok(opened);
        }
        let mut buf = partial;
        buf.extend_from_slice(data);
        let (consumed, opened) = self.open(&mut buf, &mut on_plain)?;
        if !opened.peer_closed && consumed < buf.len() {
            buf.drain(..consumed);
            buf.shrink_to_fit();
            self.spill.get_or_insert_with(Box::default).partial = buf;
        }
        Ok(opened)
    }

    /// Runs `buf` through the handshake, then the detached state; returns the bytes consumed.
    fn open(
        &mut self,
        buf: &mut [u8],
        on_plain: &mut impl FnMut(&[u8]),
    ) -> io::Result<(usize, Opened)> {
        let mut pos = 0;
        if let Lean::Handshaking(hs) = &mut self.state {
            let p = hs
                .feed(
                    buf,
                    &mut self.spill.get_or_insert_with(Box::default).pending,
                    &mut *on_plain,
                )
                .map_err(lean_tls_err)?;
            pos = p.consumed;
            if !p.complete {
                return Ok((pos, Opened { peer_closed: false }));
            }
            self.resumed = hs.handshake_kind() == Some(HandshakeKind::Resumed);
            let Lean::Handshaking(hs) = std::mem::replace(&mut self.state, Lean::Broken) else {
                unreachable!("matched above");
            };
            let pending = &mut self.spill.get_or_insert_with(Box::default).pending;
            let mut tls = hs.detach(pending).map_err(lean_tls_err)?;
            if !self.wait_for_ticket {
                tls.forget_key_schedule();
            }
            self.state = Lean::Established(tls);
        }
        let Lean::Established(tls) = &mut self.state else {
            return Err(io::Error::other("TLS state broken by an earlier error"));
        };
        let o = tls
            .decrypt_in_place(&mut buf[pos..], on_plain)
            .map_err(lean_tls_err)?;
        if o.wants_write {
            let pending = &mut self.spill.get_or_insert_with(Box::default).pending;
            tls.poll_transmit(pending).map_err(lean_tls_err)?;
        }
        if tls.has_key_schedule() && tls.tickets_received() > 0 {
            tls.forget_key_schedule();
        }
        Ok((
            pos + o.consumed,
            Opened {
                peer_closed: o.peer_closed,
            },
        ))
    }
}

thread_local! {
    /// The session ticket of the device this thread is stepping (see [`DeviceTickets`]).
    static LENT_TICKET: RefCell<Option<Box<Tls13ClientSessionValue>>> =
        const { RefCell::new(None) };
}

/// Each simulated device's TLS 1.3 session ticket, kept in the device itself.
///
/// rustls asks the config's session store for a ticket when a connection starts and hands it
/// the server's tickets as they come. A device must resume only with its own ticket (a real
/// device holds only its own; sharing would turn first connections into resumptions), and a
/// shared map keyed by device costs ≈ 0.7 KB per device more than the ticket itself. So the
/// shard's driver lends each device's ticket slot to this thread for the device's step
/// ([`DeviceTickets::lend`]); the store reads and writes only that slot. The server sends one
/// ticket per handshake; the newest is kept. Outside a step (no slot lent) tickets are dropped.
#[derive(Debug, Default)]
pub(super) struct DeviceTickets {
    /// The server's key-exchange group (every device talks to the same server): an
    /// `u16::from(NamedGroup)`, 0 for none.
    kx_hint: AtomicU16,
}

impl DeviceTickets {
    /// Runs `f` with `slot` as the ticket rustls sees on this thread.
    pub fn lend<R>(slot: &mut Option<Box<Tls13ClientSessionValue>>, f: impl FnOnce() -> R) -> R {
        LENT_TICKET.with(|t| *t.borrow_mut() = slot.take());
        let r = f();
        *slot = LENT_TICKET.with(|t| t.borrow_mut().take());
        r
    }
}

impl ClientSessionStore for DeviceTickets {
    fn set_kx_hint(&self, _: ServerName<'static>, group: NamedGroup) {
        self.kx_hint.store(u16::from(group), Ordering::Relaxed);
    }

    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        let g = self.kx_hint.load(Ordering::Relaxed);
        (g != 0).then(|| NamedGroup::from(g))
    }

    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, _: ServerName<'static>, value: Tls13ClientSessionValue) {
        LENT_TICKET.with(|t| *t.borrow_mut() = Some(Box::new(value)));
    }

    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        LENT_TICKET.with(|t| t.borrow_mut().take().map(|b| *b))
    }
}
