//! What a person sees and touches (issue 6): the progress bar and the final tables on a
//! terminal (a real pseudo-terminal), plain output on a pipe, `--json` and `--quiet`, the
//! config file (only when named), `--help` examples and shell completions; a count for a counted flag in the
//! config file, `run --local` ignoring the file's discovery, and a port in use said once.
//!
//! Every run here uses `--local` (in-process nodes on loopback).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tests::{
    events_named, json_lines, poll_until, run_in, shell_quote, strip_ansi, ChildGuard, RunOutput,
    TestDir, EVENT_NAMES, RUN_TIMEOUT, SEED_ORDER,
};

fn q(p: &Path) -> String {
    shell_quote(p.to_str().expect("utf-8 temp path"))
}

/// Handlers for the seed's types that take a moment, so a progress bar has time to show.
const SLOW: [&str; 6] = [
    "--handler",
    "a=sleep 0.1; echo {id}",
    "--handler",
    "b=sleep 0.1; echo {id}",
    "--handler",
    "c=sleep 0.1; echo {id}",
];

/// What a command run by [`run_raw`] printed, byte for byte.
struct Raw {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Raw {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            String::from_utf8_lossy(&self.stdout).escape_debug(),
            String::from_utf8_lossy(&self.stderr)
        )
    }
}

/// Collects everything `r` yields into a shared buffer (until EOF or an error: a pty master
/// reports EIO once the last slave descriptor is closed).
fn collect(
    mut r: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    let h = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (buf, h)
}

/// Runs `p2p-node ARGS` in `dir` with stdout and stderr on one pseudo-terminal (120x40) when
/// `tty`, as in a terminal (`stdout` then holds both), else both on pipes; without `NO_COLOR`, so nothing hides a missing terminal
/// check. Killed (by PID) and the test failed if it runs longer than [`RUN_TIMEOUT`].
fn run_raw(dir: &Path, args: &[&str], tty: bool) -> Raw {
    assert!(
        args.contains(&"--local") || args.contains(&"--help"),
        "test safety: --local (or --help) only here"
    );
    let mut cmd = Command::new(tests::bin());
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .env_remove("P2P_KEY_FILE")
        .env("P2P_DATA_DIR", tests::data_dir())
        .env_remove("NO_COLOR")
        .env("TERM", "xterm-256color");
    tests::isolate(&mut cmd);
    let master = if tty {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let size = rustix::termios::Winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&master, size).expect("set the terminal size");
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(name.to_str().expect("utf-8 pty name"))
            .expect("open the pty slave");
        cmd.stderr(Stdio::from(slave.try_clone().expect("dup the pty slave")));
        cmd.stdout(Stdio::from(slave));
        Some(std::fs::File::from(master))
    } else {
        cmd.stdout(Stdio::piped());
        None
    };
    let mut guard = ChildGuard::new(cmd.spawn().expect("spawn p2p-node"));
    // The parent's copy of the slave must close, or the master never sees the end.
    drop(cmd);
    let ((out, out_reader), (err, err_reader)) = match master {
        Some(m) => (collect(m), collect(std::io::empty())),
        None => (
            collect(guard.child_mut().stdout.take().expect("stdout pipe")),
            collect(guard.child_mut().stderr.take().expect("stderr pipe")),
        ),
    };
    let Some(status) = guard.wait_timeout(RUN_TIMEOUT) else {
        guard.kill();
        panic!("p2p-node {args:?} still ran after {RUN_TIMEOUT:?} and was killed");
    };
    poll_until(Duration::from_secs(10), || {
        out_reader.is_finished() && err_reader.is_finished()
    });
    let stdout = out.lock().unwrap().clone();
    let stderr = err.lock().unwrap().clone();
    Raw {
        status,
        stdout,
        stderr,
    }
}

/// The lines of terminal output with escape sequences and carriage returns removed.
fn screen_lines(raw: &[u8]) -> Vec<String> {
    strip_ansi(&String::from_utf8_lossy(raw))
        .split(['\n', '\r'])
        .map(str::to_string)
        .collect()
}

