//! Files of hosted runs: the inputs a client ships with `submit`, and the results it takes
//! back with `results`.
//!
//! - **Inputs.** `submit` hashes every input file its plan names (`< PATH`) and offers each
//!   to the host on the submit's connection ([`upload`]: `Transfer::Offer`, chunks within
//!   the host's credit, until `Have` or `Done`), then sends [`Hosted::SubmitFiles`] naming
//!   each path as the plan writes it with its hash. The host links (or copies) each from
//!   its file cache into the run's directory (`RUN/inputs/HASH/NAME`, [`place_inputs`]) before it
//!   answers, so the run keeps its inputs whatever the cache evicts, and across restarts;
//!   the tasks read them from there. A plan naming inputs that were not shipped is refused.
//! - **Results.** A hosted run keeps every task's results in `RUN/results` (as `run
//!   --results RUN/results` would). [`Hosted::Results`] is answered with each regular file
//!   there ([`ResultFile`], then its bytes in [`Hosted::ResultData`]s) and
//!   [`Hosted::ResultsDone`]; [`ResultsWriter`] writes them under the client's directory,
//!   each file whole or not at all.
//! - **Replicated runs** (see [`super::replica_io`]): the host offers the inputs to each
//!   replica the same way ([`upload`] of [`placed_inputs`], from the run's copies), and
//!   every member places its own copies ([`place_inputs`] keeps a copy placed before).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use p2p_core::hosted::{Hosted, ResultFile, SubmittedInput, MAX_RESULT_DATA, MAX_RESULT_PATH};
use p2p_core::net::{Command, Link, LinkEvent, LinkId};
use p2p_core::transfer::{self, SendState, Sender};
use p2p_core::{ContentHash, Message, Transfer};
use p2p_tasks::task::Input;
use p2p_tasks::Task;
use tokio::sync::mpsc;

/// The directory of a run's inputs, inside its run directory.
pub const INPUTS: &str = "inputs";

/// The directory of a run's results, inside its run directory.
pub const RESULTS: &str = "results";

/// The file that records which input path is which hash, inside the run directory.
pub const INPUTS_RECORD: &str = "inputs.json";

/// One input file a client ships: where it is on the client, as the plan writes it, its
/// hash and size.
#[derive(Debug, Clone)]
pub struct LocalInput {
    /// The file on the client's side (resolved against the task file's directory).
    pub file: PathBuf,
    /// What the wire says of it.
    pub submitted: SubmittedInput,
}

/// The distinct input files (`< PATH`) of a plan, hashed: `written` is the plan as parsed
/// without resolving paths, `resolved` the same plan parsed against its directory (the
/// same tasks in the same order).
pub fn local_inputs(written: &[Task], resolved: &[Task]) -> std::io::Result<Vec<LocalInput>> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for (w, r) in written.iter().zip(resolved) {
        for (wi, ri) in w.inputs().iter().zip(r.inputs()) {
            let (Input::Path(wp), Input::Path(rp)) = (wi, ri) else {
                continue;
            };
            let Some(path) = wp.to_str() else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("input {} is not UTF-8", wp.display()),
                ));
            };
            if !seen.insert(path.to_string()) {
                continue;
            }
            let (hash, size) = p2p_tasks::node_files::hash_file(rp)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", rp.display())))?;
            out.push(LocalInput {
                file: rp.clone(),
                submitted: SubmittedInput {
                    path: path.to_string(),
                    hash,
                    size,
                },
            });
        }
    }
    Ok(out)
}

/// Whether `tasks` name any coordinator-side input file (`< PATH`).
pub fn has_path_inputs(tasks: &[Task]) -> bool {
    tasks
        .iter()
        .any(|t| t.inputs().iter().any(|i| matches!(i, Input::Path(_))))
}

/// Queues `t` (a control message; chunks go by `Link::send_chunk`) on `link`, waiting (at
/// most `limit`) while its command queue is full.
async fn send(link: &Link, t: Transfer, limit: Duration) -> Result<(), String> {
    link.send_within(Command::Transfer(Box::new(t)), limit)
        .await
        .map_err(|e| e.to_string())
}

