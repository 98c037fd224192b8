//! Order modes, capacity, failover, handler substitution, clusters and `peers`, against
//! real `serve` processes.
//!
//! Concurrency is proven without timing assertions: a handler waits (bounded) for a marker
//! that only a concurrently running task can create, and fails if it never appears.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use tests::{
    events_named, json_lines, poll_until, run_in, shell_quote, spawn_in, Serve, TestDir, WAIT,
};

fn q(p: &Path) -> String {
    shell_quote(p.to_str().expect("utf-8 temp path"))
}

/// Shell that waits up to ~20 s for `path` to exist, then fails if it still does not.
fn wait_for_file(path: &str) -> String {
    format!(
        "i=0; while [ ! -e {path} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; [ -e {path} ]"
    )
}

#[test]
fn order_type_runs_types_side_by_side_but_each_type_in_file_order() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2 b1 b2\n");
    let log = q(&dir.join("order.log"));
    let marks = dir.path().to_str().unwrap().to_string();
    // Each a-task needs some b-task to have started meanwhile, and the other way round:
    // only possible when the two types run at the same time.
    let handler = |t: &str, other: &str| {
        format!(
            "{t}=echo start {{id}} >> {log}; touch {m}; {w}; echo end {{id}} >> {log}",
            m = shell_quote(&format!("{marks}/started-{t}")),
            w = wait_for_file(&shell_quote(&format!("{marks}/started-{other}"))),
        )
    };
    let a = Serve::types("a", &["--handler", &handler("a", "b")]);
    let b = Serve::types("b", &["--handler", &handler("b", "a")]);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--order",
            "type",
            "--json",
            "--peer",
            &a.peer(),
            "--peer",
            &b.peer(),
        ],
    );
    out.assert_code(0);
    let lines = dir.read_lines("order.log");
    for t in ["a", "b"] {
        let mine: Vec<&str> = lines
            .iter()
            .map(String::as_str)
            .filter(|l| l.ends_with(&format!(" {t}1")) || l.ends_with(&format!(" {t}2")))
            .collect();
        let expected = [
            format!("start {t}1"),
            format!("end {t}1"),
            format!("start {t}2"),
            format!("end {t}2"),
        ];
        assert_eq!(
            mine, expected,
            "type {t} must run in file order, one at a time\n{lines:?}"
        );
    }
}

#[test]
fn order_none_runs_independent_tasks_at_the_same_time() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let marks = dir.path().to_str().unwrap().to_string();
    // a1 waits for a2 to start and a2 for a1: both must be in flight together.
    let handler = format!(
        "a=touch {m}/started-{{id}}; other=a1; [ {{id}} = a1 ] && other=a2; {w}",
        m = shell_quote(&marks),
        w = wait_for_file(&format!("{}/started-$other", shell_quote(&marks))),
    );
    let a = Serve::types("a", &["--handler", &handler, "--capacity", "2"]);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--order",
            "none",
            "--json",
            "--peer",
            &a.peer(),
        ],
    );
    out.assert_code(0);
    assert_eq!(events_named(&out.json(), "task_completed").len(), 2);
}

#[test]
fn a_node_never_runs_more_tasks_than_its_capacity() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2 a3 a4\n");
    let lock = q(&dir.join("lock"));
    // mkdir is atomic: a second task running at the same time fails.
    let handler = format!("a=mkdir {lock} || exit 9; sleep 0.2; rmdir {lock}");
    let a = Serve::types("a", &["--handler", &handler, "--capacity", "1"]);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--order",
            "none",
            "--json",
            "--peer",
            &a.peer(),
        ],
    );
    out.assert_code(0);
    let events = out.json();
    let c = events_named(&events, "connected");
    assert_eq!(c.len(), 1);
    assert_eq!(c[0]["capacity"], 1, "{}", c[0]);
    assert_eq!(events_named(&events, "task_completed").len(), 4);
}

