//! A worker's admission of assigned attempts to its slots, shared fairly between the
//! coordinators (connections) that use the node. No IO, no clock.
//!
//! An attempt that arrives while a slot is free and nobody waits starts at once. Otherwise
//! it waits in its connection's queue, and each freed slot goes to the next connection in
//! turn (round-robin over the connections with a waiting attempt), so a coordinator with a
//! thousand tasks cannot starve one with ten: each gets every other free slot. The queues
//! are bounded twice: a connection holds at most what its coordinator may have in flight
//! there (the capacity its handshake advertised, which the connection already enforces),
//! and all of them together at most [`Admission::max_waiting`]; an attempt over the bound
//! is refused at once (the coordinator runs it elsewhere or again).
//!
//! The capacity may change at any time ([`Admission::set_capacity`]): a shrink stops no
//! running attempt, it only starts none until fewer run.

use std::collections::{HashMap, VecDeque};

/// A connection's key (the worker's link id).
pub type Conn = u64;

/// What [`Admission::arrive`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival<T> {
    /// A slot was free and nobody waited: run it now (it holds a slot).
    Start(T),
    /// It waits for a slot; [`Admission::next_start`] gives it out in its turn.
    Queued,
    /// The queue is full: refuse it.
    Full(T),
}

/// The admission state of one worker. See the [module documentation](self).
#[derive(Debug)]
pub struct Admission<T> {
    capacity: u32,
    running: u32,
    max_waiting: usize,
    waiting: usize,
    queues: HashMap<Conn, VecDeque<T>>,
    /// Connections with a waiting attempt, in the order they are served.
    turn: VecDeque<Conn>,
}

impl<T> Admission<T> {
    /// Admission to `capacity` slots, with at most `max_waiting` attempts waiting.
    pub fn new(capacity: u32, max_waiting: usize) -> Self {
        Admission {
            capacity,
            running: 0,
            max_waiting,
            waiting: 0,
            queues: HashMap::new(),
            turn: VecDeque::new(),
        }
    }

    /// Slots now.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Attempts holding a slot.
    pub fn running(&self) -> u32 {
        self.running
    }

    /// Attempts waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// The most attempts that may wait.
    pub fn max_waiting(&self) -> usize {
        self.max_waiting
    }

    /// An attempt of connection `conn` arrived.
    pub fn arrive(&mut self, conn: Conn, item: T) -> Arrival<T> {
        if self.running < self.capacity && self.waiting == 0 {
            self.running += 1;
            return Arrival::Start(item);
        }
        if self.waiting >= self.max_waiting {
            return Arrival::Full(item);
        }
        let q = self.queues.entry(conn).or_default();
        if q.is_empty() {
            self.turn.push_back(conn);
        }
        q.push_back(item);
        self.waiting += 1;
        Arrival::Queued
    }

    /// Starts an attempt at once if a slot is free and nobody waits (an attempt answered
    /// without waiting); it holds a slot until [`Admission::finish`].
    pub fn try_start(&mut self) -> bool {
        let ok = self.running < self.capacity && self.waiting == 0;
        if ok {
            self.running += 1;
        }
        ok
    }

    /// An attempt that held a slot ended.
    pub fn finish(&mut self) {
        self.running = self.running.saturating_sub(1);
    }

    /// The next waiting attempt to start, in round-robin order over the connections, if a
    /// slot is free; it then holds the slot. Call until `None` after every
    /// [`Admission::finish`] and [`Admission::set_capacity`].
    pub fn next_start(&mut self) -> Option<(Conn, T)> {
        if self.running >= self.capacity {
            return None;
        }
        while let Some(conn) = self.turn.pop_front() {
            let Some(q) = self.queues.get_mut(&conn) else {
                continue;
            };
            let Some(item) = q.pop_front() else {
                self.queues.remove(&conn);
                continue;
            };
            if q.is_empty() {
                self.queues.remove(&conn);
            } else {
                self.turn.push_back(conn);
            }
            self.waiting -= 1;
            self.running += 1;
            return Some((conn, item));
        }
        None
    }

    /// Drops the waiting attempts of `conn` for which `gone` holds (cancelled, or their
    /// connection closed), returning how many.
    pub fn forget(&mut self, conn: Conn, mut gone: impl FnMut(&T) -> bool) -> usize {
        let Some(q) = self.queues.get_mut(&conn) else {
            return 0;
        };
        let before = q.len();
        q.retain(|t| !gone(t));
        let dropped = before - q.len();
        self.waiting -= dropped;
        if q.is_empty() {
            self.queues.remove(&conn);
            self.turn.retain(|&c| c != conn);
        }
        dropped
    }

