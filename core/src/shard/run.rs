//! A shard's tasks: the driver, the accept loops, the mesh receivers and drain tasks, and
//! the timer.

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::TcpListener;

use super::contain::{self, Site};
use super::route::ShardMsg;
use super::{ServerCtx, ShardHandle};
use super::{Shard, agent, wake};
use tether_net::ring::{Doorbell, Ring};

/// Timer task period: deadlines are coarse (seconds), so 100 ms is plenty.
const TICK: Duration = Duration::from_millis(100);

/// A shard's listening sockets, bound by the server before the shards start (or taken over
/// from the process being upgraded: the very sockets it accepted on, never re-bound).
pub(crate) struct ShardListeners {
    /// The device port (`SO_REUSEPORT`, non-blocking), accepted from through the ring: one
    /// socket, or more when an upgrade came from a process with more shards.
    pub device: Vec<OwnedFd>,
    /// The agent port (`SO_REUSEPORT`), accepted from by glommio; as many.
    pub agent: Vec<OwnedFd>,
}

/// Runs shard `id` until shutdown completes.
pub(crate) async fn run_shard(
    id: usize,
    nshards: usize,
    ctx: Arc<ServerCtx>,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    handle: ShardHandle,
    listeners: ShardListeners,
) -> Result<(), String> {
    let r = serve_shard(id, nshards, ctx, mesh, &handle, listeners).await;
    if let Err(msg) = &r {
        let _ = handle.ready.send(Err(msg.clone()));
    }
    let _ = handle.done.send(r.clone());
    r
}

