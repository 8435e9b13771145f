//! Presence under a mass disconnect: 10,000 devices on two shards drop at once, and every
//! attached agent accounts for every one of them going offline — by an offline change, or by
//! its absence from a marked `PresenceSnapshot` — never a silent gap. One agent reads as it
//! goes; the other reads nothing until all devices are gone (a small receive buffer, and a
//! small `--agent-queue-limit`), so its queue overflows and it must get a snapshot. The mesh
//! between the shards is small (`--mesh-capacity`), so presence changes crossing it are
//! coalesced too.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Agent, Device, Server};
use tether_protocol::{AgentMessage, DeviceId};

const DEVICES: u64 = 10_000;
/// Client threads making the connections (each holds its share open).
const THREADS: u64 = 8;
const T: Duration = Duration::from_secs(60);

/// What one agent knows of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Online,
    /// An offline change arrived.
    OfflineByChange,
    /// A snapshot arrived that did not list it.
    OfflineBySnapshot,
}

/// An agent's view, built from what it reads, checking the stream as it goes.
#[derive(Default)]
struct View {
    devices: HashMap<DeviceId, Seen>,
    /// A snapshot's chunks so far (between its first and last frame).
    open_snapshot: Option<Vec<DeviceId>>,
    snapshots: u64,
    changes: u64,
    /// Things that must not happen: an offline change for a device not known online, a
    /// change inside a snapshot, a chunk without a first one.
    anomalies: Vec<String>,
}

impl View {
    fn apply(&mut self, m: AgentMessage) {
        match m {
            AgentMessage::Presence { device, online } => {
                self.changes += 1;
                if self.open_snapshot.is_some() {
                    self.anomalies
                        .push(format!("presence {device:?} inside a snapshot"));
                }
                if online {
                    self.devices.insert(device, Seen::Online);
                } else {
                    if self.devices.get(&device) != Some(&Seen::Online) {
                        self.anomalies.push(format!(
                            "{device:?} offline while not known online ({:?})",
                            self.devices.get(&device)
                        ));
                    }
                    self.devices.insert(device, Seen::OfflineByChange);
                }
            }
            AgentMessage::PresenceSnapshot {
                first,
                last,
                devices,
            } => {
                match (&mut self.open_snapshot, first) {
                    (None, true) => self.open_snapshot = Some(devices),
                    (Some(_), true) => self.anomalies.push("snapshot begun twice".into()),
                    (None, false) => self.anomalies.push("snapshot chunk without a first".into()),
                    (Some(open), false) => open.extend(devices),
                }
                if last {
                    let listed = self.open_snapshot.take().unwrap_or_default();
                    self.snapshots += 1;
                    // The set replaces what was known: the unlisted are offline.
                    for s in self.devices.values_mut() {
                        if *s == Seen::Online {
                            *s = Seen::OfflineBySnapshot;
                        }
                    }
                    for d in (1..=DEVICES).map(DeviceId) {
                        self.devices.entry(d).or_insert(Seen::OfflineBySnapshot);
                    }
                    for d in listed {
                        self.devices.insert(d, Seen::Online);
                    }
                }
            }
            _ => {}
        }
    }

    fn online(&self) -> usize {
        self.devices
            .values()
            .filter(|s| **s == Seen::Online)
            .count()
    }

    /// Devices it accounts offline: by a change, or by a snapshot.
    fn offline(&self) -> (usize, usize) {
        let by = |k| self.devices.values().filter(|s| **s == k).count();
        (by(Seen::OfflineByChange), by(Seen::OfflineBySnapshot))
    }
}

/// Reads `agent` into `view` while `go` is set, until `stop`.
fn reader(
    mut agent: Agent,
    view: Arc<Mutex<View>>,
    go: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if !go.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            if let Some(m) = agent.recv(Duration::from_millis(100)) {
                view.lock().unwrap().apply(m);
            }
        }
    })
}

