//! Which network interfaces a LAN backend (`udp`, `mdns`) uses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use crate::Error;

/// Where a LAN backend's datagrams go and are listened for (`udp` beacons, `mdns` queries
/// and answers).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Interfaces {
    /// The interface holding this IPv4 address; any `127.x.y.z` means the loopback interface.
    Addr(Ipv4Addr),
    /// The interface with this name (`eth0`), on its first IPv4 address.
    Name(String),
    /// Every IPv4 interface that is up and able to send beacons, loopback included.
    All,
}

impl Interfaces {
    /// Where a node listening on `listen` announces (see the module docs): loopback for a
    /// loopback address, that address's interface for one address, all for `0.0.0.0`/`[::]`
    /// and for a non-loopback IPv6 address.
    pub fn for_listen(listen: SocketAddr) -> Interfaces {
        match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => Interfaces::All,
            IpAddr::V4(ip) => Interfaces::Addr(ip),
            IpAddr::V6(ip) if ip.is_loopback() => Interfaces::Addr(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) if !v4.is_unspecified() => Interfaces::Addr(v4),
                _ => Interfaces::All,
            },
        }
    }
}

impl Default for Interfaces {
    /// The loopback interface (`127.0.0.1`).
    fn default() -> Self {
        Interfaces::Addr(Ipv4Addr::LOCALHOST)
    }
}

impl FromStr for Interfaces {
    type Err = Error;

    /// `all`, an IPv4 address (`10.0.0.5`, `127.0.0.1`) or an interface name (`eth0`).
    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(Interfaces::All);
        }
        if let Ok(ip) = s.parse::<Ipv4Addr>() {
            return Ok(Interfaces::Addr(ip));
        }
        let name_ok = !s.is_empty()
            && s.len() < 16
            && s.chars()
                .all(|c| c.is_ascii_graphic() && c != '/' && c != ':');
        if name_ok {
            Ok(Interfaces::Name(s.to_string()))
        } else {
            Err(Error::Interface(format!(
                "{s:?} is not an interface: expected `all`, an IPv4 address or an interface name"
            )))
        }
    }
}

impl fmt::Display for Interfaces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interfaces::Addr(ip) => write!(f, "{ip}"),
            Interfaces::Name(n) => f.write_str(n),
            Interfaces::All => f.write_str("all"),
        }
    }
}
