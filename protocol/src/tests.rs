//! Deterministic session tests: a [`Pair`] steps a device and a server session with virtual
//! time until both are idle.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::auth::{DeviceKey, Nonce, derive_device_key};
use crate::codec::FrameDecoder;
use crate::device::{DeviceConfig, DeviceEvent, DeviceSession};
use crate::error::{AuthError, CloseReason, DecodeError, PeerMisbehaved, SendError};
use crate::ids::{CodeVersion, DeviceId, Seq, SessionId};
use crate::message::PROTOCOL_VERSION;
use crate::message::{AgentMessage, DeviceMessage, ErrorCode, GoodbyeReason, MessageType};
use crate::server::{ServerConfig, ServerEvent, ServerSession};

const SECRET: &[u8] = b"test secret";

struct Pair {
    now: Instant,
    device: DeviceSession,
    server: ServerSession,
    server_cfg: ServerConfig,
    device_events: Vec<DeviceEvent>,
    server_events: Vec<ServerEvent>,
    /// The key the server's registry returns.
    registry_key: Option<DeviceKey>,
    /// Ack device messages as soon as they arrive (an agent that acks at once).
    auto_ack: bool,
    nonce_counter: u8,
}

impl Pair {
    fn new() -> Self {
        let now = Instant::now();
        let id = DeviceId(42);
        let key = derive_device_key(SECRET, id);
        let server_cfg = ServerConfig::default();
        let mut device = DeviceSession::new(DeviceConfig::new(id, key.clone()), now);
        device.connect(now);
        Pair {
            now,
            device,
            server: ServerSession::new(&server_cfg, Nonce([1; 32]), now),
            server_cfg,
            device_events: vec![],
            server_events: vec![],
            registry_key: Some(key),
            auto_ack: true,
            nonce_counter: 1,
        }
    }

    /// Exchanges bytes and handles events until nothing moves.
    fn step(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            let mut buf = BytesMut::new();
            if self.device.poll_transmit(&mut buf) {
                self.server.handle_bytes(self.now, &buf);
                moved = true;
            }
            while let Some(e) = self.server.poll_event() {
                moved = true;
                match &e {
                    ServerEvent::Hello { .. } => {
                        let key = self.registry_key.clone();
                        let _ =
                            self.server
                                .authenticate(self.now, key.as_ref(), SessionId(7), 0, None);
                    }
                    ServerEvent::Message { seq, .. } if self.auto_ack => {
                        self.server.ack_received(*seq)
                    }
                    _ => {}
                }
                self.server_events.push(e);
            }
            let mut buf = BytesMut::new();
            if self.server.poll_transmit(&mut buf) {
                self.device.handle_bytes(self.now, &buf);
                moved = true;
            }
            while let Some(e) = self.device.poll_event() {
                moved = true;
                self.device_events.push(e);
            }
            if !moved {
                return;
            }
        }
        panic!("pair did not settle");
    }

    /// Advances virtual time to `t`, firing both sides' timeouts on the way.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        loop {
            let next = [self.device.poll_timeout(), self.server.poll_timeout()]
                .into_iter()
                .flatten()
                .filter(|t| *t <= end)
                .min();
            match next {
                Some(t) => {
                    self.now = t.max(self.now);
                    self.device.handle_timeout(self.now);
                    self.server.handle_timeout(self.now);
                    self.step();
                }
                None => break,
            }
        }
        self.now = end;
    }

    /// A new connection for the same device (the device session survives).
    fn reconnect(&mut self) {
        self.nonce_counter += 1;
        self.server =
            ServerSession::new(&self.server_cfg, Nonce([self.nonce_counter; 32]), self.now);
        self.device.connect(self.now);
        self.step();
    }

    /// The device sends a message on topic `t`.
    fn device_send(&mut self, payload: &'static [u8]) -> Seq {
        self.device
            .send(
                self.now,
                Bytes::from_static(b"t"),
                Bytes::from_static(payload),
            )
            .unwrap()
    }

    fn established(&mut self) {
        self.step();
        assert!(self.device.is_established(), "{:?}", self.device_events);
        assert_eq!(self.server.device(), Some(DeviceId(42)));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn ping_frame_wire_bytes() {
    let mut b = BytesMut::new();
    DeviceMessage::Ping { id: 0x0102 }.encode(&mut b).unwrap();
    assert_eq!(
        hex(&b),
        "00000009" /* len */
            .to_owned()
            + "04"
            + "0000000000000102"
    );
}

#[test]
fn msg_frame_wire_bytes() {
    let mut b = BytesMut::new();
    DeviceMessage::Msg {
        seq: Seq(1),
        topic: Bytes::from_static(b"t"),
        payload: Bytes::from_static(b"hi"),
    }
    .encode(&mut b)
    .unwrap();
    assert_eq!(
        hex(&b),
        "0000000e06000000000000000100017468".to_owned() + "69"
    );
}

#[test]
fn presence_snapshot_wire_bytes_and_round_trip() {
    let mut b = BytesMut::new();
    AgentMessage::PresenceSnapshot {
        first: true,
        last: false,
        devices: vec![DeviceId(1), DeviceId(0x0203)],
    }
    .encode(&mut b)
    .unwrap();
    assert_eq!(
        hex(&b),
        "00000012".to_owned() /* len: type + flags + 2 ids */
            + "49"
            + "01"
            + "0000000000000001"
            + "0000000000000203"
    );
    let mut dec = FrameDecoder::new(1 << 20);
    dec.push(&b);
    let back = AgentMessage::decode(dec.next_frame().unwrap().unwrap()).unwrap();
    assert_eq!(
        back,
        AgentMessage::PresenceSnapshot {
            first: true,
            last: false,
            devices: vec![DeviceId(1), DeviceId(0x0203)],
        }
    );
}

#[test]
fn presence_snapshot_chunks_are_marked_and_cover_every_device() {
    use crate::message::PRESENCE_SNAPSHOT_CHUNK;
    // None online: one frame, both marks, no ids.
    assert_eq!(
        AgentMessage::presence_snapshot(&[]),
        vec![AgentMessage::PresenceSnapshot {
            first: true,
            last: true,
            devices: vec![]
        }]
    );
    let ids: Vec<DeviceId> = (0..2 * PRESENCE_SNAPSHOT_CHUNK as u64 + 5)
        .map(DeviceId)
        .collect();
    let frames = AgentMessage::presence_snapshot(&ids);
    assert_eq!(frames.len(), 3);
    let mut all = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let AgentMessage::PresenceSnapshot {
            first,
            last,
            devices,
        } = f
        else {
            panic!("not a snapshot: {f:?}");
        };
        assert_eq!(*first, i == 0);
        assert_eq!(*last, i == frames.len() - 1);
        assert!(devices.len() <= PRESENCE_SNAPSHOT_CHUNK);
        all.extend_from_slice(devices);
        // Every chunk fits the agent link's frame limit with room to spare.
        assert!(f.frame_len() < 64 * 1024);
    }
    assert_eq!(all, ids);
}

