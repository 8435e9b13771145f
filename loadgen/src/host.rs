//! What this host offers and what a run uses of it, read from `/proc` without unsafe code:
//! open-file limits, the ephemeral port range, RSS, kernel socket memory and the machine's identity.

use std::io;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// Ports the kernel hands out per (source address, destination) when
/// `/proc/sys/net/ipv4/ip_local_port_range` cannot be read: the Linux default 32768–60999.
pub const DEFAULT_LOCAL_PORTS: u64 = 60999 - 32768 + 1;

/// Limits of this host that decide how many devices one process can simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// `RLIMIT_NOFILE` soft limit of this process (the driver raises it to the hard limit).
    pub fd_soft: u64,
    /// `RLIMIT_NOFILE` hard limit: what a process may raise its soft limit to without privilege.
    pub fd_hard: u64,
    /// Ephemeral ports available per source address and destination.
    pub local_ports: u64,
    /// Cores this process may run on.
    pub cores: usize,
}

impl HostLimits {
    /// Reads the limits of this process and host.
    pub fn probe() -> io::Result<HostLimits> {
        let limits = std::fs::read_to_string("/proc/self/limits")?;
        let (fd_soft, fd_hard) = parse_nofile_limits(&limits).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no `Max open files` line in /proc/self/limits",
            )
        })?;
        let local_ports = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| parse_port_range(&t))
            .unwrap_or(DEFAULT_LOCAL_PORTS);
        Ok(HostLimits {
            fd_soft,
            fd_hard,
            local_ports,
            cores: available_cores(),
        })
    }
}

/// Cores this process may run on (1 if unknown).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Parses the `Max open files` line of `/proc/<pid>/limits` into (soft, hard);
/// `unlimited` becomes `u64::MAX`.
pub fn parse_nofile_limits(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let num = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    Some((num(fields.next()?)?, num(fields.next()?)?))
}

/// Parses `/proc/sys/net/ipv4/ip_local_port_range` ("32768\t60999") into a port count.
pub fn parse_port_range(text: &str) -> Option<u64> {
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (hi >= lo).then(|| hi - lo + 1)
}

/// The kernel page size, read once from the first `KernelPageSize` line of `/proc/self/smaps`
/// (no `sysconf` call, so the crate stays free of unsafe code); 4096 if it cannot be read.
pub fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        use std::io::BufRead;
        let Ok(f) = std::fs::File::open("/proc/self/smaps") else {
            return 4096;
        };
        io::BufReader::new(f)
            .lines()
            .take(64)
            .map_while(Result::ok)
            .find_map(|l| parse_kb_line(&l, "KernelPageSize:"))
            .unwrap_or(4096)
    })
}

/// Resident set size of this process in bytes, from `/proc/self/statm`.
pub fn rss_self() -> io::Result<u64> {
    rss_from("/proc/self/statm")
}

/// Resident set size of process `pid` in bytes, from `/proc/<pid>/statm`.
pub fn rss_of(pid: u32) -> io::Result<u64> {
    rss_from(&format!("/proc/{pid}/statm"))
}

fn rss_from(path: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    let pages = parse_statm_resident(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: unexpected format"),
        )
    })?;
    Ok(pages * page_size())
}

/// The resident page count: the second field of a `statm` line.
pub fn parse_statm_resident(text: &str) -> Option<u64> {
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Clock ticks per second of the `utime`/`stime` fields of `/proc/<pid>/stat`: `USER_HZ`, which
/// is 100 on every Linux architecture (it is ABI, unlike the kernel's `HZ`), so a CPU-time sample
/// resolves 10 ms. Over a window of a few seconds of server CPU that is well under 1%.
pub const USER_HZ: f64 = 100.0;

/// CPU time (user + system, all threads) process `pid` has used so far, in seconds, from
/// `/proc/<pid>/stat`.
pub fn cpu_of(pid: u32) -> io::Result<f64> {
    cpu_from(&format!("/proc/{pid}/stat"))
}

/// CPU time (user + system, all threads) this process has used so far, in seconds.
pub fn cpu_self() -> io::Result<f64> {
    cpu_from("/proc/self/stat")
}

fn cpu_from(path: &str) -> io::Result<f64> {
    let text = std::fs::read_to_string(path)?;
    parse_stat_cpu_s(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: unexpected format"),
        )
    })
}

