//! The secure channel: a Noise handshake under the cluster key, then encrypted frames.
//!
//! With a [`ClusterKey`], a connection starts with the Noise handshake
//! [`NOISE_PARAMS`] (`Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s`, the cluster key as the
//! pre-shared key, the node's [`Identity`] as the static key) before `Hello`. After it, the
//! plaintext byte stream of the protocol (the frames of [`crate::codec`], unchanged) is
//! carried in Noise transport messages. docs/SECURITY.md states the format byte by byte; in
//! short:
//!
//! ```text
//! initiator -> responder   PREAMBLE (FF 70 32 70, "\xFFp2p"), then
//!                          [u16 BE len][Noise msg 1: e, payload = 8-byte key fingerprint]
//! responder -> initiator   [u16 BE len][Noise msg 2: e, ee, s, es]
//! initiator -> responder   [u16 BE len][Noise msg 3: s, se, psk]
//! responder -> initiator   [u16 BE len][transport message with an empty payload]  (confirmation)
//! then, both ways          [u16 BE len][transport message] ...
//! ```
//!
//! - The preamble makes a node without a key fail at once and clearly (as a length prefix it
//!   claims ~4 GiB, over any maximum frame) and lets a keyed node tell a plaintext peer
//!   from one with another key.
//! - A node may hold several keys (during a key rotation): the initiator dials with its
//!   first key and names it in message 1 by its [fingerprint](ClusterKey::fingerprint_bytes)
//!   (not secret); the responder picks its key with that fingerprint as the pre-shared key
//!   before message 3, or refuses clearly when it has none ("the peer uses a key this node
//!   does not have: fingerprint X"). The payload is bound into the handshake hash, so a
//!   changed fingerprint fails the handshake.
//! - The pre-shared key enters at message 3, so the responder finds a wrong key when it
//!   reads message 3; the confirmation tells the initiator that the responder accepted it.
//! - Each side's static key is its [`Identity`]; after the handshake
//!   [`SecureCodec::peer_id`] is the node id derived from the peer's static key, and
//!   [`crate::net`] refuses a peer whose `Hello`/`Welcome` claims another id.
//! - Each transport message carries either one or more whole frames, together at most
//!   [`BATCH_PLAINTEXT`] (16 KiB) of plaintext (the frames the driver sends in one burst
//!   share one message, so a burst of small frames costs one encryption and one tag), or
//!   one piece of a frame that does not fit: such a frame is cut into chunks of at most
//!   [`MAX_CHUNK_PLAINTEXT`] bytes (65,535 minus the 16-byte tag), one transport message
//!   each. A chunk never spans two frames. Decrypted bytes go to a plaintext buffer that
//!   [`FrameCodec`] decodes, so the maximum-frame rule applies before anything is allocated
//!   for a frame, and the plaintext buffer never holds more than the maximum frame plus its
//!   4-byte header, or [`BATCH_PLAINTEXT`] if that is more.
//! - Noise's nonces count messages, so a tampered, replayed, reordered or dropped message
//!   fails to decrypt, which closes that connection ([`ConnectionError::Tampered`]).

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

use crate::codec::{FrameCodec, LENGTH_PREFIX};
use crate::conn::Role;
use crate::identity::{node_id_of, Identity};
use crate::key::{to_hex, ClusterKey, FINGERPRINT_LEN};
use crate::{ConnectionError, Error, HandshakeError, Message, NodeId, Stage};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";

/// The four bytes the initiator sends before the handshake.
pub const PREAMBLE: [u8; 4] = [0xff, b'p', b'2', b'p'];

/// Bound into the handshake hash: both sides must speak this version of the secure layer.
const PROLOGUE: &[u8] = b"p2p-node secure channel v1";

/// Largest Noise message (the Noise specification's limit).
pub const MAX_NOISE_MESSAGE: usize = 65_535;

/// Size of the authentication tag of every transport message.
pub const TAG_LEN: usize = 16;