/// Whether some line holds every one of `words` as whole words.
fn has_line_with(lines: &[String], words: &[&str]) -> bool {
    lines.iter().any(|l| {
        let ws: Vec<&str> = l.split_whitespace().collect();
        words.iter().all(|w| ws.contains(w))
    })
}

/// Checks the final tables of a human run of the seed: every task, then per node and type.
fn assert_final_tables(lines: &[String], what: &str) {
    assert!(
        has_line_with(lines, &["TASK", "NODE", "ATTEMPTS", "STATUS"]),
        "{what}: no task table header\n{lines:#?}"
    );
    for id in SEED_ORDER {
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().next() == Some(id) && l.contains("ok")),
            "{what}: no table row for {id}\n{lines:#?}"
        );
    }
    for first in ["NODE", "TYPE"] {
        assert!(
            lines.iter().any(|l| {
                let ws: Vec<&str> = l.split_whitespace().collect();
                ws.first() == Some(&first)
                    && ["TASKS", "FAILURES", "MEAN", "P99"]
                        .iter()
                        .all(|w| ws.contains(w))
            }),
            "{what}: no {first} table with TASKS, FAILURES, MEAN and P99\n{lines:#?}"
        );
    }
}

#[test]
fn a_terminal_gets_a_progress_bar_and_the_final_tables() {
    let dir = TestDir::new();
    dir.copy_seed();
    let mut args = vec!["run", "tasks.txt", "--local"];
    args.extend_from_slice(&SLOW);
    let raw = run_raw(dir.path(), &args, true);
    assert_eq!(raw.status.code(), Some(0), "{}", raw.describe());
    let lines = screen_lines(&raw.stdout);
    let text = lines.join("\n");
    assert!(
        text.contains("/11 tasks") && text.contains("ETA"),
        "no progress bar (`N/11 tasks ... ETA`) on a terminal\n{}",
        raw.describe()
    );
    assert!(
        raw.stdout.contains(&0x1b),
        "a bar redraws with escape sequences; none were written\n{}",
        raw.describe()
    );
    assert_final_tables(&lines, "terminal");
    // The per-task result lines are there too, untorn by the bar.
    for id in SEED_ORDER {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("] {id} ok on node"))),
            "no result line for {id}\n{}",
            raw.describe()
        );
    }
}

/// Checks that nothing of a progress bar is in `raw`'s stdout.
fn assert_no_bar(raw: &Raw, what: &str) {
    let text = raw.text();
    assert!(
        !text.contains("/11 tasks") && !text.contains("ETA"),
        "{what}: a progress bar was drawn\n{}",
        raw.describe()
    );
}

#[test]
fn json_and_quiet_on_a_terminal_draw_no_bar() {
    let dir = TestDir::new();
    dir.copy_seed();
    let mut args = vec!["run", "tasks.txt", "--local", "--json"];
    args.extend_from_slice(&SLOW);
    let raw = run_raw(dir.path(), &args, true);
    assert_eq!(raw.status.code(), Some(0), "{}", raw.describe());
    assert_no_bar(&raw, "--json on a terminal");
    assert!(
        !raw.stdout.contains(&0x1b),
        "--json wrote escape sequences\n{}",
        raw.describe()
    );
    // The terminal turns "\n" into "\r\n"; otherwise every line is one JSON event.
    let text = raw.text().replace("\r\n", "\n");
    let events = json_lines(&text);
    assert_eq!(events_named(&events, "task_completed").len(), 11);

    let mut args = vec!["run", "tasks.txt", "--local", "--quiet"];
    args.extend_from_slice(&SLOW);
    let raw = run_raw(dir.path(), &args, true);
    assert_eq!(raw.status.code(), Some(0), "{}", raw.describe());
    assert_no_bar(&raw, "--quiet on a terminal");
}

