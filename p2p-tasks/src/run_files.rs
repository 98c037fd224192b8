//! The coordinator's side of files (protocol v3): before a task with inputs is assigned,
//! each input is offered to the node (`Offer`; the node answers `Have` from its cache, so a
//! file the node already has is not sent again, or `Want`), then `Files` and the `Assign`
//! go out; after a successful result announced with `Produced`, its outputs are fetched
//! by hash into `DIR/ID/NAME` (`run --results DIR`, default `./results`) before the result
//! is passed on, so a dependent task's `< @DEP/NAME` finds the file there.
//!
//! The driver ([`crate::coordinator`]) calls it; the rules of each transfer are
//! [`p2p_core::transfer`]'s. At most one file goes out at a time on a connection (the
//! others wait their turn), so a connection's command queue never holds more than one
//! window of chunks.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use p2p_core::file::ChunkFile;
use p2p_core::message::{AbortReason, PlacedFile, ProducedFile, StreamFile};
use p2p_core::net::{Command, Link, LinkId};
use p2p_core::transfer::{self, Received, Receiver, Sender, DEFAULT_WINDOW};
use p2p_core::{Assign, Completed, ContentHash, Message, Transfer};

use crate::journal::RecordedFile;
use crate::node_files::ChunkLane;
use crate::task::{Input, Task};

struct Waiting {
    assign: Assign,
    left: usize,
    inputs: Vec<PlacedFile>,
    outputs: Vec<String>,
}

struct Offer {
    /// The assignments waiting for this file (one offer per file and connection at a time:
    /// tasks sharing an input wait for the same transfer).
    seqs: Vec<u64>,
    hash: ContentHash,
    path: PathBuf,
    sender: Sender,
    /// Open once its turn comes; its chunks are read from it as they are written.
    file: Option<ChunkFile>,
}

struct Held {
    completed: Completed,
    task: String,
    attempt: u32,
    node: String,
    left: usize,
    error: Option<String>,
    /// Whether the whole stdout is fetched into `DIR/ID/stdout` (else the result's capped
    /// output is written there).
    streams: bool,
    /// The files fetched (name in `DIR/ID/`, hash, size): checked on arrival, so
    /// `meta.json` and the journal take their hashes from here, not from reading them again.
    fetched: Vec<(String, ContentHash, u64)>,
}

struct Fetch {
    seq: u64,
    name: String,
    receiver: Receiver,
    file: tempfile::NamedTempFile,
    dest: PathBuf,
}

/// The files of one run (see the module documentation).
pub struct RunFiles {
    plan: HashMap<String, (Vec<Input>, Vec<String>)>,
    all: bool,
    dir: PathBuf,
    chunk: usize,
    next_id: u64,
    hashes: HashMap<PathBuf, (ContentHash, u64)>,
    /// Inputs being hashed off the run's thread, and the assignments waiting for them.
    hashing: Hashing,
    waiting: HashMap<(LinkId, u64), Waiting>,
    offers: HashMap<(LinkId, u64), Offer>,
    /// Per link: the offer sending now, and those whose `Want` came, in turn.
    turn: HashMap<LinkId, VecDeque<u64>>,
    assigned: HashMap<(LinkId, u64), (String, u32)>,
    produced: HashMap<(LinkId, u64), Vec<ProducedFile>>,
    streams: HashMap<(LinkId, u64), [StreamFile; 2]>,
    /// The declared outputs of each success written, until the journal takes them.
    recorded: HashMap<String, Vec<RecordedFile>>,
    held: HashMap<(LinkId, u64), Held>,
    fetches: HashMap<(LinkId, u64), Fetch>,
    /// The largest file fetched from a node (`run --max-file`).
    max_file: u64,
    /// Per link: the chunks of the offer sending, in order, as the link takes them.
    lanes: HashMap<LinkId, ChunkLane>,
}

impl std::fmt::Debug for RunFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunFiles")
            .field("dir", &self.dir)
            .field("tasks", &self.plan.len())
            .finish_non_exhaustive()
    }
}

/// What becomes of an assignment.
#[derive(Debug)]
pub enum Step {
    /// Send it as it is.
    Send(Assign),
    /// Held while its inputs go to the node.
    Held,
    /// Its inputs cannot be had: this result goes to the run instead.
    Fail(Completed),
}

fn failed(seq: u64, error: String) -> Completed {
    Completed {
        seq,
        ok: false,
        exit_code: None,
        output: Default::default(),
        error: Some(error),
        duration_us: 0,
    }
}

fn unbox(m: Message) -> Option<Transfer> {
    match m {
        Message::Transfer(t) => Some(*t),
        _ => None,
    }
}

fn send(link: &Link, t: Transfer) -> bool {
    link.send(Command::Transfer(Box::new(t))).is_ok()
}

/// Most inputs hashed at once, each on a thread of its own.
const HASHERS: usize = 2;

/// What a hashing thread reports: the file, and its hash and size or why it could not be
/// read.
pub type Hashed = (PathBuf, Result<(ContentHash, u64), String>);

