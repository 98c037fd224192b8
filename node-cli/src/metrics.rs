//! `serve --metrics-listen`: `GET /metrics` (Prometheus text format) and `GET /healthz`.
//!
//! # Layout
//!
//! - [`ConnStats`]: the serve side's connection counters (atomics, bumped in the accept
//!   loop).
//! - [`Source`]: everything a scrape reads (the worker's [`WorkerStats`], the connection
//!   counters, the handshake gate, discovery backends' counters, the drain state). It is a
//!   `prometheus_client` [`Collector`]: each scrape reads the atomics and encodes them, so
//!   nothing on the task path knows about Prometheus.
//! - [`RunMetrics`]: the same endpoint for `run --metrics-listen`, fed from the run's
//!   events at its event sink ([`RunStats`]), from the start of the run to its end.
//! - [`serve_http`]: a small `hyper` HTTP/1 server for the two paths, bounded everywhere: at
//!   most [`MAX_HTTP_CONNECTIONS`] connections (a new one closes the oldest, like the
//!   handshake gate), request headers within [`HEADER_TIMEOUT`] and [`MAX_REQUEST_BYTES`],
//!   and a whole connection within [`CONNECTION_LIFETIME`]. A bad request only ever costs
//!   its own connection.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use p2p_core::gate::HandshakeGate;
use p2p_tasks::stats::{WorkerStats, DURATION_BUCKETS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Most HTTP connections at once; a new one closes the oldest.
pub const MAX_HTTP_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this long.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes of a request's line and headers (hyper's read buffer).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A connection closes after this long, whatever it does (a scraper reconnects).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Why the serve side closed a connection before it carried work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The node was at `--max-connections`.
    ConnectionLimit,
    /// Closed in its handshake to make room (`--max-handshakes`).
    HandshakeEvicted,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// Another protocol version.
    Version,
    /// Another cluster.
    Cluster,
    /// No or the wrong cluster key, or a failed authentication.
    Key,
    /// Bytes that are not the protocol (bad frame, unexpected message).
    Protocol,
    /// The peer closed or the socket failed during the handshake.
    Closed,
}

impl Refused {
    const ALL: [Refused; 8] = [
        Refused::ConnectionLimit,
        Refused::HandshakeEvicted,
        Refused::HandshakeTimeout,
        Refused::Version,
        Refused::Cluster,
        Refused::Key,
        Refused::Protocol,
        Refused::Closed,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::ConnectionLimit => "connection_limit",
            Refused::HandshakeEvicted => "handshake_evicted",
            Refused::HandshakeTimeout => "handshake_timeout",
            Refused::Version => "version",
            Refused::Cluster => "cluster",
            Refused::Key => "key",
            Refused::Protocol => "protocol",
            Refused::Closed => "closed",
        }
    }

    /// The reason of a failed handshake.
    pub fn of(e: &p2p_core::Error) -> Refused {
        use p2p_core::{
            ConnectionError as C, Error as E, HandshakeError as H, RejectReason as R, Stage,
        };
        match e {
            E::Handshake(H::Timeout(_)) => Refused::HandshakeTimeout,
            E::Handshake(H::Refused { reason, .. } | H::Rejected { reason, .. }) => match reason {
                R::Version => Refused::Version,
                R::Cluster => Refused::Cluster,
                R::Key => Refused::Key,
                // A Hello out of the protocol's bounds, or a reason only a dialler sees.
                _ => Refused::Protocol,
            },
            E::Handshake(H::PeerClosed {
                stage: Stage::Hello { .. },
            })
            | E::Io(_)
            | E::Connection(C::Lost) => Refused::Closed,
            // The secure channel's failures (another key, no key, plaintext, a forged id).
            E::Handshake(
                H::NoKey
                | H::PeerHasKey
                | H::Plaintext
                | H::NotSecureChannel
                | H::UnknownKey { .. }
                | H::KeyMismatch { .. }
                | H::NoStaticKey
                | H::Noise(_)
                | H::FingerprintLength { .. }
                | H::PeerClosed {
                    stage: Stage::Secure { .. },
                }
                | H::IdMismatch { .. },
            )
            | E::Connection(C::Tampered) => Refused::Key,
            _ => Refused::Protocol,
        }
    }
}

