//! The code store under `data_dir/code/`: content-addressed blobs (`blobs/<sha256 hex>`) and
//! the `groups` manifest naming each device group's current version, digest and size.
//!
//! Writes are atomic (temporary file, fsync, rename, directory fsync): a deploy writes its
//! blob first, then the manifest, so a crash leaves the old version or the new one, never a
//! manifest naming a missing or torn blob. Versions increase by one per deploy to a group,
//! starting at 1; deploying the blob that is already current changes nothing (idempotent).
//!
//! Manifest format, one group per line after the header:
//!
//! ```text
//! # tether code groups v1
//! lamps 3 5f3a…(64 hex digits) 65536
//! ```

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tether_protocol::{CodeVersion, Digest};

use crate::fsutil::{PUBLIC_MODE, from_hex, to_hex, write_atomic};
use crate::registry::valid_group_name;

pub use tether_protocol::code::DEFAULT_MAX_CODE_SIZE;

/// The store's directory under the data directory.
pub const DIR: &str = "code";
/// The first line of the manifest.
pub const HEADER: &str = "# tether code groups v1";
const MANIFEST: &str = "groups";
const BLOBS: &str = "blobs";

/// Why a deploy or the store failed, said so a person can act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodeStoreError {
    #[error("refusing to deploy an empty blob to group {group:?}")]
    Empty { group: String },
    #[error(
        "blob of {size} bytes for group {group:?} is over the limit of {limit} bytes (raise --max-code-size)"
    )]
    TooLarge {
        group: String,
        size: u64,
        limit: u64,
    },
    #[error("bad group name {0:?}: use 1 to 32 of A-Z a-z 0-9 _ -")]
    BadGroupName(String),
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}:{line}: {reason}", path.display())]
    BadManifest {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("blob {} of group {group:?} is damaged: its SHA-256 is {got}, not {expected}", path.display())]
    Damaged {
        group: String,
        path: PathBuf,
        expected: Digest,
        got: Digest,
    },
}

/// A group's current code, as the manifest records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupCode {
    pub version: CodeVersion,
    pub digest: Digest,
    pub size: u64,
}

/// A group's current code with its bytes: what shards roll out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deployed {
    pub group: String,
    pub version: CodeVersion,
    pub digest: Digest,
    pub blob: Bytes,
    /// The blob was already current: nothing changed.
    pub unchanged: bool,
}

/// The code store. One owner writes it (the deployer thread); shards get [`Deployed`] copies.
#[derive(Debug)]
pub struct CodeStore {
    dir: PathBuf,
    max_size: u64,
    groups: BTreeMap<String, GroupCode>,
}

