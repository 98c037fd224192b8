//! Files that travel with tasks (#18): the `< IN` / `> OUT` clauses of the task file, checked
//! by `run` before anything starts, and the per-attempt working directories of shell
//! handlers on a serving node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tests::{run_in, TestDir};

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
