//! Embeds two nodes in one program: a worker whose handler is a Rust closure, and a
//! coordinator that runs a small plan on it over loopback TCP.
//!
//! Run with `cargo run -p node-cli --example embedded`.

use std::time::Duration;

use node_cli::{handler_fn, parse, Node, RunEvent, TaskOutcome};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A worker serving type "sq": squares the number in the task id.
    let mut worker = Node::builder()
        .handler(
            "sq",
            handler_fn(|req| async move {
                let n: u64 = req.id.trim_start_matches("sq").parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(5)).await;
                TaskOutcome::success(format!("{n}^2 = {}", n * n))
            }),
        )
        .capacity(4)
        .build()
        .await?;
    worker.start()?;
    let addr = worker.local_addr().ok_or("the worker is not listening")?;
    println!("worker {} serving on {addr}", worker.id().short());

    // A coordinator: runs the plan over the worker, printing each result.
    let mut coordinator = Node::builder().build().await?;
    let tasks = parse("inline", "sq1 sq2 sq3 sq4 sq5")?;
    let report = coordinator
        .run(tasks)
        .peer(addr)
        .on_event(|ev| {
            if let RunEvent::TaskCompleted { task, output, .. } = ev {
                println!("{task}: {output}");
            }
        })
        .await?;
    println!(
        "{} of {} tasks succeeded",
        report.succeeded(),
        report.results.len()
    );

    worker.shutdown();
    worker.drain().await;
    if report.is_success() {
        Ok(())
    } else {
        Err("some tasks failed".into())
    }
}
