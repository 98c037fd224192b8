//! The messages of protocol v3 (v1 plus [`Message::Started`] in v2, plus
//! [`Message::Hosted`] in v3).
//!
//! docs/PROTOCOL.md describes their encoding byte by byte. Rules that keep versions apart:
//! the first message on a connection is always [`Message::Hello`], whose first field is the
//! protocol version, and a decoder ignores bytes after a `Hello`, so a later version may
//! append fields to it and still be told clearly that the versions differ.

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// The protocol version this crate speaks.
/// Version 2 added [`Message::Started`]: a node's capacity is shared by every coordinator
/// that uses it, so an assigned task may wait at the worker for a slot, and that wait is not
/// the task's run time.
/// Version 3 added [`Message::Hosted`]: runs hosted by a serving node (`p2p-node submit`).
pub const PROTOCOL_VERSION: u16 = 3;

/// One protocol message: the payload of one frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message of the initiator: who it is and what it serves.
    Hello(Hello),
    /// The acceptor's answer when it accepts: who *it* is and what it serves.
    Welcome(Hello),
    /// The acceptor's answer when it refuses; the connection closes after it.
    Reject(Reject),
    /// Run a task.
    Assign(Assign),
    /// The result of an assigned task.
    Completed(Completed),
    /// Stop running a task; it is answered by its `Completed` (with `ok: false`).
    Cancel {
        /// The `seq` of the assignment to cancel.
        seq: u64,
    },
    /// Heartbeat request.
    Ping {
        /// Echoed by the `Pong`.
        nonce: u64,
    },
    /// Heartbeat answer.
    Pong {
        /// The nonce of the `Ping` answered.
        nonce: u64,
    },
    /// The sender will neither send nor accept new assignments; tasks in flight finish.
    Goodbye,
    /// Sent in answer to `Goodbye` once nothing is in flight; then both sides close.
    GoodbyeAck,
    /// The worker started running an assigned task (it had a free slot): the task's run
    /// time, and its result deadline, count from here. A task answered at once may get its
    /// `Completed` without a `Started`.
    Started {
        /// The `seq` of the assignment.
        seq: u64,
    },
    /// Asks the peer how it is (`p2p-node status`); a [`Message::Status`] answers. Sent only
    /// by status clients after the handshake, at most one unanswered at a time. Added within
    /// version 2 (docs/PROTOCOL.md, "Versioning"): a node that predates it closes the
    /// connection, which the client reports.
    StatusRequest,
    /// The answer to a [`Message::StatusRequest`].
    Status(Box<StatusReport>),
    /// A message of hosted runs (version 3): a client's request or the host's answer (see
    /// [`crate::hosted`]).
    Hosted(Box<crate::hosted::Hosted>),
}

impl Message {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Reject(_) => "Reject",
            Message::Assign(_) => "Assign",
            Message::Completed(_) => "Completed",
            Message::Cancel { .. } => "Cancel",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Goodbye => "Goodbye",
            Message::GoodbyeAck => "GoodbyeAck",
            Message::Started { .. } => "Started",
            Message::StatusRequest => "StatusRequest",
            Message::Status(_) => "Status",
            Message::Hosted(h) => h.kind(),
        }
    }
}

/// A node's description of itself, sent in `Hello` and `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version of the sender ([`PROTOCOL_VERSION`]).
    pub version: u16,
    /// Cluster name; nodes of different clusters never work together.
    pub cluster: String,
    /// The sender's node id.
    pub node_id: NodeId,
    /// Task types the sender serves (lower case); may be empty for a pure coordinator.
    pub types: Vec<String>,
    /// How many tasks the sender runs at once; the peer never has more in flight to it.
    pub capacity: u32,
}

/// Why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The protocol versions differ.
    Version,
    /// The cluster names differ.
    Cluster,
    /// The cluster key did not match.
    Key,
    /// The node is at its connection limit.
    Busy,
    /// The `Hello` breaks a bound of the protocol (too many types, a name too long; see
    /// [`crate::wire::MAX_HELLO`]).
    Invalid,
}

/// A refused handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Machine-readable reason.
    pub reason: RejectReason,
    /// Human-readable explanation.
    pub message: String,
}

/// An assignment of one task to the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assign {
    /// The assigner's number for this assignment, unique on the connection; echoed in `Completed`.
    pub seq: u64,
    /// Task id, e.g. `a1`.
    pub task: String,
    /// Task type, e.g. `a`.
    pub kind: String,
    /// Arguments for the handler (may be empty).
    pub args: String,
    /// 1 for the first attempt, 2 for the first retry, ...
    pub attempt: u32,
    /// The task may run at most this long (milliseconds); 0 means no limit.
    pub timeout_ms: u64,
}

/// The result of an assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completed {
    /// The `seq` of the `Assign` this answers.
    pub seq: u64,
    /// Whether the task succeeded.
    pub ok: bool,
    /// The handler's exit code, when it was a process that exited.
    pub exit_code: Option<i32>,
    /// The task's output (capped in size by the worker).
    pub output: String,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// How long the handler ran, in microseconds.
    pub duration_us: u64,
}

/// The most running tasks a [`StatusReport`] lists (it still counts them all).
pub const MAX_STATUS_TASKS: usize = 64;

/// The longest string in a [`StatusReport`] (a task id, a version), in bytes; longer ones
/// are cut when the report is made ([`StatusReport::bounded`]).
pub const MAX_STATUS_STRING: usize = 256;

/// How a node is, as `p2p-node status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The node's software version (e.g. `0.1.0`).
    pub version: String,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// Whether the node drains (takes no new work).
    pub draining: bool,
    /// Tasks running now, all of them (the list below holds at most [`MAX_STATUS_TASKS`]).
    pub running_total: u64,
    /// The longest-running tasks, oldest first.
    pub running: Vec<RunningTask>,
    /// Tasks that succeeded since the node started.
    pub completed: u64,
    /// Tasks that failed since the node started.
    pub failed: u64,
    /// The 1, 5 and 15 minute load averages in thousandths (from `/proc/loadavg`), where
    /// the system has them.
    pub load_milli: Option<[u32; 3]>,
}

/// A task running on the node that answers a [`StatusReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningTask {
    /// Task id.
    pub task: String,
    /// Task type.
    pub kind: String,
    /// How long it has run, in milliseconds.
    pub running_ms: u64,
    /// The node id of the coordinator that assigned it.
    pub coordinator: String,
}

impl StatusReport {
    /// The report within the protocol's bounds: at most [`MAX_STATUS_TASKS`] tasks, each
    /// string at most [`MAX_STATUS_STRING`] bytes (cut on a character boundary).
    pub fn bounded(mut self) -> Self {
        self.running.truncate(MAX_STATUS_TASKS);
        cut(&mut self.version);
        for t in &mut self.running {
            cut(&mut t.task);
            cut(&mut t.kind);
            cut(&mut t.coordinator);
        }
        self
    }

    /// Whether the report is within the protocol's bounds (see [`StatusReport::bounded`]).
    pub fn is_bounded(&self) -> bool {
        let ok = |s: &String| s.len() <= MAX_STATUS_STRING;
        self.running.len() <= MAX_STATUS_TASKS
            && ok(&self.version)
            && self
                .running
                .iter()
                .all(|t| ok(&t.task) && ok(&t.kind) && ok(&t.coordinator))
    }
}

fn cut(s: &mut String) {
    if s.len() > MAX_STATUS_STRING {
        let mut end = MAX_STATUS_STRING;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
