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
//! {"task":"b1","type":"b","status":"succeeded","attempts":1,"node":"5f1e...","duration_ms":2.1,"outputs":[{"name":"n/count.txt","hash":"4f2a...","size":6}]}
//! ```
//!
//! A success of a task with declared outputs lists each (`outputs`: name, content hash,
//! size) as it was written into the results directory, so `--resume` counts the task done
//! only while those files are there with those hashes ([`Journal::outputs`]).
//!
//! `plan` is a fingerprint (FNV-1a, 64 bits) of every task's id, type, arguments and
//! dependencies in file order: a journal is refused for a plan that differs in any of them.
//! A last line cut short by a crash is cut off the file when the journal is opened again
//! (see [`Journal::open`]); blank lines are skipped.
//!
//! # One run at a time
//!
//! An open [`Journal`] holds an exclusive lock (`flock`) on the file itself, released when
//! it is dropped or the process ends: two coordinators never run from one journal at once.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::event::{Status, TaskResult};
use crate::Task;

/// Journal format version.
pub const VERSION: u32 = 1;

/// Errors opening or writing a journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The file could not be read or written.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal's path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The journal exists and it was not opened to resume.
    #[error("journal {0} already exists: resume that run, or remove the file to start over")]
    Exists(PathBuf),
    /// Another running process holds the journal.
    #[error("journal {0} is in use by another running p2p-node (two runs must not share a journal: wait for that run to end, or give this one a journal of its own)")]
    Locked(PathBuf),
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    outputs: Vec<RecordedFile>,
}

/// A declared output of a succeeded task, as the journal records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedFile {
    /// The declared name (`> NAME`).
    pub name: String,
    /// Its content hash, in hex.
    pub hash: String,
    /// Its size in bytes.
    pub size: u64,
}

/// An open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    done: HashSet<String>,
    /// The outputs recorded with each success in `done` (tasks that declared any).
    outputs: HashMap<String, Vec<RecordedFile>>,
    /// Lines appended and not written yet (see [`Journal::append`]).
    pending: Vec<u8>,
    /// Lines written and not synced yet.
    unsynced: bool,
}

/// Appended lines are written out (not synced) once this many bytes are pending.
const PENDING_MAX: usize = 1 << 20;

/// The fingerprint of a plan: FNV-1a 64 over each task's id, type, arguments and
/// dependencies, its cost, timeout and retries when it has any of its own, and its inputs
/// and outputs when it declares files (so a plan without them keeps the fingerprint its
/// journals were written with, and a changed cost, limit or file is a changed plan).
pub fn fingerprint(tasks: &[Task]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for t in tasks {
        feed(t.id().as_bytes());
        feed(&[0]);
        feed(t.kind().as_bytes());
        feed(&[0]);
        feed(t.args().as_bytes());
        feed(&[0]);
        for d in t.deps() {
            feed(d.as_bytes());
            feed(&[1]);
        }
        if t.has_own_terms() {
            feed(&[3]);
            feed(&t.cost().to_le_bytes());
            match t.timeout() {
                None => feed(&[0]),
                Some(d) => {
                    feed(&[1]);
                    feed(&d.as_nanos().to_le_bytes());
                }
            }
            match t.retries() {
                None => feed(&[0]),
                Some(n) => {
                    feed(&[1]);
                    feed(&n.to_le_bytes());
                }
            }
        }
        if t.has_files() {
            // Files declared: what they are named (the contents are the outputs' hashes'
            // business, not the plan's).
            feed(&[4]);
            for i in t.inputs() {
                match i {
                    crate::task::Input::Path(p) => {
                        feed(&[0]);
                        feed(p.as_os_str().as_encoded_bytes());
                    }
                    crate::task::Input::Bytes { name, data } => {
                        feed(&[1]);
                        feed(name.as_bytes());
                        feed(&[0]);
                        feed(&u64::try_from(data.len()).unwrap_or(u64::MAX).to_le_bytes());
                    }
                    crate::task::Input::Artifact { task, name } => {
                        feed(&[2]);
                        feed(task.as_bytes());
                        feed(&[0]);
                        feed(name.as_bytes());
                    }
                }
                feed(&[0]);
            }
            feed(&[5]);
            for o in t.outputs() {
                feed(o.as_bytes());
                feed(&[0]);
            }
        }
        feed(&[2]);
    }
    format!("{h:016x}")
}

