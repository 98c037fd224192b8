//! Protocol versioning against live processes (docs/PROTOCOL.md, "Versioning"): a node of
//! protocol version N meeting a node of version N+1 gets a clear rejection, never a confused
//! session, in both directions; and a message kind a later version might add closes that
//! one connection while the node keeps serving everyone else.
//!
//! The "future" peer is played by hand with `p2p_core`'s codec: a `Hello` of version N+1 with
//! fields appended after the ones version N knows, and frames whose variant index is past
//! the last message of version N.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use p2p_core::codec::FrameCodec;
use p2p_core::{Assign, Message, Reject, RejectReason, PROTOCOL_VERSION};
use tests::{events_named, hello, run_in, Received, Serve, TestDir, WireClient, WAIT};
use tokio_util::codec::{Decoder, Encoder};

/// Fields a version N+1 might append to its `Hello`: a string and a number (bincode
/// encoding: varint length + bytes, varint).
const FUTURE_FIELDS: &[u8] = b"\x04zstd\xfb\x00\x01";

/// The frame of `msg` with `tail` appended to its payload.
fn frame_with_tail(msg: &Message, tail: &[u8]) -> Vec<u8> {
    let mut payload = BytesMut::new();
    p2p_core::wire::encode_into(msg, &mut payload).unwrap();
    payload.put_slice(tail);
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    frame
}

/// A frame whose payload starts with variant index `index` (a bincode varint) and carries
/// some fields after it, as a message kind of a later version would.
fn unknown_kind_frame(index: u32) -> Vec<u8> {
    let mut payload = Vec::new();
    if index < 251 {
        payload.push(index as u8);
    } else {
        payload.push(251);
        payload.extend_from_slice(&(index as u16).to_le_bytes());
    }
    payload.extend_from_slice(b"\x07\x05hello\x00");
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    frame
}

/// The node must close `c`: a read ends in EOF or an error, with no `Welcome` before.
fn assert_closed_without_welcome(c: &mut WireClient, what: &str, s: &Serve) -> Vec<Message> {
    let mut seen = Vec::new();
    let end = c.wait_closed(WAIT, &mut seen);
    assert!(
        matches!(end, Received::Eof | Received::Error(_)),
        "{what}: the connection stayed open ({end:?}, messages {seen:?})\nnode log:\n{}",
        s.stderr.text()
    );
    assert!(
        !seen
            .iter()
            .any(|m| matches!(m, Message::Welcome(_) | Message::Assign(_))),
        "{what}: the node treated the connection as established: {seen:?}"
    );
    seen
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
    let done = events_named(&out.json(), "task_completed").len();
    assert_eq!(done, 2, "{when}: {}", out.describe());
    assert!(s.is_alive(), "{when}: the node died");
}

/// A client that completed the handshake with `s`.
fn established(s: &Serve) -> WireClient {
    let mut c = WireClient::connect(s.addr);
    c.send(&Message::Hello(hello("default"))).unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    c
}

#[test]
fn a_hello_of_the_next_version_with_appended_fields_gets_a_clear_reject() {
    let mut s = Serve::types("a", &["--handshake-timeout", "2s"]);
    let mut c = WireClient::connect(s.addr);
    let mut h = hello("default");
    h.version = PROTOCOL_VERSION + 1;
    c.send_raw(&frame_with_tail(&Message::Hello(h), FUTURE_FIELDS))
        .unwrap();
    let m = c.expect_msg(WAIT, "Reject", |m| {
        matches!(m, Message::Reject(_) | Message::Welcome(_))
    });
    let Message::Reject(r) = m else {
        panic!(
            "a Hello of version {} was welcomed: {m:?}",
            PROTOCOL_VERSION + 1
        )
    };
    assert_eq!(r.reason, RejectReason::Version, "{r:?}");
    // The message names both versions, for the operator of the newer node.
    let (next, ours) = (
        (PROTOCOL_VERSION + 1).to_string(),
        PROTOCOL_VERSION.to_string(),
    );
    assert!(
        r.message.contains(&next) && r.message.contains(&ours),
        "the rejection does not name both versions: {:?}",
        r.message
    );
    assert_closed_without_welcome(&mut c, "after Reject(Version)", &s);
    assert_serves(&mut s, "after a Hello of the next version");
}

