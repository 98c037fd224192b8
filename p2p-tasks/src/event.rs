//! What a run reports as it goes: the events that `--json` prints one per line, and the
//! phases a person sees.

use std::sync::Arc;

use compact_str::CompactString;
use serde::{Serialize, Serializer};

/// The phases of a run, for a person's terminal (not part of the JSON stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Looking for nodes of the needed types.
    Discovering,
    /// Connections are being made.
    Connecting,
    /// Tasks are being assigned.
    Assigning,
    /// Saying goodbye to every node.
    Terminating,
    /// All connections are closed.
    Disconnected,
}

/// The version of the `--json` event stream ([`RunEvent::RunStarted`]'s `schema`), described
/// by `docs/events.schema.json`. It changes when a field is removed or changes meaning.
pub const EVENT_SCHEMA: u32 = 1;

/// One event of a run. Serialized as a JSON object whose `event` field names the variant
/// (`run_started`, `peer_discovered`, `peer_unreachable`, `connected`, `task_assigned`,
/// `task_completed`, `task_failed`, `task_cancelled`, `task_retry`, `disconnected`,
/// `summary`). A task's events share its id, type and node with the run (an inline
/// [`CompactString`], `Arc<str>`s): making one allocates nothing but its texts.
/// [`RunEvent::Phase`], [`RunEvent::Notice`], [`RunEvent::Flush`] and
/// [`RunEvent::TasksSucceeded`] are for people only and are never serialized. It reads back from
/// its JSON (`p2p-node attach` shows a hosted run's events as `run` does).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RunEvent {
    /// The run entered a phase.
    #[serde(skip)]
    Phase(Phase),
    /// Something a person should read (e.g. a node that could not be reached).
    #[serde(skip)]
    Notice(String),
    /// Events were reported and the run is about to wait for the network: a good moment to
    /// write out output buffered so far (one write per burst of events instead of one per
    /// line). Carries nothing.
    #[serde(skip)]
    Flush,
    /// This many tasks succeeded since the event before, reported by their number only:
    /// a run with [`crate::RunOptions::success_events`] off sends this instead of their
    /// [`RunEvent::TaskCompleted`]s, just before the next event of another kind (so a
    /// count of finished tasks stays exact at every event), and its report holds their
    /// results. Never serialized.
    #[serde(skip)]
    TasksSucceeded {
        /// How many.
        count: usize,
    },
    /// The run starts (the first event of a run).
    RunStarted {
        /// The event schema's version, [`EVENT_SCHEMA`].
        schema: u32,
        /// The run's id (32 hex digits).
        run: String,
        /// Tasks in the plan.
        tasks: usize,
        /// The order mode (`strict`, `type`, `none`).
        order: String,
    },
    /// Discovery reported a peer.
    PeerDiscovered {
        /// Where it is.
        addr: String,
        /// The backend that found it.
        source: String,
        /// Its node id, when discovery knows it.
        node: Option<String>,
    },
    /// A peer could not be reached, or refused the connection (another cluster, version or
    /// key); the run goes on with the others.
    PeerUnreachable {
        /// Where it was looked for.
        addr: String,
        /// Why it could not be used.
        error: String,
    },
    /// A connection to a node completed its handshake.
    Connected {
        /// The node id.
        node: String,
        /// Its address.
        addr: String,
        /// The types it serves.
        types: Vec<String>,
        /// Tasks it runs at once.
        capacity: u32,
    },
    /// A task was sent to a node.
    TaskAssigned {
        /// Task id.
        task: CompactString,
        /// Task type.
        #[serde(rename = "type", serialize_with = "shared_str")]
        kind: Arc<str>,
        /// Node id.
        #[serde(serialize_with = "shared_str")]
        node: Arc<str>,
        /// Attempt number (1 for the first).
        attempt: u32,
    },
    /// A task succeeded.
    TaskCompleted {
        /// Task id.
        task: CompactString,
        /// Task type.
        #[serde(rename = "type", serialize_with = "shared_str")]
        kind: Arc<str>,
        /// Node id.
        #[serde(serialize_with = "shared_str")]
        node: Arc<str>,
        /// Attempt number.
        attempt: u32,
        /// Always true.
        ok: bool,
        /// The task's output.
        output: CompactString,
        /// How long the handler ran.
        duration_ms: f64,
    },
    /// A task failed for good (no retries left, or it could not be run at all).
    TaskFailed {
        /// Task id.
        task: CompactString,
        /// Task type.
        #[serde(rename = "type", serialize_with = "shared_str")]
        kind: Arc<str>,
        /// Node id of the last attempt, empty when it never ran.
        #[serde(serialize_with = "shared_str")]
        node: Arc<str>,
        /// Attempt number of the last attempt (0 when it never ran).
        attempt: u32,
        /// Always false.
        ok: bool,
        /// The task's output.
        output: CompactString,
        /// How long the last attempt ran.
        duration_ms: f64,
        /// The handler's exit code, when it exited.
        exit_code: Option<i32>,
        /// Why it failed.
        error: String,
    },
    /// A running task was cancelled because the run was interrupted (or had to stop): it
    /// did not fail, and it is not retried.
    TaskCancelled {
        /// Task id.
        task: CompactString,
        /// Task type.
        #[serde(rename = "type", serialize_with = "shared_str")]
        kind: Arc<str>,
        /// Node id of the attempt.
        #[serde(serialize_with = "shared_str")]
        node: Arc<str>,
        /// Attempt number.
        attempt: u32,
        /// What the task printed before it was stopped.
        output: CompactString,
        /// How long the attempt ran.
        duration_ms: f64,
    },
    /// An attempt failed and the task will run again.
    TaskRetry {
        /// Task id.
        task: CompactString,
        /// Task type.
        #[serde(rename = "type", serialize_with = "shared_str")]
        kind: Arc<str>,
        /// Node id of the failed attempt.
        #[serde(serialize_with = "shared_str")]
        node: Arc<str>,
        /// The attempt that failed.
        attempt: u32,
        /// Why it failed.
        error: String,
        /// Back-off before the next attempt.
        delay_ms: u64,
    },
    /// A connection closed.
    Disconnected {
        /// Node id.
        node: String,
        /// Its address.
        addr: String,
        /// Whether the goodbye exchange completed.
        clean: bool,
        /// What went wrong, when it was not clean.
        error: Option<String>,
    },
    /// The end of the run.
    Summary {
        /// Tasks in the plan.
        total: usize,
        /// Tasks that succeeded.
        succeeded: usize,
        /// Tasks that failed.
        failed: usize,
        /// Tasks that were running when the run was interrupted, and were stopped.
        cancelled: usize,
        /// Tasks that never ran (stopped after a failure, interrupted, no node, or a
        /// dependency failed).
        not_run: usize,
        /// Tasks counted as succeeded because the journal of an earlier run says so.
        resumed: usize,
        /// Needed types that had no node.
        missing_types: Vec<String>,
        /// Wall time of the run.
        elapsed_ms: f64,
        /// Whether the run was interrupted (Ctrl-C, SIGTERM).
        interrupted: bool,
    },
}

