//! The credit this side gave for each file coming in, against the chunk bytes received
//! (see [`Credits`]).

use std::collections::{HashMap, VecDeque};

use super::SeqHash;
use crate::Violation;

/// Most transfers this side gave up (`Abort`) whose credit is still remembered, so chunks
/// the sender had sent before it read the `Abort` are taken (and dropped) rather than
/// closing the connection. A sender sends one file at a time (this version's senders do),
/// so only the transfer aborted last can still have chunks on the way; the oldest beyond
/// this many is forgotten (a chunk of it is then a violation).
pub const MAX_DRAINING: usize = 64;

/// What the connection does with a chunk that keeps to the credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Take {
    /// A chunk of a transfer in progress: the owner gets it.
    Deliver,
    /// A chunk of a transfer this side gave up, sent before the sender read the `Abort`:
    /// nobody wants it.
    Drop,
}

/// One incoming transfer's credit.
#[derive(Debug, Clone)]
struct Grant {
    /// The window of its `Want` or `Fetch`.
    window: u64,
    /// The byte the sender may send up to: the last `Ack` plus the window.
    limit: u64,
    /// Chunk bytes received (counted, whatever their offsets say).
    received: u64,
    /// Credit left of an earlier transfer of this id that this side gave up (its id used
    /// again): its chunks may still come, up to this many bytes ...
    stale_bytes: u64,
    /// ... ending at most at this byte.
    stale_end: u64,
    /// An empty chunk came (the whole of an empty file).
    empty_seen: bool,
    /// This side gave it up (`Abort`): its chunks are dropped until the credit is used.
    draining: bool,
    /// Which grant this is (an id may be asked for again).
    nth: u64,
}

impl Grant {
    fn new(window: u32, earlier: Option<Grant>, nth: u64) -> Grant {
        let window = u64::from(window);
        let (stale_bytes, stale_end) =
            earlier.map_or((0, 0), |g| (g.left(), g.limit.max(g.stale_end)));
        Grant {
            window,
            limit: window,
            received: 0,
            stale_bytes,
            stale_end,
            empty_seen: false,
            draining: false,
            nth,
        }
    }

    /// Bytes the sender may still send.
    fn left(&self) -> u64 {
        self.limit
            .saturating_add(self.stale_bytes)
            .saturating_sub(self.received)
    }
}

/// The credit this side gave for each transfer coming in (its `Want`s and `Fetch`es, then
/// its `Ack`s), against the chunk bytes the peer sent: a chunk of no transfer this side
/// asked for, or beyond the credit, is a violation, so a peer cannot make the node hold
/// more chunk data than the credit it was given.
///
/// Bounded: an entry is made only by this side's own `Want` or `Fetch` (a peer cannot add
/// one), and leaves with this side's `Done`, the peer's `Abort`, or, for a transfer this
/// side gave up, once its credit is used or [`MAX_DRAINING`] newer ones were given up.
#[derive(Debug, Default)]
pub(super) struct Credits {
    grants: HashMap<u64, Grant, SeqHash>,
    /// Transfers given up, oldest first, with their grant's number (an entry may be stale:
    /// its id asked for again, or gone).
    draining: VecDeque<(u64, u64)>,
    /// Grants made so far.
    made: u64,
}

impl Credits {
    /// This side asks for transfer `id` (`Want` or `Fetch`) with `window` bytes of credit.
    pub(super) fn ask(&mut self, id: u64, window: u32) {
        let earlier = self.grants.remove(&id);
        self.made += 1;
        self.grants
            .insert(id, Grant::new(window, earlier, self.made));
    }

    /// This side acknowledges `received` bytes of `id`: the credit moves on.
    pub(super) fn ack(&mut self, id: u64, received: u64) {
        if let Some(g) = self.grants.get_mut(&id) {
            g.limit = g.limit.max(received.saturating_add(g.window));
        }
    }

    /// This side has the whole file (`Done`): nothing more may come.
    pub(super) fn done(&mut self, id: u64) {
        self.grants.remove(&id);
    }