/// The serve side's connection counters.
#[derive(Debug, Default)]
pub struct ConnStats {
    accepted: AtomicU64,
    open: AtomicI64,
    established: AtomicU64,
    refused: [AtomicU64; Refused::ALL.len()],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl ConnStats {
    /// A connection was accepted; it counts as open until the guard is dropped.
    pub fn accepted(self: &Arc<Self>) -> OpenGuard {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    /// A connection finished its handshake.
    pub fn established(&self) {
        self.established.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was closed before it carried work.
    pub fn refused(&self, why: Refused) {
        if let Some(i) = Refused::ALL.iter().position(|r| *r == why) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A served connection's stream that counts the bytes it carries into [`ConnStats`]
/// (one relaxed add per read or write call, not per message).
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    stats: Arc<ConnStats>,
}

impl<S> Counted<S> {
    /// Counts `inner`'s bytes into `stats`.
    pub fn new(inner: S, stats: Arc<ConnStats>) -> Self {
        Counted { inner, stats }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        if n > 0 {
            self.stats.bytes_in.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Keeps a connection counted as open.
#[derive(Debug)]
pub struct OpenGuard(Arc<ConnStats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One discovery backend's counters, by name (see [`p2p_discovery::CounterReader`] and `p2p_discovery::udp::Counters`).
pub type DiscoveryStats = (
    String,
    Arc<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>,
);

/// What a scrape reads (see the module documentation).
#[derive(Clone)]
pub struct Source {
    /// The worker's task counters.
    pub worker: Arc<WorkerStats>,
    /// The connection counters.
    pub conns: Arc<ConnStats>,
    /// The handshake gate (connections in handshake, evictions).
    pub gate: HandshakeGate,
    /// Cancelled when the node drains: `/healthz` says 503 from then on.
    pub draining: CancellationToken,
    /// Tasks run at once.
    pub capacity: u32,
    /// When the node started.
    pub started: Instant,
    /// Discovery backends' counters.
    pub discovery: Vec<DiscoveryStats>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn one(v: i64) -> Vec<(Vec<(&'static str, String)>, i64)> {
    vec![(Vec::new(), v)]
}

impl Collector for Source {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut enc;
        gauge(
            e,
            "p2p_node_build_info",
            "Version of this node and of the protocol it speaks (always 1).",
            &[(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    ("protocol", p2p_core::PROTOCOL_VERSION.to_string()),
                ],
                1,
            )],
        )?;
        gauge(
            e,
            "p2p_node_uptime_seconds",
            "Seconds since the node started.",
            &one(self.started.elapsed().as_secs() as i64),
        )?;
        gauge(
            e,
            "p2p_node_draining",
            "1 while the node drains (takes no new work), else 0.",
            &one(i64::from(self.draining.is_cancelled())),
        )?;
        gauge(
            e,
            "p2p_node_capacity",
            "Tasks the node runs at once.",
            &one(i64::from(self.capacity)),
        )?;
        let c = &self.conns;
        gauge(
            e,
            "p2p_node_connections_open",
            "Connections served now (in handshake included).",
            &one(c.open.load(Ordering::Relaxed).max(0)),
        )?;
        gauge(
            e,
            "p2p_node_handshakes_in_progress",
            "Connections in their handshake now.",
            &one(self.gate.in_handshake() as i64),
        )?;
        counter(
            e,
            "p2p_node_connections_accepted",
            "Connections accepted.",
            &[(Vec::new(), c.accepted.load(Ordering::Relaxed))],
        )?;
        counter(
            e,
            "p2p_node_connections_established",
            "Connections that completed their handshake.",
            &[(Vec::new(), c.established.load(Ordering::Relaxed))],
        )?;
        counter(
            e,
            "p2p_node_received_bytes",
            "Bytes received on served connections (framing and encryption included).",
            &[(Vec::new(), c.bytes_in.load(Ordering::Relaxed))],
        )?;
        counter(
            e,
            "p2p_node_sent_bytes",
            "Bytes sent on served connections (framing and encryption included).",
            &[(Vec::new(), c.bytes_out.load(Ordering::Relaxed))],
        )?;
        let refused: Vec<_> = Refused::ALL
            .iter()
            .zip(&c.refused)
            .map(|(r, n)| {
                (
                    vec![("reason", r.label().to_string())],
                    n.load(Ordering::Relaxed),
                )
            })
            .collect();
        counter(
            e,
            "p2p_node_connections_refused",
            "Connections closed before they carried work, by reason.",
            &refused,
        )?;
        let types = self.worker.by_type();
        let lbl = |t: &str| vec![("type", t.to_string())];
        let rows = |f: &dyn Fn(&p2p_tasks::stats::TypeCounters) -> u64| -> Vec<_> {
            types.iter().map(|(t, c)| (lbl(t), f(c))).collect()
        };
        counter(
            e,
            "p2p_node_tasks_assigned",
            "Tasks assigned to this node, by type.",
            &rows(&|c| c.assigned),
        )?;
        counter(
            e,
            "p2p_node_tasks_completed",
            "Tasks that succeeded, by type.",
            &rows(&|c| c.completed),
        )?;
        counter(
            e,
            "p2p_node_tasks_failed",
            "Tasks that failed (handler failure, timeout, cancelled, stopped), by type.",
            &rows(&|c| c.failed),
        )?;
        counter(
            e,
            "p2p_node_tasks_unknown_type",
            "Assignments of a type this node does not serve (failed at once).",
            &[(Vec::new(), self.worker.unknown_type())],
        )?;
        let running: Vec<_> = types
            .iter()
            .map(|(t, c)| (lbl(t), c.running as i64))
            .collect();
        gauge(
            e,
            "p2p_node_tasks_running",
            "Tasks running now (holding a slot), by type.",
            &running,
        )?;
        let mut h = e.encode_descriptor(
            "p2p_node_task_duration_seconds",
            "Run time of ended tasks, by type.",
            None,
            MetricType::Histogram,
        )?;
        for (t, c) in &types {
            let mut buckets: Vec<(f64, u64)> = DURATION_BUCKETS
                .iter()
                .copied()
                .zip(c.buckets.iter().copied())
                .collect();
            buckets.push((f64::INFINITY, c.buckets.last().copied().unwrap_or(0)));
            let count = c.buckets.iter().sum();
            let labels = lbl(t);
            h.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    c.duration_sum_s,
                    count,
                    &buckets,
                    None,
                )?;
        }
        let mut disc = Vec::new();
        for (backend, read) in &self.discovery {
            for (name, v) in read() {
                disc.push((
                    vec![("backend", backend.clone()), ("counter", name.to_string())],
                    v,
                ));
            }
        }
        counter(
            e,
            "p2p_node_discovery_events",
            "Discovery backends' counters (datagrams, beacons, peers found and lost).",
            &disc,
        )?;
        Ok(())
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `stop` is cancelled.
pub async fn serve_http(listener: TcpListener, source: Source, stop: CancellationToken) {
    let draining = source.draining.clone();
    serve_collector(listener, Box::new(source), draining, stop).await;
}

/// Serves `collector` at `/metrics`, and `/healthz` (503 once `draining` is cancelled), on
/// `listener` until `stop` is cancelled.
pub async fn serve_collector(
    listener: TcpListener,
    collector: Box<dyn Collector>,
    draining: CancellationToken,
    stop: CancellationToken,
) {
    let mut registry = Registry::default();
    registry.register_collector(collector);
    let state = Arc::new((registry, draining));
    let gate = HandshakeGate::new(MAX_HTTP_CONNECTIONS);
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ticket = gate.admit();
        let state = state.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &state.0, &state.1)) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_BYTES)
                .max_headers(64);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let outcome = tokio::select! {
                r = tokio::time::timeout(CONNECTION_LIFETIME, conn) => match r {
                    Ok(Ok(())) => "closed",
                    Ok(Err(_)) => "bad request",
                    Err(_) => "lifetime over",
                },
                _ = ticket.evicted() => "evicted (too many connections)",
                _ = stop.cancelled() => "node stopped",
            };
            debug!(peer = %peer, outcome, "metrics connection ended");
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
}

fn answer(
    req: &Request<Incoming>,
    registry: &Registry,
    draining: &CancellationToken,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(ctype),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::prometheus_text::encode(&mut body, registry) {
                Ok(()) => reply(
                    StatusCode::OK,
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    body,
                ),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    "cannot encode the metrics\n".into(),
                ),
            }
        }
        "/healthz" => {
            if draining.is_cancelled() {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "draining\n".into(),
                )
            } else {
                reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into())
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /metrics or /healthz\n".into(),
        ),
    }
}

/// Counters of one task type in a run.
#[derive(Debug, Default, Clone)]
struct RunType {
    assigned: u64,
    completed: u64,
    failed: u64,
    retried: u64,
    cancelled: u64,
    lost: u64,
    running: i64,
    /// One count per bucket of [`DURATION_BUCKETS`] (not cumulative), and one for longer.
    buckets: [u64; DURATION_BUCKETS.len() + 1],
    duration_sum_s: f64,
}

impl RunType {
    fn observe(&mut self, ms: f64) {
        let s = (ms / 1000.0).max(0.0);
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i] = self.buckets[i].saturating_add(1);
        self.duration_sum_s += s;
    }
}

/// What a run's events say, for `run --metrics-listen`: counters per task type, nodes
/// connected, and whether the run is stopping. IO-free; fed by [`RunStats::event`].
#[derive(Debug)]
pub struct RunStats {
    tasks: usize,
    started: Instant,
    nodes: i64,
    /// Types in the order first seen (a run has few).
    types: Vec<(String, RunType)>,
    /// Attempts assigned and not ended: task id to (type, node). As many as the nodes run
    /// at once.
    open: HashMap<p2p_tasks::CompactString, (std::sync::Arc<str>, std::sync::Arc<str>)>,
}

/// The most task types a run's metrics keep apart; the rest are counted as `other` (the
/// types of a run come from its own task file, but a bound costs nothing).
pub const MAX_RUN_TYPES: usize = 1024;

impl RunStats {
    /// The counters of a run of `tasks` tasks, none run yet.
    pub fn new(tasks: usize) -> RunStats {
        RunStats {
            tasks,
            started: Instant::now(),
            nodes: 0,
            types: Vec::new(),
            open: HashMap::new(),
        }
    }

