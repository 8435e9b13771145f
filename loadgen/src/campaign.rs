//! Campaign files: what a load run does, as TOML (see `loadgen/campaigns/` for examples).
//!
//! A campaign is parsed with serde (unknown keys are refused), then [`Campaign::validate`] checks
//! every value and names the key of each problem. Host-dependent checks (open-file limit, ephemeral
//! ports) live in [`Campaign::plan_workers`], which also splits devices and source addresses over
//! worker processes. `--set key=value` overrides go through [`Campaign::apply_override`].
//!
//! Timeline: the run starts with the ramp (`devices / ramp_per_sec` seconds), then holds the
//! steady phase for `duration_s`; every `at_s` (storms, deploys) and `start_s` (attacks) counts
//! from the start of the ramp.

mod attack;
mod sources;
mod workers;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use attack::{
    Attack, AttackKind, DEFAULT_ATTACK_SOURCES, DEFAULT_MAX_OPEN, DEFAULT_OPEN_RATE, MAX_WINDOWS,
};
pub use sources::{SourceAddresses, parse_sources};
pub use workers::{FD_RESERVE, WorkerPlan, Workers};

/// Largest message payload a campaign may ask for (the protocol's frame limit will replace this).
pub const MAX_PAYLOAD_BYTES: u32 = 64 * 1024;
/// Largest code blob a deploy may ask for.
pub const MAX_DEPLOY_BYTES: u64 = 256 * 1024 * 1024;

/// A load campaign. Every field has a default, so a file only states what differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Campaign {
    /// Name shown in progress lines and reports. Default "campaign".
    pub name: String,
    /// Simulated devices, each with one long-lived connection. Default 100.
    pub devices: u64,
    /// Ramp rate in new connections per second, over the whole campaign. Default 1000.
    pub ramp_per_sec: f64,
    /// Seconds of steady phase after the ramp has reached `devices`. Default 10.
    pub duration_s: f64,
    /// Loadgen shards (threads, one per core) per worker process. Default: the cores available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<NonZeroUsize>,
    /// Heartbeat (Ping→Pong) interval each device keeps, in seconds. Default 30.
    pub heartbeat_s: u32,
    /// How a simulated device keeps its TLS state after the handshake. Default `detached`.
    pub tls_state: TlsState,
    /// Use TLS session resumption when a device reconnects (after a storm). Default true.
    pub resume: bool,
    /// Worker processes: a count, or "auto" for as many as the open-file hard limit requires.
    /// Default 1.
    pub workers: Workers,
    /// The server under load.
    pub server: ServerSpec,
    /// Source addresses the devices connect from.
    pub source: SourceSpec,
    /// Message traffic once a device is connected.
    pub messages: Messages,
    /// Reconnect storms: at `at_s`, drop a share of the connections and measure recovery.
    pub storm: Vec<Storm>,
    /// Code deploys to a device group, posted to the admin endpoint during the run.
    pub deploy: Vec<Deploy>,
    /// Zero-downtime upgrades of the server during the run (`tether upgrade`), posted to the
    /// admin endpoint.
    pub upgrade: Vec<Upgrade>,
    /// Hostile clients, each in its time window (see [`Attack`]).
    pub attack: Vec<Attack>,
    /// Abort and timeout limits.
    pub limits: Limits,
}

impl Default for Campaign {
    fn default() -> Self {
        Campaign {
            name: "campaign".into(),
            devices: 100,
            ramp_per_sec: 1000.0,
            duration_s: 10.0,
            shards: None,
            heartbeat_s: 30,
            tls_state: TlsState::Detached,
            resume: true,
            workers: Workers::Count(1),
            server: ServerSpec::default(),
            source: SourceSpec::default(),
            messages: Messages::default(),
            storm: Vec::new(),
            deploy: Vec::new(),
            upgrade: Vec::new(),
            attack: Vec::new(),
            limits: Limits::default(),
        }
    }
}

/// How a device keeps TLS state once the handshake is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsState {
    /// rustls' buffered connection object, kept for life (~7.7 KB per connection).
    Buffered,
    /// Traffic keys and sequence numbers only, after the handshake (~1.4 KB).
    #[default]
    Detached,
}

