//! Tests of the secure channel: the codec, and the handshake machine and its driver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::handshake::{put_message, take_message};
use super::*;
use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Decoder, Encoder};

use crate::codec::FrameCodec;
use crate::conn::Role;
use crate::identity::Identity;
use crate::key::{ClusterKey, FINGERPRINT_LEN};
use crate::message::Completed;
use crate::{ConnectionError, Error, HandshakeError, Message, Stage};

/// Runs the handshake between an initiator with keys `a` and an acceptor with keys `b`,
/// each with a fresh identity.
async fn pair_keys(
    a: &[ClusterKey],
    b: &[ClusterKey],
) -> (Result<SecureCodec, Error>, Result<SecureCodec, Error>) {
    pair_ids(a, &Identity::generate(), b, &Identity::generate()).await
}

async fn pair_ids(
    a: &[ClusterKey],
    ida: &Identity,
    b: &[ClusterKey],
    idb: &Identity,
) -> (Result<SecureCodec, Error>, Result<SecureCodec, Error>) {
    let (mut x, mut y) = tokio::io::duplex(1 << 20);
    let (ka, kb) = (a.to_vec(), b.to_vec());
    let (ida, idb) = (ida.clone(), idb.clone());
    let i = tokio::spawn(async move {
        let r = handshake(&mut x, Role::Initiator, &ka, &ida, 1 << 24).await;
        drop(x);
        r
    });
    let r = tokio::spawn(async move {
        let r = handshake(&mut y, Role::Acceptor, &kb, &idb, 1 << 24).await;
        drop(y);
        r
    });
    (i.await.unwrap(), r.await.unwrap())
}

async fn pair_with(
    a: &ClusterKey,
    b: &ClusterKey,
) -> (Result<SecureCodec, Error>, Result<SecureCodec, Error>) {
    pair_keys(std::slice::from_ref(a), std::slice::from_ref(b)).await
}

async fn pair() -> (SecureCodec, SecureCodec) {
    let key = ClusterKey::generate();
    let (i, r) = pair_with(&key, &key).await;
    (i.unwrap(), r.unwrap())
}

fn big(len: usize) -> Message {
    Message::Completed(Completed {
        seq: 1,
        ok: true,
        exit_code: Some(0),
        output: "x".repeat(len),
        error: None,
        duration_us: 5,
    })
}

fn decode_all(codec: &mut SecureCodec, src: &mut BytesMut) -> Result<Vec<Message>, Error> {
    let mut out = Vec::new();
    while let Some(m) = codec.decode(src)? {
        out.push(m);
    }
    Ok(out)
}

/// The transport messages in `wire`: their lengths, read from the u16 prefixes.
fn message_lengths(wire: &[u8]) -> Vec<usize> {
    let mut lens = Vec::new();
    let mut at = 0;
    while at + 2 <= wire.len() {
        let len = usize::from(u16::from_be_bytes([wire[at], wire[at + 1]]));
        lens.push(len);
        at += 2 + len;
    }
    assert_eq!(at, wire.len(), "whole messages only");
    lens
}

