//! `p2p-node status`: live nodes asked over the protocol (README, "Watching a mesh").

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use p2p_core::codec::FrameCodec;
use p2p_core::Message;
use tests::{
    hello, json_lines, poll_until, run, run_in, shell_quote, spawn_in, Serve, TestDir, WAIT,
};
use tokio_util::codec::{Decoder, Encoder};

fn status(peers: &[&str], extra: &[&str]) -> tests::RunOutput {
    let mut args = vec!["status"];
    for p in peers {
        args.extend(["--peer", p]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn status_shows_what_live_nodes_run_and_ran() {
    let dir = TestDir::new();
    let marks = dir.join("marks");
    std::fs::create_dir(&marks).unwrap();
    let handler = format!(
        "s=touch {}/{{id}}; sleep 30",
        shell_quote(marks.to_str().unwrap())
    );
    let slow = Serve::types("s", &["--handler", &handler, "--capacity", "3"]);
    let quick = Serve::types("a,b", &[]);
    // Two tasks done on the quick node before.
    dir.write("quick.txt", "a1 b1\n");
    run_in(dir.path(), &["run", "quick.txt", "--peer", &quick.peer()]).assert_code(0);
    dir.write("slow.txt", "s1 s2\n");
    let running = spawn_in(
        dir.path(),
        &["run", "slow.txt", "--order", "none", "--peer", &slow.peer()],
    );
    assert!(
        poll_until(WAIT, || marks.join("s1").exists()
            && marks.join("s2").exists()),
        "{}",
        slow.stderr.text()
    );
    let out = status(&[&slow.peer(), &quick.peer()], &["--json"]);
    out.assert_code(0);
    let nodes = json_lines(&out.stdout);
    assert_eq!(nodes.len(), 2, "{}", out.describe());
    let by_addr = |addr: SocketAddr| {
        nodes
            .iter()
            .find(|n| n["addr"] == addr.to_string())
            .unwrap_or_else(|| panic!("no answer of {addr}: {}", out.describe()))
    };
    let s = by_addr(slow.addr);
    assert_eq!(s["id"], slow.node_id.clone().unwrap());
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["protocol"], p2p_core::PROTOCOL_VERSION);
    assert_eq!(s["types"], serde_json::json!(["s"]));
    assert_eq!(s["capacity"], 3);
    assert_eq!(s["running_total"], 2);
    assert_eq!(s["waiting"], 0);
    let mut ids: Vec<&str> = s["running"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["s1", "s2"]);
    for t in s["running"].as_array().unwrap() {
        assert_eq!(t["type"], "s");
        assert_eq!(t["coordinator"].as_str().unwrap().len(), 32, "{t}");
        assert!(t["running_ms"].as_u64().is_some());
    }
    assert_eq!(s["completed"], 0);
    assert!(s["uptime_s"].as_u64().is_some());
    assert_eq!(s["draining"], false);
    let q = by_addr(quick.addr);
    assert_eq!(q["id"], quick.node_id.clone().unwrap());
    assert_eq!(q["types"], serde_json::json!(["a", "b"]));
    assert_eq!(q["completed"], 2);
    assert_eq!(q["failed"], 0);
    assert_eq!(q["running_total"], 0);
    // For a person: one block per node.
    let out = status(&[&slow.peer()], &[]);
    out.assert_code(0);
    assert!(
        out.stdout.contains(&format!("at {}", slow.addr)),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout
            .contains("running 2, waiting 0, completed 0, failed 0"),
        "{}",
        out.describe()
    );
    assert!(out.stdout.contains("s1 (s) for "), "{}", out.describe());
    drop(running);
}

/// A fake node that accepts, then does `then` with the connection, for each of `n`
/// connections.
fn fake_node(then: fn(TcpStream)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().take(4).flatten() {
            std::thread::spawn(move || then(s));
        }
    });
    addr
}

