//! Device authentication: per-device keys and a proof bound to one connection.
//!
//! The server sends a fresh random [`Nonce`] in its first frame (`Challenge`, sent as TLS 1.3
//! half-RTT data, so it costs no round trip). The device answers in `Hello` with
//! `proof = HMAC-SHA256(device key, nonce ‖ device id ‖ protocol version)`. A proof is good for
//! that one connection only, so a recorded `Hello` cannot be replayed. The same proof is used
//! whatever TLS mode the server runs (buffered or detached), so a device never needs to know.
//!
//! Device keys are derived from a server secret (`HMAC-SHA256(secret, "tether device key v1" ‖
//! device id)`), so a registry need not store one key per device. HMAC and SHA-2 come from the
//! RustCrypto crates; nothing here is hand-written cryptography.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::DeviceId;

type HmacSha256 = Hmac<Sha256>;

/// Length of a [`Nonce`] in bytes.
pub const NONCE_LEN: usize = 32;
/// Length of a [`Proof`] in bytes.
pub const PROOF_LEN: usize = 32;

/// A device's secret key (32 bytes). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey(pub [u8; 32]);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

/// The server's per-connection challenge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nonce(pub [u8; NONCE_LEN]);

/// A device's answer to a [`Nonce`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proof(pub [u8; PROOF_LEN]);

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length, so this cannot fail.
    HmacSha256::new_from_slice(key).expect("HMAC accepts any key length")
}

/// Derives a device's key from the server secret and its id.
pub fn derive_device_key(server_secret: &[u8], device: DeviceId) -> DeviceKey {
    let mut m = mac(server_secret);
    m.update(b"tether device key v1");
    m.update(&device.0.to_be_bytes());
    DeviceKey(m.finalize().into_bytes().into())
}

fn proof_mac(key: &DeviceKey, nonce: &Nonce, device: DeviceId, version: u16) -> HmacSha256 {
    let mut m = mac(&key.0);
    m.update(&nonce.0);
    m.update(&device.0.to_be_bytes());
    m.update(&version.to_be_bytes());
    m
}

/// The proof a device sends in `Hello` for this connection's nonce.
pub fn prove(key: &DeviceKey, nonce: &Nonce, device: DeviceId, version: u16) -> Proof {
    Proof(
        proof_mac(key, nonce, device, version)
            .finalize()
            .into_bytes()
            .into(),
    )
}

/// Checks a proof in constant time.
pub fn verify(
    key: &DeviceKey,
    nonce: &Nonce,
    device: DeviceId,
    version: u16,
    proof: &Proof,
) -> bool {
    proof_mac(key, nonce, device, version)
        .verify_slice(&proof.0)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_verifies_only_for_its_nonce_device_and_version() {
        let key = derive_device_key(b"secret", DeviceId(7));
        let nonce = Nonce([1; 32]);
        let p = prove(&key, &nonce, DeviceId(7), 1);
        assert!(verify(&key, &nonce, DeviceId(7), 1, &p));
        assert!(!verify(&key, &Nonce([2; 32]), DeviceId(7), 1, &p));
        assert!(!verify(&key, &nonce, DeviceId(8), 1, &p));
        assert!(!verify(&key, &nonce, DeviceId(7), 2, &p));
        let other = derive_device_key(b"secret", DeviceId(8));
        assert!(!verify(&other, &nonce, DeviceId(7), 1, &p));
    }

    #[test]
    fn keys_differ_per_device_and_secret() {
        assert_ne!(
            derive_device_key(b"s", DeviceId(1)),
            derive_device_key(b"s", DeviceId(2))
        );
        assert_ne!(
            derive_device_key(b"s", DeviceId(1)),
            derive_device_key(b"t", DeviceId(1))
        );
    }
}
