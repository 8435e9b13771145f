//! The server side of one transfer: chunking and the window of unacknowledged bytes.

use bytes::Bytes;

use super::{CodeError, DEFAULT_CHUNK, DEFAULT_WINDOW};
use crate::ids::CodeVersion;
use crate::message::DeviceMessage;

/// Chunking and flow control of a [`CodeSender`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenderConfig {
    /// Bytes per chunk (keep it under the device's frame limit minus 21 bytes of header).
    pub chunk: u32,
    /// Most unacknowledged bytes in flight (raised to `chunk` if smaller).
    pub window: u64,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            chunk: DEFAULT_CHUNK,
            window: DEFAULT_WINDOW,
        }
    }
}

/// The server side of one transfer to one device.
///
/// Call order: [`new`](Self::new) on the device's `CodeRequest` (or [`restart`](Self::restart)
/// on a later one), [`handle_ack`](Self::handle_ack) on each `CodeAck`, and after either drain
/// [`poll_chunk`](Self::poll_chunk) into the session until it returns `None`.
#[derive(Debug)]
pub struct CodeSender {
    version: CodeVersion,
    blob: Bytes,
    chunk: u64,
    window: u64,
    /// The device holds every byte below this.
    acked: u64,
    /// Next byte to send.
    next: u64,
}

impl CodeSender {
    /// A transfer of `blob` as `version`, starting at the device's `offset`.
    pub fn new(
        version: CodeVersion,
        blob: Bytes,
        offset: u64,
        config: SenderConfig,
    ) -> Result<CodeSender, CodeError> {
        let chunk = u64::from(config.chunk.max(1));
        let mut s = CodeSender {
            version,
            blob,
            chunk,
            window: config.window.max(chunk),
            acked: 0,
            next: 0,
        };
        s.restart(offset)?;
        Ok(s)
    }

    /// Starts again from `offset` (the device asked again: a resume, a resync after a bad chunk,
    /// or a retry from 0 after a digest mismatch). Acks still in flight from before are
    /// ignored if they fall below it.
    pub fn restart(&mut self, offset: u64) -> Result<(), CodeError> {
        if offset > self.size() {
            return Err(CodeError::OffsetPastEnd {
                version: self.version,
                offset,
                size: self.size(),
            });
        }
        self.acked = offset;
        self.next = offset;
        Ok(())
    }

    /// The device holds every byte below `offset`: opens the window.
    pub fn handle_ack(&mut self, offset: u64) -> Result<(), CodeError> {
        if offset > self.next {
            return Err(CodeError::AckOfUnsent {
                version: self.version,
                got: offset,
                sent: self.next,
            });
        }
        // An older ack (sent before a restart) moves nothing.
        self.acked = self.acked.max(offset);
        Ok(())
    }

    /// The next chunk to send, if the window allows one.
    #[must_use]
    pub fn poll_chunk(&mut self) -> Option<DeviceMessage> {
        let size = self.size();
        if self.next >= size {
            return None;
        }
        let len = self.chunk.min(size - self.next);
        if self.next + len > self.acked + self.window {
            return None;
        }
        let start = self.next as usize;
        let data = self.blob.slice(start..start + len as usize);
        let offset = self.next;
        self.next += len;
        Some(DeviceMessage::CodeChunk {
            version: self.version,
            offset,
            data,
        })
    }

    /// Whether the device acknowledged every byte.
    pub fn is_complete(&self) -> bool {
        self.acked == self.size()
    }

    /// The version in transfer.
    pub fn version(&self) -> CodeVersion {
        self.version
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.blob.len() as u64
    }

    /// Bytes the device acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Bytes sent (acknowledged or not).
    pub fn sent(&self) -> u64 {
        self.next
    }
}
