//! `p2p-node status`: ask live nodes, over the protocol, how they are.
//!
//! # Layout
//!
//! - [`report`]: what a serving node answers (its [`StatusReport`]): counters of its
//!   worker, the tasks running now, uptime, load average. [`crate::Node`] installs it as its
//!   [`p2p_core::net::Settings::status`].
//! - [`query`]: dials one node (the normal handshake, under the cluster key if any), sends
//!   a `StatusRequest` and waits for the answer, bounded; then says goodbye.
//! - [`probe`]: [`query`] for every node discovery finds, [`PARALLEL`] at once.
//!
//! A node older than the status request closes the connection on it
//! ([`p2p_core::Error::NoStatus`]); one that never answers is given up after the timeout:
//! either is an error for that node only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2p_core::message::{RunningTask, StatusReport, MAX_STATUS_TASKS};
use p2p_core::net::{self, Command, Settings};
use p2p_core::{ClusterKey, Hello, Identity};
use p2p_discovery::{Discovery, Event};
use p2p_tasks::stats::WorkerStats;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// Most nodes asked at once (the same bound as `peers`).
pub const PARALLEL: usize = crate::peers::MAX_CONCURRENT_PROBES;

/// A serving node's answer now (see the module documentation): `waiting` attempts wait
/// for one of its `capacity` slots.
pub fn report(
    worker: &WorkerStats,
    started: Instant,
    draining: bool,
    waiting: u64,
    capacity: u32,
) -> StatusReport {
    let (mut completed, mut failed, mut running_total) = (0, 0, 0);
    for (_, c) in worker.by_type() {
        completed += c.completed;
        failed += c.failed;
        running_total += c.running;
    }
    let running = worker
        .running(MAX_STATUS_TASKS)
        .into_iter()
        .map(|t| RunningTask {
            running_ms: t
                .since
                .elapsed()
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            task: t.id,
            kind: t.kind,
            coordinator: t.coordinator,
        })
        .collect();
    StatusReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_s: started.elapsed().as_secs(),
        draining,
        running_total,
        running,
        completed,
        failed,
        load_milli: p2p_tasks::resources::load_averages(),
        waiting,
        capacity,
    }
    .bounded()
}

/// One node's status, as `status` shows it (`--json`: one object per node).
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Node id.
    pub id: String,
    /// The address it was asked at.
    pub addr: String,
    /// Its software version.
    pub version: String,
    /// The protocol version of its handshake.
    pub protocol: u16,
    /// Types served.
    pub types: Vec<String>,
    /// Tasks it runs at once now (its handshake's, from a node that does not report it).
    pub capacity: u32,
    /// Assigned attempts waiting there for a free slot (bounded by the node).
    pub waiting: u64,
    /// The tasks running now (at most 64 listed; see `running_total`).
    pub running: Vec<Running>,
    /// How many tasks run now.
    pub running_total: u64,
    /// Tasks that succeeded since it started.
    pub completed: u64,
    /// Tasks that failed since it started.
    pub failed: u64,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// Its 1, 5 and 15 minute load averages, where known.
    pub load_avg: Option<[f64; 3]>,
    /// Whether it drains (takes no new work).
    pub draining: bool,
}

/// A task running on a node.
#[derive(Debug, Clone, Serialize)]
pub struct Running {
    /// Task id.
    pub task: String,
    /// Task type.
    #[serde(rename = "type")]
    pub kind: String,
    /// How long it has run, in milliseconds.
    pub running_ms: u64,
    /// The coordinator that assigned it (node id).
    pub coordinator: String,
}

fn status_of(addr: SocketAddr, peer: &Hello, r: StatusReport) -> NodeStatus {
    NodeStatus {
        id: peer.node_id.to_string(),
        addr: addr.to_string(),
        version: r.version,
        protocol: peer.version,
        types: peer.types.clone(),
        capacity: if r.capacity > 0 {
            r.capacity
        } else {
            peer.capacity
        },
        waiting: r.waiting,
        running: r
            .running
            .into_iter()
            .map(|t| Running {
                task: t.task,
                kind: t.kind,
                running_ms: t.running_ms,
                coordinator: t.coordinator,
            })
            .collect(),
        running_total: r.running_total,
        completed: r.completed,
        failed: r.failed,
        uptime_s: r.uptime_s,
        load_avg: r.load_milli.map(|l| l.map(|v| f64::from(v) / 1000.0)),
        draining: r.draining,
    }
}

