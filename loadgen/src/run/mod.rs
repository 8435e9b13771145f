//! Running a campaign in this process: start (or find) the server, plan the timeline, run one
//! glommio shard per core with its share of devices and agents, print progress once a second,
//! and build the report.
//!
//! Attacks (`[[attack]]`) run in the same shards, one task per shard over its share of them
//! (`attack`); a device's `session_ready` (scheduled connect → `Welcome`) is recorded under
//! the report window of its connect's scheduled time (`calm`, or the running attacks').
//!
//! Latency clocks: connect is measured from the device's scheduled ramp slot (so a loadgen that
//! falls behind its ramp shows it), the TLS handshake from TCP established to handshake done,
//! `hello` from `Hello` sent to `Welcome`, messages from their open-loop scheduled send time
//! (carried in the payload, see [`stamp`]), heartbeat from the ping's scheduled time.
//!
//! CPU: the server's (spawned, or `server.pid`) and loadgen's CPU time are sampled every
//! [`CPU_SAMPLE`] into a [`CpuTrace`]; windows (ramp, storms) are cut from it after the run, at
//! the exact instants the shards reported (see [`crate::report`]).

mod agent;
mod attack;
mod device;
mod driver;
mod net;
pub mod shard;
pub mod spawn;
pub mod stamp;
mod tls;
mod upgrade;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use rustls::pki_types::ServerName;
use tether_net::tls::{ClientTlsOptions, client_config};

use std::net::SocketAddr;

use crate::campaign::{Campaign, CampaignError, NodeAddrs, TlsState, WorkerPlan, Workers};
use crate::host::{self, HostLimits, Machine};
use crate::report::{
    CpuTrace, DeploySummary, KernelSample, ProcessUsage, ProgressTracker, Report, ReportInputs,
    RssSample, StormSummary,
};
use crate::stats::Stats;
use shard::{DeviceIdent, Shared, Snapshot, StormTally, Timeline};
use spawn::{ServerProcess, SpawnError};
use worker::{Event, Job, ToWorker, WorkerLink};

/// Time left after the last scheduled send for replies in flight.
const DRAIN: Duration = Duration::from_secs(2);
/// glommio reserves this much I/O memory per executor (it defaults to 10 MiB, for file DMA
/// buffers loadgen never uses; below 512 KiB the executor refuses to start).
const IO_MEMORY: usize = 512 * 1024;
/// How often the server's and loadgen's CPU time is read: two small `/proc` reads, so windows
/// end within 100 ms of their exact instant at a negligible cost.
pub const CPU_SAMPLE: Duration = Duration::from_millis(100);

/// Command-line options of `loadgen run` besides the campaign.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The `tether` binary for `server.spawn` (default: next to loadgen's executable).
    pub tether_bin: Option<PathBuf>,
    /// Data directory of an already-running server (devices.csv, tls/ca.pem, agent.token, and
    /// admin.token for deploy steps).
    pub data_dir: Option<PathBuf>,
    /// Print the once-a-second progress line to stderr.
    pub progress: bool,
}

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The campaign does not fit this host or is invalid.
    #[error(transparent)]
    Campaign(#[from] CampaignError),
    /// The server could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// Something needed before the run is missing or broken.
    #[error("{0}")]
    Setup(String),
}

pub(crate) fn setup(msg: impl Into<String>) -> RunError {
    RunError::Setup(msg.into())
}

