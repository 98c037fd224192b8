//! The payload encoding: bincode 2 (serde), kept behind this module so that the encoding can
//! be swapped in one place.
//!
//! Decoding is bounded twice: the frame is at most the configured maximum before it is read
//! (see [`crate::codec`]), and bincode's own limit stops a length field inside the payload
//! from claiming more memory than a frame of that size could justify (at most four times
//! the payload's size bucket: 64 KiB, 1 MiB or 16 MiB).
//!
//! The messages of the task hot path (`Assign`, `Completed`, `Cancel`, `Ping`, `Pong`,
//! `Goodbye`, `GoodbyeAck`) are encoded and decoded by hand, byte for byte as bincode's
//! standard configuration does (docs/PROTOCOL.md), which costs a fraction of the generic
//! serde path; the handshake messages go through bincode itself. A hand-decoded string may
//! claim at most the bytes left in its payload, so nothing is allocated beyond the frame.
//!
//! The handshake messages (`Hello`, `Welcome`, `Reject`) are decoded by hand too, with every
//! field bounded before anything is allocated for it: the cluster name ([`MAX_CLUSTER`]
//! bytes), the number of types ([`MAX_TYPES`]) and each type's length ([`MAX_TYPE_LEN`]),
//! and a `Reject`'s message ([`MAX_REJECT_MESSAGE`]; longer ones are cut when encoded). A
//! field over its bound is [`HandshakeError::Bound`], which the acceptor answers with
//! `Reject(Invalid)`. So the largest `Hello` is [`MAX_HELLO`] bytes.

use bincode::config::{self, Config};
use bytes::{BufMut, Bytes, BytesMut};
use compact_str::CompactString;

use crate::message::{
    AbortReason, Assign, Completed, ContentHash, Hello, PlacedFile, ProducedFile, Reject,
    RejectReason, StreamFile, Transfer, MAX_ABORT_MESSAGE, MAX_CHUNK, MAX_FILE_NAME,
    MAX_TASK_FILES,
};
use crate::{ConnectionError, Error, HandshakeError, Message, NodeId};

/// The largest frame any configuration may allow (and the default maximum): 16 MiB.
pub const MAX_FRAME_CEILING: usize = 16 * 1024 * 1024;

/// The longest cluster name in a `Hello`, in bytes.
pub const MAX_CLUSTER: usize = 64;

/// The most task types a `Hello` may list.
pub const MAX_TYPES: usize = 64;

/// The longest task type in a `Hello`, in bytes.
pub const MAX_TYPE_LEN: usize = 32;

/// The longest `Reject` message, in bytes; a longer one is cut (on a character boundary)
/// when it is encoded.
pub const MAX_REJECT_MESSAGE: usize = 1024;

/// The largest `Hello` (or `Welcome`) payload this version encodes or accepts: the variant
/// (1 byte), version (at most 3), cluster name (1 + [`MAX_CLUSTER`]), node id (16), types
/// (1 + [`MAX_TYPES`] x (1 + [`MAX_TYPE_LEN`])) and capacity (at most 5): 2,203 bytes.
pub const MAX_HELLO: usize =
    1 + 3 + (1 + MAX_CLUSTER) + 16 + (1 + MAX_TYPES * (1 + MAX_TYPE_LEN)) + 5;

fn cfg<const LIMIT: usize>() -> impl Config {
    // Encoding uses the same limit type; it never binds there (frames are checked after).
    config::standard().with_limit::<LIMIT>()
}

/// Appends the encoding of `msg` to `dst`.
pub fn encode_into(msg: &Message, dst: &mut BytesMut) -> Result<(), Error> {
    match msg {
        Message::Assign(a) => {
            put_varint(dst, 3);
            put_varint(dst, a.seq);
            put_str(dst, &a.task);
            put_str(dst, &a.kind);
            put_str(dst, &a.args);
            put_varint(dst, u64::from(a.attempt));
            put_varint(dst, a.timeout_ms);
        }
        Message::Completed(c) => {
            put_varint(dst, 4);
            put_varint(dst, c.seq);
            dst.put_u8(u8::from(c.ok));
            match c.exit_code {
                None => dst.put_u8(0),
                Some(code) => {
                    dst.put_u8(1);
                    // Zig-zag, as bincode encodes signed integers.
                    put_varint(dst, u64::from(((code << 1) ^ (code >> 31)) as u32));
                }
            }
            put_str(dst, &c.output);
            match &c.error {
                None => dst.put_u8(0),
                Some(e) => {
                    dst.put_u8(1);
                    put_str(dst, e);
                }
            }
            put_varint(dst, c.duration_us);
        }
        Message::Cancel { seq } => {
            put_varint(dst, 5);
            put_varint(dst, *seq);
        }
        Message::Ping { nonce } => {
            put_varint(dst, 6);
            put_varint(dst, *nonce);
        }
        Message::Pong { nonce } => {
            put_varint(dst, 7);
            put_varint(dst, *nonce);
        }
        Message::Goodbye => put_varint(dst, 8),
        Message::GoodbyeAck => put_varint(dst, 9),
        Message::Started { seq } => {
            put_varint(dst, 10);
            put_varint(dst, *seq);
        }
        Message::Transfer(t) => {
            put_varint(dst, 14);
            put_transfer(dst, t);
        }
        Message::Reject(r) if r.message.len() > MAX_REJECT_MESSAGE => {
            let mut cut = MAX_REJECT_MESSAGE;
            while !r.message.is_char_boundary(cut) {
                cut -= 1;
            }
            let short = Message::Reject(Reject {
                reason: r.reason,
                message: r.message[..cut].to_string(),
            });
            return encode_into(&short, dst);
        }
        Message::Hello(_)
        | Message::Welcome(_)
        | Message::Reject(_)
        | Message::StatusRequest
        | Message::Status(_)
        | Message::Load(_)
        | Message::Hosted(_)
        | Message::Replica(_) => {
            let writer = BufWriter(dst);
            bincode::serde::encode_into_writer(msg, writer, cfg::<MAX_FRAME_CEILING>())
                .map_err(|e| Error::Connection(ConnectionError::Encode(e.to_string())))?;
        }
    }
    Ok(())
}

/// The room [`encode_small`] encodes in: the task path's messages with short strings (an
/// `Assign` of a short id and type, a `Completed` with a short output) fit.
pub(crate) const SMALL: usize = 124;

/// Encodes `msg` at the start of `buf` when it is one of the task path's small messages
/// (`Assign`, `Completed`, `Cancel`, `Started`, `Ping`, `Pong`, `Goodbye`, `GoodbyeAck`)
/// and its encoding fits; returns its length. `None`: not such a message, or too long for
/// `buf` (then [`encode_into`] takes it). The bytes are those [`encode_into`] makes (the
/// tests hold the two to each other), written into a buffer on the stack, without
/// [`BytesMut`]'s room check and length update at every field.
pub(crate) fn encode_small(msg: &Message, buf: &mut [u8]) -> Option<usize> {
    let mut w = Small { buf, at: 0 };
    match msg {
        Message::Assign(a) => {
            w.put(3)?;
            w.varint(a.seq)?;
            w.str(&a.task)?;
            w.str(&a.kind)?;
            w.str(&a.args)?;
            w.varint(u64::from(a.attempt))?;
            w.varint(a.timeout_ms)?;
        }
        Message::Completed(c) => {
            w.put(4)?;
            w.varint(c.seq)?;
            w.put(u8::from(c.ok))?;
            match c.exit_code {
                None => w.put(0)?,
                Some(code) => {
                    w.put(1)?;
                    // Zig-zag, as bincode encodes signed integers.
                    w.varint(u64::from(((code << 1) ^ (code >> 31)) as u32))?;
                }
            }
            w.str(&c.output)?;
            match &c.error {
                None => w.put(0)?,
                Some(e) => {
                    w.put(1)?;
                    w.str(e)?;
                }
            }
            w.varint(c.duration_us)?;
        }
        Message::Cancel { seq } => {
            w.put(5)?;
            w.varint(*seq)?;
        }
        Message::Ping { nonce } => {
            w.put(6)?;
            w.varint(*nonce)?;
        }
        Message::Pong { nonce } => {
            w.put(7)?;
            w.varint(*nonce)?;
        }
        Message::Goodbye => w.put(8)?,
        Message::GoodbyeAck => w.put(9)?,
        Message::Started { seq } => {
            w.put(10)?;
            w.varint(*seq)?;
        }
        _ => return None,
    }
    Some(w.at)
}

