//! `--threads`: the default single-threaded runtime and multi-threaded ones run the seed
//! in order, also between processes that use different settings. (Every other suite runs
//! the default, one thread, including shell handlers and task timeouts.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tests::{events_named, run_in, Serve, TestDir, SEED_ORDER};

/// Ids of the `task_completed` events of a `--json` run, in the order they arrived.
fn completed_ids(events: &[serde_json::Value]) -> Vec<String> {
    events_named(events, "task_completed")
        .iter()
        .map(|e| e["task"].as_str().expect("task id").to_string())
        .collect()
}

#[test]
fn the_seed_runs_in_order_with_every_thread_setting_locally() {
    let dir = TestDir::new();
    dir.copy_seed();
    for threads in ["1", "2", "0"] {
        let out = run_in(
            dir.path(),
            &[
                "--threads",
                threads,
                "run",
                "tasks.txt",
                "--local",
                "--json",
            ],
        );
        out.assert_code(0);
        let ids = completed_ids(&out.json());
        assert_eq!(ids, SEED_ORDER, "--threads {threads}: {}", out.describe());
    }
}

#[test]
fn single_and_multi_threaded_processes_work_together() {
    let dir = TestDir::new();
    dir.copy_seed();
    // One serving process per setting, and a shell handler on the single-threaded one.
    let a = Serve::types("a", &["--threads", "2"]);
    let b = Serve::types("b", &["--handler", "b=echo ran {id}"]);
    let c = Serve::types("c", &["--threads", "0"]);
    for threads in ["1", "3"] {
        let out = run_in(
            dir.path(),
            &[
                "--threads",
                threads,
                "run",
                "tasks.txt",
                "--json",
                "--peer",
                &a.peer(),
                "--peer",
                &b.peer(),
                "--peer",
                &c.peer(),
            ],
        );
        out.assert_code(0);
        let events = out.json();
        assert_eq!(completed_ids(&events), SEED_ORDER, "{}", out.describe());
        let b1 = events_named(&events, "task_completed")
            .into_iter()
            .find(|e| e["task"] == "b1")
            .expect("b1 completed");
        assert_eq!(b1["output"].as_str().map(str::trim), Some("ran b1"), "{b1}");
    }
}