/// How a task ended in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// It succeeded.
    Succeeded,
    /// It failed.
    Failed,
    /// It was running when the run was interrupted, and was stopped.
    Cancelled,
    /// It never ran.
    NotRun,
}

/// The final record of one task.
///
/// A run keeps one per task, so it is kept small (120 bytes, and no heap block for a short
/// id or output): the type and the node id are shared (`Arc<str>`) by every task of that
/// type and every task that node ran, and the id and the output are [`CompactString`]s,
/// kept inline up to 24 bytes (`Executing task: a1000000` is 24).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct TaskResult {
    /// Task id.
    pub task: CompactString,
    /// Task type.
    #[serde(rename = "type", serialize_with = "shared_str")]
    pub kind: Arc<str>,
    /// How it ended.
    pub status: Status,
    /// Node id of the last attempt.
    #[serde(serialize_with = "shared_opt_str")]
    pub node: Option<Arc<str>>,
    /// Attempts made.
    pub attempts: u32,
    /// Duration of the last attempt in milliseconds.
    pub duration_ms: f64,
    /// Output of the last attempt.
    pub output: CompactString,
    /// Why it failed (or did not run), when it did.
    pub error: Option<String>,
    /// Whether the success was recorded by an earlier run (`--resume`).
    pub resumed: bool,
}

