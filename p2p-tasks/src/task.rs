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

use compact_str::CompactString;

use crate::TaskError;

/// One task of a plan.
///
/// A million tasks are held at once, so a task is small (64 bytes): its id and its type are
/// kept inline when they are short (up to 24 bytes each, no heap block), and what most tasks
/// do not have (arguments, dependencies, a cost, limits of their own, files) sits behind one
/// optional box, [`TaskExtra`], allocated only for a task that has some. Read the task
/// through its accessors; change the rare fields through [`Task::extra_mut`].
///
/// Its serialized form (serde) is the same as when every field was public: `id`, `kind`,
/// `args`, `deps`, `line`, `col`, `cost`, `timeout`, `retries`, `inputs`, `outputs`.
#[derive(Debug, Clone)]
pub struct Task {
    id: CompactString,
    kind: CompactString,
    line: u32,
    col: u32,
    extra: Option<Box<TaskExtra>>,
}

/// What few tasks have: arguments, dependencies, a cost, limits of their own, files. A task
/// without any of them holds no `TaskExtra` ([`Task::extra`] is `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskExtra {
    /// The task's arguments, passed to its handler as `{args}` (empty unless the task file
    /// gives some after `--`).
    pub args: String,
    /// Ids of the tasks that must succeed before this one starts (`b2 after a1 c1`).
    pub deps: Vec<String>,
    /// How big the task is, relative to the others (`cost N`, at least 1; default 1). In
    /// `--order none` and `--order type`, the costliest ready task starts first.
    pub cost: u32,
    /// This task's attempt timeout (`timeout DUR`), overriding the run's; zero means none.
    pub timeout: Option<Duration>,
    /// This task's retries (`retries N`), overriding the run's.
    pub retries: Option<u32>,
    /// Files placed in the task's working directory before it starts (`< PATH`,
    /// `< @DEP/NAME`), in file order. Each is placed under its [`Input::file_name`].
    pub inputs: Vec<Input>,
    /// Files the task writes in its working directory, fetched back after success
    /// (`> NAME`): plain relative paths (see [`output_name_problem`]), in file order.
    pub outputs: Vec<String>,
}

impl Default for TaskExtra {
    fn default() -> Self {
        TaskExtra {
            args: String::new(),
            deps: Vec::new(),
            cost: 1,
            timeout: None,
            retries: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }
}

impl TaskExtra {
    /// Whether every field has its default (then a task need not hold it).
    fn is_default(&self) -> bool {
        self.args.is_empty()
            && self.deps.is_empty()
            && self.cost == 1
            && self.timeout.is_none()
            && self.retries.is_none()
            && self.inputs.is_empty()
            && self.outputs.is_empty()
    }
}

/// The defaults a task without a [`TaskExtra`] reads as.
static NO_EXTRA: std::sync::LazyLock<TaskExtra> = std::sync::LazyLock::new(TaskExtra::default);

impl PartialEq for Task {
    fn eq(&self, other: &Task) -> bool {
        self.id == other.id
            && self.kind == other.kind
            && self.line == other.line
            && self.col == other.col
            && self.rare() == other.rare()
    }
}

impl Eq for Task {}

/// [`Task`]'s serialized form: the fields it had when they were all public, in that order.
#[derive(serde::Serialize)]
struct TaskOut<'a> {
    id: &'a str,
    kind: &'a str,
    args: &'a str,
    deps: &'a [String],
    line: u32,
    col: u32,
    cost: u32,
    timeout: Option<Duration>,
    retries: Option<u32>,
    inputs: &'a [Input],
    outputs: &'a [String],
}

/// [`Task`]'s serialized form, read back.
#[derive(serde::Deserialize)]
struct TaskIn {
    id: String,
    kind: String,
    args: String,
    deps: Vec<String>,
    line: u32,
    col: u32,
    #[serde(default = "default_cost")]
    cost: u32,
    #[serde(default)]
    timeout: Option<Duration>,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    inputs: Vec<Input>,
    #[serde(default)]
    outputs: Vec<String>,
}

impl serde::Serialize for Task {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let x = self.rare();
        TaskOut {
            id: &self.id,
            kind: &self.kind,
            args: &x.args,
            deps: &x.deps,
            line: self.line,
            col: self.col,
            cost: x.cost,
            timeout: x.timeout,
            retries: x.retries,
            inputs: &x.inputs,
            outputs: &x.outputs,
        }
        .serialize(ser)
    }
}

