//! The cross-shard mesh keeps order and pushes back: an agent's sends to a device on the other
//! shard, through a mesh of capacity 2, arrive at the device in the order sent, none lost, and
//! the agent's socket was left unread while the mesh was full (counted).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Agent, Server};
use tether_core::shard::mesh::home_shard;
use tether_protocol::device::DeviceEvent;
use tether_protocol::message::SendStatus;
use tether_protocol::{DeviceId, Message};

const T: Duration = Duration::from_secs(20);
/// Sends per burst: under the device's 64 unacknowledged messages, so none is `queue full`.
const BURST: u64 = 60;
const BURSTS: u64 = 10;

#[test]
fn agent_sends_through_a_full_mesh_arrive_in_order_with_push_back() {
    let s = Server::start(64, &["--shards", "2", "--mesh-capacity", "2"]);
    let mut agent = Agent::attach(&s);
    let Some(Message::AgentWelcome { agent: id, .. }) = agent.recv(T) else {
        panic!("no AgentWelcome");
    };
    // A device whose home is the other shard: every send crosses the mesh.
    let here = (id >> 24) as usize;
    let dev = (1..=64)
        .find(|&d| home_shard(DeviceId(d), 2) != here)
        .unwrap();
    let mut d = s.device(dev);
    assert!(d.established());
    assert!(
        agent
            .recv_until(T, |m| *m
                == Message::Presence {
                    device: DeviceId(dev),
                    online: true
                })
            .is_some()
    );
    let total = BURST * BURSTS;
    let device = std::thread::spawn(move || {
        let got = |ev: &[DeviceEvent]| {
            ev.iter()
                .filter(|e| matches!(e, DeviceEvent::Message { .. }))
                .count() as u64
        };
        d.pump_until(Duration::from_secs(60), |ev| got(ev) >= total);
        d.events
            .iter()
            .filter_map(|e| match e {
                DeviceEvent::Message { payload, .. } => {
                    Some(u64::from_be_bytes(payload[..].try_into().unwrap()))
                }
                _ => None,
            })
            .collect::<Vec<u64>>()
    });
    for b in 0..BURSTS {
        let sends: Vec<Message> = (b * BURST..(b + 1) * BURST)
            .map(|tag| Message::Send {
                device: DeviceId(dev),
                tag,
                topic: Bytes::from_static(b"seq"),
                payload: Bytes::copy_from_slice(&tag.to_be_bytes()),
            })
            .collect();
        agent.send_all(&sends);
        // Every send of the burst is answered, delivered (the device acks as it reads).
        let mut answered = 0;
        let end = Instant::now() + T;
        while answered < BURST && Instant::now() < end {
            if let Some(Message::SendResult { tag, status }) =
                agent.recv(Duration::from_millis(200))
            {
                assert_eq!(status, SendStatus::Delivered, "send {tag}");
                answered += 1;
            }
        }
        assert_eq!(answered, BURST, "burst {b}: answers missing");
    }
    let seen = device.join().unwrap();
    let want: Vec<u64> = (0..total).collect();
    assert_eq!(seen.len(), want.len(), "lost or duplicated sends");
    assert_eq!(seen, want, "sends overtook each other");
    let m = s.stats().total;
    assert!(
        m.pushback_agent_reads >= 1,
        "the full mesh never pushed back: {m:?}"
    );
}
