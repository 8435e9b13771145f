//! Code rollout on one shard: which connected devices run stale code, a bounded number of
//! concurrent transfers (the rest wait in FIFO order), and the chunks each transfer may send
//! as the device's acks open its window.
//!
//! Only devices that are *not* current have an entry (a few dozen bytes while stale, nothing
//! once current); a current device costs one count in its group. Everything goes out through
//! an [`Outlet`], so the logic is tested without sockets.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use tether_protocol::code::{CodeSender, SenderConfig};
use tether_protocol::server::CodeEvent;
use tether_protocol::{CodeVersion, DeviceId, DeviceMessage, Digest};

use slab::Slab;

use super::ServerCtx;
use super::conn::Conn;
use super::contain::{self, Site};
use super::{Shard, wake};
use crate::codestore::Deployed;
use crate::deploy::GroupRollout;
use crate::registry::{GroupId, LiveRegistry};

/// Where rollout messages go: the device connection in slab slot `idx`.
pub(crate) trait Outlet {
    /// Queues `m` on connection `idx`; `false` if it is gone or closed.
    fn send(&mut self, idx: usize, m: &DeviceMessage) -> bool;
    /// Connection `idx` has output to write.
    fn wake(&mut self, idx: usize);
}

/// A group's current code, as this shard holds it (its own copy of the bytes).
struct Code {
    version: CodeVersion,
    digest: Digest,
    blob: Bytes,
}

enum Phase {
    /// Offered; waiting for the device's `CodeRequest`.
    Offered,
    /// Requested; waiting for a transfer slot.
    Queued { offset: u64 },
    /// Sending.
    Active(Box<CodeSender>),
}

/// A connected device that does not run its group's current code.
struct Stale {
    idx: usize,
    group: GroupId,
    phase: Phase,
    /// Its last transfer failed (digest mismatch or refused), and it has not succeeded since.
    failed: bool,
}

/// Rollout counters, copied into the shard's metrics when they are read.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RolloutCounters {
    pub offers: u64,
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    pub bytes_out: u64,
    pub protocol_errors: u64,
}

/// The rollout state of one shard.
pub(crate) struct Rollout {
    sender: SenderConfig,
    max_transfers: usize,
    code: HashMap<GroupId, Code>,
    /// Connected devices per group (current or not).
    connected: HashMap<GroupId, u64>,
    stale: HashMap<DeviceId, Stale>,
    /// Devices waiting for a slot. Entries whose device left or moved on are skipped when
    /// popped, so leaving costs nothing here.
    queue: VecDeque<DeviceId>,
    active: usize,
    pub counters: RolloutCounters,
}

impl Rollout {
    pub(crate) fn new(max_transfers: usize, sender: SenderConfig) -> Rollout {
        Rollout {
            sender,
            max_transfers: max_transfers.max(1),
            code: HashMap::new(),
            connected: HashMap::new(),
            stale: HashMap::new(),
            queue: VecDeque::new(),
            active: 0,
            counters: RolloutCounters::default(),
        }
    }

    /// Transfers sending now.
    pub(crate) fn active(&self) -> usize {
        self.active
    }

    /// Devices waiting for a transfer slot.
    pub(crate) fn queued(&self) -> usize {
        self.stale
            .values()
            .filter(|s| matches!(s.phase, Phase::Queued { .. }))
            .count()
    }

    /// A new current version for `group`: offered to each of its connected devices here
    /// (`devices`: device and slot). Versions only go forward; an older one is ignored.
    #[cfg(test)]
    pub(crate) fn set_code(
        &mut self,
        group: GroupId,
        version: CodeVersion,
        digest: Digest,
        blob: Bytes,
        devices: &[(DeviceId, usize)],
        out: &mut dyn Outlet,
    ) {
        if !self.set_current(group, version, digest, blob) {
            return;
        }
        for &(device, idx) in devices {
            self.offer_current(device, idx, group, out);
        }
        self.start_queued(out);
    }

