//! Property tests: every message round-trips, and a stream of frames split at any byte
//! boundaries decodes to the same messages.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tether_protocol::auth::{Nonce, Proof};
use tether_protocol::codec::FrameDecoder;
use tether_protocol::message::{
    ErrorCode, GoodbyeReason, Hello, Message, PROTOCOL_VERSION, Resume, SendStatus,
};
use tether_protocol::{CodeVersion, DeviceId, Digest, Seq, SessionId};

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        any::<[u8; 32]>().prop_map(|n| Message::Challenge { nonce: Nonce(n) }),
        (
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            bytes(255),
            any::<Option<(u64, u64)>>()
        )
            .prop_map(|(d, p, c, fw, r)| Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                device: DeviceId(d),
                proof: Proof(p),
                code_version: CodeVersion(c),
                fw_version: fw,
                resume: r.map(|(s, q)| Resume {
                    session: SessionId(s),
                    rx_seq: Seq(q)
                }),
            })),
        (any::<u64>(), any::<u16>(), any::<u64>(), any::<u64>()).prop_map(|(s, h, t, r)| {
            Message::Welcome {
                session: SessionId(s),
                heartbeat_s: h,
                server_time_ms: t,
                rx_seq: Seq(r),
            }
        }),
        any::<u64>().prop_map(|id| Message::Ping { id }),
        any::<u64>().prop_map(|id| Message::Pong { id }),
        (any::<u64>(), bytes(40), bytes(2000)).prop_map(|(s, t, p)| Message::Msg {
            seq: Seq(s),
            topic: t,
            payload: p
        }),
        any::<u64>().prop_map(|s| Message::Ack { seq: Seq(s) }),
        (any::<u64>(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(v, s, d)| {
            Message::CodeOffer {
                version: CodeVersion(v),
                size: s,
                digest: Digest(d),
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(v, o)| Message::CodeRequest {
            version: CodeVersion(v),
            offset: o
        }),
        (any::<u64>(), any::<u64>(), bytes(2000)).prop_map(|(v, o, d)| Message::CodeChunk {
            version: CodeVersion(v),
            offset: o,
            data: d
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(v, o)| Message::CodeAck {
            version: CodeVersion(v),
            offset: o
        }),
        (any::<u64>(), any::<bool>()).prop_map(|(v, ok)| Message::CodeDone {
            version: CodeVersion(v),
            ok
        }),
        (0u16..7, any::<u32>(), bytes(255)).prop_map(|(r, ms, red)| Message::Goodbye {
            reason: GoodbyeReason::from_u16(r).unwrap(),
            retry_after_ms: ms,
            redirect: red,
        }),
        (1u16..12, bytes(100)).prop_map(|(c, m)| Message::Error {
            code: ErrorCode::from_u16(c).unwrap(),
            message: m
        }),
        (any::<u16>(), bytes(255), bytes(255)).prop_map(|(v, t, n)| Message::AgentHello {
            version: v,
            token: t,
            name: n
        }),
        (any::<u32>(), any::<u64>()).prop_map(|(a, t)| Message::AgentWelcome {
            agent: a,
            server_time_ms: t
        }),
        (any::<u64>(), any::<u64>(), bytes(40), bytes(500)).prop_map(|(d, t, tp, p)| {
            Message::Send {
                device: DeviceId(d),
                tag: t,
                topic: tp,
                payload: p,
            }
        }),
        (any::<u64>(), 0u16..5).prop_map(|(t, s)| Message::SendResult {
            tag: t,
            status: SendStatus::from_u16(s).unwrap()
        }),
        (any::<u64>(), any::<u64>(), bytes(40), bytes(500)).prop_map(|(d, s, tp, p)| {
            Message::Deliver {
                device: DeviceId(d),
                seq: Seq(s),
                topic: tp,
                payload: p,
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(d, s)| Message::DeliverAck {
            device: DeviceId(d),
            seq: Seq(s)
        }),
        (any::<u64>(), any::<bool>()).prop_map(|(d, o)| Message::Presence {
            device: DeviceId(d),
            online: o
        }),
        (
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(any::<u64>(), 0..64)
        )
            .prop_map(|(first, last, ids)| Message::PresenceSnapshot {
                first,
                last,
                devices: ids.into_iter().map(DeviceId).collect(),
            }),
        (bytes(255), bytes(3000)).prop_map(|(g, b)| Message::Deploy { group: g, blob: b }),
        (bytes(255), any::<u64>(), any::<[u8; 32]>(), bytes(100)).prop_map(|(g, v, d, m)| {
            Message::DeployResult {
                group: g,
                version: CodeVersion(v),
                digest: Digest(d),
                message: m,
            }
        }),
    ]
}

fn decode_all(chunks: &[&[u8]]) -> Vec<Message> {
    let mut d = FrameDecoder::new(1 << 20);
    let mut out = vec![];
    for c in chunks {
        d.push(c);
        while let Some(f) = d.next_frame().unwrap() {
            out.push(Message::decode(f).unwrap());
        }
    }
    assert_eq!(d.pending(), 0);
    out
}

proptest! {
    #[test]
    fn every_message_round_trips(m in message()) {
        let mut b = BytesMut::new();
        m.encode(&mut b).unwrap();
        prop_assert_eq!(b.len(), m.frame_len());
        prop_assert_eq!(decode_all(&[&b]), vec![m]);
    }

    #[test]
    fn split_anywhere_decodes_the_same(
        ms in proptest::collection::vec(message(), 1..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut b = BytesMut::new();
        for m in &ms {
            m.encode(&mut b).unwrap();
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(b.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = vec![];
        let mut prev = 0;
        for p in points {
            chunks.push(&b[prev..p]);
            prev = p;
        }
        chunks.push(&b[prev..]);
        prop_assert_eq!(decode_all(&chunks), ms);
    }

    #[test]
    fn byte_at_a_time_decodes_the_same(ms in proptest::collection::vec(message(), 1..4)) {
        let mut b = BytesMut::new();
        for m in &ms {
            m.encode(&mut b).unwrap();
        }
        let chunks: Vec<&[u8]> = b.chunks(1).collect();
        prop_assert_eq!(decode_all(&chunks), ms);
    }

    /// Arbitrary bytes never panic the decoder; they give frames, errors, or a wait for more.
    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        tether_protocol::codec::fuzz_decode(&data);
    }

    /// Every strict prefix of a message body is a typed truncation error, never a panic.
    #[test]
    fn truncated_bodies_are_errors(m in message()) {
        let mut b = BytesMut::new();
        m.encode(&mut b).unwrap();
        let ty = b[4];
        let body = Bytes::copy_from_slice(&b[5..]);
        for cut in 0..body.len() {
            let f = tether_protocol::codec::Frame { ty, body: body.slice(..cut) };
            // Messages whose last field runs to the end of the frame decode to a shorter
            // message; every other prefix is an error. Never the original message.
            prop_assert_ne!(Message::decode(f), Ok(m.clone()));
        }
    }
}
