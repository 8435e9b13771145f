//! The Tether server: thread-per-core glommio shards holding device TLS connections.
//!
//! This library holds the server's building blocks; the `tether` binary wires them together.

pub mod admin;
pub mod fsutil;
pub mod metrics;
pub mod registry;
pub mod timer;
pub mod tls;

#[cfg(test)]
mod testdir;
