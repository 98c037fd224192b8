//! Which interfaces the `udp` backend uses, and its sockets on them.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};

use super::{Interfaces, Mode};
use crate::Error;

/// Linux interface flags (`/sys/class/net/NAME/flags`, `<linux/if.h>`).
const IFF_UP: u32 = 0x1;
const IFF_BROADCAST: u32 = 0x2;
const IFF_MULTICAST: u32 = 0x1000;

/// One IPv4 interface the backend sends and listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Iface {
    /// Its name (`lo`, `eth0`).
    pub name: String,
    /// Its index, when the system tells it.
    pub index: Option<u32>,
    /// Its (first) IPv4 address.
    pub addr: Ipv4Addr,
    /// Its broadcast address, if it has one.
    pub broadcast: Option<Ipv4Addr>,
    /// Whether it is a loopback interface.
    pub loopback: bool,
    /// Its flags, when known (Linux).
    pub flags: Option<u32>,
}

impl Iface {
    fn has(&self, flag: u32) -> bool {
        // Unknown flags (not Linux): assume capable and let the socket calls decide.
        self.flags.is_none_or(|f| f & flag != 0)
    }

    /// Whether this link uses multicast (always on loopback, where broadcast is meaningless).
    pub(crate) fn multicast(&self, mode: Mode) -> bool {
        self.loopback || mode == Mode::Multicast
    }
}

/// Every IPv4 interface of the machine.
fn list() -> Result<Vec<Iface>, Error> {
    let all = if_addrs::get_if_addrs().map_err(|source| Error::Socket {
        what: "list the network interfaces".into(),
        source,
    })?;
    Ok(all
        .into_iter()
        .filter_map(|i| match i.addr {
            if_addrs::IfAddr::V4(v4) => Some(Iface {
                flags: read_flags(&i.name),
                loopback: v4.ip.is_loopback(),
                name: i.name,
                index: i.index,
                addr: v4.ip,
                broadcast: broadcast_of(v4.ip, v4.netmask),
            }),
            if_addrs::IfAddr::V6(_) => None,
        })
        .collect())
}

/// The subnet broadcast address: the address with every host bit set; none for /31 and /32
/// subnets and loopback. Computed, not taken from the system: for an address added without
/// `brd`, `getifaddrs` reports the node's own address as "broadcast".
fn broadcast_of(ip: Ipv4Addr, netmask: Ipv4Addr) -> Option<Ipv4Addr> {
    if ip.is_loopback() || u32::from(netmask).count_ones() >= 31 {
        return None;
    }
    Some(Ipv4Addr::from(u32::from(ip) | !u32::from(netmask)))
}

fn read_flags(name: &str) -> Option<u32> {
    if name.contains('/') || name.contains("..") {
        return None;
    }
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).ok()?;
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// The interfaces `sel` names on this machine.
pub(crate) fn resolve(sel: &Interfaces, mode: Mode) -> Result<Vec<Iface>, Error> {
    pick(list()?, sel, mode)
}

/// The interfaces `sel` names among `all` (pure, for tests).
pub(crate) fn pick(all: Vec<Iface>, sel: &Interfaces, mode: Mode) -> Result<Vec<Iface>, Error> {
    let usable = |i: &Iface| {
        i.loopback
            || match mode {
                Mode::Multicast => i.has(IFF_MULTICAST),
                Mode::Broadcast => i.has(IFF_BROADCAST) && i.broadcast.is_some(),
            }
    };
    let explain = |i: &Iface| {
        match mode {
        Mode::Multicast => format!(
            "interface {} ({}) is not multicast-capable; use broadcast mode or `ip link set {} multicast on`",
            i.name, i.addr, i.name
        ),
        Mode::Broadcast => format!(
            "interface {} ({}) has no broadcast address; use multicast mode",
            i.name, i.addr
        ),
    }
    };
    let chosen = match sel {
        Interfaces::Addr(ip) => {
            let found = if ip.is_loopback() {
                // All of 127/8 is the loopback interface, though only 127.0.0.1 is listed.
                all.into_iter().find(|i| i.loopback)
            } else {
                all.into_iter().find(|i| i.addr == *ip)
            };
            let i = found.ok_or_else(|| {
                Error::Interface(format!(
                    "no network interface of this machine has the address {ip}"
                ))
            })?;
            if !usable(&i) {
                return Err(Error::Interface(explain(&i)));
            }
            vec![i]
        }
        Interfaces::Name(name) => {
            let i = all.into_iter().find(|i| &i.name == name).ok_or_else(|| {
                Error::Interface(format!(
                    "no network interface named {name:?} with an IPv4 address"
                ))
            })?;
            if !usable(&i) {
                return Err(Error::Interface(explain(&i)));
            }
            vec![i]
        }
        Interfaces::All => {
            let mut v: Vec<Iface> = Vec::new();
            for i in all {
                let up = i.loopback || i.has(IFF_UP);
                if up && usable(&i) && !v.iter().any(|o| o.name == i.name) {
                    v.push(i);
                }
            }
            if v.is_empty() {
                return Err(Error::Interface(
                    "no IPv4 interface is up and able to send beacons".into(),
                ));
            }
            v
        }
    };
    Ok(chosen)
}