#[test]
fn a_pipe_gets_plain_lines_and_json_gets_only_json() {
    let dir = TestDir::new();
    dir.copy_seed();
    let mut args = vec!["run", "tasks.txt", "--local"];
    args.extend_from_slice(&SLOW);
    let raw = run_raw(dir.path(), &args, false);
    assert_eq!(raw.status.code(), Some(0), "{}", raw.describe());
    assert_no_bar(&raw, "stdout on a pipe");
    assert!(
        !raw.stdout.contains(&0x1b) && !raw.stdout.contains(&b'\r'),
        "escape sequences or carriage returns on a pipe\n{}",
        raw.describe()
    );
    let lines: Vec<String> = raw.text().lines().map(str::to_string).collect();
    assert_final_tables(&lines, "pipe");

    let raw = run_raw(
        dir.path(),
        &["run", "tasks.txt", "--local", "--json"],
        false,
    );
    assert_eq!(raw.status.code(), Some(0), "{}", raw.describe());
    for line in raw.text().lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{}", raw.describe()));
        let name = v["event"].as_str().unwrap_or_default();
        assert!(EVENT_NAMES.contains(&name), "unknown event: {line}");
    }
    let events = json_lines(&raw.text());
    assert_eq!(events_named(&events, "task_completed").len(), 11);
    assert_eq!(events_named(&events, "summary").len(), 1);
}

/// A handler for type `t` that fails its first attempt of each task (leaving a marker in
/// `dir`) and succeeds after.
fn fails_once(t: &str, dir: &Path) -> String {
    let m = q(dir);
    format!(
        "{t}=if [ -e {m}/failed-{{id}} ]; then echo ok; else touch {m}/failed-{{id}}; exit 5; fi"
    )
}

fn clear_markers(dir: &TestDir) {
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("failed-"))
        {
            std::fs::remove_file(p).unwrap();
        }
    }
}

fn run_with_config(dir: &TestDir, config: &str, extra: &[&str]) -> RunOutput {
    let handler = fails_once("a", dir.path());
    let mut args = vec![
        "run",
        "tasks.txt",
        "--local",
        "--config",
        config,
        "--handler",
        &handler,
    ];
    args.extend_from_slice(extra);
    clear_markers(dir);
    run_in(dir.path(), &args)
}

#[test]
fn config_file_settings_apply_and_command_line_flags_override_them() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    dir.write("zero.toml", "[run]\nretries = 0\njson = true\n");
    // Top-level keys apply to every command that has the flag.
    dir.write("three.toml", "retries = 3\n\n[run]\njson = true\n");

    // The file's `json = true` applies; its `retries = 0` loses to the command line.
    let out = run_with_config(&dir, "zero.toml", &["--retries", "2"]);
    out.assert_code(0);
    let events = out.json();
    let done = events_named(&events, "task_completed");
    assert_eq!(done.len(), 2, "{}", out.describe());
    assert!(done.iter().all(|e| e["attempt"] == 2), "{}", out.describe());

    // Without the flag the file's value holds: 0 retries, the first failure ends the run.
    let out = run_with_config(&dir, "zero.toml", &[]);
    out.assert_code(1);
    assert!(events_named(&out.json(), "task_retry").is_empty());

    // A top-level `retries = 3` is used by run...
    let out = run_with_config(&dir, "three.toml", &[]);
    out.assert_code(0);
    assert_eq!(events_named(&out.json(), "task_retry").len(), 2);
    // ...unless the command line says otherwise (also in the `--flag=value` form).
    let out = run_with_config(&dir, "three.toml", &["--retries=0"]);
    out.assert_code(1);
}

#[test]
fn config_file_order_applies() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 b1\n");
    dir.write("none.toml", "[run]\norder = \"none\"\njson = true\n");
    // a1 and b1 each wait (bounded) for the other to start: only possible when they run at
    // the same time, which the default strict order forbids.
    let marks = q(dir.path());
    let h = |t: &str, other: &str| {
        format!(
            "{t}=touch {marks}/started-{t}; i=0; while [ ! -e {marks}/started-{other} ] \
             && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; [ -e {marks}/started-{other} ]"
        )
    };
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "--config",
            "none.toml",
            "--handler",
            &h("a", "b"),
            "--handler",
            &h("b", "a"),
        ],
    );
    out.assert_code(0);
    assert_eq!(events_named(&out.json(), "task_completed").len(), 2);
}

