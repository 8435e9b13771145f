//! The agent link's decoder: `FrameDecoder::new(DEFAULT_AGENT_MAX_FRAME)` + `AgentMessage::decode`,
//! as `core` and `loadgen` read an agent connection, with the bytes arriving in pieces cut at
//! arbitrary points. Checked besides "no panic":
//! - the cut points change nothing: the frames and the first error are those of one whole read;
//! - every decoded message re-encodes (`encode` accepts whatever `decode` returned) to
//!   `frame_len()` bytes that decode to an equal message, and to the very bytes received;
//! - a frame refused as another link's (`WrongLink`) is one the device link does not refuse
//!   so: no type belongs to neither link.
#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tether_protocol::codec::{DEFAULT_AGENT_MAX_FRAME, Frame, FrameDecoder, HEADER_LEN};
use tether_protocol::error::DecodeError;
use tether_protocol::{AgentMessage, DeviceMessage};

#[derive(Arbitrary, Debug)]
struct Input {
    /// Where the stream is cut into reads (taken modulo its length).
    cuts: Vec<u16>,
    /// The stream.
    data: Vec<u8>,
}

/// What one read of a stream yields: whole frames, then possibly the error that ends it.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    error: Option<DecodeError>,
}

/// Feeds `data` in the pieces between `cuts`, taking every whole frame after each piece and
/// stopping at the first error (the link closes then).
fn read(data: &[u8], cuts: &[u16]) -> Outcome {
    let mut d = FrameDecoder::new(DEFAULT_AGENT_MAX_FRAME);
    let mut frames = Vec::new();
    let mut at = 0;
    for cut in tether_fuzz::read_ends(cuts, data.len()) {
        d.push(&data[at..cut]);
        at = cut;
        // Bounded: each round takes at least a 5-byte frame out of `data`.
        for _ in 0..=data.len() {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        frames,
                        error: Some(e),
                    };
                }
            }
        }
    }
    Outcome {
        frames,
        error: None,
    }
}

fn check_round_trip(frame: Frame) {
    let wire_len = HEADER_LEN + frame.body.len();
    let mut original = BytesMut::with_capacity(wire_len);
    tether_protocol::codec::put_header(&mut original, frame.ty, frame.body.len());
    original.extend_from_slice(&frame.body);
    let m = match AgentMessage::decode(frame.clone()) {
        Ok(m) => m,
        Err(DecodeError::WrongLink { .. }) => {
            assert!(
                !matches!(
                    DeviceMessage::decode(frame),
                    Err(DecodeError::WrongLink { .. })
                ),
                "a type that belongs to neither link"
            );
            return;
        }
        Err(_) => return,
    };
    let mut wire = BytesMut::new();
    m.encode(&mut wire)
        .unwrap_or_else(|e| panic!("{m:?} decoded but does not encode: {e}"));
    assert_eq!(wire.len(), m.frame_len(), "frame_len of {m:?}");
    assert!(wire.len() <= 4 + DEFAULT_AGENT_MAX_FRAME as usize);
    assert_eq!(&wire[..], &original[..], "{m:?} re-encoded to other bytes");
    let mut d = FrameDecoder::new(DEFAULT_AGENT_MAX_FRAME);
    d.push(&wire);
    let again = d
        .next_frame()
        .expect("re-encoded frame decodes")
        .expect("re-encoded frame is whole");
    assert_eq!(d.pending(), 0, "re-encoding left bytes over");
    assert_eq!(AgentMessage::decode(again), Ok(m), "round trip");
}

fuzz_target!(|input: Input| {
    let data = &input.data[..];
    let split = read(data, &input.cuts);
    assert_eq!(split, read(data, &[]), "cut points changed what was read");
    for frame in split.frames {
        check_round_trip(frame);
    }
});
