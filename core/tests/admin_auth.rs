//! The admin port of a running `tether serve`: the admin token guards every request that
//! changes state, reads stay open on loopback unless `--admin-auth-reads`, the CLIs send the
//! token from `--data-dir`, and a stalled upload does not hold up `/metrics`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::Server;
use tether_core::admin::admin_request;

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

#[test]
fn deploy_needs_the_token_and_metrics_stay_open_on_loopback() {
    let s = Server::start(2, &[]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(s.dir.join("admin.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let (status, body) =
        admin_request(s.admin, None, "POST", "/deploy?group=default", b"v1").unwrap();
    assert_eq!(status, 401, "{}", text(&body));
    assert!(
        text(&body).starts_with("POST needs the admin token"),
        "{}",
        text(&body)
    );

    let wrong = "ab".repeat(32);
    let (status, body) = admin_request(
        s.admin,
        Some(&wrong),
        "POST",
        "/deploy?group=default",
        b"v1",
    )
    .unwrap();
    assert_eq!(status, 401);
    assert!(
        text(&body).starts_with("admin token rejected"),
        "{}",
        text(&body)
    );
    // Nothing was deployed by the refused requests.
    assert!(s.rollout().groups.is_empty());

    let (status, body) = admin_request(
        s.admin,
        Some(&s.admin_token),
        "POST",
        "/deploy?group=default",
        b"v1",
    )
    .unwrap();
    assert_eq!(status, 200, "{}", text(&body));
    assert_eq!(s.rollout().groups[0].version, 1);

    // A route nobody wrote an auth check for is covered too: a state change to an unknown
    // path is refused before routing.
    assert_eq!(
        admin_request(s.admin, None, "POST", "/reload", b"")
            .unwrap()
            .0,
        401
    );

    // Reads on a loopback admin listener need no token.
    let (status, body) = admin_request(s.admin, None, "GET", "/metrics", b"").unwrap();
    assert_eq!(status, 200);
    assert!(
        text(&body).contains("tether_connections_open"),
        "{}",
        text(&body)
    );
    assert_eq!(
        admin_request(s.admin, None, "GET", "/rollout.json", b"")
            .unwrap()
            .0,
        200
    );
}

#[test]
fn admin_auth_reads_closes_metrics() {
    let s = Server::start(1, &["--admin-auth-reads"]);
    for path in ["/metrics", "/stats.json", "/rollout.json"] {
        let (status, body) = admin_request(s.admin, None, "GET", path, b"").unwrap();
        assert_eq!(status, 401, "{path}: {}", text(&body));
        assert!(text(&body).starts_with("GET needs the admin token"));
    }
    let (status, _) = admin_request(s.admin, Some(&s.admin_token), "GET", "/metrics", b"").unwrap();
    assert_eq!(status, 200);
    assert_eq!(s.stats().total.connections_open, 0);
}

fn tether(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn the_clis_send_the_token_from_the_data_dir() {
    let s = Server::start(2, &["--admin-auth-reads"]);
    let blob = s.dir.join("blob.bin");
    std::fs::write(&blob, b"code v1").unwrap();
    let admin = s.admin.to_string();
    let dir = s.dir.to_str().unwrap();
    let (ok, out, err) = tether(&[
        "deploy",
        "--group",
        "default",
        "--admin",
        &admin,
        "--data-dir",
        dir,
        blob.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("deployed v1"), "{out}");
    let (ok, out, err) = tether(&["stats", "--admin", &admin, "--data-dir", dir]);
    assert!(ok, "{err}");
    assert!(out.contains("connections_open"), "{out}");
    let (ok, out, err) = tether(&["rollout", "status", "--admin", &admin, "--data-dir", dir]);
    assert!(ok, "{err}");
    assert!(out.contains("default"), "{out}");

    // A data directory without the token: the error names the file.
    let elsewhere = s.dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let (ok, _, err) = tether(&[
        "stats",
        "--admin",
        &admin,
        "--data-dir",
        elsewhere.to_str().unwrap(),
    ]);
    assert!(!ok);
    let file = elsewhere.join("admin.token");
    assert!(
        err.starts_with(&format!(
            "tether: error: cannot use the admin token {}",
            file.display()
        )),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn a_half_sent_deploy_does_not_stall_metrics() {
    let s = Server::start(1, &[]);
    let mut upload = TcpStream::connect(s.admin).unwrap();
    let head = format!(
        "POST /deploy?group=default HTTP/1.1\r\nAuthorization: Bearer {}\r\nContent-Length: 100000\r\n\r\n",
        s.admin_token
    );
    upload.write_all(head.as_bytes()).unwrap();
    upload.write_all(&[7u8; 50_000]).unwrap();
    // While the upload waits for its second half, metrics are answered (the admin read
    // deadline is 10 s, the client's timeout as long: a serial endpoint fails here).
    for _ in 0..3 {
        let (status, _) = admin_request(s.admin, None, "GET", "/metrics", b"").unwrap();
        assert_eq!(status, 200);
    }
    upload.write_all(&[7u8; 50_000]).unwrap();
    upload
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    upload.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("\"version\":1"), "{answer}");
}
