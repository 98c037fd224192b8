//! The messages of hosted runs (protocol v3): a client asks a serving node to host a run
//! (`p2p-node submit`), lists the runs it hosts, asks one's status, attaches to its events
//! or cancels it. All of them travel in one [`crate::Message::Hosted`] variant.
//!
//! A client sends one request ([`Hosted::is_request`]) on an established connection and
//! reads the answers until a final one ([`Hosted::is_final`]); only then may it send the
//! next. `Attach` is answered by any number of [`Hosted::Event`]s, then a final
//! [`Hosted::Ended`] (or [`Hosted::Refused`]). A node that does not host runs answers every
//! request with `Refused`. Every field has a bound ([`Hosted::is_bounded`]); a message over
//! them closes the connection.

use serde::{Deserialize, Serialize};

/// The longest run id, in bytes (ids are 32 hex digits).
pub const MAX_RUN_ID: usize = 64;

/// The longest refusal reason, plan name or task id or node id in these messages, in bytes.
pub const MAX_HOSTED_STRING: usize = 1024;

/// The most runs a [`Hosted::Runs`] lists.
pub const MAX_LISTED_RUNS: usize = 1024;

/// The most tasks a [`RunDetail`] lists (it still counts them all).
pub const MAX_LISTED_TASKS: usize = 1024;

/// The longest input path a [`SubmitFiles`] names (as the task file writes it), in bytes.
pub const MAX_INPUT_PATH: usize = 4096;

/// The most distinct input files one [`SubmitFiles`] names.
pub const MAX_SUBMITTED_INPUTS: usize = 4096;

/// The longest path of a [`ResultFile`] (relative to the run's results), in bytes.
pub const MAX_RESULT_PATH: usize = 1024;

/// The most bytes one [`Hosted::ResultData`] carries.
pub const MAX_RESULT_DATA: usize = 64 * 1024;

/// One hosted-run message: a request of a client or an answer of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hosted {
    /// Host this plan (request); answered by `Submitted` or `Refused`.
    Submit(Box<Submit>),
    /// The runs the node hosts (request); answered by `Runs`.
    List,
    /// One run's progress and tasks (request); answered by `RunStatus` or `Refused`.
    Status {
        /// The run's id.
        run: String,
    },
    /// The run's events from where it is, then its end (request); answered by `Event`s
    /// and `Ended`, or `Refused`.
    Attach {
        /// The run's id.
        run: String,
    },
    /// Stop the run (request); answered by `Cancelled` or `Refused`.
    Cancel {
        /// The run's id.
        run: String,
    },
    /// The run is hosted and journaled; this is its id (final).
    Submitted {
        /// The run's id.
        run: String,
    },
    /// The request is refused; why (final).
    Refused {
        /// Human-readable reason.
        reason: String,
    },
    /// The runs the node hosts, newest first (final).
    Runs(Vec<RunInfo>),
    /// One run's status (final).
    RunStatus(Box<RunDetail>),
    /// One event of an attached run: the JSON object `run --json` prints (not final).
    Event {
        /// The event as one line of JSON.
        json: String,
    },
    /// The attached run ended (final).
    Ended(RunEnd),
    /// The run is being cancelled (final); an attached client gets its `Ended`.
    Cancelled {
        /// The run's id.
        run: String,
    },
    /// Host this plan, whose input files the client has already offered to the host on this
    /// connection (`Transfer::Offer`, answered `Have` or `Done`) (request); answered by
    /// `Submitted` or `Refused`. A plan without `< PATH` inputs is sent as `Submit`.
    SubmitFiles(Box<SubmitFiles>),
    /// The files a run's tasks left in its results (their `stdout`, `stderr`, `meta.json`
    /// and declared outputs) (request); answered by a `ResultFile` per file, each followed
    /// by its bytes in `ResultData`s, then `ResultsDone`, or `Refused`.
    Results {
        /// The run's id.
        run: String,
    },
    /// One file of a run's results; its bytes follow in `ResultData`s (not final).
    ResultFile(ResultFile),
    /// The next bytes of the last `ResultFile` (not final).
    ResultData {
        /// At most [`MAX_RESULT_DATA`] bytes.
        data: Vec<u8>,
    },
    /// Every result file was sent (final).
    ResultsDone {
        /// How many files were sent.
        files: u64,
    },
}

