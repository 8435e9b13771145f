//! Worker processes: how many one campaign needs under this host's open-file limit, and which
//! devices and source addresses each one drives.

use std::fmt;
use std::net::Ipv4Addr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Campaign, CampaignError, parse_sources};
use crate::host::HostLimits;

/// Open files a loadgen process needs besides its device sockets: stdio, io_uring rings and
/// eventfds per shard, agent links, report and /proc files. Generous on purpose.
pub const FD_RESERVE: u64 = 100;

/// `workers = 4`, `workers = "auto"` or `workers = ["host:port", …]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workers {
    /// As many processes as the open-file hard limit requires.
    Auto,
    /// Exactly this many processes.
    Count(u32),
    /// Workers already running elsewhere (`loadgen worker --listen ADDR`), one per address.
    Remote(Vec<String>),
}

impl Serialize for Workers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Count(n) => s.serialize_u32(*n),
            Workers::Remote(list) => list.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'a> Visitor<'a> for V {
            type Value = Workers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a number of worker processes, \"auto\", or a list of \"host:port\" of \
                     remote workers",
                )
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Workers, E> {
                u32::try_from(n)
                    .map(Workers::Count)
                    .map_err(|_| E::custom(format!("{n} workers is out of range")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Workers, E> {
                u32::try_from(n)
                    .map(Workers::Count)
                    .map_err(|_| E::custom(format!("{n} workers is out of range")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Workers, E> {
                match s {
                    "auto" => Ok(Workers::Auto),
                    _ => Err(E::invalid_value(de::Unexpected::Str(s), &self)),
                }
            }
            fn visit_seq<A: de::SeqAccess<'a>>(self, mut seq: A) -> Result<Workers, A::Error> {
                let mut list = Vec::new();
                while let Some(addr) = seq.next_element::<String>()? {
                    list.push(addr);
                }
                Ok(Workers::Remote(list))
            }
        }
        d.deserialize_any(V)
    }
}

/// What one worker process drives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerPlan {
    /// 0-based worker index.
    pub index: u32,
    /// Its first device number (its index): it drives devices `first_device`,
    /// `first_device + stride`, … so that every worker ramps at once, each at its share of the
    /// rate.
    pub first_device: u64,
    /// The step between its devices: the number of workers.
    pub stride: u64,
    /// How many devices it drives.
    pub devices: u64,
    /// Source addresses it binds, round-robin over its devices; empty: the kernel picks.
    /// With fewer addresses than workers, every worker binds all of them.
    pub sources: Vec<Ipv4Addr>,
}

impl Campaign {
    /// Open files one process needs to hold `devices` connections (and the attacks' most
    /// open connections: the attacker runs in the first process, and a spawned server holds
    /// both).
    pub fn fds_needed(&self, devices: u64) -> u64 {
        devices + FD_RESERVE + u64::from(self.messages.agents) + self.attack_fds_peak()
    }

    /// Devices one process can hold under an open-file hard limit of `fd_hard`.
    pub fn devices_per_process(&self, fd_hard: u64) -> u64 {
        fd_hard.saturating_sub(self.fds_needed(0))
    }

    /// Worker processes needed: the configured count, or for `auto` the fewest that fit.
    pub fn worker_count(&self, host: &HostLimits) -> Result<u32, CampaignError> {
        let fit = self.devices_per_process(host.fd_hard);
        if fit == 0 {
            return Err(host_err(
                "workers",
                format!(
                    "the open-file hard limit ({}) leaves no room for devices",
                    host.fd_hard
                ),
            ));
        }
        let need = self.devices.div_ceil(fit);
        let n = match &self.workers {
            Workers::Count(n) => u64::from(*n),
            Workers::Auto => need,
            // Remote hosts check their own limits when they take their share.
            Workers::Remote(list) => return Ok(list.len() as u32),
        };
        let per = self.devices.div_ceil(n.max(1));
        if per > fit {
            return Err(host_err(
                "workers",
                format!(
                    "devices = {} over workers = {n} puts {per} devices in one process, which needs \
                     {} open files, but the hard limit here is {}; set workers = \"auto\" ({need} \
                     processes) or raise the limit with tuning/tether-tune (bare metal)",
                    self.devices,
                    self.fds_needed(per),
                    host.fd_hard
                ),
            ));
        }
        u32::try_from(n)
            .map_err(|_| host_err("workers", format!("{n} worker processes is too many")))
    }

    /// Splits devices and source addresses over the worker processes, after checking that the
    /// campaign fits this host: open files per process (loadgen and a spawned server) and
    /// ephemeral ports per source address.
    pub fn plan_workers(&self, host: &HostLimits) -> Result<Vec<WorkerPlan>, CampaignError> {
        let n = self.worker_count(host)?;
        let nodes = u64::from(self.server.nodes.max(1));
        let per_node = self.devices.div_ceil(nodes);
        if self.server.spawn && self.fds_needed(per_node) > host.fd_hard {
            let (what, fix) = if nodes == 1 {
                (
                    "a spawned server holds all".to_owned(),
                    format!(
                        "spawn several nodes (server.nodes = {})",
                        self.devices
                            .div_ceil(self.devices_per_process(host.fd_hard).max(1))
                    ),
                )
            } else {
                (
                    format!("each of {nodes} spawned servers holds up to"),
                    "spawn more nodes".to_owned(),
                )
            };
            return Err(host_err(
                "server.spawn",
                format!(
                    "{what} {per_node} devices in one process, which needs {} open files, but \
                     the hard limit here is {}; {fix}, run against a farm (server.spawn = \
                     false) or use fewer devices",
                    self.fds_needed(per_node),
                    host.fd_hard
                ),
            ));
        }
        let sources =
            parse_sources(&self.source.addresses).map_err(|e| host_err("source.addresses", e))?;
        let stride = u64::from(n.max(1));
        let plans: Vec<WorkerPlan> = split_even(self.devices, stride)
            .enumerate()
            .map(|(i, (_, devices))| WorkerPlan {
                index: i as u32,
                first_device: i as u64,
                stride,
                devices,
                sources: sources_for(&sources, i, n as usize),
            })
            .collect();
        self.check_ports(&plans, sources.len(), host.local_ports)?;
        Ok(plans)
    }

    /// Every source address may carry at most `ports` connections towards the one server address.
    fn check_ports(
        &self,
        plans: &[WorkerPlan],
        n_sources: usize,
        ports: u64,
    ) -> Result<(), CampaignError> {
        let mut load = vec![0u64; n_sources.max(1)];
        let mut all: Vec<Ipv4Addr> = Vec::new();
        for p in plans {
            if p.sources.is_empty() {
                load[0] += p.devices;
                continue;
            }
            for (j, (_, share)) in split_even(p.devices, p.sources.len() as u64).enumerate() {
                let ip = p.sources[j];
                let slot = all.iter().position(|a| *a == ip).unwrap_or_else(|| {
                    all.push(ip);
                    all.len() - 1
                });
                load[slot] += share;
            }
        }
        let worst = load.iter().copied().max().unwrap_or(0);
        if worst > ports {
            let key = "source.addresses";
            let need = self.devices.div_ceil(ports);
            return Err(host_err(
                key,
                format!(
                    "{} devices from {} source address(es) put up to {worst} connections on one \
                     address, but only {ports} ephemeral ports exist per address; list at least \
                     {need} addresses, e.g. \"127.0.1.1-127.0.1.{}\"",
                    self.devices,
                    n_sources.max(1),
                    need.min(254)
                ),
            ));
        }
        Ok(())
    }
}

/// Splits `total` into `parts` contiguous (start, len) pieces whose sizes differ by at most one.
pub(crate) fn split_even(total: u64, parts: u64) -> impl Iterator<Item = (u64, u64)> {
    let parts = parts.max(1);
    let (base, extra) = (total / parts, total % parts);
    (0..parts).map(move |i| (i * base + i.min(extra), base + u64::from(i < extra)))
}

/// Worker `i` of `n`: a contiguous share of the addresses if there are at least `n`; otherwise
/// every worker binds all of them (the kernel hands out each address's ports across processes),
/// which spreads the load evenly over the addresses.
fn sources_for(all: &[Ipv4Addr], i: usize, n: usize) -> Vec<Ipv4Addr> {
    if all.is_empty() {
        return Vec::new();
    }
    if all.len() >= n {
        let (start, len) = split_even(all.len() as u64, n as u64)
            .nth(i)
            .map_or((0, 0), |(s, l)| (s as usize, l as usize));
        all[start..start + len].to_vec()
    } else {
        all.to_vec()
    }
}

fn host_err(key: &str, problem: String) -> CampaignError {
    CampaignError::DoesNotFit {
        key: key.into(),
        problem,
    }
}
