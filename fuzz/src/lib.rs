//! The bodies of the fuzz targets, as plain functions of the input bytes: each target in
//! `fuzz_targets/` calls one, and `cargo test` here runs each on a few inputs, so they stay
//! correct on a stable toolchain where libFuzzer cannot run.
//!
//! Every body panics (which libFuzzer reports as a crash) when a rule is broken, not only
//! when the code under test panics by itself. The rules are the same as the property suites'
//! in the workspace: `*/tests/proptest_*.rs`; two checkers are shared with them file
//! for file (`#[path]` below).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use bytes::{BufMut, BytesMut};
use p2p_core::codec::{FrameCodec, LENGTH_PREFIX};
use p2p_core::conn::{Config, Connection, Role};
use p2p_core::identity::Identity;
use p2p_core::secure::negotiate::Payload;
use p2p_core::secure::{self, SecureCodec, TransportCipher, MAX_CHUNK_PLAINTEXT};
use p2p_core::testing::{completed, raw_initiator};
use p2p_core::{
    Assign, ClusterKey, Hello, Message, NodeId, Reject, RejectReason, PROTOCOL_VERSION,
};
use p2p_discovery::beacon::{self, Beacon};
use tokio_util::codec::{Decoder, Encoder};

#[path = "../../p2p-core/tests/support/conn_model.rs"]
mod conn_model;
#[path = "../../p2p-tasks/tests/support/taskfile.rs"]
mod taskfile;

// ---------------------------------------------------------------------------------------
// frame_decoder

/// `FrameCodec::decode` over arbitrary bytes: the first byte picks the maximum frame, the
/// second how the stream is cut. The stream decodes the same whole and cut into pieces, the
/// buffer never reserves more than one maximum frame beyond the bytes given, and whatever
/// decodes re-encodes and decodes back to itself.
pub fn frame_decoder(data: &[u8]) {
    let [pick, cut, stream @ ..] = data else {
        return;
    };
    let max_frame = [1024, 4096, 64 * 1024, 16 << 20][usize::from(pick % 4)];
    let whole = decode_in_pieces(max_frame, stream, stream.len().max(1), false);
    let pieces = decode_in_pieces(max_frame, stream, usize::from(*cut % 64) + 1, false);
    assert_eq!(whole, pieces, "the stream decodes differently when cut");
    // Chunks as slices of the read buffer (a connection's codec without a key): the same.
    let shared = decode_in_pieces(max_frame, stream, usize::from(*cut % 64) + 1, true);
    assert_eq!(
        whole, shared,
        "the stream decodes differently with shared chunks"
    );
    for m in &whole.0 {
        let mut again = BytesMut::new();
        let mut codec = FrameCodec::new(max_frame);
        codec
            .encode(m, &mut again)
            .expect("a decoded message re-encodes");
        assert_eq!(codec.decode(&mut again).unwrap().as_ref(), Some(m));
    }
    // The payload decoder alone, on the same bytes.
    let _ = p2p_core::wire::decode(stream);
}

/// Messages decoded, then the error that ended the stream (its text), if any.
type Outcome = (Vec<Message>, Option<String>);

fn decode_in_pieces(max_frame: usize, stream: &[u8], piece: usize, shared: bool) -> Outcome {
    let mut codec = FrameCodec::new(max_frame);
    if shared {
        codec.share_chunks();
    }
    let max_frame = codec.max_frame();
    // A sharing codec reads chunks into buffers of its own size.
    let room = if shared {
        p2p_core::codec::CHUNK_READ_BUFFER
    } else {
        0
    };
    let mut src = BytesMut::new();
    let mut got = Vec::new();
    let mut fed = 0;
    for chunk in stream.chunks(piece) {
        src.extend_from_slice(chunk);
        fed += chunk.len();
        loop {
            let r = codec.decode(&mut src);
            assert!(
                src.capacity() <= 2 * (fed + max_frame + LENGTH_PREFIX) + 64 + room,
                "buffer of {} bytes after {fed} bytes (max frame {max_frame})",
                src.capacity()
            );
            match r {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break,
                Err(e) => return (got, Some(e.to_string())),
            }
        }
    }
    loop {
        match codec.decode_eof(&mut src) {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, None),
            Err(e) => return (got, Some(e.to_string())),
        }
    }
}

// ---------------------------------------------------------------------------------------
// handshake

