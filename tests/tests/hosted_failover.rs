//! Hosted runs that survive the loss of their host (#19 stage 2): a host started with two
//! `--replica` nodes keeps each submitted run in a group of three (Raft); killed with
//! SIGKILL for good mid-run, one of the replicas takes the run over and finishes it, and
//! `attach` to a replica ends with the run's exit status. Real processes over loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use tests::{json_lines, poll_until, run_in, Serve, TestDir};

/// Generous: the machine has two cores shared by other suites.
const LONG: Duration = Duration::from_secs(120);

fn node(data: &Path, handler: &str, extra: &[&str]) -> Serve {
    node_on("127.0.0.1:0", data, handler, extra)
}

fn node_on(listen: &str, data: &Path, handler: &str, extra: &[&str]) -> Serve {
    let mut args = vec!["--handler", handler, "--capacity", "4"];
    args.extend_from_slice(extra);
    Serve::hosting(listen, data, &args)
}

/// A run's group: nodes `b` and `c`, then the host `a` replicating to them; each node's
/// handler is `handler(name)`.
fn group(dir: &TestDir, handler: &dyn Fn(&str) -> String) -> (Serve, Serve, Serve) {
    let b = node(&dir.join("b"), &handler("b"), &[]);
    let c = node(&dir.join("c"), &handler("c"), &[]);
    let (pb, pc) = (b.peer(), c.peer());
    let a = node(
        &dir.join("a"),
        &handler("a"),
        &["--replica", &pb, "--replica", &pc],
    );
    (a, b, c)
}

fn lines(path: &Path) -> Vec<String> {
    tests::file_lines(path)
}

fn runs_json(dir: &TestDir, node: &Serve) -> Vec<serde_json::Value> {
    let peer = node.peer();
    let out = run_in(dir.path(), &["runs", "--peer", &peer, "--json"]);
    out.assert_code(0);
    out.json()
}

#[test]
fn a_replica_finishes_the_run_of_a_host_killed_for_good() {
    let dir = TestDir::new();
    // Each node counts the tasks it ran, in a file of its own.
    let count = |n: &str| dir.join(&format!("count-{n}"));
    let handler = |n: &str| format!("a=echo {{id}} >> {}; sleep 0.2", count(n).display());
    let (a, b, c) = group(&dir, &handler);
    let pb = b.peer();
    let text: String = (1..=40).map(|i| format!("a{i}\n")).collect();
    let file = dir.write("plan.txt", &text).display().to_string();
    let pa = a.peer();
    let out = run_in(
        dir.path(),
        &["submit", &file, "--peer", &pa, "--order", "none"],
    );
    out.assert_code(0);
    let run = out.stdout.trim().to_string();
    assert_eq!(run.len(), 32, "{}", out.describe());
    // Both replicas know the run (its plan is committed by the group).
    for r in [&b, &c] {
        assert!(
            poll_until(LONG, || runs_json(&dir, r)
                .iter()
                .any(|v| v["run"] == run.as_str())),
            "a replica does not list the run\nhost log:\n{}\nreplica log:\n{}",
            a.stderr.text(),
            r.stderr.text()
        );
    }
    // The host coordinates (its own tasks run on it: --discovery none).
    assert!(
        poll_until(LONG, || lines(&count("a")).len() >= 8),
        "the run did not start on its host\nhost log:\n{}",
        a.stderr.text()
    );
    // SIGKILL, for good (dropping a Serve kills and reaps it; it never comes back).
    drop(a);
    let on_host = lines(&count("a"));
    assert!(on_host.len() < 40, "the run finished before the kill");
    let out = run_in(dir.path(), &["attach", &run, "--peer", &pb, "--json"]);
    out.assert_code(0);
    let events = json_lines(&out.stdout);
    // The run's events start as a run's do, once, across the takeover.
    assert_eq!(events[0]["event"], "run_started", "{}", out.describe());
    let starts = events
        .iter()
        .filter(|e| e["event"] == "run_started")
        .count();
    assert_eq!(starts, 1, "{}", out.describe());
    let summary = events.last().expect("a summary");
    assert_eq!(summary["event"], "summary", "{}", out.describe());
    assert_eq!(summary["total"], 40);
    assert_eq!(summary["succeeded"], 40);
    // Each task's result was reported once to the attached client.
    let mut done: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "task_completed")
        .filter_map(|e| e["task"].as_str())
        .collect();
    let reported = done.len();
    done.sort();
    done.dedup();
    assert_eq!(done.len(), reported, "a result reported twice");
    // One replica ran the rest: the tasks the host had not finished, and only those.
    let (on_b, on_c) = (lines(&count("b")), lines(&count("c")));
    eprintln!(
        "the host ran {} before its kill; then b ran {} and c ran {}",
        on_host.len(),
        on_b.len(),
        on_c.len()
    );
    assert!(
        on_b.is_empty() != on_c.is_empty(),
        "exactly one replica coordinates: b ran {on_b:?}, c ran {on_c:?}"
    );
    let replica = if on_b.is_empty() { on_c } else { on_b };
    let mut all: Vec<&String> = on_host.iter().chain(&replica).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 40, "every task ran");
    // The replica ran each task once, and ran again only tasks the host had started
    // (those in flight at the kill, or whose results were not committed by the group).
    let mut once = replica.clone();
    once.sort();
    once.dedup();
    assert_eq!(once.len(), replica.len(), "the replica ran a task twice");
    let again: Vec<&String> = replica.iter().filter(|t| on_host.contains(t)).collect();
    eprintln!("ran again after the takeover: {again:?}");
    assert!(again.len() <= on_host.len());
    // Both replicas agree the run succeeded.
    for r in [&b, &c] {
        assert!(poll_until(LONG, || runs_json(&dir, r)
            .iter()
            .any(|v| v["run"] == run.as_str() && v["state"] == "succeeded")));
    }
}

