//! TLS setup: a development PKI made on first run, a device CA that issues device client
//! certificates, and the rustls server and client configs (aws-lc-rs, TLS 1.3 only, ALPN
//! `tether/1`) that the server, tests and loadgen share.
//!
//! A device certificate names its device in its subject's common name: the device id in
//! decimal (`CN=42`), see [`cert_device_id`].
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
use rustls::server::{ProducesTickets, VerifierBuilderError, WebPkiClientVerifier};
use rustls::{NamedGroup, RootCertStore};
use tether_protocol::DeviceId;

use crate::fsutil::{PUBLIC_MODE, SECRET_MODE, write_atomic};

/// The ALPN protocol name of the device and agent protocol.
pub const ALPN: &[u8] = b"tether/1";

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
    #[error("device CA {} not usable: {source}", path.display())]
    DeviceCa {
        path: PathBuf,
        source: VerifierBuilderError,
    },
    #[error("{} exists already; not overwritten", path.display())]
    Exists { path: PathBuf },
    #[error("device id {0} cannot be named in a certificate (the two largest ids are reserved)")]
    ReservedDeviceId(u64),
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
        private_dir(&dir, "TLS directory")?;
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
            pki.created = true;
            Some(make_ca(CA_CN, &pki.ca_cert, &pki.ca_key)?)
        };
        if pki.created || !pki.server_cert.exists() || !pki.server_key.exists() {
            let issuer = match issuer {
                Some(i) => i,
                None => load_issuer(CA_CN, &pki.ca_key)?,
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

fn ca_params(cn: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Tether");
    params.key_usages.push(KeyUsagePurpose::KeyCertSign);
    params.key_usages.push(KeyUsagePurpose::CrlSign);
    params.key_usages.push(KeyUsagePurpose::DigitalSignature);
    Ok(params)
}

/// Makes a CA named `cn` (ECDSA P-256), writes its certificate and key (0600), and returns it.
fn make_ca(cn: &str, cert: &Path, key: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(cn)?;
    let made = params.self_signed(&pair)?;
    write(key, &pair.serialize_pem(), SECRET_MODE, "CA key")?;
    write(cert, &made.pem(), PUBLIC_MODE, "CA certificate")?;
    Ok(Issuer::new(params, pair))
}

/// A CA made by [`make_ca`], from its key file.
fn load_issuer(cn: &str, key: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let pem = read(key, "CA key")?;
    let text = String::from_utf8_lossy(&pem);
    let pair = KeyPair::from_pem(&text).map_err(|source| TlsError::CaKey {
        path: key.to_owned(),
        source,
    })?;
    // The CA's name and key identify it; rebuilding its params from the same constants
    // issues certificates that chain to the stored CA certificate.
    Ok(Issuer::new(ca_params(cn)?, pair))
}

/// Creates `dir` (mode 0700) if missing.
fn private_dir(dir: &Path, what: &'static str) -> Result<(), TlsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::Write {
            what,
            path: dir.to_owned(),
            source,
        })
}

const DEVICE_CA_CN: &str = "Tether device CA";

/// A device CA in a directory of its own: `ca.pem` (give it to `tether serve --device-ca`) and
/// `ca.key` (mode 0600; keep it off the server). It issues device client certificates whose
/// common name is the device id ([`cert_device_id`]). For first steps and tests; a fleet's
/// own PKI works the same if its certificates name devices that way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCa {
    /// The CA certificate.
    pub cert: PathBuf,
    /// The CA private key (mode 0600).
    pub key: PathBuf,
    /// True if this call created the CA.
    pub created: bool,
}

/// A device certificate and its key, as [`DeviceCa::issue`] wrote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCert {
    /// The certificate (leaf only; the device CA is the trust anchor).
    pub cert: PathBuf,
    /// The private key (mode 0600).
    pub key: PathBuf,
}

impl DeviceCa {
    /// Creates the device CA in `dir` (mode 0700) on first use, or finds the one made earlier.
    pub fn ensure(dir: &Path) -> Result<DeviceCa, TlsError> {
        private_dir(dir, "device CA directory")?;
        let mut ca = DeviceCa::paths(dir);
        if ca.cert.exists() && ca.key.exists() {
            load_certs(&ca.cert, "device CA certificate")?;
        } else {
            make_ca(DEVICE_CA_CN, &ca.cert, &ca.key)?;
            ca.created = true;
        }
        Ok(ca)
    }

