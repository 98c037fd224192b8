//! The bad inputs of docs/RELIABILITY.md's matrix that no other suite feeds to a live node:
//! peers that break the task rules after a correct handshake (over capacity, a seq reused,
//! work after goodbye, a type the node does not serve, a result nobody asked for), peers
//! that vanish mid-frame or go silent, random garbage on many connections, every kind of
//! broken task file, and a damaged journal. Each case checks what the node does and that it
//! keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use p2p_core::{Assign, Completed, Message};
use tests::{
    events_named, hello, poll_until, run_in, shell_quote, Received, Serve, TestDir, WireClient,
    WAIT,
};

/// A handler for type `a` that appends each task id to `log` and, for ids ending in `slow`,
/// then sleeps 5 s (long enough to still be running while the test misbehaves; the node
/// stops it when the connection closes).
fn logging_handler(log: &std::path::Path) -> String {
    format!(
        "a=echo {{id}} >> {}; case {{id}} in *slow) sleep 5;; esac",
        shell_quote(log.to_str().unwrap())
    )
}

fn assign(seq: u64, task: &str, kind: &str) -> Message {
    Message::Assign(Assign {
        task: task.into(),
        kind: kind.into(),
        ..p2p_core::testing::assign(seq)
    })
}

/// A client that completed the handshake with `s`.
fn established(s: &Serve) -> WireClient {
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    c
}

/// The node must close `c` (EOF or an error, not a timeout); returns what arrived first.
fn assert_dropped(c: &mut WireClient, what: &str, s: &Serve) -> Vec<Message> {
    let mut seen = Vec::new();
    let end = c.wait_closed(WAIT, &mut seen);
    assert!(
        matches!(end, Received::Eof | Received::Error(_)),
        "{what}: the node kept the connection open ({end:?}, {seen:?})\nnode log:\n{}",
        s.stderr.text()
    );
    seen
}

/// The node log must have a line containing every word of `words` (case-insensitive).
fn assert_logged(s: &Serve, words: &[&str], what: &str) {
    let found = s.stderr.wait_for(WAIT, |l| {
        let l = l.to_lowercase();
        words.iter().all(|w| l.contains(w))
    });
    assert!(
        found.is_some(),
        "{what}: no log line with {words:?}:\n{}",
        s.stderr.text()
    );
}

/// A real run of `a1 a2` against `s`, which must succeed.
fn assert_serves(s: &mut Serve, when: &str) {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &s.peer()],
    );
    out.assert_code(0);
    assert_eq!(
        events_named(&out.json(), "task_completed").len(),
        2,
        "{when}: {}",
        out.describe()
    );
    assert!(s.is_alive(), "{when}: the node died");
}

/// Waits until `log` has `n` lines (the handler started that many tasks).
fn wait_lines(dir: &TestDir, log: &str, n: usize) {
    assert!(
        poll_until(WAIT, || dir.read_lines(log).len() >= n),
        "the handler did not start {n} task(s): {:?}",
        dir.read_lines(log)
    );
}

#[test]
fn a_peer_over_the_nodes_capacity_is_dropped_and_its_extra_task_never_runs() {
    let dir = TestDir::new();
    let log = dir.join("ran.log");
    let mut s = Serve::types(
        "a",
        &["--capacity", "1", "--handler", &logging_handler(&log)],
    );
    let mut c = established(&s);
    c.send(&assign(1, "a1slow", "a")).unwrap();
    wait_lines(&dir, "ran.log", 1);
    c.send(&assign(2, "a2slow", "a")).unwrap();
    assert_dropped(&mut c, "a second task over capacity 1", &s);
    assert_logged(&s, &["capacity"], "over capacity");
    assert_eq!(dir.read_lines("ran.log"), ["a1slow"], "the extra task ran");
    assert_serves(&mut s, "after a peer over capacity");
}

#[test]
fn a_seq_reused_while_in_flight_is_dropped_and_the_second_task_never_runs() {
    let dir = TestDir::new();
    let log = dir.join("ran.log");
    let mut s = Serve::types(
        "a",
        &["--capacity", "4", "--handler", &logging_handler(&log)],
    );
    let mut c = established(&s);
    c.send(&assign(7, "a1slow", "a")).unwrap();
    wait_lines(&dir, "ran.log", 1);
    c.send(&assign(7, "a2slow", "a")).unwrap();
    assert_dropped(&mut c, "a duplicate seq", &s);
    assert_logged(&s, &["duplicate"], "duplicate seq");
    assert_eq!(dir.read_lines("ran.log"), ["a1slow"], "the duplicate ran");
    assert_serves(&mut s, "after a duplicate seq");
}

