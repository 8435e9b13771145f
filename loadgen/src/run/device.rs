//! A simulated device: the protocol crate's [`DeviceSession`] over rustls over a glommio socket
//! bound to one of the campaign's source addresses.
//!
//! Shape (for this first version): **one task per device**. Reads go through the shard's scratch
//! buffers, lent for one poll only, so an idle device holds its session, its rustls
//! `ClientConnection`, its socket and its task — no buffer of its own. The one-driver-per-shard
//! shape of DESIGN.md (a slab and index wakers) is the next step; nothing in the session logic
//! depends on which one runs it.

use std::future::Future;
use std::io::{self, Write as _};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::future;
use glommio::net::TcpStream;
use rustls::{ClientConnection, HandshakeKind};
use tether_protocol::device::{DeviceConfig, DeviceEvent, DeviceSession};
use tether_protocol::message::GoodbyeReason;
use tether_protocol::{AuthError, CloseReason};

use super::net::{self, flush_tls, kind_of, poll_read_tls, sleep_until, until};
use super::shard::ShardCtx;
use super::stamp::{self, Kind};
use crate::stats::{Metric, OpenLoopSchedule};

/// Topic of every loadgen message.
pub const TOPIC: &[u8] = b"lg";
/// Wait after a failed connect before the next attempt (unless the server said otherwise).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How one connection ended.
enum Outcome {
    /// The run is over (or aborted): do not reconnect.
    End,
    /// Dropped by a storm: reconnect at once.
    Dropped,
    /// Failed or closed by the server: reconnect after this.
    Retry(Duration),
}

enum Wake {
    Read(io::Result<usize>),
    Timer,
    Stop,
}

struct Device {
    ctx: Rc<ShardCtx>,
    slot: usize,
    index: usize,
    session: DeviceSession,
    /// Device→agent and echo timetables, started at the first `Welcome`, kept across reconnects.
    d2a: OpenLoopSchedule,
    rt: OpenLoopSchedule,
    started: bool,
    /// Our own heartbeat (the session's would fire at the same interval; ours is timed).
    next_ping: Option<Instant>,
    pending_ping: Option<(u64, Instant)>,
    heartbeat: Duration,
    /// Storms that drop this device, by campaign index, with their instant; `next_storm` is the
    /// first not yet passed.
    storms: Vec<(usize, Instant)>,
    next_storm: usize,
    /// The storm this device is recovering from.
    recovering: Option<(usize, Instant)>,
    hello_at: Option<Instant>,
    established: bool,
    /// Whether the current connection's TLS handshake resumed a session.
    resumed: bool,
    ever_connected: bool,
    retry_after: Option<Duration>,
}