impl<'de> serde::Deserialize<'de> for Task {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Task, D::Error> {
        let t = TaskIn::deserialize(de)?;
        let mut task = Task {
            id: CompactString::from(t.id),
            kind: CompactString::from(t.kind),
            line: t.line,
            col: t.col,
            extra: None,
        };
        task.set_extra(TaskExtra {
            args: t.args,
            deps: t.deps,
            cost: t.cost,
            timeout: t.timeout,
            retries: t.retries,
            inputs: t.inputs,
            outputs: t.outputs,
        });
        Ok(task)
    }
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
    /// dependencies, no position, cost 1; see [`Task::extra_mut`] and
    /// [`Task::set_position`] for more.
    ///
    /// ```
    /// let t = p2p_tasks::Task::new("photo-001.jpg", "Resize")?;
    /// assert_eq!((t.id(), t.kind()), ("photo-001.jpg", "resize"));
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
            id: CompactString::from(id),
            kind: CompactString::from(kind.to_ascii_lowercase()),
            line: 0,
            col: 0,
            extra: None,
        })
    }

    /// Builds a task from a valid id, with empty arguments and no position (line and column 0).
    ///
    /// Returns `None` when `id` is not a valid task id (see [`is_valid_id`]).
    pub fn from_id(id: &str) -> Option<Task> {
        if !is_valid_id(id) {
            return None;
        }
        Some(Task::parsed(id, kind_of_compact(id)?, 0, 0))
    }

    /// A task of the parser: `id` (already checked) of type `kind`, at `line` and `col`.
    pub(crate) fn parsed(id: &str, kind: CompactString, line: u32, col: u32) -> Task {
        Task {
            id: CompactString::from(id),
            kind,
            line,
            col,
            extra: None,
        }
    }

    /// The whole token, verbatim, e.g. `a1` or `A1`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The task's type: the leading ASCII letters of the id, lower-cased, e.g. `a` (or the
    /// type given to [`Task::new`]).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// 1-based line of the token in its file (0 when the task did not come from a file).
    pub fn line(&self) -> u32 {
        self.line
    }

    /// 1-based column, counted in characters, of the token's first character (0 when the
    /// task did not come from a file).
    pub fn col(&self) -> u32 {
        self.col
    }

    /// Sets where the task was written (1-based line and column; 0 for none).
    pub fn set_position(&mut self, line: u32, col: u32) {
        self.line = line;
        self.col = col;
    }

    /// The task's arguments ([`TaskExtra::args`]; empty for none).
    pub fn args(&self) -> &str {
        &self.rare().args
    }

    /// The ids of the tasks this one waits for ([`TaskExtra::deps`]).
    pub fn deps(&self) -> &[String] {
        &self.rare().deps
    }

    /// The task's cost ([`TaskExtra::cost`]; 1 by default).
    pub fn cost(&self) -> u32 {
        self.extra.as_ref().map_or(1, |x| x.cost)
    }

    /// The task's own attempt timeout ([`TaskExtra::timeout`]).
    pub fn timeout(&self) -> Option<Duration> {
        self.extra.as_ref().and_then(|x| x.timeout)
    }

    /// The task's own retries ([`TaskExtra::retries`]).
    pub fn retries(&self) -> Option<u32> {
        self.extra.as_ref().and_then(|x| x.retries)
    }

    /// The files placed in its working directory ([`TaskExtra::inputs`]).
    pub fn inputs(&self) -> &[Input] {
        &self.rare().inputs
    }

    /// The files fetched back after success ([`TaskExtra::outputs`]).
    pub fn outputs(&self) -> &[String] {
        &self.rare().outputs
    }

    /// The task's rare fields, when it has any that are not the defaults.
    pub fn extra(&self) -> Option<&TaskExtra> {
        self.extra.as_deref()
    }

    /// The task's rare fields, to change them (allocated, with the defaults, on first use).
    ///
    /// ```
    /// let mut t = p2p_tasks::Task::new("photo-001.jpg", "resize")?;
    /// t.extra_mut().args = "--width 800".into();
    /// assert_eq!(t.args(), "--width 800");
    /// # Ok::<(), p2p_tasks::Error>(())
    /// ```
    pub fn extra_mut(&mut self) -> &mut TaskExtra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Replaces the task's rare fields (held only when they are not all the defaults).
    pub fn set_extra(&mut self, extra: TaskExtra) {
        self.extra = (!extra.is_default()).then(|| Box::new(extra));
    }

    /// The task with `args` as its arguments.
    pub fn with_args(mut self, args: impl Into<String>) -> Task {
        let args = args.into();
        if !args.is_empty() || self.extra.is_some() {
            self.extra_mut().args = args;
        }
        self
    }

    /// The bytes of the id and the type together (for the run's check of what fits in a frame).
    pub(crate) fn names_len(&self) -> usize {
        self.id.len() + self.kind.len()
    }

    /// The id, the type and the rare fields, taken apart (for the run core).
    pub(crate) fn into_parts(self) -> (CompactString, CompactString, Option<Box<TaskExtra>>) {
        (self.id, self.kind, self.extra)
    }

    fn rare(&self) -> &TaskExtra {
        self.extra.as_deref().unwrap_or(&NO_EXTRA)
    }

    /// Whether the task has a cost or a limit of its own (not the defaults).
    pub fn has_own_terms(&self) -> bool {
        self.extra
            .as_ref()
            .is_some_and(|x| x.cost != 1 || x.timeout.is_some() || x.retries.is_some())
    }

    /// Whether the task ships or collects files (inputs or outputs declared).
    pub fn has_files(&self) -> bool {
        self.extra
            .as_ref()
            .is_some_and(|x| !x.inputs.is_empty() || !x.outputs.is_empty())
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
    kind_of_compact(id).map(String::from)
}

