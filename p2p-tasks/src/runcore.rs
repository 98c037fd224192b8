//! The run core: every rule of a run, as a state machine with no IO, no tokio and no clock
//! of its own (in the style of [`p2p_core::conn::Connection`]).
//!
//! Feed it what happens through `handle_*` (a peer was discovered, connected, said goodbye,
//! closed; a result arrived; an assignment could not be sent; the user interrupted;
//! [`RunCore::handle_timeout`]) and take out what must happen next through `poll_*`: the
//! next command for a link ([`RunCore::poll_command`]), the next [`RunEvent`]
//! ([`RunCore::poll_event`]), the next final result to journal ([`RunCore::poll_final`]),
//! and when to call [`RunCore::handle_timeout`] again ([`RunCore::poll_timeout`]). Inputs
//! are recorded at once; the run moves on (changes stage, applies its waits) at the next
//! `poll_*`, once for a batch of inputs, and starts tasks lazily, one per
//! [`RunCore::poll_command`] (so a driver can pass each assignment's event on before the next
//! is made): poll commands until there are none before waiting. The
//! coordinator ([`crate::coordinator`]) is a short driver that moves these between the core,
//! the links and the output.
//!
//! # Rules it owns
//!
//! - the plan is checked when the core is made ([`RunCore::new`]): a plan that cannot end
//!   (a cycle under its order) or a task that cannot be sent is refused with a [`RunError`];
//! - order, dependencies, placement and retries (through the [`Scheduler`]);
//! - a node's capacity as the node counts it: an attempt the run gave up on (its result
//!   deadline passed) keeps its slot until the node confirms it ended or its connection
//!   closes, so the run never sends a node more than it advertised;
//! - the result deadline: `task_timeout` plus [`RESULT_GRACE`] from the moment the node says
//!   the attempt started (`Started`), so the time it waits at a node shared with other
//!   coordinators for a free slot is not run time (none with a zero timeout; until the
//!   start, the node's heartbeats bound the wait);
//! - the missing-type wait: the tasks of a needed type with no node that can take work
//!   (none connected, capacity 0, or every node leaving) end after `discovery_timeout`, as
//!   *not run* (or *failed*, for a task whose attempt was lost with its node), with and
//!   without keep-going alike;
//! - the loss limits ([`MAX_LOSSES`] after a task started at its node,
//!   [`crate::sched::MAX_UNSTARTED_LOSSES`] before) and the duplicate-node-id rule;
//! - the reason a task was skipped, found in constant time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use compact_str::CompactString;
use p2p_core::conn::SeqHash;
use p2p_core::net::{Command, LinkEvent, LinkId};
use p2p_core::{Assign, Completed, Hello, NodeId};

use crate::event::{Phase, RunEvent, RunReport, Status, TaskResult};
use crate::sched::{Outcome, Policy, Scheduler, TaskStatus, MAX_LOSSES};
use crate::Task;

/// Extra time beyond the task timeout before the run gives up on a result.
pub const RESULT_GRACE: Duration = Duration::from_secs(2);

/// The most bytes of arguments a task may have: what a shell handler can be given (Linux
/// refuses a single argument or environment string over 128 KiB, and `{args}` and
/// `P2P_TASK_ARGS` each carry the whole string), with room for the command around it.
pub const MAX_TASK_ARGS: usize = 120 * 1024;

/// Bytes of an encoded `Assign` besides its id, type and arguments (field lengths, seq,
/// attempt, timeout, message tag and the secure channel's overhead), rounded up.
const ASSIGN_OVERHEAD: usize = 1024;

/// How many links' early events (a goodbye or a close seen before the link was
/// registered) the core remembers.
const EARLY_MAX: usize = 4096;

/// How long aborted connections get to report their close at the end.
const ABORT_GRACE: Duration = Duration::from_millis(500);

/// Options of one run (setters in `options.rs`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunOptions {
    /// Order, retries, keep-going.
    pub policy: Policy,
    /// A task attempt may run at most this long; zero means no limit (on the worker and in
    /// the run alike). Default 1 hour.
    pub task_timeout: Duration,
    /// How long to wait for nodes of every needed type (at the start, and when a type
    /// loses its last node that can take work). Default 3 s.
    pub discovery_timeout: Duration,
    /// How long the goodbye exchange may take at the end. Default 5 s.
    pub goodbye_timeout: Duration,
    /// The largest frame the run may send; a task whose assignment would be larger is
    /// refused when the core is made. Default 16 MiB.
    pub max_frame: usize,
    /// Where the outputs of tasks with files go (`DIR/ID/NAME`, with `DIR/ID/stdout` and
    /// `DIR/ID/meta.json`); given, every task's result is kept there. Default `None`:
    /// `./results`, for tasks with files only.
    pub results: Option<std::path::PathBuf>,
    /// The largest file the run fetches from a node (a declared output, or a task's whole
    /// standard output or error): a larger one announced fails the attempt before any byte
    /// of it moves. Default [`DEFAULT_MAX_FETCH`] (4 GiB).
    pub max_file: u64,
    /// Whether each assignment is reported as a [`RunEvent::TaskAssigned`]. Default true;
    /// `run --quiet`, which shows none and has nothing else reading events, turns it off (one
    /// event less to make, pass on and drop per task). Results and every other event are
    /// reported either way.
    pub assignment_events: bool,
    /// Whether each success is reported as a [`RunEvent::TaskCompleted`]. Default true;
    /// off, successes are counted into a [`RunEvent::TasksSucceeded`] sent before the next
    /// event of another kind (one event per burst of successes, not one a task), and the
    /// report holds their results: `run --quiet`, which shows no success and has nothing
    /// else reading them, turns it off. Every other event is reported either way.
    pub success_events: bool,
}

/// The default of [`RunOptions::max_file`] (`run --max-file`): 4 GiB.
pub const DEFAULT_MAX_FETCH: u64 = 4 << 30;

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            policy: Policy::default(),
            task_timeout: Duration::from_secs(3600),
            discovery_timeout: Duration::from_secs(3),
            goodbye_timeout: Duration::from_secs(5),
            max_frame: p2p_core::codec::DEFAULT_MAX_FRAME,
            results: None,
            max_file: DEFAULT_MAX_FETCH,
            assignment_events: true,
            success_events: true,
        }
    }
}

/// A plan the run refuses before it starts: [`crate::Error::Plan`] or
/// [`crate::Error::Unsendable`] (the crate has one error type).
pub type RunError = crate::Error;

