//! Code transfer, sans-IO: the server's [`CodeSender`] (one per device transfer) and the
//! device's [`CodeReceiver`] (one per device, living as long as its [`DeviceSession`]).
//!
//! The exchange, over an established session:
//!
//! ```text
//! server: CodeOffer{v, size, digest}
//! device: CodeRequest{v, offset}        offset = bytes it already holds (0, or resume)
//! server: CodeChunk{v, offset, data}…   at most `window` unacknowledged bytes in flight
//! device: CodeAck{v, held}…             after each chunk appended in order
//! device: CodeDone{v, ok}               once `size` bytes are held and the SHA-256 checked
//! ```
//!
//! Nothing here reads a clock or does I/O; the receiver takes `now` only to report how long a
//! transfer took.

use crate::ids::{CodeVersion, Digest};

mod receiver;
mod sender;

pub use receiver::{CodeReceiver, CodeUpdate, ReceiverConfig};
pub use sender::{CodeSender, SenderConfig};

/// Default chunk size: well under the 64 KiB frame limit of device connections.
pub const DEFAULT_CHUNK: u32 = 16 * 1024;
/// Default window of unacknowledged bytes per transfer.
pub const DEFAULT_WINDOW: u64 = 64 * 1024;
/// Default largest code blob a device accepts (and the server stores).
pub const DEFAULT_MAX_CODE_SIZE: u64 = 16 * 1024 * 1024;
/// Default number of whole-transfer attempts before a device gives up on a version whose
/// digest never matches.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// What went wrong in a code transfer. Flat and `Copy`, so it can be counted per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodeError {
    /// A `CodeRequest` for an offset past the end of the blob.
    #[error("request for offset {offset} of code {version}, which has only {size} bytes")]
    OffsetPastEnd {
        /// Version requested.
        version: CodeVersion,
        /// Offset requested.
        offset: u64,
        /// Size of the blob.
        size: u64,
    },
    /// A `CodeAck` for bytes never sent.
    #[error("ack of offset {got} of code {version}, but only {sent} bytes were sent")]
    AckOfUnsent {
        /// Version in transfer.
        version: CodeVersion,
        /// Offset acknowledged.
        got: u64,
        /// Bytes sent so far.
        sent: u64,
    },
    /// A chunk that leaves a gap after the bytes already held.
    #[error("chunk of code {version} at offset {got}, expected offset {expected}")]
    ChunkOutOfOrder {
        /// Version in transfer.
        version: CodeVersion,
        /// The offset the receiver needs next.
        expected: u64,
        /// The chunk's offset.
        got: u64,
    },
    /// A chunk that overlaps bytes already held.
    #[error("chunk of code {version} at offset {offset} overlaps the {held} bytes already held")]
    ChunkOverlap {
        /// Version in transfer.
        version: CodeVersion,
        /// The chunk's offset.
        offset: u64,
        /// Bytes held.
        held: u64,
    },
    /// A chunk that runs past the offered size.
    #[error("chunk of code {version} runs to byte {end}, past the offered size of {size}")]
    ChunkPastEnd {
        /// Version in transfer.
        version: CodeVersion,
        /// Where the chunk ends.
        end: u64,
        /// Offered size.
        size: u64,
    },
    /// An offer of an empty blob.
    #[error("code {version} offered with size 0")]
    Empty {
        /// Version offered.
        version: CodeVersion,
    },
    /// An offer larger than the receiver accepts.
    #[error("code {version} of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// Version offered.
        version: CodeVersion,
        /// Offered size.
        size: u64,
        /// The receiver's limit.
        limit: u64,
    },
    /// Every byte arrived but the SHA-256 does not match the offer.
    #[error("code {version}: SHA-256 mismatch (offered {expected}, received {got})")]
    DigestMismatch {
        /// Version in transfer.
        version: CodeVersion,
        /// The offered digest.
        expected: Digest,
        /// The digest of what arrived.
        got: Digest,
    },
}

#[cfg(test)]
mod tests;
