//! p2p-node as a library: an embeddable [`Node`] that serves task types with handlers
//! (Rust closures, shell commands, the built-in one) and runs plans of ordered, typed tasks
//! over its peers. The `p2p-node` binary is this library plus its command line.
//!
//! # Depending on it
//!
//! ```toml
//! [dependencies]
//! node-cli = { path = "../node-cli", default-features = false }
//! tokio = { version = "1", features = ["macros", "rt"] }
//! ```
//!
//! The `cli` feature (on by default) is the `p2p-node` binary and what only it needs (flags,
//! the config file, the progress bar, log output, the guard process); without it, none of
//! clap, indicatif, toml, tracing-subscriber or anyhow is compiled. Everything an embedder
//! needs is exported here; the crates below (`p2p_core`, `p2p_tasks`, `p2p_discovery`) need
//! not be named.
//!
//! # A node
//!
//! [`Node::builder`] gives a [`NodeBuilder`]: handlers per task type ([`handler_fn`] turns an
//! async closure into a [`Handler`]), a cluster name and keys ([`ClusterKey`]), an
//! [`Identity`], discovery backends ([`discovery`]), limits. [`NodeBuilder::build`] validates
//! them ([`Error::Config`]) and binds the listener; [`Node::start`] serves in the background,
//! [`Node::serve`] until the shutdown token fires; [`Node::drain`] lets running tasks finish.
//! Dropping a node stops it at once: listener, connections, tasks, discovery.
//!
//! # A run
//!
//! [`Node::run`] takes the tasks ([`Task::new`], or a task file read by [`parse`] or
//! [`load`]) and returns a [`Run`] to configure and `.await`: [`RunOptions`] (order, retries,
//! timeouts), extra peers ([`Run::peer`]), a [`Journal`], events as they happen
//! ([`Run::on_event`], or the bounded stream [`Run::events`]). It resolves to a
//! [`RunReport`], or to an [`Error`] when the plan cannot run. The node's discovery starts
//! once and serves every run; dropping a run's future stops its dialer and its connections.
//! The library writes nothing to stdout or stderr and installs no log subscriber: it logs
//! with `tracing`, for the embedder's subscriber if it has one.
//!
//! # The program an embedder writes
//!
//! ```
//! use std::time::Duration;
//!
//! use node_cli::{handler_fn, Node, RunEvent, RunOptions, Task, TaskOutcome};
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let mut worker = Node::builder()
//!         .handler(
//!             "resize",
//!             handler_fn(|req| async move { TaskOutcome::success(format!("resized {}", req.id)) }),
//!         )
//!         .build()
//!         .await?;
//!     worker.start()?;
//!     let addr = worker.local_addr().ok_or("the worker is not listening")?;
//!
//!     let mut coordinator = Node::builder().build().await?;
//!     // A task's id need not start with its type.
//!     let tasks = vec![
//!         Task::new("photo-001.jpg", "resize")?,
//!         Task::new("photo-002.jpg", "resize")?,
//!     ];
//!     let mut completed = 0;
//!     let report = coordinator
//!         .run(tasks)
//!         .options(RunOptions::default())
//!         .peer(addr)
//!         .on_event(|ev| {
//!             if let RunEvent::TaskCompleted { .. } = ev {
//!                 completed += 1;
//!             }
//!         })
//!         .await?;
//!     assert!(report.is_success(), "both tasks succeed");
//!     assert_eq!(completed, 2, "one TaskCompleted per task");
//!
//!     // A plan its order cannot run is an error from the library, not a hang.
//!     let bad = node_cli::parse("inline", "a1 after b2\nb2")?;
//!     let second =
//!         tokio::time::timeout(Duration::from_secs(10), coordinator.run(bad).peer(addr)).await;
//!     assert!(
//!         matches!(second, Ok(Err(_))),
//!         "an unrunnable plan returns an error at once"
//!     );
//!
//!     worker.shutdown();
//!     worker.drain().await;
//!     println!("embedded: 2 tasks ran through node_cli alone; an unrunnable plan was refused");
//!     Ok(())
//! }
//! ```
//!
//! More in `node-cli/examples` (`embedder`, `embedded`, `worker` and `coordinator`).
//!
//! # Layout
//!
//! - [`Node`] / [`NodeBuilder`] (`node.rs`): a node, its listener and connections.
//! - [`Run`] / [`Events`] (`run.rs`): one run of a plan.
//! - [`dial`]: the dialer of a run (discovered peers to links), generic over how it
//!   connects (the simulation suite gives it a simulated network).
//! - [`hosted`]: runs a serving node hosts for clients (`submit`, `attach`), journaled in
//!   its data directory and resumed after a restart.
//! - [`metrics`]: [`NodeBuilder::metrics_listen`]: `/metrics` (Prometheus) and `/healthz`.
//! - The command line (`cli.rs`, `config.rs`, `output.rs`, `peers.rs`, `help.rs`,
//!   `datadir.rs`, `guard.rs`, `logging.rs`, `entry.rs`, `report.rs` for `run --report`) is private to the `cli` feature.

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
#[cfg(feature = "cli")]
mod report;
// The `peers` and `status` commands' probes are the CLI's; a node's status answer is not.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
mod peers;
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
mod status;

pub mod dial;
mod error;
pub mod fdlimit;
mod floods;
pub mod hosted;
pub mod metrics;
mod node;
mod run;
mod sightings;

pub use error::{Endpoint, Error};
pub use node::{
    CapacityHandle, InProcess, Node, NodeBuilder, StopHandle, DEFAULT_CLUSTER, MAX_MAX_FRAME,
    MIN_MAX_FRAME, RESULT_MARGIN,
};
pub use run::{Events, Run, EVENT_QUEUE};

// What an embedder needs from the crates below, so that `node_cli` is the one dependency.
pub use p2p_core::{ClusterKey, Identity, NodeId};
/// Discovery backends and their configs (`discovery::udp::Config`, `discovery::statik::Static`,
/// the [`discovery::Kind::build`] factory); give them to [`NodeBuilder::discovery`].
pub use p2p_discovery as discovery;
pub use p2p_tasks::handler::{handler_fn, Builtin, Handler, TaskOutcome, TaskRequest};
pub use p2p_tasks::parse::{load, parse, ParseError};
/// The error of tasks, task files, plans and journals ([`Error::Plan`] carries it).
pub use p2p_tasks::Error as TasksError;
pub use p2p_tasks::{
    Backoff, Journal, Order, Phase, PlanError, Policy, RunEvent, RunOptions, RunReport, Status,
    Task, TaskError, TaskResult,
};

/// The `p2p-node` program (not part of the library's API: the binary's `main` calls it).
#[cfg(feature = "cli")]
#[doc(hidden)]
pub fn __cli_main() -> std::process::ExitCode {
    entry::main()
}
