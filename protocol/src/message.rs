//! Every message of the device link ([`DeviceMessage`]) and of the agent link
//! ([`AgentMessage`]), and their encoding: one type-byte table ([`MessageType`]) for both, each
//! link decoding only its own types.
//!
//! Fields are big-endian; short strings carry a u8 length, topics a u16 length, and the last
//! variable-length field of a message (payloads, chunks, blobs) runs to the end of the frame.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::auth::{NONCE_LEN, Nonce, PROOF_LEN, Proof};
use crate::codec::{Frame, Reader, put_header};
use crate::error::DecodeError;
use crate::ids::{CodeVersion, DeviceId, Digest, Seq, SessionId};

/// The protocol version this crate speaks, sent in `Hello`.
pub const PROTOCOL_VERSION: u16 = 1;

macro_rules! message_types {
    ($($(#[$doc:meta])* $name:ident = $val:expr),* $(,)?) => {
        /// The type byte of each message.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        #[non_exhaustive]
        pub enum MessageType { $($(#[$doc])* $name = $val),* }

        impl MessageType {
            /// The message type for a type byte.
            pub fn from_u8(b: u8) -> Result<Self, DecodeError> {
                match b {
                    $($val => Ok(MessageType::$name),)*
                    other => Err(DecodeError::UnknownType(other)),
                }
            }
            /// The lowercase name, for logs and errors.
            pub fn name(self) -> &'static str {
                match self { $(MessageType::$name => stringify!($name)),* }
            }
        }
    };
}

// The device link's types are 0x01..=0x0d, the agent link's 0x40..; Ping, Pong and Error
// travel on both. `DeviceMessage::decode` and `AgentMessage::decode` each refuse the other's.
message_types! {
    /// server → device: the per-connection nonce the device must prove against.
    Challenge = 0x01,
    /// device → server: identity, proof, running versions, resume point.
    Hello = 0x02,
    /// server → device: session accepted.
    Welcome = 0x03,
    /// either way, on both links: keepalive.
    Ping = 0x04,
    /// either way, on both links: keepalive answer.
    Pong = 0x05,
    /// either way: an application message.
    Msg = 0x06,
    /// either way: cumulative acknowledgement.
    Ack = 0x07,
    /// server → device: a newer code version is available.
    CodeOffer = 0x08,
    /// device → server: send code from this offset (start or resume).
    CodeRequest = 0x09,
    /// server → device: a piece of code.
    CodeChunk = 0x0a,
    /// device → server: code received up to this offset (flow control).
    CodeAck = 0x0b,
    /// device → server: the transfer finished (digest verified or not).
    CodeDone = 0x0c,
    /// either way: the session ends, with a reason and when to come back.
    Goodbye = 0x0d,
    /// either way, on both links: a protocol error; the sender closes after it.
    Error = 0x0e,
    /// agent → server: attach with a token.
    AgentHello = 0x40,
    /// server → agent: attached.
    AgentWelcome = 0x41,
    /// agent → server: send a message to a device.
    Send = 0x42,
    /// server → agent: what became of a `Send`.
    SendResult = 0x43,
    /// server → agent: a message from a device.
    Deliver = 0x44,
    /// agent → server: a `Deliver` is safely handled; the device gets its `Ack`.
    DeliverAck = 0x45,
    /// server → agent: a device came online or went offline.
    Presence = 0x46,
    /// agent → server: deploy a code version to a device group.
    Deploy = 0x47,
    /// server → agent: outcome of a `Deploy`.
    DeployResult = 0x48,
    /// server → agent: one chunk of a presence snapshot, sent in place of presence changes
    /// that were coalesced (see [`AgentMessage::PresenceSnapshot`]).
    PresenceSnapshot = 0x49,
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$doc:meta])* $v:ident = $n:expr => $s:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u16)]
        #[non_exhaustive]
        pub enum $name { $($(#[$doc])* $v = $n),* }
        impl $name {
            /// The value for a wire code; unknown codes map to `None`.
            pub fn from_u16(c: u16) -> Option<Self> {
                match c { $($n => Some($name::$v),)* _ => None }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $($name::$v => $s),* })
            }
        }
    };
}

