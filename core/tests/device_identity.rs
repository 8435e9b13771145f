//! Trust boundary at `Hello`: a connection affects another session only after its proof
//! verifies. A stranger naming a live device's id is refused like an unknown device and the
//! live session never notices; a verified newcomer replaces the old session and inherits
//! everything it held; agents see presence change exactly once per real change. Each on one
//! shard and across two (connections land on either shard and move to the device's home).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Agent, Device, Server};
use tether_protocol::auth::derive_device_key;
use tether_protocol::device::{DeviceConfig, DeviceEvent};
use tether_protocol::message::{ErrorCode, GoodbyeReason, SendStatus};
use tether_protocol::{AgentMessage, CloseReason, DeviceId};

const T: Duration = Duration::from_secs(5);
const ID: u64 = 5;

fn attached_agent(s: &Server) -> Agent {
    let mut agent = Agent::attach(s);
    assert!(matches!(
        agent.recv(T),
        Some(AgentMessage::AgentWelcome { .. })
    ));
    agent
}

/// Every frame the agent receives within `d`.
fn drain(agent: &mut Agent, d: Duration) -> Vec<AgentMessage> {
    let end = Instant::now() + d;
    let mut got = Vec::new();
    while Instant::now() < end {
        if let Some(m) = agent.recv(Duration::from_millis(50)) {
            got.push(m);
        }
    }
    got
}

fn presences(ms: &[AgentMessage]) -> Vec<bool> {
    ms.iter()
        .filter_map(|m| match m {
            AgentMessage::Presence { device, online } if *device == DeviceId(ID) => Some(*online),
            _ => None,
        })
        .collect()
}

fn refused(d: &mut Device) -> bool {
    d.pump_until(T, |ev| {
        ev.contains(&DeviceEvent::Closed(CloseReason::PeerError(
            ErrorCode::AuthFailed,
        )))
    })
}

fn goodbye_replaced(ev: &[DeviceEvent]) -> bool {
    ev.iter().any(|e| {
        matches!(
            e,
            DeviceEvent::Goodbye {
                reason: GoodbyeReason::Replaced,
                ..
            }
        )
    })
}

fn impostor_does_not_disturb(shards: &str) {
    let s = Server::start(10, &["--shards", shards]);
    let mut agent = attached_agent(&s);
    let mut live = s.device(ID);
    assert!(live.established(), "{:?}", live.events);
    assert_eq!(
        presences(&drain(&mut agent, Duration::from_millis(300))),
        [true]
    );

    // Several strangers claim the live device's id with proofs from the wrong key.
    for _ in 0..3 {
        let wrong = derive_device_key(b"not the server secret", DeviceId(ID));
        let mut impostor = Device::connect(&s, DeviceConfig::new(DeviceId(ID), wrong));
        assert!(refused(&mut impostor), "events: {:?}", impostor.events);
        assert!(
            impostor.wait_closed(T),
            "the server did not close the refused connection: {:?}",
            s.stats().total
        );
    }

    // The live session is untouched: no goodbye, and an agent's send still reaches it.
    agent.send(&AgentMessage::Send {
        device: DeviceId(ID),
        tag: 77,
        topic: Bytes::from_static(b"cmd"),
        payload: Bytes::from_static(b"on"),
    });
    assert!(
        live.pump_until(T, |ev| ev
            .iter()
            .any(|e| matches!(e, DeviceEvent::Message { .. }))),
        "live device lost its session: {:?}",
        live.events
    );
    assert!(!goodbye_replaced(&live.events), "{:?}", live.events);
    let after = drain(&mut agent, Duration::from_millis(500));
    assert!(
        after.contains(&AgentMessage::SendResult {
            tag: 77,
            status: SendStatus::Delivered
        }),
        "{after:?}"
    );
    assert!(presences(&after).is_empty(), "presence changed: {after:?}");
    let st = s.stats();
    assert_eq!(st.total.sessions_replaced, 0);
    assert_eq!(st.total.auth_failures, 3);
    assert_eq!(
        st.total
            .errors_of(tether_core::metrics::ErrorKind::BadProof),
        3
    );
}

#[test]
fn a_wrong_proof_for_a_live_device_leaves_it_alone_one_shard() {
    impostor_does_not_disturb("1");
}

#[test]
fn a_wrong_proof_for_a_live_device_leaves_it_alone_two_shards() {
    impostor_does_not_disturb("2");
}

