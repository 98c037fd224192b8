//! The driver of an established link: moves frames between the socket and the
//! [`Connection`], commands in and events out, until the link closes.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tracing::{debug, warn};

use super::filesock::FileSocket;
use super::{
    Command, EventSender, HostedService, InstantService, LinkEvent, LinkId, ReplicaService,
    StatusSource, BATCH,
};
use crate::conn::{Connection, Event};
use crate::gate::{self, LogLimit};
use crate::hosted::Hosted;
use crate::message::{Message, StatusReport, Transfer};
use crate::secure::WireCodec;
use crate::{ConnectionError, Error};

/// A connected byte stream: a TCP socket, or another transport's.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The stream itself, to ask whether it is a [`FileSocket`].
    fn as_any(&self) -> &dyn std::any::Any;
    /// The same, mutable.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for S {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The transport's socket, when it sends file chunks by `sendfile(2)` (a TCP socket).
fn file_socket(io: &Transport) -> Option<&FileSocket> {
    // The boxed stream's own type, not the box's.
    (**io.get_ref()).as_any().downcast_ref::<FileSocket>()
}

fn file_socket_mut(io: &mut Transport) -> Option<&mut FileSocket> {
    (**io.get_mut()).as_any_mut().downcast_mut::<FileSocket>()
}

pub(super) type Transport = Framed<Box<dyn Io>, WireCodec>;

