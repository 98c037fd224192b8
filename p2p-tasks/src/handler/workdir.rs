//! Per-attempt working directories of shell handlers.
//!
//! Every attempt of a [`Shell`](super::Shell) task runs in a fresh directory of its own,
//! `ROOT/ID.ATTEMPT.RANDOM` (the id reduced to ASCII letters, digits, `_` and `-`, at most
//! 64 of them, so no id can name a path outside `ROOT`), created with mode 0700 and removed
//! when the attempt ends, however it ends; with `keep_failed`, the directory of a failed
//! attempt is kept for debugging.

use std::io;
use std::path::{Path, PathBuf};

/// Where a shell handler's attempts get their working directories.
#[derive(Debug, Clone, Default)]
pub struct WorkDirs {
    /// The directory the attempts' directories are made in (created when missing, mode
    /// 0700); `None`: the system's temporary directory.
    pub root: Option<PathBuf>,
    /// Keep the directory of a failed attempt (`serve --keep-work`).
    pub keep_failed: bool,
}

impl WorkDirs {
    /// Removes every entry of the root (when there is one): the working directories a
    /// process killed with `kill -9` left behind. Only for a root no live process uses (a
    /// node's own, held through its identity slot). Symbolic links are removed, never
    /// followed. Returns how many entries went.
    pub fn sweep(&self) -> io::Result<usize> {
        let Some(root) = &self.root else {
            return Ok(0);
        };
        let entries = match std::fs::read_dir(root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            // `file_type` does not follow a symbolic link, and `remove_dir_all` does not
            // follow links inside the tree.
            let gone = if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match gone {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot remove {}: {e}", path.display()),
                    ))
                }
            }
        }
        Ok(removed)
    }
}

/// Most characters of a task id in its directory's name.
const MAX_ID_CHARS: usize = 64;

/// The start of an attempt directory's name: the id with every character but ASCII letters,
/// digits, `_` and `-` replaced by `_`, cut to 64 characters, then `.ATTEMPT.`. It holds no
/// `/` and is never `.` or `..`.
pub(crate) fn prefix(id: &str, attempt: u32) -> String {
    let mut p: String = id
        .chars()
        .take(MAX_ID_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if p.is_empty() {
        p.push('_');
    }
    p.push_str(&format!(".{attempt}."));
    p
}

/// One attempt's working directory, removed on drop (unless kept).
#[derive(Debug)]
pub(crate) struct WorkDir {
    dir: Option<tempfile::TempDir>,
    keep_failed: bool,
}

impl WorkDir {
    /// Makes a fresh directory for attempt `attempt` of task `id`.
    pub(crate) fn create(cfg: &WorkDirs, id: &str, attempt: u32) -> io::Result<WorkDir> {
        let root = cfg.root.clone().unwrap_or_else(std::env::temp_dir);
        create_root(&root)?;
        let dir = tempfile::Builder::new()
            .prefix(&prefix(id, attempt))
            .rand_bytes(8)
            .tempdir_in(&root)?;
        Ok(WorkDir {
            dir: Some(dir),
            keep_failed: cfg.keep_failed,
        })
    }

    /// Its path.
    pub(crate) fn path(&self) -> &Path {
        match &self.dir {
            Some(d) => d.path(),
            None => Path::new(""),
        }
    }

    /// Ends the attempt's directory: removed (on a blocking thread when there is a
    /// runtime), or kept when the attempt failed and failed ones are kept. Returns the kept
    /// path.
    pub(crate) async fn finish(mut self, ok: bool) -> Option<PathBuf> {
        let dir = self.dir.take()?;
        if !ok && self.keep_failed {
            let kept = dir.keep();
            tracing::warn!(dir = %kept.display(), "kept the working directory of a failed attempt (--keep-work)");
            return Some(kept);
        }
        let path = dir.path().to_path_buf();
        let removed = tokio::task::spawn_blocking(move || dir.close()).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(dir = %path.display(), error = %e, "cannot remove a working directory");
        }
        None
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // A cancelled attempt: removed here, by TempDir's own drop (it does not follow
        // symbolic links).
        drop(self.dir.take());
    }
}

/// [`place_inputs`] on a blocking thread: a large input's copy never stalls the node's
/// runtime (its other connections and tasks) for the time it takes.
pub(crate) async fn place_inputs_off_thread(
    dir: &Path,
    inputs: &[(String, PathBuf)],
    link: bool,
) -> Result<(), String> {
    if inputs.is_empty() {
        return Ok(());
    }
    let (dir, inputs) = (dir.to_path_buf(), inputs.to_vec());
    match tokio::task::spawn_blocking(move || place_inputs(&dir, &inputs, link)).await {
        Ok(r) => r,
        Err(e) => Err(format!("cannot place the inputs: {e}")),
    }
}

