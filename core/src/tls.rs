//! TLS setup: a development PKI made on first run, and the rustls server and client configs
//! (aws-lc-rs, TLS 1.3 only, ALPN `tether/1`; `tether-agent/1` on a TLS agent link) that the
//! server, tests and loadgen share.
//!
//! Build **one** [`server_config`] and share the `Arc` across all shards: its session-ticket key
//! is made when the config is built, so shards with separate configs could not resume each
//! other's tickets (or pass one shared [`TlsOptions::ticketer`]).

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::Tls13ClientSessionValue;
use rustls::client::{ClientSessionStore, Resumption, Tls12ClientSessionValue};
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::{self, kx_group};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::ProducesTickets;
use rustls::{NamedGroup, RootCertStore};

use crate::fsutil::{PUBLIC_MODE, SECRET_MODE, write_atomic};

/// The ALPN protocol name of the device protocol.
pub const ALPN: &[u8] = b"tether/1";
/// The ALPN protocol name of the agent link over TLS (`--agent-tls`): another protocol than
/// the devices', so a device client offering `tether/1` is refused in the handshake there.
pub const AGENT_ALPN: &[u8] = b"tether-agent/1";

/// Why TLS setup failed; every message names the file and what was wrong with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot write {what} {}: {source}", path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("bad PEM in {what} {}: {source}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate found in {}", path.display())]
    NoCertificate { path: PathBuf },
    #[error("no private key found in {}", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("cannot generate the dev certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot use the dev CA key {}: {source}", path.display())]
    CaKey { path: PathBuf, source: rcgen::Error },
    #[error("CA certificate in {} not accepted: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{context}: {source}")]
    Config {
        context: String,
        source: rustls::Error,
    },
}

/// The development PKI under `data_dir/tls/`: a CA and a server certificate it signed for
/// `localhost`, `127.0.0.1` and `::1` (ECDSA P-256). Not for production: use a real CA there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// The CA certificate; devices, agents and loadgen trust it.
    pub ca_cert: PathBuf,
    /// The CA private key (mode 0600).
    pub ca_key: PathBuf,
    /// The server certificate chain (leaf only; the CA is the trust anchor).
    pub server_cert: PathBuf,
    /// The server private key (mode 0600).
    pub server_key: PathBuf,
    /// True if this call created (some of) the files.
    pub created: bool,
}

const CA_CN: &str = "Tether development CA";
const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

impl DevPki {
    /// Creates the dev PKI on first run, or finds the one made earlier. If the CA exists but
    /// the server certificate or key is missing, a new server certificate is issued by the
    /// same CA, so clients that trust it keep working.
    pub fn ensure(data_dir: &Path) -> Result<DevPki, TlsError> {
        let dir = data_dir.join("tls");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| TlsError::Write {
                what: "TLS directory",
                path: dir.clone(),
                source,
            })?;
        let mut pki = DevPki {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            created: false,
        };
        let issuer = if pki.ca_cert.exists() && pki.ca_key.exists() {
            // Check the CA parses now rather than at the first client.
            load_certs(&pki.ca_cert, "CA certificate")?;
            None
        } else {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let params = ca_params()?;
            let cert = params.self_signed(&key)?;
            write(&pki.ca_key, &key.serialize_pem(), SECRET_MODE, "CA key")?;
            write(&pki.ca_cert, &cert.pem(), PUBLIC_MODE, "CA certificate")?;
            pki.created = true;
            Some(Issuer::new(params, key))
        };
        if pki.created || !pki.server_cert.exists() || !pki.server_key.exists() {
            let issuer = match issuer {
                Some(i) => i,
                None => {
                    let pem = read(&pki.ca_key, "CA key")?;
                    let text = String::from_utf8_lossy(&pem);
                    let key = KeyPair::from_pem(&text).map_err(|source| TlsError::CaKey {
                        path: pki.ca_key.clone(),
                        source,
                    })?;
                    // The CA's name and key identify it; rebuilding its params from the same
                    // constants issues certificates that chain to the stored CA certificate.
                    Issuer::new(ca_params()?, key)
                }
            };
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::new(
                SERVER_NAMES
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )?;
            params
                .distinguished_name
                .push(DnType::CommonName, "localhost");
            params.use_authority_key_identifier_extension = true;
            params.key_usages.push(KeyUsagePurpose::DigitalSignature);
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
            let cert = params.signed_by(&key, &issuer)?;
            write(
                &pki.server_key,
                &key.serialize_pem(),
                SECRET_MODE,
                "server key",
            )?;
            write(
                &pki.server_cert,
                &cert.pem(),
                PUBLIC_MODE,
                "server certificate",
            )?;
            pki.created = true;
        }
        Ok(pki)
    }
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, CA_CN);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Tether");
    params.key_usages.push(KeyUsagePurpose::KeyCertSign);
    params.key_usages.push(KeyUsagePurpose::CrlSign);
    params.key_usages.push(KeyUsagePurpose::DigitalSignature);
    Ok(params)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, text: &str, mode: u32, what: &'static str) -> Result<(), TlsError> {
    write_atomic(path, text.as_bytes(), mode).map_err(|source| TlsError::Write {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Reads every certificate in a PEM file; an error if there is none.
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, SEC1 or PKCS#1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            what: "private key",
            path: path.to_owned(),
            source,
        },
    })
}

