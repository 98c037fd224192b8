//! The scheduler: which task runs next, and where. No IO and no clock of its own.
//!
//! The coordinator tells it about nodes ([`Scheduler::add_node`], [`Scheduler::remove_node`],
//! [`Scheduler::drain_node`]) and results ([`Scheduler::complete`]), and asks it for work
//! ([`Scheduler::next`]). Order rules:
//!
//! - [`Order::Strict`]: task k+1 starts only after task k completed.
//! - [`Order::Type`]: within a type, file order, one at a time; types run side by side.
//! - [`Order::None`]: no order; as much at once as the nodes' capacity allows.
//!
//! Work goes to a node of the task's type that has free capacity: one whose machine is not
//! saturated ([`Scheduler::set_saturated`]), then the one learned to be
//! fastest for the type ([`Scheduler::observe`]: an exponentially weighted mean of attempt
//! time per unit of cost, per node and type, started from the type's mean; estimates are
//! compared in quarter-octave steps of 12-25%, so nodes of about one speed share work by
//! load), then the least loaded. A free node slower than the type's fastest starts the task
//! only if it would finish it sooner than the faster, busy nodes would finish it and the
//! rest of the type's ready work (finish-soonest with the queue ahead; see
//! `Scheduler::worth_waiting`); otherwise the task waits for their next result. A node
//! never measured for the type ranks first, so it is measured at once, and every
//! [`PROBE_EVERY`]th start of a type goes to another free node than the fastest, so a node
//! that became fast again is noticed. A node's capacity may change during the run
//! ([`Scheduler::set_capacity`]); a shrink cancels nothing. In
//! [`Order::None`] and [`Order::Type`], among the tasks that may start, the costliest
//! ([`Task::cost`]) starts first, ties in file order (longest-processing-time first): each
//! type's ready tasks are kept ordered by cost, so picking one is a look at the first entry.
//! A task also waits for its declared dependencies ([`Task::deps`]) to succeed; when one
//! fails for good, the tasks that depend on it (directly or not) are skipped.
//! A task that finally fails stops the run (nothing new starts; running tasks finish)
//! unless `keep_going` is set.

use std::collections::{BTreeMap, BTreeSet};

use nodes::NodeMap;
use sets::{ReadySet, SortedVec};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::Task;

/// The order rule of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Order {
    /// Task k+1 starts only after task k completed (the default).
    #[default]
    Strict,
    /// File order within each type; different types run at the same time.
    Type,
    /// No order: as fast as the nodes allow.
    None,
}

impl FromStr for Order {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(Order::Strict),
            "type" => Ok(Order::Type),
            "none" => Ok(Order::None),
            _ => Err(format!(
                "unknown order {s:?}: expected strict, type or none"
            )),
        }
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Order::Strict => "strict",
            Order::Type => "type",
            Order::None => "none",
        })
    }
}

/// Exponential back-off: `first`, doubling each time up to `max`, plus up to `jitter` of it
/// at random. One type for task retries and for the dialer's reconnects.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Backoff {
    /// The first delay. Task retries: default 100 ms.
    pub first: Duration,
    /// The largest delay (before jitter). Task retries: default 5 s.
    pub max: Duration,
    /// Random extra delay, as a fraction of the delay (0 to 1). Task retries: default 0.2.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_secs(5),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before attempt `n + 1` after `n` failures (`n` from 1), with jitter drawn
    /// deterministically from `seed` (so runs can be reproduced, and different seeds spread
    /// out).
    pub fn delay(&self, n: u32, seed: u64) -> Duration {
        let exp = n.saturating_sub(1).min(16);
        let base = self.first.saturating_mul(1 << exp).min(self.max);
        base + base.mul_f64(self.jitter.clamp(0.0, 1.0) * jitter_unit(seed, n))
    }
}

/// How the scheduler treats order and failures.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Policy {
    /// The order rule. Default strict.
    pub order: Order,
    /// Failed attempts retried per task, unless the task has its own ([`Task::retries`]).
    /// Default 0.
    pub retries: u32,
    /// The delay before each retry. Default 100 ms doubling to 5 s, plus up to 20% jitter.
    pub backoff: Backoff,
    /// Continue after a task finally failed. Default false.
    pub keep_going: bool,
}

/// A pseudo-random number in [0, 1) from a seed and attempt (splitmix64): deterministic, so
/// runs can be reproduced, and different per seed, so retries spread out.
fn jitter_unit(seed: u64, failures: u32) -> f64 {
    let mut z = seed ^ (u64::from(failures) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            order: Order::Strict,
            retries: 0,
            backoff: Backoff::default(),
            keep_going: false,
        }
    }
}

/// The scheduler's name for a node (the coordinator's link id).
pub type NodeKey = u64;

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    /// Not started, or waiting to be retried.
    Pending,
    /// Assigned to a node.
    Running(NodeKey),
    /// Finished successfully.
    Succeeded,
    /// Finished unsuccessfully (no retries left, or no node for its type).
    Failed,
    /// Will not run: a task it depends on failed.
    Skipped,
}

/// A decision to run a task on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    /// Index of the task in the plan.
    pub task: usize,
    /// The node to run it on.
    pub node: NodeKey,
    /// 1 for the first attempt.
    pub attempt: u32,
}

/// What [`Scheduler::complete`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The task succeeded.
    Succeeded,
    /// The attempt failed; the task runs again after `delay`.
    Retry {
        /// The back-off before the next attempt.
        delay: Duration,
    },
    /// The task failed for good.
    Failed,
}

/// How many times a task may be lost with its node's connection after the node said it
/// started it (which re-queues it without using a retry) before it fails for good: a task
/// whose result can never arrive, e.g. one larger than the coordinator's maximum frame, or
/// that brings its node down each time, must not run forever.
pub const MAX_LOSSES: u32 = 3;

/// How many times a task may be lost with its node's connection before the node said it
/// started it. More than [`MAX_LOSSES`]: when many nodes fail at once, a task re-queued from
/// one of them often goes to another that is already gone but not yet seen to be (seen with
/// 100 of 1,000 nodes killed: tasks lost three times this way failed the run); a task whose
/// assignment itself brings its node down still ends.
pub const MAX_UNSTARTED_LOSSES: u32 = 10;

/// A task's state (one per task of the plan: kept to 40 bytes, the dependencies it waits
/// for counted apart, in [`Scheduler::waiting`], only when the plan has any).
#[derive(Debug)]
struct Slot {
    /// Its type's number (a plan has fewer than 2^32 types, as it has fewer tasks).
    kind: u32,
    /// Times the task was lost with its node's connection after it started there.
    losses: u16,
    /// Times it was lost before its node said it started it.
    unstarted_losses: u16,
    status: TaskStatus,
    attempts: u32,
    failures: u32,
    /// The task's cost (at least 1).
    cost: u32,
    /// Failed attempts retried: the task's own, or the policy's.
    retries: u32,
}

