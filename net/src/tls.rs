//! TLS policy shared by the server, tests and loadgen: the rustls server and client configs
//! (aws-lc-rs, TLS 1.3 only, ALPN `tether/1`; `tether-agent/1` on a TLS agent link), the
//! device client-certificate verifier, PEM loading, and how a device certificate names its
//! device: the device id in decimal in its subject's common name (`CN=42`), see
//! [`cert_device_id`]. Making certificates (the development PKI, the device CA) is the server's
//! business (`tether_core::pki`).
//!
//! Build **one** [`server_config`] and share the `Arc` across all shards: its session-ticket key
//! is made when the config is built, so shards with separate configs could not resume each
//! other's tickets (or pass one shared [`TlsOptions::ticketer`]).

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::Tls13ClientSessionValue;
use rustls::client::{ClientSessionStore, Resumption, Tls12ClientSessionValue};
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::{self, kx_group};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ProducesTickets, VerifierBuilderError, WebPkiClientVerifier};
use rustls::{NamedGroup, RootCertStore};
use tether_protocol::DeviceId;

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
    #[error("CA certificate in {} not accepted: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("device CA {} not usable: {source}", path.display())]
    DeviceCa {
        path: PathBuf,
        source: VerifierBuilderError,
    },
    #[error("{context}: {source}")]
    Config {
        context: String,
        source: rustls::Error,
    },
}

/// The device a client certificate names: the one common name of its subject, read as a
/// device id in decimal (1 to 20 ASCII digits, no sign, no leading zero, below 2^64 − 2).
/// `None` when the certificate does not parse, its subject holds no common name or more than
/// one, or the name is not such a number. Only called on certificates rustls has verified
/// against the device CA.
pub fn cert_device_id(cert: &CertificateDer<'_>) -> Option<DeviceId> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    parse_device_id(one_common_name(parsed.subject())?)
}

/// A device id as a certificate's common name spells it (see [`cert_device_id`]).
pub fn parse_device_id(text: &[u8]) -> Option<DeviceId> {
    let ok = matches!(text, [b'0'] | [b'1'..=b'9', ..])
        && text.len() <= 20
        && text.iter().all(u8::is_ascii_digit);
    let id: u64 = std::str::from_utf8(text)
        .ok()
        .filter(|_| ok)?
        .parse()
        .ok()?;
    // The two largest ids are the markers of a connection's packed certificate identity.
    (id < u64::MAX - 1).then_some(DeviceId(id))
}

/// The value of the one common name (a UTF8String or PrintableString) in a DER `Name`'s
/// content (the `RDNSequence` without its outer tag). `None` if the name does not parse, holds
/// no common name or more than one, a common name of another string type, or more than 64
/// relative names.
fn one_common_name(mut name: &[u8]) -> Option<&[u8]> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut found = None;
    for _ in 0..64 {
        if name.is_empty() {
            return found;
        }
        let (0x31, mut set, rest) = der_tlv(name)? else {
            return None;
        };
        name = rest;
        // Each attribute takes at least 6 bytes of the set: bounded by its length.
        while !set.is_empty() {
            let (0x30, attr, rest) = der_tlv(set)? else {
                return None;
            };
            set = rest;
            let (0x06, oid, value) = der_tlv(attr)? else {
                return None;
            };
            let (tag, text, end) = der_tlv(value)?;
            if !end.is_empty() {
                return None;
            }
            if oid == CN {
                if found.is_some() || !matches!(tag, 0x0c | 0x13) {
                    return None;
                }
                found = Some(text);
            }
        }
    }
    None
}

/// One DER tag-length-value: (tag, content, rest). Lengths up to 64 KiB; `None` if `input`
/// is too short or the encoding is not DER's.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (first as usize, rest),
        0x81 => match rest.split_first()? {
            (&n, rest) if n >= 0x80 => (n as usize, rest),
            _ => return None,
        },
        0x82 => match rest {
            [a, b, rest @ ..] if *a != 0 => ((*a as usize) << 8 | *b as usize, rest),
            _ => return None,
        },
        _ => return None,
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// Reads a file, naming it in the error.
pub fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
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
    let pem = read_file(path, what)?;
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
    let pem = read_file(path, "private key")?;
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
    /// Ask devices for a client certificate issued by a CA in this PEM file. A device whose
    /// certificate verifies is known by the id it names ([`cert_device_id`]); one that sends
    /// none still connects (and proves itself in its `Hello`) unless `require_device_cert`.
    pub device_ca: Option<PathBuf>,
    /// With `device_ca`: refuse a handshake without a valid device certificate.
    pub require_device_cert: bool,
}

