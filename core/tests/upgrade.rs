//! `tether upgrade` end to end: a new process takes the listening sockets (no connect refused
//! while it happens), the old one sends its devices there and exits, and messages keep flowing
//! both ways with nothing acknowledged lost; a new binary that fails — at start, holding the
//! listeners, or during the drain — leaves the old process serving.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Agent, Device, KillOnDrop, Server, tls_handshake_to};
use tether_protocol::device::DeviceEvent;
use tether_protocol::message::{GoodbyeReason, SendStatus};
use tether_protocol::{AgentMessage, CloseReason, DeviceId};

const T: Duration = Duration::from_secs(10);
const DEVICES: u64 = 200;

/// The new server's pid, from the upgrade's answer ("upgraded: pid N ...").
fn successor(answer: &str) -> KillOnDrop {
    let pid = answer
        .split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {answer:?}"));
    KillOnDrop(pid)
}

/// Connects in a loop until stopped: every TLS handshake must complete.
fn prober(s: &Server) -> (Arc<AtomicBool>, std::thread::JoinHandle<(u64, Vec<String>)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, tls, flag) = (s.devices, s.tls.clone(), stop.clone());
    let h = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        while !flag.load(Ordering::Relaxed) {
            match tls_handshake_to(addr, &tls) {
                Ok(()) => ok += 1,
                Err(e) => failed.push(e),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (ok, failed)
    });
    (stop, h)
}

/// Agent side of one round: every device in `want` delivers one message, each acknowledged.
fn deliver_all(agent: &mut Agent, want: u64) -> u64 {
    let mut got = 0;
    let end = Instant::now() + T;
    while got < want && Instant::now() < end {
        if let Some(AgentMessage::Deliver { device, seq, .. }) = agent
            .recv_until(Duration::from_millis(200), |m| {
                matches!(m, AgentMessage::Deliver { .. })
            })
        {
            agent.send(&AgentMessage::DeliverAck { device, seq });
            got += 1;
        }
    }
    got
}

/// Acknowledges every delivery the agent link brings until it is quiet for a moment (or
/// closed); whether anything came.
fn ack_some(agent: &mut Agent) -> bool {
    let mut any = false;
    while let Some(m) = agent.recv(Duration::from_millis(20)) {
        any = true;
        if let AgentMessage::Deliver { device, seq, .. } = m {
            agent.send_or_closed(&AgentMessage::DeliverAck { device, seq });
        }
    }
    any
}

fn send(d: &mut Device, text: &'static str) -> Option<tether_protocol::Seq> {
    d.session
        .send(
            Instant::now(),
            Bytes::from_static(b"t"),
            Bytes::from_static(text.as_bytes()),
        )
        .ok()
}