wire_enum! {
    /// Why a session ends, in a `Goodbye`.
    GoodbyeReason {
        /// Normal close.
        Normal = 0 => "normal",
        /// The server is shutting down.
        Shutdown = 1 => "server shutting down",
        /// The server is overloaded; come back after `retry_after_ms`.
        Overloaded = 2 => "server overloaded",
        /// A newer connection of the same device replaced this one.
        Replaced = 3 => "replaced by a newer connection",
        /// Connect to `redirect` instead.
        Redirect = 4 => "redirected",
        /// The server is being upgraded.
        Upgrade = 5 => "server upgrading",
        /// The device was revoked from the registry: it must not reconnect (a new connect is
        /// refused like an unknown device's).
        Revoked = 6 => "device revoked",
        /// The device keeps replacing its own session (two devices with one identity, or a
        /// reconnect loop): its established session stays; retry after `retry_after_ms`.
        Flapping = 7 => "reconnecting too often",
    }
}

wire_enum! {
    /// The code of an `Error` frame.
    ErrorCode {
        /// A frame could not be decoded.
        MalformedFrame = 1 => "malformed frame",
        /// A frame exceeded the size limit.
        FrameTooLarge = 2 => "frame too large",
        /// Protocol version not supported.
        UnsupportedVersion = 3 => "unsupported protocol version",
        /// A message out of order.
        ProtocolViolation = 4 => "protocol violation",
        /// Unknown device id (no longer sent: servers answer every failed `Hello` with
        /// [`AuthFailed`](Self::AuthFailed)).
        UnknownDevice = 5 => "unknown device",
        /// Proof did not verify (no longer sent, see [`AuthFailed`](Self::AuthFailed)).
        BadProof = 6 => "bad proof",
        /// Handshake or idle timeout.
        Timeout = 7 => "timeout",
        /// Agent token rejected.
        BadToken = 8 => "bad agent token",
        /// Internal server error.
        Internal = 9 => "internal error",
        /// A queue was full.
        QueueFull = 10 => "queue full",
        /// A request was invalid (e.g. an empty deploy).
        InvalidRequest = 11 => "invalid request",
        /// The `Hello` did not authenticate: unknown device, bad proof or revoked — the same
        /// answer for all, so the wire does not tell which device ids exist.
        AuthFailed = 12 => "authentication failed",
    }
}

wire_enum! {
    /// What became of an agent's `Send`.
    SendStatus {
        /// The device acknowledged the message.
        Delivered = 0 => "delivered",
        /// The device is not connected.
        Offline = 1 => "device offline",
        /// The device's outbound queue is full.
        QueueFull = 2 => "device queue full",
        /// No such device.
        UnknownDevice = 3 => "unknown device",
        /// The message is larger than a frame allows.
        TooLarge = 4 => "message too large",
    }
}

/// The device's resume point, sent in `Hello` after a reconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    /// The session it had.
    pub session: SessionId,
    /// The last seq it received from the server in that session.
    pub rx_seq: Seq,
}

/// `Hello`: who the device is, its proof, and what it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version spoken.
    pub version: u16,
    /// The device's id.
    pub device: DeviceId,
    /// HMAC over the connection's nonce.
    pub proof: Proof,
    /// The code version it runs.
    pub code_version: CodeVersion,
    /// Its firmware version (free text, ≤ 255 bytes).
    pub fw_version: Bytes,
    /// Where to resume, if it had a session.
    pub resume: Option<Resume>,
}

/// Which link a message travels on: the device link (a device's TLS connection) or the agent
/// link (a cloud-side agent's connection). Each link has its own message enum, and each enum's
/// `decode` refuses the other link's types with [`DecodeError::WrongLink`], so a device frame
/// can never decode as, say, `Deploy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    /// A device's connection: [`DeviceMessage`].
    Device,
    /// An agent's connection: [`AgentMessage`].
    Agent,
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Link::Device => "device",
            Link::Agent => "agent",
        })
    }
}

