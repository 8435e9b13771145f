//! `tether serve`: loads the data directory, builds the shared read-only context, starts one
//! pinned glommio executor per shard, the admin endpoint and the signal watcher, and waits.
//! It holds the data directory's lock ([`SERVE_LOCK`]) while it runs: it is the only writer of
//! the device registry then.
//! SIGHUP (like `POST /reload`) reloads the TLS certificates, see [`crate::reload`].

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use tether_protocol::server::ServerConfig;

use crate::admin::{AdminAuth, AdminOptions, AdminResponse, metrics_routes, serve_admin_with};
use crate::codestore::{CodeStore, Deployed};
use crate::deploy::GroupRollout;
use crate::deploy::{RolloutStatus, code_routes, spawn_deployer};
use crate::devices::{Registrar, device_routes};
use crate::fsutil::{FileLock, loose_secret_warning};
use crate::metrics::{Freshness, MetricsSnapshot, ShardMetrics, Slot};
use crate::pki::DevPki;
use crate::registry::{
    ADMIN_TOKEN_FILE, AGENT_TOKEN_FILE, FILE_NAME, LiveRegistry, Registry, SERVE_LOCK, Token,
};
use crate::reload::{Reloader, reload_logged, reload_routes};
pub use crate::shard::TlsState;
use crate::shard::{Budget, GuardConfig, ServerCtx, ShardHandle};
use crate::shard::{ShardListeners, run_shard};
use crate::upgrade::handoff::{Adopter, Handover, TakenOver, UpgradeRefused, Upgrader, take_over};
use tether_net::tls::TlsOptions;

/// Everything `tether serve` can be told.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Where the dev PKI, device registry, secrets and code store live.
    pub data_dir: PathBuf,
    /// Device port.
    pub listen: SocketAddr,
    /// Agent link port.
    pub agent_listen: SocketAddr,
    /// Speak TLS 1.3 on the agent port (required when it is not on loopback).
    pub agent_tls: bool,
    /// Certificate chain and key (PEM) for the agent port; default: the devices' (`cert`, or
    /// the dev certificate).
    pub agent_cert: Option<(PathBuf, PathBuf)>,
    /// Admin (metrics) port.
    pub admin_listen: SocketAddr,
    /// Require the admin token for reads (`GET /metrics`, …) too; `None`: only when the admin
    /// listener is not on loopback. Requests that change state always need it.
    pub admin_auth_reads: Option<bool>,
    /// Number of shards (executors); 0 = one per available core.
    pub shards: usize,
    /// Heartbeat interval told to devices.
    pub heartbeat: Duration,
    /// Most device sessions the process holds.
    pub max_connections: u64,
    /// Most connections between accept and `Hello` per shard (TLS handshake included).
    pub max_handshakes: usize,
    /// Of those, from one source address (per shard).
    pub max_handshakes_per_source: u32,
    /// A connection in flight this long may be shed for a newcomer when the table is full.
    pub shed_handshakes_after: Duration,
    /// Deadline from accept to `Hello` (TLS handshake included).
    pub handshake_timeout: Duration,
    /// Failed proofs a source address may make per minute (per shard) before its new
    /// connections are closed at accept.
    pub auth_failures_per_source: u32,
    /// Failed proofs per device id per minute before an alarm is raised (never a lock-out).
    pub auth_failures_per_device: u32,
    /// Times per minute a device may replace its own live session before it is damped.
    pub replacements_per_device: u32,
    /// Accepted connections per second for the whole process (0 = unlimited); each shard takes
    /// its share (the rate divided by the shard count, rounded up).
    pub accept_rate: u32,
    /// TLS state mode.
    pub tls_state: TlsState,
    /// Detached mode: keep rustls' key schedule so peers may send KeyUpdate.
    pub keep_key_schedule: bool,
    /// Certificate chain and key (PEM); both or neither.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Ask devices for a client certificate from this CA (PEM); a verified one authenticates
    /// the device it names without a proof.
    pub device_ca: Option<PathBuf>,
    /// With `device_ca`: refuse devices without a valid certificate.
    pub require_device_cert: bool,
    /// How long a graceful shutdown may take.
    pub shutdown_grace: Duration,
    /// Most concurrent code transfers per shard; more devices wait in line.
    pub max_transfers: usize,
    /// Largest code blob a deploy may store.
    pub max_code_size: u64,
    /// Messages each shard's channel towards another holds, and each shard's outbox in front
    /// of it holds from producers that can wait (agent sends, device messages); past that
    /// they wait (their socket is not read).
    pub mesh_capacity: usize,
    /// Bytes queued towards one agent before the server pushes back (stops reading the
    /// agent and the devices with messages for it; presence changes become a snapshot).
    pub agent_queue_limit: usize,
    /// Start by taking over the listeners of the server running on `data_dir` (through its
    /// `upgrade.sock`) instead of binding: how `tether upgrade` starts the new binary.
    pub take_over: bool,
    /// When this process is upgraded, the window over which its devices are told to come
    /// back (to the new process).
    pub upgrade_window: Duration,
    /// When this process is upgraded, the longest its shards stop reading devices so that the
    /// agents answer what they were given before the sessions move.
    pub upgrade_quiet: Duration,
    /// The `serve` arguments to start a successor with on `tether upgrade` (this process's
    /// own, without the program name).
    pub args: Vec<std::ffi::OsString>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            data_dir: PathBuf::from("tether-data"),
            listen: "127.0.0.1:7400".parse().expect("literal"),
            agent_listen: "127.0.0.1:7401".parse().expect("literal"),
            agent_tls: false,
            agent_cert: None,
            admin_listen: "127.0.0.1:7402".parse().expect("literal"),
            admin_auth_reads: None,
            shards: 0,
            heartbeat: Duration::from_secs(30),
            max_connections: 19_000,
            max_handshakes: 1024,
            max_handshakes_per_source: 16,
            shed_handshakes_after: Duration::from_millis(250),
            handshake_timeout: Duration::from_secs(5),
            auth_failures_per_source: 10,
            auth_failures_per_device: 10,
            replacements_per_device: 4,
            accept_rate: 0,
            tls_state: TlsState::Detached,
            keep_key_schedule: false,
            cert: None,
            device_ca: None,
            require_device_cert: false,
            shutdown_grace: Duration::from_secs(5),
            max_transfers: 8,
            max_code_size: crate::codestore::DEFAULT_MAX_CODE_SIZE,
            mesh_capacity: 1024,
            agent_queue_limit: crate::shard::AGENT_QUEUE_LIMIT,
            take_over: false,
            upgrade_window: Duration::from_secs(5),
            upgrade_quiet: Duration::from_millis(200),
            args: Vec::new(),
        }
    }
}

