//! The `mdns` backend: DNS-SD over multicast DNS (RFC 6762, RFC 6763), with the `mdns-sd`
//! crate, so standard DNS-SD browsers (`avahi-browse`, python `zeroconf`, `dns-sd`) list the
//! nodes.
//!
//! # Usage
//!
//! ```no_run
//! use p2p_discovery::{mdns, start_all, Discovery};
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), p2p_discovery::Error> {
//! // A node listening on 10.0.0.5:7400 is announced and looks for peers on the interface
//! // holding 10.0.0.5 only.
//! let config = mdns::Config::for_listen("default", "10.0.0.5:7400".parse().unwrap());
//! let backend: Box<dyn Discovery> = Box::new(mdns::Mdns::new(config));
//! let mut events = start_all(vec![backend], None, CancellationToken::new())?;
//! while let Some(event) = events.recv().await {
//!     println!("{event:?}");
//! }
//! # Ok(()) }
//! ```
//!
//! # Records
//!
//! An announcing node registers one instance of the service type [`SERVICE_TYPE`]
//! (`_p2p-node._tcp.local.`), named `p2p-node-ID` (ID: the node id, 32 hex digits), on the
//! host `p2p-ID.local.`, at the TCP address and port where it accepts connections (for
//! `0.0.0.0`, each interface's own address). Its TXT record holds:
//!
//! | key | value |
//! |---|---|
//! | `version` | the wire protocol version ([`p2p_core::PROTOCOL_VERSION`]) |
//! | `cluster` | the cluster name |
//! | `id` | the node id, 32 lowercase hex digits |
//! | `types` | the task types served, comma-separated (`a,b`) |
//! | `capacity` | tasks it runs at once |
//! | `mac` | with a cluster key only: a MAC under the key of the fields above and the port |
//!
//! **With a cluster key** ([`Config::key`]) the record carries `mac`, and a keyed node
//! ignores records whose MAC does not verify (counted as `unauthenticated`), so nobody
//! without the key can announce a node of the cluster or change a node's types or capacity.
//! The address is not covered (a node on `0.0.0.0` has one per interface): a replayed record
//! can at most point at another address, where the handshake fails for want of the key. A
//! forged goodbye can make a node be reported lost (mDNS has no signed removal); an open
//! connection to it is not affected. A node without a key ignores records with a `mac`
//! (their cluster needs the key). The cluster name is readable by anyone on the link.
//!
//! Each `key=value` must fit one TXT string (255 bytes): a longer cluster name or type list
//! is an [`Error::MdnsConfig`] at [`Discovery::start`]. Names are not probed (RFC 6762 §8): they
//! contain the 128-bit random node id, so they do not collide, and the node is visible at
//! once.
//!
//! # Browsing
//!
//! Every started backend (announcing or not) browses the service type and reports
//! [`Event::Discovered`] (address, node id, types, capacity) for each resolved instance of
//! its own cluster and protocol version, and [`Event::Discovered`] again when those details
//! change. Ignored and counted ([`Stats`]): the node's own instance, other clusters, other
//! protocol versions (or no version: another application on the type), records without a
//! valid MAC (see above) and malformed TXT records. An instance removed (its goodbye, or its records expired) is [`Event::Lost`].
//!
//! Of a service's addresses, the backend connects to an IPv4 one before IPv6 and to a
//! non-loopback one before loopback.
//!
//! **Leaving.** On shutdown the backend unregisters its instance: `mdns-sd` sends the goodbye
//! (records with TTL 0) at once and again 120 ms later, and browsers report the node lost
//! immediately. [`Mdns::stopped`] fires once that is done (bounded by [`FAREWELL`]). A node
//! that dies without a goodbye is lost only when its SRV record expires (TTL 120 s, fixed by
//! `mdns-sd`; it asks the node again from 80% of the TTL on): use `udp` for prompt loss
//! detection (its peers expire after 3 missed beacons). During a run, a dead node's
//! connection fails (EOF or missed heartbeats) long before, so its tasks move anyway.
//!
//! A backend with nothing to announce stops when its event receiver is dropped; one that
//! announces keeps running until shutdown.
//!
//! # Interfaces
//!
//! mDNS is link-local: packets go to `224.0.0.251:5353` with TTL 255 and are never routed.
//! The backend uses IPv4 only, on the interfaces [`Interfaces`] (the `udp` backend's type)
//! selects, by the same rule as `udp` ([`Config::for_listen`]):
//!
//! | the node listens on | mDNS runs on |
//! |---|---|
//! | a loopback address (`127.0.0.1:7400`) | the loopback interface only |
//! | one address (`10.0.0.5:7400`) | the interface holding that address |
//! | `0.0.0.0` or `[::]` | every IPv4 interface that is up, loopback included |
//!
//! A node that does not listen (a pure `run`) uses [`Interfaces::All`] or the interface the
//! user names (`--discovery-interface`).
//!
//! **Loopback.** mDNS on `lo` works on Linux (the daemon sends with `IP_MULTICAST_IF` =
//! 127.0.0.1 and multicast loop on; checked in a fresh network namespace), so several nodes
//! on one machine find each other with `--discovery mdns` and no mDNS packet leaves it.
//! The test suites still run mDNS only inside network namespaces, because of the next point.
//!
//! **What `mdns-sd` does before the restriction applies.** Its daemon thread, when it starts,
//! joins the mDNS group on *every* interface that is up (IPv4 and IPv6) before the backend's
//! interface selection reaches it, and leaves the groups it must not use a moment later. No
//! mDNS packet is sent in that window (nothing is registered or browsed yet), but the kernel
//! does send IGMP/MLD membership reports for the joins and leaves on those interfaces. On a
//! machine where even that is unwanted, use `udp` on loopback (which joins only the chosen
//! interface) or run the node in its own network namespace.
//!
//! Several nodes on one host share port 5353 (`SO_REUSEADDR` and `SO_REUSEPORT`), also with
//! a system mDNS responder (avahi) running. Each started backend runs one `mdns-sd` daemon
//! thread, ended at shutdown (or when the backend's task is dropped).

mod txt;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mdns_sd::{IfKind, IfPredicate, ServiceDaemon, ServiceEvent, ServiceInfo};
use p2p_core::{ClusterKey, NodeId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use crate::Interfaces;
use crate::{bump, offer, Announcement, Context, Discovery, Error, Event, Offered, Peer};
use txt::Verdict;
pub use txt::{KEY_CAPACITY, KEY_CLUSTER, KEY_ID, KEY_MAC, KEY_TYPES, KEY_VERSION};

/// The DNS-SD service type of p2p-node.
pub const SERVICE_TYPE: &str = "_p2p-node._tcp.local.";

/// The mDNS port (RFC 6762). Standard browsers use only this one.
pub const DEFAULT_PORT: u16 = mdns_sd::MDNS_PORT;

/// The longest the farewell (goodbye, its repetition and the daemon's end) takes after
/// shutdown before [`Mdns::stopped`] fires anyway.
pub const FAREWELL: Duration = Duration::from_millis(450);

/// How long after the first goodbye `mdns-sd` repeats it (a little more than its 120 ms).
const GOODBYE_REPEAT: Duration = Duration::from_millis(150);

/// Pause before browsing again when the daemon dropped the subscription.
const REBROWSE_PAUSE: Duration = Duration::from_millis(100);

/// Settings of the `mdns` backend. Every setter states its default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    cluster: String,
    interfaces: Interfaces,
    port: u16,
    keys: Vec<ClusterKey>,
}

impl Default for Config {
    /// Cluster `default`, on the loopback interface, port 5353.
    fn default() -> Self {
        Config {
            cluster: "default".into(),
            interfaces: Interfaces::default(),
            port: DEFAULT_PORT,
            keys: Vec::new(),
        }
    }
}

impl Config {
    /// Settings for `cluster`, on the loopback interface.
    pub fn new(cluster: impl Into<String>) -> Config {
        Config::default().cluster(cluster)
    }

    /// Settings for a node of `cluster` listening on `listen`:
    /// [`Interfaces::for_listen`]`(listen)` (see the module docs).
    pub fn for_listen(cluster: impl Into<String>, listen: SocketAddr) -> Config {
        Config::new(cluster).interfaces(Interfaces::for_listen(listen))
    }

    /// The cluster whose nodes are reported; others are ignored. Default `default`. An
    /// announcement given at start must be of this cluster.
    pub fn cluster(mut self, name: impl Into<String>) -> Self {
        self.cluster = name.into();
        self
    }

    /// The cluster key: the TXT record carries a MAC under it (`mac`), and records that do
    /// not verify are ignored (see the module docs). Default none. Replaces the keys of
    /// [`Config::keys`].
    pub fn key(mut self, key: Option<ClusterKey>) -> Self {
        self.keys = key.into_iter().collect();
        self
    }

    /// Several cluster keys, during a key rotation: the record is sealed with the first,
    /// and records sealed with any of them are accepted. An empty list means no key.
    pub fn keys(mut self, keys: Vec<ClusterKey>) -> Self {
        self.keys = keys;
        self
    }

    /// Where mDNS runs. Default: the loopback interface.
    pub fn interfaces(mut self, interfaces: Interfaces) -> Self {
        self.interfaces = interfaces;
        self
    }

    /// The UDP port of mDNS. Default [`DEFAULT_PORT`] (5353); another port is invisible to
    /// standard browsers (for tests only).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    fn validate(&self, announce: Option<&Announcement>) -> Result<(), Error> {
        if self.port == 0 {
            return Err(Error::MdnsConfig("the mDNS port must not be 0".into()));
        }
        if let Some(a) = announce {
            if a.cluster != self.cluster {
                return Err(Error::MdnsConfig(format!(
                    "the announcement is for cluster {:?} but the backend looks for {:?}",
                    a.cluster, self.cluster
                )));
            }
        }
        Ok(())
    }
}

