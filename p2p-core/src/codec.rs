//! Framing: a 4-byte big-endian length, then a [`wire`]-encoded [`Message`].
//!
//! The decoder checks a frame's length header against the current limit before it keeps a
//! byte of the frame, and never reserves the length a header claims: the read buffer grows
//! only with the bytes that really arrive. The limit is [`MAX_HANDSHAKE_FRAME`] (4 KiB)
//! while a connection is in its handshake ([`FrameCodec::begin_handshake`]; a `Hello` is
//! bounded, see [`wire::MAX_HELLO`]), and the configured maximum frame after it
//! ([`FrameCodec::open`]). A frame larger than [`SMALL_FRAME`] also needs its claimed length
//! from the node's [`FrameBudget`], shared by all its connections, for as long as it is
//! being received: a node's memory for frames in flight is bounded per connection (one
//! maximum frame) and in total (the budget). Encoding refuses a frame over the maximum too,
//! so a node never sends what its peer must reject.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::wire::{self, MAX_FRAME_CEILING};
use crate::{ConnectionError, Error, Message};

/// Size of the length prefix in bytes.
pub const LENGTH_PREFIX: usize = 4;

/// Default maximum payload length of one frame: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = MAX_FRAME_CEILING;

/// The largest frame accepted while the handshake is not done: 4 KiB. The largest `Hello`
/// this version sends or accepts is [`wire::MAX_HELLO`] bytes; the rest is room for fields a
/// later version may append.
pub const MAX_HANDSHAKE_FRAME: usize = 4096;

const _: () = assert!(wire::MAX_HELLO + 1024 <= MAX_HANDSHAKE_FRAME);
// A small frame ([`wire::encode_small`]) is under every maximum frame.
const _: () = assert!(wire::SMALL < 1024);

/// Frames up to this size are received without taking from the [`FrameBudget`].
pub const SMALL_FRAME: usize = 64 * 1024;

/// Default [`FrameBudget`]: 256 MiB of large frames being received at once, per node.
pub const DEFAULT_FRAME_BUDGET: usize = 256 * 1024 * 1024;

/// The bytes a node may hold in large frames (over [`SMALL_FRAME`]) still being received,
/// across all its connections. Cheap to clone; clones share the budget.
///
/// A frame whose claimed length does not fit in what is left is refused
/// ([`ConnectionError::FrameBudget`]), which closes that connection only.
#[derive(Debug, Clone)]
pub struct FrameBudget {
    total: usize,
    used: Arc<AtomicUsize>,
}

impl FrameBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        FrameBudget {
            total,
            used: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes taken now by frames being received.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= self.total)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Default for FrameBudget {
    fn default() -> Self {
        FrameBudget::new(DEFAULT_FRAME_BUDGET)
    }
}

/// The read buffer a codec that shares chunks ([`FrameCodec::share_chunks`]) reads file
/// chunks into: 256 KiB, so one system call takes up to four chunks (as the raw copy's
/// reads; 1 MiB measured no better, and costs a connection that streams more memory).
pub const CHUNK_READ_BUFFER: usize = 256 * 1024;

/// Room for one whole chunk frame (its length prefix, header and 64 KiB of data).
const CHUNK_ROOM: usize =
    LENGTH_PREFIX + crate::transfer::CHUNK_OVERHEAD + crate::message::MAX_CHUNK;

/// Read buffers a sharing codec keeps, parked for reuse or still held by chunks alive
/// (16 MiB): four times a receiver's default credit (4 MiB of chunks), so the buffers of a
/// file streaming only take turns (16 made a transfer copy chunks out at every other
/// buffer: 1,064-1,394 MB/s instead of 1,692-1,709), and the most that chunks hold: when
/// every one is still held, chunks are copied out instead of shared until one is free
/// again, so a peer whose chunks wait (a flood of chunks for no transfer, queued behind
/// the link's 1,024 events) pins at most these, not a 256 KiB buffer for every chunk
/// waiting (90 MB at the peak for one such connection).
const PARKED_BUFFERS: usize = 64;

/// Frames other than chunks in a row after which a sharing codec gives its chunk buffers
/// back (a transfer has ended, or pauses).
const CHUNKS_OVER_AFTER: u32 = 16;