/// Largest plaintext chunk carried by one transport message.
pub const MAX_CHUNK_PLAINTEXT: usize = MAX_NOISE_MESSAGE - TAG_LEN;

/// Most plaintext one transport message carries when it holds whole frames (a batch).
pub const BATCH_PLAINTEXT: usize = 16 * 1024;

/// Largest handshake message accepted (the real ones are 32, 96 and 64 bytes).
const MAX_HANDSHAKE_MESSAGE: usize = 256;

/// A plaintext or encrypted-and-framed connection: the codec the tokio driver runs.
#[derive(Debug)]
pub enum WireCodec {
    /// No cluster key: frames as they are (protocol v1 without the secure layer).
    Plain(FrameCodec),
    /// With a cluster key, after a successful handshake.
    Secure(Box<SecureCodec>),
}

impl Decoder for WireCodec {
    type Item = Message;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, Error> {
        match self {
            WireCodec::Plain(c) => c.decode(src),
            WireCodec::Secure(c) => c.decode(src),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>, Error> {
        match self {
            WireCodec::Plain(c) => c.decode_eof(src),
            WireCodec::Secure(c) => c.decode_eof(src),
        }
    }
}

impl WireCodec {
    /// The frame codec inside (to set its handshake limit and budget).
    pub fn frames_mut(&mut self) -> &mut FrameCodec {
        match self {
            WireCodec::Plain(c) => c,
            WireCodec::Secure(c) => &mut c.frames,
        }
    }

    /// Starts a batch: until [`WireCodec::end_batch`], small frames are collected instead
    /// of being encrypted one by one (nothing changes without a key).
    pub fn begin_batch(&mut self) {
        if let WireCodec::Secure(c) = self {
            c.batching = true;
        }
    }

    /// Ends a batch: returns the collected frames encrypted as one transport message
    /// (empty when nothing was collected), to append to the write buffer.
    pub fn end_batch(&mut self) -> Result<BytesMut, Error> {
        match self {
            WireCodec::Plain(_) => Ok(BytesMut::new()),
            WireCodec::Secure(c) => {
                c.batching = false;
                let mut out = BytesMut::new();
                c.seal_pending(&mut out)?;
                Ok(out)
            }
        }
    }
}

impl Encoder<&Message> for WireCodec {
    type Error = Error;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), Error> {
        match self {
            WireCodec::Plain(c) => c.encode(msg, dst),
            WireCodec::Secure(c) => c.encode(msg, dst),
        }
    }
}

impl Encoder<Message> for WireCodec {
    type Error = Error;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), Error> {
        self.encode(&msg, dst)
    }
}

/// Encrypts and decrypts frames with the keys of a finished Noise handshake.
pub struct SecureCodec {
    noise: snow::TransportState,
    frames: FrameCodec,
    /// Decrypted bytes not yet decoded: at most one partial frame.
    plain: BytesMut,
    /// The encoding of the frame being sent, before encryption.
    scratch: BytesMut,
    /// Whole frames of the current batch, not encrypted yet.
    pending: BytesMut,
    /// Inside [`WireCodec::begin_batch`] / [`WireCodec::end_batch`].
    batching: bool,
    /// The node id the peer's static key proves.
    peer_id: NodeId,
}

impl std::fmt::Debug for SecureCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureCodec")
            .field("peer_id", &self.peer_id)
            .field("max_frame", &self.frames.max_frame())
            .field("plain_buffered", &self.plain.len())
            .finish_non_exhaustive()
    }
}

impl SecureCodec {
    fn new(noise: snow::TransportState, max_frame: usize, peer_id: NodeId) -> Self {
        SecureCodec {
            noise,
            frames: FrameCodec::new(max_frame),
            plain: BytesMut::new(),
            scratch: BytesMut::new(),
            pending: BytesMut::new(),
            batching: false,
            peer_id,
        }
    }

