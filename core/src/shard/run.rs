//! A shard's tasks: the driver, the accept loops, the mesh receivers and the timer.

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::TcpListener;

use super::mesh::ShardMsg;
use super::{Shard, agent, wake};
use crate::metrics::ErrorKind;
use crate::server::{ServerCtx, ShardHandle};

/// Timer task period: deadlines are coarse (seconds), so 100 ms is plenty.
const TICK: Duration = Duration::from_millis(100);

/// Runs shard `id` until shutdown completes.
pub(crate) async fn run_shard(
    id: usize,
    nshards: usize,
    ctx: Arc<ServerCtx>,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    handle: ShardHandle,
) -> Result<(), String> {
    let (senders, mut receivers) = mesh
        .join()
        .await
        .map_err(|_| format!("shard {id}: joining the channel mesh failed"))?;
    let device_listener = TcpListener::bind(ctx.listen)
        .map_err(|e| format!("shard {id}: cannot listen on {}: {e}", ctx.listen))?;
    let agent_listener = TcpListener::bind(ctx.agent_listen)
        .map_err(|e| format!("shard {id}: cannot listen on {}: {e}", ctx.agent_listen))?;
    let shard = Rc::new(RefCell::new(Shard::new(id, nshards, ctx.clone())));
    shard.borrow_mut().senders = Some(Rc::new(senders));
    let _ = handle.ready.send(device_listener.local_addr().ok());

    for (_peer, rx) in receivers.streams() {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(m) = rx.recv().await {
                shard.borrow_mut().inbox.push_back(m);
                wake::wake_driver();
            }
        })
        .detach();
    }

    let accept_devices = glommio::spawn_local(accept_devices(shard.clone(), device_listener));
    let accept_agents = glommio::spawn_local({
        let shard = shard.clone();
        async move {
            loop {
                match agent_listener.accept().await {
                    Ok(s) => {
                        glommio::spawn_local(agent::serve_agent(shard.clone(), s)).detach();
                    }
                    Err(_) => glommio::timer::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    });

    // The timer task: expire deadlines, answer stats requests, watch for shutdown.
    let timer = glommio::spawn_local({
        let shard = shard.clone();
        let ctx = ctx.clone();
        async move {
            let mut expired = Vec::new();
            let mut shutdown_at: Option<Instant> = None;
            let mut accepts = Some((accept_devices, accept_agents));
            loop {
                glommio::timer::sleep(TICK).await;
                let now = Instant::now();
                let mut s = shard.borrow_mut();
                s.tick(now, &mut expired);
                while let Ok(d) = handle.deploys.try_recv() {
                    s.on_deployed(&d);
                }
                if !handle.stats.is_empty() {
                    s.fill_code_metrics();
                }
                while let Ok(reply) = handle.stats.try_recv() {
                    let _ = reply.send(s.metrics.clone());
                }
                while let Ok(reply) = handle.rollout.try_recv() {
                    let _ = reply.send(s.rollout_status());
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

async fn accept_devices(shard: Rc<RefCell<Shard>>, listener: TcpListener) {
    let ctx = shard.borrow().ctx.clone();
    let mut bucket = TokenBucket::new(ctx.accept_rate_per_shard);
    loop {
        // Admission control: too many handshakes in flight → leave connections in the
        // kernel's backlog until some finish.
        while shard.borrow().handshaking() >= ctx.max_handshakes_per_shard {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        if let Some(wait) = bucket.take(Instant::now()) {
            glommio::timer::sleep(wait).await;
        }
        match listener.accept().await {
            Ok(stream) => {
                shard.borrow_mut().accept(stream);
                wake::wake_driver();
            }
            Err(e) => {
                // Out of descriptors, or a connection reset before accept: back off briefly.
                shard.borrow_mut().metrics.error(ErrorKind::Io);
                if is_fd_exhaustion(&e) {
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn is_fd_exhaustion(e: &glommio::GlommioError<()>) -> bool {
    let s = e.to_string();
    s.contains("Too many open files") || s.contains("os error 24")
}

/// Accept-rate limiter (per shard). `rate == 0` means unlimited.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        TokenBucket {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    /// Takes a token; returns how long to wait first if there is none.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        if self.rate <= 0.0 {
            return None;
        }
        let burst = self.rate.max(1.0);
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(burst);
        self.last = now;
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}
