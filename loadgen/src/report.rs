//! The final report (JSON through serde, and a human table) and the one-line live progress.
//!
//! Rates in the report are over the whole measured run (`duration_s`), except the connect rate,
//! which is over the ramp. Memory per connection is `(RSS after − RSS before) / connections`,
//! sampled after the ramp has settled; it needs a "before" sample and the server's pid (spawned,
//! or `--server-pid` / `server.pid` for a running one).
//!
//! CPU: loadgen samples the server's and its own CPU time (`utime + stime` of all threads, from
//! `/proc/<pid>/stat`, 10 ms resolution) every 100 ms into a [`CpuTrace`]. A figure per connect
//! is the CPU spent between the last sample at or before a window's start and the first at or
//! after its end, divided by the connections the window completed. The ramp window runs from the
//! first ramp slot until the last device first received `Welcome`; for the server it holds accept,
//! the TLS handshake, `Challenge`/`Hello`/`Welcome` (with the cross-shard move), plus whatever else
//! the server did meanwhile: heartbeats (none if the window is shorter than `heartbeat_s`),
//! messages (none in the handshake campaigns), and up to 100 ms of idle after the end. A storm's
//! window runs from the storm instant until its last reconnect: it also holds the teardown of the
//! dropped connections.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::campaign::{AttackKind, Campaign};
use crate::host::{self, Machine, TcpSockStat};
use crate::stats::{AttackCounts, AttackTally, Metric, Stats};

/// Everything a campaign measured, as written to the JSON report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The campaign as it ran, overrides applied.
    pub campaign: Campaign,
    /// Measured length of the run in seconds.
    pub duration_s: f64,
    /// All errors.
    pub errors_total: u64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Connection figures.
    pub connections: Connections,
    /// Message counts and rates.
    pub messages: MessageCounts,
    /// One summary per metric, keyed by [`Metric::name`].
    pub latency: BTreeMap<String, LatencySummary>,
    /// Latencies above the histogram range (60 s), recorded as 60 s.
    pub latency_clamped: u64,
    /// The server's memory and CPU; present when loadgen knows the server's pid (it spawned it,
    /// or was given `server.pid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerUsage>,
    /// Loadgen's memory and CPU: this process and every worker process, summed.
    pub loadgen: LoadgenUsage,
    /// Kernel socket figures; absent if /proc could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelUsage>,
    /// The machine the run was measured on.
    pub machine: Machine,
    /// Reconnect storms: how many connections each dropped and how long recovery took.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storms: Vec<StormSummary>,
    /// Code deploys: how many devices installed each and how long the rollout took.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deploys: Vec<DeploySummary>,
    /// Server upgrades: what each handed over, and round trips around it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeTotals>,
    /// How this run differed from its campaign (parts not implemented yet), in words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// `Goodbye`s the devices received, by reason (`replaced`, `overloaded`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub goodbyes: BTreeMap<String, u64>,
    /// Admission latency per report window: `calm`, then each attack window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub session_ready: Vec<WindowSummary>,
    /// What each campaign attack did, from the attacker's side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attacks: Vec<AttackSummary>,
    /// Every server node and loadgen worker process with its memory and CPU when the ramp
    /// settled (the totals above are their sums); empty for one server and one loadgen process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessUsage>,
}

/// `session_ready` (a connect's scheduled start → `Welcome`: connect + TLS + Hello, through
/// any retries) of the connects scheduled in one window, and the goodbyes devices got in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowSummary {
    /// `calm` (no attack running at the connect's scheduled time) or an attack window's label.
    pub window: String,
    /// The latency.
    pub latency: LatencySummary,
    /// This window's p99 over the calm window's p99 (none for `calm` itself, or without a calm
    /// figure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_vs_calm: Option<f64>,
    /// `Goodbye`s devices received while the window ran, by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub goodbyes: BTreeMap<String, u64>,
}

/// One campaign attack's outcome, from the attacker's side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackSummary {
    /// What it did.
    pub kind: AttackKind,
    /// Its report window.
    pub window: String,
    /// When it started, seconds from the start of the ramp.
    pub start_s: f64,
    /// How long it ran.
    pub duration_s: f64,
    /// The counts.
    #[serde(flatten)]
    pub counts: AttackCounts,
    /// How long connections were open when the server closed or reset them.
    pub closed_after: LatencySummary,
}

