//! The server handshake on rustls' unbuffered connection, up to detaching its secrets.

use std::sync::Arc;

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus,
};
use rustls::{HandshakeKind, ServerConfig, SupportedCipherSuite};

use super::error::HandshakeError;
use super::record::{DetachedTls, Side, decrypter, encrypter, key_iv, tx_must_start_at_zero};

/// What one [`Handshake::feed`] call did.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes consumed from the front of `incoming`; drop them before the next call.
    pub consumed: usize,
    /// The handshake is done: call [`Handshake::detach`]. Bytes after `consumed` are records
    /// for the detached state.
    pub complete: bool,
}

/// A sans-IO TLS 1.3 server handshake on [`UnbufferedServerConnection`] (≈ 3.5 KB, half
/// of a buffered `ServerConnection`), which ends by detaching into a [`DetachedTls`].
///
/// Call order: [`new`](Self::new); optionally [`queue_half_rtt`](Self::queue_half_rtt) (the
/// `Challenge` frame: sealed as soon as the server's Finished is out, in the same flight);
/// then for every read, [`feed`](Self::feed) the bytes received so far and send what it
/// appended to `out`, until `Progress::complete`; then [`detach`](Self::detach) and send
/// what it appended (a KeyUpdate, for AES-GCM suites).
///
/// Session tickets (`ServerConfig::send_tls13_tickets`) go out with the server's answer to
/// the client's Finished, before detaching: a `KernelConnection` cannot send them later.
pub struct Handshake {
    conn: UnbufferedServerConnection,
    half_rtt: Vec<u8>,
    complete: bool,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("complete", &self.complete)
            .field("half_rtt_queued", &self.half_rtt.len())
            .finish()
    }
}

impl Handshake {
    /// A handshake for one accepted connection. The config must allow secret extraction
    /// (`TlsOptions::secret_extraction`); share one config across shards (ticket key).
    pub fn new(config: Arc<ServerConfig>) -> Result<Handshake, HandshakeError> {
        if !config.enable_secret_extraction {
            return Err(HandshakeError::SecretExtractionOff);
        }
        Ok(Handshake {
            conn: UnbufferedServerConnection::new(config)?,
            half_rtt: Vec::new(),
            complete: false,
        })
    }

    /// Queues application data to seal as soon as the keys allow: right after the server's
    /// Finished when `send_half_rtt_data` is on (half-RTT data), else when the handshake
    /// completes. Always before anything the detached state seals.
    pub fn queue_half_rtt(&mut self, data: &[u8]) {
        self.half_rtt.extend_from_slice(data);
    }

