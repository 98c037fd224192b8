//! The embeddable node: serves task types, runs plans, or both.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use p2p_core::gate::{HandshakeGate, HandshakeTicket, DEFAULT_MAX_HANDSHAKES, LOG_INTERVAL};
use p2p_core::net::{self, LinkEvent, LinkId, Settings};
use p2p_core::{ClusterKey, Hello, Identity, NodeId, PROTOCOL_VERSION};
use p2p_discovery::{statik::Static, Announcement, Discovery};
use p2p_tasks::handler::{Builtin, Handler};
use p2p_tasks::{Inputs, Journal, RunEvent, RunOptions, RunReport, Task, Worker};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::dial;
use crate::error::Endpoint;
use crate::floods::{flood_summaries, flood_warn, more, types_shown, Floods};
use crate::metrics::{self, ConnStats, Refused};
use crate::run::Run;
use crate::sightings::Sightings;
use crate::Error;

/// Default cluster name.
pub const DEFAULT_CLUSTER: &str = "default";

/// Queue of link events per served connection.
const LINK_EVENTS: usize = 1024;

/// How long connections have to close once a node stops at once.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Stops a node at once from elsewhere; see [`Node::stop_handle`].
#[derive(Debug, Clone)]
pub struct StopHandle {
    shutdown: CancellationToken,
    worker: Arc<Worker>,
}

impl StopHandle {
    /// As [`Node::stop_now`].
    pub fn stop_now(&self) {
        self.shutdown.cancel();
        self.worker.stop_now();
    }
}

/// Changes a serving node's capacity (see [`Node::capacity_handle`]). Every connection
/// reports the new capacity at once; a coordinator honours it up to the capacity of that
/// connection's handshake, and a shrink stops no running task.
#[derive(Debug, Clone)]
pub struct CapacityHandle {
    worker: Arc<Worker>,
}

impl CapacityHandle {
    /// One slot more; returns the new capacity.
    pub fn grow(&self) -> u32 {
        self.worker.grow()
    }

    /// One slot less, down to 1; returns the new capacity.
    pub fn shrink(&self) -> u32 {
        self.worker.shrink()
    }

    /// The capacity now.
    pub fn capacity(&self) -> u32 {
        self.worker.capacity()
    }
}

/// The smallest maximum frame a node accepts as its setting (64 KiB).
pub const MIN_MAX_FRAME: usize = 64 * 1024;

/// The largest maximum frame (16 MiB): no frame is ever larger.
pub const MAX_MAX_FRAME: usize = p2p_core::wire::MAX_FRAME_CEILING;

/// Room in a frame for everything of a task's result but its output (the error text,
/// capped at [`p2p_tasks::handler::ERROR_LIMIT`], and the fields): the maximum output plus
/// this must fit in the maximum frame.
pub const RESULT_MARGIN: usize = 16 * 1024;

/// Builds a [`Node`]. Every setting has a default, stated on its setter.
pub struct NodeBuilder {
    cluster: String,
    listen: Option<SocketAddr>,
    handlers: HashMap<String, Arc<dyn Handler>>,
    capacity: Option<u32>,
    capacity_auto: bool,
    discovery: Vec<Box<dyn Discovery>>,
    /// The connections' settings: the setters below write here (one source).
    settings: Settings,
    max_connections: usize,
    max_handshakes: usize,
    drain_timeout: Duration,
    insecure: bool,
    max_output: usize,
    metrics_listen: Option<SocketAddr>,
    describe: dial::Describe,
    files: Option<Arc<p2p_tasks::node_files::NodeFiles>>,
    in_process: bool,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("cluster", &self.cluster)
            .field("listen", &self.listen)
            .field("types", &self.handlers.keys().collect::<Vec<_>>())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Default for NodeBuilder {
    fn default() -> Self {
        NodeBuilder {
            cluster: DEFAULT_CLUSTER.to_string(),
            listen: None,
            handlers: HashMap::new(),
            capacity: None,
            capacity_auto: false,
            discovery: Vec::new(),
            settings: Settings::default(),
            max_connections: 1024,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            drain_timeout: Duration::from_secs(30),
            insecure: false,
            max_output: p2p_tasks::handler::DEFAULT_OUTPUT_LIMIT,
            metrics_listen: None,
            describe: |e| e.to_string(),
            files: None,
            in_process: false,
        }
    }
}

impl NodeBuilder {
    /// Keeps files for tasks (inputs shipped to this node, outputs fetched from it) with
    /// this cache (see [`p2p_tasks::node_files`]). Default: none (offers are refused).
    pub fn files(mut self, files: Arc<p2p_tasks::node_files::NodeFiles>) -> Self {
        self.files = Some(files);
        self
    }

    /// An in-process node: it binds no listener and takes connections only from this
    /// process, over the in-memory transport ([`Node::in_process`], used by
    /// [`Run::in_process`]): no socket and no codec between the run and the node.
    /// Overrides [`NodeBuilder::listen`]. Default false.
    pub fn in_process(mut self, yes: bool) -> Self {
        self.in_process = yes;
        self
    }

