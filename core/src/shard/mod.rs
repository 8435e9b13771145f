//! A shard: one glommio executor pinned to one core, owning its listeners, its connection
//! table, its timing wheel and its counters. Nothing here is shared with other shards; they
//! talk over the bounded channel mesh ([`mesh::ShardMsg`]).
//!
//! One driver task per shard polls only the connections whose sockets are ready (index
//! wakers, [`wake`]); an accept task, a timer task, one receiver and one drain task per peer
//! shard and one task per attached agent feed it.
//!
//! Cross-shard messages leave through one ordered, bounded outbox per peer ([`mesh`]); a
//! device message whose agent's queue (or the outbox towards its shard) is full waits, with
//! the rest of its connection's decoded events, and the connection is not read until room
//! returns (`Shard::room_returned`). Messages received from a peer wait in that peer's
//! inbox while the agent they are for has no room.

mod agent;
mod conn;
mod ctx;
mod devices;
mod guard;
pub mod mesh;
mod rollout;
mod run;
mod tlsconn;
mod wake;

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::task::Waker;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use glommio::channels::channel_mesh::Senders;
use slab::Slab;
use tether_protocol::auth::Nonce;
use tether_protocol::message::{GoodbyeReason, SendStatus};
use tether_protocol::server::{ServerEvent, ServerSession};
use tether_protocol::{AuthError, CloseReason, DecodeError, DeviceId, Message, PeerMisbehaved};
use tether_protocol::{CodeVersion, SendError, SessionId};

use crate::metrics::{ErrorKind, ShardMetrics};
use crate::registry::LiveRegistry;
use agent::AgentOut;
use conn::{Conn, IoOutcome};
use guard::{Guard, Refusal};
use mesh::{AgentId, Moved, Outboxes, ShardMsg, agent_shard, home_shard};
use tether_net::detached::Handshake;
use tether_net::ring::{Completion, Kind, Ring, ring_generation};
use tether_net::timer::TimerWheel;
use tlsconn::{CertDevice, TlsConn};

pub use agent::AGENT_QUEUE_LIMIT;
pub use ctx::TlsState;
pub(crate) use ctx::{ServerCtx, ShardHandle};
pub use guard::{Budget, GuardConfig};
pub(crate) use run::run_shard;

/// In debug builds, a device message on this topic panics its connection's handler (tests).
#[cfg(debug_assertions)]
pub const PANIC_TOPIC: &[u8] = b"__tether_test_panic__";

/// In debug builds, a device message on this topic blocks its shard's executor thread for the
/// milliseconds its payload spells in decimal (at most 10 s; 5 s if it spells none): a shard
/// that stops answering, for the tests of the admin endpoint.
#[cfg(debug_assertions)]
pub const STALL_TOPIC: &[u8] = b"__tether_test_stall__";

/// Read buffer lent to one connection at a time.
const READ_BUF: usize = 32 * 1024;

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
    // Shard-local buffers, lent per operation.
    read_buf: Box<[u8]>,
    plain_buf: Box<[u8]>,
    scratch: BytesMut,
    events: Vec<ServerEvent>,
    ready: Vec<usize>,
    /// The readiness ring: device sockets and the device listener.
    pub(crate) ring: Ring,
    completions: Vec<Completion>,
    /// The device listener, accepted from through the ring.
    listener: Option<OwnedFd>,
    /// A multishot accept is armed.
    accepting: bool,
    /// Accept-rate limiter.
    bucket: run::TokenBucket,
}

