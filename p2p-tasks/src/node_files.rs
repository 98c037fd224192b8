//! The node's side of files (protocol v3): inputs offered by a coordinator land in the
//! node's [cache](crate::cache) (unless it has them: `Have`), a task's inputs are placed in
//! its working directory from there, its declared outputs go into the cache after success
//! (announced with `Produced` before the result), and a coordinator fetches them by hash.
//!
//! [`NodeFiles`] is the node's (one cache, shared by every connection); [`LinkFiles`] is one
//! connection's transfers. The rules of each transfer are [`p2p_core::transfer`]'s; this
//! module only moves bytes between them, the cache and the disk. Bounds: at most
//! [`MAX_INCOMING`] files coming in and one going out per connection (further fetches wait,
//! at most [`MAX_QUEUED_FETCHES`]), and at most [`MAX_PENDING_FILES`] `Files` records
//! waiting for their `Assign`.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use p2p_core::file::ChunkFile;
use p2p_core::message::{AbortReason, PlacedFile, ProducedFile, StreamFile};
use p2p_core::net::{Command, Link};
use p2p_core::transfer::{self, Hasher, Receiver, Sender, DEFAULT_WINDOW};
use p2p_core::{Assign, ContentHash, Transfer};
use tracing::{debug, warn};

use crate::cache::{Cache, CommitError};
use crate::file_writer::Writer;
pub use crate::file_writer::MAX_WRITERS;
use crate::handler::{TaskFiles, TaskOutcome};

/// Most files coming in at once on one connection.
pub const MAX_INCOMING: usize = 8;

/// Most fetches waiting for the one going out on a connection.
pub const MAX_QUEUED_FETCHES: usize = 64;

/// Most `Files` records waiting for their `Assign` on a connection.
pub const MAX_PENDING_FILES: usize = 1024;

/// A node's files: its cache and its limits.
#[derive(Debug)]
pub struct NodeFiles {
    cache: Mutex<Cache>,
    max_file: u64,
    max_result: u64,
    chunk: usize,
    link_inputs: bool,
}

/// The default of `serve --max-result-size`: the most bytes of a task's standard output
/// (and, separately, of its standard error) kept whole for the coordinator.
pub const DEFAULT_MAX_RESULT: u64 = 1 << 30;

impl NodeFiles {
    /// Files kept in `cache`, refusing inputs over `max_file` bytes, sent in chunks that fit
    /// frames of `max_frame` bytes.
    pub fn new(cache: Cache, max_file: u64, max_frame: usize) -> NodeFiles {
        NodeFiles {
            cache: Mutex::new(cache),
            max_file,
            max_result: DEFAULT_MAX_RESULT,
            chunk: transfer::chunk_len(max_frame),
            link_inputs: false,
        }
    }

    /// Places the tasks' inputs as hard links to the cached files, made read-only, where
    /// the file system allows (`serve --link-inputs`): no copy per task, whatever the
    /// file's size. A task must then not write its inputs: after each attempt the node
    /// checks the cached file's size and modification time, and one that changed fails the
    /// attempt and leaves the cache (the next task that needs it has it sent again).
    pub fn with_link_inputs(mut self, link: bool) -> NodeFiles {
        self.link_inputs = link;
        self
    }

    /// Keeps at most `bytes` of each of a task's standard streams (`serve
    /// --max-result-size`); beyond, a stream is cut and ends with a marker line.
    pub fn with_max_result(mut self, bytes: u64) -> NodeFiles {
        self.max_result = bytes;
        self
    }

