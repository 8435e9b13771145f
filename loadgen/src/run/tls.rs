//! A simulated device's TLS state behind one small enum, so what a device keeps after its
//! handshake (campaign key `tls_state`) can change without touching the device state machine.
//!
//! Today every device keeps rustls' buffered `ClientConnection` for the connection's life
//! ([`DeviceTls::Buffered`]). The detached state (traffic keys and sequence numbers only, the
//! record layer on rustls' AEADs; `core/src/detached/` on the server side) slots in as a second
//! variant: rustls for the handshake, then `Detached` once [`DeviceTls::is_handshaking`] turns
//! false. The calls below are shaped for it: input may be decrypted in place in the shard's
//! buffer, and sealed records are appended to a shard buffer the caller sends.

use std::io::{self, Read as _, Write as _};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

use super::net::tls_err;

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

    /// Whether the finished handshake resumed a session (from a ticket).
    pub fn resumed(&self) -> bool {
        match self {
            DeviceTls::Buffered(c) => c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        }
    }

    /// Whether the handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        match self {
            DeviceTls::Buffered(c) => c.is_handshaking(),
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
        }
    }

    /// Appends a close_notify alert to `out`.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        match self {
            DeviceTls::Buffered(tls) => {
                tls.send_close_notify();
                self.seal(&[], out)
            }
        }
    }
}