/// Every message of the device link.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
#[allow(missing_docs)] // reason: fields are described by each variant's message type
pub enum DeviceMessage {
    /// See [`MessageType::Challenge`].
    Challenge { nonce: Nonce },
    /// See [`MessageType::Hello`].
    Hello(Hello),
    /// See [`MessageType::Welcome`]. `rx_seq` is the last seq the server received from the
    /// device in this session (0 for a new session).
    Welcome {
        session: SessionId,
        heartbeat_s: u16,
        server_time_ms: u64,
        rx_seq: Seq,
    },
    /// See [`MessageType::Ping`].
    Ping { id: u64 },
    /// See [`MessageType::Pong`].
    Pong { id: u64 },
    /// See [`MessageType::Msg`].
    Msg {
        seq: Seq,
        topic: Bytes,
        payload: Bytes,
    },
    /// See [`MessageType::Ack`].
    Ack { seq: Seq },
    /// See [`MessageType::CodeOffer`].
    CodeOffer {
        version: CodeVersion,
        size: u64,
        digest: Digest,
    },
    /// See [`MessageType::CodeRequest`].
    CodeRequest { version: CodeVersion, offset: u64 },
    /// See [`MessageType::CodeChunk`].
    CodeChunk {
        version: CodeVersion,
        offset: u64,
        data: Bytes,
    },
    /// See [`MessageType::CodeAck`].
    CodeAck { version: CodeVersion, offset: u64 },
    /// See [`MessageType::CodeDone`].
    CodeDone { version: CodeVersion, ok: bool },
    /// See [`MessageType::Goodbye`].
    Goodbye {
        reason: GoodbyeReason,
        retry_after_ms: u32,
        redirect: Bytes,
    },
    /// See [`MessageType::Error`].
    Error { code: ErrorCode, message: Bytes },
}

/// Every message of the agent link.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
#[allow(missing_docs)] // reason: fields are described by each variant's message type
pub enum AgentMessage {
    /// See [`MessageType::AgentHello`].
    AgentHello {
        version: u16,
        token: Bytes,
        name: Bytes,
    },
    /// See [`MessageType::AgentWelcome`].
    AgentWelcome { agent: u32, server_time_ms: u64 },
    /// See [`MessageType::Ping`].
    Ping { id: u64 },
    /// See [`MessageType::Pong`].
    Pong { id: u64 },
    /// See [`MessageType::Send`]. `tag` is the agent's own correlation id.
    Send {
        device: DeviceId,
        tag: u64,
        topic: Bytes,
        payload: Bytes,
    },
    /// See [`MessageType::SendResult`].
    SendResult { tag: u64, status: SendStatus },
    /// See [`MessageType::Deliver`].
    Deliver {
        device: DeviceId,
        seq: Seq,
        topic: Bytes,
        payload: Bytes,
    },
    /// See [`MessageType::DeliverAck`].
    DeliverAck { device: DeviceId, seq: Seq },
    /// See [`MessageType::Presence`].
    Presence { device: DeviceId, online: bool },
    /// See [`MessageType::Deploy`].
    Deploy { group: Bytes, blob: Bytes },
    /// See [`MessageType::DeployResult`]. `version` 0 and a message on failure.
    DeployResult {
        group: Bytes,
        version: CodeVersion,
        digest: Digest,
        message: Bytes,
    },
    /// See [`MessageType::PresenceSnapshot`]: a marked resynchronisation of presence.
    ///
    /// A server whose queue towards an agent (or between its shards) cannot hold every
    /// `Presence` change coalesces them instead of dropping them silently: it sends the full
    /// set of devices online at one moment, as a run of these frames in order, the first with
    /// `first` set and the last with `last` set (one frame may be both; an empty set is one
    /// frame with both and no devices). At most [`PRESENCE_SNAPSHOT_CHUNK`] devices per frame.
    /// The set replaces what the agent knew: a device not listed is offline. `Presence`
    /// frames after the last chunk apply on top of it; no `Presence` frame arrives between the
    /// first and the last chunk.
    ///
    /// Wire: a flags byte (bit 0 `first`, bit 1 `last`, other bits zero), then the device ids,
    /// 8 bytes each, to the end of the frame.
    PresenceSnapshot {
        first: bool,
        last: bool,
        devices: Vec<DeviceId>,
    },
    /// See [`MessageType::Error`].
    Error { code: ErrorCode, message: Bytes },
}

/// Most device ids in one [`AgentMessage::PresenceSnapshot`] frame (32 KiB of ids).
pub const PRESENCE_SNAPSHOT_CHUNK: usize = 4096;

