//! Device client certificates (`tether serve --device-ca`), in both TLS modes, against
//! `openssl s_client` and rustls' client: a device whose certificate names it is welcomed
//! without a valid proof; a certificate for another id is refused like a bad proof; a device
//! without a certificate takes the proof path as before; `--require-device-cert` refuses it;
//! a reloaded device CA is the one that counts.
//! The openssl tests need the `openssl` binary (Debian/Ubuntu package `openssl`); they are
//! skipped with a message if it is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Device, SClient, Server, have_openssl, hello};
use tether_core::reload::ReloadReport;
use tether_net::tls::{ClientTlsOptions, client_config_with_cert};
use tether_protocol::auth::{DeviceKey, Proof, derive_device_key, prove};
use tether_protocol::device::{DeviceConfig, DeviceEvent};
use tether_protocol::message::ErrorCode;
use tether_protocol::{CloseReason, DeviceId, DeviceMessage, PROTOCOL_VERSION};

const T: Duration = Duration::from_secs(10);

/// Runs the `tether` binary; panics with its stderr if it fails.
fn tether(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "tether {args:?}: {out:?}");
}

/// A device CA in `dir` with certificates for `ids`, made by `tether devices ca / cert`.
fn device_ca(dir: &Path, ids: &[u64]) -> PathBuf {
    let d = dir.to_str().unwrap();
    tether(&["devices", "ca", "--ca-dir", d]);
    for id in ids {
        tether(&["devices", "cert", &id.to_string(), "--ca-dir", d]);
    }
    dir.join("ca.pem")
}

fn cert_files(dir: &Path, id: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("device-{id}.pem")),
        dir.join(format!("device-{id}.key")),
    )
}

struct Setup {
    server: Server,
    ca_dir: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.ca_dir);
    }
}

