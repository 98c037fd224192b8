//! The error types of this crate, one per layer: [`HandshakeError`] (the secure handshake
//! and the `Hello`/`Welcome` exchange), [`ConnectionError`] (framing and the protocol once
//! open, with a typed [`Violation`]), and the crate's [`Error`] that wraps them with what
//! the driver adds (IO, connect timeout, abort, owner gone).
//!
//! Messages describe what happened, never how a program that embeds the library is used:
//! a command line maps the variants to its own hints (see [`HandshakeError::PeerClosed`]
//! and [`Stage::Hello`]'s `keyed`).

use std::fmt;
use std::time::Duration;

use crate::message::RejectReason;
use crate::shown::Shown;
use crate::NodeId;

/// Everything that can go wrong on a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The connection could not be set up (secure handshake or `Hello`/`Welcome`).
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The connection failed: framing, decryption, timing or the protocol's rules.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// Connecting took too long.
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout {
        /// The address dialled.
        addr: String,
        /// The bound that expired.
        after: Duration,
    },
    /// The owner aborted the connection ([`crate::net::Command::Abort`]).
    #[error("cannot continue: aborted by its owner")]
    Aborted,
    /// Nobody listens to the connection's events any more: it closed without goodbye.
    #[error("cannot continue: the owner of the connection is gone")]
    OwnerGone,
    /// A local request cannot be carried out in the connection's state (the caller's
    /// mistake or a race with the connection closing; the peer did nothing wrong).
    #[error("cannot {action}: {why}")]
    InvalidState {
        /// What was asked.
        action: &'static str,
        /// Why not.
        why: &'static str,
    },
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
    /// The task that drives the connection ended without saying how the link closed (it
    /// panicked): what went wrong, as far as is known.
    #[error("connection driver failed: {0}")]
    DriverFailed(String),
}

impl Error {
    /// Whether dialling the same peer again with the same settings fails the same way: the
    /// peer refused us (another cluster, version or key) or does not speak the secure
    /// channel this node speaks. A dialler gives up at once on such an error and retries
    /// the others (IO, timeouts, a peer that closed during `Hello`).
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Handshake(h) => h.is_permanent(),
            _ => false,
        }
    }

    /// The handshake error inside, if this is one.
    pub fn handshake(&self) -> Option<&HandshakeError> {
        match self {
            Error::Handshake(h) => Some(h),
            _ => None,
        }
    }

    /// The connection error inside, if this is one.
    pub fn connection(&self) -> Option<&ConnectionError> {
        match self {
            Error::Connection(c) => Some(c),
            _ => None,
        }
    }
}

