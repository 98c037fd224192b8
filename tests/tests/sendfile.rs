//! Inputs shipped from `run` to a node by file range (#18): the connection reads each
//! chunk's bytes from the file only when it writes the chunk (over loopback into a
//! recycled buffer without a key, into its frame with one; `sendfile(2)` to other
//! machines). The bytes must arrive exactly, both ways, and a file truncated while it is
//! sent must fail the task's attempt saying so, never hang.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use p2p_core::{Message, Transfer};
use tests::{events_named, run_in, Serve, TestDir, WAIT};

/// `len` bytes that differ from chunk to chunk (so a chunk sent twice, dropped or out of
/// order is seen).
fn bytes(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A 9 MiB input (more than two windows of credit, so `Ack`s move it on) goes to a node,
/// where the handler compares it with the original and copies it to an output that comes
/// back: with and without a cluster key, both arrive byte for byte.
#[test]
fn an_input_shipped_with_and_without_a_key_arrives_byte_for_byte_and_comes_back() {
    let dir = TestDir::new();
    let input = bytes(9 * 1024 * 1024 + 4321);
    std::fs::write(dir.join("in.bin"), &input).unwrap();
    let original = dir.join("in.bin").display().to_string();
    dir.write("tasks.txt", "a1 < in.bin > back.bin\n");
    let key = dir.join("cluster.key").display().to_string();
    run_in(dir.path(), &["keygen", &key]).assert_code(0);
    for keyed in [false, true] {
        let data = TestDir::new();
        let handler = format!("a=cmp in.bin {original} && cp in.bin back.bin");
        let mut args = vec![
            "--handler",
            handler.as_str(),
            "--data-dir",
            data.path().to_str().unwrap(),
        ];
        if keyed {
            args.extend(["--key-file", key.as_str()]);
        }
        let node = Serve::types("a", &args);
        let results = format!("out-{keyed}");
        let peer = node.peer();
        let mut run = vec![
            "run",
            "tasks.txt",
            "--json",
            "--results",
            results.as_str(),
            "--peer",
            peer.as_str(),
            "--discovery",
            "none",
        ];
        if keyed {
            run.extend(["--key-file", key.as_str()]);
        }
        let out = run_in(dir.path(), &run);
        out.assert_code(0);
        assert_eq!(
            events_named(&out.json(), "task_completed").len(),
            1,
            "{}",
            out.describe()
        );
        let back = std::fs::read(dir.join(&results).join("a1/back.bin")).unwrap();
        assert!(back == input, "keyed {keyed}: the output differs");
    }
}

/// A node on the raw wire that asks for every input it is offered and counts what comes;
/// after the first chunk it stops reading until `go` says the file was cut, then takes
/// everything, acknowledging each MiB. Returns the bytes it received, whether an `Abort`
/// of the transfer came from `run`, and whether every byte past the cut was either the
/// file's (sent before the cut) or zero (sent after it: the file no longer had it).
fn slow_node(
    go: std::sync::mpsc::Receiver<()>,
    original: Vec<u8>,
    cut_at: usize,
) -> (u16, std::thread::JoinHandle<(usize, bool, bool)>) {
    use bytes::BytesMut;
    use p2p_core::codec::FrameCodec;
    use std::io::Read;
    use tokio_util::codec::{Decoder, Encoder};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + WAIT;
        let (mut received, mut aborted, mut zeros) = (0usize, false, true);
        // A connection that closes before its `Hello` (a stray one to this port, or a
        // first try of `run`'s) is followed by the next.
        listener.set_nonblocking(true).unwrap();
        let mut hello = false;
        while !hello && std::time::Instant::now() < deadline {
            let mut stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            };
            stream.set_nonblocking(false).unwrap();
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
            let mut waited = false;
            let mut acked = 0;
            'conn: while std::time::Instant::now() < deadline {
                while let Ok(Some(m)) = codec.decode(&mut buf) {
                    hello |= matches!(m, Message::Hello(_));
                    let t = match tests::fake_node_answer(&mut stream, &mut codec, m) {
                        tests::FakeNode::Answered => continue,
                        tests::FakeNode::Goodbye => break 'conn,
                        tests::FakeNode::Other(Message::Transfer(t)) => t,
                        tests::FakeNode::Other(_) => continue,
                    };
                    match *t {
                        Transfer::Offer { id, .. } => {
                            let want = Transfer::Want {
                                id,
                                window: 4 * 1024 * 1024,
                            };
                            send(&mut stream, &mut codec, Message::Transfer(Box::new(want)));
                        }
                        Transfer::Chunk { id, offset, data } => {
                            let end = offset as usize + data.len();
                            if end > cut_at {
                                let from = cut_at.max(offset as usize);
                                let was = &original[from..end];
                                let got = &data[from - offset as usize..];
                                zeros &= got.iter().zip(was).all(|(g, w)| *g == 0 || g == w);
                            } else {
                                zeros &= data[..] == original[offset as usize..end];
                            }
                            received += data.len();
                            if received - acked >= 1024 * 1024 {
                                acked = received;
                                let ack = Transfer::Ack {
                                    id,
                                    received: received as u64,
                                };
                                send(&mut stream, &mut codec, Message::Transfer(Box::new(ack)));
                            }
                            if !waited {
                                // The file is cut while the rest of the window waits.
                                waited = true;
                                let _ = go.recv_timeout(WAIT);
                            }
                        }
                        Transfer::Abort { .. } => aborted = true,
                        _ => {}
                    }
                }
                let mut chunk = [0u8; 64 * 1024];
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
        }
        (received, aborted, zeros)
    });
    (port, handle)
}