/// Copies `src` into a new file `dst` with `src`'s permissions: a reflink (`FICLONE`: the
/// two files share blocks until either is written, so nothing is copied) where the
/// filesystem has them (btrfs, XFS, bcachefs), else an in-kernel copy (`copy_file_range`,
/// which [`std::io::copy`] uses between two files). Never a link (that is [`link_file`]'s,
/// with `serve --link-inputs`): the task may write its copy, and the cached bytes must not
/// change.
pub(crate) fn copy_file(src: &Path, dst: &Path) -> io::Result<u64> {
    let mut from = std::fs::File::open(src)?;
    let meta = from.metadata()?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    let copied = match reflink(&from, &to) {
        Ok(()) => Ok(meta.len()),
        Err(_) => std::io::copy(&mut from, &mut to),
    };
    let done = copied.and_then(|n| to.set_permissions(meta.permissions()).map(|()| n));
    if done.is_err() {
        drop(to);
        let _ = std::fs::remove_file(dst);
    }
    done
}

#[cfg(target_os = "linux")]
fn reflink(from: &std::fs::File, to: &std::fs::File) -> io::Result<()> {
    rustix::fs::ioctl_ficlone(to, from).map_err(io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn reflink(_from: &std::fs::File, _to: &std::fs::File) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Gives `dst` the file `src` as a hard link, first taking the write permissions off
/// `src` (which `dst` shares: the task sees a read-only file, which a program running as
/// another user than root cannot open for writing without a `chmod` of its own); where the
/// link cannot be made (another file system, a file system without them), a copy
/// ([`copy_file`]). Only for a source whose bytes are never written in place (the node's
/// cache). Returns the file's size.
pub(crate) fn link_file(src: &Path, dst: &Path) -> io::Result<u64> {
    match read_only_link(src, dst) {
        Ok(len) => Ok(len),
        Err(_) => copy_file(src, dst),
    }
}

/// Takes the write permissions off `src`, then gives `dst` the file as a hard link (the
/// first half of [`link_file`], without its copy). Returns the file's size.
pub(crate) fn read_only_link(src: &Path, dst: &Path) -> io::Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(src)?;
    let mode = meta.permissions().mode();
    if mode & 0o222 != 0 {
        std::fs::set_permissions(src, std::fs::Permissions::from_mode(mode & !0o222))?;
    }
    std::fs::hard_link(src, dst)?;
    Ok(meta.len())
}

/// Places each input `(name, source)` in `dir` as `name` (which must be one plain path
/// component): a copy ([`copy_file`]), or with `link` a hard link ([`link_file`]); the
/// reason of the first failure otherwise.
pub(crate) fn place_inputs(
    dir: &Path,
    inputs: &[(String, PathBuf)],
    link: bool,
) -> Result<(), String> {
    for (name, src) in inputs {
        if name.is_empty()
            || name.contains('/')
            || name == "."
            || name == ".."
            || name.contains('\0')
        {
            return Err(format!("input name {name:?} is not a plain file name"));
        }
        let dst = dir.join(name);
        let placed = if link {
            link_file(src, &dst)
        } else {
            copy_file(src, &dst)
        };
        placed.map_err(|e| format!("cannot place input {name:?} in the working directory: {e}"))?;
    }
    Ok(())
}

/// Moves each declared output from `dir` to `files.collect/INDEX`. Each must be a valid
/// output name ([`crate::task::output_name_problem`]) naming a regular file reached through
/// no symbolic link (every component is checked without following links); the reason of
/// the first failure otherwise.
pub(crate) fn collect_outputs(dir: &Path, files: &super::TaskFiles) -> Result<(), String> {
    if files.outputs.is_empty() {
        return Ok(());
    }
    let Some(collect) = &files.collect else {
        return Err("outputs declared, but nowhere to collect them".to_owned());
    };
    for (i, name) in files.outputs.iter().enumerate() {
        if let Some(problem) = crate::task::output_name_problem(name) {
            return Err(format!("bad output name {name:?}: {problem}"));
        }
        let mut path = dir.to_path_buf();
        let parts: Vec<&str> = name.split('/').collect();
        for (k, part) in parts.iter().enumerate() {
            path.push(part);
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|e| format!("declared output {name:?} was not written: {e}"))?;
            let last = k + 1 == parts.len();
            let ok = if last {
                meta.file_type().is_file()
            } else {
                meta.file_type().is_dir()
            };
            if !ok {
                return Err(format!(
                    "declared output {name:?} is not a regular file inside the working \
                     directory (a symbolic link, a directory or a special file is refused)"
                ));
            }
        }
        let dest = collect.join(i.to_string());
        if std::fs::rename(&path, &dest).is_err() {
            std::fs::copy(&path, &dest)
                .map_err(|e| format!("cannot collect output {name:?}: {e}"))?;
        }
    }
    Ok(())
}

