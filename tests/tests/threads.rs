//! `--threads`: the default single-threaded runtime and multi-threaded ones run the seed
//! in order, also between processes that use different settings. (Every other suite runs
//! the default, one thread, including shell handlers and task timeouts.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tests::{events_named, run_in, Serve, TestDir, SEED_ORDER};

/// Runs the seed's `tasks.txt` in `dir` with `--threads threads`, `--json` and `more`
/// flags; checks it succeeds with every task completed in the seed's order, and returns
/// its events.
fn seed_with_threads(dir: &TestDir, threads: &str, more: &[String]) -> Vec<serde_json::Value> {
    let mut args = vec!["--threads", threads, "run", "tasks.txt", "--json"];
    args.extend(more.iter().map(String::as_str));
    let out = run_in(dir.path(), &args);
    out.assert_code(0);
    let events = out.json();
    let ids: Vec<&str> = events_named(&events, "task_completed")
        .iter()
        .map(|e| e["task"].as_str().expect("task id"))
        .collect();
    assert_eq!(ids, SEED_ORDER, "--threads {threads}: {}", out.describe());
    events
}

#[test]
fn the_seed_runs_in_order_with_every_thread_setting_locally() {
    let dir = TestDir::new();
    dir.copy_seed();
    for threads in ["1", "2", "0"] {
        seed_with_threads(&dir, threads, &["--local".to_string()]);
    }
    // Out of range: a usage error, not an abort while starting thousands of threads.
    let out = run_in(
        dir.path(),
        &["--threads", "100000", "run", "tasks.txt", "--local"],
    );
    out.assert_code(2);
    assert!(out.stderr.contains("0..=256"), "{}", out.describe());
}

#[test]
fn single_and_multi_threaded_processes_work_together() {
    let dir = TestDir::new();
    dir.copy_seed();
    // One serving process per setting, and a shell handler on the single-threaded one.
    let nodes = [
        Serve::types("a", &["--threads", "2"]),
        Serve::types("b", &["--handler", "b=echo ran {id}"]),
        Serve::types("c", &["--threads", "0"]),
    ];
    let peers: Vec<String> = nodes
        .iter()
        .flat_map(|n| ["--peer".to_string(), n.peer()])
        .collect();
    for threads in ["1", "3"] {
        let events = seed_with_threads(&dir, threads, &peers);
        let b1 = events_named(&events, "task_completed")
            .into_iter()
            .find(|e| e["task"] == "b1")
            .expect("b1 completed");
        assert_eq!(b1["output"].as_str().map(str::trim), Some("ran b1"), "{b1}");
    }
}
