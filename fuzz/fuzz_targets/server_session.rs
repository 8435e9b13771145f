//! Drives `tether_protocol::server::ServerSession` with a sequence of device input (arbitrary
//! bytes, and well-formed frames built from arbitrary fields, whole, split, cut short or with
//! a byte changed), time steps and the driver's calls (`authenticate` with the right key, a
//! wrong key or none, `send`, `ack_received`, `close`, `take_carried`, `take_unacked`, a new
//! connection that inherits the stream), draining events and output after every step.
//!
//! Checked after every step, besides "no panic":
//! - every byte `poll_transmit` hands out decodes as whole frames of a server → device type;
//!   the first is the `Challenge` with the session's nonce; an `Error` or `Goodbye` is the last
//!   frame the session ever sends, and a close for a reason with a wire code sends it;
//! - `Hello` only while expecting one, naming what the first frame fed said; `Message`,
//!   `Delivered` and `Code` only once established; `Closed` exactly once, last; nothing at all
//!   (no event, no byte) after it;
//! - `authenticate` succeeds exactly when the key is the claimed device's and the proof is
//!   right for this connection's nonce; `device()` is `Some` only then (and still names it once closed);
//! - the stream: sends are numbered 1, 2, … and refused exactly when the outbox is full or the
//!   message too large; `Delivered` comes in order, once per send, with its tag; device
//!   messages come up with rising seqs; `take_unacked` and a carried stream hold exactly the
//!   undelivered sends, and a successor's `Welcome` resends them;
//! - deadlines: `poll_timeout` is set exactly while expecting `Hello` or established, and
//!   `handle_timeout` at or past it closes the session with the matching reason.
#![no_main]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tether_protocol::auth::{DeviceKey, Nonce, Proof, derive_device_key, prove};
use tether_protocol::codec::{DEFAULT_MAX_FRAME, FrameDecoder};
use tether_protocol::message::{GoodbyeReason, Hello, Resume};
use tether_protocol::server::{Carried, ServerConfig, ServerEvent, ServerSession};
use tether_protocol::{
    AgentMessage, AuthError, CloseReason, CodeVersion, DeviceId, DeviceMessage, Digest,
    MessageType, PROTOCOL_VERSION, SendError, Seq, SessionId,
};

const SECRET: &[u8] = b"fuzz server secret";
/// Operations past this many are ignored (bounds one run's time).
const MAX_OPS: usize = 256;
/// The frame limit used when the input asks for small frames.
const SMALL_FRAME: u32 = 300;

