//! Size limits over real processes: `--max-output` cuts a task's output and says so,
//! `--max-frame` bounds what a node accepts (a result over it fails its task after a bounded
//! number of attempts instead of running forever), and sizes out of range are usage errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tests::{events_named, run_in, Serve, TestDir};

/// A shell handler for type `a` that prints `n` bytes of `x`.
fn prints(n: usize) -> String {
    format!("a=head -c {n} /dev/zero | tr '\\0' x")
}

#[test]
fn output_over_max_output_is_cut_and_marked() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1");
    let a = Serve::types(
        "a",
        &[
            "--handler",
            &prints(200_000),
            "--max-output",
            "64KiB",
            "--max-frame",
            "128KiB",
        ],
    );
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &a.peer()],
    );
    out.assert_code(0);
    let events = out.json();
    let done = events_named(&events, "task_completed");
    assert_eq!(done.len(), 1, "{}", out.describe());
    let text = done[0]["output"].as_str().unwrap();
    let marker = "\n[output truncated at 65536 bytes]";
    assert!(text.ends_with(marker), "{}", &text[text.len() - 60..]);
    assert_eq!(text.len(), 65_536 + marker.len());
    assert!(text[..65_536].bytes().all(|b| b == b'x'));
}

#[test]
fn a_result_over_the_coordinators_max_frame_fails_its_task_after_bounded_attempts() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2");
    // The node may send 1 MiB of output; the coordinator accepts frames of 64 KiB only.
    let a = Serve::types("a", &["--handler", &prints(200_000)]);
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--max-frame",
            "64KiB",
            "--discovery-timeout",
            "2s",
            "--peer",
            &a.peer(),
        ],
    );
    out.assert_code(1);
    let events = out.json();
    let failed = events_named(&events, "task_failed");
    assert_eq!(failed.len(), 1, "{}", out.describe());
    let error = failed[0]["error"].as_str().unwrap();
    assert!(
        error.contains("lost with its node's connection 3 times") && error.contains("65536"),
        "{error}"
    );
    // Each loss is a connection closed by the coordinator's frame limit.
    let lost = events_named(&events, "disconnected");
    assert_eq!(lost.len(), 3, "{}", out.describe());
    assert!(
        lost.iter().all(|d| d["clean"] == false),
        "{}",
        out.describe()
    );
    // The node stays up and serves a coordinator that accepts its results.
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &a.peer()],
    );
    out.assert_code(0);
    assert_eq!(events_named(&out.json(), "task_completed").len(), 2);
}

#[test]
fn sizes_out_of_range_or_malformed_are_usage_errors() {
    let dir = TestDir::new();
    dir.copy_seed();
    for (args, says) in [
        (&["--max-frame", "1KiB"][..], "must be from 65536"),
        (&["--max-frame", "17MiB"][..], "must be from 65536"),
        (
            &["--max-frame", "64KiB"][..],
            "does not fit in the maximum frame",
        ),
        (&["--max-output", "12parsecs"][..], "unknown unit"),
        (&["--max-output=-5"][..], "is not a size"),
    ] {
        let mut full = vec!["run", "tasks.txt", "--local"];
        full.extend_from_slice(args);
        let out = run_in(dir.path(), &full);
        out.assert_code(2);
        assert!(out.stderr.contains(says), "{args:?}: {}", out.describe());
    }
    // Within range: the seed runs.
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "--max-frame",
            "64KiB",
            "--max-output",
            "48KiB",
        ],
    );
    out.assert_code(0);
}

#[test]
fn a_task_file_over_max_tasks_is_refused_up_front_with_the_limit_named() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2 a3\nb1 after a1\n");
    // Refused before any node is looked for: no peer is given, and none is needed.
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--max-tasks",
            "3",
            "--discovery",
            "none",
        ],
    );
    out.assert_code(2);
    assert!(
        out.stderr.contains("more than 3 tasks") && out.stderr.contains("--max-tasks 3"),
        "{}",
        out.describe()
    );
    // At the limit it runs.
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--max-tasks", "4", "--local", "--quiet"],
    );
    out.assert_code(0);
}
