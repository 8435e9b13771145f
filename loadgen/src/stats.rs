//! Measurement: one HDR histogram per latency metric, error counts by kind and counters, kept per
//! shard without sharing and merged with `add` for progress lines and the report.
//!
//! **No coordinated omission.** Sends follow a fixed timetable ([`OpenLoopSchedule`]): the n-th
//! send of a stream is due at `start + phase/rate + n/rate`, whether or not earlier replies have
//! come back, and its latency is measured from that *scheduled* time, not from when the driver
//! got round to sending it. If the server (or loadgen) stalls, the sends that should have happened
//! during the stall are still made — late — and each records the whole wait, so a stall shows up
//! in p99/p99.9 instead of being hidden by a closed loop that politely stopped sending. Latencies
//! that are not sends (connect, TLS handshake, Hello→Welcome) are measured from the attempt's
//! scheduled ramp slot for the same reason.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// A latency the load generator measures, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Metric {
    /// TCP connect (SYN → established).
    Connect,
    /// TLS 1.3 handshake, first ClientHello byte → handshake complete.
    TlsHandshake,
    /// `Hello` sent → `Welcome` received.
    Hello,
    /// Device → agent → device echo.
    RoundTrip,
    /// Device `Msg` sent → delivered to the agent.
    DeviceToAgent,
    /// Agent `Send` → `Msg` received by the device.
    AgentToDevice,
    /// `CodeOffer` → `CodeDone`: a whole code transfer.
    CodeTransfer,
    /// `Ping` → `Pong`.
    Heartbeat,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 8] = [
        Metric::Connect,
        Metric::TlsHandshake,
        Metric::Hello,
        Metric::RoundTrip,
        Metric::DeviceToAgent,
        Metric::AgentToDevice,
        Metric::CodeTransfer,
        Metric::Heartbeat,
    ];

    /// The name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Connect => "connect",
            Metric::TlsHandshake => "tls_handshake",
            Metric::Hello => "hello",
            Metric::RoundTrip => "round_trip",
            Metric::DeviceToAgent => "device_to_agent",
            Metric::AgentToDevice => "agent_to_device",
            Metric::CodeTransfer => "code_transfer",
            Metric::Heartbeat => "heartbeat",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One histogram per [`Metric`]: microseconds, 3 significant digits, fixed range 1 µs … 60 s
/// (no auto-resize). Larger values are clamped to the top and counted in
/// [`Histograms::clamped`]. A metric's histogram (≈ 140 KiB of counts) is made on its first
/// value, so metrics a campaign never records cost nothing, and neither do their copies in the
/// once-a-second snapshots.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Histograms {
    #[serde(with = "wire::hists")]
    hists: [Option<Box<Histogram<u64>>>; 8],
    clamped: u64,
}

impl Histograms {
    /// Highest trackable value: 60 s in microseconds.
    pub const HIGHEST_US: u64 = 60_000_000;
    /// Significant decimal digits kept.
    pub const SIGFIG: u8 = 3;

    /// Empty histograms.
    pub fn new() -> Histograms {
        Histograms::default()
    }

    /// An empty histogram with the bounds of every other (so any two can be added).
    pub fn make() -> Box<Histogram<u64>> {
        let mut h = Histogram::new_with_bounds(1, Self::HIGHEST_US, Self::SIGFIG)
            .expect("constant histogram bounds are valid");
        h.auto(false);
        Box::new(h)
    }

    /// Records one latency in microseconds; above [`Self::HIGHEST_US`] it is clamped and counted.
    /// Allocates only for a metric's first value.
    pub fn record(&mut self, metric: Metric, micros: u64) {
        if micros > Self::HIGHEST_US {
            self.clamped += 1;
        }
        self.hists[metric.index()]
            .get_or_insert_with(Self::make)
            .saturating_record(micros);
    }

    /// Records the time from `scheduled` to `done` (0 if `done` is earlier).
    pub fn record_since(&mut self, metric: Metric, scheduled: Instant, done: Instant) {
        self.record(metric, micros_between(scheduled, done));
    }

    /// Makes the histograms of `metrics` now (empty), so that recording them later allocates
    /// nothing: for the metrics every run records, made with the shard's fixed state.
    pub fn make_now(&mut self, metrics: &[Metric]) {
        for m in metrics {
            self.hists[m.index()].get_or_insert_with(Self::make);
        }
    }

