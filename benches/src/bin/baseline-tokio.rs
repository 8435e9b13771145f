//! The baseline: a plain tokio + tokio-rustls server speaking Tether's device protocol with the
//! same TLS configuration (aws-lc-rs, TLS 1.3, same certificate and key exchange groups) and
//! the same device registry, one task per connection — the usual way to write it. Loadgen
//! drives it exactly like `tether serve`, so every memory and CPU claim is a ratio measured in
//! one run.
//!
//! Device messages are acknowledged at once (no agent link); everything else — challenge,
//! proof, welcome, heartbeats, idle deadline — is the protocol crate's `ServerSession`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use clap::Parser;
use tether_core::pki::DevPki;
use tether_core::registry::Registry;
use tether_net::tls::{TlsOptions, load_certs, load_key, server_config};
use tether_protocol::SessionId;
use tether_protocol::auth::Nonce;
use tether_protocol::server::{ServerConfig, ServerEvent, ServerSession};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Baseline tokio + tokio-rustls Tether device server.
#[derive(Parser)]
struct Args {
    /// Data directory (the same one `tether serve` uses: dev PKI and devices.csv).
    #[arg(long, default_value = "tether-data")]
    data_dir: PathBuf,
    /// Device port.
    #[arg(long, default_value = "127.0.0.1:7410")]
    listen: SocketAddr,
    /// Runtime: `current` (single-threaded) or `multi` (tokio's multi-threaded default).
    #[arg(long, default_value = "current")]
    runtime: String,
    /// Heartbeat interval told to devices, seconds.
    #[arg(long, default_value_t = 30)]
    heartbeat_s: u64,
    /// TLS configuration: `plain` is what a plain tokio-rustls server gets from rustls'
    /// defaults (aws-lc-rs: X25519MLKEM768 first, the client's suite order, two tickets);
    /// `tether` is Tether's own (`tls::server_config`), to tell configuration gains from
    /// architecture gains.
    #[arg(long, default_value = "plain")]
    tls: String,
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let rt = match args.runtime.as_str() {
        "current" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        "multi" => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        other => return Err(format!("--runtime must be current or multi, not {other:?}")),
    }
    .map_err(|e| e.to_string())?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> Result<(), String> {
    let pki = DevPki::ensure(&args.data_dir).map_err(|e| e.to_string())?;
    let tls = match args.tls.as_str() {
        "tether" => server_config(&pki.server_cert, &pki.server_key, &TlsOptions::default())
            .map_err(|e| e.to_string())?,
        "plain" => {
            let certs = load_certs(&pki.server_cert, "certificate").map_err(|e| e.to_string())?;
            let key = load_key(&pki.server_key).map_err(|e| e.to_string())?;
            let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| e.to_string())?;
            // The protocol's ALPN, and tickets so devices can resume (a plain server that
            // wants resumption sets a ticketer; rustls' default is a stateful cache).
            c.alpn_protocols = vec![tether_net::tls::ALPN.to_vec()];
            c.ticketer = tether_net::tls::new_ticketer().map_err(|e| e.to_string())?;
            Arc::new(c)
        }
        other => return Err(format!("--tls must be plain or tether, not {other:?}")),
    };
    let registry =
        Arc::new(Registry::load(&args.data_dir.join("devices.csv")).map_err(|e| e.to_string())?);
    let heartbeat = std::time::Duration::from_secs(args.heartbeat_s.max(1));
    let session_cfg = Arc::new(ServerConfig {
        heartbeat,
        idle_timeout: heartbeat * 5 / 2,
        ..ServerConfig::default()
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    eprintln!(
        "baseline-tokio: listening on {} ({} runtime, {} TLS config, {} devices)",
        args.listen,
        args.runtime,
        args.tls,
        registry.len()
    );
    let mut next_session = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            accepted = listener.accept() => {
                let Ok((sock, _)) = accepted else { continue };
                let _ = sock.set_nodelay(true);
                next_session += 1;
                let (acceptor, registry, cfg) = (acceptor.clone(), registry.clone(), session_cfg.clone());
                tokio::spawn(async move {
                    let _ = connection(acceptor, registry, cfg, sock, SessionId(next_session)).await;
                });
            }
        }
    }
}

async fn connection(
    acceptor: tokio_rustls::TlsAcceptor,
    registry: Arc<Registry>,
    cfg: Arc<ServerConfig>,
    sock: tokio::net::TcpStream,
    id: SessionId,
) -> std::io::Result<()> {
    let mut tls = acceptor.accept(sock).await?;
    let mut nonce = [0u8; 32];
    tether_core::fsutil::random_bytes(&mut nonce);
    let mut session = ServerSession::new(&cfg, Nonce(nonce), Instant::now());
    let mut buf = vec![0u8; 4096];
    let mut out = BytesMut::new();
    loop {
        while let Some(e) = session.poll_event() {
            match e {
                ServerEvent::Hello { device, .. } => {
                    let key = registry.get(device).map(|e| e.key.clone());
                    let _ = session.authenticate(Instant::now(), key.as_ref(), id, 0, None);
                }
                ServerEvent::Message { seq, .. } => session.ack_received(seq),
                _ => {}
            }
        }
        out.clear();
        if session.poll_transmit(&mut out) {
            tls.write_all(&out).await?;
        }
        if session.is_closed() {
            return tls.shutdown().await;
        }
        let deadline = session.poll_timeout();
        let read = tls.read(&mut buf);
        let n = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), read).await {
                Ok(r) => r?,
                Err(_) => {
                    session.handle_timeout(Instant::now());
                    continue;
                }
            },
            None => read.await?,
        };
        if n == 0 {
            return Ok(());
        }
        session.handle_bytes(Instant::now(), &buf[..n]);
    }
}