const CLUSTER: &str = "default";

fn text(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    let s = String::arbitrary(u)?;
    Ok(s.chars().take(16).collect())
}

fn seq(u: &mut Unstructured<'_>) -> arbitrary::Result<u64> {
    if u.ratio(7, 8)? {
        u.int_in_range(0..=5)
    } else {
        u64::arbitrary(u)
    }
}

fn hello(u: &mut Unstructured<'_>) -> arbitrary::Result<Hello> {
    Ok(Hello {
        version: if u.ratio(5, 6)? {
            PROTOCOL_VERSION
        } else {
            u16::arbitrary(u)?
        },
        cluster: if u.ratio(5, 6)? {
            CLUSTER.into()
        } else {
            text(u)?
        },
        node_id: NodeId(<[u8; 16]>::arbitrary(u)?),
        types: vec![text(u)?; u.int_in_range(0..=2)?],
        capacity: u.int_in_range(0..=4)?,
    })
}

/// A message, biased towards values that matter (this version and cluster, small seqs).
fn message(u: &mut Unstructured<'_>) -> arbitrary::Result<Message> {
    Ok(match u.int_in_range(0..=9)? {
        0 => Message::Hello(hello(u)?),
        1 => Message::Welcome(hello(u)?),
        2 => Message::Reject(Reject {
            reason: *u.choose(&[
                RejectReason::Version,
                RejectReason::Cluster,
                RejectReason::Key,
                RejectReason::Busy,
                RejectReason::Invalid,
            ])?,
            message: text(u)?,
        }),
        3 => Message::Assign(Assign {
            seq: seq(u)?,
            task: text(u)?.into(),
            kind: text(u)?.into(),
            args: text(u)?,
            attempt: u32::arbitrary(u)?,
            timeout_ms: u64::arbitrary(u)?,
        }),
        4 => Message::Completed(completed(seq(u)?)),
        5 => Message::Cancel { seq: seq(u)? },
        6 => Message::Ping {
            nonce: u64::arbitrary(u)?,
        },
        7 => Message::Pong {
            nonce: u64::arbitrary(u)?,
        },
        8 => Message::Goodbye,
        _ => Message::GoodbyeAck,
    })
}

/// The connection state machine as acceptor or initiator, fed fuzzer-chosen messages (or
/// raw bytes through the real codec), timeouts, EOF and local actions; the model in
/// `conn_model.rs` checks every step (nothing accepted before the handshake, capacity, seqs,
/// goodbye, nothing after a failure).
pub fn handshake(data: &[u8]) {
    let _ = drive_connection(&mut Unstructured::new(data));
}

