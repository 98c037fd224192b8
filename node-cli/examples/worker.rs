//! An embedded worker: a node that serves type `sq` with a Rust closure, until Ctrl-C.
//!
//! ```sh
//! cargo run -p node-cli --example worker -- 127.0.0.1:7401
//! cargo run -p node-cli --example coordinator -- 127.0.0.1:7401     # in another terminal
//! ```

use std::net::SocketAddr;

use node_cli::{handler_fn, Node, TaskOutcome};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7401".into())
        .parse()?;
    let mut node = Node::builder()
        .listen(listen)
        .capacity(4)
        .handler(
            "sq",
            handler_fn(|req| async move {
                match req.id.trim_start_matches("sq").parse::<u64>() {
                    Ok(n) => TaskOutcome::success(format!("{n}^2 = {}", n * n)),
                    Err(_) => TaskOutcome::failure(format!("{} has no number", req.id)),
                }
            }),
        )
        .build()
        .await?;
    node.start()?;
    println!(
        "worker {} serving sq on {}; Ctrl-C to stop",
        node.id().short(),
        node.local_addr().ok_or("not listening")?
    );
    let token = node.shutdown_token();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
    });
    // Drains on shutdown: running tasks finish and every peer gets a goodbye.
    node.shutdown_token().cancelled().await;
    node.drain().await;
    Ok(())
}
