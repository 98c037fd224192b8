//! The run journal: one line per final task result, synced to disk, so that a run that was
//! interrupted (even by SIGKILL) can be resumed without re-running what already succeeded.
//!
//! # Format
//!
//! JSON lines. The first line is a header naming the plan it belongs to:
//!
//! ```text
//! {"journal":1,"plan":"9f0c2d51a3b4e7f6","tasks":11}
//! {"task":"a1","type":"a","status":"succeeded","attempts":1,"node":"5f1e...","duration_ms":0.8}
//! ```
//!
//! `plan` is a fingerprint (FNV-1a, 64 bits) of every task's id, type, arguments and
//! dependencies in file order: a journal is refused for a plan that differs in any of them.
//! A last line cut short by a crash is ignored.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::event::{Status, TaskResult};
use crate::Task;

/// Journal format version.
pub const VERSION: u32 = 1;

/// Errors opening or writing a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file could not be read or written.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal's path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The journal exists and `--resume` was not given.
    #[error("journal {0} already exists: pass --resume to continue that run, or remove the file to start over")]
    Exists(PathBuf),
    /// The journal belongs to another plan.
    #[error("journal {path} was written for a different task file (plan {found}, this file is {expected}); refusing to resume the wrong run")]
    Mismatch {
        /// The journal's path.
        path: PathBuf,
        /// This plan's fingerprint.
        expected: String,
        /// The journal's fingerprint.
        found: String,
    },
    /// The journal is not a p2p-node journal.
    #[error("journal {path}:{line}: {why}")]
    Corrupt {
        /// The journal's path.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Header {
    journal: u32,
    plan: String,
    tasks: usize,
}

#[derive(Serialize, Deserialize)]
struct Line {
    task: String,
    #[serde(rename = "type")]
    kind: String,
    status: Status,
    attempts: u32,
    node: Option<String>,
    duration_ms: f64,
}

/// An open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    done: HashSet<String>,
    /// Lines appended and not written yet (see [`Journal::append`]).
    pending: Vec<u8>,
    /// Lines written and not synced yet.
    unsynced: bool,
}

/// Appended lines are written out (not synced) once this many bytes are pending.
const PENDING_MAX: usize = 1 << 20;

/// The fingerprint of a plan: FNV-1a 64 over each task's id, type, arguments and dependencies.
pub fn fingerprint(tasks: &[Task]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for t in tasks {
        feed(t.id.as_bytes());
        feed(&[0]);
        feed(t.kind.as_bytes());
        feed(&[0]);
        feed(t.args.as_bytes());
        feed(&[0]);
        for d in &t.deps {
            feed(d.as_bytes());
            feed(&[1]);
        }
        feed(&[2]);
    }
    format!("{h:016x}")
}

impl Journal {
    /// Opens the journal at `path` for `tasks`. Without `resume`, the file must not exist
    /// (or be empty); with it, an existing journal must belong to this plan, and the tasks it
    /// records as succeeded are returned by [`Journal::done`]. A missing file is created.
    pub fn open(path: &Path, tasks: &[Task], resume: bool) -> Result<Journal, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let plan = fingerprint(tasks);
        let exists = std::fs::metadata(path)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        if exists && !resume {
            return Err(JournalError::Exists(path.to_path_buf()));
        }
        let mut done = HashSet::new();
        if exists {
            let reader = BufReader::new(File::open(path).map_err(io)?);
            let mut lines = reader.lines().enumerate().peekable();
            let header: Header = match lines.next() {
                Some((_, Ok(l))) => {
                    serde_json::from_str(&l).map_err(|e| JournalError::Corrupt {
                        path: path.to_path_buf(),
                        line: 1,
                        why: format!("not a p2p-node journal header ({e})"),
                    })?
                }
                Some((_, Err(e))) => return Err(io(e)),
                None => unreachable_empty(path)?,
            };
            if header.journal != VERSION || header.plan != plan {
                return Err(JournalError::Mismatch {
                    path: path.to_path_buf(),
                    expected: plan,
                    found: header.plan,
                });
            }
            while let Some((i, l)) = lines.next() {
                let l = l.map_err(io)?;
                match serde_json::from_str::<Line>(&l) {
                    Ok(rec) => {
                        if rec.status == Status::Succeeded {
                            done.insert(rec.task);
                        }
                    }
                    // A torn last line from a crash mid-write: ignore it.
                    Err(_) if lines.peek().is_none() => {}
                    Err(e) => {
                        return Err(JournalError::Corrupt {
                            path: path.to_path_buf(),
                            line: i + 1,
                            why: e.to_string(),
                        })
                    }
                }
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        if !exists {
            let header = Header {
                journal: VERSION,
                plan,
                tasks: tasks.len(),
            };
            let line = serde_json::to_string(&header).map_err(|e| io(e.into()))?;
            writeln!(file, "{line}").map_err(io)?;
            file.sync_data().map_err(io)?;
        } else {
            // Make sure a torn last line does not glue onto the next record.
            writeln!(file).map_err(io)?;
        }
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            done,
            pending: Vec::new(),
            unsynced: false,
        })
    }

    /// Ids of the tasks a previous run recorded as succeeded.
    pub fn done(&self) -> &HashSet<String> {
        &self.done
    }

    /// Appends a final result and syncs it to disk (with anything appended before).
    pub fn record(&mut self, r: &TaskResult) -> Result<(), JournalError> {
        self.append(r)?;
        self.sync()
    }

    /// Appends a final result without waiting for the disk: it reaches the disk with the
    /// next [`Journal::sync`], together with every result appended since the last one, so a
    /// burst of results costs one sync instead of one each (group commit). Results not yet
    /// synced when the process dies are not in the journal, and run again on `--resume`
    /// (execution is at-least-once). Dropping the journal syncs it.
    pub fn append(&mut self, r: &TaskResult) -> Result<(), JournalError> {
        let line = Line {
            task: r.task.clone(),
            kind: r.kind.to_string(),
            status: r.status,
            attempts: r.attempts,
            node: r.node.as_deref().map(str::to_owned),
            duration_ms: r.duration_ms,
        };
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        serde_json::to_writer(&mut self.pending, &line).map_err(|e| io(e.into()))?;
        self.pending.push(b'\n');
        if self.pending.len() >= PENDING_MAX {
            self.file.write_all(&self.pending).map_err(io)?;
            self.pending.clear();
            self.unsynced = true;
        }
        Ok(())
    }

    /// Writes and syncs to disk every result appended so far; does nothing when there is
    /// none.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if self.pending.is_empty() && !self.unsynced {
            return Ok(());
        }
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&self.pending).map_err(io)?;
        self.pending.clear();
        self.unsynced = true;
        self.file.sync_data().map_err(io)?;
        self.unsynced = false;
        Ok(())
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Best effort: an error here was (or will be) reported by an explicit sync.
        let _ = self.sync();
    }
}

