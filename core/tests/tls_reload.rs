//! Certificate reload without a restart, over real TLS on loopback, in both TLS modes: a
//! device connected before a reload to a certificate from a new CA keeps its session; new
//! connections verify against the new CA and fail against the old; a broken file (bad PEM, a
//! key that does not match, a missing file) is refused with one log line naming it, and the
//! old certificate still serves; SIGHUP does what `POST /reload` does.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Agent, Device, Server};
use tether_core::pki::DevPki;
use tether_core::reload::ReloadReport;
use tether_net::tls::{ClientTlsOptions, client_config};
use tether_protocol::device::DeviceEvent;
use tether_protocol::message::SendStatus;
use tether_protocol::{AgentMessage, DeviceId};

const T: Duration = Duration::from_secs(5);

/// A CA of its own and a server certificate it signed for localhost, in `dir`.
fn new_pki(dir: &Path) -> DevPki {
    DevPki::ensure(dir).unwrap()
}

/// A client that trusts only `pki`'s CA and keeps no tickets (every connection verifies the
/// server's certificate).
fn trusting(pki: &DevPki) -> Arc<rustls::ClientConfig> {
    let opts = ClientTlsOptions {
        session_tickets: 0,
        ..ClientTlsOptions::default()
    };
    client_config(&pki.ca_cert, &opts).unwrap()
}

/// Puts `pki`'s server certificate and key where the server reads them.
fn install(pki: &DevPki, cert: &Path, key: &Path) {
    std::fs::copy(&pki.server_cert, cert).unwrap();
    std::fs::copy(&pki.server_key, key).unwrap();
}

struct Setup {
    server: Server,
    cert: PathBuf,
    key: PathBuf,
    old: DevPki,
    new: DevPki,
}

