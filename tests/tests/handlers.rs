//! Shell handlers' placeholders, end to end: `{argv}` gives the program one argument per
//! shell word of the task's arguments, plain values go in unquoted (`echo "x {id}"` prints
//! `x a1`), and no value (an id from a hostile coordinator, arguments from a task file)
//! can run a command, wherever the placeholder stands in the command.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use p2p_core::{Assign, Message};
use tests::{events_named, hello, run_in, Serve, TestDir, WireClient, WAIT};

/// The `output` of each `task_completed` event of a `--json` run, by task id.
fn outputs(events: &[serde_json::Value]) -> Vec<(String, String)> {
    events_named(events, "task_completed")
        .iter()
        .map(|e| {
            (
                e["task"].as_str().unwrap().to_owned(),
                e["output"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn argv_gives_one_argument_per_shell_word() {
    let dir = TestDir::new();
    dir.write(
        "tasks.txt",
        "c3 -- --size 10 \"in put.csv\"\nc4 -- 'it''s' \"a \\\"b\\\"\" c\\ d\nc5\n",
    );
    let c = Serve::types(
        "c",
        &[
            "--handler",
            "c=printf '<%s>' {argv}; printf ' %s' \"$#\" {args}",
        ],
    );
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &c.peer()],
    );
    out.assert_code(0);
    let mut got = outputs(&out.json());
    got.sort();
    assert_eq!(
        got,
        [
            (
                "c3".to_owned(),
                "<--size><10><in put.csv> 0 --size 10 \"in put.csv\"".to_owned()
            ),
            (
                "c4".to_owned(),
                "<its><a \"b\"><c d> 0 'it''s' \"a \\\"b\\\"\" c\\ d".to_owned()
            ),
            // No arguments: no words, so printf prints its format once with an empty one.
            ("c5".to_owned(), "<> 0 ".to_owned()),
        ],
        "{}",
        out.describe()
    );
}

#[test]
fn arguments_that_are_not_shell_words_fail_the_task_when_argv_is_used() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "c1 -- \"unclosed\n");
    let c = Serve::types("c", &["--handler", "c=printf '<%s>' {argv}"]);
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &c.peer()],
    );
    out.assert_code(1);
    let events = out.json();
    let failed = events_named(&events, "task_failed");
    assert_eq!(failed.len(), 1, "{}", out.describe());
    let error = failed[0]["error"].as_str().unwrap();
    assert!(error.contains("not shell words"), "{error}");
}

#[test]
fn a_plain_id_goes_in_without_quotes() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let a = Serve::types("a", &["--handler", "a=echo \"x {id}\" 'y {type}' z{id}"]);
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &a.peer()],
    );
    out.assert_code(0);
    assert_eq!(
        outputs(&out.json()),
        [("a1".to_owned(), "x a1 y a za1".to_owned())],
        "{}",
        out.describe()
    );
}

/// A handler that prints the value in every kind of place a placeholder can stand.
const EVERYWHERE: &str = "printf '[%s]' {P} \"x {P}\" 'y {P}' \"$(printf '%s' {P})\" \
                          \"`printf '%s' {P}`\" \"${NOT_SET_X:-{P}}\"";

fn everywhere(p: &str) -> String {
    EVERYWHERE.replace("{P}", p)
}

fn printed_everywhere(v: &str) -> String {
    format!("[{v}][x {v}][y {v}][{v}][{v}][{v}]")
}

/// Values that run `touch VICTIM` if the shell ever reads them as syntax.
fn hostile(victim: &str) -> Vec<String> {
    vec![
        format!("$(touch {victim})"),
        format!("`touch {victim}`"),
        format!("x; touch {victim}"),
        format!("x\ntouch {victim}"),
        format!("\"; touch {victim}; \""),
        format!("'; touch {victim}; '"),
        format!("'\"$(touch {victim})\"'"),
        format!("\\\"; touch {victim} #"),
        format!("}}; touch {victim}; {{"),
    ]
}

#[test]
fn hostile_ids_and_arguments_from_a_coordinator_run_nothing() {
    let dir = TestDir::new();
    let victim = dir.join("pwned");
    let v = victim.to_str().unwrap();
    let handler = format!(
        "a={}; printf '|'; {}",
        everywhere("{id}"),
        everywhere("{args}")
    );
    let s = Serve::types("a", &["--handler", &handler]);
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    for (seq, value) in (1u64..).zip(hostile(v)) {
        c.send(&Message::Assign(Assign {
            seq,
            task: value.clone().into(),
            kind: "a".into(),
            args: value.clone(),
            attempt: 1,
            timeout_ms: 0,
        }))
        .unwrap();
        let done = c.expect_msg(WAIT, "Completed", |m| matches!(m, Message::Completed(_)));
        let Message::Completed(done) = done else {
            unreachable!()
        };
        assert!(!victim.exists(), "{value:?} ran a command");
        assert!(done.ok, "{value:?}: {done:?}");
        assert_eq!(
            done.output,
            format!(
                "{}|{}",
                printed_everywhere(&value),
                printed_everywhere(&value)
            ),
            "{value:?}"
        );
    }
}

#[test]
fn hostile_arguments_in_a_task_file_run_nothing_through_argv() {
    let dir = TestDir::new();
    let victim = dir.join("pwned");
    let v = victim.to_str().unwrap();
    dir.write(
        "tasks.txt",
        &format!("a1 -- '$(touch {v})' \"`touch {v}`\" 'x; touch {v}' \"a'b\" 'c\"d' \\$HOME\n"),
    );
    let a = Serve::types(
        "a",
        &[
            "--handler",
            "a=printf '<%s>' {argv} \"$(printf '[%s]' {argv})\"",
        ],
    );
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &a.peer()],
    );
    out.assert_code(0);
    assert!(!victim.exists(), "the arguments ran a command");
    let words = [
        format!("$(touch {v})"),
        format!("`touch {v}`"),
        format!("x; touch {v}"),
        "a'b".to_owned(),
        "c\"d".to_owned(),
        "$HOME".to_owned(),
    ];
    let angled: String = words.iter().map(|w| format!("<{w}>")).collect();
    let squared: String = words.iter().map(|w| format!("[{w}]")).collect();
    assert_eq!(
        outputs(&out.json()),
        [("a1".to_owned(), format!("{angled}<{squared}>"))],
        "{}",
        out.describe()
    );
}
