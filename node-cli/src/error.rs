//! The error type of the embeddable node.

use std::net::SocketAddr;

/// What can go wrong building or running a [`crate::Node`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; the message says what to change.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A non-loopback address for an endpoint of a node without a cluster key: anyone who
    /// can reach it could use it. Give the node a key ([`crate::NodeBuilder::key`]), use a
    /// loopback address, or allow it ([`crate::NodeBuilder::insecure`]).
    #[error("refusing to {} on {addr} without a cluster key: anyone who can reach it {}", endpoint.verb(), endpoint.risk())]
    Unprotected {
        /// The address.
        addr: SocketAddr,
        /// Which endpoint.
        endpoint: Endpoint,
    },
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

/// An endpoint a node listens on ([`Error::Unprotected`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Endpoint {
    /// Where peers connect to run tasks ([`crate::NodeBuilder::listen`]).
    Listen,
    /// The metrics endpoint ([`crate::NodeBuilder::metrics_listen`]).
    Metrics,
}

impl Endpoint {
    /// What the node refuses to do: `listen` or `serve metrics`.
    pub fn verb(self) -> &'static str {
        match self {
            Endpoint::Listen => "listen",
            Endpoint::Metrics => "serve metrics",
        }
    }

    /// What anyone who reaches it could do.
    pub fn risk(self) -> &'static str {
        match self {
            Endpoint::Listen => "could run tasks here",
            Endpoint::Metrics => "could read what this node runs",
        }
    }
}