/// The inputs hashed off the run's thread: a large file takes seconds (40 GiB: about 45 s
/// here), and hashed on the run's thread it held up every connection of the run for that
/// long (their heartbeats too: the nodes dropped them as silent).
struct Hashing {
    tx: tokio::sync::mpsc::Sender<Hashed>,
    /// Taken by the driver ([`RunFiles::take_hashed`]).
    rx: Option<tokio::sync::mpsc::Receiver<Hashed>>,
    /// Threads hashing now.
    running: usize,
    /// Files waiting for a thread.
    queue: VecDeque<PathBuf>,
    /// Per file being hashed (or queued): the assignments waiting for it.
    wanted: HashMap<PathBuf, Vec<(LinkId, u64)>>,
    /// The assignments waiting for a hash.
    parked: HashMap<(LinkId, u64), Parked>,
    /// Set when the run's files are dropped: hashing threads stop at their next read.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// An assignment waiting for its inputs' hashes.
struct Parked {
    link: Link,
    assign: Assign,
    /// Its files not hashed yet.
    left: usize,
    /// Why one of its files could not be read: it fails once none is left (a file that
    /// failed is not hashed again for it).
    error: Option<String>,
}

impl Hashing {
    fn new() -> Hashing {
        // Each thread sends one report and ends, and at most `HASHERS` run: never full.
        let (tx, rx) = tokio::sync::mpsc::channel(HASHERS);
        Hashing {
            tx,
            rx: Some(rx),
            running: 0,
            queue: VecDeque::new(),
            wanted: HashMap::new(),
            parked: HashMap::new(),
            stop: Default::default(),
        }
    }

    /// Starts hashing `path` (or queues it), unless that is under way; `key` waits for it.
    fn want(&mut self, path: &Path, key: (LinkId, u64)) {
        if let Some(keys) = self.wanted.get_mut(path) {
            keys.push(key);
            return;
        }
        self.wanted.insert(path.to_path_buf(), vec![key]);
        self.queue.push_back(path.to_path_buf());
        self.start();
    }

    /// Starts threads for queued files, up to [`HASHERS`] at once.
    fn start(&mut self) {
        while self.running < HASHERS {
            let Some(path) = self.queue.pop_front() else {
                return;
            };
            let (tx, stop, p) = (self.tx.clone(), self.stop.clone(), path.clone());
            let spawned = std::thread::Builder::new()
                .name("p2p-hash".into())
                .spawn(move || {
                    let r =
                        crate::node_files::hash_file_until(&p, &stop).map_err(|e| e.to_string());
                    // The run may be over: nobody to tell.
                    let _ = tx.blocking_send((p, r));
                });
            match spawned {
                Ok(_) => self.running += 1,
                Err(e) => {
                    // No thread: the file waits for one to end (one is running), or fails
                    // (reported as a thread would: with none running, every report sent
                    // has been taken, so the channel has room).
                    if self.running > 0 {
                        self.queue.push_front(path);
                    } else if self
                        .tx
                        .try_send((path, Err(format!("cannot start a thread to hash it: {e}"))))
                        .is_ok()
                    {
                        self.running += 1;
                    }
                    return;
                }
            }
        }
    }
}

impl Drop for Hashing {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl RunFiles {
    /// The files of a run of `tasks`, kept under `results` (`None`: `./results`, and only
    /// for tasks with files); `None` when there is nothing to do.
    pub fn new(tasks: &[Task], results: Option<PathBuf>, max_frame: usize) -> Option<RunFiles> {
        let plan: HashMap<String, (Vec<Input>, Vec<String>)> = tasks
            .iter()
            .filter(|t| t.has_files())
            .map(|t| {
                (
                    t.id().to_owned(),
                    (t.inputs().to_vec(), t.outputs().to_vec()),
                )
            })
            .collect();
        if plan.is_empty() && results.is_none() {
            return None;
        }
        Some(RunFiles {
            plan,
            all: results.is_some(),
            dir: results.unwrap_or_else(|| PathBuf::from("results")),
            chunk: transfer::chunk_len(max_frame),
            next_id: 0,
            hashes: HashMap::new(),
            hashing: Hashing::new(),
            waiting: HashMap::new(),
            offers: HashMap::new(),
            turn: HashMap::new(),
            assigned: HashMap::new(),
            produced: HashMap::new(),
            streams: HashMap::new(),
            recorded: HashMap::new(),
            held: HashMap::new(),
            fetches: HashMap::new(),
            max_file: crate::runcore::DEFAULT_MAX_FETCH,
            lanes: HashMap::new(),
        })
    }

