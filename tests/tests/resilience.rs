//! Scheduling under stress (issue 4): the three order modes across three serving processes,
//! load balancing within capacity, failover after a SIGKILL, task timeouts that leave no
//! process behind, journal and resume after the coordinator dies, `--keep-going`, and plan
//! errors.
//!
//! No assertion depends on timing. Order and concurrency are read from logs the handlers
//! write themselves (`start ID` / `end ID` lines appended with `>>`, one small `write` each,
//! so lines never interleave): a log interval lies inside the task's real run, so an overlap
//! seen in a log really happened. Where a test must prove that two tasks DID run at the same
//! time, the handlers wait (bounded) for each other's marker file: a handler that waits for a
//! task that never starts fails, and the run with it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tests::{
    events_named, poll_until, process_ended, run_in, shell_quote, spawn_in, RunOutput, Serve,
    TestDir, SEED_ORDER, WAIT,
};

fn q(p: &Path) -> String {
    shell_quote(p.to_str().expect("utf-8 temp path"))
}

/// Shell that waits up to ~20 s for the file `path` (a shell word) to exist, then fails
/// (exit 7) if it still does not.
fn wait_for_file(path: &str) -> String {
    format!(
        "i=0; while [ ! -e {path} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; \
         [ -e {path} ] || exit 7"
    )
}

/// A handler for type `t` that appends `start ID` to `log`, creates `marks/started-ID`,
/// then waits for the `started-` markers of the tasks `waits` lists for its id, sleeps 50 ms
/// and appends `end ID`.
fn logging_handler(t: &str, log: &Path, marks: &Path, waits: &[(&str, &[&str])]) -> String {
    let marks = q(marks);
    let mut case = String::from("w=; case {id} in ");
    for (id, others) in waits {
        case.push_str(&format!("{id}) w={};; ", shell_quote(&others.join(" "))));
    }
    case.push_str("esac; ");
    format!(
        "{t}=echo start {{id}} >> {log}; touch {marks}/started-{{id}}; {case}\
         for x in $w; do {wait}; done; sleep 0.05; echo end {{id}} >> {log}",
        log = q(log),
        wait = wait_for_file(&format!("{marks}/started-\"$x\"")),
    )
}

/// Three serving processes, for types a, b and c, with capacity 2 and [`logging_handler`]s
/// sharing one log.
fn three_nodes(dir: &TestDir, waits: &[(&str, &[&str])]) -> Vec<Serve> {
    let log = dir.join("order.log");
    ["a", "b", "c"]
        .iter()
        .map(|t| {
            let h = logging_handler(t, &log, dir.path(), waits);
            Serve::types(t, &["--capacity", "2", "--handler", &h])
        })
        .collect()
}

/// `run TASKS --json --order ORDER --peer ...` in `dir`.
fn run_over(dir: &TestDir, nodes: &[Serve], order: &str) -> RunOutput {
    let peers: Vec<String> = nodes.iter().map(Serve::peer).collect();
    let mut args = vec!["run", "tasks.txt", "--json", "--order", order];
    for p in &peers {
        args.push("--peer");
        args.push(p);
    }
    run_in(dir.path(), &args)
}

/// The parsed `start ID` / `end ID` lines of a handler log: (is_start, id).
fn marks(lines: &[String]) -> Vec<(bool, String)> {
    lines
        .iter()
        .map(|l| match l.split_once(' ') {
            Some(("start", id)) => (true, id.to_string()),
            Some(("end", id)) => (false, id.to_string()),
            _ => panic!("unexpected log line {l:?} in {lines:?}"),
        })
        .collect()
}

/// Checks that every task of `ids` has exactly one start and one end, start first.
fn assert_each_ran_once(lines: &[String], ids: &[&str]) {
    for id in ids {
        let s: Vec<usize> = positions(lines, "start", id);
        let e: Vec<usize> = positions(lines, "end", id);
        assert!(
            s.len() == 1 && e.len() == 1 && s[0] < e[0],
            "{id} must start once and end once: {lines:?}"
        );
    }
    assert_eq!(lines.len(), 2 * ids.len(), "unexpected lines: {lines:?}");
}

fn positions(lines: &[String], what: &str, id: &str) -> Vec<usize> {
    let want = format!("{what} {id}");
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| **l == want)
        .map(|(i, _)| i)
        .collect()
}

