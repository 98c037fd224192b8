//! The accept side's log lines under a flood: each warning that a flood of connections
//! repeats once per connection is kept to a few lines and a count per interval
//! ([`p2p_core::gate::LogLimit`]), and a peer's types are shown short.

use std::sync::Mutex;

use p2p_core::gate::{LogLimit, LOG_INTERVAL};
use tracing::warn;

/// The accept side's warnings that a flood repeats once per connection, each kept to a few
/// lines and a count per interval.
#[derive(Default)]
pub(crate) struct Floods {
    pub(crate) limit_reached: LogLimit,
    pub(crate) evicted: LogLimit,
    pub(crate) failed: LogLimit,
}

/// Writes `line` if `limit` lets it through, saying how many were not written before.
pub(crate) fn flood_warn(
    floods: &Mutex<Floods>,
    pick: fn(&mut Floods) -> &mut LogLimit,
    line: impl FnOnce(u64),
) {
    let let_through = {
        let mut f = floods.lock().unwrap_or_else(|e| e.into_inner());
        pick(&mut f).hit(std::time::Instant::now())
    };
    if let Some(unwritten) = let_through {
        line(unwritten);
    }
}

/// A peer's types for a log line: the first few (each bounded by the handshake), then how
/// many there are.
pub(crate) fn types_shown(types: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut out = types
        .iter()
        .take(SHOWN)
        .map(|t| p2p_core::shown::shown(t))
        .collect::<Vec<_>>()
        .join(",");
    if types.len() > SHOWN {
        out.push_str(&format!(",... ({} types)", types.len()));
    }
    out
}

/// The end of a flood line: how many like it were not written since the last one.
pub(crate) fn more(unwritten: u64) -> String {
    match unwritten {
        0 => String::new(),
        n => format!(" ({n} more since the last such line, not logged one by one)"),
    }
}

/// The summary lines of the floods whose interval is over.
pub(crate) fn flood_summaries(floods: &Mutex<Floods>, max_handshakes: usize) {
    let now = std::time::Instant::now();
    let (limit, evicted, failed) = {
        let mut f = floods.lock().unwrap_or_else(|e| e.into_inner());
        (
            f.limit_reached.flush(now),
            f.evicted.flush(now),
            f.failed.flush(now),
        )
    };
    let every = LOG_INTERVAL;
    if let Some(n) = limit {
        warn!(count = n, every = ?every, "connection limit reached; closed {n} more new connections (not logged one by one)");
    }
    if let Some(n) = evicted {
        warn!(count = n, limit = max_handshakes, every = ?every, "too many connections in handshake; closed {n} more of the oldest (not logged one by one)");
    }
    if let Some(n) = failed {
        warn!(count = n, every = ?every, "handshake failed on {n} more connections (not logged one by one)");
    }
}
