//! The handoff's message format, versioned so that binary N hands over to binary N+1.
//!
//! Every message is `TUPG` (magic), the format version it is written in (u16 BE), a tag byte
//! and the tag's body. Integers are big-endian; byte strings and lists are a u32 length then
//! their content. [`Msg::Hello`]'s and [`Msg::Abort`]'s layouts are frozen across all formats,
//! so two binaries can always read each other's hello, compare the ranges they speak
//! ([`negotiate`]) and then use the newest format both read — or tell each other why not. Descriptors are not part of the bytes: they travel as
//! ancillary data beside them (see [`super::scm`]) and a message names them by index.
//!
//! Decoding treats every byte as hostile: lengths are checked against what is left before
//! anything is allocated, and a short, long or unknown message is a typed [`WireError`].

use std::collections::HashSet;
use std::ops::Range;

use super::scm::MAX_FDS;

/// The magic in front of every handoff message.
pub const MAGIC: [u8; 4] = *b"TUPG";
/// The newest format this binary writes.
pub const FORMAT: u16 = 1;
/// The oldest format this binary still reads.
pub const OLDEST_READABLE: u16 = 1;

const TAG_HELLO: u8 = 1;
const TAG_LISTENERS: u8 = 2;
const TAG_LISTENERS_TAKEN: u8 = 3;
const TAG_SESSIONS: u8 = 4;
const TAG_SESSIONS_TAKEN: u8 = 5;
const TAG_DONE: u8 = 6;
const TAG_CONFIRMED: u8 = 7;
const TAG_ABORT: u8 = 8;

/// The formats one side speaks: `oldest_readable..=format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Formats {
    /// The newest format it writes.
    pub format: u16,
    /// The oldest format it reads.
    pub oldest_readable: u16,
}

impl Formats {
    /// What this binary speaks: [`OLDEST_READABLE`]..=[`FORMAT`].
    pub const OURS: Formats = Formats {
        format: FORMAT,
        oldest_readable: OLDEST_READABLE,
    };
}

/// One live session handed over. Its socket is the descriptor at the entry's index in the
/// [`Msg::Sessions`] that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEntry {
    /// The device's id.
    pub device: u64,
    /// The detached TLS record state, serialised (opaque here).
    pub tls: Vec<u8>,
    /// The protocol session, serialised (opaque here).
    pub session: Vec<u8>,
    /// Ciphertext produced but not yet written to the socket.
    pub out: Vec<u8>,
    /// Bytes read from the socket but not yet decoded.
    pub partial: Vec<u8>,
}

/// A handoff message. Descriptors travel beside it; [`Msg::check_fds`] checks they match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Both sides' first message: what they speak and who they are.
    Hello {
        /// The newest format the sender writes.
        format: u16,
        /// The oldest format the sender reads.
        oldest_readable: u16,
        /// The sender's binary version.
        version: String,
        /// The sender's process id.
        pid: u32,
    },
    /// The listening sockets, the same ones the old process accepts on (never re-bound).
    /// Each field names descriptors by their index in the message's ancillary data.
    Listeners {
        /// The old process's shard count (the new one's may differ).
        shards: u16,
        /// The device listeners, one per old shard.
        device: Vec<u16>,
        /// The agent listeners, one per old shard.
        agent: Vec<u16>,
        /// The admin listener, if there is one.
        admin: Option<u16>,
        /// The data directory's lock (`serve.lock`, an `flock` on the shared open file): the
        /// new process holds it from then on, so no third server starts on the directory.
        lock: Option<u16>,
    },
    /// The new process accepts on the listeners.
    ListenersTaken,
    /// A batch of live sessions; entry i's socket is descriptor i.
    Sessions {
        /// The batch's number.
        batch: u32,
        /// The sessions.
        entries: Vec<SessionEntry>,
    },
    /// The new process's answer to a batch: what it took and what it refused.
    SessionsTaken {
        /// The batch answered.
        batch: u32,
        /// Devices whose sessions it took.
        taken: Vec<u64>,
        /// Devices it refused, each with why (the old process keeps and closes them).
        refused: Vec<(u64, String)>,
    },
    /// The old process has nothing more to hand over.
    Done,
    /// The new process has everything and serves; the old one may stop.
    Confirmed,
    /// Either side gives up the handoff; the old process keeps serving.
    Abort {
        /// Why, in one line.
        reason: String,
    },
}

