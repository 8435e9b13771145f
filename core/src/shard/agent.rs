//! The agent link: cloud-side agents attach over plain TCP (loopback only) or, with
//! `--agent-tls`, TLS 1.3 (ALPN `tether-agent/1`), with the token from the data directory
//! (checked in constant time), then send to devices and receive every device message and
//! presence change. Agents are few, so each gets a task (unlike devices), and a second task
//! writes its outbound queue; the TLS handshake and the `AgentHello` each have 5 s.
//!
//! The outbound queue is bounded by push-back, not by dropping ([`AgentOut`]); presence
//! changes it cannot hold are coalesced into a marked `PresenceSnapshot` ([`Resync`]).

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use tether_protocol::codec::{DEFAULT_AGENT_MAX_FRAME, FrameDecoder};
use tether_protocol::message::ErrorCode;
use tether_protocol::{AgentMessage, CodeVersion, DeviceId, Digest, PROTOCOL_VERSION};

use super::contain::{self, Site};
use super::route::{AgentId, ShardMsg, home_shard};
use super::{Shard, now_ms, wake};
use crate::deploy::{DEPLOY_TIMEOUT, DeployReport, DeployRequest};
use crate::fsutil::from_hex;
use crate::metrics::ErrorKind;

/// Default for the most bytes queued towards one agent (`--agent-queue-limit`).
pub const AGENT_QUEUE_LIMIT: usize = 8 * 1024 * 1024;

/// Time for the TLS handshake, and then again for the `AgentHello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest frame a connection may send before its token verified (an `AgentHello` is a few
/// dozen bytes): a stranger cannot make the server buffer the 16 MiB an agent may send.
const HELLO_MAX_FRAME: u32 = 4 * 1024;
/// Most agent connections per shard that have not yet proved their token; more are closed.
const MAX_PENDING_AGENTS: usize = 64;

/// The outbound queue of one attached agent, bounded by back-pressure rather than by
/// dropping: past its limit (bytes queued plus the batch being written),
/// - the agent's own socket is not read (its replies cannot pile up),
/// - a device message for it waits, and its device's socket is not read,
/// - a shard's mesh messages for it wait (the peer's outbox fills, and pushes back in turn),
/// - a presence change is not queued: the agent gets a `PresenceSnapshot` instead, once the
///   shards answered and there is room ([`Shard::presence_to_local`]).
///
/// What is still queued past the limit is bounded by its cause: replies to frames already
/// read, and the one message per waiting producer that was already decoded.
pub(crate) struct AgentOut {
    buf: RefCell<BytesMut>,
    /// Bytes taken by the writer and not yet written.
    in_flight: Cell<usize>,
    limit: usize,
    /// A producer found no room since room last returned.
    wanted: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    closed: Cell<bool>,
}

impl AgentOut {
    fn new(limit: usize) -> Self {
        AgentOut {
            buf: RefCell::new(BytesMut::new()),
            in_flight: Cell::new(0),
            limit: limit.max(1),
            wanted: Cell::new(false),
            waker: RefCell::new(None),
            closed: Cell::new(false),
        }
    }

    fn queued(&self) -> usize {
        self.buf.borrow().len() + self.in_flight.get()
    }

    /// Whether `extra` more bytes fit under the limit (or the queue is empty: one oversized
    /// item, e.g. a large snapshot, still goes through alone). When not, room is reported
    /// when the writer has written its batch.
    pub(crate) fn fits(&self, extra: usize) -> bool {
        let q = self.queued();
        let ok = q == 0 || q + extra <= self.limit;
        if !ok {
            self.wanted.set(true);
        }
        ok
    }

    /// Whether the queue is under its limit (producers that can wait check this first). A
    /// closed queue (the agent is leaving) has room: what is pushed to it is discarded.
    pub(crate) fn has_room(&self) -> bool {
        self.closed.get() || self.fits(1)
    }

    /// Queues a frame (whatever the limit: callers that can wait checked
    /// [`has_room`](Self::has_room)); `false` only if it does not encode.
    pub(crate) fn push(&self, m: &AgentMessage) -> bool {
        if self.closed.get() {
            return false; // the agent is gone
        }
        if m.encode(&mut self.buf.borrow_mut()).is_err() {
            return false;
        }
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
        true
    }