#[tokio::test]
async fn a_batch_of_small_frames_is_one_transport_message_and_keeps_its_order() {
    let (a, mut b) = pair().await;
    let mut a = WireCodec::Secure(Box::new(a));
    let msgs: Vec<Message> = (0..200).map(|n| Message::Ping { nonce: n }).collect();
    a.begin_batch();
    let mut wire = BytesMut::new();
    for m in &msgs {
        a.encode(m, &mut wire).unwrap();
    }
    assert!(
        wire.is_empty(),
        "nothing is encrypted before the batch ends"
    );
    a.end_batch(&mut wire).unwrap();
    assert_eq!(message_lengths(&wire).len(), 1, "200 pings, one message");
    assert_eq!(decode_all(&mut b, &mut wire).unwrap(), msgs);

    // Past the batch size, a new message starts; a frame too big for a batch is sent
    // in chunks of its own, after the frames collected before it.
    let mut msgs: Vec<Message> = (0..3000).map(|n| Message::Ping { nonce: n }).collect();
    msgs.insert(1500, big(100_000));
    a.begin_batch();
    let mut wire = BytesMut::new();
    for m in &msgs {
        a.encode(m, &mut wire).unwrap();
    }
    a.end_batch(&mut wire).unwrap();
    let lens = message_lengths(&wire);
    assert!(lens.len() > 3 && lens.len() < 20, "{lens:?}");
    assert!(lens.iter().all(|&l| l <= MAX_NOISE_MESSAGE));
    assert_eq!(decode_all(&mut b, &mut wire).unwrap(), msgs);

    // A batch that starts with a frame too big for it, or has one just over the batch size
    // after a small one: no empty message, the order kept, the frames whole.
    // Frames around the batch size too: `big(n)` is a little over n bytes framed, so these
    // fall just under, at and just over BATCH_PLAINTEXT.
    let sizes = BATCH_PLAINTEXT - 64..BATCH_PLAINTEXT + 8;
    for (first_big, size) in sizes.flat_map(|n| [(true, n), (false, n)]) {
        let mut msgs = vec![Message::Ping { nonce: 1 }, big(size)];
        if first_big {
            msgs.swap(0, 1);
        }
        msgs.push(Message::Ping { nonce: 2 });
        a.begin_batch();
        let mut wire = BytesMut::new();
        for m in &msgs {
            a.encode(m, &mut wire).unwrap();
        }
        a.end_batch(&mut wire).unwrap();
        let lens = message_lengths(&wire);
        assert!(lens.iter().all(|&l| l > TAG_LEN), "{lens:?}");
        assert_eq!(decode_all(&mut b, &mut wire).unwrap(), msgs);
    }

    // Outside a batch every frame is its own message, as before.
    let mut wire = BytesMut::new();
    for n in 0..3 {
        a.encode(&Message::Ping { nonce: n }, &mut wire).unwrap();
    }
    assert_eq!(message_lengths(&wire).len(), 3);
    assert_eq!(decode_all(&mut b, &mut wire).unwrap().len(), 3);
}

#[tokio::test]
async fn small_and_large_frames_round_trip_whole_and_in_pieces() {
    let (mut a, mut b) = pair().await;
    let msgs = vec![
        Message::Ping { nonce: 7 },
        big(200_000),
        Message::Goodbye,
        // Exactly two full chunks (payload + 4-byte header = 2 * 65,519).
        big(2 * MAX_CHUNK_PLAINTEXT - 16),
        big(3 * MAX_CHUNK_PLAINTEXT),
        Message::GoodbyeAck,
    ];
    let mut wire = BytesMut::new();
    for m in &msgs {
        a.encode(m, &mut wire).unwrap();
    }
    // Every chunk is at most a Noise message.
    let mut off = 0;
    let mut chunks = 0;
    while off < wire.len() {
        let len = usize::from(u16::from_be_bytes([wire[off], wire[off + 1]]));
        assert!((TAG_LEN..=MAX_NOISE_MESSAGE).contains(&len));
        off += 2 + len;
        chunks += 1;
    }
    assert_eq!(off, wire.len());
    assert!(chunks > msgs.len(), "large frames are split");
    // Delivered in odd-sized pieces.
    let mut src = BytesMut::new();
    let mut got = Vec::new();
    for piece in wire.chunks(7_777) {
        src.extend_from_slice(piece);
        got.extend(decode_all(&mut b, &mut src).unwrap());
    }
    assert_eq!(got, msgs);
    assert_eq!(b.decode_eof(&mut src).unwrap(), None);
    // And the other direction.
    let mut wire = BytesMut::new();
    b.encode(&big(70_000), &mut wire).unwrap();
    assert_eq!(decode_all(&mut a, &mut wire).unwrap(), vec![big(70_000)]);
}

