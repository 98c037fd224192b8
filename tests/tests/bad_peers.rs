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
/// read buffer while it waits), bounded by 30 s and stopping when a write fails; returns
/// what was sent, and the connection.
fn stream_chunks_of_no_transfer(s: &Serve, bytes: u64) -> (u64, WireClient) {
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
    (sent, c)
}

/// The node's peak memory under a chunk flood may reach this: its own (8 MiB in a release
/// build, about 18 in a debug one) plus about one credit window (4 MiB) of chunks, its
/// writer's batches (3 MiB) and the read buffers chunks within the credit may hold, with
/// margin. Measured: 8.5 MB (chunks of no transfer) and 13.0 MB (past the credit) in a
/// release build, 19.8 MB and 26.1 MB in a debug one. Before the connection kept chunks to
/// the credit, a flood filled the link's whole queue of 1,024 events (up to 64 MiB of
/// chunks) and the read buffers they pinned: 71 MB and 33 MB in a release build.
const FLOOD_PEAK_KB: u64 = 40 * 1024;

/// Waits until the node logs that it dropped the connection `c` for a chunk: the line
/// names the peer and what it did.
fn assert_dropped_for(c: &mut WireClient, s: &Serve, what: &str, reason: &str) {
    let me = c.stream.local_addr().unwrap().to_string();
    let mut seen = Vec::new();
    let end = c.wait_closed(WAIT, &mut seen);
    assert!(
        matches!(end, Received::Eof | Received::Error(_)),
        "{what}: the node kept the connection ({end:?})"
    );
    assert!(
        s.stderr
            .wait_for(WAIT, |l| l.contains(&me) && l.contains(reason))
            .is_some(),
        "{what}: the node never logged {reason:?} for {me}:\n{}",
        s.stderr.text()
    );
}

/// A peer that streams file chunks of no transfer and never reads: the node closes the
/// connection at the first (a chunk of a transfer it never asked for is a protocol
/// violation), so its memory never grows with them; and a real run goes on.
#[test]
fn a_peer_that_streams_chunks_of_no_transfer_and_never_reads_keeps_memory_bounded() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let mut s = Serve::types("a", &[]);
    let (sent, mut c) = stream_chunks_of_no_transfer(&s, 2 << 30);
    assert_dropped_for(&mut c, &s, "chunks of no transfer", "did not ask for");
    let peak = tests::peak_rss_kb(s.pid()).unwrap_or(0);
    eprintln!("{} MiB of chunks; node peak RSS {peak} kB", sent >> 20);
    assert!(s.is_alive(), "the node died under the chunks");
    assert!(
        sent < 1 << 30,
        "the node took {sent} bytes of chunks nobody asked for"
    );
    assert!(
        peak < FLOOD_PEAK_KB,
        "peak RSS {peak} kB after {sent} bytes of chunks: not bounded"
    );
    assert_real_run_succeeds(&dir, &mut s, "after a peer streamed chunks of no transfer");
}

/// Connects to `s`, says Hello, offers a file of `size` bytes as transfer `id` and waits
/// for the node's `Want`; returns the connection and the window it gave.
fn offered(s: &Serve, id: u64, size: u64) -> (WireClient, u32) {
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    let hash = p2p_core::transfer::hash_bytes(&id.to_le_bytes());
    c.send(&Message::Transfer(Box::new(p2p_core::Transfer::Offer {
        id,
        hash,
        size,
    })))
    .unwrap();
    let m = c.expect_msg(WAIT, "Want", |m| {
        matches!(m, Message::Transfer(t) if matches!(**t, p2p_core::Transfer::Want { id: i, .. } if i == id))
    });
    let Message::Transfer(t) = m else {
        unreachable!()
    };
    let p2p_core::Transfer::Want { window, .. } = *t else {
        unreachable!()
    };
    (c, window)
}

fn chunk_frame(
    codec: &mut p2p_core::codec::FrameCodec,
    id: u64,
    offset: u64,
    data: bytes::Bytes,
) -> bytes::BytesMut {
    use tokio_util::codec::Encoder;
    let mut out = bytes::BytesMut::new();
    let chunk = Message::Transfer(Box::new(p2p_core::Transfer::Chunk { id, offset, data }));
    codec.encode(&chunk, &mut out).unwrap();
    out
}

