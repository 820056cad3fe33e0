//! Generation on the GPU (feature `cuda`): many requests, one model, one paged KV cache.
//!
//! The scheduler is deliberately simple and allocation-light: requests are admitted oldest first while the
//! batch has a free row and the pool has the blocks for the whole request (prompt + answer budget,
//! reserved up front, so a running sequence never stalls or gets preempted); each admitted request's
//! images go through the vision tower, its prompt through chunked prefill; then every active sequence
//! decodes together, one token per step, replayed from the CUDA graph of its batch bucket. Sequences finish
//! independently (EOS, stop string, budget, context) and free their blocks at once, which lets the next
//! waiting request in on the following step.
//!
//! Greedy decoding takes the GPU's argmax; sampled decoding copies each row's logits to the host and draws
//! with the CPU `Sampler`, so a seed gives the same answer on both backends.

use std::collections::VecDeque;
use std::time::Instant;

use super::generate::{FinishReason, GenerateOptions};
use super::stop::{StopMatcher, StopState};
use crate::backend::cuda::CudaDevice;
use crate::backend::Sampler;
use crate::config::ModelConfig;
use crate::model::gpu::llm::{DecodeGraphs, GpuKvCache, GpuQwen2, SeqInput, Workspace, BLOCK_SIZE};
use crate::model::gpu::vision::GpuVision;
use crate::model::gpu::WeightSource;
use crate::model::llm::TextParams;
use crate::model::vision::VisionParams;
use crate::{Error, Result};

/// Sizes of the GPU engine.
#[derive(Debug, Clone)]
pub struct GpuOptions {
    /// Sequences decoding together at most.
    pub max_seqs: usize,
    /// Tokens per sequence at most (prompt + answer).
    pub max_context: usize,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
    /// Fraction of the device memory free after loading that the KV cache may take.
    pub kv_fraction: f64,
    /// Replay decode steps from CUDA graphs.
    pub graphs: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions { max_seqs: 64, max_context: 8192, prefill_chunk: 512, kv_fraction: 0.8, graphs: true }
    }
}

/// One request: prompt ids (image tokens expanded) and the tiles of its images, `[tiles, 3, S, S]` f32.
pub struct GpuRequest {
    pub ids: Vec<u32>,
    pub pixels: Option<(Vec<f32>, usize)>,
    pub opts: GenerateOptions,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuOutput {
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub vision_ms: f64,
    /// Admission to first token (vision + prefill).
    pub ttft_ms: f64,
    pub decode_ms: f64,
}

struct Active {
    req: usize,
    /// Every token of the sequence: prompt, then the answer.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    cached: usize,
    blocks: Vec<u32>,
    stop: StopMatcher,
    sampler: Option<Sampler>,
    started: Instant,
    first_token: Option<Instant>,
    vision_ms: f64,
    text: String,
}

pub struct GpuGenerator<'d> {
    dev: &'d CudaDevice,
    vision: Option<GpuVision>,
    llm: GpuQwen2,
    kv: GpuKvCache,
    ws: Workspace,
    graphs: DecodeGraphs,
    free: Vec<u32>,
    image_token_id: u32,
    opts: GpuOptions,
}

impl<'d> GpuGenerator<'d> {
    pub fn load(dev: &'d CudaDevice, config: &ModelConfig, src: &WeightSource, opts: GpuOptions) -> Result<Self> {
        if opts.max_seqs == 0 || opts.max_context == 0 || opts.prefill_chunk == 0 {
            return Err(Error::Invalid("gpu engine: max_seqs, max_context and prefill_chunk must be positive".into()));
        }
        let text = TextParams::from_config(config.text(), config.tie_word_embeddings())?;
        let max_context = opts.max_context.min(text.max_position);
        let (vision, image_token_id) = match config.internvl() {
            Some(ivl) => {
                let vp = VisionParams::from_config(&ivl.vision_config)?;
                (Some(GpuVision::load(src, dev, &vp, text.hidden)?), ivl.image_token_id)
            }
            None => (None, u32::MAX),
        };
        let llm = GpuQwen2::load(src, dev, &text, "model.language_model")?;
        let ws = Workspace::new(dev, &text, opts.prefill_chunk, opts.max_seqs, max_context)?;
        // What the vision tower needs for one 13-tile request stays free beside the cache.
        let reserve = 2 << 30;
        let blocks = GpuKvCache::blocks_for(dev, &text, opts.kv_fraction, reserve)?;
        let blocks = blocks.min(opts.max_seqs * max_context.div_ceil(BLOCK_SIZE) + 1);
        if blocks == 0 {
            return Err(Error::Invalid("gpu engine: no device memory left for the KV cache".into()));
        }
        let kv = GpuKvCache::new(dev, &text, blocks)?;
        let free = (0..blocks as u32).rev().collect();
        let opts = GpuOptions { max_context, ..opts };
        Ok(GpuGenerator { dev, vision, llm, kv, ws, graphs: DecodeGraphs::default(), free, image_token_id, opts })
    }

