//! Detached TLS (`tether_net::detached`) against an unmodified rustls client, in memory:
//! long exchanges in both directions, key updates both ways, tickets and resumption,
//! close_notify, moving the state through bytes, and the AES-GCM first-sequence pitfall.

#[path = "common/tls_pair.rs"]
mod tls_pair;

use std::io::Read;

use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::crypto::cipher::{AeadKey, Iv, OutboundChunks, OutboundPlainMessage};
use rustls::{CipherSuite, ContentType, HandshakeKind, ProtocolVersion, SupportedCipherSuite};
use tether_net::detached::{DetachedError, DetachedTls, MoveError};
use tls_pair::{Dir, Pair, configs, connect, deliver, provider};

const RECORDS: usize = 1500;

fn long_exchange(tag: &str, suite: Option<SupportedCipherSuite>, expect: CipherSuite) {
    let dir = Dir::new(tag);
    let (server, client, _) = configs(&dir.0, suite);
    let mut p = connect(&client, &server);
    assert_eq!(p.kind, HandshakeKind::Full);
    assert_eq!(p.server.suite(), expect);
    assert!(p.server.has_key_schedule());
    // Before detaching the server sent the half-RTT Challenge and one record with its
    // ticket: ChaCha20 keeps going from there; AES-GCM rekeyed at detach and starts at 0.
    assert_eq!(p.client.tls13_tickets_received(), 1);
    let at_detach = p.server.sequence_numbers();
    if expect == CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 {
        assert_eq!(at_detach, (2, 0));
    } else {
        assert_eq!(at_detach, (0, 0));
    }
    p.exchange(RECORDS / 2, 1);

    // Client-initiated KeyUpdate (update_requested): the server takes the new receive key
    // and answers with its own.
    let (tx_before, _) = p.server.sequence_numbers();
    p.client.refresh_traffic_keys().unwrap();
    assert_eq!(
        p.client_to_server(b"after key update", 7),
        b"after key update"
    );
    let (tx_after, rx_after) = p.server.sequence_numbers();
    assert!(tx_after < tx_before, "server rekeyed its sending side too");
    assert_eq!(rx_after, 1);
    p.exchange(RECORDS / 2, 2);

    // Server-initiated rekey, and automatic rekeys at a low limit.
    let mut out = Vec::new();
    p.server.rekey_tx(&mut out).unwrap();
    deliver(&mut p.client, &mut out);
    p.server.set_rekey_after(50);
    p.exchange(300, 3);
    assert!(p.server.sequence_numbers().0 <= 50);

    assert!(
        p.client.tls13_tickets_received() > 0,
        "tickets sent before detaching"
    );
    close(&mut p);

    // The second connection resumes from a ticket.
    let mut again = connect(&client, &server);
    assert_eq!(again.kind, HandshakeKind::Resumed);
    assert_eq!(again.client.handshake_kind(), Some(HandshakeKind::Resumed));
    again.exchange(50, 4);
    close(&mut again);
}

fn close(p: &mut Pair) {
    p.client.send_close_notify();
    let mut wire = Vec::new();
    while p.client.wants_write() {
        p.client.write_tls(&mut wire).unwrap();
    }
    p.to_server.extend_from_slice(&wire);
    let opened = p
        .server
        .decrypt_in_place(&mut p.to_server, |_| panic!("no data after close"))
        .unwrap();
    assert!(opened.peer_closed && p.server.peer_closed());
    let mut out = Vec::new();
    p.server.close_notify(&mut out).unwrap();
    assert!(matches!(
        p.server.encrypt(b"x", &mut out),
        Err(DetachedError::Closed)
    ));
    deliver(&mut p.client, &mut out);
    let mut rest = Vec::new();
    assert_eq!(
        p.client.reader().read_to_end(&mut rest).unwrap(),
        0,
        "clean EOF"
    );
}

#[test]
fn rustls_client_long_exchange_default_suite_is_chacha20() {
    long_exchange(
        "det-default",
        None,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    );
}

#[test]
fn rustls_client_long_exchange_aes256gcm() {
    let s = Some(TLS13_AES_256_GCM_SHA384);
    long_exchange("det-aes256", s, CipherSuite::TLS13_AES_256_GCM_SHA384);
}

