//! The Qwen2 decoder (MODEL_SPEC §3.8): RMSNorm pre-norm layers, GQA attention with q/k/v bias and
//! half-split RoPE, SwiGLU MLP, final norm, untied (or tied) lm_head. Used for FaceLLM's language model and
//! for text-only `Qwen2ForCausalLM` checkpoints alike.

use super::linear::{Linear, Norm};
use super::{get_shaped, Weights};
use crate::backend;
use crate::config::RopeScaling;
use crate::tensor::Tensor;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct TextParams {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position: usize,
    pub tie_embeddings: bool,
}

impl TextParams {
    /// RoPE inverse frequencies for a sequence reaching `seq_len` tokens, in f32 as HF computes them.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let d = self.head_dim;
        let mut base = self.rope_theta;
        let mut divide = 1.0f32;
        match self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => divide = factor as f32,
            RopeScaling::Dynamic { factor } => {
                if seq_len > self.max_position {
                    let ratio = factor * seq_len as f64 / self.max_position as f64 - (factor - 1.0);
                    base *= ratio.powf(d as f64 / (d as f64 - 2.0));
                }
            }
        }
        // HF: 1 / base ** (arange(0, d, 2) / d), the exponent and the power in float32.
        let base = base as f32;
        (0..d / 2).map(|i| 1.0f32 / base.powf((2 * i) as f32 / d as f32) / divide).collect()
    }
}

struct DecoderLayer {
    input_norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// RMSNorm weight of the fused residual-add + norm after attention.
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A contiguous per-layer K/V cache: `[len, kv_heads, head_dim]` f32 tensors for each of k and v, grown in
/// place and handed to attention without a copy.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
}

impl KvCache {
    pub fn new(p: &TextParams) -> KvCache {
        let empty = Tensor::zeros([0, p.kv_heads, p.head_dim]);
        KvCache { k: vec![empty.clone(); p.layers], v: vec![empty; p.layers], len: 0 }
    }
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Drops every token after the first `len` (to rewind to a shared prefix).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for (k, v) in self.k.iter_mut().zip(&mut self.v) {
            k.truncate_rows(len)?;
            v.truncate_rows(len)?;
        }
        self.len = self.len.min(len);
        Ok(())
    }
}

/// Where a forward pass keeps keys and values: the contiguous `KvCache` above (the default), or a paged
/// cache (`kv::PagedKv`). A pass calls `held`, then `reserve` once, `attend` once per layer in order, and
/// `commit` once at the end.
pub trait KvStore {
    /// Tokens held before this pass: the position of its first token.
    fn held(&self) -> usize;
    /// Makes room for the pass's `t` tokens.
    fn reserve(&mut self, t: usize) -> Result<()>;
    /// Stores layer `layer`'s keys and values of the pass (`k`, `v [t, kv_heads, d]`, positions
    /// `held..held + t`) and returns `attention(q, all keys, all values, causal from held, scale)`.
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor>;
    /// Marks the pass's `t` tokens as held, once every layer has stored them.
    fn commit(&mut self, t: usize) -> Result<()>;
}