#[test]
fn presence_snapshot_bad_flags_and_ragged_ids_are_typed_errors() {
    use crate::codec::Frame;
    let f = |body: &'static [u8]| Frame {
        ty: 0x49,
        body: Bytes::from_static(body),
    };
    assert_eq!(
        AgentMessage::decode(f(b"\x04")),
        Err(DecodeError::InvalidField {
            ty: 0x49,
            field: "snapshot flags"
        })
    );
    assert_eq!(
        AgentMessage::decode(f(b"\x03\x00\x00\x00")),
        Err(DecodeError::InvalidField {
            ty: 0x49,
            field: "snapshot device ids"
        })
    );
    assert_eq!(
        AgentMessage::decode(f(b"")),
        Err(DecodeError::Truncated { ty: 0x49 })
    );
}

#[test]
fn hello_welcome_establishes_both_sides() {
    let mut p = Pair::new();
    p.established();
    assert!(matches!(
        p.device_events[0],
        DeviceEvent::Connected {
            session: SessionId(7),
            resumed: false,
            ..
        }
    ));
    assert!(matches!(
        p.server_events[0],
        ServerEvent::Hello {
            device: DeviceId(42),
            ..
        }
    ));
}

#[test]
fn bad_proof_closes_with_error_frame() {
    let mut p = Pair::new();
    p.registry_key = Some(derive_device_key(b"other secret", DeviceId(42)));
    p.step();
    assert!(p.server.is_closed());
    assert!(
        p.server_events
            .contains(&ServerEvent::Closed(CloseReason::Auth(AuthError::BadProof)))
    );
    assert!(
        p.device_events
            .contains(&DeviceEvent::Closed(CloseReason::PeerError(
                ErrorCode::AuthFailed
            )))
    );
}

#[test]
fn unknown_device_is_rejected() {
    let mut p = Pair::new();
    p.registry_key = None;
    p.step();
    assert!(
        p.device_events
            .contains(&DeviceEvent::Closed(CloseReason::PeerError(
                ErrorCode::AuthFailed
            )))
    );
}

