//! A model-based property test of the run core: several coordinators (each a [`RunCore`])
//! share nodes of small capacity (the workers' FIFO queues of a real node), and random
//! interleavings of time, results, failures, connection losses, reconnections, goodbyes and
//! interrupts drive them. Invariants, checked at every step and at the end:
//!
//! - every task ends exactly once: at most one final result and one final event per task,
//!   and at the end a final event exactly for the tasks that succeeded or failed;
//! - no coordinator has more assignments in flight on a connection than the node's
//!   capacity (what the node's connection enforces), nor sends one after goodbye;
//! - no run waits past its bounds: a core that is not done always has a timer armed or
//!   work in flight at a node, and every run ends within a bounded virtual time;
//! - the order rules hold: strict order assigns task k+1 only once task k is final; type
//!   order likewise within a type; a task starts only after its dependencies succeeded;
//! - longest first: in order none without dependencies, a task's first attempt starts only
//!   once every costlier task of its type (and every one as costly earlier in the file) has
//!   been assigned. Tasks have random costs, and some their own timeout and retries;
//! - capacity as the node reports it: nodes run at different speeds, change their capacity
//!   during the run (a `Load` report to every coordinator) and report their machine
//!   saturated or not; no coordinator then has more in flight on a connection than the
//!   capacity last reported on it (a shrink cancels nothing: it only holds back new work),
//!   and finish-soonest placement never leaves a run waiting for nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use p2p_core::net::{Command, LinkEvent, LinkId};
use p2p_core::{Completed, Hello, NodeId};
use proptest::prelude::*;

use super::{RunCore, RunOptions};
use crate::event::{RunEvent, Status};
use crate::sched::{Backoff, Order, Policy};
use crate::Task;

/// How a broken connection ends: reset by the peer.
fn reset() -> p2p_core::Error {
    std::io::Error::from(std::io::ErrorKind::ConnectionReset).into()
}

#[derive(Debug, Clone)]
enum Action {
    /// Let time pass.
    Wait(u64),
    /// A coordinator's connection to a node breaks.
    Break { coord: usize, node: usize },
    /// A broken connection is made again (a new link).
    Reconnect { coord: usize, node: usize },
    /// A node says goodbye to everyone (it is shutting down).
    Goodbye { node: usize },
    /// The user interrupts a coordinator.
    Interrupt { coord: usize },
    /// A node changes its capacity (1 to 3, at most its handshake's) and reports it, with
    /// its machine saturated or not, to every coordinator.
    Resize {
        node: usize,
        capacity: u32,
        saturated: bool,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (1u64..3000).prop_map(Action::Wait),
        2 => (0usize..3, 0usize..2).prop_map(|(coord, node)| Action::Break { coord, node }),
        2 => (0usize..3, 0usize..2).prop_map(|(coord, node)| Action::Reconnect { coord, node }),
        1 => (0usize..2).prop_map(|node| Action::Goodbye { node }),
        1 => (0usize..3).prop_map(|coord| Action::Interrupt { coord }),
        2 => (0usize..2, 1u32..=3, any::<bool>())
            .prop_map(|(node, capacity, saturated)| Action::Resize { node, capacity, saturated }),
    ]
}

/// One task of a generated plan; see [`Setup::plan`].
type PlanTask = (bool, Option<usize>, u32, Option<u32>, Option<u64>);

#[derive(Debug, Clone)]
struct Setup {
    coords: usize,
    /// Per node: (serves a, serves b, capacity, slowness: its attempts take this many
    /// times as long).
    nodes: Vec<(bool, bool, u32, u32)>,
    /// Per coordinator: order, retries, keep-going.
    runs: Vec<(Order, u32, bool)>,
    /// The plan: per task, its type (false: a, true: b), an optional earlier dependency
    /// (order none only), its cost, and its own retries and timeout (in ms) if any.
    plan: Vec<PlanTask>,
    seed: u64,
}