/// Where a batched pass over several sequences keeps keys and values: sequence `seq` of the batch has its
/// own positions and its own store. `Qwen2::forward_batch` calls `held` and `reserve` for every sequence,
/// then per layer `attend` for every sequence in order, and `commit` for every sequence at the end.
/// Implemented by `KvStores` (independent `KvStore`s) and by `kv::PagedBatch` (many block tables, one pool).
pub trait BatchKvStore {
    /// Sequences in the batch.
    fn seqs(&self) -> usize;
    /// Tokens sequence `seq` held before this pass: the position of its first token in the pass.
    fn held(&self, seq: usize) -> usize;
    fn reserve(&mut self, seq: usize, t: usize) -> Result<()>;
    /// As `KvStore::attend`, for the `t` rows of sequence `seq` (`q [t, heads, d]`, `k`, `v [t, kv_heads, d]`).
    fn attend(&mut self, seq: usize, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor>;
    fn commit(&mut self, seq: usize, t: usize) -> Result<()>;

    /// The block ids of sequence `seq`'s table, after `reserve` (a model that keeps the blocks on a device
    /// reads and writes its own storage through them). Stores without block tables say so.
    fn blocks(&self, seq: usize) -> Result<&[u32]> {
        Err(Error::Invalid(format!("batch kv: sequence {seq}'s store has no block table")))
    }
    /// The block copies `(src, dst)` that the `reserve` calls so far asked for (copy-on-write of a shared,
    /// partially filled block) and that the store could not do itself because the blocks live on a device:
    /// the model performs them, every layer's k and v, before writing the pass's keys and values.
    fn take_copies(&mut self) -> Vec<(u32, u32)> {
        Vec::new()
    }
}

/// A batch of independent stores, one per sequence (contiguous caches, or paged tables of different pools).
pub struct KvStores<'s, 'a>(pub &'s mut [&'a mut dyn KvStore]);

impl<'a> KvStores<'_, 'a> {
    fn store(&mut self, seq: usize) -> Result<&mut (dyn KvStore + 'a)> {
        let n = self.0.len();
        match self.0.get_mut(seq) {
            Some(s) => Ok(&mut **s),
            None => Err(Error::Invalid(format!("batch kv: sequence {seq} out of range ({n} stores)"))),
        }
    }
}

impl BatchKvStore for KvStores<'_, '_> {
    fn seqs(&self) -> usize {
        self.0.len()
    }
    fn held(&self, seq: usize) -> usize {
        self.0.get(seq).map_or(0, |s| s.held())
    }
    fn reserve(&mut self, seq: usize, t: usize) -> Result<()> {
        self.store(seq)?.reserve(t)
    }
    fn attend(&mut self, seq: usize, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        self.store(seq)?.attend(layer, q, k, v, scale)
    }
    fn commit(&mut self, seq: usize, t: usize) -> Result<()> {
        self.store(seq)?.commit(t)
    }
}

/// Rows `start..start + n` of `x [rows, ...]` as a tensor of their own (a copy).
fn take_rows(x: &Tensor, start: usize, n: usize) -> Result<Tensor> {
    let mut shape = x.shape().to_vec();
    let row: usize = shape[1..].iter().product();
    let data = x.f32s()?;
    let Some(rows) = data.get(start * row..(start + n) * row) else {
        return Err(Error::Invalid(format!("rows {start}..{} of a tensor {shape:?}", start + n)));
    };
    shape[0] = n;
    Tensor::from_f32(shape, rows.to_vec())
}

impl KvStore for KvCache {
    fn held(&self) -> usize {
        self.len
    }
    fn reserve(&mut self, _t: usize) -> Result<()> {
        Ok(())
    }
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        let (Some(ck), Some(cv)) = (self.k.get_mut(layer), self.v.get_mut(layer)) else {
            return Err(Error::Invalid(format!("kv cache: layer {layer} out of range")));
        };
        ck.append_rows(k.f32s()?)?;
        cv.append_rows(v.f32s()?)?;
        backend::attention(q, ck, cv, Some(self.len), scale)
    }
    fn commit(&mut self, t: usize) -> Result<()> {
        self.len += t;
        Ok(())
    }
}

pub struct Qwen2 {
    p: TextParams,
    prefix: String,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    lm_head: Tensor,
}

/// What a forward pass may record for comparisons with the reference.
#[derive(Default)]
pub struct Trace {
    /// The input of every layer, then the last layer's output (before the final norm).
    pub hidden: Vec<Tensor>,
}