fn drive_connection(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let role = if bool::arbitrary(u)? {
        Role::Acceptor
    } else {
        Role::Initiator
    };
    let capacity = u.int_in_range(0..=3)?;
    let raw = u.ratio(1, 4)?;
    let local = Hello {
        version: PROTOCOL_VERSION,
        cluster: CLUSTER.into(),
        node_id: NodeId([1; 16]),
        types: vec!["a".into()],
        capacity,
    };
    let mut now = Instant::now();
    let mut conn = Connection::new(role, local, Config::default(), now);
    let mut ck = conn_model::Checker::new(role, capacity);
    ck.check(&mut conn, "start", false);
    let mut codec = FrameCodec::new(64 * 1024);
    let mut buf = BytesMut::new();
    while !u.is_empty() {
        match u.int_in_range(0..=12)? {
            0..=5 if raw => {
                let n = u.int_in_range(0..=64)?;
                buf.extend_from_slice(u.bytes(n)?);
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(m)) => {
                            let r = conn.handle_message(m, now);
                            ck.check(&mut conn, "bytes", r.is_err());
                        }
                        Ok(None) => break,
                        // The driver closes the socket.
                        Err(_) => return Ok(()),
                    }
                }
            }
            0..=5 => {
                let m = message(u)?;
                let r = conn.handle_message(m, now);
                ck.check(&mut conn, "message", r.is_err());
            }
            6 => {
                now += Duration::from_millis(u.int_in_range(0..=15_000)?);
                let r = conn.handle_timeout(now);
                ck.check(&mut conn, "timeout", r.is_err());
            }
            7 => {
                let r = conn.handle_eof();
                ck.check(&mut conn, "eof", r.is_err());
            }
            8 | 9 => {
                let s = seq(u)?;
                let a = Assign {
                    seq: s,
                    task: format!("a{s}").into(),
                    kind: "a".into(),
                    args: String::new(),
                    attempt: 1,
                    timeout_ms: 0,
                };
                if conn.assign(a).is_ok() {
                    ck.assigned(s);
                }
                ck.check(&mut conn, "assign", false);
            }
            10 | 11 => {
                let s = seq(u)?;
                if conn.complete(completed(s)).is_ok() {
                    ck.completed(s);
                }
                ck.check(&mut conn, "complete", false);
            }
            _ => {
                if bool::arbitrary(u)? {
                    let _ = conn.cancel(seq(u)?);
                } else {
                    conn.goodbye();
                }
                ck.check(&mut conn, "cancel/goodbye", false);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// beacon

/// `Beacon::decode` over arbitrary datagrams: whatever decodes re-encodes (no longer than
/// the datagram) and decodes to the same beacon; `beacon::open` under a fixed key never
/// accepts what was not sealed with it.
pub fn beacon(data: &[u8]) {
    if let Ok(b) = Beacon::decode(data) {
        let again = b.encode().expect("a decoded beacon fits the format");
        assert!(again.len() <= data.len());
        assert_eq!(Beacon::decode(&again).as_ref(), Ok(&b));
    }
    let key = ClusterKey::from_bytes([7; 32]);
    if let Some(inner) = beacon::open(data, &key) {
        // Only a forged MAC gets here: libFuzzer finding one would be a real break.
        assert_eq!(beacon::seal(inner.to_vec(), &key), data);
    }
}

// ---------------------------------------------------------------------------------------
// task_file

/// `p2p_tasks::parse::parse` over arbitrary text: errors name a real position (a token of a
/// line of the input), tasks point at their ids, and parse -> print -> parse is stable.
pub fn task_file(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = taskfile::parse_and_check(&text);
}

// ---------------------------------------------------------------------------------------
// transfer

/// The transfer messages' decoder (`wire::decode` of a `Message::Transfer` payload) and the
/// receiver of a file (`transfer::Receiver`), fed by the fuzzer. What decodes re-encodes to
/// the bytes it came from (but what follows them) and decodes back to itself. The receiver,
/// fed chunks at any offset, of any size, true or altered: writes only bytes that extend the
/// file in order, never past its size, and completes only with the whole true file.
pub fn transfer(data: &[u8]) {
    // Decoder: the input as a Transfer payload.
    let mut payload = vec![14u8];
    payload.extend_from_slice(data);
    if let Ok(msg) = p2p_core::wire::decode(&payload) {
        let mut again = BytesMut::new();
        p2p_core::wire::encode_into(&msg, &mut again).unwrap();
        assert!(payload.starts_with(&again), "{msg:?} re-encodes differently");
        assert_eq!(p2p_core::wire::decode(&again).unwrap(), msg);
    }
    let _ = drive_receiver(&mut Unstructured::new(data));
}

// ---------------------------------------------------------------------------------------
// replica

/// The replicated-run messages' decoder (`wire::decode` of a `Message::Replica` payload,
/// index 16): what decodes re-encodes to a prefix of the input and decodes back to itself,
/// and its bounds check answers without panicking.
pub fn replica(data: &[u8]) {
    let mut payload = vec![16u8];
    payload.extend_from_slice(data);
    if let Ok(msg) = p2p_core::wire::decode(&payload) {
        let mut again = BytesMut::new();
        p2p_core::wire::encode_into(&msg, &mut again).unwrap();
        assert!(payload.starts_with(&again), "{msg:?} re-encodes differently");
        assert_eq!(p2p_core::wire::decode(&again).unwrap(), msg);
        if let Message::Replica(r) = &msg {
            let _ = r.is_bounded();
        }
    }
}

fn drive_receiver(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    use p2p_core::message::MAX_CHUNK;
    use p2p_core::transfer::{hash_bytes, Received, Receiver};
    let size = u.int_in_range(0..=300_000usize)?;
    let seed = u8::arbitrary(u)?;
    let file: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(29) ^ seed).collect();
    let window = u.int_in_range(1..=(1u32 << 20))?;
    let max_file = if bool::arbitrary(u)? { u64::MAX } else { u.int_in_range(0..=400_000u64)? };
    let Ok(mut r) = Receiver::new(1, hash_bytes(&file), size as u64, window, max_file) else {
        assert!(size as u64 > max_file, "refused a file within --max-file");
        return Ok(());
    };
    let mut disk: Vec<u8> = Vec::new();
    for _ in 0..64 {
        match u.int_in_range(0..=3u8)? {
            0 => {
                let _ = r.poll_ack();
            }
            1 => {
                r.on_end().unwrap_or_else(|_| assert!(!r.is_complete()));
            }
            _ => {
                let in_order = bool::arbitrary(u)?;
                let offset = if in_order {
                    disk.len() as u64
                } else {
                    u.int_in_range(0..=size as u64 + 10)?
                };
                let len = u.int_in_range(0..=MAX_CHUNK + 1)?;
                let start = (offset as usize).min(size);
                let mut chunk = file[start..(start + len).min(size)].to_vec();
                if bool::arbitrary(u)? && !chunk.is_empty() {
                    let i = u.choose_index(chunk.len())?;
                    chunk[i] ^= 1;
                }
                match r.on_chunk(offset, &chunk) {
                    Ok(Received::Write(b)) => {
                        assert_eq!(offset as usize, disk.len(), "a chunk out of place was taken");
                        disk.extend_from_slice(b);
                    }
                    Ok(Received::Complete(b)) => {
                        assert_eq!(offset as usize, disk.len());
                        disk.extend_from_slice(b);
                        assert_eq!(disk, file, "completed with other bytes");
                        return Ok(());
                    }
                    Err(_) => return Ok(()),
                }
                assert!(disk.len() <= size);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// secure_payload

/// `secure::negotiate::Payload::decode` (the cipher offer and choice of handshake messages
/// 2 and 3) over arbitrary bytes: never panics; what decodes re-encodes and decodes back to
/// itself; an offer lists known ciphers without repeats, at most 16; unknown fields appended
/// to a valid payload change nothing, and a payload cut inside a field is refused.
pub fn secure_payload(data: &[u8]) {
    let Ok(p) = Payload::decode(data) else {
        return;
    };
    let again = p.encode();
    assert_eq!(
        Payload::decode(&again).as_ref(),
        Ok(&p),
        "re-encoded: {again:?}"
    );
    if let Some(offer) = &p.offer {
        assert!(offer.len() <= 16);
        for (i, c) in offer.iter().enumerate() {
            assert!(!offer[..i].contains(c), "a repeat in {offer:?}");
            assert_eq!(TransportCipher::from_id(c.id()), Some(*c));
        }
    }
    let mut more = data.to_vec();
    more.extend_from_slice(&[0xee, 2, 1, 2]);
    assert_eq!(
        Payload::decode(&more),
        Ok(p.clone()),
        "an unknown field changed the payload"
    );
    if !again.is_empty() {
        assert!(Payload::decode(&again[..again.len() - 1]).is_err());
    }
}

// ---------------------------------------------------------------------------------------
// secure_decrypt

fn secure_pair(max_frame: usize) -> (snow::TransportState, SecureCodec) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut x, mut y) = tokio::io::duplex(1 << 16);
        let key = ClusterKey::from_bytes([9; 32]);
        let identity = Identity::from_private_bytes([3; 32]);
        let keys = [key.clone()];
        let acceptor = secure::handshake(&mut y, Role::Acceptor, &keys, &identity, max_frame);
        let (receiver, sender) = tokio::join!(acceptor, raw_initiator(&mut x, &key));
        (sender, receiver.unwrap())
    })
}

