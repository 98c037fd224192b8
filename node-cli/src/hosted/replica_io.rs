//! The IO of replicated hosted runs (the rules are [`super::replica`]'s): each group a
//! member belongs to runs on a thread of its own (Raft's log is synced to disk there,
//! before anything that depends on it is sent), its messages travel in
//! [`p2p_core::replica::Replica`] frames over connections this node dials to each member,
//! and what a group applies is reported through the host's registry. When this member
//! starts [acting](super::replica::Group::acting) for a run, it coordinates the run with
//! the host's coordinator factory, every event proposed to the group; when it stops, the
//! coordinator is stopped at once.
//!
//! # On disk
//!
//! `DIR/RUN_ID/` (see [`super::replica_disk`]), `DIR` being `DATA/replicas/NODE_ID`, and a
//! coordinator's journal `DIR/RUN_ID/journal-TERM` made at each takeover from the results
//! committed so far; the run's input files in `DIR/RUN_ID/inputs/HASH/NAME` (see
//! [`member_tasks`]) and the results of the tasks this member coordinated in
//! `DIR/RUN_ID/results/`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use p2p_core::hosted::{RunInfo, RunState, Submit, SubmittedInput};
use p2p_core::net::{self, Command, LinkEvent, ReplicaService, Settings};
use p2p_core::replica::{Member, RaftMessage, Replica};
use p2p_core::Hello;
use p2p_tasks::node_files::NodeFiles;
use p2p_tasks::{Journal, RunEvent, Status, Task, TaskResult};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::replica::{
    Applied, Group, Mark, Output, Plan, Record, Saved, ELECTION_TICKS, MARK_CANCELLED, MARK_FAILED,
    MARK_PENDING, MARK_RUNNING, MARK_SUCCEEDED, TICK,
};
use super::replica_disk::DiskLog;
use super::{capped_json, files, lock, now_ms, run_options, Host};

/// The members of a new group: the host and this many replicas.
pub const REPLICAS: usize = 2;

/// Raft messages from the network queued for one group; more are dropped (Raft sends
/// again).
const NET_QUEUE: usize = 1024;

/// How long a submit waits for its plan to be committed by a majority before it answers
/// anyway (the plan is on the host's disk; the run starts once a majority is up).
const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// The most records proposed in one write.
const PROPOSE_BATCH: usize = 256;

/// Every this many ticks, the host of a new group that no member leads stands again.
const HOST_CAMPAIGN: u64 = 3;

/// How long a submit waits for enough candidates to be connected.
const PICK_WAIT: Duration = Duration::from_secs(2);

/// Between two attempts to connect to a member.
const REDIAL: Duration = Duration::from_secs(1);

/// How long each step of shipping a run's inputs to a replica may wait (connecting, and
/// each answer of the replica while a file is offered).
const SHIP_WAIT: Duration = Duration::from_secs(10);

/// How a node replicates hosted runs.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Where the groups are kept (`DATA/replicas/NODE_ID` for `serve`).
    pub dir: PathBuf,
    /// This node in a group: its id and the address the others reach it at.
    pub me: Member,
    /// The serving nodes this node may choose as replicas of the runs it hosts.
    pub candidates: Vec<SocketAddr>,
    /// The handshake this node dials with.
    pub hello: Hello,
    /// The settings this node dials with (its key and identity).
    pub settings: Settings,
    /// The most groups this node is a member of.
    pub max_groups: usize,
}

enum Input {
    Raft(Box<RaftMessage>),
    Propose(Record),
    Cancel,
    Stop,
}

struct GroupHandle {
    tx: std_mpsc::Sender<Input>,
    queued: Arc<AtomicUsize>,
    /// Whether the plan is committed (and applied here).
    planned: watch::Receiver<bool>,
}

struct PeerLink {
    link: Option<net::Link>,
    dialing: bool,
}

struct Inner {
    config: ReplicaConfig,
    host: Host,
    groups: Mutex<HashMap<String, GroupHandle>>,
    peers: Mutex<HashMap<SocketAddr, PeerLink>>,
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
    /// Held while a run's inputs are placed in its directory (when its plan is applied,
    /// and again to coordinate it), so that two placements never race on one file.
    placing: Mutex<()>,
}

