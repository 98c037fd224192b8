//! The scheduler's ordered sets, shaped for how it uses them.
//!
//! - [`ReadySet`]: a type's ready tasks. Almost all of them are known when the run starts
//!   and leave from the front (the costliest, first in file order, starts first); a few come
//!   back later (retries, released dependents, lost tasks). They are a sorted vector read
//!   from a cursor, plus a small B-tree for the ones that came back, plus tombstones for the
//!   rare removal from the middle of the vector: taking the first task is a look at two
//!   entries and a cursor step, not a B-tree removal.
//! - [`SortedVec`]: a type's free nodes. A node's key moves when its load changes by one
//!   (twice a task), usually by a few places: the entries between its old and new place are
//!   rotated, not removed and inserted in a B-tree.

use std::collections::BTreeSet;

/// An ordered set of `u64` keys (see the module documentation).
#[derive(Debug, Default, Clone)]
pub(super) struct ReadySet {
    /// Sorted, without duplicates; entries before `head` are gone.
    base: Vec<u64>,
    head: usize,
    /// Keys of `base[head..]` that were removed (rare).
    removed: BTreeSet<u64>,
    /// Keys inserted that are not in `base[head..]`.
    extra: BTreeSet<u64>,
    len: usize,
}

impl ReadySet {
    /// A set of `keys` (in any order; duplicates count once).
    pub(super) fn from_keys(mut keys: Vec<u64>) -> Self {
        if !keys.windows(2).all(|w| w[0] < w[1]) {
            keys.sort_unstable();
            keys.dedup();
        }
        keys.shrink_to_fit();
        ReadySet {
            len: keys.len(),
            base: keys,
            head: 0,
            removed: BTreeSet::new(),
            extra: BTreeSet::new(),
        }
    }

    /// How many keys the set holds.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether `key` is in the set.
    pub(super) fn contains(&self, key: u64) -> bool {
        if self.in_base(key) {
            !self.removed.contains(&key)
        } else {
            self.extra.contains(&key)
        }
    }

    /// Whether `key` is one of `base[head..]` (present or removed).
    fn in_base(&self, key: u64) -> bool {
        self.base[self.head..].binary_search(&key).is_ok()
    }

    /// Adds `key`; false if it was there.
    pub(super) fn insert(&mut self, key: u64) -> bool {
        let added = if self.in_base(key) {
            self.removed.remove(&key)
        } else {
            self.extra.insert(key)
        };
        self.len += usize::from(added);
        added
    }

    /// Removes `key`; false if it was not there.
    pub(super) fn remove(&mut self, key: u64) -> bool {
        let gone = if self.base.get(self.head) == Some(&key) {
            // The usual case: the first task starts.
            self.head += 1;
            self.skip_removed();
            true
        } else if self.in_base(key) {
            self.removed.insert(key)
        } else {
            self.extra.remove(&key)
        };
        self.len -= usize::from(gone);
        gone
    }

    /// The smallest key.
    pub(super) fn first(&self) -> Option<u64> {
        let base = self.base.get(self.head).copied();
        match (base, self.extra.first().copied()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Moves the cursor past removed keys, and gives back the vector's front once most of
    /// it is gone (so a long run's set shrinks as it empties).
    fn skip_removed(&mut self) {
        while let Some(&k) = self.base.get(self.head) {
            if self.removed.is_empty() || !self.removed.remove(&k) {
                break;
            }
            self.head += 1;
        }
        if self.head >= 1024 && self.head * 2 >= self.base.len() {
            self.base.drain(..self.head);
            self.base.shrink_to_fit();
            self.head = 0;
        }
    }

    /// Every key, in order (for tests and sums at the start).
    pub(super) fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let mut base = self.base[self.head..]
            .iter()
            .copied()
            .filter(|k| !self.removed.contains(k))
            .peekable();
        let mut extra = self.extra.iter().copied().peekable();
        std::iter::from_fn(move || match (base.peek(), extra.peek()) {
            (Some(a), Some(b)) if a < b => base.next(),
            (Some(_), Some(_)) | (None, Some(_)) => extra.next(),
            (Some(_), None) => base.next(),
            (None, None) => None,
        })
    }
}

/// An ordered set kept as a sorted vector (see the module documentation).
#[derive(Debug, Clone)]
pub(super) struct SortedVec<T> {
    items: Vec<T>,
}

impl<T> Default for SortedVec<T> {
    fn default() -> Self {
        SortedVec { items: Vec::new() }
    }
}

impl<T: Ord + Copy> SortedVec<T> {
    /// How many entries.
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// The smallest entry.
    pub(super) fn first(&self) -> Option<&T> {
        self.items.first()
    }

    /// The entries in order.
    pub(super) fn iter(&self) -> std::slice::Iter<'_, T> {
        self.items.iter()
    }

    /// Adds `v`; false if it was there.
    pub(super) fn insert(&mut self, v: T) -> bool {
        match self.items.binary_search(&v) {
            Ok(_) => false,
            Err(i) => {
                self.items.insert(i, v);
                true
            }
        }
    }

    /// Removes `v`; false if it was not there.
    #[cfg(test)]
    pub(super) fn remove(&mut self, v: &T) -> bool {
        self.remove_by(v, |x| x == v)
    }

    /// Where `v` is. `same` must hold for the entry equal to `v` and for no other: a short
    /// set is scanned with it (a node's key in a free set is found by the node alone, as
    /// each node has one entry there, in fewer instructions than by the order), a long one
    /// searched.
    #[inline]
    fn find(&self, v: &T, same: impl Fn(&T) -> bool) -> Option<usize> {
        if self.items.len() <= SCAN_UP_TO {
            self.items.iter().position(same)
        } else {
            self.items.binary_search(v).ok()
        }
    }