#[test]
fn message_before_hello_is_a_protocol_violation() {
    let now = Instant::now();
    let mut s = ServerSession::new(&ServerConfig::default(), Nonce([0; 32]), now);
    let mut b = BytesMut::new();
    DeviceMessage::Ping { id: 1 }.encode(&mut b).unwrap();
    s.handle_bytes(now, &b);
    assert_eq!(
        s.poll_event(),
        Some(ServerEvent::Closed(CloseReason::PeerMisbehaved(
            PeerMisbehaved::UnexpectedMessage {
                state: "expecting Hello",
                got: MessageType::Ping
            }
        )))
    );
    let mut out = BytesMut::new();
    assert!(s.poll_transmit(&mut out));
    // Challenge then Error{ProtocolViolation}.
    let mut d = crate::codec::FrameDecoder::new(1 << 16);
    d.push(&out);
    let _challenge = d.next_frame().unwrap().unwrap();
    let err = DeviceMessage::decode(d.next_frame().unwrap().unwrap()).unwrap();
    assert!(matches!(
        err,
        DeviceMessage::Error {
            code: ErrorCode::ProtocolViolation,
            ..
        }
    ));
}

#[test]
fn oversized_frame_is_rejected_with_its_size() {
    let now = Instant::now();
    let cfg = ServerConfig {
        max_frame: 1024,
        ..ServerConfig::default()
    };
    let mut s = ServerSession::new(&cfg, Nonce([0; 32]), now);
    s.handle_bytes(now, &[0, 0, 0x10, 0, 6]);
    assert_eq!(
        s.poll_event(),
        Some(ServerEvent::Closed(CloseReason::PeerMisbehaved(
            PeerMisbehaved::Decode(DecodeError::FrameTooLarge {
                limit: 1024,
                got: 4096
            })
        )))
    );
}

#[test]
fn unsupported_version_is_rejected() {
    let now = Instant::now();
    let mut s = ServerSession::new(&ServerConfig::default(), Nonce([0; 32]), now);
    let mut b = BytesMut::new();
    DeviceMessage::Hello(crate::message::Hello {
        version: 99,
        device: DeviceId(1),
        proof: crate::auth::Proof([0; 32]),
        code_version: Default::default(),
        fw_version: Bytes::new(),
        resume: None,
    })
    .encode(&mut b)
    .unwrap();
    s.handle_bytes(now, &b);
    assert_eq!(
        s.poll_event(),
        Some(ServerEvent::Closed(CloseReason::PeerMisbehaved(
            PeerMisbehaved::UnsupportedVersion {
                got: 99,
                supported: 1
            }
        )))
    );
}

#[test]
fn device_message_is_delivered_and_acked() {
    let mut p = Pair::new();
    p.established();
    let seq = p
        .device
        .send(p.now, Bytes::from_static(b"t"), Bytes::from_static(b"x"))
        .unwrap();
    p.step();
    assert!(
        p.server_events
            .iter()
            .any(|e| matches!(e, ServerEvent::Message { seq: s, .. } if *s == seq))
    );
    assert!(p.device_events.contains(&DeviceEvent::Acked { seq }));
    assert_eq!(p.device.unacked(), 0);
}

#[test]
fn server_message_is_delivered_and_reported() {
    let mut p = Pair::new();
    p.established();
    let seq = p
        .server
        .send(Bytes::from_static(b"cmd"), Bytes::from_static(b"on"), 99)
        .unwrap();
    p.step();
    assert!(
        p.device_events
            .iter()
            .any(|e| matches!(e, DeviceEvent::Message { payload, .. } if &payload[..] == b"on"))
    );
    assert!(
        p.server_events
            .contains(&ServerEvent::Delivered { seq, tag: 99 })
    );
    assert_eq!(p.server.unacked(), 0);
}

#[test]
fn unacked_messages_are_resent_after_reconnect_and_not_duplicated() {
    let mut p = Pair::new();
    p.established();
    p.auto_ack = false; // the agent is slow: nothing acked
    p.device
        .send(p.now, Bytes::from_static(b"t"), Bytes::from_static(b"1"))
        .unwrap();
    p.device
        .send(p.now, Bytes::from_static(b"t"), Bytes::from_static(b"2"))
        .unwrap();
    p.step();
    assert_eq!(p.device.unacked(), 2);
    // The connection drops; the device reconnects to a fresh server session.
    p.device.connection_lost(CloseReason::IdleTimeout);
    p.server_events.clear();
    p.auto_ack = true;
    p.reconnect();
    let delivered: Vec<_> = p
        .server_events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Message { seq, .. } => Some(seq.0),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![1, 2]);
    assert_eq!(p.device.unacked(), 0);
}