    async fn next_batch(&self) -> Option<BytesMut> {
        std::future::poll_fn(|cx| {
            if self.closed.get() {
                return Poll::Ready(None);
            }
            let mut buf = self.buf.borrow_mut();
            if buf.is_empty() {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            self.in_flight.set(buf.len());
            Poll::Ready(Some(buf.split()))
        })
        .await
    }

    /// The writer wrote its batch: returns whether producers waiting for room should retry.
    fn written(&self) -> bool {
        self.in_flight.set(0);
        self.wanted.replace(false)
    }

    pub(super) fn close(&self) {
        self.closed.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

async fn read_frame(
    stream: &mut (impl AsyncRead + Unpin),
    dec: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Option<AgentMessage>, String> {
    loop {
        match dec.next_frame() {
            Ok(Some(f)) => return AgentMessage::decode(f).map(Some).map_err(|e| e.to_string()),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let n = stream.read(buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
        dec.push(&buf[..n]);
    }
}

async fn send_error(stream: &mut (impl AsyncWrite + Unpin), code: ErrorCode, text: String) {
    let mut b = BytesMut::new();
    let _ = AgentMessage::Error {
        code,
        message: Bytes::from(text),
    }
    .encode(&mut b);
    if stream.write_all(&b).await.is_ok() {
        let _ = stream.flush().await;
    }
}

/// Serves one agent connection until it leaves: over TLS when the server has an agent TLS
/// config, else plain TCP. A failed or slow TLS handshake is counted as a TLS error and the
/// connection closed (rustls sends its alert first).
pub(crate) async fn serve_agent(shard: Rc<RefCell<Shard>>, stream: TcpStream) {
    {
        let mut s = shard.borrow_mut();
        if s.agents_pending >= MAX_PENDING_AGENTS {
            s.metrics.refused_agents_pending += 1;
            return; // dropping the stream closes it
        }
        s.agents_pending += 1;
    }
    let pending = PendingAgent(shard.clone());
    let _ = stream.set_nodelay(true);
    let tls = shard.borrow().ctx.agent_tls.clone();
    let Some(config) = tls else {
        return serve_link(shard, stream, pending).await;
    };
    let acceptor = futures_rustls::TlsAcceptor::from(config);
    let accepted =
        glommio::timer::timeout(HELLO_TIMEOUT, async { Ok(acceptor.accept(stream).await) }).await;
    match accepted {
        Ok(Ok(tls)) => serve_link(shard, tls, pending).await,
        Ok(Err(_)) | Err(_) => shard.borrow_mut().metrics.error(ErrorKind::Tls),
    }
}

/// Counts an agent connection as a stranger until its token verified (or it went away).
struct PendingAgent(Rc<RefCell<Shard>>);

impl Drop for PendingAgent {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.try_borrow_mut() {
            s.agents_pending = s.agents_pending.saturating_sub(1);
        }
    }
}

/// The agent protocol over an established stream (plain or TLS).
async fn serve_link<S>(shard: Rc<RefCell<Shard>>, mut stream: S, pending: PendingAgent)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let mut dec = FrameDecoder::new(HELLO_MAX_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    // AgentHello within 5 s, with the right token.
    let hello = glommio::timer::timeout(HELLO_TIMEOUT, async {
        Ok(read_frame(&mut stream, &mut dec, &mut buf).await)
    })
    .await;
    let token_ok = match hello {
        Ok(Ok(Some(AgentMessage::AgentHello { version, token, .. }))) => {
            if version != PROTOCOL_VERSION {
                send_error(
                    &mut stream,
                    ErrorCode::UnsupportedVersion,
                    format!("agent protocol version {version} not supported (server speaks {PROTOCOL_VERSION})"),
                )
                .await;
                return;
            }
            shard.borrow().ctx.agent_token.verify(&token)
        }
        Ok(Ok(Some(other))) => {
            send_error(
                &mut stream,
                ErrorCode::ProtocolViolation,
                format!("expected AgentHello, got {}", other.ty()),
            )
            .await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            send_error(&mut stream, ErrorCode::MalformedFrame, e).await;
            return;
        }
        Err(_) => {
            send_error(
                &mut stream,
                ErrorCode::Timeout,
                "no AgentHello within 5 s".into(),
            )
            .await;
            return;
        }
    };
    if !token_ok {
        shard.borrow_mut().metrics.error(ErrorKind::BadProof);
        send_error(
            &mut stream,
            ErrorCode::BadToken,
            "agent token rejected".into(),
        )
        .await;
        return;
    }
    drop(pending);
    dec.set_max_frame(DEFAULT_AGENT_MAX_FRAME);
    let nshards = shard.borrow().nshards;
    let limit = shard.borrow().ctx.agent_queue_limit;
    let out = Rc::new(AgentOut::new(limit));
    let agent: AgentId = {
        let mut s = shard.borrow_mut();
        s.next_agent += 1;
        let agent = ((s.id as u32) << 24) | (s.next_agent & 0x00ff_ffff);
        s.local_agents.insert(agent, out.clone());
        s.metrics.agents_attached += 1;
        s.broadcast(|| ShardMsg::AgentUp { agent });
        agent
    };
    out.push(&AgentMessage::AgentWelcome {
        agent,
        server_time_ms: now_ms(),
    });
    // The writer drains the queue; the reader handles frames until the agent leaves. Each half
    // holds the stream only while it is polled (one thread: the two never contend).
    let (mut reader, mut w) = futures_lite::io::split(stream);
    let writer_out = out.clone();
    let writer_shard = shard.clone();
    let writer = glommio::spawn_local(async move {
        while let Some(batch) = writer_out.next_batch().await {
            if w.write_all(&batch).await.is_err() || w.flush().await.is_err() {
                // Nothing more reaches this agent: nobody may wait for its queue.
                writer_out.written();
                writer_out.close();
                writer_shard.borrow_mut().room_returned();
                return;
            }
            if writer_out.written() {
                writer_shard.borrow_mut().room_returned();
            }
        }
        // The agent is leaving: TLS close_notify, then the TCP FIN.
        let _ = w.close().await;
    })
    .detach();
    loop {
        let frame = read_frame(&mut reader, &mut dec, &mut buf).await;
        // Push-back: the frame read waits for room where it goes (and the socket is not
        // read meanwhile), so neither the mesh nor this agent's replies grow without bound.
        if let Ok(Some(m)) = &frame {
            wait_for_room(&shard, &out, frame_shard(m, nshards)).await;
            if out.closed.get() {
                break;
            }
        }
        match frame {
            Ok(Some(AgentMessage::Deploy { group, blob })) => {
                shard.borrow_mut().metrics.msgs_in += 1;
                agent_deploy(&shard, out.clone(), group, blob);
            }
            Ok(Some(m)) => {
                // Contained: a panic handling the frame closes this agent link only.
                let handled = {
                    let mut s = shard.borrow_mut();
                    s.metrics.msgs_in += 1;
                    let mut reply = None;
                    s.contained(Site::Agent, |s| reply = s.on_agent_frame(agent, m))
                        .then_some(reply)
                };
                match handled {
                    Some(Some(reply)) => {
                        out.push(&reply);
                    }
                    Some(None) => {}
                    None => {
                        out.push(&AgentMessage::Error {
                            code: ErrorCode::Internal,
                            message: Bytes::from_static(b"internal error handling that frame"),
                        });
                        glommio::timer::sleep(Duration::from_millis(50)).await;
                        break;
                    }
                }
                wake::wake_driver();
            }
            Ok(None) => break,
            Err(e) => {
                out.push(&AgentMessage::Error {
                    code: ErrorCode::MalformedFrame,
                    message: Bytes::from(e),
                });
                glommio::timer::sleep(Duration::from_millis(50)).await;
                break;
            }
        }
    }
    out.close();
    let _ = writer.await;
    let mut s = shard.borrow_mut();
    s.local_agents.remove(&agent);
    s.metrics.agents_attached -= 1;
    s.broadcast(|| ShardMsg::AgentDown { agent });
    // Devices and mesh messages waiting for this agent's queue go on.
    s.room_returned();
}

/// The shard an agent's frame goes to, if it goes to a device's home shard.
fn frame_shard(m: &AgentMessage, nshards: usize) -> Option<usize> {
    match m {
        AgentMessage::Send { device, .. } | AgentMessage::DeliverAck { device, .. } => {
            Some(home_shard(*device, nshards))
        }
        _ => None,
    }
}

/// Waits until the agent's own queue has room and, for a frame going to shard `to`, the
/// outbox towards it has room; each wait is counted once (`pushback_agent_reads`).
async fn wait_for_room(shard: &Rc<RefCell<Shard>>, out: &AgentOut, to: Option<usize>) {
    let mut counted = false;
    std::future::poll_fn(|cx| {
        let mut s = shard.borrow_mut();
        let id = s.id;
        let mesh_room = match to {
            Some(t) if t != id => s.mesh_out.has_room(t),
            _ => true,
        };
        if mesh_room && out.has_room() {
            return Poll::Ready(());
        }
        if !counted {
            counted = true;
            s.metrics.pushback_agent_reads += 1;
        }
        s.room_waiters.push(cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// Submits an agent's `Deploy` to the deployer thread and answers `DeployResult` when it is
/// done, without holding up the agent's other frames (a deploy is a few fsyncs away).
fn agent_deploy(shard: &Rc<RefCell<Shard>>, out: Rc<AgentOut>, group: Bytes, blob: Bytes) {
    let deployer = shard.borrow().ctx.deployer.clone();
    glommio::spawn_local(async move {
        let result = match std::str::from_utf8(&group) {
            Ok(g) => submit_deploy(&deployer, g.to_owned(), blob).await,
            Err(_) => Err("group name is not UTF-8".to_owned()),
        };
        let reply = match result {
            Ok(report) => AgentMessage::DeployResult {
                group,
                version: CodeVersion(report.version),
                digest: from_hex::<32>(report.digest.as_bytes())
                    .map(Digest)
                    .unwrap_or_default(),
                message: Bytes::from(report.summary()),
            },
            Err(e) => AgentMessage::DeployResult {
                group,
                version: CodeVersion(0),
                digest: Digest::default(),
                message: Bytes::from(e),
            },
        };
        out.push(&reply);
    })
    .detach();
}

async fn submit_deploy(
    deployer: &crossbeam::channel::Sender<DeployRequest>,
    group: String,
    blob: Bytes,
) -> Result<DeployReport, String> {
    let (reply, answer) = crossbeam::channel::bounded(1);
    deployer
        .try_send(DeployRequest { group, blob, reply })
        .map_err(|_| "the deployer is busy; try again".to_owned())?;
    let start = Instant::now();
    loop {
        match answer.try_recv() {
            Ok(r) => return r.map_err(|e| e.to_string()),
            Err(crossbeam::channel::TryRecvError::Disconnected) => {
                return Err("the deployer stopped".to_owned());
            }
            Err(crossbeam::channel::TryRecvError::Empty) if start.elapsed() > DEPLOY_TIMEOUT => {
                return Err(format!(
                    "the deployer did not answer within {DEPLOY_TIMEOUT:?}"
                ));
            }
            // Off the data path and rare: polling beats wiring a waker across threads.
            Err(crossbeam::channel::TryRecvError::Empty) => {
                glommio::timer::sleep(Duration::from_millis(5)).await
            }
        }
    }
}

/// An attached agent's presence being resynchronised: its queue (or the mesh) could not hold
/// every change, so it gets a marked snapshot instead of the changes it missed. Every shard is
/// asked for its home devices online; a shard's changes are discarded until its answer came
/// (they are older than it), and applied to the collected set after. Once every shard
/// answered and the agent's queue has room, the set goes out as `PresenceSnapshot` frames.
pub(crate) struct Resync {
    /// Per shard: its answer is still awaited.
    waiting: Vec<bool>,
    online: HashSet<DeviceId>,
}

impl Shard {
    /// A presence change for `agent`, if it is attached here: queued, or folded into (or
    /// starting) a resync when its queue has no room.
    pub(crate) fn presence_to_local(&mut self, agent: AgentId, device: DeviceId, online: bool) {
        let Some(out) = self.local_agents.get(&agent).cloned() else {
            return;
        };
        if let Some(r) = self.resyncs.get_mut(&agent) {
            let from = home_shard(device, self.nshards);
            if r.waiting[from] {
                // Older than the snapshot `from` will send.
                self.metrics.agent_overflow += 1;
            } else if online {
                r.online.insert(device);
            } else {
                r.online.remove(&device);
            }
            return;
        }
        let m = AgentMessage::Presence { device, online };
        if out.fits(m.frame_len()) && out.push(&m) {
            self.metrics.msgs_out += 1;
            return;
        }
        self.metrics.agent_overflow += 1;
        self.start_resync(agent);
    }

    fn start_resync(&mut self, agent: AgentId) {
        self.resyncs.insert(
            agent,
            Resync {
                waiting: vec![true; self.nshards],
                online: HashSet::new(),
            },
        );
        for to in 0..self.nshards {
            self.route(to, ShardMsg::PresenceResync { agent });
        }
    }

    /// Shard `from` withheld presence changes for `agent`: resync (just `from` if a resync
    /// already has its answer, since its changes after that answer are now missing).
    pub(crate) fn on_presence_gap(&mut self, agent: AgentId, from: usize) {
        if !self.local_agents.contains_key(&agent) {
            return;
        }
        let nshards = self.nshards;
        match self.resyncs.get_mut(&agent) {
            None => self.start_resync(agent),
            Some(r) if !r.waiting[from] => {
                r.waiting[from] = true;
                r.online.retain(|d| home_shard(*d, nshards) != from);
                self.route(from, ShardMsg::PresenceResync { agent });
            }
            Some(_) => {} // its answer is on the way, behind this marker
        }
    }

    /// Shard `from`'s home devices online, for `agent`'s resync.
    pub(crate) fn on_presence_snapshot(
        &mut self,
        agent: AgentId,
        from: usize,
        devices: Vec<DeviceId>,
    ) {
        let Some(r) = self.resyncs.get_mut(&agent) else {
            return; // the agent left
        };
        if !r.waiting[from] {
            return; // not asked for (cannot happen: one request per wait)
        }
        r.waiting[from] = false;
        r.online.extend(devices);
        self.emit_resync(agent);
    }

    /// Sends every finished resync whose agent's queue has room.
    pub(crate) fn emit_resyncs(&mut self) {
        let agents: Vec<AgentId> = self.resyncs.keys().copied().collect();
        for agent in agents {
            self.emit_resync(agent);
        }
    }

    /// Sends `agent`'s snapshot if every shard answered and its queue has room for it.
    fn emit_resync(&mut self, agent: AgentId) {
        let Some(r) = self.resyncs.get(&agent) else {
            return;
        };
        if r.waiting.iter().any(|w| *w) {
            return;
        }
        let Some(out) = self.local_agents.get(&agent).cloned() else {
            self.resyncs.remove(&agent);
            return;
        };
        let mut ids: Vec<DeviceId> = r.online.iter().copied().collect();
        ids.sort_unstable_by_key(|d| d.0);
        let frames = AgentMessage::presence_snapshot(&ids);
        if !out.fits(frames.iter().map(AgentMessage::frame_len).sum()) {
            return; // retried when the writer made room
        }
        for f in &frames {
            out.push(f);
        }
        self.resyncs.remove(&agent);
        self.metrics.msgs_out += frames.len() as u64;
        self.metrics.presence_snapshots += 1;
    }
}

impl Shard {
    /// Sends a message to every shard, this one included.
    pub(crate) fn broadcast(&mut self, make: impl Fn() -> ShardMsg) {
        for to in 0..self.nshards {
            self.route(to, make());
        }
    }

    /// Handles one frame from an attached agent; returns an immediate reply, if any.
    fn on_agent_frame(&mut self, agent: AgentId, m: AgentMessage) -> Option<AgentMessage> {
        match m {
            AgentMessage::Send {
                device,
                tag,
                topic,
                payload,
            } => {
                contain::inject(Site::Agent, Some(device));
                let home = home_shard(device, self.nshards);
                self.route(
                    home,
                    ShardMsg::ToDevice {
                        device,
                        agent,
                        tag,
                        topic,
                        payload,
                    },
                );
                None
            }
            AgentMessage::DeliverAck { device, seq } => {
                let home = home_shard(device, self.nshards);
                self.route(home, ShardMsg::DeliverAck { device, seq });
                None
            }
            AgentMessage::Ping { id } => Some(AgentMessage::Pong { id }),
            other => Some(AgentMessage::Error {
                code: ErrorCode::ProtocolViolation,
                message: Bytes::from(format!("{} is not an agent-to-server message", other.ty())),
            }),
        }
    }
}
