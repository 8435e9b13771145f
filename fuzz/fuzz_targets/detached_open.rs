//! The receive side of the server's detached TLS record layer (`tether_net::detached::
//! DetachedTls::decrypt_in_place`), after a real TLS 1.3 handshake in memory (rustls' client
//! against `detached::Handshake`), with ChaCha20-Poly1305 or AES-256-GCM.
//!
//! Two kinds of server state: *restored* (`to_bytes` of one handshake made at start, restored
//! with `from_bytes` every run: fast, no key schedule) and *live* (a fresh handshake this run,
//! rustls' key schedule kept, so the peer's KeyUpdates are followed). The harness seals its
//! own records as the client would, with the client's traffic secret from rustls' key log and
//! the suite's own AEAD and HKDF from the crypto provider: any inner content type, padding,
//! alerts, KeyUpdates (following the key change itself), handshake messages; at the right
//! sequence number or not; then damages some (a flipped bit, a cut, another length, outer
//! type or version), adds arbitrary bytes, and feeds the stream in pieces cut anywhere.
//!
//! Checked besides "no panic": a genuine application data record opens and yields exactly its
//! plaintext, wherever the stream was cut; a genuine alert, KeyUpdate or oversized record has
//! the outcome RFC 8446 and the module docs give it (close_notify ends reading, a KeyUpdate
//! switches keys and a requested one is answered, too many in a row or one without a key
//! schedule is an error); once anything damaged or foreign was fed, no byte of data comes out
//! any more and the stream ends in an error or in a partial record still waiting.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rustls::crypto::cipher::{AeadKey, Iv, NONCE_LEN, OutboundChunks, OutboundPlainMessage};
use rustls::crypto::tls13::OkmBlock;
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::{
    ClientConfig, ContentType, KeyLog, ProtocolVersion, ServerConfig, SupportedCipherSuite,
    Tls13CipherSuite,
};
use tether_net::detached::{DetachedError, DetachedTls, HEADER_LEN, MAX_CIPHERTEXT, MAX_PLAINTEXT};

/// The core tests' in-memory TLS pairs: configs and the handshake loop.
#[path = "../../net/tests/common/tls_pair.rs"]
mod tls_pair;

/// Operations past this many are ignored.
const MAX_ACTIONS: usize = 64;
/// KeyUpdates the server takes in a row with no application data between them.
const MAX_KEY_UPDATES_IN_A_ROW: u8 = 32;
const TAG_LEN: usize = 16;

#[derive(Arbitrary, Debug)]
struct Input {
    aes: bool,
    live: bool,
    actions: Vec<Action>,
}

#[derive(Arbitrary, Debug)]
enum Action {
    Record {
        seq: SeqChoice,
        inner: Inner,
        padding: u8,
        damage: Damage,
        cuts: Vec<u16>,
    },
    /// Arbitrary bytes on the stream.
    Raw(Vec<u8>),
}

