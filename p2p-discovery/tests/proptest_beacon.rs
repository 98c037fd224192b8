//! Property tests of the UDP beacon: arbitrary datagrams never panic and whatever decodes
//! re-encodes to a beacon that decodes the same; every beacon round trips, with trailing
//! bytes (a later revision's fields) ignored and every strict prefix refused; a sealed
//! beacon opens only under its key and untouched. The fuzz target
//! `fuzz/fuzz_targets/beacon.rs` checks the first property on fuzzer-chosen bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use p2p_core::{ClusterKey, NodeId};
use p2p_discovery::beacon::{self, Beacon, Kind, MAGIC, MAX_BEACON, VERSION};
use proptest::collection::vec;
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Announce), Just(Kind::Query), Just(Kind::Leaving)]
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

/// Any beacon the format can carry (an announce always has an address).
fn beacon() -> impl Strategy<Value = Beacon> {
    (
        kind(),
        "\\PC{0,20}",
        any::<[u8; 16]>(),
        any::<u32>(),
        proptest::option::of(addr()),
        vec("[a-z]{1,8}", 0..8),
        any::<u32>(),
    )
        .prop_filter("an announce carries an address", |(k, _, _, _, a, _, _)| {
            *k != Kind::Announce || a.is_some()
        })
        .prop_map(
            |(kind, cluster, id, interval_ms, addr, types, capacity)| Beacon {
                kind,
                cluster,
                node_id: NodeId(id),
                interval_ms,
                addr,
                types,
                capacity,
            },
        )
}

/// Datagrams: noise, or the start of a real beacon with noise after it.
fn datagram() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..1300),
        (0u8..5, vec(any::<u8>(), 0..120)).prop_map(|(kind, rest)| {
            let mut d = MAGIC.to_vec();
            d.push(VERSION);
            d.push(kind);
            d.extend(rest);
            d
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_datagrams_never_panic_and_what_decodes_round_trips(d in datagram()) {
        if let Ok(b) = Beacon::decode(&d) {
            let again = b.encode().expect("a decoded beacon fits the format");
            prop_assert!(again.len() <= d.len());
            prop_assert_eq!(Beacon::decode(&again).unwrap(), b);
        }
    }

    #[test]
    fn beacons_round_trip_ignore_trailing_bytes_and_refuse_every_prefix(
        b in beacon(),
        tail in vec(any::<u8>(), 0..32),
    ) {
        let Ok(bytes) = b.encode() else {
            // Only over the size limit.
            return Ok(());
        };
        prop_assert!(bytes.len() <= MAX_BEACON);
        prop_assert_eq!(Beacon::decode(&bytes).unwrap(), b.clone());
        let mut longer = bytes.clone();
        longer.extend(&tail);
        if longer.len() <= MAX_BEACON {
            prop_assert_eq!(Beacon::decode(&longer).unwrap(), b);
        }
        for n in 0..bytes.len() {
            prop_assert!(Beacon::decode(&bytes[..n]).is_err(), "prefix of {} bytes decoded", n);
        }
    }

    #[test]
    fn a_sealed_beacon_opens_only_under_its_key_and_untouched(
        b in beacon(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
        noise in vec(any::<u8>(), 0..64),
    ) {
        let key = ClusterKey::from_bytes([7; 32]);
        let other = ClusterKey::from_bytes([8; 32]);
        let Ok(bytes) = b.encode() else { return Ok(()) };
        let sealed = beacon::seal(bytes.clone(), &key);
        prop_assert_eq!(beacon::open(&sealed, &key), Some(&bytes[..]));
        prop_assert_eq!(beacon::open(&sealed, &other), None);
        let mut bad = sealed.clone();
        let at = flip.index(bad.len());
        bad[at] ^= 1 << bit;
        prop_assert_eq!(beacon::open(&bad, &key), None);
        prop_assert_eq!(beacon::open(&noise, &key), None);
    }
}