fn setup() -> impl Strategy<Value = Setup> {
    let order = prop_oneof![Just(Order::Strict), Just(Order::Type), Just(Order::None)];
    (
        1usize..=3,
        prop::collection::vec(
            (
                any::<bool>(),
                any::<bool>(),
                0u32..=3,
                prop::sample::select(vec![1u32, 1, 5]),
            ),
            1..=2,
        ),
        prop::collection::vec((order, 0u32..=2, any::<bool>()), 3),
        prop::collection::vec(
            (
                any::<bool>(),
                prop::option::weighted(0.2, 0usize..12),
                1u32..=3,
                prop::option::weighted(0.2, 0u32..=2),
                prop::option::weighted(0.2, prop::sample::select(vec![0u64, 500, 2500])),
            ),
            1..=12,
        ),
        any::<u64>(),
    )
        .prop_map(|(coords, nodes, runs, plan, seed)| Setup {
            coords,
            nodes,
            runs,
            plan,
            seed,
        })
}

/// splitmix64 over a task, attempt and seed: the attempt's length and outcome.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Job {
    coord: usize,
    link: LinkId,
    seq: u64,
    len: Duration,
    ok: bool,
}

struct Node {
    hello: Hello,
    /// The slots it runs now (its handshake's capacity until it changes).
    capacity: u32,
    /// Its attempts take this many times as long.
    slowness: u32,
    queue: VecDeque<Job>,
    running: Vec<(Job, Instant, Instant)>,
    leaving: bool,
}

/// One coordinator's connection to one node.
struct Conn {
    link: LinkId,
    open: bool,
    /// The node said goodbye on it (delivered to the core).
    peer_goodbye: bool,
    we_goodbye: bool,
    /// Seqs assigned and not answered: what the connection counts.
    outstanding: HashSet<u64>,
    /// The capacity the connection honours: its handshake's, then the last reported (at
    /// most the handshake's).
    capacity: u32,
    /// Its handshake's capacity.
    ceiling: u32,
}

struct Coord {
    core: RunCore,
    order: Order,
    conns: Vec<Conn>,
    /// Task id → index.
    index: HashMap<String, usize>,
    /// Seq → task index.
    seqs: HashMap<u64, usize>,
    finals: Vec<u32>,
    final_events: Vec<u32>,
    done_at: Option<Instant>,
    /// Tasks assigned at least once.
    assigned: Vec<bool>,
}

struct World {
    now: Instant,
    start: Instant,
    nodes: Vec<Node>,
    coords: Vec<Coord>,
    tasks: Vec<Task>,
    next_link: LinkId,
    seed: u64,
}

fn addr(node: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + node as u16))
}

impl World {
    fn new(s: &Setup) -> World {
        let now = Instant::now();
        let mut tasks = Vec::new();
        for (i, &(b, dep, cost, retries, timeout)) in s.plan.iter().enumerate() {
            let mut t = Task::from_id(&format!("{}{}", if b { "b" } else { "a" }, i + 1)).unwrap();
            t.extra_mut().cost = cost;
            t.extra_mut().retries = retries;
            t.extra_mut().timeout = timeout.map(Duration::from_millis);
            if let Some(d) = dep {
                if d < i {
                    t.extra_mut().deps =
                        vec![tasks.get(d).map(|x: &Task| x.id().to_owned()).unwrap()];
                }
            }
            tasks.push(t);
        }
        let nodes: Vec<Node> = s
            .nodes
            .iter()
            .enumerate()
            .map(|(i, &(a, b, capacity, slowness))| {
                let mut types = Vec::new();
                if a || !b {
                    types.push("a".to_string());
                }
                if b {
                    types.push("b".to_string());
                }
                Node {
                    hello: Hello {
                        version: p2p_core::PROTOCOL_VERSION,
                        cluster: "default".into(),
                        node_id: NodeId([i as u8 + 1; 16]),
                        types,
                        capacity,
                    },
                    capacity,
                    slowness,
                    queue: VecDeque::new(),
                    running: Vec::new(),
                    leaving: false,
                }
            })
            .collect();
        let mut w = World {
            now,
            start: now,
            nodes,
            coords: Vec::new(),
            tasks: tasks.clone(),
            next_link: 0,
            seed: s.seed,
        };
        for c in 0..s.coords {
            let (order, retries, keep_going) = s.runs[c];
            let has_deps = tasks.iter().any(|t| !t.deps().is_empty());
            let order = if has_deps { Order::None } else { order };
            let opts = RunOptions {
                policy: Policy {
                    order,
                    retries,
                    keep_going,
                    backoff: Backoff {
                        jitter: 0.0,
                        ..Backoff::default()
                    },
                },
                task_timeout: Duration::from_secs(1),
                discovery_timeout: Duration::from_secs(3),
                goodbye_timeout: Duration::from_secs(5),
                ..RunOptions::default()
            };
            let core = RunCore::new(tasks.clone(), opts, now).unwrap();
            let index = tasks
                .iter()
                .enumerate()
                .map(|(i, t)| (t.id().to_owned(), i))
                .collect();
            w.coords.push(Coord {
                core,
                order,
                conns: Vec::new(),
                index,
                seqs: HashMap::new(),
                finals: vec![0; tasks.len()],
                final_events: vec![0; tasks.len()],
                done_at: None,
                assigned: vec![false; tasks.len()],
            });
            for n in 0..w.nodes.len() {
                let link = w.new_link();
                w.coords[c].conns.push(Conn {
                    link,
                    open: true,
                    peer_goodbye: false,
                    we_goodbye: false,
                    outstanding: HashSet::new(),
                    capacity: w.nodes[n].hello.capacity,
                    ceiling: w.nodes[n].hello.capacity,
                });
                let hello = w.nodes[n].hello.clone();
                w.coords[c]
                    .core
                    .handle_connected(link, addr(n), &hello, now);
            }
        }
        w.pump();
        w
    }