/// Runs `c` and returns its report.
pub fn run(c: &Campaign, opts: &RunOptions) -> Result<Report, RunError> {
    let host = HostLimits::probe().map_err(|e| setup(format!("cannot read host limits: {e}")))?;
    let plans = c.plan_workers(&host)?;
    let multi = needs_workers(c, &plans);
    let need = c.fds_needed(c.devices);
    if !multi && need > host.fd_soft {
        return Err(CampaignError::DoesNotFit {
            key: "devices".into(),
            problem: format!(
                "{} devices need {need} open files, but this process may open {} (soft limit; \
                 hard {}); raise it with `ulimit -n {}` or fewer devices",
                c.devices, host.fd_soft, host.fd_hard, host.fd_hard
            ),
        }
        .into());
    }
    let notes = Vec::new();
    let nodes = c.server.nodes();
    if nodes.is_empty() {
        return Err(setup("server.address is not set"));
    }
    let mut servers = if c.server.spawn {
        let bin = opts
            .tether_bin
            .clone()
            .unwrap_or_else(spawn::default_tether_bin);
        if opts.progress && nodes.len() > 1 {
            eprintln!("starting {} server nodes", nodes.len());
        }
        ServerProcess::start_nodes(c, &bin)?
    } else {
        Vec::new()
    };
    let data_dir = match (servers.first(), &opts.data_dir) {
        (Some(s), _) => s.data_dir.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => {
            return Err(setup(
                "server.spawn = false: pass --data-dir DIR of the running server \
                 (devices.csv, tls/ca.pem, agent.token)",
            ));
        }
    };
    let server_pids: Vec<u32> = match (servers.is_empty(), c.server.pid) {
        (false, _) => servers.iter().map(ServerProcess::pid).collect(),
        (true, Some(pid)) => {
            host::cpu_of(pid).map_err(|e| {
                setup(format!(
                    "server.pid {pid}: cannot read /proc/{pid}/stat: {e}"
                ))
            })?;
            vec![pid]
        }
        (true, None) => Vec::new(),
    };
    let mut successor = None;
    let result = run_against(
        c,
        &Target {
            data_dir: &data_dir,
            nodes: &nodes,
            server_pids,
        },
        &plans,
        notes,
        opts,
        &mut successor,
    );
    for (k, s) in servers.iter_mut().enumerate() {
        if let Some(pid) = successor {
            s.upgraded_to(pid);
        }
        if opts.progress && !c.upgrade.is_empty() {
            for line in s.upgrade_lines() {
                eprintln!("  server: {line}");
            }
        }
        let how = s.stop();
        if opts.progress {
            let who = if nodes.len() > 1 {
                format!("server node {k}")
            } else {
                "server".into()
            };
            eprintln!("{who} {how}");
        }
        if result.is_err() {
            for line in s.tail() {
                eprintln!("  server: {line}");
            }
        }
    }
    result
}

/// Whether the run is split over worker processes (more than one, or remote ones).
fn needs_workers(c: &Campaign, plans: &[WorkerPlan]) -> bool {
    plans.len() > 1 || matches!(c.workers, Workers::Remote(_))
}

/// What the run goes against.
struct Target<'a> {
    /// Data directory of the (first) server: registry, CA, tokens.
    data_dir: &'a Path,
    /// The nodes' addresses.
    nodes: &'a [NodeAddrs],
    /// Server processes whose CPU and memory are measured (every spawned node, or
    /// `server.pid`).
    server_pids: Vec<u32>,
}

/// The TLS configurations and the agent token a process of the run needs.
pub(crate) struct Material {
    tls: Arc<rustls::ClientConfig>,
    attack_tls: Option<Arc<rustls::ClientConfig>>,
    agent_tls: Option<Arc<rustls::ClientConfig>>,
    agent_token: Vec<u8>,
}

impl Material {
    /// Builds the configs of `c`, trusting the CA at `ca`.
    pub(crate) fn new(c: &Campaign, ca: &Path, agent_token: Vec<u8>) -> Result<Material, RunError> {
        let tls = client_config(
            ca,
            &ClientTlsOptions {
                pq_kx: false,
                session_tickets: usize::from(c.resume),
                // Each device keeps its own ticket (see tls::DeviceTickets).
                session_store: Some(Arc::new(tls::DeviceTickets::default())),
                // The detached device state takes its traffic secrets from rustls.
                secret_extraction: c.tls_state == TlsState::Detached,
            },
        )
        .map_err(|e| setup(e.to_string()))?;
        // Attackers keep no tickets and extract no secrets.
        let attack_tls = if c.attack.is_empty() {
            None
        } else {
            let opts = ClientTlsOptions {
                pq_kx: false,
                session_tickets: 0,
                session_store: None,
                secret_extraction: false,
            };
            Some(client_config(ca, &opts).map_err(|e| setup(e.to_string()))?)
        };
        let agent_tls = if c.messages.uses_agents() && c.server.agent_tls {
            Some(tether_net::tls::agent_client_config(ca).map_err(|e| setup(e.to_string()))?)
        } else {
            None
        };
        Ok(Material {
            tls,
            attack_tls,
            agent_tls,
            agent_token,
        })
    }

