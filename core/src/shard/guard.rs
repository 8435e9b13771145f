//! The admission guard: what a connection may cost a shard before its proof verifies.
//!
//! A connection is a stranger from accept until its `Hello` has arrived (and, on the home
//! shard, verified). Strangers are bounded four ways, each counted:
//!
//! - **In flight**: at most `max_handshakes` connections per shard between accept and `Hello`
//!   (TLS handshake included). When the table is full, the oldest one that has been in flight
//!   for at least `shed_after` is shed to make room: a stalled or silent stranger gives way to
//!   a newcomer instead of good devices waiting behind it in the kernel's backlog. When every
//!   in-flight connection is younger than that (a burst of real devices), the shard stops
//!   accepting until one finishes, as before.
//! - **Per source address**: at most `per_source` of those in flight per shard from one IP
//!   address. Past it, a new connection from that address waits, accepted but untouched (no
//!   TLS state: a descriptor and a timestamp), in that address's queue, and starts when one of
//!   its address's connections is done — so a storm from one NAT address is served in turn
//!   while other addresses go on being served. Past [`QUEUE_PER_SOURCE`] waiting, or once it
//!   has waited half its handshake deadline, it is closed.
//! - **Failed proofs per source address**: a token bucket per address; while it is empty, new
//!   connections from that address are closed at accept.
//! - **Failed proofs per device id**: a token bucket per id on the id's home shard. Running it
//!   dry raises an alarm (counted, logged once a minute); it never refuses the id, because a
//!   stranger who could lock a device out by failing on its behalf would have won.
//!
//! And one rule for verified devices: **flap damping**. A device that keeps replacing its own
//! session (two clones with one identity, or a reconnect loop) is allowed a few replacements;
//! past its bucket the newcomer is told `Goodbye{Flapping}` with a `retry_after` that doubles
//! (1 s up to 64 s) while the established session stays.
//!
//! Budgets are per shard (shards share no state): a source whose connections the kernel spreads
//! over `n` shards gets up to `n` times each budget. The tables are bounded; an address or id
//! that finds its table full is not tracked (counted as `guard_untracked`), and idle entries
//! are swept every few seconds.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use tether_protocol::DeviceId;

/// Most connections waiting for their address's turn, per address (per shard).
pub const QUEUE_PER_SOURCE: usize = 4_096;
/// Most connections waiting in all, per shard.
const QUEUE_LIMIT: usize = 16_384;

/// Most addresses (and, separately, device ids) a shard tracks at once.
const TABLE_LIMIT: usize = 16_384;
/// How often idle entries are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Longest flap-damping `retry_after`.
const MAX_DAMP_MS: u32 = 64_000;

/// A token bucket's shape: `burst` tokens, refilled at `per_sec`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// Tokens when full.
    pub burst: f32,
    /// Tokens added per second.
    pub per_sec: f32,
}

impl Budget {
    /// `burst` tokens, refilled at `burst` per `window`.
    pub fn per(burst: u32, window: Duration) -> Budget {
        Budget {
            burst: burst as f32,
            per_sec: burst as f32 / window.as_secs_f32().max(0.001),
        }
    }
}

/// The guard's limits (per shard).
#[derive(Clone, Debug, PartialEq)]
pub struct GuardConfig {
    /// Connections between accept and `Hello`.
    pub max_handshakes: usize,
    /// Of those, from one source address.
    pub per_source: u32,
    /// How long a connection must have been in flight before it may be shed for a newcomer.
    pub shed_after: Duration,
    /// Failed proofs per source address.
    pub source_failures: Budget,
    /// Failed proofs per device id (alarm only).
    pub device_failures: Budget,
    /// Verified replacements of a device's own session.
    pub flaps: Budget,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            max_handshakes: 1024,
            per_source: 16,
            shed_after: Duration::from_millis(250),
            source_failures: Budget::per(10, Duration::from_secs(60)),
            device_failures: Budget::per(10, Duration::from_secs(60)),
            flaps: Budget::per(4, Duration::from_secs(60)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f32,
    last: Instant,
}

impl Bucket {
    fn full(b: Budget, now: Instant) -> Bucket {
        Bucket {
            tokens: b.burst,
            last: now,
        }
    }

