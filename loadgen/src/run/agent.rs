//! A simulated agent on the agent link (plain TCP, or TLS with `server.agent_tls`; the
//! protocol's frame codec): delivers device→agent latencies, echoes round trips back to their
//! device, and sends agent→device messages on an open-loop timetable over its share of the
//! devices.

use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use glommio::net::TcpStream;
use tether_protocol::codec::{DEFAULT_AGENT_MAX_FRAME, FrameDecoder};
use tether_protocol::message::SendStatus;
use tether_protocol::{AgentMessage, PROTOCOL_VERSION};

use super::device::TOPIC;
use super::net::{kind_of, sleep_until, until};
use super::shard::ShardCtx;
use super::stamp::{self, Kind};
use crate::stats::{Metric, OpenLoopSchedule};

enum Wake {
    Read(io::Result<usize>),
    Timer,
    Stop,
}

/// Runs agent `agent` (shard-local `slot`) until the end of the run. A link the server closes
/// after its welcome (an upgrade closes agent links: agents attach again, to the new process)
/// is attached again while the run lasts, counted (`agent_reattaches`), not an error.
pub async fn run(ctx: Rc<ShardCtx>, slot: usize, agent: usize) {
    let sh = ctx.shared.clone();
    // Bounded: at most this many re-attaches, and none after the run's end.
    for _ in 0..100 {
        match attach(&ctx, slot, agent).await {
            Ok(()) => return,
            Err(kind) => {
                if Instant::now() >= sh.timeline.end || ctx.stop.fired() {
                    return;
                }
                ctx.stats.borrow_mut().counters.agent_reattaches += 1;
                if ctx.stats.borrow().counters.agent_reattaches > 50 {
                    return ctx.error(kind);
                }
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// One attach: connect (TLS if asked), then the link. `Err` if the server closed the link
/// after its welcome; every other failure is counted here and ends the agent (`Ok`).
async fn attach(ctx: &Rc<ShardCtx>, slot: usize, agent: usize) -> Result<(), &'static str> {
    let sh = ctx.shared.clone();
    let Some(&addr) = sh.agent_targets.get(agent % sh.agent_targets.len().max(1)) else {
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = match until(deadline, TcpStream::connect(addr)).await {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            ctx.error(&kind_of(&io::Error::from(e), "agent_connect"));
            return Ok(());
        }
        None => {
            ctx.error("agent_connect_timeout");
            return Ok(());
        }
    };
    let _ = stream.set_nodelay(true);
    let Some(config) = sh.agent_tls.clone() else {
        return link(ctx.clone(), slot, agent, stream, deadline).await;
    };
    let connector = futures_rustls::TlsConnector::from(config);
    match until(deadline, connector.connect(sh.server_name.clone(), stream)).await {
        Some(Ok(tls)) => link(ctx.clone(), slot, agent, tls, deadline).await,
        Some(Err(e)) => {
            ctx.error(&kind_of(&e, "agent_tls"));
            Ok(())
        }
        None => {
            ctx.error("agent_tls_timeout");
            Ok(())
        }
    }
}

/// The agent protocol over a connected stream (plain or TLS), until the end of the run; `Err`
/// if the server closed it after the welcome.
async fn link<S>(
    ctx: Rc<ShardCtx>,
    slot: usize,
    agent: usize,
    mut stream: S,
    deadline: Instant,
) -> Result<(), &'static str>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let sh = ctx.shared.clone();
    let tl = sh.timeline;
    let m = &sh.campaign.messages;
    let agents = m.agents.max(1) as usize;
    let mut out = BytesMut::new();
    let _ = AgentMessage::AgentHello {
        version: PROTOCOL_VERSION,
        token: Bytes::from(sh.agent_token.clone()),
        name: Bytes::from(format!("loadgen-{agent}")),
    }
    .encode(&mut out);
    let mut decoder = FrameDecoder::new(DEFAULT_AGENT_MAX_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    if let Err(e) = write_out(&mut stream, &mut out).await {
        ctx.error(&kind_of(&e, "agent_write"));
        return Ok(());
    }
    // Wait for AgentWelcome (bounded by the deadline).
    let welcomed = until(deadline, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Err("agent_closed_before_welcome"),
                Ok(n) => decoder.push(&buf[..n]),
            }
            while let Ok(Some(f)) = decoder.next_frame() {
                match AgentMessage::decode(f) {
                    Ok(AgentMessage::AgentWelcome { .. }) => return Ok(()),
                    Ok(AgentMessage::Error { .. }) => return Err("agent_rejected"),
                    _ => {}
                }
            }
        }
    })
    .await;
    match welcomed {
        Some(Ok(())) => {}
        Some(Err(kind)) => {
            ctx.error(kind);
            return Ok(());
        }
        None => {
            ctx.error("agent_welcome_timeout");
            return Ok(());
        }
    }
    // This agent's share of agent→device traffic: devices agent, agent + agents, ...
    // Several independent nodes: an agent reaches only its own node's devices, so agent `a`
    // serves the devices whose home is node `a mod nodes` (validation keeps `random` out).
    let nodes = sh.agent_targets.len().max(1);
    let share: Vec<usize> = if nodes == 1 {
        (agent..sh.devices.len()).step_by(agents).collect()
    } else {
        let (node, peers) = (
            agent % nodes,
            agents / nodes + usize::from(agent % nodes < agents % nodes),
        );
        (0..sh.devices.len())
            .filter(|&d| sh.home_target(d) == Some(node))
            .skip(agent / nodes)
            .step_by(peers.max(1))
            .collect()
    };
    let mut a2d = OpenLoopSchedule::with_phase(
        m.agent_to_device_per_sec * share.len() as f64,
        tl.epoch.0,
        0.5,
    );
    // A link attached again starts at the timetable's present: sends whose time passed while
    // no link was up are not made (counted as offline).
    while a2d.due(Instant::now()).is_some() {
        ctx.sends_offline.set(ctx.sends_offline.get() + 1);
    }
    let mut cursor = 0usize;
    let mut tag = 0u64;
    let len = m.payload_bytes as usize;
    // Bounded: the loop ends at `tl.end`, on stop, or when the link fails.
    loop {
        if !out.is_empty() {
            if let Err(e) = write_out(&mut stream, &mut out).await {
                // The server closed the link (its read side first): attach again.
                let _ = e;
                return Err("agent_write");
            }
        }
        let wake_at = a2d
            .peek()
            .filter(|t| *t < tl.sends_end)
            .unwrap_or(tl.end)
            .min(tl.end);
        let wake = future::or(
            future::or(async { Wake::Read(stream.read(&mut buf).await) }, async {
                sleep_until(wake_at).await;
                Wake::Timer
            }),
            async {
                ctx.stop.wait(slot).await;
                Wake::Stop
            },
        )
        .await;
        let now = Instant::now();
        match wake {
            Wake::Read(Ok(0)) => return Err("agent_eof"),
            Wake::Read(Err(_)) => return Err("agent_read"),
            Wake::Read(Ok(n)) => {
                decoder.push(&buf[..n]);
                loop {
                    let frame = match decoder.next_frame() {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(_) => {
                            ctx.error("agent_bad_frame");
                            return Ok(());
                        }
                    };
                    match AgentMessage::decode(frame) {
                        Ok(msg) => on_message(&ctx, msg, now, &mut out, &mut tag),
                        Err(_) => {
                            ctx.error("agent_bad_message");
                            return Ok(());
                        }
                    }
                }
            }
            Wake::Timer => {
                if now >= tl.end {
                    return Ok(());
                }
                let until_t = now.min(tl.sends_end);
                // Bounded by the timetable up to now.
                while let Some(at) = a2d.due(until_t) {
                    if at >= tl.sends_end || share.is_empty() {
                        break;
                    }
                    let index = share[cursor % share.len()];
                    cursor += 1;
                    if !sh.online[index].load(Ordering::Relaxed) {
                        ctx.sends_offline.set(ctx.sends_offline.get() + 1);
                        continue;
                    }
                    tag += 1;
                    let _ = AgentMessage::Send {
                        device: sh.devices[index].id,
                        tag,
                        topic: Bytes::from_static(TOPIC),
                        payload: stamp::payload(Kind::AgentToDevice, tl.epoch.micros(at), len),
                    }
                    .encode(&mut out);
                    ctx.stats.borrow_mut().counters.msgs_sent += 1;
                }
            }
            Wake::Stop => return Ok(()),
        }
    }
}

