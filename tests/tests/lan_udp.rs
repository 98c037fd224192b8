//! UDP discovery on a LAN of network namespaces (see `tests::netns`): every beacon stays
//! inside namespaces this test creates and deletes. Skipped, with a printed reason, where
//! namespaces cannot be created.
//!
//! The backend runs as `p2p-discovery`'s `udp_probe` example (one process per host, default
//! group 239.255.70.80 and port 7450, as a real node would use them), which prints
//! `discovered ID ADDR TYPES CAPACITY` and `lost ID ADDR` lines. The last test runs the real
//! `p2p-node` binary; it waits for the CLI's `--discovery udp`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tests::netns::{Host, Lan, NsProcess};

/// A hang guard only: nothing asserts on timing.
const WAIT: Duration = Duration::from_secs(30);

/// The beacon interval of the probes: short, so the tests are quick.
const INTERVAL_MS: &str = "200";

/// `target/debug/examples/udp_probe`, built once if it is missing or older than the crate's
/// sources would make it (cargo decides).
fn probe_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lives in target/<profile>/deps");
        let path = dir.join("examples").join("udp_probe");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut child = Command::new(cargo)
            .args([
                "build",
                "-q",
                "-p",
                "p2p-discovery",
                "--example",
                "udp_probe",
            ])
            .current_dir(tests::workspace_root())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn cargo build");
        let deadline = Instant::now() + Duration::from_secs(600);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait for cargo") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("cargo build --example udp_probe did not finish in 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            status.success(),
            "cargo build --example udp_probe: {status}"
        );
        assert!(path.exists(), "{} is missing", path.display());
        path
    })
}

/// A `udp_probe` in `host`. `announce` serves `types` at the host's address, port 7400.
fn probe<'a>(host: &'a Host, cluster: &str, types: Option<&str>, extra: &[&str]) -> NsProcess<'a> {
    let mut cmd = host.command(probe_bin());
    cmd.args(["--cluster", cluster, "--interval-ms", INTERVAL_MS])
        .args(["--interface", &host.addr().to_string()])
        .args(["--run-for-ms", "90000"])
        .args(extra)
        .env("RUST_BACKTRACE", "1");
    if let Some(t) = types {
        cmd.args(["--announce", &format!("{}:7400", host.addr()), "--types", t]);
    }
    let mut p = host.start(&mut cmd);
    let started = p.stdout.wait_for(WAIT, |l| l == "started");
    if started.is_none() {
        p.signal("KILL");
        panic!("udp_probe did not start in {}\n{}", host.ns(), p.describe());
    }
    p
}

/// The node id a serving probe printed.
fn node_id(p: &NsProcess) -> String {
    p.stdout
        .wait_for(WAIT, |l| l.starts_with("node "))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        .expect("a serving probe prints its node id")
}

fn wait_line(p: &NsProcess, what: &str, pred: impl Fn(&str) -> bool) -> String {
    p.stdout
        .wait_for(WAIT, pred)
        .unwrap_or_else(|| panic!("no {what} within {WAIT:?}\n{}", p.describe()))
}

/// Stops a probe with SIGTERM and returns its final `stats` line.
fn stop(p: &mut NsProcess) -> String {
    p.signal("TERM");
    let status = p.wait_exit(WAIT).expect("the probe exits on SIGTERM");
    assert!(status.success(), "probe: {status}\n{}", p.describe());
    wait_line(p, "stats", |l| l.starts_with("stats "))
}

fn stat(stats: &str, name: &str) -> u64 {
    stats
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {stats:?}"))
}

