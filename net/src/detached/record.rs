//! The TLS 1.3 record layer of a detached connection, on rustls' own AEAD objects.

use rustls::client::ClientConnectionData;
use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, NONCE_LEN,
    OutboundChunks, OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{
    AlertDescription, CipherSuite, ConnectionTrafficSecrets, ContentType, HandshakeType,
    ProtocolVersion, Tls13CipherSuite,
};

use super::error::DetachedError;

/// Largest plaintext in one record (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest protected record body: plaintext, content type byte, padding and tag (§5.2).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// The record header: type, legacy version, length.
pub const HEADER_LEN: usize = 5;

/// The most KeyUpdates we accept in a row with no application data between them.
const MAX_KEY_UPDATES_IN_A_ROW: u8 = 32;
/// Where a suite with no confidentiality limit (ChaCha20-Poly1305) still rekeys, so that the
/// 64-bit sequence number never wraps (the value rustls uses).
const SEQ_SOFT_LIMIT: u64 = 0xffff_ffff_ffff_0000;

/// One direction: its AEAD, the next sequence number, and what the side keeps of the key
/// material it was made from ([`Side::Saved`]: a copy to serialise the state on a server,
/// nothing on a client).
pub(super) struct Direction<C: ?Sized, K> {
    pub(super) cipher: Box<C>,
    pub(super) seq: u64,
    pub(super) saved: K,
}

/// What a direction keeps of its key material besides the AEAD made from it.
#[doc(hidden)]
pub trait Saved: Send + Sync + Sized + 'static {
    /// Keeps what it needs of `key` and `iv`.
    fn save(key: &AeadKey, iv: &Iv) -> Self;
}

/// A copy of a direction's key and IV, to serialise the state ([`DetachedTls::to_bytes`]).
/// `key` is `None` when rustls' public API cannot rebuild it (only 32-byte keys, see
/// [`super::MoveError::KeyLength`]). Raw arrays: 45 bytes, where rustls' `AeadKey` and `Iv`
/// types took 64 with their length fields and padding.
#[doc(hidden)]
pub struct KeyCopy {
    pub(super) key: Option<[u8; 32]>,
    pub(super) iv: [u8; NONCE_LEN],
}

impl Saved for KeyCopy {
    fn save(key: &AeadKey, iv: &Iv) -> KeyCopy {
        KeyCopy {
            key: <[u8; 32]>::try_from(key.as_ref()).ok(),
            iv: <[u8; NONCE_LEN]>::try_from(iv.as_ref()).unwrap_or([0; NONCE_LEN]),
        }
    }
}

/// Nothing: a state that never moves between processes.
impl Saved for () {
    fn save(_: &AeadKey, _: &Iv) {}
}

/// Splits rustls' key and IV out of the suite-tagged enum.
pub(super) fn key_iv(secrets: ConnectionTrafficSecrets) -> (AeadKey, Iv) {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
        // `ConnectionTrafficSecrets` is non-exhaustive; TLS 1.3 suites use the three above.
        _ => unreachable_suite(),
    }
}

#[cold]
fn unreachable_suite() -> ! {
    // rustls only hands these three variants out for TLS 1.3; a new one would be a new
    // rustls, caught by the tests before it ships.
    panic!("rustls returned traffic secrets for an AEAD this module does not know")
}

pub(super) fn encrypter<K: Saved>(
    suite: &'static Tls13CipherSuite,
    key: AeadKey,
    iv: Iv,
    seq: u64,
) -> Direction<dyn MessageEncrypter, K> {
    let saved = K::save(&key, &iv);
    Direction {
        cipher: suite.aead_alg.encrypter(key, iv),
        seq,
        saved,
    }
}

pub(super) fn decrypter<K: Saved>(
    suite: &'static Tls13CipherSuite,
    key: AeadKey,
    iv: Iv,
    seq: u64,
) -> Direction<dyn MessageDecrypter, K> {
    let saved = K::save(&key, &iv);
    Direction {
        cipher: suite.aead_alg.decrypter(key, iv),
        seq,
        saved,
    }
}

