//! Message payloads that carry their kind and *scheduled* send time, so whoever receives one can
//! record its latency from the timetable (all clocks are one process's `Instant`s).
//!
//! Layout: `scheduled_us: u64 BE` (micros since the run's epoch) | `kind: u8` | padding.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use crate::stats::micros_between;

/// Bytes of the stamp; shorter payloads are padded up to this.
pub const STAMP_LEN: usize = 9;

/// What a message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Device → agent, one way.
    DeviceToAgent = 1,
    /// Device → agent leg of an echo; the agent sends it back as [`Kind::RoundTripBack`].
    RoundTripOut = 2,
    /// Agent → device, one way.
    AgentToDevice = 3,
    /// Agent → device leg of an echo.
    RoundTripBack = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::DeviceToAgent,
            2 => Kind::RoundTripOut,
            3 => Kind::AgentToDevice,
            4 => Kind::RoundTripBack,
            _ => return None,
        })
    }
}

/// The run's shared time origin.
#[derive(Clone, Copy, Debug)]
pub struct Epoch(pub Instant);

impl Epoch {
    /// Micros from the epoch to `at` (0 if earlier).
    pub fn micros(self, at: Instant) -> u64 {
        micros_between(self.0, at)
    }

    /// The instant `us` micros after the epoch.
    pub fn instant(self, us: u64) -> Instant {
        self.0 + Duration::from_micros(us)
    }
}

/// A payload of `len` bytes (at least [`STAMP_LEN`]) stamped with `kind` and `scheduled_us`.
pub fn payload(kind: Kind, scheduled_us: u64, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(len.max(STAMP_LEN));
    b.put_u64(scheduled_us);
    b.put_u8(kind as u8);
    b.resize(len.max(STAMP_LEN), 0);
    b.freeze()
}

/// The stamp of a payload, if it has one.
pub fn read(p: &[u8]) -> Option<(Kind, u64)> {
    let head: &[u8; 8] = p.get(..8)?.try_into().ok()?;
    Some((Kind::from_u8(*p.get(8)?)?, u64::from_be_bytes(*head)))
}

/// The same payload with another kind (the agent's echo).
pub fn rekind(p: &[u8], kind: Kind) -> Bytes {
    let mut b = BytesMut::from(p);
    if b.len() >= STAMP_LEN {
        b[8] = kind as u8;
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_pad() {
        let p = payload(Kind::RoundTripOut, 123_456, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(read(&p), Some((Kind::RoundTripOut, 123_456)));
        let back = rekind(&p, Kind::RoundTripBack);
        assert_eq!(read(&back), Some((Kind::RoundTripBack, 123_456)));
        assert_eq!(payload(Kind::AgentToDevice, 1, 0).len(), STAMP_LEN);
        assert_eq!(read(b"short"), None);
        assert_eq!(read(&[0, 0, 0, 0, 0, 0, 0, 1, 99]), None);
        let e = Epoch(Instant::now());
        let at = e.0 + Duration::from_micros(1500);
        assert_eq!(e.instant(e.micros(at)), at);
    }
}
