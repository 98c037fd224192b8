//! A bound on connections still in their handshake, for a node under a flood.
//!
//! Every accepted connection takes a [`HandshakeTicket`] from the node's [`HandshakeGate`]
//! and gives it back (drops it) once its handshake is done, failed or timed out. When the
//! gate is full, admitting a new connection *evicts the oldest one still in handshake*: its
//! ticket's [`HandshakeTicket::evicted`] completes and its owner closes it.
//!
//! Evicting the oldest rather than refusing the newest is what keeps a node serving its
//! cluster under a flood of connections that never finish the handshake: those sit until
//! the handshake timeout and so become the oldest, while a real peer finishes in a few
//! round trips. To push a real peer out, an attacker must open `max` new connections during
//! that peer's handshake, and a dialler that is pushed out retries.
//!
//! [`LogLimit`] keeps the warnings of such a flood (one per connection) to a few lines and a
//! count per interval.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Default interval of a [`LogLimit`]: 10 s.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Default number of lines a [`LogLimit`] lets through per interval.
pub const LOG_BURST: u32 = 10;

/// Turns a flood of one kind of warning (one per connection, under a connection flood)
/// into a few lines and a count. IO-free: time is passed in.
///
/// The first [`LogLimit::burst`] occurrences of each interval are written as they come;
/// the rest are only counted, and the count is written once, in the next line or in a
/// summary line when [`LogLimit::flush`] finds the interval over.
#[derive(Debug, Clone)]
pub struct LogLimit {
    interval: Duration,
    burst: u32,
    window: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl LogLimit {
    /// At most `burst` lines (at least 1) per `interval`.
    pub const fn new(interval: Duration, burst: u32) -> Self {
        LogLimit {
            interval,
            burst: if burst == 0 { 1 } else { burst },
            window: None,
            written: 0,
            suppressed: 0,
        }
    }

    /// The lines let through per interval.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn roll(&mut self, now: Instant) {
        match self.window {
            Some(start) if now < start + self.interval => {}
            _ => {
                self.window = Some(now);
                self.written = 0;
            }
        }
    }