    /// Encrypts `plain` (at most [`MAX_CHUNK_PLAINTEXT`] bytes) as one transport message
    /// appended to `dst`.
    fn seal(
        noise: &mut snow::TransportState,
        plain: &[u8],
        dst: &mut BytesMut,
    ) -> Result<(), Error> {
        let start = dst.len();
        dst.put_u16(0);
        dst.resize(start + 2 + plain.len() + TAG_LEN, 0);
        let n = match noise.write_message(plain, &mut dst[start + 2..]) {
            Ok(n) => n,
            Err(e) => {
                dst.truncate(start);
                return Err(Error::Connection(ConnectionError::Encode(format!(
                    "encryption failed: {e}"
                ))));
            }
        };
        // n = plain.len() + TAG_LEN <= MAX_NOISE_MESSAGE, so it fits in a u16.
        let n16 = u16::try_from(n)
            .map_err(|_| Error::Connection(ConnectionError::Encode("chunk too large".into())))?;
        dst[start..start + 2].copy_from_slice(&n16.to_be_bytes());
        dst.truncate(start + 2 + n);
        Ok(())
    }

    /// Encrypts the frames collected in the current batch, if any, as one message.
    fn seal_pending(&mut self, dst: &mut BytesMut) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = Self::seal(&mut self.noise, &self.pending, dst);
        self.pending.clear();
        r
    }

    /// The node id derived from the peer's authenticated static key
    /// ([`crate::identity::node_id_of`]): the only id the peer may claim in its `Hello`.
    pub fn peer_id(&self) -> NodeId {
        self.peer_id
    }

    /// The maximum frame payload this codec accepts and sends.
    pub fn max_frame(&self) -> usize {
        self.frames.max_frame()
    }

    /// The frame codec inside (to set its handshake limit and budget).
    pub fn frames_mut(&mut self) -> &mut FrameCodec {
        &mut self.frames
    }

    /// Decrypts one transport message from `src` into the plaintext buffer. `Ok(false)`:
    /// `src` does not hold a whole message yet.
    fn open_chunk(&mut self, src: &mut BytesMut) -> Result<bool, Error> {
        if src.len() < 2 {
            return Ok(false);
        }
        // A u16 cannot exceed MAX_NOISE_MESSAGE (65,535), so neither can `len`.
        let len = usize::from(u16::from_be_bytes([src[0], src[1]]));
        if len < TAG_LEN {
            return Err(Error::Connection(ConnectionError::Tampered));
        }
        // The plaintext of one frame never exceeds the maximum frame plus its header, and a
        // chunk never spans two frames: a chunk that would overflow is refused before any
        // byte of it is stored.
        let limit = (self.frames.limit() + LENGTH_PREFIX).max(BATCH_PLAINTEXT);
        if self.plain.len() + (len - TAG_LEN) > limit {
            return Err(Error::Connection(ConnectionError::FrameTooLarge {
                len: self.plain.len() + len - TAG_LEN,
                max: limit,
            }));
        }
        if src.len() < 2 + len {
            // Nothing reserved for the claimed length: the buffer grows with what arrives.
            return Ok(false);
        }
        let chunk = src.split_to(2 + len);
        let start = self.plain.len();
        self.plain.resize(start + len, 0);
        match self
            .noise
            .read_message(&chunk[2..], &mut self.plain[start..])
        {
            Ok(n) => {
                self.plain.truncate(start + n);
                Ok(true)
            }
            Err(_) => {
                self.plain.truncate(start);
                Err(Error::Connection(ConnectionError::Tampered))
            }
        }
    }
}

