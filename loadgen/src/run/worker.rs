//! Worker processes: a campaign bigger than one process's open-file limit is split over workers,
//! each running its own shards over its share of the devices ([`WorkerPlan`]), and the process
//! that started the run stays the coordinator: it merges the workers' snapshots into one progress
//! line and one report (histograms in their serialised HDR form, merged exactly).
//!
//! The link is one byte stream each way, one JSON message per line: a local worker is a child
//! `loadgen worker --stdio` on its stdin/stdout, a remote one is `loadgen worker --listen ADDR`
//! on a TCP connection. The coordinator sends a [`Job`], the worker starts its shards and answers
//! [`ToCoordinator::Ready`], the coordinator sends [`ToWorker::Go`] with the run's start as wall
//! time (so every worker's timeline is the same), then snapshots flow up until
//! [`ToCoordinator::Done`]. [`ToWorker::Abort`] — or the end of the coordinator's stream, when it
//! died — ends a worker's run early; nothing waits for a coordinator that is gone.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tether_protocol::DeviceId;
use tether_protocol::auth::DeviceKey;

use super::shard::{DeviceIdent, Snapshot};
use super::{LocalShards, Material, RunError, setup};
use crate::campaign::{Campaign, WorkerPlan};
use crate::host::{self, HostLimits};

/// Snapshot slots per worker in the coordinator: worker `w`'s shard `s` is run-wide shard
/// `w * SHARD_SLOTS + s` (a remote host may have any number of cores).
pub const SHARD_SLOTS: usize = 64;

/// How long a worker may take from its job to `Ready` (making its shards).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything a worker needs, remote or not: it reads nothing from the coordinator's disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// The campaign as the coordinator runs it.
    pub campaign: Campaign,
    /// This worker's share.
    pub plan: WorkerPlan,
    /// Its devices, in order: (id, key as hex).
    pub devices: Vec<(u64, String)>,
    /// The servers' CA certificate (PEM).
    pub ca_pem: String,
    /// The agent token (empty when no agents run).
    pub agent_token: String,
    /// Device listener of each node.
    pub targets: Vec<SocketAddr>,
    /// Agent link of each node (empty when no agents run).
    pub agent_targets: Vec<SocketAddr>,
}

/// Coordinator → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    /// The work.
    Job(Box<Job>),
    /// Start the timeline at this wall time (µs since the Unix epoch).
    Go {
        /// The run's first ramp slot.
        start_unix_us: u64,
    },
    /// End the run now.
    Abort,
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// Shards are up and idle.
    Ready {
        /// The worker's process id (on its host).
        pid: u32,
        /// Its RSS now, before any device.
        rss_bytes: u64,
    },
    /// One shard's snapshot (shard index within the worker), with the worker's RSS and CPU.
    Snap {
        /// The snapshot.
        snap: Box<Snapshot>,
        /// Worker RSS now.
        rss_bytes: u64,
        /// Worker CPU seconds so far.
        cpu_s: f64,
    },
    /// The worker could not run its share.
    Failed(String),
    /// Every shard finished.
    Done,
}

/// Encodes a device key for a [`Job`].
pub fn key_hex(k: &DeviceKey) -> String {
    k.0.iter().map(|b| format!("{b:02x}")).collect()
}

fn key_from_hex(s: &str) -> Option<DeviceKey> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(DeviceKey(out))
}

fn send(out: &mut impl Write, msg: &ToCoordinator) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

/// Runs one job as a worker: reads the job from `input`, runs it, streams to `output`. Returns
/// when the job ends (or fails; the failure is sent too, if the link still works).
pub fn serve(input: impl BufRead + Send + 'static, mut output: impl Write) -> Result<(), String> {
    let mut lines = input.lines();
    let job = match lines.next() {
        Some(Ok(line)) => match serde_json::from_str::<ToWorker>(&line) {
            Ok(ToWorker::Job(job)) => job,
            Ok(other) => return Err(format!("expected a job, got {other:?}")),
            Err(e) => return Err(format!("not a job: {e}")),
        },
        Some(Err(e)) => return Err(format!("reading the job: {e}")),
        None => return Err("the coordinator closed the link before sending a job".into()),
    };
    match run_job(*job, lines, &mut output) {
        Ok(()) => send(&mut output, &ToCoordinator::Done).map_err(|e| e.to_string()),
        Err(e) => {
            let _ = send(&mut output, &ToCoordinator::Failed(e.clone()));
            Err(e)
        }
    }
}