/// A message that could not be encoded or decoded, or a handoff step that does not add up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The message ends before a field does.
    #[error("handoff message truncated: {field} needs {need} bytes, {left} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes left.
        left: usize,
    },
    /// Bytes left after the message's last field.
    #[error("{0} trailing bytes after a handoff message")]
    Trailing(usize),
    /// Not a handoff message.
    #[error("not a handoff message: magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A tag this format does not define.
    #[error("unknown handoff message tag {0}")]
    UnknownTag(u8),
    /// A message written in a format this binary does not read.
    #[error("handoff message in format {got}; we read {oldest}..={newest}")]
    UnsupportedFormat {
        /// The message's format.
        got: u16,
        /// Oldest format we read.
        oldest: u16,
        /// Newest format we read.
        newest: u16,
    },
    /// A message in another format than the one negotiated.
    #[error("handoff message in format {got} but format {negotiated} was negotiated")]
    FormatChanged {
        /// The message's format.
        got: u16,
        /// The negotiated format.
        negotiated: u16,
    },
    /// The two sides speak no common format.
    #[error(
        "no common handoff format: peer speaks format {peer_format} (reads {peer_oldest}..={peer_format}), \
         we read {our_oldest}..={our_format}"
    )]
    NoCommonFormat {
        /// The peer's newest format.
        peer_format: u16,
        /// The peer's oldest readable format.
        peer_oldest: u16,
        /// Our newest format.
        our_format: u16,
        /// Our oldest readable format.
        our_oldest: u16,
    },
    /// A hello whose range is empty (oldest readable above the format).
    #[error("peer's hello says it reads {oldest}..={format}, an empty range")]
    BadRange {
        /// The claimed newest format.
        format: u16,
        /// The claimed oldest readable format.
        oldest: u16,
    },
    /// A string field is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// An option or boolean byte other than 0 or 1.
    #[error("{field}: flag byte {value}, not 0 or 1")]
    BadFlag {
        /// The field.
        field: &'static str,
        /// The byte.
        value: u8,
    },
    /// A field too long for its length prefix.
    #[error("{0} too long to encode")]
    TooLong(&'static str),
    /// The descriptors beside a message do not match what it names.
    #[error("{msg} names {detail}, but {fds} descriptors came with it")]
    FdMismatch {
        /// The message's kind.
        msg: &'static str,
        /// What it names.
        detail: String,
        /// Descriptors that came with it.
        fds: usize,
    },
    /// A [`Msg::SessionsTaken`] answer that does not cover exactly the batch sent.
    #[error("answer to session batch {batch} does not match it: {problem}")]
    TakenMismatch {
        /// The batch sent.
        batch: u32,
        /// What is wrong.
        problem: String,
    },
}

/// Picks the format both sides use: the newest both read. Refuses, with both ranges in the
/// error, when the ranges do not overlap.
pub fn negotiate(ours: Formats, theirs: Formats) -> Result<u16, WireError> {
    if theirs.oldest_readable > theirs.format {
        return Err(WireError::BadRange {
            format: theirs.format,
            oldest: theirs.oldest_readable,
        });
    }
    let pick = ours.format.min(theirs.format);
    if pick < ours.oldest_readable.max(theirs.oldest_readable) {
        return Err(WireError::NoCommonFormat {
            peer_format: theirs.format,
            peer_oldest: theirs.oldest_readable,
            our_format: ours.format,
            our_oldest: ours.oldest_readable,
        });
    }
    Ok(pick)
}