impl Decoder for SecureCodec {
    type Item = Message;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, Error> {
        loop {
            if let Some(msg) = self.frames.decode(&mut self.plain)? {
                return Ok(Some(msg));
            }
            if !self.open_chunk(src)? {
                return Ok(None);
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>, Error> {
        if let Some(msg) = self.decode(src)? {
            return Ok(Some(msg));
        }
        if !src.is_empty() {
            return Err(Error::Connection(ConnectionError::Truncated {
                buffered: src.len(),
            }));
        }
        self.frames.decode_eof(&mut self.plain)
    }
}

impl Encoder<&Message> for SecureCodec {
    type Error = Error;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), Error> {
        self.scratch.clear();
        self.frames.encode(msg, &mut self.scratch)?;
        if self.batching && self.scratch.len() <= BATCH_PLAINTEXT {
            if self.pending.len() + self.scratch.len() > BATCH_PLAINTEXT {
                self.seal_pending(dst)?;
            }
            self.pending.extend_from_slice(&self.scratch);
            return Ok(());
        }
        // Frames collected earlier go first.
        self.seal_pending(dst)?;
        for chunk in self.scratch.chunks(MAX_CHUNK_PLAINTEXT) {
            Self::seal(&mut self.noise, chunk, dst)?;
        }
        // Do not keep a huge buffer around after one large frame.
        if self.scratch.capacity() > 1024 * 1024 {
            self.scratch = BytesMut::new();
        }
        Ok(())
    }
}

impl Encoder<Message> for SecureCodec {
    type Error = Error;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), Error> {
        self.encode(&msg, dst)
    }
}

/// Where a [`Handshake`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Acceptor: waiting for the [`PREAMBLE`].
    Preamble,
    /// Waiting for Noise message `n` (1 and 3 as acceptor, 2 as initiator).
    Message(u8),
    /// Initiator: waiting for the responder's confirmation.
    Confirmation,
    /// Done: [`Handshake::finish`] gives the codec.
    Done,
    /// Failed: nothing more is read or sent.
    Failed,
}

/// The Noise state: handshake messages until message 3, then the transport keys.
enum Noise {
    Handshake(Box<snow::HandshakeState>),
    Transport(Box<snow::TransportState>),
    Gone,
}

/// The secure handshake (see the module documentation) as a state machine without IO, like
/// [`crate::conn::Connection`]: feed it what arrives ([`Handshake::handle_bytes`], in any
/// pieces), send what [`Handshake::poll_transmit`] gives, and once
/// [`Handshake::is_done`], [`Handshake::finish`] turns it into the [`SecureCodec`] of the
/// rest of the connection. [`handshake`] runs one on a socket.
///
/// It never holds more than one handshake message it has not processed (a length prefix
/// is checked before the message is buffered), and [`Handshake::wants`] says how many bytes
/// its next step needs, so a driver that reads no more than that never reads past the
/// handshake.
pub struct Handshake {
    role: Role,
    keys: Vec<ClusterKey>,
    noise: Noise,
    step: Step,
    /// Bytes received and not processed yet.
    input: BytesMut,
    /// Bytes to send.
    output: BytesMut,
    max_frame: usize,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .field("step", &self.step)
            .field("buffered", &self.input.len())
            .field("to_send", &self.output.len())
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Starts a handshake as `role`. `keys` are this node's cluster keys: an initiator dials
    /// with the first one (and names it by its fingerprint in message 1); an acceptor
    /// accepts any of them. `identity`'s private key is the Noise static key. An initiator
    /// has its first message ready in [`Handshake::poll_transmit`] at once.
    pub fn new(
        role: Role,
        keys: &[ClusterKey],
        identity: &Identity,
        max_frame: usize,
    ) -> Result<Self, HandshakeError> {
        let Some(dial_key) = keys.first() else {
            return Err(HandshakeError::NoKey);
        };
        let params: snow::params::NoiseParams = NOISE_PARAMS.parse()?;
        // The acceptor replaces this pre-shared key by the one the initiator names.
        let builder = snow::Builder::new(params)
            .local_private_key(identity.private_key())
            .psk(3, dial_key.as_bytes())
            .prologue(PROLOGUE);
        let mut hs = Handshake {
            role,
            keys: keys.to_vec(),
            noise: Noise::Gone,
            step: Step::Failed,
            input: BytesMut::new(),
            output: BytesMut::new(),
            max_frame,
        };
        match role {
            Role::Initiator => {
                let mut noise = builder.build_initiator()?;
                // -> e, with the fingerprint of the key we use as the (cleartext) payload.
                let mut out = [0u8; MAX_HANDSHAKE_MESSAGE];
                let n = noise.write_message(&dial_key.fingerprint_bytes(), &mut out)?;
                hs.output.extend_from_slice(&PREAMBLE);
                put_message(&mut hs.output, &out[..n]);
                hs.noise = Noise::Handshake(Box::new(noise));
                hs.step = Step::Message(2);
            }
            Role::Acceptor => {
                hs.noise = Noise::Handshake(Box::new(builder.build_responder()?));
                hs.step = Step::Preamble;
            }
        }
        Ok(hs)
    }

