//! Continuous batching: many requests share one model, one paged KV cache and one forward pass per step.
//!
//! The engine runs on its own OS thread and owns the model, the block pool and every sequence; the rest
//! of the program talks to it through an `EngineHandle` (a command channel in, one event channel out per
//! request), so nothing else ever touches the KV cache. Each step:
//!
//! 1. drops sequences whose client went away (the event receiver is closed) or whose deadline passed,
//!    freeing their blocks at once;
//! 2. admits waiting requests, oldest first, while the batch has room and the pool has blocks for their
//!    prompt (after reusing cached prefix blocks: same system prompt + same image = same blocks);
//! 3. plans one token for every decoding sequence plus at most `prefill_chunk` prompt tokens (chunked
//!    prefill: a long prompt cannot stall the running decodes for more than one chunk);
//! 4. finds the blocks for the plan: idle cached prefix blocks are reclaimed first, then the newest running
//!    sequence is preempted (its blocks freed, its tokens kept; it is recomputed when it is admitted again,
//!    never failed);
//! 5. runs ONE batched forward (`FaceLlm::forward_batch`) for all of it, then samples, applies stop
//!    strings, EOS and the token budget per sequence, and streams the new text.
//!
//! With `row_invariant` (the default) every sequence is computed exactly as it would be alone, so an
//! answer never depends on what else is running, and a preempted sequence resumes bit for bit.
//!
//! Prefix reuse has two levels: the vision cache (`VisionCache`: projector features by image content hash,
//! shared with the HTTP side so a hit skips even the image decoding) and the KV prefix cache of `kv`
//! (full blocks found by content, kept after their sequence ends by a `PrefixRetainer`).
//!
//! The model side is the `BatchModel` trait: the CPU `FaceLlm` implements it with the keys and values in
//! the scheduler's host pool; a device model (`engine::gpu::GpuBatchModel`) keeps them in its own storage
//! with the same layout and block ids, and the scheduler's pool only counts the blocks (block tables,
//! prefix cache, retainer and preemption are device-independent bookkeeping; copy-on-write copies are
//! handed to the model with the step).

mod device;
mod metrics;
mod scheduler;
mod vision;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use device::{plan_device_pass, DevicePass};
pub use metrics::{EngineMetrics, Histogram};
pub use scheduler::Scheduler;
pub use vision::{ImageDigest, VisionCache};