backend_counters! {
    "mdns", "Mdns::stats";
    /// Service instances resolved (every report of `mdns-sd`, before filtering).
    resolved,
    /// This node's own instance, seen by its browser.
    own,
    /// Instances of another cluster.
    foreign,
    /// Instances of another protocol version, or with none.
    unsupported,
    /// Instances whose MAC does not verify under this node's cluster key (or that carry one
    /// when this node has no key).
    unauthenticated,
    /// Instances whose TXT record or addresses are not usable.
    malformed,
    /// `Discovered` events produced.
    discovered,
    /// `Lost` events produced.
    lost,
    /// Events dropped because the consumer's queue was full (a dropped `Discovered` is
    /// reported again when the instance is next resolved).
    dropped,
}

/// The `mdns` backend.
#[derive(Debug)]
pub struct Mdns {
    config: Config,
    stats: Arc<Stats>,
    stopped: CancellationToken,
}

impl Mdns {
    /// A backend with these settings.
    pub fn new(config: Config) -> Mdns {
        Mdns {
            config,
            stats: Arc::new(Stats::default()),
            stopped: CancellationToken::new(),
        }
    }

    /// Its counters, shared with the running backend.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Cancelled when the started backend has ended: after shutdown, once its goodbye is
    /// sent and its daemon stopped (at most [`FAREWELL`] after shutdown).
    pub fn stopped(&self) -> CancellationToken {
        self.stopped.clone()
    }
}

