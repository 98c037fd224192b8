//! Hosted runs (#19, stage 1): `submit` gives a plan to a serving node and exits; the node
//! runs it, journaled in its data directory; `runs`, `status --run`, `attach` and `cancel`
//! ask it; a node killed with SIGKILL and restarted on the same data directory resumes
//! the run by itself. Real processes over loopback only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use tests::{json_lines, poll_until, run_in, Serve, TestDir};

/// Generous: the machine has two cores shared by other suites.
const LONG: Duration = Duration::from_secs(90);

/// A serving node of type `a` with its own data directory `data`, plus `extra` arguments.
fn host(data: &Path, extra: &[&str]) -> Serve {
    Serve::hosting("127.0.0.1:0", data, extra)
}

fn plan(dir: &TestDir, n: usize) -> String {
    let text: String = (1..=n).map(|i| format!("a{i}\n")).collect();
    dir.write("plan.txt", &text).display().to_string()
}

/// `p2p-node submit`: the run id it printed (exit 0 checked).
fn submit(dir: &TestDir, node: &Serve, file: &str, extra: &[&str]) -> String {
    let peer = node.peer();
    let mut args = vec!["submit", file, "--peer", &peer];
    args.extend_from_slice(extra);
    let out = run_in(dir.path(), &args);
    out.assert_code(0);
    let id = out.stdout.trim().to_string();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "submit prints the run id alone: {}",
        out.describe()
    );
    id
}

fn status_json(dir: &TestDir, node: &Serve, run: &str) -> serde_json::Value {
    let peer = node.peer();
    let out = run_in(
        dir.path(),
        &["status", "--run", run, "--peer", &peer, "--json"],
    );
    out.assert_code(0);
    let mut v = out.json();
    assert_eq!(v.len(), 1, "{}", out.describe());
    v.remove(0)
}

fn lines(path: &Path) -> Vec<String> {
    tests::file_lines(path)
}

#[test]
fn submit_exits_at_once_and_the_node_runs_the_plan() {
    let dir = TestDir::new();
    let count = dir.join("count");
    let handler = format!("a=sleep 1; echo {{id}} >> {}", count.display());
    let node = host(&dir.join("data"), &["--handler", &handler]);
    let file = plan(&dir, 4);
    let run = submit(&dir, &node, &file, &[]);
    // Submit returned while the run (4 x 1 s, strict) cannot have finished.
    assert!(lines(&count).len() < 4, "submit waited for the run");
    let peer = node.peer();
    let listed = run_in(dir.path(), &["runs", "--peer", &peer, "--json"]);
    listed.assert_code(0);
    let runs = listed.json();
    assert_eq!(runs.len(), 1, "{}", listed.describe());
    assert_eq!(runs[0]["run"], run.as_str());
    assert_eq!(runs[0]["total"], 4);
    assert!(
        poll_until(LONG, || lines(&count).len() == 4),
        "the hosted run did not finish: {:?}",
        lines(&count)
    );
    assert!(poll_until(LONG, || status_json(&dir, &node, &run)["info"]
        ["state"]
        == "succeeded"));
    let s = status_json(&dir, &node, &run);
    assert_eq!(s["info"]["succeeded"], 4);
    assert!(s["info"]["ended_ms"].as_u64().is_some());
}

#[test]
fn status_while_running_names_the_running_task_and_its_node() {
    let dir = TestDir::new();
    let started = dir.join("started");
    let handler = format!("a=echo {{id}} >> {}; sleep 30", started.display());
    let node = host(&dir.join("data"), &["--handler", &handler]);
    let file = plan(&dir, 3);
    let run = submit(&dir, &node, &file, &[]);
    assert!(poll_until(LONG, || !lines(&started).is_empty()));
    let s = status_json(&dir, &node, &run);
    assert_eq!(s["info"]["state"], "running");
    assert_eq!(s["info"]["running"], 1);
    let first = &s["tasks"][0];
    assert_eq!(first["task"], "a1");
    assert_eq!(first["state"], "running");
    assert_eq!(
        first["node"],
        node.node_id
            .clone()
            .expect("the node printed its id")
            .as_str()
    );
    assert_eq!(s["tasks"][1]["state"], "pending");
    // Human form too.
    let peer = node.peer();
    let out = run_in(dir.path(), &["status", "--run", &run, "--peer", &peer]);
    out.assert_code(0);
    assert!(out.stdout.contains("a1 running on"), "{}", out.describe());
    // An unknown run is refused.
    let out = run_in(
        dir.path(),
        &[
            "status",
            "--run",
            "00000000000000000000000000000000",
            "--peer",
            &peer,
        ],
    );
    out.assert_code(1);
    assert!(out.stderr.contains("no run"), "{}", out.describe());
}