    /// Makes `version` the current code of `group`; `false` (nothing changed) if it is not
    /// newer than the current one. Its connected devices are then offered it one by one
    /// ([`offer_current`](Self::offer_current)), then [`start_queued`](Self::start_queued).
    pub(crate) fn set_current(
        &mut self,
        group: GroupId,
        version: CodeVersion,
        digest: Digest,
        blob: Bytes,
    ) -> bool {
        if self.code.get(&group).is_some_and(|c| c.version >= version) {
            return false;
        }
        self.code.insert(
            group,
            Code {
                version,
                digest,
                blob,
            },
        );
        true
    }

    /// Offers `group`'s current code to its device connected in slot `idx` (an offer in
    /// progress or a transfer is replaced: the device starts over on the new version).
    pub(crate) fn offer_current(
        &mut self,
        device: DeviceId,
        idx: usize,
        group: GroupId,
        out: &mut dyn Outlet,
    ) {
        let Some(c) = self.code.get(&group) else {
            return;
        };
        let offer = offer(c.version, c.blob.len() as u64, c.digest);
        let s = self.stale.entry(device).or_insert(Stale {
            idx,
            group,
            phase: Phase::Offered,
            failed: false,
        });
        if matches!(s.phase, Phase::Active(_)) {
            self.active -= 1;
        }
        s.phase = Phase::Offered;
        s.failed = false;
        self.counters.offers += 1;
        out.send(idx, &offer);
        out.wake(idx);
    }

    /// A device's session was established here, running `running`.
    pub(crate) fn on_connect(
        &mut self,
        device: DeviceId,
        idx: usize,
        group: GroupId,
        running: CodeVersion,
        out: &mut dyn Outlet,
    ) {
        *self.connected.entry(group).or_default() += 1;
        let Some(c) = self.code.get(&group) else {
            return;
        };
        if running >= c.version {
            return;
        }
        self.stale.insert(
            device,
            Stale {
                idx,
                group,
                phase: Phase::Offered,
                failed: false,
            },
        );
        self.counters.offers += 1;
        out.send(idx, &offer(c.version, c.blob.len() as u64, c.digest));
    }

    /// A device's session ended (or was replaced): its transfer slot, if any, goes to the
    /// next device waiting. It resumes from its offset when it reconnects.
    pub(crate) fn on_disconnect(&mut self, device: DeviceId, group: GroupId, out: &mut dyn Outlet) {
        if let Some(n) = self.connected.get_mut(&group) {
            *n = n.saturating_sub(1);
        }
        if let Some(s) = self.stale.remove(&device) {
            if matches!(s.phase, Phase::Active(_)) {
                self.active -= 1;
                self.start_queued(out);
            }
        }
    }

    /// A code-transfer message from a device of `group` connected in slot `idx`.
    pub(crate) fn on_code(
        &mut self,
        device: DeviceId,
        idx: usize,
        group: GroupId,
        e: CodeEvent,
        out: &mut dyn Outlet,
    ) {
        let Some(code) = self.code.get(&group) else {
            self.counters.protocol_errors += 1;
            return;
        };
        let current = code.version;
        match e {
            CodeEvent::Request { version, offset } => {
                if version != current {
                    // Asking for a version that is no longer current: offer the current one.
                    self.counters.offers += 1;
                    out.send(idx, &offer(current, code.blob.len() as u64, code.digest));
                    return;
                }
                if offset > code.blob.len() as u64 {
                    self.counters.protocol_errors += 1;
                    return;
                }
                // A device we took for current asks anyway (it lost its code): serve it.
                let s = self.stale.entry(device).or_insert(Stale {
                    idx,
                    group,
                    phase: Phase::Offered,
                    failed: false,
                });
                match &mut s.phase {
                    Phase::Active(sender) => {
                        if sender.restart(offset).is_err() {
                            self.counters.protocol_errors += 1;
                        }
                        self.pump(device, out);
                    }
                    Phase::Queued { offset: o } => *o = offset,
                    Phase::Offered => {
                        if self.active < self.max_transfers {
                            self.start(device, offset, out);
                        } else {
                            s.phase = Phase::Queued { offset };
                            self.queue.push_back(device);
                        }
                    }
                }
            }
            CodeEvent::Ack { version, offset } => {
                let Some(s) = self.stale.get_mut(&device) else {
                    return;
                };
                if let Phase::Active(sender) = &mut s.phase {
                    if sender.version() == version {
                        if sender.handle_ack(offset).is_err() {
                            self.counters.protocol_errors += 1;
                        }
                        self.pump(device, out);
                    }
                }
            }
            CodeEvent::Done { version, ok } => {
                let Some(s) = self.stale.get_mut(&device) else {
                    return;
                };
                let was_active =
                    matches!(&s.phase, Phase::Active(sender) if sender.version() == version);
                if ok && version >= current {
                    self.stale.remove(&device);
                    if was_active {
                        self.counters.completed += 1;
                    }
                } else {
                    if !ok {
                        self.counters.failed += 1;
                        s.failed = true;
                    }
                    // The device asks again if it retries.
                    if was_active {
                        s.phase = Phase::Offered;
                    }
                }
                if was_active {
                    self.active -= 1;
                    self.start_queued(out);
                }
            }
        }
    }