/// [`kind_of`], kept inline when short (no heap block for a type of up to 24 letters).
pub(crate) fn kind_of_compact(id: &str) -> Option<CompactString> {
    let (mut n, mut upper) = (0, false);
    for &c in id.as_bytes() {
        if !c.is_ascii_alphabetic() {
            break;
        }
        upper |= c.is_ascii_uppercase();
        n += 1;
    }
    if n == 0 {
        return None;
    }
    // ASCII letters: `n` is a byte offset.
    let mut letters = CompactString::from(&id[..n]);
    if upper {
        letters.make_ascii_lowercase();
    }
    Some(letters)
}

/// Whether `id` is a valid task id: `^[A-Za-z]+[0-9][A-Za-z0-9_.-]*$`.
pub fn is_valid_id(id: &str) -> bool {
    id_problem(id).is_none()
}

/// Why `id` is not a valid task id, as a sentence that also says what is expected;
/// `None` when it is valid.
pub(crate) fn id_problem(id: &str) -> Option<String> {
    // The usual case, a valid id, in one pass over its bytes (every valid id is ASCII);
    // anything else goes through the checks below, which name what is wrong.
    let b = id.as_bytes();
    let letters = b.iter().take_while(|c| c.is_ascii_alphabetic()).count();
    if letters > 0
        && b.get(letters).is_some_and(u8::is_ascii_digit)
        && b[letters + 1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    {
        return None;
    }
    id_problem_named(id)
}

/// [`id_problem`]'s checks one by one, for an id that is not valid.
fn id_problem_named(id: &str) -> Option<String> {
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

/// Task ids to their positions in a task list (the ids themselves are not copied: the list
/// is passed to every call). For the parser and the plan checks of files with a million
/// tasks.
///
/// Ids are short (`a1`, `b12345`): they are hashed by [`id_hash`], a few multiplications over
/// at most two overlapping words for an id of up to 16 bytes, seeded per index from the
/// standard library's random keys (a task file is the local user's input, not a peer's).
/// The table is open addressing with linear probing at most half full: a slot holds the
/// position plus one (0: empty) and, beside it, the high 32 bits of the id's hash, so a probe
/// compares an id only when 32 bits of hash agree, and growing needs no id hashed again.
/// 16 to 32 bytes a task (the table's size is a power of two), while the file is read, in
/// two halves: each is smaller than one table of 4-byte positions and 1-byte tags at 7/8
/// (what `hashbrown` took), so freeing them does not raise the allocator's threshold for
/// mapping large blocks (glibc moves it up to the largest block given back) above where it
/// was, which would leave the run's later allocations in the heap and its peak higher.
pub(crate) struct IdIndex {
    /// Per slot, the position plus one; 0: empty.
    slots: Vec<u32>,
    /// Per slot, the high 32 bits of the hash of the id there.
    frags: Vec<u32>,
    /// Entries held.
    len: usize,
    seed: u64,
}

/// The multiply-fold of two words: the high and low halves of their 128-bit product, mixed.
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a).wrapping_mul(u128::from(b));
    (p as u64) ^ ((p >> 64) as u64)
}

/// The 8 bytes of `b` from `at` (which the caller keeps in bounds), as a little-endian word.
fn word_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

/// The 4 bytes of `b` from `at` (which the caller keeps in bounds), as a little-endian word.
fn half_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u64::from(u32::from_le_bytes(w))
}

/// The hash of a task id under `seed`: the id's length and bytes folded in, for a short id
/// (up to 16 bytes) from two overlapping reads, for a longer one 16 bytes at a time and
/// the last 16.
pub(crate) fn id_hash(seed: u64, id: &str) -> u64 {
    const K0: u64 = 0x243f_6a88_85a3_08d3;
    const K1: u64 = 0x1319_8a2e_0370_7344;
    const K2: u64 = 0xa409_3822_299f_31d0;
    let b = id.as_bytes();
    let len = b.len();
    let (lo, hi) = if len > 16 {
        let mut h = seed;
        let mut at = 0;
        while at + 16 < len {
            h = fold(word_at(b, at) ^ h ^ K1, word_at(b, at + 8) ^ K2);
            at += 16;
        }
        (
            word_at(b, len - 16) ^ h.rotate_left(23),
            word_at(b, len - 8),
        )
    } else if len >= 8 {
        (word_at(b, 0), word_at(b, len - 8))
    } else if len >= 4 {
        (half_at(b, 0), half_at(b, len - 4))
    } else if len > 0 {
        let (x, y, z) = (b[0], b[len / 2], b[len - 1]);
        (u64::from(x) << 16 | u64::from(y) << 8 | u64::from(z), 0)
    } else {
        (0, 0)
    };
    fold(fold(lo ^ seed ^ K0, hi ^ K1 ^ len as u64), K2)
}