#[test]
fn without_two_replicas_a_run_is_hosted_alone() {
    let dir = TestDir::new();
    let count = dir.join("count");
    let handler = format!("a=echo {{id}} >> {}", count.display());
    // The only replica named does not exist (nothing listens there).
    let a = node(&dir.join("a"), &handler, &["--replica", "127.0.0.1:9"]);
    let file = dir.write("plan.txt", "a1 a2 a3\n").display().to_string();
    let pa = a.peer();
    let out = run_in(dir.path(), &["submit", &file, "--peer", &pa]);
    out.assert_code(0);
    let run = out.stdout.trim().to_string();
    let out = run_in(dir.path(), &["attach", &run, "--peer", &pa, "--json"]);
    out.assert_code(0);
    assert_eq!(lines(&count).len(), 3);
    // Kept as stage 1 keeps it, in the runs directory.
    let node_id = a.node_id.clone().expect("the node printed its id");
    assert!(dir
        .join("a")
        .join("runs")
        .join(&node_id)
        .join(&run)
        .join("journal")
        .exists());
}

/// A raw-protocol peer that names the node a member of a run's group: the node makes the
/// group only when the message's sender is the member the peer's handshake says it is.
#[test]
fn a_node_joins_a_group_only_from_the_member_the_message_names() {
    use p2p_core::replica::{Member, RaftMessage, Replica};
    use p2p_core::Message;
    use tests::{hello, WireClient};
    let dir = TestDir::new();
    let data = dir.join("data");
    let n = node(&data, "a=true", &[]);
    let node_id = n.node_id.clone().expect("the node printed its id");
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&node_id[2 * i..2 * i + 2], 16).expect("a hex node id");
    }
    let me = p2p_core::NodeId(bytes);
    let ask = |run: &str, forged: bool| {
        let h = hello("default");
        let sender = if forged {
            p2p_core::NodeId([9; 16])
        } else {
            h.node_id
        };
        let mut c = WireClient::connect(n.addr);
        c.send(&Message::Hello(h)).unwrap();
        c.expect_msg(Duration::from_secs(10), "Welcome", |m| {
            matches!(m, Message::Welcome(_))
        });
        let members = vec![
            Member {
                node: sender,
                addr: "127.0.0.1:9".into(),
            },
            Member {
                node: me,
                addr: n.peer(),
            },
        ];
        // A heartbeat of term 1 from member 1 to member 2 (the node).
        let m = RaftMessage {
            run: run.into(),
            members,
            msg_type: 8,
            to: 2,
            from: 1,
            term: 1,
            log_term: 0,
            index: 0,
            commit: 0,
            commit_term: 0,
            reject: false,
            reject_hint: 0,
            request_snapshot: 0,
            context: Vec::new(),
            entries: Vec::new(),
        };
        c.send(&Message::Replica(Box::new(Replica::Raft(Box::new(m)))))
            .unwrap();
        // A ping answered after it: the message was taken.
        c.send(&Message::Ping { nonce: 3 }).unwrap();
        c.expect_msg(Duration::from_secs(10), "Pong", |m| {
            matches!(m, Message::Pong { nonce: 3 })
        });
    };
    let groups = data.join("replicas").join(&node_id);
    let forged = "aa".repeat(16);
    ask(&forged, true);
    let honest = "bb".repeat(16);
    ask(&honest, false);
    assert!(
        poll_until(LONG, || groups.join(&honest).join("members.json").exists()),
        "the honest member's group was not made"
    );
    assert!(
        !groups.join(&forged).exists(),
        "a group was made from a message whose sender is not the member it names"
    );
    // A run id that is not one (a path) is refused too.
    ask("../../x", false);
    assert!(!data.join("x").exists() && !groups.join("../../x").exists());
}