fn transfer_of(m: Message) -> Option<Transfer> {
    match m {
        Message::Transfer(t) => Some(*t),
        _ => None,
    }
}

/// Offers each of `inputs` to the node on `link` and sends the bytes it wants, one file at
/// a time; every wait is bounded by `limit`. Returns when the node holds them all.
pub async fn upload(
    link: &Link,
    rx: &mut mpsc::Receiver<(LinkId, LinkEvent)>,
    inputs: &[LocalInput],
    limit: Duration,
) -> Result<(), String> {
    let chunk = transfer::chunk_len(usize::MAX);
    for (n, input) in inputs.iter().enumerate() {
        let id = n as u64 + 1;
        let what = &input.submitted.path;
        let mut file = std::fs::File::open(&input.file)
            .map_err(|e| format!("{}: {e}", input.file.display()))?;
        let mut sender = Sender::offered(id, input.submitted.size, chunk);
        let offer = transfer_of(sender.offer(input.submitted.hash))
            .ok_or_else(|| "an offer that is not a transfer".to_string())?;
        send(link, offer, limit).await?;
        loop {
            // Send what the credit allows, then wait for the node.
            while let Some((offset, len)) = sender.poll_read() {
                let mut data = vec![0u8; len];
                file.seek(SeekFrom::Start(offset))
                    .and_then(|_| file.read_exact(&mut data))
                    .map_err(|e| format!("{}: {e}", input.file.display()))?;
                let msg = sender
                    .chunk(offset, data)
                    .map_err(|e| format!("{what}: {e}"))?;
                let t =
                    transfer_of(msg).ok_or_else(|| "a chunk that is not a transfer".to_string())?;
                link.send_chunk(t, limit).await.map_err(|e| e.to_string())?;
            }
            if sender.state() == SendState::Delivered {
                break;
            }
            let ev = tokio::time::timeout(limit, rx.recv())
                .await
                .map_err(|_| format!("{what}: the node did not answer within {limit:?}"))?;
            let t = match ev {
                Some((_, LinkEvent::Transfer(t))) => *t,
                Some((_, LinkEvent::Closed { error })) => {
                    return Err(match error {
                        Some(e) => format!("{what}: the node closed the connection: {e}"),
                        None => format!("{what}: the node closed the connection"),
                    })
                }
                Some(_) => continue,
                None => return Err(format!("{what}: the connection closed")),
            };
            let step = match t {
                Transfer::Have { id: i } if i == id => sender.on_have(),
                Transfer::Want { id: i, window } if i == id => sender.on_want(window),
                Transfer::Ack { id: i, received } if i == id => sender.on_ack(received),
                Transfer::Done { id: i } if i == id => sender.on_done(),
                Transfer::Abort {
                    id: i,
                    reason,
                    message,
                } if i == id => {
                    return Err(format!(
                        "{what}: the node refused it ({reason:?}): {}",
                        p2p_core::text::escape(&message)
                    ))
                }
                _ => Ok(()),
            };
            step.map_err(|e| format!("{what}: {e}"))?;
        }
    }
    Ok(())
}

/// Where a run keeps input `i`: `RUN/inputs/HASH/NAME`.
fn input_dest(run_dir: &Path, hash: &ContentHash, name: &str) -> PathBuf {
    run_dir.join(INPUTS).join(hash.to_hex()).join(name)
}

/// Points every `< PATH` input of `tasks` at the run's copy of it (see [`place_inputs`]);
/// a path the submit did not ship is an error.
pub fn rewrite_inputs(
    tasks: &mut [Task],
    run_dir: &Path,
    inputs: &[SubmittedInput],
) -> Result<(), String> {
    let by_path: HashMap<&str, &SubmittedInput> =
        inputs.iter().map(|i| (i.path.as_str(), i)).collect();
    for t in tasks.iter_mut() {
        if !t.inputs().iter().any(|i| matches!(i, Input::Path(_))) {
            continue;
        }
        let id = t.id().to_owned();
        for input in t.extra_mut().inputs.iter_mut() {
            let Input::Path(p) = input else { continue };
            let written = p.to_string_lossy().into_owned();
            let Some(s) = by_path.get(written.as_str()) else {
                return Err(format!(
                    "task {}: input {written:?} was not sent with the plan (submit ships \
                     the files a plan names; a host reads none of its own)",
                    id
                ));
            };
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("task {id}: input {written:?} has no file name"))?;
            *p = input_dest(run_dir, &s.hash, name);
        }
    }
    Ok(())
}