/// An input truncated while `run` sends it: the attempt fails with an error that says the
/// file was truncated while it was sent, `run` gives the transfer up (`Abort`) rather than
/// send on, the bytes the file no longer had went as zeros (which the node's hash check
/// refuses; never other bytes passed off as the file), and nothing hangs.
#[test]
fn an_input_truncated_while_it_is_sent_fails_the_attempt_saying_so() {
    let dir = TestDir::new();
    let len = 32 * 1024 * 1024;
    let original = bytes(len);
    std::fs::write(dir.join("in.bin"), &original).unwrap();
    dir.write("tasks.txt", "a1 < in.bin\n");
    let (go, wait) = std::sync::mpsc::channel();
    let cut_at = 1024 * 1024 + 777;
    let (port, node) = slow_node(wait, original, cut_at);
    let peer = format!("127.0.0.1:{port}");
    // The node is up (it takes the next connection after this one, which sends nothing).
    drop(std::net::TcpStream::connect(&peer).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(50));
    let run = tests::spawn_in(
        dir.path(),
        &[
            "run",
            "tasks.txt",
            "--json",
            "--peer",
            &peer,
            "--discovery",
            "none",
        ],
    );
    // Cut the file while it is on its way: the node stops reading after its first chunk
    // until told the file is cut (whether the cut comes before or after that chunk does
    // not change what is checked: the first MiB is whole either way).
    let path = dir.join("in.bin");
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut_at as u64)
        .unwrap();
    let _ = go.send(());
    let out = run.finish();
    out.assert_code(1);
    let events = out.json();
    // (The bytes the node holds are checked below.)
    let failed = events_named(&events, "task_failed");
    assert_eq!(failed.len(), 1, "{}", out.describe());
    let error = failed[0]["error"].as_str().unwrap();
    assert!(
        error.contains("in.bin") && error.contains("truncated while it was sent"),
        "{error}"
    );
    let (received, aborted, zeros) = node.join().unwrap();
    assert!(
        aborted,
        "run did not give the transfer up\n{}",
        out.describe()
    );
    assert!(received < len, "the whole file was sent: {received}");
    assert!(zeros, "bytes other than the file's or zeros were sent");
}
