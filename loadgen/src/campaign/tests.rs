use std::path::PathBuf;

use super::*;
use crate::host::HostLimits;

/// This project's shared VM: 20,000 open files per process, the default port range, 2 cores.
const VM: HostLimits = HostLimits {
    fd_soft: 20_000,
    fd_hard: 20_000,
    local_ports: 28_232,
    cores: 2,
};

fn campaigns_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("campaigns")
}

fn parse(text: &str) -> Result<Campaign, CampaignError> {
    Campaign::parse(text, "<test>")
}

fn problems(text: &str) -> Vec<Problem> {
    match parse(text) {
        Err(CampaignError::Invalid { problems, .. }) => problems,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn every_shipped_campaign_parses_and_validates() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(campaigns_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let c = Campaign::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(c.planned_duration_s() > 0.0, "{}", path.display());
            names.push(c.name);
        }
    }
    names.sort();
    for want in [
        "idle-10k",
        "idle-19k",
        "idle-5k",
        "million",
        "quickstart",
        "tiny",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing campaign {want}: {names:?}"
        );
    }
}

#[test]
fn shipped_campaigns_fit_as_documented() {
    let load = |n: &str| Campaign::load(&campaigns_dir().join(format!("{n}.toml"))).unwrap();
    let quick = load("quickstart");
    assert!(quick.server.spawn && quick.devices == 10_000);
    // hostile: ≥ 1,000 connects in every window, devices and attack connections within this
    // VM's open files on both sides (a spawned server), under about 3 minutes.
    let hostile = load("hostile");
    assert_eq!(hostile.plan_workers(&VM).unwrap().len(), 1);
    assert_eq!(hostile.attack_fds_peak(), 9_900);
    assert!(hostile.planned_duration_s() < 180.0);
    assert_eq!(hostile.windows().len(), 9);
    for a in &hostile.attack {
        assert!(a.duration_s * hostile.ramp_per_sec >= 1_000.0, "{a:?}");
    }
    assert!(
        quick.planned_duration_s() < 60.0,
        "quickstart must finish well under 2 minutes"
    );
    for n in ["tiny", "quickstart", "idle-5k", "idle-10k", "idle-19k"] {
        assert_eq!(
            load(n).plan_workers(&VM).unwrap().len(),
            1,
            "{n} fits one process here"
        );
    }
    // A million devices on this VM: a farm of worker processes, each under the 20,000 cap.
    let million = load("million");
    let plans = million.plan_workers(&VM).unwrap();
    assert!(plans.len() >= 50, "{}", plans.len());
    assert!(
        plans
            .iter()
            .all(|p| million.fds_needed(p.devices) <= 20_000)
    );
    assert_eq!(plans.iter().map(|p| p.devices).sum::<u64>(), 1_000_000);
    // On a tuned bare-metal host one process holds them all.
    let metal = HostLimits {
        fd_hard: 1_100_000,
        ..VM
    };
    assert_eq!(million.plan_workers(&metal).unwrap().len(), 1);
}

#[test]
fn defaults_fill_an_almost_empty_file() {
    let c = parse("name = \"x\"\n[server]\naddress = \"127.0.0.1:7400\"\n").unwrap();
    assert_eq!(c.heartbeat_s, 30);
    assert_eq!(c.tls_state, TlsState::Detached);
    assert!(c.resume);
    assert_eq!(c.workers, Workers::Count(1));
    assert_eq!(c.messages.agents, 1);
    assert_eq!(c.limits.max_errors, None);
    assert!(c.effective_shards() >= 1);
    assert_eq!(c.planned_duration_s(), 100.0 / 1000.0 + 10.0);
}

#[test]
fn unknown_keys_are_refused_with_their_name_and_line() {
    let err = parse("[messages]\npayload_byte = 3\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("payload_byte") && err.contains("line 2"),
        "{err}"
    );
    let err = parse("tls_state = \"leaky\"\n").unwrap_err().to_string();
    assert!(err.contains("leaky") && err.contains("detached"), "{err}");
    let err = parse("workers = \"many\"\n").unwrap_err().to_string();
    assert!(err.contains("auto"), "{err}");
}

