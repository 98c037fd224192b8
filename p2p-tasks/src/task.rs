//! The task model: one task of a plan, as read from a task file.
//!
//! A task is written as a token such as `a1`: its **type** (here called `kind`) is the
//! leading ASCII letters, lower-cased (`A1` has type `a`), and its **id** is the whole token,
//! verbatim. A valid id matches `^[A-Za-z]+[0-9][A-Za-z0-9_.-]*$`.
//!
//! A program that makes its tasks itself gives the type apart from the id
//! ([`Task::new`]): then the id need not start with its type (`photo-001.jpg`, type
//! `resize`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::TaskError;

/// One task of a plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Task {
    /// The whole token, verbatim, e.g. `a1` or `A1`.
    pub id: String,
    /// The task's type: the leading ASCII letters of the id, lower-cased, e.g. `a`.
    pub kind: String,
    /// The task's arguments, passed to its handler as `{args}` (empty unless the task file
    /// gives some after `--`).
    pub args: String,
    /// Ids of the tasks that must succeed before this one starts (`b2 after a1 c1`).
    pub deps: Vec<String>,
    /// 1-based line of the token in its file (0 when the task did not come from a file).
    pub line: u32,
    /// 1-based column, counted in characters, of the token's first character (0 when the task
    /// did not come from a file).
    pub col: u32,
    /// How big the task is, relative to the others (`cost N`, at least 1; default 1). In
    /// `--order none` and `--order type`, the costliest ready task starts first.
    #[serde(default = "default_cost")]
    pub cost: u32,
    /// This task's attempt timeout (`timeout DUR`), overriding the run's; zero means none.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// This task's retries (`retries N`), overriding the run's.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Files placed in the task's working directory before it starts (`< PATH`,
    /// `< @DEP/NAME`), in file order. Each is placed under its [`Input::file_name`].
    #[serde(default)]
    pub inputs: Vec<Input>,
    /// Files the task writes in its working directory, fetched back after success
    /// (`> NAME`): plain relative paths (see [`output_name_problem`]), in file order.
    #[serde(default)]
    pub outputs: Vec<String>,
}

/// A file a task needs in its working directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Input {
    /// A file on the coordinator's side (`< PATH`; the task file's loader makes a relative
    /// path relative to the task file's directory), placed under its file name.
    Path(PathBuf),
    /// Bytes given by a program that embeds a node, placed under `name` (a plain file name).
    Bytes {
        /// The file name in the working directory.
        name: String,
        /// The file's contents.
        data: Vec<u8>,
    },
    /// The declared output `name` of task `task` (`< @DEP/NAME`), placed under the last
    /// component of `name`. The task waits for `task` to succeed.
    Artifact {
        /// The producing task's id.
        task: String,
        /// The output's name, as the producing task declares it (`> NAME`).
        name: String,
    },
}

impl Input {
    /// The name the file gets in the task's working directory: a path's file name, the
    /// bytes' name, an artifact's last component. `None` for a path with no file name
    /// (`/`, `..`) or one that is not UTF-8.
    pub fn file_name(&self) -> Option<&str> {
        match self {
            Input::Path(p) => p.file_name().and_then(|n| n.to_str()),
            Input::Bytes { name, .. } => Some(name.as_str()),
            Input::Artifact { name, .. } => name.rsplit('/').next(),
        }
    }
}

/// Why `name` cannot name a task's output (`> NAME`) inside its working directory, or
/// `None` when it can: a plain relative path of `/`-separated components, none of them
/// empty, `.` or `..`, without NUL or control characters, at most 255 bytes a component and
/// 512 in all (what the protocol carries, [`p2p_core::message::MAX_FILE_NAME`]).
pub fn output_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("the name is empty");
    }
    if name.len() > p2p_core::message::MAX_FILE_NAME {
        return Some("the name is longer than 512 bytes");
    }
    if name.starts_with('/') {
        return Some("an absolute path is not allowed: name a file inside the working directory");
    }
    if name.chars().any(|c| c.is_control()) {
        return Some("control characters are not allowed");
    }
    for part in name.split('/') {
        match part {
            "" => return Some("empty path components (`//`, a trailing `/`) are not allowed"),
            "." | ".." => {
                return Some(
                    "`.` and `..` are not allowed: name a file inside the working directory",
                )
            }
            p if p.len() > 255 => return Some("a path component is longer than 255 bytes"),
            _ => {}
        }
    }
    None
}

fn default_cost() -> u32 {
    1
}

/// The longest task id [`Task::new`] takes, in bytes.
pub const MAX_ID_LEN: usize = 1024;

