//! The Tether server: thread-per-core glommio shards holding device TLS connections.
//!
//! This library holds the server's building blocks; the `tether` binary wires them together.
//! Building blocks so far: [`tls`] (dev PKI and rustls configs), [`registry`] (devices, server
//! secret, agent token), [`timer`] (per-shard timing wheel), [`metrics`] (per-shard counters
//! and their Prometheus/JSON views), [`admin`] (HTTP admin endpoint and `tether stats` client),
//! [`limits`] (open-file limit), [`fsutil`] (atomic writes and secrets in the data directory).

pub mod admin;
pub mod fsutil;
pub mod limits;
pub mod metrics;
pub mod registry;
pub mod timer;
pub mod tls;

#[cfg(test)]
mod testdir;
