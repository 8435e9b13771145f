//! A loadgen shard: one glommio executor pinned to a core, owning its devices (one driver task
//! over a table of them, [`super::driver`]), its agents' tasks and its statistics. Shards share only the read-only [`Shared`] plan and the
//! online flags; statistics leave a shard as snapshots over a channel once a second.

use std::cell::{Cell, RefCell};
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::future;
use rustls::pki_types::ServerName;
use tether_protocol::DeviceId;
use tether_protocol::auth::DeviceKey;

use super::net::sleep_until;
use super::stamp::Epoch;
use super::{agent, attack, driver};
use crate::campaign::{Campaign, Pick};
use crate::stats::{AttackTally, Metric, Stats};
use serde::{Deserialize, Serialize};

/// The run's timeline, fixed before any shard starts.
#[derive(Clone, Copy, Debug)]
pub struct Timeline {
    /// Time origin of payload stamps; also the first ramp slot.
    pub epoch: Epoch,
    /// Seconds between ramp slots (1 / ramp_per_sec).
    pub slot_s: f64,
    /// End of the ramp's schedule.
    pub ramp_end: Instant,
    /// No new sends after this.
    pub sends_end: Instant,
    /// Devices and agents close at this (in-flight replies have had time to arrive).
    pub end: Instant,
}

impl Timeline {
    /// Builds the timeline of `c` starting at `start`; `drain` is left after the last send.
    pub fn new(c: &Campaign, start: Instant, drain: Duration) -> Timeline {
        let ramp = Duration::from_secs_f64(c.ramp_duration_s());
        let sends_end = start + ramp + Duration::from_secs_f64(c.duration_s);
        Timeline {
            epoch: Epoch(start),
            slot_s: 1.0 / c.ramp_per_sec,
            ramp_end: start + ramp,
            sends_end,
            end: sends_end + drain,
        }
    }

    /// When device `index` makes its first connect attempt.
    pub fn ramp_slot(&self, index: usize) -> Instant {
        self.epoch.0 + Duration::from_secs_f64(index as f64 * self.slot_s)
    }

    /// The instant `s` seconds after the ramp started.
    pub fn at(&self, s: f64) -> Instant {
        self.epoch.0 + Duration::from_secs_f64(s.max(0.0))
    }
}

/// One simulated device's identity.
#[derive(Clone, Debug)]
pub struct DeviceIdent {
    /// Its id.
    pub id: DeviceId,
    /// Its key.
    pub key: DeviceKey,
}

/// What every shard reads: the plan of the run. Written once before the shards start.
pub struct Shared {
    /// The campaign.
    pub campaign: Campaign,
    /// The timeline.
    pub timeline: Timeline,
    /// Devices this process simulates, by index: device `index` is the campaign's device
    /// [`Shared::global`]`(index)`.
    pub devices: Vec<DeviceIdent>,
    /// The campaign number of this process's device 0 (its worker's index).
    pub first_device: usize,
    /// Campaign numbers step by this between this process's devices (the worker count): a
    /// worker drives every `stride`-th device, so all workers ramp together.
    pub stride: usize,
    /// Whether each device is established now (set by its shard, read by agents).
    pub online: Vec<AtomicBool>,
    /// Source addresses to bind (empty: let the kernel choose).
    pub sources: Vec<Ipv4Addr>,
    /// Device listeners of the servers under load (one per node; at least one).
    pub targets: Vec<SocketAddr>,
    /// How each device picks its target.
    pub pick: Pick,
    /// Agent links, one per target (empty if no agents run): agent `a` attaches to
    /// `agent_targets[a % len]`.
    pub agent_targets: Vec<SocketAddr>,
    /// The agent token (trimmed file content).
    pub agent_token: Vec<u8>,
    /// The agent link's TLS client config (`server.agent_tls`); `None`: plain TCP.
    pub agent_tls: Option<Arc<rustls::ClientConfig>>,
    /// TLS client config shared by all devices (its ticket pool makes resumption work).
    pub tls: Arc<rustls::ClientConfig>,
    /// TLS server name.
    pub server_name: ServerName<'static>,
    /// The attacks' TLS client config (no resumption, no secret extraction); set when an
    /// attack completes handshakes.
    pub attack_tls: Option<Arc<rustls::ClientConfig>>,
    /// Attack time spans: (start, end, report window), one per campaign attack, in order.
    pub attack_spans: Vec<(Instant, Instant, usize)>,
    /// Shards in this process.
    pub shards: usize,
    /// Set by the main thread to end the run early (error limit, Ctrl-C).
    pub abort: AtomicBool,
}

impl Shared {
    /// The campaign number of this process's device `index`: what its ramp slot, timetables,
    /// storm draws and target pick come from, so a campaign behaves the same over any number of
    /// worker processes.
    pub fn global(&self, index: usize) -> usize {
        self.first_device + index * self.stride
    }

