//! The worker side: runs the tasks peers assign, with the node's handlers, within the
//! node's capacity.
//!
//! One [`Worker`] per node holds the handlers and its slots: an [`Admission`] that gives
//! freed slots to the connections (coordinators) in turn, so one large run cannot starve a
//! small one, with a bounded queue of waiting attempts ([`MAX_WAITING`], visible in
//! `status`). [`Worker::serve_link`] serves one connection until it closes, and reports the
//! node's load on it ([`p2p_core::Message::Load`]) every [`LOAD_EVERY`] and at once when the
//! capacity changes ([`Worker::set_capacity`], [`Worker::grow`], [`Worker::shrink`],
//! [`Worker::run_auto`]). A cancelled task, a task over its deadline, and every task of a
//! connection that closed have their handler futures dropped, which stops their processes.
//!
//! Tasks of instant handlers (the built-in one) are answered inside the connection's driver
//! ([`Worker::instant_service`], [`p2p_core::net::InstantService`]) when a slot is free and
//! nobody waits: no hop to [`Worker::serve_link`] and back, and their results leave with
//! the other frames of the same read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use p2p_core::conn::SeqHash;
use p2p_core::net::{Command, InstantService, Link, LinkEvent, LinkId};
use p2p_core::{Assign, Completed, Hello, LoadReport};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admit::{Admission, Arrival};
use crate::handler::{
    Handler, InstantOutcome, InstantRequest, TaskOutcome, TaskRequest, DEFAULT_OUTPUT_LIMIT,
};
use crate::stats::{Ending, RunningTask, TypeStats, WorkerStats};

/// The default capacity of a node whose handlers all answer at once (see
/// [`Worker::default_capacity`]).
pub const INSTANT_WINDOW: u32 = 1024;

/// After [`Worker::stop_now`], how long a goodbye has to go out before the connection closes.
const GOODBYE_FLUSH: Duration = Duration::from_millis(50);

/// The most assigned attempts that wait at a node for a slot, for every coordinator
/// together; one more is refused at once (each connection already holds at most what its
/// handshake's capacity allows).
pub const MAX_WAITING: usize = 65_536;

/// How often a node reports its load on each connection (and at once when its capacity
/// changes).
pub const LOAD_EVERY: Duration = Duration::from_secs(2);

/// An attempt waiting for a slot: its seq (to forget it when cancelled), and where to say
/// it may start.
struct Waiter {
    seq: u64,
    go: oneshot::Sender<()>,
}

/// Executes assigned tasks with a set of handlers, at most `capacity` at once.
pub struct Worker {
    /// Each served type's handler and counters: one lookup per task.
    served: ServedTypes,
    /// The capacity it started with: with the current one, the ceiling a new connection's
    /// handshake advertises ([`Worker::ceiling`]).
    initial: u32,
    admit: Mutex<Admission<Waiter>>,
    /// The capacity now, for the connections to report when it changes.
    capacity_tx: watch::Sender<u32>,
    /// Time the slots spent running tasks, in microseconds.
    busy_us: AtomicU64,
    /// Tasks that ended (ran in a slot).
    ended: AtomicU64,
    output_limit: usize,
    stop_now: CancellationToken,
    /// Set with `stop_now` (before it is cancelled): what [`Worker::answer_now`] reads per
    /// task, a load instead of the token's lock.
    stopping: AtomicBool,
    stats: Arc<WorkerStats>,
    files: Option<Arc<crate::node_files::NodeFiles>>,
    /// The machine's cores, load and memory as last read, and when: every connection reports
    /// them every [`LOAD_EVERY`], so they are read at most once per [`MACHINE_FRESH`] for all.
    machine: Mutex<Option<(Instant, Machine)>>,
}

/// A served type: its handler and its counters.
struct Served {
    handler: Arc<dyn Handler>,
    stats: Arc<TypeStats>,
    /// [`Handler::is_instant`], asked once (a property of the handler).
    instant: bool,
}

/// Up to this many served types are looked up by comparing names (a few bytes each), more
/// through a hash table.
const LINEAR_TYPES: usize = 8;

/// The served types by name: a short list compared name by name (most nodes serve a few
/// types, and a hash of the name cost more than the comparisons), with a hash table over
/// it for a node that serves many.
struct ServedTypes {
    list: Vec<(String, Served)>,
    /// Positions in `list` by name, with more than [`LINEAR_TYPES`] types only.
    index: Option<HashMap<String, usize, SeqHash>>,
}