    /// The plan the shards of one process read.
    #[allow(clippy::too_many_arguments)] // reason: one call per process kind, all named
    pub(crate) fn shared(
        &self,
        c: &Campaign,
        start: Instant,
        devices: Vec<DeviceIdent>,
        (first_device, stride): (usize, usize),
        sources: &[std::net::Ipv4Addr],
        (targets, agent_targets): (&[SocketAddr], &[SocketAddr]),
        shards: usize,
    ) -> Result<Arc<Shared>, String> {
        let timeline = Timeline::new(c, start, DRAIN);
        let windows = c.windows();
        let attack_spans = c
            .attack
            .iter()
            .map(|a| {
                let w = windows
                    .iter()
                    .position(|l| l == a.window_label())
                    .unwrap_or(0);
                (
                    timeline.at(a.start_s),
                    timeline.at(a.start_s + a.duration_s),
                    w,
                )
            })
            .collect();
        Ok(Arc::new(Shared {
            campaign: c.clone(),
            timeline,
            online: (0..devices.len()).map(|_| AtomicBool::new(false)).collect(),
            devices,
            first_device,
            stride: stride.max(1),
            sources: sources.to_vec(),
            targets: targets.to_vec(),
            pick: c.server.pick,
            agent_targets: if c.messages.uses_agents() {
                agent_targets.to_vec()
            } else {
                Vec::new()
            },
            agent_token: self.agent_token.clone(),
            agent_tls: self.agent_tls.clone(),
            tls: self.tls.clone(),
            server_name: ServerName::try_from("localhost")
                .map_err(|e| e.to_string())?
                .to_owned(),
            attack_tls: self.attack_tls.clone(),
            attack_spans,
            shards,
            abort: AtomicBool::new(false),
        }))
    }
}

/// This process's loadgen shards, started and idle until [`LocalShards::go`].
pub(crate) struct LocalShards {
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
    plans: Vec<mpsc::SyncSender<Arc<Shared>>>,
}

impl LocalShards {
    /// Starts `shards` executors; they make their fixed state (ring, buffers, timing wheel),
    /// whatever the number of devices, and wait for the plan: memory measured from here on is
    /// what the devices add. Snapshots go to `out`.
    pub(crate) fn start(
        shards: usize,
        out: mpsc::Sender<Snapshot>,
    ) -> Result<LocalShards, RunError> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let cores = host::available_cores();
        let mut handles = Vec::new();
        let mut plans = Vec::new();
        for i in 0..shards {
            let spawn = |placement| {
                let (plan_tx, plan_rx) = mpsc::sync_channel::<Arc<Shared>>(1);
                let (tx, ready_tx) = (out.clone(), ready_tx.clone());
                LocalExecutorBuilder::new(placement)
                    .name(&format!("loadgen-{i}"))
                    .io_memory(IO_MEMORY)
                    .spawn(move || shard::run_shard(i, ready_tx, plan_rx, tx))
                    .map(|h| (h, plan_tx))
            };
            let (h, plan_tx) = spawn(Placement::Fixed(i % cores))
                .or_else(|_| spawn(Placement::Unbound))
                .map_err(|e| setup(format!("cannot start loadgen shard {i}: {e}")))?;
            handles.push(h);
            plans.push(plan_tx);
        }
        drop(ready_tx);
        for _ in 0..shards {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(setup(e)),
                Err(_) => return Err(setup("a loadgen shard did not start within 10 s")),
            }
        }
        Ok(LocalShards { handles, plans })
    }

    /// Hands every shard the plan: the run starts at its timeline.
    pub(crate) fn go(&self, shared: &Arc<Shared>) {
        for plan in &self.plans {
            // A shard that is gone already reported why (or its panic is joined below).
            let _ = plan.send(shared.clone());
        }
    }

    /// Waits for every shard to end.
    pub(crate) fn join(self) -> Result<(), String> {
        for h in self.handles {
            h.join()
                .map_err(|e| format!("a loadgen shard failed: {e}"))?;
        }
        Ok(())
    }
}

/// How the devices are driven: by this process's shards, or by worker processes.
enum Fleet {
    Local {
        shards: LocalShards,
        shared: Arc<Shared>,
    },
    Workers(Vec<WorkerLink>),
}

impl Fleet {
    fn abort(&mut self) {
        match self {
            Fleet::Local { shared, .. } => shared.abort.store(true, Ordering::Relaxed),
            Fleet::Workers(links) => {
                for l in links {
                    let _ = l.send(&ToWorker::Abort);
                }
            }
        }
    }
}

/// A worker's last figures (RSS, CPU seconds), from its snapshots.
#[derive(Clone, Copy, Default)]
struct WorkerFigures {
    rss: u64,
    cpu_s: f64,
}