/// A start-up failure, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something in the setup failed.
    #[error("{0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> ServeError + '_ {
    move |e| ServeError::Setup(format!("{what}: {e}"))
}

/// Runs the server until SIGTERM/SIGINT, then shuts down gracefully; SIGHUP reloads TLS.
pub fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    // Before any thread starts (the deployer's too), so only the signal thread takes them.
    block_signals();
    check_agent_link(&opts)?;
    std::fs::create_dir_all(&opts.data_dir).map_err(setup("cannot create the data directory"))?;
    // An upgrade's new process: the running server hands over its listeners and its lock.
    let mut taken = if opts.take_over {
        Some(take_over(&opts.data_dir).map_err(ServeError::Setup)?)
    } else {
        None
    };
    if taken.is_some() {
        crate::upgrade::handoff::test_exit("listeners");
    }
    let lock_path = opts.data_dir.join(SERVE_LOCK);
    let lock = match taken.as_mut().and_then(|t| t.lock.take()) {
        Some(fd) => FileLock::from_fd(fd),
        None => FileLock::try_lock(&lock_path)
            .map_err(setup(&format!("cannot lock {}", lock_path.display())))?
            .ok_or_else(|| {
                ServeError::Setup(format!(
                    "another tether server runs on {} (it holds {})",
                    opts.data_dir.display(),
                    lock_path.display()
                ))
            })?,
    };
    let (cert, key) = match &opts.cert {
        Some((c, k)) => (c.clone(), k.clone()),
        None => {
            let pki = DevPki::ensure(&opts.data_dir).map_err(setup("dev certificates"))?;
            if pki.created {
                eprintln!(
                    "tether: generated a dev CA; devices must trust {}",
                    pki.ca_cert.display()
                );
            } else {
                eprintln!("tether: dev CA at {}", pki.ca_cert.display());
            }
            (pki.server_cert, pki.server_key)
        }
    };
    let (mut reloader, tls) = Reloader::new(
        cert.clone(),
        key.clone(),
        TlsOptions {
            secret_extraction: opts.tls_state == TlsState::Detached,
            device_ca: opts.device_ca.clone(),
            require_device_cert: opts.require_device_cert,
            ..TlsOptions::default()
        },
    )
    .map_err(setup("TLS"))?;
    let agent_tls = if opts.agent_tls {
        let (c, k) = match &opts.agent_cert {
            Some((c, k)) => (c, k),
            None => (&cert, &key),
        };
        Some(tether_net::tls::agent_server_config(c, k).map_err(setup("agent TLS"))?)
    } else {
        None
    };
    let registry = Arc::new(load_registry(&opts.data_dir)?);
    let agent_token = Token::agent(&opts.data_dir).map_err(setup("agent token"))?;
    let admin_token = Token::admin(&opts.data_dir).map_err(setup("admin token"))?;
    let store = CodeStore::open(&opts.data_dir, opts.max_code_size).map_err(setup("code store"))?;
    let code_at_start = load_code(&store);
    for w in startup_warnings(&opts) {
        eprintln!("tether: warning: {w}");
    }

    let (soft, _hard) = crate::limits::raise_nofile().map_err(setup("open-file limit"))?;
    crate::limits::check_capacity(
        opts.max_connections + 64,
        &format!("--max-connections {}", opts.max_connections),
    )
    .map_err(|e| ServeError::Setup(e.to_string()))?;

    let nshards = if opts.shards == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.shards
    };
    let heartbeat = opts.heartbeat.max(Duration::from_secs(1));
    // Deploys reach each shard over its own bounded channel, read in its timer tick.
    let (deploy_txs, deploy_rxs): (Vec<_>, Vec<_>) = (0..nshards)
        .map(|_| crossbeam::channel::bounded(16))
        .unzip();
    // Reloaded TLS configs too (built off the shards, by the signal or admin thread).
    let (tls_txs, tls_rxs): (Vec<_>, Vec<_>) =
        (0..nshards).map(|_| crossbeam::channel::bounded(4)).unzip();
    reloader.set_shards(tls_txs);
    let reloader = Arc::new(Mutex::new(reloader));
    // So do registry changes, from the registrar in the admin thread.
    let (registry_txs, registry_rxs): (Vec<_>, Vec<_>) = (0..nshards)
        .map(|_| crossbeam::channel::bounded(64))
        .unzip();
    let (sizes_tx, sizes_rx) = crossbeam::channel::bounded(4096);
    let registrar = Registrar::new(registry.clone(), &opts.data_dir, registry_txs, sizes_tx);
    let group_sizes = LiveRegistry::new(registry.clone()).group_sizes();
    let deployer = spawn_deployer(store, group_sizes, sizes_rx, deploy_txs)
        .map_err(setup("deployer thread"))?;
    let ctx = Arc::new(ServerCtx {
        tls,
        tls_state: opts.tls_state,
        keep_key_schedule: opts.keep_key_schedule,
        session: ServerConfig {
            heartbeat,
            idle_timeout: heartbeat * 5 / 2,
            hello_timeout: opts.handshake_timeout.max(Duration::from_millis(100)),
            ..ServerConfig::default()
        },
        registry,
        agent_token,
        agent_tls,
        max_connections_per_shard: (opts.max_connections as usize).div_ceil(nshards),
        guard: guard_config(&opts),
        accept_rate_per_shard: opts.accept_rate.div_ceil(nshards as u32),
        mesh_capacity: opts.mesh_capacity.max(1),
        agent_queue_limit: opts.agent_queue_limit.max(1),
        shutdown: AtomicBool::new(false),
        shutdown_grace: opts.shutdown_grace,
        draining: AtomicBool::new(false),
        upgrade_window: opts.upgrade_window.max(Duration::from_millis(1)),
        upgrade_quiet: opts.upgrade_quiet,
        took_over: taken.is_some(),
        max_transfers_per_shard: opts.max_transfers.max(1),
        code_at_start,
        deployer: deployer.clone(),
    });

    // Set once the shards serve: `tether upgrade` and SIGUSR2 go through it.
    let upgrader: Arc<OnceLock<Arc<Upgrader>>> = Arc::new(OnceLock::new());
    {
        let ctx = ctx.clone();
        let reloader = reloader.clone();
        let upgrader = upgrader.clone();
        std::thread::Builder::new()
            .name("tether-signals".into())
            .spawn(move || {
                let sig = loop {
                    match wait_signal() {
                        libc::SIGHUP => {
                            let _ = reload_logged(&reloader, "SIGHUP");
                        }
                        libc::SIGUSR2 => match upgrader.get() {
                            // Off this thread: a stop signal must still be heard meanwhile.
                            Some(u) => {
                                let u = u.clone();
                                let _ = std::thread::Builder::new()
                                    .name("tether-upgrade".into())
                                    .spawn(move || {
                                        // Both outcomes are logged by `upgrade`.
                                        let _ = u.upgrade(None, "SIGUSR2");
                                    });
                            }
                            None => eprintln!(
                                "tether: SIGUSR2: upgrade refused: the server is still starting"
                            ),
                        },
                        sig => break sig,
                    }
                };
                eprintln!(
                    "tether: signal {sig}: shutting down (goodbye to every device, then exit)"
                );
                ctx.shutdown.store(true, Ordering::Relaxed);
                // The bound on shutdown, whatever happens in the shards.
                std::thread::sleep(ctx.shutdown_grace + Duration::from_secs(2));
                eprintln!("tether: shutdown took longer than its grace period; exiting now");
                std::process::exit(1);
            })
            .map_err(setup("signal thread"))?;
    }

    // Bound (or taken over) before the shards start, so a taken port fails fast.
    let (listeners, admin) = match &mut taken {
        Some(t) => match taken_listeners(t, nshards, &opts) {
            Ok(l) => l,
            Err(e) => {
                if let Some(t) = taken.take() {
                    t.refuse(&e.to_string());
                }
                return Err(e);
            }
        },
        None => bind_listeners(nshards, &opts)?,
    };
    let handover = Handover {
        device: dup_all(listeners.iter().flat_map(|l| &l.device))?,
        agent: dup_all(listeners.iter().flat_map(|l| &l.agent))?,
        admin: dup(admin.as_fd())?,
        lock: dup(lock.as_fd())?,
    };
    let mesh = MeshBuilder::full(nshards, opts.mesh_capacity.max(1));
    // An upgrade's sessions: out of the shards (old process), and back or in (both).
    let (handed_tx, handed_rx) = crossbeam::channel::unbounded();
    let (handoff_txs, handoff_rxs): (Vec<_>, Vec<_>) = (0..nshards)
        .map(|_| crossbeam::channel::unbounded())
        .unzip();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut metrics_slots = Vec::new();
    let mut rollout_slots = Vec::new();
    let mut executors = Vec::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (id, ((((deploys, registry), tls), listeners), handoff)) in deploy_rxs
        .into_iter()
        .zip(registry_rxs)
        .zip(tls_rxs)
        .zip(listeners)
        .zip(handoff_rxs)
        .enumerate()
    {
        let metrics = Arc::new(Slot::new());
        metrics_slots.push(metrics.clone());
        let rollout = Arc::new(Slot::new());
        rollout_slots.push(rollout.clone());
        let handle = ShardHandle {
            ready: ready_tx.clone(),
            done: done_tx.clone(),
            metrics,
            rollout,
            deploys,
            registry,
            tls,
            handed_out: handed_tx.clone(),
            handoff,
        };
        let ctx = ctx.clone();
        let mesh = mesh.clone();
        let ex = LocalExecutorBuilder::new(Placement::Fixed(id % cpus))
            .name(&format!("tether-shard-{id}"))
            // We do no file DMA: keep glommio's registered I/O memory small.
            .io_memory(512 * 1024)
            .spawn(
                move || async move { run_shard(id, nshards, ctx, mesh, handle, listeners).await },
            )
            .map_err(setup("starting a shard executor"))?;
        executors.push(ex);
    }
    drop(ready_tx);
    drop(done_tx);
    // Each shard reports its setup; a failed or stuck shard ends the start-up at once (the
    // others may be waiting for it in the channel mesh, so they are not joined).
    for ready in 0..nshards {
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(_)) => {}
            Ok(Err(msg)) => return Err(ServeError::Setup(msg)),
            Err(_) => {
                return Err(ServeError::Setup(format!(
                    "only {ready} of {nshards} shards started within 10 s (a glommio executor \
                     may have failed to start: check the locked-memory limit, `ulimit -l`)"
                )));
            }
        }
    }

    // Every shard accepts: the process being upgraded may stop.
    let took_over_from = taken.as_ref().map(|t| t.from_pid);
    if let Some(t) = taken.take() {
        let adopter = Adopter {
            shards: handoff_txs.clone(),
            provider: ctx.tls.crypto_provider().clone(),
            nofile: soft,
        };
        t.taken(adopter).map_err(ServeError::Setup)?;
    }
    let live_slots = metrics_slots.clone();
    let _ = upgrader.set(Arc::new(Upgrader::new(
        &opts.data_dir,
        opts.args.clone(),
        handover,
        ctx.clone(),
        Box::new(move || collect(&live_slots).total),
        handed_rx,
        handoff_txs,
    )));

    let admin_opts = AdminOptions {
        max_body: AdminOptions::default()
            .max_body
            .max(opts.max_code_size as usize + 1),
        auth: Some(AdminAuth {
            token: admin_token,
            reads: opts
                .admin_auth_reads
                .unwrap_or(!opts.admin_listen.ip().is_loopback()),
        }),
        ..AdminOptions::default()
    };
    // Admin requests run on threads of their own; the registrar (one writer of the registry
    // file) takes them one at a time. No shard ever waits on this lock.
    let registrar = Mutex::new(registrar);
    serve_admin_with(admin, admin_opts, move |req| {
        metrics_routes(req, || collect(&metrics_slots))
            .or_else(|| code_routes(req, &deployer, || collect_rollout(&rollout_slots)))
            .or_else(|| {
                device_routes(
                    req,
                    &mut registrar.lock().unwrap_or_else(|p| p.into_inner()),
                )
            })
            .or_else(|| reload_routes(req, &reloader))
            .or_else(|| upgrade_routes(req, &upgrader))
            .unwrap_or_else(|| AdminResponse::not_found(req))
    })
    .map_err(setup("admin endpoint"))?;

    if let Some(pid) = took_over_from {
        eprintln!("tether: took over the listeners of pid {pid} (upgrade)");
    }
    eprintln!(
        "tether: listening for devices on {} ({nshards} shards, {} devices registered, open-file limit {soft}); agents on {} ({}); admin on {}",
        opts.listen,
        ctx.registry.len(),
        opts.agent_listen,
        if opts.agent_tls { "TLS" } else { "plain TCP" },
        opts.admin_listen
    );
    // Each shard reports when its shutdown is complete. The process exits then, without
    // waiting for glommio's executor teardown (which can wait on I/O that will never finish,
    // such as the readiness ring's eventfd read).
    let mut failed = Vec::new();
    for _ in 0..nshards {
        match done_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => failed.push(msg),
            Err(_) => break,
        }
    }
    drop(executors);
    if failed.is_empty() {
        eprintln!("tether: stopped");
        Ok(())
    } else {
        Err(ServeError::Setup(failed.join("; ")))
    }
}

