//! Pluggable peer discovery for p2p-node.
//!
//! # Layout
//!
//! - [`Discovery`]: the trait every backend implements. A started backend sends
//!   [`Event::Discovered`] and [`Event::Lost`] into a channel (the stream of peer events) and,
//!   when it was given an [`Announcement`], makes this node findable by others.
//! - [`Kind`]: a backend's name as written on the command line (`none`, `static`, `udp`,
//!   `mdns`, `dns:NAME[:PORT]`).
//! - [`statik`]: the `static` backend (a fixed list of `HOST:PORT`).
//! - [`dns`]: the `dns:NAME[:PORT]` backend (every address of a name, re-resolved).
//! - [`udp`]: the `udp` backend (beacons on a multicast group, or broadcast, on chosen
//!   interfaces; queries answered at once; peers expire after missed beacons), and
//!   [`beacon`], the datagram it sends.
//! - [`mdns`]: the `mdns` backend (DNS-SD service `_p2p-node._tcp.local.` over multicast DNS,
//!   with the `mdns-sd` crate; standard DNS-SD browsers list the nodes).
//! - [`NoDiscovery`]: the `none` backend.
//! - [`start_all`]: runs several backends into one stream.
//! - [`Kind::build`] / [`build_all`]: the backends a node asks for, built from the
//!   settings they share ([`Common`]: cluster, keys, [`Interfaces`], listed peers) and the
//!   node's [`Role`]. Adding a backend is one module, one [`Kind`] arm (parse, print,
//!   build) and one conformance case.
//!
//! A backend that will never report anything more (a static list, once resolved) drops its
//! sender; the combined stream ends when every backend has, which lets a run stop waiting
//! early. Backends that watch a network keep running until shutdown.
//!
//! # Usage
//!
//! ```
//! use p2p_discovery::{start_all, statik, Discovery, Event};
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), p2p_discovery::Error> {
//! let backends: Vec<Box<dyn Discovery>> =
//!     vec![Box::new(statik::Static::new(vec!["127.0.0.1:7401".into()]))];
//! let mut events = start_all(backends, None, CancellationToken::new())?;
//! while let Some(Event::Discovered(peer)) = events.recv().await {
//!     assert_eq!(peer.addr.port(), 7401);
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use p2p_core::{ClusterKey, NodeId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Defines a backend's `Stats` (atomic counters it bumps while it runs) and `Counters` (a
/// copy of them at one moment, from `Stats::snapshot`): one documented field per counter.
macro_rules! backend_counters {
    ($backend:literal, $handle:literal; $( $(#[doc = $doc:expr])* $field:ident ),+ $(,)?) => {
        #[doc = concat!("Counters of the `", $backend, "` backend, readable while it runs (see [`", $handle, "`]).")]
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $field: std::sync::atomic::AtomicU64, )+
        }

        /// A copy of [`Stats`] at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Counters {
            $( $(#[doc = $doc])* pub $field: u64, )+
        }

        impl Stats {
            /// The counters now.
            pub fn snapshot(&self) -> Counters {
                Counters {
                    $( $field: self.$field.load(std::sync::atomic::Ordering::Relaxed), )+
                }
            }
        }

        impl Counters {
            /// Every counter with its field name, in declaration order.
            pub fn pairs(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($field), self.$field), )+ ]
            }
        }
    };
}

/// Adds one to a backend counter.
fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

pub mod beacon;
#[cfg(test)]
mod conformance;
pub mod dns;
mod interfaces;
pub mod mdns;
pub mod statik;
pub mod udp;

pub use interfaces::Interfaces;

/// How many undelivered events a discovery stream holds. The backends that watch a network
/// (udp, mdns, dns) never wait for room: an event that finds the queue full is dropped and
/// counted, and the peer is reported again when next heard. `static` (a fixed list, sent
/// once) waits for room, so that no listed peer is lost.
pub const EVENT_QUEUE: usize = 1024;

/// What became of an event offered to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offered {
    /// It is in the queue.
    Sent,
    /// The queue was full: dropped (the caller counts it and forgets what it reported).
    Dropped,
    /// Nobody listens any more (or never did): the sender is gone.
    Closed,
}

