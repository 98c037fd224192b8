//! The run journal under the way operators really use it: runs killed with SIGKILL in the
//! middle of writing it and resumed, again and again, and two coordinators started on one
//! journal at once. Real `p2p-node run --local` processes (loopback only).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use tests::{events_named, poll_until, run_in, spawn_in, TestDir, WAIT};

/// Ids a journal records as succeeded (its lines that are whole records).
fn journaled(path: &Path) -> HashSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["status"] == "succeeded")
        .filter_map(|v| v["task"].as_str().map(str::to_string))
        .collect()
}

fn lines_of(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn sigkill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL {pid} failed");
}

#[test]
fn a_journal_resumes_after_kill_9_mid_run_three_times_over() {
    let dir = TestDir::new();
    const N: usize = 3000;
    let ids: Vec<String> = (1..=N).map(|i| format!("a{i}")).collect();
    dir.write("tasks.txt", &ids.join(" "));
    let journal = dir.join("run.journal");
    let j = journal.to_str().unwrap().to_string();
    let log = dir.join("executed");
    let handler = format!("a=echo {{id}} >> '{}'", log.display());
    let args = [
        "run",
        "tasks.txt",
        "--local",
        "2",
        "--order",
        "none",
        "--json",
        "--journal",
        &j,
        "--resume",
        "--handler",
        &handler,
    ];
    for round in 1..=3 {
        let before = lines_of(&journal);
        let running = spawn_in(dir.path(), &args);
        let pid = running.pid();
        // Killed while results are being journaled: once 100 more lines are in.
        let grew = poll_until(Duration::from_secs(60), || {
            lines_of(&journal) >= before + 100 || tests::process_ended(pid)
        });
        assert!(
            grew && !tests::process_ended(pid),
            "round {round}: the resumed run did not get going (journal {} -> {} lines)\n\
             stderr:\n{}",
            before,
            lines_of(&journal),
            running.stderr.text()
        );
        sigkill(pid);
        let out = running.finish();
        assert_eq!(out.code(), None, "round {round}: killed by the signal");
        if round == 2 {
            // And once, whatever the kill hit, a record torn in the middle.
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&journal)
                .unwrap();
            std::io::Write::write_all(&mut f, b"{\"task\":\"a17\",\"type\":\"a\",\"sta").unwrap();
        }
    }
    // A fourth resume finishes the run; it runs nothing the journal already had.
    let had = journaled(&journal);
    assert!(
        had.len() >= 300,
        "three rounds journaled {} tasks",
        had.len()
    );
    let out = run_in(dir.path(), &args);
    out.assert_code(0);
    let events = out.json();
    let rerun: Vec<&str> = events_named(&events, "task_assigned")
        .iter()
        .filter_map(|e| e["task"].as_str())
        .filter(|t| had.contains(*t))
        .collect();
    assert!(
        rerun.is_empty(),
        "the final resume ran {} tasks the journal had: {:?}",
        rerun.len(),
        &rerun[..rerun.len().min(5)]
    );
    let summary = events_named(&events, "summary");
    assert_eq!(summary.len(), 1, "{}", out.describe());
    assert_eq!(summary[0]["succeeded"], N, "{}", out.describe());
    assert_eq!(journaled(&journal).len(), N, "every task is in the journal");
    let executed: HashSet<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(executed.len(), N, "every task ran at least once");
    // And the journal is whole: any further resume reads it and runs nothing.
    let out = run_in(dir.path(), &args);
    out.assert_code(0);
    assert!(events_named(&out.json(), "task_assigned").is_empty());
}

#[cfg(unix)]
#[test]
fn a_second_coordinator_on_a_journal_in_use_is_refused_with_exit_2() {
    let dir = TestDir::new();
    let ids: Vec<String> = (1..=20).map(|i| format!("a{i}")).collect();
    dir.write("tasks.txt", &ids.join(" "));
    let journal = dir.join("run.journal");
    let j = journal.to_str().unwrap().to_string();
    let log = dir.join("executed");
    // 20 tasks of 0.3 s one after another: long enough for the other coordinators, even on
    // a loaded machine.
    let handler = format!("a=sleep 0.3; echo {{id}} >> '{}'", log.display());
    let run_args = |journal: &str, resume: bool| -> Vec<String> {
        let mut v: Vec<String> = [
            "run",
            "tasks.txt",
            "--local",
            "--json",
            "--journal",
            journal,
            "--handler",
            &handler,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if resume {
            v.push("--resume".into());
        }
        v
    };
    let first_args = run_args(&j, false);
    let first = spawn_in(dir.path(), &strs(&first_args));
    // The journal is held from its header on.
    assert!(
        poll_until(WAIT, || lines_of(&journal) >= 1),
        "the first run wrote no journal header"
    );
    let hard = dir.join("hard.journal");
    std::fs::hard_link(&journal, &hard).unwrap();
    let sym = dir.join("sym.journal");
    std::os::unix::fs::symlink(&journal, &sym).unwrap();
    for path in [&journal, &hard, &sym] {
        let p = path.to_str().unwrap();
        let out = run_in(dir.path(), &strs(&run_args(p, true)));
        out.assert_code(2);
        assert!(
            out.stderr.contains("in use by another running p2p-node"),
            "{}",
            out.describe()
        );
        assert!(events_named(&out.json(), "task_assigned").is_empty());
    }
    let out = first.finish();
    out.assert_code(0);
    let executed = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        executed.lines().count(),
        20,
        "each task ran once, by the first coordinator only:\n{executed}"
    );
    // Free again once that run ended.
    let out = run_in(dir.path(), &strs(&run_args(&j, true)));
    out.assert_code(0);
    assert!(events_named(&out.json(), "task_assigned").is_empty());
}