/// The server under load: spawned by loadgen on loopback (one process or `nodes` independent
/// ones), or already running at `address` (or at each of `addresses`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSpec {
    /// Start `tether serve` on loopback with its embedded defaults and provision the devices.
    pub spawn: bool,
    /// Spawned server processes (spawn only), each an independent node with its own loopback
    /// address and data directory, all provisioned with the same device registry. Node `k`
    /// (from 0) listens on the spawn addresses with `k` added to the last octet; with more than
    /// one node the default base is 127.0.3.1 (ports 7400, 7401, 7402). Default 1.
    pub nodes: u32,
    /// Device listeners of several running servers (not spawned), instead of `address`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<SocketAddr>,
    /// Their agent links, in the same order as `addresses` (needed for agent messages).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agent_addresses: Vec<SocketAddr>,
    /// How each device picks a node when there are several: `"hash"` of its id (default; the
    /// same node every time), `"random"` at every connect (as round-robin DNS would give), or
    /// `"node:K"` (all devices to node K, from 0). A `Goodbye{redirect}` naming another node
    /// sends the device there instead.
    pub pick: Pick,
    /// Device listener. Required unless `spawn`; with `spawn`, where the spawned server listens
    /// (default 127.0.0.1:7400).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    /// Agent link. Required unless `spawn` when agents send or receive messages
    /// (spawn default 127.0.0.1:7401).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_address: Option<SocketAddr>,
    /// Admin/metrics endpoint (spawn default 127.0.0.1:7402).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_address: Option<SocketAddr>,
    /// The agent link speaks TLS (a spawned server gets `--agent-tls`; the simulated agents
    /// connect over TLS, trusting the data directory's `tls/ca.pem`). Default: plain TCP.
    pub agent_tls: bool,
    /// Data directory of a spawned server (default: a fresh temporary directory). Spawn only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Shards of a spawned server (default: its own default). Spawn only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<NonZeroUsize>,
    /// Extra arguments appended to `tether serve`. Spawn only.
    pub extra_args: Vec<String>,
    /// Process id of an already-running server (not spawned), so loadgen can sample its CPU
    /// time and RSS like a spawned one's (`--server-pid` on the command line). Not with spawn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec {
            spawn: false,
            nodes: 1,
            addresses: Vec::new(),
            agent_addresses: Vec::new(),
            pick: Pick::Hash,
            address: None,
            agent_address: None,
            admin_address: None,
            agent_tls: false,
            data_dir: None,
            shards: None,
            extra_args: Vec::new(),
            pid: None,
        }
    }
}

/// How a device picks one of several server nodes (`server.pick`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pick {
    /// A hash of the device id: the same node every time.
    #[default]
    Hash,
    /// A random node at every connect attempt.
    Random,
    /// This node (from 0) for every device.
    Node(u32),
}

impl Serialize for Pick {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Pick::Hash => s.serialize_str("hash"),
            Pick::Random => s.serialize_str("random"),
            Pick::Node(k) => s.serialize_str(&format!("node:{k}")),
        }
    }
}

impl<'de> Deserialize<'de> for Pick {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "hash" => Ok(Pick::Hash),
            "random" => Ok(Pick::Random),
            other => other
                .strip_prefix("node:")
                .and_then(|k| k.parse().ok())
                .map(Pick::Node)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "pick = {other:?}: expected \"hash\", \"random\" or \"node:K\""
                    ))
                }),
        }
    }
}

/// One server node's addresses, as the devices and agents see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAddrs {
    /// Device listener.
    pub device: SocketAddr,
    /// Agent link.
    pub agent: Option<SocketAddr>,
    /// Admin endpoint.
    pub admin: Option<SocketAddr>,
}

impl ServerSpec {
    /// First address of spawned nodes when there are several.
    pub const NODES_BASE: &str = "127.0.3.1";

