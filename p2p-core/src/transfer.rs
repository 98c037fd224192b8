//! File transfer as IO-free state machines (protocol v3, [`Transfer`] messages).
//!
//! - [`Sender`]: one file going out. It says which bytes to read next
//!   ([`Sender::poll_read`]) within the credit the receiver gave (`Want`/`Fetch`, then each
//!   `Ack`), and turns them into chunks ([`Sender::chunk`]). It never holds file data.
//! - [`Receiver`]: one file coming in. It checks every chunk (its transfer, its offset: in
//!   order, no gap, no overlap; its size; the credit; the announced size; `--max-file`),
//!   hashes it on the way through (or leaves the hash to the caller, who hashes on the
//!   thread that writes: [`Receiver::on_chunk_unhashed`], [`Receiver::check_hash`]), and
//!   returns the bytes for the caller to write at once (so memory is bounded by one chunk
//!   whatever the file's size); the last byte checks the hash
//!   ([`TransferError::HashMismatch`]). It says when to `Ack`, so the credit moves.
//! - [`Outbox`]: the two queues of a connection's send path: control frames always go
//!   first, and chunks go out between them only while the writer's buffer holds less than
//!   [`WRITE_LOW_WATER`], so a large file never delays a small task's messages by more than
//!   the writer's buffer ([`WRITE_BURST`], a few chunks, written by one system call).
//!
//! Hash: BLAKE3 (32 bytes) over the file's bytes. BLAKE2b-256 took half of a receiving
//! node's CPU time on one core (the mesh bench's `files` section, profiled with perf);
//! BLAKE3's SIMD implementation hashes 64 KiB chunks several times faster.

use std::collections::VecDeque;

use crate::message::{AbortReason, ContentHash, Message, Transfer, MAX_CHUNK};

/// The credit a receiver gives by default: 4 MiB (64 chunks of 64 KiB) in flight.
pub const DEFAULT_WINDOW: u32 = 4 * 1024 * 1024;

/// Room left in a frame for a chunk's header (message and transfer variants, id, offset,
/// length), with margin: the largest header is 2 + 9 + 9 + 5 = 25 bytes.
pub const CHUNK_OVERHEAD: usize = 64;

/// The chunk size a sender uses when the frame limit allows: 63 KiB (a receiver takes up to
/// [`MAX_CHUNK`], 64 KiB). A whole number of BLAKE3's 1 KiB chunks, so the hash stays on
/// its parallel path; with its header, one chunk's frame fits one Noise transport message
/// (65,519 bytes of plaintext; a 64 KiB chunk took two, the second of 46 bytes); and a
/// receiver's buffer for it stays under 64 KiB, where the C allocator's `free` does not
/// try to give memory back to the system (at 64 KiB and over it did, for every chunk: a
/// page fault per 4 KiB of the file at the receiver, measured with `perf stat`).
pub const SEND_CHUNK: usize = 63 * 1024;

// One chunk's frame (its header within CHUNK_OVERHEAD, its 4-byte length) fits one Noise
// transport message.
const _: () = assert!(SEND_CHUNK + CHUNK_OVERHEAD <= crate::secure::MAX_CHUNK_PLAINTEXT);

/// The chunk size a sender uses with this frame limit: [`SEND_CHUNK`], or less when the
/// frame limit leaves less room.
pub fn chunk_len(max_frame: usize) -> usize {
    SEND_CHUNK
        .min(max_frame.saturating_sub(CHUNK_OVERHEAD))
        .max(1)
}

/// An incremental content hash (BLAKE3, 32 bytes).
#[derive(Clone, Default)]
pub struct Hasher(blake3::Hasher);

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher")
    }
}

