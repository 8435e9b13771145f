//! The device side: resume, in-order assembly, acks, digest check and bounded retries.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sha2::Digest as _;

use super::{CodeError, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_CODE_SIZE};
use crate::device::{DeviceEvent, DeviceSession};
use crate::error::SendError;
use crate::ids::{CodeVersion, Digest};
use crate::message::DeviceMessage;

/// Limits and behaviour of a [`CodeReceiver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Largest blob accepted.
    pub max_size: u64,
    /// Whole-transfer attempts (after digest mismatches) before giving up on a version.
    pub max_attempts: u32,
    /// Assemble the blob in memory and hand it over in [`CodeUpdate::Installed`]. When
    /// `false`, each accepted chunk is handed over as [`CodeUpdate::Data`] for the device to
    /// stage (flash), and the receiver keeps only a running hash: a few hundred bytes per
    /// device, which is what a load generator simulating many devices wants.
    pub keep_blob: bool,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            max_size: DEFAULT_MAX_CODE_SIZE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            keep_blob: true,
        }
    }
}

/// What the receiver tells the device application.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodeUpdate {
    /// A transfer started (`offset` 0) or resumed (`offset` > 0).
    Started {
        /// Version.
        version: CodeVersion,
        /// Size.
        size: u64,
        /// First byte requested.
        offset: u64,
    },
    /// Bytes to stage (only with `keep_blob: false`), in order, starting at 0 (again after a
    /// retry from 0: discard what was staged then).
    Data {
        /// Version.
        version: CodeVersion,
        /// Offset of `data`.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Every byte arrived and the SHA-256 matched: switch to this version.
    Installed {
        /// Version now running.
        version: CodeVersion,
        /// Its digest.
        digest: Digest,
        /// The blob, with `keep_blob: true`.
        blob: Option<Bytes>,
        /// From the first offer of this version to now (across reconnects).
        elapsed: Duration,
    },
    /// A chunk or a whole transfer was refused. If something is missing it was asked for
    /// again; a digest mismatch retries from 0 until the attempts run out.
    Rejected {
        /// Why.
        error: CodeError,
    },
    /// Attempts ran out on this version: further offers of it are ignored until a different
    /// version (or digest) is offered or [`CodeReceiver::forget_failures`] is called.
    GaveUp {
        /// Version given up.
        version: CodeVersion,
        /// Attempts made.
        attempts: u32,
    },
}

#[derive(Debug)]
struct Transfer {
    version: CodeVersion,
    size: u64,
    digest: Digest,
    held: u64,
    hasher: sha2::Sha256,
    blob: BytesMut,
    attempts: u32,
    /// A request went out: chunks not at `held` are leftovers from before it, dropped quietly.
    resync: bool,
    started: Instant,
}

/// The device side of code transfers. One per device, kept across reconnects so a transfer
/// resumes where it stopped.
///
/// Call order, from the device's event loop: pass `DeviceEvent::CodeOffer` and
/// `DeviceEvent::CodeChunk` to [`handle_device_event`](Self::handle_device_event) (or
/// [`handle_offer`](Self::handle_offer) / [`handle_chunk`](Self::handle_chunk)), then
/// [`flush_into`](Self::flush_into) the session (or drain [`poll_message`](Self::poll_message)
/// through `DeviceSession::send_code`), then drain [`poll_event`](Self::poll_event).
#[derive(Debug)]
pub struct CodeReceiver {
    config: ReceiverConfig,
    running: CodeVersion,
    transfer: Option<Box<Transfer>>,
    gave_up: Option<(CodeVersion, Digest)>,
    out: VecDeque<DeviceMessage>,
    events: VecDeque<CodeUpdate>,
}

