//! The open-file limit (`RLIMIT_NOFILE`, `ulimit -n`): every connection is a file
//! descriptor, so it bounds how many peers a run can hold and how many connections a serving
//! node can accept.
//!
//! `p2p-node run` and `serve` raise their soft limit to the hard limit at start ([`raise`]);
//! a run refuses, up front, a peer list the limit cannot hold ([`check_peers`]), and the
//! dialer of every run dials at most [`connection_budget`] peers at once (a peer beyond is
//! reported unreachable with the reason, never left waiting).

/// Descriptors kept for everything but connections: the standard streams, the runtime's
/// epoll and wakeup descriptors, listeners, a journal, a report, files of tasks, a handler's
/// pipes.
pub const RESERVE: u64 = 64;

/// A process's open-file limit; `None` is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The soft limit: what the process may open now.
    pub soft: Option<u64>,
    /// The hard limit: what the soft limit may be raised to without privileges.
    pub hard: Option<u64>,
}

impl Limit {
    /// The limit now.
    pub fn current() -> Limit {
        let r = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        Limit {
            soft: r.current,
            hard: r.maximum,
        }
    }

    /// How many connections fit: the soft limit less [`RESERVE`] (at least 1).
    pub fn connections(&self) -> usize {
        connection_budget(self.soft)
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
        write!(
            f,
            "the open-file limit (ulimit -n) is {}, hard limit {}",
            show(self.soft),
            show(self.hard)
        )
    }
}

/// How many connections fit in a soft limit of `soft` descriptors (`None`: no limit): all but
/// [`RESERVE`], at least 1.
pub fn connection_budget(soft: Option<u64>) -> usize {
    match soft {
        None => usize::MAX,
        Some(n) => usize::try_from(n.saturating_sub(RESERVE).max(1)).unwrap_or(usize::MAX),
    }
}

/// Raises the soft limit to the hard limit (Linux caps an unlimited hard limit at
/// `fs.nr_open`, so that one is tried when the hard limit is unlimited). Returns the limit
/// afterwards; when it cannot be raised it stays as it was (and that is what is returned).
pub fn raise() -> Limit {
    let before = Limit::current();
    if before.soft.is_none() || before.soft == before.hard {
        return before;
    }
    let target = before.hard.or_else(nr_open);
    if let Some(t) = target {
        if before.soft.is_some_and(|s| s >= t) {
            return before;
        }
        let new = rustix::process::Rlimit {
            current: Some(t),
            maximum: before.hard,
        };
        if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Nofile, new) {
            tracing::debug!(error = %e, "cannot raise the open-file limit");
        }
    }
    Limit::current()
}

/// `fs.nr_open`: the most descriptors a Linux process may have.
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `peers` connections (and `extra` descriptors beyond [`RESERVE`], e.g. in-process
/// nodes) fit in `limit`; the message names the limit and what to do when not.
pub fn check_peers(peers: usize, extra: u64, limit: Limit) -> Result<(), String> {
    let need = (peers as u64).saturating_add(extra).saturating_add(RESERVE);
    match limit.soft {
        Some(soft) if need > soft => Err(format!(
            "{peers} peers need about {need} open files, and {limit}: raise it (e.g. `ulimit -n \
             {need}`, or LimitNOFILE={need} in a systemd unit) or give fewer peers"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_budget_keeps_the_reserve_and_never_reaches_zero() {
        assert_eq!(connection_budget(Some(1024)), 960);
        assert_eq!(connection_budget(Some(RESERVE)), 1);
        assert_eq!(connection_budget(Some(3)), 1);
        assert_eq!(connection_budget(None), usize::MAX);
    }

    #[test]
    fn a_peer_list_over_the_limit_is_refused_naming_the_limit() {
        let low = Limit {
            soft: Some(256),
            hard: Some(256),
        };
        let err = check_peers(1000, 0, low).unwrap_err();
        assert!(
            err.contains("1000 peers need about 1064 open files"),
            "{err}"
        );
        assert!(err.contains("ulimit -n) is 256, hard limit 256"), "{err}");
        assert!(err.contains("ulimit -n 1064"), "{err}");
        assert!(check_peers(192, 0, low).is_ok());
        assert!(check_peers(192, 1, low).is_err());
        let none = Limit {
            soft: None,
            hard: None,
        };
        assert!(check_peers(1_000_000, 0, none).is_ok());
    }

    #[test]
    fn raise_never_lowers_the_limit() {
        let before = Limit::current();
        let after = raise();
        match (before.soft, after.soft) {
            (Some(b), Some(a)) => assert!(a >= b),
            (None, a) => assert_eq!(a, None),
            (Some(_), None) => {}
        }
        assert_eq!(after.hard, before.hard);
    }
}