/// Where [`encode_small`] writes: every write checked against the room left (`None` when
/// there is none).
struct Small<'b> {
    buf: &'b mut [u8],
    at: usize,
}

impl Small<'_> {
    #[inline(always)]
    fn put(&mut self, b: u8) -> Option<()> {
        *self.buf.get_mut(self.at)? = b;
        self.at += 1;
        Some(())
    }

    #[inline(always)]
    fn bytes(&mut self, b: &[u8]) -> Option<()> {
        if b.is_empty() {
            // No call to copy nothing (an Assign's arguments, often).
            return Some(());
        }
        let end = self.at.checked_add(b.len())?;
        self.buf.get_mut(self.at..end)?.copy_from_slice(b);
        self.at = end;
        Some(())
    }

    /// As [`put_varint`].
    #[inline(always)]
    fn varint(&mut self, x: u64) -> Option<()> {
        if x < 251 {
            self.put(x as u8)
        } else if let Ok(x) = u16::try_from(x) {
            let [a, b] = x.to_le_bytes();
            self.bytes(&[251, a, b])
        } else if let Ok(x) = u32::try_from(x) {
            let [a, b, c, d] = x.to_le_bytes();
            self.bytes(&[252, a, b, c, d])
        } else {
            let [a, b, c, d, e, f, g, h] = x.to_le_bytes();
            self.bytes(&[253, a, b, c, d, e, f, g, h])
        }
    }

    #[inline(always)]
    fn str(&mut self, s: &str) -> Option<()> {
        self.varint(s.len() as u64)?;
        self.bytes(s.as_bytes())
    }
}

/// Decodes one message from a whole payload.
///
/// Bytes after a complete message are ignored (see [`crate::message`] for why).
pub fn decode(payload: &[u8]) -> Result<Message, Error> {
    decode_in::<true>(payload, None)
}

/// [`decode`] of a payload held in `frame`: a file chunk's data is a slice of `frame`, not
/// a copy (the frame's memory lives as long as the chunk does).
pub fn decode_shared(frame: &Bytes) -> Result<Message, Error> {
    decode_in::<true>(frame, Some(frame))
}

/// The variant index of `Message::Transfer`, the first byte of its payload (a varint under
/// 251 is that one byte): the only message that may keep a slice of its frame.
pub(crate) const TRANSFER: u8 = 14;
const TRANSFER_INDEX: u32 = TRANSFER as u32;

/// `whole`, when given, holds `payload` (a chunk's data is sliced out of it). `FAST`: with
/// the [`Reader`]'s short paths (always, but in the tests that hold them to the general
/// ones).
fn decode_in<const FAST: bool>(payload: &[u8], whole: Option<&Bytes>) -> Result<Message, Error> {
    let mut r = Reader::<FAST>(payload);
    let variant = r.varint_u32()?;
    let msg = match variant {
        0 => Message::Hello(r.hello()?),
        1 => Message::Welcome(r.hello()?),
        2 => Message::Reject(Reject {
            reason: match r.varint_u32()? {
                0 => RejectReason::Version,
                1 => RejectReason::Cluster,
                2 => RejectReason::Key,
                3 => RejectReason::Busy,
                4 => RejectReason::Invalid,
                n => {
                    return Err(Error::Connection(ConnectionError::Decode(format!(
                        "unknown reject reason {n}"
                    ))))
                }
            },
            message: r.bounded_string(MAX_REJECT_MESSAGE, "reject message (bytes)")?,
        }),
        3 => Message::Assign(Assign {
            seq: r.varint()?,
            task: r.compact()?,
            kind: r.compact()?,
            args: r.string()?,
            attempt: r.varint_u32()?,
            timeout_ms: r.varint()?,
        }),
        4 => Message::Completed(Completed {
            seq: r.varint()?,
            ok: r.bool()?,
            exit_code: match r.option()? {
                false => None,
                true => {
                    let z = r.varint_u32()?;
                    Some(((z >> 1) as i32) ^ -((z & 1) as i32))
                }
            },
            output: r.compact()?,
            error: match r.option()? {
                false => None,
                true => Some(r.string()?),
            },
            duration_us: r.varint()?,
        }),
        5 => Message::Cancel { seq: r.varint()? },
        6 => Message::Ping { nonce: r.varint()? },
        7 => Message::Pong { nonce: r.varint()? },
        8 => Message::Goodbye,
        9 => Message::GoodbyeAck,
        10 => Message::Started { seq: r.varint()? },
        TRANSFER_INDEX => Message::Transfer(Box::new(r.transfer(whole)?)),
        _ => return decode_bincode(payload),
    };
    Ok(msg)
}

/// Appends the encoding of a `Transfer::Chunk` message up to its data (the message and
/// transfer variants, the id, the offset and the data's length): with the data after it,
/// the bytes [`encode_into`] makes of the chunk.
pub fn put_chunk_head(dst: &mut BytesMut, id: u64, offset: u64, len: usize) {
    put_varint(dst, 14);
    put_varint(dst, 3);
    put_varint(dst, id);
    put_varint(dst, offset);
    put_varint(dst, len as u64);
}

/// Appends `x` as a bincode varint.
fn put_varint(dst: &mut BytesMut, x: u64) {
    if x < 251 {
        dst.put_u8(x as u8);
    } else if let Ok(x) = u16::try_from(x) {
        dst.put_u8(251);
        dst.put_u16_le(x);
    } else if let Ok(x) = u32::try_from(x) {
        dst.put_u8(252);
        dst.put_u32_le(x);
    } else {
        dst.put_u8(253);
        dst.put_u64_le(x);
    }
}

fn put_str(dst: &mut BytesMut, s: &str) {
    put_varint(dst, s.len() as u64);
    dst.put_slice(s.as_bytes());
}

