//! One run of a plan: [`Node::run`] returns a [`Run`], a builder that is awaited.
//!
//! ```no_run
//! # async fn demo(node: &mut node_cli::Node, tasks: Vec<node_cli::Task>) -> Result<(), node_cli::Error> {
//! use node_cli::{RunEvent, RunOptions};
//!
//! let report = node
//!     .run(tasks)
//!     .options(RunOptions::default())
//!     .peer("127.0.0.1:7401".parse().expect("an address"))
//!     .on_event(|ev| {
//!         if let RunEvent::TaskFailed { task, error, .. } = ev {
//!             eprintln!("{task}: {error}");
//!         }
//!     })
//!     .await?;
//! println!("{} succeeded", report.succeeded());
//! # Ok(()) }
//! ```

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use p2p_tasks::{Journal, RunEvent, RunOptions, RunReport, Task};
use tokio::sync::mpsc;

use crate::{Error, Node};

/// Most events an [`Events`] stream holds for a consumer that has not taken them yet.
pub const EVENT_QUEUE: usize = 4096;

/// Where [`Run::on_event`] sends events.
type OnEvent<'a> = Box<dyn FnMut(&RunEvent) + Send + 'a>;

/// A run of `tasks` on a [`Node`], to configure and then `.await` (it implements
/// [`IntoFuture`]). Made by [`Node::run`].
///
/// The run finds peers through the node's discovery (see [`crate::NodeBuilder::discovery`],
/// shared by every run of the node) and the addresses given here. Dropping the run's future
/// before it is done stops the run at once: its dialer, its connections and the discovery it
/// started end with it.
#[must_use = "a run does nothing until it is awaited"]
pub struct Run<'a> {
    node: &'a mut Node,
    tasks: Vec<Task>,
    options: RunOptions,
    peers: Vec<String>,
    local: Vec<crate::node::InProcess>,
    journal: Option<Journal>,
    on_event: Option<OnEvent<'a>>,
    events: Option<(mpsc::Sender<RunEvent>, Arc<AtomicU64>)>,
}

impl std::fmt::Debug for Run<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("tasks", &self.tasks.len())
            .field("options", &self.options)
            .field("peers", &self.peers)
            .field("journal", &self.journal.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a> Run<'a> {
    pub(crate) fn new(node: &'a mut Node, tasks: Vec<Task>) -> Self {
        Run {
            node,
            tasks,
            options: RunOptions::default(),
            peers: Vec::new(),
            local: Vec::new(),
            journal: None,
            on_event: None,
            events: None,
        }
    }

    /// The run's options (order, retries, timeouts). Default [`RunOptions::default`].
    pub fn options(mut self, options: RunOptions) -> Self {
        self.options = options;
        self
    }

    /// Also dials this peer (for this run only, besides the node's discovery).
    pub fn peer(mut self, addr: SocketAddr) -> Self {
        self.peers.push(addr.to_string());
        self
    }

    /// Also dials these peers (see [`Run::peer`]).
    pub fn peers(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.peers.extend(addrs.into_iter().map(|a| a.to_string()));
        self
    }

    /// Also runs on this in-process node ([`crate::Node::in_process`]), over the in-memory
    /// transport: no socket and no codec. The run finds it at once (source `in-process`, at
    /// `0.0.0.0:N` for the N-th such node of the run, an address nothing listens on).
    pub fn in_process(mut self, node: crate::node::InProcess) -> Self {
        self.local.push(node);
        self
    }

    /// Records final results in `journal`, and skips the tasks it records as succeeded
    /// (open it with [`Journal::open`]). Default: no journal.
    pub fn journal(mut self, journal: Journal) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Calls `f` with every event of the run, as it happens (the events `p2p-node run
    /// --json` prints). It runs inside the run: keep it short. Replaces an earlier one.
    pub fn on_event(mut self, f: impl FnMut(&RunEvent) + Send + 'a) -> Self {
        self.on_event = Some(Box::new(f));
        self
    }

    /// The run's events as a stream, for those who prefer one to [`Run::on_event`] (both
    /// may be used). Poll it while the run is awaited, e.g. with `tokio::join!`; it ends
    /// with the run. It holds at most [`EVENT_QUEUE`] events: a consumer that falls further
    /// behind misses the events that do not fit (counted by [`Events::missed`]), and the run
    /// never waits for it. The report is complete either way.
    pub fn events(&mut self) -> Events {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let missed = Arc::new(AtomicU64::new(0));
        self.events = Some((tx, missed.clone()));
        Events { rx, missed }
    }
}

impl<'a> IntoFuture for Run<'a> {
    type Output = Result<RunReport, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<RunReport, Error>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        let Run {
            node,
            tasks,
            options,
            peers,
            local,
            journal,
            mut on_event,
            events,
        } = self;
        Box::pin(async move {
            let mut emit = move |ev: &RunEvent| {
                if let Some(f) = on_event.as_mut() {
                    f(ev);
                }
                if let Some((tx, missed)) = &events {
                    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(ev.clone()) {
                        missed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            };
            node.run_plan(tasks, options, peers, local, journal, &mut emit)
                .await
        })
    }
}

/// The events of one run as a bounded stream ([`Run::events`]). It is a
/// [`futures_core::Stream`]; [`Events::next`] takes one event without any stream library.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<RunEvent>,
    missed: Arc<AtomicU64>,
}

impl Events {
    /// The next event; `None` once the run is over and every event was taken.
    pub async fn next(&mut self) -> Option<RunEvent> {
        self.rx.recv().await
    }

    /// How many events did not fit in the queue and were not delivered so far.
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }
}

impl futures_core::Stream for Events {
    type Item = RunEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<RunEvent>> {
        self.rx.poll_recv(cx)
    }
}