/// A peer that offers a file, is given the node's credit, then streams the file's chunks
/// in order as fast as it can (far more than the file it announced) and never reads the
/// node's acknowledgements: what the node holds of it is bounded by the credit (about one
/// window), not by the link's queue; the node closes the connection once the peer goes
/// past the credit (or past the file, then past the credit left), and keeps serving.
#[test]
fn a_peer_that_streams_past_its_credit_and_never_reads_is_dropped_with_memory_bounded() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let mut s = Serve::types("a", &[]);
    let size: u64 = 256 << 20;
    let (mut c, window) = offered(&s, 7, size);
    assert!(u64::from(window) < size);
    let big = bytes::Bytes::from(vec![0x5a; 63 * 1024]);
    let mut codec = p2p_core::codec::FrameCodec::default();
    let started = std::time::Instant::now();
    let mut sent: u64 = 0;
    'flood: while sent < 2 << 30 && started.elapsed() < Duration::from_secs(30) {
        let mut burst = bytes::BytesMut::new();
        for _ in 0..16 {
            burst.extend_from_slice(&chunk_frame(&mut codec, 7, sent, big.clone()));
            sent += big.len() as u64;
        }
        if c.send_raw(&burst).is_err() {
            break 'flood;
        }
    }
    let me = c.stream.local_addr().unwrap().to_string();
    let mut seen = Vec::new();
    let end = c.wait_closed(WAIT, &mut seen);
    assert!(
        matches!(end, Received::Eof | Received::Error(_)),
        "the node kept a peer past its credit ({sent} bytes sent): {end:?}"
    );
    assert!(
        s.stderr
            .wait_for(WAIT, |l| l.contains(&me)
                && (l.contains("beyond the credit")
                    || l.contains("did not ask for")))
            .is_some(),
        "the node never logged the chunk over its credit for {me}:\n{}",
        s.stderr.text()
    );
    let peak = tests::peak_rss_kb(s.pid()).unwrap_or(0);
    eprintln!(
        "{} MiB of chunks sent against a {size}-byte offer, window {window}; node peak RSS {peak} kB",
        sent >> 20
    );
    assert!(s.is_alive(), "the node died under the chunks");
    assert!(
        peak < FLOOD_PEAK_KB,
        "peak RSS {peak} kB after {sent} bytes of chunks: not bounded by the credit"
    );
    assert_real_run_succeeds(&dir, &mut s, "after a peer streamed past its credit");
}

/// A chunk far beyond any credit the node could have given (the node acknowledges as it
/// writes, so only a chunk past the file's whole window is over for sure), and one just
/// inside it: the first closes the connection, the second does not.
#[test]
fn a_chunk_far_beyond_the_credit_closes_the_connection_and_one_inside_does_not() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let mut s = Serve::types("a", &[]);
    let size: u64 = 64 << 20;
    let mut codec = p2p_core::codec::FrameCodec::default();
    // Just inside: the last 100 bytes of the first window, sent first (out of order: the
    // node gives that transfer up, and the connection stays).
    let (mut inside, window) = offered(&s, 1, size);
    let w = u64::from(window);
    let frame = chunk_frame(&mut codec, 1, w - 100, bytes::Bytes::from(vec![1; 100]));
    inside.send_raw(&frame).unwrap();
    let m = inside.expect_msg(WAIT, "Abort", |m| {
        matches!(m, Message::Transfer(t) if matches!(**t, p2p_core::Transfer::Abort { id: 1, .. }))
    });
    assert!(matches!(m, Message::Transfer(_)));
    // Just outside: a chunk ending one byte past the window, as the first.
    let (mut outside, _) = offered(&s, 2, size);
    let frame = chunk_frame(&mut codec, 2, w - 99, bytes::Bytes::from(vec![1; 100]));
    outside.send_raw(&frame).unwrap();
    assert_dropped_for(
        &mut outside,
        &s,
        "a chunk past the credit",
        "beyond the credit",
    );
    // At a huge offset.
    let (mut huge, _) = offered(&s, 3, size);
    let frame = chunk_frame(
        &mut codec,
        3,
        u64::MAX - 10,
        bytes::Bytes::from(vec![1; 100]),
    );
    huge.send_raw(&frame).unwrap();
    assert_dropped_for(
        &mut huge,
        &s,
        "a chunk at a huge offset",
        "beyond the credit",
    );
    // The connection whose chunk was inside still works.
    inside.send(&Message::Ping { nonce: 42 }).unwrap();
    inside.expect_msg(WAIT, "Pong", |m| matches!(m, Message::Pong { nonce: 42 }));
    assert_real_run_succeeds(&dir, &mut s, "after chunks beyond the credit");
}

/// A transfer the node opened to one peer is no other peer's: chunks of its id from a
/// second connection close that connection only, and the first one's file still arrives.
#[test]
fn a_chunk_for_a_transfer_the_node_opened_to_another_peer_drops_only_that_peer() {
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let mut s = Serve::types("a", &[]);
    let file: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 251) as u8).collect();
    let hash = p2p_core::transfer::hash_bytes(&file);
    let mut owner = WireClient::connect(s.addr);
    owner.send(&Message::Hello(hello("default"))).unwrap();
    owner.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    owner
        .send(&Message::Transfer(Box::new(p2p_core::Transfer::Offer {
            id: 9,
            hash,
            size: file.len() as u64,
        })))
        .unwrap();
    owner.expect_msg(WAIT, "Want", |m| {
        matches!(m, Message::Transfer(t) if matches!(**t, p2p_core::Transfer::Want { id: 9, .. }))
    });
    let mut codec = p2p_core::codec::FrameCodec::default();
    let mut thief = WireClient::connect(s.addr);
    thief.send(&Message::Hello(hello("default"))).unwrap();
    thief.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    let frame = chunk_frame(&mut codec, 9, 0, bytes::Bytes::from(vec![0; 1000]));
    thief.send_raw(&frame).unwrap();
    assert_dropped_for(
        &mut thief,
        &s,
        "a chunk of another peer's transfer",
        "did not ask for",
    );
    for (k, piece) in file.chunks(64 * 1024).enumerate() {
        let frame = chunk_frame(
            &mut codec,
            9,
            (k * 64 * 1024) as u64,
            bytes::Bytes::copy_from_slice(piece),
        );
        owner.send_raw(&frame).unwrap();
    }
    owner.expect_msg(
        WAIT,
        "Done",
        |m| matches!(m, Message::Transfer(t) if matches!(**t, p2p_core::Transfer::Done { id: 9 })),
    );
    assert_real_run_succeeds(&dir, &mut s, "after a chunk of another peer's transfer");
}