/// Offers `ev` to `events` without ever waiting: the announce and answer paths of a backend
/// must not depend on how fast (or whether) its consumer reads. A closed stream clears
/// `events`.
pub(crate) fn offer(events: &mut Option<mpsc::Sender<Event>>, ev: Event) -> Offered {
    let Some(tx) = events.as_ref() else {
        return Offered::Closed;
    };
    match tx.try_send(ev) {
        Ok(()) => Offered::Sent,
        Err(mpsc::error::TrySendError::Full(_)) => Offered::Dropped,
        Err(mpsc::error::TrySendError::Closed(_)) => {
            *events = None;
            Offered::Closed
        }
    }
}

/// Errors of discovery backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A `--discovery` value is not a known backend.
    #[error("unknown discovery kind {0:?}: expected none, static, udp, mdns or dns:NAME[:PORT]")]
    UnknownKind(String),
    /// An address could not be parsed or resolved.
    #[error("cannot resolve peer address {addr:?}: {reason}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// A beacon field does not fit the beacon format (see [`beacon`]).
    #[error("{what} too large for a discovery beacon: {len}, at most {max}")]
    BeaconTooLarge {
        /// The field (`cluster name`, `type name`, `type list (count)`, `beacon`).
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A UDP discovery socket could not be set up.
    #[error("udp discovery: cannot {what}: {source}")]
    Socket {
        /// The step that failed, with the interface it was for.
        what: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// No network interface fits the discovery settings.
    #[error("udp discovery: {0}")]
    Interface(String),
    /// The backend's settings contradict each other or the announcement.
    #[error("udp discovery: {0}")]
    Config(String),
    /// The `mdns` backend's settings are wrong: an interface that does not exist, a TXT
    /// value too long, an announcement of another cluster.
    #[error("mdns discovery: {0}")]
    MdnsConfig(String),
    /// The `mdns` backend cannot start: `mdns-sd` failed (its daemon, a registration).
    #[error("mdns discovery: {0}")]
    Mdns(String),
    /// A listed peer is not `HOST:PORT` ([`build_all`]).
    #[error("peer address {0:?}: expected HOST:PORT")]
    PeerAddress(String),
    /// The `static` backend was asked for with no peer to list ([`build_all`]).
    #[error("static discovery needs at least one peer address (HOST:PORT)")]
    NoPeers,
    /// Interfaces were given but no backend asked for uses them ([`build_all`]).
    #[error("interfaces apply to udp and mdns discovery only")]
    InterfacesUnused,
}

/// What a node says about itself to be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// Cluster name; other clusters ignore it.
    pub cluster: String,
    /// The node's id.
    pub node_id: NodeId,
    /// The TCP address where it accepts connections.
    pub addr: SocketAddr,
    /// Task types it serves.
    pub types: Vec<String>,
    /// Tasks it runs at once.
    pub capacity: u32,
}

/// A peer as a backend found it. Fields a backend cannot know are `None`: the handshake
/// tells them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Its node id, if the backend knows it.
    pub node_id: Option<NodeId>,
    /// Its task types, if the backend knows them.
    pub types: Option<Vec<String>>,
    /// Its capacity, if the backend knows it.
    pub capacity: Option<u32>,
    /// The backend that found it (`static`, `udp`, ...).
    pub source: &'static str,
}

/// A change in the set of known peers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A peer was found (or found again with new details).
    Discovered(Peer),
    /// A peer is gone.
    Lost {
        /// Its address.
        addr: SocketAddr,
        /// Its node id, if known.
        node_id: Option<NodeId>,
        /// The backend that lost it.
        source: &'static str,
    },
}

/// Everything a started backend needs.
#[derive(Debug, Clone)]
pub struct Context {
    /// What to announce, for a node that accepts connections; `None` for a pure client.
    pub announce: Option<Announcement>,
    /// Where events go. Drop it when nothing more will ever be reported.
    pub events: mpsc::Sender<Event>,
    /// Fires when the node shuts down.
    pub shutdown: CancellationToken,
}