    fn new_link(&mut self) -> LinkId {
        self.next_link += 1;
        self.next_link
    }

    fn node_of(&self, c: usize, link: LinkId) -> Option<usize> {
        self.coords[c].conns.iter().position(|k| k.link == link)
    }

    fn answer(&mut self, c: usize, n: usize, seq: u64, ok: bool, took: Duration) {
        let conn = &mut self.coords[c].conns[n];
        if !conn.open || !conn.outstanding.remove(&seq) {
            return;
        }
        let link = conn.link;
        let done = Completed {
            seq,
            ok,
            exit_code: None,
            output: Default::default(),
            error: (!ok).then(|| "failed".to_string()),
            duration_us: took.as_micros() as u64,
        };
        self.coords[c]
            .core
            .handle_link_event(link, LinkEvent::Completed(done), self.now);
    }

    /// Closes coordinator `c`'s connection to node `n`: the node drops that connection's
    /// jobs, the core hears `Closed`.
    fn close(&mut self, c: usize, n: usize, error: Option<p2p_core::Error>) {
        let conn = &mut self.coords[c].conns[n];
        if !conn.open {
            return;
        }
        conn.open = false;
        conn.outstanding.clear();
        let link = conn.link;
        let node = &mut self.nodes[n];
        node.queue.retain(|j| !(j.coord == c && j.link == link));
        node.running
            .retain(|(j, _, _)| !(j.coord == c && j.link == link));
        self.coords[c].core.handle_link_event(
            link,
            LinkEvent::Closed {
                error: error.map(std::sync::Arc::new),
            },
            self.now,
        );
    }