#[test]
fn a_hello_of_this_version_with_appended_fields_is_welcomed() {
    // The other half of the rule: appended fields alone do not break a handshake.
    let s = Serve::types("a", &["--handshake-timeout", "2s"]);
    let mut c = WireClient::connect(s.addr);
    c.send_raw(&frame_with_tail(
        &Message::Hello(hello("default")),
        FUTURE_FIELDS,
    ))
    .unwrap();
    c.expect_msg(WAIT, "Welcome", |m| matches!(m, Message::Welcome(_)));
    c.send(&Message::Ping { nonce: 11 }).unwrap();
    c.expect_msg(WAIT, "Pong 11", |m| {
        matches!(m, Message::Pong { nonce: 11 })
    });
}

#[test]
fn an_unknown_message_kind_after_the_handshake_closes_that_connection_only() {
    let mut s = Serve::types("a", &["--handshake-timeout", "2s", "--capacity", "2"]);
    // Index 17 is the first after Load, Transfer, Hosted and Replica (version 3); 300 takes a
    // multi-byte varint.
    for index in [17u32, 300] {
        let mut other = established(&s);
        let mut future = established(&s);
        future.send_raw(&unknown_kind_frame(index)).unwrap();
        let mut seen = Vec::new();
        let end = future.wait_closed(WAIT, &mut seen);
        assert!(
            matches!(end, Received::Eof | Received::Error(_)),
            "variant {index}: the connection stayed open ({end:?}, {seen:?})\nnode log:\n{}",
            s.stderr.text()
        );
        // The other connection is untouched: it still gets its tasks run and its pings
        // answered.
        other.send(&Message::Ping { nonce: 5 }).unwrap();
        other.expect_msg(WAIT, "Pong 5", |m| matches!(m, Message::Pong { nonce: 5 }));
        other
            .send(&Message::Assign(Assign {
                seq: 1,
                task: "a1".into(),
                kind: "a".into(),
                args: String::new(),
                attempt: 1,
                timeout_ms: 0,
            }))
            .unwrap();
        let m = other.expect_msg(WAIT, "Completed", |m| matches!(m, Message::Completed(_)));
        let Message::Completed(done) = m else {
            unreachable!()
        };
        assert!(done.ok && done.seq == 1, "{done:?}");
        other.send(&Message::Goodbye).unwrap();
        other.expect_msg(WAIT, "GoodbyeAck", |m| matches!(m, Message::GoodbyeAck));
        assert_serves(&mut s, &format!("after message kind {index}"));
    }
    // The node says why it closed the connection.
    assert!(
        s.stderr
            .wait_for(WAIT, |l| l.to_lowercase().contains("malformed"))
            .is_some(),
        "the node log does not say the message was malformed:\n{}",
        s.stderr.text()
    );
}

#[test]
fn an_unknown_message_kind_instead_of_hello_is_refused() {
    let mut s = Serve::types("a", &["--handshake-timeout", "2s"]);
    let mut c = WireClient::connect(s.addr);
    c.send_raw(&unknown_kind_frame(10)).unwrap();
    assert_closed_without_welcome(&mut c, "a future message kind before Hello", &s);
    assert_serves(&mut s, "after a future message kind before Hello");
}

/// What a hand-played node of the next version answers to the coordinator's `Hello`.
enum FutureAnswer {
    /// `Welcome` with its own (higher) version and appended fields.
    Welcome,
    /// `Reject(Version)`, as a node that does not speak version N would.
    Reject,
}

