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
//! Sessions are not handed over live yet: after `ListenersTaken` the old process tells each
//! of its devices to come back (`Goodbye{upgrade}`, `retry_after` spread over
//! `--upgrade-window-ms`) and closes its agent links; devices and agents reconnect to the
//! same port and reach the new process. If the new process dies during that drain, the old
//! one accepts again and keeps the sessions it still has. When its sessions are gone (or
//! the window and a grace have passed) it sends `Done`, waits for `Confirmed`, and exits.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::control::{ControlConn, ControlListener};
use super::wire::Msg;
use crate::shard::ServerCtx;

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
    /// Sessions this process still holds (open device connections, every shard).
    live: Box<dyn Fn() -> u64 + Send + Sync>,
    busy: AtomicBool,
}

/// Why an upgrade did not happen; the running process keeps serving.
#[derive(Debug)]
pub struct UpgradeRefused(pub String);

impl std::fmt::Display for UpgradeRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Upgrader {
    pub(crate) fn new(
        data_dir: &Path,
        args: Vec<OsString>,
        fds: Handover,
        ctx: Arc<ServerCtx>,
        live: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> Upgrader {
        Upgrader {
            data_dir: data_dir.to_path_buf(),
            args,
            fds,
            ctx,
            live,
            busy: AtomicBool::new(false),
        }
    }

    /// Upgrades to `binary` (this process's own binary if `None`): returns once the new process
    /// accepts on every listener (then this one drains in the background), or says why not.
    pub(crate) fn upgrade(
        self: &Arc<Self>,
        binary: Option<PathBuf>,
        why: &str,
    ) -> Result<String, UpgradeRefused> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(UpgradeRefused(
                "an upgrade is already in progress".to_string(),
            ));
        }
        match self.hand_listeners(binary) {
            Ok((child, conn, peer_version)) => {
                let pid = child.id();
                let live = (self.live)();
                eprintln!(
                    "tether: upgrade ({why}): pid {pid} ({peer_version}) accepts on every \
                     listener; this process stopped accepting and sends its {live} sessions \
                     there (Goodbye{{upgrade}} spread over {} ms)",
                    self.ctx.upgrade_window.as_millis()
                );
                let this = self.clone();
                let spawned = std::thread::Builder::new()
                    .name("tether-upgrade".into())
                    .spawn(move || this.drain(child, conn));
                if let Err(e) = spawned {
                    // Cannot watch the drain: stay the server (the new one shares the ports).
                    self.busy.store(false, Ordering::Release);
                    return Err(UpgradeRefused(format!(
                        "cannot start the drain thread: {e}"
                    )));
                }
                Ok(format!(
                    "upgraded: pid {pid} ({peer_version}) accepts on every listener; this \
                     process (pid {}) sends its {live} sessions there and exits\n",
                    std::process::id()
                ))
            }
            Err(reason) => {
                self.busy.store(false, Ordering::Release);
                eprintln!("tether: upgrade ({why}) refused, this process keeps serving: {reason}");
                Err(UpgradeRefused(reason))
            }
        }
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

    /// After `ListenersTaken`: drain this process's sessions towards the new one, then stop.
    /// If the new process dies meanwhile, accept again and keep what is left.
    fn drain(&self, mut child: Child, mut conn: ControlConn) {
        self.ctx.draining.store(true, Ordering::Relaxed);
        let pid = child.id();
        // Devices leave as their goodbyes are written; the window bounds when they come
        // back, the grace how long a slow one may hold on.
        let end = Instant::now() + self.ctx.upgrade_window + self.ctx.shutdown_grace;
        // Give the shards a tick to see the flag before counting.
        std::thread::sleep(Duration::from_millis(300));
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.ctx.draining.store(false, Ordering::Relaxed);
                self.busy.store(false, Ordering::Release);
                eprintln!(
                    "tether: upgrade: the new process (pid {pid}) exited ({status}) during the \
                     handoff; this process accepts again and keeps its {} sessions",
                    (self.live)()
                );
                return;
            }
            if (self.live)() == 0 || Instant::now() >= end {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let left = (self.live)();
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
    /// Every shard accepts: tell the old process, then answer its `Done` in the background.
    pub(crate) fn taken(mut self) -> Result<(), String> {
        self.conn
            .send(&Msg::ListenersTaken, &[])
            .map_err(|e| format!("--take-over: telling the old process: {e}"))?;
        let from = self.from_pid;
        let mut conn = self.conn;
        std::thread::Builder::new()
            .name("tether-take-over".into())
            .spawn(move || {
                // The old process drains for its window and grace; wait well past that.
                let end = Instant::now() + Duration::from_secs(600);
                while Instant::now() < end {
                    match conn.recv(Duration::from_secs(1)) {
                        Ok((Msg::Done, _)) => {
                            let _ = conn.send(&Msg::Confirmed, &[]);
                            eprintln!("tether: took over from pid {from}: it has handed over");
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
