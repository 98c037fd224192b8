//! The `udp` backend: small beacons on a multicast group (or broadcast) on chosen interfaces.
//!
//! # Usage
//!
//! ```no_run
//! use p2p_discovery::{start_all, udp, Discovery};
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), p2p_discovery::Error> {
//! // A node listening on 127.0.0.1:7400 looks for peers on the loopback interface only.
//! let config = udp::Config::for_listen("default", "127.0.0.1:7400".parse().unwrap());
//! let backend: Box<dyn Discovery> = Box::new(udp::Udp::new(config));
//! let mut events = start_all(vec![backend], None, CancellationToken::new())?;
//! while let Some(event) = events.recv().await {
//!     println!("{event:?}");
//! }
//! # Ok(()) }
//! ```
//!
//! # Behaviour
//!
//! - Beacons ([`crate::beacon`], at most 1200 bytes) go to the multicast group
//!   [`DEFAULT_GROUP`] `239.255.70.80` (administratively scoped, RFC 2365: never routed off
//!   the site) on UDP port [`DEFAULT_PORT`] `7450`, with TTL 1 (the local link only). In
//!   [`Mode::Broadcast`], for networks without multicast, they go to each interface's subnet
//!   broadcast address on the same port instead.
//! - On start the backend sends a **query** and its **announce**; every announcing node of
//!   the cluster answers a query at once (after a 0–50 ms pause derived from its node id,
//!   which spreads the answers of many nodes and merges queries that arrive together), so a
//!   run need not wait an interval. It then announces every interval (default 1 s).
//! - A peer is reported [`Event::Discovered`] when first heard (with node id, types and
//!   capacity), and again when its types or capacity change. It is reported [`Event::Lost`]
//!   when it sends **leaving** (every backend does on shutdown) or when 3 of its own intervals
//!   (the beacon carries it) pass without a beacon.
//! - Peers are told apart by node id: a node heard on several interfaces is reported once, at
//!   the first address heard.
//! - Ignored and counted ([`Stats`]): the node's own beacons (multicast loop), other clusters'
//!   beacons, other beacon versions, malformed datagrams, and an announced loopback address
//!   that arrived from another host.
//! - A backend with nothing to announce stops when its event receiver is dropped; one that
//!   announces keeps announcing and answering until shutdown.
//!
//! # Interfaces
//!
//! [`Interfaces`] says where beacons go; [`Config::for_listen`] applies the design's rule:
//!
//! | the node listens on | beacons go on |
//! |---|---|
//! | a loopback address (`127.0.0.1:7400`, the default) | the loopback interface only: nothing leaves the machine |
//! | one address (`10.0.0.5:7400`) | the interface holding that address |
//! | `0.0.0.0` or `[::]` | every IPv4 interface that is up and multicast-capable (broadcast-capable in broadcast mode), loopback included; the announced address is each interface's own |
//!
//! A node that does not listen (a pure `run`) should use [`Interfaces::All`], or the interface
//! the user names (`--discovery-interface`, parsed by [`Interfaces`]'s `FromStr`).
//!
//! Each interface gets its own socket, bound to the group and port with `SO_REUSEADDR` (so
//! every node of a host shares the port; `SO_REUSEPORT` too on BSDs and macOS, which need it,
//! but never on Linux, where it makes the sockets one load-balancing group and hands each
//! datagram to one of them, whatever interface it joined on), joined to the group on that
//! interface only, with `IP_MULTICAST_IF` set to it, `IP_MULTICAST_LOOP` on (nodes on one
//! host hear each other) and, on Linux, `IP_MULTICAST_ALL` off (no datagrams of groups that
//! other sockets joined on other interfaces). So any mix of loopback and LAN nodes on one
//! host hears what it should: each socket gets a copy of every beacon that arrives on its
//! interface.
//!
//! **Loopback on Linux.** Multicast on `lo` works although `lo` lacks the `MULTICAST` flag:
//! with `IP_MULTICAST_IF` set to `127.0.0.1`, no multicast route and no
//! `ip link set lo multicast on` are needed (checked on Linux 6.x, in a fresh network
//! namespace too). On the loopback interface the backend always uses multicast, in
//! broadcast mode too. Any interface that refuses the membership gives a clear
//! [`Error::Socket`] at [`Discovery::start`], naming the interface.
//!
//! Only IPv4 carries beacons; a beacon may announce an IPv6 TCP address.

mod iface;
mod table;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use p2p_core::{ClusterKey, NodeId};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::beacon::{self, Beacon, MAX_BEACON};
/// Where beacons go (defined at the crate root: `mdns` uses it too).
pub use crate::Interfaces;
use crate::{bump, offer, Offered};
use crate::{Announcement, Context, Discovery, Error, Event};
use table::{Outcome, Table};

/// The default multicast group: administratively scoped (239.255.0.0/16, RFC 2365).
pub const DEFAULT_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 70, 80);

