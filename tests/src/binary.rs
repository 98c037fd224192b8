//! Where the `p2p-node` binary under test is, and the workspace it belongs to.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root (the parent of this package's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package lives inside the workspace")
        .to_path_buf()
}

/// The binary [`bin`] returns, once set (by [`use_bin`] or on first use).
static BIN: OnceLock<PathBuf> = OnceLock::new();

/// Makes `path` the binary under test of this process, before anything asked for [`bin`];
/// `false` (and nothing changes) if one was already chosen. For callers that know the binary
/// cargo built for them (`env!("CARGO_BIN_EXE_p2p-node")` in node-cli's benches and tests),
/// which then need no `cargo build` of their own.
pub fn use_bin(path: impl Into<PathBuf>) -> bool {
    BIN.set(path.into()).is_ok()
}

/// The `p2p-node` binary under test.
///
/// `P2P_NODE_BIN` overrides it; otherwise it is `target/debug/p2p-node` next to the test
/// executable's `deps` directory, (re)built once per test process with
/// `cargo build -p node-cli --bin p2p-node` so the suites never test a stale binary (a no-op
/// taking a fraction of a second when it is up to date).
///
/// This package is not the one that has the binary, so cargo gives its tests no
/// `CARGO_BIN_EXE_p2p-node`; that is why it is built here. A crate that has it passes it to
/// [`use_bin`] first.
pub fn bin() -> &'static Path {
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("P2P_NODE_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current_exe");
        // target/debug/deps/<test> -> target/debug
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lives in target/<profile>/deps");
        let path = dir.join(format!("p2p-node{}", std::env::consts::EXE_SUFFIX));
        build_binary(dir.ends_with("release"));
        assert!(
            path.exists(),
            "{} does not exist, even after `cargo build -p node-cli --bin p2p-node`",
            path.display()
        );
        path
    })
}

fn build_binary(release: bool) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec!["build", "-q", "-p", "node-cli", "--bin", "p2p-node"];
    if release {
        args.push("--release");
    }
    let mut child = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn cargo build");
    let guard_deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.try_wait().expect("wait for cargo build") {
            assert!(status.success(), "cargo build -p node-cli failed: {status}");
            return;
        }
        if Instant::now() > guard_deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cargo build -p node-cli did not finish in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
