//! The p2p-node binary's library: an embeddable [`Node`] that serves task types and runs
//! plans, and the command line that wraps it.
//!
//! # Layout
//!
//! - [`Node`] / [`NodeBuilder`]: build a node with handlers (shell commands, the built-in
//!   handler, or Rust closures), start it serving, and run plans over its peers.
//! - [`cli`]: the `p2p-node` command line (serve, run, peers) and its exit statuses.
//! - [`config`]: the TOML config file (`--config`, `$P2P_CONFIG`, the XDG and /etc paths).
//! - [`datadir`]: the data directory, where nodes keep their identities between starts.
//! - [`guard`]: the process that ends a node's handler processes if the node is killed.
//! - [`help`]: `--version`, help headings, the man page, value lists for completions.
//! - [`logging`]: log levels for `-v` and colour (`NO_COLOR`).
//! - [`metrics`]: `serve --metrics-listen`: `/metrics` (Prometheus) and `/healthz`.
//! - [`output`]: how run events are shown (human lines or JSON lines).
//! - [`peers`]: the `peers` command's probe.
//! - [`status`]: the `status` command, and what a node answers it.
//! - [`dial`]: the dialer of a run (discovered peers to links), generic over how it connects.
//!
//! # Usage
//!
//! ```no_run
//! use node_cli::Node;
//! use p2p_tasks::{parse, RunOptions};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut worker = Node::builder().builtin("a").build().await?;
//! worker.start()?;
//! let addr = worker.local_addr().ok_or("not listening")?;
//!
//! let mut coordinator = Node::builder().build().await?;
//! let tasks = parse::parse("inline", "a1 a2 a3")?;
//! let report = coordinator
//!     .run(tasks, RunOptions::default(), vec![addr.to_string()], &mut |ev| println!("{ev:?}"))
//!     .await?;
//! assert!(report.is_success());
//! # Ok(()) }
//! ```

pub mod cli;
pub mod config;
pub mod datadir;
pub mod dial;
mod error;
mod floods;
pub mod guard;
pub mod help;
pub mod logging;
pub mod metrics;
mod node;
pub mod output;
pub mod peers;
mod sightings;
pub mod status;

pub use error::Error;
pub use node::{
    CapacityHandle, Node, NodeBuilder, StopHandle, DEFAULT_CLUSTER, MAX_MAX_FRAME, MIN_MAX_FRAME,
    RESULT_MARGIN,
};