    /// Refuses to fetch a file announced larger than `bytes` (`run --max-file`): the
    /// attempt fails saying so, before any byte of it moves.
    pub fn with_max_file(mut self, bytes: u64) -> RunFiles {
        self.max_file = bytes;
        self
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Where an input's bytes are on this side.
    fn source(&self, input: &Input) -> Result<PathBuf, String> {
        match input {
            Input::Path(p) => Ok(p.clone()),
            Input::Artifact { task, name } => Ok(self.dir.join(task).join(name)),
            Input::Bytes { name, data } => {
                let dir = self.dir.join(".inputs");
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                let path = dir.join(transfer::hash_bytes(data).to_hex());
                if !path.exists() {
                    std::fs::write(&path, data)
                        .map_err(|e| format!("cannot keep input {name:?}: {e}"))?;
                }
                Ok(path)
            }
        }
    }

    /// The receiver of the hashing threads' reports, for the driver to wait on and pass
    /// each to [`RunFiles::hashed`]; `None` once taken.
    pub fn take_hashed(&mut self) -> Option<tokio::sync::mpsc::Receiver<Hashed>> {
        self.hashing.rx.take()
    }

    /// A hashing thread's report: the assignments that waited for the file and have all
    /// their inputs hashed now are made again (their offers go out); the results of those
    /// that cannot be, for the run.
    pub fn hashed(&mut self, (path, r): Hashed) -> Vec<(LinkId, Completed)> {
        self.hashing.running = self.hashing.running.saturating_sub(1);
        let error = match r {
            Ok(h) => {
                self.hashes.insert(path.clone(), h);
                None
            }
            // Not kept: a later attempt tries the file again.
            Err(e) => Some(format!(
                "cannot read input {:?} ({}): {e}",
                path.file_name().unwrap_or_default().to_string_lossy(),
                path.display()
            )),
        };
        let keys = self.hashing.wanted.remove(&path).unwrap_or_default();
        let mut out = Vec::new();
        for key in keys {
            let Some(p) = self.hashing.parked.get_mut(&key) else {
                continue;
            };
            p.left = p.left.saturating_sub(1);
            if p.error.is_none() {
                p.error.clone_from(&error);
            }
            if p.left > 0 {
                continue;
            }
            let Some(Parked {
                link,
                assign: a,
                error,
                ..
            }) = self.hashing.parked.remove(&key)
            else {
                continue;
            };
            let seq = a.seq;
            if let Some(e) = error {
                out.push((key.0, failed(seq, e)));
                continue;
            }
            match self.assign(&link, a) {
                Step::Send(a) => {
                    if link.send(Command::Assign(a)).is_err() {
                        out.push((key.0, failed(seq, "the connection closed".into())));
                    }
                }
                Step::Held => {}
                Step::Fail(c) => out.push((key.0, c)),
            }
        }
        self.hashing.start();
        out
    }

    /// An assignment the run makes on `link`.
    pub fn assign(&mut self, link: &Link, a: Assign) -> Step {
        let lid = link.id();
        if self.all || self.plan.contains_key(a.task.as_str()) {
            self.assigned
                .insert((lid, a.seq), (a.task.to_string(), a.attempt));
        }
        let Some((inputs, outputs)) = self.plan.get(a.task.as_str()).cloned().or_else(|| {
            // A task without files whose results are kept: an empty `Files` record asks the
            // node to keep its whole standard streams.
            self.all.then(|| (Vec::new(), Vec::new()))
        }) else {
            return Step::Send(a);
        };
        // What the protocol cannot carry (a `Task` built by a program, not parsed) fails
        // here rather than close the connection at the node.
        let bad_name = |n: &str| crate::task::output_name_problem(n).is_some();
        if inputs.len() > p2p_core::message::MAX_TASK_FILES
            || outputs.len() > p2p_core::message::MAX_TASK_FILES
            || outputs.iter().any(|o| bad_name(o))
            || inputs
                .iter()
                .any(|i| i.file_name().is_none_or(|n| bad_name(n) || n.contains('/')))
        {
            return Step::Fail(failed(
                a.seq,
                format!(
                    "task {} declares files the protocol cannot carry (at most {} inputs and \
                     {} outputs, plain names of at most {} bytes)",
                    a.task,
                    p2p_core::message::MAX_TASK_FILES,
                    p2p_core::message::MAX_TASK_FILES,
                    p2p_core::message::MAX_FILE_NAME
                ),
            ));
        }
        let mut placed = Vec::with_capacity(inputs.len());
        let mut offers = Vec::new();
        let mut unhashed = Vec::new();
        for input in &inputs {
            let name = input.file_name().unwrap_or("input").to_owned();
            let path = match self.source(input) {
                Ok(p) => p,
                Err(e) => return Step::Fail(failed(a.seq, e)),
            };
            let Some(&(hash, size)) = self.hashes.get(&path) else {
                unhashed.push(path);
                continue;
            };
            placed.push(PlacedFile { name, hash });
            offers.push((path, hash, size));
        }
        if !unhashed.is_empty() {
            // Assigned again once its files are hashed ([`RunFiles::hashed`]).
            let key = (lid, a.seq);
            for path in &unhashed {
                self.hashing.want(path, key);
            }
            let parked = Parked {
                link: link.clone(),
                assign: a,
                left: unhashed.len(),
                error: None,
            };
            self.hashing.parked.insert(key, parked);
            return Step::Held;
        }
        if offers.is_empty() {
            return self.release(link, a, placed, outputs);
        }
        let seq = a.seq;
        self.waiting.insert(
            (lid, seq),
            Waiting {
                assign: a,
                left: offers.len(),
                inputs: placed,
                outputs,
            },
        );
        for (path, hash, size) in offers {
            if let Some(o) = self
                .offers
                .iter_mut()
                .find(|((l, _), o)| *l == lid && o.hash == hash)
                .map(|(_, o)| o)
            {
                // The same file is on its way to this node already.
                o.seqs.push(seq);
                continue;
            }
            let id = self.id();
            let sender = Sender::offered(id, size, self.chunk);
            let offer = sender.offer(hash);
            self.offers.insert(
                (lid, id),
                Offer {
                    seqs: vec![seq],
                    hash,
                    path,
                    sender,
                    file: None,
                },
            );
            if let Some(t) = unbox(offer) {
                send(link, t);
            }
        }
        Step::Held
    }

    fn release(
        &mut self,
        link: &Link,
        a: Assign,
        inputs: Vec<PlacedFile>,
        outputs: Vec<String>,
    ) -> Step {
        send(
            link,
            Transfer::Files {
                seq: a.seq,
                inputs,
                outputs,
            },
        );
        Step::Send(a)
    }

    /// One input of the assignment `seq` is at the node: the assignment goes out when all
    /// are. Returns a result for the run when it cannot.
    fn input_there(&mut self, link: &Link, seq: u64) -> Option<Completed> {
        let key = (link.id(), seq);
        let w = self.waiting.get_mut(&key)?;
        w.left = w.left.saturating_sub(1);
        if w.left > 0 {
            return None;
        }
        let w = self.waiting.remove(&key)?;
        match self.release(link, w.assign, w.inputs, w.outputs) {
            Step::Send(a) => {
                if link.send(Command::Assign(a)).is_err() {
                    return Some(failed(seq, "the connection closed".into()));
                }
                None
            }
            Step::Fail(c) => Some(c),
            Step::Held => None,
        }
    }

    /// Every input of these assignments is there now.
    fn inputs_there(&mut self, link: &Link, seqs: Vec<u64>) -> Vec<Completed> {
        seqs.into_iter()
            .filter_map(|s| self.input_there(link, s))
            .collect()
    }

    /// These assignments cannot have their inputs: each fails.
    fn inputs_failed(&mut self, link: &Link, seqs: Vec<u64>, why: String) -> Vec<Completed> {
        seqs.into_iter()
            .filter_map(|s| self.input_failed(link, s, why.clone()))
            .collect()
    }

    fn input_failed(&mut self, link: &Link, seq: u64, why: String) -> Option<Completed> {
        let key = (link.id(), seq);
        self.waiting.remove(&key)?;
        // It no longer waits for its other offers; those nobody else waits for are dropped.
        let lid = link.id();
        for ((l, _), o) in self.offers.iter_mut() {
            if *l == lid {
                o.seqs.retain(|s| *s != seq);
            }
        }
        let ids: Vec<u64> = self
            .offers
            .iter()
            .filter(|((l, _), o)| *l == lid && o.seqs.is_empty())
            .map(|((_, id), _)| *id)
            .collect();
        for id in ids {
            self.offers.remove(&(lid, id));
            self.end_turn(lid, id);
            self.forget(lid, id);
            send(
                link,
                Transfer::Abort {
                    id,
                    reason: AbortReason::Cancelled,
                    message: String::new(),
                },
            );
        }
        Some(failed(seq, why))
    }

    /// Sends what the credit allows of the offer whose turn it is on `link`.
    fn pump(&mut self, link: &Link) -> Vec<Completed> {
        let lid = link.id();
        let mut out = Vec::new();
        loop {
            let Some(&id) = self.turn.get(&lid).and_then(|q| q.front()) else {
                return out;
            };
            let Some(o) = self.offers.get_mut(&(lid, id)) else {
                if let Some(q) = self.turn.get_mut(&lid) {
                    q.pop_front();
                }
                continue;
            };
            if o.file.is_none() {
                match ChunkFile::open(&o.path) {
                    Ok(f) => o.file = Some(f),
                    Err(e) => {
                        let (seqs, why) = (
                            o.seqs.clone(),
                            format!("cannot read input {}: {e}", o.path.display()),
                        );
                        self.offers.remove(&(lid, id));
                        self.end_turn(lid, id);
                        out.extend(self.inputs_failed(link, seqs, why));
                        continue;
                    }
                }
            }
            let Some((offset, len)) = o.sender.poll_read() else {
                // Waiting for credit, or all sent (its `Done` ends its turn).
                return out;
            };
            // The chunk names its range of the file; the connection reads the bytes as it
            // writes them (into its frame with a key; `sendfile` to another machine).
            let msg = match &o.file {
                Some(f) => o
                    .sender
                    .file_chunk(offset, len, f)
                    .map_err(|e| e.to_string()),
                None => Err("not open".to_owned()),
            };
            let seqs = o.seqs.clone();
            match msg.map(unbox) {
                Ok(Some(t)) => {
                    if !self.lanes.entry(lid).or_default().send(link, t) {
                        self.offers.remove(&(lid, id));
                        self.end_turn(lid, id);
                        out.extend(self.inputs_failed(link, seqs, "the connection closed".into()));
                    }
                }
                Ok(None) => return out,
                Err(e) => {
                    let path = o.path.display().to_string();
                    self.offers.remove(&(lid, id));
                    self.end_turn(lid, id);
                    self.forget(lid, id);
                    // The node stops waiting for the rest of it.
                    send(
                        link,
                        Transfer::Abort {
                            id,
                            reason: AbortReason::Io,
                            message: "the coordinator could not read the file".into(),
                        },
                    );
                    out.extend(self.inputs_failed(
                        link,
                        seqs,
                        format!("cannot send input {path}: {e}"),
                    ));
                }
            }
        }
    }

    /// The chunks of offer `id` still waiting for room on the link go (it ended).
    fn forget(&mut self, lid: LinkId, id: u64) {
        if let Some(l) = self.lanes.get(&lid) {
            l.forget(id);
        }
    }

    /// The offers on `link` whose chunks could not go on (the node was told): their
    /// assignments fail.
    fn lane_failures(&mut self, link: &Link) -> Vec<Completed> {
        let lid = link.id();
        let Some(failed) = self.lanes.get(&lid).map(ChunkLane::take_failed) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (id, why) in failed {
            if let Some(o) = self.offers.remove(&(lid, id)) {
                self.end_turn(lid, id);
                out.extend(self.inputs_failed(
                    link,
                    o.seqs,
                    format!("cannot send input {}: {why}", o.path.display()),
                ));
            }
        }
        if !out.is_empty() {
            out.extend(self.pump(link));
        }
        out
    }

    fn end_turn(&mut self, lid: LinkId, id: u64) {
        if let Some(q) = self.turn.get_mut(&lid) {
            q.retain(|x| *x != id);
        }
    }

    /// A transfer message from `link`'s node. Returns results for the run: assignments
    /// that cannot go out, and results whose outputs are now all here.
    pub fn transfer(&mut self, link: &Link, t: Transfer) -> Vec<Completed> {
        let lid = link.id();
        let mut out = self.lane_failures(link);
        match t {
            Transfer::Have { id } => {
                if let Some(o) = self.offers.remove(&(lid, id)) {
                    out.extend(self.inputs_there(link, o.seqs));
                }
            }
            Transfer::Want { id, window } => {
                if let Some(o) = self.offers.get_mut(&(lid, id)) {
                    if let Err(e) = o.sender.on_want(window) {
                        let seqs = o.seqs.clone();
                        self.offers.remove(&(lid, id));
                        out.extend(self.inputs_failed(link, seqs, e.to_string()));
                    } else {
                        self.turn.entry(lid).or_default().push_back(id);
                    }
                }
                out.extend(self.pump(link));
            }
            Transfer::Ack { id, received } => {
                if let Some(o) = self.offers.get_mut(&(lid, id)) {
                    if let Err(e) = o.sender.on_ack(received) {
                        let seqs = o.seqs.clone();
                        self.offers.remove(&(lid, id));
                        self.end_turn(lid, id);
                        out.extend(self.inputs_failed(link, seqs, e.to_string()));
                    }
                }
                out.extend(self.pump(link));
            }
            Transfer::Done { id } => {
                if let Some(o) = self.offers.remove(&(lid, id)) {
                    self.end_turn(lid, id);
                    out.extend(self.inputs_there(link, o.seqs));
                }
                out.extend(self.pump(link));
            }
            Transfer::Abort {
                id,
                reason,
                message,
            } => {
                let message = p2p_core::text::escape(&message).into_owned();
                if let Some(o) = self.offers.remove(&(lid, id)) {
                    self.end_turn(lid, id);
                    self.forget(lid, id);
                    let why = match o.file.as_ref().and_then(ChunkFile::cut) {
                        // What the node saw (a hash mismatch) follows from this.
                        Some(cut) => format!(
                            "input {} changed while it was sent: {cut}; the node refused \
                             it ({reason:?})",
                            o.path.display()
                        ),
                        None => format!(
                            "the node refused input {} ({reason:?}): {message}",
                            o.path.display()
                        ),
                    };
                    out.extend(self.inputs_failed(link, o.seqs, why));
                    out.extend(self.pump(link));
                }
                if let Some(f) = self.fetches.remove(&(lid, id)) {
                    out.extend(self.output_done(
                        lid,
                        f.seq,
                        Some(format!(
                            "output {:?} could not be fetched ({reason:?}): {message}",
                            f.name
                        )),
                    ));
                }
            }
            Transfer::Chunk { id, offset, data } => {
                out.extend(self.chunk(link, id, offset, &data));
            }
            Transfer::Produced { seq, outputs } => {
                self.produced.insert((lid, seq), outputs);
            }
            Transfer::Streams {
                seq,
                stdout,
                stderr,
            } => {
                self.streams.insert((lid, seq), [stdout, stderr]);
            }
            // Requests this side does not serve.
            Transfer::Offer { id, .. } | Transfer::Fetch { id, .. } => {
                send(
                    link,
                    Transfer::Abort {
                        id,
                        reason: AbortReason::NotFound,
                        message: "a coordinator serves no files".into(),
                    },
                );
            }
            Transfer::Files { .. } => {}
            // Only ever queued by a sender, never received.
            Transfer::FileChunk { .. } => {}
        }
        out
    }

    fn chunk(&mut self, link: &Link, id: u64, offset: u64, data: &[u8]) -> Vec<Completed> {
        let lid = link.id();
        let Some(f) = self.fetches.get_mut(&(lid, id)) else {
            return Vec::new();
        };
        let res = f.receiver.on_chunk(offset, data);
        let (bytes, complete) = match res {
            Ok(Received::Write(b)) => (b, false),
            Ok(Received::Complete(b)) => (b, true),
            Err(e) => {
                let (seq, name) = (f.seq, f.name.clone());
                if let Some(t) = e.abort_message().and_then(unbox) {
                    send(link, t);
                }
                self.fetches.remove(&(lid, id));
                return self
                    .output_done(
                        lid,
                        seq,
                        Some(format!("output {name:?} could not be fetched: {e}")),
                    )
                    .into_iter()
                    .collect();
            }
        };
        if let Err(e) = f.file.write_all(bytes) {
            let (seq, name) = (f.seq, f.name.clone());
            send(
                link,
                Transfer::Abort {
                    id,
                    reason: AbortReason::Io,
                    message: e.to_string(),
                },
            );
            self.fetches.remove(&(lid, id));
            return self
                .output_done(lid, seq, Some(format!("cannot write output {name:?}: {e}")))
                .into_iter()
                .collect();
        }
        if !complete {
            if let Some(t) = f.receiver.poll_ack().and_then(unbox) {
                send(link, t);
            }
            return Vec::new();
        }
        let Some(f) = self.fetches.remove(&(lid, id)) else {
            return Vec::new();
        };
        if let Some(t) = unbox(f.receiver.done()) {
            send(link, t);
        }
        let kept = f
            .file
            .persist(&f.dest)
            .map(|_| ())
            .map_err(|e| e.error.to_string());
        self.output_done(
            lid,
            f.seq,
            kept.err()
                .map(|e| format!("cannot keep output {:?}: {e}", f.name)),
        )
        .into_iter()
        .collect()
    }

    fn output_done(&mut self, lid: LinkId, seq: u64, error: Option<String>) -> Option<Completed> {
        let h = self.held.get_mut(&(lid, seq))?;
        h.left = h.left.saturating_sub(1);
        if h.error.is_none() {
            h.error = error;
        }
        if h.left > 0 {
            return None;
        }
        let h = self.held.remove(&(lid, seq))?;
        let mut c = h.completed;
        let whole = h.error.is_none();
        // A failed task keeps its own reason; a success whose files did not come fails.
        if let (Some(e), true) = (h.error, c.ok) {
            c.ok = false;
            c.error = Some(e);
        }
        // Every fetch arrived whole and checked: their hashes are known.
        let known: &[(String, ContentHash, u64)] = if whole { &h.fetched } else { &[] };
        self.write_result(&h.task, &c, &h.node, h.attempt, h.streams, known);
        Some(c)
    }

    /// A result from `link`: `None` while its outputs (and its whole standard streams, when
    /// the node kept them) are fetched (the result comes back from [`RunFiles::transfer`]
    /// once they are here).
    pub fn completed(&mut self, link: &Link, c: Completed) -> Option<Completed> {
        let lid = link.id();
        let produced = self.produced.remove(&(lid, c.seq));
        let streams = self.streams.remove(&(lid, c.seq));
        let Some((task, attempt)) = self.assigned.remove(&(lid, c.seq)) else {
            return Some(c);
        };
        let node = link.peer().node_id.to_string();
        let declared = self
            .plan
            .get(&task)
            .map(|p| p.1.clone())
            .unwrap_or_default();
        let mut wanted: Vec<(String, ContentHash, u64, String)> = Vec::new();
        if let Some([out, err]) = streams {
            wanted.push(("stdout".into(), out.hash, out.size, "stdout".into()));
            wanted.push(("stderr".into(), err.hash, err.size, "stderr".into()));
        }
        if c.ok && !declared.is_empty() {
            let produced = produced.unwrap_or_default();
            let names: Vec<&str> = produced.iter().map(|p| p.name.as_str()).collect();
            if names.len() != declared.len()
                || declared.iter().any(|d| !names.contains(&d.as_str()))
            {
                let c = Completed {
                    ok: false,
                    error: Some(format!(
                        "the node announced outputs {names:?}, not the declared {declared:?}"
                    )),
                    ..c
                };
                self.write_result(&task, &c, &node, attempt, false, &[]);
                return Some(c);
            }
            for p in produced {
                wanted.push((
                    p.name.clone(),
                    p.hash,
                    p.size,
                    format!("output {:?}", p.name),
                ));
            }
        }
        let with_streams = streams.is_some();
        if wanted.is_empty() {
            self.write_result(&task, &c, &node, attempt, false, &[]);
            return Some(c);
        }
        let fetched: Vec<(String, ContentHash, u64)> = wanted
            .iter()
            .map(|(name, hash, size, _)| (name.clone(), *hash, *size))
            .collect();
        let task_dir = self.dir.join(&task);
        let mut fetches = Vec::new();
        for (name, hash, size, what) in wanted {
            let dest = task_dir.join(&name);
            let parent = dest
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| task_dir.clone());
            let made = std::fs::create_dir_all(&parent).and_then(|()| {
                tempfile::Builder::new()
                    .prefix(".fetch-")
                    .tempfile_in(&parent)
            });
            let file = match made {
                Ok(f) if size == 0 && hash == transfer::hash_bytes(&[]) => {
                    // Nothing to fetch: an empty file.
                    match f.persist(&dest) {
                        Ok(_) => continue,
                        Err(e) => Err(e.error),
                    }
                }
                other => other,
            };
            let file = match file {
                Ok(f) => f,
                Err(e) => {
                    let c = Completed {
                        ok: false,
                        error: Some(format!("cannot write {what}: {e}")),
                        ..c
                    };
                    self.write_result(&task, &c, &node, attempt, false, &[]);
                    return Some(c);
                }
            };
            let id = self.id();
            match Receiver::new(id, hash, size, DEFAULT_WINDOW, self.max_file) {
                Ok(receiver) => fetches.push(Fetch {
                    seq: c.seq,
                    name: what,
                    receiver,
                    file,
                    dest,
                }),
                Err(e) => {
                    let c = Completed {
                        ok: false,
                        error: Some(format!("{what} not fetched: {e}")),
                        ..c
                    };
                    self.write_result(&task, &c, &node, attempt, false, &[]);
                    return Some(c);
                }
            }
        }
        if fetches.is_empty() {
            self.write_result(&task, &c, &node, attempt, with_streams, &[]);
            return Some(c);
        }
        self.held.insert(
            (lid, c.seq),
            Held {
                task,
                attempt,
                node,
                left: fetches.len(),
                completed: c,
                error: None,
                streams: with_streams,
                fetched,
            },
        );
        for f in fetches {
            if let Some(t) = unbox(f.receiver.fetch()) {
                send(link, t);
            }
            self.fetches.insert((lid, f.receiver.id()), f);
        }
        None
    }

