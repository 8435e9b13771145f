//! The upgrade itself, both ends of it.
//!
//! The running process ([`Upgrader`], old side) starts the new binary with the same
//! arguments and `--take-over`, accepts its connection on `upgrade.sock`, and hands it the
//! listening sockets — the same sockets, never re-bound, so nothing queued in a backlog is
//! reset — with the data directory's lock. The new process ([`take_over`]) starts its shards
//! on them and answers `ListenersTaken` once every shard accepts; only then does the old one
//! stop accepting. Until that answer the old process has changed nothing, so any failure
//! (the binary does not start, exits, speaks another format, or is too slow) leaves it
//! serving as before, and it says why in one line.
//!
//! Then the sessions move, live: each shard pauses its established detached-TLS sessions and
//! hands their state out (`shard::handoff`); this thread sends them in batches of at most 253
//! (one socket each), and each batch is committed only when the new process answers which it
//! took — those the old shards forget quietly, the rest carry on there or say goodbye. If the
//! new process dies or stops answering, every session not yet committed carries on in the old
//! process and it accepts again. A session that cannot move gets `Goodbye{upgrade}` with its
//! `retry_after` spread over `--upgrade-window-ms`; agent links are closed (agents re-attach
//! to the new process). When the old process's sessions are gone it sends `Done`, waits for
//! `Confirmed`, and exits.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender};
use tether_protocol::DeviceId;

use super::control::{ControlConn, ControlListener};
use super::wire::{Msg, SessionEntry, batch_ranges, check_taken};
use crate::metrics::ShardMetrics;
use crate::shard::{HandedOut, HandedSession, HandoffCmd, Outgoing, ServerCtx, rebuild};

/// This binary's version, told to the other side in the handshake.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long the new binary may take to connect back.
const CONNECT_WAIT: Duration = Duration::from_secs(20);
/// How long it may take from receiving the listeners to accepting on all of them.
const TAKE_WAIT: Duration = Duration::from_secs(20);
/// Each step of the handshake.
const STEP_WAIT: Duration = Duration::from_secs(10);

/// What the running process hands over: copies of its listening sockets' descriptors (the
/// shards keep theirs) and of its data-directory lock.
pub(crate) struct Handover {
    /// One device listener per shard.
    pub device: Vec<OwnedFd>,
    /// One agent listener per shard.
    pub agent: Vec<OwnedFd>,
    /// The admin listener.
    pub admin: OwnedFd,
    /// `serve.lock`, locked.
    pub lock: OwnedFd,
}

/// The old side of an upgrade, one at a time.
pub(crate) struct Upgrader {
    data_dir: PathBuf,
    /// The `serve` arguments this process was started with (without the program name).
    args: Vec<OsString>,
    fds: Handover,
    ctx: Arc<ServerCtx>,
    /// Every shard's counters, summed (as last published).
    totals: Box<dyn Fn() -> ShardMetrics + Send + Sync>,
    /// Sessions the shards hand out at the drain.
    handed: Receiver<HandedOut>,
    /// Each shard's channel for what became of them.
    shards: Vec<Sender<HandoffCmd>>,
    busy: AtomicBool,
}

/// What an upgrade did, as `POST /upgrade` answers it (JSON) and `tether upgrade` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpgradeReport {
    /// The process that was upgraded (it exits once its remaining sessions are gone).
    pub old_pid: u32,
    /// The process that serves now.
    pub new_pid: u32,
    /// The new binary's version.
    pub new_version: String,
    /// From the request to the new process accepting on every listener.
    pub listeners_ms: u64,
    /// Sessions handed over live (the devices noticed nothing).
    pub sessions_handed: u64,
    /// Sessions the new process refused (they were told to reconnect).
    pub sessions_refused: u64,
    /// Sessions that could not move (buffered TLS, a cipher whose state cannot leave, still
    /// in their handshake) and were told to reconnect (`Goodbye{upgrade}`).
    pub sessions_told_to_reconnect: u64,
    /// From stopping accepting to the last batch committed.
    pub handoff_ms: u64,
}