/// A seed of this process's standard random keys (a fresh one for each index).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

impl IdIndex {
    /// An empty index for about `n` tasks.
    pub(crate) fn with_capacity(n: usize) -> Self {
        let size = Self::slots_for(n);
        IdIndex {
            slots: vec![0; size],
            frags: vec![0; size],
            len: 0,
            seed: random_seed(),
        }
    }

    /// The table size for `n` entries: a power of two at least twice `n` (at least 16).
    fn slots_for(n: usize) -> usize {
        n.saturating_mul(2)
            .max(16)
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX / 2 + 1)
    }

    /// The index of every task of `tasks` (a later duplicate id is not added).
    pub(crate) fn build(tasks: &[Task]) -> Self {
        let mut index = IdIndex::with_capacity(tasks.len());
        for (i, t) in tasks.iter().enumerate() {
            index.first_or_insert(tasks, t.id(), i);
        }
        index
    }

    /// The slot of `id` (hash fragment `frag`): the one holding it, or the empty one where it
    /// would go.
    fn probe(&self, tasks: &[Task], id: &str, frag: u32) -> usize {
        let mask = self.slots.len() - 1;
        let mut at = frag as usize & mask;
        loop {
            let p = self.slots[at];
            if p == 0
                || (self.frags[at] == frag
                    && tasks.get((p - 1) as usize).is_some_and(|t| t.id() == id))
            {
                return at;
            }
            at = (at + 1) & mask;
        }
    }

    /// The high 32 bits of the hash of `id`.
    fn frag(&self, id: &str) -> u32 {
        (id_hash(self.seed, id) >> 32) as u32
    }

    /// The position of the task with id `id` if the index has one; else records that
    /// the task at `i` (in `tasks`, or about to be pushed there) has it. One hash either way.
    pub(crate) fn first_or_insert(&mut self, tasks: &[Task], id: &str, i: usize) -> Option<usize> {
        // Positions are kept plus one, in 32 bits.
        let pos = u32::try_from(i).ok().and_then(|p| p.checked_add(1))?;
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let frag = self.frag(id);
        let at = self.probe(tasks, id, frag);
        match self.slots[at] {
            0 => {
                self.slots[at] = pos;
                self.frags[at] = frag;
                self.len += 1;
                None
            }
            p => Some((p - 1) as usize),
        }
    }

    /// Doubles the table, placing every entry again by its kept hash fragment.
    fn grow(&mut self) {
        let size = Self::slots_for(self.len + 1);
        let slots = std::mem::replace(&mut self.slots, vec![0; size]);
        let frags = std::mem::replace(&mut self.frags, vec![0; size]);
        let mask = size - 1;
        for (p, f) in slots.into_iter().zip(frags).filter(|&(p, _)| p != 0) {
            let mut at = f as usize & mask;
            while self.slots[at] != 0 {
                at = (at + 1) & mask;
            }
            self.slots[at] = p;
            self.frags[at] = f;
        }
    }

    /// The position of the task with this id.
    pub(crate) fn get(&self, tasks: &[Task], id: &str) -> Option<usize> {
        match self.slots[self.probe(tasks, id, self.frag(id))] {
            0 => None,
            p => Some((p - 1) as usize),
        }
    }
}

/// The ids of a task list as sorted 8-byte keys: the parser's check for a duplicate id, and
/// the position of an id, once the whole file is read.
///
/// A key is the task's position in its low bits (as many as the list's length needs: 20
/// for a million tasks) under the high bits of its id's [`id_hash`] (44 of them, then).
/// Sorted, the keys put the tasks whose ids share those hash bits next to each other, in
/// file order, and ids are compared only there. The sort deals the keys into buckets by
/// their top bits (about a thousand keys, 8 KiB, a bucket), each then sorted while it is in
/// the cache: the keys are read and written in order, where an [`IdIndex`] built while the
/// file is read probes one random slot of a table of 16 bytes a task for every id, a miss
/// of the cache once the table outgrows it. 8 bytes a task, and as much again while the
/// keys are dealt.
pub(crate) struct IdKeys {
    /// Sorted: hash bits, then position.
    keys: Vec<u64>,
    /// The hash bits of a key (the bits above the position's).
    high: u64,
    seed: u64,
}

impl IdKeys {
    /// The sorted keys of the ids of `tasks`, under a fresh seed.
    #[cfg(test)]
    pub(crate) fn sort(tasks: &[Task]) -> Self {
        let seed = Self::new_seed();
        let hashes = tasks.iter().map(|t| id_hash(seed, t.id())).collect();
        Self::from_hashes(hashes, seed, u64::MAX)
    }