/// One server upgrade's outcome (`[[upgrade]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeSummary {
    /// When it was due, seconds from the start of the ramp.
    pub at_s: u64,
    /// When it was posted, seconds from the start of the ramp.
    pub posted_s: Option<f64>,
    /// The server's answer.
    pub report: Option<tether_core::client::UpgradeReport>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Round-trip p99 over the 10 s before it.
    pub rtt_p99_before_us: Option<u64>,
    /// Round-trip p99 over the 10 s after it was posted.
    pub rtt_p99_window_us: Option<u64>,
    /// The longest round trip completed in that window: the longest a device waited.
    pub rtt_max_window_us: Option<u64>,
    /// Round trips completed in that window.
    pub rtt_count_window: u64,
}

/// The run's upgrades and what the devices saw of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeTotals {
    /// Each upgrade.
    pub upgrades: Vec<UpgradeSummary>,
    /// Connects beyond each device's first: devices that had to reconnect (storms included).
    pub device_reconnects: u64,
    /// Connect errors of any kind (refused, reset, timed out, TLS), the whole run.
    pub refused_connects: u64,
    /// TLS errors, the whole run.
    pub tls_errors: u64,
    /// Agent links the server closed and the agents attached again.
    pub agent_reattaches: u64,
    /// Messages acknowledged to their sender that the other side did not receive (device →
    /// agent: acks the devices got beyond the agents' deliveries; agent → device: `delivered`
    /// results beyond the devices' receipts). A lower bound: a duplicate delivery could hide
    /// a loss.
    pub acked_lost: u64,
}

/// One code deploy's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploySummary {
    /// When it was asked for, seconds from the start of the ramp.
    pub at_s: u64,
    /// Device group it went to.
    pub group: String,
    /// Size of the blob.
    pub size_bytes: u64,
    /// Installs counted after the deploy (and before the next one).
    pub installed: u64,
    /// From the admin POST until the last install, if every device of the campaign installed.
    pub converged_ms: Option<f64>,
}

/// One reconnect storm's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StormSummary {
    /// When it began, seconds from the start of the ramp.
    pub at_s: f64,
    /// Established connections it dropped.
    pub dropped: u64,
    /// Of those, connected again before the run ended.
    pub reconnected: u64,
    /// From the drop until the last dropped device was connected again, if all came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_ms: Option<f64>,
    /// Of the reconnects, how many resumed their TLS session (rustls' `handshake_kind()`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<u64>,
    /// Server CPU from the storm until the last reconnect, per reconnect (teardown of the dropped
    /// connections included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_per_reconnect_us: Option<f64>,
    /// Loadgen's CPU over the same window, per reconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loadgen_cpu_per_reconnect_us: Option<f64>,
}

/// Connection figures of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Connections {
    /// Devices the campaign asked for.
    pub target: u64,
    /// Most devices connected at once.
    pub peak: u64,
    /// Successful connects, reconnects included.
    pub connects: u64,
    /// Connections that ended.
    pub disconnects: u64,
    /// Connects per second during the ramp.
    pub connect_rate_per_s: f64,
    /// Successful connects whose TLS session was resumed.
    #[serde(default)]
    pub resumed: u64,
}

/// Message counts and rates of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MessageCounts {
    /// Messages sent by devices and agents.
    pub sent: u64,
    /// Messages received by devices and agents.
    pub received: u64,
    /// `sent` per second of the run.
    pub sent_per_s: f64,
    /// `received` per second of the run.
    pub received_per_s: f64,
    /// Agent sends not made or not delivered because the device was offline (a storm dropped
    /// it, or it was still connecting); not errors.
    #[serde(default)]
    pub agent_sends_offline: u64,
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest value.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

impl LatencySummary {
    /// Summarises a histogram (all zero if it is empty or was never made).
    pub fn of(h: Option<&Histogram<u64>>) -> LatencySummary {
        let Some(h) = h.filter(|h| !h.is_empty()) else {
            return LatencySummary {
                count: 0,
                p50_us: 0,
                p99_us: 0,
                p999_us: 0,
                max_us: 0,
                mean_us: 0.0,
            };
        };
        LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// The server's resident memory and CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ServerUsage {
    /// RSS after the ramp settled.
    pub rss_bytes: u64,
    /// (RSS after − RSS before) / connections held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_per_connection_bytes: Option<f64>,
    /// CPU seconds the server used from just before the ramp until the end of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<f64>,
    /// CPU seconds the server used over the ramp window (see the module doc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp_cpu_s: Option<f64>,
    /// `ramp_cpu_s` per connection the ramp made, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_per_connect_us: Option<f64>,
}

/// Loadgen's resident memory and CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoadgenUsage {
    /// RSS after the ramp settled.
    pub rss_bytes: u64,
    /// (RSS after − RSS before) / simulated devices connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_per_device_bytes: Option<f64>,
    /// CPU seconds loadgen used from just before the ramp until the end of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<f64>,
    /// CPU seconds loadgen used over the ramp window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp_cpu_s: Option<f64>,
    /// `ramp_cpu_s` per connection the ramp made, in microseconds (the client side's cost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_per_connect_us: Option<f64>,
}

