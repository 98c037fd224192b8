//! The operator's terminal is safe from what peers send: task output, error text and the
//! log's fields reach it with every control character escaped (`\x1b`), so a handler
//! cannot retitle the window (OSC 0), write the clipboard (OSC 52) or move the cursor;
//! `--json` stays exact. Text mode shows every line of a task's output, up to a cap.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use p2p_core::{Assign, Message};
use tests::{events_named, hello, run_in, Serve, TestDir, WireClient, WAIT};

/// What a hostile handler prints: OSC 0, OSC 52, clear screen, cursor home, a C1 CSI.
const EVIL: &str = "printf '\\033]0;pwned\\007\\033]52;c;aGk=\\007\\033[2J\\033[H\\302\\2332J'";

/// The raw sequences that must never reach the terminal.
fn assert_no_controls(what: &str, text: &str) {
    for (i, c) in text.char_indices() {
        let bad = (c.is_control() && c != '\n') || ('\u{80}'..='\u{9f}').contains(&c);
        assert!(
            !bad,
            "{what}: raw control character {c:?} at byte {i}:\n{}",
            text.escape_debug()
        );
    }
}

#[test]
fn task_output_and_errors_show_escaped_in_text_mode_and_exact_in_json() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\nb1\n");
    let a = Serve::types("a", &["--handler", &format!("a={EVIL}")]);
    let b = Serve::types("b", &["--handler", &format!("b={EVIL} >&2; exit 3")]);
    let args = [
        "run",
        "tasks.txt",
        "--order",
        "none",
        "--keep-going",
        "--peer",
        &a.peer(),
        "--peer",
        &b.peer(),
    ];
    let out = run_in(dir.path(), &args);
    out.assert_code(1);
    assert_no_controls("stdout", &out.stdout);
    assert_no_controls("stderr", &out.stderr);
    let ok = out
        .stdout
        .lines()
        .find(|l| l.contains("a1 ok"))
        .unwrap_or_else(|| panic!("no line for a1\n{}", out.describe()));
    assert!(
        ok.contains("\\x1b]0;pwned\\x07\\x1b]52;c;aGk=\\x07\\x1b[2J\\x1b[H\\u{9b}2J"),
        "{ok}"
    );
    let failed = out
        .stdout
        .lines()
        .find(|l| l.contains("b1 FAILED"))
        .unwrap_or_else(|| panic!("no line for b1\n{}", out.describe()));
    assert!(failed.contains("exit status 3: \\x1b]0;pwned"), "{failed}");

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = run_in(dir.path(), &json_args);
    out.assert_code(1);
    let events = out.json();
    let done = events_named(&events, "task_completed");
    assert_eq!(
        done[0]["output"],
        "\u{1b}]0;pwned\u{7}\u{1b}]52;c;aGk=\u{7}\u{1b}[2J\u{1b}[H\u{9b}2J",
        "{}",
        out.describe()
    );
}

#[test]
fn text_mode_shows_every_line_of_the_output_up_to_a_cap() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\nb1\n");
    let a = Serve::types(
        "a",
        &["--handler", "a=for i in 1 2 3 4 5; do echo line $i; done"],
    );
    let b = Serve::types(
        "b",
        &[
            "--handler",
            "b=i=1; while [ $i -le 100 ]; do echo row $i; i=$((i+1)); done",
        ],
    );
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--peer", &a.peer(), "--peer", &b.peer()],
    );
    out.assert_code(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("a1 ok"))
        .unwrap_or_else(|| panic!("{}", out.describe()));
    for i in 1..=5 {
        assert_eq!(
            lines[at + i].trim_start(),
            format!("line {i}"),
            "{}",
            out.describe()
        );
        assert!(
            lines[at + i].starts_with("      "),
            "not indented: {:?}",
            lines[at + i]
        );
    }
    let at = lines
        .iter()
        .position(|l| l.contains("b1 ok"))
        .unwrap_or_else(|| panic!("{}", out.describe()));
    for i in 1..=20 {
        assert_eq!(
            lines[at + i].trim_start(),
            format!("row {i}"),
            "{}",
            out.describe()
        );
    }
    let note = lines[at + 21].trim_start();
    assert!(
        note.starts_with("[... 80 more lines") && note.contains("not shown"),
        "{note}\n{}",
        out.describe()
    );
    assert!(!out.stdout.contains("row 21\n"), "{}", out.describe());
}

#[test]
fn peer_strings_reach_the_log_escaped() {
    // A hostile coordinator names its task with terminal sequences; the node logs it (-v).
    let s = Serve::types("a", &["-v"]);
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    c.send(&Message::Assign(Assign {
        seq: 1,
        task: "a1\u{1b}]0;pwned\u{7}\r\nFAKE log line".into(),
        kind: "a".into(),
        args: String::new(),
        attempt: 1,
        timeout_ms: 0,
    }))
    .unwrap();
    c.expect_msg(WAIT, "Completed", |m| matches!(m, Message::Completed(_)));
    let line = s
        .stderr
        .wait_for(WAIT, |l| l.contains("task assigned"))
        .unwrap_or_else(|| panic!("no `task assigned` log line:\n{}", s.stderr.text()));
    assert!(
        line.contains("a1\\x1b]0;pwned\\x07\\r\\nFAKE log line"),
        "{}",
        line.escape_debug()
    );
    assert_no_controls("the node's log", &s.stderr.text());
    assert!(
        !s.stderr.snapshot().iter().any(|l| l.starts_with("FAKE")),
        "a peer forged a log line:\n{}",
        s.stderr.text()
    );
}