    /// A fresh seed for [`Self::from_hashes`].
    pub(crate) fn new_seed() -> u64 {
        random_seed()
    }

    /// [`Self::sort`] under `seed`, keeping only the hash bits of `mask` (all of them but in
    /// the tests, which keep few so that many ids share their hash bits).
    #[cfg(test)]
    fn sort_with(tasks: &[Task], seed: u64, mask: u64) -> Self {
        let hashes = tasks.iter().map(|t| id_hash(seed, t.id())).collect();
        Self::from_hashes(hashes, seed, mask)
    }

    /// The sorted keys of a list whose ids have the [`id_hash`]es `hashes` under `seed`,
    /// in list order (the parser's, taken as each line is read, while its ids are in the
    /// cache), keeping the hash bits of `mask`. The keys take the place of the hashes.
    pub(crate) fn from_hashes(mut keys: Vec<u64>, seed: u64, mask: u64) -> Self {
        let n = keys.len();
        // Positions 0..n take the bit length of n - 1 (at least one bit).
        let pos_bits = (usize::BITS - n.saturating_sub(1).leading_zeros()).max(1);
        let high = u64::MAX.checked_shl(pos_bits).unwrap_or(0) & mask;
        for (i, k) in keys.iter_mut().enumerate() {
            *k = (*k & high) | i as u64;
        }
        // Buckets of about 1024 keys, by up to 16 top bits (of the hash, but for a list of
        // more than 2^48 tasks; any top bits would do: a bucket's keys are all below the
        // next one's).
        let bits = (usize::BITS - (n >> 10).leading_zeros()).min(16);
        if bits == 0 {
            keys.sort_unstable();
            return IdKeys { keys, high, seed };
        }
        let shift = 64 - bits;
        let bucket = |k: u64| (k >> shift) as usize;
        // starts[b]: where bucket b begins; one more entry, the end.
        let mut starts = vec![0usize; (1 << bits) + 1];
        for &k in &keys {
            starts[bucket(k) + 1] += 1;
        }
        for b in 1..starts.len() {
            starts[b] += starts[b - 1];
        }
        let mut dealt = vec![0u64; n];
        let mut next = starts.clone();
        for &k in &keys {
            let at = &mut next[bucket(k)];
            dealt[*at] = k;
            *at += 1;
        }
        // Each bucket (in the cache now): dealt again by its next bits, back into `keys`,
        // which leaves sub-buckets of about one key, then put in order by insertion (a
        // move only where keys share those bits).
        let mut counts: Vec<usize> = Vec::new();
        for w in starts.windows(2) {
            let (from, to) = (w[0], w[1]);
            sort_bucket(&dealt[from..to], &mut keys[from..to], shift, &mut counts);
        }
        drop(dealt);
        IdKeys { keys, high, seed }
    }

    /// The position a key holds.
    fn pos(&self, k: u64) -> usize {
        (k & !self.high) as usize
    }

    /// The first duplicate id in list order: (the position of the first task with that id,
    /// the position of the second), the second the earliest of all duplicates.
    pub(crate) fn first_duplicate(&self, tasks: &[Task]) -> Option<(usize, usize)> {
        let keys = &self.keys;
        let mut best: Option<(usize, usize)> = None;
        let mut i = 0;
        while i + 1 < keys.len() {
            let h = keys[i] & self.high;
            if keys[i + 1] & self.high != h {
                i += 1;
                continue;
            }
            // A run of keys with the same hash bits, in list order.
            let end = keys[i..]
                .iter()
                .position(|&k| k & self.high != h)
                .map_or(keys.len(), |e| i + e);
            let run: Vec<usize> = keys[i..end].iter().map(|&k| self.pos(k)).collect();
            if let Some(found) = first_duplicate_in(tasks, run) {
                if best.is_none_or(|b| found.1 < b.1) {
                    best = Some(found);
                }
            }
            i = end;
        }
        best
    }

    /// The position of the first task with id `id`.
    pub(crate) fn get(&self, tasks: &[Task], id: &str) -> Option<usize> {
        let h = id_hash(self.seed, id) & self.high;
        // A key is below `h` exactly when its hash bits are (`h` has no position bits).
        let from = self.keys.partition_point(|&k| k < h);
        self.keys[from..]
            .iter()
            .take_while(|&&k| k & self.high == h)
            .map(|&k| self.pos(k))
            .find(|&p| tasks.get(p).is_some_and(|t| t.id() == id))
    }
}

