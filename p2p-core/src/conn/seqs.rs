//! The set of a connection's seqs in flight, one way: a bitmap over a window of recent
//! seqs, and a hash set for those that fell behind it.
//!
//! An owner numbers its assignments upwards (a coordinator from one counter for all its
//! links), so the seqs in flight on a link lie in a short range just below the newest:
//! there, a seq is one bit, found and changed without hashing (a hash set cost about 100
//! instructions to insert and 130 to remove a seq, on each side, for every task). A seq
//! below the window (a task that runs long while the window moves on, or any seq a peer
//! picks out of order) goes to the hash set, keyed as before ([`SeqHash`]), so no choice
//! of seqs makes a lookup slower than a hash set's. The window moves up to take a seq
//! above it: the seqs it leaves behind move to the hash set, each at most once.

use std::collections::HashSet;

use super::SeqHash;

/// Seqs in the window (a power of two): about three links' worth of a capacity of 1,024.
const WINDOW: u64 = 8192;

const WORDS: usize = (WINDOW / 64) as usize;

/// A set of `u64` seqs (see the module's documentation).
#[derive(Debug, Default)]
pub(crate) struct SeqSet {
    /// The window is `base..base + WINDOW` (`base` a multiple of 64, at most
    /// `u64::MAX - WINDOW + 1`). Bit `s % 64` of word `(s / 64) % WORDS` is seq `s`.
    base: u64,
    /// Allocated at the first seq in the window.
    bits: Option<Box<[u64; WORDS]>>,
    /// Seqs in the window.
    in_window: usize,
    /// Seqs below the window.
    behind: HashSet<u64, SeqHash>,
}

/// The word and the bit of seq `s` in the window.
fn slot(s: u64) -> (usize, u64) {
    (((s / 64) as usize) % WORDS, 1 << (s % 64))
}

impl SeqSet {
    /// How many seqs the set holds.
    pub(crate) fn len(&self) -> usize {
        self.in_window + self.behind.len()
    }

    /// Whether the set is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn in_window(&self, s: u64) -> bool {
        s >= self.base && s - self.base < WINDOW
    }

    /// Whether `s` is in the set.
    pub(crate) fn contains(&self, s: u64) -> bool {
        if self.in_window(s) {
            let (w, bit) = slot(s);
            return self.bits.as_ref().is_some_and(|b| b[w] & bit != 0);
        }
        s < self.base && self.behind.contains(&s)
    }

    /// Adds `s`; `false` when it was there already.
    pub(crate) fn insert(&mut self, s: u64) -> bool {
        if s < self.base {
            return self.behind.insert(s);
        }
        if !self.in_window(s) {
            self.move_up_to(s);
        }
        let (w, bit) = slot(s);
        let bits = self.bits.get_or_insert_with(|| Box::new([0; WORDS]));
        if bits[w] & bit != 0 {
            return false;
        }
        bits[w] |= bit;
        self.in_window += 1;
        true
    }

    /// Removes `s`; `false` when it was not there.
    pub(crate) fn remove(&mut self, s: u64) -> bool {
        if self.in_window(s) {
            let (w, bit) = slot(s);
            return match self.bits.as_mut() {
                Some(bits) if bits[w] & bit != 0 => {
                    bits[w] &= !bit;
                    self.in_window -= 1;
                    true
                }
                _ => false,
            };
        }
        s < self.base && self.behind.remove(&s)
    }

    /// Moves the window up so that its last word holds `s` (above it): the seqs of the
    /// words it leaves go to `behind`.
    fn move_up_to(&mut self, s: u64) {
        // `s >= base + WINDOW`, so `s - (WINDOW - 1)` is above `base`; rounded up to a word,
        // the window ends at the end of the word that holds `s` (no further than u64::MAX).
        let base = (s - (WINDOW - 1)).div_ceil(64) * 64;
        if let Some(bits) = self.bits.as_mut() {
            // The words from the old base up to the new one (all of them when the window
            // moves by more than its size).
            let mut start = self.base;
            let mut words = 0;
            while start < base && words < WORDS && self.in_window > 0 {
                let (w, _) = slot(start);
                let mut word = std::mem::take(&mut bits[w]);
                while word != 0 {
                    let b = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    self.behind.insert(start + b);
                    self.in_window -= 1;
                }
                start += 64;
                words += 1;
            }
        }
        self.base = base;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Random operations on a `SeqSet` and on a `HashSet`, as the model: the same answers
    /// and the same contents, for seqs upwards with gaps (as an owner numbers them), seqs
    /// that stay in flight while the window moves far on, seqs anywhere, and at the edges
    /// of `u64`.
    #[test]
    fn a_seq_set_answers_as_a_hash_set() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let mut set = SeqSet::default();
            let mut model: HashSet<u64> = HashSet::new();
            let mut top = match round % 4 {
                0 => 0,
                1 => u64::MAX - 3 * WINDOW,
                _ => next(u64::MAX),
            };
            for _ in 0..3_000 {
                let s = match next(10) {
                    // Upwards, with gaps.
                    0..=3 => {
                        top = top.saturating_add(1 + next(4));
                        top
                    }
                    // A jump far up.
                    4 => {
                        top = top.saturating_add(next(4 * WINDOW));
                        top
                    }
                    // One in flight, or just below.
                    5 | 6 => match model.iter().nth(next(model.len() as u64 + 1) as usize) {
                        Some(&s) => s.wrapping_add(next(3)).wrapping_sub(1),
                        None => top,
                    },
                    7 => next(u64::MAX),
                    8 => {
                        [0, 1, 63, 64, WINDOW - 1, WINDOW, u64::MAX - 1, u64::MAX][next(8) as usize]
                    }
                    _ => top.saturating_sub(next(2 * WINDOW)),
                };
                match next(3) {
                    0 | 1 => assert_eq!(set.insert(s), model.insert(s), "insert {s}"),
                    _ => assert_eq!(set.remove(s), model.remove(&s), "remove {s}"),
                }
                assert_eq!(set.contains(s), model.contains(&s), "contains {s}");
                assert_eq!(set.len(), model.len());
                assert_eq!(set.is_empty(), model.is_empty());
            }
            for &s in &model {
                assert!(set.contains(s), "{s}");
            }
            let mut all: Vec<u64> = model.iter().copied().collect();
            all.sort_unstable();
            for s in all {
                assert!(set.remove(s));
            }
            assert!(set.is_empty());
        }
    }

    /// Seqs numbered upwards stay in the window: nothing goes to the hash set while each
    /// finishes within the window's span.
    #[test]
    fn seqs_upwards_stay_in_the_window() {
        let mut set = SeqSet::default();
        for s in 1..100_000u64 {
            assert!(set.insert(s));
            if s > 3_000 {
                assert!(set.remove(s - 3_000));
            }
        }
        assert!(set.behind.is_empty());
        assert_eq!(set.len(), 3_000);
    }
}
