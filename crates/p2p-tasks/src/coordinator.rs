//! The coordinator: runs a plan over connected nodes and reports as it goes.
//!
//! It owns no sockets. Its owner dials the peers discovery finds and hands over each
//! established [`Link`] as a [`PeerUpdate`]; every link reports into one shared channel of
//! link events. The coordinator feeds the [`Scheduler`], sends assignments, turns results
//! into [`RunEvent`]s, and at the end says goodbye to every node and waits (bounded) for
//! each connection to close.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use p2p_core::net::{Command, Link, LinkEvent, LinkId};
use p2p_core::{Assign, NodeId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{Phase, RunEvent, RunReport, Status, TaskResult};
use crate::journal::Journal;
use crate::sched::{Outcome, Policy, Scheduler, TaskStatus};
use crate::Task;

/// Options of one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Order, retries, keep-going.
    pub policy: Policy,
    /// A task attempt may run at most this long. Default 1 hour.
    pub task_timeout: Duration,
    /// How long to wait for nodes of every needed type (at the start, and when a type
    /// loses its last node). Default 3 s.
    pub discovery_timeout: Duration,
    /// How long the goodbye exchange may take at the end. Default 5 s.
    pub goodbye_timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            policy: Policy::default(),
            task_timeout: Duration::from_secs(3600),
            discovery_timeout: Duration::from_secs(3),
            goodbye_timeout: Duration::from_secs(5),
        }
    }
}

/// What the owner tells the coordinator about peers.
#[derive(Debug)]
pub enum PeerUpdate {
    /// Discovery reported a peer (before it is dialled).
    Discovered {
        /// Its address.
        addr: String,
        /// The backend.
        source: String,
    },
    /// A connection to a peer is established.
    Connected(Link),
    /// Every peer discovery knows of has been dialled (more may still come later, e.g. a
    /// node that restarts): a run need not wait for more before it starts.
    Settled,
    /// A peer could not be reached.
    Unreachable {
        /// Its address.
        addr: String,
        /// Why.
        error: String,
    },
}

/// The channels a run reads.
#[derive(Debug)]
pub struct Inputs {
    /// Peer updates; when the sender is dropped, no more peers will come.
    pub peers: mpsc::Receiver<PeerUpdate>,
    /// Events of every link handed over in `peers`.
    pub links: mpsc::Receiver<(LinkId, LinkEvent)>,
    /// Fires on Ctrl-C or shutdown: stop, cancel in-flight tasks, say goodbye.
    pub shutdown: CancellationToken,
    /// Where final results are recorded; tasks it lists as done are not run again.
    pub journal: Option<Journal>,
    /// Told the address of every node whose connection was lost, so the dialer can try it
    /// again (a restarted node). Full or closed: the address is dropped.
    pub lost: Option<mpsc::Sender<std::net::SocketAddr>>,
}

struct Peer {
    link: Link,
    node: String,
    closed: bool,
}

struct InFlight {
    task: usize,
    link: LinkId,
    deadline: Instant,
    cancelled: bool,
}

/// Extra time beyond the task timeout before the coordinator gives up on a result.
const RESULT_GRACE: Duration = Duration::from_secs(2);

