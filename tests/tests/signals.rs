//! Interrupting `run`: exit 130 after SIGINT, 143 after SIGTERM, the tasks it stopped
//! reported as cancelled, and a second signal that stops the run at once. Real processes,
//! signals sent by PID to the run this test spawned.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use tests::{events_named, poll_until, shell_quote, spawn_in, Running, Serve, TestDir, WAIT};

/// A node serving `a` whose handler writes its pid to `pid_file` and then sleeps.
fn sleepy_node(pid_file: &Path, kill_grace: &str) -> Serve {
    let handler = format!(
        "a=echo $$ > {}; exec sleep 300",
        shell_quote(pid_file.to_str().unwrap())
    );
    Serve::types("a", &["--handler", &handler, "--kill-grace", kill_grace])
}

/// Starts `run --json` of `a1 a2` (strict order) against `node` and waits until a1's
/// handler runs; returns the run and the handler's pid.
fn run_until_started(dir: &TestDir, node: &Serve, pid_file: &Path) -> (Running, u32) {
    dir.write("tasks.txt", "a1 a2\n");
    let running = spawn_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &node.peer()],
    );
    let mut pid = None;
    assert!(
        poll_until(WAIT, || {
            pid = std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok());
            pid.is_some()
        }),
        "the task never started:\n{}",
        node.stderr.text()
    );
    (running, pid.unwrap())
}

fn signal_pid(sig: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// One interrupted run: `signal` sent once; checks the exit code and the report.
fn interrupted_run(signal: fn(&Running), code: i32) {
    let dir = TestDir::new();
    let pid_file = dir.join("handler.pid");
    let node = sleepy_node(&pid_file, "2s");
    let (running, _pid) = run_until_started(&dir, &node, &pid_file);
    signal(&running);
    let out = running.finish();
    out.assert_code(code);
    let events = out.json();
    assert!(
        events_named(&events, "task_failed").is_empty(),
        "a cancelled task is not a failure\n{}",
        out.describe()
    );
    let cancelled = events_named(&events, "task_cancelled");
    assert_eq!(cancelled.len(), 1, "{}", out.describe());
    assert_eq!(cancelled[0]["task"], "a1");
    let s = events_named(&events, "summary");
    assert_eq!(s.len(), 1, "{}", out.describe());
    let s = s[0];
    assert_eq!(s["interrupted"], true, "{s}");
    assert_eq!(s["cancelled"], 1, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    assert_eq!(s["not_run"], 1, "{s}");
}

#[test]
fn a_run_interrupted_by_sigint_exits_130_and_reports_its_task_cancelled() {
    interrupted_run(Running::interrupt, 130);
}

#[test]
fn a_run_stopped_by_sigterm_exits_143() {
    interrupted_run(Running::terminate, 143);
}

#[test]
fn the_text_output_says_cancelled_and_interrupted() {
    let dir = TestDir::new();
    let pid_file = dir.join("handler.pid");
    let node = sleepy_node(&pid_file, "2s");
    dir.write("tasks.txt", "a1 a2\n");
    let running = spawn_in(dir.path(), &["run", "tasks.txt", "--peer", &node.peer()]);
    assert!(
        poll_until(WAIT, || pid_file.exists()),
        "the task never started"
    );
    // The pid file is created before the handler writes it: wait for the process too.
    assert!(poll_until(WAIT, || std::fs::read_to_string(&pid_file)
        .is_ok_and(|t| !t.trim().is_empty())));
    running.interrupt();
    let out = running.finish();
    out.assert_code(130);
    assert!(
        out.stdout.contains("a1 cancelled on node"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout
            .contains("2 tasks: 0 succeeded, 0 failed, 1 cancelled, 1 not run"),
        "{}",
        out.describe()
    );
    assert!(out.stdout.contains("(interrupted)"), "{}", out.describe());
    assert!(!out.stdout.contains("FAILED"), "{}", out.describe());
}

#[test]
fn a_second_signal_stops_the_run_at_once() {
    for second in [Running::interrupt as fn(&Running), Running::terminate] {
        let dir = TestDir::new();
        let pid_file = dir.join("handler.pid");
        let node = sleepy_node(&pid_file, "2s");
        let (running, _pid) = run_until_started(&dir, &node, &pid_file);
        // The node hangs (stopped): after one signal the run waits for the cancelled
        // task's result (up to its 1 h task timeout), far beyond `Running::finish`'s hang
        // guard (60 s).
        signal_pid("STOP", node.pid());
        running.interrupt();
        assert!(
            running
                .stderr
                .wait_for(WAIT, |l| l
                    .contains("interrupted: cancelling running tasks"))
                .is_some(),
            "the first signal was not seen:\n{}",
            running.stderr.text()
        );
        second(&running);
        let out = running.finish();
        signal_pid("CONT", node.pid());
        // The exit status names the first signal.
        out.assert_code(130);
        assert!(out.stderr.contains("stopped at once"), "{}", out.describe());
        let events = out.json();
        assert_eq!(events[0]["event"], "run_started", "{}", out.describe());
        assert!(
            events_named(&events, "disconnected").is_empty(),
            "no goodbye was waited for\n{}",
            out.describe()
        );
    }
}
