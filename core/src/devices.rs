//! The live device registry's admin side: the registrar (the only writer of
//! `DATA_DIR/devices.csv` while the server runs), the admin routes (`POST /devices`,
//! `POST /devices/ID/revoke`, `GET /devices`, `GET /devices/ID`), the clients behind
//! `tether devices add|revoke|list|show`, and the offline edit they fall back to when no server
//! answers.
//!
//! A change is written to the file first (atomically, mode 0600), then sent to the device's
//! home shard over that shard's own bounded channel, read in its timer tick (≤ 100 ms); the
//! admin call answers once the shard applied it, so a device added can connect as soon as
//! `tether devices add` returns, and a revoked device's session is closed (with
//! `Goodbye{revoked}`) before `tether devices revoke` returns. Only the home shard learns of a
//! change: a device is only ever looked up there. Lists and per-device details are collected
//! from the shards the same way.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::{Receiver, Sender, bounded};
use serde::{Deserialize, Serialize};
use tether_protocol::DeviceId;
use tether_protocol::auth::DeviceKey;

use crate::admin::{AdminError, AdminRequest, AdminResponse, admin_json};
use crate::fsutil::{FileLock, to_hex};
use crate::placement::home_shard;
use crate::registry::{
    FILE_NAME, LiveRegistry, Registry, RegistryError, SERVE_LOCK, parse_device_id,
    random_device_key, valid_group_name,
};

/// How long the admin thread waits for a shard to apply a change or answer a query (a shard
/// reads its channel every 100 ms tick; only a wedged shard takes longer).
pub const SHARD_TIMEOUT: Duration = Duration::from_secs(2);

/// One device in a listing. `online` is `None` when read from the file (no server).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRow {
    pub id: u64,
    pub group: String,
    pub online: Option<bool>,
}

/// `GET /devices`: every registered device, sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceList {
    pub devices: Vec<DeviceRow>,
    /// Read from the registry file because no server answered (online states unknown).
    pub from_file: bool,
}

/// `GET /devices/ID`: one device in detail. Fields are `None` when not known: read from the
/// file (no server), or never connected since the server started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceInfo {
    pub id: u64,
    pub group: String,
    pub online: Option<bool>,
    /// Its home shard: where its session lives.
    pub shard: Option<usize>,
    /// The code version it runs: what its last `Hello` named, or what it installed since.
    pub code_version: Option<u64>,
    /// When its session last heard from it (online) or ended (offline), in Unix milliseconds.
    pub last_seen_ms: Option<u64>,
    /// Read from the registry file because no server answered.
    pub from_file: bool,
}

/// `POST /devices` body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    pub id: u64,
    pub group: String,
}

/// `POST /devices` answer: the new device and its key (the only time the key is shown).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AddReport {
    pub id: u64,
    pub group: String,
    /// 64 hex digits.
    pub key: String,
    pub shard: Option<usize>,
    /// Written to the file directly because no server answered.
    pub offline: bool,
}

/// `POST /devices/ID/revoke` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RevokeReport {
    pub id: u64,
    pub group: String,
    /// It had a session, now closed with `Goodbye{revoked}`.
    pub was_online: bool,
    /// Agent sends it had not acknowledged, answered `SendResult{unknown device}`.
    pub undelivered: u64,
    /// Written to the file directly because no server answered.
    pub offline: bool,
}

/// What a shard reports of its home devices for a listing (group names once, rows by index).
#[derive(Debug, Default)]
pub(crate) struct ShardDevices {
    pub groups: Vec<String>,
    /// (device, index into `groups`, online)
    pub rows: Vec<(u64, u32, bool)>,
}

/// What revoking did on the device's home shard.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Revoked {
    pub was_online: bool,
    pub undelivered: u64,
}

/// A registry change or query for one shard (read in its timer tick).
pub(crate) enum RegistryMsg {
    Add {
        id: DeviceId,
        key: DeviceKey,
        group: String,
        reply: Sender<Result<(), String>>,
    },
    Revoke {
        id: DeviceId,
        reply: Sender<Revoked>,
    },
    List {
        reply: Sender<ShardDevices>,
    },
    Show {
        id: DeviceId,
        reply: Sender<Option<DeviceInfo>>,
    },
}

/// Device counts per group changed (group, +1 or -1): for the deployer's reports.
pub(crate) type GroupDelta = (String, i64);

/// The server's registry writer. It lives in the admin thread (one request at a time), holds
/// every change since start, and tells the home shard of each.
pub(crate) struct Registrar {
    live: LiveRegistry,
    path: PathBuf,
    shards: Vec<Sender<RegistryMsg>>,
    sizes: Sender<GroupDelta>,
}

