//! The `static` backend: a fixed list of `HOST:PORT` addresses (`--peer`).
//!
//! Each entry is resolved (a host name may give several addresses, each reported), reported
//! once as [`Event::Discovered`], and then the backend is done. Retrying a peer that is down
//! is the dialer's job, not discovery's.

use std::time::Duration;

use crate::{Context, Discovery, Error, Event, Peer};

/// How long resolving one entry may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

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
            for entry in self.peers {
                let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(&entry));
                let addrs = tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    r = lookup => r,
                };
                match addrs {
                    Ok(Ok(addrs)) => {
                        for addr in addrs {
                            let peer = Peer {
                                addr,
                                node_id: None,
                                types: None,
                                capacity: None,
                                source: "static",
                            };
                            if ctx.events.send(Event::Discovered(peer)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(Err(e)) => tracing::warn!(peer = %entry, error = %e, "cannot resolve peer"),
                    Err(_) => tracing::warn!(peer = %entry, "resolving peer timed out"),
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
