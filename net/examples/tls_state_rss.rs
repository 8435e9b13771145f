//! RSS per idle TLS server state, aws-lc's C allocations included: builds `count` server
//! states after real in-memory handshakes (clients dropped at once) and prints the growth
//! of the resident set divided by `count`. Allocator: the system's (glibc), like aws-lc's own
//! C allocations: `tether serve` runs mimalloc, whose 4 MiB segments make RSS grow in steps
//! too coarse (≈ 400 B per connection at 10,000) for this measurement.
//!
//! `cargo run -p tether-net --release --example tls_state_rss -- <mode> [count]`, mode one of
//! (optionally followed by `chacha20` or `aes128` to pin the suite; default AES-256-GCM)
//! `detached`, `detached-no-ks` (key schedule forgotten), `restored` (from bytes),
//! `unbuffered` (handshake done, not detached), `buffered` (rustls `ServerConnection`);
//! client side (the load generator's devices): `client-detached` (`DetachedClientTls`, its
//! ticket handled, key schedule forgotten, as loadgen keeps it), `client-detached-ks` (key
//! schedule kept), `client-buffered` (rustls `ClientConnection`).

#[path = "../tests/common/tls_pair.rs"]
mod tls_pair;

use std::any::Any;

use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256,
};

use tether_net::detached::DetachedTls;
use tether_net::tls::{self, ClientTlsOptions};
use tls_pair::{
    Dir, configs, connect, connect_buffered, connect_detached, detaching_client, handshake,
    provider,
};

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "detached".into());
    let count: usize = args.next().and_then(|c| c.parse().ok()).unwrap_or(10_000);
    let dir = Dir::new(&format!("rss-{mode}"));
    let suite = match args.next().as_deref() {
        Some("chacha20") => Some(TLS13_CHACHA20_POLY1305_SHA256),
        Some("aes128") => Some(TLS13_AES_128_GCM_SHA256),
        _ => None, // the client's choice: AES-256-GCM
    };
    let (server, _, pki) = configs(&dir.0, suite);
    let opts = ClientTlsOptions {
        session_tickets: 0,
        ..ClientTlsOptions::default()
    };
    let client = tls::client_config(&pki.ca_cert, &opts).expect("client config");
    let detaching = detaching_client(&dir);
    let pr = provider();
    let make = |_: usize| -> Box<dyn Any> {
        match mode.as_str() {
            "detached" => Box::new(connect(&client, &server).server),
            "detached-no-ks" => {
                let mut tls = connect(&client, &server).server;
                tls.forget_key_schedule();
                Box::new(tls)
            }
            "restored" => {
                let mut tls = connect(&client, &server).server;
                tls.rekey_tx(&mut Vec::new()).expect("rekey");
                let bytes = tls.to_bytes().expect("to_bytes");
                Box::new(DetachedTls::from_bytes(&bytes, &pr).expect("from_bytes"))
            }
            "unbuffered" => Box::new(handshake(&client, &server).1),
            "buffered" => Box::new(connect_buffered(&client, &server).1),
            "client-detached" => {
                let mut tls = connect_detached(&detaching, &server).0;
                tls.forget_key_schedule();
                Box::new(tls)
            }
            "client-detached-ks" => Box::new(connect_detached(&detaching, &server).0),
            "client-buffered" => Box::new(connect_buffered(&client, &server).0),
            other => panic!("unknown mode {other}"),
        }
    };
    // Warm up: lazies, allocator pools, and the transient garbage of one handshake.
    let warm: Vec<_> = (0..100).map(make).collect();
    drop(warm);
    let mut held = Vec::with_capacity(count);
    let before = rss_bytes();
    for i in 0..count {
        held.push(make(i));
    }
    let after = rss_bytes();
    println!(
        "{mode} ({}): {count} states, RSS +{} KiB, {} B per connection (incl. an 8 B Vec slot and the Box)",
        suite.map_or("AES-256-GCM".into(), |s| format!("{:?}", s.suite())),
        (after - before) / 1024,
        (after - before) / count
    );
    drop(held);
}
