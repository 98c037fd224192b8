//! Hosted runs with files (#19 with #18): `submit` ships the input files its plan names to
//! the hosting node, which keeps them with the run (also across a restart) and never reads
//! a path of its own; `results ID` takes every task's results back; `serve --peer` names
//! the nodes its hosted runs use besides discovery. Real processes over loopback only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use p2p_core::hosted::{Hosted, Submit, SubmitOptions};
use p2p_core::Message;
use tests::{hello, json_lines, poll_until, run_in, Serve, TestDir, WireClient};

/// Generous: the machine has two cores shared by other suites.
const LONG: Duration = Duration::from_secs(90);

/// A serving node of type `a` (a shell handler) with its own data directory.
fn host(data: &Path, extra: &[&str]) -> Serve {
    let mut args = vec!["--handler", "a=sh -c {args}"];
    args.extend_from_slice(extra);
    Serve::hosting("127.0.0.1:0", data, &args)
}

/// `p2p-node submit FILE --peer NODE` from `dir`: the run id (exit 0 checked).
fn submit(dir: &Path, node: &Serve, file: &str) -> String {
    let peer = node.peer();
    let out = run_in(dir, &["submit", file, "--peer", &peer]);
    out.assert_code(0);
    out.stdout.trim().to_string()
}

#[test]
fn inputs_travel_with_a_submitted_plan_and_results_come_back() {
    let dir = TestDir::new();
    let client = dir.join("client");
    std::fs::create_dir_all(client.join("data")).unwrap();
    std::fs::write(client.join("data/in.txt"), "one\ntwo\n").unwrap();
    // 300 KB: several chunks.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(client.join("big.bin"), &big).unwrap();
    std::fs::write(
        client.join("plan.txt"),
        "a1 < data/in.txt > out.txt -- sort -r in.txt > out.txt\n\
         a2 after a1 < @a1/out.txt < big.bin -- cat out.txt; wc -c < big.bin\n",
    )
    .unwrap();
    let node = host(&dir.join("host"), &[]);
    let run = submit(&client, &node, "plan.txt");
    // The host needs nothing of the client's any more.
    std::fs::remove_dir_all(client.join("data")).unwrap();
    std::fs::remove_file(client.join("big.bin")).unwrap();
    let peer = node.peer();
    let out = run_in(&client, &["attach", &run, "--peer", &peer]);
    out.assert_code(0);
    let out = run_in(&client, &["results", &run, "--peer", &peer, "--to", "got"]);
    out.assert_code(0);
    assert!(out.stdout.contains("files"), "{}", out.describe());
    let got = client.join("got");
    assert_eq!(
        std::fs::read_to_string(got.join("a1/out.txt")).unwrap(),
        "two\none\n"
    );
    assert_eq!(
        std::fs::read_to_string(got.join("a2/stdout")).unwrap(),
        "two\none\n300000\n"
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(got.join("a1/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["exit_code"], 0, "{meta}");
    assert!(got.join("a1/stderr").exists());
}

#[test]
fn a_restarted_host_still_has_the_inputs_of_the_run_it_resumes() {
    let dir = TestDir::new();
    let client = dir.join("client");
    std::fs::create_dir_all(&client).unwrap();
    std::fs::write(client.join("in.txt"), "payload\n").unwrap();
    let count = dir.join("count");
    let plan: String = (1..=12)
        .map(|i| {
            format!(
                "a{i} < in.txt -- echo a{i} >> {}; sleep 0.3; cat in.txt\n",
                count.display()
            )
        })
        .collect();
    std::fs::write(client.join("plan.txt"), plan).unwrap();
    let data = dir.join("host");
    let node = host(&data, &[]);
    let run = submit(&client, &node, "plan.txt");
    std::fs::remove_file(client.join("in.txt")).unwrap();
    let ran = || {
        std::fs::read_to_string(&count)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert!(poll_until(LONG, || ran() >= 3), "the run did not start");
    // SIGKILL (dropping a Serve kills and reaps it), then the same data directory.
    drop(node);
    assert!(ran() < 12, "the run finished before the kill");
    let node = host(&data, &[]);
    let peer = node.peer();
    let out = run_in(&client, &["attach", &run, "--peer", &peer, "--json"]);
    out.assert_code(0);
    let events = json_lines(&out.stdout);
    let summary = events.last().expect("a summary");
    assert_eq!(summary["succeeded"], 12, "{}", out.describe());
    let out = run_in(&client, &["results", &run, "--peer", &peer, "--to", "got"]);
    out.assert_code(0);
    for i in 1..=12 {
        let stdout = std::fs::read_to_string(client.join(format!("got/a{i}/stdout"))).unwrap();
        assert_eq!(stdout, "payload\n", "a{i}");
    }
}

#[test]
fn a_missing_input_is_refused_at_submit_with_its_position() {
    let dir = TestDir::new();
    dir.write("plan.txt", "a1\na2 < nowhere.txt\n");
    let node = host(&dir.join("host"), &[]);
    let peer = node.peer();
    let out = run_in(dir.path(), &["submit", "plan.txt", "--peer", &peer]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("plan.txt:2:") && out.stderr.contains("nowhere.txt"),
        "{}",
        out.describe()
    );
    let out = run_in(dir.path(), &["runs", "--peer", &peer, "--json"]);
    out.assert_code(0);
    assert!(
        out.stdout.trim().is_empty(),
        "nothing hosted: {}",
        out.describe()
    );
}

#[test]
fn results_of_an_unknown_run_or_a_path_as_run_id_are_refused() {
    let dir = TestDir::new();
    let node = host(&dir.join("host"), &[]);
    let peer = node.peer();
    for id in ["0123456789abcdef0123456789abcdef", "../../etc", ""] {
        let out = run_in(dir.path(), &["results", id, "--peer", &peer, "--to", "got"]);
        out.assert_code(1);
        assert!(out.stderr.contains("no run"), "{id:?}: {}", out.describe());
    }
    assert!(!dir.join("got").exists());
}

/// A client that sends a plan naming `< PATH` without shipping the file (a bare `Submit`
/// over the raw protocol) is refused: the host never reads a path of its own for a client.
#[test]
fn a_plan_naming_a_file_it_did_not_ship_is_refused_and_the_host_reads_nothing() {
    let dir = TestDir::new();
    let secret = dir.write("secret.txt", "host-only\n");
    let node = host(&dir.join("host"), &[]);
    let mut c = WireClient::connect(node.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(LONG, "Welcome", |m| matches!(m, Message::Welcome(_)));
    let text = format!("a1 < {} -- cat secret.txt\n", secret.display());
    let submit = Hosted::Submit(Box::new(Submit {
        name: "plan.txt".into(),
        text,
        options: SubmitOptions {
            order: 0,
            retries: 0,
            keep_going: false,
            retry_backoff_ms: 100,
            retry_backoff_max_ms: 1000,
            task_timeout_ms: 0,
            discovery_timeout_ms: 1000,
        },
    }));
    c.send(&Message::Hosted(Box::new(submit))).unwrap();
    let answer = c.expect_msg(LONG, "an answer", |m| matches!(m, Message::Hosted(_)));
    let Message::Hosted(h) = answer else {
        unreachable!()
    };
    match *h {
        Hosted::Refused { reason } => {
            assert!(reason.contains("was not sent with the plan"), "{reason}")
        }
        other => panic!("a plan with an unshipped input was hosted: {other:?}"),
    }
}

#[test]
fn a_hosted_run_uses_the_peers_its_host_was_given() {
    let dir = TestDir::new();
    let worker = Serve::start(&[
        "--types",
        "b",
        "--listen",
        "127.0.0.1:0",
        "--discovery",
        "none",
    ]);
    let wpeer = worker.peer();
    let node = host(&dir.join("host"), &["--peer", &wpeer]);
    dir.write("plan.txt", "a1 b1 b2\n");
    let run = submit(dir.path(), &node, "plan.txt");
    let peer = node.peer();
    let out = run_in(dir.path(), &["attach", &run, "--peer", &peer, "--json"]);
    out.assert_code(0);
    let events = json_lines(&out.stdout);
    let on: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["event"] == "task_completed")
        .map(|e| {
            (
                e["task"].as_str().unwrap_or("").to_string(),
                e["node"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let wid = worker.node_id.clone().expect("the worker printed its id");
    assert_eq!(on.len(), 3, "{}", out.describe());
    for (task, node_id) in &on {
        if task.starts_with('b') {
            assert_eq!(node_id, &wid, "{task} ran on the --peer node");
        }
    }
}

#[test]
fn attach_shows_a_hosted_run_as_run_shows_it() {
    let dir = TestDir::new();
    let node = host(&dir.join("host"), &[]);
    dir.write("plan.txt", "a1 -- echo one\na2 -- echo two\n");
    let run = submit(dir.path(), &node, "plan.txt");
    let peer = node.peer();
    let out = run_in(dir.path(), &["attach", &run, "--peer", &peer]);
    out.assert_code(0);
    // run's result lines, its summary line and its node and type tables, then the end.
    for want in [
        "[1/2] a1 ok on node",
        "[2/2] a2 ok on node",
        "2 tasks: 2 succeeded, 0 failed, 0 not run",
        "NODE ",
        "TYPE ",
    ] {
        assert!(out.stdout.contains(want), "{want:?}: {}", out.describe());
    }
    assert!(
        out.stdout.trim_end().ends_with("succeeded"),
        "{}",
        out.describe()
    );
}