impl Action {
    /// Whether this may be a handshake record (a KeyUpdate among them).
    fn may_key_update(&self) -> bool {
        match self {
            Action::Record { inner, .. } => matches!(
                inner,
                Inner::KeyUpdate(_) | Inner::Handshake(_) | Inner::Other(0 | 22, _)
            ),
            Action::Raw(_) => false,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum SeqChoice {
    Right,
    Back(u8),
    Ahead(u8),
    Abs(u64),
}

#[derive(Arbitrary, Debug)]
enum Inner {
    Data(Vec<u8>),
    /// Filled data of `len % 17_000` bytes (over one record's plaintext limit at the top).
    Big(u16),
    Alert(u8, u8),
    KeyUpdate(bool),
    /// A handshake record body as given.
    Handshake(Vec<u8>),
    /// Any inner content type (0 means none: the type is then the body's last non-zero byte).
    Other(u8, Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Damage {
    None,
    FlipBit(u16, u8),
    Truncate(u16),
    SetLen(u16),
    SetType(u8),
    SetVersion(u16),
    /// The record, then these bytes.
    Append(Vec<u8>),
}

/// A traffic secret copied out of rustls' key log (never printed).
#[derive(Clone)]
struct Secret(Vec<u8>);

/// Keeps the client's first application traffic secret of the latest handshake.
#[derive(Debug, Default)]
struct ClientSecret(Mutex<Option<Vec<u8>>>);

impl KeyLog for ClientSecret {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if label == "CLIENT_TRAFFIC_SECRET_0" {
            *self.0.lock().unwrap() = Some(secret.to_vec());
        }
    }
}

struct SuiteSetup {
    suite: &'static Tls13CipherSuite,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    keylog: Arc<ClientSecret>,
    /// A detached state from one handshake, as `to_bytes`.
    restored: Vec<u8>,
    /// That handshake's client traffic secret.
    restored_secret: Secret,
}

struct Setup {
    provider: CryptoProvider,
    chacha: SuiteSetup,
    aes: SuiteSetup,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = tls_pair::Dir::new("fuzz-detached-open");
        // The server's own config negotiates ChaCha20-Poly1305 (its first choice). Each pair
        // has its own client ticket store: live runs resume a session of their suite, which
        // costs a fraction of a full handshake.
        let (chacha_server, chacha_client, _) = tls_pair::configs(&dir.0, None);
        let aes_suite = aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384;
        let (aes_server, aes_client, _) = tls_pair::configs(&dir.0, Some(aes_suite));
        Setup {
            provider: aws_lc_rs::default_provider(),
            chacha: SuiteSetup::new(chacha_server, &chacha_client),
            aes: SuiteSetup::new(aes_server, &aes_client),
        }
    })
}

impl SuiteSetup {
    fn new(server: Arc<ServerConfig>, client: &Arc<ClientConfig>) -> SuiteSetup {
        let keylog = Arc::new(ClientSecret::default());
        let mut c = (**client).clone();
        c.key_log = keylog.clone() as Arc<dyn KeyLog>;
        let client = Arc::new(c);
        let mut s = SuiteSetup {
            suite: aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256
                .tls13()
                .expect("TLS 1.3"),
            server,
            client,
            keylog,
            restored: Vec::new(),
            restored_secret: Secret(Vec::new()),
        };
        let (tls, secret) = s.handshake();
        s.suite = suite_of(&tls);
        s.restored = tls
            .to_bytes()
            .expect("32-byte key, fresh sending key")
            .to_vec();
        s.restored_secret = secret;
        // The harness's own sealing must open, in both kinds of state.
        let restored = DetachedTls::from_bytes(&s.restored, &setup_provider()).unwrap();
        check_sealer(restored, s.suite, s.restored_secret.clone());
        let (live, secret) = s.handshake();
        check_sealer(live, s.suite, secret);
        s
    }

    /// A handshake in memory (full, or resumed from the previous one's ticket); the
    /// detached server and the client's traffic secret.
    fn handshake(&self) -> (DetachedTls, Secret) {
        let (_client, hs, _) = tls_pair::handshake(&self.client, &self.server);
        let mut to_client = Vec::new();
        let tls = hs.detach(&mut to_client).unwrap();
        let secret = self
            .keylog
            .0
            .lock()
            .unwrap()
            .take()
            .expect("client traffic secret");
        (tls, Secret(secret))
    }
}

fn setup_provider() -> CryptoProvider {
    aws_lc_rs::default_provider()
}

fn suite_of(tls: &DetachedTls) -> &'static Tls13CipherSuite {
    let id = tls.suite();
    aws_lc_rs::default_provider()
        .cipher_suites
        .iter()
        .find_map(|s| match s {
            SupportedCipherSuite::Tls13(t) if t.common.suite == id => Some(*t),
            _ => None,
        })
        .expect("a TLS 1.3 suite of the provider")
}

/// The harness's own sealing opens on `tls`.
fn check_sealer(mut tls: DetachedTls, suite: &'static Tls13CipherSuite, secret: Secret) {
    let (_, rx) = tls.sequence_numbers();
    let sealer = Sealer::new(suite, secret, rx);
    let mut rec = sealer.seal(b"ping\x17", sealer.seq);
    let mut got = Vec::new();
    let o = tls
        .decrypt_in_place(&mut rec, |d| got.extend_from_slice(d))
        .expect("the harness's record opens");
    assert_eq!((o.consumed, &got[..]), (rec.len(), &b"ping"[..]));
}

/// HKDF-Expand-Label (RFC 8446 §7.1) with an empty context, on the suite's own HKDF.
fn expand_label(suite: &Tls13CipherSuite, secret: &[u8], label: &[u8], out: &mut [u8]) {
    let expander = suite.hkdf_provider.expander_for_okm(&OkmBlock::new(secret));
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    expander
        .expand_slice(&[&len, &label_len, b"tls13 ", label, &[0]], out)
        .expect("short output");
}

/// The client's sending side, as the harness models it: the traffic secret, the key and IV
/// made from it, the next sequence number.
struct Sealer {
    suite: &'static Tls13CipherSuite,
    secret: Secret,
    key: [u8; 32],
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Sealer {
    fn new(suite: &'static Tls13CipherSuite, secret: Secret, seq: u64) -> Sealer {
        let mut key = [0; 32];
        let mut iv = [0; NONCE_LEN];
        expand_label(suite, &secret.0, b"key", &mut key);
        expand_label(suite, &secret.0, b"iv", &mut iv);
        Sealer {
            suite,
            secret,
            key,
            iv,
            seq,
        }
    }

    /// The next traffic secret (after a KeyUpdate), at sequence 0.
    fn update(&mut self) {
        let mut next = vec![0; self.secret.0.len()];
        expand_label(self.suite, &self.secret.0, b"traffic upd", &mut next);
        *self = Sealer::new(self.suite, Secret(next), 0);
    }

    /// One record whose inner plaintext is `inner` then one zero byte (so `inner` ends with
    /// the content type and any padding but the last zero). A fresh AEAD per record: aws-lc's
    /// TLS 1.3 AES-GCM refuses falling sequence numbers on one context, and this harness
    /// seals at wrong ones on purpose.
    fn seal(&self, inner: &[u8], seq: u64) -> Vec<u8> {
        let mut enc = self
            .suite
            .aead_alg
            .encrypter(AeadKey::from(self.key), Iv::from(self.iv));
        let msg = OutboundPlainMessage {
            typ: ContentType::Unknown(0),
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(inner),
        };
        enc.encrypt(msg, seq).expect("seal").encode()
    }
}

/// What a genuine record (right key and sequence, undamaged) must do.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Data,
    Nothing,
    PeerClosed,
    KeyUpdate {
        requested: bool,
    },
    Overflow,
    NoKeySchedule,
    TooManyKeyUpdates,
    /// Some error the peer is to blame for.
    PeerError,
    /// Not predicted: only the general rules apply.
    Unknown,
}

struct Run {
    tls: DetachedTls,
    sealer: Sealer,
    live: bool,
    /// Bytes received and not consumed.
    pending: Vec<u8>,
    /// Plaintext the server handed out.
    got: Vec<u8>,
    /// Plaintext it must have handed out.
    want: Vec<u8>,
    /// Something damaged or foreign was fed: no more data may come out.
    desynced: bool,
    dead: bool,
    peer_closed: bool,
    /// KeyUpdates since the last application data (None: not known).
    key_updates: Option<u8>,
    /// KeyUpdates the server answered.
    answers: usize,
}

impl Run {
    /// Feeds `bytes` in the pieces between `cuts`, as reads would arrive. Returns the first
    /// error, after which the connection is dead.
    fn feed(&mut self, bytes: &[u8], cuts: &[u16]) -> Option<DetachedError> {
        let mut at = 0;
        for cut in tether_fuzz::read_ends(cuts, bytes.len()) {
            self.pending.extend_from_slice(&bytes[at..cut]);
            at = cut;
            let before = self.got.len();
            let got = &mut self.got;
            match self
                .tls
                .decrypt_in_place(&mut self.pending, |d| got.extend_from_slice(d))
            {
                Ok(o) => {
                    assert!(o.consumed <= self.pending.len(), "consumed past the buffer");
                    self.pending.drain(..o.consumed);
                    if self.peer_closed {
                        assert_eq!(o.consumed, 0, "read on after close_notify");
                        assert_eq!(self.got.len(), before, "data after close_notify");
                    }
                    self.peer_closed |= o.peer_closed;
                    assert_eq!(o.peer_closed, self.tls.peer_closed());
                    if o.wants_write {
                        let mut out = Vec::new();
                        self.tls
                            .poll_transmit(&mut out)
                            .expect("answer the KeyUpdate");
                        assert_eq!(out.len(), HEADER_LEN + 5 + 1 + TAG_LEN, "one KeyUpdate");
                        self.answers += 1;
                    }
                }
                Err(e) => {
                    self.dead = true;
                    return Some(e);
                }
            }
        }
        None
    }