#[tokio::test]
async fn a_flipped_byte_fails() {
    for at in [0usize, 1, 2, 5, 30] {
        let (mut a, mut b) = pair().await;
        let mut wire = BytesMut::new();
        a.encode(&Message::Ping { nonce: 1 }, &mut wire).unwrap();
        a.encode(&big(100), &mut wire).unwrap();
        let at = 2 + at % (wire.len() - 2);
        wire[at] ^= 0x01;
        let res = decode_all(&mut b, &mut wire);
        assert!(
            matches!(res, Err(Error::Connection(ConnectionError::Tampered))),
            "flip at {at}: {res:?}"
        );
    }
}

#[tokio::test]
async fn a_replayed_or_reordered_chunk_fails() {
    let (mut a, mut b) = pair().await;
    let mut first = BytesMut::new();
    a.encode(&Message::Ping { nonce: 1 }, &mut first).unwrap();
    let mut second = BytesMut::new();
    a.encode(&Message::Ping { nonce: 2 }, &mut second).unwrap();
    // Replay: the first chunk twice.
    let mut src = first.clone();
    assert_eq!(
        decode_all(&mut b, &mut src).unwrap(),
        vec![Message::Ping { nonce: 1 }]
    );
    let mut replay = first.clone();
    assert!(matches!(
        decode_all(&mut b, &mut replay),
        Err(Error::Connection(ConnectionError::Tampered))
    ));

    // Reorder: the second before the first, on a fresh pair.
    let (mut a, mut b) = pair().await;
    let mut first = BytesMut::new();
    a.encode(&Message::Ping { nonce: 1 }, &mut first).unwrap();
    let mut second = BytesMut::new();
    a.encode(&Message::Ping { nonce: 2 }, &mut second).unwrap();
    assert!(matches!(
        decode_all(&mut b, &mut second),
        Err(Error::Connection(ConnectionError::Tampered))
    ));
}

#[tokio::test]
async fn the_length_prefix_inside_is_checked_before_allocation() {
    let key = ClusterKey::generate();
    // A receiver with a small maximum frame.
    let (i, r) = pair_with(&key, &key).await;
    let (mut small_tx, mut small_rx) = (i.unwrap(), r.unwrap());
    small_rx.frames = FrameCodec::new(4096);
    let mut wire = BytesMut::new();
    small_tx.encode(&big(100_000), &mut wire).unwrap();
    let res = decode_all(&mut small_rx, &mut wire);
    assert!(
        matches!(
            res,
            Err(Error::Connection(ConnectionError::FrameTooLarge { .. }))
        ),
        "{res:?}"
    );
    assert!(small_rx.plain.capacity() < 100_000);
    // A truncated stream is an error at EOF.
    let (mut a2, mut b2) = pair().await;
    let mut wire = BytesMut::new();
    a2.encode(&big(1000), &mut wire).unwrap();
    wire.truncate(wire.len() - 1);
    assert_eq!(b2.decode(&mut wire).unwrap(), None);
    assert!(matches!(
        b2.decode_eof(&mut wire),
        Err(Error::Connection(ConnectionError::Truncated { .. }))
    ));
}

#[tokio::test]
async fn another_key_fails_the_handshake_on_both_sides() {
    let (i, r) = pair_with(&ClusterKey::generate(), &ClusterKey::generate()).await;
    let ie = i.unwrap_err();
    let re = r.unwrap_err();
    assert!(ie.is_permanent() && re.is_permanent(), "{ie:?} {re:?}");
    assert!(
        matches!(re.handshake(), Some(HandshakeError::UnknownKey { .. })),
        "{re:?}"
    );
}

#[tokio::test]
async fn each_side_learns_the_node_id_of_the_others_identity() {
    let key = [ClusterKey::generate()];
    let (ida, idb) = (Identity::generate(), Identity::generate());
    let (i, r) = pair_ids(&key, &ida, &key, &idb).await;
    assert_eq!(i.unwrap().peer_id(), idb.node_id());
    assert_eq!(r.unwrap().peer_id(), ida.node_id());
}