/// Checks that `tasks` can run under `opts`: no cycle in the order and dependencies, and
/// every task's assignment fits in a frame and its arguments in a shell handler's command.
/// [`RunCore::new`] runs it; a CLI calls it first to name the file in its message.
pub fn validate(tasks: &[Task], opts: &RunOptions) -> Result<(), RunError> {
    // One pass over the plan: the first task too large to send, and whether any task has
    // dependencies (without, neither order's waits nor `after` can form a cycle, and the
    // plan check has nothing to do). A cycle is reported before a task too large.
    let mut any_deps = false;
    let mut too_large: Option<&Task> = None;
    // What the id, the type and the arguments of an assignment may take of a frame (none:
    // every task is too large).
    let room = opts.max_frame.checked_sub(ASSIGN_OVERHEAD);
    for t in tasks {
        let args = match t.extra() {
            None => 0,
            Some(x) => {
                any_deps |= !x.deps.is_empty();
                x.args.len()
            }
        };
        if too_large.is_none()
            && (args > MAX_TASK_ARGS || room.is_none_or(|room| t.names_len() + args > room))
        {
            too_large = Some(t);
        }
    }
    if any_deps {
        crate::plan::check(tasks, opts.policy.order)?;
    }
    let Some(t) = too_large else {
        return Ok(());
    };
    let why = if t.args().len() > MAX_TASK_ARGS {
        format!(
            "its arguments are {} bytes, more than the {MAX_TASK_ARGS} bytes a shell \
             handler can be given",
            t.args().len()
        )
    } else {
        format!(
            "its assignment is larger than the maximum frame of {} bytes",
            opts.max_frame
        )
    };
    Err(RunError::Unsendable {
        task: t.id().to_owned(),
        line: t.line(),
        col: t.col(),
        why,
    })
}

/// What the core keeps of a task besides its result: its arguments and dependencies, for
/// the tasks that have any (most have neither, and cost a null pointer).
struct Extra {
    args: String,
    /// The task's own attempt timeout (`timeout DUR`), instead of the run's.
    timeout: Option<Duration>,
}

struct Peer {
    /// The node id as text, shared with the results of the tasks it ran.
    node: Arc<str>,
    node_id: NodeId,
    addr: SocketAddr,
    closed: bool,
    /// Its last load report (v3), if any.
    load: Option<p2p_core::LoadReport>,
}

struct InFlight {
    task: usize,
    link: LinkId,
    /// When the attempt was sent, then when the node said it started.
    since: Instant,
    /// The node said it started (its deadline runs).
    started: bool,
    /// A cancel was sent (interrupt): its result still counts.
    cancelled: bool,
    /// The run gave up on it (its deadline passed): its result is ignored, and it holds
    /// its node's slot until that result (or the connection's close) arrives.
    abandoned: bool,
}

/// Entries kept in the window beyond its live ones before its front is moved out.
const WINDOW_SLACK: usize = 1024;

/// The attempts in flight by seq. Seqs are handed out in order and most attempts end soon
/// after they start, so they live in a window indexed by `seq - base` (no hashing, no
/// probing); an attempt that stays while the window moves far past it (a long task among
/// many short ones) moves to a hash table, which keeps the window within twice its live
/// entries plus [`WINDOW_SLACK`].
#[derive(Default)]
struct InFlights {
    /// The seq of `window[0]`.
    base: u64,
    /// Entries before `start` are all empty (dropped in bulk now and then).
    start: usize,
    window: Vec<Option<InFlight>>,
    /// Entries of `window` that are `Some`.
    live: usize,
    /// Attempts moved out of the window (or inserted behind or far ahead of it).
    old: HashMap<u64, InFlight, SeqHash>,
}

impl InFlights {
    fn len(&self) -> usize {
        self.live + self.old.len()
    }

    #[inline]
    fn index(&self, seq: u64) -> Option<usize> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        (i >= self.start && i < self.window.len()).then_some(i)
    }

    /// Adds (or replaces) the attempt `seq`.
    fn insert(&mut self, seq: u64, f: InFlight) {
        if let Some(i) = self.index(seq) {
            if self.window[i].replace(f).is_none() {
                self.live += 1;
            }
            return;
        }
        if !self.old.is_empty() && self.old.contains_key(&seq) {
            self.old.insert(seq, f);
            return;
        }
        if self.live == 0 {
            // Nothing in the window: it starts here.
            self.window.clear();
            self.start = 0;
            self.base = seq;
        }
        let end = self.base + self.window.len() as u64;
        match seq.checked_sub(end) {
            Some(gap) if gap <= WINDOW_SLACK as u64 => {
                for _ in 0..gap {
                    self.window.push(None);
                }
            }
            // Behind the window, or far ahead of it: not worth the gap.
            _ => {
                self.old.insert(seq, f);
                return;
            }
        }
        self.window.push(Some(f));
        self.live += 1;
        if self.window.len() - self.start > 2 * self.live + WINDOW_SLACK {
            // Long-lived attempts hold the front: move them out.
            while self.window.len() - self.start > self.live + WINDOW_SLACK {
                if let Some(f) = self.window[self.start].take() {
                    self.live -= 1;
                    self.old.insert(self.base + self.start as u64, f);
                }
                self.start += 1;
            }
            self.trim();
        }
    }

    /// Skips the empty entries at the front, and drops them once they are four times the
    /// rest (which then moves: a quarter of an entry per entry dropped).
    fn trim(&mut self) {
        while self.start < self.window.len() && self.window[self.start].is_none() {
            self.start += 1;
        }
        if self.start > WINDOW_SLACK && self.start > 4 * (self.window.len() - self.start) {
            self.window.drain(..self.start);
            self.base += self.start as u64;
            self.start = 0;
        }
    }

    fn get(&self, seq: &u64) -> Option<&InFlight> {
        match self.index(*seq) {
            Some(i) => self.window[i].as_ref(),
            None if self.old.is_empty() => None,
            None => self.old.get(seq),
        }
    }

    fn get_mut(&mut self, seq: &u64) -> Option<&mut InFlight> {
        match self.index(*seq) {
            Some(i) => self.window[i].as_mut(),
            None if self.old.is_empty() => None,
            None => self.old.get_mut(seq),
        }
    }

    fn remove(&mut self, seq: &u64) -> Option<InFlight> {
        self.remove_if(seq, |_| true)
    }

    /// Removes the attempt `seq` if `keep_out` says so of it (one lookup for a check and
    /// the removal).
    #[inline]
    fn remove_if(
        &mut self,
        seq: &u64,
        keep_out: impl FnOnce(&InFlight) -> bool,
    ) -> Option<InFlight> {
        match self.index(*seq) {
            Some(i) => {
                let f = self.window[i].take_if(|f| keep_out(f))?;
                self.live -= 1;
                if i == self.start {
                    self.trim();
                }
                Some(f)
            }
            None if self.old.is_empty() => None,
            None => match self.old.entry(*seq) {
                std::collections::hash_map::Entry::Occupied(e) if keep_out(e.get()) => {
                    Some(e.remove())
                }
                _ => None,
            },
        }
    }

    /// Every attempt with its seq: the window's in seq order, then the others.
    fn iter(&self) -> impl Iterator<Item = (u64, &InFlight)> {
        let base = self.base;
        self.window
            .iter()
            .enumerate()
            .filter_map(move |(i, f)| f.as_ref().map(|f| (base + i as u64, f)))
            .chain(self.old.iter().map(|(s, f)| (*s, f)))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut InFlight)> {
        let base = self.base;
        self.window
            .iter_mut()
            .enumerate()
            .filter_map(move |(i, f)| f.as_mut().map(|f| (base + i as u64, f)))
            .chain(self.old.iter_mut().map(|(s, f)| (*s, f)))
    }

    fn values(&self) -> impl Iterator<Item = &InFlight> {
        self.iter().map(|(_, f)| f)
    }

    /// The window's length and its live entries (for the tests of its bound).
    #[cfg(test)]
    fn window_len(&self) -> usize {
        self.window.len() - self.start
    }
}