/// Checks that `answer` answers `sent`: both session messages of the same batch, every device
/// sent either taken or refused, once, and no other device.
pub fn check_taken(sent: &Msg, answer: &Msg) -> Result<(), WireError> {
    let Msg::Sessions { batch, entries } = sent else {
        return Err(WireError::TakenMismatch {
            batch: 0,
            problem: format!("what was sent is a {}, not a session batch", sent.kind()),
        });
    };
    let mismatch = |problem: String| WireError::TakenMismatch {
        batch: *batch,
        problem,
    };
    let Msg::SessionsTaken {
        batch: answered,
        taken,
        refused,
    } = answer
    else {
        return Err(mismatch(format!("the answer is a {}", answer.kind())));
    };
    if answered != batch {
        return Err(mismatch(format!("the answer is for batch {answered}")));
    }
    let mut want: HashSet<u64> = HashSet::with_capacity(entries.len());
    for e in entries {
        if !want.insert(e.device) {
            return Err(mismatch(format!("device {} was sent twice", e.device)));
        }
    }
    let mut seen: HashSet<u64> = HashSet::with_capacity(entries.len());
    for d in taken.iter().chain(refused.iter().map(|(d, _)| d)) {
        if !want.contains(d) {
            return Err(mismatch(format!("device {d} was not in the batch")));
        }
        if !seen.insert(*d) {
            return Err(mismatch(format!("device {d} is answered twice")));
        }
    }
    if seen.len() != want.len() {
        let mut missing: Vec<u64> = want.difference(&seen).copied().collect();
        missing.sort_unstable();
        return Err(mismatch(format!(
            "{} devices not answered, first {}",
            missing.len(),
            missing[0]
        )));
    }
    Ok(())
}

/// The index ranges to cut `len` sessions into so that no batch carries more than
/// [`MAX_FDS`] sockets.
pub fn batch_ranges(len: usize) -> impl Iterator<Item = Range<usize>> {
    (0..len)
        .step_by(MAX_FDS)
        .map(move |start| start..(start + MAX_FDS).min(len))
}

