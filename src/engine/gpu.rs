//! Generation on the GPU (feature `cuda`): the scheduler of `engine::schedule` driving the GPU models.
//! `GpuStep` is the `StepModel` (vision tower, chunked prefill and graph-replayed decode on one device, with
//! its KV cache and workspace); `GpuGenerator` sizes the cache from free device memory and runs requests.

use std::ops::Range;

use cudarc::driver::CudaSlice;
use half::bf16;

use super::schedule::{self, Limits, SeqInput, StepModel};
use crate::backend::cuda::CudaDevice;
use crate::config::ModelConfig;
use crate::model::gpu::llm::{DecodeGraphs, GpuKvCache, GpuQwen2, Workspace, BLOCK_SIZE};
use crate::model::gpu::vision::GpuVision;
use crate::model::gpu::WeightSource;
use crate::model::llm::TextParams;
use crate::model::vision::VisionParams;
use crate::{Error, Result};

pub use schedule::{Output as GpuOutput, Request as GpuRequest};

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

/// The GPU models, their KV cache and workspace, as the scheduler's `StepModel`.
pub struct GpuStep<'d> {
    dev: &'d CudaDevice,
    vision: Option<GpuVision>,
    llm: GpuQwen2,
    kv: GpuKvCache,
    ws: Workspace,
    graphs: Option<DecodeGraphs>,
    image_token_id: u32,
}

impl StepModel for GpuStep<'_> {
    type Features = CudaSlice<bf16>;

    fn block_size(&self) -> usize {
        BLOCK_SIZE
    }
    fn prefill_chunk(&self) -> usize {
        self.ws.max_tokens
    }
    fn image_token_id(&self) -> u32 {
        self.image_token_id
    }
    fn encode_images(&mut self, pixels: &[f32], tiles: usize) -> Result<(CudaSlice<bf16>, usize)> {
        let v = self.vision.as_ref().ok_or_else(|| Error::Invalid("this model takes no images".into()))?;
        let f = v.forward_host(self.dev, pixels, tiles)?;
        let rows = f.features.len() / self.llm.params().hidden;
        Ok((f.features, rows))
    }
    fn prefill(&mut self, seq: SeqInput, image: Option<(&CudaSlice<bf16>, Range<usize>, &[i32])>) -> Result<u32> {
        let d = self.llm.params().hidden;
        let seqs = [seq];
        let next = match image {
            Some((f, range, rows)) => {
                let view = f.slice(range.start * d..range.end * d);
                self.llm.prefill(self.dev, &mut self.kv, &mut self.ws, &seqs, Some((&view, rows)))?
            }
            None => self.llm.prefill(self.dev, &mut self.kv, &mut self.ws, &seqs, None)?,
        };
        Ok(next[0])
    }
    fn decode(&mut self, seqs: &[SeqInput]) -> Result<Vec<u32>> {
        self.llm.decode(self.dev, &mut self.kv, &mut self.ws, seqs, self.graphs.as_mut())
    }
    fn last_logits(&mut self, b: usize) -> Result<Vec<f32>> {
        self.llm.last_logits(self.dev, &self.ws, b)
    }
    fn synchronize(&mut self) -> Result<()> {
        Ok(self.dev.synchronize()?)
    }
}

pub struct GpuGenerator<'d> {
    step: GpuStep<'d>,
    limits: Limits,
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
        let graphs = opts.graphs.then(DecodeGraphs::default);
        let step = GpuStep { dev, vision, llm, kv, ws, graphs, image_token_id };
        Ok(GpuGenerator { step, limits: Limits { max_seqs: opts.max_seqs, max_context, num_blocks: blocks } })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Runs every request to completion (see `engine::schedule::run`); every KV block is free afterwards.
    pub fn generate(
        &mut self,
        reqs: &[GpuRequest],
        decode: &dyn Fn(&[u32]) -> Result<String>,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<GpuOutput>> {
        schedule::run(&mut self.step, self.limits, reqs, decode, on_text)
    }
}