/// Sorts the keys of one bucket, `from`, into `to` (as long): a counting sort by the bits
/// just below `shift` (those above are the bucket's, the same for all), then an insertion
/// sort, which moves few keys, as few share those bits; `counts`: room for the counts,
/// reused from bucket to bucket. Should the keys need many moves (they cannot with the
/// random bits of a hash, whatever the ids), they are sorted the usual way instead.
fn sort_bucket(from: &[u64], to: &mut [u64], shift: u32, counts: &mut Vec<usize>) {
    let n = from.len();
    if n <= 1 {
        for (t, &f) in to.iter_mut().zip(from) {
            *t = f;
        }
        return;
    }
    // About one key a sub-bucket, at most 4096 of them.
    let bits = (usize::BITS - n.leading_zeros()).min(12).min(shift);
    let low = shift - bits;
    let digit = |k: u64| ((k >> low) & ((1u64 << bits) - 1)) as usize;
    counts.clear();
    counts.resize((1 << bits) + 1, 0);
    for &k in from {
        counts[digit(k) + 1] += 1;
    }
    for d in 1..counts.len() {
        counts[d] += counts[d - 1];
    }
    for &k in from {
        let at = &mut counts[digit(k)];
        to[*at] = k;
        *at += 1;
    }
    let mut moves = 0usize;
    for i in 1..n {
        let k = to[i];
        let mut j = i;
        while j > 0 && to[j - 1] > k {
            to[j] = to[j - 1];
            j -= 1;
        }
        to[j] = k;
        moves += i - j;
        if moves > 8 * n {
            to.sort_unstable();
            return;
        }
    }
}

