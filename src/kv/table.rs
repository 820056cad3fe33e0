//! Per-sequence block tables and the sequence-level operations on the pool: append, fork, truncate, free,
//! and reuse of cached prefix blocks.
//!
//! Invariant kept by every operation here: a table of `len` tokens holds exactly `ceil(len / block_size)`
//! blocks, and `keys` holds the prefix keys of its first `keys.len() <= len / block_size` blocks (the ones
//! published to, or found in, the prefix cache).

use std::ops::Range;

use super::prefix::block_key;
use super::BlockPool;
use crate::{Error, Result};

/// The blocks of one sequence, in token order. Owned by the caller (a session, the scheduler); hand it back
/// to `BlockPool::free` when the sequence ends, or its blocks stay allocated.
#[derive(Debug, Default)]
pub struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
    /// The tokens whose k/v the table holds, for the prefix keys of blocks as they fill.
    tokens: Vec<u32>,
    keys: Vec<u64>,
    salt: u64,
}

impl BlockTable {
    /// An empty table. `salt` starts the prefix key chain: pass a hash of whatever the token ids do not
    /// capture (the image pixels), or 0 for text only. Tables with different salts never share by prefix.
    pub fn new(salt: u64) -> BlockTable {
        BlockTable { salt, ..BlockTable::default() }
    }

    /// Block ids in token order (token `t` is in `blocks()[t / block_size]`).
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn salt(&self) -> u64 {
        self.salt
    }

    /// Leading full blocks whose prefix keys are known (published by this table or found by `match_prefix`).
    pub fn published(&self) -> usize {
        self.keys.len()
    }
}

impl BlockPool {
    /// Blocks that appending `n` tokens to `table` would take from the free list (new blocks, plus one copy
    /// when the partially-filled last block is shared). A scheduler checks this before admitting work.
    pub fn blocks_needed(&self, table: &BlockTable, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let bs = self.block_size();
        let grow = (table.len + n).div_ceil(bs).saturating_sub(table.blocks.len());
        grow + usize::from(self.last_is_shared_partial(table))
    }

    fn last_is_shared_partial(&self, table: &BlockTable) -> bool {
        !table.len.is_multiple_of(self.block_size()) && table.blocks.last().is_some_and(|&b| self.refcount(b) > 1)
    }

    /// Makes room for `tokens` after the table's current end and records them; returns the positions
    /// `start..start + n` whose k/v the caller must now write, for every layer, with `backend::write_kv`.
    /// A shared partially-filled last block is copied first (copy-on-write), so no other table sees the
    /// writes. Out of blocks: an error, and the table and pool are unchanged. Call `publish` once the
    /// writes are done so that other sequences can reuse the newly filled blocks.
    pub fn append(&mut self, table: &mut BlockTable, tokens: &[u32]) -> Result<Range<usize>> {
        let bs = self.block_size();
        let start = table.len;
        let need = self.blocks_needed(table, tokens.len());
        if need > self.blocks_free() {
            return Err(self.exhausted(need));
        }
        if tokens.is_empty() {
            return Ok(start..start);
        }
        if !start.is_multiple_of(bs) {
            let idx = start / bs;
            let last = table.blocks[idx];
            if self.refcount(last) > 1 {
                let copy = self.alloc()?;
                self.copy_block(last, copy);
                self.release(last)?;
                table.blocks[idx] = copy;
            } else {
                // The block is ours alone but may still be findable under its old, longer content (after a
                // truncate): it is about to be rewritten, so it must leave the cache.
                self.prefix.forget(last);
            }
        }
        let end = start + tokens.len();
        while table.blocks.len() < end.div_ceil(bs) {
            let b = self.alloc()?;
            table.blocks.push(b);
        }
        table.tokens.extend_from_slice(tokens);
        table.len = end;
        Ok(start..end)
    }

    /// Registers the table's full blocks that are not yet in the prefix cache. Where another block with the
    /// same prefix is already registered, the table switches to it and frees its own copy.
    pub fn publish(&mut self, table: &mut BlockTable) -> Result<()> {
        let bs = self.block_size();
        for i in table.keys.len()..table.len / bs {
            let parent = if i == 0 { table.salt } else { table.keys[i - 1] };
            let chunk = &table.tokens[i * bs..(i + 1) * bs];
            let key = block_key(parent, chunk);
            let own = table.blocks[i];
            if let Some(other) = self.prefix.insert(key, parent, chunk, own) {
                self.retain(other)?;
                self.release(own)?;
                table.blocks[i] = other;
            }
            table.keys.push(key);
        }
        Ok(())
    }