use super::generate::FinishReason;
use crate::backend::SamplingParams;
use crate::kv::{BlockTable, KvLayout};
use crate::model::facellm::{BatchInput, FaceLlm};
use crate::model::llm::BatchKvStore;
use crate::tensor::Tensor;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Where a device model keeps its KV blocks (see `BatchModel::device_kv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceKv {
    pub blocks: usize,
    pub block_size: usize,
}

/// What one batched pass gives back for the rows that asked for logits (`BatchInput::logits`), in order.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// `[rows, vocab]`; may be `None` when every such row was `greedy` and `argmax` is given.
    pub logits: Option<Tensor>,
    /// The argmax of each such row (first index on ties), when the model computed it on its device.
    pub argmax: Option<Vec<u32>>,
}

/// What the scheduler needs from a model.
pub trait BatchModel {
    /// Positions the model can attend over (prompt plus answer).
    fn context(&self) -> usize;
    /// Token ids the model embeds: `0..vocab` (a tokenizer may know more, InternVL's `<video>` for one).
    fn vocab(&self) -> usize;
    fn image_token_id(&self) -> u32;
    /// Layers, kv heads and head dim of the KV cache.
    fn kv_shape(&self) -> (usize, usize, usize);
    /// Projector features `[tiles * 256, hidden]` of tiles `[tiles, 3, 448, 448]`.
    fn encode_images(&self, pixel_values: &Tensor) -> Result<Tensor>;
    /// `None` (the default): the keys and values live in the scheduler's host pool and `forward_batch`
    /// attends through `kv`. `Some`: the model keeps this many blocks of this size on its device, in the
    /// layout of `kv`; the scheduler's pool only counts them, and `forward_batch` reads the block ids and the
    /// copy-on-write copies from `kv` (`blocks`, `take_copies`) and never calls `attend`.
    fn device_kv(&self) -> Option<DeviceKv> {
        None
    }
    /// One batched pass (see `FaceLlm::forward_batch`): for each input, `kv.reserve`, the pass, `kv.commit`.
    fn forward_batch(
        &self,
        inputs: &[BatchInput],
        kv: &mut dyn BatchKvStore,
        row_invariant: bool,
    ) -> Result<BatchOutput>;
}

impl BatchModel for FaceLlm {
    fn context(&self) -> usize {
        self.llm().params().max_position
    }
    fn vocab(&self) -> usize {
        self.llm().params().vocab
    }
    fn image_token_id(&self) -> u32 {
        FaceLlm::image_token_id(self)
    }
    fn kv_shape(&self) -> (usize, usize, usize) {
        let p = self.llm().params();
        (p.layers, p.kv_heads, p.head_dim)
    }
    fn encode_images(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(FaceLlm::encode_images(self, pixel_values)?.features)
    }
    fn forward_batch(
        &self,
        inputs: &[BatchInput],
        kv: &mut dyn BatchKvStore,
        row_invariant: bool,
    ) -> Result<BatchOutput> {
        Ok(BatchOutput { logits: FaceLlm::forward_batch(self, inputs, kv, row_invariant)?, argmax: None })
    }
}

/// Sizes and policies of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences in the running batch at most.
    pub max_seqs: usize,
    /// Requests waiting beyond those at most (the HTTP side answers 503 past it).
    pub max_queue: usize,
    /// Blocks in the KV pool and tokens per block.
    pub kv_blocks: usize,
    pub block_size: usize,
    /// Prompt tokens computed per step at most, over all prefilling sequences.
    pub prefill_chunk: usize,
    /// Images and bytes of features kept by the vision cache.
    pub vision_cache_entries: usize,
    pub vision_cache_bytes: usize,
    /// Compute every sequence exactly as alone (see the module docs); off trades that for faster GEMMs.
    pub row_invariant: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_seqs: 16,
            max_queue: 64,
            kv_blocks: 2048,
            block_size: crate::kv::DEFAULT_BLOCK_SIZE,
            prefill_chunk: 256,
            vision_cache_entries: 64,
            vision_cache_bytes: 256 << 20,
            row_invariant: true,
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("engine: {m}")));
        if self.max_seqs == 0 || self.kv_blocks == 0 || self.block_size == 0 || self.prefill_chunk == 0 {
            return bad(format!(
                "max_seqs ({}), kv_blocks ({}), block_size ({}) and prefill_chunk ({}) must be positive",
                self.max_seqs, self.kv_blocks, self.block_size, self.prefill_chunk
            ));
        }
        Ok(())
    }

    /// Tokens the whole pool holds: no single sequence may grow past it.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv_blocks * self.block_size
    }
}

/// How one request generates.
#[derive(Debug, Clone)]
pub struct SeqParams {
    /// New tokens at most; clamped to what the context leaves.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub eos_ids: Vec<u32>,
    pub stop: Vec<String>,
}

/// Where an image's features come from.
pub enum ImageSource {
    /// Found in the vision cache by the HTTP side.
    Features(Arc<Tensor>),
    /// Preprocessed tiles `[tiles, 3, 448, 448]`, to run through the tower when the prompt reaches them.
    Pixels(Tensor),
}

pub struct ImageInput {
    pub digest: ImageDigest,
    pub tiles: usize,
    pub source: ImageSource,
}

/// One generation request. `prompt` holds the expanded image tokens (256 per tile, images in order).
pub struct Request {
    pub prompt: Vec<u32>,
    pub images: Vec<ImageInput>,
    pub params: SeqParams,
    /// When the request arrived (time to first token counts from here).
    pub arrived: Instant,
    /// After this the request ends with `Failure::Timeout`.
    pub deadline: Option<Instant>,
    /// Where its events go; dropping the receiver cancels the request.
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
    /// Its place in the engine's bounded queue, given back when the request is dropped.
    pub permit: Permit,
}

/// What a request hears, in order: `Text` zero or more times, then exactly one of `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New answer text (stop strings never leak into it).
    Text(String),
    Done(Summary),
    Failed(Failure),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Generated tokens, EOS not counted.
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// The generated ids (EOS not included), for callers that check tokens rather than text.
    pub completion_ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The request's deadline passed.
    Timeout(String),
    /// The server is shutting down.
    Shutdown(String),
    /// The request does not fit this engine (over the context or the KV pool; malformed).
    Invalid(String),
    /// A bug or an internal limit; the message says which.
    Internal(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Timeout(m) | Failure::Shutdown(m) | Failure::Invalid(m) | Failure::Internal(m) => m,
        }
    }
}