/// Where in the handshake the peer closed the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// The secure (Noise) handshake. `dialled_with`: the fingerprint of the key this node
    /// dialled with (as initiator); `None` as acceptor.
    Secure {
        /// The initiator's key fingerprint.
        dialled_with: Option<String>,
    },
    /// The `Hello`/`Welcome` exchange. `keyed`: whether this node uses a cluster key (a
    /// node without one is dropped here by a node with one, which looks like this).
    Hello {
        /// This node has a cluster key.
        keyed: bool,
    },
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// A keyed connection without a key to use (an empty key list).
    #[error("secure handshake failed: no cluster key configured")]
    NoKey,
    /// This node has no key and the peer speaks the secure channel (its preamble arrived
    /// where a frame length was expected).
    #[error("secure handshake failed: the peer uses a cluster key and this node has none")]
    PeerHasKey,
    /// This node has a key and the peer sent plaintext: it has none.
    #[error("secure handshake failed: the peer sent plaintext: it has no cluster key")]
    Plaintext,
    /// The peer's first bytes are neither plaintext nor the secure channel's preamble.
    #[error("secure handshake failed: the peer does not speak the p2p-node secure channel")]
    NotSecureChannel,
    /// A handshake message is longer than any of the secure channel's.
    #[error(
        "secure handshake failed: handshake message of {len} bytes (at most {max} expected): \
         not a p2p-node secure channel"
    )]
    Oversized {
        /// Its length.
        len: usize,
        /// The most expected at this step.
        max: usize,
    },
    /// A Noise handshake message does not parse or authenticate at `step` (for a reason
    /// other than the key: that is [`HandshakeError::KeyMismatch`]).
    #[error("secure handshake failed: {}", invalid(*.step))]
    Invalid {
        /// The message (1, 2 or 3).
        step: u8,
    },
    /// The fingerprint in message 1 has the wrong length.
    #[error(
        "secure handshake failed: the peer's first handshake message is invalid (a key \
         fingerprint of {len} bytes, {expected} expected)"
    )]
    FingerprintLength {
        /// Its length.
        len: usize,
        /// The length of a fingerprint.
        expected: usize,
    },
    /// The peer names a key (by fingerprint) that this node does not have.
    #[error(
        "secure handshake failed: cluster key mismatch: the peer uses a key this node does \
         not have: fingerprint {offered} (this node accepts {})",
        .accepted.join(", ")
    )]
    UnknownKey {
        /// The fingerprint the peer named.
        offered: String,
        /// The fingerprints this node accepts.
        accepted: Vec<String>,
    },
    /// The peer's handshake does not authenticate under the key: another key with the same
    /// fingerprint claim (acceptor, `fingerprint` of the key it names), or the responder's
    /// confirmation fails (initiator, `None`).
    #[error("secure handshake failed: {}", mismatch(.fingerprint.as_deref()))]
    KeyMismatch {
        /// The fingerprint of the key tried, as acceptor.
        fingerprint: Option<String>,
    },
    /// A handshake payload (the cipher negotiation of message 3) does not parse.
    #[error("secure handshake failed: the peer's handshake message {step} is malformed: {why}")]
    Payload {
        /// The message (3).
        step: u8,
        /// What is wrong.
        why: &'static str,
    },
    /// The initiator chose a transport cipher this node did not offer.
    #[error(
        "secure handshake failed: the peer chose transport cipher {id}, which this node did \
         not offer"
    )]
    CipherNotOffered {
        /// The id it named.
        id: u8,
    },
    /// The peer completed the Noise handshake without a static key.
    #[error("secure handshake failed: the peer presented no static key")]
    NoStaticKey,
    /// The Noise library failed (setup or a step that cannot fail on valid input).
    #[error("secure handshake failed: noise: {0}")]
    Noise(#[from] snow::Error),
    /// The peer closed the connection before the handshake completed.
    #[error("{}", closed(.stage))]
    PeerClosed {
        /// Where.
        stage: Stage,
    },
    /// The peer refused our handshake.
    #[error("peer rejected the handshake ({reason:?}): {}", Shown(.message))]
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
    /// With a cluster key: the node id the peer claims in its `Hello` or `Welcome` is not
    /// the one derived from the identity key it proved in the secure handshake (someone
    /// holding the cluster key pretends to be another node).
    #[error(
        "the peer claims node id {claimed} but its identity key proves node id {proven}: \
         refused (a node id must match the node's identity)"
    )]
    IdMismatch {
        /// The id in the peer's `Hello`/`Welcome`.
        claimed: NodeId,
        /// The id derived from the peer's authenticated static key.
        proven: NodeId,
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
    /// The peer did not complete the handshake in time.
    #[error("handshake not completed within {0:?}")]
    Timeout(Duration),
}

impl HandshakeError {
    /// See [`Error::is_permanent`]: a refusal either way, a key this node does not share,
    /// or a peer that does not speak the secure channel (including one that closes during
    /// it). A peer that closes during `Hello`, a bound, a timeout or an id mismatch is not.
    pub fn is_permanent(&self) -> bool {
        match self {
            HandshakeError::PeerClosed { stage } => matches!(stage, Stage::Secure { .. }),
            HandshakeError::IdMismatch { .. }
            | HandshakeError::Bound { .. }
            | HandshakeError::Timeout(_) => false,
            _ => true,
        }
    }
}

fn invalid(step: u8) -> &'static str {
    match step {
        1 => "the peer's first handshake message is invalid",
        2 => "the peer's handshake is invalid (not a p2p-node secure channel)",
        _ => "the peer's handshake message is invalid",
    }
}

fn mismatch(fingerprint: Option<&str>) -> String {
    match fingerprint {
        Some(f) => format!(
            "cluster key mismatch: the peer's handshake does not authenticate under the \
             cluster key it names (fingerprint {f})"
        ),
        None => "cluster key mismatch (the peer's confirmation does not authenticate)".into(),
    }
}

fn closed(stage: &Stage) -> String {
    match stage {
        Stage::Secure {
            dialled_with: Some(f),
        } => format!(
            "secure handshake failed: the peer closed the connection during the secure \
             handshake: it does not have this node's cluster key (fingerprint {f}) or has no \
             key, or it refused the connection"
        ),
        Stage::Secure { dialled_with: None } => {
            "secure handshake failed: the peer closed the connection during the secure handshake"
                .into()
        }
        Stage::Hello { .. } => "the peer closed the connection during the handshake".into(),
    }
}

