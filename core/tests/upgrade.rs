//! `tether upgrade` end to end: a new process takes the listening sockets (no connect refused
//! while it happens), the old one sends its devices there and exits, and messages keep flowing
//! both ways with nothing acknowledged lost; a new binary that fails — at start, holding the
//! listeners, or during the drain — leaves the old process serving.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Agent, Device, KillOnDrop, Server, tls_handshake_to};
use tether_core::client::UpgradeReport;
use tether_protocol::device::DeviceEvent;
use tether_protocol::message::SendStatus;
use tether_protocol::{AgentMessage, DeviceId, Seq};

const T: Duration = Duration::from_secs(10);
const DEVICES: u64 = 200;

/// The upgrade's answer (`UpgradeReport`).
fn report(answer: &str) -> UpgradeReport {
    serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

/// The new server, from the upgrade's answer: killed when the test ends.
fn successor(answer: &str) -> KillOnDrop {
    KillOnDrop(report(answer).new_pid as i32)
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

/// Devices 1..=n, established, their reads waiting at most 1 ms (so many are pumped in turn).
fn established(s: &Server, n: u64) -> Vec<Device> {
    let mut devs: Vec<Device> = (1..=n).map(|id| s.device(id)).collect();
    for d in &mut devs {
        assert!(d.established());
        d.tls
            .sock
            .set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
    }
    devs
}

/// Pumps every device once (their reads wait 1 ms) and acknowledges what reaches the agent;
/// true while no device has lost its connection.
fn round(devs: &mut [Device], agent: &mut Agent) -> bool {
    ack_some(agent);
    for d in devs.iter_mut() {
        d.pump_until(Duration::from_millis(1), |_| false);
    }
    devs.iter().all(|d| !d.closed)
}

/// Pumps the devices and acknowledges at the agent until each device with a seq in `seqs` has
/// it acknowledged, or `within` passes; how many are.
fn until_acked(
    devs: &mut [Device],
    agent: &mut Agent,
    seqs: &[Option<Seq>],
    within: Duration,
) -> usize {
    let acked = |devs: &[Device]| {
        devs.iter()
            .zip(seqs)
            .filter(|(d, s)| s.is_some_and(|seq| d.events.contains(&DeviceEvent::Acked { seq })))
            .count()
    };
    let want = seqs.iter().flatten().count();
    let end = Instant::now() + within;
    while Instant::now() < end && acked(devs) < want {
        round(devs, agent);
    }
    acked(devs)
}

fn closed_events(devs: &[Device]) -> Vec<(usize, DeviceEvent)> {
    devs.iter()
        .enumerate()
        .flat_map(|(i, d)| {
            d.events
                .iter()
                .filter(|e| matches!(e, DeviceEvent::Closed(_)))
                .map(move |e| (i, e.clone()))
        })
        .collect()
}

#[test]
fn an_upgrade_hands_every_session_over_live_and_loses_nothing() {
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
    let mut devs = established(&s, DEVICES);
    // Traffic before: one message each, acknowledged end to end.
    let before: Vec<_> = devs
        .iter_mut()
        .map(|d| send(d, "before").unwrap())
        .collect();
    let before: Vec<_> = before.into_iter().map(Some).collect();
    assert_eq!(
        until_acked(&mut devs, &mut agent, &before, T),
        DEVICES as usize
    );
    let (stop, probe) = prober(&s);
    let (status, answer) = s.upgrade(None);
    assert_eq!(status, 200, "{answer}");
    let _new = successor(&answer);
    let r = report(&answer);
    assert_eq!(
        (
            r.sessions_handed,
            r.sessions_refused,
            r.sessions_told_to_reconnect
        ),
        (DEVICES, 0, 0),
        "{r:?}"
    );

    // Messages sent while the sessions move: the old agent link closes (the agent attaches
    // again, to the new process); what it had not acknowledged the device sends again, and
    // the new process takes the resend. Nothing acknowledged is lost; no device notices.
    let during: Vec<_> = devs
        .iter_mut()
        .map(|d| send(d, "during").unwrap())
        .collect();
    let end = Instant::now() + T;
    while Instant::now() < end && s.log_lines("live in").is_empty() {
        assert!(round(&mut devs, &mut agent), "{:?}", closed_events(&devs));
    }
    let moved = s.wait_log("sessions handed to pid", 1, T);
    assert!(
        moved
            .first()
            .is_some_and(|l| l.contains(&format!(": {DEVICES} sessions handed"))),
        "{moved:?}"
    );
    // The old link is closed by now (the old process closed it when the drain began).
    while ack_some(&mut agent) {}
    let mut agent = Agent::attach_welcomed(&s);
    // Within a resend period (10 s) every message sent during the upgrade is acknowledged.
    let during: Vec<_> = during.into_iter().map(Some).collect();
    let acked = until_acked(&mut devs, &mut agent, &during, Duration::from_secs(25));
    assert_eq!(
        acked, DEVICES as usize,
        "messages sent during the upgrade acknowledged"
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
    let mut delivered = 0;
    let end = Instant::now() + T;
    while delivered < DEVICES && Instant::now() < end {
        for d in devs.iter_mut() {
            d.pump_until(Duration::from_millis(1), |_| false);
        }
        while let Some(m) = agent.recv(Duration::from_millis(5)) {
            if let AgentMessage::SendResult { status, .. } = m {
                assert_eq!(status, SendStatus::Delivered);
                delivered += 1;
            }
        }
    }
    assert_eq!(delivered, DEVICES);
    // No device saw a goodbye or lost its connection: same TCP connection, same TLS session.
    assert_eq!(closed_events(&devs), vec![]);
    assert!(devs.iter().all(|d| !d.closed));

    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = probe.join().unwrap();
    assert!(
        failed.is_empty(),
        "connects failed during the upgrade: {failed:?}"
    );
    assert!(ok > 0, "the prober never connected");
    // The old process exits by itself once its sessions are gone.
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
        &[("TETHER_TEST_UPGRADE_EXIT", "listeners")],
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
fn a_new_process_that_does_not_take_the_listeners_in_time_leaves_the_old_one_serving() {
    let s = Server::start_env(
        4,
        "default",
        &["--shards", "2"],
        &[("TETHER_TEST_UPGRADE_EXIT", "hang:listeners")],
    );
    let mut d = s.device(1);
    assert!(d.established());
    let started = Instant::now();
    let (status, answer) = s.upgrade(None);
    assert_eq!(status, 500, "{answer}");
    assert!(
        answer.contains("did not take the listeners within 20 s"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(40));
    // The hanging process was killed; this one still serves, its device untouched.
    still_serving(&s, &mut d);
    assert!(!s.dir.join("upgrade.sock").exists());
}

/// The new process dies on receiving session batch `die_at` (batches hold 253 sessions):
/// every batch before it was committed (those devices lose their connection with the dead
/// process and reconnect), every session from it on carries on in the old process with its
/// connection intact, and the old process accepts again.
fn killed_mid_handoff(die_at: u32, devices: u64) {
    let s = Server::start_env(
        devices,
        "default",
        &["--shards", "2", "--shutdown-grace-s", "3"],
        &[("TETHER_TEST_UPGRADE_EXIT", &format!("batch:{die_at}"))],
    );
    let mut devs = established(&s, devices);
    let (status, answer) = s.upgrade(None);
    // Refused, with what happened: the new process is gone (the old one killed and reaped it).
    assert_eq!(status, 500, "{answer}");
    assert!(
        answer.contains("exited") && answer.contains("mid-handoff"),
        "{answer}"
    );
    let had_moved = format!("{} sessions had moved", die_at as usize * 253);
    assert!(answer.contains(&had_moved), "{answer}");
    assert_eq!(
        s.wait_log("keeps the rest and accepts again", 1, T).len(),
        1
    );
    let committed = die_at as usize * 253;
    // Those committed went with the dead process; the rest carry on here, untouched.
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        for d in devs.iter_mut() {
            d.pump_until(Duration::from_millis(1), |_| false);
        }
    }
    let lost = devs.iter().filter(|d| d.closed).count();
    assert_eq!(lost, committed, "devices whose connection ended");
    let mut agent = Agent::attach_welcomed(&s);
    let seqs: Vec<_> = devs
        .iter_mut()
        .map(|d| if d.closed { None } else { send(d, "kept") })
        .collect();
    let kept = devices as usize - committed;
    assert_eq!(
        until_acked(&mut devs, &mut agent, &seqs, T),
        kept,
        "kept sessions work"
    );
    for d in devs.iter().filter(|d| !d.closed) {
        assert!(!d.events.iter().any(|e| matches!(e, DeviceEvent::Closed(_))));
    }
    // The lost ones come back (to the old process, which accepts again).
    for d in devs.iter_mut().filter(|d| d.closed).take(5) {
        d.reconnect(&s);
        assert!(d.established());
    }
    let mut s = s;
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "the old process still serves"
    );
}

#[test]
fn a_new_process_dying_at_the_first_session_batch_leaves_every_session_in_place() {
    killed_mid_handoff(0, 40);
}

#[test]
fn a_new_process_dying_at_the_second_batch_keeps_the_first_and_hands_back_the_rest() {
    killed_mid_handoff(1, 260);
}

#[test]
fn sessions_that_cannot_move_are_told_to_reconnect_and_counted() {
    use tether_protocol::CloseReason;
    use tether_protocol::message::GoodbyeReason;
    // Buffered TLS keeps rustls' connection, which does not leave the process.
    let s = Server::start(
        20,
        &[
            "--shards",
            "2",
            "--tls-state",
            "buffered",
            "--upgrade-window-ms",
            "500",
        ],
    );
    let mut devs: Vec<Device> = (1..=20).map(|id| s.device(id)).collect();
    for d in &mut devs {
        assert!(d.established());
    }
    let (status, answer) = s.upgrade(None);
    assert_eq!(status, 200, "{answer}");
    let _new = successor(&answer);
    for d in &mut devs {
        d.pump_until(T, |ev| {
            ev.iter().any(|e| matches!(e, DeviceEvent::Closed(_)))
        });
        assert!(
            d.events
                .contains(&DeviceEvent::Closed(CloseReason::PeerGoodbye(
                    GoodbyeReason::Upgrade
                ))),
            "{:?}",
            d.events
        );
    }
    let r = report(&answer);
    assert_eq!(
        (r.sessions_handed, r.sessions_told_to_reconnect),
        (0, 20),
        "{r:?}"
    );
    assert_eq!(s.wait_log("20 could not move", 1, T).len(), 1);
    for d in &mut devs {
        d.reconnect(&s);
        assert!(d.established(), "a device reconnects to the new process");
    }
}

#[test]
fn sigusr2_upgrades_to_the_same_binary() {
    let s = Server::start(10, &["--shards", "2"]);
    let mut devs = established(&s, 10);
    s.signal(12); // SIGUSR2
    let line = s.wait_log("sessions handed to pid", 1, T);
    let pid: i32 = line
        .first()
        .and_then(|l| l.split("handed to pid ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{:?}", s.log_lines("upgrade")));
    let _new = KillOnDrop(pid);
    assert!(line[0].contains("10 sessions handed"), "{line:?}");
    assert_eq!(s.log_lines("upgrade (SIGUSR2)").len(), 1);
    // The devices carry on with the new process.
    let mut agent = Agent::attach_welcomed(&s);
    let seqs: Vec<_> = devs.iter_mut().map(|d| send(d, "after")).collect();
    assert_eq!(until_acked(&mut devs, &mut agent, &seqs, T), 10);
    assert_eq!(closed_events(&devs), vec![]);
}

/// A "new binary" that is this tether started with `--shards n` instead of the old process's
/// count (an upgrade keeps the arguments; a new build may well change the shard count).
fn with_shards(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("tether-{n}-shards.sh"));
    let script = format!(
        "#!/bin/bash\nout=(); next=0\nfor a in \"$@\"; do\n  if [ $next = 1 ]; then out+=({n}); next=0; continue; fi\n  [ \"$a\" = --shards ] && next=1\n  out+=(\"$a\")\ndone\nexec {} \"${{out[@]}}\"\n",
        env!("CARGO_BIN_EXE_tether")
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn the_new_process_may_have_fewer_or_more_shards() {
    let s = Server::start(40, &["--shards", "2"]);
    let mut devs = established(&s, 40);
    let mut agent = Agent::attach_welcomed(&s);
    let mut keep = Vec::new();
    // 2 → 1 → 3 shards: the same sockets each time, sessions re-homed by the new count.
    for (i, n) in [1usize, 3].into_iter().enumerate() {
        let (status, answer) = s.upgrade(Some(&with_shards(&s.dir, n)));
        assert_eq!(status, 200, "{answer}");
        keep.push(successor(&answer));
        assert_eq!(report(&answer).sessions_handed, 40, "{answer}");
        let listening = s.wait_log(&format!("({n} shards"), 1, T);
        assert_eq!(listening.len(), 1, "{:?}", s.log_lines("listening"));
        while ack_some(&mut agent) {}
        agent = Agent::attach_welcomed(&s);
        let seqs: Vec<_> = devs.iter_mut().map(|d| send(d, "moved")).collect();
        let acked = until_acked(&mut devs, &mut agent, &seqs, Duration::from_secs(25));
        assert_eq!(acked, 40, "after upgrade {i} to {n} shards");
        // New devices connect too (every listener is accepted on).
        for _ in 0..20 {
            assert!(s.tls_handshake(s.tls.clone()).is_ok());
        }
    }
    assert_eq!(closed_events(&devs), vec![]);
}

/// A device on a TLS stack nobody here wrote keeps its connection through an upgrade: OpenSSL's
/// record layer goes on with the sequence numbers and keys the new process took over.
#[test]
fn an_openssl_s_client_device_keeps_its_tls_session_through_an_upgrade() {
    use common::{SClient, have_openssl, hello};
    use tether_protocol::DeviceMessage;
    use tether_protocol::auth::prove;
    if !have_openssl() {
        return;
    }
    let s = Server::start(2, &["--shards", "2"]);
    let mut c = SClient::connect(&s, None);
    let nonce = c.challenge();
    let key = s.config(1).key;
    c.send(&hello(
        1,
        prove(&key, &nonce, DeviceId(1), tether_protocol::PROTOCOL_VERSION),
    ));
    assert!(
        matches!(c.next(), Some(DeviceMessage::Welcome { .. })),
        "not welcomed"
    );
    c.send(&DeviceMessage::Ping { id: 1 });
    assert_eq!(c.next(), Some(DeviceMessage::Pong { id: 1 }));
    let (status, answer) = s.upgrade(None);
    assert_eq!(status, 200, "{answer}");
    let _new = successor(&answer);
    assert_eq!(report(&answer).sessions_handed, 1, "{answer}");
    // The same s_client process, the same TLS connection: answered by the new process.
    for id in 2..5 {
        c.send(&DeviceMessage::Ping { id });
        assert_eq!(c.next(), Some(DeviceMessage::Pong { id }), "ping {id}");
    }
    // The old process exits; the connection stays.
    assert_eq!(s.wait_log("upgrade complete", 1, T).len(), 1);
    c.send(&DeviceMessage::Ping { id: 9 });
    assert_eq!(c.next(), Some(DeviceMessage::Pong { id: 9 }));
}
