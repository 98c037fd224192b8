//! What the `mdns` backend puts in its DNS-SD records, and how it reads a peer's.
//!
//! Pure functions over `mdns-sd`'s types: no daemon, no network (tested below).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use mdns_sd::{ResolvedService, ScopedIp};
use p2p_core::{ClusterKey, NodeId, PROTOCOL_VERSION};
use subtle::ConstantTimeEq;

use crate::{Announcement, Error, Peer};

/// TXT key: the task types served, comma-separated (`a,b`).
pub const KEY_TYPES: &str = "types";
/// TXT key: the cluster name.
pub const KEY_CLUSTER: &str = "cluster";
/// TXT key: the node id, 32 lowercase hex digits.
pub const KEY_ID: &str = "id";
/// TXT key: the wire protocol version (`p2p_core::PROTOCOL_VERSION`).
pub const KEY_VERSION: &str = "version";
/// TXT key: how many tasks the node runs at once.
pub const KEY_CAPACITY: &str = "capacity";
/// TXT key, with a cluster key only: the MAC of the other fields and the port under the
/// cluster key, 32 hex digits (see the `mdns` module docs).
pub const KEY_MAC: &str = "mac";

/// The fields the MAC covers, in this order (then the service's port).
const SIGNED: [&str; 5] = [KEY_VERSION, KEY_CLUSTER, KEY_ID, KEY_TYPES, KEY_CAPACITY];

/// Keeps these MACs apart from the key's other uses (beacons, ...).
const MAC_CONTEXT: &[u8] = b"p2p-node mdns txt v1";

/// Longest `key=value` string in a TXT record (RFC 6763 §6.1: one length byte).
const MAX_ENTRY: usize = 255;

/// Longest task type accepted from a peer.
const MAX_TYPE: usize = 64;

/// The MAC of a record: over each of [`SIGNED`]'s values (as a 2-byte big-endian length and
/// the bytes; a missing one is empty) and the port (2 bytes, big-endian), under `key`. The
/// address is not covered (with `0.0.0.0` it differs per interface): a replayed record can
/// point at another address, whose handshake then fails for want of the key.
pub(crate) fn mac<'a>(
    key: &ClusterKey,
    value: impl Fn(&str) -> Option<&'a str>,
    port: u16,
) -> String {
    let mut data = Vec::new();
    for k in SIGNED {
        let v = value(k).unwrap_or_default().as_bytes();
        let len = u16::try_from(v.len()).unwrap_or(u16::MAX);
        data.extend_from_slice(&len.to_be_bytes());
        data.extend_from_slice(v.get(..usize::from(len)).unwrap_or(v));
    }
    data.extend_from_slice(&port.to_be_bytes());
    key.mac(MAC_CONTEXT, &data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The TXT properties announcing `a`, with a MAC under `key` if there is one. A value that
/// does not fit one TXT string (255 bytes with its key) is an error naming it.
pub(crate) fn properties(
    a: &Announcement,
    key: Option<&ClusterKey>,
) -> Result<Vec<(&'static str, String)>, Error> {
    let mut props = vec![
        (KEY_VERSION, PROTOCOL_VERSION.to_string()),
        (KEY_CLUSTER, a.cluster.clone()),
        (KEY_ID, a.node_id.to_string()),
        (KEY_TYPES, a.types.join(",")),
        (KEY_CAPACITY, a.capacity.to_string()),
    ];
    if let Some(key) = key {
        let find = |k: &str| {
            props
                .iter()
                .find(|(pk, _)| *pk == k)
                .map(|(_, v)| v.as_str())
        };
        let m = mac(key, find, a.addr.port());
        props.push((KEY_MAC, m));
    }
    for (k, v) in &props {
        let len = k.len() + 1 + v.len();
        if len > MAX_ENTRY {
            return Err(Error::MdnsConfig(format!(
                "the TXT entry {k:?} would be {len} bytes, at most {MAX_ENTRY} fit a DNS-SD TXT record"
            )));
        }
    }
    Ok(props)
}

/// What a resolved service is to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A node of the cluster: report it.
    Peer(Peer),
    /// This node's own service.
    Own,
    /// A node of another cluster.
    Foreign,
    /// A node speaking another protocol version (or no version).
    Unsupported,
    /// A record whose MAC does not verify under this node's cluster key (or has none), or,
    /// for a node without a key, a record with a MAC (its cluster needs a key).
    Unauthenticated,
    /// Not a well-formed p2p-node service; the reason.
    Malformed(String),
}

/// Reads a resolved service of type `_p2p-node._tcp` for a node of `cluster` whose id is
/// `me`, holding `key` if any. Never panics on what a peer sent.
pub(crate) fn read(
    svc: &ResolvedService,
    cluster: &str,
    me: NodeId,
    keys: &[ClusterKey],
) -> Verdict {
    let get = |k: &str| svc.get_property_val_str(k);
    match get(KEY_VERSION).map(|v| v.trim().parse::<u16>()) {
        Some(Ok(v)) if v == PROTOCOL_VERSION => {}
        _ => return Verdict::Unsupported,
    }
    if get(KEY_CLUSTER) != Some(cluster) {
        return Verdict::Foreign;
    }
    // Any of the node's keys will do (a key rotation: sealed with the first, accepted
    // under each).
    let verified = match get(KEY_MAC) {
        None => keys.is_empty(),
        Some(m) => keys.iter().any(|k| {
            let want = mac(k, get, svc.get_port());
            // Constant time: the comparison does not stop at the first differing byte (a
            // length mismatch is unequal at once; the length is not secret).
            bool::from(want.as_bytes().ct_eq(m.as_bytes()))
        }),
    };
    if !verified {
        return Verdict::Unauthenticated;
    }
    let Some(node_id) = get(KEY_ID).and_then(parse_id) else {
        return Verdict::Malformed(format!("no valid {KEY_ID:?} (32 hex digits)"));
    };
    if node_id == me {
        return Verdict::Own;
    }
    let Some(types) = get(KEY_TYPES).and_then(parse_types) else {
        return Verdict::Malformed(format!("no valid {KEY_TYPES:?} (comma-separated letters)"));
    };
    let Some(capacity) = get(KEY_CAPACITY).and_then(|c| c.trim().parse::<u32>().ok()) else {
        return Verdict::Malformed(format!("no valid {KEY_CAPACITY:?}"));
    };
    if svc.get_port() == 0 {
        return Verdict::Malformed("port 0".into());
    }
    let Some(addr) = pick_addr(svc.get_addresses(), svc.get_port()) else {
        return Verdict::Malformed("no address".into());
    };
    Verdict::Peer(Peer {
        addr,
        node_id: Some(node_id),
        types: Some(types),
        capacity: Some(capacity),
        source: "mdns",
    })
}

fn parse_id(s: &str) -> Option<NodeId> {
    let s = s.trim().as_bytes();
    // `from_str_radix` alone would take a sign (`+f`).
    if s.len() != 32 || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok()?;
        *id.get_mut(i)? = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(NodeId(id))
}

fn parse_types(s: &str) -> Option<Vec<String>> {
    let s = s.trim();
    if s.is_empty() {
        return Some(Vec::new());
    }
    s.split(',')
        .map(|t| {
            let t = t.trim();
            let ok = !t.is_empty()
                && t.len() <= MAX_TYPE
                && t.bytes().all(|b| b.is_ascii_alphanumeric());
            ok.then(|| t.to_ascii_lowercase())
        })
        .collect()
}

/// The address to connect to among a service's: IPv4 before IPv6, a non-loopback address
/// before a loopback one, then the smallest (so the choice is stable).
pub(crate) fn pick_addr(addrs: &HashSet<ScopedIp>, port: u16) -> Option<SocketAddr> {
    let mut all: Vec<SocketAddr> = addrs
        .iter()
        .filter_map(|a| match a {
            ScopedIp::V4(v4) => Some(SocketAddr::from((*v4.addr(), port))),
            ScopedIp::V6(v6) => {
                let ip = *v6.addr();
                let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
                let scope = if link_local { v6.scope_id().index } else { 0 };
                Some(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)))
            }
            _ => None,
        })
        .filter(|a| !a.ip().is_unspecified() && !a.ip().is_multicast())
        .collect();
    all.sort_by_key(|a| (a.is_ipv6(), a.ip().is_loopback(), *a));
    all.into_iter().next()
}

