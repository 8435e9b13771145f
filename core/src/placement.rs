//! Where a device lives: its home shard in this process, by a fixed hash of its id, so every
//! shard (and the admin side) finds it without asking anyone. (Which node of a farm holds it is
//! a different question, answered by the farm's location records.)

use tether_protocol::DeviceId;

/// The home shard of a device: where its session lives.
pub fn home_shard(device: DeviceId, shards: usize) -> usize {
    (mix(device.0) % shards as u64) as usize
}

/// splitmix64's finaliser: spreads sequential device ids evenly.
pub(crate) fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
