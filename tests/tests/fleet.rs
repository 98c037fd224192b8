//! Many serving processes in one run (#20): every node of a fleet given in a peers file is
//! connected once and used, whatever duplicates and dead addresses the list holds; and a
//! list the open-file limit cannot hold is refused up front, naming the limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::{
    bin, data_dir, events_named, isolate, poll_until, shell_quote, spawn_in, ChildGuard, Serve,
    TestDir,
};

/// Serving processes of the fleet: enough to need a peers file, few enough for 2 cores.
const NODES: usize = 64;

/// A loopback port nothing listens on (bound, then let go).
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn a_fleet_in_a_peers_file_with_duplicates_and_dead_addresses_is_all_connected_once_and_used() {
    let dir = TestDir::new();
    // Each task waits (at most 30 s) for the test to open the gate, which it does once every
    // node is connected: each node then holds a task, so every node is used whatever the
    // order in which they connected.
    let gate = dir.join("gate");
    let wait = format!(
        "a=i=0; while [ ! -e {g} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        g = shell_quote(&gate.display().to_string())
    );
    let fleet: Vec<Serve> = (0..NODES)
        .map(|i| {
            let identity = dir.join(&format!("node-{i}.key"));
            let identity = identity.display().to_string();
            Serve::types(
                "a",
                &[
                    "--capacity",
                    "1",
                    "--identity",
                    &identity,
                    "--handler",
                    &wait,
                ],
            )
        })
        .collect();
    // Every node twice (a line each, then all on one line with commas), and three
    // addresses where nothing listens.
    let mut list = String::from("# the fleet\n");
    for s in &fleet {
        list.push_str(&format!("{}\n", s.peer()));
    }
    list.push_str(&fleet.iter().map(Serve::peer).collect::<Vec<_>>().join(","));
    for _ in 0..3 {
        list.push_str(&format!("\n127.0.0.1:{}  # nothing there", dead_port()));
    }
    dir.write("peers.txt", &list);
    let tasks: Vec<String> = (1..=2 * NODES).map(|i| format!("a{i}")).collect();
    dir.write("tasks.txt", &tasks.join(" "));
    let run = spawn_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--order",
            "none",
            "--json",
            "--discovery",
            "none",
            "--discovery-timeout",
            "5s",
            "--peers-file",
            "peers.txt",
        ],
    );
    let connected = || {
        run.stdout
            .snapshot()
            .iter()
            .filter(|l| l.contains("\"event\":\"connected\""))
            .count()
    };
    let all = poll_until(Duration::from_secs(60), || connected() >= NODES);
    std::fs::write(&gate, "").unwrap();
    assert!(
        all,
        "{} of {NODES} connected\n{}",
        connected(),
        run.stderr.text()
    );
    let out = run.finish();
    out.assert_code(0);
    let events = out.json();
    let connected: Vec<&str> = events_named(&events, "connected")
        .iter()
        .map(|e| e["node"].as_str().unwrap())
        .collect();
    let ids: HashSet<&str> = fleet
        .iter()
        .map(|s| s.node_id.as_deref().unwrap())
        .collect();
    let once: HashSet<&str> = connected.iter().copied().collect();
    assert_eq!(
        connected.len(),
        NODES,
        "each node connected once\n{}",
        out.describe()
    );
    assert_eq!(once, ids);
    let done = events_named(&events, "task_completed");
    assert_eq!(done.len(), 2 * NODES, "{}", out.describe());
    let used: HashSet<&str> = done.iter().map(|e| e["node"].as_str().unwrap()).collect();
    assert_eq!(used, ids, "every node ran a task");
    let unreachable = events_named(&events, "peer_unreachable");
    assert_eq!(
        unreachable.len(),
        3,
        "the three dead addresses\n{}",
        out.describe()
    );
}

/// `sh -c 'ulimit FLAGS && exec p2p-node ARGS'` in `dir`, to its end (killed after a minute):
/// its exit code, stdout and stderr (through files, so that a long output never blocks it).
fn under_ulimit(dir: &TestDir, flags: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut line = format!(
        "ulimit {flags} && exec {}",
        shell_quote(&bin().display().to_string())
    );
    for a in args {
        line.push(' ');
        line.push_str(&shell_quote(a));
    }
    line.push_str(" > out.txt 2> err.txt");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &line])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .env_remove("RUST_LOG")
        .env_remove("P2P_KEY_FILE")
        .env("P2P_DATA_DIR", data_dir())
        .env("NO_COLOR", "1");
    isolate(&mut cmd);
    let mut child = ChildGuard::new(cmd.spawn().expect("spawn sh"));
    let status = child
        .wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("{line} hung"));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    (status.code(), read("out.txt"), read("err.txt"))
}

#[test]
fn a_peer_list_the_open_file_limit_cannot_hold_is_refused_up_front_naming_the_limit() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1");
    // 300 addresses where nothing listens: none may be dialled.
    let list: Vec<String> = (0..300).map(|i| format!("127.0.0.1:{}", 1 + i)).collect();
    dir.write("peers.txt", &list.join("\n"));
    let (code, _, err) = under_ulimit(
        &dir,
        "-n 200",
        &[
            "run",
            "tasks.txt",
            "--discovery",
            "none",
            "--peers-file",
            "peers.txt",
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("300 peers need about 364 open files, and the open-file limit (ulimit -n) is 200, hard limit 200"),
        "{err}"
    );
    assert!(!err.contains("cannot reach"), "nothing was dialled: {err}");
}

#[test]
fn run_raises_its_soft_open_file_limit_to_the_hard_one() {
    let hard = hard_nofile();
    if hard.is_some_and(|h| h < 1024) {
        eprintln!("skipping: the hard open-file limit is {hard:?}");
        return;
    }
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1");
    let a = Serve::types("a", &[]);
    // 300 dead addresses and one node: over a soft limit of 200, within the hard one.
    let mut list: Vec<String> = (0..300)
        .map(|_| format!("127.0.0.1:{}", dead_port()))
        .collect();
    list.push(a.peer());
    dir.write("peers.txt", &list.join("\n"));
    let (code, out, err) = under_ulimit(
        &dir,
        "-S -n 200",
        &[
            "run",
            "tasks.txt",
            "--json",
            "--discovery",
            "none",
            "--discovery-timeout",
            "2s",
            "--peers-file",
            "peers.txt",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    // Within the hard limit, no connection ran out of descriptors.
    assert!(!out.contains("Too many open files"), "{out}");
    let events = tests::json_lines(&out);
    assert_eq!(events_named(&events, "task_completed").len(), 1, "{out}");
}

/// The hard open-file limit of this process (a child inherits it).
fn hard_nofile() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}
