//! Deterministic code-transfer tests: a [`Link`] plays the server's side (one [`CodeSender`]
//! driven by the device's requests and acks) against a [`CodeReceiver`], in memory.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::*;
use crate::auth::{Nonce, derive_device_key};
use crate::device::{DeviceConfig, DeviceSession};
use crate::ids::{DeviceId, SessionId};
use crate::message::DeviceMessage;
use crate::server::{CodeEvent, ServerConfig, ServerEvent, ServerSession};

const V1: CodeVersion = CodeVersion(1);
const V2: CodeVersion = CodeVersion(2);

fn blob(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn small() -> SenderConfig {
    SenderConfig {
        chunk: 1000,
        window: 3000,
    }
}

type Tamper = Box<dyn FnMut(usize, &mut DeviceMessage)>;

/// The server's side of one device's transfers, in memory.
struct Link {
    now: Instant,
    version: CodeVersion,
    blob: Bytes,
    config: SenderConfig,
    sender: Option<CodeSender>,
    rx: CodeReceiver,
    /// Chunks on their way to the device.
    wire: VecDeque<DeviceMessage>,
    requests: Vec<u64>,
    done: Vec<(CodeVersion, bool)>,
    updates: Vec<CodeUpdate>,
    /// Most chunks unacknowledged at once, in bytes.
    max_in_flight: u64,
    /// Changes a chunk on its way (corruption, reordering) — called with each chunk's index.
    tamper: Tamper,
    chunks_sent: usize,
}

impl Link {
    fn new(len: usize, config: SenderConfig, rx: ReceiverConfig) -> Link {
        Link {
            now: Instant::now(),
            version: V1,
            blob: blob(len, 7),
            config,
            sender: None,
            rx: CodeReceiver::new(CodeVersion(0), rx),
            wire: VecDeque::new(),
            requests: vec![],
            done: vec![],
            updates: vec![],
            max_in_flight: 0,
            tamper: Box::new(|_, _| {}),
            chunks_sent: 0,
        }
    }

    fn offer(&mut self) {
        let digest = Digest::of(&self.blob);
        self.rx
            .handle_offer(self.now, self.version, self.blob.len() as u64, digest);
        self.step(usize::MAX);
    }

    /// Moves messages both ways until nothing moves, or `budget` chunks were delivered.
    fn step(&mut self, mut budget: usize) {
        loop {
            let mut moved = false;
            while let Some(m) = self.rx.poll_message() {
                moved = true;
                match m {
                    DeviceMessage::CodeRequest { version, offset } => {
                        assert_eq!(version, self.version);
                        self.requests.push(offset);
                        match self.sender.as_mut() {
                            Some(s) if s.version() == version => s.restart(offset).unwrap(),
                            _ => {
                                self.sender = Some(
                                    CodeSender::new(
                                        version,
                                        self.blob.clone(),
                                        offset,
                                        self.config,
                                    )
                                    .unwrap(),
                                )
                            }
                        }
                    }
                    DeviceMessage::CodeAck { offset, .. } => {
                        if let Some(s) = self.sender.as_mut() {
                            s.handle_ack(offset).unwrap();
                        }
                    }
                    DeviceMessage::CodeDone { version, ok } => self.done.push((version, ok)),
                    other => panic!("device sent {other:?}"),
                }
            }
            if let Some(s) = self.sender.as_mut() {
                while let Some(mut c) = s.poll_chunk() {
                    (self.tamper)(self.chunks_sent, &mut c);
                    self.chunks_sent += 1;
                    self.wire.push_back(c);
                    moved = true;
                }
                self.max_in_flight = self.max_in_flight.max(s.sent() - s.acked());
            }
            if budget > 0 {
                if let Some(DeviceMessage::CodeChunk {
                    version,
                    offset,
                    data,
                }) = self.wire.pop_front()
                {
                    budget -= 1;
                    self.now += Duration::from_millis(10);
                    self.rx.handle_chunk(self.now, version, offset, data);
                    moved = true;
                }
            }
            while let Some(u) = self.rx.poll_event() {
                self.updates.push(u);
            }
            if !moved {
                return;
            }
        }
    }

    /// The connection drops: chunks in flight are lost, the server forgets the transfer.
    fn disconnect(&mut self) {
        self.wire.clear();
        self.sender = None;
        while self.rx.poll_message().is_some() {}
    }

    fn installed(&self) -> Option<&CodeUpdate> {
        self.updates
            .iter()
            .find(|u| matches!(u, CodeUpdate::Installed { .. }))
    }

    fn rejected(&self) -> Vec<CodeError> {
        self.updates
            .iter()
            .filter_map(|u| match u {
                CodeUpdate::Rejected { error } => Some(*error),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn sender_respects_chunk_size_and_window() {
    let mut s = CodeSender::new(V1, blob(10_500, 1), 0, small()).unwrap();
    let mut got = vec![];
    while let Some(DeviceMessage::CodeChunk { offset, data, .. }) = s.poll_chunk() {
        got.push((offset, data.len()));
    }
    assert_eq!(got, [(0, 1000), (1000, 1000), (2000, 1000)]);
    s.handle_ack(1000).unwrap();
    assert!(matches!(
        s.poll_chunk(),
        Some(DeviceMessage::CodeChunk { offset: 3000, .. })
    ));
    assert!(s.poll_chunk().is_none());
    // The last chunk is short; the transfer completes when it is acknowledged.
    s.restart(10_000).unwrap();
    assert!(
        matches!(s.poll_chunk(), Some(DeviceMessage::CodeChunk { offset: 10_000, data, .. }) if data.len() == 500)
    );
    assert!(!s.is_complete());
    s.handle_ack(10_500).unwrap();
    assert!(s.is_complete());
    assert!(s.poll_chunk().is_none());
}

#[test]
fn sender_refuses_bad_offsets_and_acks() {
    assert_eq!(
        CodeSender::new(V1, blob(100, 1), 101, small()).unwrap_err(),
        CodeError::OffsetPastEnd {
            version: V1,
            offset: 101,
            size: 100
        }
    );
    let mut s = CodeSender::new(V1, blob(5000, 1), 0, small()).unwrap();
    let _ = s.poll_chunk();
    assert_eq!(
        s.handle_ack(1001).unwrap_err(),
        CodeError::AckOfUnsent {
            version: V1,
            got: 1001,
            sent: 1000
        }
    );
    // An ack from before a restart moves nothing backwards.
    s.handle_ack(1000).unwrap();
    s.handle_ack(0).unwrap();
    assert_eq!(s.acked(), 1000);
}

#[test]
fn whole_transfer_installs_with_the_window_bounded() {
    let mut l = Link::new(10_500, small(), ReceiverConfig::default());
    l.offer();
    let Some(CodeUpdate::Installed {
        version,
        digest,
        blob,
        elapsed,
    }) = l.installed().cloned()
    else {
        panic!("{:?}", l.updates)
    };
    assert_eq!(version, V1);
    assert_eq!(digest, Digest::of(&l.blob));
    assert_eq!(blob.as_ref(), Some(&l.blob));
    assert_eq!(elapsed, Duration::from_millis(110)); // 11 chunks, 10 ms apart
    assert_eq!(l.done, [(V1, true)]);
    assert_eq!(l.requests, [0]);
    assert!(l.max_in_flight <= 3000, "{}", l.max_in_flight);
    assert_eq!(l.rx.running(), V1);
    assert!(l.rx.in_progress().is_none());
    assert!(l.rejected().is_empty());
}

#[test]
fn interrupted_transfer_resumes_from_the_bytes_held() {
    let mut l = Link::new(10_000, small(), ReceiverConfig::default());
    l.offer_partial(4);
    assert_eq!(l.rx.in_progress(), Some((V1, 4000, 10_000)));
    l.disconnect();
    // Reconnected: the server offers again, the device asks from where it stopped.
    l.offer();
    assert_eq!(l.requests, [0, 4000]);
    assert!(l.installed().is_some(), "{:?}", l.updates);
    assert_eq!(l.done, [(V1, true)]);
    assert!(l.updates.contains(&CodeUpdate::Started {
        version: V1,
        size: 10_000,
        offset: 4000
    }));
}

impl Link {
    fn offer_partial(&mut self, chunks: usize) {
        let digest = Digest::of(&self.blob);
        self.rx
            .handle_offer(self.now, self.version, self.blob.len() as u64, digest);
        self.step(chunks);
    }
}

#[test]
fn corrupt_chunk_fails_the_digest_and_the_transfer_is_retried_from_zero() {
    let mut l = Link::new(5000, small(), ReceiverConfig::default());
    l.tamper = Box::new(|i, m| {
        if let (2, DeviceMessage::CodeChunk { data, .. }) = (i, m) {
            let mut b = BytesMut::from(&data[..]);
            b[10] ^= 0xff;
            *data = b.freeze();
        }
    });
    l.offer();
    assert!(matches!(
        l.rejected()[..],
        [CodeError::DigestMismatch { version: V1, .. }]
    ));
    assert_eq!(l.done, [(V1, false), (V1, true)]);
    assert_eq!(l.requests, [0, 0]);
    let Some(CodeUpdate::Installed { blob, .. }) = l.installed() else {
        panic!("{:?}", l.updates)
    };
    assert_eq!(blob.as_ref(), Some(&l.blob));
}

#[test]
fn out_of_order_chunk_is_rejected_and_the_gap_requested_again() {
    let mut l = Link::new(8000, small(), ReceiverConfig::default());
    // The second chunk claims a later offset: a gap at 1000.
    l.tamper = Box::new(|i, m| {
        if let (1, DeviceMessage::CodeChunk { offset, .. }) = (i, m) {
            *offset = 2000;
        }
    });
    l.offer();
    assert_eq!(
        l.rejected(),
        [CodeError::ChunkOutOfOrder {
            version: V1,
            expected: 1000,
            got: 2000
        }]
    );
    // One re-request; the chunks already in flight were dropped quietly.
    assert_eq!(l.requests, [0, 1000]);
    assert_eq!(l.done, [(V1, true)]);
    assert!(l.installed().is_some());
}

#[test]
fn overlapping_and_oversized_chunks_are_rejected() {
    let now = Instant::now();
    let data = blob(3000, 3);
    let mut rx = CodeReceiver::new(CodeVersion(0), ReceiverConfig::default());
    rx.handle_offer(now, V1, 3000, Digest::of(&data));
    assert_eq!(
        rx.poll_message(),
        Some(DeviceMessage::CodeRequest {
            version: V1,
            offset: 0
        })
    );
    rx.handle_chunk(now, V1, 0, data.slice(0..1000));
    // Past the offered size.
    rx.handle_chunk(now, V1, 1000, data.slice(0..2500));
    // Overlapping what is held (and bringing new bytes): rejected, asked again.
    rx.handle_chunk(now, V1, 500, data.slice(500..1500));
    let updates: Vec<_> = std::iter::from_fn(|| rx.poll_event()).collect();
    assert!(updates.contains(&CodeUpdate::Rejected {
        error: CodeError::ChunkPastEnd {
            version: V1,
            end: 3500,
            size: 3000
        }
    }));
    let msgs: Vec<_> = std::iter::from_fn(|| rx.poll_message()).collect();
    assert_eq!(
        msgs,
        [
            DeviceMessage::CodeAck {
                version: V1,
                offset: 1000
            },
            DeviceMessage::CodeRequest {
                version: V1,
                offset: 1000
            },
        ]
    );
    // Resyncing: the overlap arrived before our request took effect, so it is dropped quietly.
    assert!(!updates.iter().any(|u| matches!(
        u,
        CodeUpdate::Rejected {
            error: CodeError::ChunkOverlap { .. }
        }
    )));
    rx.handle_chunk(now, V1, 1000, data.slice(1000..2000));
    rx.handle_chunk(now, V1, 500, data.slice(500..1500));
    assert_eq!(
        rx.poll_event(),
        Some(CodeUpdate::Rejected {
            error: CodeError::ChunkOverlap {
                version: V1,
                offset: 500,
                held: 2000
            }
        })
    );
    // A pure duplicate leaves nothing missing: no request.
    assert_eq!(
        rx.poll_message(),
        Some(DeviceMessage::CodeAck {
            version: V1,
            offset: 2000
        })
    );
    assert_eq!(rx.poll_message(), None);
    assert_eq!(rx.in_progress(), Some((V1, 2000, 3000)));
}

#[test]
fn device_gives_up_after_bounded_attempts_until_a_new_version() {
    let mut l = Link::new(2000, small(), ReceiverConfig::default());
    l.tamper = Box::new(|_, m| {
        if let DeviceMessage::CodeChunk { data, .. } = m {
            *data = Bytes::from(vec![0u8; data.len()]);
        }
    });
    l.offer();
    assert_eq!(l.done, [(V1, false); DEFAULT_MAX_ATTEMPTS as usize]);
    assert!(l.updates.contains(&CodeUpdate::GaveUp {
        version: V1,
        attempts: DEFAULT_MAX_ATTEMPTS
    }));
    assert_eq!(l.rx.running(), CodeVersion(0));
    // The same offer again is ignored…
    let before = l.requests.len();
    l.offer();
    assert_eq!(l.requests.len(), before);
    // …until asked to forget, or a different version comes.
    l.tamper = Box::new(|_, _| {});
    l.rx.forget_failures();
    l.offer();
    assert_eq!(l.rx.running(), V1);
}

#[test]
fn empty_oversized_current_and_older_offers() {
    let now = Instant::now();
    let cfg = ReceiverConfig {
        max_size: 100,
        ..ReceiverConfig::default()
    };
    let mut rx = CodeReceiver::new(V2, cfg);
    rx.handle_offer(now, CodeVersion(3), 0, Digest::default());
    rx.handle_offer(now, CodeVersion(4), 101, Digest::default());
    rx.handle_offer(now, V2, 10, Digest::default());
    rx.handle_offer(now, V1, 10, Digest::default());
    let msgs: Vec<_> = std::iter::from_fn(|| rx.poll_message()).collect();
    assert_eq!(
        msgs,
        [
            DeviceMessage::CodeDone {
                version: CodeVersion(3),
                ok: false
            },
            DeviceMessage::CodeDone {
                version: CodeVersion(4),
                ok: false
            },
            DeviceMessage::CodeDone {
                version: V2,
                ok: true
            },
        ]
    );
    let errors: Vec<_> = std::iter::from_fn(|| rx.poll_event()).collect();
    assert_eq!(
        errors,
        [
            CodeUpdate::Rejected {
                error: CodeError::Empty {
                    version: CodeVersion(3)
                }
            },
            CodeUpdate::Rejected {
                error: CodeError::TooLarge {
                    version: CodeVersion(4),
                    size: 101,
                    limit: 100
                }
            },
        ]
    );
    assert_eq!(
        CodeError::TooLarge {
            version: CodeVersion(4),
            size: 101,
            limit: 100
        }
        .to_string(),
        "code v4 of 101 bytes is over the limit of 100 bytes"
    );
}

#[test]
fn streaming_receiver_hands_out_data_and_keeps_no_blob() {
    let cfg = ReceiverConfig {
        keep_blob: false,
        ..ReceiverConfig::default()
    };
    let mut l = Link::new(2500, small(), cfg);
    l.offer();
    let mut staged = Vec::new();
    for u in &l.updates {
        if let CodeUpdate::Data { offset, data, .. } = u {
            assert_eq!(*offset as usize, staged.len());
            staged.extend_from_slice(data);
        }
    }
    assert_eq!(staged, l.blob);
    assert!(matches!(
        l.installed(),
        Some(CodeUpdate::Installed { blob: None, .. })
    ));
}

#[test]
fn a_newer_offer_mid_transfer_replaces_it_and_old_chunks_are_ignored() {
    let mut l = Link::new(6000, small(), ReceiverConfig::default());
    l.offer_partial(2);
    // A deploy of v2 lands while v1 chunks are still in flight.
    l.version = V2;
    l.blob = blob(3000, 9);
    l.sender = None;
    let old: Vec<_> = l.wire.drain(..).collect();
    l.offer_partial(0);
    for m in old {
        if let DeviceMessage::CodeChunk {
            version,
            offset,
            data,
        } = m
        {
            l.rx.handle_chunk(l.now, version, offset, data);
        }
    }
    l.step(usize::MAX);
    assert!(l.rejected().is_empty(), "{:?}", l.rejected());
    assert_eq!(l.rx.running(), V2);
    assert_eq!(l.done, [(V2, true)]);
}

/// The receiver wired to real sessions: offer, request, chunks and acks travel as frames, and
/// the next `Hello` names the installed version.
#[test]
fn over_sessions_the_next_hello_names_the_installed_version() {
    let now = Instant::now();
    let key = derive_device_key(b"s", DeviceId(1));
    let mut device = DeviceSession::new(DeviceConfig::new(DeviceId(1), key.clone()), now);
    let mut server = ServerSession::new(&ServerConfig::default(), Nonce([3; 32]), now);
    device.connect(now);
    let code = blob(40_000, 5);
    let mut rx = CodeReceiver::new(device.code_version(), ReceiverConfig::default());
    let mut sender: Option<CodeSender> = None;
    let mut offered = false;
    for _ in 0..200 {
        let mut buf = BytesMut::new();
        if device.poll_transmit(&mut buf) {
            server.handle_bytes(now, &buf);
        }
        while let Some(e) = server.poll_event() {
            match e {
                ServerEvent::Hello { .. } => {
                    assert_eq!(server.pending_code_version(), Some(CodeVersion(0)));
                    server
                        .authenticate(now, Some(&key), SessionId(1), 0, None)
                        .unwrap();
                }
                ServerEvent::Code(CodeEvent::Request { version, offset }) => {
                    sender = Some(
                        CodeSender::new(version, code.clone(), offset, SenderConfig::default())
                            .unwrap(),
                    )
                }
                ServerEvent::Code(CodeEvent::Ack { offset, .. }) => {
                    sender.as_mut().unwrap().handle_ack(offset).unwrap()
                }
                ServerEvent::Code(CodeEvent::Done { ok, .. }) => assert!(ok),
                other => panic!("{other:?}"),
            }
        }
        if server.device().is_some() && !offered {
            offered = true;
            server
                .offer_code(V1, code.len() as u64, Digest::of(&code))
                .unwrap();
        }
        if let Some(s) = sender.as_mut() {
            while let Some(c) = s.poll_chunk() {
                server.send_control(&c).unwrap();
            }
        }
        let mut buf = BytesMut::new();
        if server.poll_transmit(&mut buf) {
            device.handle_bytes(now, &buf);
        }
        while let Some(e) = device.poll_event() {
            rx.handle_device_event(now, &e);
        }
        rx.flush_into(&mut device).unwrap();
    }
    assert_eq!(rx.running(), V1);
    assert_eq!(device.code_version(), V1);
    assert!(sender.unwrap().is_complete());
}