#[test]
fn resend_timer_retransmits_unacked_and_receiver_drops_duplicates() {
    let mut p = Pair::new();
    p.established();
    p.auto_ack = false;
    p.device
        .send(p.now, Bytes::from_static(b"t"), Bytes::from_static(b"1"))
        .unwrap();
    p.step();
    p.server_events.clear();
    p.advance(Duration::from_secs(11));
    // Resent, but the server already has seq 1: no second delivery.
    assert!(
        !p.server_events
            .iter()
            .any(|e| matches!(e, ServerEvent::Message { .. }))
    );
    p.server.ack_received(Seq(1));
    p.step();
    assert_eq!(p.device.unacked(), 0);
}

#[test]
fn heartbeats_keep_an_idle_session_alive() {
    let mut p = Pair::new();
    p.established();
    p.advance(Duration::from_secs(600));
    assert!(p.device.is_established());
    assert!(!p.server.is_closed());
    assert!(
        p.device_events
            .iter()
            .filter(|e| matches!(e, DeviceEvent::Pong { .. }))
            .count()
            >= 19
    );
}

#[test]
fn silent_device_hits_the_server_idle_timeout() {
    let mut p = Pair::new();
    p.established();
    // The device goes silent: only the server's clock runs.
    let t = p.now + Duration::from_secs(74);
    p.server.handle_timeout(t);
    assert_eq!(p.server.poll_event(), None);
    let deadline = p.server.poll_timeout().unwrap();
    p.server.handle_timeout(deadline);
    assert_eq!(
        p.server.poll_event(),
        Some(ServerEvent::Closed(CloseReason::IdleTimeout))
    );
}

#[test]
fn no_hello_hits_the_handshake_timeout() {
    let now = Instant::now();
    let mut s = ServerSession::new(&ServerConfig::default(), Nonce([0; 32]), now);
    s.handle_timeout(now + Duration::from_secs(11));
    assert_eq!(
        s.poll_event(),
        Some(ServerEvent::Closed(CloseReason::HandshakeTimeout))
    );
}

#[test]
fn device_without_welcome_times_out() {
    let mut p = Pair::new();
    p.device.handle_timeout(p.now + Duration::from_secs(11));
    assert!(p.device.is_disconnected());
}

#[test]
fn replaced_session_carries_unacked_messages_to_the_new_connection() {
    let mut p = Pair::new();
    p.established();
    p.server
        .send(Bytes::from_static(b"t"), Bytes::from_static(b"a"), 1)
        .unwrap();
    // Do not deliver: the device's connection is half-dead. A new connection arrives.
    let carried = p.server.take_carried().unwrap();
    assert_eq!(carried.unacked(), 1);
    let mut old_out = BytesMut::new();
    assert!(p.server.poll_transmit(&mut old_out)); // Msg + Goodbye{Replaced}, never delivered
    p.device.connection_lost(CloseReason::IdleTimeout);
    p.nonce_counter += 1;
    p.server = ServerSession::new(&p.server_cfg, Nonce([9; 32]), p.now);
    p.device.connect(p.now);
    // Drive the handshake by hand to pass the carried state.
    let mut b = BytesMut::new();
    let _ = p.server.poll_transmit(&mut b);
    p.device.handle_bytes(p.now, &b);
    let mut b = BytesMut::new();
    let _ = p.device.poll_transmit(&mut b);
    p.server.handle_bytes(p.now, &b);
    assert!(matches!(
        p.server.poll_event(),
        Some(ServerEvent::Hello { .. })
    ));
    let key = p.registry_key.clone();
    p.server
        .authenticate(p.now, key.as_ref(), SessionId(0), 0, Some(carried))
        .unwrap();
    p.step();
    assert!(
        p.device_events
            .iter()
            .any(|e| matches!(e, DeviceEvent::Connected { resumed: true, .. }))
    );
    assert!(
        p.device_events
            .iter()
            .any(|e| matches!(e, DeviceEvent::Message { payload, .. } if &payload[..] == b"a"))
    );
    assert!(p.server_events.contains(&ServerEvent::Delivered {
        seq: Seq(1),
        tag: 1
    }));
}

#[test]
fn goodbye_from_server_tells_the_device_when_to_return() {
    let mut p = Pair::new();
    p.established();
    p.server.close(GoodbyeReason::Overloaded, 1500);
    p.step();
    assert!(p.device_events.contains(&DeviceEvent::Goodbye {
        reason: GoodbyeReason::Overloaded,
        retry_after: Duration::from_millis(1500),
        redirect: Bytes::new()
    }));
    assert!(p.device.is_disconnected());
}

