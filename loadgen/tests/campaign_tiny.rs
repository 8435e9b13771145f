//! CI smoke: `loadgen run loadgen/campaigns/tiny.toml` end to end — a spawned `tether serve`,
//! 200 TLS devices, every message direction, a reconnect storm, a code deploy every device installs — with zero errors and a
//! non-empty histogram for every measured path, in both TLS modes (`tls_state`, which both the
//! devices and the spawned server run): storms reconnect with resumption in both.

mod common;

use common::run_campaign;

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
    let (v, stdout) = run_campaign(
        "tiny.toml",
        &[
            format!("tls_state={tls_state}"),
            format!("server.agent_tls={agent_tls}"),
        ],
    );
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
