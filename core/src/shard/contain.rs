//! Fault containment: every per-connection and per-message step of a shard runs inside
//! `catch_unwind`. A panic in one is caught, counted by the [`Site`] it happened in
//! (`panics_caught` in total, `panics_<site>` each), and closes what it concerns — the
//! connection, or the agent link — and nothing else: the shard keeps serving its other
//! connections, agents and peers.
//!
//! The steps and what a panic in each closes:
//! - `drive`: one connection's read, its session's events and its write → that connection;
//! - `accept`: starting TLS and the session of a new connection → that connection;
//! - `timer`: one expired deadline of a connection → that connection;
//! - `adopt`: taking a connection moved from another shard → that connection;
//! - `mesh`: one message from another shard → the device connection it is for, if any, and
//!   an agent's send it carried is answered (`offline`); a presence message is dropped
//!   (counted) — the agents' resync repairs it;
//! - `agent`: one frame from an attached agent → that agent link (the agent reconnects);
//! - `rollout`: offering a deploy's code to one device → that device's connection;
//! - `registry`: one registry change from the registrar → nothing but the change (counted).
//!
//! **Test hook** (debug builds only; compiled out of release builds): the environment
//! variable [`FAULT_ENV`], a comma-separated list of `site:device-id`, makes the step at that
//! site panic when it handles that device (for `agent`: a `Send` to that device).
//! `core/tests/fault_injection.rs` drives every site through it.

use std::panic::{AssertUnwindSafe, catch_unwind};

#[cfg(debug_assertions)]
use tether_protocol::DeviceId;

use super::Shard;
use super::route::AgentId;
use crate::metrics::ErrorKind;

/// Where a caught panic happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// A connection's step (read, events, write).
    Drive,
    /// Starting a newly accepted connection.
    Accept,
    /// An expired deadline of a connection.
    Timer,
    /// Adopting a connection moved from another shard.
    Adopt,
    /// A message from another shard.
    Mesh,
    /// A frame from an attached agent.
    Agent,
    /// Offering a deploy's code to a device.
    Rollout,
    /// A registry change.
    Registry,
}

impl Site {
    /// Every site (the test hook parses names against it).
    #[cfg_attr(
        not(debug_assertions),
        expect(dead_code, reason = "used by the debug-build test hook")
    )]
    pub const ALL: [Site; 8] = [
        Site::Drive,
        Site::Accept,
        Site::Timer,
        Site::Adopt,
        Site::Mesh,
        Site::Agent,
        Site::Rollout,
        Site::Registry,
    ];

    /// The site's name, as the test hook and the counters spell it.
    pub fn name(self) -> &'static str {
        match self {
            Site::Drive => "drive",
            Site::Accept => "accept",
            Site::Timer => "timer",
            Site::Adopt => "adopt",
            Site::Mesh => "mesh",
            Site::Agent => "agent",
            Site::Rollout => "rollout",
            Site::Registry => "registry",
        }
    }
}

/// Runs `f`; `None` if it panicked (the panic message went to stderr through the panic hook).
pub(crate) fn run<R>(f: impl FnOnce() -> R) -> Option<R> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

impl Shard {
    /// Runs one step at `site`, contained: `false` if it panicked. Then the panic is counted
    /// and what the step named as its concern ([`blame`](Self::blame),
    /// [`blame_agent`](Self::blame_agent)) is closed.
    pub(super) fn contained(&mut self, site: Site, f: impl FnOnce(&mut Shard)) -> bool {
        self.blamed = None;
        self.blamed_agent = None;
        if run(|| f(self)).is_some() {
            return true;
        }
        self.count_panic(site);
        if let Some((idx, generation)) = self.blamed.take() {
            if self
                .conns
                .get(idx)
                .is_some_and(|c| c.generation == generation)
                && run(|| self.remove(idx)).is_none()
            {
                // Closing it panicked too: drop it from the table at least (the socket
                // closes with it).
                let _ = run(|| self.remove_quietly(idx));
            }
        }
        if let Some(agent) = self.blamed_agent.take() {
            if let Some(out) = self.local_agents.get(&agent) {
                out.close();
            }
        }
        false
    }

    /// The step in progress concerns connection `idx`: a panic closes it.
    pub(super) fn blame(&mut self, idx: usize) {
        if let Some(c) = self.conns.get(idx) {
            self.blamed = Some((idx, c.generation));
        }
    }

    /// The step in progress concerns `agent`'s link: a panic closes it.
    pub(super) fn blame_agent(&mut self, agent: AgentId) {
        self.blamed_agent = Some(agent);
    }

    /// Counts a caught panic at `site`.
    pub(super) fn count_panic(&mut self, site: Site) {
        // The panic hook printed the message and where; this says what was closed for it.
        eprintln!(
            "tether: shard {}: panic caught in a {} step; what it concerned was closed",
            self.id,
            site.name()
        );
        let m = &mut self.metrics;
        m.panics_caught += 1;
        m.error(ErrorKind::Panic);
        match site {
            Site::Drive => {}
            Site::Accept => m.panics_accept += 1,
            Site::Timer => m.panics_timer += 1,
            Site::Adopt => m.panics_adopt += 1,
            Site::Mesh => m.panics_mesh += 1,
            Site::Agent => m.panics_agent += 1,
            Site::Rollout => m.panics_rollout += 1,
            Site::Registry => m.panics_registry += 1,
        }
    }
}

/// The test hook's environment variable (debug builds only): `site:device-id,…`.
#[cfg(debug_assertions)]
pub const FAULT_ENV: &str = "TETHER_TEST_PANIC";

/// Test hook: panics if [`FAULT_ENV`] names this site and device. Compiled out of release
/// builds.
#[inline]
pub(crate) fn inject(site: Site, device: Option<tether_protocol::DeviceId>) {
    #[cfg(debug_assertions)]
    if let Some(d) = device {
        if faults().contains(&(site, d)) {
            panic!(
                "test hook: injected panic at {} for device {}",
                site.name(),
                d.0
            );
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = (site, device);
}

#[cfg(debug_assertions)]
fn faults() -> &'static [(Site, DeviceId)] {
    static FAULTS: std::sync::OnceLock<Vec<(Site, DeviceId)>> = std::sync::OnceLock::new();
    FAULTS.get_or_init(|| {
        let spec = std::env::var(FAULT_ENV).unwrap_or_default();
        spec.split(',')
            .filter(|s| !s.trim().is_empty())
            .filter_map(|s| {
                let (site, id) = s.trim().split_once(':')?;
                let site = Site::ALL.into_iter().find(|k| k.name() == site)?;
                Some((site, DeviceId(id.parse().ok()?)))
            })
            .collect()
    })
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    #[test]
    fn run_catches_and_returns() {
        assert_eq!(run(|| 7), Some(7));
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r: Option<()> = run(|| panic!("boom"));
        std::panic::set_hook(prev);
        assert_eq!(r, None);
    }

    #[test]
    fn every_site_has_a_distinct_name() {
        let mut names: Vec<_> = Site::ALL.iter().map(|s| s.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Site::ALL.len());
    }
}
