//! The attacker: the campaign's `[[attack]]`s, run next to the well-behaved devices.
//!
//! One task per loadgen shard runs that shard's attacks (attack `k` on shard `k mod shards`)
//! over non-blocking sockets and its own readiness ring, like the device driver: a slab of
//! connections of a few dozen bytes each, readiness from a multishot `POLL_ADD` per socket, no
//! task or buffer per connection. Bounded: an attack opens connections only between its
//! `start_s` and `start_s + duration_s`, at most its `connections` at once, and closes all it
//! still holds at its end (or when the run is aborted); it connects only to the campaign's
//! server address (loopback, checked by the campaign) from its own source addresses.
//!
//! What each kind sends on an open connection:
//! - `silent`: nothing.
//! - `stalled_hello`: one genuine TLS 1.3 ClientHello (made once by a rustls client, the same
//!   bytes on every connection), then nothing.
//! - `partial_hello`: the record header and the first half of that ClientHello record.
//! - `garbage_before_tls`: 512 random bytes whose first byte is no TLS record type.
//! - `garbage_after_tls`: a full TLS handshake, then one of (by turns) 512 random bytes straight
//!   on the socket (not a TLS record), a TLS record holding 512 random bytes (a frame header
//!   of random length), or a TLS record holding a well-sized frame of an unknown type.
//! - `churn`: nothing; closed as soon as it is established (by turns with FIN and with RST).
//! - `bad_proof`: a full TLS handshake, then — after the server's `Challenge` — a `Hello` naming
//!   a device that is connected now (when one is found) with a proof made from a wrong key.
//!
//! Every connection waits for the server to close it (end of stream or reset), which is counted
//! with the time it was open; one still open at the attack's end counts as `still_open`.

use std::collections::VecDeque;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls::ClientConnection;
use slab::Slab;
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use tether_net::ring::{self, Completion, Doorbell, Kind as RingKind, Ring, ring_generation};
use tether_protocol::CloseReason;
use tether_protocol::auth::DeviceKey;
use tether_protocol::device::{DeviceConfig, DeviceEvent, DeviceSession};

use super::driver::ring_bell;
use super::shard::ShardCtx;
use crate::campaign::{Attack, AttackKind};
use crate::stats::{AttackTally, OpenLoopSchedule, micros_between};

/// Most connections one pass opens before looking at the ring again.
const OPENS_PER_STEP: usize = 256;
/// Most reads of one connection per pass.
const READS_PER_STEP: usize = 8;
/// The attacker looks at the stop flag and its schedule at least this often.
const MAX_PARK: Duration = Duration::from_millis(100);
/// Bytes of garbage per connection.
const GARBAGE_LEN: usize = 512;
/// Read buffer (what the server sends an attacker is short: alerts, an `Error`, a handshake).
const READ_BUF: usize = 16 * 1024;
/// Submissions per ring batch.
const RING_ENTRIES: u32 = 1024;

/// Runs the campaign attacks with indexes `attacks` until every one has ended.
pub(super) async fn run(ctx: Rc<ShardCtx>, attacks: Vec<usize>) {
    let mut a = match Attacker::new(&ctx, &attacks) {
        Ok(a) => a,
        Err(e) => {
            // The run did not do what it should: that is an error of the run.
            eprintln!("loadgen shard {}: attacker not started: {e}", ctx.index);
            ctx.error("attacker_setup");
            return;
        }
    };
    let doorbell = match Doorbell::new(&a.ring) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("loadgen shard {}: attacker not started: {e}", ctx.index);
            ctx.error("attacker_setup");
            return;
        }
    };
    // Dropped (and so cancelled) when the attacker returns.
    let (bell, _doorbell) = ring_bell(doorbell);
    // Bounded by the attacks' ends (each within the planned run; validated) and by the stop.
    loop {
        let now = Instant::now();
        let busy = a.step(now);
        if a.ring.submit().is_err() {
            ctx.error("attacker_ring_submit");
        }
        if a.runs.iter().all(|r| r.ended) {
            break;
        }
        if busy {
            glommio::yield_if_needed().await;
            continue;
        }
        bell.wait(a.next_wake(now)).await;
    }
    let mut tallies = ctx.attacks.borrow_mut();
    for r in a.runs {
        tallies[r.k].add(&r.tally);
    }
}