impl AgentMessage {
    /// The frames of a presence snapshot of `devices` (chunked, first and last marked; one
    /// frame with both marks when there are none).
    pub fn presence_snapshot(devices: &[DeviceId]) -> Vec<AgentMessage> {
        if devices.is_empty() {
            return vec![AgentMessage::PresenceSnapshot {
                first: true,
                last: true,
                devices: Vec::new(),
            }];
        }
        let n = devices.len().div_ceil(PRESENCE_SNAPSHOT_CHUNK);
        devices
            .chunks(PRESENCE_SNAPSHOT_CHUNK)
            .enumerate()
            .map(|(i, c)| AgentMessage::PresenceSnapshot {
                first: i == 0,
                last: i + 1 == n,
                devices: c.to_vec(),
            })
            .collect()
    }
}

fn short(ty: MessageType, b: &Bytes, field: &'static str) -> Result<u8, DecodeError> {
    u8::try_from(b.len()).map_err(|_| DecodeError::InvalidField {
        ty: ty as u8,
        field,
    })
}

fn topic16(ty: MessageType, topic: &Bytes) -> Result<u16, DecodeError> {
    u16::try_from(topic.len()).map_err(|_| DecodeError::InvalidField {
        ty: ty as u8,
        field: "topic",
    })
}

fn bool_field(ty: u8, v: u8, field: &'static str) -> Result<bool, DecodeError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::InvalidField { ty, field }),
    }
}

/// Starts a frame of `body_len` bytes: reserves room and writes the header.
fn start(dst: &mut BytesMut, ty: MessageType, body_len: usize) {
    dst.reserve(crate::codec::HEADER_LEN + body_len);
    put_header(dst, ty as u8, body_len);
}

/// Checks the type byte of `frame` against `link` and hands the body reader to `body`, then
/// checks that `body` read every byte: the part both links' decoders share.
fn decode_on<M>(
    frame: Frame,
    link: Link,
    body: impl FnOnce(MessageType, &mut Reader) -> Result<Option<M>, DecodeError>,
) -> Result<M, DecodeError> {
    let ty = MessageType::from_u8(frame.ty)?;
    let mut r = Reader::new(frame.ty, frame.body);
    let m = body(ty, &mut r)?.ok_or(DecodeError::WrongLink { ty: frame.ty, link })?;
    r.finish()?;
    Ok(m)
}

// Bodies both links share (Ping, Pong, Error) and the topic + payload tail of Msg, Send and
// Deliver: encoded and decoded in one place.

fn error_body_len(message: &Bytes) -> usize {
    2 + message.len()
}

fn put_error(dst: &mut BytesMut, code: ErrorCode, message: &Bytes) {
    dst.put_u16(code as u16);
    dst.put_slice(message);
}

fn read_error(r: &mut Reader, t: u8) -> Result<(ErrorCode, Bytes), DecodeError> {
    let code = ErrorCode::from_u16(r.u16()?).ok_or(DecodeError::InvalidField {
        ty: t,
        field: "error code",
    })?;
    Ok((code, r.rest()))
}

fn put_topic_payload(dst: &mut BytesMut, topic: &Bytes, payload: &Bytes) {
    dst.put_u16(topic.len() as u16);
    dst.put_slice(topic);
    dst.put_slice(payload);
}

fn read_topic_payload(r: &mut Reader) -> Result<(Bytes, Bytes), DecodeError> {
    let topic = r.bytes16()?;
    Ok((topic, r.rest()))
}

impl DeviceMessage {
    /// This message's type.
    pub fn ty(&self) -> MessageType {
        use MessageType as T;
        match self {
            DeviceMessage::Challenge { .. } => T::Challenge,
            DeviceMessage::Hello(_) => T::Hello,
            DeviceMessage::Welcome { .. } => T::Welcome,
            DeviceMessage::Ping { .. } => T::Ping,
            DeviceMessage::Pong { .. } => T::Pong,
            DeviceMessage::Msg { .. } => T::Msg,
            DeviceMessage::Ack { .. } => T::Ack,
            DeviceMessage::CodeOffer { .. } => T::CodeOffer,
            DeviceMessage::CodeRequest { .. } => T::CodeRequest,
            DeviceMessage::CodeChunk { .. } => T::CodeChunk,
            DeviceMessage::CodeAck { .. } => T::CodeAck,
            DeviceMessage::CodeDone { .. } => T::CodeDone,
            DeviceMessage::Goodbye { .. } => T::Goodbye,
            DeviceMessage::Error { .. } => T::Error,
        }
    }