/// Writes and flushes what `out` holds (a TLS stream sends its records on flush), then empties
/// it.
async fn write_out(stream: &mut (impl AsyncWrite + Unpin), out: &mut BytesMut) -> io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await?;
    out.clear();
    Ok(())
}

fn on_message(ctx: &ShardCtx, msg: AgentMessage, now: Instant, out: &mut BytesMut, tag: &mut u64) {
    let epoch = ctx.shared.timeline.epoch;
    match msg {
        AgentMessage::Deliver {
            device,
            seq,
            topic,
            payload,
        } => {
            let _ = AgentMessage::DeliverAck { device, seq }.encode(out);
            let mut st = ctx.stats.borrow_mut();
            st.counters.msgs_recv += 1;
            st.counters.agent_received += 1;
            match stamp::read(&payload) {
                Some((Kind::DeviceToAgent, us)) => {
                    st.hist
                        .record_since(Metric::DeviceToAgent, epoch.instant(us), now);
                }
                Some((Kind::RoundTripOut, _)) => {
                    *tag += 1;
                    let _ = AgentMessage::Send {
                        device,
                        tag: *tag,
                        topic,
                        payload: stamp::rekind(&payload, Kind::RoundTripBack),
                    }
                    .encode(out);
                    st.counters.msgs_sent += 1;
                }
                _ => {
                    drop(st);
                    ctx.error("agent_unexpected_payload");
                }
            }
        }
        AgentMessage::SendResult { status, .. } => match status {
            SendStatus::Delivered => ctx.stats.borrow_mut().counters.agent_delivered += 1,
            SendStatus::Offline => ctx.sends_offline.set(ctx.sends_offline.get() + 1),
            SendStatus::QueueFull => ctx.error("agent_send_queue_full"),
            SendStatus::UnknownDevice => ctx.error("agent_send_unknown_device"),
            SendStatus::TooLarge => ctx.error("agent_send_too_large"),
            _ => ctx.error("agent_send_other"),
        },
        AgentMessage::Presence { .. }
        | AgentMessage::PresenceSnapshot { .. }
        | AgentMessage::AgentWelcome { .. } => {}
        AgentMessage::Error { .. } => ctx.error("agent_error_frame"),
        _ => ctx.error("agent_unexpected_message"),
    }
}
