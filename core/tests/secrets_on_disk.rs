//! Secrets in the data directory: written owner-only by `tether devices gen` and `tether
//! serve`, and `tether serve` warns at start, naming the file, when group or others may read
//! one.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::Server;
use tether_core::fsutil::mode_of;
use tether_core::server::SECRET_FILES;

#[test]
fn secrets_are_owner_only_and_a_loose_one_is_named_at_start() {
    let s = Server::start(3, &[]);
    for (name, _) in SECRET_FILES {
        assert_eq!(mode_of(&s.dir.join(name)).unwrap(), 0o600, "{name}");
    }
    let warned = |s: &Server| {
        s.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("tether: warning: "))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(warned(&s), Vec::<String>::new());

    let csv = s.dir.join("devices.csv");
    std::fs::set_permissions(&csv, std::fs::Permissions::from_mode(0o644)).unwrap();
    let key = s.dir.join("tls/server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let s = s.restart(&[]);
    let w = warned(&s);
    assert_eq!(
        w,
        [
            format!(
                "tether: warning: {} is readable by group or others (mode 0644) and holds device \
                 keys: chmod 600 {}",
                csv.display(),
                csv.display()
            ),
            format!(
                "tether: warning: {} is readable by group or others (mode 0640) and holds the \
                 server's private key: chmod 600 {}",
                key.display(),
                key.display()
            ),
        ]
    );
    // A warning, not a refusal: the server runs.
    assert!(!s.stats().shards.is_empty());
}
