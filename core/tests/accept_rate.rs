//! `--accept-rate N`: at most N connections accepted per second by the whole process (its shards
//! take their shares), one token per accepted connection however many arrive at once; the
//! rest wait in the kernel's backlog and are accepted as tokens refill.

mod common;

use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use common::{Server, tcp_from};
use tether_core::metrics::ErrorKind;

/// The process's rate, and the connections of the burst.
const RATE: u64 = 20;
const BURST: u64 = 100;
/// A shard's tokens when full are one second of its share: the whole process starts with `RATE`.
const FULL: u64 = RATE;

#[test]
fn a_burst_of_connects_is_accepted_at_the_rate_not_all_at_once() {
    let s = Server::start(
        1,
        &[
            "--shards",
            "2",
            "--accept-rate",
            &RATE.to_string(),
            // Strangers stay until the test is done with them (they never send a byte).
            "--handshake-timeout-ms",
            "60000",
        ],
    );
    assert_eq!(s.stats().total.connections_accepted, 0);
    // Nothing arrives before `start`: every shard's bucket is full then, so by any later time
    // `t` at most FULL + RATE × (t − start) connections can have been accepted.
    let start = Instant::now();
    // Many sources, so the per-source admission turns play no part.
    let conns: Vec<TcpStream> = (0..BURST)
        .map(|i| tcp_from(s.devices, Ipv4Addr::new(127, 0, 1, 1 + (i % 50) as u8)))
        .collect();
    let end = start + Duration::from_secs(60);
    let mut samples = Vec::new();
    let accepted = loop {
        let st = s.stats();
        // Taken after the reply: an upper bound on when the counters were read.
        let elapsed = start.elapsed().as_secs_f64();
        let accepted = st.total.connections_accepted;
        samples.push((elapsed, accepted));
        let bound = FULL as f64 + RATE as f64 * elapsed;
        assert!(
            accepted as f64 <= bound + 2.0,
            "{accepted} accepted after {elapsed:.2} s, past the rate ({bound:.1}): {samples:?}"
        );
        if accepted >= BURST || Instant::now() >= end {
            break accepted;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The rest were accepted as the tokens refilled, none lost in the backlog.
    assert_eq!(accepted, BURST, "{samples:?}");
    let st = s.stats();
    assert!(st.total.accept_rate_pauses >= 1, "{:?}", st.total);
    // Waiting accepts wait in the kernel: none failed (and was retried at once).
    assert_eq!(st.total.errors_of(ErrorKind::Io), 0, "{:?}", st.total);
    // Both shards took part, each within its share.
    for (k, shard) in st.shards.iter().enumerate() {
        assert!(shard.connections_accepted > 0, "shard {k}: {samples:?}");
    }
    drop(conns);
}
