//! In-memory links, and a file put in a cache, for the crate's unit tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use p2p_core::net::{accept_memory, connect_memory, pipe, Link, LinkEvent, LinkId, Settings};
use tokio::sync::mpsc::Receiver;

/// A dialled in-memory link (link 2, capacity `window`) and its far end (link 1, serving
/// type `a`), with the events of each: (dialler, acceptor, the dialler's events, the
/// acceptor's events), each channel `events` deep.
pub(crate) async fn linked(
    window: u32,
    events: usize,
) -> (
    Link,
    Link,
    Receiver<(LinkId, LinkEvent)>,
    Receiver<(LinkId, LinkEvent)>,
) {
    let (dial_end, accept_end) = pipe(window);
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (atx, arx) = tokio::sync::mpsc::channel(events);
    let acceptor = tokio::spawn(async move {
        let me = p2p_core::testing::hello("default", &["a"], window);
        accept_memory(accept_end, addr, me, &Settings::default(), 1, atx).await
    });
    let (dtx, drx) = tokio::sync::mpsc::channel(events);
    let me = p2p_core::testing::hello("default", &[], window);
    let d = connect_memory(dial_end, addr, me, &Settings::default(), 2, dtx)
        .await
        .unwrap();
    let a = acceptor.await.unwrap().unwrap();
    (d, a, drx, arx)
}

/// Receives `bytes` into `c` (unpinned), as a checked transfer does: their hash and file.
pub(crate) fn put(
    c: &mut crate::cache::Cache,
    bytes: &[u8],
) -> (p2p_core::ContentHash, std::path::PathBuf) {
    let mut p = c.partial().unwrap();
    std::io::Write::write_all(&mut p, bytes).unwrap();
    let hash = p2p_core::transfer::hash_bytes(bytes);
    let path = c.commit(p, hash, bytes.len() as u64).unwrap();
    c.unpin(&hash);
    (hash, path)
}