    /// The target device `index` of this process connects to unless told otherwise (a redirect):
    /// fixed for `hash` and `node`, `None` for `random` (drawn at each connect).
    pub fn home_target(&self, index: usize) -> Option<usize> {
        let n = self.targets.len();
        match self.pick {
            Pick::Hash => Some(spread(self.devices[index].id.0, n)),
            Pick::Node(k) => Some(k as usize % n.max(1)),
            Pick::Random => None,
        }
    }

    /// The report windows active at `t`, as a bit mask (bit `w` for window `w` of
    /// [`Campaign::windows`]): the windows of the attacks running then, or bit 0 (`calm`).
    pub fn windows_at(&self, t: Instant) -> u64 {
        let mask = self
            .attack_spans
            .iter()
            .filter(|(from, to, _)| t >= *from && t < *to)
            .fold(0u64, |m, (_, _, w)| m | 1 << w);
        if mask == 0 { 1 } else { mask }
    }
}

/// `x` hashed onto `0..n` (splitmix64 finaliser: a device id's home node).
pub fn spread(x: u64, n: usize) -> usize {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % n.max(1) as u64) as usize
}

/// Calls `f` for each window in a mask from [`Shared::windows_at`].
pub fn each_window(mask: u64, mut f: impl FnMut(usize)) {
    let mut m = mask;
    while m != 0 {
        let w = m.trailing_zeros() as usize;
        f(w);
        m &= m - 1;
    }
}

/// One reconnect storm as one shard saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StormTally {
    /// Established connections dropped.
    pub dropped: u64,
    /// Of those, connected again.
    pub reconnected: u64,
    /// Latest reconnect, micros after the storm began.
    pub last_reconnect_us: u64,
    /// Of the reconnects, those whose TLS session was resumed.
    pub resumed: u64,
}

/// A shard's measurements at one moment (a worker process sends them to its coordinator as
/// they are, histograms in HDR form).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// Which shard.
    pub shard: usize,
    /// Its statistics so far (of the histograms, only round trips until `done`).
    pub stats: Stats,
    /// Per storm of the campaign.
    pub storms: Vec<StormTally>,
    /// Agent sends skipped because their device was offline, or answered `Offline`.
    pub sends_offline: u64,
    /// Devices of this shard that have connected at least once.
    pub first_connects: u64,
    /// Micros after the epoch of the latest of those.
    pub last_first_connect_us: u64,
    /// Successful connects whose TLS session was resumed.
    pub resumed: u64,
    /// Per campaign deploy (a device's n-th install counts for the n-th deploy): installs by
    /// this shard's devices, and micros after the epoch of the latest of them.
    pub code_installed: Vec<(u64, u64)>,
    /// Per campaign attack, what this shard's attacker did (empty until `done`).
    pub attacks: Vec<AttackTally>,
    /// Whether the shard has finished.
    pub done: bool,
}

/// Ends a shard's tasks early: every waiting task registers its waker under its own slot (the
/// device driver looks at [`Stop::fired`] instead).
#[derive(Default)]
pub struct Stop {
    fired: Cell<bool>,
    wakers: RefCell<Vec<Option<Waker>>>,
}

impl Stop {
    /// Whether the stop fired.
    pub fn fired(&self) -> bool {
        self.fired.get()
    }

    /// Wakes every task waiting on it.
    pub fn fire(&self) {
        self.fired.set(true);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        wakers.into_iter().flatten().for_each(Waker::wake);
    }

