//! What shards tell each other over the bounded channel mesh, how a device or an agent maps
//! to its shard, and the ordered outboxes in front of the mesh.
//!
//! **Order.** Everything one shard sends another goes through one FIFO: the shard's
//! [`Outbox`] for that peer, drained into the glommio channel (capacity `--mesh-capacity`)
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
//! coalesced (one [`ShardMsg::PresenceGap`] marker, then a snapshot when the agent's shard
//! asks for it). What always goes in, past the bound, is bounded by its cause: one answer
//! per agent `Send` (`SendResult`), one move per connection (`Adopt`), attach/detach, and
//! the few presence markers, requests and snapshots of a resync.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tether_protocol::server::ServerSession;
use tether_protocol::{DeviceId, Message, Seq};

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
    pub tls: super::tlsconn::TlsConn,
    pub session: ServerSession,
    /// Received bytes TLS has not consumed yet (detached mode: an incomplete record).
    pub partial: Vec<u8>,
    /// Encrypted bytes not yet written.
    pub out: Vec<u8>,
    pub tls_done: bool,
    /// What the client certificate said.
    pub cert: super::tlsconn::CertDevice,
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
    ToAgent { agent: AgentId, msg: Message },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(agent: AgentId) -> ShardMsg {
        ShardMsg::AgentUp { agent }
    }

    fn agent_of(m: ShardMsg) -> AgentId {
        match m {
            ShardMsg::AgentUp { agent } => agent,
            _ => unreachable!(),
        }
    }

    #[test]
    fn outbox_keeps_order_bounds_waiting_producers_and_reports_room_at_half() {
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
