//! A device that stops talking is closed at the idle deadline (2.5 heartbeats); one that keeps
//! its heartbeats stays.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use tether_protocol::CloseReason;
use tether_protocol::device::DeviceEvent;
use tether_protocol::message::ErrorCode;

#[test]
fn silent_device_is_closed_at_the_idle_deadline() {
    let s = Server::start(5, &["--heartbeat-s", "1"]);
    let mut d = s.device(1);
    assert!(d.established());
    // Read without ever transmitting: the device's heartbeats never leave.
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let mut closed_by_server = false;
    while start.elapsed() < Duration::from_secs(8) {
        use std::io::Read;
        match d.tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => d.session.handle_bytes(Instant::now(), &buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
        while let Some(e) = d.session.poll_event() {
            if e == DeviceEvent::Closed(CloseReason::PeerError(ErrorCode::Timeout)) {
                closed_by_server = true;
            }
        }
    }
    let waited = start.elapsed();
    assert!(closed_by_server, "no timeout error from the server");
    assert!(
        waited >= Duration::from_secs(2),
        "closed too early: {waited:?}"
    );
    assert_eq!(s.stats().total.heartbeat_timeouts, 1);
}

#[test]
fn heartbeating_device_stays_connected() {
    let s = Server::start(5, &["--heartbeat-s", "1"]);
    let mut d = s.device(2);
    assert!(d.established());
    assert!(!d.pump_until(Duration::from_secs(4), |ev| {
        ev.iter().any(|e| matches!(e, DeviceEvent::Closed(_)))
    }));
    assert!(
        d.events
            .iter()
            .filter(|e| matches!(e, DeviceEvent::Pong { .. }))
            .count()
            >= 2
    );
    assert_eq!(s.stats().total.heartbeat_timeouts, 0);
}
