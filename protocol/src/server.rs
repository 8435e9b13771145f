//! The server side of a device session.
//!
//! Call order, per connection (quinn-style):
//! 1. [`ServerSession::new`] with a fresh random nonce: it queues the `Challenge`.
//! 2. Feed input with [`handle_bytes`](ServerSession::handle_bytes) and expired deadlines with
//!    [`handle_timeout`](ServerSession::handle_timeout).
//! 3. After each input, drain [`poll_event`](ServerSession::poll_event) (acting on each event),
//!    then [`poll_transmit`](ServerSession::poll_transmit) (write the bytes out), then re-arm
//!    the timer from [`poll_timeout`](ServerSession::poll_timeout).
//! 4. On [`ServerEvent::Hello`], look the device up and call
//!    [`authenticate`](ServerSession::authenticate) (or [`verify`](ServerSession::verify) /
//!    [`verify_credential`](ServerSession::verify_credential) — the latter also for a device
//!    whose TLS client certificate names it — then `establish` or `reject`); until then
//!    further input is buffered undecoded (so the connection can move to the device's home
//!    shard in between).
//! 5. When [`is_closed`](ServerSession::is_closed) and nothing is left to transmit, close the
//!    socket.
//!
//! States: `ExpectHello` → `Authenticating` → `Established` → `Closed`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::auth::{self, DeviceKey, Nonce};
use crate::codec::{DEFAULT_MAX_FRAME, FrameDecoder};
use crate::error::{AuthError, CloseReason, PeerMisbehaved, SendError};
use crate::ids::{CodeVersion, DeviceId, Digest, Seq, SessionId};
use crate::message::{DeviceMessage, GoodbyeReason, Hello, PROTOCOL_VERSION, Resume};
use crate::stream::{Outgoing, Stream};
use crate::thin::{Output, Queue};

/// Server session limits and timings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest frame accepted from a device.
    pub max_frame: u32,
    /// Heartbeat interval told to devices in `Welcome`.
    pub heartbeat: Duration,
    /// Close a session that sent nothing for this long.
    pub idle_timeout: Duration,
    /// Close a connection that sent no `Hello` within this long.
    pub hello_timeout: Duration,
    /// Most unacknowledged messages queued towards one device.
    pub outbox_limit: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let heartbeat = Duration::from_secs(30);
        ServerConfig {
            max_frame: DEFAULT_MAX_FRAME,
            heartbeat,
            idle_timeout: heartbeat * 5 / 2,
            hello_timeout: Duration::from_secs(10),
            outbox_limit: 64,
        }
    }
}

/// Code-transfer requests from the device; the transfer logic lives with the code store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeEvent {
    /// Send `version` from `offset` (start or resume).
    Request {
        /// Version wanted.
        version: CodeVersion,
        /// First byte wanted.
        offset: u64,
    },
    /// The device holds every byte below `offset`.
    Ack {
        /// Version in transfer.
        version: CodeVersion,
        /// Bytes received so far.
        offset: u64,
    },
    /// The device finished: `ok` if the digest matched and it switched.
    Done {
        /// Version transferred.
        version: CodeVersion,
        /// Whether it verified.
        ok: bool,
    },
}

/// What the session tells its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// The device introduced itself: authenticate it.
    Hello {
        /// Claimed id.
        device: DeviceId,
        /// Code version it runs.
        code_version: CodeVersion,
        /// Firmware version text.
        fw_version: Bytes,
        /// Its resume point, if any.
        resume: Option<Resume>,
    },
    /// A new message from the device. Call [`ServerSession::ack_received`] once it is safely
    /// handed on; until then the device keeps it for resending.
    Message {
        /// Its seq.
        seq: Seq,
        /// Topic.
        topic: Bytes,
        /// Payload.
        payload: Bytes,
    },
    /// The device acknowledged a message sent with [`ServerSession::send`].
    Delivered {
        /// Its seq.
        seq: Seq,
        /// The tag given to `send`.
        tag: u64,
    },
    /// A code-transfer message.
    Code(CodeEvent),
    /// The session ended; flush [`ServerSession::poll_transmit`] and close.
    Closed(CloseReason),
}

