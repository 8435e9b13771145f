//! Connection lifecycle and I/O on one shard: accepting (admission guard, accept rate),
//! starting TLS and the session, the driver's round over ready sockets (the readiness ring's
//! completions, each connection's read and write step), timers, the move of a connection to
//! its device's home shard and its adoption there, and closing. What a session's events mean
//! and where its messages go is `route.rs`.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use tether_protocol::CodeVersion;
use tether_protocol::auth::Nonce;
use tether_protocol::server::{ServerEvent, ServerSession};

use super::conn::{CertDevice, Conn, IoOutcome, TlsConn};
use super::contain::{self, Site};
use super::guard::{Guard, Refusal};
use super::route::{Moved, ShardMsg};
use super::{Shard, Step, TlsState, peer_ip, retry_spread, wake};
use crate::metrics::ErrorKind;
use tether_net::detached::Handshake;
use tether_net::ring::{Kind, ring_generation};
use tether_protocol::message::{GoodbyeReason, SendStatus};

impl Shard {
    /// Takes a freshly accepted connection.
    pub(super) fn accept(&mut self, fd: OwnedFd, now: Instant) {
        self.metrics.connections_accepted += 1;
        let source = peer_ip(&fd);
        match (self.guard.check(source, now), source) {
            (Ok(()), _) => self.start(fd, source, now, false),
            (Err(Refusal::SourceBusy), Some(ip)) => {
                // Its address has its share in flight: it waits for its turn.
                if self.guard.wait(fd, ip, now).is_err() {
                    self.metrics.refused_source_busy += 1;
                }
            }
            (Err(Refusal::SourceBusy), None) => self.metrics.refused_source_busy += 1,
            // Dropping `fd` closes it.
            (Err(Refusal::SourceFailures), _) => self.metrics.refused_source_failures += 1,
        }
    }

    /// Starts the TLS handshake and the session of an admitted connection (accepted at `at`;
    /// `reserved`: its address's slot was reserved by the guard when it left the queue).
    pub(super) fn start(
        &mut self,
        fd: OwnedFd,
        source: Option<std::net::IpAddr>,
        at: Instant,
        reserved: bool,
    ) {
        let release = |g: &mut Guard| {
            if let (true, Some(ip)) = (reserved, source) {
                g.release(ip);
            }
        };
        let tls = match self.ctx.tls_state {
            TlsState::Buffered => rustls::ServerConnection::new(self.tls.clone())
                .map(|c| TlsConn::Buffered(Box::new(c)))
                .ok(),
            TlsState::Detached => Handshake::new(self.tls.clone())
                .map(|h| TlsConn::Handshaking(Box::new(h)))
                .ok(),
        };
        let Some(mut tls) = tls else {
            self.metrics.error(ErrorKind::Tls);
            release(&mut self.guard);
            return;
        };
        let mut nonce = [0u8; 32];
        crate::fsutil::random_bytes(&mut nonce);
        // The Hello deadline runs from accept, time spent waiting included.
        let mut session = ServerSession::new(&self.ctx.session, Nonce(nonce), at);
        // The Challenge goes out as half-RTT data, in the server's first flight.
        let mut out = Vec::new();
        self.scratch.clear();
        if session.poll_transmit(&mut self.scratch) && tls.seal(&self.scratch, &mut out).is_err() {
            self.metrics.error(ErrorKind::Tls);
            release(&mut self.guard);
            return;
        }
        let idx = self.insert(fd, tls, session, out, false, CertDevice::default());
        let generation = self.conns[idx].generation;
        match (reserved, source) {
            (true, Some(ip)) => self.guard.track_reserved(idx, generation, ip, at),
            _ => self.guard.track(idx, generation, source, at),
        }
    }

    /// How long a connection may wait for its address's turn: half its Hello deadline. One that
    /// waited longer is closed without any work, rather than started with too little time left
    /// (under a flood of stalled handshakes from few addresses, starting those made a second
    /// burst of handshake work just as the first batch hit its deadline).
    pub(super) fn max_wait(&self) -> std::time::Duration {
        self.ctx.session.hello_timeout / 2
    }

