//! Temporary directories and the data directory of the nodes a test process starts.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::workspace_root;

/// The data directory (`P2P_DATA_DIR`) of every node this test process starts, so the
/// suites never touch the real home directory: `p2p-node-tests-PID` in the system's
/// temporary directory. Nodes running at the same time get different identity slots of
/// it, as on a real machine; a node restarted later may get its old identity back. Roots
/// left by test processes that have ended are removed when the first one is made.
pub fn data_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("p2p-node-tests-"))
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("p2p-node-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the test data directory");
        dir
    })
}

/// A temporary directory for one test, deleted on drop.
#[derive(Debug)]
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    /// A fresh empty directory.
    pub fn new() -> Self {
        TestDir {
            dir: tempfile::Builder::new()
                .prefix("p2p-node-test-")
                .tempdir()
                .expect("create a temp dir"),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `name` inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `contents` to `name` inside it; returns the path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, contents).expect("write a file in the temp dir");
        p
    }

    /// Copies the repository's seed `tasks.txt` into it; returns the copy's path.
    pub fn copy_seed(&self) -> PathBuf {
        let p = self.join("tasks.txt");
        std::fs::copy(workspace_root().join("tasks.txt"), &p).expect("copy the seed tasks.txt");
        p
    }

    /// The lines of `name` inside it (empty when it does not exist).
    pub fn read_lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.join(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

/// A tmpfs of a given size mounted on a fresh directory, unmounted (lazily) on drop, even
/// when the test panics: a small disk that fills up.
#[derive(Debug)]
pub struct SmallDisk {
    /// Where it is mounted.
    pub dir: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (e.g. `"64k"`, `"3m"`) on `under/disk`; `None` where mounting
    /// is not permitted.
    pub fn mount(under: &Path, size: &str) -> Option<SmallDisk> {
        let dir = under.join("disk");
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallDisk { dir })
    }

    /// [`SmallDisk::mount`], or `None` after saying on stderr that the test is skipped. Under
    /// `P2P_REQUIRE_MOUNT` (set by CI) a disk that cannot be mounted fails the test instead,
    /// so CI never passes on a test that did not run.
    pub fn mount_or_skip(under: &Path, size: &str) -> Option<SmallDisk> {
        let disk = SmallDisk::mount(under, size);
        if disk.is_none() {
            assert!(
                std::env::var_os("P2P_REQUIRE_MOUNT").is_none(),
                "cannot mount a tmpfs (P2P_REQUIRE_MOUNT is set)"
            );
            eprintln!("skipped: cannot mount a tmpfs (needs root)");
        }
        disk
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// The lines of the file at `path` (none when it does not exist yet).
pub fn file_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}