    /// Cluster name. Default `default`.
    pub fn cluster(mut self, name: impl Into<String>) -> Self {
        self.cluster = name.into();
        self
    }

    /// Address to accept connections on. Default: `127.0.0.1:0` (an ephemeral loopback
    /// port) when the node serves a type; a node serving nothing does not listen.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Serves `kind` with `handler`. The type is case-folded.
    pub fn handler(mut self, kind: impl AsRef<str>, handler: impl Handler) -> Self {
        self.handlers
            .insert(kind.as_ref().to_ascii_lowercase(), Arc::new(handler));
        self
    }

    /// Serves `kind` with the built-in handler (prints `Executing task: ID`).
    pub fn builtin(self, kind: impl AsRef<str>) -> Self {
        self.handler(kind, Builtin)
    }

    /// Tasks run at once across all connections. Default: the number of CPU cores, or
    /// 1,024 when every handler answers at once (the built-in handler).
    pub fn capacity(mut self, n: u32) -> Self {
        self.capacity = Some(n);
        self
    }

    /// `--capacity auto`: the capacity follows the machine's load, every 2 s: its cores less
    /// the load of other work, at least 1 (see [`p2p_tasks::resources::auto_capacity`]). A
    /// connection's handshake advertises the cores (its ceiling). Overrides
    /// [`NodeBuilder::capacity`]. Default off.
    pub fn capacity_auto(mut self, on: bool) -> Self {
        self.capacity_auto = on;
        self
    }

    /// Adds a discovery backend (see [`crate::discovery`]). The node starts its backends
    /// once, for its lifetime: at [`Node::start`], announcing itself with them, or else at
    /// its first [`Node::run`]; every run finds peers through them. Default: none.
    pub fn discovery(mut self, backend: Box<dyn Discovery>) -> Self {
        self.discovery.push(backend);
        self
    }

    /// Adds several discovery backends (see [`NodeBuilder::discovery`]).
    pub fn discoveries(mut self, backends: Vec<Box<dyn Discovery>>) -> Self {
        self.discovery.extend(backends);
        self
    }

    /// Adds static peers (`HOST:PORT`) used by [`Node::run`].
    pub fn peers(self, peers: Vec<String>) -> Self {
        if peers.is_empty() {
            return self;
        }
        self.discovery(Box::new(Static::new(peers)))
    }

    /// How long a connection's handshake may take, from its start. Default 5 s.
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.settings.conn.handshake_timeout = d;
        self
    }

    /// Heartbeats: a ping every `interval`, and a peer silent for `idle` is declared dead.
    /// Default every 2 s, dead after 10 s.
    pub fn heartbeat(mut self, interval: Duration, idle: Duration) -> Self {
        self.settings.conn.heartbeat_interval = interval;
        self.settings.conn.idle_timeout = idle;
        self
    }

