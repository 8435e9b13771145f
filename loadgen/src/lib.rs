//! Tether's load generator: simulated devices and agents, campaigns, HDR latency, reports.
//!
//! A simulated device is what a real device SDK would be: the device-side sans-IO session of
//! `tether-protocol` plus lean TLS state, driven over a real loopback socket. Like the server,
//! loadgen is thread-per-core: one driver per shard over a slab of devices, no task or buffer per
//! device at rest, so the generator is not the bottleneck of what it measures.
//!
//! - [`campaign`]: what a run does, from a TOML file, validated, with `--set` overrides and the
//!   split over worker processes when one process's open-file limit is not enough.
//! - [`stats`]: per-shard HDR histograms, error counts and counters, merged for the report; the
//!   open-loop send schedule that keeps latency free of coordinated omission.
//! - [`report`]: the JSON report, the human table and the one-line live progress.
//! - [`host`]: limits, RSS and kernel socket figures read from `/proc`.
//! - [`run`]: runs a campaign: the spawned server (or `server.nodes` of them), the glommio shards
//!   of simulated devices and agents, the campaign's attackers (`[[attack]]`), progress and the
//!   report; past one process it coordinates worker processes ([`run::worker`]), local or remote,
//!   and merges their histograms.
//!
//! Operating needs: every connection is a file descriptor, so a process holds at most its
//! open-file hard limit minus [`campaign::FD_RESERVE`] devices (20,000 on the project's shared
//! VM; `tuning/` raises it on bare metal; more devices: more worker processes), and each loopback source address gives ~28k ephemeral
//! ports towards one server address. Load never leaves loopback (127.0.0.0/8).
#![deny(unsafe_code)] // one audited exception: SIGTERM to the spawned server (run::spawn)

pub mod campaign;
pub mod host;
pub mod report;
pub mod run;
pub mod stats;
