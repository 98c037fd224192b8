//! Tests of the `mdns` backend. Those that start an `mdns-sd` daemon run inside a network
//! namespace of their own ([`harness::netns::inside`]), on its loopback interface: the daemon joins the
//! mDNS group on every interface at start, which must not happen on the machine's own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;

use super::*;
use crate::start_all;

/// A hang guard only: nothing asserts on timing.
const WAIT: Duration = Duration::from_secs(30);

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

fn start(cluster: &str, announce: Option<Announcement>) -> Started {
    start_with(Config::new(cluster), announce)
}

fn start_with(config: Config, announce: Option<Announcement>) -> Started {
    let backend = Mdns::new(config);
    let stats = backend.stats();
    let stopped = backend.stopped();
    let shutdown = CancellationToken::new();
    let events = start_all(vec![Box::new(backend)], announce, shutdown.clone()).unwrap();
    Started {
        events,
        stats,
        stopped,
        shutdown,
    }
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

async fn wait_stats(stats: &Stats, what: &str, pred: impl Fn(&Counters) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !pred(&stats.snapshot()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} within {WAIT:?}: {:?}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_peer_is_found_with_its_details_and_lost_on_its_goodbye() {
    if !harness::netns::inside(
        "mdns::tests::a_peer_is_found_with_its_details_and_lost_on_its_goodbye",
    ) {
        return;
    }
    runtime().block_on(async {
        let me = announcement("lab", 7401, &["a", "b"]);
        let mut client = start("lab", None);
        let server = start("lab", Some(me.clone()));
        let found = wait_for(
            &mut client.events,
            "the server",
            |e| matches!(e, Event::Discovered(p) if p.node_id == Some(me.node_id)),
        )
        .await;
        assert_eq!(
            found,
            Event::Discovered(Peer {
                addr: me.addr,
                node_id: Some(me.node_id),
                types: Some(vec!["a".into(), "b".into()]),
                capacity: Some(3),
                source: "mdns",
            })
        );
        // The server's own browser sees its own instance and ignores it.
        wait_stats(&server.stats, "own instance", |c| c.own >= 1).await;
        assert_eq!(server.stats.snapshot().discovered, 0);

        server.shutdown.cancel();
        tokio::time::timeout(WAIT, server.stopped.cancelled())
            .await
            .expect("the server's farewell ends");
        let lost = wait_for(&mut client.events, "the server lost", |e| {
            matches!(e, Event::Lost { .. })
        })
        .await;
        assert_eq!(
            lost,
            Event::Lost {
                addr: me.addr,
                node_id: Some(me.node_id),
                source: "mdns",
            }
        );
        client.shutdown.cancel();
        tokio::time::timeout(WAIT, client.stopped.cancelled())
            .await
            .expect("the client stops");
    });
}

#[test]
fn other_clusters_and_versions_are_ignored_and_counted() {
    if !harness::netns::inside("mdns::tests::other_clusters_and_versions_are_ignored_and_counted") {
        return;
    }
    runtime().block_on(async {
        let mut client = start("lab", None);
        let foreign = start("prod", Some(announcement("prod", 7402, &["a"])));
        // Another version, registered by hand on another daemon of the namespace.
        let other = ServiceDaemon::new().unwrap();
        other.disable_interface(IfKind::IPv6).unwrap();
        let mut props = txt::properties(&announcement("lab", 7403, &["a"]), None).unwrap();
        props[0].1 = "999".into();
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            "future",
            "future.local.",
            "127.0.0.1",
            7403,
            &props[..],
        )
        .unwrap();
        other.register(info).unwrap();
        let ours = announcement("lab", 7404, &["c"]);
        let _ours = start("lab", Some(ours.clone()));

        // The cluster's node is found; by then, or soon after, the others were seen too.
        wait_for(
            &mut client.events,
            "the cluster's node",
            |e| matches!(e, Event::Discovered(p) if p.node_id == Some(ours.node_id)),
        )
        .await;
        wait_stats(&client.stats, "foreign and unsupported", |c| {
            c.foreign >= 1 && c.unsupported >= 1
        })
        .await;
        client.shutdown.cancel();
        let mut rest = Vec::new();
        while let Ok(Some(ev)) = tokio::time::timeout(WAIT, client.events.recv()).await {
            rest.push(ev);
        }
        assert!(
            rest.iter()
                .all(|e| matches!(e, Event::Discovered(p) if p.node_id == Some(ours.node_id))),
            "{rest:?}"
        );
        assert_eq!(
            client.stats.snapshot().discovered,
            1,
            "{:?}",
            client.stats.snapshot()
        );
        foreign.shutdown.cancel();
        let _ = other.shutdown();
    });
}

#[test]
fn with_a_key_only_nodes_holding_it_are_used() {
    if !harness::netns::inside("mdns::tests::with_a_key_only_nodes_holding_it_are_used") {
        return;
    }
    runtime().block_on(async {
        let key = p2p_core::ClusterKey::from_bytes([3; 32]);
        let keyed = |k: &p2p_core::ClusterKey| Config::new("lab").key(Some(k.clone()));
        let mut client = start_with(keyed(&key), None);
        let _wrong = start_with(
            keyed(&p2p_core::ClusterKey::from_bytes([4; 32])),
            Some(announcement("lab", 7405, &["a"])),
        );
        let _open = start("lab", Some(announcement("lab", 7406, &["a"])));
        let good = announcement("lab", 7407, &["a"]);
        let _good = start_with(keyed(&key), Some(good.clone()));
        wait_for(
            &mut client.events,
            "the keyed node",
            |e| matches!(e, Event::Discovered(p) if p.node_id == Some(good.node_id)),
        )
        .await;
        wait_stats(&client.stats, "two unauthenticated services", |c| {
            c.unauthenticated >= 2
        })
        .await;
        client.shutdown.cancel();
        while let Ok(Some(ev)) = tokio::time::timeout(WAIT, client.events.recv()).await {
            assert!(
                matches!(&ev, Event::Discovered(p) if p.node_id == Some(good.node_id)),
                "{ev:?}"
            );
        }
        assert_eq!(client.stats.snapshot().discovered, 1);
    });
}

#[test]
fn a_client_stops_when_its_receiver_is_dropped() {
    if !harness::netns::inside("mdns::tests::a_client_stops_when_its_receiver_is_dropped") {
        return;
    }
    runtime().block_on(async {
        let client = start("lab", None);
        drop(client.events);
        tokio::time::timeout(WAIT, client.stopped.cancelled())
            .await
            .expect("a client without receiver stops");
    });
}

#[test]
fn an_unknown_interface_is_an_error_at_start() {
    // Refused before any daemon starts: safe in the machine's own namespace.
    let rt = runtime();
    for sel in [
        Interfaces::Name("no-such-if0".into()),
        Interfaces::Addr(Ipv4Addr::new(192, 0, 2, 77)),
    ] {
        let backend = Mdns::new(Config::new("lab").interfaces(sel.clone()));
        let err = rt
            .block_on(async { start_all(vec![Box::new(backend)], None, CancellationToken::new()) })
            .unwrap_err();
        assert!(matches!(err, Error::MdnsConfig(_)), "{sel}: {err}");
    }
    let backend = Mdns::new(Config::new("lab"));
    let err = rt
        .block_on(async {
            start_all(
                vec![Box::new(backend)],
                Some(announcement("prod", 7400, &["a"])),
                CancellationToken::new(),
            )
        })
        .unwrap_err();
    assert!(err.to_string().contains("cluster"), "{err}");
}

fn iface(name: &str, ip: &str, loopback: bool) -> if_addrs::Interface {
    let ip: Ipv4Addr = ip.parse().unwrap();
    if_addrs::Interface {
        name: name.into(),
        addr: if_addrs::IfAddr::V4(if_addrs::Ifv4Addr {
            ip,
            netmask: if loopback {
                Ipv4Addr::new(255, 0, 0, 0)
            } else {
                Ipv4Addr::new(255, 255, 255, 0)
            },
            prefixlen: if loopback { 8 } else { 24 },
            broadcast: None,
        }),
        index: Some(1),
        oper_status: if_addrs::IfOperStatus::Up,
        is_p2p: false,
    }
}

#[test]
fn the_selection_follows_the_listen_address() {
    let all = vec![
        iface("lo", "127.0.0.1", true),
        iface("eth0", "10.0.0.5", false),
        iface("eth1", "192.168.1.9", false),
    ];
    let pick =
        |listen: &str| Selection::pick(&all, &Interfaces::for_listen(listen.parse().unwrap()));
    assert_eq!(pick("127.0.0.1:7400").unwrap(), Selection::Loopback);
    assert_eq!(pick("127.0.0.2:7400").unwrap(), Selection::Loopback);
    assert_eq!(pick("[::1]:7400").unwrap(), Selection::Loopback);
    assert_eq!(
        pick("10.0.0.5:7400").unwrap(),
        Selection::Name("eth0".into())
    );
    assert_eq!(pick("0.0.0.0:7400").unwrap(), Selection::All);
    assert!(pick("10.9.9.9:7400").is_err());
    assert_eq!(
        Selection::pick(&all, &Interfaces::Name("eth1".into())).unwrap(),
        Selection::Name("eth1".into())
    );

    let lo = Selection::Loopback;
    assert!(lo.matches(&all[0]) && !lo.matches(&all[1]));
    let eth0 = Selection::Name("eth0".into());
    assert!(!eth0.matches(&all[0]) && eth0.matches(&all[1]) && !eth0.matches(&all[2]));
    assert!(all.iter().all(|i| Selection::All.matches(i)));
}