/// A stable pseudo-random number in [0, 1) for (device, salt): spreads phases and picks storm
/// victims deterministically.
fn unit(index: usize, salt: u64) -> f64 {
    let mut x = (index as u64) ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs device `index` (shard-local `slot`) from its ramp slot to the end of the run.
pub async fn run(ctx: Rc<ShardCtx>, slot: usize, index: usize) {
    let sh = ctx.shared.clone();
    let tl = sh.timeline;
    let c = &sh.campaign;
    let first = tl.ramp_slot(index);
    if stopped(&ctx, slot, sleep_until(first)).await {
        return;
    }
    let ident = &sh.devices[index];
    let mut cfg = DeviceConfig::new(ident.id, ident.key.clone());
    cfg.welcome_timeout = Duration::from_millis(c.limits.connect_timeout_ms);
    let storms = c
        .storm
        .iter()
        .enumerate()
        .filter(|(k, s)| unit(index, 1000 + *k as u64) * 100.0 < s.drop_percent)
        .map(|(k, s)| (k, tl.at(s.at_s)))
        .collect();
    let m = &c.messages;
    let mut dev = Device {
        session: DeviceSession::new(cfg, Instant::now()),
        d2a: OpenLoopSchedule::new(0.0, first),
        rt: OpenLoopSchedule::new(0.0, first),
        started: false,
        next_ping: None,
        pending_ping: None,
        heartbeat: Duration::from_secs(u64::from(c.heartbeat_s)),
        storms,
        next_storm: 0,
        recovering: None,
        hello_at: None,
        established: false,
        resumed: false,
        ever_connected: false,
        retry_after: None,
        ctx: ctx.clone(),
        slot,
        index,
    };
    let (d2a_rate, rt_rate) = (m.device_to_agent_per_sec, m.round_trip_per_sec);
    let mut attempt = first;
    // Bounded: every attempt either ends the loop or waits (≥ RETRY_AFTER, or a storm instant,
    // of which there are finitely many) and the loop ends at `sends_end`.
    loop {
        if Instant::now() >= tl.sends_end || ctx.stop.fired() {
            break;
        }
        if !dev.started {
            // Timetables start at the first attempt, phase-spread, so the schedule is fixed
            // regardless of how long the connect takes.
            dev.d2a = OpenLoopSchedule::with_phase(d2a_rate, attempt, unit(index, 1));
            dev.rt = OpenLoopSchedule::with_phase(rt_rate, attempt, unit(index, 2));
            dev.started = true;
        }
        match dev.connection(attempt).await {
            Outcome::End => break,
            Outcome::Dropped => attempt = Instant::now(),
            Outcome::Retry(after) => {
                attempt = Instant::now() + after;
                if stopped(&ctx, slot, sleep_until(attempt.min(tl.sends_end))).await {
                    break;
                }
            }
        }
    }
    sh.online[index].store(false, Ordering::Relaxed);
}

/// Waits for `fut` or the shard's stop; true if stopped.
async fn stopped(ctx: &ShardCtx, slot: usize, fut: impl Future<Output = ()>) -> bool {
    future::or(
        async {
            fut.await;
            false
        },
        async {
            ctx.stop.wait(slot).await;
            true
        },
    )
    .await
}

impl Device {
    /// One connection: TCP, TLS, Hello/Welcome, then traffic until it ends.
    async fn connection(&mut self, scheduled: Instant) -> Outcome {
        let ctx = self.ctx.clone();
        let sh = &ctx.shared;
        let timeout = Duration::from_millis(sh.campaign.limits.connect_timeout_ms);
        let deadline = scheduled.max(Instant::now()) + timeout;
        let source = (!sh.sources.is_empty()).then(|| sh.sources[self.index % sh.sources.len()]);
        let stream = match until(deadline, net::connect_from(source, sh.server)).await {
            None => {
                ctx.error("connect_timeout");
                return Outcome::Retry(RETRY_AFTER);
            }
            Some(Err(e)) => {
                ctx.error(&kind_of(&e, "connect"));
                return Outcome::Retry(RETRY_AFTER);
            }
            Some(Ok(s)) => s,
        };
        let connected = Instant::now();
        ctx.stats
            .borrow_mut()
            .hist
            .record_since(Metric::Connect, scheduled, connected);
        let mut tls = match ClientConnection::new(sh.tls.clone(), sh.server_name.clone()) {
            Ok(t) => t,
            Err(_) => {
                ctx.error("tls_config");
                return Outcome::Retry(RETRY_AFTER);
            }
        };
        let mut stream = stream;
        self.session.connect(connected);
        self.hello_at = None;
        self.retry_after = None;
        match until(deadline, self.handshake(&mut stream, &mut tls)).await {
            None => {
                ctx.error("tls_timeout");
                self.session.connection_lost(CloseReason::HandshakeTimeout);
                self.drain_events();
                return Outcome::Retry(RETRY_AFTER);
            }
            Some(Err(e)) => {
                ctx.error(&kind_of(&e, "tls"));
                self.session
                    .connection_lost(CloseReason::Local(GoodbyeReason::Normal));
                self.drain_events();
                return Outcome::Retry(RETRY_AFTER);
            }
            Some(Ok(())) => {}
        }
        ctx.stats
            .borrow_mut()
            .hist
            .record_since(Metric::TlsHandshake, connected, Instant::now());
        self.resumed = tls.handshake_kind() == Some(HandshakeKind::Resumed);
        self.drive(&mut stream, &mut tls).await
    }

    async fn handshake(
        &mut self,
        stream: &mut TcpStream,
        tls: &mut ClientConnection,
    ) -> io::Result<()> {
        let ctx = self.ctx.clone();
        // Bounded by the caller's deadline.
        loop {
            flush_tls(stream, tls, &ctx.scratch).await?;
            if !tls.is_handshaking() {
                return Ok(());
            }
            let session = &mut self.session;
            let n = future::poll_fn(|cx| {
                poll_read_tls(cx, stream, tls, &ctx.scratch, |p| {
                    session.handle_bytes(Instant::now(), p)
                })
            })
            .await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Runs an established TLS connection until it ends.
    async fn drive(&mut self, stream: &mut TcpStream, tls: &mut ClientConnection) -> Outcome {
        let ctx = self.ctx.clone();
        let tl = ctx.shared.timeline;
        // Bounded: each turn waits for input, a deadline or the stop, and the run ends at `end`.
        loop {
            let now = Instant::now();
            self.drain_events();
            if let Err(e) = self.transmit(stream, tls, now).await {
                ctx.error(&kind_of(&e, "write"));
                return self.lost();
            }
            if self.session.is_disconnected() {
                // The session closed (server goodbye, error, timeout): the reason is counted.
                return Outcome::Retry(self.retry_after.take().unwrap_or(RETRY_AFTER));
            }
            let wake_at = [
                self.session.poll_timeout(),
                self.next_send(),
                self.next_ping,
                self.storms.get(self.next_storm).map(|s| s.1),
                Some(tl.end),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(tl.end);
            let session = &mut self.session;
            let scratch = &ctx.scratch;
            let read = future::poll_fn(|cx| {
                poll_read_tls(cx, stream, tls, scratch, |p| {
                    session.handle_bytes(Instant::now(), p)
                })
            });
            let wake = future::or(
                future::or(async { Wake::Read(read.await) }, async {
                    sleep_until(wake_at).await;
                    Wake::Timer
                }),
                async {
                    ctx.stop.wait(self.slot).await;
                    Wake::Stop
                },
            )
            .await;
            let now = Instant::now();
            match wake {
                Wake::Read(Ok(0)) => {
                    ctx.error("read_eof");
                    return self.lost();
                }
                Wake::Read(Ok(_)) => {}
                Wake::Read(Err(e)) => {
                    ctx.error(&kind_of(&e, "read"));
                    return self.lost();
                }
                Wake::Timer => {
                    if now >= tl.end {
                        return self.finish(stream, tls).await;
                    }
                    if let Some(&(k, at)) = self.storms.get(self.next_storm) {
                        if now >= at {
                            self.next_storm += 1;
                            if self.established {
                                self.recovering = Some((k, at));
                                ctx.storms.borrow_mut()[k].dropped += 1;
                                // Abrupt: no Goodbye, the socket just closes (dropped below).
                                self.session
                                    .connection_lost(CloseReason::Local(GoodbyeReason::Normal));
                                self.drain_events();
                                return Outcome::Dropped;
                            }
                        }
                    }
                    self.session.handle_timeout(now);
                    self.sends(now);
                    if self.next_ping.is_some_and(|t| now >= t) {
                        self.ping(now);
                    }
                }
                Wake::Stop => return self.finish(stream, tls).await,
            }
        }
    }

    /// The transport broke under the session.
    fn lost(&mut self) -> Outcome {
        self.session
            .connection_lost(CloseReason::Local(GoodbyeReason::Normal));
        self.drain_events();
        Outcome::Retry(RETRY_AFTER)
    }

    /// Ends the run for this device: Goodbye, TLS close_notify, flush.
    async fn finish(&mut self, stream: &mut TcpStream, tls: &mut ClientConnection) -> Outcome {
        self.session.close();
        self.drain_events();
        let _ = self.transmit(stream, tls, Instant::now()).await;
        tls.send_close_notify();
        let _ = until(
            Instant::now() + Duration::from_secs(1),
            flush_tls(stream, tls, &self.ctx.scratch),
        )
        .await;
        Outcome::End
    }

    fn next_send(&self) -> Option<Instant> {
        if !self.started {
            return None;
        }
        let end = self.ctx.shared.timeline.sends_end;
        [self.d2a.peek(), self.rt.peek()]
            .into_iter()
            .flatten()
            .filter(|t| *t < end)
            .min()
    }

    /// Makes every send that is due: late ones keep their scheduled time.
    fn sends(&mut self, now: Instant) {
        let tl = self.ctx.shared.timeline;
        let len = self.ctx.shared.campaign.messages.payload_bytes as usize;
        let now_capped = now.min(tl.sends_end);
        for kind in [Kind::DeviceToAgent, Kind::RoundTripOut] {
            // Bounded by the timetable up to `now` (a few per wake-up unless the shard stalled).
            loop {
                let sched = match kind {
                    Kind::DeviceToAgent => &mut self.d2a,
                    _ => &mut self.rt,
                };
                let Some(at) = sched.due(now_capped) else {
                    break;
                };
                if at >= tl.sends_end {
                    break;
                }
                let payload = stamp::payload(kind, tl.epoch.micros(at), len);
                match self.session.send(now, Bytes::from_static(TOPIC), payload) {
                    Ok(_) => self.ctx.stats.borrow_mut().counters.msgs_sent += 1,
                    Err(e) => self.ctx.error(match e {
                        tether_protocol::SendError::OutboxFull { .. } => "device_outbox_full",
                        tether_protocol::SendError::TooLarge { .. } => "device_message_too_large",
                        _ => "device_send_closed",
                    }),
                }
            }
        }
    }

    fn ping(&mut self, now: Instant) {
        let Some(due) = self.next_ping else { return };
        self.next_ping = Some(due.max(now - self.heartbeat) + self.heartbeat);
        if let Some(id) = self.session.ping(now) {
            self.pending_ping = Some((id, due));
        }
    }

    /// Moves what the session has to send through rustls to the socket.
    async fn transmit(
        &mut self,
        stream: &mut TcpStream,
        tls: &mut ClientConnection,
        now: Instant,
    ) -> io::Result<()> {
        let mut out = BytesMut::new();
        if self.session.poll_transmit(&mut out) {
            if !self.established && self.hello_at.is_none() {
                self.hello_at = Some(now);
            }
            tls.writer().write_all(&out)?;
        }
        drop(out);
        flush_tls(stream, tls, &self.ctx.scratch).await
    }

    fn drain_events(&mut self) {
        let ctx = self.ctx.clone();
        let sh = &ctx.shared;
        let now = Instant::now();
        while let Some(ev) = self.session.poll_event() {
            match ev {
                DeviceEvent::Connected { heartbeat, .. } => {
                    let mut st = ctx.stats.borrow_mut();
                    if let Some(h) = self.hello_at {
                        st.hist.record_since(Metric::Hello, h, now);
                    }
                    st.counters.connected();
                    self.established = true;
                    if self.resumed {
                        ctx.resumed.set(ctx.resumed.get() + 1);
                    }
                    if !self.ever_connected {
                        self.ever_connected = true;
                        let (n, last) = ctx.first_connects.get();
                        let us = sh.timeline.epoch.micros(now);
                        ctx.first_connects.set((n + 1, last.max(us)));
                    }
                    sh.online[self.index].store(true, Ordering::Relaxed);
                    self.heartbeat = heartbeat;
                    self.next_ping = Some(now + heartbeat);
                    if let Some((k, at)) = self.recovering.take() {
                        let mut storms = ctx.storms.borrow_mut();
                        let t = &mut storms[k];
                        t.reconnected += 1;
                        t.resumed += u64::from(self.resumed);
                        t.last_reconnect_us = t
                            .last_reconnect_us
                            .max(crate::stats::micros_between(at, now));
                    }
                }
                DeviceEvent::Message { payload, .. } => {
                    let mut st = ctx.stats.borrow_mut();
                    st.counters.msgs_recv += 1;
                    match stamp::read(&payload) {
                        Some((Kind::AgentToDevice, us)) => st.hist.record_since(
                            Metric::AgentToDevice,
                            sh.timeline.epoch.instant(us),
                            now,
                        ),
                        Some((Kind::RoundTripBack, us)) => st.hist.record_since(
                            Metric::RoundTrip,
                            sh.timeline.epoch.instant(us),
                            now,
                        ),
                        _ => {
                            drop(st);
                            ctx.error("device_unexpected_payload");
                        }
                    }
                }
                DeviceEvent::Pong { id } => {
                    if let Some((pid, at)) = self.pending_ping.filter(|p| p.0 == id) {
                        let _ = pid;
                        self.pending_ping = None;
                        ctx.stats
                            .borrow_mut()
                            .hist
                            .record_since(Metric::Heartbeat, at, now);
                    }
                }
                DeviceEvent::Goodbye { retry_after, .. } => {
                    self.retry_after = Some(retry_after.max(Duration::from_millis(10)));
                }
                DeviceEvent::Closed(reason) => {
                    if self.established {
                        self.established = false;
                        ctx.stats.borrow_mut().counters.disconnected();
                        sh.online[self.index].store(false, Ordering::Relaxed);
                    }
                    self.pending_ping = None;
                    self.next_ping = None;
                    if let Some(kind) = close_kind(&reason) {
                        ctx.error(kind);
                    }
                }
                DeviceEvent::Acked { .. }
                | DeviceEvent::CodeOffer { .. }
                | DeviceEvent::CodeChunk { .. } => {}
            }
        }
    }
}

/// The error kind of a session close, `None` for closes this side made.
fn close_kind(r: &CloseReason) -> Option<&'static str> {
    use tether_protocol::message::ErrorCode as E;
    Some(match r {
        CloseReason::Local(_) => return None,
        CloseReason::PeerMisbehaved(_) => "device_protocol_error",
        CloseReason::Auth(AuthError::UnknownDevice) => "auth_unknown_device",
        CloseReason::Auth(_) => "auth_failed",
        CloseReason::HandshakeTimeout => "welcome_timeout",
        CloseReason::IdleTimeout => "idle_timeout",
        CloseReason::PeerGoodbye(GoodbyeReason::Shutdown) => "goodbye_shutdown",
        CloseReason::PeerGoodbye(GoodbyeReason::Overloaded) => "goodbye_overloaded",
        CloseReason::PeerGoodbye(GoodbyeReason::Replaced) => "goodbye_replaced",
        CloseReason::PeerGoodbye(_) => "goodbye_other",
        CloseReason::PeerError(E::UnknownDevice) => "server_error_unknown_device",
        CloseReason::PeerError(E::BadProof) => "server_error_bad_proof",
        CloseReason::PeerError(E::Timeout) => "server_error_timeout",
        CloseReason::PeerError(_) => "server_error_other",
        _ => "device_closed_other",
    })
}

#[cfg(test)]
mod tests {
    use super::unit;

    #[test]
    fn unit_is_spread_and_stable() {
        let n = 10_000;
        let below = (0..n).filter(|i| unit(*i, 7) < 0.2).count();
        assert!((1_800..2_200).contains(&below), "{below}");
        assert_eq!(unit(42, 3), unit(42, 3));
        assert!((0..n).all(|i| (0.0..1.0).contains(&unit(i, 9))));
    }
}