/// Binds one device and one agent listener per shard (`SO_REUSEPORT`) and the admin listener.
fn bind_listeners(
    nshards: usize,
    opts: &ServeOptions,
) -> Result<(Vec<ShardListeners>, std::net::TcpListener), ServeError> {
    tether_net::ring::ensure_no_listener(opts.listen).map_err(setup(&format!(
        "cannot listen on {} (devices): another process listens there (a second `tether \
         serve` would share the port and take part of the devices)",
        opts.listen
    )))?;
    let listeners = (0..nshards)
        .map(|_| bind_shard(opts))
        .collect::<Result<Vec<_>, _>>()?;
    let admin = std::net::TcpListener::bind(opts.admin_listen).map_err(setup(&format!(
        "cannot listen on {} (admin)",
        opts.admin_listen
    )))?;
    Ok((listeners, admin))
}

fn bind_shard(opts: &ServeOptions) -> Result<ShardListeners, ServeError> {
    let bind = |addr: SocketAddr, backlog: i32, what: &str| {
        tether_net::ring::listener(addr, backlog)
            .map_err(setup(&format!("cannot listen on {addr} ({what})")))
    };
    Ok(ShardListeners {
        device: vec![bind(opts.listen, 4096, "devices")?],
        agent: vec![bind(opts.agent_listen, 1024, "agents")?],
    })
}