/// Whether two type names are the same: byte by byte (names are a few bytes: no call to
/// `memcmp` for them).
#[inline]
fn same_name(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

impl ServedTypes {
    fn new(list: Vec<(String, Served)>) -> Self {
        let index = (list.len() > LINEAR_TYPES).then(|| {
            list.iter()
                .enumerate()
                .map(|(i, (k, _))| (k.clone(), i))
                .collect()
        });
        ServedTypes { list, index }
    }

    fn get(&self, kind: &str) -> Option<&Served> {
        match &self.index {
            None => self
                .list
                .iter()
                .find(|(k, _)| same_name(k.as_bytes(), kind.as_bytes()))
                .map(|(_, s)| s),
            Some(index) => index.get(kind).map(|&i| &self.list[i].1),
        }
    }

    fn keys(&self) -> impl Iterator<Item = &String> {
        self.list.iter().map(|(k, _)| k)
    }

    fn values(&self) -> impl Iterator<Item = &Served> {
        self.list.iter().map(|(_, s)| s)
    }
}

/// What a load report says of the machine (not of the worker).
#[derive(Debug, Clone, Copy)]
struct Machine {
    cores: u32,
    load_milli: Option<u32>,
    mem_available_kib: Option<u64>,
}

/// How long a reading of the machine serves every connection's load report.
const MACHINE_FRESH: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("types", &self.types())
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// A slot an attempt holds (or may be given while it waits): given back when dropped.
struct Held {
    worker: Arc<Worker>,
    /// The attempt holds its slot.
    holding: bool,
    /// While it waits: where its turn is announced.
    turn: Option<oneshot::Receiver<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        // A turn given just before the attempt was dropped (cancelled, closed) is a slot too.
        let given = self.turn.as_mut().is_some_and(|rx| rx.try_recv().is_ok());
        if self.holding || given {
            self.worker.release();
        }
    }
}

impl Worker {
    /// A worker with one handler per type (type names lower case), running at most
    /// `capacity` tasks at once across all connections.
    pub fn new(handlers: HashMap<String, Arc<dyn Handler>>, capacity: u32) -> Self {
        let capacity = capacity.max(1);
        let stats = Arc::new(WorkerStats::new(handlers.keys()));
        let served = ServedTypes::new(
            handlers
                .into_iter()
                .map(|(kind, handler)| {
                    let stats = stats.of(&kind).cloned().unwrap_or_default();
                    let instant = handler.is_instant();
                    (
                        kind,
                        Served {
                            handler,
                            stats,
                            instant,
                        },
                    )
                })
                .collect(),
        );
        Worker {
            stats,
            served,
            initial: capacity,
            admit: Mutex::new(Admission::new(capacity, MAX_WAITING)),
            capacity_tx: watch::channel(capacity).0,
            busy_us: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            output_limit: DEFAULT_OUTPUT_LIMIT,
            stop_now: CancellationToken::new(),
            stopping: AtomicBool::new(false),
            files: None,
            machine: Mutex::new(None),
        }
    }

    fn admission(&self) -> MutexGuard<'_, Admission<Waiter>> {
        // A panic while holding the lock leaves consistent counters (every change is one
        // step): go on with them.
        self.admit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives a slot back and starts the next waiting attempt in turn, if any.
    fn release(&self) {
        let mut a = self.admission();
        a.finish();
        // With nobody waiting there is nobody to start (an instant answer's release).
        if a.waiting() > 0 {
            Self::start_waiting(&mut a);
        }
    }

    /// Starts waiting attempts while slots are free (an attempt whose future is gone gives
    /// its slot straight back).
    fn start_waiting(a: &mut Admission<Waiter>) {
        while let Some((_, w)) = a.next_start() {
            if w.go.send(()).is_err() {
                a.finish();
            }
        }
    }

    /// Changes the capacity (at least 1). A shrink stops nothing: no new attempt starts until
    /// fewer run. Every connection reports the new capacity at once (up to its handshake's).
    pub fn set_capacity(&self, capacity: u32) {
        let capacity = capacity.max(1);
        {
            let mut a = self.admission();
            a.set_capacity(capacity);
            Self::start_waiting(&mut a);
        }
        self.capacity_tx.send_replace(capacity);
    }