    /// The outcome of a genuine record of inner type `ty`, `content` and `plain_len` bytes of
    /// inner plaintext (content, type, padding).
    fn expect(&self, ty: u8, content: &[u8], plain_len: usize) -> Expect {
        if plain_len + TAG_LEN > MAX_CIPHERTEXT {
            return Expect::Overflow;
        }
        if plain_len > MAX_PLAINTEXT + 1 {
            return Expect::PeerError;
        }
        match (ty, content) {
            (23, _) => Expect::Data,
            (21, [_, 0]) => Expect::PeerClosed,
            (21, [_, 90]) => Expect::Nothing,
            (21, _) => Expect::PeerError,
            (22, &[24, 0, 0, 1, r @ (0 | 1)]) => match self.key_updates {
                None => Expect::Unknown,
                Some(n) if n >= MAX_KEY_UPDATES_IN_A_ROW => Expect::TooManyKeyUpdates,
                Some(_) if !self.live => Expect::NoKeySchedule,
                Some(_) => Expect::KeyUpdate { requested: r == 1 },
            },
            (22 | 0, _) => Expect::Unknown,
            _ => Expect::PeerError,
        }
    }

    fn act(&mut self, a: &Action) {
        match a {
            Action::Raw(bytes) => {
                if !bytes.is_empty() {
                    self.desynced = true;
                }
                let before = self.got.len();
                self.feed(bytes, &[]);
                if self.desynced {
                    assert_eq!(self.got.len(), before, "data out of foreign bytes");
                }
            }
            Action::Record {
                seq,
                inner,
                padding,
                damage,
                cuts,
            } => self.record(*seq, inner, *padding, damage, cuts),
        }
    }

