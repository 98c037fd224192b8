//! The coordinator: the tokio driver of a [`RunCore`].
//!
//! It owns no sockets and holds no rule. Its owner dials the peers discovery finds; every
//! link reports into one shared channel of link events, starting with
//! [`LinkEvent::Opened`] (so a link is registered before any of its own events), and the
//! owner tells what discovery and the dialer saw as [`PeerUpdate`]s. The driver feeds both
//! into the core, sends the core's commands to the links, appends final results to the
//! journal, and passes the core's events on.
//!
//! With a journal, an event that reports a final result is passed on only once that result
//! is synced to disk (group commit: one sync per burst, before the driver waits). A journal
//! that cannot be written or synced stops the run: the results it could not record are
//! reported as not run, and the report carries the error.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use p2p_core::net::{Command, Link, LinkEvent, LinkId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{RunEvent, RunReport};
use crate::journal::Journal;
use crate::runcore::{RunCore, RunError};
use crate::Task;

pub use crate::runcore::RunOptions;

/// What the owner tells the coordinator about peers.
#[derive(Debug)]
#[non_exhaustive]
pub enum PeerUpdate {
    /// Discovery reported a peer (before it is dialled).
    Discovered {
        /// Its address.
        addr: String,
        /// The backend.
        source: String,
    },
    /// Every peer discovery knows of has been dialled (more may still come later, e.g. a
    /// node that restarts): a run need not wait for more before it starts. Send it only
    /// after the `Opened` events of the links dialled so far are on the links channel.
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
    /// Events of every link the owner opened, each starting with [`LinkEvent::Opened`].
    pub links: mpsc::Receiver<(LinkId, LinkEvent)>,
    /// Fires on Ctrl-C or shutdown: stop, cancel in-flight tasks, say goodbye.
    pub shutdown: CancellationToken,
    /// Where final results are recorded; tasks it lists as done are not run again.
    pub journal: Option<Journal>,
}

/// Most link events handled in one go before the driver sends what they produced.
const BATCH: usize = 1024;