/// The groups this node is a member of. Cheap to clone.
#[derive(Clone)]
pub struct Replicas {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The task state a run event sets, as a group records it.
pub fn mark_of(ev: &RunEvent) -> Option<Mark> {
    let (task, state, node) = match ev {
        RunEvent::TaskAssigned { task, node, .. } => (task, MARK_RUNNING, &**node),
        RunEvent::TaskCompleted { task, .. } => (task, MARK_SUCCEEDED, ""),
        RunEvent::TaskFailed { task, .. } => (task, MARK_FAILED, ""),
        RunEvent::TaskCancelled { task, .. } => (task, MARK_CANCELLED, ""),
        RunEvent::TaskRetry { task, .. } => (task, MARK_PENDING, ""),
        _ => return None,
    };
    Some(Mark {
        task: task.to_string(),
        state,
        node: node.to_string(),
    })
}

/// Whether `run` is a run id this node keeps files for (32 hex digits, as made by a host).
fn is_run_id(run: &str) -> bool {
    !run.is_empty() && run.len() <= 64 && run.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Replicas {
    /// Replication for `host`, configured by `config`. Must be called within a tokio
    /// runtime. Install [`Replicas::service`] on the node, then call [`Replicas::resume`].
    pub fn new(mut config: ReplicaConfig, host: Host) -> Replicas {
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| {
            config.settings.replica = Some(service_of(weak.clone()));
            Inner {
                config,
                host,
                groups: Mutex::default(),
                peers: Mutex::default(),
                runtime: tokio::runtime::Handle::current(),
                stop: CancellationToken::new(),
                placing: Mutex::new(()),
            }
        });
        let r = Replicas { inner };
        for addr in r.inner.config.candidates.clone() {
            r.dial(addr);
        }
        r
    }

    /// What takes the peers' replicated-run messages; give it to
    /// [`crate::Node::replicate_runs`].
    pub fn service(&self) -> ReplicaService {
        service_of(Arc::downgrade(&self.inner))
    }

    /// Loads the groups kept in the data directory; each goes on where it was (its log is
    /// applied again, so the registry knows its run). Returns how many.
    pub fn resume(&self) -> std::io::Result<usize> {
        let dir = &self.inner.config.dir;
        if !dir.exists() {
            return Ok(0);
        }
        let mut n = 0;
        for e in std::fs::read_dir(dir)? {
            let path = e?.path();
            let Some(run) = path.file_name().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            if !is_run_id(&run) || !path.is_dir() {
                continue;
            }
            match DiskLog::open(&path) {
                Ok((log, members, saved)) => match self.start_group(&run, members, saved, log) {
                    Ok(_) => n += 1,
                    Err(e) => warn!(run = %run, error = %e, "cannot resume this replicated run"),
                },
                Err(e) => warn!(run = %run, error = %e, "cannot read this replicated run"),
            }
        }
        Ok(n)
    }

    /// Stops every group (their members go on without this one); the clients attached
    /// here to an unfinished run get its end as `interrupted` (exit 143), as a run hosted
    /// alone gives them: the run goes on elsewhere, attach to another member.
    pub fn stop(&self) {
        self.inner.stop.cancel();
        let runs: Vec<String> = {
            let groups = lock(&self.inner.groups);
            for g in groups.values() {
                let _ = g.tx.send(Input::Stop);
            }
            groups.keys().cloned().collect()
        };
        let mut reg = lock(&self.inner.host.inner.registry);
        for run in runs {
            if reg.state(&run).is_some_and(|s| !s.is_finished()) {
                reg.end(
                    &run,
                    RunState::Interrupted,
                    super::EXIT_INTERRUPTED,
                    now_ms(),
                );
            }
        }
    }

    /// Whether this node is a member of the group of `run`.
    pub fn has(&self, run: &str) -> bool {
        lock(&self.inner.groups).contains_key(run)
    }

    /// Forgets a finished run: its group stops and its files go.
    pub fn forget(&self, run: &str) {
        if let Some(g) = lock(&self.inner.groups).remove(run) {
            let _ = g.tx.send(Input::Stop);
        }
        let dir = self.inner.config.dir.join(run);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                warn!(run = %run, error = %e, "cannot remove a finished replicated run's files");
            }
        }
    }

    /// A client cancels `run`: the leader records it, another member forwards it there.
    pub fn cancel(&self, run: &str) -> bool {
        match lock(&self.inner.groups).get(run) {
            Some(g) => g.tx.send(Input::Cancel).is_ok(),
            None => false,
        }
    }

    /// The members a new run of this host would have: this node and [`REPLICAS`]
    /// candidates connected now; `None` when there are not enough.
    fn pick(&self) -> Option<Vec<Member>> {
        let mut members = vec![self.inner.config.me.clone()];
        for (addr, p) in lock(&self.inner.peers).iter() {
            if members.len() > REPLICAS {
                break;
            }
            let Some(link) = &p.link else { continue };
            if !self.inner.config.candidates.contains(addr) {
                continue;
            }
            let node = link.peer().node_id;
            if members.iter().any(|m| m.node == node) {
                continue;
            }
            members.push(Member {
                node,
                addr: addr.to_string(),
            });
        }
        for addr in self.inner.config.candidates.clone() {
            self.dial(addr);
        }
        (members.len() > REPLICAS).then_some(members)
    }

    /// Hosts `s` replicated, if enough replicas are connected: its group is made, the plan
    /// proposed, and this returns once a majority committed it (or 10 s passed:
    /// the plan is on this node's disk and the run starts when a majority is up). `None`:
    /// not replicated (too few replicas, or a replica that could not take the plan's
    /// input files); the caller hosts it as stage 1 does.
    ///
    /// A plan with input files (`< PATH`, shipped by the client into this node's file
    /// cache, `inputs`) has them placed in this member's run directory, then offered to
    /// each replica (into its file cache) before the plan is proposed; the plan record
    /// names them, so each member places its own copies when the plan is committed.
    pub async fn submit(
        &self,
        id: &str,
        s: &Submit,
        inputs: Option<&[SubmittedInput]>,
    ) -> Option<Result<(), String>> {
        if self.inner.config.candidates.is_empty() {
            return None;
        }
        // (The caller checked that it parses and can run.)
        let tasks = p2p_tasks::parse::parse(&s.name, &s.text).ok()?;
        let inputs = inputs.map(<[SubmittedInput]>::to_vec).unwrap_or_default();
        let with_files = files::has_path_inputs(&tasks);
        let node_files = self.inner.host.inner.config.files.clone();
        if with_files && node_files.is_none() {
            // Hosted alone, which refuses it and says why.
            return None;
        }
        let dir = self.inner.config.dir.join(id);
        let mut placed = tasks;
        if with_files {
            // Inputs come from the client, never from the host's own files.
            if let Err(e) = files::rewrite_inputs(&mut placed, &dir, &inputs) {
                return Some(Err(e));
            }
        }
        // Candidates still connecting (a node just started) get a moment.
        let mut members = self.pick();
        let deadline = Instant::now() + PICK_WAIT;
        while members.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            members = self.pick();
        }
        let members = members?;
        let plan = Plan {
            name: s.name.clone(),
            text: s.text.clone(),
            options: s.options.clone(),
            started_ms: now_ms(),
            inputs: if with_files { inputs } else { Vec::new() },
        };
        let made = {
            let (dir, members) = (dir.clone(), members.clone());
            tokio::task::spawn_blocking(move || DiskLog::create(&dir, &members))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| format!("cannot keep the run's log: {e}")))
        };
        let log = match made {
            Ok(log) => log,
            Err(e) => return Some(Err(e)),
        };
        if let Some(node_files) = node_files.filter(|_| with_files) {
            let shipped = self
                .hand_inputs(id, &members, node_files, &placed, &plan.inputs)
                .await;
            if let Err(e) = shipped {
                drop(log);
                let _ = std::fs::remove_dir_all(&dir);
                return match e {
                    Handed::Here(e) => Some(Err(e)),
                    Handed::Replica(e) => {
                        // (Hosted alone, the run gets an id of its own.)
                        warn!(error = %e, "a replica cannot take a plan's inputs: it is hosted unreplicated");
                        None
                    }
                };
            }
        }
        let mut planned = match self.start_group(id, members.clone(), Saved::default(), log) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        if let Some(g) = lock(&self.inner.groups).get(id) {
            let _ = g.tx.send(Input::Propose(Record::Plan(plan)));
        }
        let names: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
        info!(run = %id, members = %names.join(","), "hosting a replicated run");
        let committed = tokio::time::timeout(COMMIT_WAIT, planned.wait_for(|p| *p)).await;
        if committed.is_err() {
            warn!(run = %id, "the plan is not committed by a majority yet; the run starts when it is");
        }
        Some(Ok(()))
    }

    /// Places the inputs of a new run (`tasks`, rewritten into its directory) from this
    /// node's file cache into the run's directory, then offers them to every other member
    /// at once, each over a connection of its own; returns once every member holds them
    /// all.
    async fn hand_inputs(
        &self,
        run: &str,
        members: &[Member],
        node_files: Arc<NodeFiles>,
        tasks: &[Task],
        inputs: &[SubmittedInput],
    ) -> Result<(), Handed> {
        {
            let this = self.clone();
            let (tasks, inputs) = (tasks.to_vec(), inputs.to_vec());
            tokio::task::spawn_blocking(move || {
                let _placing = lock(&this.inner.placing);
                files::place_inputs(&node_files, &tasks, &inputs)
            })
            .await
            .map_err(|e| Handed::Here(e.to_string()))?
            .map_err(Handed::Here)?;
        }
        let offered = Arc::new(files::placed_inputs(tasks, inputs));
        let mut shipping = Vec::new();
        for m in members
            .iter()
            .filter(|m| m.node != self.inner.config.me.node)
        {
            let Ok(addr) = m.addr.parse::<SocketAddr>() else {
                return Err(Handed::Replica(format!("{}: not an address", m.addr)));
            };
            let (this, offered) = (self.clone(), offered.clone());
            shipping.push(tokio::spawn(async move {
                this.ship(addr, &offered)
                    .await
                    .map_err(|e| format!("{addr}: {e}"))
            }));
        }
        let mut failed = Vec::new();
        for s in shipping {
            match s.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push(e),
                Err(e) => failed.push(e.to_string()),
            }
        }
        if !failed.is_empty() {
            return Err(Handed::Replica(failed.join("; ")));
        }
        info!(run = %run, files = offered.len(), "every member holds the run's inputs");
        Ok(())
    }

    /// Offers `inputs` to the node at `addr` on a connection of its own (the Files protocol,
    /// into its file cache, as `submit` ships them to a host); every wait bounded.
    async fn ship(&self, addr: SocketAddr, inputs: &[files::LocalInput]) -> Result<(), String> {
        let c = &self.inner.config;
        let (tx, mut rx) = mpsc::channel(64);
        let link = tokio::time::timeout(
            SHIP_WAIT,
            net::connect(addr, c.hello.clone(), &c.settings, 1, tx),
        )
        .await
        .map_err(|_| format!("cannot connect within {SHIP_WAIT:?}"))?
        .map_err(|e| e.to_string())?;
        let shipped = files::upload(&link, &mut rx, inputs, SHIP_WAIT).await;
        let _ = link.send(Command::Goodbye);
        shipped
    }

    /// Where this member keeps `run` (its log, inputs and the results of the tasks it
    /// coordinated), if it is a member of its group.
    pub fn run_dir(&self, run: &str) -> Option<PathBuf> {
        self.has(run).then(|| self.inner.config.dir.join(run))
    }

    /// The tasks of `plan` as this member runs them (see [`member_tasks`]), its inputs
    /// placed under the lock.
    fn own_tasks(&self, dir: &Path, plan: &Plan) -> Result<Vec<Task>, String> {
        let _placing = lock(&self.inner.placing);
        member_tasks(self.inner.host.inner.config.files.as_deref(), dir, plan)
    }

    /// Starts the thread of a group; returns whether its plan is committed, as it changes.
    fn start_group(
        &self,
        run: &str,
        members: Vec<Member>,
        saved: Saved,
        log: DiskLog,
    ) -> Result<watch::Receiver<bool>, String> {
        let me = members
            .iter()
            .position(|m| m.node == self.inner.config.me.node)
            .ok_or_else(|| "this node is not a member".to_string())? as u64
            + 1;
        let host_first = me == 1 && saved.entries.is_empty();
        let group =
            Group::new(run, members, me, saved, Box::new(log)).map_err(|e| e.to_string())?;
        let (tx, rx) = std_mpsc::channel();
        let (planned_tx, planned) = watch::channel(false);
        let queued = Arc::new(AtomicUsize::new(0));
        {
            let mut groups = lock(&self.inner.groups);
            if groups.contains_key(run) {
                return Err("this run's group exists".into());
            }
            if groups.len() >= self.inner.config.max_groups {
                return Err(format!(
                    "this node is a member of {} replicated runs already",
                    groups.len()
                ));
            }
            groups.insert(
                run.to_string(),
                GroupHandle {
                    tx: tx.clone(),
                    queued: queued.clone(),
                    planned: planned.clone(),
                },
            );
        }
        // What it kept as committed is reported before the node answers anyone.
        let mut group = group;
        let first = group.poll();
        if !self.handle(&mut group, first, &planned_tx) {
            lock(&self.inner.groups).remove(run);
            return Err("the run's group cannot go on".into());
        }
        let this = self.clone();
        let name = format!("raft-{}", &run[..run.len().min(8)]);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            this.group_loop(group, rx, tx, queued, planned_tx, host_first);
        });
        if let Err(e) = spawned {
            lock(&self.inner.groups).remove(run);
            return Err(format!("cannot start the run's group: {e}"));
        }
        Ok(planned)
    }

    fn group_loop(
        &self,
        mut group: Group,
        rx: std_mpsc::Receiver<Input>,
        tx: std_mpsc::Sender<Input>,
        queued: Arc<AtomicUsize>,
        planned: watch::Sender<bool>,
        campaign: bool,
    ) {
        let run = group.run().to_string();
        let mut acting: Option<(u64, CancellationToken)> = None;
        // The host's plan, proposed (again every election timeout) until it is committed.
        let mut plan: Option<Plan> = None;
        let mut plan_ticks = 0usize;
        let mut ticks = 0u64;
        let mut pending: Option<Input> = None;
        let mut next = Instant::now() + TICK;
        if campaign {
            let out = group.campaign();
            if !self.handle(&mut group, out, &planned) {
                return;
            }
        }
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            let input = match pending.take() {
                Some(i) => Ok(i),
                None => rx.recv_timeout(wait),
            };
            let out = match input {
                Ok(Input::Raft(m)) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    group.step(*m)
                }
                Ok(Input::Propose(Record::Plan(p))) => {
                    plan = Some(p);
                    plan_ticks = ELECTION_TICKS;
                    Ok(Output::default())
                }
                Ok(Input::Propose(r)) => {
                    // What else the coordinator proposed meanwhile goes in the same write.
                    let mut batch = vec![r];
                    let mut rest = None;
                    while batch.len() < PROPOSE_BATCH {
                        match rx.try_recv() {
                            Ok(Input::Propose(Record::Plan(p))) => {
                                plan = Some(p);
                                plan_ticks = ELECTION_TICKS;
                            }
                            Ok(Input::Propose(r)) => batch.push(r),
                            Ok(other) => {
                                rest = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if let Some(other) = rest {
                        // Handled next round, in its order.
                        pending = Some(other);
                    }
                    match group.propose_all(&batch) {
                        Ok(out) => Ok(out),
                        // Not the leader (any more): the records are not this member's.
                        Err(super::replica::GroupError::Foreign(_)) => Ok(Output::default()),
                        Err(e) => Err(e),
                    }
                }
                Ok(Input::Cancel) => {
                    if group.is_leader() {
                        group.propose(&Record::Cancel)
                    } else {
                        if let Some(l) = group.leader() {
                            if let Ok(addr) = l.addr.parse() {
                                self.send(addr, Replica::Cancel { run: run.clone() });
                            }
                        }
                        Ok(Output::default())
                    }
                }
                Ok(Input::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    plan_ticks += 1;
                    ticks += 1;
                    next += TICK;
                    if next < Instant::now() {
                        next = Instant::now() + TICK;
                    }
                    if campaign
                        && ticks < ELECTION_TICKS as u64 * 5
                        && ticks.is_multiple_of(HOST_CAMPAIGN)
                        && group.leader().is_none()
                    {
                        // The host of a new group stands again soon: its first call may
                        // have reached replicas that could not answer yet (no connection
                        // back), and it should lead the first term, not a replica.
                        group.campaign()
                    } else {
                        group.tick()
                    }
                }
            };
            if !self.handle(&mut group, out, &planned) {
                break;
            }
            if group.machine().plan.is_some() {
                plan = None;
            }
            if let Some(p) = plan.as_ref().filter(|_| plan_ticks >= ELECTION_TICKS) {
                plan_ticks = 0;
                match group.propose_plan(p) {
                    Ok(out) => {
                        if !self.handle(&mut group, Ok(out), &planned) {
                            break;
                        }
                    }
                    // No leader known yet: again after an election timeout.
                    Err(super::replica::GroupError::Raft(_)) => {}
                    Err(e) => {
                        if !self.handle(&mut group, Err(e), &planned) {
                            break;
                        }
                    }
                }
            }
            // Acting starts or stops with what just happened.
            let now_acting = group.acting();
            match (&acting, now_acting) {
                (None, true) => {
                    let token = CancellationToken::new();
                    let term = group.term();
                    info!(run = %run, term, "coordinating this replicated run");
                    self.coordinate(&group, term, token.clone(), tx.clone());
                    acting = Some((term, token));
                }
                (Some((term, token)), false) => {
                    info!(run = %run, term = *term, "no longer coordinating this replicated run");
                    token.cancel();
                    acting = None;
                }
                _ => {}
            }
        }
        if let Some((_, token)) = acting {
            token.cancel();
        }
    }

    /// Sends and reports what a step produced; false when the group cannot go on.
    fn handle(
        &self,
        group: &mut Group,
        out: Result<Output, super::replica::GroupError>,
        planned: &watch::Sender<bool>,
    ) -> bool {
        let out = match out {
            Ok(o) => o,
            Err(super::replica::GroupError::Foreign(e)) => {
                tracing::debug!(run = %group.run(), error = %e, "replicated-run message dropped");
                return true;
            }
            Err(e) => {
                warn!(run = %group.run(), error = %e, "this member leaves the run's group");
                return false;
            }
        };
        for m in out.send {
            let to = m.to;
            let addr = group
                .members()
                .get((to - 1) as usize)
                .and_then(|p| p.addr.parse::<SocketAddr>().ok());
            let sent = addr.is_some_and(|a| self.send(a, Replica::Raft(Box::new(m))));
            if !sent {
                group.unreachable(to);
            }
        }
        let run = group.run().to_string();
        for a in out.applied {
            self.report(&run, group, a);
        }
        if group.machine().plan.is_some() {
            planned.send_replace(true);
        }
        true
    }

    /// What a group applied, to the registry (and the coordinator, for a cancel).
    fn report(&self, run: &str, group: &Group, a: Applied) {
        let host = &self.inner.host;
        match a {
            Applied::Plan(p) => {
                let ids = p2p_tasks::parse::parse(&p.name, &p.text)
                    .map(|t| t.into_iter().map(|t| t.id().to_owned()).collect())
                    .unwrap_or_default();
                let info = RunInfo {
                    run: run.to_string(),
                    name: p.name.clone(),
                    state: RunState::Running,
                    total: 0,
                    succeeded: 0,
                    failed: 0,
                    running: 0,
                    started_ms: p.started_ms,
                    ended_ms: None,
                };
                {
                    let mut reg = lock(&host.inner.registry);
                    reg.insert(info, ids, &|_| false, None);
                    reg.running(run);
                }
                if !p.inputs.is_empty() {
                    // This member's own copies, from its file cache, while it holds them
                    // (the cache may evict them before this member coordinates, if ever).
                    let (this, dir, run) = (
                        self.clone(),
                        self.inner.config.dir.join(run),
                        run.to_string(),
                    );
                    self.inner.runtime.spawn_blocking(move || {
                        if let Err(e) = this.own_tasks(&dir, &p) {
                            warn!(run = %run, error = %e, "cannot keep the run's inputs");
                        }
                    });
                }
            }
            Applied::Event { json, mark } => {
                let mark = mark
                    .as_ref()
                    .map(|m| (m.task.as_str(), m.state, m.node.as_str()));
                lock(&host.inner.registry).replicated_event(run, mark, json);
            }
            Applied::Cancel => {
                lock(&host.inner.registry).request_cancel(run);
                if let Some(t) = lock(&host.inner.tokens).get(run) {
                    t.cancel();
                }
            }
            Applied::End { state, exit } => {
                info!(run = %run, state = state.as_str(), term = group.term(), "replicated run ended");
                lock(&host.inner.registry).end(run, state, exit, now_ms());
            }
        }
    }

    /// Starts coordinating the run of `group` for `term`: its plan with the results
    /// committed so far as journal, each event proposed, and its end.
    fn coordinate(
        &self,
        group: &Group,
        term: u64,
        token: CancellationToken,
        tx: std_mpsc::Sender<Input>,
    ) {
        let Some(plan) = group.machine().plan.clone() else {
            return;
        };
        let run = group.run().to_string();
        let done = group.machine().succeeded.clone();
        let cancelled = group.machine().cancelled;
        let first = group.machine().events == 0;
        let dir = self.inner.config.dir.join(&run);
        let host = self.inner.host.clone();
        lock(&host.inner.tokens).insert(run.clone(), token.clone());
        if cancelled || host.inner.stop.is_cancelled() {
            token.cancel();
        }
        let this = self.clone();
        self.inner.runtime.spawn(async move {
            let own = {
                let (dir, plan) = (dir.clone(), plan.clone());
                tokio::task::spawn_blocking(move || this.own_tasks(&dir, &plan)).await
            };
            let tasks = match own.map_err(|e| e.to_string()) {
                Ok(Ok(t)) => t,
                Ok(Err(e)) | Err(e) => {
                    // Never a path of this node's own: the run ends, failed, saying why
                    // in this member's log.
                    warn!(run = %run, error = %e, "cannot coordinate this replicated run");
                    lock(&host.inner.tokens).remove(&run);
                    if !token.is_cancelled() {
                        let end = Record::End {
                            term,
                            state: RunState::Failed,
                            exit: 1,
                        };
                        let _ = tx.send(Input::Propose(end));
                    }
                    return;
                }
            };
            let path = dir.join(format!("journal-{term}"));
            let journal = {
                let tasks = tasks.clone();
                tokio::task::spawn_blocking(move || takeover_journal(&path, &tasks, &done)).await
            };
            let journal = match journal {
                Ok(Ok(j)) => j,
                Ok(Err(e)) => {
                    warn!(run = %run, error = %e, "cannot write the takeover journal");
                    return;
                }
                Err(e) => {
                    warn!(run = %run, error = %e, "cannot write the takeover journal");
                    return;
                }
            };
            let mut opts = run_options(&plan.options, host.inner.config.max_frame);
            // The results of the tasks this member coordinates stay with it, for `p2p-node
            // results` asked of it. A task that succeeded under an earlier coordinator and
            // declares outputs runs again here (the takeover journal records no outputs,
            // and a success whose outputs are not in the results directory is not
            // trusted): its dependents need the files, which went with that coordinator.
            opts.results = Some(dir.join(files::RESULTS));
            if first {
                // The run's first event, as a host alone reports it (once: a later
                // coordinator finds events in the log).
                let started = RunEvent::RunStarted {
                    schema: p2p_tasks::EVENT_SCHEMA,
                    run: run.clone(),
                    tasks: tasks.len(),
                    order: opts.policy.order.to_string(),
                };
                if let Some(json) = capped_json(&started) {
                    let record = Record::Event {
                        term,
                        json,
                        mark: None,
                    };
                    let _ = tx.send(Input::Propose(record));
                }
            }
            let propose = {
                let tx = Mutex::new(tx.clone());
                move |ev: &RunEvent| {
                    let json = match ev {
                        RunEvent::Phase(_) | RunEvent::Notice(_) | RunEvent::Flush => None,
                        ev => capped_json(ev),
                    };
                    if let Some(json) = json {
                        let record = Record::Event {
                            term,
                            json,
                            mark: mark_of(ev),
                        };
                        let _ = lock(&tx).send(Input::Propose(record));
                    }
                }
            };
            let outcome = host
                .drive(tasks, opts, journal, token.clone(), &propose)
                .await;
            let cancel_asked = lock(&host.inner.registry).cancel_requested(&run);
            lock(&host.inner.tokens).remove(&run);
            if token.is_cancelled() && !cancel_asked {
                // Deposed, or this node stops: the run's end is not this coordinator's.
                return;
            }
            let (state, exit) = super::end_of(cancel_asked, &outcome);
            if state.is_finished() {
                let _ = tx.send(Input::Propose(Record::End { term, state, exit }));
            }
        });
    }

    /// Queues `msg` to the member at `addr`; false if it is not connected (a connection is
    /// being made).
    fn send(&self, addr: SocketAddr, msg: Replica) -> bool {
        if addr.to_string() == self.inner.config.me.addr {
            return false;
        }
        let link = lock(&self.inner.peers)
            .get(&addr)
            .and_then(|p| p.link.clone());
        match link {
            Some(l) => l.send(Command::Replica(Box::new(msg))).is_ok(),
            None => {
                self.dial(addr);
                false
            }
        }
    }

    /// Connects to `addr` in the background, unless connected or connecting; the
    /// connection is made again after it closes, as long as this node replicates.
    fn dial(&self, addr: SocketAddr) {
        {
            let mut peers = lock(&self.inner.peers);
            let p = peers.entry(addr).or_insert(PeerLink {
                link: None,
                dialing: false,
            });
            if p.dialing || p.link.is_some() {
                return;
            }
            p.dialing = true;
        }
        let this = self.clone();
        self.inner.runtime.spawn(async move {
            let c = &this.inner.config;
            let (tx, mut rx) = mpsc::channel(16);
            let link = net::connect(addr, c.hello.clone(), &c.settings, 1, tx).await;
            let ok = link.is_ok();
            {
                let mut peers = lock(&this.inner.peers);
                if let Some(p) = peers.get_mut(&addr) {
                    p.link = link.ok();
                    if !ok {
                        p.dialing = false;
                    }
                }
            }
            if !ok {
                tokio::select! {
                    () = tokio::time::sleep(REDIAL) => {}
                    () = this.inner.stop.cancelled() => {}
                }
                return;
            }
            // Drain the link's events until it closes.
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some((_, LinkEvent::Closed { .. })) | None => break,
                        Some(_) => {}
                    },
                    () = this.inner.stop.cancelled() => break,
                }
            }
            if let Some(p) = lock(&this.inner.peers).get_mut(&addr) {
                p.link = None;
                p.dialing = false;
            }
            if this.inner.stop.is_cancelled() {
                return;
            }
            tokio::time::sleep(REDIAL).await;
            this.dial(addr);
        });
    }

    /// A peer's message (on a connection's task: queues, never waits).
    fn take(&self, msg: Replica, peer: &Hello) {
        match msg {
            Replica::Cancel { run } => {
                if let Some(g) = lock(&self.inner.groups).get(&run) {
                    let _ = g.tx.send(Input::Cancel);
                }
            }
            Replica::Raft(m) => {
                // The sender is the member its Raft id names.
                let from = m.members.get((m.from - 1) as usize).map(|p| p.node);
                if from != Some(peer.node_id) {
                    return;
                }
                let run = m.run.clone();
                // (The lock is released before `join` takes it again.)
                let known = lock(&self.inner.groups).contains_key(&run);
                if !known && !self.join(&m) {
                    return;
                }
                if let Some(g) = lock(&self.inner.groups).get(&run) {
                    if g.queued.load(Ordering::Relaxed) >= NET_QUEUE {
                        return;
                    }
                    g.queued.fetch_add(1, Ordering::Relaxed);
                    let _ = g.tx.send(Input::Raft(m));
                }
            }
        }
    }

    /// A member chose this node as a replica of its run: the group is made here.
    fn join(&self, m: &RaftMessage) -> bool {
        if self.inner.stop.is_cancelled()
            || !is_run_id(&m.run)
            || !m
                .members
                .iter()
                .any(|p| p.node == self.inner.config.me.node)
            || lock(&self.inner.groups).len() >= self.inner.config.max_groups
        {
            return false;
        }
        let dir = self.inner.config.dir.join(&m.run);
        if dir.exists() {
            // A group this node kept and left (a failed disk): not made again.
            return false;
        }
        // On a connection's task: the files are few and small, made once per run.
        let log = match DiskLog::create(&dir, &m.members) {
            Ok(l) => l,
            Err(e) => {
                warn!(run = %m.run, error = %e, "cannot keep a replicated run's log");
                return false;
            }
        };
        match self.start_group(&m.run, m.members.clone(), Saved::default(), log) {
            Ok(_) => {
                info!(run = %m.run, "replicating a run");
                true
            }
            Err(e) => {
                warn!(run = %m.run, error = %e, "cannot replicate a run");
                false
            }
        }
    }

    /// Whether the plan of `run` is committed here.
    pub fn planned(&self, run: &str) -> bool {
        lock(&self.inner.groups)
            .get(run)
            .is_some_and(|g| *g.planned.borrow())
    }
}

