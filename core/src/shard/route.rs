//! Session routing: where a device's or an agent's messages go and how they get there —
//! the home shard of a device, the agent a device's messages go to, session establishment on
//! the home shard (the proof checked before anything else is touched, one session per
//! device), presence, the answers to agents' sends, and the bounded channel mesh between
//! shards. The connection machinery that feeds it (sockets, TLS, readiness) is `io.rs` and
//! `conn.rs`.
//!
//! ## The mesh
//!
//! What shards tell each other over the bounded channel mesh (`ShardMsg`), how a device or
//! an agent maps to its shard, and the ordered outboxes in front of the mesh.
//!
//! **Order.** Everything one shard sends another goes through one FIFO: the shard's
//! `Outbox` for that peer, drained into the glommio channel (capacity `--mesh-capacity`)
//! by one long-lived drain task per peer (`run.rs`), or sent straight into the channel when
//! the outbox is empty and nothing is in flight. No task per message, so messages for a
//! destination never overtake each other: presence online/offline, an agent's sends, acks
//! and moved connections arrive in the order they were produced.
//!
//! **Bounds and push-back.** An outbox holds at most `--mesh-capacity` messages from
//! producers that can wait: an agent's `Send`/`DeliverAck` (the agent link stops reading
//! that agent's socket until there is room) and a device's message for an agent (the shard
//! stops reading that device's socket, its decoded events held, until there is room: TCP
//! back-pressure, nothing dropped). Both are counted (`pushback_agent_reads`,
//! `pushback_device_reads`). Presence changes do not wait: past the bound they are
//! coalesced (one `ShardMsg::PresenceGap` marker, then a snapshot when the agent's shard
//! asks for it). What always goes in, past the bound, is bounded by its cause: one answer
//! per agent `Send` (`SendResult`), one move per connection (`Adopt`), attach/detach, and
//! the few presence markers, requests and snapshots of a resync.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use tether_protocol::message::{GoodbyeReason, SendStatus};
use tether_protocol::server::{ServerEvent, ServerSession};
use tether_protocol::{
    AgentMessage, AuthError, CloseReason, DecodeError, DeviceId, PeerMisbehaved,
};
use tether_protocol::{SendError, Seq, SessionId};

#[cfg(debug_assertions)]
use super::STALL_TOPIC;
use super::conn::{CertDevice, TlsConn};
use super::contain::{self, Site};
use super::{INBOX_LIMIT, Shard, Step, devices, now_ms, peer_ip, retry_spread, wake};
use crate::metrics::ErrorKind;
pub use crate::placement::home_shard;

/// An agent's process-wide id: its shard in the top byte, a per-shard counter below.
pub(crate) type AgentId = u32;

/// The shard an agent lives on.
pub(crate) fn agent_shard(agent: AgentId) -> usize {
    (agent >> 24) as usize
}

/// A connection in transit to its home shard, after `Hello` and before authentication, with
/// everything read from it so far: the TLS state (buffered mode: with rustls' unprocessed
/// input), the session (with the input it buffered behind the `Hello`), and `partial`.
pub(crate) struct Moved {
    /// The socket (a duplicate of the one the sending shard closed).
    pub fd: OwnedFd,
    pub tls: TlsConn,
    pub session: ServerSession,
    /// Received bytes TLS has not consumed yet (detached mode: an incomplete record).
    pub partial: Vec<u8>,
    /// Encrypted bytes not yet written.
    pub out: Vec<u8>,
    pub tls_done: bool,
    /// What the client certificate said.
    pub cert: CertDevice,
}

/// A message between shards.
pub(crate) enum ShardMsg {
    /// Take over this connection: the device's home is here.
    Adopt(Box<Moved>),
    /// An agent attached on some shard.
    AgentUp { agent: AgentId },
    /// An agent detached.
    AgentDown { agent: AgentId },
    /// An agent's `Send`, for the device's home shard.
    ToDevice {
        device: DeviceId,
        agent: AgentId,
        tag: u64,
        topic: Bytes,
        payload: Bytes,
    },
    /// An agent's `DeliverAck`, for the device's home shard.
    DeliverAck { device: DeviceId, seq: Seq },
    /// A frame for an agent attached on the receiving shard.
    ToAgent { agent: AgentId, msg: AgentMessage },
    /// The device home shard `from` could not queue presence changes for `agent` (its outbox
    /// towards the agent's shard was full): it withholds them until asked for a snapshot.
    PresenceGap { agent: AgentId, from: usize },
    /// Asks a shard for the set of its home devices online now, for `agent`.
    PresenceResync { agent: AgentId },
    /// The answer to [`PresenceResync`](Self::PresenceResync): shard `from`'s home devices
    /// online when it answered. Its presence changes for `agent` that follow are newer.
    PresenceSnapshot {
        agent: AgentId,
        from: usize,
        devices: Vec<DeviceId>,
    },
}