    /// Gives `dest` the cached file of `hash`, for a reader that never writes it (a run
    /// that a node hosts keeps the inputs its client offered it): a hard link where the
    /// file system allows (cached files are never written in place, only replaced or
    /// removed, so the bytes stay; the cache evicting it later frees nothing while `dest`
    /// lives), else a copy. Returns the file's size; an error of kind `NotFound` when the
    /// cache does not hold `hash`.
    pub fn keep(&self, hash: &ContentHash, dest: &std::path::Path) -> std::io::Result<u64> {
        let mut cache = self.cache();
        if !cache.has(hash) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the file cache does not hold {hash}"),
            ));
        }
        let src = cache.path(hash);
        match std::fs::hard_link(&src, dest) {
            Ok(()) => std::fs::metadata(dest).map(|m| m.len()),
            Err(_) => cache.place(hash, dest),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding it leaves the index as it was between two operations.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Incoming {
    receiver: Receiver,
    file: Writer,
    hash: ContentHash,
    size: u64,
    /// When the offer came: the log's transfer time is from there to the file kept.
    offered: std::time::Instant,
}

struct Outgoing {
    sender: Sender,
    /// Its chunks name their range of it; the connection reads them as it writes them.
    file: ChunkFile,
}

/// Longest a link's chunk lane (`ChunkLane`) waits for a place in its link's chunk queue
/// (the link's driver takes chunks as fast as the connection sends them, so this is a
/// connection that stopped; its idle timeout, 10 s by default, closes it first): then the
/// transfers waiting are given up, each with an `Abort` to the peer.
pub const LANE_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// The chunks going out on one link, in order: queued on the link's chunk queue
/// ([`Link::send_chunk`]) at once while it has room, else kept here, in order, and moved
/// there by a task of their own as the link's driver takes them (it waits for each place,
/// at most [`LANE_STALL`]). A credit larger than the queue (a receiver may give any
/// window, and smaller chunks make more of them) is sent whole, never dropped half way;
/// control commands have the link's command queue to themselves, so a file never makes
/// a result or an `Ack` find it full. Chunks name ranges of their files
/// ([`Transfer::FileChunk`]), so what waits here holds no file data. A transfer whose
/// chunks could not go on (the link closed, or took nothing for [`LANE_STALL`]) is told to
/// the peer with an `Abort` and to the owner by [`ChunkLane::take_failed`].
#[derive(Clone, Default)]
pub(crate) struct ChunkLane(Arc<Mutex<LaneState>>);

#[derive(Default)]
struct LaneState {
    waiting: VecDeque<Transfer>,
    /// A task moves `waiting` to the link.
    draining: bool,
    /// Transfers given up here, and why.
    failed: Vec<(u64, String)>,
}

fn lane_chunk_id(t: &Transfer) -> u64 {
    match t {
        Transfer::Chunk { id, .. } | Transfer::FileChunk { id, .. } => *id,
        _ => 0,
    }
}

impl LaneState {
    /// Starts the task that moves the waiting chunks to `link`, unless it runs. `false`
    /// when there is no runtime to run it on (every transfer waiting is given up).
    fn start_draining(&mut self, lane: &ChunkLane, link: &Link) -> bool {
        if self.draining {
            return true;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.fail_all(link, "no runtime to send the file's chunks from");
            return false;
        };
        self.draining = true;
        rt.spawn(drain_lane(lane.clone(), link.clone()));
        true
    }

    /// Gives up every transfer waiting, telling each peer with an `Abort` (when the link
    /// still takes one).
    fn fail_all(&mut self, link: &Link, why: &str) {
        let mut ids: Vec<u64> = self.waiting.iter().map(lane_chunk_id).collect();
        ids.dedup();
        self.waiting.clear();
        for id in ids {
            if !self.failed.iter().any(|f| f.0 == id) {
                warn!(id, "a file transfer is given up: {why}");
                abort(link, id, AbortReason::Io, why);
                self.failed.push((id, why.to_owned()));
            }
        }
    }
}

impl ChunkLane {
    fn state(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `chunk` (a chunk of one of this link's transfers) behind those waiting.
    /// `false` when the link is closed.
    pub(crate) fn send(&self, link: &Link, chunk: Transfer) -> bool {
        let mut s = self.state();
        if s.waiting.is_empty() && !s.draining {
            let id = lane_chunk_id(&chunk);
            let sent = match link.try_reserve_chunk() {
                Ok(Some(place)) => place.send(chunk),
                // Full: the chunk waits here, behind nothing.
                Ok(None) => {
                    s.waiting.push_back(chunk);
                    return s.start_draining(self, link);
                }
                Err(e) => Err(e),
            };
            return match sent {
                Ok(()) => true,
                Err(e) => {
                    debug!(error = %e, "chunk not sent");
                    s.failed.push((id, e.to_string()));
                    false
                }
            };
        }
        s.waiting.push_back(chunk);
        s.start_draining(self, link)
    }

    /// Drops the chunks of transfer `id` still waiting (it ended: they must not follow its
    /// `Abort`), and what was recorded of its failure.
    pub(crate) fn forget(&self, id: u64) {
        let mut s = self.state();
        s.waiting.retain(|c| lane_chunk_id(c) != id);
        s.failed.retain(|f| f.0 != id);
    }

    /// The transfers given up since the last call, and why (their peers were told).
    pub(crate) fn take_failed(&self) -> Vec<(u64, String)> {
        let mut s = self.state();
        if s.failed.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut s.failed)
    }

    /// Chunks waiting for room on the link.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.state().waiting.len()
    }
}

/// Moves a lane's waiting chunks to its link's chunk queue as the link's driver takes
/// them: it waits for a place (at most [`LANE_STALL`]), then, holding the lane, fills it
/// with the first chunk waiting and as many more as there are places free. A transfer
/// forgotten meanwhile ([`ChunkLane::forget`], under the same lock) has no chunk left to
/// fill a place with.
async fn drain_lane(lane: ChunkLane, link: Link) {
    loop {
        let place = link.reserve_chunk(LANE_STALL).await;
        let mut s = lane.state();
        let mut place = match place {
            Ok(p) => Some(p),
            Err(e) => {
                let why = format!("the connection took no more of the file: {e}");
                s.fail_all(&link, &why);
                s.draining = false;
                return;
            }
        };
        while let Some(p) = place.take() {
            let Some(c) = s.waiting.pop_front() else {
                break;
            };
            let id = lane_chunk_id(&c);
            if let Err(e) = p.send(c) {
                // Only chunks are queued in a lane; said anyway rather than lost.
                let why = format!("a chunk could not be queued: {e}");
                s.waiting.retain(|c| lane_chunk_id(c) != id);
                if !s.failed.iter().any(|f| f.0 == id) {
                    abort(&link, id, AbortReason::Io, &why);
                    s.failed.push((id, why));
                }
            }
            if s.waiting.is_empty() {
                break;
            }
            place = match link.try_reserve_chunk() {
                Ok(p) => p,
                Err(e) => {
                    let why = format!("the connection took no more of the file: {e}");
                    s.fail_all(&link, &why);
                    s.draining = false;
                    return;
                }
            };
        }
        if s.waiting.is_empty() {
            s.draining = false;
            return;
        }
    }
}

struct RunningFiles {
    pinned: Vec<ContentHash>,
    outputs: Vec<String>,
    collect: Option<tempfile::TempDir>,
    /// With [`NodeFiles::with_link_inputs`]: each input, as it was when it was placed.
    linked: Vec<Linked>,
}

/// An input placed as a link to the cached file: the file (open, so its bytes are checked
/// even when the cache has let go of its name or named another copy with it since), with
/// its size and modification time then.
struct Linked {
    name: String,
    hash: ContentHash,
    file: std::fs::File,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl Linked {
    /// The input `name`, the cached file of `hash` (through `path`, the attempt's own link
    /// to it), as it is now.
    fn open(name: &str, hash: ContentHash, path: &std::path::Path) -> std::io::Result<Linked> {
        let file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        Ok(Linked {
            name: name.to_owned(),
            hash,
            file,
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }

    /// Whether the file's size or modification time moved since [`Linked::open`] (a
    /// metadata that cannot be read counts as moved).
    fn changed(&self) -> bool {
        match self.file.metadata() {
            Ok(m) => m.len() != self.len || m.modified().ok() != self.modified,
            Err(_) => true,
        }
    }
}

/// One connection's transfers (see the module documentation).
pub struct LinkFiles {
    node: Option<Arc<NodeFiles>>,
    incoming: HashMap<u64, Incoming>,
    outgoing: Option<Outgoing>,
    fetches: VecDeque<(u64, ContentHash, u32)>,
    pending: HashMap<u64, (Vec<PlacedFile>, Vec<String>)>,
    running: HashMap<u64, RunningFiles>,
    /// The outgoing file's chunks, in order, as the link takes them.
    lane: ChunkLane,
}

impl std::fmt::Debug for LinkFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkFiles")
            .field("incoming", &self.incoming.len())
            .field("outgoing", &self.outgoing.is_some())
            .finish()
    }
}

fn send(link: &Link, t: Transfer) -> bool {
    match link.send(Command::Transfer(Box::new(t))) {
        Ok(()) => true,
        Err(e) => {
            debug!(error = %e, "transfer message not sent");
            false
        }
    }
}

fn abort(link: &Link, id: u64, reason: AbortReason, message: impl Into<String>) {
    send(
        link,
        Transfer::Abort {
            id,
            reason,
            message: message.into(),
        },
    );
}

/// [`Cache::relieve_disk`], saying what a full disk cost.
fn relieve_disk(cache: &mut Cache, extra: u64) {
    match cache.relieve_disk(extra) {
        Ok((0, _)) => {}
        Ok((files, bytes)) => warn!(
            files,
            bytes, "the disk is nearly full: cached files no task uses were dropped (sent again when wanted)"
        ),
        Err(e) => debug!(error = %e, "cannot read the disk's free space"),
    }
}

fn io_reason(e: &std::io::Error) -> AbortReason {
    // ENOSPC and EDQUOT: the disk (or the quota) is full. By the error's kind, which a
    // temporary file's write error keeps when it is wrapped with the file's path (the
    // system's error number is then out of reach: tempfile's wrapper hides it).
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => AbortReason::NoSpace,
        _ => AbortReason::Io,
    }
}

impl LinkFiles {
    /// A connection's transfers; without `node`, every offer and fetch is refused.
    pub fn new(node: Option<Arc<NodeFiles>>) -> LinkFiles {
        LinkFiles {
            node,
            incoming: HashMap::new(),
            outgoing: None,
            fetches: VecDeque::new(),
            pending: HashMap::new(),
            running: HashMap::new(),
            lane: ChunkLane::default(),
        }
    }

    /// Handles a transfer message from the peer, answering on `link`.
    pub fn on_transfer(&mut self, t: Transfer, link: &Link) {
        let Some(node) = self.node.clone() else {
            if let Transfer::Offer { id, .. } | Transfer::Fetch { id, .. } = t {
                abort(link, id, AbortReason::Io, "this node keeps no files");
            }
            return;
        };
        // A file going out that its lane gave up (its peer was told) makes way for the
        // next fetch.
        let failed = self.lane.take_failed();
        if !failed.is_empty() {
            if self
                .outgoing
                .as_ref()
                .is_some_and(|o| failed.iter().any(|f| f.0 == o.sender.id()))
            {
                self.outgoing = None;
            }
            self.pump(&node, link);
        }
        match t {
            Transfer::Offer { id, hash, size } => {
                if node.cache().has(&hash) {
                    debug!(%hash, size, "input offered: already here");
                    send(link, Transfer::Have { id });
                    return;
                }
                if self.incoming.len() >= MAX_INCOMING || self.incoming.contains_key(&id) {
                    abort(
                        link,
                        id,
                        AbortReason::Io,
                        "too many files coming in at once",
                    );
                    return;
                }
                let receiver = match Receiver::new(id, hash, size, DEFAULT_WINDOW, node.max_file) {
                    Ok(r) => r,
                    Err(e) => {
                        abort(link, id, AbortReason::TooLarge, e.to_string());
                        return;
                    }
                };
                relieve_disk(&mut node.cache(), size);
                let file = match node.cache().partial().and_then(|f| Writer::new(f, size)) {
                    Ok(f) => f,
                    Err(e) => {
                        abort(
                            link,
                            id,
                            io_reason(&e),
                            format!("cannot store the file: {e}"),
                        );
                        return;
                    }
                };
                debug!(%hash, size, "input offered: receiving it");
                send(link, unbox(receiver.want()));
                self.incoming.insert(
                    id,
                    Incoming {
                        receiver,
                        file,
                        hash,
                        size,
                        offered: std::time::Instant::now(),
                    },
                );
            }
            Transfer::Chunk { id, offset, data } => self.on_chunk(&node, id, offset, data, link),
            Transfer::Ack { id, received } => {
                if let Some(o) = self.outgoing.as_mut().filter(|o| o.sender.id() == id) {
                    if let Err(e) = o.sender.on_ack(received) {
                        warn!(error = %e, "a bad Ack: the transfer is dropped");
                        self.lane.forget(id);
                        self.outgoing = None;
                    }
                    self.pump(&node, link);
                }
            }
            Transfer::Done { id } => {
                if self.outgoing.as_ref().is_some_and(|o| o.sender.id() == id) {
                    self.lane.forget(id);
                    self.outgoing = None;
                    self.pump(&node, link);
                }
            }
            Transfer::Abort {
                id,
                reason,
                message,
            } => {
                debug!(id, ?reason, message = %p2p_core::text::escape(&message), "transfer given up by the peer");
                self.incoming.remove(&id);
                if self.outgoing.as_ref().is_some_and(|o| o.sender.id() == id) {
                    self.lane.forget(id);
                    self.outgoing = None;
                }
                self.fetches.retain(|f| f.0 != id);
                self.pump(&node, link);
            }
            Transfer::Fetch { id, hash, window } => {
                if self.fetches.len() >= MAX_QUEUED_FETCHES {
                    abort(link, id, AbortReason::Io, "too many fetches waiting");
                    return;
                }
                self.fetches.push_back((id, hash, window));
                self.pump(&node, link);
            }
            Transfer::Files {
                seq,
                inputs,
                outputs,
            } => {
                if self.pending.len() >= MAX_PENDING_FILES {
                    warn!(
                        seq,
                        "too many file lists waiting for their tasks: one is dropped"
                    );
                    return;
                }
                self.pending.insert(seq, (inputs, outputs));
            }
            // Answers to offers and fetches this node does not make.
            Transfer::Have { .. }
            | Transfer::Want { .. }
            | Transfer::Produced { .. }
            | Transfer::Streams { .. }
            | Transfer::FileChunk { .. } => {}
        }
    }

    fn on_chunk(&mut self, node: &NodeFiles, id: u64, offset: u64, data: Bytes, link: &Link) {
        let Some(inc) = self.incoming.get_mut(&id) else {
            return;
        };
        // What the receiver accepts is the whole chunk, hashed here and written as it
        // came (by a thread of its own for a large file); the hash is checked at the end.
        let complete = match inc.receiver.on_chunk_unhashed(offset, &data) {
            Ok(last) => last,
            Err(e) => {
                warn!(error = %e, "an input transfer failed");
                abort(link, id, AbortReason::Io, e.to_string());
                self.incoming.remove(&id);
                return;
            }
        };
        if let Err(e) = inc.file.write(data) {
            abort(
                link,
                id,
                io_reason(&e),
                format!("cannot store the file: {e}"),
            );
            self.incoming.remove(&id);
            return;
        }
        if !complete {
            if let Some(ack) = inc.receiver.poll_ack() {
                send(link, unbox(ack));
            }
            return;
        }
        let Some(mut inc) = self.incoming.remove(&id) else {
            return;
        };
        let done = unbox(inc.receiver.done());
        let file = match inc.file.finish() {
            Ok((f, got)) => match inc.receiver.check_hash(got) {
                Ok(()) => f,
                Err(e) => {
                    warn!(error = %e, "an input transfer failed");
                    abort(link, id, AbortReason::HashMismatch, e.to_string());
                    return;
                }
            },
            Err(e) => {
                abort(
                    link,
                    id,
                    io_reason(&e),
                    format!("cannot store the file: {e}"),
                );
                return;
            }
        };
        let mut cache = node.cache();
        match cache.commit(file, inc.hash, inc.size) {
            Ok(_) => {
                cache.unpin(&inc.hash);
                drop(cache);
                send(link, done);
                let took = inc.offered.elapsed();
                debug!(
                    hash = %inc.hash,
                    size = inc.size,
                    took_ms = format_args!("{:.1}", took.as_secs_f64() * 1e3),
                    mb_per_s = format_args!("{:.0}", inc.size as f64 / 1e6 / took.as_secs_f64().max(1e-9)),
                    "input received, checked and kept"
                );
            }
            Err(CommitError::NoRoom(e)) => {
                drop(cache);
                abort(link, id, AbortReason::NoSpace, e.to_string());
            }
            Err(e) => {
                drop(cache);
                abort(link, id, AbortReason::Io, e.to_string());
            }
        }
    }

    /// Sends what the credit allows of the file going out, or starts the next fetch.
    fn pump(&mut self, node: &NodeFiles, link: &Link) {
        loop {
            if self.outgoing.is_none() {
                let Some((id, hash, window)) = self.fetches.pop_front() else {
                    return;
                };
                let mut cache = node.cache();
                if !cache.has(&hash) {
                    drop(cache);
                    abort(
                        link,
                        id,
                        AbortReason::NotFound,
                        format!("no file {hash} here"),
                    );
                    continue;
                }
                let path = cache.path(&hash);
                drop(cache);
                let opened =
                    std::fs::File::open(&path).and_then(|f| f.metadata().map(|m| (f, m.len())));
                let (file, size) = match opened {
                    Ok((f, size)) => (ChunkFile::new(f), size),
                    Err(e) => {
                        abort(link, id, AbortReason::Io, e.to_string());
                        continue;
                    }
                };
                match Sender::fetched(id, size, node.chunk, window) {
                    Ok(sender) => self.outgoing = Some(Outgoing { sender, file }),
                    Err(e) => {
                        abort(link, id, AbortReason::Io, e.to_string());
                        continue;
                    }
                }
            }
            let Some(o) = self.outgoing.as_mut() else {
                return;
            };
            let Some((offset, len)) = o.sender.poll_read() else {
                return;
            };
            // The chunk names its range of the file; the connection reads the bytes as it
            // writes them (into its frame with a key; `sendfile` to another machine), so a
            // credit of any size holds no file data here.
            let id = o.sender.id();
            let msg = match o.sender.file_chunk(offset, len, &o.file) {
                Ok(m) => m,
                Err(e) => {
                    self.lane.forget(id);
                    abort(link, id, AbortReason::Io, e.to_string());
                    self.outgoing = None;
                    continue;
                }
            };
            if !self.lane.send(link, unbox(msg)) {
                self.outgoing = None;
                return;
            }
        }
    }

    /// The files of the task `a` (from its `Files` record, if any): its inputs, pinned in
    /// the cache until [`LinkFiles::finish`], and its outputs' collection directory. An
    /// input not in the cache, or an output name that is not a plain relative path, fails
    /// the task (the reason).
    pub fn files_for(&mut self, a: &Assign) -> Result<Option<Box<TaskFiles>>, String> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let Some((inputs, outputs)) = self.pending.remove(&a.seq) else {
            return Ok(None);
        };
        let Some(node) = self.node.clone() else {
            return Err("this node keeps no files".to_owned());
        };
        for o in &outputs {
            if let Some(problem) = crate::task::output_name_problem(o) {
                return Err(format!("bad output name {o:?}: {problem}"));
            }
        }
        let mut cache = node.cache();
        let mut files = TaskFiles::default();
        // Every task with a `Files` record keeps its whole standard streams here too.
        let collect = match tempfile::Builder::new()
            .prefix("out-")
            .tempdir_in(cache.partial_dir())
        {
            Ok(d) => d,
            Err(e) => return Err(format!("cannot make room for the outputs: {e}")),
        };
        // Linked inputs are linked here first, in the attempt's own directory: the task's
        // link is then made from this one, so the file checked after the attempt is the one
        // the task had, whatever the cache's name points to by then (a file dropped and
        // received again between this and the placement).
        let staged = collect.path().join("linked");
        let mut link = node.link_inputs && std::fs::create_dir(&staged).is_ok();
        let mut pinned = Vec::new();
        let mut linked = Vec::new();
        for (n, i) in inputs.iter().enumerate() {
            if !cache.has(&i.hash) || !cache.pin(&i.hash) {
                for h in &pinned {
                    cache.unpin(h);
                }
                return Err(format!(
                    "input {:?} ({}) is not on this node",
                    i.name, i.hash
                ));
            }
            pinned.push(i.hash);
            let mut path = cache.path(&i.hash);
            let at = staged.join(n.to_string());
            // Where no link can be made, the attempt's inputs are copies, as without
            // `--link-inputs`.
            if link && crate::handler::read_only_link(&path, &at).is_err() {
                link = false;
            }
            if link {
                path = at;
                // A file an earlier task wrote (its check has not run yet) is not placed.
                let opened = Linked::open(&i.name, i.hash, &path).and_then(|l| {
                    if cache.unchanged(&l.hash, l.len, l.modified) {
                        Ok(l)
                    } else {
                        cache.forget_file(&l.hash, &l.file);
                        Err(std::io::Error::other(
                            "a task wrote it; dropped from the cache",
                        ))
                    }
                });
                match opened {
                    Ok(l) => linked.push(l),
                    Err(e) => {
                        for h in &pinned {
                            cache.unpin(h);
                        }
                        return Err(format!("cannot place input {:?} ({}): {e}", i.name, i.hash));
                    }
                }
            }
            files.inputs.push((i.name.clone(), path));
        }
        if !link && !linked.is_empty() {
            // A later input could not be linked: all are copied, from the cache.
            linked.clear();
            for (f, i) in files.inputs.iter_mut().zip(&inputs) {
                f.1 = cache.path(&i.hash);
            }
        }
        // Its inputs are pinned: what else the disk must give up for the attempt's streams
        // and outputs, and for the copies of its inputs unless they are links, goes now.
        let copies: u64 = if link {
            0
        } else {
            inputs
                .iter()
                .filter_map(|i| cache.index().size_of(&i.hash))
                .sum()
        };
        relieve_disk(&mut cache, copies);
        files.link_inputs = link;
        files.outputs = outputs.clone();
        files.collect = Some(collect.path().to_path_buf());
        files.streams = Some(collect.path().to_path_buf());
        files.stream_limit = node.max_result;
        let collect = Some(collect);
        self.running.insert(
            a.seq,
            RunningFiles {
                pinned,
                outputs,
                collect,
                linked,
            },
        );
        Ok(Some(Box::new(files)))
    }

    /// The task of `seq` ended with `outcome`: its inputs are unpinned and, on success, its
    /// outputs go into the cache and are announced (`Produced`, sent before the result). A
    /// failure to keep an output fails the task.
    pub fn finish(&mut self, seq: u64, outcome: &mut TaskOutcome, link: &Link) {
        let Some(run) = self.running.remove(&seq) else {
            return;
        };
        let Some(node) = self.node.clone() else {
            return;
        };
        {
            let mut cache = node.cache();
            for h in &run.pinned {
                cache.unpin(h);
            }
            // A linked input the task wrote: the cached bytes are no longer the hash's.
            for l in run.linked.iter().filter(|l| l.changed()) {
                cache.forget_file(&l.hash, &l.file);
                warn!(input = %l.name, hash = %l.hash, "the task wrote an input placed as a link (--link-inputs): the cached copy is dropped");
                let reason = format!(
                    "the task wrote its input {:?}, a link to the node's cached copy (serve --link-inputs: inputs are read-only); the copy was dropped from the cache",
                    l.name
                );
                if outcome.ok {
                    outcome.ok = false;
                    outcome.error = Some(reason);
                }
            }
        }
        let Some(collect) = run.collect else {
            return;
        };
        // The streams first, whatever the outcome (a failure's stderr is wanted most).
        let keep = |path: &std::path::Path| {
            hash_file(path)
                .map_err(|e| e.to_string())
                .and_then(|(hash, size)| {
                    node.cache()
                        .commit_path(path, hash, size)
                        .map(|_| StreamFile { hash, size })
                        .map_err(|e| e.to_string())
                })
        };
        let (out_path, err_path) = (collect.path().join("stdout"), collect.path().join("stderr"));
        if out_path.exists() && err_path.exists() {
            match (keep(&out_path), keep(&err_path)) {
                (Ok(stdout), Ok(stderr)) => {
                    send(
                        link,
                        Transfer::Streams {
                            seq,
                            stdout,
                            stderr,
                        },
                    );
                }
                (Err(e), _) | (_, Err(e)) => {
                    if outcome.ok {
                        outcome.ok = false;
                        outcome.error =
                            Some(format!("cannot keep the task's output on this node: {e}"));
                    }
                }
            }
        }
        if !outcome.ok || run.outputs.is_empty() {
            return;
        }
        let mut produced = Vec::with_capacity(run.outputs.len());
        for (i, name) in run.outputs.iter().enumerate() {
            let path = collect.path().join(i.to_string());
            let kept = hash_file(&path)
                .map_err(|e| e.to_string())
                .and_then(|(hash, size)| {
                    node.cache()
                        .commit_path(&path, hash, size)
                        .map(|_| (hash, size))
                        .map_err(|e| e.to_string())
                });
            match kept {
                Ok((hash, size)) => produced.push(ProducedFile {
                    name: name.clone(),
                    hash,
                    size,
                }),
                Err(e) => {
                    outcome.ok = false;
                    outcome.error = Some(format!("cannot keep output {name:?}: {e}"));
                    return;
                }
            }
        }
        send(
            link,
            Transfer::Produced {
                seq,
                outputs: produced,
            },
        );
    }
}

