//! mDNS (DNS-SD) discovery with the real `p2p-node` binary on a LAN of network namespaces
//! (see `tests::netns`): every mDNS packet, and the membership reports of the `mdns-sd`
//! daemon's start, stay inside namespaces this test creates and deletes. Skipped, with a
//! printed reason, where namespaces cannot be created.
//!
//! - the issue's scenario: three hosts serve a, b and c with `--discovery mdns`, a fourth
//!   runs the seed's tasks.txt with `--discovery mdns` and no `--peer`; a node of another
//!   cluster on the same LAN gets no task;
//! - a node listening on `0.0.0.0` is found at its LAN address;
//! - a standard DNS-SD browser (python `zeroconf`, skipped with the reason when it is not
//!   installed; CI installs it) lists a serving node with its TXT record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tests::netns::{Host, Lan, NsProcess};

/// `p2p-node serve --types TYPES --cluster CLUSTER` at the host's address, port 7400, with
/// mdns discovery (announced on the host's `eth0`, where it listens).
fn serve<'a>(host: &'a Host, types: &str, cluster: &str) -> NsProcess<'a> {
    let listen = format!("{}:7400", host.addr());
    host.serve(&[
        "--types",
        types,
        "--cluster",
        cluster,
        "--listen",
        &listen,
        "--discovery",
        "mdns",
        "--insecure",
    ])
}

