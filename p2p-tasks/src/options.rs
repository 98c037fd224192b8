//! Setters of the option structs ([`RunOptions`], [`Policy`], [`Backoff`]): they are
//! `#[non_exhaustive]`, so other crates start from `Default` and set what they need.
//!
//! ```
//! use std::time::Duration;
//! use p2p_tasks::{Order, RunOptions};
//!
//! let opts = RunOptions::default()
//!     .order(Order::None)
//!     .retries(2)
//!     .discovery_timeout(Duration::from_secs(10));
//! assert_eq!(opts.policy.retries, 2);
//! ```

use std::time::Duration;

use crate::{Backoff, Order, Policy, RunOptions};

impl RunOptions {
    /// The scheduling policy (order, retries, back-off, keep-going) as a whole.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The order rule ([`Policy::order`]). Default strict.
    pub fn order(mut self, order: Order) -> Self {
        self.policy.order = order;
        self
    }

    /// Failed attempts retried per task ([`Policy::retries`]). Default 0.
    pub fn retries(mut self, n: u32) -> Self {
        self.policy.retries = n;
        self
    }

    /// The delay before each retry ([`Policy::backoff`]). Default 100 ms doubling to 5 s,
    /// plus up to 20% jitter.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.policy.backoff = backoff;
        self
    }

    /// Continue after a task finally failed ([`Policy::keep_going`]). Default false.
    pub fn keep_going(mut self, yes: bool) -> Self {
        self.policy.keep_going = yes;
        self
    }

    /// Whether each assignment is reported as a [`crate::RunEvent::TaskAssigned`]
    /// ([`RunOptions::assignment_events`]). Default true.
    pub fn assignment_events(mut self, on: bool) -> Self {
        self.assignment_events = on;
        self
    }

    /// Whether each success is reported as a [`crate::RunEvent::TaskCompleted`], or only
    /// counted into [`crate::RunEvent::TasksSucceeded`] ([`RunOptions::success_events`]).
    /// Default true.
    pub fn success_events(mut self, on: bool) -> Self {
        self.success_events = on;
        self
    }

    /// The longest one attempt may run; zero means no limit. Default 1 hour.
    pub fn task_timeout(mut self, d: Duration) -> Self {
        self.task_timeout = d;
        self
    }

    /// How long to wait for nodes of every needed type. Default 3 s.
    pub fn discovery_timeout(mut self, d: Duration) -> Self {
        self.discovery_timeout = d;
        self
    }

    /// How long the goodbye exchange may take at the end. Default 5 s.
    pub fn goodbye_timeout(mut self, d: Duration) -> Self {
        self.goodbye_timeout = d;
        self
    }

    /// The largest frame the run may send. Default 16 MiB.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Where the outputs of tasks with files go (`DIR/ID/NAME`, with `DIR/ID/stdout` and
    /// `DIR/ID/meta.json`). Default `None`: `./results`, for tasks with files only.
    pub fn results(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.results = dir;
        self
    }

    /// The largest file the run fetches from a node ([`RunOptions::max_file`]). Default
    /// 4 GiB.
    pub fn max_file(mut self, bytes: u64) -> Self {
        self.max_file = bytes;
        self
    }
}

impl Policy {
    /// The order rule. Default strict.
    pub fn order(mut self, order: Order) -> Self {
        self.order = order;
        self
    }

    /// Failed attempts retried per task. Default 0.
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// The delay before each retry. Default 100 ms doubling to 5 s, plus up to 20% jitter.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Continue after a task finally failed. Default false.
    pub fn keep_going(mut self, yes: bool) -> Self {
        self.keep_going = yes;
        self
    }
}

impl Backoff {
    /// `first`, doubling each time up to `max`, plus up to `jitter` (a fraction from 0 to 1)
    /// of it at random.
    pub const fn new(first: Duration, max: Duration, jitter: f64) -> Backoff {
        Backoff { first, max, jitter }
    }
}
