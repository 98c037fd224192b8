//! The task-file parser.
//!
//! # Format (the seed format)
//!
//! Whitespace-separated task ids, any number per line, e.g. `a1 a2 c1 b1`. A `#` starts a
//! comment that runs to the end of the line, also right after a token (`a1# note`). Blank
//! lines, tabs and CRLF line ends are fine; a leading byte-order mark is ignored. Every id
//! must match `^[A-Za-z]+[0-9][A-Za-z0-9_.-]*$` and appear once (exact comparison).
//!
//! Every error names the file, the 1-based line and the 1-based column (in characters) of the
//! offending token: `tasks.txt:2:5: invalid task id "1a": ...`.
//!
//! # Extension: dependencies, costs, limits and arguments
//!
//! A line that contains one of the words `after`, `cost`, `timeout`, `retries` or `--`
//! declares exactly one task, with clauses:
//!
//! ```text
//! b2 after a1 c1            # b2 starts only after a1 and c1 succeeded
//! c3 -- --size 10 input.csv # c3's arguments: "--size 10 input.csv" (its handler's {args})
//! b4 after b2 -- fast       # both
//! a5 cost 10 timeout 2m retries 3  # a big task, with its own limits
//! ```
//!
//! Grammar, per line:
//! `ID* | ID [after DEP+] [cost N] [timeout DUR] [retries N] [< IN]... [> OUT]... [-- ARGS]`,
//! the clauses before `--` in any order, each at most once but `<` and `>`. `ARGS` is the rest of the line
//! (before a `#` comment), trimmed. `cost` is a whole number from 1 (the default); `timeout`
//! a duration as on the command line (`500ms`, `30s`, `2m`, `1h`; `0` for none); `retries` a
//! count. A missing or bad value, or a clause given twice, is an error at that word. A dependency may name a task declared anywhere in the file.
//! A dependency on an unknown task, on the task itself, or a cycle of dependencies is an
//! error that names the tasks. Plain lines keep the seed format's meaning.
//!
//! # Files: inputs and outputs
//!
//! ```text
//! a1 < data/in.csv > out.txt      # ship data/in.csv as in.csv, fetch out.txt back
//! b1 < @a1/out.txt > sum/total    # a1's output out.txt (b1 runs after a1), fetch sum/total
//! ```
//!
//! `< PATH` is a file on the coordinator's side, relative to the task file's directory (or
//! absolute), placed in the task's working directory under its file name; [`load`] checks
//! that it is a readable regular file (an error at the path's column otherwise). `< @DEP/NAME`
//! is the declared output `NAME` of task `DEP`, placed under NAME's last component; it implies
//! `after DEP`, and `DEP` must declare `> NAME`. `> NAME` is a file the task writes in its
//! working directory: a plain relative path (no `..`, `.`, empty component, leading `/` or
//! control character; see [`crate::task::output_name_problem`]). A path is one word: it
//! cannot hold whitespace or `#`. Two inputs of a task may not share a file name, nor may an
//! output be declared twice.

use std::fmt;
use std::path::{Path, PathBuf};

use compact_str::CompactString;

use crate::task::{id_problem, kind_of_compact, output_name_problem, IdIndex, IdKeys, Input, Task};

/// What kind of problem a [`ParseError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// A token is not a valid task id.
    InvalidId,
    /// A task id appears a second time.
    DuplicateId,
    /// The file holds no task.
    NoTasks,
    /// A dependency clause is malformed, names an unknown task, or dependencies form a cycle.
    Dependency,
    /// A line mixes plain tasks with clauses, or holds a word that is not a clause.
    Syntax,
    /// A `cost`, `timeout` or `retries` clause has no value or a bad one, or a clause is
    /// given twice.
    Keyword,
    /// The file could not be read.
    Io(std::io::ErrorKind),
    /// The file is not valid UTF-8.
    NotUtf8,
    /// An input (`< IN`) or output (`> OUT`) clause is malformed, names a path outside the
    /// working directory, a file that cannot be read, or an output its task does not declare.
    File,
    /// The file holds more tasks than the caller's limit ([`load_at_most`]).
    TooManyTasks,
}

/// An error reading a task file. Its `Display` is `file:line:col: message`, or `file: message`
/// when the error has no position (`line` and `col` are 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// The file name as given to [`parse`] or [`load`].
    pub file: String,
    /// 1-based line of the problem; 0 when the error concerns the whole file.
    pub line: u32,
    /// 1-based column (in characters) of the offending token; 0 when there is no position.
    pub col: u32,
    /// What is wrong, and what is expected.
    pub message: String,
    /// The kind of problem, for callers that act on it.
    pub kind: ParseErrorKind,
}

impl ParseError {
    fn at(file: &str, line: u32, col: u32, kind: ParseErrorKind, message: String) -> Self {
        ParseError {
            file: file.to_owned(),
            line,
            col,
            message,
            kind,
        }
    }

    /// The file name as given to [`parse`] or [`load`].
    pub fn file(&self) -> &str {
        &self.file
    }

    /// 1-based line of the problem; 0 when the error concerns the whole file.
    pub fn line(&self) -> u32 {
        self.line
    }

    /// 1-based column of the offending token; 0 when there is no position.
    pub fn col(&self) -> u32 {
        self.col
    }

    /// What is wrong, and what is expected.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The kind of problem.
    pub fn kind(&self) -> ParseErrorKind {
        self.kind
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )
        }
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One whitespace-separated token of a line, with its 1-based column in characters.
struct Token<'a> {
    text: &'a str,
    col: u32,
}

/// The tokens of one line (without its line end), comments removed, one at a time (a line
/// may hold a million task ids).
fn tokens(line: &str) -> impl Iterator<Item = Token<'_>> {
    let code = match line.find('#') {
        Some(i) => &line[..i],
        None => line,
    };
    Tokens {
        code,
        ascii: code.is_ascii(),
        pos: 0,
        col: 0,
    }
}

/// The iterator of [`tokens`]: over bytes when the line is ASCII (the usual case: a
/// character is a byte and a column), else over characters.
struct Tokens<'a> {
    code: &'a str,
    ascii: bool,
    /// Byte offset of the next character to look at.
    pos: usize,
    /// Column of the last character looked at.
    col: u32,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let code = self.code;
        if self.ascii {
            // `char::is_whitespace` of an ASCII character: tab to carriage return, space.
            let white = |b: u8| matches!(b, b'\t'..=b'\r' | b' ');
            let bytes = code.as_bytes();
            let mut i = self.pos;
            while i < bytes.len() && white(bytes[i]) {
                i += 1;
            }
            if i >= bytes.len() {
                self.pos = i;
                return None;
            }
            let start = i;
            while i < bytes.len() && !white(bytes[i]) {
                i += 1;
            }
            // Columns count from 1; the whitespace after the token is consumed with it.
            let col = to_u32(start + 1);
            self.pos = (i + 1).min(bytes.len());
            self.col = to_u32(self.pos);
            return Some(Token {
                text: &code[start..i],
                col,
            });
        }
        let mut start: Option<(usize, u32)> = None;
        for (i, c) in code[self.pos..].char_indices() {
            let i = self.pos + i;
            self.col = self.col.saturating_add(1);
            if c.is_whitespace() {
                if let Some((s, scol)) = start {
                    self.pos = i + c.len_utf8();
                    return Some(Token {
                        text: &code[s..i],
                        col: scol,
                    });
                }
            } else if start.is_none() {
                start = Some((i, self.col));
            }
        }
        self.pos = code.len();
        start.map(|(s, scol)| Token {
            text: &code[s..],
            col: scol,
        })
    }
}

/// Whether a token starts a clause of a line (`after`, `cost`, `timeout`, `retries`, `<`,
/// `>`, `--`). None of these is a task id (an id has a digit after its letters).
fn is_clause(t: &Token<'_>) -> bool {
    matches!(
        t.text,
        "after" | "cost" | "timeout" | "retries" | "<" | ">" | "--"
    )
}

/// Parses the text of a task file. `file` is only used in error messages.
///
/// Returns the tasks in file order (left to right, top to bottom). Input paths (`< PATH`)
/// are kept as written and not looked at: [`load`] resolves them against the task file's
/// directory and checks that they exist.
pub fn parse(file: &str, text: &str) -> Result<Vec<Task>, ParseError> {
    parse_in(file, text, None, usize::MAX)
}

