//! Per-shard counters (plain `u64`s owned by one shard: no atomics, no locks), the [`Slot`]
//! each shard publishes a copy of them into every timer tick, the snapshot the admin endpoint
//! builds from the latest published copies (each with its age, [`Freshness`]), its Prometheus
//! rendering, and RSS readings.
//!
//! A scrape never asks a shard anything and never waits for one: a shard that stopped
//! answering (stuck in a long computation, a blocking call, a bug) shows as stale, with the
//! age of its last snapshot and the values it held then, and its values stay in the totals.
//!
//! To add a counter, add one line to the `counters!` list below; to add an error reason, one
//! line to `error_kinds!`. Struct fields, merging, JSON and Prometheus output follow.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! error_kinds {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal,)*) => {
        /// Why something failed, counted per reason in [`ShardMetrics::errors`].
        #[non_exhaustive]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ErrorKind {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ErrorKind {
            /// Every kind, in index order.
            pub const ALL: &'static [ErrorKind] = &[$(ErrorKind::$variant,)*];
            /// How many kinds there are (the length of [`ShardMetrics::errors`]).
            pub const COUNT: usize = Self::ALL.len();

            /// The metric label of this kind, e.g. `bad_proof`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorKind::$variant => $name,)*
                }
            }

            /// The kind named `name` (the inverse of [`as_str`](Self::as_str)).
            pub fn from_name(name: &str) -> Option<ErrorKind> {
                match name {
                    $($name => Some(ErrorKind::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

error_kinds! {
    /// A frame longer than the protocol's limit.
    FrameTooLarge => "frame_too_large",
    /// A frame that does not decode.
    MalformedFrame => "malformed_frame",
    /// A `Hello` whose proof does not verify.
    BadProof => "bad_proof",
    /// A `Hello` from a device not in the registry.
    UnknownDevice => "unknown_device",
    /// A TLS error (handshake or record layer).
    Tls => "tls",
    /// A socket error.
    Io => "io",
    /// A peer too slow for a deadline (handshake, hello).
    Timeout => "timeout",
    /// A device's bounded outbound queue was full.
    OutboxFull => "outbox_full",
    /// A valid frame at the wrong time.
    Protocol => "protocol",
    /// A panic caught while handling a connection.
    Panic => "panic",
}

impl ErrorKind {
    /// This kind's index in [`ShardMetrics::errors`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a metric only goes up or may go down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $name:ident: $ty:ident,)*) => {
        /// One shard's counters. The shard owns it and bumps fields directly.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct ShardMetrics {
            $($(#[doc = $doc])+ pub $name: u64,)*
            /// Errors by [`ErrorKind`] (serialised as a map from kind name to count).
            #[serde(with = "errors_by_name")]
            pub errors: [u64; ErrorKind::COUNT],
        }

        impl ShardMetrics {
            /// Every plain field: name, help text, type, value.
            pub fn fields(&self) -> [(&'static str, &'static str, MetricType, u64); counters!(@count $($name)*)] {
                [$((stringify!($name), concat!($($doc),+), MetricType::$ty, self.$name),)*]
            }

            /// Adds `other` into `self` (gauges add too: open connections of two shards sum).
            pub fn merge(&mut self, other: &ShardMetrics) {
                $(self.$name = self.$name.wrapping_add(other.$name);)*
                for (a, b) in self.errors.iter_mut().zip(other.errors.iter()) {
                    *a = a.wrapping_add(*b);
                }
            }
        }
    };
    (@count $($x:ident)*) => { <[()]>::len(&[$(counters!(@unit $x)),*]) };
    (@unit $x:ident) => { () };
}

counters! {
    /// Connections open now.
    connections_open: Gauge,
    /// TCP connections accepted.
    connections_accepted: Counter,
    /// TLS handshakes completed in full.
    handshakes_full: Counter,
    /// TLS handshakes completed by resuming a session.
    handshakes_resumed: Counter,
    /// TLS handshakes that failed.
    handshake_failures: Counter,
    /// Devices that failed authentication.
    auth_failures: Counter,
    /// Connections between accept and `Hello` now (strangers in flight).
    handshakes_in_flight: Gauge,
    /// Accepted connections waiting for their address's turn (it had its share in flight).
    handshakes_waiting: Gauge,
    /// Strangers shed (oldest stalled first) to make room for newcomers.
    handshakes_shed: Counter,
    /// Connections closed at accept: their address had its share in flight and a full queue.
    refused_source_busy: Counter,
    /// Connections closed at accept: their address failed too many proofs lately.
    refused_source_failures: Counter,
    /// Device ids whose failed-proof budget ran dry (their verified connections still pass).
    device_auth_alarms: Counter,
    /// Verified reconnects told to wait because the device kept replacing its own session.
    flaps_damped: Counter,
    /// Agent connections closed at once: the shard had its limit of agents not yet verified.
    refused_agents_pending: Counter,
    /// Addresses or ids not tracked by the admission guard because its table was full.
    guard_untracked: Gauge,
    /// Messages received from devices and agents.
    msgs_in: Counter,
    /// Messages sent to devices and agents.
    msgs_out: Counter,
    /// Bytes received (TLS records included).
    bytes_in: Counter,
    /// Bytes sent (TLS records included).
    bytes_out: Counter,
    /// Acknowledgements received.
    acks: Counter,
    /// Goodbye frames sent.
    goodbyes_sent: Counter,
    /// Sessions moved to this shard from another.
    sessions_moved_in: Counter,
    /// Sessions moved from this shard to another.
    sessions_moved_out: Counter,
    /// Sessions replaced by a newer connection of the same device.
    sessions_replaced: Counter,
    /// Connections closed for missing heartbeats.
    heartbeat_timeouts: Counter,
    /// Connections refused because the shard was overloaded.
    shed: Counter,
    /// Panics caught in a shard's steps, every site (each closed only what it concerned).
    panics_caught: Counter,
    /// Panics caught starting a newly accepted connection.
    panics_accept: Counter,
    /// Panics caught handling an expired deadline of a connection.
    panics_timer: Counter,
    /// Panics caught adopting a connection moved from another shard.
    panics_adopt: Counter,
    /// Panics caught handling a message from another shard.
    panics_mesh: Counter,
    /// Panics caught handling a frame from an agent (its link was closed).
    panics_agent: Counter,
    /// Panics caught offering a deploy's code to a device.
    panics_rollout: Counter,
    /// Panics caught applying a registry change.
    panics_registry: Counter,
    /// Device messages left unacknowledged because no agent was attached (the device resends).
    undeliverable: Counter,
    /// Presence changes not queued for an agent (its queue, or the mesh towards its shard,
    /// was full): coalesced into a `PresenceSnapshot` it gets instead.
    agent_overflow: Counter,
    /// Presence snapshots sent to agents in place of coalesced presence changes.
    presence_snapshots: Counter,
    /// Times an agent's socket stopped being read: the mesh outbox towards the shard its
    /// frame goes to, or its own outbound queue, was full.
    pushback_agent_reads: Counter,
    /// Times a device's socket stopped being read: the agent its message goes to (or the mesh
    /// outbox towards that agent's shard) had no room.
    pushback_device_reads: Counter,
    /// Device connections not read now, their messages waiting for an agent's room.
    devices_waiting: Gauge,
    /// Messages waiting in this shard's outboxes towards other shards.
    mesh_queued: Gauge,
    /// Agents attached now.
    agents_attached: Gauge,
    /// Code transfers sending now.
    code_transfers_active: Gauge,
    /// Devices waiting for a code-transfer slot.
    code_transfers_queued: Gauge,
    /// Code offers sent to devices.
    code_offers: Counter,
    /// Code transfers started (a resume counts again).
    code_transfers_started: Counter,
    /// Code transfers the device verified and installed.
    code_transfers_completed: Counter,
    /// Code transfers the device reported failed (digest mismatch or refused).
    code_transfers_failed: Counter,
    /// Code bytes sent in chunks.
    code_bytes_out: Counter,
    /// Code-transfer messages that made no sense (ack of unsent bytes, request past the end).
    code_protocol_errors: Counter,
    /// Times a shard used up its share of `--accept-rate` (a per-process rate) and left
    /// connections in the kernel's backlog until its tokens refill.
    accept_rate_pauses: Counter,
    /// Readiness-ring submissions the kernel refused as busy (completions overflowed), retried
    /// once the completions were taken.
    ring_busy_retries: Counter,
    /// Readiness-ring operations that found the kernel refusing a batch, kept in order and
    /// submitted later (never dropped).
    ring_deferred: Counter,
    /// Readiness-ring operations waiting now for the kernel to take them.
    ring_backlog: Gauge,
    /// Sessions told to reconnect (`Goodbye{upgrade}`) because an upgrade handed the
    /// listeners to a new process that could not take them live.
    upgrade_goodbyes: Counter,
    /// Sessions handed live to the process taking over at an upgrade (socket, TLS state and
    /// session intact; the device notices nothing).
    sessions_handed_out: Counter,
    /// Sessions paused for a handoff and carried on here (the new process did not take them).
    sessions_handed_back: Counter,
    /// Sessions taken over live from the process being upgraded.
    sessions_handed_in: Counter,
}

impl ShardMetrics {
    /// Counts one error of `kind`.
    #[inline]
    pub fn error(&mut self, kind: ErrorKind) {
        self.errors[kind.index()] += 1;
    }

    /// The count of `kind`.
    pub fn errors_of(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()]
    }
}

mod errors_by_name {
    use super::*;

    pub fn serialize<S: Serializer>(e: &[u64; ErrorKind::COUNT], s: S) -> Result<S::Ok, S::Error> {
        let map: BTreeMap<&str, u64> = ErrorKind::ALL
            .iter()
            .map(|k| (k.as_str(), e[k.index()]))
            .collect();
        map.serialize(s)
    }

    /// Unknown names (from a newer server) are ignored, missing ones are zero.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<[u64; ErrorKind::COUNT], D::Error> {
        let map = BTreeMap::<String, u64>::deserialize(d)?;
        let mut out = [0; ErrorKind::COUNT];
        for (name, v) in map {
            if let Some(k) = ErrorKind::from_name(&name) {
                out[k.index()] = v;
            }
        }
        Ok(out)
    }
}

/// A shard whose last published snapshot is older than this has stopped answering: ten of its
/// publish intervals (it publishes every 100 ms timer tick), so a tick delayed by a busy core
/// is not taken for a stuck shard.
pub const STALE_AFTER: Duration = Duration::from_secs(1);

/// How fresh one shard's published snapshot was when a scrape read it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Freshness {
    /// Snapshots the shard had published since it started (0: none yet). It grows every tick
    /// while the shard runs, so a reader can wait for a snapshot newer than one it saw.
    pub seq: u64,
    /// Age of the snapshot when it was read, in milliseconds.
    pub age_ms: u64,
    /// Older than [`STALE_AFTER`]: the shard is not answering; its values are its last.
    pub stale: bool,
}

impl Freshness {
    /// The freshness of a snapshot published `age` ago, `seq`-th of its shard.
    pub fn of(seq: u64, age: Duration) -> Freshness {
        Freshness {
            seq,
            age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
            stale: age > STALE_AFTER,
        }
    }

    /// The less fresh of two (for snapshots merged into one): stale if either is.
    pub fn worse(self, other: Freshness) -> Freshness {
        Freshness {
            seq: self.seq.max(other.seq),
            age_ms: self.age_ms.max(other.age_ms),
            stale: self.stale || other.stale,
        }
    }

    /// The age as seconds, for Prometheus.
    pub fn age_seconds(&self) -> f64 {
        self.age_ms as f64 / 1000.0
    }
}

/// One line per stale shard among `shards` (index = shard number), e.g.
/// `shard 1: NOT ANSWERING for 3.2 s, last values shown`; empty if none is.
pub fn not_answering_lines<'a>(shards: impl IntoIterator<Item = &'a Freshness>) -> String {
    let mut out = String::new();
    for (i, f) in shards.into_iter().enumerate().filter(|(_, f)| f.stale) {
        let _ = writeln!(
            out,
            "shard {i}: NOT ANSWERING for {:.1} s, last values shown",
            f.age_seconds()
        );
    }
    out
}

