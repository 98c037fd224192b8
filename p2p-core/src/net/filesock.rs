//! A TCP socket that writes file chunks with `sendfile(2)`: the chunk's frame head from
//! memory, then its bytes straight from the file to the socket, never copied into this
//! process. Used without a key for peers on other machines (not over loopback: see
//! `handshake::boxed`); the driver hands a [`crate::message::Transfer::FileChunk`] to
//! [`FileSocket::start_chunk`], and what the socket does not take at once (it is
//! non-blocking) stays here as the chunk's tail: every later write on the socket (the
//! write buffer's frames, the next chunk) first finishes that tail, so the bytes on the
//! wire are in order whoever writes next.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::file::ChunkFile;

/// The longest frame head of a chunk: its length prefix and the chunk's header (message
/// and transfer variants, id, offset, length: at most 2 + 9 + 9 + 9 bytes).
pub(super) const MAX_HEAD: usize = crate::codec::LENGTH_PREFIX + 29;

/// Zeros for the bytes of a chunk its file no longer has (see [`ChunkFile::cut`]).
static ZEROS: [u8; 16 * 1024] = [0; 16 * 1024];

/// The part of a chunk not written yet: the rest of its head, then of its bytes.
struct Tail {
    head: [u8; MAX_HEAD],
    /// `head[at..end]` is still to be written.
    at: usize,
    end: usize,
    file: ChunkFile,
    /// The next byte of the file to send, and how many are left.
    offset: u64,
    left: usize,
    /// The file ended (or failed): the rest of the chunk goes as zeros.
    zeros: bool,
}

impl Tail {
    fn len(&self) -> usize {
        self.end - self.at + self.left
    }
}

/// A TCP stream that sends file chunks by `sendfile(2)` (see the module documentation).
pub(super) struct FileSocket {
    tcp: TcpStream,
    tail: Option<Tail>,
}

impl FileSocket {
    pub(super) fn new(tcp: TcpStream) -> FileSocket {
        FileSocket { tcp, tail: None }
    }

    /// Bytes of a chunk not written yet.
    pub(super) fn unsent(&self) -> usize {
        self.tail.as_ref().map_or(0, Tail::len)
    }

    /// Starts writing the frame of a chunk: `head` (its length prefix and header, at most
    /// [`MAX_HEAD`] bytes), then the `len` bytes at `offset` of `file`. Only when nothing
    /// of an earlier chunk is left ([`FileSocket::unsent`] is 0); then
    /// [`FileSocket::poll_tail`] writes it.
    pub(super) fn start_chunk(&mut self, head: &[u8], file: ChunkFile, offset: u64, len: usize) {
        debug_assert!(self.tail.is_none(), "a chunk started over another's tail");
        let mut h = [0; MAX_HEAD];
        let end = head.len().min(MAX_HEAD);
        h[..end].copy_from_slice(&head[..end]);
        self.tail = Some(Tail {
            head: h,
            at: 0,
            end,
            file,
            offset,
            left: len,
            zeros: false,
        });
    }

    /// Writes what is left of the current chunk; `Ready(Ok)` once none is (at once when
    /// there is no chunk). `Pending` while the socket's buffer is full: the task is woken
    /// when it has room. A file that ends early (or fails) is finished with zeros, recorded
    /// in its [`ChunkFile::cut`]: never a frame cut short, never a loop on a read of 0.
    pub(super) fn poll_tail(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let FileSocket { tcp, tail } = self;
        while let Some(t) = tail.as_mut() {
            if t.at < t.end {
                ready!(tcp.poll_write_ready(cx))?;
                // `MORE`: the head waits for the bytes behind it, not a packet of its own.
                let sent = tcp.try_io(Interest::WRITABLE, || {
                    rustix::net::send(
                        &*tcp,
                        &t.head[t.at..t.end],
                        rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL,
                    )
                    .map_err(io::Error::from)
                });
                match sent {
                    Ok(n) => t.at += n,
                    Err(e) if retry(&e) => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            } else if t.left == 0 {
                *tail = None;
            } else if t.zeros {
                let n = t.left.min(ZEROS.len());
                let n = ready!(Pin::new(&mut *tcp).poll_write(cx, &ZEROS[..n]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                t.left -= n;
            } else {
                ready!(tcp.poll_write_ready(cx))?;
                let mut at = t.offset;
                let sent = tcp.try_io(Interest::WRITABLE, || {
                    rustix::fs::sendfile(&*tcp, t.file.file(), Some(&mut at), t.left)
                        .map_err(io::Error::from)
                });
                match sent {
                    // The file ends before the chunk does: it was truncated under us.
                    Ok(0) => {
                        t.file.mark_ended(t.offset, t.offset, t.left);
                        t.zeros = true;
                    }
                    Ok(n) => {
                        let n = n.min(t.left);
                        t.offset += n as u64;
                        t.left -= n;
                    }
                    Err(e) if retry(&e) => {}
                    // The socket's errors end the connection; the file's (EIO) end only
                    // this chunk's bytes, replaced by zeros (a socket that failed fails
                    // their write too).
                    Err(e) if is_socket_error(&e) => return Poll::Ready(Err(e)),
                    Err(e) => {
                        t.file
                            .mark_cut(format!("sending {} bytes at {}: {e}", t.left, t.offset));
                        t.zeros = true;
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The socket is full (try again once it has room: `poll_write_ready` waits), or a signal.
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

fn is_socket_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::TimedOut
    )
}

impl AsyncRead for FileSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for FileSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_tail(cx))?;
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_tail(cx))?;
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_tail(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_tail(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
