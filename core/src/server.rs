//! `tether serve`: loads the data directory, builds the shared read-only context, starts one
//! pinned glommio executor per shard, the admin endpoint and the signal watcher, and waits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use tether_protocol::server::ServerConfig;

use crate::admin::{AdminResponse, metrics_routes, serve_admin};
use crate::metrics::{MetricsSnapshot, ShardMetrics};
use crate::registry::{AgentToken, FILE_NAME, Registry};
use crate::shard::run_shard;
use crate::tls::{DevPki, TlsOptions, server_config};

/// How TLS state is kept after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsState {
    /// rustls' `ServerConnection` for the connection's life (≈ 8 KB each).
    Buffered,
    /// Traffic keys only, record layer on rustls' AEADs (not built yet).
    Detached,
}

/// Everything `tether serve` can be told.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Where the dev PKI, device registry, secrets and code store live.
    pub data_dir: PathBuf,
    /// Device port.
    pub listen: SocketAddr,
    /// Agent link port.
    pub agent_listen: SocketAddr,
    /// Admin (metrics) port.
    pub admin_listen: SocketAddr,
    /// Number of shards (executors); 0 = one per available core.
    pub shards: usize,
    /// Heartbeat interval told to devices.
    pub heartbeat: Duration,
    /// Most device sessions the process holds.
    pub max_connections: u64,
    /// Most TLS handshakes in flight per shard.
    pub max_handshakes: usize,
    /// Accepted connections per second per shard (0 = unlimited).
    pub accept_rate: u32,
    /// TLS state mode.
    pub tls_state: TlsState,
    /// Certificate chain and key (PEM); both or neither.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// How long a graceful shutdown may take.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            data_dir: PathBuf::from("tether-data"),
            listen: "127.0.0.1:7400".parse().expect("literal"),
            agent_listen: "127.0.0.1:7401".parse().expect("literal"),
            admin_listen: "127.0.0.1:7402".parse().expect("literal"),
            shards: 0,
            heartbeat: Duration::from_secs(30),
            max_connections: 19_000,
            max_handshakes: 256,
            accept_rate: 0,
            tls_state: TlsState::Buffered,
            cert: None,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Read-only state every shard shares (no locks: nothing in it changes after start, except
/// the shutdown flag).
pub(crate) struct ServerCtx {
    pub tls: Arc<rustls::ServerConfig>,
    pub session: ServerConfig,
    pub registry: Registry,
    pub agent_token: AgentToken,
    pub listen: SocketAddr,
    pub agent_listen: SocketAddr,
    pub max_connections_per_shard: usize,
    pub max_handshakes_per_shard: usize,
    pub accept_rate_per_shard: u32,
    pub shutdown: AtomicBool,
    pub shutdown_grace: Duration,
}

/// What the main thread holds of each shard.
pub(crate) struct ShardHandle {
    pub ready: std::sync::mpsc::Sender<Result<Option<SocketAddr>, String>>,
    /// Told when the shard's shutdown is complete (or its run failed).
    pub done: std::sync::mpsc::Sender<Result<(), String>>,
    pub stats: crossbeam::channel::Receiver<crossbeam::channel::Sender<ShardMetrics>>,
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

/// Runs the server until SIGTERM/SIGINT, then shuts down gracefully.
pub fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    if opts.tls_state == TlsState::Detached {
        return Err(ServeError::Setup(
            "--tls-state detached is not built yet; use --tls-state buffered (the default)".into(),
        ));
    }
    std::fs::create_dir_all(&opts.data_dir).map_err(setup("cannot create the data directory"))?;
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
    let tls = server_config(
        &cert,
        &key,
        &TlsOptions {
            secret_extraction: opts.tls_state == TlsState::Detached,
            ..TlsOptions::default()
        },
    )
    .map_err(setup("TLS"))?;
    let registry = load_registry(&opts.data_dir)?;
    let agent_token = AgentToken::ensure(&opts.data_dir).map_err(setup("agent token"))?;

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
    let ctx = Arc::new(ServerCtx {
        tls,
        session: ServerConfig {
            heartbeat,
            idle_timeout: heartbeat * 5 / 2,
            ..ServerConfig::default()
        },
        registry,
        agent_token,
        listen: opts.listen,
        agent_listen: opts.agent_listen,
        max_connections_per_shard: (opts.max_connections as usize).div_ceil(nshards),
        max_handshakes_per_shard: opts.max_handshakes.max(1),
        accept_rate_per_shard: opts.accept_rate.div_ceil(nshards as u32),
        shutdown: AtomicBool::new(false),
        shutdown_grace: opts.shutdown_grace,
    });

    block_signals();
    {
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name("tether-signals".into())
            .spawn(move || {
                let sig = wait_signal();
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

    // Bound before the shards start, so a taken port fails fast.
    let admin = std::net::TcpListener::bind(opts.admin_listen).map_err(setup(&format!(
        "cannot listen on {} (admin)",
        opts.admin_listen
    )))?;
    let mesh = MeshBuilder::full(nshards, 1024);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut stats_txs = Vec::new();
    let mut executors = Vec::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for id in 0..nshards {
        let (stats_tx, stats_rx) = crossbeam::channel::bounded(4);
        stats_txs.push(stats_tx);
        let handle = ShardHandle {
            ready: ready_tx.clone(),
            done: done_tx.clone(),
            stats: stats_rx,
        };
        let ctx = ctx.clone();
        let mesh = mesh.clone();
        let ex = LocalExecutorBuilder::new(Placement::Fixed(id % cpus))
            .name(&format!("tether-shard-{id}"))
            // We do no file DMA: keep glommio's registered I/O memory small (DESIGN.md).
            .io_memory(512 * 1024)
            .spawn(move || async move { run_shard(id, nshards, ctx, mesh, handle).await })
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

    serve_admin(admin, move |req| {
        metrics_routes(req, || collect(&stats_txs)).unwrap_or_else(|| AdminResponse::not_found(req))
    })
    .map_err(setup("admin endpoint"))?;

    eprintln!(
        "tether: listening for devices on {} ({nshards} shards, {} devices registered, open-file limit {soft}); agents on {}; admin on {}",
        opts.listen,
        ctx.registry.len(),
        opts.agent_listen,
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

fn load_registry(data_dir: &Path) -> Result<Registry, ServeError> {
    let path = data_dir.join(FILE_NAME);
    if !path.exists() {
        eprintln!(
            "tether: no device registry at {}: every device will be refused; provision with `tether devices gen --count N`",
            path.display()
        );
        return Ok(Registry::default());
    }
    Registry::load(&path).map_err(setup("device registry"))
}

/// Asks every shard for its counters (answered within one timer tick).
fn collect(
    stats: &[crossbeam::channel::Sender<crossbeam::channel::Sender<ShardMetrics>>],
) -> MetricsSnapshot {
    let mut shards = Vec::with_capacity(stats.len());
    for tx in stats {
        let (reply_tx, reply_rx) = crossbeam::channel::bounded(1);
        let m = tx
            .send(reply_tx)
            .ok()
            .and_then(|_| reply_rx.recv_timeout(Duration::from_secs(2)).ok())
            .unwrap_or_default();
        shards.push(m);
    }
    let mut snap = MetricsSnapshot::from_shards(shards);
    snap.rss_bytes = crate::metrics::rss_bytes();
    snap
}

/// Blocks SIGINT and SIGTERM in this thread and every thread it starts after, so only the
/// signal thread receives them.
fn block_signals() {
    // SAFETY: plain libc calls on a local, initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn wait_signal() -> i32 {
    // SAFETY: as above; sigwait only writes the signal number into `sig`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}
