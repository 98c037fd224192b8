//! `p2p-node peers`: find nodes and ask each, over the handshake, what it serves.

use std::time::Duration;

use p2p_core::net::{self, Command, Settings};
use p2p_core::{ClusterKey, Hello, Identity, PROTOCOL_VERSION};
use p2p_discovery::{Discovery, Event};
use serde::Serialize;
use tokio::sync::mpsc;
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
    /// Tasks run at once.
    pub capacity: u32,
    /// The discovery backend that found it.
    pub source: String,
    /// When it was last seen, in milliseconds after the probe started.
    pub seen_ms: u64,
}

/// Discovers peers for up to `timeout` and handshakes with each (under the first of `keys`,
/// if any, as `identity`) to learn its types.
pub async fn probe(
    cluster: &str,
    backends: Vec<Box<dyn Discovery>>,
    timeout: Duration,
    keys: Vec<ClusterKey>,
    identity: Identity,
) -> Result<Vec<PeerInfo>, Error> {
    let started = tokio::time::Instant::now();
    let mut seen = std::collections::HashSet::new();
    let stop = CancellationToken::new();
    let mut found = p2p_discovery::start_all(backends, None, stop.clone())?;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster: cluster.to_string(),
        node_id: identity.node_id(),
        types: Vec::new(),
        capacity: 0,
    };
    let settings = Settings {
        key: keys.first().cloned(),
        identity: Some(identity),
        ..Settings::default()
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut next_id = 0;
    loop {
        let ev = tokio::select! {
            ev = found.recv() => ev,
            _ = tokio::time::sleep_until(deadline) => None,
        };
        let Some(Event::Discovered(p)) = ev else {
            if ev.is_none() {
                break;
            }
            continue;
        };
        // One row per node: a node found by two backends or at two addresses is probed once.
        if !seen.insert(
            p.node_id
                .map_or_else(|| p.addr.to_string(), |id| id.to_string()),
        ) {
            continue;
        }
        let seen_ms = started.elapsed().as_millis() as u64;
        next_id += 1;
        let (tx, mut rx) = mpsc::channel(16);
        match net::connect(p.addr, hello.clone(), &settings, next_id, tx).await {
            Ok(link) => {
                let h = link.peer();
                out.push(PeerInfo {
                    node: h.node_id.to_string(),
                    addr: p.addr.to_string(),
                    types: h.types.clone(),
                    capacity: h.capacity,
                    source: p.source.to_string(),
                    seen_ms,
                });
                let _ = link.send(Command::Goodbye);
                // Wait (briefly) for the goodbye to complete so the peer logs a clean close.
                let _ = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
            }
            Err(e) => {
                use std::io::Write as _;
                let e = crate::cli::core_error(&e);
                let _ = writeln!(std::io::stderr().lock(), "cannot reach {}: {e}", p.addr);
            }
        }
    }
    stop.cancel();
    Ok(out)
}