#[test]
fn goodbye_revoked_means_do_not_reconnect() {
    let mut p = Pair::new();
    p.established();
    p.server.close(GoodbyeReason::Revoked, 0);
    p.step();
    assert!(
        p.device_events
            .contains(&DeviceEvent::Closed(CloseReason::PeerGoodbye(
                GoodbyeReason::Revoked
            )))
    );
    assert!(p.device.is_revoked() && p.device.is_disconnected());
    assert_eq!(
        p.device.poll_timeout(),
        None,
        "a revoked device has no deadline"
    );
    // A driver that reconnects anyway gets the reason again and sends nothing.
    p.device_events.clear();
    p.device.connect(p.now);
    assert!(p.device.is_revoked());
    assert_eq!(
        p.device.poll_event(),
        Some(DeviceEvent::Closed(CloseReason::PeerGoodbye(
            GoodbyeReason::Revoked
        )))
    );
    let mut out = BytesMut::new();
    p.device.handle_bytes(p.now, &[0, 0, 0, 1, 1]);
    assert!(!p.device.poll_transmit(&mut out) && out.is_empty());
    assert_eq!(
        p.device
            .send(p.now, Bytes::from_static(b"t"), Bytes::from_static(b"x")),
        Err(crate::error::SendError::Closed)
    );
}

#[test]
fn a_closed_session_still_names_its_device() {
    // The driver releases the device (presence, its slot in the device table) when it handles
    // the close, whichever side ended the session.
    let mut p = Pair::new();
    p.established();
    p.device.close();
    p.step();
    assert!(p.server.is_closed());
    assert_eq!(p.server.device(), Some(DeviceId(42)));
    assert_eq!(p.server.session_id(), None);
    let mut p = Pair::new();
    p.established();
    p.server.close(GoodbyeReason::Shutdown, 0);
    assert_eq!(p.server.device(), Some(DeviceId(42)));
    // Never established: no device.
    let mut p = Pair::new();
    p.registry_key = None;
    p.step();
    assert!(p.server.is_closed());
    assert_eq!(p.server.device(), None);
}

#[test]
fn other_goodbyes_leave_the_device_free_to_reconnect() {
    let mut p = Pair::new();
    p.established();
    p.server.close(GoodbyeReason::Shutdown, 10);
    p.step();
    assert!(p.device.is_disconnected() && !p.device.is_revoked());
    p.device.connect(p.now);
    assert!(
        !p.device.is_disconnected(),
        "connect starts a new handshake"
    );
}

#[test]
fn ack_of_unsent_seq_is_misbehaviour() {
    let mut p = Pair::new();
    p.established();
    let mut b = BytesMut::new();
    DeviceMessage::Ack { seq: Seq(5) }.encode(&mut b).unwrap();
    p.server.handle_bytes(p.now, &b);
    let mut closed = None;
    while let Some(e) = p.server.poll_event() {
        if let ServerEvent::Closed(r) = e {
            closed = Some(r);
        }
    }
    assert_eq!(
        closed,
        Some(CloseReason::PeerMisbehaved(PeerMisbehaved::AckOfUnsent {
            got: 5,
            sent: 0
        }))
    );
}

#[test]
fn outbox_is_bounded() {
    let mut p = Pair::new();
    p.established();
    for _ in 0..64 {
        p.server.send(Bytes::new(), Bytes::new(), 0).unwrap();
    }
    assert_eq!(
        p.server.send(Bytes::new(), Bytes::new(), 0),
        Err(crate::SendError::OutboxFull { limit: 64 })
    );
}

#[test]
fn idle_sessions_hold_no_buffers() {
    let mut p = Pair::new();
    p.established();
    p.device
        .send(p.now, Bytes::from_static(b"t"), Bytes::from_static(b"x"))
        .unwrap();
    p.step();
    assert_eq!(p.server.unacked(), 0);
    assert_eq!(p.device.unacked(), 0);
    // Reported for the memory budget: the size of each per-connection type.
    println!(
        "size_of ServerSession = {}, DeviceSession = {}",
        std::mem::size_of::<ServerSession>(),
        std::mem::size_of::<DeviceSession>()
    );
    assert!(std::mem::size_of::<ServerSession>() <= 256);
}