/// What a driver moves messages through: frames on a byte stream ([`Transport`]), or
/// `Message` values in memory ([`super::memory::Pipe`]).
pub(super) trait Wire:
    futures::Stream<Item = Result<Message, Error>>
    + futures::Sink<Message, Error = Error>
    + Unpin
    + Send
    + 'static
{
    /// What the sink holds unsent (bytes of a stream; messages in memory): chunks are held
    /// back above [`crate::transfer::WRITE_LOW_WATER`], and a peer that takes none of it
    /// for the idle timeout is dead.
    fn pending(&self) -> usize;
    /// Whether another message may be taken without waiting (frames in the read buffer).
    fn more_ready(&self) -> bool;
    /// Whether `poll_ready` is sure to be ready at once, with nothing to do (the writer
    /// holds less than its backpressure boundary): then it is not called. `false` when it
    /// must be asked.
    fn ready_now(&self) -> bool {
        false
    }
    /// Starts a batch of sends (with a key, sealed as one).
    fn begin_batch(&mut self) {}
    /// Ends a batch of sends.
    fn end_batch(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// How much the sink holds before `poll_ready` writes.
    fn set_backpressure_boundary(&mut self, _bytes: usize) {}
    /// Closes the write side, so the peer sees the end promptly.
    fn close_write(&mut self) -> impl std::future::Future<Output = ()> + Send + '_;
    /// Set once before the driver starts: file chunks decoded as slices of what was read,
    /// where the wire can (over a socket; with a key too, decrypted in place).
    fn share_chunks(&mut self) {}
    /// Sends the file chunk `chunk` and those queued behind it its own way, if this wire
    /// has one at the moment ([`write_chunks`]); gives it back otherwise, for the codec.
    fn send_chunks(
        &mut self,
        _conn: &mut Connection,
        chunk: Message,
    ) -> Result<Option<Message>, Error> {
        Ok(Some(chunk))
    }
    /// The bytes a chunk taken now would join behind, for
    /// [`Connection::poll_transmit_with`]: what the sink holds, unless the wire wants
    /// chunks only when it holds nothing.
    fn chunk_behind(&self) -> usize {
        self.pending()
    }
}

impl Wire for Transport {
    fn pending(&self) -> usize {
        // With the rest of a chunk the socket is still sending from its file.
        self.write_buffer().len() + file_socket(self).map_or(0, FileSocket::unsent)
    }

    fn ready_now(&self) -> bool {
        // `Framed::poll_ready` writes only at or over the boundary; under it, it is ready.
        self.write_buffer().len() < self.backpressure_boundary()
    }

    fn more_ready(&self) -> bool {
        // With a key, the rest of a decrypted batch the codec holds (the read buffer may be
        // empty then); without one, frames in the read buffer.
        matches!(self.codec(), WireCodec::Secure(_)) || !self.read_buffer().is_empty()
    }

    fn begin_batch(&mut self) {
        self.codec_mut().begin_batch();
    }

    fn end_batch(&mut self) -> Result<(), Error> {
        // Sealed straight into the write buffer (taken out for the call: it lives beside
        // the codec in the transport).
        let mut out = std::mem::take(self.write_buffer_mut());
        let sealed = self.codec_mut().end_batch(&mut out);
        *self.write_buffer_mut() = out;
        sealed
    }

    fn set_backpressure_boundary(&mut self, bytes: usize) {
        Framed::set_backpressure_boundary(self, bytes);
    }

    async fn close_write(&mut self) {
        let _ = self.get_mut().shutdown().await;
    }

    fn share_chunks(&mut self) {
        match self.codec_mut() {
            WireCodec::Plain(c) => c.share_chunks(),
            // With a key, a chunk is decrypted in place in the read buffer and decoded
            // there: its transport message's length and tag come with each frame.
            WireCodec::Secure(c) => c.frames_mut().share_chunks_in(2 + crate::secure::TAG_LEN),
        }
    }

    fn send_chunks(
        &mut self,
        conn: &mut Connection,
        chunk: Message,
    ) -> Result<Option<Message>, Error> {
        if self.pending() != 0 {
            return Ok(Some(chunk));
        }
        match self.codec() {
            WireCodec::Plain(_) if file_socket(self).is_some() && is_file_chunk(&chunk) => {
                send_file_chunks(self, conn, chunk)?
            }
            WireCodec::Plain(_) => write_chunks(self, conn, chunk)?,
            WireCodec::Secure(_) => seal_chunks(self, conn, chunk)?,
        }
        Ok(None)
    }

    fn chunk_behind(&self) -> usize {
        // With a key a chunk is sealed into the write buffer, and joins it only once it is
        // empty: appended behind bytes the socket did not take, it made the buffer move
        // those to its front, or grow and copy them (in callgrind, 43.5 M instructions of
        // a keyed sender's 466 M for a 64 MiB input, 255 times). Over a socket that sends
        // chunks from their files, a chunk waits for the socket to take everything before
        // it too, so that it goes by `sendfile` rather than copied into the buffer.
        let pending = self.pending();
        match self.codec() {
            WireCodec::Secure(_) if pending != 0 => usize::MAX,
            WireCodec::Plain(_) if pending != 0 && file_socket(self).is_some() => usize::MAX,
            _ => pending,
        }
    }
}

pub(super) fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Sends what the connection has queued. Cancel-safe: a message leaves the connection only
/// when the sink takes it at once, and bytes the sink still holds are flushed by the next call.
pub(super) async fn flush<W: Wire>(io: &mut W, conn: &mut Connection) -> Result<(), Error> {
    loop {
        if !io.ready_now() {
            futures::future::poll_fn(|cx| SinkExt::<Message>::poll_ready_unpin(io, cx)).await?;
        }
        let Some(msg) = conn.poll_transmit_by(|| io.chunk_behind()) else {
            if conn.has_transmit() && io.pending() != 0 {
                // A chunk waits for the writer to empty: write what it holds, then go on.
                SinkExt::<Message>::flush(io).await?;
                continue;
            }
            break;
        };
        let msg = if crate::transfer::is_chunk(&msg) {
            match io.send_chunks(conn, msg)? {
                Some(msg) => msg,
                None => continue,
            }
        } else {
            msg
        };
        // Every message that can be taken without waiting joins one batch: with a key, a
        // burst of small frames is encrypted as one transport message.
        io.begin_batch();
        let fed = feed_batch(io, conn, msg);
        io.end_batch()?;
        fed?;
    }
    if io.pending() != 0 {
        SinkExt::<Message>::flush(io).await?;
    }
    Ok(())
}

/// Without a key, with nothing else waiting to be written: a burst of file chunks (`first`,
/// then those queued behind it, up to [`crate::transfer::WRITE_BURST`] as through the
/// codec) goes to the socket in one vectored write from the chunks' own buffers (a chunk
/// still in its file read into a recycled one first), their
/// frame heads beside them, instead of being copied into the write buffer first (that
/// copy was a quarter of a sending process's user-space instructions). What the socket
/// does not take at once is copied into the write buffer, in order, and written by the
/// next flush as before. Synchronous (one try at the socket, no waiting), so it is as
/// cancel-safe as [`feed_batch`]; a frame other than a chunk ends the burst and goes
/// through the codec after it.
fn write_chunks(io: &mut Transport, conn: &mut Connection, first: Message) -> Result<(), Error> {
    use crate::message::Transfer;
    let max_frame = io.codec_mut().frames_mut().max_frame();
    let mut heads = bytes::BytesMut::with_capacity(64 * crate::transfer::OUTBOX_CHUNKS);
    // Per chunk: the end of its head in `heads`, and its data.
    let mut burst: Vec<(usize, bytes::Bytes)> = Vec::with_capacity(crate::transfer::OUTBOX_CHUNKS);
    let mut total = 0;
    let mut next = Some(first);
    let mut after = None;
    while let Some(msg) = next.take() {
        let Message::Transfer(t) = msg else {
            after = Some(msg);
            break;
        };
        // A chunk still in its file is read into a recycled buffer now (zeros where the
        // file no longer has its bytes), and written from there as a chunk of bytes.
        let (id, offset, data) = match *t {
            Transfer::Chunk { id, offset, data } => (id, offset, data),
            Transfer::FileChunk {
                id,
                offset,
                len,
                file,
            } => (id, offset, file.read(offset, len)),
            t => {
                after = Some(Message::Transfer(Box::new(t)));
                break;
            }
        };
        let at = heads.len();
        heads.extend_from_slice(&[0; crate::codec::LENGTH_PREFIX]);
        crate::wire::put_chunk_head(&mut heads, id, offset, data.len());
        let len = heads.len() - at - crate::codec::LENGTH_PREFIX + data.len();
        if len > max_frame {
            return Err(Error::Connection(ConnectionError::FrameTooLarge {
                len,
                max: max_frame,
            }));
        }
        // `len <= max_frame <= 16 MiB`: it fits in a u32.
        heads[at..at + crate::codec::LENGTH_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
        total += crate::codec::LENGTH_PREFIX + len;
        burst.push((heads.len(), data));
        if burst.len() < crate::transfer::OUTBOX_CHUNKS {
            next = conn.poll_transmit_with(total);
        }
    }
    let mut slices = Vec::with_capacity(2 * burst.len());
    let mut start = 0;
    for (end, data) in &burst {
        slices.push(std::io::IoSlice::new(&heads[start..*end]));
        slices.push(std::io::IoSlice::new(data));
        start = *end;
    }
    let written = futures::future::poll_fn(|cx| {
        std::pin::Pin::new(&mut *io.get_mut()).poll_write_vectored(cx, &slices)
    })
    .now_or_never();
    let mut skip = match written {
        Some(Ok(n)) => n,
        Some(Err(e)) => return Err(e.into()),
        None => 0,
    };
    let out = io.write_buffer_mut();
    let mut start = 0;
    for (end, data) in &burst {
        for part in [&heads[start..*end], &data[..]] {
            if skip >= part.len() {
                skip -= part.len();
            } else {
                out.extend_from_slice(&part[skip..]);
                skip = 0;
            }
        }
        start = *end;
    }
    if let Some(msg) = after {
        feed_after(io, conn, msg)?;
    }
    Ok(())
}

/// Whether `msg` is a chunk still in its file.
fn is_file_chunk(msg: &Message) -> bool {
    matches!(msg, Message::Transfer(t) if matches!(**t, crate::message::Transfer::FileChunk { .. }))
}

/// The most chunks [`send_file_chunks`] sends in one go (1 MiB of 63 KiB chunks): its work
/// between two looks at the connection stays bounded.
const FILE_BURST: usize = 16;

/// Without a key, over a socket that sends from files ([`FileSocket`]), with nothing
/// waiting to be written: file chunks (`first`, then those queued behind it, up to
/// [`FILE_BURST`]) each go as their frame head and then their bytes by `sendfile(2)`,
/// straight from the file to the socket: the bytes are never read into this process. What
/// the socket does not take of a chunk stays with it, and is sent before anything else is
/// written ([`Wire::pending`] counts it, so the next chunk waits and the flush writes it).
/// A chunk whose bytes are in memory, or a frame other than a chunk, ends the run and
/// goes through the codec after it. Synchronous (one try at the socket per chunk), as
/// [`feed_batch`].
fn send_file_chunks(
    io: &mut Transport,
    conn: &mut Connection,
    first: Message,
) -> Result<(), Error> {
    use crate::message::Transfer;
    let max_frame = io.codec_mut().frames_mut().max_frame();
    let mut head = bytes::BytesMut::with_capacity(super::filesock::MAX_HEAD);
    let mut next = Some(first);
    let mut sent = 0;
    while let Some(msg) = next.take() {
        let Message::Transfer(t) = msg else {
            return feed_after(io, conn, msg);
        };
        let Transfer::FileChunk {
            id,
            offset,
            len,
            file,
        } = *t
        else {
            return feed_after(io, conn, Message::Transfer(t));
        };
        head.clear();
        head.extend_from_slice(&[0; crate::codec::LENGTH_PREFIX]);
        crate::wire::put_chunk_head(&mut head, id, offset, len);
        let frame = head.len() - crate::codec::LENGTH_PREFIX + len;
        if frame > max_frame {
            return Err(Error::Connection(ConnectionError::FrameTooLarge {
                len: frame,
                max: max_frame,
            }));
        }
        // `frame <= max_frame <= 16 MiB`: it fits in a u32.
        head[..crate::codec::LENGTH_PREFIX].copy_from_slice(&(frame as u32).to_be_bytes());
        let Some(socket) = file_socket_mut(io) else {
            // Not over such a socket (the caller checked): through the codec.
            let chunk = Transfer::FileChunk {
                id,
                offset,
                len,
                file,
            };
            return feed_after(io, conn, Message::Transfer(Box::new(chunk)));
        };
        socket.start_chunk(&head, file, offset, len);
        match futures::future::poll_fn(|cx| socket.poll_tail(cx)).now_or_never() {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e.into()),
            // The socket is full: the rest of the chunk waits in it.
            None => return Ok(()),
        }
        sent += 1;
        if sent < FILE_BURST {
            next = conn.poll_transmit_with(0);
        }
    }
    Ok(())
}

/// A frame that ended a run of chunks written past the codec, encoded in a batch of its
/// own (with what follows it, as [`feed_batch`] takes).
fn feed_after(io: &mut Transport, conn: &mut Connection, msg: Message) -> Result<(), Error> {
    io.codec_mut().begin_batch();
    let fed = feed_batch(io, conn, msg);
    let mut out = std::mem::take(io.write_buffer_mut());
    let sealed = io.codec_mut().end_batch(&mut out);
    *io.write_buffer_mut() = out;
    sealed?;
    fed
}

/// A burst of sealed chunks: [`crate::transfer::OUTBOX_CHUNKS`] chunk frames of the
/// largest size, each in a transport message (cut in two when over one).
const SEALED_BURST: usize = crate::transfer::OUTBOX_CHUNKS
    * (crate::codec::LENGTH_PREFIX
        + crate::transfer::CHUNK_OVERHEAD
        + crate::message::MAX_CHUNK
        + 2 * (2 + crate::secure::TAG_LEN));

/// With a key, into an empty write buffer: a burst of file chunks (`first`, then those
/// queued behind it, up to [`crate::transfer::OUTBOX_CHUNKS`] and under
/// [`crate::transfer::WRITE_LOW_WATER`] bytes before the last, as through [`feed_batch`]),
/// each sealed in place in the write buffer as one transport message, then written
/// together by the flush. The next burst waits until the buffer is empty again
/// ([`Wire::chunk_behind`]). A frame other than a chunk ends the burst and goes out in a
/// batch after it. Synchronous, as [`feed_batch`].
fn seal_chunks(io: &mut Transport, conn: &mut Connection, first: Message) -> Result<(), Error> {
    // Room for the whole burst at once (the buffer is empty: nothing is moved).
    io.write_buffer_mut().reserve(SEALED_BURST);
    let mut next = Some(first);
    let mut chunks = 0;
    while let Some(msg) = next.take() {
        if !crate::transfer::is_chunk(&msg) {
            io.begin_batch();
            let fed = feed_batch(io, conn, msg);
            io.end_batch()?;
            return fed;
        }
        SinkExt::<Message>::start_send_unpin(io, msg)?;
        chunks += 1;
        if chunks < crate::transfer::OUTBOX_CHUNKS {
            next = conn.poll_transmit_with(io.pending());
        }
    }
    Ok(())
}

/// Feeds `first`, then every message the connection has queued, for as long as the sink
/// takes them without waiting. Synchronous, so a batch is never left half-done by a
/// cancelled [`flush`].
fn feed_batch<W: Wire>(io: &mut W, conn: &mut Connection, first: Message) -> Result<(), Error> {
    // A file chunk ends its batch: at most one chunk goes out between control frames, with
    // a key too (where a batch is sealed as one, so the writer's buffer does not grow while
    // it is fed).
    let chunk = crate::transfer::is_chunk(&first);
    SinkExt::<Message>::start_send_unpin(io, first)?;
    if chunk {
        return Ok(());
    }
    loop {
        if !io.ready_now() {
            match futures::future::poll_fn(|cx| SinkExt::<Message>::poll_ready_unpin(io, cx))
                .now_or_never()
            {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
        let Some(msg) = conn.poll_transmit_by(|| io.chunk_behind()) else {
            return Ok(());
        };
        let chunk = crate::transfer::is_chunk(&msg);
        SinkExt::<Message>::start_send_unpin(io, msg)?;
        if chunk {
            return Ok(());
        }
    }
}

/// [`flush`], bounded: a peer that takes none of our bytes for `idle` (it stopped reading,
/// or the network drops everything, so the socket's send buffer stays full) is declared
/// dead, as the idle timeout would do were the driver not stuck writing. A slow peer that
/// keeps taking bytes is waited for.
async fn flush_live<W: Wire>(
    io: &mut W,
    conn: &mut Connection,
    idle: Duration,
) -> Result<(), Error> {
    // The usual case: the socket takes everything at once, and no timer is armed (one per
    // pass of the driver cost about 500 instructions a task, in each process).
    if let Some(r) = flush(io, conn).now_or_never() {
        return r;
    }
    loop {
        let before = io.pending();
        match tokio::time::timeout(idle, flush(io, conn)).await {
            Ok(r) => return r,
            Err(_) if io.pending() != before => {}
            Err(_) => return Err(Error::Connection(ConnectionError::PeerTimeout(idle))),
        }
    }
}

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => futures::future::pending().await,
    }
}

// Each argument is one of the driver's channels or settings; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub(super) async fn drive<W: Wire>(
    mut io: W,
    mut conn: Connection,
    (mut rx, mut chunks): (mpsc::Receiver<Command>, mpsc::Receiver<Transfer>),
    id: LinkId,
    events: EventSender,
    idle: Duration,
    closed: watch::Sender<Option<Option<Arc<Error>>>>,
    status: StatusSide,
) {
    // The writer holds a burst of chunks before it writes (see `transfer::WRITE_BURST`);
    // below that, `poll_ready` does not write, and `flush` writes what a batch left.
    io.set_backpressure_boundary(crate::transfer::WRITE_BURST);
    // File chunks are slices of the read buffer, not copies (with a key too: decrypted
    // there in place).
    io.share_chunks();
    let queues = (&mut rx, &mut chunks);
    let result = drive_inner(&mut io, &mut conn, queues, id, &events, idle, status).await;
    let error = match result {
        Ok(()) => None,
        Err(e) => {
            // Whatever is queued (e.g. results) goes out if the socket still takes it.
            let _ =
                tokio::time::timeout(Duration::from_millis(200), flush(&mut io, &mut conn)).await;
            Some(Arc::new(e))
        }
    };
    match &error {
        None => debug!(link = id, "connection closed after goodbye"),
        Some(e) => {
            // A flood of connections that fail after their handshake (anyone can complete
            // one without a key) writes a few lines and a count, not one line each.
            static CLOSED: std::sync::Mutex<LogLimit> =
                std::sync::Mutex::new(LogLimit::new(gate::LOG_INTERVAL, gate::LOG_BURST));
            let let_through = CLOSED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .hit(std::time::Instant::now());
            match let_through {
                Some(0) => warn!(link = id, error = %e, "connection closed"),
                Some(n) => warn!(
                    link = id,
                    error = %e,
                    "connection closed ({n} more connections closed with an error since the \
                     last such line, not logged one by one)"
                ),
                None => debug!(link = id, error = %e, "connection closed"),
            }
        }
    }
    // Close our write side so the peer sees EOF promptly.
    let _ = tokio::time::timeout(Duration::from_millis(200), io.close_write()).await;
    closed.send_replace(Some(error.clone()));
    let _ = events.send((id, LinkEvent::Closed { error })).await;
}