/// Appends a [`Transfer`] (after its `Message` variant), as bincode would; an `Abort`
/// message over [`MAX_ABORT_MESSAGE`] is cut on a character boundary.
fn put_transfer(dst: &mut BytesMut, t: &Transfer) {
    match t {
        Transfer::Offer { id, hash, size } => {
            put_varint(dst, 0);
            put_varint(dst, *id);
            dst.put_slice(&hash.0);
            put_varint(dst, *size);
        }
        Transfer::Have { id } => {
            put_varint(dst, 1);
            put_varint(dst, *id);
        }
        Transfer::Want { id, window } => {
            put_varint(dst, 2);
            put_varint(dst, *id);
            put_varint(dst, u64::from(*window));
        }
        Transfer::Chunk { id, offset, data } => {
            put_varint(dst, 3);
            put_varint(dst, *id);
            put_varint(dst, *offset);
            put_varint(dst, data.len() as u64);
            dst.put_slice(data);
        }
        // The same bytes as the `Chunk` of the file's bytes, read straight into place.
        Transfer::FileChunk {
            id,
            offset,
            len,
            file,
        } => {
            put_varint(dst, 3);
            put_varint(dst, *id);
            put_varint(dst, *offset);
            put_varint(dst, *len as u64);
            file.read_into(*offset, *len, dst);
        }
        Transfer::Ack { id, received } => {
            put_varint(dst, 4);
            put_varint(dst, *id);
            put_varint(dst, *received);
        }
        Transfer::Done { id } => {
            put_varint(dst, 5);
            put_varint(dst, *id);
        }
        Transfer::Abort {
            id,
            reason,
            message,
        } => {
            put_varint(dst, 6);
            put_varint(dst, *id);
            put_varint(dst, abort_index(*reason));
            let mut cut = message.len().min(MAX_ABORT_MESSAGE);
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            put_str(dst, &message[..cut]);
        }
        Transfer::Fetch { id, hash, window } => {
            put_varint(dst, 7);
            put_varint(dst, *id);
            dst.put_slice(&hash.0);
            put_varint(dst, u64::from(*window));
        }
        Transfer::Files {
            seq,
            inputs,
            outputs,
        } => {
            put_varint(dst, 8);
            put_varint(dst, *seq);
            put_varint(dst, inputs.len() as u64);
            for f in inputs {
                put_str(dst, &f.name);
                dst.put_slice(&f.hash.0);
            }
            put_varint(dst, outputs.len() as u64);
            for o in outputs {
                put_str(dst, o);
            }
        }
        Transfer::Produced { seq, outputs } => {
            put_varint(dst, 9);
            put_varint(dst, *seq);
            put_varint(dst, outputs.len() as u64);
            for f in outputs {
                put_str(dst, &f.name);
                dst.put_slice(&f.hash.0);
                put_varint(dst, f.size);
            }
        }
        Transfer::Streams {
            seq,
            stdout,
            stderr,
        } => {
            put_varint(dst, 10);
            put_varint(dst, *seq);
            for f in [stdout, stderr] {
                dst.put_slice(&f.hash.0);
                put_varint(dst, f.size);
            }
        }
    }
}

fn abort_index(r: AbortReason) -> u64 {
    match r {
        AbortReason::NotFound => 0,
        AbortReason::TooLarge => 1,
        AbortReason::HashMismatch => 2,
        AbortReason::NoSpace => 3,
        AbortReason::Io => 4,
        AbortReason::Cancelled => 5,
    }
}

fn decode_error(msg: String) -> Error {
    Error::Connection(ConnectionError::Decode(msg))
}

/// `data` as a slice of `whole` when `whole` holds it, else a copy.
fn slice_of(whole: Option<&Bytes>, data: &[u8]) -> Bytes {
    if let Some(w) = whole {
        let start = (data.as_ptr() as usize).checked_sub(w.as_ptr() as usize);
        if let Some(start) = start.filter(|s| s.saturating_add(data.len()) <= w.len()) {
            return w.slice(start..start + data.len());
        }
    }
    Bytes::copy_from_slice(data)
}

/// Reads bincode's standard encoding from a payload; every read is bounds-checked.
///
/// `FAST`: the short forms nearly every task message is made of (a varint whose bytes are
/// all there, a string of at most one byte, a length of one byte that fits) are read by shorter paths first; everything else goes the general way, from
/// the same place. So both read the same messages and refuse the same bytes with the same
/// errors (the tests hold them to each other, on random messages and random bytes).
struct Reader<'a, const FAST: bool>(&'a [u8]);

/// Each one-byte ASCII string, to take a `&'static str` of one byte without validating it
/// again (`str::from_utf8` costs some 55 instructions for one byte; an inline
/// `CompactString` made from a static string copies no more than its bytes).
static ONE_BYTE: [&str; 128] = {
    const BYTES: [u8; 128] = {
        let mut b = [0u8; 128];
        let mut i = 0;
        while i < 128 {
            b[i] = i as u8;
            i += 1;
        }
        b
    };
    const ALL: &str = match std::str::from_utf8(&BYTES) {
        Ok(s) => s,
        Err(_) => panic!("ASCII is UTF-8"),
    };
    let mut t = [""; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = ALL.split_at(i).1.split_at(1).0;
        i += 1;
    }
    t
};

/// The error of a string that is not UTF-8.
fn not_utf8(e: std::str::Utf8Error) -> Error {
    Error::Connection(ConnectionError::Decode(format!(
        "invalid UTF-8 in a string: {e}"
    )))
}

fn short() -> Error {
    Error::Connection(ConnectionError::Decode(
        "unexpected end of the payload".into(),
    ))
}

