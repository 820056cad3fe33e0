//! Generation on the GPU (feature `cuda`): `GpuBatchModel`, the GPU models (vision tower, chunked prefill
//! and graph-replayed decode on one device, with their KV cache and workspace) as the `BatchModel` of the
//! batching engine (`engine::batch`), which `generate`, `chat` and `serve` all run on with `--device cuda`.

use half::bf16;

use crate::backend::cuda::CudaDevice;
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
    /// Exactly this many KV blocks instead (never more than the fraction allows).
    pub kv_blocks: Option<usize>,
    /// Replay decode steps from CUDA graphs.
    pub graphs: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            max_seqs: 64,
            max_context: 8192,
            prefill_chunk: 512,
            kv_fraction: 0.8,
            kv_blocks: None,
            graphs: true,
        }
    }
}

/// What the GPU engine loads: the models on the device and a workspace sized by `opts`.
struct Loaded {
    text: TextParams,
    /// Tokens per sequence at most: `opts.max_context` within the model's positions.
    context: usize,
    vision: Option<GpuVision>,
    llm: GpuQwen2,
    ws: Workspace,
    image_token_id: u32,
}

fn load_models(dev: &CudaDevice, config: &ModelConfig, src: &WeightSource, opts: &GpuOptions) -> Result<Loaded> {
    if opts.max_seqs == 0 || opts.max_context == 0 || opts.prefill_chunk == 0 {
        return Err(Error::Invalid("gpu engine: max_seqs, max_context and prefill_chunk must be positive".into()));
    }
    let text = TextParams::from_config(config.text(), config.tie_word_embeddings())?;
    let context = opts.max_context.min(text.max_position);
    let (vision, image_token_id) = match config.internvl() {
        Some(ivl) => {
            let vp = VisionParams::from_config(&ivl.vision_config)?;
            (Some(GpuVision::load(src, dev, &vp, text.hidden)?), ivl.image_token_id)
        }
        None => (None, u32::MAX),
    };
    let llm = GpuQwen2::load(src, dev, &text, "model.language_model")?;
    let ws = Workspace::new(dev, &text, opts.prefill_chunk, opts.max_seqs, context)?;
    Ok(Loaded { text, context, vision, llm, ws, image_token_id })
}

/// The KV cache: `opts.kv_fraction` of the memory left (keeping what the vision tower needs for one 13-tile
/// request free beside it), at most `opts.kv_blocks` blocks.
fn new_cache(dev: &CudaDevice, text: &TextParams, opts: &GpuOptions) -> Result<GpuKvCache> {
    let reserve = 2 << 30;
    let blocks = GpuKvCache::blocks_for(dev, text, opts.kv_fraction, reserve)?;
    let blocks = opts.kv_blocks.map_or(blocks, |n| n.min(blocks));
    if blocks == 0 {
        return Err(Error::Invalid("gpu engine: no device memory left for the KV cache".into()));
    }
    GpuKvCache::new(dev, text, blocks)
}

/// The GPU models as the server engine's `BatchModel` (`engine::batch`): the scheduler there (admission,
/// chunked prefill, preemption, prefix reuse, streaming) counts the KV blocks in an accounting pool and this
/// model keeps them in its device cache under the same ids. Each pass runs the decode rows as one decode
/// step (replayed from a CUDA graph) and the prefill chunks as one prefill step; greedy rows take the
/// device's argmax, and logits are copied back only for rows that sample on the host.
///
/// Build it on the engine thread (`EngineHandle::spawn_with`): the device context is used from there only.
pub struct GpuBatchModel {
    dev: CudaDevice,
    vision: Option<GpuVision>,
    llm: GpuQwen2,
    state: std::cell::RefCell<GpuBatchState>,
    image_token_id: u32,
    context: usize,
    blocks: usize,
}

struct GpuBatchState {
    kv: GpuKvCache,
    ws: Workspace,
    graphs: Option<DecodeGraphs>,
}