/// Stream state carried from a replaced session to its successor.
#[derive(Debug, Default)]
pub struct Carried {
    /// The session id to keep.
    pub session: SessionId,
    stream: Stream,
}

impl Carried {
    /// Messages still unacknowledged by the device.
    pub fn unacked(&self) -> usize {
        self.stream.unacked()
    }
}

/// Proof that a session's pending `Hello` verified (from [`ServerSession::verify`]); the
/// only way to [`establish`](ServerSession::establish) a session.
#[derive(Debug)]
#[must_use]
pub struct Verified {
    device: DeviceId,
}

impl Verified {
    /// The device the proof was for.
    pub fn device(&self) -> DeviceId {
        self.device
    }
}

/// What vouches for a pending `Hello`, for [`ServerSession::verify_credential`].
#[derive(Clone, Copy, Debug)]
pub enum Credential<'a> {
    /// The `Hello`'s proof, checked against the device's key.
    Key(&'a DeviceKey),
    /// The TLS layer verified a client certificate naming this device (`None`: it names no
    /// device). No proof is checked; a `Hello` naming another device is refused as a bad
    /// proof is.
    Certificate(Option<DeviceId>),
}

#[derive(Debug)]
enum State {
    ExpectHello {
        nonce: Nonce,
    },
    Authenticating {
        nonce: Nonce,
        hello: Box<Hello>,
    },
    Established {
        device: DeviceId,
        session: SessionId,
    },
    /// Ended; `device` if it was established (so its driver can still release the device).
    Closed {
        device: Option<DeviceId>,
    },
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::ExpectHello { .. } => "expecting Hello",
            State::Authenticating { .. } => "authenticating",
            State::Established { .. } => "established",
            State::Closed { .. } => "closed",
        }
    }
}

/// The server end of one device connection. See the module doc for the call order.
#[derive(Debug)]
pub struct ServerSession {
    state: State,
    decoder: FrameDecoder,
    tx: Output,
    events: Queue<ServerEvent>,
    deadline: Instant,
    idle_timeout: Duration,
    heartbeat_s: u16,
    /// A received message was refused ([`refuse_received`](Self::refuse_received)), or the
    /// session was handed over: until the device resends from the first message not
    /// acknowledged, only the next seq in order is taken, so nothing is acknowledged —
    /// cumulatively — past one that was not handed on.
    rx_gap: bool,
    outbox_limit: u32,
    stream: Stream,
}

impl ServerSession {
    /// A session for a freshly accepted connection; `nonce` must be fresh random bytes.
    pub fn new(config: &ServerConfig, nonce: Nonce, now: Instant) -> Self {
        let mut tx = Output::default();
        let _ = DeviceMessage::Challenge { nonce }.encode(tx.buf());
        ServerSession {
            state: State::ExpectHello { nonce },
            decoder: FrameDecoder::new(config.max_frame),
            tx,
            events: Queue::default(),
            deadline: now + config.hello_timeout,
            idle_timeout: config.idle_timeout,
            heartbeat_s: config.heartbeat.as_secs().clamp(1, u16::MAX as u64) as u16,
            rx_gap: false,
            outbox_limit: config.outbox_limit,
            stream: Stream::default(),
        }
    }

    /// The authenticated device: once established, and still after that session closed (so
    /// its driver can release what it holds for the device when handling the close).
    pub fn device(&self) -> Option<DeviceId> {
        match self.state {
            State::Established { device, .. }
            | State::Closed {
                device: Some(device),
            } => Some(device),
            _ => None,
        }
    }

    /// Ends the session's state machine, keeping the device if it was established.
    fn set_closed(&mut self) {
        self.state = State::Closed {
            device: self.device(),
        };
    }

