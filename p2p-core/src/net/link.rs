//! What the owner of a connection holds and hears: its [`Link`], the [`Command`]s it sends
//! and the [`LinkEvent`]s it gets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::LinkId;
#[cfg(doc)]
use super::{accept, connect};
use crate::hosted::Hosted;
use crate::message::{Assign, Completed, Hello, StatusReport, Transfer};
use crate::Error;

/// What the owner asks of a connection.
#[derive(Debug, Clone)]
pub enum Command {
    /// Assign a task to the peer.
    Assign(Assign),
    /// Tell the peer a task it assigned to us started running.
    Started(u64),
    /// Report the result of a task the peer assigned to us.
    Complete(Completed),
    /// Report this node's capacity and resources to the peer ([`crate::Message::Load`]).
    Load(crate::LoadReport),
    /// Cancel a task we assigned to the peer.
    Cancel(u64),
    /// Say goodbye: no new work; close once in-flight work is done.
    Goodbye,
    /// Close now, without goodbye.
    Abort,
    /// Send a file-transfer message (protocol v3). File chunks have a queue of their own
    /// ([`Link::send_chunk`]); one sent here still goes, behind every control frame, but a
    /// transfer's chunks keep their order only if they all go the same way.
    Transfer(Box<Transfer>),
    /// Send a hosted-run request (its answers come as [`LinkEvent::Hosted`]).
    Hosted(Box<Hosted>),
    /// Send a replicated-run message (no answer is owed).
    Replica(Box<crate::replica::Replica>),
}

/// What a connection reports to its owner.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// The connection is established; this is the first event of the link, before any
    /// other (the same [`Link`] that [`connect`] or [`accept`] returns).
    Opened(Box<Link>),
    /// The peer asks us to run a task.
    Assigned(Assign),
    /// A task we assigned started running at the peer.
    Started {
        /// The assignment's seq.
        seq: u64,
    },
    /// A task we assigned has a result.
    Completed(Completed),
    /// The peer cancels a task it assigned to us.
    Cancelled {
        /// The assignment's seq.
        seq: u64,
    },
    /// The peer said goodbye: assign nothing more to it.
    PeerGoodbye,
    /// The peer reported its capacity (at most its handshake's) and resources.
    Load(crate::LoadReport),
    /// An assignment could not be sent (connection closing, peer at capacity).
    AssignFailed {
        /// The assignment, for re-queueing (boxed: this rare event would otherwise make every
        /// event a link reports larger, and each is moved several times on its way).
        assign: Box<Assign>,
        /// Why.
        reason: String,
        /// Whether the connection takes no new work at all (it is closing). `false`: the
        /// peer is at its capacity, which a `Load` report may have just shrunk: the task
        /// waits for a slot there or elsewhere, and the link keeps getting work.
        closing: bool,
    },
    /// A file-transfer message from the peer (protocol v3).
    Transfer(Box<Transfer>),
    /// An answer to our hosted-run request ([`Command::Hosted`]).
    Hosted(Box<Hosted>),
    /// The connection is closed; this is the last event of the link.
    Closed {
        /// `None` after a complete goodbye, else what went wrong (shared: events are
        /// cloned, errors are not).
        error: Option<Arc<Error>>,
    },
}

/// The owner's handle on one established connection.
#[derive(Debug, Clone)]
pub struct Link {
    pub(super) id: LinkId,
    pub(super) peer: Hello,
    pub(super) addr: SocketAddr,
    pub(super) tx: mpsc::Sender<Command>,
    /// File chunks, in a bounded queue of their own (see [`Link::send_chunk`]).
    pub(super) chunks: mpsc::Sender<Transfer>,
    pub(super) closed: LinkClosed,
    /// Status requests to the driver, each with where its answer goes.
    pub(super) status: mpsc::Sender<oneshot::Sender<Box<StatusReport>>>,
}

/// Tells when a link closed, and how (see [`Link::on_closed`]). Holding one does not keep
/// the connection open.
#[derive(Debug, Clone)]
pub struct LinkClosed {
    /// `None` while open; then `Some(None)` after a complete goodbye, or `Some(Some(why))`.
    pub(super) rx: watch::Receiver<Option<Option<Arc<Error>>>>,
}

impl LinkClosed {
    /// Waits until the link closed: `None` after a complete goodbye, else what went wrong.
    pub async fn wait(mut self) -> Option<Arc<Error>> {
        loop {
            if let Some(end) = self.rx.borrow().clone() {
                return end;
            }
            if self.rx.changed().await.is_err() {
                // The driver is gone without saying how (it panicked).
                return Some(Arc::new(Error::DriverFailed(
                    "it ended without closing the link".into(),
                )));
            }
        }
    }
}

impl Link {
    /// The owner's number for this link.
    pub fn id(&self) -> LinkId {
        self.id
    }

    /// The peer's handshake.
    pub fn peer(&self) -> &Hello {
        &self.peer
    }

    /// The peer's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that says when this link closed (without keeping it open).
    pub fn on_closed(&self) -> LinkClosed {
        self.closed.clone()
    }

