//! The UDP beacon: the one datagram the [`udp`](crate::udp) backend sends.
//!
//! # Format (version 1)
//!
//! A beacon is one UDP datagram of at most [`MAX_BEACON`] bytes (small enough for any
//! Ethernet or IPv6 path without fragmentation). Integers are big-endian; strings are UTF-8
//! prefixed by a one-byte length, so no field can claim more than 255 bytes.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `P2PB` (`50 32 50 42`) |
//! | 4 | 1 | version, [`VERSION`] = 1 |
//! | 5 | 1 | kind: 1 announce, 2 query, 3 leaving ([`Kind`]) |
//! | 6 | 16 | node id of the sender |
//! | 22 | 4 | the sender's beacon interval in milliseconds (receivers expire it after missing 3) |
//! | 26 | 4 | capacity: tasks the sender runs at once |
//! | 30 | 1 + C | cluster name: length C, then C bytes |
//! | … | 1 (+ 6 or 18) | TCP address: family 0 (none: a node that accepts no connection), 4 (IPv4: 4 address bytes, 2 port bytes) or 6 (IPv6: 16 + 2) |
//! | … | 1 + … | task types: count T, then T times (length L, L bytes) |
//!
//! Bytes after the last field are ignored, so a later revision of version 1 may append
//! fields; a change that old decoders must not misread bumps the version, and a decoder
//! refuses versions it does not know ([`DecodeError::Version`]).
//!
//! - **announce**: "I am here": sent on start, every interval, and in answer to a query.
//!   It must carry an address. An IPv4 address of `0.0.0.0` means "the address this datagram
//!   came from" (the sender listens on every interface).
//! - **query**: "who is there?": every node of the cluster that announces answers at once.
//!   A pure client sends it with no address, no types and capacity 0.
//! - **leaving**: "I am going away": receivers report the node lost at once.
//!
//! Decoding never panics, whatever the bytes, and allocates only for what the datagram
//! really holds (no length field is trusted beyond the bytes present).
//!
//! # Authentication
//!
//! Nodes with a cluster key append a 16-byte MAC ([`seal`]) computed with
//! [`ClusterKey::mac`] over the whole beacon under the context `p2p-node beacon v1`; a keyed
//! receiver drops every datagram whose MAC does not verify ([`open`]), so nobody without
//! the key can announce a node, make nodes answer, or report one as leaving. A node without a
//! key reads a sealed beacon as a beacon with trailing bytes (and then fails the handshake
//! with that node, which says why). Beacons carry nothing secret either way.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use p2p_core::{ClusterKey, NodeId};
use subtle::ConstantTimeEq;

use crate::Error;

/// The first four bytes of every beacon.
pub const MAGIC: [u8; 4] = *b"P2PB";

/// The beacon format version this crate writes and reads.
pub const VERSION: u8 = 1;

/// The largest beacon sent or accepted, in bytes.
pub const MAX_BEACON: usize = 1200;

/// Length of the MAC a keyed node appends to its beacons.
pub const MAC_LEN: usize = 16;

const MAC_CONTEXT: &[u8] = b"p2p-node beacon v1";

/// Appends the MAC of `beacon` under `key`.
pub fn seal(mut beacon: Vec<u8>, key: &ClusterKey) -> Vec<u8> {
    let mac = key.mac(MAC_CONTEXT, &beacon);
    beacon.extend_from_slice(&mac);
    beacon
}

/// The beacon inside a sealed datagram, if its MAC verifies under `key`.
pub fn open<'a>(datagram: &'a [u8], key: &ClusterKey) -> Option<&'a [u8]> {
    let split = datagram.len().checked_sub(MAC_LEN)?;
    let (beacon, mac) = datagram.split_at(split);
    let expected = key.mac(MAC_CONTEXT, beacon);
    // Constant time: the comparison does not stop at the first differing byte.
    bool::from(expected[..].ct_eq(mac)).then_some(beacon)
}

/// The beacon inside a sealed datagram, if its MAC verifies under any of `keys` (a node
/// that accepts an old and a new cluster key during a rotation).
pub fn open_any<'a>(datagram: &'a [u8], keys: &[ClusterKey]) -> Option<&'a [u8]> {
    keys.iter().find_map(|k| open(datagram, k))
}

/// What a beacon says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The sender is here and accepts connections at its address.
    Announce,
    /// The sender asks every node to announce itself now.
    Query,
    /// The sender is shutting down.
    Leaving,
}

impl Kind {
    fn to_byte(self) -> u8 {
        match self {
            Kind::Announce => 1,
            Kind::Query => 2,
            Kind::Leaving => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Announce),
            2 => Some(Kind::Query),
            3 => Some(Kind::Leaving),
            _ => None,
        }
    }
}