    fn start(&mut self, device: DeviceId, offset: u64, out: &mut dyn Outlet) {
        let Some(s) = self.stale.get_mut(&device) else {
            return;
        };
        let Some(code) = self.code.get(&s.group) else {
            return;
        };
        match CodeSender::new(code.version, code.blob.clone(), offset, self.sender) {
            Ok(sender) => {
                s.phase = Phase::Active(Box::new(sender));
                self.active += 1;
                self.counters.started += 1;
                self.pump(device, out);
            }
            Err(_) => {
                s.phase = Phase::Offered;
                self.counters.protocol_errors += 1;
            }
        }
    }

    /// Starts waiting transfers while slots are free.
    pub(crate) fn start_queued(&mut self, out: &mut dyn Outlet) {
        while self.active < self.max_transfers {
            let Some(device) = self.queue.pop_front() else {
                return;
            };
            if let Some(Phase::Queued { offset }) = self.stale.get(&device).map(|s| &s.phase) {
                let offset = *offset;
                self.start(device, offset, out);
            }
        }
    }

    /// Sends the chunks the device's window allows.
    fn pump(&mut self, device: DeviceId, out: &mut dyn Outlet) {
        let Some(s) = self.stale.get_mut(&device) else {
            return;
        };
        let Phase::Active(sender) = &mut s.phase else {
            return;
        };
        let mut any = false;
        while let Some(chunk) = sender.poll_chunk() {
            if let DeviceMessage::CodeChunk { data, .. } = &chunk {
                self.counters.bytes_out += data.len() as u64;
            }
            if !out.send(s.idx, &chunk) {
                break; // closed: its disconnect frees the slot
            }
            any = true;
        }
        if any {
            out.wake(s.idx);
        }
    }

    /// Per group with code: how its connected devices here stand.
    pub(crate) fn status(&self) -> Vec<(GroupId, GroupRollout)> {
        let mut out: HashMap<GroupId, GroupRollout> = self
            .code
            .iter()
            .map(|(&g, c)| {
                let connected = self.connected.get(&g).copied().unwrap_or(0);
                let st = GroupRollout {
                    version: c.version.0,
                    digest: c.digest.to_string(),
                    size: c.blob.len() as u64,
                    connected,
                    current: connected,
                    ..GroupRollout::default()
                };
                (g, st)
            })
            .collect();
        for s in self.stale.values() {
            let Some(g) = out.get_mut(&s.group) else {
                continue;
            };
            g.current = g.current.saturating_sub(1);
            match s.phase {
                Phase::Active(_) => g.in_flight += 1,
                _ if s.failed => g.failed += 1,
                _ => g.pending += 1,
            }
        }
        let mut v: Vec<_> = out.into_iter().collect();
        v.sort_by_key(|(g, _)| *g);
        v
    }
}

fn offer(version: CodeVersion, size: u64, digest: Digest) -> DeviceMessage {
    DeviceMessage::CodeOffer {
        version,
        size,
        digest,
    }
}

/// The shard's connections as an [`Outlet`].
struct Conns<'a>(&'a mut Slab<Conn>);

impl Outlet for Conns<'_> {
    fn send(&mut self, idx: usize, m: &DeviceMessage) -> bool {
        self.0
            .get_mut(idx)
            .is_some_and(|c| c.session.send_control(m).is_ok())
    }

    fn wake(&mut self, idx: usize) {
        wake::notify(idx);
    }
}

