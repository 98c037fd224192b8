//! The tokio driver: moves frames between a TCP socket and a [`Connection`].
//!
//! [`connect`] and [`accept`] run the handshake (bounded by the handshake timeout) and then
//! spawn a task that drives the connection. Its owner talks to it through a [`Link`]
//! (commands in) and a shared channel of `(LinkId, LinkEvent)` (events out). Each link's
//! life on that channel is ordered: [`LinkEvent::Opened`] (sent before the driver starts, so
//! it precedes every other event of the link), its events, and a final
//! [`LinkEvent::Closed`] when the goodbye exchange finished or the connection failed; a
//! failure closes this connection only. [`Link::on_closed`] tells anyone else (a dialer)
//! when and how the link closed.
//!
//! With a cluster key in [`Settings::key`], the connection first runs the secure handshake
//! of [`crate::secure`] (within the same handshake timeout as `Hello`), and every frame
//! after it is encrypted; without one, frames go as they are. With a key, the node id in the
//! peer's `Hello`/`Welcome` must be the one its identity proved in the secure handshake
//! ([`HandshakeError::IdMismatch`] otherwise), and the local `Hello` must carry the id of
//! [`Settings::identity`].
//!
//! # Layout
//!
//! - `link`: what the owner holds and hears: [`Link`], [`Command`], [`LinkEvent`],
//!   [`LinkClosed`].
//! - `handshake`: [`connect`] / [`accept`] (and their `_stream` forms): the secure
//!   handshake and the `Hello`/`Welcome` exchange, then the driver is spawned.
//! - `driver`: the task that moves frames between the socket and the [`Connection`] of
//!   an established link (generic over what carries them).
//! - `memory`: the in-memory transport beside TCP: [`pipe`], [`connect_memory`],
//!   [`accept_memory`], for nodes in the same process (`run --local`): `Message` values
//!   over bounded channels, no socket and no codec, the same driver and [`Link`].

use std::time::Duration;

use tokio::sync::mpsc;

use crate::codec::{FrameBudget, DEFAULT_MAX_FRAME};
use crate::conn;
use crate::hosted::Hosted;
use crate::identity::Identity;
use crate::key::ClusterKey;
use crate::message::StatusReport;

#[cfg(doc)]
use crate::conn::Connection;
#[cfg(doc)]
use crate::{Error, HandshakeError};

mod driver;
mod filesock;
mod handshake;
mod link;
mod memory;

pub use handshake::{accept, accept_stream, connect, connect_stream};
pub use link::{ChunkPermit, Command, Link, LinkClosed, LinkEvent};
pub use memory::{accept_memory, connect_memory, pipe, pipe_depth, Pipe};

/// Network settings shared by all connections of a node.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settings {
    /// Protocol timing (handshake, heartbeats).
    pub conn: conn::Config,
    /// Maximum frame payload in bytes. Default 16 MiB (also the ceiling).
    pub max_frame: usize,
    /// Bound on establishing a TCP connection. Default 3 s.
    pub connect_timeout: Duration,
    /// The cluster key. With one, every connection (dialled or accepted) runs the secure
    /// handshake and is encrypted, and peers without this key are dropped. This node dials
    /// with it. Default none.
    pub key: Option<ClusterKey>,
    /// More cluster keys accepted from peers that dial in (with [`Settings::key`] only):
    /// during a key rotation a node dials with one key and accepts the old and the new one.
    /// Default none.
    pub accept_keys: Vec<ClusterKey>,
    /// The bytes this node may hold in large frames still being received, shared by all
    /// the connections given these settings (clones share it). Default
    /// [`crate::codec::DEFAULT_FRAME_BUDGET`] (256 MiB).
    pub frame_budget: FrameBudget,
    /// This node's identity: with a cluster key, its private key is the Noise static key
    /// and the local `Hello`'s node id must be [`Identity::node_id`]. Required with a key
    /// (a connection without it fails with [`Error::InvalidState`]). Default none.
    pub identity: Option<Identity>,
    /// What this node answers a peer's status request with (`p2p-node status`). Default
    /// none: such a request closes the connection.
    pub status: Option<StatusSource>,
    /// What answers a peer's hosted-run requests (`p2p-node submit`, `runs`, `attach`...).
    /// Default none: each is answered `Refused`.
    pub hosted: Option<HostedService>,
    /// What takes a peer's replicated-run messages (the Raft traffic of hosted runs'
    /// groups). Default none: they are dropped.
    pub replica: Option<ReplicaService>,
    /// What answers a peer's assignments at once, inside the connection's driver (a
    /// serving node's instant handlers, such as the built-in one). Default none: every
    /// assignment goes to the owner as [`LinkEvent::Assigned`].
    pub instant: Option<InstantService>,
}

