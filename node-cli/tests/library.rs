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