/// One campaign attack as this shard runs it.
struct Run {
    /// Its index in the campaign.
    k: usize,
    kind: AttackKind,
    sources: Vec<Ipv4Addr>,
    end: Instant,
    schedule: OpenLoopSchedule,
    /// Held kinds: connections to open in all.
    total: Option<u64>,
    max_open: u64,
    /// Its connections open (or connecting) now.
    open: u64,
    /// Connections made so far (turns sources and payload variants).
    made: u64,
    ended: bool,
    tally: AttackTally,
}

/// What an open attack connection is waiting for.
enum Stage {
    /// The TCP connect (a one-shot `POLLOUT` watch).
    Connecting,
    /// The server to close it; whatever it sends is read and dropped.
    Holding,
    /// A TLS kind's handshake and what follows it.
    Tls(Box<TlsStage>),
}

struct TlsStage {
    tls: ClientConnection,
    /// `bad_proof`: the session whose `Hello` carries the wrong proof.
    hello: Option<DeviceSession>,
    /// Which payload variant (`garbage_after_tls`).
    variant: u8,
}

struct Conn {
    fd: OwnedFd,
    /// Index into `Attacker::runs`.
    run: u16,
    generation: u32,
    /// When TCP was established.
    established: Option<Instant>,
    /// A write watch (the connect's) may still be armed.
    writing: bool,
    stage: Stage,
}

struct Attacker {
    ctx: Rc<ShardCtx>,
    ring: Ring,
    runs: Vec<Run>,
    conns: Slab<Conn>,
    /// Connect deadlines in the order the connects were made (one timeout for all).
    deadlines: VecDeque<(Instant, usize, u32)>,
    connect_timeout: Duration,
    next_generation: u32,
    completions: Vec<Completion>,
    /// Connections whose read budget ran out, with their generation.
    again: Vec<(usize, u32)>,
    rx: Box<[u8]>,
    plain: Box<[u8]>,
    tx: Vec<u8>,
    frames: BytesMut,
    /// The ClientHello record every `stalled_hello` / `partial_hello` connection sends.
    client_hello: Vec<u8>,
    tls: Option<Arc<rustls::ClientConfig>>,
    rng: u64,
}

/// xorshift64*: garbage bytes and victim picks (no cryptographic claim).
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn fill_random(state: &mut u64, out: &mut Vec<u8>, len: usize) {
    while out.len() < len {
        out.extend_from_slice(&next_random(state).to_le_bytes());
    }
    out.truncate(len);
}