/// aws-lc-rs seals AES-GCM with aws-lc's TLS 1.3 AEAD, which learns the nonce mask from the
/// *first* record it seals (assuming sequence 0) and then insists the sequence numbers rise.
/// An encrypter whose first record is at sequence N > 0 computes a wrong mask and refuses a
/// later record (`seq ^ N` stops rising: the third record when N = 3). Its decrypter is
/// stateless. So for every suite but ChaCha20-Poly1305 a fresh encrypter must start at 0.
pub(super) fn tx_must_start_at_zero(suite: CipherSuite) -> bool {
    suite != CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
}

/// Which end of the connection a [`DetachedTls`] is: rustls' `ServerConnectionData` or
/// `ClientConnectionData` (the type parameter of its `KernelConnection`). The record layer is
/// the same for both; they differ in which post-handshake messages the peer may send.
pub trait Side: sealed::Sealed + Sized + Send + Sync + 'static {
    /// What each direction keeps of its key material: a server's state can be serialised
    /// (the upgrade hands it to the next process), a client's never moves and keeps nothing.
    #[doc(hidden)]
    type Saved: Saved;

    /// Handles a post-handshake message other than KeyUpdate, of type `typ` and body `msg`.
    /// Returns true if it was a session ticket.
    #[doc(hidden)]
    fn post_handshake(
        kernel: Option<&mut KernelConnection<Self>>,
        typ: HandshakeType,
        msg: &[u8],
    ) -> Result<bool, DetachedError>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for rustls::server::ServerConnectionData {}
    impl Sealed for rustls::client::ClientConnectionData {}
}

impl Side for ServerConnectionData {
    type Saved = KeyCopy;

    /// A client sends nothing after its Finished but KeyUpdate (no post-handshake auth here).
    fn post_handshake(
        _: Option<&mut KernelConnection<Self>>,
        typ: HandshakeType,
        _: &[u8],
    ) -> Result<bool, DetachedError> {
        Err(DetachedError::UnexpectedHandshake(typ))
    }
}

impl Side for ClientConnectionData {
    type Saved = ();

    /// The server sends NewSessionTickets after the handshake: rustls' key schedule stores
    /// them in the config's session store (resumption keeps working). With no key schedule
    /// left (forgotten, to save memory) a ticket is dropped, as RFC 8446 §4.6.1 allows.
    fn post_handshake(
        kernel: Option<&mut KernelConnection<Self>>,
        typ: HandshakeType,
        msg: &[u8],
    ) -> Result<bool, DetachedError> {
        match typ {
            HandshakeType::NewSessionTicket => {
                if let Some(kernel) = kernel {
                    kernel
                        .handle_new_session_ticket(msg)
                        .map_err(DetachedError::Ticket)?;
                }
                Ok(true)
            }
            other => Err(DetachedError::UnexpectedHandshake(other)),
        }
    }
}

/// What one [`DetachedTls::decrypt_in_place`] call did.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Bytes of `buf` consumed (whole records); the rest is a partial record to keep.
    pub consumed: usize,
    /// The peer sent close_notify: it sends nothing more. Reply with
    /// [`DetachedTls::close_notify`] and close.
    pub peer_closed: bool,
    /// Something must be sent even with no data to send (the answer to a peer's KeyUpdate):
    /// call [`DetachedTls::poll_transmit`].
    pub wants_write: bool,
}