    /// Starts the waiting connections whose address got a free slot, while the shard has room.
    pub(super) fn start_waiting(&mut self, now: Instant) {
        while self.guard.has_room() {
            let Some((fd, ip, at)) = self.guard.pop_ready() else {
                return;
            };
            if now.saturating_duration_since(at) >= self.max_wait() {
                self.metrics.error(ErrorKind::Timeout);
                self.guard.release(ip);
                continue;
            }
            self.start(fd, Some(ip), at, true);
        }
    }

    pub(super) fn insert(
        &mut self,
        fd: OwnedFd,
        tls: TlsConn,
        session: ServerSession,
        out: Vec<u8>,
        tls_done: bool,
        cert: CertDevice,
    ) -> usize {
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        self.next_generation = ring_generation(self.next_generation.wrapping_add(1));
        let generation = self.next_generation;
        self.ring.watch_read(fd.as_raw_fd(), idx, generation);
        self.blamed = Some((idx, generation));
        entry.insert(Conn {
            fd,
            tls,
            session,
            out,
            partial: Vec::new(),
            cert,
            generation,
            armed: None,
            tls_done,
            closing: false,
            registered: false,
            writing: false,
            handing: false,
            code_version: CodeVersion(0),
        });
        self.metrics.connections_open += 1;
        wake::notify(idx);
        idx
    }

    /// Applies the readiness ring's completions: ready sockets go on the ready list, new
    /// connections into the table.
    pub(super) fn on_completions(&mut self) {
        let mut cs = std::mem::take(&mut self.completions);
        self.ring.drain(&mut cs);
        for c in cs.drain(..) {
            match c.kind {
                Kind::Read | Kind::Write => {
                    let Some(conn) = self.conns.get_mut(c.idx) else {
                        continue;
                    };
                    if conn.generation != c.generation {
                        continue; // a completion for a slot since reused
                    }
                    if c.kind == Kind::Write {
                        conn.writing = false;
                    } else if !c.more && c.result != -libc::ECANCELED {
                        // The multishot poll ended (overflow or error): re-arm it.
                        self.ring
                            .watch_read(conn.fd.as_raw_fd(), c.idx, c.generation);
                    }
                    wake::notify(c.idx);
                }
                Kind::Accept => {
                    if c.result >= 0 {
                        // SAFETY: the kernel handed us this new descriptor; nobody else owns it.
                        let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
                        let now = Instant::now();
                        // One token per accepted connection.
                        if !self.bucket.spend(now) {
                            self.metrics.accept_rate_pauses += 1;
                        }
                        self.contained(Site::Accept, |s| s.accept(fd, now));
                    } else if c.result != -libc::ECANCELED {
                        self.metrics.error(ErrorKind::Io);
                    }
                    if !c.more {
                        if let Some(l) = self.listeners.get_mut(c.idx) {
                            l.accepting = false;
                        }
                    }
                }
                Kind::Control => {}
            }
        }
        self.completions = cs;
        self.admit(Instant::now());
    }

    /// Admission control: accept while fewer than the limit of strangers are in flight (after
    /// shedding the oldest stalled ones, see [`guard`]) and the accept rate allows; otherwise
    /// leave connections in the kernel's backlog. Under a rate limit each accept takes one
    /// connection (and one token) and is re-armed while tokens last; without one a multishot
    /// accept takes them all.
    pub(super) fn admit(&mut self, now: Instant) {
        while let Some((idx, generation)) = self.guard.shed_candidate(now) {
            if self
                .conns
                .get(idx)
                .is_some_and(|c| c.generation == generation)
            {
                self.metrics.handshakes_shed += 1;
                self.remove(idx);
            }
        }
        self.start_waiting(now);
        let room = self.guard.has_room() && !self.shutting_down && !self.draining;
        // Usually one listener; more after an upgrade from a process with more shards.
        for (which, l) in self.listeners.iter_mut().enumerate() {
            match (l.accepting, room) {
                (false, true) if self.bucket.ready(now) => {
                    if self.bucket.limited() {
                        self.ring.accept_one(l.fd.as_raw_fd(), which);
                    } else {
                        self.ring.accept(l.fd.as_raw_fd(), which);
                    }
                    l.accepting = true;
                }
                (true, false) => {
                    self.ring.cancel_accept(which);
                    l.accepting = false;
                }
                _ => {}
            }
        }
    }

    /// Stops accepting on every listener (they stay open).
    fn stop_accepting(&mut self) {
        for (which, l) in self.listeners.iter_mut().enumerate() {
            if l.accepting {
                self.ring.cancel_accept(which);
                l.accepting = false;
            }
        }
    }