/// Parses the text of a task file whose input paths (`< PATH`) are relative to `base` (the
/// task file's directory): each is resolved against it (an absolute path stays as it is)
/// and must name a readable regular file, else the error names the path's position.
pub fn parse_with_base(file: &str, text: &str, base: &Path) -> Result<Vec<Task>, ParseError> {
    parse_in(file, text, Some(base), usize::MAX)
}

/// The error for a file with more than `max` tasks.
fn too_many(file: &str, max: usize) -> ParseError {
    ParseError::at(
        file,
        0,
        0,
        ParseErrorKind::TooManyTasks,
        format!("the file holds more than {max} tasks, the limit of this run"),
    )
}

/// Artifacts (`< @DEP/NAME`) to check once every task is known: (consumer index, producer
/// id, output name, line, column).
type ArtifactRef = (usize, String, String, u32, u32);

fn parse_in(
    file: &str,
    text: &str,
    base: Option<&Path>,
    max: usize,
) -> Result<Vec<Task>, ParseError> {
    parse_lines(file, text, base, max, Scan::Fast)
}

/// Whether [`parse_lines`] tries [`plain_line`] on each line first ([`Scan::Fast`], what
/// the parser does), or takes every line the general way ([`Scan::General`], for the tests
/// that compare both), or also looks every id up in an [`IdIndex`] as it is read
/// ([`Scan::Eager`]: how duplicates were found before round 10, for the tests that compare
/// the errors with those found once the file is read).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scan {
    Fast,
    #[cfg_attr(not(test), allow(dead_code))]
    General,
    #[cfg_attr(not(test), allow(dead_code))]
    Eager,
}

/// What [`read_lines`] takes from the file: the tasks, in file order; the tasks with
/// dependencies (task, the positions of its dependencies) and the artifacts, checked once
/// every id is known.
struct Read {
    tasks: Vec<Task>,
    /// The [`crate::task::id_hash`] of each task's id under `seed`, taken as each line is
    /// read (while its ids are in the cache), for the duplicate check.
    hashes: Vec<u64>,
    seed: u64,
    dep_pos: Vec<(usize, Vec<(u32, u32)>)>,
    artifacts: Vec<ArtifactRef>,
}

fn parse_lines(
    file: &str,
    text: &str,
    base: Option<&Path>,
    max: usize,
    scan: Scan,
) -> Result<Vec<Task>, ParseError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // Sized once for every token (ids, and the few `after`/`--` words).
    // A file over the limit is refused before its tasks take more than the limit's memory.
    let words = count_words(text.as_bytes()).min(max.saturating_add(1));
    let mut read = Read {
        tasks: Vec::with_capacity(words),
        hashes: Vec::with_capacity(words),
        seed: IdKeys::new_seed(),
        dep_pos: Vec::new(),
        artifacts: Vec::new(),
    };
    let result = read_lines(file, text, base, max, scan, &mut read);
    // The hashes of the tasks of the line an error stopped at.
    hash_new_tasks(&read.tasks, &mut read.hashes, read.seed);
    let Read {
        tasks,
        hashes,
        seed,
        dep_pos,
        artifacts,
    } = read;
    // Duplicate ids are looked for once the reading is over, at the end of the file or at
    // the error that stopped it, among the tasks read before that: the first in file order
    // is the error, as it was when each id was looked up as it was read (the reading would
    // have stopped there, before any later error).
    let index = IdKeys::from_hashes(hashes, seed, u64::MAX);
    if let Some((first, second)) = index.first_duplicate(&tasks) {
        if let (Some(first), Some(second)) = (tasks.get(first), tasks.get(second)) {
            return Err(duplicate(file, first, second));
        }
    }
    result?;
    if tasks.is_empty() {
        return Err(ParseError::at(
            file,
            0,
            0,
            ParseErrorKind::NoTasks,
            "no tasks found".to_owned(),
        ));
    }
    check_dependencies(file, &tasks, &index, &dep_pos)?;
    for (_, dep, name, line, col) in &artifacts {
        let declared = index
            .get(&tasks, dep)
            .and_then(|j| tasks.get(j))
            .is_some_and(|p| p.outputs().iter().any(|o| o == name));
        if !declared {
            return Err(ParseError::at(
                file,
                *line,
                *col,
                ParseErrorKind::File,
                format!("task {dep} declares no output {name:?} (add `> {name}` to its line)"),
            ));
        }
    }
    Ok(tasks)
}