#[test]
fn a_command_line_switch_overrides_a_conflicting_one_in_the_file() {
    let dir = TestDir::new();
    dir.copy_seed();
    dir.write("quiet.toml", "[run]\nquiet = true\n");
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "--config",
            "quiet.toml",
            "--json",
        ],
    );
    out.assert_code(0);
    assert_eq!(events_named(&out.json(), "task_completed").len(), 11);

    dir.write("json.toml", "[run]\njson = true\n");
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--local", "--config", "json.toml", "-q"],
    );
    out.assert_code(0);
    assert!(!out.stdout.contains("\"event\""), "{}", out.describe());
}

#[test]
fn an_unknown_config_key_exits_2_naming_it() {
    let dir = TestDir::new();
    dir.copy_seed();
    for (file, text, key) in [
        ("run.toml", "[run]\nretrys = 2\n", "retrys"),
        ("top.toml", "colour = true\n", "colour"),
    ] {
        dir.write(file, text);
        let out = run_in(
            dir.path(),
            &["run", "tasks.txt", "--local", "--config", file],
        );
        out.assert_code(2);
        assert!(
            out.stderr.contains(key),
            "the error should name {key:?}\n{}",
            out.describe()
        );
        assert!(!out.stdout.contains("Executing task"), "{}", out.describe());
    }
}

#[test]
fn p2p_node_toml_in_the_working_directory_is_only_read_when_named() {
    let dir = TestDir::new();
    dir.copy_seed();
    dir.write("p2p-node.toml", "[run]\njson = true\n");
    // Not read silently any more (a file in the working directory could set handlers), but
    // said.
    let out = run_in(dir.path(), &["run", "tasks.txt", "--local"]);
    out.assert_code(0);
    assert!(!out.stdout.contains("\"event\""), "{}", out.describe());
    assert!(
        out.stderr.contains("p2p-node.toml is not read any more")
            && out.stderr.contains("--config p2p-node.toml"),
        "{}",
        out.describe()
    );
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--local", "--config", "p2p-node.toml"],
    );
    out.assert_code(0);
    let events = out.json();
    assert_eq!(
        events_named(&events, "summary").len(),
        1,
        "{}",
        out.describe()
    );
    assert_eq!(events_named(&events, "task_completed").len(), 11);
    assert!(
        !out.stderr.contains("not read any more"),
        "{}",
        out.describe()
    );
}

#[test]
fn completions_bash_prints_a_script_naming_the_subcommands() {
    let dir = TestDir::new();
    let out = run_in(dir.path(), &["completions", "bash"]);
    out.assert_code(0);
    for word in ["serve", "run", "peers", "keygen", "--order", "complete"] {
        assert!(
            out.stdout.contains(word),
            "the bash script does not mention {word}\n{}",
            out.describe()
        );
    }
    assert!(
        out.stdout.contains("p2p-node"),
        "the script is not for p2p-node\n{}",
        out.describe()
    );
}

#[test]
fn help_of_each_subcommand_shows_examples() {
    let dir = TestDir::new();
    for sub in ["run", "serve", "peers"] {
        let raw = run_raw(dir.path(), &[sub, "--help"], false);
        assert_eq!(raw.status.code(), Some(0), "{}", raw.describe());
        let text = raw.text();
        assert!(
            text.contains("Example"),
            "{sub} --help: no examples\n{}",
            raw.describe()
        );
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("p2p-node {sub} "))),
            "{sub} --help has no example command\n{}",
            raw.describe()
        );
    }
    let raw = run_raw(dir.path(), &["run", "--help"], false);
    assert!(
        raw.text()
            .lines()
            .any(|l| l.trim() == "p2p-node run tasks.txt --local"),
        "run --help should show the README's first command\n{}",
        raw.describe()
    );
}

#[test]
fn quiet_prints_no_per_task_lines_but_the_summary() {
    let dir = TestDir::new();
    dir.copy_seed();
    for flag in ["-q", "--quiet"] {
        let out = run_in(dir.path(), &["run", "tasks.txt", "--local", flag]);
        out.assert_code(0);
        let all: Vec<&str> = out.stdout.lines().chain(out.stderr.lines()).collect();
        for id in SEED_ORDER {
            assert!(
                !all.iter().any(|l| l.split_whitespace().any(|w| w == id)),
                "{flag}: a line about {id}\n{}",
                out.describe()
            );
        }
        assert!(!out.stdout.contains("Executing task"), "{}", out.describe());
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("11 tasks: 11 succeeded")),
            "{flag}: no summary line\n{}",
            out.describe()
        );
    }
}