/// The default UDP port of beacons (the TCP default is 7400).
pub const DEFAULT_PORT: u16 = 7450;

/// The default time between two announces.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// A peer silent for this many of its intervals is lost.
pub const DEFAULT_MISSED: u32 = 3;

/// The default multicast TTL: 1, the local link only.
pub const DEFAULT_TTL: u32 = 1;

/// The shortest interval accepted.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// The longest pause before answering a query.
const MAX_ANSWER_DELAY_MS: u64 = 50;

/// How beacons travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// To the multicast group (the default).
    #[default]
    Multicast,
    /// To each interface's subnet broadcast address, for networks that drop multicast.
    /// The loopback interface still uses multicast.
    Broadcast,
}

/// Settings of the `udp` backend. Every setter states its default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    cluster: String,
    group: Ipv4Addr,
    port: u16,
    interval: Duration,
    missed: u32,
    interfaces: Interfaces,
    mode: Mode,
    ttl: u32,
    keys: Vec<ClusterKey>,
}

impl Default for Config {
    /// Cluster `default`, on the loopback interface, every other setting at its default.
    fn default() -> Self {
        Config {
            cluster: "default".into(),
            group: DEFAULT_GROUP,
            port: DEFAULT_PORT,
            interval: DEFAULT_INTERVAL,
            missed: DEFAULT_MISSED,
            interfaces: Interfaces::default(),
            mode: Mode::default(),
            ttl: DEFAULT_TTL,
            keys: Vec::new(),
        }
    }
}

impl Config {
    /// Settings for `cluster`, on the loopback interface.
    pub fn new(cluster: impl Into<String>) -> Config {
        Config::default().cluster(cluster)
    }

    /// The cluster key: beacons are sealed with a MAC under it, and beacons that do not
    /// verify are ignored (see [`beacon::seal`]). Default none. Replaces the keys of
    /// [`Config::keys`].
    pub fn key(mut self, key: Option<ClusterKey>) -> Self {
        self.keys = key.into_iter().collect();
        self
    }

    /// Several cluster keys, during a key rotation: beacons are sealed with the first, and
    /// beacons that verify under any of them are accepted. An empty list means no key.
    /// Default none.
    pub fn keys(mut self, keys: Vec<ClusterKey>) -> Self {
        self.keys = keys;
        self
    }

    /// Settings for a node of `cluster` listening on `listen`:
    /// [`Interfaces::for_listen`]`(listen)`.
    pub fn for_listen(cluster: impl Into<String>, listen: SocketAddr) -> Config {
        Config::new(cluster).interfaces(Interfaces::for_listen(listen))
    }

    /// The cluster whose beacons count; others are ignored. Default `default`. An
    /// announcement given at start must be of this cluster.
    pub fn cluster(mut self, name: impl Into<String>) -> Self {
        self.cluster = name.into();
        self
    }

    /// The multicast group. Default [`DEFAULT_GROUP`] (`239.255.70.80`).
    pub fn group(mut self, group: Ipv4Addr) -> Self {
        self.group = group;
        self
    }

    /// The UDP port. Default [`DEFAULT_PORT`] (`7450`).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Time between two announces. Default [`DEFAULT_INTERVAL`] (1 s); at least
    /// [`MIN_INTERVAL`].
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// A peer silent for this many of its intervals is lost. Default [`DEFAULT_MISSED`] (3).
    pub fn missed_beacons(mut self, n: u32) -> Self {
        self.missed = n;
        self
    }

    /// Where beacons go. Default: the loopback interface.
    pub fn interfaces(mut self, interfaces: Interfaces) -> Self {
        self.interfaces = interfaces;
        self
    }

    /// Multicast or broadcast. Default [`Mode::Multicast`].
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Multicast TTL. Default [`DEFAULT_TTL`] (1: the local link only).
    pub fn ttl(mut self, ttl: u32) -> Self {
        self.ttl = ttl;
        self
    }