    pub fn kv_blocks(&self) -> (usize, usize) {
        (self.kv.num_blocks() - self.free.len(), self.kv.num_blocks())
    }

    /// Runs every request to completion, `max_seqs` at a time; `decode` turns ids into text (for stop
    /// strings and the output), `on_text(request, text)` streams each answer as it becomes final.
    pub fn generate(
        &mut self,
        reqs: &[GpuRequest],
        decode: &dyn Fn(&[u32]) -> Result<String>,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<GpuOutput>> {
        let got = self.run(reqs, decode, on_text);
        // Every sequence ends with the call (finished, or dropped by an error): all blocks are free again.
        self.free = (0..self.kv.num_blocks() as u32).rev().collect();
        got
    }

    fn run(
        &mut self,
        reqs: &[GpuRequest],
        decode: &dyn Fn(&[u32]) -> Result<String>,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<GpuOutput>> {
        let mut waiting: VecDeque<usize> = (0..reqs.len()).collect();
        let mut active: Vec<Active> = Vec::new();
        let mut done: Vec<Option<GpuOutput>> = (0..reqs.len()).map(|_| None).collect();
        for (i, r) in reqs.iter().enumerate() {
            if r.ids.is_empty() {
                return Err(Error::Invalid(format!("request {i}: empty prompt")));
            }
            if r.ids.len() + 1 > self.opts.max_context {
                return Err(Error::Invalid(format!(
                    "request {i}: the prompt has {} tokens; the GPU engine's context is {}",
                    r.ids.len(),
                    self.opts.max_context
                )));
            }
        }
        while !waiting.is_empty() || !active.is_empty() {
            // Admit: oldest first, while a row and the blocks for the whole request are free.
            while active.len() < self.opts.max_seqs {
                let Some(&i) = waiting.front() else { break };
                let r = &reqs[i];
                let total = (r.ids.len() + r.opts.max_new_tokens).min(self.opts.max_context);
                let need = total.div_ceil(BLOCK_SIZE);
                if need > self.kv.num_blocks() {
                    return Err(Error::Invalid(format!(
                        "request {i}: needs {need} KV blocks, the cache has {}",
                        self.kv.num_blocks()
                    )));
                }
                if need > self.free.len() {
                    break;
                }
                waiting.pop_front();
                let blocks: Vec<u32> = (0..need).map(|_| self.free.pop().expect("checked")).collect();
                let seq = self.admit(i, r, blocks, decode, on_text)?;
                match seq {
                    Ok(a) => active.push(a),
                    Err((a, out)) => {
                        self.free.extend(a.blocks.iter().rev());
                        done[i] = Some(out);
                    }
                }
            }
            if active.is_empty() {
                continue;
            }
            // One decode step for every active sequence.
            let last: Vec<[u32; 1]> = active.iter().map(|a| [*a.tokens.last().expect("non-empty")]).collect();
            let seqs: Vec<SeqInput> = active
                .iter()
                .zip(&last)
                .map(|(a, t)| SeqInput { tokens: t, start: a.cached, blocks: &a.blocks })
                .collect();
            let graphs = if self.opts.graphs { Some(&mut self.graphs) } else { None };
            let greedy = self.llm.decode(self.dev, &mut self.kv, &mut self.ws, &seqs, graphs)?;
            let logits = if active.iter().any(|a| a.sampler.is_some()) {
                Some(self.llm.last_logits(self.dev, &self.ws, active.len())?)
            } else {
                None
            };
            let vocab = self.llm.params().vocab;
            let mut finished = Vec::with_capacity(active.len());
            for (k, a) in active.iter_mut().enumerate() {
                a.cached += 1;
                let next = match (&mut a.sampler, &logits) {
                    (Some(s), Some(l)) => s.sample(&l[k * vocab..(k + 1) * vocab], &a.tokens)?,
                    _ => greedy[k],
                };
                finished.push(push_token(a, next, &reqs[a.req].opts, self.opts.max_context, decode, on_text)?);
            }
            for (a, f) in std::mem::take(&mut active).into_iter().zip(finished) {
                match f {
                    Some(reason) => {
                        self.free.extend(a.blocks.iter().rev());
                        done[a.req] = Some(output(&a, reason));
                    }
                    None => active.push(a),
                }
            }
        }
        done.into_iter()
            .enumerate()
            .map(|(i, o)| o.ok_or_else(|| Error::Invalid(format!("request {i} lost"))))
            .collect()
    }

    /// Vision, chunked prefill and the first token of request `i`. `Ok(Err(..))`: it finished on its first
    /// token (EOS, stop string or a budget of one).
    fn admit(
        &mut self,
        i: usize,
        r: &GpuRequest,
        blocks: Vec<u32>,
        decode: &dyn Fn(&[u32]) -> Result<String>,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<std::result::Result<Active, (Active, GpuOutput)>> {
        let started = Instant::now();
        let image_pos: Vec<usize> =
            r.ids.iter().enumerate().filter(|(_, &t)| t == self.image_token_id).map(|(p, _)| p).collect();
        let features = match (&r.pixels, &self.vision) {
            (Some((px, tiles)), Some(v)) => {
                let f = v.forward_host(self.dev, px, *tiles)?;
                if f.features.len() / self.llm.params().hidden != image_pos.len() {
                    return Err(Error::Invalid(format!(
                        "request {i}: the prompt has {} image tokens but its {tiles} tiles give {} feature rows",
                        image_pos.len(),
                        f.features.len() / self.llm.params().hidden
                    )));
                }
                Some(f.features)
            }
            (Some(_), None) => return Err(Error::Invalid(format!("request {i}: this model takes no images"))),
            (None, _) => None,
        };
        self.dev.synchronize()?;
        let vision_ms = started.elapsed().as_secs_f64() * 1e3;
        let d = self.llm.params().hidden;
        let chunk = self.ws.max_tokens;
        let mut first = 0u32;
        let mut start = 0;
        while start < r.ids.len() {
            let end = (start + chunk).min(r.ids.len());
            // Image rows of this chunk (relative) and the feature rows they take, which are consecutive.
            let lo = image_pos.partition_point(|&p| p < start);
            let hi = image_pos.partition_point(|&p| p < end);
            let rows: Vec<i32> = image_pos[lo..hi].iter().map(|&p| (p - start) as i32).collect();
            let seq = [SeqInput { tokens: &r.ids[start..end], start, blocks: &blocks }];
            let next = match (&features, hi > lo) {
                (Some(f), true) => {
                    let view = f.slice(lo * d..hi * d);
                    self.llm.prefill(self.dev, &mut self.kv, &mut self.ws, &seq, Some((&view, &rows)))?
                }
                _ => self.llm.prefill(self.dev, &mut self.kv, &mut self.ws, &seq, None)?,
            };
            first = next[0];
            start = end;
        }
        let p = &r.opts.sampling;
        // Greedy without a repetition penalty is the GPU's argmax; anything else samples on the host.
        let sampler = if p.is_greedy() && p.repetition_penalty == 1.0 { None } else { Some(Sampler::new(p.clone())?) };
        let mut a = Active {
            req: i,
            tokens: r.ids.clone(),
            prompt_len: r.ids.len(),
            cached: r.ids.len(),
            blocks,
            stop: StopMatcher::new(&r.opts.stop_strings),
            sampler,
            started,
            first_token: None,
            vision_ms,
            text: String::new(),
        };
        let first = match &mut a.sampler {
            Some(s) => {
                let l = self.llm.last_logits(self.dev, &self.ws, 1)?;
                s.sample(&l, &r.ids)?
            }
            None => first,
        };
        Ok(match push_token(&mut a, first, &r.opts, self.opts.max_context, decode, on_text)? {
            None => Ok(a),
            Some(reason) => {
                let out = output(&a, reason);
                Err((a, out))
            }
        })
    }
}

/// Appends `next` to the answer and decides whether the sequence is done; streams the text that became
/// final.
fn push_token(
    a: &mut Active,
    next: u32,
    opts: &GenerateOptions,
    max_context: usize,
    decode: &dyn Fn(&[u32]) -> Result<String>,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Option<FinishReason>> {
    if a.first_token.is_none() {
        a.first_token = Some(Instant::now());
    }
    if opts.eos_ids.contains(&next) {
        let tail = a.stop.finish(&a.text);
        if !tail.is_empty() {
            on_text(a.req, &tail);
        }
        return Ok(Some(FinishReason::Stop));
    }
    a.tokens.push(next);
    let text = decode(&a.tokens[a.prompt_len..])?;
    a.text = text;
    match a.stop.update(&a.text) {
        StopState::Stopped { release, text } => {
            if !release.is_empty() {
                on_text(a.req, &release);
            }
            a.text = text;
            return Ok(Some(FinishReason::Stop));
        }
        StopState::Continue { release } => {
            if !release.is_empty() {
                on_text(a.req, &release);
            }
        }
    }
    let produced = a.tokens.len() - a.prompt_len;
    if produced >= opts.max_new_tokens || a.tokens.len() >= max_context {
        let tail = a.stop.finish(&a.text);
        if !tail.is_empty() {
            on_text(a.req, &tail);
        }
        return Ok(Some(FinishReason::Length));
    }
    Ok(None)
}

fn output(a: &Active, reason: FinishReason) -> GpuOutput {
    let first = a.first_token.unwrap_or(a.started);
    GpuOutput {
        ids: a.tokens[a.prompt_len..].to_vec(),
        text: a.text.clone(),
        finish_reason: reason,
        vision_ms: a.vision_ms,
        ttft_ms: (first - a.started).as_secs_f64() * 1e3,
        decode_ms: first.elapsed().as_secs_f64() * 1e3,
    }
}
