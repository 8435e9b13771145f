//! A `tether serve` started by loadgen on loopback (`server.spawn = true`): provisions the
//! devices, waits for the `listening` line, and stops it with SIGTERM at the end.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::campaign::Campaign;

/// How long a spawned server may take to print `listening`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// No `tether` binary.
    #[error(
        "no tether binary at {0}: build it with `cargo build --release -p tether-core` \
         (loadgen looks next to its own executable), or pass --tether-bin PATH"
    )]
    NoBinary(PathBuf),
    /// A command failed to start or exited with an error.
    #[error("{what} failed: {detail}")]
    Command {
        /// The command.
        what: String,
        /// What happened.
        detail: String,
    },
    /// `listening` never came.
    #[error("tether serve did not print `listening` within {0:?}; its last output:\n{1}")]
    NotListening(Duration, String),
}

/// The `tether` binary next to the running executable (the same target directory), or the
/// one above it (tests run from `target/<profile>/deps`).
pub fn default_tether_bin() -> PathBuf {
    sibling(&std::env::current_exe().unwrap_or_default(), "tether")
}

/// The binary `name` next to `exe`, or one level up when `exe` runs from `target/<profile>/deps`.
pub fn sibling(exe: &Path, name: &str) -> PathBuf {
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let here = dir.join(name);
    if here.exists() {
        return here;
    }
    match dir.parent() {
        Some(up) if dir.file_name().is_some_and(|n| n == "deps") => up.join(name),
        _ => here,
    }
}