/// Reads the lines of `text` into `read`, up to the end or the first error other than a
/// duplicate id (which [`parse_lines`] looks for once the reading is over, but with
/// [`Scan::Eager`]).
fn read_lines(
    file: &str,
    text: &str,
    base: Option<&Path>,
    max: usize,
    scan: Scan,
    read: &mut Read,
) -> Result<(), ParseError> {
    let Read {
        tasks,
        hashes,
        seed,
        dep_pos,
        artifacts,
    } = read;
    let mut kinds = KindCache::default();
    let mut seen = (scan == Scan::Eager).then(|| IdIndex::with_capacity(0));
    // `str::lines` splits on `\n` and strips a `\r` before it.
    for (index, line_text) in text.lines().enumerate() {
        // The previous line's tasks, as the line is done with (a line the fast path left
        // is read again from its start).
        hash_new_tasks(tasks, hashes, *seed);
        let line = to_u32(index.saturating_add(1));
        if scan == Scan::Fast {
            let mark = tasks.len();
            if plain_line(line_text, line, max, tasks, &mut kinds) {
                continue;
            }
            // Not a line of plain valid ids within the limit: what the fast path took of it
            // is undone, and the line goes the general way, which finds what is there
            // (a clause, an error) exactly as it would have without the fast path.
            tasks.truncate(mark);
        }
        if !tokens(line_text).any(|t| is_clause(&t)) {
            // Only task ids (the usual line, however long): no list of its tokens.
            for token in tokens(line_text) {
                if tasks.len() >= max {
                    return Err(too_many(file, max));
                }
                let task = new_task(file, line, &token, tasks, seen.as_mut())?;
                tasks.push(task);
            }
            continue;
        }
        let toks: Vec<Token<'_>> = tokens(line_text).collect();
        let clause = toks.iter().position(is_clause);
        let (ids, after): (&[Token<'_>], &[Token<'_>]) = match clause {
            None => (&toks[..], &[]),
            Some(i) => (&toks[..i], &toks[i..]),
        };
        if clause.is_some() && ids.len() != 1 {
            let col = ids.get(1).or(after.first()).map_or(1, |t| t.col);
            return Err(ParseError::at(
                file,
                line,
                col,
                ParseErrorKind::Syntax,
                "a line with `after`, `cost`, `timeout`, `retries`, `<`, `>` or `--` declares \
                 exactly one task first, e.g. `b2 after a1 cost 5 < in.csv > out.txt -- ARGS`"
                    .to_owned(),
            ));
        }
        for token in ids {
            if tasks.len() >= max {
                return Err(too_many(file, max));
            }
            let task = new_task(file, line, token, tasks, seen.as_mut())?;
            tasks.push(task);
        }
        let mut rest = after;
        let mut seen_kw: [bool; 4] = [false; 4];
        while let Some(kw) = rest.first() {
            let err = |col: u32, kind: ParseErrorKind, msg: String| {
                ParseError::at(file, line, col, kind, msg)
            };
            let slot = match kw.text {
                "after" => 0,
                "cost" => 1,
                "timeout" => 2,
                "retries" => 3,
                "<" => 4,
                ">" => 5,
                "--" => {
                    // The arguments are the rest of the line, spacing kept.
                    let code = line_text.split('#').next().unwrap_or("");
                    let from = byte_after_col(code, kw.col, 2);
                    if let Some(t) = tasks.last_mut() {
                        t.extra_mut().args = code[from..].trim().to_owned();
                    }
                    break;
                }
                other => {
                    return Err(err(
                        kw.col,
                        ParseErrorKind::Syntax,
                        format!(
                            "unexpected {other:?}: expected `after`, `cost`, `timeout`, \
                             `retries`, `<`, `>` or `--`"
                        ),
                    ))
                }
            };
            // `<` and `>` may be given any number of times.
            if slot < 4 && std::mem::replace(&mut seen_kw[slot], true) {
                return Err(err(
                    kw.col,
                    ParseErrorKind::Keyword,
                    format!("`{}` given twice for this task", kw.text),
                ));
            }
            // The clause's words: up to the next keyword.
            let end = rest[1..]
                .iter()
                .position(is_clause)
                .map_or(rest.len(), |i| i + 1);
            let words = &rest[1..end];
            rest = &rest[end..];
            if slot == 0 {
                if words.is_empty() {
                    return Err(err(
                        kw.col,
                        ParseErrorKind::Dependency,
                        "`after` needs at least one task id, e.g. `b2 after a1 c1`".to_owned(),
                    ));
                }
                for dep in words {
                    if let Some(problem) = id_problem(dep.text) {
                        return Err(err(
                            dep.col,
                            ParseErrorKind::InvalidId,
                            format!("invalid dependency {:?}: {problem}", dep.text),
                        ));
                    }
                    let Some(i) = tasks.len().checked_sub(1) else {
                        continue;
                    };
                    if dep_pos.last().is_none_or(|(t, _)| *t != i) {
                        dep_pos.push((i, Vec::new()));
                    }
                    if let (Some(t), Some((_, p))) = (tasks.last_mut(), dep_pos.last_mut()) {
                        if !t.deps().iter().any(|d| d == dep.text) {
                            t.extra_mut().deps.push(dep.text.to_owned());
                            p.push((line, dep.col));
                        }
                    }
                }
                continue;
            }
            let example = [
                "",
                "cost 10",
                "timeout 30s",
                "retries 2",
                "< in.csv",
                "> out.txt",
            ][slot];
            let value = match words {
                [v] => v,
                [] => {
                    return Err(err(
                        kw.col,
                        ParseErrorKind::Keyword,
                        format!("`{}` needs a value, e.g. `{example}`", kw.text),
                    ))
                }
                [_, extra, ..] => {
                    return Err(err(
                        extra.col,
                        ParseErrorKind::Keyword,
                        format!(
                            "`{}` takes one value, e.g. `{example}`; unexpected {:?}",
                            kw.text, extra.text
                        ),
                    ))
                }
            };
            let bad = |what: &str| {
                err(
                    value.col,
                    ParseErrorKind::Keyword,
                    format!(
                        "bad {} {:?}: expected {what}, e.g. `{example}`",
                        kw.text, value.text
                    ),
                )
            };
            let Some(t) = tasks.last_mut() else {
                continue;
            };
            if slot == 4 || slot == 5 {
                let ferr = |msg: String| err(value.col, ParseErrorKind::File, msg);
                let v = value.text;
                if slot == 5 {
                    if let Some(problem) = output_name_problem(v) {
                        return Err(ferr(format!("bad output {v:?}: {problem}")));
                    }
                    if t.outputs().iter().any(|o| o == v) {
                        return Err(ferr(format!("output {v:?} declared twice for this task")));
                    }
                    if t.outputs().len() >= p2p_core::message::MAX_TASK_FILES {
                        return Err(ferr(format!(
                            "more than {} outputs for one task",
                            p2p_core::message::MAX_TASK_FILES
                        )));
                    }
                    t.extra_mut().outputs.push(v.to_owned());
                    continue;
                }
                let input = if let Some(art) = v.strip_prefix('@') {
                    let Some((dep, name)) = art.split_once('/') else {
                        return Err(ferr(format!(
                            "bad input {v:?}: an artifact is `@TASK/NAME`, e.g. `< @a1/out.txt`"
                        )));
                    };
                    if let Some(problem) = id_problem(dep) {
                        return Err(ferr(format!("bad input {v:?}: {problem}")));
                    }
                    if let Some(problem) = output_name_problem(name) {
                        return Err(ferr(format!("bad input {v:?}: {problem}")));
                    }
                    let i = tasks.len().saturating_sub(1);
                    artifacts.push((i, dep.to_owned(), name.to_owned(), line, value.col));
                    // An artifact implies `after DEP`.
                    if dep_pos.last().is_none_or(|(t, _)| *t != i) {
                        dep_pos.push((i, Vec::new()));
                    }
                    if let (Some(t), Some((_, p))) = (tasks.last_mut(), dep_pos.last_mut()) {
                        if !t.deps().iter().any(|d| d == dep) {
                            t.extra_mut().deps.push(dep.to_owned());
                            p.push((line, value.col));
                        }
                    }
                    Input::Artifact {
                        task: dep.to_owned(),
                        name: name.to_owned(),
                    }
                } else {
                    let path = match base {
                        Some(dir) => check_input(dir, v).map_err(&ferr)?,
                        None => PathBuf::from(v),
                    };
                    Input::Path(path)
                };
                let Some(t) = tasks.last_mut() else {
                    continue;
                };
                if t.inputs().len() >= p2p_core::message::MAX_TASK_FILES {
                    return Err(ferr(format!(
                        "more than {} inputs for one task",
                        p2p_core::message::MAX_TASK_FILES
                    )));
                }
                let Some(name) = input.file_name() else {
                    return Err(ferr(format!(
                        "bad input {v:?}: it names no file (a path ending in a file name, e.g. \
                         `< data/in.csv`)"
                    )));
                };
                if let Some(other) = t.inputs().iter().find(|i| i.file_name() == Some(name)) {
                    return Err(ferr(format!(
                        "input {v:?} would be placed as {name:?}, as {other:?} already is: two \
                         inputs of a task need two file names"
                    )));
                }
                t.extra_mut().inputs.push(input);
                continue;
            }
            match slot {
                1 => match value.text.parse::<u32>() {
                    Ok(n) if n >= 1 => t.extra_mut().cost = n,
                    _ => return Err(bad("a whole number from 1 to 4294967295")),
                },
                2 => match humantime::parse_duration(value.text) {
                    Ok(d) => t.extra_mut().timeout = Some(d),
                    Err(_) => return Err(bad("a duration such as 500ms, 3s, 2m or 1h (0: none)")),
                },
                _ => match value.text.parse::<u32>() {
                    Ok(n) => t.extra_mut().retries = Some(n),
                    Err(_) => return Err(bad("a count from 0 to 4294967295")),
                },
            }
        }
    }
    Ok(())
}

/// Adds the hashes of the tasks past those `hashes` has.
fn hash_new_tasks(tasks: &[Task], hashes: &mut Vec<u64>, seed: u64) {
    if let Some(new) = tasks.get(hashes.len()..) {
        hashes.extend(new.iter().map(|t| crate::task::id_hash(seed, t.id())));
    }
}

/// The error for the task `second` whose id is that of the earlier task `first`.
fn duplicate(file: &str, first: &Task, second: &Task) -> ParseError {
    ParseError::at(
        file,
        second.line(),
        second.col(),
        ParseErrorKind::DuplicateId,
        format!(
            "duplicate task id {:?} (first at line {}, column {})",
            second.id(),
            first.line(),
            first.col()
        ),
    )
}

/// Byte classes of the fast path ([`plain_line`]) and the word count ([`count_words`]).
const WHITE: u8 = 1;
const LETTER: u8 = 2;
const UPPER: u8 = 4;
const DIGIT: u8 = 8;
/// What may follow the first digit of an id: letters, digits, `_`, `.`, `-`.
const TAIL: u8 = 16;
/// `#`: a comment starts (the rest of the line is not looked at).
const HASH: u8 = 32;

/// The class of every byte: ASCII whitespace as `char::is_whitespace` has it (tab to
/// carriage return, space), id characters, `#`. A byte of a multibyte character has none.
const CLASS: [u8; 256] = {
    let mut c = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let x = b as u8;
        c[b] = if matches!(x, b'\t'..=b'\r' | b' ') {
            WHITE
        } else if x.is_ascii_lowercase() {
            LETTER | TAIL
        } else if x.is_ascii_uppercase() {
            LETTER | UPPER | TAIL
        } else if x.is_ascii_digit() {
            DIGIT | TAIL
        } else if matches!(x, b'_' | b'.' | b'-') {
            TAIL
        } else if x == b'#' {
            HASH
        } else {
            0
        };
        b += 1;
    }
    c
};

