//! Why a detached TLS connection, its handshake or its move failed.

use rustls::{AlertDescription, CipherSuite, ContentType, HandshakeType};

/// A detached record layer refused a record or could not seal one. Every variant but
/// [`DetachedError::KeyUpdate`] is `Copy`-sized and cheap; [`DetachedError::is_peer_fault`]
/// says who is to blame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DetachedError {
    /// The outer record type was not application data (23): after the handshake every
    /// TLS 1.3 record is protected, so anything else is a peer error.
    #[error("record type {0} after the handshake, where only application data (23) may come")]
    UnexpectedRecordType(u8),
    /// `legacy_record_version` was not 0x0303.
    #[error("record version {0:#06x}, expected 0x0303")]
    BadRecordVersion(u16),
    /// A record longer than TLS 1.3 allows (RFC 8446 §5.2).
    #[error("record of {got} bytes over the limit of {limit}")]
    RecordOverflow { limit: usize, got: usize },
    /// Authentication of a record failed: tampered, truncated, or keys out of step.
    #[error("record {seq} failed to decrypt (tampered, or keys out of step)")]
    Decrypt { seq: u64 },
    /// The AEAD refused to seal (should not happen with fresh keys; see the module docs on
    /// AES-GCM nonces).
    #[error("sealing record {seq} failed")]
    Encrypt { seq: u64 },
    /// The peer sent a fatal alert.
    #[error("peer sent alert {0:?}")]
    PeerAlert(AlertDescription),
    /// A protected message that does not parse.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A post-handshake message the peer may not send (a client's NewSessionTicket, or any
    /// post-handshake authentication).
    #[error("unexpected post-handshake message {0:?} from the peer")]
    UnexpectedHandshake(HandshakeType),
    /// An inner content type that has no business after the handshake.
    #[error("inner content type {0:?} after the handshake")]
    UnexpectedContent(ContentType),
    /// More KeyUpdates without application data between them than we accept (DoS guard).
    #[error("more than {0} key updates in a row without application data")]
    TooManyKeyUpdates(u8),
    /// A KeyUpdate was needed (from the peer, or the confidentiality limit) but this state was
    /// restored from bytes: rustls' key schedule (`KernelConnection`) does not survive
    /// serialisation, so new traffic secrets cannot be derived.
    #[error(
        "a key update is needed but this connection was restored from bytes and has no key schedule"
    )]
    NoKeySchedule,
    /// rustls refused to derive the next traffic secret.
    #[error("key update failed: {0}")]
    KeyUpdate(rustls::Error),
    /// Sequence numbers ran out (u64) for a direction with no key schedule left.
    #[error("sequence number space of the {0} direction is exhausted")]
    SeqExhausted(&'static str),
    /// rustls refused a session ticket the server sent (client side).
    #[error("session ticket rejected: {0}")]
    Ticket(rustls::Error),
    /// `encrypt` or `close_notify` after our close_notify.
    #[error("sending after close_notify")]
    Closed,
}

impl DetachedError {
    /// True if the peer sent something wrong; false if the fault is ours (or the state's).
    pub fn is_peer_fault(&self) -> bool {
        !matches!(
            self,
            DetachedError::Encrypt { .. }
                | DetachedError::NoKeySchedule
                | DetachedError::KeyUpdate(_)
                | DetachedError::SeqExhausted(_)
                | DetachedError::Closed
        )
    }
}

/// The TLS handshake on [`super::Handshake`] failed, or could not detach.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The server config was built without `enable_secret_extraction`
    /// (`TlsOptions::secret_extraction`), so it cannot detach.
    #[error(
        "the server config does not allow secret extraction (set TlsOptions::secret_extraction)"
    )]
    SecretExtractionOff,
    /// rustls rejected the handshake; its alert, if any, is at the end of `out`.
    #[error("TLS handshake failed: {0}")]
    Tls(#[from] rustls::Error),
    /// The client sent 0-RTT data, which this server never accepts.
    #[error("the client sent 0-RTT data, which this server does not accept")]
    EarlyData,
    /// The client closed before the handshake completed.
    #[error("the client closed the connection during the handshake")]
    PeerClosed,
    /// `detach` before `feed` reported completion.
    #[error("cannot detach before the handshake is complete")]
    NotComplete,
    /// The negotiated suite is not a TLS 1.3 one (the config allows only TLS 1.3).
    #[error("negotiated {0:?}, which is not a TLS 1.3 suite")]
    NotTls13(CipherSuite),
    /// The first detached record (a KeyUpdate, for AES-GCM) could not be sealed.
    #[error("after the handshake: {0}")]
    Detached(#[from] DetachedError),
    /// rustls reported a state this module does not know (a newer rustls).
    #[error("unexpected TLS connection state {0}")]
    UnexpectedState(&'static str),
}

/// A detached state could not be serialised, or bytes could not be restored into one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MoveError {
    /// The bytes end early.
    #[error("state bytes truncated")]
    Truncated,
    /// Not a detached state, or written by an incompatible version.
    #[error("not a detached TLS state (bad magic or format version {0})")]
    BadFormat(u8),
    /// The provider given to `from_bytes` has no TLS 1.3 suite with this id.
    #[error("cipher suite {0:?} is not offered by the provider")]
    UnknownSuite(CipherSuite),
    /// rustls' public API can only make 32-byte `AeadKey`s, so a suite with another key
    /// length (TLS_AES_128_GCM_SHA256) can be detached but not moved between processes.
    #[error("cipher suite {0:?} has a {1}-byte key; only 32-byte-key suites can be moved")]
    KeyLength(CipherSuite, usize),
    /// AES-GCM (aws-lc-rs) needs the first record a fresh encrypter seals to be at sequence
    /// 0; call `DetachedTls::rekey_tx` before `to_bytes`.
    #[error("{0:?} can only move with a fresh sending key (sequence 0): call rekey_tx first")]
    TxNotFresh(CipherSuite),
}