fn service_of(weak: Weak<Inner>) -> ReplicaService {
    ReplicaService(Arc::new(move |msg: Replica, peer: &Hello| {
        if let Some(inner) = weak.upgrade() {
            Replicas { inner }.take(msg, peer);
        }
    }))
}

/// Why a new run's inputs could not be handed to its group.
enum Handed {
    /// This node cannot place them (the submit is refused).
    Here(String),
    /// A replica cannot take them (the run is hosted alone).
    Replica(String),
}

/// The tasks of `plan` as a member runs them: every `< PATH` input pointed at the member's
/// own copy in `dir` (`dir/inputs/HASH/NAME`), placed there from its file cache (`files`)
/// unless it is there already. A member that lacks an input fails here, naming it: it
/// never reads a path of its own.
pub fn member_tasks(
    node_files: Option<&NodeFiles>,
    dir: &Path,
    plan: &Plan,
) -> Result<Vec<Task>, String> {
    let mut tasks = p2p_tasks::parse::parse(&plan.name, &plan.text).map_err(|e| e.to_string())?;
    files::rewrite_inputs(&mut tasks, dir, &plan.inputs)?;
    if files::has_path_inputs(&tasks) {
        let Some(f) = node_files else {
            return Err("this node keeps no files: it cannot hold the run's inputs".into());
        };
        files::place_inputs(f, &tasks, &plan.inputs)
            .map_err(|e| format!("this member lacks an input of the run: {e}"))?;
    }
    Ok(tasks)
}

