//! The reliable message stream shared by both ends: sequence numbers, a bounded outbox of
//! unacknowledged messages for resending, and duplicate detection on receive.
//!
//! Delivery is at-least-once: every message stays in the sender's outbox until the peer's
//! cumulative `Ack` covers it, and is resent after a reconnect. The receiver drops a seq it has
//! already delivered (re-acking it), so duplicates are only possible across a lost session.

use bytes::{Bytes, BytesMut};

use crate::error::{PeerMisbehaved, SendError};
use crate::ids::Seq;
use crate::message::DeviceMessage;
use crate::thin::Queue;

/// A message waiting for its `Ack`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Its sequence number.
    pub seq: Seq,
    /// The sender's own correlation tag (the server keeps the agent's `Send` tag here).
    pub tag: u64,
    /// Topic.
    pub topic: Bytes,
    /// Payload.
    pub payload: Bytes,
}

impl Outgoing {
    pub(crate) fn encode(&self, dst: &mut BytesMut) {
        let m = DeviceMessage::Msg {
            seq: self.seq,
            topic: self.topic.clone(),
            payload: self.payload.clone(),
        };
        // Topic length was checked when the message was queued.
        let _ = m.encode(dst);
    }
}

/// One direction's sequencing state plus the other direction's receive state.
#[derive(Debug, Default)]
pub struct Stream {
    /// Unacknowledged sent messages, oldest first. Empty (unallocated) at rest.
    pub(crate) outbox: Queue<Outgoing>,
    /// The last seq assigned to a sent message.
    pub(crate) tx_seq: Seq,
    /// The last seq received (and handed up).
    pub(crate) rx_seq: Seq,
    /// The last seq acknowledged to the peer.
    pub(crate) rx_acked: Seq,
}

impl Stream {
    /// Queues a message; the caller encodes it when connected.
    pub(crate) fn push(
        &mut self,
        limit: u32,
        max_frame: u32,
        tag: u64,
        topic: Bytes,
        payload: Bytes,
    ) -> Result<&Outgoing, SendError> {
        if self.outbox.len() >= limit as usize {
            return Err(SendError::OutboxFull { limit });
        }
        let size = 1 + 8 + 2 + topic.len() + payload.len();
        if size > max_frame as usize || topic.len() > u16::MAX as usize {
            return Err(SendError::TooLarge {
                limit: max_frame,
                got: size.min(u32::MAX as usize) as u32,
            });
        }
        self.tx_seq = self.tx_seq.next();
        self.outbox.push_back(Outgoing {
            seq: self.tx_seq,
            tag,
            topic,
            payload,
        });
        Ok(self.outbox.back().expect("just pushed"))
    }

    /// Applies a cumulative ack; calls `done` for every message it covers.
    pub(crate) fn ack(
        &mut self,
        seq: Seq,
        mut done: impl FnMut(Outgoing),
    ) -> Result<(), PeerMisbehaved> {
        if seq > self.tx_seq {
            return Err(PeerMisbehaved::AckOfUnsent {
                got: seq.0,
                sent: self.tx_seq.0,
            });
        }
        while self.outbox.front().is_some_and(|m| m.seq <= seq) {
            if let Some(m) = self.outbox.pop_front() {
                done(m);
            }
        }
        Ok(())
    }

    /// Records a received seq. Returns `true` if it is new (hand it up), `false` for a
    /// duplicate.
    pub(crate) fn receive(&mut self, seq: Seq) -> bool {
        if seq <= self.rx_seq {
            return false;
        }
        self.rx_seq = seq;
        true
    }

    /// Counts `seq` (and anything received after it) as not received: the peer still has it
    /// (it was never acknowledged) and resends it, and the resend is taken. False if it was
    /// acknowledged already (nothing changes).
    pub(crate) fn refuse(&mut self, seq: Seq) -> bool {
        if seq <= self.rx_acked {
            return false;
        }
        self.rx_seq = self.rx_seq.min(Seq(seq.0 - 1)).max(self.rx_acked);
        true
    }

    /// Re-encodes every unacknowledged message (after a reconnect).
    pub(crate) fn resend_all(&self, dst: &mut BytesMut) {
        for m in self.outbox.iter() {
            m.encode(dst);
        }
    }

    /// Number of unacknowledged messages.
    pub fn unacked(&self) -> usize {
        self.outbox.len()
    }
}