    fn refill(&mut self, b: Budget, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f32();
        self.tokens = (self.tokens + dt * b.per_sec).min(b.burst);
        self.last = now;
    }

    fn has(&mut self, b: Budget, now: Instant) -> bool {
        self.refill(b, now);
        self.tokens >= 1.0
    }

    fn take(&mut self, b: Budget, now: Instant) -> bool {
        if self.has(b, now) {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&mut self, b: Budget, now: Instant) -> bool {
        self.refill(b, now);
        self.tokens >= b.burst
    }
}

/// Why a connection was closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its address has `per_source` connections in flight here already.
    SourceBusy,
    /// Its address failed too many proofs lately.
    SourceFailures,
}

struct InFlight {
    generation: u32,
    source: Option<IpAddr>,
}

struct Source {
    in_flight: u32,
    failures: Bucket,
    /// Accepted connections waiting for a slot, oldest first.
    waiting: VecDeque<(OwnedFd, Instant)>,
}

struct DeviceGuard {
    failures: Bucket,
    alarmed: bool,
    flaps: Bucket,
    /// Consecutive damped attempts (the `retry_after` doubles with each).
    damped: u8,
}

/// One shard's admission state. See the module doc.
pub(crate) struct Guard {
    cfg: GuardConfig,
    in_flight: HashMap<usize, InFlight>,
    /// In-flight connections, oldest first (entries since finished are skipped lazily).
    order: VecDeque<(usize, u32, Instant)>,
    sources: HashMap<IpAddr, Source>,
    devices: HashMap<DeviceId, DeviceGuard>,
    last_sweep: Instant,
    /// Connections waiting in all the sources' queues.
    queued: usize,
    /// Waiting connections whose address got a free slot: to start (popped by the shard).
    ready: Vec<(OwnedFd, IpAddr, Instant)>,
    /// Addresses or ids not tracked because a table was full.
    pub untracked: u64,
}

impl Guard {
    pub(crate) fn new(cfg: GuardConfig, now: Instant) -> Guard {
        Guard {
            cfg,
            in_flight: HashMap::new(),
            order: VecDeque::new(),
            sources: HashMap::new(),
            devices: HashMap::new(),
            last_sweep: now,
            queued: 0,
            ready: Vec::new(),
            untracked: 0,
        }
    }

    /// Connections between accept and `Hello` now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether a newly accepted connection fits right now without shedding.
    pub(crate) fn has_room(&self) -> bool {
        self.in_flight.len() < self.cfg.max_handshakes
    }

    /// Whether a new connection from `source` may be taken (nothing is recorded).
    pub(crate) fn check(&mut self, source: Option<IpAddr>, now: Instant) -> Result<(), Refusal> {
        let Some(s) = source.and_then(|ip| self.sources.get_mut(&ip)) else {
            return Ok(());
        };
        if !s.failures.has(self.cfg.source_failures, now) {
            return Err(Refusal::SourceFailures);
        }
        if s.in_flight >= self.cfg.per_source {
            return Err(Refusal::SourceBusy);
        }
        Ok(())
    }

    /// Counts a connection that passed [`check`](Self::check) in flight until
    /// [`done`](Self::done).
    pub(crate) fn track(
        &mut self,
        idx: usize,
        generation: u32,
        source: Option<IpAddr>,
        now: Instant,
    ) {
        let tracked = match source {
            Some(ip) if self.sources.contains_key(&ip) || self.sources.len() < TABLE_LIMIT => {
                let cfg = self.cfg.source_failures;
                self.sources
                    .entry(ip)
                    .or_insert_with(|| Source {
                        in_flight: 0,
                        failures: Bucket::full(cfg, now),
                        waiting: VecDeque::new(),
                    })
                    .in_flight += 1;
                Some(ip)
            }
            Some(_) => {
                self.untracked += 1;
                None
            }
            None => None,
        };
        self.insert(idx, generation, tracked, now);
    }

    fn insert(&mut self, idx: usize, generation: u32, source: Option<IpAddr>, now: Instant) {
        self.in_flight.insert(idx, InFlight { generation, source });
        self.order.push_back((idx, generation, now));
    }

    /// [`check`](Self::check) then [`track`](Self::track).
    #[cfg(test)]
    fn admit(
        &mut self,
        idx: usize,
        generation: u32,
        source: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), Refusal> {
        self.check(source, now)?;
        self.track(idx, generation, source, now);
        Ok(())
    }