#[test]
fn multicast_three_hosts_are_found_another_cluster_is_ignored_and_leavers_are_lost() {
    let Some(lan) = Lan::new(5) else { return };
    let h = lan.hosts();
    // The client first: every server joins while it runs (a node started later is found).
    let mut client = probe(&h[4], "lan", None, &[]);
    let mut servers: Vec<NsProcess> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, t)| probe(&h[i], "lan", Some(t), &[]))
        .collect();
    let mut other = probe(&h[3], "other", Some("a"), &[]);
    let ids: Vec<String> = servers.iter().map(node_id).collect();

    for (i, t) in ["a", "b", "c"].iter().enumerate() {
        let want = format!("discovered {} {}:7400 {t} 1", ids[i], h[i].addr());
        wait_line(&client, &want, |l| l == want);
    }
    // The nodes found each other too.
    wait_line(&servers[0], "server a finds c", |l| {
        l.starts_with(&format!("discovered {}", ids[2]))
    });

    // SIGKILL: no leaving beacon; the client loses it after 3 missed intervals.
    let killed_at = Instant::now();
    servers[1].signal("KILL");
    wait_line(&client, "b lost", |l| {
        l.starts_with(&format!("lost {}", ids[1]))
    });
    eprintln!(
        "a SIGKILLed node was reported lost after {:?}",
        killed_at.elapsed()
    );

    // SIGTERM: the leaving beacon makes it lost at once.
    stop(&mut servers[0]);
    wait_line(&client, "a lost", |l| {
        l.starts_with(&format!("lost {}", ids[0]))
    });

    let other_stats = stop(&mut other);
    let stats = stop(&mut client);
    let lines = client.stdout.snapshot();
    assert!(
        !lines.iter().any(|l| l.contains(&h[3].addr().to_string())),
        "the client reported a node of another cluster:\n{}",
        client.describe()
    );
    assert!(stat(&stats, "foreign") >= 1, "{stats}");
    assert_eq!(stat(&stats, "malformed"), 0, "{stats}");
    assert_eq!(stat(&stats, "discovered"), 3, "{stats}");
    assert!(
        !other
            .stdout
            .snapshot()
            .iter()
            .any(|l| l.starts_with("discovered")),
        "the other cluster's node found nodes of `lan`:\n{}",
        other.describe()
    );
    assert!(stat(&other_stats, "foreign") >= 1, "{other_stats}");
}

#[test]
fn a_query_finds_quiet_nodes_without_waiting_an_interval() {
    let Some(lan) = Lan::new(3) else { return };
    let h = lan.hosts();
    // Servers that announce once at start, then only every hour.
    let quiet = ["--interval-ms", "3600000"];
    let servers: Vec<NsProcess> = (0..2)
        .map(|i| probe(&h[i], "lan", Some("a"), &quiet))
        .collect();
    let ids: Vec<String> = servers.iter().map(node_id).collect();
    let client = probe(&h[2], "lan", None, &[]);
    for (i, id) in ids.iter().enumerate() {
        let want = format!("discovered {id} {}:7400 a 1", h[i].addr());
        wait_line(&client, &want, |l| l == want);
    }
}

#[test]
fn broadcast_mode_works_where_multicast_is_off() {
    let Some(lan) = Lan::new(3) else { return };
    let h = lan.hosts();
    for host in h {
        let out = host.output(
            host.command("ip")
                .args(["link", "set", "eth0", "multicast", "off"]),
            WAIT,
        );
        assert!(out.status.success(), "{out:?}");
    }
    // Multicast mode refuses the interface with a clear error.
    let mut refused = h[0].start(h[0].command(probe_bin()).args([
        "--cluster",
        "lan",
        "--interface",
        &h[0].addr().to_string(),
    ]));
    let status = refused.wait_exit(WAIT).expect("the probe exits");
    assert_eq!(status.code(), Some(1), "{}", refused.describe());
    assert!(
        refused.stderr.text().contains("not multicast-capable"),
        "{}",
        refused.describe()
    );

    let bc = ["--mode", "broadcast"];
    let servers: Vec<NsProcess> = (0..2)
        .map(|i| probe(&h[i], "lan", Some("a,b"), &bc))
        .collect();
    let ids: Vec<String> = servers.iter().map(node_id).collect();
    let mut client = probe(&h[2], "lan", None, &bc);
    for (i, id) in ids.iter().enumerate() {
        let want = format!("discovered {id} {}:7400 a,b 1", h[i].addr());
        wait_line(&client, &want, |l| l == want);
    }
    let stats = stop(&mut client);
    assert_eq!(stat(&stats, "malformed"), 0, "{stats}");
}