impl CodeStore {
    /// Opens (creating if needed) the store under `data_dir`, accepting blobs up to `max_size`.
    pub fn open(data_dir: &Path, max_size: u64) -> Result<CodeStore, CodeStoreError> {
        let dir = data_dir.join(DIR);
        let blobs = dir.join(BLOBS);
        std::fs::create_dir_all(&blobs).map_err(|source| CodeStoreError::Write {
            path: blobs.clone(),
            source,
        })?;
        let manifest = dir.join(MANIFEST);
        let groups = match std::fs::read(&manifest) {
            Ok(data) => parse_manifest(&data, &manifest)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(CodeStoreError::Read {
                    path: manifest,
                    source,
                });
            }
        };
        Ok(CodeStore {
            dir,
            max_size,
            groups,
        })
    }

    /// The current code of `group`.
    pub fn current(&self, group: &str) -> Option<&GroupCode> {
        self.groups.get(group)
    }

    /// Every group with code, by name.
    pub fn groups(&self) -> impl Iterator<Item = (&str, &GroupCode)> {
        self.groups.iter().map(|(g, c)| (g.as_str(), c))
    }

    /// The largest blob accepted.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(BLOBS).join(to_hex(&digest.0))
    }

    /// Reads `group`'s current blob and checks its digest.
    pub fn load(&self, group: &str) -> Result<Option<Deployed>, CodeStoreError> {
        let Some(c) = self.groups.get(group) else {
            return Ok(None);
        };
        let path = self.blob_path(&c.digest);
        let data = std::fs::read(&path).map_err(|source| CodeStoreError::Read {
            path: path.clone(),
            source,
        })?;
        let got = Digest::of(&data);
        if got != c.digest {
            return Err(CodeStoreError::Damaged {
                group: group.to_owned(),
                path,
                expected: c.digest,
                got,
            });
        }
        Ok(Some(Deployed {
            group: group.to_owned(),
            version: c.version,
            digest: c.digest,
            blob: Bytes::from(data),
            unchanged: true,
        }))
    }

    /// Makes `blob` the current code of `group`: a new version (current + 1), or nothing new
    /// if it is already current. Durable when this returns.
    pub fn deploy(&mut self, group: &str, blob: Bytes) -> Result<Deployed, CodeStoreError> {
        if !valid_group_name(group) {
            return Err(CodeStoreError::BadGroupName(group.to_owned()));
        }
        let size = blob.len() as u64;
        if size == 0 {
            return Err(CodeStoreError::Empty {
                group: group.to_owned(),
            });
        }
        if size > self.max_size {
            return Err(CodeStoreError::TooLarge {
                group: group.to_owned(),
                size,
                limit: self.max_size,
            });
        }
        let digest = Digest::of(&blob);
        let prev = self.groups.get(group).copied();
        if let Some(p) = prev.filter(|p| p.digest == digest) {
            return Ok(Deployed {
                group: group.to_owned(),
                version: p.version,
                digest,
                blob,
                unchanged: true,
            });
        }
        let version = CodeVersion(prev.map_or(0, |p| p.version.0) + 1);
        // Content-addressed: an existing file of that name already holds these bytes (it was
        // renamed into place whole), so it is not rewritten.
        let path = self.blob_path(&digest);
        if !path.exists() {
            write_atomic(&path, &blob, PUBLIC_MODE)
                .map_err(|source| CodeStoreError::Write { path, source })?;
        }
        let mut groups = self.groups.clone();
        groups.insert(
            group.to_owned(),
            GroupCode {
                version,
                digest,
                size,
            },
        );
        let manifest = self.dir.join(MANIFEST);
        write_atomic(&manifest, render_manifest(&groups).as_bytes(), PUBLIC_MODE).map_err(
            |source| CodeStoreError::Write {
                path: manifest,
                source,
            },
        )?;
        self.groups = groups;
        Ok(Deployed {
            group: group.to_owned(),
            version,
            digest,
            blob,
            unchanged: false,
        })
    }
}

fn render_manifest(groups: &BTreeMap<String, GroupCode>) -> String {
    let mut s = String::from(HEADER);
    s.push('\n');
    for (g, c) in groups {
        s.push_str(&format!(
            "{g} {} {} {}\n",
            c.version.0,
            to_hex(&c.digest.0),
            c.size
        ));
    }
    s
}