#[test]
fn an_assignment_after_goodbye_is_dropped_and_never_runs() {
    let dir = TestDir::new();
    let log = dir.join("ran.log");
    let mut s = Serve::types(
        "a",
        &["--capacity", "4", "--handler", &logging_handler(&log)],
    );
    let mut c = established(&s);
    c.send(&assign(1, "a1slow", "a")).unwrap();
    wait_lines(&dir, "ran.log", 1);
    c.send(&Message::Goodbye).unwrap();
    c.send(&assign(2, "a2", "a")).unwrap();
    assert_dropped(&mut c, "an Assign after Goodbye", &s);
    assert_logged(&s, &["after goodbye"], "work after goodbye");
    assert_eq!(
        dir.read_lines("ran.log"),
        ["a1slow"],
        "work after goodbye ran"
    );
    assert_serves(&mut s, "after work sent after goodbye");
}

#[test]
fn a_task_of_a_type_the_node_does_not_serve_fails_and_the_connection_goes_on() {
    let s = Serve::types("a", &[]);
    let mut c = established(&s);
    c.send(&assign(3, "z1", "z")).unwrap();
    let m = c.expect_msg(WAIT, "Completed", |m| matches!(m, Message::Completed(_)));
    let Message::Completed(done) = m else {
        unreachable!()
    };
    assert_eq!(done.seq, 3);
    assert!(!done.ok, "{done:?}");
    let why = done.error.clone().unwrap_or_default();
    assert!(
        why.contains("does not serve") && why.contains('z'),
        "the failure does not say the type is not served: {done:?}"
    );
    // The connection is still good for real work.
    c.send(&assign(4, "a1", "a")).unwrap();
    let m = c.expect_msg(WAIT, "Completed", |m| matches!(m, Message::Completed(_)));
    assert!(
        matches!(
            m,
            Message::Completed(Completed {
                seq: 4,
                ok: true,
                ..
            })
        ),
        "{m:?}"
    );
    c.send(&Message::Goodbye).unwrap();
    c.expect_msg(WAIT, "GoodbyeAck", |m| matches!(m, Message::GoodbyeAck));
}

#[test]
fn a_result_nobody_asked_for_is_ignored() {
    let s = Serve::types("a", &[]);
    let mut c = established(&s);
    c.send(&Message::Completed(Completed {
        seq: 99,
        ok: true,
        exit_code: Some(0),
        output: "forged".into(),
        error: None,
        duration_us: 1,
    }))
    .unwrap();
    c.send(&Message::Ping { nonce: 42 }).unwrap();
    c.expect_msg(WAIT, "Pong 42", |m| {
        matches!(m, Message::Pong { nonce: 42 })
    });
    c.send(&assign(1, "a1", "a")).unwrap();
    let m = c.expect_msg(WAIT, "Completed", |m| matches!(m, Message::Completed(_)));
    assert!(
        matches!(
            m,
            Message::Completed(Completed {
                seq: 1,
                ok: true,
                ..
            })
        ),
        "{m:?}"
    );
}

#[test]
fn peers_that_vanish_mid_frame_or_mid_handshake_leave_the_node_serving() {
    let mut s = Serve::types("a", &["--handshake-timeout", "2s"]);
    // Connect and close at once.
    drop(WireClient::connect(s.addr));
    // Half a frame, then close.
    let mut c = WireClient::connect(s.addr);
    c.send_raw(&[0, 0, 0, 40, 0, 1, 7]).unwrap();
    drop(c);
    // A whole Hello, then close before reading the Welcome.
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    drop(c);
    // Established, a task running, then gone without goodbye.
    let mut c = established(&s);
    c.send(&assign(1, "a1", "a")).unwrap();
    drop(c);
    assert_serves(&mut s, "after peers vanished");
}

#[test]
fn a_peer_that_goes_silent_after_the_handshake_is_dropped_at_the_idle_timeout() {
    let mut s = Serve::types("a", &[]);
    let mut c = established(&s);
    // Read (the node's pings arrive) but never answer or send anything: after the idle
    // timeout (10 s by default) the node declares the peer dead.
    let mut seen = Vec::new();
    let end = c.wait_closed(Duration::from_secs(40), &mut seen);
    assert!(
        matches!(end, Received::Eof | Received::Error(_)),
        "a silent peer was never dropped ({end:?})\nnode log:\n{}",
        s.stderr.text()
    );
    assert!(
        seen.iter().any(|m| matches!(m, Message::Ping { .. })),
        "the node sent no heartbeat before dropping the peer: {seen:?}"
    );
    assert_logged(&s, &["silent"], "idle timeout");
    assert_serves(&mut s, "after a silent peer");
}