/// Starts the worker processes (or attaches the remote ones), hands each its job, and waits
/// until every one is ready; a worker that fails is named with its reason.
fn start_workers(
    c: &Campaign,
    plans: &[WorkerPlan],
    devices: &[DeviceIdent],
    job: &Job,
    events: &mpsc::Sender<Event>,
    progress: bool,
) -> Result<Vec<WorkerLink>, RunError> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut links = Vec::with_capacity(plans.len());
    for plan in plans {
        let (mut link, input) = match &c.workers {
            Workers::Remote(list) => WorkerLink::connect(plan.index, &list[plan.index as usize])?,
            _ => WorkerLink::spawn(plan.index)?,
        };
        let (w, tx, ev) = (links.len(), ready_tx.clone(), events.clone());
        std::thread::spawn(move || worker::read(w, worker::SHARD_SLOTS, input, tx, ev));
        let mut job = job.clone();
        job.plan = plan.clone();
        job.devices = devices
            .iter()
            .skip(plan.first_device as usize)
            .step_by(plan.stride.max(1) as usize)
            .map(|d| (d.id.0, worker::key_hex(&d.key)))
            .collect();
        if let Err(e) = link.send(&ToWorker::Job(Box::new(job))) {
            return Err(setup(format!("{}: cannot send its job: {e}", link.name)));
        }
        links.push(link);
    }
    drop(ready_tx);
    let deadline = Instant::now() + worker::READY_TIMEOUT;
    for _ in 0..links.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match ready_rx.recv_timeout(left) {
            Ok((w, Ok((pid, rss)))) => {
                links[w].pid = Some(pid);
                links[w].rss_before = rss;
            }
            Ok((w, Err(e))) => {
                let last = links[w].last_words();
                let msg = format!("{} failed before the start: {e} {last}", links[w].name);
                for l in &mut links {
                    let _ = l.send(&ToWorker::Abort);
                    l.reap();
                }
                return Err(setup(msg.trim().to_owned()));
            }
            Err(_) => {
                for l in &mut links {
                    let _ = l.send(&ToWorker::Abort);
                    l.reap();
                }
                return Err(setup(format!(
                    "a worker was not ready within {:?}",
                    worker::READY_TIMEOUT
                )));
            }
        }
    }
    if progress {
        eprintln!(
            "{} workers ready: {}",
            links.len(),
            links
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(links)
}

fn run_against(
    c: &Campaign,
    target: &Target<'_>,
    plans: &[crate::campaign::WorkerPlan],
    mut notes: Vec<String>,
    opts: &RunOptions,
    successor: &mut Option<u32>,
) -> Result<Report, RunError> {
    let data_dir = target.data_dir;
    let admin = c.server.admin_link_address();
    let steps = !c.deploy.is_empty() || !c.upgrade.is_empty();
    if steps && admin.is_none() {
        return Err(setup(
            "deploy and upgrade steps need the server's admin endpoint: set server.admin_address",
        ));
    }
    let mut server_pids = target.server_pids.clone();
    // Deploys and upgrades change state: the admin endpoint wants its token.
    let admin_token = if !steps {
        None
    } else {
        Some(tether_core::client::read_admin_token(data_dir).map_err(|e| setup(e.to_string()))?)
    };
    let mut devices: Vec<DeviceIdent> = tether_core::client::device_keys(data_dir)
        .map_err(|e| setup(e.to_string()))?
        .into_iter()
        .map(|(id, key)| DeviceIdent { id, key })
        .collect();
    let want = usize::try_from(c.devices).map_err(|_| setup("devices: too many"))?;
    if devices.len() < want {
        return Err(setup(format!(
            "{} lists {} devices, the campaign wants {want}",
            data_dir.join("devices.csv").display(),
            devices.len()
        )));
    }
    devices.truncate(want);
    let ca = data_dir.join("tls").join("ca.pem");
    let uses_agents = c.messages.uses_agents();
    let agent_token = if uses_agents {
        let p = data_dir.join("agent.token");
        std::fs::read_to_string(&p)
            .map_err(|e| setup(format!("cannot read {}: {e}", p.display())))?
            .trim()
            .as_bytes()
            .to_vec()
    } else {
        Vec::new()
    };
    let targets: Vec<SocketAddr> = target.nodes.iter().map(|n| n.device).collect();
    let agent_targets: Vec<SocketAddr> = if uses_agents {
        target.nodes.iter().filter_map(|n| n.agent).collect()
    } else {
        Vec::new()
    };
    if uses_agents && agent_targets.len() != targets.len() {
        return Err(setup("agent messages need every node's agent link address"));
    }
    let multi = needs_workers(c, plans);

    let (ev_tx, ev_rx) = mpsc::channel::<Event>();
    let mut links = Vec::new();
    let mut local = None;
    if multi {
        let ca_pem = std::fs::read_to_string(&ca)
            .map_err(|e| setup(format!("cannot read {}: {e}", ca.display())))?;
        let job = Job {
            campaign: c.clone(),
            plan: plans[0].clone(),
            devices: Vec::new(),
            ca_pem,
            agent_token: String::from_utf8_lossy(&agent_token).into_owned(),
            targets: targets.clone(),
            agent_targets: agent_targets.clone(),
        };
        links = start_workers(c, plans, &devices, &job, &ev_tx, opts.progress)?;
    } else {
        let material = Material::new(c, &ca, agent_token)?;
        let shards = c.effective_shards().clamp(1, want.max(1));
        let (snap_tx, snap_rx) = mpsc::channel::<Snapshot>();
        let started = LocalShards::start(shards, snap_tx)?;
        let ev = ev_tx.clone();
        // Ends when the shards end (their senders drop).
        std::thread::spawn(move || {
            for s in snap_rx {
                if ev.send(Event::Snap(Box::new(s), 0, 0, 0.0)).is_err() {
                    return;
                }
            }
            let _ = ev.send(Event::Done(0));
        });
        local = Some((started, material, shards));
    }
    drop(ev_tx);
    let remote = links.iter().any(|l| l.child.is_none());
    let mut figures = vec![WorkerFigures::default(); links.len()];

    let rss_servers = |pids: &[u32]| -> Option<u64> {
        let v: Vec<u64> = pids.iter().filter_map(|p| host::rss_of(*p).ok()).collect();
        (!v.is_empty()).then(|| v.iter().sum())
    };
    let server_before = rss_servers(&server_pids);
    let self_before = host::rss_self()
        .ok()
        .map(|me| me + links.iter().map(|l| l.rss_before).sum::<u64>());
    let kernel_before = KernelSample::read().ok();

    let mut cpu = CpuTrace::default();
    // Workers' CPU: read from /proc for local ones while they run (finer than their once-a-second
    // figure), else the last figure they sent.
    let workers_cpu = |f: &[WorkerFigures], links: &[WorkerLink]| -> f64 {
        f.iter()
            .zip(links)
            .map(|(f, l)| {
                l.pid
                    .filter(|_| l.child.is_some())
                    .and_then(|p| host::cpu_of(p).ok())
                    .map_or(f.cpu_s, |s| s.max(f.cpu_s))
            })
            .sum()
    };
    cpu.sample(&server_pids, workers_cpu(&figures, &links));
    let lead = if multi { 500 } else { 300 };
    let start = Instant::now() + Duration::from_millis(lead);
    let timeline = Timeline::new(c, start, DRAIN);
    let mut fleet = match local {
        Some((started, material, shards)) => {
            let sources = plans.first().map(|p| p.sources.clone()).unwrap_or_default();
            let shared = material
                .shared(
                    c,
                    start,
                    devices,
                    (0, 1),
                    &sources,
                    (&targets, &agent_targets),
                    shards,
                )
                .map_err(setup)?;
            started.go(&shared);
            Fleet::Local {
                shards: started,
                shared,
            }
        }
        None => {
            let start_unix_us = (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64))
                + lead * 1000;
            for l in &mut links {
                let _ = l.send(&ToWorker::Go { start_unix_us });
            }
            Fleet::Workers(links)
        }
    };
    let n_workers = match &fleet {
        Fleet::Local { .. } => 1,
        Fleet::Workers(l) => l.len(),
    };

    // Collect snapshots; bounded by the timeline (plus a grace after which the run is aborted).
    let mut latest: Vec<Option<Snapshot>> = Vec::new();
    let mut finished = vec![false; n_workers];
    let mut failures: Vec<String> = Vec::new();
    let mut aborted = false;
    let mut tracker = ProgressTracker::new(start, c.devices);
    let mut peak = 0u64;
    let mut ramp_done: Option<Instant> = None;
    let mut rss_after: Option<AfterRamp> = None;
    let mut processes: Vec<ProcessUsage> = Vec::new();
    let hard_end = timeline.end + Duration::from_secs(20);
    let mut next_tick = Instant::now() + Duration::from_secs(1);
    let mut next_sample = Instant::now() + CPU_SAMPLE;
    // Deploys: when each was posted, and the admin answers coming back from their threads.
    let mut deployed: Vec<Option<Instant>> = vec![None; c.deploy.len()];
    let (deploy_tx, deploy_rx) = mpsc::channel::<(usize, String)>();
    let mut upgrades =
        upgrade::Upgrades::new(c, admin.map(|a| (a, admin_token.clone())), opts.progress);
    loop {
        let next_deploy = c
            .deploy
            .iter()
            .zip(&deployed)
            .filter(|(_, at)| at.is_none())
            .map(|(d, _)| timeline.at(d.at_s as f64))
            .min();
        let next_upgrade = upgrades.next_due(c, &timeline);
        let wait = next_tick
            .min(next_sample)
            .min(next_deploy.unwrap_or(next_tick))
            .min(next_upgrade.unwrap_or(next_tick))
            .saturating_duration_since(Instant::now());
        match ev_rx.recv_timeout(wait) {
            Ok(Event::Snap(s, w, rss, cpu_s)) => {
                let i = s.shard;
                if latest.len() <= i {
                    latest.resize(i + 1, None);
                }
                latest[i] = Some(*s);
                if let Some(f) = figures.get_mut(w) {
                    *f = WorkerFigures { rss, cpu_s };
                }
            }
            Ok(Event::Done(w)) => finished[w] = true,
            Ok(Event::Died(w, why)) => {
                finished[w] = true;
                let (name, last) = match &fleet {
                    Fleet::Workers(l) => (l[w].name.clone(), l[w].last_words()),
                    Fleet::Local { .. } => ("loadgen".into(), String::new()),
                };
                let last = if last.is_empty() {
                    String::new()
                } else {
                    format!("; its last words: {last}")
                };
                failures.push(format!("{name} died: {why}{last}"));
                if opts.progress {
                    eprintln!("{}", failures.last().map_or("", String::as_str));
                }
                if !aborted {
                    aborted = true;
                    fleet.abort();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if finished.iter().all(|f| *f) {
            break;
        }
        let now = Instant::now();
        for (k, d) in c.deploy.iter().enumerate() {
            if deployed[k].is_none() && now >= timeline.at(d.at_s as f64) && !aborted {
                let (addr, tx) = (admin.expect("checked above"), deploy_tx.clone());
                let token = admin_token.clone();
                let path = format!("/deploy?group={}", query_escape(&d.group));
                let blob = blob(d.size_bytes, k as u64);
                deployed[k] = Some(Instant::now());
                std::thread::spawn(move || {
                    let answer = match tether_core::client::admin_request(
                        addr,
                        token.as_deref(),
                        "POST",
                        &path,
                        &blob,
                    ) {
                        Ok((status, _)) if (200..300).contains(&status) => return,
                        Ok((status, body)) => {
                            format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim())
                        }
                        Err(e) => e.to_string(),
                    };
                    let _ = tx.send((k, answer));
                });
                if opts.progress {
                    eprintln!("deploy {k}: {} bytes to group {}", d.size_bytes, d.group);
                }
            }
        }
        while let Ok((k, answer)) = deploy_rx.try_recv() {
            notes.push(format!(
                "deploy {k} (at {} s) failed: {answer}",
                c.deploy[k].at_s
            ));
        }
        if !c.upgrade.is_empty() && !aborted {
            let merged = merge(&latest);
            let rtt = merged.hist.get(crate::stats::Metric::RoundTrip);
            upgrades.post_due(c, &timeline, now, rtt);
        }
        // The server is another process after an upgrade: sample that one from now on.
        for pid in upgrades.answers() {
            if !server_pids.is_empty() {
                server_pids = vec![pid];
            }
            *successor = Some(pid);
        }
        let links = match &fleet {
            Fleet::Workers(l) => l.as_slice(),
            Fleet::Local { .. } => &[],
        };
        if now >= next_sample {
            cpu.sample(&server_pids, workers_cpu(&figures, links));
            next_sample = now + CPU_SAMPLE;
        }
        if now < next_tick {
            continue;
        }
        next_tick = now + Duration::from_secs(1);
        let merged = merge(&latest);
        upgrades.tick(now, merged.hist.get(crate::stats::Metric::RoundTrip));
        peak = peak.max(merged.counters.connected_now);
        if ramp_done.is_none()
            && (merged.counters.connected_now >= c.devices
                || now >= timeline.ramp_end + Duration::from_secs(5))
        {
            ramp_done = Some(now);
        }
        // Memory "at peak": one second after the ramp settled, before the steady phase ends.
        if rss_after.is_none()
            && ramp_done
                .is_some_and(|t| now >= t + Duration::from_secs(1) || now >= timeline.sends_end)
        {
            let me = host::rss_self().ok();
            let loadgen = me.map(|m| m + figures.iter().map(|f| f.rss).sum::<u64>());
            rss_after = Some((
                rss_servers(&server_pids),
                loadgen,
                merged.counters.connected_now,
                KernelSample::read().ok(),
            ));
            processes = process_rows(&server_pids, target.nodes, links, &figures);
        }
        if opts.progress && now >= start {
            eprintln!("{}", tracker.sample(now, &merged).line());
        }
        let over_limit = c
            .limits
            .max_errors
            .is_some_and(|max| merged.errors.total() > max);
        if (over_limit || now >= hard_end) && !aborted {
            if opts.progress {
                eprintln!(
                    "aborting: {}",
                    if over_limit {
                        "more errors than limits.max_errors"
                    } else {
                        "shards did not finish in time"
                    }
                );
            }
            aborted = true;
            fleet.abort();
        }
        if now >= hard_end + Duration::from_secs(30) {
            failures.push("the run did not end 30 s after it was aborted".into());
            break;
        }
    }
    let links = match fleet {
        Fleet::Local { shards, .. } => {
            shards.join().map_err(setup)?;
            Vec::new()
        }
        Fleet::Workers(mut links) => {
            for l in &mut links {
                l.reap();
            }
            links
        }
    };
    if !failures.is_empty() {
        return Err(setup(format!("the run failed: {}", failures.join("; "))));
    }
    cpu.sample(&server_pids, workers_cpu(&figures, &links));
    if remote {
        notes.push(
            "loadgen CPU of remote workers is their own once-a-second figure; their memory is \
             their RSS as they reported it"
                .into(),
        );
    }
    let elapsed = Instant::now().saturating_duration_since(start);
    let mut stats = merge(&latest);
    stats.counters.peak_connected = peak;
    let (srv_after, self_after, held, kernel_after) =
        rss_after.unwrap_or((None, host::rss_self().ok(), 0, KernelSample::read().ok()));
    if processes.is_empty() {
        processes = process_rows(&server_pids, target.nodes, &links, &figures);
    }
    let storms = storm_summaries(c, &latest, &timeline, &cpu);
    let agent_sends_offline = latest.iter().flatten().map(|s| s.sends_offline).sum();
    // The ramp ends when the last device first connected (exact, from the shards), or at the
    // coarse once-a-second sample if some never did.
    let first: u64 = latest.iter().flatten().map(|s| s.first_connects).sum();
    let ramp_elapsed = if first >= c.devices {
        let us = latest
            .iter()
            .flatten()
            .map(|s| s.last_first_connect_us)
            .max()
            .unwrap_or(0);
        Duration::from_micros(us)
    } else {
        ramp_done
            .unwrap_or(timeline.ramp_end)
            .saturating_duration_since(start)
    };
    while let Ok((k, answer)) = deploy_rx.try_recv() {
        notes.push(format!(
            "deploy {k} (at {} s) failed: {answer}",
            c.deploy[k].at_s
        ));
    }
    let deploys = deploy_summaries(c, &latest, &timeline, &deployed);
    for pid in upgrades.answers() {
        *successor = Some(pid);
    }
    let upgrade = (!c.upgrade.is_empty()).then(|| {
        let rtt = stats.hist.get(crate::stats::Metric::RoundTrip);
        let errors = stats.errors.by_kind();
        let sum = |f: &dyn Fn(&str) -> bool| -> u64 {
            errors.iter().filter(|(k, _)| f(k)).map(|(_, n)| n).sum()
        };
        let k = &stats.counters;
        crate::report::UpgradeTotals {
            upgrades: upgrades.summaries(c, &timeline, rtt),
            device_reconnects: k.connects.saturating_sub(first.min(c.devices)),
            refused_connects: sum(&|k| k.contains("connect") || k.contains("tls")),
            tls_errors: sum(&|k| k.contains("tls")),
            agent_reattaches: k.agent_reattaches,
            acked_lost: k.device_acked.saturating_sub(k.agent_received)
                + k.agent_delivered.saturating_sub(k.device_received),
        }
    });
    let mut attacks = vec![crate::stats::AttackTally::default(); c.attack.len()];
    for snap in latest.iter().flatten() {
        for (mine, theirs) in attacks.iter_mut().zip(&snap.attacks) {
            mine.add(theirs);
        }
    }
    let resumed = latest.iter().flatten().map(|s| s.resumed).sum();
    let ramp_connects = first.min(c.devices);
    let cpu_ramp = cpu.spent(start, start + ramp_elapsed);
    Ok(Report::build(ReportInputs {
        campaign: c,
        stats: &stats,
        elapsed,
        ramp_elapsed: ramp_elapsed.max(Duration::from_millis(1)),
        server: srv_after.map(|after| RssSample {
            before_bytes: server_before,
            after_bytes: after,
            connections: held,
        }),
        loadgen: RssSample {
            before_bytes: self_before,
            after_bytes: self_after.unwrap_or(0),
            connections: held,
        },
        kernel_before,
        kernel_after,
        machine: Machine::probe(),
        storms,
        deploys,
        upgrade,
        notes,
        agent_sends_offline,
        resumed,
        cpu_total: cpu.total(),
        cpu_ramp,
        ramp_connects,
        attacks,
        processes,
    }))
}

/// One row per server node and per worker process: its RSS and CPU now.
fn process_rows(
    server_pids: &[u32],
    nodes: &[NodeAddrs],
    links: &[WorkerLink],
    figures: &[WorkerFigures],
) -> Vec<ProcessUsage> {
    let mut rows: Vec<ProcessUsage> = server_pids
        .iter()
        .enumerate()
        .map(|(k, pid)| ProcessUsage {
            name: match nodes.get(k) {
                Some(n) if server_pids.len() > 1 => format!("server node {k} ({})", n.device),
                _ => "server".into(),
            },
            pid: Some(*pid),
            rss_bytes: host::rss_of(*pid).ok(),
            cpu_s: host::cpu_of(*pid).ok(),
        })
        .collect();
    rows.extend(links.iter().zip(figures).map(|(l, f)| ProcessUsage {
        name: l.name.clone(),
        pid: l.pid,
        rss_bytes: Some(f.rss),
        cpu_s: Some(f.cpu_s),
    }));
    rows
}

/// Server RSS, loadgen RSS, connections held and kernel figures, sampled once the ramp settled.
type AfterRamp = (Option<u64>, Option<u64>, u64, Option<KernelSample>);

fn merge(latest: &[Option<Snapshot>]) -> Stats {
    let mut m = Stats::default();
    for s in latest.iter().flatten() {
        m.add(&s.stats);
    }
    m
}

/// A pseudo-random code blob of `size` bytes (xorshift; `seed` makes each deploy differ).
fn blob(size: u64, seed: u64) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1d ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(size as usize + 8);
    while (out.len() as u64) < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size as usize);
    out
}

