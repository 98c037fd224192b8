//! Protocol fixtures for tests, behind the `testing` feature (and in this crate's own unit
//! tests): the messages every suite builds, frames as the real codec writes them or by hand,
//! and the initiator's side of the Noise handshake driven by hand, so a test or a fuzz target
//! can encrypt anything a key holder could.
//!
//! One copy for all: p2p-core's unit and property tests, the fuzz targets, the workspace's
//! integration harness (`tests`) and node-cli's mesh bench use these instead of their own.
//!
//! Everything here panics on an error: it is test code, fed by the test itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Encoder;

use crate::codec::FrameCodec;
use crate::secure::{NOISE_PARAMS, PREAMBLE, PROLOGUE};
use crate::{Assign, ClusterKey, Completed, Hello, Message, NodeId, PROTOCOL_VERSION};

/// A `Hello` of this protocol version in `cluster`, from a fresh random node id, serving
/// `types` with `capacity` (no types: a coordinator).
pub fn hello(cluster: &str, types: &[&str], capacity: u32) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        cluster: cluster.into(),
        node_id: NodeId::random(),
        types: types.iter().map(|t| t.to_string()).collect(),
        capacity,
    }
}

/// The `Assign` of task `a{seq}` (type `a`, no arguments, first attempt, no timeout).
pub fn assign(seq: u64) -> Assign {
    assign_of(seq, "a")
}

/// The `Assign` of task `{kind}{seq}` of type `kind` (no arguments, first attempt, no
/// timeout).
pub fn assign_of(seq: u64, kind: &str) -> Assign {
    Assign {
        seq,
        task: format!("{kind}{seq}").into(),
        kind: kind.into(),
        args: String::new(),
        attempt: 1,
        timeout_ms: 0,
    }
}

/// A successful `Completed` of `seq` (exit code 0, no output, 1 µs).
pub fn completed(seq: u64) -> Completed {
    Completed {
        seq,
        ok: true,
        exit_code: Some(0),
        output: compact_str::CompactString::default(),
        error: None,
        duration_us: 1,
    }
}

/// The frame of `msg` as the real codec ([`FrameCodec::default`]) writes it.
pub fn frame(msg: &Message) -> Vec<u8> {
    frames(std::slice::from_ref(msg))
}

/// The frames of `msgs`, one after the other, as the real codec writes them.
pub fn frames(msgs: &[Message]) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut codec = FrameCodec::default();
    for m in msgs {
        codec.encode(m, &mut out).expect("encode a message");
    }
    out.to_vec()
}

/// A frame written by hand: the 4-byte big-endian length of `payload`, then `payload`,
/// whatever it holds (the codec's maximum is not checked).
pub fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a payload under 4 GiB");
    let mut out = Vec::with_capacity(4 + payload.len());
    out.put_u32(len);
    out.extend_from_slice(payload);
    out
}

/// The frame of `msg` with `tail` appended to its payload (as a later version might send).
pub fn frame_with_tail(msg: &Message, tail: &[u8]) -> Vec<u8> {
    let mut payload = BytesMut::new();
    crate::wire::encode_into(msg, &mut payload).expect("encode a message");
    payload.put_slice(tail);
    raw_frame(&payload)
}

/// The initiator's Noise state before its first message, as docs/SECURITY.md states it:
/// `NOISE_PARAMS`, the channel's prologue, `key` as the PSK and `static_private` (32 bytes)
/// as its static key.
pub fn noise_initiator(key: &ClusterKey, static_private: &[u8]) -> snow::HandshakeState {
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse().expect("the Noise parameters");
    snow::Builder::new(params)
        .local_private_key(static_private)
        .psk(3, key.as_bytes())
        .prologue(PROLOGUE)
        .build_initiator()
        .expect("a Noise initiator")
}

/// Reads one handshake message (`[u16 BE length][bytes]`).
async fn read_hs(io: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut len = [0u8; 2];
    io.read_exact(&mut len)
        .await
        .expect("read a handshake length");
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    io.read_exact(&mut msg)
        .await
        .expect("read a handshake message");
    msg
}

/// Writes one handshake message (`[u16 BE length][bytes]`).
async fn write_hs(io: &mut (impl AsyncWrite + Unpin), msg: &[u8]) {
    let len = u16::try_from(msg.len())
        .expect("a handshake message under 64 KiB")
        .to_be_bytes();
    io.write_all(&len).await.expect("write a handshake length");
    io.write_all(msg).await.expect("write a handshake message");
    io.flush().await.expect("flush");
}

/// The initiator's side of the secure handshake over `io`, by hand (a fresh static key,
/// `key`'s fingerprint in message 1), up to the acceptor's confirmation; returns the raw
/// transport, with which the caller encrypts whatever it likes (`[u16 BE length][ciphertext]`
/// chunks).
pub async fn raw_initiator(
    io: &mut (impl AsyncRead + AsyncWrite + Unpin),
    key: &ClusterKey,
) -> snow::TransportState {
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse().expect("the Noise parameters");
    let static_key = snow::Builder::new(params)
        .generate_keypair()
        .expect("a static key");
    let mut hs = noise_initiator(key, &static_key.private);
    let mut out = [0u8; 512];
    let mut payload = [0u8; 512];
    let n = hs
        .write_message(&key.fingerprint_bytes(), &mut out)
        .expect("message 1");
    io.write_all(&PREAMBLE).await.expect("write the preamble");
    write_hs(io, &out[..n]).await;
    let msg = read_hs(io).await;
    hs.read_message(&msg, &mut payload).expect("message 2");
    let n = hs.write_message(&[], &mut out).expect("message 3");
    write_hs(io, &out[..n]).await;
    let mut transport = hs.into_transport_mode().expect("transport mode");
    let confirmation = read_hs(io).await;
    transport
        .read_message(&confirmation, &mut payload)
        .expect("the acceptor's confirmation");
    transport
}

/// A small deterministic generator (xorshift64*): a test that draws from it replays the same
/// numbers from the same seed (an odd one; 0 stays 0).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}