/// The interfaces mDNS may use, as a test on `mdns-sd`'s interface list (IPv4 only).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selection {
    Loopback,
    /// The interface of this name (for an address: the interface holding it).
    Name(String),
    All,
}

impl Selection {
    /// Checks `sel` against the machine's interfaces, so a typo is an error at start rather
    /// than a node that silently finds nothing.
    fn resolve(sel: &Interfaces) -> Result<Selection, Error> {
        let all = if_addrs::get_if_addrs()
            .map_err(|e| Error::Mdns(format!("cannot list the network interfaces: {e}")))?;
        Selection::pick(&all, sel)
    }

    fn pick(all: &[if_addrs::Interface], sel: &Interfaces) -> Result<Selection, Error> {
        let mut v4 = all.iter().filter(|i| i.ip().is_ipv4());
        match sel {
            Interfaces::Addr(ip) if ip.is_loopback() => match v4.any(|i| i.is_loopback()) {
                true => Ok(Selection::Loopback),
                false => Err(Error::MdnsConfig(
                    "no loopback interface with an IPv4 address".into(),
                )),
            },
            Interfaces::Addr(ip) => v4
                .find(|i| i.ip() == IpAddr::V4(*ip))
                .map(|i| Selection::Name(i.name.clone()))
                .ok_or_else(|| {
                    Error::MdnsConfig(format!(
                        "no network interface of this machine has the address {ip}"
                    ))
                }),
            Interfaces::Name(name) => match v4.any(|i| &i.name == name) {
                true => Ok(Selection::Name(name.clone())),
                false => Err(Error::MdnsConfig(format!(
                    "no network interface named {name:?} with an IPv4 address"
                ))),
            },
            Interfaces::All => Ok(Selection::All),
        }
    }