    /// Takes bytes received from the peer and runs every step they complete. An error ends
    /// the handshake (nothing is sent to the peer: the connection is to be closed). Bytes
    /// after the end of the handshake are kept for [`Handshake::finish`].
    pub fn handle_bytes(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        if self.step == Step::Failed {
            return Err(self.closed());
        }
        self.input.extend_from_slice(data);
        let r = self.advance();
        if r.is_err() {
            self.step = Step::Failed;
            self.input.clear();
            self.output.clear();
        }
        r
    }

    /// The peer closed the connection (or reset it) before the handshake completed: the
    /// error to report. The handshake is over.
    pub fn handle_eof(&mut self) -> HandshakeError {
        self.step = Step::Failed;
        self.closed()
    }

    /// Bytes to send to the peer, if any (each call takes them).
    pub fn poll_transmit(&mut self) -> Option<BytesMut> {
        (!self.output.is_empty()).then(|| self.output.split())
    }

    /// How many more bytes the next step needs: a driver that reads at most this many at a
    /// time never reads past the handshake. 0 when done or failed.
    pub fn wants(&self) -> usize {
        let need = match self.step {
            Step::Done | Step::Failed => return 0,
            Step::Preamble => PREAMBLE.len(),
            Step::Message(_) | Step::Confirmation => match self.input.get(..2) {
                Some(len) => 2 + usize::from(u16::from_be_bytes([len[0], len[1]])),
                None => 2,
            },
        };
        need.saturating_sub(self.input.len()).max(1)
    }

    /// Whether the handshake is complete ([`Handshake::finish`] then gives the codec; an
    /// acceptor's confirmation may still be in [`Handshake::poll_transmit`]).
    pub fn is_done(&self) -> bool {
        self.step == Step::Done
    }

    /// The codec of the rest of the connection (with [`SecureCodec::peer_id`], the node id
    /// the peer's identity proves) and the bytes received after the handshake, which are
    /// the codec's to decode. Fails unless [`Handshake::is_done`].
    pub fn finish(self) -> Result<(SecureCodec, BytesMut), HandshakeError> {
        let not_done = self.closed();
        let Noise::Transport(transport) = self.noise else {
            return Err(not_done);
        };
        if self.step != Step::Done {
            return Err(not_done);
        }
        let peer_id = match transport.get_remote_static() {
            Some(public) => node_id_of(public),
            None => return Err(HandshakeError::NoStaticKey),
        };
        Ok((
            SecureCodec::new(*transport, self.max_frame, peer_id),
            self.input,
        ))
    }

    fn stage(&self) -> Stage {
        Stage::Secure {
            dialled_with: match self.role {
                Role::Initiator => self.keys.first().map(ClusterKey::fingerprint),
                Role::Acceptor => None,
            },
        }
    }

    fn closed(&self) -> HandshakeError {
        HandshakeError::PeerClosed {
            stage: self.stage(),
        }
    }

