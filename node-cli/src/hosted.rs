//! Hosted runs: a serving node runs plans that clients submit (`p2p-node submit`), journaled
//! in its data directory, so that they outlive the client's terminal and resume by
//! themselves after the node restarts.
//!
//! # Layout
//!
//! - [`registry`]: the runs, their states, counts, bounds and attached clients, with no IO.
//! - [`Host`]: the IO: answers the hosted-run requests of [`p2p_core::hosted`] (installed
//!   with [`crate::Node::host_runs`]), writes each run to `DIR/ID/` (`serve` uses
//!   `DATA/runs/NODE_ID` as `DIR`) (its task file, options,
//!   journal, and its end), runs it through a coordinator node of its own (made by
//!   [`HostConfig::coordinator`]: the node's discovery, and the node itself as a peer), and
//!   resumes the unfinished ones at start.
//! - [`request`]: the client side: one request to one node, its answers as they come.
//!
//! # On disk
//!
//! `DIR/ID/plan.txt` (the task file), `options.json`, `meta.json` (name, submitted at) and
//! `journal` (see [`p2p_tasks::Journal`]) are written and synced before the client is told
//! the run's id; `ended.json` (state, exit status, counts) once the run is over for good. A
//! run without `ended.json` resumes at the next start: tasks its journal records as
//! succeeded never run again, each final result is reported once, and attempts in flight
//! at a crash run again (at-least-once execution).

pub mod files;
pub mod registry;
pub mod replica;
pub mod replica_disk;
pub mod replica_io;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use p2p_core::hosted::{Hosted, RunInfo, RunState, Submit, SubmitOptions, SubmittedInput};
use p2p_core::net::{self, Command, HostedService, LinkEvent, Settings};
use p2p_core::Hello;
use p2p_tasks::{Backoff, Journal, Order, Policy, RunEvent, RunOptions, RunReport, Task};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::{Error, Node};
use registry::{Limits, Registry};

/// Makes the coordinator node of one hosted run.
pub type CoordinatorFactory =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Node, Error>> + Send>> + Send + Sync>;

/// How a node hosts runs.
#[derive(Clone)]
pub struct HostConfig {
    /// Where the runs are kept (`DATA/runs/NODE_ID` for `serve`).
    pub dir: PathBuf,
    /// The registry's bounds.
    pub limits: Limits,
    /// Makes the coordinator of a run (with the node's cluster, key and discovery).
    pub coordinator: CoordinatorFactory,
    /// Peers every run dials besides discovery (the hosting node itself).
    pub peers: Vec<SocketAddr>,
    /// The node's maximum frame: a run sends nothing larger.
    pub max_frame: usize,
    /// The node's file cache, where a client's `submit` leaves the plan's input files
    /// (`None`: plans with input files are refused).
    pub files: Option<Arc<p2p_tasks::node_files::NodeFiles>>,
}

impl std::fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConfig")
            .field("dir", &self.dir)
            .field("limits", &self.limits)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// The exit status of a run that its host interrupted (it resumes when the host restarts).
pub const EXIT_INTERRUPTED: u8 = 143;

/// The exit status of a cancelled run.
pub const EXIT_CANCELLED: u8 = 130;

/// The longest event sent to attached clients, in bytes of JSON: a task's output is cut
/// (and marked) to fit, so a run's kept events and a client's queue stay small.
pub const EVENT_CAP: usize = 16 * 1024;

/// Answers in flight between an attached client's queue and its connection.
const FORWARD: usize = 16;