fn run_job(
    job: Job,
    mut lines: impl Iterator<Item = std::io::Result<String>> + Send + 'static,
    out: &mut impl Write,
) -> Result<(), String> {
    let c = &job.campaign;
    let limits = HostLimits::probe().map_err(|e| format!("cannot read host limits: {e}"))?;
    let need = c.fds_needed(job.plan.devices);
    if need > limits.fd_soft {
        return Err(format!(
            "worker {}: {} devices need {need} open files, but this process may open {} (hard \
             limit {}); run more workers",
            job.plan.index, job.plan.devices, limits.fd_soft, limits.fd_hard
        ));
    }
    let devices = job
        .devices
        .iter()
        .map(|(id, key)| {
            key_from_hex(key)
                .map(|key| DeviceIdent {
                    id: DeviceId(*id),
                    key,
                })
                .ok_or_else(|| format!("device {id}: its key is not 64 hex digits"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The TLS configs read the CA from a file.
    let dir = std::env::temp_dir().join(format!("tether-loadgen-worker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &job.ca_pem).map_err(|e| format!("{}: {e}", ca.display()))?;
    let material = Material::new(c, &ca, job.agent_token.as_bytes().to_vec());
    let _ = std::fs::remove_dir_all(&dir);
    let material = material.map_err(|e| e.to_string())?;

    let shards = c.effective_shards().clamp(1, devices.len().max(1));
    let (snap_tx, snap_rx) = mpsc::channel::<Snapshot>();
    let local = LocalShards::start(shards, snap_tx).map_err(|e| e.to_string())?;
    send(
        out,
        &ToCoordinator::Ready {
            pid: std::process::id(),
            rss_bytes: host::rss_self().unwrap_or(0),
        },
    )
    .map_err(|e| e.to_string())?;
    let start_unix_us = match lines.next() {
        Some(Ok(line)) => match serde_json::from_str::<ToWorker>(&line) {
            Ok(ToWorker::Go { start_unix_us }) => start_unix_us,
            Ok(ToWorker::Abort) => return Ok(()),
            Ok(other) => return Err(format!("expected go, got {other:?}")),
            Err(e) => return Err(format!("not a message: {e}")),
        },
        _ => return Err("the coordinator went away before the start".into()),
    };
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let start = Instant::now() + Duration::from_micros(start_unix_us.saturating_sub(now_us));
    let shared = material.shared(
        c,
        start,
        devices,
        (job.plan.first_device as usize, job.plan.stride as usize),
        &job.plan.sources,
        (&job.targets, &job.agent_targets),
        shards,
    )?;
    // Abort, or the coordinator gone (end of its stream): stop the shards.
    std::thread::spawn({
        let shared = shared.clone();
        move || {
            for line in lines.by_ref() {
                match line
                    .ok()
                    .and_then(|l| serde_json::from_str::<ToWorker>(&l).ok())
                {
                    Some(ToWorker::Abort) | None => break,
                    Some(_) => {}
                }
            }
            shared.abort.store(true, Ordering::Relaxed);
        }
    });
    local.go(&shared);
    let hard_end = shared.timeline.end + Duration::from_secs(30);
    let mut done = vec![false; shards];
    // Bounded by the timeline: the shards end by `end`, an abort sooner; past `hard_end` the
    // worker gives up on them.
    while !done.iter().all(|d| *d) {
        let snap = match snap_rx.recv_timeout(Duration::from_millis(500)) {
            Ok(s) => s,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() > hard_end {
                    return Err("its shards did not finish in time".into());
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        done[snap.shard] |= snap.done;
        let msg = ToCoordinator::Snap {
            snap: Box::new(snap),
            rss_bytes: host::rss_self().unwrap_or(0),
            cpu_s: host::cpu_self().unwrap_or(0.0),
        };
        if send(out, &msg).is_err() {
            // The coordinator is gone: stop.
            shared.abort.store(true, Ordering::Relaxed);
        }
    }
    // An abort is the coordinator's decision (error limit, another worker's death): the shards
    // stopped and sent their final figures, which the coordinator reports.
    local.join()
}

/// `loadgen worker --listen ADDR`: serves coordinators one after another, one job each, until
/// killed. Each job's failure is told to its coordinator and printed here; the worker goes on.
pub fn listen(addr: SocketAddr) -> Result<(), String> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| format!("listen on {addr}: {e}"))?;
    eprintln!("loadgen worker listening on {addr}");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let peer = conn
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        let _ = conn.set_nodelay(true);
        let reader = match conn.try_clone() {
            Ok(r) => std::io::BufReader::new(r),
            Err(e) => {
                eprintln!("coordinator {peer}: {e}");
                continue;
            }
        };
        eprintln!("coordinator {peer} attached");
        match serve(reader, std::io::BufWriter::new(conn)) {
            Ok(()) => eprintln!("coordinator {peer}: job done"),
            Err(e) => eprintln!("coordinator {peer}: {e}"),
        }
    }
    Ok(())
}

/// The coordinator's side of one worker.
pub struct WorkerLink {
    /// "worker 2 (pid 1234)" or "worker 1 at host:port".
    pub name: String,
    /// Its process, when this host started it.
    pub child: Option<std::process::Child>,
    /// Where messages to it go.
    pub to: Box<dyn Write + Send>,
    /// Its pid (on its host), once ready.
    pub pid: Option<u32>,
    /// RSS at `Ready`.
    pub rss_before: u64,
    /// Its last stderr lines (local workers).
    pub stderr: Arc<std::sync::Mutex<Vec<String>>>,
}

/// What a worker's reader thread passes to the coordinator.
pub enum Event {
    /// A shard snapshot, shard index already made run-wide.
    Snap(Box<Snapshot>, usize, u64, f64),
    /// Worker `usize` finished.
    Done(usize),
    /// Worker `usize` failed or died, and why.
    Died(usize, String),
}

impl WorkerLink {
    /// Starts a local worker process (`loadgen worker --stdio`) for worker `index`.
    pub fn spawn(index: u32) -> Result<(WorkerLink, Box<dyn BufRead + Send>), RunError> {
        let exe = std::env::current_exe()
            .map_err(|e| setup(format!("cannot find loadgen's own executable: {e}")))?;
        let exe = if exe.file_name().is_some_and(|n| n == "loadgen") {
            exe
        } else {
            // Tests run from target/<profile>/deps: the binary sits one level up.
            super::spawn::sibling(&exe, "loadgen")
        };
        let mut child = std::process::Command::new(&exe)
            .args(["worker", "--stdio"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| {
                setup(format!(
                    "cannot start worker {index} ({}): {e}",
                    exe.display()
                ))
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(setup("a worker's pipes are missing"));
        };
        let tail = Arc::new(std::sync::Mutex::new(Vec::new()));
        std::thread::spawn({
            let tail = tail.clone();
            move || {
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if t.len() == 20 {
                        t.remove(0);
                    }
                    t.push(line);
                }
            }
        });
        let pid = child.id();
        Ok((
            WorkerLink {
                name: format!("worker {index} (pid {pid})"),
                child: Some(child),
                to: Box::new(stdin),
                pid: None,
                rss_before: 0,
                stderr: tail,
            },
            Box::new(std::io::BufReader::new(stdout)),
        ))
    }

    /// Attaches the remote worker at `addr` as worker `index`.
    pub fn connect(
        index: u32,
        addr: &str,
    ) -> Result<(WorkerLink, Box<dyn BufRead + Send>), RunError> {
        use std::net::ToSocketAddrs;
        let target = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| setup(format!("workers: cannot resolve {addr}")))?;
        let s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(10))
            .map_err(|e| setup(format!("workers: cannot attach the worker at {addr}: {e}")))?;
        let _ = s.set_nodelay(true);
        let r = s
            .try_clone()
            .map_err(|e| setup(format!("workers: {addr}: {e}")))?;
        Ok((
            WorkerLink {
                name: format!("worker {index} at {addr}"),
                child: None,
                to: Box::new(s),
                pid: None,
                rss_before: 0,
                stderr: Arc::default(),
            },
            Box::new(std::io::BufReader::new(r)),
        ))
    }

    /// Sends one message; a broken link is reported by the reader.
    pub fn send(&mut self, msg: &ToWorker) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.to.write_all(&line)?;
        self.to.flush()
    }

    /// Its last error lines, for a report of its death.
    pub fn last_words(&self) -> String {
        let t = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        t.iter()
            .rev()
            .take(3)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// Stops a local worker that is still running (after the run, or when the run failed).
    pub fn reap(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let deadline = Instant::now() + Duration::from_secs(5);
            // Bounded: 5 s, then killed.
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A worker's answer to its job: (worker, its pid and RSS, or why it cannot run).
pub type Ready = (usize, Result<(u32, u64), String>);

/// Reads worker `w`'s messages until it is done or gone, passing them on as [`Event`]s; the
/// `Ready` answer goes to `ready`. Shard indices become run-wide (`w * shards + shard`).
pub fn read(
    w: usize,
    shards: usize,
    input: Box<dyn BufRead + Send>,
    ready: mpsc::Sender<Ready>,
    events: mpsc::Sender<Event>,
) {
    let mut was_ready = false;
    for line in input.lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<ToCoordinator>(&line) {
            Ok(ToCoordinator::Ready { pid, rss_bytes }) => {
                was_ready = true;
                let _ = ready.send((w, Ok((pid, rss_bytes))));
            }
            Ok(ToCoordinator::Snap {
                mut snap,
                rss_bytes,
                cpu_s,
            }) => {
                snap.shard = w * shards + snap.shard.min(shards - 1);
                let _ = events.send(Event::Snap(snap, w, rss_bytes, cpu_s));
            }
            Ok(ToCoordinator::Done) => {
                let _ = events.send(Event::Done(w));
                return;
            }
            Ok(ToCoordinator::Failed(e)) => {
                if !was_ready {
                    let _ = ready.send((w, Err(e.clone())));
                }
                let _ = events.send(Event::Died(w, e));
                return;
            }
            Err(e) => {
                let why = format!("sent something that is not a worker message: {e}");
                if !was_ready {
                    let _ = ready.send((w, Err(why.clone())));
                }
                let _ = events.send(Event::Died(w, why));
                return;
            }
        }
    }
    let why = "its link closed without a word (it died)".to_owned();
    if !was_ready {
        let _ = ready.send((w, Err(why.clone())));
    }
    let _ = events.send(Event::Died(w, why));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cross_as_hex() {
        let k = DeviceKey([0xa5; 32]);
        assert_eq!(key_from_hex(&key_hex(&k)).unwrap().0, k.0);
        assert!(key_from_hex("zz").is_none());
        assert!(key_from_hex(&"g".repeat(64)).is_none());
    }
}
