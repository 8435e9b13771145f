//! The Tether server: thread-per-core glommio shards holding device TLS connections.
//!
//! Operating needs: Linux ≥ 5.8 with io_uring (glommio), a locked-memory limit of at least
//! 512 KiB per shard, and an open-file limit above the connections wanted (each connection is
//! one descriptor; `tether serve` raises the soft limit to the hard one and refuses a
//! `--max-connections` that cannot fit).
#![deny(unsafe_op_in_unsafe_fn)]
//!
//! This library holds the server's building blocks; the `tether` binary wires them together.
//! The connection machinery it shares with the load generator (readiness ring, timing wheel,
//! detached TLS, TLS policy) is the `tether-net` crate; the wire protocol is `tether-protocol`.
//! `docs/ARCHITECTURE.md` draws the whole picture. Modules, from the bottom up (the layering
//! test in `tests/layering.rs` keeps them free of import cycles):
//!
//! - storage and identity: [`fsutil`] (atomic writes, secrets in the data directory),
//!   [`limits`] (open-file limit), [`registry`] (devices, server secret, agent and admin tokens),
//!   [`codestore`] (code blobs and each group's current version), [`pki`] (dev PKI, device CA),
//!   [`placement`] (a device's home shard), [`metrics`] (per-shard counters and their views);
//! - the admin side: [`admin`] (HTTP endpoint and its clients), [`devices`] (live registry
//!   routes, `tether devices`), [`deploy`] (deploys and rollout status), [`reload`]
//!   (certificate reload); [`client`] is the public client surface other programs use;
//! - the data path: [`shard`] (one per core: connections, sessions, agents, rollout);
//! - [`server`]: starts the shards and the admin side, and stops them;
//! - [`upgrade`]: the control channel a new binary takes listeners and sessions over (not yet
//!   used by the server).

pub mod admin;
pub mod client;
pub mod codestore;
pub mod deploy;
pub mod devices;
pub mod fsutil;
pub mod limits;
pub mod metrics;
pub mod pki;
pub mod placement;
pub mod registry;
pub mod reload;
pub mod server;
pub mod shard;
pub mod upgrade;

#[cfg(test)]
mod testdir;
