//! The Qwen2 decoder on the GPU with a paged KV cache: the device twin of `model::llm`.
//!
//! A step runs the tokens of several sequences at once, laid out as consecutive rows:
//!   h [T, D]       = embed(ids) (image features scattered in)             residual stream, bf16
//!   per layer:  y  = RMSNorm(h)  (fused with the previous residual add)
//!               qkv [T, (hq+2hk)d] = y · Wqkv^T                            one GEMM, bias left to the next kernel
//!               q = RoPE(q + bq); cache[slot] = (RoPE(k + bk), v + bv)     one kernel
//!               a = attention(q, cache)                                    paged: flash prefill or split-K decode
//!               h += a · Wo^T ; y = RMSNorm(h)                             GEMM, then fused add + norm
//!               gu [T, 2I] = y · [Wg; Wu]^T ; m = silu(g) * u              one GEMM, one kernel
//!               h += m · Wd^T ; y = next RMSNorm(h)
//!   logits [B, V] = final RMSNorm(h of each sequence's last row) · Wlm^T
//!
//! Decode steps (one token per sequence) read everything that changes per step (ids, positions, cache
//! slots, block tables, context lengths) from fixed device buffers, so a step of a given batch size can be
//! captured once into a CUDA graph and replayed (`DecodeGraphs`).

use std::collections::HashMap;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaView};
use half::bf16;

use super::{GpuLinear, WeightSource};
use crate::backend::cuda::attention::{flash_attn_paged_prefill_bf16, PagedPrefillInputs, PagedPrefillShape};
use crate::backend::cuda::paged_attention::{paged_attention_decode_bf16, DecodeInputs, DecodeShape};
use crate::backend::cuda::rope_kv::{qkv_bias_rope_write_kv_bf16, RopeKvInputs, RopeKvOutputs, RopeKvShape};
use crate::backend::cuda::{self, buffer, guarded, CudaDevice, LinearShape};
use crate::model::llm::TextParams;
use crate::{Error, Result};

/// Tokens per KV block on the GPU (the attention kernels are built for it).
pub const BLOCK_SIZE: usize = 16;

pub struct GpuLayer {
    input_norm: CudaSlice<bf16>,
    /// `[(hq + 2hk) d, D]`: q, k and v stacked; their biases stacked in `qkv_bias`.
    qkv: GpuLinear,
    qkv_bias: CudaSlice<bf16>,
    o: GpuLinear,
    post_norm: CudaSlice<bf16>,
    /// `[2I, D]`: gate then up.
    gate_up: GpuLinear,
    down: GpuLinear,
}

pub struct GpuQwen2 {
    p: TextParams,
    embed: CudaSlice<bf16>,
    layers: Vec<GpuLayer>,
    norm: CudaSlice<bf16>,
    /// `None`: tied to `embed`.
    lm_head: Option<CudaSlice<bf16>>,
    inv_freq: CudaSlice<f32>,
    /// Decode steps of up to 8 rows use the decode GEMV kernels (`backend::cuda::gemv`, with SwiGLU fused into
    /// the down projection) instead of cuBLASLt: an experiment, off unless `FACELLM_GEMV=1` (or
    /// `set_decode_gemv`), until a GPU run shows it faster.
    decode_gemv: bool,
}

impl GpuQwen2 {
    /// Switches the decode GEMV experiment (see the field). Decode graphs keep the kernels they were captured
    /// with: switch before the first decode step, or with a fresh `DecodeGraphs`.
    pub fn set_decode_gemv(&mut self, on: bool) {
        self.decode_gemv = on;
    }