    fn record(
        &mut self,
        seq: SeqChoice,
        inner: &Inner,
        padding: u8,
        damage: &Damage,
        cuts: &[u16],
    ) {
        let (content, ty) = match inner {
            Inner::Data(d) => (d.clone(), 23),
            Inner::Big(n) => (vec![0xa5; usize::from(*n) % 17_000], 23),
            Inner::Alert(level, desc) => (vec![*level, *desc], 21),
            Inner::KeyUpdate(req) => (vec![24, 0, 0, 1, u8::from(*req)], 22),
            Inner::Handshake(b) => (b.clone(), 22),
            Inner::Other(t, b) => (b.clone(), *t),
        };
        let mut plain = content.clone();
        plain.push(ty);
        plain.resize(plain.len() + usize::from(padding), 0);
        let base = self.sealer.seq;
        let seq = match seq {
            SeqChoice::Right => base,
            SeqChoice::Back(n) => base.wrapping_sub(u64::from(n) + 1),
            SeqChoice::Ahead(n) => base.wrapping_add(u64::from(n) + 1),
            SeqChoice::Abs(s) => s,
        };
        let genuine = self.sealer.seal(&plain, seq);
        let mut wire = genuine.clone();
        let mut extra: &[u8] = &[];
        match damage {
            Damage::None => {}
            Damage::FlipBit(at, bit) => {
                let i = usize::from(*at) % wire.len();
                wire[i] ^= 1 << (bit % 8);
            }
            Damage::Truncate(keep) => wire.truncate(usize::from(*keep) % wire.len()),
            Damage::SetLen(len) => wire[3..5].copy_from_slice(&len.to_be_bytes()),
            Damage::SetType(t) => wire[0] = *t,
            Damage::SetVersion(v) => wire[1..3].copy_from_slice(&v.to_be_bytes()),
            Damage::Append(more) => extra = more,
        }
        if wire.is_empty() {
            // Cut to nothing: never sent, as if this action had not happened.
            return self.extra(extra);
        }
        let genuine_here = seq == base && wire == genuine && !self.desynced;
        let expect = if genuine_here {
            self.expect(ty, &content, plain.len() + 1)
        } else {
            Expect::Unknown
        };
        if seq == base {
            // The sealer moved on whether or not the server gets this record intact.
            self.sealer.seq += 1;
        }
        if wire != genuine || seq != base {
            self.desynced = true;
        }
        if self.dead {
            return;
        }
        let before = self.got.len();
        let answers = self.answers;
        let closed_before = self.peer_closed;
        let rx_before = self.tls.sequence_numbers().1;
        let err = self.feed(&wire, cuts);
        let out = &self.got[before..];
        if closed_before {
            assert!(
                err.is_none() && out.is_empty(),
                "read on after close_notify"
            );
            return self.extra(extra);
        }
        if !genuine_here {
            assert!(out.is_empty(), "data from a damaged record: {damage:?}");
            return self.extra(extra);
        }
        match expect {
            Expect::Data => {
                assert!(err.is_none(), "a genuine data record failed: {err:?}");
                assert_eq!(out, &content[..], "plaintext of a genuine record");
                self.want.extend_from_slice(&content);
                self.key_updates = Some(0);
            }
            Expect::Nothing => assert!(err.is_none() && out.is_empty(), "{err:?}"),
            Expect::PeerClosed => {
                assert!(err.is_none(), "close_notify failed: {err:?}");
                assert!(self.peer_closed && out.is_empty());
            }
            Expect::KeyUpdate { requested } => {
                assert!(err.is_none(), "a genuine KeyUpdate failed: {err:?}");
                assert_eq!(self.tls.sequence_numbers().1, 0, "new receive key at 0");
                assert_eq!(
                    self.answers,
                    answers + usize::from(requested),
                    "KeyUpdate answer"
                );
                self.sealer.update();
                self.key_updates = self.key_updates.map(|n| n + 1);
            }
            Expect::Overflow => assert!(
                matches!(err, Some(DetachedError::RecordOverflow { .. })),
                "oversized record: {err:?}"
            ),
            Expect::NoKeySchedule => assert!(
                matches!(err, Some(DetachedError::NoKeySchedule)),
                "KeyUpdate without a key schedule: {err:?}"
            ),
            Expect::TooManyKeyUpdates => assert!(
                matches!(err, Some(DetachedError::TooManyKeyUpdates(_))),
                "KeyUpdate past the limit: {err:?}"
            ),
            Expect::PeerError => assert!(
                err.as_ref().is_some_and(DetachedError::is_peer_fault),
                "a record the peer may not send was accepted: {err:?}"
            ),
            Expect::Unknown => {
                if err.is_none() {
                    // Whatever it was, it opened: the key changed iff the sequence restarted.
                    let rx = self.tls.sequence_numbers().1;
                    if rx != rx_before.wrapping_add(1) {
                        assert_eq!(rx, 0, "receive sequence after a record");
                        self.sealer.update();
                        self.key_updates = None;
                    }
                    if ty == 0 {
                        // The content type was inside the body: it may have been data.
                        self.want.extend_from_slice(out);
                    } else {
                        assert!(out.is_empty(), "data from a non-data record");
                    }
                }
            }
        }
        if err.is_none() && !self.peer_closed {
            assert!(
                self.pending.is_empty(),
                "a genuine record left bytes behind"
            );
        }
        self.extra(extra);
    }