/// CPU time of the server (if its pid is known) and of loadgen at one instant, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuSample {
    /// When it was read.
    pub at: Instant,
    /// The server's CPU seconds so far.
    pub server_s: Option<f64>,
    /// Loadgen's CPU seconds so far.
    pub loadgen_s: Option<f64>,
}

/// CPU spent by each side over a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CpuSpent {
    /// Server CPU seconds.
    pub server_s: Option<f64>,
    /// Loadgen CPU seconds.
    pub loadgen_s: Option<f64>,
}

impl CpuSpent {
    /// Server microseconds per `n` (none if nothing was measured or `n` is 0).
    pub fn server_us_per(&self, n: u64) -> Option<f64> {
        us_per(self.server_s, n)
    }

    /// Loadgen microseconds per `n`.
    pub fn loadgen_us_per(&self, n: u64) -> Option<f64> {
        us_per(self.loadgen_s, n)
    }
}

fn us_per(s: Option<f64>, n: u64) -> Option<f64> {
    s.filter(|_| n > 0).map(|s| s * 1e6 / n as f64)
}

/// CPU samples in time order (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct CpuTrace {
    samples: Vec<CpuSample>,
}

impl CpuTrace {
    /// Appends a sample; samples must come in time order.
    pub fn push(&mut self, s: CpuSample) {
        self.samples.push(s);
    }

    /// Reads the CPU of the `servers` (summed; none: unknown) and of this process now, adds
    /// `workers_s` (the worker processes' CPU seconds) and appends it.
    pub fn sample(&mut self, servers: &[u32], workers_s: f64) {
        let at = Instant::now();
        let sum = |pids: &[u32]| {
            pids.iter()
                .filter_map(|p| host::cpu_of(*p).ok())
                .sum::<f64>()
        };
        self.push(CpuSample {
            at,
            server_s: (!servers.is_empty()).then(|| sum(servers)),
            loadgen_s: host::cpu_self().ok().map(|me| me + workers_s),
        });
    }

    /// The samples so far.
    pub fn samples(&self) -> &[CpuSample] {
        &self.samples
    }

    /// CPU spent from the last sample at or before `from` (or the first sample) to the first
    /// sample at or after `to` (or the last sample): the window is never cut short.
    pub fn spent(&self, from: Instant, to: Instant) -> CpuSpent {
        let first = self
            .samples
            .iter()
            .rev()
            .find(|s| s.at <= from)
            .or(self.samples.first());
        let last = self
            .samples
            .iter()
            .find(|s| s.at >= to)
            .or(self.samples.last());
        let (Some(a), Some(b)) = (first, last) else {
            return CpuSpent::default();
        };
        let diff = |x: Option<f64>, y: Option<f64>| Some((y? - x?).max(0.0));
        CpuSpent {
            server_s: diff(a.server_s, b.server_s),
            loadgen_s: diff(a.loadgen_s, b.loadgen_s),
        }
    }

    /// CPU spent from the first sample to the last.
    pub fn total(&self) -> CpuSpent {
        match (self.samples.first(), self.samples.last()) {
            (Some(a), Some(b)) => self.spent(a.at, b.at),
            _ => CpuSpent::default(),
        }
    }
}

/// An RSS measurement: before the ramp (if known) and after it settled, with the connections
/// held at the second sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssSample {
    /// RSS before any connection, if it was sampled.
    pub before_bytes: Option<u64>,
    /// RSS after the ramp settled.
    pub after_bytes: u64,
    /// Connections held when `after_bytes` was sampled.
    pub connections: u64,
}

impl RssSample {
    /// (after − before) / connections, when there is a before sample and a connection.
    pub fn per_connection(&self) -> Option<f64> {
        self.before_bytes
            .filter(|_| self.connections > 0)
            .map(|b| (self.after_bytes as f64 - b as f64) / self.connections as f64)
    }
}

/// Kernel-wide socket figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSample {
    /// `/proc/net/sockstat` TCP line.
    pub tcp: TcpSockStat,
    /// `Slab:` of `/proc/meminfo`, bytes.
    pub slab_bytes: u64,
}

impl KernelSample {
    /// Reads the figures now.
    pub fn read() -> io::Result<KernelSample> {
        Ok(KernelSample {
            tcp: host::sockstat()?,
            slab_bytes: host::slab_bytes()?,
        })
    }
}