#[test]
fn tasks_of_a_node_that_dies_run_again_elsewhere() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let marks = dir.path().to_str().unwrap().to_string();
    let handler = |n: u32| {
        format!(
            "a=touch {m}/started-{{id}}-{n}; sleep 2; echo node{n} {{id}}",
            m = shell_quote(&marks)
        )
    };
    let mut nodes = vec![
        Serve::types("a", &["--handler", &handler(1)]),
        Serve::types("a", &["--handler", &handler(2)]),
    ];
    let running = spawn_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--peer",
            &nodes[0].peer(),
            "--peer",
            &nodes[1].peer(),
        ],
    );
    let started = |n: u32| dir.join(&format!("started-a1-{n}")).exists();
    assert!(
        poll_until(WAIT, || started(1) || started(2)),
        "a1 never started"
    );
    // Kill (SIGKILL) the node running a1: no goodbye, its task must move to the other one.
    let victim = if started(1) { 0 } else { 1 };
    let victim_id = nodes[victim].node_id.clone().unwrap();
    nodes.remove(victim); // dropping the guard kills and reaps the process
    let survivor_id = nodes[0].node_id.clone().unwrap();
    let out = running.finish();
    out.assert_code(0);
    let events = json_lines(&out.stdout);
    let done = events_named(&events, "task_completed");
    let ids: Vec<&str> = done.iter().map(|e| e["task"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["a1", "a2"],
        "each result reported once\n{}",
        out.describe()
    );
    for e in &done {
        assert_eq!(e["node"], survivor_id.as_str(), "{e}");
    }
    assert!(done[0]["attempt"].as_u64().unwrap() >= 2, "{}", done[0]);
    let lost = events_named(&events, "disconnected")
        .into_iter()
        .find(|e| e["node"] == victim_id.as_str())
        .unwrap_or_else(|| {
            panic!(
                "no disconnected event for the dead node\n{}",
                out.describe()
            )
        });
    assert_eq!(lost["clean"], false, "{lost}");
}

#[test]
fn handler_gets_id_type_and_environment() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "Job7 job8\n");
    // Placeholders are substituted shell-quoted (so they go unquoted in the command).
    let handler = "job=echo {id} {type} \"$P2P_TASK_ID\" \"$P2P_TASK_TYPE\" \"$P2P_TASK_ATTEMPT\"";
    let s = Serve::types("job", &["--handler", handler]);
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &s.peer()],
    );
    out.assert_code(0);
    let events = out.json();
    let outputs: Vec<(String, String)> = events_named(&events, "task_completed")
        .iter()
        .map(|e| {
            (
                e["task"].as_str().unwrap().to_string(),
                e["output"].as_str().unwrap().trim().to_string(),
            )
        })
        .collect();
    assert_eq!(
        outputs,
        [
            ("Job7".to_string(), "Job7 job Job7 job 1".to_string()),
            ("job8".to_string(), "job8 job job8 job 1".to_string()),
        ],
        "{}",
        out.describe()
    );
}

#[test]
fn nodes_of_another_cluster_never_get_work() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let ran = dir.join("ran");
    let handler = format!("a=touch {}", q(&ran));
    let s = Serve::types("a", &["--cluster", "blue", "--handler", &handler]);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--cluster",
            "green",
            "--discovery-timeout",
            "1s",
            "--peer",
            &s.peer(),
        ],
    );
    out.assert_code(1);
    assert!(!ran.exists(), "a node of another cluster ran a task");
    // The same cluster works.
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--cluster", "blue", "--peer", &s.peer()],
    );
    out.assert_code(0);
    assert!(ran.exists());
}

