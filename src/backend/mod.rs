//! The op surface the models call. Every op here has a CPU implementation in `cpu/<op>.rs` (f32 compute,
//! the reference for the CUDA twins that come later in `cuda/<op>.rs`), and one name across kernels, tests
//! and benches. Models never touch a device API directly.
//!
//! Layouts are row-major and contiguous; shapes are checked and a mismatch is an `Err` naming the op.
//! Activations are f32 on the CPU; weights may be f32, bf16 or f16 (widened on the fly, never copied whole).
//!
//! OWNER of the CPU implementations: backend helper. The signatures below are the contract the model code
//! is written against; keep them (add ops if needed, tell the lead).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::kv::{KvLayer, KvLayerMut};
use crate::tensor::Tensor;
use crate::Result;

/// Batch invariance: `linear` with at most this many rows of `x` computes every row exactly (bit for bit) as
/// it would alone, and `attention` / `paged_attention` do the same for at most
/// `ATTENTION_ROW_INVARIANT_MAX_ROWS` query rows. Larger calls take faster kernels whose rounding depends on
/// the blocking. A caller that needs results independent of what else is in the batch (the serving engine:
/// an answer must not change with the other requests) splits its calls into pieces of these sizes.
pub const LINEAR_ROW_INVARIANT_MAX_ROWS: usize = cpu::linear::GEMV_MAX_M;
pub const ATTENTION_ROW_INVARIANT_MAX_ROWS: usize = cpu::attention::SMALL_TQ;

/// `x [m, k] · w[n, k]^T (+ b[n])` -> `[m, n]` f32. `w` f32, bf16 or f16; `b` any float dtype.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    cpu::linear::linear(x, w, b)
}

/// LayerNorm over the last dim of `x [m, n]` (biased variance), `w`, `b` of `[n]`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    cpu::norm::layer_norm(x, w, b, eps)
}

/// RMSNorm over the last dim of `x [m, n]`, `w [n]`: `x * rsqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    cpu::norm::rms_norm(x, w, eps)
}

/// Fused `residual += x; return rms_norm(residual)` (the Qwen2 decoder's add + norm).
pub fn add_rms_norm(residual: &mut Tensor, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    cpu::norm::add_rms_norm(residual, x, w, eps)
}

/// `residual [m, n] += scale[n] ⊙ x [m, n]` (InternViT's layer scale), or plain `+= x` without a scale.
pub fn add_scaled(residual: &mut Tensor, x: &Tensor, scale: Option<&Tensor>) -> Result<()> {
    cpu::elementwise::add_scaled(residual, x, scale)
}

/// In-place exact (erf) GELU.
pub fn gelu_erf(x: &mut Tensor) -> Result<()> {
    cpu::elementwise::gelu_erf(x)
}

/// `silu(gate) * up`, both `[m, n]`.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    cpu::elementwise::silu_mul(gate, up)
}

/// In-place rotary embedding, half-split (NeoX) layout, on `x [t, heads, d]`: token `i` at position
/// `positions[i]`, `inv_freq [d/2]` (f32, computed by the caller from theta and any rope scaling).
pub fn rope(x: &mut Tensor, positions: &[usize], inv_freq: &[f32]) -> Result<()> {
    cpu::rope::rope(x, positions, inv_freq)
}

/// Scaled dot-product attention. `q [tq, hq, d]`, `k`/`v [tk, hk, d]` with `hq % hk == 0` (GQA: query head
/// `j` reads kv head `j / (hq / hk)`). `causal = Some(p)`: query `i` sits at position `p + i` of the keys and
/// sees keys `0..=p + i`; `None`: bidirectional. Softmax in f32. Returns `[tq, hq, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: Option<usize>, scale: f32) -> Result<Tensor> {
    cpu::attention::attention(q, k, v, causal, scale)
}

/// `attention` over a paged KV cache: k and v are the first `context_len` tokens of the block table
/// `blocks` in one layer's pool storage `kv` (layout in `kv/mod.rs`). Same `q`, `causal`, `scale` and result.
pub fn paged_attention(
    q: &Tensor,
    kv: &KvLayer,
    blocks: &[u32],
    context_len: usize,
    causal: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    cpu::paged_attention::paged_attention(q, kv, blocks, context_len, causal, scale)
}

/// Writes `k`, `v [t, kv_heads, d]` into positions `start..start + t` of the block table `blocks` of one
/// layer's pool storage (slots handed out by `BlockPool::append`).
pub fn write_kv(kv: &mut KvLayerMut, blocks: &[u32], start: usize, k: &Tensor, v: &Tensor) -> Result<()> {
    cpu::paged_attention::write_kv(kv, blocks, start, k, v)
}

/// InternViT embeddings: 14x14 stride-14 conv of `pixels [n, 3, H, W]` with `w [h, 3, p, p]`, `b [h]`,
/// patches in row-major order, CLS row prepended, position embeddings `pos [1 + (H/p)(W/p), h]` added.
/// Returns `[n, 1 + (H/p)(W/p), h]`.
pub fn patch_embed(pixels: &Tensor, w: &Tensor, b: &Tensor, cls: &Tensor, pos: &Tensor) -> Result<Tensor> {
    cpu::patch_embed::patch_embed(pixels, w, b, cls, pos)
}

/// Pixel shuffle with scale 0.5 (MODEL_SPEC §3.5 closed form): `x [n, g*g, c]` (g even, patch grid
/// row-major) -> `[n, (g/2)^2, 4c]` with `out[n, r*(g/2)+s, dy*2c + dx*c + ch] = x[n, (2r+dy)*g + 2s+dx, ch]`.
pub fn pixel_shuffle(x: &Tensor) -> Result<Tensor> {
    cpu::pixel_shuffle::pixel_shuffle(x)
}

/// Rows of `table [vocab, d]` for `ids` -> `[ids.len(), d]` f32. An id out of range is an error.
pub fn embedding(ids: &[u32], table: &Tensor) -> Result<Tensor> {
    cpu::embedding::embedding(ids, table)
}

/// `dst[rows[i], :] = src[i, :]` for every i; `dst [t, d]`, `src [rows.len(), d]`.
pub fn scatter_rows(dst: &mut Tensor, rows: &[usize], src: &Tensor) -> Result<()> {
    cpu::embedding::scatter_rows(dst, rows, src)
}

/// Index of the largest value; the first one on ties (as torch.argmax). NaN is an error.
pub fn argmax(x: &[f32]) -> Result<usize> {
    cpu::sampling::argmax(x)
}

pub use cpu::sampling::{Sampler, SamplingParams};
