//! Handler processes never outlive their task or their node (README "Handler processes"):
//! processes that leave the process group (`setsid`, double forks) end with their task,
//! SIGTERM comes first and SIGKILL after `--kill-grace`, and a `serve` killed with
//! `kill -9` mid-task takes its handlers' processes with it (its guard process ends them).
//! And `serve` can be stopped: a second signal stops it at once, `--drain-timeout` bounds
//! the graceful drain, SIGHUP is a graceful stop with a goodbye.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use p2p_core::Message;
use tests::{
    hello, poll_until, process_ended, run_in, shell_quote, spawn_in, Serve, TestDir, WireClient,
    WAIT,
};

/// The pid in `path`, once the file holds one (at most [`WAIT`]).
fn wait_pid(path: &Path, s: &Serve) -> u32 {
    let mut pid = None;
    let found = poll_until(WAIT, || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        pid.is_some()
    });
    assert!(
        found,
        "no pid in {} (the handler never got there):\n{}",
        path.display(),
        s.stderr.text()
    );
    pid.unwrap()
}

/// Asserts that every pid ends within [`WAIT`], naming those that do not.
fn assert_all_end(pids: &[(&str, u32)]) {
    let ended = poll_until(WAIT, || pids.iter().all(|&(_, p)| process_ended(p)));
    if !ended {
        let alive: Vec<String> = pids
            .iter()
            .filter(|&&(_, p)| !process_ended(p))
            .map(|(what, p)| format!("{what} ({p}): {}", cmdline(*p)))
            .collect();
        for &(_, p) in pids {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
        panic!("still running: {alive:?}");
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The children of `pid`, from `/proc/*/stat`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|x| x.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// A handler script that starts a detached process writing its pid to `file` and waits
/// (at most 5 s) until it has.
fn detach(inner: &str, file: &Path) -> String {
    let f = shell_quote(file.to_str().unwrap());
    format!(
        "setsid sh -c {} sh {f} >/dev/null 2>&1 & \
         i=0; while [ ! -s {f} ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done",
        shell_quote(inner)
    )
}

#[test]
fn a_setsid_escapee_ends_with_its_task() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let pidfile = dir.join("escapee");
    // `setsid` leaves the process group, which a group kill would miss.
    let handler = format!(
        "a={}; echo done",
        detach("echo $$ > \"$1\"; exec sleep 300", &pidfile)
    );
    let s = Serve::types("a", &["--handler", &handler]);
    let out = run_in(dir.path(), &["run", "tasks.txt", "--peer", &s.peer()]);
    out.assert_code(0);
    let pid = wait_pid(&pidfile, &s);
    assert_all_end(&[("the setsid escapee", pid)]);
}

#[test]
fn a_double_forked_daemon_ends_with_its_task() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let pidfile = dir.join("daemon");
    let f = shell_quote(pidfile.to_str().unwrap());
    // fork, setsid, fork again; the middle process exits, so the daemon's parent is gone.
    let handler = format!(
        "a=( setsid sh -c 'sleep 300 </dev/null >/dev/null 2>&1 & echo $! > \"$1\"' sh {f} & ); \
         i=0; while [ ! -s {f} ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; echo ok"
    );
    let s = Serve::types("a", &["--handler", &handler]);
    let out = run_in(dir.path(), &["run", "tasks.txt", "--peer", &s.peer()]);
    out.assert_code(0);
    let pid = wait_pid(&pidfile, &s);
    assert_all_end(&[("the double-forked daemon", pid)]);
}

#[test]
fn a_process_ignoring_sigterm_gets_sigkill_after_the_kill_grace() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let pidfile = dir.join("stubborn");
    let termfile = dir.join("term");
    let t = shell_quote(termfile.to_str().unwrap());
    // It notes the SIGTERM, ignores it and goes on, until SIGKILL.
    let inner =
        format!("trap 'echo TERM >> {t}' TERM; echo $$ > \"$1\"; while :; do sleep 0.05; done");
    let handler = format!("a={}; echo done", detach(&inner, &pidfile));
    let s = Serve::types("a", &["--handler", &handler, "--kill-grace", "1s"]);
    let out = run_in(dir.path(), &["run", "tasks.txt", "--peer", &s.peer()]);
    out.assert_code(0);
    let pid = wait_pid(&pidfile, &s);
    let ended = Instant::now();
    assert_all_end(&[("the process ignoring SIGTERM", pid)]);
    let term = std::fs::read_to_string(&termfile).unwrap_or_default();
    assert!(term.contains("TERM"), "it got no SIGTERM first: {term:?}");
    // SIGKILL waited for the grace (the task had ended a little before `ended`).
    assert!(
        ended.elapsed() >= Duration::from_millis(600),
        "{:?}",
        ended.elapsed()
    );
}

