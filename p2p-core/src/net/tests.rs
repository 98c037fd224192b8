//! Tests of the driver on loopback: real sockets, both sides in this process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::conn::Role;
use crate::message::{Assign, Completed, Hello, Message, RejectReason};
use crate::secure;
use crate::secure::SecureCodec;
use crate::PROTOCOL_VERSION;
use crate::{ConnectionError, Error, HandshakeError, NodeId, Stage};
use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

fn hello_as(types: &[&str], node_id: NodeId) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        cluster: "default".into(),
        node_id,
        types: types.iter().map(|t| t.to_string()).collect(),
        capacity: 2,
    }
}

/// A node's `Hello` and settings: a fresh identity, and `key` if given.
fn node(types: &[&str], key: Option<&ClusterKey>) -> (Hello, Settings) {
    let identity = Identity::generate();
    let settings = Settings {
        key: key.cloned(),
        identity: Some(identity.clone()),
        conn: conn::Config {
            handshake_timeout: Duration::from_secs(10),
            ..Default::default()
        },
        ..Settings::default()
    };
    (hello_as(types, identity.node_id()), settings)
}

/// The next event that is not a link's `Opened`.
async fn recv(rx: &mut mpsc::Receiver<(LinkId, LinkEvent)>) -> Option<(LinkId, LinkEvent)> {
    loop {
        match rx.recv().await {
            Some((_, LinkEvent::Opened(_))) => continue,
            other => return other,
        }
    }
}

/// A status request is answered at once (not with the next heartbeat: here there is
/// none for an hour), twice on one link, with or without a key; a node that does not
/// answer status requests closes the link, which the asker gets as `NoStatus`.
#[tokio::test]
async fn status_requests_are_answered_at_once() {
    let key = ClusterKey::generate();
    for (key, answers) in [(None, true), (Some(&key), true), (None, false)] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let quiet = conn::Config {
            heartbeat_interval: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(7200),
            ..Default::default()
        };
        let (ah, mut s) = node(&["a"], key);
        s.conn = quiet.clone();
        if answers {
            s.status = Some(StatusSource(std::sync::Arc::new(|| StatusReport {
                version: "9.9".into(),
                completed: 7,
                ..StatusReport::default()
            })));
        }
        let (atx, _arx) = mpsc::channel(16);
        let acceptor = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accept(stream, ah, &s, 1, atx).await
        });
        let (dh, mut s) = node(&[], key);
        s.conn = quiet;
        let (dtx, _drx) = mpsc::channel(16);
        let dialled = connect(addr, dh, &s, 2, dtx).await.unwrap();
        let _accepted = acceptor.await.unwrap().unwrap();
        let limit = Duration::from_secs(30);
        if answers {
            for _ in 0..2 {
                let r = dialled.request_status(limit).await.unwrap();
                assert_eq!((r.version.as_str(), r.completed), ("9.9", 7));
            }
        } else {
            let err = dialled.request_status(limit).await.unwrap_err();
            assert!(matches!(err, Error::NoStatus), "{err}");
        }
    }
}

/// A link's first event is `Opened`, its last `Closed`, and `on_closed` says how it
/// ended.
#[tokio::test]
async fn a_link_opens_first_and_says_how_it_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ah, s) = node(&["a"], None);
    let (atx, mut arx) = mpsc::channel(16);
    let acceptor = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        accept(stream, ah, &s, 1, atx).await
    });
    let (dh, s) = node(&[], None);
    let (dtx, mut drx) = mpsc::channel(16);
    let dialled = connect(addr, dh, &s, 2, dtx).await.unwrap();
    let accepted = acceptor.await.unwrap().unwrap();
    let first = drx.recv().await;
    assert!(
        matches!(&first, Some((2, LinkEvent::Opened(l))) if l.peer().types == vec!["a".to_string()]),
        "{first:?}"
    );
    assert!(matches!(arx.recv().await, Some((1, LinkEvent::Opened(_)))));
    let closed = dialled.on_closed();
    dialled.send(Command::Goodbye).unwrap();
    let bound = Duration::from_secs(20);
    let end = tokio::time::timeout(bound, closed.wait()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
    let last = tokio::time::timeout(bound, recv(&mut drx)).await.unwrap();
    assert!(
        matches!(last, Some((2, LinkEvent::Closed { error: None }))),
        "{last:?}"
    );
    drop(accepted);
}