fn wait_for(what: &str, d: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + d;
    while !done() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `view` has nobody online and no snapshot open; panics with what it lacks.
fn wait_all_offline(name: &str, view: &Mutex<View>, d: Duration) {
    let end = Instant::now() + d;
    loop {
        {
            let v = view.lock().unwrap();
            let (by_change, by_snapshot) = v.offline();
            if v.open_snapshot.is_none() && v.online() == 0 && v.devices.len() == DEVICES as usize {
                return;
            }
            assert!(
                Instant::now() < end,
                "{name} agent: still {} online, {} never heard of, offline by change \
                 {by_change}, by snapshot {by_snapshot}, {} snapshots (a silent gap)",
                v.online(),
                DEVICES as usize - v.devices.len(),
                v.snapshots
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_agent_accounts_for_ten_thousand_devices_dropping_at_once() {
    let s = Arc::new(Server::start(
        DEVICES,
        &[
            "--shards",
            "2",
            "--mesh-capacity",
            "8",
            "--agent-queue-limit",
            "4096",
        ],
    ));
    let stop = Arc::new(AtomicBool::new(false));
    // The reading agent.
    let fast = Arc::new(Mutex::new(View::default()));
    let fast_go = Arc::new(AtomicBool::new(true));
    let fast_reader = reader(Agent::attach(&s), fast.clone(), fast_go, stop.clone());
    // The agent that reads nothing until the devices are gone, through a small window.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.agents.into()).unwrap();
    let slow = Arc::new(Mutex::new(View::default()));
    let slow_go = Arc::new(AtomicBool::new(false));
    let slow_reader = reader(
        Agent::attach_on(&s, TcpStream::from(sock)),
        slow.clone(),
        slow_go.clone(),
        stop.clone(),
    );
    // Both attached (each shard heard of both) before devices come.
    wait_for("both agents attached", T, || {
        s.stats().total.agents_attached == 2
    });
    std::thread::sleep(Duration::from_millis(200));

    // 10,000 sessions, from many loopback addresses (ephemeral ports); only the sockets are
    // kept once established (no TLS state: the devices only have to leave).
    let started = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut socks = Vec::new();
                for id in (1..=DEVICES).filter(|id| id % THREADS == t) {
                    let source = Ipv4Addr::new(127, 0, 1 + (id % 200) as u8, 1 + t as u8);
                    let mut d = Device::connect_from(&s, s.config(id), source);
                    assert!(d.established(), "device {id} not established");
                    socks.push(d.tls.sock);
                }
                socks
            })
        })
        .collect();
    let socks: Vec<TcpStream> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    eprintln!(
        "{} devices connected in {:?}",
        socks.len(),
        started.elapsed()
    );
    wait_for("the reading agent to see every device online", T, || {
        fast.lock().unwrap().online() == DEVICES as usize
    });

    // All drop at once.
    let dropped = Instant::now();
    drop(socks);
    wait_for("the server to see every device gone", T, || {
        s.stats().total.connections_open == 0
    });
    eprintln!("all gone on the server in {:?}", dropped.elapsed());
    wait_all_offline("reading", &fast, T);
    slow_go.store(true, Ordering::Relaxed);
    wait_all_offline("slow", &slow, T);
    // Nothing more is on the way: a late frame would still be applied and checked.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    fast_reader.join().unwrap();
    slow_reader.join().unwrap();

    let m = s.stats().total;
    eprintln!(
        "server: agent_overflow {} presence_snapshots {} pushback devices {} agents {}",
        m.agent_overflow, m.presence_snapshots, m.pushback_device_reads, m.pushback_agent_reads
    );
    for (name, v) in [("reading", &fast), ("slow", &slow)] {
        let v = v.lock().unwrap();
        let (by_change, by_snapshot) = v.offline();
        eprintln!(
            "{name} agent: {} changes, {} snapshots; offline by change {by_change}, by snapshot {by_snapshot}",
            v.changes, v.snapshots
        );
        assert!(
            v.anomalies.is_empty(),
            "{name}: {:?}",
            &v.anomalies[..v.anomalies.len().min(5)]
        );
        assert_eq!(v.online(), 0, "{name}: devices still online");
        assert_eq!(
            by_change + by_snapshot,
            DEVICES as usize,
            "{name}: offline not accounted for every device"
        );
        if by_snapshot > 0 {
            assert!(v.snapshots > 0, "{name}: offline by an unmarked snapshot");
        }
    }
    // The slow agent's queue could not hold the changes: it got a snapshot, counted.
    assert!(slow.lock().unwrap().snapshots >= 1);
    assert!(m.presence_snapshots >= 1 && m.agent_overflow >= 1, "{m:?}");
}
