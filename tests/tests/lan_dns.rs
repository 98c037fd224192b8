//! `dns:NAME[:PORT]` discovery with the real `p2p-node` binary on a LAN of network namespaces
//! (see `tests::netns`). The name resolves to several addresses through a hosts file of the
//! running host only (`/etc/netns/NS/hosts`, bind-mounted over `/etc/hosts` by
//! `ip netns exec`, deleted with the LAN); the namespace has no route off the LAN, so no
//! query can leave it. Skipped, with a printed reason, where namespaces cannot be created.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tests::netns::{self, Host, Lan, NsProcess};

/// The name the hosts file gives three addresses (`.test`: reserved, RFC 6761).
const NAME: &str = "p2p-nodes.test";

fn serve<'a>(host: &'a Host, types: &str) -> NsProcess<'a> {
    let listen = format!("{}:7400", host.addr());
    host.serve(&[
        "--types",
        types,
        "--cluster",
        "lan",
        "--listen",
        &listen,
        "--discovery",
        "none",
        "--insecure",
    ])
}

#[test]
fn a_name_with_three_addresses_finds_three_nodes_and_the_seed_runs() {
    let Some(lan) = Lan::new(4) else { return };
    let h = lan.hosts();
    let _a = serve(&h[0], "a");
    let _b = serve(&h[1], "b");
    let _c = serve(&h[2], "c");

    let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for x in &h[..3] {
        hosts.push_str(&format!("{} {NAME}\n", x.addr()));
    }
    h[3].etc_file("hosts", &hosts);
    // The hosts file is the one the run sees, and the name has all three addresses.
    let out = h[3].output(
        h[3].command("getent").args(["ahosts", NAME]),
        std::time::Duration::from_secs(30),
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    for x in &h[..3] {
        assert!(listed.contains(&x.addr().to_string()), "{listed}");
    }

    let dir = tests::TestDir::new();
    let tasks = dir.copy_seed();
    let mut cmd = h[3].p2p_node();
    cmd.arg("run")
        .arg(&tasks)
        .args(["--cluster", "lan", "--json"])
        .args(["--discovery", &format!("dns:{NAME}:7400")])
        .args(["--discovery-timeout", "20s"]);
    let out = h[3].output(&mut cmd, tests::RUN_TIMEOUT);
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

    let mut want: Vec<String> = h[..3]
        .iter()
        .map(|x| format!("{}:7400", x.addr()))
        .collect();
    want.sort();
    let sorted = |name: &str, field: &str| {
        let mut v: Vec<String> = tests::events_named(&events, name)
            .iter()
            .map(|e| e[field].as_str().unwrap_or_default().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(sorted("peer_discovered", "addr"), want, "{stdout}");
    assert!(
        tests::events_named(&events, "peer_discovered")
            .iter()
            .all(|e| e["source"] == "dns"),
        "{stdout}"
    );
    assert_eq!(sorted("connected", "addr"), want, "{stdout}");
    // Every node did work: each type ran on its own node.
    let nodes: std::collections::BTreeSet<&str> = done
        .iter()
        .map(|e| e["node"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(nodes.len(), 3, "{stdout}");
}

#[test]
fn the_hosts_file_is_deleted_with_the_lan_also_on_panic() {
    let mut dirs = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Some(lan) = Lan::new(1) else { return };
        lan.host(0).etc_file("hosts", "10.0.0.1 x.test\n");
        dirs.push(std::path::Path::new("/etc/netns").join(lan.host(0).ns()));
        assert!(dirs[0].join("hosts").exists());
        panic!("on purpose");
    }));
    if dirs.is_empty() {
        // Lan::new's panic under P2P_REQUIRE_NETNS was caught above: say it here.
        netns::skip("no namespace was made");
        return;
    }
    assert!(r.is_err());
    assert!(!dirs[0].exists(), "{} is left", dirs[0].display());
}

/// Without namespaces and with P2P_REQUIRE_NETNS=1, the namespace tests fail, also the one
/// that catches its own panic (it passed before: the harness's panic was caught with it).
#[test]
fn without_namespaces_the_tests_fail_under_require_netns() {
    netns::assert_fails_without_namespaces("the_hosts_file_is_deleted_with_the_lan_also_on_panic");
}