#[test]
fn validation_names_every_bad_key() {
    let p = problems(
        "devices = 0\nramp_per_sec = -1\nheartbeat_s = 0\n\
         [messages]\nround_trip_per_sec = 1\nagents = 0\npayload_bytes = 1000000\n\
         [[storm]]\nat_s = 9999\ndrop_percent = 0\n\
         [[deploy]]\nat_s = 1\ngroup = \"\"\nsize_bytes = 0\n",
    );
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    for want in [
        "devices",
        "ramp_per_sec",
        "heartbeat_s",
        "server.address",
        "server.agent_address",
        "messages.payload_bytes",
        "messages.agents",
        "storm[0].at_s",
        "storm[0].drop_percent",
        "deploy[0].group",
        "deploy[0].size_bytes",
    ] {
        assert!(keys.contains(&want), "{want} not in {keys:?}");
    }
    let shown = parse("devices = 0\n").unwrap_err().to_string();
    assert!(shown.contains("devices: must be at least 1"), "{shown}");
}

#[test]
fn load_never_leaves_loopback() {
    let base = "[server]\nspawn = true\n[source]\n";
    let p = problems(&format!("{base}addresses = \"192.168.1.1-192.168.1.9\"\n"));
    assert_eq!(p[0].key, "source.addresses");
    assert!(p[0].problem.contains("not a loopback"), "{}", p[0].problem);
    let p = problems("[server]\naddress = \"10.1.2.3:7400\"\n");
    assert_eq!(p[0].key, "server.address");
    let c = parse(&format!(
        "{base}addresses = [\"127.0.1.1-127.0.1.4\", \"127.0.9.9\"]\n"
    ))
    .unwrap();
    assert_eq!(parse_sources(&c.source.addresses).unwrap().len(), 5);
}

#[test]
fn spawn_only_keys_need_spawn() {
    let p = problems("[server]\naddress = \"127.0.0.1:1\"\nshards = 2\nextra_args = [\"-v\"]\n");
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["server.shards", "server.extra_args"]);
    let c = parse("[server]\nspawn = true\nshards = 2\n").unwrap();
    assert_eq!(
        c.server.device_address(),
        Some("127.0.0.1:7400".parse().unwrap())
    );
    assert_eq!(
        c.server.agent_link_address(),
        Some("127.0.0.1:7401".parse().unwrap())
    );
}

#[test]
fn overrides_edit_the_toml_before_deserialising() {
    let mut c =
        parse("name = \"o\"\n[server]\nspawn = true\n[[storm]]\nat_s = 5\ndrop_percent = 10\n")
            .unwrap();
    c.apply_override("messages.payload_bytes", "1024").unwrap();
    assert_eq!(c.messages.payload_bytes, 1024);
    c.apply_override("name", "renamed-run").unwrap(); // not TOML: taken as a string
    assert_eq!(c.name, "renamed-run");
    c.apply_override("workers", "\"auto\"").unwrap();
    assert_eq!(c.workers, Workers::Auto);
    c.apply_override("limits.max_errors", "5").unwrap();
    assert_eq!(c.limits.max_errors, Some(5));
    c.apply_override("storm.0.drop_percent", "50").unwrap();
    assert_eq!(c.storm[0].drop_percent, 50.0);
    c.apply_override("source.addresses", "127.0.1.1-127.0.1.2")
        .unwrap();
    assert_eq!(c.source.addresses.0.len(), 1);

    let before = c.clone();
    for (k, v, needle) in [
        ("messages.payload_byte", "1", "payload_byte"),
        ("messages.payload_bytes", "lots", "lots"),
        ("devices", "0", "devices: must be at least 1"),
        ("storm.3.at_s", "1", "no entry 3"),
        ("storm", "1", "expected"),
        ("storm.at_s", "1", "storm.0.at_s"),
        ("name.x", "1", "not a table"),
        ("source.addresses", "8.8.8.8", "not a loopback"),
    ] {
        let err = c.apply_override(k, v).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("--set {k}={v}:")) && err.contains(needle),
            "{err}"
        );
        assert_eq!(c, before, "a failed override leaves the campaign unchanged");
    }
}

#[test]
fn one_process_that_cannot_hold_the_devices_is_one_clear_line() {
    let c = parse("devices = 50000\nramp_per_sec = 5000\n[server]\naddress = \"127.0.0.1:7400\"\n[source]\naddresses = \"127.0.1.1-127.0.1.4\"\n").unwrap();
    let err = c.plan_workers(&VM).unwrap_err().to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(
        err.contains("20000") && err.contains("workers = \"auto\" (3 processes)"),
        "{err}"
    );
}