/// Why an admin registry call failed, with its HTTP status.
struct Refusal(u16, String);

impl From<RegistryError> for Refusal {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::Exists { .. } => 409,
            RegistryError::Unknown(_) => 404,
            RegistryError::BadGroupName(_) | RegistryError::TooManyGroups => 400,
            _ => 500,
        };
        Refusal(status, e.to_string())
    }
}

impl Registrar {
    pub(crate) fn new(
        base: Arc<Registry>,
        data_dir: &Path,
        shards: Vec<Sender<RegistryMsg>>,
        sizes: Sender<GroupDelta>,
    ) -> Registrar {
        Registrar {
            live: LiveRegistry::new(base),
            path: data_dir.join(FILE_NAME),
            shards,
            sizes,
        }
    }

    fn home(&self, id: DeviceId) -> usize {
        home_shard(id, self.shards.len())
    }

    /// Sends `msg` to shard `to` and waits for its answer.
    fn ask<T>(&self, to: usize, msg: RegistryMsg, answer: &Receiver<T>) -> Result<T, Refusal> {
        let late = || {
            Refusal(
                503,
                format!("shard {to} did not answer within {SHARD_TIMEOUT:?}"),
            )
        };
        self.shards[to]
            .send_timeout(msg, SHARD_TIMEOUT)
            .map_err(|_| late())?;
        answer.recv_timeout(SHARD_TIMEOUT).map_err(|_| late())
    }

    fn add(&mut self, req: AddRequest) -> Result<AddReport, Refusal> {
        let id = DeviceId(req.id);
        let key = random_device_key();
        self.live.add(id, key.clone(), &req.group)?;
        if let Err(e) = self.live.write(&self.path) {
            let _ = self.live.revoke(id);
            return Err(e.into());
        }
        let _ = self.sizes.try_send((req.group.clone(), 1));
        let home = self.home(id);
        let (reply, answer) = bounded(1);
        let msg = RegistryMsg::Add {
            id,
            key: key.clone(),
            group: req.group.clone(),
            reply,
        };
        self.ask(home, msg, &answer)?
            .map_err(|e| Refusal(500, format!("shard {home}: {e}")))?;
        Ok(AddReport {
            id: req.id,
            group: req.group,
            key: to_hex(&key.0),
            shard: Some(home),
            offline: false,
        })
    }

    fn revoke(&mut self, id: DeviceId) -> Result<RevokeReport, Refusal> {
        let entry = self.live.revoke(id)?;
        let group = self.live.group_name(entry.group).unwrap_or("?").to_owned();
        if let Err(e) = self.live.write(&self.path) {
            let _ = self.live.add(id, entry.key, &group);
            return Err(e.into());
        }
        let _ = self.sizes.try_send((group.clone(), -1));
        let (reply, answer) = bounded(1);
        let r = self.ask(self.home(id), RegistryMsg::Revoke { id, reply }, &answer)?;
        Ok(RevokeReport {
            id: id.0,
            group,
            was_online: r.was_online,
            undelivered: r.undelivered,
            offline: false,
        })
    }

    fn list(&self) -> Result<DeviceList, Refusal> {
        let mut devices = Vec::with_capacity(self.live.len());
        for to in 0..self.shards.len() {
            let (reply, answer) = bounded(1);
            let part = self.ask(to, RegistryMsg::List { reply }, &answer)?;
            devices.extend(part.rows.into_iter().map(|(id, g, online)| DeviceRow {
                id,
                group: part.groups.get(g as usize).cloned().unwrap_or_default(),
                online: Some(online),
            }));
        }
        devices.sort_unstable_by_key(|d| d.id);
        Ok(DeviceList {
            devices,
            from_file: false,
        })
    }

    fn show(&self, id: DeviceId) -> Result<DeviceInfo, Refusal> {
        let (reply, answer) = bounded(1);
        self.ask(self.home(id), RegistryMsg::Show { id, reply }, &answer)?
            .ok_or_else(|| RegistryError::Unknown(id.0).into())
    }
}

fn respond<T: Serialize>(r: Result<T, Refusal>) -> AdminResponse {
    match r {
        Ok(v) => AdminResponse::json(&v),
        Err(Refusal(status, msg)) => AdminResponse::text(status, format!("{msg}\n")),
    }
}