/// Why an open (or opening) connection failed: its framing, its encryption, its timing or
/// the rules of the protocol.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
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
    /// An encrypted message failed authentication: it was tampered with, replayed,
    /// reordered, or a message before it was dropped.
    #[error(
        "an encrypted message failed authentication (tampered, replayed or reordered); \
         connection closed"
    )]
    Tampered,
    /// Nothing was heard from the peer for too long.
    #[error("peer silent for {0:?} (missed heartbeats)")]
    PeerTimeout(Duration),
    /// The peer closed the connection without saying goodbye.
    #[error("connection closed by peer without goodbye")]
    Lost,
    /// The peer broke a rule of the protocol.
    #[error("protocol violation: {0}")]
    Violation(Violation),
}

/// A rule of the protocol the peer broke.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// A message that is not allowed in the connection's state.
    Unexpected {
        /// The message kind received.
        got: &'static str,
        /// What the connection was doing.
        state: &'static str,
    },
    /// An assignment after either side said goodbye.
    AssignAfterGoodbye {
        /// The task's id (as the peer sent it).
        task: String,
    },
    /// More assignments in flight than this node's advertised capacity.
    OverCapacity {
        /// This node's capacity.
        capacity: u32,
    },
    /// An assignment whose seq is already in flight.
    DuplicateSeq(u64),
    /// A second `Goodbye`.
    SecondGoodbye,
    /// A second `StatusRequest` before the first was answered.
    SecondStatusRequest,
    /// A `Status` this side never asked for.
    UnaskedStatus,
    /// A `Status` over the protocol's bounds (too many tasks or too long a string).
    StatusOverBounds,
    /// A `StatusRequest` on a connection whose side does not answer them (a coordinator's).
    StatusNotServed,
    /// A hosted-run request before the previous one was answered.
    SecondHostedRequest,
    /// A hosted-run answer this side never asked for.
    UnaskedHosted,
    /// A hosted-run message over the protocol's bounds.
    HostedOverBounds,
    /// A replicated-run message over the protocol's bounds.
    ReplicaOverBounds,
    /// A file chunk of a transfer this side never asked for, or no longer expects (after
    /// its `Done`, the sender's `Abort`, or long after this side's own `Abort`).
    UnaskedChunk {
        /// The transfer id.
        id: u64,
    },
    /// A file chunk beyond the credit this side gave the transfer: it ends past the last
    /// `Ack` plus the window, or takes the bytes received past it.
    ChunkOverCredit {
        /// The transfer id.
        id: u64,
        /// Where the chunk ends, or the bytes received with it.
        end: u64,
        /// The credit given, in bytes.
        credit: u64,
    },
    /// An empty file chunk that is not the whole of an empty file (not the transfer's
    /// first chunk, not at offset 0, or a second one).
    EmptyChunk {
        /// The transfer id.
        id: u64,
        /// Its offset.
        offset: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Unexpected { got, state } => write!(f, "unexpected {got} while {state}"),
            Violation::AssignAfterGoodbye { task } => {
                write!(f, "assignment {} after goodbye", Shown(task))
            }
            Violation::OverCapacity { capacity } => {
                write!(
                    f,
                    "peer exceeded our capacity of {capacity} tasks in flight"
                )
            }
            Violation::DuplicateSeq(seq) => write!(f, "duplicate assignment seq {seq}"),
            Violation::SecondGoodbye => f.write_str("second Goodbye"),
            Violation::SecondStatusRequest => {
                f.write_str("a second StatusRequest before the first was answered")
            }
            Violation::UnaskedStatus => f.write_str("a Status nobody asked for"),
            Violation::StatusOverBounds => f.write_str(
                "a Status over the protocol's bounds (too many tasks or too long a string)",
            ),
            Violation::StatusNotServed => {
                f.write_str("a status request to a connection that does not answer them")
            }
            Violation::SecondHostedRequest => {
                f.write_str("a hosted-run request before the previous one was answered")
            }
            Violation::UnaskedHosted => f.write_str("a hosted-run answer nobody asked for"),
            Violation::HostedOverBounds => {
                f.write_str("a hosted-run message over the protocol's bounds")
            }
            Violation::ReplicaOverBounds => {
                f.write_str("a replicated-run message over the protocol's bounds")
            }
            Violation::UnaskedChunk { id } => write!(
                f,
                "a file chunk of transfer {id}, which this side did not ask for (or no longer \
                 expects)"
            ),
            Violation::ChunkOverCredit { id, end, credit } => write!(
                f,
                "a file chunk of transfer {id} beyond the credit this side gave: it reaches \
                 {end} bytes, the credit is {credit}"
            ),
            Violation::EmptyChunk { id, offset } => write!(
                f,
                "an empty file chunk of transfer {id} at offset {offset} that is not the \
                 whole of an empty file"
            ),
        }
    }
}

impl From<Violation> for Error {
    fn from(v: Violation) -> Self {
        Error::Connection(ConnectionError::Violation(v))
    }
}