    fn validate(&self, announce: Option<&Announcement>) -> Result<(), Error> {
        if !self.group.is_multicast() {
            return Err(Error::Config(format!(
                "{} is not a multicast group address (use 239.255.0.0/16)",
                self.group
            )));
        }
        if self.port == 0 {
            return Err(Error::Config("the beacon port must not be 0".into()));
        }
        if self.interval < MIN_INTERVAL {
            return Err(Error::Config(format!(
                "beacon interval {:?} is shorter than {MIN_INTERVAL:?}",
                self.interval
            )));
        }
        if self.missed == 0 {
            return Err(Error::Config("missed beacons must be at least 1".into()));
        }
        if let Some(a) = announce {
            if a.cluster != self.cluster {
                return Err(Error::Config(format!(
                    "the announcement is for cluster {:?} but the backend listens for {:?}",
                    a.cluster, self.cluster
                )));
            }
        }
        Ok(())
    }
}

backend_counters! {
    "udp", "Udp::stats";
    /// Datagrams received.
    received,
    /// Beacons sent (per interface).
    sent,
    /// Beacons that could not be sent.
    send_errors,
    /// Datagrams that are not beacons (bad magic, truncated, bad field, too large).
    malformed,
    /// Datagrams dropped by a keyed node because their MAC did not verify.
    unauthenticated,
    /// Beacons of another format version.
    unsupported,
    /// Beacons of another cluster.
    foreign,
    /// This node's own beacons, heard back.
    own,
    /// Announces of a loopback address that came from another host.
    unreachable,
    /// Queries received (from the cluster).
    queries,
    /// `Discovered` events produced.
    discovered,
    /// `Lost` events produced.
    lost,
    /// Events dropped because the consumer's queue was full (a dropped `Discovered` is
    /// reported again on the peer's next beacon).
    dropped,
    /// Peers pushed out of the full peer table by newer ones (reported lost).
    evicted,
}

/// The `udp` backend.
#[derive(Debug)]
pub struct Udp {
    config: Config,
    stats: Arc<Stats>,
    stopped: CancellationToken,
}

impl Udp {
    /// A backend with these settings.
    pub fn new(config: Config) -> Udp {
        Udp {
            config,
            stats: Arc::new(Stats::default()),
            stopped: CancellationToken::new(),
        }
    }

    /// Its counters, shared with the running backend.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Cancelled when the started backend has ended: after shutdown, once its `leaving`
    /// beacons are sent. A process about to exit may wait for it (briefly, bounded) so peers
    /// learn at once that it left.
    pub fn stopped(&self) -> CancellationToken {
        self.stopped.clone()
    }
}

/// One interface's socket and the beacons sent on it.
struct Link {
    name: String,
    socket: Arc<UdpSocket>,
    dest: SocketAddr,
    query: Vec<u8>,
    announce: Option<Vec<u8>>,
    leaving: Option<Vec<u8>>,
    failing: bool,
}

#[derive(Clone, Copy)]
enum Outgoing {
    Query,
    Announce,
    Leaving,
}

