//! `loadgen`: runs Tether load campaigns. See `loadgen run --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether_loadgen::campaign::Campaign;
use tether_loadgen::run::{RunOptions, run};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "loadgen", version, about = "Tether's load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a campaign: simulated devices and agents against a spawned or running server.
    Run {
        /// The campaign file (TOML), e.g. loadgen/campaigns/quickstart.toml.
        campaign: PathBuf,
        /// Override a campaign key, e.g. --set devices=2000 --set messages.payload_bytes=1024.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Write the JSON report here.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// The `tether` binary to spawn (default: next to this executable).
        #[arg(long, value_name = "PATH")]
        tether_bin: Option<PathBuf>,
        /// Data directory of an already-running server (server.spawn = false).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Process id of the running server (server.spawn = false), so its CPU time and RSS are
        /// sampled like a spawned one's; the same as --set server.pid=PID.
        #[arg(long, value_name = "PID")]
        server_pid: Option<u32>,
        /// No progress lines.
        #[arg(long, short)]
        quiet: bool,
        /// Also print one row per server node and worker process.
        #[arg(long)]
        per_process: bool,
    },
    /// Run one share of a campaign for a coordinator (`loadgen run` starts these itself; run
    /// one by hand on another host for `workers = ["host:port", …]`).
    Worker {
        /// Serve coordinators on this TCP address, one run after another, until killed.
        #[arg(long, value_name = "ADDR", conflicts_with = "stdio")]
        listen: Option<std::net::SocketAddr>,
        /// Take one job on stdin and answer on stdout (how `loadgen run` starts local workers);
        /// ends when the job ends or stdin closes.
        #[arg(long)]
        stdio: bool,
    },
}

/// Raises the open-file soft limit to the hard limit: every simulated device is a socket.
#[allow(unsafe_code)] // reason: setrlimit has no safe wrapper in std
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit; raising soft up to hard needs no privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

fn main() -> ExitCode {
    let Cli { cmd } = Cli::parse();
    match cmd {
        Cmd::Run {
            campaign,
            set,
            report,
            tether_bin,
            data_dir,
            server_pid,
            quiet,
            per_process,
        } => {
            raise_nofile();
            let mut c = match Campaign::load(&campaign) {
                Ok(c) => c,
                Err(e) => return fail(&e.to_string()),
            };
            let mut pairs = Vec::with_capacity(set.len());
            for kv in &set {
                let Some((k, v)) = kv.split_once('=') else {
                    return fail(&format!("--set {kv}: expected KEY=VALUE"));
                };
                pairs.push((k.trim(), v.trim()));
            }
            if let Err(e) = c.apply_overrides(&pairs) {
                return fail(&e.to_string());
            }
            if let Some(pid) = server_pid {
                if let Err(e) = c.apply_override("server.pid", &pid.to_string()) {
                    return fail(&e.to_string());
                }
            }
            eprintln!(
                "campaign {}: {} devices, ramp {}/s, {} s steady",
                c.name, c.devices, c.ramp_per_sec, c.duration_s
            );
            let opts = RunOptions {
                tether_bin,
                data_dir,
                progress: !quiet,
            };
            let r = match run(&c, &opts) {
                Ok(r) => r,
                Err(e) => return fail(&e.to_string()),
            };
            println!("\n{}", r.to_table());
            if per_process {
                println!("{}", r.process_table());
            }
            if let Some(path) = report {
                if let Err(e) = std::fs::write(&path, r.to_json()) {
                    return fail(&format!("cannot write {}: {e}", path.display()));
                }
                eprintln!("report written to {}", path.display());
            }
            if r.errors_total > c.limits.max_errors.unwrap_or(u64::MAX) {
                return fail(&format!(
                    "{} errors, more than limits.max_errors",
                    r.errors_total
                ));
            }
            ExitCode::SUCCESS
        }
        Cmd::Worker { listen, stdio } => {
            raise_nofile();
            let result = match (listen, stdio) {
                (Some(addr), _) => tether_loadgen::run::worker::listen(addr),
                (None, true) => {
                    let input = std::io::BufReader::new(std::io::stdin());
                    tether_loadgen::run::worker::serve(input, std::io::stdout().lock())
                }
                (None, false) => Err("say --listen ADDR or --stdio".into()),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("loadgen: {msg}");
    ExitCode::FAILURE
}