fn parse_add(body: &[u8]) -> Result<AddRequest, Refusal> {
    let req: AddRequest = serde_json::from_slice(body).map_err(|e| {
        Refusal(
            400,
            format!("bad body: {e} (send {{\"id\": 7, \"group\": \"lamps\"}})"),
        )
    })?;
    if !valid_group_name(&req.group) {
        return Err(RegistryError::BadGroupName(req.group).into());
    }
    Ok(req)
}

/// The admin routes for the registry; `None` for other paths.
pub(crate) fn device_routes(req: &AdminRequest, reg: &mut Registrar) -> Option<AdminResponse> {
    let rest = match req.path.as_str() {
        "/devices" => {
            return Some(match req.method.as_str() {
                "GET" => respond(reg.list()),
                "POST" => respond(parse_add(&req.body).and_then(|a| reg.add(a))),
                _ => AdminResponse::text(405, "/devices answers GET and POST\n"),
            });
        }
        p => p.strip_prefix("/devices/")?,
    };
    let (id, action) = match rest.split_once('/') {
        Some((id, action)) => (id, Some(action)),
        None => (rest, None),
    };
    let id = match parse_device_id(id) {
        Ok(id) => id,
        Err(e) => return Some(AdminResponse::text(400, format!("{e}\n"))),
    };
    Some(match (req.method.as_str(), action) {
        ("GET", None) => respond(reg.show(id)),
        ("POST", Some("revoke")) => respond(reg.revoke(id)),
        (_, None) => AdminResponse::text(405, "/devices/ID answers GET\n"),
        (_, Some("revoke")) => AdminResponse::text(405, "/devices/ID/revoke answers POST\n"),
        _ => AdminResponse::not_found(req),
    })
}

/// `tether devices add`: registers device `id` in `group` through the admin endpoint.
pub fn add(
    addr: impl ToSocketAddrs + std::fmt::Display,
    token: Option<&str>,
    id: u64,
    group: &str,
) -> Result<AddReport, AdminError> {
    let body = serde_json::to_vec(&AddRequest {
        id,
        group: group.to_owned(),
    })
    .unwrap_or_default();
    admin_json(addr, token, "POST", "/devices", &body)
}

/// `tether devices revoke`: revokes device `id` through the admin endpoint.
pub fn revoke(
    addr: impl ToSocketAddrs + std::fmt::Display,
    token: Option<&str>,
    id: u64,
) -> Result<RevokeReport, AdminError> {
    admin_json(addr, token, "POST", &format!("/devices/{id}/revoke"), b"")
}

/// `tether devices list`: every device, from the admin endpoint.
pub fn list(
    addr: impl ToSocketAddrs + std::fmt::Display,
    token: Option<&str>,
) -> Result<DeviceList, AdminError> {
    admin_json(addr, token, "GET", "/devices", b"")
}

/// `tether devices show`: one device, from the admin endpoint.
pub fn show(
    addr: impl ToSocketAddrs + std::fmt::Display,
    token: Option<&str>,
    id: u64,
) -> Result<DeviceInfo, AdminError> {
    admin_json(addr, token, "GET", &format!("/devices/{id}"), b"")
}