impl Journal {
    /// Opens the journal at `path` for `tasks` and holds it: an exclusive lock on the file
    /// itself (whatever path names it) is kept until the journal is dropped, so a second run
    /// on the same journal is refused with [`JournalError::Locked`]. Without `resume`, the
    /// file must not exist (or be empty); with it, an existing journal must belong to this
    /// plan, and the tasks it records as succeeded are returned by [`Journal::done`]. A
    /// missing file is created. Anything but a regular file is refused at once (a FIFO is
    /// never waited on).
    ///
    /// A record cut short by a crash (a last line with no newline) is cut off the file, so
    /// the next record starts on a line of its own; blank lines and records cut short by
    /// older versions in the middle of the file are skipped. Any other damage is refused
    /// with [`JournalError::Corrupt`], naming the line. So a journal resumes any number of
    /// times, however its runs ended.
    pub fn open(path: &Path, tasks: &[Task], resume: bool) -> Result<Journal, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let plan = fingerprint(tasks);
        let mut file = p2p_core::file::open_regular(
            path,
            OpenOptions::new().read(true).append(true).create(true),
        )
        .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(JournalError::Locked(path.to_path_buf())),
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let exists = file.metadata().map_err(io)?.len() > 0;
        if exists && !resume {
            return Err(JournalError::Exists(path.to_path_buf()));
        }
        let mut done = HashSet::new();
        let mut outputs = HashMap::new();
        let mut has_header = false;
        if exists {
            let (header, end) = read_records(path, &file, &mut done, &mut outputs)?;
            if let Some(header) = header {
                if header.journal != VERSION || header.plan != plan {
                    return Err(JournalError::Mismatch {
                        path: path.to_path_buf(),
                        expected: plan.clone(),
                        found: header.plan,
                    });
                }
                has_header = true;
            }
            match end {
                End::Clean => {}
                // A whole record that only lacks its newline: keep it, end its line.
                End::Unterminated => file.write_all(b"\n").map_err(io)?,
                // A record cut short: cut it off, so the next one starts on its own line.
                End::Torn(at) => file.set_len(at).map_err(io)?,
            }
        }
        if !has_header {
            let header = Header {
                journal: VERSION,
                plan,
                tasks: tasks.len(),
            };
            let line = serde_json::to_string(&header).map_err(|e| io(e.into()))?;
            writeln!(file, "{line}").map_err(io)?;
        }
        file.sync_data().map_err(io)?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            done,
            outputs,
            pending: Vec::new(),
            unsynced: false,
        })
    }

    /// Ids of the tasks a previous run recorded as succeeded.
    pub fn done(&self) -> &HashSet<String> {
        &self.done
    }

    /// The outputs a previous run recorded with the success of `task` (empty when none).
    pub fn outputs(&self, task: &str) -> &[RecordedFile] {
        self.outputs
            .get(task)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Appends a final result and syncs it to disk (with anything appended before).
    pub fn record(&mut self, r: &TaskResult) -> Result<(), JournalError> {
        self.append(r)?;
        self.sync()
    }

    /// [`Journal::append`] with the outputs the success of `r` wrote.
    pub fn append_with_outputs(
        &mut self,
        r: &TaskResult,
        outputs: Vec<RecordedFile>,
    ) -> Result<(), JournalError> {
        self.append_line(r, outputs)
    }

    /// Appends a final result without waiting for the disk: it reaches the disk with the
    /// next [`Journal::sync`], together with every result appended since the last one, so a
    /// burst of results costs one sync instead of one each (group commit). Results not yet
    /// synced when the process dies are not in the journal, and run again on `--resume`
    /// (execution is at-least-once). Dropping the journal syncs it.
    pub fn append(&mut self, r: &TaskResult) -> Result<(), JournalError> {
        self.append_line(r, Vec::new())
    }

    fn append_line(
        &mut self,
        r: &TaskResult,
        outputs: Vec<RecordedFile>,
    ) -> Result<(), JournalError> {
        let line = Line {
            task: r.task.to_string(),
            kind: r.kind.to_string(),
            status: r.status,
            attempts: r.attempts,
            node: r.node.as_deref().map(str::to_owned),
            duration_ms: r.duration_ms,
            outputs,
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

/// How a journal file ends.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// With a newline (or empty).
    Clean,
    /// With a whole record and no newline.
    Unterminated,
    /// With a record cut short, starting at this byte offset.
    Torn(u64),
}

/// Reads every record of the journal in `file`: the tasks recorded as succeeded go into
/// `done`. Returns the header (`None` when even the header was cut short) and how the file
/// ends.
fn read_records(
    path: &Path,
    file: &File,
    done: &mut HashSet<String>,
    outputs: &mut HashMap<String, Vec<RecordedFile>>,
) -> Result<(Option<Header>, End), JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |line: usize, why: String| JournalError::Corrupt {
        path: path.to_path_buf(),
        line,
        why,
    };
    let mut reader = BufReader::new(file);
    let mut header: Option<Header> = None;
    let mut buf = Vec::new();
    let mut offset: u64 = 0;
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io)?;
        if n == 0 {
            return Ok((header, End::Clean));
        }
        line_no += 1;
        let start = offset;
        offset += n as u64;
        let terminated = buf.last() == Some(&b'\n');
        let text = String::from_utf8_lossy(&buf);
        let text = text.trim();
        if text.is_empty() {
            // A blank line (older versions wrote one at every resume).
            continue;
        }
        let torn = |e: &serde_json::Error| e.is_eof();
        if header.is_none() {
            match serde_json::from_str::<Header>(text) {
                Ok(h) => header = Some(h),
                Err(e) if !terminated && torn(&e) => return Ok((None, End::Torn(start))),
                Err(e) => {
                    return Err(corrupt(
                        line_no,
                        format!("not a p2p-node journal header ({e})"),
                    ))
                }
            }
        } else {
            match serde_json::from_str::<Line>(text) {
                Ok(rec) => {
                    if rec.status == Status::Succeeded {
                        if rec.outputs.is_empty() {
                            outputs.remove(&rec.task);
                        } else {
                            outputs.insert(rec.task.clone(), rec.outputs);
                        }
                        done.insert(rec.task);
                    }
                }
                // Cut short by a crash: at the end, cut off; in the middle (written by an
                // older version, which did not cut it off), skipped.
                Err(e) if torn(&e) => {
                    if !terminated {
                        return Ok((header, End::Torn(start)));
                    }
                    continue;
                }
                Err(e) => return Err(corrupt(line_no, e.to_string())),
            }
        }
        if !terminated {
            return Ok((header, End::Unterminated));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::parse::parse;

    /// `Journal::open`, waiting (at most 10 s) while the file is locked. The lock goes with the
    /// last descriptor of the open file, and a child that another test of this binary forks
    /// while a journal is open shares that descriptor until it execs (close-on-exec): on a
    /// loaded machine a journal just dropped can stay locked for that moment.
    fn open(path: &Path, tasks: &[Task], resume: bool) -> Result<Journal, JournalError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Journal::open(path, tasks, resume) {
                Err(JournalError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn result(task: &str, status: Status) -> TaskResult {
        TaskResult {
            task: task.into(),
            kind: "a".into(),
            status,
            node: Some("n".into()),
            attempts: 1,
            duration_ms: 1.0,
            output: Default::default(),
            error: None,
            resumed: false,
        }
    }

    #[test]
    fn the_outputs_of_the_last_success_of_a_task_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let tasks = parse("t", "a1 a2").unwrap();
        let file = |h: &str| RecordedFile {
            name: "o.txt".into(),
            hash: h.into(),
            size: 3,
        };
        let mut j = open(&path, &tasks, false).unwrap();
        j.append_with_outputs(&result("a1", Status::Succeeded), vec![file("aa")])
            .unwrap();
        j.append_with_outputs(&result("a2", Status::Succeeded), vec![file("bb")])
            .unwrap();
        // a1 again (a rerun of an altered output), this time with another hash; a2 again
        // without outputs (a journal of an older version would look like this).
        j.append_with_outputs(&result("a1", Status::Succeeded), vec![file("cc")])
            .unwrap();
        j.record(&result("a2", Status::Succeeded)).unwrap();
        drop(j);
        let j = open(&path, &tasks, true).unwrap();
        assert_eq!(j.outputs("a1"), &[file("cc")]);
        assert!(j.outputs("a2").is_empty());
        assert!(j.outputs("a3").is_empty());
    }

    #[test]
    fn records_and_resumes_only_successes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let tasks = parse("t", "a1 a2 a3").unwrap();
        let mut j = open(&path, &tasks, false).unwrap();
        j.record(&result("a1", Status::Succeeded)).unwrap();
        j.record(&result("a2", Status::Failed)).unwrap();
        drop(j);
        // Simulate a crash in the middle of a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "{{\"task\":\"a3\",\"sta").unwrap();
        drop(f);
        let j = open(&path, &tasks, true).unwrap();
        assert_eq!(j.done().iter().collect::<Vec<_>>(), vec!["a1"]);
        drop(j);
        // Still readable after the torn line was closed off.
        let j = open(&path, &tasks, true).unwrap();
        assert_eq!(j.done().len(), 1);
    }

    #[test]
    fn appended_results_reach_the_file_at_the_sync_or_the_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let tasks = parse("t", "a1 a2 a3").unwrap();
        let mut j = open(&path, &tasks, false).unwrap();
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
        let j = open(&path, &tasks, true).unwrap();
        assert_eq!(j.done().len(), 3);
    }

    #[test]
    fn refuses_an_existing_journal_without_resume_and_another_plan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let tasks = parse("t", "a1 a2").unwrap();
        open(&path, &tasks, false).unwrap();
        assert!(matches!(
            open(&path, &tasks, false),
            Err(JournalError::Exists(_))
        ));
        let other = parse("t", "a1\na2 -- changed").unwrap();
        let err = open(&path, &other, true).unwrap_err();
        assert!(matches!(err, JournalError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("different task file"));
    }

    #[test]
    fn resumes_any_number_of_times_after_clean_ends_and_torn_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let ids: Vec<String> = (1..=12).map(|i| format!("a{i}")).collect();
        let tasks = parse("t", &ids.join(" ")).unwrap();
        let mut j = open(&path, &tasks, false).unwrap();
        j.record(&result("a1", Status::Succeeded)).unwrap();
        drop(j);
        for round in 2..=12 {
            let mut j = open(&path, &tasks, true).unwrap_or_else(|e| panic!("resume {round}: {e}"));
            assert_eq!(j.done().len(), round - 1, "resume {round}");
            j.record(&result(&format!("a{round}"), Status::Succeeded))
                .unwrap();
            drop(j);
            // Every other run is killed in the middle of writing its next record.
            if round % 2 == 0 {
                let mut f = OpenOptions::new().append(true).open(&path).unwrap();
                write!(f, "{{\"task\":\"a{}\",\"type\":\"a\",\"sta", round + 1).unwrap();
            }
        }
        let j = open(&path, &tasks, true).unwrap();
        assert_eq!(j.done().len(), 12);
        drop(j);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
            "every line of the journal is a whole record:\n{text}"
        );
    }

    #[test]
    fn reads_journals_older_versions_left_blank_and_torn_lines_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let tasks = parse("t", "a1 a2 a3").unwrap();
        let mut j = open(&path, &tasks, false).unwrap();
        j.record(&result("a1", Status::Succeeded)).unwrap();
        drop(j);
        // What the old resume wrote: a torn record closed off by a newline, then a blank
        // line at the next resume, then more records.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "{{\"task\":\"a2\",\"sta\n\n").unwrap();
        drop(f);
        let mut j = open(&path, &tasks, true).unwrap();
        j.record(&result("a3", Status::Succeeded)).unwrap();
        drop(j);
        let j = open(&path, &tasks, true).unwrap();
        let mut done: Vec<_> = j.done().iter().cloned().collect();
        done.sort();
        assert_eq!(done, ["a1", "a3"]);
    }

    #[test]
    fn a_whole_last_record_without_its_newline_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let tasks = parse("t", "a1 a2").unwrap();
        let mut j = open(&path, &tasks, false).unwrap();
        j.record(&result("a1", Status::Succeeded)).unwrap();
        drop(j);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.trim_end()).unwrap();
        let mut j = open(&path, &tasks, true).unwrap();
        assert_eq!(j.done().len(), 1);
        j.record(&result("a2", Status::Succeeded)).unwrap();
        drop(j);
        assert_eq!(open(&path, &tasks, true).unwrap().done().len(), 2);
    }

    #[test]
    fn a_torn_header_starts_the_journal_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let tasks = parse("t", "a1").unwrap();
        std::fs::write(&path, "{\"journal\":1,\"pl").unwrap();
        assert!(matches!(
            open(&path, &tasks, false),
            Err(JournalError::Exists(_))
        ));
        let mut j = open(&path, &tasks, true).unwrap();
        assert!(j.done().is_empty());
        j.record(&result("a1", Status::Succeeded)).unwrap();
        drop(j);
        assert_eq!(open(&path, &tasks, true).unwrap().done().len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn a_journal_is_held_by_one_run_whatever_path_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let tasks = parse("t", "a1").unwrap();
        let j = open(&path, &tasks, false).unwrap();
        let hard = dir.path().join("hard");
        std::fs::hard_link(&path, &hard).unwrap();
        let sym = dir.path().join("sym");
        std::os::unix::fs::symlink(&path, &sym).unwrap();
        for p in [&path, &hard, &sym] {
            let err = Journal::open(p, &tasks, true).unwrap_err();
            assert!(matches!(err, JournalError::Locked(_)), "{err}");
            assert!(err
                .to_string()
                .contains("in use by another running p2p-node"));
        }
        drop(j);
        // open() allows for a child another test forked meanwhile (see there).
        assert!(open(&sym, &tasks, true).is_ok(), "free once the run ends");
    }

    #[cfg(unix)]
    #[test]
    fn anything_but_a_regular_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let tasks = parse("t", "a1").unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for (p, resume) in [(&fifo, true), (&fifo, false)] {
            let err = open(p, &tasks, resume).unwrap_err();
            assert!(matches!(err, JournalError::Io { .. }), "{err}");
        }
        let err = open(dir.path(), &tasks, true).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
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
        // Costs and limits: the defaults written out keep the fingerprint; any other value
        // changes it, and each differs from the others.
        assert_eq!(a, fingerprint(&parse("t", "a1\nb1 cost 1").unwrap()));
        let own: Vec<String> = [
            "a1\nb1 cost 2",
            "a1\nb1 cost 3",
            "a1\nb1 timeout 1s",
            "a1\nb1 timeout 2s",
            "a1\nb1 retries 0",
            "a1\nb1 retries 1",
        ]
        .iter()
        .map(|text| fingerprint(&parse("t", text).unwrap()))
        .collect();
        for (i, f) in own.iter().enumerate() {
            assert_ne!(&a, f);
            assert!(!own[..i].contains(f), "{i}: {own:?}");
        }
    }
}
