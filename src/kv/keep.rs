//! Keeping prefix blocks after their sequences end.
//!
//! The prefix cache is weak: a block leaves it when its last table frees it. A server wants more: the
//! second question about a face arrives after the first answer is done, and by then nothing holds the
//! image's blocks. The retainer holds one reference on the published full blocks of finished sequences,
//! so they stay findable, and gives them back least recently used first when the pool needs room (vLLM's
//! "evictable" blocks). A retained block that no table holds is as good as free for admission: `evict`
//! turns it into a free block on demand.
//!
//! Eviction order: a prefix is only found from its first block, so a block is worth keeping only while
//! its parent is kept. `keep` and `touch` stamp a sequence's blocks from the last to the first, which
//! makes a parent at least as recent as its children and has the least recently used leaves go first.

use std::collections::{BTreeMap, HashMap};

use super::{BlockPool, BlockTable};
use crate::Result;

#[derive(Default)]
pub struct PrefixRetainer {
    /// Use stamp -> block, oldest first.
    by_stamp: BTreeMap<u64, u32>,
    /// Retained block -> its current stamp.
    stamp_of: HashMap<u32, u64>,
    next: u64,
}

impl PrefixRetainer {
    pub fn new() -> PrefixRetainer {
        PrefixRetainer::default()
    }

    /// Blocks retained (each holds one reference).
    pub fn len(&self) -> usize {
        self.stamp_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stamp_of.is_empty()
    }

    /// The retained blocks, in no particular order (for `BlockPool::audit_with`).
    pub fn blocks(&self) -> impl Iterator<Item = u32> + '_ {
        self.stamp_of.keys().copied()
    }

    /// Retained blocks that no table holds: they would be free without the retainer.
    pub fn idle(&self, pool: &BlockPool) -> usize {
        self.stamp_of.keys().filter(|&&b| pool.refcount(b) == 1).count()
    }

    /// Retains the published full blocks of `table` that are not retained yet and marks all of them as just
    /// used. Call it before freeing the table.
    pub fn keep(&mut self, pool: &mut BlockPool, table: &BlockTable) -> Result<()> {
        let published = &table.blocks()[..table.published()];
        for &b in published {
            if let std::collections::hash_map::Entry::Vacant(e) = self.stamp_of.entry(b) {
                pool.retain(b)?;
                e.insert(0);
            }
        }
        self.stamp(published);
        Ok(())
    }

    /// Marks the retained blocks among `table`'s as just used (after `BlockPool::match_prefix` found them).
    pub fn touch(&mut self, table: &BlockTable) {
        self.stamp(&table.blocks()[..table.published()]);
    }

    fn stamp(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            if let Some(old) = self.stamp_of.get_mut(&b) {
                // 0 marks a block kept a moment ago and not stamped yet; stamps start at 1.
                self.by_stamp.remove(old);
                self.next += 1;
                *old = self.next;
                self.by_stamp.insert(self.next, b);
            }
        }
    }

    /// Gives back idle blocks, least recently used first, until the pool has `want_free` free blocks or no
    /// idle block is left; returns how many were freed. Blocks a live table still holds are skipped: giving
    /// them back would free nothing now.
    pub fn evict(&mut self, pool: &mut BlockPool, want_free: usize) -> Result<usize> {
        let mut freed = 0;
        let mut victims = Vec::new();
        for (&stamp, &b) in &self.by_stamp {
            if pool.blocks_free() + victims.len() >= want_free {
                break;
            }
            if pool.refcount(b) == 1 {
                victims.push((stamp, b));
            }
        }
        for (stamp, b) in victims {
            self.by_stamp.remove(&stamp);
            self.stamp_of.remove(&b);
            pool.release(b)?;
            freed += 1;
        }
        Ok(freed)
    }

    /// Gives back every retained block.
    pub fn clear(&mut self, pool: &mut BlockPool) -> Result<()> {
        let mut first_err = None;
        for (_, b) in std::mem::take(&mut self.by_stamp) {
            if let Err(e) = pool.release(b) {
                first_err.get_or_insert(e);
            }
        }
        self.stamp_of.clear();
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvLayout;

    fn pool(blocks: usize) -> BlockPool {
        BlockPool::new(KvLayout::new(1, 1, 4, 4).expect("layout"), blocks).expect("pool")
    }

    /// A finished sequence of `tokens` (block size 4): appended, published, kept, freed.
    fn finish(pool: &mut BlockPool, keep: &mut PrefixRetainer, tokens: &[u32]) {
        let mut t = BlockTable::new(0);
        pool.append(&mut t, tokens).expect("append");
        pool.publish(&mut t).expect("publish");
        keep.keep(pool, &t).expect("keep");
        pool.free(&mut t).expect("free");
    }

    #[test]
    fn kept_prefix_survives_its_sequence_and_is_found_again() {
        let (mut p, mut k) = (pool(8), PrefixRetainer::new());
        finish(&mut p, &mut k, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!((k.len(), k.idle(&p), p.blocks_used()), (2, 2, 2), "two full blocks kept, the partial one freed");
        p.audit_with([], k.blocks()).expect("audit");
        let mut t = BlockTable::new(0);
        assert_eq!(p.match_prefix(&mut t, &[1, 2, 3, 4, 5, 6, 7, 8, 42]).expect("match"), 8);
        k.touch(&t);
        assert_eq!(k.idle(&p), 0, "a live table holds them now");
        p.audit_with([&t], k.blocks()).expect("audit");
        assert_eq!(k.evict(&mut p, 8).expect("evict"), 0, "blocks a table holds are not given back");
        p.free(&mut t).expect("free");
        k.clear(&mut p).expect("clear");
        assert_eq!(p.blocks_used(), 0);
    }

    #[test]
    fn eviction_takes_least_recently_used_leaves_first() {
        let (mut p, mut k) = (pool(8), PrefixRetainer::new());
        finish(&mut p, &mut k, &[1, 1, 1, 1, 2, 2, 2, 2]);
        finish(&mut p, &mut k, &[3, 3, 3, 3]);
        // Re-using the first prefix makes it the most recent; its leaf still goes before its root.
        let mut t = BlockTable::new(0);
        p.match_prefix(&mut t, &[1, 1, 1, 1, 2, 2, 2, 2, 9]).expect("match");
        k.touch(&t);
        p.free(&mut t).expect("free");
        assert_eq!(p.blocks_free(), 5);
        assert_eq!(k.evict(&mut p, 6).expect("evict"), 1);
        let mut t = BlockTable::new(0);
        assert_eq!(p.match_prefix(&mut t, &[3, 3, 3, 3, 9]).expect("match"), 0, "the older prefix went first");
        assert_eq!(k.evict(&mut p, 7).expect("evict"), 1);
        assert_eq!(p.match_prefix(&mut t, &[1, 1, 1, 1, 2, 2, 2, 2, 9]).expect("match"), 4, "leaf before root");
        p.free(&mut t).expect("free");
        p.audit_with([], k.blocks()).expect("audit");
    }
}
