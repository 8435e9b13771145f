//! The client handshake on rustls' unbuffered connection, up to detaching its secrets.

use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::{ClientConfig, HandshakeKind};

use super::error::HandshakeError;
use super::handshake::{Progress, detach_extracted, encode_tls};
use super::record::DetachedTls;

/// The client side of a detached connection.
pub type DetachedClientTls = DetachedTls<ClientConnectionData>;

/// A sans-IO TLS 1.3 client handshake on [`UnbufferedClientConnection`], which ends by
/// detaching into a [`DetachedClientTls`].
///
/// Call order: [`new`](Self::new) (the ClientHello goes out with the first
/// [`feed`](Self::feed), called with no input); then for every read, `feed` the bytes received
/// so far and send what it appended to `out`, until `Progress::complete`; then
/// [`detach`](Self::detach) and send what it appended (usually nothing).
///
/// Session tickets: the server sends them after it has read our Finished, so they reach the
/// detached state, which hands them to rustls' key schedule
/// (`KernelConnection::handle_new_session_ticket`) and so to the config's session store.
/// Keep the key schedule until [`DetachedTls::tickets_received`] says the ticket came, then
/// [`DetachedTls::forget_key_schedule`] to save ≈ 0.8 KB.
pub struct ClientHandshake {
    conn: UnbufferedClientConnection,
    complete: bool,
}

impl std::fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandshake")
            .field("complete", &self.complete)
            .finish()
    }
}

impl ClientHandshake {
    /// A handshake to `name`. The config must allow secret extraction
    /// (`ClientTlsOptions::secret_extraction`); share one config (its session store).
    pub fn new(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<ClientHandshake, HandshakeError> {
        if !config.enable_secret_extraction {
            return Err(HandshakeError::SecretExtractionOff);
        }
        Ok(ClientHandshake {
            conn: UnbufferedClientConnection::new(config, name)?,
            complete: false,
        })
    }

    /// Processes `incoming` (all bytes received and not yet consumed), appends the TLS
    /// records to send to `out`, and hands application data the server sent within the
    /// handshake's flights (half-RTT data) to `on_data`.
    ///
    /// On error, `out` ends with the alert rustls chose (if any): send it, then close.
    pub fn feed(
        &mut self,
        incoming: &mut [u8],
        out: &mut Vec<u8>,
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<Progress, HandshakeError> {
        let mut consumed = 0;
        if self.complete {
            return Ok(Progress {
                consumed,
                complete: true,
            });
        }
        // Bounded: every state either makes progress in rustls or ends the call.
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut incoming[consumed..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.encode_alert(out);
                    return Err(e.into());
                }
            };
            let mut extra = 0;
            let done = match state {
                ConnectionState::EncodeTlsData(mut enc) => {
                    encode_tls(out, &mut enc);
                    false
                }
                ConnectionState::TransmitTlsData(tx) => {
                    // The caller sends `out` after this call, in order: treat it as sent.
                    tx.done();
                    false
                }
                ConnectionState::BlockedHandshake => true,
                ConnectionState::ReadTraffic(mut rt) => {
                    while let Some(rec) = rt.next_record() {
                        let rec = rec?;
                        extra += rec.discard;
                        on_data(rec.payload);
                    }
                    false
                }
                // Offered once our Finished is out and no whole record waits: complete.
                ConnectionState::WriteTraffic(_) => true,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(HandshakeError::PeerClosed);
                }
                _ => return Err(HandshakeError::UnexpectedState("from a newer rustls")),
            };
            consumed += discard + extra;
            if done {
                self.complete = !self.conn.is_handshaking();
                return Ok(Progress {
                    consumed,
                    complete: self.complete,
                });
            }
        }
    }

    fn encode_alert(&mut self, out: &mut Vec<u8>) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut enc)) = state {
            encode_tls(out, &mut enc);
        }
    }

    /// True once [`feed`](Self::feed) reported completion.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Full or resumed (from a ticket), once known.
    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.conn.handshake_kind()
    }

    /// Trades the finished handshake for its traffic secrets and rustls' key schedule. Our
    /// sending sequence is 0 here (the Finished went under the handshake key), so the
    /// AES-GCM first-record rule (module docs) holds; if it ever is not, a KeyUpdate is
    /// sealed into `out` first, as on the server.
    pub fn detach(self, out: &mut Vec<u8>) -> Result<DetachedClientTls, HandshakeError> {
        if !self.complete {
            return Err(HandshakeError::NotComplete);
        }
        let (secrets, kernel) = self.conn.dangerous_into_kernel_connection()?;
        detach_extracted(secrets, kernel, out)
    }
}

const _: fn() = || {
    fn send<T: Send>() {}
    send::<DetachedClientTls>();
    send::<ClientHandshake>();
};
