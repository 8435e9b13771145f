//! The device registry (`data_dir/devices.csv`: which devices exist, their group and key), the
//! server secret their keys derive from, and the agent token that admits agents.
//!
//! File format, one device per line after a header:
//!
//! ```text
//! # tether devices v1
//! 1,lamps,5f3a…(64 hex digits)
//! ```
//!
//! `device_id` is a decimal u64, `group` matches `[A-Za-z0-9_-]{1,32}`, the key is 64 hex
//! digits. Blank lines and further `#` lines are ignored. The key in the file is authoritative:
//! [`Registry::generate`] writes keys derived from the server secret, `tether devices add`
//! writes random ones, and a file may also list keys made elsewhere. The file holds keys: it
//! is written with mode 0600, atomically, sorted by id (comment lines are not kept).
//!
//! At run time the registry changes without a restart: a [`LiveRegistry`] is the file as
//! loaded at start (one read-only [`Registry`], shared by every shard and never copied) plus
//! the devices added and revoked since. The running server is the only writer of the file;
//! it holds [`SERVE_LOCK`] so that offline edits (`tether devices add` with no server
//! answering) and `tether devices gen` can tell that it runs.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tether_protocol::auth::{DeviceKey, derive_device_key};
use tether_protocol::ids::DeviceId;

use crate::fsutil::{
    SECRET_MODE, constant_time_eq, create_once, from_hex, random_bytes, to_hex, write_atomic_with,
};

/// The first line of a registry file.
pub const HEADER: &str = "# tether devices v1";
/// The registry's file name in the data directory.
pub const FILE_NAME: &str = "devices.csv";
/// Longest group name.
pub const MAX_GROUP_LEN: usize = 32;
/// The lock file a running `tether serve` holds in the data directory (and every offline
/// writer of the registry takes while it writes).
pub const SERVE_LOCK: &str = "serve.lock";

/// Why the registry, secret or token could not be loaded or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot write {what} {}: {source}", path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{}: line 1 must be `{HEADER}`", path.display())]
    MissingHeader { path: PathBuf },
    #[error("{}:{line}: {reason}", path.display())]
    BadLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}:{line}: device {id} is already listed on line {first}", path.display())]
    Duplicate {
        path: PathBuf,
        line: usize,
        id: u64,
        first: usize,
    },
    #[error("{what} {} is damaged: {reason}", path.display())]
    BadSecret {
        what: &'static str,
        path: PathBuf,
        reason: &'static str,
    },
    #[error("bad group name {0:?}: use 1 to 32 of A-Z a-z 0-9 _ -")]
    BadGroupName(String),
    #[error("{count} devices from id {first_id} run past the largest device id")]
    IdOverflow { first_id: u64, count: u64 },
    #[error("device {id} is already registered (group {group})")]
    Exists { id: u64, group: String },
    #[error("unknown device {0}")]
    Unknown(u64),
    #[error("more than 65536 groups")]
    TooManyGroups,
}

/// A device group, interned: an index into the registry's group table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u16);

/// What the server knows about one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceEntry {
    pub key: DeviceKey,
    pub group: GroupId,
}

/// All devices of a registry file, loaded once and then read-only (shards share it through an
/// `Arc`; run-time changes live in a [`LiveRegistry`] around it).
#[derive(Debug, Default)]
pub struct Registry {
    devices: HashMap<DeviceId, DeviceEntry>,
    groups: Vec<Box<str>>,
}