    /// The histogram of one metric; `None` if nothing was recorded for it.
    pub fn get(&self, metric: Metric) -> Option<&Histogram<u64>> {
        self.hists[metric.index()].as_deref()
    }

    /// Values recorded above the range and clamped to [`Self::HIGHEST_US`].
    pub fn clamped(&self) -> u64 {
        self.clamped
    }

    /// A copy holding only `metric`'s histogram (and the clamped count).
    pub fn only(&self, metric: Metric) -> Histograms {
        let mut h = Histograms {
            clamped: self.clamped,
            ..Histograms::default()
        };
        h.hists[metric.index()] = self.hists[metric.index()].clone();
        h
    }

    /// Adds another shard's histograms into these.
    pub fn add(&mut self, other: &Histograms) {
        for (mine, theirs) in self.hists.iter_mut().zip(&other.hists) {
            add_hist(mine, theirs);
        }
        self.clamped += other.clamped;
    }

    /// Empties every histogram (for interval snapshots).
    pub fn reset(&mut self) {
        self.hists.iter_mut().flatten().for_each(|h| h.reset());
        self.clamped = 0;
    }
}

/// Microseconds from `from` to `to`, 0 if `to` is earlier, saturating at `u64::MAX`.
pub fn micros_between(from: Instant, to: Instant) -> u64 {
    u64::try_from(to.saturating_duration_since(from).as_micros()).unwrap_or(u64::MAX)
}

/// Errors counted by kind (a short stable name, e.g. "connect_refused", "tls_alert").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts(BTreeMap<String, u64>);

impl ErrorCounts {
    /// Counts one error of `kind`; allocates only the first time a kind is seen.
    pub fn count(&mut self, kind: &str) {
        self.count_n(kind, 1);
    }

    /// Counts `n` errors of `kind`.
    pub fn count_n(&mut self, kind: &str, n: u64) {
        match self.0.get_mut(kind) {
            Some(c) => *c += n,
            None => {
                self.0.insert(kind.to_owned(), n);
            }
        }
    }

    /// All errors.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Counts by kind, sorted by kind.
    pub fn by_kind(&self) -> &BTreeMap<String, u64> {
        &self.0
    }

    /// Adds another shard's counts.
    pub fn add(&mut self, other: &ErrorCounts) {
        for (k, n) in &other.0 {
            self.count_n(k, *n);
        }
    }
}

/// Connection and message counters of one shard (or, merged, of the run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Devices connected now (Welcome received, not yet closed).
    pub connected_now: u64,
    /// Highest `connected_now` seen. Merged with [`Counters::add`] this is the sum of per-shard
    /// peaks, an upper bound; a run-wide peak comes from [`Counters::observe_peak`] on the merged
    /// counters each time progress is sampled.
    pub peak_connected: u64,
    /// Successful connects (Welcome received), reconnects included.
    pub connects: u64,
    /// Connections that ended (closed by either side or failed after Welcome).
    pub disconnects: u64,
    /// Messages sent by devices and agents.
    pub msgs_sent: u64,
    /// Messages received by devices and agents.
    pub msgs_recv: u64,
    /// Device messages the devices got an `Ack` for (end to end: the agent had them).
    pub device_acked: u64,
    /// Device messages the agents received (`Deliver`).
    pub agent_received: u64,
    /// Agent sends answered `SendResult{delivered}` (end to end: the device had them).
    pub agent_delivered: u64,
    /// Agent messages the devices received.
    pub device_received: u64,
    /// Agent links the server closed after their welcome, attached again (an upgrade).
    pub agent_reattaches: u64,
    /// `Goodbye{redirect}`s followed to another node.
    #[serde(default)]
    pub redirects_followed: u64,
}

impl Counters {
    /// A device finished its Hello→Welcome.
    pub fn connected(&mut self) {
        self.connects += 1;
        self.connected_now += 1;
        self.peak_connected = self.peak_connected.max(self.connected_now);
    }

    /// A connected device's connection ended.
    pub fn disconnected(&mut self) {
        self.disconnects += 1;
        self.connected_now = self.connected_now.saturating_sub(1);
    }

    /// Raises the peak to the current connected count (call on merged counters when sampling).
    pub fn observe_peak(&mut self) {
        self.peak_connected = self.peak_connected.max(self.connected_now);
    }