#[derive(Arbitrary, Debug)]
struct Input {
    small_frames: bool,
    outbox_limit: u8,
    heartbeat_s: u8,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Well-formed frames, concatenated and fed in pieces cut at `splits`.
    Frames {
        frames: Vec<Frame>,
        splits: Vec<u16>,
    },
    /// One well-formed frame with one byte changed.
    Corrupt {
        frame: Frame,
        at: u16,
        xor: u8,
    },
    /// The first `keep` bytes of a well-formed frame.
    Truncated {
        frame: Frame,
        keep: u16,
    },
    /// Anything.
    Raw(Vec<u8>),
    /// Time passes; then `handle_timeout`.
    Advance {
        ms: u32,
    },
    Authenticate {
        key: KeyChoice,
        session: u64,
        carried: bool,
    },
    Send {
        topic: Vec<u8>,
        payload_len: u16,
        tag: u64,
    },
    AckReceived(SeqChoice),
    OfferCode {
        version: u64,
        size: u64,
    },
    Chunk {
        version: u64,
        offset: u64,
        len: u16,
    },
    Close {
        reason: u8,
        retry_after_ms: u32,
    },
    TakeCarried,
    TakeUnacked,
    /// A new connection (the current one is dropped).
    Reconnect {
        nonce: [u8; 32],
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum KeyChoice {
    Right,
    Wrong,
    Unknown,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ProofChoice {
    Right,
    OtherNonce,
    OtherDevice,
    OtherVersion,
    Garbage([u8; 32]),
}

/// A seq relative to the relevant counter (the device's last sent seq for `Msg`, the server's
/// last sent seq for `Ack`, the last delivered device seq for `ack_received`).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum SeqChoice {
    Next,
    Last,
    Back(u8),
    Ahead(u8),
    Abs(u64),
}

#[derive(Arbitrary, Debug)]
enum Frame {
    Hello {
        device: u8,
        other_version: Option<u16>,
        proof: ProofChoice,
        code_version: u64,
        fw_version: Vec<u8>,
        resume: Option<(u64, u64)>,
    },
    Msg {
        seq: SeqChoice,
        topic: Vec<u8>,
        payload: Vec<u8>,
    },
    Ack(SeqChoice),
    Ping(u64),
    Pong(u64),
    CodeRequest {
        version: u64,
        offset: u64,
    },
    CodeAck {
        version: u64,
        offset: u64,
    },
    CodeDone {
        version: u64,
        ok: bool,
    },
    /// Any reason code, valid or not.
    Goodbye {
        reason: u16,
        retry_after_ms: u32,
        redirect: Vec<u8>,
    },
    /// Any error code, valid or not.
    Error {
        code: u16,
        message: Vec<u8>,
    },
    /// A message a device may not send.
    Wrong(WrongMsg),
}

#[derive(Arbitrary, Debug)]
enum WrongMsg {
    Challenge([u8; 32]),
    Welcome {
        session: u64,
        rx_seq: u64,
    },
    CodeOffer {
        version: u64,
        size: u64,
    },
    CodeChunk {
        version: u64,
        offset: u64,
        data: Vec<u8>,
    },
    Send {
        device: u64,
        tag: u64,
        payload: Vec<u8>,
    },
    DeliverAck {
        device: u64,
        seq: u64,
    },
    AgentHello {
        token: Vec<u8>,
    },
    Deploy {
        blob: Vec<u8>,
    },
}

/// A `Vec<u8>` cut to a short field's 255 bytes.
fn short(v: &[u8]) -> Bytes {
    Bytes::copy_from_slice(&v[..v.len().min(255)])
}

fn seq_from(base: u64, c: SeqChoice) -> u64 {
    match c {
        SeqChoice::Next => base.saturating_add(1),
        SeqChoice::Last => base,
        SeqChoice::Back(n) => base.saturating_sub(u64::from(n)),
        SeqChoice::Ahead(n) => base.saturating_add(u64::from(n) + 1),
        SeqChoice::Abs(s) => s,
    }
}

fn key_of(device: DeviceId) -> DeviceKey {
    derive_device_key(SECRET, device)
}

/// What the harness knows of one device's message stream (it moves with `take_carried`).
#[derive(Debug, Default, Clone)]
struct StreamModel {
    /// The last seq `send` assigned.
    tx_seq: u64,
    /// Sends not yet delivered: (seq, tag).
    pending: VecDeque<(u64, u64)>,
    /// The highest device seq handed up as `Message`.
    rx_seq: u64,
    /// The last seq acknowledged with `ack_received`.
    rx_acked: u64,
}

#[derive(Debug)]
enum Phase {
    ExpectHello,
    Authenticating(Box<Hello>),
    Established(DeviceId),
    Closed,
}

struct Step {
    events: Vec<ServerEvent>,
    frames: Vec<DeviceMessage>,
}

struct Harness {
    now: Instant,
    cfg: ServerConfig,
    s: ServerSession,
    nonce: Nonce,
    phase: Phase,
    /// The device the session was established as (it still names it once closed).
    established_as: Option<DeviceId>,
    /// Every byte fed to this session (to check what `Hello` reported).
    fed: BytesMut,
    /// An `Error` or `Goodbye` went out: nothing may follow.
    final_sent: bool,
    /// The device's last sent `Msg` seq.
    dev_seq: u64,
    stream: StreamModel,
    /// A stream taken with `take_carried`, for the next `authenticate`.
    carried: Option<(Carried, StreamModel)>,
}

impl Harness {
    fn new(input: &Input) -> Harness {
        let heartbeat = Duration::from_secs(1 + u64::from(input.heartbeat_s % 60));
        let cfg = ServerConfig {
            max_frame: if input.small_frames {
                SMALL_FRAME
            } else {
                DEFAULT_MAX_FRAME
            },
            heartbeat,
            idle_timeout: heartbeat * 5 / 2,
            hello_timeout: Duration::from_secs(10),
            outbox_limit: u32::from(input.outbox_limit % 65),
        };
        let now = Instant::now();
        let nonce = Nonce([7; 32]);
        let s = ServerSession::new(&cfg, nonce, now);
        let mut h = Harness {
            now,
            cfg,
            s,
            nonce,
            phase: Phase::ExpectHello,
            established_as: None,
            fed: BytesMut::new(),
            final_sent: false,
            dev_seq: 0,
            stream: StreamModel::default(),
            carried: None,
        };
        h.expect_challenge();
        h
    }

    fn reconnect(&mut self, nonce: [u8; 32]) {
        self.nonce = Nonce(nonce);
        self.s = ServerSession::new(&self.cfg, self.nonce, self.now);
        self.phase = Phase::ExpectHello;
        self.established_as = None;
        self.fed.clear();
        self.final_sent = false;
        self.stream = StreamModel::default();
        self.expect_challenge();
    }

    fn expect_challenge(&mut self) {
        assert_eq!(self.s.poll_event(), None, "an event from a new session");
        let mut buf = BytesMut::new();
        assert!(self.s.poll_transmit(&mut buf), "a new session sends");
        assert_eq!(
            decode_output(&buf),
            [DeviceMessage::Challenge { nonce: self.nonce }],
            "a new session sends exactly its Challenge"
        );
        self.check_state();
    }

    fn closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    fn established(&self) -> bool {
        matches!(self.phase, Phase::Established(_))
    }

    /// Drains events and output, checks them against the model and the state after.
    fn step(&mut self) -> Step {
        let was_closed = self.closed();
        let mut events = Vec::new();
        while let Some(e) = self.s.poll_event() {
            events.push(e);
            assert!(events.len() <= 100_000, "unbounded events");
        }
        let mut buf = BytesMut::new();
        let sent = self.s.poll_transmit(&mut buf);
        assert_eq!(sent, !buf.is_empty(), "poll_transmit's answer");
        let frames = decode_output(&buf);
        if was_closed || self.final_sent {
            assert!(
                events.is_empty() && frames.is_empty(),
                "activity after close: {events:?} {frames:?}"
            );
        }
        for (i, f) in frames.iter().enumerate() {
            use MessageType as T;
            match f.ty() {
                T::Challenge => panic!("a Challenge after the first: {f:?}"),
                T::Welcome | T::Pong | T::Msg | T::Ack | T::CodeOffer | T::CodeChunk => {}
                T::Goodbye | T::Error => {
                    assert_eq!(i, frames.len() - 1, "frames after {f:?}: {frames:?}");
                    self.final_sent = true;
                }
                other => panic!("the server sent a {other} to a device"),
            }
        }
        for (i, e) in events.iter().enumerate() {
            match e {
                ServerEvent::Hello {
                    device,
                    code_version,
                    fw_version,
                    resume,
                } => {
                    assert!(
                        matches!(self.phase, Phase::ExpectHello),
                        "Hello while {:?}",
                        self.phase
                    );
                    let hello = self.first_frame_fed();
                    assert_eq!(hello.version, PROTOCOL_VERSION);
                    assert_eq!(
                        (
                            hello.device,
                            hello.code_version,
                            &hello.fw_version,
                            hello.resume
                        ),
                        (*device, *code_version, fw_version, *resume),
                        "Hello event against the frame"
                    );
                    self.phase = Phase::Authenticating(Box::new(hello));
                }
                ServerEvent::Message { seq, .. } => {
                    assert!(self.established(), "Message while {:?}", self.phase);
                    assert!(
                        seq.0 > self.stream.rx_seq,
                        "Message seq {seq} after {}",
                        self.stream.rx_seq
                    );
                    self.stream.rx_seq = seq.0;
                }
                ServerEvent::Delivered { seq, tag } => {
                    assert!(self.established(), "Delivered while {:?}", self.phase);
                    let want = self.stream.pending.pop_front();
                    assert_eq!(want, Some((seq.0, *tag)), "Delivered out of order");
                }
                ServerEvent::Code(_) => {
                    assert!(self.established(), "Code event while {:?}", self.phase)
                }
                ServerEvent::Closed(reason) => {
                    assert_eq!(i, events.len() - 1, "events after Closed: {events:?}");
                    assert!(!self.closed(), "a second Closed");
                    self.phase = Phase::Closed;
                    let last = frames.last();
                    match (reason, reason.wire_code()) {
                        (_, Some(code)) => assert!(
                            matches!(last, Some(DeviceMessage::Error { code: c, .. }) if *c == code),
                            "close for {reason} without its Error frame: {frames:?}"
                        ),
                        (CloseReason::Local(r), None) => assert!(
                            matches!(last, Some(DeviceMessage::Goodbye { reason: g, .. }) if g == r),
                            "local close without Goodbye: {frames:?}"
                        ),
                        _ => {}
                    }
                }
            }
        }
        if self.final_sent {
            assert!(self.closed(), "Error/Goodbye sent but the session is open");
        }
        self.check_state();
        Step { events, frames }
    }

    fn check_state(&self) {
        let s = &self.s;
        assert_eq!(
            s.is_closed(),
            self.closed(),
            "is_closed while {:?}",
            self.phase
        );
        let established = match self.phase {
            Phase::Established(d) => Some(d),
            _ => None,
        };
        // A closed session still names the device it was established as (its driver releases
        // what it holds for that device when it handles the close).
        let device = match self.phase {
            Phase::Closed => self.established_as,
            _ => established,
        };
        assert_eq!(s.device(), device, "device() while {:?}", self.phase);
        assert_eq!(s.session_id().is_some(), established.is_some());
        let pending = match &self.phase {
            Phase::Authenticating(h) => Some(h.device),
            _ => None,
        };
        assert_eq!(s.pending_device(), pending);
        assert_eq!(s.awaiting_auth(), pending.is_some());
        let timed = matches!(self.phase, Phase::ExpectHello | Phase::Established(_));
        assert_eq!(
            s.poll_timeout().is_some(),
            timed,
            "poll_timeout while {:?}",
            self.phase
        );
        assert_eq!(s.unacked(), self.stream.pending.len(), "unacked()");
        assert!(s.unacked() <= self.cfg.outbox_limit as usize);
    }

    /// The first frame fed to this session, which a `Hello` event must describe.
    fn first_frame_fed(&self) -> Hello {
        let mut d = FrameDecoder::new(self.cfg.max_frame);
        d.push(&self.fed);
        let frame = d.next_frame().expect("first frame decodes").expect("whole");
        match DeviceMessage::decode(frame) {
            Ok(DeviceMessage::Hello(h)) => h,
            other => panic!("Hello event, but the first frame was {other:?}"),
        }
    }

    fn feed(&mut self, data: &[u8]) -> Step {
        self.fed.extend_from_slice(data);
        self.s.handle_bytes(self.now, data);
        self.step()
    }

    fn encode(&mut self, f: &Frame, dst: &mut BytesMut) {
        let m = match f {
            Frame::Hello {
                device,
                other_version,
                proof,
                code_version,
                fw_version,
                resume,
            } => {
                let device = DeviceId(u64::from(*device));
                let version = other_version.unwrap_or(PROTOCOL_VERSION);
                let key = key_of(device);
                let proof = match *proof {
                    ProofChoice::Right => prove(&key, &self.nonce, device, version),
                    ProofChoice::OtherNonce => {
                        let mut n = self.nonce;
                        n.0[0] ^= 1;
                        prove(&key, &n, device, version)
                    }
                    ProofChoice::OtherDevice => prove(
                        &key_of(DeviceId(device.0 + 1)),
                        &self.nonce,
                        device,
                        version,
                    ),
                    ProofChoice::OtherVersion => {
                        prove(&key, &self.nonce, device, version.wrapping_add(1))
                    }
                    ProofChoice::Garbage(p) => Proof(p),
                };
                DeviceMessage::Hello(Hello {
                    version,
                    device,
                    proof,
                    code_version: CodeVersion(*code_version),
                    fw_version: short(fw_version),
                    resume: resume.map(|(s, r)| Resume {
                        session: SessionId(s),
                        rx_seq: Seq(r),
                    }),
                })
            }
            Frame::Msg {
                seq,
                topic,
                payload,
            } => {
                let seq = seq_from(self.dev_seq, *seq);
                self.dev_seq = self.dev_seq.max(seq);
                DeviceMessage::Msg {
                    seq: Seq(seq),
                    topic: Bytes::copy_from_slice(&topic[..topic.len().min(u16::MAX as usize)]),
                    payload: Bytes::copy_from_slice(payload),
                }
            }
            Frame::Ack(c) => DeviceMessage::Ack {
                seq: Seq(seq_from(self.stream.tx_seq, *c)),
            },
            Frame::Ping(id) => DeviceMessage::Ping { id: *id },
            Frame::Pong(id) => DeviceMessage::Pong { id: *id },
            Frame::CodeRequest { version, offset } => DeviceMessage::CodeRequest {
                version: CodeVersion(*version),
                offset: *offset,
            },
            Frame::CodeAck { version, offset } => DeviceMessage::CodeAck {
                version: CodeVersion(*version),
                offset: *offset,
            },
            Frame::CodeDone { version, ok } => DeviceMessage::CodeDone {
                version: CodeVersion(*version),
                ok: *ok,
            },
            Frame::Goodbye {
                reason,
                retry_after_ms,
                redirect,
            } => {
                let redirect = short(redirect);
                let mut body = BytesMut::new();
                body.put_u16(*reason);
                body.put_u32(*retry_after_ms);
                body.put_u8(redirect.len() as u8);
                body.put_slice(&redirect);
                return raw_frame(dst, MessageType::Goodbye, &body);
            }
            Frame::Error { code, message } => {
                let mut body = BytesMut::new();
                body.put_u16(*code);
                body.put_slice(message);
                return raw_frame(dst, MessageType::Error, &body);
            }
            Frame::Wrong(w) => return wrong_message(w, dst),
        };
        m.encode(dst).expect("short fields were cut to length");
    }

    fn frames(&mut self, frames: &[Frame]) -> BytesMut {
        let mut b = BytesMut::new();
        for f in frames {
            self.encode(f, &mut b);
        }
        b
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Frames { frames, splits } => {
                let bytes = self.frames(frames);
                let mut at = 0;
                for cut in tether_fuzz::read_ends(splits, bytes.len()) {
                    self.feed(&bytes[at..cut]);
                    at = cut;
                }
            }
            Op::Corrupt { frame, at, xor } => {
                let mut bytes = self.frames(std::slice::from_ref(frame));
                let i = usize::from(*at) % bytes.len();
                bytes[i] ^= xor | 1;
                self.feed(&bytes);
            }
            Op::Truncated { frame, keep } => {
                let bytes = self.frames(std::slice::from_ref(frame));
                let keep = usize::from(*keep) % bytes.len();
                self.feed(&bytes[..keep]);
            }
            Op::Raw(data) => {
                self.feed(data);
            }
            Op::Advance { ms } => {
                let deadline = self.s.poll_timeout();
                self.now += Duration::from_millis(u64::from(*ms));
                let was = std::mem::discriminant(&self.phase);
                let expired = deadline.is_some_and(|d| self.now >= d);
                self.s.handle_timeout(self.now);
                let st = self.step();
                if expired {
                    let want = match self.phase {
                        Phase::Closed if was == std::mem::discriminant(&Phase::ExpectHello) => {
                            CloseReason::HandshakeTimeout
                        }
                        Phase::Closed => CloseReason::IdleTimeout,
                        _ => panic!("deadline passed, session still {:?}", self.phase),
                    };
                    assert_eq!(st.events, [ServerEvent::Closed(want)]);
                } else {
                    assert!(
                        st.events.is_empty() && st.frames.is_empty(),
                        "early timeout"
                    );
                }
            }
            Op::Authenticate {
                key,
                session,
                carried,
            } => self.authenticate(*key, SessionId(*session), *carried),
            Op::Send {
                topic,
                payload_len,
                tag,
            } => {
                let topic = Bytes::copy_from_slice(topic);
                let payload = Bytes::from(vec![0xa5; usize::from(*payload_len)]);
                let size = 1 + 8 + 2 + topic.len() + payload.len();
                let want = if !self.established() {
                    Err(SendError::Closed)
                } else if self.stream.pending.len() >= self.cfg.outbox_limit as usize {
                    Err(SendError::OutboxFull {
                        limit: self.cfg.outbox_limit,
                    })
                } else if size > self.cfg.max_frame as usize {
                    Err(SendError::TooLarge {
                        limit: self.cfg.max_frame,
                        got: size as u32,
                    })
                } else {
                    Ok(Seq(self.stream.tx_seq + 1))
                };
                let got = self.s.send(topic.clone(), payload.clone(), *tag);
                assert_eq!(got, want, "send");
                if let Ok(seq) = got {
                    self.stream.tx_seq = seq.0;
                    self.stream.pending.push_back((seq.0, *tag));
                }
                let st = self.step();
                let sent = match got {
                    Ok(seq) => vec![DeviceMessage::Msg {
                        seq,
                        topic,
                        payload,
                    }],
                    Err(_) => vec![],
                };
                assert_eq!(st.frames, sent, "send's output");
                assert!(st.events.is_empty());
            }
            Op::AckReceived(c) => {
                let seq = seq_from(self.stream.rx_seq, *c);
                let m = &self.stream;
                let acks = !self.closed() && seq > m.rx_acked && seq <= m.rx_seq;
                if acks {
                    self.stream.rx_acked = seq;
                }
                self.s.ack_received(Seq(seq));
                let st = self.step();
                let want = if acks {
                    vec![DeviceMessage::Ack { seq: Seq(seq) }]
                } else {
                    vec![]
                };
                assert_eq!(st.frames, want, "ack_received({seq})");
            }
            Op::OfferCode { version, size } => {
                let digest = Digest([3; 32]);
                let got = self.s.offer_code(CodeVersion(*version), *size, digest);
                let m = DeviceMessage::CodeOffer {
                    version: CodeVersion(*version),
                    size: *size,
                    digest,
                };
                self.control(got, m);
            }
            Op::Chunk {
                version,
                offset,
                len,
            } => {
                let m = DeviceMessage::CodeChunk {
                    version: CodeVersion(*version),
                    offset: *offset,
                    data: Bytes::from(vec![0x5a; usize::from(*len)]),
                };
                let got = self.s.send_control(&m);
                self.control(got, m);
            }
            Op::Close {
                reason,
                retry_after_ms,
            } => {
                let r = GoodbyeReason::from_u16(u16::from(*reason % 6)).expect("0..=5");
                let was_open = !self.closed();
                self.s.close(r, *retry_after_ms);
                let st = self.step();
                if was_open {
                    assert_eq!(st.events, [ServerEvent::Closed(CloseReason::Local(r))]);
                    assert_eq!(
                        st.frames,
                        [DeviceMessage::Goodbye {
                            reason: r,
                            retry_after_ms: *retry_after_ms,
                            redirect: Bytes::new(),
                        }]
                    );
                }
            }
            Op::TakeCarried => {
                let was = self.s.session_id();
                let got = self.s.take_carried();
                assert_eq!(
                    got.is_some(),
                    was.is_some(),
                    "take_carried when established"
                );
                if let Some(c) = got {
                    assert_eq!(c.session, was.expect("checked"));
                    assert_eq!(c.unacked(), self.stream.pending.len());
                    let model = std::mem::take(&mut self.stream);
                    self.carried = Some((c, model));
                    let st = self.step();
                    assert_eq!(
                        st.events,
                        [ServerEvent::Closed(CloseReason::Local(
                            GoodbyeReason::Replaced
                        ))]
                    );
                } else {
                    let st = self.step();
                    assert!(st.events.is_empty() && st.frames.is_empty());
                }
            }
            Op::TakeUnacked => {
                let got: Vec<(u64, u64)> = self
                    .s
                    .take_unacked()
                    .iter()
                    .map(|m| (m.seq.0, m.tag))
                    .collect();
                let want: Vec<(u64, u64)> = self.stream.pending.drain(..).collect();
                assert_eq!(got, want, "take_unacked");
                let st = self.step();
                assert!(st.events.is_empty() && st.frames.is_empty());
            }
            Op::Reconnect { nonce } => self.reconnect(*nonce),
        }
    }

    fn control(&mut self, got: Result<(), SendError>, m: DeviceMessage) {
        let len = 1 + m.body_len();
        let want = if !self.established() {
            Err(SendError::Closed)
        } else if len > self.cfg.max_frame as usize {
            Err(SendError::TooLarge {
                limit: self.cfg.max_frame,
                got: len as u32,
            })
        } else {
            Ok(())
        };
        assert_eq!(got, want, "control message");
        let st = self.step();
        let sent = if got.is_ok() { vec![m] } else { vec![] };
        assert_eq!(st.frames, sent);
        assert!(st.events.is_empty());
    }

    fn authenticate(&mut self, choice: KeyChoice, session: SessionId, use_carried: bool) {
        let carried = if use_carried {
            self.carried.take()
        } else {
            None
        };
        let hello = match &self.phase {
            Phase::Authenticating(h) => Some(h.as_ref().clone()),
            _ => None,
        };
        let key = hello.as_ref().and_then(|h| match choice {
            KeyChoice::Right => Some(key_of(h.device)),
            KeyChoice::Wrong => Some(key_of(DeviceId(h.device.0 ^ 0x5a5a))),
            KeyChoice::Unknown => None,
        });
        let want = match (&hello, &key) {
            (None, _) => Err(AuthError::NoHelloPending),
            (Some(_), None) => Err(AuthError::UnknownDevice),
            (Some(h), Some(k)) => {
                if h.proof == prove(k, &self.nonce, h.device, h.version) {
                    Ok(h.device)
                } else {
                    Err(AuthError::BadProof)
                }
            }
        };
        let (c, model) = match carried {
            Some((c, m)) => (Some(c), Some(m)),
            None => (None, None),
        };
        let want_session = c.as_ref().map_or(session, |c| c.session);
        let got = self.s.authenticate(self.now, key.as_ref(), session, 99, c);
        assert_eq!(got, want, "authenticate");
        if let Ok(device) = got {
            self.phase = Phase::Established(device);
            self.established_as = Some(device);
            self.stream = model.unwrap_or_default();
        }
        let resends: Vec<u64> = self.stream.pending.iter().map(|p| p.0).collect();
        let rx_acked = self.stream.rx_acked;
        let st = self.step();
        match want {
            Ok(_) => {
                let Some(DeviceMessage::Welcome {
                    session,
                    heartbeat_s,
                    server_time_ms,
                    rx_seq,
                }) = st.frames.first()
                else {
                    panic!("no Welcome first: {:?}", st.frames);
                };
                assert_eq!(
                    (*session, u64::from(*heartbeat_s), *server_time_ms, rx_seq.0),
                    (want_session, self.cfg.heartbeat.as_secs(), 99, rx_acked),
                    "Welcome"
                );
                let sent: Vec<u64> = st.frames[1..]
                    .iter()
                    .take(resends.len())
                    .map(|m| match m {
                        DeviceMessage::Msg { seq, .. } => seq.0,
                        other => panic!("{other:?} where a resend belongs"),
                    })
                    .collect();
                assert_eq!(sent, resends, "resent after Welcome");
            }
            Err(AuthError::NoHelloPending) => {
                assert!(st.events.is_empty() && st.frames.is_empty());
            }
            Err(e) => {
                assert_eq!(st.events, [ServerEvent::Closed(CloseReason::Auth(e))]);
            }
        }
    }
}

fn raw_frame(dst: &mut BytesMut, ty: MessageType, body: &[u8]) {
    dst.put_u32(body.len() as u32 + 1);
    dst.put_u8(ty as u8);
    dst.put_slice(body);
}

/// Encodes a message a device may not send: a server → device type, or one of the agent
/// link's (which the device link refuses to decode).
fn wrong_message(w: &WrongMsg, dst: &mut BytesMut) {
    let device = match w {
        WrongMsg::Challenge(n) => DeviceMessage::Challenge { nonce: Nonce(*n) },
        WrongMsg::Welcome { session, rx_seq } => DeviceMessage::Welcome {
            session: SessionId(*session),
            heartbeat_s: 30,
            server_time_ms: 0,
            rx_seq: Seq(*rx_seq),
        },
        WrongMsg::CodeOffer { version, size } => DeviceMessage::CodeOffer {
            version: CodeVersion(*version),
            size: *size,
            digest: Digest([0; 32]),
        },
        WrongMsg::CodeChunk {
            version,
            offset,
            data,
        } => DeviceMessage::CodeChunk {
            version: CodeVersion(*version),
            offset: *offset,
            data: Bytes::copy_from_slice(data),
        },
        WrongMsg::Send {
            device,
            tag,
            payload,
        } => {
            return agent_frame(
                dst,
                AgentMessage::Send {
                    device: DeviceId(*device),
                    tag: *tag,
                    topic: Bytes::from_static(b"t"),
                    payload: Bytes::copy_from_slice(payload),
                },
            );
        }
        WrongMsg::DeliverAck { device, seq } => {
            return agent_frame(
                dst,
                AgentMessage::DeliverAck {
                    device: DeviceId(*device),
                    seq: Seq(*seq),
                },
            );
        }
        WrongMsg::AgentHello { token } => {
            return agent_frame(
                dst,
                AgentMessage::AgentHello {
                    version: 1,
                    token: short(token),
                    name: Bytes::new(),
                },
            );
        }
        WrongMsg::Deploy { blob } => {
            return agent_frame(
                dst,
                AgentMessage::Deploy {
                    group: Bytes::from_static(b"g"),
                    blob: Bytes::copy_from_slice(blob),
                },
            );
        }
    };
    device.encode(dst).expect("no short fields");
}

fn agent_frame(dst: &mut BytesMut, m: AgentMessage) {
    m.encode(dst).expect("short fields were cut to length");
}

/// Decodes the server's output as a device would: whole frames only, every one valid.
fn decode_output(buf: &[u8]) -> Vec<DeviceMessage> {
    let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
    d.push(buf);
    let mut out = Vec::new();
    while let Some(frame) = d.next_frame().expect("server output frames decode") {
        out.push(DeviceMessage::decode(frame).expect("server output messages decode"));
    }
    assert_eq!(d.pending(), 0, "server output ends mid-frame");
    out
}

fuzz_target!(|input: Input| {
    let mut h = Harness::new(&input);
    for op in input.ops.iter().take(MAX_OPS) {
        h.run(op);
    }
});