    /// Fills the empty `table` with the longest run of cached full blocks that starts `tokens`, taking a
    /// reference on each; returns the number of tokens covered (a multiple of the block size). At most
    /// `tokens.len() - 1` tokens are matched so that the caller always runs at least one token and gets
    /// its logits. The caller then appends `tokens[matched..]`.
    pub fn match_prefix(&mut self, table: &mut BlockTable, tokens: &[u32]) -> Result<usize> {
        if !table.blocks.is_empty() || table.len != 0 {
            return Err(Error::Invalid(format!(
                "kv cache: match_prefix needs an empty table, this one holds {} tokens",
                table.len
            )));
        }
        let bs = self.block_size();
        let mut parent = table.salt;
        for chunk in tokens[..tokens.len().saturating_sub(1)].chunks_exact(bs) {
            let key = block_key(parent, chunk);
            let Some(b) = self.prefix.lookup(key, parent, chunk) else { break };
            self.retain(b)?;
            table.blocks.push(b);
            table.keys.push(key);
            parent = key;
        }
        table.len = table.blocks.len() * bs;
        table.tokens.extend_from_slice(&tokens[..table.len]);
        Ok(table.len)
    }

    /// A second table with the same contents, sharing every block (full or not) by reference count. Later
    /// appends to either copy a shared partial block first, so the two diverge without seeing each other.
    pub fn fork(&mut self, table: &BlockTable) -> Result<BlockTable> {
        for &b in &table.blocks {
            self.retain(b)?;
        }
        Ok(BlockTable {
            blocks: table.blocks.clone(),
            len: table.len,
            tokens: table.tokens.clone(),
            keys: table.keys.clone(),
            salt: table.salt,
        })
    }

    /// Keeps the first `len` tokens (to rewind a chat to a shared point) and frees the blocks past them.
    pub fn truncate(&mut self, table: &mut BlockTable, len: usize) -> Result<()> {
        if len > table.len {
            return Err(Error::Invalid(format!("kv cache: cannot truncate a table of {} tokens to {len}", table.len)));
        }
        let keep = len.div_ceil(self.block_size());
        let mut first_err = None;
        for b in table.blocks.drain(keep..) {
            if let Err(e) = self.release(b) {
                first_err.get_or_insert(e);
            }
        }
        table.len = len;
        table.tokens.truncate(len);
        table.keys.truncate(len / self.block_size());
        first_err.map_or(Ok(()), Err)
    }

    /// The partially filled last block of `table` as `(index, block)`, if any: the one block an `append`
    /// may replace by a copy. Keep it before a pass, for `rollback`.
    pub fn partial_last(&self, table: &BlockTable) -> Option<(usize, u32)> {
        let bs = self.block_size();
        (!table.len.is_multiple_of(bs)).then(|| (table.len / bs, table.blocks[table.len / bs]))
    }

    /// Undoes appends whose keys and values were never (or not all) written: the table returns to `len`
    /// tokens and, where an append replaced its partially filled last block by a copy (`partial`, from
    /// `partial_last` before the pass), to the original block, releasing the copy, whose contents may never
    /// have been made (a device pool queues the copy until the model runs). If the original was freed
    /// meanwhile, the table keeps only its full blocks before it.
    pub fn rollback(&mut self, table: &mut BlockTable, len: usize, partial: Option<(usize, u32)>) -> Result<()> {
        self.truncate(table, len)?;
        let Some((i, was)) = partial else { return Ok(()) };
        let Some(&now) = table.blocks.get(i) else { return Ok(()) };
        if now == was {
            return Ok(());
        }
        if self.refcount(was) == 0 {
            return self.truncate(table, i * self.block_size());
        }
        self.retain(was)?;
        table.blocks[i] = was;
        self.release(now)
    }

    /// Returns every block of `table` to the pool and leaves it empty (freeing it again does nothing).
    pub fn free(&mut self, table: &mut BlockTable) -> Result<()> {
        self.truncate(table, 0)
    }
}