#[test]
fn kill_9_of_serve_mid_task_leaves_no_handler_process() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let bg = dir.join("bg");
    let esc = dir.join("esc");
    let daemon = dir.join("daemon");
    let shell = dir.join("shell");
    let q = |p: &Path| shell_quote(p.to_str().unwrap());
    // The task starts a background child (same group), a setsid escapee and a
    // double-forked daemon, then runs on.
    let handler = format!(
        "a=echo $$ > {sh}; sleep 300 & echo $! > {bg}; {esc_cmd}; \
         ( setsid sh -c 'sleep 300 </dev/null >/dev/null 2>&1 & echo $! > \"$1\"' sh {d} & ); \
         sleep 300",
        sh = q(&shell),
        bg = q(&bg),
        esc_cmd = detach("echo $$ > \"$1\"; exec sleep 300", &esc),
        d = q(&daemon),
    );
    let mut s = Serve::types("a", &["--handler", &handler]);
    let serve_pid = s.pid();
    let running = spawn_in(dir.path(), &["run", "tasks.txt", "--peer", &s.peer()]);
    let pids = [
        ("the task's shell", wait_pid(&shell, &s)),
        ("its background child", wait_pid(&bg, &s)),
        ("its setsid escapee", wait_pid(&esc, &s)),
        ("its double-forked daemon", wait_pid(&daemon, &s)),
    ];
    for (what, p) in pids {
        assert!(!process_ended(p), "{what} ({p}) should be running");
    }
    let guard: Vec<u32> = children(serve_pid)
        .into_iter()
        .filter(|&p| cmdline(p).contains("__guard"))
        .collect();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &serve_pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(s.wait_exit(WAIT).is_some(), "serve survived kill -9");
    drop(running);
    let mut all: Vec<(&str, u32)> = pids.to_vec();
    all.extend(guard.iter().map(|&g| ("the guard (after its work)", g)));
    assert_all_end(&all);
}

/// A served node running one long task for a coordinator; the task's pid.
fn node_with_a_long_task(dir: &TestDir, extra: &[&str]) -> (Serve, tests::Running, u32) {
    dir.write("tasks.txt", "a1\n");
    let pidfile = dir.join("task");
    let handler = format!(
        "a=echo $$ > {}; exec sleep 300",
        shell_quote(pidfile.to_str().unwrap())
    );
    let mut args = vec!["--handler", handler.as_str()];
    args.extend_from_slice(extra);
    let s = Serve::types("a", &args);
    let running = spawn_in(
        dir.path(),
        &["run", "tasks.txt", "--peer", &s.peer(), "--json"],
    );
    let pid = wait_pid(&pidfile, &s);
    (s, running, pid)
}

fn signal(sig: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}

#[test]
fn a_second_sigterm_stops_serve_at_once() {
    let dir = TestDir::new();
    let (mut s, _run, task) = node_with_a_long_task(&dir, &[]);
    s.terminate();
    // The first signal drains: the task goes on.
    assert!(
        s.stderr
            .wait_for(WAIT, |l| l.contains("shutting down gracefully"))
            .is_some(),
        "{}",
        s.stderr.text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(s.is_alive(), "serve did not drain after one SIGTERM");
    assert!(
        !process_ended(task),
        "the task should still run while draining"
    );
    // The second stops it at once.
    let second = Instant::now();
    s.terminate();
    let status = s.wait_exit(WAIT).unwrap_or_else(|| {
        panic!(
            "serve still runs after a second SIGTERM:\n{}",
            s.stderr.text()
        )
    });
    assert!(status.success(), "{status}");
    assert!(
        second.elapsed() < Duration::from_secs(10),
        "{:?}",
        second.elapsed()
    );
    assert_all_end(&[("the task", task)]);
    assert!(
        s.stderr.text().contains("stopping at once"),
        "{}",
        s.stderr.text()
    );
}

#[test]
fn drain_timeout_bounds_a_graceful_stop() {
    let dir = TestDir::new();
    let (mut s, _run, task) = node_with_a_long_task(&dir, &["--drain-timeout", "1s"]);
    let sent = Instant::now();
    s.terminate();
    let status = s.wait_exit(WAIT).unwrap_or_else(|| {
        panic!(
            "serve still runs after its drain timeout:\n{}",
            s.stderr.text()
        )
    });
    assert!(status.success(), "{status}");
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert_all_end(&[("the task", task)]);
    assert!(
        s.stderr.text().contains("drain timed out"),
        "{}",
        s.stderr.text()
    );
}

#[test]
fn sighup_is_a_graceful_stop_with_a_goodbye() {
    let mut s = Serve::types("a", &[]);
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    signal("HUP", s.pid());
    c.expect_msg(WAIT, "Goodbye", |m| matches!(m, Message::Goodbye));
    c.send(&Message::GoodbyeAck).unwrap();
    let status = s
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("serve still runs after SIGHUP:\n{}", s.stderr.text()));
    assert!(status.success(), "serve exited with {status} after SIGHUP");
}