    /// Adds another shard's counters (see [`Counters::peak_connected`] for the peak).
    pub fn add(&mut self, o: &Counters) {
        self.connected_now += o.connected_now;
        self.peak_connected += o.peak_connected;
        self.connects += o.connects;
        self.disconnects += o.disconnects;
        self.msgs_sent += o.msgs_sent;
        self.msgs_recv += o.msgs_recv;
        self.device_acked += o.device_acked;
        self.agent_received += o.agent_received;
        self.agent_delivered += o.agent_delivered;
        self.device_received += o.device_received;
        self.agent_reattaches += o.agent_reattaches;
        self.redirects_followed += o.redirects_followed;
    }
}

/// Everything one shard measures; merged across shards and workers for the report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Latencies.
    pub hist: Histograms,
    /// Errors by kind.
    pub errors: ErrorCounts,
    /// Counters.
    pub counters: Counters,
    /// `Goodbye`s the devices received, by reason (`replaced`, `overloaded`, …).
    pub goodbyes: ErrorCounts,
    /// Per report window (`calm` first, then the campaign's attack labels): admission latency
    /// and goodbyes. Empty in the once-a-second snapshots.
    pub windows: Vec<WindowStats>,
}

impl Stats {
    /// Adds another shard's measurements.
    pub fn add(&mut self, other: &Stats) {
        self.hist.add(&other.hist);
        self.errors.add(&other.errors);
        self.counters.add(&other.counters);
        self.goodbyes.add(&other.goodbyes);
        if self.windows.len() < other.windows.len() {
            self.windows
                .resize_with(other.windows.len(), WindowStats::default);
        }
        for (mine, theirs) in self.windows.iter_mut().zip(&other.windows) {
            mine.add(theirs);
        }
    }

    /// The window stats of window `w` (made on first use).
    pub fn window(&mut self, w: usize) -> &mut WindowStats {
        if self.windows.len() <= w {
            self.windows.resize_with(w + 1, WindowStats::default);
        }
        &mut self.windows[w]
    }
}

/// What the devices saw during one report window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WindowStats {
    /// `session_ready`: a connect's scheduled start → `Welcome` (connect + TLS + Hello), for
    /// connects scheduled in the window. Made on the first value.
    #[serde(with = "wire::hist")]
    pub ready: Option<Box<Histogram<u64>>>,
    /// `Goodbye`s received in the window, by reason.
    pub goodbyes: ErrorCounts,
}

impl WindowStats {
    /// Records one admission latency.
    pub fn record_ready(&mut self, micros: u64) {
        self.ready
            .get_or_insert_with(Histograms::make)
            .saturating_record(micros);
    }

    fn add(&mut self, other: &WindowStats) {
        add_hist(&mut self.ready, &other.ready);
        self.goodbyes.add(&other.goodbyes);
    }
}

/// What one attack (one `[[attack]]` of the campaign) did, from the attacker's side.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AttackTally {
    /// The counts.
    pub counts: AttackCounts,
    /// Time from TCP established until the server reset or closed it, µs.
    #[serde(with = "wire::hist")]
    pub closed_after: Option<Box<Histogram<u64>>>,
}

impl AttackTally {
    /// The server ended an open connection `micros` after it was established.
    pub fn server_closed(&mut self, reset: bool, micros: u64) {
        if reset {
            self.counts.reset += 1;
        } else {
            self.counts.closed_by_server += 1;
        }
        self.closed_after
            .get_or_insert_with(Histograms::make)
            .saturating_record(micros);
    }

    /// Adds another shard's tally of the same attack.
    pub fn add(&mut self, o: &AttackTally) {
        self.counts.add(&o.counts);
        add_hist(&mut self.closed_after, &o.closed_after);
    }
}

/// An attack's counts (see [`AttackTally`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttackCounts {
    /// Connects started.
    pub attempted: u64,
    /// Connects the server's kernel completed (TCP established).
    pub opened: u64,
    /// Connects refused (`ECONNREFUSED`).
    pub refused: u64,
    /// Open connections the server reset.
    pub reset: u64,
    /// Open connections the server closed (end of stream).
    pub closed_by_server: u64,
    /// Connects that neither completed nor failed within the campaign's connect timeout.
    pub connect_timeouts: u64,
    /// Connects that failed otherwise, or sockets the attacker could not make (no port, no
    /// file descriptor): the attacker's own limits, not the server's answer.
    pub connect_failed: u64,
    /// Openings skipped because the attack already held its most open connections.
    pub skipped: u64,
    /// Connections the attacker closed itself (churn, or a failure on its own side).
    pub closed_by_attacker: u64,
    /// Connections still open (or connecting) when the attack ended, closed then.
    pub still_open: u64,
    /// TLS handshakes completed (TLS kinds).
    pub tls_done: u64,
    /// TLS kinds: the attacker's client failed the handshake (an alert from the server).
    pub tls_failed: u64,
    /// Connections on which the attack's payload went out in full (ClientHello, its first part,
    /// garbage, a bad `Hello`).
    pub sent: u64,
    /// `bad_proof`: `Hello`s the server answered with an `Error` (rejected).
    pub rejected: u64,
    /// `bad_proof`: `Hello`s the server answered with `Welcome` (must stay 0).
    pub welcomed: u64,
    /// `bad_proof`: `Hello`s that named a device connected at the time.
    pub named_live: u64,
}