/// A link that ends without goodbye says why with a typed error, the same in its
/// `Closed` event and in `on_closed`: the side that aborted gets `Aborted`, its peer
/// `Lost` (EOF without goodbye).
#[tokio::test]
async fn a_failed_link_says_why_with_a_typed_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ah, s) = node(&["a"], None);
    let (atx, mut arx) = mpsc::channel(16);
    let acceptor = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        accept(stream, ah, &s, 1, atx).await
    });
    let (dh, s) = node(&[], None);
    let (dtx, mut drx) = mpsc::channel(16);
    let dialled = connect(addr, dh, &s, 2, dtx).await.unwrap();
    let accepted = acceptor.await.unwrap().unwrap();
    let (dialled_end, accepted_end) = (dialled.on_closed(), accepted.on_closed());
    dialled.send(Command::Abort).unwrap();
    let bound = Duration::from_secs(20);
    let end = tokio::time::timeout(bound, dialled_end.wait())
        .await
        .unwrap();
    assert!(matches!(end.as_deref(), Some(Error::Aborted)), "{end:?}");
    let last = tokio::time::timeout(bound, recv(&mut drx)).await.unwrap();
    assert!(
        matches!(&last, Some((2, LinkEvent::Closed { error: Some(e) })) if matches!(**e, Error::Aborted)),
        "{last:?}"
    );
    let lost = |e: &Error| matches!(e, Error::Connection(ConnectionError::Lost));
    let end = tokio::time::timeout(bound, accepted_end.wait())
        .await
        .unwrap();
    assert!(end.as_deref().is_some_and(lost), "{end:?}");
    let last = tokio::time::timeout(bound, recv(&mut arx)).await.unwrap();
    assert!(
        matches!(&last, Some((1, LinkEvent::Closed { error: Some(e) })) if lost(e)),
        "{last:?}"
    );
}

/// Connects a dialler with `dial_key` to an acceptor with `accept_key` on loopback and
/// returns both results.
async fn connect_pair(
    dial_key: Option<&ClusterKey>,
    accept_key: Option<&ClusterKey>,
) -> (Result<Link, Error>, Result<Link, Error>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accept_hello, accept_settings) = node(&["a"], accept_key);
    let (tx, _rx_a) = mpsc::channel(16);
    let acceptor = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        accept(stream, accept_hello, &accept_settings, 1, tx).await
    });
    let (tx, _rx_d) = mpsc::channel(16);
    let (dial_hello, dial_settings) = node(&[], dial_key);
    let dialled = connect(addr, dial_hello, &dial_settings, 1, tx).await;
    let accepted = tokio::time::timeout(Duration::from_secs(20), acceptor)
        .await
        .expect("acceptor finishes")
        .unwrap();
    (dialled, accepted)
}

/// A worker with a deep window answers every task it holds at once: its link queue is
/// sized for its own capacity too (it was sized for the peer's only, so results past the
/// 65th were dropped and their tasks hung).
#[tokio::test]
async fn a_deep_window_of_tasks_is_assigned_and_answered_in_bursts() {
    const N: u64 = 300;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (mut ah, s) = node(&["a"], None);
    ah.capacity = N as u32;
    let (atx, mut arx) = mpsc::channel(1024);
    let acceptor = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        accept(stream, ah, &s, 1, atx).await
    });
    let (dh, ds) = node(&[], None);
    let (dtx, mut drx) = mpsc::channel(1024);
    let d = connect(addr, dh, &ds, 2, dtx).await.unwrap();
    let a = acceptor.await.unwrap().unwrap();
    assert_eq!(d.peer().capacity, N as u32);
    for seq in 1..=N {
        d.send(Command::Assign(crate::testing::assign(seq)))
            .unwrap();
    }
    let bound = Duration::from_secs(20);
    for _ in 0..N {
        let got = tokio::time::timeout(bound, recv(&mut arx)).await.unwrap();
        assert!(matches!(got, Some((1, LinkEvent::Assigned(_)))), "{got:?}");
    }
    // Every result is queued in one go, with no chance for the driver to run between.
    for seq in 1..=N {
        a.send(Command::Complete(Completed {
            seq,
            ok: true,
            exit_code: Some(0),
            output: format!("Executing task: a{seq}").into(),
            error: None,
            duration_us: 1,
        }))
        .unwrap_or_else(|e| panic!("result {seq} refused: {e}"));
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..N {
        match tokio::time::timeout(bound, recv(&mut drx)).await.unwrap() {
            Some((2, LinkEvent::Completed(c))) => assert!(seen.insert(c.seq)),
            other => panic!("expected a result, got {other:?}"),
        }
    }
    assert_eq!(seen.len(), N as usize);
}

#[tokio::test]
async fn keyed_peers_connect_and_run_a_task_with_a_large_result() {
    let key = ClusterKey::generate();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ah, s) = node(&["a"], Some(&key));
    let (dh, ds) = node(&[], Some(&key));
    let (a_id, d_id) = (ah.node_id, dh.node_id);
    let (atx, mut arx) = mpsc::channel(16);
    let acceptor = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        accept(stream, ah, &s, 1, atx).await
    });
    let (dtx, mut drx) = mpsc::channel(16);
    let d = connect(addr, dh, &ds, 2, dtx).await.unwrap();
    let a = acceptor.await.unwrap().unwrap();
    // Each side's id is the one its identity proved.
    assert_eq!(d.peer().node_id, a_id);
    assert_eq!(a.peer().node_id, d_id);
    assert_eq!(d.peer().types, vec!["a".to_string()]);
    assert!(a.peer().types.is_empty());
    let assign = Assign {
        seq: 1,
        task: "a1".into(),
        kind: "a".into(),
        args: String::new(),
        attempt: 1,
        timeout_ms: 0,
    };
    d.send(Command::Assign(assign.clone())).unwrap();
    let bound = Duration::from_secs(20);
    let got = tokio::time::timeout(bound, recv(&mut arx)).await.unwrap();
    assert!(matches!(got, Some((1, LinkEvent::Assigned(ref x))) if *x == assign));
    let output = "y".repeat(300_000);
    a.send(Command::Complete(Completed {
        seq: 1,
        ok: true,
        exit_code: Some(0),
        output: output.clone().into(),
        error: None,
        duration_us: 1,
    }))
    .unwrap();
    let got = tokio::time::timeout(bound, recv(&mut drx)).await.unwrap();
    match got {
        Some((2, LinkEvent::Completed(c))) => assert_eq!(c.output, output),
        other => panic!("expected the result, got {other:?}"),
    }
    d.send(Command::Goodbye).unwrap();
    let closed = tokio::time::timeout(bound, recv(&mut drx)).await.unwrap();
    assert!(
        matches!(closed, Some((2, LinkEvent::Closed { error: None }))),
        "{closed:?}"
    );
}

