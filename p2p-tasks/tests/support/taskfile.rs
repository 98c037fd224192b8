//! Checks of the task-file parser's results against the text it read, and a printer.
//!
//! Shared, file for file, by the property suite (`tests/proptest_parse.rs`) and the fuzz
//! target `fuzz/fuzz_targets/task_file.rs` (which includes it with `#[path]`). It depends on
//! nothing but `p2p_tasks`.

#![allow(dead_code)]

use p2p_tasks::parse::{self, ParseError, ParseErrorKind};
use p2p_tasks::task::Input;
use p2p_tasks::Task;

/// The lines of `text` as the parser numbers them (a leading byte-order mark removed).
pub fn lines(text: &str) -> Vec<&str> {
    text.strip_prefix('\u{feff}')
        .unwrap_or(text)
        .lines()
        .collect()
}

/// The characters of `line` from 1-based column `col` on.
fn from_col(line: &str, col: u32) -> String {
    line.chars()
        .skip((col as usize).saturating_sub(1))
        .collect()
}

/// Panics unless `err` names `file` and a position inside `text`: line 0 and column 0 only
/// for errors about the whole file; otherwise a line of the text and the column of a token
/// on it (a character that is neither whitespace nor inside a comment).
pub fn check_error(file: &str, text: &str, err: &ParseError) {
    assert_eq!(err.file, file, "{err}");
    let shown = err.to_string();
    if err.line == 0 {
        assert_eq!(err.col, 0, "{err}");
        assert_eq!(err.kind, ParseErrorKind::NoTasks, "{err}");
        assert_eq!(shown, format!("{file}: {}", err.message));
        return;
    }
    assert_eq!(
        shown,
        format!("{file}:{}:{}: {}", err.line, err.col, err.message)
    );
    let lines = lines(text);
    let line = lines
        .get(err.line as usize - 1)
        .unwrap_or_else(|| panic!("{err}: line {} of {} lines", err.line, lines.len()));
    let code = line.split('#').next().unwrap_or("");
    let chars = code.chars().count();
    assert!(
        err.col >= 1 && err.col as usize <= chars,
        "{err}: column {} outside the {chars} characters before any comment on {line:?}",
        err.col
    );
    let at = from_col(code, err.col);
    assert!(
        at.chars().next().is_some_and(|c| !c.is_whitespace()),
        "{err}: column {} is not the start of a token in {line:?}",
        err.col
    );
}

/// Panics unless every task's line and column point at its id in `text`.
pub fn check_positions(text: &str, tasks: &[Task]) {
    let lines = lines(text);
    for t in tasks {
        let line = lines
            .get((t.line() as usize).wrapping_sub(1))
            .unwrap_or_else(|| panic!("{} at line {} of {}", t.id(), t.line(), lines.len()));
        let at = from_col(line, t.col());
        assert!(
            at.starts_with(t.id()),
            "{} at {}:{} but the text there is {at:?}",
            t.id(),
            t.line(),
            t.col()
        );
    }
}

/// Prints tasks as a task file: one task per line,
/// `ID [after DEP...] [cost N] [timeout DUR] [retries N] [< IN]... [> OUT]... [-- ARGS]`.
pub fn print(tasks: &[Task]) -> String {
    let mut out = String::new();
    for t in tasks {
        out.push_str(t.id());
        if !t.deps().is_empty() {
            out.push_str(" after ");
            out.push_str(&t.deps().join(" "));
        }
        if t.cost() != 1 {
            out.push_str(&format!(" cost {}", t.cost()));
        }
        if let Some(d) = t.timeout() {
            // One token, exact to the nanosecond (`90s`, `1s500000000ns`).
            out.push_str(&format!(" timeout {}s", d.as_secs()));
            if d.subsec_nanos() != 0 {
                out.push_str(&format!("{}ns", d.subsec_nanos()));
            }
        }
        if let Some(n) = t.retries() {
            out.push_str(&format!(" retries {n}"));
        }
        for i in t.inputs() {
            match i {
                Input::Path(p) => out.push_str(&format!(" < {}", p.display())),
                Input::Artifact { task, name } => out.push_str(&format!(" < @{task}/{name}")),
                other => panic!("the parser made an input it cannot write: {other:?}"),
            }
        }
        for o in t.outputs() {
            out.push_str(&format!(" > {o}"));
        }
        if !t.args().is_empty() {
            out.push_str(" -- ");
            out.push_str(t.args());
        }
        out.push('\n');
    }
    out
}

/// What a task is, without its position in the file: id, type, arguments, dependencies,
/// its cost, timeout and retries, and its inputs and outputs.
pub type Meaning = (
    String,
    String,
    String,
    Vec<String>,
    (u32, Option<std::time::Duration>, Option<u32>),
    (Vec<Input>, Vec<String>),
);

/// What the tasks are, without their positions in the file.
pub fn meaning(tasks: &[Task]) -> Vec<Meaning> {
    tasks
        .iter()
        .map(|t| {
            (
                t.id().to_owned(),
                t.kind().to_owned(),
                t.args().to_owned(),
                t.deps().to_vec(),
                (t.cost(), t.timeout(), t.retries()),
                (t.inputs().to_vec(), t.outputs().to_vec()),
            )
        })
        .collect()
}

/// Parses `text` and checks everything above: an error's position, the tasks' positions,
/// and that printing the tasks and parsing that gives the same tasks. Returns the result.
pub fn parse_and_check(text: &str) -> Result<Vec<Task>, ParseError> {
    let file = "tasks.txt";
    let res = parse::parse(file, text);
    match &res {
        Err(err) => check_error(file, text, err),
        Ok(tasks) => {
            assert!(!tasks.is_empty(), "a successful parse without tasks");
            check_positions(text, tasks);
            let printed = print(tasks);
            let again = parse::parse(file, &printed).unwrap_or_else(|e| {
                panic!("the printed file does not parse: {e}\n--- printed ---\n{printed}")
            });
            assert_eq!(
                meaning(&again),
                meaning(tasks),
                "print -> parse changed the tasks\n--- printed ---\n{printed}"
            );
        }
    }
    res
}