    /// One slot more (`SIGUSR1` on `p2p-node serve`). Returns the new capacity.
    pub fn grow(&self) -> u32 {
        let c = self.capacity().saturating_add(1);
        self.set_capacity(c);
        c
    }

    /// One slot less, down to 1 (`SIGUSR2` on `p2p-node serve`). Returns the new capacity.
    pub fn shrink(&self) -> u32 {
        let c = self.capacity().saturating_sub(1).max(1);
        self.set_capacity(c);
        c
    }

    /// The capacity a new connection's handshake advertises: the most it may be given at once
    /// on that connection (the capacity it started with, or the current one if larger).
    /// [`p2p_core::Message::Load`] changes what is honoured below that.
    pub fn ceiling(&self) -> u32 {
        self.initial.max(self.capacity())
    }

    /// An attempt ran in a slot for `took`.
    fn count_busy(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.busy_us.fetch_add(us, Ordering::Relaxed);
        self.ended.fetch_add(1, Ordering::Relaxed);
    }

    /// Attempts waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.admission().waiting()
    }

    /// What this node reports of its load ([`p2p_core::Message::Load`]).
    pub fn load_report(&self) -> LoadReport {
        let (capacity, running, waiting) = {
            let a = self.admission();
            (a.capacity(), a.running(), a.waiting())
        };
        let m = self.machine();
        LoadReport {
            capacity,
            running,
            waiting: u32::try_from(waiting).unwrap_or(u32::MAX),
            cores: m.cores,
            load_milli: m.load_milli,
            mem_available_kib: m.mem_available_kib,
            busy_ms: self.busy_us.load(Ordering::Relaxed) / 1000,
            tasks: self.ended.load(Ordering::Relaxed),
        }
    }

    /// The machine as read at most [`MACHINE_FRESH`] ago (read now if not).
    fn machine(&self) -> Machine {
        let mut last = self.machine.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some((at, m)) if at.elapsed() < MACHINE_FRESH => m,
            _ => {
                let m = Machine {
                    cores: crate::resources::cores(),
                    load_milli: crate::resources::load_milli(),
                    mem_available_kib: crate::resources::mem_available_kib(),
                };
                *last = Some((Instant::now(), m));
                m
            }
        }
    }

    /// `--capacity auto`: every [`LOAD_EVERY`] until `stop`, sets the capacity to the cores
    /// not busy with other work (see [`crate::resources::auto_capacity`]).
    pub async fn run_auto(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(LOAD_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let r = self.load_report();
            let c = crate::resources::auto_capacity(r.cores, r.load_milli, r.running);
            if c != r.capacity {
                info!(capacity = c, load = ?r.load_milli, cores = r.cores, "capacity adjusted to the load");
                self.set_capacity(c);
            }
        }
    }

    /// Keeps files for tasks (protocol v3: inputs shipped, outputs fetched) in this cache.
    /// Without it, offers and fetches are refused.
    pub fn with_files(mut self, files: Arc<crate::node_files::NodeFiles>) -> Self {
        self.files = Some(files);
        self
    }

    /// The most bytes of a task's output sent back, whatever the handler returned (see
    /// [`TaskOutcome::capped`]). Default [`DEFAULT_OUTPUT_LIMIT`] (1 MiB).
    pub fn with_output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = bytes;
        self
    }

    /// The most bytes of a task's output sent back.
    pub fn output_limit(&self) -> usize {
        self.output_limit
    }

    /// A node's capacity when none is configured: the number of CPU cores, or
    /// [`INSTANT_WINDOW`] when every handler answers at once ([`Handler::is_instant`], as the
    /// built-in handler does), so that a coordinator can keep a deep window of such tasks in
    /// flight instead of waiting a round trip for every few.
    pub fn default_capacity(handlers: &HashMap<String, Arc<dyn Handler>>) -> u32 {
        if !handlers.is_empty() && handlers.values().all(|h| h.is_instant()) {
            INSTANT_WINDOW
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
        }
    }

    /// Its counters (see [`crate::stats`]), shared with the running worker.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// The types served, sorted.
    pub fn types(&self) -> Vec<String> {
        let mut t: Vec<String> = self.served.keys().cloned().collect();
        t.sort();
        t
    }

    /// Tasks run at once now.
    pub fn capacity(&self) -> u32 {
        self.admission().capacity()
    }

    /// Stops at once: every connection's running tasks are stopped (their handler futures
    /// dropped, so their processes get `SIGTERM`, then `SIGKILL`), a goodbye is sent where
    /// none was, and the connections close. Their coordinators run those tasks elsewhere.
    pub fn stop_now(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop_now.cancel();
    }

    /// Serves one connection until it closes. When `shutdown` fires, says goodbye: no new
    /// tasks are accepted, running ones finish, then the connection closes. After
    /// [`Worker::stop_now`], it stops the running tasks and closes at once.
    pub async fn serve_link(
        self: Arc<Self>,
        link: Link,
        mut events: mpsc::Receiver<(LinkId, LinkEvent)>,
        shutdown: CancellationToken,
    ) {
        let peer = link.peer().node_id.short();
        let mut running: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
        let mut ids: HashMap<tokio::task::Id, u64> = HashMap::new();
        let mut set: JoinSet<(u64, TaskOutcome, Duration)> = JoinSet::new();
        let mut said_goodbye = false;
        let conn = link.id();
        // The first report goes out before anything else this loop sends: the peer then
        // knows a capacity shrunk below the handshake's before it sees any result (the
        // interval's first tick, ready at once, would race the first assignment in the
        // `select!` below, and a result could overtake it).
        let _ = link.send(Command::Load(self.load_report()));
        let mut load_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + LOAD_EVERY, LOAD_EVERY);
        load_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut capacity = self.capacity_tx.subscribe();
        let mut files = crate::node_files::LinkFiles::new(self.files.clone());
        loop {
            tokio::select! {
                _ = load_tick.tick() => {
                    let _ = link.send(Command::Load(self.load_report()));
                }
                Ok(()) = capacity.changed() => {
                    let _ = link.send(Command::Load(self.load_report()));
                }
                ev = events.recv() => {
                    let Some((_, ev)) = ev else { break };
                    match ev {
                        LinkEvent::Assigned(a) => {
                            debug!(peer = %peer, task = %a.task, attempt = a.attempt, "task assigned");
                            let seq = a.seq;
                            let task_files = match files.files_for(&a) {
                                Ok(f) => f,
                                Err(e) => {
                                    self.send_result(&link, seq, TaskOutcome::failure(e), Duration::ZERO);
                                    continue;
                                }
                            };
                            match self.try_now(a, task_files) {
                                Ok((mut outcome, took)) => {
                                    files.finish(seq, &mut outcome, &link);
                                    self.send_result(&link, seq, outcome, took);
                                }
                                Err(job) => {
                                    let h = set.spawn(self.clone().execute(job, link.clone()));
                                    ids.insert(h.id(), seq);
                                    running.insert(seq, h);
                                }
                            }
                        }
                        LinkEvent::Cancelled { seq } => {
                            if let Some(h) = running.remove(&seq) {
                                self.admission().forget(conn, |w| w.seq == seq);
                                h.abort();
                                let mut out = TaskOutcome::failure("cancelled by the coordinator");
                                out.exit_code = None;
                                files.finish(seq, &mut out, &link);
                                self.send_result(&link, seq, out, Duration::ZERO);
                            }
                        }
                        LinkEvent::PeerGoodbye => info!(peer = %peer, "peer said goodbye"),
                        LinkEvent::Closed { error } => {
                            match error {
                                None => info!(peer = %peer, addr = %link.addr(), "disconnected (goodbye)"),
                                Some(e) => warn!(peer = %peer, addr = %link.addr(), error = %e, "connection lost"),
                            }
                            break;
                        }
                        LinkEvent::Transfer(t) => files.on_transfer(*t, &link),
                        LinkEvent::Opened(_)
                        | LinkEvent::Load(_)
                        | LinkEvent::Completed(_)
                        | LinkEvent::Started { .. }
                        | LinkEvent::AssignFailed { .. }
                        | LinkEvent::Hosted(_) => {}
                    }
                }
                Some(joined) = set.join_next_with_id() => match joined {
                    Ok((id, (seq, mut outcome, took))) => {
                        ids.remove(&id);
                        if running.remove(&seq).is_some() {
                            // Outputs are kept and announced before the result.
                            files.finish(seq, &mut outcome, &link);
                            self.send_result(&link, seq, outcome, took);
                        }
                    }
                    Err(e) => {
                        if let Some(seq) = ids.remove(&e.id()) {
                            if running.remove(&seq).is_some() {
                                let why = if e.is_panic() { "the handler panicked" } else { "the handler was stopped" };
                                let mut out = TaskOutcome::failure(why);
                                files.finish(seq, &mut out, &link);
                                self.send_result(&link, seq, out, Duration::ZERO);
                            }
                        }
                    }
                },
                _ = shutdown.cancelled(), if !said_goodbye => {
                    said_goodbye = true;
                    info!(peer = %peer, running = running.len(), "saying goodbye; finishing running tasks");
                    let _ = link.send(Command::Goodbye);
                }
                _ = self.stop_now.cancelled() => {
                    warn!(peer = %peer, stopped = running.len(), "stopping now: running tasks stopped, connection closed");
                    set.abort_all();
                    // The goodbye tells the peer not to assign more; its running tasks get
                    // no result, so it runs them elsewhere once the connection closes. A
                    // moment for the goodbye to go out before the close.
                    if !said_goodbye && link.send(Command::Goodbye).is_ok() {
                        tokio::time::sleep(GOODBYE_FLUSH).await;
                    }
                    let _ = link.send(Command::Abort);
                    break;
                }
            }
        }
        // The connection is gone: nobody will read these results; stop the work, and its
        // waiting attempts leave the queue.
        self.admission().forget(conn, |_| true);
        set.abort_all();
    }

    /// Runs a task at once when its handler can ([`Handler::call_now`]) and a slot is free;
    /// otherwise returns it as a job to spawn. A type this node does not serve fails at once.
    // The `Err` is the job itself, moved on into its task (one word over clippy's line
    // since requests carry their files): boxing it would add an allocation per task.
    #[allow(clippy::result_large_err)]
    fn try_now(
        &self,
        a: Assign,
        files: Option<Box<crate::handler::TaskFiles>>,
    ) -> Result<(TaskOutcome, Duration), Job> {
        let Some(served) = self.served.get(a.kind.as_str()) else {
            self.stats.count_unknown_type();
            let out = TaskOutcome::failure(format!("this node does not serve type {:?}", a.kind));
            return Ok((out, Duration::ZERO));
        };
        let (handler, kind) = (&served.handler, served.stats.clone());
        kind.assigned();
        let req = TaskRequest {
            id: String::from(a.task),
            kind: String::from(a.kind),
            args: a.args,
            attempt: a.attempt,
            files,
        };
        if self.admission().try_start() {
            let started = Instant::now();
            let now = handler.call_now(&req);
            self.release();
            if let Some(out) = now {
                let took = started.elapsed();
                self.count_busy(took);
                kind.ended(out.ok, took);
                return Ok((out, took));
            }
        }
        Err(Job {
            seq: a.seq,
            handler: handler.clone(),
            req,
            timeout_ms: a.timeout_ms,
            kind,
        })
    }

    async fn execute(self: Arc<Self>, job: Job, link: Link) -> (u64, TaskOutcome, Duration) {
        let Job {
            seq,
            handler,
            req,
            timeout_ms,
            kind,
        } = job;
        // Counted as failed if this future is dropped before the end (cancel, stop).
        let ending = Ending::new(kind.clone());
        // A slot now, or a turn in the connections' round-robin (see [`crate::admit`]).
        let (go, turn) = oneshot::channel();
        let arrival = self.admission().arrive(link.id(), Waiter { seq, go });
        let mut held = Held {
            worker: self.clone(),
            holding: false,
            turn: None,
        };
        match arrival {
            Arrival::Start(_) => held.holding = true,
            Arrival::Queued => {
                let turn = held.turn.insert(turn);
                if turn.await.is_err() {
                    // Forgotten (cancelled, or its connection closed).
                    held.turn = None;
                    return (
                        seq,
                        TaskOutcome::failure("cancelled while waiting for a slot"),
                        Duration::ZERO,
                    );
                }
                held.turn = None;
                held.holding = true;
            }
            Arrival::Full(_) => {
                return (
                    seq,
                    TaskOutcome::failure(format!(
                        "the node's queue of waiting attempts is full ({MAX_WAITING})"
                    )),
                    Duration::ZERO,
                );
            }
        }
        // The coordinator counts the task's run time (and its deadline) from here, not from
        // its assignment: the wait for a slot shared with other coordinators is not run time.
        let _ = link.send(Command::Started(seq));
        let _running = self.stats.start_job(
            kind,
            RunningTask {
                id: req.id.clone(),
                kind: req.kind.clone(),
                since: std::time::SystemTime::now(),
                coordinator: link.peer().node_id.to_string(),
            },
        );
        let started = Instant::now();
        let fut = handler.call(req);
        let outcome = if timeout_ms > 0 {
            let limit = Duration::from_millis(timeout_ms);
            match tokio::time::timeout(limit, fut).await {
                Ok(o) => o,
                Err(_) => TaskOutcome::failure(format!("timed out after {limit:?}")),
            }
        } else {
            fut.await
        };
        let took = started.elapsed();
        self.count_busy(took);
        ending.ended(outcome.ok, took);
        drop(held);
        (seq, outcome, took)
    }

    /// What answers the assignments of this worker's instant handlers inside each
    /// connection's driver ([`Worker::answer_now`]); `None` when no handler is instant.
    /// Give it to the settings of the connections this worker serves.
    pub fn instant_service(self: &Arc<Self>) -> Option<InstantService> {
        if !self.served.values().any(|s| s.instant) {
            return None;
        }
        let worker = self.clone();
        Some(InstantService(Arc::new(move |a: &Assign, peer: &Hello| {
            worker.answer_now(a, peer)
        })))
    }

    /// Answers `a` at once, as [`Worker::serve_link`] would, when its type's handler is
    /// instant ([`Handler::is_instant`]), a slot is free and nobody waits for one (the
    /// admission's rule: it never overtakes a waiting attempt), and the worker is not
    /// stopping. `None`: the assignment goes the ordinary way (to `serve_link`), which
    /// also fails a type this node does not serve. Counted as `serve_link` counts it.
    pub fn answer_now(&self, a: &Assign, peer: &Hello) -> Option<Completed> {
        if self.stopping.load(Ordering::Acquire) {
            return None;
        }
        let served = self.served.get(&a.kind)?;
        if !served.instant || !self.admission().try_start() {
            return None;
        }
        debug!(peer = %peer.node_id.short(), task = %a.task, attempt = a.attempt, "task assigned");
        let req = InstantRequest {
            id: &a.task,
            kind: &a.kind,
            args: &a.args,
            attempt: a.attempt,
        };
        let started = Instant::now();
        let now = served.handler.call_instant_compact(&req);
        self.release();
        let out = now?;
        let took = started.elapsed();
        served.stats.assigned();
        self.count_busy(took);
        served.stats.ended(out.ok, took);
        Some(instant_result(a.seq, out, took, self.output_limit))
    }

    /// A task's result: its outcome capped to the output limit.
    fn result(&self, seq: u64, out: TaskOutcome, took: Duration) -> Completed {
        let out = out.capped(self.output_limit);
        Completed {
            seq,
            ok: out.ok,
            exit_code: out.exit_code,
            output: out.output.into(),
            error: out.error,
            duration_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        }
    }

    /// Sends a task's outcome, capped to the output limit, back on `link`.
    fn send_result(&self, link: &Link, seq: u64, out: TaskOutcome, took: Duration) {
        let c = self.result(seq, out, took);
        if let Err(e) = link.send(Command::Complete(c)) {
            debug!(error = %e, "result not delivered");
        }
    }
}