/// Creates `root` (and its parents) when missing, the last one with mode 0700.
fn create_root(root: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot create {}: {e}", root.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_linked_input_shares_the_source_made_read_only() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("cached");
        std::fs::write(&src, "bytes").unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
        let work = root.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let inputs = vec![("in.txt".to_owned(), src.clone())];
        place_inputs(&work, &inputs, true).unwrap();
        let (a, b) = (
            std::fs::metadata(&src).unwrap(),
            std::fs::metadata(work.join("in.txt")).unwrap(),
        );
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
        assert_eq!(b.permissions().mode() & 0o777, 0o440);
        // A copy without `link`: its own file, the source's mode.
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
        let copy = root.path().join("copy");
        std::fs::create_dir(&copy).unwrap();
        place_inputs(&copy, &inputs, false).unwrap();
        let c = std::fs::metadata(copy.join("in.txt")).unwrap();
        assert_ne!(c.ino(), a.ino());
        assert_eq!(c.permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read(copy.join("in.txt")).unwrap(), b"bytes");
        // A name that is there already fails (link and copy alike).
        assert!(place_inputs(&work, &inputs, true).is_err());
    }

    #[test]
    fn prefixes_never_leave_the_root() {
        assert_eq!(prefix("a1", 1), "a1.1.");
        assert_eq!(prefix("a1.x-y_z", 3), "a1_x-y_z.3.");
        assert_eq!(prefix("../../x", 1), "______x.1.");
        assert_eq!(prefix("/", 2), "_.2.");
        assert_eq!(prefix("", 1), "_.1.");
        assert_eq!(prefix("é/\0", 1), "___.1.");
        let long = "a".repeat(10_000);
        assert_eq!(prefix(&long, 7), format!("{}.7.", "a".repeat(64)));
        for id in ["..", ".", "../..", "a/../../b", "\n", "a1"] {
            let p = prefix(id, 1);
            assert!(!p.contains('/') && p != "." && p != "..", "{p}");
        }
    }

    #[test]
    fn a_placed_input_is_a_copy_the_task_cannot_use_to_alter_the_source() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("cached");
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &bytes).unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
        let dst = d.path().join("placed");
        assert_eq!(copy_file(&src, &dst).unwrap(), bytes.len() as u64);
        assert_eq!(std::fs::read(&dst).unwrap(), bytes);
        let mode = std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // Not a link: writing the copy in place leaves the source as it was.
        std::fs::write(&dst, b"changed").unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), bytes);
        assert_ne!(
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&src).unwrap()),
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&dst).unwrap())
        );
        // An existing file is not overwritten, and a missing source leaves nothing.
        assert!(copy_file(&src, &dst).is_err());
        assert_eq!(std::fs::read(&dst).unwrap(), b"changed");
        assert!(copy_file(&d.path().join("missing"), &d.path().join("x")).is_err());
        assert!(!d.path().join("x").exists());
    }

    #[test]
    fn a_sweep_empties_the_root_only_and_follows_no_link() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"k").unwrap();
        let root = d.path().join("work");
        let cfg = WorkDirs {
            root: Some(root.clone()),
            keep_failed: false,
        };
        assert_eq!(cfg.sweep().unwrap(), 0, "no root yet");
        std::fs::create_dir_all(root.join("a1.1.xyz/sub")).unwrap();
        std::fs::write(root.join("a1.1.xyz/sub/f"), b"x").unwrap();
        std::fs::write(root.join("stray"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a1.1.xyz/inner")).unwrap();
        assert_eq!(cfg.sweep().unwrap(), 3);
        assert!(root.is_dir());
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"k");
        assert_eq!(WorkDirs::default().sweep().unwrap(), 0);
    }

    #[tokio::test]
    async fn inputs_are_placed_off_the_runtime_thread() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("in"), b"abc").unwrap();
        let work = d.path().join("w");
        std::fs::create_dir(&work).unwrap();
        let inputs = vec![("in.txt".to_owned(), d.path().join("in"))];
        place_inputs_off_thread(&work, &inputs, false)
            .await
            .unwrap();
        assert_eq!(std::fs::read(work.join("in.txt")).unwrap(), b"abc");
        let bad = vec![("../x".to_owned(), d.path().join("in"))];
        assert!(place_inputs_off_thread(&work, &bad, false).await.is_err());
    }

    #[tokio::test]
    async fn a_directory_is_fresh_inside_the_root_and_removed_or_kept() {
        let root = tempfile::tempdir().unwrap();
        let cfg = WorkDirs {
            root: Some(root.path().join("work")),
            keep_failed: false,
        };
        let a = WorkDir::create(&cfg, "../../a1", 1).unwrap();
        let b = WorkDir::create(&cfg, "../../a1", 1).unwrap();
        assert_ne!(a.path(), b.path());
        for d in [&a, &b] {
            assert_eq!(d.path().parent(), Some(root.path().join("work").as_path()));
        }
        std::fs::write(a.path().join("f"), "x").unwrap();
        // A symbolic link out of it is removed, not followed.
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, a.path().join("link")).unwrap();
        let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
        assert_eq!(a.finish(true).await, None);
        assert!(!pa.exists());
        assert!(outside.join("keep").exists());
        drop(b);
        assert!(!pb.exists());

        let keep = WorkDirs {
            keep_failed: true,
            ..cfg
        };
        let c = WorkDir::create(&keep, "a1", 2).unwrap();
        let pc = c.path().to_path_buf();
        assert_eq!(c.finish(false).await, Some(pc.clone()));
        assert!(pc.is_dir());
        let d = WorkDir::create(&keep, "a1", 3).unwrap();
        let pd = d.path().to_path_buf();
        assert_eq!(d.finish(true).await, None, "a successful one is not kept");
        assert!(!pd.exists());
    }
}
