//! The error type of the embeddable node.

use std::net::SocketAddr;

/// What can go wrong building or running a [`crate::Node`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; the message says what to change.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A discovery backend failed to start.
    #[error(transparent)]
    Discovery(#[from] p2p_discovery::Error),
    /// An identity file or the data directory cannot be used.
    #[error("identity {path}: {message}")]
    Identity {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The plan cannot run (a cycle under its order, or a task that cannot be sent: see
    /// [`p2p_tasks::Error`]).
    #[error("invalid plan: {0}")]
    Plan(#[from] p2p_tasks::Error),
    /// Other I/O failure.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
