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

/// Copies each input `(name, source)` into `dir` as `name`, which must be one plain path
/// component; the reason of the first failure otherwise.
pub(crate) fn place_inputs(dir: &Path, inputs: &[(String, PathBuf)]) -> Result<(), String> {
    for (name, src) in inputs {
        if name.is_empty()
            || name.contains('/')
            || name == "."
            || name == ".."
            || name.contains('\0')
        {
            return Err(format!("input name {name:?} is not a plain file name"));
        }
        std::fs::copy(src, dir.join(name))
            .map_err(|e| format!("cannot place input {name:?} in the working directory: {e}"))?;
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
