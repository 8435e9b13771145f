//! A shard: one glommio executor pinned to one core, owning its listeners, its connection
//! table, its timing wheel and its counters. Nothing here is shared with other shards; they
//! talk over the bounded channel mesh (`route::ShardMsg`).
//!
//! One driver task per shard polls only the connections whose sockets are ready (index
//! wakers, `wake`); a timer task, one receiver and one drain task per peer shard and one
//! task per attached agent feed it (`run.rs`).
//!
//! The shard's work is split along one seam:
//! - **connection lifecycle and I/O** (`io.rs`, with one connection's socket, TLS and
//!   session in `conn.rs`): accept, admission, the read and write steps, timers, the move to
//!   the home shard, closing;
//! - **session routing** (`route.rs`): what a session's events mean — the proof checked on
//!   the home shard, one session per device, messages to agents and back, presence — and
//!   the ordered, bounded mesh between shards.
//!
//! The agent link (`agent.rs`), the code rollout (`rollout.rs`) and the registry's changes
//! (`devices.rs`) hang off the routing side; the admission guard (`guard.rs`) off the I/O
//! side. Every per-connection and per-message step runs contained (`contain.rs`): a panic in
//! it is caught, counted by where it happened, and closes the connection (or the agent link)
//! it concerns; the shard keeps serving.
//!
//! A device message whose agent's queue (or the outbox towards its shard) is full waits, with
//! the rest of its connection's decoded events, and the connection is not read until room
//! returns (`Shard::room_returned`). Messages received from a peer wait in that peer's inbox
//! while the agent they are for has no room.

mod agent;
mod conn;
mod contain;
mod ctx;
mod devices;
mod guard;
mod handoff;
mod io;
mod rollout;
pub mod route;
mod run;
mod wake;

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::task::Waker;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use glommio::channels::channel_mesh::Senders;
use slab::Slab;
use tether_protocol::DeviceId;
use tether_protocol::server::ServerEvent;

use crate::metrics::ShardMetrics;
use crate::registry::LiveRegistry;
use agent::AgentOut;
use conn::Conn;
use guard::Guard;
use route::{AgentId, Outboxes, ShardMsg};
use tether_net::ring::{Completion, Ring};
use tether_net::timer::TimerWheel;

pub use agent::AGENT_QUEUE_LIMIT;
pub use ctx::TlsState;
pub(crate) use ctx::{ServerCtx, ShardHandle};
pub use guard::{Budget, GuardConfig};
pub(crate) use handoff::{HandedOut, HandedSession, HandoffCmd, Outgoing, rebuild};
pub(crate) use run::{ShardListeners, run_shard};

/// In debug builds, a device message on this topic blocks its shard's executor thread for the
/// milliseconds its payload spells in decimal (at most 10 s; 5 s if it spells none): a shard
/// that stops answering, for the tests of the admin endpoint.
#[cfg(debug_assertions)]
pub const STALL_TOPIC: &[u8] = b"__tether_test_stall__";

/// Read buffer lent to one connection at a time.
const READ_BUF: usize = 32 * 1024;
/// After a take-over, how long device messages wait for an agent to re-attach.
const AGENT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Most messages received from one peer that wait to be handled; past it, that peer's
/// receiver stops taking from the channel (which then fills and pushes back on the peer).
pub(crate) const INBOX_LIMIT: usize = 256;

/// What became of one session event.
enum Step {
    Done,
    /// The connection left this shard.
    Moved,
    /// No room where it goes: hold it (and the events after it) and stop reading.
    Wait(ServerEvent),
}

