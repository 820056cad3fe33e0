//! The block pool: storage for every block, reference counts and the free list. Sequence-level operations
//! (append, fork, free, prefix reuse) are in `table.rs`; they change reference counts only through
//! `retain` and `release` here, so the "free exactly when the count is zero" rule lives in one place.
//!
//! A pool either stores the blocks itself (the CPU backend) or only counts them (`BlockPool::accounting`)
//! for a model that keeps the storage on a device with the same layout and block ids: it then queues the
//! block copies that copy-on-write asks for (`take_copies`) and the device owner performs them before it
//! writes the step's keys and values.

use super::prefix::PrefixCache;
use super::KvLayout;
use crate::{Error, Result};

pub struct BlockPool {
    layout: KvLayout,
    num_blocks: usize,
    /// Per layer, `[num_blocks, block_size, kv_heads, head_dim]`; empty for an accounting pool.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Whether `k`/`v` hold the blocks (false: the storage is elsewhere and copies are queued).
    host: bool,
    /// Copy-on-write copies `(src, dst)` waiting for the device owner (accounting pools only).
    copies: Vec<(u32, u32)>,
    /// Number of block tables that hold each block; the prefix cache holds no count of its own.
    refs: Vec<u32>,
    /// Free block ids, popped from the end. Kept in descending order at start so blocks go out 0, 1, 2, ...
    free: Vec<u32>,
    pub(super) prefix: PrefixCache,
}

/// One layer's k and v storage, read-only, as `backend::paged_attention` takes it.
#[derive(Clone, Copy)]
pub struct KvLayer<'a> {
    /// `[num_blocks, block_size, kv_heads, head_dim]`.
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One layer's k and v storage, writable, as `backend::write_kv` takes it. Writing through it bypasses the
/// reference counts: write only slots that `BlockPool::append` has just handed out.
pub struct KvLayerMut<'a> {
    pub k: &'a mut [f32],
    pub v: &'a mut [f32],
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayer<'_> {
    /// Blocks the storage holds.
    pub fn num_blocks(&self) -> usize {
        self.k.len() / (self.block_size * self.kv_heads * self.head_dim).max(1)
    }
}

impl KvLayerMut<'_> {
    pub fn num_blocks(&self) -> usize {
        self.k.len() / (self.block_size * self.kv_heads * self.head_dim).max(1)
    }
}

impl BlockPool {
    /// A pool of `num_blocks` zeroed blocks.
    pub fn new(layout: KvLayout, num_blocks: usize) -> Result<BlockPool> {
        BlockPool::with_fill(layout, num_blocks, 0.0)
    }

    /// A pool whose storage starts as `fill`: tests pass NaN so that reading a slot nobody wrote shows up.
    pub fn with_fill(layout: KvLayout, num_blocks: usize, fill: f32) -> Result<BlockPool> {
        BlockPool::build(layout, num_blocks, Some(fill))
    }

    /// A pool that only counts `num_blocks` blocks whose storage lives elsewhere (a device KV cache of the
    /// same layout): reference counts, free list and prefix cache as usual, no host memory for the blocks,
    /// and copy-on-write copies queued for `take_copies` instead of done.
    pub fn accounting(layout: KvLayout, num_blocks: usize) -> Result<BlockPool> {
        BlockPool::build(layout, num_blocks, None)
    }