/// A replica stopped with SIGTERM mid-run: a client attached to it gets the run's end as
/// `interrupted` (143), the run goes on with the two others, and the replica restarted on
/// its data directory (and address) rejoins the group and reports the run's end.
#[test]
fn a_replica_stopped_and_restarted_rejoins_its_group() {
    let dir = TestDir::new();
    let count = dir.join("count");
    let handler = format!("a=echo {{id}} >> {}; sleep 0.2", count.display());
    let (a, mut b, c) = group(&dir, &|_: &str| handler.to_string());
    let pb = b.peer();
    let text: String = (1..=60).map(|i| format!("a{i}\n")).collect();
    let file = dir.write("plan.txt", &text).display().to_string();
    let pa = a.peer();
    let out = run_in(
        dir.path(),
        &["submit", &file, "--peer", &pa, "--order", "none"],
    );
    out.assert_code(0);
    let run = out.stdout.trim().to_string();
    assert!(poll_until(LONG, || runs_json(&dir, &b)
        .iter()
        .any(|v| v["run"] == run.as_str())));
    let attach = tests::spawn_in(dir.path(), &["attach", &run, "--peer", &pb]);
    assert!(
        attach
            .stdout
            .wait_for(LONG, |l| l.contains("connected to node"))
            .is_some(),
        "attach printed nothing"
    );
    b.terminate();
    assert!(b.wait_exit(LONG).is_some_and(|s| s.success()));
    let attached = attach.finish_within(LONG);
    attached.assert_code(143);
    assert!(
        lines(&count).len() < 60,
        "the run ended before the replica stopped"
    );
    drop(b);
    let b = node_on(&pb, &dir.join("b"), &handler, &[]);
    let out = run_in(dir.path(), &["attach", &run, "--peer", &pb, "--json"]);
    out.assert_code(0);
    let summary = json_lines(&out.stdout).pop().expect("a summary");
    assert_eq!(summary["succeeded"], 60, "{}", out.describe());
    for r in [&a, &b, &c] {
        assert!(poll_until(LONG, || runs_json(&dir, r)
            .iter()
            .any(|v| v["run"] == run.as_str() && v["state"] == "succeeded")));
    }
}

/// `cancel` asked of a replica (not the leader) is forwarded to the leader, recorded in the
/// run's log, and ends the run everywhere: attached clients exit 130.
#[test]
fn cancel_asked_of_a_replica_stops_a_replicated_run() {
    let dir = TestDir::new();
    let started = dir.join("started");
    let handler = format!("a=echo {{id}} >> {}; sleep 30", started.display());
    let (a, b, c) = group(&dir, &|_: &str| handler.to_string());
    let (pb, pc) = (b.peer(), c.peer());
    let file = dir.write("plan.txt", "a1 a2 a3\n").display().to_string();
    let pa = a.peer();
    let out = run_in(dir.path(), &["submit", &file, "--peer", &pa]);
    out.assert_code(0);
    let run = out.stdout.trim().to_string();
    assert!(poll_until(LONG, || !lines(&started).is_empty()));
    assert!(poll_until(LONG, || runs_json(&dir, &c)
        .iter()
        .any(|v| v["run"] == run.as_str())));
    let out = run_in(dir.path(), &["cancel", &run, "--peer", &pc]);
    out.assert_code(0);
    for p in [&pa, &pb, &pc] {
        let out = run_in(dir.path(), &["attach", &run, "--peer", p, "--json"]);
        out.assert_code(130);
    }
    assert!(poll_until(LONG, || runs_json(&dir, &b)
        .iter()
        .any(|v| v["run"] == run.as_str() && v["state"] == "cancelled")));
    assert_eq!(lines(&started).len(), 1, "a task started after the cancel");
}