    fn apply(&mut self, a: &Action) {
        match *a {
            Action::Wait(ms) => self.advance(self.now + Duration::from_millis(ms)),
            Action::Break { coord, node } => {
                if coord < self.coords.len() && node < self.nodes.len() {
                    self.close(coord, node, Some(reset()));
                }
            }
            Action::Reconnect { coord, node } => {
                if coord < self.coords.len()
                    && node < self.nodes.len()
                    && !self.coords[coord].conns[node].open
                    && !self.nodes[node].leaving
                {
                    let link = self.new_link();
                    // A new handshake advertises the capacity the node has now.
                    let mut hello = self.nodes[node].hello.clone();
                    if hello.capacity > 0 {
                        hello.capacity = self.nodes[node].capacity;
                    }
                    self.coords[coord].conns[node] = Conn {
                        link,
                        open: true,
                        peer_goodbye: false,
                        we_goodbye: false,
                        outstanding: HashSet::new(),
                        capacity: hello.capacity,
                        ceiling: hello.capacity,
                    };
                    self.coords[coord]
                        .core
                        .handle_connected(link, addr(node), &hello, self.now);
                }
            }
            Action::Goodbye { node } => {
                if node < self.nodes.len() && !self.nodes[node].leaving {
                    self.nodes[node].leaving = true;
                    for c in 0..self.coords.len() {
                        let conn = &mut self.coords[c].conns[node];
                        if conn.open && !conn.peer_goodbye {
                            conn.peer_goodbye = true;
                            let link = conn.link;
                            self.coords[c].core.handle_link_event(
                                link,
                                LinkEvent::PeerGoodbye,
                                self.now,
                            );
                        }
                    }
                }
            }
            Action::Interrupt { coord } => {
                if coord < self.coords.len() {
                    self.coords[coord].core.handle_interrupt(self.now);
                }
            }
            Action::Resize {
                node,
                capacity,
                saturated,
            } => {
                // A node of capacity 0 serves nothing and reports nothing.
                if node < self.nodes.len() && self.nodes[node].hello.capacity > 0 {
                    self.nodes[node].capacity = capacity;
                    for c in 0..self.coords.len() {
                        let conn = &mut self.coords[c].conns[node];
                        if !conn.open {
                            continue;
                        }
                        // What the connection honours: at most its handshake's.
                        conn.capacity = capacity.min(conn.ceiling);
                        let report = p2p_core::LoadReport {
                            capacity: conn.capacity,
                            cores: 2,
                            load_milli: Some(if saturated { 4000 } else { 500 }),
                            ..Default::default()
                        };
                        let link = conn.link;
                        self.coords[c].core.handle_link_event(
                            link,
                            LinkEvent::Load(report),
                            self.now,
                        );
                    }
                }
            }
        }
        self.pump();
    }

    /// Runs time forward to `until`, stopping at every job end and core timer.
    fn advance(&mut self, until: Instant) {
        loop {
            let mut next: Option<Instant> = self
                .nodes
                .iter()
                .flat_map(|n| n.running.iter().map(|r| r.2))
                .min();
            for c in &mut self.coords {
                if let Some(t) = c.core.poll_timeout() {
                    next = Some(next.map_or(t, |x| x.min(t)));
                }
            }
            let Some(next) = next.filter(|t| *t <= until) else {
                self.now = self.now.max(until);
                for c in 0..self.coords.len() {
                    self.coords[c].core.handle_timeout(self.now);
                }
                self.pump();
                return;
            };
            self.now = self.now.max(next);
            self.tick();
        }
    }

    fn tick(&mut self) {
        let now = self.now;
        let mut ended = Vec::new();
        for (n, node) in self.nodes.iter_mut().enumerate() {
            node.running.retain(|(j, start, end)| {
                if *end <= now {
                    ended.push((j.coord, n, j.seq, j.ok, now - *start));
                    false
                } else {
                    true
                }
            });
        }
        for (c, n, seq, ok, took) in ended {
            self.answer(c, n, seq, ok, took);
        }
        for c in 0..self.coords.len() {
            self.coords[c].core.handle_timeout(now);
        }
        self.pump();
    }