    /// Runs steps while the input holds what they need.
    fn advance(&mut self) -> Result<(), HandshakeError> {
        loop {
            match self.step {
                Step::Done | Step::Failed => return Ok(()),
                Step::Preamble => {
                    if self.input.len() < PREAMBLE.len() {
                        return Ok(());
                    }
                    let pre = self.input.split_to(PREAMBLE.len());
                    if pre[..] != PREAMBLE {
                        return Err(if pre[0] == 0 {
                            // A plaintext frame's length prefix: a node without a key.
                            HandshakeError::Plaintext
                        } else {
                            HandshakeError::NotSecureChannel
                        });
                    }
                    self.step = Step::Message(1);
                }
                Step::Message(_) | Step::Confirmation => {
                    let max = if self.step == Step::Confirmation {
                        TAG_LEN
                    } else {
                        MAX_HANDSHAKE_MESSAGE
                    };
                    let Some(msg) = take_message(&mut self.input, max)? else {
                        return Ok(());
                    };
                    self.step = self.on_message(&msg)?;
                }
            }
        }
    }

    /// Processes one handshake message; returns the next step.
    fn on_message(&mut self, msg: &[u8]) -> Result<Step, HandshakeError> {
        let mut out = [0u8; MAX_HANDSHAKE_MESSAGE];
        let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
        let noise = std::mem::replace(&mut self.noise, Noise::Gone);
        match (self.step, noise) {
            // Acceptor: -> e, fingerprint; <- e, ee, s, es.
            (Step::Message(1), Noise::Handshake(mut hs)) => {
                let n = hs
                    .read_message(msg, &mut payload)
                    .map_err(|_| HandshakeError::Invalid { step: 1 })?;
                let key = choose_key(&payload[..n], &self.keys)?;
                hs.set_psk(3, key.as_bytes())?;
                let n = hs.write_message(&[], &mut out)?;
                put_message(&mut self.output, &out[..n]);
                self.noise = Noise::Handshake(hs);
                // The chosen key first: message 3 is checked against it.
                if let Some(at) = self.keys.iter().position(|k| k == key) {
                    self.keys.swap(0, at);
                }
                Ok(Step::Message(3))
            }
            // Initiator: <- e, ee, s, es; -> s, se, psk.
            (Step::Message(2), Noise::Handshake(mut hs)) => {
                hs.read_message(msg, &mut payload)
                    .map_err(|_| HandshakeError::Invalid { step: 2 })?;
                let n = hs.write_message(&[], &mut out)?;
                put_message(&mut self.output, &out[..n]);
                self.noise = Noise::Transport(Box::new(hs.into_transport_mode()?));
                Ok(Step::Confirmation)
            }
            // Acceptor: -> s, se, psk (where a wrong key shows); <- confirmation.
            (Step::Message(3), Noise::Handshake(mut hs)) => {
                hs.read_message(msg, &mut payload)
                    .map_err(|_| HandshakeError::KeyMismatch {
                        fingerprint: self.keys.first().map(ClusterKey::fingerprint),
                    })?;
                let mut transport = hs.into_transport_mode()?;
                let n = transport.write_message(&[], &mut out)?;
                put_message(&mut self.output, &out[..n]);
                self.noise = Noise::Transport(Box::new(transport));
                Ok(Step::Done)
            }
            // Initiator: <- confirmation: the responder accepted our key.
            (Step::Confirmation, Noise::Transport(mut transport)) => {
                transport
                    .read_message(msg, &mut payload)
                    .map_err(|_| HandshakeError::KeyMismatch { fingerprint: None })?;
                self.noise = Noise::Transport(transport);
                Ok(Step::Done)
            }
            // Not reachable: each step keeps the Noise state it needs.
            _ => Err(self.closed()),
        }
    }
}