/// A socket of one link and where its beacons go.
pub(crate) fn open(
    iface: &Iface,
    group: Ipv4Addr,
    port: u16,
    mode: Mode,
    ttl: u32,
) -> Result<(std::net::UdpSocket, SocketAddrV4), Error> {
    let on = format!("on interface {} ({})", iface.name, iface.addr);
    let step = |what: String| move |source| Error::Socket { what, source };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(step(format!("create a UDP socket {on}")))?;
    // Several nodes on one host share the port. On Linux, SO_REUSEADDR is what lets every
    // socket bound to the group receive a copy of each datagram (checked against the
    // socket's own memberships). SO_REUSEPORT must not be set there: it puts the sockets in
    // one load-balancing group, and the kernel hands each datagram to *one* of them, chosen
    // by the sender's address, whatever interface the socket joined on: a loopback node's
    // socket took the LAN's beacons from a LAN socket of the same host. BSDs and macOS need
    // SO_REUSEPORT to share a multicast port, and deliver to every socket with it.
    s.set_reuse_address(true)
        .map_err(step(format!("set SO_REUSEADDR {on}")))?;
    #[cfg(all(
        unix,
        not(any(
            target_os = "linux",
            target_os = "android",
            target_os = "solaris",
            target_os = "illumos"
        ))
    ))]
    s.set_reuse_port(true)
        .map_err(step(format!("set SO_REUSEPORT {on}")))?;
    s.set_nonblocking(true)
        .map_err(step(format!("make the socket non-blocking {on}")))?;
    let dest = if iface.multicast(mode) {
        // Bound to the group, the socket receives this group's datagrams only (no unicast to
        // the port, no other group).
        let bind = if cfg!(target_os = "linux") {
            group
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        s.bind(&SocketAddr::V4(SocketAddrV4::new(bind, port)).into())
            .map_err(step(format!("bind UDP {bind}:{port} {on}")))?;
        // Only the memberships of this socket, not those other sockets of the host joined
        // (Linux delivers every joined group to every socket on the port by default).
        #[cfg(target_os = "linux")]
        s.set_multicast_all_v4(false)
            .map_err(step(format!("clear IP_MULTICAST_ALL {on}")))?;
        let which = match iface.index {
            Some(n) => InterfaceIndexOrAddress::Index(n),
            None => InterfaceIndexOrAddress::Address(iface.addr),
        };
        s.join_multicast_v4_n(&group, &which).map_err(step(format!(
            "join multicast group {group} {on} (is the interface up and multicast-capable?)"
        )))?;
        s.set_multicast_if_v4(&iface.addr)
            .map_err(step(format!("set IP_MULTICAST_IF {on}")))?;
        // Nodes of this host hear each other.
        s.set_multicast_loop_v4(true)
            .map_err(step(format!("set IP_MULTICAST_LOOP {on}")))?;
        s.set_multicast_ttl_v4(ttl)
            .map_err(step(format!("set IP_MULTICAST_TTL {on}")))?;
        SocketAddrV4::new(group, port)
    } else {
        let Some(bcast) = iface.broadcast else {
            return Err(Error::Interface(format!(
                "interface {} ({}) has no broadcast address",
                iface.name, iface.addr
            )));
        };
        s.set_broadcast(true)
            .map_err(step(format!("set SO_BROADCAST {on}")))?;
        // Bound to the subnet's broadcast address: only that subnet's beacons arrive.
        s.bind(&SocketAddr::V4(SocketAddrV4::new(bcast, port)).into())
            .map_err(step(format!("bind UDP {bcast}:{port} {on}")))?;
        SocketAddrV4::new(bcast, port)
    };
    Ok((s.into(), dest))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn iface(name: &str, addr: [u8; 4], flags: u32) -> Iface {
        let addr = Ipv4Addr::from(addr);
        Iface {
            name: name.into(),
            index: Some(1),
            addr,
            broadcast: (!addr.is_loopback() && flags & IFF_BROADCAST != 0)
                .then(|| Ipv4Addr::new(addr.octets()[0], addr.octets()[1], addr.octets()[2], 255)),
            loopback: addr.is_loopback(),
            flags: Some(flags),
        }
    }

    fn machine() -> Vec<Iface> {
        vec![
            iface("lo", [127, 0, 0, 1], 0x9),
            iface("eth0", [10, 0, 0, 5], 0x1003),
            iface("eth0", [10, 0, 1, 5], 0x1003),
            iface("tun0", [10, 8, 0, 2], 0x11),
            iface("eth1", [192, 168, 1, 2], 0x1002),
        ]
    }

    fn names(v: Vec<Iface>) -> Vec<String> {
        v.into_iter()
            .map(|i| format!("{}={}", i.name, i.addr))
            .collect()
    }

    #[test]
    fn any_loopback_address_means_the_loopback_interface() {
        for ip in [[127, 0, 0, 1], [127, 0, 0, 9]] {
            let v = pick(machine(), &Interfaces::Addr(ip.into()), Mode::Multicast).unwrap();
            assert_eq!(names(v), vec!["lo=127.0.0.1"]);
        }
        // The loopback interface needs no MULTICAST flag, and broadcast mode uses multicast there.
        let v = pick(
            machine(),
            &Interfaces::Addr([127, 0, 0, 1].into()),
            Mode::Broadcast,
        )
        .unwrap();
        assert!(v[0].multicast(Mode::Broadcast));
    }

    #[test]
    fn an_address_or_name_picks_that_interface() {
        let v = pick(
            machine(),
            &Interfaces::Addr([10, 0, 1, 5].into()),
            Mode::Multicast,
        )
        .unwrap();
        assert_eq!(names(v), vec!["eth0=10.0.1.5"]);
        let v = pick(machine(), &Interfaces::Name("eth0".into()), Mode::Broadcast).unwrap();
        assert_eq!(names(v), vec!["eth0=10.0.0.5"]);
        let err = pick(
            machine(),
            &Interfaces::Addr([10, 9, 9, 9].into()),
            Mode::Multicast,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no network interface"), "{err}");
        let err = pick(machine(), &Interfaces::Name("tun0".into()), Mode::Multicast)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not multicast-capable"), "{err}");
        let err = pick(
            machine(),
            &Interfaces::Name("wlan9".into()),
            Mode::Multicast,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("wlan9"), "{err}");
    }

    #[test]
    fn the_broadcast_address_is_computed_from_the_netmask() {
        let ip = Ipv4Addr::new(10, 77, 9, 1);
        let mask = Ipv4Addr::new(255, 255, 255, 0);
        assert_eq!(broadcast_of(ip, mask), Some(Ipv4Addr::new(10, 77, 9, 255)));
        let wide = Ipv4Addr::new(255, 255, 240, 0);
        assert_eq!(broadcast_of(ip, wide), Some(Ipv4Addr::new(10, 77, 15, 255)));
        assert_eq!(broadcast_of(ip, Ipv4Addr::new(255, 255, 255, 254)), None);
        assert_eq!(
            broadcast_of(Ipv4Addr::LOCALHOST, Ipv4Addr::new(255, 0, 0, 0)),
            None
        );
    }

    #[test]
    fn all_means_every_capable_interface_that_is_up_once() {
        let v = pick(machine(), &Interfaces::All, Mode::Multicast).unwrap();
        assert_eq!(names(v), vec!["lo=127.0.0.1", "eth0=10.0.0.5"]);
        let v = pick(machine(), &Interfaces::All, Mode::Broadcast).unwrap();
        assert_eq!(names(v), vec!["lo=127.0.0.1", "eth0=10.0.0.5"]);
        let err = pick(Vec::new(), &Interfaces::All, Mode::Multicast).unwrap_err();
        assert!(matches!(err, Error::Interface(_)));
    }
}
