//! Where a node keeps its identity between starts: the data directory.
//!
//! A node's identity file holds its private key; its node id derives from it
//! ([`p2p_core::identity`]). `p2p-node serve` keeps it in the data directory
//! (`--data-dir`, default [`default_dir`]) so the node keeps its id across restarts; `run`
//! keeps a coordinator identity there too.
//!
//! Several nodes may run on one machine (three `serve` processes in one shell, say), and
//! two live processes must never share an identity. So each process *holds* its identity
//! file: it takes an exclusive lock on the file itself for as long as it runs (the operating
//! system drops the lock when the process ends, however it ends), so a symbolic or hard link
//! to a held identity is held too. A node that asks for the
//! data directory's identity takes the first *slot* no live process holds: `identity`, then
//! `identity-2`, `identity-3`, and so on (`coordinator`, `coordinator-2`, ... for `run`),
//! creating the file (mode 0600) the first time. The same processes started in the same
//! order get the same ids again.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use p2p_core::Identity;

use crate::Error;

/// The most slots of one kind tried in a data directory.
pub const MAX_SLOTS: u32 = 256;

/// The data directory used when none is given (see [`default_dir_from`]), from this
/// process's environment.
pub fn default_dir() -> Option<PathBuf> {
    default_dir_from(|k| std::env::var_os(k))
}

/// The data directory used when none is given: `$STATE_DIRECTORY` (the first of its
/// `:`-separated directories; systemd sets it for `StateDirectory=`), else
/// `$XDG_DATA_HOME/p2p-node`, else `$HOME/.local/share/p2p-node`; `None` when none of
/// these variables is set. `env` looks a variable up.
pub fn default_dir_from(env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let non_empty = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(state) = non_empty("STATE_DIRECTORY") {
        let first = state.to_string_lossy().split(':').next().map(PathBuf::from);
        if let Some(dir) = first.filter(|d| !d.as_os_str().is_empty()) {
            return Some(dir);
        }
    }
    if let Some(xdg) = non_empty("XDG_DATA_HOME") {
        return Some(PathBuf::from(xdg).join("p2p-node"));
    }
    non_empty("HOME").map(|h| PathBuf::from(h).join(".local/share/p2p-node"))
}

/// The key file used when none is given: `$CREDENTIALS_DIRECTORY/cluster.key` (systemd's
/// `LoadCredential=cluster.key:...`), when that file exists.
pub fn credentials_key() -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|v| !v.is_empty())?;
    let path = PathBuf::from(dir).join("cluster.key");
    path.exists().then_some(path)
}

/// An identity this process holds: no other process can hold the same file, under any
/// path that names it, until this value is dropped or the process ends.
#[derive(Debug)]
pub struct HeldIdentity {
    /// The identity.
    pub identity: Identity,
    /// Its file.
    pub path: PathBuf,
    /// Whether the file was created now.
    pub created: bool,
    _held: p2p_core::identity::HeldIdentity,
}

impl HeldIdentity {
    /// Lets the identity go because the command will not run after all: a file created
    /// for it now is removed again, so a command that fails to start leaves no new slot.
    pub fn discard(self) {
        if self.created {
            // Still held: nobody else can have taken it meanwhile.
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot remove an unused identity");
            }
        }
    }
}

/// Holds the identity file at `path` (the file itself, whatever path names it: see
/// [`Identity::hold`]), creating it if missing. `Ok(None)`: another live process holds it.
pub fn hold(path: &Path) -> Result<Option<HeldIdentity>, Error> {
    let held = Identity::hold(path).map_err(|e| Error::Identity {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(held.map(|h| HeldIdentity {
        identity: h.identity.clone(),
        path: path.to_path_buf(),
        created: h.created,
        _held: h,
    }))
}

/// Holds the first free slot of kind `name` (e.g. `identity`) in `dir`, creating `dir`
/// (mode 0700) and the file as needed.
pub fn hold_slot(dir: &Path, name: &str) -> Result<HeldIdentity, Error> {
    create_private_dir(dir).map_err(|e| Error::Identity {
        path: dir.to_path_buf(),
        message: match std::fs::metadata(dir) {
            Ok(m) if !m.is_dir() => "the data directory's path names something that is not a \
                                     directory"
                .to_string(),
            _ => format!("cannot create the data directory: {e}"),
        },
    })?;
    for n in 1..=MAX_SLOTS {
        let file = if n == 1 {
            name.to_string()
        } else {
            format!("{name}-{n}")
        };
        if let Some(held) = hold(&dir.join(file))? {
            return Ok(held);
        }
    }
    Err(Error::Identity {
        path: dir.to_path_buf(),
        message: format!(
            "all {MAX_SLOTS} {name} slots are held by running nodes; give this one its own \
             --data-dir or --identity"
        ),
    })
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn slots_are_held_one_process_at_a_time_and_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = hold_slot(&data, "identity").unwrap();
        assert!(first.created);
        assert_eq!(first.path, data.join("identity"));
        // While the first is held, the next node gets the second slot, a different id.
        let second = hold_slot(&data, "identity").unwrap();
        assert_eq!(second.path, data.join("identity-2"));
        assert_ne!(first.identity.node_id(), second.identity.node_id());
        // Another kind of slot is separate.
        let coord = hold_slot(&data, "coordinator").unwrap();
        assert_eq!(coord.path, data.join("coordinator"));
        // An explicit file held by someone else is reported as held.
        assert!(hold(&first.path).unwrap().is_none());
        // A restart (the lock released) gets the same id back from the first slot.
        let id = first.identity.node_id();
        drop(first);
        let again = hold_slot(&data, "identity").unwrap();
        assert_eq!(again.path, data.join("identity"));
        assert!(!again.created);
        assert_eq!(again.identity.node_id(), id);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&data).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }

    #[test]
    fn the_state_directory_comes_before_the_xdg_and_home_defaults() {
        fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        }
        let all = [
            ("STATE_DIRECTORY", "/var/lib/p2p-node:/var/lib/other"),
            ("XDG_DATA_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(
            default_dir_from(env(&all)),
            Some(PathBuf::from("/var/lib/p2p-node"))
        );
        assert_eq!(
            default_dir_from(env(&all[1..])),
            Some(PathBuf::from("/x/p2p-node"))
        );
        assert_eq!(
            default_dir_from(env(&[("STATE_DIRECTORY", ""), ("HOME", "/h")])),
            Some(PathBuf::from("/h/.local/share/p2p-node"))
        );
        assert_eq!(default_dir_from(env(&[])), None);
    }

    #[test]
    fn an_unusable_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let err = hold_slot(&file, "identity").unwrap_err().to_string();
        assert!(err.contains("not-a-dir"), "{err}");
        assert!(err.contains("not a directory"), "{err}");
    }
}