/// Everything one shard owns.
pub(crate) struct Shard {
    id: usize,
    nshards: usize,
    ctx: std::sync::Arc<ServerCtx>,
    /// The TLS config new connections get (replaced by a reload, in the timer tick).
    pub(crate) tls: std::sync::Arc<rustls::ServerConfig>,
    conns: Slab<Conn>,
    /// Devices whose session lives here (home shard) → their slot.
    devices: HashMap<DeviceId, usize>,
    /// The registry of the devices whose home this shard is: the file loaded at start (shared)
    /// and the changes since (from the registrar, [`devices`]).
    registry: LiveRegistry,
    /// Home devices whose session ended: when, and the code they ran (for `devices show`).
    offline: HashMap<DeviceId, devices::Seen>,
    wheel: TimerWheel<(usize, u32)>,
    metrics: ShardMetrics,
    /// Which connected devices need new code, and their transfers.
    rollout: rollout::Rollout,
    /// Every attached agent in the process, in attach order.
    agents: Vec<AgentId>,
    /// Agents attached on this shard.
    local_agents: HashMap<AgentId, Rc<AgentOut>>,
    next_agent: u32,
    /// Agent connections that have not yet proved their token.
    agents_pending: usize,
    /// Agent `Send`s awaiting the device's ack: internal tag → (agent, agent's tag).
    pending_sends: HashMap<u64, (AgentId, u64)>,
    next_tag: u64,
    next_generation: u32,
    next_session: u64,
    /// Cross-shard messages received, per peer, to handle in the driver in order.
    inbox: Vec<VecDeque<ShardMsg>>,
    /// Per peer: its receiver task, waiting for room in `inbox`.
    inbox_waiters: Vec<Option<Waker>>,
    senders: Option<Rc<Senders<ShardMsg>>>,
    /// The ordered outbox towards each peer (drained into `senders` by the drain tasks).
    pub(crate) mesh_out: Outboxes,
    /// Agent links waiting for room (in an outbox or their own queue).
    room_waiters: Vec<Waker>,
    /// Connections whose decoded events wait for room (their socket is not read meanwhile).
    stalled: HashMap<usize, VecDeque<ServerEvent>>,
    /// Agents whose presence changes from this shard are withheld: the outbox towards their
    /// shard was full, and a [`ShardMsg::PresenceGap`] went instead.
    presence_gap: HashSet<AgentId>,
    /// Attached agents here whose presence is being resynchronised.
    resyncs: HashMap<AgentId, agent::Resync>,
    /// Strangers: connections between accept and `Hello`, and the per-source budgets.
    guard: Guard,
    /// When the last guard log line was written (they are rate-limited).
    guard_logged: Option<Instant>,
    shutting_down: bool,
    /// An upgrade is handing this shard's sessions to a new process (see `begin_drain`).
    draining: bool,
    /// During that drain: where sessions go, and those established since (handed out from
    /// the next tick).
    handed_out: Option<crossbeam::channel::Sender<handoff::HandedOut>>,
    late: Vec<(usize, u32)>,
    /// The drain's quiet before the hand-out ends at this instant (see `begin_drain`).
    quiesce: Option<Instant>,
    /// After a take-over, until this instant a device message that finds no agent waits for
    /// one (the agents of the upgraded process are re-attaching) instead of being refused.
    agent_grace: Option<Instant>,
    // Shard-local buffers, lent per operation.
    read_buf: Box<[u8]>,
    plain_buf: Box<[u8]>,
    scratch: BytesMut,
    events: Vec<ServerEvent>,
    ready: Vec<usize>,
    /// The readiness ring: device sockets and the device listener.
    pub(crate) ring: Ring,
    completions: Vec<Completion>,
    /// The device listeners (one, or more after an upgrade from more shards), accepted from
    /// through the ring.
    listeners: Vec<Listener>,
    /// Accept-rate limiter.
    bucket: run::TokenBucket,
    /// The connection the contained step in progress concerns (slot, generation).
    blamed: Option<(usize, u32)>,
    /// The agent link the contained step in progress concerns.
    blamed_agent: Option<AgentId>,
}

/// A device listener the shard accepts from through its ring.
struct Listener {
    fd: OwnedFd,
    /// An accept is armed on it.
    accepting: bool,
}