#[tokio::test]
async fn another_key_is_refused_on_both_sides() {
    let (d, a) = connect_pair(Some(&ClusterKey::generate()), Some(&ClusterKey::generate())).await;
    let d = d.unwrap_err();
    assert!(
        matches!(
            d.handshake(),
            Some(HandshakeError::PeerClosed {
                stage: Stage::Secure {
                    dialled_with: Some(_)
                }
            })
        ),
        "{d:?}"
    );
    assert!(d.is_permanent(), "{d:?}");
    let a = a.unwrap_err();
    assert!(
        matches!(a.handshake(), Some(HandshakeError::UnknownKey { .. })),
        "{a:?}"
    );
    assert!(a.is_permanent(), "{a:?}");
}

#[tokio::test]
async fn a_dialler_without_a_key_is_dropped_and_told_it_has_none() {
    let (d, a) = connect_pair(None, Some(&ClusterKey::generate())).await;
    // The dialler learns where the peer closed and that it has no key (a CLI turns
    // that into its hint); closing during `Hello` is not permanent.
    let d = d.unwrap_err();
    assert!(
        matches!(
            d.handshake(),
            Some(HandshakeError::PeerClosed {
                stage: Stage::Hello { keyed: false }
            })
        ),
        "{d:?}"
    );
    assert!(!d.is_permanent());
    let a = a.unwrap_err();
    assert!(
        matches!(a.handshake(), Some(HandshakeError::Plaintext)),
        "{a:?}"
    );
}

#[tokio::test]
async fn a_keyed_dialler_to_a_node_without_a_key_fails_at_once() {
    let (d, a) = connect_pair(Some(&ClusterKey::generate()), None).await;
    let d = d.unwrap_err();
    assert!(d.is_permanent(), "{d:?}");
    let a = a.unwrap_err();
    assert!(
        matches!(a.handshake(), Some(HandshakeError::PeerHasKey)),
        "{a:?}"
    );
}

/// Runs the secure handshake by hand as `role` with `identity`, then sends `first` (a
/// `Hello` or `Welcome`) and returns what the other side answers (or `None` at EOF).
async fn forge(
    stream: &mut TcpStream,
    role: Role,
    key: &ClusterKey,
    identity: &Identity,
    first: Option<Message>,
) -> (SecureCodec, Option<Message>) {
    let mut codec = secure::handshake(stream, role, std::slice::from_ref(key), identity, 1 << 20)
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    if let Some(m) = first {
        codec.encode(&m, &mut buf).unwrap();
        stream.write_all(&buf).await.unwrap();
    }
    let mut src = BytesMut::new();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(m) = codec.decode(&mut src).unwrap() {
                return Some(m);
            }
            if stream.read_buf(&mut src).await.unwrap_or(0) == 0 {
                return None;
            }
        }
    })
    .await
    .expect("an answer or EOF in time");
    (codec, got)
}

#[tokio::test]
async fn a_forged_hello_id_is_refused_by_the_acceptor() {
    let key = ClusterKey::generate();
    let (mallory, victim) = (Identity::generate(), Identity::generate());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ah, s) = node(&["a"], Some(&key));
    let (tx, _rx) = mpsc::channel(16);
    let acceptor = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        accept(stream, ah, &s, 1, tx).await
    });
    // Mallory holds the cluster key and her own identity, and claims the victim's id.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let forged = Message::Hello(hello_as(&[], victim.node_id()));
    let (_codec, answer) = forge(&mut stream, Role::Initiator, &key, &mallory, Some(forged)).await;
    match answer {
        Some(Message::Reject(r)) => {
            assert_eq!(r.reason, RejectReason::Key);
            assert!(r.message.contains(&victim.node_id().to_string()), "{r:?}");
        }
        other => panic!("expected a Reject, got {other:?}"),
    }
    let err = acceptor.await.unwrap().unwrap_err();
    match &err {
        Error::Handshake(HandshakeError::IdMismatch { claimed, proven }) => {
            assert_eq!(*claimed, victim.node_id());
            assert_eq!(*proven, mallory.node_id());
        }
        other => panic!("expected IdMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn a_forged_welcome_id_is_refused_by_the_dialler() {
    let key = ClusterKey::generate();
    let mallory = Identity::generate();
    let victim = Identity::generate();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let k = key.clone();
    let victim_id = victim.node_id();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        // Reads the dialler's Hello, answers a Welcome claiming the victim's id.
        let (mut codec, hello) = forge(&mut stream, Role::Acceptor, &k, &mallory, None).await;
        assert!(matches!(hello, Some(Message::Hello(_))), "{hello:?}");
        let mut buf = BytesMut::new();
        codec
            .encode(&Message::Welcome(hello_as(&["a"], victim_id)), &mut buf)
            .unwrap();
        let _ = stream.write_all(&buf).await;
        // Hold the connection until the dialler gives up.
        let mut sink = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut sink)).await;
    });
    let (dh, ds) = node(&[], Some(&key));
    let (tx, _rx) = mpsc::channel(16);
    let err = connect(addr, dh, &ds, 1, tx).await.unwrap_err();
    assert!(
        matches!(err, Error::Handshake(HandshakeError::IdMismatch { claimed, .. }) if claimed == victim_id),
        "{err:?}"
    );
    fake.await.unwrap();
}