/// Encodes and decodes whole messages on a byte stream.
#[derive(Debug)]
pub struct FrameCodec {
    max_frame: usize,
    /// The limit now: `max_frame`, or [`MAX_HANDSHAKE_FRAME`] during the handshake.
    limit: usize,
    budget: Option<FrameBudget>,
    /// The length of the frame whose header was consumed and whose payload is awaited.
    pending: Option<usize>,
    /// Bytes of `budget` this codec holds for the pending frame.
    held: usize,
    /// Chunks are decoded as slices of the read buffer ([`FrameCodec::share_chunks`]).
    shared: Option<Box<ChunkBuffers>>,
}

/// The read buffers of a codec that shares chunks. A chunk decoded as a slice of the read
/// buffer keeps that buffer's memory alive, so the buffer cannot be reused in place while
/// it lives: once a buffer has no room for another whole chunk frame, the codec goes on in
/// another one of [`CHUNK_READ_BUFFER`] bytes (the next frame's first bytes copied over) and
/// parks the old one, which it takes again once every chunk in it was dropped (no new
/// memory, so no page faults). Allocating and freeing buffers of this size, across
/// threads, made the C allocator give memory back and fault it in again at every chunk
/// (measured with `perf stat` in an earlier round); these buffers live as long as the
/// chunks stream. Bounded: [`PARKED_BUFFERS`] parked, plus those the chunks still alive hold
/// (the receivers' credit bounds those).
#[derive(Debug)]
struct ChunkBuffers {
    /// The room a read buffer must have for one whole chunk as it comes on the wire: one
    /// frame ([`CHUNK_ROOM`]), plus a transport message's length and tag with a key.
    room: usize,
    parked: Vec<BytesMut>,
    /// Buffers allocated so far (the others were reclaimed).
    made: u64,
    /// Chunks came lately (fewer than [`CHUNKS_OVER_AFTER`] other frames since the last).
    streaming: bool,
    /// Frames other than chunks since the last chunk.
    others: u32,
    /// Every parked buffer was still held when a new one was due: chunks are copied.
    copying: bool,
}

impl ChunkBuffers {
    fn new(room: usize) -> Self {
        ChunkBuffers {
            room,
            parked: Vec::new(),
            made: 0,
            streaming: false,
            others: 0,
            copying: false,
        }
    }

    /// After a chunk was split off `src`: when `src` has no room for another whole chunk
    /// frame (and does not already hold most of one), it goes on in a reclaimed or new
    /// buffer.
    fn after_chunk(&mut self, src: &mut BytesMut) {
        self.streaming = true;
        self.others = 0;
        if src.capacity() - src.len() >= self.room || src.len() >= self.room {
            return;
        }
        let reclaimed = self
            .parked
            .iter_mut()
            .position(|b| b.try_reclaim(CHUNK_READ_BUFFER));
        let mut next = match reclaimed {
            Some(i) => self.parked.swap_remove(i),
            // Every buffer still held by chunks: copy chunks out until one is free.
            None if self.parked.len() >= PARKED_BUFFERS => {
                self.copying = true;
                return;
            }
            None => {
                self.made += 1;
                BytesMut::with_capacity(CHUNK_READ_BUFFER)
            }
        };
        next.extend_from_slice(src);
        let mut old = std::mem::replace(src, next);
        old.clear();
        self.parked.push(old);
    }

    /// Whether the next frame may be a slice of the read buffer: not while copying, until a
    /// parked buffer is free again.
    fn share_now(&mut self) -> bool {
        if self.copying
            && self
                .parked
                .iter_mut()
                .any(|b| b.try_reclaim(CHUNK_READ_BUFFER))
        {
            self.copying = false;
        }
        !self.copying
    }

    /// After another frame: `true` when no chunks stream (any more), and the read buffer
    /// is to shrink as without sharing.
    fn after_other(&mut self) -> bool {
        if !self.streaming {
            return true;
        }
        self.others += 1;
        if self.others < CHUNKS_OVER_AFTER {
            return false;
        }
        self.streaming = false;
        self.parked = Vec::new();
        true
    }
}

impl FrameCodec {
    /// A codec that accepts and sends payloads of at most `max_frame` bytes.
    ///
    /// `max_frame` is clamped to at most [`MAX_FRAME_CEILING`] (16 MiB) and at least 1 KiB.
    pub fn new(max_frame: usize) -> Self {
        let max_frame = max_frame.clamp(1024, MAX_FRAME_CEILING);
        FrameCodec {
            max_frame,
            limit: max_frame,
            budget: None,
            pending: None,
            held: 0,
            shared: None,
        }
    }