/// The listeners an upgrade handed over: the same sockets, spread over this process's shards
/// (with more shards than the old process, the rest bind new sockets that join the same
/// `SO_REUSEPORT` group; with fewer, a shard accepts on several, so no socket is closed —
/// closing one would reset the connections queued on it).
fn taken_listeners(
    t: &mut TakenOver,
    nshards: usize,
    opts: &ServeOptions,
) -> Result<(Vec<ShardListeners>, std::net::TcpListener), ServeError> {
    if t.device.is_empty() || t.agent.is_empty() {
        return Err(ServeError::Setup(
            "--take-over: the running server handed over no device or agent listener".into(),
        ));
    }
    let admin = t
        .admin
        .take()
        .map(std::net::TcpListener::from)
        .ok_or_else(|| {
            ServeError::Setup(
                "--take-over: the running server handed over no admin listener".into(),
            )
        })?;
    let mut listeners: Vec<ShardListeners> = (0..nshards)
        .map(|_| ShardListeners {
            device: Vec::new(),
            agent: Vec::new(),
        })
        .collect();
    for (i, fd) in t.device.drain(..).enumerate() {
        listeners[i % nshards].device.push(fd);
    }
    for (i, fd) in t.agent.drain(..).enumerate() {
        listeners[i % nshards].agent.push(fd);
    }
    for l in &mut listeners {
        if l.device.is_empty() || l.agent.is_empty() {
            let fresh = bind_shard(opts)?;
            if l.device.is_empty() {
                l.device = fresh.device;
            }
            if l.agent.is_empty() {
                l.agent = fresh.agent;
            }
        }
    }
    Ok((listeners, admin))
}