    /// The device CA made earlier in `dir`; an error naming the file if it is missing.
    pub fn open(dir: &Path) -> Result<DeviceCa, TlsError> {
        let ca = DeviceCa::paths(dir);
        load_certs(&ca.cert, "device CA certificate")?;
        read(&ca.key, "device CA key")?;
        Ok(ca)
    }

    fn paths(dir: &Path) -> DeviceCa {
        DeviceCa {
            cert: dir.join("ca.pem"),
            key: dir.join("ca.key"),
            created: false,
        }
    }

    /// Issues a client certificate for `device` (`CN=<id>`, ECDSA P-256, client-auth usage)
    /// into `out_dir` as `device-<id>.pem` and `device-<id>.key` (0600). Refuses to overwrite
    /// either, and checks that the new certificate verifies against this CA's certificate (so
    /// a CA made elsewhere is refused rather than issuing certificates that do not chain).
    pub fn issue(&self, device: DeviceId, out_dir: &Path) -> Result<DeviceCert, TlsError> {
        if parse_device_id(device.0.to_string().as_bytes()) != Some(device) {
            return Err(TlsError::ReservedDeviceId(device.0));
        }
        let out = DeviceCert {
            cert: out_dir.join(format!("device-{}.pem", device.0)),
            key: out_dir.join(format!("device-{}.key", device.0)),
        };
        for path in [&out.cert, &out.key] {
            if path.exists() {
                return Err(TlsError::Exists { path: path.clone() });
            }
        }
        let issuer = load_issuer(DEVICE_CA_CN, &self.key)?;
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, device.0.to_string());
        params.use_authority_key_identifier_extension = true;
        params.key_usages.push(KeyUsagePurpose::DigitalSignature);
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
        let cert = params.signed_by(&pair, &issuer)?;
        let verifier = device_verifier(&self.cert, false, provider(false))?;
        verifier
            .verify_client_cert(cert.der(), &[], rustls::pki_types::UnixTime::now())
            .map_err(|source| TlsError::BadCa {
                path: self.cert.clone(),
                source,
            })?;
        private_dir(out_dir, "device certificate directory")?;
        write(&out.key, &pair.serialize_pem(), SECRET_MODE, "device key")?;
        write(&out.cert, &cert.pem(), PUBLIC_MODE, "device certificate")?;
        Ok(out)
    }
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