    /// The encoded body length (without the 5-byte header).
    pub fn body_len(&self) -> usize {
        match self {
            DeviceMessage::Challenge { .. } => NONCE_LEN,
            DeviceMessage::Hello(h) => 2 + 8 + PROOF_LEN + 8 + 1 + h.fw_version.len() + 1 + 16,
            DeviceMessage::Welcome { .. } => 8 + 2 + 8 + 8,
            DeviceMessage::Ping { .. } | DeviceMessage::Pong { .. } | DeviceMessage::Ack { .. } => {
                8
            }
            DeviceMessage::Msg { topic, payload, .. } => 8 + 2 + topic.len() + payload.len(),
            DeviceMessage::CodeOffer { .. } => 8 + 8 + 32,
            DeviceMessage::CodeRequest { .. } | DeviceMessage::CodeAck { .. } => 16,
            DeviceMessage::CodeChunk { data, .. } => 16 + data.len(),
            DeviceMessage::CodeDone { .. } => 9,
            DeviceMessage::Goodbye { redirect, .. } => 2 + 4 + 1 + redirect.len(),
            DeviceMessage::Error { message, .. } => error_body_len(message),
        }
    }

    /// The encoded frame length, header included.
    pub fn frame_len(&self) -> usize {
        crate::codec::HEADER_LEN + self.body_len()
    }