#[tokio::test]
async fn a_keyed_connection_needs_a_matching_identity() {
    let key = ClusterKey::generate();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (h, mut s) = node(&[], Some(&key));
    s.identity = None;
    let (tx, _rx) = mpsc::channel(16);
    let err = connect(addr, h.clone(), &s, 1, tx.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidState {
                action: "start a keyed connection",
                ..
            }
        ),
        "{err:?}"
    );
    s.identity = Some(Identity::generate());
    let err = connect(addr, h, &s, 1, tx).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidState {
                action: "start a keyed connection",
                ..
            }
        ),
        "{err:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn accept_keys_let_a_rotating_node_accept_old_and_new() {
    let (old, new) = (ClusterKey::generate(), ClusterKey::generate());
    for dial in [&old, &new] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ah, mut s) = node(&["a"], Some(&new));
        s.accept_keys = vec![old.clone()];
        let (tx, _rx_a) = mpsc::channel(16);
        let acceptor = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accept(stream, ah, &s, 1, tx).await
        });
        let (dh, ds) = node(&[], Some(dial));
        let (tx, _rx_d) = mpsc::channel(16);
        let d = connect(addr, dh, &ds, 1, tx).await;
        assert!(d.is_ok(), "{d:?}");
        assert!(acceptor.await.unwrap().is_ok());
    }
}

/// An instant service answers the assignments it takes inside the driver (the owner never
/// sees them), gives the others to the owner, and after the peer sent a file list every
/// assignment goes to the owner (which keeps the lists): a task with files is never
/// answered in the driver.
#[tokio::test]
async fn an_instant_service_answers_in_the_driver_until_files_are_used() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (mut ah, mut s) = node(&["a", "b"], None);
    ah.capacity = 64;
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    s.instant = Some(InstantService(std::sync::Arc::new(
        move |a: &Assign, peer: &Hello| {
            counted.fetch_add(1, Ordering::Relaxed);
            assert!(peer.types.is_empty(), "the peer's handshake is passed");
            (a.kind == "a").then(|| Completed {
                seq: a.seq,
                ok: true,
                exit_code: Some(0),
                output: format!("now {}", a.task).into(),
                error: None,
                duration_us: 0,
            })
        },
    )));
    let (atx, mut arx) = mpsc::channel(1024);
    let acceptor = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        accept(stream, ah, &s, 1, atx).await
    });
    let (dh, ds) = node(&[], None);
    let (dtx, mut drx) = mpsc::channel(1024);
    let d = connect(addr, dh, &ds, 2, dtx).await.unwrap();
    let a = acceptor.await.unwrap().unwrap();
    let assign = |seq: u64, kind: &str| Command::Assign(crate::testing::assign_of(seq, kind));
    let bound = Duration::from_secs(20);
    // A burst of instant tasks and one the service declines.
    for seq in 1..=20 {
        d.send(assign(seq, "a")).unwrap();
    }
    d.send(assign(21, "b")).unwrap();
    let mut answered = std::collections::HashSet::new();
    while answered.len() < 20 {
        match tokio::time::timeout(bound, recv(&mut drx)).await.unwrap() {
            Some((2, LinkEvent::Completed(c))) => {
                assert_eq!(c.output, format!("now a{}", c.seq));
                assert!(answered.insert(c.seq));
            }
            other => panic!("expected a result, got {other:?}"),
        }
    }
    // The owner sees only the declined one, and answers it the ordinary way.
    match tokio::time::timeout(bound, recv(&mut arx)).await.unwrap() {
        Some((1, LinkEvent::Assigned(x))) => assert_eq!(x.seq, 21),
        other => panic!("expected the declined assignment, got {other:?}"),
    }
    a.send(Command::Complete(Completed {
        seq: 21,
        ok: true,
        exit_code: Some(0),
        output: "by the owner".into(),
        error: None,
        duration_us: 0,
    }))
    .unwrap();
    match tokio::time::timeout(bound, recv(&mut drx)).await.unwrap() {
        Some((2, LinkEvent::Completed(c))) => {
            assert_eq!((c.seq, c.output.as_str()), (21, "by the owner"))
        }
        other => panic!("expected the owner's result, got {other:?}"),
    }
    assert_eq!(calls.load(Ordering::Relaxed), 21);
    // A file list, then an instant task: the owner gets both, the service is not asked.
    let files = crate::message::Transfer::Files {
        seq: 22,
        inputs: Vec::new(),
        outputs: vec!["out.txt".into()],
    };
    d.send(Command::Transfer(Box::new(files))).unwrap();
    d.send(assign(22, "a")).unwrap();
    match tokio::time::timeout(bound, recv(&mut arx)).await.unwrap() {
        Some((1, LinkEvent::Transfer(t))) => {
            assert!(matches!(
                *t,
                crate::message::Transfer::Files { seq: 22, .. }
            ))
        }
        other => panic!("expected the file list, got {other:?}"),
    }
    match tokio::time::timeout(bound, recv(&mut arx)).await.unwrap() {
        Some((1, LinkEvent::Assigned(x))) => assert_eq!(x.seq, 22),
        other => panic!("expected the task with files, got {other:?}"),
    }
    assert_eq!(
        calls.load(Ordering::Relaxed),
        21,
        "not asked after a file list"
    );
}