/// Sends all of `buf` on a fresh non-blocking socket; `Ok(false)` if the socket took only part.
fn send_whole(fd: &OwnedFd, buf: &[u8]) -> io::Result<bool> {
    let mut done = 0;
    // Bounded: every pass sends something or returns.
    while done < buf.len() {
        match ring::send(fd.as_raw_fd(), &buf[done..]) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Whether an I/O error means the server reset the connection (or closed it under our write).
fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

impl Attacker {
    fn new(ctx: &Rc<ShardCtx>, attacks: &[usize]) -> Result<Attacker, String> {
        let sh = &ctx.shared;
        let c = &sh.campaign;
        let mut runs = Vec::with_capacity(attacks.len());
        for &k in attacks {
            let spec: &Attack = &c.attack[k];
            let sources = spec.sources()?;
            let (start, end) = (sh.attack_spans[k].0, sh.attack_spans[k].1);
            runs.push(Run {
                k,
                kind: spec.kind,
                sources,
                end,
                schedule: OpenLoopSchedule::new(spec.open_rate(), start),
                total: spec.total(),
                max_open: spec.max_open(),
                open: 0,
                made: 0,
                ended: false,
                tally: AttackTally::default(),
            });
        }
        let tls = sh.attack_tls.clone();
        let client_hello = match &tls {
            Some(cfg) if runs.iter().any(|r| r.kind.holds()) => {
                let mut hello = ClientConnection::new(cfg.clone(), sh.server_name.clone())
                    .map_err(|e| format!("cannot make a ClientHello: {e}"))?;
                let mut out = Vec::new();
                // Bounded: the ClientHello is one flight of a few hundred bytes.
                while hello.wants_write() {
                    hello
                        .write_tls(&mut out)
                        .map_err(|e| format!("cannot make a ClientHello: {e}"))?;
                }
                out
            }
            _ => Vec::new(),
        };
        let ring = Ring::new(RING_ENTRIES).map_err(|e| format!("io_uring setup failed: {e}"))?;
        Ok(Attacker {
            ctx: ctx.clone(),
            ring,
            runs,
            conns: Slab::new(),
            deadlines: VecDeque::new(),
            connect_timeout: Duration::from_millis(c.limits.connect_timeout_ms),
            next_generation: 0,
            completions: Vec::new(),
            again: Vec::new(),
            rx: vec![0; READ_BUF].into_boxed_slice(),
            plain: vec![0; READ_BUF].into_boxed_slice(),
            tx: Vec::with_capacity(4096),
            frames: BytesMut::new(),
            client_hello,
            tls,
            rng: 0x9e37_79b9_7f4a_7c15 ^ (ctx.index as u64 + 1),
        })
    }

    /// One pass: the stop and the attacks' ends, ring completions, due openings, connect
    /// deadlines. Returns whether there was work.
    fn step(&mut self, now: Instant) -> bool {
        let stop = self.ctx.stop.fired();
        for r in 0..self.runs.len() {
            if !self.runs[r].ended && (stop || now >= self.runs[r].end) {
                self.end_run(r);
            }
        }
        let mut cs = std::mem::take(&mut self.completions);
        self.ring.drain(&mut cs);
        let mut busy = !cs.is_empty();
        for c in cs.drain(..) {
            if c.kind == RingKind::Control {
                continue;
            }
            match self.conns.get(c.idx) {
                Some(conn) if conn.generation == c.generation => {}
                _ => continue, // a completion for a connection since closed
            }
            match c.kind {
                RingKind::Write => self.on_writable(c.idx, c.result, now),
                RingKind::Read => {
                    if !c.more && c.result != -libc::ECANCELED {
                        // The multishot poll ended (overflow or error): re-arm it.
                        let fd = self.conns[c.idx].fd.as_raw_fd();
                        self.ring.watch_read(fd, c.idx, c.generation);
                    }
                    self.on_readable(c.idx, now);
                }
                _ => {}
            }
        }
        self.completions = cs;
        let again = std::mem::take(&mut self.again);
        busy |= !again.is_empty();
        for (slot, generation) in again {
            if self
                .conns
                .get(slot)
                .is_some_and(|c| c.generation == generation)
            {
                self.on_readable(slot, now);
            }
        }
        for r in 0..self.runs.len() {
            busy |= self.open_due(r, now);
        }
        // Bounded by the connects made (each entry is popped once).
        while let Some(&(at, slot, generation)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            let timed_out = self.conns.get(slot).is_some_and(|c| {
                c.generation == generation && matches!(c.stage, Stage::Connecting)
            });
            if timed_out {
                let r = usize::from(self.conns[slot].run);
                self.runs[r].tally.counts.connect_timeouts += 1;
                self.close(slot);
                busy = true;
            }
        }
        busy
    }

    /// When the next thing is due: an opening, an attack's end, a connect deadline.
    fn next_wake(&self, now: Instant) -> Instant {
        let mut at = now + MAX_PARK;
        for r in self.runs.iter().filter(|r| !r.ended) {
            at = at.min(r.end);
            if r.total.is_none_or(|t| r.tally.counts.attempted < t) {
                if let Some(next) = r.schedule.peek() {
                    at = at.min(next);
                }
            }
        }
        if let Some(&(d, _, _)) = self.deadlines.front() {
            at = at.min(d);
        }
        at
    }

    /// Opens attack `r`'s connections that are due (at most [`OPENS_PER_STEP`]).
    fn open_due(&mut self, r: usize, now: Instant) -> bool {
        let mut opened = 0;
        while opened < OPENS_PER_STEP {
            let run = &mut self.runs[r];
            if run.ended || run.total.is_some_and(|t| run.tally.counts.attempted >= t) {
                break;
            }
            if run.schedule.due(now.min(run.end)).is_none() {
                break;
            }
            opened += 1;
            if run.open >= run.max_open {
                run.tally.counts.skipped += 1;
                continue;
            }
            self.connect(r);
        }
        opened > 0
    }

    fn connect(&mut self, r: usize) {
        let server = self.ctx.shared.targets[0];
        let run = &mut self.runs[r];
        let ip = run.sources[(run.made % run.sources.len() as u64) as usize];
        run.made += 1;
        run.tally.counts.attempted += 1;
        let socket = (|| {
            let s = Socket::new(
                Domain::for_address(server),
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )?;
            s.bind(&SockAddr::from(SocketAddr::from((ip, 0))))?;
            match s.connect(&SockAddr::from(server)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            io::Result::Ok(s)
        })();
        let fd = match socket {
            Ok(s) => OwnedFd::from(s),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                run.tally.counts.refused += 1;
                return;
            }
            Err(_) => {
                run.tally.counts.connect_failed += 1;
                return;
            }
        };
        self.next_generation = ring_generation(self.next_generation.wrapping_add(1));
        let generation = self.next_generation;
        let raw = fd.as_raw_fd();
        let slot = self.conns.insert(Conn {
            fd,
            run: r as u16,
            generation,
            established: None,
            writing: true,
            stage: Stage::Connecting,
        });
        self.ring.watch_write(raw, slot, generation);
        self.deadlines
            .push_back((Instant::now() + self.connect_timeout, slot, generation));
        run.open += 1;
    }

    /// The connecting socket became writable: established, or failed.
    fn on_writable(&mut self, slot: usize, result: i32, now: Instant) {
        let conn = &mut self.conns[slot];
        conn.writing = false;
        if !matches!(conn.stage, Stage::Connecting) {
            return;
        }
        let failure = match SockRef::from(&conn.fd).take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) if result < 0 => Some(io::Error::from_raw_os_error(-result)),
            Ok(None) => None,
        };
        let r = usize::from(conn.run);
        if let Some(e) = failure {
            let t = &mut self.runs[r].tally.counts;
            match e.kind() {
                io::ErrorKind::ConnectionRefused => t.refused += 1,
                _ if is_reset(&e) => t.reset += 1,
                _ => t.connect_failed += 1,
            }
            self.close(slot);
            return;
        }
        conn.established = Some(now);
        let run = &mut self.runs[r];
        run.tally.counts.opened += 1;
        let turn = run.made;
        let kind = run.kind;
        let payload: Option<&[u8]> = match kind {
            AttackKind::Silent => None,
            AttackKind::StalledHello => Some(&self.client_hello),
            AttackKind::PartialHello => {
                let h = &self.client_hello;
                Some(&h[..(5 + h.len().saturating_sub(5) / 2).min(h.len())])
            }
            AttackKind::GarbageBeforeTls => {
                self.tx.clear();
                fill_random(&mut self.rng, &mut self.tx, GARBAGE_LEN);
                // Not a TLS record type (change_cipher_spec 20 … heartbeat 24).
                self.tx[0] = 0x80 | (self.tx[0] & 0x7f);
                Some(&self.tx)
            }
            AttackKind::Churn => {
                if turn % 2 == 1 {
                    // By turns an abortive close: RST instead of FIN.
                    let _ = SockRef::from(&conn.fd).set_linger(Some(Duration::ZERO));
                }
                run.tally.counts.closed_by_attacker += 1;
                self.close(slot);
                return;
            }
            AttackKind::GarbageAfterTls | AttackKind::BadProof => {
                if let Err(e) = self.start_tls(slot, kind, turn, now) {
                    self.on_io_error(slot, &e, now);
                    return;
                }
                None
            }
        };
        let conn = &mut self.conns[slot];
        if let Some(p) = payload {
            match send_whole(&conn.fd, p) {
                Ok(true) => self.runs[r].tally.counts.sent += 1,
                Ok(false) => {}
                Err(e) => {
                    self.on_io_error(slot, &e, now);
                    return;
                }
            }
        }
        let conn = &mut self.conns[slot];
        self.ring
            .watch_read(conn.fd.as_raw_fd(), slot, conn.generation);
    }

    /// Starts the client handshake of a TLS kind and sends its ClientHello.
    fn start_tls(
        &mut self,
        slot: usize,
        kind: AttackKind,
        turn: u64,
        now: Instant,
    ) -> io::Result<()> {
        let ctx = self.ctx.clone();
        let sh = &ctx.shared;
        let cfg = self
            .tls
            .clone()
            .ok_or_else(|| io::Error::other("no attack TLS config"))?;
        let tls = ClientConnection::new(cfg, sh.server_name.clone()).map_err(io::Error::other)?;
        let hello = (kind == AttackKind::BadProof).then(|| {
            let (victim, live) = self.pick_victim();
            if live {
                let r = usize::from(self.conns[slot].run);
                self.runs[r].tally.counts.named_live += 1;
            }
            // Any key but the device's own: the proof will not verify.
            let mut key = [0u8; 32];
            for chunk in key.chunks_mut(8) {
                chunk.copy_from_slice(&next_random(&mut self.rng).to_le_bytes());
            }
            let mut cfg = DeviceConfig::new(sh.devices[victim].id, DeviceKey(key));
            cfg.welcome_timeout = Duration::from_secs(3600);
            let mut s = DeviceSession::new(cfg, now);
            s.connect(now);
            s
        });
        let mut stage = Box::new(TlsStage {
            tls,
            hello,
            variant: (turn % 3) as u8,
        });
        self.tx.clear();
        // Bounded: one flight.
        while stage.tls.wants_write() {
            stage.tls.write_tls(&mut self.tx)?;
        }
        let conn = &mut self.conns[slot];
        send_whole(&conn.fd, &self.tx)?;
        conn.stage = Stage::Tls(stage);
        Ok(())
    }

    /// A device connected now, if one is found in a few random picks (else any device):
    /// (its index, whether it was connected).
    fn pick_victim(&mut self) -> (usize, bool) {
        let online = &self.ctx.shared.online;
        let n = online.len().max(1) as u64;
        let mut any = 0;
        for _ in 0..32 {
            let i = (next_random(&mut self.rng) % n) as usize;
            any = i;
            if online.get(i).is_some_and(|o| o.load(Ordering::Relaxed)) {
                return (i, true);
            }
        }
        (any, false)
    }

    fn on_readable(&mut self, slot: usize, now: Instant) {
        for _ in 0..READS_PER_STEP {
            let Some(conn) = self.conns.get(slot) else {
                return;
            };
            let n = match ring::recv(conn.fd.as_raw_fd(), &mut self.rx) {
                Ok(0) => {
                    self.server_closed(slot, false, now);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.on_io_error(slot, &e, now);
                    return;
                }
            };
            if let Err(e) = self.feed(slot, n, now) {
                self.on_io_error(slot, &e, now);
                return;
            }
            // A short read does not end the turn: an end of stream that came with the data
            // (an `Error`, then the close) raises no further completion.
        }
        // The read budget ran out: go on in the next pass.
        self.again.push((slot, self.conns[slot].generation));
    }

    /// Runs `n` bytes the server sent through a TLS kind's client; other kinds drop them.
    fn feed(&mut self, slot: usize, n: usize, now: Instant) -> io::Result<()> {
        let conn = &mut self.conns[slot];
        let r = usize::from(conn.run);
        let Stage::Tls(st) = &mut conn.stage else {
            return Ok(());
        };
        let was_handshaking = st.tls.is_handshaking();
        let mut data = &self.rx[..n];
        // Bounded: every pass consumes input (see the device's buffered TLS).
        while !data.is_empty() {
            st.tls.read_tls(&mut data)?;
            let state = match st.tls.process_new_packets() {
                Ok(s) => s,
                Err(_) => {
                    // An alert or a handshake the attacker's client refuses: stop talking TLS
                    // and wait for the server to close.
                    self.runs[r].tally.counts.tls_failed += 1;
                    conn.stage = Stage::Holding;
                    return Ok(());
                }
            };
            let mut left = state.plaintext_bytes_to_read();
            while left > 0 {
                let m = st.tls.reader().read(&mut self.plain)?;
                if m == 0 {
                    break;
                }
                if let Some(s) = st.hello.as_mut() {
                    s.handle_bytes(now, &self.plain[..m]);
                }
                left = left.saturating_sub(m);
            }
        }
        if st.tls.is_handshaking() {
            return flush_tls(&conn.fd, &mut st.tls, &mut self.tx);
        }
        let counts = &mut self.runs[r].tally.counts;
        if was_handshaking {
            counts.tls_done += 1;
        }
        match st.hello.as_mut() {
            None => {
                // garbage_after_tls: the handshake is done (our Finished goes out first).
                flush_tls(&conn.fd, &mut st.tls, &mut self.tx)?;
                let mut garbage = Vec::with_capacity(GARBAGE_LEN);
                fill_random(&mut self.rng, &mut garbage, GARBAGE_LEN);
                let whole = match st.variant {
                    0 => {
                        garbage[0] = 0x80 | (garbage[0] & 0x7f); // not a TLS record type
                        send_whole(&conn.fd, &garbage)?
                    }
                    v => {
                        if v == 2 {
                            // A frame of a plausible size and an unknown type.
                            garbage[..5].copy_from_slice(&[0, 0, 0, 16, 0xEE]);
                            garbage.truncate(4 + 16);
                        }
                        st.tls.writer().write_all(&garbage)?;
                        flush_tls(&conn.fd, &mut st.tls, &mut self.tx)?;
                        true
                    }
                };
                counts.sent += u64::from(whole);
                conn.stage = Stage::Holding;
            }
            Some(session) => {
                self.frames.clear();
                if session.poll_transmit(&mut self.frames) {
                    st.tls.writer().write_all(&self.frames)?;
                    counts.sent += 1;
                }
                // Bounded by the session's event queue.
                while let Some(ev) = session.poll_event() {
                    match ev {
                        DeviceEvent::Connected { .. } => counts.welcomed += 1,
                        DeviceEvent::Closed(CloseReason::PeerError(_)) => counts.rejected += 1,
                        _ => {}
                    }
                }
                flush_tls(&conn.fd, &mut st.tls, &mut self.tx)?;
            }
        }
        Ok(())
    }

    /// Counts a failed read or write: a reset by the server, or the attacker's own failure.
    fn on_io_error(&mut self, slot: usize, e: &io::Error, now: Instant) {
        if is_reset(e) {
            self.server_closed(slot, true, now);
        } else {
            let r = usize::from(self.conns[slot].run);
            self.runs[r].tally.counts.closed_by_attacker += 1;
            self.close(slot);
        }
    }

    /// The server ended an open connection: counted with how long it was open.
    fn server_closed(&mut self, slot: usize, reset: bool, now: Instant) {
        let conn = &self.conns[slot];
        let r = usize::from(conn.run);
        let open_us = conn.established.map_or(0, |at| micros_between(at, now));
        self.runs[r].tally.server_closed(reset, open_us);
        self.close(slot);
    }

    /// Closes every connection attack `r` still holds; it opens no more.
    fn end_run(&mut self, r: usize) {
        self.runs[r].ended = true;
        let held: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| usize::from(c.run) == r)
            .map(|(slot, _)| slot)
            .collect();
        self.runs[r].tally.counts.still_open += held.len() as u64;
        for slot in held {
            self.close(slot);
        }
    }

    /// Closes a connection: its ring watches are removed first.
    fn close(&mut self, slot: usize) {
        let conn = self.conns.remove(slot);
        self.ring.unwatch(slot, conn.generation, conn.writing);
        let run = &mut self.runs[usize::from(conn.run)];
        run.open = run.open.saturating_sub(1);
        // The descriptor closes here.
        drop(conn);
    }
}

/// Sends what the TLS client has queued (a flight, records).
fn flush_tls(fd: &OwnedFd, tls: &mut ClientConnection, tx: &mut Vec<u8>) -> io::Result<()> {
    tx.clear();
    // Bounded: rustls' queue is finite.
    while tls.wants_write() {
        tls.write_tls(tx)?;
    }
    if !tx.is_empty() {
        send_whole(fd, tx)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_fill_and_differ() {
        let mut s = 7;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        fill_random(&mut s, &mut a, GARBAGE_LEN);
        fill_random(&mut s, &mut b, 13);
        assert_eq!((a.len(), b.len()), (GARBAGE_LEN, 13));
        assert_ne!(a[..13], b[..]);
        assert!(a.iter().any(|&x| x != a[0]), "not constant");
    }
}
