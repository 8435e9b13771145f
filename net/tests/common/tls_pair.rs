//! In-memory TLS pairs for the detached-TLS tests: an unmodified rustls client against the
//! `detached::Handshake` server, with no sockets.
#![allow(dead_code)] // reason: each test file uses a different part

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::ServerName;
use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, ServerConfig, ServerConnection,
    SupportedCipherSuite,
};
use tether_net::detached::{ClientHandshake, DetachedClientTls, DetachedTls, Handshake};
use tether_net::tls::{self, ClientTlsOptions, TlsOptions};

pub const CHALLENGE: &[u8] = b"challenge: 32 bytes of nonce....";

/// A temporary directory removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("tether-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A throwaway CA and a server certificate it signed for `localhost`, written as PEM files
/// under `dir/tls/` (the same shape as the server's dev PKI, made here so that these tests
/// and the fuzz target need nothing of the server). Made once per directory: a second call
/// finds the first one's files, so every config made from one directory trusts one CA.
pub struct TestPki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestPki {
    pub fn make(dir: &Path) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let tls_dir = dir.join("tls");
        let pki = TestPki {
            ca_cert: tls_dir.join("ca.pem"),
            server_cert: tls_dir.join("server.pem"),
            server_key: tls_dir.join("server.key"),
        };
        if pki.server_key.exists() {
            return pki;
        }
        std::fs::create_dir_all(&tls_dir).unwrap();
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(DnType::CommonName, "Tether test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        std::fs::write(&pki.ca_cert, ca_cert.pem()).unwrap();
        std::fs::write(&pki.server_cert, cert.pem()).unwrap();
        // The key last: its presence says the set is complete.
        std::fs::write(&pki.server_key, key.serialize_pem()).unwrap();
        pki
    }
}

/// The server config of `tls::server_config` (secret extraction on), optionally limited to
/// one cipher suite; and the standard client config.
pub fn configs(
    dir: &Path,
    suite: Option<SupportedCipherSuite>,
) -> (Arc<ServerConfig>, Arc<ClientConfig>, TestPki) {
    let pki = TestPki::make(dir);
    let opts = TlsOptions {
        secret_extraction: true,
        ..TlsOptions::default()
    };
    let mut server = tls::server_config(&pki.server_cert, &pki.server_key, &opts).unwrap();
    if let Some(suite) = suite {
        let mut provider = aws_lc_rs::default_provider();
        provider.cipher_suites = vec![suite];
        let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                tls::load_certs(&pki.server_cert, "certificate").unwrap(),
                tls::load_key(&pki.server_key).unwrap(),
            )
            .unwrap();
        cfg.ticketer = server.ticketer.clone();
        cfg.send_tls13_tickets = server.send_tls13_tickets;
        cfg.send_half_rtt_data = true;
        cfg.enable_secret_extraction = true;
        cfg.alpn_protocols = server.alpn_protocols.clone();
        server = Arc::new(cfg);
    }
    let client = tls::client_config(&pki.ca_cert, &ClientTlsOptions::default()).unwrap();
    (server, client, pki)
}

pub fn provider() -> CryptoProvider {
    aws_lc_rs::default_provider()
}

/// A client, the detached server, and the bytes in flight towards the server.
pub struct Pair {
    pub client: ClientConnection,
    pub server: DetachedTls,
    /// Received by the server and not yet consumed (a partial record).
    pub to_server: Vec<u8>,
    pub kind: HandshakeKind,
}

/// Runs a handshake with `CHALLENGE` as half-RTT data up to completion, not detached.
pub fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
) -> (ClientConnection, Handshake, Vec<u8>) {
    let name = ServerName::try_from("localhost").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let mut hs = Handshake::new(server.clone()).unwrap();
    hs.queue_half_rtt(CHALLENGE);
    let mut to_server = Vec::new();
    let mut to_client = Vec::new();
    let mut received = Vec::new();
    for _ in 0..20 {
        while c.wants_write() {
            c.write_tls(&mut to_server).unwrap();
        }
        let p = hs
            .feed(&mut to_server, &mut to_client, &mut received)
            .unwrap();
        to_server.drain(..p.consumed);
        deliver(&mut c, &mut to_client);
        if p.complete {
            break;
        }
    }
    assert!(hs.is_complete(), "handshake did not complete in 20 rounds");
    assert!(received.is_empty());
    assert_eq!(hs.alpn_protocol(), Some(tls::ALPN));
    (c, hs, to_server)
}

/// [`handshake`], then detach, and check the client reads the challenge.
pub fn connect(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> Pair {
    let (mut c, hs, to_server) = handshake(client, server);
    let kind = hs.handshake_kind().unwrap();
    let mut to_client = Vec::new();
    let server = hs.detach(&mut to_client).unwrap();
    deliver(&mut c, &mut to_client);
    assert!(!c.is_handshaking());
    let mut got = vec![0; CHALLENGE.len()];
    c.reader().read_exact(&mut got).unwrap();
    assert_eq!(got, CHALLENGE);
    Pair {
        client: c,
        server,
        to_server,
        kind,
    }
}

/// The same with rustls' buffered `ServerConnection`, for comparison.
pub fn connect_buffered(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
) -> (ClientConnection, ServerConnection) {
    let name = ServerName::try_from("localhost").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    s.writer().write_all(CHALLENGE).unwrap();
    for _ in 0..20 {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        deliver(&mut c, &mut wire);
        if !s.is_handshaking() && !c.is_handshaking() && !s.wants_write() {
            break;
        }
    }
    assert!(!s.is_handshaking());
    let mut got = vec![0; CHALLENGE.len()];
    c.reader().read_exact(&mut got).unwrap();
    assert_eq!(got, CHALLENGE);
    (c, s)
}

/// Hands `bytes` to the client and processes them.
pub fn deliver(c: &mut ClientConnection, bytes: &mut Vec<u8>) {
    let mut rd = &bytes[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd).unwrap();
        c.process_new_packets().unwrap();
    }
    bytes.clear();
}

