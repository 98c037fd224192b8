//! The codec of a connection: plaintext frames, or frames in Noise transport messages.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::cipher::{Transport, TransportCipher};
use super::{BATCH_PLAINTEXT, MAX_CHUNK_PLAINTEXT, TAG_LEN};
use crate::codec::{FrameCodec, LENGTH_PREFIX};
use crate::{ConnectionError, Error, Message, NodeId};

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

    /// Ends a batch: appends the collected frames to `dst` encrypted as one transport
    /// message (nothing when nothing was collected, or without a key). `dst` is meant to be
    /// the write buffer itself, so the sealed bytes are not copied again.
    pub fn end_batch(&mut self, dst: &mut BytesMut) -> Result<(), Error> {
        match self {
            WireCodec::Plain(_) => Ok(()),
            WireCodec::Secure(c) => {
                c.batching = false;
                c.seal_pending(dst)
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

/// Encrypts and decrypts frames with the keys of a finished Noise handshake, in the
/// transport cipher the handshake negotiated.
pub struct SecureCodec {
    transport: Transport,
    pub(super) frames: FrameCodec,
    /// Decrypted bytes not yet decoded: at most one partial frame.
    pub(super) plain: BytesMut,
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
            .field("cipher", &self.cipher())
            .field("max_frame", &self.frames.max_frame())
            .field("plain_buffered", &self.plain.len())
            .finish_non_exhaustive()
    }
}

impl SecureCodec {
    pub(super) fn new(transport: Transport, max_frame: usize, peer_id: NodeId) -> Self {
        SecureCodec {
            transport,
            frames: FrameCodec::new(max_frame),
            plain: BytesMut::new(),
            scratch: BytesMut::new(),
            pending: BytesMut::new(),
            batching: false,
            peer_id,
        }
    }

    /// Encrypts the frames collected in the current batch, if any, as one message.
    fn seal_pending(&mut self, dst: &mut BytesMut) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = self.transport.send.seal(&self.pending, dst);
        self.pending.clear();
        r
    }

    /// The node id derived from the peer's authenticated static key
    /// ([`crate::identity::node_id_of`]): the only id the peer may claim in its `Hello`.
    pub fn peer_id(&self) -> NodeId {
        self.peer_id
    }

    /// The transport cipher the handshake negotiated.
    pub fn cipher(&self) -> TransportCipher {
        self.transport.send.cipher()
    }

    /// The maximum frame payload this codec accepts and sends.
    pub fn max_frame(&self) -> usize {
        self.frames.max_frame()
    }

    /// The frame codec inside (to set its handshake limit and budget).
    pub fn frames_mut(&mut self) -> &mut FrameCodec {
        &mut self.frames
    }

    /// Decrypts one transport message in place at the front of `src`. `Ok(None)`: `src`
    /// does not hold a whole message yet. `Ok(Some(n))`: the plaintext is `src[2..2 + n]`,
    /// the tag after it (nothing of `src` consumed yet).
    fn open_message(&mut self, src: &mut BytesMut) -> Result<Option<usize>, Error> {
        if src.len() < 2 {
            return Ok(None);
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
            return Ok(None);
        }
        self.transport.recv.open(&mut src[2..2 + len]).map(Some)
    }

    /// Whether the `n` plaintext bytes at `src[2..]` are one whole frame, to be decoded
    /// where they are: nothing of an earlier frame waits in the plaintext buffer, and the
    /// frame's length prefix says the rest.
    fn one_frame(&self, src: &[u8], n: usize) -> bool {
        self.plain.is_empty()
            && !self.frames.mid_frame()
            && n >= LENGTH_PREFIX
            && src
                .get(2..2 + LENGTH_PREFIX)
                .and_then(|h| <[u8; LENGTH_PREFIX]>::try_from(h).ok())
                .is_some_and(|h| u32::from_be_bytes(h) as usize + LENGTH_PREFIX == n)
    }
}

impl Decoder for SecureCodec {
    type Item = Message;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, Error> {
        loop {
            // What the plaintext buffer holds is decoded as copies (it is reused in place).
            if let Some(msg) = self.frames.decode_from(&mut self.plain, false, 0)? {
                return Ok(Some(msg));
            }
            let Some(n) = self.open_message(src)? else {
                return Ok(None);
            };
            if self.one_frame(src, n) {
                // A message that is one whole frame (every file chunk) is decoded where it
                // was decrypted, in the read buffer: a chunk is a slice of it when the
                // frame codec shares chunks, as without a key. No copy.
                src.advance(2);
                return match self.frames.decode_from(src, true, TAG_LEN)? {
                    Some(msg) => Ok(Some(msg)),
                    // `one_frame` saw the whole frame.
                    None => Err(Error::Connection(ConnectionError::Truncated {
                        buffered: src.len(),
                    })),
                };
            }
            // Batched small frames, or a piece of a large frame: on to the plaintext buffer.
            self.plain.extend_from_slice(&src[2..2 + n]);
            src.advance(2 + n + TAG_LEN);
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
        if crate::transfer::is_chunk(msg) {
            return self.encode_in_place(msg, dst);
        }
        if self.batching {
            // Encoded straight into the batch; a frame that does not fit beside the frames
            // collected before it starts the next batch, and one too big for any batch is
            // sealed on its own (after those collected before it).
            let before = self.pending.len();
            if let Err(e) = self.frames.encode(msg, &mut self.pending) {
                self.pending.truncate(before);
                return Err(e);
            }
            let len = self.pending.len() - before;
            if self.pending.len() <= BATCH_PLAINTEXT {
                return Ok(());
            }
            let r = if before > 0 {
                self.transport.send.seal(&self.pending[..before], dst)
            } else {
                Ok(())
            };
            if len <= BATCH_PLAINTEXT {
                self.pending.copy_within(before.., 0);
                self.pending.truncate(len);
                return r.inspect_err(|_| self.pending.clear());
            }
            let r = r.and_then(|()| {
                self.pending[before..]
                    .chunks(MAX_CHUNK_PLAINTEXT)
                    .try_for_each(|chunk| self.transport.send.seal(chunk, dst))
            });
            self.pending.clear();
            // Do not keep a huge buffer around after one large frame.
            if self.pending.capacity() > 1024 * 1024 {
                self.pending = BytesMut::new();
            }
            return r;
        }
        self.scratch.clear();
        self.frames.encode(msg, &mut self.scratch)?;
        // Frames collected earlier go first.
        self.seal_pending(dst)?;
        for chunk in self.scratch.chunks(MAX_CHUNK_PLAINTEXT) {
            self.transport.send.seal(chunk, dst)?;
        }
        // Do not keep a huge buffer around after one large frame.
        if self.scratch.capacity() > 1024 * 1024 {
            self.scratch = BytesMut::new();
        }
        Ok(())
    }
}

impl SecureCodec {
    /// Encodes a large frame (a file chunk) straight into `dst` and seals it there: no copy
    /// of its bytes through a batch or scratch buffer. The frames collected before it go
    /// first. A frame over one transport message (a 64 KiB chunk) is cut as usual.
    fn encode_in_place(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), Error> {
        self.seal_pending(dst)?;
        let start = dst.len();
        dst.put_u16(0);
        if let Err(e) = self.frames.encode(msg, dst) {
            dst.truncate(start);
            return Err(e);
        }
        if dst.len() - start - 2 <= MAX_CHUNK_PLAINTEXT {
            return self.transport.send.seal_in_place(dst, start);
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(&dst[start + 2..]);
        dst.truncate(start);
        let r = self
            .scratch
            .chunks(MAX_CHUNK_PLAINTEXT)
            .try_for_each(|chunk| self.transport.send.seal(chunk, dst));
        if self.scratch.capacity() > 1024 * 1024 {
            self.scratch = BytesMut::new();
        }
        r
    }
}

impl Encoder<Message> for SecureCodec {
    type Error = Error;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), Error> {
        self.encode(&msg, dst)
    }
}
