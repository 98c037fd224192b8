//! A serving node's udp discovery under thousands of discovery events: forged announces with
//! random node ids, and peers that restart over and over. The node must keep beaconing and
//! answering queries, so `peers` still finds it.
//!
//! Everything runs in a one-host LAN of network namespaces (see `tests::netns`): the
//! multicast goes to that namespace's own loopback interface and nowhere else. Skipped, with
//! a printed reason, where namespaces cannot be created.
//!
//! Before the fix, the serving node kept the receiver of its discovery events and never read
//! it: after 1,024 events the udp loop waited forever for room, so it stopped beaconing and
//! answering, and the node was never found again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use tests::netns::{Host, Lan};

/// A hang guard only: nothing asserts on timing.
const LIMIT: Duration = Duration::from_secs(120);

/// Sends forged beacons of `cluster` to the default group and port on loopback, from inside
/// `host`: `announces` announces with fresh random node ids, then `restarts` times an
/// announce and a leaving of one more fresh id (a peer that starts and stops).
fn forge(host: &Host, cluster: &str, announces: u32, restarts: u32) {
    const SCRIPT: &str = r#"
import os, socket, struct, sys, time
cluster, announces, restarts = sys.argv[1].encode(), int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
def beacon(kind, node, port):
    b = b"P2PB" + bytes([1, kind]) + node + struct.pack(">II", 3600000, 4)
    b += bytes([len(cluster)]) + cluster
    b += bytes([4]) + socket.inet_aton("127.0.0.1") + struct.pack(">H", port)
    b += bytes([1, 1]) + b"z"
    return b
sent = 0
def send(b):
    global sent
    s.sendto(b, ("239.255.70.80", 7450))
    sent += 1
    # Paced, so the node's socket buffer takes them all rather than the kernel dropping most.
    if sent % 50 == 0:
        time.sleep(0.01)
for i in range(announces):
    send(beacon(1, os.urandom(16), 20000 + i % 20000))
for i in range(restarts):
    node = os.urandom(16)
    send(beacon(1, node, 40000 + i % 20000))
    send(beacon(3, node, 40000 + i % 20000))
print("sent", announces + 2 * restarts)
"#;
    let mut cmd = host.command("python3");
    cmd.args(["-c", SCRIPT, cluster])
        .arg(announces.to_string())
        .arg(restarts.to_string());
    let out = host.output(&mut cmd, LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("sent"),
        "the forger failed: {out:?}"
    );
}

/// `p2p-node peers --json` in `host` over udp: the node ids it lists (none: it exits 1).
fn peers(host: &Host, cluster: &str) -> Vec<String> {
    let mut cmd: Command = host.p2p_node();
    cmd.args([
        "peers",
        "--json",
        "--discovery",
        "udp",
        "--cluster",
        cluster,
    ])
    .args(["--discovery-timeout", "4s", "--discovery-interface", "lo"]);
    let out = host.output(&mut cmd, LIMIT);
    let found: Vec<String> = tests::json_lines(&String::from_utf8_lossy(&out.stdout))
        .iter()
        .filter_map(|v| v["node"].as_str().map(str::to_string))
        .collect();
    assert!(
        out.status.success() || found.is_empty(),
        "peers failed: {out:?}"
    );
    found
}

/// The node id `serve` logged (`node id ...` or `node=...`), from its output.
fn serving_id<'a>(host: &'a Host, cluster: &str) -> (tests::netns::NsProcess<'a>, String) {
    let node = host.serve(&[
        "--types",
        "a",
        "--listen",
        "127.0.0.1:7400",
        "--discovery",
        "udp",
        "--cluster",
        cluster,
    ]);
    // The node's own `peers` entry tells its id; before any flood, it must be found.
    let found = peers(host, cluster);
    assert_eq!(
        found.len(),
        1,
        "the node is found before the flood: {found:?}"
    );
    (node, found[0].clone())
}

#[test]
fn a_serving_node_is_still_found_after_1500_forged_announces() {
    let Some(lan) = Lan::new(1) else { return };
    let h = lan.host(0);
    let (mut node, id) = serving_id(h, "flood");
    forge(h, "flood", 1500, 0);
    let found = peers(h, "flood");
    assert!(
        found.contains(&id),
        "after 1,500 forged announces the node ({id}) is not found: {found:?}"
    );
    node.signal("TERM");
    let status = node.wait_exit(LIMIT).expect("serve exits on SIGTERM");
    assert!(status.success(), "serve: {status}\n{}", node.describe());
}

/// A soak: 2,000 peers that start and stop (an announce and a leaving each, 4,000 events),
/// after 200 announces; the node keeps beaconing through it.
#[test]
fn a_serving_node_is_still_found_after_2000_peer_restarts() {
    let Some(lan) = Lan::new(1) else { return };
    let h = lan.host(0);
    let (mut node, id) = serving_id(h, "churn");
    forge(h, "churn", 200, 2000);
    let found = peers(h, "churn");
    assert!(
        found.contains(&id),
        "after 2,000 peer restarts the node ({id}) is not found: {found:?}"
    );
    node.signal("TERM");
    let status = node.wait_exit(LIMIT).expect("serve exits on SIGTERM");
    assert!(status.success(), "serve: {status}\n{}", node.describe());
}