/// Runs `tasks` to the end and returns the report. Every event goes to `emit` first.
/// Refuses a plan that cannot run ([`crate::runcore::validate`]) before anything starts.
pub async fn run(
    tasks: Vec<Task>,
    opts: RunOptions,
    mut inputs: Inputs,
    emit: &mut (dyn FnMut(&RunEvent) + Send),
) -> Result<RunReport, RunError> {
    // Taking a large plan apart takes seconds (10,000,000 tasks: about five): off the
    // runtime's thread, so that the connections dialled meanwhile complete their handshakes
    // (on a one-thread runtime they timed out, and the run found no node).
    let start = now();
    let built = tokio::task::spawn_blocking(move || {
        let files = crate::run_files::RunFiles::new(&tasks, opts.results.clone(), opts.max_frame)
            .map(|f| f.with_max_file(opts.max_file));
        RunCore::new(tasks, opts, start).map(|core| (files, core))
    })
    .await;
    let (files, mut core) = match built {
        Ok(built) => built?,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => return Err(RunError::Stopped),
    };
    if let Some(j) = &inputs.journal {
        // A success whose outputs are no longer in the results directory as recorded runs
        // again (its dependents would ship what is there).
        let redo: Vec<(String, String)> = match &files {
            Some(f) => j
                .done()
                .iter()
                .filter_map(|t| f.check_kept(t, j.outputs(t)).err().map(|e| (t.clone(), e)))
                .collect(),
            None => Vec::new(),
        };
        if redo.is_empty() {
            core.resume(j.done(), now());
        } else {
            let mut done = j.done().clone();
            for (task, why) in &redo {
                tracing::warn!(task = %task, "{why}: it runs again");
                done.remove(task);
            }
            core.resume(&done, now());
        }
    }
    let mut d = Driver {
        links: HashMap::default(),
        files,
        out: Out {
            journal: inputs.journal.take(),
            broken: None,
            unsynced: Vec::new(),
            unrecorded: Vec::new(),
            dropped: HashSet::new(),
            held: Vec::new(),
            pending: false,
            emit,
        },
    };
    let far = || tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let sleep = tokio::time::sleep_until(far());
    tokio::pin!(sleep);
    let mut armed: Option<tokio::time::Instant> = None;
    let mut peers_open = true;
    let mut interrupted = false;
    let mut batch = Vec::with_capacity(BATCH);
    // Inputs are hashed on threads of their own; each report comes here.
    let mut hashed = d.files.as_mut().and_then(|f| f.take_hashed());
    loop {
        let sent = d.pump(&mut core);
        if core.is_done() {
            break;
        }
        if sent && d.out.has_output() {
            // One thread runs the links and this loop: the links write the commands just
            // queued before the output is written and the journal synced, so that the nodes
            // work on them meanwhile (strict order waits for each result: a line written
            // first delayed every next assignment by its write).
            YieldOnce(false).await;
        }
        if d.out.flush(&mut core) {
            // The journal failed: the core stopped the run; take what that produced.
            continue;
        }
        let wake = core.poll_timeout().map(tokio::time::Instant::from_std);
        if wake != armed {
            sleep.as_mut().reset(wake.unwrap_or_else(far));
            armed = wake;
        }
        tokio::select! {
            u = inputs.peers.recv(), if peers_open => match u {
                None => {
                    peers_open = false;
                    d.drain_links(&mut core, &mut inputs.links);
                    core.handle_settled(now());
                }
                Some(PeerUpdate::Settled) => {
                    d.drain_links(&mut core, &mut inputs.links);
                    core.handle_settled(now());
                }
                Some(PeerUpdate::Discovered { addr, source }) => core.handle_discovered(addr, source),
                Some(PeerUpdate::Unreachable { addr, error }) => core.handle_unreachable(addr, error),
            },
            // Every event already queued (up to a batch) is taken in one go, which gives the
            // channel's permits back once, not once an event.
            1.. = inputs.links.recv_many(&mut batch, BATCH) => {
                let at = now();
                // Every event taken is handled before new work is sent (one dispatch, one
                // burst of assignments per batch); the events each produces are passed on at
                // once, so the core's queue stays short.
                // (Between them, what is queued goes out without moving the run on: it moves
                // on once, for the whole batch, when the next work is sent.)
                for (i, (id, ev)) in batch.drain(..).enumerate() {
                    if i > 0 {
                        d.out_queued(&mut core);
                    }
                    d.link_event(&mut core, id, ev, at);
                }
            }
            Some(h) = next_hashed(&mut hashed) => d.hashed(&mut core, h),
            () = &mut sleep, if armed.is_some() => {
                armed = None;
                // What the links reported before the deadline counts first (e.g. nodes that
                // connected while the plan was taken apart, before the discovery wait ended).
                d.drain_links(&mut core, &mut inputs.links);
                core.handle_timeout(now());
            }
            _ = inputs.shutdown.cancelled(), if !interrupted => {
                interrupted = true;
                core.handle_interrupt(now());
            }
        }
    }
    d.out.flush(&mut core);
    d.pump(&mut core);
    d.out.release();
    let report = core.into_report(now());
    (d.out.emit)(&report.summary());
    (d.out.emit)(&RunEvent::Flush);
    Ok(report)
}

struct Driver<'a> {
    /// Looked up once per assignment: keyed by the fast hash of the link ids (not SipHash).
    links: HashMap<LinkId, Link, p2p_core::conn::SeqHash>,
    /// Files shipped and collected (none when no task has any).
    files: Option<crate::run_files::RunFiles>,
    out: Out<'a>,
}