    /// Decodes file chunks as slices of the read buffer, not copies (the read buffers are
    /// recycled once their chunks are gone): for a connection's transport, whose chunks
    /// are written out and dropped soon after.
    pub fn share_chunks(&mut self) {
        self.share_chunks_in(0);
    }

    /// [`FrameCodec::share_chunks`] for frames that come inside transport messages of
    /// `overhead` bytes more than the frame (the secure codec decrypts a message that holds
    /// one whole frame in place in the read buffer and decodes it there).
    pub(crate) fn share_chunks_in(&mut self, overhead: usize) {
        if self.shared.is_none() {
            self.shared = Some(Box::new(ChunkBuffers::new(CHUNK_ROOM + overhead)));
        }
    }

    /// Read buffers a sharing codec allocated so far (tests).
    #[cfg(test)]
    pub(crate) fn shared_buffers_made(&self) -> u64 {
        self.shared.as_ref().map_or(0, |s| s.made)
    }

    /// Whether the header of a frame was taken and its payload is awaited.
    pub(crate) fn mid_frame(&self) -> bool {
        self.pending.is_some()
    }

    /// Large frames (over [`SMALL_FRAME`]) must take their length from `budget` while they
    /// are received. Default: no budget (only the maximum frame bounds them).
    pub fn with_budget(mut self, budget: FrameBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// [`FrameCodec::with_budget`] on a codec in use.
    pub fn set_budget(&mut self, budget: FrameBudget) {
        self.release();
        self.budget = Some(budget);
    }

    /// Accepts frames of at most [`MAX_HANDSHAKE_FRAME`] until [`FrameCodec::open`].
    pub fn begin_handshake(&mut self) {
        self.limit = self.max_frame.min(MAX_HANDSHAKE_FRAME);
    }

    /// The handshake is done: frames up to the maximum frame are accepted.
    pub fn open(&mut self) {
        self.limit = self.max_frame;
    }

    /// The maximum payload length this codec accepts and sends.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// The largest payload accepted now (smaller than [`FrameCodec::max_frame`] during the
    /// handshake).
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn release(&mut self) {
        if let Some(b) = &self.budget {
            if self.held > 0 {
                b.give_back(self.held);
            }
        }
        self.held = 0;
    }
}

impl Drop for FrameCodec {
    fn drop(&mut self) {
        self.release();
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, Error> {
        self.decode_from(src, true, 0)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>, Error> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() && self.pending.is_none() => Ok(None),
            None => Err(Error::Connection(ConnectionError::Truncated {
                buffered: src.len()
                    + if self.pending.is_some() {
                        LENGTH_PREFIX
                    } else {
                        0
                    },
            })),
        }
    }
}

impl FrameCodec {
    /// Decodes the next frame of `src`. `share`: a chunk may be a slice of `src` (when the
    /// codec shares chunks at all); `skip`: bytes after the frame dropped with it (the tag
    /// of the transport message the frame was decrypted in, in place).
    pub(crate) fn decode_from(
        &mut self,
        src: &mut BytesMut,
        share: bool,
        skip: usize,
    ) -> Result<Option<Message>, Error> {
        // `head`: the bytes of the header still in `src` before the payload. A small frame
        // that is all here already is decoded with its header in place, and taken off with
        // it in one go; any other frame has its header taken (and, when large, its budget)
        // and waits for its payload.
        let (len, head) = match self.pending {
            Some(len) => (len, 0),
            None => {
                let Some(head) = src.first_chunk::<LENGTH_PREFIX>() else {
                    return Ok(None);
                };
                let claimed = u32::from_be_bytes(*head) as usize;
                if claimed > self.limit {
                    return Err(Error::Connection(ConnectionError::FrameTooLarge {
                        len: claimed,
                        max: self.limit,
                    }));
                }
                if claimed <= SMALL_FRAME && src.len() - LENGTH_PREFIX >= claimed {
                    (claimed, LENGTH_PREFIX)
                } else {
                    if claimed > SMALL_FRAME {
                        if let Some(b) = &self.budget {
                            if !b.take(claimed) {
                                return Err(Error::Connection(ConnectionError::FrameBudget {
                                    len: claimed,
                                    budget: b.total(),
                                }));
                            }
                            self.held = claimed;
                        }
                    }
                    src.advance(LENGTH_PREFIX);
                    self.pending = Some(claimed);
                    (claimed, 0)
                }
            }
        };
        // Nothing is reserved for the frame: the buffer grows with the bytes received.
        let here = src.len() - head;
        if here < len {
            return Ok(None);
        }
        if here < len + skip {
            return Err(Error::Connection(ConnectionError::Truncated {
                buffered: here,
            }));
        }
        self.pending = None;
        let share = share && self.shared.as_mut().is_some_and(|s| s.share_now());
        let payload = &src[head..head + len];
        // Only a transfer message can hold a slice of its frame (a chunk's data): every
        // other frame is decoded where it lies in `src`, nothing split off or counted.
        let transfer = payload.first() == Some(&wire::TRANSFER);
        match self.shared.as_mut() {
            Some(shared) if share && transfer => {
                src.advance(head);
                let frame = src.split_to(len).freeze();
                src.advance(skip);
                let msg = wire::decode_shared(&frame);
                drop(frame);
                if matches!(&msg, Ok(m) if crate::transfer::is_chunk(m)) {
                    shared.after_chunk(src);
                } else if shared.after_other() {
                    shrink(src);
                }
                self.release();
                msg.map(Some)
            }
            shared => {
                let msg = wire::decode(payload);
                src.advance(head + len + skip);
                if shared.filter(|_| share).is_none_or(|s| s.after_other()) {
                    shrink(src);
                }
                self.release();
                msg.map(Some)
            }
        }
    }
}

/// Does not keep a large buffer for a connection after a large frame went through.
fn shrink(src: &mut BytesMut) {
    if src.capacity() > 2 * SMALL_FRAME && src.len() < SMALL_FRAME {
        let rest = BytesMut::from(&src[..]);
        *src = rest;
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = Error;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), Error> {
        // A task message is encoded on the stack, its length in front, and joins `dst` in
        // one copy (`max_frame` is at least 1 KiB: it always fits).
        let mut small = [0u8; LENGTH_PREFIX + wire::SMALL];
        if let Some(len) = wire::encode_small(msg, &mut small[LENGTH_PREFIX..]) {
            small[..LENGTH_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
            dst.extend_from_slice(&small[..LENGTH_PREFIX + len]);
            return Ok(());
        }
        let start = dst.len();
        dst.put_u32(0);
        if let Err(e) = wire::encode_into(msg, dst) {
            dst.truncate(start);
            return Err(e);
        }
        let len = dst.len() - start - LENGTH_PREFIX;
        if len > self.max_frame {
            dst.truncate(start);
            return Err(Error::Connection(ConnectionError::FrameTooLarge {
                len,
                max: self.max_frame,
            }));
        }
        // `len <= max_frame <= 16 MiB`, so it fits in a u32.
        dst[start..start + LENGTH_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = Error;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), Error> {
        self.encode(&msg, dst)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::message::*;
    use crate::NodeId;

    fn all_messages() -> Vec<Message> {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            cluster: "default".into(),
            node_id: NodeId([7; 16]),
            types: vec!["a".into(), "b".into()],
            capacity: 4,
        };
        vec![
            Message::Hello(hello.clone()),
            Message::Welcome(hello),
            Message::Reject(Reject {
                reason: RejectReason::Cluster,
                message: "cluster mismatch".into(),
            }),
            Message::Assign(Assign {
                seq: 42,
                task: "a1".into(),
                kind: "a".into(),
                args: "x y".into(),
                attempt: 1,
                timeout_ms: 3_600_000,
            }),
            Message::Completed(Completed {
                seq: 42,
                ok: false,
                exit_code: Some(3),
                output: "Executing task: a1 ✓".into(),
                error: Some("exit status 3".into()),
                duration_us: 1234,
            }),
            Message::Cancel { seq: 9 },
            Message::Ping { nonce: u64::MAX },
            Message::Pong { nonce: 0 },
            Message::Goodbye,
            Message::GoodbyeAck,
        ]
    }

    #[test]
    fn every_message_round_trips_whole_and_byte_by_byte() {
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        for m in all_messages() {
            codec.encode(&m, &mut wire).unwrap();
        }
        // Whole buffer at once.
        let mut src = wire.clone();
        let mut got = Vec::new();
        while let Some(m) = codec.decode(&mut src).unwrap() {
            got.push(m);
        }
        assert_eq!(got, all_messages());
        assert!(src.is_empty());
        // One byte at a time: frames split anywhere still decode.
        let mut src = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            src.put_u8(*b);
            while let Some(m) = codec.decode(&mut src).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, all_messages());
        assert_eq!(codec.decode_eof(&mut src).unwrap(), None);
    }

    /// Feeds `wire` to `codec` as a socket would: into the buffer's spare room, at most
    /// `piece` bytes a read, growing it by a byte when full (as tokio-util's `Framed`).
    /// Each decoded message goes to `take`.
    fn feed(codec: &mut FrameCodec, wire: &[u8], piece: usize, mut take: impl FnMut(Message)) {
        let mut src = BytesMut::new();
        let mut at = 0;
        while at < wire.len() {
            src.reserve(1);
            let n = (src.capacity() - src.len()).min(piece).min(wire.len() - at);
            src.extend_from_slice(&wire[at..at + n]);
            at += n;
            while let Some(m) = codec.decode(&mut src).unwrap() {
                take(m);
            }
        }
        assert!(src.is_empty());
    }

    /// Random streams of frames (task messages, chunks, large frames, bytes that are no
    /// message) cut in random pieces, through a codec that shares chunks or not: each frame
    /// decodes as `wire::decode` decodes its payload alone, and the stream stops with the
    /// error of the first payload that is none, whichever way the frame is taken (whole
    /// and in place, or its header first).
    #[test]
    fn frames_decode_as_their_payloads_whole_or_in_pieces_shared_or_not() {
        let mut seed = 0x5eed_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            let mut payloads: Vec<Vec<u8>> = Vec::new();
            for _ in 0..1 + next(12) {
                let msg = match next(6) {
                    0 => Message::Transfer(Box::new(Transfer::Chunk {
                        id: next(3),
                        offset: next(1 << 20),
                        data: bytes::Bytes::from(vec![7u8; next(2_000) as usize]),
                    })),
                    1 => Message::Completed(Completed {
                        seq: next(u64::MAX),
                        ok: true,
                        exit_code: None,
                        output: "y".repeat(SMALL_FRAME + next(9) as usize).into(),
                        error: None,
                        duration_us: 0,
                    }),
                    2 => {
                        // No message (or a cut one), sometimes after a transfer's variant.
                        let mut junk: Vec<u8> = (0..next(20)).map(|_| next(256) as u8).collect();
                        if next(2) == 0 {
                            junk.insert(0, crate::wire::TRANSFER);
                        }
                        payloads.push(junk);
                        continue;
                    }
                    _ => all_messages().swap_remove(next(10) as usize),
                };
                let mut p = BytesMut::new();
                wire::encode_into(&msg, &mut p).unwrap();
                payloads.push(p.to_vec());
            }
            let mut stream = Vec::new();
            for p in &payloads {
                stream.extend_from_slice(&(p.len() as u32).to_be_bytes());
                stream.extend_from_slice(p);
            }
            let expected: Vec<Result<Message, String>> = payloads
                .iter()
                .map(|p| wire::decode(p).map_err(|e| e.to_string()))
                .collect();
            let mut codec = FrameCodec::default().with_budget(FrameBudget::new(1 << 20));
            if round % 2 == 0 {
                codec.share_chunks();
            }
            let mut src = BytesMut::new();
            let mut got = Vec::new();
            let mut at = 0;
            'feed: while at < stream.len() {
                let most = if next(3) == 0 { 7 } else { 5_000 };
                let n = (1 + next(most) as usize).min(stream.len() - at);
                src.extend_from_slice(&stream[at..at + n]);
                at += n;
                loop {
                    match codec.decode(&mut src) {
                        Ok(Some(m)) => got.push(Ok(m)),
                        Ok(None) => break,
                        Err(e) => {
                            got.push(Err(e.to_string()));
                            break 'feed;
                        }
                    }
                }
            }
            let upto = expected
                .iter()
                .position(Result::is_err)
                .map_or(expected.len(), |i| i + 1);
            assert_eq!(got, expected[..upto], "round {round}");
            if upto == expected.len() {
                assert!(src.is_empty() && !codec.mid_frame());
            }
        }
    }

