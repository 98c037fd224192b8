//! Opening the files a user names (key, identity, journal) without ever blocking on them.
//!
//! A path given on the command line may name a FIFO, a directory, a socket or a device.
//! Opening a FIFO for reading waits for a writer, possibly forever, so a node given one as
//! `--key-file` would never start. [`open_regular`] opens with `O_NONBLOCK` (which makes the
//! open itself return at once whatever the file is) and then checks, on the open file
//! descriptor (`fstat`), that it is a regular file: there is no window between a check and
//! the open in which the path could be swapped for a FIFO. `O_NONBLOCK` has no effect on
//! reads and writes of a regular file.
//!
//! Symbolic links are followed: a key mounted as a symlink (as Kubernetes mounts secrets)
//! is the regular file it points to.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Opens `path` with `opts` (plus `O_NONBLOCK` on Unix) and returns the file only if it is
/// a regular file; anything else is an [`io::ErrorKind::InvalidInput`] error that says what
/// the path is (`a FIFO`, `a directory`, ...).
pub fn open_regular(path: &Path, opts: &mut OpenOptions) -> io::Result<File> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = match opts.open(path) {
        Ok(f) => f,
        // Opening a directory for writing fails before there is a descriptor to look at.
        Err(e) if e.kind() == io::ErrorKind::IsADirectory => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file (it is a directory)",
            ))
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    Ok(file)
}

/// Opens `path` for reading with [`open_regular`].
pub fn open_regular_read(path: &Path) -> io::Result<File> {
    open_regular(path, OpenOptions::new().read(true))
}

fn not_regular(meta: &std::fs::Metadata) -> io::Error {
    let ft = meta.file_type();
    let what = if ft.is_dir() {
        "a directory"
    } else {
        kind_of_special(&ft)
    };
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file (it is {what})"),
    )
}

#[cfg(unix)]
fn kind_of_special(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "not a file"
    }
}

#[cfg(not(unix))]
fn kind_of_special(_ft: &std::fs::FileType) -> &'static str {
    "not a file"
}

/// Buffers of file chunks going out, kept for reuse once a connection has written them (at
/// most this many, 63 KiB each, 4 MiB a process: a receiver's default credit lets that
/// many chunks of one file be in flight).
const POOLED_CHUNKS: usize = 64;

static CHUNK_POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// A chunk's buffer, back to the pool when the chunk is dropped.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        let mut pool = CHUNK_POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOLED_CHUNKS {
            pool.push(buf);
        }
    }
}

/// A buffer of `len` bytes that an earlier chunk used, once written and dropped (a new
/// one when none is free), zeroed only where the buffer's last chunk did not reach.
fn pooled(len: usize) -> Vec<u8> {
    let mut buf = CHUNK_POOL
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop()
        .unwrap_or_default();
    buf.resize(len, 0);
    buf
}

/// Reads the `len` bytes at `offset` of `file` (a file chunk going out) into a buffer an
/// earlier chunk used, once written and dropped: no new memory, and nothing zeroed that the
/// read overwrites (a fresh buffer is zeroed first; reading into an unzeroed one with
/// `Read::take(..).read_to_end` cost more `read` calls than the zeroing).
pub fn read_chunk(file: &File, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
    use std::os::unix::fs::FileExt;
    let mut buf = pooled(len);
    file.read_exact_at(&mut buf, offset)?;
    Ok(bytes::Bytes::from_owner(Pooled(buf)))
}

/// An open file whose chunks go out by range ([`crate::message::Transfer::FileChunk`]): the
/// connection's driver reads each chunk's bytes from it when it writes the chunk (into
/// the chunk's frame in the write buffer with a key; without one into a recycled buffer
/// over loopback, or by `sendfile(2)` straight to the socket to another machine), so the
/// sender holds no window of them. Shared by the transfer that
/// made the chunks and the driver that sends them.
///
/// A file that ends before a chunk it had when it was offered (truncated while it is
/// sent), or that cannot be read, is sent as zeros for the missing bytes, so the frame on
/// the wire stays whole; [`ChunkFile::cut`] then says what happened, for the sender to
/// give the transfer up (and the receiver's hash check fails on those bytes anyway).
#[derive(Clone)]
pub struct ChunkFile(std::sync::Arc<Source>);

struct Source {
    file: File,
    /// Why a chunk's bytes could not be read, once one could not.
    cut: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for ChunkFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkFile")
            .field("cut", &self.cut())
            .finish_non_exhaustive()
    }
}

/// The same open file (the same transfer's chunks).
impl PartialEq for ChunkFile {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ChunkFile {}

impl ChunkFile {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> io::Result<ChunkFile> {
        File::open(path).map(ChunkFile::new)
    }

