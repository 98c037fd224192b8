//! Failures and their exit statuses: 1 for a failed task or a type with no node, 2 for bad
//! input (with the file, line and column of a task-file error).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tests::{events_named, run_in, shell_quote, RunOutput, Serve, TestDir};

/// Whether some line of stdout or stderr names task type `t` (a line mentioning "type" in
/// which `t` stands as a word of its own).
fn names_type(out: &RunOutput, t: &str) -> bool {
    out.stdout.lines().chain(out.stderr.lines()).any(|l| {
        let lower = l.to_ascii_lowercase();
        lower.contains("type")
            && lower
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w == t)
    })
}

#[test]
fn failing_handler_gives_task_failed_and_exit_1() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let a = Serve::types("a", &["--handler", "a=exit 3"]);
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &a.peer()],
    );
    out.assert_code(1);
    let events = out.json();
    let failed = events_named(&events, "task_failed");
    assert_eq!(failed.len(), 1, "{}", out.describe());
    let f = failed[0];
    assert_eq!(f["task"], "a1", "{f}");
    assert_eq!(f["type"], "a", "{f}");
    assert_eq!(f["ok"], false, "{f}");
    assert_eq!(f["exit_code"], 3, "{f}");
    assert_eq!(f["attempt"], 1, "{f}");
    assert_eq!(f["node"], a.node_id.clone().unwrap().as_str(), "{f}");
    assert!(events_named(&events, "task_completed").is_empty());
    let s = events_named(&events, "summary");
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["succeeded"], 0);
    assert_eq!(s[0]["failed"], 1);

    // A person sees the failure too, with the same status.
    let human = run_in(dir.path(), &["run", "tasks.txt", "--peer", &a.peer()]);
    human.assert_code(1);
    assert!(
        human
            .stdout
            .lines()
            .chain(human.stderr.lines())
            .any(|l| l.contains("a1") && l.to_ascii_lowercase().contains("fail")),
        "no line reports a1 as failed\n{}",
        human.describe()
    );
}

#[test]
fn strict_order_stops_at_the_first_failure() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2 a3\n");
    let log = shell_quote(dir.join("ran.log").to_str().unwrap());
    // a2 fails; in strict order a3 must not start after it.
    let handler = format!("a=echo {{id}} >> {log}; test {{id}} != a2");
    let a = Serve::types("a", &["--handler", &handler]);
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &a.peer()],
    );
    out.assert_code(1);
    assert_eq!(
        dir.read_lines("ran.log"),
        ["a1", "a2"],
        "{}",
        out.describe()
    );
    let events = out.json();
    let failed: Vec<&str> = events_named(&events, "task_failed")
        .iter()
        .map(|e| e["task"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["a2"], "{}", out.describe());
    let s = events_named(&events, "summary")[0];
    assert_eq!(s["total"], 3, "{s}");
    assert_eq!(s["succeeded"], 1, "{s}");
    assert_eq!(s["failed"], 1, "{s}");
}

#[test]
fn a_retried_task_that_then_succeeds_exits_0() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let marker = shell_quote(dir.join("failed-once").to_str().unwrap());
    // The first attempt fails (and leaves a marker); the second succeeds.
    let handler =
        format!("a=if test -e {marker}; then echo second; else touch {marker}; exit 5; fi");
    let a = Serve::types("a", &["--handler", &handler]);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--retries",
            "2",
            "--peer",
            &a.peer(),
        ],
    );
    out.assert_code(0);
    let events = out.json();
    let retries = events_named(&events, "task_retry");
    assert_eq!(retries.len(), 1, "{}", out.describe());
    assert_eq!(retries[0]["task"], "a1");
    assert_eq!(retries[0]["attempt"], 1);
    let done = events_named(&events, "task_completed");
    assert_eq!(done.len(), 1, "{}", out.describe());
    assert_eq!(done[0]["attempt"], 2, "{}", done[0]);
    assert_eq!(done[0]["output"].as_str().unwrap().trim(), "second");
    assert!(events_named(&events, "task_failed").is_empty());
}

#[test]
fn a_task_over_its_timeout_fails_with_exit_1() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    // Far longer than the run's hang guard: only the task timeout can end this run in time.
    let a = Serve::types("a", &["--handler", "a=sleep 300"]);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--task-timeout",
            "500ms",
            "--peer",
            &a.peer(),
        ],
    );
    out.assert_code(1);
    let events = out.json();
    let failed = events_named(&events, "task_failed");
    assert_eq!(failed.len(), 1, "{}", out.describe());
    assert_eq!(failed[0]["task"], "a1");
    assert_eq!(failed[0]["ok"], false);
}

