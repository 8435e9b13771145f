//! A device that pipelines a message right behind its `Hello`, on a connection the kernel gave
//! to a shard that is not the device's home: every byte read before the move to the home shard
//! (plaintext the session buffered, the start of a TLS record not yet complete) goes with the
//! session, and the message reaches the agent. In both TLS state modes, with the `Hello` and
//! the message in one TLS record, in two records in one write, and in two records the second
//! of which is cut in half around the move.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{Agent, Server};
use tether_core::metrics::MetricsSnapshot;
use tether_core::placement::home_shard;
use tether_protocol::device::DeviceSession;
use tether_protocol::{AgentMessage, DeviceId, DeviceMessage, Seq};

const T: Duration = Duration::from_secs(10);
const DEVICES: u64 = 32;

#[derive(Clone, Copy, Debug)]
enum Framing {
    /// `Hello` and `Msg` in one TLS record.
    OneRecord,
    /// `Hello` and `Msg` in a record each, written at once.
    TwoRecords,
    /// Two records; the first half of the second is written with the first, the rest once the
    /// session has moved.
    SplitSecond,
}

#[test]
fn a_message_pipelined_after_hello_survives_the_move_detached() {
    pipelined(&["--tls-state", "detached"]);
}

#[test]
fn a_message_pipelined_after_hello_survives_the_move_buffered() {
    pipelined(&["--tls-state", "buffered"]);
}

fn poll_stats(
    s: &Server,
    what: &str,
    mut f: impl FnMut(&MetricsSnapshot) -> bool,
) -> MetricsSnapshot {
    let end = Instant::now() + T;
    loop {
        let st = s.stats();
        if f(&st) {
            return st;
        }
        assert!(Instant::now() < end, "{what}: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pipelined(mode: &[&str]) {
    let mut args = vec!["--shards", "2"];
    args.extend_from_slice(mode);
    let s = Server::start(DEVICES, &args);
    let mut agent = Agent::attach(&s);
    assert!(matches!(
        agent.recv(T),
        Some(AgentMessage::AgentWelcome { .. })
    ));
    // Every shard knows the agent before a device speaks (the stats answer comes after).
    poll_stats(&s, "agent attached", |st| st.total.agents_attached == 1);
    let mut used = Vec::new();
    for (n, framing) in [
        Framing::OneRecord,
        Framing::TwoRecords,
        Framing::SplitSecond,
    ]
    .into_iter()
    .enumerate()
    {
        let topic = format!("pipelined-{n}");
        let (device, _conn) = one_connection(&s, framing, &topic, &mut used);
        let got = agent.recv_until(T, |m| matches!(m, AgentMessage::Deliver { .. }));
        assert_eq!(
            got,
            Some(AgentMessage::Deliver {
                device,
                seq: Seq(1),
                topic: Bytes::from(topic),
                payload: Bytes::from_static(b"right behind hello"),
            }),
            "{mode:?} {framing:?}: {:?}",
            s.stats().total
        );
    }
}

/// Connects, picks a device whose home is not the shard that accepted the connection, and
/// sends its `Hello` and one `Msg` framed as `framing`. Returns the device and its connection
/// (kept open while the message travels).
fn one_connection(
    s: &Server,
    framing: Framing,
    topic: &str,
    used: &mut Vec<u64>,
) -> (DeviceId, TcpStream) {
    let before = s.stats();
    let mut sock = TcpStream::connect(s.devices).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let after = poll_stats(s, "accepted", |st| {
        st.total.connections_accepted > before.total.connections_accepted
    });
    let accepting = (0..2)
        .find(|&k| after.shards[k].connections_accepted > before.shards[k].connections_accepted)
        .unwrap();
    let id = (1..=DEVICES)
        .find(|&i| home_shard(DeviceId(i), 2) != accepting && !used.contains(&i))
        .expect("a device homed on the other shard");
    used.push(id);
    let device = DeviceId(id);

    let mut tls =
        rustls::ClientConnection::new(s.tls.clone(), "localhost".try_into().unwrap()).unwrap();
    while tls.is_handshaking() {
        tls.complete_io(&mut sock).unwrap();
    }
    while tls.wants_write() {
        tls.write_tls(&mut sock).unwrap();
    }
    // The Challenge (half-RTT data), then the session's Hello.
    let mut session = DeviceSession::new(s.config(id), Instant::now());
    session.connect(Instant::now());
    let mut hello = BytesMut::new();
    let mut buf = [0u8; 4096];
    while !session.poll_transmit(&mut hello) {
        match tls.reader().read(&mut buf) {
            Ok(n) if n > 0 => session.handle_bytes(Instant::now(), &buf[..n]),
            Ok(_) => panic!("closed before the Challenge"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tls.read_tls(&mut sock).unwrap();
                tls.process_new_packets().unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    let mut msg = BytesMut::new();
    DeviceMessage::Msg {
        seq: Seq(1),
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        payload: Bytes::from_static(b"right behind hello"),
    }
    .encode(&mut msg)
    .unwrap();
    match framing {
        Framing::OneRecord => {
            tls.writer()
                .write_all(&[&hello[..], &msg[..]].concat())
                .unwrap();
        }
        Framing::TwoRecords | Framing::SplitSecond => {
            tls.writer().write_all(&hello).unwrap();
            tls.writer().write_all(&msg).unwrap();
        }
    }
    let mut wire = Vec::new();
    while tls.wants_write() {
        tls.write_tls(&mut wire).unwrap();
    }
    let records = record_lengths(&wire);
    let want = if matches!(framing, Framing::OneRecord) {
        1
    } else {
        2
    };
    assert_eq!(records.len(), want, "{framing:?}: records {records:?}");
    match framing {
        Framing::OneRecord | Framing::TwoRecords => sock.write_all(&wire).unwrap(),
        Framing::SplitSecond => {
            let cut = records[0] + records[1] / 2;
            sock.write_all(&wire[..cut]).unwrap();
            // The rest only once the session has left the accepting shard.
            poll_stats(s, "moved", |st| {
                st.total.sessions_moved_in > before.total.sessions_moved_in
            });
            sock.write_all(&wire[cut..]).unwrap();
        }
    }
    sock.flush().unwrap();
    (device, sock)
}

/// The length (header included) of each TLS record in `wire`.
fn record_lengths(wire: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = wire;
    while rest.len() >= 5 {
        let len = 5 + u16::from_be_bytes([rest[3], rest[4]]) as usize;
        out.push(len);
        rest = &rest[len.min(rest.len())..];
    }
    out
}