    /// Bound on establishing a TCP connection to a peer. Default 3 s.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.settings.connect_timeout = d;
        self
    }

    /// The largest frame, in bytes, this node sends or accepts; a peer that sends a larger
    /// one is disconnected. From [`MIN_MAX_FRAME`] (64 KiB) to [`MAX_MAX_FRAME`] (16 MiB).
    /// Default 16 MiB.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.settings.max_frame = bytes;
        self
    }

    /// The most bytes of a task's output this node sends back: longer output, whatever the
    /// handler, is cut and marked `[output truncated at N bytes]`
    /// ([`p2p_tasks::TaskOutcome::capped`]). With [`RESULT_MARGIN`] it must fit in the
    /// maximum frame. Default 1 MiB.
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes;
        self
    }

    /// Serves `GET /metrics` (Prometheus text format) and `GET /healthz` on this address
    /// (see [`crate::metrics`]) from [`Node::start`] until the node has drained. Like the
    /// listen address, a non-loopback one needs a cluster key or
    /// [`NodeBuilder::insecure`]. Default: none.
    pub fn metrics_listen(mut self, addr: SocketAddr) -> Self {
        self.metrics_listen = Some(addr);
        self
    }

    /// Most connections served at once; more are closed at accept. Default 1024.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Most connections still in their handshake at once; when full, a new connection
    /// evicts the oldest one still in handshake (so a flood of connections that never
    /// finish cannot lock out real peers). Default 256.
    pub fn max_handshakes(mut self, n: usize) -> Self {
        self.max_handshakes = n.max(1);
        self
    }

    /// How long a shutting-down node lets running tasks finish. Default 30 s.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Allows listening on a non-loopback address without a cluster key. Default false.
    pub fn insecure(mut self, yes: bool) -> Self {
        self.insecure = yes;
        self
    }

    /// The cluster key: every connection this node serves or dials is then authenticated
    /// and encrypted, and peers without the key are dropped. Default: none (plaintext,
    /// loopback only).
    pub fn key(self, key: ClusterKey) -> Self {
        self.keys(vec![key])
    }

    /// Several cluster keys, for a key rotation: this node dials with the first and accepts
    /// peers that dial in with any of them (udp beacons: sealed with the first, accepted
    /// under any). Replaces [`NodeBuilder::key`]; an empty list means no key. Default: none.
    pub fn keys(mut self, keys: Vec<ClusterKey>) -> Self {
        let mut keys = keys.into_iter();
        self.settings.key = keys.next();
        self.settings.accept_keys = keys.collect();
        self
    }

    /// The node's identity (see [`p2p_core::identity`]): its node id derives from it, and
    /// with a cluster key every handshake proves it. Default: a new random identity for
    /// each built node (so a new node id every start; load a persistent one with
    /// [`Identity::load_or_create`]).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.settings.identity = Some(identity);
        self
    }

    /// How this node words connection errors in its logs and in
    /// [`RunEvent::PeerUnreachable`]. Default: the error's own message.
    pub fn describe_errors(mut self, describe: dial::Describe) -> Self {
        self.describe = describe;
        self
    }

    /// Validates the configuration, binds the listener (if the node serves or was given
    /// an address) and returns the node. It serves once [`Node::start`] or [`Node::serve`]
    /// is called.
    pub async fn build(self) -> Result<Node, Error> {
        if self.cluster.is_empty() || self.cluster.len() > 64 {
            return Err(Error::Config(
                "cluster name must be 1 to 64 characters".into(),
            ));
        }
        for kind in self.handlers.keys() {
            if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_lowercase()) {
                return Err(Error::Config(format!(
                    "task type {kind:?} must be ASCII letters only (e.g. a, b, render)"
                )));
            }
            if kind.len() > p2p_core::wire::MAX_TYPE_LEN {
                return Err(Error::Config(format!(
                    "task type {kind:?} is longer than {} letters",
                    p2p_core::wire::MAX_TYPE_LEN
                )));
            }
        }
        if self.handlers.len() > p2p_core::wire::MAX_TYPES {
            return Err(Error::Config(format!(
                "a node serves at most {} task types ({} given)",
                p2p_core::wire::MAX_TYPES,
                self.handlers.len()
            )));
        }
        if self.capacity == Some(0) {
            return Err(Error::Config("capacity must be at least 1".into()));
        }
        let listen = match self.listen {
            _ if self.in_process => None,
            Some(a) => Some(a),
            None if !self.handlers.is_empty() => Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            None => None,
        };
        let mut settings = self.settings;
        let max_frame = settings.max_frame;
        if !(MIN_MAX_FRAME..=MAX_MAX_FRAME).contains(&max_frame) {
            return Err(Error::Config(format!(
                "maximum frame {max_frame} bytes: must be from {MIN_MAX_FRAME} (64 KiB) to \
                 {MAX_MAX_FRAME} (16 MiB)"
            )));
        }
        if !self.handlers.is_empty() && self.max_output.saturating_add(RESULT_MARGIN) > max_frame {
            return Err(Error::Config(format!(
                "maximum task output {} bytes does not fit in the maximum frame of {max_frame} \
                 bytes (a result needs the output plus {RESULT_MARGIN} bytes): lower the \
                 output limit or raise the frame limit",
                self.max_output
            )));
        }
        let identity = settings.identity.take().unwrap_or_else(Identity::generate);
        let id = identity.node_id();
        settings.identity = Some(identity);
        let keyed = settings.key.is_some();
        if let Some(a) = listen {
            check_exposure(a, Endpoint::Listen, self.insecure, keyed)?;
        }
        if let Some(a) = self.metrics_listen {
            check_exposure(a, Endpoint::Metrics, self.insecure, keyed)?;
        }
        let listener = match listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind { addr, source })?,
            ),
            None => None,
        };
        let local_addr = match &listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let metrics_listener = match self.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind { addr, source })?,
            ),
            None => None,
        };
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        // Default: the number of cores, or a deep window for nodes whose handlers all
        // answer at once (the built-in handler), so pipelining is not capped at a few tasks.
        let capacity = match (self.capacity_auto, self.capacity) {
            (true, _) => p2p_tasks::resources::cores(),
            (false, Some(c)) => c,
            (false, None) => Worker::default_capacity(&self.handlers),
        };
        let mut worker = Worker::new(self.handlers, capacity).with_output_limit(self.max_output);
        if let Some(files) = self.files {
            worker = worker.with_files(files);
        }
        let worker = Arc::new(worker);
        if self.capacity_auto {
            let load = p2p_tasks::resources::load_milli();
            worker.set_capacity(p2p_tasks::resources::auto_capacity(capacity, load, 0));
        }
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let (stats, draining, w) = (worker.stats(), shutdown.clone(), worker.clone());
        settings.status = Some(net::StatusSource(Arc::new(move || {
            let waiting = u64::try_from(w.waiting()).unwrap_or(u64::MAX);
            crate::status::report(
                &stats,
                started,
                draining.is_cancelled(),
                waiting,
                w.capacity(),
            )
        })));
        Ok(Node {
            id,
            cluster: self.cluster,
            listener,
            local_addr,
            worker,
            capacity_auto: self.capacity_auto,
            discovery: self.discovery,
            found: None,
            discovery_stopped: Vec::new(),
            settings,
            conn_slots: Arc::new(Semaphore::new(self.max_connections)),
            handshakes: HandshakeGate::new(self.max_handshakes),
            drain_timeout: self.drain_timeout,
            shutdown,
            tracker: TaskTracker::new(),
            metrics_listener,
            metrics_addr,
            metrics_stop: CancellationToken::new(),
            conn_stats: Arc::default(),
            started,
            discovery_counters: Vec::new(),
            describe: self.describe,
            in_process: self.in_process,
            door: None,
        })
    }
}

