//! Devices connect over real TLS and authenticate; bad proofs and unknown devices are refused
//! with a clear error and counted.

mod common;

use std::time::Duration;

use common::{Device, Server};
use tether_protocol::auth::derive_device_key;
use tether_protocol::device::{DeviceConfig, DeviceEvent};
use tether_protocol::message::ErrorCode;
use tether_protocol::{CloseReason, DeviceId};

#[test]
fn connect_and_authenticate() {
    let s = Server::start(10, &[]);
    let mut d = s.device(3);
    assert!(d.established(), "events: {:?}", d.events);
    let st = s.stats();
    assert_eq!(st.total.handshakes_full, 1);
    assert_eq!(st.total.auth_failures, 0);
}

#[test]
fn bad_proof_is_refused_and_counted() {
    let s = Server::start(10, &[]);
    let wrong = derive_device_key(b"not the server secret", DeviceId(3));
    let mut d = Device::connect(&s, DeviceConfig::new(DeviceId(3), wrong));
    let refused = d.pump_until(Duration::from_secs(5), |ev| {
        ev.contains(&DeviceEvent::Closed(CloseReason::PeerError(
            ErrorCode::AuthFailed,
        )))
    });
    assert!(refused, "events: {:?}", d.events);
    assert!(d.wait_closed(Duration::from_secs(5)));
    let st = s.stats();
    assert_eq!(st.total.auth_failures, 1);
    assert_eq!(
        st.total
            .errors_of(tether_core::metrics::ErrorKind::BadProof),
        1
    );
}

#[test]
fn unknown_device_is_refused() {
    let s = Server::start(10, &[]);
    let key = derive_device_key(b"x", DeviceId(999));
    let mut d = Device::connect(&s, DeviceConfig::new(DeviceId(999), key));
    assert!(d.pump_until(Duration::from_secs(5), |ev| {
        ev.contains(&DeviceEvent::Closed(CloseReason::PeerError(
            ErrorCode::AuthFailed,
        )))
    }));
}

#[test]
fn second_connection_of_a_device_replaces_the_first() {
    let s = Server::start(10, &[]);
    let mut a = s.device(5);
    assert!(a.established());
    let mut b = s.device(5);
    assert!(b.established());
    assert!(
        a.pump_until(Duration::from_secs(5), |ev| ev.iter().any(|e| matches!(
            e,
            DeviceEvent::Goodbye {
                reason: tether_protocol::message::GoodbyeReason::Replaced,
                ..
            }
        )))
    );
    assert_eq!(s.stats().total.sessions_replaced, 1);
}