    /// Appends this message as one frame to `dst`.
    ///
    /// Fails only when a short field (firmware version, redirect) is longer than 255 bytes or a
    /// topic longer than 65,535: nothing is written then.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), DecodeError> {
        let ty = self.ty();
        // Validate length-limited fields before writing anything.
        match self {
            DeviceMessage::Hello(h) => {
                short(ty, &h.fw_version, "fw_version")?;
            }
            DeviceMessage::Goodbye { redirect, .. } => {
                short(ty, redirect, "redirect")?;
            }
            DeviceMessage::Msg { topic, .. } => {
                topic16(ty, topic)?;
            }
            _ => {}
        }
        start(dst, ty, self.body_len());
        match self {
            DeviceMessage::Challenge { nonce } => dst.put_slice(&nonce.0),
            DeviceMessage::Hello(h) => {
                dst.put_u16(h.version);
                dst.put_u64(h.device.0);
                dst.put_slice(&h.proof.0);
                dst.put_u64(h.code_version.0);
                dst.put_u8(h.fw_version.len() as u8);
                dst.put_slice(&h.fw_version);
                match h.resume {
                    Some(r) => {
                        dst.put_u8(1);
                        dst.put_u64(r.session.0);
                        dst.put_u64(r.rx_seq.0);
                    }
                    None => {
                        dst.put_u8(0);
                        dst.put_bytes(0, 16);
                    }
                }
            }
            DeviceMessage::Welcome {
                session,
                heartbeat_s,
                server_time_ms,
                rx_seq,
            } => {
                dst.put_u64(session.0);
                dst.put_u16(*heartbeat_s);
                dst.put_u64(*server_time_ms);
                dst.put_u64(rx_seq.0);
            }
            DeviceMessage::Ping { id } | DeviceMessage::Pong { id } => dst.put_u64(*id),
            DeviceMessage::Ack { seq } => dst.put_u64(seq.0),
            DeviceMessage::Msg {
                seq,
                topic,
                payload,
            } => {
                dst.put_u64(seq.0);
                put_topic_payload(dst, topic, payload);
            }
            DeviceMessage::CodeOffer {
                version,
                size,
                digest,
            } => {
                dst.put_u64(version.0);
                dst.put_u64(*size);
                dst.put_slice(&digest.0);
            }
            DeviceMessage::CodeRequest { version, offset }
            | DeviceMessage::CodeAck { version, offset } => {
                dst.put_u64(version.0);
                dst.put_u64(*offset);
            }
            DeviceMessage::CodeChunk {
                version,
                offset,
                data,
            } => {
                dst.put_u64(version.0);
                dst.put_u64(*offset);
                dst.put_slice(data);
            }
            DeviceMessage::CodeDone { version, ok } => {
                dst.put_u64(version.0);
                dst.put_u8(*ok as u8);
            }
            DeviceMessage::Goodbye {
                reason,
                retry_after_ms,
                redirect,
            } => {
                dst.put_u16(*reason as u16);
                dst.put_u32(*retry_after_ms);
                dst.put_u8(redirect.len() as u8);
                dst.put_slice(redirect);
            }
            DeviceMessage::Error { code, message } => put_error(dst, *code, message),
        }
        Ok(())
    }

    /// Decodes one device-link frame. Unknown types, agent-link types
    /// ([`DecodeError::WrongLink`]), truncation, trailing bytes and out-of-range fields are
    /// typed errors.
    pub fn decode(frame: Frame) -> Result<DeviceMessage, DecodeError> {
        use MessageType as T;
        let t = frame.ty;
        decode_on(frame, Link::Device, |ty, r| {
            Ok(Some(match ty {
                T::Challenge => DeviceMessage::Challenge {
                    nonce: Nonce(r.array()?),
                },
                T::Hello => {
                    let version = r.u16()?;
                    let device = DeviceId(r.u64()?);
                    let proof = Proof(r.array()?);
                    let code_version = CodeVersion(r.u64()?);
                    let fw_version = r.short_bytes()?;
                    let has = bool_field(t, r.u8()?, "resume flag")?;
                    let session = SessionId(r.u64()?);
                    let rx_seq = Seq(r.u64()?);
                    let resume = has.then_some(Resume { session, rx_seq });
                    DeviceMessage::Hello(Hello {
                        version,
                        device,
                        proof,
                        code_version,
                        fw_version,
                        resume,
                    })
                }
                T::Welcome => DeviceMessage::Welcome {
                    session: SessionId(r.u64()?),
                    heartbeat_s: r.u16()?,
                    server_time_ms: r.u64()?,
                    rx_seq: Seq(r.u64()?),
                },
                T::Ping => DeviceMessage::Ping { id: r.u64()? },
                T::Pong => DeviceMessage::Pong { id: r.u64()? },
                T::Ack => DeviceMessage::Ack { seq: Seq(r.u64()?) },
                T::Msg => {
                    let seq = Seq(r.u64()?);
                    let (topic, payload) = read_topic_payload(r)?;
                    DeviceMessage::Msg {
                        seq,
                        topic,
                        payload,
                    }
                }
                T::CodeOffer => DeviceMessage::CodeOffer {
                    version: CodeVersion(r.u64()?),
                    size: r.u64()?,
                    digest: Digest(r.array()?),
                },
                T::CodeRequest => DeviceMessage::CodeRequest {
                    version: CodeVersion(r.u64()?),
                    offset: r.u64()?,
                },
                T::CodeAck => DeviceMessage::CodeAck {
                    version: CodeVersion(r.u64()?),
                    offset: r.u64()?,
                },
                T::CodeChunk => {
                    let version = CodeVersion(r.u64()?);
                    let offset = r.u64()?;
                    DeviceMessage::CodeChunk {
                        version,
                        offset,
                        data: r.rest(),
                    }
                }
                T::CodeDone => DeviceMessage::CodeDone {
                    version: CodeVersion(r.u64()?),
                    ok: bool_field(t, r.u8()?, "ok flag")?,
                },
                T::Goodbye => {
                    let code = r.u16()?;
                    let reason =
                        GoodbyeReason::from_u16(code).ok_or(DecodeError::InvalidField {
                            ty: t,
                            field: "goodbye reason",
                        })?;
                    DeviceMessage::Goodbye {
                        reason,
                        retry_after_ms: r.u32()?,
                        redirect: r.short_bytes()?,
                    }
                }
                T::Error => {
                    let (code, message) = read_error(r, t)?;
                    DeviceMessage::Error { code, message }
                }
                T::AgentHello
                | T::AgentWelcome
                | T::Send
                | T::SendResult
                | T::Deliver
                | T::DeliverAck
                | T::Presence
                | T::Deploy
                | T::DeployResult
                | T::PresenceSnapshot => return Ok(None),
            }))
        })
    }
}

