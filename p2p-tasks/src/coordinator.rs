//! The coordinator: runs a plan over connected nodes and reports as it goes.
//!
//! It owns no sockets. Its owner dials the peers discovery finds and hands over each
//! established [`Link`] as a [`PeerUpdate`]; every link reports into one shared channel of
//! link events. The coordinator feeds the [`Scheduler`], sends assignments, turns results
//! into [`RunEvent`]s, and at the end says goodbye to every node and waits (bounded) for
//! each connection to close.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2p_core::conn::SeqHash;

use p2p_core::net::{Command, Link, LinkEvent, LinkId};
use p2p_core::{Assign, NodeId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{Phase, RunEvent, RunReport, Status, TaskResult};
use crate::journal::Journal;
use crate::sched::{Outcome, Policy, Scheduler, TaskStatus, MAX_LOSSES};
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
    /// The node id, shared with the results of the tasks it ran.
    node: Arc<str>,
    closed: bool,
}

/// What the coordinator keeps of a task besides its result: its arguments and dependencies,
/// for the tasks that have any (most have neither, and cost a null pointer).
struct Extra {
    args: String,
    deps: Vec<String>,
}

struct InFlight {
    task: usize,
    link: LinkId,
    cancelled: bool,
}

/// Extra time beyond the task timeout before the coordinator gives up on a result.
const RESULT_GRACE: Duration = Duration::from_secs(2);

/// Most link events handled in one go before the coordinator dispatches new work.
const BATCH: usize = 1024;

/// Runs `tasks` to the end and returns the report. Every event goes to `emit` first.
pub async fn run(
    tasks: Vec<Task>,
    opts: RunOptions,
    mut inputs: Inputs,
    emit: &mut (dyn FnMut(&RunEvent) + Send),
) -> RunReport {
    let started = now();
    // Set by every event but `Flush`: the run says `Flush` before it waits only when
    // something was reported since the last one.
    let pending = AtomicBool::new(false);
    let mut marked = |ev: &RunEvent| {
        if !matches!(ev, RunEvent::Flush) {
            pending.store(true, Ordering::Relaxed);
        }
        emit(ev);
    };
    let sched = Scheduler::new(&tasks, opts.policy.clone());
    let (results, extras) = split(tasks);
    let mut c = Coord {
        sched,
        results,
        extras,
        opts,
        peers: HashMap::default(),
        node_ids: HashSet::new(),
        inflight: HashMap::default(),
        deadlines: VecDeque::new(),
        pending: &pending,
        next_seq: 1,
        peers_open: true,
        settled: false,
        lost: inputs.lost.take(),
        missing_since: None,
        lost_kinds: Vec::new(),
        interrupted: false,
        journal: inputs.journal.take(),
        emit: &mut marked,
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
        missing_types = std::mem::take(&mut c.lost_kinds);
    }
    c.terminate(&mut inputs).await;
    c.sync_journal();
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
    (c.emit)(&RunEvent::Flush);
    report
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Coord<'a> {
    /// Per task, its arguments and dependencies (the id and type are in `results`).
    extras: Vec<Option<Box<Extra>>>,
    opts: RunOptions,
    sched: Scheduler,
    results: Vec<TaskResult>,
    peers: HashMap<LinkId, Peer, SeqHash>,
    node_ids: HashSet<NodeId>,
    inflight: HashMap<u64, InFlight, SeqHash>,
    /// `(result deadline, seq)` of assignments, oldest first. Every attempt gets the same
    /// timeout, so this is in deadline order; entries of finished seqs are dropped lazily.
    deadlines: VecDeque<(Instant, u64)>,
    /// Something was reported since the last [`RunEvent::Flush`].
    pending: &'a AtomicBool,
    next_seq: u64,
    peers_open: bool,
    /// Discovery said it has dialled all it knows (or ended).
    settled: bool,
    lost: Option<mpsc::Sender<std::net::SocketAddr>>,
    missing_since: Option<Instant>,
    /// Types whose waiting tasks failed because no node served them any more.
    lost_kinds: Vec<String>,
    interrupted: bool,
    journal: Option<Journal>,
    emit: &'a mut (dyn FnMut(&RunEvent) + Send),
}