impl Hasher {
    /// A hasher with nothing fed yet.
    pub fn new() -> Hasher {
        Hasher::default()
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The hash of everything fed.
    pub fn finish(self) -> ContentHash {
        ContentHash(*self.0.finalize().as_bytes())
    }
}

/// The content hash of `bytes`.
pub fn hash_bytes(bytes: &[u8]) -> ContentHash {
    let mut h = Hasher::new();
    h.update(bytes);
    h.finish()
}

/// Why a transfer failed. A `Violation` is the peer breaking the rules (the connection
/// should close); the others end this transfer only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The peer broke a rule of the transfer protocol.
    #[error("transfer {id}: protocol violation: {what}")]
    Violation {
        /// The transfer id.
        id: u64,
        /// What was wrong.
        what: String,
    },
    /// The announced file is larger than this side accepts.
    #[error("transfer {id}: the file is {size} bytes, more than the {max} allowed (--max-file)")]
    TooLarge {
        /// The transfer id.
        id: u64,
        /// The announced size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The bytes received do not have the announced hash.
    #[error("transfer {id}: the file received has hash {got}, not the {expected} announced")]
    HashMismatch {
        /// The transfer id.
        id: u64,
        /// The announced hash.
        expected: ContentHash,
        /// The hash of what arrived.
        got: ContentHash,
    },
    /// The stream ended (the connection closed) before the whole file arrived.
    #[error("transfer {id}: cut after {received} of {size} bytes")]
    Truncated {
        /// The transfer id.
        id: u64,
        /// Bytes received.
        received: u64,
        /// Bytes announced.
        size: u64,
    },
    /// The peer gave the transfer up.
    #[error("transfer {id}: given up by the peer ({reason:?}): {message}")]
    Aborted {
        /// The transfer id.
        id: u64,
        /// Its reason.
        reason: AbortReason,
        /// Its explanation.
        message: String,
    },
}

impl TransferError {
    /// Whether the peer broke the protocol (close the connection) rather than this one
    /// transfer failing.
    pub fn is_violation(&self) -> bool {
        matches!(self, TransferError::Violation { .. })
    }

    /// The `Abort` to send the peer for this failure, if one is owed (not for a violation
    /// or an abort the peer sent).
    pub fn abort_message(&self) -> Option<Message> {
        let (id, reason) = match self {
            TransferError::TooLarge { id, .. } => (*id, AbortReason::TooLarge),
            TransferError::HashMismatch { id, .. } => (*id, AbortReason::HashMismatch),
            _ => return None,
        };
        Some(Message::Transfer(Box::new(Transfer::Abort {
            id,
            reason,
            message: self.to_string(),
        })))
    }
}

fn violation(id: u64, what: impl Into<String>) -> TransferError {
    TransferError::Violation {
        id,
        what: what.into(),
    }
}

/// Where a [`Sender`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendState {
    /// Offered; waiting for `Have` or `Want`.
    Offered,
    /// Sending within the credit.
    Sending,
    /// Every byte sent; waiting for `Done`.
    Sent,
    /// The receiver has the file (`Have` or `Done`).
    Delivered,
}

/// One file going out (see the module documentation).
#[derive(Debug, Clone)]
pub struct Sender {
    id: u64,
    size: u64,
    chunk: usize,
    /// Bytes handed out as chunks so far (the next offset).
    sent: u64,
    /// The receiver's last `Ack`.
    acked: u64,
    window: u64,
    state: SendState,
}

impl Sender {
    /// A sender of a file of `size` bytes in chunks of at most `chunk` bytes (see
    /// [`chunk_len`]) that waits for `Have` or `Want` (after an `Offer`).
    pub fn offered(id: u64, size: u64, chunk: usize) -> Sender {
        Sender {
            id,
            size,
            chunk: chunk.clamp(1, MAX_CHUNK),
            sent: 0,
            acked: 0,
            window: 0,
            state: SendState::Offered,
        }
    }

    /// A sender answering a `Fetch` with this window: it sends at once.
    pub fn fetched(id: u64, size: u64, chunk: usize, window: u32) -> Result<Sender, TransferError> {
        let mut s = Sender::offered(id, size, chunk);
        s.on_want(window)?;
        Ok(s)
    }