    /// `DIR/ID/stdout` and `DIR/ID/meta.json` of a result.
    /// `known`: files of `DIR/ID/` whose hash and size are known (fetched and checked);
    /// the others are read to hash them.
    fn write_result(
        &mut self,
        task: &str,
        c: &Completed,
        node: &str,
        attempt: u32,
        streams: bool,
        known: &[(String, ContentHash, u64)],
    ) {
        let hash_of = |name: &str, path: &Path| -> Option<(ContentHash, u64)> {
            match known.iter().find(|k| k.0 == name) {
                Some(&(_, hash, size)) => Some((hash, size)),
                None => crate::node_files::hash_file(path).ok(),
            }
        };
        let dir = self.dir.join(task);
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        if !streams {
            // The node kept no whole streams: the result's (capped) output, and no stderr
            // from an earlier attempt.
            if std::fs::write(dir.join("stdout"), &c.output).is_err() {
                // A full disk: no stdout rather than a cut one.
                let _ = std::fs::remove_file(dir.join("stdout"));
            }
            let _ = std::fs::remove_file(dir.join("stderr"));
        }
        let stream = |name: &str| {
            let (hash, size) = hash_of(name, &dir.join(name))?;
            Some(serde_json::json!({"hash": hash.to_hex(), "size": size}))
        };
        let files: Vec<serde_json::Value> = self
            .plan
            .get(task)
            .map(|p| p.1.clone())
            .unwrap_or_default()
            .iter()
            .filter_map(|name| {
                let path = dir.join(name);
                let (hash, size) = hash_of(name, &path)?;
                Some(serde_json::json!({"name": name, "hash": hash.to_hex(), "size": size}))
            })
            .collect();
        let meta = serde_json::json!({
            "task": task,
            "node": node,
            "attempt": attempt,
            "ok": c.ok,
            "exit_code": c.exit_code,
            "error": c.error,
            "duration_us": c.duration_us,
            "outputs": files,
            "stdout": stream("stdout"),
            "stderr": stream("stderr"),
        });
        if c.ok && !files.is_empty() {
            let kept = files
                .iter()
                .filter_map(|f| {
                    Some(RecordedFile {
                        name: f["name"].as_str()?.to_owned(),
                        hash: f["hash"].as_str()?.to_owned(),
                        size: f["size"].as_u64()?,
                    })
                })
                .collect();
            self.recorded.insert(task.to_owned(), kept);
        }
        if std::fs::write(dir.join("meta.json"), format!("{meta:#}\n")).is_err() {
            let _ = std::fs::remove_file(dir.join("meta.json"));
        }
    }