fn parse_device_id(text: &[u8]) -> Option<DeviceId> {
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
    /// Ask devices for a client certificate issued by a CA in this PEM file. A device whose
    /// certificate verifies is known by the id it names ([`cert_device_id`]); one that sends
    /// none still connects (and proves itself in its `Hello`) unless `require_device_cert`.
    pub device_ca: Option<PathBuf>,
    /// With `device_ca`: refuse a handshake without a valid device certificate.
    pub require_device_cert: bool,
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

/// The verifier of device client certificates issued by the CA(s) in `ca_pem`.
fn device_verifier(
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

    #[test]
    fn device_ids_are_plain_decimal() {
        for (text, want) in [
            (&b"42"[..], Some(42)),
            (b"0", Some(0)),
            (b"18446744073709551613", Some(u64::MAX - 2)),
        ] {
            assert_eq!(parse_device_id(text), want.map(DeviceId), "{text:?}");
        }
        for text in [
            &b""[..],
            b"042",
            b"+42",
            b"-1",
            b" 42",
            b"42 ",
            b"4x2",
            b"18446744073709551614",
            b"18446744073709551616",
            b"000000000000000000001",
        ] {
            assert_eq!(parse_device_id(text), None, "{text:?}");
        }
    }

    #[test]
    fn device_ca_issues_certificates_naming_the_device_and_never_overwrites() {
        let dir = TestDir::new("tls-devca");
        let ca_dir = dir.path().join("ca");
        let ca = DeviceCa::ensure(&ca_dir).unwrap();
        assert!(ca.created);
        assert!(!DeviceCa::ensure(&ca_dir).unwrap().created);
        let cert = ca.issue(DeviceId(42), &dir.path().join("out")).unwrap();
        for key in [&ca.key, &cert.key] {
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let der = load_certs(&cert.cert, "device certificate").unwrap();
        assert_eq!(cert_device_id(&der[0]), Some(DeviceId(42)));
        let e = ca.issue(DeviceId(42), &dir.path().join("out")).unwrap_err();
        assert!(
            e.to_string().ends_with("exists already; not overwritten"),
            "{e}"
        );

        // A CA this module did not make (here: the dev CA's certificate with the device CA's
        // key) issues nothing rather than certificates that do not chain.
        let e = ca.issue(DeviceId(u64::MAX), dir.path()).unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");

        let pki = DevPki::ensure(dir.path()).unwrap();
        let foreign = DeviceCa {
            cert: pki.ca_cert.clone(),
            ..ca.clone()
        };
        let e = foreign.issue(DeviceId(7), dir.path()).unwrap_err();
        assert!(e.to_string().contains("ca.pem"), "{e}");
        assert!(!dir.path().join("device-7.pem").exists());

        let e = DeviceCa::open(&dir.path().join("none")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read device CA certificate"),
            "{e}"
        );
    }

    #[test]
    fn a_device_certificate_reaches_the_server_only_with_a_device_ca() {
        let dir = TestDir::new("tls-devcert");
        let pki = DevPki::ensure(dir.path()).unwrap();
        let ca = DeviceCa::ensure(&dir.path().join("devca")).unwrap();
        let dev = ca.issue(DeviceId(9), dir.path()).unwrap();
        let client = client_config_with_cert(
            &pki.ca_cert,
            &dev.cert,
            &dev.key,
            &ClientTlsOptions::default(),
        )
        .unwrap();
        let plain_client = client_config(&pki.ca_cert, &ClientTlsOptions::default()).unwrap();
        let with_ca = TlsOptions {
            device_ca: Some(ca.cert.clone()),
            ..TlsOptions::default()
        };
        let server = server_config(&pki.server_cert, &pki.server_key, &with_ca).unwrap();
        let (_, s) = connect(&client, &server);
        let chain = s.peer_certificates().expect("the device's certificate");
        assert_eq!(cert_device_id(&chain[0]), Some(DeviceId(9)));
        // Optional by default: a device without a certificate still connects.
        let (_, s) = connect(&plain_client, &server);
        assert!(s.peer_certificates().is_none());
        // Without a device CA the server asks for none.
        let server = server_config(&pki.server_cert, &pki.server_key, &TlsOptions::default());
        let (_, s) = connect(&client, &server.unwrap());
        assert!(s.peer_certificates().is_none());
    }

    #[test]
    fn required_device_certificates_refuse_devices_without_one() {
        let dir = TestDir::new("tls-devreq");
        let pki = DevPki::ensure(dir.path()).unwrap();
        let ca = DeviceCa::ensure(&dir.path().join("devca")).unwrap();
        let opts = TlsOptions {
            device_ca: Some(ca.cert.clone()),
            require_device_cert: true,
            ..TlsOptions::default()
        };
        let server = server_config(&pki.server_cert, &pki.server_key, &opts).unwrap();
        let client = client_config(&pki.ca_cert, &ClientTlsOptions::default()).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = ClientConnection::new(client, name).unwrap();
        let mut s = ServerConnection::new(server).unwrap();
        let mut failed = false;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            if buf.is_empty() {
                break;
            }
            s.read_tls(&mut &buf[..]).unwrap();
            if s.process_new_packets().is_err() {
                failed = true;
                break;
            }
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            let _ = c.process_new_packets();
        }
        assert!(
            failed,
            "the server must refuse a device without a certificate"
        );
    }

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_named() {
        let dir = TestDir::new("tls-mismatch");
        let pki = DevPki::ensure(dir.path()).unwrap();
        let e = server_config(&pki.server_cert, &pki.ca_key, &TlsOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("server.pem") && msg.contains("ca.key"),
            "{msg}"
        );
        assert!(msg.contains("match"), "{msg}");
        let bad = dir.path().join("devca.pem");
        fs::write(&bad, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
        let opts = TlsOptions {
            device_ca: Some(bad),
            ..TlsOptions::default()
        };
        let e = server_config(&pki.server_cert, &pki.server_key, &opts).unwrap_err();
        assert!(e.to_string().contains("devca.pem"), "{e}");
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