/// A TLS 1.3 connection after its handshake: two AEADs from rustls, their sequence numbers,
/// and rustls' [`KernelConnection`] for key updates (and, on a client, session tickets). The
/// server side (the default `S`) is made by [`super::Handshake::detach`] or
/// [`DetachedTls::from_bytes`]; the client side, [`super::DetachedClientTls`], by
/// [`super::ClientHandshake::detach`].
///
/// Call order: feed received bytes to [`decrypt_in_place`](Self::decrypt_in_place) (keep
/// the unconsumed tail for the next read); seal with [`encrypt`](Self::encrypt); when
/// `Opened::wants_write`, call [`poll_transmit`](Self::poll_transmit); end with
/// [`close_notify`](Self::close_notify). The value is `Send`: moving it to another shard of the
/// same process keeps everything, key updates included.
pub struct DetachedTls<S: Side = ServerConnectionData> {
    pub(super) suite: &'static Tls13CipherSuite,
    pub(super) tx: Direction<dyn MessageEncrypter, S::Saved>,
    pub(super) rx: Direction<dyn MessageDecrypter, S::Saved>,
    /// rustls' key schedule; `None` once restored from bytes or forgotten.
    pub(super) kernel: Option<Box<KernelConnection<S>>>,
    /// Records sealed under one key before we rekey (or refuse, with no key schedule).
    pub(super) rekey_after: u64,
    pub(super) flags: Flags,
    key_updates_in_a_row: u8,
    /// Session tickets read (client side; saturating).
    tickets: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Flags {
    pub(super) peer_closed: bool,
    pub(super) sent_close: bool,
    /// The peer asked for our KeyUpdate; it goes before our next record.
    pub(super) answer_key_update: bool,
}

impl<S: Side> std::fmt::Debug for DetachedTls<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("DetachedTls")
            .field("suite", &self.suite.common.suite)
            .field("tx_seq", &self.tx.seq)
            .field("rx_seq", &self.rx.seq)
            .field("key_schedule", &self.kernel.is_some())
            .field("flags", &self.flags)
            .finish()
    }
}

impl<S: Side> DetachedTls<S> {
    pub(super) fn new(
        suite: &'static Tls13CipherSuite,
        tx: Direction<dyn MessageEncrypter, S::Saved>,
        rx: Direction<dyn MessageDecrypter, S::Saved>,
        kernel: Option<Box<KernelConnection<S>>>,
    ) -> DetachedTls<S> {
        DetachedTls {
            suite,
            tx,
            rx,
            kernel,
            rekey_after: default_rekey_after(suite),
            flags: Flags::default(),
            key_updates_in_a_row: 0,
            tickets: 0,
        }
    }

    /// The negotiated cipher suite.
    pub fn suite(&self) -> CipherSuite {
        self.suite.common.suite
    }

    /// Sequence numbers (next to seal, next to open) under the current keys.
    pub fn sequence_numbers(&self) -> (u64, u64) {
        (self.tx.seq, self.rx.seq)
    }

    /// True while rustls' key schedule is held (false after [`Self::from_bytes`]): key
    /// updates, ours and the peer's, need it.
    pub fn has_key_schedule(&self) -> bool {
        self.kernel.is_some()
    }

    /// Drops rustls' key schedule (`KernelConnection`, ≈ 0.8 KB of heap): the state then
    /// behaves like one restored from bytes — a peer KeyUpdate, or reaching the rekey limit,
    /// ends the connection with [`DetachedError::NoKeySchedule`].
    pub fn forget_key_schedule(&mut self) {
        self.kernel = None;
    }

    /// Session tickets the peer sent since detaching (a server sends them to a client; they
    /// reach rustls' session store while the key schedule is held). Saturates at 255.
    pub fn tickets_received(&self) -> u8 {
        self.tickets
    }

    /// True once the peer's close_notify was read.
    pub fn peer_closed(&self) -> bool {
        self.flags.peer_closed
    }

    /// Rekey after `records` records under one sending key instead of at the suite's
    /// confidentiality limit (a lower value only; the limit always applies).
    pub fn set_rekey_after(&mut self, records: u64) {
        self.rekey_after = records.clamp(1, default_rekey_after(self.suite));
    }