/// Kernel socket figures in the report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KernelUsage {
    /// TCP sockets in use (both ends of loopback connections count: 2 per device).
    pub tcp_inuse: u64,
    /// Allocated TCP sockets.
    pub tcp_alloc: u64,
    /// Sockets in TIME_WAIT.
    pub tcp_tw: u64,
    /// Pages charged to TCP buffers.
    pub tcp_mem_pages: u64,
    /// `tcp_mem_pages` in bytes.
    pub tcp_mem_bytes: u64,
    /// Kernel slab memory.
    pub slab_bytes: u64,
    /// Slab growth since before the ramp per connection (both socket ends included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slab_per_connection_bytes: Option<f64>,
}

/// What [`Report::build`] needs besides the merged statistics.
#[derive(Debug, Clone)]
pub struct ReportInputs<'a> {
    /// The campaign as it ran.
    pub campaign: &'a Campaign,
    /// Statistics merged over shards and workers (with the run-wide peak observed).
    pub stats: &'a Stats,
    /// Whole run, first connect attempt to the end of the steady phase.
    pub elapsed: Duration,
    /// First connect attempt until `devices` were connected (or the ramp ended).
    pub ramp_elapsed: Duration,
    /// Server memory, when loadgen knows the server's pid.
    pub server: Option<RssSample>,
    /// Loadgen memory.
    pub loadgen: RssSample,
    /// Kernel figures before the ramp, if read.
    pub kernel_before: Option<KernelSample>,
    /// Kernel figures after the ramp settled, if read.
    pub kernel_after: Option<KernelSample>,
    /// The machine.
    pub machine: Machine,
    /// Reconnect storms.
    pub storms: Vec<StormSummary>,
    /// Code deploys.
    pub deploys: Vec<DeploySummary>,
    /// Server upgrades.
    pub upgrade: Option<UpgradeTotals>,
    /// See [`Report::notes`].
    pub notes: Vec<String>,
    /// See [`MessageCounts::agent_sends_offline`].
    pub agent_sends_offline: u64,
    /// See [`Connections::resumed`].
    pub resumed: u64,
    /// CPU over the whole run.
    pub cpu_total: CpuSpent,
    /// CPU over the ramp window.
    pub cpu_ramp: CpuSpent,
    /// Connections the ramp window made (devices that got their first `Welcome`).
    pub ramp_connects: u64,
    /// Per campaign attack, merged over the shards.
    pub attacks: Vec<AttackTally>,
    /// Per server node and worker process (see [`Report::processes`]).
    pub processes: Vec<ProcessUsage>,
}

/// One process of the run (a server node or a loadgen worker) once the ramp settled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessUsage {
    /// "server node 2 (127.0.3.3:7400)", "worker 1 (pid 4321)", …
    pub name: String,
    /// Its pid (on its host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// RSS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// CPU seconds since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<f64>,
}

