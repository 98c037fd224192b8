//! What the discovery backends of a node found, kept for every run.
//!
//! A node's backends start once ([`crate::Node::start`], which announces the node, or its
//! first run) and live as long as the node; each run needs their events. A keeper task reads
//! them as they come, so the
//! backends' queue never fills, and remembers the peers known now (at most [`MAX_KNOWN`]);
//! a run [subscribes](Sightings::subscribe) and gets those peers, then every later event.
//! The keeper waits only for a subscribed run to take events; meanwhile the backends that
//! watch a network drop what does not fit (see [`p2p_discovery::EVENT_QUEUE`]) and report it
//! again later.

use std::collections::HashMap;
use std::net::SocketAddr;

use p2p_discovery::{Event, Peer, EVENT_QUEUE};
use tokio::sync::mpsc;

/// The most peers remembered between runs; more are not remembered (a later run still gets
/// them when their backend reports them again).
pub const MAX_KNOWN: usize = 4096;

/// The handle on the keeper task; dropping it ends the task.
#[derive(Debug)]
pub(crate) struct Sightings {
    subscribe: mpsc::Sender<mpsc::Sender<Event>>,
    keeper: tokio::task::AbortHandle,
}

impl Drop for Sightings {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl Sightings {
    /// Starts keeping the events of `found`. Must be called inside a tokio runtime.
    pub(crate) fn start(found: mpsc::Receiver<Event>) -> Sightings {
        let (subscribe, subs) = mpsc::channel(4);
        let keeper = tokio::spawn(keep(found, subs)).abort_handle();
        Sightings { subscribe, keeper }
    }

    /// The peers known now (as `Discovered` events), then every later event, until the
    /// backends end or the next subscription replaces this one.
    pub(crate) fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        // Full only if four subscriptions are pending at once; then this one sees nothing.
        let _ = self.subscribe.try_send(tx);
        rx
    }
}

/// The key of a known peer: the backend that found it and its address (a `Lost` carries both).
type Key = (&'static str, SocketAddr);

async fn keep(mut found: mpsc::Receiver<Event>, mut subs: mpsc::Receiver<mpsc::Sender<Event>>) {
    let mut known: HashMap<Key, Peer> = HashMap::new();
    let mut current: Option<mpsc::Sender<Event>> = None;
    let mut open = true;
    loop {
        tokio::select! {
            ev = found.recv(), if open => {
                let Some(ev) = ev else {
                    // Every backend is done: the subscriber's stream ends too.
                    open = false;
                    current = None;
                    continue;
                };
                remember(&mut known, &ev);
                if let Some(tx) = &current {
                    if tx.send(ev).await.is_err() {
                        current = None;
                    }
                }
            }
            sub = subs.recv() => {
                let Some(tx) = sub else { return };
                let mut alive = true;
                for peer in known.values() {
                    if tx.send(Event::Discovered(peer.clone())).await.is_err() {
                        alive = false;
                        break;
                    }
                }
                current = (alive && open).then_some(tx);
            }
        }
    }
}

fn remember(known: &mut HashMap<Key, Peer>, ev: &Event) {
    match ev {
        Event::Discovered(p) => {
            let key = (p.source, p.addr);
            if known.len() < MAX_KNOWN || known.contains_key(&key) {
                known.insert(key, p.clone());
            }
        }
        Event::Lost { addr, source, .. } => {
            known.remove(&(*source, *addr));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    fn peer(port: u16) -> Peer {
        Peer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            node_id: None,
            types: None,
            capacity: None,
            source: "udp",
        }
    }

    /// Thousands of events with nobody subscribed never fill the backends' queue, and a
    /// later subscriber gets the peers still known, then what comes next.
    #[tokio::test]
    async fn events_are_drained_and_the_known_peers_replayed() {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let sightings = Sightings::start(rx);
        let bound = Duration::from_secs(20);
        for port in 1..=5000u16 {
            let sent = tokio::time::timeout(bound, tx.send(Event::Discovered(peer(port))));
            sent.await.expect("the keeper drains").unwrap();
            if port > 2 {
                let lost = Event::Lost {
                    addr: peer(port).addr,
                    node_id: None,
                    source: "udp",
                };
                tokio::time::timeout(bound, tx.send(lost))
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
        // Let the keeper take everything sent so far.
        while tx.capacity() < EVENT_QUEUE {
            tokio::task::yield_now().await;
        }
        let mut sub = sightings.subscribe();
        let mut ports = Vec::new();
        for _ in 0..2 {
            match tokio::time::timeout(bound, sub.recv()).await.unwrap() {
                Some(Event::Discovered(p)) => ports.push(p.addr.port()),
                other => panic!("expected a known peer, got {other:?}"),
            }
        }
        ports.sort_unstable();
        assert_eq!(ports, [1, 2]);
        tx.send(Event::Discovered(peer(9))).await.unwrap();
        match tokio::time::timeout(bound, sub.recv()).await.unwrap() {
            Some(Event::Discovered(p)) => assert_eq!(p.addr.port(), 9),
            other => panic!("expected the new peer, got {other:?}"),
        }
        drop(tx);
        assert_eq!(tokio::time::timeout(bound, sub.recv()).await.unwrap(), None);
    }

    #[test]
    fn at_most_max_known_peers_are_remembered() {
        let mut known = HashMap::new();
        for port in 0..(MAX_KNOWN as u16 + 100) {
            remember(&mut known, &Event::Discovered(peer(port)));
        }
        assert_eq!(known.len(), MAX_KNOWN);
    }
}
