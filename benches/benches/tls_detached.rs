//! Detached TLS against rustls' buffered `ServerConnection`, server side only, in memory:
//! `seal_open/*`: seal one record to the client and open one record from it (64 B, 1 KiB);
//! `handshake/*`: the server's share of a full handshake (the client's calls are not timed),
//! `Handshake` + `detach` against `ServerConnection`. Suite: AES-256-GCM (the client's choice).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use tether_core::pki::DevPki;
use tether_net::detached::{DetachedTls, Handshake};
use tether_net::tls::{self, ClientTlsOptions, TlsOptions};

const CHALLENGE: &[u8] = b"challenge: 32 bytes of nonce....";

fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let dir = PathBuf::from(std::env::var_os("CARGO_TARGET_TMPDIR").unwrap_or("/tmp".into()))
        .join(format!("tether-bench-tls-{}", std::process::id()));
    let pki = DevPki::ensure(&dir).unwrap();
    let opts = TlsOptions {
        secret_extraction: true,
        ..TlsOptions::default()
    };
    let server = tls::server_config(&pki.server_cert, &pki.server_key, &opts).unwrap();
    // No tickets kept: every connection is a full handshake.
    let copts = ClientTlsOptions {
        session_tickets: 0,
        ..ClientTlsOptions::default()
    };
    let client = tls::client_config(&pki.ca_cert, &copts).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (server, client)
}

fn client(config: &Arc<ClientConfig>) -> ClientConnection {
    ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap()).unwrap()
}

fn deliver(c: &mut ClientConnection, bytes: &[u8]) {
    let mut rd = bytes;
    while !rd.is_empty() {
        c.read_tls(&mut rd).unwrap();
        c.process_new_packets().unwrap();
    }
}

fn flush(c: &mut ClientConnection) -> Vec<u8> {
    let mut wire = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut wire).unwrap();
    }
    wire
}

/// A detached handshake; `timed` accumulates the server's time only.
fn detached_handshake(
    s: &Arc<ServerConfig>,
    c: &Arc<ClientConfig>,
    timed: &mut Duration,
) -> (ClientConnection, DetachedTls) {
    let mut cl = client(c);
    let t = Instant::now();
    let mut hs = Handshake::new(s.clone()).unwrap();
    hs.queue_half_rtt(CHALLENGE);
    *timed += t.elapsed();
    let (mut out, mut received) = (Vec::new(), Vec::new());
    loop {
        let mut wire = flush(&mut cl);
        let t = Instant::now();
        let p = hs.feed(&mut wire, &mut out, &mut received).unwrap();
        *timed += t.elapsed();
        deliver(&mut cl, &out);
        out.clear();
        if p.complete {
            break;
        }
    }
    let t = Instant::now();
    let tls = hs.detach(&mut out).unwrap();
    *timed += t.elapsed();
    deliver(&mut cl, &out);
    let mut got = [0; CHALLENGE.len()];
    cl.reader().read_exact(&mut got).unwrap();
    (cl, tls)
}

fn buffered_handshake(
    s: &Arc<ServerConfig>,
    c: &Arc<ClientConfig>,
    timed: &mut Duration,
) -> (ClientConnection, ServerConnection) {
    let mut cl = client(c);
    let t = Instant::now();
    let mut sv = ServerConnection::new(s.clone()).unwrap();
    sv.writer().write_all(CHALLENGE).unwrap();
    *timed += t.elapsed();
    let mut out = Vec::new();
    for _ in 0..10 {
        let wire = flush(&mut cl);
        let t = Instant::now();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            sv.read_tls(&mut rd).unwrap();
            sv.process_new_packets().unwrap();
        }
        while sv.wants_write() {
            sv.write_tls(&mut out).unwrap();
        }
        *timed += t.elapsed();
        deliver(&mut cl, &out);
        out.clear();
        if !sv.is_handshaking() && !cl.is_handshaking() {
            break;
        }
    }
    let mut got = [0; CHALLENGE.len()];
    cl.reader().read_exact(&mut got).unwrap();
    (cl, sv)
}

fn handshake(c: &mut Criterion) {
    let (s, cc) = configs();
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    g.bench_function("detached_full", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                std::hint::black_box(detached_handshake(&s, &cc, &mut timed));
            }
            timed
        })
    });
    g.bench_function("rustls_full", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                std::hint::black_box(buffered_handshake(&s, &cc, &mut timed));
            }
            timed
        })
    });
    g.finish();
}

/// `iters` records the client sealed, one per `size`-byte write, for the server to open.
fn client_records(cl: &mut ClientConnection, size: usize, iters: u64) -> Vec<u8> {
    let msg = vec![0xa5; size];
    let mut wire = Vec::new();
    for _ in 0..iters {
        cl.writer().write_all(&msg).unwrap();
        while cl.wants_write() {
            cl.write_tls(&mut wire).unwrap();
        }
    }
    wire
}

fn seal_open(c: &mut Criterion) {
    let (s, cc) = configs();
    let mut g = c.benchmark_group("seal_open");
    for size in [64usize, 1024] {
        let label = if size == 64 { "64" } else { "1k" };
        g.throughput(Throughput::Bytes(2 * size as u64));
        let plain = vec![0x5a; size];
        let mut untimed = Duration::ZERO;
        let (mut cl, mut tls) = detached_handshake(&s, &cc, &mut untimed);
        g.bench_function(format!("detached_{label}"), |b| {
            b.iter_custom(|iters| {
                let mut wire = client_records(&mut cl, size, iters);
                let mut out = Vec::with_capacity(size + 64);
                let mut read = 0;
                let t = Instant::now();
                let mut pos = 0;
                for _ in 0..iters {
                    out.clear();
                    tls.encrypt(&plain, &mut out).unwrap();
                    let end = pos + 5 + size + 17;
                    let o = tls
                        .decrypt_in_place(&mut wire[pos..end], |d| read += d.len())
                        .unwrap();
                    pos += o.consumed;
                    std::hint::black_box(&out);
                }
                let el = t.elapsed();
                assert_eq!(read, size * iters as usize);
                el
            })
        });
        let (mut cl, mut sv) = buffered_handshake(&s, &cc, &mut untimed);
        g.bench_function(format!("rustls_{label}"), |b| {
            b.iter_custom(|iters| {
                let wire = client_records(&mut cl, size, iters);
                let rec = 5 + size + 17;
                let mut out = Vec::with_capacity(size + 64);
                let mut got = vec![0; size];
                let t = Instant::now();
                for i in 0..iters as usize {
                    out.clear();
                    sv.writer().write_all(&plain).unwrap();
                    sv.write_tls(&mut out).unwrap();
                    let mut rd = &wire[i * rec..(i + 1) * rec];
                    sv.read_tls(&mut rd).unwrap();
                    sv.process_new_packets().unwrap();
                    sv.reader().read_exact(&mut got).unwrap();
                    std::hint::black_box(&out);
                }
                t.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, seal_open, handshake);
criterion_main!(benches);