    /// [`SortedVec::remove`], with `same` as for [`SortedVec::find`].
    #[inline]
    pub(super) fn remove_by(&mut self, v: &T, same: impl Fn(&T) -> bool) -> bool {
        match self.find(v, same) {
            Some(i) => {
                self.items.remove(i);
                true
            }
            None => false,
        }
    }

    /// Replaces `old` with `new`, moving only the entries between their places (found by
    /// comparing with the neighbours, one step at a time: a node's key moves a few places
    /// at most when its load changes by one). Without `old` in the set it is
    /// [`SortedVec::insert`] of `new`. `same` finds `old` as for [`SortedVec::find`].
    #[inline]
    pub(super) fn replace(&mut self, old: &T, new: T, same: impl Fn(&T) -> bool) {
        let Some(mut i) = self.find(old, same) else {
            self.insert(new);
            return;
        };
        let items = &mut self.items;
        // `items[i]` is the hole: entries between the two places shift into it.
        if new > *old {
            while let Some(&next) = items.get(i + 1) {
                if next >= new {
                    if next == new {
                        // `new` is already there (another entry): just drop `old`.
                        items.remove(i);
                        return;
                    }
                    break;
                }
                items[i] = next;
                i += 1;
            }
        } else {
            while i > 0 {
                let prev = items[i - 1];
                if prev <= new {
                    if prev == new {
                        items.remove(i);
                        return;
                    }
                    break;
                }
                items[i] = prev;
                i -= 1;
            }
        }
        items[i] = new;
    }
}

/// Up to how many entries [`SortedVec::find`] scans rather than searches.
const SCAN_UP_TO: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        PopFirst,
        Replace(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..64).prop_map(Op::Insert),
            (0u64..64).prop_map(Op::Remove),
            Just(Op::PopFirst),
            Just(Op::PopFirst),
            ((0u64..64), (0u64..64)).prop_map(|(a, b)| Op::Replace(a, b)),
        ]
    }

    proptest! {
        /// The ready set answers as a B-tree set of the same keys does, whatever the
        /// sequence of operations (most tasks leaving from the front, some back, some
        /// removed from the middle).
        #[test]
        fn ready_set_is_a_set(start in proptest::collection::vec(0u64..64, 0..48),
                              ops in proptest::collection::vec(op(), 0..200)) {
            let mut model: BTreeSet<u64> = start.iter().copied().collect();
            let mut set = ReadySet::from_keys(start);
            for op in ops {
                match op {
                    Op::Insert(k) => prop_assert_eq!(set.insert(k), model.insert(k)),
                    Op::Remove(k) => prop_assert_eq!(set.remove(k), model.remove(&k)),
                    Op::PopFirst | Op::Replace(..) => {
                        let first = model.first().copied();
                        prop_assert_eq!(set.first(), first);
                        if let Some(k) = first {
                            prop_assert!(set.remove(k));
                            model.remove(&k);
                        }
                    }
                }
                prop_assert_eq!(set.len(), model.len());
                prop_assert_eq!(set.first(), model.first().copied());
                for k in 0..64 {
                    prop_assert_eq!(set.contains(k), model.contains(&k));
                }
                prop_assert_eq!(set.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            }
        }

        /// The sorted vector answers as a B-tree set does, `replace` included.
        #[test]
        fn sorted_vec_is_a_set(ops in proptest::collection::vec(op(), 0..200)) {
            let mut model: BTreeSet<u64> = BTreeSet::new();
            let mut set = SortedVec::default();
            for op in ops {
                match op {
                    Op::Insert(k) => prop_assert_eq!(set.insert(k), model.insert(k)),
                    Op::Remove(k) => prop_assert_eq!(set.remove(&k), model.remove(&k)),
                    Op::PopFirst => {
                        if let Some(k) = model.pop_first() {
                            prop_assert!(set.remove(&k));
                        }
                    }
                    Op::Replace(a, b) => {
                        model.remove(&a);
                        model.insert(b);
                        set.replace(&a, b, |x| *x == a);
                    }
                }
                prop_assert_eq!(set.len(), model.len());
                prop_assert_eq!(set.iter().copied().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            }
        }
    }

    proptest! {
        /// Past [`SCAN_UP_TO`] entries the sorted vector searches rather than scans: the
        /// same answers.
        #[test]
        fn a_long_sorted_vec_is_a_set(start in proptest::collection::btree_set(0u64..256, 0..40),
                                      ops in proptest::collection::vec(((0u64..256), (0u64..256)), 0..100)) {
            let mut model = start.clone();
            let mut set = SortedVec::default();
            for &k in &start {
                set.insert(k);
            }
            for (a, b) in ops {
                model.remove(&a);
                model.insert(b);
                set.replace(&a, b, |x| *x == a);
                prop_assert_eq!(set.iter().copied().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
                let c = a ^ b;
                prop_assert_eq!(set.remove(&c), model.remove(&c));
            }
        }
    }

    #[test]
    fn a_long_ready_set_gives_back_its_front() {
        let mut set = ReadySet::from_keys((0..10_000).collect());
        for k in 0..6_000 {
            assert_eq!(set.first(), Some(k));
            assert!(set.remove(k));
        }
        assert!(set.base.len() < 10_000);
        assert_eq!(set.first(), Some(6_000));
        assert_eq!(set.len(), 4_000);
        assert!(set.insert(5));
        assert_eq!(set.first(), Some(5));
    }
}