/// Runs `tasks` to the end and returns the report. Every event goes to `emit` first.
pub async fn run(
    tasks: Vec<Task>,
    opts: RunOptions,
    mut inputs: Inputs,
    emit: &mut (dyn FnMut(&RunEvent) + Send),
) -> RunReport {
    let started = now();
    let mut c = Coord {
        sched: Scheduler::new(&tasks, opts.policy.clone()),
        results: tasks
            .iter()
            .map(|t| TaskResult {
                task: t.id.clone(),
                kind: t.kind.clone(),
                status: Status::NotRun,
                node: None,
                attempts: 0,
                duration_ms: 0.0,
                output: String::new(),
                error: None,
                resumed: false,
            })
            .collect(),
        tasks,
        opts,
        peers: HashMap::new(),
        node_ids: HashSet::new(),
        inflight: HashMap::new(),
        next_seq: 1,
        peers_open: true,
        settled: false,
        lost: inputs.lost.take(),
        missing_since: None,
        interrupted: false,
        journal: inputs.journal.take(),
        emit,
    };
    c.resume();
    c.discover(&mut inputs).await;
    let missing = c.sched.missing_kinds();
    let mut missing_types = Vec::new();
    if !missing.is_empty() && !c.opts.policy.keep_going {
        // Nothing can complete the plan: run nothing; the summary names what is missing.
        missing_types = missing;
    } else if !c.interrupted {
        (c.emit)(&RunEvent::Phase(Phase::Assigning));
        c.execute(&mut inputs).await;
        missing_types = c.missing_failed();
    }
    c.terminate(&mut inputs).await;
    let report = RunReport {
        results: c.results,
        missing_types,
        interrupted: c.interrupted,
        elapsed_ms: ms(started.elapsed()),
    };
    (c.emit)(&RunEvent::Summary {
        total: report.results.len(),
        succeeded: report.succeeded(),
        failed: report.failed(),
        not_run: report.not_run(),
        resumed: report.resumed(),
        missing_types: report.missing_types.clone(),
        elapsed_ms: report.elapsed_ms,
    });
    report
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Coord<'a> {
    tasks: Vec<Task>,
    opts: RunOptions,
    sched: Scheduler,
    results: Vec<TaskResult>,
    peers: HashMap<LinkId, Peer>,
    node_ids: HashSet<NodeId>,
    inflight: HashMap<u64, InFlight>,
    next_seq: u64,
    peers_open: bool,
    /// Discovery said it has dialled all it knows (or ended).
    settled: bool,
    lost: Option<mpsc::Sender<std::net::SocketAddr>>,
    missing_since: Option<Instant>,
    interrupted: bool,
    journal: Option<Journal>,
    emit: &'a mut (dyn FnMut(&RunEvent) + Send),
}