impl CodeReceiver {
    /// A receiver for a device running `running`.
    pub fn new(running: CodeVersion, config: ReceiverConfig) -> CodeReceiver {
        CodeReceiver {
            config,
            running,
            transfer: None,
            gave_up: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The version the device runs.
    pub fn running(&self) -> CodeVersion {
        self.running
    }

    /// The transfer in progress: (version, bytes held, size).
    pub fn in_progress(&self) -> Option<(CodeVersion, u64, u64)> {
        self.transfer.as_ref().map(|t| (t.version, t.held, t.size))
    }

    /// Forgets versions given up on, so their next offer is tried again.
    pub fn forget_failures(&mut self) {
        self.gave_up = None;
    }

    /// Handles a code event from the device session; `false` if `e` is not one.
    pub fn handle_device_event(&mut self, now: Instant, e: &DeviceEvent) -> bool {
        match e {
            DeviceEvent::CodeOffer {
                version,
                size,
                digest,
            } => self.handle_offer(now, *version, *size, *digest),
            DeviceEvent::CodeChunk {
                version,
                offset,
                data,
            } => self.handle_chunk(now, *version, *offset, data.clone()),
            _ => return false,
        }
        true
    }

    /// The server offers `version`.
    pub fn handle_offer(&mut self, now: Instant, version: CodeVersion, size: u64, digest: Digest) {
        if version == self.running {
            // Already running it (our `Done` may have been lost with a connection).
            self.out
                .push_back(DeviceMessage::CodeDone { version, ok: true });
            return;
        }
        if version < self.running || self.gave_up == Some((version, digest)) {
            return;
        }
        let error = if size == 0 {
            Some(CodeError::Empty { version })
        } else if size > self.config.max_size {
            Some(CodeError::TooLarge {
                version,
                size,
                limit: self.config.max_size,
            })
        } else {
            None
        };
        if let Some(error) = error {
            self.events.push_back(CodeUpdate::Rejected { error });
            self.out
                .push_back(DeviceMessage::CodeDone { version, ok: false });
            self.gave_up = Some((version, digest));
            return;
        }
        let same = self
            .transfer
            .as_ref()
            .is_some_and(|t| t.version == version && t.digest == digest && t.size == size);
        if !same {
            self.transfer = Some(Box::new(Transfer {
                version,
                size,
                digest,
                held: 0,
                hasher: sha2::Sha256::new(),
                blob: BytesMut::new(),
                attempts: 0,
                resync: false,
                started: now,
            }));
        }
        if let Some(t) = self.transfer.as_mut() {
            self.events.push_back(CodeUpdate::Started {
                version,
                size,
                offset: t.held,
            });
            request(&mut self.out, t);
        }
    }

    /// A chunk arrived.
    pub fn handle_chunk(&mut self, now: Instant, version: CodeVersion, offset: u64, data: Bytes) {
        let Some(t) = self.transfer.as_mut() else {
            return; // nothing requested: a leftover of a finished or abandoned transfer
        };
        if t.version != version {
            return; // a leftover of an earlier version's transfer
        }
        let len = data.len() as u64;
        let end = offset.saturating_add(len);
        let error = if end > t.size {
            Some(CodeError::ChunkPastEnd {
                version,
                end,
                size: t.size,
            })
        } else if offset > t.held {
            Some(CodeError::ChunkOutOfOrder {
                version,
                expected: t.held,
                got: offset,
            })
        } else if offset < t.held {
            Some(CodeError::ChunkOverlap {
                version,
                offset,
                held: t.held,
            })
        } else {
            None
        };
        if let Some(error) = error {
            if t.resync {
                return; // sent before our request reached the server
            }
            self.events.push_back(CodeUpdate::Rejected { error });
            // A pure duplicate leaves nothing missing: asking again would only cause more.
            if end > t.held {
                request(&mut self.out, t);
            }
            return;
        }
        t.resync = false;
        t.hasher.update(&data);
        t.held = end;
        if self.config.keep_blob {
            t.blob.extend_from_slice(&data);
        } else {
            self.events.push_back(CodeUpdate::Data {
                version,
                offset,
                data,
            });
        }
        self.out.push_back(DeviceMessage::CodeAck {
            version,
            offset: t.held,
        });
        if t.held == t.size {
            self.finish(now);
        }
    }

    fn finish(&mut self, now: Instant) {
        let Some(mut t) = self.transfer.take() else {
            return;
        };
        let got = Digest(std::mem::take(&mut t.hasher).finalize().into());
        let version = t.version;
        if got == t.digest {
            self.running = version;
            self.out
                .push_back(DeviceMessage::CodeDone { version, ok: true });
            self.events.push_back(CodeUpdate::Installed {
                version,
                digest: got,
                blob: self.config.keep_blob.then(|| t.blob.split().freeze()),
                elapsed: now.saturating_duration_since(t.started),
            });
            return;
        }
        t.attempts += 1;
        self.events.push_back(CodeUpdate::Rejected {
            error: CodeError::DigestMismatch {
                version,
                expected: t.digest,
                got,
            },
        });
        self.out
            .push_back(DeviceMessage::CodeDone { version, ok: false });
        if t.attempts >= self.config.max_attempts {
            self.gave_up = Some((version, t.digest));
            self.events.push_back(CodeUpdate::GaveUp {
                version,
                attempts: t.attempts,
            });
            return;
        }
        // Discard everything and start again from 0.
        t.held = 0;
        t.blob.clear();
        self.events.push_back(CodeUpdate::Started {
            version,
            size: t.size,
            offset: 0,
        });
        request(&mut self.out, &mut t);
        self.transfer = Some(t);
    }

    /// The next message for the server (`CodeRequest`, `CodeAck`, `CodeDone`).
    pub fn poll_message(&mut self) -> Option<DeviceMessage> {
        self.out.pop_front()
    }

    /// The next update for the application.
    pub fn poll_event(&mut self) -> Option<CodeUpdate> {
        self.events.pop_front()
    }

    /// Sends every queued message through `session` and makes its next `Hello` name the
    /// version now running. If the session is closed the messages are dropped: on the next
    /// connection the server offers again and the transfer resumes from the bytes held.
    pub fn flush_into(&mut self, session: &mut DeviceSession) -> Result<(), SendError> {
        session.set_code_version(self.running);
        while let Some(m) = self.out.pop_front() {
            if let Err(e) = session.send_code(&m) {
                self.out.clear();
                return Err(e);
            }
        }
        Ok(())
    }
}

fn request(out: &mut VecDeque<DeviceMessage>, t: &mut Transfer) {
    if t.held == 0 {
        t.hasher = sha2::Sha256::new();
    }
    t.resync = true;
    out.push_back(DeviceMessage::CodeRequest {
        version: t.version,
        offset: t.held,
    });
}
