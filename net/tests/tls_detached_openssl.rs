//! Detached TLS against `openssl s_client` over loopback: a std-socket echo server on
//! `detached::Handshake` + `DetachedTls`; thousands of lines echoed, with KeyUpdates from
//! openssl (`k`: update_not_requested, `K`: update_requested) in the middle.
//! Needs the `openssl` binary (Debian/Ubuntu package `openssl`); skipped with a message if
//! it is missing.

#[path = "common/tls_pair.rs"]
mod tls_pair;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use rustls::ServerConfig;
use tether_net::detached::{DetachedTls, Handshake};
use tls_pair::{Dir, configs};

const LINES: usize = 3000;
const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Report {
    echoed_bytes: usize,
    peer_key_updates: usize,
    own_key_updates: usize,
    suite: Option<rustls::CipherSuite>,
    peer_closed: bool,
}

/// Serves one connection: handshake, then echo every byte until close_notify or EOF.
fn echo_server(listener: TcpListener, config: Arc<ServerConfig>) -> Result<Report, String> {
    let (mut sock, _) = listener.accept().map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(WAIT))
        .map_err(|e| e.to_string())?;
    let mut inbuf = Vec::new();
    let mut out = Vec::new();
    let mut received = Vec::new();
    let mut chunk = vec![0; 16 * 1024];
    let mut read = |sock: &mut std::net::TcpStream, inbuf: &mut Vec<u8>| -> Result<usize, String> {
        let n = sock.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        inbuf.extend_from_slice(&chunk[..n]);
        Ok(n)
    };
    let mut hs = Handshake::new(config).map_err(|e| e.to_string())?;
    hs.queue_half_rtt(b"challenge\n");
    loop {
        if read(&mut sock, &mut inbuf)? == 0 {
            return Err("EOF during the handshake".into());
        }
        let p = hs
            .feed(&mut inbuf, &mut out, &mut received)
            .map_err(|e| e.to_string())?;
        inbuf.drain(..p.consumed);
        sock.write_all(&out).map_err(|e| e.to_string())?;
        out.clear();
        if p.complete {
            break;
        }
    }
    let mut tls: DetachedTls = hs.detach(&mut out).map_err(|e| e.to_string())?;
    let mut report = Report::default();
    let mut echo = received;
    loop {
        report.suite = Some(tls.suite());
        let (tx_before, rx_before) = tls.sequence_numbers();
        let opened = tls
            .decrypt_in_place(&mut inbuf, |d| echo.extend_from_slice(d))
            .map_err(|e| e.to_string())?;
        inbuf.drain(..opened.consumed);
        if tls.sequence_numbers().1 < rx_before {
            report.peer_key_updates += 1;
        }
        if opened.wants_write {
            tls.poll_transmit(&mut out).map_err(|e| e.to_string())?;
        }
        if tls.sequence_numbers().0 < tx_before {
            report.own_key_updates += 1;
        }
        report.echoed_bytes += echo.len();
        tls.encrypt(&echo, &mut out).map_err(|e| e.to_string())?;
        echo.clear();
        if opened.peer_closed {
            report.peer_closed = true;
            tls.close_notify(&mut out).map_err(|e| e.to_string())?;
        }
        sock.write_all(&out).map_err(|e| e.to_string())?;
        out.clear();
        if opened.peer_closed || read(&mut sock, &mut inbuf)? == 0 {
            return Ok(report);
        }
    }
}

/// Lines start with 'L' so that s_client never takes one for a command letter.
fn line(i: usize) -> String {
    format!(
        "LINE{i:05} the quick brown fox jumps over the lazy dog {}\n",
        i * 7919
    )
}

#[test]
fn openssl_s_client_echo_with_key_updates_aes256gcm() {
    s_client_echo(
        "TLS_AES_256_GCM_SHA384",
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
    );
}

#[test]
fn openssl_s_client_echo_with_key_updates_chacha20() {
    s_client_echo(
        "TLS_CHACHA20_POLY1305_SHA256",
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    );
}

fn s_client_echo(openssl_suite: &str, suite: rustls::CipherSuite) {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("SKIPPED: no `openssl` binary (install the `openssl` package)");
        return;
    }
    let dir = Dir::new(&format!("det-openssl-{openssl_suite}"));
    let (server, _, pki) = configs(&dir.0, None);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let serving = std::thread::spawn(move || echo_server(listener, server));

    // Without -quiet (which implies -ign_eof and turns command letters off), a read from
    // stdin that starts with 'k' or 'K' makes s_client send a KeyUpdate.
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-tls1_3",
        ])
        .args(["-ciphersuites", openssl_suite])
        .args(["-servername", "localhost", "-alpn", "tether/1", "-CAfile"])
        .arg(&pki.ca_cert)
        .args(["-verify_return_error"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for l in stdout.lines().map_while(Result::ok) {
            if lines_tx.send(l).is_err() {
                break;
            }
        }
    });
    let (err_tx, err_rx) = mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            if err_tx.send(l).is_err() {
                break;
            }
        }
    });

    let expect_lines = |from: usize, to: usize| {
        let mut next = from;
        while next < to {
            let l = lines_rx.recv_timeout(WAIT).expect("s_client output");
            // s_client prints its own lines too (session tickets in base64, which may start
            // with 'L'): only ours carry this prefix.
            if l.starts_with("LINE") {
                assert_eq!(format!("{l}\n"), line(next), "echo out of order");
                next += 1;
            }
        }
    };
    let key_update = |stdin: &mut std::process::ChildStdin, letter: &str| {
        stdin.write_all(letter.as_bytes()).unwrap();
        stdin.flush().unwrap();
        // s_client says KEYUPDATE on stderr once it has sent it.
        loop {
            let l = err_rx.recv_timeout(WAIT).expect("s_client KEYUPDATE");
            if l.contains("KEYUPDATE") {
                return;
            }
        }
    };

    let third = LINES / 3;
    let batch = |stdin: &mut std::process::ChildStdin, from: usize, to: usize| {
        let text: String = (from..to).map(line).collect();
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    };
    // Echoes are awaited after each batch so that the command letter starts a fresh read.
    batch(&mut stdin, 0, third);
    expect_lines(0, third);
    key_update(&mut stdin, "k\n");
    batch(&mut stdin, third, 2 * third);
    expect_lines(third, 2 * third);
    key_update(&mut stdin, "K\n");
    batch(&mut stdin, 2 * third, LINES);
    expect_lines(2 * third, LINES);
    drop(stdin); // EOF: s_client sends close_notify and exits.

    let report = serving.join().unwrap().expect("echo server");
    let status = child.wait().unwrap();
    let bytes: usize = (0..LINES).map(|i| line(i).len()).sum();
    assert_eq!(report.echoed_bytes, bytes);
    assert_eq!(report.suite, Some(suite));
    assert_eq!(report.peer_key_updates, 2, "{report:?}");
    assert_eq!(report.own_key_updates, 1, "answer to `K` only: {report:?}");
    assert!(report.peer_closed, "{report:?}");
    assert!(status.success(), "s_client exit {status}");
}