impl GpuBatchModel {
    /// Loads the weights from `src` onto `dev` and sizes the workspace for `opts.max_seqs` sequences, prefill
    /// steps of `opts.prefill_chunk` tokens and contexts of `opts.max_context`, and the cache from
    /// `opts.kv_fraction` of the memory left.
    pub fn load(dev: CudaDevice, config: &ModelConfig, src: &WeightSource, opts: &GpuOptions) -> Result<Self> {
        let Loaded { text, context, vision, llm, ws, image_token_id } = load_models(&dev, config, src, opts)?;
        let kv = new_cache(&dev, &text, opts)?;
        let blocks = kv.num_blocks();
        let graphs = opts.graphs.then(DecodeGraphs::default);
        let state = std::cell::RefCell::new(GpuBatchState { kv, ws, graphs });
        Ok(GpuBatchModel { dev, vision, llm, state, image_token_id, context, blocks })
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Sequences one decode step takes at most, and prompt tokens one prefill step takes at most.
    pub fn step_limits(&self) -> (usize, usize) {
        let st = self.state.borrow();
        (st.ws.max_seqs, st.ws.max_tokens)
    }
}

impl crate::engine::batch::BatchModel for GpuBatchModel {
    fn context(&self) -> usize {
        self.context
    }
    fn vocab(&self) -> usize {
        self.llm.params().vocab
    }
    fn image_token_id(&self) -> u32 {
        self.image_token_id
    }
    fn kv_shape(&self) -> (usize, usize, usize) {
        let p = self.llm.params();
        (p.layers, p.kv_heads, p.head_dim)
    }
    fn device_kv(&self) -> Option<crate::engine::batch::DeviceKv> {
        Some(crate::engine::batch::DeviceKv { blocks: self.blocks, block_size: BLOCK_SIZE })
    }
    fn encode_images(&self, pixel_values: &crate::tensor::Tensor) -> Result<crate::tensor::Tensor> {
        let v = self.vision.as_ref().ok_or_else(|| Error::Invalid("this model takes no images".into()))?;
        let tiles = pixel_values.shape().first().copied().unwrap_or(0);
        let f = v.forward_host(&self.dev, pixel_values.f32s()?, tiles)?;
        let d = self.llm.params().hidden;
        let host = crate::backend::cuda::buffer::download(&self.dev, &f.features)?;
        let rows = host.len() / d;
        crate::tensor::Tensor::from_f32([rows, d], host.iter().map(|x| x.to_f32()).collect())
    }
    fn forward_batch(
        &self,
        inputs: &[crate::model::facellm::BatchInput],
        kv: &mut dyn crate::model::llm::BatchKvStore,
        _row_invariant: bool,
    ) -> Result<crate::engine::batch::BatchOutput> {
        let mut st = self.state.borrow_mut();
        let GpuBatchState { kv: cache, ws, graphs } = &mut *st;
        let (dev, d) = (&self.dev, self.llm.params().hidden);
        // Bookkeeping first: every table grows, then the copy-on-write copies run before any write.
        let mut held = Vec::with_capacity(inputs.len());
        let mut tables = Vec::with_capacity(inputs.len());
        for (i, inp) in inputs.iter().enumerate() {
            held.push(kv.held(i));
            kv.reserve(i, inp.ids.len())?;
            tables.push(kv.blocks(i)?.to_vec());
        }
        for (src, dst) in kv.take_copies() {
            cache.copy_block(dev, src, dst)?;
        }
        let plan = crate::engine::batch::plan_device_pass(inputs, &held, self.image_token_id, d)?;
        let seq = |i: usize| SeqInput { tokens: inputs[i].ids, start: held[i], blocks: &tables[i] };
        // Per input: the argmax of its last row and, for rows sampled on the host, its logits.
        let mut argmax = vec![0u32; inputs.len()];
        let mut logits: Vec<Option<Vec<f32>>> = vec![None; inputs.len()];
        let vocab = self.llm.params().vocab;
        let mut keep_logits = |idx: &[usize], ws: &Workspace, ids: Vec<u32>| -> Result<()> {
            let host = idx.iter().any(|&i| inputs[i].logits && !inputs[i].greedy);
            let all = if host { Some(self.llm.last_logits(dev, ws, idx.len())?) } else { None };
            for (k, &i) in idx.iter().enumerate() {
                argmax[i] = ids[k];
                if let Some(all) = &all {
                    logits[i] = Some(all[k * vocab..(k + 1) * vocab].to_vec());
                }
            }
            Ok(())
        };
        if !plan.decode.is_empty() {
            let seqs: Vec<SeqInput> = plan.decode.iter().map(|&i| seq(i)).collect();
            let ids = self.llm.decode(dev, cache, ws, &seqs, graphs.as_mut())?;
            keep_logits(&plan.decode, ws, ids)?;
        }
        if !plan.prefill.is_empty() {
            let seqs: Vec<SeqInput> = plan.prefill.iter().map(|&i| seq(i)).collect();
            let ids = if plan.image_rows.is_empty() {
                self.llm.prefill(dev, cache, ws, &seqs, None)?
            } else {
                let feats: Vec<bf16> = plan.features.iter().map(|&x| bf16::from_f32(x)).collect();
                let f = crate::backend::cuda::buffer::upload(dev, &feats)?;
                self.llm.prefill(dev, cache, ws, &seqs, Some((&f.as_view(), &plan.image_rows)))?
            };
            keep_logits(&plan.prefill, ws, ids)?;
        }
        for (i, inp) in inputs.iter().enumerate() {
            kv.commit(i, inp.ids.len())?;
        }
        // Rows in input order, for the inputs that asked.
        let wanted: Vec<usize> = (0..inputs.len()).filter(|&i| inputs[i].logits).collect();
        let host_rows = wanted.iter().any(|&i| !inputs[i].greedy);
        let logits = if host_rows {
            let mut all = Vec::with_capacity(wanted.len() * vocab);
            for &i in &wanted {
                match &logits[i] {
                    Some(l) => all.extend_from_slice(l),
                    None => return Err(Error::Invalid("gpu engine: logits of a row were not kept".into())),
                }
            }
            Some(crate::tensor::Tensor::from_f32([wanted.len(), vocab], all)?)
        } else {
            None
        };
        Ok(crate::engine::batch::BatchOutput { logits, argmax: Some(wanted.iter().map(|&i| argmax[i]).collect()) })
    }
}
