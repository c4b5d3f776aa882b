//! Stable small ids for things identified by content (peer classes by signature, rule sets
//! by their policies, rules by [`weir_api::RuleRef`]).
//!
//! An id stays with its key for as long as the key is in use, so recompiling an unchanged
//! cluster gives identical state and a small change gives a small diff. An id whose key was
//! not used in a compile is released at the end of that compile and handed out again only in
//! a later one: within one diff an id never changes meaning, so an agent applying the diff
//! never sees a removed class's id already standing for a new class.
//!
//! Id 0 is never allocated (it means "none" in every table: `NOT_ISOLATED`,
//! `CLASS_UNMATCHED`, no rule). New ids are handed out smallest-first, in key order, so the
//! result depends only on the sequence of compiles, not on hash or iteration order.

use std::{collections::BTreeSet, hash::Hash};

use super::HashMap;

#[derive(Clone, Debug)]
pub(crate) struct IdAllocator<K> {
    ids: HashMap<K, Slot>,
    /// Ids released by earlier compiles.
    free: BTreeSet<u32>,
    /// Smallest id never handed out.
    next: u32,
    /// Current compile; keys whose slot has an older epoch at `finish` are released.
    epoch: u64,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u32,
    epoch: u64,
}

impl<K> Default for IdAllocator<K> {
    fn default() -> Self {
        Self {
            ids: HashMap::default(),
            free: BTreeSet::new(),
            next: 1,
            epoch: 0,
        }
    }
}

impl<K: Hash + Eq + Ord + Clone> IdAllocator<K> {
    /// Starts a compile.
    pub fn begin(&mut self) {
        self.epoch += 1;
    }

    /// Ids for `keys` (in the same order), keeping the ids keys already have and allocating
    /// new ones in key order.
    pub fn assign(&mut self, keys: &[K]) -> Vec<u32> {
        let mut ids = vec![0; keys.len()];
        let mut fresh: Vec<usize> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.ids.get_mut(key) {
                Some(slot) => {
                    slot.epoch = self.epoch;
                    ids[i] = slot.id;
                }
                None => fresh.push(i),
            }
        }
        fresh.sort_by(|a, b| keys[*a].cmp(&keys[*b]));
        for i in fresh {
            // A key listed twice gets one id.
            if let Some(slot) = self.ids.get(&keys[i]) {
                ids[i] = slot.id;
                continue;
            }
            let id = self.allocate();
            self.ids.insert(
                keys[i].clone(),
                Slot {
                    id,
                    epoch: self.epoch,
                },
            );
            ids[i] = id;
        }
        ids
    }

    fn allocate(&mut self) -> u32 {
        match self.free.pop_first() {
            Some(id) => id,
            None => {
                let id = self.next;
                self.next = self.next.saturating_add(1);
                id
            }
        }
    }

    /// Ends a compile: releases the ids of keys not assigned since [`Self::begin`].
    pub fn finish(&mut self) {
        let epoch = self.epoch;
        let free = &mut self.free;
        self.ids.retain(|_, slot| {
            let keep = slot.epoch == epoch;
            if !keep {
                free.insert(slot.id);
            }
            keep
        });
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_and_follow_key_order() {
        let mut a = IdAllocator::default();
        a.begin();
        assert_eq!(a.assign(&["b", "a", "c"]), vec![2, 1, 3]);
        a.finish();
    }

    #[test]
    fn keys_keep_their_ids_across_compiles() {
        let mut a = IdAllocator::default();
        a.begin();
        a.assign(&["x", "y"]);
        a.finish();
        a.begin();
        assert_eq!(a.assign(&["y", "z", "x"]), vec![2, 3, 1]);
        a.finish();
    }

    #[test]
    fn released_ids_are_reused_only_in_a_later_compile() {
        let mut a = IdAllocator::default();
        a.begin();
        a.assign(&["x", "y"]);
        a.finish();
        // "x" disappears in this compile; its id is not yet free for "w".
        a.begin();
        assert_eq!(a.assign(&["y", "w"]), vec![2, 3]);
        a.finish();
        a.begin();
        assert_eq!(a.assign(&["y", "w", "v"]), vec![2, 3, 1]);
        a.finish();
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn a_key_listed_twice_gets_one_id() {
        let mut a = IdAllocator::default();
        a.begin();
        assert_eq!(a.assign(&["k", "k"]), vec![1, 1]);
        a.finish();
    }
}
