//! A simulated device: the protocol crate's [`DeviceSession`] over a [`DeviceTls`] over a
//! non-blocking socket bound to one of the campaign's source addresses — an explicit state
//! machine, not a task. The shard's driver ([`super::driver`]) owns every device in a table
//! and runs one when the readiness ring says its socket is ready or the timing wheel says one
//! of its deadlines came; it lends the shard's buffers ([`Lent`]) for that step only, so a
//! device at rest holds its session, its TLS state and its socket, and no buffer.
//!
//! Phases: [`Phase::Waiting`] for the ramp slot → [`Phase::Connecting`] (non-blocking connect,
//! completion by a `POLLOUT` poll on the ring) → [`Phase::Handshaking`] (TLS) →
//! [`Phase::Established`] (Hello/Welcome, then traffic) → back to [`Phase::Backoff`] after a
//! failure or a storm drop, and [`Phase::Done`] at the end of the run.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustls::client::Tls13ClientSessionValue;
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use tether_net::ring::{self, Completion, Kind as RingKind, Ring, ring_generation};
use tether_net::timer::{TimerId, TimerWheel};
use tether_protocol::code::{CodeReceiver, CodeUpdate, ReceiverConfig};
use tether_protocol::device::{DeviceConfig, DeviceEvent, DeviceSession};
use tether_protocol::message::GoodbyeReason;
use tether_protocol::{AuthError, CloseReason};

use super::net::kind_of;
use super::shard::{ShardCtx, Shared, each_window};
use super::stamp::{self, Kind};
use super::tls::DeviceTls;
use crate::campaign::TlsState;
use crate::stats::{Metric, OpenLoopSchedule};

/// Topic of every loadgen message.
pub const TOPIC: &[u8] = b"lg";
/// Wait after a failed connect before the next attempt (unless the server said otherwise).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Most reads one step takes before giving other devices a turn.
const READS_PER_STEP: usize = 16;

/// What the shard lends a device for one step.
pub(super) struct Lent<'a> {
    pub ctx: &'a ShardCtx,
    pub ring: &'a mut Ring,
    pub wheel: &'a mut TimerWheel<u32>,
    /// This device's slot in the shard's table (ring and wheel key).
    pub slot: u32,
    /// Ciphertext read from the socket.
    pub rx: &'a mut [u8],
    /// Plaintext out of TLS.
    pub plain: &'a mut [u8],
    /// Frames out of the session.
    pub frames: &'a mut BytesMut,
    /// Ciphertext on its way to the socket.
    pub tx: &'a mut Vec<u8>,
    /// Slots whose socket may hold more input (the read budget ran out).
    pub again: &'a mut Vec<u32>,
    /// Devices that reached [`Phase::Done`].
    pub done: &'a mut usize,
}

/// A socket with TLS on it.
pub(super) struct Link {
    fd: OwnedFd,
    tls: DeviceTls,
    /// Ciphertext the socket did not take yet; `None` at rest (boxed: 8 bytes, not 24).
    #[allow(clippy::box_collection)]
    out: Option<Box<Vec<u8>>>,
    /// A write-readiness watch is armed on the ring.
    writing: bool,
}

/// Where a device is in its life; each phase holds what it waits with.
pub(super) enum Phase {
    /// Before its ramp slot (`Device::attempt`); nothing open.
    Waiting,
    /// After a failed or lost connection, until `Device::attempt`.
    Backoff,
    /// TCP connect in flight; a one-shot `POLLOUT` watch says when it is done.
    Connecting { fd: OwnedFd, deadline: Instant },
    /// TCP up (at `Device::since`), TLS handshake in flight.
    Handshaking { link: Link, deadline: Instant },
    /// TLS up: Hello/Welcome, then traffic until the run ends, a storm, or a failure.
    Established { link: Link },
    /// The run is over for this device.
    Done,
}

/// What a device times besides its stages (the two never overlap: a device pings only once
/// established).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timing {
    Idle,
    /// The ping in flight (its id's low 32 bits: ids count up from 1 per connection) and when
    /// it was due.
    Ping {
        id: u32,
        due: Instant,
    },
    /// An admission in progress since its first attempt's scheduled start, through failed
    /// attempts and retries, until `Welcome` (`session_ready`).
    Admission {
        from: Instant,
    },
}

