//! The device side of a session: what a device SDK (and the load generator) runs.
//!
//! One [`DeviceSession`] lives as long as the device: its message stream (sequence numbers and
//! unacknowledged messages) survives reconnects. Call order, per connection:
//! 1. [`connect`](DeviceSession::connect) once the TLS connection is up.
//! 2. Feed input with [`handle_bytes`](DeviceSession::handle_bytes) and expired deadlines with
//!    [`handle_timeout`](DeviceSession::handle_timeout).
//! 3. After each input, drain [`poll_event`](DeviceSession::poll_event), then
//!    [`poll_transmit`](DeviceSession::poll_transmit), then re-arm the timer from
//!    [`poll_timeout`](DeviceSession::poll_timeout).
//! 4. On [`DeviceEvent::Closed`], close the socket after flushing; call `connect` again to
//!    reconnect (unacknowledged messages are resent after the next `Welcome`) — unless
//!    [`is_revoked`](DeviceSession::is_revoked): a `Goodbye{revoked}` means the server no
//!    longer knows this device, and `connect` then refuses (no reconnect loop against a server
//!    that will only refuse it).
//!
//! States: `ExpectChallenge` → `ExpectWelcome` → `Established` → `Disconnected`, and
//! `Revoked` (final) after a `Goodbye{revoked}`.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::auth::{self, DeviceKey};
use crate::codec::{DEFAULT_MAX_FRAME, FrameDecoder};
use crate::error::{CloseReason, PeerMisbehaved, SendError};
use crate::ids::{CodeVersion, DeviceId, Digest, Seq, SessionId};
use crate::message::{DeviceMessage, GoodbyeReason, Hello, PROTOCOL_VERSION, Resume};
use crate::stream::Stream;
use crate::thin::{Output, Queue};

/// A device's identity and limits.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Its id.
    pub device: DeviceId,
    /// Its key.
    pub key: DeviceKey,
    /// Code version it runs.
    pub code_version: CodeVersion,
    /// Firmware version text (≤ 255 bytes).
    pub fw_version: Bytes,
    /// Largest frame accepted from the server.
    pub max_frame: u32,
    /// Most unacknowledged messages it queues.
    pub outbox_limit: u32,
    /// Resend unacknowledged messages after this long without an ack.
    pub resend_after: Duration,
    /// Give up on a connection that sends no `Welcome` within this long.
    pub welcome_timeout: Duration,
}

impl DeviceConfig {
    /// Defaults for a device with this id and key.
    pub fn new(device: DeviceId, key: DeviceKey) -> Self {
        DeviceConfig {
            device,
            key,
            code_version: CodeVersion(0),
            fw_version: Bytes::from_static(b"tether-sdk/0.1"),
            max_frame: DEFAULT_MAX_FRAME,
            outbox_limit: 64,
            resend_after: Duration::from_secs(10),
            welcome_timeout: Duration::from_secs(10),
        }
    }
}