/// `utime + stime` of a `/proc/<pid>/stat` line, in seconds. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so fields are counted after the
/// last `)`: `state` is field 3, `utime` field 14, `stime` field 15.
pub fn parse_stat_cpu_s(text: &str) -> Option<f64> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// The `TCP:` line of `/proc/net/sockstat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSockStat {
    /// Sockets in use (established and listening, not time-wait).
    pub inuse: u64,
    /// Orphaned sockets (closed by the process, still in the kernel).
    pub orphan: u64,
    /// Sockets in TIME_WAIT.
    pub tw: u64,
    /// Allocated TCP sockets.
    pub alloc: u64,
    /// Pages of socket buffer memory the kernel charges to TCP (compare with `net.ipv4.tcp_mem`).
    pub mem_pages: u64,
}

/// Reads the `TCP:` line of `/proc/net/sockstat`.
pub fn sockstat() -> io::Result<TcpSockStat> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    parse_sockstat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no TCP line in /proc/net/sockstat",
        )
    })
}

/// Parses the `TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 1` line.
pub fn parse_sockstat(text: &str) -> Option<TcpSockStat> {
    let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let mut s = TcpSockStat::default();
    let mut words = line.split_whitespace();
    while let (Some(k), Some(v)) = (words.next(), words.next()) {
        let v: u64 = v.parse().ok()?;
        match k {
            "inuse" => s.inuse = v,
            "orphan" => s.orphan = v,
            "tw" => s.tw = v,
            "alloc" => s.alloc = v,
            "mem" => s.mem_pages = v,
            _ => {}
        }
    }
    Some(s)
}

/// Kernel slab memory in bytes, from the `Slab:` line of `/proc/meminfo` (socket structs live there).
pub fn slab_bytes() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    parse_meminfo_slab(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no Slab line in /proc/meminfo"))
}

/// Parses the `Slab:  123456 kB` line of `/proc/meminfo` into bytes.
pub fn parse_meminfo_slab(text: &str) -> Option<u64> {
    text.lines().find_map(|l| parse_kb_line(l, "Slab:"))
}

fn parse_kb_line(line: &str, key: &str) -> Option<u64> {
    let mut it = line.strip_prefix(key)?.split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") => Some(n * 1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// The machine a report was measured on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// Cores available to the process.
    pub cores: usize,
    /// `/proc/sys/kernel/osrelease`.
    pub kernel_version: String,
    /// The first `model name` of `/proc/cpuinfo` ("unknown" if absent, e.g. on some arm64 kernels).
    pub model_name: String,
}

impl Machine {
    /// Reads the machine's identity; fields that cannot be read say "unknown".
    pub fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        Machine {
            cores: available_cores(),
            kernel_version: read("/proc/sys/kernel/osrelease")
                .map_or_else(|| "unknown".into(), |s| s.trim().to_owned()),
            model_name: read("/proc/cpuinfo")
                .and_then(|t| parse_cpu_model(&t))
                .unwrap_or_else(|| "unknown".into()),
        }
    }
}

/// The first `model name : ...` value of `/proc/cpuinfo`.
pub fn parse_cpu_model(text: &str) -> Option<String> {
    text.lines()
        .filter(|l| l.starts_with("model name"))
        .find_map(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 20000                files     \n";
        assert_eq!(parse_nofile_limits(limits), Some((1024, 20000)));
        assert_eq!(
            parse_nofile_limits("Max open files  unlimited unlimited files"),
            Some((u64::MAX, u64::MAX))
        );
        assert_eq!(parse_port_range("32768\t60999\n"), Some(28232));
        assert_eq!(
            parse_statm_resident("5000 1234 300 10 0 900 0\n"),
            Some(1234)
        );
        let sock =
            "sockets: used 120\nTCP: inuse 5 orphan 1 tw 2 alloc 7 mem 3\nUDP: inuse 1 mem 0\n";
        assert_eq!(
            parse_sockstat(sock),
            Some(TcpSockStat {
                inuse: 5,
                orphan: 1,
                tw: 2,
                alloc: 7,
                mem_pages: 3
            })
        );
        assert_eq!(
            parse_meminfo_slab("MemTotal: 10 kB\nSlab:     2048 kB\n"),
            Some(2048 * 1024)
        );
        let stat = "4242 (tether (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0 3 0 \
                    100 2000000 500 18446744073709551615\n";
        assert_eq!(parse_stat_cpu_s(stat), Some(18.01));
        assert_eq!(parse_stat_cpu_s("garbage"), None);
        let cpu = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(parse_cpu_model(cpu).as_deref(), Some("AMD EPYC 7B13"));
    }

    #[test]
    fn reads_this_host() {
        let limits = HostLimits::probe().unwrap();
        assert!(limits.fd_hard >= limits.fd_soft && limits.cores >= 1);
        assert!(rss_self().unwrap() > 0);
        assert!(cpu_self().unwrap() >= 0.0);
        assert!(page_size().is_power_of_two());
        assert!(!Machine::probe().kernel_version.is_empty());
    }
}