/// One simulated device.
pub(super) struct Device {
    phase: Phase,
    session: DeviceSession,
    /// Sends taken from the device→agent and echo timetables ([`Device::timetable`]: they
    /// start at the ramp slot and are kept across reconnects).
    sent: [u32; 2],
    /// Where the latency being timed starts, one stage after the other: the connect attempt's
    /// scheduled time (also when a waiting device connects), then TCP up (until the TLS
    /// handshake is done), then `Hello` sent (until `Welcome`, if `hello_sent`).
    since: Instant,
    /// Our own heartbeat (the session's would fire at the same interval; ours is timed).
    next_ping: Option<Instant>,
    /// The ping in flight, or the admission being timed (`session_ready`).
    timing: Timing,
    /// What the server's Goodbye asked for, in milliseconds (at least 10); 0: nothing.
    retry_after_ms: u32,
    /// The deadline the wheel holds for this device.
    armed: Option<(Instant, TimerId)>,
    /// Index of this device in the process (identity, phases, storm victims).
    index: u32,
    /// Generation of the current connection, tagging its ring operations.
    generation: u32,
    /// First campaign storm not yet passed (storms are per campaign; victims are computed).
    next_storm: u8,
    /// The storm this device is recovering from.
    recovering: Option<u8>,
    established: bool,
    hello_sent: bool,
    ever_connected: bool,
    /// Whether the current connection's TLS handshake resumed a session.
    resumed: bool,
    /// Code transfers, created on the first `CodeOffer` (idle devices hold nothing).
    code: Option<Box<CodeReceiver>>,
    /// Code versions installed so far (the n-th counts for the campaign's n-th deploy).
    installs: u8,
    /// The server node it connects to (an index into the targets); [`NO_TARGET`]: draw one at
    /// the next connect (`pick = "random"`).
    target: u16,
    /// The TLS session ticket to resume with (lent to rustls for each step, see
    /// [`super::tls::DeviceTickets`]).
    pub ticket: Option<Box<Tls13ClientSessionValue>>,
}

/// The target a `Goodbye{redirect}` names: its text `ip:port` must be one of `targets`.
fn redirect_target(to: &[u8], targets: &[std::net::SocketAddr]) -> Option<usize> {
    let to = std::str::from_utf8(to)
        .ok()
        .and_then(|t| t.trim().parse::<std::net::SocketAddr>().ok())?;
    targets.iter().position(|t| *t == to)
}

/// No target chosen yet.
const NO_TARGET: u16 = u16::MAX;