#[test]
fn unknown_type_truncated_and_trailing_bytes_are_typed_errors() {
    use crate::codec::Frame;
    let f = |ty, body: &'static [u8]| Frame {
        ty,
        body: Bytes::from_static(body),
    };
    assert_eq!(
        DeviceMessage::decode(f(0x7f, b"")),
        Err(DecodeError::UnknownType(0x7f))
    );
    assert_eq!(
        DeviceMessage::decode(f(0x04, b"\x00\x01")),
        Err(DecodeError::Truncated { ty: 4 })
    );
    assert_eq!(
        DeviceMessage::decode(f(0x07, b"\x00\x00\x00\x00\x00\x00\x00\x01\xff")),
        Err(DecodeError::TrailingBytes { ty: 7, extra: 1 })
    );
    assert_eq!(
        AgentMessage::decode(f(0x46, b"\x00\x00\x00\x00\x00\x00\x00\x01\x02")),
        Err(DecodeError::InvalidField {
            ty: 0x46,
            field: "online flag"
        })
    );
    assert_eq!(
        DeviceMessage::decode(f(0x0e, b"\xff\xff")),
        Err(DecodeError::InvalidField {
            ty: 0x0e,
            field: "error code"
        })
    );
}

#[test]
fn each_link_refuses_the_other_links_types() {
    use crate::codec::Frame;
    use crate::message::Link;
    let frame_of = |encode: &dyn Fn(&mut BytesMut)| {
        let mut b = BytesMut::new();
        encode(&mut b);
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&b);
        d.next_frame().unwrap().unwrap()
    };
    // A well-formed Deploy on a device connection is not a Deploy there.
    let deploy = frame_of(&|b| {
        AgentMessage::Deploy {
            group: Bytes::from_static(b"g"),
            blob: Bytes::from_static(b"code"),
        }
        .encode(b)
        .unwrap()
    });
    assert_eq!(
        DeviceMessage::decode(deploy.clone()),
        Err(DecodeError::WrongLink {
            ty: 0x47,
            link: Link::Device
        })
    );
    assert!(matches!(
        AgentMessage::decode(deploy),
        Ok(AgentMessage::Deploy { .. })
    ));
    // A device's Ack on the agent link is refused the same way; Ping travels on both.
    let ack = frame_of(&|b| DeviceMessage::Ack { seq: Seq(3) }.encode(b).unwrap());
    assert_eq!(
        AgentMessage::decode(ack),
        Err(DecodeError::WrongLink {
            ty: 0x07,
            link: Link::Agent
        })
    );
    let ping = frame_of(&|b| DeviceMessage::Ping { id: 1 }.encode(b).unwrap());
    assert_eq!(AgentMessage::decode(ping), Ok(AgentMessage::Ping { id: 1 }));
    for ty in 0u8..=255 {
        let Ok(t) = MessageType::from_u8(ty) else {
            continue;
        };
        // An empty body: each type decodes as truncated (or, for the other link, WrongLink)
        // on exactly the links it belongs to.
        let f = Frame {
            ty,
            body: Bytes::new(),
        };
        let dev = !matches!(
            DeviceMessage::decode(f.clone()),
            Err(DecodeError::WrongLink { .. })
        );
        let agent = !matches!(AgentMessage::decode(f), Err(DecodeError::WrongLink { .. }));
        let both = matches!(
            t,
            MessageType::Ping | MessageType::Pong | MessageType::Error
        );
        assert!(dev || agent, "{t} belongs to no link");
        assert_eq!(dev && agent, both, "{t} on both links: {}", dev && agent);
        assert_eq!(dev, ty < 0x40 || both, "{t} on the device link");
    }
    assert_eq!(
        DecodeError::WrongLink {
            ty: 0x47,
            link: Link::Device
        }
        .to_string(),
        "message type 0x47 does not belong on the device link"
    );
}

#[test]
fn errors_read_well() {
    assert_eq!(
        DecodeError::FrameTooLarge {
            limit: 65536,
            got: 70000
        }
        .to_string(),
        "frame of 70000 bytes exceeds the limit of 65536 bytes"
    );
    assert_eq!(
        CloseReason::Auth(AuthError::BadProof).to_string(),
        "authentication failed: bad proof: the HMAC does not match this connection's challenge"
    );
}

#[test]
fn over_long_short_fields_are_refused_before_writing() {
    let mut b = BytesMut::new();
    let m = DeviceMessage::Goodbye {
        reason: GoodbyeReason::Redirect,
        retry_after_ms: 0,
        redirect: Bytes::from(vec![b'x'; 256]),
    };
    assert!(m.encode(&mut b).is_err());
    assert!(b.is_empty());
}

#[test]
fn drained_sessions_hold_no_event_storage() {
    let mut p = Pair::new();
    p.established();
    p.device
        .send(p.now, Bytes::from_static(b"t"), Bytes::from_static(b"x"))
        .unwrap();
    p.step();
    // Both ends were drained by `step`: their event queues hold no allocation at rest.
    assert!(p.server.poll_event().is_none());
    assert!(p.device.poll_event().is_none());
    assert_eq!(p.server.event_capacity(), 0);
    assert_eq!(p.device.event_capacity(), 0);
}