    /// The transfer id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Where it is.
    pub fn state(&self) -> SendState {
        self.state
    }

    /// The `Offer` message that starts this transfer.
    pub fn offer(&self, hash: ContentHash) -> Message {
        Message::Transfer(Box::new(Transfer::Offer {
            id: self.id,
            hash,
            size: self.size,
        }))
    }

    /// The receiver has the file already.
    pub fn on_have(&mut self) -> Result<(), TransferError> {
        if self.state != SendState::Offered {
            return Err(violation(self.id, "Have after the transfer started"));
        }
        self.state = SendState::Delivered;
        Ok(())
    }

    /// The receiver wants the file, with `window` bytes of credit.
    pub fn on_want(&mut self, window: u32) -> Result<(), TransferError> {
        if self.state != SendState::Offered {
            return Err(violation(self.id, "a second Want"));
        }
        if (window as usize)
            < self
                .chunk
                .min(usize::try_from(self.size).unwrap_or(usize::MAX))
        {
            return Err(violation(
                self.id,
                format!("a window of {window} bytes, less than one chunk"),
            ));
        }
        self.window = u64::from(window);
        // An empty file is sent as one empty chunk.
        self.state = SendState::Sending;
        Ok(())
    }

    /// The receiver has `received` bytes: more credit.
    pub fn on_ack(&mut self, received: u64) -> Result<(), TransferError> {
        if !matches!(self.state, SendState::Sending | SendState::Sent) {
            return Err(violation(self.id, "Ack before Want"));
        }
        if received < self.acked || received > self.sent {
            return Err(violation(
                self.id,
                format!(
                    "Ack of {received} bytes (acknowledged {}, sent {})",
                    self.acked, self.sent
                ),
            ));
        }
        self.acked = received;
        Ok(())
    }

    /// The receiver has the whole file, hash checked.
    pub fn on_done(&mut self) -> Result<(), TransferError> {
        if self.state != SendState::Sent {
            return Err(violation(self.id, "Done before every byte was sent"));
        }
        self.state = SendState::Delivered;
        Ok(())
    }

    /// The next bytes to read and send, `(offset, len)`, when the credit allows; `None`
    /// when there is nothing to send now (waiting for an `Ack`, or all sent). An empty file
    /// is one empty chunk.
    pub fn poll_read(&self) -> Option<(u64, usize)> {
        if self.state != SendState::Sending {
            return None;
        }
        if self.size == 0 {
            return Some((0, 0));
        }
        let credit_end = self.acked.saturating_add(self.window).min(self.size);
        let room = credit_end.saturating_sub(self.sent);
        let len = room.min(self.chunk as u64);
        // Wait for a whole chunk of credit unless it is the file's last chunk.
        let last = self.size - self.sent <= self.chunk as u64;
        if len == 0 || (len < self.chunk as u64 && !last) {
            return None;
        }
        Some((self.sent, len as usize))
    }

    /// The chunk for the bytes [`Sender::poll_read`] asked for, read from the file. Fails
    /// when `data` is not what was asked for (the file changed size under us).
    pub fn chunk(
        &mut self,
        offset: u64,
        data: impl Into<bytes::Bytes>,
    ) -> Result<Message, TransferError> {
        let data = data.into();
        self.take(offset, data.len())?;
        Ok(Message::Transfer(Box::new(Transfer::Chunk {
            id: self.id,
            offset,
            data,
        })))
    }

