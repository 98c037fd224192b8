//! The messages of protocol v3 (v1 plus [`Message::Started`] in v2, [`Message::Load`],
//! [`Message::Transfer`] and [`Message::Hosted`] in v3).
//!
//! docs/PROTOCOL.md describes their encoding byte by byte. Rules that keep versions apart:
//! the first message on a connection is always [`Message::Hello`], whose first field is the
//! protocol version, and a decoder ignores bytes after a `Hello`, so a later version may
//! append fields to it and still be told clearly that the versions differ.

pub use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::NodeId;

/// The protocol version this crate speaks.
/// Version 2 added [`Message::Started`]: a node's capacity is shared by every coordinator
/// that uses it, so an assigned task may wait at the worker for a slot, and that wait is not
/// the task's run time. Version 3 added [`Message::Load`]: a node reports its capacity (which
/// may change during a run) and its machine's resources, and [`StatusReport::waiting`]; and
/// [`Message::Transfer`]: files shipped with tasks and collected from them.
/// And [`Message::Hosted`]: runs hosted by a serving node (`p2p-node submit`), and
/// [`Message::Replica`]: their replication to other nodes.
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
    /// A node that serves types reports its capacity and its machine's resources, every
    /// few seconds and at once when its capacity changes (v3). The receiver honours the
    /// capacity up to the one the handshake advertised (the connection's ceiling); a shrink
    /// cancels nothing, it only stops new assignments until fewer run.
    Load(LoadReport),
    /// File transfer (since version 3): inputs shipped, outputs fetched, by content hash.
    Transfer(Box<Transfer>),
    /// A message of hosted runs (version 3): a client's request or the host's answer (see
    /// [`crate::hosted`]).
    Hosted(Box<crate::hosted::Hosted>),
    /// A message of replicated hosted runs (version 3, index 16): one run group's Raft
    /// traffic between its members (see [`crate::replica`]).
    Replica(Box<crate::replica::Replica>),
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
            Message::Load(_) => "Load",
            Message::Transfer(t) => t.kind(),
            Message::Hosted(h) => h.kind(),
            Message::Replica(r) => r.kind(),
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
    /// Task id, e.g. `a1` (inline up to 24 bytes: an assignment of a short id and type
    /// allocates nothing).
    pub task: CompactString,
    /// Task type, e.g. `a`.
    pub kind: CompactString,
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
    /// The task's output (capped in size by the worker). Inline up to 24 bytes, as most
    /// outputs are: decoding a result allocates nothing for it.
    pub output: compact_str::CompactString,
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
    /// Assigned attempts waiting for a free slot (v3); the worker bounds this queue.
    pub waiting: u64,
    /// Tasks the node runs at once now (v3; it may change during a run).
    pub capacity: u32,
}

/// What a node reports of itself in a [`Message::Load`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// How many tasks the node runs at once now, for every coordinator together (its free
    /// slots are `capacity - running`, at least 0).
    pub capacity: u32,
    /// Tasks running there now, for every coordinator.
    pub running: u32,
    /// Assigned attempts waiting there for a free slot, for every coordinator.
    pub waiting: u32,
    /// The machine's CPU cores (0: unknown).
    pub cores: u32,
    /// The 1-minute load average in thousandths (`/proc/loadavg`), where the system has it.
    pub load_milli: Option<u32>,
    /// Memory available, in KiB (`MemAvailable` of `/proc/meminfo`), where known.
    pub mem_available_kib: Option<u64>,
    /// The time the node's slots spent running tasks since it started, in milliseconds.
    pub busy_ms: u64,
    /// Tasks that ended there since it started (for every coordinator): with `busy_ms`, its
    /// own measure of its speed.
    pub tasks: u64,
}