/// A link's event that arrived before the link was registered.
enum Early {
    Goodbye,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Discovering,
    Running,
    Terminating { until: Instant, aborted: bool },
    Done,
}

/// The whole run as a state machine. See the [module documentation](self).
pub struct RunCore {
    opts: RunOptions,
    sched: Scheduler,
    results: Vec<TaskResult>,
    /// Per task (file order), its extras; empty when no task has any.
    extras: Vec<Option<Box<Extra>>>,
    peers: HashMap<LinkId, Peer, SeqHash>,
    node_ids: HashMap<NodeId, LinkId>,
    inflight: InFlights,
    /// `(result deadline, seq)` of assignments, earliest first (tasks may have timeouts of
    /// their own); entries of finished seqs are dropped lazily.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    early: HashMap<LinkId, Early>,
    /// Speeds learned of nodes (node, type) that may have left (see [`RunReport::speeds`]).
    learned: HashMap<(Arc<str>, String), f64>,
    early_order: VecDeque<LinkId>,
    /// Links the core told to leave (duplicate node, serving nothing needed).
    ignored: HashSet<LinkId>,
    needed: Vec<String>,
    stage: Stage,
    /// The latest time an input was handled at.
    now: Instant,
    /// Inputs were handled since the run last moved on.
    dirty: bool,
    /// Tasks may be ready to start (see [`RunCore::poll_command`]).
    may_dispatch: bool,
    started: Instant,
    ended: Option<Instant>,
    next_seq: u64,
    settled: bool,
    announced_connecting: bool,
    missing_since: Option<Instant>,
    missing_types: Vec<String>,
    interrupted: bool,
    stop_error: Option<String>,
    commands: VecDeque<(LinkId, Command)>,
    events: VecDeque<RunEvent>,
    /// Successes not reported yet ([`RunOptions::success_events`] off): sent as one
    /// [`RunEvent::TasksSucceeded`] before the next event.
    unreported: usize,
    finals: VecDeque<usize>,
}

impl std::fmt::Debug for RunCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunCore")
            .field("tasks", &self.results.len())
            .field("stage", &self.stage)
            .field("peers", &self.peers.len())
            .field("inflight", &self.inflight.len())
            .finish_non_exhaustive()
    }
}

