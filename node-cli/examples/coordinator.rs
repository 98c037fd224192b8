//! An embedded coordinator: runs a plan over the workers given on the command line and
//! prints the run's events from the event stream.
//!
//! ```sh
//! cargo run -p node-cli --example worker -- 127.0.0.1:7401
//! cargo run -p node-cli --example coordinator -- 127.0.0.1:7401
//! ```

use std::future::IntoFuture;
use std::net::SocketAddr;

use node_cli::{parse, Node, Order, RunEvent, RunOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let peers = std::env::args()
        .skip(1)
        .map(|a| a.parse::<SocketAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    if peers.is_empty() {
        return Err("usage: coordinator IP:PORT...".into());
    }
    let tasks = parse("inline", "sq1 sq2 sq3 sq4\nsq5 after sq1 sq2")?;
    let opts = RunOptions::default().order(Order::None).retries(1);
    let mut node = Node::builder().build().await?;
    let mut run = node.run(tasks).options(opts).peers(peers);
    let mut events = run.events();
    let print = async {
        while let Some(ev) = events.next().await {
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
    let (report, ()) = tokio::join!(run.into_future(), print);
    if report?.is_success() {
        Ok(())
    } else {
        Err("some tasks failed".into())
    }
}