#[test]
fn a_needed_type_with_no_node_exits_1_and_names_the_type() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 b1 c1\n");
    let a = Serve::types("a", &[]);
    let b = Serve::types("b", &[]);
    let args = [
        "run",
        "tasks.txt",
        "--discovery-timeout",
        "1s",
        "--peer",
        &a.peer(),
        "--peer",
        &b.peer(),
    ];
    let out = run_in(dir.path(), &args);
    out.assert_code(1);
    assert!(
        names_type(&out, "c"),
        "the output does not name type c\n{}",
        out.describe()
    );

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = run_in(dir.path(), &json_args);
    out.assert_code(1);
    let events = out.json();
    assert!(
        !events_named(&events, "task_completed")
            .iter()
            .any(|e| e["task"] == "c1"),
        "c1 cannot have run\n{}",
        out.describe()
    );
    let s = events_named(&events, "summary");
    assert_eq!(s.len(), 1, "{}", out.describe());
    assert_eq!(s[0]["total"], 3);
    assert_ne!(s[0]["succeeded"], 3);
}

#[test]
fn broken_task_file_exits_2_and_names_file_line_and_column() {
    let dir = TestDir::new();
    dir.write("broken.txt", "a1 a2\n  1x\n");
    let out = run_in(
        dir.path(),
        &["run", "broken.txt", "--discovery", "none", "--json"],
    );
    out.assert_code(2);
    assert!(
        out.stderr.contains("broken.txt:2:3"),
        "stderr does not name broken.txt:2:3\n{}",
        out.describe()
    );
    assert!(
        out.stdout.trim().is_empty(),
        "nothing runs: {}",
        out.describe()
    );

    // The file name is reported as given on the command line.
    std::fs::create_dir(dir.join("sub")).unwrap();
    dir.write("sub/bad.txt", "a1\n\n\tb1 c2 9\n");
    let out = run_in(dir.path(), &["run", "sub/bad.txt", "--discovery", "none"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("sub/bad.txt:3:8"),
        "stderr does not name sub/bad.txt:3:8\n{}",
        out.describe()
    );
}

#[test]
fn duplicate_task_id_exits_2_with_its_position() {
    let dir = TestDir::new();
    dir.write("dup.txt", "a1 b1\nb2 a1\n");
    let out = run_in(dir.path(), &["run", "dup.txt", "--discovery", "none"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("dup.txt:2:4"),
        "stderr does not name dup.txt:2:4\n{}",
        out.describe()
    );
}

#[test]
fn missing_task_file_exits_2() {
    let dir = TestDir::new();
    let out = run_in(
        dir.path(),
        &["run", "no-such-file.txt", "--discovery", "none"],
    );
    out.assert_code(2);
    assert!(
        out.stderr.contains("no-such-file.txt"),
        "stderr does not name the file\n{}",
        out.describe()
    );
    // The default file is tasks.txt: in an empty directory that is missing too.
    let out = run_in(dir.path(), &["run", "--local"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("tasks.txt"),
        "stderr does not name tasks.txt\n{}",
        out.describe()
    );
}

#[test]
fn a_failed_command_reports_its_stderr_and_huge_output_is_capped() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 b1\n");
    // a1 prints 3 MB (more than the 1 MiB cap) and succeeds; b1 complains on stderr and fails.
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "--json",
            "--handler",
            "a=head -c 3000000 /dev/zero | tr '\\0' x",
            "--handler",
            "b=echo something broke >&2; exit 7",
        ],
    );
    out.assert_code(1);
    let events = out.json();
    let done = events_named(&events, "task_completed");
    assert_eq!(done.len(), 1, "{}", &out.stderr);
    let output = done[0]["output"].as_str().unwrap();
    assert!(
        output.len() < 3_000_000 && output.starts_with("xxxx"),
        "a1's output is not capped: {} bytes",
        output.len()
    );
    let failed = events_named(&events, "task_failed");
    assert_eq!(failed.len(), 1, "{}", out.stderr);
    assert_eq!(failed[0]["task"], "b1");
    assert_eq!(failed[0]["exit_code"], 7);
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("something broke"),
        "the error does not carry the command's stderr: {}",
        failed[0]
    );
}
