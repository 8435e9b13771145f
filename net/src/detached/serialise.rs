//! Moving a detached state between processes: its keys and sequence numbers as bytes.

use rustls::CipherSuite;
use rustls::crypto::CryptoProvider;
use rustls::crypto::cipher::{AeadKey, Iv, NONCE_LEN};
use zeroize::Zeroizing;

use super::error::MoveError;
use super::record::{DetachedTls, Flags, decrypter, encrypter, tx_must_start_at_zero};

const MAGIC: &[u8; 4] = b"TDTS";
const FORMAT: u8 = 1;
const KEY_LEN: usize = 32;
/// magic, format, suite, flags, rekey_after, tx seq, key, iv, rx seq, key, iv.
pub(super) const STATE_LEN: usize = 4 + 1 + 2 + 1 + 8 + 2 * (8 + KEY_LEN + NONCE_LEN);

impl DetachedTls {
    /// The state as bytes that [`from_bytes`](Self::from_bytes) restores in another shard or
    /// another process (live handoff at upgrade): suite, sending and receiving keys and IVs,
    /// sequence numbers, close flags. **These bytes are key material**: anyone holding them
    /// can read and forge the connection's traffic. They zeroize on drop; send them only over
    /// a local Unix socket to the process taking over, never to disk or the network.
    ///
    /// The restored state has no key schedule: it cannot process a peer's KeyUpdate nor rekey
    /// (it closes with [`super::DetachedError::NoKeySchedule`] instead). To move within one
    /// process, move the `DetachedTls` value itself: it is `Send` and keeps everything.
    ///
    /// AES-GCM: call [`rekey_tx`](Self::rekey_tx) first (and send its output) unless the
    /// sending sequence is 0, see [`MoveError::TxNotFresh`]. AES-128-GCM cannot move
    /// ([`MoveError::KeyLength`]).
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, MoveError> {
        let suite = self.suite.common.suite;
        let (Some(tx_key), Some(rx_key)) = (&self.tx.saved.key, &self.rx.saved.key) else {
            return Err(MoveError::KeyLength(suite, self.suite.aead_alg.key_len()));
        };
        if self.tx.seq != 0 && tx_must_start_at_zero(suite) {
            return Err(MoveError::TxNotFresh(suite));
        }
        let mut b = Zeroizing::new(Vec::with_capacity(STATE_LEN));
        b.extend_from_slice(MAGIC);
        b.push(FORMAT);
        b.extend_from_slice(&u16::from(suite).to_be_bytes());
        let f = self.flags;
        b.push(
            u8::from(f.peer_closed)
                | u8::from(f.sent_close) << 1
                | u8::from(f.answer_key_update) << 2,
        );
        b.extend_from_slice(&self.rekey_after.to_be_bytes());
        for (seq, key, iv) in [
            (self.tx.seq, tx_key, &self.tx.saved.iv),
            (self.rx.seq, rx_key, &self.rx.saved.iv),
        ] {
            b.extend_from_slice(&seq.to_be_bytes());
            b.extend_from_slice(key);
            b.extend_from_slice(iv);
        }
        debug_assert_eq!(b.len(), STATE_LEN);
        Ok(b)
    }

    /// Rebuilds a state from [`to_bytes`](Self::to_bytes), with the AEADs of `provider`'s
    /// suite of the same id (the aws-lc-rs provider of `tls::server_config`).
    pub fn from_bytes(bytes: &[u8], provider: &CryptoProvider) -> Result<DetachedTls, MoveError> {
        let mut r = Reader(bytes);
        if r.take::<4>()? != *MAGIC {
            return Err(MoveError::BadFormat(0));
        }
        let [format] = r.take::<1>()?;
        if format != FORMAT {
            return Err(MoveError::BadFormat(format));
        }
        let id = CipherSuite::from(u16::from_be_bytes(r.take::<2>()?));
        let suite = provider
            .cipher_suites
            .iter()
            .find_map(|s| match s {
                rustls::SupportedCipherSuite::Tls13(t) if t.common.suite == id => Some(*t),
                _ => None,
            })
            .ok_or(MoveError::UnknownSuite(id))?;
        if suite.aead_alg.key_len() != KEY_LEN {
            return Err(MoveError::KeyLength(id, suite.aead_alg.key_len()));
        }
        let [flags] = r.take::<1>()?;
        let rekey_after = u64::from_be_bytes(r.take::<8>()?);
        let mut half = || -> Result<(u64, AeadKey, Iv), MoveError> {
            let seq = u64::from_be_bytes(r.take::<8>()?);
            let key = Zeroizing::new(r.take::<KEY_LEN>()?);
            let iv = Iv::new(r.take::<NONCE_LEN>()?);
            Ok((seq, AeadKey::from(*key), iv))
        };
        let (tx_seq, tx_key, tx_iv) = half()?;
        let (rx_seq, rx_key, rx_iv) = half()?;
        if !r.0.is_empty() {
            return Err(MoveError::BadFormat(format));
        }
        if tx_seq != 0 && tx_must_start_at_zero(id) {
            return Err(MoveError::TxNotFresh(id));
        }
        let mut tls = DetachedTls::new(
            suite,
            encrypter(suite, tx_key, tx_iv, tx_seq),
            decrypter(suite, rx_key, rx_iv, rx_seq),
            None,
        );
        tls.set_rekey_after(rekey_after);
        tls.flags = Flags {
            peer_closed: flags & 1 != 0,
            sent_close: flags & 2 != 0,
            answer_key_update: flags & 4 != 0,
        };
        Ok(tls)
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], MoveError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(MoveError::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }
}