/// The shard's hooks into its rollout.
impl Shard {
    /// The rollout at start; every group with code is named in `registry` (devices added to
    /// it later get its code).
    pub(super) fn new_rollout(ctx: &ServerCtx, registry: &mut LiveRegistry) -> Rollout {
        let mut r = Rollout::new(ctx.max_transfers_per_shard, SenderConfig::default());
        for d in &ctx.code_at_start {
            if let Ok(g) = registry.intern(&d.group) {
                // Our own copy: slicing a blob shared with other cores would bounce its
                // reference count between them on every chunk.
                let blob = Bytes::copy_from_slice(&d.blob);
                r.set_current(g, d.version, d.digest, blob);
            }
        }
        r
    }

    fn group_of(&self, device: DeviceId) -> Option<GroupId> {
        self.registry.get(device).map(|e| e.group)
    }

    /// A device's session was established in slot `idx`, running `running`.
    pub(super) fn code_connected(&mut self, idx: usize, device: DeviceId, running: CodeVersion) {
        if let Some(g) = self.group_of(device) {
            let out = &mut Conns(&mut self.conns);
            self.rollout.on_connect(device, idx, g, running, out);
        }
    }

    /// A device's session ended or was replaced.
    pub(super) fn code_disconnected(&mut self, device: DeviceId) {
        if let Some(g) = self.group_of(device) {
            self.rollout
                .on_disconnect(device, g, &mut Conns(&mut self.conns));
        }
    }

    /// A code-transfer message from the device in slot `idx`.
    pub(super) fn on_code(&mut self, idx: usize, e: CodeEvent) {
        let Some(device) = self.conns[idx].session.device() else {
            return;
        };
        if let CodeEvent::Done { version, ok: true } = e {
            self.conns[idx].code_version = version;
        }
        if let Some(g) = self.group_of(device) {
            let out = &mut Conns(&mut self.conns);
            self.rollout.on_code(device, idx, g, e, out);
        }
    }

    /// A deploy: the group's new code, offered to its devices connected here (and kept for
    /// devices that join the group later, even if it has none yet). Each device's offer is a
    /// contained step: a panic in one closes that device's connection only.
    pub(crate) fn on_deployed(&mut self, d: &Deployed) {
        let Ok(g) = self.registry.intern(&d.group) else {
            return; // the code store refuses such names; nothing can be in this group
        };
        // Our own copy: slicing a blob shared with other cores would bounce its reference
        // count between them on every chunk.
        let blob = Bytes::copy_from_slice(&d.blob);
        if !self.rollout.set_current(g, d.version, d.digest, blob) {
            return;
        }
        let registry = &self.registry;
        let devices: Vec<(DeviceId, usize)> = self
            .devices
            .iter()
            .filter(|(dev, _)| registry.get(**dev).is_some_and(|e| e.group == g))
            .map(|(dev, idx)| (*dev, *idx))
            .collect();
        for (device, idx) in devices {
            self.contained(Site::Rollout, |s| {
                s.blame(idx);
                contain::inject(Site::Rollout, Some(device));
                s.rollout
                    .offer_current(device, idx, g, &mut Conns(&mut s.conns));
            });
        }
        self.contained(Site::Rollout, |s| {
            s.rollout.start_queued(&mut Conns(&mut s.conns))
        });
    }

    /// This shard's rollout per group, named.
    pub(crate) fn rollout_status(&self) -> Vec<GroupRollout> {
        self.rollout
            .status()
            .into_iter()
            .map(|(g, mut st)| {
                st.group = self.registry.group_name(g).unwrap_or("?").to_owned();
                st
            })
            .collect()
    }

    /// Copies the rollout's gauges and counters into the shard's metrics.
    pub(crate) fn fill_code_metrics(&mut self) {
        let (r, m) = (&self.rollout, &mut self.metrics);
        let c = r.counters;
        m.code_transfers_active = r.active() as u64;
        m.code_transfers_queued = r.queued() as u64;
        m.code_offers = c.offers;
        m.code_transfers_started = c.started;
        m.code_transfers_completed = c.completed;
        m.code_transfers_failed = c.failed;
        m.code_bytes_out = c.bytes_out;
        m.code_protocol_errors = c.protocol_errors;
    }
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