    /// The session id, once established.
    pub fn session_id(&self) -> Option<SessionId> {
        match self.state {
            State::Established { session, .. } => Some(session),
            _ => None,
        }
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    /// The device whose `Hello` waits for [`authenticate`](Self::authenticate).
    pub fn pending_device(&self) -> Option<DeviceId> {
        match &self.state {
            State::Authenticating { hello, .. } => Some(hello.device),
            _ => None,
        }
    }

    /// The code version named by the `Hello` that waits for [`authenticate`](Self::authenticate).
    pub fn pending_code_version(&self) -> Option<CodeVersion> {
        match &self.state {
            State::Authenticating { hello, .. } => Some(hello.code_version),
            _ => None,
        }
    }

    /// Whether the session waits for [`authenticate`](Self::authenticate).
    pub fn awaiting_auth(&self) -> bool {
        matches!(self.state, State::Authenticating { .. })
    }

    /// Feeds bytes received from the device.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        if self.is_closed() {
            return;
        }
        self.decoder.push(data);
        self.process(now);
    }

    fn process(&mut self, now: Instant) {
        // While authenticating, input stays buffered undecoded.
        while !self.is_closed() && !self.awaiting_auth() {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => match DeviceMessage::decode(frame) {
                    Ok(m) => self.on_message(now, m),
                    Err(e) => self.fail(PeerMisbehaved::Decode(e).into()),
                },
                Ok(None) => break,
                Err(e) => self.fail(PeerMisbehaved::Decode(e).into()),
            }
        }
    }

    fn on_message(&mut self, now: Instant, m: DeviceMessage) {
        if matches!(self.state, State::Established { .. }) {
            self.deadline = now + self.idle_timeout;
            self.on_established(m);
            return;
        }
        let state = std::mem::replace(&mut self.state, State::Closed { device: None });
        match (state, m) {
            (State::ExpectHello { nonce }, DeviceMessage::Hello(hello)) => {
                if hello.version != PROTOCOL_VERSION {
                    self.fail(
                        PeerMisbehaved::UnsupportedVersion {
                            got: hello.version,
                            supported: PROTOCOL_VERSION,
                        }
                        .into(),
                    );
                    return;
                }
                self.events.push_back(ServerEvent::Hello {
                    device: hello.device,
                    code_version: hello.code_version,
                    fw_version: hello.fw_version.clone(),
                    resume: hello.resume,
                });
                self.state = State::Authenticating {
                    nonce,
                    hello: Box::new(hello),
                };
            }
            (s, m) => self.fail(
                PeerMisbehaved::UnexpectedMessage {
                    state: s.name(),
                    got: m.ty(),
                }
                .into(),
            ),
        }
    }

    fn on_established(&mut self, m: DeviceMessage) {
        match m {
            DeviceMessage::Ping { id } => {
                let _ = DeviceMessage::Pong { id }.encode(self.tx.buf());
            }
            DeviceMessage::Pong { .. } => {}
            DeviceMessage::Msg {
                seq,
                topic,
                payload,
            } => {
                let in_order = !self.rx_gap || seq == self.stream.rx_seq.next();
                if in_order && self.stream.receive(seq) {
                    self.rx_gap = false;
                    self.events.push_back(ServerEvent::Message {
                        seq,
                        topic,
                        payload,
                    });
                } else if seq <= self.stream.rx_acked {
                    // A resend of something already acknowledged: the ack was lost.
                    let _ = DeviceMessage::Ack { seq }.encode(self.tx.buf());
                }
            }
            DeviceMessage::Ack { seq } => {
                let events = &mut self.events;
                if let Err(e) = self.stream.ack(seq, |m| {
                    events.push_back(ServerEvent::Delivered {
                        seq: m.seq,
                        tag: m.tag,
                    })
                }) {
                    self.fail(e.into());
                }
            }
            DeviceMessage::CodeRequest { version, offset } => self
                .events
                .push_back(ServerEvent::Code(CodeEvent::Request { version, offset })),
            DeviceMessage::CodeAck { version, offset } => self
                .events
                .push_back(ServerEvent::Code(CodeEvent::Ack { version, offset })),
            DeviceMessage::CodeDone { version, ok } => self
                .events
                .push_back(ServerEvent::Code(CodeEvent::Done { version, ok })),
            DeviceMessage::Goodbye { reason, .. } => {
                self.set_closed();
                self.events
                    .push_back(ServerEvent::Closed(CloseReason::PeerGoodbye(reason)));
            }
            DeviceMessage::Error { code, .. } => {
                self.set_closed();
                self.events
                    .push_back(ServerEvent::Closed(CloseReason::PeerError(code)));
            }
            other => self.fail(
                PeerMisbehaved::UnexpectedMessage {
                    state: "established",
                    got: other.ty(),
                }
                .into(),
            ),
        }
    }

    /// Closes with an `Error` frame telling the device why.
    fn fail(&mut self, reason: CloseReason) {
        if let Some(code) = reason.wire_code() {
            let _ = DeviceMessage::Error {
                code,
                message: Bytes::from(reason.wire_message()),
            }
            .encode(self.tx.buf());
        }
        self.set_closed();
        self.decoder.clear();
        self.events.push_back(ServerEvent::Closed(reason));
    }

    /// Checks the pending `Hello`'s proof against `key` (the device's key, or `None` if the
    /// registry does not know the device) **without changing anything**: the driver decides
    /// what a verified connection may displace (an older session of the same device) only after
    /// this succeeds, and hands the result to [`establish`](Self::establish). An unknown device
    /// costs the same HMAC as a known one (against a fixed dummy key), so the answer's timing
    /// does not tell which device ids exist.
    pub fn verify(&self, key: Option<&DeviceKey>) -> Result<Verified, AuthError> {
        self.verify_credential(key.map(Credential::Key))
    }

    /// [`verify`](Self::verify) with the device's credential: its key, or the device its
    /// verified client certificate names; `None` if the registry does not know the device.
    pub fn verify_credential(
        &self,
        credential: Option<Credential<'_>>,
    ) -> Result<Verified, AuthError> {
        let State::Authenticating { nonce, hello } = &self.state else {
            return Err(AuthError::NoHelloPending);
        };
        let device = hello.device;
        let key = match credential {
            Some(Credential::Certificate(named)) if named == Some(device) => {
                return Ok(Verified { device });
            }
            Some(Credential::Certificate(_)) => return Err(AuthError::BadProof),
            Some(Credential::Key(key)) => Some(key),
            None => None,
        };
        const DUMMY: DeviceKey = DeviceKey([0x5a; 32]);
        let good = auth::verify(
            key.unwrap_or(&DUMMY),
            nonce,
            device,
            hello.version,
            &hello.proof,
        );
        match (key, good) {
            (Some(_), true) => Ok(Verified { device }),
            (Some(_), false) => Err(AuthError::BadProof),
            (None, _) => Err(AuthError::UnknownDevice),
        }
    }

    /// Establishes the session whose `Hello` was [`verify`](Self::verify)'d: queues `Welcome`
    /// and resumes any `carried` stream (from a replaced session of the same device), whose
    /// unacknowledged messages are resent.
    pub fn establish(
        &mut self,
        now: Instant,
        verified: Verified,
        session: SessionId,
        server_time_ms: u64,
        carried: Option<Carried>,
    ) -> DeviceId {
        let device = verified.device;
        let (session, stream) = match carried {
            Some(c) => (c.session, c.stream),
            None => (session, Stream::default()),
        };
        self.stream = stream;
        let _ = DeviceMessage::Welcome {
            session,
            heartbeat_s: self.heartbeat_s,
            server_time_ms,
            // Only what was acknowledged: received-but-unacked messages must still be resent.
            rx_seq: self.stream.rx_acked,
        }
        .encode(self.tx.buf());
        self.stream.resend_all(self.tx.buf());
        self.state = State::Established { device, session };
        self.deadline = now + self.idle_timeout;
        self.process(now);
        device
    }

    /// Refuses the pending `Hello`: queues the `Error` frame (the same one whatever `e` is, see
    /// [`CloseReason::wire_code`]) and closes.
    pub fn reject(&mut self, e: AuthError) {
        if self.is_closed() {
            return;
        }
        self.fail(e.into());
    }

    /// [`verify`](Self::verify), then [`establish`](Self::establish) or
    /// [`reject`](Self::reject): for drivers with nothing to decide in between.
    pub fn authenticate(
        &mut self,
        now: Instant,
        key: Option<&DeviceKey>,
        session: SessionId,
        server_time_ms: u64,
        carried: Option<Carried>,
    ) -> Result<DeviceId, AuthError> {
        match self.verify(key) {
            Ok(v) => Ok(self.establish(now, v, session, server_time_ms, carried)),
            Err(AuthError::NoHelloPending) => Err(AuthError::NoHelloPending),
            Err(e) => {
                self.reject(e);
                Err(e)
            }
        }
    }

    /// Queues a message to the device. `tag` comes back in [`ServerEvent::Delivered`].
    pub fn send(&mut self, topic: Bytes, payload: Bytes, tag: u64) -> Result<Seq, SendError> {
        if !matches!(self.state, State::Established { .. }) {
            return Err(SendError::Closed);
        }
        let m = self.stream.push(
            self.outbox_limit,
            self.decoder.max_frame(),
            tag,
            topic,
            payload,
        )?;
        let seq = m.seq;
        m.encode(self.tx.buf());
        Ok(seq)
    }

    /// The driver could not hand on the [`ServerEvent::Message`] with `seq` (no agent to take
    /// it): count it as not received, so the device's resend of it is delivered. Messages
    /// after it are refused too until that resend (in order, so nothing is acknowledged past
    /// it).
    pub fn refuse_received(&mut self, seq: Seq) {
        if self.stream.refuse(seq) {
            self.rx_gap = true;
        }
    }

    /// Acknowledges device messages up to `seq` (cumulative), once they are safely handed on.
    pub fn ack_received(&mut self, seq: Seq) {
        if self.is_closed() || seq <= self.stream.rx_acked || seq > self.stream.rx_seq {
            return;
        }
        self.stream.rx_acked = seq;
        let _ = DeviceMessage::Ack { seq }.encode(self.tx.buf());
    }

    /// Queues a raw message (code offers and chunks). Fails if not established, or if the
    /// frame is over the session's frame limit (the device would drop the connection on it)
    /// or a field over its length limit: nothing is queued then.
    pub fn send_control(&mut self, m: &DeviceMessage) -> Result<(), SendError> {
        if !matches!(self.state, State::Established { .. }) {
            return Err(SendError::Closed);
        }
        let limit = self.decoder.max_frame();
        // What the length prefix counts: the type byte and the body.
        let len = 1 + m.body_len();
        let too_large = SendError::TooLarge {
            limit,
            got: len.min(u32::MAX as usize) as u32,
        };
        if len > limit as usize {
            return Err(too_large);
        }
        m.encode(self.tx.buf()).map_err(|_| too_large)
    }

    /// Offers a code version to the device.
    pub fn offer_code(
        &mut self,
        version: CodeVersion,
        size: u64,
        digest: Digest,
    ) -> Result<(), SendError> {
        self.send_control(&DeviceMessage::CodeOffer {
            version,
            size,
            digest,
        })
    }

    /// Ends the session with a `Goodbye`.
    pub fn close(&mut self, reason: GoodbyeReason, retry_after_ms: u32) {
        if self.is_closed() {
            return;
        }
        let _ = DeviceMessage::Goodbye {
            reason,
            retry_after_ms,
            redirect: Bytes::new(),
        }
        .encode(self.tx.buf());
        self.set_closed();
        self.decoder.clear();
        self.events
            .push_back(ServerEvent::Closed(CloseReason::Local(reason)));
    }

    /// Hands the stream state to a newer connection of the same device and closes this one
    /// with `Goodbye{Replaced}`.
    pub fn take_carried(&mut self) -> Option<Carried> {
        let session = self.session_id()?;
        self.close(GoodbyeReason::Replaced, 0);
        Some(Carried {
            session,
            stream: std::mem::take(&mut self.stream),
        })
    }

    /// Takes the messages the device never acknowledged (to report them undelivered when the
    /// session is gone).
    pub fn take_unacked(&mut self) -> VecDeque<Outgoing> {
        self.stream.outbox.take()
    }

    /// Applies an expired deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() || now < self.deadline {
            return;
        }
        match self.state {
            State::ExpectHello { .. } => self.fail(CloseReason::HandshakeTimeout),
            State::Established { .. } => self.fail(CloseReason::IdleTimeout),
            // The driver owns the authentication step's latency; no deadline there.
            State::Authenticating { .. } | State::Closed { .. } => {}
        }
    }

    /// Events the queue can hold without allocating (0 at rest; for memory tests).
    #[doc(hidden)]
    pub fn event_capacity(&self) -> usize {
        self.events.capacity()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// Appends the bytes to send to `buf`; returns whether there were any.
    #[must_use]
    pub fn poll_transmit(&mut self, buf: &mut BytesMut) -> bool {
        self.tx.drain_into(buf)
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::ExpectHello { .. } | State::Established { .. } => Some(self.deadline),
            _ => None,
        }
    }

    /// Messages sent to the device and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.stream.unacked()
    }

    /// Whether a message of the device was handed up ([`ServerEvent::Message`]) and not yet
    /// acknowledged ([`ack_received`](Self::ack_received)): its agent still has to answer.
    pub fn awaiting_ack_received(&self) -> bool {
        self.stream.rx_seq > self.stream.rx_acked
    }

    /// When the device was last heard from (any frame, or its authentication), once
    /// established.
    pub fn last_heard(&self) -> Option<Instant> {
        match self.state {
            State::Established { .. } => self.deadline.checked_sub(self.idle_timeout),
            _ => None,
        }
    }
}