    /// The connection in slot `idx` sent its `Hello` or went away: no longer in flight.
    pub(crate) fn done(&mut self, idx: usize, generation: u32) {
        let Entry::Occupied(e) = self.in_flight.entry(idx) else {
            return;
        };
        if e.get().generation != generation {
            return;
        }
        if let Some(ip) = e.remove().source {
            self.release(ip);
        }
    }

    /// One of `ip`'s slots is free (its connection is done, or a slot reserved by
    /// [`pop_ready`](Self::pop_ready) went unused): the oldest connection waiting for it takes
    /// it.
    pub(crate) fn release(&mut self, ip: IpAddr) {
        if let Some(s) = self.sources.get_mut(&ip) {
            s.in_flight = s.in_flight.saturating_sub(1);
            if let Some((fd, at)) = s.waiting.pop_front() {
                self.queued -= 1;
                // Its slot is reserved now, so nobody else from the address takes it first.
                s.in_flight += 1;
                self.ready.push((fd, ip, at));
            }
        }
    }

    /// A connection `check` found `SourceBusy`: queues it for its address's next free slot.
    /// Gives it back when the queue is full (close it).
    pub(crate) fn wait(
        &mut self,
        fd: OwnedFd,
        source: IpAddr,
        now: Instant,
    ) -> Result<(), OwnedFd> {
        match self.sources.get_mut(&source) {
            Some(s) if s.waiting.len() < QUEUE_PER_SOURCE && self.queued < QUEUE_LIMIT => {
                s.waiting.push_back((fd, now));
                self.queued += 1;
                Ok(())
            }
            _ => Err(fd),
        }
    }

    /// A connection that waited and may start now, oldest first, with when it was accepted. It
    /// already holds its address's slot: start it with [`track_reserved`](Self::track_reserved),
    /// or give the slot back with [`release`](Self::release).
    pub(crate) fn pop_ready(&mut self) -> Option<(OwnedFd, IpAddr, Instant)> {
        self.ready.pop()
    }

    /// Connections waiting for their address's turn now.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Starts tracking a connection from [`pop_ready`](Self::pop_ready) (its address's slot
    /// was reserved there).
    pub(crate) fn track_reserved(
        &mut self,
        idx: usize,
        generation: u32,
        source: IpAddr,
        now: Instant,
    ) {
        self.insert(idx, generation, Some(source), now);
    }

    /// When the in-flight table is full: the oldest connection in flight for at least
    /// `shed_after`, to close for a newcomer (the caller closes it, which calls `done`).
    pub(crate) fn shed_candidate(&mut self, now: Instant) -> Option<(usize, u32)> {
        if self.has_room() {
            return None;
        }
        while let Some(&(idx, generation, since)) = self.order.front() {
            let live = matches!(self.in_flight.get(&idx), Some(f) if f.generation == generation);
            if !live {
                self.order.pop_front();
                continue;
            }
            if now.saturating_duration_since(since) < self.cfg.shed_after {
                return None;
            }
            self.order.pop_front();
            return Some((idx, generation));
        }
        None
    }

    /// A proof failed: charges the source address and the device id. Returns `true` when the
    /// id's budget just ran dry (raise the alarm once).
    pub(crate) fn auth_failed(
        &mut self,
        source: Option<IpAddr>,
        device: DeviceId,
        now: Instant,
    ) -> bool {
        if let Some(ip) = source {
            if let Some(s) = self.sources.get_mut(&ip) {
                s.failures.take(self.cfg.source_failures, now);
            } else if self.sources.len() < TABLE_LIMIT {
                let mut failures = Bucket::full(self.cfg.source_failures, now);
                failures.take(self.cfg.source_failures, now);
                self.sources.insert(
                    ip,
                    Source {
                        in_flight: 0,
                        failures,
                        waiting: VecDeque::new(),
                    },
                );
            } else {
                self.untracked += 1;
            }
        }
        let budget = self.cfg.device_failures;
        let Some(d) = self.device(device, now) else {
            return false;
        };
        if d.failures.take(budget, now) {
            return false;
        }
        !std::mem::replace(&mut d.alarmed, true)
    }