    /// Every node under load: the spawned ones, `addresses`, or the one `address`.
    pub fn nodes(&self) -> Vec<NodeAddrs> {
        if self.spawn && self.nodes > 1 {
            let base: std::net::IpAddr = self.address.map_or_else(
                || Self::NODES_BASE.parse().expect("constant address"),
                |a| a.ip(),
            );
            let port = |a: Option<SocketAddr>, d: &str| {
                a.map_or_else(|| parse_const(d).port(), |a| a.port())
            };
            return (0..self.nodes)
                .map(|k| {
                    let ip = shift(base, k);
                    NodeAddrs {
                        device: SocketAddr::new(ip, port(self.address, Self::SPAWN_ADDRESS)),
                        agent: Some(SocketAddr::new(
                            ip,
                            port(self.agent_address, Self::SPAWN_AGENT_ADDRESS),
                        )),
                        admin: Some(SocketAddr::new(
                            ip,
                            port(self.admin_address, Self::SPAWN_ADMIN_ADDRESS),
                        )),
                    }
                })
                .collect();
        }
        if !self.addresses.is_empty() {
            return self
                .addresses
                .iter()
                .enumerate()
                .map(|(k, a)| NodeAddrs {
                    device: *a,
                    agent: self.agent_addresses.get(k).copied(),
                    admin: None,
                })
                .collect();
        }
        self.device_address()
            .map(|device| NodeAddrs {
                device,
                agent: self.agent_link_address(),
                admin: self.admin_link_address(),
            })
            .into_iter()
            .collect()
    }

    /// Default device listener of a spawned server.
    pub const SPAWN_ADDRESS: &str = "127.0.0.1:7400";
    /// Default agent link of a spawned server.
    pub const SPAWN_AGENT_ADDRESS: &str = "127.0.0.1:7401";
    /// Default admin endpoint of a spawned server.
    pub const SPAWN_ADMIN_ADDRESS: &str = "127.0.0.1:7402";

    /// The device listener address, with the spawn default filled in.
    pub fn device_address(&self) -> Option<SocketAddr> {
        self.address
            .or_else(|| self.spawn.then(|| parse_const(Self::SPAWN_ADDRESS)))
    }

    /// The admin endpoint address, with the spawn default filled in.
    pub fn admin_link_address(&self) -> Option<SocketAddr> {
        self.admin_address
            .or_else(|| self.spawn.then(|| parse_const(Self::SPAWN_ADMIN_ADDRESS)))
    }

    /// The agent link address, with the spawn default filled in.
    pub fn agent_link_address(&self) -> Option<SocketAddr> {
        self.agent_address
            .or_else(|| self.spawn.then(|| parse_const(Self::SPAWN_AGENT_ADDRESS)))
    }
}

/// `ip` with `k` added to its last octet (IPv4; validation keeps it within the /24).
fn shift(ip: std::net::IpAddr, k: u32) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            let d = u8::try_from(u32::from(d) + k).unwrap_or(u8::MAX);
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d))
        }
        v6 => v6,
    }
}

fn parse_const(s: &str) -> SocketAddr {
    s.parse().expect("constant socket address")
}

/// Source addresses to bind before connecting.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceSpec {
    /// Loopback source addresses (127.0.0.0/8): "127.0.1.1-127.0.1.50", or a list of addresses
    /// and ranges. Each gives ~28k ephemeral ports towards one server address. Empty (default):
    /// the kernel picks the source, so one address's ports.
    pub addresses: SourceAddresses,
}

/// Message traffic per connected device. Rates are per device per second and may be fractional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Messages {
    /// Device→agent messages per device per second. Default 0.
    pub device_to_agent_per_sec: f64,
    /// Agent→device messages per device per second. Default 0.
    pub agent_to_device_per_sec: f64,
    /// Device→agent→device echoes per device per second. Default 0.
    pub round_trip_per_sec: f64,
    /// Payload size of every message in bytes. Default 64.
    pub payload_bytes: u32,
    /// Simulated agents; devices are spread over them. Default 1.
    pub agents: u32,
}

impl Default for Messages {
    fn default() -> Self {
        Messages {
            device_to_agent_per_sec: 0.0,
            agent_to_device_per_sec: 0.0,
            round_trip_per_sec: 0.0,
            payload_bytes: 64,
            agents: 1,
        }
    }
}