/// The ordered outbox towards one peer shard.
#[derive(Default)]
struct Outbox {
    queue: VecDeque<ShardMsg>,
    /// The drain task holds a message the channel has not yet taken.
    in_flight: bool,
    /// The drain task, waiting for a message.
    drainer: Option<Waker>,
    /// A producer found no room since room last returned.
    wanted: bool,
}

/// A shard's outboxes, one per peer (its own slot unused: messages to itself are handled at
/// once).
pub(crate) struct Outboxes {
    peers: Vec<Outbox>,
    limit: usize,
}

impl Outboxes {
    pub(crate) fn new(nshards: usize, limit: usize) -> Self {
        Outboxes {
            peers: (0..nshards).map(|_| Outbox::default()).collect(),
            limit: limit.max(1),
        }
    }

    /// Whether nothing is queued or in flight towards `to` (a message may go straight into
    /// the channel without overtaking any).
    pub(crate) fn is_idle(&self, to: usize) -> bool {
        let o = &self.peers[to];
        o.queue.is_empty() && !o.in_flight
    }

    /// Whether a producer that can wait may queue a message for `to` now. When not, the
    /// drain task reports room once the outbox is down to half.
    pub(crate) fn has_room(&mut self, to: usize) -> bool {
        let o = &mut self.peers[to];
        let room = o.queue.len() + (o.in_flight as usize) < self.limit;
        if !room {
            o.wanted = true;
        }
        room
    }

    /// Queues `msg` behind everything else for `to` and wakes that drain task.
    pub(crate) fn push(&mut self, to: usize, msg: ShardMsg) {
        let o = &mut self.peers[to];
        o.queue.push_back(msg);
        if let Some(w) = o.drainer.take() {
            w.wake();
        }
    }