/// A driver's part in status requests (the owner's requests, and what answers the
/// peer's), what answers the peer's hosted-run requests, takes its replicated-run
/// messages, and answers its instant assignments.
type StatusSide = (
    mpsc::Receiver<oneshot::Sender<Box<StatusReport>>>,
    Option<StatusSource>,
    Option<HostedService>,
    Option<ReplicaService>,
    Option<InstantService>,
);

/// The final answer to a hosted-run request whose service ended without one.
fn hosted_dropped() -> Hosted {
    Hosted::Refused {
        reason: "the host ended this request without an answer (an attached client that \
                 does not keep up with the run's events is dropped; attach again)"
            .into(),
    }
}

async fn drive_inner<W: Wire>(
    io: &mut W,
    conn: &mut Connection,
    (rx, chunks): (&mut mpsc::Receiver<Command>, &mut mpsc::Receiver<Transfer>),
    id: LinkId,
    events: &EventSender,
    idle: Duration,
    (mut status_rx, source, hosted, replica, instant): StatusSide,
) -> Result<(), Error> {
    // Once the peer sent a file list, its assignments all go to the owner, which keeps the
    // lists (see [`InstantService`]).
    let mut files_seen = false;
    // The answers to the peer's hosted-run request being served, if any.
    let mut answers: Option<mpsc::Receiver<Hosted>> = None;
    // Where the answer to our status request goes (dropped unanswered if the link closes).
    let mut asked: Option<oneshot::Sender<Box<StatusReport>>> = None;
    let mut status_open = true;
    let mut owner_gone = false;
    // Once every `Link` is dropped the command channel stays closed: stop polling it (it
    // would return `None` at once, forever) and let the goodbye run its course.
    let mut commands_open = true;
    let mut commands = Vec::new();
    // The chunk queue (see `Link::send_chunk`): taken only while the connection has room to
    // send a chunk and no command waits, so a control command never waits behind chunks;
    // and only once the peer asked for a file (a `Want` or `Fetch`, which reaches the owner
    // through this driver, so before the owner has a chunk to send): a link of tasks alone
    // never polls it.
    let mut chunks_open = true;
    let mut chunks_wanted = false;
    // Transfers aborted by a command while chunks of theirs may still wait in the chunk
    // queue: those must not follow the `Abort` (see `Overtaken`).
    let mut overtaken = Overtaken::default();
    // One timer for the connection's deadlines, moved only when the deadline changes.
    let sleep = tokio::time::sleep_until(far_future());
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    loop {
        // Everything the last batch produced goes out in one write: at once when the socket
        // takes it (the usual case, with no timer made for it), else bounded by `idle`.
        // (`flush_live` tries the write once before it arms a timer.)
        if conn.has_transmit() || io.pending() != 0 {
            flush_live(io, conn, idle).await?;
        }
        let mut answered = false;
        while let Some(ev) = conn.poll_event() {
            let ev = match ev {
                Event::Established(_) | Event::Finished => continue,
                Event::Assigned(a) => {
                    // An instant task is answered here: no hop to the owner and back, and
                    // its result joins this round's write.
                    if let (Some(now), Some(peer), false, false) =
                        (&instant, conn.peer(), files_seen, owner_gone)
                    {
                        if let Some(c) = (now.0)(&a, peer) {
                            if let Err(e) = conn.complete(c) {
                                debug!(error = %e, "result not sent");
                            }
                            answered = true;
                            continue;
                        }
                    }
                    LinkEvent::Assigned(a)
                }
                Event::Started { seq } => LinkEvent::Started { seq },
                Event::Completed(c) => LinkEvent::Completed(c),
                Event::Cancelled { seq } => LinkEvent::Cancelled { seq },
                Event::PeerGoodbye => LinkEvent::PeerGoodbye,
                Event::Transfer(t) => {
                    files_seen |= matches!(*t, crate::message::Transfer::Files { .. });
                    chunks_wanted |= matches!(*t, Transfer::Want { .. } | Transfer::Fetch { .. });
                    LinkEvent::Transfer(t)
                }
                Event::Load(r) => LinkEvent::Load(r),
                Event::StatusRequested => {
                    let Some(source) = &source else {
                        return Err(crate::Violation::StatusNotServed.into());
                    };
                    conn.answer_status((source.0)())?;
                    answered = true;
                    continue;
                }
                Event::Status(report) => {
                    if let Some(reply) = asked.take() {
                        let _ = reply.send(report);
                    }
                    continue;
                }
                Event::HostedRequest(req) => {
                    match (&hosted, conn.peer().cloned()) {
                        (Some(service), Some(peer)) => answers = Some((service.0)(*req, &peer)),
                        _ => {
                            let refused = Hosted::Refused {
                                reason: "this node does not host runs".into(),
                            };
                            conn.send_hosted(refused)?;
                        }
                    }
                    answered = true;
                    continue;
                }
                Event::HostedAnswer(h) => LinkEvent::Hosted(h),
                Event::Replica(r) => {
                    if let (Some(service), Some(peer)) = (&replica, conn.peer()) {
                        (service.0)(*r, peer);
                    }
                    continue;
                }
            };
            // As `deliver`, without making its future when the queue has room.
            if !owner_gone {
                match events.try_send((id, ev)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(item)) => {
                        owner_gone = events.send(item).await.is_err();
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => owner_gone = true,
                }
            }
        }
        if answered {
            // The answer was queued after this round's flush: send it now.
            continue;
        }
        if conn.is_finished() {
            return Ok(());
        }
        if owner_gone {
            // Nobody listens for results any more: leave without goodbye.
            return Err(Error::OwnerGone);
        }
        let deadline = conn.poll_timeout().map(Instant::from_std);
        if deadline != armed {
            sleep.as_mut().reset(deadline.unwrap_or_else(far_future));
            armed = deadline;
        }
        tokio::select! {
            frame = io.next() => {
                let t = now();
                match frame {
                    Some(Ok(msg)) => conn.handle_message(msg, t)?,
                    Some(Err(e)) => return Err(e),
                    None => conn.handle_eof()?,
                }
                // Take every frame that is already here before writing anything back: those
                // in the read buffer and, with a key, the rest of a decrypted batch the codec
                // holds (the read buffer may be empty then: the stream is polled until it
                // would wait). Without a key an empty read buffer ends it, with no poll.
                let mut n = 1;
                while n < BATCH && conn.is_open() && io.more_ready() {
                    match io.next().now_or_never() {
                        Some(Some(Ok(msg))) => conn.handle_message(msg, t)?,
                        Some(Some(Err(e))) => return Err(e),
                        Some(None) => conn.handle_eof()?,
                        None => break,
                    }
                    n += 1;
                }
            }
            // Every command already queued (up to a batch) is taken in one go: the channel
            // gives its permits back once, not once a command.
            n = rx.recv_many(&mut commands, BATCH), if commands_open => {
                if n == 0 {
                    commands_open = false;
                    command(conn, None, (&mut overtaken, chunks))?;
                }
                for cmd in commands.drain(..) {
                    if let Some(failed) = command(conn, Some(cmd), (&mut overtaken, chunks))? {
                        if deliver(events, id, failed).await.is_err() {
                            owner_gone = true;
                        }
                    }
                }
            }
            req = status_rx.recv(), if status_open => match req {
                Some(reply) if conn.request_status().is_ok() => asked = Some(reply),
                // Not open, or a request unanswered: the caller gets no answer.
                Some(_) => {}
                None => status_open = false,
            },
            answer = async { answers.as_mut()?.recv().await }, if answers.is_some() => {
                match answer {
                    Some(a) => {
                        let last = a.is_final();
                        if let Err(e) = conn.send_hosted(a) {
                            debug!(error = %e, "hosted-run answer not sent");
                        }
                        if last {
                            answers = None;
                        }
                    }
                    None => {
                        answers = None;
                        if conn.hosted_owed() {
                            conn.send_hosted(hosted_dropped())?;
                        }
                    }
                }
            }
            chunk = chunks.recv(), if chunks_wanted && chunks_open && rx.is_empty() && conn.has_chunk_room() => {
                let Some(chunk) = chunk else {
                    chunks_open = false;
                    continue;
                };
                let mut next = Some(chunk);
                while let Some(chunk) = next.take() {
                    if !overtaken.drops(&chunk) {
                        if let Err(e) = conn.transfer(chunk) {
                            debug!(error = %e, "file chunk not sent");
                        }
                    }
                    if conn.has_chunk_room() {
                        next = chunks.try_recv().ok();
                    }
                }
            }
            () = &mut sleep, if armed.is_some() => {
                armed = None;
                conn.handle_timeout(now())?;
            }
        }
    }
}