/// The acceptor's key for the fingerprint in message 1. An empty payload (a node of an
/// earlier version, which names no key) means this node's first key.
fn choose_key<'k>(
    fingerprint: &[u8],
    keys: &'k [ClusterKey],
) -> Result<&'k ClusterKey, HandshakeError> {
    if fingerprint.is_empty() {
        return keys.first().ok_or(HandshakeError::NoKey);
    }
    if fingerprint.len() != FINGERPRINT_LEN {
        return Err(HandshakeError::FingerprintLength {
            len: fingerprint.len(),
            expected: FINGERPRINT_LEN,
        });
    }
    keys.iter()
        .find(|k| k.fingerprint_bytes()[..] == *fingerprint)
        .ok_or_else(|| HandshakeError::UnknownKey {
            offered: to_hex(fingerprint),
            accepted: keys.iter().map(ClusterKey::fingerprint).collect(),
        })
}

/// Appends `msg` with its u16 length prefix (handshake messages are at most
/// [`MAX_HANDSHAKE_MESSAGE`] bytes, so the length fits).
fn put_message(dst: &mut BytesMut, msg: &[u8]) {
    let len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    dst.put_u16(len);
    dst.extend_from_slice(msg);
}

/// One length-prefixed handshake message from `src`, if whole; its length is checked
/// against `max` before anything is buffered for it.
fn take_message(src: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, HandshakeError> {
    let Some(len) = src.get(..2) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len > max {
        return Err(HandshakeError::Oversized { len, max });
    }
    if src.len() < 2 + len {
        return Ok(None);
    }
    src.advance(2);
    Ok(Some(src.split_to(len)))
}

/// Runs the secure handshake on `io` (see the module documentation and [`Handshake`]) and
/// returns the codec for the rest of the connection; [`SecureCodec::peer_id`] is the node
/// id the peer's identity proves. The caller bounds it in time. It reads nothing past the
/// handshake.
///
/// Errors: [`HandshakeError`] when the peer has no key or a key this node does not have, or
/// does not speak the secure layer, or closes the connection, or when `keys` is empty;
/// [`Error::Io`] when the socket fails.
pub async fn handshake<S>(
    io: &mut S,
    role: Role,
    keys: &[ClusterKey],
    identity: &Identity,
    max_frame: usize,
) -> Result<SecureCodec, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hs = Handshake::new(role, keys, identity, max_frame)?;
    let mut buf = [0u8; 2 + MAX_HANDSHAKE_MESSAGE];
    loop {
        if let Some(out) = hs.poll_transmit() {
            io.write_all(&out).await?;
            io.flush().await?;
        }
        if hs.is_done() {
            // Nothing was read past the handshake (`wants`), so nothing is left over.
            let (codec, _rest) = hs.finish()?;
            return Ok(codec);
        }
        let want = hs.wants().min(buf.len());
        let n = match io.read(&mut buf[..want]).await {
            Ok(0) => return Err(hs.handle_eof().into()),
            Ok(n) => n,
            Err(e) if closed(e.kind()) => return Err(hs.handle_eof().into()),
            Err(e) => return Err(Error::Io(e)),
        };
        hs.handle_bytes(&buf[..n])?;
    }
}

/// Whether a read error means the peer closed the connection.
fn closed(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(kind, UnexpectedEof | ConnectionReset)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::message::Completed;

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
        wire.extend_from_slice(&a.end_batch().unwrap());
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
        wire.extend_from_slice(&a.end_batch().unwrap());
        let lens = message_lengths(&wire);
        assert!(lens.len() > 3 && lens.len() < 20, "{lens:?}");
        assert!(lens.iter().all(|&l| l <= MAX_NOISE_MESSAGE));
        assert_eq!(decode_all(&mut b, &mut wire).unwrap(), msgs);

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
        let params: snow::params::NoiseParams = NOISE_PARAMS.parse().unwrap();
        let mut hs = snow::Builder::new(params)
            .local_private_key(me.private_key())
            .psk(3, dial.as_bytes())
            .prologue(PROLOGUE)
            .build_initiator()
            .unwrap();
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
}