/// A copy of a descriptor (the same open socket or file), for the upgrade to hand over.
fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd, ServeError> {
    fd.try_clone_to_owned()
        .map_err(setup("duplicating a listener for upgrades"))
}

fn dup_all<'a, F: AsFd + 'a>(fds: impl Iterator<Item = &'a F>) -> Result<Vec<OwnedFd>, ServeError> {
    fds.map(|f| dup(f.as_fd())).collect()
}

/// `POST /upgrade` (body: the new binary's path, or empty for this binary): upgrades, and
/// answers once the sessions are handed over (200, an `UpgradeReport`) or why not (409 while
/// one is in progress, 500 otherwise; the server keeps serving).
fn upgrade_routes(
    req: &crate::admin::AdminRequest,
    upgrader: &OnceLock<Arc<Upgrader>>,
) -> Option<AdminResponse> {
    if req.path != "/upgrade" {
        return None;
    }
    if req.method != "POST" {
        return Some(AdminResponse::text(405, "/upgrade only answers POST\n"));
    }
    let Some(u) = upgrader.get() else {
        return Some(AdminResponse::text(503, "the server is still starting\n"));
    };
    let binary = match std::str::from_utf8(&req.body) {
        Ok(b) if b.trim().is_empty() => None,
        Ok(b) => Some(PathBuf::from(b.trim())),
        Err(_) => {
            return Some(AdminResponse::text(400, "the binary path must be UTF-8\n"));
        }
    };
    Some(match u.upgrade(binary, "POST /upgrade") {
        Ok(report) => AdminResponse::json(&report),
        Err(e @ UpgradeRefused::Busy) => {
            AdminResponse::text(409, format!("upgrade refused: {e}\n"))
        }
        Err(e) => AdminResponse::text(
            500,
            format!("upgrade refused: {e}; this server keeps serving\n"),
        ),
    })
}