    /// The declared outputs the success of `task` wrote (for the journal), taken once.
    pub fn take_recorded(&mut self, task: &str) -> Vec<RecordedFile> {
        self.recorded.remove(task).unwrap_or_default()
    }

    /// Whether the outputs a journal recorded with the success of `task` are in the results
    /// directory as they were written: `Err` names what is missing or altered. A task that
    /// declares outputs and has none recorded (a journal of an older version) is not
    /// trusted either.
    pub fn check_kept(&self, task: &str, recorded: &[RecordedFile]) -> Result<(), String> {
        let declared = self
            .plan
            .get(task)
            .map(|p| p.1.as_slice())
            .unwrap_or_default();
        for name in declared {
            let Some(r) = recorded.iter().find(|r| &r.name == name) else {
                return Err(format!("the journal has no hash of its output {name:?}"));
            };
            let path = self.dir.join(task).join(name);
            match crate::node_files::hash_file(&path) {
                Ok((hash, size)) if hash.to_hex() == r.hash && size == r.size => {}
                Ok(_) => return Err(format!("its output {} was altered", path.display())),
                Err(e) => return Err(format!("its output {} is gone ({e})", path.display())),
            }
        }
        Ok(())
    }

    /// The run cancels the assignment `seq` on `link`: one not sent to the node yet (its
    /// inputs being hashed or offered) ends here, with this result for the run, and the
    /// offers only it waited for are aborted; `None` when the node has it (and answers the
    /// cancel itself).
    pub fn cancel(&mut self, link: &Link, seq: u64) -> Option<Completed> {
        let why = || "cancelled before it was assigned".to_owned();
        if self.hashing.parked.remove(&(link.id(), seq)).is_some() {
            return Some(failed(seq, why()));
        }
        self.input_failed(link, seq, why())
    }