    pub fn load(src: &WeightSource, dev: &CudaDevice, p: &TextParams, prefix: &str) -> Result<GpuQwen2> {
        if !matches!(p.head_dim, 64 | 128) {
            return Err(Error::Invalid(format!(
                "cuda language model: head dim {} is not 64 or 128, the attention kernels' sizes",
                p.head_dim
            )));
        }
        if !matches!(p.rope_scaling, crate::config::RopeScaling::Default) {
            return Err(Error::Invalid(
                "cuda language model: rope scaling (linear/dynamic) is not supported on the GPU yet; use --device cpu"
                    .into(),
            ));
        }
        let (dm, d) = (p.hidden, p.head_dim);
        let (qd, kvd) = (p.heads * d, p.kv_heads * d);
        let embed = src.get(dev, &format!("{prefix}.embed_tokens.weight"), &[p.vocab, dm])?;
        let mut layers = Vec::with_capacity(p.layers);
        for i in 0..p.layers {
            let l = format!("{prefix}.layers.{i}");
            let a = format!("{l}.self_attn");
            let (q, k, v) = (format!("{a}.q_proj"), format!("{a}.k_proj"), format!("{a}.v_proj"));
            let w = src.get_stacked(
                dev,
                &[(&format!("{q}.weight"), qd), (&format!("{k}.weight"), kvd), (&format!("{v}.weight"), kvd)],
                dm,
            )?;
            let qkv_bias = src.get_stacked(
                dev,
                &[(&format!("{q}.bias"), qd), (&format!("{k}.bias"), kvd), (&format!("{v}.bias"), kvd)],
                1,
            )?;
            let gu = src.get_stacked(
                dev,
                &[
                    (&format!("{l}.mlp.gate_proj.weight"), p.intermediate),
                    (&format!("{l}.mlp.up_proj.weight"), p.intermediate),
                ],
                dm,
            )?;
            layers.push(GpuLayer {
                input_norm: src.get(dev, &format!("{l}.input_layernorm.weight"), &[dm])?,
                qkv: GpuLinear { w, b: None, n: qd + 2 * kvd, k: dm },
                qkv_bias,
                o: GpuLinear::load(src, dev, &format!("{a}.o_proj"), dm, qd, false)?,
                post_norm: src.get(dev, &format!("{l}.post_attention_layernorm.weight"), &[dm])?,
                gate_up: GpuLinear { w: gu, b: None, n: 2 * p.intermediate, k: dm },
                down: GpuLinear::load(src, dev, &format!("{l}.mlp.down_proj"), dm, p.intermediate, false)?,
            });
        }
        let norm = src.get(dev, &format!("{prefix}.norm.weight"), &[dm])?;
        let lm_head = if p.tie_embeddings { None } else { Some(src.get(dev, "lm_head.weight", &[p.vocab, dm])?) };
        let inv_freq = buffer::upload(dev, &p.inv_freq(p.max_position))?;
        let decode_gemv = std::env::var("FACELLM_GEMV").is_ok_and(|v| v == "1");
        Ok(GpuQwen2 { p: p.clone(), embed, layers, norm, lm_head, inv_freq, decode_gemv })
    }

    pub fn params(&self) -> &TextParams {
        &self.p
    }

    /// Bytes of weights one decode step reads (every layer's matrices, the final norm and the lm_head).
    pub fn weight_bytes(&self) -> usize {
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| 2 * (l.qkv.w.len() + l.qkv_bias.len() + l.o.w.len() + l.gate_up.w.len() + l.down.w.len()))
            .sum();
        per_layer + 2 * self.lm_head.as_ref().map_or(self.embed.len(), |w| w.len())
    }
}

/// The device KV cache: per layer, k and v of `[num_blocks, BLOCK_SIZE, kv_heads, head_dim]` bf16 (the
/// layout of `kv/mod.rs`, so a block id means the same on both backends). Which blocks a sequence holds is
/// host bookkeeping (`kv::BlockPool` / the scheduler); this is only the storage.
pub struct GpuKvCache {
    k: Vec<CudaSlice<bf16>>,
    v: Vec<CudaSlice<bf16>>,
    num_blocks: usize,
}

impl GpuKvCache {
    pub fn new(dev: &CudaDevice, p: &TextParams, num_blocks: usize) -> Result<GpuKvCache> {
        let n = num_blocks
            .checked_mul(BLOCK_SIZE * p.kv_heads * p.head_dim)
            .ok_or_else(|| Error::Invalid(format!("kv cache: {num_blocks} blocks overflow")))?;
        let mut k = Vec::with_capacity(p.layers);
        let mut v = Vec::with_capacity(p.layers);
        for _ in 0..p.layers {
            k.push(buffer::zeros::<bf16>(dev, n)?);
            v.push(buffer::zeros::<bf16>(dev, n)?);
        }
        Ok(GpuKvCache { k, v, num_blocks })
    }