/// `SecureCodec::decode` after a real handshake, fed chunks the fuzzer chooses: plaintext
/// encrypted properly (any bytes, cut anywhere, as a key holder could send), or damaged
/// (raw bytes, a flipped bit, a replayed chunk). Never panics; with no damage it decodes
/// what the plain frame codec makes of the same plaintext (or refuses earlier, never later);
/// with damage it never decodes more than the plain codec would from the plaintext sent.
pub fn secure_decrypt(data: &[u8]) {
    let _ = drive_secure(&mut Unstructured::new(data));
}

fn drive_secure(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let max_frame = *u.choose(&[1024usize, 64 * 1024, 16 << 20])?;
    let (tx, mut rx) = secure_pair(max_frame);
    let mut s = Sent {
        tx,
        plain: Vec::new(),
        wire: Vec::new(),
        damaged: false,
        last_chunk: Vec::new(),
    };
    // Runs out of input at some point: what was built so far is checked.
    let _ = s.build(u);
    let piece = u.int_in_range(1..=512).unwrap_or(512);
    let (got, failed) = receive(&mut rx, &s.wire, piece);
    let (expected, plain_failed) = plain_outcome(max_frame, &s.plain);
    assert!(
        expected.starts_with(&got),
        "decoded {got:?}, not a prefix of what was sent {expected:?} (damaged: {})",
        s.damaged
    );
    if !s.damaged && !failed {
        assert_eq!(got, expected);
        assert!(!plain_failed);
    }
    Ok(())
}

