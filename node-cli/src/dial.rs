//! The dialer of a run: turns discovered peers into established links.
//!
//! One connection per node. A peer is known by its node id when discovery tells it (udp,
//! mdns) and by its address otherwise (static, dns); the first backend to report a node wins
//! and later reports of the same node (another backend, another address) are ignored while
//! it is known. A peer whose discovery record serves none of the run's types is reported and
//! not dialled. Each link tells the dialer itself when it closed ([`net::Link::on_closed`]):
//! a live backend's peer whose connection ended is forgotten, so it is dialled again when it
//! is reported again; a static or dns address whose connection broke is dialled again with
//! back-off. The dialer is generic over how it connects ([`Connector`]), so a simulated
//! network uses this same dialer.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use p2p_core::net::{self, EventSender, Link, LinkId, Settings};
use p2p_core::{Hello, NodeId};
use p2p_discovery::{Event, Peer};
use p2p_tasks::{Backoff, PeerUpdate};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Delays between attempts to reach a peer that is down: 100 ms doubling up to 1 s, plus
/// up to 20% jitter (the type task retries use too).
pub const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.2);

/// A connection attempt in progress.
pub type Connecting = Pin<Box<dyn Future<Output = Result<Link, p2p_core::Error>> + Send>>;

/// How the dialer opens a connection to `addr` as link `id`, whose events go to `events`
/// (the real one is [`tcp`]: `net::connect`).
pub type Connector = Arc<dyn Fn(SocketAddr, LinkId, EventSender) -> Connecting + Send + Sync>;

/// The real connector: TCP and the handshake of [`net::connect`], as `hello`.
pub fn tcp(hello: Hello, settings: Settings) -> Connector {
    Arc::new(move |addr, id, events| {
        let (hello, settings) = (hello.clone(), settings.clone());
        Box::pin(async move { net::connect(addr, hello, &settings, id, events).await })
    })
}

/// How connection errors are worded in [`PeerUpdate::Unreachable`] (and a node's logs):
/// the default is the error's own message; the `p2p-node` CLI adds hints naming its flags.
pub type Describe = fn(&p2p_core::Error) -> String;

/// The dialer's inputs.
pub struct Dialer {
    /// What discovery reports.
    pub found: mpsc::Receiver<Event>,
    /// How to connect.
    pub connect: Connector,
    /// How long one peer is retried before it is reported unreachable.
    pub give_up_after: Duration,
    /// The types the run needs: a peer whose discovery record says it serves none of them
    /// is reported as discovered and not dialled.
    pub needed: Vec<String>,
    /// Where discoveries, failures and `Settled` go.
    pub peers: mpsc::Sender<PeerUpdate>,
    /// Where every link's events go (each starts with `Opened`).
    pub links: EventSender,
    /// Stops the dialer and every dial in progress.
    pub stop: CancellationToken,
    /// How a peer's connection error is worded in [`PeerUpdate::Unreachable`].
    pub describe: Describe,
}

/// What the dialer remembers of a peer it dialled.
struct Known {
    node_id: Option<NodeId>,
}

/// How one peer's dialling ended.
enum DialEnd {
    /// Stopped, or the peer is done with (a clean close, or unreachable).
    Done,
    /// A live backend's peer whose connection ended: forget it, so that it is dialled
    /// again when discovery reports it again.
    Forget(SocketAddr),
}