/// Gives the run directory each input of the (already rewritten, see [`rewrite_inputs`])
/// `tasks` from the node's file cache (a hard link, else a copy; see
/// [`p2p_tasks::node_files::NodeFiles::keep`]), synced.
pub fn place_inputs(
    files: &p2p_tasks::node_files::NodeFiles,
    tasks: &[Task],
    inputs: &[SubmittedInput],
) -> Result<(), String> {
    let by_hash: HashMap<String, &SubmittedInput> =
        inputs.iter().map(|i| (i.hash.to_hex(), i)).collect();
    let mut done: HashSet<PathBuf> = HashSet::new();
    for t in tasks {
        for input in t.inputs() {
            let Input::Path(dest) = input else { continue };
            if !done.insert(dest.clone()) {
                continue;
            }
            let hex = dest
                .parent()
                .and_then(Path::file_name)
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let Some(s) = by_hash.get(hex) else {
                return Err(format!("task {}: an input with no hash", t.id()));
            };
            // Placed before (a member of a replicated run places its inputs when the plan
            // is committed, and checks them again to coordinate): kept as it is. Never
            // written over: it may be a hard link to the cached file.
            match std::fs::symlink_metadata(dest) {
                Ok(m) if m.is_file() && m.len() == s.size => continue,
                Ok(_) => std::fs::remove_file(dest)
                    .map_err(|e| format!("cannot replace {}: {e}", dest.display()))?,
                Err(_) => {}
            }
            let parent = dest.parent().unwrap_or(dest);
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot make {}: {e}", parent.display()))?;
            let size = files.keep(&s.hash, dest).map_err(|e| {
                format!(
                    "input {:?}: {e} (it must be offered on the submit's connection)",
                    s.path
                )
            })?;
            if size != s.size {
                return Err(format!(
                    "input {:?}: the node holds {size} bytes, the client announced {}",
                    s.path, s.size
                ));
            }
            std::fs::File::open(dest)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("cannot sync {}: {e}", dest.display()))?;
        }
    }
    Ok(())
}

/// The files to offer another node so that it holds every input of `tasks` (already
/// rewritten into a run directory and placed there, see [`place_inputs`]): each distinct
/// hash once, read from its copy in the run directory.
pub fn placed_inputs(tasks: &[Task], inputs: &[SubmittedInput]) -> Vec<LocalInput> {
    let by_hash: HashMap<String, &SubmittedInput> =
        inputs.iter().map(|i| (i.hash.to_hex(), i)).collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for t in tasks {
        for input in t.inputs() {
            let Input::Path(dest) = input else { continue };
            let hex = dest
                .parent()
                .and_then(Path::file_name)
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let Some(s) = by_hash.get(hex) else { continue };
            if !seen.insert(hex.to_string()) {
                continue;
            }
            out.push(LocalInput {
                file: dest.clone(),
                submitted: (*s).clone(),
            });
        }
    }
    out
}