/// Percent-escapes everything but unreserved characters, for a query value.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Per deploy: installs from the shards (a device's n-th install counts for the n-th deploy),
/// and the time from the POST to the last install if every device installed.
fn deploy_summaries(
    c: &Campaign,
    latest: &[Option<Snapshot>],
    timeline: &Timeline,
    deployed: &[Option<Instant>],
) -> Vec<DeploySummary> {
    c.deploy
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let (mut installed, mut last_us) = (0, 0);
            for snap in latest.iter().flatten() {
                if let Some(&(n, us)) = snap.code_installed.get(k) {
                    installed += n;
                    last_us = last_us.max(us);
                }
            }
            let converged_ms = deployed[k].filter(|_| installed >= c.devices).map(|at| {
                let last = timeline.epoch.instant(last_us);
                last.saturating_duration_since(at).as_secs_f64() * 1e3
            });
            DeploySummary {
                at_s: d.at_s,
                group: d.group.clone(),
                size_bytes: d.size_bytes,
                installed,
                converged_ms,
            }
        })
        .collect()
}

/// Per storm: counts from the shards, and CPU from the storm instant to its last reconnect.
fn storm_summaries(
    c: &Campaign,
    latest: &[Option<Snapshot>],
    timeline: &Timeline,
    cpu: &CpuTrace,
) -> Vec<StormSummary> {
    c.storm
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let mut t = StormTally::default();
            for snap in latest.iter().flatten() {
                if let Some(x) = snap.storms.get(k) {
                    t.dropped += x.dropped;
                    t.reconnected += x.reconnected;
                    t.last_reconnect_us = t.last_reconnect_us.max(x.last_reconnect_us);
                    t.resumed += x.resumed;
                }
            }
            let at = timeline.at(s.at_s);
            let spent = cpu.spent(at, at + Duration::from_micros(t.last_reconnect_us));
            StormSummary {
                at_s: s.at_s,
                dropped: t.dropped,
                reconnected: t.reconnected,
                recovery_ms: (t.dropped > 0 && t.reconnected == t.dropped)
                    .then(|| t.last_reconnect_us as f64 / 1e3),
                resumed: (t.reconnected > 0).then_some(t.resumed),
                cpu_per_reconnect_us: spent.server_us_per(t.reconnected),
                loadgen_cpu_per_reconnect_us: spent.loadgen_us_per(t.reconnected),
            }
        })
        .collect()
}