impl Coord<'_> {
    /// Marks the tasks the journal records as succeeded.
    fn resume(&mut self) {
        let Some(j) = &self.journal else { return };
        for (i, t) in self.tasks.iter().enumerate() {
            if j.done().contains(&t.id) {
                self.sched.mark_done(i);
                self.results[i].status = Status::Succeeded;
                self.results[i].resumed = true;
            }
        }
    }

    /// Writes a final result to the journal; a journal that cannot be written stops the run
    /// (resuming would otherwise repeat work silently).
    fn journal(&mut self, task: usize) {
        let Some(j) = &mut self.journal else { return };
        if let Err(e) = j.record(&self.results[task]) {
            (self.emit)(&RunEvent::Notice(format!("{e}; stopping the run")));
            self.journal = None;
            self.sched.stop();
        }
    }

    /// Reports tasks skipped because a dependency failed.
    fn skipped(&mut self) {
        for t in self.sched.drain_skipped() {
            let failed_dep = self.tasks[t]
                .deps
                .iter()
                .find(|d| {
                    self.results
                        .iter()
                        .any(|r| &r.task == *d && r.status != Status::Succeeded)
                })
                .cloned()
                .unwrap_or_default();
            self.results[t].error =
                Some(format!("skipped: dependency {failed_dep} did not succeed"));
            self.journal(t);
        }
    }
    /// Waits until every needed type has a node, discovery is exhausted, the discovery
    /// timeout passes, or the run is interrupted.
    async fn discover(&mut self, inputs: &mut Inputs) {
        (self.emit)(&RunEvent::Phase(Phase::Discovering));
        let deadline = tokio::time::Instant::now() + self.opts.discovery_timeout;
        let mut announced_connecting = false;
        while !self.sched.missing_kinds().is_empty() && self.peers_open && !self.settled {
            tokio::select! {
                u = inputs.peers.recv() => {
                    if !announced_connecting && matches!(u, Some(PeerUpdate::Discovered { .. } | PeerUpdate::Connected(_))) {
                        announced_connecting = true;
                        (self.emit)(&RunEvent::Phase(Phase::Connecting));
                    }
                    self.on_peer(u);
                }
                Some((id, ev)) = inputs.links.recv() => self.on_link(id, ev, now()),
                _ = tokio::time::sleep_until(deadline) => break,
                _ = inputs.shutdown.cancelled() => {
                    self.interrupted = true;
                    break;
                }
            }
        }
    }

    async fn execute(&mut self, inputs: &mut Inputs) {
        loop {
            let at = now();
            self.dispatch(at);
            self.check_missing(at);
            if self.sched.is_finished() {
                return;
            }
            let wake = self.next_timer();
            tokio::select! {
                u = inputs.peers.recv(), if self.peers_open => self.on_peer(u),
                Some((id, ev)) = inputs.links.recv() => self.on_link(id, ev, now()),
                _ = sleep_until(wake) => self.on_timer(now()),
                _ = inputs.shutdown.cancelled(), if !self.interrupted => {
                    self.interrupted = true;
                    self.sched.stop();
                    (self.emit)(&RunEvent::Notice("interrupted: cancelling running tasks".into()));
                    for (seq, f) in self.inflight.iter_mut() {
                        if let Some(p) = self.peers.get(&f.link) {
                            let _ = p.link.send(Command::Cancel(*seq));
                        }
                        f.cancelled = true;
                    }
                }
            }
        }
    }

    fn on_peer(&mut self, u: Option<PeerUpdate>) {
        match u {
            None => {
                self.peers_open = false;
                self.settled = true;
            }
            Some(PeerUpdate::Settled) => self.settled = true,
            Some(PeerUpdate::Discovered { addr, source }) => {
                (self.emit)(&RunEvent::PeerDiscovered {
                    addr,
                    source,
                    node: None,
                });
            }
            Some(PeerUpdate::Unreachable { addr, error }) => {
                (self.emit)(&RunEvent::Notice(format!("cannot reach {addr}: {error}")));
            }
            Some(PeerUpdate::Connected(link)) => {
                let hello = link.peer().clone();
                if !self.node_ids.insert(hello.node_id) {
                    // The same node by a second address, or two nodes sharing one identity
                    // (a copied identity file): report it, keep the first connection.
                    let first = self
                        .peers
                        .values()
                        .find(|p| p.link.peer().node_id == hello.node_id)
                        .map_or_else(|| "?".to_string(), |p| p.link.addr().to_string());
                    (self.emit)(&RunEvent::Notice(format!(
                        "node id {} is connected at {first} and again at {}: the same node by \
                         two addresses, or two nodes sharing one identity file; using {first} only",
                        hello.node_id,
                        link.addr()
                    )));
                    let _ = link.send(Command::Goodbye);
                    return;
                }
                let node = hello.node_id.to_string();
                (self.emit)(&RunEvent::Connected {
                    node: node.clone(),
                    addr: link.addr().to_string(),
                    types: hello.types.clone(),
                    capacity: hello.capacity,
                });
                self.sched.add_node(link.id(), &hello.types, hello.capacity);
                self.peers.insert(
                    link.id(),
                    Peer {
                        link,
                        node,
                        closed: false,
                    },
                );
            }
        }
    }

    fn dispatch(&mut self, now: Instant) {
        while let Some(d) = self.sched.next(now) {
            let Some(peer) = self.peers.get(&d.node) else {
                self.sched.requeue(d.task);
                break;
            };
            let t = &self.tasks[d.task];
            let seq = self.next_seq;
            self.next_seq += 1;
            let assign = Assign {
                seq,
                task: t.id.clone(),
                kind: t.kind.clone(),
                args: t.args.clone(),
                attempt: d.attempt,
                timeout_ms: u64::try_from(self.opts.task_timeout.as_millis()).unwrap_or(u64::MAX),
            };
            if peer.link.send(Command::Assign(assign)).is_err() {
                // The link is closing; its Closed event will remove the node.
                self.sched.requeue(d.task);
                self.sched.drain_node(d.node);
                continue;
            }
            let r = &mut self.results[d.task];
            r.node = Some(peer.node.clone());
            r.attempts = d.attempt;
            tracing::debug!(task = %t.id, node = %&peer.node[..8.min(peer.node.len())], attempt = d.attempt, seq, "task assigned");
            (self.emit)(&RunEvent::TaskAssigned {
                task: t.id.clone(),
                kind: t.kind.clone(),
                node: peer.node.clone(),
                attempt: d.attempt,
            });
            self.inflight.insert(
                seq,
                InFlight {
                    task: d.task,
                    link: d.node,
                    deadline: now + self.opts.task_timeout + RESULT_GRACE,
                    cancelled: false,
                },
            );
        }
    }

    fn on_link(&mut self, id: LinkId, ev: LinkEvent, now: Instant) {
        match ev {
            LinkEvent::Completed(c) => {
                let Some(f) = self.inflight.remove(&c.seq) else {
                    return;
                };
                let node = self
                    .peers
                    .get(&id)
                    .map(|p| p.node.clone())
                    .unwrap_or_default();
                let error = c.error.clone().unwrap_or_else(|| match c.exit_code {
                    Some(code) => format!("exit status {code}"),
                    None => "failed".to_string(),
                });
                self.record(
                    f.task,
                    c.ok,
                    node,
                    c.output,
                    Duration::from_micros(c.duration_us),
                    c.exit_code,
                    error,
                    now,
                );
            }
            LinkEvent::AssignFailed { assign, .. } => {
                if let Some(f) = self.inflight.remove(&assign.seq) {
                    self.sched.requeue(f.task);
                }
                self.sched.drain_node(id);
            }
            LinkEvent::PeerGoodbye => self.sched.drain_node(id),
            LinkEvent::Closed { error } => {
                match &error {
                    None => tracing::debug!(link = id, "connection closed after goodbye"),
                    Some(e) => {
                        tracing::info!(link = id, error = %e, "connection lost; its tasks are re-queued")
                    }
                }
                let lost: Vec<u64> = self
                    .inflight
                    .iter()
                    .filter(|(_, f)| f.link == id)
                    .map(|(s, _)| *s)
                    .collect();
                for s in lost {
                    self.inflight.remove(&s);
                }
                let requeued = self.sched.remove_node(id);
                if let Some(p) = self.peers.get_mut(&id) {
                    p.closed = true;
                    // The same node may come back on a new connection.
                    self.node_ids.remove(&p.link.peer().node_id);
                    if error.is_some() {
                        if let Some(lost) = &self.lost {
                            let _ = lost.try_send(p.link.addr());
                        }
                    }
                    for t in requeued {
                        (self.emit)(&RunEvent::Notice(format!(
                            "{} lost with node {}; it will run again",
                            self.tasks[t].id,
                            &p.node[..8.min(p.node.len())]
                        )));
                    }
                    (self.emit)(&RunEvent::Disconnected {
                        node: p.node.clone(),
                        addr: p.link.addr().to_string(),
                        clean: error.is_none(),
                        error,
                    });
                }
            }
            // The coordinator advertises no capacity, so a peer assigning to it is cut off by
            // the protocol before this point.
            LinkEvent::Assigned(_) | LinkEvent::Cancelled { .. } => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        task: usize,
        ok: bool,
        node: String,
        output: String,
        took: Duration,
        exit_code: Option<i32>,
        error: String,
        now: Instant,
    ) {
        let attempt = self.sched.attempts(task);
        let t = &self.tasks[task];
        let r = &mut self.results[task];
        r.node = Some(node.clone());
        r.attempts = attempt;
        r.duration_ms = ms(took);
        match self.sched.complete(task, ok, now) {
            Outcome::Succeeded => {
                tracing::debug!(task = %t.id, node = %&node[..8.min(node.len())], attempt, "task completed");
                r.status = Status::Succeeded;
                r.output = output.clone();
                r.error = None;
                self.journal(task);
                let t = &self.tasks[task];
                (self.emit)(&RunEvent::TaskCompleted {
                    task: t.id.clone(),
                    kind: t.kind.clone(),
                    node,
                    attempt,
                    ok: true,
                    output,
                    duration_ms: ms(took),
                });
            }
            Outcome::Retry { delay } => {
                tracing::info!(task = %t.id, node = %&node[..8.min(node.len())], attempt, error = %error, retry_in = ?delay, "task attempt failed; retrying");
                (self.emit)(&RunEvent::TaskRetry {
                    task: t.id.clone(),
                    kind: t.kind.clone(),
                    node,
                    attempt,
                    error,
                    delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                });
            }
            Outcome::Failed => {
                tracing::info!(task = %t.id, node = %&node[..8.min(node.len())], attempt, error = %error, "task failed");
                r.status = Status::Failed;
                r.output = output.clone();
                r.error = Some(error.clone());
                self.journal(task);
                let t = &self.tasks[task];
                (self.emit)(&RunEvent::TaskFailed {
                    task: t.id.clone(),
                    kind: t.kind.clone(),
                    node,
                    attempt,
                    ok: false,
                    output,
                    duration_ms: ms(took),
                    exit_code,
                    error,
                });
                self.skipped();
            }
        }
    }

    /// A type that lost its last node gets `discovery_timeout` to find another; then its
    /// waiting tasks fail.
    fn check_missing(&mut self, now: Instant) {
        let missing = self.sched.missing_kinds();
        if missing.is_empty() {
            self.missing_since = None;
            return;
        }
        let since = *self.missing_since.get_or_insert(now);
        if now < since + self.opts.discovery_timeout {
            return;
        }
        for kind in missing {
            for t in self.sched.fail_kind(&kind) {
                let error = format!("no node serves type {kind:?}");
                let r = &mut self.results[t];
                r.status = Status::Failed;
                r.error = Some(error.clone());
                let attempt = r.attempts;
                let node = r.node.clone().unwrap_or_default();
                self.journal(t);
                let task = &self.tasks[t];
                (self.emit)(&RunEvent::TaskFailed {
                    task: task.id.clone(),
                    kind: task.kind.clone(),
                    node,
                    attempt,
                    ok: false,
                    output: String::new(),
                    duration_ms: 0.0,
                    exit_code: None,
                    error,
                });
            }
        }
        self.skipped();
        self.missing_since = None;
    }

    fn missing_failed(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self
            .results
            .iter()
            .filter(|r| {
                r.status == Status::Failed
                    && r.error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("no node serves"))
            })
            .map(|r| r.kind.clone())
            .collect();
        kinds.dedup();
        kinds
    }

    fn next_timer(&self) -> Option<tokio::time::Instant> {
        let mut wake = self.sched.next_wakeup();
        for f in self.inflight.values() {
            wake = Some(wake.map_or(f.deadline, |w| w.min(f.deadline)));
        }
        if let Some(since) = self.missing_since {
            let at = since + self.opts.discovery_timeout;
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        wake.map(tokio::time::Instant::from_std)
    }

    fn on_timer(&mut self, now: Instant) {
        let overdue: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in overdue {
            let Some(f) = self.inflight.remove(&seq) else {
                continue;
            };
            let node = match self.peers.get(&f.link) {
                Some(p) => {
                    let _ = p.link.send(Command::Cancel(seq));
                    p.node.clone()
                }
                None => String::new(),
            };
            if self.sched.status(f.task) == Some(TaskStatus::Running(f.link)) {
                let error = format!(
                    "no result within {:?}",
                    self.opts.task_timeout + RESULT_GRACE
                );
                self.record(
                    f.task,
                    false,
                    node,
                    String::new(),
                    self.opts.task_timeout,
                    None,
                    error,
                    now,
                );
            }
        }
    }

    /// Says goodbye to every node and waits (bounded) until every connection closed.
    async fn terminate(&mut self, inputs: &mut Inputs) {
        (self.emit)(&RunEvent::Phase(Phase::Terminating));
        for p in self.peers.values() {
            if !p.closed {
                let _ = p.link.send(Command::Goodbye);
            }
        }
        let deadline = tokio::time::Instant::now() + self.opts.goodbye_timeout;
        // Results of cancelled tasks may still arrive before the goodbye completes.
        while self.peers.values().any(|p| !p.closed) {
            tokio::select! {
                Some((id, ev)) = inputs.links.recv() => self.on_link(id, ev, now()),
                _ = tokio::time::sleep_until(deadline) => {
                    for p in self.peers.values_mut().filter(|p| !p.closed) {
                        let _ = p.link.send(Command::Abort);
                    }
                    // Give the aborts a moment to report; then stop waiting regardless.
                    let grace = tokio::time::Instant::now() + Duration::from_millis(500);
                    while self.peers.values().any(|p| !p.closed) {
                        tokio::select! {
                            Some((id, ev)) = inputs.links.recv() => self.on_link(id, ev, now()),
                            _ = tokio::time::sleep_until(grace) => break,
                        }
                    }
                    break;
                }
            }
        }
        // Interrupted tasks that never reported stay "not run" but keep their attempt count.
        for f in self.inflight.values() {
            let _ = f.cancelled;
            self.results[f.task].attempts = self.sched.attempts(f.task);
        }
        (self.emit)(&RunEvent::Phase(Phase::Disconnected));
    }
}

/// The current time from tokio's clock, so a paused or simulated clock drives the run.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}