/// What one shard last published: the value, when, and how many times it has published.
#[derive(Debug)]
struct Published<T> {
    value: T,
    at: Instant,
    seq: u64,
}

/// One shard's latest published value (its counters, its rollout state) for the admin
/// threads to read without asking the shard.
///
/// A mutex per shard, touched only by that shard (once per timer tick, to copy its values in)
/// and by a scrape (to copy them out): no lock is shared between shards, and none is taken on
/// the data path. Chosen over a seqlock because the values are plain structs of a few hundred
/// bytes (and the rollout state a small `Vec`): a seqlock would need every field as an atomic
/// or unsafe racy copies, for a lock that is uncontended but for the moment of a scrape. The
/// shard only ever *tries* the lock: if a scrape holds it right then, the shard skips this
/// publish rather than wait, and the next tick publishes (the snapshot is one tick older).
/// A reader waits at most for the shard's copy of those bytes.
#[derive(Debug)]
pub(crate) struct Slot<T> {
    inner: Mutex<Published<T>>,
}

impl<T: Clone + Default> Slot<T> {
    /// An empty slot (the default value, never published, aged from now).
    pub(crate) fn new() -> Slot<T> {
        Slot {
            inner: Mutex::new(Published {
                value: T::default(),
                at: Instant::now(),
                seq: 0,
            }),
        }
    }

