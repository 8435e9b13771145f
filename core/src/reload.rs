//! Certificate, key and CA reload without a restart: SIGHUP, or `POST /reload` on the admin
//! port (and `tether reload`, its client).
//!
//! The new `rustls::ServerConfig` is built on the thread that asked (the signal thread or the
//! admin thread), from the same files as at start: the certificate chain and key (`--cert` /
//! `--key`, or the dev server certificate in the data directory) and the device CA
//! (`--device-ca`). A file that does not load — bad PEM, a key that does not match the
//! certificate, a missing file — is refused with one log line naming the file and the
//! problem, and the previous configuration stays. A good one reaches each shard as an `Arc`
//! over the shard's own bounded channel, read in its 100 ms timer tick (no lock, no pointer
//! shared with a shard); the shard uses it for every handshake it accepts from then on.
//! Connections already open keep what they started with: a buffered or handshaking one holds
//! its own `Arc` of the old config, a detached one no config at all.
//!
//! The session-ticket key is kept across reloads, so devices holding a ticket still resume
//! after a certificate renewal — unless the device CA file changed: a ticket carries the device
//! certificate that was verified when it was issued, so a new key is made and every device
//! does a full handshake against the new device CA.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::channel::Sender;
use rustls::server::ProducesTickets;
use serde::{Deserialize, Serialize};

use crate::admin::{AdminError, AdminRequest, AdminResponse, admin_json};
use tether_net::tls::{TlsError, TlsOptions, new_ticketer, server_config};

/// How long a reload waits for every shard to take the new config (a tick is 100 ms).
const APPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// A new TLS config for one shard; the shard answers on `applied` once it uses it.
pub(crate) struct TlsSwap {
    pub config: Arc<rustls::ServerConfig>,
    pub applied: Sender<()>,
}

/// What a reload loaded, as `POST /reload` answers it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReloadReport {
    /// The certificate chain file.
    pub cert: String,
    /// The private key file.
    pub key: String,
    /// The device CA file, if devices may present certificates.
    pub device_ca: Option<String>,
    /// True if the session-ticket key was replaced (the device CA changed).
    pub new_ticket_key: bool,
    /// Shards now using the new configuration.
    pub shards: usize,
}

impl ReloadReport {
    /// One line for a person.
    pub fn summary(&self) -> String {
        let ca = match &self.device_ca {
            Some(ca) => format!(", device CA {ca}"),
            None => String::new(),
        };
        let tickets = if self.new_ticket_key {
            "new session-ticket key (the device CA changed)"
        } else {
            "session-ticket key kept"
        };
        format!(
            "certificate {}, key {}{ca}; {tickets}; {} shards use it for new connections",
            self.cert, self.key, self.shards
        )
    }
}

/// Why a reload did not (fully) happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    /// A file did not load; nothing changed.
    #[error("{0}")]
    Refused(#[from] TlsError),
    /// The config is good but not every shard confirmed it in time (shutting down, or stuck).
    #[error(
        "only {applied} of {shards} shards took the new configuration within {}s",
        APPLY_TIMEOUT.as_secs()
    )]
    Shards { applied: usize, shards: usize },
}

/// Builds the server's TLS config from its files, at start and at every reload.
pub(crate) struct Reloader {
    cert: PathBuf,
    key: PathBuf,
    opts: TlsOptions,
    /// The device CA file's bytes when last loaded.
    device_ca: Option<Vec<u8>>,
    shards: Vec<Sender<TlsSwap>>,
}

impl Reloader {
    /// Loads the config the server starts with (the same checks as a reload).
    pub fn new(
        cert: PathBuf,
        key: PathBuf,
        opts: TlsOptions,
    ) -> Result<(Reloader, Arc<rustls::ServerConfig>), TlsError> {
        let mut r = Reloader {
            cert,
            key,
            opts,
            device_ca: None,
            shards: Vec::new(),
        };
        let (config, _) = r.build()?;
        Ok((r, config))
    }

    /// The shards' channels, in shard order.
    pub fn set_shards(&mut self, shards: Vec<Sender<TlsSwap>>) {
        self.shards = shards;
    }

