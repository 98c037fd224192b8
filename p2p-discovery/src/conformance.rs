//! The conformance suite every backend passes (tests only).
//!
//! [`check`] starts a backend (through [`start_all`], as a node does) next to what makes a
//! peer visible to it (a listed address, a name, an announcing node of the same kind), and
//! checks the [`Discovery`] contract:
//!
//! - `start` succeeds and the backend's events carry its [`Discovery::name`] as `source`;
//! - the peer is reported [`Event::Discovered`] (with its node id where the backend learns
//!   it), and reported once while it does not change;
//! - where the backend knows clusters (`udp`, `mdns`), a node of another cluster next to it
//!   is never reported, and the peer leaving (its shutdown) is reported [`Event::Lost`];
//! - shutdown is honoured: the event stream ends (every sender dropped) within [`BOUND`], and
//!   the [`Discovery::stopped`] token, if any, fires within it.
//!
//! Backends: `none`, `static`, `dns` (`localhost`), `udp` (loopback, a port of this suite's
//! own) and `mdns` (in a network namespace of its own, see [`harness::netns::inside`]), each
//! built as a node builds it: [`Kind::build`] from the [`Common`] settings. A new backend is
//! one module, one [`Kind`] arm and one case here.
//!
//! Nothing here asserts on timing: [`BOUND`] is a hang guard.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use p2p_core::NodeId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    start_all, Announcement, Common, Discovery, Event, Interfaces, Kind, NoDiscovery, Role,
};

/// A hang guard for each step.
const BOUND: Duration = Duration::from_secs(30);

/// What a backend under test should find, and what runs next to it.
struct Case {
    /// The backend under test.
    backend: Box<dyn Discovery>,
    /// Its expected [`Discovery::name`].
    name: &'static str,
    /// Whether it announces (as a serving node) or only looks.
    announce: Option<Announcement>,
    /// The peer it must report: its address test and, for backends that learn it, its id.
    expect: Option<Expect>,
    /// Its stream ends on its own (a list, once reported) rather than at shutdown.
    ends_by_itself: bool,
    /// Announcing backends of the same kind that make peers visible: the peer (stopped
    /// during the check to see it lost) and a node of another cluster.
    peer: Option<Box<dyn Discovery>>,
    foreign: Option<Box<dyn Discovery>>,
}

struct Expect {
    addr: Box<dyn Fn(SocketAddr) -> bool + Send>,
    node_id: Option<NodeId>,
    announcement: Option<Announcement>,
    foreign: Option<Announcement>,
}