/// A discovery backend.
pub trait Discovery: Send + Sync + 'static {
    /// The backend's name as it appears in events and `peers` output.
    fn name(&self) -> &'static str;

    /// Starts the backend: it spawns what it needs and reports into `ctx.events`.
    /// Must be called inside a tokio runtime.
    fn start(self: Box<Self>, ctx: Context) -> Result<(), Error>;

    /// A token cancelled once the backend has finished its farewell after shutdown (e.g.
    /// sent its `leaving` beacons), for a node that wants to wait for it before exiting.
    /// Take it before [`Discovery::start`]. Default: none (nothing to wait for).
    fn stopped(&self) -> Option<CancellationToken> {
        None
    }

    /// Reads the backend's counters (name, value) while it runs, for metrics. Take it
    /// before [`Discovery::start`]. Default: none (no counters).
    fn counters(&self) -> Option<CounterReader> {
        None
    }
}

/// Reads a backend's counters (see [`Discovery::counters`]).
pub type CounterReader = std::sync::Arc<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// The `none` backend: finds nothing and announces nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDiscovery;

impl Discovery for NoDiscovery {
    fn name(&self) -> &'static str {
        "none"
    }

    fn start(self: Box<Self>, ctx: Context) -> Result<(), Error> {
        drop(ctx);
        Ok(())
    }
}

/// Starts every backend into one stream of events. The stream ends when all backends are
/// done (see the crate docs).
pub fn start_all(
    backends: Vec<Box<dyn Discovery>>,
    announce: Option<Announcement>,
    shutdown: CancellationToken,
) -> Result<mpsc::Receiver<Event>, Error> {
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    for b in backends {
        b.start(Context {
            announce: announce.clone(),
            events: tx.clone(),
            shutdown: shutdown.clone(),
        })?;
    }
    Ok(rx)
}

/// A discovery backend as named on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Kind {
    /// No discovery.
    None,
    /// The `--peer` list.
    Static,
    /// UDP beacons (the default of a node told nothing).
    #[default]
    Udp,
    /// DNS-SD over multicast DNS.
    Mdns,
    /// All addresses of a DNS name.
    Dns {
        /// The name to resolve.
        name: String,
        /// The port to connect to (default 7400).
        port: u16,
    },
}

impl FromStr for Kind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "none" => Ok(Kind::None),
            "static" => Ok(Kind::Static),
            "udp" => Ok(Kind::Udp),
            "mdns" => Ok(Kind::Mdns),
            _ => {
                let rest = s
                    .strip_prefix("dns:")
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| Error::UnknownKind(s.to_string()))?;
                match rest.rsplit_once(':') {
                    Some((name, port)) if !name.is_empty() => Ok(Kind::Dns {
                        name: name.to_string(),
                        port: port
                            .parse()
                            .map_err(|_| Error::UnknownKind(s.to_string()))?,
                    }),
                    Some(_) => Err(Error::UnknownKind(s.to_string())),
                    None => Ok(Kind::Dns {
                        name: rest.to_string(),
                        port: 7400,
                    }),
                }
            }
        }
    }
}

/// The settings every backend is built from (see [`Kind::build`]).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Common {
    /// The cluster's name: LAN backends ignore other clusters.
    pub cluster: String,
    /// The cluster keys: LAN backends seal what they announce under the first and accept
    /// any (a key rotation); none without a key.
    pub keys: Vec<ClusterKey>,
    /// Where LAN backends (`udp`, `mdns`) work; `None`: the [`Role`]'s default (where the
    /// node listens, or every interface for a client).
    pub interfaces: Option<Interfaces>,
    /// The `HOST:PORT` list of the `static` backend.
    pub peers: Vec<String>,
    /// The `udp` backend's port; `None`: its default ([`udp::DEFAULT_PORT`]).
    pub udp_port: Option<u16>,
    /// How often the backends that repeat themselves do so (`udp` announces, `dns`
    /// resolves again); `None`: each backend's default.
    pub interval: Option<Duration>,
}

impl Common {
    /// Settings for `cluster`, with no key, no interfaces and no listed peer.
    pub fn new(cluster: impl Into<String>) -> Self {
        Common {
            cluster: cluster.into(),
            ..Common::default()
        }
    }

    /// With these cluster keys.
    pub fn keys(mut self, keys: Vec<ClusterKey>) -> Self {
        self.keys = keys;
        self
    }

