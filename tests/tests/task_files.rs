//! Files that travel with tasks (#18): the `< IN` / `> OUT` clauses of the task file, checked
//! by `run` before anything starts, and the per-attempt working directories of shell
//! handlers on a serving node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use p2p_core::{Assign, Message};
use tests::{events_named, hello, run_in, Serve, TestDir, WireClient, WAIT};

#[test]
fn bad_inputs_and_outputs_exit_2_naming_file_line_and_column() {
    let dir = TestDir::new();
    std::fs::create_dir(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/in.csv"), "x\n").unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "escape.txt",
            "a1 > ../x\n",
            "escape.txt:1:6: bad output \"../x\"",
        ),
        (
            "absolute.txt",
            "a1\na2 > /etc/passwd\n",
            "absolute.txt:2:6: bad output",
        ),
        (
            "empty-part.txt",
            "a1 > a//b\n",
            "empty-part.txt:1:6: bad output",
        ),
        (
            "missing-input.txt",
            "a1 < data/in.csv\na2 < data/nope.csv\n",
            "missing-input.txt:2:6: cannot read input \"data/nope.csv\"",
        ),
        (
            "dir-input.txt",
            "a1 < data\n",
            "dir-input.txt:1:6: input \"data\"",
        ),
        (
            "undeclared.txt",
            "a1 > o\nb1 < @a1/p\n",
            "undeclared.txt:2:6: task a1 declares no output \"p\"",
        ),
    ];
    for (name, text, expected) in cases {
        std::fs::write(dir.join(name), text).unwrap();
        let out = run_in(dir.path(), &["run", name, "--discovery", "none"]);
        out.assert_code(2);
        assert!(
            out.stderr.contains(expected),
            "{name}: stderr does not contain {expected:?}\n{}",
            out.describe()
        );
    }
    // Inputs are relative to the task file's directory, not to the current one.
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("t.txt"), "a1 < ../data/in.csv\n").unwrap();
    let out = run_in(&sub, &["run", "t.txt", "--discovery", "none"]);
    assert!(
        !out.stderr.contains("cannot read input"),
        "{}",
        out.describe()
    );
    let out = run_in(dir.path(), &["run", "sub/t.txt", "--discovery", "none"]);
    assert!(
        !out.stderr.contains("cannot read input"),
        "{}",
        out.describe()
    );
}

/// A handler that prints its working directory (from `pwd` and `$P2P_TASK_DIR`) and what it
/// finds there, leaves a file, and fails for ids containing `fail`.
const WORK_HANDLER: &str = "a=pwd; echo \"$P2P_TASK_DIR\"; ls -A; echo x > left; \
                            case {id} in *fail*) exit 4;; esac";

/// The working directory an outcome's output names, checked to be the same from `pwd` and
/// `$P2P_TASK_DIR`, directly inside `root`, and empty when the handler looked.
fn work_dir_of(output: &str, root: &std::path::Path) -> std::path::PathBuf {
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "pwd, $P2P_TASK_DIR, an empty listing: {output:?}"
    );
    assert_eq!(lines[0], lines[1], "{output:?}");
    let dir = std::path::PathBuf::from(lines[0]);
    assert_eq!(
        dir.parent(),
        Some(root),
        "{} is not directly in {}",
        dir.display(),
        root.display()
    );
    dir
}

#[test]
fn every_attempt_runs_in_its_own_directory_under_the_data_directory_removed_afterwards() {
    let data = TestDir::new();
    let root = data.join("work");
    let s = Serve::types(
        "a",
        &[
            "--handler",
            WORK_HANDLER,
            "--capacity",
            "2",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2 a3 a4\n");
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--order",
            "none",
            "--peer",
            &s.peer(),
        ],
    );
    out.assert_code(0);
    let done = events_named(&out.json(), "task_completed")
        .into_iter()
        .map(|e| e["output"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(done.len(), 4, "{}", out.describe());
    let dirs: std::collections::HashSet<_> = done.iter().map(|o| work_dir_of(o, &root)).collect();
    assert_eq!(dirs.len(), 4, "four attempts, four directories: {done:?}");
    // Each saw an empty directory (nothing of the others'), and none is left.
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    // Nothing was written where the run or the node were started.
    assert!(!dir.join("left").exists());
}

#[test]
fn keep_work_keeps_a_failed_attempt_and_hostile_ids_stay_inside() {
    let data = TestDir::new();
    let root = data.join("work");
    let s = Serve::types(
        "a",
        &[
            "--handler",
            WORK_HANDLER,
            "--keep-work",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    let long = format!("a{}", "9".repeat(5000));
    let ids = [
        "a1",
        "a2fail",
        "../../x",
        "/",
        "..",
        "a/../../../fail",
        long.as_str(),
    ];
    for (seq, id) in ids.iter().enumerate() {
        c.send(&Message::Assign(Assign {
            seq: seq as u64 + 1,
            task: id.to_string(),
            kind: "a".into(),
            args: String::new(),
            attempt: 1,
            timeout_ms: 0,
        }))
        .unwrap();
        let m = c.expect_msg(WAIT, "Completed", |m| matches!(m, Message::Completed(_)));
        let Message::Completed(done) = m else {
            unreachable!()
        };
        let work = work_dir_of(&done.output, &root);
        let failed = id.contains("fail");
        assert_eq!(done.ok, !failed, "{id:?}: {done:?}");
        assert!(
            work.file_name().unwrap().len() < 100,
            "{id:?}: {}",
            work.display()
        );
        // A failed attempt's directory is kept with its files; the others are gone.
        assert_eq!(work.exists(), failed, "{id:?}: {}", work.display());
        if failed {
            assert_eq!(std::fs::read_dir(&work).unwrap().count(), 1, "{id:?}");
        }
    }
    // Nothing anywhere in the data directory but the work root (and the identity).
    let mut outside: Vec<String> = std::fs::read_dir(data.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "work" && !n.starts_with("identity"))
        .collect();
    outside.sort();
    assert!(outside.is_empty(), "{outside:?}");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        2,
        "the two failed ones"
    );
    // `../../x` did not reach above the data directory.
    assert!(!data.path().join("../x").exists() && !data.path().join("../../x").exists());
}
