//! Paged KV cache: a fixed pool of blocks, each holding the keys and values of `block_size` consecutive
//! tokens for every layer, handed out to sequences through per-sequence block tables.
//!
//! Why pages: a contiguous cache per sequence must be sized for the longest possible sequence, and copying a
//! shared prefix (the same face image asked several questions) wastes both memory and prefill time. With
//! blocks, a sequence holds only the blocks it fills, forks share blocks by reference count, and full blocks
//! are found again by the content of the tokens that produced them (`PrefixCache`).
//!
//! Layout (the CUDA twin keeps it, so a block id means the same thing on both sides): per layer, one k and one
//! v buffer of `[num_blocks, block_size, kv_heads, head_dim]`, row-major. Token `t` of a sequence lives in
//! block `table[t / block_size]`, slot `t % block_size`; its head `h` starts at
//! `((block * block_size + slot) * kv_heads + h) * head_dim`.
//!
//! Rules the pool enforces: a block is free exactly when its reference count is zero; only the slots past a
//! table's length are ever written, and `BlockPool::append` makes those slots private first (copy-on-write
//! of a shared partially-filled last block); running out of blocks is an `Err` and leaves the table as it
//! was. The attention side is `backend::paged_attention` and `backend::write_kv`;
//! `PagedKv` lets `Qwen2::forward_kv` run on a table, `PagedBatch` lets `Qwen2::forward_batch` run many
//! tables of one pool in a single pass, and `PrefixRetainer` keeps finished sequences' prefix blocks
//! findable until the pool needs the room.

mod keep;
mod paged;
mod pool;
mod prefix;
mod table;

pub use keep::PrefixRetainer;
pub use paged::{PagedBatch, PagedKv};
pub use pool::{BlockPool, KvLayer, KvLayerMut};
pub use table::BlockTable;

use crate::{Error, Result};

/// Tokens per block unless configured otherwise: small enough that a request wastes at most 15 slots per
/// sequence, large enough that a block of one kv head is a whole number of 16-byte vectors.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The shape of what one block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl KvLayout {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, block_size: usize) -> Result<KvLayout> {
        if layers == 0 || kv_heads == 0 || head_dim == 0 || block_size == 0 {
            return Err(Error::Invalid(format!(
                "kv cache: layers ({layers}), kv heads ({kv_heads}), head dim ({head_dim}) and block size \
                 ({block_size}) must all be positive"
            )));
        }
        Ok(KvLayout { layers, kv_heads, head_dim, block_size })
    }

    /// Elements of one token of one layer for one of k or v.
    pub fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Elements of one block of one layer for one of k or v.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.row()
    }

    /// Bytes of one block: k and v of every layer, with elements of `elem_bytes` (4 for f32, 2 for bf16).
    pub fn block_bytes(&self, elem_bytes: usize) -> usize {
        2 * self.layers * self.block_elems() * elem_bytes
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

/// How many blocks fit in `fraction` of `free_bytes` (the device's free memory after the weights are
/// loaded), each block `layout.block_bytes(elem_bytes)`. A fraction outside `(0, 1]` is an error, and so is a
/// budget too small for a single block: a cache that cannot hold one token is a configuration mistake, not
/// something to discover at the first request.
pub fn blocks_for_budget(layout: &KvLayout, elem_bytes: usize, free_bytes: u64, fraction: f64) -> Result<usize> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(Error::Invalid(format!("kv cache: memory fraction must be in (0, 1], got {fraction}")));
    }
    let block = layout.block_bytes(elem_bytes.max(1)) as u64;
    let budget = (free_bytes as f64 * fraction).floor() as u64;
    let blocks = budget / block;
    if blocks == 0 {
        return Err(Error::Invalid(format!(
            "kv cache: {fraction} of {free_bytes} free bytes is {budget} bytes, less than one block of {block} \
             bytes ({layout:?})"
        )));
    }
    usize::try_from(blocks)
        .map_err(|_| Error::Invalid(format!("kv cache: {blocks} blocks do not fit this platform's usize")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_sizing() {
        // Qwen2.5-0.5B: 24 layers, 2 kv heads of 64; a bf16 block is 2 * 24 * 16 * 128 * 2 = 196608 bytes.
        let l = KvLayout::new(24, 2, 64, DEFAULT_BLOCK_SIZE).expect("layout");
        assert_eq!(l.block_bytes(2), 196_608);
        assert_eq!(blocks_for_budget(&l, 2, 196_608 * 10 + 5, 1.0).expect("fits"), 10);
        assert_eq!(blocks_for_budget(&l, 2, 196_608 * 10, 0.5).expect("fits"), 5);
        assert!(blocks_for_budget(&l, 2, 196_608 * 10, 0.0).is_err());
        assert!(blocks_for_budget(&l, 2, 196_608 * 10, 1.5).is_err());
        assert!(blocks_for_budget(&l, 2, 196_607, 1.0).is_err());
        assert!(blocks_for_budget(&l, 2, 1 << 30, f64::NAN).is_err());
        assert!(KvLayout::new(24, 0, 64, 16).is_err());
    }
}