impl Shard {
    pub(crate) fn new(
        id: usize,
        nshards: usize,
        ctx: std::sync::Arc<ServerCtx>,
        ring: Ring,
        listeners: Vec<OwnedFd>,
    ) -> Self {
        let bucket = run::TokenBucket::new(ctx.accept_rate_per_shard);
        let agent_grace = ctx.took_over.then(|| Instant::now() + AGENT_GRACE);
        let mesh_out = Outboxes::new(nshards, ctx.mesh_capacity);
        let mut registry = LiveRegistry::new(ctx.registry.clone());
        let rollout = Shard::new_rollout(&ctx, &mut registry);
        // Headroom over the shard's share: the device hash never splits a fleet exactly, and
        // connections still in their handshake count too.
        let capacity = ctx.max_connections_per_shard + ctx.max_connections_per_shard / 8 + 64;
        let guard = Guard::new(ctx.guard.clone(), Instant::now());
        let mut wheel = TimerWheel::new(Instant::now());
        wheel.reserve(capacity);
        Shard {
            id,
            nshards,
            tls: ctx.tls.clone(),
            ctx,
            // Sized for the shard's share up front: the tables never grow by doubling, which
            // would leave the outgrown copies in the allocator (≈ 0.6 KB per connection
            // measured at 19k). Only the pages actually used count in RSS.
            conns: Slab::with_capacity(capacity),
            devices: HashMap::with_capacity(capacity),
            registry,
            offline: HashMap::new(),
            wheel,
            metrics: ShardMetrics::default(),
            rollout,
            agents: Vec::new(),
            local_agents: HashMap::new(),
            next_agent: 0,
            agents_pending: 0,
            pending_sends: HashMap::new(),
            next_tag: 1,
            next_generation: 0,
            next_session: (id as u64) << 48 | now_ms() << 8,
            inbox: (0..nshards).map(|_| VecDeque::new()).collect(),
            inbox_waiters: (0..nshards).map(|_| None).collect(),
            senders: None,
            mesh_out,
            room_waiters: Vec::new(),
            stalled: HashMap::new(),
            presence_gap: HashSet::new(),
            resyncs: HashMap::new(),
            guard,
            guard_logged: None,
            shutting_down: false,
            draining: false,
            handed_out: None,
            late: Vec::new(),
            quiesce: None,
            agent_grace,
            read_buf: vec![0; READ_BUF].into_boxed_slice(),
            plain_buf: vec![0; READ_BUF].into_boxed_slice(),
            scratch: BytesMut::with_capacity(16 * 1024),
            events: Vec::new(),
            ready: Vec::new(),
            ring,
            completions: Vec::new(),
            listeners: listeners
                .into_iter()
                .map(|fd| Listener {
                    fd,
                    accepting: false,
                })
                .collect(),
            bucket,
            blamed: None,
            blamed_agent: None,
        }
    }
}

/// The IP address a socket is connected from (`None` if the kernel cannot say).
pub(super) fn peer_ip(fd: &OwnedFd) -> Option<std::net::IpAddr> {
    socket2::SockRef::from(fd)
        .peer_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.ip())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A `retry_after` spread over 1–30 s, so a shed or shut-down fleet reconnects gradually.
pub(super) fn retry_spread() -> u32 {
    let mut b = [0u8; 4];
    crate::fsutil::random_bytes(&mut b);
    1_000 + u32::from_le_bytes(b) % 29_000
}

#[cfg(test)]
mod size_tests {
    /// The memory budget per connection: what a slot holds, so growth is seen.
    #[test]
    fn per_connection_sizes() {
        use std::mem::size_of;
        let sizes = [
            ("Conn", size_of::<super::Conn>()),
            (
                "ServerSession",
                size_of::<tether_protocol::server::ServerSession>(),
            ),
            ("TlsConn", size_of::<super::conn::TlsConn>()),
            (
                "DetachedTls (boxed)",
                size_of::<tether_net::detached::DetachedTls>(),
            ),
        ];
        for (name, n) in sizes {
            println!("size_of {name} = {n} B");
        }
        assert!(size_of::<super::Conn>() <= 280);
        assert!(size_of::<tether_net::detached::DetachedTls>() <= 176);
    }
}