/// What the fuzzer made the sender put on the wire.
struct Sent {
    tx: snow::TransportState,
    /// The plaintext of every properly encrypted chunk, in order.
    plain: Vec<u8>,
    wire: Vec<u8>,
    damaged: bool,
    last_chunk: Vec<u8>,
}

impl Sent {
    fn build(&mut self, u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
        let mut buf = vec![0u8; 65_535];
        while !u.is_empty() {
            match u.int_in_range(0..=9)? {
                0..=6 => {
                    let bytes = if u.ratio(1, 3)? {
                        // A whole valid frame.
                        let mut f = BytesMut::new();
                        FrameCodec::default().encode(&message(u)?, &mut f).unwrap();
                        f.to_vec()
                    } else {
                        let n = u.int_in_range(1..=MAX_CHUNK_PLAINTEXT.min(256))?;
                        u.bytes(n.min(u.len()))?.to_vec()
                    };
                    if bytes.is_empty() {
                        continue;
                    }
                    let len = self.tx.write_message(&bytes, &mut buf).unwrap();
                    let mut chunk = u16::try_from(len).unwrap().to_be_bytes().to_vec();
                    chunk.extend_from_slice(&buf[..len]);
                    self.plain.extend_from_slice(&bytes);
                    self.wire.extend_from_slice(&chunk);
                    self.last_chunk = chunk;
                }
                7 => {
                    let n = u.int_in_range(0..=32)?;
                    self.wire.extend_from_slice(u.bytes(n.min(u.len()))?);
                    self.damaged = true;
                }
                8 => {
                    if !self.wire.is_empty() {
                        let at = u.choose_index(self.wire.len())?;
                        self.wire[at] ^= 1 << u.int_in_range(0..=7)?;
                        self.damaged = true;
                    }
                }
                _ => {
                    self.wire.extend_from_slice(&self.last_chunk);
                    self.damaged |= !self.last_chunk.is_empty();
                }
            }
        }
        Ok(())
    }
}

fn receive(rx: &mut SecureCodec, wire: &[u8], piece: usize) -> (Vec<Message>, bool) {
    let mut src = BytesMut::new();
    let mut got = Vec::new();
    for chunk in wire.chunks(piece) {
        src.put_slice(chunk);
        loop {
            match rx.decode(&mut src) {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break,
                Err(_) => return (got, true),
            }
        }
    }
    loop {
        match rx.decode_eof(&mut src) {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, false),
            Err(_) => return (got, true),
        }
    }
}

fn plain_outcome(max_frame: usize, plain: &[u8]) -> (Vec<Message>, bool) {
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

#[cfg(test)]
mod tests {
    //! Each body on a few inputs, so that the bodies stay correct on a stable toolchain.

    use super::*;

    fn inputs() -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0xff; 64],
            b"a1 a2 c1 b1 c2 a3 b2 b3 a4 c3 b4\n".to_vec(),
            b"b2 after a1 -- x\na1\n".to_vec(),
            b"P2PB\x01\x01".to_vec(),
            vec![0, 0, 0, 0, 2, 6, 7],
            vec![1, 4, 0x7f, 2, 2, 1, 2, 1, 2],
            vec![9, 0, 1, 2, 1, 1],
        ];
        // Deterministic noise.
        let mut x: u32 = 0x9e37_79b9;
        for len in [16, 100, 700] {
            v.push(
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect(),
            );
        }
        v
    }

    #[test]
    fn every_body_runs_on_sample_inputs() {
        for input in inputs() {
            frame_decoder(&input);
            handshake(&input);
            beacon(&input);
            task_file(&input);
            secure_decrypt(&input);
            secure_payload(&input);
            transfer(&input);
            replica(&input);
        }
    }
}
