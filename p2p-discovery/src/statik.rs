//! The `static` backend: a fixed list of `HOST:PORT` addresses (`--peer`).
//!
//! Each entry is resolved (a host name may give several addresses, each reported), reported
//! once as [`Event::Discovered`], and then the backend is done. Entries that are addresses
//! (`IP:PORT`) are reported first, in order, at once; names are resolved up to
//! [`MAX_RESOLVING`] at a time, each bounded by [`RESOLVE_TIMEOUT`], and reported as they
//! resolve, so a list of a thousand nodes with some names that never resolve waits for none
//! of them. Retrying a peer that is down
//! is the dialer's job, not discovery's.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::{Context, Discovery, Error, Event, Peer};

/// How long resolving one entry may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Most names resolved at once.
pub const MAX_RESOLVING: usize = 16;

/// Reports `addr` as found; false once nobody listens.
async fn report(ctx: &Context, addr: SocketAddr) -> bool {
    let peer = Peer {
        addr,
        node_id: None,
        types: None,
        capacity: None,
        source: "static",
    };
    ctx.events.send(Event::Discovered(peer)).await.is_ok()
}

/// The `static` backend.
#[derive(Debug, Clone, Default)]
pub struct Static {
    peers: Vec<String>,
}

impl Static {
    /// A backend reporting these `HOST:PORT` entries.
    pub fn new(peers: Vec<String>) -> Self {
        Static { peers }
    }
}

impl Discovery for Static {
    fn name(&self) -> &'static str {
        "static"
    }

    fn start(self: Box<Self>, ctx: Context) -> Result<(), Error> {
        // Literal addresses are checked now, so a typo is a usage error, not a silent miss.
        for p in &self.peers {
            if !p.contains(':') {
                return Err(Error::Resolve {
                    addr: p.clone(),
                    reason: "expected HOST:PORT".into(),
                });
            }
        }
        tokio::spawn(async move {
            // Addresses first, in order, at once; then the names, resolved up to
            // MAX_RESOLVING at a time and reported as each resolves, so that a name whose
            // lookup hangs holds up neither the addresses nor the other names.
            let mut names = Vec::new();
            for entry in self.peers {
                match entry.parse::<SocketAddr>() {
                    Ok(addr) => {
                        if !report(&ctx, addr).await {
                            return;
                        }
                    }
                    Err(_) => names.push(entry),
                }
            }
            let mut names = names.into_iter();
            let mut resolving = JoinSet::new();
            loop {
                while resolving.len() < MAX_RESOLVING {
                    let Some(entry) = names.next() else { break };
                    resolving.spawn(async move {
                        let lookup = tokio::net::lookup_host(entry.clone());
                        (entry, tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await)
                    });
                }
                let done = tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    done = resolving.join_next() => done,
                };
                let Some(done) = done else { return };
                match done {
                    Ok((_, Ok(Ok(addrs)))) => {
                        for addr in addrs {
                            if !report(&ctx, addr).await {
                                return;
                            }
                        }
                    }
                    Ok((entry, Ok(Err(e)))) => {
                        tracing::warn!(peer = %entry, error = %e, "cannot resolve peer")
                    }
                    Ok((entry, Err(_))) => {
                        tracing::warn!(peer = %entry, "resolving peer timed out")
                    }
                    Err(_) => {}
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
    async fn reports_each_address_then_ends() {
        let backend = Static::new(vec!["127.0.0.1:7401".into(), "[::1]:7402".into()]);
        let mut rx = start_all(vec![Box::new(backend)], None, CancellationToken::new()).unwrap();
        let mut ports = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Discovered(p) => {
                    assert_eq!(p.source, "static");
                    ports.push(p.addr.port());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(ports, vec![7401, 7402]);
    }

    #[tokio::test]
    async fn addresses_are_reported_at_once_ahead_of_names() {
        let entries = [
            "localhost:7401",
            "127.0.0.1:7402",
            "localhost:7403",
            "[::1]:7404",
        ];
        let backend = Static::new(entries.iter().map(|e| e.to_string()).collect());
        let mut rx = start_all(vec![Box::new(backend)], None, CancellationToken::new()).unwrap();
        let mut ports = Vec::new();
        while let Some(ev) = rx.recv().await {
            if let Event::Discovered(p) = ev {
                ports.push(p.addr.port());
            }
        }
        // The two addresses first, in order; then the names' addresses (localhost may give
        // two each), in any order.
        assert_eq!(ports[..2], [7402, 7404], "{ports:?}");
        let mut rest: Vec<u16> = ports[2..].to_vec();
        rest.dedup();
        rest.sort_unstable();
        rest.dedup();
        assert_eq!(rest, [7401, 7403], "{ports:?}");
    }

    #[test]
    fn an_entry_without_port_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let backend = Static::new(vec!["localhost".into()]);
        let err = rt
            .block_on(async { start_all(vec![Box::new(backend)], None, CancellationToken::new()) })
            .unwrap_err();
        assert!(err.to_string().contains("HOST:PORT"), "{err}");
    }
}