async fn serve_shard(
    id: usize,
    nshards: usize,
    ctx: Arc<ServerCtx>,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    handle: &ShardHandle,
    listeners: ShardListeners,
) -> Result<(), String> {
    let (senders, mut receivers) = mesh
        .join()
        .await
        .map_err(|_| format!("shard {id}: joining the channel mesh failed"))?;
    let local = listeners
        .device
        .first()
        .and_then(|l| socket2::SockRef::from(l).local_addr().ok())
        .and_then(|a| a.as_socket());
    let ring = Ring::new(4096).map_err(|e| format!("shard {id}: io_uring setup failed: {e}"))?;
    let doorbell = Doorbell::new(&ring).map_err(|e| format!("shard {id}: eventfd: {e}"))?;
    let agent_listeners: Vec<Rc<TcpListener>> = listeners
        .agent
        .into_iter()
        // SAFETY: each descriptor is a bound, listening TCP socket this shard now owns alone.
        .map(|fd| Rc::new(unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) }))
        .collect();
    let shard = Rc::new(RefCell::new(Shard::new(
        id,
        nshards,
        ctx.clone(),
        ring,
        listeners.device,
    )));
    let senders = Rc::new(senders);
    shard.borrow_mut().senders = Some(senders.clone());
    shard.borrow_mut().admit(Instant::now());
    shard.borrow_mut().submit();
    let _ = handle.ready.send(Ok(local));

    // Park on the readiness ring's eventfd (glommio's file API reads it through glommio's own
    // ring); each wake-up lets the driver drain the completions.
    glommio::spawn_local(async move {
        loop {
            if doorbell.wait().await.is_err() {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            wake::wake_driver();
        }
    })
    .detach();

    // One receiver per peer: takes from the channel while that peer's inbox has room (else
    // the channel fills and the peer's outbox pushes back on its producers).
    for (peer, rx) in receivers.streams() {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            loop {
                poll_fn(|cx| {
                    if shard.borrow_mut().inbox_room(peer, cx.waker()) {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
                .await;
                let Some(m) = rx.recv().await else { break };
                shard.borrow_mut().inbox[peer].push_back(m);
                wake::wake_driver();
            }
        })
        .detach();
    }
    // One drain task per peer: moves its outbox into the channel, in order, waiting for room.
    for peer in (0..nshards).filter(|&p| p != id) {
        let shard = shard.clone();
        let senders = senders.clone();
        glommio::spawn_local(async move {
            loop {
                let m = poll_fn(|cx| shard.borrow_mut().mesh_out.poll_next(peer, cx)).await;
                // An error: the peer is gone (shutting down); the message goes with it.
                let _ = senders.send_to(peer, m).await;
                let mut s = shard.borrow_mut();
                if s.mesh_out.sent(peer) {
                    s.room_returned();
                }
            }
        })
        .detach();
    }

    let agents_accepting = accept_agents(&shard, &agent_listeners);
    // The timer task: expire deadlines, apply deploys, registry changes and reloaded TLS
    // configs, answer registry requests, publish the counters and the rollout state, watch
    // for shutdown.
    let published = handle.metrics.clone();
    let deploys = handle.deploys.clone();
    let rollout = handle.rollout.clone();
    let registry = handle.registry.clone();
    let tls = handle.tls.clone();
    let handed_out = handle.handed_out.clone();
    let handoff = handle.handoff.clone();
    let timer = glommio::spawn_local({
        let shard = shard.clone();
        let ctx = ctx.clone();
        async move {
            let mut expired = Vec::new();
            let mut shutdown_at: Option<Instant> = None;
            let mut accepts = Some(agents_accepting);
            let mut draining = false;
            loop {
                glommio::timer::sleep(TICK).await;
                let now = Instant::now();
                let mut s = shard.borrow_mut();
                // Each connection's deadline is contained in `tick`; this catches the rest
                // of it (admission, the guard's sweep), so a panic there skips one tick.
                if contain::run(|| s.tick(now, &mut expired)).is_none() {
                    s.count_panic(Site::Timer);
                }
                while let Ok(d) = deploys.try_recv() {
                    s.on_deployed(&d);
                }
                while let Ok(m) = registry.try_recv() {
                    s.contained(Site::Registry, |s| s.on_registry(m));
                }
                // After this tick's deploys and registry changes, so a scrape that waits for
                // a newer snapshot sees them. A copy into this shard's own slot (skipped if a
                // scrape holds it right now): the admin endpoint reads these, never asks.
                s.fill_code_metrics();
                published.publish(|m| m.clone_from(&s.metrics));
                let status = s.rollout_status();
                rollout.publish(|r| *r = status);
                if s.agent_grace.is_some_and(|until| now >= until) {
                    // Messages still waiting for an agent are refused now (the device resends).
                    s.agent_grace = None;
                    s.room_returned();
                }
                if draining {
                    s.end_quiesce(now);
                    if s.quiesce.is_none() {
                        s.hand_out_late(now);
                    }
                }
                while let Ok(cmd) = handoff.try_recv() {
                    s.contained(Site::Adopt, |s| s.on_handoff(cmd, now));
                }
                while let Ok(swap) = tls.try_recv() {
                    // Handshakes accepted from now on use it; open connections keep theirs.
                    s.tls = swap.config;
                    let _ = swap.applied.send(());
                }
                // An upgrade hands the listeners to a new process: stop accepting and send
                // every session to it; if the upgrade fails after that, accept again.
                let drain = ctx.draining.load(Ordering::Relaxed);
                if drain != draining && shutdown_at.is_none() {
                    draining = drain;
                    if drain {
                        drop(accepts.take());
                        s.begin_drain(&handed_out, now);
                    } else {
                        s.end_drain();
                        accepts = Some(accept_agents(&shard, &agent_listeners));
                    }
                }
                if shutdown_at.is_none() && ctx.shutdown.load(Ordering::Relaxed) {
                    // Stop accepting, say goodbye to everyone, then wait for the flush.
                    drop(accepts.take());
                    s.begin_shutdown();
                    shutdown_at = Some(now + ctx.shutdown_grace);
                }
                if let Some(at) = shutdown_at {
                    if s.is_empty() || now >= at {
                        return;
                    }
                }
                drop(s);
                wake::wake_driver();
            }
        }
    });

    // The driver: polls ready connections until the timer task ends the shard.
    let driver = poll_fn(|cx| {
        wake::set_driver(cx.waker());
        shard.borrow_mut().run_ready();
        Poll::<()>::Pending
    });
    futures_lite::future::or(driver, timer).await;
    Ok(())
}

/// The agent accept loops, one per listener: each attached agent is served by a task of its
/// own. Dropping the returned tasks stops accepting (the listeners stay open).
fn accept_agents(
    shard: &Rc<RefCell<Shard>>,
    listeners: &[Rc<TcpListener>],
) -> Vec<glommio::Task<()>> {
    listeners
        .iter()
        .map(|listener| {
            let shard = shard.clone();
            let listener = listener.clone();
            glommio::spawn_local(async move {
                loop {
                    match listener.accept().await {
                        Ok(s) => {
                            glommio::spawn_local(agent::serve_agent(shard.clone(), s)).detach();
                        }
                        Err(_) => glommio::timer::sleep(Duration::from_millis(10)).await,
                    }
                }
            })
        })
        .collect()
}

/// A shard's share of the accept rate (`--accept-rate` is per process): one token per accepted
/// connection, `rate` a second, a burst of one second's worth. `rate == 0` means unlimited.
pub(crate) struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: u32) -> Self {
        TokenBucket {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let burst = self.rate.max(1.0);
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(burst);
        self.last = now;
    }

    /// Whether a token is available now.
    pub(crate) fn ready(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Whether there is a rate to keep.
    pub(crate) fn limited(&self) -> bool {
        self.rate > 0.0
    }

    /// Spends the token of one accepted connection. A connection the kernel handed over
    /// without a token (an accept that raced its cancellation) is paid for from the next
    /// refill. Returns whether a token is left.
    pub(crate) fn spend(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        self.refill(now);
        self.tokens -= 1.0;
        self.tokens >= 1.0
    }
}