/// Refuses a non-loopback address without a cluster key or `insecure`: for the node's
/// listen address and its metrics endpoint alike.
fn check_exposure(
    addr: SocketAddr,
    endpoint: Endpoint,
    insecure: bool,
    keyed: bool,
) -> Result<(), Error> {
    if !addr.ip().is_loopback() && !insecure && !keyed {
        return Err(Error::Unprotected { addr, endpoint });
    }
    Ok(())
}

/// A p2p-node: serves the types it has handlers for and runs plans over its peers.
///
/// ```no_run
/// use node_cli::{handler_fn, TaskOutcome};
///
/// # async fn demo() -> Result<(), node_cli::Error> {
/// let node = node_cli::Node::builder()
///     .handler("a", handler_fn(|req| async move { TaskOutcome::success(format!("did {}", req.id)) }))
///     .build()
///     .await?;
/// println!("serving on {:?}", node.local_addr());
/// node.serve().await?; // until node.shutdown_token() is cancelled
/// # Ok(()) }
/// ```
pub struct Node {
    id: NodeId,
    cluster: String,
    listener: Option<TcpListener>,
    local_addr: Option<SocketAddr>,
    worker: Arc<Worker>,
    /// The capacity follows the load (`--capacity auto`).
    capacity_auto: bool,
    discovery: Vec<Box<dyn Discovery>>,
    /// Events of the node's backends, started once by [`Node::start`] (which announces this
    /// node) or by the first run, drained as they come and replayed to every run.
    found: Option<Sightings>,
    /// Cancelled by each started backend once its farewell is out.
    discovery_stopped: Vec<CancellationToken>,
    settings: Settings,
    conn_slots: Arc<Semaphore>,
    handshakes: HandshakeGate,
    drain_timeout: Duration,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    metrics_listener: Option<TcpListener>,
    metrics_addr: Option<SocketAddr>,
    /// Stops the metrics endpoint once the node has drained.
    metrics_stop: CancellationToken,
    conn_stats: Arc<ConnStats>,
    started: Instant,
    /// The started backends' counters, for metrics.
    discovery_counters: Vec<metrics::DiscoveryStats>,
    describe: dial::Describe,
    /// Built without a listener, for connections from this process only.
    in_process: bool,
    /// Where connections from this process come in, once started (see
    /// [`Node::in_process`]).
    door: Option<Arc<AcceptCtx>>,
}

