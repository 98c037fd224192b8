//! Property tests of the secure codec's receiving side (`SecureCodec::decode`): the other
//! end is a raw Noise transport driven here, so the tests can encrypt *anything*, as a peer
//! holding the cluster key could, and cut it into chunks as they like.
//!
//! - Valid frames, encrypted in arbitrary chunks (spanning frames or not) and delivered in
//!   arbitrary pieces, decode to the messages sent, in order.
//! - Arbitrary plaintext never panics the receiver, and decodes to what the plain frame
//!   codec makes of the same bytes.
//! - Tampering (a flipped bit anywhere, a chunk dropped, replayed or swapped) never yields a
//!   message that was not sent: the receiver gives a prefix of what was sent, then refuses.
//!
//! The fuzz target `fuzz/fuzz_targets/secure_decrypt.rs` drives the same receiver with
//! fuzzer-chosen chunks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::BytesMut;
use p2p_core::codec::FrameCodec;
use p2p_core::conn::Role;
use p2p_core::identity::Identity;
use p2p_core::secure::{self, SecureCodec, MAX_CHUNK_PLAINTEXT};
use p2p_core::testing::{frames, raw_initiator};
use p2p_core::{ClusterKey, Message};
use proptest::collection::vec;
use proptest::prelude::*;
use support::arb;
use tokio_util::codec::Decoder;

/// A raw sender and a real receiver (`SecureCodec` as the acceptor) with `max_frame`.
fn pair(max_frame: usize) -> (snow::TransportState, SecureCodec) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut x, mut y) = tokio::io::duplex(1 << 16);
        let key = ClusterKey::from_bytes([9; 32]);
        let identity = Identity::generate();
        let keys = [key.clone()];
        let acceptor = secure::handshake(&mut y, Role::Acceptor, &keys, &identity, max_frame);
        let (receiver, sender) = tokio::join!(acceptor, raw_initiator(&mut x, &key));
        (sender, receiver.unwrap())
    })
}

/// Encrypts `plain` cut at the sizes in `cuts` (cycled, each at most one chunk) into the
/// wire chunks `[u16 BE length][ciphertext]`.
fn seal(sender: &mut snow::TransportState, plain: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut cut = cuts.iter().cycle();
    let mut buf = vec![0u8; 65_535];
    while at < plain.len() {
        let n = cut
            .next()
            .copied()
            .unwrap_or(MAX_CHUNK_PLAINTEXT)
            .clamp(1, MAX_CHUNK_PLAINTEXT)
            .min(plain.len() - at);
        let len = sender.write_message(&plain[at..at + n], &mut buf).unwrap();
        let mut chunk = u16::try_from(len).unwrap().to_be_bytes().to_vec();
        chunk.extend_from_slice(&buf[..len]);
        chunks.push(chunk);
        at += n;
    }
    chunks
}

/// Delivers `wire` to `receiver` in pieces of the sizes in `pieces` (cycled), decoding after
/// each, then at EOF. Returns the messages and whether decoding ended in an error.
fn receive(receiver: &mut SecureCodec, wire: &[u8], pieces: &[usize]) -> (Vec<Message>, bool) {
    let mut src = BytesMut::new();
    let mut got = Vec::new();
    let mut at = 0;
    let mut piece = pieces.iter().cycle();
    while at < wire.len() {
        let n = piece
            .next()
            .copied()
            .unwrap_or(wire.len())
            .clamp(1, wire.len() - at);
        src.extend_from_slice(&wire[at..at + n]);
        at += n;
        loop {
            match receiver.decode(&mut src) {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break,
                Err(_) => return (got, true),
            }
        }
    }
    loop {
        match receiver.decode_eof(&mut src) {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, false),
            Err(_) => return (got, true),
        }
    }
}

/// What the plain frame codec makes of `plain` (messages, and whether it ends in an error).
fn plain_decode(max_frame: usize, plain: &[u8]) -> (Vec<Message>, bool) {
    let mut codec = FrameCodec::new(max_frame);
    let mut src = BytesMut::from(plain);
    let mut got = Vec::new();
    loop {
        match codec.decode_eof(&mut src) {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, false),
            Err(_) => return (got, true),
        }
    }
}

/// Chunk sizes: small ones, and some large enough to hold several frames.
fn cuts() -> impl Strategy<Value = Vec<usize>> {
    vec(prop_oneof![1usize..40, 40usize..2_000], 0..6)
}

