//! Task costs and per-task limits against real `serve` processes: the costliest ready task
//! is assigned first, and a task's own timeout and retries override the run's.
//!
//! Order is checked on the `task_assigned` events of `--json`, never by wall-clock timing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tests::{events_named, run_in, Serve, TestDir};

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
