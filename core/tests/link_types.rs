//! Each link decodes only its own message types: a well-formed agent-link frame (`Deploy`) sent
//! by an authenticated device and a well-formed device-link frame (`Hello`) sent by an attached
//! agent are refused with `Error{malformed frame}` naming the wrong link, the connection is
//! closed, and nothing else changes (no code deployed, other devices and the agent link go on).

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{Agent, Server};
use tether_protocol::auth::Proof;
use tether_protocol::device::DeviceEvent;
use tether_protocol::message::{ErrorCode, Hello};
use tether_protocol::{
    AgentMessage, CloseReason, CodeVersion, DeviceId, DeviceMessage, PROTOCOL_VERSION,
};

const T: Duration = Duration::from_secs(5);

#[test]
fn a_deploy_from_a_device_is_refused_and_deploys_nothing() {
    let s = Server::start(4, &[]);
    let mut agent = Agent::attach_welcomed(&s);
    let mut bad = s.device(1);
    assert!(bad.established());
    let before: Vec<u64> = s.rollout().groups.iter().map(|g| g.version).collect();

    let mut b = BytesMut::new();
    AgentMessage::Deploy {
        group: Bytes::from_static(b"default"),
        blob: Bytes::from_static(b"code from a device"),
    }
    .encode(&mut b)
    .unwrap();
    bad.write_raw(&b);
    assert!(bad.wait_closed(T), "the server kept the connection open");
    assert!(
        bad.events.iter().any(|e| matches!(
            e,
            DeviceEvent::Closed(CloseReason::PeerError(ErrorCode::MalformedFrame))
        )),
        "no malformed-frame error before the close: {:?}",
        bad.events
    );
    let after: Vec<u64> = s.rollout().groups.iter().map(|g| g.version).collect();
    assert_eq!(before, after, "a device's frame deployed code");

    // Another device and the agent link go on: a message reaches the agent.
    let mut good = s.device(2);
    assert!(good.established());
    let seq = good
        .session
        .send(
            std::time::Instant::now(),
            Bytes::from_static(b"t"),
            Bytes::from_static(b"still here"),
        )
        .unwrap();
    good.pump_until(Duration::from_millis(200), |_| false);
    let got = agent.recv_until(T, |m| matches!(m, AgentMessage::Deliver { .. }));
    assert!(
        matches!(got, Some(AgentMessage::Deliver { device: DeviceId(2), seq: s, .. }) if s == seq),
        "{got:?}"
    );
}

#[test]
fn a_hello_from_an_agent_is_refused_and_closes_only_that_link() {
    let s = Server::start(2, &[]);
    let mut bad = Agent::attach_welcomed(&s);
    let mut good = Agent::attach_welcomed(&s);

    let mut b = BytesMut::new();
    DeviceMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        device: DeviceId(1),
        proof: Proof([0; 32]),
        code_version: CodeVersion(0),
        fw_version: Bytes::new(),
        resume: None,
    })
    .encode(&mut b)
    .unwrap();
    bad.write_raw(&b);
    match bad.recv_until(T, |m| matches!(m, AgentMessage::Error { .. })) {
        Some(AgentMessage::Error { code, message }) => {
            assert_eq!(code, ErrorCode::MalformedFrame);
            let text = String::from_utf8_lossy(&message);
            assert!(text.contains("agent link"), "{text}");
        }
        other => panic!("expected Error{{malformed frame}}, got {other:?}"),
    }
    // That link is closed: nothing more arrives on it.
    assert_eq!(bad.recv(Duration::from_millis(500)), None);

    // The other agent still works: a ping is answered.
    good.send(&AgentMessage::Ping { id: 9 });
    assert_eq!(
        good.recv_until(T, |m| matches!(m, AgentMessage::Pong { .. })),
        Some(AgentMessage::Pong { id: 9 })
    );
}
