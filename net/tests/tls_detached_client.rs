//! The detached *client* (`detached::ClientHandshake` → `DetachedClientTls`) against the
//! detached server and against rustls' buffered `ServerConnection`, in memory: every suite,
//! thousands of records both ways, a KeyUpdate from the server, session tickets reaching the
//! client's store (the next handshake resumes), and close_notify.

#[path = "common/tls_pair.rs"]
mod tls_pair;

use std::io::{Read, Write};

use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::{CipherSuite, HandshakeKind, ServerConnection, SupportedCipherSuite};
use tether_net::detached::{
    ClientHandshake, DetachedClientTls, DetachedError, DetachedTls, HandshakeError,
};
use tls_pair::{CHALLENGE, Dir, client_open, configs, connect_detached, detaching_client, name};

fn exchange(c: &mut DetachedClientTls, s: &mut DetachedTls, n: usize) {
    for i in 0..n {
        let len = [1, 64, 1024, 17_000, 200][i % 5];
        let msg: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
        let mut wire = Vec::new();
        c.encrypt(&msg, &mut wire).unwrap();
        let mut got = Vec::new();
        let o = s
            .decrypt_in_place(&mut wire, |d| got.extend_from_slice(d))
            .unwrap();
        assert_eq!(o.consumed, wire.len());
        assert_eq!(got, msg, "c->s {i}");
        let mut wire = Vec::new();
        s.encrypt(&msg, &mut wire).unwrap();
        // The client reads in pieces: partial records stay for the next call.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for piece in wire.chunks(1 + i % 3000) {
            buf.extend_from_slice(piece);
            got.extend(client_open(c, &mut buf));
        }
        assert!(buf.is_empty());
        assert_eq!(got, msg, "s->c {i}");
    }
}

fn detached_both_sides(tag: &str, suite: SupportedCipherSuite, expect: CipherSuite) {
    let dir = Dir::new(tag);
    let (server, _, _) = configs(&dir.0, Some(suite));
    let client = detaching_client(&dir);
    let (mut c, mut s, kind, _) = connect_detached(&client, &server);
    assert_eq!(kind, HandshakeKind::Full);
    assert_eq!(c.suite(), expect);
    exchange(&mut c, &mut s, 1000);
    // A KeyUpdate from the server, requested-or-not, reaches the client's key schedule.
    let mut wire = Vec::new();
    s.rekey_tx(&mut wire).unwrap();
    s.encrypt(b"after", &mut wire).unwrap();
    assert_eq!(client_open(&mut c, &mut wire), b"after");
    exchange(&mut c, &mut s, 50);
    // close_notify both ways.
    let mut wire = Vec::new();
    c.close_notify(&mut wire).unwrap();
    let o = s.decrypt_in_place(&mut wire, |_| {}).unwrap();
    assert!(o.peer_closed);
    // The ticket went to the client's store: the next handshake resumes.
    let (_, _, kind, skind) = connect_detached(&client, &server);
    assert_eq!(
        (kind, skind),
        (HandshakeKind::Resumed, HandshakeKind::Resumed)
    );
}

#[test]
fn detached_client_vs_detached_server_chacha20() {
    detached_both_sides(
        "dc-chacha",
        TLS13_CHACHA20_POLY1305_SHA256,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    );
}

#[test]
fn detached_client_vs_detached_server_aes256gcm() {
    detached_both_sides(
        "dc-aes256",
        TLS13_AES_256_GCM_SHA384,
        CipherSuite::TLS13_AES_256_GCM_SHA384,
    );
}

#[test]
fn detached_client_vs_detached_server_aes128gcm() {
    detached_both_sides(
        "dc-aes128",
        TLS13_AES_128_GCM_SHA256,
        CipherSuite::TLS13_AES_128_GCM_SHA256,
    );
}

#[test]
fn detached_client_vs_buffered_server_with_forgotten_key_schedule() {
    let dir = Dir::new("dc-buffered");
    let (server, _, _) = configs(&dir.0, None);
    let client = detaching_client(&dir);
    for round in 0..2 {
        let mut ch = ClientHandshake::new(client.clone(), name()).unwrap();
        let mut s = ServerConnection::new(server.clone()).unwrap();
        s.writer().write_all(CHALLENGE).unwrap();
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        let mut half_rtt = Vec::new();
        for _ in 0..20 {
            let p = ch
                .feed(&mut to_client, &mut to_server, |d| {
                    half_rtt.extend_from_slice(d)
                })
                .unwrap();
            to_client.drain(..p.consumed);
            let mut rd = &to_server[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
            }
            to_server.clear();
            while s.wants_write() {
                s.write_tls(&mut to_client).unwrap();
            }
            if p.complete {
                break;
            }
        }
        assert!(ch.is_complete());
        let kind = ch.handshake_kind().unwrap();
        assert_eq!(
            kind,
            if round == 0 {
                HandshakeKind::Full
            } else {
                HandshakeKind::Resumed
            }
        );
        assert_eq!(half_rtt, CHALLENGE);
        let mut c = ch.detach(&mut to_server).unwrap();
        assert!(to_server.is_empty());
        // The server's ticket, sent on reading the client's Finished, waits in `to_client`.
        assert!(client_open(&mut c, &mut to_client).is_empty());
        assert_eq!(c.tickets_received(), 1);
        c.forget_key_schedule();
        for i in 0..2000usize {
            let msg = vec![i as u8; 1 + i % 300];
            let mut wire = Vec::new();
            c.encrypt(&msg, &mut wire).unwrap();
            let mut rd = &wire[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
            }
            let mut got = vec![0; msg.len()];
            s.reader().read_exact(&mut got).unwrap();
            assert_eq!(got, msg);
            s.writer().write_all(&msg).unwrap();
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            assert_eq!(client_open(&mut c, &mut wire), msg);
        }
        // A server KeyUpdate needs the forgotten key schedule: a clear error, not garbage.
        s.refresh_traffic_keys().unwrap();
        s.writer().write_all(b"x").unwrap();
        let mut wire = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        let err = c.decrypt_in_place(&mut wire, |_| {}).unwrap_err();
        assert!(matches!(err, DetachedError::NoKeySchedule), "{err}");
    }
}

#[test]
fn client_config_without_secret_extraction_is_refused() {
    let dir = Dir::new("dc-noextract");
    let (_, client, _) = configs(&dir.0, None);
    let err = ClientHandshake::new(client, name()).unwrap_err();
    assert!(matches!(err, HandshakeError::SecretExtractionOff));
}