    fn build(layout: KvLayout, num_blocks: usize, fill: Option<f32>) -> Result<BlockPool> {
        let layout = KvLayout::new(layout.layers, layout.kv_heads, layout.head_dim, layout.block_size)?;
        // Block ids are u32 on both backends (the CUDA block tables are int32): refuse pools that overflow.
        if num_blocks == 0 || num_blocks > i32::MAX as usize {
            return Err(Error::Invalid(format!("kv cache: pool size must be 1..=2^31-1 blocks, got {num_blocks}")));
        }
        let elems = num_blocks
            .checked_mul(layout.block_elems())
            .ok_or_else(|| Error::Invalid(format!("kv cache: {num_blocks} blocks of {layout:?} overflow")))?;
        let storage = |fill: Option<f32>| match fill {
            Some(x) => vec![vec![x; elems]; layout.layers],
            None => Vec::new(),
        };
        Ok(BlockPool {
            layout,
            num_blocks,
            k: storage(fill),
            v: storage(fill),
            host: fill.is_some(),
            copies: Vec::new(),
            refs: vec![0; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            prefix: PrefixCache::new(num_blocks),
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn blocks_free(&self) -> usize {
        self.free.len()
    }

    pub fn blocks_used(&self) -> usize {
        self.num_blocks - self.free.len()
    }

    /// Tables holding `block`; 0 for a free block or an id out of range.
    pub fn refcount(&self, block: u32) -> u32 {
        self.refs.get(block as usize).copied().unwrap_or(0)
    }

    /// Full blocks currently findable by prefix content.
    pub fn prefix_entries(&self) -> usize {
        self.prefix.len()
    }

    /// Whether the pool stores the blocks (false for `accounting`).
    pub fn has_storage(&self) -> bool {
        self.host
    }

    /// The copy-on-write copies `(src, dst)` queued since the last call, in order (accounting pools; always
    /// empty for a pool with storage, which copies at once). Copy every layer's k and v of `src` into `dst`
    /// before writing into `dst`.
    pub fn take_copies(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.copies)
    }

    pub fn layer(&self, layer: usize) -> Result<KvLayer<'_>> {
        if !self.host {
            return Err(self.no_storage());
        }
        let (k, v) = match (self.k.get(layer), self.v.get(layer)) {
            (Some(k), Some(v)) => (k, v),
            _ => return Err(self.bad_layer(layer)),
        };
        let l = &self.layout;
        Ok(KvLayer { k, v, block_size: l.block_size, kv_heads: l.kv_heads, head_dim: l.head_dim })
    }

    pub fn layer_mut(&mut self, layer: usize) -> Result<KvLayerMut<'_>> {
        if !self.host {
            return Err(self.no_storage());
        }
        let l = self.layout;
        let err = self.bad_layer(layer);
        match (self.k.get_mut(layer), self.v.get_mut(layer)) {
            (Some(k), Some(v)) => {
                Ok(KvLayerMut { k, v, block_size: l.block_size, kv_heads: l.kv_heads, head_dim: l.head_dim })
            }
            _ => Err(err),
        }
    }

    fn no_storage(&self) -> Error {
        Error::Invalid("kv cache: this pool only counts blocks; their keys and values live on a device".into())
    }

    fn bad_layer(&self, layer: usize) -> Error {
        Error::Invalid(format!("kv cache: layer {layer} out of range (the pool has {})", self.layout.layers))
    }

    /// Takes a free block with a count of one.
    pub(super) fn alloc(&mut self) -> Result<u32> {
        let b = self.free.pop().ok_or_else(|| self.exhausted(1))?;
        self.refs[b as usize] = 1;
        Ok(b)
    }

    pub(super) fn exhausted(&self, need: usize) -> Error {
        Error::Invalid(format!(
            "kv cache: out of blocks: need {need}, {} free of {} (raise the memory fraction or lower the batch)",
            self.free.len(),
            self.num_blocks
        ))
    }

    /// One more table holds `block`.
    pub(super) fn retain(&mut self, block: u32) -> Result<()> {
        match self.refs.get_mut(block as usize) {
            Some(r) if *r > 0 => {
                *r += 1;
                Ok(())
            }
            _ => Err(Error::Invalid(format!("kv cache: retain of block {block}, which is free or out of range"))),
        }
    }

    /// One table fewer holds `block`; at zero it leaves the prefix cache and returns to the free list.
    /// Releasing a free block is an error (a double free), never a silent no-op.
    pub(super) fn release(&mut self, block: u32) -> Result<()> {
        match self.refs.get_mut(block as usize) {
            Some(r) if *r > 0 => {
                *r -= 1;
                if *r == 0 {
                    self.prefix.forget(block);
                    self.free.push(block);
                }
                Ok(())
            }
            _ => Err(Error::Invalid(format!("kv cache: double free of block {block} (free or out of range)"))),
        }
    }

    /// Copies every layer's k and v of block `src` into block `dst`.
    pub(super) fn copy_block(&mut self, src: u32, dst: u32) {
        if !self.host {
            self.copies.push((src, dst));
            return;
        }
        let n = self.layout.block_elems();
        let (s, d) = (src as usize * n, dst as usize * n);
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            buf.copy_within(s..s + n, d);
        }
    }

    /// Checks every invariant against the tables the caller still holds: each block's count equals the
    /// number of times the tables list it, the free list holds exactly the blocks with count zero (once
    /// each), and every prefix entry names a live block. Meant for tests and debug builds of the scheduler.
    pub fn audit<'t>(&self, tables: impl IntoIterator<Item = &'t super::BlockTable>) -> Result<()> {
        self.audit_with(tables, std::iter::empty())
    }

    /// `audit` where `extra` lists further references held outside any table (a `PrefixRetainer`'s blocks).
    pub fn audit_with<'t>(
        &self,
        tables: impl IntoIterator<Item = &'t super::BlockTable>,
        extra: impl IntoIterator<Item = u32>,
    ) -> Result<()> {
        let mut held = vec![0u32; self.num_blocks];
        for b in extra {
            let slot = held
                .get_mut(b as usize)
                .ok_or_else(|| Error::Invalid(format!("kv audit: retained block {b} out of range")))?;
            *slot += 1;
        }
        for t in tables {
            for &b in t.blocks() {
                let slot = held
                    .get_mut(b as usize)
                    .ok_or_else(|| Error::Invalid(format!("kv audit: table holds block {b}, out of range")))?;
                *slot += 1;
            }
        }
        let mut on_free = vec![false; self.num_blocks];
        for &b in &self.free {
            let seen = on_free
                .get_mut(b as usize)
                .ok_or_else(|| Error::Invalid(format!("kv audit: free list holds block {b}, out of range")))?;
            if *seen {
                return Err(Error::Invalid(format!("kv audit: block {b} is on the free list twice")));
            }
            *seen = true;
        }
        for b in 0..self.num_blocks {
            if held[b] != self.refs[b] {
                return Err(Error::Invalid(format!(
                    "kv audit: block {b} has count {} but {} table entries",
                    self.refs[b], held[b]
                )));
            }
            if on_free[b] != (self.refs[b] == 0) {
                return Err(Error::Invalid(format!(
                    "kv audit: block {b} with count {} is {}on the free list",
                    self.refs[b],
                    if on_free[b] { "" } else { "not " }
                )));
            }
        }
        for b in self.prefix.blocks() {
            if self.refcount(b) == 0 {
                return Err(Error::Invalid(format!("kv audit: prefix cache names free block {b}")));
            }
        }
        Ok(())
    }
}