fn per_sec(n: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

impl Report {
    /// Builds the report.
    pub fn build(i: ReportInputs<'_>) -> Report {
        let c = &i.stats.counters;
        let latency = Metric::ALL
            .iter()
            .map(|m| {
                (
                    m.name().to_owned(),
                    LatencySummary::of(i.stats.hist.get(*m)),
                )
            })
            .collect();
        let kernel = i.kernel_after.map(|after| {
            let page = host::page_size();
            let per = i
                .kernel_before
                // Per connection held when the kernel was sampled (after the ramp), not at the
                // end of the run, when every device has left.
                .filter(|_| i.loadgen.connections > 0)
                .map(|b| {
                    (after.slab_bytes as f64 - b.slab_bytes as f64) / i.loadgen.connections as f64
                });
            KernelUsage {
                tcp_inuse: after.tcp.inuse,
                tcp_alloc: after.tcp.alloc,
                tcp_tw: after.tcp.tw,
                tcp_mem_pages: after.tcp.mem_pages,
                tcp_mem_bytes: after.tcp.mem_pages * page,
                slab_bytes: after.slab_bytes,
                slab_per_connection_bytes: per,
            }
        });
        let session_ready = windows(i.campaign, i.stats);
        let attacks = i
            .campaign
            .attack
            .iter()
            .zip(&i.attacks)
            .map(|(a, t)| AttackSummary {
                kind: a.kind,
                window: a.window_label().to_owned(),
                start_s: a.start_s,
                duration_s: a.duration_s,
                counts: t.counts,
                closed_after: LatencySummary::of(t.closed_after.as_deref()),
            })
            .collect();
        Report {
            campaign: i.campaign.clone(),
            duration_s: i.elapsed.as_secs_f64(),
            errors_total: i.stats.errors.total(),
            errors: i.stats.errors.by_kind().clone(),
            connections: Connections {
                target: i.campaign.devices,
                peak: c.peak_connected,
                connects: c.connects,
                disconnects: c.disconnects,
                connect_rate_per_s: per_sec(c.connects.min(i.campaign.devices), i.ramp_elapsed),
                resumed: i.resumed,
            },
            messages: MessageCounts {
                sent: c.msgs_sent,
                received: c.msgs_recv,
                sent_per_s: per_sec(c.msgs_sent, i.elapsed),
                received_per_s: per_sec(c.msgs_recv, i.elapsed),
                agent_sends_offline: i.agent_sends_offline,
            },
            latency,
            latency_clamped: i.stats.hist.clamped(),
            server: i.server.map(|s| ServerUsage {
                rss_bytes: s.after_bytes,
                rss_per_connection_bytes: s.per_connection(),
                cpu_s: i.cpu_total.server_s,
                ramp_cpu_s: i.cpu_ramp.server_s,
                cpu_per_connect_us: i.cpu_ramp.server_us_per(i.ramp_connects),
            }),
            loadgen: LoadgenUsage {
                rss_bytes: i.loadgen.after_bytes,
                rss_per_device_bytes: i.loadgen.per_connection(),
                cpu_s: i.cpu_total.loadgen_s,
                ramp_cpu_s: i.cpu_ramp.loadgen_s,
                cpu_per_connect_us: i.cpu_ramp.loadgen_us_per(i.ramp_connects),
            },
            kernel,
            machine: i.machine,
            storms: i.storms,
            deploys: i.deploys,
            upgrade: i.upgrade,
            notes: i.notes,
            goodbyes: i.stats.goodbyes.by_kind().clone(),
            session_ready,
            attacks,
            processes: i.processes,
        }
    }

    /// One line per server node and worker process (`loadgen run --per-process`).
    pub fn process_table(&self) -> String {
        let mut out = String::from("process                                   rss        cpu\n");
        for p in &self.processes {
            out.push_str(&format!(
                "{:<40} {:>9} {:>9}\n",
                p.name,
                p.rss_bytes.map_or_else(|| "-".into(), bytes),
                p.cpu_s.map_or_else(|| "-".into(), |s| format!("{s:.1} s")),
            ));
        }
        out
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serialises")
    }

    /// The report as an aligned human-readable table.
    pub fn to_table(&self) -> String {
        let mut t = String::new();
        let c = &self.connections;
        let m = &self.messages;
        let _ = writeln!(
            t,
            "campaign {}  ({} devices, {:.1} s, {})",
            self.campaign.name,
            count(self.campaign.devices),
            self.duration_s,
            self.machine.model_name
        );
        let _ = writeln!(
            t,
            "connections  peak {}/{}  connects {}  disconnects {}  ramp {}",
            count(c.peak),
            count(c.target),
            count(c.connects),
            count(c.disconnects),
            rate(c.connect_rate_per_s)
        );
        let _ = writeln!(
            t,
            "messages     sent {} ({})  received {} ({})",
            count(m.sent),
            rate(m.sent_per_s),
            count(m.received),
            rate(m.received_per_s)
        );
        if m.agent_sends_offline > 0 {
            let _ = writeln!(
                t,
                "             agent sends to offline devices (skipped or answered Offline): {}",
                count(m.agent_sends_offline)
            );
        }
        let _ = writeln!(t, "errors       {}", count(self.errors_total));
        for (kind, n) in &self.errors {
            let _ = writeln!(t, "  {kind:<24} {:>12}", count(*n));
        }
        let _ = writeln!(
            t,
            "\n{:<16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "latency", "count", "p50", "p99", "p99.9", "max", "mean"
        );
        for metric in Metric::ALL {
            let Some(s) = self.latency.get(metric.name()) else {
                continue;
            };
            if s.count == 0 {
                continue;
            }
            let _ = writeln!(
                t,
                "{:<16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                metric.name(),
                count(s.count),
                micros(s.p50_us),
                micros(s.p99_us),
                micros(s.p999_us),
                micros(s.max_us),
                micros(s.mean_us.round() as u64)
            );
        }
        if self.latency_clamped > 0 {
            let _ = writeln!(
                t,
                "({} latencies above 60 s were clamped)",
                count(self.latency_clamped)
            );
        }
        for s in &self.storms {
            let rec = s
                .recovery_ms
                .map_or_else(|| "not all back".to_owned(), |ms| micros((ms * 1e3) as u64));
            let _ = write!(
                t,
                "storm at {:.1}s  dropped {}  reconnected {}  recovery {rec}",
                s.at_s,
                count(s.dropped),
                count(s.reconnected)
            );
            if let Some(n) = s.resumed {
                let _ = write!(t, "  resumed {}", count(n));
            }
            if let Some(us) = s.cpu_per_reconnect_us {
                let _ = write!(t, "  server cpu {us:.1} µs/reconnect");
            }
            if let Some(us) = s.loadgen_cpu_per_reconnect_us {
                let _ = write!(t, "  loadgen cpu {us:.1} µs/reconnect");
            }
            let _ = writeln!(t);
        }
        for d in &self.deploys {
            let conv = d.converged_ms.map_or_else(
                || "not converged".to_owned(),
                |ms| micros((ms * 1e3) as u64),
            );
            let _ = writeln!(
                t,
                "deploy at {}s  group {}  {}  installed {}  converged {conv}",
                d.at_s,
                d.group,
                bytes(d.size_bytes),
                count(d.installed)
            );
        }
        self.upgrade_lines(&mut t);
        self.hostile_table(&mut t);
        let _ = writeln!(t);
        let mut mem = |who: &str, rss: u64, per: Option<f64>, per_what: &str| {
            let per = per.map_or_else(String::new, |b| format!("  {} per {per_what}", per_conn(b)));
            let _ = writeln!(t, "{who:<12} rss {}{per}", bytes(rss));
        };
        if let Some(s) = &self.server {
            mem(
                "server",
                s.rss_bytes,
                s.rss_per_connection_bytes,
                "connection",
            );
        }
        let l = &self.loadgen;
        mem("loadgen", l.rss_bytes, l.rss_per_device_bytes, "device");
        let mut cpu = |who: &str, total: Option<f64>, ramp: Option<f64>, per: Option<f64>| {
            let Some(total) = total else { return };
            let _ = write!(t, "{who:<12} cpu {total:.2} s");
            if let (Some(ramp), Some(per)) = (ramp, per) {
                let _ = write!(t, "  ramp {ramp:.2} s = {per:.1} µs per connect");
            }
            let _ = writeln!(t);
        };
        if let Some(s) = &self.server {
            cpu("server", s.cpu_s, s.ramp_cpu_s, s.cpu_per_connect_us);
        }
        cpu("loadgen", l.cpu_s, l.ramp_cpu_s, l.cpu_per_connect_us);
        if let Some(k) = &self.kernel {
            let per = k.slab_per_connection_bytes.map_or_else(String::new, |b| {
                format!(" ({} per connection)", per_conn(b))
            });
            let _ = writeln!(
                t,
                "kernel       tcp inuse {}  tcp mem {}  slab {}{per}",
                count(k.tcp_inuse),
                bytes(k.tcp_mem_bytes),
                bytes(k.slab_bytes)
            );
        }
        let _ = writeln!(
            t,
            "machine      {} cores, Linux {}",
            self.machine.cores, self.machine.kernel_version
        );
        for n in &self.notes {
            let _ = writeln!(t, "note: {n}");
        }
        t
    }
}

impl Report {
    /// The goodbyes line, the admission table per window and the attack table, when the
    /// campaign has attacks (or devices got goodbyes).
    fn hostile_table(&self, t: &mut String) {
        if !self.goodbyes.is_empty() {
            let _ = writeln!(t, "goodbyes     {}", reasons(&self.goodbyes));
        }
        if self.attacks.is_empty() {
            return;
        }
        let _ = writeln!(
            t,
            "\nsession_ready (scheduled connect → Welcome), by the window of the connect's scheduled time"
        );
        let _ = writeln!(
            t,
            "{:<32} {:>8} {:>10} {:>10} {:>10} {:>8}  goodbyes",
            "window", "count", "p50", "p99", "max", "p99/calm"
        );
        for w in &self.session_ready {
            let s = &w.latency;
            let ratio = w
                .p99_vs_calm
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}×"));
            let _ = writeln!(
                t,
                "{:<32} {:>8} {:>10} {:>10} {:>10} {:>8}  {}",
                format!("session_ready.{}", w.window),
                count(s.count),
                micros(s.p50_us),
                micros(s.p99_us),
                micros(s.max_us),
                ratio,
                if w.goodbyes.is_empty() {
                    "-".to_owned()
                } else {
                    reasons(&w.goodbyes)
                }
            );
        }
        let _ = writeln!(
            t,
            "\n{:<19} {:<19} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>10}  other",
            "attack",
            "window",
            "opened",
            "refused",
            "reset",
            "srv close",
            "p50 open",
            "p99 open",
            "still open"
        );
        for a in &self.attacks {
            let c = &a.counts;
            let mut other = Vec::new();
            for (name, n) in [
                ("skipped", c.skipped),
                ("timeout", c.connect_timeouts),
                ("failed", c.connect_failed),
                ("self-closed", c.closed_by_attacker),
                ("tls", c.tls_done),
                ("tls-failed", c.tls_failed),
                ("sent", c.sent),
                ("rejected", c.rejected),
                ("WELCOMED", c.welcomed),
                ("named-live", c.named_live),
            ] {
                if n > 0 {
                    other.push(format!("{name} {}", count(n)));
                }
            }
            let closed = a.closed_after;
            let open = |us: u64| {
                if closed.count == 0 {
                    "-".to_owned()
                } else {
                    micros(us)
                }
            };
            let _ = writeln!(
                t,
                "{:<19} {:<19} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>10}  {}",
                a.kind.name(),
                a.window,
                count(c.opened),
                count(c.refused),
                count(c.reset),
                count(c.closed_by_server),
                open(closed.p50_us),
                open(closed.p99_us),
                count(c.still_open),
                other.join(", ")
            );
        }
    }
}