impl Driver<'_> {
    /// Handles every link event already queued. The owner sends `Settled` only after the
    /// links it opened sent their `Opened` (on the links channel), so draining first keeps
    /// "every peer was dialled" from overtaking the registrations it speaks of.
    fn drain_links(&mut self, core: &mut RunCore, links: &mut mpsc::Receiver<(LinkId, LinkEvent)>) {
        let at = now();
        while let Ok((id, ev)) = links.try_recv() {
            self.link_event(core, id, ev, at);
        }
    }

    fn link_event(&mut self, core: &mut RunCore, id: LinkId, ev: LinkEvent, at: Instant) {
        // A run without files keeps links only to send to them: the core has every other
        // event as it came.
        if self.files.is_none() && !matches!(ev, LinkEvent::Opened(_) | LinkEvent::Closed { .. }) {
            return core.handle_link_event(id, ev, at);
        }
        let closed = matches!(ev, LinkEvent::Closed { .. });
        if let LinkEvent::Opened(link) = &ev {
            self.links.insert(id, (**link).clone());
        }
        // The link is looked up only for a run with files (one hash lookup less a result).
        let files = self.files.as_mut();
        let link = if files.is_some() {
            self.links.get(&id)
        } else {
            None
        };
        let ev = match (ev, files, link) {
            (LinkEvent::Transfer(t), Some(files), Some(link)) => {
                for c in files.transfer(link, *t) {
                    core.handle_link_event(id, LinkEvent::Completed(c), at);
                }
                return;
            }
            (LinkEvent::Completed(c), Some(files), Some(link)) => match files.completed(link, c) {
                Some(c) => LinkEvent::Completed(c),
                // Held while its outputs are fetched.
                None => return,
            },
            (ev, _, _) => ev,
        };
        core.handle_link_event(id, ev, at);
        if closed {
            self.links.remove(&id);
            if let Some(files) = &mut self.files {
                files.closed(id);
            }
        }
    }

    /// An input hashed: the assignments that waited for it go on (or fail).
    fn hashed(&mut self, core: &mut RunCore, h: crate::run_files::Hashed) {
        let Some(files) = self.files.as_mut() else {
            return;
        };
        let at = now();
        for (id, c) in files.hashed(h) {
            core.handle_link_event(id, LinkEvent::Completed(c), at);
        }
    }

    /// Passes on the final results and events the core has queued, once the run moved on
    /// (the core's `poll_*` calls move it on first).
    fn out_events(&mut self, core: &mut RunCore) {
        core.settle_now();
        self.out_queued(core);
    }

    /// As [`Driver::out_events`], for what is already queued: the run does not move on
    /// (between the events of one batch).
    fn out_queued(&mut self, core: &mut RunCore) {
        if self.out.journal.is_none() {
            // Nothing records them: let them go at once.
            core.drop_finals_queued();
        }
        while let Some(t) = core.poll_final_queued() {
            self.out.record(core, t, self.files.as_mut());
        }
        if self.out.unrecorded.is_empty() {
            while let Some(ev) = core.poll_event_queued() {
                self.out.event(ev);
            }
        }
    }

    /// Moves everything the core produced: commands to links, final results to the
    /// journal, events to the output. Returns whether a command was sent.
    fn pump(&mut self, core: &mut RunCore) -> bool {
        let mut sent_any = false;
        loop {
            let mut any = false;
            while let Some((id, cmd)) = core.poll_command() {
                any = true;
                sent_any = true;
                let assign = match &cmd {
                    Command::Assign(a) => Some(a.seq),
                    _ => None,
                };
                let sent = match (self.links.get(&id), &mut self.files, cmd) {
                    (Some(link), Some(files), Command::Assign(a)) => match files.assign(link, a) {
                        crate::run_files::Step::Send(a) => link.send(Command::Assign(a)).is_ok(),
                        crate::run_files::Step::Held => true,
                        crate::run_files::Step::Fail(c) => {
                            core.handle_link_event(id, LinkEvent::Completed(c), now());
                            true
                        }
                    },
                    // One still held here (its inputs on their way) never reached the node,
                    // which could not answer its cancel.
                    (Some(link), Some(files), Command::Cancel(seq)) => {
                        match files.cancel(link, seq) {
                            Some(c) => {
                                core.handle_link_event(id, LinkEvent::Completed(c), now());
                                true
                            }
                            None => link.send(Command::Cancel(seq)).is_ok(),
                        }
                    }
                    (Some(link), _, cmd) => link.send(cmd).is_ok(),
                    (None, _, _) => false,
                };
                if let (false, Some(seq)) = (sent, assign) {
                    core.handle_unsent(id, seq, now());
                }
                // Each assignment's event goes out before the next is made.
                self.out_events(core);
            }
            while let Some(t) = core.poll_final() {
                any = true;
                self.out.record(core, t, self.files.as_mut());
            }
            if !self.out.unrecorded.is_empty() {
                any = true;
                let unrecorded = std::mem::take(&mut self.out.unrecorded);
                let error = self.out.broken.clone().unwrap_or_default();
                core.handle_stop(error, &unrecorded, now());
            }
            while let Some(ev) = core.poll_event() {
                self.out.event(ev);
            }
            if !any {
                return sent_any;
            }
        }
    }
}

