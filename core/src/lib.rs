//! The Tether server: thread-per-core glommio shards holding device TLS connections.
//!
//! Operating needs: Linux ≥ 5.8 with io_uring (glommio), a locked-memory limit of at least
//! 512 KiB per shard, and an open-file limit above the connections wanted (each connection is
//! one descriptor; `tether serve` raises the soft limit to the hard one and refuses a
//! `--max-connections` that cannot fit).
#![deny(unsafe_op_in_unsafe_fn)]
//!
//! This library holds the server's building blocks; the `tether` binary wires them together.
//! Building blocks so far: [`tls`] (dev PKI, device CA and certificates, rustls configs),
//! [`reload`] (certificate reload on SIGHUP or `POST /reload`), [`registry`] (devices, server
//! secret, agent token), [`devices`] (the live registry's admin routes and `tether devices`
//! clients), [`timer`] (per-shard timing wheel), [`metrics`] (per-shard counters
//! and their Prometheus/JSON views), [`admin`] (HTTP admin endpoint and `tether stats` client),
//! [`codestore`] (code blobs and the current version per device group), [`detached`] (lean,
//! movable TLS record state after a rustls handshake), [`limits`] (open-file limit), [`ring`]
//! (the shard-owned readiness ring, also used by loadgen), [`fsutil`] (atomic writes and secrets
//! in the data directory).

pub mod admin;
pub mod codestore;
pub mod deploy;
pub mod detached;
pub mod devices;
pub mod fsutil;
pub mod limits;
pub mod metrics;
pub mod registry;
pub mod reload;
pub mod ring;
pub mod server;
pub mod shard;
pub mod timer;
pub mod tls;

#[cfg(test)]
mod testdir;