impl LoadReport {
    /// Whether the machine is saturated: its load average above its cores (false when
    /// either is unknown).
    pub fn is_saturated(&self) -> bool {
        match self.load_milli {
            Some(l) if self.cores > 0 => u64::from(l) > u64::from(self.cores) * 1000,
            _ => false,
        }
    }
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

/// The size of a file chunk's data at most: 64 KiB. A sender whose frame limit is smaller
/// sends smaller chunks (see [`crate::transfer::chunk_len`]).
pub const MAX_CHUNK: usize = 64 * 1024;

/// The longest name of a file in a transfer message (a task's output, or an input's file
/// name), in bytes.
pub const MAX_FILE_NAME: usize = 512;

/// The most inputs, and the most outputs, of one task.
pub const MAX_TASK_FILES: usize = 32;

/// The longest [`Transfer::Abort`] message, in bytes; longer ones are cut when encoded.
pub const MAX_ABORT_MESSAGE: usize = 1024;

/// A file's content hash: BLAKE3 (32 bytes), over the file's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// The hash as 64 lower-case hexadecimal digits.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Parses 64 hexadecimal digits.
    pub fn from_hex(hex: &str) -> Option<ContentHash> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ContentHash(out))
    }
}

impl std::fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContentHash({})", self.to_hex())
    }
}

impl std::fmt::Display for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A file placed in a task's working directory: its name there and its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedFile {
    /// The file name in the working directory (one component).
    pub name: String,
    /// Its content hash; the receiver has it (it answered `Have`, or sent `Done`).
    pub hash: ContentHash,
}

/// A file a task produced: its declared name, content hash and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducedFile {
    /// The declared output name (`> NAME`).
    pub name: String,
    /// Its content hash.
    pub hash: ContentHash,
    /// Its size in bytes.
    pub size: u64,
}

/// Why a transfer was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AbortReason {
    /// The sender does not have a file with that hash.
    NotFound,
    /// The file is larger than the receiver accepts (`--max-file`).
    TooLarge,
    /// The bytes received do not have the announced hash.
    HashMismatch,
    /// The receiver's disk is full.
    NoSpace,
    /// Reading or writing the file failed.
    Io,
    /// The sender or the receiver no longer needs it.
    Cancelled,
}