fn unreachable_empty(path: &Path) -> Result<Header, JournalError> {
    Err(JournalError::Corrupt {
        path: path.to_path_buf(),
        line: 1,
        why: "empty journal".into(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::parse::parse;

    fn result(task: &str, status: Status) -> TaskResult {
        TaskResult {
            task: task.into(),
            kind: "a".into(),
            status,
            node: Some("n".into()),
            attempts: 1,
            duration_ms: 1.0,
            output: String::new(),
            error: None,
            resumed: false,
        }
    }

    #[test]
    fn records_and_resumes_only_successes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let tasks = parse("t", "a1 a2 a3").unwrap();
        let mut j = Journal::open(&path, &tasks, false).unwrap();
        j.record(&result("a1", Status::Succeeded)).unwrap();
        j.record(&result("a2", Status::Failed)).unwrap();
        drop(j);
        // Simulate a crash in the middle of a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "{{\"task\":\"a3\",\"sta").unwrap();
        drop(f);
        let j = Journal::open(&path, &tasks, true).unwrap();
        assert_eq!(j.done().iter().collect::<Vec<_>>(), vec!["a1"]);
        drop(j);
        // Still readable after the torn line was closed off.
        let j = Journal::open(&path, &tasks, true).unwrap();
        assert_eq!(j.done().len(), 1);
    }

    #[test]
    fn appended_results_reach_the_file_at_the_sync_or_the_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let tasks = parse("t", "a1 a2 a3").unwrap();
        let mut j = Journal::open(&path, &tasks, false).unwrap();
        let lines = || std::fs::read_to_string(&path).unwrap().lines().count();
        let header = lines();
        j.append(&result("a1", Status::Succeeded)).unwrap();
        j.append(&result("a2", Status::Succeeded)).unwrap();
        assert_eq!(lines(), header, "nothing written before the sync");
        j.sync().unwrap();
        assert_eq!(lines(), header + 2);
        j.sync().unwrap();
        j.append(&result("a3", Status::Succeeded)).unwrap();
        drop(j);
        assert_eq!(lines(), header + 3, "the drop syncs");
        let j = Journal::open(&path, &tasks, true).unwrap();
        assert_eq!(j.done().len(), 3);
    }

    #[test]
    fn refuses_an_existing_journal_without_resume_and_another_plan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let tasks = parse("t", "a1 a2").unwrap();
        Journal::open(&path, &tasks, false).unwrap();
        assert!(matches!(
            Journal::open(&path, &tasks, false),
            Err(JournalError::Exists(_))
        ));
        let other = parse("t", "a1\na2 -- changed").unwrap();
        let err = Journal::open(&path, &other, true).unwrap_err();
        assert!(matches!(err, JournalError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("different task file"));
    }

    #[test]
    fn fingerprint_sees_ids_args_and_deps() {
        let a = fingerprint(&parse("t", "a1 b1").unwrap());
        assert_eq!(
            a,
            fingerprint(&parse("t", "a1\nb1").unwrap()),
            "layout does not matter"
        );
        assert_ne!(a, fingerprint(&parse("t", "b1 a1").unwrap()));
        assert_ne!(a, fingerprint(&parse("t", "a1\nb1 after a1").unwrap()));
        assert_ne!(a, fingerprint(&parse("t", "a1\nb1 -- x").unwrap()));
    }
}