/// The most tasks running at once according to a start/end log.
fn max_concurrency(lines: &[String]) -> usize {
    let mut running = BTreeSet::new();
    let mut max = 0;
    for (start, id) in marks(lines) {
        if start {
            running.insert(id);
        } else {
            running.remove(&id);
        }
        max = max.max(running.len());
    }
    max
}

#[test]
fn strict_order_never_overlaps_across_three_nodes() {
    let dir = TestDir::new();
    dir.copy_seed();
    let nodes = three_nodes(&dir, &[]);
    let out = run_over(&dir, &nodes, "strict");
    out.assert_code(0);
    let expected: Vec<String> = SEED_ORDER
        .iter()
        .flat_map(|id| [format!("start {id}"), format!("end {id}")])
        .collect();
    assert_eq!(
        dir.read_lines("order.log"),
        expected,
        "strict: each task starts after the previous one ended, in file order\n{}",
        out.describe()
    );
}

#[test]
fn type_order_keeps_each_types_order_and_runs_types_side_by_side() {
    let dir = TestDir::new();
    dir.copy_seed();
    // The first task of each type waits for the other two to start: none can end before
    // all three have started, so all three are in flight at once.
    let nodes = three_nodes(
        &dir,
        &[
            ("a1", &["b1", "c1"]),
            ("b1", &["a1", "c1"]),
            ("c1", &["a1", "b1"]),
        ],
    );
    let out = run_over(&dir, &nodes, "type");
    out.assert_code(0);
    let lines = dir.read_lines("order.log");
    assert_each_ran_once(&lines, &SEED_ORDER);
    for t in ["a", "b", "c"] {
        let mine: Vec<&str> = lines
            .iter()
            .map(String::as_str)
            .filter(|l| l.split_once(' ').is_some_and(|(_, id)| id.starts_with(t)))
            .collect();
        let expected: Vec<String> = SEED_ORDER
            .iter()
            .filter(|id| id.starts_with(t))
            .flat_map(|id| [format!("start {id}"), format!("end {id}")])
            .collect();
        assert_eq!(
            mine, expected,
            "type {t}: file order, one at a time (nodes have capacity 2)\n{lines:?}"
        );
    }
    // Across types there was overlap: the handshake above passed, and the log shows it.
    assert!(max_concurrency(&lines) >= 3, "{lines:?}");
}

#[test]
fn no_order_respects_dependencies_and_overlaps_independent_tasks() {
    let dir = TestDir::new();
    dir.write(
        "tasks.txt",
        "a1 a2 b3 c3\n\
         b1 after a1 a2\n\
         c1 after b1\n\
         c2 after a1\n\
         b2 after c2 a2\n\
         a3 after b1 c2 -- some args\n",
    );
    let deps: [(&str, &[&str]); 5] = [
        ("b1", &["a1", "a2"]),
        ("c1", &["b1"]),
        ("c2", &["a1"]),
        ("b2", &["c2", "a2"]),
        ("a3", &["b1", "c2"]),
    ];
    // Each of the independent tasks a1, a2, b3 and c3 waits for the other three to start:
    // all four are in flight at once (a1 and a2 on one node: capacity 2).
    let nodes = three_nodes(
        &dir,
        &[
            ("a1", &["a2", "b3", "c3"]),
            ("a2", &["a1", "b3", "c3"]),
            ("b3", &["a1", "a2", "c3"]),
            ("c3", &["a1", "a2", "b3"]),
        ],
    );
    let out = run_over(&dir, &nodes, "none");
    out.assert_code(0);
    let lines = dir.read_lines("order.log");
    assert_each_ran_once(
        &lines,
        &["a1", "a2", "a3", "b1", "b2", "b3", "c1", "c2", "c3"],
    );
    for (task, on) in deps {
        let started = positions(&lines, "start", task)[0];
        for d in on {
            let ended = positions(&lines, "end", d)[0];
            assert!(
                ended < started,
                "{task} started before its dependency {d} ended: {lines:?}"
            );
        }
    }
    assert!(max_concurrency(&lines) >= 4, "{lines:?}");
    let done = events_named(&out.json(), "task_completed").len();
    assert_eq!(done, 9, "{}", out.describe());
}

