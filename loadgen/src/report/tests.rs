use super::*;
use crate::stats::{AttackTally, Stats};

fn campaign() -> Campaign {
    Campaign::parse(
        "name = \"t\"\ndevices = 1000\n[server]\nspawn = true\n",
        "<test>",
    )
    .unwrap()
}

fn stats() -> Stats {
    let mut s = Stats::default();
    for _ in 0..1000 {
        s.counters.connected();
    }
    s.counters.msgs_sent = 5_000;
    s.counters.msgs_recv = 4_000;
    for v in 1..=100 {
        s.hist.record(Metric::RoundTrip, v * 10);
        s.hist.record(Metric::Connect, 2_000);
    }
    s.errors.count("connect_refused");
    s.errors.count("connect_refused");
    s.errors.count("tls_alert");
    s
}

fn report() -> Report {
    let c = campaign();
    let s = stats();
    let kernel = |slab| KernelSample {
        tcp: TcpSockStat {
            inuse: 2000,
            mem_pages: 10,
            ..Default::default()
        },
        slab_bytes: slab,
    };
    Report::build(ReportInputs {
        campaign: &c,
        stats: &s,
        elapsed: Duration::from_secs(10),
        ramp_elapsed: Duration::from_millis(500),
        server: Some(RssSample {
            before_bytes: Some(10_000_000),
            after_bytes: 12_000_000,
            connections: 1000,
        }),
        loadgen: RssSample {
            before_bytes: Some(5_000_000),
            after_bytes: 8_000_000,
            connections: 1000,
        },
        kernel_before: Some(kernel(100_000_000)),
        kernel_after: Some(kernel(104_000_000)),
        machine: Machine {
            cores: 2,
            kernel_version: "6.1.0".into(),
            model_name: "Test CPU".into(),
        },
        deploys: Vec::new(),
        upgrade: None,
        storms: vec![StormSummary {
            at_s: 5.0,
            dropped: 200,
            reconnected: 200,
            recovery_ms: Some(350.0),
            resumed: Some(190),
            cpu_per_reconnect_us: Some(80.0),
            loadgen_cpu_per_reconnect_us: Some(40.0),
        }],
        notes: vec!["a note".into()],
        agent_sends_offline: 3,
        resumed: 190,
        cpu_total: CpuSpent {
            server_s: Some(2.0),
            loadgen_s: Some(1.5),
        },
        cpu_ramp: CpuSpent {
            server_s: Some(0.125),
            loadgen_s: Some(0.0625),
        },
        attacks: Vec::new(),
        processes: Vec::new(),
        ramp_connects: 1000,
    })
}

#[test]
fn report_json_has_the_promised_fields() {
    let r = report();
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(v["campaign"]["name"], "t");
    assert_eq!(v["duration_s"], 10.0);
    assert_eq!(v["errors_total"], 3);
    assert_eq!(v["errors"]["connect_refused"], 2);
    assert_eq!(v["connections"]["peak"], 1000);
    assert_eq!(v["connections"]["connect_rate_per_s"], 2000.0);
    assert_eq!(v["messages"]["sent_per_s"], 500.0);
    for m in Metric::ALL {
        let h = &v["latency"][m.name()];
        for k in ["count", "p50_us", "p99_us", "p999_us", "max_us", "mean_us"] {
            assert!(!h[k].is_null(), "latency.{m}.{k}");
        }
    }
    let rt = &v["latency"]["round_trip"];
    assert_eq!(rt["count"], 100);
    assert_eq!(rt["p50_us"], 500);
    assert_eq!(v["server"]["rss_bytes"], 12_000_000);
    assert_eq!(v["server"]["rss_per_connection_bytes"], 2000.0);
    assert_eq!(v["loadgen"]["rss_per_device_bytes"], 3000.0);
    assert_eq!(v["kernel"]["tcp_inuse"], 2000);
    assert_eq!(v["kernel"]["slab_per_connection_bytes"], 4000.0);
    assert_eq!(v["machine"]["model_name"], "Test CPU");
    assert_eq!(v["server"]["cpu_s"], 2.0);
    assert_eq!(v["server"]["cpu_per_connect_us"], 125.0);
    assert_eq!(v["loadgen"]["cpu_per_connect_us"], 62.5);
    assert_eq!(v["connections"]["resumed"], 190);
    assert_eq!(v["storms"][0]["cpu_per_reconnect_us"], 80.0);
    assert_eq!(v["storms"][0]["resumed"], 190);
    // It reads back.
    let back: Report = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(back, r);
}

