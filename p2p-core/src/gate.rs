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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

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