    fn matches(&self, i: &if_addrs::Interface) -> bool {
        if !i.ip().is_ipv4() {
            return false;
        }
        match self {
            Selection::Loopback => i.is_loopback(),
            Selection::Name(name) => &i.name == name,
            Selection::All => true,
        }
    }
}

/// Ends the daemon thread when dropped (also when the backend's task is dropped with its
/// runtime): `mdns-sd` daemons otherwise run until the process exits.
struct Daemon(ServiceDaemon);

impl Drop for Daemon {
    fn drop(&mut self) {
        // Fails harmlessly when the daemon has already shut down.
        let _ = self.0.shutdown();
    }
}

fn mdns_err(what: &str) -> impl Fn(mdns_sd::Error) -> Error + '_ {
    move |e| Error::Mdns(format!("cannot {what}: {e}"))
}

/// The instance this node registers.
fn service_info(a: &Announcement, key: Option<&ClusterKey>) -> Result<ServiceInfo, Error> {
    let props = txt::properties(a, key)?;
    let id = a.node_id.to_string();
    let instance = format!("p2p-node-{id}");
    let host = format!("p2p-{id}.local.");
    let ip: Vec<IpAddr> = txt::registered_ip(a).into_iter().collect();
    let mut info = ServiceInfo::new(
        SERVICE_TYPE,
        &instance,
        &host,
        &ip[..],
        a.addr.port(),
        &props[..],
    )
    .map_err(mdns_err("describe the mDNS service"))?;
    if ip.is_empty() {
        info = info.enable_addr_auto();
    }
    info.set_requires_probe(false);
    Ok(info)
}

impl Discovery for Mdns {
    fn name(&self) -> &'static str {
        "mdns"
    }

    fn stopped(&self) -> Option<CancellationToken> {
        Some(Mdns::stopped(self))
    }

    fn counters(&self) -> Option<crate::CounterReader> {
        let stats = self.stats();
        Some(Arc::new(move || stats.snapshot().pairs()))
    }

    fn start(self: Box<Self>, ctx: Context) -> Result<(), Error> {
        let Mdns {
            config,
            stats,
            stopped,
        } = *self;
        config.validate(ctx.announce.as_ref())?;
        let selection = Selection::resolve(&config.interfaces)?;
        let info = ctx
            .announce
            .as_ref()
            .map(|a| service_info(a, config.keys.first()))
            .transpose()?;
        let daemon = Daemon(
            ServiceDaemon::new_with_port(config.port).map_err(mdns_err("start the mDNS daemon"))?,
        );
        // One selection, applied before anything is registered or browsed: every interface
        // the selection does not name (IPv6 included) is left.
        let keep = selection.clone();
        daemon
            .0
            .disable_interface(IfKind::Predicate(IfPredicate::new(move |i| {
                !keep.matches(i)
            })))
            .map_err(mdns_err(
                "restrict the mDNS daemon to the chosen interfaces",
            ))?;
        let registered = match info {
            Some(info) => {
                let name = info.get_fullname().to_string();
                daemon
                    .0
                    .register(info)
                    .map_err(mdns_err("register the mDNS service"))?;
                Some(name)
            }
            None => None,
        };
        let browse = daemon
            .0
            .browse(SERVICE_TYPE)
            .map_err(mdns_err("browse for p2p-node services"))?;
        debug!(interfaces = ?selection, announcing = registered.is_some(), port = config.port, "mdns discovery started");
        let me = ctx
            .announce
            .as_ref()
            .map_or_else(NodeId::random, |a| a.node_id);
        let driver = Driver {
            daemon,
            browse,
            registered,
            cluster: config.cluster,
            keys: config.keys,
            me,
            stats,
            known: HashMap::new(),
        };
        tokio::spawn(async move {
            driver.run(ctx).await;
            stopped.cancel();
        });
        Ok(())
    }
}

struct Driver {
    daemon: Daemon,
    browse: mdns_sd::Receiver<ServiceEvent>,
    /// The full name of this node's instance, when it announces.
    registered: Option<String>,
    cluster: String,
    keys: Vec<ClusterKey>,
    me: NodeId,
    stats: Arc<Stats>,
    /// What was reported, by instance full name.
    known: HashMap<String, Peer>,
}

