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
    Serve(Box<ServeArgs>),
    /// Manage the device registry (add and revoke devices on a running server, no restart; list
    /// and show them) and device certificates.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Deploy a code blob to a device group (through the admin port, with the admin token):
    /// it becomes the group's next version and rolls out to its connected devices.
    Deploy {
        /// Device group.
        #[arg(long)]
        group: String,
        /// The code blob.
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Code rollout.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Reload the TLS certificate, key and device CA of a running server (through the admin
    /// port; SIGHUP does the same). New connections use the new files, open ones are kept; a
    /// file that does not load is refused and the server keeps its previous configuration.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Upgrade a running server without downtime: it starts the new binary (its own by
    /// default) with its own arguments, hands it the listening sockets (the same sockets: no
    /// connect is refused), then sends its devices there. If the new binary fails to start or
    /// to take the listeners, the running server keeps serving and this says why. SIGUSR2
    /// does the same with the server's own binary.
    Upgrade {
        /// The new binary.
        #[arg(long)]
        binary: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print a running server's counters as a table (from its admin port).
    Stats {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON instead.
        #[arg(long)]
        json: bool,
    },
}

/// How the admin commands reach a server.
#[derive(clap::Args)]
struct AdminArgs {
    /// Admin address of the server.
    #[arg(long, default_value = "127.0.0.1:7402")]
    admin: String,
    /// The server's data directory: the admin token is read from its admin.token.
    #[arg(long, default_value = "tether-data")]
    data_dir: PathBuf,
}

impl AdminArgs {
    fn token(&self) -> Result<String, String> {
        tether_core::admin::read_admin_token(&self.data_dir).map_err(|e| e.to_string())
    }
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Per group: version, and connected devices current / pending / in flight / failed.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
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
    /// Agent link port. Plain TCP with a token by default, so it must be on loopback; off
    /// loopback it needs --agent-tls.
    #[arg(long, default_value = "127.0.0.1:7401")]
    agent_listen: SocketAddr,
    /// Speak TLS 1.3 on the agent port (ALPN tether-agent/1), with the devices' certificate
    /// (--cert/--key, or the dev certificate) unless --agent-cert/--agent-key.
    #[arg(long)]
    agent_tls: bool,
    /// Certificate chain (PEM) for the TLS agent port; with --agent-key and --agent-tls.
    #[arg(long, requires_all = ["agent_key", "agent_tls"])]
    agent_cert: Option<PathBuf>,
    /// Private key (PEM) for the TLS agent port; with --agent-cert.
    #[arg(long, requires = "agent_cert")]
    agent_key: Option<PathBuf>,
    /// Admin port (Prometheus /metrics, /stats.json, POST /deploy). Requests that change state
    /// need `Authorization: Bearer TOKEN` with the token in DATA_DIR/admin.token. Plain HTTP:
    /// keep it on loopback or a private network.
    #[arg(long, default_value = "127.0.0.1:7402")]
    admin_listen: SocketAddr,
    /// Require the admin token for reads (GET /metrics, /stats.json, /rollout.json) too. On by
    /// default when --admin-listen is not on loopback; `--admin-auth-reads=false` turns it off.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    admin_auth_reads: Option<bool>,
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
    /// Of those, most from one source IP address (per shard); more wait, accepted but untouched,
    /// for their address's turn (4,096 per address, then closed).
    #[arg(long, default_value_t = 16)]
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
    /// Accepted connections per second for the whole process, one per connection (0 =
    /// unlimited). Each shard takes its share (the rate divided by the shard count, rounded up)
    /// with a burst of one second's worth; connections past it wait in the kernel's backlog.
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
    /// Device CA (PEM, e.g. from `tether devices ca`): devices may present a client
    /// certificate from it, and one whose certificate's common name is its device id (`CN=42`)
    /// is authenticated without the proof (its Hello must still name that id). Devices without
    /// a certificate keep using the proof. Reloaded with the certificate (SIGHUP, `tether
    /// reload`).
    #[arg(long)]
    device_ca: Option<PathBuf>,
    /// With --device-ca: refuse the TLS handshake of a device without a valid certificate.
    #[arg(long, requires = "device_ca")]
    require_device_cert: bool,
    /// Seconds a graceful shutdown may take.
    #[arg(long, default_value_t = 5)]
    shutdown_grace_s: u64,
    /// When this server is upgraded (`tether upgrade`, SIGUSR2): the window over which its
    /// devices are told to reconnect to the new process (Goodbye{upgrade}, retry_after
    /// spread over it).
    #[arg(long, default_value_t = 5000)]
    upgrade_window_ms: u64,
    /// When this server is upgraded: the longest its shards stop reading devices, before the
    /// sessions move, so that agents answer what they were given (a message in flight to an
    /// agent when its link closes waits for its device's resend, 10 s). 0: no wait.
    #[arg(long, default_value_t = 200)]
    upgrade_quiet_ms: u64,
    /// Take over the listeners of the server running on --data-dir (through its
    /// upgrade.sock) instead of binding them: how `tether upgrade` starts the new binary.
    #[arg(long)]
    take_over: bool,
    /// Most concurrent code transfers per shard; further devices wait in line (FIFO). Fewer
    /// means slower convergence but less message latency during a rollout (measured with
    /// 10,000 devices and 64 KiB on 2 cores: 8 → 2.65 s, round-trip p99 62 ms; 64 → 2.19 s,
    /// p99 238 ms).
    #[arg(long, default_value_t = 8)]
    max_transfers: usize,
    /// Largest code blob a deploy may store, in bytes.
    #[arg(long, default_value_t = tether_core::codestore::DEFAULT_MAX_CODE_SIZE)]
    max_code_size: u64,
    /// Messages between two shards that may wait in the channel, and again in the sending
    /// shard's ordered outbox; past that, an agent's socket (for its sends) or a device's (for
    /// its messages to an agent on another shard) is not read until there is room.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    mesh_capacity: u64,
    /// Bytes queued towards one agent before the server pushes back: the agent's socket and
    /// the devices with messages for it are not read, and presence changes for it are
    /// coalesced into a `PresenceSnapshot`.
    #[arg(long, default_value_t = tether_core::shard::AGENT_QUEUE_LIMIT as u64, value_parser = clap::value_parser!(u64).range(1024..=1 << 32))]
    agent_queue_limit: u64,
}

/// Where a registry command goes (the running server's admin port; with no server answering
/// there, the data directory's files), and how it prints.
#[derive(clap::Args)]
struct Target {
    /// Admin address of the running server.
    #[arg(long, default_value = "127.0.0.1:7402")]
    admin: String,
    /// Data directory (its registry file is read, or edited, when no server answers at
    /// --admin and none holds the directory).
    #[arg(long, default_value = "tether-data")]
    data_dir: PathBuf,
    /// Print JSON instead.
    #[arg(long)]
    json: bool,
}

fn device_id(s: &str) -> Result<u64, String> {
    tether_core::registry::parse_device_id(s).map(|d| d.0)
}

fn group_name(s: &str) -> Result<String, String> {
    if tether_core::registry::valid_group_name(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "bad group name {s:?}: use 1 to 32 of A-Z a-z 0-9 _ -"
        ))
    }
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Create a device CA in CA_DIR (ca.pem, and ca.key with mode 0600), or say where the one
    /// made earlier is. Give ca.pem to `tether serve --device-ca`; keep ca.key off the server.
    Ca {
        /// Directory of the device CA (created with mode 0700).
        #[arg(long)]
        ca_dir: PathBuf,
    },
    /// Issue a device client certificate for device ID from the device CA in CA_DIR:
    /// OUT/device-ID.pem and OUT/device-ID.key (mode 0600), CN=ID. Never overwrites.
    Cert {
        /// Device id.
        id: u64,
        /// Directory of the device CA (`tether devices ca`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where to write the certificate and key (default: CA_DIR).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Provision N devices into DATA_DIR/devices.csv (replacing it; mode 0600); keys derive
    /// from the server secret, so re-running keeps existing devices' keys. Refused while a
    /// server runs on DATA_DIR (use `add` then).
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
    /// Register a device with a fresh random key and print the key (shown only this once).
    /// A running server takes it at once (it may connect when this returns); with no server
    /// running, the registry file is edited directly. An id already registered is refused.
    Add {
        /// Device id (decimal).
        #[arg(value_parser = device_id)]
        id: u64,
        /// Its group (1 to 32 of A-Z a-z 0-9 _ -).
        #[arg(long, value_parser = group_name)]
        group: String,
        #[command(flatten)]
        target: Target,
    },
    /// Revoke a device: its live session is closed with Goodbye{revoked} (within a second),
    /// its unacknowledged agent sends are answered `unknown device`, and further connects are
    /// refused.
    Revoke {
        /// Device id (decimal).
        #[arg(value_parser = device_id)]
        id: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Every registered device: id, group, online.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// One device: group, online, shard, code version, last seen.
    Show {
        /// Device id (decimal).
        #[arg(value_parser = device_id)]
        id: u64,
        #[command(flatten)]
        target: Target,
    },
}

/// Asks the server at `t.admin`; if nothing listens there, does `offline` on the data
/// directory instead (saying so on stderr).
/// Runs `online` against the server at `--admin` (with the admin token from `--data-dir` when
/// it can be read: a server refuses a change without it, and says so), or `offline` on the
/// data directory when no server answers there.
fn via_server<T>(
    t: &Target,
    online: impl FnOnce(&str, Option<&str>) -> Result<T, tether_core::admin::AdminError>,
    offline: impl FnOnce(&std::path::Path) -> Result<T, String>,
) -> Result<T, String> {
    let token = tether_core::admin::read_admin_token(&t.data_dir).ok();
    match online(&t.admin, token.as_deref()) {
        Ok(v) => Ok(v),
        Err(e) if tether_core::devices::no_server(&e) => {
            eprintln!(
                "tether: no server answers at {}; using {}",
                t.admin,
                t.data_dir.display()
            );
            offline(&t.data_dir)
        }
        Err(e) => Err(e.to_string()),
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints a `tether devices` answer: JSON with `--json`, else its text.
fn print_answer<T: serde::Serialize>(json: bool, v: &T, text: impl FnOnce(&T) -> String) {
    if json {
        print_json(v)
    } else {
        print!("{}", text(v))
    }
}

fn devices_command(c: DevicesCommand) -> Result<(), String> {
    use tether_core::devices as d;
    let json = match &c {
        DevicesCommand::Gen { .. } | DevicesCommand::Ca { .. } | DevicesCommand::Cert { .. } => {
            false
        }
        DevicesCommand::Add { target, .. }
        | DevicesCommand::Revoke { target, .. }
        | DevicesCommand::List { target }
        | DevicesCommand::Show { target, .. } => target.json,
    };
    match c {
        DevicesCommand::Ca { ca_dir } => tether_core::pki::DeviceCa::ensure(&ca_dir)
            .map_err(|e| e.to_string())
            .map(|ca| {
                let made = if ca.created { "created" } else { "exists" };
                eprintln!(
                    "tether: device CA {made}: {} (key {}); serve with --device-ca {}",
                    ca.cert.display(),
                    ca.key.display(),
                    ca.cert.display()
                )
            }),
        DevicesCommand::Cert { id, ca_dir, out } => tether_core::pki::DeviceCa::open(&ca_dir)
            .and_then(|ca| {
                ca.issue(
                    tether_protocol::DeviceId(id),
                    out.as_deref().unwrap_or(&ca_dir),
                )
            })
            .map_err(|e| e.to_string())
            .map(|c| {
                eprintln!(
                    "tether: device {id}: certificate {}, key {}",
                    c.cert.display(),
                    c.key.display()
                )
            }),
        DevicesCommand::Gen {
            count,
            groups,
            first_id,
            data_dir,
        } => std::fs::create_dir_all(&data_dir)
            .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))
            .and_then(|_| d::generate_offline(&data_dir, count, &groups, first_id))
            .map(|path| eprintln!("tether: {count} devices written to {}", path.display())),
        DevicesCommand::Add { id, group, target } => via_server(
            &target,
            |a, t| d::add(a, t, id, &group),
            |dir| {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                d::add_offline(dir, id, &group)
            },
        )
        .map(|r| print_answer(json, &r, |r| r.text())),
        DevicesCommand::Revoke { id, target } => via_server(
            &target,
            |a, t| d::revoke(a, t, id),
            |dir| d::revoke_offline(dir, id),
        )
        .map(|r| print_answer(json, &r, |r| r.text())),
        DevicesCommand::List { target } => {
            via_server(&target, |a, t| d::list(a, t), d::list_offline)
                .map(|r| print_answer(json, &r, |r| r.table()))
        }
        DevicesCommand::Show { id, target } => via_server(
            &target,
            |a, t| d::show(a, t, id),
            |dir| d::show_offline(dir, id),
        )
        .map(|r| {
            print_answer(json, &r, |r| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |t| t.as_millis() as u64);
                r.text(now)
            })
        }),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r: Result<(), String> = match cli.command {
        Command::Serve(a) => serve(ServeOptions {
            data_dir: a.data_dir,
            listen: a.listen,
            agent_listen: a.agent_listen,
            agent_tls: a.agent_tls,
            agent_cert: a.agent_cert.zip(a.agent_key),
            admin_listen: a.admin_listen,
            admin_auth_reads: a.admin_auth_reads,
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
            device_ca: a.device_ca,
            require_device_cert: a.require_device_cert,
            shutdown_grace: Duration::from_secs(a.shutdown_grace_s),
            max_transfers: a.max_transfers,
            max_code_size: a.max_code_size,
            mesh_capacity: a.mesh_capacity as usize,
            agent_queue_limit: a.agent_queue_limit as usize,
            take_over: a.take_over,
            upgrade_window: Duration::from_millis(a.upgrade_window_ms),
            upgrade_quiet: Duration::from_millis(a.upgrade_quiet_ms),
            // A successor starts with the same arguments (and `--take-over` of its own).
            args: std::env::args_os()
                .skip(1)
                .filter(|a| a != "--take-over")
                .collect(),
        })
        .map_err(|e| e.to_string()),
        Command::Devices { command } => devices_command(command),
        Command::Upgrade { binary, admin } => upgrade_command(binary, &admin),
        Command::Reload { admin } => admin
            .token()
            .and_then(|t| {
                tether_core::reload::reload(admin.admin.as_str(), Some(&t))
                    .map_err(|e| e.to_string())
            })
            .map(|r| println!("reloaded: {}", r.summary())),
        Command::Deploy { group, .. } if !tether_core::registry::valid_group_name(&group) => Err(
            format!("bad group name {group:?}: use 1 to 32 of A-Z a-z 0-9 _ -"),
        ),
        Command::Deploy { group, file, admin } => std::fs::read(&file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))
            .and_then(|blob| {
                let token = admin.token()?;
                tether_core::deploy::deploy(admin.admin.as_str(), Some(&token), &group, &blob)
                    .map_err(|e| e.to_string())
            })
            .map(|r| println!("{}", r.summary())),
        Command::Rollout {
            command: RolloutCommand::Status { admin, json },
        } => admin
            .token()
            .and_then(|token| {
                tether_core::deploy::fetch_rollout_current(admin.admin.as_str(), Some(&token))
                    .map_err(|e| e.to_string())
            })
            .map(|s| {
                if json {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                } else {
                    print!("{}", s.table());
                }
            }),
        Command::Stats { admin, json } => admin
            .token()
            .and_then(|token| {
                tether_core::admin::fetch_stats_current(admin.admin.as_str(), Some(&token))
                    .map_err(|e| e.to_string())
            })
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

/// `tether upgrade`: asks the running server to upgrade and prints what it did.
fn upgrade_command(binary: Option<PathBuf>, admin: &AdminArgs) -> Result<(), String> {
    let binary = match binary {
        // The server starts it: give it an absolute path.
        Some(b) => {
            Some(std::fs::canonicalize(&b).map_err(|e| format!("--binary {}: {e}", b.display()))?)
        }
        None => None,
    };
    let token = admin.token()?;
    let report =
        tether_core::client::request_upgrade(admin.admin.as_str(), Some(&token), binary.as_deref())
            .map_err(|e| e.to_string())?;
    println!("{}", report.summary());
    Ok(())
}