    /// The attempt of `task` ended: whether it was counted as running.
    fn ended(&mut self, task: &str) -> bool {
        self.open.remove(task).is_some()
    }

    /// An attempt counted as running ended without a result (lost with its node).
    fn lost(&mut self, kind: &str) {
        let t = self.of(kind);
        t.lost += 1;
        t.running = (t.running - 1).max(0);
    }

    fn of(&mut self, kind: &str) -> &mut RunType {
        let kind =
            if self.types.len() >= MAX_RUN_TYPES && !self.types.iter().any(|(k, _)| k == kind) {
                "other"
            } else {
                kind
            };
        let i = match self.types.iter().position(|(k, _)| k == kind) {
            Some(i) => i,
            None => {
                self.types.push((kind.to_owned(), RunType::default()));
                self.types.len() - 1
            }
        };
        &mut self.types[i].1
    }

    /// Counts one event of the run.
    pub fn event(&mut self, ev: &p2p_tasks::RunEvent) {
        use p2p_tasks::RunEvent as E;
        match ev {
            E::Connected { .. } => self.nodes = self.nodes.saturating_add(1),
            E::Disconnected { node, .. } => {
                self.nodes = (self.nodes - 1).max(0);
                // Its attempts are lost (they run again, assigned anew).
                let lost: Vec<p2p_tasks::CompactString> = self
                    .open
                    .iter()
                    .filter(|(_, (_, n))| **n == **node)
                    .map(|(t, _)| t.clone())
                    .collect();
                for task in lost {
                    if let Some((kind, _)) = self.open.remove(&task) {
                        self.lost(&kind);
                    }
                }
            }
            E::TaskAssigned {
                task, kind, node, ..
            } => {
                // Assigned while still open: the earlier assignment was lost.
                if let Some((k, _)) = self.open.insert(task.clone(), (kind.clone(), node.clone())) {
                    self.lost(&k);
                }
                let t = self.of(kind);
                t.assigned += 1;
                t.running += 1;
            }
            E::TaskCompleted {
                task,
                kind,
                duration_ms,
                ..
            } => {
                let was = self.ended(task);
                let t = self.of(kind);
                t.completed += 1;
                if was {
                    t.running = (t.running - 1).max(0);
                }
                t.observe(*duration_ms);
            }
            E::TaskFailed {
                task,
                kind,
                attempt,
                duration_ms,
                ..
            } => {
                let was = self.ended(task);
                let t = self.of(kind);
                t.failed += 1;
                if was {
                    t.running = (t.running - 1).max(0);
                }
                // Attempt 0: it never ran (a dependency failed, no node): no run time.
                if *attempt > 0 {
                    t.observe(*duration_ms);
                }
            }
            E::TaskCancelled {
                task,
                kind,
                duration_ms,
                ..
            } => {
                let was = self.ended(task);
                let t = self.of(kind);
                t.cancelled += 1;
                if was {
                    t.running = (t.running - 1).max(0);
                }
                t.observe(*duration_ms);
            }
            E::TaskRetry { task, kind, .. } => {
                let was = self.ended(task);
                let t = self.of(kind);
                t.retried += 1;
                if was {
                    t.running = (t.running - 1).max(0);
                }
            }
            _ => {}
        }
    }
}

/// [`RunStats`] behind a lock, as a scrape reads them.
#[derive(Debug, Clone)]
struct RunSource(Arc<std::sync::Mutex<RunStats>>);

impl Collector for RunSource {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (tasks, elapsed, nodes, types) = match self.0.lock() {
            Ok(s) => (s.tasks, s.started.elapsed(), s.nodes, s.types.clone()),
            Err(p) => {
                let s = p.into_inner();
                (s.tasks, s.started.elapsed(), s.nodes, s.types.clone())
            }
        };
        let e = &mut enc;
        gauge(
            e,
            "p2p_node_build_info",
            "Version of this node and of the protocol it speaks (always 1).",
            &[(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    ("protocol", p2p_core::PROTOCOL_VERSION.to_string()),
                ],
                1,
            )],
        )?;
        gauge(
            e,
            "p2p_node_run_tasks",
            "Tasks in the run's plan.",
            &one(i64::try_from(tasks).unwrap_or(i64::MAX)),
        )?;
        gauge(
            e,
            "p2p_node_run_elapsed_seconds",
            "Seconds since the run started.",
            &one(i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)),
        )?;
        gauge(
            e,
            "p2p_node_run_nodes_connected",
            "Nodes the run is connected to now.",
            &one(nodes),
        )?;
        let lbl = |t: &str| vec![("type", t.to_string())];
        let rows = |f: &dyn Fn(&RunType) -> u64| -> Vec<_> {
            types.iter().map(|(t, c)| (lbl(t), f(c))).collect()
        };
        counter(
            e,
            "p2p_node_run_tasks_assigned",
            "Attempts the run assigned, by type.",
            &rows(&|c| c.assigned),
        )?;
        counter(
            e,
            "p2p_node_run_tasks_completed",
            "Tasks that succeeded, by type.",
            &rows(&|c| c.completed),
        )?;
        counter(
            e,
            "p2p_node_run_tasks_failed",
            "Tasks that failed for good (including those that never ran), by type.",
            &rows(&|c| c.failed),
        )?;
        counter(
            e,
            "p2p_node_run_tasks_retried",
            "Attempts that failed and were retried, by type.",
            &rows(&|c| c.retried),
        )?;
        counter(
            e,
            "p2p_node_run_tasks_lost",
            "Attempts lost with their node's connection (the task runs again), by type.",
            &rows(&|c| c.lost),
        )?;
        counter(
            e,
            "p2p_node_run_tasks_cancelled",
            "Tasks stopped because the run was interrupted, by type.",
            &rows(&|c| c.cancelled),
        )?;
        let running: Vec<_> = types.iter().map(|(t, c)| (lbl(t), c.running)).collect();
        gauge(
            e,
            "p2p_node_run_tasks_running",
            "Attempts assigned and not ended, by type.",
            &running,
        )?;
        let mut h = e.encode_descriptor(
            "p2p_node_run_task_duration_seconds",
            "Handler run time of ended attempts (completed, failed, cancelled), by type.",
            None,
            MetricType::Histogram,
        )?;
        for (t, c) in &types {
            // Per-bucket counts: the encoder sums them into Prometheus' cumulative ones.
            let buckets: Vec<(f64, u64)> = c
                .buckets
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    (
                        DURATION_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                        *n,
                    )
                })
                .collect();
            let count = c.buckets.iter().fold(0u64, |a, n| a.saturating_add(*n));
            let labels = lbl(t);
            h.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    c.duration_sum_s,
                    count,
                    &buckets,
                    None,
                )?;
        }
        Ok(())
    }
}