/// Why a session cannot be handed to another process ([`ServerSession::export`]) or taken
/// from one ([`ServerSession::import`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffError {
    /// Only an established session moves; one still authenticating reconnects instead.
    #[error("the session is {0}, not established")]
    NotEstablished(&'static str),
    /// Its driver has not taken every event yet.
    #[error("the session has events its driver has not taken")]
    PendingEvents,
    /// Not a handed-over session.
    #[error("not a handed-over session (bad magic)")]
    BadMagic,
    /// Written by a format this build does not read.
    #[error("handed-over session in format {0}; this build reads format {HANDOFF_FORMAT}")]
    UnsupportedFormat(u8),
    /// The bytes end before the session does.
    #[error("handed-over session truncated at {0}")]
    Truncated(&'static str),
    /// A field out of its range.
    #[error("handed-over session: invalid {0}")]
    Invalid(&'static str),
    /// Bytes past the end of the session.
    #[error("handed-over session has {0} trailing bytes")]
    Trailing(usize),
}

/// The layout [`ServerSession::export`] writes (after the magic `TSES`).
pub const HANDOFF_FORMAT: u8 = 1;
const HANDOFF_MAGIC: &[u8; 4] = b"TSES";

impl ServerSession {
    /// The established session as bytes, for another process to continue it with
    /// [`import`](Self::import): device and session id, heartbeat and limits, sequence
    /// numbers, the messages the device has not acknowledged, a partial frame read and
    /// output not yet taken, and the idle deadline (relative to `now`).
    ///
    /// Messages received but not yet acknowledged to the device (waiting for an agent's
    /// `DeliverAck`) are not counted as received in the copy: the device still has them and
    /// resends them, and the successor accepts the resend.
    pub fn export(&self, now: Instant) -> Result<Vec<u8>, HandoffError> {
        let State::Established { device, session } = self.state else {
            return Err(HandoffError::NotEstablished(self.state.name()));
        };
        if self.events.len() != 0 {
            return Err(HandoffError::PendingEvents);
        }
        let mut w = Vec::with_capacity(96);
        w.extend_from_slice(HANDOFF_MAGIC);
        w.push(HANDOFF_FORMAT);
        w.extend_from_slice(&device.0.to_be_bytes());
        w.extend_from_slice(&session.0.to_be_bytes());
        w.extend_from_slice(&self.heartbeat_s.to_be_bytes());
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        w.extend_from_slice(&ms(self.idle_timeout).to_be_bytes());
        w.extend_from_slice(&self.outbox_limit.to_be_bytes());
        w.extend_from_slice(&self.decoder.max_frame().to_be_bytes());
        w.extend_from_slice(&ms(self.deadline.saturating_duration_since(now)).to_be_bytes());
        let s = &self.stream;
        for seq in [s.tx_seq, s.rx_acked, s.rx_acked] {
            w.extend_from_slice(&seq.0.to_be_bytes());
        }
        for b in [self.decoder.pending_bytes(), self.tx.bytes()] {
            w.extend_from_slice(&(b.len() as u32).to_be_bytes());
            w.extend_from_slice(b);
        }
        w.extend_from_slice(&(s.outbox.len() as u32).to_be_bytes());
        for m in s.outbox.iter() {
            w.extend_from_slice(&m.seq.0.to_be_bytes());
            w.extend_from_slice(&m.tag.to_be_bytes());
            w.extend_from_slice(&(m.topic.len() as u16).to_be_bytes());
            w.extend_from_slice(&m.topic);
            w.extend_from_slice(&(m.payload.len() as u32).to_be_bytes());
            w.extend_from_slice(&m.payload);
        }
        Ok(w)
    }

    /// Continues a session [`export`](Self::export)ed by another process. Every field is
    /// checked (lengths against the bytes there, the outbox against its limit, sequence
    /// numbers against each other): a bad copy is an error, never a panic.
    pub fn import(bytes: &[u8], now: Instant) -> Result<ServerSession, HandoffError> {
        let mut r = HandoffReader(bytes);
        if r.take(4, "magic")? != HANDOFF_MAGIC {
            return Err(HandoffError::BadMagic);
        }
        let format = r.take(1, "format")?[0];
        if format != HANDOFF_FORMAT {
            return Err(HandoffError::UnsupportedFormat(format));
        }
        let device = DeviceId(r.u64("device")?);
        let session = SessionId(r.u64("session")?);
        let heartbeat_s = r.u16("heartbeat")?.max(1);
        let idle_timeout = Duration::from_millis(r.u32("idle timeout")?.into());
        let outbox_limit = r.u32("outbox limit")?;
        let max_frame = r.u32("max frame")?;
        if max_frame < 64 {
            return Err(HandoffError::Invalid("max frame"));
        }
        let deadline = now + Duration::from_millis(r.u32("deadline")?.into());
        let tx_seq = Seq(r.u64("tx seq")?);
        let rx_seq = Seq(r.u64("rx seq")?);
        let rx_acked = Seq(r.u64("rx acked")?);
        if rx_acked > rx_seq {
            return Err(HandoffError::Invalid("rx acked past rx seq"));
        }
        let partial = r.bytes32("partial frame")?;
        if partial.len() > 4 + max_frame as usize {
            return Err(HandoffError::Invalid("partial frame"));
        }
        let pending_out = r.bytes32("output")?;
        let n = r.u32("outbox length")?;
        if n > outbox_limit {
            return Err(HandoffError::Invalid("outbox length"));
        }
        // What the old process received and had not acknowledged, the device resends: in
        // order from the first of them, so nothing is acknowledged past one lost in the move.
        let mut stream = Stream {
            tx_seq,
            rx_seq,
            rx_acked,
            ..Stream::default()
        };
        let mut last = Seq(0);
        for _ in 0..n {
            let seq = Seq(r.u64("message seq")?);
            if seq <= last || seq > tx_seq {
                return Err(HandoffError::Invalid("message seq"));
            }
            last = seq;
            let tag = r.u64("message tag")?;
            let topic_len = r.u16("topic length")?;
            let topic = Bytes::copy_from_slice(r.take(topic_len.into(), "topic")?);
            let payload = r.bytes32("payload")?;
            stream.outbox.push_back(Outgoing {
                seq,
                tag,
                topic,
                payload: Bytes::copy_from_slice(payload),
            });
        }
        if !r.0.is_empty() {
            return Err(HandoffError::Trailing(r.0.len()));
        }
        let mut decoder = FrameDecoder::new(max_frame);
        decoder.push(partial);
        let mut tx = Output::default();
        if !pending_out.is_empty() {
            tx.buf().extend_from_slice(pending_out);
        }
        Ok(ServerSession {
            state: State::Established { device, session },
            decoder,
            tx,
            events: Queue::default(),
            deadline,
            idle_timeout,
            heartbeat_s,
            rx_gap: true,
            outbox_limit,
            stream,
        })
    }
}

/// A cursor over a handed-over session with bounds-checked reads.
struct HandoffReader<'a>(&'a [u8]);

impl<'a> HandoffReader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], HandoffError> {
        if self.0.len() < n {
            return Err(HandoffError::Truncated(field));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], HandoffError> {
        Ok(self.take(N, field)?.try_into().expect("N bytes"))
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, HandoffError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, HandoffError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, HandoffError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn bytes32(&mut self, field: &'static str) -> Result<&'a [u8], HandoffError> {
        let n = self.u32(field)? as usize;
        self.take(n, field)
    }
}
