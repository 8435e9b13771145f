//! Helpers of the campaign integration tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace's `tether` binary, next to ours in the same target directory, built (or found
/// fresh) with cargo first: `cargo test -p tether-loadgen` does not build other packages'
/// binaries, and one left from an older checkout would be stale.
pub fn tether_bin() -> PathBuf {
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
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

/// Runs `loadgen run campaigns/<file>` against a spawned server on free loopback ports, with
/// `--set` overrides `sets`; fails the test unless loadgen succeeds. Returns the JSON report
/// and loadgen's output (the table), for assertion messages.
pub fn run_campaign(file: &str, sets: &[String]) -> (serde_json::Value, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let report = std::env::temp_dir().join(format!(
        "loadgen-{}-{}-{}.json",
        file.trim_end_matches(".toml"),
        sets.join("_").replace(['/', '='], "-"),
        std::process::id()
    ));
    let addr = |key: &str| format!("server.{key}=127.0.0.1:{}", free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.arg("run").arg(root.join("campaigns").join(file));
    for key in ["address", "agent_address", "admin_address"] {
        cmd.args(["--set", &addr(key)]);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd
        .arg("--tether-bin")
        .arg(tether_bin())
        .arg("--report")
        .arg(&report)
        .arg("--quiet")
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(&report);
    let _ = std::fs::remove_file(&report);
    assert!(out.status.success(), "loadgen failed\n{stdout}\n{stderr}");
    let v = serde_json::from_str(&text.expect("report written")).expect("report is JSON");
    (v, stdout)
}
