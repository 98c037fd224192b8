//! The seed example: `a1 a2 c1 b1 c2 a3 b2 b3 a4 c3 b4` runs in strict order, across
//! separate serving processes and with `--local`, each task on a node of its type.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use tests::{events_named, run_in, shell_quote, Serve, TestDir, SEED_ORDER};

/// Starts one `serve` process per type, each appending the ids it runs to `log`.
fn serve_abc_logging_to(log: &std::path::Path) -> Vec<(&'static str, Serve)> {
    let log = shell_quote(log.to_str().expect("utf-8 temp path"));
    ["a", "b", "c"]
        .into_iter()
        .map(|t| {
            let handler = format!("{t}=echo {{id}} >> {log}");
            (t, Serve::types(t, &["--handler", &handler]))
        })
        .collect()
}

#[test]
fn seed_runs_in_strict_order_across_three_serving_processes() {
    let dir = TestDir::new();
    dir.copy_seed();
    let log = dir.join("order.log");
    let nodes = serve_abc_logging_to(&log);
    let peers: Vec<String> = nodes.iter().map(|(_, s)| s.peer()).collect();
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--peer",
            &peers[0],
            "--peer",
            &peers[1],
            "--peer",
            &peers[2],
        ],
    );
    out.assert_code(0);
    assert_eq!(
        dir.read_lines("order.log"),
        SEED_ORDER,
        "the shared log must hold the tasks in file order\n{}",
        out.describe()
    );
    drop(nodes);
}

#[test]
fn local_run_shows_the_phases_and_every_task_in_order() {
    let dir = TestDir::new();
    dir.copy_seed();
    let out = run_in(dir.path(), &["run", "tasks.txt", "--local"]);
    out.assert_code(0);
    let stdout = &out.stdout;
    let phases = [
        "Discovering",
        "Initiating connections",
        "Assigning tasks",
        "Terminating connections",
        "Disconnected",
    ];
    let mut last = 0;
    for p in phases {
        let at = stdout[last..]
            .find(p)
            .map(|i| i + last)
            .unwrap_or_else(|| panic!("phase {p:?} missing or out of order\n{}", out.describe()));
        last = at + p.len();
    }
    // Every task's result, in the seed's order (strict order is the default).
    let mut last = 0;
    for id in SEED_ORDER {
        let needle = format!("Executing task: {id}");
        let at = stdout.find(&needle).unwrap_or_else(|| {
            panic!("{needle:?} missing\n{}", out.describe());
        });
        assert!(
            at >= last,
            "{needle:?} printed out of the seed's order\n{}",
            out.describe()
        );
        last = at;
    }
}

#[test]
fn run_without_a_file_argument_reads_tasks_txt() {
    let dir = TestDir::new();
    dir.copy_seed();
    let out = run_in(dir.path(), &["run", "--local", "--json"]);
    out.assert_code(0);
    let events = out.json();
    let done: Vec<&str> = events_named(&events, "task_completed")
        .iter()
        .map(|e| e["task"].as_str().expect("task is a string"))
        .collect();
    assert_eq!(done, SEED_ORDER, "{}", out.describe());
}

#[test]
fn every_task_runs_on_a_node_serving_its_type() {
    let dir = TestDir::new();
    dir.copy_seed();
    let log = dir.join("order.log");
    let nodes = serve_abc_logging_to(&log);
    let mut args = vec!["run", "tasks.txt", "--json"];
    let peers: Vec<String> = nodes.iter().map(|(_, s)| s.peer()).collect();
    for p in &peers {
        args.extend(["--peer", p.as_str()]);
    }
    let out = run_in(dir.path(), &args);
    out.assert_code(0);
    let events = out.json();

    // node id -> types, from the `connected` events.
    let mut types_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in events_named(&events, "connected") {
        let node = c["node"].as_str().expect("connected.node").to_string();
        let types = c["types"]
            .as_array()
            .expect("connected.types is an array")
            .iter()
            .map(|t| t.as_str().expect("a type is a string").to_string())
            .collect();
        types_of.insert(node, types);
    }
    assert_eq!(
        types_of.len(),
        3,
        "three nodes connected\n{}",
        out.describe()
    );
    // The connected events describe the real processes: their ids and addresses.
    for (t, serve) in &nodes {
        let id = serve.node_id.clone().expect("serve printed its node id");
        assert_eq!(
            types_of.get(&id),
            Some(&vec![t.to_string()]),
            "node {id} (serving {t}) is not reported as such\n{}",
            out.describe()
        );
        let c = events_named(&events, "connected")
            .into_iter()
            .find(|c| c["node"] == id.as_str())
            .expect("a connected event for this node");
        assert_eq!(c["addr"], serve.peer().as_str());
    }

    let completed = events_named(&events, "task_completed");
    assert_eq!(completed.len(), SEED_ORDER.len(), "{}", out.describe());
    for e in completed {
        let task = e["task"].as_str().expect("task");
        let kind = e["type"].as_str().expect("type");
        let node = e["node"].as_str().expect("node");
        let leading: String = task.chars().take_while(char::is_ascii_alphabetic).collect();
        assert_eq!(kind, leading, "type of {task}");
        let served = types_of
            .get(node)
            .unwrap_or_else(|| panic!("{task} completed on unknown node {node}"));
        assert!(
            served.iter().any(|t| t == kind),
            "{task} (type {kind}) ran on node {node} which serves {served:?}"
        );
    }
    assert_eq!(dir.read_lines("order.log"), SEED_ORDER);
}