    /// Blocks that fit in `fraction` of the device memory free now, after keeping `reserve` bytes aside.
    pub fn blocks_for(dev: &CudaDevice, p: &TextParams, fraction: f64, reserve: usize) -> Result<usize> {
        let (free, _total) = guarded("mem_get_info", || dev.ctx.mem_get_info())?;
        let per_block = 2 * p.layers * BLOCK_SIZE * p.kv_heads * p.head_dim * 2;
        let budget = (free as f64 * fraction.clamp(0.0, 1.0)) as usize;
        Ok(budget.saturating_sub(reserve) / per_block.max(1))
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Copies every layer's k and v of block `src` into block `dst` (copy-on-write of a shared block), on
    /// the device's stream, ordered before whatever is launched next.
    pub fn copy_block(&mut self, dev: &CudaDevice, src: u32, dst: u32) -> Result<()> {
        let (s, d) = (src as usize, dst as usize);
        if s == d || s >= self.num_blocks || d >= self.num_blocks {
            return Err(Error::Invalid(format!(
                "kv cache: cannot copy block {src} to block {dst} in a cache of {} blocks",
                self.num_blocks
            )));
        }
        let n = self.k.first().map_or(0, |b| b.len() / self.num_blocks);
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            // One slice holds both blocks: split it between them so one side is read and the other written.
            let (lo, hi) = (s.min(d), s.max(d));
            let mut whole = buf.as_view_mut();
            let (mut left, mut right) = whole
                .try_split_at_mut(hi * n)
                .ok_or_else(|| Error::Invalid("kv cache: block copy out of range".into()))?;
            let mut low = left.slice_mut(lo * n..(lo + 1) * n);
            let mut high = right.slice_mut(0..n);
            if s < d {
                guarded("copy kv block", || dev.stream.memcpy_dtod(&low, &mut high))?;
            } else {
                guarded("copy kv block", || dev.stream.memcpy_dtod(&high, &mut low))?;
            }
        }
        Ok(())
    }

    /// Bytes the cache holds on the device.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.len() * 2).sum()
    }
}

/// Fixed device buffers for steps of up to `max_tokens` rows and `max_seqs` sequences (rounded up to the
/// decode bucket that holds them) whose contexts reach at most `max_context` tokens. Everything a step reads that changes from step to step lives here, so a
/// captured decode graph stays valid across replays.
pub struct Workspace {
    pub max_tokens: usize,
    pub max_seqs: usize,
    pub max_context: usize,
    max_blocks: usize,
    h: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    q: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    gu: CudaSlice<bf16>,
    m: CudaSlice<bf16>,
    last: CudaSlice<bf16>,
    logits: CudaSlice<bf16>,
    decode_ws: CudaSlice<f32>,
    /// Per-step inputs in one buffer, uploaded with one copy per step (layout: [`StepLayout`]), and its host
    /// staging twin, reused so a step allocates nothing.
    step: CudaSlice<u32>,
    staging: Vec<u32>,
    lay: StepLayout,
    image_rows: CudaSlice<i32>,
    /// Row index of each sequence's last token in the current step (host side, for the logits gather).
    ends: Vec<usize>,
    /// Sampled ids [max_seqs], then the error word the kernels set on bad ids/slots.
    out: CudaSlice<u32>,
}

impl Workspace {
    pub fn new(
        dev: &CudaDevice,
        p: &TextParams,
        max_tokens: usize,
        max_seqs: usize,
        max_context: usize,
    ) -> Result<Workspace> {
        let (dm, d, i) = (p.hidden, p.head_dim, p.intermediate);
        let (qd, w) = (p.heads * d, (p.heads + 2 * p.kv_heads) * d);
        // Rows for the whole decode bucket of the largest batch, so every batch size replays a graph.
        let max_seqs = bucket(max_seqs.max(1)).unwrap_or(max_seqs);
        let t = max_tokens.max(max_seqs).max(1);
        let max_blocks = max_context.div_ceil(BLOCK_SIZE).max(1);
        let shape = decode_shape(p, max_seqs, max_blocks, max_context);
        let lay = StepLayout { tokens: t, seqs: max_seqs, max_blocks };
        let s = |n: usize| buffer::scratch::<bf16>(dev, n);
        Ok(Workspace {
            max_tokens: t,
            max_seqs,
            max_context,
            max_blocks,
            h: s(t * dm)?,
            y: s(t * dm)?,
            qkv: s(t * w)?,
            q: s(t * qd)?,
            attn: s(t * qd)?,
            o: s(t * dm)?,
            gu: s(t * 2 * i)?,
            m: s(t * i)?,
            last: s(max_seqs * dm)?,
            logits: s(max_seqs * p.vocab)?,
            decode_ws: buffer::zeros::<f32>(dev, shape.workspace_len().max(1))?,
            step: buffer::zeros(dev, lay.len())?,
            staging: vec![0; lay.len()],
            lay,
            image_rows: buffer::zeros(dev, t)?,
            ends: Vec::with_capacity(max_seqs),
            out: buffer::zeros(dev, max_seqs + 1)?,
        })
    }
}

