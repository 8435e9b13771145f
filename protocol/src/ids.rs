//! Identifiers and small value types that travel on the wire.

use std::fmt;

/// A device's identity in the fleet. Compact on purpose: it sits in every per-connection slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DeviceId(pub u64);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "d{:016x}", self.0)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = ParseIdError;
    /// Accepts the display form `d<16 hex digits>` or a plain decimal number.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(hex) = s.strip_prefix('d') {
            u64::from_str_radix(hex, 16)
                .map(DeviceId)
                .map_err(|_| ParseIdError(s.to_owned()))
        } else {
            s.parse()
                .map(DeviceId)
                .map_err(|_| ParseIdError(s.to_owned()))
        }
    }
}

/// A device id that is neither `d<hex>` nor a decimal number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a device id: {0:?} (expected d<16 hex digits> or a decimal number)")]
pub struct ParseIdError(pub String);

/// A message sequence number. Each direction of a device's session counts its own, from 1;
/// 0 means "nothing yet". Acks are cumulative: `Ack{seq}` acknowledges every seq up to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Seq(pub u64);

impl Seq {
    /// The sequence number after this one.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A server-assigned session id, echoed by the device on reconnect to resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SessionId(pub u64);

/// A code version: monotonically increasing per device group. 0 means "no code".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CodeVersion(pub u64);

impl fmt::Display for CodeVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// A SHA-256 digest (of a code blob).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(data).into())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
