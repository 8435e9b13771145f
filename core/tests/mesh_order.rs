//! The cross-shard mesh keeps order and pushes back: an agent's sends to a device on the other
//! shard, through a mesh of capacity 2, arrive at the device in the order sent, none lost, and
//! the agent's socket was left unread while the mesh was full (counted).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Agent, Server};
use tether_core::placement::home_shard;
use tether_protocol::device::DeviceEvent;
use tether_protocol::message::SendStatus;
use tether_protocol::{AgentMessage, DeviceId};

const T: Duration = Duration::from_secs(20);
/// Sends per burst: under the device's 64 unacknowledged messages, so none is `queue full`.
const BURST: u64 = 60;
const BURSTS: u64 = 10;

#[test]
fn agent_sends_through_a_full_mesh_arrive_in_order_with_push_back() {
    let s = Server::start(64, &["--shards", "2", "--mesh-capacity", "2"]);
    let mut agent = Agent::attach(&s);
    let Some(AgentMessage::AgentWelcome { agent: id, .. }) = agent.recv(T) else {
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
                == AgentMessage::Presence {
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
        let sends: Vec<AgentMessage> = (b * BURST..(b + 1) * BURST)
            .map(|tag| AgentMessage::Send {
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
            if let Some(AgentMessage::SendResult { tag, status }) =
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

/// Device messages for an agent whose queue is full wait (the device's socket is not read,
/// counted) instead of being dropped: a slow agent gets every one, in order, once it reads.
#[test]
fn device_messages_for_a_full_agent_queue_wait_and_none_is_lost() {
    // 8 MiB in all: more than the kernel's socket buffers hold towards an agent not reading.
    const N: u64 = 2000;
    let s = Server::start(
        64,
        &[
            "--shards",
            "2",
            "--agent-queue-limit",
            "4096",
            "--mesh-capacity",
            "8",
        ],
    );
    // An agent that reads nothing for a while, through a small window.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.agents.into()).unwrap();
    let mut agent = Agent::attach_on(&s, std::net::TcpStream::from(sock));
    let end = Instant::now() + T;
    while s.stats().total.agents_attached < 1 {
        assert!(Instant::now() < end, "agent not attached");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cfg = s.config(5);
    cfg.outbox_limit = N as u32;
    cfg.resend_after = Duration::from_secs(120);
    let mut d = common::Device::connect(&s, cfg);
    assert!(d.established());
    let payload = Bytes::from(vec![7u8; 4096]);
    for _ in 0..N {
        d.session
            .send(Instant::now(), Bytes::from_static(b"t"), payload.clone())
            .unwrap();
    }
    // The device writes what the server reads; the agent reads nothing yet.
    let device = std::thread::spawn(move || {
        d.pump_until(Duration::from_secs(60), |ev| {
            ev.iter()
                .filter(|e| matches!(e, DeviceEvent::Acked { .. }))
                .count() as u64
                >= N
        });
        d
    });
    // Until the server pushed back, or took every message (as it did when it dropped what
    // the agent's queue could not hold).
    let end = Instant::now() + T;
    loop {
        let m = s.stats().total;
        if m.pushback_device_reads > 0 || m.msgs_in >= N {
            break;
        }
        assert!(
            Instant::now() < end,
            "the device's messages went nowhere: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Now read: every message, in order, each acknowledged.
    let mut seqs = Vec::new();
    let end = Instant::now() + T;
    while (seqs.len() as u64) < N && Instant::now() < end {
        if let Some(AgentMessage::Deliver { device, seq, .. }) =
            agent.recv(Duration::from_millis(200))
        {
            seqs.push(seq.0);
            agent.send(&AgentMessage::DeliverAck { device, seq });
        }
    }
    let want: Vec<u64> = (1..=N).collect();
    assert_eq!(seqs, want, "device messages lost or out of order");
    let d = device.join().unwrap();
    assert_eq!(
        d.session.unacked(),
        0,
        "the device still holds unacked messages"
    );
    let m = s.stats().total;
    assert!(m.pushback_device_reads >= 1, "no push-back counted: {m:?}");
    assert_eq!(m.agent_overflow, 0, "frames dropped: {m:?}");
}