impl<'a, const FAST: bool> Reader<'a, FAST> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or_else(short)?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.bytes::<1>()?[0])
    }

    #[inline(always)]
    fn varint(&mut self) -> Result<u64, Error> {
        if FAST {
            // Each width checked for its bytes once, not byte by byte.
            match *self.0 {
                [b @ 0..=250, ref rest @ ..] => {
                    self.0 = rest;
                    return Ok(u64::from(b));
                }
                [251, a, b, ref rest @ ..] => {
                    self.0 = rest;
                    return Ok(u64::from(u16::from_le_bytes([a, b])));
                }
                [252, a, b, c, d, ref rest @ ..] => {
                    self.0 = rest;
                    return Ok(u64::from(u32::from_le_bytes([a, b, c, d])));
                }
                [253, a, b, c, d, e, f, g, h, ref rest @ ..] => {
                    self.0 = rest;
                    return Ok(u64::from_le_bytes([a, b, c, d, e, f, g, h]));
                }
                _ => {}
            }
        }
        self.varint_general()
    }

    fn varint_general(&mut self) -> Result<u64, Error> {
        match self.u8()? {
            b @ 0..=250 => Ok(u64::from(b)),
            251 => Ok(u64::from(u16::from_le_bytes(self.bytes()?))),
            252 => Ok(u64::from(u32::from_le_bytes(self.bytes()?))),
            253 => Ok(u64::from_le_bytes(self.bytes()?)),
            b => Err(Error::Connection(ConnectionError::Decode(format!(
                "invalid varint tag {b} for a u64"
            )))),
        }
    }

    fn varint_u16(&mut self) -> Result<u16, Error> {
        match self.u8()? {
            b @ 0..=250 => Ok(u16::from(b)),
            251 => Ok(u16::from_le_bytes(self.bytes()?)),
            b => Err(Error::Connection(ConnectionError::Decode(format!(
                "invalid varint tag {b} for a u16"
            )))),
        }
    }

    #[inline(always)]
    fn varint_u32(&mut self) -> Result<u32, Error> {
        if FAST {
            if let Some((&b @ 0..=250, rest)) = self.0.split_first() {
                self.0 = rest;
                return Ok(u32::from(b));
            }
        }
        self.varint_u32_general()
    }

    fn varint_u32_general(&mut self) -> Result<u32, Error> {
        match self.u8()? {
            b @ 0..=250 => Ok(u32::from(b)),
            251 => Ok(u32::from(u16::from_le_bytes(self.bytes()?))),
            252 => Ok(u32::from_le_bytes(self.bytes()?)),
            b => Err(Error::Connection(ConnectionError::Decode(format!(
                "invalid varint tag {b} for a u32"
            )))),
        }
    }

    #[inline(always)]
    fn bool(&mut self) -> Result<bool, Error> {
        self.zero_or_one("bool")
    }

    #[inline(always)]
    fn option(&mut self) -> Result<bool, Error> {
        self.zero_or_one("option tag")
    }

    /// A byte that must be 0 or 1 (a bool, an option's tag; `what` names it in the error).
    #[inline(always)]
    fn zero_or_one(&mut self, what: &str) -> Result<bool, Error> {
        if FAST {
            if let [b @ (0 | 1), ref rest @ ..] = *self.0 {
                self.0 = rest;
                return Ok(b == 1);
            }
        }
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(Error::Connection(ConnectionError::Decode(format!(
                "invalid {what} {b}"
            )))),
        }
    }

    /// A `Hello` (or `Welcome`) with every field within its bound.
    fn hello(&mut self) -> Result<Hello, Error> {
        let version = self.varint_u16()?;
        let cluster = self.bounded_string(MAX_CLUSTER, "cluster name (bytes)")?;
        let node_id = NodeId(self.bytes::<16>()?);
        let count = self.varint()?;
        let count = usize::try_from(count)
            .ok()
            .filter(|&n| n <= MAX_TYPES)
            .ok_or(Error::Handshake(HandshakeError::Bound {
                what: "number of types",
                len: usize::try_from(count).unwrap_or(usize::MAX),
                max: MAX_TYPES,
            }))?;
        let mut types = Vec::with_capacity(count);
        for _ in 0..count {
            types.push(self.bounded_string(MAX_TYPE_LEN, "type name (bytes)")?);
        }
        let capacity = self.varint_u32()?;
        Ok(Hello {
            version,
            cluster,
            node_id,
            types,
            capacity,
        })
    }

    /// A string of at most `max` bytes (else [`HandshakeError::Bound`] naming `what`), checked
    /// before anything is allocated.
    fn bounded_string(&mut self, max: usize, what: &'static str) -> Result<String, Error> {
        let mut peek = Reader::<FAST>(self.0);
        let len = peek.varint()?;
        if len > max as u64 {
            return Err(Error::Handshake(HandshakeError::Bound {
                what,
                len: usize::try_from(len).unwrap_or(usize::MAX),
                max,
            }));
        }
        self.string()
    }

    /// A [`Transfer`] with every length within its bound, checked before anything is
    /// allocated for it.
    fn transfer(&mut self, whole: Option<&Bytes>) -> Result<Transfer, Error> {
        let t = match self.varint_u32()? {
            0 => Transfer::Offer {
                id: self.varint()?,
                hash: ContentHash(self.bytes::<32>()?),
                size: self.varint()?,
            },
            1 => Transfer::Have { id: self.varint()? },
            2 => Transfer::Want {
                id: self.varint()?,
                window: self.varint_u32()?,
            },
            3 => {
                let id = self.varint()?;
                let offset = self.varint()?;
                let len = self.count(MAX_CHUNK, "chunk (bytes)")?;
                if len > self.0.len() {
                    return Err(short());
                }
                let (data, rest) = self.0.split_at(len);
                self.0 = rest;
                Transfer::Chunk {
                    id,
                    offset,
                    data: slice_of(whole, data),
                }
            }
            4 => Transfer::Ack {
                id: self.varint()?,
                received: self.varint()?,
            },
            5 => Transfer::Done { id: self.varint()? },
            6 => Transfer::Abort {
                id: self.varint()?,
                reason: match self.varint_u32()? {
                    0 => AbortReason::NotFound,
                    1 => AbortReason::TooLarge,
                    2 => AbortReason::HashMismatch,
                    3 => AbortReason::NoSpace,
                    4 => AbortReason::Io,
                    5 => AbortReason::Cancelled,
                    n => return Err(decode_error(format!("unknown abort reason {n}"))),
                },
                message: self.file_string(MAX_ABORT_MESSAGE, "abort message (bytes)")?,
            },
            7 => Transfer::Fetch {
                id: self.varint()?,
                hash: ContentHash(self.bytes::<32>()?),
                window: self.varint_u32()?,
            },
            8 => {
                let seq = self.varint()?;
                let n = self.count(MAX_TASK_FILES, "inputs of a task")?;
                let mut inputs = Vec::with_capacity(n);
                for _ in 0..n {
                    inputs.push(PlacedFile {
                        name: self.file_string(MAX_FILE_NAME, "file name (bytes)")?,
                        hash: ContentHash(self.bytes::<32>()?),
                    });
                }
                let n = self.count(MAX_TASK_FILES, "outputs of a task")?;
                let mut outputs = Vec::with_capacity(n);
                for _ in 0..n {
                    outputs.push(self.file_string(MAX_FILE_NAME, "file name (bytes)")?);
                }
                Transfer::Files {
                    seq,
                    inputs,
                    outputs,
                }
            }
            9 => {
                let seq = self.varint()?;
                let n = self.count(MAX_TASK_FILES, "outputs of a task")?;
                let mut outputs = Vec::with_capacity(n);
                for _ in 0..n {
                    outputs.push(ProducedFile {
                        name: self.file_string(MAX_FILE_NAME, "file name (bytes)")?,
                        hash: ContentHash(self.bytes::<32>()?),
                        size: self.varint()?,
                    });
                }
                Transfer::Produced { seq, outputs }
            }
            10 => {
                let seq = self.varint()?;
                let stdout = StreamFile {
                    hash: ContentHash(self.bytes::<32>()?),
                    size: self.varint()?,
                };
                let stderr = StreamFile {
                    hash: ContentHash(self.bytes::<32>()?),
                    size: self.varint()?,
                };
                Transfer::Streams {
                    seq,
                    stdout,
                    stderr,
                }
            }
            n => return Err(decode_error(format!("unknown transfer message {n}"))),
        };
        Ok(t)
    }

    /// A count or length of at most `max`, else a decode error naming `what`.
    fn count(&mut self, max: usize, what: &str) -> Result<usize, Error> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| decode_error(format!("{what}: {n} is over the bound {max}")))
    }

    /// A string of at most `max` bytes, else a decode error naming `what`.
    fn file_string(&mut self, max: usize, what: &str) -> Result<String, Error> {
        let mut peek = Reader::<FAST>(self.0);
        peek.count(max, what)?;
        self.string()
    }

    /// A string kept inline when short (no allocation up to 24 bytes).
    #[inline(always)]
    fn compact(&mut self) -> Result<CompactString, Error> {
        if FAST {
            match self.0 {
                [0, rest @ ..] => {
                    self.0 = rest;
                    return Ok(CompactString::const_new(""));
                }
                [1, b @ 0..=127, rest @ ..] => {
                    self.0 = rest;
                    return Ok(CompactString::const_new(ONE_BYTE[usize::from(*b)]));
                }
                _ => {}
            }
        }
        self.str().map(CompactString::from)
    }

    #[inline(always)]
    fn string(&mut self) -> Result<String, Error> {
        if FAST {
            if let [0, rest @ ..] = self.0 {
                self.0 = rest;
                return Ok(String::new());
            }
        }
        self.str().map(str::to_owned)
    }

    /// A string; its claimed length must fit in what is left of the payload, so a
    /// malicious length allocates nothing.
    #[inline(always)]
    fn str(&mut self) -> Result<&'a str, Error> {
        if FAST {
            // A length of one byte that fits.
            if let Some((&n @ 0..=250, rest)) = self.0.split_first() {
                if let Some((bytes, after)) = rest.split_at_checked(usize::from(n)) {
                    self.0 = after;
                    return match bytes {
                        [] => Ok(""),
                        [b @ 0..=127] => Ok(ONE_BYTE[usize::from(*b)]),
                        _ => std::str::from_utf8(bytes).map_err(not_utf8),
                    };
                }
            }
        }
        self.str_general()
    }

    fn str_general(&mut self) -> Result<&'a str, Error> {
        let len = self.varint()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&n| n <= self.0.len())
            .ok_or_else(|| {
                Error::Connection(ConnectionError::Decode(format!(
                    "a string claims {len} bytes, more than the payload has"
                )))
            })?;
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(bytes).map_err(not_utf8)
    }
}