/// An instant answer's result: its outcome capped to the output limit (as
/// [`Worker::result`] caps a [`TaskOutcome`]), its output moved, not copied.
fn instant_result(seq: u64, mut out: InstantOutcome, took: Duration, limit: usize) -> Completed {
    out.cap(limit);
    Completed {
        seq,
        ok: out.ok,
        exit_code: out.exit_code,
        output: out.output,
        error: out.error,
        duration_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
    }
}

/// An assigned task that runs in a task of its own.
struct Job {
    seq: u64,
    handler: Arc<dyn Handler>,
    req: TaskRequest,
    timeout_ms: u64,
    kind: Arc<TypeStats>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::handler::{handler_fn, Builtin};

    use p2p_core::testing::assign_of as assign;

    fn peer() -> Hello {
        Hello {
            version: p2p_core::PROTOCOL_VERSION,
            cluster: "default".into(),
            node_id: p2p_core::NodeId::random(),
            types: Vec::new(),
            capacity: 0,
        }
    }

    fn worker(capacity: u32) -> Arc<Worker> {
        let mut handlers: HashMap<String, Arc<dyn Handler>> = HashMap::new();
        handlers.insert("a".into(), Arc::new(Builtin));
        let slow = handler_fn(|r: TaskRequest| async move { TaskOutcome::success(r.id) });
        handlers.insert("b".into(), Arc::new(slow));
        Arc::new(Worker::new(handlers, capacity).with_output_limit(20))
    }