/// Answers an assignment inside the connection's driver, without handing it to the owner
/// (see [`Settings::instant`]): called with the assignment and the peer's handshake, it
/// returns the result to send, or `None` for "give it to the owner" (not an instant task,
/// no free slot, the node is stopping). The result goes out with the other frames of the
/// same read, in one write. Called on the connection's task: it must not block or wait.
///
/// A link on which the peer sent a file list ([`crate::Transfer::Files`]) gives every
/// assignment after it to the owner: the owner keeps those lists, and a task with files is
/// never answered here.
#[derive(Clone)]
pub struct InstantService(pub std::sync::Arc<AnswerNow>);

/// The function behind an [`InstantService`].
pub type AnswerNow =
    dyn Fn(&crate::Assign, &crate::Hello) -> Option<crate::Completed> + Send + Sync;

impl std::fmt::Debug for InstantService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InstantService")
    }
}

/// Answers a peer's hosted-run request (see [`Settings::hosted`]): called with the request
/// and the peer's handshake, it returns where the answers come from. The driver sends them
/// as they come, until a final one ([`Hosted::is_final`]); a channel that closes before
/// one is answered `Refused` for it. The channel is the bound: a service that finds it
/// full may drop it (a client that does not read is dropped, nothing else waits for it).
#[derive(Clone)]
pub struct HostedService(pub std::sync::Arc<AnswerHosted>);

/// The function behind a [`HostedService`]: a request and the peer's handshake in, where
/// the answers come from out.
pub type AnswerHosted = dyn Fn(Hosted, &crate::Hello) -> mpsc::Receiver<Hosted> + Send + Sync;

impl std::fmt::Debug for HostedService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostedService")
    }
}

/// Takes a peer's replicated-run message (see [`Settings::replica`]), with the peer's
/// handshake. Called on the connection's task: it must not block (a service queues the
/// message, or drops it when its bounded queue is full: Raft sends again).
#[derive(Clone)]
pub struct ReplicaService(pub std::sync::Arc<TakeReplica>);

/// The function behind a [`ReplicaService`].
pub type TakeReplica = dyn Fn(crate::replica::Replica, &crate::Hello) + Send + Sync;

impl std::fmt::Debug for ReplicaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaService")
    }
}

/// Makes this node's [`StatusReport`] when a peer asks (see [`Settings::status`]).
#[derive(Clone)]
pub struct StatusSource(pub std::sync::Arc<dyn Fn() -> StatusReport + Send + Sync>);

impl std::fmt::Debug for StatusSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusSource")
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            conn: conn::Config::default(),
            max_frame: DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(3),
            key: None,
            accept_keys: Vec::new(),
            identity: None,
            frame_budget: FrameBudget::default(),
            status: None,
            hosted: None,
            replica: None,
            instant: None,
        }
    }
}

/// The largest window of tasks in flight a link's command queue is sized for.
const MAX_WINDOW: u32 = 65_536;

/// Most frames decoded, or commands taken, in one go before the driver writes what they
/// produced and lets other tasks run.
const BATCH: usize = 512;

/// The owner's number for a connection, echoed in its events.
pub type LinkId = u64;

/// The sender of a link's events.
pub type EventSender = mpsc::Sender<(LinkId, LinkEvent)>;

#[cfg(test)]
mod tests;
