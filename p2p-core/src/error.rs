//! The error type of this crate.

use std::time::Duration;

use crate::message::RejectReason;

/// Everything that can go wrong on a connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A frame's length prefix (or an outgoing message) exceeds the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// The claimed or encoded length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A large frame does not fit in what is left of the node's budget for frames being
    /// received ([`crate::codec::FrameBudget`]): many large frames arrive at once.
    #[error(
        "frame of {len} bytes refused: the node's memory for large frames being received \
         ({budget} bytes, shared by all connections) is in use"
    )]
    FrameBudget {
        /// The claimed length.
        len: usize,
        /// The node's budget.
        budget: usize,
    },
    /// A field of the peer's handshake exceeds its bound (see [`crate::wire::MAX_HELLO`]).
    #[error("the peer's handshake is refused: its {what} is {len}, more than the {max} allowed")]
    Bound {
        /// The field (`cluster name (bytes)`, `type count`, ...).
        what: &'static str,
        /// Its size.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated {
        /// How many bytes of the unfinished frame had arrived.
        buffered: usize,
    },
    /// A payload is not a valid message.
    #[error("malformed message: {0}")]
    Decode(String),
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The peer did not complete the handshake in time.
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(Duration),
    /// Nothing was heard from the peer for too long.
    #[error("peer silent for {0:?} (missed heartbeats)")]
    PeerTimeout(Duration),
    /// The peer sent a message that is not allowed in the connection's state.
    #[error("protocol violation: unexpected {got} while {state}")]
    Unexpected {
        /// The message kind received.
        got: &'static str,
        /// What the connection was doing.
        state: &'static str,
    },
    /// The peer broke a rule of the protocol.
    #[error("protocol violation: {0}")]
    Violation(String),
    /// The peer refused our handshake.
    #[error(
        "peer rejected the handshake ({reason:?}): {}",
        crate::shown::Shown(message)
    )]
    Rejected {
        /// Why.
        reason: RejectReason,
        /// The peer's explanation.
        message: String,
    },
    /// We refused the peer's handshake.
    #[error("refused the peer's handshake ({reason:?}): {message}")]
    Refused {
        /// Why.
        reason: RejectReason,
        /// Our explanation (also sent to the peer).
        message: String,
    },
    /// The peer closed the connection without saying goodbye.
    #[error("connection closed by peer without goodbye")]
    ConnectionLost,
    /// A local request cannot be carried out in the connection's state.
    #[error("cannot {action}: {why}")]
    InvalidState {
        /// What was asked.
        action: &'static str,
        /// Why not.
        why: &'static str,
    },
    /// Connecting took too long.
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout {
        /// The address dialled.
        addr: String,
        /// The bound that expired.
        after: Duration,
    },
    /// The secure handshake failed: the peer has another cluster key or none, or does not
    /// speak the secure channel. The message says which, as far as this side can tell.
    #[error("secure handshake failed: {0}")]
    Auth(String),
    /// An encrypted message failed authentication: it was tampered with, replayed,
    /// reordered, or a message before it was dropped.
    #[error(
        "an encrypted message failed authentication (tampered, replayed or reordered); \
         connection closed"
    )]
    Tampered,
    /// With a cluster key: the node id the peer claims in its `Hello` or `Welcome` is not
    /// the one derived from the identity key it proved in the secure handshake (someone
    /// holding the cluster key pretends to be another node). The connection is refused.
    #[error(
        "the peer claims node id {claimed} but its identity key proves node id {proven}: \
         refused (a node id must match the node's identity)"
    )]
    IdMismatch {
        /// The id in the peer's `Hello`/`Welcome`.
        claimed: crate::NodeId,
        /// The id derived from the peer's authenticated static key.
        proven: crate::NodeId,
    },
    /// The peer closed the connection before the handshake completed.
    #[error("the peer closed the connection during the handshake{0}")]
    ClosedInHandshake(&'static str),
    /// The peer closed the connection instead of answering a status request: it runs a
    /// p2p-node older than `status` (or does not answer them).
    #[error(
        "the node closed the connection instead of answering the status request (it runs an \
         older p2p-node without status, or it does not serve)"
    )]
    NoStatus,
    /// A status request had no answer in time.
    #[error("no answer to the status request after {0:?}")]
    StatusTimeout(Duration),
}