impl Messages {
    /// Whether any message needs an agent.
    pub fn uses_agents(&self) -> bool {
        self.device_to_agent_per_sec > 0.0
            || self.agent_to_device_per_sec > 0.0
            || self.round_trip_per_sec > 0.0
    }
}

/// A reconnect storm: at `at_s`, drop `drop_percent` of the connections at once; the report records
/// how long it takes until they are all connected again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storm {
    /// Seconds from the start of the ramp.
    pub at_s: f64,
    /// Share of connected devices to drop, in percent (0 < p ≤ 100).
    pub drop_percent: f64,
}

/// A zero-downtime upgrade of the server (`POST /upgrade`): it starts the new binary, hands
/// it the listeners and every session, and exits; the run carries on against the new process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upgrade {
    /// Seconds from the start of the ramp (whole seconds).
    pub at_s: u64,
    /// The new binary (absolute path); default: the server's own binary, started anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<std::path::PathBuf>,
}

/// A code deploy to a device group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// Seconds from the start of the ramp (whole seconds).
    pub at_s: u64,
    /// Device group that receives the code.
    pub group: String,
    /// Size of the generated code blob in bytes.
    pub size_bytes: u64,
}

/// Abort and timeout limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Abort the campaign once more than this many errors have been counted (0: abort at the
    /// first error). Default: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_errors: Option<u64>,
    /// A connect (TCP + TLS + Hello) that takes longer counts as an error. Default 10,000 ms.
    pub connect_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_errors: None,
            connect_timeout_ms: 10_000,
        }
    }
}

/// One thing wrong with a campaign: the key and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `messages.payload_bytes` or `storm[1].at_s`.
    pub key: String,
    /// What is wrong, in words.
    pub problem: String,
}

/// Why a campaign cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CampaignError {
    /// The file could not be read.
    #[error("cannot read campaign {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key or a value of the wrong type (the message shows the line).
    #[error("campaign {origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
    },
    /// A `--set key=value` override could not be applied.
    #[error("--set {key}={value}: {problem}")]
    Override {
        key: String,
        value: String,
        problem: String,
    },
    /// Values that parse but make no sense; every problem is listed.
    #[error("campaign {origin} is invalid:{}", ProblemList(.problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
    /// A valid campaign that this host cannot run as configured (open files, ports).
    #[error("campaign does not fit this host: {key}: {problem}")]
    DoesNotFit { key: String, problem: String },
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in self.0 {
            write!(f, "\n  {}: {}", p.key, p.problem)?;
        }
        Ok(())
    }
}

impl Campaign {
    /// Reads, parses and validates a campaign file.
    pub fn load(path: &Path) -> Result<Campaign, CampaignError> {
        let text = std::fs::read_to_string(path).map_err(|source| CampaignError::Read {
            path: path.to_owned(),
            source,
        })?;
        Campaign::parse(&text, &path.display().to_string())
    }

    /// Parses and validates campaign text; `origin` names it in errors (a path, or `<inline>`).
    pub fn parse(text: &str, origin: &str) -> Result<Campaign, CampaignError> {
        let campaign: Campaign = toml::from_str(text).map_err(|e| CampaignError::Parse {
            origin: origin.to_owned(),
            source: Box::new(e),
        })?;
        campaign
            .validate()
            .map_err(|problems| CampaignError::Invalid {
                origin: origin.to_owned(),
                problems,
            })?;
        Ok(campaign)
    }

    /// Applies a `--set key=value` override: the campaign is turned back into a TOML table, the
    /// dotted `key` is set to `value` (parsed as a TOML value, or taken as a string if it is not
    /// one; `storm.0.at_s` indexes a list), and the table is deserialised and validated again.
    /// On error the campaign is unchanged.
    pub fn apply_override(&mut self, key: &str, value: &str) -> Result<(), CampaignError> {
        self.apply_overrides(&[(key, value)])
    }

