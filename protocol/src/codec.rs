//! Frame codec: `len: u32 BE | type: u8 | body`, where `len` counts the type byte and the body.
//!
//! Decoding is incremental (bytes may arrive split anywhere) and zero-copy: a frame body is a
//! `Bytes` slice of the receive buffer. Every frame has a hard size limit, checked from the
//! length prefix before any body byte is buffered, so a peer cannot make us hold more than one
//! maximum-size frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;

/// Bytes in a frame header: the 4-byte length and the type byte.
pub const HEADER_LEN: usize = 5;
/// Default largest frame on a device connection (type byte + body).
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024;
/// Default largest frame on the agent link (deploys carry whole code blobs).
pub const DEFAULT_AGENT_MAX_FRAME: u32 = 16 * 1024 * 1024;

/// One undecoded frame: its type byte and its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The message type byte.
    pub ty: u8,
    /// The body after the type byte.
    pub body: Bytes,
}

/// Reads the next whole frame from the front of `src`, if one is there.
///
/// Returns `Ok(None)` when `src` holds only part of a frame (call again with more bytes).
/// The length is checked against `max_frame` as soon as the 4-byte prefix is in.
pub fn decode_frame(src: &mut BytesMut, max_frame: u32) -> Result<Option<Frame>, DecodeError> {
    if src.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
    if len == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    if len > max_frame {
        return Err(DecodeError::FrameTooLarge {
            limit: max_frame,
            got: len,
        });
    }
    let total = 4 + len as usize;
    if src.len() < total {
        // Reserve for the rest of this frame only: never more than one max-size frame.
        src.reserve(total - src.len());
        return Ok(None);
    }
    src.advance(4);
    let ty = src[0];
    src.advance(1);
    let body = src.split_to(len as usize - 1).freeze();
    Ok(Some(Frame { ty, body }))
}

/// Writes a frame header for a body of `body_len` bytes; the caller appends the body.
pub fn put_header(dst: &mut BytesMut, ty: u8, body_len: usize) {
    dst.put_u32(body_len as u32 + 1);
    dst.put_u8(ty);
}

/// Incremental decoder that keeps partial frames between reads.
///
/// It holds no buffer while no partial frame is pending: a connection at rest costs 8 bytes
/// here (the buffer is boxed, so its 32-byte header exists only while bytes wait).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Option<Box<BytesMut>>,
    max_frame: u32,
}

impl FrameDecoder {
    /// A decoder that rejects frames larger than `max_frame` bytes (type byte + body).
    pub fn new(max_frame: u32) -> Self {
        FrameDecoder {
            buf: None,
            max_frame,
        }
    }

    /// The frame size limit.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Changes the frame size limit for the frames not yet returned (for instance, raised once
    /// a peer has authenticated; bytes already buffered are kept).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.buf
                .get_or_insert_with(Box::default)
                .extend_from_slice(data);
        }
    }

    /// The next whole frame, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let Some(buf) = self.buf.as_mut() else {
            return Ok(None);
        };
        let r = decode_frame(buf, self.max_frame);
        if buf.is_empty() {
            // Drop our reference to the allocation: payload `Bytes` handed out keep what they
            // need, and an idle connection holds no receive buffer.
            self.buf = None;
        }
        r
    }

    /// The bytes buffered towards an incomplete frame (to hand a session on).
    pub fn pending_bytes(&self) -> &[u8] {
        self.buf.as_deref().map_or(&[], |b| &b[..])
    }

    /// Bytes buffered towards an incomplete frame.
    pub fn pending(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// Forgets buffered bytes (on reconnect).
    pub fn clear(&mut self) {
        self.buf = None;
    }
}

/// Decodes arbitrary bytes as a device stream, stopping at the first error: the fuzzing and
/// property-test entry point. It must never panic.
pub fn fuzz_decode(data: &[u8]) {
    let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
    d.push(data);
    while let Ok(Some(frame)) = d.next_frame() {
        let _ = crate::message::DeviceMessage::decode(frame);
    }
}

/// A cursor over a frame body with bounds-checked reads.
pub(crate) struct Reader {
    body: Bytes,
    ty: u8,
}

impl Reader {
    pub(crate) fn new(ty: u8, body: Bytes) -> Self {
        Reader { body, ty }
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.body.remaining() < n {
            Err(DecodeError::Truncated { ty: self.ty })
        } else {
            Ok(())
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.body.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.body.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.body.get_u32())
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.body.get_u64())
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.need(N)?;
        let mut a = [0u8; N];
        self.body.copy_to_slice(&mut a);
        Ok(a)
    }

    /// Bytes prefixed by a u8 length.
    pub(crate) fn short_bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u8()? as usize;
        self.need(n)?;
        Ok(self.body.split_to(n))
    }

    /// Bytes prefixed by a u16 length.
    pub(crate) fn bytes16(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        Ok(self.body.split_to(n))
    }

    /// Everything left (the last field of a frame).
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.body)
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                ty: self.ty,
                extra: self.body.len() as u32,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_oversized_length_before_buffering_body() {
        let mut b = BytesMut::from(&[0u8, 1, 0, 1][..]); // 65537
        assert_eq!(
            decode_frame(&mut b, 65536),
            Err(DecodeError::FrameTooLarge {
                limit: 65536,
                got: 65537
            })
        );
    }

    #[test]
    fn rejects_empty_frame() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(decode_frame(&mut b, 100), Err(DecodeError::EmptyFrame));
    }

    #[test]
    fn decoder_releases_its_buffer_when_drained() {
        let mut d = FrameDecoder::new(100);
        d.push(&[0, 0, 0, 2, 9, 7]);
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!((f.ty, &f.body[..]), (9, &[7u8][..]));
        assert!(d.buf.is_none());
        assert_eq!(d.next_frame().unwrap(), None);
    }

    #[test]
    fn partial_frame_waits_for_more() {
        let mut d = FrameDecoder::new(100);
        d.push(&[0, 0, 0, 3, 1]);
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.pending(), 5);
        d.push(&[2, 3]);
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!((f.ty, &f.body[..]), (1, &[2u8, 3][..]));
    }
}