/// Asks the node at `addr`: the handshake (bounded by the settings' connect and handshake
/// timeouts), then the status request, answered within `limit`.
pub async fn query(
    addr: SocketAddr,
    hello: Hello,
    settings: &Settings,
    limit: Duration,
) -> Result<NodeStatus, p2p_core::Error> {
    let (tx, mut rx) = mpsc::channel(16);
    let link = net::connect(addr, hello, settings, 1, tx).await?;
    let answer = link.request_status(limit).await;
    let _ = link.send(Command::Goodbye);
    // Briefly, for the goodbye to complete so the node logs a clean close.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some((_, ev)) = rx.recv().await {
            if matches!(ev, net::LinkEvent::Closed { .. }) {
                break;
            }
        }
    })
    .await;
    Ok(status_of(addr, link.peer(), answer?))
}

/// A node discovery found that did not answer.
#[derive(Debug, Clone, Serialize)]
pub struct Unreachable {
    /// Its address.
    pub addr: String,
    /// Why.
    pub error: String,
}

/// Asks every node the backends find within `timeout` (once per node id, or address when
/// the backend gives none), [`PARALLEL`] at once, each answer bounded by `answer_timeout`.
/// Returns as soon as discovery has nothing more and every node asked has answered.
pub async fn probe(
    cluster: &str,
    backends: Vec<Box<dyn Discovery>>,
    timeout: Duration,
    answer_timeout: Duration,
    keys: Vec<ClusterKey>,
    identity: Identity,
    describe: crate::dial::Describe,
) -> Result<Vec<Result<NodeStatus, Unreachable>>, Error> {
    let stop = CancellationToken::new();
    let mut found = p2p_discovery::start_all(backends, None, stop.clone())?;
    let (hello, settings) = crate::peers::client(cluster, &keys, identity);
    let deadline = tokio::time::Instant::now() + timeout;
    let slots = Arc::new(Semaphore::new(PARALLEL));
    let mut seen = std::collections::HashSet::new();
    let mut asks = JoinSet::new();
    let mut discovering = true;
    let mut out = Vec::new();
    while discovering || !asks.is_empty() {
        tokio::select! {
            ev = found.recv(), if discovering => match ev {
                Some(Event::Discovered(p)) => {
                    let key = p.node_id.map_or_else(|| p.addr.to_string(), |id| id.to_string());
                    if !seen.insert(key) {
                        continue;
                    }
                    let (hello, settings, slots) = (hello.clone(), settings.clone(), slots.clone());
                    asks.spawn(async move {
                        let _slot = slots.acquire_owned().await;
                        query(p.addr, hello, &settings, answer_timeout)
                            .await
                            .map_err(|e| Unreachable { addr: p.addr.to_string(), error: describe(&e) })
                    });
                }
                Some(_) => {}
                None => discovering = false,
            },
            Some(done) = asks.join_next() => {
                if let Ok(r) = done {
                    out.push(r);
                }
            }
            _ = tokio::time::sleep_until(deadline), if discovering => discovering = false,
        }
    }
    stop.cancel();
    Ok(out)
}

/// A node's status as lines for a person, everything the node sent escaped.
pub fn describe(n: &NodeStatus) -> String {
    use p2p_core::text::escape;
    let short: String = n.id.chars().take(12).collect();
    let mut out = format!(
        "node {} at {}: version {}, protocol {}, types {}, capacity {}, up {}{}",
        escape(&short),
        escape(&n.addr),
        escape(&n.version),
        n.protocol,
        escape(&n.types.join(",")),
        n.capacity,
        humantime::format_duration(Duration::from_secs(n.uptime_s)),
        if n.draining { ", draining" } else { "" },
    );
    let load = match n.load_avg {
        Some([a, b, c]) => format!(", load {a:.2} {b:.2} {c:.2}"),
        None => String::new(),
    };
    out.push_str(&format!(
        "\n  running {}, waiting {}, completed {}, failed {}{load}",
        n.running_total, n.waiting, n.completed, n.failed
    ));
    for t in &n.running {
        let coordinator: String = t.coordinator.chars().take(12).collect();
        out.push_str(&format!(
            "\n    {} ({}) for {:.1}s, for coordinator {}",
            escape(&t.task),
            escape(&t.kind),
            t.running_ms as f64 / 1000.0,
            escape(&coordinator)
        ));
    }
    if n.running_total > n.running.len() as u64 {
        out.push_str(&format!(
            "\n    ... and {} more",
            n.running_total - n.running.len() as u64
        ));
    }
    out
}
