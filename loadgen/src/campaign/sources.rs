//! `[source] addresses`: loopback source addresses, written as one string or a list of strings,
//! each an address ("127.0.1.7") or an inclusive range ("127.0.1.1-127.0.1.50").

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Most source addresses one campaign may list (a million devices need ~36).
pub const MAX_SOURCES: usize = 65_536;

/// Source addresses as written in the campaign; [`parse_sources`] checks and expands them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub struct SourceAddresses(pub Vec<String>);

impl SourceAddresses {
    /// Whether no address is listed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for SourceAddresses {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SourceAddresses;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address or range like \"127.0.1.1-127.0.1.50\", or a list of them")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(SourceAddresses(vec![s.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(SourceAddresses(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Checks and expands source addresses, in the order written. Refuses anything outside
/// 127.0.0.0/8 — load must never leave loopback — and duplicates.
pub fn parse_sources(spec: &SourceAddresses) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for entry in &spec.0 {
        let entry = entry.trim();
        let (first, last) = match entry.split_once('-') {
            Some((a, b)) => (loopback(a)?, loopback(b)?),
            None => {
                let a = loopback(entry)?;
                (a, a)
            }
        };
        let (lo, hi) = (u32::from(first), u32::from(last));
        if lo > hi {
            return Err(format!("range \"{entry}\" runs backwards"));
        }
        if out.len() + (hi - lo) as usize >= MAX_SOURCES {
            return Err(format!("more than {MAX_SOURCES} addresses"));
        }
        for ip in (lo..=hi).map(Ipv4Addr::from) {
            if !seen.insert(ip) {
                return Err(format!("{ip} is listed twice"));
            }
            out.push(ip);
        }
    }
    Ok(out)
}

fn loopback(s: &str) -> Result<Ipv4Addr, String> {
    let s = s.trim();
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) if ip.is_loopback() => Ok(ip),
        Ok(IpAddr::V4(ip)) => Err(format!(
            "{ip} is not a loopback address (127.0.0.0/8); load must never leave loopback"
        )),
        Ok(IpAddr::V6(ip)) => Err(format!(
            "{ip}: only IPv4 loopback sources (127.x.y.z) are supported"
        )),
        Err(_) => Err(format!("\"{s}\" is not an IPv4 address")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: &[&str]) -> SourceAddresses {
        SourceAddresses(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn expands_ranges_and_lists() {
        let ips = parse_sources(&spec(&["127.0.1.1-127.0.1.3", "127.0.2.9"])).unwrap();
        let want: Vec<Ipv4Addr> = ["127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.2.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(ips, want);
        // A range may cross an octet boundary.
        assert_eq!(
            parse_sources(&spec(&["127.0.1.255-127.0.2.0"]))
                .unwrap()
                .len(),
            2
        );
        assert!(parse_sources(&spec(&[])).unwrap().is_empty());
    }

    #[test]
    fn refuses_non_loopback_and_nonsense() {
        let err = parse_sources(&spec(&["10.0.0.1-10.0.0.5"])).unwrap_err();
        assert!(
            err.contains("not a loopback") && err.contains("10.0.0.1"),
            "{err}"
        );
        assert!(
            parse_sources(&spec(&["127.0.0.255-128.0.0.1"]))
                .unwrap_err()
                .contains("128.0.0.1")
        );
        assert!(parse_sources(&spec(&["::1"])).unwrap_err().contains("IPv4"));
        assert!(
            parse_sources(&spec(&["127.0.1.9-127.0.1.1"]))
                .unwrap_err()
                .contains("backwards")
        );
        assert!(
            parse_sources(&spec(&["127.0.1.1", "127.0.1.1"]))
                .unwrap_err()
                .contains("twice")
        );
        assert!(
            parse_sources(&spec(&["localhost"]))
                .unwrap_err()
                .contains("not an IPv4")
        );
        assert!(
            parse_sources(&spec(&["127.0.0.0-127.255.255.255"]))
                .unwrap_err()
                .contains("more than")
        );
    }
}
