//! Zero-downtime upgrade: a running `tether` hands its listening sockets (and, not yet, its
//! live sessions) to a new binary over a control channel in the data directory.
//!
//! - [`handoff`]: the upgrade itself, old side (`Upgrader`: start the new binary, hand it the
//!   listeners, drain) and new side (`--take-over`);
//! - [`scm`]: message framing with descriptors (SCM_RIGHTS) over a Unix stream socket;
//! - [`wire`]: the versioned handoff messages and their checks (format negotiation, batch
//!   answers);
//! - [`control`]: `upgrade.sock` in the data directory — the listener the running process
//!   holds, the connection its successor opens, the handshake.

pub mod control;
pub mod handoff;
pub mod scm;
pub mod wire;