/// Dropping a node stops it at once: its listener closes, its connections end (with a
/// goodbye), its running tasks are stopped, its discovery backends and metrics endpoint stop.
/// To let running tasks finish first, [`Node::drain`] it before.
impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.worker.stop_now();
        self.metrics_stop.cancel();
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("cluster", &self.cluster)
            .field("local_addr", &self.local_addr)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A builder with every setting at its default.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The cluster name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Where the node accepts connections (with the real port), if it listens.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The types it serves, sorted.
    pub fn types(&self) -> Vec<String> {
        self.worker.types()
    }

    /// Where the metrics endpoint listens (with the real port), if it was asked for
    /// ([`NodeBuilder::metrics_listen`]).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Tasks run at once now.
    pub fn capacity(&self) -> u32 {
        self.worker.capacity()
    }

    /// A handle that changes this node's capacity while it serves (`SIGUSR1`/`SIGUSR2` on
    /// `p2p-node serve`).
    pub fn capacity_handle(&self) -> CapacityHandle {
        CapacityHandle {
            worker: self.worker.clone(),
        }
    }

    /// Cancelling this token shuts the node down gracefully (see [`Node::serve`]).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Starts shutting down: no new connections or tasks, goodbye to every peer.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops at once: shuts down, and stops the running tasks instead of letting them
    /// finish (their processes get `SIGTERM`, then `SIGKILL` after the kill grace); peers
    /// get a goodbye where one was not sent yet and run those tasks elsewhere. Call it
    /// while [`Node::serve`] or [`Node::drain`] runs to cut the drain short.
    pub fn stop_now(&self) {
        self.shutdown.cancel();
        self.worker.stop_now();
    }

    /// A handle that can [stop](StopHandle::stop_now) this node at once from elsewhere
    /// (e.g. a second signal), while [`Node::serve`] owns it.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            shutdown: self.shutdown.clone(),
            worker: self.worker.clone(),
        }
    }

    fn hello(&self, serving: bool) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            cluster: self.cluster.clone(),
            node_id: self.id,
            types: if serving {
                self.worker.types()
            } else {
                Vec::new()
            },
            capacity: if serving { self.worker.capacity() } else { 0 },
        }
    }

    /// Answers hosted-run requests (`p2p-node submit`, `runs`, `attach`, `cancel`, `status
    /// --run`) with `service` (see [`crate::hosted::Host::service`]). Takes effect for the
    /// connections accepted after [`Node::start`]; call it before. Without it, such
    /// requests are refused.
    pub fn host_runs(&mut self, service: net::HostedService) {
        self.settings.hosted = Some(service);
    }

    /// Takes the peers' replicated-run messages with `service` (see
    /// [`crate::hosted::replica_io::Replicas::service`]). Like [`Node::host_runs`], call it
    /// before [`Node::start`]. Without it, such messages are dropped.
    pub fn replicate_runs(&mut self, service: net::ReplicaService) {
        self.settings.replica = Some(service);
    }

    /// The handshake and settings this node dials its own side connections with (those of
    /// a replicated run's group): its cluster, id, key and identity, serving nothing.
    pub fn dial_settings(&self) -> (Hello, net::Settings) {
        (self.hello(false), self.settings.clone())
    }

    /// Starts accepting connections in the background (over TCP if it listens, and from
    /// this process through [`Node::in_process`]) and starts the discovery backends,
    /// announcing this node (its address, types and capacity) if it listens. Does nothing if
    /// the node neither listens nor was built [`NodeBuilder::in_process`], or already
    /// started. Fails when a backend cannot start (e.g. no such
    /// interface). Backends a run started before are not restarted to announce the node:
    /// start a serving node before running plans on it.
    pub fn start(&mut self) -> Result<(), Error> {
        let listener = self.listener.take();
        if self.door.is_some() || (listener.is_none() && !self.in_process) {
            return Ok(());
        }
        if let Some(addr) = self.local_addr {
            let me = Announcement {
                cluster: self.cluster.clone(),
                node_id: self.id,
                addr,
                types: self.worker.types(),
                capacity: self.worker.capacity(),
            };
            self.start_discovery(Some(me))?;
        }
        if let Some(l) = self.metrics_listener.take() {
            let source = metrics::Source {
                worker: self.worker.stats(),
                conns: self.conn_stats.clone(),
                gate: self.handshakes.clone(),
                draining: self.shutdown.clone(),
                capacity: self.worker.capacity(),
                started: self.started,
                discovery: self.discovery_counters.clone(),
            };
            tokio::spawn(metrics::serve_http(l, source, self.metrics_stop.clone()));
        }
        // The connections this node serves answer its instant tasks (the built-in
        // handler's) in their drivers; those it dials for runs serve nothing.
        let mut settings = self.settings.clone();
        settings.instant = self.worker.instant_service();
        let ctx = Arc::new(AcceptCtx {
            floods: Mutex::new(Floods::default()),
            conns: self.conn_stats.clone(),
            hello: self.hello(true),
            settings,
            worker: self.worker.clone(),
            slots: self.conn_slots.clone(),
            handshakes: self.handshakes.clone(),
            shutdown: self.shutdown.clone(),
            tracker: self.tracker.clone(),
            describe: self.describe,
            next_local: std::sync::atomic::AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
        });
        self.door = Some(ctx.clone());
        if let Some(listener) = listener {
            self.tracker.spawn(accept_loop(listener, ctx));
        }
        if self.capacity_auto {
            self.tracker
                .spawn(self.worker.clone().run_auto(self.shutdown.clone()));
        }
        Ok(())
    }

    /// Where this process connects to this node without a socket (a serving node, once
    /// started; see [`InProcess`]). `None` before [`Node::start`] or when it serves nothing.
    pub fn in_process(&self) -> Option<InProcess> {
        let door = self.door.clone()?;
        Some(InProcess {
            node: self.id,
            types: self.worker.types(),
            door,
        })
    }

    /// Starts the discovery backends once, for the node's lifetime (they stop when it shuts
    /// down or is dropped), announcing `me` if given. Every run subscribes to what they find.
    fn start_discovery(&mut self, me: Option<Announcement>) -> Result<(), Error> {
        if self.found.is_some() || self.discovery.is_empty() {
            return Ok(());
        }
        let backends = std::mem::take(&mut self.discovery);
        self.discovery_counters = backends
            .iter()
            .filter_map(|b| b.counters().map(|c| (b.name().to_string(), c)))
            .collect();
        self.discovery_stopped = backends.iter().filter_map(|b| b.stopped()).collect();
        let found = p2p_discovery::start_all(backends, me, self.shutdown.clone())?;
        self.found = Some(Sightings::start(found));
        Ok(())
    }

    /// Serves until the shutdown token is cancelled, then drains: running tasks finish
    /// (within the drain timeout), every peer gets a goodbye, and this returns.
    pub async fn serve(mut self) -> Result<(), Error> {
        self.start()?;
        self.shutdown.cancelled().await;
        self.drain().await;
        Ok(())
    }

    /// Waits until every connection has closed: running tasks finish within the drain
    /// timeout; then (or after [`Node::stop_now`]) they are stopped and the connections
    /// closed.
    pub async fn drain(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                after = ?self.drain_timeout,
                "drain timed out; stopping the remaining tasks"
            );
            self.worker.stop_now();
            let _ = tokio::time::timeout(STOP_WAIT, self.tracker.wait()).await;
        }
        // Let discovery say goodbye too (e.g. a `leaving` beacon), briefly.
        for stopped in &self.discovery_stopped {
            let _ = tokio::time::timeout(Duration::from_millis(500), stopped.cancelled()).await;
        }
        self.metrics_stop.cancel();
    }

    /// A run of `tasks` over the peers this node's discovery finds: configure it (options,
    /// extra peers, a journal, where events go) and `.await` it for the report. See [`Run`].
    /// A run ends early, gracefully, when the shutdown token is cancelled.
    pub fn run(&mut self, tasks: Vec<Task>) -> Run<'_> {
        Run::new(self, tasks)
    }

    /// What awaiting a [`Run`] does.
    pub(crate) async fn run_plan(
        &mut self,
        tasks: Vec<Task>,
        opts: RunOptions,
        extra_peers: Vec<String>,
        local: Vec<InProcess>,
        journal: Option<Journal>,
        emit: &mut (dyn FnMut(&RunEvent) + Send),
    ) -> Result<RunReport, Error> {
        let mut opts = opts;
        // The run sends nothing larger than this node's frame limit; refuse a plan that
        // would need more before anything starts.
        opts.max_frame = opts.max_frame.min(self.settings.max_frame);
        p2p_tasks::runcore::validate(&tasks, &opts)?;
        // The node's backends start at its first run (or at `start`) and stay: this run
        // subscribes to what they know and find.
        self.start_discovery(None)?;
        let run_token = self.shutdown.child_token();
        // Everything this run starts ends with it, also when its future is dropped: the
        // per-run backends and dials stop on this token, the tasks in `helpers` are aborted.
        let stop_dialing = CancellationToken::new();
        let _stop_on_drop = stop_dialing.clone().drop_guard();
        let mut helpers = JoinSet::new();
        let extra = if extra_peers.is_empty() {
            None
        } else {
            let backends: Vec<Box<dyn Discovery>> = vec![Box::new(Static::new(extra_peers))];
            Some(p2p_discovery::start_all(
                backends,
                None,
                stop_dialing.clone(),
            )?)
        };
        // In-process nodes are found at once, each at an address of its own that nothing
        // listens on (`0.0.0.0:N`, the N-th in-process node), and dialled in memory.
        let (local_found, doors) = in_process_peers(local);
        let found = match (self.found.as_ref().map(Sightings::subscribe), extra) {
            (Some(a), Some(b)) => Some(merge(a, b, &mut helpers)),
            (Some(one), None) | (None, Some(one)) => Some(one),
            (None, None) => None,
        };
        let found = match (found, local_found) {
            (Some(a), Some(b)) => merge(a, b, &mut helpers),
            (Some(one), None) | (None, Some(one)) => one,
            // No discovery at all: a stream that has ended.
            (None, None) => mpsc::channel(1).1,
        };
        // The types in order of first appearance: one look per task, at the few types seen so
        // far (a comparison or two; hashing every task's type cost 240 instructions a task),
        // or in a set once there are more (a plan may have a hundred thousand types).
        const FEW: usize = 8;
        let mut order: Vec<&str> = Vec::new();
        let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for t in &tasks {
            let k = t.kind();
            let new = if order.len() <= FEW {
                !order.contains(&k)
            } else {
                seen.insert(k)
            };
            if new {
                order.push(k);
                if order.len() == FEW + 1 {
                    seen.extend(order.iter().copied());
                }
            }
        }
        let needed: Vec<String> = order.into_iter().map(str::to_owned).collect();
        drop(seen);
        let (peer_tx, peer_rx) = mpsc::channel(256);
        let (link_tx, link_rx) = mpsc::channel(4096);
        helpers.spawn(
            dial::Dialer {
                found,
                connect: dial::with_in_process(
                    dial::tcp(self.hello(false), self.settings.clone()),
                    doors,
                    self.hello(false),
                    self.settings.clone(),
                ),
                give_up_after: opts.discovery_timeout,
                needed,
                peers: peer_tx,
                links: link_tx,
                stop: stop_dialing.clone(),
                describe: self.describe,
                max_dialing: dial::MAX_DIALING,
                // Each peer holds a descriptor: no more at once than the limit holds.
                max_peers: crate::fdlimit::Limit::current().connections(),
            }
            .run(),
        );
        let inputs = Inputs {
            peers: peer_rx,
            links: link_rx,
            shutdown: run_token,
            journal,
        };
        let report = p2p_tasks::run(tasks, opts, inputs, emit).await;
        stop_dialing.cancel();
        helpers.shutdown().await;
        Ok(report?)
    }
}

