//! Where an incoming file's bytes go: hashed on the caller's thread as each chunk comes,
//! written inline (a small file) or by a thread of its own (a large one), into a file whose
//! blocks are reserved ahead of its writes. A node's inputs ([`crate::node_files`]) and a
//! coordinator's fetched outputs ([`crate::run_files`]) are both written so.

use std::io::Write;

use bytes::Bytes;
use p2p_core::transfer::Hasher;
use p2p_core::ContentHash;

/// Files larger than this are written by a thread of their own ([`Writer`]).
const THREADED_WRITE: u64 = 1024 * 1024;

/// Most writer threads of a process at once; a file that finds none free is written
/// inline (so a peer announcing many files cannot make a node start threads without end).
pub const MAX_WRITERS: usize = 16;

static WRITERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Gives a writer thread's place back when the thread ends.
struct WriterPermit;

impl WriterPermit {
    fn take() -> Option<WriterPermit> {
        use std::sync::atomic::Ordering;
        WRITERS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_WRITERS).then_some(n + 1)
            })
            .ok()
            .map(|_| WriterPermit)
    }
}

impl Drop for WriterPermit {
    fn drop(&mut self) {
        WRITERS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The bytes of an incoming file that go to its writer thread at once: about 1 MiB of its
/// chunks (seventeen of a sender's 63 KiB), handed over as they came, slices of the
/// connection's read buffers (with or without a key: `FrameCodec::share_chunks`), so no
/// byte of them is copied on the connection's thread (which hashes them as they come, see
/// [`ThreadWriter::write`]); the writer writes them with `writev`, then drops them, which
/// lets the codec take their read buffers again. The hand-over (a wake-up of one thread or
/// the other) is paid once a mebibyte: chunks handed over four at a time made a receiving
/// node switch threads 11,000 times a GiB. The chunks' memory is the codec's recycled read
/// buffers, so dropping them on the writer's thread frees nothing (freeing chunks of their
/// own there, sixteen at a time, made glibc give memory back and fault it in again: 17,000
/// page faults a GiB against 1,800).
const BATCH_BYTES: usize = 1024 * 1024;

/// Most chunks in one batch, whatever their size: a peer sending tiny chunks makes small
/// batches handed over more often, not a batch of a million chunks.
const BATCH_CHUNKS: usize = 64;

/// Batches of one incoming file out at once: one filling, one queued, one being written.
/// When all are out, the connection waits for the disk (as it did when every write was
/// made inline), so what one file holds in its writer's hands stays bounded: this many
/// batches, at most [`BATCH_BYTES`] (plus one chunk) or [`BATCH_CHUNKS`] chunks each, and
/// the read buffers they pin (the sharing codec's parked buffers, a fixed pool: past it
/// the codec copies chunks out rather than pin more).
const BATCH_BUFFERS: usize = 3;

/// The writer thread writes this many bytes of a batch at once (one `writev`).
const WRITE_PIECE: usize = 256 * 1024;

/// The hash of an incoming file is fed pieces that start and end on multiples of this many
/// bytes of the file ([`EdgeHasher`]): BLAKE3 hashes a piece in subtrees no larger than the
/// piece's offset allows, so 63 KiB pieces fall back to narrow SIMD at their edges (1, 2,
/// 4 KiB subtrees: an eighth to a third more hashing, measured). 16 KiB is AVX-512's
/// widest batch of BLAKE3 chunks; what is staged is at most this much a chunk, copied in a
/// buffer that stays in the core's cache.
const HASH_EDGE: usize = 16 * 1024;

/// Where an incoming file's bytes are hashed and written. The hash is always taken on the
/// caller's (the connection's) thread, as each chunk comes, while its bytes are still in
/// that core's cache; a small file is written there too, a large one by a thread of its
/// own, so the disk's writes overlap with the socket's reads, the decryption and the hash.
/// Measured on a 1 GiB input over loopback (perf samples of the receiving node, three
/// runs each): the writer thread hashing took 2,071-2,653 samples of both threads
/// together, the connection's thread hashing 1,750-1,962, and the writer, the longest
/// stage, went from 1,436-2,112 to 749-870 (BLAKE3 reading the chunks from the other
/// core's cache cost it about twice what it costs the connection's thread). Dropped before
/// the end, the file goes (the thread ends with the queue).
pub(crate) enum Writer {
    Inline(tempfile::NamedTempFile, Box<Hasher>),
    Thread(Box<ThreadWriter<Reserving>>),
}

/// A large incoming file's disk blocks are reserved (`fallocate`, keeping the file's
/// length) this many bytes ahead of its writes, up to the size it was offered with. The
/// file system then allocates its blocks in runs rather than page by page as the writes
/// come: writing 1 GiB into ext4 took 0.16-0.19 s of CPU (median of five) reserved 8 MiB
/// ahead, against 0.23-0.36 s (0.255) written plain, the same as reserving the whole file
/// at once. A step, not the whole size, so that a peer offering a large file and sending
/// nothing holds at most this much of the disk a transfer.
const RESERVE_STEP: u64 = 8 << 20;

/// A file written from its start, whose blocks are reserved [`RESERVE_STEP`] ahead of its
/// writes and never past `size`: a file written whole holds no block beyond its end. A
/// full disk (or quota) fails the write that needed the reservation, as the write itself
/// would have; a file system that cannot reserve is written plain.
pub(crate) struct Reserving {
    file: tempfile::NamedTempFile,
    /// The length the file will have.
    size: u64,
    /// Bytes written so far.
    written: u64,
    /// The file's first bytes whose blocks are reserved (or `size` when the file system
    /// cannot reserve).
    reserved: u64,
}

impl Reserving {
    fn new(file: tempfile::NamedTempFile, size: u64) -> Reserving {
        Reserving {
            file,
            size,
            written: 0,
            reserved: 0,
        }
    }

    /// Reserves the blocks for the next `len` bytes, a step ahead, before they are written.
    fn ahead(&mut self, len: usize) -> std::io::Result<()> {
        let end = self.written.saturating_add(len as u64);
        if end <= self.reserved || self.reserved >= self.size {
            return Ok(());
        }
        let to = end
            .max(self.reserved.saturating_add(RESERVE_STEP))
            .min(self.size);
        let flags = rustix::fs::FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(
            self.file.as_file(),
            flags,
            self.reserved,
            to - self.reserved,
        ) {
            Ok(()) => self.reserved = to,
            Err(e) if e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::DQUOT => {
                return Err(e.into());
            }
            // Not supported here (or not for this kind of file): written plain.
            Err(_) => self.reserved = self.size,
        }
        Ok(())
    }
}

impl Write for Reserving {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.ahead(buf.len())?;
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.ahead(bufs.iter().map(|b| b.len()).sum())?;
        let n = self.file.write_vectored(bufs)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A [`Writer`] with a thread of its own, writing into `W`.
pub(crate) struct ThreadWriter<W> {
    /// Full batches to the thread (at most one waiting).
    queue: Option<std::sync::mpsc::SyncSender<Vec<Bytes>>>,
    /// Batches the thread wrote (emptied), back for refilling.
    back: std::sync::mpsc::Receiver<Vec<Bytes>>,
    /// The batch being filled.
    batch: Vec<Bytes>,
    /// Bytes in `batch`.
    bytes: usize,
    /// Batches made so far (at most [`BATCH_BUFFERS`]).
    made: usize,
    /// The hash of the bytes written so far, taken on the caller's thread (see
    /// [`ThreadWriter::write`]).
    hasher: EdgeHasher,
    done: Option<std::thread::JoinHandle<(W, std::io::Result<()>)>>,
}

/// A hasher fed in pieces whose edges are multiples of [`HASH_EDGE`] bytes of the stream
/// (but the last): the bytes around an edge inside a chunk are staged. Hashes what it is
/// fed in order, however it is cut (a test checks this against one `hash_bytes`).
#[derive(Default)]
struct EdgeHasher {
    hasher: Hasher,
    /// The bytes since the last edge when they did not reach the next one (under
    /// [`HASH_EDGE`]).
    stage: Vec<u8>,
}

impl EdgeHasher {
    fn update(&mut self, mut data: &[u8]) {
        if !self.stage.is_empty() {
            let take = (HASH_EDGE - self.stage.len()).min(data.len());
            let (head, rest) = data.split_at(take);
            self.stage.extend_from_slice(head);
            data = rest;
            if self.stage.len() < HASH_EDGE {
                return;
            }
            self.hasher.update(&self.stage);
            self.stage.clear();
        }
        let (whole, tail) = data.split_at(data.len() - data.len() % HASH_EDGE);
        if !whole.is_empty() {
            self.hasher.update(whole);
        }
        if !tail.is_empty() {
            if self.stage.capacity() == 0 {
                self.stage.reserve_exact(HASH_EDGE);
            }
            self.stage.extend_from_slice(tail);
        }
    }

    fn finish(mut self) -> Hasher {
        self.hasher.update(&self.stage);
        self.hasher
    }
}

/// Writes all of `bufs` with vectored writes (`writev`), however much each call takes.
fn write_all_vectored<W: Write>(
    w: &mut W,
    mut bufs: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    std::io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The writer thread's work: writes every batch that comes, up to [`WRITE_PIECE`] or
/// [`BATCH_CHUNKS`] chunks at a time, then drops its chunks and gives the emptied batch
/// back. Stops at the first error (the queue closes: the connection's side sees it at its
/// next hand-over) or when the queue ends.
fn write_batches<W: Write>(
    file: &mut W,
    batches: &std::sync::mpsc::Receiver<Vec<Bytes>>,
    give_back: &std::sync::mpsc::Sender<Vec<Bytes>>,
) -> std::io::Result<()> {
    for mut batch in batches {
        let mut from = 0;
        while from < batch.len() {
            let mut to = from;
            let mut bytes = 0;
            while to < batch.len() && bytes < WRITE_PIECE && to - from < BATCH_CHUNKS {
                bytes += batch[to].len();
                to += 1;
            }
            let piece = &batch[from..to];
            // A piece is at most BATCH_CHUNKS chunks: room for all of them here.
            let mut io = [std::io::IoSlice::new(&[]); BATCH_CHUNKS];
            for (s, c) in io.iter_mut().zip(piece) {
                *s = std::io::IoSlice::new(c);
            }
            write_all_vectored(file, &mut io[..piece.len()])?;
            from = to;
        }
        // The chunks go here: their read buffers are the codec's to take again.
        batch.clear();
        // The connection's side may be gone (the transfer ended): then the batch is freed
        // here.
        let _ = give_back.send(batch);
    }
    Ok(())
}

impl Writer {
    pub(crate) fn new(file: tempfile::NamedTempFile, size: u64) -> std::io::Result<Writer> {
        match WriterPermit::take() {
            Some(p) if size > THREADED_WRITE => Ok(Writer::Thread(Box::new(ThreadWriter::spawn(
                Reserving::new(file, size),
                Some(p),
            )?))),
            _ => Ok(Writer::Inline(file, Box::default())),
        }
    }

    /// Hashes and writes `data` at the end, or adds it to the batch for the thread
    /// (waiting, at the disk's pace, while every batch is out). An error of the thread
    /// comes from here or from [`Writer::finish`].
    pub(crate) fn write(&mut self, data: Bytes) -> std::io::Result<()> {
        match self {
            Writer::Inline(f, h) => {
                h.update(&data);
                f.write_all(&data)
            }
            Writer::Thread(t) => t.write(data),
        }
    }

    /// Waits for every byte to be written; the file and the hash of its bytes.
    pub(crate) fn finish(self) -> std::io::Result<(tempfile::NamedTempFile, ContentHash)> {
        match self {
            Writer::Inline(f, h) => Ok((f, h.finish())),
            Writer::Thread(t) => t.finish().map(|(r, hash)| (r.file, hash)),
        }
    }
}

impl<W: Write + Send + 'static> ThreadWriter<W> {
    /// A thread writing into `file`, holding `permit` (its place among [`MAX_WRITERS`])
    /// while it runs.
    fn spawn(mut file: W, permit: Option<WriterPermit>) -> std::io::Result<ThreadWriter<W>> {
        let (queue, batches) = std::sync::mpsc::sync_channel::<Vec<Bytes>>(1);
        let (give_back, back) = std::sync::mpsc::channel::<Vec<Bytes>>();
        let done = std::thread::Builder::new()
            .name("p2p-write".into())
            .spawn(move || {
                let _permit = permit;
                let r = write_batches(&mut file, &batches, &give_back);
                (file, r)
            })?;
        Ok(ThreadWriter {
            queue: Some(queue),
            back,
            batch: Vec::with_capacity(BATCH_CHUNKS),
            bytes: 0,
            made: 1,
            hasher: EdgeHasher::default(),
            done: Some(done),
        })
    }

    /// Hashes `data` (here, on the caller's thread), adds it to the batch, and hands the
    /// batch over once full.
    fn write(&mut self, data: Bytes) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.hasher.update(&data);
        self.bytes += data.len();
        self.batch.push(data);
        if self.bytes >= BATCH_BYTES || self.batch.len() >= BATCH_CHUNKS {
            self.hand_over()?;
        }
        Ok(())
    }

    /// Waits for every byte to be written; the file and the hash of its bytes.
    fn finish(mut self) -> std::io::Result<(W, ContentHash)> {
        if !self.batch.is_empty() {
            self.hand_over()?;
        }
        drop(self.queue.take());
        match self.done.take().map(std::thread::JoinHandle::join) {
            Some(Ok((f, Ok(())))) => Ok((f, self.hasher.finish().finish())),
            Some(Ok((_, Err(e)))) => Err(e),
            _ => Err(std::io::Error::other("the file's writer stopped")),
        }
    }

    /// Gives the thread the batch filled so far and takes an empty one: a batch the thread
    /// gave back, a new one while fewer than [`BATCH_BUFFERS`] exist, else the next one the
    /// thread gives back (waiting for it).
    fn hand_over(&mut self) -> std::io::Result<()> {
        let next = match self.back.try_recv() {
            Ok(b) => Some(b),
            Err(_) if self.made < BATCH_BUFFERS => {
                self.made += 1;
                Some(Vec::with_capacity(BATCH_CHUNKS))
            }
            Err(_) => None,
        };
        let full = std::mem::take(&mut self.batch);
        self.bytes = 0;
        let sent = self.queue.as_ref().is_some_and(|q| q.send(full).is_ok());
        let next = match next {
            Some(b) if sent => Some(b),
            _ if sent => self.back.recv().ok(),
            _ => None,
        };
        if let Some(b) = next {
            self.batch = b;
            return Ok(());
        }
        // The thread stopped: its error.
        self.queue.take();
        match self.done.take().map(std::thread::JoinHandle::join) {
            Some(Ok((_, Err(e)))) => Err(e),
            _ => Err(std::io::Error::other("the file's writer stopped")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use p2p_core::transfer;
    use p2p_core::Transfer;
    use std::sync::{Arc, Mutex};

    /// The writer threads are counted per process: one test at a time takes them.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn a_large_file_is_written_whole_by_its_thread_and_a_small_one_inline() {
        let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let d = tempfile::tempdir().unwrap();
        // A size that leaves a last batch of fewer chunks, and one written inline.
        // Sizes that leave a last batch part full, that end on a batch's last byte, and one
        // written inline; in chunks of 63 KiB (a sender's) and 64 KiB, so chunks straddle
        // the batches' boundaries.
        let cases = [
            ((3 << 20) + 12_345, 64 * 1024, true),
            ((7 << 20) + 1, 63 * 1024, true),
            (4 * BATCH_BYTES, 63 * 1024, true),
            (100_000, 64 * 1024, false),
        ];
        for (len, piece, threaded) in cases {
            let file = tempfile::NamedTempFile::new_in(d.path()).unwrap();
            let mut w = Writer::new(file, len as u64).unwrap();
            assert_eq!(matches!(w, Writer::Thread { .. }), threaded);
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let parts: Vec<Vec<u8>> = bytes.chunks(piece).map(<[u8]>::to_vec).collect();
            for c in &parts {
                w.write(Bytes::copy_from_slice(c)).unwrap();
                if let Writer::Thread(t) = &w {
                    // Memory stays bounded whatever the file's size.
                    assert!(t.made <= BATCH_BUFFERS);
                    assert!(t.batch.len() < BATCH_CHUNKS && t.bytes < BATCH_BYTES);
                }
            }
            let (f, hash) = w.finish().unwrap();
            assert_eq!(std::fs::read(f.path()).unwrap(), parts.concat());
            assert_eq!(hash, transfer::hash_bytes(&parts.concat()));
        }
    }

    /// A writer thread that fails (a full disk) stops the connection's side with its error,
    /// however many batches were waiting: it never waits for a buffer the thread will not
    /// give back.
    #[test]
    fn a_writer_on_a_full_disk_fails_with_its_error_and_does_not_hang() {
        let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let d = tempfile::tempdir().unwrap();
        let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
            return;
        };
        let path = tempfile::TempPath::try_from_path(d.path().join("never")).unwrap();
        let file = tempfile::NamedTempFile::from_parts(full, path);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut w = Writer::new(file, 64 << 20).unwrap();
            let piece = Bytes::from(vec![3u8; 63 * 1024]);
            let mut r = Ok(());
            for _ in 0..1024 {
                r = w.write(piece.clone());
                if r.is_err() {
                    break;
                }
            }
            let r = r.and_then(|()| w.finish().map(|_| ()));
            let _ = tx.send(r);
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the writer hung");
        let e = r.unwrap_err();
        // A full disk: what the node's side tells its peer as `NoSpace`.
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
    }

    /// A large file's blocks are reserved a step ahead of its writes (where the file system
    /// can), never past the size it was offered with, and it holds exactly its bytes.
    #[test]
    fn a_reserving_file_reserves_ahead_of_its_writes_and_never_past_its_size() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let probe = tempfile::NamedTempFile::new_in(d.path()).unwrap();
        let can = rustix::fs::fallocate(
            probe.as_file(),
            rustix::fs::FallocateFlags::KEEP_SIZE,
            0,
            4096,
        )
        .is_ok();
        let disk = |r: &Reserving| r.file.as_file().metadata().unwrap().blocks() * 512;
        for size in [2 * RESERVE_STEP + 12_345, RESERVE_STEP, 1000] {
            let mut r = Reserving::new(tempfile::NamedTempFile::new_in(d.path()).unwrap(), size);
            let bytes: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
            let (first, rest) = bytes.split_at(bytes.len().min(1000));
            r.write_all(first).unwrap();
            if can {
                // The first write reserved the first step (or the whole, smaller file).
                assert!(disk(&r) >= RESERVE_STEP.min(size), "{size}: {}", disk(&r));
            }
            for piece in rest.chunks(300_000) {
                let (a, b) = piece.split_at(piece.len() / 2);
                let io = [std::io::IoSlice::new(a), std::io::IoSlice::new(b)];
                write_all_vectored(&mut r, &mut io.clone()).unwrap();
                assert!(r.reserved <= size);
            }
            assert_eq!(r.written, size);
            // No block past the end: the size in whole 4 KiB blocks, and the file system's
            // own few blocks of metadata.
            assert!(
                disk(&r) <= size.div_ceil(4096) * 4096 + 64 * 1024,
                "{size}: {}",
                disk(&r)
            );
            assert_eq!(std::fs::read(r.file.path()).unwrap(), bytes);
        }
        // Bytes past the offered size (the receiver refuses them before they get here) are
        // written plain, with nothing more reserved.
        let mut r = Reserving::new(tempfile::NamedTempFile::new_in(d.path()).unwrap(), 10);
        r.write_all(&[1u8; 5000]).unwrap();
        assert_eq!((r.written, r.reserved), (5000, 10));
    }

    #[test]
    fn a_writer_dropped_midway_leaves_no_file_and_gives_its_thread_back() {
        let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let d = tempfile::tempdir().unwrap();
        let file = tempfile::NamedTempFile::new_in(d.path()).unwrap();
        let path = file.path().to_path_buf();
        let mut w = Writer::new(file, 3 << 20).unwrap();
        w.write(Bytes::from(vec![7u8; 65_536])).unwrap();
        drop(w);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while path.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!path.exists());
        // However many files are announced, at most MAX_WRITERS threads run.
        let many: Vec<Writer> = (0..MAX_WRITERS + 4)
            .map(|_| {
                let f = tempfile::NamedTempFile::new_in(d.path()).unwrap();
                Writer::new(f, 3 << 20).unwrap()
            })
            .collect();
        let threads = many
            .iter()
            .filter(|w| matches!(w, Writer::Thread { .. }))
            .count();
        assert!(threads <= MAX_WRITERS, "{threads}");
        assert!(many.iter().any(|w| matches!(w, Writer::Inline(..))));
        drop(many);
        // Their threads end with their queues and give their places back.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while WRITERS.load(std::sync::atomic::Ordering::Acquire) > 0 {
            assert!(std::time::Instant::now() < deadline, "writer threads left");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A sink whose writes each wait for a permit (all pass once the permits' sender is
    /// gone), keeping what it was given.
    struct Gate {
        permits: std::sync::mpsc::Receiver<()>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.permits.recv();
            self.out.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer thread that does not keep up (its disk stalls) holds at most
    /// BATCH_BUFFERS batches: the connection's side waits in `write` instead of handing it
    /// more chunks (and pinning more read buffers). Once the disk goes on, every byte is
    /// written in order and hashed.
    #[test]
    fn a_stalled_writer_holds_at_most_three_batches_and_then_writes_them_all() {
        let (permit, permits) = std::sync::mpsc::channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let gate = Gate {
            permits,
            out: out.clone(),
        };
        let chunk = 63 * 1024;
        let per_batch = BATCH_BYTES.div_ceil(chunk);
        let n = 8 * per_batch;
        let file: Vec<u8> = (0..n * chunk).map(|i| (i % 253) as u8).collect();
        let file = Bytes::from(file);
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let pusher = {
            let (file, accepted) = (file.clone(), accepted.clone());
            std::thread::spawn(move || {
                let mut w = ThreadWriter::spawn(gate, None).unwrap();
                for i in 0..n {
                    w.write(file.slice(i * chunk..(i + 1) * chunk)).unwrap();
                    accepted.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
                w.finish().unwrap()
            })
        };
        // One batch in the thread's write, one queued, one filling: two full batches are
        // taken without waiting for the disk.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while accepted.load(std::sync::atomic::Ordering::Acquire) < 2 * per_batch {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer took too little"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        // Time for a writer without the bound to run ahead (it would take all n).
        std::thread::sleep(std::time::Duration::from_millis(200));
        let held = accepted.load(std::sync::atomic::Ordering::Acquire);
        assert_eq!(BATCH_BUFFERS, 3);
        assert!(held < 3 * per_batch, "{held} chunks taken");
        assert!(out.lock().unwrap().is_empty());
        // The disk goes on: a permit for the first write, then no more waiting.
        permit.send(()).unwrap();
        drop(permit);
        let (_, hash) = pusher.join().unwrap();
        assert_eq!(*out.lock().unwrap(), file[..]);
        assert_eq!(hash, transfer::hash_bytes(&file));
        // Every chunk the writer had was dropped: only `file` holds the bytes now.
        assert!(file.is_unique());
    }

    /// Chunks decoded as slices of a sharing codec's read buffers (as every connection's
    /// are) go to a writer that lags behind the connection: the codec goes on reading into
    /// other buffers, and a buffer comes back to it only once no chunk in it is alive, so
    /// the file is written as sent whatever the writer's pace (a buffer reused under a
    /// chunk still queued would corrupt it). And the chunks in the batches are the read
    /// buffers' bytes, not copies.
    #[test]
    fn chunks_written_from_the_read_buffers_are_never_overwritten_while_queued() {
        use tokio_util::codec::{Decoder, Encoder};
        struct Slow(Arc<Mutex<Vec<u8>>>);
        impl Write for Slow {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(std::time::Duration::from_micros(300));
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let len = (6 << 20) + 777;
        let file: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut codec = p2p_core::codec::FrameCodec::new(p2p_core::codec::DEFAULT_MAX_FRAME);
        codec.share_chunks();
        let mut wire = bytes::BytesMut::new();
        for (i, piece) in file.chunks(63 * 1024).enumerate() {
            let m = p2p_core::Message::Transfer(Box::new(Transfer::Chunk {
                id: 9,
                offset: (i * 63 * 1024) as u64,
                data: Bytes::copy_from_slice(piece),
            }));
            codec.encode(&m, &mut wire).unwrap();
        }
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut w = ThreadWriter::spawn(Slow(out.clone()), None).unwrap();
        let mut src = bytes::BytesMut::with_capacity(p2p_core::codec::CHUNK_READ_BUFFER);
        let (mut shared, mut chunks) = (0, 0);
        // Reads of odd sizes, as a socket gives them.
        for read in wire.chunks(100_003) {
            src.extend_from_slice(read);
            while let Some(m) = codec.decode(&mut src).unwrap() {
                let p2p_core::Message::Transfer(t) = m else {
                    panic!("not a transfer: {m:?}");
                };
                let Transfer::Chunk { data, .. } = *t else {
                    panic!("not a chunk");
                };
                chunks += 1;
                shared += usize::from(!data.is_unique());
                w.write(data).unwrap();
            }
        }
        let (_, hash) = w.finish().unwrap();
        assert_eq!(*out.lock().unwrap(), file);
        assert_eq!(hash, transfer::hash_bytes(&file));
        assert!(shared * 10 >= chunks * 9, "{shared} of {chunks} shared");
    }

    proptest::proptest! {
        /// However a file's bytes are cut into pieces, the staged hasher hashes them as one.
        #[test]
        fn the_edge_hasher_hashes_any_cut_as_one(
            cuts in proptest::collection::vec(0usize..70_000, 0..40),
        ) {
            let len: usize = cuts.iter().sum();
            let bytes: Vec<u8> = (0..len).map(|i| (i % 249) as u8).collect();
            let mut h = EdgeHasher::default();
            let mut at = 0;
            for c in &cuts {
                h.update(&bytes[at..at + c]);
                at += c;
                proptest::prop_assert!(h.stage.len() < HASH_EDGE);
                proptest::prop_assert_eq!(h.stage.len(), at % HASH_EDGE);
            }
            proptest::prop_assert_eq!(h.finish().finish(), transfer::hash_bytes(&bytes));
        }
    }
}