    /// Polls every connection that became ready, and handles cross-shard messages.
    pub(crate) fn run_ready(&mut self) {
        let now = Instant::now();
        for _round in 0..64 {
            self.on_completions();
            let mut ready = std::mem::take(&mut self.ready);
            wake::take_ready(&mut ready);
            for &idx in &ready {
                self.drive(idx, now);
            }
            let handled = self.handle_inbox(now);
            let idle = ready.is_empty() && handled == 0;
            self.ready = ready;
            if idle {
                self.start_waiting(now);
                self.submit();
                return;
            }
            self.submit();
        }
        // Still busy: let other tasks (timers, agents, the mesh) run, then continue.
        wake::wake_driver();
    }

    /// Hands the ring's queued operations to the kernel.
    pub(crate) fn submit(&mut self) {
        if self.ring.submit().is_err() {
            // Nothing is lost: what the kernel did not take goes with the next submission (the
            // driver runs at least every timer tick).
            self.metrics.error(ErrorKind::Io);
        }
        if self.ring.has_held() {
            // Completions taken to let the submission through raise no eventfd signal.
            wake::wake_driver();
        }
    }

    /// One step of one connection: input, events, output, timer. A panic in it is caught,
    /// counted, and closes that connection only.
    pub(super) fn drive(&mut self, idx: usize, now: Instant) {
        if !self.conns.contains(idx) {
            return; // a stale wake for a slot since freed
        }
        if self.conns[idx].handing {
            return; // paused for an upgrade's handoff
        }
        self.contained(Site::Drive, |s| {
            s.blame(idx);
            s.drive_inner(idx, now);
        });
    }

    pub(super) fn drive_inner(&mut self, idx: usize, now: Instant) {
        if self.stalled.contains_key(&idx) {
            // Its events wait for room: retry them, and read the socket only once they went.
            self.after_input(idx, now);
            if self.conns.contains(idx) && !self.stalled.contains_key(&idx) {
                wake::notify(idx);
            }
            return;
        }
        if self.draining && self.conns[idx].registered {
            // An upgrade hands the sessions over (the agent links close): no new input from
            // established sessions, which would find no agent (handshakes go on, and a session
            // established meanwhile is handed out from the next tick), but what the agents
            // answer (acks) still goes out.
            self.after_input(idx, now);
            return;
        }
        let conn = &mut self.conns[idx];
        let outcome = conn.read_step(
            now,
            &mut self.read_buf,
            &mut self.plain_buf,
            self.ctx.keep_key_schedule,
            &mut self.metrics,
        );
        match outcome {
            IoOutcome::Dead(kind) => {
                if let Some(k) = kind {
                    self.metrics.error(k);
                }
                self.remove(idx);
                return;
            }
            IoOutcome::More => wake::notify(idx),
            _ => {}
        }
        self.after_input(idx, now);
    }

