//! Shared harness of the workspace integration suites: it runs the real `p2p-node` binary as
//! child processes that talk over loopback only.
//!
//! # Layout
//!
//! Every public name of the modules below is re-exported here, at the crate root.
//!
//! - `binary`: [`bin`] finds (and builds once per test process) `target/<profile>/p2p-node`;
//!   [`use_bin`] sets it instead where cargo says which binary it built.
//! - `process`: [`Serve`] starts `p2p-node serve`, reads the real address from its
//!   `listening on ADDR` line and collects its stdout and stderr; dropping it kills and reaps
//!   the process. [`run`] / [`run_in`] / [`spawn_in`] run a command under a hang guard;
//!   [`ChildGuard`], [`Lines`], [`run_bounded`], [`poll_until`].
//! - `safety`: the guard every command line passes ([`isolate`], [`SETTING_VARS`]).
//! - `files`: [`TestDir`] is a temporary directory per test; [`data_dir`] the nodes' data.
//! - `procfs`: [`open_tcp_on_port`] reads `/proc/net/tcp{,6}`; [`process_ended`] and
//!   [`peak_rss_kb`] read `/proc/PID`.
//! - `wire`: [`WireClient`] speaks the real protocol over a raw socket.
//! - [`netns`]: hosts in network namespaces (also used by p2p-discovery's unit tests);
//!   [`netfault`]: impaired links in a namespace; [`proxy`]: a loopback proxy that holds a
//!   stream still at an exact byte count.
//!
//! [`json_lines`] parses `--json` output.
//!
//! Safety: every helper refuses a command line that could send traffic off the machine (a
//! `serve` without a loopback `--listen`, a command without `--local`, `--peer` or
//! `--discovery none`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod netfault;
pub mod netns;
pub mod proxy;

mod binary;
mod files;
mod process;
mod procfs;
mod safety;
mod wire;

pub use binary::*;
pub use files::*;
pub use process::*;
pub use procfs::*;
pub use safety::*;
pub use wire::*;

/// The seed's task order (the repository's `tasks.txt`).
pub const SEED_ORDER: [&str; 11] = [
    "a1", "a2", "c1", "b1", "c2", "a3", "b2", "b3", "a4", "c3", "b4",
];

/// The event names `--json` may print (README.md's `--json` events).
pub const EVENT_NAMES: [&str; 11] = [
    "run_started",
    "peer_discovered",
    "peer_unreachable",
    "connected",
    "task_assigned",
    "task_completed",
    "task_failed",
    "task_cancelled",
    "task_retry",
    "disconnected",
    "summary",
];

/// Parses every non-empty line of `s` as JSON; panics naming the first line that is not.
pub fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

/// The events of `events` whose `event` field is `name`.
pub fn events_named<'a>(events: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}