/// A replicated run with files (#19 stage 2 with #18): the host ships the plan's input to
/// both replicas before the plan is proposed; killed for good mid-run, the replica that
/// takes over runs the rest from its own copy of the input (the client's is gone), runs
/// again the producer whose output its remaining tasks need (it went with the host), and
/// `results` asked of it gives the correct results of the tasks it ran.
#[test]
fn a_replica_finishes_a_run_with_files_from_its_own_copies() {
    let dir = TestDir::new();
    let client = dir.join("client");
    std::fs::create_dir_all(&client).unwrap();
    std::fs::write(client.join("in.txt"), "one\ntwo\nthree\n").unwrap();
    let count = dir.join("count");
    let log = count.display().to_string();
    // a1 makes out.txt from the input; a2..a21 read both, slowly; a22 needs a1's output
    // and ends the chain.
    let mut plan = format!("a1 < in.txt > out.txt -- sort -r in.txt > out.txt; echo a1 >> {log}\n");
    for i in 2..=21 {
        plan.push_str(&format!(
            "a{i} after a1 < @a1/out.txt < in.txt -- sleep 0.3; echo a{i} >> {log}; \
             cat out.txt; wc -l < in.txt\n"
        ));
    }
    plan.push_str(&format!(
        "a22 after a21 < @a1/out.txt > final.txt -- cat out.txt out.txt > final.txt; \
         echo a22 >> {log}\n"
    ));
    std::fs::write(client.join("plan.txt"), &plan).unwrap();
    let handler = "a=sh -c {args}";
    let (a, b, c) = group(&dir, &|_: &str| handler.to_string());
    let (pb, pc) = (b.peer(), c.peer());
    let pa = a.peer();
    let out = run_in(
        &client,
        &["submit", "plan.txt", "--peer", &pa, "--order", "none"],
    );
    out.assert_code(0);
    let run = out.stdout.trim().to_string();
    assert_eq!(run.len(), 32, "{}", out.describe());
    // Nothing of the client's is needed any more.
    std::fs::remove_file(client.join("in.txt")).unwrap();
    // Replicated (not hosted alone): the host keeps it among its groups.
    let host_id = a.node_id.clone().expect("the node printed its id");
    assert!(
        dir.join("a")
            .join("replicas")
            .join(&host_id)
            .join(&run)
            .exists(),
        "a plan with files was not replicated\nhost log:\n{}",
        a.stderr.text()
    );
    // The host ran a1 and a few more, and a replica has them committed as succeeded.
    assert!(
        poll_until(LONG, || runs_json(&dir, &b).iter().any(|v| v["run"]
            == run.as_str()
            && v["succeeded"].as_u64().unwrap_or(0) >= 4)),
        "the run did not progress on its host\nhost log:\n{}",
        a.stderr.text()
    );
    drop(a);
    let on_host = lines(&count);
    assert!(
        on_host.len() < 22,
        "the run finished before the kill: {on_host:?}"
    );
    assert!(on_host.iter().any(|t| t == "a1"), "{on_host:?}");
    let out = run_in(&client, &["attach", &run, "--peer", &pb, "--json"]);
    out.assert_code(0);
    let events = json_lines(&out.stdout);
    let summary = events.last().expect("a summary");
    assert_eq!(summary["total"], 22, "{}", out.describe());
    assert_eq!(summary["succeeded"], 22, "{}", out.describe());
    // Each task's result reported once, a1's too (it runs twice).
    let mut done: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "task_completed")
        .filter_map(|e| e["task"].as_str())
        .collect();
    done.sort_unstable();
    let reported = done.len();
    done.dedup();
    assert_eq!((reported, done.len()), (22, 22), "{}", out.describe());
    // The results of each replica: the one that coordinated has a22's.
    let mut coordinated = None;
    for (name, peer) in [("b", &pb), ("c", &pc)] {
        let to = format!("got-{name}");
        let out = run_in(&client, &["results", &run, "--peer", peer, "--to", &to]);
        out.assert_code(0);
        if client.join(&to).join("a22/final.txt").exists() {
            assert!(coordinated.is_none(), "both replicas ran a22");
            coordinated = Some(client.join(&to));
        }
    }
    let got = coordinated.expect("a replica coordinated the run's end and kept its results");
    let sorted = "two\nthree\none\n";
    // a1 ran again under the new coordinator (its output went with the host) ...
    let all = lines(&count);
    assert!(
        all.iter().filter(|t| *t == "a1").count() >= 2,
        "the producer did not run again: {all:?}"
    );
    assert_eq!(
        std::fs::read_to_string(got.join("a1/out.txt")).unwrap(),
        sorted
    );
    // ... so the tasks after the takeover read its output, and the input from the
    // replica's own copy.
    assert_eq!(
        std::fs::read_to_string(got.join("a22/final.txt")).unwrap(),
        format!("{sorted}{sorted}")
    );
    let mut here = 0;
    for i in 2..=21 {
        let stdout = got.join(format!("a{i}/stdout"));
        if let Ok(text) = std::fs::read_to_string(&stdout) {
            assert_eq!(text, format!("{sorted}3\n"), "a{i}");
            here += 1;
        } else {
            // Not run by the new coordinator: it succeeded under the host.
            assert!(on_host.contains(&format!("a{i}")), "a{i} has no result");
        }
    }
    assert!(here > 0, "the new coordinator ran none of a2..a21");
    eprintln!(
        "the host ran {} before its kill; the new coordinator kept the results of {} of a2..a21",
        on_host.len(),
        here
    );
}

