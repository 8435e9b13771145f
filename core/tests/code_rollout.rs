//! Code rollout end to end over loopback TLS: a stale device is updated when it connects, a
//! deploy (admin port or agent link) reaches every connected device with bounded concurrent
//! transfers, a corrupted transfer is rejected and retried, and bad deploys get clear errors.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Agent, Device, Server};
use tether_protocol::code::CodeUpdate;
use tether_protocol::{AgentMessage, CodeVersion, Digest};

const T: Duration = Duration::from_secs(8);

fn blob(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7) as u8).wrapping_add(seed))
        .collect()
}

fn fast(d: &mut Device) {
    d.tls
        .sock
        .set_read_timeout(Some(Duration::from_millis(2)))
        .unwrap();
}

/// Pumps every device in turn until each runs `v`.
fn converge(devices: &mut [Device], v: CodeVersion) -> bool {
    let end = std::time::Instant::now() + T;
    while std::time::Instant::now() < end {
        for d in devices.iter_mut() {
            d.pump_until(Duration::from_millis(5), |_| false);
        }
        if devices.iter().all(|d| d.code.running() >= v) {
            return true;
        }
    }
    false
}

#[test]
fn stale_device_is_updated_on_connect() {
    let s = Server::start(4, &[]);
    let code = blob(100_000, 1);
    let r = s.deploy("default", &code);
    assert_eq!((r.version, r.unchanged, r.devices), (1, false, 4));
    let mut d = s.device(1);
    assert!(d.until_running(CodeVersion(1), T), "{:?}", d.code_updates);
    let Some(CodeUpdate::Installed { blob, digest, .. }) = d
        .code_updates
        .iter()
        .find(|u| matches!(u, CodeUpdate::Installed { .. }))
    else {
        panic!("{:?}", d.code_updates)
    };
    assert_eq!(blob.as_deref(), Some(&code[..]));
    assert_eq!(*digest, Digest::of(&code));
    // The server counts it current; a device already current is not offered anything.
    let mut d2 = s.device_at(2, CodeVersion(1));
    assert!(d2.established());
    d2.pump_until(Duration::from_millis(300), |_| false);
    assert!(d2.chunk_offsets.is_empty());
    let st = s.rollout();
    let g = &st.groups[0];
    assert_eq!((g.group.as_str(), g.version), ("default", 1));
    assert_eq!(
        (g.connected, g.current, g.in_flight, g.pending),
        (2, 2, 0, 0)
    );
    let m = s.stats().total;
    assert_eq!((m.code_offers, m.code_transfers_completed), (1, 1));
    assert_eq!(m.code_bytes_out, 100_000);
}

#[test]
fn deploy_reaches_every_connected_device_with_bounded_transfers() {
    let s = Server::start_with_groups(
        12,
        "lamps,meters",
        &["--shards", "2", "--max-transfers", "2"],
    );
    // Odd ids are lamps, even ids meters (round-robin from id 1).
    let mut lamps: Vec<Device> = [1, 3, 5, 7, 9, 11].iter().map(|&i| s.device(i)).collect();
    let mut meter = s.device(2);
    for d in lamps.iter_mut().chain(std::iter::once(&mut meter)) {
        assert!(d.established());
        fast(d);
    }
    let r = s.deploy("lamps", &blob(200_000, 2));
    assert_eq!(r.version, 1);
    assert!(converge(&mut lamps, CodeVersion(1)));
    meter.pump_until(Duration::from_millis(100), |_| false);
    assert!(meter.chunk_offsets.is_empty(), "another group's code");

    // Through the agent link: v2 reaches them too.
    let mut agent = Agent::attach(&s);
    agent.send(&AgentMessage::Deploy {
        group: Bytes::from_static(b"lamps"),
        blob: Bytes::from(blob(50_000, 3)),
    });
    let Some(AgentMessage::DeployResult {
        version, message, ..
    }) = agent.recv_until(T, |m| matches!(m, AgentMessage::DeployResult { .. }))
    else {
        panic!("no DeployResult")
    };
    assert_eq!(version, CodeVersion(2), "{message:?}");
    assert!(converge(&mut lamps, CodeVersion(2)));

    let st = s.rollout();
    let g = st.groups.iter().find(|g| g.group == "lamps").unwrap();
    assert_eq!((g.version, g.connected, g.current), (2, 6, 6));
    // A device has its code before the server has read its last acknowledgement and the shard
    // has published its counters: wait for them (bounded).
    let deadline = std::time::Instant::now() + T;
    let m = loop {
        let m = s.stats();
        let settled = m.total.code_transfers_completed >= 12 && m.total.code_transfers_active == 0;
        if settled || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(m.total.code_transfers_completed, 12);
    assert_eq!(m.total.code_transfers_active, 0);
    // Never more than --max-transfers per shard at once: 6 devices needed queueing.
    assert!(m.total.code_transfers_started >= 12);
}

#[test]
fn corrupt_transfer_is_rejected_and_retried() {
    let s = Server::start(2, &[]);
    s.deploy("default", &blob(70_000, 4));
    let mut d = s.device(1);
    d.corrupt_chunk = Some(2);
    assert!(d.until_running(CodeVersion(1), T), "{:?}", d.code_updates);
    assert!(d.code_updates.iter().any(|u| matches!(
        u,
        CodeUpdate::Rejected {
            error: tether_protocol::code::CodeError::DigestMismatch { .. }
        }
    )));
    // The retry started from 0.
    assert_eq!(d.chunk_offsets.iter().filter(|&&o| o == 0).count(), 2);
    let m = s.stats().total;
    assert_eq!(
        (m.code_transfers_failed, m.code_transfers_completed),
        (1, 1)
    );
}

#[test]
fn bad_deploys_get_clear_errors() {
    let s = Server::start(2, &["--max-code-size", "1000"]);
    let err = |group: &str, blob: &[u8]| {
        tether_core::deploy::deploy(s.admin, Some(&s.admin_token), group, blob)
            .unwrap_err()
            .to_string()
    };
    let e = err("default", b"");
    assert!(e.contains("400") && e.contains("empty blob"), "{e}");
    let e = err("default", &[1u8; 1001]);
    assert!(
        e.contains("413") && e.contains("over the limit of 1000"),
        "{e}"
    );
    let e = err("a%20b", b"x");
    assert!(e.contains("bad group name"), "{e}");
    // A group no device is in yet may be deployed to; the answer says so.
    let r = s.deploy("future", b"x");
    assert_eq!((r.version, r.devices), (1, 0));
    assert!(
        r.summary().contains("no registered device"),
        "{}",
        r.summary()
    );
    // Shards keep its code for devices added to it later: listed, nobody connected.
    let groups = s.rollout().groups;
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(
        (
            groups[0].group.as_str(),
            groups[0].version,
            groups[0].connected
        ),
        ("future", 1, 0)
    );
}