/// A plan to host with its input files ([`Hosted::SubmitFiles`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitFiles {
    /// The plan and its options.
    pub submit: Submit,
    /// Each distinct input path of the plan (`< PATH`), as the task file writes it, and the
    /// hash of the file it names on the client's side.
    pub inputs: Vec<SubmittedInput>,
}

/// One input file of a submitted plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmittedInput {
    /// The path as the task file writes it (`< PATH`).
    pub path: String,
    /// The file's content hash (the host has it in its file cache).
    pub hash: crate::message::ContentHash,
    /// The file's size in bytes.
    pub size: u64,
}

/// One file of a run's results ([`Hosted::ResultFile`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultFile {
    /// Its path relative to the run's results, `/`-separated (`a1/stdout`, `a1/out/x.csv`).
    pub path: String,
    /// Its size in bytes: that many bytes follow in `ResultData`s.
    pub size: u64,
}

/// A plan to host: the task file's text, parsed by the host, and the run options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submit {
    /// The task file's name, for messages.
    pub name: String,
    /// The task file's text.
    pub text: String,
    /// How to run it.
    pub options: SubmitOptions,
}

/// The run options a submit carries (those of `p2p-node run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitOptions {
    /// 0 strict, 1 type, 2 none.
    pub order: u8,
    /// Retries of a failed task.
    pub retries: u32,
    /// Keep running what does not depend on a failed task.
    pub keep_going: bool,
    /// Delay before the first retry, in milliseconds.
    pub retry_backoff_ms: u64,
    /// Longest delay between retries, in milliseconds.
    pub retry_backoff_max_ms: u64,
    /// Longest a task attempt may run, in milliseconds (0: no limit).
    pub task_timeout_ms: u64,
    /// How long to wait for nodes of every needed type, in milliseconds.
    pub discovery_timeout_ms: u64,
}

/// The state of a hosted run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// It runs (or resumes).
    Running,
    /// Every task succeeded.
    Succeeded,
    /// It ended and a task failed (or a needed type had no node).
    Failed,
    /// It was cancelled.
    Cancelled,
    /// Its host stopped while it ran; it resumes when the host starts again.
    Interrupted,
}

impl RunState {
    /// Its name (`running`, `succeeded`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Interrupted => "interrupted",
        }
    }

    /// Whether the run is over for good (it will not resume).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }
}

/// One hosted run, as `p2p-node runs` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The run's id.
    pub run: String,
    /// The task file's name.
    pub name: String,
    /// Its state.
    pub state: RunState,
    /// Tasks in the plan.
    pub total: u64,
    /// Tasks that succeeded.
    pub succeeded: u64,
    /// Tasks that failed for good.
    pub failed: u64,
    /// Tasks running now.
    pub running: u64,
    /// When it was submitted (Unix time, milliseconds).
    pub started_ms: u64,
    /// When it ended (Unix time, milliseconds), if it did.
    pub ended_ms: Option<u64>,
}

/// One task of a run, as `p2p-node status --run` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLine {
    /// Task id.
    pub task: String,
    /// `pending`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// The node it runs (or last ran) on, empty if none.
    pub node: String,
}

/// One run's status: its summary and its tasks (running ones first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunDetail {
    /// The summary.
    pub info: RunInfo,
    /// At most [`MAX_LISTED_TASKS`] tasks: the running ones, then the others in file order.
    pub tasks: Vec<TaskLine>,
}

/// How an attached run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEnd {
    /// The run's id.
    pub run: String,
    /// Its state (`succeeded`, `failed`, `cancelled`, or `interrupted` when its host stops).
    pub state: RunState,
    /// The exit status `p2p-node run` would have had (0, 1, 130, 143).
    pub exit: u8,
}