/// One beacon, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beacon {
    /// What it says.
    pub kind: Kind,
    /// The sender's cluster.
    pub cluster: String,
    /// The sender's node id.
    pub node_id: NodeId,
    /// The sender's beacon interval in milliseconds.
    pub interval_ms: u32,
    /// Where the sender accepts connections; `None` for a node that accepts none.
    pub addr: Option<SocketAddr>,
    /// Task types the sender serves.
    pub types: Vec<String>,
    /// Tasks the sender runs at once.
    pub capacity: u32,
}

/// Why a datagram is not a beacon this version understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The datagram does not start with [`MAGIC`]: not ours at all.
    #[error("not a p2p-node beacon (bad magic)")]
    Magic,
    /// A beacon of a version this node does not know.
    #[error("beacon version {0} is not supported (this node speaks version {VERSION})")]
    Version(u8),
    /// The datagram ends inside a field.
    #[error("beacon truncated")]
    Truncated,
    /// The datagram is larger than [`MAX_BEACON`].
    #[error("beacon larger than {MAX_BEACON} bytes")]
    TooLarge,
    /// An unknown kind byte.
    #[error("unknown beacon kind {0}")]
    Kind(u8),
    /// An unknown address family byte.
    #[error("unknown address family {0}")]
    Family(u8),
    /// An announce without an address.
    #[error("announce without an address")]
    NoAddress,
    /// A string field is not UTF-8.
    #[error("beacon text is not UTF-8")]
    Utf8,
}