/// The frame a node of version N+1 answers a `Hello` with.
fn future_reply(answer: &FutureAnswer) -> Vec<u8> {
    match answer {
        FutureAnswer::Welcome => {
            let mut h = hello("default");
            h.version = PROTOCOL_VERSION + 1;
            h.types = vec!["a".into()];
            h.capacity = 4;
            frame_with_tail(&Message::Welcome(h), FUTURE_FIELDS)
        }
        FutureAnswer::Reject => {
            let r = Message::Reject(Reject {
                reason: RejectReason::Version,
                message: format!(
                    "protocol version {PROTOCOL_VERSION} is not supported (this node speaks {})",
                    PROTOCOL_VERSION + 1
                ),
            });
            let mut f = BytesMut::new();
            FrameCodec::default().encode(&r, &mut f).unwrap();
            f.to_vec()
        }
    }
}

/// Serves one connection as a node of version N+1: answers the `Hello`, then records every
/// message until the peer closes (or `deadline`).
fn serve_as_future_node(
    mut stream: std::net::TcpStream,
    answer: &FutureAnswer,
    deadline: Instant,
) -> Vec<Message> {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    while Instant::now() < deadline {
        match codec.decode(&mut buf) {
            Ok(Some(m)) => {
                if matches!(m, Message::Hello(_)) {
                    std::io::Write::write_all(&mut stream, &future_reply(answer)).unwrap();
                }
                got.push(m);
                continue;
            }
            Ok(None) => {}
            Err(_) => break,
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    got
}

/// Plays a node of version N+1 on a loopback port until one connection said `Hello` and
/// closed (at most `WAIT`). Returns the port and a handle giving the messages received.
fn future_node(answer: FutureAnswer) -> (u16, std::thread::JoinHandle<Vec<Message>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + WAIT;
        let mut got = Vec::new();
        while Instant::now() < deadline && !got.iter().any(|m| matches!(m, Message::Hello(_))) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    got.extend(serve_as_future_node(stream, &answer, deadline));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        got
    });
    (port, handle)
}

fn coordinator_meets_the_next_version(answer: FutureAnswer) {
    let (port, node) = future_node(answer);
    let dir = TestDir::new();
    dir.write("tasks.txt", "a1 a2\n");
    let peer = format!("127.0.0.1:{port}");
    let out = run_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--discovery-timeout",
            "2s",
            "--peer",
            &peer,
        ],
    );
    let got = node.join().unwrap();
    // No confused session: the coordinator never assigned a task to the newer node, and the
    // run fails (no node of type a) saying why.
    assert!(
        got.iter().any(|m| matches!(m, Message::Hello(_))),
        "the coordinator never said Hello: {got:?}\n{}",
        out.describe()
    );
    assert!(
        !got.iter().any(|m| matches!(m, Message::Assign(_))),
        "the coordinator assigned work to a node of another version: {got:?}"
    );
    out.assert_code(1);
    assert!(
        events_named(&out.json(), "task_completed").is_empty(),
        "{}",
        out.describe()
    );
    // It names the peer, the reason and the version it does not speak, in a
    // `peer_unreachable` event.
    let events = out.json();
    let unreachable = events_named(&events, "peer_unreachable");
    assert_eq!(unreachable.len(), 1, "{}", out.describe());
    assert_eq!(unreachable[0]["addr"], peer.as_str(), "{}", unreachable[0]);
    let err = unreachable[0]["error"]
        .as_str()
        .unwrap_or("")
        .to_lowercase();
    assert!(
        err.contains("version") && err.contains(&(PROTOCOL_VERSION + 1).to_string()),
        "the run does not say which peer speaks which version\n{}",
        out.describe()
    );
    let summary = events_named(&events, "summary");
    assert_eq!(summary.len(), 1, "{}", out.describe());
    assert_eq!(summary[0]["succeeded"], 0, "{}", summary[0]);
}

#[test]
fn a_coordinator_welcomed_by_a_node_of_the_next_version_refuses_it_clearly() {
    coordinator_meets_the_next_version(FutureAnswer::Welcome);
}

#[test]
fn a_coordinator_rejected_by_a_node_of_the_next_version_says_so() {
    coordinator_meets_the_next_version(FutureAnswer::Reject);
}
