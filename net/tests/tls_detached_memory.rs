//! Memory per connection of the TLS server states, counted by a global allocator: the
//! detached state (with and without rustls' key schedule) against rustls' buffered and
//! unbuffered connections. aws-lc-rs allocates its AEAD contexts in C (malloc), which this
//! allocator does not see; `examples/tls_state_rss.rs` gives the RSS figure that includes them.

#[path = "common/tls_pair.rs"]
mod tls_pair;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use tether_net::detached::{DetachedTls, Handshake};
use tether_net::tls::{self, ClientTlsOptions};
use tls_pair::{Dir, configs, connect, connect_buffered, handshake, provider};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to `System` unchanged; the counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: usize = 200;

/// Live Rust heap per state: builds `N` (each with its client, dropped at once) and
/// divides the growth.
fn per_state<T>(mut make: impl FnMut() -> T) -> isize {
    drop(make()); // warm up lazies (provider, ticketer)
    let before = LIVE.load(Ordering::Relaxed);
    let held: Vec<T> = (0..N).map(|_| make()).collect();
    let after = LIVE.load(Ordering::Relaxed);
    let per = (after - before - (N * size_of::<T>()) as isize) / N as isize;
    drop(held);
    per
}

// One test only: the counter is process-wide, so measurements must not run in parallel.
#[test]
fn heap_per_connection_of_each_tls_state() {
    let dir = Dir::new("det-mem");
    let (server, _, pki) = configs(&dir.0, None);
    // No client ticket store: stored tickets would grow the heap and count as server state.
    let opts = ClientTlsOptions {
        session_tickets: 0,
        ..ClientTlsOptions::default()
    };
    let client = tls::client_config(&pki.ca_cert, &opts).unwrap();
    let sizes = [
        ("DetachedTls", size_of::<DetachedTls>()),
        ("Handshake", size_of::<Handshake>()),
        (
            "rustls::ServerConnection",
            size_of::<rustls::ServerConnection>(),
        ),
        (
            "rustls::server::UnbufferedServerConnection",
            size_of::<rustls::server::UnbufferedServerConnection>(),
        ),
    ];
    let detached = per_state(|| connect(&client, &server).server);
    let forgot = per_state(|| {
        let mut tls = connect(&client, &server).server;
        tls.forget_key_schedule();
        tls
    });
    let restored = per_state(|| {
        let mut p = connect(&client, &server);
        // AES-GCM moves with a fresh sending key.
        p.server.rekey_tx(&mut Vec::new()).unwrap();
        DetachedTls::from_bytes(&p.server.to_bytes().unwrap(), &provider()).unwrap()
    });
    let unbuffered = per_state(|| handshake(&client, &server).1);
    let buffered = per_state(|| connect_buffered(&client, &server).1);
    for (name, size) in sizes {
        eprintln!("size_of::<{name}>() = {size} B");
    }
    eprintln!("Rust heap per connection (aws-lc's C allocations not included), {N} connections:");
    eprintln!("  DetachedTls (with KernelConnection)      {detached:>6} B + inline");
    eprintln!("  DetachedTls, key schedule forgotten      {forgot:>6} B + inline");
    eprintln!("  DetachedTls restored from bytes          {restored:>6} B + inline");
    eprintln!("  Handshake done, not detached (unbuffered) {unbuffered:>5} B + inline");
    eprintln!("  rustls::ServerConnection                 {buffered:>6} B + inline");
    // Budgets, so that growth is seen (≈ 1.4 KB per detached connection in all).
    assert!(
        size_of::<DetachedTls>() <= 256,
        "{}",
        size_of::<DetachedTls>()
    );
    assert!(detached < 1024, "{detached}");
    assert!(forgot < 256 && restored < 256, "{forgot} {restored}");
    assert!(buffered > detached);
}
