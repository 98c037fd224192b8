//! The in-memory transport: two ends of a link in one process, moving [`Message`] values
//! over bounded channels instead of frames over a socket (no codec, no system call).
//!
//! [`pipe`] makes the two ends; [`connect_memory`] and [`accept_memory`] run the
//! `Hello`/`Welcome` exchange over them (so the peer's id, types and capacity reach the
//! owner as over TCP, and the same checks apply: cluster, version, capacity) and spawn the
//! same driver as TCP's, so the owner gets a [`Link`] and [`LinkEvent`]s exactly as for a
//! TCP connection: scheduling, goodbye, heartbeats and the idle timeout, `Load` reports,
//! file transfers, instant answers all work unchanged.
//!
//! Each end sends batches of at most [`BATCH`] messages (what one pass of the driver
//! produces, as one write does over TCP), at most one file chunk each and last, and at most
//! [`pipe_depth`] batches wait in a direction: room for every message the protocol lets be
//! in flight on a link of that window (its assignments, or a `Started` and a result for
//! each, and control frames) even one a batch, so two drivers that both write before they
//! read never wait for each other (over TCP the kernel's socket buffers give that room). An
//! end whose peer stops reading finds its sends pending once that is full, and its driver
//! declares the peer dead after the idle timeout, as a full socket buffer does over TCP.
//! Dropping an end (its driver ended), or closing its write side, is the peer's end of
//! stream.
//!
//! There is no secure handshake and no frame limit: both ends are in one process, so there
//! is nobody to authenticate and nothing to bound but the queues
//! ([`Settings::key`] and [`Settings::max_frame`] do not apply).

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use super::driver::{flush, now, Wire};
use super::{EventSender, Link, LinkId, Settings, BATCH, MAX_WINDOW};
use crate::conn::{Connection, Role};
use crate::message::{Hello, Message};
use crate::Error;

/// Most batches waiting in one direction of a [`pipe`] made for a link of `window` tasks in
/// flight (the larger of both ends' capacities): twice the window plus 64, as a link's
/// command queue. The channel takes memory only for what waits in it.
pub fn pipe_depth(window: u32) -> usize {
    2 * window.clamp(1, MAX_WINDOW) as usize + 64
}

/// One end of an in-memory link (see [`pipe`]).
pub struct Pipe {
    /// Where this end's batches go; `None` once its write side is closed.
    tx: Option<PollSender<Vec<Message>>>,
    /// The peer's batches.
    rx: mpsc::Receiver<Vec<Message>>,
    /// What is left of the batch being read.
    inbox: std::vec::IntoIter<Message>,
    /// The batch being filled.
    outbox: Vec<Message>,
    /// The outbox ends with a file chunk: it goes before anything more joins it.
    chunk: bool,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe")
            .field("open", &self.tx.is_some())
            .field("inbox", &self.inbox.len())
            .field("outbox", &self.outbox.len())
            .finish()
    }
}

/// The two ends of an in-memory link for `window` tasks in flight (see [`pipe_depth`]):
/// what one sends, the other reads.
pub fn pipe(window: u32) -> (Pipe, Pipe) {
    let depth = pipe_depth(window);
    let (a_tx, b_rx) = mpsc::channel(depth);
    let (b_tx, a_rx) = mpsc::channel(depth);
    let end = |tx, rx| Pipe {
        tx: Some(PollSender::new(tx)),
        rx,
        inbox: Vec::new().into_iter(),
        outbox: Vec::new(),
        chunk: false,
    };
    (end(a_tx, a_rx), end(b_tx, b_rx))
}

fn closed() -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the in-process peer is gone",
    ))
}

impl Pipe {
    /// Hands the outbox to the channel, waiting for room.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.outbox.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let Some(tx) = self.tx.as_mut() else {
            return Poll::Ready(Err(closed()));
        };
        if ready!(tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(closed()));
        }
        let batch = std::mem::replace(&mut self.outbox, Vec::with_capacity(BATCH.min(64)));
        self.chunk = false;
        match tx.send_item(batch) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(closed())),
        }
    }
}

impl futures::Stream for Pipe {
    type Item = Result<Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(m) = self.inbox.next() {
                return Poll::Ready(Some(Ok(m)));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(batch) => self.inbox = batch.into_iter(),
                None => return Poll::Ready(None),
            }
        }
    }
}

impl futures::Sink<Message> for Pipe {
    type Error = Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.outbox.len() < BATCH && !self.chunk {
            return Poll::Ready(Ok(()));
        }
        self.poll_send(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, msg: Message) -> Result<(), Error> {
        self.chunk = crate::transfer::is_chunk(&msg);
        // A chunk still in its file is read now: the peer takes messages, not bytes.
        let msg = if self.chunk {
            crate::transfer::to_wire(msg)
        } else {
            msg
        };
        self.outbox.push(msg);
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_send(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let sent = ready!(self.poll_send(cx));
        self.tx = None;
        Poll::Ready(sent)
    }
}

impl Wire for Pipe {
    fn pending(&self) -> usize {
        self.outbox.len()
    }

    fn more_ready(&self) -> bool {
        self.inbox.len() != 0
    }

    async fn close_write(&mut self) {
        let _ = futures::SinkExt::close(self).await;
    }
}

/// Like [`super::connect`], over one end of a [`pipe`]: runs the `Hello`/`Welcome`
/// exchange as initiator and spawns the driver. `addr` is what [`Link::addr`] says.
pub async fn connect_memory(
    end: Pipe,
    addr: SocketAddr,
    local: Hello,
    settings: &Settings,
    id: LinkId,
    events: EventSender,
) -> Result<Link, Error> {
    start(end, addr, Role::Initiator, local, settings, id, events).await
}

/// Like [`super::accept`], over the other end of a [`pipe`]: runs the exchange as acceptor
/// and spawns the driver.
pub async fn accept_memory(
    end: Pipe,
    addr: SocketAddr,
    local: Hello,
    settings: &Settings,
    id: LinkId,
    events: EventSender,
) -> Result<Link, Error> {
    start(end, addr, Role::Acceptor, local, settings, id, events).await
}

async fn start(
    mut io: Pipe,
    addr: SocketAddr,
    role: Role,
    local: Hello,
    settings: &Settings,
    id: LinkId,
    events: EventSender,
) -> Result<Link, Error> {
    let local_capacity = local.capacity;
    let mut conn = Connection::new(role, local, settings.conn.clone(), now());
    let peer = match super::handshake::hello_exchange(&mut io, &mut conn, None).await {
        Ok(peer) => peer,
        Err(e) => {
            // Best effort: the peer learns why (a Reject), without waiting long.
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(200),
                flush(&mut io, &mut conn),
            )
            .await;
            return Err(e);
        }
    };
    Ok(super::handshake::launch(io, conn, peer, local_capacity, addr, id, settings, events).await)
}