    fn chunk_stream(chunks: usize) -> (Vec<Message>, BytesMut) {
        let mut msgs = Vec::new();
        for i in 0..chunks {
            let data: Vec<u8> = (0..63 * 1024).map(|b| (b + i * 7) as u8).collect();
            msgs.push(Message::Transfer(Box::new(Transfer::Chunk {
                id: 1,
                offset: (i * 63 * 1024) as u64,
                data: data.into(),
            })));
            if i % 37 == 5 {
                msgs.push(Message::Ping { nonce: i as u64 });
            }
        }
        let mut wire = BytesMut::new();
        let mut codec = FrameCodec::default();
        for m in &msgs {
            codec.encode(m, &mut wire).unwrap();
        }
        (msgs, wire)
    }

    /// Shared chunks decode to the same messages as copies, whatever the reads' sizes.
    #[test]
    fn chunks_shared_with_the_read_buffer_decode_as_copies_do() {
        let (msgs, wire) = chunk_stream(100);
        for piece in [1000, 65_536, 300_000, 1 << 22] {
            let mut codec = FrameCodec::default();
            codec.share_chunks();
            let mut got = Vec::new();
            feed(&mut codec, &wire, piece, |m| got.push(m));
            assert_eq!(got, msgs, "reads of {piece} bytes");
        }
    }