    /// A verified connection of `device` would replace its live session: `Ok` if its flap
    /// budget allows, else the `retry_after` (ms) to tell the newcomer.
    pub(crate) fn replacing(&mut self, device: DeviceId, now: Instant) -> Result<(), u32> {
        let budget = self.cfg.flaps;
        let Some(d) = self.device(device, now) else {
            return Ok(());
        };
        if d.flaps.take(budget, now) {
            d.damped = 0;
            return Ok(());
        }
        let wait = 1_000u32
            .saturating_mul(1 << d.damped.min(6))
            .min(MAX_DAMP_MS);
        d.damped = d.damped.saturating_add(1);
        Err(wait)
    }

    fn device(&mut self, device: DeviceId, now: Instant) -> Option<&mut DeviceGuard> {
        if !self.devices.contains_key(&device) && self.devices.len() >= TABLE_LIMIT {
            self.untracked += 1;
            return None;
        }
        let cfg = &self.cfg;
        Some(self.devices.entry(device).or_insert_with(|| DeviceGuard {
            failures: Bucket::full(cfg.device_failures, now),
            alarmed: false,
            flaps: Bucket::full(cfg.flaps, now),
            damped: 0,
        }))
    }

    /// Closes waiting connections accepted before `deadline` (they are past their handshake
    /// deadline already); returns how many.
    pub(crate) fn expire_waiting(&mut self, deadline: Instant) -> u64 {
        if self.queued == 0 {
            return 0;
        }
        let mut n = 0;
        for s in self.sources.values_mut() {
            while s.waiting.front().is_some_and(|(_, at)| *at < deadline) {
                s.waiting.pop_front();
                n += 1;
            }
        }
        self.queued -= n as usize;
        n
    }