/// The discovery events of in-process nodes (an ended stream of one sighting each, or
/// `None` without any) and where each is dialled.
fn in_process_peers(
    local: Vec<InProcess>,
) -> (
    Option<mpsc::Receiver<p2p_discovery::Event>>,
    HashMap<SocketAddr, InProcess>,
) {
    if local.is_empty() {
        return (None, HashMap::new());
    }
    let (tx, rx) = mpsc::channel(local.len());
    let mut doors = HashMap::new();
    for (n, door) in local.into_iter().enumerate() {
        let addr = in_process_addr(n);
        let peer = p2p_discovery::Peer {
            addr,
            // Like a static peer: a connection that breaks is dialled again.
            node_id: None,
            types: Some(door.types().to_vec()),
            capacity: None,
            source: "in-process",
        };
        // Room for every one: the channel holds them all.
        let _ = tx.try_send(p2p_discovery::Event::Discovered(peer));
        doors.insert(addr, door);
    }
    (Some(rx), doors)
}

/// The address the `n`-th in-process node of a run (from 0) is shown and dialled at:
/// `0.0.0.0:n+1` while that fits a port, then further up the (unroutable) `0.0.0.0/8`, so
/// every one has an address of its own however many there are. Nothing listens there.
pub(crate) fn in_process_addr(n: usize) -> SocketAddr {
    let k = (n as u64).saturating_add(1);
    let [.., b1, b2, b3, hi, lo] = k.to_be_bytes();
    SocketAddr::from(([0, b1, b2, b3], u16::from_be_bytes([hi, lo])))
}