    /// Updates the value through `update`, stamped now. Never waits: `false` (nothing
    /// written) if a reader holds the slot at this instant.
    pub(crate) fn publish(&self, update: impl FnOnce(&mut T)) -> bool {
        let mut p = match self.inner.try_lock() {
            Ok(p) => p,
            // A reader that panicked while cloning left the value whole.
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        update(&mut p.value);
        p.at = Instant::now();
        p.seq += 1;
        true
    }

    /// A copy of the latest value and how fresh it is at `now`.
    pub(crate) fn read(&self, now: Instant) -> (T, Freshness) {
        let p: MutexGuard<'_, Published<T>> = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = Freshness::of(p.seq, now.saturating_duration_since(p.at));
        (p.value.clone(), fresh)
    }
}

/// One shard's entry in a [`MetricsSnapshot`]: its counters (serialised flat, as before) and
/// how fresh they are (`seq`, `age_ms`, `stale`). Dereferences to its [`ShardMetrics`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShardSnapshot {
    #[serde(flatten)]
    pub metrics: ShardMetrics,
    #[serde(flatten)]
    pub fresh: Freshness,
}

impl Deref for ShardSnapshot {
    type Target = ShardMetrics;
    fn deref(&self) -> &ShardMetrics {
        &self.metrics
    }
}

