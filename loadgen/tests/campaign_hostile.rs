//! CI: `loadgen run loadgen/campaigns/hostile-tiny.toml` end to end — a spawned `tether serve`,
//! 216 well-behaved TLS devices, and every attack kind in its own window and then all at once:
//! the devices see no error, every attack actually ran (its counters moved), no bad proof got
//! a `Welcome`, and no live device was replaced by one (`Goodbye{replaced}`). No timing is
//! asserted: the per-window `session_ready` ratios are reported, not checked.

mod common;

use common::run_campaign;

#[test]
fn hostile_tiny_campaign_keeps_devices_clean() {
    let (v, stdout) = run_campaign("hostile-tiny.toml", &[]);

    // The well-behaved devices: no error, all admitted.
    assert_eq!(v["errors_total"], 0, "{stdout}");
    assert_eq!(v["connections"]["peak"], 216, "{stdout}");
    // No live device was replaced by a stranger's Hello.
    let replaced = v["goodbyes"]["replaced"].as_u64().unwrap_or(0);
    assert_eq!(replaced, 0, "devices got Goodbye{{replaced}}\n{stdout}");

    // Every attack kind ran, and did what it says.
    let attacks = v["attacks"].as_array().expect("attacks in the report");
    assert_eq!(attacks.len(), 14, "{stdout}");
    let n = |a: &serde_json::Value, k: &str| a[k].as_u64().unwrap_or(0);
    for kind in [
        "silent",
        "stalled_hello",
        "partial_hello",
        "garbage_before_tls",
        "garbage_after_tls",
        "churn",
        "bad_proof",
    ] {
        // The attack's own window (the first of its kind; the second runs in "all").
        let a = attacks
            .iter()
            .find(|a| a["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} attack\n{stdout}"));
        assert!(n(a, "opened") > 0, "{kind} opened nothing\n{stdout}");
        match kind {
            "silent" => assert_eq!(n(a, "opened"), 200, "{stdout}"),
            "churn" => assert!(n(a, "closed_by_attacker") > 0, "{stdout}"),
            "garbage_after_tls" | "bad_proof" => {
                assert!(n(a, "tls_done") > 0, "{kind}: no handshake\n{stdout}");
                assert!(n(a, "sent") > 0, "{kind}: nothing sent\n{stdout}");
            }
            _ => assert!(n(a, "sent") > 0, "{kind}: nothing sent\n{stdout}"),
        }
    }
    for a in attacks {
        // A bad proof is never welcomed; the attacker stops by itself and closes everything.
        assert_eq!(n(a, "welcomed"), 0, "a bad proof was welcomed\n{stdout}");
        let ended = n(a, "refused")
            + n(a, "reset")
            + n(a, "closed_by_server")
            + n(a, "connect_timeouts")
            + n(a, "connect_failed")
            + n(a, "closed_by_attacker")
            + n(a, "still_open");
        assert_eq!(ended, n(a, "attempted"), "connections unaccounted for: {a}");
    }
    let bad = attacks.iter().find(|a| a["kind"] == "bad_proof").unwrap();
    assert!(
        n(bad, "named_live") > 0,
        "no bad proof named a live device\n{stdout}"
    );
    assert!(
        n(bad, "rejected") > 0,
        "no bad proof was answered\n{stdout}"
    );
    // The garbage is answered by a close, in the attack's own window.
    let garbage = attacks
        .iter()
        .find(|a| a["kind"] == "garbage_before_tls")
        .unwrap();
    assert!(n(garbage, "closed_by_server") > 0, "{stdout}");

    // A session_ready figure for every window, calm first.
    let windows: Vec<&str> = v["session_ready"]
        .as_array()
        .expect("session_ready in the report")
        .iter()
        .map(|w| w["window"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(windows.len(), 9, "{stdout}");
    assert_eq!(windows[0], "calm");
    assert_eq!(windows[8], "all");
    for w in v["session_ready"].as_array().unwrap() {
        assert!(
            w["latency"]["count"].as_u64().unwrap_or(0) > 0,
            "window {} has no connect\n{stdout}",
            w["window"]
        );
    }
}