impl AgentMessage {
    /// This message's type.
    pub fn ty(&self) -> MessageType {
        use MessageType as T;
        match self {
            AgentMessage::AgentHello { .. } => T::AgentHello,
            AgentMessage::AgentWelcome { .. } => T::AgentWelcome,
            AgentMessage::Ping { .. } => T::Ping,
            AgentMessage::Pong { .. } => T::Pong,
            AgentMessage::Send { .. } => T::Send,
            AgentMessage::SendResult { .. } => T::SendResult,
            AgentMessage::Deliver { .. } => T::Deliver,
            AgentMessage::DeliverAck { .. } => T::DeliverAck,
            AgentMessage::Presence { .. } => T::Presence,
            AgentMessage::Deploy { .. } => T::Deploy,
            AgentMessage::DeployResult { .. } => T::DeployResult,
            AgentMessage::PresenceSnapshot { .. } => T::PresenceSnapshot,
            AgentMessage::Error { .. } => T::Error,
        }
    }

    /// The encoded body length (without the 5-byte header).
    pub fn body_len(&self) -> usize {
        match self {
            AgentMessage::AgentHello { token, name, .. } => 2 + 1 + token.len() + 1 + name.len(),
            AgentMessage::AgentWelcome { .. } => 12,
            AgentMessage::Ping { .. } | AgentMessage::Pong { .. } => 8,
            AgentMessage::Send { topic, payload, .. }
            | AgentMessage::Deliver { topic, payload, .. } => 16 + 2 + topic.len() + payload.len(),
            AgentMessage::SendResult { .. } => 10,
            AgentMessage::DeliverAck { .. } => 16,
            AgentMessage::Presence { .. } => 9,
            AgentMessage::Deploy { group, blob } => 1 + group.len() + blob.len(),
            AgentMessage::DeployResult { group, message, .. } => {
                1 + group.len() + 8 + 32 + message.len()
            }
            AgentMessage::PresenceSnapshot { devices, .. } => 1 + 8 * devices.len(),
            AgentMessage::Error { message, .. } => error_body_len(message),
        }
    }

    /// The encoded frame length, header included.
    pub fn frame_len(&self) -> usize {
        crate::codec::HEADER_LEN + self.body_len()
    }