    /// Resolves once the stop fired; `slot` is the waiting task's own index.
    pub async fn wait(&self, slot: usize) {
        future::poll_fn(|cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            let mut w = self.wakers.borrow_mut();
            if w.len() <= slot {
                w.resize(slot + 1, None);
            }
            w[slot] = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// What a shard's tasks share: owned by the shard, never crossing threads.
pub struct ShardCtx {
    /// This shard's index.
    pub index: usize,
    /// The run's plan.
    pub shared: Arc<Shared>,
    /// Measurements.
    pub stats: RefCell<Stats>,
    /// Storm tallies, one per campaign storm.
    pub storms: RefCell<Vec<StormTally>>,
    /// See [`Snapshot::sends_offline`].
    pub sends_offline: Cell<u64>,
    /// See [`Snapshot::first_connects`] and [`Snapshot::last_first_connect_us`].
    pub first_connects: Cell<(u64, u64)>,
    /// See [`Snapshot::resumed`].
    pub resumed: Cell<u64>,
    /// See [`Snapshot::code_installed`].
    pub code_installed: RefCell<Vec<(u64, u64)>>,
    /// See [`Snapshot::attacks`].
    pub attacks: RefCell<Vec<AttackTally>>,
    /// Early end.
    pub stop: Stop,
}

impl ShardCtx {
    /// Counts an error of `kind`, unless the run is over (closing races are not errors).
    pub fn error(&self, kind: &str) {
        if Instant::now() < self.shared.timeline.end && !self.stop.fired() {
            self.stats.borrow_mut().errors.count(kind);
        }
    }

    /// The shard's figures; once a second (`done` false) with only the round-trip histogram,
    /// which the progress line shows (a full copy of every histogram is ≈ 1 MiB), and all of
    /// them at the end.
    fn snapshot(&self, done: bool) -> Snapshot {
        let st = self.stats.borrow();
        let stats = if done {
            st.clone()
        } else {
            Stats {
                hist: st.hist.only(Metric::RoundTrip),
                errors: st.errors.clone(),
                counters: st.counters,
                goodbyes: st.goodbyes.clone(),
                windows: Vec::new(),
            }
        };
        Snapshot {
            shard: self.index,
            stats,
            storms: self.storms.borrow().clone(),
            sends_offline: self.sends_offline.get(),
            first_connects: self.first_connects.get().0,
            last_first_connect_us: self.first_connects.get().1,
            resumed: self.resumed.get(),
            code_installed: self.code_installed.borrow().clone(),
            attacks: if done {
                self.attacks.borrow().clone()
            } else {
                Vec::new()
            },
            done,
        }
    }
}

/// Runs shard `index`: makes its fixed state and says so on `ready` (or why it could not),
/// waits for the run's plan on `plan`, then runs its share of devices (index ≡ shard mod shards)
/// and of agents until the timeline ends or the run is aborted. Sends a snapshot every second
/// and a final one.
pub async fn run_shard(
    index: usize,
    ready: Sender<Result<(), String>>,
    plan: Receiver<Arc<Shared>>,
    out: Sender<Snapshot>,
) {
    let kit = match driver::Kit::new() {
        Ok(k) => k,
        Err(e) => {
            let _ = ready.send(Err(format!("loadgen shard {index}: {e}")));
            return;
        }
    };
    // Every run with devices records these; the rest are made on their first value.
    let mut stats = Stats::default();
    stats.hist.make_now(&[
        Metric::Connect,
        Metric::TlsHandshake,
        Metric::Hello,
        Metric::Heartbeat,
    ]);
    let _ = ready.send(Ok(()));
    // Blocking is fine: nothing else runs on this executor yet. No plan: the run was called off.
    let Ok(shared) = plan.recv() else { return };
    let ctx = Rc::new(ShardCtx {
        index,
        storms: RefCell::new(vec![StormTally::default(); shared.campaign.storm.len()]),
        shared: shared.clone(),
        stats: RefCell::new(stats),
        sends_offline: Cell::new(0),
        first_connects: Cell::new((0, 0)),
        resumed: Cell::new(0),
        code_installed: RefCell::new(vec![(0, 0); shared.campaign.deploy.len().max(1)]),
        attacks: RefCell::new(vec![AttackTally::default(); shared.campaign.attack.len()]),
        stop: Stop::default(),
    });
    let mut tasks = Vec::new();
    let devices: Vec<usize> = (index..shared.devices.len())
        .step_by(shared.shards)
        .collect();
    tasks.push(glommio::spawn_local(driver::run(ctx.clone(), devices, kit)));
    // This shard's share of the attacks (attack k runs on shard k mod shards), one task over
    // all of them with its own ring.
    let attacks: Vec<usize> = (index..shared.campaign.attack.len())
        .step_by(shared.shards)
        .collect();
    if !attacks.is_empty() {
        tasks.push(glommio::spawn_local(attack::run(ctx.clone(), attacks)));
    }
    let mut slot = 0;
    if !shared.agent_targets.is_empty() && shared.campaign.messages.uses_agents() {
        let agents = shared.campaign.messages.agents as usize;
        for a in (index..agents).step_by(shared.shards) {
            tasks.push(glommio::spawn_local(agent::run(ctx.clone(), slot, a)));
            slot += 1;
        }
    }
    let done = Rc::new(Cell::new(false));
    let reporter = glommio::spawn_local({
        let (ctx, done, out) = (ctx.clone(), done.clone(), out.clone());
        async move {
            let mut next = Instant::now();
            // Bounded by the timeline: the tasks end by `end` (plus their close), and an abort
            // ends them sooner.
            while !done.get() {
                next += Duration::from_secs(1);
                future::or(sleep_until(next), async {
                    while !done.get() {
                        glommio::timer::sleep(Duration::from_millis(100)).await;
                        if ctx.shared.abort.load(Ordering::Relaxed) && !ctx.stop.fired() {
                            ctx.stop.fire();
                        }
                    }
                })
                .await;
                if out.send(ctx.snapshot(false)).is_err() {
                    break;
                }
            }
        }
    });
    for t in tasks {
        t.await;
    }
    done.set(true);
    reporter.await;
    let _ = out.send(ctx.snapshot(true));
}