impl Msg {
    /// The message's kind, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Listeners { .. } => "Listeners",
            Msg::ListenersTaken => "ListenersTaken",
            Msg::Sessions { .. } => "Sessions",
            Msg::SessionsTaken { .. } => "SessionsTaken",
            Msg::Done => "Done",
            Msg::Confirmed => "Confirmed",
            Msg::Abort { .. } => "Abort",
        }
    }

    /// The formats a hello announces (`None` for other messages).
    pub fn formats(&self) -> Option<Formats> {
        match self {
            Msg::Hello {
                format,
                oldest_readable,
                ..
            } => Some(Formats {
                format: *format,
                oldest_readable: *oldest_readable,
            }),
            _ => None,
        }
    }

    /// Checks the `fds` descriptors beside this message against what it names: a session
    /// batch has one per entry; listeners name distinct indices below `fds`, each used; every
    /// other message has none.
    pub fn check_fds(&self, fds: usize) -> Result<(), WireError> {
        let bad = |detail: String| WireError::FdMismatch {
            msg: self.kind(),
            detail,
            fds,
        };
        match self {
            Msg::Sessions { entries, .. } => {
                if entries.len() != fds {
                    return Err(bad(format!("{} sessions", entries.len())));
                }
            }
            Msg::Listeners {
                device,
                agent,
                admin,
                lock,
                ..
            } => {
                let mut used = vec![false; fds];
                for &i in device.iter().chain(agent).chain(admin).chain(lock) {
                    match used.get_mut(usize::from(i)) {
                        None => return Err(bad(format!("descriptor {i}"))),
                        Some(true) => return Err(bad(format!("descriptor {i} twice"))),
                        Some(u) => *u = true,
                    }
                }
                if let Some(i) = used.iter().position(|u| !u) {
                    return Err(bad(format!("no use for descriptor {i}")));
                }
            }
            _ => {
                if fds != 0 {
                    return Err(bad("no descriptors".to_string()));
                }
            }
        }
        Ok(())
    }

    /// Encodes the message in `format`. A hello or an abort encodes in any format (their
    /// layouts are frozen); other messages only in a format this binary writes.
    pub fn encode(&self, format: u16) -> Result<Vec<u8>, WireError> {
        let frozen = matches!(self, Msg::Hello { .. } | Msg::Abort { .. });
        if !frozen && !(OLDEST_READABLE..=FORMAT).contains(&format) {
            return Err(WireError::UnsupportedFormat {
                got: format,
                oldest: OLDEST_READABLE,
                newest: FORMAT,
            });
        }
        let mut w = Vec::with_capacity(64);
        w.extend_from_slice(&MAGIC);
        w.extend_from_slice(&format.to_be_bytes());
        match self {
            Msg::Hello {
                format,
                oldest_readable,
                version,
                pid,
            } => {
                w.push(TAG_HELLO);
                w.extend_from_slice(&format.to_be_bytes());
                w.extend_from_slice(&oldest_readable.to_be_bytes());
                put_bytes(&mut w, version.as_bytes(), "version")?;
                w.extend_from_slice(&pid.to_be_bytes());
            }
            Msg::Listeners {
                shards,
                device,
                agent,
                admin,
                lock,
            } => {
                w.push(TAG_LISTENERS);
                w.extend_from_slice(&shards.to_be_bytes());
                put_u16s(&mut w, device, "device listeners")?;
                put_u16s(&mut w, agent, "agent listeners")?;
                for fd in [admin, lock] {
                    match fd {
                        None => w.push(0),
                        Some(i) => {
                            w.push(1);
                            w.extend_from_slice(&i.to_be_bytes());
                        }
                    }
                }
            }
            Msg::ListenersTaken => w.push(TAG_LISTENERS_TAKEN),
            Msg::Sessions { batch, entries } => {
                w.push(TAG_SESSIONS);
                w.extend_from_slice(&batch.to_be_bytes());
                put_len(&mut w, entries.len(), "sessions")?;
                for e in entries {
                    w.extend_from_slice(&e.device.to_be_bytes());
                    put_bytes(&mut w, &e.tls, "tls state")?;
                    put_bytes(&mut w, &e.session, "session state")?;
                    put_bytes(&mut w, &e.out, "unwritten ciphertext")?;
                    put_bytes(&mut w, &e.partial, "undecoded bytes")?;
                }
            }
            Msg::SessionsTaken {
                batch,
                taken,
                refused,
            } => {
                w.push(TAG_SESSIONS_TAKEN);
                w.extend_from_slice(&batch.to_be_bytes());
                put_len(&mut w, taken.len(), "taken")?;
                for d in taken {
                    w.extend_from_slice(&d.to_be_bytes());
                }
                put_len(&mut w, refused.len(), "refused")?;
                for (d, why) in refused {
                    w.extend_from_slice(&d.to_be_bytes());
                    put_bytes(&mut w, why.as_bytes(), "refusal reason")?;
                }
            }
            Msg::Done => w.push(TAG_DONE),
            Msg::Confirmed => w.push(TAG_CONFIRMED),
            Msg::Abort { reason } => {
                w.push(TAG_ABORT);
                put_bytes(&mut w, reason.as_bytes(), "abort reason")?;
            }
        }
        Ok(w)
    }

    /// Decodes a message, returning the format it is written in with it. A hello or an abort
    /// decodes whatever its format; any other message must be in a format this binary reads.
    pub fn decode(bytes: &[u8]) -> Result<(u16, Msg), WireError> {
        let mut r = Reader(bytes);
        let magic: [u8; 4] = r.array("magic")?;
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let format = r.u16("format")?;
        let tag = r.u8("tag")?;
        let frozen = tag == TAG_HELLO || tag == TAG_ABORT;
        if !frozen && !(OLDEST_READABLE..=FORMAT).contains(&format) {
            return Err(WireError::UnsupportedFormat {
                got: format,
                oldest: OLDEST_READABLE,
                newest: FORMAT,
            });
        }
        let msg = match tag {
            TAG_HELLO => Msg::Hello {
                format: r.u16("hello format")?,
                oldest_readable: r.u16("hello oldest readable")?,
                version: r.string("version")?,
                pid: r.u32("pid")?,
            },
            TAG_LISTENERS => Msg::Listeners {
                shards: r.u16("shards")?,
                device: r.u16s("device listeners")?,
                agent: r.u16s("agent listeners")?,
                admin: r.optional_u16("admin flag", "admin listener")?,
                lock: r.optional_u16("lock flag", "lock")?,
            },
            TAG_LISTENERS_TAKEN => Msg::ListenersTaken,
            TAG_SESSIONS => {
                let batch = r.u32("batch")?;
                // The smallest entry is a device id and four empty byte strings.
                let n = r.count("sessions", 8 + 4 * 4)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(SessionEntry {
                        device: r.u64("device")?,
                        tls: r.bytes("tls state")?.to_vec(),
                        session: r.bytes("session state")?.to_vec(),
                        out: r.bytes("unwritten ciphertext")?.to_vec(),
                        partial: r.bytes("undecoded bytes")?.to_vec(),
                    });
                }
                Msg::Sessions { batch, entries }
            }
            TAG_SESSIONS_TAKEN => {
                let batch = r.u32("batch")?;
                let n = r.count("taken", 8)?;
                let mut taken = Vec::with_capacity(n);
                for _ in 0..n {
                    taken.push(r.u64("taken device")?);
                }
                let n = r.count("refused", 8 + 4)?;
                let mut refused = Vec::with_capacity(n);
                for _ in 0..n {
                    refused.push((r.u64("refused device")?, r.string("refusal reason")?));
                }
                Msg::SessionsTaken {
                    batch,
                    taken,
                    refused,
                }
            }
            TAG_DONE => Msg::Done,
            TAG_CONFIRMED => Msg::Confirmed,
            TAG_ABORT => Msg::Abort {
                reason: r.string("abort reason")?,
            },
            t => return Err(WireError::UnknownTag(t)),
        };
        if !r.0.is_empty() {
            return Err(WireError::Trailing(r.0.len()));
        }
        Ok((format, msg))
    }
}