/// A ready task's place in its type's ready set: costliest first, then file order, in one
/// word (`!cost` in the high half, the task's index in the low half; a plan has fewer than
/// 2^32 tasks), so the set is as small as one of indexes.
type ReadyKey = u64;

/// The [`ReadyKey`] of task `task` of cost `cost`.
fn ready_key(cost: u32, task: usize) -> ReadyKey {
    (u64::from(!cost) << 32) | (task as u64 & u64::from(u32::MAX))
}

/// The task of a [`ReadyKey`].
fn ready_task(key: ReadyKey) -> usize {
    (key & u64::from(u32::MAX)) as usize
}

/// Weight of a new measurement in a node's speed estimate.
pub const SPEED_ALPHA: f64 = 0.3;

/// One start in this many, of a type with several free nodes, goes to another node than the
/// fastest (a probe).
pub const PROBE_EVERY: u32 = 16;

/// A speed estimate's rank: 0 for a node never measured, else its quarter-octave step, so
/// lower is faster. Estimates in one step (from 1 to 1.25, 1.25 to 1.5, 1.5 to 1.75 and
/// 1.75 to 2 times a power of two microseconds per unit of cost) rank the same, so nodes of
/// about one speed still share work by load. The step is read off the number's bits (its
/// exponent and two leading mantissa bits): no logarithm per measurement.
fn speed_rank(est: Option<f64>) -> u32 {
    match est {
        None => 0,
        Some(secs) => {
            // At least 1 µs (positive and normal, so the bits order as the numbers do); a
            // NaN estimate ranks last.
            let us = secs * 1e6;
            let us = if us.is_nan() { f64::MAX } else { us.max(1.0) };
            1 + (us.to_bits() >> 50) as u32
        }
    }
}

#[derive(Debug)]
struct NodeSlot {
    kinds: Vec<usize>,
    /// Per entry of `kinds`, the node's estimated seconds per unit of cost (none until it
    /// completed a task of the type).
    est: Vec<Option<f64>>,
    /// Per entry of `kinds`, the speed rank of `est` ([`speed_rank`]), kept with it so that
    /// a start or a result, which move the node in its kinds' free sets, do no float work.
    ranks: Vec<u32>,
    /// Per entry of `kinds`, the running count its entry in the kind's free set is keyed
    /// with ([`UNKEYED`]: it has none), and whether the node waits in the kind's `dirty`
    /// list to be keyed again (see [`Scheduler::free`]).
    keyed: Vec<(u32, bool)>,
    capacity: u32,
    running: u32,
    /// Of `running`, the slots held without a task ([`Scheduler::hold`]).
    held: u32,
    /// The summed cost of the tasks running there (not of slots held without a task).
    work: u64,
    draining: bool,
    /// The node's machine is saturated (its load above its cores): it sorts after every
    /// node that is not ([`Scheduler::set_saturated`]).
    saturated: bool,
}

impl Slot {
    /// Its type's number.
    #[inline]
    fn kind(&self) -> usize {
        self.kind as usize
    }
}

impl NodeSlot {
    /// Whether the node takes new work now (and so is in its kinds' `free` sets).
    fn is_free(&self) -> bool {
        !self.draining && self.running < self.capacity
    }

    /// Whether the node is in its kinds' indexes (`serving`, `ranks`).
    fn is_listed(&self) -> bool {
        !self.draining && self.capacity > 0
    }

    /// Its rank for its `j`th kind.
    fn rank(&self, j: usize) -> u32 {
        self.ranks.get(j).copied().unwrap_or(0)
    }

    /// Sets its estimate for its `j`th kind (and the rank kept with it).
    fn set_est(&mut self, j: usize, est: Option<f64>) {
        if let (Some(e), Some(r)) = (self.est.get_mut(j), self.ranks.get_mut(j)) {
            *e = est;
            *r = speed_rank(est);
        }
    }

    /// Its key in the free set of its `j`th kind with `running` tasks running.
    fn key_at(&self, j: usize, node: NodeKey, running: u32) -> FreeKey {
        FreeKey {
            word: self.word(j),
            running,
            capacity: self.capacity,
            node,
        }
    }

    /// The running count its entry in its `j`th kind's free set should be keyed with now
    /// ([`UNKEYED`]: it should have none).
    fn due(&self) -> u32 {
        if self.is_listed() && self.is_free() {
            self.running
        } else {
            UNKEYED
        }
    }

    /// The first word of its key in the free set of its `j`th kind.
    fn word(&self, j: usize) -> u32 {
        u32::from(self.saturated) << 31 | self.rank(j)
    }
}

/// [`NodeSlot::keyed`] of a kind in whose free set the node has no entry.
const UNKEYED: u32 = u32::MAX;

/// A free node's place in its type's free set: not saturated first (the top bit of `word`),
/// then fastest (its rank, below 2^15, the rest of `word`), then least loaded
/// (`running / capacity`, ordered exactly by cross-multiplication), then lowest key.
#[derive(Debug, Clone, Copy)]
struct FreeKey {
    word: u32,
    running: u32,
    capacity: u32,
    node: NodeKey,
}

impl FreeKey {
    /// The speed rank in its first word.
    fn rank(&self) -> u32 {
        self.word & !(1 << 31)
    }
}

impl Ord for FreeKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Loads `a / b` and `c / d` (both below 2^32) compare as `a x d` and `c x b`, which
        // fit in 64 bits: exact, no rounding.
        self.word
            .cmp(&other.word)
            .then_with(|| {
                (u64::from(self.running) * u64::from(other.capacity))
                    .cmp(&(u64::from(other.running) * u64::from(self.capacity)))
            })
            .then(self.node.cmp(&other.node))
    }
}

impl PartialOrd for FreeKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for FreeKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for FreeKey {}

