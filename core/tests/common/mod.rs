//! Test harness: a `tether serve` child process on free loopback ports, a blocking TLS device
//! client driving the protocol crate's device session, and an agent client over plain TCP or
//! TLS (rustls' own client).
#![allow(dead_code)] // reason: each test file uses a different part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tether_core::registry::Registry;
use tether_net::tls::{ClientTlsOptions, client_config};
use tether_protocol::auth::{Nonce, Proof};
use tether_protocol::code::{CodeReceiver, CodeUpdate, ReceiverConfig};
use tether_protocol::codec::{DEFAULT_AGENT_MAX_FRAME, FrameDecoder};
use tether_protocol::device::{DeviceConfig, DeviceEvent, DeviceSession};
use tether_protocol::message::Hello;
use tether_protocol::{AgentMessage, CodeVersion, DeviceId, DeviceMessage, PROTOCOL_VERSION};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    pub devices: SocketAddr,
    pub agents: SocketAddr,
    pub admin: SocketAddr,
    /// The admin token (`admin.token`'s hex).
    pub admin_token: String,
    /// Started with `--agent-tls`: [`Agent::attach`] speaks TLS.
    pub agent_tls: bool,
    pub registry: Registry,
    pub tls: Arc<rustls::ClientConfig>,
    pub stderr: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `tether serve` with `count` provisioned devices and extra flags.
    pub fn start(count: u64, extra: &[&str]) -> Server {
        Self::start_with_groups(count, "default", extra)
    }

    /// Starts `tether serve` with `count` devices spread round-robin over `groups`
    /// (comma-separated).
    pub fn start_with_groups(count: u64, groups: &str, extra: &[&str]) -> Server {
        Self::start_env(count, groups, extra, &[])
    }

    /// [`start_with_groups`](Self::start_with_groups), with environment variables for the
    /// server process.
    pub fn start_env(count: u64, groups: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = std::env::temp_dir().join(format!(
            "tether-test-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args([
                "devices",
                "gen",
                "--count",
                &count.to_string(),
                "--groups",
                groups,
                "--data-dir",
            ])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        Self::spawn(dir, extra, env)
    }

    /// Stops this server (SIGTERM, then kill) and starts another on the same data directory
    /// with new ports.
    pub fn restart(mut self, extra: &[&str]) -> Server {
        if self.terminate(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let dir = std::mem::take(&mut self.dir);
        // `self` is dropped without removing the directory (its path is now empty).
        drop(self);
        Self::spawn(dir, extra, &[])
    }

    /// Starts the server on free ports. A port picked free can be taken by a parallel test
    /// before the server binds it (the server then exits at once): try again with new ports.
    fn spawn(dir: PathBuf, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut last = Vec::new();
        for _ in 0..3 {
            match Self::spawn_once(&dir, extra, env) {
                Ok(s) => return s,
                Err(lines) => last = lines,
            }
        }
        panic!("server did not start: {last:?}");
    }

    fn spawn_once(
        dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, Vec<String>> {
        let dir = dir.to_path_buf();
        let bin = env!("CARGO_BIN_EXE_tether");
        let devices: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let agents: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", &devices.to_string()])
            .args(["--agent-listen", &agents.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(extra)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let listening = line.contains("listening");
                // Kept before the start is reported, so a test sees the `listening` line.
                keep.lock().unwrap().push(line);
                if listening {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(lines.lock().unwrap().clone());
        }
        let registry = Registry::load(&dir.join("devices.csv")).unwrap();
        let ca = dir.join("tls/ca.pem");
        if !ca.exists() {
            // A server on `--cert/--key` makes no dev CA: make one so that `tls` exists (it
            // does not verify that server; such tests bring their own client configs).
            tether_core::pki::DevPki::ensure(&dir).unwrap();
        }
        let tls = client_config(&ca, &ClientTlsOptions::default()).unwrap();
        let admin_token = tether_core::admin::read_admin_token(&dir).unwrap();
        Ok(Server {
            child,
            dir,
            devices,
            agents,
            admin,
            admin_token,
            agent_tls: extra.contains(&"--agent-tls"),
            registry,
            tls,
            stderr: lines,
        })
    }

    /// Device `id`'s config with its real key.
    pub fn config(&self, id: u64) -> DeviceConfig {
        let key = self
            .registry
            .get(DeviceId(id))
            .expect("provisioned")
            .key
            .clone();
        DeviceConfig::new(DeviceId(id), key)
    }

    pub fn device(&self, id: u64) -> Device {
        Device::connect(self, self.config(id))
    }

    /// A device running `code_version`.
    pub fn device_at(&self, id: u64, code_version: CodeVersion) -> Device {
        let mut cfg = self.config(id);
        cfg.code_version = code_version;
        Device::connect(self, cfg)
    }

    /// The rollout status as of now (every shard's part published after the call began).
    pub fn rollout(&self) -> tether_core::deploy::RolloutStatus {
        tether_core::deploy::fetch_rollout_current(self.admin, Some(&self.admin_token)).unwrap()
    }

    pub fn deploy(&self, group: &str, blob: &[u8]) -> tether_core::deploy::DeployReport {
        tether_core::deploy::deploy(self.admin, Some(&self.admin_token), group, blob).unwrap()
    }

    /// The stats as of now (every shard's counters published after the call began).
    pub fn stats(&self) -> tether_core::metrics::MetricsSnapshot {
        tether_core::admin::fetch_stats_current(self.admin, Some(&self.admin_token)).unwrap()
    }

    /// A device whose TLS uses `tls` (another CA, a client certificate) instead of the
    /// server's dev CA.
    pub fn device_with(&self, cfg: DeviceConfig, tls: Arc<rustls::ClientConfig>) -> Device {
        Device::connect_with(self, cfg, tls)
    }

    /// `POST /reload` on the admin port: the status and the body.
    pub fn reload(&self) -> (u16, String) {
        let (status, body) = tether_core::admin::admin_request(
            self.admin,
            Some(&self.admin_token),
            "POST",
            "/reload",
            b"",
        )
        .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// `POST /upgrade` on the admin port (`binary`: the new binary, or this one): the status
    /// and the body.
    pub fn upgrade(&self, binary: Option<&std::path::Path>) -> (u16, String) {
        let body = binary.map(|b| b.display().to_string()).unwrap_or_default();
        let (status, body) = tether_core::client::admin_request_within(
            self.admin,
            Some(&self.admin_token),
            "POST",
            "/upgrade",
            body.as_bytes(),
            Duration::from_secs(60),
        )
        .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Sends the server a signal (our own child).
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc_kill(self.child.id() as i32, sig) };
    }

    /// The server's stderr lines so far that contain `text`.
    pub fn log_lines(&self, text: &str) -> Vec<String> {
        let lines = self.stderr.lock().unwrap();
        lines.iter().filter(|l| l.contains(text)).cloned().collect()
    }

    /// Waits up to `d` until `n` stderr lines contain `text`; returns them.
    pub fn wait_log(&self, text: &str, n: usize, d: Duration) -> Vec<String> {
        let end = Instant::now() + d;
        loop {
            let got = self.log_lines(text);
            if got.len() >= n || Instant::now() >= end {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A full TLS handshake with `tls` and the server's first flight read (its `Challenge`):
    /// `Err` with rustls' reason if the handshake fails.
    pub fn tls_handshake(&self, tls: Arc<rustls::ClientConfig>) -> Result<(), String> {
        tls_handshake_to(self.devices, &tls)
    }

    /// SIGTERM, then wait up to `bound` for the exit.
    pub fn terminate(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling our own child process.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let t = Instant::now();
        while t.elapsed() < bound {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// [`Server::tls_handshake`] to `devices`; a refused or reset connect is an `Err` too.
pub fn tls_handshake_to(
    devices: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let sock = TcpStream::connect(devices).map_err(|e| format!("connect: {e}"))?;
    let mut s = open_tls_on(sock, tls);
    s.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    // The Challenge arrives as half-RTT data: reading one byte completes the handshake.
    match s.read(&mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => Err("closed before the Challenge".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A process the test did not spawn but must not leave behind (an upgrade's new server):
/// killed when dropped.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling a process this test caused to exist.
        unsafe { libc_kill(self.0, 9) };
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A blocking device: TLS over a std socket, driven by the protocol crate's `DeviceSession`,
/// with a `CodeReceiver` that takes any code the server offers.
pub struct Device {
    pub tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    pub session: DeviceSession,
    pub events: Vec<DeviceEvent>,
    pub closed: bool,
    pub code: CodeReceiver,
    pub code_updates: Vec<CodeUpdate>,
    /// Offsets of the code chunks received, in order.
    pub chunk_offsets: Vec<u64>,
    /// Flip a byte in the chunk with this index (counted from 0 over the device's life).
    pub corrupt_chunk: Option<usize>,
    chunks_seen: usize,
    /// The device's TLS client config (reconnects use it too).
    client: Arc<rustls::ClientConfig>,
}

/// A TCP connection to `to` from the loopback address `source` (any port).
pub fn tcp_from(to: SocketAddr, source: std::net::Ipv4Addr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

fn open_tls(
    devices: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    open_tls_on(TcpStream::connect(devices).unwrap(), tls)
}

fn open_tls_on(
    sock: TcpStream,
    tls: &Arc<rustls::ClientConfig>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let conn = rustls::ClientConnection::new(tls.clone(), "localhost".try_into().unwrap()).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

impl Device {
    pub fn connect(server: &Server, cfg: DeviceConfig) -> Device {
        Self::connect_with(server, cfg, server.tls.clone())
    }

    /// Connects with `client` as its TLS config (another CA, a client certificate).
    pub fn connect_with(
        server: &Server,
        cfg: DeviceConfig,
        client: Arc<rustls::ClientConfig>,
    ) -> Device {
        let sock = TcpStream::connect(server.devices).unwrap();
        Self::connect_on(cfg, sock, client)
    }

    /// Connects from the loopback address `source`.
    pub fn connect_from(server: &Server, cfg: DeviceConfig, source: std::net::Ipv4Addr) -> Device {
        Self::connect_on(cfg, tcp_from(server.devices, source), server.tls.clone())
    }

    fn connect_on(cfg: DeviceConfig, sock: TcpStream, client: Arc<rustls::ClientConfig>) -> Device {
        let now = Instant::now();
        let code = CodeReceiver::new(cfg.code_version, ReceiverConfig::default());
        let mut session = DeviceSession::new(cfg, now);
        session.connect(now);
        Device {
            tls: open_tls_on(sock, &client),
            client,
            session,
            events: vec![],
            closed: false,
            code,
            code_updates: vec![],
            chunk_offsets: vec![],
            corrupt_chunk: None,
            chunks_seen: 0,
        }
    }

    /// Drops the connection (no goodbye) and connects again, keeping the session and the
    /// code receiver (so a transfer resumes).
    pub fn reconnect(&mut self, server: &Server) {
        let _ = self.tls.sock.shutdown(std::net::Shutdown::Both);
        self.session
            .connection_lost(tether_protocol::CloseReason::Local(
                tether_protocol::message::GoodbyeReason::Normal,
            ));
        self.tls = open_tls(server.devices, &self.client);
        self.session.connect(Instant::now());
        self.closed = false;
        self.events.clear();
    }

    /// Connects again on a new socket **without closing the old one** (as a device does whose
    /// old connection died silently, e.g. behind a NAT), keeping the session. The old stream is
    /// returned so the caller keeps it open until the server closes it.
    pub fn reconnect_abandoning(
        &mut self,
        server: &Server,
    ) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        let old = std::mem::replace(&mut self.tls, open_tls(server.devices, &self.client));
        self.session
            .connection_lost(tether_protocol::CloseReason::Local(
                tether_protocol::message::GoodbyeReason::Normal,
            ));
        self.session.connect(Instant::now());
        self.closed = false;
        self.events.clear();
        old
    }

    /// Feeds one session event to the code receiver (corrupting a chunk if asked).
    fn code_event(&mut self, e: &DeviceEvent) {
        let now = Instant::now();
        if let DeviceEvent::CodeChunk {
            version,
            offset,
            data,
        } = e
        {
            self.chunk_offsets.push(*offset);
            let n = self.chunks_seen;
            self.chunks_seen += 1;
            if self.corrupt_chunk == Some(n) {
                let mut bad = data.to_vec();
                bad[0] ^= 0xff;
                self.code
                    .handle_chunk(now, *version, *offset, Bytes::from(bad));
                return;
            }
        }
        self.code.handle_device_event(now, e);
    }

    pub fn installed(&self) -> Option<CodeVersion> {
        self.code_updates.iter().rev().find_map(|u| match u {
            CodeUpdate::Installed { version, .. } => Some(*version),
            _ => None,
        })
    }

    /// Pumps until the device runs `v`.
    pub fn until_running(&mut self, v: CodeVersion, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end && self.code.running() < v && !self.closed {
            self.pump_until(Duration::from_millis(20), |_| false);
        }
        self.code.running() >= v
    }

    /// Writes raw plaintext bytes (to inject bad frames).
    pub fn write_raw(&mut self, b: &[u8]) {
        let _ = self.tls.write_all(b);
        let _ = self.tls.flush();
    }

    /// Pumps I/O for up to `d`, or until `until` says stop.
    pub fn pump_until(
        &mut self,
        d: Duration,
        mut until: impl FnMut(&[DeviceEvent]) -> bool,
    ) -> bool {
        let end = Instant::now() + d;
        let mut buf = [0u8; 16 * 1024];
        while Instant::now() < end {
            let now = Instant::now();
            self.session.handle_timeout(now);
            let mut out = BytesMut::new();
            if self.session.poll_transmit(&mut out) {
                if self.tls.write_all(&out).is_err() {
                    self.closed = true;
                }
                let _ = self.tls.flush();
            }
            self.drain_events();
            let mut out = BytesMut::new();
            if self.session.poll_transmit(&mut out) {
                if self.tls.write_all(&out).is_err() {
                    self.closed = true;
                }
                let _ = self.tls.flush();
            }
            if until(&self.events) {
                return true;
            }
            if self.closed {
                return false;
            }
            match self.tls.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.session.handle_bytes(Instant::now(), &buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => self.closed = true,
            }
        }
        // What the last read decoded is the device's too (chunks it holds, events it saw).
        self.drain_events();
        until(&self.events)
    }

    /// Hands the session's decoded events to the code receiver and the event log.
    fn drain_events(&mut self) {
        while let Some(e) = self.session.poll_event() {
            self.code_event(&e);
            self.events.push(e);
        }
        let _ = self.code.flush_into(&mut self.session);
        while let Some(u) = self.code.poll_event() {
            self.code_updates.push(u);
        }
    }

    pub fn established(&mut self) -> bool {
        self.pump_until(Duration::from_secs(10), |ev| {
            ev.iter()
                .any(|e| matches!(e, DeviceEvent::Connected { .. }))
        })
    }

    /// Pumps until the server closes the connection (TCP EOF or error).
    pub fn wait_closed(&mut self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end && !self.closed {
            self.pump_until(Duration::from_millis(100), |_| false);
        }
        self.closed
    }
}

/// A byte stream an agent speaks over: a socket, or rustls' client over one.
pub trait Link: Read + Write + Send {}
impl<T: Read + Write + Send> Link for T {}

/// A blocking agent over the agent link (TLS when the server has `--agent-tls`).
pub struct Agent {
    link: Box<dyn Link>,
    dec: FrameDecoder,
}

/// The TLS handshake towards a `--agent-tls` port, done before the first frame (with a
/// 5 s read timeout, so a slow server is not taken for a broken one).
pub fn agent_tls_stream(
    server: &Server,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut sock = TcpStream::connect(server.agents).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let config = tether_net::tls::agent_client_config(&server.dir.join("tls/ca.pem")).unwrap();
    let mut conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    rustls::StreamOwned::new(conn, sock)
}

impl Agent {
    /// [`attach`](Self::attach), and its `AgentWelcome` received.
    pub fn attach_welcomed(server: &Server) -> Agent {
        let mut agent = Self::attach(server);
        let w = agent.recv(Duration::from_secs(10));
        assert!(
            matches!(w, Some(AgentMessage::AgentWelcome { .. })),
            "no AgentWelcome: {w:?}"
        );
        agent
    }

    pub fn attach(server: &Server) -> Agent {
        let token = std::fs::read_to_string(server.dir.join("agent.token")).unwrap();
        Self::attach_with(server, token.trim().as_bytes())
    }

    pub fn attach_with(server: &Server, token: &[u8]) -> Agent {
        let link: Box<dyn Link> = if server.agent_tls {
            Box::new(agent_tls_stream(server))
        } else {
            let sock = TcpStream::connect(server.agents).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            Box::new(sock)
        };
        let mut a = Agent {
            link,
            dec: FrameDecoder::new(DEFAULT_AGENT_MAX_FRAME),
        };
        a.send(&AgentMessage::AgentHello {
            version: PROTOCOL_VERSION,
            token: Bytes::copy_from_slice(token),
            name: Bytes::from_static(b"test-agent"),
        });
        a
    }

    /// Attaches over `sock`, a plain TCP connection to the agent port the caller made (e.g.
    /// with a small receive buffer, for an agent that reads slowly).
    pub fn attach_on(server: &Server, sock: TcpStream) -> Agent {
        let token = std::fs::read_to_string(server.dir.join("agent.token")).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut a = Agent {
            link: Box::new(sock),
            dec: FrameDecoder::new(DEFAULT_AGENT_MAX_FRAME),
        };
        a.send(&AgentMessage::AgentHello {
            version: PROTOCOL_VERSION,
            token: Bytes::copy_from_slice(token.trim().as_bytes()),
            name: Bytes::from_static(b"test-agent"),
        });
        a
    }

    /// Writes all of `ms` with one write (so the server reads them in a burst).
    pub fn send_all(&mut self, ms: &[AgentMessage]) {
        let mut b = BytesMut::new();
        for m in ms {
            m.encode(&mut b).unwrap();
        }
        self.link.write_all(&b).unwrap();
        self.link.flush().unwrap();
    }

    /// Writes raw bytes on the link (to inject frames the agent link does not speak).
    pub fn write_raw(&mut self, b: &[u8]) {
        self.link.write_all(b).unwrap();
        self.link.flush().unwrap();
    }

    /// [`send`](Self::send) that tolerates a link the server has closed.
    pub fn send_or_closed(&mut self, m: &AgentMessage) {
        let mut b = BytesMut::new();
        m.encode(&mut b).unwrap();
        let _ = self.link.write_all(&b);
        let _ = self.link.flush();
    }

    pub fn send(&mut self, m: &AgentMessage) {
        let mut b = BytesMut::new();
        m.encode(&mut b).unwrap();
        self.link.write_all(&b).unwrap();
        self.link.flush().unwrap();
    }

    /// The next frame within `d`, if any.
    pub fn recv(&mut self, d: Duration) -> Option<AgentMessage> {
        let end = Instant::now() + d;
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(f) = self.dec.next_frame().unwrap() {
                return Some(AgentMessage::decode(f).unwrap());
            }
            if Instant::now() >= end {
                return None;
            }
            match self.link.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.dec.push(&buf[..n]),
                Err(_) => {}
            }
        }
    }

    /// Frames until one matches, within `d`.
    pub fn recv_until(
        &mut self,
        d: Duration,
        mut f: impl FnMut(&AgentMessage) -> bool,
    ) -> Option<AgentMessage> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if let Some(m) = self.recv(end - Instant::now()) {
                if f(&m) {
                    return Some(m);
                }
            }
        }
        None
    }
}

// ---- openssl s_client: a TLS client nobody here wrote ----

/// How long an [`SClient`] waits for a frame or the server's close.
const S_CLIENT_WAIT: Duration = Duration::from_secs(10);

pub fn have_openssl() -> bool {
    if Command::new("openssl").arg("version").output().is_ok() {
        return true;
    }
    eprintln!("SKIPPED: no `openssl` binary (install the `openssl` package)");
    false
}

/// An `openssl s_client` connected to the device port; what the server sends arrives on
/// `frames`, decoded.
pub struct SClient {
    child: Child,
    frames: mpsc::Receiver<DeviceMessage>,
}

impl SClient {
    pub fn connect(s: &Server, cert: Option<&(PathBuf, PathBuf)>) -> SClient {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-connect", &s.devices.to_string(), "-tls1_3"])
            .args(["-servername", "localhost", "-alpn", "tether/1", "-CAfile"])
            .arg(s.dir.join("tls/ca.pem"))
            // -quiet: no session printout on stdout, only what the server sends; it implies
            // -ign_eof, so closing stdin does not end the connection.
            .args(["-verify_return_error", "-quiet", "-ign_eof"]);
        if let Some((c, k)) = cert {
            cmd.arg("-cert").arg(c).arg("-key").arg(k);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, frames) = mpsc::channel();
        std::thread::spawn(move || {
            let mut dec = FrameDecoder::new(1 << 16);
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                dec.push(&buf[..n]);
                while let Ok(Some(f)) = dec.next_frame() {
                    let Ok(m) = DeviceMessage::decode(f) else {
                        return;
                    };
                    if tx.send(m).is_err() {
                        return;
                    }
                }
            }
        });
        SClient { child, frames }
    }

    pub fn send(&mut self, m: &DeviceMessage) {
        let mut b = BytesMut::new();
        m.encode(&mut b).unwrap();
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(&b).unwrap();
        stdin.flush().unwrap();
    }

    pub fn next(&self) -> Option<DeviceMessage> {
        self.frames.recv_timeout(S_CLIENT_WAIT).ok()
    }

    /// The server's `Challenge` nonce.
    pub fn challenge(&self) -> Nonce {
        match self.next() {
            Some(DeviceMessage::Challenge { nonce }) => nonce,
            other => panic!("expected a Challenge, got {other:?}"),
        }
    }

    /// True once the server has closed the connection (s_client's stdout ends).
    pub fn closed_by_server(&self) -> bool {
        let end = Instant::now() + S_CLIENT_WAIT;
        while Instant::now() < end {
            match self.frames.recv_timeout(Duration::from_millis(100)) {
                Err(mpsc::RecvTimeoutError::Disconnected) => return true,
                _ => continue,
            }
        }
        false
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `Hello` for `device` with `proof`, as a raw client (`openssl s_client`) sends it.
pub fn hello(device: u64, proof: Proof) -> DeviceMessage {
    DeviceMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        device: DeviceId(device),
        proof,
        code_version: CodeVersion(0),
        fw_version: Bytes::from_static(b"s_client"),
        resume: None,
    })
}
