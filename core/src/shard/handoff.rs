//! Live session handoff at an upgrade, on a shard: handing established connections out to the
//! process taking over (and taking them back if it fails), and adopting them there.
//!
//! On the old process the drain starts with a short quiet (`begin_drain`, at most 200 ms):
//! nothing more is read from the devices while the agents answer what they were given, so no
//! device message is in flight to an agent link when it closes. Then every established
//! detached-TLS session is *paused* —
//! its ring watches removed (the kernel has them before anything else happens), its timer
//! cancelled, nothing read or written — and its state copied out ([`HandedSession`]: the
//! TLS record state, the protocol session, the ciphertext not yet written, the bytes read
//! but not yet opened) with its socket's descriptor (lent, not duplicated: it stays open while
//! the connection is paused). The connection stays in the table until the upgrade thread says: `Commit` (the new process has it: drop our copy without a
//! FIN or close_notify — the socket lives on in the new process) or `Resume` (it does not:
//! watch the socket again and carry on, or say goodbye). A session that cannot move (still
//! in its handshake, buffered TLS, a cipher whose state cannot leave, events waiting for
//! room) gets `Goodbye{upgrade}` instead, counted. One still in its handshake at the drain is
//! handed out once established (`hand_out_late`, from the timer tick).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use tether_net::detached::DetachedTls;
use tether_protocol::message::GoodbyeReason;
use tether_protocol::server::ServerSession;
use tether_protocol::{CodeVersion, DeviceId};

use super::conn::{CertDevice, TlsConn};
use super::route::Moved;
use super::{Shard, wake};

/// One session's state as it leaves a process (the socket travels beside it).
#[derive(Debug)]
pub(crate) struct HandedSession {
    pub device: u64,
    /// `DetachedTls::to_bytes`: key material, sent only over the local control socket.
    pub tls: Vec<u8>,
    /// The code version the device runs (8 bytes) and `ServerSession::export`.
    pub session: Vec<u8>,
    pub out: Vec<u8>,
    pub partial: Vec<u8>,
}

/// A paused session on its way out, and where it came from.
pub(crate) struct Outgoing {
    pub shard: usize,
    /// Its slot and generation on that shard.
    pub conn: (usize, u32),
    pub state: HandedSession,
    /// Its socket, still owned by the shard: the descriptor stays open (the connection is
    /// paused, nothing closes it) until the shard hears `Commit` or `Resume` for it from the
    /// upgrade thread, which only sends it before that. No duplicate: a process near its
    /// open-file limit could not duplicate every socket at once.
    pub fd: RawFd,
}

/// What a shard tells the upgrade thread during a drain.
pub(crate) enum HandedOut {
    /// A paused session, ready to go.
    Session(Outgoing),
    /// The shard has handed out everything it can; `goodbyes` sessions could not move and
    /// were told to reconnect, for these reasons (each with how many).
    Done {
        shard: usize,
        goodbyes: usize,
        why: Vec<(String, usize)>,
    },
}

/// What the upgrade thread tells a shard.
pub(crate) enum HandoffCmd {
    /// The new process took these: forget them quietly.
    Commit(Vec<(usize, u32)>),
    /// It did not: carry on with them (or, with `goodbye`, close them with `Goodbye{upgrade}`).
    Resume {
        conns: Vec<(usize, u32)>,
        goodbye: bool,
    },
    /// (New process) a session handed over from the old one, for this, its home shard.
    Adopt(Box<Moved>, CodeVersion),
}

/// Rebuilds a handed-over session (new process): its TLS state with `provider`'s AEADs, its
/// protocol session, what was buffered. The connection's home shard adopts it.
pub(crate) fn rebuild(
    s: HandedSession,
    fd: OwnedFd,
    provider: &rustls::crypto::CryptoProvider,
    now: Instant,
) -> Result<(Box<Moved>, CodeVersion), String> {
    let tls = DetachedTls::from_bytes(&s.tls, provider).map_err(|e| format!("TLS state: {e}"))?;
    let (cv, session) = s
        .session
        .split_first_chunk::<8>()
        .ok_or("session state truncated")?;
    let session = ServerSession::import(session, now).map_err(|e| e.to_string())?;
    if session.device() != Some(DeviceId(s.device)) {
        return Err("session state names another device".into());
    }
    Ok((
        Box::new(Moved {
            fd,
            tls: TlsConn::Detached(Box::new(tls)),
            session,
            partial: s.partial,
            out: s.out,
            tls_done: true,
            cert: CertDevice::default(),
        }),
        CodeVersion(u64::from_be_bytes(*cv)),
    ))
}