/// One stream of discovery events from two.
/// The merging task runs in `tasks`, so it ends with their owner.
fn merge(
    mut a: mpsc::Receiver<p2p_discovery::Event>,
    mut b: mpsc::Receiver<p2p_discovery::Event>,
    tasks: &mut JoinSet<()>,
) -> mpsc::Receiver<p2p_discovery::Event> {
    let (tx, rx) = mpsc::channel(p2p_discovery::EVENT_QUEUE);
    tasks.spawn(async move {
        let (mut a_open, mut b_open) = (true, true);
        while a_open || b_open {
            let ev = tokio::select! {
                ev = a.recv(), if a_open => match ev { Some(ev) => ev, None => { a_open = false; continue } },
                ev = b.recv(), if b_open => match ev { Some(ev) => ev, None => { b_open = false; continue } },
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    rx
}

struct AcceptCtx {
    /// The runtime the node was started on: the node side of its in-process connections
    /// runs there, whoever connects.
    runtime: tokio::runtime::Handle,
    /// The numbers of the in-process connections (counted down from the top, apart from the
    /// accepted ones').
    next_local: std::sync::atomic::AtomicU64,
    floods: Mutex<Floods>,
    conns: Arc<ConnStats>,
    hello: Hello,
    settings: Settings,
    worker: Arc<Worker>,
    slots: Arc<Semaphore>,
    handshakes: HandshakeGate,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    describe: dial::Describe,
}

/// The handshake a new connection gets: the node's, with the capacity it may be given at
/// most on that connection ([`Worker::ceiling`]: the capacity may have grown since start).
fn hello_now(ctx: &AcceptCtx) -> Hello {
    let mut hello = ctx.hello.clone();
    if hello.capacity > 0 {
        hello.capacity = ctx.worker.ceiling();
    }
    hello
}

async fn accept_loop(listener: TcpListener, ctx: Arc<AcceptCtx>) {
    let mut next_id: LinkId = 0;
    let mut summaries = tokio::time::interval(LOG_INTERVAL);
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = summaries.tick() => {
                flood_summaries(&ctx.floods, ctx.handshakes.max());
                continue;
            }
            a = listener.accept() => a,
        };
        let (stream, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = ctx.slots.clone().try_acquire_owned() else {
            ctx.conns.refused(Refused::ConnectionLimit);
            flood_warn(
                &ctx.floods,
                |f| &mut f.limit_reached,
                |unwritten| {
                    warn!(peer = %addr, "connection limit reached; closing new connection{}", more(unwritten));
                },
            );
            continue;
        };
        let open = ctx.conns.accepted();
        let ticket = ctx.handshakes.admit();
        next_id += 1;
        let id = next_id;
        let c = ctx.clone();
        ctx.tracker.spawn(async move {
            serve_connection(stream, addr, id, ticket, &c).await;
            drop((permit, open));
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    addr: SocketAddr,
    id: LinkId,
    ticket: HandshakeTicket,
    ctx: &AcceptCtx,
) {
    let (tx, rx) = mpsc::channel::<(LinkId, LinkEvent)>(LINK_EVENTS);
    // As net::accept does, with the bytes counted for metrics.
    let _ = stream.set_nodelay(true);
    let stream = metrics::Counted::new(stream, ctx.conns.clone());
    let accepted = tokio::select! {
        r = net::accept_stream(stream, addr, hello_now(ctx), &ctx.settings, id, tx) => r,
        _ = ticket.evicted() => {
            ctx.conns.refused(Refused::HandshakeEvicted);
            flood_warn(&ctx.floods, |f| &mut f.evicted, |unwritten| {
                warn!(
                    peer = %addr,
                    limit = ctx.handshakes.max(),
                    "too many connections in handshake; closed the oldest{}",
                    more(unwritten)
                );
            });
            return;
        }
    };
    drop(ticket);
    let link = match accepted {
        Ok(link) => link,
        Err(e) => {
            ctx.conns.refused(Refused::of(&e));
            flood_warn(
                &ctx.floods,
                |f| &mut f.failed,
                |unwritten| {
                    warn!(peer = %addr, error = %(ctx.describe)(&e), "handshake failed; connection closed{}", more(unwritten));
                },
            );
            return;
        }
    };
    ctx.conns.established();
    let p = link.peer();
    info!(
        peer = %p.node_id.short(),
        addr = %addr,
        types = %types_shown(&p.types),
        "connected"
    );
    ctx.worker
        .clone()
        .serve_link(link, rx, ctx.shutdown.clone())
        .await;
}

/// A serving node's door for connections from this process (see [`Node::in_process`]):
/// each [`InProcess::connect`] makes an in-memory link ([`net::pipe`]), whose node side
/// the node serves as it serves an accepted TCP connection (its worker, its instant
/// answers, its files, its drain and goodbye), counted in its connection limit. The node
/// side runs on the runtime the node was started on (a node started on a thread of its own
/// works beside the run that connects to it).
#[derive(Clone)]
pub struct InProcess {
    node: NodeId,
    types: Vec<String>,
    door: Arc<AcceptCtx>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("node", &self.node)
            .field("types", &self.types)
            .finish_non_exhaustive()
    }
}

impl InProcess {
    /// The node's id.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The types the node serves.
    pub fn types(&self) -> &[String] {
        &self.types
    }

    /// Opens an in-memory link to the node as `hello` (the `Hello`/`Welcome` exchange runs
    /// as over TCP, bounded by `settings`' handshake timeout), link `id` on `events`. `addr`
    /// is what both links' [`net::Link::addr`] say. Fails when the node is shutting down or
    /// at its connection limit, or the handshake fails.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        hello: Hello,
        settings: &Settings,
        id: LinkId,
        events: net::EventSender,
    ) -> Result<net::Link, p2p_core::Error> {
        let ctx = self.door.clone();
        let refused = |why| p2p_core::Error::InvalidState {
            action: "connect to an in-process node",
            why,
        };
        if ctx.shutdown.is_cancelled() {
            return Err(refused("the node is shutting down"));
        }
        let Ok(permit) = ctx.slots.clone().try_acquire_owned() else {
            ctx.conns.refused(Refused::ConnectionLimit);
            return Err(refused("the node is at its connection limit"));
        };
        // Room for the larger window of the link (the node's ceiling; the dialler serves
        // nothing, or its own capacity).
        let hello_node = hello_now(&ctx);
        let window = hello_node.capacity.max(hello.capacity);
        let (near, far) = net::pipe(window);
        let open = ctx.conns.accepted();
        let node_id = u64::MAX
            - ctx
                .next_local
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let c = ctx.clone();
        let serve = async move {
            let (tx, rx) = mpsc::channel::<(LinkId, LinkEvent)>(LINK_EVENTS);
            let accepted =
                net::accept_memory(far, addr, hello_node, &c.settings, node_id, tx).await;
            match accepted {
                Ok(link) => {
                    c.conns.established();
                    c.worker
                        .clone()
                        .serve_link(link, rx, c.shutdown.clone())
                        .await;
                }
                Err(e) => {
                    c.conns.refused(Refused::of(&e));
                    warn!(error = %(c.describe)(&e), "in-process handshake failed");
                }
            }
            drop((permit, open));
        };
        ctx.tracker.spawn_on(serve, &ctx.runtime);
        net::connect_memory(near, addr, hello, settings, id, events).await
    }
}

#[cfg(test)]
mod tests {
    use super::in_process_addr;

    /// Every in-process node has an address of its own, also past 65,535 of them, and the
    /// first ones are `0.0.0.0:1`, `0.0.0.0:2`, ... as the docs say.
    #[test]
    fn in_process_addresses_are_distinct_past_a_port_full() {
        assert_eq!(in_process_addr(0).to_string(), "0.0.0.0:1");
        assert_eq!(in_process_addr(65_534).to_string(), "0.0.0.0:65535");
        let all: std::collections::HashSet<_> = (0..70_000).map(in_process_addr).collect();
        assert_eq!(all.len(), 70_000);
        assert!(all
            .iter()
            .all(|a| a.ip().is_ipv4() && a.ip().to_string().starts_with("0.")));
    }
}