impl Coord<'_> {
    /// Says [`RunEvent::Flush`] if anything was reported since the last time: call before
    /// waiting.
    fn flush(&mut self) {
        self.sync_journal();
        if self.pending.swap(false, Ordering::Relaxed) {
            (self.emit)(&RunEvent::Flush);
        }
    }

    /// Syncs the results appended to the journal since the last sync (group commit: one
    /// sync per burst of results); a journal that cannot be synced stops the run.
    fn sync_journal(&mut self) {
        let Some(j) = &mut self.journal else { return };
        if let Err(e) = j.sync() {
            (self.emit)(&RunEvent::Notice(format!("{e}; stopping the run")));
            self.journal = None;
            self.sched.stop();
        }
    }

    /// Marks the tasks the journal records as succeeded.
    fn resume(&mut self) {
        let Some(j) = &self.journal else { return };
        for (i, r) in self.results.iter_mut().enumerate() {
            if j.done().contains(&r.task) {
                self.sched.mark_done(i);
                r.status = Status::Succeeded;
                r.resumed = true;
            }
        }
    }

    /// Appends a final result to the journal (synced before the run next waits, see
    /// [`Coord::flush`]); a journal that cannot be written stops the run (resuming would
    /// otherwise repeat work silently).
    fn journal(&mut self, task: usize) {
        let Some(j) = &mut self.journal else { return };
        if let Err(e) = j.append(&self.results[task]) {
            (self.emit)(&RunEvent::Notice(format!("{e}; stopping the run")));
            self.journal = None;
            self.sched.stop();
        }
    }

    /// Reports tasks skipped because a dependency failed.
    fn skipped(&mut self) {
        for t in self.sched.drain_skipped() {
            let deps = self.extras[t].as_ref().map_or(&[][..], |e| &e.deps[..]);
            let failed_dep = deps
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
            self.flush();
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
        // One timer, moved only when the next deadline changes.
        let far = || tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let sleep = tokio::time::sleep_until(far());
        tokio::pin!(sleep);
        let mut armed: Option<tokio::time::Instant> = None;
        loop {
            let at = now();
            self.dispatch(at);
            self.check_missing(at);
            if self.sched.is_finished() {
                return;
            }
            let wake = self.next_timer();
            if wake != armed {
                sleep.as_mut().reset(wake.unwrap_or_else(far));
                armed = wake;
            }
            self.flush();
            tokio::select! {
                u = inputs.peers.recv(), if self.peers_open => self.on_peer(u),
                Some((id, ev)) = inputs.links.recv() => {
                    let at = now();
                    self.on_link(id, ev, at);
                    // Every event already queued is handled before new work is dispatched.
                    for _ in 1..BATCH {
                        match inputs.links.try_recv() {
                            Ok((id, ev)) => self.on_link(id, ev, at),
                            Err(_) => break,
                        }
                    }
                }
                () = &mut sleep, if armed.is_some() => {
                    armed = None;
                    self.on_timer(now());
                }
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
                let node: Arc<str> = Arc::from(hello.node_id.to_string());
                (self.emit)(&RunEvent::Connected {
                    node: node.to_string(),
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
        let timeout_ms = u64::try_from(self.opts.task_timeout.as_millis()).unwrap_or(u64::MAX);
        let deadline = now + self.opts.task_timeout + RESULT_GRACE;
        while let Some(d) = self.sched.next(now) {
            let Some(peer) = self.peers.get(&d.node) else {
                self.sched.requeue(d.task);
                break;
            };
            let r = &self.results[d.task];
            let seq = self.next_seq;
            self.next_seq += 1;
            let assign = Assign {
                seq,
                task: r.task.clone(),
                kind: r.kind.to_string(),
                args: self.extras[d.task]
                    .as_ref()
                    .map_or_else(String::new, |e| e.args.clone()),
                attempt: d.attempt,
                timeout_ms,
            };
            if peer.link.send(Command::Assign(assign)).is_err() {
                // The link is closing; its Closed event will remove the node.
                self.sched.requeue(d.task);
                self.sched.drain_node(d.node);
                continue;
            }
            let r = &mut self.results[d.task];
            set_node(&mut r.node, &peer.node);
            r.attempts = d.attempt;
            let t = &*r;
            tracing::debug!(task = %t.task, node = %&peer.node[..8.min(peer.node.len())], attempt = d.attempt, seq, "task assigned");
            (self.emit)(&RunEvent::TaskAssigned {
                task: t.task.clone(),
                kind: t.kind.to_string(),
                node: peer.node.to_string(),
                attempt: d.attempt,
            });
            self.inflight.insert(
                seq,
                InFlight {
                    task: d.task,
                    link: d.node,
                    cancelled: false,
                },
            );
            self.deadlines.push_back((deadline, seq));
        }
        // Finished seqs leave their deadline behind; drop them before they pile up (a task
        // that runs for long keeps the ones behind it from reaching the front).
        if self.deadlines.len() > 2 * self.inflight.len() + 1024 {
            let inflight = &self.inflight;
            self.deadlines.retain(|(_, seq)| inflight.contains_key(seq));
        }
    }

    fn on_link(&mut self, id: LinkId, ev: LinkEvent, now: Instant) {
        match ev {
            LinkEvent::Completed(c) => {
                let Some(f) = self.inflight.remove(&c.seq) else {
                    return;
                };
                let attempt = Attempt {
                    ok: c.ok,
                    output: c.output,
                    took: Duration::from_micros(c.duration_us),
                    exit_code: c.exit_code,
                    error: c.error,
                };
                self.record(f.task, id, attempt, now);
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
                    let short = &p.node[..8.min(p.node.len())];
                    let mut given_up = Vec::new();
                    for t in requeued {
                        if self.sched.losses(t) >= MAX_LOSSES {
                            given_up.push(t);
                        } else {
                            (self.emit)(&RunEvent::Notice(format!(
                                "{} lost with node {short}; it will run again",
                                self.results[t].task,
                            )));
                        }
                    }
                    let why = format!(
                        "lost with its node's connection {MAX_LOSSES} times (last: {})",
                        error.as_deref().unwrap_or("the node said goodbye")
                    );
                    (self.emit)(&RunEvent::Disconnected {
                        node: p.node.to_string(),
                        addr: p.link.addr().to_string(),
                        clean: error.is_none(),
                        error,
                    });
                    for t in given_up {
                        self.sched.give_up(t);
                        self.fail_unrun(t, why.clone());
                    }
                    self.skipped();
                }
            }
            // The coordinator advertises no capacity, so a peer assigning to it is cut off by
            // the protocol before this point.
            LinkEvent::Assigned(_) | LinkEvent::Cancelled { .. } => {}
        }
    }

    /// Records the result of an attempt of `task` that ran over `link`.
    fn record(&mut self, task: usize, link: LinkId, a: Attempt, now: Instant) {
        let Attempt {
            ok,
            output,
            took,
            exit_code,
            error,
        } = a;
        let node = match self.peers.get(&link) {
            Some(p) => p.node.clone(),
            None => Arc::from(""),
        };
        let attempt = self.sched.attempts(task);
        let outcome = self.sched.complete(task, ok, now);
        // The error text is made only for an attempt that failed.
        let error = match outcome {
            Outcome::Succeeded => String::new(),
            _ => error.unwrap_or_else(|| match exit_code {
                Some(code) => format!("exit status {code}"),
                None => "failed".to_string(),
            }),
        };
        let r = &mut self.results[task];
        set_node(&mut r.node, &node);
        r.attempts = attempt;
        r.duration_ms = ms(took);
        match outcome {
            Outcome::Succeeded => {
                r.status = Status::Succeeded;
                r.output.clone_from(&output);
                r.error = None;
            }
            Outcome::Failed => {
                r.status = Status::Failed;
                r.output.clone_from(&output);
                r.error = Some(error.clone());
            }
            Outcome::Retry { .. } => {}
        }
        if !matches!(outcome, Outcome::Retry { .. }) {
            self.journal(task);
        }
        let r = &self.results[task];
        let (id, kind, node) = (r.task.clone(), r.kind.to_string(), node.to_string());
        match outcome {
            Outcome::Succeeded => {
                tracing::debug!(task = %r.task, node = %&node[..8.min(node.len())], attempt, "task completed");
                (self.emit)(&RunEvent::TaskCompleted {
                    task: id,
                    kind,
                    node,
                    attempt,
                    ok: true,
                    output,
                    duration_ms: ms(took),
                });
            }
            Outcome::Retry { delay } => {
                tracing::info!(task = %r.task, node = %&node[..8.min(node.len())], attempt, error = %error, retry_in = ?delay, "task attempt failed; retrying");
                (self.emit)(&RunEvent::TaskRetry {
                    task: id,
                    kind,
                    node,
                    attempt,
                    error,
                    delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                });
            }
            Outcome::Failed => {
                tracing::info!(task = %r.task, node = %&node[..8.min(node.len())], attempt, error = %error, "task failed");
                (self.emit)(&RunEvent::TaskFailed {
                    task: id,
                    kind,
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
            let failed = self.sched.fail_kind(&kind);
            if !failed.is_empty() && !self.lost_kinds.contains(&kind) {
                self.lost_kinds.push(kind.clone());
            }
            for t in failed {
                self.fail_unrun(t, format!("no node serves type {kind:?}"));
            }
        }
        self.skipped();
        self.missing_since = None;
    }

    /// Records and reports a task the scheduler failed without a result from a node.
    fn fail_unrun(&mut self, t: usize, error: String) {
        let r = &mut self.results[t];
        r.status = Status::Failed;
        r.error = Some(error.clone());
        r.attempts = self.sched.attempts(t);
        let attempt = r.attempts;
        let node = r.node.as_deref().unwrap_or("").to_string();
        self.journal(t);
        let task = &self.results[t];
        (self.emit)(&RunEvent::TaskFailed {
            task: task.task.clone(),
            kind: task.kind.to_string(),
            node,
            attempt,
            ok: false,
            output: String::new(),
            duration_ms: 0.0,
            exit_code: None,
            error,
        });
    }

    fn next_timer(&mut self) -> Option<tokio::time::Instant> {
        // Deadlines of seqs that finished are dropped here, from the front.
        while let Some(&(_, seq)) = self.deadlines.front() {
            if self.inflight.contains_key(&seq) {
                break;
            }
            self.deadlines.pop_front();
        }
        let mut wake = self.sched.next_wakeup();
        if let Some(&(at, _)) = self.deadlines.front() {
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        if let Some(since) = self.missing_since {
            let at = since + self.opts.discovery_timeout;
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        wake.map(tokio::time::Instant::from_std)
    }

    fn on_timer(&mut self, now: Instant) {
        while let Some(&(at, seq)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(f) = self.inflight.remove(&seq) else {
                continue;
            };
            if let Some(p) = self.peers.get(&f.link) {
                let _ = p.link.send(Command::Cancel(seq));
            }
            if self.sched.status(f.task) == Some(TaskStatus::Running(f.link)) {
                let error = format!(
                    "no result within {:?}",
                    self.opts.task_timeout + RESULT_GRACE
                );
                let attempt = Attempt {
                    ok: false,
                    output: String::new(),
                    took: self.opts.task_timeout,
                    exit_code: None,
                    error: Some(error),
                };
                self.record(f.task, f.link, attempt, now);
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
            self.flush();
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

/// What a node reported for one attempt of a task.
struct Attempt {
    ok: bool,
    output: String,
    took: Duration,
    exit_code: Option<i32>,
    /// Why it failed, when the node said.
    error: Option<String>,
}

/// Sets a result's node (a shared name: no copy).
fn set_node(slot: &mut Option<Arc<str>>, node: &Arc<str>) {
    if !slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, node)) {
        *slot = Some(node.clone());
    }
}

/// Turns the plan into one result per task (taking each task's id, and sharing one type
/// name among the tasks of a type) and the extras. Tasks are taken from the end and their
/// buffer shrinks as it empties, so a large plan is not held twice in memory.
fn split(mut tasks: Vec<Task>) -> (Vec<TaskResult>, Vec<Option<Box<Extra>>>) {
    let n = tasks.len();
    let mut results = Vec::with_capacity(n);
    let mut extras = Vec::with_capacity(n);
    let mut kinds: HashMap<String, Arc<str>> = HashMap::new();
    while let Some(t) = tasks.pop() {
        let kind = match kinds.get(&t.kind) {
            Some(k) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(t.kind.as_str());
                kinds.insert(t.kind, k.clone());
                k
            }
        };
        results.push(TaskResult {
            task: t.id,
            kind,
            status: Status::NotRun,
            node: None,
            attempts: 0,
            duration_ms: 0.0,
            output: String::new(),
            error: None,
            resumed: false,
        });
        extras.push(if t.args.is_empty() && t.deps.is_empty() {
            None
        } else {
            Some(Box::new(Extra {
                args: t.args,
                deps: t.deps,
            }))
        });
        // Give back the consumed tail of the list every 64 Ki tasks, so the list and the
        // results never both hold a million tasks (a large list's memory is mapped on its
        // own, and shrinking it gives the pages back without a copy).
        if tasks.capacity() - tasks.len() >= 65_536 {
            tasks.shrink_to_fit();
        }
    }
    results.reverse();
    extras.reverse();
    (results, extras)
}