    /// With these interfaces for the LAN backends.
    pub fn interfaces(mut self, interfaces: Interfaces) -> Self {
        self.interfaces = Some(interfaces);
        self
    }

    /// With these listed peers (`HOST:PORT`).
    pub fn peers(mut self, peers: Vec<String>) -> Self {
        self.peers = peers;
        self
    }

    /// With this port for the `udp` backend.
    pub fn udp_port(mut self, port: u16) -> Self {
        self.udp_port = Some(port);
        self
    }

    /// With this interval for the backends that repeat themselves (see [`Common::interval`]).
    pub fn interval(mut self, every: Duration) -> Self {
        self.interval = Some(every);
        self
    }
}

/// What the node does with discovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// It accepts connections on this address and announces itself where it listens (a
    /// loopback listener: on loopback only).
    Serve(SocketAddr),
    /// It only looks (on every interface, unless told otherwise).
    Client,
}

impl Kind {
    /// Builds this backend from `common` for a node in `role`; `None` for a kind that needs
    /// no backend of its own (`none`; `static` is [`Common::peers`], see [`build_all`]).
    pub fn build(&self, common: &Common, role: Role) -> Result<Option<Box<dyn Discovery>>, Error> {
        Ok(match self {
            Kind::None => None,
            Kind::Static => Some(Box::new(statik::Static::new(common.peers.clone()))),
            // Where the node listens (loopback listen: loopback only), or every interface
            // for a client, unless told; with a key, what it announces carries a MAC.
            Kind::Udp => {
                let mut cfg = match role {
                    Role::Serve(listen) => udp::Config::for_listen(common.cluster.clone(), listen),
                    Role::Client => {
                        udp::Config::new(common.cluster.clone()).interfaces(Interfaces::All)
                    }
                };
                cfg = cfg.keys(common.keys.clone());
                if let Some(i) = &common.interfaces {
                    cfg = cfg.interfaces(i.clone());
                }
                if let Some(port) = common.udp_port {
                    cfg = cfg.port(port);
                }
                if let Some(every) = common.interval {
                    cfg = cfg.interval(every);
                }
                Some(Box::new(udp::Udp::new(cfg)))
            }
            Kind::Mdns => {
                let mut cfg = match role {
                    Role::Serve(listen) => mdns::Config::for_listen(common.cluster.clone(), listen),
                    Role::Client => {
                        mdns::Config::new(common.cluster.clone()).interfaces(Interfaces::All)
                    }
                };
                cfg = cfg.keys(common.keys.clone());
                if let Some(i) = &common.interfaces {
                    cfg = cfg.interfaces(i.clone());
                }
                Some(Box::new(mdns::Mdns::new(cfg)))
            }
            Kind::Dns { name, port } => {
                let mut dns = dns::Dns::new(name.clone(), *port);
                if let Some(every) = common.interval {
                    dns = dns.interval(every);
                }
                Some(Box::new(dns))
            }
        })
    }

    /// Whether this backend works on the [`Common::interfaces`] (`udp`, `mdns`).
    pub fn takes_interfaces(&self) -> bool {
        matches!(self, Kind::Udp | Kind::Mdns)
    }

    /// Whether this backend looks beyond what it was told (the network or a name
    /// service): `udp`, `mdns`, `dns`. `none` and `static` do not.
    pub fn uses_network(&self) -> bool {
        matches!(self, Kind::Udp | Kind::Mdns | Kind::Dns { .. })
    }
}

/// Checks that `kinds` fit the settings, as [`build_all`] does first: every listed peer is
/// `HOST:PORT` ([`Error::PeerAddress`]), `static` has peers ([`Error::NoPeers`]), and
/// interfaces (when `interfaces_given`) are used by some backend
/// ([`Error::InterfacesUnused`]). Separate so that a caller can check before it parses the
/// interfaces.
pub fn check(kinds: &[Kind], peers: &[String], interfaces_given: bool) -> Result<(), Error> {
    if let Some(p) = peers.iter().find(|p| !p.contains(':')) {
        return Err(Error::PeerAddress(p.clone()));
    }
    if kinds.contains(&Kind::Static) && peers.is_empty() {
        return Err(Error::NoPeers);
    }
    if interfaces_given && !kinds.iter().any(Kind::takes_interfaces) {
        return Err(Error::InterfacesUnused);
    }
    Ok(())
}

