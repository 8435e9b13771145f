//! Tether's connection machinery: what both ends of a device connection need to hold many of
//! them cheaply, and nothing about what the server or the load generator does with them.
//!
//! - [`ring`]: a shard-owned io_uring readiness ring (multishot poll per socket, accept,
//!   doorbell), and the only `unsafe` socket calls the load generator needs.
//! - [`timer`]: a per-shard hashed timing wheel (one slot per connection, O(1) arm and cancel).
//! - [`detached`]: lean TLS 1.3 record state detached from rustls after its handshake (keys,
//!   sequence numbers), movable between shards and processes; server and client sides.
//! - [`tls`]: the TLS policy (rustls configs, ALPN names, the device-certificate verifier).
//!
//! The server (`tether-core`) and the load generator (`tether-loadgen`) both build on this
//! crate; it depends only on the wire protocol (`tether-protocol`) for the device id type.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod detached;
pub mod ring;
pub mod timer;
pub mod tls;