impl DerefMut for ShardSnapshot {
    fn deref_mut(&mut self) -> &mut ShardMetrics {
        &mut self.metrics
    }
}

/// Every shard's latest published counters, plus their sum and the process's memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsSnapshot {
    /// Per shard, indexed by shard number.
    pub shards: Vec<ShardSnapshot>,
    /// The sum over `shards`, stale ones included (with their last values).
    pub total: ShardMetrics,
    /// The shards that are not answering (`shards[i].stale`): their last values are shown,
    /// and counted in `total`.
    pub stale_shards: Vec<usize>,
    /// Resident memory of the process, if known.
    pub rss_bytes: Option<u64>,
}

impl MetricsSnapshot {
    /// A snapshot of these shards (index = shard number), all fresh, with their total and the
    /// current RSS.
    pub fn from_shards(shards: Vec<ShardMetrics>) -> MetricsSnapshot {
        Self::from_published(
            shards
                .into_iter()
                .map(|m| (m, Freshness::default()))
                .collect(),
        )
    }

    /// A snapshot of these published shard counters (index = shard number) and their
    /// freshness, with their total and the current RSS.
    pub fn from_published(shards: Vec<(ShardMetrics, Freshness)>) -> MetricsSnapshot {
        let mut snap = MetricsSnapshot {
            shards: shards
                .into_iter()
                .map(|(metrics, fresh)| ShardSnapshot { metrics, fresh })
                .collect(),
            rss_bytes: rss_bytes(),
            ..MetricsSnapshot::default()
        };
        snap.sum();
        snap
    }