/// The first duplicate among the tasks at positions `run` (ascending), as
/// [`IdKeys::first_duplicate`] has it.
fn first_duplicate_in(tasks: &[Task], mut run: Vec<usize>) -> Option<(usize, usize)> {
    let id = |p: usize| tasks.get(p).map(Task::id);
    if let [a, b] = run[..] {
        // The usual run: two ids, equal or sharing hash bits by chance.
        return (id(a) == id(b)).then_some((a, b));
    }
    // By id, then (a stable sort) position: each id's tasks in a row, the first first.
    run.sort_by(|&a, &b| id(a).cmp(&id(b)));
    let mut best: Option<(usize, usize)> = None;
    for (j, w) in run.windows(2).enumerate() {
        let starts_group = j == 0 || id(run[j - 1]) != id(w[0]);
        if starts_group && id(w[0]) == id(w[1]) && best.is_none_or(|b| w[1] < b.1) {
            best = Some((w[0], w[1]));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The fields `Task` had when they were public, as they were serialized.
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct OldTask {
        id: String,
        kind: String,
        args: String,
        deps: Vec<String>,
        line: u32,
        col: u32,
        #[serde(default = "default_cost")]
        cost: u32,
        #[serde(default)]
        timeout: Option<Duration>,
        #[serde(default)]
        retries: Option<u32>,
        #[serde(default)]
        inputs: Vec<Input>,
        #[serde(default)]
        outputs: Vec<String>,
    }

    fn old_of(t: &Task) -> OldTask {
        OldTask {
            id: t.id().to_owned(),
            kind: t.kind().to_owned(),
            args: t.args().to_owned(),
            deps: t.deps().to_vec(),
            line: t.line(),
            col: t.col(),
            cost: t.cost(),
            timeout: t.timeout(),
            retries: t.retries(),
            inputs: t.inputs().to_vec(),
            outputs: t.outputs().to_vec(),
        }
    }

    fn bin<T: serde::Serialize>(v: &T) -> Vec<u8> {
        bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap()
    }

    #[test]
    fn a_task_is_64_bytes_and_short_ids_and_types_take_no_heap_block() {
        assert_eq!(std::mem::size_of::<Task>(), 64);
        let t = Task::from_id("abcdefghijklmnop12345678").unwrap();
        assert_eq!(t.id().len(), 24);
        assert!(!t.id.is_heap_allocated() && !t.kind.is_heap_allocated());
        assert!(t.extra().is_none());
        // Longer ones still work, on the heap.
        let long = format!("a{}", "1".repeat(MAX_ID_LEN - 1));
        let t = Task::new(long.clone(), "a".repeat(p2p_core::wire::MAX_TYPE_LEN)).unwrap();
        assert_eq!(t.id(), long);
        assert_eq!(t.kind(), "a".repeat(p2p_core::wire::MAX_TYPE_LEN));
    }

    #[test]
    fn rare_fields_at_their_defaults_are_the_same_task_as_none_and_are_not_kept() {
        let plain = Task::from_id("a1").unwrap();
        let mut touched = plain.clone();
        touched.extra_mut();
        assert!(touched.extra().is_some());
        assert_eq!(touched, plain);
        let mut set = plain.clone();
        set.set_extra(TaskExtra::default());
        assert!(set.extra().is_none());
        assert_eq!((plain.args(), plain.cost(), plain.deps()), ("", 1, &[][..]));
        let with = plain.clone().with_args("x y");
        assert_eq!(with.args(), "x y");
        assert_ne!(with, plain);
        assert!(plain.clone().with_args("").extra().is_none());
    }

    fn arb_task() -> impl proptest::strategy::Strategy<Value = Task> {
        use proptest::prelude::*;
        let name = "[a-zA-Z0-9_.-]{1,40}";
        (
            (name, "[a-zA-Z]{1,32}", ".{0,30}"),
            proptest::collection::vec(name, 0..3),
            (any::<u32>(), any::<u32>(), 1..5u32),
            (
                proptest::option::of(0..100_000u64),
                proptest::option::of(any::<u32>()),
            ),
            (
                proptest::collection::vec(name, 0..3),
                proptest::collection::vec((name, name), 0..3),
            ),
        )
            .prop_map(
                |((id, kind, args), deps, (line, col, cost), (timeout, retries), (outs, ins))| {
                    let mut t = Task::new(id, kind).unwrap().with_args(args);
                    t.set_position(line, col);
                    if !deps.is_empty() {
                        t.extra_mut().deps = deps;
                    }
                    if cost != 1 {
                        t.extra_mut().cost = cost;
                    }
                    if let Some(ms) = timeout {
                        t.extra_mut().timeout = Some(Duration::from_millis(ms));
                    }
                    if let Some(r) = retries {
                        t.extra_mut().retries = Some(r);
                    }
                    if !outs.is_empty() {
                        t.extra_mut().outputs = outs;
                    }
                    for (task, name) in ins {
                        t.extra_mut().inputs.push(Input::Artifact { task, name });
                    }
                    t
                },
            )
    }

    proptest::proptest! {
        #[test]
        fn a_compact_task_serializes_as_the_old_struct_and_round_trips(t in arb_task()) {
            let old = old_of(&t);
            // The same bytes as the struct with public fields, in JSON and in bincode.
            let json = serde_json::to_string(&t).unwrap();
            proptest::prop_assert_eq!(&json, &serde_json::to_string(&old).unwrap());
            proptest::prop_assert_eq!(bin(&t), bin(&old));
            // And back, from either.
            let back: Task = serde_json::from_str(&json).unwrap();
            proptest::prop_assert_eq!(&back, &t);
            let (back, _): (Task, usize) =
                bincode::serde::decode_from_slice(&bin(&old), bincode::config::standard()).unwrap();
            proptest::prop_assert_eq!(old_of(&back), old);
            proptest::prop_assert_eq!(back.extra().is_some(), t.extra().is_some_and(|x| !x.is_default()));
        }
    }

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

    proptest::proptest! {
        /// The table answers as a map from id to first position, with ids that share hash
        /// slots (a table of 16 slots, many ids) and long ids.
        #[test]
        fn the_id_index_answers_as_a_map(
            ids in proptest::collection::vec("[ab][0-9]{1,2}|[a-z]{17,40}[0-9]", 0..60),
        ) {
            let mut tasks: Vec<Task> = Vec::new();
            let mut index = IdIndex::with_capacity(0);
            let mut model: std::collections::HashMap<String, usize> = Default::default();
            for id in &ids {
                let first = index.first_or_insert(&tasks, id, tasks.len());
                proptest::prop_assert_eq!(first, model.get(id.as_str()).copied());
                if first.is_none() {
                    model.insert(id.clone(), tasks.len());
                    tasks.push(Task::from_id(id).unwrap());
                }
            }
            for id in &ids {
                proptest::prop_assert_eq!(index.get(&tasks, id), model.get(id.as_str()).copied());
            }
            proptest::prop_assert_eq!(index.len, model.len());
        }
    }

    /// The first duplicate of `ids` as a map from id to first position finds it: (the first
    /// position of the id, the position of its second task), the second the earliest.
    fn naive_first_duplicate(ids: &[String]) -> Option<(usize, usize)> {
        let mut first: std::collections::HashMap<&str, usize> = Default::default();
        for (i, id) in ids.iter().enumerate() {
            if let Some(&j) = first.get(id.as_str()) {
                return Some((j, i));
            }
            first.insert(id, i);
        }
        None
    }

    /// Hash masks for the sorted keys: all bits, a few top ones (ids share them, also in
    /// buckets), one, none (every id in one run).
    const MASKS: [u64; 5] = [
        u64::MAX,
        0xff00_0000_0000_0000,
        0xc000_0000_0000_0000,
        1 << 63,
        0,
    ];

    /// Hash masks for long lists: all bits, a few top ones, and four bits below those the
    /// buckets and sub-buckets are dealt by (so that the insertion sort has too many keys
    /// to move, and sorts them the usual way).
    const LONG_MASKS: [u64; 4] = [
        u64::MAX,
        0xff00_0000_0000_0000,
        0xc000_0000_0000_0000,
        0xf_0000_0000,
    ];

    /// Distinct ids, `n` of them, then `dups` of them (by index into the distinct ones)
    /// inserted again at the given places.
    fn with_dups(n: usize, dups: &[(usize, usize)]) -> Vec<String> {
        let mut ids: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
        for &(of, at) in dups {
            if n > 0 {
                let id = ids[of % n].clone();
                let at = at % (ids.len() + 1);
                ids.insert(at, id);
            }
        }
        ids
    }

    proptest::proptest! {
        /// The sorted keys find the same first duplicate as a map does, and every id's first
        /// position, for random lists with planted duplicates, under hash bits that are
        /// all kept or almost none (so that ids are compared in long runs of equal bits).
        #[test]
        fn sorted_keys_find_the_first_duplicate_and_every_id_as_a_map_does(
            ids in proptest::collection::vec("[ab][0-9]{1,2}|[A-Za-z]{1,3}[0-9]{0,3}|[a-z]{17,40}[0-9]", 0..80),
            mask in proptest::sample::select(MASKS.to_vec()),
            seed in proptest::num::u64::ANY,
        ) {
            let tasks: Vec<Task> = ids.iter().map(|id| Task::parsed(id, CompactString::from("a"), 0, 0)).collect();
            let keys = IdKeys::sort_with(&tasks, seed, mask);
            proptest::prop_assert!(keys.keys.windows(2).all(|w| w[0] < w[1]));
            proptest::prop_assert_eq!(keys.first_duplicate(&tasks), naive_first_duplicate(&ids));
            for id in ids.iter().map(String::as_str).chain(["a", "zz99", "a1000"]) {
                let first = ids.iter().position(|x| x == id);
                proptest::prop_assert_eq!(keys.get(&tasks, id), first, "{}", id);
            }
        }

        /// The same for lists of thousands of tasks (dealt into buckets first), with few
        /// planted duplicates or none.
        #[test]
        fn sorted_keys_of_long_lists_find_the_first_duplicate_as_a_map_does(
            n in 0usize..6000,
            dups in proptest::collection::vec((0usize..6000, 0usize..7000), 0..4),
            mask in proptest::sample::select(LONG_MASKS.to_vec()),
            seed in proptest::num::u64::ANY,
        ) {
            let ids = with_dups(n, &dups);
            let tasks: Vec<Task> = ids.iter().map(|id| Task::from_id(id).unwrap()).collect();
            let keys = IdKeys::sort_with(&tasks, seed, mask);
            proptest::prop_assert!(keys.keys.windows(2).all(|w| w[0] < w[1]));
            proptest::prop_assert_eq!(keys.first_duplicate(&tasks), naive_first_duplicate(&ids));
            for (i, id) in ids.iter().enumerate().step_by(97) {
                let first = ids.iter().position(|x| x == id);
                proptest::prop_assert!(first.is_some_and(|f| f <= i));
                proptest::prop_assert_eq!(keys.get(&tasks, id), first);
            }
        }
    }

    #[test]
    fn sorted_keys_of_a_million_ids_find_a_late_duplicate_and_every_id() {
        let n = 1 << 20;
        let mut ids = with_dups(n, &[(123_456, n)]);
        ids.push("b1".to_owned());
        let tasks: Vec<Task> = ids.iter().map(|id| Task::from_id(id).unwrap()).collect();
        let keys = IdKeys::sort(&tasks);
        assert_eq!(keys.first_duplicate(&tasks), Some((123_456, n)));
        for i in (0..n).step_by(4099) {
            assert_eq!(keys.get(&tasks, &ids[i]), Some(i));
        }
        assert_eq!(keys.get(&tasks, "b1"), Some(n + 1));
        assert_eq!(keys.get(&tasks, "b2"), None);
        assert_eq!(IdKeys::sort(&tasks[..n]).first_duplicate(&tasks[..n]), None);
    }

    #[test]
    fn equal_ids_hash_alike_and_lengths_are_told_apart() {
        let seed = 7;
        for id in [
            "",
            "a",
            "a1",
            "abc1",
            "abcdefg1",
            "abcdefghijklmnop1",
            &"a1".repeat(40),
        ] {
            let copy: String = id.chars().collect();
            assert_eq!(id_hash(seed, id), id_hash(seed, &copy));
        }
        // Overlapping reads: ids that share their bytes but not their length differ.
        assert_ne!(id_hash(seed, "aaaa1"), id_hash(seed, "aaaaa1"));
        assert_ne!(id_hash(seed, "a1"), id_hash(seed, "a11"));
        assert_ne!(id_hash(seed, "a1"), id_hash(seed + 1, "a1"));
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

    proptest::proptest! {
        /// The one-pass check of a valid id answers as the named checks do, whatever the
        /// text (letters, digits, the allowed punctuation, others, non-ASCII).
        #[test]
        fn the_quick_id_check_agrees_with_the_named_checks(id in "[aZ9_.\\-!é ]{0,6}") {
            proptest::prop_assert_eq!(id_problem(&id), id_problem_named(&id));
        }
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
        assert!(t.args().is_empty() && t.deps().is_empty() && !t.has_own_terms());
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
        assert_eq!(t.args(), "");
        assert_eq!((t.line, t.col), (0, 0));
        assert_eq!(Task::from_id("3b"), None);
    }
}
