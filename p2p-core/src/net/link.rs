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
    /// Send a file-transfer message (protocol v3); a chunk goes behind every control frame.
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
        /// The assignment, for re-queueing.
        assign: Assign,
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

    /// The places free in the command queue now, and how many it has: a sender of many
    /// file chunks keeps them to a share of the queue, so control commands always find
    /// room.
    pub fn queue_room(&self) -> (usize, usize) {
        (self.tx.capacity(), self.tx.max_capacity())
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