    /// Recomputes `total` and `stale_shards` from `shards`.
    fn sum(&mut self) {
        self.total = ShardMetrics::default();
        for s in &self.shards {
            self.total.merge(s);
        }
        self.stale_shards = (0..self.shards.len())
            .filter(|&i| self.shards[i].fresh.stale)
            .collect();
    }

    /// Adds `other` into `self` shard by shard (shard `i` into shard `i`, growing the list if
    /// `other` has more), and the totals and RSS too: e.g. the old and the new process during
    /// an upgrade seen as one.
    pub fn merge(&mut self, other: &MetricsSnapshot) {
        if self.shards.len() < other.shards.len() {
            self.shards
                .resize_with(other.shards.len(), Default::default);
        }
        for (a, b) in self.shards.iter_mut().zip(&other.shards) {
            a.metrics.merge(b);
            a.fresh = a.fresh.worse(b.fresh);
        }
        self.total.merge(&other.total);
        self.stale_shards = (0..self.shards.len())
            .filter(|&i| self.shards[i].fresh.stale)
            .collect();
        self.rss_bytes = match (self.rss_bytes, other.rss_bytes) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }

    /// Prometheus text exposition format: first each shard's health (`tether_shard_up`, the
    /// age of its snapshot, how many shards are stale), then per-shard series labelled
    /// `shard="i"` and the total without a shard label. (So `sum()` over a family counts
    /// twice: select by label.) A stale shard's series carry its last values.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str(
            "# HELP tether_shard_up Whether the shard published its counters within the last \
             second (0: it is not answering; its series show its last values).\n",
        );
        out.push_str("# TYPE tether_shard_up gauge\n");
        for (shard, m) in self.shards.iter().enumerate() {
            let up = u8::from(!m.fresh.stale);
            let _ = writeln!(out, "tether_shard_up{{shard=\"{shard}\"}} {up}");
        }
        out.push_str(
            "# HELP tether_shard_snapshot_age_seconds Age of the shard's last published \
             counters when scraped.\n",
        );
        out.push_str("# TYPE tether_shard_snapshot_age_seconds gauge\n");
        for (shard, m) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "tether_shard_snapshot_age_seconds{{shard=\"{shard}\"}} {:.3}",
                m.fresh.age_seconds()
            );
        }
        out.push_str(
            "# HELP tether_shards_stale Shards not answering; every total includes their last \
             values.\n",
        );
        out.push_str("# TYPE tether_shards_stale gauge\n");
        let _ = writeln!(out, "tether_shards_stale {}", self.stale_shards.len());
        for (i, (name, help, ty, total)) in self.total.fields().into_iter().enumerate() {
            let (full, ty) = match ty {
                MetricType::Counter => (format!("tether_{name}_total"), "counter"),
                MetricType::Gauge => (format!("tether_{name}"), "gauge"),
            };
            let help = help.trim();
            let _ = writeln!(out, "# HELP {full} {help}\n# TYPE {full} {ty}");
            for (shard, m) in self.shards.iter().enumerate() {
                let _ = writeln!(out, "{full}{{shard=\"{shard}\"}} {}", m.fields()[i].3);
            }
            let _ = writeln!(out, "{full} {total}");
        }
        out.push_str("# HELP tether_errors_total Errors by kind.\n");
        out.push_str("# TYPE tether_errors_total counter\n");
        for &k in ErrorKind::ALL {
            for (shard, m) in self.shards.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "tether_errors_total{{shard=\"{shard}\",kind=\"{k}\"}} {}",
                    m.errors_of(k)
                );
            }
            let _ = writeln!(
                out,
                "tether_errors_total{{kind=\"{k}\"}} {}",
                self.total.errors_of(k)
            );
        }
        if let Some(rss) = self.rss_bytes {
            out.push_str("# HELP tether_resident_memory_bytes Resident memory of the server.\n");
            out.push_str("# TYPE tether_resident_memory_bytes gauge\n");
            let _ = writeln!(out, "tether_resident_memory_bytes {rss}");
        }
        out
    }
}

