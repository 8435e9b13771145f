//! Messages both ways between a device and an agent (plain TCP and TLS agent link), end to
//! end acknowledged, plus presence and the agent token check.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Agent, Server};
use tether_protocol::device::DeviceEvent;
use tether_protocol::message::{ErrorCode, SendStatus};
use tether_protocol::{AgentMessage, DeviceId};

const T: Duration = Duration::from_secs(5);

#[test]
fn messages_flow_both_ways_through_an_agent() {
    messages_flow_both_ways(&[]);
}

/// The same over the agent link's TLS (`--agent-tls`; the harness's agent is rustls' client).
#[test]
fn messages_flow_both_ways_through_a_tls_agent() {
    messages_flow_both_ways(&["--agent-tls"]);
}

fn messages_flow_both_ways(extra: &[&str]) {
    let s = Server::start(20, extra);
    let mut agent = Agent::attach(&s);
    assert!(matches!(
        agent.recv(T),
        Some(AgentMessage::AgentWelcome { .. })
    ));
    let mut d = s.device(7);
    assert!(d.established());
    assert!(
        agent
            .recv_until(T, |m| *m
                == AgentMessage::Presence {
                    device: DeviceId(7),
                    online: true
                })
            .is_some()
    );

    // Device → agent: delivered, and acked to the device only after the agent's DeliverAck.
    let seq = d
        .session
        .send(
            std::time::Instant::now(),
            Bytes::from_static(b"temp"),
            Bytes::from_static(b"21.5"),
        )
        .unwrap();
    d.pump_until(Duration::from_millis(100), |_| false); // transmit it
    let got = agent
        .recv_until(T, |m| matches!(m, AgentMessage::Deliver { .. }))
        .unwrap();
    assert_eq!(
        got,
        AgentMessage::Deliver {
            device: DeviceId(7),
            seq,
            topic: Bytes::from_static(b"temp"),
            payload: Bytes::from_static(b"21.5")
        }
    );
    assert!(!d.pump_until(Duration::from_millis(300), |ev| {
        ev.contains(&DeviceEvent::Acked { seq })
    }));
    agent.send(&AgentMessage::DeliverAck {
        device: DeviceId(7),
        seq,
    });
    assert!(d.pump_until(T, |ev| ev.contains(&DeviceEvent::Acked { seq })));

    // Agent → device: delivered, and the agent hears `Delivered` once the device acked.
    agent.send(&AgentMessage::Send {
        device: DeviceId(7),
        tag: 77,
        topic: Bytes::from_static(b"cmd"),
        payload: Bytes::from_static(b"reboot"),
    });
    assert!(d.pump_until(T, |ev| ev.iter().any(
        |e| matches!(e, DeviceEvent::Message { payload, .. } if &payload[..] == b"reboot")
    )));
    assert_eq!(
        agent.recv_until(T, |m| matches!(m, AgentMessage::SendResult { .. })),
        Some(AgentMessage::SendResult {
            tag: 77,
            status: SendStatus::Delivered
        })
    );

    // To an offline or unknown device: a clear status, nothing silently dropped.
    agent.send(&AgentMessage::Send {
        device: DeviceId(8),
        tag: 1,
        topic: Bytes::new(),
        payload: Bytes::new(),
    });
    assert_eq!(
        agent.recv_until(T, |m| matches!(m, AgentMessage::SendResult { .. })),
        Some(AgentMessage::SendResult {
            tag: 1,
            status: SendStatus::Offline
        })
    );
    agent.send(&AgentMessage::Send {
        device: DeviceId(5000),
        tag: 2,
        topic: Bytes::new(),
        payload: Bytes::new(),
    });
    assert_eq!(
        agent.recv_until(T, |m| matches!(m, AgentMessage::SendResult { .. })),
        Some(AgentMessage::SendResult {
            tag: 2,
            status: SendStatus::UnknownDevice
        })
    );
}

#[test]
fn device_messages_wait_for_an_agent_and_are_resent() {
    let s = Server::start(20, &[]);
    let mut d = s.device(9);
    assert!(d.established());
    let seq = d
        .session
        .send(
            std::time::Instant::now(),
            Bytes::from_static(b"t"),
            Bytes::from_static(b"x"),
        )
        .unwrap();
    // No agent: not acknowledged (so the device keeps it and resends it later).
    assert!(!d.pump_until(Duration::from_millis(500), |ev| {
        ev.contains(&DeviceEvent::Acked { seq })
    }));
    assert_eq!(d.session.unacked(), 1);
    assert!(s.stats().total.undeliverable >= 1);
}

#[test]
fn wrong_agent_token_is_refused() {
    let s = Server::start(1, &[]);
    let mut agent = Agent::attach_with(&s, b"guess");
    assert!(matches!(
        agent.recv(T),
        Some(AgentMessage::Error {
            code: ErrorCode::BadToken,
            ..
        })
    ));
}