    /// Appends this message as one frame to `dst`.
    ///
    /// Fails only when a short field (token, name, group) is longer than 255 bytes or a topic
    /// longer than 65,535: nothing is written then.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), DecodeError> {
        let ty = self.ty();
        // Validate length-limited fields before writing anything.
        match self {
            AgentMessage::AgentHello { token, name, .. } => {
                short(ty, token, "token")?;
                short(ty, name, "name")?;
            }
            AgentMessage::Deploy { group, .. } | AgentMessage::DeployResult { group, .. } => {
                short(ty, group, "group")?;
            }
            AgentMessage::Send { topic, .. } | AgentMessage::Deliver { topic, .. } => {
                topic16(ty, topic)?;
            }
            _ => {}
        }
        start(dst, ty, self.body_len());
        match self {
            AgentMessage::AgentHello {
                version,
                token,
                name,
            } => {
                dst.put_u16(*version);
                dst.put_u8(token.len() as u8);
                dst.put_slice(token);
                dst.put_u8(name.len() as u8);
                dst.put_slice(name);
            }
            AgentMessage::AgentWelcome {
                agent,
                server_time_ms,
            } => {
                dst.put_u32(*agent);
                dst.put_u64(*server_time_ms);
            }
            AgentMessage::Ping { id } | AgentMessage::Pong { id } => dst.put_u64(*id),
            AgentMessage::Send {
                device,
                tag,
                topic,
                payload,
            } => {
                dst.put_u64(device.0);
                dst.put_u64(*tag);
                put_topic_payload(dst, topic, payload);
            }
            AgentMessage::SendResult { tag, status } => {
                dst.put_u64(*tag);
                dst.put_u16(*status as u16);
            }
            AgentMessage::Deliver {
                device,
                seq,
                topic,
                payload,
            } => {
                dst.put_u64(device.0);
                dst.put_u64(seq.0);
                put_topic_payload(dst, topic, payload);
            }
            AgentMessage::DeliverAck { device, seq } => {
                dst.put_u64(device.0);
                dst.put_u64(seq.0);
            }
            AgentMessage::Presence { device, online } => {
                dst.put_u64(device.0);
                dst.put_u8(*online as u8);
            }
            AgentMessage::Deploy { group, blob } => {
                dst.put_u8(group.len() as u8);
                dst.put_slice(group);
                dst.put_slice(blob);
            }
            AgentMessage::DeployResult {
                group,
                version,
                digest,
                message,
            } => {
                dst.put_u8(group.len() as u8);
                dst.put_slice(group);
                dst.put_u64(version.0);
                dst.put_slice(&digest.0);
                dst.put_slice(message);
            }
            AgentMessage::PresenceSnapshot {
                first,
                last,
                devices,
            } => {
                dst.put_u8(*first as u8 | (*last as u8) << 1);
                for d in devices {
                    dst.put_u64(d.0);
                }
            }
            AgentMessage::Error { code, message } => put_error(dst, *code, message),
        }
        Ok(())
    }

    /// Decodes one agent-link frame. Unknown types, device-link types
    /// ([`DecodeError::WrongLink`]), truncation, trailing bytes and out-of-range fields are
    /// typed errors.
    pub fn decode(frame: Frame) -> Result<AgentMessage, DecodeError> {
        use MessageType as T;
        let t = frame.ty;
        decode_on(frame, Link::Agent, |ty, r| {
            Ok(Some(match ty {
                T::AgentHello => AgentMessage::AgentHello {
                    version: r.u16()?,
                    token: r.short_bytes()?,
                    name: r.short_bytes()?,
                },
                T::AgentWelcome => AgentMessage::AgentWelcome {
                    agent: r.u32()?,
                    server_time_ms: r.u64()?,
                },
                T::Ping => AgentMessage::Ping { id: r.u64()? },
                T::Pong => AgentMessage::Pong { id: r.u64()? },
                T::Send => {
                    let device = DeviceId(r.u64()?);
                    let tag = r.u64()?;
                    let (topic, payload) = read_topic_payload(r)?;
                    AgentMessage::Send {
                        device,
                        tag,
                        topic,
                        payload,
                    }
                }
                T::SendResult => {
                    let tag = r.u64()?;
                    let status =
                        SendStatus::from_u16(r.u16()?).ok_or(DecodeError::InvalidField {
                            ty: t,
                            field: "send status",
                        })?;
                    AgentMessage::SendResult { tag, status }
                }
                T::Deliver => {
                    let device = DeviceId(r.u64()?);
                    let seq = Seq(r.u64()?);
                    let (topic, payload) = read_topic_payload(r)?;
                    AgentMessage::Deliver {
                        device,
                        seq,
                        topic,
                        payload,
                    }
                }
                T::DeliverAck => AgentMessage::DeliverAck {
                    device: DeviceId(r.u64()?),
                    seq: Seq(r.u64()?),
                },
                T::Presence => AgentMessage::Presence {
                    device: DeviceId(r.u64()?),
                    online: bool_field(t, r.u8()?, "online flag")?,
                },
                T::Deploy => {
                    let group = r.short_bytes()?;
                    AgentMessage::Deploy {
                        group,
                        blob: r.rest(),
                    }
                }
                T::DeployResult => {
                    let group = r.short_bytes()?;
                    let version = CodeVersion(r.u64()?);
                    let digest = Digest(r.array()?);
                    AgentMessage::DeployResult {
                        group,
                        version,
                        digest,
                        message: r.rest(),
                    }
                }
                T::PresenceSnapshot => {
                    let flags = r.u8()?;
                    if flags & !0b11 != 0 {
                        return Err(DecodeError::InvalidField {
                            ty: t,
                            field: "snapshot flags",
                        });
                    }
                    let ids = r.rest();
                    if ids.len() % 8 != 0 {
                        return Err(DecodeError::InvalidField {
                            ty: t,
                            field: "snapshot device ids",
                        });
                    }
                    AgentMessage::PresenceSnapshot {
                        first: flags & 1 != 0,
                        last: flags & 2 != 0,
                        devices: ids
                            .chunks_exact(8)
                            .map(|c| DeviceId(u64::from_be_bytes(c.try_into().expect("8 bytes"))))
                            .collect(),
                    }
                }
                T::Error => {
                    let (code, message) = read_error(r, t)?;
                    AgentMessage::Error { code, message }
                }
                T::Challenge
                | T::Hello
                | T::Welcome
                | T::Msg
                | T::Ack
                | T::CodeOffer
                | T::CodeRequest
                | T::CodeChunk
                | T::CodeAck
                | T::CodeDone
                | T::Goodbye => return Ok(None),
            }))
        })
    }
}
