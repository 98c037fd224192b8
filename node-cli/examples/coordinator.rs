//! An embedded coordinator: runs a plan over the workers given on the command line and
//! prints the run's events from the event stream.
//!
//! ```sh
//! cargo run -p node-cli --example worker -- 127.0.0.1:7401
//! cargo run -p node-cli --example coordinator -- 127.0.0.1:7401
//! ```

use node_cli::Node;
use p2p_tasks::{parse, Order, Policy, RunEvent, RunOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let peers: Vec<String> = std::env::args().skip(1).collect();
    if peers.is_empty() {
        return Err("usage: coordinator HOST:PORT...".into());
    }
    let tasks = parse::parse("inline", "sq1 sq2 sq3 sq4\nsq5 after sq1 sq2")?;
    let opts = RunOptions {
        policy: Policy {
            order: Order::None,
            retries: 1,
            ..Policy::default()
        },
        ..RunOptions::default()
    };
    let mut node = Node::builder().build().await?;
    let (mut events, report) = node.run_stream(tasks, opts, peers);
    let print = async {
        while let Some(ev) = events.recv().await {
            match ev {
                RunEvent::TaskCompleted { task, output, .. } => println!("{task}: {output}"),
                RunEvent::TaskFailed { task, error, .. } => println!("{task} failed: {error}"),
                RunEvent::Summary {
                    succeeded, total, ..
                } => {
                    println!("{succeeded} of {total} succeeded")
                }
                _ => {}
            }
        }
    };
    let (report, ()) = tokio::join!(report, print);
    if report?.is_success() {
        Ok(())
    } else {
        Err("some tasks failed".into())
    }
}
