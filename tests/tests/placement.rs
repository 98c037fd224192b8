//! Placement against real `serve` processes: the costliest ready task is assigned first, a
//! task's own timeout and retries override the run's, the faster of two nodes gets the tasks
//! of a strict run, a shrunk capacity is honoured, and two coordinators share one node in
//! turn.
//!
//! Order and placement are checked on the `--json` events, on which node ran what, and on
//! the order in which a shared node started tasks; never by wall-clock timing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

use tests::{events_named, poll_until, run_in, shell_quote, spawn_in, Serve, TestDir, WAIT};

#[test]
fn order_none_assigns_the_long_task_at_the_end_of_the_file_first() {
    // The case: 10 short tasks then one 10 times longer, on two nodes of capacity 1.
    // In file order the long one starts last and stretches the run.
    let dir = TestDir::new();
    let mut text: String = (1..=10).map(|i| format!("a{i} -- 0.1\n")).collect();
    text.push_str("a11 cost 10 -- 1\n");
    dir.write("tasks.txt", &text);
    let nodes: Vec<Serve> = (0..2)
        .map(|_| Serve::types("a", &["--capacity", "1", "--handler", "a=sleep {args}"]))
        .collect();
    let mut args = vec!["run", "tasks.txt", "--order", "none", "--json"];
    let peers: Vec<String> = nodes.iter().map(Serve::peer).collect();
    for p in &peers {
        args.extend(["--peer", p]);
    }
    let out = run_in(dir.path(), &args);
    out.assert_code(0);
    let events = out.json();
    let assigned: Vec<&str> = events_named(&events, "task_assigned")
        .iter()
        .map(|e| e["task"].as_str().unwrap())
        .collect();
    assert_eq!(assigned.len(), 11, "{}", out.describe());
    assert_eq!(assigned[0], "a11", "the costliest first: {assigned:?}");
    let short: Vec<String> = (1..=10).map(|i| format!("a{i}")).collect();
    assert_eq!(assigned[1..], short, "then file order: {assigned:?}");
}

#[test]
fn a_tasks_own_timeout_and_retries_override_the_runs() {
    // The run allows 1 h and no retry; a1 has 1 s of its own and fails (once, no retry),
    // a2 has the run's timeout and 2 retries of its own, failing twice then succeeding.
    let dir = TestDir::new();
    let marks = dir.path().to_str().unwrap();
    dir.write("tasks.txt", "a1 timeout 1s -- 30\nb1 retries 2\n");
    let b = format!(
        "b=n=$(cat {marks}/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > {marks}/n; [ $n -ge 3 ]"
    );
    let node = Serve::types(
        "a,b",
        &[
            "--capacity",
            "2",
            "--handler",
            "a=sleep {args}",
            "--handler",
            &b,
        ],
    );
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--order",
            "none",
            "--keep-going",
            "--json",
            "--peer",
            &node.peer(),
        ],
    );
    out.assert_code(1);
    let events = out.json();
    let failed: Vec<&str> = events_named(&events, "task_failed")
        .iter()
        .map(|e| e["task"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["a1"], "{}", out.describe());
    let done = events_named(&events, "task_completed");
    let b1 = done
        .iter()
        .find(|e| e["task"] == "b1")
        .unwrap_or_else(|| panic!("b1 did not succeed\n{}", out.describe()));
    assert_eq!(b1["attempt"], 3, "{b1}");
    let a1_attempts = events_named(&events, "task_assigned")
        .iter()
        .filter(|e| e["task"] == "a1")
        .count();
    assert_eq!(a1_attempts, 1, "no retry for a1");
}

#[test]
fn a_bad_cost_is_reported_at_its_position_with_exit_2() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\na2 cost 0\n");
    let out = run_in(dir.path(), &["run", "tasks.txt", "--discovery", "none"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("tasks.txt:2:9: bad cost \"0\""),
        "{}",
        out.describe()
    );
}

/// The tasks each node ran (succeeded on), by node id, from a run's `--json` events.
fn ran_on(events: &[serde_json::Value], node: &Serve) -> usize {
    let id = node.node_id.clone().expect("the node printed its id");
    events_named(events, "task_completed")
        .iter()
        .filter(|e| e["node"] == id.as_str())
        .count()
}

