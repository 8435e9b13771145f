//! `[[attack]]`: hostile clients run next to the well-behaved devices, each in its own time
//! window, so the report can set the devices' admission latency under attack against the calm
//! figure (see `crate::run::attack` for what each kind sends).
//!
//! Two shapes: the *held* kinds open `connections` (at `rate_per_sec`, default
//! [`DEFAULT_OPEN_RATE`]) and hold them until the attack ends; the *churning* kinds open
//! `rate_per_sec` connections per second, with at most `connections` of them open at once
//! (default [`DEFAULT_MAX_OPEN`]; an opening past that is skipped and counted). Every attack
//! stops by itself at `start_s + duration_s` and closes what it holds.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{Campaign, Problems, SourceAddresses, parse_sources};

/// Source addresses of an attack that names none: distinct from any device's unless a
/// campaign lists them for its devices (which validation refuses).
pub const DEFAULT_ATTACK_SOURCES: &str = "127.66.0.1-127.66.0.8";
/// Connections per second a held attack opens when it names no `rate_per_sec`.
pub const DEFAULT_OPEN_RATE: f64 = 5_000.0;
/// Most connections a churning attack holds open at once when it names no `connections`.
pub const DEFAULT_MAX_OPEN: u64 = 1_000;
/// Largest `connections` or `rate_per_sec` one attack may ask for.
pub const MAX_ATTACK: u64 = 100_000;
/// Most distinct windows (attack labels) a campaign may have besides `calm`.
pub const MAX_WINDOWS: usize = 63;

/// What an attacker does on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// Open TCP connections, send nothing, hold them.
    Silent,
    /// Send one complete TLS 1.3 ClientHello, then nothing; hold.
    StalledHello,
    /// Send the first part of a ClientHello record, then nothing; hold.
    PartialHello,
    /// Random bytes instead of a ClientHello, at a rate.
    GarbageBeforeTls,
    /// A full TLS handshake, then random bytes or TLS records with garbage frames inside.
    GarbageAfterTls,
    /// Connect and close at once, at a rate.
    Churn,
    /// A full TLS handshake, then a `Hello` naming a connected device with a wrong proof.
    BadProof,
}

impl AttackKind {
    /// Every kind, in the order reports list them.
    pub const ALL: [AttackKind; 7] = [
        AttackKind::Silent,
        AttackKind::StalledHello,
        AttackKind::PartialHello,
        AttackKind::GarbageBeforeTls,
        AttackKind::GarbageAfterTls,
        AttackKind::Churn,
        AttackKind::BadProof,
    ];

    /// The name used in campaigns and reports.
    pub fn name(self) -> &'static str {
        match self {
            AttackKind::Silent => "silent",
            AttackKind::StalledHello => "stalled_hello",
            AttackKind::PartialHello => "partial_hello",
            AttackKind::GarbageBeforeTls => "garbage_before_tls",
            AttackKind::GarbageAfterTls => "garbage_after_tls",
            AttackKind::Churn => "churn",
            AttackKind::BadProof => "bad_proof",
        }
    }

    /// Whether the attack opens a fixed number of connections and holds them.
    pub fn holds(self) -> bool {
        matches!(
            self,
            AttackKind::Silent | AttackKind::StalledHello | AttackKind::PartialHello
        )
    }

    /// Whether the attack completes a TLS handshake on each connection.
    pub fn uses_tls(self) -> bool {
        matches!(self, AttackKind::GarbageAfterTls | AttackKind::BadProof)
    }
}

/// One attack of a campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attack {
    /// What it does.
    pub kind: AttackKind,
    /// Held kinds: connections opened and held (required). Churning kinds: the most open at
    /// once (default [`DEFAULT_MAX_OPEN`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// Churning kinds: connections opened per second (required). Held kinds: how fast the
    /// `connections` are opened (default [`DEFAULT_OPEN_RATE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_sec: Option<f64>,
    /// Seconds from the start of the ramp.
    pub start_s: f64,
    /// Seconds it lasts; it closes everything at `start_s + duration_s`.
    pub duration_s: f64,
    /// Loopback source addresses of the attacker (default [`DEFAULT_ATTACK_SOURCES`]); must
    /// not be the devices' own.
    #[serde(default, skip_serializing_if = "SourceAddresses::is_empty")]
    pub addresses: SourceAddresses,
    /// The report window this attack's time counts for (default: its kind's name). Attacks
    /// that share a label, e.g. `"all"`, make one window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
}

impl Attack {
    /// Its window label.
    pub fn window_label(&self) -> &str {
        self.window.as_deref().unwrap_or(self.kind.name())
    }

    /// Connections opened per second.
    pub fn open_rate(&self) -> f64 {
        self.rate_per_sec.unwrap_or(DEFAULT_OPEN_RATE)
    }

    /// Most of its connections open at once.
    pub fn max_open(&self) -> u64 {
        self.connections.unwrap_or(DEFAULT_MAX_OPEN)
    }

    /// Held kinds: connections to open in all; churning kinds: no limit but the time.
    pub fn total(&self) -> Option<u64> {
        self.kind.holds().then(|| self.max_open())
    }

    /// Its source addresses, expanded (the default if it names none).
    pub fn sources(&self) -> Result<Vec<Ipv4Addr>, String> {
        if self.addresses.is_empty() {
            parse_sources(&SourceAddresses(vec![DEFAULT_ATTACK_SOURCES.to_owned()]))
        } else {
            parse_sources(&self.addresses)
        }
    }

    /// Whether it runs at `t` seconds from the start of the ramp.
    pub fn active_at(&self, t: f64) -> bool {
        t >= self.start_s && t < self.start_s + self.duration_s
    }
}

