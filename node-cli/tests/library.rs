//! The library as an embedder uses it: in-process nodes over loopback TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::IntoFuture;
use std::time::Duration;

use node_cli::{handler_fn, parse, Node, RunEvent, TaskOutcome};

/// Generous: the machine may be loaded.
const BOUND: Duration = Duration::from_secs(60);

async fn worker(kind: &str) -> Node {
    let mut node = Node::builder()
        .handler(
            kind,
            handler_fn(|req| async move { TaskOutcome::success(format!("did {}", req.id)) }),
        )
        .build()
        .await
        .unwrap();
    node.start().unwrap();
    node
}

/// The event stream of a run carries what `on_event` sees, in the same order, and ends
/// with the run.
#[tokio::test]
async fn a_runs_event_stream_matches_its_callback_and_ends_with_the_run() {
    let w = worker("a").await;
    let addr = w.local_addr().unwrap();
    let mut coordinator = Node::builder().build().await.unwrap();
    let mut seen = Vec::new();
    let mut run = coordinator
        .run(parse("inline", "a1 a2 a3").unwrap())
        .peer(addr)
        .on_event(|ev| seen.push(format!("{ev:?}")));
    let mut events = run.events();
    let collect = async {
        let mut got = Vec::new();
        while let Some(ev) = events.next().await {
            got.push(ev);
        }
        got
    };
    let (report, streamed) =
        tokio::time::timeout(BOUND, async { tokio::join!(run.into_future(), collect) })
            .await
            .expect("the run ends");
    assert!(report.unwrap().is_success());
    let completed = streamed
        .iter()
        .filter(|ev| matches!(ev, RunEvent::TaskCompleted { .. }))
        .count();
    assert_eq!(completed, 3);
    let streamed: Vec<String> = streamed.iter().map(|ev| format!("{ev:?}")).collect();
    assert_eq!(streamed, seen);
    assert_eq!(events.missed(), 0);
}

/// Discovery belongs to the node: it starts once, and every run of the node gets its peers
/// (here a static backend, loopback only).
#[tokio::test]
async fn every_run_of_a_node_finds_the_peers_of_its_discovery() {
    let w = worker("a").await;
    let addr = w.local_addr().unwrap();
    let mut coordinator = Node::builder()
        .peers(vec![addr.to_string()])
        .build()
        .await
        .unwrap();
    for round in 1..=3 {
        let run = coordinator.run(parse("inline", "a1 a2").unwrap());
        let report = tokio::time::timeout(BOUND, run.into_future())
            .await
            .expect("the run ends")
            .unwrap();
        assert!(
            report.is_success(),
            "run {round} found the worker: {report:?}"
        );
    }
}