    /// While chunks stream, a sharing codec reuses its read buffers once their chunks are
    /// gone instead of allocating new ones (each new one costs a page fault per 4 KiB), and
    /// keeps a bounded number when chunks are held for a while; other frames end it.
    #[test]
    fn a_sharing_codec_reuses_its_read_buffers_and_keeps_a_bounded_number() {
        let (msgs, wire) = chunk_stream(1000);
        let made = |c: &FrameCodec| c.shared.as_ref().map(|s| s.made).unwrap();
        // Each chunk dropped as soon as it is decoded: two buffers take turns.
        let mut codec = FrameCodec::default();
        codec.share_chunks();
        let mut n = 0;
        feed(&mut codec, &wire, 1 << 20, |_| n += 1);
        assert_eq!(n, msgs.len());
        assert!(made(&codec) <= 2, "{} buffers for 63 MB", made(&codec));
        // The last 40 chunks held (2.5 MB, less than the credit): the parked buffers take
        // turns, few are made.
        let mut codec = FrameCodec::default();
        codec.share_chunks();
        let mut held = std::collections::VecDeque::new();
        feed(&mut codec, &wire, 1 << 20, |m| {
            held.push_back(m);
            if held.len() > 40 {
                held.pop_front();
            }
        });
        let shared = codec.shared.as_ref().unwrap();
        assert!(shared.parked.len() <= PARKED_BUFFERS);
        assert!(
            made(&codec) <= PARKED_BUFFERS as u64,
            "{} buffers for 63 MB",
            made(&codec)
        );
        // Frames other than chunks: the buffers go, and the read buffer shrinks.
        let mut src = BytesMut::with_capacity(CHUNK_READ_BUFFER);
        for i in 0..CHUNKS_OVER_AFTER {
            codec
                .encode(
                    &Message::Ping {
                        nonce: u64::from(i),
                    },
                    &mut src,
                )
                .unwrap();
        }
        while codec.decode(&mut src).unwrap().is_some() {}
        let shared = codec.shared.as_ref().unwrap();
        assert!(shared.parked.is_empty() && !shared.streaming);
        assert!(src.capacity() <= 2 * SMALL_FRAME, "{}", src.capacity());
    }