/// Transfers aborted by the owner ([`Command::Transfer`] of an `Abort`) while chunks of
/// theirs may still wait in the link's chunk queue: each with how many chunks (of any
/// transfer) the queue held when its `Abort` was applied. A chunk of such a transfer
/// among those is dropped: it was queued before the `Abort`, which has overtaken it (a
/// receiver closes the connection at a chunk after the sender's `Abort`). The owner
/// queues no chunk of a transfer after its `Abort`.
#[derive(Default)]
struct Overtaken(Vec<(u64, usize)>);

impl Overtaken {
    /// Transfer `id` was aborted with `queued` chunks in the chunk queue.
    fn abort(&mut self, id: u64, queued: usize) {
        if queued > 0 {
            self.0.push((id, queued));
        }
    }

    /// Whether `chunk`, just taken from the chunk queue, is dropped; counts it taken.
    fn drops(&mut self, chunk: &Transfer) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let id = match chunk {
            Transfer::Chunk { id, .. } | Transfer::FileChunk { id, .. } => Some(*id),
            _ => None,
        };
        let drop = self.0.iter().any(|&(t, _)| Some(t) == id);
        self.0.retain_mut(|(_, left)| {
            *left -= 1;
            *left > 0
        });
        drop
    }
}

/// A deadline that never comes, for a timer with nothing to wait for.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// Sends an event to the owner: without waiting when the queue has room (the usual case),
/// else waiting for room. An error means the owner is gone.
async fn deliver(events: &EventSender, id: LinkId, ev: LinkEvent) -> Result<(), ()> {
    match events.try_send((id, ev)) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(item)) => events.send(item).await.map_err(|_| ()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
    }
}

