//! Issue 14, item 7: with a journal, a result is reported only once it is on disk. On a
//! full disk the run stops with a clear message and exit 1, and every result it reported
//! as succeeded is in the journal (so `--resume` never runs it again).
//!
//! Needs root to mount a 64 KiB tmpfs; without it the test says so and passes, unless
//! `P2P_REQUIRE_MOUNT=1` asks that it run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use tests::{events_named, run_in, SmallDisk, TestDir};

#[test]
fn on_a_full_disk_every_reported_result_is_in_the_journal() {
    let dir = TestDir::new();
    let Some(disk) = SmallDisk::mount_or_skip(dir.path(), "64k") else {
        return;
    };
    let ids: Vec<String> = (1..=3000).map(|i| format!("a{i}")).collect();
    dir.write("tasks.txt", &ids.join("\n"));
    let journal = disk.dir.join("run.journal");
    let journal_arg = journal.to_string_lossy().into_owned();
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--local",
            "--order",
            "none",
            "--json",
            "--journal",
            &journal_arg,
        ],
    );
    // The disk holds far fewer than 3,000 results: the run stops, saying why.
    out.assert_code(1);
    assert!(
        out.stderr.contains("journal") && out.stderr.contains("stopping the run"),
        "{}",
        out.describe()
    );
    let events = out.json();
    let reported: HashSet<String> = events_named(&events, "task_completed")
        .iter()
        .map(|e| e["task"].as_str().unwrap().to_string())
        .collect();
    let text = std::fs::read_to_string(&journal).unwrap();
    let journaled: HashSet<String> = text
        .lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["status"] == "succeeded")
        .filter_map(|v| v["task"].as_str().map(str::to_owned))
        .collect();
    let missing: Vec<&String> = reported.difference(&journaled).collect();
    assert!(
        missing.is_empty(),
        "{} of {} results reported as succeeded are not in the journal (e.g. {:?})",
        missing.len(),
        reported.len(),
        &missing[..missing.len().min(5)]
    );
    eprintln!(
        "{} results reported as succeeded, {} in the journal",
        reported.len(),
        journaled.len()
    );
    let s = events_named(&events, "summary")[0];
    assert_eq!(
        s["succeeded"].as_u64().unwrap() as usize,
        reported.len(),
        "the summary counts what was reported: {s}"
    );
    assert!(reported.len() < 3000, "the disk was not full: {s}");
    drop(disk);
}