pub fn provider(pq_kx: bool) -> Arc<CryptoProvider> {
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

/// The verifier of device client certificates issued by the CA(s) in `ca_pem`.
pub fn device_verifier(
    ca_pem: &Path,
    required: bool,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let roots = load_roots(ca_pem, "device CA certificate")?;
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder.build().map_err(|source| TlsError::DeviceCa {
        path: ca_pem.to_owned(),
        source,
    })
}

/// The CA certificate(s) in a PEM file as a root store.
fn load_roots(ca_pem: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_pem, what)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: ca_pem.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// The server config: TLS 1.3 only, session tickets, half-RTT data on (the auth nonce rides
/// the server's first flight), no 0-RTT, ALPN `tether/1`; device client certificates asked
/// for when `opts.device_ca` is set.
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
    let provider = provider(opts.pq_kx);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            context: context(),
            source,
        })?;
    let builder = match &opts.device_ca {
        Some(ca) => builder.with_client_cert_verifier(device_verifier(
            ca,
            opts.require_device_cert,
            provider,
        )?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
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
    build_client_config(ca_pem, None, opts)
}

/// [`client_config`] that also presents a device certificate (`cert_pem`, `key_pem`: PEM),
/// as a device with a certificate from the device CA does.
pub fn client_config_with_cert(
    ca_pem: &Path,
    cert_pem: &Path,
    key_pem: &Path,
    opts: &ClientTlsOptions,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    build_client_config(ca_pem, Some((cert_pem, key_pem)), opts)
}

fn build_client_config(
    ca_pem: &Path,
    identity: Option<(&Path, &Path)>,
    opts: &ClientTlsOptions,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = load_roots(ca_pem, "CA certificate")?;
    let builder = rustls::ClientConfig::builder_with_provider(provider(opts.pq_kx))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            context: "cannot build the client TLS config".into(),
            source,
        })?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert, "device certificate")?, load_key(key)?)
            .map_err(|source| TlsError::Config {
                context: format!(
                    "cannot use device certificate {} with key {}",
                    cert.display(),
                    key.display()
                ),
                source,
            })?,
    };
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

    /// A DER `Name` content from (OID, string tag, value) attributes, one per RDN set.
    fn name(attrs: &[(&[u8], u8, &[u8])]) -> Vec<u8> {
        fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut v = vec![tag, content.len() as u8];
            v.extend_from_slice(content);
            v
        }
        let mut out = Vec::new();
        for (oid, tag, value) in attrs {
            let mut attr = tlv(0x06, oid);
            attr.extend(tlv(*tag, value));
            out.extend(tlv(0x31, &tlv(0x30, &attr)));
        }
        out
    }

    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const O: &[u8] = &[0x55, 0x04, 0x0a];

    #[test]
    fn common_name_parsing_takes_exactly_one_and_refuses_junk() {
        let good = name(&[(O, 0x0c, b"fleet"), (CN, 0x0c, b"42")]);
        assert_eq!(one_common_name(&good), Some(&b"42"[..]));
        let printable = name(&[(CN, 0x13, b"7")]);
        assert_eq!(one_common_name(&printable), Some(&b"7"[..]));
        for (why, bad) in [
            ("two CNs", name(&[(CN, 0x0c, b"1"), (CN, 0x0c, b"2")])),
            ("no CN", name(&[(O, 0x0c, b"fleet")])),
            ("BMPString CN", name(&[(CN, 0x1e, b"\0\x34")])),
            ("empty", Vec::new()),
        ] {
            assert_eq!(one_common_name(&bad), None, "{why}");
        }
        // Every truncation of a good name, and a few hostile lengths, fail cleanly.
        for n in 0..good.len() {
            assert_eq!(one_common_name(&good[..n]), None, "cut at {n}");
        }
        for bad in [
            &[0x31, 0x84, 0xff, 0xff, 0xff, 0xff][..],
            &[0x31, 0x81, 0x05, 0, 0, 0, 0, 0],
            &[0x31, 0x82, 0x00, 0x05, 0, 0, 0, 0, 0],
            &[0x31, 0x80],
            &[0x30, 0x00],
        ] {
            assert_eq!(one_common_name(bad), None, "{bad:?}");
        }
    }
}