    /// An instant task is answered at once, capped, and counted as `serve_link` counts
    /// it; its slot is free again afterwards.
    #[test]
    fn an_instant_task_is_answered_counted_and_gives_its_slot_back() {
        let w = worker(1);
        let c = w.answer_now(&assign(7, "a"), &peer()).expect("answered");
        assert_eq!(c.seq, 7);
        assert!(c.ok && c.exit_code == Some(0) && c.error.is_none());
        assert_eq!(c.output, "Executing task: a7");
        // The output limit applies (20 bytes here).
        let long = Assign {
            task: "a123456789".into(),
            ..assign(8, "a")
        };
        let c = w.answer_now(&long, &peer()).expect("answered");
        assert!(
            c.output
                .starts_with("Executing task: a123\n[output truncated"),
            "{}",
            c.output
        );
        let counts = w.stats().by_type();
        assert_eq!(counts[0].0, "a");
        assert_eq!((counts[0].1.assigned, counts[0].1.completed), (2, 2));
        assert_eq!(counts[0].1.buckets.iter().sum::<u64>(), 2);
        let r = w.load_report();
        assert_eq!((r.running, r.tasks), (0, 2));
    }

    /// Not answered in the driver: a handler that is not instant, a type not served (the
    /// ordinary path fails it and counts it), an attempt while another waits for a slot
    /// (it may not overtake it), and anything once the worker stops.
    #[test]
    fn the_driver_gives_back_what_it_may_not_answer() {
        let w = worker(1);
        assert!(
            w.answer_now(&assign(1, "b"), &peer()).is_none(),
            "not instant"
        );
        assert!(
            w.answer_now(&assign(2, "z"), &peer()).is_none(),
            "not served"
        );
        assert_eq!(
            w.stats().unknown_type(),
            0,
            "counted by the ordinary path only"
        );
        // One attempt holds the only slot, and another waits for it.
        let (go, _held) = oneshot::channel();
        assert!(matches!(
            w.admission().arrive(1, Waiter { seq: 3, go }),
            Arrival::Start(_)
        ));
        assert!(
            w.answer_now(&assign(4, "a"), &peer()).is_none(),
            "no free slot"
        );
        let (go, _turn) = oneshot::channel();
        assert!(matches!(
            w.admission().arrive(2, Waiter { seq: 5, go }),
            Arrival::Queued
        ));
        // The first ends: its slot goes to the waiting attempt, not to a new instant one.
        w.release();
        assert_eq!(w.waiting(), 0);
        assert!(
            w.answer_now(&assign(6, "a"), &peer()).is_none(),
            "the slot was given on"
        );
        w.release();
        assert!(
            w.answer_now(&assign(7, "a"), &peer()).is_some(),
            "free, nobody waits"
        );
        w.stop_now();
        assert!(
            w.answer_now(&assign(11, "a"), &peer()).is_none(),
            "stopping"
        );
        assert_eq!(w.stats().by_type()[0].1.assigned, 1);
    }