/// Dropping a node closes its listener: nothing accepts on its port any more.
#[tokio::test]
async fn a_dropped_node_stops_listening() {
    let w = worker("a").await;
    let addr = w.local_addr().unwrap();
    tokio::net::TcpStream::connect(addr)
        .await
        .expect("it listens while it lives");
    drop(w);
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ if tokio::time::Instant::now() > deadline => {
                panic!("{addr} still accepts connections after the node was dropped")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Sends on `dropped` when the handler's future is dropped (its task stopped).
struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for Dropped {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Dropping a run's future mid-run ends its connections: the worker stops the task it was
/// running for it (a connection that closes takes its tasks with it).
#[tokio::test]
async fn dropping_a_run_mid_run_ends_its_connections() {
    let (started_tx, started_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
    let dropped = std::sync::Mutex::new(Some(dropped_tx));
    let dropped = std::sync::Arc::new(dropped);
    let mut w = Node::builder()
        .handler(
            "a",
            handler_fn(move |_req| {
                let (started, dropped) = (started_tx.clone(), dropped.clone());
                async move {
                    let _guard = Dropped(dropped.lock().unwrap().take());
                    let _ = started.send(()).await;
                    std::future::pending::<TaskOutcome>().await
                }
            }),
        )
        .build()
        .await
        .unwrap();
    w.start().unwrap();
    let addr = w.local_addr().unwrap();
    let mut coordinator = Node::builder().build().await.unwrap();
    let mut run = coordinator
        .run(parse("inline", "a1").unwrap())
        .peer(addr)
        .into_future();
    let mut started_rx = started_rx;
    tokio::select! {
        r = &mut run => panic!("the run ended while its task runs: {r:?}"),
        s = tokio::time::timeout(BOUND, started_rx.recv()) => s.expect("the task starts").unwrap(),
    }
    drop(run);
    tokio::time::timeout(BOUND, dropped_rx)
        .await
        .expect("the worker stops the task of the dropped run")
        .unwrap();
    drop(coordinator);
}

/// Dropping a run's future stops its dialer: a peer that keeps failing its handshake is not
/// dialled again once the run is gone (before, a detached dialer went on retrying until the
/// discovery timeout).
#[tokio::test]
async fn dropping_a_run_stops_its_dialer() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let (tick_tx, mut tick_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let counter = accepted.clone();
    let acceptor = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // Closed at once: every handshake fails, and the dialer retries.
            drop(stream);
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = tick_tx.send(());
        }
    });
    let mut coordinator = Node::builder().build().await.unwrap();
    let opts = node_cli::RunOptions::default().discovery_timeout(Duration::from_secs(600));
    let mut run = coordinator
        .run(parse("inline", "a1").unwrap())
        .options(opts)
        .peer(addr)
        .into_future();
    // Until the dialer has come back once (it is retrying).
    for _ in 0..2 {
        tokio::select! {
            r = &mut run => panic!("the run ended: {r:?}"),
            t = tokio::time::timeout(BOUND, tick_rx.recv()) => t.expect("the peer is dialled").unwrap(),
        }
    }
    drop(run);
    // A dial in flight at the drop may still arrive; then nothing more. The dialer retries
    // at least once a second (docs: 100 ms doubling to 1 s), so 3 s would show it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = accepted.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        settled,
        "the dropped run's dialer still dials"
    );
    acceptor.abort();
}

/// Library errors are asked by variant and name no flag of the CLI.
#[tokio::test]
async fn an_exposed_listener_without_a_key_is_refused_by_variant() {
    let err = Node::builder()
        .builtin("a")
        .listen("0.0.0.0:0".parse().unwrap())
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            node_cli::Error::Unprotected {
                endpoint: node_cli::Endpoint::Listen,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.to_string().contains("--"), "names a flag: {err}");
    // The plan error of an unrunnable order is typed too.
    let mut coordinator = Node::builder().build().await.unwrap();
    let err = coordinator
        .run(parse("inline", "a1 after b2\nb2").unwrap())
        .await
        .unwrap_err();
    match err {
        node_cli::Error::Plan(node_cli::TasksError::Plan(node_cli::PlanError::Cycle {
            order,
            cycle,
        })) => {
            assert_eq!(order, node_cli::Order::Strict);
            assert_eq!(cycle, ["a1", "b2"]);
        }
        other => panic!("{other:?}"),
    }
}

/// The event stream is bounded: a consumer that takes nothing until the run is over gets
/// at most `EVENT_QUEUE` events, and the rest are counted as missed, not queued.
#[tokio::test]
async fn an_unread_event_stream_holds_at_most_its_bound() {
    let w = worker("a").await;
    let addr = w.local_addr().unwrap();
    let mut coordinator = Node::builder().build().await.unwrap();
    let text: Vec<String> = (1..=3000).map(|i| format!("a{i}")).collect();
    let mut total = 0u64;
    let mut run = coordinator
        .run(parse("inline", &text.join(" ")).unwrap())
        .options(node_cli::RunOptions::default().order(node_cli::Order::None))
        .peer(addr)
        .on_event(|_| total += 1);
    let mut events = run.events();
    let report = tokio::time::timeout(BOUND, run.into_future())
        .await
        .expect("the run ends without anyone reading its events")
        .unwrap();
    assert!(report.is_success());
    let mut queued = 0u64;
    while events.next().await.is_some() {
        queued += 1;
    }
    assert!(total > node_cli::EVENT_QUEUE as u64, "{total} events");
    assert_eq!(queued, node_cli::EVENT_QUEUE as u64);
    assert_eq!(queued + events.missed(), total);
}