impl Qwen2 {
    /// `prefix` is where the decoder's tensors live: `model.language_model` (FaceLLM, runtime naming).
    pub fn load(w: &dyn Weights, p: &TextParams, prefix: &str) -> Result<Qwen2> {
        let (dm, qd, kvd) = (p.hidden, p.heads * p.head_dim, p.kv_heads * p.head_dim);
        let embed = get_shaped(w, &format!("{prefix}.embed_tokens.weight"), &[p.vocab, dm])?;
        let mut layers = Vec::with_capacity(p.layers);
        for i in 0..p.layers {
            let l = format!("{prefix}.layers.{i}");
            layers.push(DecoderLayer {
                input_norm: Norm::load_rms(w, &format!("{l}.input_layernorm"), dm, p.eps)?,
                q: Linear::load(w, &format!("{l}.self_attn.q_proj"), qd, dm, true)?,
                k: Linear::load(w, &format!("{l}.self_attn.k_proj"), kvd, dm, true)?,
                v: Linear::load(w, &format!("{l}.self_attn.v_proj"), kvd, dm, true)?,
                o: Linear::load(w, &format!("{l}.self_attn.o_proj"), dm, qd, false)?,
                post_norm: get_shaped(w, &format!("{l}.post_attention_layernorm.weight"), &[dm])?,
                gate: Linear::load(w, &format!("{l}.mlp.gate_proj"), p.intermediate, dm, false)?,
                up: Linear::load(w, &format!("{l}.mlp.up_proj"), p.intermediate, dm, false)?,
                down: Linear::load(w, &format!("{l}.mlp.down_proj"), dm, p.intermediate, false)?,
            });
        }
        let norm = Norm::load_rms(w, &format!("{prefix}.norm"), dm, p.eps)?;
        let lm_head = if p.tie_embeddings {
            match w.weight("lm_head.weight") {
                Ok(t) if t.shape() == [p.vocab, dm] => t,
                _ => embed.clone(),
            }
        } else {
            get_shaped(w, "lm_head.weight", &[p.vocab, dm])?
        };
        Ok(Qwen2 { p: p.clone(), prefix: prefix.to_string(), embed, layers, norm, lm_head })
    }

