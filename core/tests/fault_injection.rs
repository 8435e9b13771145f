//! Fault containment: a panic injected into each of a shard's per-connection and per-message
//! steps (the debug-build hook `TETHER_TEST_PANIC=site:device`) closes only the connection or
//! agent link it concerns, is counted by its site, and both shards keep serving: bystanders
//! keep talking, new devices connect, every shard keeps publishing its counters.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Agent, Device, Server};
use tether_core::placement::home_shard;
use tether_protocol::device::DeviceEvent;
use tether_protocol::message::{ErrorCode, SendStatus};
use tether_protocol::{AgentMessage, DeviceId};

const T: Duration = Duration::from_secs(5);

/// A two-shard server with the faults `spec` (`site:device,…`).
fn server(spec: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--shards", "2"];
    args.extend_from_slice(extra);
    Server::start_env(40, "default", &args, &[("TETHER_TEST_PANIC", spec)])
}

/// The server still serves on both shards: a device homed on each connects, and every shard
/// publishes fresh counters. Returns the counters.
fn still_serving(s: &Server, ids: [u64; 2]) -> tether_core::metrics::MetricsSnapshot {
    let homes: Vec<usize> = ids.iter().map(|&i| home_shard(DeviceId(i), 2)).collect();
    assert_ne!(homes[0], homes[1], "one device per shard");
    for id in ids {
        let mut d = s.device(id);
        assert!(d.established(), "device {id} connects after the fault");
    }
    let st = s.stats();
    assert!(st.stale_shards.is_empty(), "every shard answers: {st:?}");
    st
}

/// Two device ids (from `from`) homed on shard 0 and shard 1.
fn one_per_shard(from: u64) -> [u64; 2] {
    let on = |k| (from..).find(|&i| home_shard(DeviceId(i), 2) == k).unwrap();
    [on(0), on(1)]
}

/// Pings and waits for the pong: the connection is alive and served.
fn pongs(d: &mut Device) -> bool {
    d.session.ping(Instant::now());
    d.pump_until(T, |ev| {
        ev.iter().any(|e| matches!(e, DeviceEvent::Pong { .. }))
    })
}

fn attach(s: &Server) -> (Agent, usize) {
    let mut a = Agent::attach(s);
    match a.recv(T) {
        Some(AgentMessage::AgentWelcome { agent, .. }) => (a, (agent >> 24) as usize),
        other => panic!("no welcome: {other:?}"),
    }
}

fn send(to: u64, tag: u64) -> AgentMessage {
    AgentMessage::Send {
        device: DeviceId(to),
        tag,
        topic: Bytes::from_static(b"cmd"),
        payload: Bytes::from_static(b"x"),
    }
}

fn send_result(a: &mut Agent, want: u64) -> Option<SendStatus> {
    match a.recv_until(
        T,
        |m| matches!(m, AgentMessage::SendResult { tag, .. } if *tag == want),
    ) {
        Some(AgentMessage::SendResult { status, .. }) => Some(status),
        _ => None,
    }
}

#[test]
fn a_panic_in_a_connections_step_closes_it_only() {
    let s = server("drive:3", &[]);
    let mut victim = s.device(3);
    let mut bystander = s.device(4);
    assert!(victim.established() && bystander.established());
    victim
        .session
        .send(Instant::now(), Bytes::from_static(b"t"), Bytes::new())
        .unwrap();
    assert!(victim.wait_closed(T), "the victim is closed");
    assert!(pongs(&mut bystander));
    let st = still_serving(&s, one_per_shard(10));
    assert_eq!(st.total.panics_caught, 1);
}

#[test]
fn a_panic_in_the_timer_tick_closes_its_connection_only() {
    // Heartbeat 1 s: the server's idle deadline (2.5 s) is the timer that fires.
    let s = server("timer:3", &["--heartbeat-s", "1"]);
    let mut victim = s.device(3);
    let mut bystander = s.device(4);
    assert!(victim.established() && bystander.established());
    // Both keep their heartbeats (the device harness pings when its timer says so).
    let end = Instant::now() + Duration::from_secs(8);
    while !victim.closed && Instant::now() < end {
        victim.pump_until(Duration::from_millis(100), |_| false);
        bystander.pump_until(Duration::from_millis(100), |_| false);
    }
    assert!(victim.closed, "the victim is closed");
    assert!(!bystander.closed, "the bystander is not");
    assert!(pongs(&mut bystander), "the bystander's timers still run");
    let st = still_serving(&s, one_per_shard(10));
    assert_eq!(st.total.panics_timer, 1);
    assert_eq!(st.total.panics_caught, 1);
}