impl Discovery for Udp {
    fn name(&self) -> &'static str {
        "udp"
    }

    fn stopped(&self) -> Option<CancellationToken> {
        Some(Udp::stopped(self))
    }

    fn counters(&self) -> Option<crate::CounterReader> {
        let stats = self.stats();
        Some(Arc::new(move || stats.snapshot().pairs()))
    }

    fn start(self: Box<Self>, ctx: Context) -> Result<(), Error> {
        let Udp {
            config,
            stats,
            stopped,
        } = *self;
        config.validate(ctx.announce.as_ref())?;
        let me = ctx
            .announce
            .as_ref()
            .map_or_else(NodeId::random, |a| a.node_id);
        let interval_ms = u32::try_from(config.interval.as_millis()).unwrap_or(u32::MAX);
        let ifaces = iface::resolve(&config.interfaces, config.mode)?;
        let mut links = Vec::with_capacity(ifaces.len());
        for i in &ifaces {
            let (std_socket, dest) =
                iface::open(i, config.group, config.port, config.mode, config.ttl)?;
            let socket = UdpSocket::from_std(std_socket).map_err(|source| Error::Socket {
                what: format!("register the socket of interface {} with tokio", i.name),
                source,
            })?;
            let base = Beacon {
                kind: beacon::Kind::Query,
                cluster: config.cluster.clone(),
                node_id: me,
                interval_ms,
                addr: None,
                types: Vec::new(),
                capacity: 0,
            };
            let (announce, leaving) = match &ctx.announce {
                // A loopback address is useless to other hosts: not announced off loopback.
                Some(a) if i.loopback || !a.addr.ip().is_loopback() => {
                    let mut addr = a.addr;
                    if addr.ip().is_unspecified() {
                        addr.set_ip(IpAddr::V4(i.addr));
                    }
                    let mine = Beacon {
                        kind: beacon::Kind::Announce,
                        addr: Some(addr),
                        types: a.types.clone(),
                        capacity: a.capacity,
                        ..base.clone()
                    };
                    let leaving = Beacon {
                        kind: beacon::Kind::Leaving,
                        ..mine.clone()
                    };
                    (
                        Some(sealed(mine.encode()?, &config.keys)),
                        Some(sealed(leaving.encode()?, &config.keys)),
                    )
                }
                _ => (None, None),
            };
            debug!(interface = %i.name, addr = %i.addr, dest = %dest, announcing = announce.is_some(), "udp discovery link");
            links.push(Link {
                name: i.name.clone(),
                socket: Arc::new(socket),
                dest: SocketAddr::V4(dest),
                query: sealed(base.encode()?, &config.keys),
                announce,
                leaving,
                failing: false,
            });
        }
        if let Some(a) = &ctx.announce {
            if !links.iter().any(|l| l.announce.is_some()) {
                warn!(
                    addr = %a.addr,
                    interfaces = %config.interfaces,
                    "udp discovery: a loopback address is announced on loopback only; \
                     this node is not announced on the chosen interfaces"
                );
            }
        }
        let jitter_ms =
            u64::from(u16::from_be_bytes([me.0[0], me.0[1]])) % (MAX_ANSWER_DELAY_MS + 1);
        let driver = Driver {
            keys: config.keys.clone(),
            table: Table::new(config.cluster.clone(), me, config.missed),
            interval: config.interval,
            answer_delay: Duration::from_millis(jitter_ms).min(config.interval / 4),
            stats,
            links,
        };
        tokio::spawn(async move {
            driver.run(ctx).await;
            stopped.cancel();
        });
        Ok(())
    }
}

/// Appends the MAC (under the first key) when there is a cluster key.
fn sealed(beacon: Vec<u8>, keys: &[ClusterKey]) -> Vec<u8> {
    match keys.first() {
        Some(k) => beacon::seal(beacon, k),
        None => beacon,
    }
}

struct Driver {
    keys: Vec<ClusterKey>,
    table: Table,
    interval: Duration,
    answer_delay: Duration,
    stats: Arc<Stats>,
    links: Vec<Link>,
}