    /// `link` closed: what was in progress on it is dropped (the run re-queues its tasks).
    pub fn closed(&mut self, lid: LinkId) {
        self.waiting.retain(|(l, _), _| *l != lid);
        // Its files are still hashed (other links may want them); nobody waits here.
        self.hashing.parked.retain(|(l, _), _| *l != lid);
        self.offers.retain(|(l, _), _| *l != lid);
        self.turn.remove(&lid);
        self.assigned.retain(|(l, _), _| *l != lid);
        self.produced.retain(|(l, _), _| *l != lid);
        self.streams.retain(|(l, _), _| *l != lid);
        self.held.retain(|(l, _), _| *l != lid);
        self.fetches.retain(|(l, _), _| *l != lid);
        self.lanes.remove(&lid);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use p2p_core::net::LinkEvent;
    use std::time::Duration;

    /// A link to an in-memory peer, the peer's end, and the peer's events.
    async fn linked() -> (Link, Link, tokio::sync::mpsc::Receiver<(LinkId, LinkEvent)>) {
        let (d, a, _drx, arx) = crate::test_links::linked(4, 64).await;
        (d, a, arx)
    }

    /// A FIFO at `path`: hashing it waits until a writer comes.
    fn mkfifo(path: &Path) {
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(made.success());
    }

    /// The assignment `seq` of task `task`, of type `a`.
    fn assign_of(seq: u64, task: &str) -> Assign {
        Assign {
            task: task.into(),
            ..p2p_core::testing::assign_of(seq, "a")
        }
    }

    /// The next transfer message the peer got.
    async fn next_transfer(rx: &mut tokio::sync::mpsc::Receiver<(LinkId, LinkEvent)>) -> Transfer {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ev = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("no transfer message")
                .expect("the link closed");
            if let LinkEvent::Transfer(t) = ev.1 {
                return *t;
            }
        }
    }