/// A file-transfer message ([`Message::Transfer`]). Transfer ids are chosen by the side that
/// starts a transfer (`Offer`, `Fetch`), unique among its transfers in progress on the
/// connection. Flow control is by credit in bytes: a sender may send chunks up to
/// `received + window` bytes, where `window` comes from `Want` (or `Fetch`) and `received`
/// from the last `Ack`. docs/PROTOCOL.md ("Files") has the rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transfer {
    /// Variant 0: The sender of this message will send a file of this hash and size if asked.
    Offer {
        /// The transfer id.
        id: u64,
        /// The file's content hash.
        hash: ContentHash,
        /// The file's size in bytes.
        size: u64,
    },
    /// Variant 1: Answer to `Offer`: the receiver has the file already (nothing is sent).
    Have {
        /// The transfer id.
        id: u64,
    },
    /// Variant 2: Answer to `Offer`: send it, with this much credit (bytes).
    Want {
        /// The transfer id.
        id: u64,
        /// Bytes the sender may send beyond the receiver's last `Ack` (at least one chunk).
        window: u32,
    },
    /// Variant 3: Bytes of the file from `offset` (chunks go in order, without gaps).
    Chunk {
        /// The transfer id.
        id: u64,
        /// Where in the file `data` starts.
        offset: u64,
        /// At most [`MAX_CHUNK`] bytes. Decoded from a connection over a socket, a slice of
        /// the connection's read buffer (not a copy; with a key, decrypted there in place;
        /// see [`crate::codec`]).
        #[serde(with = "chunk_bytes")]
        data: bytes::Bytes,
    },
    /// Variant 4: The receiver has written `received` bytes: the credit moves on.
    Ack {
        /// The transfer id.
        id: u64,
        /// Bytes received and written so far.
        received: u64,
    },
    /// Variant 5: The receiver has the whole file and its hash matched; the transfer is over.
    Done {
        /// The transfer id.
        id: u64,
    },
    /// Variant 6: Either side gives the transfer up.
    Abort {
        /// The transfer id.
        id: u64,
        /// Why.
        reason: AbortReason,
        /// Explanation, at most [`MAX_ABORT_MESSAGE`] bytes.
        message: String,
    },
    /// Variant 7: Asks the peer to send the file with this hash (a task's output it announced in
    /// `Produced`), with this much credit: the peer answers with chunks, or `Abort`.
    Fetch {
        /// The transfer id.
        id: u64,
        /// The file wanted.
        hash: ContentHash,
        /// As in `Want`.
        window: u32,
    },
    /// Variant 8: Sent just before `Assign` with the same seq: the files to place in the task's
    /// working directory (all of them already at the receiver) and the outputs to keep.
    Files {
        /// The seq of the `Assign` that follows.
        seq: u64,
        /// At most [`MAX_TASK_FILES`].
        inputs: Vec<PlacedFile>,
        /// At most [`MAX_TASK_FILES`] names, each at most [`MAX_FILE_NAME`] bytes.
        outputs: Vec<String>,
    },
    /// Variant 9: Sent just before a successful `Completed` with the same seq: the declared outputs,
    /// which the sender keeps until fetched (or evicted from its cache).
    Produced {
        /// The seq of the `Completed` that follows.
        seq: u64,
        /// At most [`MAX_TASK_FILES`].
        outputs: Vec<ProducedFile>,
    },
    /// Variant 10: Sent before `Produced` (or before the `Completed`, successful or not) of a
    /// task that had a `Files` record: its whole standard output and standard error, kept by
    /// the sender until fetched (or evicted from its cache), each cut at the sender's
    /// `--max-result-size` (then ending with a marker line).
    Streams {
        /// The seq of the `Completed` that follows.
        seq: u64,
        /// The standard output.
        stdout: StreamFile,
        /// The standard error.
        stderr: StreamFile,
    },
    /// Not a message of the wire: a `Chunk` whose bytes are still in the file, as the
    /// sending side queues it (see [`crate::transfer::Sender::file_chunk`]). It goes on the
    /// wire as the `Chunk` (variant 3) of the `len` bytes at `offset` of `file`, read when
    /// it is written (into its frame, or by `sendfile(2)` to the socket), and is never
    /// decoded; a wire that moves messages turns it into that `Chunk` first.
    #[serde(skip)]
    FileChunk {
        /// The transfer id.
        id: u64,
        /// Where in the file the chunk starts.
        offset: u64,
        /// Its length, at most [`MAX_CHUNK`].
        len: usize,
        /// The open file it is read from.
        file: crate::file::ChunkFile,
    },
}

/// A chunk's bytes through serde as a byte string (as a `Vec<u8>` would go through bincode:
/// its length, then the bytes). The wire codec encodes chunks by hand ([`crate::wire`]).
mod chunk_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(data: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bytes::Bytes, D::Error> {
        Vec::<u8>::deserialize(d).map(bytes::Bytes::from)
    }
}

/// One of a task's standard streams kept as a file ([`Transfer::Streams`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamFile {
    /// Its content hash.
    pub hash: ContentHash,
    /// Its size in bytes.
    pub size: u64,
}

impl Transfer {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Transfer::Offer { .. } => "Transfer::Offer",
            Transfer::Have { .. } => "Transfer::Have",
            Transfer::Want { .. } => "Transfer::Want",
            Transfer::Chunk { .. } => "Transfer::Chunk",
            Transfer::FileChunk { .. } => "Transfer::FileChunk",
            Transfer::Ack { .. } => "Transfer::Ack",
            Transfer::Done { .. } => "Transfer::Done",
            Transfer::Abort { .. } => "Transfer::Abort",
            Transfer::Fetch { .. } => "Transfer::Fetch",
            Transfer::Files { .. } => "Transfer::Files",
            Transfer::Produced { .. } => "Transfer::Produced",
            Transfer::Streams { .. } => "Transfer::Streams",
        }
    }
}
