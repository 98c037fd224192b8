//! Misbehaving peers against a real `serve` process: each bad connection is closed, alone,
//! and the node keeps serving real runs. Plus the handshake spoken by hand with
//! `p2p_core`'s codec.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use p2p_core::{Assign, Message, RejectReason, PROTOCOL_VERSION};
use tests::{hello, run_in, Received, Serve, TestDir, WireClient, WAIT};

/// A node serving `a` with a short handshake timeout.
fn server() -> Serve {
    Serve::types("a", &["--handshake-timeout", "1s"])
}

/// A real run of `a1 a2` against `s`, which must succeed.
fn assert_real_run_succeeds(dir: &TestDir, s: &mut Serve, when: &str) {
    let out = run_in(
        dir.path(),
        &["run", "tasks.txt", "--json", "--peer", &s.peer()],
    );
    out.assert_code(0);
    let done = out
        .json()
        .iter()
        .filter(|e| e["event"] == "task_completed")
        .count();
    assert_eq!(done, 2, "{when}: {}", out.describe());
    assert!(s.is_alive(), "{when}: the server process died");
}

/// The server must close `c`: a read ends in EOF or an error (not a timeout).
fn assert_dropped(c: &mut WireClient, what: &str, s: &Serve) {
    let me = c.stream.local_addr().unwrap().to_string();
    let mut seen = Vec::new();
    match c.wait_closed(WAIT, &mut seen) {
        Received::Eof | Received::Error(_) => {}
        other => panic!(
            "{what}: the server kept the connection open ({other:?}, messages {seen:?})\n\
             server log:\n{}",
            s.stderr.text()
        ),
    }
    assert!(
        !seen
            .iter()
            .any(|m| matches!(m, Message::Welcome(_) | Message::Assign(_))),
        "{what}: the server treated the connection as established: {seen:?}"
    );
    // The node's log says which peer it dropped.
    assert!(
        s.stderr.wait_for(WAIT, |l| l.contains(&me)).is_some(),
        "{what}: the server log never names the dropped peer {me}:\n{}",
        s.stderr.text()
    );
}

/// Runs the scenario: open a bad connection with `misbehave`, run for real while it is open,
/// check it gets dropped, run again, and check the server survived.
fn scenario(what: &str, misbehave: impl FnOnce(&mut WireClient)) {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let mut s = server();
    let mut bad = WireClient::connect(s.addr);
    misbehave(&mut bad);
    assert_real_run_succeeds(&dir, &mut s, &format!("during {what}"));
    assert_dropped(&mut bad, what, &s);
    assert_real_run_succeeds(&dir, &mut s, &format!("after {what}"));
    assert!(s.is_alive(), "the server died after {what}");
}

#[test]
fn garbage_bytes_are_dropped_and_the_node_keeps_serving() {
    scenario("garbage bytes", |c| {
        // A small, valid length prefix with a payload that is no message.
        let mut bytes = vec![0, 0, 0, 24];
        bytes.extend(std::iter::repeat_n(0xfe, 24));
        c.send_raw(&bytes).unwrap();
    });
}

#[test]
fn text_instead_of_frames_is_dropped_and_the_node_keeps_serving() {
    scenario("an HTTP request", |c| {
        c.send_raw(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
    });
}

#[test]
fn oversized_length_prefix_is_dropped_and_the_node_keeps_serving() {
    scenario("a 0xFFFFFFFF length prefix", |c| {
        // The claimed 4 GiB never follow; the node must refuse on the header alone.
        c.send_raw(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4]).unwrap();
    });
}

#[test]
fn hello_claiming_a_huge_string_is_dropped_and_the_node_keeps_serving() {
    scenario("a Hello whose cluster name claims 2^40 bytes", |c| {
        // Hello (variant 0), version 1, then a string length of 2^40 (varint 253 + u64 LE)
        // inside a 16-byte frame: the decoder must refuse it without allocating it.
        let mut payload = vec![0u8, 1, 253];
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        payload.extend_from_slice(b"abcde");
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&payload);
        c.send_raw(&frame).unwrap();
    });
}