#[test]
fn two_nodes_share_the_work_and_never_exceed_their_capacity() {
    let dir = TestDir::new();
    let ids: Vec<String> = (1..=40).map(|i| format!("a{i}")).collect();
    dir.write("tasks.txt", &format!("{}\n", ids.join(" ")));
    let handler = |n: u32| {
        let log = q(&dir.join(&format!("node{n}.log")));
        format!("a=echo start {{id}} >> {log}; sleep 0.05; echo end {{id}} >> {log}")
    };
    let nodes = [
        Serve::types("a", &["--capacity", "2", "--handler", &handler(1)]),
        Serve::types("a", &["--capacity", "2", "--handler", &handler(2)]),
    ];
    let out = run_over(&dir, &nodes, "none");
    out.assert_code(0);
    let events = out.json();
    let done = events_named(&events, "task_completed");
    assert_eq!(done.len(), 40, "{}", out.describe());
    let mut by_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in &done {
        by_node
            .entry(e["node"].as_str().unwrap().to_string())
            .or_default()
            .insert(e["task"].as_str().unwrap().to_string());
    }
    for (i, node) in nodes.iter().enumerate() {
        let id = node.node_id.clone().unwrap();
        let got = by_node.get(&id).cloned().unwrap_or_default();
        assert!(
            !got.is_empty(),
            "node {} ({id}) got no work: {by_node:?}",
            i + 1
        );
        let lines = dir.read_lines(&format!("node{}.log", i + 1));
        // The node's own log agrees with the events about which tasks it ran.
        let ran: BTreeSet<String> = marks(&lines)
            .into_iter()
            .filter(|(start, _)| *start)
            .map(|(_, id)| id)
            .collect();
        assert_eq!(ran, got, "node {} log vs events", i + 1);
        let max = max_concurrency(&lines);
        assert!(
            max <= 2,
            "node {} ran {max} tasks at once with capacity 2: {lines:?}",
            i + 1
        );
    }
}

fn completed_count(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.contains("\"event\":\"task_completed\""))
        .count()
}

#[test]
fn a_node_killed_mid_run_loses_no_task_and_duplicates_no_result() {
    let dir = TestDir::new();
    let ids: Vec<String> = (1..=400).map(|i| format!("a{i}")).collect();
    dir.write("tasks.txt", &format!("{}\n", ids.join(" ")));
    let mut nodes = vec![
        Serve::types("a", &["--capacity", "2", "--handler", "a=sleep 0.01"]),
        Serve::types("a", &["--capacity", "2", "--handler", "a=sleep 0.01"]),
    ];
    let victim = nodes[0].node_id.clone().unwrap();
    let (p0, p1) = (nodes[0].peer(), nodes[1].peer());
    let running = spawn_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--order",
            "none",
            "--peer",
            &p0,
            "--peer",
            &p1,
        ],
    );
    assert!(
        poll_until(WAIT, || completed_count(&running.stdout.snapshot()) >= 50),
        "50 tasks never completed\n{}\n{}",
        running.stdout.text(),
        running.stderr.text()
    );
    drop(nodes.remove(0)); // SIGKILL (by PID) and reap: no goodbye
    let out = running.finish();
    out.assert_code(0);
    let events = out.json();
    let lost_at = events
        .iter()
        .position(|e| e["event"] == "disconnected" && e["node"] == victim.as_str())
        .unwrap_or_else(|| {
            panic!(
                "no disconnected event for the killed node\n{}",
                out.describe()
            )
        });
    assert_eq!(events[lost_at]["clean"], false, "{}", events[lost_at]);
    let after = events_named(&events[lost_at..], "task_completed").len();
    assert!(
        after > 0,
        "the node was killed after the run had finished: nothing to fail over"
    );
    let mut count: HashMap<String, usize> = HashMap::new();
    for e in events_named(&events, "task_completed") {
        *count
            .entry(e["task"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for id in &ids {
        assert_eq!(
            count.get(id).copied().unwrap_or(0),
            1,
            "{id} must have exactly one task_completed"
        );
    }
    assert_eq!(count.len(), 400);
    assert!(events_named(&events, "task_failed").is_empty());
    let s = events_named(&events, "summary")[0];
    assert_eq!(s["succeeded"], 400, "{s}");
    // The killed node had taken part before it died.
    assert!(
        events_named(&events, "task_completed")[..]
            .iter()
            .any(|e| e["node"] == victim.as_str()),
        "the killed node never completed a task"
    );
}

#[test]
fn a_hung_handler_is_killed_at_the_timeout_and_retried() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let pids = q(&dir.join("pids"));
    // Each attempt records the PID of a background sleep it starts (same process group) and
    // its own PID, which the `exec`ed sleep keeps.
    let handler =
        format!("a=sleep 30 >/dev/null 2>&1 & echo $! >> {pids}; echo $$ >> {pids}; exec sleep 30");
    let node = Serve::types("a", &["--handler", &handler]);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--task-timeout",
            "1s",
            "--retries",
            "1",
            "--peer",
            &node.peer(),
        ],
    );
    out.assert_code(1);
    let events = out.json();
    let retries = events_named(&events, "task_retry");
    assert_eq!(retries.len(), 1, "{}", out.describe());
    assert_eq!(retries[0]["task"], "a1");
    assert!(
        events_named(&events, "task_assigned")
            .iter()
            .any(|e| e["task"] == "a1" && e["attempt"] == 2),
        "no second attempt\n{}",
        out.describe()
    );
    let failed = events_named(&events, "task_failed");
    assert_eq!(failed.len(), 1, "{}", out.describe());
    assert_eq!(failed[0]["attempt"], 2, "{}", failed[0]);
    let pids: Vec<u32> = dir
        .read_lines("pids")
        .iter()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 4, "two attempts, two PIDs each: {pids:?}");
    let mut alive = Vec::new();
    let gone = poll_until(Duration::from_secs(5), || {
        alive = pids
            .iter()
            .copied()
            .filter(|p| !process_ended(*p))
            .collect();
        alive.is_empty()
    });
    assert!(
        gone,
        "handler processes still running after the run: {alive:?}"
    );
}