    /// The answer in the driver is the ordinary path's, byte for byte: ids short and long
    /// (inline and allocated outputs), multi-byte ones cut on a character boundary, at
    /// every output limit around their length, with the same status, exit code and error;
    /// and every answer is counted (assigned, completed, tasks ended).
    #[test]
    fn an_instant_answer_is_what_the_ordinary_path_sends() {
        let ids = [
            "a",
            "a1",
            "a1234567",
            "a12345678",
            "aé",
            "aéééé",
            "a_very_long_task_id_0",
        ];
        let mut answered = 0u64;
        for limit in [0usize, 1, 15, 16, 17, 18, 19, 23, 24, 25, 40, 1 << 20] {
            let mut handlers: HashMap<String, Arc<dyn Handler>> = HashMap::new();
            handlers.insert("a".into(), Arc::new(Builtin));
            let w = Arc::new(Worker::new(handlers, 4).with_output_limit(limit));
            for (i, id) in ids.iter().enumerate() {
                let a = Assign {
                    task: (*id).into(),
                    ..assign(i as u64 + 1, "a")
                };
                let c = w.answer_now(&a, &peer()).expect("answered");
                let ordinary = w.result(
                    a.seq,
                    Builtin
                        .call_now(&TaskRequest {
                            id: (*id).to_owned(),
                            kind: "a".into(),
                            args: String::new(),
                            attempt: 1,
                            files: None,
                        })
                        .expect("instant"),
                    Duration::from_micros(c.duration_us),
                );
                assert_eq!(c, ordinary, "id {id:?} at limit {limit}");
                answered += 1;
            }
            let counts = w.stats().by_type();
            assert_eq!(
                (
                    counts[0].1.assigned,
                    counts[0].1.completed,
                    counts[0].1.failed
                ),
                (ids.len() as u64, ids.len() as u64, 0)
            );
            let r = w.load_report();
            assert_eq!((r.running, r.tasks), (0, ids.len() as u64));
        }
        assert_eq!(answered, 12 * ids.len() as u64);
    }