/// A server session with a `Hello` for device 42 (proof from `key`) waiting to authenticate.
fn awaiting_hello(key: &DeviceKey) -> ServerSession {
    let now = Instant::now();
    let nonce = Nonce([9; 32]);
    let mut s = ServerSession::new(&ServerConfig::default(), nonce, now);
    let mut out = BytesMut::new();
    let _ = s.poll_transmit(&mut out); // the Challenge
    let mut b = BytesMut::new();
    DeviceMessage::Hello(crate::message::Hello {
        version: PROTOCOL_VERSION,
        device: DeviceId(42),
        code_version: CodeVersion(0),
        fw_version: Bytes::new(),
        proof: crate::auth::prove(key, &nonce, DeviceId(42), PROTOCOL_VERSION),
        resume: None,
    })
    .encode(&mut b)
    .unwrap();
    s.handle_bytes(now, &b);
    assert!(s.awaiting_auth());
    s
}

#[test]
fn unknown_device_and_bad_proof_are_the_same_bytes_on_the_wire() {
    let right = derive_device_key(SECRET, DeviceId(42));
    let wrong = derive_device_key(b"another secret", DeviceId(42));
    let mut answers = Vec::new();
    for registry in [Some(&right), None] {
        let mut s = awaiting_hello(&wrong);
        let e = s.verify(registry).unwrap_err();
        s.reject(e);
        let mut out = BytesMut::new();
        assert!(s.poll_transmit(&mut out));
        answers.push(out);
    }
    assert_eq!(answers[0], answers[1]);
    let mut frame = FrameDecoder::new(1 << 16);
    frame.push(&answers[0]);
    let m = DeviceMessage::decode(frame.next_frame().unwrap().unwrap()).unwrap();
    assert_eq!(
        m,
        DeviceMessage::Error {
            code: ErrorCode::AuthFailed,
            message: Bytes::from_static(b"authentication failed")
        }
    );
}

#[test]
fn verify_changes_nothing_until_established() {
    let key = derive_device_key(SECRET, DeviceId(42));
    let mut s = awaiting_hello(&key);
    assert!(matches!(
        s.verify(Some(&derive_device_key(b"x", DeviceId(42)))),
        Err(AuthError::BadProof)
    ));
    assert!(
        s.awaiting_auth(),
        "a failed verify leaves the session waiting"
    );
    let v = s.verify(Some(&key)).unwrap();
    assert_eq!(v.device(), DeviceId(42));
    assert!(s.awaiting_auth());
    assert_eq!(
        s.establish(Instant::now(), v, SessionId(3), 0, None),
        DeviceId(42)
    );
    assert_eq!(s.device(), Some(DeviceId(42)));
}

#[test]
fn a_certificate_for_the_hello_device_verifies_without_the_proof() {
    use crate::server::Credential;
    // The Hello's proof is made with a wrong key: only the certificate vouches for it.
    let wrong = derive_device_key(b"another secret", DeviceId(42));
    let mut s = awaiting_hello(&wrong);
    let v = s
        .verify_credential(Some(Credential::Certificate(Some(DeviceId(42)))))
        .unwrap();
    assert_eq!(v.device(), DeviceId(42));
    s.establish(Instant::now(), v, SessionId(3), 0, None);
    assert_eq!(s.device(), Some(DeviceId(42)));
}

#[test]
fn a_certificate_for_another_device_is_refused_like_a_bad_proof() {
    use crate::server::Credential;
    let right = derive_device_key(SECRET, DeviceId(42));
    let mut answers = Vec::new();
    let credentials = [
        Credential::Key(&right),
        Credential::Certificate(Some(DeviceId(43))),
        Credential::Certificate(None),
    ];
    for (i, credential) in credentials.into_iter().enumerate() {
        // A bad proof for the key case; the certificate cases carry a good proof, which must
        // not help them.
        let hello_key = if i == 0 {
            derive_device_key(b"another secret", DeviceId(42))
        } else {
            right.clone()
        };
        let mut s = awaiting_hello(&hello_key);
        let e = s.verify_credential(Some(credential)).unwrap_err();
        assert_eq!(e, AuthError::BadProof, "{credential:?}");
        assert!(s.awaiting_auth(), "a failed verify changes nothing");
        s.reject(e);
        let mut out = BytesMut::new();
        assert!(s.poll_transmit(&mut out));
        answers.push(out);
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0], answers[2]);
}

