//! A panic while handling one connection is caught, counted, and closes that connection only
//! (the debug-build hook `TETHER_TEST_PANIC=drive:1` panics on device 1's message).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Server;

#[test]
fn a_panic_closes_only_its_connection() {
    let s = Server::start_env(
        10,
        "default",
        &["--shards", "1"],
        &[("TETHER_TEST_PANIC", "drive:1")],
    );
    let mut victim = s.device(1);
    let mut bystander = s.device(2);
    assert!(victim.established() && bystander.established());
    victim
        .session
        .send(
            Instant::now(),
            Bytes::from_static(b"any topic"),
            Bytes::new(),
        )
        .unwrap();
    assert!(
        victim.wait_closed(Duration::from_secs(5)),
        "the panicking connection is closed"
    );
    // The shard lives on: the bystander still talks, and new devices still connect.
    bystander.session.ping(Instant::now());
    assert!(bystander.pump_until(Duration::from_secs(3), |ev| {
        ev.iter()
            .any(|e| matches!(e, tether_protocol::device::DeviceEvent::Pong { .. }))
    }));
    let mut late = s.device(3);
    assert!(late.established());
    let st = s.stats();
    assert_eq!(st.total.panics_caught, 1);
    assert_eq!(st.total.connections_open, 2);
}
