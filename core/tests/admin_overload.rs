//! The admin side under overload: `/metrics` and `/stats.json` answer from the snapshots the
//! shards publish themselves, so a shard that stops answering neither slows a scrape down nor
//! reads as zeros: it shows as down, with the age of its snapshot and its last values, and as
//! up again once it recovers. Debug builds have a hook topic that blocks a shard's thread.
//!
//! The stats are read as raw JSON and Prometheus text, not through the typed snapshot, so the
//! test states the wire format the operators' tools see.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Server;
use serde_json::Value;
use tether_core::admin::admin_request;
use tether_core::placement::home_shard;
use tether_core::shard::STALL_TOPIC;
use tether_protocol::DeviceId;
use tether_protocol::device::DeviceEvent;

/// A scrape must answer within this while a shard is stuck (the shard is stuck for 5 s).
const SCRAPE_BOUND: Duration = Duration::from_secs(1);

/// `GET path` on the admin port: how long it took, and the body (the status must be 200).
fn scrape(s: &Server, path: &str) -> (Duration, String) {
    let t = Instant::now();
    let (status, body) = admin_request(s.admin, Some(&s.admin_token), "GET", path, b"").unwrap();
    let took = t.elapsed();
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    (took, body)
}

fn stats_json(s: &Server) -> (Duration, Value) {
    let (took, body) = scrape(s, "/stats.json");
    (took, serde_json::from_str(&body).unwrap())
}