    /// The number of slots changes; call [`Admission::next_start`] after a grow.
    pub fn set_capacity(&mut self, capacity: u32) {
        self.capacity = capacity;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts what can start, returning the connections served in order.
    fn starts(a: &mut Admission<u32>) -> Vec<(Conn, u32)> {
        std::iter::from_fn(|| a.next_start()).collect()
    }

    #[test]
    fn a_small_run_is_served_in_turn_with_a_large_one() {
        let mut a = Admission::new(2, 100);
        // The large run (connection 1) fills both slots and queues two more.
        assert_eq!(a.arrive(1, 10), Arrival::Start(10));
        assert_eq!(a.arrive(1, 11), Arrival::Start(11));
        assert_eq!(a.arrive(1, 12), Arrival::Queued);
        assert_eq!(a.arrive(1, 13), Arrival::Queued);
        // The small run (connection 2) arrives later with two.
        assert_eq!(a.arrive(2, 20), Arrival::Queued);
        assert_eq!(a.arrive(2, 21), Arrival::Queued);
        assert_eq!(a.waiting(), 4);
        // Freed slots alternate: 1, 2, 1, 2 (FIFO would give 1, 1, 2, 2).
        let mut order = Vec::new();
        for _ in 0..4 {
            a.finish();
            let s = starts(&mut a);
            assert_eq!(s.len(), 1);
            order.push(s[0]);
            // The large run refills its queue each time one of its own ends.
            if s[0].0 == 1 {
                assert_eq!(a.arrive(1, 100 + s[0].1), Arrival::Queued);
            }
        }
        assert_eq!(order, [(1, 12), (2, 20), (1, 13), (2, 21)]);
        assert_eq!(a.running(), 2);
    }

    #[test]
    fn a_newcomer_never_overtakes_waiting_attempts() {
        let mut a = Admission::new(1, 100);
        assert_eq!(a.arrive(1, 1), Arrival::Start(1));
        assert_eq!(a.arrive(2, 2), Arrival::Queued);
        a.finish();
        // A slot is free, but attempt 2 waits: an attempt answered at once may not take it.
        assert!(!a.try_start());
        assert_eq!(a.arrive(3, 3), Arrival::Queued);
        assert_eq!(starts(&mut a), [(2, 2)]);
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut a = Admission::new(1, 2);
        assert_eq!(a.arrive(1, 1), Arrival::Start(1));
        assert_eq!(a.arrive(1, 2), Arrival::Queued);
        assert_eq!(a.arrive(2, 3), Arrival::Queued);
        assert_eq!(a.arrive(2, 4), Arrival::Full(4));
        assert_eq!(a.waiting(), 2);
    }

    #[test]
    fn a_shrink_stops_nothing_and_a_grow_starts_the_waiting() {
        let mut a = Admission::new(3, 100);
        for i in 0..3 {
            assert_eq!(a.arrive(1, i), Arrival::Start(i));
        }
        assert_eq!(a.arrive(2, 9), Arrival::Queued);
        a.set_capacity(1);
        assert_eq!(a.running(), 3, "nothing stopped");
        a.finish();
        a.finish();
        assert!(starts(&mut a).is_empty(), "one runs: at the new capacity");
        a.set_capacity(2);
        assert_eq!(starts(&mut a), [(2, 9)]);
        assert_eq!(a.running(), 2);
    }

    #[test]
    fn forgotten_attempts_leave_the_queue_and_the_turn() {
        let mut a = Admission::new(1, 100);
        assert_eq!(a.arrive(1, 1), Arrival::Start(1));
        assert_eq!(a.arrive(2, 2), Arrival::Queued);
        assert_eq!(a.arrive(2, 3), Arrival::Queued);
        assert_eq!(a.arrive(3, 4), Arrival::Queued);
        assert_eq!(a.forget(2, |&t| t == 2), 1);
        assert_eq!(a.forget(2, |_| true), 1);
        assert_eq!(a.waiting(), 1);
        a.finish();
        assert_eq!(starts(&mut a), [(3, 4)]);
        assert_eq!(a.waiting(), 0);
    }
}