impl Driver {
    async fn run(mut self, ctx: Context) {
        let Context {
            announce: _,
            events,
            shutdown,
        } = ctx;
        let mut events = Some(events);
        let announces = self.registered.is_some();
        loop {
            if events.is_none() && !announces {
                break;
            }
            let watch = events.clone();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                () = receiver_gone(watch.as_ref()) => events = None,
                ev = self.browse.recv_async() => match ev {
                    Ok(ev) => self.handle(ev, &mut events),
                    Err(_) => {
                        // The daemon drops a subscription whose channel is full; browse again
                        // (the daemon reports what it has cached at once).
                        debug!("mdns discovery: the browse subscription ended; browsing again");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(REBROWSE_PAUSE) => {}
                        }
                        match self.daemon.0.browse(SERVICE_TYPE) {
                            Ok(rx) => self.browse = rx,
                            Err(e) => {
                                warn!(error = %e, "mdns discovery: the mDNS daemon stopped");
                                break;
                            }
                        }
                    }
                }
            }
        }
        let _ = tokio::time::timeout(FAREWELL, self.farewell()).await;
    }

    fn handle(&mut self, ev: ServiceEvent, events: &mut Option<mpsc::Sender<Event>>) {
        match ev {
            ServiceEvent::ServiceResolved(svc) => {
                bump(&self.stats.resolved);
                let name = svc.get_fullname().to_string();
                match txt::read(&svc, &self.cluster, self.me, &self.keys) {
                    Verdict::Peer(peer) => {
                        let old = self.known.get(&name);
                        if old == Some(&peer) {
                            return;
                        }
                        if let Some(old) = old {
                            if old.addr != peer.addr || old.node_id != peer.node_id {
                                let lost = lost_event(old);
                                self.emit(events, lost);
                            }
                        }
                        debug!(instance = %name, peer = %peer.addr, types = ?peer.types, "mdns discovery: peer found");
                        self.known.insert(name.clone(), peer.clone());
                        if self.emit(events, Event::Discovered(peer)) == Offered::Dropped {
                            // Not delivered: forget it, so its next resolution reports it.
                            self.known.remove(&name);
                        }
                    }
                    other => {
                        let counter = match &other {
                            Verdict::Own => &self.stats.own,
                            Verdict::Foreign => &self.stats.foreign,
                            Verdict::Unsupported => &self.stats.unsupported,
                            Verdict::Unauthenticated => {
                                debug!(instance = %name, "mdns discovery ignored a service without a valid MAC");
                                &self.stats.unauthenticated
                            }
                            Verdict::Malformed(why) => {
                                debug!(instance = %name, why = %why, "mdns discovery ignored a malformed service");
                                &self.stats.malformed
                            }
                            Verdict::Peer(_) => return,
                        };
                        bump(counter);
                        // A known instance that changed into one we do not use is gone.
                        if let Some(old) = self.known.remove(&name) {
                            self.emit(events, lost_event(&old));
                        }
                    }
                }
            }
            ServiceEvent::ServiceRemoved(_, name) => {
                if let Some(old) = self.known.remove(&name) {
                    debug!(instance = %name, peer = %old.addr, "mdns discovery: peer lost");
                    self.emit(events, lost_event(&old));
                }
            }
            _ => {}
        }
    }

    /// Reports `ev` without waiting for the consumer (see [`crate::offer`]).
    fn emit(&self, events: &mut Option<mpsc::Sender<Event>>, ev: Event) -> Offered {
        match &ev {
            Event::Discovered(_) => bump(&self.stats.discovered),
            Event::Lost { .. } => bump(&self.stats.lost),
        }
        let offered = offer(events, ev);
        if offered == Offered::Dropped {
            bump(&self.stats.dropped);
        }
        offered
    }

    /// Unregisters this node's instance (the goodbye) and stops the daemon.
    async fn farewell(self) {
        if let Some(name) = &self.registered {
            match self.daemon.0.unregister(name) {
                Ok(done) => {
                    let _ = done.recv_async().await;
                    // Let the repeated goodbye go out too.
                    tokio::time::sleep(GOODBYE_REPEAT).await;
                }
                Err(e) => debug!(error = %e, "mdns discovery: cannot unregister"),
            }
        }
        if let Ok(done) = self.daemon.0.shutdown() {
            let _ = done.recv_async().await;
        }
    }
}

fn lost_event(p: &Peer) -> Event {
    Event::Lost {
        addr: p.addr,
        node_id: p.node_id,
        source: "mdns",
    }
}

/// Completes when the receiver of `events` is dropped; never when there is no sender.
async fn receiver_gone(events: Option<&mpsc::Sender<Event>>) {
    match events {
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