/// Applies one command of the owner (`None`: every `Link` is gone, which says goodbye).
/// Returns the event to report when an assignment could not be sent; an error closes the
/// connection. An `Abort` of a transfer is recorded in `overtaken` with the chunks still
/// in the link's chunk queue.
fn command(
    conn: &mut Connection,
    cmd: Option<Command>,
    (overtaken, chunks): (&mut Overtaken, &mpsc::Receiver<Transfer>),
) -> Result<Option<LinkEvent>, Error> {
    match cmd {
        Some(Command::Assign(a)) => {
            if let Err((assign, why)) = conn.try_assign(a) {
                return Ok(Some(LinkEvent::AssignFailed {
                    assign: Box::new(assign),
                    reason: format!("cannot assign: {why}"),
                    closing: !conn.can_assign(),
                }));
            }
        }
        Some(Command::Started(seq)) => conn.started(seq),
        Some(Command::Load(r)) => conn.report_load(r),
        Some(Command::Complete(c)) => {
            if let Err(e) = conn.complete(c) {
                debug!(error = %e, "result not sent");
            }
        }
        Some(Command::Cancel(seq)) => {
            let _ = conn.cancel(seq);
        }
        Some(Command::Goodbye) | None => conn.goodbye(),
        Some(Command::Abort) => {
            return Err(Error::Aborted);
        }
        Some(Command::Transfer(t)) => {
            if let Transfer::Abort { id, .. } = *t {
                overtaken.abort(id, chunks.len());
            }
            if let Err(e) = conn.transfer(*t) {
                debug!(error = %e, "transfer message not sent");
            }
        }
        Some(Command::Hosted(h)) => {
            if let Err(e) = conn.send_hosted(*h) {
                debug!(error = %e, "hosted-run request not sent");
            }
        }
        Some(Command::Replica(r)) => {
            if let Err(e) = conn.send_replica(*r) {
                debug!(error = %e, "replicated-run message not sent");
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use super::*;
    use crate::codec::FrameCodec;
    use crate::conn::{Config, Role};
    use crate::message::Transfer;
    use crate::testing::hello;
    use tokio_util::codec::Decoder;

    /// A socket that takes at most `per_call` bytes a write (across the slices of a
    /// vectored one) and is not ready every `stall`-th call.
    struct Sink {
        out: Arc<Mutex<Vec<u8>>>,
        per_call: usize,
        stall: usize,
        calls: usize,
    }

    impl Sink {
        fn take(&mut self, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<usize> {
            self.calls += 1;
            if self.stall > 0 && self.calls.is_multiple_of(self.stall) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let mut out = self.out.lock().unwrap();
            let mut left = self.per_call;
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(left);
                out.extend_from_slice(&b[..k]);
                left -= k;
                n += k;
                if left == 0 {
                    break;
                }
            }
            Poll::Ready(n)
        }
    }

    impl AsyncRead for Sink {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.take(cx, &[std::io::IoSlice::new(buf)]).map(Ok)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.take(cx, bufs).map(Ok)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// An open coordinator's side of a connection.
    fn open() -> Connection {
        let now = std::time::Instant::now();
        let mut c = Connection::new(
            Role::Initiator,
            hello("default", &[], 1),
            Config::default(),
            now,
        );
        let mut w = Connection::new(
            Role::Acceptor,
            hello("default", &["a"], 4),
            Config::default(),
            now,
        );
        loop {
            let mut moved = false;
            while let Some(m) = c.poll_transmit() {
                moved = true;
                w.handle_message(m, now).unwrap();
            }
            while let Some(m) = w.poll_transmit() {
                moved = true;
                c.handle_message(m, now).unwrap();
            }
            if !moved {
                break;
            }
        }
        while c.poll_event().is_some() {}
        c
    }

    /// Chunks written from their own buffers (without a key) reach the peer whole, in
    /// order and between the control frames as through the codec, however little the
    /// socket takes at a time and however often it is not ready: what it does not take is
    /// kept in the write buffer, in order.
    #[tokio::test]
    async fn chunks_written_from_their_buffers_arrive_whole_and_in_order() {
        for (per_call, stall) in [
            (usize::MAX, 0),
            (1, 0),
            (7, 3),
            (1000, 2),
            (70_000, 5),
            (200_000, 0),
        ] {
            let out = Arc::new(Mutex::new(Vec::new()));
            let sink = Sink {
                out: out.clone(),
                per_call,
                stall,
                calls: 0,
            };
            let mut io: Transport = Framed::new(
                Box::new(sink) as Box<dyn Io>,
                WireCodec::Plain(FrameCodec::default()),
            );
            io.set_backpressure_boundary(crate::transfer::WRITE_BURST);
            let mut c = open();
            let mut sent = Vec::new();
            let mut queued = 0u64;
            let mut seq = 0;
            while queued < 30 {
                while c.has_chunk_room() && queued < 30 {
                    let len = 63 * 1024 - (queued as usize % 3) * 1000;
                    let data: Vec<u8> = (0..len).map(|b| (b as u64 + queued) as u8).collect();
                    c.transfer(Transfer::Chunk {
                        id: 1,
                        offset: queued,
                        data: data.clone().into(),
                    })
                    .unwrap();
                    sent.push(data);
                    queued += 1;
                    // A control frame now and then: most flushes start with a chunk.
                    if queued % 9 == 1 {
                        seq += 1;
                        c.transfer(Transfer::Have { id: seq }).unwrap();
                    }
                }
                tokio::time::timeout(Duration::from_secs(60), flush(&mut io, &mut c))
                    .await
                    .unwrap()
                    .unwrap();
            }
            assert!(io.write_buffer().is_empty());
            let mut wire = bytes::BytesMut::from(&out.lock().unwrap()[..]);
            let mut codec = FrameCodec::default();
            let (mut chunks, mut controls) = (Vec::new(), 0);
            while let Some(m) = codec.decode(&mut wire).unwrap() {
                match m {
                    Message::Transfer(t) => match *t {
                        Transfer::Chunk { offset, data, .. } => {
                            assert_eq!(offset, chunks.len() as u64);
                            chunks.push(data.to_vec());
                        }
                        Transfer::Have { id } => {
                            controls += 1;
                            assert_eq!(id, controls);
                        }
                        other => panic!("{other:?}"),
                    },
                    other => panic!("{other:?}"),
                }
            }
            assert!(wire.is_empty(), "{per_call}/{stall}: bytes left over");
            assert_eq!(chunks, sent, "{per_call}/{stall}");
            assert_eq!(controls, seq, "{per_call}/{stall}");
        }
    }
    /// A loopback pair whose sending end has a small send buffer (so `sendfile` and the
    /// head's `send` are cut short and meet a full socket often), the sender as a
    /// [`FileSocket`] transport; the peer reads everything in small pieces, slowly.
    async fn file_pair() -> (Transport, tokio::task::JoinHandle<Vec<u8>>) {
        use tokio::io::AsyncReadExt;
        // Small buffers at both ends: a chunk (63 KiB) never fits in them at once.
        let listen = tokio::net::TcpSocket::new_v4().unwrap();
        listen.set_recv_buffer_size(4096).unwrap();
        listen.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listen.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(4096).unwrap();
        let (tcp, accepted) = tokio::join!(socket.connect(addr), listener.accept());
        let tcp = tcp.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (mut peer, _) = accepted.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0; 3000];
            loop {
                let n = peer.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
                tokio::task::yield_now().await;
            }
        });
        let mut io: Transport = Framed::new(
            Box::new(FileSocket::new(tcp)) as Box<dyn Io>,
            WireCodec::Plain(FrameCodec::default()),
        );
        io.set_backpressure_boundary(crate::transfer::WRITE_BURST);
        (io, reader)
    }

    /// The frames of `wire`: the chunks' (offset, bytes) and the `Have` ids, in order.
    fn frames(wire: &[u8]) -> (Vec<(u64, Vec<u8>)>, Vec<u64>) {
        let mut wire = bytes::BytesMut::from(wire);
        let mut codec = FrameCodec::default();
        let (mut chunks, mut controls) = (Vec::new(), Vec::new());
        while let Some(m) = codec.decode(&mut wire).unwrap() {
            match m {
                Message::Transfer(t) => match *t {
                    Transfer::Chunk { offset, data, .. } => chunks.push((offset, data.to_vec())),
                    Transfer::Have { id } => controls.push(id),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            }
        }
        assert!(wire.is_empty(), "bytes left over: a frame cut short");
        (chunks, controls)
    }

    /// Chunks sent by `sendfile` from their file over a socket that keeps filling up reach
    /// the peer whole and in order, with the control frames queued between them, as the
    /// same chunks of bytes would: what the socket does not take of a chunk (its head or
    /// its bytes) is finished before anything else is written.
    #[tokio::test]
    async fn chunks_sent_from_their_file_arrive_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = 40 * crate::transfer::SEND_CHUNK + 123;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = crate::file::ChunkFile::open(&path).unwrap();
        let (mut io, reader) = file_pair().await;
        let mut c = open();
        let (mut offset, mut seq, mut cut_short) = (0usize, 0, 0);
        while offset < len {
            while c.has_chunk_room() && offset < len {
                let n = crate::transfer::SEND_CHUNK.min(len - offset);
                c.transfer(Transfer::FileChunk {
                    id: 1,
                    offset: offset as u64,
                    len: n,
                    file: file.clone(),
                })
                .unwrap();
                offset += n;
                if offset % (3 * crate::transfer::SEND_CHUNK) == 0 {
                    seq += 1;
                    c.transfer(Transfer::Have { id: seq }).unwrap();
                }
            }
            // One try (the peer reads nothing meanwhile), so a chunk is left half-sent;
            // then a control frame queued behind it must wait for the rest of it.
            let _ = flush(&mut io, &mut c).now_or_never();
            if file_socket(&io).is_some_and(|s| s.unsent() > 0) {
                cut_short += 1;
            }
            seq += 1;
            c.transfer(Transfer::Have { id: seq }).unwrap();
            tokio::time::timeout(Duration::from_secs(60), flush(&mut io, &mut c))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(io.pending(), 0);
        }
        // The socket did leave chunks half-sent (the case this test is about).
        assert!(cut_short > 0);
        drop(io);
        let (chunks, controls) = frames(&reader.await.unwrap());
        let mut at = 0;
        for (o, data) in &chunks {
            assert_eq!(*o as usize, at);
            assert_eq!(&data[..], &bytes[at..at + data.len()]);
            at += data.len();
        }
        assert_eq!(at, len);
        assert_eq!(controls, (1..=seq).collect::<Vec<_>>());
        assert_eq!(file.cut(), None);
    }

    /// A file truncated while its chunks are sent: the frames stay whole (the bytes it no
    /// longer has go as zeros, so the receiver's hash check fails rather than the stream
    /// breaking), nothing waits forever on a `sendfile` of 0, and the file records why.
    #[tokio::test]
    async fn a_file_truncated_while_it_is_sent_keeps_the_frames_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let chunk = crate::transfer::SEND_CHUNK;
        let bytes: Vec<u8> = (0..10 * chunk).map(|i| (i % 251) as u8 | 1).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = crate::file::ChunkFile::open(&path).unwrap();
        let (mut io, reader) = file_pair().await;
        let mut c = open();
        let queue = |c: &mut Connection, from: usize, to: usize| {
            for i in from..to {
                c.transfer(Transfer::FileChunk {
                    id: 1,
                    offset: (i * chunk) as u64,
                    len: chunk,
                    file: file.clone(),
                })
                .unwrap();
            }
        };
        queue(&mut c, 0, 4);
        flush(&mut io, &mut c).await.unwrap();
        // Cut inside the sixth chunk.
        let end = 5 * chunk + 1000;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(end as u64)
            .unwrap();
        queue(&mut c, 4, 10);
        tokio::time::timeout(Duration::from_secs(60), flush(&mut io, &mut c))
            .await
            .unwrap()
            .unwrap();
        drop(io);
        let (chunks, _) = frames(&reader.await.unwrap());
        assert_eq!(chunks.len(), 10);
        let mut wire = Vec::new();
        for (i, (o, data)) in chunks.iter().enumerate() {
            assert_eq!(*o as usize, i * chunk);
            assert_eq!(data.len(), chunk);
            wire.extend_from_slice(data);
        }
        assert_eq!(&wire[..end], &bytes[..end]);
        assert!(wire[end..].iter().all(|b| *b == 0));
        let why = file.cut().unwrap();
        assert!(why.contains("truncated"), "{why}");
    }
}