    pub fn params(&self) -> &TextParams {
        &self.p
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Token embeddings `[ids.len(), hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        backend::embedding(ids, &self.embed)
    }

    /// Runs `x [t, hidden]` (embeddings of the tokens after the cache) through every layer, appending their
    /// keys and values to `cache`; returns the final-normed hidden states `[t, hidden]`.
    pub fn forward(&self, x: Tensor, cache: &mut KvCache, trace: Option<&mut Trace>) -> Result<Tensor> {
        self.forward_kv(x, cache, trace)
    }

    /// `forward` with keys and values kept in any `KvStore` (a paged cache, for one).
    pub fn forward_kv(&self, x: Tensor, cache: &mut dyn KvStore, trace: Option<&mut Trace>) -> Result<Tensor> {
        let t = x.shape().first().copied().unwrap_or(0);
        let mut one: [&mut dyn KvStore; 1] = [cache];
        self.forward_batch(x, &[t], &mut KvStores(&mut one), false, trace)
    }

    /// Several sequences in one pass: `x [Σ lens, hidden]` holds the embeddings of `lens[0]` new tokens of
    /// sequence 0, then `lens[1]` of sequence 1, and so on; `kv` keeps each sequence's keys and values.
    /// Norms, projections and the MLP run once over all the rows (a decode step of B sequences reads every
    /// weight once, not B times); RoPE uses each row's own position and attention runs per sequence over its
    /// own cache. Returns the final-normed hidden states `[Σ lens, hidden]`, rows in the same order.
    ///
    /// With `row_invariant`, the projections run in pieces small enough that every row is computed exactly
    /// as it would be alone (`backend::LINEAR_ROW_INVARIANT_MAX_ROWS`), so that a sequence's numbers do not
    /// depend on what else is in the batch; the store must do the same for attention (`kv::PagedBatch`
    /// does). Without it, larger passes use the faster GEMM path and rows agree with a sequence run alone
    /// to rounding only (tests/batch_forward.rs measures both).
    pub fn forward_batch(
        &self,
        x: Tensor,
        lens: &[usize],
        kv: &mut dyn BatchKvStore,
        row_invariant: bool,
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let p = &self.p;
        let rows = x.shape().first().copied().unwrap_or(0);
        if lens.len() != kv.seqs() || lens.iter().sum::<usize>() != rows || x.shape() != [rows, p.hidden] {
            return Err(Error::Invalid(format!(
                "forward_batch: x {:?} must be [sum of lens {lens:?}, {}] with one kv store per sequence ({} given)",
                x.shape(),
                p.hidden,
                kv.seqs()
            )));
        }
        let mut positions = Vec::with_capacity(rows);
        let mut longest = 0;
        for (seq, &t) in lens.iter().enumerate() {
            let start = kv.held(seq);
            let total = start + t;
            if total > p.max_position {
                return Err(Error::Invalid(format!(
                    "sequence of {total} tokens exceeds the model's context of {} positions",
                    p.max_position
                )));
            }
            positions.extend(start..total);
            longest = longest.max(total);
        }
        // Within the context the frequencies do not depend on the length (dynamic scaling starts past
        // max_position), so one table serves every sequence of the batch.
        let inv_freq = p.inv_freq(longest);
        let d = p.head_dim;
        let scale = (d as f32).powf(-0.5);
        for (seq, &t) in lens.iter().enumerate() {
            kv.reserve(seq, t)?;
        }
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(tr) = trace.as_deref_mut() {
                tr.hidden.push(x.clone());
            }
            let inv = row_invariant;
            let y = layer.input_norm.forward(&x)?;
            let mut q = layer.q.forward_rows(&y, inv)?.reshape([rows, p.heads, d])?;
            let mut k = layer.k.forward_rows(&y, inv)?.reshape([rows, p.kv_heads, d])?;
            let v = layer.v.forward_rows(&y, inv)?.reshape([rows, p.kv_heads, d])?;
            backend::rope(&mut q, &positions, &inv_freq)?;
            backend::rope(&mut k, &positions, &inv_freq)?;
            let a = if lens.len() == 1 {
                kv.attend(0, i, &q, &k, &v, scale)?
            } else {
                let mut out = Vec::with_capacity(rows * p.heads * d);
                let mut r0 = 0;
                for (seq, &t) in lens.iter().enumerate() {
                    let (qs, ks, vs) = (take_rows(&q, r0, t)?, take_rows(&k, r0, t)?, take_rows(&v, r0, t)?);
                    out.extend_from_slice(kv.attend(seq, i, &qs, &ks, &vs, scale)?.f32s()?);
                    r0 += t;
                }
                Tensor::from_f32([rows, p.heads, d], out)?
            };
            let a = a.reshape([rows, p.heads * d])?;
            let o = layer.o.forward_rows(&a, inv)?;
            let y = backend::add_rms_norm(&mut x, &o, &layer.post_norm, p.eps)?;
            let g = layer.gate.forward_rows(&y, inv)?;
            let u = layer.up.forward_rows(&y, inv)?;
            let m = layer.down.forward_rows(&backend::silu_mul(&g, &u)?, inv)?;
            backend::add_scaled(&mut x, &m, None)?;
        }
        for (seq, &t) in lens.iter().enumerate() {
            kv.commit(seq, t)?;
        }
        if let Some(tr) = trace {
            tr.hidden.push(x.clone());
        }
        self.norm.forward(&x)
    }

    /// Logits `[t, vocab]` of final-normed hidden states `[t, hidden]`.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        backend::linear(h, &self.lm_head, None)
    }

    /// `logits`, every row exactly as it would be alone (`linear_row_invariant`).
    pub fn logits_row_invariant(&self, h: &Tensor) -> Result<Tensor> {
        super::linear::linear_row_invariant(h, &self.lm_head, None)
    }
}