/// What the session tells the device application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// `Welcome` arrived: the session is up.
    Connected {
        /// Session id.
        session: SessionId,
        /// Whether the server resumed the previous session.
        resumed: bool,
        /// Heartbeat interval the server asked for.
        heartbeat: Duration,
    },
    /// A new message from the server (already acknowledged).
    Message {
        /// Its seq.
        seq: Seq,
        /// Topic.
        topic: Bytes,
        /// Payload.
        payload: Bytes,
    },
    /// The server acknowledged a message we sent.
    Acked {
        /// Its seq.
        seq: Seq,
    },
    /// A `Pong` for the `Ping` with this id.
    Pong {
        /// The ping's id.
        id: u64,
    },
    /// The server offers a code version.
    CodeOffer {
        /// Version.
        version: CodeVersion,
        /// Size in bytes.
        size: u64,
        /// SHA-256 of the blob.
        digest: Digest,
    },
    /// A piece of code.
    CodeChunk {
        /// Version.
        version: CodeVersion,
        /// Offset of `data`.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// The server said goodbye: reconnect after `retry_after`, to `redirect` if not empty.
    Goodbye {
        /// Why.
        reason: GoodbyeReason,
        /// When to come back.
        retry_after: Duration,
        /// Where to go instead.
        redirect: Bytes,
    },
    /// The connection's session ended.
    Closed(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ExpectChallenge,
    ExpectWelcome,
    Established,
    Disconnected,
    /// The server revoked the device: disconnected for good.
    Revoked,
}

/// The device end of a session. See the module doc for the call order.
#[derive(Debug)]
pub struct DeviceSession {
    config: Settings,
    state: State,
    decoder: FrameDecoder,
    tx: Output,
    events: Queue<DeviceEvent>,
    session: Option<SessionId>,
    stream: Stream,
    /// The server's heartbeat interval in seconds (from `Welcome`).
    heartbeat_s: u16,
    /// Handshake deadline, or idle deadline once established.
    deadline: Instant,
    next_ping: Option<Instant>,
    resend_at: Option<Instant>,
    ping_id: u64,
}

/// What a session keeps of its [`DeviceConfig`]: the same, with durations in milliseconds (a
/// session is per device, so its size is a per-device budget).
#[derive(Debug)]
struct Settings {
    device: DeviceId,
    key: DeviceKey,
    code_version: CodeVersion,
    fw_version: Bytes,
    max_frame: u32,
    outbox_limit: u32,
    resend_after_ms: u32,
    welcome_timeout_ms: u32,
}

impl From<DeviceConfig> for Settings {
    fn from(c: DeviceConfig) -> Settings {
        let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        Settings {
            device: c.device,
            key: c.key,
            code_version: c.code_version,
            fw_version: c.fw_version,
            max_frame: c.max_frame,
            outbox_limit: c.outbox_limit,
            resend_after_ms: millis(c.resend_after),
            welcome_timeout_ms: millis(c.welcome_timeout),
        }
    }
}

fn ms(millis: u32) -> Duration {
    Duration::from_millis(u64::from(millis))
}

impl DeviceSession {
    /// A disconnected device.
    pub fn new(config: DeviceConfig, now: Instant) -> Self {
        DeviceSession {
            decoder: FrameDecoder::new(config.max_frame),
            config: Settings::from(config),
            state: State::Disconnected,
            tx: Output::default(),
            events: Queue::default(),
            session: None,
            stream: Stream::default(),
            heartbeat_s: 30,
            deadline: now,
            next_ping: None,
            resend_at: None,
            ping_id: 0,
        }
    }

    /// The device's id.
    pub fn device(&self) -> DeviceId {
        self.config.device
    }

    /// The heartbeat interval the server asked for in its last `Welcome` (30 s before one).
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(u64::from(self.heartbeat_s))
    }

    /// Whether `Welcome` has arrived on the current connection.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Whether no connection is active.
    pub fn is_disconnected(&self) -> bool {
        matches!(self.state, State::Disconnected | State::Revoked)
    }

    /// Whether the server said `Goodbye{revoked}`: the device must not reconnect (its id is no
    /// longer registered), and [`connect`](Self::connect) refuses.
    pub fn is_revoked(&self) -> bool {
        self.state == State::Revoked
    }

    /// The code version the next `Hello` names.
    pub fn code_version(&self) -> CodeVersion {
        self.config.code_version
    }

    /// Sets the code version the next `Hello` names (after installing new code).
    pub fn set_code_version(&mut self, version: CodeVersion) {
        self.config.code_version = version;
    }

    /// Messages sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.stream.unacked()
    }

    /// Starts the protocol on a new connection (TLS is up). After a revocation it refuses:
    /// the session stays revoked and queues [`DeviceEvent::Closed`] with
    /// `PeerGoodbye(Revoked)` again, so a driver that reconnects anyway learns why.
    pub fn connect(&mut self, now: Instant) {
        if self.state == State::Revoked {
            self.events
                .push_back(DeviceEvent::Closed(CloseReason::PeerGoodbye(
                    GoodbyeReason::Revoked,
                )));
            return;
        }
        self.decoder.clear();
        self.tx = Output::default();
        self.state = State::ExpectChallenge;
        self.deadline = now + ms(self.config.welcome_timeout_ms);
        self.next_ping = None;
        self.resend_at = None;
    }

    /// Feeds bytes received from the server.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        if self.is_disconnected() {
            return;
        }
        self.decoder.push(data);
        while !self.is_disconnected() {
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
        match (self.state, m) {
            (State::ExpectChallenge, DeviceMessage::Challenge { nonce }) => {
                let c = &self.config;
                let proof = auth::prove(&c.key, &nonce, c.device, PROTOCOL_VERSION);
                let resume = self.session.map(|session| Resume {
                    session,
                    rx_seq: self.stream.rx_seq,
                });
                let _ = DeviceMessage::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    device: c.device,
                    proof,
                    code_version: c.code_version,
                    fw_version: c.fw_version.clone(),
                    resume,
                })
                .encode(self.tx.buf());
                self.state = State::ExpectWelcome;
            }
            (
                State::ExpectWelcome,
                DeviceMessage::Welcome {
                    session,
                    heartbeat_s,
                    rx_seq,
                    ..
                },
            ) => {
                let resumed = self.session == Some(session);
                if !resumed {
                    // A new server-side session numbers its messages afresh.
                    self.stream.rx_seq = Seq(0);
                    self.stream.rx_acked = Seq(0);
                }
                self.session = Some(session);
                // Whatever the server already has needs no resend.
                if rx_seq > Seq(0) && rx_seq <= self.stream.tx_seq {
                    let events = &mut self.events;
                    let _ = self.stream.ack(rx_seq, |m| {
                        events.push_back(DeviceEvent::Acked { seq: m.seq })
                    });
                }
                self.heartbeat_s = heartbeat_s.max(1);
                self.state = State::Established;
                self.stream.resend_all(self.tx.buf());
                self.arm_resend(now);
                self.next_ping = Some(now + self.heartbeat());
                self.deadline = now + self.idle_timeout();
                self.events.push_back(DeviceEvent::Connected {
                    session,
                    resumed,
                    heartbeat: self.heartbeat(),
                });
            }
            (State::Established, m) => {
                self.deadline = now + self.idle_timeout();
                self.on_established(now, m);
            }
            (
                _,
                DeviceMessage::Goodbye {
                    reason,
                    retry_after_ms,
                    redirect,
                },
            ) => self.on_goodbye(reason, retry_after_ms, redirect),
            (_, DeviceMessage::Error { code, .. }) => self.close_with(CloseReason::PeerError(code)),
            (state, m) => self.fail(
                PeerMisbehaved::UnexpectedMessage {
                    state: match state {
                        State::ExpectChallenge => "expecting Challenge",
                        State::ExpectWelcome => "expecting Welcome",
                        _ => "disconnected",
                    },
                    got: m.ty(),
                }
                .into(),
            ),
        }
    }

    fn idle_timeout(&self) -> Duration {
        self.heartbeat() * 5 / 2
    }

    fn arm_resend(&mut self, now: Instant) {
        self.resend_at = (self.stream.unacked() > 0).then(|| now + ms(self.config.resend_after_ms));
    }

    fn on_established(&mut self, now: Instant, m: DeviceMessage) {
        match m {
            DeviceMessage::Ping { id } => {
                let _ = DeviceMessage::Pong { id }.encode(self.tx.buf());
            }
            DeviceMessage::Pong { id } => self.events.push_back(DeviceEvent::Pong { id }),
            DeviceMessage::Msg {
                seq,
                topic,
                payload,
            } => {
                if self.stream.receive(seq) {
                    self.events.push_back(DeviceEvent::Message {
                        seq,
                        topic,
                        payload,
                    });
                }
                // The device application consumes messages synchronously: ack at once
                // (duplicates are re-acked, in case our earlier ack was lost).
                self.stream.rx_acked = self.stream.rx_seq;
                let _ = DeviceMessage::Ack { seq }.encode(self.tx.buf());
            }
            DeviceMessage::Ack { seq } => {
                let events = &mut self.events;
                match self
                    .stream
                    .ack(seq, |m| events.push_back(DeviceEvent::Acked { seq: m.seq }))
                {
                    Ok(()) => self.arm_resend(now),
                    Err(e) => self.fail(e.into()),
                }
            }
            DeviceMessage::CodeOffer {
                version,
                size,
                digest,
            } => self.events.push_back(DeviceEvent::CodeOffer {
                version,
                size,
                digest,
            }),
            DeviceMessage::CodeChunk {
                version,
                offset,
                data,
            } => self.events.push_back(DeviceEvent::CodeChunk {
                version,
                offset,
                data,
            }),
            DeviceMessage::Goodbye {
                reason,
                retry_after_ms,
                redirect,
            } => self.on_goodbye(reason, retry_after_ms, redirect),
            DeviceMessage::Error { code, .. } => self.close_with(CloseReason::PeerError(code)),
            other => self.fail(
                PeerMisbehaved::UnexpectedMessage {
                    state: "established",
                    got: other.ty(),
                }
                .into(),
            ),
        }
    }

    fn on_goodbye(&mut self, reason: GoodbyeReason, retry_after_ms: u32, redirect: Bytes) {
        self.events.push_back(DeviceEvent::Goodbye {
            reason,
            retry_after: Duration::from_millis(retry_after_ms as u64),
            redirect,
        });
        self.close_with(CloseReason::PeerGoodbye(reason));
        if reason == GoodbyeReason::Revoked {
            self.state = State::Revoked;
        }
    }

    fn close_with(&mut self, reason: CloseReason) {
        self.state = State::Disconnected;
        self.decoder.clear();
        self.next_ping = None;
        self.resend_at = None;
        self.events.push_back(DeviceEvent::Closed(reason));
    }

    fn fail(&mut self, reason: CloseReason) {
        if let Some(code) = reason.wire_code() {
            let _ = DeviceMessage::Error {
                code,
                message: Bytes::from(reason.to_string()),
            }
            .encode(self.tx.buf());
        }
        self.close_with(reason);
    }

    /// Sends a message to the device's agent. Queued (and sent after `Welcome`) while not yet
    /// established; kept until acknowledged. Refused once revoked.
    pub fn send(&mut self, now: Instant, topic: Bytes, payload: Bytes) -> Result<Seq, SendError> {
        if self.state == State::Revoked {
            return Err(SendError::Closed);
        }
        let established = self.state == State::Established;
        let m = self.stream.push(
            self.config.outbox_limit,
            self.config.max_frame,
            0,
            topic,
            payload,
        )?;
        let seq = m.seq;
        if established {
            m.encode(self.tx.buf());
            if self.resend_at.is_none() {
                self.resend_at = Some(now + ms(self.config.resend_after_ms));
            }
        }
        Ok(seq)
    }

    /// Sends a `Ping` now (the session also pings on its own every heartbeat); returns its id.
    pub fn ping(&mut self, now: Instant) -> Option<u64> {
        if self.state != State::Established {
            return None;
        }
        self.ping_id += 1;
        let _ = DeviceMessage::Ping { id: self.ping_id }.encode(self.tx.buf());
        self.next_ping = Some(now + self.heartbeat());
        Some(self.ping_id)
    }

    /// Sends a code-transfer message (`CodeRequest`, `CodeAck`, `CodeDone`).
    pub fn send_code(&mut self, m: &DeviceMessage) -> Result<(), SendError> {
        if self.state != State::Established {
            return Err(SendError::Closed);
        }
        m.encode(self.tx.buf()).map_err(|_| SendError::TooLarge {
            limit: self.config.max_frame,
            got: m.frame_len() as u32,
        })
    }

    /// Ends the connection with a `Goodbye`.
    pub fn close(&mut self) {
        if self.is_disconnected() {
            return;
        }
        let _ = DeviceMessage::Goodbye {
            reason: GoodbyeReason::Normal,
            retry_after_ms: 0,
            redirect: Bytes::new(),
        }
        .encode(self.tx.buf());
        self.close_with(CloseReason::Local(GoodbyeReason::Normal));
    }

    /// The transport failed under us (reset, EOF): end the connection without sending.
    pub fn connection_lost(&mut self, reason: CloseReason) {
        if !self.is_disconnected() {
            self.tx = Output::default();
            self.close_with(reason);
        }
    }

    /// Applies expired deadlines: handshake/idle timeouts, heartbeats, resends.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_disconnected() {
            return;
        }
        if now >= self.deadline {
            let reason = if self.state == State::Established {
                CloseReason::IdleTimeout
            } else {
                CloseReason::HandshakeTimeout
            };
            self.fail(reason);
            return;
        }
        if self.next_ping.is_some_and(|t| now >= t) {
            self.ping(now);
        }
        if self.resend_at.is_some_and(|t| now >= t) {
            self.stream.resend_all(self.tx.buf());
            self.arm_resend(now);
        }
    }

    /// Events the queue can hold without allocating (0 at rest; for memory tests).
    #[doc(hidden)]
    pub fn event_capacity(&self) -> usize {
        self.events.capacity()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<DeviceEvent> {
        self.events.pop_front()
    }

    /// Appends the bytes to send to `buf`; returns whether there were any.
    #[must_use]
    pub fn poll_transmit(&mut self, buf: &mut BytesMut) -> bool {
        self.tx.drain_into(buf)
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_disconnected() {
            return None;
        }
        [Some(self.deadline), self.next_ping, self.resend_at]
            .into_iter()
            .flatten()
            .min()
    }
}