/// The bounded number of requests in the engine (waiting plus running), shared with whoever admits them.
pub struct Slots {
    used: AtomicUsize,
    cap: usize,
}

/// One place in `Slots`, held by a request until it is dropped.
pub struct Permit(Arc<Slots>);

impl Slots {
    pub fn new(cap: usize) -> Arc<Slots> {
        Arc::new(Slots { used: AtomicUsize::new(0), cap })
    }

    /// A place, or `None` when all `cap` are taken.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.cap).then_some(n + 1))
            .ok()
            .map(|_| Permit(self.clone()))
    }

    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

enum Command {
    Submit(Box<Request>),
    /// Admit nothing more, fail what waits, let running sequences finish until `deadline`, then end them.
    Drain {
        deadline: Instant,
    },
}

/// The program's side of a running engine.
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    pub metrics: Arc<EngineMetrics>,
    pub vision: Arc<Mutex<VisionCache>>,
    pub slots: Arc<Slots>,
    alive: Arc<AtomicBool>,
    pub context: usize,
    pub vocab: usize,
    pub kv_capacity_tokens: usize,
    pub image_token_id: u32,
}

impl EngineHandle {
    /// Starts the engine thread with `model` (moved there) and `tokenizer` (for streaming detokenization).
    pub fn spawn<M: BatchModel + Send + 'static>(
        model: M,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
    ) -> Result<EngineHandle> {
        EngineHandle::spawn_with(move || Ok(model), tokenizer, cfg)
    }

    /// As `spawn`, with the model built by `build` on the engine thread itself (a device model stays on the
    /// thread whose context it was made in). Waits for the build and returns its error, if any.
    pub fn spawn_with<M, F>(build: F, tokenizer: Arc<Tokenizer>, mut cfg: EngineConfig) -> Result<EngineHandle>
    where
        M: BatchModel + 'static,
        F: FnOnce() -> Result<M> + Send + 'static,
    {
        cfg.validate()?;
        let metrics = Arc::new(EngineMetrics::default());
        let vision = Arc::new(Mutex::new(VisionCache::new(cfg.vision_cache_entries, cfg.vision_cache_bytes)));
        let slots = Slots::new(cfg.max_seqs + cfg.max_queue);
        let alive = Arc::new(AtomicBool::new(true));
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(ModelInfo, EngineConfig)>>(1);
        let thread = {
            let (metrics, vision, alive) = (metrics.clone(), vision.clone(), alive.clone());
            std::thread::Builder::new()
                .name("facellm-engine".into())
                .spawn(move || {
                    // Cleared however the thread ends, a panic included, so `/health` tells the truth.
                    let _alive = ClearOnDrop(alive);
                    let model = match build().and_then(|m| {
                        adopt_device_kv(&m, &mut cfg)?;
                        let (layers, kv_heads, head_dim) = m.kv_shape();
                        KvLayout::new(layers, kv_heads, head_dim, cfg.block_size)?;
                        Ok(m)
                    }) {
                        Ok(m) => m,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let info = ModelInfo {
                        context: model.context(),
                        vocab: model.vocab(),
                        image_token_id: model.image_token_id(),
                    };
                    let _ = ready_tx.send(Ok((info, cfg.clone())));
                    run(&model, &tokenizer, cfg, metrics, vision, rx);
                })
                .map_err(|e| Error::Invalid(format!("engine: cannot start its thread: {e}")))?
        };
        let (info, cfg) = match ready_rx.recv() {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::Invalid("engine: its thread ended while loading the model".into()));
            }
        };
        Ok(EngineHandle {
            tx,
            thread: Mutex::new(Some(thread)),
            metrics,
            vision,
            slots,
            alive,
            context: info.context,
            vocab: info.vocab,
            kv_capacity_tokens: cfg.kv_capacity_tokens(),
            image_token_id: info.image_token_id,
        })
    }

    /// Hands a request to the engine. An error means the engine has stopped (the request is dropped, and its
    /// event receiver sees the channel closed).
    pub fn submit(&self, req: Request) -> Result<()> {
        self.tx
            .send(Command::Submit(Box::new(req)))
            .map_err(|_| Error::Invalid("engine: it has stopped and takes no requests".into()))
    }

    /// Whether the engine thread is still running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Stops admitting, fails waiting requests, gives running ones `grace` to finish, then ends them.
    pub fn drain(&self, grace: Duration) {
        let _ = self.tx.send(Command::Drain { deadline: Instant::now() + grace });
    }

    /// Waits for the engine thread to end (after `drain`); later calls return at once.
    pub fn join(&self) {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

struct ModelInfo {
    context: usize,
    vocab: usize,
    image_token_id: u32,
}

/// A device model brings its own pool size and block size; the configuration takes them.
pub(crate) fn adopt_device_kv<M: BatchModel>(model: &M, cfg: &mut EngineConfig) -> Result<()> {
    if let Some(d) = model.device_kv() {
        if d.blocks == 0 || d.block_size == 0 {
            return Err(Error::Invalid(format!("engine: the model's device KV cache is empty ({d:?})")));
        }
        cfg.kv_blocks = d.blocks;
        cfg.block_size = d.block_size;
    }
    Ok(())
}

/// The engine thread: commands in, steps while there is work, sleep on the channel when there is none.
fn run<M: BatchModel>(
    model: &M,
    tok: &Tokenizer,
    cfg: EngineConfig,
    metrics: Arc<EngineMetrics>,
    vision: Arc<Mutex<VisionCache>>,
    rx: mpsc::Receiver<Command>,
) {
    let mut sched = match Scheduler::new(model, tok, cfg, metrics, vision) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: engine: {e}");
            return;
        }
    };
    let handle = |sched: &mut Scheduler<M>, cmd: Command| match cmd {
        Command::Submit(req) => sched.submit(*req),
        Command::Drain { deadline } => sched.drain(deadline),
    };
    loop {
        if sched.is_idle() {
            if sched.is_draining() {
                break;
            }
            // Nothing to do: sleep until a command comes; an error means every handle is gone.
            match rx.recv() {
                Ok(cmd) => handle(&mut sched, cmd),
                Err(_) => break,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            handle(&mut sched, cmd);
        }
        sched.step();
    }
    sched.shutdown();
}

/// A table whose prefix keys are salted with the request's images, so that two prompts share KV blocks
/// only when their images are the same too (every image is the same run of `<IMG_CONTEXT>` ids).
pub(crate) fn salted_table(images: &[ImageInput]) -> BlockTable {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    if images.is_empty() {
        return BlockTable::new(0);
    }
    // Keyed per process: a client cannot precompute two image sets whose 64-bit salts collide.
    static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    let mut h = KEYS.get_or_init(Default::default).build_hasher();
    for img in images {
        h.write(&img.digest);
    }
    BlockTable::new(h.finish() | 1)
}
