//! Deploys: the deployer thread that owns the [`CodeStore`] and tells every shard of a new
//! version, the admin routes (`POST /deploy?group=G`, `GET /rollout.json`), and the clients
//! behind `tether deploy` and `tether rollout status`.
//!
//! One thread owns the store so that versions stay monotonic without a lock shared with the
//! shards, and so that the fsyncs of a deploy never stall a shard: the admin thread and the
//! agent link send it requests over a bounded channel; it writes the store, then sends each
//! shard a [`Deployed`] over that shard's own bounded channel (read in its timer tick), and
//! answers the requester.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::ToSocketAddrs;
use std::time::Duration;

use bytes::Bytes;
use crossbeam::channel::{Receiver, Sender, bounded};
use serde::{Deserialize, Serialize};

use crate::admin::{AdminError, AdminRequest, AdminResponse, admin_json, until_current};
use crate::codestore::{CodeStore, CodeStoreError, Deployed};
use crate::devices::{GroupDelta, apply_deltas};
use crate::metrics::{Freshness, not_answering_lines};

/// How long a requester waits for the deployer (a deploy is a few fsyncs).
pub const DEPLOY_TIMEOUT: Duration = Duration::from_secs(30);

/// A deploy asked of the deployer thread.
pub(crate) struct DeployRequest {
    pub group: String,
    pub blob: Bytes,
    pub reply: Sender<Result<DeployReport, CodeStoreError>>,
}

/// The outcome of a deploy, as `POST /deploy` answers it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeployReport {
    pub group: String,
    pub version: u64,
    pub digest: String,
    pub size: u64,
    /// The blob was already the group's current code: nothing changed.
    pub unchanged: bool,
    /// Devices of the group in the registry.
    pub devices: u64,
}

impl DeployReport {
    /// One line for a person.
    pub fn summary(&self) -> String {
        let mut s = if self.unchanged {
            format!(
                "group {}: already at v{} ({} bytes, sha256 {}); nothing to roll out",
                self.group, self.version, self.size, self.digest
            )
        } else {
            format!(
                "group {}: deployed v{} ({} bytes, sha256 {}); rolling out to {} registered devices",
                self.group, self.version, self.size, self.digest, self.devices
            )
        };
        if self.devices == 0 {
            s.push_str(
                " (no registered device is in this group yet: devices added to it get it when \
                 they connect)",
            );
        }
        s
    }
}

/// Starts the deployer thread. `shards[i]` reaches shard `i`'s timer tick; `sizes` brings the
/// registry's changes to the group sizes it reports.
pub(crate) fn spawn_deployer(
    mut store: CodeStore,
    mut registry_groups: BTreeMap<String, u64>,
    sizes: Receiver<GroupDelta>,
    shards: Vec<Sender<Deployed>>,
) -> std::io::Result<Sender<DeployRequest>> {
    let (tx, rx): (Sender<DeployRequest>, Receiver<DeployRequest>) = bounded(64);
    std::thread::Builder::new()
        .name("tether-deployer".into())
        .spawn(move || {
            for req in rx {
                apply_deltas(&mut registry_groups, &sizes);
                let r = store.deploy(&req.group, req.blob).map(|d| {
                    if !d.unchanged {
                        for s in &shards {
                            // A shard reads its channel every tick; only a wedged shard blocks.
                            if s.send_timeout(d.clone(), Duration::from_secs(5)).is_err() {
                                eprintln!(
                                    "tether: a shard did not take deploy {} of {}",
                                    d.version, d.group
                                );
                            }
                        }
                    }
                    DeployReport {
                        devices: registry_groups.get(&d.group).copied().unwrap_or(0),
                        group: d.group,
                        version: d.version.0,
                        digest: d.digest.to_string(),
                        size: d.blob.len() as u64,
                        unchanged: d.unchanged,
                    }
                });
                let _ = req.reply.send(r);
            }
        })?;
    Ok(tx)
}

/// Why a deploy could not be asked of the deployer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubmitError {
    #[error("the deployer is busy; try again")]
    Busy,
    #[error("the deployer did not answer within {DEPLOY_TIMEOUT:?}")]
    Timeout,
    #[error("{0}")]
    Store(#[from] CodeStoreError),
}

