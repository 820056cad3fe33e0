//! The batching engine (`engine::batch::Scheduler`) driven on the calling thread for one conversation: the
//! backend of `chat --device cuda` and of `generate --device cuda`. One request per answer, run to its end;
//! the engine's vision cache and prefix cache keep the images' features and the earlier turns' KV blocks.
//! Device-independent, so its tests run it on the CPU model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use facellm::engine::batch::{BatchModel, Event, ImageInput, ImageSource, Request, Scheduler, SeqParams, Slots};
use facellm::engine::{FinishReason, GenerateOptions, GenerateOutput, Timings};
use facellm::tensor::Tensor;
use sha2::Digest as _;

/// One request per turn, run to its end on this thread.
pub struct EngineChat<'m, M: BatchModel> {
    sched: Scheduler<'m, M>,
    slots: Arc<Slots>,
    /// Every image of the conversation: content digest, tiles and pixels (the vision cache holds their
    /// features after the first turn that reaches them).
    images: Vec<([u8; 32], usize, Tensor)>,
    cached: usize,
}

impl<'m, M: BatchModel> EngineChat<'m, M> {
    pub fn new(sched: Scheduler<'m, M>) -> Self {
        EngineChat { sched, slots: Slots::new(1), images: Vec::new(), cached: 0 }
    }

    #[cfg(test)]
    pub fn blocks_in_use(&self) -> usize {
        self.sched.kv_blocks_used()
    }
}

impl<M: BatchModel> super::chat::Backend for EngineChat<'_, M> {
    fn attach(&mut self, pixels: Tensor) -> anyhow::Result<()> {
        let tiles = pixels.shape().first().copied().unwrap_or(0);
        let mut h = sha2::Sha256::new();
        for x in pixels.f32s()? {
            h.update(x.to_le_bytes());
        }
        self.images.push((h.finalize().into(), tiles, pixels));
        Ok(())
    }
    fn restart(&mut self, images: usize) {
        self.images.truncate(images);
        // The prefix cache keeps earlier turns' blocks findable; a restarted conversation simply does not
        // match them past its new system prompt or first turn.
        self.cached = 0;
    }
    fn answer(
        &mut self,
        ids: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
        cancel: &AtomicBool,
    ) -> anyhow::Result<GenerateOutput> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let images = self
            .images
            .iter()
            .map(|(digest, tiles, px)| ImageInput {
                digest: *digest,
                tiles: *tiles,
                source: ImageSource::Pixels(px.clone()),
            })
            .collect();
        let t0 = Instant::now();
        self.sched.submit(Request {
            prompt: ids.to_vec(),
            images,
            params: SeqParams {
                max_tokens: opts.max_new_tokens,
                sampling: opts.sampling.clone(),
                eos_ids: opts.eos_ids.clone(),
                stop: opts.stop_strings.clone(),
            },
            arrived: t0,
            deadline: None,
            events: tx,
            permit: self.slots.try_acquire().ok_or_else(|| anyhow::anyhow!("chat: a request is still running"))?,
        });
        let (mut text, mut first, mut steps) = (String::new(), None, Vec::new());
        let mut last = t0;
        loop {
            if cancel.load(Ordering::SeqCst) {
                // The engine ends a request whose receiver is gone at its next step and frees its blocks.
                drop(rx);
                while !self.sched.is_idle() {
                    self.sched.step();
                }
                let ids_out = Vec::new();
                return Ok(GenerateOutput {
                    ids: ids_out,
                    text,
                    finish_reason: FinishReason::Cancelled,
                    timings: timings(t0, first, steps, self.cached),
                });
            }
            self.sched.step();
            let now = Instant::now();
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    Event::Text(t) => {
                        if first.is_none() {
                            first = Some(now);
                        } else {
                            steps.push((now - last).as_secs_f64() * 1e3);
                        }
                        last = now;
                        on_text(&t);
                        text.push_str(&t);
                    }
                    Event::Done(s) => {
                        self.cached = s.cached_tokens;
                        // Per-token decode time from the whole answer (text arrives in pieces, not per token).
                        let first = first.unwrap_or(now);
                        let n = s.completion_ids.len().saturating_sub(1);
                        let per = (now - first).as_secs_f64() * 1e3 / n.max(1) as f64;
                        return Ok(GenerateOutput {
                            ids: s.completion_ids,
                            text,
                            finish_reason: s.finish_reason,
                            timings: timings(t0, Some(first), vec![per; n], s.cached_tokens),
                        });
                    }
                    Event::Failed(f) => anyhow::bail!("{}", f.message()),
                }
            }
            if self.sched.is_idle() {
                anyhow::bail!("chat: the engine went idle without ending the answer");
            }
        }
    }
    fn cached_tokens(&self) -> usize {
        self.cached
    }
}

fn timings(t0: Instant, first: Option<Instant>, decode_ms: Vec<f64>, reused: usize) -> Timings {
    let prefill_ms = first.map_or(0.0, |f| (f - t0).as_secs_f64() * 1e3);
    Timings { vision_ms: 0.0, prefill_ms, reused_tokens: reused, decode_ms }
}

/// Loads `model` (a folder or hub id) onto GPU 0 as the engine's model, sized for one conversation, and runs
/// `f` with the engine, the tokenizer, the folder's generation defaults and the GPU's name.
#[cfg(feature = "cuda")]
pub fn with_gpu_engine<R>(
    model: &str,
    f: impl FnOnce(
        &mut EngineChat<'_, facellm::engine::gpu::GpuBatchModel>,
        &facellm::tokenizer::Tokenizer,
        &facellm::config::GenerationConfig,
        &str,
    ) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    use anyhow::Context as _;
    use facellm::backend::cuda::CudaDevice;
    use facellm::engine::batch::{EngineConfig, EngineMetrics, VisionCache};
    use facellm::engine::gpu::{GpuBatchModel, GpuOptions};
    use facellm::model::gpu::WeightSource;
    use std::sync::Mutex;

    let dir = super::source::resolve(model)?;
    let tok =
        facellm::tokenizer::Tokenizer::from_dir(&dir).with_context(|| format!("tokenizer of {}", dir.display()))?;
    let (config, ckpt) = facellm::loader::open_model(&dir)?;
    let generation = facellm::config::GenerationConfig::load(&dir, &config)?;
    let dev = CudaDevice::new(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    let name = dev.info.name.clone();
    let opts = GpuOptions { max_seqs: 1, max_context: usize::MAX, ..GpuOptions::default() };
    let model = GpuBatchModel::load(dev, &config, &WeightSource::Host(&ckpt), &opts)
        .map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    drop(ckpt);
    let cfg = EngineConfig { max_seqs: 1, max_queue: 1, prefill_chunk: opts.prefill_chunk, ..EngineConfig::default() };
    let vision = Arc::new(Mutex::new(VisionCache::new(16, 256 << 20)));
    let sched = Scheduler::new(&model, &tok, cfg, Arc::new(EngineMetrics::default()), vision)?;
    let mut engine = EngineChat::new(sched);
    f(&mut engine, &tok, &generation, &name)
}
