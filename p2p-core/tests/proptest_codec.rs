//! Property tests of the frame codec: arbitrary messages round trip whole and cut anywhere;
//! bytes a later version appends to a payload are ignored; arbitrary byte streams, delivered
//! in arbitrary pieces, never panic, decode the same however they are cut, and never make
//! the decoder reserve more than the maximum frame. (tests/alloc_bound.rs bounds the heap.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::{BufMut, BytesMut};
use p2p_core::codec::{FrameCodec, LENGTH_PREFIX};
use p2p_core::{wire, Message};
use proptest::collection::vec;
use proptest::prelude::*;
use support::arb;
use tokio_util::codec::{Decoder, Encoder};

/// What decoding a whole stream gave: the messages, then how it ended (`None`: it wants
/// more bytes or is cleanly finished; `Some(error text)`: the stream is refused).
#[derive(Debug, PartialEq)]
struct Outcome {
    messages: Vec<Message>,
    error: Option<String>,
}

/// Feeds `stream` to a fresh codec cut into pieces of the sizes in `cuts` (cycled; the rest
/// in one piece when `cuts` is empty), decoding after each piece, then at EOF. Checks after
/// every step that the buffer never reserved more than the bytes given plus one frame.
fn decode_in_pieces(max_frame: usize, stream: &[u8], cuts: &[usize]) -> Outcome {
    let mut codec = FrameCodec::new(max_frame);
    let max_frame = codec.max_frame();
    let mut src = BytesMut::new();
    let mut messages = Vec::new();
    let mut fed = 0;
    let mut cut = cuts.iter().cycle();
    while fed < stream.len() {
        let n = cut
            .next()
            .copied()
            .unwrap_or(stream.len())
            .clamp(1, stream.len() - fed);
        src.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            let r = codec.decode(&mut src);
            // Reserving the claimed length of an oversized frame would show here: at most
            // the bytes given so far plus one maximum frame (and its header), doubled for the
            // growth policy of the buffer.
            let bound = 2 * (fed + max_frame + LENGTH_PREFIX) + 64;
            assert!(
                src.capacity() <= bound,
                "buffer of {} bytes after {fed} bytes fed (max frame {max_frame})",
                src.capacity()
            );
            match r {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        messages,
                        error: Some(e.to_string()),
                    }
                }
            }
        }
    }
    loop {
        match codec.decode_eof(&mut src) {
            Ok(Some(m)) => messages.push(m),
            Ok(None) => {
                return Outcome {
                    messages,
                    error: None,
                }
            }
            Err(e) => {
                return Outcome {
                    messages,
                    error: Some(e.to_string()),
                }
            }
        }
    }
}

/// A stream that looks like frames often enough to reach the payload decoder: a sequence of
/// pieces, each a plausible header with random payload, a header claiming anything, a valid
/// frame, or plain noise.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => vec(any::<u8>(), 0..48).prop_map(|p| {
            let mut f = (p.len() as u32).to_be_bytes().to_vec();
            f.extend(p);
            f
        }),
        1 => (any::<u32>(), vec(any::<u8>(), 0..16)).prop_map(|(len, p)| {
            let mut f = len.to_be_bytes().to_vec();
            f.extend(p);
            f
        }),
        2 => arb::message().prop_map(|m| {
            let mut f = BytesMut::new();
            FrameCodec::default().encode(&m, &mut f).unwrap();
            f.to_vec()
        }),
        1 => vec(any::<u8>(), 0..32),
    ];
    vec(piece, 0..6).prop_map(|pieces| pieces.concat())
}

fn max_frame() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1024usize), Just(4096), Just(64 * 1024), Just(16 << 20)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn messages_round_trip_whole_and_cut_anywhere(
        msgs in vec(arb::message(), 0..8),
        cuts in vec(1usize..64, 0..8),
    ) {
        let mut wire = BytesMut::new();
        let mut codec = FrameCodec::default();
        for m in &msgs {
            codec.encode(m, &mut wire).unwrap();
        }
        let whole = decode_in_pieces(16 << 20, &wire, &[]);
        prop_assert_eq!(&whole.messages, &msgs);
        prop_assert_eq!(&whole.error, &None);
        let cut = decode_in_pieces(16 << 20, &wire, &cuts);
        prop_assert_eq!(cut, whole);
    }

    #[test]
    fn bytes_appended_to_a_payload_are_ignored(
        m in arb::message(),
        tail in vec(any::<u8>(), 0..64),
    ) {
        let mut payload = BytesMut::new();
        wire::encode_into(&m, &mut payload).unwrap();
        payload.put_slice(&tail);
        prop_assert_eq!(wire::decode(&payload).unwrap(), m);
    }

    #[test]
    fn arbitrary_streams_in_arbitrary_pieces_never_panic_and_decode_the_same(
        stream in stream(),
        cuts in vec(1usize..40, 0..10),
        max_frame in max_frame(),
    ) {
        let whole = decode_in_pieces(max_frame, &stream, &[]);
        let cut = decode_in_pieces(max_frame, &stream, &cuts);
        prop_assert_eq!(&cut, &whole);
        // What decodes re-encodes, and decodes back to itself.
        for m in &whole.messages {
            let mut again = BytesMut::new();
            FrameCodec::new(max_frame).encode(m, &mut again).unwrap();
            prop_assert_eq!(&FrameCodec::new(max_frame).decode(&mut again).unwrap(), &Some(m.clone()));
        }
    }

    #[test]
    fn a_header_over_the_maximum_is_refused_before_any_reservation(
        max_frame in max_frame(),
        over in 1u32..=u32::MAX,
        rest in vec(any::<u8>(), 0..16),
    ) {
        let mut codec = FrameCodec::new(max_frame);
        let claimed = (codec.max_frame() as u64 + u64::from(over)).min(u64::from(u32::MAX));
        prop_assume!(claimed > codec.max_frame() as u64);
        let mut src = BytesMut::with_capacity(64);
        src.put_u32(claimed as u32);
        src.put_slice(&rest);
        let cap = src.capacity();
        let r = codec.decode(&mut src);
        prop_assert!(matches!(r, Err(p2p_core::Error::Connection(p2p_core::ConnectionError::FrameTooLarge { .. }))), "{:?}", r);
        prop_assert_eq!(src.capacity(), cap);
    }
}
