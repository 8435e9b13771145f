//! What a stranger may cost the server before its proof verifies: the Hello deadline, shedding
//! the oldest stalled connection for a newcomer, per-source turns and failed-proof budgets, and
//! flap damping for a device that keeps replacing itself. Sources are distinct loopback
//! addresses (127.0.0.x), as separate hosts would be.

mod common;

use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use common::{Device, Server, tcp_from};
use tether_core::metrics::ErrorKind;
use tether_protocol::auth::derive_device_key;
use tether_protocol::device::{DeviceConfig, DeviceEvent};
use tether_protocol::message::{ErrorCode, GoodbyeReason};
use tether_protocol::{CloseReason, DeviceId};

const T: Duration = Duration::from_secs(5);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// Waits until the server closes a raw connection (EOF or reset).
fn closed_by_server(mut s: TcpStream, within: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // the server's TLS alert or nothing
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

fn wait_for(s: &Server, mut f: impl FnMut(&tether_core::metrics::ShardMetrics) -> bool) -> bool {
    let end = std::time::Instant::now() + T;
    while std::time::Instant::now() < end {
        if f(&s.stats().total) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn a_silent_connection_is_closed_at_the_hello_deadline() {
    let s = Server::start(4, &["--shards", "1", "--handshake-timeout-ms", "500"]);
    let silent = tcp_from(s.devices, ip(21));
    assert!(closed_by_server(silent, Duration::from_secs(3)));
    assert!(wait_for(&s, |m| m.errors_of(ErrorKind::Timeout) >= 1));
    assert_eq!(s.stats().total.handshakes_in_flight, 0);
}

#[test]
fn a_full_table_sheds_its_oldest_stalled_stranger_for_a_newcomer() {
    let s = Server::start(
        4,
        &[
            "--shards",
            "1",
            "--max-handshakes",
            "4",
            "--shed-handshakes-after-ms",
            "1000",
        ],
    );
    // Four silent strangers from four addresses fill the table (seen before the first of them
    // may be shed: a stats read waits for fresh copies from the shards, a tick or two).
    let silent: Vec<TcpStream> = (31..35).map(|i| tcp_from(s.devices, ip(i))).collect();
    assert!(wait_for(&s, |m| m.handshakes_in_flight == 4));
    std::thread::sleep(Duration::from_millis(1_100));
    // A real device still gets in, well before the 5 s Hello deadline: the oldest is shed.
    let mut d = Device::connect_from(&s, s.config(1), ip(40));
    assert!(d.established(), "{:?}", d.events);
    let m = s.stats().total;
    assert!(m.handshakes_shed >= 1, "{m:?}");
    let mut silent = silent.into_iter();
    assert!(
        closed_by_server(silent.next().unwrap(), T),
        "the oldest went"
    );
}

#[test]
fn a_busy_address_waits_its_turn_while_others_are_served() {
    let s = Server::start(4, &["--shards", "1", "--max-handshakes-per-source", "2"]);
    let busy = ip(51);
    let a = tcp_from(s.devices, busy);
    let _b = tcp_from(s.devices, busy);
    assert!(wait_for(&s, |m| m.handshakes_in_flight == 2));
    // A third connection from that address waits, accepted but untouched...
    let mut waiting = Device::connect_from(&s, s.config(2), busy);
    assert!(wait_for(&s, |m| m.handshakes_waiting == 1));
    // ...while another address is served at once.
    let mut other = Device::connect_from(&s, s.config(1), ip(52));
    assert!(other.established(), "{:?}", other.events);
    // When one of the busy address's connections goes, the waiting one starts.
    drop(a);
    assert!(waiting.established(), "{:?}", waiting.events);
    let m = s.stats().total;
    assert_eq!(m.handshakes_waiting, 0);
    assert_eq!(m.refused_source_busy, 0);
}

#[test]
fn failed_proofs_close_their_address_but_never_lock_the_device_out() {
    let s = Server::start(
        4,
        &[
            "--shards",
            "1",
            "--auth-failures-per-source",
            "3",
            "--auth-failures-per-device",
            "2",
        ],
    );
    let attacker = ip(61);
    let wrong = derive_device_key(b"guess", DeviceId(1));
    for _ in 0..3 {
        let mut d =
            Device::connect_from(&s, DeviceConfig::new(DeviceId(1), wrong.clone()), attacker);
        assert!(d.pump_until(T, |ev| ev.contains(&DeviceEvent::Closed(
            CloseReason::PeerError(ErrorCode::AuthFailed)
        ))));
    }
    // The address's budget is spent: its next connection is closed at accept.
    let next = tcp_from(s.devices, attacker);
    assert!(closed_by_server(next, T));
    assert!(wait_for(&s, |m| m.refused_source_failures >= 1));
    // The device it named connects from its own address as always.
    let mut real = Device::connect_from(&s, s.config(1), ip(62));
    assert!(real.established(), "{:?}", real.events);
    let m = s.stats().total;
    assert_eq!(m.auth_failures, 3);
    assert_eq!(m.device_auth_alarms, 1, "{m:?}");
}

#[test]
fn a_device_replacing_itself_in_a_loop_is_damped_and_its_session_stays() {
    let s = Server::start(4, &["--shards", "1", "--replacements-per-device", "2"]);
    let mut d = s.device(3);
    assert!(d.established(), "{:?}", d.events);
    let mut old = Vec::new();
    for _ in 0..2 {
        old.push(d.reconnect_abandoning(&s));
        assert!(d.established(), "{:?}", d.events);
    }
    // A third replacement within the minute: told to wait, with a retry_after.
    let mut clone = s.device(3);
    assert!(
        clone.pump_until(T, |ev| ev.iter().any(|e| matches!(
            e,
            DeviceEvent::Goodbye {
                reason: GoodbyeReason::Flapping,
                ..
            }
        ))),
        "{:?}",
        clone.events
    );
    // The established session is untouched.
    assert!(!d.pump_until(Duration::from_millis(300), |ev| {
        ev.iter().any(|e| matches!(e, DeviceEvent::Goodbye { .. }))
    }));
    let m = s.stats().total;
    assert_eq!(m.flaps_damped, 1);
    assert_eq!(m.sessions_replaced, 2);
}

#[test]
fn an_agent_connection_is_a_stranger_until_its_token_verifies() {
    use std::io::Write;
    let s = Server::start(1, &["--shards", "1"]);
    // A frame announcing 1 MiB before any token: refused at once, not buffered.
    let mut big = TcpStream::connect(s.agents).unwrap();
    big.write_all(&(1u32 << 20).to_be_bytes()).unwrap();
    big.write_all(&[0x20; 64]).unwrap();
    assert!(
        closed_by_server(big, T),
        "a pre-token frame of 1 MiB was accepted"
    );
    // At most 64 unverified agent connections per shard; the next is closed at once.
    let held: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(s.agents).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let extra = TcpStream::connect(s.agents).unwrap();
    assert!(closed_by_server(extra, T));
    assert!(wait_for(&s, |m| m.refused_agents_pending >= 1));
    // Once they go, a real agent attaches as always.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = common::Agent::attach(&s);
    assert!(matches!(
        agent.recv(T),
        Some(tether_protocol::AgentMessage::AgentWelcome { .. })
    ));
}