impl Task {
    /// A task with its own id and type, for programs that make their tasks themselves: the
    /// id need not start with its type. The id is 1 to [`MAX_ID_LEN`] bytes without
    /// whitespace or control characters; the type is 1 to [`p2p_core::wire::MAX_TYPE_LEN`]
    /// ASCII letters, case-folded (as a node's handlers are). No arguments, no
    /// dependencies, no position, cost 1; set the public fields for more.
    ///
    /// ```
    /// let t = p2p_tasks::Task::new("photo-001.jpg", "Resize")?;
    /// assert_eq!((t.id.as_str(), t.kind.as_str()), ("photo-001.jpg", "resize"));
    /// # Ok::<(), p2p_tasks::Error>(())
    /// ```
    pub fn new(id: impl Into<String>, kind: impl AsRef<str>) -> Result<Task, crate::Error> {
        let id = id.into();
        let kind = kind.as_ref();
        if id.is_empty() {
            return Err(TaskError::EmptyId.into());
        }
        if id.len() > MAX_ID_LEN {
            return Err(TaskError::IdTooLong {
                len: id.len(),
                max: MAX_ID_LEN,
            }
            .into());
        }
        if let Some(ch) = id.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(TaskError::IdCharacter { id, ch }.into());
        }
        let max = p2p_core::wire::MAX_TYPE_LEN;
        if kind.is_empty() || kind.len() > max || !kind.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(TaskError::InvalidType {
                kind: kind.to_owned(),
                max,
            }
            .into());
        }
        Ok(Task {
            id,
            kind: kind.to_ascii_lowercase(),
            args: String::new(),
            deps: Vec::new(),
            line: 0,
            col: 0,
            cost: 1,
            timeout: None,
            retries: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
        })
    }

    /// Builds a task from a valid id, with empty arguments and no position (line and column 0).
    ///
    /// Returns `None` when `id` is not a valid task id (see [`is_valid_id`]).
    pub fn from_id(id: &str) -> Option<Task> {
        if !is_valid_id(id) {
            return None;
        }
        Some(Task {
            id: id.to_owned(),
            kind: kind_of(id)?,
            args: String::new(),
            deps: Vec::new(),
            line: 0,
            col: 0,
            cost: 1,
            timeout: None,
            retries: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
        })
    }

    /// Whether the task has a cost or a limit of its own (not the defaults).
    pub fn has_own_terms(&self) -> bool {
        self.cost != 1 || self.timeout.is_some() || self.retries.is_some()
    }

    /// Whether the task ships or collects files (inputs or outputs declared).
    pub fn has_files(&self) -> bool {
        !self.inputs.is_empty() || !self.outputs.is_empty()
    }
}

impl fmt::Display for Task {
    /// Prints the task's id, e.g. `a1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// The type of a task id: its leading ASCII letters, lower-cased (`"A12"` gives `"a"`).
///
/// Returns `None` when the token does not start with an ASCII letter. This does not check the
/// rest of the token; see [`is_valid_id`] for that.
pub fn kind_of(id: &str) -> Option<String> {
    let letters: String = id
        .chars()
        .take_while(char::is_ascii_alphabetic)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if letters.is_empty() {
        None
    } else {
        Some(letters)
    }
}

/// Whether `id` is a valid task id: `^[A-Za-z]+[0-9][A-Za-z0-9_.-]*$`.
pub fn is_valid_id(id: &str) -> bool {
    id_problem(id).is_none()
}

/// Why `id` is not a valid task id, as a sentence that also says what is expected;
/// `None` when it is valid.
pub(crate) fn id_problem(id: &str) -> Option<String> {
    const EXPECTED: &str = "a task id starts with its type letters followed by a digit, e.g. a1";
    let letters = id.chars().take_while(char::is_ascii_alphabetic).count();
    if letters == 0 {
        return Some(EXPECTED.to_owned());
    }
    // The letters are ASCII, so `letters` is also a byte offset.
    let rest = &id[letters..];
    match rest.chars().next() {
        None => {
            return Some(format!(
                "the type letters must be followed by a digit, e.g. {id}1"
            ))
        }
        Some(c) if !c.is_ascii_digit() => {
            return Some(format!(
                "the type letters must be followed by a digit, not {c:?}; {EXPECTED}"
            ))
        }
        Some(_) => {}
    }
    if let Some(bad) = rest
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Some(format!(
            "character {bad:?} is not allowed in a task id (after the type letters and a digit, \
             only ASCII letters, digits, '_', '.' and '-' may follow)"
        ));
    }
    None
}

/// Task ids to their positions in a task list, at 4 bytes per task (the ids themselves are
/// not copied: the list is passed to every call). For the parser and the plan checks of
/// files with a million tasks.
pub(crate) struct IdIndex {
    table: hashbrown::HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl IdIndex {
    /// An empty index for about `n` tasks.
    pub(crate) fn with_capacity(n: usize) -> Self {
        IdIndex {
            table: hashbrown::HashTable::with_capacity(n),
            hasher: hashbrown::DefaultHashBuilder::default(),
        }
    }

    /// The index of every task of `tasks` (a later duplicate id is not added).
    pub(crate) fn build(tasks: &[Task]) -> Self {
        let mut index = IdIndex::with_capacity(tasks.len());
        for (i, t) in tasks.iter().enumerate() {
            index.first_or_insert(tasks, &t.id, i);
        }
        index
    }

    /// The position of the task with id `id` if the index has one; else records that
    /// the task at `i` (in `tasks`, or about to be pushed there) has it. One hash either way.
    pub(crate) fn first_or_insert(&mut self, tasks: &[Task], id: &str, i: usize) -> Option<usize> {
        let pos = u32::try_from(i).ok()?;
        let hash = self.hash(id);
        let hasher = &self.hasher;
        let entry = self.table.entry(
            hash,
            |&j| tasks.get(j as usize).is_some_and(|t| t.id == id),
            |&j| {
                let id = tasks.get(j as usize).map_or("", |t| t.id.as_str());
                std::hash::BuildHasher::hash_one(hasher, id)
            },
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(e) => Some(*e.get() as usize),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(pos);
                None
            }
        }
    }