impl Pair {
    /// Client → server: writes `msg`, feeds the server in chunks of `chunk` bytes, and
    /// returns what the server decrypted; sends the server's KeyUpdate answer if any.
    pub fn client_to_server(&mut self, msg: &[u8], chunk: usize) -> Vec<u8> {
        self.client.writer().write_all(msg).unwrap();
        let mut wire = Vec::new();
        while self.client.wants_write() {
            self.client.write_tls(&mut wire).unwrap();
        }
        let mut got = Vec::new();
        let mut out = Vec::new();
        for piece in wire.chunks(chunk.max(1)) {
            self.to_server.extend_from_slice(piece);
            let opened = self
                .server
                .decrypt_in_place(&mut self.to_server, |d| got.extend_from_slice(d))
                .unwrap();
            self.to_server.drain(..opened.consumed);
            if opened.wants_write {
                self.server.poll_transmit(&mut out).unwrap();
            }
        }
        deliver(&mut self.client, &mut out);
        got
    }

    /// Server → client: seals `msg` and returns what the client read.
    pub fn server_to_client(&mut self, msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.server.encrypt(msg, &mut out).unwrap();
        deliver(&mut self.client, &mut out);
        let mut got = vec![0; msg.len()];
        self.client.reader().read_exact(&mut got).unwrap();
        got
    }

    /// `n` messages each way, sizes varying from 1 byte to over one record.
    pub fn exchange(&mut self, n: usize, tag: u8) {
        for i in 0..n {
            let len = match i % 7 {
                0 => 1,
                1 => 64,
                2 => 1024,
                3 => 3000,
                4 => 17_000, // two records
                5 => 16_384,
                _ => 200,
            };
            let msg: Vec<u8> = (0..len).map(|j| (i + j) as u8 ^ tag).collect();
            assert_eq!(
                self.client_to_server(&msg, 1 + i % 4000),
                msg,
                "message {i} c->s"
            );
            assert_eq!(self.server_to_client(&msg), msg, "message {i} s->c");
        }
    }
}

// The detached client (`ClientHandshake` → `DetachedClientTls`).

/// The standard client config with secret extraction on (the detached client needs it).
pub fn detaching_client(dir: &Dir) -> Arc<ClientConfig> {
    let pki = TestPki::make(&dir.0);
    tls::client_config(
        &pki.ca_cert,
        &ClientTlsOptions {
            secret_extraction: true,
            ..ClientTlsOptions::default()
        },
    )
    .unwrap()
}

/// The server name of the dev certificate.
pub fn name() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// Opens every whole record of `wire` on the client, returns the plaintext.
pub fn client_open(c: &mut DetachedClientTls, wire: &mut Vec<u8>) -> Vec<u8> {
    let mut got = Vec::new();
    let o = c
        .decrypt_in_place(wire, |d| got.extend_from_slice(d))
        .unwrap();
    wire.drain(..o.consumed);
    got
}

/// A detached client and a detached server, after the server's ticket reached the client.
pub fn connect_detached(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
) -> (DetachedClientTls, DetachedTls, HandshakeKind, HandshakeKind) {
    let mut ch = ClientHandshake::new(client.clone(), name()).unwrap();
    let mut hs = Handshake::new(server.clone()).unwrap();
    hs.queue_half_rtt(CHALLENGE);
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    let mut half_rtt = Vec::new();
    let mut received = Vec::new();
    for _ in 0..20 {
        if !ch.is_complete() {
            let p = ch
                .feed(&mut to_client, &mut to_server, |d| {
                    half_rtt.extend_from_slice(d)
                })
                .unwrap();
            to_client.drain(..p.consumed);
        }
        let p = hs
            .feed(&mut to_server, &mut to_client, &mut received)
            .unwrap();
        to_server.drain(..p.consumed);
        if p.complete && ch.is_complete() {
            break;
        }
    }
    assert!(ch.is_complete() && hs.is_complete());
    assert_eq!(
        half_rtt, CHALLENGE,
        "half-RTT data read during the handshake"
    );
    let (ckind, skind) = (ch.handshake_kind().unwrap(), hs.handshake_kind().unwrap());
    let mut c = ch.detach(&mut to_server).unwrap();
    let mut s = hs.detach(&mut to_client).unwrap();
    assert!(client_open(&mut c, &mut to_client).is_empty());
    assert!(to_client.is_empty());
    assert_eq!(c.tickets_received(), 1, "the server's one ticket");
    let mut got = Vec::new();
    let o = s
        .decrypt_in_place(&mut to_server, |d| got.extend_from_slice(d))
        .unwrap();
    assert_eq!(o.consumed, to_server.len());
    (c, s, ckind, skind)
}
