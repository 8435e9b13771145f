//! Property tests, for both links' message enums: every message round-trips, a stream of frames
//! split at any byte boundaries decodes to the same messages, and no frame of one link decodes
//! on the other (beyond the types both share).

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tether_protocol::auth::{Nonce, Proof};
use tether_protocol::codec::{Frame, FrameDecoder};
use tether_protocol::message::{
    AgentMessage, DeviceMessage, ErrorCode, GoodbyeReason, Hello, PROTOCOL_VERSION, Resume,
    SendStatus,
};
use tether_protocol::{CodeVersion, DecodeError, DeviceId, Digest, Seq, SessionId};

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn device_message() -> impl Strategy<Value = DeviceMessage> {
    prop_oneof![
        any::<[u8; 32]>().prop_map(|n| DeviceMessage::Challenge { nonce: Nonce(n) }),
        (
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            bytes(255),
            any::<Option<(u64, u64)>>()
        )
            .prop_map(|(d, p, c, fw, r)| DeviceMessage::Hello(Hello {
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
            DeviceMessage::Welcome {
                session: SessionId(s),
                heartbeat_s: h,
                server_time_ms: t,
                rx_seq: Seq(r),
            }
        }),
        any::<u64>().prop_map(|id| DeviceMessage::Ping { id }),
        any::<u64>().prop_map(|id| DeviceMessage::Pong { id }),
        (any::<u64>(), bytes(40), bytes(2000)).prop_map(|(s, t, p)| DeviceMessage::Msg {
            seq: Seq(s),
            topic: t,
            payload: p
        }),
        any::<u64>().prop_map(|s| DeviceMessage::Ack { seq: Seq(s) }),
        (any::<u64>(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(v, s, d)| {
            DeviceMessage::CodeOffer {
                version: CodeVersion(v),
                size: s,
                digest: Digest(d),
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(v, o)| DeviceMessage::CodeRequest {
            version: CodeVersion(v),
            offset: o
        }),
        (any::<u64>(), any::<u64>(), bytes(2000)).prop_map(|(v, o, d)| DeviceMessage::CodeChunk {
            version: CodeVersion(v),
            offset: o,
            data: d
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(v, o)| DeviceMessage::CodeAck {
            version: CodeVersion(v),
            offset: o
        }),
        (any::<u64>(), any::<bool>()).prop_map(|(v, ok)| DeviceMessage::CodeDone {
            version: CodeVersion(v),
            ok
        }),
        (0u16..7, any::<u32>(), bytes(255)).prop_map(|(r, ms, red)| DeviceMessage::Goodbye {
            reason: GoodbyeReason::from_u16(r).unwrap(),
            retry_after_ms: ms,
            redirect: red,
        }),
        (1u16..12, bytes(100)).prop_map(|(c, m)| DeviceMessage::Error {
            code: ErrorCode::from_u16(c).unwrap(),
            message: m
        }),
    ]
}

fn agent_message() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        any::<u64>().prop_map(|id| AgentMessage::Ping { id }),
        any::<u64>().prop_map(|id| AgentMessage::Pong { id }),
        (1u16..12, bytes(100)).prop_map(|(c, m)| AgentMessage::Error {
            code: ErrorCode::from_u16(c).unwrap(),
            message: m
        }),
        (any::<u16>(), bytes(255), bytes(255)).prop_map(|(v, t, n)| AgentMessage::AgentHello {
            version: v,
            token: t,
            name: n
        }),
        (any::<u32>(), any::<u64>()).prop_map(|(a, t)| AgentMessage::AgentWelcome {
            agent: a,
            server_time_ms: t
        }),
        (any::<u64>(), any::<u64>(), bytes(40), bytes(500)).prop_map(|(d, t, tp, p)| {
            AgentMessage::Send {
                device: DeviceId(d),
                tag: t,
                topic: tp,
                payload: p,
            }
        }),
        (any::<u64>(), 0u16..5).prop_map(|(t, s)| AgentMessage::SendResult {
            tag: t,
            status: SendStatus::from_u16(s).unwrap()
        }),
        (any::<u64>(), any::<u64>(), bytes(40), bytes(500)).prop_map(|(d, s, tp, p)| {
            AgentMessage::Deliver {
                device: DeviceId(d),
                seq: Seq(s),
                topic: tp,
                payload: p,
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(d, s)| AgentMessage::DeliverAck {
            device: DeviceId(d),
            seq: Seq(s)
        }),
        (any::<u64>(), any::<bool>()).prop_map(|(d, o)| AgentMessage::Presence {
            device: DeviceId(d),
            online: o
        }),
        (
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(any::<u64>(), 0..64)
        )
            .prop_map(|(first, last, ids)| AgentMessage::PresenceSnapshot {
                first,
                last,
                devices: ids.into_iter().map(DeviceId).collect(),
            }),
        (bytes(255), bytes(3000)).prop_map(|(g, b)| AgentMessage::Deploy { group: g, blob: b }),
        (bytes(255), any::<u64>(), any::<[u8; 32]>(), bytes(100)).prop_map(|(g, v, d, m)| {
            AgentMessage::DeployResult {
                group: g,
                version: CodeVersion(v),
                digest: Digest(d),
                message: m,
            }
        }),
    ]
}

/// What the properties need of either link's message enum.
trait Wire: Sized + Clone + std::fmt::Debug + PartialEq {
    fn encode(&self, b: &mut BytesMut);
    fn frame_len(&self) -> usize;
    fn decode(f: Frame) -> Result<Self, DecodeError>;
}

macro_rules! wire {
    ($t:ty) => {
        impl Wire for $t {
            fn encode(&self, b: &mut BytesMut) {
                <$t>::encode(self, b).unwrap()
            }
            fn frame_len(&self) -> usize {
                <$t>::frame_len(self)
            }
            fn decode(f: Frame) -> Result<Self, DecodeError> {
                <$t>::decode(f)
            }
        }
    };
}
wire!(DeviceMessage);
wire!(AgentMessage);

fn decode_all<M: Wire>(chunks: &[&[u8]]) -> Vec<M> {
    let mut d = FrameDecoder::new(1 << 20);
    let mut out = vec![];
    for c in chunks {
        d.push(c);
        while let Some(f) = d.next_frame().unwrap() {
            out.push(M::decode(f).unwrap());
        }
    }
    assert_eq!(d.pending(), 0);
    out
}

fn round_trips<M: Wire>(m: M) -> Result<(), TestCaseError> {
    let mut b = BytesMut::new();
    m.encode(&mut b);
    prop_assert_eq!(b.len(), m.frame_len());
    prop_assert_eq!(decode_all::<M>(&[&b]), vec![m]);
    Ok(())
}

fn split_anywhere<M: Wire>(ms: Vec<M>, cuts: &[prop::sample::Index]) -> Result<(), TestCaseError> {
    let mut b = BytesMut::new();
    for m in &ms {
        m.encode(&mut b);
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
    prop_assert_eq!(decode_all::<M>(&chunks), ms.clone());
    // And one byte at a time.
    let bytes: Vec<&[u8]> = b.chunks(1).collect();
    prop_assert_eq!(decode_all::<M>(&bytes), ms);
    Ok(())
}

/// Every strict prefix of a message body is a typed truncation error, never a panic.
fn truncated_is_error<M: Wire>(m: M) -> Result<(), TestCaseError> {
    let mut b = BytesMut::new();
    m.encode(&mut b);
    let ty = b[4];
    let body = Bytes::copy_from_slice(&b[5..]);
    for cut in 0..body.len() {
        let f = Frame {
            ty,
            body: body.slice(..cut),
        };
        // Messages whose last field runs to the end of the frame decode to a shorter
        // message; every other prefix is an error. Never the original message.
        prop_assert_ne!(M::decode(f), Ok(m.clone()));
    }
    Ok(())
}

/// `m`'s frame decodes on the other link `O` exactly when its type is `shared` by both.
fn only_shared_types_cross<M: Wire, O: Wire>(m: &M, shared: bool) -> Result<(), TestCaseError> {
    let mut b = BytesMut::new();
    m.encode(&mut b);
    let f = Frame {
        ty: b[4],
        body: Bytes::copy_from_slice(&b[5..]),
    };
    match O::decode(f) {
        Ok(_) => prop_assert!(shared),
        Err(e) => {
            let wrong_link = matches!(e, DecodeError::WrongLink { .. });
            prop_assert!(!shared && wrong_link, "{:?}", e);
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn every_device_message_round_trips(m in device_message()) {
        round_trips(m)?;
    }

    #[test]
    fn every_agent_message_round_trips(m in agent_message()) {
        round_trips(m)?;
    }

    #[test]
    fn device_stream_split_anywhere_decodes_the_same(
        ms in proptest::collection::vec(device_message(), 1..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        split_anywhere(ms, &cuts)?;
    }

    #[test]
    fn agent_stream_split_anywhere_decodes_the_same(
        ms in proptest::collection::vec(agent_message(), 1..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        split_anywhere(ms, &cuts)?;
    }

    /// Arbitrary bytes never panic the decoder; they give frames, errors, or a wait for more.
    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        tether_protocol::codec::fuzz_decode(&data);
    }

    #[test]
    fn truncated_device_bodies_are_errors(m in device_message()) {
        truncated_is_error(m)?;
    }

    #[test]
    fn truncated_agent_bodies_are_errors(m in agent_message()) {
        truncated_is_error(m)?;
    }

    /// A frame of one link never decodes on the other, except the types both share.
    #[test]
    fn device_frames_never_decode_on_the_agent_link(m in device_message()) {
        let shared = matches!(m, DeviceMessage::Ping { .. } | DeviceMessage::Pong { .. } | DeviceMessage::Error { .. });
        only_shared_types_cross::<_, AgentMessage>(&m, shared)?;
    }

    #[test]
    fn agent_frames_never_decode_on_the_device_link(m in agent_message()) {
        let shared = matches!(m, AgentMessage::Ping { .. } | AgentMessage::Pong { .. } | AgentMessage::Error { .. });
        only_shared_types_cross::<_, DeviceMessage>(&m, shared)?;
    }
}