    /// An input is hashed on a thread of its own: the assignment is held at once (here
    /// while its input, a FIFO nobody writes yet, cannot even be opened), a cancel ends it
    /// on this side, and once the hash comes the next assignment of that input is offered
    /// at once, under the hash of the bytes written.
    #[tokio::test(flavor = "current_thread")]
    async fn inputs_are_hashed_off_the_runs_thread_and_a_held_assignment_cancels_here() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("in.fifo");
        mkfifo(&fifo);
        let text = format!("a1 < {p}\na2 < {p}\n", p = fifo.display());
        let tasks = crate::parse::parse("t.txt", &text).unwrap();
        let mut files = RunFiles::new(&tasks, Some(dir.path().join("results")), 1 << 20).unwrap();
        let mut hashed = files.take_hashed().unwrap();
        let (d, _a, mut arx) = linked().await;
        // Held at once: a hash made here would wait for the FIFO's writer for ever.
        assert!(matches!(files.assign(&d, assign_of(1, "a1")), Step::Held));
        let c = files.cancel(&d, 1).expect("held here, so cancelled here");
        assert_eq!((c.seq, c.ok), (1, false));
        assert_eq!(c.error.as_deref(), Some("cancelled before it was assigned"));
        // Cancelled once: the node has it (for all this side knows) and answers.
        assert!(files.cancel(&d, 1).is_none());
        let writer = std::thread::spawn({
            let fifo = fifo.clone();
            move || std::fs::write(fifo, b"abc").unwrap()
        });
        let h = next_hash(&mut hashed).await;
        writer.join().unwrap();
        assert_eq!(h.0, fifo);
        assert_eq!(h.1, Ok((transfer::hash_bytes(b"abc"), 3)));
        // Nobody waits for it any more: nothing goes out.
        assert!(files.hashed(h).is_empty());
        // Hashed now: the next task's offer goes out as it is assigned.
        assert!(matches!(files.assign(&d, assign_of(2, "a2")), Step::Held));
        match next_transfer(&mut arx).await {
            Transfer::Offer { hash, size, .. } => {
                assert_eq!((hash, size), (transfer::hash_bytes(b"abc"), 3));
            }
            t => panic!("expected an offer, got {t:?}"),
        }
        // Waiting for the node's answer to its offer: cancelled here too, the offer aborted.
        let c = files.cancel(&d, 2).expect("waiting for its input");
        assert!(!c.ok);
        assert!(matches!(
            next_transfer(&mut arx).await,
            Transfer::Abort {
                reason: AbortReason::Cancelled,
                ..
            }
        ));
    }