fn put_len(w: &mut Vec<u8>, len: usize, field: &'static str) -> Result<(), WireError> {
    let n = u32::try_from(len).map_err(|_| WireError::TooLong(field))?;
    w.extend_from_slice(&n.to_be_bytes());
    Ok(())
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8], field: &'static str) -> Result<(), WireError> {
    put_len(w, b.len(), field)?;
    w.extend_from_slice(b);
    Ok(())
}

fn put_u16s(w: &mut Vec<u8>, v: &[u16], field: &'static str) -> Result<(), WireError> {
    put_len(w, v.len(), field)?;
    for x in v {
        w.extend_from_slice(&x.to_be_bytes());
    }
    Ok(())
}

/// A cursor over hostile bytes: every read checks what is left first.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated {
                field,
                need: n,
                left: self.0.len(),
            });
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    /// A flag byte (0 or 1) and, when 1, a u16.
    fn optional_u16(
        &mut self,
        flag: &'static str,
        field: &'static str,
    ) -> Result<Option<u16>, WireError> {
        match self.u8(flag)? {
            0 => Ok(None),
            1 => Ok(Some(self.u16(field)?)),
            value => Err(WireError::BadFlag { field: flag, value }),
        }
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A u32 element count, checked against the bytes left for elements of at least
    /// `min_size` bytes each, so a forged count never allocates beyond the message.
    fn count(&mut self, field: &'static str, min_size: usize) -> Result<usize, WireError> {
        let n = self.u32(field)? as usize;
        let need = n.saturating_mul(min_size);
        if need > self.0.len() {
            return Err(WireError::Truncated {
                field,
                need,
                left: self.0.len(),
            });
        }
        Ok(n)
    }

    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u32(field)? as usize;
        self.take(n, field)
    }

    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let b = self.bytes(field)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::NotUtf8(field))
    }

    fn u16s(&mut self, field: &'static str) -> Result<Vec<u16>, WireError> {
        let n = self.count(field, 2)?;
        (0..n).map(|_| self.u16(field)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(device: u64) -> SessionEntry {
        SessionEntry {
            device,
            tls: vec![1, 2, 3],
            session: b"session".to_vec(),
            out: vec![],
            partial: vec![0xff; 17],
        }
    }

    fn samples() -> Vec<Msg> {
        vec![
            Msg::Hello {
                format: FORMAT,
                oldest_readable: OLDEST_READABLE,
                version: "0.1.0 (abc123)".into(),
                pid: 4242,
            },
            Msg::Listeners {
                shards: 2,
                device: vec![0, 1],
                agent: vec![2, 3],
                admin: Some(4),
                lock: None,
            },
            Msg::Listeners {
                shards: 1,
                device: vec![0],
                agent: vec![],
                admin: None,
                lock: None,
            },
            Msg::ListenersTaken,
            Msg::Sessions {
                batch: 7,
                entries: vec![entry(1), entry(u64::MAX)],
            },
            Msg::Sessions {
                batch: 0,
                entries: vec![],
            },
            Msg::SessionsTaken {
                batch: 7,
                taken: vec![1],
                refused: vec![(u64::MAX, "buffered TLS mode".into())],
            },
            Msg::Done,
            Msg::Confirmed,
            Msg::Abort {
                reason: "new process did not confirm in 5 s".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = m.encode(FORMAT).unwrap();
            assert_eq!(&bytes[..4], b"TUPG");
            assert_eq!(Msg::decode(&bytes).unwrap(), (FORMAT, m));
        }
    }

    #[test]
    fn every_truncation_of_every_message_is_a_typed_error() {
        for m in samples() {
            let bytes = m.encode(FORMAT).unwrap();
            for cut in 0..bytes.len() {
                match Msg::decode(&bytes[..cut]) {
                    Err(WireError::Truncated { .. }) => {}
                    other => panic!("{} cut at {cut}: {other:?}", m.kind()),
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        for m in samples() {
            let mut bytes = m.encode(FORMAT).unwrap();
            bytes.extend_from_slice(&[0, 0, 0]);
            assert_eq!(
                Msg::decode(&bytes),
                Err(WireError::Trailing(3)),
                "{}",
                m.kind()
            );
        }
    }

    #[test]
    fn bad_magic_unknown_tag_and_unread_formats_are_refused() {
        let mut bytes = Msg::Done.encode(FORMAT).unwrap();
        bytes[0] = b'X';
        assert_eq!(Msg::decode(&bytes), Err(WireError::BadMagic(*b"XUPG")));

        for tag in [0u8, 9, 200, 255] {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&FORMAT.to_be_bytes());
            bytes.push(tag);
            assert_eq!(Msg::decode(&bytes), Err(WireError::UnknownTag(tag)));
        }

        let mut bytes = Msg::Done.encode(FORMAT).unwrap();
        bytes[4..6].copy_from_slice(&9u16.to_be_bytes());
        assert!(matches!(
            Msg::decode(&bytes),
            Err(WireError::UnsupportedFormat { got: 9, .. })
        ));
        assert!(matches!(
            Msg::Done.encode(9),
            Err(WireError::UnsupportedFormat { got: 9, .. })
        ));
    }

    #[test]
    fn a_hello_or_an_abort_in_any_format_is_readable() {
        let hello = Msg::Hello {
            format: 40,
            oldest_readable: 30,
            version: "9.0.0".into(),
            pid: 1,
        };
        let bytes = hello.encode(40).unwrap();
        assert_eq!(Msg::decode(&bytes).unwrap(), (40, hello));
        let abort = Msg::Abort {
            reason: "we read 30..=40".into(),
        };
        let bytes = abort.encode(40).unwrap();
        assert_eq!(Msg::decode(&bytes).unwrap(), (40, abort));
    }

    #[test]
    fn hostile_fields_are_typed_errors() {
        // A session count of 2^32-1 with no bytes behind it: refused before allocating.
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT.to_be_bytes());
        bytes.push(TAG_SESSIONS);
        bytes.extend_from_slice(&1u32.to_be_bytes());
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Msg::decode(&bytes),
            Err(WireError::Truncated {
                field: "sessions",
                ..
            })
        ));

        // A version that is not UTF-8.
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT.to_be_bytes());
        bytes.push(TAG_HELLO);
        bytes.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 2, 0xc3, 0x28, 0, 0, 0, 1]);
        assert_eq!(Msg::decode(&bytes), Err(WireError::NotUtf8("version")));

        // An admin flag that is neither 0 nor 1.
        let mut bytes = Msg::Listeners {
            shards: 1,
            device: vec![0],
            agent: vec![],
            admin: None,
            lock: None,
        }
        .encode(FORMAT)
        .unwrap();
        // The last two bytes are the admin and lock flags (both absent).
        let n = bytes.len();
        let mut lock = bytes.clone();
        bytes[n - 2] = 2;
        assert_eq!(
            Msg::decode(&bytes),
            Err(WireError::BadFlag {
                field: "admin flag",
                value: 2
            })
        );
        lock[n - 1] = 7;
        assert_eq!(
            Msg::decode(&lock),
            Err(WireError::BadFlag {
                field: "lock flag",
                value: 7
            })
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A deterministic walk over mutated messages: flipped bytes, inserted and dropped ones.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut errors = 0;
        for m in samples() {
            let base = m.encode(FORMAT).unwrap();
            for _ in 0..2_000 {
                let mut b = base.clone();
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % (b.len() + 1);
                    match next() % 3 {
                        0 if i < b.len() => b[i] = next() as u8,
                        1 => b.insert(i, next() as u8),
                        _ if i < b.len() => {
                            b.remove(i);
                        }
                        _ => {}
                    }
                }
                if let Ok((format, back)) = Msg::decode(&b) {
                    // Whatever decodes re-encodes to the same bytes (no lossy parse).
                    assert_eq!(back.encode(format).unwrap(), b);
                } else {
                    errors += 1;
                }
            }
        }
        assert!(errors > 0, "the mutations reach the error paths");
    }

    #[test]
    fn negotiation_picks_the_newest_common_format_or_says_why_not() {
        let f = |format, oldest_readable| Formats {
            format,
            oldest_readable,
        };
        assert_eq!(negotiate(f(1, 1), f(1, 1)), Ok(1));
        // N → N+1: the new binary reads N, so both use N.
        assert_eq!(negotiate(f(3, 2), f(2, 1)), Ok(2));
        assert_eq!(negotiate(f(2, 1), f(3, 2)), Ok(2));
        let e = negotiate(f(1, 1), f(7, 7)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no common handoff format: peer speaks format 7 (reads 7..=7), we read 1..=1"
        );
        assert!(matches!(
            negotiate(f(5, 4), f(3, 1)),
            Err(WireError::NoCommonFormat { .. })
        ));
        assert_eq!(
            negotiate(f(1, 1), f(1, 2)),
            Err(WireError::BadRange {
                format: 1,
                oldest: 2
            })
        );
    }

    #[test]
    fn descriptors_are_checked_against_what_a_message_names() {
        let sessions = Msg::Sessions {
            batch: 1,
            entries: vec![entry(1), entry(2)],
        };
        assert_eq!(sessions.check_fds(2), Ok(()));
        assert!(sessions.check_fds(1).is_err());
        let listeners = Msg::Listeners {
            shards: 2,
            device: vec![0, 1],
            agent: vec![2],
            admin: None,
            lock: None,
        };
        assert_eq!(listeners.check_fds(3), Ok(()));
        assert!(listeners.check_fds(2).is_err(), "index 2 out of range");
        assert!(listeners.check_fds(4).is_err(), "descriptor 3 unused");
        let twice = Msg::Listeners {
            shards: 1,
            device: vec![0],
            agent: vec![0],
            admin: None,
            lock: None,
        };
        assert!(twice.check_fds(1).is_err());
        assert_eq!(Msg::Done.check_fds(0), Ok(()));
        assert!(Msg::Done.check_fds(1).is_err());
    }

    #[test]
    fn an_answer_must_cover_exactly_the_batch_sent() {
        let sent = Msg::Sessions {
            batch: 3,
            entries: vec![entry(10), entry(11), entry(12)],
        };
        let answer = |batch, taken: &[u64], refused: &[u64]| Msg::SessionsTaken {
            batch,
            taken: taken.to_vec(),
            refused: refused.iter().map(|&d| (d, "no".to_string())).collect(),
        };
        assert_eq!(check_taken(&sent, &answer(3, &[10, 12], &[11])), Ok(()));
        assert_eq!(check_taken(&sent, &answer(3, &[], &[10, 11, 12])), Ok(()));
        for (bad, why) in [
            (answer(4, &[10, 11, 12], &[]), "batch 4"),
            (answer(3, &[10, 11], &[]), "not answered"),
            (answer(3, &[10, 11, 12, 13], &[]), "device 13 was not"),
            (answer(3, &[10, 11, 12], &[12]), "answered twice"),
            (answer(3, &[10, 10, 11, 12], &[]), "answered twice"),
            (Msg::Done, "is a Done"),
        ] {
            let e = check_taken(&sent, &bad).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        assert!(check_taken(&Msg::Done, &answer(3, &[], &[])).is_err());
    }

    #[test]
    fn batches_never_carry_more_than_the_descriptor_limit() {
        let r: Vec<_> = batch_ranges(300).collect();
        assert_eq!(r, vec![0..253, 253..300]);
        assert_eq!(batch_ranges(0).count(), 0);
        assert_eq!(batch_ranges(253).collect::<Vec<_>>(), vec![0..253]);
        assert_eq!(batch_ranges(506).count(), 2);
    }
}
