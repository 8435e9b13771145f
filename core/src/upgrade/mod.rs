//! Zero-downtime upgrade: the control channel over which a running `tether` hands its
//! listening sockets and live sessions to a new binary (issue 15). This is the channel only;
//! the server does not use it yet.
//!
//! - [`scm`]: message framing with descriptors (SCM_RIGHTS) over a Unix stream socket;
//! - [`wire`]: the versioned handoff messages and their checks (format negotiation, batch
//!   answers);
//! - [`control`]: `upgrade.sock` in the data directory — the listener the running process
//!   holds, the connection its successor opens, the handshake.

pub mod control;
pub mod scm;
pub mod wire;