fn parse_manifest(data: &[u8], path: &Path) -> Result<BTreeMap<String, GroupCode>, CodeStoreError> {
    let bad = |line: usize, reason: &str| CodeStoreError::BadManifest {
        path: path.to_owned(),
        line,
        reason: reason.to_owned(),
    };
    let text = std::str::from_utf8(data).map_err(|_| bad(1, "not UTF-8"))?;
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(bad(1, &format!("line 1 must be `{HEADER}`")));
    }
    let mut groups = BTreeMap::new();
    for (i, line) in lines.enumerate() {
        let lineno = i + 2;
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split(' ').collect();
        let [group, version, digest, size] = f[..] else {
            return Err(bad(lineno, "expected `group version sha256hex size`"));
        };
        if !valid_group_name(group) {
            return Err(bad(lineno, &format!("bad group name {group:?}")));
        }
        let version = version
            .parse()
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| bad(lineno, "version must be a positive integer"))?;
        let digest = from_hex::<32>(digest.as_bytes())
            .ok_or_else(|| bad(lineno, "digest must be 64 hex digits"))?;
        let size = size
            .parse()
            .ok()
            .filter(|&s| s > 0)
            .ok_or_else(|| bad(lineno, "size must be a positive integer"))?;
        let code = GroupCode {
            version: CodeVersion(version),
            digest: Digest(digest),
            size,
        };
        if groups.insert(group.to_owned(), code).is_some() {
            return Err(bad(lineno, &format!("group {group:?} is listed twice")));
        }
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::TestDir;

    #[test]
    fn deploys_version_monotonically_and_survive_reopening() {
        let dir = TestDir::new("codestore");
        let mut s = CodeStore::open(dir.path(), 1024).unwrap();
        assert!(s.current("lamps").is_none());
        let a = s.deploy("lamps", Bytes::from_static(b"one")).unwrap();
        assert_eq!((a.version, a.unchanged), (CodeVersion(1), false));
        let b = s.deploy("lamps", Bytes::from_static(b"two")).unwrap();
        assert_eq!(b.version, CodeVersion(2));
        // The current blob again: nothing new.
        let again = s.deploy("lamps", Bytes::from_static(b"two")).unwrap();
        assert_eq!((again.version, again.unchanged), (CodeVersion(2), true));
        // Back to an older blob: a new version (versions never go back).
        let c = s.deploy("lamps", Bytes::from_static(b"one")).unwrap();
        assert_eq!(c.version, CodeVersion(3));
        s.deploy("meters", Bytes::from_static(b"m")).unwrap();

        let s = CodeStore::open(dir.path(), 1024).unwrap();
        assert_eq!(
            s.current("lamps"),
            Some(&GroupCode {
                version: CodeVersion(3),
                digest: Digest::of(b"one"),
                size: 3
            })
        );
        let loaded = s.load("lamps").unwrap().unwrap();
        assert_eq!(&loaded.blob[..], b"one");
        assert_eq!(s.groups().count(), 2);
        // Two distinct blobs on disk (content-addressed), no temporary files left.
        let blobs = std::fs::read_dir(dir.path().join("code/blobs")).unwrap();
        assert_eq!(blobs.count(), 3);
    }

    #[test]
    fn rejects_empty_oversized_and_badly_named() {
        let dir = TestDir::new("codestore-bad");
        let mut s = CodeStore::open(dir.path(), 4).unwrap();
        let e = s.deploy("lamps", Bytes::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "refusing to deploy an empty blob to group \"lamps\""
        );
        let e = s.deploy("lamps", Bytes::from_static(b"12345")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("blob of 5 bytes for group \"lamps\" is over the limit of 4 bytes"),
            "{e}"
        );
        assert!(matches!(
            s.deploy("no/slash", Bytes::from_static(b"1")),
            Err(CodeStoreError::BadGroupName(_))
        ));
        assert!(s.current("lamps").is_none());
    }

    #[test]
    fn damaged_blob_and_bad_manifest_are_reported() {
        let dir = TestDir::new("codestore-damaged");
        let mut s = CodeStore::open(dir.path(), 1024).unwrap();
        let d = s.deploy("lamps", Bytes::from_static(b"good")).unwrap();
        let blob = dir.path().join("code/blobs").join(to_hex(&d.digest.0));
        std::fs::write(&blob, b"evil").unwrap();
        let e = s.load("lamps").unwrap_err();
        assert!(matches!(e, CodeStoreError::Damaged { .. }), "{e}");

        let manifest = dir.path().join("code/groups");
        std::fs::write(&manifest, format!("{HEADER}\nlamps x ab 3\n")).unwrap();
        let e = CodeStore::open(dir.path(), 1024).unwrap_err();
        assert!(
            e.to_string()
                .ends_with(":2: version must be a positive integer"),
            "{e}"
        );
        std::fs::write(&manifest, "nope\n").unwrap();
        assert!(CodeStore::open(dir.path(), 1024).is_err());
    }
}
