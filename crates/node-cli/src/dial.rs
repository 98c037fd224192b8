//! The dialer of a run: turns discovered peers into established links.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use p2p_core::net::{self, EventSender, Settings};
use p2p_core::Hello;
use p2p_discovery::Event;
use p2p_tasks::PeerUpdate;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// First delay between attempts to reach a peer that is down; doubles up to 1 s.
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// Dials every newly discovered address (once), retrying a peer that is down with
/// back-off for at most `give_up_after`, and hands established links to the coordinator.
/// Ends — dropping `peers`, which tells the coordinator no more peers will come — when
/// discovery has ended and no dial is pending, or when `stop` fires.
pub(crate) async fn run(
    mut found: mpsc::Receiver<Event>,
    hello: Hello,
    settings: Settings,
    give_up_after: Duration,
    peers: mpsc::Sender<PeerUpdate>,
    links: EventSender,
    stop: CancellationToken,
) {
    let mut seen: HashSet<SocketAddr> = HashSet::new();
    let mut dials: JoinSet<()> = JoinSet::new();
    let mut next_id = 0u64;
    let mut discovery_open = true;
    loop {
        if !discovery_open && dials.is_empty() {
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            ev = found.recv(), if discovery_open => match ev {
                None => discovery_open = false,
                Some(Event::Discovered(p)) => {
                    if !seen.insert(p.addr) {
                        continue;
                    }
                    let update = PeerUpdate::Discovered { addr: p.addr.to_string(), source: p.source.to_string() };
                    if peers.send(update).await.is_err() {
                        return;
                    }
                    next_id += 1;
                    dials.spawn(dial_one(
                        p.addr,
                        hello.clone(),
                        settings.clone(),
                        next_id,
                        give_up_after,
                        peers.clone(),
                        links.clone(),
                        stop.clone(),
                    ));
                }
                Some(Event::Lost { .. }) => {
                    // A lost peer's connection fails on its own (heartbeats); nothing to do.
                }
            },
            Some(_) = dials.join_next(), if !dials.is_empty() => {}
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn dial_one(
    addr: SocketAddr,
    hello: Hello,
    settings: Settings,
    id: u64,
    give_up_after: Duration,
    peers: mpsc::Sender<PeerUpdate>,
    links: EventSender,
    stop: CancellationToken,
) {
    let give_up = tokio::time::Instant::now() + give_up_after;
    let mut delay = RETRY_FIRST;
    loop {
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = net::connect(addr, hello.clone(), &settings, id, links.clone()) => r,
        };
        let error = match attempt {
            Ok(link) => {
                if let Err(mpsc::error::SendError(PeerUpdate::Connected(link))) =
                    peers.send(PeerUpdate::Connected(link)).await
                {
                    let _ = link.send(net::Command::Abort);
                }
                return;
            }
            Err(e) => e,
        };
        // A refusal by the peer (other cluster, version) will not change: give up now.
        let permanent = matches!(
            error,
            p2p_core::Error::Rejected { .. } | p2p_core::Error::Refused { .. }
        );
        if permanent || tokio::time::Instant::now() + delay > give_up {
            let _ = peers
                .send(PeerUpdate::Unreachable {
                    addr: addr.to_string(),
                    error: error.to_string(),
                })
                .await;
            return;
        }
        tracing::debug!(peer = %addr, error = %error, retry_in = ?delay, "peer unreachable; retrying");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}
