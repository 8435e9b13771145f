//! The open-file limit: raise the soft limit to the hard one at start, and refuse early, in one
//! clear line, a configuration that needs more descriptors than the process may open.

use std::io;

/// Descriptors the server needs besides connections: listeners, io_uring rings and eventfds,
/// the admin socket, data files, stdio. Deliberately generous.
pub const RESERVED_FDS: u64 = 100;

/// A configuration the open-file limit cannot carry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    #[error(
        "open-file limit is {limit} but {what} needs about {needed} descriptors; raise it with \
         `ulimit -n` / LimitNOFILE= / tuning/, or run more nodes"
    )]
    TooLow {
        limit: u64,
        needed: u64,
        what: String,
    },
    #[error("cannot read the open-file limit: {0}")]
    Io(#[from] io::Error),
}

fn get() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// The current (soft, hard) open-file limits. `u64::MAX` means unlimited.
pub fn nofile() -> io::Result<(u64, u64)> {
    let lim = get()?;
    Ok((lim.rlim_cur as u64, lim.rlim_max as u64))
}

/// Raises the soft open-file limit to the hard one and returns the new (soft, hard). An
/// unlimited hard limit is capped at the kernel's `fs.nr_open`, which setrlimit accepts.
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let mut lim = get()?;
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if lim.rlim_cur < target {
        lim.rlim_cur = target;
        // SAFETY: `lim` is a valid rlimit read just above; only the soft limit changed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    nofile()
}

/// Checks that `needed` descriptors (plus [`RESERVED_FDS`]) fit under the current soft limit.
/// `what` names the demand, e.g. `"--max-connections 50000"`.
pub fn check_capacity(needed: u64, what: &str) -> Result<(), LimitError> {
    let (soft, _) = nofile()?;
    check_capacity_against(soft, needed, what)
}

/// [`check_capacity`] against a given limit.
pub fn check_capacity_against(limit: u64, needed: u64, what: &str) -> Result<(), LimitError> {
    let needed = needed.saturating_add(RESERVED_FDS);
    if needed > limit {
        return Err(LimitError::TooLow {
            limit,
            needed,
            what: what.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_says_the_limit_the_need_and_the_fix() {
        let e = check_capacity_against(20_000, 50_000, "--max-connections 50000").unwrap_err();
        assert_eq!(
            e.to_string(),
            "open-file limit is 20000 but --max-connections 50000 needs about 50100 descriptors; \
             raise it with `ulimit -n` / LimitNOFILE= / tuning/, or run more nodes"
        );
        assert!(check_capacity_against(20_000, 19_900, "x").is_ok());
        assert!(check_capacity_against(20_000, 19_901, "x").is_err());
        assert!(check_capacity_against(u64::MAX, u64::MAX, "x").is_ok());
    }

    #[test]
    fn raise_sets_soft_to_hard() {
        let (soft, hard) = raise_nofile().unwrap();
        assert!(soft >= 1);
        assert!(soft == hard || hard == u64::MAX);
        assert!(check_capacity(0, "nothing").is_ok());
        assert!(check_capacity(soft, "everything").is_err() || soft == u64::MAX);
    }
}
