//! A loadgen shard's driver: one task over a table of simulated devices, the same shape as the
//! server's shards (`tether-core`). Readiness comes from the shard's own io_uring
//! ([`tether_net::ring`]: a multishot `POLL_ADD` per socket, a one-shot `POLLOUT` per connect
//! or blocked write), deadlines from a hashed timing wheel ([`TimerWheel`]), and buffers are
//! the shard's, lent to one device for one step ([`Lent`]).
//!
//! The table is a `Vec`: a shard's devices are fixed for the run, so a device's slot never
//! changes; each connection gets a new generation so that ring completions for a closed one
//! are recognised and ignored.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::future;
use tether_net::ring::{Completion, Doorbell, Kind, Ring};
use tether_net::timer::TimerWheel;

use super::device::{Device, Lent};
use super::net::sleep_until;
use super::shard::ShardCtx;
use super::tls::DeviceTickets;

/// Wheel tick: sends are measured from their scheduled time, so deadlines must be fine.
const TICK: Duration = Duration::from_millis(1);
/// 4096 × 1 ms: a rotation of ~4 s; heartbeats further out wait in their slot for their round.
const SLOTS: usize = 4096;
/// The driver looks at the stop flag at least this often.
const MAX_PARK: Duration = Duration::from_millis(100);
/// Read buffer lent to one device at a time (and as much again for plaintext).
const READ_BUF: usize = 32 * 1024;