#[test]
fn attach_streams_the_events_and_exits_with_the_runs_status() {
    let dir = TestDir::new();
    let handler = "a=if [ {id} = a2 ]; then echo broken >&2; exit 3; fi; echo ok {id}";
    let node = host(&dir.join("data"), &["--handler", handler]);
    let peer = node.peer();
    // A run that succeeds: attach gives its events, then exits 0 (as `run` would).
    let good = dir.write("good.txt", "a1\na3\n").display().to_string();
    let run = submit(&dir, &node, &good, &[]);
    let out = run_in(dir.path(), &["attach", &run, "--peer", &peer, "--json"]);
    out.assert_code(0);
    let events = json_lines(&out.stdout);
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names.first(), Some(&"run_started"), "{names:?}");
    assert_eq!(names.last(), Some(&"summary"), "{names:?}");
    assert_eq!(names.iter().filter(|n| **n == "task_completed").count(), 2);
    assert_eq!(
        events.last().map(|e| e["succeeded"].clone()),
        Some(2.into())
    );
    // A run with a failing task: attach exits 1, as `run` would.
    let bad = dir.write("bad.txt", "a1\na2\na3\n").display().to_string();
    let run = submit(&dir, &node, &bad, &[]);
    let out = run_in(dir.path(), &["attach", &run, "--peer", &peer]);
    out.assert_code(1);
    // As `run` prints it.
    assert!(
        out.stdout.contains("a2 FAILED on node"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains(&format!("Run {run} failed")),
        "{}",
        out.describe()
    );
    // Attaching to a run that ended long ago still gives its end (and the same status).
    let again = run_in(dir.path(), &["attach", &run, "--peer", &peer, "--json"]);
    again.assert_code(1);
}

#[test]
fn a_host_killed_mid_run_resumes_by_itself_after_a_restart() {
    let dir = TestDir::new();
    let data = dir.join("data");
    let count = dir.join("count");
    let handler = format!("a=echo {{id}} >> {}; sleep 0.2", count.display());
    let capacity = 4;
    let cap = capacity.to_string();
    let node = host(&data, &["--handler", &handler, "--capacity", &cap]);
    let file = plan(&dir, 40);
    let run = submit(&dir, &node, &file, &["--order", "none"]);
    assert!(
        poll_until(LONG, || lines(&count).len() >= 12),
        "the run did not start"
    );
    // SIGKILL (dropping a Serve kills and reaps it).
    drop(node);
    let before = lines(&count).len();
    assert!(
        before < 40,
        "the run finished before the kill; nothing to resume"
    );
    let node = host(&data, &["--handler", &handler, "--capacity", &cap]);
    let peer = node.peer();
    let out = run_in(dir.path(), &["attach", &run, "--peer", &peer, "--json"]);
    out.assert_code(0);
    let events = json_lines(&out.stdout);
    let summary = events.last().expect("a summary");
    assert_eq!(summary["event"], "summary", "{}", out.describe());
    assert_eq!(summary["total"], 40);
    assert_eq!(summary["succeeded"], 40);
    assert!(summary["resumed"].as_u64().unwrap_or(0) > 0, "{summary}");
    let ran = lines(&count);
    eprintln!(
        "killed after {before} executions; {} executions in all, resumed {}",
        ran.len(),
        summary["resumed"]
    );
    let mut distinct = ran.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 40, "every task ran");
    // At most the attempts in flight at the kill ran twice.
    assert!(
        ran.len() <= 40 + capacity,
        "{} executions for 40 tasks (capacity {capacity})",
        ran.len()
    );
    // Each final result is recorded once in the run's journal.
    let node_id = node.node_id.clone().expect("the node printed its id");
    let journal = data.join("runs").join(&node_id).join(&run).join("journal");
    let records: Vec<serde_json::Value> = lines(&journal)
        .iter()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a journal line"))
        .collect();
    let mut tasks: Vec<&str> = records.iter().filter_map(|r| r["task"].as_str()).collect();
    assert_eq!(tasks.len(), 40, "one record per task");
    tasks.sort();
    tasks.dedup();
    assert_eq!(tasks.len(), 40, "no task recorded twice");
    let s = status_json(&dir, &node, &run);
    assert_eq!(s["info"]["state"], "succeeded");
}