    fn extra(&mut self, extra: &[u8]) {
        if !extra.is_empty() && !self.dead {
            self.act(&Action::Raw(extra.to_vec()));
        }
    }

    fn finish(&self) {
        assert_eq!(self.got, self.want, "plaintext handed out");
        if self.dead || self.peer_closed {
            return;
        }
        if self.desynced {
            assert!(
                !self.pending.is_empty(),
                "damaged input was consumed without an error"
            );
        } else {
            assert!(self.pending.is_empty(), "genuine records left bytes behind");
        }
    }
}

fuzz_target!(|input: Input| {
    let s = setup();
    let suite = if input.aes { &s.aes } else { &s.chacha };
    // A live state costs a (resumed) handshake; it differs from a restored one only in
    // following KeyUpdates, so only inputs that may carry one get it.
    let live = input.live && input.actions.iter().any(Action::may_key_update);
    let (tls, secret) = if live {
        suite.handshake()
    } else {
        let tls = DetachedTls::from_bytes(&suite.restored, &s.provider).expect("restore");
        (tls, suite.restored_secret.clone())
    };
    let (_, rx) = tls.sequence_numbers();
    let mut run = Run {
        sealer: Sealer::new(suite.suite, secret, rx),
        tls,
        live,
        pending: Vec::new(),
        got: Vec::new(),
        want: Vec::new(),
        desynced: false,
        dead: false,
        peer_closed: false,
        key_updates: Some(0),
        answers: 0,
    };
    for a in input.actions.iter().take(MAX_ACTIONS) {
        if run.dead {
            break;
        }
        run.act(a);
    }
    run.finish();
});
