//! The live registry over loopback TLS: a device added to a running server connects with the
//! key `add` printed; a revoked device's session ends with `Goodbye{revoked}` within a second,
//! its unacknowledged agent sends are answered, and its next connect is refused like an unknown
//! device's; list and show report online, shard, code version and last seen; the file the
//! server writes reloads to the same registry after a restart; bad input gets clear errors;
//! the `tether devices` CLI against a running server, and offline.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Agent, Device, Server};
use tether_core::admin::{AdminError, admin_request};
use tether_core::devices::{self, AddReport, DeviceInfo};
use tether_core::fsutil::from_hex;
use tether_core::placement::home_shard;
use tether_protocol::auth::DeviceKey;
use tether_protocol::device::{DeviceConfig, DeviceEvent};
use tether_protocol::message::{ErrorCode, GoodbyeReason, SendStatus};
use tether_protocol::{AgentMessage, CloseReason, CodeVersion, DeviceId};

const T: Duration = Duration::from_secs(5);

fn key(r: &AddReport) -> DeviceKey {
    DeviceKey(from_hex::<32>(r.key.as_bytes()).expect("64 hex digits"))
}

fn connect(s: &Server, id: u64, key: DeviceKey, code: u64) -> Device {
    let mut cfg = DeviceConfig::new(DeviceId(id), key);
    cfg.code_version = CodeVersion(code);
    Device::connect(s, cfg)
}

fn refused(d: &mut Device) -> bool {
    d.pump_until(T, |ev| {
        ev.contains(&DeviceEvent::Closed(CloseReason::PeerError(
            ErrorCode::AuthFailed,
        )))
    })
}

fn attached_agent(s: &Server) -> Agent {
    let mut agent = Agent::attach(s);
    assert!(matches!(
        agent.recv(T),
        Some(AgentMessage::AgentWelcome { .. })
    ));
    agent
}

/// An agent `Send` to device `id`.
fn send(agent: &mut Agent, id: u64, tag: u64) {
    agent.send(&AgentMessage::Send {
        device: DeviceId(id),
        tag,
        topic: Bytes::from_static(b"cmd"),
        payload: Bytes::from_static(b"on"),
    });
}

/// The `SendResult` for `tag`, within `T`.
fn send_result(agent: &mut Agent, tag: u64) -> Option<SendStatus> {
    match agent.recv_until(
        T,
        |m| matches!(m, AgentMessage::SendResult { tag: t, .. } if *t == tag),
    ) {
        Some(AgentMessage::SendResult { status, .. }) => Some(status),
        _ => None,
    }
}