    /// The chunks of `file`.
    pub fn new(file: File) -> ChunkFile {
        ChunkFile(std::sync::Arc::new(Source {
            file,
            cut: std::sync::OnceLock::new(),
        }))
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.0.file
    }

    /// Why a chunk's bytes could not be read from the file (it ended early, or a read
    /// failed), if that happened: the bytes sent in their place were zeros.
    pub fn cut(&self) -> Option<&str> {
        self.0.cut.get().map(String::as_str)
    }

    /// Records why a chunk's bytes could not be read (the first reason is kept).
    pub fn mark_cut(&self, why: String) {
        let _ = self.0.cut.set(why);
    }

    /// Records that the file ended at `at` inside the chunk `offset + len`.
    pub fn mark_ended(&self, at: u64, offset: u64, len: usize) {
        self.mark_cut(format!(
            "the file ended at byte {at}, inside the chunk of {len} bytes at {offset} it had \
             when it was offered (it was truncated while it was sent)"
        ));
    }

    /// Appends the `len` bytes at `offset` to `dst` (the chunk's place in its frame), or
    /// zeros where they cannot be read (recorded: [`ChunkFile::cut`]).
    pub fn read_into(&self, offset: u64, len: usize, dst: &mut bytes::BytesMut) {
        use std::os::unix::fs::FileExt;
        let start = dst.len();
        // Zeroed first: filling the buffer's spare room without zeroing it needs unsafe
        // code, which the workspace denies (the memset is in the cache the read fills).
        dst.resize(start + len, 0);
        let mut done = 0;
        while done < len {
            match self
                .0
                .file
                .read_at(&mut dst[start + done..], offset + done as u64)
            {
                Ok(0) => {
                    self.mark_ended(offset + done as u64, offset, len);
                    dst[start + done..].fill(0);
                    return;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.mark_cut(format!("reading {len} bytes at {offset}: {e}"));
                    dst[start + done..].fill(0);
                    return;
                }
            }
        }
    }

    /// The `len` bytes at `offset` in a buffer an earlier chunk used (as [`read_chunk`]),
    /// zeros where they cannot be read (recorded: [`ChunkFile::cut`]).
    pub fn read(&self, offset: u64, len: usize) -> bytes::Bytes {
        use std::os::unix::fs::FileExt;
        let mut buf = pooled(len);
        let mut done = 0;
        while done < len {
            match self.0.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    self.mark_ended(offset + done as u64, offset, len);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.mark_cut(format!("reading {len} bytes at {offset}: {e}"));
                    break;
                }
            }
        }
        // What an earlier chunk left there is not this file's.
        buf[done..].fill(0);
        bytes::Bytes::from_owner(Pooled(buf))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Chunks read into recycled buffers hold exactly the file's bytes, whatever the
    /// buffer held before (a longer chunk, then a shorter one, then a longer one), and a
    /// read past the end fails.
    #[test]
    fn chunks_read_into_recycled_buffers_are_the_files_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&f, &bytes).unwrap();
        let file = File::open(&f).unwrap();
        for (offset, len) in [
            (0, 64_512),
            (64_512, 1_000),
            (65_512, 64_512),
            (299_000, 1_000),
        ] {
            let c = read_chunk(&file, offset as u64, len).unwrap();
            assert_eq!(&c[..], &bytes[offset..offset + len], "{offset}+{len}");
        }
        let held: Vec<_> = (0..4)
            .map(|i| read_chunk(&file, i * 64_512, 64_512).unwrap())
            .collect();
        for (i, c) in held.iter().enumerate() {
            assert_eq!(&c[..], &bytes[i * 64_512..(i + 1) * 64_512]);
        }
        drop(held);
        assert!(read_chunk(&file, 299_000, 2_000).is_err());
        assert!(CHUNK_POOL.lock().unwrap().len() <= POOLED_CHUNKS);
    }

    #[test]
    fn a_regular_file_opens_and_a_directory_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        assert!(open_regular_read(&f).is_ok());
        let e = open_regular_read(dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = open_regular(dir.path(), OpenOptions::new().append(true)).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = open_regular_read(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_at_once_for_reading_and_for_writing() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Without O_NONBLOCK this open would wait for a writer forever.
        let e = open_regular_read(&fifo).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        // Opening a FIFO for writing with no reader fails at once (ENXIO) too.
        let e = open_regular(&fifo, OpenOptions::new().append(true)).unwrap_err();
        assert!(!e.to_string().is_empty());
        let e = open_regular_read(Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
    }
}
