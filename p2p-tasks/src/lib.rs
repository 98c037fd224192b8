//! Tasks for p2p-node: what a task is, how a task file is read, how a plan is scheduled
//! across nodes, and how a node executes the tasks it is given.
//!
//! # Layout
//!
//! - [`task`]: the [`Task`] model (id, type, arguments, position in its file).
//! - [`parse`]: the task-file parser; every error names `file:line:col`.
//! - [`handler`]: the worker side's [`Handler`] trait, the shell-command handler and the
//!   built-in handler.
//! - [`journal`]: final results synced to disk, for `--resume`.
//! - [`plan`]: checks that a plan's dependencies and order mode leave no cycle.
//! - [`sched`]: the scheduler (order modes, least-loaded placement, retries), with no IO.
//! - [`worker`]: runs the tasks that peers assign, within the node's capacity.
//! - [`stats`]: the worker's counters (tasks by type, durations, what runs now).
//! - [`runcore`]: every rule of a run ([`RunCore`]), as a state machine with no IO.
//! - [`coordinator`]: the tokio driver of a run core over connected nodes; reports
//!   [`RunEvent`]s.
//! - [`event`]: the events of a run (what `--json` prints) and its final report.
//!
//! Every error of the crate is an [`Error`], whose variants carry typed details
//! ([`ParseError`], [`PlanError`], [`TaskError`], [`journal::JournalError`]).

pub mod admit;
pub mod cache;
pub mod coordinator;
mod error;
pub mod event;
mod file_writer;
pub mod handler;
pub mod journal;
pub mod node_files;
mod options;
pub mod parse;
pub mod plan;
pub mod resources;
pub mod run_files;
pub mod runcore;
pub mod sched;
pub mod stats;
pub mod task;
#[cfg(test)]
mod test_links;
pub mod worker;

pub use compact_str::CompactString;
pub use coordinator::{run, Inputs, PeerUpdate, RunOptions};
pub use error::{Error, TaskError};
pub use event::{Phase, RunEvent, RunReport, Status, TaskResult, EVENT_SCHEMA};
pub use handler::{Handler, TaskOutcome, TaskRequest};
pub use journal::Journal;
pub use parse::ParseError;
pub use plan::PlanError;
pub use runcore::{RunCore, RunError};
pub use sched::{Backoff, Order, Policy};
pub use task::{Task, TaskExtra};
pub use worker::Worker;