    /// Applies several `key=value` overrides, then validates once: overrides that only make
    /// sense together (`server.spawn=false` with `server.address=…`) can be given together.
    pub fn apply_overrides(&mut self, pairs: &[(&str, &str)]) -> Result<(), CampaignError> {
        let err = |key: &str, value: &str, problem: String| CampaignError::Override {
            key: key.to_owned(),
            value: value.to_owned(),
            problem,
        };
        // Errors about the whole set name every override: `--set a=1 --set b=2: …`.
        let whole = |problem: String| {
            let Some(((last_k, last_v), rest)) = pairs.split_last() else {
                return err("", "", problem);
            };
            let mut key: String = rest
                .iter()
                .map(|(k, v)| format!("{k}={v} --set "))
                .collect();
            key.push_str(last_k);
            err(&key, last_v, problem)
        };
        let mut table = toml::Table::try_from(&*self).map_err(|e| whole(e.to_string()))?;
        for (key, value) in pairs {
            let parsed = value
                .parse::<toml::Value>()
                .unwrap_or_else(|_| toml::Value::String((*value).to_owned()));
            set_dotted(&mut table, key, parsed).map_err(|p| err(key, value, p))?;
        }
        let updated: Campaign = table
            .try_into()
            .map_err(|e| whole(e.message().to_owned()))?;
        updated
            .validate()
            .map_err(|problems| whole(ProblemList(&problems).to_string()))?;
        *self = updated;
        Ok(())
    }

    /// Seconds the ramp takes to reach `devices` at `ramp_per_sec`.
    pub fn ramp_duration_s(&self) -> f64 {
        self.devices as f64 / self.ramp_per_sec
    }

    /// Planned length of the whole campaign: ramp plus steady phase, in seconds.
    pub fn planned_duration_s(&self) -> f64 {
        self.ramp_duration_s() + self.duration_s
    }

    /// Loadgen shards per worker: the configured number or the cores available.
    pub fn effective_shards(&self) -> usize {
        self.shards
            .map_or_else(crate::host::available_cores, NonZeroUsize::get)
    }

