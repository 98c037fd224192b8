//! A worker's counters, for metrics and `status`: plain atomics bumped on the task path
//! (no lock per task), read at any time.
//!
//! One [`TypeStats`] per served type is made when the [`crate::Worker`] is built (the set
//! of types never changes), so counting a task is a map lookup and a few relaxed atomic
//! adds. Tasks that run as jobs of their own (every handler but the instant ones, such as
//! the built-in handler) are also listed in [`WorkerStats::running`] while they hold a
//! slot, for `status`; that list takes one uncontended lock when such a task starts and
//! one when it ends, next to the process or future it starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Upper bounds, in seconds, of the task duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];

/// Counters of one served type.
#[derive(Debug, Default)]
pub struct TypeStats {
    assigned: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    running: AtomicI64,
    /// One count per bucket of [`DURATION_BUCKETS`], and one more for longer ones.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_us: AtomicU64,
}

/// A copy of a [`TypeStats`] at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeCounters {
    /// Tasks of this type assigned to this node.
    pub assigned: u64,
    /// Tasks that ended with success.
    pub completed: u64,
    /// Tasks that ended with a failure (the handler failed, timed out, was cancelled or
    /// stopped).
    pub failed: u64,
    /// Tasks running now (holding a slot).
    pub running: u64,
    /// Count of ended tasks per bucket of [`DURATION_BUCKETS`] (not cumulative), plus one
    /// for longer ones.
    pub buckets: Vec<u64>,
    /// Sum of the ended tasks' run times, in seconds.
    pub duration_sum_s: f64,
}

impl TypeStats {
    /// A task of this type was assigned.
    pub fn assigned(&self) {
        self.assigned.fetch_add(1, Ordering::Relaxed);
    }

    /// A task of this type ended after running `took`.
    pub fn ended(&self, ok: bool, took: Duration) {
        if ok {
            self.completed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let s = took.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.duration_us.fetch_add(us, Ordering::Relaxed);
    }

    fn start(&self) {
        self.running.fetch_add(1, Ordering::Relaxed);
    }

    fn stop(&self) {
        self.running.fetch_sub(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> TypeCounters {
        TypeCounters {
            assigned: self.assigned.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed).max(0) as u64,
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            duration_sum_s: self.duration_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A task running now, as `status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningTask {
    /// Task id.
    pub id: String,
    /// Task type.
    pub kind: String,
    /// When it started running (got its slot).
    pub since: SystemTime,
    /// The node id of the coordinator that assigned it.
    pub coordinator: String,
}

/// Every counter of a worker (see the module documentation).
#[derive(Debug)]
pub struct WorkerStats {
    types: HashMap<String, Arc<TypeStats>>,
    unknown_type: AtomicU64,
    next_job: AtomicU64,
    running: Mutex<HashMap<u64, RunningTask>>,
}

impl WorkerStats {
    /// Counters for these types, all zero.
    pub fn new<'a>(types: impl IntoIterator<Item = &'a String>) -> Self {
        WorkerStats {
            types: types
                .into_iter()
                .map(|t| (t.clone(), Arc::new(TypeStats::default())))
                .collect(),
            unknown_type: AtomicU64::new(0),
            next_job: AtomicU64::new(0),
            running: Mutex::new(HashMap::new()),
        }
    }

    /// The counters of a served type.
    pub fn of(&self, kind: &str) -> Option<&Arc<TypeStats>> {
        self.types.get(kind)
    }

    /// Each served type's counters now, sorted by type.
    pub fn by_type(&self) -> Vec<(String, TypeCounters)> {
        let mut out: Vec<_> = self
            .types
            .iter()
            .map(|(k, s)| (k.clone(), s.snapshot()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Assignments of a type this node does not serve (each failed at once).
    pub fn unknown_type(&self) -> u64 {
        self.unknown_type.load(Ordering::Relaxed)
    }

    pub(crate) fn count_unknown_type(&self) {
        self.unknown_type.fetch_add(1, Ordering::Relaxed);
    }

    /// The tasks running as jobs now (instant handlers' tasks are never listed: they end
    /// before anything could ask), oldest first, at most `max` of them.
    pub fn running(&self, max: usize) -> Vec<RunningTask> {
        let list = match self.running.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut out: Vec<RunningTask> = list.values().cloned().collect();
        drop(list);
        out.sort_by_key(|t| t.since);
        out.truncate(max);
        out
    }

    /// Marks a job as running until the returned guard is dropped.
    pub(crate) fn start_job(self: &Arc<Self>, kind: Arc<TypeStats>, task: RunningTask) -> JobGuard {
        kind.start();
        let n = self.next_job.fetch_add(1, Ordering::Relaxed);
        match self.running.lock() {
            Ok(mut l) => l.insert(n, task),
            Err(poisoned) => poisoned.into_inner().insert(n, task),
        };
        JobGuard {
            stats: self.clone(),
            kind,
            n,
        }
    }
}

/// Held by a running job; dropping it (the job ended, was cancelled or aborted) takes it
/// off the running list.
#[derive(Debug)]
pub(crate) struct JobGuard {
    stats: Arc<WorkerStats>,
    kind: Arc<TypeStats>,
    n: u64,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.kind.stop();
        match self.stats.running.lock() {
            Ok(mut l) => l.remove(&self.n),
            Err(poisoned) => poisoned.into_inner().remove(&self.n),
        };
    }
}

/// Counts a job's end: [`Ending::ended`] with its outcome, or, when dropped before that
/// (cancelled, aborted, stopped), as a failure.
#[derive(Debug)]
pub(crate) struct Ending {
    kind: Arc<TypeStats>,
    since: std::time::Instant,
    done: bool,
}

impl Ending {
    pub(crate) fn new(kind: Arc<TypeStats>) -> Self {
        Ending {
            kind,
            since: std::time::Instant::now(),
            done: false,
        }
    }

    pub(crate) fn ended(mut self, ok: bool, took: Duration) {
        self.done = true;
        self.kind.ended(ok, took);
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        if !self.done {
            self.kind.ended(false, self.since.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_their_buckets_and_sum() {
        let s = TypeStats::default();
        s.ended(true, Duration::from_micros(50));
        s.ended(false, Duration::from_millis(700));
        s.ended(true, Duration::from_secs(7200));
        let c = s.snapshot();
        assert_eq!((c.completed, c.failed), (2, 1));
        assert_eq!(c.buckets[0], 1);
        assert_eq!(c.buckets[6], 1, "0.7 s is in the <= 1 s bucket");
        assert_eq!(c.buckets[DURATION_BUCKETS.len()], 1, "over the last bound");
        assert!((c.duration_sum_s - 7200.70005).abs() < 1e-6);
    }

    #[test]
    fn a_job_is_listed_while_its_guard_lives() {
        let a = String::from("a");
        let stats = Arc::new(WorkerStats::new([&a]));
        let kind = stats.of("a").cloned().unwrap_or_default();
        let guard = stats.start_job(
            kind,
            RunningTask {
                id: "a1".into(),
                kind: "a".into(),
                since: SystemTime::now(),
                coordinator: "n".into(),
            },
        );
        assert_eq!(stats.running(10).len(), 1);
        assert_eq!(stats.by_type()[0].1.running, 1);
        drop(guard);
        assert!(stats.running(10).is_empty());
        assert_eq!(stats.by_type()[0].1.running, 0);
    }
}