/// A coordinator's journal at a takeover: the plan's header and the tasks committed as
/// succeeded, synced, then opened to resume.
fn takeover_journal(
    path: &std::path::Path,
    tasks: &[Task],
    done: &[String],
) -> Result<Journal, String> {
    let kinds: HashMap<&str, &str> = tasks.iter().map(|t| (t.id(), t.kind())).collect();
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| e.to_string())?;
    }
    {
        let mut j = Journal::open(path, tasks, false).map_err(|e| e.to_string())?;
        for id in done {
            let Some(kind) = kinds.get(id.as_str()) else {
                continue;
            };
            j.append(&TaskResult::new(id.clone(), kind, Status::Succeeded))
                .map_err(|e| e.to_string())?;
        }
        j.sync().map_err(|e| e.to_string())?;
    }
    Journal::open(path, tasks, true).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::unix::fs::MetadataExt;

    use p2p_core::hosted::SubmitOptions;
    use p2p_tasks::cache::{Cache, DEFAULT_CACHE_SIZE};
    use p2p_tasks::task::Input;

    use super::*;

    fn node_files(dir: &Path, holding: Option<&Path>) -> NodeFiles {
        let mut cache = Cache::open(dir, DEFAULT_CACHE_SIZE).unwrap();
        if let Some(file) = holding {
            let (hash, size) = p2p_tasks::node_files::hash_file(file).unwrap();
            let copy = dir.join("incoming");
            std::fs::copy(file, &copy).unwrap();
            cache.commit_path(&copy, hash, size).unwrap();
        }
        NodeFiles::new(cache, DEFAULT_CACHE_SIZE, 1 << 20)
    }

    fn plan(text: &str, inputs: Vec<SubmittedInput>) -> Plan {
        Plan {
            name: "t".into(),
            text: text.into(),
            options: SubmitOptions {
                order: 0,
                retries: 0,
                keep_going: false,
                retry_backoff_ms: 100,
                retry_backoff_max_ms: 100,
                task_timeout_ms: 0,
                discovery_timeout_ms: 1000,
            },
            started_ms: 1,
            inputs,
        }
    }

    #[test]
    fn a_member_runs_the_plan_from_its_own_copies_and_fails_without_them() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("in.txt");
        std::fs::write(&src, "payload\n").unwrap();
        let (hash, size) = p2p_tasks::node_files::hash_file(&src).unwrap();
        let shipped = vec![SubmittedInput {
            path: "data/in.txt".into(),
            hash,
            size,
        }];
        let p = plan("a1 < data/in.txt\na2 < data/in.txt\n", shipped);
        let run = tmp.path().join("run");
        let dest = run.join("inputs").join(hash.to_hex()).join("in.txt");

        // A member whose cache holds the input: the tasks read its copy in the run.
        let holding = node_files(&tmp.path().join("cache"), Some(&src));
        let tasks = member_tasks(Some(&holding), &run, &p).unwrap();
        assert_eq!(tasks[0].inputs(), [Input::Path(dest.clone())]);
        assert_eq!(tasks[1].inputs(), [Input::Path(dest.clone())]);
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "payload\n");
        // Placed again (to coordinate): the copy is kept as it is, not written over.
        let ino = std::fs::metadata(&dest).unwrap().ino();
        member_tasks(Some(&holding), &run, &p).unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().ino(), ino);
        // A copy cut short is replaced.
        std::fs::remove_file(&dest).unwrap();
        std::fs::write(&dest, "pay").unwrap();
        member_tasks(Some(&holding), &run, &p).unwrap();
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "payload\n");

        // A member that lacks it fails, naming it, and reads no path of its own (a file
        // at the path the plan writes is never used).
        std::fs::create_dir_all(tmp.path().join("data")).unwrap();
        std::fs::write(tmp.path().join("data/in.txt"), "payload\n").unwrap();
        let lacking = node_files(&tmp.path().join("empty"), None);
        let other = tmp.path().join("other");
        let err = member_tasks(Some(&lacking), &other, &p).unwrap_err();
        assert!(err.contains("lacks an input"), "{err}");
        assert!(err.contains("data/in.txt"), "{err}");
        assert!(!other
            .join("inputs")
            .join(hash.to_hex())
            .join("in.txt")
            .exists());
        // A node that keeps no files cannot hold them; a plan without inputs needs none.
        let err = member_tasks(None, &other, &p).unwrap_err();
        assert!(err.contains("keeps no files"), "{err}");
        assert_eq!(
            member_tasks(None, &other, &plan("a1 a2", Vec::new()))
                .unwrap()
                .len(),
            2
        );
        // A plan naming an input that was not shipped with it is refused.
        let err =
            member_tasks(Some(&holding), &run, &plan("a1 < x\n", p.inputs.clone())).unwrap_err();
        assert!(err.contains("was not sent"), "{err}");
    }

    #[test]
    fn the_inputs_offered_to_a_replica_are_each_hash_once_from_the_runs_copies() {
        let h = |b: u8| p2p_core::ContentHash([b; 32]);
        let inputs = vec![
            SubmittedInput {
                path: "a.txt".into(),
                hash: h(1),
                size: 1,
            },
            SubmittedInput {
                path: "b/a.txt".into(),
                hash: h(2),
                size: 2,
            },
            SubmittedInput {
                path: "same.txt".into(),
                hash: h(1),
                size: 1,
            },
        ];
        let mut tasks =
            p2p_tasks::parse::parse("t", "a1 < a.txt\na2 < same.txt < b/a.txt\n").unwrap();
        let run = Path::new("/r");
        files::rewrite_inputs(&mut tasks, run, &inputs).unwrap();
        let offered = files::placed_inputs(&tasks, &inputs);
        let got: Vec<(PathBuf, u64)> = offered
            .iter()
            .map(|o| (o.file.clone(), o.submitted.size))
            .collect();
        assert_eq!(
            got,
            [
                (run.join("inputs").join(h(1).to_hex()).join("a.txt"), 1),
                (run.join("inputs").join(h(2).to_hex()).join("a.txt"), 2),
            ]
        );
    }
}
