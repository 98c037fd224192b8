//! The runs a node hosts, with no IO in it: their states, counts and times, the bounds
//! (how many run at once, how big a plan may be, how long finished runs are kept) and the
//! clients attached to each.
//!
//! Time is passed in (Unix milliseconds), so retention is tested on a virtual clock.
//! Every attached client has a bounded queue ([`Subscription`]): at most
//! [`SUBSCRIBER_EVENTS`] events and [`SUBSCRIBER_BYTES`] bytes of them not yet taken by
//! its connection (the events the run kept, [`BACKLOG`], count too); a client whose queue
//! is full is dropped, the run never waits for it. Room is kept for the run's end, so a
//! client that keeps up always gets it. At most [`MAX_SUBSCRIBERS`] clients attach to a
//! run, and [`MAX_ATTACHED`] to the node. With events of at most
//! [`crate::hosted::EVENT_CAP`] bytes, a run keeps at most 4 MiB of events.
//! A finished run keeps its counts and only its tasks that did not succeed (at most
//! [`MAX_LISTED_TASKS`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use p2p_core::hosted::{
    Hosted, RunDetail, RunEnd, RunInfo, RunState, TaskLine, MAX_LISTED_RUNS, MAX_LISTED_TASKS,
};
use p2p_tasks::RunEvent;
use tokio::sync::mpsc;

/// Most recent events a run keeps for clients that attach later.
pub const BACKLOG: usize = 256;

/// Most events queued for one attached client (a burst of a fast run, on one thread, fits).
pub const SUBSCRIBER_EVENTS: usize = 16 * 1024;

/// Most bytes of events queued for one attached client.
pub const SUBSCRIBER_BYTES: usize = 8 * 1024 * 1024;

/// An attached client's queue: the driver of its connection takes from `rx`, and says so
/// with [`Subscription::taken`], which frees room under [`SUBSCRIBER_BYTES`].
#[derive(Debug)]
pub struct Subscription {
    /// The events, then the run's end.
    pub rx: mpsc::Receiver<Hosted>,
    queued: Arc<AtomicUsize>,
}

impl Subscription {
    /// `h` left the queue (was taken from `rx`).
    pub fn taken(&self, h: &Hosted) {
        if let Hosted::Event { json } = h {
            self.queued.fetch_sub(json.len(), Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<Hosted>,
    queued: Arc<AtomicUsize>,
}

impl Subscriber {
    /// Queues an event, keeping a slot for the end; false if the client is to be dropped.
    fn offer(&self, json: &str) -> bool {
        if self.tx.capacity() <= 1
            || self.queued.load(Ordering::Relaxed) + json.len() > SUBSCRIBER_BYTES
        {
            return false;
        }
        self.queued.fetch_add(json.len(), Ordering::Relaxed);
        self.tx
            .try_send(Hosted::Event {
                json: json.to_string(),
            })
            .is_ok()
    }
}

/// Most clients attached to one run at once; more are refused.
pub const MAX_SUBSCRIBERS: usize = 16;

/// Most clients attached to the node's runs at once; more are refused.
pub const MAX_ATTACHED: usize = 64;

/// The registry's bounds.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most runs hosted and not finished at once (`--max-runs`).
    pub max_runs: usize,
    /// Largest task file accepted, in bytes (`--max-plan`).
    pub max_plan: usize,
    /// How long a finished run is kept (`--keep-runs`).
    pub keep: Duration,
    /// Most finished runs kept, whatever their age (the oldest go first).
    pub max_finished: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_runs: 16,
            max_plan: 4 * 1024 * 1024,
            keep: Duration::from_secs(24 * 3600),
            max_finished: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug)]
struct Entry {
    info: RunInfo,
    tasks: Vec<(String, TaskState, String)>,
    index: HashMap<String, usize>,
    backlog: VecDeque<String>,
    subscribers: Vec<Subscriber>,
    exit: Option<u8>,
    cancel_requested: bool,
}

/// Adds `d` (+1 or -1) to the count of state `s` in `info`.
fn tally(info: &mut RunInfo, s: TaskState, d: i64) {
    let slot = match s {
        TaskState::Succeeded => &mut info.succeeded,
        TaskState::Failed => &mut info.failed,
        TaskState::Running => &mut info.running,
        TaskState::Pending | TaskState::Cancelled => return,
    };
    *slot = slot.saturating_add_signed(d);
}

impl Entry {
    /// Counts every task's state (once, when the run is loaded or ends; events adjust the
    /// counts one task at a time).
    fn recount(&mut self) {
        let count = |s| self.tasks.iter().filter(|t| t.1 == s).count() as u64;
        self.info.succeeded = count(TaskState::Succeeded);
        self.info.failed = count(TaskState::Failed);
        self.info.running = count(TaskState::Running);
    }
}

/// The hosted runs of one node (see the module documentation).
#[derive(Debug, Default)]
pub struct Registry {
    limits: Limits,
    runs: BTreeMap<String, Entry>,
    /// Runs admitted and not inserted yet (being written to disk).
    reserved: usize,
}

impl Registry {
    /// An empty registry with these bounds.
    pub fn new(limits: Limits) -> Self {
        Registry {
            limits,
            runs: BTreeMap::new(),
            reserved: 0,
        }
    }

