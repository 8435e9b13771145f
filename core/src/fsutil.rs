//! Small file helpers for the data directory: atomic writes with a chosen mode, random secrets
//! created once (0600) and read back on every later run, and the check that a secret's file is
//! still the owner's alone.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rand::RngCore;

/// Mode for files holding secrets: owner read/write only.
pub const SECRET_MODE: u32 = 0o600;
/// Mode for files anyone on the host may read (certificates, code blobs).
pub const PUBLIC_MODE: u32 = 0o644;

/// Writes `bytes` to `path` atomically: a temporary file beside it is written, fsynced and
/// renamed over `path`, then the directory is fsynced, so a crash leaves either the old file or
/// the new one, never half of one. The file is created with `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes a file through `fill` atomically (see [`write_atomic`]); for large files written in
/// pieces. `fill` gets a buffered writer over the temporary file.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut io::BufWriter<&mut File>) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        {
            let mut w = io::BufWriter::with_capacity(1 << 16, &mut f);
            fill(&mut w)?;
            w.flush()?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn temp_path(path: &Path) -> PathBuf {
    // Unique per process and per call, so concurrent writers never share a temporary file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}.{n}", std::process::id()));
    path.with_file_name(name)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// An exclusive advisory lock (`flock`) on a file, held until dropped or the process ends (so
/// a crash never leaves it behind).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Takes the lock on `path` (created, mode 0600, if missing) without waiting; `Ok(None)`
    /// if another open file description holds it (another process, or another lock taken in
    /// this one).
    pub fn try_lock(path: &Path) -> io::Result<Option<FileLock>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(SECRET_MODE)
            .open(path)?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own and keep open for the lock's life.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(FileLock { _file: file }));
        }
        match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            e => Err(e),
        }
    }

    /// A lock held through `fd`, a descriptor of the locked open file (handed over by the
    /// process that took it: an `flock` belongs to the open file, not to the process).
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> FileLock {
        FileLock {
            _file: File::from(fd),
        }
    }

    /// The locked file's descriptor (to hand the lock on).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self._file.as_fd()
    }
}

/// Creates `path` with `bytes` and `mode` unless it exists, atomically: the content is written
/// to a temporary file, fsynced, then hard-linked into place (a link never replaces a file), so
/// two processes racing on first run agree on one content and a crash never leaves half a file.
/// Returns whether this call created it.
pub fn create_once(path: &Path, bytes: &[u8], mode: u32) -> io::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => sync_dir(path).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// Fills `out` with random bytes from the OS-seeded generator.
pub fn random_bytes(out: &mut [u8]) {
    rand::rng().fill_bytes(out);
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Decodes exactly `N` bytes of hex (either case); `None` if the length or a digit is wrong.
pub fn from_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Compares two byte strings in time that depends only on their lengths, so a token check
/// does not leak how many leading bytes matched (`subtle`'s comparison, which keeps the
/// optimiser from turning it into an early exit).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The permission bits of `path` (`0o600`, …), following symlinks.
pub fn mode_of(path: &Path) -> io::Result<u32> {
    Ok(fs::metadata(path)?.permissions().mode() & 0o7777)
}

/// A warning, naming the file, when `path` exists and group or others may read (or write) it;
/// `holds` says what is in it. `None` when it is the owner's alone or does not exist.
pub fn loose_secret_warning(path: &Path, holds: &str) -> Option<String> {
    let mode = mode_of(path).ok()?;
    let how = if mode & 0o044 != 0 {
        "readable"
    } else if mode & 0o022 != 0 {
        "writable"
    } else {
        return None;
    };
    Some(format!(
        "{} is {how} by group or others (mode {mode:04o}) and holds {holds}: chmod 600 {}",
        path.display(),
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_lock_is_exclusive_until_dropped() {
        let dir = crate::testdir::TestDir::new("fsutil-lock");
        let path = dir.path().join("x.lock");
        let held = FileLock::try_lock(&path).unwrap();
        assert!(held.is_some());
        assert!(
            FileLock::try_lock(&path).unwrap().is_none(),
            "a second lock must wait"
        );
        drop(held);
        assert!(FileLock::try_lock(&path).unwrap().is_some());
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn hex_round_trips_and_rejects_bad_input() {
        let bytes = [0u8, 1, 0xab, 0xff];
        let s = to_hex(&bytes);
        assert_eq!(s, "0001abff");
        assert_eq!(from_hex::<4>(s.as_bytes()), Some(bytes));
        assert_eq!(from_hex::<4>(b"0001ABFF"), Some(bytes));
        assert_eq!(from_hex::<4>(b"0001abf"), None);
        assert_eq!(from_hex::<4>(b"0001abfg"), None);
    }

    #[test]
    fn constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn loose_secrets_are_named_with_their_mode() {
        let dir = crate::testdir::TestDir::new("fsutil-loose");
        let p = dir.path().join("agent.token");
        assert_eq!(
            loose_secret_warning(&p, "the agent token"),
            None,
            "missing file"
        );
        write_atomic(&p, b"x", SECRET_MODE).unwrap();
        assert_eq!(loose_secret_warning(&p, "the agent token"), None);
        for (mode, how) in [
            (0o644, "readable"),
            (0o640, "readable"),
            (0o620, "writable"),
        ] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let w = loose_secret_warning(&p, "the agent token").unwrap();
            let shown = p.display();
            assert_eq!(
                w,
                format!(
                    "{shown} is {how} by group or others (mode {mode:04o}) and holds the agent \
                     token: chmod 600 {shown}"
                )
            );
        }
    }

    #[test]
    fn write_atomic_sets_mode_and_replaces() {
        let dir = crate::testdir::TestDir::new("fsutil");
        let p = dir.path().join("f");
        write_atomic(&p, b"one", SECRET_MODE).unwrap();
        write_atomic(&p, b"two", SECRET_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p).unwrap(), 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
