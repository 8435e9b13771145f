//! CI: `loadgen run loadgen/campaigns/upgrade-tiny.toml` end to end — a spawned `tether serve`
//! upgraded twice (once during the ramp) while 300 TLS devices and two agents exchange messages
//! both ways: every upgrade answers, hands every session over live, and the devices see no
//! error, no reconnect, no refused connect and no acknowledged message lost. Latencies are
//! reported, not asserted.

mod common;

use common::run_campaign;

#[test]
fn upgrade_tiny_campaign_hands_every_session_over() {
    let (v, stdout) = run_campaign("upgrade-tiny.toml", &[]);
    assert_eq!(v["errors_total"], 0, "{stdout}");
    assert_eq!(v["connections"]["peak"], 300, "{stdout}");
    let u = &v["upgrade"];
    let ups = u["upgrades"].as_array().expect("upgrades in the report");
    assert_eq!(ups.len(), 2, "{stdout}");
    for up in ups {
        let r = &up["report"];
        assert!(r.is_object(), "an upgrade failed: {up}\n{stdout}");
        assert!(r["sessions_handed"].as_u64().unwrap_or(0) > 0, "{stdout}");
        assert_eq!(r["sessions_refused"], 0, "{stdout}");
        assert_eq!(r["sessions_told_to_reconnect"], 0, "{stdout}");
        assert_ne!(r["new_pid"], r["old_pid"], "{stdout}");
    }
    // The second upgrade, after the ramp, moves every device.
    assert_eq!(ups[1]["report"]["sessions_handed"], 300, "{stdout}");
    for key in [
        "device_reconnects",
        "refused_connects",
        "tls_errors",
        "acked_lost",
    ] {
        assert_eq!(u[key], 0, "{key}\n{stdout}");
    }
    // Agents attach again to the new process each time.
    assert!(u["agent_reattaches"].as_u64().unwrap_or(0) >= 2, "{stdout}");
}