fn start(mode: &str, extra: &[&str]) -> Setup {
    let ca_dir = std::env::temp_dir().join(format!(
        "tether-devca-{}-{}",
        std::process::id(),
        common::free_port()
    ));
    let ca = device_ca(&ca_dir, &[3, 4]);
    let mut args = vec![
        "--tls-state",
        mode,
        "--shards",
        "2",
        "--device-ca",
        ca.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let server = Server::start(10, &args);
    Setup { server, ca_dir }
}

impl Setup {
    /// A rustls client presenting device `id`'s certificate from `dir`.
    fn client_with_cert(&self, dir: &Path, id: u64) -> Arc<rustls::ClientConfig> {
        let (cert, key) = cert_files(dir, id);
        let ca = self.server.dir.join("tls/ca.pem");
        client_config_with_cert(&ca, &cert, &key, &ClientTlsOptions::default()).unwrap()
    }

    fn key(&self, id: u64) -> DeviceKey {
        self.server.registry.get(DeviceId(id)).unwrap().key.clone()
    }
}

fn wrong_key(id: u64) -> DeviceKey {
    derive_device_key(b"not the server secret", DeviceId(id))
}

fn refused(d: &mut Device) -> bool {
    d.pump_until(T, |ev| {
        ev.contains(&DeviceEvent::Closed(CloseReason::PeerError(
            ErrorCode::AuthFailed,
        )))
    })
}

fn rustls_devices(mode: &str) {
    let s = start(mode, &[]);
    let srv = &s.server;
    // Device 3 with its certificate and a wrong key: its proof is bad, its certificate is good.
    let mut d = srv.device_with(
        DeviceConfig::new(DeviceId(3), wrong_key(3)),
        s.client_with_cert(&s.ca_dir, 3),
    );
    assert!(d.established(), "{:?}", d.events);
    // Again, resuming its TLS session: the ticket carries the verified certificate.
    d.reconnect(srv);
    assert!(d.established(), "{:?}", d.events);

    // Device 3's certificate with a Hello naming 4, even with 4's good proof: refused.
    let mut claim = srv.device_with(
        DeviceConfig::new(DeviceId(4), s.key(4)),
        s.client_with_cert(&s.ca_dir, 3),
    );
    assert!(refused(&mut claim), "{:?}", claim.events);
    assert!(claim.wait_closed(T));

    // No certificate: the proof decides, as before.
    let mut plain = srv.device(5);
    assert!(plain.established(), "{:?}", plain.events);
    let mut bad = Device::connect(srv, DeviceConfig::new(DeviceId(6), wrong_key(6)));
    assert!(refused(&mut bad), "{:?}", bad.events);

    let st = srv.stats().total;
    assert_eq!(st.auth_failures, 2, "{st:?}");
    assert!(st.handshakes_resumed >= 1, "{st:?}");
    assert!(!d.closed && !plain.closed);
}

#[test]
fn rustls_device_certificates_detached() {
    rustls_devices("detached");
}

#[test]
fn rustls_device_certificates_buffered() {
    rustls_devices("buffered");
}

#[test]
fn required_device_certificates_refuse_devices_without_one() {
    for mode in ["detached", "buffered"] {
        let s = start(mode, &["--require-device-cert"]);
        let mut with = s.server.device_with(
            DeviceConfig::new(DeviceId(4), wrong_key(4)),
            s.client_with_cert(&s.ca_dir, 4),
        );
        assert!(with.established(), "{mode}: {:?}", with.events);
        let mut without = s.server.device(5);
        assert!(!without.established(), "{mode}: {:?}", without.events);
        assert!(without.wait_closed(T), "{mode}");
        assert!(s.server.stats().total.handshake_failures >= 1, "{mode}");
    }
}

/// The device CA is reloaded with the certificate: after it changes, certificates from the
/// old one no longer get in and those from the new one do.
#[test]
fn a_reloaded_device_ca_replaces_the_old_one() {
    let s = start("detached", &[]);
    let other = s.ca_dir.join("other");
    let other_ca = device_ca(&other, &[4]);
    let mut old = s.server.device_with(
        DeviceConfig::new(DeviceId(3), wrong_key(3)),
        s.client_with_cert(&s.ca_dir, 3),
    );
    assert!(old.established(), "{:?}", old.events);

    std::fs::copy(&other_ca, s.ca_dir.join("ca.pem")).unwrap();
    let (status, body) = s.server.reload();
    assert_eq!(status, 200, "{body}");
    let report: ReloadReport = serde_json::from_str(&body).unwrap();
    assert!(report.new_ticket_key, "{report:?}");
    assert!(report.device_ca.is_some());

    let mut stale = s.server.device_with(
        DeviceConfig::new(DeviceId(3), wrong_key(3)),
        s.client_with_cert(&s.ca_dir, 3),
    );
    assert!(!stale.established(), "{:?}", stale.events);
    let mut fresh = s.server.device_with(
        DeviceConfig::new(DeviceId(4), wrong_key(4)),
        s.client_with_cert(&other, 4),
    );
    assert!(fresh.established(), "{:?}", fresh.events);
    // The session from before the reload is untouched.
    assert!(old.session.ping(Instant::now()).is_some());
    assert!(
        old.pump_until(T, |ev| ev
            .iter()
            .any(|e| matches!(e, DeviceEvent::Pong { .. }))),
        "{:?}",
        old.events
    );
}

// ---- openssl s_client ----

fn is_welcome(m: &Option<DeviceMessage>) -> bool {
    matches!(m, Some(DeviceMessage::Welcome { .. }))
}

fn openssl_devices(mode: &str) {
    if !have_openssl() {
        return;
    }
    let s = start(mode, &[]);
    let three = cert_files(&s.ca_dir, 3);

    // Device 3's certificate, a Hello for 3 with a proof of zeros: welcomed.
    let mut c = SClient::connect(&s.server, Some(&three));
    c.send(&hello(3, Proof([0; 32])));
    c.challenge();
    let m = c.next();
    assert!(is_welcome(&m), "{m:?}");
    // The session works: a ping is answered.
    c.send(&DeviceMessage::Ping { id: 7 });
    assert_eq!(c.next(), Some(DeviceMessage::Pong { id: 7 }));

    // Device 3's certificate, a Hello for 4 with 4's valid proof: refused as a bad proof.
    let mut c = SClient::connect(&s.server, Some(&three));
    let nonce = c.challenge();
    c.send(&hello(
        4,
        prove(&s.key(4), &nonce, DeviceId(4), PROTOCOL_VERSION),
    ));
    match c.next() {
        Some(DeviceMessage::Error { code, message }) => {
            assert_eq!(code, ErrorCode::AuthFailed);
            assert_eq!(&message[..], b"authentication failed");
        }
        other => panic!("expected the auth Error, got {other:?}"),
    }
    assert!(c.closed_by_server());

    // No certificate: a proof of zeros is refused, a valid proof is welcomed.
    let mut c = SClient::connect(&s.server, None);
    c.challenge();
    c.send(&hello(5, Proof([0; 32])));
    assert!(
        matches!(
            c.next(),
            Some(DeviceMessage::Error {
                code: ErrorCode::AuthFailed,
                ..
            })
        ),
        "a device without a certificate still needs its proof"
    );
    let mut c = SClient::connect(&s.server, None);
    let nonce = c.challenge();
    c.send(&hello(
        5,
        prove(&s.key(5), &nonce, DeviceId(5), PROTOCOL_VERSION),
    ));
    let m = c.next();
    assert!(is_welcome(&m), "{m:?}");

    let st = s.server.stats().total;
    assert_eq!(st.auth_failures, 2, "{st:?}");
}

#[test]
fn openssl_s_client_with_device_certificates_detached() {
    openssl_devices("detached");
}

#[test]
fn openssl_s_client_with_device_certificates_buffered() {
    openssl_devices("buffered");
}