/// Copies node 0's data directory into another node's (the registry, PKI and tokens: every
/// node knows the same devices and shows the same certificate), leaving out its lock and
/// control socket.
fn seed_from(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if kind.is_dir() {
            seed_from(&src, &dst)?;
        } else if kind.is_file() && !name.ends_with(".lock") && !name.ends_with(".sock") {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// A running spawned server.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Whether loadgen made the data directory (and removes it at the end).
    pub temp: bool,
    lines: mpsc::Receiver<String>,
    tail: Vec<String>,
    /// What the server (and its successors) said about upgrades (at most 100 lines).
    upgrade_lines: Vec<String>,
    /// The process an upgrade handed the server to (not our child: the old server started
    /// it); stopped with it.
    successor: Option<u32>,
}

impl ServerProcess {
    /// Starts every node of `c` (`server.nodes`): node 0 is provisioned with the devices, the
    /// others get a copy of its data directory; returns once all of them listen.
    pub fn start_nodes(c: &Campaign, bin: &Path) -> Result<Vec<ServerProcess>, SpawnError> {
        let nodes = c.server.nodes();
        if nodes.len() <= 1 {
            return Ok(vec![ServerProcess::start(c, bin)?]);
        }
        let mut out: Vec<ServerProcess> = Vec::with_capacity(nodes.len());
        for (k, addrs) in nodes.iter().enumerate() {
            let seed = out.first().map(|p| p.data_dir.clone());
            let dir = c
                .server
                .data_dir
                .as_ref()
                .map(|d| d.join(format!("node-{k}")));
            out.push(ServerProcess::start_node(
                c,
                bin,
                addrs,
                dir,
                seed.as_deref(),
            )?);
        }
        Ok(out)
    }

    /// Provisions `c.devices` devices and starts `tether serve`; returns once it listens.
    pub fn start(c: &Campaign, bin: &Path) -> Result<ServerProcess, SpawnError> {
        let s = &c.server;
        let addrs = crate::campaign::NodeAddrs {
            device: s.device_address().unwrap_or_else(|| {
                crate::campaign::ServerSpec::SPAWN_ADDRESS
                    .parse()
                    .expect("constant")
            }),
            agent: s.agent_link_address(),
            admin: s.admin_link_address(),
        };
        ServerProcess::start_node(c, bin, &addrs, s.data_dir.clone(), None)
    }

    /// Starts one node at `addrs` in `data_dir` (default: a fresh temporary directory), its
    /// devices provisioned, or copied from `seed` (another node's data directory).
    fn start_node(
        c: &Campaign,
        bin: &Path,
        addrs: &crate::campaign::NodeAddrs,
        data_dir: Option<PathBuf>,
        seed: Option<&Path>,
    ) -> Result<ServerProcess, SpawnError> {
        if !bin.exists() {
            return Err(SpawnError::NoBinary(bin.to_owned()));
        }
        let (data_dir, temp) = match data_dir {
            Some(d) => (d, false),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let d = std::env::temp_dir()
                    .join(format!("tether-loadgen-{}-{nanos}", std::process::id()));
                (d, true)
            }
        };
        if let Some(seed) = seed {
            seed_from(seed, &data_dir)
                .map_err(|e| cmd_err("copying the device registry", e.to_string()))?;
            return ServerProcess::serve(c, bin, addrs, data_dir, temp);
        }
        let gen_out = Command::new(bin)
            .args(["devices", "gen", "--count"])
            .arg(c.devices.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .output()
            .map_err(|e| cmd_err("tether devices gen", e.to_string()))?;
        if !gen_out.status.success() {
            return Err(cmd_err(
                "tether devices gen",
                String::from_utf8_lossy(&gen_out.stderr).trim().to_owned(),
            ));
        }
        ServerProcess::serve(c, bin, addrs, data_dir, temp)
    }

    /// `tether serve` on a provisioned data directory.
    fn serve(
        c: &Campaign,
        bin: &Path,
        addrs: &crate::campaign::NodeAddrs,
        data_dir: PathBuf,
        temp: bool,
    ) -> Result<ServerProcess, SpawnError> {
        let s = &c.server;
        let addr =
            |a: Option<SocketAddr>, d: &str| a.map_or_else(|| d.to_owned(), |a| a.to_string());
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg(addrs.device.to_string())
            .arg("--agent-listen")
            .arg(addr(
                addrs.agent,
                crate::campaign::ServerSpec::SPAWN_AGENT_ADDRESS,
            ))
            .arg("--admin-listen")
            .arg(addr(
                addrs.admin,
                crate::campaign::ServerSpec::SPAWN_ADMIN_ADDRESS,
            ))
            .arg("--heartbeat-s")
            .arg(c.heartbeat_s.to_string())
            .arg("--tls-state")
            .arg(match c.tls_state {
                crate::campaign::TlsState::Buffered => "buffered",
                crate::campaign::TlsState::Detached => "detached",
            });
        if let Some(n) = s.shards {
            cmd.arg("--shards").arg(n.to_string());
        }
        if s.agent_tls {
            cmd.arg("--agent-tls");
        }
        cmd.args(&s.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| cmd_err("tether serve", e.to_string()))?;
        let (tx, lines) = mpsc::channel();
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            // Ends when the server closes its output (it exits).
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut p = ServerProcess {
            child,
            data_dir,
            temp,
            lines,
            tail: Vec::new(),
            successor: None,
            upgrade_lines: Vec::new(),
        };
        p.wait_listening()?;
        Ok(p)
    }

    fn wait_listening(&mut self) -> Result<(), SpawnError> {
        let deadline = Instant::now() + START_TIMEOUT;
        // Bounded by the deadline.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.stop();
                return Err(SpawnError::NotListening(
                    START_TIMEOUT,
                    self.tail.join("\n"),
                ));
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => {
                    let hit = line.contains("listening");
                    self.keep(line);
                    if hit {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.drain();
                return Err(cmd_err(
                    "tether serve",
                    format!(
                        "exited with {status}; its output:\n{}",
                        self.tail.join("\n")
                    ),
                ));
            }
        }
    }

    fn keep(&mut self, line: String) {
        if line.contains("tether: upgrade") && self.upgrade_lines.len() < 100 {
            self.upgrade_lines.push(line.clone());
        }
        if self.tail.len() >= 20 {
            self.tail.remove(0);
        }
        self.tail.push(line);
    }

    fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.keep(l);
        }
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server said about its upgrades, in order.
    pub fn upgrade_lines(&mut self) -> Vec<String> {
        self.drain();
        self.upgrade_lines.clone()
    }

    /// An upgrade handed the server to process `pid`: [`stop`](Self::stop) stops it too.
    pub fn upgraded_to(&mut self, pid: u32) {
        self.successor = Some(pid);
    }

    /// The last lines the server printed (up to 20).
    pub fn tail(&mut self) -> Vec<String> {
        self.drain();
        self.tail.clone()
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL; removes a temporary data directory. Returns how
    /// it ended.
    pub fn stop(&mut self) -> String {
        let ended = match self.child.try_wait() {
            Ok(Some(s)) => format!("had already exited ({s})"),
            _ => {
                sigterm(self.child.id());
                let deadline = Instant::now() + STOP_TIMEOUT;
                // Bounded by the deadline.
                loop {
                    match self.child.try_wait() {
                        Ok(Some(s)) => break format!("stopped ({s})"),
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        _ => {
                            let _ = self.child.kill();
                            let _ = self.child.wait();
                            break format!("killed: no exit within {STOP_TIMEOUT:?} of SIGTERM");
                        }
                    }
                }
            }
        };
        let ended = match self.successor.take() {
            Some(pid) => format!("{ended}; its successor pid {pid} {}", stop_successor(pid)),
            None => ended,
        };
        self.drain();
        if self.temp {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
        ended
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

fn cmd_err(what: &str, detail: String) -> SpawnError {
    SpawnError::Command {
        what: what.to_owned(),
        detail,
    }
}

/// Stops an upgrade's successor (not our child, so it is watched through `/proc`): SIGTERM,
/// up to 10 s, then SIGKILL. Only a process that is still a `tether` is signalled.
fn stop_successor(pid: u32) -> &'static str {
    let is_tether = || {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            c.split(|&b| b == 0)
                .next()
                .is_some_and(|a| a.ends_with(b"tether"))
        })
    };
    if !is_tether() {
        return "had already exited";
    }
    sigterm(pid);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if !is_tether() {
            return "stopped";
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(pid, libc::SIGKILL);
    "killed: no exit within 10 s of SIGTERM"
}

fn sigterm(pid: u32) {
    signal(pid, libc::SIGTERM);
}

#[allow(unsafe_code)] // reason: libc::kill is the one way to send a signal without a new dependency
fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own child, not yet
    // reaped (we hold its `Child` and have not waited on it), or the successor an upgrade
    // named, checked to be a `tether` just before.
    unsafe {
        libc::kill(pid, sig);
    }
}
