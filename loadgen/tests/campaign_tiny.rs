//! CI smoke: `loadgen run loadgen/campaigns/tiny.toml` end to end — a spawned `tether serve`,
//! 200 TLS devices, every message direction, a reconnect storm, a code deploy every device installs — with zero errors and a
//! non-empty histogram for every measured path, in both TLS modes (`tls_state`, which both the
//! devices and the spawned server run): storms reconnect with resumption in both.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace's `tether` binary, next to ours in the same target directory, built (or found
/// fresh) with cargo first: `cargo test -p tether-loadgen` does not build other packages'
/// binaries, and one left from an older checkout would be stale.
fn tether_bin() -> PathBuf {
    let loadgen = Path::new(env!("CARGO_BIN_EXE_loadgen"));
    let dir = loadgen.parent().expect("binary directory");
    let bin = dir.join("tether");
    {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "tether-core", "--bin", "tether"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p tether-core failed");
    }
    assert!(bin.exists(), "no tether binary at {}", bin.display());
    bin
}

/// A loopback port nobody listens on right now (the server binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

/// Detached device TLS, and the agent link over TLS (`server.agent_tls`).
#[test]
fn tiny_campaign_runs_clean_detached() {
    tiny_campaign_runs_clean("detached", true);
}

/// Buffered device TLS, and the agent link over plain TCP (the default).
#[test]
fn tiny_campaign_runs_clean_buffered() {
    tiny_campaign_runs_clean("buffered", false);
}

fn tiny_campaign_runs_clean(tls_state: &str, agent_tls: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let report = std::env::temp_dir().join(format!(
        "loadgen-tiny-{tls_state}-{}.json",
        std::process::id()
    ));
    let addr = |key: &str| format!("server.{key}=127.0.0.1:{}", free_port());
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("run")
        .arg(root.join("campaigns/tiny.toml"))
        .args(["--set", &addr("address")])
        .args(["--set", &addr("agent_address")])
        .args(["--set", &addr("admin_address")])
        .args(["--set", &format!("tls_state={tls_state}")])
        .args(["--set", &format!("server.agent_tls={agent_tls}")])
        .arg("--tether-bin")
        .arg(tether_bin())
        .arg("--report")
        .arg(&report)
        .arg("--quiet")
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed\n{stdout}\n{stderr}");
    let text = std::fs::read_to_string(&report).expect("report written");
    let _ = std::fs::remove_file(&report);
    let v: serde_json::Value = serde_json::from_str(&text).expect("report is JSON");
    assert_eq!(v["errors_total"], 0, "{stdout}");
    assert_eq!(v["connections"]["peak"], 200, "{stdout}");
    assert_eq!(v["campaign"]["server"]["agent_tls"], agent_tls, "{stdout}");
    for m in [
        "connect",
        "tls_handshake",
        "hello",
        "round_trip",
        "agent_to_device",
        "device_to_agent",
        "heartbeat",
        "code_transfer",
    ] {
        let count = v["latency"][m]["count"].as_u64().unwrap_or(0);
        assert!(count > 0, "histogram {m} is empty\n{stdout}");
    }
    let deploy = &v["deploys"][0];
    assert_eq!(deploy["installed"], 200, "{stdout}");
    assert!(deploy["converged_ms"].as_f64().is_some(), "{stdout}");
    let storm = &v["storms"][0];
    assert!(storm["dropped"].as_u64().unwrap_or(0) > 0, "{stdout}");
    assert_eq!(storm["dropped"], storm["reconnected"], "{stdout}");
    // The reconnects resume from tickets the devices' TLS state handed to the ticket pool.
    let resumed = storm["resumed"].as_u64().unwrap_or(0);
    assert!(resumed > 0, "{tls_state}: no reconnect resumed\n{stdout}");
}