impl Campaign {
    /// The report windows: `calm` first, then each attack label in order of first use.
    pub fn windows(&self) -> Vec<String> {
        let mut w = vec!["calm".to_owned()];
        for a in &self.attack {
            if !w.iter().any(|l| l == a.window_label()) {
                w.push(a.window_label().to_owned());
            }
        }
        w
    }

    /// Most attack connections open at once, over the attacks' time windows (each attack's
    /// most open, summed over the attacks running together at the worst instant).
    pub fn attack_fds_peak(&self) -> u64 {
        self.attack
            .iter()
            .map(|at| {
                self.attack
                    .iter()
                    .filter(|a| a.active_at(at.start_s))
                    .map(Attack::max_open)
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0)
    }

    pub(super) fn validate_attacks(&self, p: &mut Problems, end: f64) {
        let devices = parse_sources(&self.source.addresses).unwrap_or_default();
        for (i, a) in self.attack.iter().enumerate() {
            let key = |k: &str| format!("attack[{i}].{k}");
            let kind = a.kind.name();
            if !(a.start_s.is_finite() && a.start_s >= 0.0) {
                p.add(key("start_s"), format!("must be ≥ 0 (got {})", a.start_s));
            }
            p.positive(&key("duration_s"), a.duration_s);
            if a.start_s + a.duration_s > end {
                p.add(
                    key("duration_s"),
                    format!(
                        "the attack must end within the planned run: start_s + duration_s ≤ \
                         {end:.1} s (got {})",
                        a.start_s + a.duration_s
                    ),
                );
            }
            match (a.kind.holds(), a.connections, a.rate_per_sec) {
                (true, None, _) => p.add(key("connections"), format!("required for {kind}")),
                (false, _, None) => p.add(key("rate_per_sec"), format!("required for {kind}")),
                _ => {}
            }
            if let Some(n) = a.connections.filter(|n| !(1..=MAX_ATTACK).contains(n)) {
                p.add(
                    key("connections"),
                    format!("must be 1..={MAX_ATTACK} (got {n})"),
                );
            }
            if let Some(r) = a.rate_per_sec {
                if !(r.is_finite() && r > 0.0 && r <= MAX_ATTACK as f64) {
                    p.add(
                        key("rate_per_sec"),
                        format!("must be above 0 and at most {MAX_ATTACK} (got {r})"),
                    );
                }
            }
            match a.sources() {
                Err(e) => p.add(key("addresses"), e),
                Ok(ips) => {
                    if let Some(ip) = ips.iter().find(|ip| devices.contains(ip)) {
                        p.add(
                            key("addresses"),
                            format!(
                                "{ip} is also a device source address; an attacker's must differ"
                            ),
                        );
                    }
                }
            }
            if let Some(w) = &a.window {
                if w.trim().is_empty() || w == "calm" {
                    p.add(
                        key("window"),
                        "must be a non-empty label other than \"calm\"",
                    );
                }
            }
        }
        if self.windows().len() > MAX_WINDOWS + 1 {
            p.add(
                "attack",
                format!("at most {MAX_WINDOWS} distinct windows (attack labels)"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn campaign(attacks: &str) -> Result<Campaign, super::super::CampaignError> {
        Campaign::parse(
            &format!(
                "devices = 100\nramp_per_sec = 10\nduration_s = 10\nserver.spawn = true\n{attacks}"
            ),
            "<test>",
        )
    }

    #[test]
    fn attacks_parse_with_defaults_and_windows() {
        let c = campaign(
            r#"
            [[attack]]
            kind = "silent"
            connections = 300
            start_s = 1
            duration_s = 2
            [[attack]]
            kind = "churn"
            rate_per_sec = 500
            start_s = 2.5
            duration_s = 3
            window = "all"
            [[attack]]
            kind = "bad_proof"
            rate_per_sec = 50
            connections = 20
            start_s = 4
            duration_s = 2
            window = "all"
            "#,
        )
        .unwrap();
        assert_eq!(c.windows(), ["calm", "silent", "all"]);
        let a = &c.attack[0];
        assert_eq!((a.total(), a.open_rate()), (Some(300), DEFAULT_OPEN_RATE));
        assert_eq!(a.sources().unwrap().len(), 8);
        assert_eq!(c.attack[1].total(), None);
        assert_eq!(c.attack[1].max_open(), DEFAULT_MAX_OPEN);
        // 300 silent (1..3) overlaps churn (2.5..5.5), which overlaps bad_proof (4..6).
        assert_eq!(c.attack_fds_peak(), DEFAULT_MAX_OPEN + 300);
        assert!(c.fds_needed(100) >= 100 + DEFAULT_MAX_OPEN + 300);
    }

    #[test]
    fn bad_attacks_are_refused_with_their_keys() {
        let err = campaign(
            r#"
            source.addresses = "127.66.0.3"
            [[attack]]
            kind = "silent"
            start_s = 1
            duration_s = 100
            [[attack]]
            kind = "churn"
            start_s = -1
            duration_s = 0
            window = "calm"
            addresses = "10.0.0.1"
            "#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "attack[0].connections: required for silent",
            "attack[0].duration_s: the attack must end within the planned run",
            "attack[0].addresses: 127.66.0.3 is also a device source address",
            "attack[1].rate_per_sec: required for churn",
            "attack[1].start_s",
            "attack[1].duration_s: must be a number above 0",
            "attack[1].window",
            "attack[1].addresses: 10.0.0.1 is not a loopback address",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
        let err = campaign("[[attack]]\nkind = \"flood\"\nstart_s = 1\nduration_s = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("flood"), "{err}");
    }
}
