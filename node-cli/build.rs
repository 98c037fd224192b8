//! Records the git commit the binary is built from (`p2p-node --version`), when it is built
//! from a checkout of this repository. Without git, outside a checkout (a crates.io
//! package, a tarball) or inside some other repository, nothing is recorded and the build
//! goes on: this script never fails.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let Some(manifest) = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from) else {
        return;
    };
    // Only this repository's own checkout: its top level holds node-cli/Cargo.toml.
    let Some(top) = git(&manifest, &["rev-parse", "--show-toplevel"]) else {
        return;
    };
    let ours = match (
        Path::new(&top).join("node-cli").canonicalize(),
        manifest.canonicalize(),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !ours {
        return;
    }
    let Some(commit) = git(&manifest, &["rev-parse", "--short=12", "HEAD"]) else {
        return;
    };
    if !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return;
    }
    println!("cargo:rustc-env=P2P_NODE_GIT_COMMIT={commit}");
    // Rebuilt when HEAD moves: HEAD itself, the branch it names, and packed refs.
    let mut watch = vec![git(&manifest, &["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&manifest, &["symbolic-ref", "-q", "HEAD"]) {
        watch.push(git(&manifest, &["rev-parse", "--git-path", &branch]));
    }
    watch.push(git(&manifest, &["rev-parse", "--git-path", "packed-refs"]));
    for p in watch.into_iter().flatten() {
        let p = if Path::new(&p).is_absolute() {
            PathBuf::from(p)
        } else {
            manifest.join(p)
        };
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}