/// Whether an admin call failed because nothing listens at the address (no server runs there),
/// as opposed to a server that answered with an error.
pub fn no_server(e: &AdminError) -> bool {
    matches!(e, AdminError::Connect { source, .. }
        if source.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Loads the registry file of `data_dir` (an empty registry if there is none).
fn load_file(data_dir: &Path) -> Result<LiveRegistry, String> {
    let path = data_dir.join(FILE_NAME);
    if !path.exists() {
        return Ok(LiveRegistry::default());
    }
    Registry::load(&path)
        .map(|r| LiveRegistry::new(Arc::new(r)))
        .map_err(|e| e.to_string())
}

/// Edits `data_dir/devices.csv` directly: only while no server holds the data directory's
/// lock (a running server is the only writer of its registry; it would not see the change and
/// would overwrite it), and holding that lock meanwhile, so two offline edits cannot interleave.
fn edit_offline<T>(
    data_dir: &Path,
    edit: impl FnOnce(&mut LiveRegistry) -> Result<T, RegistryError>,
) -> Result<T, String> {
    let _lock = lock_offline(data_dir)?;
    let mut live = load_file(data_dir)?;
    let out = edit(&mut live).map_err(|e| e.to_string())?;
    live.write(&data_dir.join(FILE_NAME))
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// `tether devices gen`: replaces the registry file, only while no server runs on `data_dir`
/// (it would not see the new file, and would overwrite it at its next change).
pub fn generate_offline(
    data_dir: &Path,
    count: u64,
    groups: &[String],
    first_id: u64,
) -> Result<PathBuf, String> {
    let _lock = lock_offline(data_dir)?;
    Registry::generate(data_dir, count, groups, first_id).map_err(|e| e.to_string())
}

/// Takes the data directory's lock, or says that a server holds it.
fn lock_offline(data_dir: &Path) -> Result<FileLock, String> {
    let lock_path = data_dir.join(SERVE_LOCK);
    FileLock::try_lock(&lock_path)
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?
        .ok_or_else(|| {
            format!(
                "a tether server runs on {} (it holds {}); it is the only writer of its registry \
                 while it runs: use its admin port (tether devices add|revoke --admin ADDR)",
                data_dir.display(),
                lock_path.display()
            )
        })
}

/// `tether devices add` with no server running: writes the file directly.
pub fn add_offline(data_dir: &Path, id: u64, group: &str) -> Result<AddReport, String> {
    let key = random_device_key();
    let hex = to_hex(&key.0);
    edit_offline(data_dir, |live| live.add(DeviceId(id), key, group))?;
    Ok(AddReport {
        id,
        group: group.to_owned(),
        key: hex,
        shard: None,
        offline: true,
    })
}

/// `tether devices revoke` with no server running: writes the file directly.
pub fn revoke_offline(data_dir: &Path, id: u64) -> Result<RevokeReport, String> {
    let group = edit_offline(data_dir, |live| {
        let e = live.revoke(DeviceId(id))?;
        Ok(live.group_name(e.group).unwrap_or("?").to_owned())
    })?;
    Ok(RevokeReport {
        id,
        group,
        offline: true,
        ..RevokeReport::default()
    })
}

/// `tether devices list` with no server running: from the file (online states unknown).
pub fn list_offline(data_dir: &Path) -> Result<DeviceList, String> {
    let live = load_file(data_dir)?;
    let mut devices: Vec<DeviceRow> = live
        .iter()
        .map(|(id, e)| DeviceRow {
            id: id.0,
            group: live.group_name(e.group).unwrap_or("?").to_owned(),
            online: None,
        })
        .collect();
    devices.sort_unstable_by_key(|d| d.id);
    Ok(DeviceList {
        devices,
        from_file: true,
    })
}

/// `tether devices show` with no server running: from the file.
pub fn show_offline(data_dir: &Path, id: u64) -> Result<DeviceInfo, String> {
    let live = load_file(data_dir)?;
    let e = live
        .get(DeviceId(id))
        .ok_or_else(|| RegistryError::Unknown(id).to_string())?;
    Ok(DeviceInfo {
        id,
        group: live.group_name(e.group).unwrap_or("?").to_owned(),
        from_file: true,
        ..DeviceInfo::default()
    })
}

fn yes_no(online: Option<bool>) -> &'static str {
    match online {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    }
}

impl AddReport {
    /// For a person: what was added, then the key (shown only now).
    pub fn text(&self) -> String {
        let mut s = format!("added device {} to group {}", self.id, self.group);
        match self.shard {
            Some(shard) => {
                let _ = write!(s, " (home shard {shard}; it may connect now)");
            }
            None => s.push_str(" (no server running: written to the registry file)"),
        }
        let _ = write!(
            s,
            "\nkey {}\n(the key is shown only now: provision it on the device)\n",
            self.key
        );
        s
    }
}

impl RevokeReport {
    /// One line for a person.
    pub fn text(&self) -> String {
        let what = if self.offline {
            "no server running: removed from the registry file".to_owned()
        } else if self.was_online {
            format!(
                "its session was closed with Goodbye{{revoked}}; {} undelivered agent sends \
                 answered unknown device",
                self.undelivered
            )
        } else {
            "it was offline".to_owned()
        };
        format!(
            "revoked device {} (group {}): {what}; further connects are refused\n",
            self.id, self.group
        )
    }
}

impl DeviceList {
    /// A table for a person.
    pub fn table(&self) -> String {
        let w = self
            .devices
            .iter()
            .map(|d| d.group.len())
            .max()
            .unwrap_or(0)
            .max(5);
        let mut s = format!("{:<20} {:<w$} online\n", "id", "group");
        for d in &self.devices {
            let _ = writeln!(s, "{:<20} {:<w$} {}", d.id, d.group, yes_no(d.online));
        }
        let online = self
            .devices
            .iter()
            .filter(|d| d.online == Some(true))
            .count();
        if self.from_file {
            let _ = writeln!(
                s,
                "{} devices (no server running: from the registry file)",
                self.devices.len()
            );
        } else {
            let _ = writeln!(s, "{} devices, {online} online", self.devices.len());
        }
        s
    }
}

impl DeviceInfo {
    /// Key: value lines for a person; `now_ms` (Unix milliseconds) for "ago".
    pub fn text(&self, now_ms: u64) -> String {
        let unknown = if self.from_file {
            "unknown (no server running)".to_owned()
        } else {
            "never since the server started".to_owned()
        };
        let shard = self
            .shard
            .map_or_else(|| "unknown".to_owned(), |s| s.to_string());
        let code = self
            .code_version
            .map_or(unknown.clone(), |v| format!("v{v}"));
        let seen = self.last_seen_ms.map_or(unknown, |t| {
            let ago = now_ms.saturating_sub(t) as f64 / 1000.0;
            format!("{ago:.1} s ago (unix ms {t})")
        });
        let online = if self.from_file {
            "unknown (no server running)"
        } else {
            yes_no(self.online)
        };
        format!(
            "device        {}\ngroup         {}\nonline        {online}\nshard         {shard}\n\
             code version  {code}\nlast seen     {seen}\n",
            self.id, self.group
        )
    }
}

/// Per group, devices registered: what the deployer tells in its reports, kept current by the
/// registrar's deltas.
pub(crate) fn apply_deltas(sizes: &mut BTreeMap<String, u64>, deltas: &Receiver<GroupDelta>) {
    for (group, d) in deltas.try_iter() {
        let n = sizes.entry(group).or_default();
        *n = n.saturating_add_signed(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_and_texts_read_well() {
        let list = DeviceList {
            devices: vec![
                DeviceRow {
                    id: 1,
                    group: "lamps".into(),
                    online: Some(true),
                },
                DeviceRow {
                    id: 22,
                    group: "meters".into(),
                    online: Some(false),
                },
            ],
            from_file: false,
        };
        let t = list.table();
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[0], ["id", "group", "online"]);
        assert_eq!(lines[1], ["1", "lamps", "yes"]);
        assert_eq!(lines[2], ["22", "meters", "no"]);
        assert!(t.ends_with("2 devices, 1 online\n"), "{t}");
        let info = DeviceInfo {
            id: 7,
            group: "lamps".into(),
            online: Some(false),
            shard: Some(1),
            code_version: Some(3),
            last_seen_ms: Some(10_000),
            from_file: false,
        };
        let t = info.text(12_500);
        assert!(t.contains("code version  v3\n"), "{t}");
        assert!(
            t.contains("last seen     2.5 s ago (unix ms 10000)\n"),
            "{t}"
        );
        let never = DeviceInfo {
            last_seen_ms: None,
            code_version: None,
            ..info
        };
        assert!(
            never
                .text(0)
                .contains("last seen     never since the server started")
        );
    }

    #[test]
    fn deltas_follow_group_sizes() {
        let (tx, rx) = bounded(8);
        let mut sizes = BTreeMap::from([("lamps".to_owned(), 2u64)]);
        tx.send(("lamps".into(), -1)).unwrap();
        tx.send(("new".into(), 1)).unwrap();
        tx.send(("new".into(), 1)).unwrap();
        apply_deltas(&mut sizes, &rx);
        assert_eq!(sizes["lamps"], 1);
        assert_eq!(sizes["new"], 2);
    }

    #[test]
    fn offline_edits_need_the_lock_and_round_trip() {
        let dir = crate::testdir::TestDir::new("devices-offline");
        let r = add_offline(dir.path(), 5, "lamps").unwrap();
        assert_eq!(r.key.len(), 64);
        let e = add_offline(dir.path(), 5, "lamps").unwrap_err();
        assert_eq!(e, "device 5 is already registered (group lamps)");
        let list = list_offline(dir.path()).unwrap();
        assert_eq!(list.devices.len(), 1);
        assert!(list.from_file);
        let reg = Registry::load(&dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(to_hex(&reg.get(DeviceId(5)).unwrap().key.0), r.key);
        // While a server holds the lock, nothing is written.
        let held = FileLock::try_lock(&dir.path().join(SERVE_LOCK))
            .unwrap()
            .unwrap();
        let e = revoke_offline(dir.path(), 5).unwrap_err();
        assert!(e.contains("a tether server runs on"), "{e}");
        drop(held);
        assert_eq!(revoke_offline(dir.path(), 5).unwrap().group, "lamps");
        assert_eq!(
            revoke_offline(dir.path(), 5).unwrap_err(),
            "unknown device 5"
        );
        assert_eq!(show_offline(dir.path(), 5).unwrap_err(), "unknown device 5");
    }
}