    /// The chunk for the bytes [`Sender::poll_read`] asked for, as the range `offset, len`
    /// of `file`, read only when the connection writes it ([`Transfer::FileChunk`]: into
    /// its frame with a key; without one into a recycled buffer over loopback, by
    /// `sendfile(2)` to another machine): the sender holds no window of bytes. Fails when the range is not what was asked for, or when an earlier chunk of
    /// `file` could not be read whole ([`crate::file::ChunkFile::cut`]: the file changed
    /// under us; zeros went in the missing bytes' place, so the transfer must end).
    pub fn file_chunk(
        &mut self,
        offset: u64,
        len: usize,
        file: &crate::file::ChunkFile,
    ) -> Result<Message, TransferError> {
        if let Some(why) = file.cut() {
            return Err(violation(self.id, format!("the file changed: {why}")));
        }
        self.take(offset, len)?;
        Ok(Message::Transfer(Box::new(Transfer::FileChunk {
            id: self.id,
            offset,
            len,
            file: file.clone(),
        })))
    }

    /// Counts the chunk `offset, len` as sent, if it is what [`Sender::poll_read`] asks for.
    fn take(&mut self, offset: u64, len: usize) -> Result<(), TransferError> {
        let expected = self.poll_read();
        if expected != Some((offset, len)) {
            return Err(violation(
                self.id,
                format!(
                    "chunk at {offset} of {len} bytes, expected {expected:?} (the file changed?)"
                ),
            ));
        }
        self.sent += len as u64;
        if self.sent >= self.size {
            self.state = SendState::Sent;
        }
        Ok(())
    }
}

