//! `tether`: the server's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tether_core::server::{ServeOptions, TlsState, serve};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tether: holds one long-lived TLS connection per device and connects it to its agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded defaults: loopback ports 7400/7401/7402, ./tether-data).
    Serve(ServeArgs),
    /// Manage the device registry.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Deploy a code blob to a device group (through the admin port): it becomes the group's
    /// next version and rolls out to its connected devices.
    Deploy {
        /// Device group.
        #[arg(long)]
        group: String,
        /// The code blob.
        file: PathBuf,
        /// Admin address of the server.
        #[arg(long, default_value = "127.0.0.1:7402")]
        admin: String,
    },
    /// Code rollout.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Print a running server's counters as a table (from its admin port).
    Stats {
        /// Admin address of the server.
        #[arg(long, default_value = "127.0.0.1:7402")]
        admin: String,
        /// Print the raw JSON instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Per group: version, and connected devices current / pending / in flight / failed.
    Status {
        /// Admin address of the server.
        #[arg(long, default_value = "127.0.0.1:7402")]
        admin: String,
        /// Print the raw JSON instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Data directory: dev PKI, device registry, secrets.
    #[arg(long, default_value = "tether-data")]
    data_dir: PathBuf,
    /// Device port. Use 0.0.0.0:7400 to accept devices from other hosts.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Agent link port (plain TCP with a token: keep it on loopback or a private network).
    #[arg(long, default_value = "127.0.0.1:7401")]
    agent_listen: SocketAddr,
    /// Admin port (Prometheus /metrics, /stats.json).
    #[arg(long, default_value = "127.0.0.1:7402")]
    admin_listen: SocketAddr,
    /// Shards (one pinned executor each); 0 = one per available core.
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Heartbeat interval devices are told to keep, in seconds.
    #[arg(long, default_value_t = 30)]
    heartbeat_s: u64,
    /// Most device sessions this process holds (must fit the open-file limit).
    #[arg(long, default_value_t = 19_000)]
    max_connections: u64,
    /// Most connections per shard between accept and a `Hello` (TLS handshake included). When
    /// full, the oldest one in flight longer than --shed-handshakes-after-ms is closed to make
    /// room; if none is that old, newcomers wait in the kernel's backlog.
    #[arg(long, default_value_t = 1024)]
    max_handshakes: usize,
    /// Of those, most from one source IP address (per shard); more are closed at accept.
    #[arg(long, default_value_t = 64)]
    max_handshakes_per_source: u32,
    /// How long a connection must have been in flight before it may be shed for a newcomer.
    #[arg(long, default_value_t = 250)]
    shed_handshakes_after_ms: u64,
    /// Deadline from accept to `Hello` (TLS handshake included), in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    handshake_timeout_ms: u64,
    /// Failed proofs per minute a source address may make (per shard) before its new
    /// connections are closed at accept until the budget refills.
    #[arg(long, default_value_t = 10)]
    auth_failures_per_source: u32,
    /// Failed proofs per minute for one device id before an alarm is counted and logged. The
    /// device's own verified connections are never refused because of them.
    #[arg(long, default_value_t = 10)]
    auth_failures_per_device: u32,
    /// Times per minute a device may replace its own live session; past that a newcomer gets
    /// `Goodbye{flapping}` with a doubling retry_after (1 s to 64 s) and the live one stays.
    #[arg(long, default_value_t = 4)]
    replacements_per_device: u32,
    /// Accepted connections per second for the process (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    accept_rate: u32,
    /// How TLS state is kept after the handshake: `buffered` (rustls' ServerConnection) or
    /// `detached` (traffic keys and sequence numbers only).
    #[arg(long, value_enum, default_value_t = TlsState::Detached)]
    tls_state: TlsState,
    /// Detached mode: keep rustls' key schedule (≈ 0.8 KB per connection) so devices may send
    /// TLS KeyUpdate; without it a KeyUpdate closes the connection (the device resumes).
    #[arg(long)]
    tls_key_updates: bool,
    /// Certificate chain (PEM); with --key. Default: a dev CA and certificate in the data dir.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM); with --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Seconds a graceful shutdown may take.
    #[arg(long, default_value_t = 5)]
    shutdown_grace_s: u64,
    /// Most concurrent code transfers per shard; further devices wait in line (FIFO). Fewer
    /// means slower convergence but less message latency during a rollout (measured with
    /// 10,000 devices and 64 KiB on 2 cores: 8 → 2.65 s, round-trip p99 62 ms; 64 → 2.19 s,
    /// p99 238 ms).
    #[arg(long, default_value_t = 8)]
    max_transfers: usize,
    /// Largest code blob a deploy may store, in bytes.
    #[arg(long, default_value_t = tether_core::codestore::DEFAULT_MAX_CODE_SIZE)]
    max_code_size: u64,
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Provision N devices into DATA_DIR/devices.csv (replacing it); keys derive from the
    /// server secret, so re-running keeps existing devices' keys.
    Gen {
        /// How many devices.
        #[arg(long)]
        count: u64,
        /// Groups, assigned round-robin.
        #[arg(long, value_delimiter = ',', default_value = "default")]
        groups: Vec<String>,
        /// First device id.
        #[arg(long, default_value_t = 1)]
        first_id: u64,
        /// Data directory.
        #[arg(long, default_value = "tether-data")]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r: Result<(), String> = match cli.command {
        Command::Serve(a) => serve(ServeOptions {
            data_dir: a.data_dir,
            listen: a.listen,
            agent_listen: a.agent_listen,
            admin_listen: a.admin_listen,
            shards: a.shards,
            heartbeat: Duration::from_secs(a.heartbeat_s),
            max_connections: a.max_connections,
            max_handshakes: a.max_handshakes,
            max_handshakes_per_source: a.max_handshakes_per_source,
            shed_handshakes_after: Duration::from_millis(a.shed_handshakes_after_ms),
            handshake_timeout: Duration::from_millis(a.handshake_timeout_ms),
            auth_failures_per_source: a.auth_failures_per_source,
            auth_failures_per_device: a.auth_failures_per_device,
            replacements_per_device: a.replacements_per_device,
            accept_rate: a.accept_rate,
            tls_state: a.tls_state,
            keep_key_schedule: a.tls_key_updates,
            cert: a.cert.zip(a.key),
            shutdown_grace: Duration::from_secs(a.shutdown_grace_s),
            max_transfers: a.max_transfers,
            max_code_size: a.max_code_size,
        })
        .map_err(|e| e.to_string()),
        Command::Devices {
            command:
                DevicesCommand::Gen {
                    count,
                    groups,
                    first_id,
                    data_dir,
                },
        } => std::fs::create_dir_all(&data_dir)
            .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))
            .and_then(|_| {
                tether_core::registry::Registry::generate(&data_dir, count, &groups, first_id)
                    .map_err(|e| e.to_string())
            })
            .map(|path| eprintln!("tether: {count} devices written to {}", path.display())),
        Command::Deploy { group, .. } if !tether_core::registry::valid_group_name(&group) => Err(
            format!("bad group name {group:?}: use 1 to 32 of A-Z a-z 0-9 _ -"),
        ),
        Command::Deploy { group, file, admin } => std::fs::read(&file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))
            .and_then(|blob| {
                tether_core::deploy::deploy(admin.as_str(), &group, &blob)
                    .map_err(|e| e.to_string())
            })
            .map(|r| println!("{}", r.summary())),
        Command::Rollout {
            command: RolloutCommand::Status { admin, json },
        } => tether_core::deploy::fetch_rollout(admin.as_str())
            .map_err(|e| e.to_string())
            .map(|s| {
                if json {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                } else {
                    print!("{}", s.table());
                }
            }),
        Command::Stats { admin, json } => tether_core::admin::fetch_stats(admin.as_str())
            .map_err(|e| e.to_string())
            .map(|s| {
                if json {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                } else {
                    tether_core::admin::print_stats_table(&s);
                }
            }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether: error: {e}");
            ExitCode::FAILURE
        }
    }
}