impl AttackCounts {
    /// Adds another shard's counts of the same attack.
    pub fn add(&mut self, o: &AttackCounts) {
        self.attempted += o.attempted;
        self.opened += o.opened;
        self.refused += o.refused;
        self.reset += o.reset;
        self.closed_by_server += o.closed_by_server;
        self.connect_timeouts += o.connect_timeouts;
        self.connect_failed += o.connect_failed;
        self.skipped += o.skipped;
        self.closed_by_attacker += o.closed_by_attacker;
        self.still_open += o.still_open;
        self.tls_done += o.tls_done;
        self.tls_failed += o.tls_failed;
        self.sent += o.sent;
        self.rejected += o.rejected;
        self.welcomed += o.welcomed;
        self.named_live += o.named_live;
    }
}

fn add_hist(mine: &mut Option<Box<Histogram<u64>>>, theirs: &Option<Box<Histogram<u64>>>) {
    let Some(theirs) = theirs else { return };
    match mine {
        // Same bounds on both sides, so adding cannot fail.
        Some(mine) => mine.add(&**theirs).expect("histograms share bounds"),
        None => *mine = Some(theirs.clone()),
    }
}

/// Histograms between worker processes and their coordinator: each one in HdrHistogram's own
/// serialised form (V2, as every HdrHistogram implementation reads it), hex in JSON, so the
/// coordinator merges the exact counts (never averages of percentiles).
pub mod wire {
    use hdrhistogram::Histogram;
    use hdrhistogram::serialization::{Deserializer as HdrIn, Serializer as _, V2Serializer};
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Histograms;

    /// One histogram as hex of its V2 serialisation.
    pub fn encode(h: &Histogram<u64>) -> String {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(h, &mut bytes)
            .expect("serialising into a Vec cannot fail");
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        out
    }

    /// The histogram [`encode`] made, with the bounds every loadgen histogram has (so it can be
    /// added to the others); a clear error for anything else.
    pub fn decode(hex: &str) -> Result<Box<Histogram<u64>>, String> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let raw = hex.as_bytes();
        if raw.len() % 2 != 0 {
            return Err("histogram: odd number of hex digits".into());
        }
        let mut bytes = Vec::with_capacity(raw.len() / 2);
        for pair in raw.chunks_exact(2) {
            match (digit(pair[0]), digit(pair[1])) {
                (Some(a), Some(b)) => bytes.push(a << 4 | b),
                _ => return Err("histogram: not hex".into()),
            }
        }
        let h: Histogram<u64> = HdrIn::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| format!("histogram: {e:?}"))?;
        let mut out = Histograms::make();
        out.add(&h).map_err(|e| format!("histogram: {e:?}"))?;
        Ok(out)
    }

    /// serde for `Option<Box<Histogram>>`.
    pub mod hist {
        use super::*;

        /// Serialises as the hex string, or null.
        pub fn serialize<S: Serializer>(
            h: &Option<Box<Histogram<u64>>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            h.as_deref().map(super::encode).serialize(s)
        }

        /// Reads what [`serialize`] wrote.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Box<Histogram<u64>>>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|hex| super::decode(&hex).map_err(D::Error::custom))
                .transpose()
        }
    }

    /// serde for the per-metric array of [`Histograms`].
    pub mod hists {
        use super::*;

        type Hists = [Option<Box<Histogram<u64>>>; 8];

        /// Serialises as an array of hex strings or nulls.
        pub fn serialize<S: Serializer>(h: &Hists, s: S) -> Result<S::Ok, S::Error> {
            let v: Vec<Option<String>> =
                h.iter().map(|h| h.as_deref().map(super::encode)).collect();
            v.serialize(s)
        }

        /// Reads what [`serialize`] wrote.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hists, D::Error> {
            let v = Vec::<Option<String>>::deserialize(d)?;
            if v.len() != 8 {
                return Err(D::Error::custom(format!(
                    "{} histograms, expected 8",
                    v.len()
                )));
            }
            let mut out: Hists = Default::default();
            for (slot, hex) in out.iter_mut().zip(v) {
                *slot = hex
                    .map(|hex| super::decode(&hex).map_err(D::Error::custom))
                    .transpose()?;
            }
            Ok(out)
        }
    }
}