/// Every regular file under `root` (no symbolic link followed), as `/`-separated paths
/// relative to it, sorted; names that are not UTF-8 are skipped.
pub fn list_results(root: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), root.to_path_buf())];
    while let Some((rel, dir)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && rel.is_empty() => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push((path, entry.path()));
            } else if kind.is_file() && path.len() <= MAX_RESULT_PATH {
                out.push((path, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Sends every file of `root` on `tx` as [`Hosted::Results`] is answered; a file that
/// cannot be read whole ends the answer with `Refused`.
pub fn stream_results(root: &Path, tx: &mpsc::Sender<Hosted>) {
    let send = |h: Hosted| tx.blocking_send(h).is_ok();
    let refuse = |reason: String| {
        let _ = tx.blocking_send(Hosted::Refused { reason });
    };
    let files = match list_results(root) {
        Ok(f) => f,
        Err(e) => return refuse(format!("cannot list the run's results: {e}")),
    };
    let mut sent = 0u64;
    let mut buf = vec![0u8; MAX_RESULT_DATA];
    for (path, file) in files {
        let mut f = match std::fs::File::open(&file) {
            Ok(f) => f,
            Err(e) => return refuse(format!("{path}: {e}")),
        };
        let size = match f.metadata() {
            Ok(m) => m.len(),
            Err(e) => return refuse(format!("{path}: {e}")),
        };
        if !send(Hosted::ResultFile(ResultFile {
            path: path.clone(),
            size,
        })) {
            return;
        }
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            if let Err(e) = f.read_exact(&mut buf[..want]) {
                return refuse(format!("{path}: {e} (it changed while being sent)"));
            }
            if !send(Hosted::ResultData {
                data: buf[..want].to_vec(),
            }) {
                return;
            }
            left -= want as u64;
        }
        sent += 1;
    }
    let _ = send(Hosted::ResultsDone { files: sent });
}

/// Why a result path from a host cannot be written under the client's directory (`None`:
/// it can): the rules of task outputs (`> NAME`), a plain relative path.
fn path_problem(path: &str) -> Option<&'static str> {
    p2p_tasks::task::output_name_problem(path)
}

/// Writes the files of a [`Hosted::Results`] answer under `dir`: each into a temporary
/// file beside its place, renamed there once its last byte is in.
#[derive(Debug)]
pub struct ResultsWriter {
    dir: PathBuf,
    current: Option<(String, tempfile::NamedTempFile, u64)>,
    files: u64,
    bytes: u64,
}

impl ResultsWriter {
    /// A writer into `dir` (made when the first file arrives).
    pub fn new(dir: PathBuf) -> ResultsWriter {
        ResultsWriter {
            dir,
            current: None,
            files: 0,
            bytes: 0,
        }
    }

    /// Files and bytes written so far.
    pub fn written(&self) -> (u64, u64) {
        (self.files, self.bytes)
    }

    fn finish_current(&mut self) -> Result<(), String> {
        if let Some((path, tmp, left)) = self.current.take() {
            if left > 0 {
                return Err(format!("{path}: {left} bytes missing"));
            }
            let dest = self.dir.join(&path);
            tmp.persist(&dest)
                .map_err(|e| format!("cannot write {}: {}", dest.display(), e.error))?;
            self.files += 1;
        }
        Ok(())
    }

    /// Takes one answer; an error ends the transfer.
    pub fn take(&mut self, h: &Hosted) -> Result<(), String> {
        match h {
            Hosted::ResultFile(f) => {
                self.finish_current()?;
                if let Some(why) = path_problem(&f.path) {
                    return Err(format!("the node sent a result path {:?}: {why}", f.path));
                }
                let dest = self.dir.join(&f.path);
                let parent = dest.parent().unwrap_or(&self.dir).to_path_buf();
                std::fs::create_dir_all(&parent)
                    .map_err(|e| format!("cannot make {}: {e}", parent.display()))?;
                let tmp = tempfile::NamedTempFile::new_in(&parent)
                    .map_err(|e| format!("cannot write in {}: {e}", parent.display()))?;
                self.current = Some((f.path.clone(), tmp, f.size));
                if f.size == 0 {
                    self.finish_current()?;
                }
                Ok(())
            }
            Hosted::ResultData { data } => {
                let Some((path, tmp, left)) = self.current.as_mut() else {
                    return Err("the node sent bytes of no file".into());
                };
                if data.len() as u64 > *left {
                    return Err(format!("{path}: more bytes than announced"));
                }
                tmp.write_all(data)
                    .map_err(|e| format!("cannot write {path}: {e}"))?;
                *left -= data.len() as u64;
                self.bytes += data.len() as u64;
                if *left == 0 {
                    self.finish_current()?;
                }
                Ok(())
            }
            Hosted::ResultsDone { files } => {
                self.finish_current()?;
                if *files != self.files {
                    return Err(format!(
                        "the node sent {} files and counted {files}",
                        self.files
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn file(path: &str, size: u64) -> Hosted {
        Hosted::ResultFile(ResultFile {
            path: path.into(),
            size,
        })
    }

    fn data(b: &[u8]) -> Hosted {
        Hosted::ResultData { data: b.to_vec() }
    }

    #[test]
    fn results_land_whole_in_their_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = ResultsWriter::new(tmp.path().join("out"));
        for h in [
            file("a1/stdout", 5),
            data(b"hel"),
            data(b"lo"),
            file("a1/empty", 0),
            file("b2/out/x.csv", 1),
            data(b"x"),
            Hosted::ResultsDone { files: 3 },
        ] {
            w.take(&h).unwrap();
        }
        let read = |p: &str| std::fs::read(tmp.path().join("out").join(p)).unwrap();
        assert_eq!(read("a1/stdout"), b"hello");
        assert_eq!(read("a1/empty"), b"");
        assert_eq!(read("b2/out/x.csv"), b"x");
        assert_eq!(w.written(), (3, 6));
    }

    #[test]
    fn a_path_leaving_the_directory_or_a_short_file_is_refused_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        for bad in ["../x", "/etc/x", "a/../../x", "a//b", ""] {
            let mut w = ResultsWriter::new(out.clone());
            assert!(w.take(&file(bad, 1)).is_err(), "{bad:?}");
        }
        assert!(!tmp.path().join("x").exists());
        let mut w = ResultsWriter::new(out.clone());
        w.take(&file("a/stdout", 4)).unwrap();
        w.take(&data(b"ab")).unwrap();
        assert!(w.take(&file("b", 1)).is_err(), "a file cut short");
        assert!(!out.join("a/stdout").exists(), "no partial file in place");
        let mut w = ResultsWriter::new(out.clone());
        w.take(&file("c", 1)).unwrap();
        assert!(w.take(&data(b"too long")).is_err());
        let mut w = ResultsWriter::new(out.clone());
        assert!(w.take(&data(b"stray")).is_err());
        let mut w = ResultsWriter::new(out);
        assert!(w.take(&Hosted::ResultsDone { files: 2 }).is_err());
    }

    #[test]
    fn listing_skips_symbolic_links_and_walks_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("results");
        std::fs::create_dir_all(root.join("a1/sub")).unwrap();
        std::fs::write(root.join("a1/stdout"), "x").unwrap();
        std::fs::write(root.join("a1/sub/o"), "y").unwrap();
        std::fs::write(tmp.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("a1/link")).unwrap();
        let names: Vec<String> = list_results(&root)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(names, ["a1/stdout", "a1/sub/o"]);
        assert!(list_results(&tmp.path().join("none")).unwrap().is_empty());
    }

    #[test]
    fn inputs_are_rewritten_into_the_run_and_an_unshipped_one_is_refused() {
        let mut tasks = p2p_tasks::parse::parse("t", "a1 < data/in.csv\nb1 < x\n").unwrap();
        let h = ContentHash([7; 32]);
        let shipped = vec![SubmittedInput {
            path: "data/in.csv".into(),
            hash: h,
            size: 3,
        }];
        let err = rewrite_inputs(&mut tasks, Path::new("/r"), &shipped).unwrap_err();
        assert!(err.contains("\"x\" was not sent"), "{err}");
        let mut tasks = p2p_tasks::parse::parse("t", "a1 < data/in.csv\n").unwrap();
        rewrite_inputs(&mut tasks, Path::new("/r"), &shipped).unwrap();
        assert_eq!(
            tasks[0].inputs(),
            [Input::Path(
                Path::new("/r/inputs").join(h.to_hex()).join("in.csv")
            )]
        );
    }
}