impl Hosted {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Hosted::Submit(_) => "Submit",
            Hosted::List => "List",
            Hosted::Status { .. } => "RunStatusRequest",
            Hosted::Attach { .. } => "Attach",
            Hosted::Cancel { .. } => "CancelRun",
            Hosted::Submitted { .. } => "Submitted",
            Hosted::Refused { .. } => "Refused",
            Hosted::Runs(_) => "Runs",
            Hosted::RunStatus(_) => "RunStatus",
            Hosted::Event { .. } => "Event",
            Hosted::Ended(_) => "Ended",
            Hosted::Cancelled { .. } => "Cancelled",
            Hosted::SubmitFiles(_) => "SubmitFiles",
            Hosted::Results { .. } => "Results",
            Hosted::ResultFile(_) => "ResultFile",
            Hosted::ResultData { .. } => "ResultData",
            Hosted::ResultsDone { .. } => "ResultsDone",
        }
    }

    /// Whether a client sends it (else a host answers with it).
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Hosted::Submit(_)
                | Hosted::List
                | Hosted::Status { .. }
                | Hosted::Attach { .. }
                | Hosted::Cancel { .. }
                | Hosted::SubmitFiles(_)
                | Hosted::Results { .. }
        )
    }

    /// Whether it is the last answer to a request.
    pub fn is_final(&self) -> bool {
        !self.is_request()
            && !matches!(
                self,
                Hosted::Event { .. } | Hosted::ResultFile(_) | Hosted::ResultData { .. }
            )
    }

    /// Whether every field is within the bounds of the protocol. A submit's text and an
    /// event's JSON are bounded by the frame only (the host applies its own plan limit).
    pub fn is_bounded(&self) -> bool {
        let id = |s: &String| s.len() <= MAX_RUN_ID;
        let text = |s: &String| s.len() <= MAX_HOSTED_STRING;
        let info = |i: &RunInfo| id(&i.run) && text(&i.name);
        match self {
            Hosted::Submit(s) => text(&s.name) && s.options.order <= 2,
            Hosted::SubmitFiles(f) => {
                text(&f.submit.name)
                    && f.submit.options.order <= 2
                    && f.inputs.len() <= MAX_SUBMITTED_INPUTS
                    && f.inputs.iter().all(|i| i.path.len() <= MAX_INPUT_PATH)
            }
            Hosted::Results { run } => id(run),
            Hosted::ResultFile(f) => f.path.len() <= MAX_RESULT_PATH,
            Hosted::ResultData { data } => data.len() <= MAX_RESULT_DATA,
            Hosted::ResultsDone { .. } => true,
            Hosted::List => true,
            Hosted::Status { run }
            | Hosted::Attach { run }
            | Hosted::Cancel { run }
            | Hosted::Submitted { run }
            | Hosted::Cancelled { run } => id(run),
            Hosted::Refused { reason } => text(reason),
            Hosted::Runs(runs) => runs.len() <= MAX_LISTED_RUNS && runs.iter().all(info),
            Hosted::RunStatus(d) => {
                info(&d.info)
                    && d.tasks.len() <= MAX_LISTED_TASKS
                    && d.tasks
                        .iter()
                        .all(|t| text(&t.task) && text(&t.node) && t.state.len() <= 16)
            }
            Hosted::Event { .. } => true,
            Hosted::Ended(e) => id(&e.run),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_answers_are_bounded_and_only_the_done_one_is_final() {
        let data = |n: usize| Hosted::ResultData { data: vec![0; n] };
        assert!(data(MAX_RESULT_DATA).is_bounded());
        assert!(!data(MAX_RESULT_DATA + 1).is_bounded());
        let file = |n: usize| {
            Hosted::ResultFile(ResultFile {
                path: "a".repeat(n),
                size: 1,
            })
        };
        assert!(file(MAX_RESULT_PATH).is_bounded());
        assert!(!file(MAX_RESULT_PATH + 1).is_bounded());
        assert!(!file(1).is_final() && !data(1).is_final());
        assert!(Hosted::ResultsDone { files: 0 }.is_final());
        assert!(Hosted::Results { run: "r".into() }.is_request());
        let input = |n: usize| SubmittedInput {
            path: "p".repeat(n),
            hash: crate::message::ContentHash([0; 32]),
            size: 0,
        };
        let submit = |inputs: Vec<SubmittedInput>| {
            Hosted::SubmitFiles(Box::new(SubmitFiles {
                submit: Submit {
                    name: "t".into(),
                    text: String::new(),
                    options: SubmitOptions {
                        order: 0,
                        retries: 0,
                        keep_going: false,
                        retry_backoff_ms: 0,
                        retry_backoff_max_ms: 0,
                        task_timeout_ms: 0,
                        discovery_timeout_ms: 0,
                    },
                },
                inputs,
            }))
        };
        assert!(submit(vec![input(MAX_INPUT_PATH)]).is_bounded());
        assert!(!submit(vec![input(MAX_INPUT_PATH + 1)]).is_bounded());
        assert!(!submit(vec![input(1); MAX_SUBMITTED_INPUTS + 1]).is_bounded());
        assert!(submit(Vec::new()).is_request());
    }
}