/// How often finished runs past their retention are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
struct Meta {
    name: String,
    started_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Ended {
    state: RunState,
    exit: u8,
    ended_ms: u64,
    total: u64,
    succeeded: u64,
    failed: u64,
}

/// A run written to disk: its id, summary, tasks, options and open journal.
type Written = (String, RunInfo, Vec<Task>, SubmitOptions, Journal);

struct Inner {
    config: HostConfig,
    registry: Mutex<Registry>,
    /// Each running run's coordinator shutdown token.
    tokens: Mutex<std::collections::HashMap<String, CancellationToken>>,
    stop: CancellationToken,
    tracker: TaskTracker,
    /// Replication to other nodes (#19 stage 2), when set up.
    replicas: std::sync::OnceLock<replica_io::Replicas>,
}

/// The runs a node hosts (see the module documentation). Cheap to clone.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes `bytes` to `path` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// The run options of a submit.
pub fn run_options(o: &SubmitOptions, max_frame: usize) -> RunOptions {
    let order = match o.order {
        1 => Order::Type,
        2 => Order::None,
        _ => Order::Strict,
    };
    let backoff = Backoff::new(
        Duration::from_millis(o.retry_backoff_ms),
        Duration::from_millis(o.retry_backoff_max_ms.max(o.retry_backoff_ms)),
        Backoff::default().jitter,
    );
    RunOptions::default()
        .policy(
            Policy::default()
                .order(order)
                .retries(o.retries)
                .keep_going(o.keep_going)
                .backoff(backoff),
        )
        .task_timeout(Duration::from_millis(o.task_timeout_ms))
        .discovery_timeout(Duration::from_millis(o.discovery_timeout_ms))
        .max_frame(max_frame)
}

/// The wire form of an order.
pub fn order_code(order: Order) -> u8 {
    match order {
        Order::Strict => 0,
        Order::Type => 1,
        Order::None => 2,
        // An order this build does not know is sent as strict, the safest.
        _ => 0,
    }
}

impl Host {
    /// A host keeping its runs in `config.dir` (created if missing). Call
    /// [`Host::resume`] to restart the unfinished runs found there.
    pub fn new(config: HostConfig) -> Result<Host, Error> {
        // Plans and results are the users' business: the directories are the node's only.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.dir)?;
        let registry = Mutex::new(Registry::new(config.limits.clone()));
        Ok(Host {
            inner: Arc::new(Inner {
                config,
                registry,
                tokens: Mutex::default(),
                stop: CancellationToken::new(),
                tracker: TaskTracker::new(),
                replicas: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Replicates the runs this node hosts from now on, and takes part in other hosts'
    /// groups, with `replicas` (see [`replica_io`]); set once, before [`Host::resume`].
    pub fn replicate(&self, replicas: replica_io::Replicas) {
        let _ = self.inner.replicas.set(replicas);
    }

    /// Loads the runs of the data directory: finished ones are listed, unfinished ones
    /// resume. Returns how many resumed. Must be called within a tokio runtime.
    pub fn resume(&self) -> Result<usize, Error> {
        let mut resumed = 0;
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&self.inner.config.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for dir in dirs {
            let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            match self.load(&id, &dir) {
                Ok(true) => resumed += 1,
                Ok(false) => {}
                Err(e) => warn!(run = %id, error = %e, "cannot load this hosted run; skipped"),
            }
        }
        if let Some(r) = self.inner.replicas.get() {
            let groups = r.resume()?;
            if groups > 0 {
                info!(groups, "resuming the groups of replicated runs");
            }
        }
        let host = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => host.prune(),
                    () = host.inner.stop.cancelled() => return,
                }
            }
        });
        Ok(resumed)
    }

    fn load(&self, id: &str, dir: &Path) -> Result<bool, String> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| format!("{name}: {e}"))
        };
        let meta: Meta = serde_json::from_str(&read("meta.json")?).map_err(|e| e.to_string())?;
        let options: SubmitOptions =
            serde_json::from_str(&read("options.json")?).map_err(|e| e.to_string())?;
        let mut tasks =
            p2p_tasks::parse::parse(&meta.name, &read("plan.txt")?).map_err(|e| e.to_string())?;
        // Runs written before inputs were shipped have no record: they have no inputs.
        let inputs: Vec<SubmittedInput> = match read(files::INPUTS_RECORD) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| e.to_string())?,
            Err(_) => Vec::new(),
        };
        files::rewrite_inputs(&mut tasks, dir, &inputs)?;
        let ids: Vec<String> = tasks.iter().map(|t| t.id().to_owned()).collect();
        let info = RunInfo {
            run: id.to_string(),
            name: meta.name.clone(),
            state: RunState::Running,
            total: 0,
            succeeded: 0,
            failed: 0,
            running: 0,
            started_ms: meta.started_ms,
            ended_ms: None,
        };
        if let Ok(text) = read("ended.json") {
            let ended: Ended = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let mut info = info;
            info.state = ended.state;
            info.ended_ms = Some(ended.ended_ms);
            let mut reg = lock(&self.inner.registry);
            reg.insert(info, Vec::new(), &|_| false, Some(ended.exit));
            reg.set_final_counts(id, ended.total, ended.succeeded, ended.failed);
            return Ok(false);
        }
        let journal =
            Journal::open(&dir.join("journal"), &tasks, true).map_err(|e| e.to_string())?;
        let done = journal.done().clone();
        lock(&self.inner.registry).insert(info, ids, &|t| done.contains(t), None);
        info!(run = %id, done = done.len(), tasks = tasks.len(), "resuming a hosted run");
        self.spawn(id.to_string(), tasks, options, journal);
        Ok(true)
    }

    fn prune(&self) {
        let gone = lock(&self.inner.registry).prune(now_ms());
        for id in gone {
            if let Some(r) = self.inner.replicas.get().filter(|r| r.has(&id)) {
                r.forget(&id);
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(self.inner.config.dir.join(&id)) {
                warn!(run = %id, error = %e, "cannot remove a finished hosted run's files");
            }
        }
    }

    /// What answers hosted-run requests; give it to [`crate::Node::host_runs`].
    pub fn service(&self) -> HostedService {
        let host = self.clone();
        HostedService(Arc::new(move |req, peer| host.answer(req, peer)))
    }

    /// Interrupts every run (they resume at the next start) and waits, at most `limit`,
    /// for them to write down where they are.
    pub async fn stop(&self, limit: Duration) {
        self.inner.stop.cancel();
        if let Some(r) = self.inner.replicas.get() {
            r.stop();
        }
        for t in lock(&self.inner.tokens).values() {
            t.cancel();
        }
        self.inner.tracker.close();
        let _ = tokio::time::timeout(limit, self.inner.tracker.wait()).await;
    }

    fn answer(&self, req: Hosted, peer: &Hello) -> mpsc::Receiver<Hosted> {
        let (tx, rx) = mpsc::channel(1);
        let one = |h: Hosted| {
            let _ = tx.try_send(h);
        };
        let refused = |reason: String| Hosted::Refused { reason };
        match req {
            Hosted::Submit(_) | Hosted::SubmitFiles(_) => {
                let (s, inputs) = match req {
                    Hosted::Submit(s) => (*s, None),
                    Hosted::SubmitFiles(f) => (f.submit, Some(f.inputs)),
                    _ => return rx,
                };
                let host = self.clone();
                let client = peer.node_id.short();
                self.inner.tracker.spawn(async move {
                    let answer = match host.submit(s, inputs).await {
                        Ok(id) => {
                            info!(run = %id, client = %client, "hosting a submitted run");
                            Hosted::Submitted { run: id }
                        }
                        Err(reason) => refused(reason),
                    };
                    let _ = tx.send(answer).await;
                });
            }
            Hosted::List => one(Hosted::Runs(lock(&self.inner.registry).list())),
            Hosted::Status { run } => match lock(&self.inner.registry).detail(&run) {
                Some(d) => one(Hosted::RunStatus(Box::new(d))),
                None => one(refused(format!("no run {run} on this node"))),
            },
            Hosted::Attach { run } => match lock(&self.inner.registry).attach(&run) {
                Ok(mut sub) => {
                    // Moves the client's queue to its connection, freeing room as it goes.
                    let (out, answers) = mpsc::channel(FORWARD);
                    tokio::spawn(async move {
                        while let Some(h) = sub.rx.recv().await {
                            sub.taken(&h);
                            if out.send(h).await.is_err() {
                                return;
                            }
                        }
                    });
                    return answers;
                }
                Err(reason) => one(refused(reason)),
            },
            Hosted::Cancel { run } if self.inner.replicas.get().is_some_and(|r| r.has(&run)) => {
                // Recorded in the run's log by its leader (this member forwards it there).
                let known = lock(&self.inner.registry)
                    .state(&run)
                    .is_some_and(|s| !s.is_finished());
                if known && self.inner.replicas.get().is_some_and(|r| r.cancel(&run)) {
                    info!(run = %run, "replicated run cancelled by a client");
                    one(Hosted::Cancelled { run });
                } else {
                    one(refused(format!("no unfinished run {run} on this node")));
                }
            }
            Hosted::Cancel { run } => {
                let known = lock(&self.inner.registry).request_cancel(&run);
                if known {
                    if let Some(t) = lock(&self.inner.tokens).get(&run) {
                        t.cancel();
                    }
                    info!(run = %run, "hosted run cancelled by a client");
                    one(Hosted::Cancelled { run });
                } else {
                    one(refused(format!("no unfinished run {run} on this node")));
                }
            }
            Hosted::Results { run } => {
                let known = is_run_id(&run) && lock(&self.inner.registry).detail(&run).is_some();
                if !known {
                    one(refused(format!("no run {run} on this node")));
                    return rx;
                }
                // A replicated run's results are those of the tasks this member coordinated.
                let dir = match self.inner.replicas.get().and_then(|r| r.run_dir(&run)) {
                    Some(d) => d,
                    None => self.inner.config.dir.join(&run),
                };
                let root = dir.join(files::RESULTS);
                tokio::task::spawn_blocking(move || files::stream_results(&root, &tx));
            }
            other => one(refused(format!("{} is not a request", other.kind()))),
        }
        rx
    }

    /// Checks, writes and starts a submitted run; its id, or why not.
    async fn submit(
        &self,
        s: Submit,
        inputs: Option<Vec<SubmittedInput>>,
    ) -> Result<String, String> {
        lock(&self.inner.registry).admit(s.text.len())?;
        if let Some(r) = self.inner.replicas.get() {
            let checked = p2p_tasks::parse::parse(&s.name, &s.text)
                .map_err(|e| e.to_string())
                .and_then(|tasks| {
                    let opts = run_options(&s.options, self.inner.config.max_frame);
                    p2p_tasks::runcore::validate(&tasks, &opts).map_err(|e| e.to_string())
                });
            if let Err(e) = checked {
                lock(&self.inner.registry).release();
                return Err(e);
            }
            let id = p2p_core::NodeId::random().to_string();
            let replicated = r.submit(&id, &s, inputs.as_deref()).await;
            lock(&self.inner.registry).release();
            match replicated {
                Some(Ok(())) => return Ok(id),
                Some(Err(e)) => return Err(e),
                // Too few replicas: hosted here alone, as stage 1 does.
                None => lock(&self.inner.registry).admit(s.text.len())?,
            }
        }
        let written = self.write(s, inputs).await;
        let mut reg = lock(&self.inner.registry);
        reg.release();
        let (id, info, tasks, options, journal) = written?;
        let ids = tasks.iter().map(|t| t.id().to_owned()).collect();
        reg.insert(info, ids, &|_| false, None);
        drop(reg);
        self.spawn(id.clone(), tasks, options, journal);
        Ok(id)
    }

    /// Checks a submitted run and writes it to disk, synced.
    async fn write(
        &self,
        s: Submit,
        inputs: Option<Vec<SubmittedInput>>,
    ) -> Result<Written, String> {
        let mut tasks = p2p_tasks::parse::parse(&s.name, &s.text).map_err(|e| e.to_string())?;
        let opts = run_options(&s.options, self.inner.config.max_frame);
        p2p_tasks::runcore::validate(&tasks, &opts).map_err(|e| e.to_string())?;
        let id = p2p_core::NodeId::random().to_string();
        let dir = self.inner.config.dir.join(&id);
        let inputs = inputs.unwrap_or_default();
        // Inputs come from the client, never from the host's own files.
        files::rewrite_inputs(&mut tasks, &dir, &inputs)?;
        let node_files = self.inner.config.files.clone();
        if files::has_path_inputs(&tasks) && node_files.is_none() {
            return Err("this node keeps no files: it cannot host a plan with input files".into());
        }
        let inputs_record = serde_json::to_vec(&inputs).map_err(|e| e.to_string())?;
        let started_ms = now_ms();
        let meta = Meta {
            name: s.name.clone(),
            started_ms,
        };
        let (tasks, journal) = {
            let (dir, parent) = (dir.clone(), self.inner.config.dir.clone());
            let options = serde_json::to_vec(&s.options).map_err(|e| e.to_string())?;
            let meta = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
            let text = s.text;
            tokio::task::spawn_blocking(move || {
                let io =
                    |e: std::io::Error| format!("cannot write the run to {}: {e}", dir.display());
                std::fs::create_dir(&dir).map_err(io)?;
                let placed = match &node_files {
                    Some(f) => files::place_inputs(f, &tasks, &inputs),
                    None => Ok(()),
                };
                if let Err(e) = placed {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
                write_synced(&dir.join(files::INPUTS_RECORD), &inputs_record).map_err(io)?;
                write_synced(&dir.join("plan.txt"), text.as_bytes()).map_err(io)?;
                write_synced(&dir.join("options.json"), &options).map_err(io)?;
                write_synced(&dir.join("meta.json"), &meta).map_err(io)?;
                let journal =
                    Journal::open(&dir.join("journal"), &tasks, true).map_err(|e| e.to_string())?;
                sync_dir(&dir).map_err(io)?;
                sync_dir(&parent).map_err(io)?;
                Ok::<_, String>((tasks, journal))
            })
            .await
            .map_err(|e| e.to_string())??
        };
        let info = RunInfo {
            run: id.clone(),
            name: s.name,
            state: RunState::Running,
            total: 0,
            succeeded: 0,
            failed: 0,
            running: 0,
            started_ms,
            ended_ms: None,
        };
        Ok((id, info, tasks, s.options, journal))
    }

    fn spawn(&self, id: String, tasks: Vec<Task>, options: SubmitOptions, journal: Journal) {
        let token = CancellationToken::new();
        lock(&self.inner.tokens).insert(id.clone(), token.clone());
        if self.inner.stop.is_cancelled() {
            token.cancel();
        }
        let host = self.clone();
        self.inner.tracker.spawn(async move {
            let mut opts = run_options(&options, host.inner.config.max_frame);
            // Every task's results stay with the run, for `p2p-node results`.
            opts.results = Some(host.inner.config.dir.join(&id).join(files::RESULTS));
            let order = opts.policy.order.to_string();
            lock(&host.inner.registry).running(&id);
            host.event(
                &id,
                &RunEvent::RunStarted {
                    schema: p2p_tasks::EVENT_SCHEMA,
                    run: id.clone(),
                    tasks: tasks.len(),
                    order,
                },
            );
            let sink = |ev: &RunEvent| host.event(&id, ev);
            let outcome = host.drive(tasks, opts, journal, token, &sink).await;
            lock(&host.inner.tokens).remove(&id);
            host.finish(&id, outcome);
        });
    }

    async fn drive(
        &self,
        tasks: Vec<Task>,
        opts: RunOptions,
        journal: Journal,
        token: CancellationToken,
        sink: &(dyn Fn(&RunEvent) + Send + Sync),
    ) -> Result<RunReport, String> {
        let mut node = (self.inner.config.coordinator)()
            .await
            .map_err(|e| e.to_string())?;
        let shutdown = node.shutdown_token();
        let watch = tokio::spawn(async move {
            token.cancelled().await;
            shutdown.cancel();
        });
        let peers = self.inner.config.peers.clone();
        let report = node
            .run(tasks)
            .options(opts)
            .peers(peers)
            .journal(journal)
            .on_event(sink)
            .await;
        watch.abort();
        report.map_err(|e| e.to_string())
    }

    fn event(&self, id: &str, ev: &RunEvent) {
        let json = match ev {
            RunEvent::Phase(_)
            | RunEvent::Notice(_)
            | RunEvent::Flush
            | RunEvent::TasksSucceeded { .. } => None,
            ev => capped_json(ev),
        };
        lock(&self.inner.registry).event(id, ev, json);
    }

    fn finish(&self, id: &str, outcome: Result<RunReport, String>) {
        let cancelled = lock(&self.inner.registry).cancel_requested(id);
        if let Err(e) = &outcome {
            let notice = RunEvent::Notice(e.clone());
            warn!(run = %id, error = %e, "hosted run failed to run");
            lock(&self.inner.registry).event(id, &notice, None);
        }
        let (state, exit) = end_of(cancelled, &outcome);
        let ended_ms = now_ms();
        if state.is_finished() {
            let (total, succeeded, failed) = match &outcome {
                Ok(r) => (
                    r.results.len() as u64,
                    r.succeeded() as u64,
                    r.failed() as u64,
                ),
                Err(_) => (0, 0, 0),
            };
            let ended = Ended {
                state,
                exit,
                ended_ms,
                total,
                succeeded,
                failed,
            };
            let path = self.inner.config.dir.join(id).join("ended.json");
            let written = serde_json::to_vec(&ended)
                .map_err(std::io::Error::other)
                .and_then(|b| write_synced(&path, &b));
            if let Err(e) = written {
                warn!(run = %id, error = %e, "cannot record the end of a hosted run; it will run again at the next start");
            }
        }
        info!(run = %id, state = state.as_str(), "hosted run ended");
        lock(&self.inner.registry).end(id, state, exit, ended_ms);
    }
}

/// Whether `run` can be a run id (hex digits, as [`p2p_core::NodeId`] prints them): what
/// may name a directory of the host.
fn is_run_id(run: &str) -> bool {
    !run.is_empty()
        && run.len() <= p2p_core::hosted::MAX_RUN_ID
        && run.bytes().all(|b| b.is_ascii_hexdigit())
}

/// How a run ended, and its exit status, from its coordinator's outcome.
fn end_of(cancelled: bool, outcome: &Result<RunReport, String>) -> (RunState, u8) {
    match outcome {
        _ if cancelled => (RunState::Cancelled, EXIT_CANCELLED),
        Ok(r) if r.interrupted => (RunState::Interrupted, EXIT_INTERRUPTED),
        Ok(r) if r.is_success() => (RunState::Succeeded, 0),
        Ok(_) | Err(_) => (RunState::Failed, 1),
    }
}

/// `ev` as JSON of at most [`EVENT_CAP`] bytes: a task's output (and error) cut to fit,
/// with a note of how much was cut; `None` if it cannot fit at all.
fn capped_json(ev: &RunEvent) -> Option<String> {
    let json = serde_json::to_string(ev).ok()?;
    if json.len() <= EVENT_CAP {
        return Some(json);
    }
    let cut = |s: &str| -> String {
        let keep = EVENT_CAP / 4;
        if s.len() <= keep {
            return s.to_string();
        }
        let mut end = keep;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!(
            "{}\n[cut: {} more bytes; attach shows at most {keep}]",
            &s[..end],
            s.len() - end
        )
    };
    let mut ev = ev.clone();
    match &mut ev {
        RunEvent::TaskCompleted { output, .. } => *output = cut(output).into(),
        RunEvent::TaskFailed { output, error, .. } => {
            *output = cut(output).into();
            *error = cut(error);
        }
        RunEvent::PeerUnreachable { error, .. } => *error = cut(error),
        _ => {}
    }
    serde_json::to_string(&ev)
        .ok()
        .filter(|j| j.len() <= EVENT_CAP)
}

/// Sends `req` to the node at `addr` (the normal handshake, under the cluster key if any)
/// and gives each answer to `answer` until the final one, which is returned. The
/// connection and each answer are bounded by `limit` (`None`: wait as long as the node
/// lives, for `attach`; its heartbeats tell when it is gone).
pub async fn request(
    addr: SocketAddr,
    hello: Hello,
    settings: &Settings,
    req: Hosted,
    limit: Option<Duration>,
    answer: impl FnMut(&Hosted),
) -> Result<Hosted, p2p_core::Error> {
    request_with_inputs(addr, hello, settings, &[], req, limit, answer).await
}

/// [`request`], after offering `inputs` to the node on the same connection (see
/// [`files::upload`]; each wait bounded by `limit`, else by a minute).
pub async fn request_with_inputs(
    addr: SocketAddr,
    hello: Hello,
    settings: &Settings,
    inputs: &[files::LocalInput],
    req: Hosted,
    limit: Option<Duration>,
    mut answer: impl FnMut(&Hosted),
) -> Result<Hosted, p2p_core::Error> {
    let (tx, mut rx) = mpsc::channel(64);
    let link = net::connect(addr, hello, settings, 1, tx).await?;
    if !inputs.is_empty() {
        let wait = limit.unwrap_or(Duration::from_secs(60));
        files::upload(&link, &mut rx, inputs, wait)
            .await
            .map_err(|e| p2p_core::Error::DriverFailed(format!("cannot ship an input: {e}")))?;
    }
    link.send(Command::Hosted(Box::new(req)))?;
    let last = loop {
        let ev = match limit {
            Some(l) => tokio::time::timeout(l, rx.recv()).await.ok().flatten(),
            None => rx.recv().await,
        };
        match ev {
            Some((_, LinkEvent::Hosted(h))) => {
                if h.is_final() {
                    break *h;
                }
                answer(&h);
            }
            Some((_, LinkEvent::Closed { error })) => {
                return Err(match error {
                    Some(e) => p2p_core::Error::DriverFailed(format!(
                        "the node closed the connection before answering: {e}"
                    )),
                    None => p2p_core::Error::DriverFailed(
                        "the node closed the connection before answering".into(),
                    ),
                })
            }
            Some(_) => {}
            None => {
                return Err(p2p_core::Error::DriverFailed(format!(
                    "no answer from the node after {:?}",
                    limit.unwrap_or_default()
                )))
            }
        }
    };
    let _ = link.send(Command::Goodbye);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some((_, ev)) = rx.recv().await {
            if matches!(ev, LinkEvent::Closed { .. }) {
                break;
            }
        }
    })
    .await;
    Ok(last)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_runs_directory_is_the_nodes_only() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("runs").join("node");
        let coordinator: CoordinatorFactory =
            Arc::new(|| Box::pin(async { Node::builder().build().await }));
        Host::new(HostConfig {
            dir: dir.clone(),
            limits: Limits::default(),
            coordinator,
            peers: Vec::new(),
            max_frame: 1 << 20,
            files: None,
        })
        .unwrap();
        for d in [&dir, &tmp.path().join("runs")] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }

    #[test]
    fn a_large_output_is_cut_to_fit_an_attached_event() {
        let big = "é".repeat(100_000);
        let ev = RunEvent::TaskFailed {
            task: "a1".into(),
            kind: "a".into(),
            node: "n".into(),
            attempt: 1,
            ok: false,
            output: big.clone().into(),
            duration_ms: 1.0,
            exit_code: Some(1),
            error: big,
        };
        let json = capped_json(&ev).unwrap();
        assert!(json.len() <= EVENT_CAP, "{}", json.len());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(v["output"].as_str().unwrap().contains("[cut: "));
        assert_eq!(v["task"], "a1");
        // A small event is sent as it is.
        let small = RunEvent::TaskRetry {
            task: "a1".into(),
            kind: "a".into(),
            node: "n".into(),
            attempt: 1,
            error: "x".into(),
            delay_ms: 100,
        };
        assert_eq!(
            capped_json(&small).unwrap(),
            serde_json::to_string(&small).unwrap()
        );
    }
}
