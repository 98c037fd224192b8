//! `p2p-node peers`: find nodes and ask each, over the handshake, what it serves.

use std::sync::Arc;
use std::time::Duration;

use p2p_core::net::{self, Command, Settings};
use p2p_core::{ClusterKey, Hello, Identity, PROTOCOL_VERSION};
use p2p_discovery::{Discovery, Event};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// A node as `peers` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    /// Node id.
    pub node: String,
    /// Address.
    pub addr: String,
    /// Types served.
    pub types: Vec<String>,
    /// Tasks run at once (now, from its load report; else its handshake's).
    pub capacity: u32,
    /// Tasks that ended there since it started, from its load report (none from a node
    /// that serves nothing or sent none in time).
    pub tasks: Option<u64>,
    /// Its own measure of its speed: the mean time a task held a slot there, in
    /// milliseconds (`busy_ms / tasks` of its load report; none before its first task).
    pub mean_task_ms: Option<f64>,
    /// The discovery backend that found it.
    pub source: String,
    /// When it was last seen, in milliseconds after the probe started.
    pub seen_ms: u64,
}

/// Most nodes asked at once; the others wait for a turn.
pub const MAX_CONCURRENT_PROBES: usize = 64;

/// Most nodes one probe lists (and asks); more found are ignored, with a warning.
pub const MAX_PEERS: usize = 4096;

/// How long a node that answered gets to complete the goodbye.
const GOODBYE_WAIT: Duration = Duration::from_secs(2);

/// How long `peers` waits for a serving node's first load report (sent at once after the
/// handshake).
const LOAD_WAIT: Duration = Duration::from_millis(1500);

/// How a client that serves nothing (`peers`, `status`) introduces itself: a `Hello` with
/// no types and no capacity, and connection settings with its first key and its identity.
pub(crate) fn client(
    cluster: &str,
    keys: &[ClusterKey],
    identity: Identity,
) -> (Hello, Arc<Settings>) {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster: cluster.to_string(),
        node_id: identity.node_id(),
        types: Vec::new(),
        capacity: 0,
    };
    let mut settings = Settings::default();
    settings.key = keys.first().cloned();
    settings.identity = Some(identity);
    let settings = Arc::new(settings);
    (hello, settings)
}

/// Discovers peers for up to `timeout` and handshakes with each (under the first of `keys`,
/// if any, as `identity`) to learn its types.
///
/// The nodes *asked* are those discovery reports before it ends: it ends when every backend
/// is done (a `--peer` list, once each entry is resolved) or at `timeout` (udp, mdns and dns
/// keep looking). Every node is asked as soon as it is found, up to
/// [`MAX_CONCURRENT_PROBES`] at once, so a node that never answers delays no other; this
/// returns once discovery has ended and every node asked has answered or failed (each
/// handshake is bounded by the connection settings' timeouts). Rows come in the order the
/// nodes were found; then the nodes that could not be reached, as `cannot reach ADDR: WHY`
/// lines (errors worded by `describe`) in the order they failed, for the caller to show.
pub async fn probe(
    cluster: &str,
    backends: Vec<Box<dyn Discovery>>,
    timeout: Duration,
    keys: Vec<ClusterKey>,
    identity: Identity,
    describe: crate::dial::Describe,
) -> Result<(Vec<PeerInfo>, Vec<String>), Error> {
    let started = tokio::time::Instant::now();
    let mut seen = std::collections::HashSet::new();
    let stop = CancellationToken::new();
    let mut found = p2p_discovery::start_all(backends, None, stop.clone())?;
    let (hello, settings) = client(cluster, &keys, identity);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES));
    let deadline = started + timeout;
    let mut asking: JoinSet<(u64, Result<PeerInfo, String>)> = JoinSet::new();
    let mut answers: Vec<(u64, PeerInfo)> = Vec::new();
    let mut unreachable: Vec<String> = Vec::new();
    let mut next_id: u64 = 0;
    let mut discovering = true;
    let mut too_many = false;
    loop {
        tokio::select! {
            ev = found.recv(), if discovering => {
                let Some(ev) = ev else {
                    discovering = false;
                    continue;
                };
                let Event::Discovered(p) = ev else {
                    continue;
                };
                // One row per node: a node found by two backends or at two addresses is
                // probed once.
                let key = p.node_id.map_or_else(|| p.addr.to_string(), |id| id.to_string());
                if seen.contains(&key) {
                    continue;
                }
                if seen.len() >= MAX_PEERS {
                    if !too_many {
                        too_many = true;
                        tracing::warn!("more than {MAX_PEERS} nodes found: the rest are not listed");
                    }
                    continue;
                }
                seen.insert(key);
                next_id += 1;
                let seen_ms = started.elapsed().as_millis() as u64;
                let (id, hello, settings, permits) =
                    (next_id, hello.clone(), settings.clone(), permits.clone());
                asking.spawn(async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return (id, Err(String::new()));
                    };
                    (id, ask(p, hello, &settings, id, seen_ms, describe).await)
                });
            }
            _ = tokio::time::sleep_until(deadline), if discovering => discovering = false,
            done = asking.join_next(), if !asking.is_empty() => {
                match done {
                    Some(Ok((id, Ok(info)))) => answers.push((id, info)),
                    Some(Ok((_, Err(line)))) if !line.is_empty() => unreachable.push(line),
                    _ => {}
                }
            }
            else => break,
        }
    }
    stop.cancel();
    answers.sort_by_key(|(id, _)| *id);
    Ok((
        answers.into_iter().map(|(_, info)| info).collect(),
        unreachable,
    ))
}

/// Handshakes with one discovered node; `cannot reach ADDR: WHY` when it cannot be reached.
async fn ask(
    p: p2p_discovery::Peer,
    hello: Hello,
    settings: &Settings,
    id: u64,
    seen_ms: u64,
    describe: crate::dial::Describe,
) -> Result<PeerInfo, String> {
    let (tx, mut rx) = mpsc::channel(16);
    match net::connect(p.addr, hello, settings, id, tx).await {
        Ok(link) => {
            let h = link.peer();
            let mut info = PeerInfo {
                node: h.node_id.to_string(),
                addr: p.addr.to_string(),
                types: h.types.clone(),
                capacity: h.capacity,
                tasks: None,
                mean_task_ms: None,
                source: p.source.to_string(),
                seen_ms,
            };
            if !h.types.is_empty() {
                let load = tokio::time::timeout(LOAD_WAIT, async {
                    while let Some((_, ev)) = rx.recv().await {
                        match ev {
                            net::LinkEvent::Load(r) => return Some(r),
                            net::LinkEvent::Closed { .. } => return None,
                            _ => {}
                        }
                    }
                    None
                })
                .await;
                if let Ok(Some(r)) = load {
                    info.capacity = r.capacity;
                    info.tasks = Some(r.tasks);
                    info.mean_task_ms = (r.tasks > 0).then(|| r.busy_ms as f64 / r.tasks as f64);
                }
            }
            let _ = link.send(Command::Goodbye);
            // Wait (briefly) for the goodbye to complete so the peer logs a clean close.
            let _ = tokio::time::timeout(GOODBYE_WAIT, rx.recv()).await;
            Ok(info)
        }
        Err(e) => Err(format!("cannot reach {}: {}", p.addr, describe(&e))),
    }
}