/// The scheduler of one run.
#[derive(Debug)]
pub struct Scheduler {
    policy: Policy,
    kinds: Vec<String>,
    /// Each type's index in `kinds`.
    kind_index: hashbrown::HashMap<String, usize>,
    slots: Vec<Slot>,
    /// Per kind, its tasks in file order, and the index of its first unfinished one.
    /// (Task indexes as `u32`: a plan has fewer than 2^32 tasks, see [`ReadyKey`].)
    kind_tasks: Vec<Vec<u32>>,
    kind_cursor: Vec<usize>,
    /// Per kind, tasks ready to start, costliest first (then in file order).
    ready: Vec<ReadySet>,
    /// Tasks waiting for their retry time.
    delayed: BTreeMap<(Instant, usize), ()>,
    /// When each task in `delayed` becomes ready (its key there), so that one can be taken
    /// out without a scan; small, unlike a field in every task's slot.
    retry_at: std::collections::HashMap<usize, Instant>,
    /// Per task that failed an attempt, the node of its last failed attempt: a retry
    /// prefers another one. Small, unlike a field in every task's slot.
    avoided: std::collections::HashMap<usize, NodeKey>,
    running_kind: Vec<u32>,
    running_total: usize,
    /// The first task not finished (strict order).
    cursor: usize,
    finished: usize,
    stopped: bool,
    /// By link id, in slots (see [`nodes::NodeMap`]): reached by slot from the dirty lists,
    /// and without hashing again when a node is reached twice in a row.
    nodes: NodeMap<NodeSlot>,
    /// Per kind, the nodes serving it that take new work, fastest first, then least loaded
    /// (ties: lowest key). Picking a node is a look at the first entry, whatever the number
    /// of nodes.
    ///
    /// A start or a result does not move the node in every kind's set at once: it puts the
    /// node on each of its kinds' `dirty` lists (once), and a kind's set is brought up to
    /// date from its list when it is next looked at ([`Scheduler::settle`]). A kind nobody
    /// asks for costs nothing per task, and many results in a row move a node once. Between
    /// looks, a node's entry is keyed as [`NodeSlot::keyed`] says.
    free: Vec<SortedVec<FreeKey>>,
    /// Per kind, the nodes (their slots in `nodes`) whose entry in its free set may be out
    /// of date.
    dirty: Vec<Vec<u32>>,
    /// Every task has the same cost: in order none the first type with a startable task
    /// wins at once (no look at the other types).
    uniform_cost: bool,
    /// How many lost nodes' tasks were looked for among every task (the caller's list
    /// missed some): a count for tests.
    #[cfg(test)]
    full_scans: u32,
    /// Per kind, the mean time per unit of cost over every node (what a node's estimate
    /// starts from), and how many starts since the last probe.
    kind_speed: Vec<Option<f64>>,
    since_probe: Vec<u32>,
    /// Per kind, how many nodes that are not draining serve it.
    serving: Vec<u32>,
    /// Per kind, the ranks of the nodes that serve it (free or not), fastest first: a free
    /// node of the best rank starts a task at once; a slower one only when the faster ones
    /// would not finish it sooner ([`Scheduler::worth_waiting`]).
    ranks: Vec<BTreeSet<(u32, NodeKey)>>,
    /// Per kind, the summed cost of its ready tasks (the queue the faster nodes face).
    ready_work: Vec<u64>,
    /// For each task, the tasks that depend on it; empty when no task has dependencies
    /// (the usual case, which then costs nothing per task).
    dependents: Vec<Vec<usize>>,
    /// For each task, its dependencies not yet succeeded; empty, as `dependents`, when no
    /// task has dependencies.
    waiting: Vec<u32>,
    /// Tasks skipped since the last [`Scheduler::drain_skipped`], each with the dependency
    /// whose failure (or skip) skipped it.
    skipped: Vec<(usize, usize)>,
}

/// Keys node `n`'s entry in `free` (the set of its `j`th kind) with its state now: moved,
/// added or taken out.
fn rekey(free: &mut SortedVec<FreeKey>, n: &mut NodeSlot, j: usize, node: NodeKey) {
    let (keyed, due) = (n.keyed[j].0, n.due());
    if keyed == due {
        return;
    }
    // Found by the node alone: it has one entry in the set, keyed as `keyed` says.
    let same = |e: &FreeKey| e.node == node;
    if due == UNKEYED {
        free.remove_by(&n.key_at(j, node, keyed), same);
    } else if keyed == UNKEYED {
        free.insert(n.key_at(j, node, due));
    } else {
        // The node moves a few places (its load changed by a few since it was keyed).
        free.replace(&n.key_at(j, node, keyed), n.key_at(j, node, due), same);
    }
    n.keyed[j].0 = due;
}

/// Takes node `n`'s entry out of `free` (the set of its `j`th kind), before a change of
/// the other parts of its key (rank, saturation, capacity) or of its listing.
fn unkey(free: &mut SortedVec<FreeKey>, n: &mut NodeSlot, j: usize, node: NodeKey) {
    let keyed = n.keyed[j].0;
    if keyed != UNKEYED {
        free.remove_by(&n.key_at(j, node, keyed), |e: &FreeKey| e.node == node);
        n.keyed[j].0 = UNKEYED;
    }
}

fn is_final(s: TaskStatus) -> bool {
    matches!(
        s,
        TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Skipped
    )
}

/// For each task of `tasks`, the tasks that depend on it (one entry per dependency found);
/// empty when no task has dependencies (the usual case, which then costs nothing per task).
pub fn dependents_of(tasks: &[Task]) -> Vec<Vec<usize>> {
    let mut dependents = Vec::new();
    if tasks.iter().any(|t| !t.deps().is_empty()) {
        let index = crate::task::IdIndex::build(tasks);
        dependents = vec![Vec::new(); tasks.len()];
        for (i, t) in tasks.iter().enumerate() {
            for d in t.deps() {
                if let Some(j) = index.get(tasks, d) {
                    dependents[j].push(i);
                }
            }
        }
    }
    dependents
}

/// Builds a [`Scheduler`] one task at a time: in file order ([`Builder::push_back`]), or
/// **last task first** ([`Builder::push_front`], the way a run took its plan apart from the
/// end, giving the list's memory back as it went), one way for a whole builder.
#[derive(Debug)]
pub struct Builder {
    policy: Policy,
    /// Types in order of first appearance (from the end, when built last task first).
    kinds: Vec<String>,
    /// Slots, in the order pushed.
    slots: Vec<Slot>,
    /// Each type's index in `kinds` (one lookup per task, whatever the number of types).
    kind_index: hashbrown::HashMap<String, usize>,
    /// Per type, its tasks' positions in the order pushed, ascending.
    kind_tasks: Vec<Vec<u32>>,
    first_cost: Option<u32>,
    uniform_cost: bool,
    /// Tasks were pushed last task first.
    from_end: bool,
}

impl Builder {
    /// A builder for a plan of about `n` tasks.
    pub fn new(policy: Policy, n: usize) -> Builder {
        Builder {
            policy,
            kinds: Vec::new(),
            kind_index: hashbrown::HashMap::default(),
            slots: Vec::with_capacity(n),
            kind_tasks: Vec::new(),
            first_cost: None,
            uniform_cost: true,
            from_end: false,
        }
    }

    /// The task before the ones pushed so far (the plan's last task first), of type `kind`,
    /// with its cost and its own retries. Returns the type's number among the types pushed
    /// so far (0 for the first one seen, and so on; [`Builder::finish`] renumbers them in
    /// file order), so the caller need not look the type up again. Not to be mixed with
    /// [`Builder::push_back`] in one builder.
    pub fn push_front(&mut self, kind: &str, cost: u32, retries: Option<u32>) -> usize {
        debug_assert!(
            self.from_end || self.slots.is_empty(),
            "a builder is filled one way"
        );
        self.from_end = true;
        self.push(kind, cost, retries)
    }