/// Reads one frame from `s` with a fresh codec (bounded by the read timeout).
fn read_frame(s: &mut TcpStream, buf: &mut BytesMut) -> Option<Message> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut codec = FrameCodec::default();
    loop {
        if let Ok(Some(m)) = codec.decode(buf) {
            return Some(m);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn send(s: &mut TcpStream, m: &Message) {
    let mut out = BytesMut::new();
    FrameCodec::default().encode(m, &mut out).unwrap();
    let _ = s.write_all(&out);
}

#[test]
fn a_node_that_never_answers_or_answers_garbage_is_an_error_of_its_own() {
    let live = Serve::types("a", &[]);
    // Accepts and never says a word (the connection is held open).
    let silent = fake_node(|s| {
        std::thread::sleep(Duration::from_secs(30));
        drop(s);
    });
    // Answers with bytes that are not the protocol.
    let garbage = fake_node(|mut s| {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        std::thread::sleep(Duration::from_secs(5));
    });
    // An older node: a normal handshake, then it cannot read the status request and closes
    // (as a node whose protocol predates it fails to decode the message).
    let older = fake_node(|mut s| {
        let mut buf = BytesMut::new();
        let Some(Message::Hello(_)) = read_frame(&mut s, &mut buf) else {
            return;
        };
        let mut me = hello("default");
        me.types = vec!["a".into()];
        me.capacity = 1;
        send(&mut s, &Message::Welcome(me));
        let next = read_frame(&mut s, &mut buf);
        assert!(matches!(next, Some(Message::StatusRequest)), "{next:?}");
    });
    // A normal handshake, then it reads the request and never answers (nor pings).
    let mute = fake_node(|mut s| {
        let mut buf = BytesMut::new();
        let Some(Message::Hello(_)) = read_frame(&mut s, &mut buf) else {
            return;
        };
        let mut me = hello("default");
        me.capacity = 1;
        send(&mut s, &Message::Welcome(me));
        let _ = read_frame(&mut s, &mut buf);
        std::thread::sleep(Duration::from_secs(30));
    });
    let started = Instant::now();
    let out = status(
        &[
            &live.peer(),
            &silent.to_string(),
            &garbage.to_string(),
            &older.to_string(),
            &mute.to_string(),
        ],
        &["--json", "--answer-timeout", "1s"],
    );
    let took = started.elapsed();
    out.assert_code(1);
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 5, "{}", out.describe());
    let of = |addr: String| {
        lines
            .iter()
            .find(|l| l["addr"] == addr)
            .unwrap_or_else(|| panic!("nothing about {addr}: {}", out.describe()))
    };
    assert_eq!(of(live.peer())["id"], live.node_id.clone().unwrap());
    let silent_err = of(silent.to_string())["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(silent_err.contains("handshake"), "{silent_err}");
    assert!(
        of(garbage.to_string())["error"].is_string(),
        "{}",
        out.describe()
    );
    let older_err = of(older.to_string())["error"].as_str().unwrap().to_string();
    assert!(older_err.contains("older p2p-node"), "{older_err}");
    let mute_err = of(mute.to_string())["error"].as_str().unwrap().to_string();
    assert!(
        mute_err.contains("no answer to the status request after 1s"),
        "{mute_err}"
    );
    // Bounded by the handshake timeout (5 s), not the fake's 30 s silence.
    assert!(took < Duration::from_secs(25), "status took {took:?}");
    // Without --json, each unreachable node is one line on stderr, and the live one shows.
    let out = status(&[&live.peer(), &older.to_string()], &[]);
    out.assert_code(1);
    assert!(
        out.stdout.contains(&format!("at {}", live.addr)),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr
            .contains(&format!("{older}: the node closed the connection")),
        "{}",
        out.describe()
    );
}

#[test]
fn status_with_no_node_found_fails() {
    let out = status(&[], &["--discovery", "none"]);
    out.assert_code(1);
    assert!(out.stderr.contains("no node found"), "{}", out.describe());
}