    /// One occurrence at `now`: `Some(n)` when it is to be written, `n` being how many
    /// earlier ones were not (to say so in the line); `None` when it is only counted.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.roll(now);
        if self.written < self.burst {
            self.written += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Called now and then (every interval is enough): `Some(n)` when `n` occurrences were
    /// not written and the interval they fell in is over: write one summary line.
    pub fn flush(&mut self, now: Instant) -> Option<u64> {
        if self.suppressed == 0 {
            return None;
        }
        let over = self.window.is_none_or(|start| now >= start + self.interval);
        if !over {
            return None;
        }
        self.window = Some(now);
        self.written = 0;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Default for LogLimit {
    /// [`LOG_BURST`] lines per [`LOG_INTERVAL`].
    fn default() -> Self {
        LogLimit::new(LOG_INTERVAL, LOG_BURST)
    }
}

/// Default number of connections that may be in their handshake at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;

/// Bounds the connections in handshake (see the module documentation). Cheap to clone;
/// clones share the bound.
#[derive(Debug, Clone)]
pub struct HandshakeGate {
    max: usize,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// Oldest first.
    waiting: VecDeque<(u64, CancellationToken)>,
    evictions: u64,
}

impl HandshakeGate {
    /// A gate for at most `max` connections in handshake (at least 1).
    pub fn new(max: usize) -> Self {
        HandshakeGate {
            max: max.max(1),
            inner: Arc::new(Mutex::new(Inner::default())),
        }
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Admits a new connection, evicting the oldest one still in handshake if the gate is
    /// full.
    pub fn admit(&self) -> HandshakeTicket {
        let mut inner = self.lock();
        while inner.waiting.len() >= self.max {
            if let Some((_, oldest)) = inner.waiting.pop_front() {
                oldest.cancel();
                inner.evictions += 1;
            }
        }
        inner.next += 1;
        let id = inner.next;
        let token = CancellationToken::new();
        inner.waiting.push_back((id, token.clone()));
        HandshakeTicket {
            id,
            token,
            gate: self.clone(),
        }
    }

    /// How many connections are in handshake now.
    pub fn in_handshake(&self) -> usize {
        self.lock().waiting.len()
    }

    /// How many connections were evicted so far.
    pub fn evictions(&self) -> u64 {
        self.lock().evictions
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state stays consistent even if a holder panicked: every update is one step.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(pos) = inner.waiting.iter().position(|(i, _)| *i == id) {
            inner.waiting.remove(pos);
        }
    }
}

impl Default for HandshakeGate {
    fn default() -> Self {
        HandshakeGate::new(DEFAULT_MAX_HANDSHAKES)
    }
}

/// One connection's place in a [`HandshakeGate`]; dropping it frees the place.
#[derive(Debug)]
pub struct HandshakeTicket {
    id: u64,
    token: CancellationToken,
    gate: HandshakeGate,
}

impl HandshakeTicket {
    /// Completes when a newer connection evicted this one: close it.
    pub async fn evicted(&self) {
        self.token.cancelled().await;
    }

    /// Whether this connection was evicted.
    pub fn is_evicted(&self) -> bool {
        self.token.is_cancelled()
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        self.gate.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_full_gate_evicts_the_oldest_and_drops_free_places() {
        let gate = HandshakeGate::new(2);
        let a = gate.admit();
        let b = gate.admit();
        assert_eq!(gate.in_handshake(), 2);
        assert!(!a.is_evicted() && !b.is_evicted());
        let c = gate.admit();
        assert!(a.is_evicted(), "the oldest goes");
        assert!(!b.is_evicted() && !c.is_evicted());
        assert_eq!(gate.in_handshake(), 2);
        // A finished handshake frees its place: the next admission evicts nobody.
        drop(c);
        let d = gate.admit();
        assert!(!b.is_evicted() && !d.is_evicted());
        assert_eq!(gate.evictions(), 1);
        drop(a);
        assert_eq!(gate.in_handshake(), 2);
        drop((b, d));
        assert_eq!(gate.in_handshake(), 0);
    }

    #[test]
    fn a_flood_of_one_warning_becomes_a_burst_and_one_count_per_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = LogLimit::new(Duration::from_secs(10), 3);
        // 114,504 occurrences in 30 s, as a connection flood produces.
        let mut lines = Vec::new();
        for i in 0..114_504u64 {
            let now = t0 + Duration::from_micros(i * 262);
            if let Some(n) = l.hit(now) {
                lines.push(("line", n));
            }
            if i % 1000 == 0 {
                if let Some(n) = l.flush(now) {
                    lines.push(("summary", n));
                }
            }
        }
        if let Some(n) = l.flush(t0 + 40 * s) {
            lines.push(("summary", n));
        }
        // Three lines per interval and a count of the rest: every occurrence is accounted for.
        let written = lines.iter().filter(|(k, _)| *k == "line").count() as u64;
        let counted: u64 = lines.iter().map(|(_, n)| n).sum();
        assert_eq!(written + counted, 114_504);
        assert!(lines.len() <= 4 * 5, "{} lines: {lines:?}", lines.len());
        // A quiet period: nothing to flush, and the next occurrence is written at once.
        assert_eq!(l.flush(t0 + 100 * s), None);
        assert_eq!(l.hit(t0 + 100 * s), Some(0));
    }

    #[test]
    fn a_few_warnings_are_all_written() {
        let t0 = Instant::now();
        let mut l = LogLimit::default();
        for i in 0..LOG_BURST {
            assert_eq!(l.hit(t0 + Duration::from_millis(u64::from(i))), Some(0));
        }
        assert_eq!(l.hit(t0), None);
        assert_eq!(
            l.flush(t0 + Duration::from_secs(5)),
            None,
            "interval not over"
        );
        assert_eq!(l.flush(t0 + LOG_INTERVAL), Some(1));
    }

    #[tokio::test]
    async fn evicted_completes() {
        let gate = HandshakeGate::new(1);
        let a = gate.admit();
        let _b = gate.admit();
        tokio::time::timeout(std::time::Duration::from_secs(5), a.evicted())
            .await
            .expect("evicted");
    }
}