/// Every file under `dir` whose bytes are `bytes` is removed (a node's cached copies).
fn remove_copies(dir: &Path, bytes: &[u8]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            remove_copies(&path, bytes);
        } else if std::fs::read(&path).is_ok_and(|b| b == bytes) {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

/// A replica that lacks an input when it must coordinate (its copies removed behind its
/// back) ends the run failed, saying which input, and runs nothing: it never reads a path
/// of its own (a file at the path the plan writes is there for it to find).
#[test]
fn a_replica_lacking_an_input_ends_the_run_failed_and_runs_nothing() {
    let dir = TestDir::new();
    let client = dir.join("client");
    std::fs::create_dir_all(&client).unwrap();
    let input = b"the client's input\n";
    std::fs::write(client.join("in.txt"), input).unwrap();
    let count = |n: &str| dir.join(&format!("count-{n}"));
    let handler = |n: &str| format!("a=echo {{id}} >> {}; sh -c {{args}}", count(n).display());
    let plan: String = (1..=20)
        .map(|i| format!("a{i} < in.txt -- sleep 0.3; cat in.txt\n"))
        .collect();
    std::fs::write(client.join("plan.txt"), plan).unwrap();
    let (a, b, c) = group(&dir, &handler);
    let pb = b.peer();
    let pa = a.peer();
    let out = run_in(
        &client,
        &["submit", "plan.txt", "--peer", &pa, "--order", "none"],
    );
    out.assert_code(0);
    let run = out.stdout.trim().to_string();
    assert!(
        poll_until(LONG, || lines(&count("a")).len() >= 2),
        "the run did not start on its host\nhost log:\n{}",
        a.stderr.text()
    );
    // Each replica kept its copy when the plan was committed; both copies (and the
    // cached ones) go behind their backs. A file where the plan's path would lead is left
    // in each replica's data directory.
    for (name, r) in [("b", &b), ("c", &c)] {
        let id = r.node_id.clone().expect("the node printed its id");
        let inputs = dir
            .join(name)
            .join("replicas")
            .join(&id)
            .join(&run)
            .join("inputs");
        assert!(
            poll_until(LONG, || inputs.exists()),
            "replica {name} kept no copy of the input\nits log:\n{}",
            r.stderr.text()
        );
        remove_copies(&dir.join(name).join("cache"), input);
        std::fs::remove_dir_all(&inputs).unwrap();
        std::fs::write(dir.join(name).join("in.txt"), input).unwrap();
    }
    drop(a);
    let out = run_in(&client, &["attach", &run, "--peer", &pb, "--json"]);
    out.assert_code(1);
    for r in [&b, &c] {
        assert!(poll_until(LONG, || runs_json(&dir, r)
            .iter()
            .any(|v| v["run"] == run.as_str() && v["state"] == "failed")));
    }
    let logs = format!("{}{}", b.stderr.text(), c.stderr.text());
    assert!(
        logs.contains("lacks an input of the run") && logs.contains("in.txt"),
        "no replica said which input it lacks:\n{logs}"
    );
    assert!(lines(&count("b")).is_empty() && lines(&count("c")).is_empty());
}