    /// Checks every value; returns all problems found, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut p = Problems::default();
        if self.name.trim().is_empty() {
            p.add("name", "must not be empty");
        }
        if self.devices == 0 {
            p.add("devices", "must be at least 1");
        }
        p.positive("ramp_per_sec", self.ramp_per_sec);
        p.non_negative("duration_s", self.duration_s);
        if !(1..=3600).contains(&self.heartbeat_s) {
            p.add(
                "heartbeat_s",
                format!("must be 1..=3600 seconds (got {})", self.heartbeat_s),
            );
        }
        match &self.workers {
            Workers::Count(0) => p.add("workers", "must be at least 1, or \"auto\""),
            Workers::Remote(list) if list.is_empty() => {
                p.add("workers", "an empty list: name at least one \"host:port\"")
            }
            Workers::Remote(list) => {
                for a in list.iter().filter(|a| !a.contains(':')) {
                    p.add("workers", format!("{a:?} is not host:port"));
                }
            }
            _ => {}
        }
        self.validate_server(&mut p);
        if let Err(e) = parse_sources(&self.source.addresses) {
            p.add("source.addresses", e);
        }
        let m = &self.messages;
        p.non_negative(
            "messages.device_to_agent_per_sec",
            m.device_to_agent_per_sec,
        );
        p.non_negative(
            "messages.agent_to_device_per_sec",
            m.agent_to_device_per_sec,
        );
        p.non_negative("messages.round_trip_per_sec", m.round_trip_per_sec);
        if m.payload_bytes > MAX_PAYLOAD_BYTES {
            p.add(
                "messages.payload_bytes",
                format!(
                    "must be at most {MAX_PAYLOAD_BYTES} (got {})",
                    m.payload_bytes
                ),
            );
        }
        if m.agents == 0 && m.uses_agents() {
            p.add(
                "messages.agents",
                "must be at least 1 when any message rate is above 0",
            );
        }
        let end = self.planned_duration_s();
        for (i, s) in self.storm.iter().enumerate() {
            p.within(&format!("storm[{i}].at_s"), s.at_s, end);
            if !(s.drop_percent > 0.0 && s.drop_percent <= 100.0) {
                p.add(
                    format!("storm[{i}].drop_percent"),
                    format!("must be in (0, 100] (got {})", s.drop_percent),
                );
            }
        }
        for (i, d) in self.deploy.iter().enumerate() {
            p.within(&format!("deploy[{i}].at_s"), d.at_s as f64, end);
            if d.group.trim().is_empty() {
                p.add(format!("deploy[{i}].group"), "must not be empty");
            }
            if d.size_bytes == 0 || d.size_bytes > MAX_DEPLOY_BYTES {
                p.add(
                    format!("deploy[{i}].size_bytes"),
                    format!("must be 1..={MAX_DEPLOY_BYTES} (got {})", d.size_bytes),
                );
            }
        }
        for (i, u) in self.upgrade.iter().enumerate() {
            p.within(&format!("upgrade[{i}].at_s"), u.at_s as f64, end);
            if i > 0 && u.at_s <= self.upgrade[i - 1].at_s {
                p.add(
                    format!("upgrade[{i}].at_s"),
                    "must come after the previous upgrade's",
                );
            }
            if u.binary.as_ref().is_some_and(|b| !b.is_absolute()) {
                p.add(format!("upgrade[{i}].binary"), "must be an absolute path");
            }
        }
        self.validate_attacks(&mut p, end);
        if self.limits.connect_timeout_ms == 0 {
            p.add("limits.connect_timeout_ms", "must be at least 1");
        }
        p.finish()
    }

    fn validate_server(&self, p: &mut Problems) {
        let s = &self.server;
        self.validate_nodes(p);
        if !s.spawn {
            if s.address.is_none() && s.addresses.is_empty() {
                p.add("server.address", "required unless server.spawn = true");
            }
            if s.agent_address.is_none() && s.addresses.is_empty() && self.messages.uses_agents() {
                p.add(
                    "server.agent_address",
                    "required for agent messages unless server.spawn = true",
                );
            }
            for (key, set) in [
                ("server.data_dir", s.data_dir.is_some()),
                ("server.shards", s.shards.is_some()),
                ("server.extra_args", !s.extra_args.is_empty()),
            ] {
                if set {
                    p.add(key, "only applies when server.spawn = true");
                }
            }
        }
        if s.spawn && s.pid.is_some() {
            p.add(
                "server.pid",
                "only applies when server.spawn = false (loadgen knows the pid it spawned)",
            );
        }
        // Load must never leave loopback: the sources are loopback, so the server must be too.
        let listed = s
            .addresses
            .iter()
            .map(|a| ("server.addresses", Some(*a)))
            .chain(
                s.agent_addresses
                    .iter()
                    .map(|a| ("server.agent_addresses", Some(*a))),
            );
        for (key, addr) in [
            ("server.address", s.address),
            ("server.agent_address", s.agent_address),
            ("server.admin_address", s.admin_address),
        ]
        .into_iter()
        .chain(listed)
        {
            if let Some(a) = addr.filter(|a| !a.ip().is_loopback()) {
                p.add(
                    key,
                    format!("{a} is not a loopback address; load never leaves loopback"),
                );
            }
        }
    }
}

