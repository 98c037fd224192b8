//! Runs the `udp` discovery backend alone and prints what it finds, one line per event:
//!
//! ```text
//! started
//! discovered NODE_ID ADDR TYPES CAPACITY
//! lost NODE_ID ADDR
//! stats received=.. sent=.. foreign=.. malformed=..
//! stopped
//! ```
//!
//! Used by the network-namespace tests (`tests/tests/lan_udp.rs`) and handy by hand:
//!
//! ```text
//! cargo run -p p2p-discovery --example udp_probe -- --cluster demo --announce 127.0.0.1:7400 --types a
//! ```
//!
//! Options: `--cluster NAME` (default `default`), `--announce ADDR` (announce this TCP
//! address; without it the probe only looks), `--types a,b`, `--capacity N`,
//! `--interface all|ADDR|NAME` (default: where `--announce` listens, else loopback),
//! `--mode multicast|broadcast`, `--port N`, `--interval-ms N`, `--run-for-ms N` (default
//! 60000: the probe always ends by itself). It stops early, sending `leaving`, on SIGTERM or
//! Ctrl-C.
//!
//! Safety: it refuses any interface but loopback unless it runs inside a network namespace
//! made by the workspace's test harness (`ip netns` name starting with `p2pt-`, see
//! `tests/src/netns.rs`), so running it by hand never sends a beacon to a real network.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use p2p_core::NodeId;
use p2p_discovery::udp::{Config, Interfaces, Mode, Udp};
use p2p_discovery::{start_all, Announcement, Discovery, Event};
use tokio_util::sync::CancellationToken;

struct Args {
    cluster: String,
    announce: Option<SocketAddr>,
    types: Vec<String>,
    capacity: u32,
    interface: Option<Interfaces>,
    mode: Mode,
    port: Option<u16>,
    interval: Option<Duration>,
    run_for: Duration,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        cluster: "default".into(),
        announce: None,
        types: Vec::new(),
        capacity: 1,
        interface: None,
        mode: Mode::Multicast,
        port: None,
        interval: None,
        run_for: Duration::from_secs(60),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let bad = |e: &dyn std::fmt::Display| format!("{flag}: {e}");
        match flag.as_str() {
            "--cluster" => a.cluster = value()?,
            "--announce" => a.announce = Some(value()?.parse().map_err(|e| bad(&e))?),
            "--types" => {
                a.types = value()?
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "--capacity" => a.capacity = value()?.parse().map_err(|e| bad(&e))?,
            "--interface" => a.interface = Some(value()?.parse().map_err(|e| bad(&e))?),
            "--mode" => {
                a.mode = match value()?.as_str() {
                    "multicast" => Mode::Multicast,
                    "broadcast" => Mode::Broadcast,
                    other => return Err(format!("--mode {other}: multicast or broadcast")),
                }
            }
            "--port" => a.port = Some(value()?.parse().map_err(|e| bad(&e))?),
            "--interval-ms" => {
                a.interval = Some(Duration::from_millis(
                    value()?.parse().map_err(|e| bad(&e))?,
                ))
            }
            "--run-for-ms" => {
                a.run_for = Duration::from_millis(value()?.parse().map_err(|e| bad(&e))?)
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(a)
}

/// The prefix of the namespaces the workspace's test harness (`tests/src/netns.rs`) makes.
const TEST_NETNS_PREFIX: &str = "p2pt-";

/// The name of the named network namespace (`ip netns`) this process runs in, if any: the
/// entry of `/run/netns` that is the same namespace as `/proc/self/ns/net`.
fn netns_name() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self/ns/net").ok()?;
    std::fs::read_dir("/run/netns")
        .ok()?
        .filter_map(Result::ok)
        .find(|e| {
            std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == me.ino() && m.dev() == me.dev())
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

fn only_loopback(i: &Interfaces) -> bool {
    matches!(i, Interfaces::Addr(ip) if ip.is_loopback())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("udp_probe: {e}");
            return ExitCode::from(2);
        }
    };
    let interfaces = args
        .interface
        .clone()
        .unwrap_or_else(|| match args.announce {
            Some(listen) => Interfaces::for_listen(listen),
            None => Interfaces::Addr(Ipv4Addr::LOCALHOST),
        });
    let in_test_lan = netns_name().is_some_and(|n| n.starts_with(TEST_NETNS_PREFIX));
    if !only_loopback(&interfaces) && !in_test_lan {
        eprintln!(
            "udp_probe: refusing interface {interfaces}: only loopback, or any interface inside \
             a test network namespace (`ip netns exec {TEST_NETNS_PREFIX}...`)"
        );
        return ExitCode::from(2);
    }
    let mut config = Config::new(args.cluster.clone())
        .interfaces(interfaces)
        .mode(args.mode);
    if let Some(p) = args.port {
        config = config.port(p);
    }
    if let Some(i) = args.interval {
        config = config.interval(i);
    }
    let announce = args.announce.map(|addr| Announcement {
        cluster: args.cluster.clone(),
        node_id: NodeId::random(),
        addr,
        types: args.types.clone(),
        capacity: args.capacity,
    });
    if let Some(a) = &announce {
        println!("node {}", a.node_id);
    }
    let udp = Udp::new(config);
    let stats = udp.stats();
    let stopped = udp.stopped();
    let shutdown = CancellationToken::new();
    let backends: Vec<Box<dyn Discovery>> = vec![Box::new(udp)];
    let mut events = match start_all(backends, announce, shutdown.clone()) {
        Ok(rx) => rx,
        Err(e) => {
            eprintln!("udp_probe: {e}");
            return ExitCode::from(1);
        }
    };
    println!("started");
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("udp_probe: cannot watch SIGTERM: {e}");
            return ExitCode::from(1);
        }
    };
    let deadline = tokio::time::sleep(args.run_for);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            ev = events.recv() => match ev {
                Some(Event::Discovered(p)) => println!(
                    "discovered {} {} {} {}",
                    p.node_id.map_or_else(|| "-".to_string(), |n| n.to_string()),
                    p.addr,
                    p.types.map_or_else(|| "-".to_string(), |t| t.join(",")),
                    p.capacity.map_or_else(|| "-".to_string(), |c| c.to_string()),
                ),
                Some(Event::Lost { addr, node_id, .. }) => println!(
                    "lost {} {}",
                    node_id.map_or_else(|| "-".to_string(), |n| n.to_string()),
                    addr
                ),
                Some(_) => {}
                None => break,
            },
        }
    }
    shutdown.cancel();
    // Bounded: the leaving beacons go out at once.
    let _ = tokio::time::timeout(Duration::from_secs(2), stopped.cancelled()).await;
    let s = stats.snapshot();
    println!(
        "stats received={} sent={} send_errors={} foreign={} malformed={} own={} discovered={} lost={}",
        s.received, s.sent, s.send_errors, s.foreign, s.malformed, s.own, s.discovered, s.lost
    );
    println!("stopped");
    ExitCode::SUCCESS
}