#[test]
fn in_strict_order_the_faster_node_runs_most_tasks() {
    // One node sleeps 10 ms per task, the other 300 ms: after one measurement each, the
    // slow node gets only probes (one start in 16) - whatever the machine's load, it stays
    // many times slower.
    let dir = TestDir::new();
    let text: String = (1..=24).map(|i| format!("a{i}\n")).collect();
    dir.write("tasks.txt", &text);
    let fast = Serve::types("a", &["--capacity", "1", "--handler", "a=sleep 0.01"]);
    let slow = Serve::types("a", &["--capacity", "1", "--handler", "a=sleep 0.3"]);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--peer",
            &fast.peer(),
            "--peer",
            &slow.peer(),
        ],
    );
    out.assert_code(0);
    let events = out.json();
    let (f, s) = (ran_on(&events, &fast), ran_on(&events, &slow));
    assert_eq!(f + s, 24, "{}", out.describe());
    // Its first measurement, and at most two probes (24 / 16), with room for one more.
    assert!(s <= 4, "the slow node ran {s} of 24\n{}", out.describe());
}

fn kill(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stdin(Stdio::null())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Shrinks `node` (capacity 2) to 1 with SIGUSR2 and waits until it says so.
fn shrink_to_one(node: &Serve) {
    kill("USR2", node.pid());
    assert!(
        node.stdout
            .wait_for(WAIT, |l| l.trim() == "capacity 1")
            .is_some(),
        "{}",
        node.stderr.text()
    );
}

#[test]
fn a_node_reports_a_shrunk_capacity_before_any_result_of_a_new_connection() {
    // A raw coordinator sends its `Hello` and an assignment at once: the node's first
    // `Load` (capacity 1, below the handshake's 2) must come before the task's `Started`
    // and `Completed`, or a run may take the handshake's capacity for the node's after
    // its first result. Several connections, since a race would lose only some of them.
    use p2p_core::Message;
    use tests::{Received, WireClient};
    let node = Serve::types("a", &["--capacity", "2", "--handler", "a=sleep 0.02"]);
    shrink_to_one(&node);
    for round in 0..8 {
        let mut c = WireClient::connect(node.addr);
        let mut bytes = p2p_core::testing::frame(&Message::Hello(tests::hello("default")));
        bytes.extend(p2p_core::testing::frame(&Message::Assign(
            p2p_core::testing::assign(1),
        )));
        c.send_raw(&bytes).unwrap();
        let mut seen = Vec::new();
        let load = loop {
            match c.recv(WAIT) {
                Received::Msg(Message::Load(l)) => break l,
                Received::Msg(m @ (Message::Started { .. } | Message::Completed(_))) => {
                    panic!("round {round}: {m:?} before any Load (after {seen:?})")
                }
                Received::Msg(m) => seen.push(format!("{m:?}")),
                other => panic!("round {round}: {other:?} after {seen:?}"),
            }
        };
        assert_eq!(load.capacity, 1, "round {round}: {load:?}");
        c.expect_msg(WAIT, "Completed", |m| matches!(m, Message::Completed(_)));
    }
}

#[test]
fn a_shrunk_capacity_is_honoured_by_the_run_and_grows_back() {
    let dir = TestDir::new();
    let log = dir.join("log");
    let handler = format!(
        "a=echo start >> {log}; sleep 0.2; echo end >> {log}",
        log = shell_quote(log.to_str().unwrap())
    );
    dir.write("tasks.txt", "a1\na2\na3\na4\na5\n");
    let mut node = Serve::types("a", &["--capacity", "2", "--handler", &handler]);
    shrink_to_one(&node);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--order",
            "none",
            "--json",
            "--peer",
            &node.peer(),
        ],
    );
    out.assert_code(0);
    // The node runs one at a time.
    let lines = std::fs::read_to_string(&log).unwrap();
    let expected: Vec<&str> = ["start", "end"].repeat(5);
    assert_eq!(lines.lines().collect::<Vec<_>>(), expected);
    // The run honours the capacity its node reports: until the first report it may assume
    // the handshake's (2), but from the first result on it has one in flight at a time.
    // In flight: by task, so an assignment the link refused (the node's `Load` shrank its
    // capacity first) and made again counts once.
    let mut in_flight = std::collections::HashSet::new();
    let mut any_result = false;
    for e in out.json() {
        let task = e["task"].as_str().unwrap_or_default().to_owned();
        match e["event"].as_str() {
            Some("task_assigned") => {
                in_flight.insert(task);
                let limit = if any_result { 1 } else { 2 };
                assert!(
                    in_flight.len() <= limit,
                    "{} in flight on capacity 1\n{}",
                    in_flight.len(),
                    out.describe()
                );
            }
            Some("task_completed") => {
                in_flight.remove(&task);
                any_result = true;
            }
            _ => {}
        }
    }
    // Grown back: both slots are used again.
    kill("USR1", node.pid());
    assert!(node
        .stdout
        .wait_for(WAIT, |l| l.trim() == "capacity 2")
        .is_some());
    std::fs::remove_file(&log).unwrap();
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--order",
            "none",
            "--json",
            "--peer",
            &node.peer(),
        ],
    );
    out.assert_code(0);
    let lines = std::fs::read_to_string(&log).unwrap();
    assert!(
        lines.starts_with("start\nstart\n"),
        "two at once again: {lines}"
    );
    assert!(node.is_alive());
}

