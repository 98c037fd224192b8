//! The decoder never allocates what a peer merely claims: this test binary runs on an
//! allocator with a hard limit (crate `cap`), and decodes streams whose frame headers and
//! inner length fields claim up to 4 GiB (and 2^64) with only a small heap budget to spare.
//! An allocation over the budget fails, which aborts this binary: the test cannot pass by
//! accident. (One test in this binary, so no other test allocates meanwhile.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;

use bytes::{BufMut, BytesMut};
use cap::Cap;
use p2p_core::codec::FrameCodec;
use proptest::collection::vec;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Heap the decoder may use on top of what is allocated before it starts: a 64 KiB frame
/// (doubled by buffer growth) plus bincode's bound on the lengths inside a payload of up to
/// 64 KiB (256 KiB), with room to spare; far below any claimed length.
const BUDGET: usize = 2 * 1024 * 1024;

/// Decodes `stream` in pieces of `piece` bytes with a 64 KiB maximum frame, under the budget.
fn decode_under_budget(stream: &[u8], piece: usize) -> usize {
    let mut codec = FrameCodec::new(64 * 1024);
    let mut src = BytesMut::with_capacity(stream.len());
    let mut decoded = 0;
    ALLOCATOR
        .set_limit(ALLOCATOR.allocated() + BUDGET)
        .expect("set the allocation limit");
    'feed: for chunk in stream.chunks(piece.max(1)) {
        src.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut src) {
                Ok(Some(_)) => decoded += 1,
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    ALLOCATOR.set_limit(usize::MAX).expect("lift the limit");
    decoded
}

/// A payload whose field at some place claims a huge length: a message variant, a few
/// plausible bytes, then a varint with tag 252 (u32) or 253 (u64) and a huge value.
fn lying_payload() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..12,
        vec(0u8..8, 0..6),
        prop_oneof![
            (1u64 << 20..1u64 << 32).prop_map(|n| {
                let mut v = vec![252u8];
                v.extend_from_slice(&(n as u32).to_le_bytes());
                v
            }),
            (1u64 << 20..=u64::MAX).prop_map(|n| {
                let mut v = vec![253u8];
                v.extend_from_slice(&n.to_le_bytes());
                v
            }),
        ],
        vec(any::<u8>(), 0..16),
    )
        .prop_map(|(variant, middle, claim, tail)| {
            let mut p = vec![variant];
            p.extend(middle);
            p.extend(claim);
            p.extend(tail);
            p
        })
}

/// Frames with lying payloads, headers claiming anything (often up to the maximum frame,
/// which the decoder may reserve), and noise.
fn hostile_stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => lying_payload().prop_map(|p| {
            let mut f = BytesMut::new();
            f.put_u32(p.len() as u32);
            f.put_slice(&p);
            f.to_vec()
        }),
        1 => (prop_oneof![any::<u32>(), 0u32..=65_536], vec(any::<u8>(), 0..8)).prop_map(|(len, p)| {
            let mut f = len.to_be_bytes().to_vec();
            f.extend(p);
            f
        }),
        1 => vec(any::<u8>(), 0..24),
    ];
    vec(piece, 1..5).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn claimed_lengths_never_allocate_beyond_the_budget(
        stream in hostile_stream(),
        piece in 1usize..64,
    ) {
        decode_under_budget(&stream, stream.len());
        decode_under_budget(&stream, piece);
    }
}
