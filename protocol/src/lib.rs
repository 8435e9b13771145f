//! Tether's wire protocol, sans-IO.
//!
//! Deterministic; performs no I/O and reads no clock: callers pass bytes and the current time in
//! and take bytes, events and deadlines out. The server (`tether-core`) and the load generator
//! (`tether-loadgen`, the same code a device SDK would use) are thin I/O shells around it.
//!
//! - [`codec`]: length-prefixed frames with a hard size limit, decoded incrementally and
//!   zero-copy.
//! - [`message`]: the device link's messages ([`DeviceMessage`]) and the agent link's
//!   ([`AgentMessage`]), two enums over one type-byte table; neither link decodes the other's.
//! - [`auth`]: device keys and the per-connection proof.
//! - [`server`] and [`device`]: the two ends of a device session as state machines.
//! - [`code`]: code transfer: the server's chunked, flow-controlled sender and the device's
//!   resuming, digest-verifying receiver.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod code;
pub mod codec;
pub mod device;
pub mod error;
pub mod ids;
pub mod message;
pub mod server;
pub mod stream;
mod thin;

pub use error::{AuthError, CloseReason, DecodeError, PeerMisbehaved, SendError};
pub use ids::{CodeVersion, DeviceId, Digest, Seq, SessionId};
pub use message::{AgentMessage, DeviceMessage, Link, MessageType, PROTOCOL_VERSION};

#[cfg(test)]
mod tests;