impl Beacon {
    /// Encodes the beacon. Fails when a field does not fit the format (a cluster or type
    /// name over 255 bytes, more than 255 types, or more than [`MAX_BEACON`] bytes in all).
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind.to_byte());
        out.extend_from_slice(&self.node_id.0);
        out.extend_from_slice(&self.interval_ms.to_be_bytes());
        out.extend_from_slice(&self.capacity.to_be_bytes());
        put_str(&mut out, "cluster name", &self.cluster)?;
        match self.addr {
            None => out.push(0),
            Some(SocketAddr::V4(a)) => {
                out.push(4);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
            Some(SocketAddr::V6(a)) => {
                out.push(6);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
        }
        let count = u8::try_from(self.types.len()).map_err(|_| Error::BeaconTooLarge {
            what: "type list (count)",
            len: self.types.len(),
            max: 255,
        })?;
        out.push(count);
        for t in &self.types {
            put_str(&mut out, "type name", t)?;
        }
        if out.len() > MAX_BEACON {
            return Err(Error::BeaconTooLarge {
                what: "beacon",
                len: out.len(),
                max: MAX_BEACON,
            });
        }
        Ok(out)
    }

    /// Decodes one datagram. Never panics; see the module docs.
    pub fn decode(bytes: &[u8]) -> Result<Beacon, DecodeError> {
        if bytes.len() > MAX_BEACON {
            return Err(DecodeError::TooLarge);
        }
        let mut r = Reader(bytes);
        if r.take(4).map_err(|_| DecodeError::Magic)? != MAGIC {
            return Err(DecodeError::Magic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let kind_byte = r.u8()?;
        let kind = Kind::from_byte(kind_byte).ok_or(DecodeError::Kind(kind_byte))?;
        let mut id = [0u8; 16];
        id.copy_from_slice(r.take(16)?);
        let interval_ms = r.u32()?;
        let capacity = r.u32()?;
        let cluster = r.string()?;
        let addr = match r.u8()? {
            0 => None,
            4 => {
                let mut ip = [0u8; 4];
                ip.copy_from_slice(r.take(4)?);
                let port = r.u16()?;
                Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
            }
            6 => {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(r.take(16)?);
                let port = r.u16()?;
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
            }
            f => return Err(DecodeError::Family(f)),
        };
        if kind == Kind::Announce && addr.is_none() {
            return Err(DecodeError::NoAddress);
        }
        let count = r.u8()?;
        // No capacity reserved from the count: the vector grows only with entries present.
        let mut types = Vec::new();
        for _ in 0..count {
            types.push(r.string()?);
        }
        Ok(Beacon {
            kind,
            cluster,
            node_id: NodeId(id),
            interval_ms,
            addr,
            types,
            capacity,
        })
    }
}

fn put_str(out: &mut Vec<u8>, what: &'static str, s: &str) -> Result<(), Error> {
    let len = u8::try_from(s.len()).map_err(|_| Error::BeaconTooLarge {
        what,
        len: s.len(),
        max: 255,
    })?;
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// A cursor over the datagram; every read checks the bytes left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| DecodeError::Utf8)
    }
}

#[cfg(test)]
mod mac_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn sealed_beacons_open_only_under_the_same_key_and_untouched() {
        let key = ClusterKey::generate();
        let other = ClusterKey::generate();
        let sealed = seal(b"beacon bytes".to_vec(), &key);
        assert_eq!(open(&sealed, &key), Some(&b"beacon bytes"[..]));
        assert_eq!(open(&sealed, &other), None);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert_eq!(open(&bad, &key), None, "flipped byte {i}");
        }
        assert_eq!(open(&sealed[..MAC_LEN - 1], &key), None);
        assert_eq!(open(b"unsealed beacon", &key), None);
    }

    #[test]
    fn open_any_accepts_a_beacon_under_any_of_the_keys() {
        let (old, new, third) = (
            ClusterKey::generate(),
            ClusterKey::generate(),
            ClusterKey::generate(),
        );
        let both = [new.clone(), old.clone()];
        for k in [&old, &new] {
            let sealed = seal(b"b".to_vec(), k);
            assert_eq!(open_any(&sealed, &both), Some(&b"b"[..]));
        }
        assert_eq!(open_any(&seal(b"b".to_vec(), &third), &both), None);
        assert_eq!(open_any(&seal(b"b".to_vec(), &old), &[]), None);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn sample() -> Beacon {
        Beacon {
            kind: Kind::Announce,
            cluster: "default".into(),
            node_id: NodeId([7; 16]),
            interval_ms: 1000,
            addr: Some("10.1.2.3:7400".parse().unwrap()),
            types: vec!["a".into(), "b".into()],
            capacity: 4,
        }
    }

    #[test]
    fn round_trips_every_kind_and_family() {
        let addrs = [
            None,
            Some("127.0.0.1:7401".parse().unwrap()),
            Some("[fe80::1]:9".parse().unwrap()),
        ];
        for kind in [Kind::Announce, Kind::Query, Kind::Leaving] {
            for addr in addrs {
                let b = Beacon {
                    kind,
                    addr,
                    ..sample()
                };
                let bytes = match b.encode() {
                    Ok(bytes) => bytes,
                    Err(e) => panic!("{b:?}: {e}"),
                };
                let decoded = Beacon::decode(&bytes);
                if kind == Kind::Announce && addr.is_none() {
                    assert_eq!(decoded, Err(DecodeError::NoAddress));
                } else {
                    assert_eq!(decoded.unwrap(), b);
                }
            }
        }
    }

    #[test]
    fn layout_matches_the_documented_table() {
        let bytes = sample().encode().unwrap();
        assert_eq!(&bytes[0..4], b"P2PB");
        assert_eq!(bytes[4], 1);
        assert_eq!(bytes[5], 1);
        assert_eq!(&bytes[6..22], &[7; 16]);
        assert_eq!(&bytes[22..26], &1000u32.to_be_bytes());
        assert_eq!(&bytes[26..30], &4u32.to_be_bytes());
        assert_eq!(bytes[30], 7);
        assert_eq!(&bytes[31..38], b"default");
        assert_eq!(&bytes[38..45], &[4, 10, 1, 2, 3, 0x1c, 0xe8]);
        assert_eq!(&bytes[45..], &[2, 1, b'a', 1, b'b']);
    }

    #[test]
    fn trailing_bytes_are_ignored_and_other_versions_refused() {
        let mut bytes = sample().encode().unwrap();
        bytes.extend_from_slice(b"future field");
        assert_eq!(Beacon::decode(&bytes).unwrap(), sample());
        bytes[4] = 2;
        assert_eq!(Beacon::decode(&bytes), Err(DecodeError::Version(2)));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(Beacon::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
    }

    #[test]
    fn oversized_fields_are_refused_when_encoding() {
        let long = Beacon {
            cluster: "x".repeat(256),
            ..sample()
        };
        assert!(matches!(
            long.encode(),
            Err(Error::BeaconTooLarge {
                what: "cluster name",
                ..
            })
        ));
        let many = Beacon {
            types: (0..200).map(|i| format!("type{i}")).collect(),
            ..sample()
        };
        assert!(matches!(
            many.encode(),
            Err(Error::BeaconTooLarge { what: "beacon", .. })
        ));
        assert_eq!(
            Beacon::decode(&vec![0u8; MAX_BEACON + 1]),
            Err(DecodeError::TooLarge)
        );
    }

    /// xorshift64*: deterministic random bytes without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_bytes_and_mutations_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid = sample().encode().unwrap();
        for i in 0..50_000 {
            let bytes: Vec<u8> = if i % 2 == 0 {
                // Pure noise, sometimes behind a valid header so deeper fields are reached.
                let len = rng.below(MAX_BEACON + 50);
                let mut v: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if i % 4 == 0 && v.len() >= 6 {
                    v[..4].copy_from_slice(&MAGIC);
                    v[4] = VERSION;
                    v[5] = 1 + (rng.next() % 3) as u8;
                }
                v
            } else {
                // A valid beacon with a few bytes flipped and maybe cut.
                let mut v = valid.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(v.len());
                    v[at] = rng.next() as u8;
                }
                v.truncate(rng.below(v.len() + 1).max(v.len() / 2));
                v
            };
            if let Ok(b) = Beacon::decode(&bytes) {
                // Whatever decodes is no larger than the datagram it came from.
                let text: usize = b.cluster.len() + b.types.iter().map(String::len).sum::<usize>();
                assert!(text <= bytes.len());
                assert!(b.types.len() <= bytes.len());
            }
        }
    }
}