/// The generic decoder (bincode via serde): what is not decoded by hand (unknown kinds,
/// which it refuses), and the reference the hand decoders are tested against.
fn decode_bincode(payload: &[u8]) -> Result<Message, Error> {
    // bincode's limit bounds the sum of the sizes claimed while decoding (container lengths,
    // and the in-memory size of each integer, which can exceed its varint encoding). Four
    // times the payload's bucket leaves room for that, while a small frame still cannot make
    // the decoder allocate more than 256 KiB (or 4 MiB for frames up to 1 MiB).
    let res = match payload.len() {
        0..=65_536 => bincode::serde::decode_from_slice(payload, cfg::<{ 4 * 65_536 }>()),
        65_537..=1_048_576 => {
            bincode::serde::decode_from_slice(payload, cfg::<{ 4 * 1_048_576 }>())
        }
        _ => bincode::serde::decode_from_slice(payload, cfg::<{ 4 * MAX_FRAME_CEILING }>()),
    };
    res.map(|(msg, _)| msg)
        .map_err(|e| Error::Connection(ConnectionError::Decode(e.to_string())))
}

struct BufWriter<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for BufWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.put_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn bincode_bytes(msg: &Message) -> Vec<u8> {
        let mut buf = BytesMut::new();
        bincode::serde::encode_into_writer(msg, BufWriter(&mut buf), cfg::<MAX_FRAME_CEILING>())
            .unwrap();
        buf.to_vec()
    }

    fn hot_messages() -> Vec<Message> {
        let mut v = Vec::new();
        let numbers = [
            0u64,
            1,
            250,
            251,
            252,
            65_535,
            65_536,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ];
        for (i, &n) in numbers.iter().enumerate() {
            let text = "é✓x".repeat(i * 40);
            v.push(Message::Assign(Assign {
                seq: n,
                task: format!("a{n}").into(),
                kind: "a".into(),
                args: text.clone(),
                attempt: n as u32,
                timeout_ms: n.rotate_left(7),
            }));
            for code in [
                None,
                Some(0),
                Some(-1),
                Some(1),
                Some(i32::MIN),
                Some(i32::MAX),
                Some(300),
            ] {
                v.push(Message::Completed(Completed {
                    seq: n,
                    ok: code == Some(0),
                    exit_code: code,
                    output: text.clone().into(),
                    error: code.filter(|c| *c != 0).map(|c| format!("exit status {c}")),
                    duration_us: n / 3,
                }));
            }
            v.push(Message::Cancel { seq: n });
            v.push(Message::Started { seq: n });
            v.push(Message::Ping { nonce: n });
            v.push(Message::Pong { nonce: n });
        }
        v.push(Message::Goodbye);
        v.push(Message::GoodbyeAck);
        v
    }

    /// The `Load` message of docs/PROTOCOL.md, byte by byte (v3).
    #[test]
    fn an_assigns_short_id_and_type_decode_inline_and_long_ones_round_trip() {
        let short = crate::testing::assign(1_000_000);
        let mut buf = BytesMut::new();
        encode_into(&Message::Assign(short.clone()), &mut buf).unwrap();
        let Message::Assign(back) = decode(&buf).unwrap() else {
            panic!("not an assign");
        };
        assert_eq!(back, short);
        assert!(!back.task.is_heap_allocated() && !back.kind.is_heap_allocated());
        // The bytes are those of the strings, whatever their length.
        let long = Assign {
            task: "x".repeat(1024).into(),
            kind: "a".repeat(crate::wire::MAX_TYPE_LEN).into(),
            ..short
        };
        let mut buf = BytesMut::new();
        encode_into(&Message::Assign(long.clone()), &mut buf).unwrap();
        assert_eq!(decode(&buf).unwrap(), Message::Assign(long));
    }

    #[test]
    fn a_load_report_is_encoded_as_documented() {
        let msg = Message::Load(crate::LoadReport {
            capacity: 4,
            running: 2,
            waiting: 1,
            cores: 8,
            load_milli: Some(1500),
            mem_available_kib: Some(1_000_000),
            busy_ms: 300,
            tasks: 7,
        });
        let expected: &[u8] = &[
            13, // variant: Load
            4,  // capacity
            2,  // running
            1,  // waiting
            8,  // cores
            1, 251, 0xdc, 0x05, // load_milli: Some(1500)
            1, 252, 0x40, 0x42, 0x0f, 0x00, // mem_available_kib: Some(1000000)
            251, 0x2c, 0x01, // busy_ms: 300
            7,    // tasks
        ];
        let mut ours = BytesMut::new();
        encode_into(&msg, &mut ours).unwrap();
        assert_eq!(&ours[..], expected);
        assert_eq!(bincode_bytes(&msg), expected);
        assert_eq!(decode(expected).unwrap(), msg);
        // Cut anywhere, it does not decode.
        for cut in 0..expected.len() {
            assert!(decode(&expected[..cut]).is_err(), "{cut}");
        }
    }

    fn transfer_messages() -> Vec<Message> {
        let hash = ContentHash(std::array::from_fn(|i| (i * 37) as u8));
        let mut v = Vec::new();
        for &n in &[0u64, 1, 250, 251, 65_536, u64::from(u32::MAX) + 1, u64::MAX] {
            let w = n as u32;
            let name = "é/x".repeat((n % 100) as usize + 1);
            for t in [
                Transfer::Offer {
                    id: n,
                    hash,
                    size: n,
                },
                Transfer::Have { id: n },
                Transfer::Want { id: n, window: w },
                Transfer::Chunk {
                    id: n,
                    offset: n,
                    data: vec![(n % 256) as u8; (n % 300) as usize].into(),
                },
                Transfer::Chunk {
                    id: n,
                    offset: n,
                    data: vec![7; MAX_CHUNK].into(),
                },
                Transfer::Ack { id: n, received: n },
                Transfer::Done { id: n },
                Transfer::Abort {
                    id: n,
                    reason: AbortReason::HashMismatch,
                    message: name.clone(),
                },
                Transfer::Abort {
                    id: n,
                    reason: AbortReason::Cancelled,
                    message: String::new(),
                },
                Transfer::Fetch {
                    id: n,
                    hash,
                    window: w,
                },
                Transfer::Files {
                    seq: n,
                    inputs: vec![
                        PlacedFile {
                            name: name.clone(),
                            hash,
                        };
                        (n % 4) as usize
                    ],
                    outputs: vec![name.clone(); (n % 3) as usize],
                },
                Transfer::Produced {
                    seq: n,
                    outputs: vec![
                        ProducedFile {
                            name: name.clone(),
                            hash,
                            size: n,
                        };
                        (n % 5) as usize
                    ],
                },
                Transfer::Streams {
                    seq: n,
                    stdout: StreamFile { hash, size: n },
                    stderr: StreamFile {
                        hash,
                        size: n.wrapping_mul(3),
                    },
                },
            ] {
                v.push(Message::Transfer(Box::new(t)));
            }
        }
        v
    }

    /// A chunk's head and its data are the bytes of the whole chunk message.
    #[test]
    fn a_chunk_head_and_its_data_encode_the_chunk() {
        for (id, offset, len) in [
            (0, 0, 0),
            (1, 250, 1),
            (251, 65_536, 64_512),
            (u64::MAX, u64::MAX, 65_536),
        ] {
            let data = vec![5u8; len];
            let mut whole = BytesMut::new();
            let msg = Message::Transfer(Box::new(Transfer::Chunk {
                id,
                offset,
                data: data.clone().into(),
            }));
            encode_into(&msg, &mut whole).unwrap();
            let mut parts = BytesMut::new();
            put_chunk_head(&mut parts, id, offset, len);
            parts.extend_from_slice(&data);
            assert_eq!(&parts[..], &whole[..], "{id} {offset} {len}");
        }
    }

    /// Decoded from a shared frame, every message is the same, and a chunk's data is a
    /// slice of the frame (no copy); from a plain slice, a copy.
    #[test]
    fn a_chunk_decoded_from_a_shared_frame_is_a_slice_of_it() {
        for msg in transfer_messages() {
            let mut enc = BytesMut::new();
            encode_into(&msg, &mut enc).unwrap();
            let frame = enc.freeze();
            assert_eq!(decode_shared(&frame).unwrap(), msg);
            for cut in 0..frame.len().min(100) {
                assert!(
                    decode_shared(&frame.slice(..cut)).is_err(),
                    "{msg:?} cut at {cut}"
                );
            }
            let Message::Transfer(t) = decode_shared(&frame).unwrap() else {
                continue;
            };
            if let Transfer::Chunk { data, .. } = *t {
                let (at, end) = (
                    frame.as_ptr() as usize,
                    frame.as_ptr() as usize + frame.len(),
                );
                if !data.is_empty() {
                    assert!(
                        data.as_ptr() as usize >= at && data.as_ptr() as usize + data.len() <= end
                    );
                }
                let Message::Transfer(t) = decode(&frame).unwrap() else {
                    panic!("not a transfer");
                };
                let Transfer::Chunk { data: copy, .. } = *t else {
                    panic!("not a chunk");
                };
                assert!(
                    copy.is_empty()
                        || copy.as_ptr() as usize >= end
                        || (copy.as_ptr() as usize) + copy.len() <= at
                );
            }
        }
    }

    #[test]
    fn transfer_messages_are_byte_for_byte_bincode_and_refuse_what_bincode_refuses() {
        for msg in transfer_messages() {
            let mut ours = BytesMut::new();
            encode_into(&msg, &mut ours).unwrap();
            let theirs = bincode_bytes(&msg);
            assert_eq!(&ours[..], &theirs[..], "{msg:?}");
            assert_eq!(decode(&theirs).unwrap(), msg);
            assert_eq!(decode_bincode(&ours).unwrap(), msg);
            for cut in 0..ours.len().min(200) {
                assert!(decode(&ours[..cut]).is_err(), "{msg:?} cut at {cut}");
            }
        }
        // The documented bytes of a Have, an Ack and an Offer (docs/PROTOCOL.md, "Files").
        let enc = |t: Transfer| {
            let mut b = BytesMut::new();
            encode_into(&Message::Transfer(Box::new(t)), &mut b).unwrap();
            b.to_vec()
        };
        assert_eq!(enc(Transfer::Have { id: 5 }), [14, 1, 5]);
        assert_eq!(
            enc(Transfer::Ack {
                id: 1,
                received: 65_536
            }),
            [14, 4, 1, 252, 0, 0, 1, 0]
        );
        let offer = enc(Transfer::Offer {
            id: 2,
            hash: ContentHash([0xab; 32]),
            size: 300,
        });
        assert_eq!(&offer[..3], [14, 0, 2]);
        assert_eq!(&offer[3..35], [0xab; 32]);
        assert_eq!(&offer[35..], [251, 44, 1]);
    }

    #[test]
    fn transfer_bounds_are_checked_before_allocating() {
        // A chunk over 64 KiB, a list over 32 files, a name over 512 bytes, a message over
        // 1 KiB: refused however much the payload holds.
        let mut over = vec![14u8, 3, 1, 0, 252];
        over.extend_from_slice(&(MAX_CHUNK as u32 + 1).to_le_bytes());
        over.extend(std::iter::repeat_n(0u8, MAX_CHUNK + 1));
        assert!(decode(&over).is_err());
        assert!(decode(&[14, 8, 1, 33]).is_err());
        assert!(decode(&[14, 9, 1, 33]).is_err());
        let mut long = vec![14u8, 8, 1, 1, 251];
        long.extend_from_slice(&513u16.to_le_bytes());
        long.extend(std::iter::repeat_n(b'a', 513 + 32));
        long.push(0);
        assert!(decode(&long).is_err());
        let mut ok = vec![14u8, 8, 1, 1, 251];
        ok.extend_from_slice(&512u16.to_le_bytes());
        ok.extend(std::iter::repeat_n(b'a', 512 + 32));
        ok.push(0);
        assert!(decode(&ok).is_ok());
        assert!(decode(&[14, 6, 1, 6, 0]).is_err(), "unknown abort reason");
        assert!(decode(&[14, 10, 1]).is_err(), "unknown transfer message");
        // A chunk claiming more than the payload holds.
        assert!(decode(&[14, 3, 1, 0, 200, 1, 2, 3]).is_err());
        // An Abort message over the bound is cut when encoded.
        let mut b = BytesMut::new();
        encode_into(
            &Message::Transfer(Box::new(Transfer::Abort {
                id: 1,
                reason: AbortReason::Io,
                message: "é".repeat(MAX_ABORT_MESSAGE),
            })),
            &mut b,
        )
        .unwrap();
        let Message::Transfer(t) = decode(&b).unwrap() else {
            panic!()
        };
        let Transfer::Abort { message, .. } = *t else {
            panic!()
        };
        assert_eq!(message.len(), MAX_ABORT_MESSAGE);
    }

    #[test]
    fn hand_coded_messages_are_byte_for_byte_bincode() {
        for msg in hot_messages() {
            let mut ours = BytesMut::new();
            encode_into(&msg, &mut ours).unwrap();
            let theirs = bincode_bytes(&msg);
            assert_eq!(&ours[..], &theirs[..], "{msg:?}");
            assert_eq!(decode(&theirs).unwrap(), msg);
            assert_eq!(decode_bincode(&ours).unwrap(), msg);
        }
    }

    /// Random messages and bytes from the shared deterministic generator, so that a
    /// failure replays.
    struct Gen(crate::testing::Rng);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0.next_u64()
        }

        fn below(&mut self, n: u64) -> u64 {
            self.0.below(n)
        }

        /// A number near a varint width's edge, or anywhere.
        fn number(&mut self) -> u64 {
            const EDGES: [u64; 9] = [
                0,
                250,
                251,
                65_535,
                65_536,
                u32::MAX as u64,
                u32::MAX as u64 + 1,
                u64::MAX - 1,
                u64::MAX,
            ];
            match self.below(4) {
                0 => self.below(300),
                1 => EDGES[self.below(EDGES.len() as u64) as usize],
                2 => EDGES[self.below(EDGES.len() as u64) as usize].wrapping_add(self.below(3)),
                _ => self.next() >> self.below(64),
            }
        }

        /// A string of 0 to 40 characters: mostly ASCII, sometimes not, of one byte often.
        fn text(&mut self) -> String {
            let len = match self.below(4) {
                0 => self.below(2),
                1 => self.below(4),
                _ => self.below(41),
            };
            (0..len)
                .map(|_| match self.below(8) {
                    0 => ['é', '✓', '\u{10348}', '\u{7f}', '\u{80}'][self.below(5) as usize],
                    _ => char::from(self.below(128) as u8),
                })
                .collect()
        }

        fn message(&mut self) -> Message {
            match self.below(6) {
                0 | 1 => Message::Assign(Assign {
                    seq: self.number(),
                    task: self.text().into(),
                    kind: self.text().into(),
                    args: self.text(),
                    attempt: self.number() as u32,
                    timeout_ms: self.number(),
                }),
                2 | 3 => Message::Completed(Completed {
                    seq: self.number(),
                    ok: self.below(2) == 0,
                    exit_code: (self.below(3) > 0).then(|| self.next() as i32 >> self.below(32)),
                    output: self.text().into(),
                    error: (self.below(2) == 0).then(|| self.text()),
                    duration_us: self.number(),
                }),
                4 => [
                    Message::Cancel { seq: self.number() },
                    Message::Started { seq: self.number() },
                    Message::Ping {
                        nonce: self.number(),
                    },
                    Message::Pong {
                        nonce: self.number(),
                    },
                    Message::Goodbye,
                    Message::GoodbyeAck,
                ][self.below(6) as usize]
                    .clone(),
                _ => Message::Transfer(Box::new(Transfer::Abort {
                    id: self.number(),
                    reason: AbortReason::Io,
                    message: self.text(),
                })),
            }
        }
    }

    /// The fast and the general reader on the same bytes: the same message, or the same
    /// error.
    fn same_either_way(bytes: &[u8]) {
        let fast = decode_in::<true>(bytes, None);
        let general = decode_in::<false>(bytes, None);
        match (&fast, &general) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{bytes:?}"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{bytes:?}"),
            _ => panic!("{bytes:?}: fast {fast:?}, general {general:?}"),
        }
    }

    /// Random messages: the stack encoder writes the bytes of the general one, and both
    /// readers read back the message, and read every truncation and every single-byte
    /// change of it alike.
    #[test]
    fn the_short_paths_encode_and_decode_as_the_general_ones_on_random_messages() {
        let mut g = Gen(crate::testing::Rng(0x9e37_79b9_7f4a_7c15));
        let mut small_used = 0;
        for _ in 0..4_000 {
            let msg = g.message();
            let mut general = BytesMut::new();
            encode_into(&msg, &mut general).unwrap();
            let mut buf = [0u8; SMALL];
            match encode_small(&msg, &mut buf) {
                Some(n) => {
                    assert_eq!(&buf[..n], &general[..], "{msg:?}");
                    small_used += 1;
                }
                None => assert!(
                    general.len() > SMALL
                        || !matches!(msg, Message::Assign(_) | Message::Completed(_)),
                    "{msg:?} fits but was not encoded small"
                ),
            }
            assert_eq!(decode_in::<true>(&general, None).unwrap(), msg);
            assert_eq!(decode_in::<false>(&general, None).unwrap(), msg);
            for cut in 0..general.len() {
                same_either_way(&general[..cut]);
            }
            let mut bent = general.to_vec();
            for _ in 0..8 {
                let at = g.below(bent.len() as u64) as usize;
                let was = bent[at];
                bent[at] = [0, 1, 2, 127, 128, 250, 251, 252, 253, 254, 255][g.below(11) as usize];
                same_either_way(&bent);
                bent[at] = was;
            }
        }
        // Most of them took the short path (the rest are too long, or not task messages).
        assert!(small_used > 2_000, "{small_used}");
    }

    /// Random bytes after each variant: both readers accept and refuse the same.
    #[test]
    fn the_short_paths_refuse_what_the_general_ones_refuse_on_random_bytes() {
        let mut g = Gen(crate::testing::Rng(0x0123_4567_89ab_cdef));
        for _ in 0..40_000 {
            let len = g.below(48) as usize;
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| match g.below(4) {
                    0 => g.below(4) as u8,
                    1 => [250, 251, 252, 253, 254, 255][g.below(6) as usize],
                    2 => g.below(128) as u8,
                    _ => g.next() as u8,
                })
                .collect();
            if let Some(first) = bytes.first_mut() {
                *first = [0, 1, 2, 3, 3, 4, 4, 5, 6, 7, 8, 9, 10, 14][g.below(14) as usize];
            }
            same_either_way(&bytes);
        }
    }

    /// The one-byte strings are those bytes.
    #[test]
    fn the_one_byte_table_holds_each_ascii_byte() {
        for (i, s) in ONE_BYTE.iter().enumerate() {
            assert_eq!(s.as_bytes(), [i as u8]);
        }
    }

    #[test]
    fn hand_decoding_refuses_what_bincode_refuses() {
        for msg in hot_messages() {
            let bytes = bincode_bytes(&msg);
            // Every truncation fails (except where a shorter prefix is itself a message,
            // which only the fieldless ones are).
            for cut in 0..bytes.len() {
                let ours = decode(&bytes[..cut]);
                let theirs = decode_bincode(&bytes[..cut]);
                assert_eq!(ours.is_ok(), theirs.is_ok(), "{msg:?} cut at {cut}");
            }
        }
        // A string that claims more than the payload holds allocates nothing and fails.
        let mut claim = vec![3u8, 1, 253];
        claim.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&claim),
            Err(Error::Connection(ConnectionError::Decode(_)))
        ));
        // Invalid UTF-8, bool, option tags and varint tags.
        assert!(decode(&[3, 1, 1, 0xff, 1, b'a', 0, 1, 0]).is_err());
        assert!(decode(&[4, 1, 2, 0, 0, 0, 0]).is_err());
        assert!(decode(&[4, 1, 1, 2, 0, 0, 0]).is_err());
        assert!(decode(&[5, 254]).is_err());
        assert!(decode(&[253]).is_err());
        assert!(decode(&[10]).is_err());
    }

    fn hello(types: usize, type_len: usize, cluster_len: usize) -> Hello {
        Hello {
            version: crate::PROTOCOL_VERSION,
            cluster: "c".repeat(cluster_len),
            node_id: NodeId([9; 16]),
            types: (0..types)
                .map(|i| {
                    ((b'a' + (i % 26) as u8) as char)
                        .to_string()
                        .repeat(type_len)
                })
                .collect(),
            capacity: u32::MAX,
        }
    }

    fn handshake_messages() -> Vec<Message> {
        let mut v = Vec::new();
        for (types, type_len, cluster_len) in
            [(0, 1, 1), (1, 1, 7), (MAX_TYPES, MAX_TYPE_LEN, MAX_CLUSTER)]
        {
            v.push(Message::Hello(hello(types, type_len, cluster_len)));
            v.push(Message::Welcome(hello(types, type_len, cluster_len)));
        }
        for reason in [
            RejectReason::Version,
            RejectReason::Cluster,
            RejectReason::Key,
            RejectReason::Busy,
            RejectReason::Invalid,
        ] {
            v.push(Message::Reject(Reject {
                reason,
                message: "é✓".repeat(100),
            }));
        }
        v
    }

    #[test]
    fn hand_decoded_handshakes_are_bincode_and_the_largest_hello_is_max_hello() {
        for msg in handshake_messages() {
            let theirs = bincode_bytes(&msg);
            assert_eq!(decode(&theirs).unwrap(), msg);
            assert_eq!(decode_bincode(&theirs).unwrap(), msg);
            for cut in 0..theirs.len() {
                assert!(decode(&theirs[..cut]).is_err(), "{msg:?} cut at {cut}");
            }
        }
        let largest = bincode_bytes(&Message::Hello(Hello {
            version: u16::MAX,
            ..hello(MAX_TYPES, MAX_TYPE_LEN, MAX_CLUSTER)
        }));
        assert_eq!(largest.len(), MAX_HELLO);
    }

    /// A Hello of 7,000,000 one-byte types (a 14 MB frame) was welcomed and cost 789 MiB;
    /// a 3 MB cluster name was echoed in a 15 MB Reject. Each field is refused at its bound,
    /// just over it, before anything is allocated for it.
    #[test]
    fn every_field_of_a_hello_is_bounded() {
        let bound = |m: &Message| match decode(&bincode_bytes(m)) {
            Err(Error::Handshake(HandshakeError::Bound { what, len, max })) => (what, len, max),
            other => panic!("expected a bound error, got {other:?}"),
        };
        assert_eq!(
            bound(&Message::Hello(hello(MAX_TYPES + 1, 1, 1))),
            ("number of types", MAX_TYPES + 1, MAX_TYPES)
        );
        assert_eq!(
            bound(&Message::Welcome(hello(1, MAX_TYPE_LEN + 1, 1))),
            ("type name (bytes)", MAX_TYPE_LEN + 1, MAX_TYPE_LEN)
        );
        assert_eq!(
            bound(&Message::Hello(hello(1, 1, MAX_CLUSTER + 1))),
            ("cluster name (bytes)", MAX_CLUSTER + 1, MAX_CLUSTER)
        );
        let mut claim = bincode_bytes(&Message::Hello(hello(0, 1, 1)));
        // The type count (last but one field, before capacity u32::MAX = 5 bytes) claims
        // 7,000,000 in a tiny payload.
        let at = claim.len() - 6;
        claim.truncate(at);
        claim.push(252);
        claim.extend_from_slice(&7_000_000u32.to_le_bytes());
        assert!(matches!(
            decode(&claim),
            Err(Error::Handshake(HandshakeError::Bound {
                what: "number of types",
                len: 7_000_000,
                ..
            }))
        ));
        // A Reject's message is cut when encoded, and refused over the bound when decoded.
        let long = Message::Reject(Reject {
            reason: RejectReason::Cluster,
            message: "é".repeat(MAX_REJECT_MESSAGE),
        });
        let mut ours = BytesMut::new();
        encode_into(&long, &mut ours).unwrap();
        match decode(&ours).unwrap() {
            Message::Reject(r) => {
                assert!(r.message.len() <= MAX_REJECT_MESSAGE);
                assert_eq!(r.message.len(), MAX_REJECT_MESSAGE);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(&bincode_bytes(&long)),
            Err(Error::Handshake(HandshakeError::Bound { .. }))
        ));
    }

    #[test]
    fn payloads_at_every_bucket_edge_decode() {
        for output_len in [65_500, 65_520, 65_530, 1_048_540, 1_048_570, 1_048_600] {
            let msg = Message::Completed(Completed {
                seq: 1,
                ok: true,
                exit_code: Some(0),
                output: "x".repeat(output_len).into(),
                error: None,
                duration_us: 5,
            });
            let mut buf = BytesMut::new();
            encode_into(&msg, &mut buf).unwrap();
            assert_eq!(decode(&buf).unwrap(), msg, "output of {output_len} bytes");
        }
    }

    /// The variant index of `Message::Hosted` (docs/PROTOCOL.md; the messages of other
    /// branches may come before it, which moves this one number).
    const HOSTED: u8 = 15;

    #[test]
    fn hosted_messages_are_encoded_as_docs_protocol_says() {
        use crate::hosted::{Hosted, RunEnd, RunInfo, RunState, Submit, SubmitOptions};
        let h = |h: Hosted| Message::Hosted(Box::new(h));
        let cases: Vec<(Message, Vec<u8>)> = vec![
            (h(Hosted::List), vec![HOSTED, 1]),
            (
                h(Hosted::Results { run: "ab".into() }),
                vec![HOSTED, 13, 2, b'a', b'b'],
            ),
            (
                h(Hosted::ResultFile(crate::hosted::ResultFile {
                    path: "a/o".into(),
                    size: 300,
                })),
                vec![HOSTED, 14, 3, b'a', b'/', b'o', 251, 0x2c, 0x01],
            ),
            (
                h(Hosted::ResultData { data: vec![7, 8] }),
                vec![HOSTED, 15, 2, 7, 8],
            ),
            (h(Hosted::ResultsDone { files: 3 }), vec![HOSTED, 16, 3]),
            (
                h(Hosted::Attach { run: "ab".into() }),
                vec![HOSTED, 3, 2, b'a', b'b'],
            ),
            (
                h(Hosted::Refused {
                    reason: "no".into(),
                }),
                vec![HOSTED, 6, 2, b'n', b'o'],
            ),
            (
                h(Hosted::Ended(RunEnd {
                    run: "r".into(),
                    state: RunState::Cancelled,
                    exit: 130,
                })),
                vec![HOSTED, 10, 1, b'r', 3, 130],
            ),
            (
                h(Hosted::Submit(Box::new(Submit {
                    name: "t".into(),
                    text: "a1".into(),
                    options: SubmitOptions {
                        order: 2,
                        retries: 1,
                        keep_going: true,
                        retry_backoff_ms: 100,
                        retry_backoff_max_ms: 5000,
                        task_timeout_ms: 0,
                        discovery_timeout_ms: 3000,
                    },
                }))),
                vec![
                    HOSTED, 0, 1, b't', 2, b'a', b'1', 2, 1, 1, 100, 251, 0x88, 0x13, 0, 251, 0xb8,
                    0x0b,
                ],
            ),
            (
                h(Hosted::Runs(vec![RunInfo {
                    run: "r".into(),
                    name: "f".into(),
                    state: RunState::Running,
                    total: 3,
                    succeeded: 1,
                    failed: 0,
                    running: 1,
                    started_ms: 7,
                    ended_ms: None,
                }])),
                vec![HOSTED, 7, 1, 1, b'r', 1, b'f', 0, 3, 1, 0, 1, 7, 0],
            ),
        ];
        for (msg, bytes) in cases {
            let mut ours = BytesMut::new();
            encode_into(&msg, &mut ours).unwrap();
            assert_eq!(&ours[..], &bytes[..], "{msg:?}");
            assert_eq!(decode(&bytes).unwrap(), msg);
        }
    }

    #[test]
    fn replica_messages_are_encoded_as_docs_protocol_says() {
        use crate::replica::{Member, RaftEntry, RaftMessage, Replica};
        const REPLICA: u8 = 16;
        let cancel = Message::Replica(Box::new(Replica::Cancel { run: "ab".into() }));
        let raft = Message::Replica(Box::new(Replica::Raft(Box::new(RaftMessage {
            run: "r".into(),
            members: vec![Member {
                node: crate::NodeId([7; 16]),
                addr: "h:1".into(),
            }],
            msg_type: 3,
            to: 1,
            from: 1,
            term: 2,
            log_term: 1,
            index: 5,
            commit: 4,
            commit_term: 1,
            reject: false,
            reject_hint: 0,
            request_snapshot: 0,
            context: vec![],
            entries: vec![RaftEntry {
                entry_type: 0,
                term: 2,
                index: 6,
                data: vec![9, 8],
                context: vec![],
            }],
        }))));
        let mut raft_bytes = vec![REPLICA, 0, 1, b'r', 1];
        raft_bytes.extend_from_slice(&[7; 16]);
        raft_bytes.extend_from_slice(&[3, b'h', b':', b'1']);
        raft_bytes.extend_from_slice(&[3, 1, 1, 2, 1, 5, 4, 1, 0, 0, 0, 0]);
        raft_bytes.extend_from_slice(&[1, 0, 2, 6, 2, 9, 8, 0]);
        for (msg, bytes) in [
            (cancel, vec![REPLICA, 1, 2, b'a', b'b']),
            (raft, raft_bytes),
        ] {
            let mut ours = BytesMut::new();
            encode_into(&msg, &mut ours).unwrap();
            assert_eq!(&ours[..], &bytes[..], "{msg:?}");
            assert_eq!(decode(&bytes).unwrap(), msg);
        }
        // Claimed lengths past the frame allocate nothing; an unknown variant is refused.
        assert!(decode(&[REPLICA, 1, 253, 0, 0, 0, 0, 1, 0, 0, 0]).is_err());
        assert!(decode(&[REPLICA, 0, 1, b'r', 253, 0, 0, 0, 0, 1, 0, 0, 0]).is_err());
        assert!(decode(&[REPLICA, 2]).is_err());
    }

    #[test]
    fn a_hosted_message_claiming_more_than_its_frame_allocates_nothing() {
        // A Submit whose name claims 2^32 bytes in a frame of a dozen: refused, not allocated.
        let bytes = [HOSTED, 0, 253, 0, 0, 0, 0, 1, 0, 0, 0];
        assert!(decode(&bytes).is_err());
        // A Runs list claiming 2^40 entries.
        let bytes = [HOSTED, 7, 253, 0, 0, 0, 0, 0, 1, 0, 0];
        assert!(decode(&bytes).is_err());
        // An unknown hosted variant.
        assert!(decode(&[HOSTED, 99]).is_err());
    }
}