    /// Drops entries with nothing to remember (no connection in flight, buckets full again).
    pub(crate) fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        let cfg = self.cfg.clone();
        self.sources.retain(|_, s| {
            s.in_flight > 0
                || !s.waiting.is_empty()
                || !s.failures.is_full(cfg.source_failures, now)
        });
        self.devices.retain(|_, d| {
            let quiet =
                d.failures.is_full(cfg.device_failures, now) && d.flaps.is_full(cfg.flaps, now);
            if quiet {
                return false;
            }
            if d.failures.has(cfg.device_failures, now) {
                d.alarmed = false;
            }
            true
        });
        if self.order.len() > 2 * self.in_flight.len() + 64 {
            let live = &self.in_flight;
            self.order
                .retain(|(i, g, _)| matches!(live.get(i), Some(f) if f.generation == *g));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 9, 1)));
    const B: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 9, 2)));

    fn guard(max: usize, per_source: u32) -> (Guard, Instant) {
        let now = Instant::now();
        let cfg = GuardConfig {
            max_handshakes: max,
            per_source,
            ..GuardConfig::default()
        };
        (Guard::new(cfg, now), now)
    }

    #[test]
    fn one_address_gets_per_source_slots_others_still_get_in() {
        let (mut g, now) = guard(100, 2);
        assert_eq!(g.admit(1, 1, A, now), Ok(()));
        assert_eq!(g.admit(2, 1, A, now), Ok(()));
        assert_eq!(g.admit(3, 1, A, now), Err(Refusal::SourceBusy));
        assert_eq!(g.admit(4, 1, B, now), Ok(()));
        g.done(1, 1);
        assert_eq!(g.admit(5, 1, A, now), Ok(()));
        // A stale generation does not release someone else's slot.
        g.done(2, 99);
        assert_eq!(g.admit(6, 1, A, now), Err(Refusal::SourceBusy));
        assert_eq!(g.in_flight(), 3);
    }

    fn an_fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn a_busy_address_waits_in_its_queue_and_is_started_in_turn() {
        let (mut g, now) = guard(100, 1);
        let a = A.unwrap();
        assert_eq!(g.admit(1, 1, A, now), Ok(()));
        assert_eq!(g.check(A, now), Err(Refusal::SourceBusy));
        assert!(g.wait(an_fd(), a, now).is_ok());
        assert!(g.wait(an_fd(), a, now).is_ok());
        assert_eq!(g.queued(), 2);
        assert!(g.pop_ready().is_none());
        g.done(1, 1);
        assert!(
            g.pop_ready().is_some(),
            "one slot freed, one waiting connection starts"
        );
        assert!(g.pop_ready().is_none());
        assert_eq!(g.queued(), 1);
        // The slot is reserved for it: nobody else from the address gets in meanwhile.
        assert_eq!(g.check(A, now), Err(Refusal::SourceBusy));
        g.track_reserved(2, 1, a, now);
        g.done(2, 1);
        assert!(g.pop_ready().is_some());
        g.release(a);
        assert_eq!(g.check(A, now), Ok(()));
        // Waiting past the deadline: closed.
        assert!(g.wait(an_fd(), a, now).is_ok());
        assert_eq!(g.expire_waiting(now + Duration::from_secs(1)), 1);
        assert_eq!(g.queued(), 0);
    }

    #[test]
    fn the_oldest_stalled_connection_is_shed_only_when_full_and_old_enough() {
        let (mut g, t0) = guard(2, 10);
        g.admit(1, 1, A, t0).unwrap();
        g.admit(2, 1, B, t0 + Duration::from_millis(10)).unwrap();
        assert!(!g.has_room());
        // Young: nobody is shed, the shard waits.
        assert_eq!(g.shed_candidate(t0 + Duration::from_millis(100)), None);
        let later = t0 + Duration::from_millis(300);
        assert_eq!(g.shed_candidate(later), Some((1, 1)));
        g.done(1, 1);
        assert!(g.has_room());
        assert_eq!(g.shed_candidate(later), None);
        // A finished entry is skipped, not shed.
        g.admit(3, 1, A, later).unwrap();
        g.done(2, 1);
        g.admit(4, 1, A, later).unwrap();
        assert_eq!(
            g.shed_candidate(later + Duration::from_secs(1)),
            Some((3, 1))
        );
    }

    #[test]
    fn failed_proofs_close_the_source_for_a_while_not_the_device() {
        let (mut g, now) = guard(100, 100);
        let dev = DeviceId(7);
        let mut alarms = 0;
        for i in 0..10 {
            g.admit(i, 1, A, now).unwrap();
            g.done(i, 1);
            alarms += g.auth_failed(A, dev, now) as u32;
        }
        assert_eq!(g.admit(50, 1, A, now), Err(Refusal::SourceFailures));
        assert_eq!(g.admit(51, 1, B, now), Ok(()), "other addresses unaffected");
        // The device id's budget is dry: one alarm, raised once.
        assert_eq!(alarms, 0);
        assert!(g.auth_failed(B, dev, now));
        assert!(!g.auth_failed(B, dev, now));
        // Six seconds refill one token (10 per minute).
        assert_eq!(g.admit(52, 1, A, now + Duration::from_secs(7)), Ok(()));
    }

    #[test]
    fn flapping_is_damped_with_a_doubling_retry_after() {
        let (mut g, now) = guard(100, 100);
        let dev = DeviceId(3);
        for _ in 0..4 {
            assert_eq!(g.replacing(dev, now), Ok(()));
        }
        assert_eq!(g.replacing(dev, now), Err(1_000));
        assert_eq!(g.replacing(dev, now), Err(2_000));
        assert_eq!(g.replacing(dev, now), Err(4_000));
        for _ in 0..10 {
            let _ = g.replacing(dev, now);
        }
        assert_eq!(g.replacing(dev, now), Err(MAX_DAMP_MS));
        // Once the bucket refills, a replacement is allowed again and the damping resets.
        let later = now + Duration::from_secs(20);
        assert_eq!(g.replacing(dev, later), Ok(()));
        assert_eq!(g.replacing(dev, later), Err(1_000));
    }

    #[test]
    fn sweep_forgets_quiet_entries_and_keeps_busy_ones() {
        let (mut g, now) = guard(100, 100);
        g.admit(1, 1, A, now).unwrap();
        g.admit(2, 1, B, now).unwrap();
        g.done(2, 1);
        let _ = g.replacing(DeviceId(1), now);
        g.sweep(now + Duration::from_secs(120));
        assert!(g.sources.contains_key(&A.unwrap()), "in flight: kept");
        assert!(!g.sources.contains_key(&B.unwrap()));
        assert!(g.devices.is_empty(), "refilled: forgotten");
    }
}
