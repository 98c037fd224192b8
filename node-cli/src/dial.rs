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
//!
//! Two bounds keep a run with many peers (a thousand nodes, or a peer list with addresses
//! that never answer) within its means. Connection attempts (TCP connect and handshake)
//! take turns: at most [`Dialer::max_dialing`] are started and younger than
//! [`SLOW_ATTEMPT`] at once, the others wait their turn in the order they came (a peer that
//! failed waits behind the others for its retry); an attempt slower than that gives its
//! turn up and goes on to its own timeout, so addresses that never answer hold up nobody
//! for longer than that. And at most [`Dialer::max_peers`] peers are dialled or connected
//! at once, each holding a descriptor: a peer found beyond that is reported unreachable with
//! the reason at once, never left waiting ([`Admission`]).

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
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Delays between attempts to reach a peer that is down: 100 ms doubling up to 1 s, plus
/// up to 20% jitter (the type task retries use too).
pub const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 0.2);

/// At how many failed attempts in a row (the last one a close during the secure
/// handshake) a dialler gives a peer that closes during the secure handshake up (a node without this key does it every time; a node whose
/// handshake gate is flooded does it to the oldest handshakes, ours among them).
const SECURE_CLOSES: u32 = 3;

/// Default for [`Dialer::max_dialing`]: connection attempts in progress at once (as many
/// as a serving node lets handshake at once by default, [`p2p_core::gate::DEFAULT_MAX_HANDSHAKES`]).
pub const MAX_DIALING: usize = p2p_core::gate::DEFAULT_MAX_HANDSHAKES;

/// How long a connection attempt holds its turn (see [`Dialer::max_dialing`]); a slower
/// one goes on without it.
pub const SLOW_ATTEMPT: Duration = Duration::from_millis(250);

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

