//! `run --local`: the in-process nodes take their tasks over the in-memory transport, so
//! the run holds no TCP socket at all, listening or connected, and still behaves as over
//! TCP (handshake, results, goodbye, Ctrl-C).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use tests::{poll_until, shell_quote, spawn_in, TestDir, WAIT};

/// The inodes of the TCP sockets (IPv4 and IPv6, any state) held by process `pid`, each
/// with its line of `/proc/net/tcp{,6}`.
fn tcp_sockets_of(pid: u32) -> Vec<String> {
    let mut inodes = HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().into_owned();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut held = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(9).is_some_and(|i| inodes.contains(*i)) {
                held.push(line.trim().to_string());
            }
        }
    }
    held
}

/// While a `--local` run's task runs, the run's process holds no TCP socket (its in-process
/// nodes listened on loopback and were dialled before); the task still completes, in order,
/// with a clean goodbye. In strict order and in `--order none` (where the nodes run on a
/// thread of their own).
#[test]
fn a_local_run_holds_no_tcp_socket() {
    for order in ["strict", "none"] {
        holds_no_tcp_socket(order);
    }
}

fn holds_no_tcp_socket(order: &str) {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let (started, go) = (dir.join("started"), dir.join("go"));
    // a1 marks that it runs, then waits (at most 30 s) for the test to let it finish.
    let handler = format!(
        "a=touch {s}; i=0; while [ ! -e {g} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); \
         done; echo done {{id}}",
        s = shell_quote(started.to_str().unwrap()),
        g = shell_quote(go.to_str().unwrap()),
    );
    let running = spawn_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "--json",
            "--order",
            order,
            "--handler",
            &handler,
        ],
    );
    assert!(
        poll_until(WAIT, || started.exists()),
        "the task never started:\n{}",
        running.stderr.text()
    );
    let held = tcp_sockets_of(running.pid());
    std::fs::write(&go, "").unwrap();
    let out = running.finish();
    assert!(
        held.is_empty(),
        "a --local run holds TCP sockets:\n{}",
        held.join("\n")
    );
    out.assert_code(0);
    let events = out.json();
    let done: Vec<String> = tests::events_named(&events, "task_completed")
        .iter()
        .map(|e| e["output"].as_str().unwrap().trim().to_string())
        .collect();
    let mut done = done;
    if order == "none" {
        done.sort();
    }
    assert_eq!(done, ["done a1", "done a2"], "{}", out.describe());
    let connected = tests::events_named(&events, "connected");
    assert_eq!(connected.len(), 1, "{}", out.describe());
    let gone = tests::events_named(&events, "disconnected");
    assert_eq!(gone.len(), 1, "{}", out.describe());
    assert_eq!(gone[0]["clean"], true, "{}", out.describe());
}

/// Ctrl-C while a `--local` task runs: the run stops gracefully (the running task is
/// cancelled, the in-process node says goodbye) and exits with the interrupted status, in
/// strict order and in `--order none`.
#[test]
fn interrupting_a_local_run_cancels_its_task_and_exits() {
    for order in ["strict", "none"] {
        interrupting(order);
    }
}

fn interrupting(order: &str) {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let started = dir.join("started");
    let handler = format!(
        "a=touch {}; exec sleep 300",
        shell_quote(started.to_str().unwrap())
    );
    let running = spawn_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "--json",
            "--order",
            order,
            "--handler",
            &handler,
        ],
    );
    assert!(
        poll_until(WAIT, || started.exists()),
        "the task never started:\n{}",
        running.stderr.text()
    );
    running.interrupt();
    let out = running.finish();
    out.assert_code(130);
    let events = out.json();
    let summary = tests::events_named(&events, "summary");
    assert_eq!(summary.len(), 1, "{}", out.describe());
    assert_eq!(summary[0]["interrupted"], true, "{}", out.describe());
    assert_eq!(summary[0]["succeeded"], 0, "{}", out.describe());
}
