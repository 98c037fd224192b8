//! Files that travel with tasks (#18): the `< IN` / `> OUT` clauses of the task file, checked
//! by `run` before anything starts, and the per-attempt working directories of shell
//! handlers on a serving node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use p2p_core::message::{AbortReason, PlacedFile, MAX_CHUNK};
use p2p_core::transfer::{hash_bytes, Received, Receiver, DEFAULT_WINDOW};
use p2p_core::{Assign, ContentHash, Message, Transfer};
use tests::{events_named, hello, run_in, Serve, SmallDisk, TestDir, WireClient, WAIT};

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
    let root = data.join("work/identity");
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

/// Waits until `dir` holds an entry; returns its path.
fn first_entry(dir: &std::path::Path) -> std::path::PathBuf {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(e) = std::fs::read_dir(dir).ok().and_then(|mut d| d.next()) {
            return e.unwrap().path();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing appeared in {}",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A `kill -9` of `serve` leaves its attempts' working directories; the next node of the
/// same slot of the data directory removes them when it starts (before: they stayed for
/// ever), and the directories of another live node sharing the data directory (its own
/// slot) are left alone, as is anything a link in them points to.
#[test]
fn a_restarted_node_sweeps_the_work_dirs_a_kill_9_left_and_only_its_own() {
    let data = TestDir::new();
    let outside = TestDir::new();
    outside.write("precious", "keep me");
    let link_to = outside.path().to_str().unwrap().to_owned();
    let handler = format!("a=mkdir -p sub && ln -s {link_to} sub/out && sleep 60");
    let node = || {
        Serve::types(
            "a",
            &[
                "--handler",
                handler.as_str(),
                "--data-dir",
                data.path().to_str().unwrap(),
            ],
        )
    };
    let start_task = |s: &Serve| {
        let mut c = WireClient::connect(s.addr);
        c.send(&Message::Hello(hello("default"))).unwrap();
        c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
        c.send(&Message::Assign(Assign {
            seq: 1,
            task: "a1".into(),
            kind: "a".into(),
            args: String::new(),
            attempt: 1,
            timeout_ms: 0,
        }))
        .unwrap();
        c
    };
    let mut a = node();
    let b = node();
    let (_ca, _cb) = (start_task(&a), start_task(&b));
    let (mine, theirs) = (data.join("work/identity"), data.join("work/identity-2"));
    let left = first_entry(&mine);
    let other = first_entry(&theirs);
    first_entry(&left.join("sub"));
    let status = std::process::Command::new("kill")
        .args(["-KILL", &a.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = a.wait_exit(WAIT);
    assert!(left.exists(), "a kill -9 leaves the directory");
    // The next node of the slot `identity` removes it before it listens.
    let again = node();
    assert!(!left.exists(), "{} is still there", left.display());
    assert_eq!(std::fs::read_dir(&mine).unwrap().count(), 0);
    assert!(other.exists(), "the live node's directory stays");
    assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"keep me");
    drop(again);
    drop(b);
}

#[test]
fn keep_work_keeps_a_failed_attempt_and_hostile_ids_stay_inside() {
    let data = TestDir::new();
    let root = data.join("work/identity");
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
            task: (*id).into(),
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
    // Nothing anywhere in the data directory but the work root (and the identity, the file
    // cache and the hosted runs' directory).
    let mut outside: Vec<String> = std::fs::read_dir(data.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "work" && n != "cache" && n != "runs" && !n.starts_with("identity"))
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

fn transfer(t: Transfer) -> Message {
    Message::Transfer(Box::new(t))
}

/// Waits for a transfer message `want` accepts (answering pings, skipping the rest).
fn expect_transfer(c: &mut WireClient, what: &str, want: impl Fn(&Transfer) -> bool) -> Transfer {
    let m = c.expect_msg(WAIT, what, |m| matches!(m, Message::Transfer(t) if want(t)));
    let Message::Transfer(t) = m else {
        unreachable!()
    };
    *t
}

/// Offers `data` as transfer `id` and sends it in 64 KiB chunks after the node's `Want`
/// (within its window: the files here are smaller than one window).
fn ship(c: &mut WireClient, id: u64, data: &[u8], hash: ContentHash) {
    c.send(&transfer(Transfer::Offer {
        id,
        hash,
        size: data.len() as u64,
    }))
    .unwrap();
    let want = expect_transfer(
        c,
        "Want",
        |t| matches!(t, Transfer::Want { id: i, .. } if *i == id),
    );
    let Transfer::Want { window, .. } = want else {
        unreachable!()
    };
    assert!(window as usize >= data.len(), "window {window}");
    for (k, piece) in data.chunks(MAX_CHUNK).enumerate() {
        c.send(&transfer(Transfer::Chunk {
            id,
            offset: (k * MAX_CHUNK) as u64,
            data: piece.to_vec().into(),
        }))
        .unwrap();
    }
}

fn assign_files(c: &mut WireClient, seq: u64, inputs: Vec<PlacedFile>, outputs: &[&str]) {
    c.send(&transfer(Transfer::Files {
        seq,
        inputs,
        outputs: outputs.iter().map(|o| o.to_string()).collect(),
    }))
    .unwrap();
    c.send(&Message::Assign(Assign {
        seq,
        task: format!("a{seq}").into(),
        kind: "a".into(),
        args: String::new(),
        attempt: 1,
        timeout_ms: 0,
    }))
    .unwrap();
}

fn completed(c: &mut WireClient, seq: u64) -> p2p_core::Completed {
    let m = c.expect_msg(
        WAIT,
        "Completed",
        |m| matches!(m, Message::Completed(d) if d.seq == seq),
    );
    let Message::Completed(done) = m else {
        unreachable!()
    };
    done
}

#[test]
fn a_node_takes_an_input_runs_its_task_on_it_and_serves_the_output_by_hash() {
    let data_dir = TestDir::new();
    let s = Serve::types(
        "a",
        &[
            "--handler",
            "a=tr a-z A-Z < in.txt > out.txt",
            "--max-file",
            "1MiB",
            "--data-dir",
            data_dir.path().to_str().unwrap(),
        ],
    );
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    // 200 KiB of text: four chunks.
    let input: Vec<u8> = (0..200 * 1024).map(|i| b"abcdefghij\n"[i % 11]).collect();
    let hash = hash_bytes(&input);
    ship(&mut c, 1, &input, hash);
    expect_transfer(&mut c, "Done", |t| matches!(t, Transfer::Done { id: 1 }));
    // The task runs on it; its output is announced before its result.
    assign_files(
        &mut c,
        1,
        vec![PlacedFile {
            name: "in.txt".into(),
            hash,
        }],
        &["out.txt"],
    );
    let produced = expect_transfer(&mut c, "Produced", |t| {
        matches!(t, Transfer::Produced { seq: 1, .. })
    });
    let done = completed(&mut c, 1);
    assert!(done.ok, "{done:?}\n{}", s.stderr.text());
    let Transfer::Produced { outputs, .. } = produced else {
        unreachable!()
    };
    let expected = input.to_ascii_uppercase();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].name, "out.txt");
    assert_eq!(outputs[0].size, expected.len() as u64);
    assert_eq!(outputs[0].hash, hash_bytes(&expected));
    // Fetched by hash, checked by the receiver state machine.
    let mut r = Receiver::new(
        2,
        outputs[0].hash,
        outputs[0].size,
        DEFAULT_WINDOW,
        u64::MAX,
    )
    .unwrap();
    c.send(&r.fetch()).unwrap();
    let mut got = Vec::new();
    while !r.is_complete() {
        let t = expect_transfer(&mut c, "a chunk", |t| {
            matches!(
                t,
                Transfer::Chunk { id: 2, .. } | Transfer::Abort { id: 2, .. }
            )
        });
        let Transfer::Chunk { offset, data, .. } = t else {
            panic!("fetch refused: {t:?}")
        };
        match r.on_chunk(offset, &data).unwrap() {
            Received::Write(b) | Received::Complete(b) => got.extend_from_slice(b),
        }
        if let Some(ack) = r.poll_ack() {
            c.send(&ack).unwrap();
        }
    }
    c.send(&r.done()).unwrap();
    assert_eq!(got, expected);
    // The same input again: the node has it, nothing is sent.
    c.send(&transfer(Transfer::Offer {
        id: 3,
        hash,
        size: input.len() as u64,
    }))
    .unwrap();
    expect_transfer(&mut c, "Have", |t| matches!(t, Transfer::Have { id: 3 }));
    // Bytes altered on the way: refused at the end, and never cached.
    let other: Vec<u8> = b"hello world\n".repeat(1000);
    let mut altered = other.clone();
    altered[500] ^= 0x20;
    ship(&mut c, 4, &altered, hash_bytes(&other));
    expect_transfer(&mut c, "Abort(HashMismatch)", |t| {
        matches!(
            t,
            Transfer::Abort {
                id: 4,
                reason: AbortReason::HashMismatch,
                ..
            }
        )
    });
    c.send(&transfer(Transfer::Offer {
        id: 5,
        hash: hash_bytes(&other),
        size: other.len() as u64,
    }))
    .unwrap();
    expect_transfer(&mut c, "Want (not cached)", |t| {
        matches!(t, Transfer::Want { id: 5, .. })
    });
    c.send(&transfer(Transfer::Abort {
        id: 5,
        reason: AbortReason::Cancelled,
        message: String::new(),
    }))
    .unwrap();
    // Over --max-file.
    c.send(&transfer(Transfer::Offer {
        id: 7,
        hash: ContentHash([7; 32]),
        size: 2 << 20,
    }))
    .unwrap();
    expect_transfer(&mut c, "Abort(TooLarge)", |t| {
        matches!(
            t,
            Transfer::Abort {
                id: 7,
                reason: AbortReason::TooLarge,
                ..
            }
        )
    });
    // An output outside the working directory, and an input the node does not have, fail
    // their tasks; the node serves on.
    assign_files(&mut c, 2, vec![], &["../evil"]);
    let done = completed(&mut c, 2);
    assert!(
        !done.ok
            && done
                .error
                .as_deref()
                .unwrap_or("")
                .contains("bad output name"),
        "{done:?}"
    );
    assign_files(
        &mut c,
        3,
        vec![PlacedFile {
            name: "in.txt".into(),
            hash: ContentHash([9; 32]),
        }],
        &[],
    );
    let done = completed(&mut c, 3);
    assert!(
        !done.ok
            && done
                .error
                .as_deref()
                .unwrap_or("")
                .contains("not on this node"),
        "{done:?}"
    );
    assert!(!data_dir.path().join("evil").exists() && !data_dir.join("../evil").exists());
    // A flood of offers: eight files come in at once, the rest are refused, not queued.
    for id in 100..120u64 {
        c.send(&transfer(Transfer::Offer {
            id,
            hash: ContentHash([id as u8; 32]),
            size: 10,
        }))
        .unwrap();
    }
    let (mut wants, mut refused) = (0, 0);
    while wants + refused < 20 {
        match expect_transfer(
            &mut c,
            "an answer to an offer",
            |t| matches!(t, Transfer::Want { id, .. } | Transfer::Abort { id, .. } if *id >= 100),
        ) {
            Transfer::Want { .. } => wants += 1,
            _ => refused += 1,
        }
    }
    assert_eq!((wants, refused), (8, 12));
    // A fetch of a hash the node does not have.
    c.send(&transfer(Transfer::Fetch {
        id: 8,
        hash: ContentHash([8; 32]),
        window: DEFAULT_WINDOW,
    }))
    .unwrap();
    expect_transfer(&mut c, "Abort(NotFound)", |t| {
        matches!(
            t,
            Transfer::Abort {
                id: 8,
                reason: AbortReason::NotFound,
                ..
            }
        )
    });
}

#[test]
fn run_ships_an_input_and_passes_an_artifact_across_two_nodes_into_results() {
    let (da, db) = (TestDir::new(), TestDir::new());
    let a = Serve::types(
        "a",
        &[
            "--handler",
            "a=tr a-z A-Z < in.txt > up.txt; echo shouted",
            "--data-dir",
            da.path().to_str().unwrap(),
        ],
    );
    let b = Serve::types(
        "b",
        &[
            "--handler",
            "b=mkdir -p n; wc -c < up.txt | tr -d ' ' > n/count.txt",
            "--data-dir",
            db.path().to_str().unwrap(),
        ],
    );
    let dir = TestDir::new();
    let input: String = "hello files\n".repeat(20_000); // 240,000 bytes: four chunks
    dir.write("in.txt", &input);
    dir.write(
        "tasks.txt",
        "a1 < in.txt > up.txt\nb1 < @a1/up.txt > n/count.txt\n",
    );
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--results",
            "out",
            "--peer",
            &a.peer(),
            "--peer",
            &b.peer(),
        ],
    );
    out.assert_code(0);
    let results = dir.join("out");
    let up = std::fs::read_to_string(results.join("a1/up.txt")).unwrap();
    assert_eq!(up, input.to_uppercase());
    let count = std::fs::read_to_string(results.join("b1/n/count.txt")).unwrap();
    assert_eq!(count.trim(), input.len().to_string());
    assert_eq!(
        std::fs::read_to_string(results.join("a1/stdout")).unwrap(),
        "shouted\n",
        "the whole stdout, as printed"
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(results.join("a1/meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["ok"], true);
    assert_eq!(meta["attempt"], 1);
    assert!(
        meta["node"].as_str().is_some_and(|n| n.len() >= 8),
        "{meta}"
    );
    assert_eq!(meta["outputs"][0]["name"], "up.txt");
    assert_eq!(
        meta["outputs"][0]["hash"],
        hash_bytes(input.to_uppercase().as_bytes()).to_hex()
    );
    // Without --results, declared outputs go to ./results/ID/.
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--peer", &a.peer(), "--peer", &b.peer()],
    );
    out.assert_code(0);
    assert_eq!(
        std::fs::read_to_string(dir.join("results/b1/n/count.txt"))
            .unwrap()
            .trim(),
        input.len().to_string()
    );
}

#[test]
fn an_input_shared_by_many_tasks_crosses_the_wire_once_per_node() {
    let data = TestDir::new();
    let s = Serve::types(
        "a",
        &[
            "--handler",
            "a=wc -c < shared.bin",
            "--capacity",
            "4",
            "-v",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let dir = TestDir::new();
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("shared.bin"), &bytes).unwrap();
    let tasks: String = (1..=12).map(|i| format!("a{i} < shared.bin\n")).collect();
    dir.write("tasks.txt", &tasks);
    for round in 0..2 {
        let out = run_in(
            dir.path(),
            &[
                "run",
                "tasks.txt",
                "--order",
                "none",
                "--json",
                "--peer",
                &s.peer(),
            ],
        );
        out.assert_code(0);
        for e in events_named(&out.json(), "task_completed") {
            assert_eq!(e["output"], "300000", "round {round}: {e}");
        }
    }
    // Twelve tasks, two runs: the file was received once; every other offer found it there.
    let log = s.stderr.text();
    assert_eq!(
        log.matches("input offered: receiving it").count(),
        1,
        "{log}"
    );
    assert!(
        log.matches("input offered: already here").count() >= 1,
        "{log}"
    );
}

/// `serve --link-inputs`: an input is a read-only hard link to the node's cached file (no
/// copy); a task that writes one anyway (root ignores the mode) fails, the cached file is
/// dropped, and the next task that needs it has it sent again, unchanged. Without the flag
/// each task gets a copy of its own.
#[test]
fn linked_inputs_are_read_only_links_and_a_task_that_writes_one_fails_and_drops_it() {
    let dir = TestDir::new();
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("in.bin"), &bytes).unwrap();
    dir.write("read.txt", "a1 < in.bin\n");
    dir.write("write.txt", "b1 < in.bin\n");
    dir.write("again.txt", "a2 < in.bin\n");
    // What a task sees: size, link count, mode.
    let see = "a=echo $(wc -c < in.bin) $(stat -c %h in.bin) $(stat -c %a in.bin)";
    let outputs = |s: &Serve, file: &str, code: i32| -> Vec<serde_json::Value> {
        let out = run_in(dir.path(), &["run", file, "--json", "--peer", &s.peer()]);
        out.assert_code(code);
        let json = out.json();
        events_named(&json, "task_completed")
            .into_iter()
            .chain(events_named(&json, "task_failed"))
            .cloned()
            .collect()
    };
    let data = TestDir::new();
    let linked = Serve::types(
        "a,b",
        &[
            "--handler",
            see,
            "--handler",
            "b=echo more >> in.bin",
            "--link-inputs",
            "-v",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let e = outputs(&linked, "read.txt", 0);
    assert_eq!(e.len(), 1, "{e:?}");
    // Three names of one file: the cache's, the attempt's own link beside its outputs (the
    // one checked afterwards), and the task's (a copy would be "1 600").
    assert_eq!(e[0]["output"], "300000 3 400", "{e:?}");
    let e = outputs(&linked, "write.txt", 1);
    let error = e[0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("the task wrote its input \"in.bin\""),
        "{e:?}"
    );
    let e = outputs(&linked, "again.txt", 0);
    assert_eq!(e[0]["output"], "300000 3 400", "{e:?}");
    let log = linked.stderr.text();
    assert_eq!(
        log.matches("input offered: receiving it").count(),
        2,
        "sent once, and again after it was dropped\n{log}"
    );
    // The node's cached copy is the input's bytes again.
    let name = hash_bytes(&bytes).to_hex();
    let cached: Vec<_> = walk(data.path())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == name.as_str()))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert_eq!(std::fs::read(&cached[0]).unwrap(), bytes);

    let data = TestDir::new();
    let copied = Serve::types(
        "a",
        &[
            "--handler",
            see,
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let e = outputs(&copied, "read.txt", 0);
    assert_eq!(e[0]["output"], "300000 1 600", "{e:?}");
}

/// `serve --link-inputs` with tasks that write a shared input running beside tasks that
/// read it, from two coordinators at once: no reader ever succeeds on bytes a writer
/// changed, and no writer succeeds. (A soak like this one, of release builds, found readers
/// that did: the node checked the file its cache named when the task was given its files,
/// while the task got a link made later, by then to a copy received again. That race is
/// too narrow to show here every time; node_files'
/// `a_linked_input_is_checked_as_the_task_had_it_whatever_the_cache_names_later` does.)
#[test]
fn with_linked_inputs_no_task_succeeds_on_bytes_another_task_wrote() {
    let dir = TestDir::new();
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(dir.join("s.bin"), &bytes).unwrap();
    let readers: String = (1..=8).map(|i| format!("c{i} < s.bin\n")).collect();
    let mixed: String = (1..=8)
        .map(|i| format!("c{i} < s.bin\nb{i} < s.bin\n"))
        .collect();
    dir.write("read.txt", &readers);
    dir.write("mixed.txt", &mixed);
    let data = TestDir::new();
    let s = Serve::types(
        "b,c",
        &[
            "--handler",
            "c=wc -c < s.bin",
            "--handler",
            "b=echo x >> s.bin",
            "--capacity",
            "4",
            "--link-inputs",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let (mut read_ok, mut wrote) = (0, 0);
    for _ in 0..10 {
        let runs: Vec<_> = ["read.txt", "mixed.txt"]
            .iter()
            .map(|f| {
                let results = format!("results-{f}");
                tests::spawn_in(
                    dir.path(),
                    &[
                        "run",
                        f,
                        "--order",
                        "none",
                        "--keep-going",
                        "--json",
                        "--results",
                        &results,
                        "--peer",
                        &s.peer(),
                    ],
                )
            })
            .collect();
        for r in runs {
            let out = r.finish();
            assert!(out.code() != Some(2), "{}", out.describe());
            let json = out.json();
            for e in events_named(&json, "task_completed") {
                let task = e["task"].as_str().unwrap_or_default();
                assert!(task.starts_with('c'), "a writer succeeded: {e}");
                assert_eq!(e["output"], "200000", "a reader saw written bytes: {e}");
                read_ok += 1;
            }
            // A writer fails: it wrote its input, or was not given it (a writer before
            // it changed the file), or the cache no longer had it.
            wrote += events_named(&json, "task_failed")
                .iter()
                .filter(|e| e["task"].as_str().unwrap_or_default().starts_with('b'))
                .count();
        }
    }
    assert!(
        read_ok > 0 && wrote == 80,
        "{read_ok} readers ok, {wrote} writers failed"
    );
}

/// The bytes `yes 0123456789abcdef | head -c LEN` prints.
fn yes_bytes(len: usize) -> Vec<u8> {
    b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// Runs `run ARGS` in `dir`, sampling its peak RSS (KiB) while it runs.
fn run_with_peak_rss(dir: &std::path::Path, args: &[&str]) -> (tests::RunOutput, u64) {
    let running = tests::spawn_in(dir, args);
    let pid = running.pid();
    let mut peak = 0;
    let sampler = std::thread::spawn(move || {
        while let Some(kb) = tests::peak_rss_kb(pid) {
            peak = peak.max(kb);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peak
    });
    let out = running.finish();
    (out, sampler.join().unwrap())
}

#[test]
fn a_50_mb_stdout_and_a_long_stderr_land_whole_in_results_with_both_sides_small() {
    const LEN: usize = 50 * 1024 * 1024;
    let data = TestDir::new();
    let s = Serve::types(
        "a",
        &[
            "--handler",
            &format!(
                "a=yes 0123456789abcdef | head -c {LEN}; \
                 i=0; while [ $i -lt 2000 ]; do echo \"err line $i\" >&2; i=$((i+1)); done"
            ),
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let (out, run_rss) = run_with_peak_rss(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--results",
            "out",
            "--peer",
            &s.peer(),
        ],
    );
    out.assert_code(0);
    let serve_rss = tests::peak_rss_kb(s.pid()).unwrap();
    let got = std::fs::read(dir.join("out/a1/stdout")).unwrap();
    assert_eq!(
        got.len(),
        LEN,
        "stdout is whole, not capped at --max-output"
    );
    let want = yes_bytes(LEN);
    assert!(got == want, "stdout has the bytes printed");
    let err = std::fs::read_to_string(dir.join("out/a1/stderr")).unwrap();
    let want_err: String = (0..2000).map(|i| format!("err line {i}\n")).collect();
    assert_eq!(err, want_err, "stderr is whole, not its 4 KiB tail");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/a1/meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["stdout"]["hash"], hash_bytes(&want).to_hex(), "{meta}");
    assert_eq!(meta["stdout"]["size"], LEN as u64, "{meta}");
    assert_eq!(meta["stderr"]["size"], want_err.len() as u64, "{meta}");
    // Streamed through both sides: neither holds the 50 MB.
    assert!(serve_rss < 40 * 1024, "serve peak RSS {serve_rss} KiB");
    assert!(run_rss < 40 * 1024, "run peak RSS {run_rss} KiB");
}

#[test]
fn max_result_size_cuts_a_stream_with_a_marker_and_a_failure_keeps_its_whole_stderr() {
    let data = TestDir::new();
    let s = Serve::types(
        "a",
        &[
            "--handler",
            "a=yes 0123456789abcdef | head -c 5000; \
             i=0; while [ $i -lt 1000 ]; do echo \"e$i\" >&2; i=$((i+1)); done; \
             case {id} in a2) exit 3;; esac",
            "--max-result-size",
            "3000",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\na2\n");
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--results",
            "out",
            "--keep-going",
            "--peer",
            &s.peer(),
        ],
    );
    assert_ne!(out.code(), Some(0), "{}", out.describe());
    let got = std::fs::read(dir.join("out/a1/stdout")).unwrap();
    let mut want = yes_bytes(3000);
    want.extend_from_slice(b"\n[truncated at 3000 bytes by --max-result-size]\n");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
    // The failed task's stderr: its first 3000 bytes, not only the end in the error.
    let err = std::fs::read_to_string(dir.join("out/a2/stderr")).unwrap();
    assert!(err.starts_with("e0\ne1\ne2\n"), "{err}");
    assert!(err.ends_with("by --max-result-size]\n"), "{err}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/a2/meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["ok"], false, "{meta}");
    assert_eq!(meta["exit_code"], 3, "{meta}");
}

#[test]
fn resume_keeps_a_success_whose_outputs_are_there_as_recorded_and_reruns_one_altered_or_gone() {
    let data = TestDir::new();
    let dir = TestDir::new();
    let counts = dir.join("counts");
    std::fs::create_dir(&counts).unwrap();
    let s = Serve::types(
        "a,b",
        &[
            "--handler",
            &format!("a=echo made > o.txt; echo x >> {}/{{id}}", counts.display()),
            "--handler",
            &format!(
                "b=wc -c < o.txt > p.txt; echo x >> {}/{{id}}",
                counts.display()
            ),
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    dir.write("tasks.txt", "a1 > o.txt\nb1 < @a1/o.txt > p.txt\n");
    let runs = |id: &str| {
        std::fs::read_to_string(counts.join(id))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let go = |resume: bool| {
        let mut args = vec![
            "run",
            "tasks.txt",
            "--results",
            "out",
            "--journal",
            "j.jsonl",
            "--peer",
        ];
        let peer = s.peer();
        args.push(&peer);
        if resume {
            args.push("--resume");
        }
        let out = run_in(dir.path(), &args);
        out.assert_code(0);
        out
    };
    go(false);
    assert_eq!((runs("a1"), runs("b1")), (1, 1));
    let journal = std::fs::read_to_string(dir.join("j.jsonl")).unwrap();
    assert!(
        journal.contains(&hash_bytes(b"made\n").to_hex()),
        "the journal records a1's output hash:\n{journal}"
    );
    // Everything there as recorded: nothing runs again.
    go(true);
    assert_eq!((runs("a1"), runs("b1")), (1, 1));
    // a1's output altered: a1 runs again (and its output is restored); b1's is intact.
    std::fs::write(dir.join("out/a1/o.txt"), "tampered\n").unwrap();
    let out = go(true);
    assert!(
        out.stderr.contains("was altered: it runs again"),
        "{}",
        out.describe()
    );
    assert_eq!((runs("a1"), runs("b1")), (2, 1));
    assert_eq!(
        std::fs::read_to_string(dir.join("out/a1/o.txt")).unwrap(),
        "made\n"
    );
    // b1's output gone: b1 runs again.
    std::fs::remove_file(dir.join("out/b1/p.txt")).unwrap();
    let out = go(true);
    assert!(out.stderr.contains("is gone"), "{}", out.describe());
    assert_eq!((runs("a1"), runs("b1")), (2, 2));
    assert_eq!(
        std::fs::read_to_string(dir.join("out/b1/p.txt"))
            .unwrap()
            .trim(),
        "5"
    );
    // And once more, all there: nothing runs.
    go(true);
    assert_eq!((runs("a1"), runs("b1")), (2, 2));
}

/// The `error` of every `task_retry` event.
fn retry_errors(events: &[serde_json::Value]) -> Vec<String> {
    events_named(events, "task_retry")
        .iter()
        .map(|e| e["error"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn a_full_disk_on_a_node_fails_the_attempt_saying_so_and_it_is_retried_on_another() {
    let root = TestDir::new();
    let Some(disk) = SmallDisk::mount_or_skip(root.path(), "3m") else {
        return;
    };
    let roomy = TestDir::new();
    let handlers = [
        "--handler",
        "a=wc -c < x.bin",
        "--handler",
        "b=yes 0123456789abcdef | head -c 4000000",
    ];
    let node = |data: &std::path::Path, capacity: &str| {
        let mut args: Vec<&str> = handlers.to_vec();
        args.extend(["--capacity", capacity, "--data-dir", data.to_str().unwrap()]);
        Serve::types("a,b", &args)
    };
    let full = node(&disk.dir, "4");
    let other = node(roomy.path(), "1");
    let dir = TestDir::new();
    let mut tasks = String::new();
    for i in 1..=4 {
        // 4 MB inputs, each its own (no cache hit), on a 3 MiB disk.
        std::fs::create_dir(dir.join(&format!("in{i}"))).unwrap();
        let bytes: Vec<u8> = (0..4_000_000u32)
            .map(|k| (k * (i + 1) % 251) as u8)
            .collect();
        std::fs::write(dir.join(&format!("in{i}/x.bin")), &bytes).unwrap();
        tasks.push_str(&format!("a{i} < in{i}/x.bin\n"));
    }
    dir.write("a.txt", &tasks);
    // 4 MB of stdout each, kept whole under --results.
    dir.write("b.txt", "b1\nb2\nb3\nb4\n");
    for (file, why) in [
        ("a.txt", "cannot store the file: No space left on device"),
        (
            "b.txt",
            "cannot keep the task's stdout on this node: No space left on device",
        ),
    ] {
        let out = run_in(
            dir.path(),
            &[
                "run",
                file,
                "--order",
                "none",
                "--json",
                "--retries",
                "1",
                "--results",
                "out",
                "--peer",
                &full.peer(),
                "--peer",
                &other.peer(),
            ],
        );
        out.assert_code(0);
        let events = out.json();
        let errors = retry_errors(&events);
        assert!(
            !errors.is_empty() && errors.iter().all(|e| e.contains(why)),
            "{file}: every attempt on the full node fails saying {why:?}: {errors:?}\n{}",
            out.describe()
        );
        for e in events_named(&events, "task_completed") {
            assert_eq!(e["node"], other.node_id.clone().unwrap_or_default(), "{e}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("out/a3/stdout")).unwrap(),
        "4000000\n"
    );
    assert_eq!(
        std::fs::metadata(dir.join("out/b2/stdout")).unwrap().len(),
        4_000_000
    );
    // The full node left nothing half-written behind.
    let partial = disk.dir.join("cache");
    let leftovers: Vec<_> = walk(&partial)
        .into_iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "partial") && p.is_file())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A failed attempt that filled a node's small disk leaves its cut stdout in the cache
/// (the coordinator fetches a failure's streams). The cache's 1 GiB default is far more
/// than this 3 MiB disk has, so no size rule ever evicts it: before the cache dropped
/// unused files for a nearly full disk, every later attempt failed ("cannot keep the
/// task's stdout ... No space left on device") until the node was restarted.
#[test]
fn a_disk_filled_by_a_failed_attempt_costs_cached_copies_not_every_later_attempt() {
    let root = TestDir::new();
    let Some(disk) = SmallDisk::mount_or_skip(root.path(), "3m") else {
        return;
    };
    let node = Serve::types(
        "a,b",
        &[
            "--handler",
            "a=echo hi",
            "--handler",
            "b=yes 0123456789abcdef | head -c 4000000",
            "--data-dir",
            disk.dir.to_str().unwrap(),
        ],
    );
    let dir = TestDir::new();
    dir.write("b.txt", "b1\n");
    dir.write("a.txt", "a1\na2\n");
    let run = |file: &str, results: &str| {
        run_in(
            dir.path(),
            &[
                "run",
                file,
                "--json",
                "--results",
                results,
                "--peer",
                &node.peer(),
            ],
        )
    };
    let out = run("b.txt", "out-b");
    out.assert_code(1);
    let events = out.json();
    let failed = events_named(&events, "task_failed");
    assert!(
        failed.len() == 1
            && failed[0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("No space left on device")),
        "{}",
        out.describe()
    );
    for _ in 0..2 {
        let out = run("a.txt", "out-a");
        out.assert_code(0);
        assert_eq!(
            std::fs::read_to_string(dir.join("out-a/a2/stdout")).unwrap(),
            "hi\n"
        );
    }
    let log = node.stderr.text();
    assert!(
        log.contains("cached files no task uses were dropped"),
        "{log}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn a_node_killed_mid_transfer_loses_the_attempt_and_the_task_succeeds_on_another() {
    let (da, db) = (TestDir::new(), TestDir::new());
    let node = |data: &TestDir| {
        Serve::types(
            "a",
            &[
                "--handler",
                "a=wc -c < big.bin",
                "-v",
                "--data-dir",
                data.path().to_str().unwrap(),
            ],
        )
    };
    let mut nodes = [node(&da), node(&db)];
    let dir = TestDir::new();
    const LEN: usize = 64 * 1024 * 1024;
    let bytes: Vec<u8> = (0..LEN).map(|k| (k % 253) as u8).collect();
    std::fs::write(dir.join("big.bin"), &bytes).unwrap();
    drop(bytes);
    dir.write("tasks.txt", "a1 < big.bin\n");
    // The run reaches each node through a proxy; the first connection to carry 8 MiB
    // towards its node (the input, 64 MiB) is held still there, and that node is killed:
    // it had an eighth of the file at most, however fast the machine.
    let gate = tests::proxy::StallGate::new(8 * 1024 * 1024);
    let proxies = [0, 1].map(|i| tests::proxy::StallProxy::start(nodes[i].addr, i, gate.clone()));
    let (pa, pb) = (proxies[0].addr.to_string(), proxies[1].addr.to_string());
    let running = tests::spawn_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &pa, "--peer", &pb],
    );
    let victim = gate
        .stalled_within(WAIT)
        .unwrap_or_else(|| panic!("no node received 8 MiB of the input"));
    let offered = |s: &Serve| s.stderr.text().contains("input offered: receiving it");
    assert!(
        tests::poll_until(WAIT, || offered(&nodes[victim])),
        "{}",
        nodes[victim].stderr.text()
    );
    let status = std::process::Command::new("kill")
        .args(["-KILL", &nodes[victim].pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = running.finish();
    out.assert_code(0);
    let events = out.json();
    let done = events_named(&events, "task_completed");
    assert_eq!(done.len(), 1, "{}", out.describe());
    assert_eq!(done[0]["output"], LEN.to_string());
    let survivor = &nodes[1 - victim];
    assert_eq!(
        done[0]["node"],
        survivor.node_id.clone().unwrap_or_default()
    );
    // The victim had not received the whole file: it never ran the task.
    assert!(
        !nodes[victim].stderr.text().contains("task assigned"),
        "{}",
        nodes[victim].stderr.text()
    );
    let _ = nodes[victim].is_alive();
}

/// Plays a node of type `a` that runs nothing: for an `Assign` it announces the output
/// `o.txt` with the hash of `good`, reports success, and answers a `Fetch` with `evil`
/// (the same length); `size`, if given, is the size it announces instead of the true one.
/// Returns its port, and a thread that returns how many fetches came.
fn lying_node(
    good: &'static [u8],
    evil: &'static [u8],
    size: Option<u64>,
) -> (u16, std::thread::JoinHandle<usize>) {
    use bytes::BytesMut;
    use p2p_core::codec::FrameCodec;
    use tokio_util::codec::{Decoder, Encoder};
    assert_eq!(good.len(), evil.len());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + WAIT;
        let mut fetches = 0;
        let Ok((mut stream, _)) = listener.accept() else {
            return 0;
        };
        stream
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let send = |stream: &mut std::net::TcpStream, codec: &mut FrameCodec, m: Message| {
            let mut out = BytesMut::new();
            codec.encode(&m, &mut out).unwrap();
            let _ = std::io::Write::write_all(stream, &out);
        };
        'conn: while std::time::Instant::now() < deadline {
            while let Ok(Some(m)) = codec.decode(&mut buf) {
                let m = match tests::fake_node_answer(&mut stream, &mut codec, m) {
                    tests::FakeNode::Answered => continue,
                    tests::FakeNode::Goodbye => break 'conn,
                    tests::FakeNode::Other(m) => m,
                };
                match m {
                    Message::Assign(a) => {
                        let produced = Transfer::Produced {
                            seq: a.seq,
                            outputs: vec![p2p_core::message::ProducedFile {
                                name: "o.txt".into(),
                                hash: hash_bytes(good),
                                size: size.unwrap_or(good.len() as u64),
                            }],
                        };
                        send(&mut stream, &mut codec, transfer(produced));
                        let mut c = p2p_core::testing::completed(a.seq);
                        c.ok = true;
                        c.output = "done".into();
                        send(&mut stream, &mut codec, Message::Completed(c));
                    }
                    Message::Transfer(t) => {
                        if let Transfer::Fetch { id, .. } = *t {
                            fetches += 1;
                            let chunk = Transfer::Chunk {
                                id,
                                offset: 0,
                                data: evil.to_vec().into(),
                            };
                            send(&mut stream, &mut codec, transfer(chunk));
                        }
                    }
                    _ => {}
                }
            }
            if !read_more(&mut stream, &mut buf, 4096) {
                break;
            }
        }
        fetches
    });
    (port, handle)
}

#[test]
fn an_output_served_with_wrong_bytes_fails_the_attempt_and_never_lands_in_results() {
    let (port, node) = lying_node(b"the real output\n", b"a forged output\n", None);
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 > o.txt\n");
    let peer = format!("127.0.0.1:{port}");
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--results",
            "out",
            "--peer",
            &peer,
        ],
    );
    out.assert_code(1);
    let events = out.json();
    let failed = events_named(&events, "task_failed");
    assert_eq!(failed.len(), 1, "{}", out.describe());
    let error = failed[0]["error"].as_str().unwrap();
    assert!(
        error.contains("o.txt") && error.to_lowercase().contains("hash"),
        "{error}"
    );
    assert!(node.join().unwrap() >= 1, "the output was fetched");
    // Neither the forged bytes nor a temporary file of them are in the results.
    let landed: Vec<_> = walk(&dir.join("out"))
        .into_iter()
        .filter(|p| p.is_file())
        .filter(|p| std::fs::read(p).is_ok_and(|b| b == b"a forged output\n"))
        .collect();
    assert!(landed.is_empty(), "{landed:?}");
    assert!(!dir.join("out/a1/o.txt").exists());
    let names: Vec<String> = walk(&dir.join("out"))
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".fetch-")), "{names:?}");
}

/// `run --max-file`: an output announced larger than the bound fails the attempt before
/// anything is fetched (before, `run` took whatever size a node announced: a node could
/// fill the coordinator's disk), whatever the node claims, and the bound is the flag's.
#[test]
fn an_output_announced_over_run_max_file_fails_the_attempt_before_any_fetch() {
    for (announced, extra, limit) in [
        (Some(1u64 << 40), None, "4294967296"),
        (None, Some("10"), "10"),
    ] {
        let (port, node) = lying_node(b"the real output\n", b"the real output\n", announced);
        let dir = TestDir::new();
        dir.write("tasks.txt", "a1 > o.txt\n");
        let peer = format!("127.0.0.1:{port}");
        let mut args = vec![
            "run",
            "tasks.txt",
            "--json",
            "--results",
            "out",
            "--peer",
            &peer,
        ];
        if let Some(max) = extra {
            args.extend(["--max-file", max]);
        }
        let out = run_in(dir.path(), &args);
        out.assert_code(1);
        let events = out.json();
        let failed = events_named(&events, "task_failed");
        assert_eq!(failed.len(), 1, "{}", out.describe());
        let error = failed[0]["error"].as_str().unwrap();
        assert!(
            error.contains("o.txt") && error.contains("--max-file") && error.contains(limit),
            "{error}"
        );
        assert_eq!(node.join().unwrap(), 0, "nothing was fetched");
        assert!(!dir.join("out/a1/o.txt").exists());
    }
}

#[test]
fn a_full_results_disk_leaves_no_cut_stdout_or_meta_behind() {
    let root = TestDir::new();
    let Some(disk) = SmallDisk::mount_or_skip(root.path(), "64k") else {
        return;
    };
    let data = TestDir::new();
    // A cache too small for the whole stdout: the node keeps no streams, and the run writes
    // the result's capped output (1 MiB) itself, onto a 64 KiB disk.
    let s = Serve::types(
        "a",
        &[
            "--handler",
            "a=yes | head -c 1000000",
            "--cache-size",
            "512KiB",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1\n");
    let results = disk.dir.join("out");
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--results",
            results.to_str().unwrap(),
            "--peer",
            &s.peer(),
        ],
    );
    assert_ne!(out.code(), Some(0), "{}", out.describe());
    // No stdout rather than a cut one; a meta.json, if one fitted, is whole.
    if let Ok(bytes) = std::fs::read(results.join("a1/stdout")) {
        panic!("stdout was left cut at {} bytes", bytes.len());
    }
    if let Ok(text) = std::fs::read_to_string(results.join("a1/meta.json")) {
        let meta: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("meta.json is cut ({e}): {text:?}"));
        assert_eq!(meta["ok"], false, "{meta}");
    }
}

/// A field of `/proc/PID/status` (e.g. `Threads`, `VmRSS`), as a number.
fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Attacks on the receiving side (ATTACKS.md): peers that announce many large files and
/// send nothing, a size over `--max-file`, a chunk sent twice, one out of order, a
/// corrupted one. Each bad transfer is refused with an `Abort`, the writer threads stay at
/// most `MAX_WRITERS` (16) however many files are announced and go when the peers do,
/// nothing is left in the cache's `partial/`, and the node still takes a good file.
#[test]
fn hostile_offers_cost_the_node_bounded_threads_and_bad_chunks_are_refused() {
    let data = TestDir::new();
    let s = Serve::types(
        "a",
        &[
            "--max-file",
            "64GiB",
            "--cache-size",
            "64GiB",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let pid = s.pid();
    let connect = || {
        let mut c = WireClient::connect(s.addr);
        c.send(&Message::Hello(hello("default"))).unwrap();
        c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
        c
    };
    let threads_before = proc_status(pid, "Threads");
    // 4 peers announce 8 files of 4 GiB each and send nothing.
    let mut idle: Vec<WireClient> = Vec::new();
    for p in 0..4u64 {
        let mut c = connect();
        for k in 0..8u64 {
            let id = p * 100 + k + 1;
            c.send(&transfer(Transfer::Offer {
                id,
                hash: hash_bytes(&id.to_le_bytes()),
                size: 4 << 30,
            }))
            .unwrap();
            expect_transfer(
                &mut c,
                "Want",
                |t| matches!(t, Transfer::Want { id: i, .. } if *i == id),
            );
        }
        idle.push(c);
    }
    let threads = proc_status(pid, "Threads");
    assert!(
        threads <= threads_before + 16,
        "{threads} threads, {threads_before} before 32 offers"
    );
    let mut c = connect();
    let aborted = |c: &mut WireClient, id: u64| {
        expect_transfer(
            c,
            "Abort",
            |t| matches!(t, Transfer::Abort { id: i, .. } if *i == id),
        )
    };
    // Over --max-file.
    c.send(&transfer(Transfer::Offer {
        id: 1,
        hash: hash_bytes(b"x"),
        size: u64::MAX,
    }))
    .unwrap();
    aborted(&mut c, 1);
    let file: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 241) as u8).collect();
    let hash = hash_bytes(&file);
    let offer = |c: &mut WireClient, id: u64| {
        c.send(&transfer(Transfer::Offer {
            id,
            hash,
            size: file.len() as u64,
        }))
        .unwrap();
        expect_transfer(
            c,
            "Want",
            |t| matches!(t, Transfer::Want { id: i, .. } if *i == id),
        );
    };
    let chunk = |c: &mut WireClient, id: u64, offset: usize, data: Vec<u8>| {
        c.send(&transfer(Transfer::Chunk {
            id,
            offset: offset as u64,
            data: data.into(),
        }))
        .unwrap();
    };
    // A chunk twice.
    offer(&mut c, 2);
    chunk(&mut c, 2, 0, file[..MAX_CHUNK].to_vec());
    chunk(&mut c, 2, 0, file[..MAX_CHUNK].to_vec());
    aborted(&mut c, 2);
    // Out of order.
    offer(&mut c, 3);
    chunk(
        &mut c,
        3,
        MAX_CHUNK,
        file[MAX_CHUNK..2 * MAX_CHUNK].to_vec(),
    );
    aborted(&mut c, 3);
    // One byte changed.
    offer(&mut c, 4);
    let mut bad = file.clone();
    bad[150_000] ^= 1;
    for (k, piece) in bad.chunks(MAX_CHUNK).enumerate() {
        chunk(&mut c, 4, k * MAX_CHUNK, piece.to_vec());
    }
    let Transfer::Abort { reason, .. } = aborted(&mut c, 4) else {
        unreachable!()
    };
    assert_eq!(reason, AbortReason::HashMismatch);
    // One byte changed in a file large enough for a writer thread, which hashes it: refused
    // the same way once its last byte is written.
    let large: Vec<u8> = (0..3 * 1024 * 1024 + 777u32)
        .map(|i| (i % 239) as u8)
        .collect();
    let mut bad = large.clone();
    bad[large.len() - 1000] ^= 1;
    ship(&mut c, 6, &bad, hash_bytes(&large));
    let Transfer::Abort { reason, .. } = aborted(&mut c, 6) else {
        unreachable!()
    };
    assert_eq!(reason, AbortReason::HashMismatch);
    // A good one still lands.
    ship(&mut c, 5, &file, hash);
    expect_transfer(&mut c, "Done", |t| matches!(t, Transfer::Done { id: 5 }));
    // The peers leave: their writer threads end and their partial files go.
    drop(idle);
    drop(c);
    let deadline = std::time::Instant::now() + WAIT;
    let partial = walk(&data.join("cache"))
        .into_iter()
        .filter(|p| p.is_file() && p.parent().is_some_and(|d| d.ends_with("partial")));
    let mut left = partial.count();
    while (left > 0 || proc_status(pid, "Threads") > threads_before)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
        left = walk(&data.join("cache"))
            .into_iter()
            .filter(|p| p.is_file() && p.parent().is_some_and(|d| d.ends_with("partial")))
            .count();
    }
    assert_eq!(left, 0, "partial files left");
    assert!(proc_status(pid, "Threads") <= threads_before);
    eprintln!(
        "threads {threads_before} -> {threads} with 32 offers; VmHWM {} kB",
        proc_status(pid, "VmHWM")
    );
}

/// A capacity-1 node of type `a` running `handler` (which writes `out.bin`), and a wire
/// client that ran task 1 on it: the node's data directory, the node, the client, and
/// the outputs it announced.
fn serve_an_output(
    handler: &str,
) -> (
    TestDir,
    Serve,
    WireClient,
    Vec<p2p_core::message::ProducedFile>,
) {
    let data_dir = TestDir::new();
    let s = Serve::types(
        "a",
        &[
            "--handler",
            handler,
            "--capacity",
            "1",
            "--data-dir",
            data_dir.path().to_str().unwrap(),
        ],
    );
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    assign_files(&mut c, 1, vec![], &["out.bin"]);
    let produced = expect_transfer(&mut c, "Produced", |t| {
        matches!(t, Transfer::Produced { seq: 1, .. })
    });
    let done = completed(&mut c, 1);
    assert!(done.ok, "{done:?}\n{}", s.stderr.text());
    let Transfer::Produced { outputs, .. } = produced else {
        unreachable!()
    };
    (data_dir, s, c, outputs)
}

/// A credit larger than the link's command queue holds in chunks (a receiver may give any
/// window): the node sends the whole file, never drops the transfer half way without a
/// word (its pump dropped it when the queue was full, and the fetcher waited for ever).
#[test]
fn a_fetch_with_a_credit_larger_than_the_command_queue_gets_the_whole_output() {
    const LEN: usize = 24 * 1024 * 1024;
    let (_data_dir, _s, mut c, outputs) =
        serve_an_output(&format!("a=yes 0123456789abcdef | head -c {LEN} > out.bin"));
    let expected = yes_bytes(LEN);
    assert_eq!(outputs[0].hash, hash_bytes(&expected));
    // A credit of the whole file and more: about 400 chunks at once, three times what a
    // capacity-1 link's queue holds. This receiver never needs to Ack within the file.
    let window = 64 * 1024 * 1024;
    for round in 0..2u64 {
        let id = 10 + round;
        let mut r = Receiver::new(id, outputs[0].hash, outputs[0].size, window, u64::MAX).unwrap();
        c.send(&r.fetch()).unwrap();
        let mut got = Vec::with_capacity(LEN);
        while !r.is_complete() {
            let t = expect_transfer(&mut c, "a chunk", |t| {
                matches!(
                    t,
                    Transfer::Chunk { id: i, .. } | Transfer::Abort { id: i, .. } if *i == id
                )
            });
            let Transfer::Chunk { offset, data, .. } = t else {
                panic!("fetch refused: {t:?}")
            };
            match r.on_chunk(offset, &data).unwrap() {
                Received::Write(b) | Received::Complete(b) => got.extend_from_slice(b),
            }
            if let Some(ack) = r.poll_ack() {
                c.send(&ack).unwrap();
            }
        }
        c.send(&r.done()).unwrap();
        assert!(got == expected, "round {round}: the output arrived altered");
    }
}

/// A fake node that wants every offered input with `window` bytes of credit, keeps what
/// arrives (checked against the offer's hash: `Done`, else `Abort`), and answers each
/// assignment with a success. Returns the inputs it received whole.
fn greedy_node(window: u32) -> (u16, std::thread::JoinHandle<Vec<Vec<u8>>>) {
    use bytes::BytesMut;
    use p2p_core::codec::FrameCodec;
    use tokio_util::codec::{Decoder, Encoder};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + WAIT;
        let mut got = Vec::new();
        let Ok((mut stream, _)) = listener.accept() else {
            return got;
        };
        stream
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let send = |stream: &mut std::net::TcpStream, codec: &mut FrameCodec, m: Message| {
            let mut out = BytesMut::new();
            codec.encode(&m, &mut out).unwrap();
            let _ = std::io::Write::write_all(stream, &out);
        };
        let mut incoming: std::collections::HashMap<u64, (Receiver, Vec<u8>)> = Default::default();
        'conn: while std::time::Instant::now() < deadline {
            while let Ok(Some(m)) = codec.decode(&mut buf) {
                let m = match tests::fake_node_answer(&mut stream, &mut codec, m) {
                    tests::FakeNode::Answered => continue,
                    tests::FakeNode::Goodbye => break 'conn,
                    tests::FakeNode::Other(m) => m,
                };
                match m {
                    Message::Assign(a) => {
                        let mut c = p2p_core::testing::completed(a.seq);
                        c.ok = true;
                        c.output = "done".into();
                        send(&mut stream, &mut codec, Message::Completed(c));
                    }
                    Message::Transfer(t) => match *t {
                        Transfer::Offer { id, hash, size } => {
                            let r = Receiver::new(id, hash, size, window, u64::MAX).unwrap();
                            send(&mut stream, &mut codec, r.want());
                            incoming.insert(id, (r, Vec::new()));
                        }
                        Transfer::Chunk { id, offset, data } => {
                            let Some((r, bytes)) = incoming.get_mut(&id) else {
                                continue;
                            };
                            match r.on_chunk(offset, &data) {
                                Ok(Received::Write(b)) => bytes.extend_from_slice(b),
                                Ok(Received::Complete(b)) => {
                                    bytes.extend_from_slice(b);
                                    let (r, bytes) = incoming.remove(&id).unwrap();
                                    send(&mut stream, &mut codec, r.done());
                                    got.push(bytes);
                                    continue;
                                }
                                Err(e) => {
                                    incoming.remove(&id);
                                    let abort = Transfer::Abort {
                                        id,
                                        reason: AbortReason::Io,
                                        message: e.to_string(),
                                    };
                                    send(&mut stream, &mut codec, transfer(abort));
                                    continue;
                                }
                            }
                            if let Some(ack) = r.poll_ack() {
                                send(&mut stream, &mut codec, ack);
                            }
                        }
                        Transfer::Abort { id, .. } => {
                            incoming.remove(&id);
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
            if !read_more(&mut stream, &mut buf, 64 * 1024) {
                break;
            }
        }
        got
    });
    (port, handle)
}

/// The coordinator's side of the same: a node that gives an input a credit of more chunks
/// than the link's command queue holds gets the whole input (the coordinator's pump failed
/// the attempt, saying the connection had closed).
#[test]
fn an_input_wanted_with_a_credit_larger_than_the_command_queue_arrives_whole() {
    const LEN: usize = 24 * 1024 * 1024;
    let (port, node) = greedy_node(64 * 1024 * 1024);
    let dir = TestDir::new();
    let bytes: Vec<u8> = (0..LEN as u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(dir.join("big.bin"), &bytes).unwrap();
    dir.write("tasks.txt", "a1 < big.bin\n");
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--retries",
            "0",
            "--peer",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let got = node.join().unwrap();
    out.assert_code(0);
    assert_eq!(got.len(), 1, "inputs received whole: {}", got.len());
    assert!(got[0] == bytes, "the input arrived altered");
}

/// A fake peer's read: appends what `stream` has (at most `most` bytes) to `buf`; a read
/// timeout is no error. Returns `false` once the peer closed or the connection failed.
fn read_more(stream: &mut std::net::TcpStream, buf: &mut bytes::BytesMut, most: usize) -> bool {
    let mut chunk = vec![0u8; most];
    match std::io::Read::read(stream, &mut chunk) {
        Ok(0) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// A fetcher that gives a credit of 4 GiB for a 256 MiB output and then never reads: the
/// node holds no more than its connection's chunk queue of it (file ranges, not bytes),
/// keeps serving another peer meanwhile, and closes that connection once its idle timeout
/// passes (the fetcher gets EOF with the file cut short).
#[test]
fn a_fetcher_that_never_reads_costs_the_node_a_bounded_queue_and_its_connection() {
    use std::io::Read;
    const LEN: usize = 256 * 1024 * 1024;
    let (_data_dir, s, mut c, outputs) =
        serve_an_output(&format!("a=head -c {LEN} /dev/zero > out.bin"));
    let pid = s.pid();
    let mut r = Receiver::new(5, outputs[0].hash, outputs[0].size, u32::MAX, u64::MAX).unwrap();
    c.send(&r.fetch()).unwrap();
    // From here the fetcher reads nothing. Another peer's task still runs at once.
    let started = std::time::Instant::now();
    let mut other = WireClient::connect(s.addr);
    other.send(&Message::Hello(hello("default"))).unwrap();
    other.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    assign_files(&mut other, 2, vec![], &[]);
    assert!(completed(&mut other, 2).ok, "{}", s.stderr.text());
    // Read nothing until the node has had time to give up on this connection (its idle
    // timeout, 10 s), then take what the sockets held: EOF comes before the whole file.
    std::thread::sleep(std::time::Duration::from_secs(12).saturating_sub(started.elapsed()));
    let hwm_kib = proc_status(pid, "VmHWM");
    c.stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let (mut got, mut buf) = (0usize, vec![0u8; 1 << 16]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let eof = loop {
        assert!(std::time::Instant::now() < deadline, "no EOF within 60 s");
        match c.stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got += n,
            Err(_) => break false,
        }
    };
    assert!(eof, "the connection was not closed");
    assert!(
        got < LEN,
        "the whole file came ({got} bytes): the fetcher was not given up"
    );
    assert!(
        hwm_kib < 64 * 1024,
        "the node's peak RSS {hwm_kib} KiB: it held the file in memory"
    );
    let _ = r.poll_ack();
    eprintln!(
        "received {got} bytes before EOF, {:?} after the fetch; node VmHWM {hwm_kib} kB",
        started.elapsed()
    );
}