impl UpgradeReport {
    /// One line for people.
    pub fn summary(&self) -> String {
        format!(
            "upgraded: pid {} ({}) serves, it took the listeners in {} ms; {} sessions handed \
             over live in {} ms, {} refused, {} told to reconnect; pid {} exits",
            self.new_pid,
            self.new_version,
            self.listeners_ms,
            self.sessions_handed,
            self.handoff_ms,
            self.sessions_refused,
            self.sessions_told_to_reconnect,
            self.old_pid
        )
    }
}

/// `tether upgrade`: asks the server at `addr` to upgrade to `binary` (its own binary if
/// `None`; the server starts it, so give an absolute path) and waits for the outcome.
pub fn request_upgrade(
    addr: impl std::net::ToSocketAddrs + std::fmt::Display,
    token: Option<&str>,
    binary: Option<&Path>,
) -> Result<UpgradeReport, crate::admin::AdminError> {
    let name = addr.to_string();
    let body = binary.map(|b| b.display().to_string()).unwrap_or_default();
    let (status, answer) = crate::admin::admin_request_within(
        addr,
        token,
        "POST",
        "/upgrade",
        body.as_bytes(),
        Duration::from_secs(90),
    )?;
    if status != 200 {
        return Err(crate::admin::AdminError::Status {
            addr: name,
            status,
            message: String::from_utf8_lossy(&answer).trim().to_owned(),
        });
    }
    serde_json::from_slice(&answer)
        .map_err(|source| crate::admin::AdminError::Json { addr: name, source })
}

/// Why an upgrade did not happen; the running process keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeRefused {
    /// Another upgrade is in progress.
    #[error("an upgrade is already in progress")]
    Busy,
    /// It was tried and failed, for this reason.
    #[error("{0}")]
    Failed(String),
}

impl Upgrader {
    pub(crate) fn new(
        data_dir: &Path,
        args: Vec<OsString>,
        fds: Handover,
        ctx: Arc<ServerCtx>,
        totals: Box<dyn Fn() -> ShardMetrics + Send + Sync>,
        handed: Receiver<HandedOut>,
        shards: Vec<Sender<HandoffCmd>>,
    ) -> Upgrader {
        Upgrader {
            data_dir: data_dir.to_path_buf(),
            args,
            fds,
            ctx,
            totals,
            handed,
            shards,
            busy: AtomicBool::new(false),
        }
    }

