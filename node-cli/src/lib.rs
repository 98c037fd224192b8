//! The p2p-node binary's library: an embeddable [`Node`] that serves task types and runs
//! plans, and the command line that wraps it.
//!
//! # Layout
//!
//! - [`Node`] / [`NodeBuilder`]: build a node with handlers (shell commands, the built-in
//!   handler, or Rust closures), start it serving, and run plans over its peers.
//! - [`metrics`]: `NodeBuilder::metrics_listen`: `/metrics` (Prometheus) and `/healthz`.
//! - [`dial`]: the dialer of a run (discovered peers to links), generic over how it connects.
//!
//! The `p2p-node` command line (flags, the config file, how events are shown, the data
//! directory, the guard process) is the `cli` feature, on by default; it is not part of the
//! library's API. Embedders depend on `node-cli` with `default-features = false`.
//!
//! # Usage
//!
//! ```no_run
//! use node_cli::{parse, Node};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut worker = Node::builder().builtin("a").build().await?;
//! worker.start()?;
//! let addr = worker.local_addr().ok_or("not listening")?;
//!
//! let mut coordinator = Node::builder().build().await?;
//! let tasks = parse("inline", "a1 a2 a3")?;
//! let report = coordinator
//!     .run(tasks)
//!     .peer(addr)
//!     .on_event(|ev| println!("{ev:?}"))
//!     .await?;
//! assert!(report.is_success());
//! # Ok(()) }
//! ```

// The command line (the `cli` feature): private to the binary, which calls `__cli_main`.
#[cfg(feature = "cli")]
mod cli;
#[cfg(feature = "cli")]
mod config;
#[cfg(feature = "cli")]
mod datadir;
#[cfg(feature = "cli")]
mod entry;
#[cfg(feature = "cli")]
mod guard;
#[cfg(feature = "cli")]
mod help;
#[cfg(feature = "cli")]
mod logging;
#[cfg(feature = "cli")]
mod output;
// The `peers` and `status` commands' probes are the CLI's; a node's status answer is not.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
mod peers;
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
mod status;

pub mod dial;
mod error;
mod floods;
pub mod metrics;
mod node;
mod run;
mod sightings;

pub use error::Error;
pub use node::{
    Node, NodeBuilder, StopHandle, DEFAULT_CLUSTER, MAX_MAX_FRAME, MIN_MAX_FRAME, RESULT_MARGIN,
};
pub use run::{Events, Run, EVENT_QUEUE};

// What an embedder needs from the crates below, so that `node_cli` is the one dependency.
pub use p2p_core::net::Settings;
pub use p2p_core::{ClusterKey, Identity, NodeId};
/// Discovery backends and their configs (`discovery::udp::Config`, `discovery::statik::Static`,
/// the [`discovery::Kind::build`] factory); give them to [`NodeBuilder::discovery`].
pub use p2p_discovery as discovery;
pub use p2p_tasks::handler::{handler_fn, Builtin, Handler, TaskOutcome, TaskRequest};
pub use p2p_tasks::parse::{load, parse, ParseError};
pub use p2p_tasks::{
    Backoff, Journal, Order, Phase, Policy, RunEvent, RunOptions, RunReport, Status, Task,
    TaskResult,
};

/// The `p2p-node` program (not part of the library's API: the binary's `main` calls it).
#[cfg(feature = "cli")]
#[doc(hidden)]
pub fn __cli_main() -> std::process::ExitCode {
    entry::main()
}