    /// An instant handler's failure, through the default conversion, keeps its status,
    /// exit code, error (capped as the ordinary path caps it) and output.
    #[test]
    fn an_instant_failure_keeps_its_error_and_status() {
        struct Failing;
        impl Handler for Failing {
            fn call(&self, _: TaskRequest) -> crate::handler::BoxFuture<TaskOutcome> {
                Box::pin(std::future::ready(TaskOutcome::failure("x")))
            }
            fn call_now(&self, req: &TaskRequest) -> Option<TaskOutcome> {
                let mut o = TaskOutcome::failure("e".repeat(crate::handler::ERROR_LIMIT + 3));
                o.output = format!("out of {}", req.id);
                o.exit_code = Some(3);
                Some(o)
            }
            fn is_instant(&self) -> bool {
                true
            }
        }
        let mut handlers: HashMap<String, Arc<dyn Handler>> = HashMap::new();
        handlers.insert("f".into(), Arc::new(Failing));
        let w = Arc::new(Worker::new(handlers, 2).with_output_limit(5));
        let c = w.answer_now(&assign(3, "f"), &peer()).expect("answered");
        let ordinary = w.result(
            3,
            Failing
                .call_now(
                    &InstantRequest {
                        id: "f3",
                        kind: "f",
                        args: "",
                        attempt: 1,
                    }
                    .to_request(),
                )
                .expect("instant"),
            Duration::from_micros(c.duration_us),
        );
        assert_eq!(c, ordinary);
        assert!(!c.ok && c.exit_code == Some(3));
        assert!(c.output.starts_with("out o\n[output truncated at 5"));
        let counts = w.stats().by_type();
        assert_eq!((counts[0].1.completed, counts[0].1.failed), (0, 1));
    }