    /// Opens every whole record at the front of `buf`, in place, and hands each application
    /// data payload to `on_data`. Partial records are left: keep `buf[opened.consumed..]` and
    /// append the next read to it. Handles alerts (close_notify ends reading), the peer's
    /// KeyUpdate (new receive key; an answer is queued if requested), session tickets on a
    /// client, and rejects everything else the peer may not send.
    pub fn decrypt_in_place(
        &mut self,
        buf: &mut [u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<Opened, DetachedError> {
        let mut pos = 0;
        while !self.flags.peer_closed {
            let rest = &mut buf[pos..];
            let Some(header) = rest.first_chunk::<HEADER_LEN>() else {
                break;
            };
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != u8::from(ContentType::ApplicationData) {
                return Err(DetachedError::UnexpectedRecordType(header[0]));
            }
            let version = u16::from_be_bytes([header[1], header[2]]);
            if version != 0x0303 {
                return Err(DetachedError::BadRecordVersion(version));
            }
            if len > MAX_CIPHERTEXT {
                return Err(DetachedError::RecordOverflow {
                    limit: MAX_CIPHERTEXT,
                    got: len,
                });
            }
            let Some(body) = rest.get_mut(HEADER_LEN..HEADER_LEN + len) else {
                break;
            };
            let seq = self.rx.seq;
            if seq == u64::MAX {
                return Err(DetachedError::SeqExhausted("receive"));
            }
            let msg = InboundOpaqueMessage::new(
                ContentType::ApplicationData,
                ProtocolVersion::TLSv1_2,
                body,
            );
            let plain = self
                .rx
                .cipher
                .decrypt(msg, seq)
                .map_err(|_| DetachedError::Decrypt { seq })?;
            self.rx.seq = seq + 1;
            pos += HEADER_LEN + len;
            if plain.payload.len() > MAX_PLAINTEXT {
                return Err(DetachedError::RecordOverflow {
                    limit: MAX_PLAINTEXT,
                    got: plain.payload.len(),
                });
            }
            match plain.typ {
                ContentType::ApplicationData => {
                    self.key_updates_in_a_row = 0;
                    on_data(plain.payload);
                }
                ContentType::Alert => self.on_alert(plain.payload)?,
                ContentType::Handshake => self.on_handshake(plain.payload)?,
                other => return Err(DetachedError::UnexpectedContent(other)),
            }
        }
        Ok(Opened {
            consumed: pos,
            peer_closed: self.flags.peer_closed,
            wants_write: self.flags.answer_key_update && !self.flags.sent_close,
        })
    }

    fn on_alert(&mut self, body: &[u8]) -> Result<(), DetachedError> {
        let &[_level, desc] = body else {
            return Err(DetachedError::Malformed("alert"));
        };
        match AlertDescription::from(desc) {
            AlertDescription::CloseNotify => {
                self.flags.peer_closed = true;
                Ok(())
            }
            // A warning that announces a close_notify to follow (RFC 8446 §6.1).
            AlertDescription::UserCanceled => Ok(()),
            other => Err(DetachedError::PeerAlert(other)),
        }
    }

    fn on_handshake(&mut self, mut body: &[u8]) -> Result<(), DetachedError> {
        if body.is_empty() {
            return Err(DetachedError::Malformed("handshake record"));
        }
        while let [typ, a, b, c, rest @ ..] = body {
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            let Some(msg) = rest.get(..len) else {
                // A post-handshake message split over records: none a client sends is that
                // long, nor a ticket from our server (a few hundred bytes).
                return Err(DetachedError::Malformed(
                    "handshake message split over records",
                ));
            };
            body = &rest[len..];
            match HandshakeType::from(*typ) {
                HandshakeType::KeyUpdate => {
                    // A key change must end its record (RFC 8446 §5.1).
                    if !body.is_empty() {
                        return Err(DetachedError::Malformed("KeyUpdate not at end of record"));
                    }
                    let requested = match msg {
                        [0] => false,
                        [1] => true,
                        _ => return Err(DetachedError::Malformed("KeyUpdate")),
                    };
                    self.key_updates_in_a_row += 1;
                    if self.key_updates_in_a_row > MAX_KEY_UPDATES_IN_A_ROW {
                        return Err(DetachedError::TooManyKeyUpdates(MAX_KEY_UPDATES_IN_A_ROW));
                    }
                    let kernel = self.kernel.as_mut().ok_or(DetachedError::NoKeySchedule)?;
                    let (seq, secrets) = kernel
                        .update_rx_secret()
                        .map_err(DetachedError::KeyUpdate)?;
                    let (key, iv) = key_iv(secrets);
                    self.rx = decrypter(self.suite, key, iv, seq);
                    self.flags.answer_key_update |= requested;
                }
                other => {
                    if S::post_handshake(self.kernel.as_deref_mut(), other, msg)? {
                        self.tickets = self.tickets.saturating_add(1);
                    }
                }
            }
        }
        if body.is_empty() {
            Ok(())
        } else {
            Err(DetachedError::Malformed("handshake message header"))
        }
    }

    /// Seals `plain` as application data records of at most 16 KiB each, appended to `out`
    /// (`plain.len()` + 22 bytes per record). An empty `plain` seals nothing. Sends first any
    /// KeyUpdate owed to the peer, and rekeys when the cipher's limit comes near.
    pub fn encrypt(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), DetachedError> {
        self.poll_transmit(out)?;
        for chunk in plain.chunks(MAX_PLAINTEXT) {
            if self.tx.seq >= self.rekey_after {
                self.rekey_tx(out)?;
            }
            self.seal(ContentType::ApplicationData, chunk, out)?;
        }
        Ok(())
    }

    /// Appends what must be sent even with no data to send: the answer to a peer's KeyUpdate
    /// request (RFC 8446 §4.6.3).
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> Result<(), DetachedError> {
        if self.flags.sent_close {
            return Err(DetachedError::Closed);
        }
        if self.flags.answer_key_update {
            self.rekey_tx(out)?;
        }
        Ok(())
    }

    /// Sends a KeyUpdate (update_not_requested) under the current key, then switches to the
    /// next sending key from rustls' key schedule, at sequence 0.
    pub fn rekey_tx(&mut self, out: &mut Vec<u8>) -> Result<(), DetachedError> {
        if self.flags.sent_close {
            return Err(DetachedError::Closed);
        }
        let kernel = self.kernel.as_mut().ok_or(DetachedError::NoKeySchedule)?;
        // Derive first, so that a failure leaves the old key in place and nothing sent.
        let (seq, secrets) = kernel
            .update_tx_secret()
            .map_err(DetachedError::KeyUpdate)?;
        let key_update = [u8::from(HandshakeType::KeyUpdate), 0, 0, 1, 0];
        self.seal(ContentType::Handshake, &key_update, out)?;
        let (key, iv) = key_iv(secrets);
        self.tx = encrypter(self.suite, key, iv, seq);
        self.flags.answer_key_update = false;
        Ok(())
    }

    /// Seals a close_notify alert; nothing may be sent after it.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), DetachedError> {
        if self.flags.sent_close {
            return Err(DetachedError::Closed);
        }
        let alert = [1, u8::from(AlertDescription::CloseNotify)];
        self.seal(ContentType::Alert, &alert, out)?;
        self.flags.sent_close = true;
        Ok(())
    }

    fn seal(
        &mut self,
        typ: ContentType,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), DetachedError> {
        let seq = self.tx.seq;
        if seq == u64::MAX {
            return Err(DetachedError::SeqExhausted("send"));
        }
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(body),
        };
        let sealed = self
            .tx
            .cipher
            .encrypt(msg, seq)
            .map_err(|_| DetachedError::Encrypt { seq })?;
        self.tx.seq = seq + 1;
        out.extend_from_slice(&sealed.encode());
        Ok(())
    }
}

/// The suite's confidentiality limit (records under one key), or the soft sequence limit.
fn default_rekey_after(suite: &'static Tls13CipherSuite) -> u64 {
    suite.common.confidentiality_limit.min(SEQ_SOFT_LIMIT)
}