/// What a [`Receiver`] makes of a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// Write these bytes at the end of the file; more are to come.
    Write(&'a [u8]),
    /// Write these bytes: the file is complete and its hash matched (send `Done`,
    /// [`Receiver::done`]).
    Complete(&'a [u8]),
}

/// One file coming in (see the module documentation).
#[derive(Debug)]
pub struct Receiver {
    id: u64,
    size: u64,
    expected: ContentHash,
    window: u32,
    received: u64,
    acked: u64,
    hasher: Hasher,
    /// Every byte arrived (hash checked when hashed here).
    complete: bool,
    /// Chunks are hashed by the caller ([`Receiver::on_chunk_unhashed`]).
    unhashed: bool,
    /// Every byte arrived unhashed; [`Receiver::check_hash`] is owed.
    awaiting_hash: bool,
}

impl Receiver {
    /// A receiver of the file of `size` bytes and hash `hash` an `Offer` (or a `Produced`
    /// record) announced, which gives `window` bytes of credit. Refuses a file over
    /// `max_file` bytes.
    pub fn new(
        id: u64,
        hash: ContentHash,
        size: u64,
        window: u32,
        max_file: u64,
    ) -> Result<Receiver, TransferError> {
        if size > max_file {
            return Err(TransferError::TooLarge {
                id,
                size,
                max: max_file,
            });
        }
        Ok(Receiver {
            id,
            size,
            expected: hash,
            window: window.max(MAX_CHUNK as u32),
            received: 0,
            acked: 0,
            hasher: Hasher::new(),
            complete: false,
            unhashed: false,
            awaiting_hash: false,
        })
    }

    /// The transfer id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether the whole file arrived (and its hash matched).
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The `Want` that asks for the file.
    pub fn want(&self) -> Message {
        Message::Transfer(Box::new(Transfer::Want {
            id: self.id,
            window: self.window,
        }))
    }

    /// The `Fetch` that asks for the file by hash.
    pub fn fetch(&self) -> Message {
        Message::Transfer(Box::new(Transfer::Fetch {
            id: self.id,
            hash: self.expected,
            window: self.window,
        }))
    }

    /// The `Done` that ends a complete transfer.
    pub fn done(&self) -> Message {
        Message::Transfer(Box::new(Transfer::Done { id: self.id }))
    }

    /// Takes a chunk: checks it, hashes it, and returns what to write. A chunk out of order
    /// (a gap, a duplicate, an overlap), over 64 KiB, beyond the credit or the announced
    /// size, or after the end is a violation; the last byte not matching the hash is
    /// [`TransferError::HashMismatch`].
    pub fn on_chunk<'a>(
        &mut self,
        offset: u64,
        data: &'a [u8],
    ) -> Result<Received<'a>, TransferError> {
        if self.unhashed {
            return Err(violation(
                self.id,
                "a chunk for a receiver hashed by its caller",
            ));
        }
        let last = self.accept(offset, data)?;
        self.hasher.update(data);
        if !last {
            return Ok(Received::Write(data));
        }
        let got = std::mem::take(&mut self.hasher).finish();
        self.check(got)?;
        Ok(Received::Complete(data))
    }

    /// [`Receiver::on_chunk`] for a caller that hashes the bytes itself (e.g. on the thread
    /// that writes them, off the socket's thread): the same checks, no hashing. `Ok(true)`
    /// when the chunk completes the file: then the file's hash is owed to
    /// [`Receiver::check_hash`] before the transfer is complete (and `Done` is sent).
    /// A receiver takes chunks one way or the other, never both.
    pub fn on_chunk_unhashed(&mut self, offset: u64, data: &[u8]) -> Result<bool, TransferError> {
        if !self.unhashed && self.received > 0 {
            return Err(violation(
                self.id,
                "an unhashed chunk for a hashing receiver",
            ));
        }
        self.unhashed = true;
        let last = self.accept(offset, data)?;
        if last {
            self.awaiting_hash = true;
        }
        Ok(last)
    }

    /// The hash of every byte [`Receiver::on_chunk_unhashed`] took, once the last one came:
    /// the transfer is complete when it is the announced hash, else
    /// [`TransferError::HashMismatch`].
    pub fn check_hash(&mut self, got: ContentHash) -> Result<(), TransferError> {
        if !self.awaiting_hash {
            return Err(violation(self.id, "a hash checked before the whole file"));
        }
        self.awaiting_hash = false;
        self.check(got)
    }

    fn check(&mut self, got: ContentHash) -> Result<(), TransferError> {
        self.complete = true;
        if got == self.expected {
            return Ok(());
        }
        Err(TransferError::HashMismatch {
            id: self.id,
            expected: self.expected,
            got,
        })
    }

    /// Checks a chunk's place and size and counts it; `Ok(true)` when it is the file's last.
    fn accept(&mut self, offset: u64, data: &[u8]) -> Result<bool, TransferError> {
        let id = self.id;
        if self.complete || self.awaiting_hash {
            return Err(violation(id, "a chunk after the whole file"));
        }
        if offset != self.received {
            return Err(violation(
                id,
                format!(
                    "a chunk at {offset}, expected {} (chunks go in order)",
                    self.received
                ),
            ));
        }
        if data.len() > MAX_CHUNK {
            return Err(violation(id, format!("a chunk of {} bytes", data.len())));
        }
        let end = offset.saturating_add(data.len() as u64);
        if end > self.size {
            return Err(violation(
                id,
                format!(
                    "a chunk ending at {end}, beyond the {} bytes announced",
                    self.size
                ),
            ));
        }
        if end > self.acked.saturating_add(u64::from(self.window)) {
            return Err(violation(
                id,
                format!(
                    "a chunk ending at {end}, beyond the credit ({} + {})",
                    self.acked, self.window
                ),
            ));
        }
        if data.is_empty() && self.size != 0 {
            return Err(violation(id, "an empty chunk"));
        }
        self.received = end;
        Ok(self.received >= self.size)
    }

    /// The `Ack` to send now, once what [`Receiver::on_chunk`] returned is written: after
    /// every quarter of the window (so the sender never stalls on a full window).
    pub fn poll_ack(&mut self) -> Option<Message> {
        if self.complete
            || self.awaiting_hash
            || self.received - self.acked < u64::from(self.window / 4).max(1)
        {
            return None;
        }
        self.acked = self.received;
        Some(Message::Transfer(Box::new(Transfer::Ack {
            id: self.id,
            received: self.received,
        })))
    }

    /// The stream ended (the connection closed, or the sender aborted) before the end.
    pub fn on_end(&self) -> Result<(), TransferError> {
        if self.is_complete() {
            return Ok(());
        }
        Err(TransferError::Truncated {
            id: self.id,
            received: self.received,
            size: self.size,
        })
    }
}

