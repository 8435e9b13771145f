//! `--tls-state detached` end to end: devices authenticate, talk to an agent, move to their
//! home shard with their detached record state, and a peer KeyUpdate is honoured with
//! `--tls-key-updates` or ends the connection cleanly without it.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Agent, Server};
use tether_core::placement::home_shard;
use tether_protocol::device::DeviceEvent;
use tether_protocol::{AgentMessage, DeviceId};

const T: Duration = Duration::from_secs(5);

#[test]
fn detached_devices_authenticate_move_home_and_exchange_messages() {
    let s = Server::start(16, &["--tls-state", "detached", "--shards", "2"]);
    let mut agent = Agent::attach(&s);
    assert!(matches!(
        agent.recv(T),
        Some(AgentMessage::AgentWelcome { .. })
    ));
    let mut devices: Vec<_> = (1..=16).map(|i| s.device(i)).collect();
    for d in &mut devices {
        assert!(d.established(), "{:?}", d.events);
    }
    let st = s.stats();
    assert!(
        st.total.sessions_moved_in > 0,
        "some sessions moved between shards"
    );
    for (k, shard) in st.shards.iter().enumerate() {
        let want = (1..=16)
            .filter(|&i| home_shard(DeviceId(i), 2) == k)
            .count() as u64;
        assert_eq!(shard.connections_open, want, "shard {k}");
    }
    // Many records both ways on every connection, after the move.
    for round in 0..10u8 {
        for d in devices.iter_mut() {
            d.session
                .send(
                    Instant::now(),
                    Bytes::from_static(b"t"),
                    Bytes::from(vec![round; 100]),
                )
                .unwrap();
            d.pump_until(Duration::from_millis(5), |_| false);
        }
    }
    let mut delivered = 0;
    while let Some(m) = agent.recv_until(T, |m| matches!(m, AgentMessage::Deliver { .. })) {
        if let AgentMessage::Deliver { device, seq, .. } = m {
            agent.send(&AgentMessage::DeliverAck { device, seq });
        }
        delivered += 1;
        if delivered == 16 * 10 {
            break;
        }
    }
    assert_eq!(delivered, 160);
    agent.send(&AgentMessage::Send {
        device: DeviceId(3),
        tag: 9,
        topic: Bytes::from_static(b"cmd"),
        payload: Bytes::from_static(b"go"),
    });
    assert!(
        devices[2].pump_until(T, |ev| ev.iter().any(
            |e| matches!(e, DeviceEvent::Message { payload, .. } if &payload[..] == b"go")
        ))
    );
    assert_eq!(st.total.errors_of(tether_core::metrics::ErrorKind::Tls), 0);
}

fn key_update(s: &Server) -> common::Device {
    let mut d = s.device(1);
    assert!(d.established());
    d.tls.conn.refresh_traffic_keys().unwrap();
    d.session.ping(Instant::now());
    d
}

#[test]
fn peer_key_update_is_honoured_with_tls_key_updates() {
    let s = Server::start(2, &["--tls-state", "detached", "--tls-key-updates"]);
    let mut d = key_update(&s);
    assert!(d.pump_until(T, |ev| {
        ev.iter().any(|e| matches!(e, DeviceEvent::Pong { .. }))
    }));
    // And the connection keeps working under the new keys, both ways.
    d.session.ping(Instant::now());
    assert!(d.pump_until(T, |ev| {
        ev.iter()
            .filter(|e| matches!(e, DeviceEvent::Pong { .. }))
            .count()
            >= 2
    }));
}

#[test]
fn peer_key_update_without_a_key_schedule_closes_cleanly() {
    let s = Server::start(2, &["--tls-state", "detached"]);
    let mut d = key_update(&s);
    assert!(d.wait_closed(T), "the server closes the connection");
    assert_eq!(
        s.stats()
            .total
            .errors_of(tether_core::metrics::ErrorKind::Tls),
        1
    );
    // The device comes back at once.
    let mut again = s.device(1);
    assert!(again.established());
}
