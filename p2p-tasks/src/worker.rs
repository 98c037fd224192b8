//! The worker side: runs the tasks peers assign, with the node's handlers, within the
//! node's capacity.
//!
//! One [`Worker`] per node holds the handlers and a semaphore sized to the node's
//! capacity; [`Worker::serve_link`] serves one connection until it closes. A cancelled task,
//! a task over its deadline, and every task of a connection that closed have their handler
//! futures dropped, which stops their processes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2p_core::net::{Command, Link, LinkEvent, LinkId};
use p2p_core::{Assign, Completed};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::handler::{Handler, TaskOutcome, TaskRequest, DEFAULT_OUTPUT_LIMIT};
use crate::stats::{Ending, RunningTask, TypeStats, WorkerStats};

/// The default capacity of a node whose handlers all answer at once (see
/// [`Worker::default_capacity`]).
pub const INSTANT_WINDOW: u32 = 1024;

/// After [`Worker::stop_now`], how long a goodbye has to go out before the connection closes.
const GOODBYE_FLUSH: Duration = Duration::from_millis(50);

/// Executes assigned tasks with a set of handlers, at most `capacity` at once.
pub struct Worker {
    handlers: HashMap<String, Arc<dyn Handler>>,
    capacity: u32,
    slots: Arc<Semaphore>,
    output_limit: usize,
    stop_now: CancellationToken,
    stats: Arc<WorkerStats>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("types", &self.types())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Worker {
    /// A worker with one handler per type (type names lower case), running at most
    /// `capacity` tasks at once across all connections.
    pub fn new(handlers: HashMap<String, Arc<dyn Handler>>, capacity: u32) -> Self {
        let capacity = capacity.max(1);
        Worker {
            stats: Arc::new(WorkerStats::new(handlers.keys())),
            handlers,
            capacity,
            slots: Arc::new(Semaphore::new(capacity as usize)),
            output_limit: DEFAULT_OUTPUT_LIMIT,
            stop_now: CancellationToken::new(),
        }
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
        let mut t: Vec<String> = self.handlers.keys().cloned().collect();
        t.sort();
        t
    }

    /// Tasks run at once.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Stops at once: every connection's running tasks are stopped (their handler futures
    /// dropped, so their processes get `SIGTERM`, then `SIGKILL`), a goodbye is sent where
    /// none was, and the connections close. Their coordinators run those tasks elsewhere.
    pub fn stop_now(&self) {
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
        loop {
            tokio::select! {
                ev = events.recv() => {
                    let Some((_, ev)) = ev else { break };
                    match ev {
                        LinkEvent::Assigned(a) => {
                            debug!(peer = %peer, task = %a.task, attempt = a.attempt, "task assigned");
                            let seq = a.seq;
                            match self.try_now(a) {
                                Ok((outcome, took)) => self.send_result(&link, seq, outcome, took),
                                Err(job) => {
                                    let h = set.spawn(self.clone().execute(job, link.clone()));
                                    ids.insert(h.id(), seq);
                                    running.insert(seq, h);
                                }
                            }
                        }
                        LinkEvent::Cancelled { seq } => {
                            if let Some(h) = running.remove(&seq) {
                                h.abort();
                                let mut out = TaskOutcome::failure("cancelled by the coordinator");
                                out.exit_code = None;
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
                        LinkEvent::Opened(_)
                        | LinkEvent::Completed(_)
                        | LinkEvent::Started { .. }
                        | LinkEvent::AssignFailed { .. }
                        | LinkEvent::Hosted(_) => {}
                    }
                }
                Some(joined) = set.join_next_with_id() => match joined {
                    Ok((id, (seq, outcome, took))) => {
                        ids.remove(&id);
                        if running.remove(&seq).is_some() {
                            self.send_result(&link, seq, outcome, took);
                        }
                    }
                    Err(e) => {
                        if let Some(seq) = ids.remove(&e.id()) {
                            if running.remove(&seq).is_some() {
                                let why = if e.is_panic() { "the handler panicked" } else { "the handler was stopped" };
                                self.send_result(&link, seq, TaskOutcome::failure(why), Duration::ZERO);
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
        // The connection is gone: nobody will read these results; stop the work.
        set.abort_all();
    }

    /// Runs a task at once when its handler can ([`Handler::call_now`]) and a slot is free;
    /// otherwise returns it as a job to spawn. A type this node does not serve fails at once.
    fn try_now(&self, a: Assign) -> Result<(TaskOutcome, Duration), Job> {
        let Some(handler) = self.handlers.get(&a.kind) else {
            self.stats.count_unknown_type();
            let out = TaskOutcome::failure(format!("this node does not serve type {:?}", a.kind));
            return Ok((out, Duration::ZERO));
        };
        let kind = match self.stats.of(&a.kind) {
            Some(k) => k.clone(),
            None => Arc::default(),
        };
        kind.assigned();
        let req = TaskRequest {
            id: a.task,
            kind: a.kind,
            args: a.args,
            attempt: a.attempt,
        };
        if let Ok(_permit) = self.slots.try_acquire() {
            let started = Instant::now();
            if let Some(out) = handler.call_now(&req) {
                let took = started.elapsed();
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
        // The semaphore is never closed, so acquiring only fails if it were; treat as busy.
        let Ok(_permit) = self.slots.clone().acquire_owned().await else {
            return (
                seq,
                TaskOutcome::failure("worker is shutting down"),
                Duration::ZERO,
            );
        };
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
        ending.ended(outcome.ok, took);
        (seq, outcome, took)
    }

    /// Sends a task's outcome, capped to the output limit, back on `link`.
    fn send_result(&self, link: &Link, seq: u64, out: TaskOutcome, took: Duration) {
        let out = out.capped(self.output_limit);
        let c = Completed {
            seq,
            ok: out.ok,
            exit_code: out.exit_code,
            output: out.output,
            error: out.error,
            duration_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        };
        if let Err(e) = link.send(Command::Complete(c)) {
            debug!(error = %e, "result not delivered");
        }
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
