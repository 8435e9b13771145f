//! Protocol hot paths: encode/decode of `Msg` (64 B, 1 KiB) and `Ping`, and one server-session
//! step for a received `Msg`.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tether_protocol::auth::{Nonce, derive_device_key, prove};
use tether_protocol::codec::{DEFAULT_MAX_FRAME, decode_frame};
use tether_protocol::message::{DeviceMessage, Hello, PROTOCOL_VERSION};
use tether_protocol::server::{ServerConfig, ServerSession};
use tether_protocol::{CodeVersion, DeviceId, Seq, SessionId};

fn msg(size: usize) -> DeviceMessage {
    DeviceMessage::Msg {
        seq: Seq(12345),
        topic: Bytes::from_static(b"telemetry"),
        payload: Bytes::from(vec![0xa5; size]),
    }
}

fn codec(c: &mut Criterion) {
    let cases = [
        ("msg_64", msg(64)),
        ("msg_1k", msg(1024)),
        ("ping", DeviceMessage::Ping { id: 7 }),
    ];
    let mut g = c.benchmark_group("encode");
    for (name, m) in &cases {
        g.throughput(Throughput::Elements(1));
        let mut buf = BytesMut::with_capacity(4096);
        g.bench_function(*name, |b| {
            b.iter(|| {
                buf.clear();
                m.encode(&mut buf).unwrap();
                std::hint::black_box(&buf);
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("decode");
    for (name, m) in &cases {
        g.throughput(Throughput::Elements(1));
        let mut wire = BytesMut::new();
        m.encode(&mut wire).unwrap();
        let wire = wire.freeze();
        g.bench_function(*name, |b| {
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |src| {
                    let f = decode_frame(src, DEFAULT_MAX_FRAME).unwrap().unwrap();
                    std::hint::black_box(DeviceMessage::decode(f).unwrap())
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// An established server session, ready for device messages.
fn established() -> ServerSession {
    let now = Instant::now();
    let cfg = ServerConfig {
        outbox_limit: u32::MAX,
        ..ServerConfig::default()
    };
    let nonce = Nonce([3; 32]);
    let key = derive_device_key(b"bench", DeviceId(1));
    let mut s = ServerSession::new(&cfg, nonce, now);
    let mut hello = BytesMut::new();
    DeviceMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        device: DeviceId(1),
        proof: prove(&key, &nonce, DeviceId(1), PROTOCOL_VERSION),
        code_version: CodeVersion(0),
        fw_version: Bytes::new(),
        resume: None,
    })
    .encode(&mut hello)
    .unwrap();
    s.handle_bytes(now, &hello);
    while s.poll_event().is_some() {}
    s.authenticate(now, Some(&key), SessionId(1), 0, None)
        .unwrap();
    let mut sink = BytesMut::new();
    let _ = s.poll_transmit(&mut sink);
    s
}

fn session_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("server_session");
    g.throughput(Throughput::Elements(1));
    for (name, size) in [("msg_in_64", 64), ("msg_in_1k", 1024)] {
        let mut s = established();
        let now = Instant::now();
        let mut seq = 0u64;
        let mut out = BytesMut::with_capacity(4096);
        let mut wire = BytesMut::new();
        g.bench_function(name, |b| {
            b.iter(|| {
                seq += 1;
                wire.clear();
                DeviceMessage::Msg {
                    seq: Seq(seq),
                    topic: Bytes::from_static(b"telemetry"),
                    payload: Bytes::from_static(&[0xa5; 1024][..size]),
                }
                .encode(&mut wire)
                .unwrap();
                // Receive, hand the event up, ack it, transmit the ack.
                s.handle_bytes(now, &wire);
                while let Some(e) = s.poll_event() {
                    std::hint::black_box(&e);
                }
                s.ack_received(Seq(seq));
                out.clear();
                let _ = s.poll_transmit(&mut out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec, session_step);
criterion_main!(benches);
