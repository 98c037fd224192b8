//! The wire protocol of p2p-node.
//!
//! # Layout
//!
//! - [`message`]: the messages of protocol v1 ([`Message`], [`Hello`], [`Assign`], ...).
//! - [`wire`]: the payload encoding (bincode 2), kept behind one small module.
//! - [`codec`]: framing (4-byte big-endian length + payload) with a maximum frame size that
//!   is enforced before any allocation.
//! - [`conn`]: the connection state machine (handshake, heartbeats, task bookkeeping,
//!   goodbye) with no IO in it.
//! - [`hosted`]: the messages of hosted runs (submit, list, status, attach, cancel).
//! - [`net`]: the thin tokio driver that runs a [`conn::Connection`] on a TCP socket.
//! - [`file`](mod@file): opening user-named files without blocking on a FIFO, regular files only.
//! - [`key`]: the cluster key ([`ClusterKey`]) and its file format.
//! - [`identity`]: a node's persistent identity ([`Identity`]: the X25519 static key of the
//!   secure handshake, from which the [`NodeId`] derives) and its file format.
//! - [`secure`]: the secure channel (Noise handshake under the cluster key, then encrypted
//!   frames); [`net`] uses it when [`net::Settings::key`] is set, and then checks that the
//!   peer's node id is the one its identity proves.
//! - [`gate`]: a bound on connections still in handshake, evicting the oldest when full,
//!   and [`gate::LogLimit`], which turns a flood of one warning into a summary line.
//! - [`shown`]: how a peer-supplied string is shown in logs and errors (escaped, cut short).
//! - [`text`]: peer-supplied text escaped for a terminal or a log line.
//! - [`NodeId`]: node identity.
//!
//! # Usage
//!
//! ```
//! use bytes::BytesMut;
//! use p2p_core::{codec::FrameCodec, Message};
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let mut codec = FrameCodec::new(64 * 1024);
//! let mut buf = BytesMut::new();
//! codec.encode(&Message::Ping { nonce: 7 }, &mut buf)?;
//! assert_eq!(codec.decode(&mut buf)?, Some(Message::Ping { nonce: 7 }));
//! # Ok::<(), p2p_core::Error>(())
//! ```

pub mod codec;
pub mod conn;
mod error;
pub mod file;
pub mod gate;
pub mod hosted;
mod id;
pub mod identity;
pub mod key;
pub mod message;
pub mod net;
pub mod replica;
pub mod secure;
pub mod shown;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod text;
pub mod transfer;
pub mod wire;

pub use error::{ConnectionError, Error, HandshakeError, Stage, Violation};
pub use id::NodeId;
pub use identity::{Identity, IdentityError};
pub use key::{ClusterKey, KeyError};
pub use message::{
    Assign, Completed, ContentHash, Hello, LoadReport, Message, Reject, RejectReason, Transfer,
    PROTOCOL_VERSION,
};