    /// A config from the files as they are now; on success it becomes the current one and
    /// the second value says whether the ticket key is new.
    fn build(&mut self) -> Result<(Arc<rustls::ServerConfig>, bool), TlsError> {
        let ca_bytes = match &self.opts.device_ca {
            Some(path) => Some(read_device_ca(path)?),
            None => None,
        };
        let new_key = self.opts.ticketer.is_none() || ca_bytes != self.device_ca;
        let ticketer: Arc<dyn ProducesTickets> = match &self.opts.ticketer {
            Some(t) if !new_key => t.clone(),
            _ => new_ticketer()?,
        };
        let opts = TlsOptions {
            ticketer: Some(ticketer),
            ..self.opts.clone()
        };
        let config = server_config(&self.cert, &self.key, &opts)?;
        self.opts = opts;
        self.device_ca = ca_bytes;
        Ok((config, new_key))
    }

    /// Builds a new config and hands it to every shard, waiting until each uses it.
    fn reload(&mut self) -> Result<ReloadReport, ReloadError> {
        let (config, new_ticket_key) = self.build()?;
        let (applied_tx, applied_rx) = crossbeam::channel::bounded(self.shards.len());
        let deadline = Instant::now() + APPLY_TIMEOUT;
        for tx in &self.shards {
            let swap = TlsSwap {
                config: config.clone(),
                applied: applied_tx.clone(),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            // A shard that is gone or stuck shows up as a missing confirmation below.
            let _ = tx.send_timeout(swap, left);
        }
        drop(applied_tx);
        let mut applied = 0;
        while applied < self.shards.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if applied_rx.recv_timeout(left).is_err() {
                break;
            }
            applied += 1;
        }
        if applied < self.shards.len() {
            return Err(ReloadError::Shards {
                applied,
                shards: self.shards.len(),
            });
        }
        Ok(ReloadReport {
            cert: self.cert.display().to_string(),
            key: self.key.display().to_string(),
            device_ca: self
                .opts
                .device_ca
                .as_ref()
                .map(|p| p.display().to_string()),
            new_ticket_key,
            shards: applied,
        })
    }
}

fn read_device_ca(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what: "device CA certificate",
        path: path.to_owned(),
        source,
    })
}

/// Reloads and says what happened in one log line; `why` names who asked.
pub(crate) fn reload_logged(
    reloader: &Mutex<Reloader>,
    why: &str,
) -> Result<ReloadReport, ReloadError> {
    // Only the signal and admin threads take this lock, never a shard.
    let mut r = reloader.lock().unwrap_or_else(|p| p.into_inner());
    let result = r.reload();
    match &result {
        Ok(report) => eprintln!("tether: TLS reloaded ({why}): {}", report.summary()),
        Err(e @ ReloadError::Refused(_)) => {
            eprintln!("tether: TLS reload ({why}) refused: {e}; keeping the previous configuration")
        }
        Err(e) => eprintln!("tether: TLS reload ({why}): {e}"),
    }
    result
}

/// `POST /reload`: 200 with the [`ReloadReport`]; 500 with the reason if a file was refused
/// (nothing changed); 503 if not every shard confirmed in time. `None` for other paths.
pub(crate) fn reload_routes(
    req: &AdminRequest,
    reloader: &Mutex<Reloader>,
) -> Option<AdminResponse> {
    if req.path != "/reload" {
        return None;
    }
    if req.method != "POST" {
        return Some(AdminResponse::text(405, "/reload only answers POST\n"));
    }
    Some(match reload_logged(reloader, "POST /reload") {
        Ok(report) => AdminResponse::json(&report),
        Err(e @ ReloadError::Refused(_)) => AdminResponse::text(
            500,
            format!("reload refused: {e}; the previous configuration stays\n"),
        ),
        Err(e) => AdminResponse::text(503, format!("{e}\n")),
    })
}

/// `tether reload`: asks the server at `addr` to reload its certificates.
pub fn reload(
    addr: impl ToSocketAddrs + std::fmt::Display,
    token: Option<&str>,
) -> Result<ReloadReport, AdminError> {
    admin_json(addr, token, "POST", "/reload", b"")
}
