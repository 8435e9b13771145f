//! Test harness: a `tether serve` child process on free loopback ports, a blocking TLS device
//! client driving the protocol crate's device session, and a plain-TCP agent client.
#![allow(dead_code)] // reason: each test file uses a different part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tether_core::registry::Registry;
use tether_core::tls::{ClientTlsOptions, client_config};
use tether_protocol::codec::{DEFAULT_AGENT_MAX_FRAME, FrameDecoder};
use tether_protocol::device::{DeviceConfig, DeviceEvent, DeviceSession};
use tether_protocol::{DeviceId, Message, PROTOCOL_VERSION};

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
    pub registry: Registry,
    pub tls: Arc<rustls::ClientConfig>,
    pub stderr: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `tether serve` with `count` provisioned devices and extra flags.
    pub fn start(count: u64, extra: &[&str]) -> Server {
        let dir = std::env::temp_dir().join(format!(
            "tether-test-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bin = env!("CARGO_BIN_EXE_tether");
        let st = Command::new(bin)
            .args([
                "devices",
                "gen",
                "--count",
                &count.to_string(),
                "--data-dir",
            ])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
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
                if line.contains("listening") {
                    let _ = tx.send(());
                }
                keep.lock().unwrap().push(line);
            }
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = child.kill();
            panic!("server did not start: {:?}", lines.lock().unwrap());
        }
        let registry = Registry::load(&dir.join("devices.csv")).unwrap();
        let tls = client_config(&dir.join("tls/ca.pem"), &ClientTlsOptions::default()).unwrap();
        Server {
            child,
            dir,
            devices,
            agents,
            admin,
            registry,
            tls,
            stderr: lines,
        }
    }

    pub fn device(&self, id: u64) -> Device {
        let key = self
            .registry
            .get(DeviceId(id))
            .expect("provisioned")
            .key
            .clone();
        Device::connect(self, DeviceConfig::new(DeviceId(id), key))
    }

    pub fn stats(&self) -> tether_core::metrics::MetricsSnapshot {
        tether_core::admin::fetch_stats(self.admin).unwrap()
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

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A blocking device: TLS over a std socket, driven by the protocol crate's `DeviceSession`.
pub struct Device {
    pub tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    pub session: DeviceSession,
    pub events: Vec<DeviceEvent>,
    pub closed: bool,
}

impl Device {
    pub fn connect(server: &Server, cfg: DeviceConfig) -> Device {
        let sock = TcpStream::connect(server.devices).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let conn =
            rustls::ClientConnection::new(server.tls.clone(), "localhost".try_into().unwrap())
                .unwrap();
        let now = Instant::now();
        let mut session = DeviceSession::new(cfg, now);
        session.connect(now);
        Device {
            tls: rustls::StreamOwned::new(conn, sock),
            session,
            events: vec![],
            closed: false,
        }
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
            while let Some(e) = self.session.poll_event() {
                self.events.push(e);
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
        until(&self.events)
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

/// A blocking agent over the plain-TCP agent link.
pub struct Agent {
    pub sock: TcpStream,
    dec: FrameDecoder,
}

impl Agent {
    pub fn attach(server: &Server) -> Agent {
        let token = std::fs::read_to_string(server.dir.join("agent.token")).unwrap();
        Self::attach_with(server, token.trim().as_bytes())
    }

    pub fn attach_with(server: &Server, token: &[u8]) -> Agent {
        let sock = TcpStream::connect(server.agents).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut a = Agent {
            sock,
            dec: FrameDecoder::new(DEFAULT_AGENT_MAX_FRAME),
        };
        a.send(&Message::AgentHello {
            version: PROTOCOL_VERSION,
            token: Bytes::copy_from_slice(token),
            name: Bytes::from_static(b"test-agent"),
        });
        a
    }

    pub fn send(&mut self, m: &Message) {
        let mut b = BytesMut::new();
        m.encode(&mut b).unwrap();
        self.sock.write_all(&b).unwrap();
    }

    /// The next frame within `d`, if any.
    pub fn recv(&mut self, d: Duration) -> Option<Message> {
        let end = Instant::now() + d;
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(f) = self.dec.next_frame().unwrap() {
                return Some(Message::decode(f).unwrap());
            }
            if Instant::now() >= end {
                return None;
            }
            match self.sock.read(&mut buf) {
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
        mut f: impl FnMut(&Message) -> bool,
    ) -> Option<Message> {
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
