//! Upgrade steps (`[[upgrade]]`): at `at_s`, `POST /upgrade` to the server's admin endpoint
//! from a thread of its own (the answer comes once the sessions are handed over), and the
//! round-trip latency in the window after it against the window before, cut from the run's
//! cumulative round-trip histogram (each shard publishes it once a second).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tether_core::client::UpgradeReport;

use super::shard::Timeline;
use crate::campaign::Campaign;
use crate::report::UpgradeSummary;

/// The windows round trips are compared over: this long before the upgrade, and after it
/// (long enough to cover a device's resend of what the old process had not acknowledged).
const WINDOW: Duration = Duration::from_secs(10);

/// The cumulative round-trip histogram at three instants of one upgrade.
#[derive(Default)]
struct Marks {
    before: Option<Histogram<u64>>,
    at: Option<Histogram<u64>>,
    after: Option<Histogram<u64>>,
}

/// The run's upgrade steps, their answers and their latency windows.
pub(super) struct Upgrades {
    posted: Vec<Option<Instant>>,
    results: Vec<Option<Result<UpgradeReport, String>>>,
    tx: mpsc::Sender<(usize, Result<UpgradeReport, String>)>,
    rx: mpsc::Receiver<(usize, Result<UpgradeReport, String>)>,
    /// The round-trip histogram at each of the last ticks (only while upgrades remain).
    history: VecDeque<(Instant, Histogram<u64>)>,
    marks: Vec<Marks>,
    /// Where upgrades are posted, with the admin token.
    admin: Option<(SocketAddr, Option<String>)>,
    progress: bool,
}

impl Upgrades {
    pub(super) fn new(
        c: &Campaign,
        admin: Option<(SocketAddr, Option<String>)>,
        progress: bool,
    ) -> Upgrades {
        let (tx, rx) = mpsc::channel();
        Upgrades {
            posted: vec![None; c.upgrade.len()],
            results: (0..c.upgrade.len()).map(|_| None).collect(),
            tx,
            rx,
            history: VecDeque::new(),
            marks: (0..c.upgrade.len()).map(|_| Marks::default()).collect(),
            admin,
            progress,
        }
    }

    /// When the next upgrade is due, if one is left.
    pub(super) fn next_due(&self, c: &Campaign, tl: &Timeline) -> Option<Instant> {
        c.upgrade
            .iter()
            .zip(&self.posted)
            .filter(|(_, at)| at.is_none())
            .map(|(u, _)| tl.at(u.at_s as f64))
            .min()
    }

    /// Posts every upgrade that is due (one at a time: the next waits for the previous answer).
    pub(super) fn post_due(
        &mut self,
        c: &Campaign,
        tl: &Timeline,
        now: Instant,
        rtt: Option<&Histogram<u64>>,
    ) {
        let Some((admin, token)) = self.admin.clone() else {
            return;
        };
        for (k, u) in c.upgrade.iter().enumerate() {
            let previous_answered = k == 0 || self.results[k - 1].is_some();
            if self.posted[k].is_some() || now < tl.at(u.at_s as f64) || !previous_answered {
                continue;
            }
            self.posted[k] = Some(now);
            let m = &mut self.marks[k];
            m.at = rtt.cloned();
            m.before = self
                .history
                .iter()
                .find(|(t, _)| *t + WINDOW >= now)
                .map(|(_, h)| h.clone());
            let (tx, token, binary) = (self.tx.clone(), token.clone(), u.binary.clone());
            std::thread::spawn(move || {
                let r = tether_core::client::request_upgrade(
                    admin,
                    token.as_deref(),
                    binary.as_deref(),
                )
                .map_err(|e| e.to_string());
                let _ = tx.send((k, r));
            });
            if self.progress {
                eprintln!("upgrade {k}: POST /upgrade");
            }
        }
    }

    /// Answers that came back: the new server's pid for each successful one.
    pub(super) fn answers(&mut self) -> Vec<u32> {
        let progress = self.progress;
        let mut pids = Vec::new();
        while let Ok((k, r)) = self.rx.try_recv() {
            match &r {
                Ok(report) => {
                    if progress {
                        eprintln!("upgrade {k}: {}", report.summary());
                    }
                    pids.push(report.new_pid);
                }
                Err(e) if progress => eprintln!("upgrade {k} failed: {e}"),
                Err(_) => {}
            }
            self.results[k] = Some(r);
        }
        pids
    }

    /// Once a second: keeps the round-trip histogram for the windows.
    pub(super) fn tick(&mut self, now: Instant, rtt: Option<&Histogram<u64>>) {
        if self.posted.is_empty() {
            return;
        }
        for (posted, m) in self.posted.iter().zip(&mut self.marks) {
            if m.after.is_none() && posted.is_some_and(|p| now >= p + WINDOW) {
                m.after = rtt.cloned();
            }
        }
        if let Some(h) = rtt {
            self.history.push_back((now, h.clone()));
            while self
                .history
                .front()
                .is_some_and(|(t, _)| *t + WINDOW + Duration::from_secs(2) < now)
            {
                self.history.pop_front();
            }
        }
    }

    /// Each upgrade's outcome; a window that the run ended inside is cut at `end_rtt`.
    pub(super) fn summaries(
        mut self,
        c: &Campaign,
        tl: &Timeline,
        end_rtt: Option<&Histogram<u64>>,
    ) -> Vec<UpgradeSummary> {
        self.progress = false;
        self.answers();
        c.upgrade
            .iter()
            .enumerate()
            .map(|(k, u)| {
                let m = &self.marks[k];
                let after = m.after.as_ref().or(end_rtt);
                let before = window(m.before.as_ref(), m.at.as_ref());
                let during = window(m.at.as_ref(), after);
                let (report, error) = match self.results[k].take() {
                    Some(Ok(r)) => (Some(r), None),
                    Some(Err(e)) => (None, Some(e)),
                    None if self.posted[k].is_some() => (None, Some("no answer".into())),
                    None => (None, Some("not posted (the run ended first)".into())),
                };
                UpgradeSummary {
                    at_s: u.at_s,
                    posted_s: self.posted[k]
                        .map(|p| p.saturating_duration_since(tl.epoch.0).as_secs_f64()),
                    report,
                    error,
                    rtt_p99_before_us: before.as_ref().map(|h| h.value_at_quantile(0.99)),
                    rtt_p99_window_us: during.as_ref().map(|h| h.value_at_quantile(0.99)),
                    rtt_max_window_us: during.as_ref().map(|h| h.max()),
                    rtt_count_window: during.as_ref().map_or(0, |h| h.len()),
                }
            })
            .collect()
    }
}

/// What a cumulative histogram gained between two instants.
fn window(from: Option<&Histogram<u64>>, to: Option<&Histogram<u64>>) -> Option<Histogram<u64>> {
    let to = to?;
    let mut h = to.clone();
    if let Some(from) = from {
        h.subtract(from).ok()?;
    }
    (!h.is_empty()).then_some(h)
}