#[test]
fn partial_frame_is_dropped_after_the_handshake_timeout() {
    scenario("a frame that never completes", |c| {
        // A header claiming 100 bytes, then only 3 of them: the node must not wait forever.
        c.send_raw(&[0, 0, 0, 100, 1, 2, 3]).unwrap();
    });
}

#[test]
fn silent_client_is_dropped_after_the_handshake_timeout() {
    scenario("a client that never sends Hello", |_| {});
}

#[test]
fn a_message_before_hello_is_dropped() {
    scenario("a Ping before Hello", |c| {
        c.send(&Message::Ping { nonce: 1 }).unwrap();
    });
}

#[test]
fn an_assignment_before_hello_is_not_run() {
    let dir = TestDir::new();
    let marker = dir.join("ran");
    let handler = format!("a=touch {}", tests::shell_quote(marker.to_str().unwrap()));
    let s = Serve::types("a", &["--handshake-timeout", "1s", "--handler", &handler]);
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Assign(Assign {
        seq: 1,
        task: "a1".into(),
        kind: "a".into(),
        args: String::new(),
        attempt: 1,
        timeout_ms: 0,
    }))
    .unwrap();
    assert_dropped(&mut c, "an Assign before Hello", &s);
    assert!(!marker.exists(), "the node ran a task before the handshake");
}

#[test]
fn hello_of_another_cluster_gets_a_reject() {
    let s = Serve::types("a,b", &["--handshake-timeout", "1s"]);
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("some-other-cluster")))
        .unwrap();
    let m = c.expect_msg(WAIT, "Reject", |m| matches!(m, Message::Reject(_)));
    let Message::Reject(r) = m else {
        unreachable!()
    };
    assert_eq!(r.reason, RejectReason::Cluster, "{r:?}");
    // After the Reject the node closes the connection.
    let mut seen = Vec::new();
    let end = c.wait_closed(WAIT, &mut seen);
    assert!(
        matches!(end, Received::Eof | Received::Error(_)),
        "connection stayed open after Reject: {end:?} {seen:?}"
    );
}

#[test]
fn hello_of_another_protocol_version_gets_a_reject() {
    let s = server();
    let mut c = WireClient::connect(s.addr);
    let mut h = hello("default");
    h.version = PROTOCOL_VERSION + 1;
    c.send(&Message::Hello(h)).unwrap();
    let m = c.expect_msg(WAIT, "Reject", |m| matches!(m, Message::Reject(_)));
    let Message::Reject(r) = m else {
        unreachable!()
    };
    assert_eq!(r.reason, RejectReason::Version, "{r:?}");
}