    /// The bounds.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs not finished (running or interrupted), and those admitted and being written.
    pub fn unfinished(&self) -> usize {
        self.reserved
            + self
                .runs
                .values()
                .filter(|e| !e.info.state.is_finished())
                .count()
    }

    /// Admits a new run of a `plan_bytes` task file, or says why not. An admitted run
    /// holds its place under `--max-runs` until [`Registry::insert`] (with `admitted`) or
    /// [`Registry::release`]: submits at the same time cannot exceed the bound.
    pub fn admit(&mut self, plan_bytes: usize) -> Result<(), String> {
        if plan_bytes > self.limits.max_plan {
            return Err(format!(
                "the task file is {plan_bytes} bytes, more than this node's --max-plan of {} bytes",
                self.limits.max_plan
            ));
        }
        if self.unfinished() >= self.limits.max_runs {
            return Err(format!(
                "this node hosts {} unfinished runs, its --max-runs: wait for one to end, or \
                 submit to another node",
                self.limits.max_runs
            ));
        }
        self.reserved += 1;
        Ok(())
    }

    /// Gives back the place of an admitted run that will not be inserted.
    pub fn release(&mut self) {
        self.reserved = self.reserved.saturating_sub(1);
    }

    /// Adds a run (new, or loaded from the data directory) with its tasks in file order;
    /// `done` are those its journal records as succeeded.
    pub fn insert(
        &mut self,
        info: RunInfo,
        task_ids: Vec<String>,
        done: &dyn Fn(&str) -> bool,
        exit: Option<u8>,
    ) {
        let mut index = HashMap::with_capacity(task_ids.len());
        let tasks: Vec<_> = task_ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                index.insert(id.clone(), i);
                let s = if done(&id) {
                    TaskState::Succeeded
                } else {
                    TaskState::Pending
                };
                (id, s, String::new())
            })
            .collect();
        let mut e = Entry {
            info,
            tasks,
            index,
            backlog: VecDeque::new(),
            subscribers: Vec::new(),
            exit,
            cancel_requested: false,
        };
        e.info.total = e.tasks.len() as u64;
        e.recount();
        self.runs.insert(e.info.run.clone(), e);
    }

    /// The counts of a finished run loaded from disk (its tasks' states are not kept).
    pub fn set_final_counts(&mut self, run: &str, total: u64, succeeded: u64, failed: u64) {
        if let Some(e) = self.runs.get_mut(run) {
            e.info.total = total;
            e.info.succeeded = succeeded;
            e.info.failed = failed;
            e.info.running = 0;
        }
    }

    /// A run's state, if it is known.
    pub fn state(&self, run: &str) -> Option<RunState> {
        self.runs.get(run).map(|e| e.info.state)
    }

    /// The run starts (again, after a restart): running, its backlog cleared.
    pub fn running(&mut self, run: &str) {
        if let Some(e) = self.runs.get_mut(run) {
            e.info.state = RunState::Running;
            e.backlog.clear();
        }
    }

    /// Records a cancel request; false when there is no such unfinished run.
    pub fn request_cancel(&mut self, run: &str) -> bool {
        match self.runs.get_mut(run) {
            Some(e) if !e.info.state.is_finished() => {
                e.cancel_requested = true;
                true
            }
            _ => false,
        }
    }

    /// Whether the run was asked to cancel.
    pub fn cancel_requested(&self, run: &str) -> bool {
        self.runs.get(run).is_some_and(|e| e.cancel_requested)
    }

    /// One event of a run, with its JSON line (`None` for the events only people see):
    /// counts and task states follow it, and it goes to every attached client.
    pub fn event(&mut self, run: &str, ev: &RunEvent, json: Option<String>) {
        let mark = match ev {
            RunEvent::TaskAssigned { task, node, .. } => {
                Some((task.as_str(), TaskState::Running, Some(&**node)))
            }
            RunEvent::TaskCompleted { task, .. } => {
                Some((task.as_str(), TaskState::Succeeded, None))
            }
            RunEvent::TaskFailed { task, .. } => Some((task.as_str(), TaskState::Failed, None)),
            RunEvent::TaskCancelled { task, .. } => {
                Some((task.as_str(), TaskState::Cancelled, None))
            }
            RunEvent::TaskRetry { task, .. } => Some((task.as_str(), TaskState::Pending, None)),
            _ => None,
        };
        self.marked(run, mark, json);
    }

    /// One event of a replicated run, as its group committed it: the task state it sets
    /// (a `replica::MARK_*` value, and the node, empty if unchanged) and its JSON line.
    pub fn replicated_event(&mut self, run: &str, mark: Option<(&str, u8, &str)>, json: String) {
        let mark = mark.map(|(task, state, node)| {
            let s = match state {
                1 => TaskState::Running,
                2 => TaskState::Succeeded,
                3 => TaskState::Failed,
                4 => TaskState::Cancelled,
                _ => TaskState::Pending,
            };
            (task, s, (!node.is_empty()).then_some(node))
        });
        self.marked(run, mark, Some(json));
    }

    fn marked(
        &mut self,
        run: &str,
        mark: Option<(&str, TaskState, Option<&str>)>,
        json: Option<String>,
    ) {
        let Some(e) = self.runs.get_mut(run) else {
            return;
        };
        if let Some((task, s, node)) = mark {
            if let Some(&i) = e.index.get(task) {
                tally(&mut e.info, e.tasks[i].1, -1);
                tally(&mut e.info, s, 1);
                e.tasks[i].1 = s;
                if let Some(n) = node {
                    e.tasks[i].2 = n.to_string();
                }
            }
        }
        let Some(json) = json else {
            return;
        };
        if e.backlog.len() >= BACKLOG {
            e.backlog.pop_front();
        }
        e.subscribers.retain(|s| s.offer(&json));
        e.backlog.push_back(json);
    }

    /// The run ended: its state, exit status and time; every attached client gets its end.
    /// A run ended `Interrupted` (its host stops) resumes at the next start.
    pub fn end(&mut self, run: &str, state: RunState, exit: u8, now_ms: u64) {
        let Some(e) = self.runs.get_mut(run) else {
            return;
        };
        e.info.state = state;
        e.exit = Some(exit);
        if state.is_finished() {
            e.info.ended_ms = Some(now_ms);
        }
        for t in &mut e.tasks {
            if t.1 == TaskState::Running {
                t.1 = TaskState::Pending;
            }
        }
        e.recount();
        let end = RunEnd {
            run: run.to_string(),
            state,
            exit,
        };
        for s in e.subscribers.drain(..) {
            let _ = s.tx.try_send(Hosted::Ended(end.clone()));
        }
        if state.is_finished() {
            // What is left to show of a finished run: the tasks that did not succeed.
            e.tasks.retain(|t| t.1 != TaskState::Succeeded);
            e.tasks.truncate(MAX_LISTED_TASKS);
            e.tasks.shrink_to_fit();
            e.index = HashMap::new();
        }
    }

    /// Attaches a client: its queue starts with the run's backlog, then live events, then
    /// the end (at once for a run that has ended).
    pub fn attach(&mut self, run: &str) -> Result<Subscription, String> {
        let Some(e) = self.runs.get_mut(run) else {
            return Err(format!("no run {run} on this node"));
        };
        e.subscribers.retain(|s| !s.tx.is_closed());
        if e.subscribers.len() >= MAX_SUBSCRIBERS {
            return Err(format!(
                "run {run} has {MAX_SUBSCRIBERS} attached clients already"
            ));
        }
        let attached: usize = self
            .runs
            .values()
            .map(|e| e.subscribers.iter().filter(|s| !s.tx.is_closed()).count())
            .sum();
        if attached >= MAX_ATTACHED {
            return Err(format!(
                "this node has {MAX_ATTACHED} attached clients already"
            ));
        }
        let Some(e) = self.runs.get_mut(run) else {
            return Err(format!("no run {run} on this node"));
        };
        let (tx, rx) = mpsc::channel(SUBSCRIBER_EVENTS + 1);
        let sub = Subscriber {
            tx,
            queued: Arc::default(),
        };
        // The backlog fits: it is far below both bounds.
        for json in &e.backlog {
            sub.offer(json);
        }
        let queued = sub.queued.clone();
        match (e.info.state, e.exit) {
            (RunState::Running, _) | (_, None) => e.subscribers.push(sub),
            (state, Some(exit)) => {
                let _ = sub.tx.try_send(Hosted::Ended(RunEnd {
                    run: run.to_string(),
                    state,
                    exit,
                }));
            }
        }
        Ok(Subscription { rx, queued })
    }

    /// The runs, newest first (at most [`MAX_LISTED_RUNS`]).
    pub fn list(&self) -> Vec<RunInfo> {
        let mut runs: Vec<RunInfo> = self.runs.values().map(|e| e.info.clone()).collect();
        runs.sort_by(|a, b| b.started_ms.cmp(&a.started_ms).then(a.run.cmp(&b.run)));
        runs.truncate(MAX_LISTED_RUNS);
        runs
    }

    /// One run's status: running tasks first, then the others in file order (at most
    /// [`MAX_LISTED_TASKS`]).
    pub fn detail(&self, run: &str) -> Option<RunDetail> {
        let e = self.runs.get(run)?;
        let line = |t: &(String, TaskState, String)| TaskLine {
            task: cut(&t.0),
            state: t.1.as_str().to_string(),
            node: cut(&t.2),
        };
        let running = e.tasks.iter().filter(|t| t.1 == TaskState::Running);
        let rest = e.tasks.iter().filter(|t| t.1 != TaskState::Running);
        let tasks = running
            .chain(rest)
            .take(MAX_LISTED_TASKS)
            .map(line)
            .collect();
        Some(RunDetail {
            info: e.info.clone(),
            tasks,
        })
    }

    /// Forgets finished runs older than the retention, and the oldest beyond the most kept;
    /// returns their ids (to delete their files).
    pub fn prune(&mut self, now_ms: u64) -> Vec<String> {
        let keep_ms = u64::try_from(self.limits.keep.as_millis()).unwrap_or(u64::MAX);
        let mut finished: Vec<(u64, String)> = self
            .runs
            .values()
            .filter_map(|e| e.info.ended_ms.map(|t| (t, e.info.run.clone())))
            .filter(|(_, id)| self.state(id).is_some_and(RunState::is_finished))
            .collect();
        finished.sort();
        let over = finished.len().saturating_sub(self.limits.max_finished);
        let mut gone = Vec::new();
        for (i, (ended, id)) in finished.into_iter().enumerate() {
            if i < over || ended.saturating_add(keep_ms) <= now_ms {
                self.runs.remove(&id);
                gone.push(id);
            }
        }
        gone
    }
}