/// The ids the journal at `path` records as succeeded (lines that do not parse are skipped:
/// the coordinator may have died in the middle of one).
fn journal_succeeded(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["status"] == "succeeded")
        .map(|v| v["task"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn resume_after_the_coordinator_dies_runs_only_what_had_not_succeeded() {
    let dir = TestDir::new();
    let ids: Vec<String> = (1..=20).map(|i| format!("a{i}")).collect();
    dir.write("tasks.txt", &format!("{}\n", ids.join(" ")));
    let journal = dir.join("run.journal");
    let jpath = journal.to_str().unwrap().to_string();
    let handler = format!("a=echo {{id}} >> {}; sleep 0.1", q(&dir.join("ran.log")));
    // Capacity 2: a task left running by the killed coordinator does not block the resumed run.
    let node = Serve::types("a", &["--capacity", "2", "--handler", &handler]);
    let peer = node.peer();
    let running = spawn_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--journal",
            &jpath,
            "--json",
            "--peer",
            &peer,
        ],
    );
    assert!(
        poll_until(WAIT, || journal_succeeded(&journal).len() >= 5),
        "the journal never recorded 5 successes\n{}",
        running.stderr.text()
    );
    drop(running); // SIGKILL the coordinator (by PID) and reap it
    let done_before = journal_succeeded(&journal);
    assert!(
        done_before.len() < ids.len(),
        "the run finished before it was killed"
    );

    // An existing journal is not overwritten or appended to without --resume.
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--journal", &jpath, "--peer", &peer],
    );
    out.assert_code(2);
    // Nor used for another task file.
    dir.write("other.txt", "a1 a2 a3\n");
    let out = run_in(
        dir.path(),
        &[
            "run",
            "other.txt",
            "--journal",
            &jpath,
            "--resume",
            "--peer",
            &peer,
        ],
    );
    out.assert_code(2);
    assert!(
        out.stderr.to_lowercase().contains("different"),
        "the refusal should say the journal is for a different task file\n{}",
        out.describe()
    );
    assert_eq!(journal_succeeded(&journal), done_before);

    let before_resume = dir.read_lines("ran.log").len();
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--journal",
            &jpath,
            "--resume",
            "--json",
            "--peer",
            &peer,
        ],
    );
    out.assert_code(0);
    let ran = dir.read_lines("ran.log");
    for id in &done_before {
        let n = ran.iter().filter(|l| *l == id).count();
        assert_eq!(
            n, 1,
            "{id} had succeeded before the coordinator died, yet ran {n} times: {ran:?}"
        );
    }
    for id in &ids {
        assert!(ran.contains(id), "{id} never ran: {ran:?}");
    }
    // The resumed run went on in file order (strict), skipping the journal's successes. (A
    // task the dead coordinator had just assigned may still start on the node meanwhile and
    // run once more next to its rerun: equal neighbours are allowed.)
    let index = |id: &String| ids.iter().position(|i| i == id).unwrap();
    let resumed: Vec<usize> = ran[before_resume..].iter().map(index).collect();
    assert!(
        resumed.windows(2).all(|w| w[0] <= w[1]),
        "the resumed run broke the file order: {:?}",
        &ran[before_resume..]
    );
    let events = out.json();
    for e in events_named(&events, "task_completed") {
        let t = e["task"].as_str().unwrap();
        assert!(!done_before.contains(t), "{t} ran again: {e}");
    }
    let s = events_named(&events, "summary")[0];
    assert_eq!(s["total"], 20, "{s}");
    assert_eq!(s["succeeded"], 20, "{s}");
    assert_eq!(journal_succeeded(&journal).len(), 20);
}