    /// This side gives transfer `id` up (`Abort`): what the sender sent before it read the
    /// `Abort` may still come, up to the credit.
    pub(super) fn abort(&mut self, id: u64) {
        let Some(g) = self.grants.get_mut(&id) else {
            return;
        };
        if g.draining {
            return;
        }
        if g.left() == 0 {
            self.grants.remove(&id);
            return;
        }
        g.draining = true;
        self.draining.push_back((id, g.nth));
        if self.draining.len() > MAX_DRAINING {
            // Entries of grants already gone (their credit used, their id asked for again)
            // do not count against the cap: only live draining grants are evicted.
            let grants = &self.grants;
            self.draining
                .retain(|&(id, nth)| grants.get(&id).is_some_and(|g| g.draining && g.nth == nth));
        }
        while self.draining.len() > MAX_DRAINING {
            if let Some((old, nth)) = self.draining.pop_front() {
                if self
                    .grants
                    .get(&old)
                    .is_some_and(|g| g.draining && g.nth == nth)
                {
                    self.grants.remove(&old);
                }
            }
        }
    }

    /// The peer gives transfer `id` up (`Abort`): as its sender, it sends nothing more.
    pub(super) fn peer_abort(&mut self, id: u64) {
        self.grants.remove(&id);
    }

    /// A chunk of `len` bytes at `offset` of transfer `id` arrived.
    pub(super) fn chunk(&mut self, id: u64, offset: u64, len: usize) -> Result<Take, Violation> {
        let Some(g) = self.grants.get_mut(&id) else {
            return Err(Violation::UnaskedChunk { id });
        };
        let len = len as u64;
        if len == 0 {
            // Only an empty file is sent as an empty chunk: its only one, at 0.
            if offset != 0 || g.received != 0 || g.empty_seen {
                return Err(Violation::EmptyChunk { id, offset });
            }
            g.empty_seen = true;
        }
        let end = offset.saturating_add(len);
        let credit = g.limit.max(g.stale_end);
        if end > credit {
            return Err(Violation::ChunkOverCredit { id, end, credit });
        }
        let received = g.received.saturating_add(len);
        let credit = g.limit.saturating_add(g.stale_bytes);
        if received > credit {
            return Err(Violation::ChunkOverCredit {
                id,
                end: received,
                credit,
            });
        }
        g.received = received;
        if !g.draining {
            return Ok(Take::Deliver);
        }
        if g.left() == 0 {
            self.grants.remove(&id);
        }
        Ok(Take::Drop)
    }

    /// How many transfers are tracked (in progress, or given up and draining).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.grants.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Gives up transfer `id` with `window` bytes of credit and `sent` of them received.
    fn given_up(c: &mut Credits, id: u64, window: u32, sent: usize) {
        c.ask(id, window);
        if sent > 0 {
            assert_eq!(c.chunk(id, 0, sent), Ok(Take::Deliver));
        }
        c.abort(id);
    }

    /// Transfers given up whose credit was then used are gone: they do not push a live
    /// draining grant out of the cap, however many of them there were.
    #[test]
    fn drained_grants_do_not_count_against_the_draining_cap() {
        let mut c = Credits::default();
        // Live: 10 of its 20 bytes of credit may still come.
        given_up(&mut c, 1, 20, 10);
        // Many more given up, each drained to its last byte (gone, but still in the queue).
        for id in 2..2 + 3 * MAX_DRAINING as u64 {
            given_up(&mut c, id, 10, 5);
            assert_eq!(c.chunk(id, 5, 5), Ok(Take::Drop));
        }
        assert_eq!(c.len(), 1);
        // One more live one: the first is still remembered, and its late chunk is dropped.
        given_up(&mut c, 1_000, 10, 0);
        assert_eq!(c.chunk(1, 10, 10), Ok(Take::Drop));
        assert!(c.draining.len() <= MAX_DRAINING);
    }

    /// Past the cap of live draining grants, the oldest is forgotten: a late chunk of it is
    /// a violation, the newer ones' chunks are still dropped quietly.
    #[test]
    fn past_the_cap_the_oldest_live_draining_grant_is_forgotten() {
        let mut c = Credits::default();
        for id in 0..=MAX_DRAINING as u64 {
            given_up(&mut c, id, 10, 0);
        }
        assert_eq!(c.chunk(0, 0, 10), Err(Violation::UnaskedChunk { id: 0 }));
        assert_eq!(c.chunk(1, 0, 10), Ok(Take::Drop));
        assert_eq!(c.chunk(MAX_DRAINING as u64, 0, 10), Ok(Take::Drop));
        assert_eq!(c.len(), MAX_DRAINING - 2);
    }
}