/// Submits a deploy and waits for its outcome (blocking: admin thread only).
pub(crate) fn deploy_blocking(
    deployer: &Sender<DeployRequest>,
    group: String,
    blob: Bytes,
) -> Result<DeployReport, SubmitError> {
    let (reply, answer) = bounded(1);
    deployer
        .try_send(DeployRequest { group, blob, reply })
        .map_err(|_| SubmitError::Busy)?;
    match answer.recv_timeout(DEPLOY_TIMEOUT) {
        Ok(r) => Ok(r?),
        Err(_) => Err(SubmitError::Timeout),
    }
}

/// One group's rollout as seen by one shard (summed over shards for `tether rollout status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupRollout {
    pub group: String,
    pub version: u64,
    pub digest: String,
    pub size: u64,
    /// Connected devices of the group.
    pub connected: u64,
    pub current: u64,
    /// Offered or waiting for a transfer slot.
    pub pending: u64,
    pub in_flight: u64,
    /// Stale after a failed transfer (and not retrying right now).
    pub failed: u64,
}

/// Every group's rollout, summed over shards (each shard's latest published state).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RolloutStatus {
    pub groups: Vec<GroupRollout>,
    /// Per shard (index = shard number), how fresh its part of `groups` is; a stale shard is
    /// not answering and its devices are counted as it last published them.
    pub shards: Vec<Freshness>,
}

impl RolloutStatus {
    /// Sums what each shard published, group by group, and keeps each shard's freshness.
    pub fn from_published(per_shard: Vec<(Vec<GroupRollout>, Freshness)>) -> RolloutStatus {
        let (groups, shards): (Vec<_>, Vec<_>) = per_shard.into_iter().unzip();
        RolloutStatus {
            shards,
            ..RolloutStatus::merge(groups)
        }
    }

    /// Sums per-shard answers group by group.
    pub fn merge(per_shard: impl IntoIterator<Item = Vec<GroupRollout>>) -> RolloutStatus {
        let mut by: BTreeMap<String, GroupRollout> = BTreeMap::new();
        for g in per_shard.into_iter().flatten() {
            let e = by.entry(g.group.clone()).or_insert_with(|| GroupRollout {
                group: g.group.clone(),
                version: g.version,
                digest: g.digest.clone(),
                size: g.size,
                ..GroupRollout::default()
            });
            // Shards learn of a deploy within a tick of each other: show the newest.
            if g.version > e.version {
                e.version = g.version;
                e.digest = g.digest.clone();
                e.size = g.size;
            }
            e.connected += g.connected;
            e.current += g.current;
            e.pending += g.pending;
            e.in_flight += g.in_flight;
            e.failed += g.failed;
        }
        RolloutStatus {
            groups: by.into_values().collect(),
            shards: Vec::new(),
        }
    }

    /// A table for a person, after a line for each shard that is not answering.
    pub fn table(&self) -> String {
        let mut s = not_answering_lines(&self.shards);
        if self.groups.is_empty() {
            s.push_str("no code deployed (tether deploy --group G FILE)\n");
            return s;
        }
        let _ = writeln!(
            s,
            "{:<16} {:>8} {:>10} {:>9} {:>8} {:>8} {:>9} {:>7}",
            "group", "version", "size", "connected", "current", "pending", "in_flight", "failed"
        );
        for g in &self.groups {
            let _ = writeln!(
                s,
                "{:<16} {:>8} {:>10} {:>9} {:>8} {:>8} {:>9} {:>7}",
                g.group,
                format!("v{}", g.version),
                g.size,
                g.connected,
                g.current,
                g.pending,
                g.in_flight,
                g.failed
            );
        }
        s
    }
}