#[tokio::test]
async fn an_acceptor_with_two_keys_accepts_either_and_refuses_a_third_by_fingerprint() {
    let (old, new, third) = (
        ClusterKey::generate(),
        ClusterKey::generate(),
        ClusterKey::generate(),
    );
    let both = [old.clone(), new.clone()];
    for dial in [&old, &new] {
        let (i, r) = pair_keys(std::slice::from_ref(dial), &both).await;
        let (mut i, mut r) = (i.unwrap(), r.unwrap());
        let mut wire = BytesMut::new();
        i.encode(&Message::Ping { nonce: 3 }, &mut wire).unwrap();
        assert_eq!(
            decode_all(&mut r, &mut wire).unwrap(),
            vec![Message::Ping { nonce: 3 }]
        );
    }
    // A node rotating the other way round (dials with new, still accepts old) too.
    let (i, r) = pair_keys(&[new.clone(), old.clone()], std::slice::from_ref(&old)).await;
    assert!(i.is_err() && r.is_err(), "the acceptor does not have `new`");
    let (i, r) = pair_keys(&[new.clone(), old.clone()], std::slice::from_ref(&new)).await;
    assert!(i.is_ok() && r.is_ok());

    let (i, r) = pair_keys(std::slice::from_ref(&third), &both).await;
    match r.unwrap_err() {
        Error::Handshake(HandshakeError::UnknownKey { offered, accepted }) => {
            assert_eq!(offered, third.fingerprint());
            assert_eq!(accepted, vec![old.fingerprint(), new.fingerprint()]);
        }
        other => panic!("{other:?}"),
    }
    match i.unwrap_err() {
        Error::Handshake(HandshakeError::PeerClosed {
            stage: Stage::Secure { dialled_with },
        }) => assert_eq!(dialled_with, Some(third.fingerprint())),
        other => panic!("{other:?}"),
    }
}

/// A raw Noise initiator (an earlier version's, or a malformed one) with `fingerprint`
/// as message 1's payload, against an acceptor [`Handshake`] with `keys`, fed by hand.
fn raw_initiator_against(
    fingerprint: &[u8],
    dial: &ClusterKey,
    me: &Identity,
    keys: &[ClusterKey],
) -> Result<SecureCodec, HandshakeError> {
    let mut hs = crate::testing::noise_initiator(dial, me.private_key());
    let mut acceptor =
        Handshake::new(Role::Acceptor, keys, &Identity::generate(), 1 << 20).unwrap();
    let mut buf = [0u8; 256];
    let mut payload = [0u8; 256];
    let n = hs.write_message(fingerprint, &mut buf).unwrap();
    let mut first = BytesMut::from(&PREAMBLE[..]);
    put_message(&mut first, &buf[..n]);
    acceptor.handle_bytes(&first)?;
    let mut reply = acceptor.poll_transmit().unwrap();
    let msg = take_message(&mut reply, 256).unwrap().unwrap();
    hs.read_message(&msg, &mut payload).unwrap();
    let n = hs.write_message(&[], &mut buf).unwrap();
    let mut third = BytesMut::new();
    put_message(&mut third, &buf[..n]);
    acceptor.handle_bytes(&third)?;
    assert!(acceptor.is_done());
    assert!(acceptor.poll_transmit().is_some(), "the confirmation");
    acceptor.finish().map(|(codec, _)| codec)
}