#[test]
fn peers_lists_a_serving_node() {
    let s = Serve::types("a,b", &["--capacity", "3"]);
    let dir = TestDir::new();
    let out = run_in(dir.path(), &["peers", "--json", "--peer", &s.peer()]);
    out.assert_code(0);
    let found = out.json();
    assert_eq!(found.len(), 1, "{}", out.describe());
    let p = &found[0];
    assert_eq!(p["node"], s.node_id.clone().unwrap().as_str(), "{p}");
    assert_eq!(p["addr"], s.peer().as_str(), "{p}");
    assert_eq!(p["types"], serde_json::json!(["a", "b"]), "{p}");
    assert_eq!(p["capacity"], 3, "{p}");
    // Its load report: nothing ran there yet.
    assert_eq!(p["tasks"], 0, "{p}");
    assert!(p["mean_task_ms"].is_null(), "{p}");
    // After a run of two tasks, it reports them and its mean task time.
    dir.write("tasks.txt", "a1 b1\n");
    run_in(dir.path(), &["run", "tasks.txt", "--peer", &s.peer()]).assert_code(0);
    let out = run_in(dir.path(), &["peers", "--json", "--peer", &s.peer()]);
    let p = &out.json()[0];
    assert_eq!(p["tasks"], 2, "{p}");
    assert!(p["mean_task_ms"].as_f64().is_some_and(|m| m >= 0.0), "{p}");
    let out = run_in(dir.path(), &["peers", "--peer", &s.peer()]);
    assert!(out.stdout.contains("MEAN TASK"), "{}", out.describe());
}

/// Runs `a1 a2` on a single node of type a and kills (SIGKILL) that node while a1 runs.
/// Returns the run's events and the dead node's id.
fn run_and_kill_the_only_node() -> (tests::RunOutput, String) {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let started = dir.join("started");
    let handler = format!("a=touch {}; sleep 3; echo {{id}}", q(&started));
    let node = Serve::types("a", &["--handler", &handler]);
    let id = node.node_id.clone().unwrap();
    let running = spawn_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &node.peer()],
    );
    assert!(poll_until(WAIT, || started.exists()), "a1 never started");
    drop(node); // SIGKILL and reap: no goodbye
    (running.finish(), id)
}

#[test]
fn the_run_ends_with_exit_1_when_the_only_node_of_a_type_dies() {
    let (out, dead) = run_and_kill_the_only_node();
    out.assert_code(1);
    let events = out.json();
    assert!(events_named(&events, "task_completed").is_empty());
    let lost = events_named(&events, "disconnected");
    assert_eq!(lost.len(), 1, "{}", out.describe());
    assert_eq!(lost[0]["node"], dead.as_str());
    assert_eq!(lost[0]["clean"], false, "{}", lost[0]);
    // a1 gets exactly one final result (it cannot run anywhere else).
    let a1: Vec<_> = events
        .iter()
        .filter(|e| {
            e["task"] == "a1" && (e["event"] == "task_failed" || e["event"] == "task_completed")
        })
        .collect();
    assert_eq!(a1.len(), 1, "{}", out.describe());
    assert_eq!(a1[0]["event"], "task_failed");
    let s = events_named(&events, "summary")[0];
    assert_eq!(s["total"], 2, "{s}");
    assert_eq!(s["succeeded"], 0, "{s}");
}

#[test]
fn task_failed_after_node_loss_names_the_last_attempt() {
    // event.rs: task_failed's `node` is "the node id of the last attempt, empty when it never
    // ran" and `attempt` "the attempt number of the last attempt (0 when it never ran)".
    // a1 did run: attempt 1 was assigned to the node that then died.
    let (out, dead) = run_and_kill_the_only_node();
    out.assert_code(1);
    let events = out.json();
    let assigned = events_named(&events, "task_assigned");
    assert!(
        assigned
            .iter()
            .any(|e| e["task"] == "a1" && e["node"] == dead.as_str() && e["attempt"] == 1),
        "{}",
        out.describe()
    );
    let failed = events_named(&events, "task_failed")
        .into_iter()
        .find(|e| e["task"] == "a1")
        .unwrap_or_else(|| panic!("no task_failed for a1\n{}", out.describe()));
    assert_eq!(failed["attempt"], 1, "a1's last attempt was 1: {failed}");
    assert_eq!(
        failed["node"],
        dead.as_str(),
        "a1's last attempt ran on {dead}: {failed}"
    );
}