#[test]
fn control_frames_over_the_frame_limit_are_refused_before_queueing() {
    let mut p = Pair::new();
    p.established();
    let limit = p.server_cfg.max_frame;
    let chunk = |len: usize| DeviceMessage::CodeChunk {
        version: CodeVersion(2),
        offset: 0,
        data: Bytes::from(vec![7; len]),
    };
    // Type byte + version + offset + data: exactly at the limit is fine, one byte more is not.
    let fits = chunk(limit as usize - 17);
    assert_eq!(p.server.send_control(&fits), Ok(()));
    assert_eq!(
        p.server.send_control(&chunk(limit as usize - 16)),
        Err(SendError::TooLarge {
            limit,
            got: limit + 1
        })
    );
    // Only the chunk that fits went out, and the device takes it.
    let mut out = BytesMut::new();
    assert!(p.server.poll_transmit(&mut out));
    assert_eq!(out.len(), 4 + limit as usize);
    p.device.handle_bytes(p.now, &out);
    assert!(p.device.is_established());
    assert!(matches!(
        p.device.poll_event(),
        Some(DeviceEvent::CodeChunk { data, .. }) if data.len() == limit as usize - 17
    ));
}

#[test]
fn an_exported_session_continues_in_another_process() {
    use crate::server::HandoffError;
    let mut p = Pair::new();
    p.established();
    // The agent has not acknowledged the device's message yet; the device has not
    // acknowledged one of the server's two.
    p.auto_ack = false;
    let mine = p.device_send(b"up");
    p.server
        .send(Bytes::from_static(b"cmd"), Bytes::from_static(b"one"), 7)
        .unwrap();
    p.step();
    p.server_events.clear();
    p.device_events.clear();
    let pending = p
        .server
        .send(Bytes::from_static(b"cmd"), Bytes::from_static(b"two"), 8)
        .unwrap();
    let bytes = p.server.export(p.now).unwrap();
    // The copy continues the session: same device and id, its pending output, its outbox.
    let next = ServerSession::import(&bytes, p.now).unwrap();
    assert_eq!(next.device(), p.server.device());
    assert_eq!(next.session_id(), p.server.session_id());
    assert!(next.poll_timeout().is_some());
    p.server = next;
    p.auto_ack = true;
    p.step();
    assert!(p.server_events.contains(&ServerEvent::Delivered {
        seq: pending,
        tag: 8
    }));
    // The device's message that the old process had not acknowledged: its resend is taken.
    p.advance(Duration::from_secs(11));
    assert!(
        p.server_events
            .iter()
            .any(|e| matches!(e, ServerEvent::Message { seq, .. } if *seq == mine)),
        "{:?}",
        p.server_events
    );
    assert!(p.device_events.contains(&DeviceEvent::Acked { seq: mine }));
    // Every cut of the copy is a typed error, never a panic or a session.
    for cut in 0..bytes.len() {
        assert!(ServerSession::import(&bytes[..cut], p.now).is_err());
    }
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        ServerSession::import(&long, p.now).err(),
        Some(HandoffError::Trailing(1))
    );
    let mut other = bytes.clone();
    other[4] = 9;
    assert_eq!(
        ServerSession::import(&other, p.now).err(),
        Some(HandoffError::UnsupportedFormat(9))
    );
    // Only an established session moves.
    let key = derive_device_key(SECRET, DeviceId(42));
    assert!(matches!(
        awaiting_hello(&key).export(p.now),
        Err(HandoffError::NotEstablished(_))
    ));
}

#[test]
fn a_refused_message_is_taken_when_resent_and_nothing_is_acked_past_it() {
    let mut p = Pair::new();
    p.established();
    p.auto_ack = false;
    let one = p.device_send(b"1");
    let two = p.device_send(b"2");
    p.step();
    // The driver takes 1, but finds no agent for 2.
    p.server.ack_received(one);
    p.server.refuse_received(two);
    p.step();
    assert!(p.device_events.contains(&DeviceEvent::Acked { seq: one }));
    // 3 arrives before 2 is resent: not taken (an ack of 3 would cover 2).
    let three = p.device_send(b"3");
    p.server_events.clear();
    p.step();
    assert!(
        !p.server_events
            .iter()
            .any(|e| matches!(e, ServerEvent::Message { .. })),
        "{:?}",
        p.server_events
    );
    // The device's resend timer sends 2 and 3 again: both taken, in order.
    p.auto_ack = true;
    p.advance(Duration::from_secs(11));
    let got: Vec<u64> = p
        .server_events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Message { seq, .. } => Some(seq.0),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![two.0, three.0]);
    assert_eq!(p.device.unacked(), 0);
}
