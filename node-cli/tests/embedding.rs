//! The library without its command line: `node-cli` with `default-features = false` pulls
//! in none of the crates only the `p2p-node` binary needs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// Crates of the `cli` feature that an embedder must not compile.
const CLI_ONLY: &[&str] = &[
    "clap",
    "clap_complete",
    "clap_mangen",
    "indicatif",
    "toml",
    "tracing-subscriber",
    "anyhow",
];

fn tree(features: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .args(["--manifest-path", manifest, "-p", "node-cli"])
        .args(features)
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn without_default_features_no_cli_crate_is_a_dependency() {
    let lib = tree(&["--no-default-features"]);
    assert!(
        lib.iter().any(|c| c == "p2p-core"),
        "the tree is listed: {lib:?}"
    );
    let cli_only: Vec<&&str> = CLI_ONLY
        .iter()
        .filter(|c| lib.iter().any(|l| l == **c))
        .collect();
    assert!(cli_only.is_empty(), "an embedder compiles {cli_only:?}");
    // And the check can fail: the default (the binary) has them all.
    let full = tree(&[]);
    for c in CLI_ONLY {
        assert!(full.iter().any(|l| l == c), "{c} is not in the cli build");
    }
}