#[test]
fn quiet_still_reports_a_failure_with_its_place_in_the_run() {
    let dir = TestDir::new();
    dir.copy_seed();
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "-q",
            "--handler",
            "a=test {id} != a2",
        ],
    );
    out.assert_code(1);
    let failed: Vec<&str> = out
        .stdout
        .lines()
        .chain(out.stderr.lines())
        .filter(|l| l.contains("a2") && l.to_lowercase().contains("fail"))
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "one line reports a2's failure\n{}",
        out.describe()
    );
    assert!(
        !out.stdout
            .lines()
            .any(|l| l.split_whitespace().any(|w| w == "a1")),
        "a1 succeeded: quiet says nothing about it\n{}",
        out.describe()
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("11 tasks: 1 succeeded, 1 failed")),
        "{}",
        out.describe()
    );
}

#[test]
fn quiet_failure_line_counts_every_finished_task() {
    let dir = TestDir::new();
    dir.copy_seed();
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "-q",
            "--handler",
            "a=test {id} != a2",
        ],
    );
    out.assert_code(1);
    assert!(
        out.stdout.lines().any(|l| l.contains("[ 2/11] a2 FAILED")),
        "{}",
        out.describe()
    );
}

#[test]
fn a_count_in_the_config_file_sets_a_counted_flag() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    dir.write("c.toml", "verbose = 1\n");
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--local", "--config", "c.toml"],
    );
    // Not `1` taken for the task file: the run runs, with debug logging.
    out.assert_code(0);
    assert!(out.stderr.contains("DEBUG"), "{}", out.describe());
    dir.write("c.toml", "[run]\njson = 1\n");
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--local", "--config", "c.toml"],
    );
    out.assert_code(2);
    assert!(
        out.stderr.contains("json: expected true or false"),
        "{}",
        out.describe()
    );
}

/// Safe by construction: the config's discovery is `dns:` of an IP literal on loopback
/// (no resolver is asked, nothing is sent beyond loopback), whose use shows as a connection
/// to a listener of this test.
#[test]
fn run_local_never_uses_the_config_files_discovery() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let watch = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = watch.local_addr().unwrap().port();
    dir.write(
        "c.toml",
        &format!("discovery = [\"dns:127.0.0.1:{port}\"]\ndiscovery-timeout = \"1s\"\n"),
    );
    // One second of work: a dialer that would use the config's discovery has long dialled.
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "-v",
            "--handler",
            "a=sleep 0.5",
            "--config",
            "c.toml",
        ],
    );
    out.assert_code(0);
    watch.set_nonblocking(true).unwrap();
    match watch.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!(
            "run --local dialled the config file's dns discovery: {other:?}\n{}",
            out.describe()
        ),
    }
    let chosen = out
        .stderr
        .lines()
        .find(|l| l.contains("discovery backends of this run"))
        .unwrap_or_else(|| panic!("no log of the discovery chosen\n{}", out.describe()));
    assert!(!chosen.contains("dns"), "{chosen}");
}

#[test]
fn a_port_in_use_is_said_once_with_the_address_and_what_to_do() {
    let dir = TestDir::new();
    let data = dir.join("data");
    let data_s = data.to_str().unwrap().to_string();
    let first = tests::Serve::types("a", &["--data-dir", &data_s]);
    let addr = first.addr.to_string();
    let out = run_in(
        dir.path(),
        &[
            "serve",
            "--types",
            "a",
            "--listen",
            &addr,
            "--discovery",
            "none",
            "--data-dir",
            &data_s,
        ],
    );
    out.assert_code(1);
    let error = out
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line\n{}", out.describe()));
    assert!(!error.contains("  "), "{error}");
    let said = out.stderr.matches("already in use").count();
    assert_eq!(said, 1, "{}", out.describe());
    assert!(
        out.stderr.contains(&addr) && out.stderr.contains("--listen"),
        "{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("identity loaded") && !out.stderr.contains("created a new identity"),
        "{}",
        out.describe()
    );
    assert!(
        !data.join("identity-2").exists(),
        "the node that could not start left an identity slot behind"
    );
    drop(first);
}