/// `replaced 3, overloaded 10`.
fn reasons(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, n)| format!("{k} {}", count(*n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The per-window admission summaries, with each p99 set against the calm one.
fn windows(c: &Campaign, stats: &Stats) -> Vec<WindowSummary> {
    let mut out: Vec<WindowSummary> = c
        .windows()
        .into_iter()
        .enumerate()
        .map(|(w, window)| {
            let ws = stats.windows.get(w);
            WindowSummary {
                window,
                latency: LatencySummary::of(ws.and_then(|s| s.ready.as_deref())),
                p99_vs_calm: None,
                goodbyes: ws.map(|s| s.goodbyes.by_kind().clone()).unwrap_or_default(),
            }
        })
        .collect();
    let calm = out
        .first()
        .filter(|w| w.latency.count > 0)
        .map(|w| w.latency.p99_us);
    if let Some(calm) = calm.filter(|&p| p > 0) {
        for w in out.iter_mut().skip(1).filter(|w| w.latency.count > 0) {
            w.p99_vs_calm = Some(w.latency.p99_us as f64 / calm as f64);
        }
    }
    out
}

/// What the live progress line shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Since the first connect attempt.
    pub elapsed: Duration,
    /// Devices connected now.
    pub connected: u64,
    /// Devices the campaign asked for.
    pub target: u64,
    /// Connects per second over the last interval.
    pub connect_rate_per_s: f64,
    /// Messages (sent + received) per second over the last interval.
    pub msgs_per_s: f64,
    /// Round-trip median over the last interval, if any echo completed.
    pub round_trip_p50_us: Option<u64>,
    /// Round-trip 99th percentile over the last interval.
    pub round_trip_p99_us: Option<u64>,
    /// Errors so far.
    pub errors: u64,
}

impl Progress {
    /// The one-line form, e.g.
    /// `[  12.0s] connected 8,000/10,000 +2,000/s  msgs 3,210/s  rtt p50 180 µs p99 1.20 ms  errors 0`.
    pub fn line(&self) -> String {
        let rtt = match (self.round_trip_p50_us, self.round_trip_p99_us) {
            (Some(p50), Some(p99)) => format!("p50 {} p99 {}", micros(p50), micros(p99)),
            _ => "-".to_owned(),
        };
        format!(
            "[{:>7.1}s] connected {}/{} +{}  msgs {}  rtt {rtt}  errors {}",
            self.elapsed.as_secs_f64(),
            count(self.connected),
            count(self.target),
            rate(self.connect_rate_per_s),
            rate(self.msgs_per_s),
            count(self.errors)
        )
    }
}

/// Turns once-a-second snapshots of the merged [`Stats`] into [`Progress`] with interval rates.
#[derive(Debug)]
pub struct ProgressTracker {
    start: Instant,
    target: u64,
    last: Option<(Instant, u64, u64, Option<Histogram<u64>>)>,
}

impl ProgressTracker {
    /// A tracker for a run that started at `start` and aims at `target` devices.
    pub fn new(start: Instant, target: u64) -> ProgressTracker {
        ProgressTracker {
            start,
            target,
            last: None,
        }
    }

    /// The progress at `now`, given the merged statistics so far (cumulative).
    pub fn sample(&mut self, now: Instant, merged: &Stats) -> Progress {
        let c = &merged.counters;
        let msgs = c.msgs_sent + c.msgs_recv;
        let rt = merged.hist.get(Metric::RoundTrip);
        let (since, connects0, msgs0, prev) = match self.last.take() {
            Some((t, cn, ms, prev)) => (t, cn, ms, prev),
            None => (self.start, 0, 0, None),
        };
        let mut interval = rt.cloned();
        if let (Some(i), Some(prev)) = (&mut interval, &prev) {
            // Cumulative histograms only grow, so this cannot fail; fall back to cumulative.
            if i.subtract(prev).is_err() {
                interval = rt.cloned();
            }
        }
        let dt = now.saturating_duration_since(since);
        let (p50, p99) = match interval.filter(|i| !i.is_empty()) {
            None => (None, None),
            Some(i) => (
                Some(i.value_at_quantile(0.5)),
                Some(i.value_at_quantile(0.99)),
            ),
        };
        self.last = Some((now, c.connects, msgs, rt.cloned()));
        Progress {
            elapsed: now.saturating_duration_since(self.start),
            connected: c.connected_now,
            target: self.target,
            connect_rate_per_s: per_sec(c.connects.saturating_sub(connects0), dt),
            msgs_per_s: per_sec(msgs.saturating_sub(msgs0), dt),
            round_trip_p50_us: p50,
            round_trip_p99_us: p99,
            errors: merged.errors.total(),
        }
    }
}

/// `1234567` → `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A rate per second: `1,998/s`, or `0.50/s` below 10.
pub fn rate(per_s: f64) -> String {
    if per_s < 10.0 {
        format!("{per_s:.2}/s")
    } else {
        format!("{}/s", count(per_s.round() as u64))
    }
}

/// Microseconds with a unit: `850 µs`, `1.20 ms`, `2.50 s`.
pub fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.2} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// Bytes with a binary unit: `512 B`, `1.4 KiB`, `3.0 MiB`, `2.1 GiB`.
pub fn bytes(b: u64) -> String {
    bytes_f(b as f64)
}