#[test]
fn an_empty_fingerprint_means_the_first_key_and_a_malformed_one_is_refused() {
    // An initiator of an earlier version sends no fingerprint: the acceptor's first key.
    let key = ClusterKey::generate();
    let me = Identity::generate();
    let keys = [key.clone(), ClusterKey::generate()];
    let r = raw_initiator_against(&[], &key, &me, &keys).unwrap();
    assert_eq!(r.peer_id(), me.node_id());
    // The second key is not used for an empty fingerprint.
    let e = raw_initiator_against(&[], &keys[1], &me, &keys).unwrap_err();
    assert!(
        matches!(e, HandshakeError::KeyMismatch { fingerprint: Some(ref f) } if *f == key.fingerprint()),
        "{e:?}"
    );

    // A fingerprint of the wrong length is refused.
    let e = raw_initiator_against(&[1, 2, 3], &key, &me, &keys).unwrap_err();
    assert!(
        matches!(
            e,
            HandshakeError::FingerprintLength {
                len: 3,
                expected: FINGERPRINT_LEN
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn plaintext_to_a_keyed_acceptor_is_refused_clearly() {
    let (mut x, mut y) = tokio::io::duplex(4096);
    let mut hello = BytesMut::new();
    FrameCodec::default()
        .encode(&Message::Ping { nonce: 1 }, &mut hello)
        .unwrap();
    x.write_all(&hello).await.unwrap();
    let err = handshake(
        &mut y,
        Role::Acceptor,
        &[ClusterKey::generate()],
        &Identity::generate(),
        1 << 20,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Handshake(HandshakeError::Plaintext)),
        "{err:?}"
    );
    assert!(err.is_permanent());
}

type Finished = Result<(SecureCodec, BytesMut), HandshakeError>;

/// Two state machines back to back, bytes moved by hand in pieces of `piece` bytes.
/// Returns both results and how many bytes went each way.
fn drive_pair(a: &[ClusterKey], b: &[ClusterKey], piece: usize) -> (Finished, Finished) {
    let mut i = Handshake::new(Role::Initiator, a, &Identity::generate(), 1 << 20).unwrap();
    let mut r = Handshake::new(Role::Acceptor, b, &Identity::generate(), 1 << 20).unwrap();
    let (mut ie, mut re) = (None, None);
    for _ in 0..100 {
        let mut moved = false;
        if let Some(out) = i.poll_transmit() {
            moved = true;
            for p in out.chunks(piece) {
                if let Err(e) = r.handle_bytes(p) {
                    re = Some(e);
                    break;
                }
            }
        }
        if let Some(out) = r.poll_transmit() {
            moved = true;
            for p in out.chunks(piece) {
                if let Err(e) = i.handle_bytes(p) {
                    ie = Some(e);
                    break;
                }
            }
        }
        if re.is_some() && ie.is_none() {
            // The acceptor closes the connection.
            ie = Some(i.handle_eof());
        }
        if !moved || (i.is_done() && r.is_done()) || ie.is_some() {
            break;
        }
    }
    let finish = |hs: Handshake, e: Option<HandshakeError>| match e {
        Some(e) => Err(e),
        None => hs.finish(),
    };
    (finish(i, ie), finish(r, re))
}

#[test]
fn two_state_machines_back_to_back_agree_in_any_pieces() {
    let key = [ClusterKey::generate()];
    for piece in [1, 2, 3, 7, 64, 1000] {
        let (i, r) = drive_pair(&key, &key, piece);
        let ((mut i, irest), (mut r, rrest)) = (i.unwrap(), r.unwrap());
        assert!(irest.is_empty() && rrest.is_empty());
        let mut wire = BytesMut::new();
        i.encode(&Message::Ping { nonce: 9 }, &mut wire).unwrap();
        assert_eq!(
            decode_all(&mut r, &mut wire).unwrap(),
            vec![Message::Ping { nonce: 9 }]
        );
        r.encode(&Message::Goodbye, &mut wire).unwrap();
        assert_eq!(
            decode_all(&mut i, &mut wire).unwrap(),
            vec![Message::Goodbye]
        );
    }
}

#[test]
fn another_key_fails_the_state_machines_with_typed_errors() {
    let (a, b) = (ClusterKey::generate(), ClusterKey::generate());
    let (i, r) = drive_pair(std::slice::from_ref(&a), std::slice::from_ref(&b), 5);
    assert!(
        matches!(r, Err(HandshakeError::UnknownKey { ref offered, .. }) if *offered == a.fingerprint()),
        "{r:?}"
    );
    assert!(
        matches!(
            i,
            Err(HandshakeError::PeerClosed {
                stage: Stage::Secure {
                    dialled_with: Some(_)
                }
            })
        ),
        "{i:?}"
    );
    // No keys at all: refused before anything is sent.
    assert!(matches!(
        Handshake::new(Role::Initiator, &[], &Identity::generate(), 1024),
        Err(HandshakeError::NoKey)
    ));
}

#[test]
fn the_machine_reads_no_further_than_it_needs_and_keeps_what_follows() {
    let key = [ClusterKey::generate()];
    let mut i = Handshake::new(Role::Initiator, &key, &Identity::generate(), 1024).unwrap();
    let mut r = Handshake::new(Role::Acceptor, &key, &Identity::generate(), 1024).unwrap();
    assert_eq!(r.wants(), PREAMBLE.len());
    let first = i.poll_transmit().unwrap();
    r.handle_bytes(&first[..PREAMBLE.len()]).unwrap();
    assert_eq!(r.wants(), 2, "a length prefix next");
    r.handle_bytes(&first[PREAMBLE.len()..PREAMBLE.len() + 2])
        .unwrap();
    assert_eq!(
        r.wants(),
        first.len() - PREAMBLE.len() - 2,
        "then the message"
    );
    r.handle_bytes(&first[PREAMBLE.len() + 2..]).unwrap();
    i.handle_bytes(&r.poll_transmit().unwrap()).unwrap();
    // Message 3 and whatever follows it in the same read: kept for the codec.
    let mut third = i.poll_transmit().unwrap();
    third.extend_from_slice(b"after");
    r.handle_bytes(&third).unwrap();
    assert!(r.is_done());
    assert_eq!(r.wants(), 0);
    i.handle_bytes(&r.poll_transmit().unwrap()).unwrap();
    assert!(i.is_done());
    let (_, rest) = r.finish().unwrap();
    assert_eq!(&rest[..], b"after");
}

#[test]
fn an_oversized_or_foreign_first_message_fails_before_it_is_buffered() {
    let key = [ClusterKey::generate()];
    let mut r = Handshake::new(Role::Acceptor, &key, &Identity::generate(), 1024).unwrap();
    let mut first = BytesMut::from(&PREAMBLE[..]);
    first.put_u16(u16::MAX);
    assert!(matches!(
        r.handle_bytes(&first),
        Err(HandshakeError::Oversized {
            len: 65_535,
            max: MAX_HANDSHAKE_MESSAGE
        })
    ));
    // After a failure, nothing more is taken or sent.
    assert!(r.handle_bytes(&[0; 10]).is_err());
    assert!(r.poll_transmit().is_none());
    assert_eq!(r.wants(), 0);
    let mut r = Handshake::new(Role::Acceptor, &key, &Identity::generate(), 1024).unwrap();
    assert!(matches!(
        r.handle_bytes(b"GET / HTTP/1.1\r\n"),
        Err(HandshakeError::NotSecureChannel)
    ));
    // A peer that closes first: where, typed.
    let mut i = Handshake::new(Role::Initiator, &key, &Identity::generate(), 1024).unwrap();
    assert!(matches!(
        i.handle_eof(),
        HandshakeError::PeerClosed {
            stage: Stage::Secure { dialled_with: Some(ref f) }
        } if *f == key[0].fingerprint()
    ));
}

#[tokio::test]
async fn the_preamble_is_an_oversized_frame_for_a_node_without_a_key() {
    let claimed = u32::from_be_bytes(PREAMBLE) as usize;
    assert!(claimed > crate::wire::MAX_FRAME_CEILING);
    let mut src = BytesMut::from(&PREAMBLE[..]);
    assert!(matches!(
        FrameCodec::default().decode(&mut src),
        Err(Error::Connection(ConnectionError::FrameTooLarge { .. }))
    ));
}