#[test]
fn a_panic_adopting_a_moved_connection_closes_it_only() {
    let s = server("adopt:3", &[]);
    let mut bystander = s.device(4);
    assert!(bystander.established());
    // A connection is moved when it was accepted on the other shard (the kernel's
    // SO_REUSEPORT hash of its ports decides): reconnect until one is.
    let mut tries = 0;
    loop {
        tries += 1;
        assert!(tries <= 40, "no connection was ever moved");
        let mut d = s.device(3);
        if !d.established() {
            break;
        }
    }
    assert!(pongs(&mut bystander));
    let st = still_serving(&s, one_per_shard(10));
    assert_eq!(st.total.panics_adopt, 1);
    assert!(st.total.sessions_moved_in >= 1);
}

#[test]
fn a_panic_handling_a_mesh_message_closes_the_device_it_was_for_and_answers_the_send() {
    // One victim homed on each shard: the one on the agent's other shard is reached through
    // the mesh (the agent's shard is known only once it attached).
    let victims = one_per_shard(1);
    let spec = format!("mesh:{},mesh:{}", victims[0], victims[1]);
    let s = server(&spec, &[]);
    let (mut agent, shard) = attach(&s);
    let victim = victims[1 - shard];
    let bystander = (victim + 1..)
        .find(|&i| home_shard(DeviceId(i), 2) != shard && !victims.contains(&i))
        .unwrap();
    let mut v = s.device(victim);
    let mut b = s.device(bystander);
    assert!(v.established() && b.established());
    agent.send(&send(victim, 1));
    assert_eq!(send_result(&mut agent, 1), Some(SendStatus::Offline));
    assert!(v.wait_closed(T), "the device the message was for is closed");
    agent.send(&send(bystander, 2));
    assert!(b.pump_until(T, |ev| {
        ev.iter().any(|e| matches!(e, DeviceEvent::Message { .. }))
    }));
    assert_eq!(send_result(&mut agent, 2), Some(SendStatus::Delivered));
    let st = still_serving(&s, one_per_shard(20));
    assert_eq!(st.total.panics_mesh, 1);
    assert_eq!(st.total.panics_caught, 1);
}

#[test]
fn a_panic_handling_an_agent_frame_closes_that_agent_link_only() {
    let s = server("agent:3", &[]);
    let mut device = s.device(3);
    assert!(device.established());
    let (mut bad, _) = attach(&s);
    let (mut good, _) = attach(&s);
    bad.send(&send(3, 1));
    assert!(
        bad.recv_until(T, |m| matches!(
            m,
            AgentMessage::Error {
                code: ErrorCode::Internal,
                ..
            }
        ))
        .is_some(),
        "the agent hears why"
    );
    let end = Instant::now() + T;
    while bad.recv(Duration::from_millis(200)).is_some() {
        assert!(Instant::now() < end, "the link is closed");
    }
    // The device and the other agent carry on (a `Deliver` to it is not a `Send`).
    assert!(pongs(&mut device));
    device
        .session
        .send(Instant::now(), Bytes::from_static(b"up"), Bytes::new())
        .unwrap();
    device.pump_until(Duration::from_millis(100), |_| false);
    assert!(
        good.recv_until(T, |m| matches!(m, AgentMessage::Deliver { .. }))
            .is_some()
    );
    let st = still_serving(&s, one_per_shard(10));
    assert_eq!(st.total.panics_agent, 1);
    assert_eq!(st.total.agents_attached, 1);
}

#[test]
fn a_panic_in_the_rollout_closes_that_devices_connection_only() {
    let s = server("rollout:3", &[]);
    let mut victim = s.device(3);
    let mut other = s.device(4);
    assert!(victim.established() && other.established());
    let report = s.deploy("default", b"new code, version 1");
    assert!(report.version >= 1, "{report:?}");
    assert!(victim.wait_closed(T), "the victim is closed");
    assert!(
        other.pump_until(T, |ev| ev
            .iter()
            .any(|e| matches!(e, DeviceEvent::CodeOffer { .. }))),
        "the rest of the group is offered the code"
    );
    let st = still_serving(&s, one_per_shard(10));
    assert_eq!(st.total.panics_rollout, 1);
}