/// The scenario with the real binary: three hosts serve a, b and c, a fourth runs the
/// seed's tasks.txt with no `--peer`, and a node of another cluster gets no task.
#[test]
fn p2p_node_runs_the_seed_over_udp_discovery_with_no_peer() {
    let Some(lan) = Lan::new(5) else { return };
    let h = lan.hosts();
    fn serve<'a>(host: &'a Host, types: &str, cluster: &str) -> NsProcess<'a> {
        let mut cmd = host.command(tests::bin());
        cmd.args(["serve", "--types", types, "--cluster", cluster])
            .args(["--listen", &format!("{}:7400", host.addr())])
            .args(["--discovery", "udp", "--insecure"])
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        let p = host.start(&mut cmd);
        let ok = p
            .stdout
            .wait_for(WAIT, |l| l.contains("listening on"))
            .or_else(|| {
                p.stderr
                    .wait_for(Duration::ZERO, |l| l.contains("listening on"))
            });
        assert!(ok.is_some(), "serve did not start\n{}", p.describe());
        p
    }
    let _a = serve(&h[0], "a", "lan");
    let _b = serve(&h[1], "b", "lan");
    let _c = serve(&h[2], "c", "lan");
    let other = serve(&h[3], "a,b,c", "other");

    let dir = tests::TestDir::new();
    let tasks = dir.copy_seed();
    let mut cmd = h[4].command(tests::bin());
    cmd.arg("run")
        .arg(&tasks)
        .args(["--cluster", "lan", "--json"])
        .args(["--discovery", "udp"])
        .args(["--discovery-interface", &h[4].addr().to_string()])
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
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
    // Exactly the three nodes of the cluster were connected; the other cluster's never.
    let other_addr = h[3].addr().to_string();
    let connected = tests::events_named(&events, "connected");
    assert_eq!(connected.len(), 3, "{stdout}");
    for e in &connected {
        let addr = e["addr"].as_str().unwrap_or_default();
        assert!(
            !addr.starts_with(&other_addr),
            "connected to the other cluster: {e}"
        );
    }
    assert!(
        !other.stdout.text().contains("Executing task"),
        "{}",
        other.describe()
    );
}

/// With a cluster key, beacons are sealed: a run with the key finds the keyed nodes over udp
/// and never connects to a node holding another key, whose beacons it ignores.
#[test]
fn keyed_nodes_find_each_other_and_ignore_beacons_of_another_key() {
    let Some(lan) = Lan::new(4) else { return };
    let h = lan.hosts();
    let dir = tests::TestDir::new();
    let keygen = |name: &str| {
        let out = Command::new(tests::bin())
            .args(["keygen", name])
            .current_dir(dir.path())
            .output()
            .expect("run keygen");
        assert!(out.status.success(), "{out:?}");
        dir.path().join(name)
    };
    let key = keygen("cluster.key");
    let other_key = keygen("other.key");
    fn serve<'a>(host: &'a Host, types: &str, key: &Path) -> NsProcess<'a> {
        let mut cmd = host.command(tests::bin());
        cmd.args(["serve", "--types", types, "--cluster", "lan"])
            .args(["--listen", &format!("{}:7400", host.addr())])
            .args(["--discovery", "udp"])
            .arg("--key-file")
            .arg(key)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        let p = host.start(&mut cmd);
        assert!(
            p.stdout
                .wait_for(WAIT, |l| l.contains("listening on"))
                .is_some(),
            "serve did not start\n{}",
            p.describe()
        );
        p
    }
    let _a = serve(&h[0], "a", &key);
    let _bc = serve(&h[1], "b,c", &key);
    let _intruder = serve(&h[2], "a,b,c", &other_key);

    let tasks = dir.copy_seed();
    let mut cmd = h[3].command(tests::bin());
    cmd.arg("run")
        .arg(&tasks)
        .args(["--cluster", "lan", "--json", "--discovery", "udp"])
        .args(["--discovery-interface", &h[3].addr().to_string()])
        .arg("--key-file")
        .arg(&key)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    let out = h[3].output(&mut cmd, tests::RUN_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = tests::json_lines(&stdout);
    assert_eq!(
        tests::events_named(&events, "task_completed").len(),
        tests::SEED_ORDER.len()
    );
    let intruder = h[2].addr().to_string();
    let discovered = tests::events_named(&events, "peer_discovered");
    assert!(!discovered.is_empty(), "{stdout}");
    for e in discovered {
        let addr = e["addr"].as_str().unwrap_or_default();
        assert!(
            !addr.starts_with(&intruder),
            "the other key's beacon was believed: {e}"
        );
    }
}