/// How many words `text` holds: runs of bytes other than the ASCII whitespace of
/// [`CLASS`] (comments' words included). An upper bound of the tasks of a file whose
/// whitespace is ASCII, for sizing the list and the id table once; 8 bytes at a time.
fn count_words(text: &[u8]) -> usize {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const ONES: u64 = 0x0101_0101_0101_0101;
    // The high bit of every byte of `x` that is tab to carriage return or space.
    let white = |x: u64| -> u64 {
        let lo = x & LOW7;
        let ascii = !x & HIGH;
        // 9 to 13: at least 9 and not at least 14 (no carry between bytes: each is < 0x80).
        let ge9 = lo.wrapping_add(ONES * (0x80 - 9)) & HIGH;
        let ge14 = lo.wrapping_add(ONES * (0x80 - 14)) & HIGH;
        let sp = !(lo ^ (ONES * 0x20)).wrapping_add(LOW7) & HIGH;
        (ge9 & !ge14 | sp) & ascii
    };
    let mut count: u64 = 0;
    // The high bit of the last byte looked at, when it was whitespace (the start counts
    // as whitespace).
    let mut prev: u64 = 0x80;
    let mut chunks = text.chunks_exact(8);
    let mut step = |x: u64| {
        let w = white(x);
        let starts = !w & HIGH & (w << 8 | prev);
        prev = w >> 56;
        // One high bit per start: their number in the top byte.
        count += ((starts >> 7).wrapping_mul(ONES)) >> 56;
    };
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        step(u64::from_le_bytes(w));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [b' '; 8];
        w[..rest.len()].copy_from_slice(rest);
        step(u64::from_le_bytes(w));
    }
    usize::try_from(count).unwrap_or(usize::MAX)
}

/// The type names met so far, by their letters (up to 8, as the bytes of one word), so that
/// the tasks of a type share the building of its name: a copy of an inline string.
#[derive(Default)]
struct KindCache {
    slots: [Option<(u64, usize, CompactString)>; 8],
}

impl KindCache {
    /// The type of `id`, whose first `n` bytes are its ASCII letters (`key`: those bytes,
    /// one after another, when `n` is at most 8; `upper`: whether one is upper case).
    fn kind(&mut self, id: &str, n: usize, key: u64, upper: bool) -> Option<CompactString> {
        let make = || {
            let mut letters = CompactString::from(id.get(..n)?);
            if upper {
                letters.make_ascii_lowercase();
            }
            Some(letters)
        };
        if n > 8 {
            return make();
        }
        let slot = self
            .slots
            .get_mut((key ^ (key >> 8) ^ n as u64) as usize & 7)?;
        match slot {
            Some((k, len, kind)) if *k == key && *len == n => Some(kind.clone()),
            _ => {
                let kind = make()?;
                *slot = Some((key, n, kind.clone()));
                Some(kind)
            }
        }
    }
}

/// The fast path of a line: when it holds only valid task ids seen for the first time (in
/// ASCII, up to a `#`; the usual line), pushes their tasks and says `true`. Else says
/// `false` as soon as it meets something else (a clause word or any token that is not a
/// valid id, a duplicate, a non-ASCII byte before a comment, task `max + 1`), with the
/// tasks it pushed of this line still there for the caller to take back.
///
/// One pass over the bytes: a token is split off and checked against
/// `^[A-Za-z]+[0-9][A-Za-z0-9_.-]*$` in the same scan, and its column is its byte offset
/// plus one (every byte before it is ASCII). No clause word is a valid id (none has a
/// digit), so a line with a clause never passes.
fn plain_line(
    text: &str,
    line: u32,
    max: usize,
    tasks: &mut Vec<Task>,
    kinds: &mut KindCache,
) -> bool {
    let b = text.as_bytes();
    let class = |c: u8| CLASS[c as usize];
    let mut i = 0;
    loop {
        while i < b.len() && class(b[i]) & WHITE != 0 {
            i += 1;
        }
        if i >= b.len() || class(b[i]) & HASH != 0 {
            return true;
        }
        let start = i;
        let (mut key, mut upper) = (0u64, false);
        while i < b.len() && class(b[i]) & LETTER != 0 {
            upper |= class(b[i]) & UPPER != 0;
            key = key << 8 | u64::from(b[i]);
            i += 1;
        }
        let letters = i - start;
        if letters == 0 || i >= b.len() || class(b[i]) & DIGIT == 0 {
            return false;
        }
        i += 1;
        while i < b.len() && class(b[i]) & TAIL != 0 {
            i += 1;
        }
        // The token ends at whitespace, a comment or the line's end; anything else (a
        // character ids do not have, a non-ASCII byte) is for the general path.
        if i < b.len() && class(b[i]) & (WHITE | HASH) == 0 {
            return false;
        }
        if tasks.len() >= max {
            return false;
        }
        let Some(id) = text.get(start..i) else {
            return false;
        };
        let Some(kind) = kinds.kind(id, letters, key, upper) else {
            return false;
        };
        tasks.push(Task::parsed(id, kind, line, to_u32(start + 1)));
    }
}

/// An input path resolved against the task file's directory `dir`, when it names a regular
/// file this process can open; else why not.
fn check_input(dir: &Path, written: &str) -> Result<PathBuf, String> {
    let path = Path::new(written);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Err(format!(
                "input {written:?} ({}) is not a regular file",
                path.display()
            ))
        }
        Err(e) => {
            return Err(format!(
                "cannot read input {written:?} ({}): {e}",
                path.display()
            ))
        }
    }
    if let Err(e) = std::fs::File::open(&path) {
        return Err(format!(
            "cannot read input {written:?} ({}): {e}",
            path.display()
        ));
    }
    Ok(path)
}

/// Validates a token as a new task id and builds its task.
fn new_task(
    file: &str,
    line: u32,
    token: &Token<'_>,
    tasks: &[Task],
    seen: Option<&mut IdIndex>,
) -> Result<Task, ParseError> {
    let (col, id) = (token.col, token.text);
    if let Some(problem) = id_problem(id) {
        return Err(ParseError::at(
            file,
            line,
            col,
            ParseErrorKind::InvalidId,
            format!("invalid task id {id:?}: {problem}"),
        ));
    }
    // With [`Scan::Eager`] only: recorded as the next task's id; on an error the parse
    // stops anyway.
    if let Some(first) = seen
        .and_then(|seen| seen.first_or_insert(tasks, id, tasks.len()))
        .and_then(|j| tasks.get(j))
    {
        let (first_line, first_col) = (first.line(), first.col());
        return Err(ParseError::at(
            file,
            line,
            col,
            ParseErrorKind::DuplicateId,
            format!("duplicate task id {id:?} (first at line {first_line}, column {first_col})"),
        ));
    }
    let Some(kind) = kind_of_compact(id) else {
        // Unreachable: a valid id starts with a letter. Report it rather than panic.
        return Err(ParseError::at(
            file,
            line,
            col,
            ParseErrorKind::InvalidId,
            format!("invalid task id {id:?}: it has no type letters"),
        ));
    };
    Ok(Task::parsed(id, kind, line, col))
}

/// The byte offset in `text` just after the token of `len` characters at 1-based column `col`.
fn byte_after_col(text: &str, col: u32, len: usize) -> usize {
    let skip = (col as usize).saturating_sub(1).saturating_add(len);
    text.char_indices().nth(skip).map_or(text.len(), |(i, _)| i)
}

/// Every dependency names a known task other than itself, and there is no cycle.
fn check_dependencies(
    file: &str,
    tasks: &[Task],
    index: &IdKeys,
    dep_pos: &[(usize, Vec<(u32, u32)>)],
) -> Result<(), ParseError> {
    if dep_pos.is_empty() {
        // No dependency, so nothing unknown and no cycle.
        return Ok(());
    }
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
    for (i, positions) in dep_pos {
        let (i, Some(t)) = (*i, tasks.get(*i)) else {
            continue;
        };
        for (d, dep) in t.deps().iter().enumerate() {
            let (line, col) = positions.get(d).copied().unwrap_or((t.line(), t.col()));
            let err =
                |msg: String| ParseError::at(file, line, col, ParseErrorKind::Dependency, msg);
            match index.get(tasks, dep) {
                None => return Err(err(format!("{} depends on unknown task {dep:?}", t.id()))),
                Some(j) if j == i => return Err(err(format!("{} depends on itself", t.id()))),
                Some(j) => edges[i].push(j),
            }
        }
    }
    if let Some(cycle) = crate::plan::find_cycle(&edges) {
        let first = &tasks[cycle[0]];
        let names: Vec<&str> = cycle.iter().map(|&i| tasks[i].id()).collect();
        return Err(ParseError::at(
            file,
            first.line(),
            first.col(),
            ParseErrorKind::Dependency,
            format!("dependency cycle: {} -> {}", names.join(" -> "), names[0]),
        ));
    }
    Ok(())
}