/// Server TLS options.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Offer X25519MLKEM768 first (post-quantum hybrid; ≈16 µs more per handshake).
    /// Off by default: then only X25519 and P-256 are offered.
    pub pq_kx: bool,
    /// Let rustls hand out traffic secrets after the handshake; the detached-TLS mode needs it.
    pub secret_extraction: bool,
    /// A session-ticket key shared with other configs (other processes of an upgrade, or a farm).
    /// `None` makes a fresh one.
    pub ticketer: Option<Arc<dyn ProducesTickets>>,
}

fn provider(pq_kx: bool) -> Arc<CryptoProvider> {
    let mut p = aws_lc_rs::default_provider();
    // SHA-256 suites first: their key schedule runs on the CPU's SHA extensions, where
    // SHA-384 (AES-256-GCM's suite) has none and was the largest single cost of a handshake
    // in a profile. ChaCha20-Poly1305 leads: many devices lack AES instructions, and its
    // detached state needs no rekey at detach and can move between processes (see detached).
    p.cipher_suites = vec![
        aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    p.kx_groups = if pq_kx {
        vec![
            kx_group::X25519MLKEM768,
            kx_group::X25519,
            kx_group::SECP256R1,
        ]
    } else {
        vec![kx_group::X25519, kx_group::SECP256R1]
    };
    Arc::new(p)
}

/// A fresh session-ticket key (aws-lc-rs, rotated by rustls every 6 hours).
pub fn new_ticketer() -> Result<Arc<dyn ProducesTickets>, TlsError> {
    aws_lc_rs::Ticketer::new().map_err(|source| TlsError::Config {
        context: "cannot create the session-ticket key".into(),
        source,
    })
}

/// The server config: TLS 1.3 only, no client certificates, session tickets, half-RTT data on
/// (the auth nonce rides the server's first flight), no 0-RTT, ALPN `tether/1`.
pub fn server_config(
    cert_chain_pem: &Path,
    key_pem: &Path,
    opts: &TlsOptions,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(cert_chain_pem, "certificate")?;
    let key = load_key(key_pem)?;
    let context = || {
        format!(
            "cannot use certificate {} with key {}",
            cert_chain_pem.display(),
            key_pem.display()
        )
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider(opts.pq_kx))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            context: context(),
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Config {
            context: context(),
            source,
        })?;
    config.ticketer = match &opts.ticketer {
        Some(t) => t.clone(),
        None => new_ticketer()?,
    };
    config.send_half_rtt_data = true;
    config.max_early_data_size = 0;
    // Our suite order, not the client's (rustls clients put AES-256-GCM-SHA384 first).
    config.ignore_client_order = true;
    // A device reconnects once per ticket and gets a fresh one each time: one is enough, and
    // each costs the server a key derivation and a seal.
    config.send_tls13_tickets = 1;
    config.enable_secret_extraction = opts.secret_extraction;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The agent link's server config (`--agent-tls`): [`server_config`]'s TLS 1.3 and suites with
/// ALPN `tether-agent/1`, and no half-RTT data (the agent speaks first).
pub fn agent_server_config(
    cert_chain_pem: &Path,
    key_pem: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = Arc::unwrap_or_clone(server_config(
        cert_chain_pem,
        key_pem,
        &TlsOptions::default(),
    )?);
    config.send_half_rtt_data = false;
    config.alpn_protocols = vec![AGENT_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// An agent's client config for a TLS agent link: [`client_config`] trusting `ca_pem`, with
/// ALPN `tether-agent/1`.
pub fn agent_client_config(ca_pem: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut config = Arc::unwrap_or_clone(client_config(ca_pem, &ClientTlsOptions::default())?);
    config.alpn_protocols = vec![AGENT_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Client TLS options.
#[derive(Debug, Clone)]
pub struct ClientTlsOptions {
    /// Offer X25519MLKEM768 first, as the server may.
    pub pq_kx: bool,
    /// How many session tickets the shared [`TicketPool`] keeps per server name; 0 disables
    /// resumption (also with a `session_store`).
    pub session_tickets: usize,
    /// Let rustls hand out traffic secrets (for a detached client record layer).
    pub secret_extraction: bool,
    /// Keep tickets here instead of a shared [`TicketPool`] (when `session_tickets` > 0): a
    /// load generator keeps each simulated device's own ticket this way.
    pub session_store: Option<Arc<dyn ClientSessionStore>>,
}

impl Default for ClientTlsOptions {
    fn default() -> Self {
        ClientTlsOptions {
            pq_kx: false,
            session_tickets: 256,
            secret_extraction: false,
            session_store: None,
        }
    }
}

/// A client config that trusts the CA(s) in `ca_pem`: TLS 1.3, the server's key-exchange
/// order, resumption from a ticket pool of `opts.session_tickets` per server, ALPN `tether/1`.
pub fn client_config(
    ca_pem: &Path,
    opts: &ClientTlsOptions,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_pem, "CA certificate")? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: ca_pem.to_owned(),
            source,
        })?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider(opts.pq_kx))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            context: "cannot build the client TLS config".into(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = match (opts.session_tickets, &opts.session_store) {
        (0, _) => Resumption::disabled(),
        (_, Some(store)) => Resumption::store(store.clone()),
        (n, None) => Resumption::store(Arc::new(TicketPool::new(n))),
    };
    config.enable_secret_extraction = opts.secret_extraction;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// A client session store that keeps up to `per_server` TLS 1.3 tickets per server name.
///
/// rustls' own in-memory cache keeps at most 8 tickets per name, and tickets are single-use,
/// so many clients of one process reconnecting to one name would mostly do full handshakes.
/// Every connection of the config shares the pool; a load generator that must keep each
/// simulated device's ticket its own passes its own store instead
/// ([`ClientTlsOptions::session_store`]). TLS 1.2 sessions are never stored (TLS 1.3 only).
#[derive(Debug)]
pub struct TicketPool {
    per_server: usize,
    servers: Mutex<HashMap<ServerName<'static>, PoolEntry>>,
}

#[derive(Debug, Default)]
struct PoolEntry {
    kx_hint: Option<NamedGroup>,
    tickets: VecDeque<Tls13ClientSessionValue>,
}

impl TicketPool {
    /// A pool holding up to `per_server` tickets for each server name.
    pub fn new(per_server: usize) -> TicketPool {
        TicketPool {
            per_server,
            servers: Mutex::new(HashMap::new()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<ServerName<'static>, PoolEntry>) -> R) -> R {
        // A panic while holding this lock cannot leave the map inconsistent; keep going.
        let mut guard = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

impl ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.with(|m| m.entry(server_name).or_default().kx_hint = Some(group));
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.with(|m| m.get(server_name).and_then(|e| e.kx_hint))
    }

    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.with(|m| {
            let e = m.entry(server_name).or_default();
            if e.tickets.len() >= self.per_server {
                e.tickets.pop_front();
            }
            e.tickets.push_back(value);
        });
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        // Newest first: the least likely to have expired.
        self.with(|m| m.get_mut(server_name).and_then(|e| e.tickets.pop_back()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::TestDir;
    use rustls::{ClientConnection, HandshakeKind, ServerConnection};
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;

    /// Moves bytes both ways until neither side has anything to send (bounded).
    fn pump(c: &mut ClientConnection, s: &mut ServerConnection) {
        for _ in 0..20 {
            let mut moved = false;
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                moved = true;
                s.read_tls(&mut &buf[..]).unwrap();
                s.process_new_packets().unwrap();
            }
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                moved = true;
                c.read_tls(&mut &buf[..]).unwrap();
                c.process_new_packets().unwrap();
            }
            if !moved {
                return;
            }
        }
        panic!("handshake did not settle in 20 rounds");
    }

    fn connect(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> (ClientConnection, ServerConnection) {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = ClientConnection::new(client.clone(), name).unwrap();
        let mut s = ServerConnection::new(server.clone()).unwrap();
        pump(&mut c, &mut s);
        assert!(!c.is_handshaking() && !s.is_handshaking());
        // Tickets arrive after the handshake; one app-data exchange makes sure they are read.
        s.writer().write_all(b"hi").unwrap();
        pump(&mut c, &mut s);
        let mut got = [0u8; 2];
        c.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        (c, s)
    }

    fn configs(dir: &Path) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let pki = DevPki::ensure(dir).unwrap();
        let opts = TlsOptions {
            secret_extraction: true,
            ..TlsOptions::default()
        };
        let server = server_config(&pki.server_cert, &pki.server_key, &opts).unwrap();
        let client = client_config(&pki.ca_cert, &ClientTlsOptions::default()).unwrap();
        (server, client)
    }

    #[test]
    fn ensure_twice_keeps_the_same_ca_and_protects_keys() {
        let dir = TestDir::new("tls-ensure");
        let a = DevPki::ensure(dir.path()).unwrap();
        assert!(a.created);
        let ca = fs::read(&a.ca_cert).unwrap();
        let b = DevPki::ensure(dir.path()).unwrap();
        assert!(!b.created);
        assert_eq!(fs::read(&b.ca_cert).unwrap(), ca);
        for key in [&a.ca_key, &a.server_key] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }

    #[test]
    fn handshake_negotiates_tls13_and_alpn_then_resumes() {
        let dir = TestDir::new("tls-hs");
        let (server, client) = configs(dir.path());
        let (c, s) = connect(&client, &server);
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(s.alpn_protocol(), Some(ALPN));
        assert_eq!(c.alpn_protocol(), Some(ALPN));
        assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
        assert_eq!(
            c.negotiated_key_exchange_group().map(|g| g.name()),
            Some(NamedGroup::X25519)
        );
        assert!(c.tls13_tickets_received() > 0);

        let (c2, s2) = connect(&client, &server);
        assert_eq!(c2.handshake_kind(), Some(HandshakeKind::Resumed));
        assert_eq!(s2.handshake_kind(), Some(HandshakeKind::Resumed));
    }

    #[test]
    fn server_cert_reissued_by_the_same_ca_still_verifies() {
        let dir = TestDir::new("tls-reissue");
        let first = DevPki::ensure(dir.path()).unwrap();
        let ca = fs::read(&first.ca_cert).unwrap();
        fs::remove_file(&first.server_cert).unwrap();
        let again = DevPki::ensure(dir.path()).unwrap();
        assert!(again.created);
        assert_eq!(fs::read(&again.ca_cert).unwrap(), ca);
        let (server, client) = configs(dir.path());
        connect(&client, &server);
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = TestDir::new("tls-err");
        let missing = dir.path().join("server.pem");
        let e = server_config(&missing, &missing, &TlsOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("cannot read certificate "), "{msg}");
        assert!(msg.contains("server.pem"), "{msg}");

        let pki = DevPki::ensure(dir.path()).unwrap();
        let e =
            server_config(&pki.server_cert, &pki.server_cert, &TlsOptions::default()).unwrap_err();
        assert!(e.to_string().starts_with("no private key found in "), "{e}");

        let e = client_config(&pki.server_key, &ClientTlsOptions::default()).unwrap_err();
        assert!(e.to_string().starts_with("no certificate found in "), "{e}");
    }

    #[test]
    fn agent_configs_speak_their_own_alpn() {
        let dir = TestDir::new("tls-agent");
        let pki = DevPki::ensure(dir.path()).unwrap();
        let server = agent_server_config(&pki.server_cert, &pki.server_key).unwrap();
        let client = agent_client_config(&pki.ca_cert).unwrap();
        let (c, s) = connect(&client, &server);
        assert_eq!(c.alpn_protocol(), Some(AGENT_ALPN));
        assert_eq!(s.alpn_protocol(), Some(AGENT_ALPN));
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));

        // A device client (ALPN tether/1) is refused by the agent port's config.
        let device = client_config(&pki.ca_cert, &ClientTlsOptions::default()).unwrap();
        let mut c =
            ClientConnection::new(device, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut s = ServerConnection::new(server).unwrap();
        let mut hello = Vec::new();
        c.write_tls(&mut hello).unwrap();
        s.read_tls(&mut &hello[..]).unwrap();
        let e = s.process_new_packets().unwrap_err();
        assert_eq!(e, rustls::Error::NoApplicationProtocol);
    }

    #[test]
    fn pq_option_puts_mlkem_first() {
        let dir = TestDir::new("tls-pq");
        let pki = DevPki::ensure(dir.path()).unwrap();
        let opts = TlsOptions {
            pq_kx: true,
            ..TlsOptions::default()
        };
        let server = server_config(&pki.server_cert, &pki.server_key, &opts).unwrap();
        let copts = ClientTlsOptions {
            pq_kx: true,
            ..ClientTlsOptions::default()
        };
        let client = client_config(&pki.ca_cert, &copts).unwrap();
        let (c, _) = connect(&client, &server);
        assert_eq!(
            c.negotiated_key_exchange_group().map(|g| g.name()),
            Some(NamedGroup::X25519MLKEM768)
        );
    }
}