/// A per-connection figure: whole bytes, signed (RSS can shrink), `1,434 B`.
fn per_conn(b: f64) -> String {
    let sign = if b < 0.0 { "-" } else { "" };
    format!("{sign}{} B", count(b.abs().round() as u64))
}

fn bytes_f(b: f64) -> String {
    const K: f64 = 1024.0;
    let sign = if b < 0.0 { "-" } else { "" };
    let a = b.abs();
    if a < K {
        format!("{sign}{a:.0} B")
    } else if a < K * K {
        format!("{sign}{:.1} KiB", a / K)
    } else if a < K * K * K {
        format!("{sign}{:.1} MiB", a / (K * K))
    } else {
        format!("{sign}{:.2} GiB", a / (K * K * K))
    }
}

#[cfg(test)]
mod tests;

impl Report {
    /// One line per upgrade, and what the devices saw of them.
    fn upgrade_lines(&self, t: &mut String) {
        let Some(u) = &self.upgrade else { return };
        let ms = |us: Option<u64>| us.map_or_else(|| "-".to_owned(), micros);
        for s in &u.upgrades {
            match (&s.report, &s.error) {
                (Some(r), _) => {
                    let per_k = if r.sessions_handed > 0 {
                        format!(
                            " ({:.1} ms per 1,000)",
                            r.handoff_ms as f64 * 1000.0 / r.sessions_handed as f64
                        )
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        t,
                        "upgrade at {}s  pid {} -> {}  listeners {} ms  handed live {} in {} ms{per_k}  refused {}  told to reconnect {}",
                        s.at_s,
                        r.old_pid,
                        r.new_pid,
                        r.listeners_ms,
                        count(r.sessions_handed),
                        r.handoff_ms,
                        count(r.sessions_refused),
                        count(r.sessions_told_to_reconnect)
                    );
                }
                (None, e) => {
                    let _ = writeln!(
                        t,
                        "upgrade at {}s  FAILED: {}",
                        s.at_s,
                        e.as_deref().unwrap_or("unknown")
                    );
                }
            }
            let _ = writeln!(
                t,
                "  round trip p99 {} before, {} in the 10 s after ({} round trips); longest {}",
                ms(s.rtt_p99_before_us),
                ms(s.rtt_p99_window_us),
                count(s.rtt_count_window),
                ms(s.rtt_max_window_us)
            );
        }
        let _ = writeln!(
            t,
            "upgrades: device reconnects {}  connect errors {}  TLS errors {}  agent re-attaches {}  acknowledged messages lost {}",
            count(u.device_reconnects),
            count(u.refused_connects),
            count(u.tls_errors),
            count(u.agent_reattaches),
            count(u.acked_lost)
        );
    }
}