/// Refuses a plain-TCP agent link off loopback: the agent token and every device message would
/// cross the network in clear.
pub fn check_agent_link(opts: &ServeOptions) -> Result<(), ServeError> {
    if opts.agent_cert.is_some() && !opts.agent_tls {
        return Err(ServeError::Setup(
            "--agent-cert/--agent-key are for a TLS agent port: add --agent-tls".into(),
        ));
    }
    if !opts.agent_tls && !opts.agent_listen.ip().is_loopback() {
        return Err(ServeError::Setup(format!(
            "the agent port {} is not on loopback but speaks plain TCP: the agent token and \
             every device message would cross the network in clear; add --agent-tls, or \
             listen on 127.0.0.1",
            opts.agent_listen
        )));
    }
    Ok(())
}

/// The files of the data directory that hold secrets (relative paths), and what each holds;
/// all are written 0600.
pub const SECRET_FILES: [(&str, &str); 6] = [
    (FILE_NAME, "device keys"),
    (
        "secret",
        "the server secret (every device key derives from it)",
    ),
    (AGENT_TOKEN_FILE, "the agent token"),
    (ADMIN_TOKEN_FILE, "the admin token"),
    ("tls/ca.key", "the dev CA's private key"),
    ("tls/server.key", "the server's private key"),
];