#[test]
fn keep_going_runs_everything_that_does_not_depend_on_the_failure() {
    let dir = TestDir::new();
    dir.write(
        "tasks.txt",
        "a1 a2 a3 b1\n\
         b2 after a2\n\
         b3 after b2\n\
         c1 after a1\n",
    );
    let ran = q(&dir.join("ran.log"));
    let h = |t: &str| format!("{t}=echo {{id}} >> {ran}; test {{id}} != a2");
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "--order",
            "none",
            "--keep-going",
            "--json",
            "--handler",
            &h("a"),
            "--handler",
            &h("b"),
            "--handler",
            &h("c"),
        ],
    );
    out.assert_code(1);
    let ran: BTreeSet<String> = dir.read_lines("ran.log").into_iter().collect();
    let expected: BTreeSet<String> = ["a1", "a2", "a3", "b1", "c1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        ran,
        expected,
        "independent tasks run, dependents of a2 do not\n{}",
        out.describe()
    );
    let events = out.json();
    let failed: Vec<&str> = events_named(&events, "task_failed")
        .iter()
        .map(|e| e["task"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["a2"], "{}", out.describe());
    let s = events_named(&events, "summary")[0];
    assert_eq!(s["total"], 7, "{s}");
    assert_eq!(s["succeeded"], 4, "{s}");
    assert_eq!(s["failed"], 1, "{s}");
    assert_eq!(s["not_run"], 2, "{s}");
}

/// Whether stdout or stderr mentions every one of `words` (as whole words).
fn mentions(out: &RunOutput, words: &[&str]) -> bool {
    let text = format!("{}\n{}", out.stdout, out.stderr);
    let found: BTreeSet<&str> = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    words.iter().all(|w| found.contains(w))
}

#[test]
fn impossible_plans_exit_2_naming_the_tasks() {
    let dir = TestDir::new();
    dir.write("cycle.txt", "a1\nb1 after c1\nc1 after a1 b1\n");
    dir.write("unknown.txt", "a1 b1\nc1 after a1 z9\n");
    dir.write("later.txt", "a1 after b1\nb1\n");
    let ran = dir.join("ran");
    let handler = |t: &str| format!("{t}=touch {}", q(&ran));
    let cases: [(&str, &str, &[&str]); 3] = [
        ("cycle.txt", "strict", &["b1", "c1"]),
        ("unknown.txt", "none", &["c1", "z9"]),
        ("later.txt", "strict", &["a1", "b1"]),
    ];
    for (file, order, names) in cases {
        let out = run_in(
            dir.path(),
            &[
                "run",
                file,
                "--local",
                "--order",
                order,
                "--handler",
                &handler("a"),
                "--handler",
                &handler("b"),
                "--handler",
                &handler("c"),
            ],
        );
        out.assert_code(2);
        assert!(
            mentions(&out, names),
            "{file}: the error should name {names:?}\n{}",
            out.describe()
        );
        assert!(!ran.exists(), "{file}: a task ran despite the plan error");
    }
    // The dependency on a later task is only impossible in strict order.
    let out = run_in(
        dir.path(),
        &["run", "later.txt", "--local", "--order", "none"],
    );
    out.assert_code(0);
}