#[test]
fn auto_workers_split_devices_and_sources() {
    let mut c = parse("devices = 50000\n workers = \"auto\"\n[server]\naddress = \"127.0.0.1:7400\"\n[source]\naddresses = \"127.0.1.1-127.0.1.7\"\n").unwrap();
    let plans = c.plan_workers(&VM).unwrap();
    assert_eq!(plans.len(), 3);
    assert_eq!(
        plans.iter().map(|p| p.devices).collect::<Vec<_>>(),
        [16_667, 16_667, 16_666]
    );
    assert_eq!((plans[1].first_device, plans[1].stride), (1, 3));
    assert_eq!(
        plans.iter().map(|p| p.sources.len()).collect::<Vec<_>>(),
        [3, 2, 2]
    );
    assert_ne!(plans[0].sources[0], plans[1].sources[0]);

    // Fewer addresses than workers: all shared, and the port budget is checked over all sharers.
    c.apply_override("source.addresses", "127.0.1.1").unwrap();
    let err = c.plan_workers(&VM).unwrap_err().to_string();
    assert!(
        err.contains("source.addresses") && err.contains("28232"),
        "{err}"
    );
    c.apply_override("source.addresses", "127.0.1.1-127.0.1.2")
        .unwrap();
    let plans = c.plan_workers(&VM).unwrap();
    assert_eq!(plans[2].sources, plans[0].sources);
    assert_eq!(plans[0].sources.len(), 2);
}

#[test]
fn a_spawned_server_must_fit_one_process() {
    let c = parse("devices = 25000\nworkers = 2\n[server]\nspawn = true\n").unwrap();
    let err = c.plan_workers(&VM).unwrap_err().to_string();
    assert!(err.contains("server.spawn") && !err.contains('\n'), "{err}");
}

#[test]
fn server_pid_only_for_a_running_server() {
    let keys = problem_keys;
    assert_eq!(keys("[server]\nspawn = true\npid = 42\n"), ["server.pid"]);
    assert!(keys("[server]\naddress = \"127.0.0.1:1\"\npid = 42\n").is_empty());
    let mut c = Campaign::parse("[server]\naddress = \"127.0.0.1:1\"\n", "<t>").unwrap();
    c.apply_override("server.pid", "4242").unwrap();
    assert_eq!(c.server.pid, Some(4242));
}

#[test]
fn nodes_picks_and_remote_workers_are_checked() {
    let keys = problem_keys;
    let c = parse("[server]\nspawn = true\nnodes = 3\npick = \"node:2\"\n").unwrap();
    let nodes = c.server.nodes();
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[2].device.to_string(), "127.0.3.3:7400");
    assert_eq!(nodes[1].agent.unwrap().to_string(), "127.0.3.2:7401");
    assert_eq!(c.server.pick, Pick::Node(2));
    assert_eq!(
        keys("[server]\nspawn = true\nnodes = 2\npick = \"node:2\"\n"),
        ["server.pick"]
    );
    assert_eq!(
        keys("[server]\naddress = \"127.0.0.1:1\"\nnodes = 2\n"),
        ["server.nodes"]
    );
    assert_eq!(
        keys("[server]\nspawn = true\nnodes = 0\n"),
        ["server.nodes"]
    );
    // An agent reaches only its own node: random picks and too few agents are refused.
    let msgs = "[messages]\nround_trip_per_sec = 1\nagents = 1\n";
    assert_eq!(
        keys(&format!(
            "[server]\nspawn = true\nnodes = 2\npick = \"random\"\n{msgs}"
        )),
        ["server.pick", "messages.agents"]
    );
    assert!(Campaign::parse("[server]\npick = \"nearest\"\n", "<t>").is_err());
    let r = parse(
        "workers = [\"10.0.0.2:7500\", \"10.0.0.3:7500\"]\n[server]\naddress = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    assert_eq!(
        r.workers,
        Workers::Remote(vec!["10.0.0.2:7500".into(), "10.0.0.3:7500".into()])
    );
    assert_eq!(r.plan_workers(&VM).unwrap().len(), 2);
    assert_eq!(
        keys("workers = []\n[server]\naddress = \"127.0.0.1:1\"\n"),
        ["workers"]
    );
    // A spawned server that cannot hold its share says how many nodes would.
    let big = parse(
        "devices = 50000\nworkers = \"auto\"\n[server]\nspawn = true\n[source]\naddresses = \"127.0.1.1-127.0.1.4\"\n",
    )
    .unwrap();
    let err = big.plan_workers(&VM).unwrap_err().to_string();
    assert!(err.contains("server.nodes = 3"), "{err}");
}

/// The keys of the problems `text` has (empty if it is valid).
fn problem_keys(text: &str) -> Vec<String> {
    match Campaign::parse(text, "<t>") {
        Ok(_) => Vec::new(),
        Err(CampaignError::Invalid { problems, .. }) => {
            problems.into_iter().map(|p| p.key).collect()
        }
        Err(e) => panic!("{e}"),
    }
}