/// Files of the data directory (and the `--key` given) that hold secrets, with what each holds:
/// [`SECRET_FILES`], then any other `*.key` or `*.token` in the data directory or its `tls/`.
fn secret_files(opts: &ServeOptions) -> Vec<(PathBuf, String)> {
    let dir = &opts.data_dir;
    let mut files: Vec<(PathBuf, String)> = SECRET_FILES
        .iter()
        .map(|(name, what)| (dir.join(name), *what))
        .chain(
            opts.cert
                .iter()
                .map(|(_, k)| (k.clone(), "the TLS private key")),
        )
        .chain(
            opts.agent_cert
                .iter()
                .map(|(_, k)| (k.clone(), "the agent port's key")),
        )
        .map(|(p, what)| (p, what.to_owned()))
        .collect();
    for sub in [dir.clone(), dir.join("tls")] {
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for path in entries.flatten().map(|e| e.path()) {
            let what = match path.extension().and_then(|e| e.to_str()) {
                Some("key") => "a private key",
                Some("token") => "a token",
                _ => continue,
            };
            if !files.iter().any(|(p, _)| *p == path) {
                files.push((path, what.to_owned()));
            }
        }
    }
    files
}

/// What `tether serve` warns about at start, one line each: a secret's file that group or
/// others may read, the dev CA serving devices off loopback, a plain-HTTP admin port off
/// loopback.
pub fn startup_warnings(opts: &ServeOptions) -> Vec<String> {
    let mut out: Vec<String> = secret_files(opts)
        .iter()
        .filter_map(|(path, what)| loose_secret_warning(path, what))
        .collect();
    if opts.cert.is_none() && !opts.listen.ip().is_loopback() {
        out.push(format!(
            "devices on {} (not loopback) get a certificate from the dev CA in {}: it is made \
             on this host and its key lies beside it; for devices elsewhere use --cert/--key \
             with a certificate from your own CA",
            opts.listen,
            opts.data_dir.join("tls").display()
        ));
    }
    if !opts.admin_listen.ip().is_loopback() {
        out.push(format!(
            "the admin port {} is not on loopback and speaks plain HTTP: the admin token \
             crosses the network in clear; keep it on loopback or a private network",
            opts.admin_listen
        ));
    }
    out
}

fn guard_config(opts: &ServeOptions) -> GuardConfig {
    let minute = Duration::from_secs(60);
    GuardConfig {
        max_handshakes: opts.max_handshakes.max(1),
        per_source: opts.max_handshakes_per_source.max(1),
        shed_after: opts.shed_handshakes_after,
        source_failures: Budget::per(opts.auth_failures_per_source.max(1), minute),
        device_failures: Budget::per(opts.auth_failures_per_device.max(1), minute),
        flaps: Budget::per(opts.replacements_per_device.max(1), minute),
    }
}

fn load_registry(data_dir: &Path) -> Result<Registry, ServeError> {
    let path = data_dir.join(FILE_NAME);
    if !path.exists() {
        eprintln!(
            "tether: no device registry at {}: every device will be refused; provision with `tether devices gen --count N` (before starting) or `tether devices add ID --group G`",
            path.display()
        );
        return Ok(Registry::default());
    }
    Registry::load(&path).map_err(setup("device registry"))
}

/// Each group's current code from the store. A damaged or missing blob is reported and that
/// group serves no code (its devices keep what they run) rather than stopping the server.
fn load_code(store: &CodeStore) -> Vec<Deployed> {
    let mut out = Vec::new();
    for (group, _) in store.groups() {
        match store.load(group) {
            Ok(Some(d)) => {
                eprintln!(
                    "tether: code for group {group}: v{} ({} bytes)",
                    d.version.0,
                    d.blob.len()
                );
                out.push(d);
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("tether: warning: {e}; group {group} gets no code until the next deploy")
            }
        }
    }
    out
}

/// Every shard's latest published rollout state, without asking (or waiting for) any shard:
/// a stuck shard's last state is counted and its entry in `shards` says it is stale.
fn collect_rollout(slots: &[Arc<Slot<Vec<GroupRollout>>>]) -> RolloutStatus {
    let now = std::time::Instant::now();
    let per_shard: Vec<(Vec<GroupRollout>, Freshness)> =
        slots.iter().map(|slot| slot.read(now)).collect();
    RolloutStatus::from_published(per_shard)
}