#[test]
fn p2p_node_runs_the_seed_over_mdns_discovery_with_no_peer() {
    let Some(lan) = Lan::new(5) else { return };
    let h = lan.hosts();
    let _a = serve(&h[0], "a", "lan");
    let _b = serve(&h[1], "b", "lan");
    let _c = serve(&h[2], "c", "lan");
    let other = serve(&h[3], "a,b,c", "other");

    let dir = tests::TestDir::new();
    let tasks = dir.copy_seed();
    let mut cmd = h[4].p2p_node();
    cmd.arg("run")
        .arg(&tasks)
        .args(["--cluster", "lan", "--json"])
        .args(["--discovery", "mdns"])
        .args(["--discovery-timeout", "20s"]);
    let out = h[4].output(&mut cmd, tests::RUN_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = tests::json_lines(&stdout);
    let done = tests::events_named(&events, "task_completed");
    assert_eq!(done.len(), tests::SEED_ORDER.len(), "{stdout}");
    let order: Vec<&str> = done
        .iter()
        .map(|e| e["task"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(order, tests::SEED_ORDER, "strict order: {stdout}");
    // Found by mdns, and exactly the three nodes of the cluster were connected.
    let found = tests::events_named(&events, "peer_discovered");
    assert!(
        !found.is_empty() && found.iter().all(|e| e["source"] == "mdns"),
        "{stdout}"
    );
    let connected = tests::events_named(&events, "connected");
    let mut addrs: Vec<String> = connected
        .iter()
        .map(|e| e["addr"].as_str().unwrap_or_default().to_string())
        .collect();
    addrs.sort();
    let mut want: Vec<String> = h[..3]
        .iter()
        .map(|x| format!("{}:7400", x.addr()))
        .collect();
    want.sort();
    assert_eq!(addrs, want, "{stdout}");
    assert!(
        !other.stdout.text().contains("Executing task"),
        "{}",
        other.describe()
    );
}

/// A node listening on `0.0.0.0` is announced with each interface's own address: `peers`
/// on another host finds it at its LAN address, with its types, through mdns.
#[test]
fn a_node_listening_on_every_interface_is_found_at_its_lan_address() {
    let Some(lan) = Lan::new(2) else { return };
    let h = lan.hosts();
    let _a = h[0].serve(&[
        "--types",
        "a,b",
        "--cluster",
        "lan",
        "--listen",
        "0.0.0.0:7400",
        "--discovery",
        "mdns",
        "--insecure",
    ]);
    let mut cmd = h[1].p2p_node();
    cmd.args(["peers", "--cluster", "lan", "--json"]).args([
        "--discovery",
        "mdns",
        "--discovery-timeout",
        "5s",
    ]);
    let out = h[1].output(&mut cmd, tests::RUN_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peers = tests::json_lines(&stdout);
    assert_eq!(peers.len(), 1, "{stdout}");
    assert_eq!(
        peers[0]["addr"],
        format!("{}:7400", h[0].addr()),
        "{stdout}"
    );
    assert_eq!(peers[0]["source"], "mdns", "{stdout}");
    assert_eq!(peers[0]["types"], serde_json::json!(["a", "b"]), "{stdout}");
}

/// A DNS-SD browser that prints `found NAME ADDR:PORT key=value...` for each instance of
/// `_p2p-node._tcp.local.` it resolves on the interface with address `argv[1]`, until
/// `argv[2]` instances are found or 20 s passed.
const BROWSER: &str = r#"
import sys, time
from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf

TYPE = "_p2p-node._tcp.local."
found = {}

class Listener(ServiceListener):
    def add_service(self, zc, type_, name):
        found.setdefault(name, None)
    def update_service(self, zc, type_, name):
        found.setdefault(name, None)
    def remove_service(self, zc, type_, name):
        pass

zc = Zeroconf(interfaces=[sys.argv[1]], ip_version=IPVersion.V4Only)
ServiceBrowser(zc, TYPE, Listener())
want = int(sys.argv[2])
deadline = time.time() + 20
printed = set()
while time.time() < deadline and len(printed) < want:
    for name in list(found):
        if name in printed:
            continue
        info = zc.get_service_info(TYPE, name, timeout=2000)
        if info is None:
            continue
        props = " ".join(
            "%s=%s" % (k.decode(), (v or b"").decode()) for k, v in sorted(info.properties.items())
        )
        for addr in info.parsed_addresses():
            print("found %s %s:%d %s" % (name, addr, info.port, props), flush=True)
        printed.add(name)
    time.sleep(0.1)
zc.close()
"#;

/// A DNS-SD browser that prints `added NAME` and `removed NAME` for instances of
/// `_p2p-node._tcp.local.` on the interface with address `argv[1]`, and ends after the first
/// removal or 60 s.
const WATCHER: &str = r#"
import sys, time
from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf

removed = []

class Listener(ServiceListener):
    def add_service(self, zc, type_, name):
        print("added %s" % name, flush=True)
    def update_service(self, zc, type_, name):
        pass
    def remove_service(self, zc, type_, name):
        print("removed %s" % name, flush=True)
        removed.append(name)

zc = Zeroconf(interfaces=[sys.argv[1]], ip_version=IPVersion.V4Only)
ServiceBrowser(zc, "_p2p-node._tcp.local.", Listener())
print("browsing", flush=True)
deadline = time.time() + 60
while time.time() < deadline and not removed:
    time.sleep(0.05)
zc.close()
"#;

/// Whether python3 with the `zeroconf` module can run here; why not otherwise.
fn zeroconf_available() -> Result<(), String> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import zeroconf"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("python3 cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "python3 has no zeroconf module (pip install zeroconf): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[test]
fn a_standard_dns_sd_browser_lists_our_nodes() {
    // The namespaces first, so that P2P_REQUIRE_NETNS fails a run without them.
    let Some(lan) = Lan::new(3) else { return };
    if let Err(why) = zeroconf_available() {
        eprintln!("skipping: {why}");
        return;
    }
    let h = lan.hosts();
    let _a = serve(&h[0], "a,c", "lan");
    let _b = serve(&h[1], "b", "lan");

    let dir = tests::TestDir::new();
    let script = dir.join("browse.py");
    std::fs::write(&script, BROWSER).unwrap();
    let mut cmd = h[2].command("python3");
    cmd.arg(&script).arg(h[2].addr().to_string()).arg("2");
    // A hang guard only (the script itself gives up after 20 s).
    let out = h[2].output(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for (host, types) in [(&h[0], "a,c"), (&h[1], "b")] {
        let line = stdout
            .lines()
            .find(|l| l.contains(&format!(" {}:7400 ", host.addr())))
            .unwrap_or_else(|| {
                panic!(
                    "the browser did not list {}\n{stdout}\n{stderr}",
                    host.addr()
                )
            });
        let fields: Vec<&str> = line.split_whitespace().collect();
        let name = fields.get(1).copied().unwrap_or_default();
        assert!(
            name.starts_with("p2p-node-") && name.ends_with("._p2p-node._tcp.local."),
            "{line}"
        );
        for kv in [
            format!("types={types}"),
            "cluster=lan".to_string(),
            format!("version={}", p2p_core::PROTOCOL_VERSION),
        ] {
            assert!(fields.contains(&kv.as_str()), "{kv} missing: {line}");
        }
        let id = fields
            .iter()
            .find_map(|f| f.strip_prefix("id="))
            .unwrap_or_else(|| panic!("no id: {line}"));
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{line}"
        );
        assert!(fields.iter().any(|f| f.starts_with("capacity=")), "{line}");
    }
}

/// SIGTERM on `serve` unregisters its instance before the process exits: a standard browser
/// sees it removed at once (without the goodbye it would stay until its records expire, 2
/// minutes; the bound below is a hang guard far shorter than that).
#[test]
fn a_node_stopped_with_sigterm_says_goodbye() {
    // The namespaces first, so that P2P_REQUIRE_NETNS fails a run without them.
    let Some(lan) = Lan::new(2) else { return };
    if let Err(why) = zeroconf_available() {
        eprintln!("skipping: {why}");
        return;
    }
    let h = lan.hosts();
    let dir = tests::TestDir::new();
    let script = dir.join("watch.py");
    std::fs::write(&script, WATCHER).unwrap();
    let mut watch_cmd = h[1].command("python3");
    watch_cmd.arg(&script).arg(h[1].addr().to_string());
    let mut watcher = h[1].start(&mut watch_cmd);
    let limit = Duration::from_secs(30);
    assert!(
        watcher
            .stdout
            .wait_for(limit, |l| l == "browsing")
            .is_some(),
        "{}",
        watcher.describe()
    );
    let mut node = serve(&h[0], "a", "lan");
    let added = watcher
        .stdout
        .wait_for(limit, |l| l.starts_with("added p2p-node-"))
        .unwrap_or_else(|| panic!("the browser did not see the node\n{}", watcher.describe()));
    let name = added.trim_start_matches("added ").to_string();

    node.signal("TERM");
    let status = node.wait_exit(limit).expect("serve exits on SIGTERM");
    assert!(status.success(), "{status}\n{}", node.describe());
    let removed = format!("removed {name}");
    assert!(
        watcher.stdout.wait_for(limit, |l| l == removed).is_some(),
        "no goodbye seen\n{}\n{}",
        watcher.describe(),
        node.describe()
    );
    let _ = watcher.wait_exit(limit);
}