fn announcement(cluster: &str, port: u16, types: &[&str]) -> Announcement {
    Announcement {
        cluster: cluster.into(),
        node_id: NodeId::random(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        types: types.iter().map(|t| t.to_string()).collect(),
        capacity: 2,
    }
}

/// The backend of `kind` for `common`, built as a node that only looks builds it
/// ([`Kind::build`]); `none` builds nothing, which is a node's [`NoDiscovery`].
fn build(kind: Kind, common: &Common) -> Box<dyn Discovery> {
    kind.build(common, Role::Client)
        .unwrap_or_else(|e| panic!("{kind}: build failed: {e}"))
        .unwrap_or_else(|| {
            assert_eq!(kind, Kind::None, "only none builds no backend");
            Box::new(NoDiscovery)
        })
}

/// Runs the contract on `case` (see the module docs).
async fn check(case: Case) {
    let Case {
        backend,
        name,
        announce,
        expect,
        ends_by_itself,
        peer,
        foreign,
    } = case;
    assert_eq!(backend.name(), name);
    let stopped = backend.stopped();
    let shutdown = CancellationToken::new();

    // Peers of the same kind first (a backend must also find nodes that were there before).
    let peer_stop = CancellationToken::new();
    let mut keep = Vec::new();
    if let (Some(p), Some(e)) = (peer, &expect) {
        let a = e
            .announcement
            .clone()
            .expect("an announcing peer has an announcement");
        keep.push(start_all(vec![p], Some(a), peer_stop.clone()).unwrap());
    }
    let foreign_stop = CancellationToken::new();
    if let (Some(f), Some(e)) = (foreign, &expect) {
        let a = e
            .foreign
            .clone()
            .expect("a foreign peer has an announcement");
        keep.push(start_all(vec![f], Some(a), foreign_stop.clone()).unwrap());
    }

    let mut rx = start_all(vec![backend], announce, shutdown.clone())
        .unwrap_or_else(|e| panic!("{name}: start failed: {e}"));
    let mut seen: Vec<Event> = Vec::new();

    if let Some(e) = &expect {
        let found = next(&mut rx, &mut seen, name, "the peer", |ev| match ev {
            Event::Discovered(p) => {
                (e.addr)(p.addr) && (e.node_id.is_none() || p.node_id == e.node_id)
            }
            Event::Lost { .. } => false,
        })
        .await;
        let Event::Discovered(p) = found else {
            unreachable!()
        };
        assert_eq!(p.source, name, "{name}: wrong source in {p:?}");
        if let Some(a) = &e.announcement {
            assert_eq!(p.types.as_ref(), Some(&a.types), "{name}: {p:?}");
            assert_eq!(p.capacity, Some(a.capacity), "{name}: {p:?}");
        }
        if e.announcement.is_some() {
            // It leaves: reported lost.
            peer_stop.cancel();
            let id = e.node_id;
            next(
                &mut rx,
                &mut seen,
                name,
                "the peer lost",
                |ev| matches!(ev, Event::Lost { node_id, .. } if *node_id == id),
            )
            .await;
        }
    }

    if !ends_by_itself {
        shutdown.cancel();
    }
    // The stream ends: every sender of the backend is dropped.
    let ended = tokio::time::timeout(BOUND, async {
        while let Some(ev) = rx.recv().await {
            seen.push(ev);
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "{name}: the event stream did not end within {BOUND:?} after shutdown"
    );
    shutdown.cancel();
    if let Some(stopped) = stopped {
        let done = tokio::time::timeout(BOUND, stopped.cancelled()).await;
        assert!(
            done.is_ok(),
            "{name}: stopped() did not fire within {BOUND:?} after shutdown"
        );
    }

    for ev in &seen {
        let source = match ev {
            Event::Discovered(p) => p.source,
            Event::Lost { source, .. } => source,
        };
        assert_eq!(source, name, "{name}: wrong source in {ev:?}");
    }
    if let Some(e) = &expect {
        let reports = seen
            .iter()
            .filter(|ev| matches!(ev, Event::Discovered(p) if (e.addr)(p.addr) && (e.node_id.is_none() || p.node_id == e.node_id)))
            .count();
        assert_eq!(
            reports, 1,
            "{name}: an unchanged peer reported {reports} times: {seen:?}"
        );
        if let Some(f) = &e.foreign {
            assert!(
                !seen.iter().any(|ev| match ev {
                    Event::Discovered(p) => p.node_id == Some(f.node_id) || p.addr == f.addr,
                    Event::Lost { node_id, .. } => *node_id == Some(f.node_id),
                }),
                "{name}: a node of another cluster was reported: {seen:?}"
            );
        }
    } else {
        assert!(
            !seen.iter().any(|ev| matches!(ev, Event::Discovered(_))),
            "{name}: reported peers out of nothing: {seen:?}"
        );
    }
    peer_stop.cancel();
    foreign_stop.cancel();
    drop(keep);
}

/// The next event satisfying `want`, keeping every event in `seen`.
async fn next(
    rx: &mut mpsc::Receiver<Event>,
    seen: &mut Vec<Event>,
    name: &str,
    what: &str,
    want: impl Fn(&Event) -> bool,
) -> Event {
    let r = tokio::time::timeout(BOUND, async {
        loop {
            match rx.recv().await {
                Some(ev) => {
                    seen.push(ev.clone());
                    if want(&ev) {
                        return Some(ev);
                    }
                }
                None => return None,
            }
        }
    })
    .await;
    match r {
        Ok(Some(ev)) => ev,
        Ok(None) => panic!("{name}: the stream ended before {what}: {seen:?}"),
        Err(_) => panic!("{name}: no {what} within {BOUND:?}: {seen:?}"),
    }
}

/// A case for a live backend of the kind `make` builds (for a cluster), with an announcing
/// peer and a node of another cluster next to it.
fn live_case(
    name: &'static str,
    announce_self: bool,
    make: impl Fn(&str) -> Box<dyn Discovery>,
) -> Case {
    let cluster = format!("conf-{}", std::process::id());
    let me = announce_self.then(|| announcement(&cluster, 7410, &["z"]));
    let peer = announcement(&cluster, 7411, &["a", "b"]);
    let other = announcement("another-cluster", 7412, &["a"]);
    Case {
        backend: make(&cluster),
        name,
        announce: me,
        expect: Some(Expect {
            addr: Box::new(move |a| a == SocketAddr::from(([127, 0, 0, 1], 7411))),
            node_id: Some(peer.node_id),
            announcement: Some(peer),
            foreign: Some(other),
        }),
        ends_by_itself: false,
        peer: Some(make(&cluster)),
        foreign: Some(make("another-cluster")),
    }
}

#[tokio::test]
async fn none_conforms() {
    check(Case {
        backend: build(Kind::None, &Common::new("conformance")),
        name: "none",
        announce: None,
        expect: None,
        ends_by_itself: true,
        peer: None,
        foreign: None,
    })
    .await;
}

#[tokio::test]
async fn static_conforms() {
    check(Case {
        backend: build(
            Kind::Static,
            &Common::new("conformance").peers(vec!["127.0.0.1:7401".into()]),
        ),
        name: "static",
        announce: None,
        expect: Some(Expect {
            addr: Box::new(|a| a == SocketAddr::from(([127, 0, 0, 1], 7401))),
            node_id: None,
            announcement: None,
            foreign: None,
        }),
        ends_by_itself: true,
        peer: None,
        foreign: None,
    })
    .await;
}

#[tokio::test]
async fn dns_conforms() {
    check(Case {
        backend: build(
            Kind::Dns {
                name: "localhost".into(),
                port: 7402,
            },
            &Common::new("conformance").interval(Duration::from_millis(100)),
        ),
        name: "dns",
        announce: None,
        expect: Some(Expect {
            addr: Box::new(|a| a.ip().is_loopback() && a.port() == 7402),
            node_id: None,
            announcement: None,
            foreign: None,
        }),
        ends_by_itself: false,
        peer: None,
        foreign: None,
    })
    .await;
}

/// The udp backends of this suite share a port no other test of the crate uses.
fn udp_port() -> u16 {
    29_000 + (std::process::id() % 1000) as u16
}

#[tokio::test]
async fn udp_conforms_as_a_client_and_as_an_announcing_node() {
    for announce_self in [false, true] {
        // On loopback only (the backend's default interface, as a node listening there).
        let make = |cluster: &str| {
            let common = Common::new(cluster)
                .interfaces(Interfaces::default())
                .udp_port(udp_port())
                .interval(Duration::from_millis(100));
            build(Kind::Udp, &common)
        };
        check(live_case("udp", announce_self, make)).await;
    }
}

#[test]
fn mdns_conforms_as_a_client_and_as_an_announcing_node() {
    if !harness::netns::inside("conformance::mdns_conforms_as_a_client_and_as_an_announcing_node") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for announce_self in [false, true] {
            let make = |cluster: &str| {
                build(
                    Kind::Mdns,
                    &Common::new(cluster).interfaces(Interfaces::default()),
                )
            };
            check(live_case("mdns", announce_self, make)).await;
        }
    });
}