fn unbox(m: p2p_core::Message) -> Transfer {
    match m {
        p2p_core::Message::Transfer(t) => *t,
        // The state machines make only transfer messages.
        _ => Transfer::Abort {
            id: 0,
            reason: AbortReason::Io,
            message: String::new(),
        },
    }
}

/// The content hash and size of the file at `path`, read in 64 KiB pieces.
pub fn hash_file(path: &std::path::Path) -> std::io::Result<(ContentHash, u64)> {
    hash_file_until(path, &std::sync::atomic::AtomicBool::new(false))
}

/// [`hash_file`], giving up with an error once `stop` is set (checked before each read).
pub fn hash_file_until(
    path: &std::path::Path,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<(ContentHash, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::other("given up"));
        }
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok((h.finish(), size));
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
}

/// Where a node keeps its files: `DATA_DIR/cache/SLOT`.
pub fn cache_dir(data_dir: &std::path::Path, slot: &str) -> PathBuf {
    data_dir.join("cache").join(slot)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::io::Write;

    /// A full disk is `NoSpace`, also when the error comes wrapped with the temporary
    /// file's path (every write into the cache's partial file does): it was `Io`.
    #[test]
    fn a_full_disk_is_no_space_also_through_a_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
            return;
        };
        let path = tempfile::TempPath::try_from_path(d.path().join("never")).unwrap();
        let mut file = tempfile::NamedTempFile::from_parts(full, path);
        let e = file.write_all(&[1u8; 4096]).unwrap_err();
        assert_eq!(e.raw_os_error(), None, "wrapped: {e:?}");
        assert_eq!(io_reason(&e), AbortReason::NoSpace, "{e}");
        assert_eq!(
            io_reason(&std::io::Error::from_raw_os_error(28)),
            AbortReason::NoSpace
        );
        assert_eq!(
            io_reason(&std::io::Error::from_raw_os_error(5)),
            AbortReason::Io
        );
        assert_eq!(io_reason(&std::io::Error::other("x")), AbortReason::Io);
    }

    /// With `--link-inputs`, a task's input is a link made in the attempt's own directory
    /// when it is given its files, and that file is the one checked after the attempt: a
    /// cache that dropped the file and received it again before the task's link was made
    /// (the task then wrote the new copy, and the old one was checked) cannot hide a write.
    #[tokio::test(flavor = "current_thread")]
    async fn a_linked_input_is_checked_as_the_task_had_it_whatever_the_cache_names_later() {
        let (_d, a, _drx, _arx) = crate::test_links::linked(4, 64).await;

        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(&root.path().join("cache"), 1 << 20).unwrap();
        let node = Arc::new(NodeFiles::new(cache, 1 << 20, 1 << 20).with_link_inputs(true));
        let put = |bytes: &[u8]| crate::test_links::put(&mut node.cache(), bytes);
        let (hash, cached) = put(b"input bytes");
        let mut files = LinkFiles::new(Some(node.clone()));
        let placed = vec![PlacedFile {
            name: "in.txt".into(),
            hash,
        }];
        files.on_transfer(
            Transfer::Files {
                seq: 1,
                inputs: placed,
                outputs: Vec::new(),
            },
            &a,
        );
        let given = files
            .files_for(&p2p_core::testing::assign(1))
            .unwrap()
            .expect("its files");
        assert!(given.link_inputs);
        let path = given.inputs[0].1.clone();
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
        assert_ne!(
            path, cached,
            "the task's link is made from its own directory"
        );
        assert_eq!(ino(&path), ino(&cached));
        // The cache drops its file and receives it again (a new file under the same name),
        // then the task writes the file it was given.
        std::fs::remove_file(&cached).unwrap();
        let (_, again) = put(b"input bytes");
        assert_ne!(ino(&again), ino(&path));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"written"))
            .unwrap();
        let mut outcome = TaskOutcome::success("done");
        files.finish(1, &mut outcome, &a);
        assert!(!outcome.ok, "the write went unseen");
        let error = outcome.error.unwrap_or_default();
        assert!(
            error.contains("the task wrote its input \"in.txt\""),
            "{error}"
        );
        // The copy received again is not the one written: it stays.
        assert!(node.cache().has(&hash));
        assert_eq!(std::fs::read(&again).unwrap(), b"input bytes");
    }

    /// A credit of many more chunks than a capacity-1 link's command queue holds goes out
    /// whole and in order through a [`ChunkLane`] (queued at once it found the queue full
    /// half way), while the place kept for control commands stays free: 64 sent in the
    /// middle of it all find room.
    #[tokio::test(flavor = "current_thread")]
    async fn a_lane_sends_a_credit_larger_than_the_queue_in_order_leaving_room_for_control() {
        use p2p_core::net::LinkEvent;
        let (d, a, mut drx, mut arx) = crate::test_links::linked(1, 8192).await;
        // 600 chunks of 4 KiB (a small frame's), over four times the queue.
        let chunk = 4096;
        let bytes: Vec<u8> = (0..600 * chunk).map(|i| (i * 31 % 253) as u8).collect();
        let d_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(d_file.path(), &bytes).unwrap();
        let file = ChunkFile::open(d_file.path()).unwrap();
        // The far end asks for it with a credit of the whole file (its connection then
        // takes the chunks).
        a.send(Command::Transfer(Box::new(Transfer::Fetch {
            id: 7,
            hash: transfer::hash_bytes(&bytes),
            window: u32::MAX,
        })))
        .unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let ev = tokio::time::timeout_at(deadline, drx.recv()).await;
            let ev = ev.expect("no Fetch").expect("the link closed");
            if let LinkEvent::Transfer(t) = ev.1 {
                if matches!(*t, Transfer::Fetch { id: 7, .. }) {
                    break;
                }
            }
        }
        let mut sender = Sender::fetched(7, bytes.len() as u64, chunk, u32::MAX).unwrap();
        let lane = ChunkLane::default();
        let (free, max) = d.chunk_queue_room();
        assert!(max < 600 && free == max, "{free} of {max}");
        while let Some((offset, len)) = sender.poll_read() {
            let m = sender.file_chunk(offset, len, &file).unwrap();
            assert!(lane.send(&d, unbox(m)));
        }
        assert!(lane.waiting() > 400, "{} waiting", lane.waiting());
        for id in 0..64 {
            d.send(Command::Transfer(Box::new(Transfer::Have {
                id: 1000 + id,
            })))
            .expect("a control command found the queue full");
        }
        let (mut got, mut haves) = (Vec::new(), 0);
        while got.len() < bytes.len() || haves < 64 {
            let ev = tokio::time::timeout_at(deadline, arx.recv())
                .await
                .expect("the lane stopped sending")
                .expect("the link closed");
            let LinkEvent::Transfer(t) = ev.1 else {
                continue;
            };
            match *t {
                Transfer::Chunk {
                    id: 7,
                    offset,
                    data,
                } => {
                    assert_eq!(offset, got.len() as u64, "chunks out of order");
                    got.extend_from_slice(&data);
                }
                Transfer::Have { .. } => haves += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(got == bytes, "the file arrived altered");
        assert_eq!(lane.waiting(), 0);
        assert!(lane.take_failed().is_empty());
    }
}
