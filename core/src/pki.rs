//! Making certificates: the development PKI made on first run under `data_dir/tls/` (a CA and
//! a server certificate for `localhost`), and a device CA that issues device client
//! certificates naming their device (`CN=<id>`, see `tether_net::tls::cert_device_id`). The
//! configs that use them are in `tether_net::tls`.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tether_net::tls::{
    TlsError, device_verifier, load_certs, parse_device_id, provider, read_file,
};
use tether_protocol::DeviceId;

use crate::fsutil::{PUBLIC_MODE, SECRET_MODE, write_atomic};

/// Why making or finding certificates failed; every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot write {what} {}: {source}", path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot generate the dev certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot use the dev CA key {}: {source}", path.display())]
    CaKey { path: PathBuf, source: rcgen::Error },
    #[error("{} exists already; not overwritten", path.display())]
    Exists { path: PathBuf },
    #[error("device id {0} cannot be named in a certificate (the two largest ids are reserved)")]
    ReservedDeviceId(u64),
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, PkiError> {
    Ok(read_file(path, what)?)
}

fn write(path: &Path, text: &str, mode: u32, what: &'static str) -> Result<(), PkiError> {
    write_atomic(path, text.as_bytes(), mode).map_err(|source| PkiError::Write {
        what,
        path: path.to_owned(),
        source,
    })
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
    pub fn ensure(data_dir: &Path) -> Result<DevPki, PkiError> {
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
fn make_ca(cn: &str, cert: &Path, key: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(cn)?;
    let made = params.self_signed(&pair)?;
    write(key, &pair.serialize_pem(), SECRET_MODE, "CA key")?;
    write(cert, &made.pem(), PUBLIC_MODE, "CA certificate")?;
    Ok(Issuer::new(params, pair))
}

/// A CA made by [`make_ca`], from its key file.
fn load_issuer(cn: &str, key: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let pem = read(key, "CA key")?;
    let text = String::from_utf8_lossy(&pem);
    let pair = KeyPair::from_pem(&text).map_err(|source| PkiError::CaKey {
        path: key.to_owned(),
        source,
    })?;
    // The CA's name and key identify it; rebuilding its params from the same constants
    // issues certificates that chain to the stored CA certificate.
    Ok(Issuer::new(ca_params(cn)?, pair))
}

/// Creates `dir` (mode 0700) if missing.
fn private_dir(dir: &Path, what: &'static str) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Write {
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
    pub fn ensure(dir: &Path) -> Result<DeviceCa, PkiError> {
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
    pub fn open(dir: &Path) -> Result<DeviceCa, PkiError> {
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
    pub fn issue(&self, device: DeviceId, out_dir: &Path) -> Result<DeviceCert, PkiError> {
        if parse_device_id(device.0.to_string().as_bytes()) != Some(device) {
            return Err(PkiError::ReservedDeviceId(device.0));
        }
        let out = DeviceCert {
            cert: out_dir.join(format!("device-{}.pem", device.0)),
            key: out_dir.join(format!("device-{}.key", device.0)),
        };
        for path in [&out.cert, &out.key] {
            if path.exists() {
                return Err(PkiError::Exists { path: path.clone() });
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::TestDir;
    use rustls::NamedGroup;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, HandshakeKind, ServerConnection};
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;
    use tether_net::tls::*;

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