    /// Moves every command and event; starts queued jobs on free slots; checks the
    /// per-step invariants.
    fn pump(&mut self) {
        loop {
            let mut any = false;
            for c in 0..self.coords.len() {
                while let Some((link, cmd)) = self.coords[c].core.poll_command() {
                    any = true;
                    self.command(c, link, cmd);
                }
                while let Some(t) = self.coords[c].core.poll_final() {
                    self.coords[c].finals[t] += 1;
                    assert!(self.coords[c].finals[t] <= 1, "task {t} ended twice");
                }
                while let Some(ev) = self.coords[c].core.poll_event() {
                    let task = match &ev {
                        RunEvent::TaskCompleted { task, .. }
                        | RunEvent::TaskFailed { task, .. }
                        | RunEvent::TaskCancelled { task, .. } => Some(task.clone()),
                        _ => None,
                    };
                    if let Some(task) = task {
                        let t = self.coords[c].index[task.as_str()];
                        self.coords[c].final_events[t] += 1;
                        assert!(
                            self.coords[c].final_events[t] <= 1,
                            "{task}: two final events"
                        );
                    }
                }
                for n in 0..self.nodes.len() {
                    let conn = &self.coords[c].conns[n];
                    let finished = conn.open
                        && conn.outstanding.is_empty()
                        && (conn.we_goodbye || conn.peer_goodbye);
                    if finished {
                        any = true;
                        self.close(c, n, None);
                    }
                }
                if self.coords[c].core.is_done() && self.coords[c].done_at.is_none() {
                    self.coords[c].done_at = Some(self.now);
                }
            }
            for n in 0..self.nodes.len() {
                while self.nodes[n].running.len() < self.nodes[n].capacity as usize {
                    let Some(j) = self.nodes[n].queue.pop_front() else {
                        break;
                    };
                    any = true;
                    let (c, link, seq) = (j.coord, j.link, j.seq);
                    let end = self.now + j.len;
                    self.nodes[n].running.push((j, self.now, end));
                    self.coords[c].core.handle_link_event(
                        link,
                        LinkEvent::Started { seq },
                        self.now,
                    );
                }
            }
            if !any {
                break;
            }
        }
        // A core that is not done waits for a timer or for work in flight at a node.
        for (c, coord) in self.coords.iter_mut().enumerate() {
            if coord.core.is_done() {
                continue;
            }
            let in_flight = coord
                .conns
                .iter()
                .any(|k| k.open && !k.outstanding.is_empty());
            let open = coord.conns.iter().any(|k| k.open);
            assert!(
                coord.core.poll_timeout().is_some() || in_flight || open,
                "coordinator {c} waits for nothing"
            );
        }
    }

    fn command(&mut self, c: usize, link: LinkId, cmd: Command) {
        let Some(n) = self.node_of(c, link) else {
            // An old link of a reconnected node: already closed.
            assert!(
                !matches!(cmd, Command::Assign(_)),
                "coordinator {c} assigned to a closed link {link}"
            );
            return;
        };
        match cmd {
            Command::Assign(a) => {
                let conn = &mut self.coords[c].conns[n];
                assert!(conn.open, "assignment on a closed connection");
                assert!(
                    !conn.we_goodbye && !conn.peer_goodbye,
                    "assignment after goodbye"
                );
                assert!(conn.outstanding.insert(a.seq), "seq reused");
                let capacity = conn.capacity as usize;
                assert!(
                    conn.outstanding.len() <= capacity,
                    "coordinator {c}: {} in flight on a node of capacity {capacity}",
                    conn.outstanding.len()
                );
                let t = self.coords[c].index[a.task.as_str()];
                self.check_order(c, t);
                self.check_longest_first(c, t);
                self.coords[c].assigned[t] = true;
                self.coords[c].seqs.insert(a.seq, t);
                let h = mix(self.seed ^ mix(t as u64 * 977 + u64::from(a.attempt) * 31 + c as u64));
                let len = Duration::from_millis(10 + h % 4000) * self.nodes[n].slowness;
                let ok = !(h >> 20).is_multiple_of(5);
                self.nodes[n].queue.push_back(Job {
                    coord: c,
                    link,
                    seq: a.seq,
                    len,
                    ok,
                });
            }
            Command::Cancel(seq) => {
                let node = &mut self.nodes[n];
                let took = if let Some(p) = node
                    .queue
                    .iter()
                    .position(|j| j.coord == c && j.link == link && j.seq == seq)
                {
                    node.queue.remove(p);
                    Some(Duration::ZERO)
                } else if let Some(p) = node
                    .running
                    .iter()
                    .position(|(j, _, _)| j.coord == c && j.link == link && j.seq == seq)
                {
                    let (_, start, _) = node.running.remove(p);
                    Some(self.now - start)
                } else {
                    None
                };
                if let Some(took) = took {
                    self.answer(c, n, seq, false, took);
                }
            }
            Command::Goodbye => self.coords[c].conns[n].we_goodbye = true,
            Command::Abort => self.close(c, n, Some(p2p_core::Error::Aborted)),
            Command::Complete(_)
            | Command::Started(_)
            | Command::Load(_)
            | Command::Hosted(_)
            | Command::Replica(_) => {
                panic!("the run is assigned nothing")
            }
            Command::Transfer(_) => panic!("the run ships no files"),
        }
    }

