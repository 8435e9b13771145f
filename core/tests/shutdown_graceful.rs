//! SIGTERM: the server says goodbye to every device (with a spread retry_after) and exits
//! within its grace period.

mod common;

use std::time::Duration;

use common::Server;
use tether_protocol::device::DeviceEvent;
use tether_protocol::message::GoodbyeReason;

#[test]
fn sigterm_sends_goodbye_and_exits_in_time() {
    let mut s = Server::start(10, &["--shutdown-grace-s", "3"]);
    let mut devices: Vec<_> = (1..=5).map(|i| s.device(i)).collect();
    for d in &mut devices {
        assert!(d.established());
    }
    let status = s
        .terminate(Duration::from_secs(6))
        .expect("exited within the bound");
    assert!(status.success());
    for d in &mut devices {
        let got = d.pump_until(Duration::from_secs(2), |ev| {
            ev.iter().any(|e| matches!(e, DeviceEvent::Goodbye { reason: GoodbyeReason::Shutdown, retry_after, .. } if *retry_after >= Duration::from_secs(1)))
        });
        assert!(got, "{:?}", d.events);
    }
}