#[test]
fn two_coordinators_on_one_node_are_served_in_turn() {
    // One node of capacity 1 logs each task as it starts. A large run (30 tasks) starts;
    // once it has run two, a small one (3 tasks) starts: the node alternates between them,
    // so the small run's tasks start within a few of each other, long before the large
    // run ends, and status shows the attempt that waits.
    let dir = TestDir::new();
    let log = dir.join("started");
    let handler = format!(
        "a=echo {{id}} >> {}; sleep 0.15",
        shell_quote(log.to_str().unwrap())
    );
    let node = Serve::types("a", &["--capacity", "1", "--handler", &handler]);
    let big: String = (1..=30).map(|i| format!("a{i}\n")).collect();
    dir.write("big.txt", &big);
    dir.write("small.txt", "a101\na102\na103\n");
    let started = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let large = spawn_in(
        dir.path(),
        &["run", "big.txt", "--order", "none", "--peer", &node.peer()],
    );
    assert!(
        poll_until(WAIT, || started().len() >= 2),
        "{}",
        node.stderr.text()
    );
    let small = spawn_in(
        dir.path(),
        &[
            "run",
            "small.txt",
            "--order",
            "none",
            "--peer",
            &node.peer(),
        ],
    );
    // While both run, one attempt waits at the node (the other run's), and status says so.
    let waited = poll_until(WAIT, || {
        let out = run_in(dir.path(), &["status", "--json", "--peer", &node.peer()]);
        let nodes = tests::json_lines(&out.stdout);
        nodes
            .first()
            .and_then(|n| n["waiting"].as_u64())
            .is_some_and(|w| w >= 1)
    });
    let small = small.finish();
    small.assert_code(0);
    let large = large.finish();
    large.assert_code(0);
    let order = started();
    assert_eq!(order.len(), 33, "{order:?}");
    let pos: Vec<usize> = ["a101", "a102", "a103"]
        .iter()
        .map(|t| order.iter().position(|x| x == t).unwrap())
        .collect();
    // In turn: at most one task of the large run between two of the small one (a FIFO of
    // deeper queues, or a large run holding every slot, would put many).
    for w in pos.windows(2) {
        assert!(
            w[1] - w[0] <= 3,
            "small run's tasks started at {pos:?} of {order:?}"
        );
    }
    assert!(
        pos[2] < 30,
        "the small run ended before the large one: {order:?}"
    );
    assert!(waited, "status never showed a waiting attempt");
}

#[test]
fn capacity_auto_takes_the_cores_the_load_leaves_and_a_bad_value_is_refused() {
    let node = Serve::types("a", &["--capacity", "auto"]);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let line = node
        .stdout
        .wait_for(WAIT, |l| l.starts_with("node "))
        .unwrap();
    let capacity: usize = line
        .split_whitespace()
        .skip_while(|w| *w != "capacity")
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no capacity in {line:?}"));
    assert!((1..=cores).contains(&capacity), "{line:?} on {cores} cores");
    let out = tests::run(&[
        "serve",
        "--types",
        "a",
        "--capacity",
        "autox",
        "--listen",
        "127.0.0.1:0",
        "--discovery",
        "none",
    ]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("neither a number of tasks nor auto"),
        "{}",
        out.describe()
    );
}