impl Shard {
    pub(crate) fn new(
        id: usize,
        nshards: usize,
        ctx: std::sync::Arc<ServerCtx>,
        ring: Ring,
        listener: OwnedFd,
    ) -> Self {
        let bucket = run::TokenBucket::new(ctx.accept_rate_per_shard);
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
            read_buf: vec![0; READ_BUF].into_boxed_slice(),
            plain_buf: vec![0; READ_BUF].into_boxed_slice(),
            scratch: BytesMut::with_capacity(16 * 1024),
            events: Vec::new(),
            ready: Vec::new(),
            ring,
            completions: Vec::new(),
            listener: Some(listener),
            accepting: false,
            bucket,
        }
    }

    /// Takes a freshly accepted connection.
    fn accept(&mut self, fd: OwnedFd, now: Instant) {
        self.metrics.connections_accepted += 1;
        let source = peer_ip(&fd);
        match (self.guard.check(source, now), source) {
            (Ok(()), _) => self.start(fd, source, now, false),
            (Err(Refusal::SourceBusy), Some(ip)) => {
                // Its address has its share in flight: it waits for its turn.
                if self.guard.wait(fd, ip, now).is_err() {
                    self.metrics.refused_source_busy += 1;
                }
            }
            (Err(Refusal::SourceBusy), None) => self.metrics.refused_source_busy += 1,
            // Dropping `fd` closes it.
            (Err(Refusal::SourceFailures), _) => self.metrics.refused_source_failures += 1,
        }
    }

    /// Starts the TLS handshake and the session of an admitted connection (accepted at `at`;
    /// `reserved`: its address's slot was reserved by the guard when it left the queue).
    fn start(
        &mut self,
        fd: OwnedFd,
        source: Option<std::net::IpAddr>,
        at: Instant,
        reserved: bool,
    ) {
        let release = |g: &mut Guard| {
            if let (true, Some(ip)) = (reserved, source) {
                g.release(ip);
            }
        };
        let tls = match self.ctx.tls_state {
            TlsState::Buffered => rustls::ServerConnection::new(self.tls.clone())
                .map(|c| TlsConn::Buffered(Box::new(c)))
                .ok(),
            TlsState::Detached => Handshake::new(self.tls.clone())
                .map(|h| TlsConn::Handshaking(Box::new(h)))
                .ok(),
        };
        let Some(mut tls) = tls else {
            self.metrics.error(ErrorKind::Tls);
            release(&mut self.guard);
            return;
        };
        let mut nonce = [0u8; 32];
        crate::fsutil::random_bytes(&mut nonce);
        // The Hello deadline runs from accept, time spent waiting included.
        let mut session = ServerSession::new(&self.ctx.session, Nonce(nonce), at);
        // The Challenge goes out as half-RTT data, in the server's first flight.
        let mut out = Vec::new();
        self.scratch.clear();
        if session.poll_transmit(&mut self.scratch) && tls.seal(&self.scratch, &mut out).is_err() {
            self.metrics.error(ErrorKind::Tls);
            release(&mut self.guard);
            return;
        }
        let idx = self.insert(fd, tls, session, out, false, CertDevice::default());
        let generation = self.conns[idx].generation;
        match (reserved, source) {
            (true, Some(ip)) => self.guard.track_reserved(idx, generation, ip, at),
            _ => self.guard.track(idx, generation, source, at),
        }
    }

    /// How long a connection may wait for its address's turn: half its Hello deadline. One that
    /// waited longer is closed without any work, rather than started with too little time left
    /// (under a flood of stalled handshakes from few addresses, starting those made a second
    /// burst of handshake work just as the first batch hit its deadline).
    fn max_wait(&self) -> std::time::Duration {
        self.ctx.session.hello_timeout / 2
    }

    /// Starts the waiting connections whose address got a free slot, while the shard has room.
    fn start_waiting(&mut self, now: Instant) {
        while self.guard.has_room() {
            let Some((fd, ip, at)) = self.guard.pop_ready() else {
                return;
            };
            if now.saturating_duration_since(at) >= self.max_wait() {
                self.metrics.error(ErrorKind::Timeout);
                self.guard.release(ip);
                continue;
            }
            self.start(fd, Some(ip), at, true);
        }
    }

    fn insert(
        &mut self,
        fd: OwnedFd,
        tls: TlsConn,
        session: ServerSession,
        out: Vec<u8>,
        tls_done: bool,
        cert: CertDevice,
    ) -> usize {
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        self.next_generation = ring_generation(self.next_generation.wrapping_add(1));
        let generation = self.next_generation;
        self.ring.watch_read(fd.as_raw_fd(), idx, generation);
        entry.insert(Conn {
            fd,
            tls,
            session,
            out,
            partial: Vec::new(),
            cert,
            generation,
            armed: None,
            tls_done,
            closing: false,
            registered: false,
            writing: false,
            code_version: CodeVersion(0),
        });
        self.metrics.connections_open += 1;
        wake::notify(idx);
        idx
    }

    /// Applies the readiness ring's completions: ready sockets go on the ready list, new
    /// connections into the table.
    fn on_completions(&mut self) {
        let mut cs = std::mem::take(&mut self.completions);
        self.ring.drain(&mut cs);
        for c in cs.drain(..) {
            match c.kind {
                Kind::Read | Kind::Write => {
                    let Some(conn) = self.conns.get_mut(c.idx) else {
                        continue;
                    };
                    if conn.generation != c.generation {
                        continue; // a completion for a slot since reused
                    }
                    if c.kind == Kind::Write {
                        conn.writing = false;
                    } else if !c.more && c.result != -libc::ECANCELED {
                        // The multishot poll ended (overflow or error): re-arm it.
                        self.ring
                            .watch_read(conn.fd.as_raw_fd(), c.idx, c.generation);
                    }
                    wake::notify(c.idx);
                }
                Kind::Accept => {
                    if c.result >= 0 {
                        // SAFETY: the kernel handed us this new descriptor; nobody else owns it.
                        let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
                        let now = Instant::now();
                        // One token per accepted connection.
                        if !self.bucket.spend(now) {
                            self.metrics.accept_rate_pauses += 1;
                        }
                        self.accept(fd, now);
                    } else if c.result != -libc::ECANCELED {
                        self.metrics.error(ErrorKind::Io);
                    }
                    if !c.more {
                        self.accepting = false;
                    }
                }
                Kind::Control => {}
            }
        }
        self.completions = cs;
        self.admit(Instant::now());
    }

    /// Admission control: accept while fewer than the limit of strangers are in flight (after
    /// shedding the oldest stalled ones, see [`guard`]) and the accept rate allows; otherwise
    /// leave connections in the kernel's backlog. Under a rate limit each accept takes one
    /// connection (and one token) and is re-armed while tokens last; without one a multishot
    /// accept takes them all.
    fn admit(&mut self, now: Instant) {
        while let Some((idx, generation)) = self.guard.shed_candidate(now) {
            if self
                .conns
                .get(idx)
                .is_some_and(|c| c.generation == generation)
            {
                self.metrics.handshakes_shed += 1;
                self.remove(idx);
            }
        }
        self.start_waiting(now);
        let room = self.guard.has_room() && !self.shutting_down;
        match (&self.listener, self.accepting, room) {
            (Some(l), false, true) if self.bucket.ready(now) => {
                if self.bucket.limited() {
                    self.ring.accept_one(l.as_raw_fd(), 0);
                } else {
                    self.ring.accept(l.as_raw_fd(), 0);
                }
                self.accepting = true;
            }
            (Some(_), true, false) => {
                self.ring.cancel_accept(0);
                self.accepting = false;
            }
            _ => {}
        }
    }

    /// Polls every connection that became ready, and handles cross-shard messages.
    pub(crate) fn run_ready(&mut self) {
        let now = Instant::now();
        for _round in 0..64 {
            self.on_completions();
            let mut ready = std::mem::take(&mut self.ready);
            wake::take_ready(&mut ready);
            for &idx in &ready {
                self.drive(idx, now);
            }
            let handled = self.handle_inbox(now);
            let idle = ready.is_empty() && handled == 0;
            self.ready = ready;
            if idle {
                self.start_waiting(now);
                self.submit();
                return;
            }
            self.submit();
        }
        // Still busy: let other tasks (timers, agents, the mesh) run, then continue.
        wake::wake_driver();
    }

    /// Handles the messages received from peers, each peer's in order; a peer's queue stops
    /// at a message for an agent with no room (until [`room_returned`](Self::room_returned)).
    /// Returns how many were handled.
    fn handle_inbox(&mut self, now: Instant) -> usize {
        let mut handled = 0;
        for peer in 0..self.inbox.len() {
            while let Some(m) = self.inbox[peer].front() {
                if self.must_wait(m) {
                    break;
                }
                let m = self.inbox[peer].pop_front().expect("front was Some");
                self.handle_msg(m, now);
                handled += 1;
            }
            if self.inbox[peer].len() < INBOX_LIMIT {
                if let Some(w) = self.inbox_waiters[peer].take() {
                    w.wake();
                }
            }
        }
        handled
    }

    /// Whether a message from a peer must wait: a device message for a local agent whose
    /// queue is full (anything else is taken now; presence is coalesced instead of waiting).
    fn must_wait(&self, m: &ShardMsg) -> bool {
        match m {
            ShardMsg::ToAgent {
                agent,
                msg: Message::Deliver { .. },
            } => self.local_agents.get(agent).is_some_and(|a| !a.has_room()),
            _ => false,
        }
    }

    /// A peer's receiver task: whether its inbox has room; if not, it is woken when it has.
    pub(crate) fn inbox_room(&mut self, peer: usize, w: &Waker) -> bool {
        if self.inbox[peer].len() < INBOX_LIMIT {
            return true;
        }
        self.inbox_waiters[peer] = Some(w.clone());
        false
    }

    /// Room returned somewhere (an outbox drained to half, an agent's queue was written):
    /// everything that waited for room tries again — held device events, agent links, peer
    /// inboxes, presence snapshots.
    pub(crate) fn room_returned(&mut self) {
        for &idx in self.stalled.keys() {
            wake::notify(idx);
        }
        for w in self.room_waiters.drain(..) {
            w.wake();
        }
        self.emit_resyncs();
        wake::wake_driver();
    }

    /// Hands the ring's queued operations to the kernel.
    pub(crate) fn submit(&mut self) {
        if self.ring.submit().is_err() {
            // Nothing is lost: what the kernel did not take goes with the next submission (the
            // driver runs at least every timer tick).
            self.metrics.error(ErrorKind::Io);
        }
        if self.ring.has_held() {
            // Completions taken to let the submission through raise no eventfd signal.
            wake::wake_driver();
        }
    }

    /// One step of one connection: input, events, output, timer. A panic in it is caught,
    /// counted, and closes that connection only.
    fn drive(&mut self, idx: usize, now: Instant) {
        if !self.conns.contains(idx) {
            return; // a stale wake for a slot since freed
        }
        let r = catch_unwind(AssertUnwindSafe(|| self.drive_inner(idx, now)));
        if r.is_err() {
            self.metrics.panics_caught += 1;
            self.metrics.error(ErrorKind::Panic);
            if self.conns.contains(idx) {
                self.remove(idx);
            }
        }
    }

    fn drive_inner(&mut self, idx: usize, now: Instant) {
        if self.stalled.contains_key(&idx) {
            // Its events wait for room: retry them, and read the socket only once they went.
            self.after_input(idx, now);
            if self.conns.contains(idx) && !self.stalled.contains_key(&idx) {
                wake::notify(idx);
            }
            return;
        }
        let conn = &mut self.conns[idx];
        let outcome = conn.read_step(
            now,
            &mut self.read_buf,
            &mut self.plain_buf,
            self.ctx.keep_key_schedule,
            &mut self.metrics,
        );
        match outcome {
            IoOutcome::Dead(kind) => {
                if let Some(k) = kind {
                    self.metrics.error(k);
                }
                self.remove(idx);
                return;
            }
            IoOutcome::More => wake::notify(idx),
            _ => {}
        }
        self.after_input(idx, now);
    }

    /// Handles the session's events, then writes its output and re-arms its timer.
    fn after_input(&mut self, idx: usize, now: Instant) {
        // Handling an event can raise more (authentication closes a session): loop until
        // the session has nothing more to say.
        let mut events = std::mem::take(&mut self.events);
        let mut moved = false;
        let was_stalled = self.stalled.contains_key(&idx);
        'outer: while self.conns.contains(idx) {
            if let Some(held) = self.stalled.remove(&idx) {
                events.extend(held);
            } else {
                while let Some(e) = self.conns[idx].session.poll_event() {
                    events.push(e);
                }
            }
            if events.is_empty() {
                break;
            }
            let mut pending = events.drain(..);
            while let Some(e) = pending.next() {
                if !self.conns.contains(idx) {
                    break 'outer;
                }
                match self.on_event(idx, e, now) {
                    Step::Done => {}
                    Step::Moved => {
                        moved = true;
                        break 'outer;
                    }
                    Step::Wait(e) => {
                        let mut held = VecDeque::with_capacity(1 + pending.len());
                        held.push_back(e);
                        held.extend(pending);
                        self.stalled.insert(idx, held);
                        if !was_stalled {
                            self.metrics.pushback_device_reads += 1;
                        }
                        break 'outer;
                    }
                }
            }
        }
        events.clear();
        self.events = events;
        if moved || !self.conns.contains(idx) {
            return;
        }
        let conn = &mut self.conns[idx];
        match conn.write_step(&mut self.scratch, &mut self.metrics) {
            IoOutcome::Dead(kind) => {
                if let Some(k) = kind {
                    self.metrics.error(k);
                }
                self.remove(idx);
                return;
            }
            IoOutcome::Blocked if !conn.writing => {
                conn.writing = true;
                self.ring
                    .watch_write(conn.fd.as_raw_fd(), idx, conn.generation);
            }
            _ => {}
        }
        let conn = &mut self.conns[idx];
        if conn.closing && conn.flushed() {
            self.remove(idx);
            return;
        }
        self.arm(idx);
    }

    /// Makes sure the wheel holds the connection's earliest deadline.
    fn arm(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        let want = if conn.closing {
            // A closing connection gets a short grace to flush, then is dropped.
            Some(Instant::now() + std::time::Duration::from_secs(2))
        } else {
            conn.session.poll_timeout()
        };
        match (want, conn.armed) {
            (Some(w), Some((at, _))) if w >= at => {} // fires earlier, re-armed then
            (Some(w), _) => {
                let id = self.wheel.insert(w, (idx, conn.generation));
                conn.armed = Some((w, id));
            }
            (None, _) => {}
        }
    }

    /// Expires deadlines (called by the timer task).
    pub(crate) fn tick(&mut self, now: Instant, expired: &mut Vec<(usize, u32)>) {
        self.admit(now);
        self.guard.sweep(now);
        if let Some(deadline) = now.checked_sub(self.max_wait()) {
            for _ in 0..self.guard.expire_waiting(deadline) {
                self.metrics.error(ErrorKind::Timeout);
            }
        }
        self.metrics.handshakes_in_flight = self.guard.in_flight() as u64;
        self.metrics.handshakes_waiting = self.guard.queued() as u64;
        self.metrics.guard_untracked = self.guard.untracked;
        let ring = self.ring.stats();
        self.metrics.ring_busy_retries = ring.busy_retries;
        self.metrics.ring_deferred = ring.deferred;
        self.metrics.ring_backlog = self.ring.backlog() as u64;
        self.metrics.devices_waiting = self.stalled.len() as u64;
        self.metrics.mesh_queued = self.mesh_out.queued() as u64;
        expired.clear();
        self.wheel.expire(now, expired);
        for &(idx, generation) in expired.iter() {
            let Some(conn) = self.conns.get_mut(idx) else {
                continue;
            };
            if conn.generation != generation {
                continue;
            }
            conn.armed = None;
            if conn.closing {
                self.remove(idx);
                continue;
            }
            conn.session.handle_timeout(now);
            self.after_input(idx, now);
        }
    }

    /// Acts on one session event.
    fn on_event(&mut self, idx: usize, e: ServerEvent, now: Instant) -> Step {
        match e {
            ServerEvent::Hello { device, .. } => {
                // No longer a stranger in flight here: its proof is checked next.
                self.guard.done(idx, self.conns[idx].generation);
                let home = home_shard(device, self.nshards);
                if home != self.id {
                    self.move_to(idx, home);
                    return Step::Moved;
                }
                self.authenticate(idx, device, now);
            }
            ServerEvent::Message {
                seq,
                topic,
                payload,
            } => {
                let device = self.conns[idx].session.device();
                let agent = match device {
                    Some(d) if !self.agents.is_empty() => Some(
                        self.agents
                            [(crate::placement::mix(d.0) % self.agents.len() as u64) as usize],
                    ),
                    _ => None,
                };
                if let Some(agent) = agent {
                    if !self.agent_room(agent) {
                        // Acknowledged only once its agent has it: wait, never drop.
                        return Step::Wait(ServerEvent::Message {
                            seq,
                            topic,
                            payload,
                        });
                    }
                }
                self.metrics.msgs_in += 1;
                // Debug builds only: lets the tests prove a panic closes one connection only.
                #[cfg(debug_assertions)]
                if &topic[..] == PANIC_TOPIC {
                    panic!("test hook: a device asked for a panic");
                }
                #[cfg(debug_assertions)]
                if &topic[..] == STALL_TOPIC {
                    let ms = std::str::from_utf8(&payload)
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .unwrap_or(5_000)
                        .min(10_000);
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                let Some(device) = device else {
                    return Step::Done;
                };
                let Some(agent) = agent else {
                    // No agent to take it: leave it unacknowledged; the device resends.
                    self.metrics.undeliverable += 1;
                    return Step::Done;
                };
                self.route(
                    agent_shard(agent),
                    ShardMsg::ToAgent {
                        agent,
                        msg: Message::Deliver {
                            device,
                            seq,
                            topic,
                            payload,
                        },
                    },
                );
            }
            ServerEvent::Delivered { tag, .. } => {
                self.metrics.acks += 1;
                if let Some((agent, tag)) = self.pending_sends.remove(&tag) {
                    self.send_result(agent, tag, SendStatus::Delivered);
                }
            }
            ServerEvent::Code(e) => self.on_code(idx, e),
            ServerEvent::Closed(reason) => {
                self.count_close(&reason);
                let conn = &mut self.conns[idx];
                conn.closing = true;
                if matches!(reason, CloseReason::Local(_)) {
                    self.metrics.goodbyes_sent += 1;
                }
                self.unregister(idx);
            }
        }
        Step::Done
    }

    /// Whether a message for `agent` may be queued now: its queue has room if it is attached
    /// here, else the outbox towards its shard has. (An agent gone meanwhile has room: the
    /// message is discarded where it was attached, as before it left.)
    fn agent_room(&mut self, agent: AgentId) -> bool {
        let to = agent_shard(agent);
        if to == self.id {
            return self.local_agents.get(&agent).is_none_or(|a| a.has_room());
        }
        self.mesh_out.has_room(to)
    }

    fn count_close(&mut self, reason: &CloseReason) {
        use CloseReason as R;
        use PeerMisbehaved as P;
        let kind = match reason {
            R::PeerMisbehaved(P::Decode(DecodeError::FrameTooLarge { .. })) => {
                ErrorKind::FrameTooLarge
            }
            R::PeerMisbehaved(P::Decode(_)) => ErrorKind::MalformedFrame,
            R::PeerMisbehaved(_) => ErrorKind::Protocol,
            R::Auth(AuthError::BadProof) => ErrorKind::BadProof,
            R::Auth(_) => ErrorKind::UnknownDevice,
            R::HandshakeTimeout => ErrorKind::Timeout,
            R::IdleTimeout => {
                self.metrics.heartbeat_timeouts += 1;
                return;
            }
            _ => return,
        };
        if matches!(reason, R::Auth(_)) {
            self.metrics.auth_failures += 1;
        }
        self.metrics.error(kind);
    }

    /// Hands a connection to the device's home shard (once per connection, after `Hello`).
    fn move_to(&mut self, idx: usize, home: usize) {
        // The watch is removed from our ring first; the descriptor itself travels.
        let conn = self.remove_quietly(idx);
        self.metrics.sessions_moved_out += 1;
        self.route(
            home,
            ShardMsg::Adopt(Box::new(Moved {
                fd: conn.fd,
                tls: conn.tls,
                session: conn.session,
                partial: conn.partial,
                out: conn.out,
                tls_done: conn.tls_done,
                cert: conn.cert,
            })),
        );
    }

    fn adopt(&mut self, m: Moved, now: Instant) {
        self.metrics.sessions_moved_in += 1;
        let device = m.session.pending_device();
        let idx = self.insert(m.fd, m.tls, m.session, m.out, m.tls_done, m.cert);
        // What the other shard read but TLS had not consumed is processed before the socket is
        // read again (the device may have sent everything already: no new readiness).
        let conn = &mut self.conns[idx];
        conn.partial = m.partial;
        if let IoOutcome::Dead(kind) = conn.open_carried(
            now,
            &mut self.plain_buf,
            self.ctx.keep_key_schedule,
            &mut self.metrics,
        ) {
            if let Some(k) = kind {
                self.metrics.error(k);
            }
            self.remove(idx);
            return;
        }
        if let Some(device) = device {
            self.authenticate(idx, device, now);
            self.after_input(idx, now);
        }
    }

    /// Answers a connection's `Hello` on the device's home shard.
    ///
    /// The proof is checked first, and nothing else is touched until it verifies: a stranger
    /// naming a live device's id gets the same `Error` as an unknown device and a closed
    /// connection, and the live session never notices. A verified connection replaces an
    /// older session of the same device and inherits everything it held (unacknowledged
    /// messages both ways, the agent sends awaiting the device's ack, the session id); the
    /// device stays online for agents throughout, so a replacement sends them no presence.
    fn authenticate(&mut self, idx: usize, device: DeviceId, now: Instant) {
        // A verified client certificate vouches instead of the proof (`--device-ca`).
        let conn = &self.conns[idx];
        let credential = self
            .registry
            .get(device)
            .map(|e| conn.cert.credential(&e.key));
        let verified = match conn.session.verify_credential(credential) {
            Ok(v) => v,
            Err(e) => {
                self.conns[idx].session.reject(e);
                let source = peer_ip(&self.conns[idx].fd);
                if self.guard.auth_failed(source, device, now) {
                    self.metrics.device_auth_alarms += 1;
                    self.guard_log(now, || {
                        format!("device {}: failed proofs past its budget (its own verified connections are still accepted)", device.0)
                    });
                }
                return;
            }
        };
        if self.shutting_down {
            self.conns[idx]
                .session
                .close(GoodbyeReason::Shutdown, retry_spread());
            return;
        }
        let old = self
            .devices
            .get(&device)
            .copied()
            .filter(|&old| old != idx && self.conns.contains(old));
        if old.is_none() && self.ctx.max_connections_per_shard <= self.devices.len() {
            self.metrics.shed += 1;
            self.conns[idx]
                .session
                .close(GoodbyeReason::Overloaded, retry_spread());
            return;
        }
        if old.is_some() {
            if let Err(retry_after) = self.guard.replacing(device, now) {
                // Flapping: the established session stays; the newcomer waits.
                self.metrics.flaps_damped += 1;
                self.conns[idx]
                    .session
                    .close(GoodbyeReason::Flapping, retry_after);
                return;
            }
        }
        // One session per device: the verified newcomer replaces the older one.
        let mut carried = None;
        if let Some(old) = old {
            let c = &mut self.conns[old];
            carried = c.session.take_carried();
            c.registered = false;
            self.devices.remove(&device);
            self.metrics.sessions_replaced += 1;
            self.code_disconnected(device);
            wake::notify(old);
        }
        self.next_session += 1;
        let session = SessionId(self.next_session);
        let conn = &mut self.conns[idx];
        let running = conn.session.pending_code_version().unwrap_or_default();
        conn.session
            .establish(now, verified, session, now_ms(), carried);
        conn.registered = true;
        conn.code_version = running;
        self.devices.insert(device, idx);
        self.offline.remove(&device);
        if old.is_none() {
            self.presence(device, true);
        }
        self.code_connected(idx, device, running);
    }

    /// Forgets a connection's device registration (presence offline, undelivered sends).
    fn unregister(&mut self, idx: usize) {
        self.unregister_with(idx, SendStatus::Offline);
    }

    /// [`unregister`](Self::unregister), answering the agent sends the device did not
    /// acknowledge with `status`; returns how many there were.
    fn unregister_with(&mut self, idx: usize, status: SendStatus) -> u64 {
        let conn = &mut self.conns[idx];
        if !conn.registered {
            return 0;
        }
        conn.registered = false;
        let device = conn.session.device();
        let code_version = conn.code_version;
        let unacked = conn.session.take_unacked();
        if let Some(device) = device {
            if self.devices.get(&device) == Some(&idx) {
                self.devices.remove(&device);
                self.code_disconnected(device);
                self.offline.insert(
                    device,
                    devices::Seen {
                        code_version,
                        ended_ms: now_ms(),
                    },
                );
            }
            self.presence(device, false);
        }
        let mut answered = 0;
        for m in unacked {
            if let Some((agent, tag)) = self.pending_sends.remove(&m.tag) {
                self.send_result(agent, tag, status);
                answered += 1;
            }
        }
        answered
    }

    /// Drops a connection.
    fn remove(&mut self, idx: usize) {
        // Events held for room: the device's acks still answer their agents' sends (its own
        // messages held were never acknowledged to it, so it still has them).
        for e in self.stalled.remove(&idx).unwrap_or_default() {
            if let ServerEvent::Delivered { tag, .. } = e {
                if let Some((agent, tag)) = self.pending_sends.remove(&tag) {
                    self.send_result(agent, tag, SendStatus::Delivered);
                }
            }
        }
        self.unregister(idx);
        let mut conn = self.remove_quietly(idx);
        if !conn.closing {
            conn.tls.close_notify(&mut conn.out);
            let _ = conn.flush(&mut self.metrics);
        }
        // The ring's poll was removed in `remove_quietly`; the descriptor closes on drop.
    }

    fn remove_quietly(&mut self, idx: usize) -> Conn {
        self.stalled.remove(&idx);
        let conn = self.conns.remove(idx);
        // A pending poll would keep the socket open after close. The removal goes to the
        // kernel now, before the descriptor is closed or handed to another shard (which may
        // close it at once): queued, it left the socket open until this ring's next submit,
        // and a watch queued but not yet submitted would arm on a closed descriptor number.
        self.ring.unwatch(idx, conn.generation, conn.writing);
        self.submit();
        if let Some((_, id)) = conn.armed {
            self.wheel.cancel(id);
        }
        self.guard.done(idx, conn.generation);
        self.metrics.connections_open -= 1;
        conn
    }

    /// Tells every agent that a home device came online or went offline. Towards a shard
    /// whose outbox is full the change is not queued: the agent's shard is told of the gap
    /// once, and this shard withholds changes for that agent until it asks for a snapshot.
    fn presence(&mut self, device: DeviceId, online: bool) {
        for i in 0..self.agents.len() {
            let agent = self.agents[i];
            let to = agent_shard(agent);
            if to == self.id {
                self.presence_to_local(agent, device, online);
                continue;
            }
            if self.presence_gap.contains(&agent) {
                self.metrics.agent_overflow += 1;
                continue;
            }
            if !self.mesh_out.has_room(to) {
                self.metrics.agent_overflow += 1;
                self.presence_gap.insert(agent);
                let from = self.id;
                self.route(to, ShardMsg::PresenceGap { agent, from });
                continue;
            }
            self.route(
                to,
                ShardMsg::ToAgent {
                    agent,
                    msg: Message::Presence { device, online },
                },
            );
        }
    }

    fn send_result(&mut self, agent: AgentId, tag: u64, status: SendStatus) {
        self.route(
            agent_shard(agent),
            ShardMsg::ToAgent {
                agent,
                msg: Message::SendResult { tag, status },
            },
        );
    }

    /// Delivers a message to shard `to`: handled at once if that is us, else into the
    /// channel if nothing is queued before it, else behind the rest of the outbox towards
    /// `to` (in order; producers that can wait checked [`Outboxes::has_room`] first).
    fn route(&mut self, to: usize, msg: ShardMsg) {
        if to == self.id {
            self.handle_msg(msg, Instant::now());
            return;
        }
        let Some(senders) = self.senders.as_ref() else {
            return;
        };
        let msg = if self.mesh_out.is_idle(to) {
            match senders.try_send_to(to, msg) {
                Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m))) => m,
                // Sent, or the peer is gone (shutting down): nothing to keep.
                _ => return,
            }
        } else {
            msg
        };
        self.mesh_out.push(to, msg);
    }

    fn handle_msg(&mut self, msg: ShardMsg, now: Instant) {
        match msg {
            ShardMsg::Adopt(m) => self.adopt(*m, now),
            ShardMsg::AgentUp { agent } => {
                if !self.agents.contains(&agent) {
                    self.agents.push(agent);
                }
            }
            ShardMsg::AgentDown { agent } => {
                self.agents.retain(|a| *a != agent);
                self.presence_gap.remove(&agent);
                self.resyncs.remove(&agent);
            }
            ShardMsg::ToDevice {
                device,
                agent,
                tag,
                topic,
                payload,
            } => self.send_to_device(device, agent, tag, topic, payload),
            ShardMsg::DeliverAck { device, seq } => {
                if let Some(&idx) = self.devices.get(&device) {
                    self.conns[idx].session.ack_received(seq);
                    wake::notify(idx);
                }
            }
            ShardMsg::ToAgent {
                agent,
                msg: Message::Presence { device, online },
            } => self.presence_to_local(agent, device, online),
            ShardMsg::ToAgent { agent, msg } => {
                if let Some(a) = self.local_agents.get(&agent) {
                    if a.push(&msg) {
                        self.metrics.msgs_out += 1;
                    }
                }
            }
            ShardMsg::PresenceGap { agent, from } => self.on_presence_gap(agent, from),
            ShardMsg::PresenceResync { agent } => {
                self.presence_gap.remove(&agent);
                let devices = self.devices.keys().copied().collect();
                let from = self.id;
                self.route(
                    agent_shard(agent),
                    ShardMsg::PresenceSnapshot {
                        agent,
                        from,
                        devices,
                    },
                );
            }
            ShardMsg::PresenceSnapshot {
                agent,
                from,
                devices,
            } => self.on_presence_snapshot(agent, from, devices),
        }
    }

    fn send_to_device(
        &mut self,
        device: DeviceId,
        agent: AgentId,
        tag: u64,
        topic: Bytes,
        payload: Bytes,
    ) {
        let Some(&idx) = self.devices.get(&device) else {
            let status = if self.registry.get(device).is_some() {
                SendStatus::Offline
            } else {
                SendStatus::UnknownDevice
            };
            self.send_result(agent, tag, status);
            return;
        };
        let internal = self.next_tag;
        self.next_tag += 1;
        match self.conns[idx].session.send(topic, payload, internal) {
            Ok(_) => {
                self.metrics.msgs_out += 1;
                self.pending_sends.insert(internal, (agent, tag));
                wake::notify(idx);
            }
            Err(e) => {
                let status = match e {
                    SendError::OutboxFull { .. } => {
                        self.metrics.error(ErrorKind::OutboxFull);
                        SendStatus::QueueFull
                    }
                    SendError::TooLarge { .. } => SendStatus::TooLarge,
                    _ => SendStatus::Offline,
                };
                self.send_result(agent, tag, status);
            }
        }
    }

    /// Starts a graceful shutdown: every session gets `Goodbye{Shutdown}` with a spread
    /// `retry_after`, so the fleet does not come back all at once.
    pub(crate) fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        if self.accepting {
            self.ring.cancel_accept(0);
            self.accepting = false;
        }
        self.listener = None;
        let idxs: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for idx in idxs {
            self.conns[idx]
                .session
                .close(GoodbyeReason::Shutdown, retry_spread());
            wake::notify(idx);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

impl Shard {
    /// One guard line on stderr at most every 10 s per shard; the rest are counted only.
    fn guard_log(&mut self, now: Instant, line: impl FnOnce() -> String) {
        if self
            .guard_logged
            .is_some_and(|t| now.saturating_duration_since(t) < std::time::Duration::from_secs(10))
        {
            return;
        }
        self.guard_logged = Some(now);
        eprintln!("tether: shard {}: {}", self.id, line());
    }
}

/// The IP address a socket is connected from (`None` if the kernel cannot say).
fn peer_ip(fd: &OwnedFd) -> Option<std::net::IpAddr> {
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
fn retry_spread() -> u32 {
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
            ("TlsConn", size_of::<super::TlsConn>()),
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