fn decode_shape(p: &TextParams, seqs: usize, max_blocks: usize, max_context: usize) -> DecodeShape {
    let qd = p.heads * p.head_dim;
    DecodeShape {
        num_seqs: seqs,
        hq: p.heads,
        hk: p.kv_heads,
        head_dim: p.head_dim,
        block_size: BLOCK_SIZE,
        max_blocks,
        max_context,
        ld_q: qd,
        ld_o: qd,
    }
}

/// One sequence's part of a step: its new tokens, the number of tokens its cache already holds (the
/// position of the first new token) and its block table, which must already cover `start + tokens.len()`.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub blocks: &'a [u32],
}

/// How a step attends: prefill chunks through the paged flash kernel, or one token per sequence through the
/// split-K decode kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Prefill { tokens: usize, max_q: usize },
    Decode,
}

/// Where each per-step input sits in the step buffer (u32 words; i32 fields stored as their bits):
/// ids, positions, slots `[tokens]` each, then cu_q `[seqs + 1]`, context lengths `[seqs]` and the block
/// tables `[seqs, max_blocks]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLayout {
    pub tokens: usize,
    pub seqs: usize,
    pub max_blocks: usize,
}

impl StepLayout {
    fn ids(&self) -> usize {
        0
    }
    fn positions(&self) -> usize {
        self.tokens
    }
    fn slots(&self) -> usize {
        2 * self.tokens
    }
    fn cu_q(&self) -> usize {
        3 * self.tokens
    }
    fn context_lens(&self) -> usize {
        self.cu_q() + self.seqs + 1
    }
    fn block_tables(&self) -> usize {
        self.context_lens() + self.seqs
    }
    pub fn len(&self) -> usize {
        self.block_tables() + self.seqs * self.max_blocks
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Packs `seqs` into `out` (laid out by `lay`), padded to `rows_to` sequences (padding rows: token 0 at
/// position 0, no cache write, context 1 on block 0; their outputs are ignored). Appends each sequence's
/// last row to `ends`. Returns the number of token rows. Pure and allocation-free; tested without a GPU.
pub fn pack_into(
    seqs: &[SeqInput],
    rows_to: usize,
    max_context: usize,
    lay: StepLayout,
    out: &mut [u32],
    ends: &mut Vec<usize>,
) -> Result<usize> {
    if out.len() < lay.len() {
        return Err(Error::Invalid("gpu step: staging buffer shorter than its layout".into()));
    }
    let rows = rows_to.max(seqs.len());
    let tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum::<usize>() + (rows - seqs.len());
    if tokens > lay.tokens || rows > lay.seqs {
        return Err(Error::Invalid(format!(
            "gpu step: {tokens} tokens of {rows} sequences exceed the workspace ({} tokens, {} sequences)",
            lay.tokens, lay.seqs
        )));
    }
    let mb = lay.max_blocks;
    ends.clear();
    let mut row = 0;
    out[lay.cu_q()] = 0;
    for i in 0..rows {
        let (toks, start, blocks): (&[u32], usize, &[u32]) = match seqs.get(i) {
            Some(s) => (s.tokens, s.start, s.blocks),
            None => (&[0], 0, &[]),
        };
        let pad = i >= seqs.len();
        let end = start + toks.len();
        if toks.is_empty() {
            return Err(Error::Invalid(format!("gpu step: sequence {i} has no new tokens")));
        }
        if end > max_context {
            return Err(Error::Invalid(format!(
                "gpu step: sequence {i} reaches {end} tokens, over the workspace's context limit {max_context}"
            )));
        }
        let need = end.div_ceil(BLOCK_SIZE);
        if !pad && (blocks.len() < need || blocks.len() > mb) {
            return Err(Error::Invalid(format!(
                "gpu step: sequence {i} needs {need} blocks for {end} tokens, its table has {} (limit {mb})",
                blocks.len()
            )));
        }
        for (j, &id) in toks.iter().enumerate() {
            let pos = start + j;
            out[lay.ids() + row] = id;
            out[lay.positions() + row] = pos as i32 as u32;
            out[lay.slots() + row] = if pad {
                -1i32 as u32
            } else {
                (blocks[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + pos % BLOCK_SIZE) as i32 as u32
            };
            row += 1;
        }
        if !pad {
            ends.push(row - 1);
        }
        out[lay.cu_q() + i + 1] = row as u32;
        out[lay.context_lens() + i] = if pad { 1 } else { end as u32 };
        let bt = &mut out[lay.block_tables() + i * mb..lay.block_tables() + (i + 1) * mb];
        bt[..blocks.len()].copy_from_slice(blocks);
        bt[blocks.len()..].fill(0);
    }
    Ok(row)
}

/// Batch sizes decode graphs are captured for; a step of `b` sequences replays the smallest bucket >= b.
pub const DECODE_BUCKETS: [usize; 10] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 128];

pub fn bucket(b: usize) -> Option<usize> {
    DECODE_BUCKETS.iter().copied().find(|&x| x >= b)
}

/// Captured decode steps, one per bucket, valid for one (model, cache, workspace) triple.
#[derive(Default)]
pub struct DecodeGraphs {
    graphs: HashMap<usize, CudaGraph>,
}

impl DecodeGraphs {
    pub fn captured(&self) -> usize {
        self.graphs.len()
    }
}

impl GpuQwen2 {
    /// Runs one prefill step for `seqs` (each its chunk of new tokens), writing their k/v into the cache,
    /// and returns the greedy next token of each sequence (the argmax of its last row's logits).
    /// `image`: image features `[k, D]` to place at the rows listed (row indices into the step's tokens).
    pub fn prefill(
        &self,
        dev: &CudaDevice,
        kv: &mut GpuKvCache,
        ws: &mut Workspace,
        seqs: &[SeqInput],
        image: Option<(&CudaView<'_, bf16>, &[i32])>,
    ) -> Result<Vec<u32>> {
        let t = self.stage(dev, ws, seqs, seqs.len())?;
        let max_q = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
        self.body(dev, kv, ws, seqs.len(), Mode::Prefill { tokens: t, max_q }, image)?;
        self.read_ids(dev, ws, seqs.len())
    }

    /// One decode step: one new token per sequence; returns each sequence's greedy next token. With
    /// `graphs`, the step replays (capturing on first use) the CUDA graph of the smallest bucket that holds
    /// the batch; without, it launches kernel by kernel.
    pub fn decode(
        &self,
        dev: &CudaDevice,
        kv: &mut GpuKvCache,
        ws: &mut Workspace,
        seqs: &[SeqInput],
        graphs: Option<&mut DecodeGraphs>,
    ) -> Result<Vec<u32>> {
        if seqs.iter().any(|s| s.tokens.len() != 1) {
            return Err(Error::Invalid("gpu decode: every sequence takes exactly one token".into()));
        }
        let b = seqs.len();
        if b > ws.max_seqs || b > ws.max_tokens {
            return Err(Error::Invalid(format!("gpu decode: batch {b} exceeds the workspace ({})", ws.max_seqs)));
        }
        // The bucket's graph when one holds the batch within the workspace; past the largest bucket, eager.
        let (rows, graphs) = match (graphs, bucket(b)) {
            (Some(g), Some(r)) if r <= ws.max_seqs && r <= ws.max_tokens => (r, Some(g)),
            _ => (b, None),
        };
        self.stage(dev, ws, seqs, rows)?;
        match graphs {
            None => self.body(dev, kv, ws, rows, Mode::Decode, None)?,
            Some(g) => {
                if let std::collections::hash_map::Entry::Vacant(slot) = g.graphs.entry(rows) {
                    guarded("begin capture", || {
                        dev.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    })?;
                    let body = self.body(dev, kv, ws, rows, Mode::Decode, None);
                    let graph = guarded("end capture", || {
                        dev.stream
                            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
                    });
                    body?;
                    let graph = graph?.ok_or_else(|| Error::Invalid("gpu decode: graph capture was empty".into()))?;
                    slot.insert(graph);
                }
                let graph = &g.graphs[&rows];
                guarded("launch decode graph", || graph.launch())?;
            }
        }
        self.read_ids(dev, ws, b)
    }

    /// The logits `[b, vocab]` of the last step's first `b` sequences (for checks; copies to the host).
    pub fn last_logits(&self, dev: &CudaDevice, ws: &Workspace, b: usize) -> Result<Vec<f32>> {
        let v = buffer::download(dev, &ws.logits.slice(0..b * self.p.vocab))?;
        Ok(v.iter().map(|x| x.to_f32()).collect())
    }

    /// Packs the step's inputs on the host and uploads them with one copy; returns the token rows.
    fn stage(&self, dev: &CudaDevice, ws: &mut Workspace, seqs: &[SeqInput], rows: usize) -> Result<usize> {
        let t = pack_into(seqs, rows, ws.max_context, ws.lay, &mut ws.staging, &mut ws.ends)?;
        guarded("upload step", || dev.stream.memcpy_htod(&ws.staging, &mut ws.step))?;
        Ok(t)
    }

    /// The sampled ids of the first `b` rows, and the kernels' error word (one copy, which also waits for the
    /// step to finish).
    fn read_ids(&self, dev: &CudaDevice, ws: &Workspace, b: usize) -> Result<Vec<u32>> {
        let all = buffer::download(dev, &ws.out)?;
        let err = all[ws.max_seqs];
        if err != 0 {
            return Err(Error::Invalid(format!(
                "gpu step: the kernels flagged bad input ({})",
                cuda::embed::describe_error_word(err).join(", ")
            )));
        }
        Ok(all[..b].to_vec())
    }

    /// Every kernel of a step over `seqs` sequences whose inputs are in `ws`. No host synchronisation and no
    /// allocation, so a decode step can be captured.
    fn body(
        &self,
        dev: &CudaDevice,
        kv: &mut GpuKvCache,
        ws: &mut Workspace,
        seqs: usize,
        mode: Mode,
        image: Option<(&CudaView<'_, bf16>, &[i32])>,
    ) -> Result<()> {
        let p = &self.p;
        let (dm, d, inter) = (p.hidden, p.head_dim, p.intermediate);
        let (qd, w) = (p.heads * d, (p.heads + 2 * p.kv_heads) * d);
        let t = match mode {
            Mode::Prefill { tokens, .. } => tokens,
            Mode::Decode => seqs,
        };
        let scale = (d as f32).powf(-0.5);
        let ms = ws.max_seqs;
        // The decode GEMV experiment, for decode steps only (prefill chunks stay on cuBLASLt).
        let gemv = self.decode_gemv && mode == Mode::Decode;
        let lay = ws.lay;
        // SAFETY: u32 and i32 have one size and alignment and every bit pattern is valid for both; the i32
        // fields were staged as their bits.
        let step_i32 = unsafe { ws.step.transmute::<i32>(ws.step.len()) }
            .ok_or_else(|| Error::Invalid("gpu step: step buffer view".into()))?;
        let step_u32 = ws.step.as_view();
        let ids = step_u32.slice(lay.ids()..lay.ids() + t);
        let positions = step_i32.slice(lay.positions()..lay.positions() + t);
        let slots = step_i32.slice(lay.slots()..lay.slots() + t);
        let cu_q = step_u32.slice(lay.cu_q()..lay.cu_q() + seqs + 1);
        let context_lens = step_u32.slice(lay.context_lens()..lay.context_lens() + seqs);
        let block_tables = step_u32.slice(lay.block_tables()..lay.block_tables() + seqs * ws.max_blocks);
        cuda::embed::embedding_gather_bf16(
            dev,
            &ids,
            &self.embed.as_view(),
            p.vocab,
            dm,
            &mut ws.h.slice_mut(0..t * dm),
            &mut ws.out.slice_mut(ms..ms + 1),
        )?;
        if let Some((features, rows)) = image {
            if rows.len() > t {
                return Err(Error::Invalid(format!("gpu prefill: {} image rows for {t} tokens", rows.len())));
            }
            guarded("upload image rows", || dev.stream.memcpy_htod(rows, &mut ws.image_rows.slice_mut(0..rows.len())))?;
            cuda::embed::scatter_rows_bf16(
                dev,
                &ws.image_rows.slice(0..rows.len()),
                features,
                &mut ws.h.slice_mut(0..t * dm),
                t,
                dm,
                &mut ws.out.slice_mut(ms..ms + 1),
            )?;
        }
        cuda::norm::rms_norm_bf16(
            dev,
            &ws.h.slice(0..t * dm),
            &self.layers[0].input_norm.as_view(),
            &mut ws.y.slice_mut(0..t * dm),
            t,
            dm,
            p.eps,
        )?;
        for (li, layer) in self.layers.iter().enumerate() {
            layer.qkv.forward_decode(
                dev,
                &ws.y.slice(0..t * dm),
                dm,
                &mut ws.qkv.slice_mut(0..t * w),
                w,
                t,
                gemv,
                false,
            )?;
            {
                let shape = RopeKvShape { tokens: t, heads: p.heads, kv_heads: p.kv_heads, head_dim: d };
                let inp = RopeKvInputs {
                    qkv: &ws.qkv.slice(0..t * w),
                    bias: Some(&layer.qkv_bias.as_view()),
                    positions: &positions,
                    inv_freq: &self.inv_freq.as_view(),
                    slots: &slots,
                };
                let (kc, vc) = (&mut kv.k[li], &mut kv.v[li]);
                let mut outs = RopeKvOutputs {
                    q: &mut ws.q.slice_mut(0..t * qd),
                    k_cache: &mut kc.as_view_mut(),
                    v_cache: &mut vc.as_view_mut(),
                    kv: None,
                    err: &mut ws.out.slice_mut(ms..ms + 1),
                };
                qkv_bias_rope_write_kv_bf16(dev, shape, &inp, &mut outs)?;
            }
            match mode {
                Mode::Prefill { tokens, max_q } => {
                    let shape = PagedPrefillShape {
                        num_seqs: seqs,
                        total_q: tokens,
                        max_q_len: max_q,
                        hq: p.heads,
                        hk: p.kv_heads,
                        head_dim: d,
                        block_size: BLOCK_SIZE,
                        max_blocks: ws.max_blocks,
                        ld_q: qd,
                        ld_o: qd,
                    };
                    let inp = PagedPrefillInputs {
                        q: &ws.q.slice(0..t * qd),
                        k_cache: &kv.k[li].as_view(),
                        v_cache: &kv.v[li].as_view(),
                        block_tables: &block_tables,
                        cu_q: &cu_q,
                        context_lens: &context_lens,
                    };
                    flash_attn_paged_prefill_bf16(dev, &inp, &mut ws.attn.slice_mut(0..t * qd), shape, scale)?;
                }
                Mode::Decode => {
                    let shape = decode_shape(p, seqs, ws.max_blocks, ws.max_context);
                    let inp = DecodeInputs {
                        q: &ws.q.slice(0..t * qd),
                        k_cache: &kv.k[li].as_view(),
                        v_cache: &kv.v[li].as_view(),
                        block_tables: &block_tables,
                        context_lens: &context_lens,
                    };
                    let need = shape.workspace_len();
                    let mut dws = ws.decode_ws.slice_mut(0..need.max(1));
                    let dws = if need == 0 { None } else { Some(&mut dws) };
                    paged_attention_decode_bf16(dev, &inp, &mut ws.attn.slice_mut(0..t * qd), dws, shape, scale)?;
                }
            }
            layer.o.forward_decode(
                dev,
                &ws.attn.slice(0..t * qd),
                qd,
                &mut ws.o.slice_mut(0..t * dm),
                dm,
                t,
                gemv,
                false,
            )?;
            cuda::norm::add_rms_norm_bf16(
                dev,
                &mut ws.h.slice_mut(0..t * dm),
                &ws.o.slice(0..t * dm),
                &layer.post_norm.as_view(),
                &mut ws.y.slice_mut(0..t * dm),
                t,
                dm,
                p.eps,
            )?;
            layer.gate_up.forward_decode(
                dev,
                &ws.y.slice(0..t * dm),
                dm,
                &mut ws.gu.slice_mut(0..t * 2 * inter),
                2 * inter,
                t,
                gemv,
                false,
            )?;
            if gemv && super::gemv_applies(t, inter, 2 * inter) {
                // silu(gate) * up is computed inside the down projection: one launch fewer.
                let (gu, o) = (&ws.gu.slice(0..t * 2 * inter), &mut ws.o.slice_mut(0..t * dm));
                layer.down.forward_decode(dev, gu, 2 * inter, o, dm, t, true, true)?;
            } else {
                cuda::elementwise::silu_mul_fused_bf16(
                    dev,
                    &ws.gu.slice(0..t * 2 * inter),
                    &mut ws.m.slice_mut(0..t * inter),
                    t,
                    inter,
                )?;
                let (m, o) = (&ws.m.slice(0..t * inter), &mut ws.o.slice_mut(0..t * dm));
                layer.down.forward_decode(dev, m, inter, o, dm, t, gemv, false)?;
            }
            let next = self.layers.get(li + 1).map_or(&self.norm, |l| &l.input_norm);
            cuda::norm::add_rms_norm_bf16(
                dev,
                &mut ws.h.slice_mut(0..t * dm),
                &ws.o.slice(0..t * dm),
                &next.as_view(),
                &mut ws.y.slice_mut(0..t * dm),
                t,
                dm,
                p.eps,
            )?;
        }
        // Logits of each sequence's last row only.
        let last = match mode {
            Mode::Decode => ws.y.slice(0..seqs * dm),
            Mode::Prefill { .. } => {
                // Rows of the last token of each sequence; copied into `last` (a handful of rows).
                for (i, &r) in ws.ends.iter().enumerate() {
                    guarded("gather last rows", || {
                        dev.stream.memcpy_dtod(
                            &ws.y.slice(r * dm..(r + 1) * dm),
                            &mut ws.last.slice_mut(i * dm..(i + 1) * dm),
                        )
                    })?;
                }
                ws.last.slice(0..seqs * dm)
            }
        };
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let shape = LinearShape::dense(seqs, p.vocab, dm);
        dev.blas.linear(&last, &head.as_view(), None, &mut ws.logits.slice_mut(0..seqs * p.vocab), shape)?;
        cuda::sampling::argmax_rows(
            dev,
            &ws.logits.slice(0..seqs * p.vocab),
            seqs,
            p.vocab,
            &mut ws.out.slice_mut(0..seqs),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(seqs: &[SeqInput], rows: usize, lay: StepLayout, max_context: usize) -> Result<(Vec<u32>, Vec<usize>)> {
        let mut out = vec![0xDEAD_BEEF; lay.len()];
        let mut ends = Vec::new();
        let t = pack_into(seqs, rows, max_context, lay, &mut out, &mut ends)?;
        assert!(t <= lay.tokens);
        Ok((out, ends))
    }

    #[test]
    fn pack_lays_out_slots_tables_and_padding() {
        let blocks_a = [7u32, 3];
        let blocks_b = [5u32];
        let seqs = [
            SeqInput { tokens: &[11, 12, 13], start: 14, blocks: &blocks_a },
            SeqInput { tokens: &[21], start: 0, blocks: &blocks_b },
        ];
        let lay = StepLayout { tokens: 6, seqs: 3, max_blocks: 4 };
        let (o, ends) = packed(&seqs, 3, lay, 64).expect("valid");
        assert_eq!(&o[0..5], &[11, 12, 13, 21, 0]);
        assert_eq!(&o[6..11], &[14, 15, 16, 0, 0]);
        // Position 14, 15 in block 7 (slots 7*16+14, +15), position 16 in block 3 slot 0; padding skips (-1).
        assert_eq!(&o[12..17], &[126, 127, 48, 80, u32::MAX]);
        assert_eq!(&o[18..22], &[0, 3, 4, 5]);
        assert_eq!(&o[22..25], &[17, 1, 1]);
        assert_eq!(&o[25..37], &[7, 3, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ends, vec![2, 3]);
        assert_eq!(lay.len(), 37);
    }

    #[test]
    fn pack_refuses_short_tables_long_contexts_and_overflow() {
        let lay = StepLayout { tokens: 4, seqs: 2, max_blocks: 4 };
        let b = [1u32];
        assert!(packed(&[SeqInput { tokens: &[1], start: 16, blocks: &b }], 1, lay, 64).is_err());
        assert!(packed(&[SeqInput { tokens: &[1], start: 63, blocks: &[1, 2, 3, 4] }], 1, lay, 63).is_err());
        assert!(packed(&[SeqInput { tokens: &[], start: 0, blocks: &b }], 1, lay, 64).is_err());
        assert!(packed(&[SeqInput { tokens: &[1; 5], start: 0, blocks: &b }], 1, lay, 64).is_err());
        let one = SeqInput { tokens: &[1], start: 0, blocks: &b };
        assert!(packed(&[one, one, one], 3, lay, 64).is_err());
    }

    #[test]
    fn buckets_cover_every_batch_up_to_128() {
        for b in 1..=128 {
            let r = bucket(b).expect("bucket");
            assert!(r >= b && r < 2 * b + 8, "{b} -> {r}");
        }
        assert_eq!(bucket(129), None);
    }
}