    /// Chunks that all stay alive (a peer's chunks waiting in a long queue) hold at most
    /// [`PARKED_BUFFERS`] read buffers: past those the codec copies chunks out, and shares
    /// again once a buffer is free; every chunk decodes the same either way.
    #[test]
    fn chunks_held_alive_pin_a_bounded_number_of_read_buffers() {
        let (msgs, wire) = chunk_stream(1000);
        let mut codec = FrameCodec::default();
        codec.share_chunks();
        let mut held = Vec::new();
        feed(&mut codec, &wire, 1 << 20, |m| held.push(m));
        assert_eq!(held, msgs);
        let shared = codec.shared.as_ref().unwrap();
        assert!(
            shared.made <= PARKED_BUFFERS as u64 && shared.copying,
            "{} read buffers made for 1,000 chunks held alive",
            shared.made
        );
        // Once they are gone, chunks are slices of the read buffer again (each dropped as
        // it comes), in the buffers already made.
        drop(held);
        let mut n = 0;
        feed(&mut codec, &wire, 1 << 20, |_| n += 1);
        assert_eq!(n, msgs.len());
        let shared = codec.shared.as_ref().unwrap();
        assert!(!shared.copying);
        assert!(shared.made <= PARKED_BUFFERS as u64, "{}", shared.made);
    }