#[test]
fn cancel_stops_a_hosted_run() {
    let dir = TestDir::new();
    let started = dir.join("started");
    let handler = format!("a=echo {{id}} >> {}; sleep 30", started.display());
    let node = host(&dir.join("data"), &["--handler", &handler]);
    let peer = node.peer();
    let file = plan(&dir, 3);
    let run = submit(&dir, &node, &file, &[]);
    assert!(poll_until(LONG, || !lines(&started).is_empty()));
    let attach = tests::spawn_in(dir.path(), &["attach", &run, "--peer", &peer, "--json"]);
    let out = run_in(dir.path(), &["cancel", &run, "--peer", &peer]);
    out.assert_code(0);
    let attached = attach.finish_within(LONG);
    attached.assert_code(130);
    assert!(poll_until(LONG, || status_json(&dir, &node, &run)["info"]
        ["state"]
        == "cancelled"));
    assert_eq!(lines(&started), ["a1"], "nothing ran after the cancel");
    // Cancelling it again is refused: it is over.
    run_in(dir.path(), &["cancel", &run, "--peer", &peer]).assert_code(1);
}

#[test]
fn a_submit_without_the_cluster_key_is_refused() {
    let dir = TestDir::new();
    run_in(dir.path(), &["keygen", "cluster.key"]).assert_code(0);
    let key = dir.join("cluster.key").display().to_string();
    let node = host(&dir.join("data"), &["--key-file", &key]);
    let peer = node.peer();
    let file = plan(&dir, 2);
    let out = run_in(dir.path(), &["submit", &file, "--peer", &peer]);
    assert_ne!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.trim().is_empty(),
        "no run id: {}",
        out.describe()
    );
    let listed = run_in(
        dir.path(),
        &["runs", "--peer", &peer, "--json", "--key-file", &key],
    );
    listed.assert_code(0);
    assert!(listed.json().is_empty(), "the refused submit hosts nothing");
    // With the key it is hosted.
    let run = submit(&dir, &node, &file, &["--key-file", &key]);
    let out = run_in(
        dir.path(),
        &["attach", &run, "--peer", &peer, "--key-file", &key],
    );
    out.assert_code(0);
}

#[test]
fn the_node_refuses_plans_over_its_bounds() {
    let dir = TestDir::new();
    let node = host(&dir.join("data"), &["--max-plan", "64B"]);
    let peer = node.peer();
    let file = plan(&dir, 40);
    let out = run_in(dir.path(), &["submit", &file, "--peer", &peer]);
    out.assert_code(1);
    assert!(out.stderr.contains("--max-plan"), "{}", out.describe());
    // A broken task file is refused by submit itself, as by run: exit 2, its position.
    let bad = dir.write("bad.txt", "a1 after zz\n").display().to_string();
    let out = run_in(dir.path(), &["submit", &bad, "--peer", &peer]);
    out.assert_code(2);
    assert!(out.stderr.contains("bad.txt:1:"), "{}", out.describe());
    let listed = run_in(dir.path(), &["runs", "--peer", &peer, "--json"]);
    assert!(listed.json().is_empty(), "nothing hosted");
}