/// Set by the doorbell task when the ring posted completions; wakes the parked driver.
#[derive(Default)]
pub(super) struct Bell {
    rung: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Bell {
    fn ring(&self) {
        self.rung.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Waits until rung or `until`, whichever is first.
    pub(super) async fn wait(&self, until: Instant) {
        let rung = poll_fn(|cx| {
            if self.rung.replace(false) {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        });
        future::or(rung, sleep_until(until)).await;
    }
}

/// Spawns the task that rings the returned bell whenever `doorbell`'s ring posted
/// completions. Dropping the task cancels it: keep it as long as the bell is waited on.
pub(super) fn ring_bell(doorbell: Doorbell) -> (Rc<Bell>, glommio::Task<()>) {
    let bell = Rc::new(Bell::default());
    let task = glommio::spawn_local({
        let bell = bell.clone();
        async move {
            // Bounded by its owner's life (the task is cancelled with it).
            loop {
                if doorbell.wait().await.is_err() {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                bell.ring();
            }
        }
    });
    (bell, task)
}

/// What a driver keeps whatever the number of its devices: the readiness ring, its doorbell,
/// the timing wheel and the buffers it lends. Made before the run's plan arrives (see [`super::shard::run_shard`]).
pub(super) struct Kit {
    ring: Ring,
    doorbell: Doorbell,
    wheel: TimerWheel<u32>,
    rx: Box<[u8]>,
    plain: Box<[u8]>,
    frames: BytesMut,
    tx: Vec<u8>,
}

impl Kit {
    /// Sets up the ring and the buffers; the error says what failed.
    pub fn new() -> Result<Kit, String> {
        let ring = Ring::new(4096).map_err(|e| format!("io_uring setup failed: {e}"))?;
        let doorbell = Doorbell::new(&ring).map_err(|e| format!("eventfd: {e}"))?;
        Ok(Kit {
            ring,
            doorbell,
            wheel: TimerWheel::with_config(Instant::now(), TICK, SLOTS),
            rx: vec![0; READ_BUF].into_boxed_slice(),
            plain: vec![0; READ_BUF].into_boxed_slice(),
            frames: BytesMut::with_capacity(16 * 1024),
            tx: Vec::with_capacity(16 * 1024),
        })
    }
}

/// Runs the devices with process indexes `indexes` until each is done (or the shard stops).
pub(super) async fn run(ctx: Rc<ShardCtx>, indexes: Vec<usize>, kit: Kit) {
    let Kit {
        ring,
        doorbell,
        wheel,
        rx,
        plain,
        frames,
        tx,
    } = kit;
    // Dropped (and so cancelled) when the driver returns.
    let (bell, _doorbell) = ring_bell(doorbell);
    let mut d = Driver {
        devices: indexes.iter().map(|&i| Device::new(&ctx, i)).collect(),
        ctx,
        wheel,
        ring,
        rx,
        plain,
        frames,
        tx,
        again: Vec::new(),
        completions: Vec::new(),
        expired: Vec::new(),
        done: 0,
        stopped: false,
    };
    d.wheel.reserve(d.devices.len());
    for slot in 0..d.devices.len() {
        d.with(slot, |dev, l| dev.start(l));
    }
    // Bounded by the timeline: every device is done by `end` (plus its connect deadline), and
    // a stop finishes them all at once.
    while d.done < d.devices.len() {
        let busy = d.step(Instant::now());
        if d.ring.submit().is_err() {
            d.ctx.error("ring_submit");
        }
        if d.done >= d.devices.len() {
            break;
        }
        if busy {
            glommio::yield_if_needed().await;
            continue;
        }
        let now = Instant::now();
        let until = d
            .wheel
            .next_deadline()
            .map_or(now + MAX_PARK, |t| t.min(now + MAX_PARK));
        bell.wait(until).await;
    }
}

struct Driver {
    ctx: Rc<ShardCtx>,
    devices: Vec<Device>,
    wheel: TimerWheel<u32>,
    ring: Ring,
    rx: Box<[u8]>,
    plain: Box<[u8]>,
    frames: BytesMut,
    tx: Vec<u8>,
    again: Vec<u32>,
    completions: Vec<Completion>,
    expired: Vec<u32>,
    done: usize,
    stopped: bool,
}

impl Driver {
    /// Runs `f` on device `slot` with the shard's buffers lent to it.
    fn with(&mut self, slot: usize, f: impl FnOnce(&mut Device, &mut Lent<'_>)) {
        let mut l = Lent {
            ctx: &self.ctx,
            ring: &mut self.ring,
            wheel: &mut self.wheel,
            slot: slot as u32,
            rx: &mut self.rx,
            plain: &mut self.plain,
            frames: &mut self.frames,
            tx: &mut self.tx,
            again: &mut self.again,
            done: &mut self.done,
        };
        let dev = &mut self.devices[slot];
        // TLS tickets are kept per device: a device resumes only its own session.
        let mut ticket = dev.ticket.take();
        DeviceTickets::lend(&mut ticket, || f(dev, &mut l));
        dev.ticket = ticket;
    }

    /// One pass: the stop, ring completions, devices with input left, expired deadlines.
    /// Returns whether there was work (so more may be waiting).
    fn step(&mut self, now: Instant) -> bool {
        if self.ctx.stop.fired() && !self.stopped {
            self.stopped = true;
            for slot in 0..self.devices.len() {
                self.with(slot, |dev, l| dev.stop(now, l));
            }
        }
        let mut cs = std::mem::take(&mut self.completions);
        self.ring.drain(&mut cs);
        let mut busy = !cs.is_empty();
        for c in cs.drain(..) {
            if c.kind == Kind::Control {
                continue;
            }
            let slot = c.idx;
            match self.devices.get(slot) {
                Some(dev) if dev.generation() == c.generation => {}
                _ => continue, // a completion for a connection since closed
            }
            self.with(slot, |dev, l| dev.on_ready(c, now, l));
        }
        self.completions = cs;
        let again = std::mem::take(&mut self.again);
        busy |= !again.is_empty();
        for &slot in &again {
            self.with(slot as usize, |dev, l| dev.on_again(now, l));
        }
        let mut expired = std::mem::take(&mut self.expired);
        expired.clear();
        self.wheel.expire(now, &mut expired);
        busy |= !expired.is_empty();
        for &slot in &expired {
            self.with(slot as usize, |dev, l| dev.on_timer(now, l));
        }
        self.expired = expired;
        busy
    }
}