fn cut(s: &str) -> String {
    let max = p2p_core::hosted::MAX_HOSTED_STRING;
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn info(run: &str, started_ms: u64) -> RunInfo {
        RunInfo {
            run: run.into(),
            name: "tasks.txt".into(),
            state: RunState::Running,
            total: 0,
            succeeded: 0,
            failed: 0,
            running: 0,
            started_ms,
            ended_ms: None,
        }
    }

    fn reg(limits: Limits) -> Registry {
        Registry::new(limits)
    }

    fn add(r: &mut Registry, run: &str, at: u64, tasks: &[&str]) {
        r.insert(
            info(run, at),
            tasks.iter().map(|s| s.to_string()).collect(),
            &|_| false,
            None,
        );
    }

    fn assigned(task: &str, node: &str) -> RunEvent {
        RunEvent::TaskAssigned {
            task: task.into(),
            kind: "a".into(),
            node: node.into(),
            attempt: 1,
        }
    }

    fn completed(task: &str) -> RunEvent {
        RunEvent::TaskCompleted {
            task: task.into(),
            kind: "a".into(),
            node: "n1".into(),
            attempt: 1,
            ok: true,
            output: Default::default(),
            duration_ms: 1.0,
        }
    }

    #[test]
    fn counts_and_task_states_follow_the_events() {
        let mut r = reg(Limits::default());
        add(&mut r, "r1", 0, &["a1", "a2", "a3"]);
        r.event("r1", &assigned("a2", "n1"), None);
        r.event("r1", &assigned("a1", "n2"), None);
        r.event("r1", &completed("a1"), None);
        let d = r.detail("r1").unwrap();
        assert_eq!((d.info.total, d.info.succeeded, d.info.running), (3, 1, 1));
        assert_eq!(d.tasks[0].task, "a2", "running tasks come first");
        assert_eq!(
            (d.tasks[0].state.as_str(), d.tasks[0].node.as_str()),
            ("running", "n1")
        );
        assert_eq!(d.tasks[1].state, "succeeded");
        assert_eq!(d.tasks[2].state, "pending");
    }

    #[test]
    fn counts_kept_event_by_event_match_a_recount() {
        let ids: Vec<String> = (0..50).map(|i| format!("a{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut r = reg(Limits::default());
        add(&mut r, "r1", 0, &refs);
        let mut x: u64 = 7;
        for _ in 0..5000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let t = &ids[(x >> 33) as usize % ids.len()];
            let ev = match (x >> 20) % 5 {
                0 => assigned(t, "n"),
                1 => completed(t),
                2 => RunEvent::TaskFailed {
                    task: t.as_str().into(),
                    kind: "a".into(),
                    node: "n".into(),
                    attempt: 1,
                    ok: false,
                    output: Default::default(),
                    duration_ms: 0.0,
                    exit_code: None,
                    error: String::new(),
                },
                3 => RunEvent::TaskCancelled {
                    task: t.as_str().into(),
                    kind: "a".into(),
                    node: "n".into(),
                    attempt: 1,
                    output: Default::default(),
                    duration_ms: 0.0,
                },
                _ => RunEvent::TaskRetry {
                    task: t.as_str().into(),
                    kind: "a".into(),
                    node: "n".into(),
                    attempt: 1,
                    error: String::new(),
                    delay_ms: 1,
                },
            };
            r.event("r1", &ev, None);
            let d = r.detail("r1").unwrap();
            let n = |s: &str| d.tasks.iter().filter(|l| l.state == s).count() as u64;
            assert_eq!(
                (d.info.succeeded, d.info.failed, d.info.running),
                (n("succeeded"), n("failed"), n("running"))
            );
        }
    }

    #[test]
    fn resumed_runs_count_what_their_journal_holds() {
        let mut r = reg(Limits::default());
        r.insert(
            info("r1", 0),
            vec!["a1".into(), "a2".into()],
            &|t| t == "a1",
            None,
        );
        assert_eq!(r.detail("r1").unwrap().info.succeeded, 1);
    }

    #[test]
    fn admission_bounds_unfinished_runs_and_plan_size() {
        let mut r = reg(Limits {
            max_runs: 2,
            max_plan: 100,
            ..Limits::default()
        });
        assert!(r.admit(101).unwrap_err().contains("--max-plan"));
        // Two admitted at once (both being written) fill the bound before either is in.
        r.admit(10).unwrap();
        r.admit(10).unwrap();
        assert!(r.admit(10).unwrap_err().contains("--max-runs"));
        r.release();
        r.release();
        r.admit(10).unwrap();
        r.release();
        add(&mut r, "r1", 0, &["a1"]);
        add(&mut r, "r2", 1, &["a1"]);
        assert!(r.admit(10).unwrap_err().contains("--max-runs"));
        r.end("r1", RunState::Interrupted, 143, 5);
        assert!(
            r.admit(10).is_err(),
            "an interrupted run still counts: it resumes"
        );
        r.end("r1", RunState::Succeeded, 0, 5);
        r.admit(10).unwrap();
    }

    #[test]
    fn attach_replays_the_backlog_then_live_events_then_the_end() {
        let mut r = reg(Limits::default());
        add(&mut r, "r1", 0, &["a1"]);
        r.event("r1", &assigned("a1", "n1"), Some("one".into()));
        let mut rx = r.attach("r1").unwrap().rx;
        r.event("r1", &completed("a1"), Some("two".into()));
        r.end("r1", RunState::Succeeded, 0, 10);
        let mut got = Vec::new();
        while let Ok(m) = rx.try_recv() {
            got.push(m);
        }
        assert_eq!(
            got,
            vec![
                Hosted::Event { json: "one".into() },
                Hosted::Event { json: "two".into() },
                Hosted::Ended(RunEnd {
                    run: "r1".into(),
                    state: RunState::Succeeded,
                    exit: 0
                }),
            ]
        );
        // Attaching to an ended run gives the backlog and its end at once.
        let mut late = r.attach("r1").unwrap().rx;
        let mut n = 0;
        while let Ok(m) = late.try_recv() {
            n += 1;
            if n == 3 {
                assert!(matches!(m, Hosted::Ended(_)));
            }
        }
        assert_eq!(n, 3);
        assert!(r.attach("nope").is_err());
    }

    #[test]
    fn a_subscriber_that_does_not_read_is_dropped_not_the_run() {
        let mut r = reg(Limits::default());
        add(&mut r, "r1", 0, &["a1"]);
        let mut slow = r.attach("r1").unwrap();
        let mut fast = r.attach("r1").unwrap();
        // Events of 1 KiB: the slow one's bytes fill first.
        let json = "x".repeat(1024);
        let fits = SUBSCRIBER_BYTES / json.len();
        let mut fast_got = 0;
        for _ in 0..fits + 10 {
            r.event("r1", &RunEvent::Flush, Some(json.clone()));
            while let Ok(h) = fast.rx.try_recv() {
                fast.taken(&h);
                fast_got += 1;
            }
        }
        assert_eq!(fast_got, fits + 10, "a client that reads gets every event");
        // The slow one got what fit, then its queue was closed.
        let mut slow_got = 0;
        loop {
            match slow.rx.try_recv() {
                Ok(_) => slow_got += 1,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => panic!("the slow subscriber is kept"),
            }
        }
        assert_eq!(slow_got, fits);
        r.end("r1", RunState::Succeeded, 0, 1);
        assert!(matches!(fast.rx.try_recv(), Ok(Hosted::Ended(_))));
        assert_eq!(r.state("r1"), Some(RunState::Succeeded));
    }

    #[test]
    fn a_burst_of_small_events_fits_and_the_end_always_has_room() {
        let mut r = reg(Limits::default());
        add(&mut r, "r1", 0, &["a1"]);
        let mut sub = r.attach("r1").unwrap();
        // A burst as a fast run gives on one thread before the client's connection runs.
        for i in 0..SUBSCRIBER_EVENTS {
            r.event("r1", &RunEvent::Flush, Some(format!("{{\"n\":{i}}}")));
        }
        r.end("r1", RunState::Succeeded, 0, 1);
        let mut n = 0;
        let mut last = None;
        while let Ok(h) = sub.rx.try_recv() {
            sub.taken(&h);
            n += 1;
            last = Some(h);
        }
        assert_eq!(n, SUBSCRIBER_EVENTS + 1);
        assert!(matches!(last, Some(Hosted::Ended(_))));
        // One more event than fits drops the client instead: no end is promised it.
        let mut r = reg(Limits::default());
        add(&mut r, "r1", 0, &["a1"]);
        let mut sub = r.attach("r1").unwrap();
        for _ in 0..=SUBSCRIBER_EVENTS {
            r.event("r1", &RunEvent::Flush, Some("{}".into()));
        }
        r.end("r1", RunState::Succeeded, 0, 1);
        let mut ended = false;
        while let Ok(h) = sub.rx.try_recv() {
            ended |= matches!(h, Hosted::Ended(_));
        }
        assert!(!ended);
    }

    #[test]
    fn a_finished_run_keeps_only_the_tasks_that_did_not_succeed() {
        let mut r = reg(Limits::default());
        add(&mut r, "r1", 0, &["a1", "a2", "a3"]);
        r.event("r1", &completed("a1"), None);
        r.event("r1", &assigned("a2", "n1"), None);
        r.end("r1", RunState::Failed, 1, 5);
        let d = r.detail("r1").unwrap();
        assert_eq!((d.info.total, d.info.succeeded), (3, 1));
        let ids: Vec<_> = d.tasks.iter().map(|t| t.task.as_str()).collect();
        assert_eq!(ids, ["a2", "a3"]);
        assert_eq!(d.tasks[0].state, "pending", "no task runs in an ended run");
    }

    #[test]
    fn attached_clients_are_bounded_per_node() {
        let mut r = reg(Limits::default());
        let mut held = Vec::new();
        for i in 0..MAX_ATTACHED / MAX_SUBSCRIBERS {
            let id = format!("r{i}");
            add(&mut r, &id, i as u64, &["a1"]);
            for _ in 0..MAX_SUBSCRIBERS {
                held.push(r.attach(&id).unwrap());
            }
        }
        add(&mut r, "last", 99, &["a1"]);
        assert!(r.attach("last").unwrap_err().contains("this node"));
        held.pop();
        r.attach("last").unwrap();
    }

    #[test]
    fn subscribers_per_run_are_bounded() {
        let mut r = reg(Limits::default());
        add(&mut r, "r1", 0, &["a1"]);
        let held: Vec<_> = (0..MAX_SUBSCRIBERS)
            .map(|_| r.attach("r1").unwrap())
            .collect();
        assert!(r.attach("r1").is_err());
        drop(held);
        r.attach("r1").unwrap();
    }

    #[test]
    fn finished_runs_are_kept_for_the_retention_on_a_virtual_clock() {
        let hour = 3_600_000;
        let mut r = reg(Limits {
            keep: Duration::from_secs(3600),
            max_finished: 2,
            ..Limits::default()
        });
        add(&mut r, "old", 0, &["a1"]);
        add(&mut r, "new", 1, &["a1"]);
        add(&mut r, "live", 2, &["a1"]);
        r.end("old", RunState::Failed, 1, 1000);
        r.end("new", RunState::Succeeded, 0, 1000 + hour / 2);
        assert!(r.prune(1000 + hour - 1).is_empty());
        assert_eq!(r.prune(1000 + hour), vec!["old".to_string()]);
        assert_eq!(r.prune(10 * hour), vec!["new".to_string()]);
        assert_eq!(r.list().len(), 1, "a running run is never pruned");
        // Beyond the most kept, the oldest finished go whatever their age.
        for (i, id) in ["x", "y", "z"].iter().enumerate() {
            add(&mut r, id, 10 + i as u64, &["a1"]);
            r.end(id, RunState::Succeeded, 0, 10 * hour + i as u64);
        }
        assert_eq!(r.prune(10 * hour + 5), vec!["x".to_string()]);
    }

    #[test]
    fn list_is_newest_first_and_cancel_needs_an_unfinished_run() {
        let mut r = reg(Limits::default());
        add(&mut r, "a", 5, &["a1"]);
        add(&mut r, "b", 9, &["a1"]);
        let ids: Vec<_> = r.list().into_iter().map(|i| i.run).collect();
        assert_eq!(ids, ["b", "a"]);
        assert!(r.request_cancel("a"));
        assert!(r.cancel_requested("a"));
        r.end("b", RunState::Succeeded, 0, 10);
        assert!(!r.request_cancel("b"));
        assert!(!r.request_cancel("zz"));
    }
}