/// The backends for `kinds` (see [`check`]): each kind's [`Kind::build`], and one `static`
/// backend for [`Common::peers`] when there are any (whether or not `static` is named).
pub fn build_all(
    kinds: &[Kind],
    common: &Common,
    role: Role,
) -> Result<Vec<Box<dyn Discovery>>, Error> {
    check(kinds, &common.peers, common.interfaces.is_some())?;
    let mut out = Vec::new();
    for kind in kinds.iter().filter(|k| **k != Kind::Static) {
        out.extend(kind.build(common, role)?);
    }
    if !common.peers.is_empty() {
        out.extend(Kind::Static.build(common, role)?);
    }
    Ok(out)
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::None => f.write_str("none"),
            Kind::Static => f.write_str("static"),
            Kind::Udp => f.write_str("udp"),
            Kind::Mdns => f.write_str("mdns"),
            Kind::Dns { name, port } => write!(f, "dns:{name}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for s in ["none", "static", "udp", "mdns", "dns:peers.example:7500"] {
            assert_eq!(s.parse::<Kind>().unwrap().to_string(), s);
        }
        assert_eq!(
            "dns:svc".parse::<Kind>().unwrap(),
            Kind::Dns {
                name: "svc".into(),
                port: 7400
            }
        );
        for bad in [
            "",
            "UDP",
            "dns:",
            "dns:x:notaport",
            "dns::80",
            "carrier-pigeon",
        ] {
            assert!(bad.parse::<Kind>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn every_kind_builds_its_backend_from_the_common_settings() {
        let common = Common::new("c").peers(vec!["127.0.0.1:7401".into()]);
        let listen = SocketAddr::from(([127, 0, 0, 1], 7400));
        for role in [Role::Client, Role::Serve(listen)] {
            for (kind, name) in [
                (Kind::Static, Some("static")),
                (Kind::Udp, Some("udp")),
                (Kind::Mdns, Some("mdns")),
                (
                    Kind::Dns {
                        name: "localhost".into(),
                        port: 7400,
                    },
                    Some("dns"),
                ),
                (Kind::None, None),
            ] {
                let built = kind.build(&common, role).unwrap();
                assert_eq!(built.as_ref().map(|b| b.name()), name, "{kind}");
            }
        }
        // The listed peers are one static backend, named or not; `none` adds nothing.
        let names = |kinds: &[Kind]| -> Vec<&'static str> {
            build_all(kinds, &common, Role::Client)
                .unwrap()
                .iter()
                .map(|b| b.name())
                .collect()
        };
        assert_eq!(names(&[Kind::Static]), ["static"]);
        assert_eq!(names(&[Kind::None]), ["static"]);
        assert_eq!(names(&[Kind::Udp, Kind::Static]), ["udp", "static"]);
        assert!(build_all(&[Kind::None], &Common::new("c"), Role::Client)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn settings_that_do_not_fit_the_kinds_are_typed_errors() {
        let peers = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches!(
            check(&[Kind::None], &peers(&["nohost"]), false),
            Err(Error::PeerAddress(p)) if p == "nohost"
        ));
        assert!(matches!(
            check(&[Kind::Static], &[], false),
            Err(Error::NoPeers)
        ));
        assert!(matches!(
            check(&[Kind::Static, Kind::None], &peers(&["h:1"]), true),
            Err(Error::InterfacesUnused)
        ));
        for k in [Kind::Udp, Kind::Mdns] {
            assert!(check(&[k], &[], true).is_ok());
        }
        assert!(!Kind::Static.uses_network() && !Kind::None.uses_network());
        assert_eq!(Kind::default(), Kind::Udp);
    }

    #[tokio::test]
    async fn none_ends_the_stream_at_once() {
        let mut rx =
            start_all(vec![Box::new(NoDiscovery)], None, CancellationToken::new()).unwrap();
        assert_eq!(rx.recv().await, None);
    }
}