/// Whether `name` is a valid group name.
pub fn valid_group_name(name: &str) -> bool {
    (1..=MAX_GROUP_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Registry {
    /// Loads a registry file. Errors give the line number and what is wrong with it; a
    /// device listed twice is an error.
    pub fn load(path: &Path) -> Result<Registry, RegistryError> {
        let data = std::fs::read(path).map_err(|source| RegistryError::Read {
            what: "device registry",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&data, path)
    }

    fn parse(data: &[u8], path: &Path) -> Result<Registry, RegistryError> {
        let bad = |line: usize, reason: String| RegistryError::BadLine {
            path: path.to_owned(),
            line,
            reason,
        };
        let mut lines = data.split(|&b| b == b'\n').map(trim_cr);
        if lines.next() != Some(HEADER.as_bytes()) {
            return Err(RegistryError::MissingHeader {
                path: path.to_owned(),
            });
        }
        // A line is at least `0,g,` + 64 digits; reserving up front avoids rehashing 1M entries.
        let mut reg = Registry {
            devices: HashMap::with_capacity(data.len() / 68),
            groups: Vec::new(),
        };
        let mut group_ids: HashMap<Box<str>, GroupId> = HashMap::new();
        for (i, line) in lines.enumerate() {
            let lineno = i + 2;
            if line.is_empty() || line[0] == b'#' {
                continue;
            }
            let mut fields = line.split(|&b| b == b',');
            let (Some(id), Some(group), Some(key), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(bad(lineno, "expected device_id,group,key_hex".into()));
            };
            let id = parse_u64(id).ok_or_else(|| {
                bad(
                    lineno,
                    format!("bad device id {:?}", String::from_utf8_lossy(id)),
                )
            })?;
            let group_str = std::str::from_utf8(group)
                .ok()
                .filter(|g| valid_group_name(g))
                .ok_or_else(|| {
                    bad(
                        lineno,
                        format!(
                            "bad group name {:?}: use 1 to 32 of A-Z a-z 0-9 _ -",
                            String::from_utf8_lossy(group)
                        ),
                    )
                })?;
            let key = from_hex::<32>(key)
                .ok_or_else(|| bad(lineno, "key must be 64 hex digits".into()))?;
            let group = match group_ids.get(group_str) {
                Some(&g) => g,
                None => {
                    let n = u16::try_from(reg.groups.len())
                        .map_err(|_| bad(lineno, "more than 65536 groups".into()))?;
                    reg.groups.push(group_str.into());
                    group_ids.insert(group_str.into(), GroupId(n));
                    GroupId(n)
                }
            };
            match reg.devices.entry(DeviceId(id)) {
                Entry::Occupied(_) => {
                    return Err(RegistryError::Duplicate {
                        path: path.to_owned(),
                        line: lineno,
                        id,
                        first: first_line_of(data, id),
                    });
                }
                Entry::Vacant(v) => {
                    v.insert(DeviceEntry {
                        key: DeviceKey(key),
                        group,
                    });
                }
            }
        }
        Ok(reg)
    }

    /// The entry of a device, if it is registered.
    pub fn get(&self, id: DeviceId) -> Option<&DeviceEntry> {
        self.devices.get(&id)
    }

    /// How many devices are registered.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether no device is registered.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The name of an interned group.
    pub fn group_name(&self, g: GroupId) -> Option<&str> {
        self.groups.get(usize::from(g.0)).map(|s| &**s)
    }

    /// The id of a group by name (linear: there are few groups, and this is not on a hot path).
    pub fn group_id(&self, name: &str) -> Option<GroupId> {
        self.groups
            .iter()
            .position(|g| &**g == name)
            .and_then(|i| u16::try_from(i).ok())
            .map(GroupId)
    }

    /// All group names, indexed by [`GroupId`].
    pub fn groups(&self) -> impl Iterator<Item = (GroupId, &str)> {
        self.groups
            .iter()
            .enumerate()
            .map(|(i, g)| (GroupId(i as u16), &**g))
    }

    /// Every device, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (DeviceId, &DeviceEntry)> {
        self.devices.iter().map(|(id, e)| (*id, e))
    }

    /// Writes `data_dir/devices.csv` listing `count` devices with ids `first_id..`, assigned to
    /// `groups` round-robin (`default` if none), keys derived from the server secret (created if
    /// missing). The file is **replaced**, atomically (temp file, fsync, rename), mode 0600: to
    /// grow a fleet, generate the whole range again (keys are derived, so existing devices keep
    /// theirs), or add devices one by one with [`LiveRegistry::add`].
    pub fn generate(
        data_dir: &Path,
        count: u64,
        groups: &[String],
        first_id: u64,
    ) -> Result<PathBuf, RegistryError> {
        let default = ["default".to_string()];
        let groups = if groups.is_empty() {
            &default[..]
        } else {
            groups
        };
        if let Some(g) = groups.iter().find(|g| !valid_group_name(g)) {
            return Err(RegistryError::BadGroupName(g.clone()));
        }
        if count > 0 && first_id.checked_add(count - 1).is_none() {
            return Err(RegistryError::IdOverflow { first_id, count });
        }
        let secret = ServerSecret::ensure(data_dir)?;
        let path = data_dir.join(FILE_NAME);
        write_atomic_with(&path, SECRET_MODE, |w| {
            writeln!(w, "{HEADER}")?;
            for (i, id) in (first_id..).take(count as usize).enumerate() {
                let key = derive_device_key(&secret.0, DeviceId(id));
                let group = &groups[i % groups.len()];
                writeln!(w, "{id},{group},{}", to_hex(&key.0))?;
            }
            Ok(())
        })
        .map_err(|source| RegistryError::Write {
            what: "device registry",
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}

/// The registry of a running server: the file as loaded at start, shared read-only, plus the
/// devices added and revoked since (small: one entry per admin call). The server's registrar
/// holds one with every change; each shard holds one with the changes of the devices whose
/// home it is (a device is only ever looked up on its home shard). Group ids are local to one
/// `LiveRegistry` past the base's groups: compare groups across shards by name.
#[derive(Debug, Clone, Default)]
pub struct LiveRegistry {
    base: Arc<Registry>,
    /// Devices added since start (a re-added revoked base device too).
    added: HashMap<DeviceId, DeviceEntry>,
    /// Base devices revoked since start (a base id re-added stays here, and is in `added`).
    revoked: HashSet<DeviceId>,
    /// Groups named since start that the base does not have, numbered after its groups.
    groups: Vec<Box<str>>,
}

impl LiveRegistry {
    /// The registry as loaded from its file.
    pub fn new(base: Arc<Registry>) -> LiveRegistry {
        LiveRegistry {
            base,
            ..LiveRegistry::default()
        }
    }

    /// The entry of a device, if it is registered now.
    pub fn get(&self, id: DeviceId) -> Option<&DeviceEntry> {
        if let Some(e) = self.added.get(&id) {
            return Some(e);
        }
        if self.revoked.contains(&id) {
            return None;
        }
        self.base.get(id)
    }

    /// How many devices are registered now.
    pub fn len(&self) -> usize {
        self.base.len() - self.revoked.len() + self.added.len()
    }

    /// Whether no device is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name of a group.
    pub fn group_name(&self, g: GroupId) -> Option<&str> {
        let n = usize::from(g.0);
        match n.checked_sub(self.base.groups.len()) {
            None => self.base.group_name(g),
            Some(i) => self.groups.get(i).map(|s| &**s),
        }
    }

    /// The id of a group by name, if it is known here.
    pub fn group_id(&self, name: &str) -> Option<GroupId> {
        self.base.group_id(name).or_else(|| {
            let i = self.groups.iter().position(|g| &**g == name)?;
            u16::try_from(self.base.groups.len() + i).ok().map(GroupId)
        })
    }

    /// The id of a group, naming it here if it is new (a deploy to a group with no device yet,
    /// or a device added to one).
    pub fn intern(&mut self, name: &str) -> Result<GroupId, RegistryError> {
        if !valid_group_name(name) {
            return Err(RegistryError::BadGroupName(name.to_owned()));
        }
        if let Some(g) = self.group_id(name) {
            return Ok(g);
        }
        let n = u16::try_from(self.base.groups.len() + self.groups.len())
            .map_err(|_| RegistryError::TooManyGroups)?;
        self.groups.push(name.into());
        Ok(GroupId(n))
    }

    /// Registers a new device in `group`; an id already registered is refused.
    pub fn add(
        &mut self,
        id: DeviceId,
        key: DeviceKey,
        group: &str,
    ) -> Result<GroupId, RegistryError> {
        if let Some(e) = self.get(id) {
            return Err(RegistryError::Exists {
                id: id.0,
                group: self.group_name(e.group).unwrap_or("?").to_owned(),
            });
        }
        let group = self.intern(group)?;
        self.added.insert(id, DeviceEntry { key, group });
        Ok(group)
    }

    /// Removes a device; returns what it was.
    pub fn revoke(&mut self, id: DeviceId) -> Result<DeviceEntry, RegistryError> {
        if let Some(e) = self.added.remove(&id) {
            return Ok(e);
        }
        match self.base.get(id) {
            Some(e) if self.revoked.insert(id) => Ok(e.clone()),
            _ => Err(RegistryError::Unknown(id.0)),
        }
    }

    /// Every registered device, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (DeviceId, &DeviceEntry)> {
        self.base
            .iter()
            .filter(|(id, _)| !self.revoked.contains(id))
            .chain(self.added.iter().map(|(id, e)| (*id, e)))
    }

    /// Devices per group name (groups with none included once named).
    pub fn group_sizes(&self) -> std::collections::BTreeMap<String, u64> {
        let ngroups = self.base.groups.len() + self.groups.len();
        let mut counts = vec![0u64; ngroups];
        for (_, e) in self.iter() {
            if let Some(c) = counts.get_mut(usize::from(e.group.0)) {
                *c += 1;
            }
        }
        (0..ngroups)
            .filter_map(|i| {
                let g = GroupId(u16::try_from(i).ok()?);
                Some((self.group_name(g)?.to_owned(), counts[i]))
            })
            .collect()
    }

    /// Writes every registered device to `path` (sorted by id), atomically, mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), RegistryError> {
        let mut all: Vec<(DeviceId, &DeviceEntry)> = self.iter().collect();
        all.sort_unstable_by_key(|(id, _)| *id);
        write_atomic_with(path, SECRET_MODE, |w| {
            writeln!(w, "{HEADER}")?;
            for (id, e) in all {
                let group = self.group_name(e.group).unwrap_or("default");
                writeln!(w, "{},{group},{}", id.0, to_hex(&e.key.0))?;
            }
            Ok(())
        })
        .map_err(|source| RegistryError::Write {
            what: "device registry",
            path: path.to_owned(),
            source,
        })
    }
}

/// A fresh random device key (what `tether devices add` registers).
pub fn random_device_key() -> DeviceKey {
    let mut key = [0u8; 32];
    random_bytes(&mut key);
    DeviceKey(key)
}

/// Parses a device id as the command line and the admin port take it: a decimal u64.
pub fn parse_device_id(s: &str) -> Result<DeviceId, String> {
    parse_u64(s.as_bytes()).map(DeviceId).ok_or_else(|| {
        format!("bad device id {s:?}: use a decimal number 0..=18446744073709551615")
    })
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        let d = c.checked_sub(b'0').filter(|d| *d < 10)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// Only on the error path: the line where `id` first appears.
fn first_line_of(data: &[u8], id: u64) -> usize {
    data.split(|&b| b == b'\n')
        .position(|l| l.split(|&b| b == b',').next().and_then(parse_u64) == Some(id))
        .map_or(0, |i| i + 1)
}

fn load_secret_file<const N: usize>(
    path: &Path,
    what: &'static str,
    hex: bool,
) -> Result<[u8; N], RegistryError> {
    let mut fresh = [0u8; N];
    random_bytes(&mut fresh);
    let content = if hex {
        let mut s = to_hex(&fresh);
        s.push('\n');
        s.into_bytes()
    } else {
        fresh.to_vec()
    };
    create_once(path, &content, SECRET_MODE).map_err(|source| RegistryError::Write {
        what,
        path: path.to_owned(),
        source,
    })?;
    let data = std::fs::read(path).map_err(|source| RegistryError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let damaged = |reason| RegistryError::BadSecret {
        what,
        path: path.to_owned(),
        reason,
    };
    if hex {
        from_hex::<N>(data.trim_ascii()).ok_or_else(|| damaged("expected 64 hex digits"))
    } else {
        data.try_into()
            .map_err(|_| damaged("expected exactly 32 bytes"))
    }
}

/// The server secret (`data_dir/secret`, 32 random bytes, mode 0600) that device keys derive
/// from. Anyone holding it can impersonate every device: back it up, never print it.
#[derive(Clone)]
pub struct ServerSecret(pub [u8; 32]);

impl fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerSecret(..)")
    }
}

impl ServerSecret {
    /// Reads the secret, creating it on first use.
    pub fn ensure(data_dir: &Path) -> Result<ServerSecret, RegistryError> {
        load_secret_file(&data_dir.join("secret"), "server secret", false).map(ServerSecret)
    }

    /// The key of a device (what a device would be provisioned with).
    pub fn device_key(&self, id: DeviceId) -> DeviceKey {
        derive_device_key(&self.0, id)
    }
}

/// The token agents present to attach (`data_dir/agent.token`: 64 hex digits, mode 0600).
#[derive(Clone)]
pub struct AgentToken([u8; 32]);

impl fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentToken(..)")
    }
}

impl AgentToken {
    /// Reads the token, creating it on first use.
    pub fn ensure(data_dir: &Path) -> Result<AgentToken, RegistryError> {
        load_secret_file(&data_dir.join("agent.token"), "agent token", true).map(AgentToken)
    }

    /// The token as agents send it: 64 lowercase hex digits (the file's content).
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// Whether a presented token (its 64 hex digits, either case) matches, in constant time.
    pub fn verify(&self, presented: &[u8]) -> bool {
        match from_hex::<32>(presented.trim_ascii()) {
            Some(bytes) => constant_time_eq(&bytes, &self.0),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::TestDir;
    use std::os::unix::fs::PermissionsExt;

    fn parse(text: &str) -> Result<Registry, RegistryError> {
        Registry::parse(text.as_bytes(), Path::new("devices.csv"))
    }

    const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn generate_then_load_10k() {
        let dir = TestDir::new("reg-gen");
        let groups = vec!["lamps".to_string(), "meters".to_string()];
        let path = Registry::generate(dir.path(), 10_000, &groups, 100).unwrap();
        let reg = Registry::load(&path).unwrap();
        assert_eq!(reg.len(), 10_000);
        let secret = ServerSecret::ensure(dir.path()).unwrap();
        let e = reg.get(DeviceId(101)).unwrap();
        assert_eq!(e.key, secret.device_key(DeviceId(101)));
        assert_eq!(reg.group_name(e.group), Some("meters"));
        assert_eq!(reg.group_id("lamps"), Some(GroupId(0)));
        assert!(reg.get(DeviceId(99)).is_none());
        assert!(reg.get(DeviceId(10_100)).is_none());
        let mode = std::fs::metadata(dir.path().join("secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn comments_blank_lines_and_crlf_are_accepted() {
        let reg = parse(&format!(
            "{HEADER}\r\n\n# note\n7,a,{KEY}\r\n8,b_2-x,{KEY}\n"
        ))
        .unwrap();
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.groups().count(), 2);
    }

    #[test]
    fn bad_lines_are_reported_with_their_number() {
        let cases = [
            (format!("{HEADER}\n1,a\n"), "devices.csv:2: expected"),
            (
                format!("{HEADER}\n\nx1,a,{KEY}\n"),
                "devices.csv:3: bad device id",
            ),
            (
                format!("{HEADER}\n1,a b,{KEY}\n"),
                "devices.csv:2: bad group name",
            ),
            (
                format!("{HEADER}\n1,a,{}\n", &KEY[1..]),
                "devices.csv:2: key must be",
            ),
            (
                format!("{HEADER}\n1,a,{KEY},x\n"),
                "devices.csv:2: expected",
            ),
            (
                format!("{HEADER}\n1,a,{KEY}\n99999999999999999999,a,{KEY}\n"),
                "devices.csv:3: bad device id",
            ),
            ("1,a,b\n".to_string(), "devices.csv: line 1 must be"),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let e = parse(&format!("{HEADER}\n5,a,{KEY}\n6,a,{KEY}\n5,b,{KEY}\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "devices.csv:4: device 5 is already listed on line 2"
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = Registry::load(Path::new("/nonexistent/devices.csv")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read device registry /nonexistent/devices.csv: "),
            "{e}"
        );
    }

    #[test]
    fn generate_rejects_bad_group_names() {
        let dir = TestDir::new("reg-badgroup");
        let e = Registry::generate(dir.path(), 1, &["no spaces".into()], 1).unwrap_err();
        assert!(matches!(e, RegistryError::BadGroupName(_)));
    }

    fn entries(r: &LiveRegistry) -> Vec<(u64, String, [u8; 32])> {
        let mut v: Vec<_> = r
            .iter()
            .map(|(id, e)| (id.0, r.group_name(e.group).unwrap().to_owned(), e.key.0))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn live_registry_adds_revokes_and_writes_what_reloads() {
        let dir = TestDir::new("reg-live");
        let path = Registry::generate(dir.path(), 3, &["lamps".into()], 1).unwrap();
        let mut live = LiveRegistry::new(Arc::new(Registry::load(&path).unwrap()));
        assert_eq!(live.len(), 3);
        let k7 = random_device_key();
        let g = live.add(DeviceId(7), k7.clone(), "meters").unwrap();
        assert_eq!(live.group_name(g), Some("meters"));
        assert_eq!(live.get(DeviceId(7)).unwrap().key, k7);
        let e = live.add(DeviceId(2), random_device_key(), "x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "device 2 is already registered (group lamps)"
        );
        assert!(matches!(
            live.add(DeviceId(8), random_device_key(), "no spaces"),
            Err(RegistryError::BadGroupName(_))
        ));
        // Revoke a base device and an added one; unknown ids are refused.
        assert_eq!(live.revoke(DeviceId(2)).unwrap().group, GroupId(0));
        assert!(live.get(DeviceId(2)).is_none());
        assert!(matches!(
            live.revoke(DeviceId(2)),
            Err(RegistryError::Unknown(2))
        ));
        live.revoke(DeviceId(7)).unwrap();
        assert!(matches!(
            live.revoke(DeviceId(99)),
            Err(RegistryError::Unknown(99))
        ));
        // A revoked base device added again gets the new key, not the file's.
        let k2 = random_device_key();
        live.add(DeviceId(2), k2.clone(), "meters").unwrap();
        assert_eq!(live.get(DeviceId(2)).unwrap().key, k2);
        assert_eq!(live.len(), 3);
        let sizes = live.group_sizes();
        assert_eq!(sizes.get("lamps"), Some(&2));
        assert_eq!(sizes.get("meters"), Some(&1));
        // Written, it reloads to the same devices, groups and keys; mode 0600.
        live.write(&path).unwrap();
        let again = LiveRegistry::new(Arc::new(Registry::load(&path).unwrap()));
        assert_eq!(entries(&again), entries(&live));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<&str> = text.lines().skip(1).map(|l| &l[..1]).collect();
        assert_eq!(ids, ["1", "2", "3"], "sorted by id");
    }

    #[test]
    fn group_ids_past_the_base_are_named_here() {
        let mut live = LiveRegistry::default();
        assert_eq!(live.group_id("a"), None);
        let a = live.intern("a").unwrap();
        assert_eq!(live.intern("a").unwrap(), a);
        let b = live.intern("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(live.group_name(b), Some("b"));
        assert!(live.intern("").is_err());
        assert!(live.is_empty());
    }

    #[test]
    fn device_ids_parse_strictly() {
        assert_eq!(parse_device_id("0"), Ok(DeviceId(0)));
        assert_eq!(
            parse_device_id("18446744073709551615"),
            Ok(DeviceId(u64::MAX))
        );
        for bad in ["", "-1", "1.5", " 1", "18446744073709551616", "0x10"] {
            let e = parse_device_id(bad).unwrap_err();
            assert!(e.starts_with("bad device id"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn agent_token_is_stable_and_verifies_in_either_case() {
        let dir = TestDir::new("reg-token");
        let a = AgentToken::ensure(dir.path()).unwrap();
        let b = AgentToken::ensure(dir.path()).unwrap();
        assert_eq!(a.to_hex(), b.to_hex());
        assert!(a.verify(a.to_hex().as_bytes()));
        assert!(a.verify(a.to_hex().to_uppercase().as_bytes()));
        let mut wrong = a.to_hex().into_bytes();
        wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
        assert!(!a.verify(&wrong));
        assert!(!a.verify(b""));
        let file = std::fs::read_to_string(dir.path().join("agent.token")).unwrap();
        assert_eq!(file.trim(), a.to_hex());
    }

    #[test]
    fn damaged_secret_is_reported() {
        let dir = TestDir::new("reg-secret");
        std::fs::write(dir.path().join("secret"), b"short").unwrap();
        let e = ServerSecret::ensure(dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .contains("is damaged: expected exactly 32 bytes"),
            "{e}"
        );
    }
}