/// Counts the writes that reach the socket.
struct CountedWrites {
    inner: TcpStream,
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl tokio::io::AsyncRead for CountedWrites {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CountedWrites {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(_))) {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, std::task::Poll::Ready(Ok(_))) {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// With a key, a burst of assignments arrives as one encrypted message whose frames the
/// codec holds after the socket's bytes are read: the driver takes all of them before it
/// writes, so a burst of instant tasks is answered in a few writes, not in one write (and
/// one encrypted message) per task, as it was when the batch stopped at an empty read
/// buffer.
#[tokio::test]
async fn with_a_key_a_burst_of_instant_tasks_is_answered_in_a_few_writes() {
    use std::sync::atomic::Ordering;
    const N: u64 = 200;
    let key = ClusterKey::generate();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (mut ah, mut s) = node(&["a"], Some(&key));
    ah.capacity = 1024;
    s.instant = Some(InstantService(std::sync::Arc::new(
        |a: &Assign, _: &Hello| {
            Some(Completed {
                seq: a.seq,
                ok: true,
                exit_code: Some(0),
                output: format!("Executing task: {}", a.task).into(),
                error: None,
                duration_us: 0,
            })
        },
    )));
    let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = writes.clone();
    let (atx, _arx) = mpsc::channel(1024);
    let acceptor = tokio::spawn(async move {
        let (stream, peer) = listener.accept().await.unwrap();
        let stream = CountedWrites {
            inner: stream,
            writes: counted,
        };
        accept_stream(stream, peer, ah, &s, 1, atx).await
    });
    let (dh, ds) = node(&[], Some(&key));
    let (dtx, mut drx) = mpsc::channel(1024);
    let d = connect(addr, dh, &ds, 2, dtx).await.unwrap();
    let _a = acceptor.await.unwrap().unwrap();
    let before = writes.load(Ordering::Relaxed);
    // Queued in one go: the dialler's driver sends them as one encrypted message.
    for seq in 1..=N {
        d.send(Command::Assign(crate::testing::assign(seq)))
            .unwrap();
    }
    let bound = Duration::from_secs(20);
    for _ in 0..N {
        match tokio::time::timeout(bound, recv(&mut drx)).await.unwrap() {
            Some((2, LinkEvent::Completed(c))) => assert!(c.ok),
            other => panic!("expected a result, got {other:?}"),
        }
    }
    let used = writes.load(Ordering::Relaxed) - before;
    assert!(
        used <= N as usize / 4,
        "{N} instant results took {used} writes: the batch stopped before the codec's frames"
    );
}

/// Connects a dialler serving nothing to an acceptor serving `a` (capacity `capacity`) over
/// the in-memory transport: (dialled, its events, accepted, its events).
async fn memory_pair(
    capacity: u32,
) -> (
    Link,
    mpsc::Receiver<(LinkId, LinkEvent)>,
    Link,
    mpsc::Receiver<(LinkId, LinkEvent)>,
) {
    let (dial_end, accept_end) = pipe(capacity);
    let (mut ah, s) = node(&["a"], None);
    ah.capacity = capacity;
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (atx, arx) = mpsc::channel(4096);
    let acceptor =
        tokio::spawn(async move { accept_memory(accept_end, addr, ah, &s, 1, atx).await });
    let (dh, ds) = node(&[], None);
    let (dtx, drx) = mpsc::channel(4096);
    let d = connect_memory(dial_end, addr, dh, &ds, 2, dtx)
        .await
        .unwrap();
    let a = tokio::time::timeout(Duration::from_secs(20), acceptor)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    (d, drx, a, arx)
}

/// Over the in-memory transport the handshake carries the peer's types and capacity, a
/// deep window of tasks goes both ways, and a goodbye closes both sides cleanly.
#[tokio::test]
async fn a_memory_link_handshakes_runs_tasks_and_says_goodbye() {
    const N: u64 = 2000;
    let (d, mut drx, a, mut arx) = memory_pair(N as u32).await;
    assert_eq!(d.peer().types, vec!["a".to_string()]);
    assert_eq!(d.peer().capacity, N as u32);
    assert!(a.peer().types.is_empty());
    assert!(matches!(drx.recv().await, Some((2, LinkEvent::Opened(_)))));
    for seq in 1..=N {
        d.send(Command::Assign(crate::testing::assign(seq)))
            .unwrap();
    }
    let bound = Duration::from_secs(20);
    for seq in 1..=N {
        match tokio::time::timeout(bound, recv(&mut arx)).await.unwrap() {
            Some((1, LinkEvent::Assigned(x))) => assert_eq!(x.seq, seq),
            other => panic!("expected assignment {seq}, got {other:?}"),
        }
    }
    for seq in 1..=N {
        a.send(Command::Complete(crate::testing::completed(seq)))
            .unwrap();
    }
    for seq in 1..=N {
        match tokio::time::timeout(bound, recv(&mut drx)).await.unwrap() {
            Some((2, LinkEvent::Completed(c))) => assert_eq!(c.seq, seq),
            other => panic!("expected result {seq}, got {other:?}"),
        }
    }
    let (dc, ac) = (d.on_closed(), a.on_closed());
    d.send(Command::Goodbye).unwrap();
    let end = tokio::time::timeout(bound, dc.wait()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
    // The acceptor hears the goodbye; its owner says goodbye back (as a worker does).
    let heard = tokio::time::timeout(bound, recv(&mut arx)).await.unwrap();
    assert!(
        matches!(heard, Some((1, LinkEvent::PeerGoodbye))),
        "{heard:?}"
    );
    let end = tokio::time::timeout(bound, ac.wait()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
}

/// A capacity-1 link takes 64 control commands and then a transfer's whole first burst of
/// chunks, queued at once as a sender does when its default credit comes (`node_files`'
/// pump, with nothing between to let the driver drain the queues): the chunks have a queue
/// of their own, one default credit deep.
#[tokio::test]
async fn a_capacity_one_link_queues_controls_and_a_whole_burst_of_chunks() {
    let (_d, _drx, a, _arx) = memory_pair(1).await;
    let load = crate::LoadReport {
        capacity: 1,
        ..Default::default()
    };
    for i in 0..64 {
        assert!(a.send(Command::Load(load)).is_ok(), "control command {i}");
    }
    let size = 64 * 1024 * 1024;
    let mut s = crate::transfer::Sender::fetched(
        7,
        size,
        crate::transfer::SEND_CHUNK,
        crate::transfer::DEFAULT_WINDOW,
    )
    .unwrap();
    let mut queued = 0;
    while let Some((offset, len)) = s.poll_read() {
        let Message::Transfer(t) = s.chunk(offset, vec![0u8; len]).unwrap() else {
            panic!("a chunk is a transfer message");
        };
        let place = a.try_reserve_chunk().unwrap();
        let place = place.unwrap_or_else(|| panic!("chunk {queued} of the burst found no room"));
        place.send(*t).unwrap();
        queued += 1;
    }
    assert!(queued >= 60, "only {queued} chunks in the default credit");
}

/// A memory handshake is checked as over TCP: another cluster is refused, on both sides.
#[tokio::test]
async fn a_memory_link_to_another_cluster_is_refused() {
    let (dial_end, accept_end) = pipe(2);
    let (mut ah, s) = node(&["a"], None);
    ah.cluster = "other".into();
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (atx, _arx) = mpsc::channel(16);
    let acceptor =
        tokio::spawn(async move { accept_memory(accept_end, addr, ah, &s, 1, atx).await });
    let (dh, ds) = node(&[], None);
    let (dtx, _drx) = mpsc::channel(16);
    let dialled = connect_memory(dial_end, addr, dh, &ds, 2, dtx).await;
    assert!(dialled.is_err(), "{dialled:?}");
    let accepted = tokio::time::timeout(Duration::from_secs(20), acceptor)
        .await
        .unwrap()
        .unwrap();
    assert!(accepted.is_err(), "{accepted:?}");
}

/// Each direction of a pipe holds at most `pipe_depth` batches of `BATCH` messages: a
/// sender whose peer does not read finds its sink pending after that, and gets room again
/// once the peer reads a batch.
#[tokio::test]
async fn a_pipe_is_bounded_and_frees_room_as_its_peer_reads() {
    use futures::{FutureExt, SinkExt, StreamExt};
    let (mut a, mut b) = pipe(2);
    let depth = pipe_depth(2);
    let ping = || Message::Ping { nonce: 7 };
    let mut sent = 0usize;
    loop {
        match a.feed(ping()).now_or_never() {
            Some(Ok(())) => sent += 1,
            Some(Err(e)) => panic!("{e}"),
            None => break,
        }
        assert!(sent <= (depth + 1) * BATCH, "no bound: {sent} sent");
    }
    // The full batches in the channel, and one more in the outbox.
    assert_eq!(sent, (depth + 1) * BATCH);
    assert!(a.flush().now_or_never().is_none(), "a full pipe flushed");
    for _ in 0..BATCH {
        assert!(matches!(
            b.next().await,
            Some(Ok(Message::Ping { nonce: 7 }))
        ));
    }
    // One batch read: the outbox goes.
    a.flush().now_or_never().unwrap().unwrap();
}

/// A pipe has room for everything the protocol lets be in flight on its link even when
/// every message goes alone (a driver that flushes after each command): two results and
/// control frames for each task of the window, so that two drivers that both write before
/// they read never wait for each other (with room for 8 batches, 8 single messages
/// filled it, and a window of 1,024 tasks could stall both drivers until the idle timeout).
#[tokio::test]
async fn a_pipe_holds_a_whole_window_of_single_messages() {
    use futures::{FutureExt, SinkExt};
    for window in [1u32, 64, 1024] {
        let (mut a, _b) = pipe(window);
        let in_flight = 2 * window as usize + 64;
        for n in 0..in_flight {
            // Outside tokio's cooperative budget, which would make a send wait after 128
            // operations of one poll whatever room the channel has.
            let sent = tokio::task::unconstrained(a.send(Message::Ping { nonce: n as u64 }))
                .now_or_never();
            assert!(
                matches!(sent, Some(Ok(()))),
                "window {window}: message {n} of {in_flight} did not fit"
            );
        }
    }
}

/// Closing one end's write side is the other's end of stream, while the other direction
/// still works; a dropped end makes the other's sends fail and its stream end.
#[tokio::test]
async fn a_pipe_closes_in_either_direction() {
    use futures::{SinkExt, StreamExt};
    let (mut a, mut b) = pipe(1);
    a.send(Message::Ping { nonce: 1 }).await.unwrap();
    a.close().await.unwrap();
    assert!(matches!(
        b.next().await,
        Some(Ok(Message::Ping { nonce: 1 }))
    ));
    assert!(b.next().await.is_none(), "no end of stream after close");
    // b -> a still open.
    b.send(Message::Pong { nonce: 2 }).await.unwrap();
    assert!(matches!(
        a.next().await,
        Some(Ok(Message::Pong { nonce: 2 }))
    ));
    assert!(
        a.send(Message::Ping { nonce: 3 }).await.is_err(),
        "sent after close"
    );
    drop(a);
    assert!(
        b.send(Message::Pong { nonce: 4 }).await.is_err(),
        "sent to a dropped end"
    );
    assert!(b.next().await.is_none());
}

/// A peer that completes the handshake and then neither reads nor sends is declared dead
/// after the idle timeout: the link closes with an error, and its owner hears `Closed`.
#[tokio::test]
async fn a_memory_peer_that_stops_reading_is_dropped_after_the_idle_timeout() {
    use futures::{SinkExt, StreamExt};
    let (dial_end, mut raw) = pipe(2);
    let (dh, mut ds) = node(&[], None);
    ds.conn.heartbeat_interval = Duration::from_millis(100);
    ds.conn.idle_timeout = Duration::from_millis(500);
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (dtx, mut drx) = mpsc::channel(4096);
    let dialling =
        tokio::spawn(async move { connect_memory(dial_end, addr, dh, &ds, 2, dtx).await });
    // The raw peer answers the Hello with a Welcome, then goes silent.
    assert!(matches!(raw.next().await, Some(Ok(Message::Hello(_)))));
    let (welcome, _) = node(&["a"], None);
    raw.send(Message::Welcome(welcome)).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), dialling)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    for seq in 1..=2 {
        d.send(Command::Assign(crate::testing::assign(seq)))
            .unwrap();
    }
    let end = tokio::time::timeout(Duration::from_secs(20), d.on_closed().wait())
        .await
        .unwrap();
    assert!(end.is_some(), "closed cleanly by a silent peer");
    let mut closed = false;
    while let Ok(Some((_, ev))) = tokio::time::timeout(Duration::from_secs(20), drx.recv()).await {
        if let LinkEvent::Closed { error } = ev {
            assert!(error.is_some());
            closed = true;
            break;
        }
    }
    assert!(closed, "no Closed event");
    drop(raw);
}

/// Two in-memory ends of a capacity-1 link: the acceptor's events (it serves type `a`),
/// the dialler's `Link` and events, and the acceptor's `Link`.
async fn memory_link() -> (
    Link,
    mpsc::Receiver<(LinkId, LinkEvent)>,
    Link,
    mpsc::Receiver<(LinkId, LinkEvent)>,
) {
    let (dial_end, accept_end) = pipe(1);
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (atx, arx) = mpsc::channel(8192);
    let acceptor = tokio::spawn(async move {
        let me = crate::testing::hello("default", &["a"], 1);
        accept_memory(accept_end, addr, me, &Settings::default(), 1, atx).await
    });
    let (dtx, mut drx) = mpsc::channel(8192);
    let me = crate::testing::hello("default", &[], 1);
    let d = connect_memory(dial_end, addr, me, &Settings::default(), 2, dtx)
        .await
        .unwrap();
    let a = acceptor.await.unwrap().unwrap();
    // The acceptor asks for file 7 with a credit of everything, and the dialler hears it.
    a.send(Command::Transfer(Box::new(
        crate::message::Transfer::Fetch {
            id: 7,
            hash: crate::transfer::hash_bytes(b""),
            window: u32::MAX,
        },
    )))
    .unwrap();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), recv(&mut drx)).await;
        let ev = ev.expect("no Fetch").expect("the link closed");
        if matches!(ev.1, LinkEvent::Transfer(ref t) if matches!(**t, crate::message::Transfer::Fetch { .. }))
        {
            break;
        }
    }
    (d, drx, a, arx)
}