#[test]
fn random_garbage_on_many_connections_never_takes_the_node_down() {
    let mut s = Serve::types("a", &["--handshake-timeout", "1s"]);
    // A deterministic xorshift: reproducible garbage without extra crates.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut clients = Vec::new();
    for i in 0..40 {
        let mut c = WireClient::connect(s.addr);
        let len = (next() % 300) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Every other connection starts like a frame, to reach the payload decoder.
        if i % 2 == 0 && bytes.len() >= 4 {
            let claimed = (next() % 64) as u32;
            bytes[..4].copy_from_slice(&claimed.to_be_bytes());
        }
        // The node may close before reading everything: a failed write is fine.
        let _ = c.send_raw(&bytes);
        clients.push(c);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let seen = assert_dropped(c, &format!("garbage connection {i}"), &s);
        assert!(
            !seen.iter().any(|m| matches!(m, Message::Welcome(_))),
            "garbage connection {i} was welcomed: {seen:?}"
        );
    }
    assert_serves(&mut s, "after 40 garbage connections");
}

#[test]
fn every_kind_of_broken_task_file_exits_2_naming_file_line_and_column() {
    let dir = TestDir::new();
    let cases: &[(&str, &[u8], &str)] = &[
        ("invalid-id.txt", b"a1 2b\n", "invalid-id.txt:1:4:"),
        ("duplicate.txt", b"a1\n a1\n", "duplicate.txt:2:2:"),
        (
            "unknown-dep.txt",
            b"a1\nb1 after z9\n",
            "unknown-dep.txt:2:10:",
        ),
        ("cycle.txt", b"a1 after b1\nb1 after a1\n", "cycle.txt:1:1:"),
        ("mixed-line.txt", b"a1 a2 after a1\n", "mixed-line.txt:1:4:"),
        ("empty-after.txt", b"a1\nb1 after\n", "empty-after.txt:2:4:"),
        ("not-utf8.txt", b"a1 b1\nc1 \xff\xfe\n", "not-utf8.txt:2:4:"),
        ("empty.txt", b"# nothing\n\n", "empty.txt: no tasks"),
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
}

/// The ids a journal records as succeeded.
fn journal_successes(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["status"] == "succeeded")
        .map(|v| v["task"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_damaged_journal_is_refused_naming_its_line_and_a_torn_last_line_is_ignored() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2 a3\n");
    let s = Serve::types("a", &[]);
    let journal = dir.join("run.journal");
    let j = journal.to_str().unwrap().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "tasks.txt", "--json", "--journal", &j, "--peer"];
        let peer = s.peer();
        args.push(&peer);
        args.extend_from_slice(extra);
        run_in(dir.path(), &args)
    };
    run(&[]).assert_code(0);
    let good = std::fs::read_to_string(&journal).unwrap();
    assert_eq!(journal_successes(&journal).len(), 3, "{good}");

    // A torn last line (a crash in the middle of a write) is ignored: nothing runs again.
    std::fs::write(&journal, format!("{good}{{\"task\":\"a")).unwrap();
    let out = run(&["--resume"]);
    out.assert_code(0);
    assert!(
        events_named(&out.json(), "task_assigned").is_empty(),
        "a resumed run re-ran finished tasks\n{}",
        out.describe()
    );

    // Garbage in the middle is refused, naming the journal and the line.
    let mut lines: Vec<&str> = good.lines().collect();
    lines.insert(2, "this is not json");
    std::fs::write(&journal, lines.join("\n") + "\n").unwrap();
    let out = run(&["--resume"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains(&format!("{j}:3")),
        "the refusal does not name {j}:3\n{}",
        out.describe()
    );

    // A file that is not a journal at all is refused too.
    std::fs::write(&journal, "hello\n").unwrap();
    let out = run(&["--resume"]);
    out.assert_code(2);
    assert!(
        out.stderr.contains(&format!("{j}:1")),
        "the refusal does not name {j}:1\n{}",
        out.describe()
    );
}

#[test]
fn a_connection_over_the_nodes_limit_is_closed_at_once_and_the_node_keeps_serving() {
    let mut s = Serve::types("a", &["--max-connections", "2"]);
    let first = established(&s);
    let second = established(&s);
    let mut third = WireClient::connect(s.addr);
    // Whatever it sends, the third connection is closed without a Welcome.
    let _ = third.send(&Message::Hello(hello("default")));
    let seen = assert_dropped(
        &mut third,
        "a third connection over --max-connections 2",
        &s,
    );
    assert!(
        !seen.iter().any(|m| matches!(m, Message::Welcome(_))),
        "the connection over the limit was welcomed: {seen:?}"
    );
    assert_logged(&s, &["connection limit"], "over the connection limit");
    // A freed place is taken again (once the node has seen the first one close).
    drop(first);
    assert!(
        poll_until(WAIT, || {
            let mut c = WireClient::connect(s.addr);
            let _ = c.send(&Message::Hello(hello("default")));
            matches!(
                c.recv(Duration::from_secs(2)),
                Received::Msg(Message::Welcome(_))
            )
        }),
        "no connection was accepted after one closed\n{}",
        s.stderr.text()
    );
    drop(second);
    assert_serves(&mut s, "after connections over the limit");
}
