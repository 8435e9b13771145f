//! Connections land on whichever shard the kernel picks; each device's session ends up on its
//! home shard (`hash(device) % shards`), moved there once after `Hello`.

mod common;

use common::Server;
use tether_core::placement::home_shard;
use tether_protocol::DeviceId;

#[test]
fn sessions_live_on_their_home_shard() {
    let s = Server::start(64, &["--shards", "2"]);
    let mut devices: Vec<_> = (1..=64).map(|i| s.device(i)).collect();
    for d in &mut devices {
        assert!(d.established(), "{:?}", d.events);
    }
    let st = s.stats();
    assert_eq!(st.shards.len(), 2);
    let mut want = [0u64; 2];
    for i in 1..=64 {
        want[home_shard(DeviceId(i), 2)] += 1;
    }
    assert!(
        want[0] > 0 && want[1] > 0,
        "both shards hold devices: {want:?}"
    );
    for (k, shard) in st.shards.iter().enumerate() {
        assert_eq!(shard.connections_open, want[k], "shard {k}");
    }
    // The kernel spread accepts over both listeners, so some sessions had to move.
    assert_eq!(st.total.connections_accepted, 64);
    assert_eq!(st.total.sessions_moved_in, st.total.sessions_moved_out);
    assert!(st.shards[0].connections_accepted > 0 && st.shards[1].connections_accepted > 0);
    assert!(st.total.sessions_moved_in > 0);
}