impl Dialer {
    /// Runs until `stop` fires (or the coordinator is gone). Sends [`PeerUpdate::Settled`]
    /// once discovery has nothing new and no first dial is pending.
    pub async fn run(mut self) {
        let mut known: HashMap<SocketAddr, Known> = HashMap::new();
        let mut ids: HashSet<NodeId> = HashSet::new();
        let mut dials: JoinSet<DialEnd> = JoinSet::new();
        // Dials that have neither connected nor given up yet: `Settled` waits for them.
        let (first_tx, mut first_rx) = mpsc::unbounded_channel::<()>();
        let mut pending_first = 0usize;
        let next_id = Arc::new(AtomicU64::new(0));
        let mut discovery_open = true;
        let mut settled = false;
        loop {
            // Backends that end (static lists) are done once their peers were dialled; live
            // ones (udp, dns) never settle: a run waits up to its discovery timeout for them.
            if !settled && !discovery_open && pending_first == 0 {
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
                        known.insert(p.addr, Known { node_id: p.node_id });
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
                        pending_first += 1;
                        dials.spawn(self.dial(p, next_id.clone(), first_tx.clone()));
                    }
                    Some(Event::Lost { addr, node_id, .. }) => {
                        // Forget it: if it comes back it is dialled again. Its connection, if
                        // any, fails on its own (EOF or heartbeats).
                        forget(&mut known, &mut ids, addr);
                        if let Some(id) = node_id {
                            ids.remove(&id);
                        }
                    }
                    // A kind of sighting this dialer does not know (the enum grows).
                    Some(_) => {}
                },
                Some(()) = first_rx.recv() => pending_first = pending_first.saturating_sub(1),
                Some(end) = dials.join_next(), if !dials.is_empty() => {
                    if let Ok(DialEnd::Forget(addr)) = end {
                        forget(&mut known, &mut ids, addr);
                    }
                }
            }
        }
    }

    fn dial(
        &self,
        peer: Peer,
        next_id: Arc<AtomicU64>,
        first_done: mpsc::UnboundedSender<()>,
    ) -> impl Future<Output = DialEnd> + Send + 'static {
        let connect = self.connect.clone();
        let give_up_after = self.give_up_after;
        let peers = self.peers.clone();
        let links = self.links.clone();
        let stop = self.stop.clone();
        let describe = self.describe;
        async move {
            let addr = peer.addr;
            let mut first = Some(first_done);
            let mut give_up = tokio::time::Instant::now() + give_up_after;
            let mut failures = 0u32;
            let mut reported = false;
            loop {
                let id = next_id.fetch_add(1, Ordering::Relaxed) + 1;
                let attempt = tokio::select! {
                    _ = stop.cancelled() => return DialEnd::Done,
                    r = connect(addr, id, links.clone()) => r,
                };
                let error = match attempt {
                    Ok(link) => {
                        // The link registered itself with the run (its `Opened` event); the
                        // dialer only watches how it ends, without keeping it open.
                        let closed = link.on_closed();
                        drop(link);
                        if let Some(tx) = first.take() {
                            let _ = tx.send(());
                        }
                        let end = tokio::select! {
                            _ = stop.cancelled() => return DialEnd::Done,
                            end = closed.wait() => end,
                        };
                        match end {
                            // A live backend reports the node again if it comes back.
                            _ if peer.node_id.is_some() => return DialEnd::Forget(addr),
                            // It said goodbye: it left on purpose.
                            None => return DialEnd::Done,
                            Some(e) => {
                                tracing::info!(peer = %addr, error = %e, "connection lost; dialling again");
                                failures = 0;
                                reported = false;
                                give_up = tokio::time::Instant::now() + give_up_after;
                                tokio::select! {
                                    _ = stop.cancelled() => return DialEnd::Done,
                                    _ = tokio::time::sleep(RETRY.first) => {}
                                }
                                continue;
                            }
                        }
                    }
                    Err(e) => e,
                };
                // A refusal (other cluster, version, key) will not change: give up now.
                let permanent = error.is_permanent();
                failures += 1;
                let delay = RETRY.delay(failures, id);
                let last = permanent || tokio::time::Instant::now() + delay > give_up;
                // Said at the first failure, so that a run other peers serve (which may end
                // before the retries do) still reports it; once only.
                if !reported {
                    reported = true;
                    let error = describe(&error);
                    let error = if last {
                        error
                    } else {
                        format!("{error} (retrying for up to {give_up_after:?})")
                    };
                    let update = PeerUpdate::Unreachable {
                        addr: addr.to_string(),
                        error,
                    };
                    if peers.send(update).await.is_err() {
                        return DialEnd::Done;
                    }
                }
                if last {
                    // Given up: it no longer holds back `Settled`.
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                    return if peer.node_id.is_some() {
                        DialEnd::Forget(addr)
                    } else {
                        DialEnd::Done
                    };
                }
                tracing::debug!(peer = %addr, error = %error, retry_in = ?delay, "peer unreachable; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return DialEnd::Done,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn forget(known: &mut HashMap<SocketAddr, Known>, ids: &mut HashSet<NodeId>, addr: SocketAddr) {
    if let Some(k) = known.remove(&addr) {
        if let Some(id) = k.node_id {
            ids.remove(&id);
        }
    }
}