#[test]
fn an_attached_client_that_never_reads_does_not_hold_the_run_up() {
    use p2p_core::hosted::Hosted;
    use p2p_core::Message;
    let dir = TestDir::new();
    // 120 tasks of 100 KB of output each: 12 MB of events, far more than the socket
    // buffers of a client that reads nothing take.
    let handler = "a=head -c 100000 /dev/zero | tr '\\0' x";
    let node = host(
        &dir.join("data"),
        &["--handler", handler, "--capacity", "4"],
    );
    let file = plan(&dir, 120);
    let run = submit(&dir, &node, &file, &["--order", "none"]);
    let mut silent = tests::WireClient::connect(node.addr);
    silent
        .send(&Message::Hello(tests::hello("default")))
        .unwrap();
    silent.expect_msg(LONG, "Welcome", |m| matches!(m, Message::Welcome(_)));
    let attach = Hosted::Attach { run: run.clone() };
    silent.send(&Message::Hosted(Box::new(attach))).unwrap();
    // It reads nothing more; the run finishes all the same.
    assert!(
        poll_until(LONG, || status_json(&dir, &node, &run)["info"]["state"]
            == "succeeded"),
        "the run was held up by a client that does not read"
    );
    let s = status_json(&dir, &node, &run);
    assert_eq!(s["info"]["succeeded"], 120);
    // A reading client attached now gets the end at once.
    let peer = node.peer();
    run_in(dir.path(), &["attach", &run, "--peer", &peer]).assert_code(0);
    drop(silent);
}

#[test]
fn sigterm_interrupts_a_hosted_run_which_resumes_at_the_next_start() {
    let dir = TestDir::new();
    let data = dir.join("data");
    let count = dir.join("count");
    let handler = format!("a=echo {{id}} >> {}; sleep 0.2", count.display());
    let mut node = host(&data, &["--handler", &handler, "--capacity", "2"]);
    let peer = node.peer();
    let file = plan(&dir, 30);
    let run = submit(&dir, &node, &file, &["--order", "none"]);
    assert!(poll_until(LONG, || lines(&count).len() >= 4));
    let attach = tests::spawn_in(dir.path(), &["attach", &run, "--peer", &peer]);
    // The attach is connected once it printed the run's first events.
    assert!(
        attach
            .stdout
            .wait_for(LONG, |l| l.contains("connected to node"))
            .is_some(),
        "attach printed nothing"
    );
    node.terminate();
    assert!(node.wait_exit(LONG).is_some_and(|s| s.success()));
    let attached = attach.finish_within(LONG);
    attached.assert_code(143);
    assert!(
        attached.stdout.contains(&format!("Run {run} interrupted")),
        "{}",
        attached.describe()
    );
    let before = lines(&count).len();
    assert!(before < 30, "the run ended before the node stopped");
    // Started again on its data directory, the node resumes the run by itself.
    let node = host(&data, &["--handler", &handler, "--capacity", "2"]);
    let peer = node.peer();
    let out = run_in(dir.path(), &["attach", &run, "--peer", &peer, "--json"]);
    out.assert_code(0);
    let summary = json_lines(&out.stdout).pop().unwrap();
    assert_eq!(summary["succeeded"], 30, "{summary}");
    // After the end, a fresh node process still lists it with its counts.
    drop(node);
    let node = host(&data, &["--handler", &handler]);
    let s = status_json(&dir, &node, &run);
    assert_eq!(s["info"]["state"], "succeeded");
    assert_eq!(s["info"]["succeeded"], 30);
}

#[test]
fn attach_keeps_up_with_a_fast_run_and_gets_its_summary() {
    let dir = TestDir::new();
    // The built-in handler answers at once: thousands of events in bursts, on one thread.
    let node = host(&dir.join("data"), &[]);
    let peer = node.peer();
    let file = plan(&dir, 20_000);
    let run = submit(&dir, &node, &file, &["--order", "none"]);
    let out = run_in(dir.path(), &["attach", &run, "--peer", &peer, "--json"]);
    out.assert_code(0);
    let events = json_lines(&out.stdout);
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["succeeded"], 20_000);
    // From where the run was: every event after the first one shown, none twice.
    let completed = events.iter().filter(|e| e["event"] == "task_completed");
    let mut ids: Vec<&str> = completed.filter_map(|e| e["task"].as_str()).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "an event shown twice");
}