impl Shard {
    /// The drain's first step: pause and hand out every session that can move; the rest are
    /// told to reconnect within `window`.
    pub(crate) fn hand_out(
        &mut self,
        window: Duration,
        out: &crossbeam::channel::Sender<HandedOut>,
        now: Instant,
    ) {
        let idxs: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        let mut goodbyes = 0;
        let mut why: Vec<(String, usize)> = Vec::new();
        for idx in idxs {
            let c = &self.conns[idx];
            if c.closing || !c.registered {
                // Closing anyway; or still in its handshake (or on its way to its home
                // shard): handed out once established (`hand_out_late`).
                continue;
            }
            if let Err(reason) = self.hand_out_one(idx, window, now) {
                goodbyes += 1;
                match why.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, n)) => *n += 1,
                    None => why.push((reason, 1)),
                }
            }
        }
        let _ = out.send(HandedOut::Done {
            shard: self.id,
            goodbyes,
            why,
        });
    }

    /// Pauses one session and hands it to the upgrade thread, or says why it cannot move
    /// (and tells it `Goodbye{upgrade}`).
    fn hand_out_one(&mut self, idx: usize, window: Duration, now: Instant) -> Result<(), String> {
        let Some(out) = self.handed_out.clone() else {
            return Err("no upgrade in progress".into());
        };
        match self.pause(idx, now) {
            Ok((state, fd)) => {
                let conn = (idx, self.conns[idx].generation);
                let shard = self.id;
                let sent = out.send(HandedOut::Session(Outgoing {
                    shard,
                    conn,
                    state,
                    fd,
                }));
                if sent.is_err() {
                    self.resume(idx, true, window);
                    return Err("the upgrade thread is gone".into());
                }
                Ok(())
            }
            Err(reason) => {
                if !self.conns[idx].closing {
                    self.goodbye_upgrade(idx, window);
                }
                Err(reason)
            }
        }
    }

    /// During a drain, sessions established after the hand-out (their handshake was under
    /// way, or they were on their way here from another shard) are handed out too, from the
    /// timer tick (never in the middle of their events).
    pub(crate) fn hand_out_late(&mut self, now: Instant) {
        let late = std::mem::take(&mut self.late);
        for (idx, generation) in late {
            let live = self
                .conns
                .get(idx)
                .is_some_and(|c| c.generation == generation && !c.handing && c.registered);
            if live {
                // A failure said its goodbye; the count is the shard's `upgrade_goodbyes`.
                let _ = self.hand_out_one(idx, self.ctx.upgrade_window, now);
            }
        }
    }

    /// Pauses connection `idx` and copies its state out, or says why it cannot move.
    fn pause(&mut self, idx: usize, now: Instant) -> Result<(HandedSession, RawFd), String> {
        if self.stalled.contains_key(&idx) {
            return Err("events waiting for room".into());
        }
        let conn = &self.conns[idx];
        if conn.closing || !conn.registered {
            return Err("not an established session".into());
        }
        let TlsConn::Detached(tls) = &conn.tls else {
            return Err("not detached TLS".into());
        };
        let tls = tls.to_bytes().map_err(|e| e.to_string())?;
        let mut session = conn.code_version.0.to_be_bytes().to_vec();
        session.extend(conn.session.export(now).map_err(|e| e.to_string())?);
        let fd = conn.fd.as_raw_fd();
        let device = conn.session.device().map_or(0, |d| d.0);
        let state = HandedSession {
            device,
            tls: tls.to_vec(),
            session,
            out: conn.out.clone(),
            partial: conn.partial.clone(),
        };
        // Nothing more happens on it here: the watches go (to the kernel now, before the
        // socket leaves), and its timer.
        let conn = &mut self.conns[idx];
        conn.handing = true;
        self.ring.unwatch(idx, conn.generation, conn.writing);
        conn.writing = false;
        if let Some((_, id)) = conn.armed.take() {
            self.wheel.cancel(id);
        }
        self.submit();
        Ok((state, fd))
    }

    pub(super) fn goodbye_upgrade(&mut self, idx: usize, window: Duration) {
        self.metrics.upgrade_goodbyes += 1;
        let window_ms = u32::try_from(window.as_millis()).unwrap_or(u32::MAX).max(1);
        let mut b = [0u8; 4];
        crate::fsutil::random_bytes(&mut b);
        self.conns[idx]
            .session
            .close(GoodbyeReason::Upgrade, u32::from_le_bytes(b) % window_ms);
        wake::notify(idx);
    }

    /// Carries on with a paused connection (or closes it with `Goodbye{upgrade}`).
    fn resume(&mut self, idx: usize, goodbye: bool, window: Duration) {
        let conn = &mut self.conns[idx];
        conn.handing = false;
        self.ring
            .watch_read(conn.fd.as_raw_fd(), idx, conn.generation);
        self.metrics.sessions_handed_back += 1;
        if goodbye {
            self.goodbye_upgrade(idx, window);
        }
        self.arm(idx);
        wake::notify(idx);
    }

    /// Applies the upgrade thread's word on handed-out sessions, or adopts a handed-in one.
    pub(crate) fn on_handoff(&mut self, cmd: HandoffCmd, now: Instant) {
        let live = |s: &Shard, (idx, generation): (usize, u32)| {
            s.conns
                .get(idx)
                .is_some_and(|c| c.generation == generation && c.handing)
        };
        match cmd {
            HandoffCmd::Commit(conns) => {
                for c in conns {
                    if live(self, c) {
                        self.forget_handed(c.0);
                    }
                }
            }
            HandoffCmd::Resume { conns, goodbye } => {
                for c in conns {
                    if live(self, c) {
                        self.resume(c.0, goodbye, self.ctx.upgrade_window);
                    }
                }
            }
            HandoffCmd::Adopt(m, code_version) => self.adopt_handed(*m, code_version, now),
        }
    }

    /// The new process has the session: drop our copy of the socket without a FIN or a
    /// close_notify, and the device's registration here without telling agents it left.
    fn forget_handed(&mut self, idx: usize) {
        if let Some(device) = self.conns[idx].session.device() {
            if self.devices.get(&device) == Some(&idx) {
                self.devices.remove(&device);
                self.code_disconnected(device);
            }
        }
        self.conns[idx].registered = false;
        self.metrics.sessions_handed_out += 1;
        // The watches went at the pause; the descriptor closes on drop (the socket stays
        // open: the new process holds it).
        drop(self.remove_quietly(idx));
    }

    /// (New process) continues a session the old process handed over, on its home shard.
    fn adopt_handed(&mut self, m: Moved, code_version: CodeVersion, now: Instant) {
        let Some(device) = m.session.device() else {
            return;
        };
        let idx = self.insert(m.fd, m.tls, m.session, m.out, m.tls_done, m.cert);
        self.metrics.sessions_handed_in += 1;
        if !self.open_carried(idx, m.partial, now) {
            return;
        }
        if let Some(&other) = self.devices.get(&device) {
            if other != idx && self.conns.contains(other) {
                // The device connected here anew meanwhile: the newer session stays.
                self.conns[idx].session.close(GoodbyeReason::Replaced, 0);
                self.after_input(idx, now);
                return;
            }
        }
        let conn = &mut self.conns[idx];
        conn.registered = true;
        conn.code_version = code_version;
        self.devices.insert(device, idx);
        self.offline.remove(&device);
        self.presence(device, true);
        self.code_connected(idx, device, code_version);
        self.after_input(idx, now);
        self.arm(idx);
    }
}