/// [`RunCore::push_event`] for a caller that holds another field.
fn push_event(events: &mut VecDeque<RunEvent>, unreported: &mut usize, ev: RunEvent) {
    if *unreported > 0 {
        let count = std::mem::take(unreported);
        events.push_back(RunEvent::TasksSucceeded { count });
    }
    events.push_back(ev);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl RunCore {
    /// A run of `tasks` (in file order) starting at `now`, in its discovery stage. Refuses
    /// a plan that [`validate`] refuses.
    pub fn new(tasks: Vec<Task>, opts: RunOptions, now: Instant) -> Result<RunCore, RunError> {
        validate(&tasks, &opts)?;
        let (results, extras, sched) = split(tasks, opts.policy.clone());
        let needed = sched.kinds().to_vec();
        let mut core = RunCore {
            opts,
            sched,
            results,
            extras,
            peers: HashMap::default(),
            node_ids: HashMap::new(),
            inflight: InFlights::default(),
            deadlines: BinaryHeap::new(),
            early: HashMap::new(),
            learned: HashMap::new(),
            early_order: VecDeque::new(),
            ignored: HashSet::new(),
            needed,
            stage: Stage::Discovering,
            now,
            dirty: false,
            may_dispatch: false,
            started: now,
            ended: None,
            next_seq: 1,
            settled: false,
            announced_connecting: false,
            missing_since: None,
            missing_types: Vec::new(),
            interrupted: false,
            stop_error: None,
            commands: VecDeque::new(),
            events: VecDeque::new(),
            unreported: 0,
            finals: VecDeque::new(),
        };
        core.events.push_back(RunEvent::Phase(Phase::Discovering));
        core.advance(now);
        Ok(core)
    }

    /// The task types the plan needs, in order of first appearance.
    pub fn needed_types(&self) -> &[String] {
        &self.needed
    }

    /// Marks the tasks whose ids are in `done` as succeeded by an earlier run (a journal):
    /// they will not run, and their dependents may. Call before anything else.
    pub fn resume(&mut self, done: &HashSet<String>, now: Instant) {
        for (i, r) in self.results.iter_mut().enumerate() {
            if done.contains(r.task.as_str()) {
                self.sched.mark_done(i);
                r.status = Status::Succeeded;
                r.resumed = true;
            }
        }
        self.touch(now);
    }

    /// The result of task `i` (in file order) as it stands.
    pub fn result(&self, i: usize) -> Option<&TaskResult> {
        self.results.get(i)
    }

    /// Discovery reported a peer (before it is dialled).
    pub fn handle_discovered(&mut self, addr: String, source: String) {
        self.connecting();
        self.push_event(RunEvent::PeerDiscovered {
            addr,
            source,
            node: None,
        });
    }

    /// A peer could not be reached (or refused us).
    pub fn handle_unreachable(&mut self, addr: String, error: String) {
        self.events
            .push_back(RunEvent::PeerUnreachable { addr, error });
    }

    /// Every peer discovery knows of has been dialled: the run need not wait for more before
    /// it starts.
    pub fn handle_settled(&mut self, now: Instant) {
        self.settled = true;
        self.touch(now);
    }

    /// A connection to a peer completed its handshake. Its events are handled from now on;
    /// a goodbye or close of the link that arrived before this call still counts.
    pub fn handle_connected(
        &mut self,
        link: LinkId,
        addr: SocketAddr,
        hello: &Hello,
        now: Instant,
    ) {
        self.connecting();
        let early = self.early.remove(&link);
        if self.is_terminating() && !matches!(early, Some(Early::Closed)) {
            // Too late to be of use: let it go.
            self.ignored.insert(link);
            self.commands.push_back((link, Command::Goodbye));
            return;
        }
        if let Some(Early::Closed) = early {
            // Gone before it could be used: nothing ran there (the dialer learns of the
            // close from the link itself).
            tracing::debug!(link, %addr, "connection closed before it was registered");
            return;
        }
        if !hello.types.iter().any(|t| self.needed.contains(t)) {
            tracing::info!(link, %addr, types = ?hello.types, "node serves no type the plan needs; leaving it");
            self.ignored.insert(link);
            self.commands.push_back((link, Command::Goodbye));
            return;
        }
        if let Some(first) = self.node_ids.get(&hello.node_id) {
            // The same node by a second address, or two nodes sharing one identity (a copied
            // identity file): report it, keep the first connection.
            let first = self
                .peers
                .get(first)
                .map_or_else(|| "?".to_string(), |p| p.addr.to_string());
            self.push_event(RunEvent::Notice(format!(
                "node id {} is connected at {first} and again at {addr}: the same node by \
                 two addresses, or two nodes sharing one identity file; using {first} only",
                hello.node_id,
            )));
            self.ignored.insert(link);
            self.commands.push_back((link, Command::Goodbye));
            return;
        }
        let node: Arc<str> = Arc::from(hello.node_id.to_string());
        self.push_event(RunEvent::Connected {
            node: node.to_string(),
            addr: addr.to_string(),
            types: hello.types.clone(),
            capacity: hello.capacity,
        });
        self.sched.add_node(link, &hello.types, hello.capacity);
        if matches!(early, Some(Early::Goodbye)) {
            self.sched.drain_node(link);
        }
        self.node_ids.insert(hello.node_id, link);
        self.peers.insert(
            link,
            Peer {
                node,
                node_id: hello.node_id,
                addr,
                closed: false,
                load: None,
            },
        );
        self.touch(now);
    }

    /// An event of a link. [`LinkEvent::Opened`] registers it (as
    /// [`RunCore::handle_connected`]).
    pub fn handle_link_event(&mut self, link: LinkId, ev: LinkEvent, now: Instant) {
        if let LinkEvent::Opened(l) = &ev {
            return self.handle_connected(link, l.addr(), l.peer(), now);
        }
        let ev = match ev {
            // A result, the event of every task: its attempt is found first, with no lookup
            // of the link (an attempt is sent only to a registered link, which stays so).
            LinkEvent::Completed(c) => return self.completed(link, c, now),
            ev => ev,
        };
        if !self.peers.contains_key(&link) {
            if self.ignored.contains(&link) {
                if matches!(ev, LinkEvent::Closed { .. }) {
                    self.ignored.remove(&link);
                }
                return;
            }
            let early = match ev {
                LinkEvent::PeerGoodbye => Early::Goodbye,
                LinkEvent::Closed { .. } => Early::Closed,
                _ => return,
            };
            if self.early.len() >= EARLY_MAX {
                if let Some(old) = self.early_order.pop_front() {
                    self.early.remove(&old);
                }
            }
            if self.early.insert(link, early).is_none() {
                self.early_order.push_back(link);
            }
            return;
        }
        match ev {
            LinkEvent::Load(r) => {
                // The capacity it takes now (a shrink cancels nothing: it takes no new work
                // until fewer run), and whether its machine is saturated.
                self.sched.set_capacity(link, r.capacity);
                self.sched.set_saturated(link, r.is_saturated());
                if let Some(p) = self.peers.get_mut(&link) {
                    p.load = Some(r);
                }
                self.touch(now);
            }
            LinkEvent::Started { seq } => {
                // The attempt starts now: its run time and its deadline count from here, not
                // from its assignment (it may have waited for a slot the node shares with
                // other coordinators).
                if let Some(f) = self.inflight.get_mut(&seq) {
                    if f.link == link && !f.abandoned && !f.started {
                        f.started = true;
                        f.since = now;
                        let timeout = timeout_of(&self.extras, f.task, self.opts.task_timeout);
                        // A deadline later than the clock can hold is none.
                        let at = now.checked_add(timeout.saturating_add(RESULT_GRACE));
                        if let (false, Some(at)) = (timeout.is_zero(), at) {
                            self.deadlines.push(Reverse((at, seq)));
                        }
                    }
                }
            }
            // Handled before the link is looked up (see below).
            LinkEvent::Completed(c) => return self.completed(link, c, now),
            LinkEvent::AssignFailed {
                assign,
                reason,
                closing,
            } => {
                tracing::debug!(link, %reason, closing, "assignment not sent");
                if closing {
                    self.unsent(link, assign.seq);
                } else {
                    self.over_capacity(link, assign.seq);
                }
            }
            LinkEvent::PeerGoodbye => self.sched.drain_node(link),
            LinkEvent::Closed { error } => self.closed(link, error.map(|e| e.to_string())),
            // The run advertises no capacity, so a peer assigning to it is cut off by the
            // protocol before this point.
            LinkEvent::Opened(_)
            | LinkEvent::Assigned(_)
            | LinkEvent::Cancelled { .. }
            | LinkEvent::Transfer(_)
            | LinkEvent::Hosted(_) => {}
        }
        self.touch(now);
    }

    /// A result on `link`: only one of an attempt sent there counts (the link is then
    /// registered); the others are dropped, as a result on a link not registered is.
    fn completed(&mut self, link: LinkId, c: Completed, now: Instant) {
        let Some(f) = self.inflight.remove_if(&c.seq, |f| f.link == link) else {
            return;
        };
        if f.abandoned {
            // The node confirms the attempt the run gave up on ended: its slot is free.
            self.sched.release(link);
        } else {
            let mut took = Duration::from_micros(c.duration_us);
            if f.cancelled {
                // A cancelled attempt ran until now, whatever the worker measured.
                took = took.max(now.saturating_duration_since(f.since));
            }
            let attempt = Attempt {
                ok: c.ok,
                output: c.output,
                took,
                exit_code: c.exit_code,
                error: c.error,
                cancelled: f.cancelled,
            };
            self.record(f.task, link, attempt, now);
        }
        self.touch(now);
    }

    /// The assignment `seq` could not be handed to `link` (it is closing): the task is sent
    /// again elsewhere, without using a retry, and the link gets no more work.
    pub fn handle_unsent(&mut self, link: LinkId, seq: u64, now: Instant) {
        self.unsent(link, seq);
        self.touch(now);
    }

    fn unsent(&mut self, link: LinkId, seq: u64) {
        if let Some(f) = self.inflight.remove(&seq) {
            if f.abandoned {
                self.sched.release(link);
            } else {
                self.sched.requeue(f.task);
            }
        }
        // The connection refuses work: it is closing.
        self.sched.drain_node(link);
    }

    /// The assignment `seq` went beyond `link`'s capacity as its connection knows it (a
    /// `Load` report shrank it while the assignment was on its way): the task goes back to
    /// the queue, without using a retry, and the link keeps its place for later work.
    fn over_capacity(&mut self, link: LinkId, seq: u64) {
        if let Some(f) = self.inflight.remove(&seq) {
            if f.abandoned {
                self.sched.release(link);
            } else {
                self.sched.requeue(f.task);
            }
        }
    }

    /// The user interrupted the run (Ctrl-C, shutdown): nothing new starts, running tasks
    /// are cancelled, every node gets a goodbye.
    pub fn handle_interrupt(&mut self, now: Instant) {
        if self.interrupted {
            return;
        }
        self.interrupted = true;
        self.sched.stop();
        if self.stage == Stage::Running {
            self.push_event(RunEvent::Notice(
                "interrupted: cancelling running tasks".into(),
            ));
            self.cancel_all();
        }
        self.touch(now);
    }

    /// The run must stop (e.g. its journal cannot be written): nothing new starts, running
    /// tasks are cancelled, the report carries `error`. Tasks in `unrecorded` had a final
    /// result that could not be recorded: they are reported as not run.
    pub fn handle_stop(&mut self, error: String, unrecorded: &[usize], now: Instant) {
        for &t in unrecorded {
            if let Some(r) = self.results.get_mut(t) {
                r.status = Status::NotRun;
                r.error = Some(format!("its result could not be recorded: {error}"));
            }
        }
        if self.stop_error.is_none() {
            self.events
                .push_back(RunEvent::Notice(format!("{error}; stopping the run")));
            self.stop_error = Some(error);
            self.sched.stop();
            if self.stage == Stage::Running {
                self.cancel_all();
            }
        }
        self.touch(now);
    }

    /// Applies the rules that depend on time: result deadlines, retry back-off, the
    /// missing-type wait, the discovery and goodbye bounds.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((at, seq))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(f) = self.inflight.get_mut(&seq) else {
                continue;
            };
            if f.abandoned {
                continue;
            }
            f.abandoned = true;
            let (task, link, since, cancelled) = (f.task, f.link, f.since, f.cancelled);
            self.commands.push_back((link, Command::Cancel(seq)));
            if self.sched.status(task) == Some(TaskStatus::Running(link)) {
                let error = format!(
                    "no result within {:?}",
                    self.timeout_of(task).saturating_add(RESULT_GRACE)
                );
                let attempt = Attempt {
                    ok: false,
                    output: CompactString::default(),
                    took: now.saturating_duration_since(since),
                    exit_code: None,
                    error: Some(error),
                    cancelled,
                };
                self.record(task, link, attempt, now);
                // The node still counts the attempt until it confirms its end.
                self.sched.hold(link);
            }
        }
        self.touch(now);
    }

    /// When [`RunCore::handle_timeout`] must be called next.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.settle();
        let mut wake: Option<Instant> = None;
        let mut at = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        match self.stage {
            Stage::Discovering => at(self.started + self.opts.discovery_timeout),
            Stage::Running => {
                while let Some(&Reverse((_, seq))) = self.deadlines.peek() {
                    if self.inflight.get(&seq).is_some_and(|f| !f.abandoned) {
                        break;
                    }
                    self.deadlines.pop();
                }
                if let Some(&Reverse((d, _))) = self.deadlines.peek() {
                    at(d);
                }
                if let Some(w) = self.sched.next_wakeup() {
                    at(w);
                }
                if let Some(since) = self.missing_since {
                    at(since + self.opts.discovery_timeout);
                }
            }
            Stage::Terminating { until, .. } => at(until),
            Stage::Done => {}
        }
        wake
    }

    /// The next command for a link.
    pub fn poll_command(&mut self) -> Option<(LinkId, Command)> {
        self.settle();
        // Work starts lazily, one task per poll: each assignment's event can be passed on
        // (and freed) before the next is made, however many tasks start at once.
        if self.commands.is_empty() && self.may_dispatch {
            if self.stage == Stage::Running && !self.dirty {
                // The assignment is the next command: handed out as made.
                match self.dispatch_one(self.now) {
                    Some(cmd) => return Some(cmd),
                    None => self.may_dispatch = false,
                }
            } else {
                self.may_dispatch = false;
            }
        }
        self.commands.pop_front()
    }

    /// Queues an event, after the count of the successes not reported one by one before it.
    fn push_event(&mut self, ev: RunEvent) {
        push_event(&mut self.events, &mut self.unreported, ev);
    }

    /// The next event of the run.
    pub fn poll_event(&mut self) -> Option<RunEvent> {
        self.settle();
        self.events.pop_front()
    }

    /// The next task whose result became final (for a journal); see [`RunCore::result`].
    pub fn poll_final(&mut self) -> Option<usize> {
        self.settle();
        self.finals.pop_front()
    }

    /// Moves the run on after the inputs handled since the last move, as every `poll_*`
    /// call does first (nothing to do when there were none).
    pub(crate) fn settle_now(&mut self) {
        self.settle();
    }

    /// The next event already queued, without moving the run on (see
    /// [`RunCore::poll_event`], which does): for a driver that passes on each input's events
    /// as it handles a batch of inputs, so the run moves on once a batch, at the next
    /// `poll_*` call, not once an input.
    pub(crate) fn poll_event_queued(&mut self) -> Option<RunEvent> {
        self.events.pop_front()
    }

    /// The next final result already queued, without moving the run on (as
    /// [`RunCore::poll_event_queued`]).
    pub(crate) fn poll_final_queued(&mut self) -> Option<usize> {
        self.finals.pop_front()
    }

    /// Drops the final results already queued, without moving the run on (as
    /// [`RunCore::poll_event_queued`]).
    pub(crate) fn drop_finals_queued(&mut self) {
        self.finals.clear();
    }

    /// Whether the run is over, as of the last `poll_*` call.
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Whether the run has started its goodbye (or is over), as of the last `poll_*` call.
    pub fn is_terminating(&self) -> bool {
        matches!(self.stage, Stage::Terminating { .. } | Stage::Done)
    }

    /// The report, once [`RunCore::is_done`] (before it, what stands so far).
    pub fn into_report(mut self, now: Instant) -> RunReport {
        self.settle();
        let links: Vec<LinkId> = self.peers.keys().copied().collect();
        for link in links {
            self.remember_speed(link);
        }
        let mut speeds: Vec<crate::event::NodeSpeed> = self
            .learned
            .iter()
            .map(|((node, kind), secs)| crate::event::NodeSpeed {
                node: node.to_string(),
                kind: kind.clone(),
                ms_per_cost: secs * 1000.0,
            })
            .collect();
        speeds.sort_by(|a, b| (&a.node, &a.kind).cmp(&(&b.node, &b.kind)));
        RunReport {
            speeds,
            results: self.results,
            missing_types: self.missing_types,
            interrupted: self.interrupted,
            error: self.stop_error,
            elapsed_ms: ms(self
                .ended
                .unwrap_or(now)
                .saturating_duration_since(self.started)),
        }
    }

    fn connecting(&mut self) {
        if self.stage == Stage::Discovering && !self.announced_connecting {
            self.announced_connecting = true;
            self.push_event(RunEvent::Phase(Phase::Connecting));
        }
    }

    fn cancel_all(&mut self) {
        for (seq, f) in self.inflight.iter_mut() {
            if !f.abandoned && !f.cancelled {
                f.cancelled = true;
                self.commands.push_back((f.link, Command::Cancel(seq)));
            }
        }
    }

    /// Notes an input at `now`: the run moves on (see [`RunCore::advance`]) at the next
    /// `poll_*`, once for a whole batch of inputs.
    fn touch(&mut self, now: Instant) {
        self.now = self.now.max(now);
        self.dirty = true;
    }

    fn settle(&mut self) {
        if std::mem::take(&mut self.dirty) {
            self.advance(self.now);
        }
    }

    /// Moves the run on after inputs: dispatches work, applies the missing-type wait, and
    /// goes from stage to stage.
    fn advance(&mut self, now: Instant) {
        loop {
            match self.stage {
                Stage::Discovering => {
                    let deadline = self.started + self.opts.discovery_timeout;
                    if !(self.interrupted
                        || self.stop_error.is_some()
                        || !self.sched.any_missing()
                        || self.settled
                        || now >= deadline)
                    {
                        return;
                    }
                    let missing = self.sched.missing_kinds();
                    if self.interrupted || self.stop_error.is_some() {
                        self.terminate(now);
                    } else if !missing.is_empty() && !self.policy_keep_going() {
                        // Nothing can complete the plan: run nothing; the summary names what
                        // is missing.
                        self.push_event(RunEvent::Notice(format!(
                            "no node serves type{} {} (none connected, or each has capacity 0 \
                             or is leaving): nothing runs",
                            if missing.len() > 1 { "s" } else { "" },
                            name_some(&missing)
                        )));
                        // One pass over the results, whatever the number of missing types.
                        let why: hashbrown::HashMap<&str, String> = missing
                            .iter()
                            .map(|k| (k.as_str(), format!("no node serves type {k:?}")))
                            .collect();
                        for r in &mut self.results {
                            if let (Status::NotRun, Some(why)) = (r.status, why.get(&*r.kind)) {
                                r.error = Some(why.clone());
                            }
                        }
                        drop(why);
                        self.missing_types = missing;
                        self.terminate(now);
                    } else {
                        self.push_event(RunEvent::Phase(Phase::Assigning));
                        self.stage = Stage::Running;
                        if !missing.is_empty() {
                            // The wait for them started with the run.
                            self.missing_since = Some(self.started);
                        }
                    }
                }
                Stage::Running => {
                    // Missing types first: ending their tasks may let others start (strict
                    // order with keep-going), which the dispatch after it sends.
                    self.check_missing(now);
                    if self.sched.is_finished() {
                        self.terminate(now);
                    } else {
                        // Tasks start one at a time as commands are polled.
                        self.may_dispatch = true;
                        return;
                    }
                }
                Stage::Terminating { until, aborted } => {
                    if self.peers.values().all(|p| p.closed) {
                        self.finish(now);
                    } else if now >= until {
                        if aborted {
                            self.finish(now);
                        } else {
                            for (id, p) in &self.peers {
                                if !p.closed {
                                    self.commands.push_back((*id, Command::Abort));
                                }
                            }
                            self.stage = Stage::Terminating {
                                until: now + ABORT_GRACE,
                                aborted: true,
                            };
                        }
                    }
                    return;
                }
                Stage::Done => return,
            }
        }
    }

    fn policy_keep_going(&self) -> bool {
        self.opts.policy.keep_going
    }

    fn terminate(&mut self, now: Instant) {
        self.push_event(RunEvent::Phase(Phase::Terminating));
        for (id, p) in &self.peers {
            if !p.closed {
                self.commands.push_back((*id, Command::Goodbye));
            }
        }
        self.stage = Stage::Terminating {
            until: now + self.opts.goodbye_timeout,
            aborted: false,
        };
    }

    fn finish(&mut self, now: Instant) {
        // Interrupted tasks that never reported stay "not run" but keep their attempt count.
        for f in self.inflight.values() {
            if !f.abandoned {
                self.results[f.task].attempts = self.sched.attempts(f.task);
            }
        }
        // The summary comes from the report (see [`RunReport::summary`]), once the driver
        // has recorded every final result.
        self.push_event(RunEvent::Phase(Phase::Disconnected));
        self.ended = Some(now);
        self.stage = Stage::Done;
    }

    /// Starts the next task that can start now, if any (see [`RunCore::poll_command`]),
    /// returning its assignment. `None` when nothing more can start.
    fn dispatch_one(&mut self, now: Instant) -> Option<(LinkId, Command)> {
        let dispatched = self.sched.next(now);
        if let Some(d) = dispatched {
            let timeout_ms = u64::try_from(self.timeout_of(d.task).as_millis()).unwrap_or(u64::MAX);
            let Some(peer) = self.peers.get(&d.node) else {
                self.sched.requeue(d.task);
                return None;
            };
            let r = &mut self.results[d.task];
            let seq = self.next_seq;
            self.next_seq += 1;
            let assign = Assign {
                seq,
                task: r.task.clone(),
                kind: CompactString::from(&*r.kind),
                args: self
                    .extras
                    .get(d.task)
                    .and_then(|e| e.as_ref())
                    .map_or_else(String::new, |e| e.args.clone()),
                attempt: d.attempt,
                timeout_ms,
            };
            let cmd = (d.node, Command::Assign(assign));
            set_node(&mut r.node, &peer.node);
            r.attempts = d.attempt;
            tracing::debug!(task = %r.task, node = %&peer.node[..8.min(peer.node.len())], attempt = d.attempt, seq, "task assigned");
            if self.opts.assignment_events {
                push_event(
                    &mut self.events,
                    &mut self.unreported,
                    RunEvent::TaskAssigned {
                        task: r.task.clone(),
                        kind: r.kind.clone(),
                        node: peer.node.clone(),
                        attempt: d.attempt,
                    },
                );
            }
            self.inflight.insert(
                seq,
                InFlight {
                    task: d.task,
                    link: d.node,
                    since: now,
                    started: false,
                    cancelled: false,
                    abandoned: false,
                },
            );
            return Some(cmd);
        }
        // Finished seqs leave their deadline behind; drop them before they pile up (a task
        // that runs for long keeps the ones behind it from reaching the front).
        if self.deadlines.len() > 2 * self.inflight.len() + 1024 {
            let inflight = &self.inflight;
            self.deadlines
                .retain(|Reverse((_, seq))| inflight.get(seq).is_some_and(|f| !f.abandoned));
        }
        None
    }

    /// A task's attempt timeout: its own, or the run's (zero: none).
    fn timeout_of(&self, task: usize) -> Duration {
        timeout_of(&self.extras, task, self.opts.task_timeout)
    }

    /// Keeps what the run learned of `link`'s node before the scheduler forgets it.
    fn remember_speed(&mut self, link: LinkId) {
        let Some(p) = self.peers.get(&link) else {
            return;
        };
        for (kind, secs) in self.sched.speeds(link) {
            self.learned.insert((p.node.clone(), kind), secs);
        }
    }

    fn closed(&mut self, link: LinkId, error: Option<String>) {
        match &error {
            None => tracing::debug!(link, "connection closed after goodbye"),
            Some(e) => {
                tracing::info!(link, error = %e, "connection lost; its tasks are re-queued")
            }
        }
        let lost: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.link == link)
            .map(|(s, _)| s)
            .collect();
        // The tasks sent there, and those the node had said it started: their loss counts
        // more (see MAX_LOSSES).
        let (mut sent, mut started) = (Vec::new(), Vec::new());
        for s in lost {
            if let Some(f) = self.inflight.remove(&s) {
                sent.push(f.task);
                if f.started {
                    started.push(f.task);
                }
            }
        }
        started.sort_unstable();
        self.remember_speed(link);
        let requeued = self
            .sched
            .remove_node(link, &sent, |t| started.binary_search(&t).is_ok());
        let Some(p) = self.peers.get_mut(&link) else {
            return;
        };
        p.closed = true;
        // The same node may come back on a new connection.
        if self.node_ids.get(&p.node_id) == Some(&link) {
            self.node_ids.remove(&p.node_id);
        }
        let short = &p.node[..8.min(p.node.len())];
        let mut given_up = Vec::new();
        for t in requeued {
            if self.sched.lost_too_often(t) {
                given_up.push(t);
            } else {
                push_event(
                    &mut self.events,
                    &mut self.unreported,
                    RunEvent::Notice(format!(
                        "{} lost with node {short}; it will run again",
                        self.results[t].task,
                    )),
                );
            }
        }
        let last = error
            .as_deref()
            .unwrap_or("the node said goodbye")
            .to_string();
        push_event(
            &mut self.events,
            &mut self.unreported,
            RunEvent::Disconnected {
                node: p.node.to_string(),
                addr: p.addr.to_string(),
                clean: error.is_none(),
                error,
            },
        );
        for t in given_up {
            let why = match self.sched.losses(t) {
                (started, _) if started >= MAX_LOSSES => {
                    format!("lost with its node's connection {started} times (last: {last})")
                }
                (_, unstarted) => format!(
                    "lost with its node's connection {unstarted} times before it started \
                     (last: {last})"
                ),
            };
            self.sched.give_up(t);
            self.fail_unrun(t, why);
        }
        self.skipped();
    }

    /// Records and reports tasks skipped because a dependency did not succeed: the
    /// scheduler names the dependency, so this is constant time per task.
    fn skipped(&mut self) {
        for (t, dep) in self.sched.drain_skipped() {
            let why = format!(
                "skipped: dependency {} did not succeed",
                self.results[dep].task
            );
            self.results[t].error = Some(why);
            self.finals.push_back(t);
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
            cancelled,
        } = a;
        let attempt = self.sched.attempts(task);
        if ok {
            // The node's speed for the type (the attempt's time from its start).
            self.sched.observe(task, link, took);
        } else {
            self.sched.observe_failure(task, link);
        }
        let outcome = self.sched.complete(task, ok, now);
        if let (Outcome::Succeeded, false, false) =
            (outcome, self.opts.success_events, cancelled && !ok)
        {
            // Counted, not reported one by one: the result is the record (its output
            // moved, not copied; its node the link's shared name, not cloned).
            let r = &mut self.results[task];
            // Its node is already the link's: set when this attempt was assigned, and a task
            // has one attempt in flight that is not given up on (no lookup of the link).
            debug_assert!(
                self.peers
                    .get(&link)
                    .is_some_and(|p| r.node.as_ref().is_some_and(|n| Arc::ptr_eq(n, &p.node))),
                "a result's node is its attempt's"
            );
            if r.node.is_none() {
                r.node = Some(Arc::from(""));
            }
            r.attempts = attempt;
            r.duration_ms = ms(took);
            r.status = Status::Succeeded;
            r.output = output;
            r.error = None;
            self.finals.push_back(task);
            self.unreported += 1;
            return;
        }
        let node = match self.peers.get(&link) {
            Some(p) => p.node.clone(),
            None => Arc::from(""),
        };
        if cancelled && !ok {
            self.cancelled(task, node, attempt, output, took);
            return;
        }
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
                r.output = output.clone();
                r.error = None;
            }
            Outcome::Failed => {
                r.status = Status::Failed;
                r.output = output.clone();
                r.error = Some(error.clone());
            }
            Outcome::Retry { .. } => {}
        }
        if !matches!(outcome, Outcome::Retry { .. }) {
            self.finals.push_back(task);
        }
        let r = &self.results[task];
        let (id, kind) = (r.task.clone(), r.kind.clone());
        match outcome {
            Outcome::Succeeded => {
                self.push_event(RunEvent::TaskCompleted {
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
                tracing::info!(task = %id, attempt, error = %error, retry_in = ?delay, "task attempt failed; retrying");
                self.push_event(RunEvent::TaskRetry {
                    task: id,
                    kind,
                    node,
                    attempt,
                    error,
                    delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                });
            }
            Outcome::Failed => {
                tracing::info!(task = %id, attempt, error = %error, "task failed");
                self.push_event(RunEvent::TaskFailed {
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

    /// Records and reports an attempt the run cancelled (interrupted, or stopping) that
    /// ended without success: not a failure of the task, and never retried (the scheduler
    /// is stopped, so it does not start again).
    fn cancelled(
        &mut self,
        task: usize,
        node: Arc<str>,
        attempt: u32,
        output: CompactString,
        took: Duration,
    ) {
        let r = &mut self.results[task];
        set_node(&mut r.node, &node);
        r.attempts = attempt;
        r.duration_ms = ms(took);
        r.status = Status::Cancelled;
        r.output = output.clone();
        r.error = Some(if self.interrupted {
            "cancelled: the run was interrupted".to_string()
        } else {
            "cancelled: the run stopped".to_string()
        });
        self.finals.push_back(task);
        let r = &self.results[task];
        self.push_event(RunEvent::TaskCancelled {
            task: r.task.clone(),
            kind: r.kind.clone(),
            node,
            attempt,
            output,
            duration_ms: ms(took),
        });
        // Its dependents will not run: they say why, as after a failure.
        self.skipped();
    }

    /// A type with no node that can take work gets `discovery_timeout` to find one; then
    /// its waiting tasks end as not run, with the reason.
    fn check_missing(&mut self, now: Instant) {
        if !self.sched.any_missing() {
            self.missing_since = None;
            return;
        }
        let since = *self.missing_since.get_or_insert(now);
        if now < since + self.opts.discovery_timeout {
            return;
        }
        for kind in self.sched.missing_kinds() {
            let given_up = self.sched.fail_kind(&kind);
            if !given_up.is_empty() && !self.missing_types.contains(&kind) {
                self.missing_types.push(kind.clone());
                self.push_event(RunEvent::Notice(format!(
                    "no node serves type {kind:?} (none connected within the discovery \
                     timeout, or each has capacity 0 or is leaving): {} of its tasks not run",
                    given_up.len()
                )));
            }
            let why = format!("no node serves type {kind:?}");
            for t in given_up {
                if self.sched.attempts(t) > 0 {
                    // It ran, and its attempt was lost with its node: a failure.
                    self.fail_unrun(t, why.clone());
                    continue;
                }
                let r = &mut self.results[t];
                r.status = Status::NotRun;
                r.error = Some(why.clone());
                self.finals.push_back(t);
            }
        }
        self.skipped();
        self.missing_since = None;
    }

    /// Records and reports a task that failed without a result from a node.
    fn fail_unrun(&mut self, t: usize, error: String) {
        let r = &mut self.results[t];
        r.status = Status::Failed;
        r.error = Some(error.clone());
        r.attempts = self.sched.attempts(t);
        let attempt = r.attempts;
        let node = r.node.clone().unwrap_or_else(|| Arc::from(""));
        self.finals.push_back(t);
        let task = &self.results[t];
        self.push_event(RunEvent::TaskFailed {
            task: task.task.clone(),
            kind: task.kind.clone(),
            node,
            attempt,
            ok: false,
            output: CompactString::default(),
            duration_ms: 0.0,
            exit_code: None,
            error,
        });
    }
}

/// The first names of `names`, joined, and how many more there are (a plan may have a
/// hundred thousand types, and a notice is one line).
fn name_some(names: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// What a node reported for one attempt of a task.
struct Attempt {
    ok: bool,
    output: CompactString,
    took: Duration,
    exit_code: Option<i32>,
    /// Why it failed, when the node said.
    error: Option<String>,
    /// The run cancelled it: a failure then is reported as cancelled.
    cancelled: bool,
}

/// A task's attempt timeout: its own (in its extras), or the run's `default`.
fn timeout_of(extras: &[Option<Box<Extra>>], task: usize, default: Duration) -> Duration {
    extras
        .get(task)
        .and_then(|e| e.as_ref())
        .and_then(|e| e.timeout)
        .unwrap_or(default)
}

/// Sets a result's node (a shared name: no copy).
fn set_node(slot: &mut Option<Arc<str>>, node: &Arc<str>) {
    if !slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, node)) {
        *slot = Some(node.clone());
    }
}

/// Turns the plan into one result per task (taking each task's id, and sharing one type
/// name among the tasks of a type), the extras and the scheduler. Tasks are taken from the
/// end and their buffer shrinks as it empties, so a large plan is not held twice in memory:
/// neither as results nor as the scheduler's slots, which are built in the same pass.
fn split(
    mut tasks: Vec<Task>,
    policy: Policy,
) -> (Vec<TaskResult>, Vec<Option<Box<Extra>>>, Scheduler) {
    let n = tasks.len();
    let dependents = crate::sched::dependents_of(&tasks);
    let mut sched = crate::sched::Builder::new(policy, n);
    let mut results = Vec::with_capacity(n);
    let mut extras = Vec::new();
    // The type's shared name, by the builder's number for it: the builder's lookup is
    // the only one per task.
    let mut kinds: Vec<Arc<str>> = Vec::new();
    while let Some(t) = tasks.pop() {
        let k = sched.push_front(t.kind(), t.cost(), t.retries());
        let (id, kind, extra) = t.into_parts();
        let kind = match kinds.get(k) {
            Some(name) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(kind.as_str());
                kinds.push(name.clone());
                name
            }
        };
        results.push(TaskResult {
            task: id,
            kind,
            status: Status::NotRun,
            node: None,
            attempts: 0,
            duration_ms: 0.0,
            output: CompactString::default(),
            error: None,
            resumed: false,
        });
        // The extras stay empty (no pointer per task) until a task has some.
        let extra = extra.filter(|x| !x.args.is_empty() || x.timeout.is_some());
        if let Some(x) = extra {
            if extras.is_empty() {
                extras = Vec::with_capacity(n);
                extras.resize_with(results.len() - 1, || None);
            }
            extras.push(Some(Box::new(Extra {
                args: x.args,
                timeout: x.timeout,
            })));
        } else if !extras.is_empty() {
            extras.push(None);
        }
        // Give back the consumed tail of the list every 64 Ki tasks, so the list and the
        // results never both hold a million tasks (a large list's memory is mapped on its
        // own, and shrinking it gives the pages back without a copy).
        if tasks.capacity() - tasks.len() >= 65_536 {
            tasks.shrink_to_fit();
        }
    }
    results.reverse();
    extras.reverse();
    (results, extras, sched.finish(dependents))
}

#[cfg(test)]
mod inflight_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn f(task: usize) -> InFlight {
        InFlight {
            task,
            link: task as u64 % 3,
            since: Instant::now(),
            started: false,
            cancelled: false,
            abandoned: false,
        }
    }

    /// Against a hash map of the same operations: seqs in order, most ending soon, some
    /// living long (moved out of the window), results for unknown seqs or on another link
    /// (`remove_if`), a put-back and a seq far ahead. The window stays within its bound all along.
    #[test]
    fn in_flight_attempts_are_found_as_in_a_hash_map() {
        let mut m: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
        let mut w = InFlights::default();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut next = 1u64;
        for step in 0..200_000u64 {
            let r = rnd();
            match r % 10 {
                0..=4 => {
                    let seq = if step % 5_000 == 0 {
                        next + 5_000
                    } else {
                        next
                    };
                    next = seq + 1;
                    w.insert(seq, f(seq as usize));
                    m.insert(seq, seq as usize);
                }
                5..=8 => {
                    // Mostly a recent one; a long-lived one now and then (1 in 64 never
                    // ends until the end).
                    let back = if r % 7 == 0 {
                        rnd() % 5_000
                    } else {
                        rnd() % 64
                    };
                    let seq = next.saturating_sub(1 + back);
                    if seq % 64 == 5 {
                        continue;
                    }
                    if r % 2 == 0 {
                        assert_eq!(w.remove(&seq).map(|f| f.task), m.remove(&seq));
                    } else {
                        // Removed only when on the link asked for (a result on its own
                        // link); else left where it is, in the window or out of it.
                        let link = rnd() % 3;
                        let want = m.get(&seq).filter(|_| seq % 3 == link).copied();
                        if want.is_some() {
                            m.remove(&seq);
                        }
                        let got = w.remove_if(&seq, |f| f.link == link).map(|f| f.task);
                        assert_eq!(got, want, "step {step}");
                    }
                }
                _ => {
                    let seq = rnd() % (next + 10);
                    assert_eq!(w.get(&seq).map(|f| f.task), m.get(&seq).copied());
                    if let Some(g) = w.get_mut(&seq) {
                        g.started = true;
                    }
                    assert_eq!(w.get(&seq).map(|f| f.started), m.get(&seq).map(|_| true));
                    if let Some(g) = w.get_mut(&seq) {
                        g.started = false;
                    }
                }
            }
            assert_eq!(w.len(), m.len());
            assert!(
                w.window_len() <= 2 * w.live + WINDOW_SLACK + 1,
                "step {step}"
            );
        }
        // A put-back (remove and insert of a seq behind the window's end) is found again.
        if let Some((&seq, _)) = m.iter().next() {
            let g = w.remove(&seq).unwrap();
            w.insert(seq, g);
            assert_eq!(w.get(&seq).map(|f| f.task), Some(seq as usize));
        }
        let mut all: Vec<(u64, usize)> = w.iter().map(|(s, f)| (s, f.task)).collect();
        all.sort_unstable();
        let mut want: Vec<(u64, usize)> = m.into_iter().collect();
        want.sort_unstable();
        assert_eq!(all, want);
        assert_eq!(w.values().count(), want.len());
        assert_eq!(w.iter_mut().count(), want.len());
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