    /// Handles the session's events, then writes its output and re-arms its timer.
    pub(super) fn after_input(&mut self, idx: usize, now: Instant) {
        if self.conns.get(idx).is_some_and(|c| c.handing) {
            return; // paused for an upgrade's handoff: its state is being copied out
        }
        // Handling an event can raise more (authentication closes a session): loop until
        // the session has nothing more to say.
        let mut events = std::mem::take(&mut self.events);
        let mut moved = false;
        let was_stalled = self.stalled.contains_key(&idx);
        'outer: while self.conns.contains(idx) {
            if let Some(held) = self.stalled.remove(&idx) {
                events.extend(held);
            } else {
                while let Some(e) = self.conns[idx].session.poll_event() {
                    events.push(e);
                }
            }
            if events.is_empty() {
                break;
            }
            let mut pending = events.drain(..);
            while let Some(e) = pending.next() {
                if !self.conns.contains(idx) {
                    break 'outer;
                }
                match self.on_event(idx, e, now) {
                    Step::Done => {}
                    Step::Moved => {
                        moved = true;
                        break 'outer;
                    }
                    Step::Wait(e) => {
                        let mut held = VecDeque::with_capacity(1 + pending.len());
                        held.push_back(e);
                        held.extend(pending);
                        self.stalled.insert(idx, held);
                        if !was_stalled {
                            self.metrics.pushback_device_reads += 1;
                        }
                        break 'outer;
                    }
                }
            }
        }
        events.clear();
        self.events = events;
        if moved || !self.conns.contains(idx) {
            return;
        }
        let conn = &mut self.conns[idx];
        match conn.write_step(&mut self.scratch, &mut self.metrics) {
            IoOutcome::Dead(kind) => {
                if let Some(k) = kind {
                    self.metrics.error(k);
                }
                self.remove(idx);
                return;
            }
            IoOutcome::Blocked if !conn.writing => {
                conn.writing = true;
                self.ring
                    .watch_write(conn.fd.as_raw_fd(), idx, conn.generation);
            }
            _ => {}
        }
        let conn = &mut self.conns[idx];
        if conn.closing && conn.flushed() {
            self.remove(idx);
            return;
        }
        self.arm(idx);
    }

    /// Makes sure the wheel holds the connection's earliest deadline.
    pub(super) fn arm(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        if conn.handing {
            return;
        }
        let want = if conn.closing {
            // A closing connection gets a short grace to flush, then is dropped.
            Some(Instant::now() + std::time::Duration::from_secs(2))
        } else {
            conn.session.poll_timeout()
        };
        match (want, conn.armed) {
            (Some(w), Some((at, _))) if w >= at => {} // fires earlier, re-armed then
            (Some(w), _) => {
                let id = self.wheel.insert(w, (idx, conn.generation));
                conn.armed = Some((w, id));
            }
            (None, _) => {}
        }
    }

    /// Expires deadlines (called by the timer task).
    pub(crate) fn tick(&mut self, now: Instant, expired: &mut Vec<(usize, u32)>) {
        self.admit(now);
        self.guard.sweep(now);
        if let Some(deadline) = now.checked_sub(self.max_wait()) {
            for _ in 0..self.guard.expire_waiting(deadline) {
                self.metrics.error(ErrorKind::Timeout);
            }
        }
        self.metrics.handshakes_in_flight = self.guard.in_flight() as u64;
        self.metrics.handshakes_waiting = self.guard.queued() as u64;
        self.metrics.guard_untracked = self.guard.untracked;
        let ring = self.ring.stats();
        self.metrics.ring_busy_retries = ring.busy_retries;
        self.metrics.ring_deferred = ring.deferred;
        self.metrics.ring_backlog = self.ring.backlog() as u64;
        self.metrics.devices_waiting = self.stalled.len() as u64;
        self.metrics.mesh_queued = self.mesh_out.queued() as u64;
        expired.clear();
        self.wheel.expire(now, expired);
        for &(idx, generation) in expired.iter() {
            let Some(conn) = self.conns.get_mut(idx) else {
                continue;
            };
            if conn.generation != generation {
                continue;
            }
            conn.armed = None;
            if conn.closing {
                self.remove(idx);
                continue;
            }
            self.contained(Site::Timer, |s| {
                s.blame(idx);
                contain::inject(Site::Timer, s.conns[idx].session.device());
                s.conns[idx].session.handle_timeout(now);
                s.after_input(idx, now);
            });
        }
    }

    /// Hands a connection to the device's home shard (once per connection, after `Hello`).
    pub(super) fn move_to(&mut self, idx: usize, home: usize) {
        // The watch is removed from our ring first; the descriptor itself travels.
        let conn = self.remove_quietly(idx);
        self.metrics.sessions_moved_out += 1;
        self.route(
            home,
            ShardMsg::Adopt(Box::new(Moved {
                fd: conn.fd,
                tls: conn.tls,
                session: conn.session,
                partial: conn.partial,
                out: conn.out,
                tls_done: conn.tls_done,
                cert: conn.cert,
            })),
        );
    }

    pub(super) fn adopt(&mut self, m: Moved, now: Instant) {
        self.metrics.sessions_moved_in += 1;
        let device = m.session.pending_device();
        let idx = self.insert(m.fd, m.tls, m.session, m.out, m.tls_done, m.cert);
        contain::inject(Site::Adopt, device);
        if !self.open_carried(idx, m.partial, now) {
            return;
        }
        if let Some(device) = device {
            self.authenticate(idx, device, now);
            self.after_input(idx, now);
        }
    }

    /// Processes what the connection's previous owner read but TLS had not consumed, before
    /// the socket is read again (the device may have sent everything already: no new
    /// readiness). False if that ended the connection (it is removed).
    pub(super) fn open_carried(&mut self, idx: usize, partial: Vec<u8>, now: Instant) -> bool {
        let conn = &mut self.conns[idx];
        conn.partial = partial;
        if let IoOutcome::Dead(kind) = conn.open_carried(
            now,
            &mut self.plain_buf,
            self.ctx.keep_key_schedule,
            &mut self.metrics,
        ) {
            if let Some(k) = kind {
                self.metrics.error(k);
            }
            self.remove(idx);
            return false;
        }
        true
    }

    /// Drops a connection.
    pub(super) fn remove(&mut self, idx: usize) {
        // Events held for room: the device's acks still answer their agents' sends (its own
        // messages held were never acknowledged to it, so it still has them).
        for e in self.stalled.remove(&idx).unwrap_or_default() {
            if let ServerEvent::Delivered { tag, .. } = e {
                if let Some((agent, tag)) = self.pending_sends.remove(&tag) {
                    self.send_result(agent, tag, SendStatus::Delivered);
                }
            }
        }
        self.unregister(idx);
        let mut conn = self.remove_quietly(idx);
        if !conn.closing {
            conn.tls.close_notify(&mut conn.out);
            let _ = conn.flush(&mut self.metrics);
        }
        // The ring's poll was removed in `remove_quietly`; the descriptor closes on drop.
    }

    pub(super) fn remove_quietly(&mut self, idx: usize) -> Conn {
        self.stalled.remove(&idx);
        let conn = self.conns.remove(idx);
        // A pending poll would keep the socket open after close. The removal goes to the
        // kernel now, before the descriptor is closed or handed to another shard (which may
        // close it at once): queued, it left the socket open until this ring's next submit,
        // and a watch queued but not yet submitted would arm on a closed descriptor number.
        self.ring.unwatch(idx, conn.generation, conn.writing);
        self.submit();
        if let Some((_, id)) = conn.armed {
            self.wheel.cancel(id);
        }
        self.guard.done(idx, conn.generation);
        self.metrics.connections_open -= 1;
        conn
    }

    /// Starts a graceful shutdown: every session gets `Goodbye{Shutdown}` with a spread
    /// `retry_after`, so the fleet does not come back all at once.
    pub(crate) fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        self.stop_accepting();
        self.listeners.clear();
        let idxs: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for idx in idxs {
            self.conns[idx]
                .session
                .close(GoodbyeReason::Shutdown, retry_spread());
            wake::notify(idx);
        }
    }

    /// An upgrade took the listeners: stop accepting (the listening socket stays open, the new
    /// process accepts on it), hand every session that can move to the upgrade thread (see
    /// `handoff.rs`; the rest are told to reconnect within `window`, `Goodbye{upgrade}` with
    /// its `retry_after` spread over the window), and close the agent links (agents re-attach
    /// to the new process).
    pub(crate) fn begin_drain(
        &mut self,
        out: &crossbeam::channel::Sender<super::handoff::HandedOut>,
        now: Instant,
    ) {
        self.draining = true;
        self.stop_accepting();
        self.handed_out = Some(out.clone());
        // First a short quiet: nothing more is read from the devices, while the agents answer
        // what they were given (their acks still reach the devices), so that no message is in
        // flight to an agent link when it closes. Then the hand-out (`tick`).
        self.quiesce = Some(now + self.ctx.upgrade_quiet);
    }

    /// The drain's second step, once the quiet is over (or every agent has answered): hand
    /// out the sessions and close the agent links (agents re-attach to the new process).
    pub(crate) fn end_quiesce(&mut self, now: Instant) {
        let answered = self
            .conns
            .iter()
            .all(|(_, c)| !c.registered || !c.session.awaiting_ack_received());
        match self.quiesce {
            Some(until) if answered || now >= until => {}
            _ => return,
        }
        self.quiesce = None;
        if let Some(out) = self.handed_out.clone() {
            self.hand_out(self.ctx.upgrade_window, &out, now);
        }
        for out in self.local_agents.values() {
            out.close();
        }
    }

    /// The upgrade failed after the drain began: accept again (the next `admit` re-arms).
    pub(crate) fn end_drain(&mut self) {
        self.draining = false;
        self.quiesce = None;
        self.handed_out = None;
        self.late.clear();
        self.admit(Instant::now());
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}
