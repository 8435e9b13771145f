//! An interrupted code transfer resumes from the bytes the device holds, and the version
//! deployed survives a server restart.

mod common;

use std::time::Duration;

use common::Server;
use tether_protocol::CodeVersion;
use tether_protocol::code::CodeUpdate;

const T: Duration = Duration::from_secs(8);
const SIZE: usize = 1 << 20;

#[test]
fn interrupted_transfer_resumes_from_its_offset() {
    let s = Server::start(2, &[]);
    let code: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    s.deploy("default", &code);
    let mut d = s.device(1);
    // Take part of it, then drop the connection mid-transfer.
    let end = std::time::Instant::now() + T;
    while std::time::Instant::now() < end
        && d.code
            .in_progress()
            .is_none_or(|(_, held, _)| held < 128 * 1024)
    {
        d.pump_until(Duration::from_millis(1), |_| false);
    }
    let (_, held, _) = d.code.in_progress().expect("mid-transfer");
    assert!(held > 0 && held < SIZE as u64, "{held}");
    let before = d.chunk_offsets.len();
    d.reconnect(&s);
    assert!(d.until_running(CodeVersion(1), T), "{:?}", d.code_updates);
    assert!(d.code_updates.contains(&CodeUpdate::Started {
        version: CodeVersion(1),
        size: SIZE as u64,
        offset: held
    }));
    // The server resumed at the device's offset, not from 0.
    assert_eq!(
        d.chunk_offsets.get(before),
        Some(&held),
        "{:?}",
        &d.chunk_offsets[before..]
    );
    // The device's CodeDone reaches the server after the device installed: pump until it did.
    let end = std::time::Instant::now() + T;
    let mut m = s.stats().total;
    while m.code_transfers_completed == 0 && std::time::Instant::now() < end {
        d.pump_until(Duration::from_millis(50), |_| false);
        m = s.stats().total;
    }
    assert_eq!(m.code_transfers_completed, 1);
    assert!(m.code_bytes_out < 2 * SIZE as u64, "{}", m.code_bytes_out);
}

#[test]
fn deployed_version_survives_a_restart() {
    let s = Server::start(2, &[]);
    s.deploy("default", b"first");
    let r = s.deploy("default", b"second");
    assert_eq!(r.version, 2);
    let s = s.restart(&[]);
    let mut d = s.device(1);
    assert!(d.until_running(CodeVersion(2), T), "{:?}", d.code_updates);
    assert!(
        d.code_updates.iter().any(
            |u| matches!(u, CodeUpdate::Installed { blob: Some(b), .. } if &b[..] == b"second")
        )
    );
    // Same blob again: unchanged; a new one continues the numbering.
    assert!(s.deploy("default", b"second").unchanged);
    assert_eq!(s.deploy("default", b"third").version, 3);
}
