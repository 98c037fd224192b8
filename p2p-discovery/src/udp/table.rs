//! The peer table of the `udp` backend: no sockets and no clock of its own (time is passed
//! in), so every rule is tested without a network.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use p2p_core::NodeId;
use tokio::time::Instant;

use crate::beacon::{Beacon, DecodeError, Kind};
use crate::{Event, Peer};

/// The shortest and longest peer interval believed; a beacon claiming less or more is
/// clamped, so a broken or hostile sender cannot make peers churn or live forever.
const MIN_INTERVAL: Duration = Duration::from_millis(10);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// The most peers a table holds. A new peer beyond it pushes out the one heard from least
/// recently (reported lost): a flood of forged announces with random node ids costs bounded
/// memory, and a live peer, heard every interval, is the last to go.
pub(crate) const MAX_PEERS: usize = 4096;

/// What one datagram amounted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Not a beacon (bad magic, truncated, bad field).
    Malformed,
    /// A beacon of another version.
    Unsupported,
    /// A beacon of another cluster.
    Foreign,
    /// This node's own beacon (multicast loop).
    Own,
    /// An announce of a loopback address that came from another host: unreachable there.
    Unreachable,
    /// A query: this node should announce itself now.
    Query,
    /// A known peer's beacon: nothing new to report.
    Seen,
    /// A peer was found, changed, or left.
    Event(Event),
}

struct Entry {
    peer: Peer,
    deadline: Instant,
    heard: Instant,
}

/// Known peers by node id, each with the time it expires.
pub(crate) struct Table {
    cluster: String,
    me: NodeId,
    missed: u32,
    peers: HashMap<NodeId, Entry>,
    max: usize,
    /// Peers pushed out by newer ones, not yet reported lost (see [`Table::take_evicted`]).
    evicted: Vec<Event>,
}

impl Table {
    /// A table for node `me` in `cluster`; a peer expires after `missed` of its intervals
    /// without a beacon.
    pub(crate) fn new(cluster: String, me: NodeId, missed: u32) -> Table {
        Table {
            cluster,
            me,
            missed: missed.max(1),
            peers: HashMap::new(),
            max: MAX_PEERS,
            evicted: Vec::new(),
        }
    }

    /// The same table holding at most `max` peers (at least 1), for tests.
    #[cfg(test)]
    pub(crate) fn with_max(mut self, max: usize) -> Table {
        self.max = max.max(1);
        self
    }

    /// Handles one datagram that came from `from` at `now`.
    pub(crate) fn handle(&mut self, now: Instant, datagram: &[u8], from: SocketAddr) -> Outcome {
        let beacon = match Beacon::decode(datagram) {
            Ok(b) => b,
            Err(DecodeError::Version(_)) => return Outcome::Unsupported,
            Err(_) => return Outcome::Malformed,
        };
        if beacon.cluster != self.cluster {
            return Outcome::Foreign;
        }
        if beacon.node_id == self.me {
            return Outcome::Own;
        }
        match beacon.kind {
            Kind::Query => Outcome::Query,
            Kind::Leaving => match self.peers.remove(&beacon.node_id) {
                Some(e) => Outcome::Event(lost(&e.peer)),
                None => Outcome::Seen,
            },
            Kind::Announce => self.announce(now, beacon, from),
        }
    }

    fn announce(&mut self, now: Instant, beacon: Beacon, from: SocketAddr) -> Outcome {
        let Some(mut addr) = beacon.addr else {
            return Outcome::Malformed;
        };
        if addr.ip().is_unspecified() {
            // "Where this datagram came from": the sender listens on every interface.
            addr.set_ip(from.ip());
        }
        if addr.ip().is_loopback() && !from.ip().is_loopback() {
            return Outcome::Unreachable;
        }
        let interval =
            Duration::from_millis(u64::from(beacon.interval_ms)).clamp(MIN_INTERVAL, MAX_INTERVAL);
        let deadline = now + interval * self.missed;
        let types = Some(beacon.types);
        let capacity = Some(beacon.capacity);
        if let Some(e) = self.peers.get_mut(&beacon.node_id) {
            e.deadline = deadline;
            e.heard = now;
            if e.peer.types == types && e.peer.capacity == capacity {
                return Outcome::Seen;
            }
            // New details: reported again, at the address first seen (a node announcing on
            // several interfaces keeps one address, so it is dialled once).
            e.peer.types = types;
            e.peer.capacity = capacity;
            return Outcome::Event(Event::Discovered(e.peer.clone()));
        }
        let peer = Peer {
            addr,
            node_id: Some(beacon.node_id),
            types,
            capacity,
            source: "udp",
        };
        if self.peers.len() >= self.max {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(_, e)| e.heard)
                .map(|(id, _)| *id);
            if let Some(e) = oldest.and_then(|id| self.peers.remove(&id)) {
                self.evicted.push(lost(&e.peer));
            }
        }
        self.peers.insert(
            beacon.node_id,
            Entry {
                peer: peer.clone(),
                deadline,
                heard: now,
            },
        );
        Outcome::Event(Event::Discovered(peer))
    }

    /// Removes and reports the peers whose deadline is `now` or earlier.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Event> {
        let gone: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        gone.iter()
            .filter_map(|id| self.peers.remove(id))
            .map(|e| lost(&e.peer))
            .collect()
    }

    /// The `Lost` events of peers pushed out of a full table since the last call.
    pub(crate) fn take_evicted(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.evicted)
    }

    /// Forgets a peer without reporting it (its `Discovered` event could not be delivered),
    /// so that its next beacon reports it again.
    pub(crate) fn forget(&mut self, id: &NodeId) {
        self.peers.remove(id);
    }

    /// When the next peer expires, if any is known.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.peers.values().map(|e| e.deadline).min()
    }

    /// How many peers are known.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }
}