    /// Order rules at assignment time.
    fn check_order(&self, c: usize, t: usize) {
        let coord = &self.coords[c];
        let is_final = |i: usize| {
            let r = coord.core.result(i).unwrap();
            r.status != Status::NotRun || r.error.is_some()
        };
        match coord.order {
            Order::Strict => {
                for i in 0..t {
                    assert!(
                        is_final(i),
                        "strict: task {t} assigned before task {i} ended"
                    );
                }
            }
            Order::Type => {
                let kind = &self.tasks[t].kind();
                for i in (0..t).filter(|&i| &self.tasks[i].kind() == kind) {
                    assert!(
                        is_final(i),
                        "type order: task {t} assigned before task {i} ended"
                    );
                }
            }
            Order::None => {}
        }
        for d in self.tasks[t].deps() {
            let i = coord.index[d];
            assert_eq!(
                coord.core.result(i).unwrap().status,
                Status::Succeeded,
                "task {t} assigned before its dependency {d} succeeded"
            );
        }
    }

    /// Longest first, at a task's first assignment: in order none without dependencies every
    /// task is ready until assigned, and tasks of one type have the same nodes, so none of its
    /// type that goes before it (costlier, or as costly and earlier) is still unassigned.
    fn check_longest_first(&self, c: usize, t: usize) {
        let coord = &self.coords[c];
        let plain = self.tasks.iter().all(|x| x.deps().is_empty());
        if coord.order != Order::None || !plain || coord.assigned[t] {
            return;
        }
        let me = &self.tasks[t];
        for (i, u) in self.tasks.iter().enumerate() {
            let before = u.cost() > me.cost() || (u.cost() == me.cost() && i < t);
            let open = coord.core.result(i).unwrap().status == Status::NotRun;
            assert!(
                !(u.kind() == me.kind() && before && open && !coord.assigned[i]),
                "coordinator {c}: {} (cost {}) assigned before {} (cost {})",
                me.id(),
                me.cost(),
                u.id(),
                u.cost()
            );
        }
    }

    /// Runs every core to its end within `limit` of virtual time.
    fn finish(&mut self, limit: Duration) {
        let until = self.start + limit;
        while !self.coords.iter().all(|c| c.core.is_done()) {
            assert!(self.now < until, "the runs did not end within {limit:?}");
            let mut next: Option<Instant> = self
                .nodes
                .iter()
                .flat_map(|n| n.running.iter().map(|r| r.2))
                .min();
            for c in &mut self.coords {
                if let Some(t) = c.core.poll_timeout() {
                    next = Some(next.map_or(t, |x| x.min(t)));
                }
            }
            let next = next.expect("a run that is not done waits for something");
            self.now = self.now.max(next);
            self.tick();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_interleaving_keeps_the_run_rules(s in setup(), actions in prop::collection::vec(action(), 0..40)) {
        let mut w = World::new(&s);
        for a in &actions {
            w.apply(a);
        }
        // Long after every bound (discovery, timeouts, back-off, goodbye), every run ended.
        w.finish(Duration::from_secs(3600));
        for (c, coord) in w.coords.into_iter().enumerate() {
            let at = coord.done_at.unwrap_or(w.now);
            let report = coord.core.into_report(at);
            for (i, r) in report.results.iter().enumerate() {
                let ended = matches!(r.status, Status::Succeeded | Status::Failed | Status::Cancelled);
                let events = coord.final_events[i];
                if ended && !r.resumed {
                    prop_assert_eq!(events, 1, "coordinator {}: {} {:?} has {} final events", c, r.task, r.status, events);
                } else {
                    prop_assert_eq!(events, 0, "coordinator {}: {} not run but reported", c, r.task);
                }
                if ended {
                    prop_assert_eq!(coord.finals[i], 1, "coordinator {}: {} final result not recorded once", c, r.task);
                }
            }
        }
    }
}
