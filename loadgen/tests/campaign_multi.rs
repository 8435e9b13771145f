//! CI: loadgen past one process.
//!
//! - `multi-tiny.toml` end to end: 3 worker processes, 2 spawned server nodes, messages both ways
//!   and a storm; one report whose histograms hold every worker's values, a row per process.
//! - Remote workers: two `loadgen worker --listen` processes attached by address.
//! - A worker killed mid-run is named in a clear failure, and the run ends by itself.
//! - Workers stop by themselves when their coordinator is killed.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, run_campaign, tether_bin};

fn campaign(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("campaigns")
        .join(file)
}

/// Kills the child at the end of the test, whatever happens.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The command line of process `pid`, or empty once it is gone.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Direct children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Waits up to `within` for `pid`'s children whose command line contains `what`, at least `n`.
fn wait_children(pid: u32, what: &str, n: usize, within: Duration) -> Vec<u32> {
    let deadline = Instant::now() + within;
    loop {
        let found: Vec<u32> = children(pid)
            .into_iter()
            .filter(|c| cmdline(*c).contains(what))
            .collect();
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `loadgen run multi-tiny.toml` on one node of its own ports, `duration_s` long, its output
/// piped.
fn start_run(duration_s: u32) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.arg("run").arg(campaign("multi-tiny.toml"));
    for kv in [
        format!("duration_s={duration_s}"),
        "server.nodes=1".into(),
        "messages.agents=1".into(),
        format!("server.address=127.0.0.1:{}", free_port()),
        format!("server.agent_address=127.0.0.1:{}", free_port()),
        format!("server.admin_address=127.0.0.1:{}", free_port()),
    ] {
        cmd.args(["--set", &kv]);
    }
    KillOnDrop(
        cmd.arg("--quiet")
            .arg("--tether-bin")
            .arg(tether_bin())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run loadgen"),
    )
}

fn sigkill(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

#[test]
fn three_workers_against_two_nodes_make_one_report() {
    let (v, stdout) = run_campaign("multi-tiny.toml", &[]);
    assert_eq!(v["errors_total"], 0, "{stdout}");
    assert_eq!(v["connections"]["peak"], 600, "{stdout}");
    // Every device's first connect is in the merged histograms (plus the storm's reconnects).
    let connects = v["connections"]["connects"].as_u64().unwrap();
    assert!(connects >= 600, "{stdout}");
    assert_eq!(v["latency"]["hello"]["count"], connects, "{stdout}");
    for m in [
        "round_trip",
        "device_to_agent",
        "agent_to_device",
        "heartbeat",
    ] {
        assert!(
            v["latency"][m]["count"].as_u64().unwrap_or(0) > 600,
            "{m} from every worker\n{stdout}"
        );
    }
    let storm = &v["storms"][0];
    assert!(storm["dropped"].as_u64().unwrap() > 0, "{stdout}");
    assert_eq!(storm["reconnected"], storm["dropped"], "{stdout}");
    let rows = v["processes"].as_array().expect("process rows");
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("server node"))
            .count(),
        2,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| n.starts_with("worker")).count(),
        3,
        "{names:?}"
    );
    // The totals cover every process.
    let sum: u64 = rows
        .iter()
        .filter(|r| r["name"].as_str().unwrap().starts_with("server"))
        .map(|r| r["rss_bytes"].as_u64().unwrap())
        .sum();
    let server_rss = v["server"]["rss_bytes"].as_u64().unwrap();
    assert!(
        server_rss >= sum / 2 && server_rss <= sum * 2,
        "{server_rss} vs {sum}"
    );
}

#[test]
fn remote_workers_attach_by_address() {
    let loadgen = env!("CARGO_BIN_EXE_loadgen");
    let ports = [free_port(), free_port()];
    let _workers: Vec<KillOnDrop> = ports
        .iter()
        .map(|p| {
            KillOnDrop(
                Command::new(loadgen)
                    .args(["worker", "--listen", &format!("127.0.0.1:{p}")])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start a worker"),
            )
        })
        .collect();
    // Bounded: the listeners come up within a second or two.
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in ports {
        while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
            assert!(Instant::now() < deadline, "worker on {p} did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The probe connections above were taken as coordinators that sent no job: the workers
    // said so and went on listening.
    let list = format!(
        "workers=[\"127.0.0.1:{}\",\"127.0.0.1:{}\"]",
        ports[0], ports[1]
    );
    let (v, stdout) = run_campaign(
        "multi-tiny.toml",
        &[list, "server.nodes=1".into(), "messages.agents=1".into()],
    );
    assert_eq!(v["errors_total"], 0, "{stdout}");
    assert_eq!(v["connections"]["peak"], 600, "{stdout}");
    let workers = v["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"].as_str().unwrap().contains(" at 127.0.0.1:"))
        .count();
    assert_eq!(workers, 2, "{stdout}");
    assert!(v["latency"]["round_trip"]["count"].as_u64().unwrap() > 600);
}

#[test]
fn a_dead_worker_fails_the_run_by_name() {
    let mut run = start_run(30);
    let workers = wait_children(run.0.id(), "worker --stdio", 3, Duration::from_secs(30));
    assert_eq!(workers.len(), 3, "three workers started");
    std::thread::sleep(Duration::from_secs(3));
    let victim = workers[1];
    sigkill(victim);
    let started = Instant::now();
    // Bounded: the coordinator aborts the others and exits; 60 s is far beyond what it needs.
    let status = loop {
        if let Some(s) = run.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the run did not end after a worker died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(run.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!("(pid {victim}) died")),
        "the dead worker is named: {err}"
    );
    for w in workers {
        assert!(!alive(w), "worker {w} is still running");
    }
}

#[test]
fn workers_stop_when_their_coordinator_dies() {
    let mut run = start_run(60);
    let pid = run.0.id();
    let workers = wait_children(pid, "worker --stdio", 3, Duration::from_secs(30));
    assert_eq!(workers.len(), 3, "three workers started");
    let servers = wait_children(pid, "serve", 1, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));
    sigkill(pid);
    let _ = run.0.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Bounded by the deadline: the workers see their stdin close and stop their shards.
    while workers.iter().any(|w| alive(*w)) {
        assert!(
            Instant::now() < deadline,
            "workers still run 20 s after their coordinator died"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The spawned server is orphaned by the kill: the test stops it.
    for s in servers {
        sigkill(s);
    }
}