/// `run --metrics-listen ADDR`: `/metrics` with the run's [`RunStats`] and `/healthz` (200
/// while the run goes on, 503 once it is stopping), from [`RunMetrics::start`] until
/// [`RunMetrics::stop`] (or drop) at the end of the run.
#[derive(Debug)]
pub struct RunMetrics {
    stats: Arc<std::sync::Mutex<RunStats>>,
    addr: std::net::SocketAddr,
    draining: CancellationToken,
    stop: CancellationToken,
}

impl RunMetrics {
    /// Binds `addr` (a non-loopback address only with a cluster key, `keyed`) and serves a
    /// run of `tasks` tasks there.
    pub async fn start(
        addr: std::net::SocketAddr,
        keyed: bool,
        tasks: usize,
    ) -> Result<RunMetrics, crate::Error> {
        if !addr.ip().is_loopback() && !keyed {
            return Err(crate::Error::Config(format!(
                "refusing to serve run metrics on {addr} without a cluster key: anyone who \
                 can reach it could read them. Pass --key-file, or listen on a loopback address"
            )));
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| crate::Error::Config(format!("--metrics-listen {addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| crate::Error::Config(format!("--metrics-listen {addr}: {e}")))?;
        let stats = Arc::new(std::sync::Mutex::new(RunStats::new(tasks)));
        let draining = CancellationToken::new();
        let stop = CancellationToken::new();
        tokio::spawn(serve_collector(
            listener,
            Box::new(RunSource(stats.clone())),
            draining.clone(),
            stop.clone(),
        ));
        Ok(RunMetrics {
            stats,
            addr,
            draining,
            stop,
        })
    }

    /// Where it listens (the real port for `:0`).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The event sink's tap: counts each event; `/healthz` says 503 from the run's
    /// `terminating` phase on.
    pub fn tap(&self) -> impl FnMut(&p2p_tasks::RunEvent) + Send + 'static {
        let stats = self.stats.clone();
        let draining = self.draining.clone();
        move |ev| {
            if let p2p_tasks::RunEvent::Phase(p2p_tasks::Phase::Terminating) = ev {
                draining.cancel();
            }
            if let Ok(mut s) = stats.lock() {
                s.event(ev);
            }
        }
    }

    /// Stops serving (the listener closes).
    pub fn stop(&self) {
        self.draining.cancel();
        self.stop.cancel();
    }
}

impl Drop for RunMetrics {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod run_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use p2p_tasks::RunEvent;

    fn assigned(kind: &str) -> RunEvent {
        RunEvent::TaskAssigned {
            task: format!("{kind}1").into(),
            kind: kind.into(),
            node: "n".into(),
            attempt: 1,
        }
    }

    #[test]
    fn run_stats_follow_the_events() {
        let mut s = RunStats::new(4);
        s.event(&assigned("a"));
        s.event(&assigned("a"));
        s.event(&assigned("b"));
        s.event(&RunEvent::TaskCompleted {
            task: "a1".into(),
            kind: "a".into(),
            node: "n".into(),
            attempt: 1,
            ok: true,
            output: Default::default(),
            duration_ms: 2.0,
        });
        s.event(&RunEvent::TaskRetry {
            task: "a2".into(),
            kind: "a".into(),
            node: "n".into(),
            attempt: 1,
            error: "x".into(),
            delay_ms: 1,
        });
        s.event(&RunEvent::TaskFailed {
            task: "c1".into(),
            kind: "c".into(),
            node: "".into(),
            attempt: 0,
            ok: false,
            output: Default::default(),
            duration_ms: 0.0,
            exit_code: None,
            error: "no node".into(),
        });
        let a = &s.types[0].1;
        assert_eq!(
            (a.assigned, a.completed, a.retried, a.running),
            (2, 1, 1, 0)
        );
        assert_eq!(a.buckets.iter().sum::<u64>(), 1);
        assert!((a.duration_sum_s - 0.002).abs() < 1e-9);
        let b = &s.types[1].1;
        assert_eq!((b.assigned, b.running), (1, 1));
        // A task that never ran fails without freeing a slot it never held.
        let c = &s.types[2].1;
        assert_eq!(
            (c.failed, c.running, c.buckets.iter().sum::<u64>()),
            (1, 0, 0)
        );
    }

    #[tokio::test]
    async fn run_healthz_turns_503_when_the_run_ends_and_the_port_closes_on_stop() {
        let m = RunMetrics::start("127.0.0.1:0".parse().unwrap(), false, 1)
            .await
            .unwrap();
        let mut tap = m.tap();
        tap(&RunEvent::Phase(p2p_tasks::Phase::Assigning));
        assert!(!m.draining.is_cancelled());
        tap(&RunEvent::Phase(p2p_tasks::Phase::Terminating));
        assert!(m.draining.is_cancelled());
        // Refused before anything is bound.
        assert!(RunMetrics::start("0.0.0.0:0".parse().unwrap(), false, 1)
            .await
            .is_err());
    }

    #[test]
    fn attempts_lost_with_their_node_stop_running() {
        let mut s = RunStats::new(2);
        let on = |task: &str, node: &str| RunEvent::TaskAssigned {
            task: task.into(),
            kind: "a".into(),
            node: node.into(),
            attempt: 1,
        };
        s.event(&on("a1", "n1"));
        s.event(&on("a2", "n2"));
        s.event(&RunEvent::Disconnected {
            node: "n1".into(),
            addr: "x".into(),
            clean: false,
            error: None,
        });
        let a = &s.types[0].1;
        assert_eq!((a.assigned, a.running, a.lost), (2, 1, 1));
        // a2 assigned again without a disconnection seen: lost too, still one running.
        s.event(&on("a2", "n3"));
        let a = &s.types[0].1;
        assert_eq!((a.assigned, a.running, a.lost), (3, 1, 2));
    }

    #[test]
    fn run_types_are_bounded() {
        let mut s = RunStats::new(0);
        for i in 0..MAX_RUN_TYPES + 5 {
            s.event(&assigned(&format!("t{i}")));
        }
        assert_eq!(s.types.len(), MAX_RUN_TYPES + 1);
        assert_eq!(s.types[MAX_RUN_TYPES].0, "other");
        assert_eq!(s.types[MAX_RUN_TYPES].1.assigned, 5);
    }
}