    /// A node serving more types than are compared by name finds each through its table,
    /// and a type it does not serve through neither.
    #[test]
    fn every_served_type_is_found_with_few_or_many_types() {
        for n in [1usize, 3, LINEAR_TYPES, LINEAR_TYPES + 1, 40] {
            let mut handlers: HashMap<String, Arc<dyn Handler>> = HashMap::new();
            for i in 0..n {
                handlers.insert(format!("t{i}"), Arc::new(Builtin));
            }
            let w = Arc::new(Worker::new(handlers, 4));
            for i in 0..n {
                let c = w.answer_now(&assign(i as u64, &format!("t{i}")), &peer());
                assert_eq!(
                    c.map(|c| c.output.to_string()),
                    Some(format!("Executing task: t{i}{i}")),
                    "{n} types"
                );
            }
            assert!(w.answer_now(&assign(1, "t"), &peer()).is_none());
            assert!(w
                .answer_now(&assign(1, &format!("t{n}")), &peer())
                .is_none());
            assert_eq!(w.types().len(), n);
        }
    }

    /// A worker without instant handlers gives no service (its connections deliver every
    /// assignment as before).
    #[test]
    fn only_a_worker_with_an_instant_handler_gives_a_service() {
        assert!(worker(1).instant_service().is_some());
        let mut handlers: HashMap<String, Arc<dyn Handler>> = HashMap::new();
        let slow = handler_fn(|r: TaskRequest| async move { TaskOutcome::success(r.id) });
        handlers.insert("b".into(), Arc::new(slow));
        assert!(Arc::new(Worker::new(handlers, 4))
            .instant_service()
            .is_none());
    }
}