/// A stable pseudo-random number in [0, 1) for (device, salt): spreads phases and picks storm
/// victims deterministically.
fn unit(index: usize, salt: u64) -> f64 {
    let mut x = (index as u64) ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

impl Device {
    /// Device `index` of the process, waiting for its ramp slot.
    pub fn new(ctx: &ShardCtx, index: usize) -> Device {
        let sh = &ctx.shared;
        let c = &sh.campaign;
        let first = sh.timeline.ramp_slot(sh.global(index));
        let ident = &sh.devices[index];
        let mut cfg = DeviceConfig::new(ident.id, ident.key.clone());
        cfg.welcome_timeout = Duration::from_millis(c.limits.connect_timeout_ms);
        Device {
            phase: Phase::Waiting,
            session: DeviceSession::new(cfg, first),
            sent: [0; 2],
            since: first,
            next_ping: None,
            timing: Timing::Idle,
            retry_after_ms: 0,
            armed: None,
            index: index as u32,
            generation: 0,
            next_storm: 0,
            recovering: None,
            established: false,
            hello_sent: false,
            ever_connected: false,
            resumed: false,
            code: None,
            installs: 0,
            target: sh
                .home_target(index)
                .and_then(|t| u16::try_from(t).ok())
                .unwrap_or(NO_TARGET),
            ticket: None,
        }
    }

    /// The generation ring completions for this device must carry.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Whether the run is over for this device.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Puts the first deadline (the ramp slot) on the wheel.
    pub fn start(&mut self, l: &mut Lent<'_>) {
        self.arm(l);
    }

    /// The wheel fired for this device.
    pub fn on_timer(&mut self, now: Instant, l: &mut Lent<'_>) {
        self.armed = None;
        let tl = l.ctx.shared.timeline;
        match &self.phase {
            Phase::Waiting | Phase::Backoff => {
                if now >= tl.sends_end {
                    self.done(l);
                    return;
                }
                if now >= self.since {
                    self.connect(now, l);
                }
            }
            Phase::Connecting { .. } | Phase::Handshaking { .. } if now >= tl.end => {
                self.close(l);
                self.done(l);
                return;
            }
            Phase::Connecting { deadline, .. } if now >= *deadline => {
                l.ctx.error("connect_timeout");
                self.close(l);
                self.backoff(now, RETRY_AFTER);
            }
            Phase::Handshaking { deadline, .. } if now >= *deadline => {
                l.ctx.error("tls_timeout");
                self.session.connection_lost(CloseReason::HandshakeTimeout);
                self.drain_events(now, l);
                self.close(l);
                self.backoff(now, RETRY_AFTER);
            }
            Phase::Established { .. } => {
                if now >= tl.end {
                    self.finish(now, l);
                    return;
                }
                if let Some((k, at)) = self.storm(l.ctx) {
                    if now >= at {
                        self.next_storm = k as u8 + 1;
                        if self.established {
                            self.recovering = Some(k as u8);
                            l.ctx.storms.borrow_mut()[k].dropped += 1;
                            // Abrupt: no Goodbye, the socket just closes.
                            self.session
                                .connection_lost(CloseReason::Local(GoodbyeReason::Normal));
                            self.drain_events(now, l);
                            self.close(l);
                            self.backoff(now, Duration::ZERO);
                            self.arm(l);
                            return;
                        }
                    }
                }
                self.session.handle_timeout(now);
                self.sends(now, l.ctx);
                if self.next_ping.is_some_and(|t| now >= t) {
                    self.ping(now);
                }
            }
            _ => {}
        }
        self.settle(now, l);
    }

    /// The readiness ring reported on this device's socket (the generation is checked).
    pub fn on_ready(&mut self, c: Completion, now: Instant, l: &mut Lent<'_>) {
        match (c.kind, &mut self.phase) {
            (RingKind::Write, Phase::Connecting { .. }) => self.connected(c.result, now, l),
            (RingKind::Write, Phase::Handshaking { link, .. } | Phase::Established { link }) => {
                link.writing = false
            }
            (RingKind::Read, Phase::Handshaking { link, .. } | Phase::Established { link }) => {
                if !c.more && c.result != -libc::ECANCELED {
                    // The multishot poll ended (overflow or error): re-arm it.
                    l.ring
                        .watch_read(link.fd.as_raw_fd(), l.slot as usize, self.generation);
                }
                self.read(now, l);
            }
            _ => return,
        }
        self.settle(now, l);
    }

    /// Reads again after the read budget ran out.
    pub fn on_again(&mut self, now: Instant, l: &mut Lent<'_>) {
        if matches!(
            self.phase,
            Phase::Handshaking { .. } | Phase::Established { .. }
        ) {
            self.read(now, l);
            self.settle(now, l);
        }
    }

    /// The shard stops early (abort): close whatever is open.
    pub fn stop(&mut self, now: Instant, l: &mut Lent<'_>) {
        match self.phase {
            Phase::Done => {}
            Phase::Established { .. } => self.finish(now, l),
            _ => {
                self.close(l);
                self.done(l);
            }
        }
    }

    /// Starts a non-blocking connect from the device's source address.
    fn connect(&mut self, now: Instant, l: &mut Lent<'_>) {
        if !matches!(self.timing, Timing::Admission { .. }) {
            // The first attempt of an admission: `since` is its scheduled start.
            self.timing = Timing::Admission { from: self.since };
        }
        let sh = &l.ctx.shared;
        let timeout = Duration::from_millis(sh.campaign.limits.connect_timeout_ms);
        let deadline = self.since.max(now) + timeout;
        let source =
            (!sh.sources.is_empty()).then(|| sh.sources[self.index as usize % sh.sources.len()]);
        if self.target == NO_TARGET {
            // `random`: a fresh draw per connect attempt, as a DNS answer would give.
            let draw = unit(
                sh.global(self.index as usize),
                5000 + u64::from(self.generation),
            );
            self.target = (draw * sh.targets.len() as f64) as u16;
        }
        let server = sh.targets[usize::from(self.target) % sh.targets.len()];
        if sh.pick == crate::campaign::Pick::Random {
            self.target = NO_TARGET;
        }
        let socket = (|| {
            let s = Socket::new(
                Domain::for_address(server),
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )?;
            s.set_tcp_nodelay(true)?;
            if let Some(ip) = source {
                s.bind(&SockAddr::from(std::net::SocketAddr::from((ip, 0))))?;
            }
            match s.connect(&SockAddr::from(server)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            io::Result::Ok(s)
        })();
        match socket {
            Ok(s) => {
                let fd = OwnedFd::from(s);
                self.generation = ring_generation(self.generation.wrapping_add(1));
                l.ring
                    .watch_write(fd.as_raw_fd(), l.slot as usize, self.generation);
                self.phase = Phase::Connecting { fd, deadline };
            }
            Err(e) => {
                l.ctx.error(&kind_of(&e, "connect"));
                self.backoff(now, RETRY_AFTER);
            }
        }
    }

    /// The connecting socket became writable: connected, or failed.
    fn connected(&mut self, result: i32, now: Instant, l: &mut Lent<'_>) {
        let Phase::Connecting { fd, deadline } = std::mem::replace(&mut self.phase, Phase::Backoff)
        else {
            return;
        };
        let failure = match SockRef::from(&fd).take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) if result < 0 => Some(io::Error::from_raw_os_error(-result)),
            Ok(None) => None,
        };
        if let Some(e) = failure {
            l.ctx.error(&kind_of(&e, "connect"));
            self.phase = Phase::Connecting { fd, deadline };
            self.close(l);
            self.backoff(now, RETRY_AFTER);
            return;
        }
        let sh = &l.ctx.shared;
        l.ctx
            .stats
            .borrow_mut()
            .hist
            .record_since(Metric::Connect, self.since, now);
        let tls = match sh.campaign.tls_state {
            TlsState::Buffered => {
                DeviceTls::buffered(sh.tls.clone(), sh.server_name.clone()).map_err(|_| ())
            }
            TlsState::Detached => {
                DeviceTls::detached(sh.tls.clone(), sh.server_name.clone(), sh.campaign.resume)
                    .map_err(|_| ())
            }
        };
        let tls = match tls {
            Ok(t) => t,
            Err(()) => {
                l.ctx.error("tls_config");
                self.phase = Phase::Connecting { fd, deadline };
                self.close(l);
                self.backoff(now, RETRY_AFTER);
                return;
            }
        };
        self.session.connect(now);
        self.since = now;
        self.hello_sent = false;
        self.retry_after_ms = 0;
        l.ring
            .watch_read(fd.as_raw_fd(), l.slot as usize, self.generation);
        self.phase = Phase::Handshaking {
            link: Link {
                fd,
                tls,
                out: None,
                writing: false,
            },
            deadline,
        };
    }

    /// Reads what the socket has, through TLS into the session, via the shard's buffers.
    fn read(&mut self, now: Instant, l: &mut Lent<'_>) {
        for _ in 0..READS_PER_STEP {
            let (link, handshaking) = match &mut self.phase {
                Phase::Handshaking { link, .. } => (link, true),
                Phase::Established { link } => (link, false),
                _ => return,
            };
            let stage = if handshaking { "tls" } else { "read" };
            let n = match ring::recv(link.fd.as_raw_fd(), l.rx) {
                Ok(0) => {
                    self.eof(now, stage, l);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail(now, &kind_of(&e, stage), l);
                    return;
                }
            };
            let session = &mut self.session;
            let opened = link
                .tls
                .read(&mut l.rx[..n], l.plain, |p| session.handle_bytes(now, p));
            match opened {
                Err(e) => {
                    self.fail(now, &kind_of(&e, stage), l);
                    return;
                }
                Ok(o) if o.peer_closed => {
                    self.eof(now, stage, l);
                    return;
                }
                Ok(_) => {}
            }
            if handshaking && !link.tls.is_handshaking() {
                self.handshake_done(now, l);
            }
            if n < l.rx.len() {
                // A short read drained the socket; new data raises a new ring completion.
                return;
            }
        }
        l.again.push(l.slot);
    }

    fn handshake_done(&mut self, now: Instant, l: &mut Lent<'_>) {
        if let Phase::Handshaking { link, .. } = std::mem::replace(&mut self.phase, Phase::Done) {
            l.ctx
                .stats
                .borrow_mut()
                .hist
                .record_since(Metric::TlsHandshake, self.since, now);
            self.resumed = link.tls.resumed();
            self.phase = Phase::Established { link };
        }
    }

    /// The server closed the stream. After the session ended (the server's Goodbye) that is
    /// how a connection ends; otherwise it is an error.
    fn eof(&mut self, now: Instant, stage: &str, l: &mut Lent<'_>) {
        if self.session.is_disconnected() {
            self.close(l);
            self.session_ended(now, l);
        } else {
            self.fail(now, &format!("{stage}_eof"), l);
        }
    }

    /// The transport broke under the session: count `kind`, close, retry later.
    fn fail(&mut self, now: Instant, kind: &str, l: &mut Lent<'_>) {
        l.ctx.error(kind);
        self.session
            .connection_lost(CloseReason::Local(GoodbyeReason::Normal));
        self.drain_events(now, l);
        self.close(l);
        self.backoff(now, RETRY_AFTER);
    }

    /// After any input: handle the session's events, send its output, re-arm the timer.
    fn settle(&mut self, now: Instant, l: &mut Lent<'_>) {
        self.drain_events(now, l);
        if let Phase::Handshaking { .. } | Phase::Established { .. } = self.phase {
            let stage = match self.phase {
                Phase::Handshaking { .. } => "tls",
                _ => "write",
            };
            if let Err(e) = self.transmit(now, l) {
                self.fail(now, &kind_of(&e, stage), l);
            } else if self.session.is_disconnected()
                && matches!(self.phase, Phase::Established { .. })
            {
                // The session closed (server goodbye, error, timeout): the reason is counted.
                self.close(l);
                self.session_ended(now, l);
            }
        }
        self.arm(l);
    }

    /// Moves what the session has to send through TLS to the socket; what the socket does not
    /// take waits in the link's own buffer for a `POLLOUT`.
    fn transmit(&mut self, now: Instant, l: &mut Lent<'_>) -> io::Result<()> {
        let (link, established) = match &mut self.phase {
            Phase::Handshaking { link, .. } => (link, false),
            Phase::Established { link } => (link, true),
            _ => return Ok(()),
        };
        l.frames.clear();
        let any = established && self.session.poll_transmit(l.frames);
        if any && !self.established && !self.hello_sent {
            self.hello_sent = true;
            self.since = now;
        }
        l.tx.clear();
        link.tls.seal(l.frames, l.tx)?;
        if l.frames.capacity() > 64 * 1024 {
            *l.frames = BytesMut::new(); // a burst grew it: do not keep it
        }
        flush(link, self.generation, l)
    }

    /// Ends the run for this device: Goodbye, close_notify, one non-blocking flush, close.
    fn finish(&mut self, now: Instant, l: &mut Lent<'_>) {
        self.session.close();
        self.drain_events(now, l);
        let _ = self.transmit(now, l);
        if let Phase::Established { link } = &mut self.phase {
            l.tx.clear();
            if link.tls.close_notify(l.tx).is_ok() {
                let _ = flush(link, self.generation, l);
            }
        }
        self.close(l);
        self.done(l);
    }

    /// Closes the socket, if one is open: its ring watches are removed first (a pending poll
    /// would keep the socket alive after close).
    fn close(&mut self, l: &mut Lent<'_>) {
        let writing = match &self.phase {
            Phase::Connecting { .. } => true,
            Phase::Handshaking { link, .. } | Phase::Established { link } => link.writing,
            _ => return,
        };
        l.ring.unwatch(l.slot as usize, self.generation, writing);
        // The descriptor closes when the phase is replaced.
        self.phase = Phase::Backoff;
    }

    /// After the session ended and the socket closed: retry when the server's Goodbye said,
    /// or never if it revoked the device (a real device stops too; reconnecting would only be
    /// refused).
    fn session_ended(&mut self, now: Instant, l: &mut Lent<'_>) {
        if self.session.is_revoked() {
            self.done(l);
        } else {
            let after = self.retry_after();
            self.backoff(now, after);
        }
    }

    /// A `Goodbye{redirect}` named another node (its device address, `ip:port`): the next
    /// connect goes there if it is one of the run's targets; anything else is counted as
    /// `redirect_unknown` and the device stays with its pick.
    fn redirected(&mut self, to: &[u8], ctx: &ShardCtx) {
        match redirect_target(to, &ctx.shared.targets) {
            Some(k) => {
                self.target = u16::try_from(k).unwrap_or(NO_TARGET);
                ctx.stats.borrow_mut().counters.redirects_followed += 1;
            }
            None => ctx.error("redirect_unknown"),
        }
    }

    /// The wait the server's Goodbye asked for (taken), or the default.
    fn retry_after(&mut self) -> Duration {
        match std::mem::take(&mut self.retry_after_ms) {
            0 => RETRY_AFTER,
            ms => Duration::from_millis(u64::from(ms)),
        }
    }

    fn backoff(&mut self, now: Instant, after: Duration) {
        self.since = now + after;
        self.phase = Phase::Backoff;
    }

    fn done(&mut self, l: &mut Lent<'_>) {
        if !self.is_done() {
            self.phase = Phase::Done;
            *l.done += 1;
            if let Some((_, id)) = self.armed.take() {
                l.wheel.cancel(id);
            }
            l.ctx.shared.online[self.index as usize].store(false, Ordering::Relaxed);
        }
    }

    /// Makes sure the wheel holds the device's next deadline.
    fn arm(&mut self, l: &mut Lent<'_>) {
        let tl = l.ctx.shared.timeline;
        let want = match &self.phase {
            Phase::Waiting | Phase::Backoff => Some(self.since.min(tl.sends_end)),
            Phase::Connecting { deadline, .. } | Phase::Handshaking { deadline, .. } => {
                Some((*deadline).min(tl.end))
            }
            Phase::Established { .. } => [
                self.session.poll_timeout(),
                self.next_send(&l.ctx.shared),
                self.next_ping,
                self.storm(l.ctx).map(|s| s.1),
                Some(tl.end),
            ]
            .into_iter()
            .flatten()
            .min(),
            Phase::Done => None,
        };
        match (want, self.armed) {
            (Some(w), Some((at, _))) if w == at => {}
            (want, armed) => {
                if let Some((_, id)) = armed {
                    l.wheel.cancel(id);
                }
                self.armed = want.map(|w| (w, l.wheel.insert(w, l.slot)));
            }
        }
    }

    /// The next storm that drops this device, with its instant.
    fn storm(&self, ctx: &ShardCtx) -> Option<(usize, Instant)> {
        let sh = &ctx.shared;
        sh.campaign
            .storm
            .iter()
            .enumerate()
            .skip(usize::from(self.next_storm))
            .find(|(k, s)| {
                unit(sh.global(self.index as usize), 1000 + *k as u64) * 100.0 < s.drop_percent
            })
            .map(|(k, s)| (k, sh.timeline.at(s.at_s)))
    }

    /// The device's device→agent (`k` = 0) or echo (1) timetable, at the next send not yet
    /// taken. Timetables start at the ramp slot, phase-spread, so the schedule is fixed
    /// regardless of how long connects take; only the count taken is kept in the device.
    fn timetable(&self, sh: &Shared, k: usize) -> OpenLoopSchedule {
        let m = &sh.campaign.messages;
        let rate = [m.device_to_agent_per_sec, m.round_trip_per_sec][k];
        let index = sh.global(self.index as usize);
        let first = sh.timeline.ramp_slot(index);
        OpenLoopSchedule::with_phase(rate, first, unit(index, 1 + k as u64))
            .after(u64::from(self.sent[k]))
    }

    fn next_send(&self, sh: &Shared) -> Option<Instant> {
        (0..2)
            .filter_map(|k| self.timetable(sh, k).peek())
            .filter(|t| *t < sh.timeline.sends_end)
            .min()
    }

    /// Makes every send that is due: late ones keep their scheduled time.
    fn sends(&mut self, now: Instant, ctx: &ShardCtx) {
        let tl = ctx.shared.timeline;
        let len = ctx.shared.campaign.messages.payload_bytes as usize;
        let now_capped = now.min(tl.sends_end);
        for (k, kind) in [Kind::DeviceToAgent, Kind::RoundTripOut]
            .into_iter()
            .enumerate()
        {
            let mut sched = self.timetable(&ctx.shared, k);
            // Bounded by the timetable up to `now` (a few per wake-up unless the shard stalled).
            while let Some(at) = sched.due(now_capped) {
                if at >= tl.sends_end {
                    break;
                }
                self.sent[k] = u32::try_from(sched.taken()).unwrap_or(u32::MAX);
                let payload = stamp::payload(kind, tl.epoch.micros(at), len);
                match self.session.send(now, Bytes::from_static(TOPIC), payload) {
                    Ok(_) => ctx.stats.borrow_mut().counters.msgs_sent += 1,
                    Err(e) => ctx.error(match e {
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
        let heartbeat = self.session.heartbeat();
        self.next_ping = Some(due.max(now - heartbeat) + heartbeat);
        if let Some(id) = self.session.ping(now) {
            self.timing = Timing::Ping { id: id as u32, due };
        }
    }

    fn drain_events(&mut self, now: Instant, l: &mut Lent<'_>) {
        let ctx = l.ctx;
        let sh = &ctx.shared;
        while let Some(ev) = self.session.poll_event() {
            match ev {
                DeviceEvent::Connected { heartbeat, .. } => {
                    let mut st = ctx.stats.borrow_mut();
                    if self.hello_sent {
                        st.hist.record_since(Metric::Hello, self.since, now);
                    }
                    if let Timing::Admission { from } =
                        std::mem::replace(&mut self.timing, Timing::Idle)
                    {
                        let us = crate::stats::micros_between(from, now);
                        each_window(sh.windows_at(from), |w| st.window(w).record_ready(us));
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
                    sh.online[self.index as usize].store(true, Ordering::Relaxed);
                    self.next_ping = Some(now + heartbeat);
                    if let Some(k) = self.recovering.take() {
                        let at = sh.timeline.at(sh.campaign.storm[usize::from(k)].at_s);
                        let mut storms = ctx.storms.borrow_mut();
                        let t = &mut storms[usize::from(k)];
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
                    st.counters.device_received += 1;
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
                    if let Timing::Ping { id: want, due: at } = self.timing
                        && want == id as u32
                    {
                        self.timing = Timing::Idle;
                        ctx.stats
                            .borrow_mut()
                            .hist
                            .record_since(Metric::Heartbeat, at, now);
                    }
                }
                DeviceEvent::Goodbye {
                    reason,
                    retry_after,
                    redirect,
                } => {
                    if !redirect.is_empty() {
                        self.redirected(&redirect, ctx);
                    }
                    let name = goodbye_name(reason);
                    let mut st = ctx.stats.borrow_mut();
                    st.goodbyes.count(name);
                    each_window(sh.windows_at(now), |w| st.window(w).goodbyes.count(name));
                    drop(st);
                    let ms = retry_after.max(Duration::from_millis(10)).as_millis();
                    self.retry_after_ms = u32::try_from(ms).unwrap_or(u32::MAX);
                }
                DeviceEvent::Closed(reason) => {
                    if self.established {
                        self.established = false;
                        ctx.stats.borrow_mut().counters.disconnected();
                        sh.online[self.index as usize].store(false, Ordering::Relaxed);
                    }
                    if let Timing::Ping { .. } = self.timing {
                        self.timing = Timing::Idle; // an admission goes on to the retry
                    }
                    self.next_ping = None;
                    if let Some(kind) = close_kind(&reason) {
                        ctx.error(kind);
                    }
                }
                DeviceEvent::CodeOffer { .. } | DeviceEvent::CodeChunk { .. } => {
                    self.code_event(now, &ev, ctx)
                }
                DeviceEvent::Acked { .. } => ctx.stats.borrow_mut().counters.device_acked += 1,
            }
        }
    }

    /// Feeds a code event to the device's receiver (made on the first offer), sends its
    /// requests and acks, and counts installs.
    fn code_event(&mut self, now: Instant, ev: &DeviceEvent, ctx: &ShardCtx) {
        if self.code.is_none() && !matches!(ev, DeviceEvent::CodeOffer { .. }) {
            return;
        }
        let rx = self.code.get_or_insert_with(|| {
            Box::new(CodeReceiver::new(
                self.session.code_version(),
                ReceiverConfig {
                    keep_blob: false,
                    ..ReceiverConfig::default()
                },
            ))
        });
        rx.handle_device_event(now, ev);
        if rx.flush_into(&mut self.session).is_err() {
            ctx.error("device_code_send");
        }
        while let Some(u) = rx.poll_event() {
            match u {
                CodeUpdate::Installed { elapsed, .. } => {
                    ctx.stats
                        .borrow_mut()
                        .hist
                        .record(Metric::CodeTransfer, elapsed.as_micros() as u64);
                    let us = ctx.shared.timeline.epoch.micros(now);
                    let mut all = ctx.code_installed.borrow_mut();
                    let k = usize::from(self.installs).min(all.len() - 1);
                    all[k].0 += 1;
                    all[k].1 = all[k].1.max(us);
                    self.installs = self.installs.saturating_add(1);
                }
                CodeUpdate::Rejected { .. } => ctx.error("device_code_rejected"),
                CodeUpdate::GaveUp { .. } => ctx.error("device_code_gave_up"),
                _ => {}
            }
        }
    }
}

/// Writes pending ciphertext (the link's leftovers first, then the shard's `tx`) as far as the
/// socket takes it; copies only the rest into the link and watches for `POLLOUT`.
fn flush(link: &mut Link, generation: u32, l: &mut Lent<'_>) -> io::Result<()> {
    if let Some(out) = link.out.as_mut() {
        out.extend_from_slice(l.tx);
        let done = send_all(&link.fd, out)?;
        if done == out.len() {
            link.out = None; // hold no write buffer at rest
        } else {
            out.drain(..done);
        }
    } else if !l.tx.is_empty() {
        let done = send_all(&link.fd, l.tx)?;
        if done < l.tx.len() {
            link.out = Some(Box::new(l.tx[done..].to_vec()));
        }
    }
    if link.out.is_some() && !link.writing {
        link.writing = true;
        l.ring
            .watch_write(link.fd.as_raw_fd(), l.slot as usize, generation);
    }
    Ok(())
}

/// Sends as much of `buf` as the socket takes without blocking; returns how much.
fn send_all(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match ring::send(fd.as_raw_fd(), &buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The report name of a `Goodbye` reason.
fn goodbye_name(r: GoodbyeReason) -> &'static str {
    match r {
        GoodbyeReason::Normal => "normal",
        GoodbyeReason::Shutdown => "shutdown",
        GoodbyeReason::Overloaded => "overloaded",
        GoodbyeReason::Replaced => "replaced",
        GoodbyeReason::Redirect => "redirect",
        GoodbyeReason::Upgrade => "upgrade",
        GoodbyeReason::Flapping => "flapping",
        _ => "other",
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
        CloseReason::PeerGoodbye(GoodbyeReason::Revoked) => "goodbye_revoked",
        CloseReason::PeerGoodbye(GoodbyeReason::Upgrade) => "goodbye_upgrade",
        CloseReason::PeerGoodbye(_) => "goodbye_other",
        CloseReason::PeerError(E::AuthFailed) => "server_error_auth_failed",
        CloseReason::PeerError(E::UnknownDevice) => "server_error_unknown_device",
        CloseReason::PeerError(E::BadProof) => "server_error_bad_proof",
        CloseReason::PeerError(E::Timeout) => "server_error_timeout",
        CloseReason::PeerError(_) => "server_error_other",
        _ => "device_closed_other",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_spread_and_stable() {
        let n = 10_000;
        let below = (0..n).filter(|i| unit(*i, 7) < 0.2).count();
        assert!((1_800..2_200).contains(&below), "{below}");
        assert_eq!(unit(42, 3), unit(42, 3));
        assert!((0..n).all(|i| (0.0..1.0).contains(&unit(i, 9))));
    }

    /// Memory per device is a budget: these are the inline sizes of what every
    /// simulated device holds at rest; heap behind them (rustls' `ClientConnection`, the
    /// session's buffers) is measured by the idle campaigns. Run with `--nocapture` to see them.
    #[test]
    fn a_redirect_names_a_node_of_the_run() {
        let targets: Vec<std::net::SocketAddr> = vec![
            "127.0.3.1:7400".parse().unwrap(),
            "127.0.3.2:7400".parse().unwrap(),
        ];
        assert_eq!(redirect_target(b"127.0.3.2:7400", &targets), Some(1));
        assert_eq!(redirect_target(b" 127.0.3.1:7400\n", &targets), Some(0));
        assert_eq!(
            redirect_target(b"127.0.3.9:7400", &targets),
            None,
            "not a node of the run"
        );
        assert_eq!(redirect_target(b"node-2", &targets), None);
        assert_eq!(redirect_target(&[0xff, 0xfe], &targets), None);
    }

    #[test]
    fn per_device_sizes() {
        use std::mem::size_of;
        let sizes = [
            ("Device", size_of::<Device>()),
            ("Phase", size_of::<Phase>()),
            ("Link", size_of::<Link>()),
            ("DeviceTls", size_of::<DeviceTls>()),
            ("DeviceSession", size_of::<DeviceSession>()),
            (
                "DeviceEvent (the session's event queue keeps 4 at rest)",
                size_of::<DeviceEvent>(),
            ),
            (
                "rustls::ClientConnection (boxed)",
                size_of::<rustls::ClientConnection>(),
            ),
            (
                "tls::Detached (boxed)",
                size_of::<super::super::tls::Detached>(),
            ),
            (
                "detached::DetachedClientTls (in tls::Detached)",
                size_of::<tether_net::detached::DetachedClientTls>(),
            ),
            (
                "detached::ClientHandshake (boxed, handshake only)",
                size_of::<tether_net::detached::ClientHandshake>(),
            ),
        ];
        for (name, size) in sizes {
            println!("size_of {name}: {size} B");
        }
        assert!(size_of::<DeviceTls>() <= 16, "the TLS state stays boxed");
        assert!(size_of::<super::super::tls::Detached>() <= 96);
        assert!(size_of::<Link>() <= 32);
        assert!(size_of::<Phase>() <= 48);
        assert!(size_of::<DeviceSession>() <= 240);
        assert!(size_of::<Device>() <= 416, "{}", size_of::<Device>());
    }
}