    fn hash(&self, id: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, id)
    }

    /// The position of the task with this id.
    pub(crate) fn get(&self, tasks: &[Task], id: &str) -> Option<usize> {
        self.table
            .find(self.hash(id), |&i| {
                tasks.get(i as usize).is_some_and(|t| t.id == id)
            })
            .map(|&i| i as usize)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_id_index_finds_every_task_as_it_grows_and_keeps_the_first_of_a_duplicate() {
        let mut tasks: Vec<Task> = Vec::new();
        let mut index = IdIndex::with_capacity(0);
        for i in 0..5000 {
            let id = format!("a{i}");
            assert_eq!(index.first_or_insert(&tasks, &id, i), None);
            tasks.push(Task::from_id(&id).unwrap());
        }
        assert_eq!(index.first_or_insert(&tasks, "a42", 5000), Some(42));
        for i in (0..5000).step_by(7) {
            assert_eq!(index.get(&tasks, &format!("a{i}")), Some(i));
        }
        assert_eq!(index.get(&tasks, "a5000"), None);
        assert_eq!(index.get(&tasks, "b1"), None);
        // build: a later duplicate keeps pointing at the first.
        tasks.push(Task::from_id("a3").unwrap());
        let built = IdIndex::build(&tasks);
        assert_eq!(built.get(&tasks, "a3"), Some(3));
        assert_eq!(built.get(&tasks, "a4999"), Some(4999));
    }

    #[test]
    fn kind_of_takes_leading_letters_lower_cased() {
        assert_eq!(kind_of("a1").as_deref(), Some("a"));
        assert_eq!(kind_of("A1").as_deref(), Some("a"));
        assert_eq!(kind_of("Build12x").as_deref(), Some("build"));
        assert_eq!(kind_of("1a"), None);
        assert_eq!(kind_of(""), None);
        assert_eq!(kind_of("é1"), None);
    }

    #[test]
    fn valid_and_invalid_ids() {
        for ok in ["a1", "A1", "abc9", "a1_x.y-z", "b0"] {
            assert!(is_valid_id(ok), "{ok} should be valid");
        }
        for bad in ["", "1a", "a", "ab", "a-1", "a1!", "é1", "a1é", "_a1"] {
            assert!(!is_valid_id(bad), "{bad} should be invalid");
        }
    }

    #[test]
    fn new_takes_any_id_with_its_own_type_and_refuses_bad_ones_by_variant() {
        use crate::Error;
        let t = Task::new("photo-001.jpg", "Resize").unwrap();
        assert_eq!(
            (t.id.as_str(), t.kind.as_str()),
            ("photo-001.jpg", "resize")
        );
        assert!(t.args.is_empty() && t.deps.is_empty() && !t.has_own_terms());
        assert!(matches!(
            Task::new("", "a"),
            Err(Error::InvalidTask(TaskError::EmptyId))
        ));
        assert!(matches!(
            Task::new("x".repeat(MAX_ID_LEN + 1), "a"),
            Err(Error::InvalidTask(TaskError::IdTooLong { len, max: MAX_ID_LEN })) if len == MAX_ID_LEN + 1
        ));
        assert!(Task::new("x".repeat(MAX_ID_LEN), "a").is_ok());
        assert!(matches!(
            Task::new("two words", "a"),
            Err(Error::InvalidTask(TaskError::IdCharacter { ch: ' ', .. }))
        ));
        assert!(matches!(
            Task::new("a\u{1b}[2J", "a"),
            Err(Error::InvalidTask(TaskError::IdCharacter {
                ch: '\u{1b}',
                ..
            }))
        ));
        for bad in [
            "",
            "a1",
            "re-size",
            "é",
            &"a".repeat(p2p_core::wire::MAX_TYPE_LEN + 1),
        ] {
            assert!(
                matches!(
                    Task::new("t", bad),
                    Err(Error::InvalidTask(TaskError::InvalidType { .. }))
                ),
                "{bad:?}"
            );
        }
        assert!(Task::new("t", "a".repeat(p2p_core::wire::MAX_TYPE_LEN)).is_ok());
    }

    #[test]
    fn display_prints_the_id_and_from_id_fills_kind() {
        let t = Task::from_id("Ab3").unwrap();
        assert_eq!(t.to_string(), "Ab3");
        assert_eq!(t.kind, "ab");
        assert_eq!(t.args, "");
        assert_eq!((t.line, t.col), (0, 0));
        assert_eq!(Task::from_id("3b"), None);
    }
}