#[test]
fn an_upgrade_moves_every_device_to_the_new_process_and_loses_nothing() {
    let s = Server::start(
        DEVICES,
        &[
            "--shards",
            "2",
            "--upgrade-window-ms",
            "1000",
            "--shutdown-grace-s",
            "3",
        ],
    );
    let mut agent = Agent::attach_welcomed(&s);
    let mut devs: Vec<Device> = (1..=DEVICES).map(|id| s.device(id)).collect();
    for d in &mut devs {
        assert!(d.established());
    }
    // Traffic before: one message each, acknowledged end to end.
    let seqs: Vec<_> = devs
        .iter_mut()
        .map(|d| send(d, "before").unwrap())
        .collect();
    for d in &mut devs {
        d.pump_until(Duration::from_millis(20), |_| false);
    }
    assert_eq!(deliver_all(&mut agent, DEVICES), DEVICES);
    for (d, seq) in devs.iter_mut().zip(&seqs) {
        assert!(d.pump_until(T, |ev| ev.contains(&DeviceEvent::Acked { seq: *seq })));
    }

    let (stop, probe) = prober(&s);
    let (status, answer) = s.upgrade(None);
    assert_eq!(status, 200, "{answer}");
    let _new = successor(&answer);

    // Messages sent now: the old process delivers them to its agent while the link lasts,
    // and whatever is not acknowledged by the time the device leaves is sent again on its
    // next connection — at least once, nothing acknowledged lost.
    let during: Vec<_> = devs.iter_mut().map(|d| send(d, "during")).collect();
    let mut acked = vec![false; devs.len()];
    let mut told = 0;
    for (i, d) in devs.iter_mut().enumerate() {
        // Both at once: the device's goodbye and the old agent link's deliveries.
        let end = Instant::now() + T;
        while Instant::now() < end && !d.closed {
            ack_some(&mut agent);
            if d.pump_until(Duration::from_millis(5), |ev| {
                ev.iter().any(|e| matches!(e, DeviceEvent::Closed(_)))
            }) {
                break;
            }
        }
        acked[i] = during[i].is_some_and(|seq| d.events.contains(&DeviceEvent::Acked { seq }));
        if d.events.iter().any(|e| {
            matches!(
                e,
                DeviceEvent::Closed(CloseReason::PeerGoodbye(GoodbyeReason::Upgrade))
            )
        }) {
            told += 1;
        }
    }
    assert_eq!(told, DEVICES, "every device is told Goodbye{{upgrade}}");
    // The old agent link closes; the agent attaches again (to the new process).
    let end = Instant::now() + T;
    while ack_some(&mut agent) && Instant::now() < end {}
    let mut agent = Agent::attach_welcomed(&s);
    for d in &mut devs {
        d.reconnect(&s);
        assert!(d.established(), "a device reconnects to the new process");
    }
    let end = Instant::now() + T;
    while Instant::now() < end && acked.iter().zip(&during).any(|(a, s)| !a && s.is_some()) {
        ack_some(&mut agent);
        for (i, d) in devs.iter_mut().enumerate() {
            d.pump_until(Duration::from_millis(1), |_| false);
            if let Some(seq) = during[i] {
                acked[i] |= d.events.contains(&DeviceEvent::Acked { seq });
            }
        }
    }
    let sent = during.iter().flatten().count();
    let done = acked.iter().filter(|a| **a).count();
    assert_eq!(
        done, sent,
        "messages sent during the upgrade acknowledged end to end"
    );
    // And the other way: the agent reaches every device through the new process.
    for id in 1..=DEVICES {
        agent.send(&AgentMessage::Send {
            device: DeviceId(id),
            tag: id,
            topic: Bytes::from_static(b"t"),
            payload: Bytes::from_static(b"after"),
        });
    }
    let delivered = AtomicU64::new(0);
    for d in &mut devs {
        d.pump_until(T, |ev| {
            ev.iter().any(|e| matches!(e, DeviceEvent::Message { .. }))
        });
    }
    let end = Instant::now() + T;
    while delivered.load(Ordering::Relaxed) < DEVICES && Instant::now() < end {
        if let Some(AgentMessage::SendResult { status, .. }) = agent
            .recv_until(Duration::from_millis(200), |m| {
                matches!(m, AgentMessage::SendResult { .. })
            })
        {
            assert_eq!(status, SendStatus::Delivered);
            delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
    assert_eq!(delivered.load(Ordering::Relaxed), DEVICES);

    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = probe.join().unwrap();
    assert!(
        failed.is_empty(),
        "connects failed during the upgrade: {failed:?}"
    );
    assert!(ok > 0, "the prober never connected");
    // The old process exits by itself once its devices are gone.
    let mut s = s;
    let end = Instant::now() + T;
    let exited = loop {
        if let Ok(Some(st)) = s.child.try_wait() {
            break Some(st);
        }
        if Instant::now() >= end {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        exited.is_some_and(|st| st.success()),
        "old process: {exited:?}"
    );
    assert_eq!(s.wait_log("upgrade complete", 1, T).len(), 1);
}

/// The connected device keeps its session and a fresh connect works: the server still serves.
fn still_serving(s: &Server, d: &mut Device) {
    let closed = d.pump_until(Duration::from_millis(500), |ev| {
        ev.iter().any(|e| matches!(e, DeviceEvent::Closed(_)))
    });
    assert!(
        !closed && !d.closed,
        "the connected device lost its session: {:?}",
        d.events
    );
    let mut fresh = s.device(2);
    assert!(fresh.established(), "a new device connects");
}

#[test]
fn a_new_binary_that_fails_to_start_leaves_the_old_one_serving() {
    let s = Server::start(4, &["--shards", "2"]);
    let mut agent = Agent::attach_welcomed(&s);
    let mut d = s.device(1);
    assert!(d.established());
    let (status, answer) = s.upgrade(Some(std::path::Path::new("/bin/false")));
    assert_eq!(status, 500, "{answer}");
    assert!(
        answer.contains("exited") && answer.contains("keeps serving"),
        "{answer}"
    );
    assert_eq!(
        s.wait_log("refused, this process keeps serving", 1, T)
            .len(),
        1
    );
    still_serving(&s, &mut d);
    let seq = send(&mut d, "still here").unwrap();
    d.pump_until(Duration::from_millis(20), |_| false);
    assert_eq!(deliver_all(&mut agent, 1), 1, "the agent link is untouched");
    assert!(d.pump_until(T, |ev| ev.contains(&DeviceEvent::Acked { seq })));
}

#[test]
fn a_new_process_that_dies_holding_the_listeners_leaves_the_old_one_serving() {
    let s = Server::start_env(
        4,
        "default",
        &["--shards", "2"],
        &[("TETHER_TEST_UPGRADE_EXIT", "1")],
    );
    let mut d = s.device(1);
    assert!(d.established());
    let (status, answer) = s.upgrade(None);
    assert_eq!(status, 500, "{answer}");
    assert!(answer.contains("before it took the listeners"), "{answer}");
    still_serving(&s, &mut d);
    // The control socket is free for the next attempt.
    assert!(!s.dir.join("upgrade.sock").exists());
}

#[test]
fn a_new_process_killed_during_the_drain_hands_everything_back() {
    let s = Server::start(
        4,
        &[
            "--shards",
            "2",
            "--upgrade-window-ms",
            "4000",
            "--shutdown-grace-s",
            "5",
        ],
    );
    let mut d = s.device(1);
    assert!(d.established());
    let (status, answer) = s.upgrade(None);
    assert_eq!(status, 200, "{answer}");
    drop(successor(&answer)); // kill -9 the new process at once
    assert_eq!(
        s.wait_log("accepts again", 1, T).len(),
        1,
        "{:?}",
        s.log_lines("upgrade")
    );
    // The device told to leave comes back to the old process, and new devices connect.
    d.pump_until(T, |ev| {
        ev.iter().any(|e| matches!(e, DeviceEvent::Closed(_)))
    });
    d.reconnect(&s);
    assert!(d.established(), "the old process accepts again");
    let mut fresh = s.device(3);
    assert!(fresh.established());
    // It is still the same process, and a later upgrade may run.
    let mut s = s;
    assert!(s.child.try_wait().unwrap().is_none());
    let (status, answer) = s.upgrade(None);
    assert_eq!(status, 200, "{answer}");
    let _new = successor(&answer);
}
