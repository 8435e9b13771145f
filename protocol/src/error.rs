//! Typed errors. Every variant's message tells a person what was wrong.

use crate::message::{Link, MessageType};

/// A frame or message that could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix exceeds the configured limit.
    #[error("frame of {got} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The configured limit.
        limit: u32,
        /// The length the peer announced.
        got: u32,
    },
    /// A zero length prefix: a frame must at least carry its type byte.
    #[error("empty frame (length 0): every frame carries a type byte")]
    EmptyFrame,
    /// The type byte names no known message.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// The type byte names a message of the other link (an agent-link type on a device
    /// connection, or the reverse).
    #[error("message type 0x{ty:02x} does not belong on the {link} link")]
    WrongLink {
        /// The message type byte.
        ty: u8,
        /// The link it arrived on.
        link: Link,
    },
    /// The body ends before the message's fields do.
    #[error("message type 0x{ty:02x} is truncated")]
    Truncated {
        /// The message type byte.
        ty: u8,
    },
    /// The body has bytes past the message's last field.
    #[error("message type 0x{ty:02x} has {extra} trailing bytes")]
    TrailingBytes {
        /// The message type byte.
        ty: u8,
        /// How many bytes were left over.
        extra: u32,
    },
    /// A field holds a value outside its range.
    #[error("message type 0x{ty:02x}: invalid {field}")]
    InvalidField {
        /// The message type byte.
        ty: u8,
        /// The field's name.
        field: &'static str,
    },
}

/// What a peer did wrong. Flat and `Copy` so it can be counted per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerMisbehaved {
    /// A frame could not be decoded.
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    /// A message that is not allowed in the session's current state.
    #[error("unexpected {got} while {state}")]
    UnexpectedMessage {
        /// What the session was waiting for.
        state: &'static str,
        /// The message that came instead.
        got: MessageType,
    },
    /// `Hello` named a protocol version this side does not speak.
    #[error("unsupported protocol version {got} (this side speaks {supported})")]
    UnsupportedVersion {
        /// The version the peer sent.
        got: u16,
        /// The version we speak.
        supported: u16,
    },
    /// An `Ack` for a sequence number never sent.
    #[error("ack of seq {got}, but only {sent} were sent")]
    AckOfUnsent {
        /// The acknowledged seq.
        got: u64,
        /// The highest seq sent.
        sent: u64,
    },
}

/// Why a device failed authentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The device id is not in the registry.
    #[error("unknown device")]
    UnknownDevice,
    /// The proof does not match this connection's nonce and the device's key.
    #[error("bad proof: the HMAC does not match this connection's challenge")]
    BadProof,
    /// `authenticate` was called with no `Hello` pending (a driver bug, not the device's).
    #[error("no Hello is pending authentication")]
    NoHelloPending,
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer broke the protocol.
    #[error("peer misbehaved: {0}")]
    PeerMisbehaved(#[from] PeerMisbehaved),
    /// Authentication failed.
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
    /// No `Hello` (server) or no `Welcome` (device) in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Nothing heard from the peer within the idle deadline.
    #[error("idle timeout: nothing heard from the peer")]
    IdleTimeout,
    /// The peer said goodbye.
    #[error("peer said goodbye ({0})")]
    PeerGoodbye(crate::message::GoodbyeReason),
    /// The peer sent an error frame.
    #[error("peer reported error: {0}")]
    PeerError(crate::message::ErrorCode),
    /// This side closed the session (shutdown, shedding, replaced by a newer connection).
    #[error("closed locally ({0})")]
    Local(crate::message::GoodbyeReason),
}

impl CloseReason {
    /// The error code sent to the peer for this reason, when one is sent.
    pub fn wire_code(&self) -> Option<crate::message::ErrorCode> {
        use crate::message::ErrorCode as C;
        Some(match self {
            CloseReason::PeerMisbehaved(PeerMisbehaved::Decode(DecodeError::FrameTooLarge {
                ..
            })) => C::FrameTooLarge,
            CloseReason::PeerMisbehaved(PeerMisbehaved::Decode(_)) => C::MalformedFrame,
            CloseReason::PeerMisbehaved(PeerMisbehaved::UnsupportedVersion { .. }) => {
                C::UnsupportedVersion
            }
            CloseReason::PeerMisbehaved(_) => C::ProtocolViolation,
            // One answer for every authentication failure: a stranger must not learn which
            // device ids exist (the server counts the reasons apart).
            CloseReason::Auth(_) => C::AuthFailed,
            CloseReason::HandshakeTimeout | CloseReason::IdleTimeout => C::Timeout,
            _ => return None,
        })
    }

    /// The text sent with [`wire_code`](Self::wire_code): the reason, except that every
    /// authentication failure reads the same.
    pub fn wire_message(&self) -> String {
        match self {
            CloseReason::Auth(_) => "authentication failed".to_owned(),
            other => other.to_string(),
        }
    }
}

/// A message could not be queued for sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The bounded queue of unacknowledged messages is full.
    #[error("outbox full ({limit} unacknowledged messages)")]
    OutboxFull {
        /// The outbox limit.
        limit: u32,
    },
    /// The session is closed.
    #[error("session closed")]
    Closed,
    /// The message would not fit in one frame.
    #[error("message of {got} bytes exceeds the frame limit of {limit}")]
    TooLarge {
        /// The frame limit.
        limit: u32,
        /// The encoded size.
        got: u32,
    },
}
