//! Tests of the `udp` backend on the loopback interface only: every socket here sends with
//! `IP_MULTICAST_IF` = 127.0.0.1 and TTL 1, so nothing leaves the machine. Each test uses its
//! own port and cluster, so tests running at once do not hear each other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU16, Ordering};

use socket2::{Domain, Protocol, Socket, Type};

use super::*;
use crate::start_all;

/// A hang guard only: the machine may be slow, nothing asserts on timing.
const WAIT: Duration = Duration::from_secs(20);

/// A port of its own for each test (and each test process).
fn test_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let base = 30_000 + (std::process::id() % 1000) as u16 * 30;
    base + n % 30
}

fn cluster(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), test_port())
}

fn announcement(cluster: &str, port: u16, types: &[&str]) -> Announcement {
    Announcement {
        cluster: cluster.into(),
        node_id: NodeId::random(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        types: types.iter().map(|t| t.to_string()).collect(),
        capacity: 3,
    }
}

struct Started {
    events: mpsc::Receiver<Event>,
    stats: Arc<Stats>,
    stopped: CancellationToken,
    shutdown: CancellationToken,
}

fn start(config: Config, announce: Option<Announcement>) -> Started {
    let udp = Udp::new(config);
    let stats = udp.stats();
    let stopped = udp.stopped();
    let shutdown = CancellationToken::new();
    let events = start_all(vec![Box::new(udp)], announce, shutdown.clone()).unwrap();
    Started {
        events,
        stats,
        stopped,
        shutdown,
    }
}

fn loopback(cluster: &str, port: u16) -> Config {
    Config::new(cluster)
        .port(port)
        .interval(Duration::from_millis(200))
}

async fn wait_for(
    rx: &mut mpsc::Receiver<Event>,
    what: &str,
    want: impl Fn(&Event) -> bool,
) -> Event {
    let found = tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Some(ev) if want(&ev) => return ev,
                Some(_) => continue,
                None => panic!("the event stream ended while waiting for {what}"),
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn discovered(id: NodeId) -> impl Fn(&Event) -> bool {
    move |ev| matches!(ev, Event::Discovered(p) if p.node_id == Some(id))
}

fn lost(id: NodeId) -> impl Fn(&Event) -> bool {
    move |ev| matches!(ev, Event::Lost { node_id: Some(n), .. } if *n == id)
}

/// A raw socket that sends to the group on the loopback interface only.
fn raw_sender() -> std::net::UdpSocket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    s.set_multicast_ttl_v4(1).unwrap();
    s.set_multicast_loop_v4(true).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.into()
}

fn group(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(DEFAULT_GROUP, port)
}

#[tokio::test]
async fn two_nodes_find_each_other_another_cluster_is_ignored_and_leaving_is_lost() {
    let port = test_port();
    let c = cluster("pair");
    let a_ann = announcement(&c, 41001, &["a"]);
    let b_ann = announcement(&c, 41002, &["b", "c"]);
    let x_ann = announcement(&cluster("other"), 41003, &["a"]);
    let mut a = start(loopback(&c, port), Some(a_ann.clone()));
    let mut b = start(loopback(&c, port), Some(b_ann.clone()));
    let x_cluster = x_ann.cluster.clone();
    let mut x = start(loopback(&x_cluster, port), Some(x_ann.clone()));

    let Event::Discovered(seen_b) =
        wait_for(&mut a.events, "A finds B", discovered(b_ann.node_id)).await
    else {
        unreachable!()
    };
    assert_eq!(seen_b.addr, b_ann.addr);
    assert_eq!(seen_b.types, Some(b_ann.types.clone()));
    assert_eq!(seen_b.capacity, Some(3));
    assert_eq!(seen_b.source, "udp");
    wait_for(&mut b.events, "B finds A", discovered(a_ann.node_id)).await;

    // X's beacons reach A and B and are counted as foreign, never reported.
    wait_until("A hears X's beacons", || a.stats.snapshot().foreign >= 2).await;
    wait_until("X hears A's beacons", || x.stats.snapshot().foreign >= 2).await;
    while let Ok(ev) = a.events.try_recv() {
        assert!(
            !discovered(x_ann.node_id)(&ev),
            "A reported another cluster's node: {ev:?}"
        );
    }
    if let Ok(ev) = x.events.try_recv() {
        panic!("X found a node of another cluster: {ev:?}");
    }
    assert!(
        a.stats.snapshot().own >= 1,
        "A hears its own beacons back (multicast loop)"
    );

    // B shuts down: its leaving beacon makes A report it lost.
    b.shutdown.cancel();
    tokio::time::timeout(WAIT, b.stopped.cancelled())
        .await
        .unwrap();
    wait_for(&mut a.events, "A loses B", lost(b_ann.node_id)).await;
    assert_eq!(a.stats.snapshot().malformed, 0);

    a.shutdown.cancel();
    x.shutdown.cancel();
    tokio::time::timeout(WAIT, a.stopped.cancelled())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, x.stopped.cancelled())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_query_is_answered_at_once_without_waiting_an_interval() {
    let port = test_port();
    let c = cluster("query");
    let serving = announcement(&c, 41011, &["a"]);
    // Announces on start, then not for an hour: only an answer to a query can reach B.
    let a = start(
        Config::new(&c)
            .port(port)
            .interval(Duration::from_secs(3600)),
        Some(serving.clone()),
    );
    // Let A's start announce pass before B exists.
    wait_until("A sent its first announce", || a.stats.snapshot().sent >= 2).await;
    let mut b = start(loopback(&c, port), None);
    wait_for(
        &mut b.events,
        "the client finds A",
        discovered(serving.node_id),
    )
    .await;
    assert!(a.stats.snapshot().queries >= 1);
    a.shutdown.cancel();
    b.shutdown.cancel();
}

#[tokio::test]
async fn a_silent_peer_is_lost_after_three_of_its_intervals() {
    let port = test_port();
    let c = cluster("silent");
    let mut a = start(loopback(&c, port), None);
    wait_until("A is listening", || a.stats.snapshot().sent >= 1).await;
    // One announce of a peer beaconing every 100 ms, then silence (as after SIGKILL).
    let peer = NodeId::random();
    let bytes = Beacon {
        kind: beacon::Kind::Announce,
        cluster: c.clone(),
        node_id: peer,
        interval_ms: 100,
        addr: Some("127.0.0.1:41021".parse().unwrap()),
        types: vec!["a".into()],
        capacity: 1,
    }
    .encode()
    .unwrap();
    raw_sender().send_to(&bytes, group(port)).unwrap();
    wait_for(&mut a.events, "A finds the peer", discovered(peer)).await;
    wait_for(&mut a.events, "A loses the silent peer", lost(peer)).await;
    assert_eq!(a.stats.snapshot().lost, 1);
    a.shutdown.cancel();
}

#[tokio::test]
async fn garbage_and_other_versions_are_counted_and_ignored() {
    let port = test_port();
    let c = cluster("garbage");
    let mut a = start(loopback(&c, port), None);
    wait_until("A is listening", || a.stats.snapshot().sent >= 1).await;
    let raw = raw_sender();
    let mut v2 = Beacon {
        kind: beacon::Kind::Announce,
        cluster: c.clone(),
        node_id: NodeId::random(),
        interval_ms: 100,
        addr: Some("127.0.0.1:41031".parse().unwrap()),
        types: vec![],
        capacity: 1,
    }
    .encode()
    .unwrap();
    v2[4] = 9;
    // Datagrams can be lost: resend until counted (bounded by the wait).
    wait_until("garbage counted", || {
        raw.send_to(b"\x00garbage", group(port)).unwrap();
        raw.send_to(&[0u8; MAX_BEACON + 100], group(port)).unwrap();
        raw.send_to(&v2, group(port)).unwrap();
        let s = a.stats.snapshot();
        s.malformed >= 2 && s.unsupported >= 1
    })
    .await;
    assert!(a.events.try_recv().is_err(), "nothing reported");
    a.shutdown.cancel();
}

#[tokio::test]
async fn a_client_ends_when_its_events_are_dropped() {
    let port = test_port();
    let a = start(loopback(&cluster("drop"), port), None);
    let Started {
        events, stopped, ..
    } = a;
    drop(events);
    // Without receiver and without an announcement the backend has nothing to do.
    tokio::time::timeout(WAIT, stopped.cancelled())
        .await
        .unwrap();
}

#[test]
fn bad_settings_are_refused_at_start() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let try_start = |config: Config, announce: Option<Announcement>| {
        rt.block_on(async {
            start_all(
                vec![Box::new(Udp::new(config))],
                announce,
                CancellationToken::new(),
            )
            .map(|_| ())
        })
    };
    let err = try_start(Config::new("c").group(Ipv4Addr::new(10, 0, 0, 1)), None).unwrap_err();
    assert!(err.to_string().contains("not a multicast group"), "{err}");
    let err = try_start(Config::new("c").interval(Duration::ZERO), None).unwrap_err();
    assert!(err.to_string().contains("interval"), "{err}");
    let err = try_start(Config::new("c"), Some(announcement("d", 1, &["a"]))).unwrap_err();
    assert!(err.to_string().contains("cluster"), "{err}");
    let err = try_start(
        Config::new("c").interfaces(Interfaces::Name("no-such-if0".into())),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no-such-if0"), "{err}");
    let err = try_start(
        Config::new("c").interfaces(Interfaces::Addr(Ipv4Addr::new(192, 0, 2, 77))),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("192.0.2.77"), "{err}");
    let long = Announcement {
        cluster: "c".into(),
        types: vec!["t".repeat(300)],
        ..announcement("c", 1, &[])
    };
    let err = try_start(Config::new("c"), Some(long)).unwrap_err();
    assert!(matches!(err, Error::BeaconTooLarge { .. }), "{err}");
}

#[test]
fn interfaces_parse_and_follow_the_listen_address() {
    assert_eq!("all".parse::<Interfaces>().unwrap(), Interfaces::All);
    assert_eq!(
        "10.0.0.5".parse::<Interfaces>().unwrap(),
        Interfaces::Addr(Ipv4Addr::new(10, 0, 0, 5))
    );
    assert_eq!(
        "eth0".parse::<Interfaces>().unwrap(),
        Interfaces::Name("eth0".into())
    );
    for bad in ["", "a/b", "much-too-long-interface-name", "fe80::1"] {
        assert!(bad.parse::<Interfaces>().is_err(), "{bad:?}");
    }
    for s in ["all", "10.0.0.5", "eth0"] {
        assert_eq!(s.parse::<Interfaces>().unwrap().to_string(), s);
    }
    let f = |s: &str| Interfaces::for_listen(s.parse().unwrap());
    assert_eq!(f("127.0.0.1:7400"), Interfaces::Addr(Ipv4Addr::LOCALHOST));
    assert_eq!(f("[::1]:7400"), Interfaces::Addr(Ipv4Addr::LOCALHOST));
    assert_eq!(
        f("10.1.2.3:7400"),
        Interfaces::Addr(Ipv4Addr::new(10, 1, 2, 3))
    );
    assert_eq!(f("0.0.0.0:7400"), Interfaces::All);
    assert_eq!(f("[::]:7400"), Interfaces::All);
    assert_eq!(f("[2001:db8::1]:7400"), Interfaces::All);
    assert_eq!(Interfaces::default(), Interfaces::Addr(Ipv4Addr::LOCALHOST));
}

#[tokio::test]
async fn keyed_nodes_only_hear_beacons_sealed_with_their_key() {
    let port = test_port();
    let c = cluster("keyed");
    let key = ClusterKey::generate();
    let keyed_a = announcement(&c, 7001, &["a"]);
    let keyed_b = announcement(&c, 7002, &["b"]);
    let other_key = announcement(&c, 7003, &["c"]);
    let no_key = announcement(&c, 7004, &["d"]);
    let mut a = start(
        loopback(&c, port).key(Some(key.clone())),
        Some(keyed_a.clone()),
    );
    let _b = start(
        loopback(&c, port).key(Some(key.clone())),
        Some(keyed_b.clone()),
    );
    let _o = start(
        loopback(&c, port).key(Some(ClusterKey::generate())),
        Some(other_key.clone()),
    );
    let _n = start(loopback(&c, port), Some(no_key.clone()));
    wait_for(
        &mut a.events,
        "the node with the same key",
        discovered(keyed_b.node_id),
    )
    .await;
    // Beacons of the other key and of the keyless node fail the MAC and are counted.
    wait_until("beacons without a valid MAC are counted", || {
        a.stats.snapshot().unauthenticated >= 2
    })
    .await;
    // A few more intervals: still nobody but b.
    tokio::time::sleep(Duration::from_millis(600)).await;
    while let Ok(ev) = a.events.try_recv() {
        if let Event::Discovered(p) = ev {
            assert_eq!(
                p.node_id,
                Some(keyed_b.node_id),
                "only b may be found: {p:?}"
            );
        }
    }
    a.shutdown.cancel();
}
