//! What shards tell each other over the bounded channel mesh, and how a device or an agent
//! maps to its shard.

use std::os::fd::OwnedFd;

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
}