#[test]
fn rustls_client_long_exchange_chacha20() {
    let s = Some(TLS13_CHACHA20_POLY1305_SHA256);
    long_exchange("det-chacha", s, CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
}

#[test]
fn rustls_client_long_exchange_aes128gcm() {
    let s = Some(TLS13_AES_128_GCM_SHA256);
    long_exchange("det-aes128", s, CipherSuite::TLS13_AES_128_GCM_SHA256);
}

/// The aws-lc-rs AES-GCM encrypter learns its nonce mask from its first record: a fresh
/// one whose first record is at sequence 3 (after 2 tickets and the half-RTT Challenge)
/// seals records 3 and 4, then refuses 5. This is why `Handshake::detach` rekeys.
#[test]
fn aes_gcm_fresh_encrypter_starting_at_seq_3_fails_on_third_record() {
    let SupportedCipherSuite::Tls13(aes) = TLS13_AES_256_GCM_SHA384 else {
        unreachable!()
    };
    let SupportedCipherSuite::Tls13(chacha) = TLS13_CHACHA20_POLY1305_SHA256 else {
        unreachable!()
    };
    let seal = |enc: &mut Box<dyn rustls::crypto::cipher::MessageEncrypter>, seq| {
        let msg = OutboundPlainMessage {
            typ: ContentType::ApplicationData,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(b"ping"),
        };
        enc.encrypt(msg, seq).is_ok()
    };
    let mut enc = aes
        .aead_alg
        .encrypter(AeadKey::from([7; 32]), Iv::new([9; 12]));
    assert_eq!([3, 4, 5].map(|s| seal(&mut enc, s)), [true, true, false]);
    let mut enc = aes
        .aead_alg
        .encrypter(AeadKey::from([7; 32]), Iv::new([9; 12]));
    assert!((0..100).all(|s| seal(&mut enc, s)), "from 0 it works");
    let mut enc = chacha
        .aead_alg
        .encrypter(AeadKey::from([7; 32]), Iv::new([9; 12]));
    assert!(
        (3..103).all(|s| seal(&mut enc, s)),
        "ChaCha20 has no such state"
    );
}

fn moved(p: &mut Pair) {
    let bytes = p.server.to_bytes().unwrap();
    let restored = DetachedTls::from_bytes(&bytes, &provider()).unwrap();
    assert_eq!(restored.sequence_numbers(), p.server.sequence_numbers());
    assert!(!restored.has_key_schedule());
    p.server = restored;
}

#[test]
fn state_moved_through_bytes_mid_stream_keeps_working() {
    for (tag, suite) in [
        ("det-move-aes", TLS13_AES_256_GCM_SHA384),
        ("det-move-chacha", TLS13_CHACHA20_POLY1305_SHA256),
    ] {
        let dir = Dir::new(tag);
        let (server, client, _) = configs(&dir.0, Some(suite));
        let mut p = connect(&client, &server);
        p.exchange(200, 5);
        // A partial record in flight moves with the socket's unread bytes, not the state.
        p.client.writer_write(b"in flight across the move");
        if suite == TLS13_AES_256_GCM_SHA384 {
            assert_eq!(
                p.server.to_bytes().unwrap_err(),
                MoveError::TxNotFresh(CipherSuite::TLS13_AES_256_GCM_SHA384)
            );
            let mut out = Vec::new();
            p.server.rekey_tx(&mut out).unwrap();
            deliver(&mut p.client, &mut out);
        }
        moved(&mut p);
        assert_eq!(p.client_to_server(b"", 3), b"in flight across the move");
        p.exchange(1000, 6);
        // And again, from the restored state (ChaCha20 only: AES-GCM would need a rekey,
        // and a restored state has no key schedule).
        if suite == TLS13_CHACHA20_POLY1305_SHA256 {
            moved(&mut p);
            p.exchange(100, 7);
        }
        // A restored state cannot take the peer's KeyUpdate: it says so.
        p.client.refresh_traffic_keys().unwrap();
        p.client.writer_write(b"x");
        let mut wire = Vec::new();
        while p.client.wants_write() {
            p.client.write_tls(&mut wire).unwrap();
        }
        let err = p.server.decrypt_in_place(&mut wire, |_| {}).unwrap_err();
        assert!(matches!(err, DetachedError::NoKeySchedule), "{err}");
    }
}

#[test]
fn aes128_detaches_but_cannot_move_between_processes() {
    let dir = Dir::new("det-aes128-move");
    let (server, client, _) = configs(&dir.0, Some(TLS13_AES_128_GCM_SHA256));
    let p = connect(&client, &server);
    assert_eq!(
        p.server.to_bytes().unwrap_err(),
        MoveError::KeyLength(CipherSuite::TLS13_AES_128_GCM_SHA256, 16)
    );
}

#[test]
fn restore_rejects_bad_bytes() {
    let dir = Dir::new("det-bad-bytes");
    let (server, client, _) = configs(&dir.0, Some(TLS13_CHACHA20_POLY1305_SHA256));
    let p = connect(&client, &server);
    let bytes = p.server.to_bytes().unwrap();
    let pr = provider();
    for cut in 0..bytes.len() {
        assert!(
            DetachedTls::from_bytes(&bytes[..cut], &pr).is_err(),
            "cut at {cut}"
        );
    }
    let mut bad = bytes.to_vec();
    bad[4] = 9;
    assert_eq!(
        DetachedTls::from_bytes(&bad, &pr).unwrap_err(),
        MoveError::BadFormat(9)
    );
    let mut no_chacha = provider();
    no_chacha
        .cipher_suites
        .retain(|s| *s != TLS13_CHACHA20_POLY1305_SHA256);
    assert!(matches!(
        DetachedTls::from_bytes(&bytes, &no_chacha),
        Err(MoveError::UnknownSuite(_))
    ));
}

#[test]
fn tampered_and_foreign_records_are_refused() {
    let dir = Dir::new("det-tamper");
    let (server, client, _) = configs(&dir.0, None);
    let mut p = connect(&client, &server);
    p.client.writer_write(b"hello");
    let mut wire = Vec::new();
    while p.client.wants_write() {
        p.client.write_tls(&mut wire).unwrap();
    }
    let mut flipped = wire.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let err = p.server.decrypt_in_place(&mut flipped, |_| {}).unwrap_err();
    assert!(
        matches!(err, DetachedError::Decrypt { seq: 0 }) && err.is_peer_fault(),
        "{err}"
    );

    let mut plain_alert = vec![21, 3, 3, 0, 2, 2, 40];
    let err = p
        .server
        .decrypt_in_place(&mut plain_alert, |_| {})
        .unwrap_err();
    assert!(
        matches!(err, DetachedError::UnexpectedRecordType(21)),
        "{err}"
    );

    let mut huge = vec![23, 3, 3, 0x48, 0x01];
    let err = p.server.decrypt_in_place(&mut huge, |_| {}).unwrap_err();
    assert!(matches!(err, DetachedError::RecordOverflow { .. }), "{err}");
}

/// Lets tests write to the client without importing `Write` everywhere.
trait WriterWrite {
    fn writer_write(&mut self, b: &[u8]);
}

impl WriterWrite for rustls::ClientConnection {
    fn writer_write(&mut self, b: &[u8]) {
        use std::io::Write;
        self.writer().write_all(b).unwrap();
    }
}

#[test]
fn handshake_error_hands_out_rustls_alert() {
    let dir = Dir::new("det-hs-err");
    let (server, _, _) = configs(&dir.0, None);
    let mut hs = tether_net::detached::Handshake::new(server).unwrap();
    // A ClientHello of zero bytes.
    let mut garbage = vec![22, 3, 1, 0, 4, 1, 0, 0, 0];
    let mut out = Vec::new();
    let err = hs
        .feed(&mut garbage, &mut out, &mut Vec::new())
        .unwrap_err();
    assert!(
        matches!(err, tether_net::detached::HandshakeError::Tls(_)),
        "{err}"
    );
    assert_eq!(out.first(), Some(&21), "a plaintext alert record: {out:?}");
}

#[test]
fn config_without_secret_extraction_is_refused() {
    let dir = Dir::new("det-no-extract");
    let pki = tls_pair::TestPki::make(&dir.0);
    let opts = tether_net::tls::TlsOptions::default();
    let server = tether_net::tls::server_config(&pki.server_cert, &pki.server_key, &opts).unwrap();
    let err = tether_net::detached::Handshake::new(server).unwrap_err();
    assert!(err.to_string().contains("secret extraction"), "{err}");
}