impl Driver {
    async fn run(mut self, ctx: Context) {
        let Context {
            announce: _,
            events,
            shutdown,
        } = ctx;
        let mut events = Some(events);
        let announces = self.links.iter().any(|l| l.announce.is_some());
        let stop_receivers = shutdown.child_token();
        let (tx, mut rx) = mpsc::channel::<(Vec<u8>, SocketAddr)>(256);
        for l in &self.links {
            tokio::spawn(receive(
                l.socket.clone(),
                tx.clone(),
                stop_receivers.clone(),
                self.stats.clone(),
            ));
        }
        drop(tx);
        self.send(Outgoing::Query).await;
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut answer_at: Option<Instant> = None;
        let far = || Instant::now() + Duration::from_secs(86_400);
        loop {
            if events.is_none() && !announces {
                break;
            }
            let expiry = self.table.next_deadline();
            let watch = events.clone();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                () = receiver_gone(watch.as_ref()) => events = None,
                _ = ticker.tick() => {
                    if announces {
                        self.send(Outgoing::Announce).await;
                    }
                }
                Some((data, from)) = rx.recv() => {
                    let beacon = if self.keys.is_empty() {
                        Some(&data[..])
                    } else {
                        beacon::open_any(&data, &self.keys)
                    };
                    let Some(beacon) = beacon else {
                        bump(&self.stats.unauthenticated);
                        debug!(from = %from, len = data.len(), "udp discovery ignored a beacon without a valid MAC");
                        continue;
                    };
                    let out = self.table.handle(Instant::now(), beacon, from);
                    match out {
                        Outcome::Query => {
                            bump(&self.stats.queries);
                            if announces && answer_at.is_none() {
                                answer_at = Some(Instant::now() + self.answer_delay);
                            }
                        }
                        Outcome::Event(ev) => {
                            for old in self.table.take_evicted() {
                                bump(&self.stats.evicted);
                                self.emit(&mut events, old);
                            }
                            self.emit(&mut events, ev);
                        }
                        Outcome::Seen => {}
                        other => self.ignored(&other, from, data.len()),
                    }
                }
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(far)), if expiry.is_some() => {
                    for ev in self.table.expire(Instant::now()) {
                        self.emit(&mut events, ev);
                    }
                }
                _ = tokio::time::sleep_until(answer_at.unwrap_or_else(far)), if answer_at.is_some() => {
                    answer_at = None;
                    self.send(Outgoing::Announce).await;
                }
            }
        }
        stop_receivers.cancel();
        if announces {
            self.send(Outgoing::Leaving).await;
        }
    }

    fn ignored(&self, out: &Outcome, from: SocketAddr, len: usize) {
        let (counter, why) = match out {
            Outcome::Malformed => (&self.stats.malformed, "malformed datagram"),
            Outcome::Unsupported => (&self.stats.unsupported, "beacon of another version"),
            Outcome::Foreign => (&self.stats.foreign, "beacon of another cluster"),
            Outcome::Own => (&self.stats.own, "own beacon"),
            Outcome::Unreachable => (
                &self.stats.unreachable,
                "loopback address from another host",
            ),
            Outcome::Query | Outcome::Seen | Outcome::Event(_) => return,
        };
        bump(counter);
        if !matches!(out, Outcome::Own) {
            debug!(from = %from, len, "udp discovery ignored a {why}");
        }
    }

    /// Reports `ev` without waiting: this loop also sends the beacons and answers queries,
    /// so it must never wait for the consumer (a serving node may not read at all).
    fn emit(&mut self, events: &mut Option<mpsc::Sender<Event>>, ev: Event) {
        match &ev {
            Event::Discovered(p) => {
                bump(&self.stats.discovered);
                debug!(peer = %p.addr, types = ?p.types, "udp discovery: peer found");
            }
            Event::Lost { addr, .. } => {
                bump(&self.stats.lost);
                debug!(peer = %addr, "udp discovery: peer lost");
            }
        }
        let forget = match &ev {
            Event::Discovered(p) => p.node_id,
            Event::Lost { .. } => None,
        };
        if offer(events, ev) == Offered::Dropped {
            bump(&self.stats.dropped);
            if let Some(id) = forget {
                self.table.forget(&id);
            }
        }
    }

    async fn send(&mut self, what: Outgoing) {
        for l in &mut self.links {
            let bytes = match what {
                Outgoing::Query => Some(&l.query),
                Outgoing::Announce => l.announce.as_ref(),
                Outgoing::Leaving => l.leaving.as_ref(),
            };
            let Some(bytes) = bytes else {
                continue;
            };
            debug_assert!(bytes.len() <= MAX_BEACON + beacon::MAC_LEN);
            match l.socket.send_to(bytes, l.dest).await {
                Ok(_) => {
                    bump(&self.stats.sent);
                    if l.failing {
                        l.failing = false;
                        warn!(interface = %l.name, "udp discovery: sending beacons works again");
                    }
                }
                Err(e) => {
                    bump(&self.stats.send_errors);
                    if !l.failing {
                        l.failing = true;
                        warn!(interface = %l.name, dest = %l.dest, error = %e, "udp discovery: cannot send beacons");
                    }
                }
            }
        }
    }
}

/// Completes when the receiver of `events` is dropped; never when there is no sender.
async fn receiver_gone(events: Option<&mpsc::Sender<Event>>) {
    match events {
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

/// Reads datagrams from one socket into the driver until `stop`.
async fn receive(
    socket: Arc<UdpSocket>,
    tx: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    stop: CancellationToken,
    stats: Arc<Stats>,
) {
    // One byte more than a beacon may have: a longer datagram is seen as too large.
    let mut buf = vec![0u8; MAX_BEACON + beacon::MAC_LEN + 1];
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        match r {
            Ok((n, from)) => {
                bump(&stats.received);
                let data = buf.get(..n).unwrap_or(&buf[..]).to_vec();
                if tx.send((data, from)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!(error = %e, "udp discovery: receive failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
