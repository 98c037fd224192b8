//! The scheduler's nodes by key: a slab of slots and an index of keys. Lists that name a
//! node many times (the free sets' dirty lists) name its slot and reach it without hashing,
//! and the node last reached by key is reached again without hashing (a result is observed
//! and then completed on one node; a node is found free and then starts the task).

use p2p_core::conn::SeqHash;
use std::collections::HashMap;

/// Nodes by key (see the module documentation).
#[derive(Debug)]
pub(super) struct NodeMap<V> {
    /// Each node's key and value, by slot; `None` for a slot given back.
    slots: Vec<Option<(u64, V)>>,
    /// Slots given back, reused first.
    vacant: Vec<u32>,
    /// Each key's slot.
    index: HashMap<u64, u32, SeqHash>,
    /// The key last reached through [`NodeMap::get_mut`], and its slot.
    last: Option<(u64, u32)>,
}

impl<V> Default for NodeMap<V> {
    fn default() -> Self {
        NodeMap {
            slots: Vec::new(),
            vacant: Vec::new(),
            index: HashMap::default(),
            last: None,
        }
    }
}

impl<V> NodeMap<V> {
    /// The slot of `key`.
    fn slot_of(&self, key: u64) -> Option<u32> {
        match self.last {
            Some((k, i)) if k == key => Some(i),
            _ => self.index.get(&key).copied(),
        }
    }

    /// The value of `key`.
    pub(super) fn get(&self, key: &u64) -> Option<&V> {
        let i = self.slot_of(*key)?;
        self.slots.get(i as usize)?.as_ref().map(|(_, v)| v)
    }

    /// The value of `key`, to change.
    pub(super) fn get_mut(&mut self, key: &u64) -> Option<&mut V> {
        self.get_mut_slot(key).map(|(_, v)| v)
    }

    /// The slot and value of `key`, to change.
    pub(super) fn get_mut_slot(&mut self, key: &u64) -> Option<(u32, &mut V)> {
        let i = self.slot_of(*key)?;
        self.last = Some((*key, i));
        let (_, v) = self.slots.get_mut(i as usize)?.as_mut()?;
        Some((i, v))
    }

    /// The key and value in slot `i`, to change (none if the slot was given back).
    pub(super) fn at_mut(&mut self, i: u32) -> Option<(u64, &mut V)> {
        let (k, v) = self.slots.get_mut(i as usize)?.as_mut()?;
        Some((*k, v))
    }

    /// The key in slot `i` (none if the slot was given back).
    #[cfg(test)]
    pub(super) fn at(&self, i: u32) -> Option<u64> {
        self.slots.get(i as usize)?.as_ref().map(|(k, _)| *k)
    }

    /// Whether `key` has a value.
    #[cfg(test)]
    pub(super) fn contains_key(&self, key: &u64) -> bool {
        self.slot_of(*key).is_some()
    }

    /// How many keys have a value.
    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    /// Sets the value of `key`.
    pub(super) fn insert(&mut self, key: u64, v: V) {
        if let Some(i) = self.slot_of(key) {
            self.slots[i as usize] = Some((key, v));
            return;
        }
        let i = match self.vacant.pop() {
            Some(i) => {
                self.slots[i as usize] = Some((key, v));
                i
            }
            None => {
                self.slots.push(Some((key, v)));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(key, i);
    }

    /// Takes the value of `key` out, giving its slot back.
    pub(super) fn remove(&mut self, key: &u64) -> Option<V> {
        let i = self.index.remove(key)?;
        if self.last.is_some_and(|(k, _)| k == *key) {
            self.last = None;
        }
        let (_, v) = self.slots.get_mut(i as usize)?.take()?;
        self.vacant.push(i);
        Some(v)
    }

    /// Every key and value (in no particular order).
    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &V)> {
        self.slots
            .iter()
            .filter_map(|s| s.as_ref().map(|(k, v)| (k, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The node map answers as a hash map does, whatever the sequence of inserts,
        /// removes and lookups (slots given back and reused, the last key reached again).
        #[test]
        fn node_map_is_a_map(ops in proptest::collection::vec((0u8..4, 0u64..8, any::<u32>()), 0..200)) {
            let mut model: std::collections::HashMap<u64, u32> = Default::default();
            let mut map = NodeMap::default();
            for (op, k, v) in ops {
                match op {
                    0 => {
                        model.insert(k, v);
                        map.insert(k, v);
                    }
                    1 => prop_assert_eq!(map.remove(&k), model.remove(&k)),
                    2 => {
                        if let (Some(a), Some(b)) = (map.get_mut(&k), model.get_mut(&k)) {
                            *a = v;
                            *b = v;
                        }
                    }
                    _ => {
                        if let Some((i, _)) = map.get_mut_slot(&k) {
                            prop_assert_eq!(map.at_mut(i).map(|(k, v)| (k, *v)), Some((k, model[&k])));
                        }
                    }
                }
                for key in 0..8 {
                    prop_assert_eq!(map.get(&key), model.get(&key));
                    prop_assert_eq!(map.contains_key(&key), model.contains_key(&key));
                }
                let mut all: Vec<(u64, u32)> = map.iter().map(|(k, v)| (*k, *v)).collect();
                all.sort_unstable();
                let mut want: Vec<(u64, u32)> = model.iter().map(|(k, v)| (*k, *v)).collect();
                want.sort_unstable();
                prop_assert_eq!(all, want);
            }
        }
    }
}
