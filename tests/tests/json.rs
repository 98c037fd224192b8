//! `--json`: one JSON object per line with the documented events and fields.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use serde_json::Value;
use tests::{events_named, run_in, RunOutput, Serve, TestDir, EVENT_NAMES, SEED_ORDER};

const TASK_EVENTS: [&str; 5] = [
    "task_assigned",
    "task_completed",
    "task_failed",
    "task_cancelled",
    "task_retry",
];

/// Checks what every `--json` stream must satisfy; returns the events.
fn check_stream(out: &RunOutput) -> Vec<Value> {
    assert!(
        !out.stdout.trim().is_empty(),
        "no JSON output\n{}",
        out.describe()
    );
    let events = out.json();
    for e in &events {
        let obj = e
            .as_object()
            .unwrap_or_else(|| panic!("not a JSON object: {e}"));
        let name = obj
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no string `event` field: {e}"));
        assert!(
            EVENT_NAMES.contains(&name),
            "undocumented event {name:?}: {e}"
        );
        // RFC 3339, UTC, microseconds (docs/events.schema.json has the full rules).
        let ts = e["ts"].as_str().unwrap_or_else(|| panic!("no ts: {e}"));
        assert!(
            ts.len() == 27 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.',
            "ts {ts:?}: {e}"
        );
        if TASK_EVENTS.contains(&name) {
            let task = e["task"].as_str().unwrap_or_else(|| panic!("task: {e}"));
            let kind = e["type"].as_str().unwrap_or_else(|| panic!("type: {e}"));
            let leading: String = task.chars().take_while(char::is_ascii_alphabetic).collect();
            assert_eq!(kind, leading.to_ascii_lowercase(), "type of {task}: {e}");
            let node = e["node"].as_str().unwrap_or_else(|| panic!("node: {e}"));
            assert!(
                name == "task_failed" || !node.is_empty(),
                "empty node on {name}: {e}"
            );
            let attempt = e["attempt"]
                .as_u64()
                .unwrap_or_else(|| panic!("attempt: {e}"));
            assert!(
                attempt >= 1 || name == "task_failed",
                "attempt {attempt}: {e}"
            );
        }
        if name == "task_completed" || name == "task_failed" {
            assert_eq!(
                e["ok"].as_bool(),
                Some(name == "task_completed"),
                "ok on {name}: {e}"
            );
            assert!(e["output"].is_string(), "output: {e}");
            let d = e["duration_ms"]
                .as_f64()
                .unwrap_or_else(|| panic!("duration_ms: {e}"));
            assert!(d >= 0.0, "negative duration: {e}");
        }
    }
    assert_eq!(
        events.first().map(|e| &e["event"]),
        Some(&Value::from("run_started")),
        "run_started is the first line\n{}",
        out.describe()
    );
    assert_eq!(events[0]["schema"], 1, "{}", events[0]);
    let summaries = events_named(&events, "summary");
    assert_eq!(
        summaries.len(),
        1,
        "exactly one summary\n{}",
        out.describe()
    );
    assert_eq!(
        events.last().map(|e| &e["event"]),
        Some(&Value::from("summary")),
        "the summary is the last line\n{}",
        out.describe()
    );
    let s = summaries[0];
    for f in ["total", "succeeded", "failed", "cancelled", "not_run"] {
        assert!(s[f].is_u64(), "summary.{f}: {s}");
    }
    assert!(s["interrupted"].is_boolean(), "summary.interrupted: {s}");
    let elapsed = s["elapsed_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("summary.elapsed_ms: {s}"));
    assert!(elapsed >= 0.0, "{s}");
    events
}

#[test]
fn seed_json_stream_is_well_formed_and_complete() {
    let dir = TestDir::new();
    dir.copy_seed();
    let out = run_in(dir.path(), &["run", "tasks.txt", "--local", "--json"]);
    out.assert_code(0);
    let events = check_stream(&out);

    // Exactly one task_completed per task, in the seed's (strict) order, each after its
    // assignment, with the built-in handler's output.
    let completed = events_named(&events, "task_completed");
    let ids: Vec<&str> = completed
        .iter()
        .map(|e| e["task"].as_str().unwrap())
        .collect();
    assert_eq!(ids, SEED_ORDER, "{}", out.describe());
    for e in &completed {
        let id = e["task"].as_str().unwrap();
        assert_eq!(
            e["output"].as_str().unwrap().trim(),
            format!("Executing task: {id}")
        );
        assert_eq!(e["attempt"], 1, "{e}");
        let pos = |name: &str| {
            events
                .iter()
                .position(|x| x["event"] == name && x["task"] == id)
                .unwrap_or_else(|| panic!("no {name} for {id}\n{}", out.describe()))
        };
        assert!(pos("task_assigned") < pos("task_completed"), "{id}");
        let assigned = &events[pos("task_assigned")];
        assert_eq!(assigned["node"], e["node"], "{id} completed where assigned");
    }
    assert!(events_named(&events, "task_failed").is_empty());

    // Every node that ran a task was announced by a `connected` event, and said goodbye.
    let connected: Vec<&str> = events_named(&events, "connected")
        .iter()
        .map(|e| e["node"].as_str().unwrap())
        .collect();
    let disconnected: Vec<&Value> = events_named(&events, "disconnected");
    for e in &completed {
        let n = e["node"].as_str().unwrap();
        assert!(connected.contains(&n), "{n} never connected");
    }
    for n in &connected {
        let d = disconnected
            .iter()
            .find(|d| d["node"] == *n)
            .unwrap_or_else(|| panic!("no disconnected event for {n}\n{}", out.describe()));
        assert_eq!(d["clean"], true, "{d}");
    }

    let s = events_named(&events, "summary")[0];
    assert_eq!(s["total"], 11, "{s}");
    assert_eq!(s["succeeded"], 11, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
}

#[test]
fn summary_counts_match_the_task_events_when_one_fails() {
    let dir = TestDir::new();
    // Strict order: a1 and a2 succeed, b1 fails (exit 4), and the run stops there, so a3
    // never runs (a failure stops the run; nothing new starts).
    dir.write("tasks.txt", "a1 a2 b1 a3\n");
    let a = Serve::types("a", &[]);
    let b = Serve::types("b", &["--handler", "b=echo out-{id}; exit 4"]);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--peer",
            &a.peer(),
            "--peer",
            &b.peer(),
        ],
    );
    out.assert_code(1);
    let events = check_stream(&out);
    let by_task = |name: &str| -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for e in events_named(&events, name) {
            *m.entry(e["task"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        m
    };
    let ok = by_task("task_completed");
    let failed = by_task("task_failed");
    assert_eq!(
        ok.iter().map(|(k, n)| (k.as_str(), *n)).collect::<Vec<_>>(),
        [("a1", 1), ("a2", 1)],
        "one result per task\n{}",
        out.describe()
    );
    assert_eq!(
        failed
            .iter()
            .map(|(k, n)| (k.as_str(), *n))
            .collect::<Vec<_>>(),
        [("b1", 1)],
        "one result per task\n{}",
        out.describe()
    );
    let f = events_named(&events, "task_failed")[0];
    assert_eq!(f["exit_code"], 4, "{f}");
    assert_eq!(f["output"].as_str().unwrap().trim(), "out-b1", "{f}");
    assert_eq!(f["node"], b.node_id.clone().unwrap().as_str(), "{f}");
    assert!(
        !events.iter().any(|e| e["task"] == "a3"),
        "a3 comes after a failure in strict order and must not run\n{}",
        out.describe()
    );
    let s = events_named(&events, "summary")[0];
    assert_eq!(s["total"], 4, "{s}");
    assert_eq!(s["succeeded"], 2, "{s}");
    assert_eq!(s["failed"], 1, "{s}");
}