/// A fixed send timetable at `rate` per second: the n-th send is due at
/// `start + (phase + n) / rate`, computed from `n` (no drift from accumulated rounding).
/// Give each device a different `phase` in `[0, 1)` so that devices with the same rate do not all
/// send in the same instant. Latency is measured from the time this yields, not from the send.
#[derive(Debug, Clone)]
pub struct OpenLoopSchedule {
    start: Instant,
    rate: f64,
    phase: f64,
    next: u64,
}

impl OpenLoopSchedule {
    /// A schedule whose first send is due at `start` (a rate ≤ 0 or not finite never sends).
    pub fn new(rate_per_sec: f64, start: Instant) -> OpenLoopSchedule {
        OpenLoopSchedule::with_phase(rate_per_sec, start, 0.0)
    }

    /// A schedule whose first send is due at `start + phase / rate`; `phase` is clamped to [0, 1).
    pub fn with_phase(rate_per_sec: f64, start: Instant, phase: f64) -> OpenLoopSchedule {
        let rate = if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
            rate_per_sec
        } else {
            0.0
        };
        let phase = if phase.is_finite() {
            phase.clamp(0.0, 0.999_999)
        } else {
            0.0
        };
        OpenLoopSchedule {
            start,
            rate,
            phase,
            next: 0,
        }
    }

    /// The same timetable with its first `taken` sends already taken.
    pub fn after(mut self, taken: u64) -> OpenLoopSchedule {
        self.next = taken;
        self
    }

    /// When the next send is due, without taking it; `None` if the schedule never sends.
    /// A driver arms its timer for this instant.
    pub fn peek(&self) -> Option<Instant> {
        if self.rate == 0.0 {
            return None;
        }
        let secs = (self.phase + self.next as f64) / self.rate;
        Some(self.start + Duration::from_secs_f64(secs.min(1e12)))
    }

    /// Takes the next scheduled send time if it is due at `now`. Call in a loop: after a stall it
    /// yields every missed send in order, each with its own scheduled time.
    pub fn due(&mut self, now: Instant) -> Option<Instant> {
        let at = self.peek().filter(|at| *at <= now)?;
        self.next += 1;
        Some(at)
    }

    /// Sends taken so far.
    pub fn taken(&self) -> u64 {
        self.next
    }

    /// Sends due at `now` and not yet taken (how far the driver is behind).
    pub fn backlog(&self, now: Instant) -> u64 {
        if self.rate == 0.0 || now < self.start {
            return 0;
        }
        let elapsed = now.duration_since(self.start).as_secs_f64();
        let due_total = (elapsed * self.rate - self.phase).floor() + 1.0;
        (due_total.max(0.0) as u64).saturating_sub(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_record_clamp_and_merge() {
        let mut a = Histograms::new();
        for v in 1..=1000 {
            a.record(Metric::RoundTrip, v);
        }
        a.record(Metric::Connect, 120_000_000); // 2 minutes: clamped
        let rt = a.get(Metric::RoundTrip).unwrap();
        assert_eq!(rt.len(), 1000);
        assert!((499..=501).contains(&rt.value_at_quantile(0.5)));
        assert_eq!(a.clamped(), 1);
        assert!(a.get(Metric::Connect).unwrap().max() >= Histograms::HIGHEST_US);
        assert!(!a.get(Metric::Connect).unwrap().is_auto_resize());

        let mut b = Histograms::new();
        b.record(Metric::RoundTrip, 5000);
        b.record(Metric::Heartbeat, 7);
        a.add(&b);
        assert_eq!(a.get(Metric::RoundTrip).unwrap().len(), 1001);
        assert_eq!(a.get(Metric::Heartbeat).unwrap().len(), 1);
        assert!(a.get(Metric::RoundTrip).unwrap().max() >= 4995);
        a.reset();
        assert_eq!(a.get(Metric::RoundTrip).unwrap().len(), 0);
        assert!(a.get(Metric::Hello).is_none(), "never recorded: never made");
        a.make_now(&[Metric::Hello]);
        assert_eq!(a.get(Metric::Hello).unwrap().len(), 0);
        let only = a.only(Metric::Heartbeat);
        assert!(only.get(Metric::RoundTrip).is_none());
        assert_eq!(only.get(Metric::Heartbeat).unwrap().len(), 0);
        assert_eq!(Metric::ALL.map(Metric::name).len(), 8);
    }

    #[test]
    fn stats_cross_processes_exactly() {
        let mut a = Stats::default();
        for v in [3, 70, 900, 12_000, 59_000_000] {
            a.hist.record(Metric::Hello, v);
        }
        a.errors.count("tls_alert");
        a.counters.connected();
        a.window(1).record_ready(4321);
        let json = serde_json::to_string(&a).unwrap();
        let b: Stats = serde_json::from_str(&json).unwrap();
        let (ha, hb) = (
            a.hist.get(Metric::Hello).unwrap(),
            b.hist.get(Metric::Hello).unwrap(),
        );
        assert_eq!(ha, hb, "every count survives");
        assert!(b.hist.get(Metric::RoundTrip).is_none());
        assert_eq!(b.errors, a.errors);
        assert_eq!(b.counters, a.counters);
        assert_eq!(b.windows[1].ready.as_ref().unwrap().len(), 1);
        // Merged after the trip, like two workers' histograms in the coordinator.
        let mut m = b.clone();
        m.add(&a);
        assert_eq!(m.hist.get(Metric::Hello).unwrap().len(), 10);
        assert!(wire::decode("zz").is_err());
        assert!(wire::decode("abc").is_err());
        assert!(wire::decode("00112233").is_err(), "not a histogram");
    }

    #[test]
    fn errors_and_counters_merge() {
        let mut s1 = Stats::default();
        s1.errors.count("connect_refused");
        s1.errors.count("connect_refused");
        s1.counters.connected();
        s1.counters.connected();
        s1.counters.disconnected();
        let mut s2 = Stats::default();
        s2.errors.count("tls_alert");
        s2.counters.connected();
        s2.counters.msgs_sent = 10;
        s1.add(&s2);
        assert_eq!(s1.errors.total(), 3);
        assert_eq!(s1.errors.by_kind()["connect_refused"], 2);
        let c = s1.counters;
        assert_eq!(
            (c.connects, c.connected_now, c.disconnects, c.msgs_sent),
            (3, 2, 1, 10)
        );
        assert_eq!(c.peak_connected, 3); // sum of shard peaks: an upper bound
        let mut merged = Counters {
            connected_now: 5,
            ..Counters::default()
        };
        merged.observe_peak();
        assert_eq!(merged.peak_connected, 5);
    }

    #[test]
    fn open_loop_schedule_keeps_its_timetable_through_a_stall() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = OpenLoopSchedule::new(10.0, t0); // every 100 ms
        assert_eq!(s.peek(), Some(t0));
        assert_eq!(s.due(t0), Some(t0));
        assert_eq!(s.due(t0 + ms(50)), None, "not due yet");
        // The driver stalls until 350 ms: three sends are due, each at its own scheduled time.
        let now = t0 + ms(350);
        assert_eq!(s.backlog(now), 3);
        let late: Vec<Instant> = std::iter::from_fn(|| s.due(now)).collect();
        assert_eq!(late, [t0 + ms(100), t0 + ms(200), t0 + ms(300)]);
        assert_eq!(s.backlog(now), 0);
        assert_eq!(s.taken(), 4);
        // Latency counts from the scheduled time: the send due at 100 ms, answered at 360 ms.
        let mut h = Histograms::new();
        h.record_since(Metric::RoundTrip, late[0], t0 + ms(360));
        assert!((259_000..=261_000).contains(&h.get(Metric::RoundTrip).unwrap().max()));
    }

    #[test]
    fn open_loop_schedule_phase_and_zero_rate() {
        let t0 = Instant::now();
        let s = OpenLoopSchedule::with_phase(0.1, t0, 0.5); // every 10 s, first at 5 s
        assert_eq!(s.peek(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(s.backlog(t0 + Duration::from_secs(4)), 0);
        assert_eq!(s.backlog(t0 + Duration::from_secs(16)), 2);
        let mut none = OpenLoopSchedule::new(0.0, t0);
        assert_eq!(none.peek(), None);
        assert_eq!(none.due(t0 + Duration::from_secs(100)), None);
        assert_eq!(OpenLoopSchedule::new(f64::NAN, t0).peek(), None);
    }
}