fn verified_newcomer_inherits(shards: &str) {
    let s = Server::start(10, &["--shards", shards]);
    let mut agent = attached_agent(&s);
    let mut d = s.device(ID);
    assert!(d.established(), "{:?}", d.events);

    // Device → agent: delivered to the agent, not yet acknowledged by it.
    let seq = d
        .session
        .send(
            Instant::now(),
            Bytes::from_static(b"up"),
            Bytes::from_static(b"1"),
        )
        .unwrap();
    d.pump_until(Duration::from_millis(200), |_| false);
    let before = drain(&mut agent, Duration::from_millis(300));
    assert!(
        before
            .iter()
            .any(|m| matches!(m, AgentMessage::Deliver { seq: s, .. } if *s == seq)),
        "{before:?}"
    );
    assert_eq!(presences(&before), [true]);

    // Agent → device: sent while the device stops reading, so it stays unacknowledged.
    agent.send(&AgentMessage::Send {
        device: DeviceId(ID),
        tag: 9,
        topic: Bytes::from_static(b"down"),
        payload: Bytes::from_static(b"2"),
    });
    std::thread::sleep(Duration::from_millis(200));

    // The device comes back on a new socket while the server still holds the old one.
    let _old = d.reconnect_abandoning(&s);
    assert!(d.established(), "{:?}", d.events);
    // The new connection inherits the unacknowledged send: resent, acked, reported once.
    assert!(
        d.pump_until(T, |ev| ev.iter().any(|e| matches!(
            e,
            DeviceEvent::Message { payload, .. } if &payload[..] == b"2"
        ))),
        "{:?}",
        d.events
    );
    d.pump_until(Duration::from_millis(200), |_| false);
    // And the agent's late DeliverAck for the old connection's message reaches the new one.
    agent.send(&AgentMessage::DeliverAck {
        device: DeviceId(ID),
        seq,
    });
    assert!(
        d.pump_until(T, |ev| ev.contains(&DeviceEvent::Acked { seq })),
        "{:?}",
        d.events
    );
    let after = drain(&mut agent, Duration::from_millis(500));
    assert!(
        after.contains(&AgentMessage::SendResult {
            tag: 9,
            status: SendStatus::Delivered
        }),
        "{after:?}"
    );
    assert!(
        presences(&after).is_empty(),
        "a replacement is no presence change: {after:?}"
    );
    let st = s.stats();
    assert_eq!(st.total.sessions_replaced, 1);
    assert_eq!(st.total.auth_failures, 0);
}

#[test]
fn a_verified_newcomer_replaces_and_inherits_one_shard() {
    verified_newcomer_inherits("1");
}

#[test]
fn a_verified_newcomer_replaces_and_inherits_two_shards() {
    verified_newcomer_inherits("2");
}

#[test]
fn unknown_device_and_bad_proof_get_the_same_answer() {
    let s = Server::start(10, &[]);
    let wrong = derive_device_key(b"not the server secret", DeviceId(3));
    let mut bad = Device::connect(&s, DeviceConfig::new(DeviceId(3), wrong));
    let stranger = derive_device_key(b"x", DeviceId(999));
    let mut unknown = Device::connect(&s, DeviceConfig::new(DeviceId(999), stranger));
    assert!(refused(&mut bad), "{:?}", bad.events);
    assert!(refused(&mut unknown), "{:?}", unknown.events);
    // Counted apart on the server.
    let st = s.stats();
    use tether_core::metrics::ErrorKind;
    assert_eq!(st.total.errors_of(ErrorKind::BadProof), 1);
    assert_eq!(st.total.errors_of(ErrorKind::UnknownDevice), 1);
    assert_eq!(st.total.auth_failures, 2);
}

/// A session the server closes (here for a malformed frame) releases its device: agents see it
/// offline, and its slot, reused by another device, is never mistaken for its session (before
/// the fix, device 7's reconnect replaced device 8's session through the stale slot).
#[test]
fn a_session_closed_by_the_server_releases_its_device() {
    let s = Server::start(10, &["--shards", "1"]);
    let mut agent = attached_agent(&s);
    let mut d7 = s.device(7);
    assert!(d7.established(), "{:?}", d7.events);
    // An empty frame (length 0) is malformed: the server closes with an Error.
    d7.write_raw(&[0, 0, 0, 0]);
    assert!(d7.wait_closed(T));
    let seen = drain(&mut agent, Duration::from_millis(500));
    assert!(
        seen.contains(&AgentMessage::Presence {
            device: DeviceId(7),
            online: false
        }),
        "{seen:?}"
    );
    let mut d8 = s.device(8);
    assert!(d8.established(), "{:?}", d8.events);
    let mut again = s.device(7);
    assert!(again.established(), "{:?}", again.events);
    assert!(
        !d8.pump_until(Duration::from_millis(500), |ev| ev
            .iter()
            .any(|e| matches!(e, DeviceEvent::Goodbye { .. }))),
        "device 8 was disturbed by device 7: {:?}",
        d8.events
    );
    assert_eq!(s.stats().total.sessions_replaced, 0);
}
