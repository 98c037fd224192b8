//! The crate's error: everything that refuses a task, a task file, a plan or a journal.

use crate::journal::JournalError;
use crate::parse::ParseError;
use crate::plan::PlanError;

/// What can go wrong making tasks, reading a task file, checking a plan or keeping a
/// journal. Ask it by variant (and the variants' own types), never by its text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// [`crate::Task::new`] was given an id or a type it cannot take.
    #[error("invalid task: {0}")]
    InvalidTask(#[from] TaskError),
    /// A task file cannot be read ([`crate::parse`]).
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The order and the dependencies form a cycle: the run could never end.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A task cannot be sent to any node.
    #[error("line {line}, column {col}: task {task} cannot be sent: {why}")]
    Unsendable {
        /// The task's id.
        task: String,
        /// Its line in its file (0 when it did not come from a file).
        line: u32,
        /// Its column.
        col: u32,
        /// Why, with the numbers.
        why: String,
    },
    /// The journal cannot be used.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The runtime shut down while the run was being set up.
    #[error("the run was stopped while it was being set up")]
    Stopped,
}

/// Why [`crate::Task::new`] refused a task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The id is empty.
    #[error("a task id cannot be empty")]
    EmptyId,
    /// The id is longer than [`crate::task::MAX_ID_LEN`] bytes.
    #[error("task id of {len} bytes is longer than {max} bytes")]
    IdTooLong {
        /// Its length in bytes.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// The id holds whitespace or a control character.
    #[error("task id {id:?} holds {ch:?}: no whitespace or control characters")]
    IdCharacter {
        /// The id.
        id: String,
        /// The first character refused.
        ch: char,
    },
    /// The type is not 1 to [`p2p_core::wire::MAX_TYPE_LEN`] ASCII letters.
    #[error("task type {kind:?} must be 1 to {max} ASCII letters (e.g. a, resize)")]
    InvalidType {
        /// The type given.
        kind: String,
        /// The longest type allowed.
        max: usize,
    },
}