/// `tcp`, but the addresses in `doors` are in-process nodes, dialled over the in-memory
/// transport ([`crate::node::InProcess::connect`]) as `hello` with `settings`.
pub fn with_in_process(
    tcp: Connector,
    doors: HashMap<SocketAddr, crate::node::InProcess>,
    hello: Hello,
    settings: Settings,
) -> Connector {
    if doors.is_empty() {
        return tcp;
    }
    Arc::new(move |addr, id, events| match doors.get(&addr) {
        Some(door) => {
            let (door, hello, settings) = (door.clone(), hello.clone(), settings.clone());
            Box::pin(async move { door.connect(addr, hello, &settings, id, events).await })
        }
        None => tcp(addr, id, events),
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
    /// Most connection attempts (TCP connect and handshake) started and younger than
    /// [`SLOW_ATTEMPT`] at once; the others wait their turn, first come first served.
    /// Default [`MAX_DIALING`].
    pub max_dialing: usize,
    /// Most peers dialled or connected at once: what the open-file limit holds
    /// ([`crate::fdlimit::Limit::connections`]). A peer found beyond is reported
    /// unreachable, not dialled.
    pub max_peers: usize,
}

/// Whether a peer found may be dialled: it takes one of `max` places, held as long as it is
/// dialled or connected (an IO-free rule; the dialer holds the places as permits).
#[derive(Debug)]
pub struct Admission {
    places: Arc<Semaphore>,
    max: usize,
}

impl Admission {
    /// At most `max` peers at once (at least 1).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Admission {
            places: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A place for one more peer, held until the returned permit is dropped; else why not.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, String> {
        self.places.clone().try_acquire_owned().map_err(|_| {
            format!(
                "not dialled: this run already dials or holds {} peers, the most its \
                 open-file limit allows (ulimit -n)",
                self.max
            )
        })
    }

    /// Places taken now.
    pub fn taken(&self) -> usize {
        self.max - self.places.available_permits()
    }
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
        let admission = Admission::new(self.max_peers);
        let dialing = Arc::new(Semaphore::new(
            self.max_dialing.clamp(1, Semaphore::MAX_PERMITS),
        ));
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
                        let place = match admission.admit() {
                            Ok(place) => place,
                            Err(error) => {
                                // Forgotten: a live backend that reports it again (after
                                // a place freed) has it dialled then.
                                forget(&mut known, &mut ids, p.addr);
                                if let Some(id) = p.node_id {
                                    ids.remove(&id);
                                }
                                let update = PeerUpdate::Unreachable { addr: p.addr.to_string(), error };
                                if self.peers.send(update).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                        };
                        pending_first += 1;
                        dials.spawn(self.dial(p, next_id.clone(), first_tx.clone(), place, dialing.clone()));
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
        place: OwnedSemaphorePermit,
        dialing: Arc<Semaphore>,
    ) -> impl Future<Output = DialEnd> + Send + 'static {
        let connect = self.connect.clone();
        let give_up_after = self.give_up_after;
        let peers = self.peers.clone();
        let links = self.links.clone();
        let stop = self.stop.clone();
        let describe = self.describe;
        async move {
            // This peer's place, given back when its dialling ends.
            let _place = place;
            let addr = peer.addr;
            let mut first = Some(first_done);
            let mut give_up = tokio::time::Instant::now() + give_up_after;
            let mut failures = 0u32;
            let mut reported = false;
            loop {
                let id = next_id.fetch_add(1, Ordering::Relaxed) + 1;
                let attempt = tokio::select! {
                    _ = stop.cancelled() => return DialEnd::Done,
                    r = in_turn(&dialing, connect(addr, id, links.clone())) => r,
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
                // A refusal (other cluster, version, key) will not change: give up now. But
                // a peer that closes during the secure handshake may also be a node whose
                // handshake gate, under a flood of unfinished handshakes, closed the oldest
                // (ours): that is given up only at the `SECURE_CLOSES`th failure in a row
                // (failures since the last connection).
                failures += 1;
                let closed_in_secure = matches!(
                    error.handshake(),
                    Some(p2p_core::HandshakeError::PeerClosed {
                        stage: p2p_core::Stage::Secure { .. }
                    })
                );
                let permanent_if_repeated = error.is_permanent() && closed_in_secure;
                let permanent =
                    error.is_permanent() && !(closed_in_secure && failures < SECURE_CLOSES);
                let delay = RETRY.delay(failures, id);
                let last = permanent || tokio::time::Instant::now() + delay > give_up;
                // Said at the first failure, so that a run other peers serve (which may end
                // before the retries do) still reports it; once only.
                if !reported {
                    reported = true;
                    let error = describe(&error);
                    let error = if last {
                        error
                    } else if permanent_if_repeated {
                        format!(
                            "{error} (trying {} more times: a flooded node also does this)",
                            SECURE_CLOSES - failures
                        )
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

/// Runs `attempt` in its turn among the attempts in progress (`turns`, never closed): the
/// turn is held until the attempt ends or for [`SLOW_ATTEMPT`], whichever comes first.
async fn in_turn(turns: &Semaphore, mut attempt: Connecting) -> Result<Link, p2p_core::Error> {
    let turn = turns.acquire().await.ok();
    tokio::select! {
        r = &mut attempt => return r,
        _ = tokio::time::sleep(SLOW_ATTEMPT) => {}
    }
    drop(turn);
    attempt.await
}

fn forget(known: &mut HashMap<SocketAddr, Known>, ids: &mut HashSet<NodeId>, addr: SocketAddr) {
    if let Some(k) = known.remove(&addr) {
        if let Some(id) = k.node_id {
            ids.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn admission_refuses_beyond_its_places_and_a_dropped_place_frees_one() {
        let a = Admission::new(2);
        let first = a.admit().unwrap();
        let _second = a.admit().unwrap();
        let err = a.admit().unwrap_err();
        assert!(err.contains("already dials or holds 2 peers"), "{err}");
        assert!(err.contains("ulimit -n"), "{err}");
        assert_eq!(a.taken(), 2);
        drop(first);
        assert_eq!(a.taken(), 1);
        assert!(a.admit().is_ok());
        // Never zero places.
        assert!(Admission::new(0).admit().is_ok());
    }

    fn peer(port: u16) -> Peer {
        Peer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            node_id: None,
            types: None,
            capacity: None,
            source: "static",
        }
    }

    /// Six peers, two attempts at once, four places: the two beyond the places are
    /// refused at once with the reason, the four others are dialled at most two at a time
    /// (each attempt takes 100 ms and fails), and the dialer settles.
    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded_and_peers_beyond_the_places_are_refused_at_once() {
        let (found_tx, found) = mpsc::channel(16);
        for port in 1..=6 {
            found_tx.send(Event::Discovered(peer(port))).await.unwrap();
        }
        drop(found_tx);
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let connect: Connector = {
            let (now, most, calls) = (now.clone(), most.clone(), calls.clone());
            Arc::new(move |addr, _, _| {
                let (now, most, calls) = (now.clone(), most.clone(), calls.clone());
                Box::pin(async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Err(p2p_core::Error::ConnectTimeout {
                        addr: addr.to_string(),
                        after: Duration::from_millis(100),
                    })
                })
            })
        };
        let (peers_tx, mut peers) = mpsc::channel(64);
        let (links, _links_rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let dialer = tokio::spawn(
            Dialer {
                found,
                connect,
                give_up_after: Duration::ZERO,
                needed: vec!["a".into()],
                peers: peers_tx,
                links,
                stop: stop.clone(),
                describe: |e| e.to_string(),
                max_dialing: 2,
                max_peers: 4,
            }
            .run(),
        );
        let mut refused = Vec::new();
        let mut failed = Vec::new();
        let started = tokio::time::Instant::now();
        let settled_after = loop {
            match tokio::time::timeout(Duration::from_secs(60), peers.recv()).await {
                Ok(Some(PeerUpdate::Unreachable { addr, error })) => {
                    if error.starts_with("not dialled") {
                        // Refused before any attempt of the others ended.
                        assert!(started.elapsed() < Duration::from_millis(100));
                        refused.push(addr);
                    } else {
                        failed.push(addr);
                    }
                }
                Ok(Some(PeerUpdate::Settled)) => break started.elapsed(),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => panic!("the dialer never settled"),
            }
        };
        stop.cancel();
        dialer.await.unwrap();
        assert_eq!(refused, ["127.0.0.1:5", "127.0.0.1:6"]);
        failed.sort();
        assert_eq!(
            failed,
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(most.load(Ordering::SeqCst), 2, "attempts at once");
        // Two rounds of two attempts of 100 ms each.
        assert!(
            settled_after >= Duration::from_millis(200),
            "{settled_after:?}"
        );
    }

    /// One turn, a first peer that never answers (its handshake hangs) and a second one that
    /// fails at once: the second is tried once the first gave its turn up, after
    /// [`SLOW_ATTEMPT`], not after the first's own timeout.
    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_never_answers_gives_its_turn_up() {
        let (found_tx, found) = mpsc::channel(16);
        for port in [1, 2] {
            found_tx.send(Event::Discovered(peer(port))).await.unwrap();
        }
        drop(found_tx);
        let connect: Connector = Arc::new(|addr: SocketAddr, _, _| {
            Box::pin(async move {
                if addr.port() == 1 {
                    std::future::pending::<()>().await;
                }
                Err(p2p_core::Error::ConnectTimeout {
                    addr: addr.to_string(),
                    after: Duration::ZERO,
                })
            })
        });
        let (peers_tx, mut peers) = mpsc::channel(64);
        let (links, _links_rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let dialer = tokio::spawn(
            Dialer {
                found,
                connect,
                give_up_after: Duration::ZERO,
                needed: vec!["a".into()],
                peers: peers_tx,
                links,
                stop: stop.clone(),
                describe: |e| e.to_string(),
                max_dialing: 1,
                max_peers: 16,
            }
            .run(),
        );
        let started = tokio::time::Instant::now();
        let reached = loop {
            match tokio::time::timeout(Duration::from_secs(60), peers.recv()).await {
                Ok(Some(PeerUpdate::Unreachable { addr, .. })) => break (addr, started.elapsed()),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => panic!("the second peer was never tried"),
            }
        };
        stop.cancel();
        dialer.await.unwrap();
        assert_eq!(reached.0, "127.0.0.1:2");
        assert!(reached.1 >= SLOW_ATTEMPT, "{:?}", reached.1);
        assert!(reached.1 < 2 * SLOW_ATTEMPT, "{:?}", reached.1);
    }
}