/// Inputs with nothing but the campaign and its statistics.
fn bare_inputs<'a>(c: &'a Campaign, s: &'a Stats) -> ReportInputs<'a> {
    ReportInputs {
        campaign: c,
        stats: s,
        elapsed: Duration::ZERO,
        ramp_elapsed: Duration::ZERO,
        server: None,
        loadgen: RssSample {
            before_bytes: None,
            after_bytes: 1,
            connections: 0,
        },
        kernel_before: None,
        kernel_after: None,
        machine: Machine::probe(),
        deploys: Vec::new(),
        upgrade: None,
        storms: Vec::new(),
        notes: Vec::new(),
        agent_sends_offline: 0,
        resumed: 0,
        cpu_total: CpuSpent::default(),
        cpu_ramp: CpuSpent::default(),
        attacks: Vec::new(),
        processes: Vec::new(),
        ramp_connects: 0,
    }
}

#[test]
fn optional_parts_are_left_out() {
    let c = campaign();
    let s = Stats::default();
    let r = Report::build(bare_inputs(&c, &s));
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert!(v.get("server").is_none() && v.get("kernel").is_none());
    assert!(v["loadgen"].get("rss_per_device_bytes").is_none());
    assert_eq!(v["connections"]["connect_rate_per_s"], 0.0);
    assert!(r.to_table().contains("loadgen"));
}

#[test]
fn table_is_aligned_and_has_units() {
    let t = report().to_table();
    assert!(t.contains("peak 1,000/1,000"), "{t}");
    assert!(t.contains("2,000/s"), "{t}");
    assert!(t.contains("connect_refused"), "{t}");
    assert!(
        t.contains("storm at 5.0s  dropped 200  reconnected 200  recovery 350.00 ms"),
        "{t}"
    );
    assert!(t.contains("note: a note"), "{t}");
    assert!(
        t.contains("resumed 190  server cpu 80.0 µs/reconnect  loadgen cpu 40.0 µs/reconnect"),
        "{t}"
    );
    assert!(
        t.contains("server       cpu 2.00 s  ramp 0.12 s = 125.0 µs per connect"),
        "{t}"
    );
    assert!(t.contains("rss 11.4 MiB  2,000 B per connection"), "{t}");
    let rows: Vec<&str> = t
        .lines()
        .filter(|l| {
            l.starts_with("latency") || l.starts_with("connect ") || l.starts_with("round_trip")
        })
        .collect();
    assert_eq!(rows.len(), 3, "{t}");
    let widths: Vec<usize> = rows.iter().map(|l| l.chars().count()).collect();
    assert!(
        widths.iter().all(|w| *w == widths[0]),
        "columns line up: {t}"
    );
    assert!(!t.contains("heartbeat"), "empty histograms are not shown");
}

#[test]
fn progress_line_uses_interval_rates() {
    let t0 = Instant::now();
    let mut tracker = ProgressTracker::new(t0, 10_000);
    let mut s = Stats::default();
    for _ in 0..2_000 {
        s.counters.connected();
    }
    s.counters.msgs_sent = 300;
    let p = tracker.sample(t0 + Duration::from_secs(1), &s);
    assert_eq!(
        (p.connected, p.connect_rate_per_s, p.msgs_per_s),
        (2_000, 2_000.0, 300.0)
    );
    assert_eq!(p.round_trip_p50_us, None);
    assert!(p.line().contains("rtt -"), "{}", p.line());

    for _ in 0..1_000 {
        s.counters.connected();
    }
    s.hist.record(Metric::RoundTrip, 50_000); // a slow echo in the second interval
    let _ = tracker.sample(t0 + Duration::from_secs(2), &s);
    s.hist.record(Metric::RoundTrip, 180);
    s.errors.count("timeout");
    let p = tracker.sample(t0 + Duration::from_secs(3), &s);
    assert_eq!(p.connect_rate_per_s, 0.0);
    assert_eq!(
        p.round_trip_p99_us,
        Some(180),
        "the slow echo belongs to the previous interval"
    );
    let line = p.line();
    assert_eq!(
        line,
        "[    3.0s] connected 3,000/10,000 +0.00/s  msgs 0.00/s  rtt p50 180 µs p99 180 µs  errors 1"
    );
}