impl TaskResult {
    /// A record of `task` (of type `kind`) with `status`, no node, no attempt and no output;
    /// set the public fields for the rest (for reports made outside a run, e.g. in tests).
    pub fn new(task: impl AsRef<str>, kind: impl AsRef<str>, status: Status) -> Self {
        TaskResult {
            task: CompactString::from(task.as_ref()),
            kind: Arc::from(kind.as_ref()),
            status,
            node: None,
            attempts: 0,
            duration_ms: 0.0,
            output: CompactString::default(),
            error: None,
            resumed: false,
        }
    }
}

fn shared_str<S: Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s)
}

fn shared_opt_str<S: Serializer>(s: &Option<Arc<str>>, ser: S) -> Result<S::Ok, S::Error> {
    match s {
        Some(s) => ser.serialize_some(&**s),
        None => ser.serialize_none(),
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RunReport {
    /// Every task, in file order.
    pub results: Vec<TaskResult>,
    /// Needed types that had no node.
    pub missing_types: Vec<String>,
    /// Whether the run was interrupted (Ctrl-C, shutdown).
    pub interrupted: bool,
    /// Why the run stopped early, when something other than a task failed (e.g. its
    /// journal could not be written).
    pub error: Option<String>,
    /// Wall time in milliseconds.
    pub elapsed_ms: f64,
    /// What the run learned of each node's speed, per type it measured (node id order).
    pub speeds: Vec<NodeSpeed>,
}

/// A node's learned speed for one type: the run's estimate of an attempt's time per unit of
/// cost (see [`crate::sched`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeSpeed {
    /// The node id.
    pub node: String,
    /// The type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Estimated milliseconds per unit of cost.
    pub ms_per_cost: f64,
}

impl RunReport {
    /// A report of `results` that was not interrupted, with no error and no elapsed time; set
    /// the public fields for the rest.
    pub fn new(results: Vec<TaskResult>) -> Self {
        RunReport {
            results,
            missing_types: Vec::new(),
            interrupted: false,
            error: None,
            elapsed_ms: 0.0,
            speeds: Default::default(),
        }
    }

    /// Tasks that succeeded.
    pub fn succeeded(&self) -> usize {
        self.tally().succeeded
    }

    /// Tasks that failed.
    pub fn failed(&self) -> usize {
        self.tally().failed
    }

    /// Tasks stopped because the run was interrupted.
    pub fn cancelled(&self) -> usize {
        self.tally().cancelled
    }

    /// Tasks that never ran.
    pub fn not_run(&self) -> usize {
        self.tally().not_run
    }

    /// Tasks counted as succeeded from the journal of an earlier run.
    pub fn resumed(&self) -> usize {
        self.tally().resumed
    }

    /// The [`RunEvent::Summary`] of this report: every count from one pass over the
    /// results (a million of them are 120 MB, which a pass reads from memory, not cache).
    pub fn summary(&self) -> RunEvent {
        let t = self.tally();
        RunEvent::Summary {
            total: self.results.len(),
            succeeded: t.succeeded,
            failed: t.failed,
            cancelled: t.cancelled,
            not_run: t.not_run,
            resumed: t.resumed,
            missing_types: self.missing_types.clone(),
            elapsed_ms: self.elapsed_ms,
            interrupted: self.interrupted,
        }
    }

    /// Whether every task succeeded (stops at the first that did not).
    pub fn is_success(&self) -> bool {
        !self.interrupted
            && self.error.is_none()
            && self.results.iter().all(|r| r.status == Status::Succeeded)
    }

    /// Every count of the summary, in one pass.
    fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for r in &self.results {
            match r.status {
                Status::Succeeded => t.succeeded += 1,
                Status::Failed => t.failed += 1,
                Status::Cancelled => t.cancelled += 1,
                Status::NotRun => t.not_run += 1,
            }
            t.resumed += usize::from(r.resumed);
        }
        t
    }
}