fn lost(p: &Peer) -> Event {
    Event::Lost {
        addr: p.addr,
        node_id: p.node_id,
        source: "udp",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn beacon(kind: Kind, id: u8, cluster: &str) -> Vec<u8> {
        Beacon {
            kind,
            cluster: cluster.into(),
            node_id: NodeId([id; 16]),
            interval_ms: 1000,
            addr: Some(format!("10.0.0.{id}:7400").parse().unwrap()),
            types: vec!["a".into()],
            capacity: 2,
        }
        .encode()
        .unwrap()
    }

    fn from(id: u8) -> SocketAddr {
        format!("10.0.0.{id}:7450").parse().unwrap()
    }

    #[test]
    fn finds_refreshes_and_expires_peers() {
        let t0 = Instant::now();
        let mut t = Table::new("c".into(), NodeId([1; 16]), 3);
        let Outcome::Event(Event::Discovered(p)) =
            t.handle(t0, &beacon(Kind::Announce, 2, "c"), from(2))
        else {
            panic!("expected Discovered");
        };
        assert_eq!(p.addr, "10.0.0.2:7400".parse().unwrap());
        assert_eq!(p.node_id, Some(NodeId([2; 16])));
        assert_eq!(p.types, Some(vec!["a".to_string()]));
        assert_eq!(p.capacity, Some(2));
        assert_eq!(p.source, "udp");
        // Refreshed before its deadline (3 intervals): still there.
        let t1 = t0 + Duration::from_millis(2500);
        assert_eq!(
            t.handle(t1, &beacon(Kind::Announce, 2, "c"), from(2)),
            Outcome::Seen
        );
        assert!(t.expire(t0 + Duration::from_millis(3500)).is_empty());
        assert_eq!(t.next_deadline(), Some(t1 + Duration::from_secs(3)));
        // Silent for 3 of its intervals: lost.
        let lost = t.expire(t1 + Duration::from_secs(3));
        assert_eq!(lost.len(), 1);
        assert!(matches!(lost[0], Event::Lost { node_id: Some(n), .. } if n == NodeId([2; 16])));
        assert_eq!(t.len(), 0);
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn ignores_own_foreign_malformed_and_other_versions() {
        let now = Instant::now();
        let mut t = Table::new("c".into(), NodeId([1; 16]), 3);
        assert_eq!(
            t.handle(now, &beacon(Kind::Announce, 1, "c"), from(1)),
            Outcome::Own
        );
        assert_eq!(
            t.handle(now, &beacon(Kind::Announce, 2, "d"), from(2)),
            Outcome::Foreign
        );
        assert_eq!(
            t.handle(now, &beacon(Kind::Query, 2, "d"), from(2)),
            Outcome::Foreign
        );
        assert_eq!(t.handle(now, b"hello", from(2)), Outcome::Malformed);
        let mut v2 = beacon(Kind::Announce, 2, "c");
        v2[4] = 2;
        assert_eq!(t.handle(now, &v2, from(2)), Outcome::Unsupported);
        assert_eq!(t.len(), 0);
        assert_eq!(
            t.handle(now, &beacon(Kind::Query, 2, "c"), from(2)),
            Outcome::Query
        );
    }

    #[test]
    fn a_full_table_pushes_out_the_peer_heard_least_recently() {
        let t0 = Instant::now();
        let mut t = Table::new("c".into(), NodeId([1; 16]), 3).with_max(3);
        for id in 2..=4 {
            let at = t0 + Duration::from_millis(u64::from(id));
            t.handle(at, &beacon(Kind::Announce, id, "c"), from(id));
        }
        // Peer 2 is heard again, so 3 is now the one heard least recently.
        let t1 = t0 + Duration::from_millis(100);
        t.handle(t1, &beacon(Kind::Announce, 2, "c"), from(2));
        assert!(t.take_evicted().is_empty());
        let got = t.handle(t1, &beacon(Kind::Announce, 5, "c"), from(5));
        assert!(
            matches!(got, Outcome::Event(Event::Discovered(_))),
            "{got:?}"
        );
        assert_eq!(t.len(), 3);
        let evicted = t.take_evicted();
        assert!(
            matches!(evicted[..], [Event::Lost { node_id: Some(n), .. }] if n == NodeId([3; 16])),
            "{evicted:?}"
        );
        assert!(t.take_evicted().is_empty());
        // Thousands of forged ids later, the table still holds 3 peers.
        for i in 0..2000u32 {
            let mut b = Beacon::decode(&beacon(Kind::Announce, 9, "c")).unwrap();
            b.node_id = NodeId(u128::from(i + 1000).to_be_bytes());
            t.handle(t1, &b.encode().unwrap(), from(9));
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.take_evicted().len(), 2000);
    }

    #[test]
    fn a_forgotten_peer_is_reported_again_by_its_next_beacon() {
        let now = Instant::now();
        let mut t = Table::new("c".into(), NodeId([1; 16]), 3);
        t.handle(now, &beacon(Kind::Announce, 2, "c"), from(2));
        assert_eq!(
            t.handle(now, &beacon(Kind::Announce, 2, "c"), from(2)),
            Outcome::Seen
        );
        t.forget(&NodeId([2; 16]));
        assert!(matches!(
            t.handle(now, &beacon(Kind::Announce, 2, "c"), from(2)),
            Outcome::Event(Event::Discovered(_))
        ));
    }

    #[test]
    fn leaving_reports_lost_once() {
        let now = Instant::now();
        let mut t = Table::new("c".into(), NodeId([1; 16]), 3);
        t.handle(now, &beacon(Kind::Announce, 2, "c"), from(2));
        assert!(matches!(
            t.handle(now, &beacon(Kind::Leaving, 2, "c"), from(2)),
            Outcome::Event(Event::Lost { .. })
        ));
        assert_eq!(
            t.handle(now, &beacon(Kind::Leaving, 2, "c"), from(2)),
            Outcome::Seen
        );
    }

    #[test]
    fn changed_details_are_reported_again_at_the_first_address() {
        let now = Instant::now();
        let mut t = Table::new("c".into(), NodeId([1; 16]), 3);
        t.handle(now, &beacon(Kind::Announce, 2, "c"), from(2));
        let mut b = Beacon::decode(&beacon(Kind::Announce, 2, "c")).unwrap();
        b.capacity = 8;
        b.addr = Some("10.0.0.99:7400".parse().unwrap());
        let Outcome::Event(Event::Discovered(p)) = t.handle(now, &b.encode().unwrap(), from(2))
        else {
            panic!("expected Discovered");
        };
        assert_eq!(p.capacity, Some(8));
        assert_eq!(p.addr, "10.0.0.2:7400".parse().unwrap());
    }

    #[test]
    fn an_unspecified_address_means_the_sender() {
        let now = Instant::now();
        let mut t = Table::new("c".into(), NodeId([1; 16]), 3);
        let mut b = Beacon::decode(&beacon(Kind::Announce, 2, "c")).unwrap();
        b.addr = Some("0.0.0.0:7411".parse().unwrap());
        let Outcome::Event(Event::Discovered(p)) = t.handle(now, &b.encode().unwrap(), from(9))
        else {
            panic!("expected Discovered");
        };
        assert_eq!(p.addr, "10.0.0.9:7411".parse().unwrap());
    }

    #[test]
    fn a_loopback_address_from_another_host_is_unreachable() {
        let now = Instant::now();
        let mut t = Table::new("c".into(), NodeId([1; 16]), 3);
        let mut b = Beacon::decode(&beacon(Kind::Announce, 2, "c")).unwrap();
        b.addr = Some("127.0.0.1:7400".parse().unwrap());
        let bytes = b.encode().unwrap();
        assert_eq!(t.handle(now, &bytes, from(2)), Outcome::Unreachable);
        let local = "127.0.0.1:7450".parse().unwrap();
        assert!(matches!(
            t.handle(now, &bytes, local),
            Outcome::Event(Event::Discovered(_))
        ));
    }

    #[test]
    fn absurd_intervals_are_clamped() {
        let now = Instant::now();
        let mut t = Table::new("c".into(), NodeId([1; 16]), 3);
        let mut b = Beacon::decode(&beacon(Kind::Announce, 2, "c")).unwrap();
        b.interval_ms = 0;
        t.handle(now, &b.encode().unwrap(), from(2));
        assert_eq!(t.next_deadline(), Some(now + MIN_INTERVAL * 3));
        b.interval_ms = u32::MAX;
        t.handle(now, &b.encode().unwrap(), from(2));
        assert_eq!(t.next_deadline(), Some(now + MAX_INTERVAL * 3));
    }
}
