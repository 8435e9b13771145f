//! What a shard is given: the read-only context every shard shares ([`ServerCtx`]), the
//! channels the server's main thread talks to it through ([`ShardHandle`]), and how TLS state
//! is kept after the handshake ([`TlsState`]). The server builds them; the shard only reads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tether_protocol::server::ServerConfig;

use super::GuardConfig;
use crate::codestore::Deployed;
use crate::deploy::{DeployRequest, GroupRollout};
use crate::devices::RegistryMsg;
use crate::metrics::{ShardMetrics, Slot};
use crate::registry::{Registry, Token};
use crate::reload::TlsSwap;

/// How TLS state is kept after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsState {
    /// rustls' `ServerConnection` for the connection's life (≈ 8.4 KB per idle connection).
    Buffered,
    /// Traffic keys and sequence numbers only, record layer on rustls' AEADs (≈ 1.9 KB per
    /// idle connection in all, or ≈ 2.7 KB with `--tls-key-updates`). The default.
    Detached,
}

/// Read-only state every shard shares (no locks: nothing in it changes after start, except
/// the shutdown and drain flags). Code deployed, devices added or revoked and TLS reloaded at run time
/// reach shards as messages, not through here.
pub(crate) struct ServerCtx {
    /// The TLS config at start; each shard keeps its own current one (reloads replace it).
    pub tls: Arc<rustls::ServerConfig>,
    pub tls_state: TlsState,
    pub keep_key_schedule: bool,
    pub session: ServerConfig,
    /// The registry file as loaded at start; each shard wraps it in its own `LiveRegistry`.
    pub registry: Arc<Registry>,
    pub agent_token: Token,
    /// The agent port's TLS config (`--agent-tls`); `None`: plain TCP.
    pub agent_tls: Option<Arc<rustls::ServerConfig>>,
    pub max_connections_per_shard: usize,
    /// What strangers may cost a shard (per shard).
    pub guard: GuardConfig,
    /// This shard's share of the process's `accept_rate` (0 = unlimited).
    pub accept_rate_per_shard: u32,
    /// See `ServeOptions::mesh_capacity`.
    pub mesh_capacity: usize,
    /// See `ServeOptions::agent_queue_limit`.
    pub agent_queue_limit: usize,
    pub shutdown: AtomicBool,
    pub shutdown_grace: Duration,
    /// Set while an upgrade hands this process's listeners and sessions to a new process:
    /// shards stop accepting and send their sessions away; cleared again if the upgrade
    /// fails (shards accept again).
    pub draining: AtomicBool,
    /// The window over which drained devices are told to come back (`Goodbye{upgrade}`'s
    /// `retry_after` is spread over it).
    pub upgrade_window: Duration,
    /// At an upgrade, the longest a shard stops reading its devices for its agents to answer
    /// what they were given, before it hands its sessions over (0: no wait).
    pub upgrade_quiet: Duration,
    /// This process took over from an upgraded one (`--take-over`).
    pub took_over: bool,
    pub max_transfers_per_shard: usize,
    /// Each group's current code at start.
    pub code_at_start: Vec<Deployed>,
    /// Where deploys go (the agent link submits them here).
    pub deployer: crossbeam::channel::Sender<DeployRequest>,
}

/// What the main thread holds of each shard.
pub(crate) struct ShardHandle {
    pub ready: std::sync::mpsc::Sender<Result<Option<SocketAddr>, String>>,
    /// Told when the shard's shutdown is complete (or its run failed).
    pub done: std::sync::mpsc::Sender<Result<(), String>>,
    /// Where the shard publishes its counters every tick, for the admin endpoint to read.
    pub metrics: Arc<Slot<ShardMetrics>>,
    /// Where it publishes its rollout state every tick.
    pub rollout: Arc<Slot<Vec<GroupRollout>>>,
    pub deploys: crossbeam::channel::Receiver<Deployed>,
    /// Registry changes and queries for this shard's home devices.
    pub registry: crossbeam::channel::Receiver<RegistryMsg>,
    /// Reloaded TLS configs.
    pub tls: crossbeam::channel::Receiver<TlsSwap>,
    /// At an upgrade: where this shard hands out its sessions (old process)...
    pub handed_out: crossbeam::channel::Sender<super::HandedOut>,
    /// ... and what it is told about them, or handed in (new process).
    pub handoff: crossbeam::channel::Receiver<super::HandoffCmd>,
}