/// The counts of a report's results by how they ended.
#[derive(Debug, Default)]
struct Tally {
    succeeded: usize,
    failed: usize,
    cancelled: usize,
    not_run: usize,
    resumed: usize,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn events_read_back_from_their_json_with_a_time_appended() {
        let shared = |s: &str| Arc::<str>::from(s);
        let events = [
            RunEvent::RunStarted {
                schema: EVENT_SCHEMA,
                run: "r".into(),
                tasks: 3,
                order: "none".into(),
            },
            RunEvent::TaskCompleted {
                task: "a1".into(),
                kind: shared("a"),
                node: shared("n1"),
                attempt: 2,
                ok: true,
                output: "out\nmore".into(),
                duration_ms: 1.5,
            },
            RunEvent::Disconnected {
                node: "n1".into(),
                addr: "127.0.0.1:1".into(),
                clean: false,
                error: Some("gone".into()),
            },
            RunReport::new(vec![TaskResult::new("a1", "a", Status::Succeeded)]).summary(),
        ];
        for ev in events {
            let mut v = serde_json::to_value(&ev).unwrap();
            // What `--json` and `attach` carry: the same object with its time last.
            v["ts"] = "2026-12-01T00:00:00Z".into();
            let back: RunEvent = serde_json::from_value(v).unwrap();
            assert_eq!(back, ev);
        }
    }

    /// The summary's counts from one pass equal those of a filter per status, on random
    /// reports (every status, resumed successes, interrupted or not, an error or not).
    #[test]
    fn the_summary_counts_as_a_filter_per_status_would() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let statuses = [
            Status::Succeeded,
            Status::Failed,
            Status::Cancelled,
            Status::NotRun,
        ];
        for round in 0..200 {
            let n = (rnd() % 300) as usize;
            // Some reports all successes, so that `is_success` is seen true too.
            let all_ok = round % 4 == 0;
            let results: Vec<TaskResult> = (0..n)
                .map(|i| {
                    let status = if all_ok {
                        Status::Succeeded
                    } else {
                        statuses[(rnd() % 4) as usize]
                    };
                    let mut r = TaskResult::new(format!("t{i}"), "a", status);
                    r.resumed = status == Status::Succeeded && rnd() % 3 == 0;
                    r
                })
                .collect();
            let mut report = RunReport::new(results);
            report.interrupted = rnd() % 5 == 0;
            if rnd() % 5 == 0 {
                report.error = Some("journal".into());
            }
            let of = |s: Status| report.results.iter().filter(|r| r.status == s).count();
            let want = RunEvent::Summary {
                total: n,
                succeeded: of(Status::Succeeded),
                failed: of(Status::Failed),
                cancelled: of(Status::Cancelled),
                not_run: of(Status::NotRun),
                resumed: report.results.iter().filter(|r| r.resumed).count(),
                missing_types: Vec::new(),
                elapsed_ms: 0.0,
                interrupted: report.interrupted,
            };
            assert_eq!(report.summary(), want);
            assert_eq!(
                report.is_success(),
                !report.interrupted && report.error.is_none() && of(Status::Succeeded) == n
            );
            assert_eq!(
                (report.succeeded(), report.failed(), report.cancelled()),
                (
                    of(Status::Succeeded),
                    of(Status::Failed),
                    of(Status::Cancelled)
                )
            );
            assert_eq!(report.not_run(), of(Status::NotRun));
        }
    }

    #[test]
    fn a_result_is_120_bytes_and_keeps_a_short_id_and_output_inline() {
        assert_eq!(std::mem::size_of::<TaskResult>(), 120);
        let mut r = TaskResult::new("a1000000", "a", Status::Succeeded);
        r.output = CompactString::from("Executing task: a1000000");
        assert!(!r.task.is_heap_allocated() && !r.output.is_heap_allocated());
        // The JSON is unchanged: plain strings.
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["task"], "a1000000");
        assert_eq!(json["output"], "Executing task: a1000000");
        assert_eq!(json["type"], "a");
    }
}
