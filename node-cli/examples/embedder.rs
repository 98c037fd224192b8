//! The program an embedder writes (issue #15): it builds against
//! `node-cli = { path = "...", default-features = false }` and `tokio` alone.
//!
//! Run with `cargo run -p node-cli --no-default-features --example embedder`.

use std::time::Duration;

use node_cli::{handler_fn, Node, RunEvent, RunOptions, Task, TaskOutcome};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut worker = Node::builder()
        .handler(
            "resize",
            handler_fn(|req| async move { TaskOutcome::success(format!("resized {}", req.id)) }),
        )
        .build()
        .await?;
    worker.start()?;
    let addr = worker.local_addr().ok_or("the worker is not listening")?;

    let mut coordinator = Node::builder().build().await?;
    // A task's id need not start with its type.
    let tasks = vec![
        Task::new("photo-001.jpg", "resize")?,
        Task::new("photo-002.jpg", "resize")?,
    ];
    let mut completed = 0;
    let report = coordinator
        .run(tasks)
        .options(RunOptions::default())
        .peer(addr)
        .on_event(|ev| {
            if let RunEvent::TaskCompleted { .. } = ev {
                completed += 1;
            }
        })
        .await?;
    assert!(report.is_success(), "both tasks succeed");
    assert_eq!(completed, 2, "one TaskCompleted per task");

    // A plan its order cannot run is an error from the library, not a hang.
    let bad = node_cli::parse("inline", "a1 after b2\nb2")?;
    let second =
        tokio::time::timeout(Duration::from_secs(10), coordinator.run(bad).peer(addr)).await;
    assert!(
        matches!(second, Ok(Err(_))),
        "an unrunnable plan returns an error at once"
    );

    worker.shutdown();
    worker.drain().await;
    println!("embedded: 2 tasks ran through node_cli alone; an unrunnable plan was refused");
    Ok(())
}