#[test]
fn valid_hello_gets_welcome_then_a_task_runs_and_goodbye_closes() {
    let s = Serve::types("b,a", &["--handshake-timeout", "1s", "--capacity", "3"]);
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    let m = c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    let Message::Welcome(w) = m else {
        unreachable!()
    };
    assert_eq!(w.version, PROTOCOL_VERSION);
    assert_eq!(w.cluster, "default");
    let mut types = w.types.clone();
    types.sort();
    assert_eq!(types, ["a", "b"], "{w:?}");
    assert_eq!(w.capacity, 3, "{w:?}");
    assert_eq!(
        Some(w.node_id.to_string()),
        s.node_id,
        "Welcome carries the node id serve printed"
    );

    // The handshake timeout no longer applies to an established connection: outlive it.
    std::thread::sleep(Duration::from_millis(1500));
    c.send(&Message::Assign(Assign {
        seq: 7,
        task: "a1".into(),
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
    assert_eq!(done.seq, 7);
    assert!(done.ok, "{done:?}");
    assert_eq!(done.output.trim(), "Executing task: a1");

    c.send(&Message::Goodbye).unwrap();
    c.expect_msg(WAIT, "GoodbyeAck", |m| matches!(m, Message::GoodbyeAck));
    let mut seen = Vec::new();
    let end = c.wait_closed(WAIT, &mut seen);
    assert!(
        matches!(end, Received::Eof),
        "expected a clean close after GoodbyeAck: {end:?} {seen:?}"
    );
}

/// A peer that assigns built-in tasks as fast as it can and never reads their results (the
/// serving process answers them inside its connection driver): the node stops reading
/// while its writes make no progress, so its memory stays bounded, drops the connection
/// after its idle bound, and keeps serving real runs.
#[test]
fn a_peer_that_floods_built_in_tasks_and_never_reads_is_dropped_with_bounded_memory() {
    use tokio_util::codec::Encoder;
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let mut s = Serve::types("a", &[]);
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    let Message::Welcome(w) = c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)))
    else {
        unreachable!()
    };
    assert!(
        w.capacity >= 1024,
        "the built-in handler's deep window: {w:?}"
    );
    // Bursts of assignments, never more in flight than the capacity if results were read;
    // bounded in count and time. A write that blocks for its 10 s timeout ends the flood.
    let mut codec = p2p_core::codec::FrameCodec::default();
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    'flood: while sent < 8u64 << 30 && started.elapsed() < Duration::from_secs(60) {
        let mut burst = bytes::BytesMut::new();
        for _ in 0..1000 {
            sent += 1;
            let a = Message::Assign(Assign {
                seq: sent,
                task: format!("a{sent}").into(),
                kind: "a".into(),
                args: String::new(),
                attempt: 1,
                timeout_ms: 0,
            });
            codec.encode(&a, &mut burst).unwrap();
        }
        if c.send_raw(&burst).is_err() {
            break 'flood;
        }
    }
    assert!(s.is_alive(), "the node died under the flood");
    let mut seen = Vec::new();
    let end = c.wait_closed(Duration::from_secs(60), &mut seen);
    assert!(
        matches!(end, Received::Eof | Received::Error(_)),
        "the node kept a peer that never reads ({sent} assignments sent): {end:?}"
    );
    let peak = tests::peak_rss_kb(s.pid()).unwrap_or(0);
    assert!(
        peak < 96 * 1024,
        "peak RSS {peak} kB after {sent} unread results: not bounded"
    );
    eprintln!(
        "{sent} assignments sent in {:?}; node peak RSS {peak} kB",
        started.elapsed()
    );
    assert_real_run_succeeds(&dir, &mut s, "after a peer that never reads");
}

/// Streams `bytes` of file chunks for transfers that do not exist to `s` over a new
/// connection that never reads (tiny chunks between full ones: each tiny one a slice of a
/// read buffer while it waits), bounded by 30 s; returns what was sent.
fn stream_chunks_of_no_transfer(s: &Serve, bytes: u64) -> u64 {
    use tokio_util::codec::Encoder;
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    let big = bytes::Bytes::from(vec![0x5a; 63 * 1024]);
    let tiny = bytes::Bytes::from_static(b"x");
    let mut codec = p2p_core::codec::FrameCodec::default();
    let started = std::time::Instant::now();
    let mut sent: u64 = 0;
    while sent < bytes && started.elapsed() < Duration::from_secs(30) {
        let mut burst = bytes::BytesMut::new();
        for i in 0..16u64 {
            let data = if i % 4 == 0 {
                tiny.clone()
            } else {
                big.clone()
            };
            sent += data.len() as u64;
            let chunk = Message::Transfer(Box::new(p2p_core::Transfer::Chunk {
                id: 7 + i % 2,
                offset: sent,
                data,
            }));
            codec.encode(&chunk, &mut burst).unwrap();
        }
        if c.send_raw(&burst).is_err() {
            break;
        }
    }
    sent
}

/// A peer that streams file chunks of no transfer and never reads: the node drops them,
/// its memory stays bounded whatever the volume (2 GiB sent, 16 times the bound): what
/// bounds it is the link's queue of 1,024 events, up to 64 MiB of chunks waiting, plus at
/// most 16 MiB of read buffers they hold; and a real run goes on.
#[test]
fn a_peer_that_streams_chunks_of_no_transfer_and_never_reads_keeps_memory_bounded() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let mut s = Serve::types("a", &[]);
    let sent = stream_chunks_of_no_transfer(&s, 2 << 30);
    let peak = tests::peak_rss_kb(s.pid()).unwrap_or(0);
    eprintln!("{} MiB of chunks; node peak RSS {peak} kB", sent >> 20);
    assert!(s.is_alive(), "the node died under the chunks");
    assert!(
        peak < 128 * 1024,
        "peak RSS {peak} kB after {sent} bytes of chunks: not bounded"
    );
    assert_real_run_succeeds(&dir, &mut s, "after a peer streamed chunks of no transfer");
}
