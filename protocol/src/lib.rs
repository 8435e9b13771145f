//! Tether's wire protocol, sans-IO.
//!
//! Deterministic; performs no I/O and reads no clock: callers pass bytes and the current time in
//! and take bytes, events and deadlines out. The server (`tether-core`) and the load generator
//! (`tether-loadgen`, the same code a device SDK would use) are thin I/O shells around it.
#![forbid(unsafe_code)]

pub mod auth;
pub mod ids;

pub use ids::{CodeVersion, DeviceId, Digest, Seq, SessionId};