    /// Asks the peer how it is (`p2p-node status`) and waits, at most `limit`, for its
    /// answer. A peer that closes the connection instead (a node older than the status
    /// request) gives [`Error::NoStatus`].
    pub async fn request_status(&self, limit: Duration) -> Result<StatusReport, Error> {
        let (tx, rx) = oneshot::channel();
        self.status.try_send(tx).map_err(|_| Error::InvalidState {
            action: "request status",
            why: "the connection is closed, or a status request is unanswered",
        })?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(report)) => Ok(*report),
            Ok(Err(_)) => Err(Error::NoStatus),
            Err(_) => Err(Error::StatusTimeout(limit)),
        }
    }

    /// Queues a command, waiting at most `limit` while the queue is full (a client that
    /// streams many messages, such as an upload, and must not drop one).
    pub async fn send_within(&self, cmd: Command, limit: std::time::Duration) -> Result<(), Error> {
        match self.tx.send_timeout(cmd, limit).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(Error::InvalidState {
                action: "send",
                why: "the link's command queue stayed full",
            }),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Error::InvalidState {
                action: "send",
                why: "the connection is closed",
            }),
        }
    }

    /// Queues a file chunk ([`Transfer::Chunk`] or [`Transfer::FileChunk`]) on the link's
    /// chunk queue, waiting at most `limit` while it is full. Chunks have a bounded queue
    /// of their own, apart from the command queue: however many a sender has, a control
    /// command ([`Link::send`]) always finds its room, and the driver takes the next
    /// chunk only when the connection has room to send it, so no control frame waits
    /// behind more than a few chunks. Chunks go in the order they were queued; an
    /// `Abort` of their transfer sent after them drops those not yet sent. Anything else
    /// than a chunk is refused ([`Error::InvalidState`]): it goes by [`Link::send`].
    pub async fn send_chunk(&self, chunk: Transfer, limit: Duration) -> Result<(), Error> {
        not_a_chunk(&chunk)?;
        match self.chunks.send_timeout(chunk, limit).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(Error::InvalidState {
                action: "send a file chunk",
                why: "the link's chunk queue stayed full",
            }),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(closed_error()),
        }
    }

    /// A place in the link's chunk queue, if one is free now (see [`Link::send_chunk`]);
    /// `Ok(None)` when it is full. A closed link gives an error.
    pub fn try_reserve_chunk(&self) -> Result<Option<ChunkPermit>, Error> {
        match self.chunks.clone().try_reserve_owned() {
            Ok(permit) => Ok(Some(ChunkPermit(permit))),
            Err(mpsc::error::TrySendError::Full(_)) => Ok(None),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(closed_error()),
        }
    }

    /// Waits, at most `limit`, for a place in the link's chunk queue (see
    /// [`Link::send_chunk`]). A sender that must keep its chunks in order behind others
    /// takes the place first, then decides what goes in it.
    pub async fn reserve_chunk(&self, limit: Duration) -> Result<ChunkPermit, Error> {
        match tokio::time::timeout(limit, self.chunks.clone().reserve_owned()).await {
            Ok(Ok(permit)) => Ok(ChunkPermit(permit)),
            Ok(Err(_)) => Err(closed_error()),
            Err(_) => Err(Error::InvalidState {
                action: "send a file chunk",
                why: "the link's chunk queue stayed full",
            }),
        }
    }

    /// The places free in the link's chunk queue now, and how many it has.
    pub fn chunk_queue_room(&self) -> (usize, usize) {
        (self.chunks.capacity(), self.chunks.max_capacity())
    }

    /// Queues a command. The queue holds the peer's capacity plus a margin, so a sender that
    /// respects capacity never finds it full; a closed link gives an error.
    pub fn send(&self, cmd: Command) -> Result<(), Error> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::InvalidState {
                action: "send",
                why: "the link's command queue is full",
            },
            mpsc::error::TrySendError::Closed(_) => Error::InvalidState {
                action: "send",
                why: "the connection is closed",
            },
        })
    }
}

/// A place taken in a link's chunk queue ([`Link::try_reserve_chunk`],
/// [`Link::reserve_chunk`]): [`ChunkPermit::send`] fills it; dropped, it is given back.
#[derive(Debug)]
pub struct ChunkPermit(mpsc::OwnedPermit<Transfer>);

impl ChunkPermit {
    /// Puts `chunk` in the place taken. Anything else than a chunk is refused
    /// ([`Error::InvalidState`]), and the place given back.
    pub fn send(self, chunk: Transfer) -> Result<(), Error> {
        not_a_chunk(&chunk)?;
        self.0.send(chunk);
        Ok(())
    }
}

/// Refuses what is not a file chunk on the chunk queue.
fn not_a_chunk(t: &Transfer) -> Result<(), Error> {
    match t {
        Transfer::Chunk { .. } | Transfer::FileChunk { .. } => Ok(()),
        _ => Err(Error::InvalidState {
            action: "send on the chunk queue",
            why: "only file chunks go there (other transfer messages go by Link::send)",
        }),
    }
}

fn closed_error() -> Error {
    Error::InvalidState {
        action: "send a file chunk",
        why: "the connection is closed",
    }
}