/// The admin routes for code; `None` for other paths.
pub(crate) fn code_routes(
    req: &AdminRequest,
    deployer: &Sender<DeployRequest>,
    rollout: impl FnOnce() -> RolloutStatus,
) -> Option<AdminResponse> {
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/deploy") => Some(admin_deploy(req, deployer)),
        ("GET", "/rollout.json") => Some(AdminResponse::json(&rollout())),
        (_, "/deploy") => Some(AdminResponse::text(405, "/deploy only answers POST\n")),
        (_, "/rollout.json") => Some(AdminResponse::text(405, "/rollout.json only answers GET\n")),
        _ => None,
    }
}

fn admin_deploy(req: &AdminRequest, deployer: &Sender<DeployRequest>) -> AdminResponse {
    let group = req
        .query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("group="));
    let Some(group) = group.filter(|g| !g.is_empty()) else {
        return AdminResponse::text(400, "missing ?group=NAME\n");
    };
    match deploy_blocking(deployer, group.to_owned(), Bytes::from(req.body.clone())) {
        Ok(report) => AdminResponse::json(&report),
        Err(e) => {
            let status = match &e {
                SubmitError::Store(CodeStoreError::TooLarge { .. }) => 413,
                SubmitError::Store(
                    CodeStoreError::Empty { .. } | CodeStoreError::BadGroupName(_),
                ) => 400,
                SubmitError::Busy => 503,
                _ => 500,
            };
            AdminResponse::text(status, format!("{e}\n"))
        }
    }
}

/// `tether deploy`: posts `blob` to the admin endpoint at `addr` with the admin `token`.
pub fn deploy(
    addr: impl ToSocketAddrs + std::fmt::Display,
    token: Option<&str>,
    group: &str,
    blob: &[u8],
) -> Result<DeployReport, AdminError> {
    admin_json(addr, token, "POST", &format!("/deploy?group={group}"), blob)
}

/// Fetches `/rollout.json`: each shard's latest published rollout state (up to a tick old).
pub fn fetch_rollout(
    addr: impl ToSocketAddrs + std::fmt::Display,
    token: Option<&str>,
) -> Result<RolloutStatus, AdminError> {
    admin_json(addr, token, "GET", "/rollout.json", b"")
}

/// `tether rollout status`: fetches `/rollout.json` until every shard's part was published
/// after this call began ([`until_current`]), so a deploy made just before shows.
pub fn fetch_rollout_current(
    addr: impl ToSocketAddrs + std::fmt::Display + Copy,
    token: Option<&str>,
) -> Result<RolloutStatus, AdminError> {
    until_current(|| fetch_rollout(addr, token), |s| s.shards.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(name: &str, version: u64, connected: u64, current: u64) -> GroupRollout {
        GroupRollout {
            group: name.into(),
            version,
            connected,
            current,
            pending: connected - current,
            ..GroupRollout::default()
        }
    }

    #[test]
    fn rollout_status_sums_shards_per_group() {
        let s = RolloutStatus::merge([
            vec![g("lamps", 2, 10, 4), g("meters", 1, 3, 3)],
            vec![g("lamps", 3, 5, 0)],
        ]);
        assert_eq!(s.groups.len(), 2);
        let lamps = &s.groups[0];
        assert_eq!(
            (lamps.version, lamps.connected, lamps.current, lamps.pending),
            (3, 15, 4, 11)
        );
        let t = s.table();
        assert!(t.lines().nth(1).unwrap().starts_with("lamps"), "{t}");
    }

    #[test]
    fn a_stale_shard_counts_with_its_last_state_and_is_named() {
        let fresh = Freshness::of(9, Duration::from_millis(30));
        let stale = Freshness::of(4, Duration::from_millis(2_500));
        let s = RolloutStatus::from_published(vec![
            (vec![g("lamps", 2, 10, 4)], fresh),
            (vec![g("lamps", 2, 5, 5)], stale),
        ]);
        assert_eq!(s.shards, vec![fresh, stale]);
        assert_eq!((s.groups[0].connected, s.groups[0].current), (15, 9));
        let t = s.table();
        assert!(
            t.starts_with("shard 1: NOT ANSWERING for 2.5 s, last values shown\n"),
            "{t}"
        );
        assert!(t.lines().nth(2).unwrap().starts_with("lamps"), "{t}");
        let back: RolloutStatus =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