/// Resident memory of this process, from `/proc/self/statm`.
pub fn rss_bytes() -> Option<u64> {
    rss_from_statm("/proc/self/statm")
}

/// Resident memory of process `pid`, from `/proc/<pid>/statm`.
pub fn rss_of(pid: u32) -> Option<u64> {
    rss_from_statm(&format!("/proc/{pid}/statm"))
}

fn rss_from_statm(path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a system constant; it has no preconditions and touches no memory
    // of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(open: u64, bad_proofs: u64) -> ShardMetrics {
        let mut m = ShardMetrics {
            connections_open: open,
            bytes_in: 100,
            ..Default::default()
        };
        for _ in 0..bad_proofs {
            m.error(ErrorKind::BadProof);
        }
        m
    }

    #[test]
    fn error_kind_names_round_trip_and_indices_are_dense() {
        for (i, &k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(ErrorKind::from_name(k.as_str()), Some(k));
        }
        assert_eq!(ErrorKind::BadProof.to_string(), "bad_proof");
        assert_eq!(ErrorKind::from_name("nope"), None);
    }

    #[test]
    fn snapshot_totals_and_merges() {
        let mut a = MetricsSnapshot::from_shards(vec![shard(3, 1), shard(4, 0)]);
        assert_eq!(a.total.connections_open, 7);
        assert_eq!(a.total.bytes_in, 200);
        assert_eq!(a.total.errors_of(ErrorKind::BadProof), 1);
        let b = MetricsSnapshot::from_shards(vec![shard(1, 2), shard(1, 0), shard(1, 0)]);
        a.merge(&b);
        assert_eq!(a.shards.len(), 3);
        assert_eq!(a.shards[0].connections_open, 4);
        assert_eq!(a.shards[0].errors_of(ErrorKind::BadProof), 3);
        assert_eq!(a.total.connections_open, 10);
    }

    #[test]
    fn json_round_trips_and_names_errors() {
        let s = MetricsSnapshot::from_shards(vec![shard(3, 2)]);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"bad_proof\":2"), "{json}");
        let back: MetricsSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // A newer server's unknown fields and kinds are ignored; missing ones are zero.
        let old: ShardMetrics =
            serde_json::from_str(r#"{"msgs_in":5,"future":1,"errors":{"future_kind":3}}"#).unwrap();
        assert_eq!(old.msgs_in, 5);
        assert_eq!(old.errors, [0; ErrorKind::COUNT]);
    }

    #[test]
    fn prometheus_text_has_help_type_shard_and_total_lines() {
        let mut s = MetricsSnapshot::from_shards(vec![shard(12, 1), shard(3, 0)]);
        s.rss_bytes = Some(4096);
        let text = s.to_prometheus();
        for line in [
            "# HELP tether_connections_open Connections open now.",
            "# TYPE tether_connections_open gauge",
            "tether_connections_open{shard=\"0\"} 12",
            "tether_connections_open{shard=\"1\"} 3",
            "tether_connections_open 15",
            "# TYPE tether_bytes_in_total counter",
            "tether_bytes_in_total 200",
            "tether_errors_total{shard=\"0\",kind=\"bad_proof\"} 1",
            "tether_errors_total{kind=\"bad_proof\"} 1",
            "tether_resident_memory_bytes 4096",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line is `name{labels} value` or `name value`, of a family whose HELP
        // and TYPE lines came first.
        let mut typed = Vec::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap().to_owned());
                continue;
            }
            if l.starts_with("# HELP ") {
                continue;
            }
            let (series, v) = l.rsplit_once(' ').unwrap();
            v.parse::<f64>().unwrap();
            let family = series.split('{').next().unwrap();
            assert!(
                typed.iter().any(|t| t == family),
                "{l}: no TYPE line before it"
            );
        }
    }

    #[test]
    fn a_stale_shard_is_down_with_its_age_and_its_last_values() {
        let fresh = Freshness::of(7, Duration::from_millis(40));
        let stale = Freshness::of(3, Duration::from_millis(3_250));
        assert!(!fresh.stale && stale.stale);
        assert_eq!((stale.seq, stale.age_ms), (3, 3_250));
        let s = MetricsSnapshot::from_published(vec![(shard(2, 0), fresh), (shard(5, 1), stale)]);
        assert_eq!(s.stale_shards, vec![1]);
        assert_eq!(
            s.total.connections_open, 7,
            "the stale shard's last values count"
        );
        let text = s.to_prometheus();
        for line in [
            "# TYPE tether_shard_up gauge",
            "tether_shard_up{shard=\"0\"} 1",
            "tether_shard_up{shard=\"1\"} 0",
            "# TYPE tether_shard_snapshot_age_seconds gauge",
            "tether_shard_snapshot_age_seconds{shard=\"0\"} 0.040",
            "tether_shard_snapshot_age_seconds{shard=\"1\"} 3.250",
            "tether_shards_stale 1",
            "tether_connections_open{shard=\"1\"} 5",
            "tether_connections_open 7",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["shards"][1]["stale"], true);
        assert_eq!(json["shards"][1]["age_ms"], 3_250);
        assert_eq!(json["shards"][1]["connections_open"], 5);
        assert_eq!(json["shards"][0]["stale"], false);
        assert_eq!(json["stale_shards"], serde_json::json!([1]));
        let back: MetricsSnapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            not_answering_lines(s.shards.iter().map(|m| &m.fresh)),
            "shard 1: NOT ANSWERING for 3.2 s, last values shown\n"
        );
        // Merged with a fresh snapshot of another process, shard 1 stays stale.
        let mut m = MetricsSnapshot::from_shards(vec![shard(1, 0), shard(1, 0)]);
        m.merge(&s);
        assert_eq!(m.stale_shards, vec![1]);
        assert_eq!(m.shards[1].connections_open, 6);
    }

    #[test]
    fn a_slot_publishes_without_waiting_and_ages() {
        let slot: Slot<ShardMetrics> = Slot::new();
        let t0 = Instant::now();
        let (m, f) = slot.read(t0);
        assert_eq!((m, f.seq), (ShardMetrics::default(), 0));
        assert!(slot.publish(|m| m.msgs_in = 5));
        let (m, f) = slot.read(Instant::now());
        assert_eq!((m.msgs_in, f.seq, f.stale), (5, 1, false));
        // Read later, the same snapshot is old, then stale.
        let (_, f) = slot.read(Instant::now() + STALE_AFTER + Duration::from_millis(500));
        assert!(f.stale && f.age_ms >= 1_500, "{f:?}");
        // While a reader holds the slot, the shard skips its publish instead of waiting.
        let held = slot.inner.lock().unwrap();
        assert!(!slot.publish(|m| m.msgs_in = 6));
        drop(held);
        assert!(slot.publish(|m| m.msgs_in = 7));
        let (m, f) = slot.read(Instant::now());
        assert_eq!((m.msgs_in, f.seq), (7, 2));
    }

    #[test]
    fn rss_is_read_for_self_and_by_pid() {
        let me = rss_bytes().unwrap();
        assert!(me > 0 && me % page_size() == 0);
        assert!(rss_of(std::process::id()).unwrap() > 0);
        assert_eq!(rss_of(u32::MAX), None);
    }
}
