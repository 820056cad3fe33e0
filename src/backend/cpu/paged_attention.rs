//! Attention over a paged KV cache, and the write of a step's keys and values into the cache's blocks.
//!
//! The CPU twin is deliberately naive: it gathers the table's blocks into contiguous `[len, kv_heads, d]`
//! tensors and runs `attention` on them, so it computes exactly what the contiguous path computes (bit for
//! bit) and any difference in a CUDA kernel that reads blocks in place is that kernel's. The gather costs
//! one pass over the keys and values, small next to the attention itself for GQA models.

use super::{attention, f32_data, invalid};
use crate::kv::{KvLayer, KvLayerMut};
use crate::tensor::Tensor;
use crate::Result;

/// Checks a layer view's storage against its shape and `blocks` against its size; `tokens` positions from
/// the table's start must be covered. Returns (block elems, row elems).
fn check_table(
    op: &str,
    kv_len: (usize, usize),
    geo: (usize, usize, usize),
    blocks: &[u32],
    tokens: usize,
) -> Result<(usize, usize)> {
    let (block_size, kv_heads, head_dim) = geo;
    let row = kv_heads * head_dim;
    let block = block_size * row;
    if block == 0 || kv_len.0 != kv_len.1 || !kv_len.0.is_multiple_of(block) {
        return Err(invalid(
            op,
            format!(
                "cache storage of {} k and {} v floats is not whole blocks of {block_size} x {kv_heads} x {head_dim}",
                kv_len.0, kv_len.1
            ),
        ));
    }
    let num_blocks = kv_len.0 / block;
    let used = tokens.div_ceil(block_size);
    if used > blocks.len() {
        return Err(invalid(
            op,
            format!("{tokens} tokens need {used} blocks of {block_size}; the table has {}", blocks.len()),
        ));
    }
    if let Some((i, &b)) = blocks[..used].iter().enumerate().find(|&(_, &b)| b as usize >= num_blocks) {
        return Err(invalid(op, format!("table entry {i} is block {b}; the pool has {num_blocks}")));
    }
    Ok((block, row))
}

/// The first `len` tokens of the table as contiguous `k`, `v` tensors `[len, kv_heads, head_dim]`.
pub fn gather_kv(kv: &KvLayer, blocks: &[u32], len: usize) -> Result<(Tensor, Tensor)> {
    const OP: &str = "gather_kv";
    let geo = (kv.block_size, kv.kv_heads, kv.head_dim);
    let (block, row) = check_table(OP, (kv.k.len(), kv.v.len()), geo, blocks, len)?;
    let mut k = Vec::with_capacity(len * row);
    let mut v = Vec::with_capacity(len * row);
    for (i, &b) in blocks[..len.div_ceil(kv.block_size)].iter().enumerate() {
        let n = (len - i * kv.block_size).min(kv.block_size) * row;
        let at = b as usize * block;
        k.extend_from_slice(&kv.k[at..at + n]);
        v.extend_from_slice(&kv.v[at..at + n]);
    }
    let shape = [len, kv.kv_heads, kv.head_dim];
    Ok((Tensor::from_f32(shape, k)?, Tensor::from_f32(shape, v)?))
}

/// `attention(q, k, v, causal, scale)` where k and v are the first `context_len` tokens of the table.
pub fn paged_attention(
    q: &Tensor,
    kv: &KvLayer,
    blocks: &[u32],
    context_len: usize,
    causal: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    let (k, v) =
        gather_kv(kv, blocks, context_len).map_err(|e| crate::Error::Invalid(format!("paged_attention: {e}")))?;
    attention::attention(q, &k, &v, causal, scale)
}

/// Writes `k`, `v [t, kv_heads, head_dim]` at positions `start..start + t` of the table.
pub fn write_kv(kv: &mut KvLayerMut, blocks: &[u32], start: usize, k: &Tensor, v: &Tensor) -> Result<()> {
    const OP: &str = "write_kv";
    let (bs, hk, d) = (kv.block_size, kv.kv_heads, kv.head_dim);
    if k.shape() != v.shape() || k.shape().len() != 3 || k.shape()[1..] != [hk, d] {
        return Err(invalid(
            OP,
            format!("need k = v [t, {hk}, {d}] for this cache; got k {:?}, v {:?}", k.shape(), v.shape()),
        ));
    }
    let t = k.shape()[0];
    let (block, row) = check_table(OP, (kv.k.len(), kv.v.len()), (bs, hk, d), blocks, start + t)?;
    let (kd, vd) = (f32_data(OP, "k", k)?, f32_data(OP, "v", v)?);
    let mut pos = start;
    while pos < start + t {
        // One run per block: from pos to the end of its block or of the input, whichever comes first.
        let n = (bs - pos % bs).min(start + t - pos);
        let at = blocks[pos / bs] as usize * block + (pos % bs) * row;
        let src = (pos - start) * row;
        kv.k[at..at + n * row].copy_from_slice(&kd[src..src + n * row]);
        kv.v[at..at + n * row].copy_from_slice(&vd[src..src + n * row]);
        pos += n;
    }
    Ok(())
}
