//! The agent link over TLS (`--agent-tls`): a plain-TCP agent is refused cleanly while TLS
//! agents attach, `openssl s_client` completes a handshake, and a plain agent port off loopback
//! is refused at start. (Messages between a TLS agent and a device: `agent_messages.rs`.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{Agent, Server};
use tether_protocol::{AgentMessage, PROTOCOL_VERSION};

const T: Duration = Duration::from_secs(5);

#[test]
fn a_plain_agent_on_the_tls_port_is_refused_cleanly() {
    let s = Server::start(2, &["--agent-tls"]);
    assert!(
        s.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(&format!("agents on {} (TLS)", s.agents))),
        "{:?}",
        s.stderr.lock().unwrap()
    );
    let token = std::fs::read_to_string(s.dir.join("agent.token")).unwrap();
    let mut hello = BytesMut::new();
    AgentMessage::AgentHello {
        version: PROTOCOL_VERSION,
        token: Bytes::from(token.trim().to_owned()),
        name: Bytes::from_static(b"plain"),
    }
    .encode(&mut hello)
    .unwrap();
    let mut sock = TcpStream::connect(s.agents).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    sock.write_all(&hello).unwrap();
    // The server answers with at most a TLS alert record, then closes: never a welcome.
    let mut got = Vec::new();
    let closed = match sock.read_to_end(&mut got) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "the connection was not closed within {T:?}");
    assert!(
        got.is_empty() || got[0] == 0x15,
        "expected nothing or a TLS alert, got {got:02x?}"
    );
    // Counted as a TLS error; the port still serves TLS agents.
    let end = Instant::now() + T;
    while s
        .stats()
        .total
        .errors_of(tether_core::metrics::ErrorKind::Tls)
        == 0
    {
        assert!(Instant::now() < end, "no TLS error counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut agent = Agent::attach(&s);
    assert!(matches!(
        agent.recv(T),
        Some(AgentMessage::AgentWelcome { .. })
    ));
}

#[test]
fn openssl_s_client_completes_a_handshake_on_the_agent_port() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("SKIPPED: no `openssl` binary (install the `openssl` package)");
        return;
    }
    let s = Server::start(1, &["--agent-tls"]);
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &s.agents.to_string()])
        .args(["-servername", "localhost", "-tls1_3", "-brief"])
        .args(["-alpn", "tether-agent/1", "-verify_return_error", "-CAfile"])
        .arg(s.dir.join("tls/ca.pem"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // With no input, s_client ends after the handshake; the server then times the agent out.
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            panic!("openssl s_client did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{out}");
    assert!(out.contains("Protocol version: TLSv1.3"), "{out}");
    assert!(out.contains("Verification: OK"), "{out}");
}

#[test]
fn a_plain_agent_port_off_loopback_is_refused_at_start() {
    // A documentation address (RFC 5737): nothing could bind there, and the check runs first.
    let dir = std::env::temp_dir().join(format!("tether-agent-refuse-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("serve")
        .arg("--data-dir")
        .arg(&dir)
        .args(["--agent-listen", "192.0.2.1:7401"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(
        err.trim_end(),
        "tether: error: the agent port 192.0.2.1:7401 is not on loopback but speaks plain TCP: \
         the agent token and every device message would cross the network in clear; add \
         --agent-tls, or listen on 127.0.0.1"
    );
}