/// A connection's send queues (see the module documentation).
#[derive(Debug, Default)]
pub struct Outbox {
    control: VecDeque<Message>,
    chunks: VecDeque<Message>,
}

/// The most chunks an [`Outbox`] holds; a sender reads no more from its file while it is
/// full.
pub const OUTBOX_CHUNKS: usize = 4;

/// A chunk joins the writer's buffer only when fewer bytes than this are already waiting
/// there, so a control frame queued next waits behind at most [`WRITE_BURST`] bytes.
pub const WRITE_LOW_WATER: usize = 192 * 1024;

/// The most bytes of chunks a connection's writer holds before it writes them: a chunk
/// joins under [`WRITE_LOW_WATER`], so at most that plus one chunk (256 KiB), written to
/// the socket in one system call (one 64 KiB chunk per call cost a fifth of a sending
/// process's time in the kernel's TCP send path, measured with perf).
pub const WRITE_BURST: usize = WRITE_LOW_WATER + MAX_CHUNK + CHUNK_OVERHEAD;

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// Queues a control frame (anything but a chunk); it goes before every chunk waiting.
    /// An `Abort` takes the chunks of its transfer still queued out: it overtakes them, and
    /// a receiver closes the connection at a chunk after the sender's `Abort`.
    pub fn push(&mut self, msg: Message) {
        if is_chunk(&msg) {
            self.chunks.push_back(msg);
        } else {
            if let Message::Transfer(t) = &msg {
                if let Transfer::Abort { id, .. } = **t {
                    self.chunks.retain(|c| chunk_id(c) != Some(id));
                }
            }
            self.control.push_back(msg);
        }
    }

    /// Whether a chunk may be queued ([`OUTBOX_CHUNKS`] at most).
    pub fn has_chunk_room(&self) -> bool {
        self.chunks.len() < OUTBOX_CHUNKS
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.control.is_empty() && self.chunks.is_empty()
    }

    /// The next frame to write, given how many bytes the writer holds unsent: every control
    /// frame first; a chunk only when the writer holds under [`WRITE_LOW_WATER`] bytes.
    pub fn pop(&mut self, buffered: usize) -> Option<Message> {
        if let Some(m) = self.control.pop_front() {
            return Some(m);
        }
        if buffered < WRITE_LOW_WATER {
            return self.chunks.pop_front();
        }
        None
    }
}

/// Whether `msg` is a file chunk (the bulk of a transfer; everything else is control): a
/// [`Transfer::Chunk`], or a [`Transfer::FileChunk`] still in its file.
pub fn is_chunk(msg: &Message) -> bool {
    matches!(msg, Message::Transfer(t) if matches!(**t, Transfer::Chunk { .. } | Transfer::FileChunk { .. }))
}

/// The transfer of a chunk.
fn chunk_id(msg: &Message) -> Option<u64> {
    match msg {
        Message::Transfer(t) => match **t {
            Transfer::Chunk { id, .. } | Transfer::FileChunk { id, .. } => Some(id),
            _ => None,
        },
        _ => None,
    }
}

/// `msg` as it goes on the wire, for a wire that moves messages rather than bytes: a
/// [`Transfer::FileChunk`] becomes the [`Transfer::Chunk`] of its bytes (read now, zeros
/// where they cannot be, as [`crate::file::ChunkFile::read_into`]); any other message is
/// itself.
pub fn to_wire(msg: Message) -> Message {
    match msg {
        Message::Transfer(mut t) => {
            if let Transfer::FileChunk {
                id,
                offset,
                len,
                file,
            } = &*t
            {
                *t = Transfer::Chunk {
                    id: *id,
                    offset: *offset,
                    data: file.read(*offset, *len),
                };
            }
            Message::Transfer(t)
        }
        msg => msg,
    }
}

#[cfg(test)]
mod tests;