    /// The drain task's next message for `to` (then in flight until [`sent`](Self::sent)).
    pub(crate) fn poll_next(&mut self, to: usize, cx: &mut Context<'_>) -> Poll<ShardMsg> {
        let o = &mut self.peers[to];
        match o.queue.pop_front() {
            Some(m) => {
                o.in_flight = true;
                Poll::Ready(m)
            }
            None => {
                o.drainer = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// The channel took the message in flight towards `to`. Returns whether producers waiting
    /// for room should now retry (someone wanted room and the outbox is down to half).
    pub(crate) fn sent(&mut self, to: usize) -> bool {
        let half = self.limit / 2;
        let o = &mut self.peers[to];
        o.in_flight = false;
        if o.wanted && o.queue.len() <= half {
            o.wanted = false;
            return true;
        }
        false
    }

    /// Messages queued towards all peers now.
    pub(crate) fn queued(&self) -> usize {
        self.peers
            .iter()
            .map(|o| o.queue.len() + o.in_flight as usize)
            .sum()
    }
}

/// Routing: what the shard does with session events and mesh messages.
impl Shard {
    /// Handles the messages received from peers, each peer's in order; a peer's queue stops
    /// at a message for an agent with no room (until [`room_returned`](Self::room_returned)).
    /// Returns how many were handled.
    pub(super) fn handle_inbox(&mut self, now: Instant) -> usize {
        let mut handled = 0;
        for peer in 0..self.inbox.len() {
            while let Some(m) = self.inbox[peer].front() {
                if self.must_wait(m) {
                    break;
                }
                let m = self.inbox[peer].pop_front().expect("front was Some");
                self.handle_msg_contained(m, now);
                handled += 1;
            }
            if self.inbox[peer].len() < INBOX_LIMIT {
                if let Some(w) = self.inbox_waiters[peer].take() {
                    w.wake();
                }
            }
        }
        handled
    }

    /// Whether a message from a peer must wait: a device message for a local agent whose
    /// queue is full (anything else is taken now; presence is coalesced instead of waiting).
    pub(super) fn must_wait(&self, m: &ShardMsg) -> bool {
        match m {
            ShardMsg::ToAgent {
                agent,
                msg: AgentMessage::Deliver { .. },
            } => self.local_agents.get(agent).is_some_and(|a| !a.has_room()),
            _ => false,
        }
    }

    /// A peer's receiver task: whether its inbox has room; if not, it is woken when it has.
    pub(crate) fn inbox_room(&mut self, peer: usize, w: &Waker) -> bool {
        if self.inbox[peer].len() < INBOX_LIMIT {
            return true;
        }
        self.inbox_waiters[peer] = Some(w.clone());
        false
    }

    /// Room returned somewhere (an outbox drained to half, an agent's queue was written):
    /// everything that waited for room tries again — held device events, agent links, peer
    /// inboxes, presence snapshots.
    pub(crate) fn room_returned(&mut self) {
        for &idx in self.stalled.keys() {
            wake::notify(idx);
        }
        for w in self.room_waiters.drain(..) {
            w.wake();
        }
        self.emit_resyncs();
        wake::wake_driver();
    }

    /// Acts on one session event.
    pub(super) fn on_event(&mut self, idx: usize, e: ServerEvent, now: Instant) -> Step {
        match e {
            ServerEvent::Hello { device, .. } => {
                // No longer a stranger in flight here: its proof is checked next.
                self.guard.done(idx, self.conns[idx].generation);
                let home = home_shard(device, self.nshards);
                if home != self.id {
                    self.move_to(idx, home);
                    return Step::Moved;
                }
                self.authenticate(idx, device, now);
            }
            ServerEvent::Message {
                seq,
                topic,
                payload,
            } => {
                let device = self.conns[idx].session.device();
                let agent = match device {
                    Some(d) if !self.agents.is_empty() => Some(
                        self.agents
                            [(crate::placement::mix(d.0) % self.agents.len() as u64) as usize],
                    ),
                    _ => None,
                };
                if agent.is_none() && self.agent_grace.is_some_and(|until| now < until) {
                    // Just took over from an upgraded process: its agents are re-attaching.
                    // Hold the message (and the device's reading) until one is here, rather
                    // than have the device resend it 10 s later.
                    return Step::Wait(ServerEvent::Message {
                        seq,
                        topic,
                        payload,
                    });
                }
                if let Some(agent) = agent {
                    if !self.agent_room(agent) {
                        // Acknowledged only once its agent has it: wait, never drop.
                        return Step::Wait(ServerEvent::Message {
                            seq,
                            topic,
                            payload,
                        });
                    }
                }
                self.metrics.msgs_in += 1;
                // Debug builds only: lets the tests prove a panic closes one connection only.
                contain::inject(Site::Drive, device);
                #[cfg(debug_assertions)]
                if &topic[..] == STALL_TOPIC {
                    let ms = std::str::from_utf8(&payload)
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .unwrap_or(5_000)
                        .min(10_000);
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                let Some(device) = device else {
                    return Step::Done;
                };
                let Some(agent) = agent else {
                    // No agent to take it: unacknowledged and not counted as received, so the
                    // device's resend (every 10 s, and after a reconnect) is delivered.
                    self.metrics.undeliverable += 1;
                    self.conns[idx].session.refuse_received(seq);
                    return Step::Done;
                };
                self.route(
                    agent_shard(agent),
                    ShardMsg::ToAgent {
                        agent,
                        msg: AgentMessage::Deliver {
                            device,
                            seq,
                            topic,
                            payload,
                        },
                    },
                );
            }
            ServerEvent::Delivered { tag, .. } => {
                self.metrics.acks += 1;
                if let Some((agent, tag)) = self.pending_sends.remove(&tag) {
                    self.send_result(agent, tag, SendStatus::Delivered);
                }
            }
            ServerEvent::Code(e) => self.on_code(idx, e),
            ServerEvent::Closed(reason) => {
                self.count_close(&reason);
                let conn = &mut self.conns[idx];
                conn.closing = true;
                if matches!(reason, CloseReason::Local(_)) {
                    self.metrics.goodbyes_sent += 1;
                }
                self.unregister(idx);
            }
        }
        Step::Done
    }

    /// Whether a message for `agent` may be queued now: its queue has room if it is attached
    /// here, else the outbox towards its shard has. (An agent gone meanwhile has room: the
    /// message is discarded where it was attached, as before it left.)
    pub(super) fn agent_room(&mut self, agent: AgentId) -> bool {
        let to = agent_shard(agent);
        if to == self.id {
            return self.local_agents.get(&agent).is_none_or(|a| a.has_room());
        }
        self.mesh_out.has_room(to)
    }

    pub(super) fn count_close(&mut self, reason: &CloseReason) {
        use CloseReason as R;
        use PeerMisbehaved as P;
        let kind = match reason {
            R::PeerMisbehaved(P::Decode(DecodeError::FrameTooLarge { .. })) => {
                ErrorKind::FrameTooLarge
            }
            R::PeerMisbehaved(P::Decode(_)) => ErrorKind::MalformedFrame,
            R::PeerMisbehaved(_) => ErrorKind::Protocol,
            R::Auth(AuthError::BadProof) => ErrorKind::BadProof,
            R::Auth(_) => ErrorKind::UnknownDevice,
            R::HandshakeTimeout => ErrorKind::Timeout,
            R::IdleTimeout => {
                self.metrics.heartbeat_timeouts += 1;
                return;
            }
            _ => return,
        };
        if matches!(reason, R::Auth(_)) {
            self.metrics.auth_failures += 1;
        }
        self.metrics.error(kind);
    }

    /// Answers a connection's `Hello` on the device's home shard.
    ///
    /// The proof is checked first, and nothing else is touched until it verifies: a stranger
    /// naming a live device's id gets the same `Error` as an unknown device and a closed
    /// connection, and the live session never notices. A verified connection replaces an
    /// older session of the same device and inherits everything it held (unacknowledged
    /// messages both ways, the agent sends awaiting the device's ack, the session id); the
    /// device stays online for agents throughout, so a replacement sends them no presence.
    pub(super) fn authenticate(&mut self, idx: usize, device: DeviceId, now: Instant) {
        // A verified client certificate vouches instead of the proof (`--device-ca`).
        let conn = &self.conns[idx];
        let credential = self
            .registry
            .get(device)
            .map(|e| conn.cert.credential(&e.key));
        let verified = match conn.session.verify_credential(credential) {
            Ok(v) => v,
            Err(e) => {
                self.conns[idx].session.reject(e);
                let source = peer_ip(&self.conns[idx].fd);
                if self.guard.auth_failed(source, device, now) {
                    self.metrics.device_auth_alarms += 1;
                    self.guard_log(now, || {
                        format!("device {}: failed proofs past its budget (its own verified connections are still accepted)", device.0)
                    });
                }
                return;
            }
        };
        if self.shutting_down {
            self.conns[idx]
                .session
                .close(GoodbyeReason::Shutdown, retry_spread());
            return;
        }
        let old = self
            .devices
            .get(&device)
            .copied()
            .filter(|&old| old != idx && self.conns.contains(old));
        if old.is_none() && self.ctx.max_connections_per_shard <= self.devices.len() {
            self.metrics.shed += 1;
            self.conns[idx]
                .session
                .close(GoodbyeReason::Overloaded, retry_spread());
            return;
        }
        if old.is_some() {
            if let Err(retry_after) = self.guard.replacing(device, now) {
                // Flapping: the established session stays; the newcomer waits.
                self.metrics.flaps_damped += 1;
                self.conns[idx]
                    .session
                    .close(GoodbyeReason::Flapping, retry_after);
                return;
            }
        }
        // One session per device: the verified newcomer replaces the older one.
        let mut carried = None;
        if let Some(old) = old {
            let c = &mut self.conns[old];
            carried = c.session.take_carried();
            c.registered = false;
            self.devices.remove(&device);
            self.metrics.sessions_replaced += 1;
            self.code_disconnected(device);
            wake::notify(old);
        }
        self.next_session += 1;
        let session = SessionId(self.next_session);
        let conn = &mut self.conns[idx];
        let running = conn.session.pending_code_version().unwrap_or_default();
        conn.session
            .establish(now, verified, session, now_ms(), carried);
        conn.registered = true;
        conn.code_version = running;
        self.devices.insert(device, idx);
        self.offline.remove(&device);
        if old.is_none() {
            self.presence(device, true);
        }
        self.code_connected(idx, device, running);
        if self.draining {
            // An upgrade is handing sessions over: this one goes too, from the next tick.
            self.late.push((idx, self.conns[idx].generation));
        }
    }

    /// Forgets a connection's device registration (presence offline, undelivered sends).
    pub(super) fn unregister(&mut self, idx: usize) {
        self.unregister_with(idx, SendStatus::Offline);
    }

    /// [`unregister`](Self::unregister), answering the agent sends the device did not
    /// acknowledge with `status`; returns how many there were.
    pub(super) fn unregister_with(&mut self, idx: usize, status: SendStatus) -> u64 {
        let conn = &mut self.conns[idx];
        if !conn.registered {
            return 0;
        }
        conn.registered = false;
        let device = conn.session.device();
        let code_version = conn.code_version;
        let unacked = conn.session.take_unacked();
        if let Some(device) = device {
            if self.devices.get(&device) == Some(&idx) {
                self.devices.remove(&device);
                self.code_disconnected(device);
                self.offline.insert(
                    device,
                    devices::Seen {
                        code_version,
                        ended_ms: now_ms(),
                    },
                );
            }
            self.presence(device, false);
        }
        let mut answered = 0;
        for m in unacked {
            if let Some((agent, tag)) = self.pending_sends.remove(&m.tag) {
                self.send_result(agent, tag, status);
                answered += 1;
            }
        }
        answered
    }

    /// Tells every agent that a home device came online or went offline. Towards a shard
    /// whose outbox is full the change is not queued: the agent's shard is told of the gap
    /// once, and this shard withholds changes for that agent until it asks for a snapshot.
    pub(super) fn presence(&mut self, device: DeviceId, online: bool) {
        for i in 0..self.agents.len() {
            let agent = self.agents[i];
            let to = agent_shard(agent);
            if to == self.id {
                self.presence_to_local(agent, device, online);
                continue;
            }
            if self.presence_gap.contains(&agent) {
                self.metrics.agent_overflow += 1;
                continue;
            }
            if !self.mesh_out.has_room(to) {
                self.metrics.agent_overflow += 1;
                self.presence_gap.insert(agent);
                let from = self.id;
                self.route(to, ShardMsg::PresenceGap { agent, from });
                continue;
            }
            self.route(
                to,
                ShardMsg::ToAgent {
                    agent,
                    msg: AgentMessage::Presence { device, online },
                },
            );
        }
    }

    pub(super) fn send_result(&mut self, agent: AgentId, tag: u64, status: SendStatus) {
        self.route(
            agent_shard(agent),
            ShardMsg::ToAgent {
                agent,
                msg: AgentMessage::SendResult { tag, status },
            },
        );
    }

    /// Delivers a message to shard `to`: handled at once if that is us, else into the
    /// channel if nothing is queued before it, else behind the rest of the outbox towards
    /// `to` (in order; producers that can wait checked [`Outboxes::has_room`] first).
    pub(super) fn route(&mut self, to: usize, msg: ShardMsg) {
        if to == self.id {
            self.handle_msg(msg, Instant::now());
            return;
        }
        let Some(senders) = self.senders.as_ref() else {
            return;
        };
        let msg = if self.mesh_out.is_idle(to) {
            match senders.try_send_to(to, msg) {
                Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m))) => m,
                // Sent, or the peer is gone (shutting down): nothing to keep.
                _ => return,
            }
        } else {
            msg
        };
        self.mesh_out.push(to, msg);
    }

    /// [`handle_msg`](Self::handle_msg), contained: a panic closes the connection the message
    /// was for (an adopted one, or the device an agent's send or ack was for) and answers an
    /// agent's send it carried; any other message is dropped, counted.
    pub(super) fn handle_msg_contained(&mut self, msg: ShardMsg, now: Instant) {
        let site = match msg {
            ShardMsg::Adopt(_) => Site::Adopt,
            _ => Site::Mesh,
        };
        let send = match &msg {
            ShardMsg::ToDevice { agent, tag, .. } => Some((*agent, *tag)),
            _ => None,
        };
        if self.contained(site, |s| s.handle_msg(msg, now)) {
            return;
        }
        if let Some((agent, tag)) = send {
            // Unless closing the device answered it already.
            if !self.pending_sends.values().any(|&p| p == (agent, tag)) {
                self.send_result(agent, tag, SendStatus::Offline);
            }
        }
    }

    pub(super) fn handle_msg(&mut self, msg: ShardMsg, now: Instant) {
        match msg {
            ShardMsg::Adopt(m) => self.adopt(*m, now),
            ShardMsg::AgentUp { agent } => {
                if !self.agents.contains(&agent) {
                    self.agents.push(agent);
                    // Messages held for want of an agent (just after a take-over) go now.
                    if !self.stalled.is_empty() {
                        self.room_returned();
                    }
                }
            }
            ShardMsg::AgentDown { agent } => {
                self.agents.retain(|a| *a != agent);
                self.presence_gap.remove(&agent);
                self.resyncs.remove(&agent);
            }
            ShardMsg::ToDevice {
                device,
                agent,
                tag,
                topic,
                payload,
            } => self.send_to_device(device, agent, tag, topic, payload),
            ShardMsg::DeliverAck { device, seq } => {
                if let Some(&idx) = self.devices.get(&device) {
                    self.blame(idx);
                    self.conns[idx].session.ack_received(seq);
                    wake::notify(idx);
                }
            }
            ShardMsg::ToAgent {
                agent,
                msg: AgentMessage::Presence { device, online },
            } => self.presence_to_local(agent, device, online),
            ShardMsg::ToAgent { agent, msg } => {
                self.blame_agent(agent);
                if let Some(a) = self.local_agents.get(&agent) {
                    if a.push(&msg) {
                        self.metrics.msgs_out += 1;
                    }
                }
            }
            ShardMsg::PresenceGap { agent, from } => self.on_presence_gap(agent, from),
            ShardMsg::PresenceResync { agent } => {
                self.presence_gap.remove(&agent);
                let devices = self.devices.keys().copied().collect();
                let from = self.id;
                self.route(
                    agent_shard(agent),
                    ShardMsg::PresenceSnapshot {
                        agent,
                        from,
                        devices,
                    },
                );
            }
            ShardMsg::PresenceSnapshot {
                agent,
                from,
                devices,
            } => self.on_presence_snapshot(agent, from, devices),
        }
    }

    pub(super) fn send_to_device(
        &mut self,
        device: DeviceId,
        agent: AgentId,
        tag: u64,
        topic: Bytes,
        payload: Bytes,
    ) {
        let Some(&idx) = self.devices.get(&device) else {
            let status = if self.registry.get(device).is_some() {
                SendStatus::Offline
            } else {
                SendStatus::UnknownDevice
            };
            self.send_result(agent, tag, status);
            return;
        };
        self.blame(idx);
        contain::inject(Site::Mesh, Some(device));
        let internal = self.next_tag;
        self.next_tag += 1;
        match self.conns[idx].session.send(topic, payload, internal) {
            Ok(_) => {
                self.metrics.msgs_out += 1;
                self.pending_sends.insert(internal, (agent, tag));
                wake::notify(idx);
            }
            Err(e) => {
                let status = match e {
                    SendError::OutboxFull { .. } => {
                        self.metrics.error(ErrorKind::OutboxFull);
                        SendStatus::QueueFull
                    }
                    SendError::TooLarge { .. } => SendStatus::TooLarge,
                    _ => SendStatus::Offline,
                };
                self.send_result(agent, tag, status);
            }
        }
    }

    /// One guard line on stderr at most every 10 s per shard; the rest are counted only.
    pub(super) fn guard_log(&mut self, now: Instant, line: impl FnOnce() -> String) {
        if self
            .guard_logged
            .is_some_and(|t| now.saturating_duration_since(t) < std::time::Duration::from_secs(10))
        {
            return;
        }
        self.guard_logged = Some(now);
        eprintln!("tether: shard {}: {}", self.id, line());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn msg(agent: AgentId) -> ShardMsg {
        ShardMsg::AgentUp { agent }
    }

    pub(super) fn agent_of(m: ShardMsg) -> AgentId {
        match m {
            ShardMsg::AgentUp { agent } => agent,
            _ => unreachable!(),
        }
    }

    #[test]
    pub(super) fn outbox_keeps_order_bounds_waiting_producers_and_reports_room_at_half() {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut o = Outboxes::new(2, 4);
        assert!(o.is_idle(1));
        for i in 0..4 {
            assert!(o.has_room(1));
            o.push(1, msg(i));
        }
        // Full for producers that wait; the other peer is unaffected.
        assert!(!o.has_room(1));
        assert!(o.has_room(0));
        // Control messages still go in, behind the rest.
        o.push(1, msg(4));
        assert_eq!(o.queued(), 5);
        let mut got = Vec::new();
        let mut room_at = None;
        while let Poll::Ready(m) = o.poll_next(1, &mut cx) {
            assert!(!o.is_idle(1), "a message in flight is not idle");
            got.push(agent_of(m));
            if o.sent(1) && room_at.is_none() {
                room_at = Some(o.queued());
            }
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        // Room was reported once the queue was down to half the limit, not before.
        assert_eq!(room_at, Some(2));
        assert!(o.is_idle(1));
        assert!(o.has_room(1));
        // Nobody waited since: no report.
        o.push(1, msg(9));
        assert!(matches!(o.poll_next(1, &mut cx), Poll::Ready(_)));
        assert!(!o.sent(1));
    }
}