/// Plaintext a key holder might send: valid frames, plausible frames with random payloads,
/// headers claiming anything, noise.
fn hostile_plaintext() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        2 => arb::message().prop_map(|m| frames(&[m])),
        2 => vec(any::<u8>(), 0..40).prop_map(|p| {
            let mut f = (p.len() as u32).to_be_bytes().to_vec();
            f.extend(p);
            f
        }),
        1 => (any::<u32>(), vec(any::<u8>(), 0..8)).prop_map(|(len, p)| {
            let mut f = len.to_be_bytes().to_vec();
            f.extend(p);
            f
        }),
        1 => vec(any::<u8>(), 0..24),
    ];
    vec(piece, 0..6).prop_map(|p| p.concat())
}

/// One way to damage the chunk stream.
#[derive(Debug, Clone)]
enum Tamper {
    /// Flip `bit` of the byte at `at` (an index into the whole stream).
    Flip(prop::sample::Index, u8),
    /// Drop one chunk.
    Drop(prop::sample::Index),
    /// Send one chunk twice.
    Replay(prop::sample::Index),
    /// Swap a chunk with the next.
    Swap(prop::sample::Index),
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        3 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Tamper::Flip(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Tamper::Drop),
        1 => any::<prop::sample::Index>().prop_map(Tamper::Replay),
        1 => any::<prop::sample::Index>().prop_map(Tamper::Swap),
    ]
}

proptest! {
    // Each case runs a Noise handshake: keep the counts modest.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn valid_frames_in_arbitrary_chunks_decode_in_order(
        msgs in vec(arb::message(), 1..6),
        cuts in cuts(),
        pieces in vec(1usize..300, 0..6),
    ) {
        let (mut tx, mut rx) = pair(16 << 20);
        let wire = seal(&mut tx, &frames(&msgs), &cuts).concat();
        let (got, failed) = receive(&mut rx, &wire, &pieces);
        prop_assert!(!failed);
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn arbitrary_plaintext_decodes_as_the_plain_codec_would(
        plain in hostile_plaintext(),
        cuts in cuts(),
        pieces in vec(1usize..300, 0..6),
        max_frame in prop_oneof![Just(1024usize), Just(64 * 1024)],
    ) {
        let (mut tx, mut rx) = pair(max_frame);
        let wire = seal(&mut tx, &plain, &cuts).concat();
        let (got, failed) = receive(&mut rx, &wire, &pieces);
        let (expected, plain_failed) = plain_decode(max_frame, &plain);
        // The receiver may refuse earlier (a chunk overflowing the maximum frame), never
        // later, and never decodes something else.
        prop_assert!(expected.starts_with(&got), "{:?} is not a prefix of {:?}", got, expected);
        if !failed {
            prop_assert_eq!(&got, &expected);
            prop_assert!(!plain_failed);
        }
    }

    #[test]
    fn tampering_never_yields_a_message_that_was_not_sent(
        msgs in vec(arb::message(), 1..6),
        cuts in cuts(),
        how in tamper(),
        pieces in vec(1usize..300, 0..6),
    ) {
        let (mut tx, mut rx) = pair(16 << 20);
        let mut chunks = seal(&mut tx, &frames(&msgs), &cuts);
        let wire = match &how {
            Tamper::Flip(at, bit) => {
                let mut wire = chunks.concat();
                let i = at.index(wire.len());
                wire[i] ^= 1 << bit;
                wire
            }
            Tamper::Drop(i) => {
                prop_assume!(chunks.len() > 1);
                chunks.remove(i.index(chunks.len() - 1));
                chunks.concat()
            }
            Tamper::Replay(i) => {
                let i = i.index(chunks.len());
                let c = chunks[i].clone();
                chunks.insert(i, c);
                chunks.concat()
            }
            Tamper::Swap(i) => {
                prop_assume!(chunks.len() > 1);
                let i = i.index(chunks.len() - 1);
                chunks.swap(i, i + 1);
                chunks.concat()
            }
        };
        let (got, failed) = receive(&mut rx, &wire, &pieces);
        prop_assert!(msgs.starts_with(&got), "forged: {:?} from {:?}", got, msgs);
        prop_assert!(failed || got.len() < msgs.len(), "the damage went unnoticed: {:?}", how);
    }
}