#[test]
fn units() {
    assert_eq!(count(0), "0");
    assert_eq!(count(999), "999");
    assert_eq!(count(1_000), "1,000");
    assert_eq!(count(1_234_567), "1,234,567");
    assert_eq!(micros(850), "850 µs");
    assert_eq!(micros(1_200), "1.20 ms");
    assert_eq!(micros(2_500_000), "2.50 s");
    assert_eq!(bytes(512), "512 B");
    assert_eq!(bytes(1_434), "1.4 KiB");
    assert_eq!(bytes(3 << 20), "3.0 MiB");
    assert_eq!(rate(0.5), "0.50/s");
    assert_eq!(rate(1998.4), "1,998/s");
}

#[test]
fn cpu_windows_never_cut_short() {
    let t0 = Instant::now();
    let mut trace = CpuTrace::default();
    assert_eq!(trace.total(), CpuSpent::default());
    for (ms, srv, lg) in [
        (0, 1.0, 0.5),
        (100, 1.5, 0.5),
        (200, 2.25, 0.75),
        (300, 2.25, 1.0),
    ] {
        trace.push(CpuSample {
            at: t0 + Duration::from_millis(ms),
            server_s: Some(srv),
            loadgen_s: Some(lg),
        });
    }
    // From the last sample at or before 150 ms (100) to the first at or after 160 ms (200).
    let w = trace.spent(
        t0 + Duration::from_millis(150),
        t0 + Duration::from_millis(160),
    );
    assert_eq!(w.server_s, Some(0.75));
    assert_eq!(w.server_us_per(3), Some(250_000.0));
    assert_eq!(w.loadgen_us_per(0), None);
    // Past either end: the first and last samples.
    let all = trace.spent(t0 - Duration::from_secs(1), t0 + Duration::from_secs(9));
    assert_eq!(all, trace.total());
    assert_eq!(all.loadgen_s, Some(0.5));
    // No server pid: no server figure.
    let mut lone = CpuTrace::default();
    lone.sample(&[], 0.0);
    lone.sample(&[], 0.0);
    assert_eq!(lone.total().server_s, None);
    assert!(lone.total().loadgen_s.is_some());
}

#[test]
fn attack_windows_are_set_against_calm() {
    let c = Campaign::parse(
        "devices = 1000\n[server]\nspawn = true\n\
         [[attack]]\nkind = \"silent\"\nconnections = 10\nstart_s = 0.2\nduration_s = 0.3\n\
         [[attack]]\nkind = \"churn\"\nrate_per_sec = 10\nstart_s = 0.2\nduration_s = 0.3\nwindow = \"x\"\n",
        "<test>",
    )
    .unwrap();
    let mut s = stats();
    for v in 1..=100 {
        s.window(0).record_ready(v * 10); // calm p99 ≈ 990 µs
        s.window(1).record_ready(v * 20); // silent: twice that
    }
    s.goodbyes.count("replaced");
    s.window(1).goodbyes.count("replaced");
    let mut tally = AttackTally::default();
    tally.counts.opened = 10;
    tally.server_closed(false, 5_000);
    let r = Report::build(ReportInputs {
        attacks: vec![tally, AttackTally::default()],
        ..bare_inputs(&c, &s)
    });
    let w: Vec<&str> = r.session_ready.iter().map(|w| w.window.as_str()).collect();
    assert_eq!(w, ["calm", "silent", "x"]);
    assert_eq!(r.session_ready[0].p99_vs_calm, None);
    let ratio = r.session_ready[1].p99_vs_calm.unwrap();
    assert!((1.95..2.05).contains(&ratio), "{ratio}");
    assert_eq!(r.session_ready[2].p99_vs_calm, None, "no connect in x");
    assert_eq!(r.session_ready[1].goodbyes["replaced"], 1);
    assert_eq!(r.goodbyes["replaced"], 1);
    assert_eq!(r.attacks[0].counts.closed_by_server, 1);
    assert_eq!(r.attacks[0].closed_after.count, 1);
    let t = r.to_table();
    for want in [
        "session_ready.calm",
        "session_ready.silent",
        "2.0",
        "goodbyes     replaced 1",
    ] {
        assert!(t.contains(want), "missing {want:?} in\n{t}");
    }
    let back: Report = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(back, r);
}