    /// An assignment waiting for two files, one of which cannot be read, fails once the
    /// other is hashed too (it is not left waiting for a file whose failure was told
    /// before, and the failed file is not hashed again for it).
    #[tokio::test(flavor = "current_thread")]
    async fn a_task_with_one_unreadable_input_of_two_fails_once_both_are_done() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("slow.fifo");
        mkfifo(&fifo);
        let gone = dir.path().join("gone.bin");
        let text = format!("a1 < {} < {}\n", fifo.display(), gone.display());
        let tasks = crate::parse::parse("t.txt", &text).unwrap();
        let mut files = RunFiles::new(&tasks, Some(dir.path().join("results")), 1 << 20).unwrap();
        let mut hashed = files.take_hashed().unwrap();
        let (d, _a, _arx) = linked().await;
        assert!(matches!(files.assign(&d, assign_of(1, "a1")), Step::Held));
        // The missing file fails first (the FIFO waits for its writer).
        let h = next_hash(&mut hashed).await;
        assert_eq!(h.0, gone);
        assert!(files.hashed(h).is_empty(), "still waiting for the FIFO");
        let writer = std::thread::spawn({
            let fifo = fifo.clone();
            move || std::fs::write(fifo, b"abc").unwrap()
        });
        let h = next_hash(&mut hashed).await;
        writer.join().unwrap();
        assert_eq!(h.0, fifo);
        let out = files.hashed(h);
        let seqs: Vec<u64> = out.iter().map(|(_, c)| c.seq).collect();
        assert_eq!(seqs, [1]);
        let e = out[0].1.error.as_deref().unwrap_or_default();
        assert!(e.starts_with("cannot read input \"gone.bin\""), "{e}");
    }

    async fn next_hash(rx: &mut tokio::sync::mpsc::Receiver<Hashed>) -> Hashed {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("no hash")
            .expect("the hashing threads' channel closed")
    }

    /// A file that cannot be read fails the assignments that waited for it, and a later
    /// attempt tries it again.
    #[tokio::test(flavor = "current_thread")]
    async fn an_input_that_cannot_be_hashed_fails_its_waiting_assignments() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone.bin");
        let text = format!("a1 < {p}\na2 < {p}\n", p = gone.display());
        let tasks = crate::parse::parse("t.txt", &text).unwrap();
        let mut files = RunFiles::new(&tasks, Some(dir.path().join("results")), 1 << 20).unwrap();
        let mut hashed = files.take_hashed().unwrap();
        let (d, _a, _arx) = linked().await;
        assert!(matches!(files.assign(&d, assign_of(1, "a1")), Step::Held));
        assert!(matches!(files.assign(&d, assign_of(2, "a2")), Step::Held));
        let h = next_hash(&mut hashed).await;
        assert!(h.1.is_err());
        let failed = files.hashed(h);
        let seqs: Vec<u64> = failed.iter().map(|(_, c)| c.seq).collect();
        assert_eq!(seqs, [1, 2]);
        for (_, c) in &failed {
            let e = c.error.as_deref().unwrap_or_default();
            assert!(e.starts_with("cannot read input \"gone.bin\""), "{e}");
        }
        // Written since: the retry hashes it.
        std::fs::write(&gone, b"x").unwrap();
        assert!(matches!(files.assign(&d, assign_of(3, "a1")), Step::Held));
        let h = next_hash(&mut hashed).await;
        assert_eq!(h.1, Ok((transfer::hash_bytes(b"x"), 1)));
        assert!(files.hashed(h).is_empty());
    }
}