    /// Processes `incoming` (all bytes received and not yet consumed), appends the TLS
    /// records to send to `out` and any application data the client sent once its Finished
    /// was in (rare: it is usually read by the detached state) to `received`.
    ///
    /// On error, `out` ends with the alert rustls chose (if any): send it, then close.
    pub fn feed(
        &mut self,
        incoming: &mut [u8],
        out: &mut Vec<u8>,
        received: &mut Vec<u8>,
    ) -> Result<Progress, HandshakeError> {
        let mut consumed = 0;
        if self.complete {
            return Ok(Progress {
                consumed,
                complete: true,
            });
        }
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
                ConnectionState::TransmitTlsData(mut tx) => {
                    // The caller sends `out` after this call, in order: treat it as sent.
                    if !self.half_rtt.is_empty() {
                        if let Some(mut wt) = tx.may_encrypt_app_data() {
                            seal_half_rtt(&mut self.half_rtt, out, |d, b| wt.encrypt(d, b))?;
                        }
                    }
                    tx.done();
                    false
                }
                ConnectionState::BlockedHandshake => true,
                ConnectionState::ReadTraffic(mut rt) => {
                    while let Some(rec) = rt.next_record() {
                        let rec = rec?;
                        extra += rec.discard;
                        received.extend_from_slice(rec.payload);
                    }
                    false
                }
                // With half-RTT data on, rustls offers WriteTraffic as soon as the server's
                // Finished is out, before the client's Finished: blocked, not complete.
                ConnectionState::WriteTraffic(mut wt) => {
                    if !self.half_rtt.is_empty() {
                        seal_half_rtt(&mut self.half_rtt, out, |d, b| wt.encrypt(d, b))?;
                    }
                    true
                }
                ConnectionState::ReadEarlyData(_) => return Err(HandshakeError::EarlyData),
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

    /// After a handshake error rustls has queued the alert to send (handshake_failure,
    /// decode_error, ...); it is handed out by the next call: append it to `out`.
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

    /// The negotiated ALPN protocol.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The client's certificate chain, once verified (the config asks for one with a client
    /// verifier; after a resumption, the chain verified when the ticket was issued). Gone after
    /// [`detach`](Self::detach): take what is needed of it before.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Trades the finished handshake for its traffic secrets and rustls' key schedule.
    /// For suites whose aws-lc-rs encrypter must start at sequence 0 (AES-GCM; see the
    /// module docs) and whose sending sequence is past 0 (tickets, half-RTT data), seals a
    /// KeyUpdate into `out` first, so that the detached encrypter starts on a fresh key.
    pub fn detach(self, out: &mut Vec<u8>) -> Result<DetachedTls, HandshakeError> {
        if !self.complete {
            return Err(HandshakeError::NotComplete);
        }
        let (secrets, kernel) = self.conn.dangerous_into_kernel_connection()?;
        detach_extracted(secrets, kernel, out)
    }
}

/// Builds the detached state from what rustls' `dangerous_into_kernel_connection` handed out,
/// on either side. For suites whose aws-lc-rs encrypter must start at sequence 0 (AES-GCM; see
/// the module docs) and a sending sequence past 0 (tickets, half-RTT data), seals a KeyUpdate
/// into `out` first, so that the detached encrypter starts on a fresh key.
pub(super) fn detach_extracted<S: Side>(
    secrets: rustls::ExtractedSecrets,
    kernel: rustls::kernel::KernelConnection<S>,
    out: &mut Vec<u8>,
) -> Result<DetachedTls<S>, HandshakeError> {
    let suite = match kernel.negotiated_cipher_suite() {
        SupportedCipherSuite::Tls13(s) => s,
        other => return Err(HandshakeError::NotTls13(other.suite())),
    };
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let (tx_key, tx_iv) = key_iv(tx);
    let (rx_key, rx_iv) = key_iv(rx);
    let mut tls = DetachedTls::new(
        suite,
        encrypter(suite, tx_key, tx_iv, tx_seq),
        decrypter(suite, rx_key, rx_iv, rx_seq),
        Some(Box::new(kernel)),
    );
    if tx_seq != 0 && tx_must_start_at_zero(suite.common.suite) {
        // The fresh encrypter's first record is this KeyUpdate, at `tx_seq`: aws-lc
        // tolerates one such record (it fails from the third), and the next key starts at 0.
        tls.rekey_tx(out)?;
    }
    Ok(tls)
}

/// `Handshake` is only ever `ServerConnectionData`; a compile-time check that the detached
/// state can cross shards.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<DetachedTls>();
    send::<Handshake>();
    send::<rustls::kernel::KernelConnection<ServerConnectionData>>();
};

pub(super) struct Grow(pub(super) InsufficientSizeError);

/// Appends the handshake records rustls has ready (either side) to `out`.
pub(super) fn encode_tls<Data>(out: &mut Vec<u8>, enc: &mut EncodeTlsData<'_, Data>) {
    append(out, |buf| match enc.encode(buf) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(e)) => Err(Grow(e)),
        Err(EncodeError::AlreadyEncoded) => Ok(0),
    });
}

/// Appends what `write` writes into the spare end of `out`, growing it as asked.
pub(super) fn append(out: &mut Vec<u8>, mut write: impl FnMut(&mut [u8]) -> Result<usize, Grow>) {
    let start = out.len();
    let mut room = 1024;
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(Grow(e)) => room = e.required_size,
        }
    }
}

fn seal_half_rtt(
    data: &mut Vec<u8>,
    out: &mut Vec<u8>,
    mut encrypt: impl FnMut(&[u8], &mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), HandshakeError> {
    let mut failed = None;
    append(out, |buf| match encrypt(data, buf) {
        Ok(n) => Ok(n),
        Err(EncryptError::InsufficientSize(e)) => Err(Grow(e)),
        Err(e) => {
            failed = Some(e);
            Ok(0)
        }
    });
    if let Some(e) = failed {
        return Err(HandshakeError::UnexpectedState(match e {
            EncryptError::EncryptExhausted => "half-RTT data: encrypter exhausted",
            _ => "half-RTT data could not be sealed",
        }));
    }
    data.clear();
    data.shrink_to_fit();
    Ok(())
}