    #[test]
    fn oversized_length_prefix_is_an_error_before_any_allocation() {
        let mut codec = FrameCodec::new(4096);
        let mut src = BytesMut::from(&[0xff, 0xff, 0xff, 0xf0, 1, 2][..]);
        let cap_before = src.capacity();
        match codec.decode(&mut src) {
            Err(Error::Connection(ConnectionError::FrameTooLarge { len, max })) => {
                assert_eq!(len, 0xffff_fff0);
                assert_eq!(max, 4096);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(src.capacity(), cap_before, "no buffer was reserved");
    }

    /// The claimed length is never reserved: 16 MiB announced and 10 bytes sent leave a
    /// buffer the size of what arrived (it was reserved whole, before the handshake too).
    #[test]
    fn a_claimed_length_reserves_nothing_and_the_buffer_grows_with_what_arrives() {
        let mut codec = FrameCodec::new(MAX_FRAME_CEILING);
        let mut src = BytesMut::new();
        src.put_u32(MAX_FRAME_CEILING as u32);
        src.put_slice(&[0u8; 10]);
        assert_eq!(codec.decode(&mut src).unwrap(), None);
        assert!(src.capacity() < 1024, "{} bytes reserved", src.capacity());
        // Fed 64 KiB at a time, the buffer stays within twice what it holds.
        for _ in 0..16 {
            src.extend_from_slice(&[0u8; 65_536]);
            assert_eq!(codec.decode(&mut src).unwrap(), None);
            assert!(
                src.capacity() <= 2 * src.len() + 65_536,
                "{}",
                src.capacity()
            );
        }
    }

    #[test]
    fn during_the_handshake_frames_are_capped_small_at_and_just_over_the_limit() {
        let mut codec = FrameCodec::new(MAX_FRAME_CEILING);
        codec.begin_handshake();
        assert_eq!(codec.limit(), MAX_HANDSHAKE_FRAME);
        let mut over = BytesMut::new();
        over.put_u32(MAX_HANDSHAKE_FRAME as u32 + 1);
        assert!(matches!(
            codec.decode(&mut over),
            Err(Error::Connection(ConnectionError::FrameTooLarge { len, max: MAX_HANDSHAKE_FRAME })) if len == MAX_HANDSHAKE_FRAME + 1
        ));
        // Exactly the limit: accepted, and decoded once it is all there.
        let mut codec = FrameCodec::new(MAX_FRAME_CEILING);
        codec.begin_handshake();
        let mut payload = BytesMut::new();
        wire::encode_into(&Message::Goodbye, &mut payload).unwrap();
        payload.resize(MAX_HANDSHAKE_FRAME, 0);
        let mut src = BytesMut::new();
        src.put_u32(MAX_HANDSHAKE_FRAME as u32);
        src.put_slice(&payload[..100]);
        assert_eq!(codec.decode(&mut src).unwrap(), None);
        src.put_slice(&payload[100..]);
        assert_eq!(codec.decode(&mut src).unwrap(), Some(Message::Goodbye));
        // After the handshake the configured maximum applies.
        codec.open();
        let mut big = BytesMut::new();
        big.put_u32(MAX_HANDSHAKE_FRAME as u32 + 1);
        assert_eq!(codec.decode(&mut big).unwrap(), None);
    }

    #[test]
    fn large_frames_share_the_nodes_budget_and_give_it_back() {
        let budget = FrameBudget::new(1024 * 1024);
        let claim = 700 * 1024;
        let header = |n: usize| {
            let mut b = BytesMut::new();
            b.put_u32(n as u32);
            b
        };
        let mut a = FrameCodec::new(MAX_FRAME_CEILING).with_budget(budget.clone());
        let mut b = FrameCodec::new(MAX_FRAME_CEILING).with_budget(budget.clone());
        assert_eq!(a.decode(&mut header(claim)).unwrap(), None);
        assert_eq!(budget.in_use(), claim);
        assert!(matches!(
            b.decode(&mut header(claim)),
            Err(Error::Connection(ConnectionError::FrameBudget {
                budget: 1_048_576,
                ..
            }))
        ));
        // Small frames never need the budget.
        let mut small = BytesMut::new();
        b.encode(&Message::Goodbye, &mut small).unwrap();
        assert_eq!(b.decode(&mut small).unwrap(), Some(Message::Goodbye));
        // A connection that closes mid-frame gives its share back.
        drop(a);
        assert_eq!(budget.in_use(), 0);
        let mut c = FrameCodec::new(MAX_FRAME_CEILING).with_budget(budget.clone());
        let msg = all_messages()[4].clone();
        let Message::Completed(mut done) = msg else {
            panic!()
        };
        done.output = "x".repeat(claim).into();
        let mut wire = BytesMut::new();
        c.encode(&Message::Completed(done.clone()), &mut wire)
            .unwrap();
        let tail = wire.split_off(100);
        assert_eq!(c.decode(&mut wire).unwrap(), None);
        assert!(budget.in_use() > claim);
        wire.extend_from_slice(&tail);
        assert_eq!(c.decode(&mut wire).unwrap(), Some(Message::Completed(done)));
        assert_eq!(budget.in_use(), 0, "a complete frame gives its share back");
    }

    #[test]
    fn encoding_over_the_maximum_is_refused_and_leaves_dst_clean() {
        let mut codec = FrameCodec::new(1024);
        let mut dst = BytesMut::new();
        let big = Message::Completed(Completed {
            seq: 1,
            ok: true,
            exit_code: Some(0),
            output: "x".repeat(5000).into(),
            error: None,
            duration_us: 1,
        });
        assert!(matches!(
            codec.encode(&big, &mut dst),
            Err(Error::Connection(ConnectionError::FrameTooLarge {
                max: 1024,
                ..
            }))
        ));
        assert!(dst.is_empty());
    }

    #[test]
    fn truncated_frame_at_eof_is_an_error() {
        let mut codec = FrameCodec::default();
        let mut wire = BytesMut::new();
        codec.encode(&Message::Goodbye, &mut wire).unwrap();
        codec.encode(&all_messages()[3], &mut wire).unwrap();
        wire.truncate(wire.len() - 3);
        assert_eq!(codec.decode(&mut wire).unwrap(), Some(Message::Goodbye));
        assert_eq!(codec.decode(&mut wire).unwrap(), None);
        assert!(matches!(
            codec.decode_eof(&mut wire),
            Err(Error::Connection(ConnectionError::Truncated { .. }))
        ));
    }

    #[test]
    fn inner_length_claims_cannot_allocate_beyond_the_limit() {
        // An Assign whose `task` string claims 2^40 bytes inside a tiny frame.
        let mut payload = vec![3u8, 1]; // variant 3 (Assign), seq = 1
        payload.push(253); // bincode varint: u64 follows
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let mut src = BytesMut::new();
        src.put_u32(payload.len() as u32);
        src.put_slice(&payload);
        let err = FrameCodec::default().decode(&mut src).unwrap_err();
        assert!(
            matches!(err, Error::Connection(ConnectionError::Decode(_))),
            "{err:?}"
        );
    }

    #[test]
    fn ping_frame_matches_the_documented_bytes() {
        let mut wire = BytesMut::new();
        FrameCodec::default()
            .encode(&Message::Ping { nonce: 7 }, &mut wire)
            .unwrap();
        assert_eq!(&wire[..], &[0, 0, 0, 2, 6, 7]);
    }

    #[test]
    fn a_hello_with_fields_appended_by_a_later_version_still_decodes() {
        let mut codec = FrameCodec::default();
        let mut hello = all_messages()[0].clone();
        if let Message::Hello(h) = &mut hello {
            h.version = PROTOCOL_VERSION + 1;
        }
        let mut payload = BytesMut::new();
        crate::wire::encode_into(&hello, &mut payload).unwrap();
        payload.put_slice(b"\x05future-field");
        let mut src = BytesMut::new();
        src.put_u32(payload.len() as u32);
        src.put_slice(&payload);
        assert_eq!(codec.decode(&mut src).unwrap(), Some(hello));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A deterministic xorshift keeps this reproducible without extra crates.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut errors = 0;
        for _ in 0..20_000 {
            let mut codec = FrameCodec::new(64 * 1024);
            let mut buf = BytesMut::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            // A plausible small length prefix so the payload decoder is exercised too.
            buf.put_u32(len as u32);
            for i in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.put_u8((x >> (i % 8)) as u8);
            }
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
        }
        assert!(errors > 0, "random payloads should mostly be rejected");
    }
}