/// Every shard's latest published counters, without asking (or waiting for) any shard: a
/// stuck shard shows as stale with its last values.
fn collect(slots: &[Arc<Slot<ShardMetrics>>]) -> MetricsSnapshot {
    let now = std::time::Instant::now();
    MetricsSnapshot::from_published(slots.iter().map(|slot| slot.read(now)).collect())
}

/// The signals the signal thread waits for: SIGINT and SIGTERM stop, SIGHUP reloads TLS,
/// SIGUSR2 upgrades (starts this binary anew and hands it the listeners).
fn signal_set() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local signal set, initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        set
    }
}

/// Blocks SIGINT, SIGTERM, SIGHUP and SIGUSR2 in this thread and every thread it starts after, so only
/// the signal thread receives them.
fn block_signals() {
    let set = signal_set();
    // SAFETY: a libc call on an initialised signal set.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn wait_signal() -> i32 {
    let set = signal_set();
    // SAFETY: sigwait reads the initialised set and only writes the signal number into `sig`.
    unsafe {
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::TestDir;
    use std::os::unix::fs::PermissionsExt;

    fn opts(dir: &TestDir) -> ServeOptions {
        ServeOptions {
            data_dir: dir.path().to_owned(),
            ..ServeOptions::default()
        }
    }

    #[test]
    fn every_secret_in_the_data_dir_is_checked() {
        let dir = TestDir::new("serve-secrets");
        Registry::generate(dir.path(), 3, &[], 1).unwrap();
        Token::agent(dir.path()).unwrap();
        Token::admin(dir.path()).unwrap();
        DevPki::ensure(dir.path()).unwrap();
        std::fs::write(dir.path().join("tls/extra.key"), b"k").unwrap();
        let o = opts(&dir);
        let files: Vec<PathBuf> = secret_files(&o).into_iter().map(|(p, _)| p).collect();
        for name in SECRET_FILES
            .map(|(name, _)| name)
            .iter()
            .chain(&["tls/extra.key"])
        {
            assert!(files.contains(&dir.path().join(name)), "{name} not checked");
        }
        // As written, each is the owner's alone: no warning.
        std::fs::set_permissions(
            dir.path().join("tls/extra.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert_eq!(startup_warnings(&o), Vec::<String>::new());
        for name in ["devices.csv", "tls/server.key", "tls/extra.key"] {
            let path = dir.path().join(name);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let w = startup_warnings(&o);
            assert_eq!(w.len(), 1, "{w:?}");
            assert!(
                w[0].starts_with(&format!(
                    "{} is readable by group or others (mode 0644)",
                    path.display()
                )),
                "{w:?}"
            );
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }

    #[test]
    fn a_plain_agent_port_off_loopback_is_refused() {
        let dir = TestDir::new("serve-agent-link");
        let mut o = opts(&dir);
        assert!(check_agent_link(&o).is_ok());
        o.agent_listen = "0.0.0.0:7401".parse().unwrap();
        let e = check_agent_link(&o).unwrap_err().to_string();
        assert_eq!(
            e,
            "the agent port 0.0.0.0:7401 is not on loopback but speaks plain TCP: the agent \
             token and every device message would cross the network in clear; add --agent-tls, \
             or listen on 127.0.0.1"
        );
        o.agent_tls = true;
        assert!(check_agent_link(&o).is_ok());
        o.agent_tls = false;
        o.agent_listen = "127.0.0.1:7401".parse().unwrap();
        o.agent_cert = Some((dir.path().join("a.pem"), dir.path().join("a.key")));
        assert!(check_agent_link(&o).is_err());
    }

    #[test]
    fn dev_ca_off_loopback_and_an_open_admin_port_are_warned_about() {
        let dir = TestDir::new("serve-devca");
        let mut o = opts(&dir);
        assert!(startup_warnings(&o).is_empty());
        o.listen = "0.0.0.0:7400".parse().unwrap();
        let w = startup_warnings(&o);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "devices on 0.0.0.0:7400 (not loopback) get a certificate from the dev CA"
            ),
            "{w:?}"
        );
        assert!(w[0].contains("--cert/--key"), "{w:?}");
        o.cert = Some((dir.path().join("c.pem"), dir.path().join("k.pem")));
        assert!(
            startup_warnings(&o).is_empty(),
            "a real certificate: no warning"
        );
        o.admin_listen = "0.0.0.0:7402".parse().unwrap();
        let w = startup_warnings(&o);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("the admin port 0.0.0.0:7402 is not on loopback"),
            "{w:?}"
        );
    }
}