/// A chunk of file 7 at `n` (4 KiB each).
fn chunk_at(n: u64) -> crate::message::Transfer {
    crate::message::Transfer::Chunk {
        id: 7,
        offset: n * 4096,
        data: bytes::Bytes::from(vec![n as u8; 4096]),
    }
}

/// With the chunk queue full, every control command still finds room in the command queue,
/// and goes out before the chunks queued ahead of it (at most the connection's outbox of
/// chunks, taken before, goes first); the chunks all follow, in order.
#[tokio::test]
async fn a_full_chunk_queue_never_refuses_or_delays_a_control_command() {
    use crate::message::Transfer;
    // Several fresh links: the driver's select picks among ready branches at random, so
    // one round could pass by luck where the order is not enforced.
    for round in 0..6 {
        let (d, _drx, _a, mut arx) = memory_link().await;
        let mut queued = 0u64;
        while let Some(place) = d.try_reserve_chunk().unwrap() {
            place.send(chunk_at(queued)).unwrap();
            queued += 1;
            assert!(queued < 10_000, "the chunk queue has no bound");
        }
        assert_eq!(d.chunk_queue_room().0, 0);
        for id in 0..64 {
            d.send(Command::Transfer(Box::new(Transfer::Have { id })))
                .expect("a control command found the queue full");
        }
        let (mut chunks, mut haves, mut chunks_before_last_have) = (0u64, 0, 0);
        while chunks < queued || haves < 64 {
            let ev = tokio::time::timeout(Duration::from_secs(20), recv(&mut arx))
                .await
                .expect("the link stopped sending")
                .expect("the link closed");
            let LinkEvent::Transfer(t) = ev.1 else {
                panic!("unexpected {:?}", ev.1);
            };
            match *t {
                Transfer::Chunk { id: 7, offset, .. } => {
                    assert_eq!(offset, chunks * 4096, "chunks out of order");
                    chunks += 1;
                }
                Transfer::Have { .. } => {
                    haves += 1;
                    chunks_before_last_have = chunks;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            chunks_before_last_have <= crate::transfer::OUTBOX_CHUNKS as u64,
            "round {round}: {chunks_before_last_have} chunks went before the control commands \
             queued after them"
        );
    }
}

/// An `Abort` sent after chunks of its transfer that still wait in the chunk queue
/// overtakes them: none follows it on the wire (the receiver would close the connection),
/// and the link goes on.
#[tokio::test]
async fn an_abort_overtakes_its_chunks_still_in_the_chunk_queue() {
    use crate::message::{AbortReason, Transfer};
    let (d, _drx, _a, mut arx) = memory_link().await;
    for n in 0..50 {
        d.send_chunk(chunk_at(n), Duration::from_secs(1))
            .await
            .unwrap();
    }
    d.send(Command::Transfer(Box::new(Transfer::Abort {
        id: 7,
        reason: AbortReason::Io,
        message: "given up".into(),
    })))
    .unwrap();
    d.send(Command::Transfer(Box::new(Transfer::Have { id: 99 })))
        .unwrap();
    let mut aborted = false;
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), recv(&mut arx))
            .await
            .expect("nothing came")
            .expect("the link closed");
        match ev.1 {
            LinkEvent::Transfer(t) => match *t {
                Transfer::Chunk { .. } => assert!(!aborted, "a chunk followed its Abort"),
                Transfer::Abort { id: 7, .. } => aborted = true,
                Transfer::Have { id: 99 } => break,
                other => panic!("unexpected {other:?}"),
            },
            LinkEvent::Closed { error } => panic!("the link closed: {error:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(aborted, "the Abort never came");
    // Still open: the next control command arrives too.
    d.send(Command::Transfer(Box::new(Transfer::Have { id: 100 })))
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(20), recv(&mut arx))
        .await
        .expect("nothing came")
        .expect("the link closed");
    assert!(
        matches!(ev.1, LinkEvent::Transfer(ref t) if matches!(**t, Transfer::Have { id: 100 })),
        "{:?}",
        ev.1
    );
}

/// Every event a link reports is moved several times on its way to the owner (the event,
/// the channel's slot, the owner's batch): kept within 128 bytes with its link id, a move
/// is a few inline stores, not a `memcpy` call (a boxed `AssignFailed`: was 136).
#[test]
fn a_link_event_with_its_link_id_fits_in_128_bytes() {
    assert!(
        std::mem::size_of::<(LinkId, LinkEvent)>() <= 128,
        "(LinkId, LinkEvent) is {} bytes",
        std::mem::size_of::<(LinkId, LinkEvent)>()
    );
}
