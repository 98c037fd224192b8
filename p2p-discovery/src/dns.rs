//! The `dns:NAME[:PORT]` backend: every address a DNS name resolves to is a peer.
//!
//! Made for Kubernetes headless services and round-robin DNS. The name is resolved at start
//! and then every [`Dns::interval`] (default 10 s): a new address is reported as
//! [`Event::Discovered`], an address that disappeared as [`Event::Lost`]. DNS gives only
//! addresses; the handshake tells each node's id, types and capacity. A failed lookup keeps
//! the previous set (a resolver hiccup is not the loss of every peer).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use crate::{Context, Discovery, Error, Event, Peer};

/// Bound on one lookup.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// The `dns` backend.
#[derive(Debug, Clone)]
pub struct Dns {
    name: String,
    port: u16,
    interval: Duration,
}

impl Dns {
    /// Resolves `name`, connecting to `port` on each address.
    pub fn new(name: impl Into<String>, port: u16) -> Self {
        Dns {
            name: name.into(),
            port,
            interval: Duration::from_secs(10),
        }
    }

    /// How often the name is resolved again. Default 10 s (at least 100 ms).
    pub fn interval(mut self, every: Duration) -> Self {
        self.interval = every.max(Duration::from_millis(100));
        self
    }
}

async fn resolve(target: &str) -> Option<BTreeSet<SocketAddr>> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(target)).await {
        Ok(Ok(addrs)) => Some(addrs.collect()),
        Ok(Err(e)) => {
            tracing::warn!(name = %target, error = %e, "dns discovery: lookup failed");
            None
        }
        Err(_) => {
            tracing::warn!(name = %target, "dns discovery: lookup timed out");
            None
        }
    }
}

impl Discovery for Dns {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn start(self: Box<Self>, ctx: Context) -> Result<(), Error> {
        if self.name.is_empty() {
            return Err(Error::Config("dns discovery needs a name".into()));
        }
        let target = format!("{}:{}", self.name, self.port);
        tokio::spawn(async move {
            let mut known: BTreeSet<SocketAddr> = BTreeSet::new();
            loop {
                let found = tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    r = resolve(&target) => r,
                };
                if let Some(now) = found {
                    let mut events = Vec::new();
                    for addr in now.difference(&known) {
                        events.push(Event::Discovered(Peer {
                            addr: *addr,
                            node_id: None,
                            types: None,
                            capacity: None,
                            source: "dns",
                        }));
                    }
                    for addr in known.difference(&now) {
                        events.push(Event::Lost {
                            addr: *addr,
                            node_id: None,
                            source: "dns",
                        });
                    }
                    // Never wait for the consumer: an address whose event is dropped (the
                    // queue is full) is left out of `known`, so the next lookup reports it
                    // again; a dropped `Lost` stays in `known` for the same reason.
                    let mut tx = Some(ctx.events.clone());
                    for ev in events {
                        let addr = match &ev {
                            Event::Discovered(p) => p.addr,
                            Event::Lost { addr, .. } => *addr,
                        };
                        let lost = matches!(ev, Event::Lost { .. });
                        match crate::offer(&mut tx, ev) {
                            crate::Offered::Sent if lost => {
                                known.remove(&addr);
                            }
                            crate::Offered::Sent => {
                                known.insert(addr);
                            }
                            crate::Offered::Dropped => {
                                tracing::debug!(peer = %addr, "dns discovery: event queue full; reported again next lookup");
                            }
                            crate::Offered::Closed => return,
                        }
                    }
                }
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = ctx.events.closed() => return,
                    _ = tokio::time::sleep(self.interval) => {}
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::start_all;

    #[tokio::test]
    async fn localhost_resolves_to_loopback_peers() {
        let stop = CancellationToken::new();
        let backend = Dns::new("localhost", 7499).interval(Duration::from_secs(60));
        let mut rx = start_all(vec![Box::new(backend)], None, stop.clone()).unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        match first {
            Event::Discovered(p) => {
                assert!(p.addr.ip().is_loopback(), "{p:?}");
                assert_eq!((p.addr.port(), p.source), (7499, "dns"));
            }
            other => panic!("unexpected {other:?}"),
        }
        stop.cancel();
    }
}