/// The address a service is registered with: the announced one, or none (the daemon then
/// fills in each interface's own) for an unspecified address (`0.0.0.0`, `[::]`).
pub(crate) fn registered_ip(a: &Announcement) -> Option<IpAddr> {
    let ip = a.addr.ip();
    (!ip.is_unspecified()).then_some(ip)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use mdns_sd::ServiceInfo;

    use super::*;

    fn announcement() -> Announcement {
        Announcement {
            cluster: "lab".into(),
            node_id: NodeId([0x5a; 16]),
            addr: "10.0.0.7:7400".parse().unwrap(),
            types: vec!["a".into(), "render".into()],
            capacity: 4,
        }
    }

    fn resolved(props: &[(&str, String)], ip: &str, port: u16) -> ResolvedService {
        ServiceInfo::new("_p2p-node._tcp.local.", "x", "x.local.", ip, port, props)
            .unwrap()
            .as_resolved_service()
    }

    fn round_trip(a: &Announcement) -> ResolvedService {
        let props = properties(a, None).unwrap();
        resolved(&props, &a.addr.ip().to_string(), a.addr.port())
    }

    #[test]
    fn an_announcement_reads_back_as_its_peer() {
        let a = announcement();
        let v = read(&round_trip(&a), "lab", NodeId([1; 16]), &[]);
        assert_eq!(
            v,
            Verdict::Peer(Peer {
                addr: a.addr,
                node_id: Some(a.node_id),
                types: Some(a.types.clone()),
                capacity: Some(4),
                source: "mdns",
            })
        );
    }

    #[test]
    fn other_clusters_versions_and_own_services_are_not_peers() {
        let a = announcement();
        assert_eq!(
            read(&round_trip(&a), "prod", NodeId([1; 16]), &[]),
            Verdict::Foreign
        );
        assert_eq!(read(&round_trip(&a), "lab", a.node_id, &[]), Verdict::Own);
        let mut props = properties(&a, None).unwrap();
        props[0].1 = (PROTOCOL_VERSION + 1).to_string();
        let svc = resolved(&props, "10.0.0.7", 7400);
        assert_eq!(
            read(&svc, "lab", NodeId([1; 16]), &[]),
            Verdict::Unsupported
        );
        // Another application on the service type: no version at all.
        let svc = resolved(&[("path", "/".to_string())], "10.0.0.7", 7400);
        assert_eq!(
            read(&svc, "lab", NodeId([1; 16]), &[]),
            Verdict::Unsupported
        );
    }

    #[test]
    fn malformed_fields_are_refused_without_panicking() {
        let a = announcement();
        let cases: [(usize, &str); 7] = [
            (2, "not-hex"),
            (2, "+f+f+f+f+f+f+f+f+f+f+f+f+f+f+f+f"),
            (2, "zz5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"),
            (2, "é5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"),
            (3, "a,,b"),
            (3, "a;rm -rf"),
            (4, "-1"),
        ];
        for (field, value) in cases {
            let mut props = properties(&a, None).unwrap();
            props[field].1 = value.to_string();
            let svc = resolved(&props, "10.0.0.7", 7400);
            assert!(
                matches!(
                    read(&svc, "lab", NodeId([1; 16]), &[]),
                    Verdict::Malformed(_)
                ),
                "{value:?} accepted"
            );
        }
        let props = properties(&a, None).unwrap();
        let svc = resolved(&props, "10.0.0.7", 0);
        assert!(matches!(
            read(&svc, "lab", NodeId([1; 16]), &[]),
            Verdict::Malformed(_)
        ));
    }

    #[test]
    fn with_a_key_only_records_sealed_under_it_are_peers() {
        let a = announcement();
        let key = ClusterKey::from_bytes([7; 32]);
        let other = ClusterKey::from_bytes([8; 32]);
        let me = NodeId([1; 16]);
        let sealed = |k: &ClusterKey, port: u16| {
            resolved(&properties(&a, Some(k)).unwrap(), "10.0.0.7", port)
        };
        assert!(matches!(
            read(&sealed(&key, 7400), "lab", me, std::slice::from_ref(&key)),
            Verdict::Peer(_)
        ));
        assert_eq!(
            read(&sealed(&other, 7400), "lab", me, std::slice::from_ref(&key)),
            Verdict::Unauthenticated
        );
        assert_eq!(
            read(&round_trip(&a), "lab", me, std::slice::from_ref(&key)),
            Verdict::Unauthenticated
        );
        // During a key rotation a node holds several keys: a record sealed under any of
        // them is a peer.
        let both = [other.clone(), key.clone()];
        assert!(matches!(
            read(&sealed(&key, 7400), "lab", me, &both),
            Verdict::Peer(_)
        ));
        assert!(matches!(
            read(&sealed(&other, 7400), "lab", me, &both),
            Verdict::Peer(_)
        ));
        let third = ClusterKey::from_bytes([9; 32]);
        assert_eq!(
            read(&sealed(&third, 7400), "lab", me, &both),
            Verdict::Unauthenticated
        );
        assert_eq!(
            read(&sealed(&key, 7400), "lab", me, &[]),
            Verdict::Unauthenticated
        );
        // The port is covered; so is every field.
        assert_eq!(
            read(&sealed(&key, 7401), "lab", me, std::slice::from_ref(&key)),
            Verdict::Unauthenticated
        );
        let mut props = properties(&a, Some(&key)).unwrap();
        props[3].1 = "a,render,evil".into();
        let svc = resolved(&props, "10.0.0.7", 7400);
        assert_eq!(
            read(&svc, "lab", me, std::slice::from_ref(&key)),
            Verdict::Unauthenticated
        );
    }

    #[test]
    fn too_long_values_are_an_error_at_start() {
        let mut a = announcement();
        a.types = (0..200).map(|i| format!("t{i}")).collect();
        let err = properties(&a, None).unwrap_err();
        assert!(err.to_string().contains("types"), "{err}");
    }

    #[test]
    fn ipv4_and_non_loopback_addresses_are_preferred() {
        let svc = resolved(
            &properties(&announcement(), None).unwrap(),
            "127.0.0.1,10.0.0.9,10.0.0.7,fd00::1",
            7400,
        );
        assert_eq!(
            pick_addr(svc.get_addresses(), 7400),
            Some("10.0.0.7:7400".parse().unwrap())
        );
        let only_lo = resolved(
            &properties(&announcement(), None).unwrap(),
            "127.0.0.1",
            7400,
        );
        assert_eq!(
            pick_addr(only_lo.get_addresses(), 7400),
            Some("127.0.0.1:7400".parse().unwrap())
        );
    }

    #[test]
    fn an_unspecified_address_is_filled_in_by_the_daemon() {
        let mut a = announcement();
        assert_eq!(registered_ip(&a), Some(a.addr.ip()));
        a.addr = "0.0.0.0:7400".parse().unwrap();
        assert_eq!(registered_ip(&a), None);
    }
}
