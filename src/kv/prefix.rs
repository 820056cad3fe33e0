//! Finding full blocks again by the tokens that produced them.
//!
//! A full block's key is a hash of (the key of the block before it, its own tokens), so a key names the
//! whole prefix up to the block's end, not only the block's tokens: KV values depend on every earlier
//! token. The chain starts from the table's salt, because token ids alone do not say everything: every
//! image is the same run of `<IMG_CONTEXT>` ids, so callers salt with a hash of the pixels.
//!
//! Entries are weak: the cache holds no reference count, and a block leaves it when its last table frees
//! it. Entries keep their tokens and parent key, and a lookup compares them, so a 64-bit hash collision
//! makes a miss, never wrong keys and values.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

struct Entry {
    block: u32,
    parent: u64,
    tokens: Box<[u32]>,
}

pub(super) struct PrefixCache {
    map: HashMap<u64, Entry>,
    /// The key each block is registered under, to drop the entry when the block is freed or rewritten.
    by_block: Vec<Option<u64>>,
}

/// The key of a full block whose predecessor's key (or the table's salt, for the first block) is `parent`.
pub(super) fn block_key(parent: u64, tokens: &[u32]) -> u64 {
    // DefaultHasher::new() has fixed keys, so keys agree within a process, which is all an in-memory cache needs.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixCache {
    pub(super) fn new(num_blocks: usize) -> PrefixCache {
        PrefixCache { map: HashMap::new(), by_block: vec![None; num_blocks] }
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn blocks(&self) -> impl Iterator<Item = u32> + '_ {
        self.map.values().map(|e| e.block)
    }

    pub(super) fn lookup(&self, key: u64, parent: u64, tokens: &[u32]) -> Option<u32> {
        self.map.get(&key).filter(|e| e.parent == parent && *e.tokens == *tokens).map(|e| e.block)
    }

    /// Registers `block` under `key`. When another block already holds the same content, returns that block
    /// (the caller may switch to it and free its own copy) and registers nothing.
    pub(super) fn insert(&mut self, key: u64, parent: u64, tokens: &[u32], block: u32) -> Option<u32> {
        if let Some(e) = self.map.get(&key) {
            if e.block != block && e.parent == parent && *e.tokens == *tokens {
                return Some(e.block);
            }
            // Same block already registered, or a hash collision with other content: keep the first entry.
            return None;
        }
        if let Some(old) = self.by_block.get(block as usize).copied().flatten() {
            // A block has one content at a time; an old key means the block was rewritten, so drop it.
            self.map.remove(&old);
        }
        self.map.insert(key, Entry { block, parent, tokens: tokens.into() });
        if let Some(slot) = self.by_block.get_mut(block as usize) {
            *slot = Some(key);
        }
        None
    }

    /// Drops `block`'s entry, if it has one.
    pub(super) fn forget(&mut self, block: u32) {
        if let Some(key) = self.by_block.get_mut(block as usize).and_then(Option::take) {
            self.map.remove(&key);
        }
    }
}