    /// Upgrades to `binary` (this process's own binary if `None`): returns once the new process
    /// accepts on every listener (then this one drains in the background), or says why not.
    pub(crate) fn upgrade(
        self: &Arc<Self>,
        binary: Option<PathBuf>,
        why: &str,
    ) -> Result<UpgradeReport, UpgradeRefused> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(UpgradeRefused::Busy);
        }
        let started = Instant::now();
        let (mut child, mut conn, new_version) = match self.hand_listeners(binary) {
            Ok(x) => x,
            Err(reason) => {
                self.busy.store(false, Ordering::Release);
                eprintln!("tether: upgrade ({why}) refused, this process keeps serving: {reason}");
                return Err(UpgradeRefused::Failed(reason));
            }
        };
        let listeners_ms = started.elapsed().as_millis() as u64;
        let new_pid = child.id();
        eprintln!(
            "tether: upgrade ({why}): pid {new_pid} ({new_version}) accepts on every listener \
             ({listeners_ms} ms); this process stopped accepting and hands its {} sessions over",
            self.live()
        );
        let sessions = match self.hand_sessions(&mut child, &mut conn) {
            Ok(s) => s,
            Err(reason) => {
                self.busy.store(false, Ordering::Release);
                return Err(UpgradeRefused::Failed(reason));
            }
        };
        let report = UpgradeReport {
            old_pid: std::process::id(),
            new_pid,
            new_version,
            listeners_ms,
            ..sessions
        };
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tether-upgrade".into())
            .spawn(move || this.finish(child, conn));
        if let Err(e) = spawned {
            // The sessions have moved; without the thread this process cannot hand over the
            // rest, so it ends now (the new one accepts on every listener).
            eprintln!("tether: upgrade: cannot start the finishing thread ({e}); stopping");
            self.ctx.shutdown.store(true, Ordering::Relaxed);
        }
        Ok(report)
    }

    /// Starts the new binary and hands it the listeners; on any failure the child is killed
    /// and nothing in this process has changed.
    fn hand_listeners(
        &self,
        binary: Option<PathBuf>,
    ) -> Result<(Child, ControlConn, String), String> {
        let listener = ControlListener::bind(&self.data_dir).map_err(|e| e.to_string())?;
        let binary = match binary {
            Some(b) => b,
            None => std::env::current_exe()
                .map_err(|e| format!("cannot find this process's binary: {e}"))?,
        };
        let mut child = Command::new(&binary)
            .args(&self.args)
            .arg("--take-over")
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let r = self.talk(&listener, &mut child);
        if r.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        r.map(|(conn, v)| (child, conn, v))
    }

    fn talk(
        &self,
        listener: &ControlListener,
        child: &mut Child,
    ) -> Result<(ControlConn, String), String> {
        let exited = |child: &mut Child| match child.try_wait() {
            Ok(Some(status)) => Some(format!("the new binary exited ({status})")),
            _ => None,
        };
        // Connect back, watching the child so a binary that fails fast is reported at once.
        let end = Instant::now() + CONNECT_WAIT;
        let mut conn = loop {
            if let Some(e) = exited(child) {
                return Err(format!("{e} before it connected back"));
            }
            if Instant::now() >= end {
                return Err(format!(
                    "the new binary did not connect back within {} s",
                    CONNECT_WAIT.as_secs()
                ));
            }
            match listener.accept_timeout(Duration::from_millis(200)) {
                Ok(c) => break c,
                Err(e) if e.is_clean_timeout() => continue,
                Err(e) => return Err(format!("control socket: {e}")),
            }
        };
        let peer = conn
            .handshake(VERSION, STEP_WAIT)
            .map_err(|e| format!("handshake with the new binary: {e}"))?;
        let n = self.fds.device.len();
        let fds: Vec<BorrowedFd<'_>> = self
            .fds
            .device
            .iter()
            .chain(&self.fds.agent)
            .map(|f| f.as_fd())
            .chain([self.fds.admin.as_fd(), self.fds.lock.as_fd()])
            .collect();
        let idx = |i: usize| i as u16;
        let msg = Msg::Listeners {
            shards: n as u16,
            device: (0..n).map(idx).collect(),
            agent: (n..2 * n).map(idx).collect(),
            admin: Some(idx(2 * n)),
            lock: Some(idx(2 * n + 1)),
        };
        conn.send(&msg, &fds)
            .map_err(|e| format!("sending the listeners: {e}"))?;
        match conn.recv(TAKE_WAIT) {
            Ok((Msg::ListenersTaken, _)) => Ok((conn, peer.version)),
            Ok((Msg::Abort { reason }, _)) => Err(format!("the new process refused: {reason}")),
            Ok((other, _)) => Err(format!(
                "the new process answered {} instead of ListenersTaken",
                other.kind()
            )),
            Err(e) => Err(match exited_soon(child) {
                Some(x) => format!("{x} before it took the listeners"),
                None if e.is_clean_timeout() => format!(
                    "the new process did not take the listeners within {} s",
                    TAKE_WAIT.as_secs()
                ),
                None => format!("waiting for the new process: {e}"),
            }),
        }
    }

    /// After `ListenersTaken`: hands the sessions over in committed batches. On failure every
    /// session not yet committed carries on here, this process accepts again, and the error
    /// says what happened.
    fn hand_sessions(
        &self,
        child: &mut Child,
        conn: &mut ControlConn,
    ) -> Result<UpgradeReport, String> {
        let pid = child.id();
        let started = Instant::now();
        self.ctx.draining.store(true, Ordering::Relaxed);
        let (out, goodbyes, silent) = self.gather();
        let n = out.len();
        let mut moved = 0;
        let mut refused = 0;
        let mut pending = out.into_iter();
        for (batch, range) in batch_ranges(n).enumerate() {
            let chunk: Vec<Outgoing> = pending.by_ref().take(range.len()).collect();
            match self.send_batch(conn, batch as u32, &chunk) {
                Ok((taken, no)) => {
                    moved += taken;
                    refused += no;
                }
                Err(reason) => {
                    // Every session not committed carries on here.
                    let rest: Vec<Outgoing> = pending.by_ref().collect();
                    self.resume(chunk.iter().chain(&rest), false);
                    let reason = match exited_soon(child) {
                        Some(x) => format!("{x} mid-handoff ({reason})"),
                        None => reason,
                    };
                    let _ = child.kill();
                    let _ = child.wait();
                    self.ctx.draining.store(false, Ordering::Relaxed);
                    let line = format!(
                        "{reason}; {moved} sessions had moved to pid {pid}, this process keeps \
                         the rest and accepts again"
                    );
                    eprintln!("tether: upgrade: {line}");
                    return Err(line);
                }
            }
        }
        let handoff_ms = started.elapsed().as_millis() as u64;
        eprintln!(
            "tether: upgrade: {moved} sessions handed to pid {pid} live in {handoff_ms} ms \
             ({refused} refused by it, {goodbyes} could not move and were told to reconnect){}",
            if silent.is_empty() {
                String::new()
            } else {
                format!("; shards {silent:?} did not hand out in time")
            }
        );
        Ok(UpgradeReport {
            sessions_handed: moved as u64,
            sessions_refused: refused as u64,
            sessions_told_to_reconnect: goodbyes as u64,
            handoff_ms,
            ..UpgradeReport::default()
        })
    }

    /// After the handoff: wait for the sessions that could not move to leave, then hand over
    /// and stop. If the new process dies meanwhile, accept again and keep what is left.
    fn finish(&self, mut child: Child, mut conn: ControlConn) {
        let pid = child.id();
        // What could not move leaves as its goodbye is written (and reconnects within the
        // window); the grace bounds how long a slow one may hold on.
        let end = Instant::now() + self.ctx.upgrade_window + self.ctx.shutdown_grace;
        let mut batch = u32::MAX / 2;
        let mut late_moved = 0;
        loop {
            // Sessions established since the hand-out (their handshake was under way) follow.
            let late: Vec<Outgoing> = self
                .handed
                .try_iter()
                .filter_map(|h| match h {
                    HandedOut::Session(o) => Some(o),
                    HandedOut::Done { .. } => None,
                })
                .collect();
            for chunk in late.chunks(super::scm::MAX_FDS) {
                batch += 1;
                match self.send_batch(&mut conn, batch, chunk) {
                    Ok((taken, _)) => late_moved += taken,
                    Err(reason) => {
                        self.resume(chunk.iter(), false);
                        eprintln!("tether: upgrade: handing late sessions over: {reason}");
                    }
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                self.ctx.draining.store(false, Ordering::Relaxed);
                self.busy.store(false, Ordering::Release);
                eprintln!(
                    "tether: upgrade: the new process (pid {pid}) exited ({status}) after the \
                     handoff; this process accepts again and keeps its {} sessions",
                    self.live()
                );
                return;
            }
            if self.live() == 0 || Instant::now() >= end {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let left = self.live();
        if late_moved > 0 {
            eprintln!(
                "tether: upgrade: {late_moved} more sessions, established during the handoff, \
                 handed to pid {pid} live"
            );
        }
        let confirmed = conn
            .send(&Msg::Done, &[])
            .map_err(|e| e.to_string())
            .and_then(|()| conn.recv(STEP_WAIT).map_err(|e| e.to_string()));
        match confirmed {
            Ok((Msg::Confirmed, _)) => eprintln!(
                "tether: upgrade complete: pid {pid} serves ({left} sessions were still here \
                 and get Goodbye{{shutdown}}); this process exits"
            ),
            Ok((other, _)) => eprintln!(
                "tether: upgrade: pid {pid} answered {} to Done; it accepts on every listener, \
                 so this process exits anyway",
                other.kind()
            ),
            Err(e) => eprintln!(
                "tether: upgrade: no confirmation from pid {pid} ({e}); it accepts on every \
                 listener, so this process exits anyway"
            ),
        }
        self.ctx.shutdown.store(true, Ordering::Relaxed);
    }

    /// The sessions every shard hands out (each says when it is done), how many could not
    /// move, and the shards that did not say so within 10 s (their sessions stay with them).
    fn gather(&self) -> (Vec<Outgoing>, usize, Vec<usize>) {
        let mut out = Vec::new();
        let mut goodbyes = 0;
        let mut reasons: Vec<(String, usize)> = Vec::new();
        let mut done = vec![false; self.shards.len()];
        let end = Instant::now() + Duration::from_secs(10);
        while done.contains(&false) && Instant::now() < end {
            match self.handed.recv_timeout(Duration::from_millis(100)) {
                Ok(HandedOut::Session(o)) => out.push(o),
                Ok(HandedOut::Done {
                    shard,
                    goodbyes: g,
                    why,
                }) => {
                    done[shard] = true;
                    goodbyes += g;
                    for (r, n) in why {
                        match reasons.iter_mut().find(|(x, _)| *x == r) {
                            Some((_, m)) => *m += n,
                            None => reasons.push((r, n)),
                        }
                    }
                }
                Err(_) => {}
            }
        }
        let silent = (0..done.len()).filter(|&i| !done[i]).collect();
        if !reasons.is_empty() {
            let list: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
            eprintln!(
                "tether: upgrade: sessions that cannot move (told to reconnect): {}",
                list.join(", ")
            );
        }
        (out, goodbyes, silent)
    }

    /// Sends one batch and applies the answer: the taken are committed (their shards forget
    /// them), the refused carry on with a goodbye. An error leaves the batch uncommitted.
    fn send_batch(
        &self,
        conn: &mut ControlConn,
        batch: u32,
        chunk: &[Outgoing],
    ) -> Result<(usize, usize), String> {
        let msg = Msg::Sessions {
            batch,
            entries: chunk
                .iter()
                .map(|o| SessionEntry {
                    device: o.state.device,
                    tls: o.state.tls.clone(),
                    session: o.state.session.clone(),
                    out: o.state.out.clone(),
                    partial: o.state.partial.clone(),
                })
                .collect(),
        };
        // SAFETY: each descriptor belongs to a paused connection that its shard keeps open
        // until this thread sends it `Commit` or `Resume`, which happens only after this send.
        let fds: Vec<BorrowedFd<'_>> = chunk
            .iter()
            .map(|o| unsafe { BorrowedFd::borrow_raw(o.fd) })
            .collect();
        conn.send(&msg, &fds)
            .map_err(|e| format!("sending sessions: {e}"))?;
        let (answer, _) = conn
            .recv(STEP_WAIT)
            .map_err(|e| format!("no answer to session batch {batch}: {e}"))?;
        check_taken(&msg, &answer).map_err(|e| e.to_string())?;
        let Msg::SessionsTaken { taken, refused, .. } = answer else {
            unreachable!("check_taken accepted it");
        };
        let taken: std::collections::HashSet<u64> = taken.into_iter().collect();
        let mut commit: Vec<Vec<(usize, u32)>> = vec![Vec::new(); self.shards.len()];
        let mut back = Vec::new();
        for o in chunk {
            if taken.contains(&o.state.device) {
                commit[o.shard].push(o.conn);
            } else {
                back.push(o);
            }
        }
        for (shard, conns) in commit.into_iter().enumerate() {
            if !conns.is_empty() {
                let _ = self.shards[shard].send(HandoffCmd::Commit(conns));
            }
        }
        for (device, why) in &refused {
            eprintln!("tether: upgrade: the new process refused device {device}: {why}");
        }
        self.resume(back.into_iter(), true);
        Ok((taken.len(), refused.len()))
    }

    /// Tells the shards to carry on with these paused sessions (or say goodbye).
    fn resume<'a>(&self, sessions: impl Iterator<Item = &'a Outgoing>, goodbye: bool) {
        let mut per: Vec<Vec<(usize, u32)>> = vec![Vec::new(); self.shards.len()];
        for o in sessions {
            per[o.shard].push(o.conn);
        }
        for (shard, conns) in per.into_iter().enumerate() {
            if !conns.is_empty() {
                let _ = self.shards[shard].send(HandoffCmd::Resume { conns, goodbye });
            }
        }
    }

    /// Sessions this process still holds (open device connections, every shard).
    fn live(&self) -> u64 {
        (self.totals)().connections_open
    }
}

/// Whether `child` exits within a second (its control socket closing comes first), and how.
fn exited_soon(child: &mut Child) -> Option<String> {
    let end = Instant::now() + Duration::from_secs(1);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(format!("the new binary exited ({status})"));
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The new side: what `--take-over` received from the running process.
pub(crate) struct TakenOver {
    conn: ControlConn,
    /// The old process's pid.
    pub from_pid: u32,
    /// Its device listeners, one per old shard.
    pub device: Vec<OwnedFd>,
    /// Its agent listeners, one per old shard.
    pub agent: Vec<OwnedFd>,
    pub admin: Option<OwnedFd>,
    pub lock: Option<OwnedFd>,
}

/// Connects to the running server's control socket in `data_dir` and receives its listeners.
pub(crate) fn take_over(data_dir: &Path) -> Result<TakenOver, String> {
    let mut conn = ControlConn::connect(data_dir).map_err(|e| {
        format!(
            "--take-over: no server to take over in {}: {e}",
            data_dir.display()
        )
    })?;
    let peer = conn
        .handshake(VERSION, STEP_WAIT)
        .map_err(|e| format!("--take-over: handshake: {e}"))?;
    let (msg, fds) = conn
        .recv(STEP_WAIT)
        .map_err(|e| format!("--take-over: waiting for the listeners: {e}"))?;
    let Msg::Listeners {
        device,
        agent,
        admin,
        lock,
        ..
    } = msg
    else {
        return Err(format!(
            "--take-over: expected the listeners, got {}",
            msg.kind()
        ));
    };
    // `recv` checked that every index names a distinct descriptor of the message.
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut take = |i: u16| fds[usize::from(i)].take().expect("checked by recv");
    Ok(TakenOver {
        device: device.into_iter().map(&mut take).collect(),
        agent: agent.into_iter().map(&mut take).collect(),
        admin: admin.map(&mut take),
        lock: lock.map(&mut take),
        from_pid: peer.pid,
        conn,
    })
}

impl TakenOver {
    /// Every shard accepts: tell the old process, then take its sessions (each to its home
    /// shard through `adopt`) and answer its `Done`, in the background.
    pub(crate) fn taken(mut self, adopt: Adopter) -> Result<(), String> {
        self.conn
            .send(&Msg::ListenersTaken, &[])
            .map_err(|e| format!("--take-over: telling the old process: {e}"))?;
        let from = self.from_pid;
        let mut conn = self.conn;
        std::thread::Builder::new()
            .name("tether-take-over".into())
            .spawn(move || {
                let mut took = 0;
                // The old process drains for its window and grace; wait well past that.
                let end = Instant::now() + Duration::from_secs(600);
                while Instant::now() < end {
                    match conn.recv(Duration::from_secs(1)) {
                        Ok((Msg::Sessions { batch, entries }, fds)) => {
                            test_exit(&format!("batch:{batch}"));
                            let (taken, refused) = adopt.take(entries, fds);
                            took += taken.len();
                            let answer = Msg::SessionsTaken {
                                batch,
                                taken,
                                refused,
                            };
                            if conn.send(&answer, &[]).is_err() {
                                return;
                            }
                        }
                        Ok((Msg::Done, _)) => {
                            let _ = conn.send(&Msg::Confirmed, &[]);
                            eprintln!(
                                "tether: took over from pid {from}: {took} sessions live, it \
                                 has handed over"
                            );
                            return;
                        }
                        Ok(_) => {}
                        Err(e) if e.is_clean_timeout() => {}
                        // The old process is gone (it exits after Done, or died): we serve.
                        Err(_) => return,
                    }
                }
            })
            .map_err(|e| format!("--take-over: thread: {e}"))?;
        Ok(())
    }

    /// This process cannot serve on what it was given: tell the old one (which keeps serving).
    pub(crate) fn refuse(mut self, reason: &str) {
        let _ = self.conn.send(
            &Msg::Abort {
                reason: reason.to_string(),
            },
            &[],
        );
    }
}

/// (New process) where handed-over sessions go: each to its home shard.
pub(crate) struct Adopter {
    /// Each shard's channel.
    pub shards: Vec<Sender<HandoffCmd>>,
    /// The AEADs the TLS state is rebuilt with.
    pub provider: Arc<rustls::crypto::CryptoProvider>,
    /// The open-file limit (soft).
    pub nofile: u64,
}

impl Adopter {
    /// Takes a batch: rebuilds each session and queues it for its home shard, or refuses it
    /// with a reason (the old process keeps it). Refused whole when the sockets would not fit
    /// under the open-file limit.
    fn take(
        &self,
        entries: Vec<SessionEntry>,
        fds: Vec<OwnedFd>,
    ) -> (Vec<u64>, Vec<(u64, String)>) {
        let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        if open + 64 > self.nofile {
            let why = format!(
                "open-file limit: {open} open of {} (raise it, `ulimit -n`)",
                self.nofile
            );
            return (
                Vec::new(),
                entries.iter().map(|e| (e.device, why.clone())).collect(),
            );
        }
        let mut taken = Vec::with_capacity(entries.len());
        let mut refused = Vec::new();
        let now = Instant::now();
        for (e, fd) in entries.into_iter().zip(fds) {
            let device = e.device;
            let state = HandedSession {
                device,
                tls: e.tls,
                session: e.session,
                out: e.out,
                partial: e.partial,
            };
            match rebuild(state, fd, &self.provider, now) {
                Ok((moved, code_version)) => {
                    let home = crate::placement::home_shard(DeviceId(device), self.shards.len());
                    if self.shards[home]
                        .send(HandoffCmd::Adopt(moved, code_version))
                        .is_ok()
                    {
                        taken.push(device);
                    } else {
                        refused.push((device, "its shard is gone".into()));
                    }
                }
                Err(why) => refused.push((device, why)),
            }
        }
        (taken, refused)
    }
}

/// Test-only (debug builds; compiled out of release): the new process dies at `point` of the
/// handoff — `listeners` (holding them, before taking them) or `batch:N` (on receiving session
/// batch N, before answering) — when `TETHER_TEST_UPGRADE_EXIT` names it, as a new binary that
/// crashes mid-handoff would.
///
/// `hang:POINT` makes it hang there instead (for a minute, then exit), as a new binary that
/// stops answering would.
pub(crate) fn test_exit(point: &str) {
    #[cfg(debug_assertions)]
    if let Ok(p) = std::env::var("TETHER_TEST_UPGRADE_EXIT") {
        if p.strip_prefix("hang:") == Some(point) {
            eprintln!("tether: TETHER_TEST_UPGRADE_EXIT: hanging at {point}");
            std::thread::sleep(Duration::from_secs(60));
            std::process::exit(3);
        }
        if p == point {
            eprintln!("tether: TETHER_TEST_UPGRADE_EXIT: exiting at {point}");
            std::process::exit(3);
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}