/// A server on `--cert/--key` files from CA "old"; CA "new" made and not yet installed.
fn start(mode: &str) -> Setup {
    let base = std::env::temp_dir().join(format!(
        "tether-reload-{}-{}",
        std::process::id(),
        common::free_port()
    ));
    let old = new_pki(&base.join("old"));
    let new = new_pki(&base.join("new"));
    let cert = base.join("server.pem");
    let key = base.join("server.key");
    install(&old, &cert, &key);
    let server = Server::start(
        10,
        &[
            "--tls-state",
            mode,
            "--shards",
            "2",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    );
    Setup {
        server,
        cert,
        key,
        old,
        new,
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(base) = self.cert.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

fn device_trusting(s: &Server, id: u64, tls: Arc<rustls::ClientConfig>) -> Device {
    let key = s.registry.get(DeviceId(id)).unwrap().key.clone();
    s.device_with(
        tether_protocol::device::DeviceConfig::new(DeviceId(id), key),
        tls,
    )
}

/// The agent's send reaches the device and the device's ack comes back: the session works.
fn session_works(agent: &mut Agent, d: &mut Device, id: u64, tag: u64) {
    agent.send(&AgentMessage::Send {
        device: DeviceId(id),
        tag,
        topic: Bytes::from_static(b"t"),
        payload: Bytes::from_static(b"p"),
    });
    assert!(
        d.pump_until(T, |ev| ev
            .iter()
            .any(|e| matches!(e, DeviceEvent::Message { .. }))),
        "device lost its session: {:?}",
        d.events
    );
    d.pump_until(Duration::from_millis(200), |_| false);
    let got = agent.recv_until(
        T,
        |m| matches!(m, AgentMessage::SendResult { tag: t, .. } if *t == tag),
    );
    assert_eq!(
        got,
        Some(AgentMessage::SendResult {
            tag,
            status: SendStatus::Delivered
        })
    );
    d.events.clear();
}

fn reload_to_a_new_ca(mode: &str) {
    let s = start(mode);
    let mut agent = Agent::attach(&s.server);
    assert!(matches!(
        agent.recv(T),
        Some(AgentMessage::AgentWelcome { .. })
    ));
    let mut live = device_trusting(&s.server, 3, trusting(&s.old));
    assert!(live.established(), "{:?}", live.events);
    s.server.tls_handshake(trusting(&s.old)).unwrap();
    assert!(s.server.tls_handshake(trusting(&s.new)).is_err());

    install(&s.new, &s.cert, &s.key);
    let (status, body) = s.server.reload();
    assert_eq!(status, 200, "{body}");
    let report: ReloadReport = serde_json::from_str(&body).unwrap();
    assert_eq!(report.shards, 2);
    assert_eq!(report.cert, s.cert.display().to_string());
    assert!(!report.new_ticket_key, "no device CA: the ticket key stays");
    assert_eq!(
        s.server.wait_log("TLS reloaded (POST /reload)", 1, T).len(),
        1
    );

    // New connections present the new certificate: the new CA verifies it, the old does not.
    s.server.tls_handshake(trusting(&s.new)).unwrap();
    let e = s.server.tls_handshake(trusting(&s.old)).unwrap_err();
    // Both dev CAs share a name, so webpki finds the old one and its signature fails.
    assert!(e.contains("invalid peer certificate"), "{e}");
    let mut fresh = device_trusting(&s.server, 4, trusting(&s.new));
    assert!(fresh.established(), "{:?}", fresh.events);

    // The device connected before the reload kept its session.
    session_works(&mut agent, &mut live, 3, 1);
    assert!(!live.closed);
    session_works(&mut agent, &mut fresh, 4, 2);
}

#[test]
fn a_reload_to_a_new_ca_keeps_live_sessions_detached() {
    reload_to_a_new_ca("detached");
}

#[test]
fn a_reload_to_a_new_ca_keeps_live_sessions_buffered() {
    reload_to_a_new_ca("buffered");
}

/// Breaks a file the server reads.
type Breaker<'a> = Box<dyn Fn() + 'a>;

fn broken_files_are_refused(mode: &str) {
    let s = start(mode);
    let mut live = device_trusting(&s.server, 3, trusting(&s.old));
    assert!(live.established(), "{:?}", live.events);
    let good_cert = std::fs::read(&s.cert).unwrap();
    let good_key = std::fs::read(&s.key).unwrap();
    let restore = || {
        std::fs::write(&s.cert, &good_cert).unwrap();
        std::fs::write(&s.key, &good_key).unwrap();
    };
    let cert = s.cert.display().to_string();
    let key = s.key.display().to_string();

    // (what to break, how, what the answer and the log line must say)
    let cases: [(&str, Breaker, Vec<String>); 4] = [
        (
            "bad PEM",
            Box::new(|| {
                std::fs::write(&s.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap()
            }),
            vec![format!("bad PEM in certificate {cert}")],
        ),
        (
            "key of another certificate",
            Box::new(|| {
                std::fs::copy(&s.new.server_key, &s.key)
                    .map(|_| ())
                    .unwrap()
            }),
            vec![
                format!("cannot use certificate {cert} with key {key}"),
                "match".into(),
            ],
        ),
        (
            "missing key",
            Box::new(|| std::fs::remove_file(&s.key).unwrap()),
            vec![format!("cannot read private key {key}")],
        ),
        (
            "no certificate in the file",
            Box::new(|| {
                std::fs::copy(&s.new.server_key, &s.cert)
                    .map(|_| ())
                    .unwrap()
            }),
            vec![format!("no certificate found in {cert}")],
        ),
    ];
    for (n, (what, break_it, says)) in cases.iter().enumerate() {
        break_it();
        let (status, body) = s.server.reload();
        assert_eq!(status, 500, "{what}: {body}");
        for text in says {
            assert!(body.contains(text.as_str()), "{what}: {body}");
        }
        let lines = s.server.wait_log("refused", n + 1, T);
        assert_eq!(
            lines.len(),
            n + 1,
            "{what}: one log line per refusal: {lines:?}"
        );
        let line = &lines[n];
        assert!(
            line.contains(&says[0]) && line.contains("keeping the previous"),
            "{line}"
        );
        // The old certificate still serves new connections, and the live one is untouched.
        s.server.tls_handshake(trusting(&s.old)).unwrap();
        restore();
    }
    assert!(s.server.log_lines("TLS reloaded").is_empty());
    let mut agent = Agent::attach(&s.server);
    assert!(matches!(
        agent.recv(T),
        Some(AgentMessage::AgentWelcome { .. })
    ));
    session_works(&mut agent, &mut live, 3, 9);
    assert_eq!(s.server.stats().total.handshake_failures, 0);
}

#[test]
fn broken_files_are_refused_and_the_old_certificate_serves_detached() {
    broken_files_are_refused("detached");
}

#[test]
fn broken_files_are_refused_and_the_old_certificate_serves_buffered() {
    broken_files_are_refused("buffered");
}

/// The dev PKI case, by signal: SIGHUP re-reads the dev server certificate and key from the
/// data directory, refuses a broken one the same way, and never stops the server.
#[test]
fn sighup_reloads_the_dev_certificate_like_post_reload() {
    let server = Server::start(10, &["--shards", "2"]);
    let dev = DevPki::ensure(&server.dir).unwrap();
    let mut live = server.device(3);
    assert!(live.established(), "{:?}", live.events);
    let base = server.dir.join("other-ca");
    let new = new_pki(&base);

    // A broken dev key first: refused, one line, the server keeps serving.
    std::fs::write(&dev.server_key, "garbage").unwrap();
    server.signal(libc::SIGHUP);
    let refused = server.wait_log("TLS reload (SIGHUP) refused", 1, T);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains(&dev.server_key.display().to_string()),
        "{refused:?}"
    );
    server.tls_handshake(server.tls.clone()).unwrap();

    install(&new, &dev.server_cert, &dev.server_key);
    server.signal(libc::SIGHUP);
    let done = server.wait_log("TLS reloaded (SIGHUP)", 1, T);
    assert_eq!(done.len(), 1, "{:?}", server.log_lines("tether"));
    assert!(done[0].contains("2 shards"), "{done:?}");
    server.tls_handshake(trusting(&new)).unwrap();
    let e = server.tls_handshake(trusting(&dev)).unwrap_err();
    // Both dev CAs share a name, so webpki finds the old one and its signature fails.
    assert!(e.contains("invalid peer certificate"), "{e}");

    // Still running, the old session too; POST /reload agrees with the signal.
    let (status, body) = server.reload();
    assert_eq!(status, 200, "{body}");
    live.pump_until(Duration::from_millis(300), |_| false);
    assert!(!live.closed, "{:?}", live.events);
    assert!(live.session.ping(std::time::Instant::now()).is_some());
    assert!(
        live.pump_until(T, |ev| ev
            .iter()
            .any(|e| matches!(e, DeviceEvent::Pong { .. }))),
        "{:?}",
        live.events
    );
}

#[test]
fn reload_answers_only_post() {
    let server = Server::start(1, &["--shards", "1"]);
    let (status, body) =
        tether_core::admin::admin_request(server.admin, None, "GET", "/reload", b"").unwrap();
    assert_eq!(status, 405, "{}", String::from_utf8_lossy(&body));
    // `tether reload` is the same request.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["reload", "--admin", &server.admin.to_string()])
        .args(["--data-dir", server.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("reloaded: certificate "), "{said}");
}