    /// The task after the ones pushed so far (the plan in file order), of type `kind`, with
    /// its cost and its own retries. Returns the type's number (types are numbered in order
    /// of first appearance: the number stays the scheduler's), so the caller need not look
    /// the type up again. Not to be mixed with [`Builder::push_front`] in one builder.
    pub fn push_back(&mut self, kind: &str, cost: u32, retries: Option<u32>) -> usize {
        debug_assert!(!self.from_end, "a builder is filled one way");
        self.push(kind, cost, retries)
    }

    fn push(&mut self, kind: &str, cost: u32, retries: Option<u32>) -> usize {
        let first = *self.first_cost.get_or_insert(cost);
        self.uniform_cost &= cost == first;
        let k = match self.kind_index.get(kind) {
            Some(&k) => k,
            None => {
                let k = self.kinds.len();
                self.kinds.push(kind.to_owned());
                self.kind_index.insert(kind.to_owned(), k);
                self.kind_tasks.push(Vec::new());
                k
            }
        };
        self.kind_tasks[k].push(self.slots.len() as u32);
        self.slots.push(Slot {
            kind: k as u32,
            status: TaskStatus::Pending,
            attempts: 0,
            losses: 0,
            unstarted_losses: 0,
            failures: 0,
            cost: cost.max(1),
            retries: retries.unwrap_or(self.policy.retries),
        });
        k
    }

    /// The scheduler of the tasks pushed; `dependents` as [`dependents_of`] gives them for
    /// the whole plan (task indexes in file order).
    pub fn finish(self, dependents: Vec<Vec<usize>>) -> Scheduler {
        let Builder {
            policy,
            kinds,
            mut slots,
            mut kind_tasks,
            uniform_cost,
            from_end,
            ..
        } = self;
        if !from_end {
            // Already in file order, types numbered by first appearance.
            for ts in &mut kind_tasks {
                // Each list grew by doubling: up to half of it is spare.
                ts.shrink_to_fit();
            }
            return Scheduler::from_parts(
                policy,
                kinds,
                slots,
                kind_tasks,
                uniform_cost,
                dependents,
            );
        }
        let n = slots.len();
        slots.reverse();
        // Positions from the end become file indexes; types are put in order of first
        // appearance in the file.
        let mut order: Vec<(usize, usize)> = kind_tasks
            .iter()
            .enumerate()
            .map(|(k, ts)| (ts.last().map_or(0, |&r| n - 1 - r as usize), k))
            .collect();
        order.sort_unstable();
        let mut renumber = vec![0u32; kinds.len()];
        let mut new_kinds = Vec::with_capacity(kinds.len());
        let mut new_kind_tasks = Vec::with_capacity(kinds.len());
        let mut kinds: Vec<Option<String>> = kinds.into_iter().map(Some).collect();
        let mut kind_tasks: Vec<Option<Vec<u32>>> = kind_tasks.into_iter().map(Some).collect();
        for (new, &(_, old)) in order.iter().enumerate() {
            renumber[old] = new as u32;
            new_kinds.push(kinds[old].take().unwrap_or_default());
            let mut ts = kind_tasks[old].take().unwrap_or_default();
            ts.reverse();
            for t in &mut ts {
                *t = (n - 1 - *t as usize) as u32;
            }
            // Each list grew by doubling: up to half of it is spare.
            ts.shrink_to_fit();
            new_kind_tasks.push(ts);
        }
        for s in &mut slots {
            s.kind = renumber[s.kind()];
        }
        Scheduler::from_parts(
            policy,
            new_kinds,
            slots,
            new_kind_tasks,
            uniform_cost,
            dependents,
        )
    }
}

impl Scheduler {
    /// A scheduler for `tasks` (in file order).
    pub fn new(tasks: &[Task], policy: Policy) -> Self {
        let dependents = dependents_of(tasks);
        let mut b = Builder::new(policy, tasks.len());
        for t in tasks {
            b.push_back(t.kind(), t.cost(), t.retries());
        }
        b.finish(dependents)
    }