/// The value of the sample `series` (name and labels, as written) in Prometheus `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `/stats.json` until `ok` holds (up to `d`); the last answer either way.
fn stats_until(s: &Server, d: Duration, mut ok: impl FnMut(&Value) -> bool) -> (bool, Value) {
    let end = Instant::now() + d;
    loop {
        let (_, v) = stats_json(s);
        if ok(&v) || Instant::now() >= end {
            return (ok(&v), v);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stuck_shard_neither_slows_a_scrape_nor_reads_as_zeros() {
    let s = Server::start(32, &["--shards", "2"]);
    let on = |k: usize| (1..=32).find(|&i| home_shard(DeviceId(i), 2) == k).unwrap();
    let mut victim = s.device(on(1));
    let mut bystander = s.device(on(0));
    assert!(victim.established() && bystander.established());
    let both_open = |v: &Value| {
        v["shards"][0]["connections_open"] == 1 && v["shards"][1]["connections_open"] == 1
    };
    let (ok, v) = stats_until(&s, Duration::from_secs(10), both_open);
    assert!(ok, "each shard holds its session: {v}");

    // Shard 1's thread sleeps 5 s from now.
    victim
        .session
        .send(
            Instant::now(),
            Bytes::from_static(STALL_TOPIC),
            Bytes::from_static(b"5000"),
        )
        .unwrap();
    victim.pump_until(Duration::from_millis(50), |_| false);
    let stalled_at = Instant::now();

    // Every scrape answers promptly; within a couple of seconds shard 1 reads as stale.
    let mut stale = None;
    while stalled_at.elapsed() < Duration::from_secs(4) {
        let (took, v) = stats_json(&s);
        assert!(took < SCRAPE_BOUND, "/stats.json took {took:?}");
        let (took, text) = scrape(&s, "/metrics");
        assert!(took < SCRAPE_BOUND, "/metrics took {took:?}");
        if v["shards"][1]["stale"] == true
            && sample(&text, "tether_shard_up{shard=\"1\"}") == Some(0.0)
        {
            stale = Some((v, text));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (v, text) = stale.expect("shard 1 read as stale while stuck");
    assert!(
        stalled_at.elapsed() < Duration::from_secs(4),
        "seen stale while still stuck"
    );

    // JSON: shard 1 stale with its age and its last values, shard 0 up; the totals keep
    // shard 1's values and say so.
    let s1 = &v["shards"][1];
    assert!(s1["age_ms"].as_u64().unwrap() >= 1000, "{v}");
    assert_eq!(s1["connections_open"], 1, "last values, not zeros: {v}");
    assert_eq!(v["shards"][0]["stale"], false, "{v}");
    assert!(v["shards"][0]["age_ms"].as_u64().unwrap() < 1000, "{v}");
    assert_eq!(v["total"]["connections_open"], 2, "{v}");
    assert_eq!(v["stale_shards"], serde_json::json!([1]), "{v}");

    // Prometheus: the same.
    assert_eq!(
        sample(&text, "tether_shard_up{shard=\"0\"}"),
        Some(1.0),
        "{text}"
    );
    let age = sample(&text, "tether_shard_snapshot_age_seconds{shard=\"1\"}").unwrap();
    assert!(age >= 1.0, "{text}");
    assert_eq!(
        sample(&text, "tether_connections_open{shard=\"1\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "tether_connections_open"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(sample(&text, "tether_shards_stale"), Some(1.0), "{text}");

    // `tether stats` says so.
    let snap: tether_core::metrics::MetricsSnapshot = serde_json::from_value(v.clone()).unwrap();
    let table = tether_core::admin::format_stats_table(&snap);
    assert!(
        table.contains("shard 1: NOT ANSWERING for ") && table.contains("last values shown"),
        "{table}"
    );

    // The other shard's devices are served meanwhile.
    bystander.session.ping(Instant::now());
    assert!(
        bystander.pump_until(Duration::from_secs(3), |ev| {
            ev.iter().any(|e| matches!(e, DeviceEvent::Pong { .. }))
        }),
        "shard 0 serves its device while shard 1 is stuck"
    );

    // Once the shard wakes up, it is up again.
    let (ok, v) = stats_until(&s, Duration::from_secs(15), |v| {
        v["shards"][1]["stale"] == false && v["stale_shards"] == serde_json::json!([])
    });
    assert!(ok, "shard 1 up again after its stall: {v}");
    let (_, text) = scrape(&s, "/metrics");
    assert_eq!(
        sample(&text, "tether_shard_up{shard=\"1\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "tether_shards_stale"), Some(0.0), "{text}");
}

#[test]
fn the_rollout_status_does_not_wait_for_a_stuck_shard() {
    let s = Server::start(32, &["--shards", "2"]);
    let on = |k: usize| (1..=32).find(|&i| home_shard(DeviceId(i), 2) == k).unwrap();
    s.deploy("default", b"v1");
    let mut victim = s.device_at(on(1), tether_protocol::CodeVersion(1));
    assert!(victim.established());
    let connected = |v: &Value| v["groups"][0]["connected"] == 1;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = scrape(&s, "/rollout.json");
        let v: Value = serde_json::from_str(&body).unwrap();
        if connected(&v) {
            break;
        }
        assert!(Instant::now() < end, "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    victim
        .session
        .send(
            Instant::now(),
            Bytes::from_static(STALL_TOPIC),
            Bytes::from_static(b"5000"),
        )
        .unwrap();
    victim.pump_until(Duration::from_millis(50), |_| false);
    let stalled_at = Instant::now();
    let mut seen = None;
    while stalled_at.elapsed() < Duration::from_secs(4) {
        let (took, body) = scrape(&s, "/rollout.json");
        assert!(took < SCRAPE_BOUND, "/rollout.json took {took:?}");
        let v: Value = serde_json::from_str(&body).unwrap();
        if v["shards"][1]["stale"] == true {
            seen = Some(v);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = seen.expect("shard 1 read as stale in the rollout status while stuck");
    assert!(v["shards"][1]["age_ms"].as_u64().unwrap() >= 1000, "{v}");
    assert_eq!(v["shards"][0]["stale"], false, "{v}");
    // Its device still counts (its last values), not zero.
    assert_eq!(v["groups"][0]["connected"], 1, "{v}");
    assert_eq!(v["groups"][0]["version"], 1, "{v}");
    let st: tether_core::deploy::RolloutStatus = serde_json::from_value(v.clone()).unwrap();
    assert!(
        st.table().contains("shard 1: NOT ANSWERING for "),
        "{}",
        st.table()
    );
}