/// The output side: the journal, and events held until the results they report are synced.
struct Out<'a> {
    journal: Option<Journal>,
    /// The journal's error, once it failed.
    broken: Option<String>,
    /// Tasks appended to the journal and not synced yet.
    unsynced: Vec<usize>,
    /// Tasks whose final result could not be recorded (to tell the core).
    unrecorded: Vec<usize>,
    /// Ids of those tasks: their result events are dropped.
    dropped: HashSet<compact_str::CompactString>,
    /// Events waiting for the next sync (with a journal only).
    held: Vec<RunEvent>,
    /// Something was reported since the last [`RunEvent::Flush`].
    pending: bool,
    emit: &'a mut (dyn FnMut(&RunEvent) + Send),
}

impl Out<'_> {
    fn record(&mut self, core: &RunCore, t: usize, files: Option<&mut crate::run_files::RunFiles>) {
        let Some(j) = &mut self.journal else { return };
        let Some(r) = core.result(t) else { return };
        let outputs = files.map(|f| f.take_recorded(&r.task)).unwrap_or_default();
        if self.broken.is_some() {
            self.dropped.insert(r.task.clone());
            self.unrecorded.push(t);
            return;
        }
        match j.append_with_outputs(r, outputs) {
            Ok(()) => self.unsynced.push(t),
            Err(e) => {
                self.fail(core, e.to_string());
                self.dropped.insert(r.task.clone());
                self.unrecorded.push(t);
            }
        }
    }

    /// The journal failed: nothing appended since the last sync counts as recorded.
    fn fail(&mut self, core: &RunCore, error: String) {
        self.broken = Some(error);
        for t in std::mem::take(&mut self.unsynced) {
            if let Some(r) = core.result(t) {
                self.dropped.insert(r.task.clone());
            }
            self.unrecorded.push(t);
        }
    }

    fn event(&mut self, ev: RunEvent) {
        if self.journal.is_some() {
            self.held.push(ev);
        } else {
            self.pending = true;
            (self.emit)(&ev);
        }
    }

    /// Whether a flush would write or sync something.
    fn has_output(&self) -> bool {
        self.pending || !self.held.is_empty() || !self.unsynced.is_empty()
    }

    /// Before the driver waits: syncs the journal, passes on the events it held, and says
    /// [`RunEvent::Flush`] if anything was reported. Returns true when the journal just
    /// failed (the core must be told, so the driver pumps again before waiting).
    fn flush(&mut self, core: &mut RunCore) -> bool {
        if let Some(j) = &mut self.journal {
            if self.broken.is_none() && !self.unsynced.is_empty() {
                match j.sync() {
                    Ok(()) => self.unsynced.clear(),
                    Err(e) => {
                        self.fail(core, e.to_string());
                        return true;
                    }
                }
            }
        }
        if !self.unrecorded.is_empty() {
            return true;
        }
        self.release();
        if std::mem::take(&mut self.pending) {
            (self.emit)(&RunEvent::Flush);
        }
        false
    }

    /// Passes on the held events, but for results that were not recorded.
    fn release(&mut self) {
        for ev in std::mem::take(&mut self.held) {
            let task = match &ev {
                RunEvent::TaskCompleted { task, .. }
                | RunEvent::TaskFailed { task, .. }
                | RunEvent::TaskCancelled { task, .. } => Some(task),
                _ => None,
            };
            if task.is_some_and(|t| self.dropped.contains(t)) {
                continue;
            }
            self.pending = true;
            (self.emit)(&ev);
        }
    }
}

/// Lets the runtime's other ready tasks run once, then resumes. Unlike tokio's
/// `yield_now`, which defers the wake-up until the runtime has polled its I/O driver (one
/// more `epoll_wait` each time), it wakes itself at once: the tasks already woken (the links
/// given commands) run first, then this one.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// The next report of the hashing threads; never, without files.
async fn next_hashed(
    rx: &mut Option<tokio::sync::mpsc::Receiver<crate::run_files::Hashed>>,
) -> Option<crate::run_files::Hashed> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The current time from tokio's clock, so a paused or simulated clock drives the run.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