/// A host that runs a loopback node as well as LAN nodes (any mix, both ways): every node
/// finds those it should. The loopback node's socket, bound to the group with
/// `SO_REUSEPORT` and joined on `lo`, used to take delivery of the LAN socket's beacons, so
/// from that host a run found only some of the LAN's nodes, or none.
#[test]
fn a_host_with_a_loopback_node_still_finds_the_lans_nodes() {
    let Some(lan) = Lan::new(3) else { return };
    let h = lan.hosts();
    // Host 0: a loopback node, then a LAN node and a LAN client (the order of the sockets
    // matters to the kernel: the loopback one is bound first).
    let mut lo_args = vec!["--cluster", "lan", "--interval-ms", INTERVAL_MS];
    lo_args.extend(["--interface", "127.0.0.1", "--run-for-ms", "90000"]);
    lo_args.extend(["--announce", "127.0.0.1:7400", "--types", "z"]);
    let mut cmd = h[0].command(probe_bin());
    cmd.args(&lo_args);
    let lo = h[0].start(&mut cmd);
    wait_line(&lo, "started", |l| l == "started");
    let lo_id = node_id(&lo);
    let lan0 = probe(&h[0], "lan", Some("b"), &[]);
    let lan0_id = node_id(&lan0);
    let client = probe(&h[0], "lan", None, &["--interface", "all"]);
    // Hosts 1 and 2: LAN nodes.
    let servers: Vec<NsProcess> = [1, 2]
        .iter()
        .map(|&i| probe(&h[i], "lan", Some("a"), &[]))
        .collect();
    let ids: Vec<String> = servers.iter().map(node_id).collect();
    // The client on host 0, on every interface, finds both remote nodes, the LAN node of its
    // own host and the loopback node.
    for (i, id) in ids.iter().enumerate() {
        let want = format!("discovered {id} {}:7400 a 1", h[i + 1].addr());
        wait_line(&client, &want, |l| l == want);
    }
    let want = format!("discovered {lan0_id} {}:7400 b 1", h[0].addr());
    wait_line(&client, &want, |l| l == want);
    let want = format!("discovered {lo_id} 127.0.0.1:7400 z 1");
    wait_line(&client, &want, |l| l == want);
    // The LAN node of host 0 finds the remote ones; the remote ones find it.
    for id in &ids {
        wait_line(&lan0, "host 0's LAN node finds a remote one", |l| {
            l.starts_with(&format!("discovered {id}"))
        });
    }
    for s in &servers {
        wait_line(s, "a remote node finds host 0's LAN node", |l| {
            l.starts_with(&format!("discovered {lan0_id}"))
        });
    }
    // The loopback node hears nothing from the LAN (it listens on loopback only).
    assert!(
        !lo.stdout
            .snapshot()
            .iter()
            .any(|l| ids.iter().any(|id| l.contains(id.as_str()))),
        "the loopback node heard the LAN\n{}",
        lo.describe()
    );
}

/// The scenario with the real binary: host 0 serves `z` on loopback (default udp);
/// hosts 1 and 2 serve `a` and `c` on the LAN; from host 0, a run of `a1 c1 z1` over udp
/// discovery finds all three, and `peers` lists all three.
#[test]
fn p2p_node_on_a_host_with_a_loopback_node_runs_over_the_lans_nodes() {
    let Some(lan) = Lan::new(3) else { return };
    let h = lan.hosts();
    fn serve<'a>(host: &'a Host, types: &str, listen: &str) -> NsProcess<'a> {
        let mut cmd = host.command(tests::bin());
        cmd.args(["serve", "--types", types, "--cluster", "lan"])
            .args(["--listen", listen])
            .args(["--discovery", "udp", "--insecure"])
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        let p = host.start(&mut cmd);
        assert!(
            p.stdout
                .wait_for(WAIT, |l| l.contains("listening on"))
                .is_some(),
            "serve did not start\n{}",
            p.describe()
        );
        p
    }
    let _z = serve(&h[0], "z", "127.0.0.1:7400");
    let _a = serve(&h[1], "a", &format!("{}:7400", h[1].addr()));
    let _c = serve(&h[2], "c", &format!("{}:7400", h[2].addr()));
    let dir = tests::TestDir::new();
    let tasks = dir.write("tasks.txt", "a1 c1 z1\n");
    let mut cmd = h[0].command(tests::bin());
    cmd.arg("run")
        .arg(&tasks)
        .args(["--cluster", "lan", "--json", "--discovery", "udp"])
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    let out = h[0].output(&mut cmd, tests::RUN_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = h[0].command(tests::bin());
    cmd.args(["peers", "--cluster", "lan", "--json", "--discovery", "udp"])
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    let out = h[0].output(&mut cmd, tests::RUN_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let listed = tests::json_lines(&stdout);
    assert_eq!(listed.len(), 3, "peers lists only some:\n{stdout}");
}
