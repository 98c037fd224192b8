//! The `--json` stream of real runs (success, failure, retries, a missing type, an
//! interrupt) against the published schema, docs/events.schema.json (JSON Schema draft
//! 2020-12), checked with python3's `jsonschema` module (`.ci/run` installs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

use serde_json::Value;
use tests::{
    events_named, poll_until, run_in, shell_quote, spawn_in, workspace_root, RunOutput, Serve,
    TestDir, EVENT_NAMES, WAIT,
};

/// Validates every line of `lines` against the schema; returns one message per invalid
/// line (`line N: what`), empty when all are valid.
const VALIDATOR: &str = r#"
import json, sys
import jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
bad = 0
for n, line in enumerate(open(sys.argv[2]), 1):
    errors = list(v.iter_errors(json.loads(line)))
    if errors:
        bad += 1
        best = jsonschema.exceptions.best_match(errors)
        print(f"line {n}: {best.message} at {list(best.absolute_path)}: {line.strip()}")
print(f"checked {n if 'n' in dir() else 0} lines, {bad} invalid")
"#;

/// Runs the validator on `lines`; `(invalid line messages, summary line)`.
fn validate(lines: &[String]) -> (Vec<String>, String) {
    let dir = TestDir::new();
    let file = dir.write("events.jsonl", &(lines.join("\n") + "\n"));
    let schema = workspace_root().join("docs/events.schema.json");
    let out = Command::new("python3")
        .arg("-c")
        .arg(VALIDATOR)
        .arg(&schema)
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("python3 runs (.ci/run installs it with its jsonschema module)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the validator failed (is python3's jsonschema installed? .ci/run installs it):\n{}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut msgs: Vec<String> = stdout.lines().map(str::to_string).collect();
    let summary = msgs.pop().unwrap_or_default();
    (msgs, summary)
}

/// The stream's own rules beyond the schema: `run_started` first (its `tasks` the plan's
/// size), `summary` last, only documented events, the given interrupted flag.
fn check_shape(out: &RunOutput, tasks: usize, interrupted: bool) -> Vec<String> {
    let events = out.json();
    assert_eq!(
        events.first().map(|e| e["event"].clone()),
        Some(Value::from("run_started")),
        "{}",
        out.describe()
    );
    assert_eq!(events[0]["schema"], 1);
    assert_eq!(events[0]["tasks"], tasks);
    assert!(out
        .stdout
        .starts_with(r#"{"event":"run_started","schema":1,"#));
    assert_eq!(
        events.last().map(|e| e["event"].clone()),
        Some(Value::from("summary")),
        "{}",
        out.describe()
    );
    assert_eq!(
        events_named(&events, "summary")[0]["interrupted"],
        interrupted
    );
    for e in &events {
        assert!(EVENT_NAMES.contains(&e["event"].as_str().unwrap()), "{e}");
    }
    out.stdout.lines().map(str::to_string).collect()
}

#[test]
fn real_json_output_matches_the_published_schema() {
    let mut lines = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut keep = |out: &RunOutput, lines_of_run: Vec<String>| {
        for e in out.json() {
            seen.insert(e["event"].as_str().unwrap().to_string());
        }
        lines.extend(lines_of_run);
    };

    // Success: the seed on local nodes.
    let dir = TestDir::new();
    dir.copy_seed();
    let out = run_in(dir.path(), &["run", "tasks.txt", "--local", "--json"]);
    out.assert_code(0);
    keep(&out, check_shape(&out, 11, false));

    // Failure and retries: b fails every attempt, with one retry.
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 b1\n");
    let a = Serve::types("a", &[]);
    let b = Serve::types("b", &["--handler", "b=echo out-{id}; exit 4"]);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--retries",
            "1",
            "--retry-backoff",
            "10ms",
            "--peer",
            &a.peer(),
            "--peer",
            &b.peer(),
        ],
    );
    out.assert_code(1);
    keep(&out, check_shape(&out, 2, false));

    // A missing type (and an unreachable peer: a closed port).
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 z1\n");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--discovery-timeout",
            "1s",
            "--peer",
            &a.peer(),
            "--peer",
            &closed_addr,
        ],
    );
    out.assert_code(1);
    keep(&out, check_shape(&out, 2, false));

    // Interrupted with SIGINT while a task runs.
    let dir = TestDir::new();
    dir.write("tasks.txt", "c1 c2\n");
    let pid_file = dir.join("handler.pid");
    let handler = format!(
        "c=echo $$ > {}; exec sleep 300",
        shell_quote(pid_file.to_str().unwrap())
    );
    let c = Serve::types("c", &["--handler", &handler]);
    let running = spawn_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &c.peer()],
    );
    assert!(poll_until(WAIT, || std::fs::read_to_string(&pid_file)
        .is_ok_and(|t| !t.trim().is_empty())));
    running.interrupt();
    let out = running.finish();
    out.assert_code(130);
    keep(&out, check_shape(&out, 2, true));

    for name in [
        "run_started",
        "peer_unreachable",
        "connected",
        "task_assigned",
        "task_completed",
        "task_failed",
        "task_cancelled",
        "task_retry",
        "disconnected",
        "summary",
    ] {
        assert!(
            seen.contains(name),
            "no {name} event in these runs: {seen:?}"
        );
    }
    let (invalid, summary) = validate(&lines);
    assert!(invalid.is_empty(), "{}\n{summary}", invalid.join("\n"));
    assert!(
        summary.starts_with(&format!("checked {} lines, 0 invalid", lines.len())),
        "{summary}"
    );
}

#[test]
fn the_schema_refuses_what_it_must() {
    // The check above can fail: lines that break the contract are refused.
    let good = r#"{"event":"summary","total":1,"succeeded":1,"failed":0,"cancelled":0,"not_run":0,"resumed":0,"missing_types":[],"elapsed_ms":1.5,"interrupted":false,"ts":"2026-12-01T09:30:00.123456Z"}"#;
    let no_interrupted = good.replace(r#","interrupted":false"#, "");
    let no_ts = good.replace(r#","ts":"2026-12-01T09:30:00.123456Z""#, "");
    let millis = good.replace(".123456Z", ".123Z");
    let local_time = good.replace(".123456Z", ".123456+01:00");
    let unknown = good.replace(r#""event":"summary""#, r#""event":"task_lost""#);
    let bad_run = r#"{"event":"run_started","schema":2,"run":"x","tasks":1,"order":"strict","ts":"2026-12-01T09:30:00.123456Z"}"#;
    let lines: Vec<String> = [
        good.to_string(),
        no_interrupted,
        no_ts,
        millis,
        local_time,
        unknown,
        bad_run.to_string(),
    ]
    .into();
    let (invalid, summary) = validate(&lines);
    let lines_refused: Vec<&str> = invalid
        .iter()
        .map(|m| m.split(':').next().unwrap())
        .collect();
    assert_eq!(
        lines_refused,
        ["line 2", "line 3", "line 4", "line 5", "line 6", "line 7"],
        "{}\n{summary}",
        invalid.join("\n")
    );
}
