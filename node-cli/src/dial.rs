//! The dialer of a run: turns discovered peers into established links.
//!
//! One connection per node. A peer is known by its node id when discovery tells it (udp,
//! mdns) and by its address otherwise (static, dns); the first backend to report a node wins
//! and later reports of the same node (another backend, another address) are ignored while
//! it is known. A peer reported lost, or whose connection broke, may be dialled again when it
//! is reported again; a static or dns address whose connection broke is retried with back-off.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use p2p_core::net::{self, EventSender, Settings};
use p2p_core::{Hello, NodeId};
use p2p_discovery::{Event, Peer};
use p2p_tasks::{Backoff, PeerUpdate};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Delays between attempts to reach a peer that is down: 100 ms doubling up to 1 s, plus
/// up to 20% jitter (the type task retries use too).
const RETRY: Backoff = Backoff {
    first: Duration::from_millis(100),
    max: Duration::from_secs(1),
    jitter: 0.2,
};

/// The dialer's inputs.
pub(crate) struct Dialer {
    pub found: mpsc::Receiver<Event>,
    pub lost: mpsc::Receiver<SocketAddr>,
    pub hello: Hello,
    pub settings: Settings,
    /// How long one peer is retried before it is reported unreachable.
    pub give_up_after: Duration,
    /// The types the run needs: a peer whose discovery record says it serves none of them
    /// is reported as discovered and not dialled.
    pub needed: Vec<String>,
    pub peers: mpsc::Sender<PeerUpdate>,
    pub links: EventSender,
    pub stop: CancellationToken,
}

/// What the dialer remembers of a peer it dialled.
struct Known {
    node_id: Option<NodeId>,
    source: &'static str,
}

impl Dialer {
    /// Runs until `stop` fires (or the coordinator is gone). Sends [`PeerUpdate::Settled`]
    /// once discovery has nothing new and no dial is pending.
    pub(crate) async fn run(mut self) {
        let mut known: HashMap<SocketAddr, Known> = HashMap::new();
        let mut ids: HashSet<NodeId> = HashSet::new();
        let mut dials: JoinSet<()> = JoinSet::new();
        let mut next_id = 0u64;
        let mut discovery_open = true;
        let mut settled = false;
        let mut lost_open = true;
        loop {
            // Backends that end (static lists) are done once their peers were dialled; live
            // ones (udp, dns) never settle: a run waits up to its discovery timeout for them.
            if !settled && !discovery_open && dials.is_empty() {
                settled = true;
                if self.peers.send(PeerUpdate::Settled).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                ev = self.found.recv(), if discovery_open => match ev {
                    None => discovery_open = false,
                    Some(Event::Discovered(p)) => {
                        if known.contains_key(&p.addr) || p.node_id.is_some_and(|id| ids.contains(&id)) {
                            continue;
                        }
                        if let Some(id) = p.node_id {
                            ids.insert(id);
                        }
                        known.insert(p.addr, Known { node_id: p.node_id, source: p.source });
                        let update = PeerUpdate::Discovered { addr: p.addr.to_string(), source: p.source.to_string() };
                        if self.peers.send(update).await.is_err() {
                            return;
                        }
                        if let Some(types) = &p.types {
                            if !types.iter().any(|t| self.needed.contains(t)) {
                                tracing::debug!(peer = %p.addr, ?types, "serves no type the run needs; not dialled");
                                continue;
                            }
                        }
                        next_id += 1;
                        dials.spawn(self.dial(p, next_id, Duration::ZERO));
                    }
                    Some(Event::Lost { addr, node_id, .. }) => {
                        // Forget it: if it comes back it is dialled again. Its connection, if
                        // any, fails on its own (EOF or heartbeats).
                        if let Some(k) = known.remove(&addr) {
                            if let Some(id) = k.node_id {
                                ids.remove(&id);
                            }
                        }
                        if let Some(id) = node_id {
                            ids.remove(&id);
                        }
                    }
                },
                addr = self.lost.recv(), if lost_open => {
                    let Some(addr) = addr else {
                        lost_open = false;
                        continue;
                    };
                    // Live backends report the node again if it comes back; addresses from a
                    // list are retried here.
                    match known.get(&addr) {
                        Some(k) if k.node_id.is_none() => {
                            next_id += 1;
                            let peer = Peer { addr, node_id: None, types: None, capacity: None, source: k.source };
                            dials.spawn(self.dial(peer, next_id, RETRY.first));
                        }
                        Some(k) => {
                            if let Some(id) = k.node_id {
                                ids.remove(&id);
                            }
                            known.remove(&addr);
                        }
                        None => {}
                    }
                }
                Some(_) = dials.join_next(), if !dials.is_empty() => {}
            }
        }
    }

    fn dial(
        &self,
        peer: Peer,
        id: u64,
        first_delay: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let hello = self.hello.clone();
        let settings = self.settings.clone();
        let give_up_after = self.give_up_after;
        let peers = self.peers.clone();
        let links = self.links.clone();
        let stop = self.stop.clone();
        async move {
            if !first_delay.is_zero() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(first_delay) => {}
                }
            }
            let addr = peer.addr;
            let give_up = tokio::time::Instant::now() + give_up_after;
            let mut failures = 0u32;
            let mut reported = false;
            loop {
                let attempt = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = net::connect(addr, hello.clone(), &settings, id, links.clone()) => r,
                };
                let error = match attempt {
                    Ok(link) => {
                        if let Err(mpsc::error::SendError(PeerUpdate::Connected(link))) =
                            peers.send(PeerUpdate::Connected(link)).await
                        {
                            let _ = link.send(net::Command::Abort);
                        }
                        return;
                    }
                    Err(e) => e,
                };
                // A refusal (other cluster, version, key) will not change: give up now.
                let permanent = matches!(
                    error,
                    p2p_core::Error::Rejected { .. }
                        | p2p_core::Error::Refused { .. }
                        | p2p_core::Error::Auth(_)
                );
                failures += 1;
                let delay = RETRY.delay(failures, id);
                let last = permanent || tokio::time::Instant::now() + delay > give_up;
                // Said at the first failure, so that a run other peers serve (which may end
                // before the retries do) still reports it; once only.
                if !reported {
                    reported = true;
                    let error = if last {
                        error.to_string()
                    } else {
                        format!("{error} (retrying for up to {give_up_after:?})")
                    };
                    let update = PeerUpdate::Unreachable {
                        addr: addr.to_string(),
                        error,
                    };
                    if peers.send(update).await.is_err() {
                        return;
                    }
                }
                if last {
                    return;
                }
                tracing::debug!(peer = %addr, error = %error, retry_in = ?delay, "peer unreachable; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