    fn from_parts(
        policy: Policy,
        kinds: Vec<String>,
        slots: Vec<Slot>,
        kind_tasks: Vec<Vec<u32>>,
        uniform_cost: bool,
        dependents: Vec<Vec<usize>>,
    ) -> Self {
        // Counted only when some task has dependencies (no memory per task otherwise).
        let mut waiting = Vec::new();
        if !dependents.is_empty() {
            waiting = vec![0u32; slots.len()];
            for ds in &dependents {
                for &i in ds {
                    waiting[i] += 1;
                }
            }
        }
        let ready: Vec<ReadySet> = kind_tasks
            .iter()
            .map(|ts| {
                ReadySet::from_keys(
                    ts.iter()
                        .map(|&t| t as usize)
                        .filter(|&t| waiting.get(t).is_none_or(|&w| w == 0))
                        .map(|t| ready_key(slots[t].cost, t))
                        .collect(),
                )
            })
            .collect();
        let ready_work = ready
            .iter()
            .map(|r| {
                r.iter()
                    .map(|key| u64::from(slots[ready_task(key)].cost))
                    .sum()
            })
            .collect();
        let kind_index = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), i))
            .collect();
        Scheduler {
            policy,
            kind_index,
            running_kind: vec![0; kinds.len()],
            kind_cursor: vec![0; kinds.len()],
            free: vec![SortedVec::default(); kinds.len()],
            dirty: vec![Vec::new(); kinds.len()],
            kind_speed: vec![None; kinds.len()],
            uniform_cost,
            #[cfg(test)]
            full_scans: 0,
            since_probe: vec![0; kinds.len()],
            serving: vec![0; kinds.len()],
            ranks: vec![BTreeSet::new(); kinds.len()],
            ready_work,
            kinds,
            slots,
            kind_tasks,
            ready,
            delayed: BTreeMap::new(),
            retry_at: std::collections::HashMap::new(),
            avoided: std::collections::HashMap::new(),
            running_total: 0,
            cursor: 0,
            finished: 0,
            stopped: false,
            nodes: NodeMap::default(),
            dependents,
            waiting,
            skipped: Vec::new(),
        }
    }

    /// The node `task`'s last failed attempt ran on, if any.
    fn avoid_of(&self, task: usize) -> Option<NodeKey> {
        if self.avoided.is_empty() {
            None
        } else {
            self.avoided.get(&task).copied()
        }
    }

    fn ready_key(&self, task: usize) -> ReadyKey {
        ready_key(self.slots[task].cost, task)
    }

    fn ready_insert(&mut self, task: usize) {
        let (key, k) = (self.ready_key(task), self.slots[task].kind());
        if self.ready[k].insert(key) {
            self.ready_work[k] += u64::from(self.slots[task].cost);
        }
    }

    fn ready_remove(&mut self, task: usize) {
        let (key, k) = (self.ready_key(task), self.slots[task].kind());
        if self.ready[k].remove(key) {
            self.ready_work[k] -= u64::from(self.slots[task].cost);
        }
    }

    fn is_ready(&self, task: usize) -> bool {
        self.ready[self.slots[task].kind()].contains(self.ready_key(task))
    }

    /// Tasks skipped (a dependency failed) since the last call, each with the dependency
    /// that did not succeed, so that no caller has to search for it.
    pub fn drain_skipped(&mut self) -> Vec<(usize, usize)> {
        std::mem::take(&mut self.skipped)
    }

    /// Marks a task as already succeeded before the run (e.g. from a journal): it will not
    /// run, and its dependents may. Only a pending task that never ran can be marked.
    pub fn mark_done(&mut self, task: usize) {
        if self.status(task) == Some(TaskStatus::Pending) && self.attempts(task) == 0 {
            self.ready_remove(task);
            self.finish(task, TaskStatus::Succeeded);
        }
    }

    /// The task types the plan needs, in order of first appearance.
    pub fn kinds(&self) -> &[String] {
        &self.kinds
    }

    /// A task's status.
    pub fn status(&self, task: usize) -> Option<TaskStatus> {
        self.slots.get(task).map(|s| s.status)
    }

    /// How many attempts a task has had.
    pub fn attempts(&self, task: usize) -> u32 {
        self.slots.get(task).map_or(0, |s| s.attempts)
    }

    /// A node joined, serving `types` with `capacity` tasks at once.
    pub fn add_node(&mut self, node: NodeKey, types: &[String], capacity: u32) {
        let mut kinds: Vec<usize> = types
            .iter()
            .filter_map(|t| self.kind_index.get(t.as_str()).copied())
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        if let Some(mut old) = self.nodes.remove(&node) {
            self.unlist(node, &mut old);
        }
        let slot = NodeSlot {
            est: vec![None; kinds.len()],
            ranks: vec![speed_rank(None); kinds.len()],
            keyed: vec![(UNKEYED, false); kinds.len()],
            kinds,
            capacity,
            running: 0,
            held: 0,
            work: 0,
            draining: false,
            saturated: false,
        };
        let mut slot = slot;
        self.list(node, &mut slot);
        self.nodes.insert(node, slot);
        // A dirty list holds each node once, plus the slots of nodes that left since the
        // kind was last looked at: nodes that come and go many times must not grow the list
        // of a kind nobody asks for without bound.
        for k in 0..self.dirty.len() {
            if self.dirty[k].len() > 2 * self.nodes.len() + 16 {
                self.settle(k);
            }
        }
    }

    /// Adds a node to the per-kind indexes (call with the node's current state).
    fn list(&mut self, node: NodeKey, n: &mut NodeSlot) {
        // A node that can take no work (capacity 0) serves nothing: its types count as
        // missing, so the run's wait for them is bounded.
        if !n.is_listed() {
            return;
        }
        for j in 0..n.kinds.len() {
            let k = n.kinds[j];
            self.serving[k] += 1;
            self.ranks[k].insert((n.rank(j), node));
            rekey(&mut self.free[k], n, j, node);
        }
    }

    /// Removes a node from the per-kind indexes (call with the state it was listed with).
    fn unlist(&mut self, node: NodeKey, n: &mut NodeSlot) {
        if !n.is_listed() {
            return;
        }
        for j in 0..n.kinds.len() {
            let k = n.kinds[j];
            self.serving[k] -= 1;
            self.ranks[k].remove(&(n.rank(j), node));
            unkey(&mut self.free[k], n, j, node);
        }
    }

    /// Moves a node's running count one up (`up`) or down (saturating at 0), keeping the
    /// per-kind free sets in order.
    fn set_running(&mut self, node: NodeKey, up: bool) {
        self.set_running_with(node, up, 0);
    }

    /// [`Scheduler::set_running`] for a task of `cost` (0: a slot held without a task),
    /// counted in or out of the node's running work in the same lookup.
    fn set_running_with(&mut self, node: NodeKey, up: bool, cost: u64) {
        let Some((slot, n)) = self.nodes.get_mut_slot(&node) else {
            return;
        };
        n.work = if up {
            n.work + cost
        } else {
            n.work.saturating_sub(cost)
        };
        let (was_free, before) = (n.is_free(), n.running);
        n.running = if up {
            before + 1
        } else {
            before.saturating_sub(1)
        };
        // A draining node (or one of capacity 0) is in no free set; nor is one full before
        // and after; a node whose count stayed at 0 does not move.
        if !n.is_listed() || before == n.running || !(was_free || n.is_free()) {
            return;
        }
        for j in 0..n.kinds.len() {
            if !n.keyed[j].1 {
                n.keyed[j].1 = true;
                self.dirty[n.kinds[j]].push(slot);
            }
        }
    }

    /// Brings `kind`'s free set up to date: the nodes on its dirty list are keyed with their
    /// state now (see [`Scheduler::free`]).
    fn settle(&mut self, kind: usize) {
        if self.dirty[kind].is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty[kind]);
        for slot in dirty.drain(..) {
            // A slot given back (its node is in no set), or reused by a node that was put
            // on the list itself if it had to be: nothing more to do.
            let Some((node, n)) = self.nodes.at_mut(slot) else {
                continue;
            };
            let Some(j) = n.kinds.iter().position(|&x| x == kind) else {
                continue;
            };
            // A node listed twice (its slot reused) is keyed once.
            if std::mem::replace(&mut n.keyed[j].1, false) {
                rekey(&mut self.free[kind], n, j, node);
            }
        }
        // The list's memory is kept for the next round.
        self.dirty[kind] = dirty;
    }

    /// Counts one more slot of `node` as busy without a task: an attempt the run gave up on
    /// (timed out) still runs there until the node confirms it ended. See
    /// [`Scheduler::release`].
    pub fn hold(&mut self, node: NodeKey) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.held += 1;
        }
        self.set_running(node, true);
    }

    /// Frees a slot taken by [`Scheduler::hold`] (the node confirmed the attempt ended).
    pub fn release(&mut self, node: NodeKey) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.held = n.held.saturating_sub(1);
        }
        self.set_running(node, false);
    }

    /// A node now takes `capacity` tasks at once (it grew or shrank its capacity). A shrink
    /// cancels nothing: the node takes no new work until fewer than `capacity` run there.
    /// Capacity 0 makes its types count as missing, as at the handshake.
    pub fn set_capacity(&mut self, node: NodeKey, capacity: u32) {
        self.relist(node, |n| n.capacity = capacity);
    }

    /// A node's machine is saturated (its load above its cores) or no longer is: a saturated
    /// node gets work only when no other node of the type has a free slot.
    pub fn set_saturated(&mut self, node: NodeKey, saturated: bool) {
        self.relist(node, |n| n.saturated = saturated);
    }

    /// Changes a node's state with `f`, keeping the per-kind indexes in order.
    fn relist(&mut self, node: NodeKey, f: impl FnOnce(&mut NodeSlot)) {
        let Some(mut n) = self.nodes.remove(&node) else {
            return;
        };
        self.unlist(node, &mut n);
        f(&mut n);
        self.list(node, &mut n);
        self.nodes.insert(node, n);
    }

    /// A node takes no new work (it said goodbye); its running tasks may still complete.
    pub fn drain_node(&mut self, node: NodeKey) {
        let Some(mut n) = self.nodes.remove(&node) else {
            return;
        };
        self.unlist(node, &mut n);
        n.draining = true;
        self.nodes.insert(node, n);
    }

    /// A node is gone. Its running tasks become ready again (without using a retry) and are
    /// returned, in task order; each counts a loss, one before it started unless
    /// `started(task)`. `running_here` names the tasks the caller knows were sent to the
    /// node (its attempts in flight there; others in it are ignored): they are checked
    /// against the node's count, and only when some are missing is every task looked at,
    /// so a lost node costs what it ran, not the size of the plan.
    pub fn remove_node(
        &mut self,
        node: NodeKey,
        running_here: &[usize],
        started: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let Some(mut n) = self.nodes.remove(&node) else {
            return Vec::new();
        };
        self.unlist(node, &mut n);
        if n.running == 0 {
            return Vec::new();
        }
        let here = |slots: &[Slot], i: usize| {
            slots
                .get(i)
                .is_some_and(|s| s.status == TaskStatus::Running(node))
        };
        let mut lost: Vec<usize> = running_here
            .iter()
            .copied()
            .filter(|&i| here(&self.slots, i))
            .collect();
        lost.sort_unstable();
        lost.dedup();
        if lost.len() != n.running.saturating_sub(n.held) as usize {
            #[cfg(test)]
            {
                self.full_scans += 1;
            }
            lost = (0..self.slots.len())
                .filter(|&i| here(&self.slots, i))
                .collect();
        }
        for &t in &lost {
            let slot = &mut self.slots[t];
            if started(t) {
                slot.losses = slot.losses.saturating_add(1);
            } else {
                slot.unstarted_losses = slot.unstarted_losses.saturating_add(1);
            }
            self.unrun(t);
        }
        lost
    }

    /// How many times `task` was lost with its node: `(after it started, before)` (see
    /// [`MAX_LOSSES`] and [`MAX_UNSTARTED_LOSSES`]).
    pub fn losses(&self, task: usize) -> (u32, u32) {
        self.slots.get(task).map_or((0, 0), |s| {
            (u32::from(s.losses), u32::from(s.unstarted_losses))
        })
    }

    /// Whether `task` was lost with its node too often to run again.
    pub fn lost_too_often(&self, task: usize) -> bool {
        let (started, unstarted) = self.losses(task);
        started >= MAX_LOSSES || unstarted >= MAX_UNSTARTED_LOSSES
    }

    /// An assignment never reached its node: make the task ready again, no retry used.
    pub fn requeue(&mut self, task: usize) {
        if let Some(TaskStatus::Running(node)) = self.status(task) {
            self.set_running_with(node, false, u64::from(self.slots[task].cost));
            self.unrun(task);
            // The attempt never started: the next one has its number.
            self.slots[task].attempts -= 1;
        }
    }

    fn unrun(&mut self, task: usize) {
        let slot = &mut self.slots[task];
        slot.status = TaskStatus::Pending;
        self.running_total -= 1;
        self.running_kind[slot.kind()] -= 1;
        self.ready_insert(task);
    }

    /// Types with unfinished tasks and no node that can take them.
    pub fn missing_kinds(&self) -> Vec<String> {
        if !self.any_missing() {
            return Vec::new();
        }
        (0..self.kinds.len())
            .filter(|&k| self.is_missing(k))
            .map(|k| self.kinds[k].clone())
            .collect()
    }

    /// Whether [`Scheduler::missing_kinds`] is not empty (without building it).
    pub fn any_missing(&self) -> bool {
        (0..self.kinds.len()).any(|k| self.is_missing(k))
    }

    fn is_missing(&self, k: usize) -> bool {
        self.serving[k] == 0 && self.kind_cursor[k] < self.kind_tasks[k].len()
    }

    /// Fails every unfinished, not running task of `kind` (e.g. no node serves it).
    /// Returns the tasks failed.
    pub fn fail_kind(&mut self, kind: &str) -> Vec<usize> {
        let Some(&k) = self.kind_index.get(kind) else {
            return Vec::new();
        };
        let victims: Vec<usize> = self.kind_tasks[k]
            .iter()
            .map(|&t| t as usize)
            .filter(|&t| self.slots[t].status == TaskStatus::Pending)
            .collect();
        // Giving one up may skip others of the list (its dependents): those are skipped,
        // not given up, and are not returned.
        let mut given_up = Vec::with_capacity(victims.len());
        for t in victims {
            if self.slots[t].status == TaskStatus::Pending {
                self.give_up(t);
                given_up.push(t);
            }
        }
        given_up
    }

    /// Fails a pending task for good (skipping its dependents); without
    /// [`Policy::keep_going`] nothing new starts after it. Does nothing to a task that is not
    /// pending.
    pub fn give_up(&mut self, task: usize) {
        if self.status(task) != Some(TaskStatus::Pending) {
            return;
        }
        self.ready_remove(task);
        if let Some(at) = self.retry_at.remove(&task) {
            self.delayed.remove(&(at, task));
        }
        self.finish(task, TaskStatus::Failed);
        if !self.policy.keep_going {
            self.stopped = true;
        }
    }

    /// Stops starting new work (interrupt); running tasks may still complete.
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// Whether nothing more will run: everything finished, or stopped with nothing running.
    pub fn is_finished(&self) -> bool {
        self.running_total == 0 && (self.stopped || self.finished == self.slots.len())
    }

    /// How many tasks are running.
    pub fn running(&self) -> usize {
        self.running_total
    }

    /// When a delayed retry becomes ready (never once stopped: nothing new starts then).
    pub fn next_wakeup(&self) -> Option<Instant> {
        if self.stopped {
            return None;
        }
        self.delayed.keys().next().map(|(at, _)| *at)
    }

    /// The next task to start now, if any, marked running on its node.
    pub fn next(&mut self, now: Instant) -> Option<Dispatch> {
        if self.stopped {
            return None;
        }
        while let Some((&(at, t), _)) = self.delayed.iter().next() {
            if at > now {
                break;
            }
            self.delayed.remove(&(at, t));
            self.retry_at.remove(&t);
            self.ready_insert(t);
        }
        match self.policy.order {
            Order::Strict => {
                if self.running_total > 0 || self.cursor >= self.slots.len() {
                    return None;
                }
                let t = self.cursor;
                if !self.is_ready(t) {
                    return None;
                }
                let node = self.place(t, u64::from(self.slots[t].cost))?;
                self.start(t, node)
            }
            Order::Type => {
                // Each idle type's next task in file order, if ready: the costliest of those
                // that has a node starts.
                let mut best: Option<(ReadyKey, NodeKey)> = None;
                for k in 0..self.kinds.len() {
                    if self.running_kind[k] > 0 {
                        continue;
                    }
                    let Some(first) = self.kind_tasks[k].get(self.kind_cursor[k]) else {
                        continue;
                    };
                    let first = *first as usize;
                    let key = self.ready_key(first);
                    if best.is_some_and(|(b, _)| b <= key) || !self.ready[k].contains(key) {
                        continue;
                    }
                    if let Some(node) = self.place(first, u64::from(self.slots[first].cost)) {
                        best = Some((key, node));
                    }
                }
                let (key, node) = best?;
                self.start(ready_task(key), node)
            }
            Order::None => {
                // Each type's costliest ready task: the costliest of those that has a node
                // starts (one look per type, whatever the number of tasks; with one cost for
                // all, the first type that can start one, as before costs).
                // The node found for a type is kept, so it is looked up once.
                let mut best: Option<(ReadyKey, NodeKey)> = None;
                for k in 0..self.kinds.len() {
                    let Some(key) = self.ready[k].first() else {
                        continue;
                    };
                    if best.is_some_and(|(b, _)| b <= key) {
                        continue;
                    }
                    if let Some(node) = self.place(ready_task(key), self.ready_work[k]) {
                        best = Some((key, node));
                        if self.uniform_cost {
                            break;
                        }
                    }
                }
                let (key, node) = best?;
                self.start(ready_task(key), node)
            }
        }
    }

    /// Where `task` would start now: the first free node of its type (see
    /// [`Scheduler::peek_node`]), unless faster nodes that are busy would finish it sooner
    /// with `queued` units of cost of its type waiting (see [`Scheduler::worth_waiting`]).
    fn place(&mut self, task: usize, queued: u64) -> Option<NodeKey> {
        let (rank, node) = self.peek_node(self.slots[task].kind(), self.avoid_of(task))?;
        let slot = &self.slots[task];
        // The fast path: the free node is of the type's best rank (no lookup of the node).
        let fastest = self.ranks[slot.kind()]
            .first()
            .is_none_or(|&(best, _)| rank <= best);
        if !fastest && self.worth_waiting(slot.kind(), node, slot.cost, queued) {
            return None;
        }
        Some(node)
    }

    /// Whether a task of `kind` and `cost` should wait for a node faster than the free
    /// `node` rather than start there: finish-soonest placement with the queue ahead.
    ///
    /// Starting on `node` ends the task after `est(node) x cost`. The nodes faster than it
    /// share `queued` units of cost of the type's ready work (this task among them) plus
    /// half the work they are running (on average a running task is half done): at their
    /// summed speed (capacity / estimate each) that is `(queued + running / 2) / speed`
    /// seconds. When that is shorter, the faster nodes would finish this task (and the rest)
    /// before `node` could: the task waits, and the next result from them starts it. A node
    /// of the type's best rank, one never measured (rank 0) and a node with no estimate
    /// never wait: the fast path is one look at the type's best rank.
    fn worth_waiting(&self, kind: usize, node: NodeKey, cost: u32, queued: u64) -> bool {
        let Some(&(best, _)) = self.ranks[kind].first() else {
            return false;
        };
        let Some(n) = self.nodes.get(&node) else {
            return false;
        };
        let Some(j) = n.kinds.iter().position(|&x| x == kind) else {
            return false;
        };
        let rank = n.rank(j);
        if rank <= best {
            return false;
        }
        let Some(mine) = n.est[j] else {
            return false;
        };
        let mine = mine * f64::from(cost);
        let (mut speed, mut ahead) = (0.0f64, queued.max(u64::from(cost)) as f64);
        for &(r, m) in &self.ranks[kind] {
            if r >= rank {
                break;
            }
            let Some(other) = self.nodes.get(&m) else {
                continue;
            };
            // A faster node that is free was passed over (avoided by a retry, or saturated),
            // and slots held without a task may not free soon: only busy nodes with running
            // work count, so a task that waits always has a result coming that starts it.
            // A saturated one counts only against a node that is saturated too (when every
            // machine is, speeds still decide).
            if (other.saturated && !n.saturated) || other.is_free() || other.work == 0 {
                continue;
            }
            let e = other
                .kinds
                .iter()
                .position(|&x| x == kind)
                .and_then(|i| other.est[i])
                .or(self.kind_speed[kind])
                .unwrap_or(mine)
                .max(1e-9);
            speed += f64::from(other.capacity) / e;
            ahead += other.work as f64 / 2.0;
        }
        speed > 0.0 && ahead / speed < mine
    }

    fn start(&mut self, task: usize, node: NodeKey) -> Option<Dispatch> {
        let k = self.slots[task].kind();
        let node = self.probe(k, node, self.avoid_of(task));
        self.set_running_with(node, true, u64::from(self.slots[task].cost));
        self.ready_remove(task);
        let slot = &mut self.slots[task];
        slot.status = TaskStatus::Running(node);
        slot.attempts += 1;
        self.running_total += 1;
        self.running_kind[k] += 1;
        Some(Dispatch {
            task,
            node,
            attempt: slot.attempts,
        })
    }

    /// A task of `kind` took `took` on `node` (from the node's start to its result): the
    /// node's speed estimate for the type moves towards it (see the module documentation).
    /// Durations of failed attempts are not speeds; callers pass successful ones.
    pub fn observe(&mut self, task: usize, node: NodeKey, took: Duration) {
        let Some(slot) = self.slots.get(task) else {
            return;
        };
        let (k, per_unit) = (
            slot.kind(),
            took.as_secs_f64() / f64::from(slot.cost.max(1)),
        );
        if !per_unit.is_finite() {
            return;
        }
        let mean = self.kind_speed[k].unwrap_or(per_unit);
        self.kind_speed[k] = Some(mean + SPEED_ALPHA * (per_unit - mean));
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        let Some(j) = n.kinds.iter().position(|&x| x == k) else {
            return;
        };
        let prev = n.est[j].unwrap_or(mean);
        let est = Some(prev + SPEED_ALPHA * (per_unit - prev));
        if speed_rank(est) == n.rank(j) {
            // Same place in the free set (the usual case): nothing to move.
            n.est[j] = est;
            return;
        }
        self.set_estimate(node, j, est);
    }

    /// Sets a node's estimate for its `j`th kind, keeping the kind's indexes in order.
    fn set_estimate(&mut self, node: NodeKey, j: usize, est: Option<f64>) {
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        let k = n.kinds[j];
        let listed = n.is_listed();
        if listed {
            self.ranks[k].remove(&(n.rank(j), node));
        }
        // Its entry is keyed with the old rank: out, and back with the new one.
        unkey(&mut self.free[k], n, j, node);
        n.set_est(j, est);
        if listed {
            self.ranks[k].insert((n.rank(j), node));
            rekey(&mut self.free[k], n, j, node);
        }
    }

    /// An attempt of `task` failed on `node`: its time is no speed, but a node never measured
    /// for the type no longer ranks first (a node that fails every task at once must not draw
    /// the type's work); it gets the type's mean, if there is one yet.
    pub fn observe_failure(&mut self, task: usize, node: NodeKey) {
        let Some(k) = self.slots.get(task).map(|s| s.kind()) else {
            return;
        };
        let Some(mean) = self.kind_speed[k] else {
            return;
        };
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        let Some(j) = n.kinds.iter().position(|&x| x == k) else {
            return;
        };
        if n.est[j].is_some() {
            return;
        }
        self.set_estimate(node, j, Some(mean));
    }

    /// A node's speed estimates: seconds per unit of cost, for each type it was measured for.
    pub fn speeds(&self, node: NodeKey) -> Vec<(String, f64)> {
        let Some(n) = self.nodes.get(&node) else {
            return Vec::new();
        };
        n.kinds
            .iter()
            .zip(&n.est)
            .filter_map(|(&k, e)| e.map(|e| (self.kinds[k].clone(), e)))
            .collect()
    }

    /// A node's speed estimate for a type: seconds per unit of cost (none until measured).
    pub fn speed(&self, node: NodeKey, kind: &str) -> Option<f64> {
        let k = *self.kind_index.get(kind)?;
        let n = self.nodes.get(&node)?;
        let j = n.kinds.iter().position(|&x| x == k)?;
        n.est[j]
    }

    /// `node` (what [`Scheduler::place`] found), or on a probe another free node: every
    /// [`PROBE_EVERY`]th start of a type with several free nodes goes to the slowest free one
    /// that is not avoided (the one least likely to be picked), so its speed is measured again.
    fn probe(&mut self, kind: usize, node: NodeKey, avoid: Option<NodeKey>) -> NodeKey {
        self.since_probe[kind] += 1;
        // The kind's free set was settled by `place` (`peek_node`), just before.
        if self.since_probe[kind] < PROBE_EVERY || self.free[kind].len() < 2 {
            return node;
        }
        self.since_probe[kind] = 0;
        let probe = self.free[kind]
            .iter()
            .rev()
            .map(|key| key.node)
            .find(|&n| n != node && Some(n) != avoid);
        probe.unwrap_or(node)
    }

    /// The first free node serving `kind` (not saturated, fastest, least loaded, lowest key),
    /// with its speed rank; `avoid` only when it is the only one that serves the type.
    fn peek_node(&mut self, kind: usize, avoid: Option<NodeKey>) -> Option<(u32, NodeKey)> {
        self.settle(kind);
        let free = &self.free[kind];
        let Some(a) = avoid else {
            return free.first().map(|key| (key.rank(), key.node));
        };
        let avoid_serves = self
            .nodes
            .get(&a)
            .is_some_and(|n| !n.draining && n.kinds.contains(&kind));
        let alternatives = self.serving[kind] > u32::from(avoid_serves);
        free.iter()
            .map(|key| (key.rank(), key.node))
            .find(|&(_, node)| !(alternatives && node == a))
    }

    /// Records a running task's result.
    pub fn complete(&mut self, task: usize, ok: bool, now: Instant) -> Outcome {
        let Some(TaskStatus::Running(node)) = self.status(task) else {
            // Not running (a late duplicate): nothing changes.
            return match self.status(task) {
                Some(TaskStatus::Succeeded) => Outcome::Succeeded,
                _ => Outcome::Failed,
            };
        };
        self.set_running_with(node, false, u64::from(self.slots[task].cost));
        let k = self.slots[task].kind();
        self.running_total -= 1;
        self.running_kind[k] -= 1;
        if ok {
            self.finish(task, TaskStatus::Succeeded);
            return Outcome::Succeeded;
        }
        self.avoided.insert(task, node);
        let slot = &mut self.slots[task];
        slot.failures += 1;
        if slot.failures <= slot.retries && !self.stopped {
            // Jitter spreads retries of many tasks so they do not hit a recovering node at once.
            let delay = self.policy.backoff.delay(slot.failures, task as u64);
            slot.status = TaskStatus::Pending;
            self.retry_at.insert(task, now + delay);
            self.delayed.insert((now + delay, task), ());
            return Outcome::Retry { delay };
        }
        self.finish(task, TaskStatus::Failed);
        if !self.policy.keep_going {
            self.stopped = true;
        }
        Outcome::Failed
    }

    /// Records a final status, releases or skips dependents (iteratively: chains can be long)
    /// and advances the order cursors.
    fn finish(&mut self, task: usize, status: TaskStatus) {
        if self.dependents.is_empty() {
            // No task has dependencies (the usual case): nothing to release or skip.
            self.finish_one(task, status);
            return;
        }
        // The skipped dependents still to finish: allocated only when there are some (most
        // tasks have no dependents, and this runs once per task).
        let mut work = Vec::new();
        let mut next = Some((task, status));
        while let Some((t, st)) = next.take().or_else(|| work.pop()) {
            self.finish_one(t, st);
            for i in 0..self.dependents.get(t).map_or(0, Vec::len) {
                let d = self.dependents[t][i];
                if self.slots[d].status != TaskStatus::Pending {
                    continue;
                }
                if st == TaskStatus::Succeeded {
                    self.waiting[d] -= 1;
                    if self.waiting[d] == 0 {
                        self.ready_insert(d);
                    }
                } else {
                    // A pending dependent waits for `t`, so it never ran: it is neither ready
                    // nor waiting for a retry (no scan of the delayed set per skipped task).
                    self.ready_remove(d);
                    // Mark now so a task reachable twice is skipped once.
                    self.slots[d].status = TaskStatus::Skipped;
                    self.skipped.push((d, t));
                    work.push((d, TaskStatus::Skipped));
                }
            }
        }
    }

    /// Records the final status of one task and advances the order cursors.
    fn finish_one(&mut self, t: usize, st: TaskStatus) {
        self.slots[t].status = st;
        self.finished += 1;
        if !self.avoided.is_empty() {
            self.avoided.remove(&t);
        }
        self.advance_cursors(self.slots[t].kind());
    }

    fn advance_cursors(&mut self, k: usize) {
        while self.cursor < self.slots.len() && is_final(self.slots[self.cursor].status) {
            self.cursor += 1;
        }
        let list = &self.kind_tasks[k];
        while self.kind_cursor[k] < list.len()
            && is_final(self.slots[list[self.kind_cursor[k]] as usize].status)
        {
            self.kind_cursor[k] += 1;
        }
    }
}

mod nodes;
mod sets;

#[cfg(test)]
mod tests;