impl Campaign {
    /// Several nodes: how they are given, how devices pick them, and what runs against them.
    fn validate_nodes(&self, p: &mut Problems) {
        let s = &self.server;
        if s.nodes == 0 {
            p.add("server.nodes", "must be at least 1");
        }
        if s.nodes > 1 && !s.spawn {
            p.add(
                "server.nodes",
                "only applies when server.spawn = true; list running nodes in server.addresses",
            );
        }
        if s.nodes > 1 {
            let base = s.address.map_or(3, |a| match a.ip() {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            });
            if s.address.is_some_and(|a| a.is_ipv6()) {
                p.add("server.address", "several nodes need an IPv4 base address");
            } else if u32::from(base) + s.nodes > 255 {
                p.add(
                    "server.nodes",
                    format!(
                        "{} nodes from a base address ending in .{base} run past .254",
                        s.nodes
                    ),
                );
            }
        }
        if !s.addresses.is_empty() {
            if s.spawn {
                p.add(
                    "server.addresses",
                    "names running servers: only with server.spawn = false (spawn several with \
                     server.nodes)",
                );
            }
            if s.address.is_some() {
                p.add(
                    "server.addresses",
                    "set either server.address or server.addresses, not both",
                );
            }
            if self.messages.uses_agents() && s.agent_addresses.len() != s.addresses.len() {
                p.add(
                    "server.agent_addresses",
                    format!(
                        "agent messages need one agent link per node: {} listed for {} nodes",
                        s.agent_addresses.len(),
                        s.addresses.len()
                    ),
                );
            }
        }
        let n = s.nodes().len().max(1);
        if let Pick::Node(k) = s.pick
            && k as usize >= n
        {
            p.add(
                "server.pick",
                format!(
                    "node:{k} does not exist: there are {n} nodes, 0..={}",
                    n - 1
                ),
            );
        }
        if n > 1 {
            if s.pick == Pick::Random && self.messages.uses_agents() {
                p.add(
                    "server.pick",
                    "\"random\" with agent messages over several independent nodes: an agent \
                     reaches only its own node's devices; use \"hash\" or \"node:K\"",
                );
            }
            if self.messages.uses_agents() && (self.messages.agents as usize) < n {
                p.add(
                    "messages.agents",
                    format!(
                        "{} agents for {n} independent nodes: each node needs its own agent",
                        self.messages.agents
                    ),
                );
            }
            if !self.deploy.is_empty() || !self.upgrade.is_empty() {
                p.add(
                    "server.nodes",
                    "deploy and upgrade steps run against one node; several independent nodes \
                     are not supported for them yet",
                );
            }
        }
    }
}

/// Sets `key` (dotted; a numeric segment after a list indexes it) in `table`, creating missing
/// tables on the way.
fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let segs: Vec<&str> = key.split('.').collect();
    if segs.iter().any(|s| s.trim().is_empty()) {
        return Err("the key has an empty segment".into());
    }
    let mut here = table;
    let mut i = 0;
    loop {
        let seg = segs[i];
        if i + 1 == segs.len() {
            here.insert(seg.to_owned(), value);
            return Ok(());
        }
        let shown = segs[..=i].join(".");
        let slot = here
            .entry(seg)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        here = match slot {
            toml::Value::Table(t) => {
                i += 1;
                t
            }
            toml::Value::Array(items) => {
                let len = items.len();
                let index = segs
                    .get(i + 1)
                    .and_then(|s| s.parse::<usize>().ok())
                    .filter(|_| i + 2 < segs.len())
                    .ok_or_else(|| {
                        format!(
                            "`{shown}` is a list: name a key in one entry, e.g. `{shown}.0.at_s`"
                        )
                    })?;
                match items.get_mut(index) {
                    Some(toml::Value::Table(t)) => {
                        i += 2;
                        t
                    }
                    _ => {
                        return Err(format!(
                            "`{shown}` has {len} entries; there is no entry {index}"
                        ));
                    }
                }
            }
            _ => return Err(format!("`{shown}` is a value, not a table")),
        };
    }
}

/// Collects validation problems.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, problem: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            problem: problem.into(),
        });
    }
    fn positive(&mut self, key: &str, v: f64) {
        if !(v.is_finite() && v > 0.0) {
            self.add(key, format!("must be a number above 0 (got {v})"));
        }
    }
    fn non_negative(&mut self, key: &str, v: f64) {
        if !(v.is_finite() && v >= 0.0) {
            self.add(key, format!("must be a number ≥ 0 (got {v})"));
        }
    }
    fn within(&mut self, key: &str, at: f64, end: f64) {
        if !(at.is_finite() && at >= 0.0 && at < end) {
            self.add(
                key,
                format!("must be within the planned run, 0 ≤ at_s < {end:.1} s (got {at})"),
            );
        }
    }
    fn finish(self) -> Result<(), Vec<Problem>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

#[cfg(test)]
mod tests;
