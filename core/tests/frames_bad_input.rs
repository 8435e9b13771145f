//! Oversized frames, malformed frames and garbage TLS get a clear error and a closed
//! connection — and the server keeps serving everyone else.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Server;
use tether_core::metrics::ErrorKind;
use tether_protocol::CloseReason;
use tether_protocol::device::DeviceEvent;
use tether_protocol::message::ErrorCode;

const T: Duration = Duration::from_secs(5);

#[test]
fn oversized_frame_gets_an_error_and_a_close() {
    let s = Server::start(5, &[]);
    let mut d = s.device(1);
    assert!(d.established());
    d.write_raw(&[0x00, 0x10, 0x00, 0x00, 0x06]); // 1 MiB announced, limit 64 KiB
    assert!(d.pump_until(T, |ev| ev.contains(&DeviceEvent::Closed(
        CloseReason::PeerError(ErrorCode::FrameTooLarge)
    ))));
    assert!(d.wait_closed(T));
    assert_eq!(s.stats().total.errors_of(ErrorKind::FrameTooLarge), 1);
    // Others are unaffected.
    let mut other = s.device(2);
    assert!(other.established());
}

#[test]
fn malformed_frame_gets_an_error_and_a_close() {
    let s = Server::start(5, &[]);
    let mut d = s.device(1);
    assert!(d.established());
    d.write_raw(&[0, 0, 0, 2, 0x04, 0x01]); // a Ping with a 1-byte body
    assert!(d.pump_until(T, |ev| ev.contains(&DeviceEvent::Closed(
        CloseReason::PeerError(ErrorCode::MalformedFrame)
    ))));
    assert!(d.wait_closed(T));
    assert_eq!(s.stats().total.errors_of(ErrorKind::MalformedFrame), 1);
}

#[test]
fn unknown_message_type_gets_an_error() {
    let s = Server::start(5, &[]);
    let mut d = s.device(1);
    assert!(d.established());
    d.write_raw(&[0, 0, 0, 1, 0x3f]);
    assert!(d.pump_until(T, |ev| ev.contains(&DeviceEvent::Closed(
        CloseReason::PeerError(ErrorCode::MalformedFrame)
    ))));
}

#[test]
fn garbage_instead_of_tls_is_closed_and_counted() {
    let s = Server::start(5, &[]);
    let mut sock = TcpStream::connect(s.devices).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    // The server answers with a TLS alert (or nothing) and closes.
    let mut total = 0;
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("server did not close: {e}"),
        }
    }
    assert!(total < 512);
    let st = s.stats();
    assert_eq!(st.total.errors_of(ErrorKind::Tls), 1);
    assert_eq!(st.total.connections_open, 0);
    let mut d = s.device(2);
    assert!(d.established());
}

#[test]
fn slow_client_that_never_says_hello_is_dropped() {
    let s = Server::start(5, &[]);
    // A TCP connection that never starts TLS holds a handshake slot only until the deadline.
    let sock = TcpStream::connect(s.devices).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 16];
    let r = (&sock).read(&mut buf);
    assert!(
        matches!(r, Ok(0)) || r.is_err(),
        "expected a close, got {r:?}"
    );
    assert_eq!(s.stats().total.errors_of(ErrorKind::Timeout), 1);
}