fn status(e: AdminError) -> (u16, String) {
    match e {
        AdminError::Status {
            status, message, ..
        } => (status, message),
        other => panic!("expected an HTTP error status, got {other}"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn added_device_connects_and_revoked_device_is_closed_and_refused() {
    let s = Server::start(4, &["--shards", "2"]);
    let mut agent = attached_agent(&s);
    let id = 1000;
    let r = devices::add(s.admin, Some(&s.admin_token), id, "lamps").unwrap();
    assert_eq!((r.id, r.group.as_str()), (id, "lamps"));
    assert_eq!(r.shard, Some(home_shard(DeviceId(id), 2)));
    let mut d = connect(&s, id, key(&r), 4);
    assert!(d.established(), "{:?}", d.events);

    // show and list see it online, on its home shard, running the version its Hello named.
    let info = devices::show(s.admin, Some(&s.admin_token), id).unwrap();
    assert_eq!(info.group, "lamps");
    assert_eq!(info.online, Some(true));
    assert_eq!(info.shard, Some(home_shard(DeviceId(id), 2)));
    assert_eq!(info.code_version, Some(4));
    let seen = info.last_seen_ms.expect("an online device was heard from");
    assert!(now_ms().abs_diff(seen) < 10_000, "last seen {seen}");
    let list = devices::list(s.admin, Some(&s.admin_token)).unwrap();
    assert_eq!(list.devices.len(), 5);
    let row = list.devices.iter().find(|d| d.id == id).unwrap();
    assert_eq!((row.group.as_str(), row.online), ("lamps", Some(true)));
    assert!(
        list.devices
            .iter()
            .filter(|d| d.id != id)
            .all(|d| d.online == Some(false))
    );

    // An agent send the device does not read yet: unacknowledged when the revoke comes.
    send(&mut agent, id, 9);
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let rv = devices::revoke(s.admin, Some(&s.admin_token), id).unwrap();
    assert!(rv.was_online);
    assert_eq!(rv.undelivered, 1);
    assert!(
        d.pump_until(T, |ev| ev.iter().any(|e| matches!(
            e,
            DeviceEvent::Goodbye {
                reason: GoodbyeReason::Revoked,
                ..
            }
        ))),
        "{:?}",
        d.events
    );
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "Goodbye after {took:?}");
    assert!(d.session.is_revoked());
    assert!(d.wait_closed(T), "the server closes the revoked connection");
    assert_eq!(send_result(&mut agent, 9), Some(SendStatus::UnknownDevice));

    // A new connect with the (still correct) key is refused like an unknown device's.
    let mut again = connect(&s, id, key(&r), 4);
    assert!(refused(&mut again), "{:?}", again.events);
    assert_eq!(
        status(devices::show(s.admin, Some(&s.admin_token), id).unwrap_err()).0,
        404
    );
    assert_eq!(
        status(devices::revoke(s.admin, Some(&s.admin_token), id).unwrap_err()),
        (404, "unknown device 1000".into())
    );
    // A send to it now is answered unknown device too.
    send(&mut agent, id, 10);
    assert_eq!(send_result(&mut agent, 10), Some(SendStatus::UnknownDevice));
}

#[test]
fn a_provisioned_device_revoked_is_refused_and_offline_details_stay() {
    let s = Server::start(3, &["--shards", "2"]);
    let mut agent = attached_agent(&s);
    let mut d = s.device(2);
    assert!(d.established(), "{:?}", d.events);
    // The device leaves with a Goodbye: the server releases it (agents see it offline, a
    // send to it is answered offline, list says so).
    d.session.close();
    d.pump_until(Duration::from_millis(300), |_| false);
    let off = agent.recv_until(T, |m| {
        matches!(
            m,
            AgentMessage::Presence {
                device: DeviceId(2),
                online: false
            }
        )
    });
    assert!(
        off.is_some(),
        "no presence offline after the device's Goodbye"
    );
    send(&mut agent, 2, 5);
    assert_eq!(send_result(&mut agent, 5), Some(SendStatus::Offline));
    let list = devices::list(s.admin, Some(&s.admin_token)).unwrap();
    assert!(
        list.devices.iter().all(|d| d.online == Some(false)),
        "{list:?}"
    );
    // Offline now: show keeps when the session ended and the code it ran.
    let end = Instant::now() + T;
    let info: DeviceInfo = loop {
        let i = devices::show(s.admin, Some(&s.admin_token), 2).unwrap();
        if i.online == Some(false) || Instant::now() > end {
            break i;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(info.online, Some(false));
    assert_eq!(info.code_version, Some(0));
    assert!(now_ms().abs_diff(info.last_seen_ms.unwrap()) < 10_000);
    // Never connected: nothing known but the group.
    let never = devices::show(s.admin, Some(&s.admin_token), 3).unwrap();
    assert_eq!((never.code_version, never.last_seen_ms), (None, None));

    let rv = devices::revoke(s.admin, Some(&s.admin_token), 2).unwrap();
    assert!(!rv.was_online);
    let key = s.registry.get(DeviceId(2)).unwrap().key.clone();
    let mut again = connect(&s, 2, key, 0);
    assert!(refused(&mut again), "{:?}", again.events);
    let ids: Vec<u64> = devices::list(s.admin, Some(&s.admin_token))
        .unwrap()
        .devices
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, [1, 3]);
}

#[test]
fn the_written_registry_reloads_identically_after_a_restart() {
    let s = Server::start(6, &["--shards", "2"]);
    let added = devices::add(s.admin, Some(&s.admin_token), 50, "meters").unwrap();
    devices::add(s.admin, Some(&s.admin_token), 51, "lamps").unwrap();
    devices::revoke(s.admin, Some(&s.admin_token), 51).unwrap();
    devices::revoke(s.admin, Some(&s.admin_token), 3).unwrap();
    let before = devices::list(s.admin, Some(&s.admin_token)).unwrap();
    let path = s.dir.join("devices.csv");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the registry holds keys");

    let s = s.restart(&["--shards", "2"]);
    let after = devices::list(s.admin, Some(&s.admin_token)).unwrap();
    assert_eq!(after, before);
    assert_eq!(after.devices.len(), 6);
    // Keys survive: the added device connects with the key `add` printed, and the revoked
    // provisioned device stays refused.
    assert_eq!(s.registry.get(DeviceId(50)).unwrap().key, key(&added));
    let mut d = connect(&s, 50, key(&added), 0);
    assert!(d.established(), "{:?}", d.events);
    assert!(s.registry.get(DeviceId(3)).is_none());
}

#[test]
fn a_group_created_by_add_follows_deploys() {
    let s = Server::start(2, &["--shards", "2"]);
    // A deploy to a group with no device yet, then a device added to it: it gets the code.
    let r = s.deploy("fresh", b"code for a group that has no device yet");
    assert_eq!((r.version, r.devices), (1, 0));
    let added = devices::add(s.admin, Some(&s.admin_token), 70, "fresh").unwrap();
    let mut d = connect(&s, 70, key(&added), 0);
    assert!(d.established(), "{:?}", d.events);
    assert!(d.until_running(CodeVersion(1), T), "{:?}", d.code_updates);
    // The group sizes in deploy reports follow adds and revokes.
    devices::add(s.admin, Some(&s.admin_token), 71, "fresh").unwrap();
    assert_eq!(s.deploy("fresh", b"v2").devices, 2);
    devices::revoke(s.admin, Some(&s.admin_token), 71).unwrap();
    assert_eq!(s.deploy("fresh", b"v3").devices, 1);
    // show reports the version it installed, not the one it connected with.
    assert!(d.until_running(CodeVersion(3), T), "{:?}", d.code_updates);
    let end = Instant::now() + T;
    while devices::show(s.admin, Some(&s.admin_token), 70)
        .unwrap()
        .code_version
        != Some(3)
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        devices::show(s.admin, Some(&s.admin_token), 70)
            .unwrap()
            .code_version,
        Some(3)
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let s = Server::start(2, &[]);
    let (st, msg) = status(devices::add(s.admin, Some(&s.admin_token), 1, "lamps").unwrap_err());
    assert_eq!(
        (st, msg.as_str()),
        (409, "device 1 is already registered (group default)")
    );
    let (st, msg) =
        status(devices::add(s.admin, Some(&s.admin_token), 9, "no spaces").unwrap_err());
    assert_eq!(st, 400);
    assert!(msg.starts_with("bad group name \"no spaces\""), "{msg}");
    let (st, msg) =
        status(devices::add(s.admin, Some(&s.admin_token), 9, &"g".repeat(33)).unwrap_err());
    assert!(st == 400 && msg.starts_with("bad group name"), "{msg}");
    for (method, path, body, want_status, want) in [
        ("POST", "/devices", &b"{not json"[..], 400, "bad body"),
        (
            "POST",
            "/devices",
            br#"{"id": -1, "group": "a"}"#,
            400,
            "bad body",
        ),
        ("POST", "/devices", br#"{"group": "a"}"#, 400, "bad body"),
        ("GET", "/devices/abc", b"", 400, "bad device id \"abc\""),
        (
            "GET",
            "/devices/99999999999999999999",
            b"",
            400,
            "bad device id",
        ),
        ("GET", "/devices/42", b"", 404, "unknown device 42"),
        ("POST", "/devices/42/revoke", b"", 404, "unknown device 42"),
        ("GET", "/devices/1/revoke", b"", 405, "answers POST"),
        ("DELETE", "/devices", b"", 405, "answers GET and POST"),
        ("POST", "/devices/1/rename", b"", 404, "no such endpoint"),
    ] {
        let (got, text) = admin_request(s.admin, Some(&s.admin_token), method, path, body).unwrap();
        let text = String::from_utf8_lossy(&text);
        assert_eq!(got, want_status, "{method} {path}: {text}");
        assert!(text.contains(want), "{method} {path}: {text:?}");
    }
    // Nothing of that changed the registry.
    assert_eq!(
        devices::list(s.admin, Some(&s.admin_token))
            .unwrap()
            .devices
            .len(),
        2
    );
}

fn tether(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .output()
        .expect("run tether")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_cli_adds_shows_revokes_against_a_running_server_and_edits_offline() {
    let s = Server::start(2, &["--shards", "2"]);
    let admin = s.admin.to_string();
    let dir = s.dir.to_str().unwrap().to_owned();
    let target = ["--admin", &admin, "--data-dir", &dir];
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&target);
        let o = tether(&all);
        println!("$ tether {}\n{}", args.join(" "), text(&o));
        o
    };

    let o = run(&["devices", "add", "77", "--group", "lamps"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let hex = out
        .lines()
        .find_map(|l| l.strip_prefix("key "))
        .expect("the key is printed");
    let key = DeviceKey(from_hex::<32>(hex.as_bytes()).unwrap());
    let mut d = connect(&s, 77, key, 2);
    assert!(d.established(), "{:?}", d.events);

    let o = run(&["devices", "show", "77"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}");
    assert!(out.contains("online        yes\n"), "{out}");
    assert!(out.contains("code version  v2\n"), "{out}");
    assert!(out.contains(&format!("shard         {}\n", home_shard(DeviceId(77), 2))));
    let o = run(&["devices", "show", "77", "--json"]);
    let info: DeviceInfo = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((info.online, info.code_version), (Some(true), Some(2)));
    let o = run(&["devices", "list"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.ends_with("3 devices, 1 online\n"), "{out}");

    let o = run(&["devices", "add", "77", "--group", "lamps"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("device 77 is already registered (group lamps)"));
    let o = run(&["devices", "add", "78", "--group", "bad group"]);
    assert!(!o.status.success() && text(&o).contains("bad group name"));
    let o = run(&["devices", "show", "x"]);
    assert!(!o.status.success() && text(&o).contains("bad device id \"x\""));
    // gen would replace a file the server owns: refused while it runs.
    let o = tether(&["devices", "gen", "--count", "1", "--data-dir", &dir]);
    assert!(
        !o.status.success() && text(&o).contains("a tether server runs on"),
        "{}",
        text(&o)
    );

    let o = run(&["devices", "revoke", "77"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("closed with Goodbye{revoked}"));
    assert!(d.wait_closed(T));
    assert!(d.session.is_revoked(), "{:?}", d.events);
    let o = run(&["devices", "show", "77"]);
    assert!(!o.status.success() && text(&o).contains("unknown device 77"));

    // With no server running, add and revoke edit the file (the lock is free).
    let mut s = s;
    assert!(s.terminate(T).is_some(), "server stopped");
    let o = run(&["devices", "add", "90", "--group", "lamps"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no server answers at"));
    let o = run(&["devices", "list"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("90                   lamps   unknown"),
        "{out}"
    );
    let o = run(&["devices", "revoke", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let reg = tether_core::registry::Registry::load(&s.dir.join("devices.csv")).unwrap();
    assert!(reg.get(DeviceId(90)).is_some() && reg.get(DeviceId(1)).is_none());
    assert!(reg.get(DeviceId(77)).is_none());
}