/// Reads and parses a task file. Errors name the path; an I/O error also gives the OS error,
/// and non-UTF-8 content gives the line and column of the first invalid byte.
pub fn load(path: &Path) -> Result<Vec<Task>, ParseError> {
    load_at_most(path, usize::MAX)
}

/// [`load`], refusing a file of more than `max_tasks` tasks
/// ([`ParseErrorKind::TooManyTasks`]) as soon as the parser meets task `max_tasks + 1`, so
/// that a plan too large for the machine is refused before it takes the memory.
pub fn load_at_most(path: &Path, max_tasks: usize) -> Result<Vec<Task>, ParseError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| {
        ParseError::at(
            &file,
            0,
            0,
            ParseErrorKind::Io(e.kind()),
            format!("cannot read task file: {e}"),
        )
    })?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let bytes = e.as_bytes();
            let at = e.utf8_error().valid_up_to();
            let valid = String::from_utf8_lossy(&bytes[..at]);
            let line = valid.matches('\n').count().saturating_add(1);
            let line_start = valid.rfind('\n').map_or(0, |i| i.saturating_add(1));
            let col = valid[line_start..].chars().count().saturating_add(1);
            let byte = bytes.get(at).copied().unwrap_or(0);
            return Err(ParseError::at(
                &file,
                to_u32(line),
                to_u32(col),
                ParseErrorKind::NotUtf8,
                format!("the task file is not valid UTF-8 (byte 0x{byte:02x}); save it as UTF-8"),
            ));
        }
    };
    let base = path.parent().unwrap_or(Path::new(""));
    parse_in(&file, &text, Some(base), max_tasks)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::time::Duration;

    fn ids(tasks: &[Task]) -> Vec<&str> {
        tasks.iter().map(|t| t.id()).collect()
    }

    /// The tokens of a line as the parser found them before its ASCII fast path.
    fn tokens_by_char(code: &str) -> Vec<(String, u32)> {
        let code = code.split('#').next().unwrap_or("");
        let mut out = Vec::new();
        let mut start: Option<(usize, u32)> = None;
        let mut col = 0u32;
        for (i, c) in code.char_indices() {
            col += 1;
            if c.is_whitespace() {
                if let Some((s, scol)) = start.take() {
                    out.push((code[s..i].to_owned(), scol));
                }
            } else if start.is_none() {
                start = Some((i, col));
            }
        }
        if let Some((s, scol)) = start {
            out.push((code[s..].to_owned(), scol));
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn tokens_and_columns_are_those_of_a_scan_by_character(
            line in "[ a1\t\u{0b}\u{0c}\r#é\u{2003}-]{0,40}"
        ) {
            let got: Vec<(String, u32)> =
                tokens(&line).map(|t| (t.text.to_owned(), t.col)).collect();
            proptest::prop_assert_eq!(got, tokens_by_char(&line));
        }
    }

    /// Words for comparing the fast path with the general one: valid ids from a small pool
    /// (so that duplicates happen), upper-case and long ones (past 24 bytes), clause words,
    /// comments, bad ids, non-ASCII characters and whitespace, any characters.
    fn mixed_word() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        use proptest::sample::select;
        prop_oneof![
            6 => "[a-cA-C]{1,2}[0-9]{1,2}",
            1 => "[a-zA-Z]{1,12}[0-9][a-zA-Z0-9_.-]{0,40}",
            2 => select(vec![
                "after", "cost", "timeout", "retries", "<", ">", "--", "#", "# é", "a1#x",
                "a1#", "1a", "a", "ab", "a-1", "a1!", "é1", "a1é", "\u{3000}", "\u{a0}",
                "\u{85}", "\u{b}", "\u{c}", "\u{feff}", "3", "5s", "o", "@a1/o", "x.csv",
                "a1\u{a0}b1", "A1", "Ab2_x.y-z",
            ])
            .prop_map(str::to_string),
            1 => "\\PC{1,3}",
        ]
    }

    /// What goes between words: ASCII whitespace of every kind, line ends (LF, CRLF, a lone
    /// CR), nothing (glued words).
    fn separator() -> impl proptest::strategy::Strategy<Value = &'static str> {
        proptest::sample::select(vec![
            " ", " ", "  ", "\t", "\n", "\r\n", "\r", "\u{b}", "\u{c}", "",
        ])
    }

    /// A file of plain lines of distinct valid ids (mixed case, short and long), with any
    /// ASCII spacing, CRLF, blank lines and comments (also non-ASCII ones), then maybe one
    /// defect: a duplicate, a clause word, a non-ASCII space or letter, a bad character.
    fn plain_file() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let id = ("[a-zA-Z]{1,3}", "[a-zA-Z0-9_.-]{0,3}", 0..8usize);
        (
            proptest::collection::vec((id, separator(), 0..6u8), 1..60),
            proptest::option::of((any::<proptest::sample::Index>(), 0..6u8)),
            any::<bool>(),
        )
            .prop_map(|(parts, defect, bom)| {
                let mut words: Vec<String> = Vec::new();
                for (i, ((letters, tail, long), sep, extra)) in parts.into_iter().enumerate() {
                    let pad = "x".repeat(long * long);
                    let mut w = format!("{letters}{i}{tail}{pad}");
                    match extra {
                        0 => w.push_str(" # comment é€😀"),
                        1 => w.push_str("#glued"),
                        _ => {}
                    }
                    w.push_str(sep);
                    if sep.is_empty() {
                        w.push(' ');
                    }
                    words.push(w);
                }
                if let Some((at, kind)) = defect {
                    let i = at.index(words.len());
                    let insert = match kind {
                        0 => words[at.index(i + 1).min(i)]
                            .split_whitespace()
                            .next()
                            .map(str::to_owned),
                        1 => Some("after".to_owned()),
                        2 => Some("\u{3000}".to_owned()),
                        3 => Some("é1".to_owned()),
                        4 => Some("a1!".to_owned()),
                        _ => Some("--".to_owned()),
                    };
                    if let Some(w) = insert {
                        words.insert(i, format!("{w} "));
                    }
                }
                let text: String = words.concat();
                if bom {
                    format!("\u{feff}{text}")
                } else {
                    text
                }
            })
    }

    /// Both ways of reading `text` with the task limit `max`.
    fn both_paths(
        text: &str,
        max: usize,
    ) -> (Result<Vec<Task>, ParseError>, Result<Vec<Task>, ParseError>) {
        (
            parse_lines("t.txt", text, None, max, Scan::Fast),
            parse_lines("t.txt", text, None, max, Scan::General),
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The fast path gives the same tasks (ids, types, lines, columns) and the same
        /// errors (kind, line, column, message) as the general path, for any mix of words.
        #[test]
        fn the_fast_path_reads_any_text_as_the_general_path(
            parts in proptest::collection::vec((mixed_word(), separator()), 0..40),
            max in proptest::prop_oneof![0..40usize, proptest::strategy::Just(usize::MAX)],
        ) {
            let text: String = parts.iter().map(|(w, s)| format!("{w}{s}")).collect();
            let (fast, general) = both_paths(&text, max);
            proptest::prop_assert_eq!(fast, general, "{:?}", text);
        }

        /// The same for files of plain lines, with and without one defect, under a limit or
        /// not; a file without a defect is read whole by the fast path.
        #[test]
        fn the_fast_path_reads_plain_files_as_the_general_path(
            text in plain_file(),
            max in proptest::prop_oneof![0..80usize, proptest::strategy::Just(usize::MAX)],
        ) {
            let (fast, general) = both_paths(&text, max);
            proptest::prop_assert_eq!(&fast, &general, "{:?}", text);
        }

        /// The word count is the number of runs of bytes other than ASCII whitespace.
        #[test]
        fn words_are_counted_as_the_tokens_of_ascii_whitespace(
            text in "[a \t\u{b}\u{c}\r\n#é\u{3000}\u{85}\u{a0}x1-]{0,70}"
        ) {
            let white = |b: u8| matches!(b, b'\t'..=b'\r' | b' ');
            let bytes = text.as_bytes();
            let expected = (0..bytes.len())
                .filter(|&i| !white(bytes[i]) && (i == 0 || white(bytes[i - 1])))
                .count();
            proptest::prop_assert_eq!(count_words(bytes), expected);
        }
    }

    #[test]
    fn a_plain_line_is_read_by_the_fast_path_alone() {
        let line = "a1\tB22_x.y-z  abcdefghijklmnopqrstuvwxyz1  c3#note é\r";
        let (mut tasks, mut kinds) = (Vec::new(), KindCache::default());
        assert!(plain_line(line, 7, usize::MAX, &mut tasks, &mut kinds));
        let general = parse_lines(
            "t.txt",
            &format!("\n\n\n\n\n\n{line}"),
            None,
            usize::MAX,
            Scan::General,
        )
        .unwrap();
        assert_eq!(tasks, general);
        assert_eq!(tasks[1].kind(), "b");
        assert_eq!(tasks[2].kind(), "abcdefghijklmnopqrstuvwxyz");
        assert_eq!((tasks[3].line(), tasks[3].col()), (7, 44));
        // Each of these leaves the line to the general path.
        for line in [
            "a1 after b1",
            "a1 é1",
            "a1\u{a0}b1",
            "a1 a",
            "a1 < x",
            "a1 a2!",
            "a1 --",
        ] {
            let (mut tasks, mut kinds) = (Vec::new(), KindCache::default());
            assert!(
                !plain_line(line, 1, usize::MAX, &mut tasks, &mut kinds),
                "{line:?}"
            );
        }
        // A duplicate does not: it is looked for once the file is read.
        let (mut tasks, mut kinds) = (Vec::new(), KindCache::default());
        assert!(plain_line("a1 a1", 1, usize::MAX, &mut tasks, &mut kinds));
        assert_eq!(ids(&tasks), ["a1", "a1"]);
        let (mut tasks, mut kinds) = (Vec::new(), KindCache::default());
        assert!(!plain_line("a1 a2 a3", 1, 2, &mut tasks, &mut kinds));
        // What it took is given back (the caller truncates): the ids may be declared again.
        tasks.clear();
        assert!(plain_line("a2 a1", 2, 2, &mut tasks, &mut kinds));
        assert_eq!(ids(&tasks), ["a2", "a1"]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Duplicates looked for once the file is read give the same result (tasks, or the
        /// error's kind, position and message) as looking up every id as it is read, for any
        /// mix of words (duplicates, clauses, bad ids, dependencies) and plain files, under a
        /// limit or not.
        #[test]
        fn duplicates_found_after_the_reading_are_those_found_while_reading(
            parts in proptest::collection::vec((mixed_word(), separator()), 0..40),
            plain in plain_file(),
            max in proptest::prop_oneof![0..40usize, proptest::strategy::Just(usize::MAX)],
        ) {
            let mixed: String = parts.iter().map(|(w, s)| format!("{w}{s}")).collect();
            for text in [mixed, plain] {
                let fast = parse_lines("t.txt", &text, None, max, Scan::Fast);
                let eager = parse_lines("t.txt", &text, None, max, Scan::Eager);
                proptest::prop_assert_eq!(fast, eager, "{:?}", text);
            }
        }
    }

    #[test]
    fn the_first_duplicate_in_file_order_is_reported_before_a_later_error() {
        let cases = [
            // The second a1 comes before the second b1 (whose first is earlier).
            ("b1 a1\nc1 a1 b1\n", "t.txt:2:4: duplicate task id \"a1\" (first at line 1, column 4)"),
            // Before a bad id, a clause error, an unknown dependency later in the file.
            ("a1 a1 1x\n", "t.txt:1:4: duplicate task id \"a1\" (first at line 1, column 1)"),
            ("a1\nb1\nb1 after a1 cost x\n", "t.txt:3:1: duplicate task id \"b1\" (first at line 2, column 1)"),
            ("a1\nb1 after a1 cost x\nb1\n", "t.txt:2:18: bad cost \"x\": expected a whole number from 1 to 4294967295, e.g. `cost 10`"),
            ("a1 after zz9\na1 < @b1/o\n", "t.txt:2:1: duplicate task id \"a1\" (first at line 1, column 1)"),
            // After an error, it is not.
            ("a1 1x a1\n", "t.txt:1:4: invalid task id \"1x\": a task id starts with its type letters followed by a digit, e.g. a1"),
            ("a1 a2 after a1\na1\n", "t.txt:1:4: a line with `after`, `cost`, `timeout`, `retries`, `<`, `>` or `--` declares exactly one task first, e.g. `b2 after a1 cost 5 < in.csv > out.txt -- ARGS`"),
        ];
        for (text, expected) in cases {
            for scan in [Scan::Fast, Scan::General, Scan::Eager] {
                let err = parse_lines("t.txt", text, None, usize::MAX, scan).unwrap_err();
                assert_eq!(err.to_string(), expected, "{text:?}");
            }
        }
        // Within the limit, the duplicate; the task past the limit is never read.
        let err = parse_lines("t.txt", "a1 a2 a1 a3", None, 3, Scan::Fast).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::DuplicateId);
        let err = parse_lines("t.txt", "a1 a2 a3 a1", None, 3, Scan::Fast).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::TooManyTasks);
    }

    #[test]
    fn dependencies_and_artifacts_are_found_by_the_sorted_keys() {
        let mut text = String::new();
        for i in 0..3000 {
            text.push_str(&format!("a{i} > o{i}\n"));
        }
        for i in 0..3000 {
            text.push_str(&format!("b{i} after a{} < @a{}/o{}\n", 2999 - i, i, i));
        }
        let tasks = parse_lines("t.txt", &text, None, usize::MAX, Scan::Fast).unwrap();
        assert_eq!(tasks.len(), 6000);
        let err = parse_lines(
            "t.txt",
            &format!("{text}c1 after a3000\n"),
            None,
            usize::MAX,
            Scan::Fast,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.txt:6001:10: c1 depends on unknown task \"a3000\""
        );
        let err = parse_lines(
            "t.txt",
            &format!("{text}c1 < @a7/o8\n"),
            None,
            usize::MAX,
            Scan::Fast,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.txt:6001:6: task a7 declares no output \"o8\" (add `> o8` to its line)"
        );
    }

    #[test]
    fn a_file_over_the_task_limit_is_refused_without_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        std::fs::write(&path, "a1 a2 a3\nb1 after a1\n").unwrap();
        assert_eq!(load_at_most(&path, 4).unwrap().len(), 4);
        for max in [0, 2, 3] {
            let e = load_at_most(&path, max).unwrap_err();
            assert_eq!(e.kind, ParseErrorKind::TooManyTasks);
            assert_eq!((e.line, e.col), (0, 0));
            assert!(
                e.to_string().contains(&format!("more than {max} tasks")),
                "{e}"
            );
        }
    }

    #[test]
    fn seed_line_parses_in_order() {
        let tasks = parse("tasks.txt", "a1 a2 c1 b1 c2 a3 b2 b3 a4 c3 b4\n").unwrap();
        assert_eq!(
            ids(&tasks),
            ["a1", "a2", "c1", "b1", "c2", "a3", "b2", "b3", "a4", "c3", "b4"]
        );
        let kinds: Vec<&str> = tasks.iter().map(|t| t.kind()).collect();
        assert_eq!(
            kinds,
            ["a", "a", "c", "b", "c", "a", "b", "b", "a", "c", "b"]
        );
        let cols: Vec<u32> = tasks.iter().map(|t| t.col()).collect();
        assert_eq!(cols, [1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31]);
        assert!(tasks.iter().all(|t| t.line() == 1 && t.args().is_empty()));
    }

    #[test]
    fn repo_seed_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tasks.txt");
        if !path.exists() {
            return; // the crate was built outside the workspace
        }
        let tasks = load(&path).unwrap();
        assert_eq!(tasks.len(), 11);
        assert_eq!(tasks[0].id(), "a1");
        assert_eq!(tasks[10].id(), "b4");
    }

    #[test]
    fn comments_blank_lines_tabs_and_crlf() {
        let text = "# header comment\r\n\r\n\ta1\tb1 # trailing\r\nc1# glued comment\r\n   \r\n#a9 commented out\r\nd1";
        let tasks = parse("t.txt", text).unwrap();
        assert_eq!(ids(&tasks), ["a1", "b1", "c1", "d1"]);
        assert_eq!((tasks[0].line(), tasks[0].col()), (3, 2));
        assert_eq!((tasks[1].line(), tasks[1].col()), (3, 5));
        assert_eq!((tasks[2].line(), tasks[2].col()), (4, 1));
        assert_eq!((tasks[3].line(), tasks[3].col()), (7, 1));
        // CRLF does not leak into ids.
        assert!(tasks.iter().all(|t| !t.id().contains('\r')));
    }

    #[test]
    fn multiple_lines_keep_positions() {
        let text = "a1 a2\n  b1\n\nc1   c2\n";
        let tasks = parse("t.txt", text).unwrap();
        let pos: Vec<(&str, u32, u32)> =
            tasks.iter().map(|t| (t.id(), t.line(), t.col())).collect();
        assert_eq!(
            pos,
            [
                ("a1", 1, 1),
                ("a2", 1, 4),
                ("b1", 2, 3),
                ("c1", 4, 1),
                ("c2", 4, 6)
            ]
        );
    }

    #[test]
    fn uppercase_id_has_lower_case_kind_and_keeps_its_id() {
        let tasks = parse("t.txt", "A1 Bb2_x.y-z").unwrap();
        assert_eq!(tasks[0].id(), "A1");
        assert_eq!(tasks[0].kind(), "a");
        assert_eq!(tasks[1].id(), "Bb2_x.y-z");
        assert_eq!(tasks[1].kind(), "bb");
    }

    #[test]
    fn leading_bom_is_ignored() {
        let tasks = parse("t.txt", "\u{feff}a1 b1").unwrap();
        assert_eq!(ids(&tasks), ["a1", "b1"]);
        assert_eq!(tasks[0].col(), 1);
    }

    #[test]
    fn invalid_token_starting_with_digit() {
        let err = parse("tasks.txt", "a1\nb1  1a c1\n").unwrap_err();
        assert_eq!((err.line, err.col), (2, 5));
        assert_eq!(err.kind, ParseErrorKind::InvalidId);
        assert_eq!(
            err.to_string(),
            "tasks.txt:2:5: invalid task id \"1a\": a task id starts with its type letters \
             followed by a digit, e.g. a1"
        );
    }

    #[test]
    fn invalid_tokens_explain_what_is_wrong() {
        let err = parse("t.txt", "a1 abc").unwrap_err();
        assert_eq!((err.line, err.col), (1, 4));
        assert!(err.message.contains("followed by a digit"), "{err}");
        assert!(err.message.contains("abc1"), "{err}");

        let err = parse("t.txt", "a1\n\nb-1").unwrap_err();
        assert_eq!((err.line, err.col), (3, 1));
        assert!(err.message.contains("not '-'"), "{err}");

        let err = parse("t.txt", "a1 a2!").unwrap_err();
        assert_eq!((err.line, err.col), (1, 4));
        assert!(err.message.contains("'!' is not allowed"), "{err}");

        // A dependency on a task the file does not declare names both, at the dependency.
        let err = parse("t.txt", "b2 after a1").unwrap_err();
        assert_eq!((err.line, err.col), (1, 10));
        assert_eq!(err.kind, ParseErrorKind::Dependency);
        assert!(err.message.contains("unknown task \"a1\""), "{err}");
    }

    #[test]
    fn dependencies_and_arguments() {
        let text = "a1 c1\nb2 after a1 c1 -- --size 10   in.csv # note\nc2 --   x  y\nb1 after b2";
        let tasks = parse("t.txt", text).unwrap();
        assert_eq!(ids(&tasks), vec!["a1", "c1", "b2", "c2", "b1"]);
        assert_eq!(tasks[2].deps(), vec!["a1", "c1"]);
        assert_eq!(tasks[2].args(), "--size 10   in.csv");
        assert_eq!(tasks[3].args(), "x  y");
        assert!(tasks[3].deps().is_empty());
        assert_eq!(tasks[4].deps(), vec!["b2"]);
        assert_eq!((tasks[4].line(), tasks[4].col()), (4, 1));
    }

    #[test]
    fn dependency_errors_name_the_tasks() {
        let err = parse("t.txt", "a1 after a1").unwrap_err();
        assert!(err.message.contains("a1 depends on itself"), "{err}");

        let err = parse("t.txt", "a1 after b1\nb1 after c1\nc1 after a1").unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::Dependency);
        assert!(
            err.message
                .starts_with("dependency cycle: a1 -> b1 -> c1 -> a1"),
            "{err}"
        );

        let err = parse("t.txt", "a1 a2 after a1").unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::Syntax);
        assert_eq!((err.line, err.col), (1, 4));

        let err = parse("t.txt", "a1\nb1 after\n").unwrap_err();
        assert_eq!((err.line, err.col), (2, 4));

        let err = parse("t.txt", "a1\nb1 after 9x").unwrap_err();
        assert_eq!(
            (err.line, err.col, err.kind),
            (2, 10, ParseErrorKind::InvalidId)
        );
    }

    #[test]
    fn costs_and_limits_in_any_order_before_the_arguments() {
        let text = "a1 cost 10 timeout 2m retries 3\n\
                    b1 retries 0 after a1 cost 2 -- x y\n\
                    c1 timeout 1h30m\n\
                    d1 after a1 timeout 0 -- cost 5\n\
                    e1 f1";
        let tasks = parse("t.txt", text).unwrap();
        let terms: Vec<(u32, Option<Duration>, Option<u32>)> = tasks
            .iter()
            .map(|t| (t.cost(), t.timeout(), t.retries()))
            .collect();
        assert_eq!(
            terms,
            [
                (10, Some(Duration::from_secs(120)), Some(3)),
                (2, None, Some(0)),
                (1, Some(Duration::from_secs(5400)), None),
                (1, Some(Duration::ZERO), None),
                (1, None, None),
                (1, None, None),
            ]
        );
        assert_eq!(tasks[1].deps(), ["a1"]);
        assert_eq!(tasks[1].args(), "x y");
        // After `--`, keywords are arguments.
        assert_eq!(tasks[3].args(), "cost 5");
        assert!(!tasks[4].has_own_terms() && tasks[0].has_own_terms());
    }

    #[test]
    fn bad_costs_and_limits_are_reported_at_the_word() {
        let cases: &[(&str, u32, &str)] = &[
            ("a1 cost", 4, "`cost` needs a value"),
            ("a1 cost 0", 9, "bad cost \"0\""),
            ("a1 cost -1", 9, "bad cost \"-1\""),
            ("a1 cost 1.5", 9, "bad cost \"1.5\""),
            ("a1 cost 4294967296", 9, "bad cost"),
            ("a1 cost 2 3", 11, "`cost` takes one value"),
            ("a1 cost -- x", 4, "`cost` needs a value"),
            ("a1 timeout 3x", 12, "bad timeout \"3x\""),
            ("a1 timeout after a2\na2", 4, "`timeout` needs a value"),
            ("a1 retries -1", 12, "bad retries"),
            ("a1 retries", 4, "`retries` needs a value"),
            ("a1 cost 2 cost 3", 11, "`cost` given twice"),
            (
                "a1 timeout 1s retries 1 timeout 2s",
                25,
                "`timeout` given twice",
            ),
            (
                "a1 after a2 cost 2 after a3\na2 a3",
                20,
                "`after` given twice",
            ),
        ];
        for &(text, col, msg) in cases {
            let err = parse("t.txt", text).unwrap_err();
            assert_eq!((err.line, err.col), (1, col), "{text:?}: {err}");
            assert!(err.message.contains(msg), "{text:?}: {err}");
            assert!(
                err.to_string().starts_with(&format!("t.txt:1:{col}: ")),
                "{err}"
            );
        }
        let err = parse("t.txt", "a1 cost x").unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::Keyword);
        // A keyword on a line of several tasks.
        let err = parse("t.txt", "a1\nb1 b2 cost 3").unwrap_err();
        assert_eq!(
            (err.line, err.col, err.kind),
            (2, 4, ParseErrorKind::Syntax)
        );
        let err = parse("t.txt", "cost 3").unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::Syntax);
    }

    #[test]
    fn inputs_and_outputs_in_any_order_and_artifacts_imply_after() {
        let text = "a1 > out.txt > logs/run.log < in.csv cost 2\n\
                    b1 < @a1/logs/run.log after c1 < /abs/x.bin > r -- x\n\
                    c1\n";
        let tasks = parse("t.txt", text).unwrap();
        assert_eq!(tasks[0].outputs(), ["out.txt", "logs/run.log"]);
        assert_eq!(tasks[0].inputs(), [Input::Path(PathBuf::from("in.csv"))]);
        assert_eq!(tasks[0].cost(), 2);
        assert_eq!(
            tasks[1].inputs(),
            [
                Input::Artifact {
                    task: "a1".into(),
                    name: "logs/run.log".into()
                },
                Input::Path(PathBuf::from("/abs/x.bin"))
            ]
        );
        assert_eq!(tasks[1].inputs()[0].file_name(), Some("run.log"));
        // The artifact's producer first, then the `after` clause's.
        assert_eq!(tasks[1].deps(), ["a1", "c1"]);
        assert_eq!(tasks[1].outputs(), ["r"]);
        assert_eq!(tasks[1].args(), "x");
        // An artifact of a task also named in `after` is one dependency.
        let tasks = parse("t.txt", "a1 > o\nb1 after a1 < @a1/o").unwrap();
        assert_eq!(tasks[1].deps(), ["a1"]);
        // After `--`, `<` and `>` are arguments.
        let tasks = parse("t.txt", "a1 -- < x > y").unwrap();
        assert!(tasks[0].inputs().is_empty() && tasks[0].outputs().is_empty());
        assert_eq!(tasks[0].args(), "< x > y");
    }

    #[test]
    fn bad_inputs_and_outputs_are_reported_at_the_word() {
        let cases: &[(&str, u32, &str)] = &[
            ("a1 > ../x", 6, "`..` are not allowed"),
            ("a1 > a/../../x", 6, "`..` are not allowed"),
            ("a1 > /etc/passwd", 6, "an absolute path"),
            ("a1 > a//b", 6, "empty path components"),
            ("a1 > a/", 6, "empty path components"),
            ("a1 > ./a", 6, "`..` are not allowed"),
            ("a1 > .", 6, "`..` are not allowed"),
            ("a1 > o > o", 10, "declared twice"),
            ("a1 >", 4, "`>` needs a value"),
            ("a1 > x y", 8, "`>` takes one value"),
            ("a1 <", 4, "`<` needs a value"),
            ("a1 < ..", 6, "names no file"),
            ("a1 < /", 6, "names no file"),
            (
                "a1 < x/in < y/in",
                13,
                "two inputs of a task need two file names",
            ),
            ("a1 < @b1", 6, "an artifact is `@TASK/NAME`"),
            ("a1 < @1b/x", 6, "bad input"),
            ("a1 < @b1/../x\nb1", 6, "`..` are not allowed"),
            ("a1 < @b1/x\nb1 > y", 6, "task b1 declares no output \"x\""),
            ("a1 < @b1/x", 6, "unknown task \"b1\""),
            ("a1 > o < @a1/o", 10, "a1 depends on itself"),
        ];
        let many: String = (0..33).map(|i| format!(" > o{i}")).collect();
        let err = parse("t.txt", &format!("a1{many}")).unwrap_err();
        assert!(err.message.contains("more than 32 outputs"), "{err}");
        let many: String = (0..33).map(|i| format!(" < i{i}")).collect();
        let err = parse("t.txt", &format!("a1{many}")).unwrap_err();
        assert!(err.message.contains("more than 32 inputs"), "{err}");
        let long = format!("a1 > {}", "d/".repeat(256) + "x");
        let err = parse("t.txt", &long).unwrap_err();
        assert!(err.message.contains("longer than 512 bytes"), "{err}");
        for &(text, col, msg) in cases {
            let err = parse("t.txt", text).unwrap_err();
            assert_eq!((err.line, err.col), (1, col), "{text:?}: {err}");
            assert!(err.message.contains(msg), "{text:?}: {err}");
        }
        let err = parse("t.txt", "a1 > ../x").unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::File);
        assert!(
            err.to_string().starts_with("t.txt:1:6: bad output"),
            "{err}"
        );
    }

    #[test]
    fn load_resolves_inputs_against_the_task_file_directory_and_requires_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/in.csv"), "x").unwrap();
        let abs = dir.path().join("abs.bin");
        std::fs::write(&abs, "y").unwrap();
        let path = dir.path().join("tasks.txt");
        std::fs::write(&path, format!("a1 < data/in.csv < {} > o\n", abs.display())).unwrap();
        let tasks = load(&path).unwrap();
        assert_eq!(
            tasks[0].inputs(),
            [
                Input::Path(dir.path().join("data/in.csv")),
                Input::Path(abs.clone())
            ]
        );
        // A missing input, and a directory, are errors at the path.
        std::fs::write(&path, "a1\nb1 > o < data/nope.csv\n").unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!((err.line, err.col, err.kind), (2, 10, ParseErrorKind::File));
        assert!(
            err.message.contains("cannot read input \"data/nope.csv\""),
            "{err}"
        );
        assert!(err.message.contains("os error 2"), "{err}");
        std::fs::write(&path, "a1 < data\n").unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!((err.line, err.col), (1, 6));
        assert!(err.message.contains("not a regular file"), "{err}");
        // parse() alone does not look at the file system.
        let tasks = parse("t.txt", "a1 < data/nope.csv").unwrap();
        assert_eq!(
            tasks[0].inputs(),
            [Input::Path(PathBuf::from("data/nope.csv"))]
        );
    }

    #[test]
    fn duplicate_id_names_both_positions() {
        let err = parse("tasks.txt", "a1 b1\n  c1\na1\n").unwrap_err();
        assert_eq!((err.line, err.col), (3, 1));
        assert_eq!(err.kind, ParseErrorKind::DuplicateId);
        assert_eq!(
            err.to_string(),
            "tasks.txt:3:1: duplicate task id \"a1\" (first at line 1, column 1)"
        );
        // Exact comparison: a different case is a different id.
        assert_eq!(parse("t.txt", "a1 A1").unwrap().len(), 2);
    }

    #[test]
    fn no_tasks_is_an_error_without_position() {
        for text in ["", "\n\n", "# only a comment\n  \t\n"] {
            let err = parse("tasks.txt", text).unwrap_err();
            assert_eq!((err.line, err.col), (0, 0));
            assert_eq!(err.kind, ParseErrorKind::NoTasks);
            assert_eq!(err.to_string(), "tasks.txt: no tasks found");
        }
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        // Multibyte characters in a comment on a previous line do not shift later columns.
        let err = parse("t.txt", "a1 # é€😀 ünïcödé\n   1x").unwrap_err();
        assert_eq!((err.line, err.col), (2, 4));
        // Nor do multibyte characters earlier on the same line.
        let err = parse("t.txt", "a1\u{3000}é1").unwrap_err(); // U+3000 is whitespace
        assert_eq!((err.line, err.col), (1, 4));
        let tasks = parse("t.txt", "a1\u{a0}\u{a0}b1").unwrap(); // no-break spaces
        assert_eq!(tasks[1].col(), 5);
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.txt");
        std::fs::write(&path, "a1 b1\n").unwrap();
        let tasks = load(&path).unwrap();
        assert_eq!(ids(&tasks), ["a1", "b1"]);

        std::fs::write(&path, "a1 b1\n\n  a1\n").unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!(err.file, path.display().to_string());
        assert_eq!((err.line, err.col), (3, 3));
    }

    #[test]
    fn load_missing_file_names_path_and_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.txt");
        let err = load(&path).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::Io(std::io::ErrorKind::NotFound));
        assert_eq!((err.line, err.col), (0, 0));
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{}: ", path.display())),
            "{shown}"
        );
        assert!(shown.contains("os error 2"), "{shown}");
    }

    #[test]
    fn load_non_utf8_names_path_and_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.txt");
        std::fs::write(&path, b"a1 \xc3\xa9\n b1 \xff c1\n").unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::NotUtf8);
        assert_eq!((err.line, err.col), (2, 5));
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{}:2:5: ", path.display())),
            "{shown}"
        );
        assert!(shown.contains("not valid UTF-8"), "{shown}");
        assert!(shown.contains("0xff"), "{shown}");
    }
}
