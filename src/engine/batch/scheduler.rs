//! The scheduler: sequences, admission, block accounting, preemption and one step of the batch. It runs
//! on the engine thread (`batch::run`), and tests drive it directly: `submit`, then `step` until idle.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::metrics::bump;
use super::{BatchModel, EngineConfig, EngineMetrics, Event, Failure, ImageInput, ImageSource, Request, Summary};
use super::{Permit, VisionCache};
use crate::backend::Sampler;
use crate::engine::generate::FinishReason;
use crate::engine::stop::{StopMatcher, StopState};
use crate::kv::{BlockPool, BlockTable, KvLayout, PagedBatch, PrefixRetainer};
use crate::model::facellm::BatchInput;
use crate::model::IMAGE_TOKENS_PER_TILE;
use crate::tensor::Tensor;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};
use crate::Result;

/// One request inside the engine.
struct Sequence<'t> {
    /// The prompt, then every generated token. The table holds the keys and values of a prefix of them; the
    /// rest is what the sequence still has to run (its whole prompt at first, one token while decoding, and
    /// everything past the cached prefix after a preemption).
    tokens: Vec<u32>,
    prompt_len: usize,
    table: BlockTable,
    /// Until the features are needed; dropped once they are in `features`.
    images: Vec<ImageInput>,
    /// One row per `<IMG_CONTEXT>` token of the prompt, kept until the sequence ends (a preempted sequence
    /// recomputes its KV without running the vision tower again).
    features: Option<Tensor>,
    /// New tokens at most (already clamped to the context and the pool).
    budget: usize,
    eos: Vec<u32>,
    sampler: Sampler,
    stops: StopMatcher,
    decoder: IncrementalDecoder<'t>,
    text: String,
    generated: usize,
    /// A stop string ended the answer (its text is final: nothing held back is released).
    cut_by_stop: bool,
    /// Prompt tokens found in the prefix cache at the first admission.
    cached_tokens: Option<usize>,
    /// Admission order: the largest is the newest, preempted first.
    admitted: u64,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    arrived: Instant,
    deadline: Option<Instant>,
    last_token: Option<Instant>,
    _permit: Permit,
}

impl Sequence<'_> {
    /// Tokens not yet in the KV cache.
    fn pending(&self) -> usize {
        self.tokens.len() - self.table.len()
    }
}

/// How a sequence leaves the engine.
enum Outcome {
    Finished(FinishReason),
    /// The client went away: nothing to send.
    Cancelled,
    Failed(Failure),
}

pub struct Scheduler<'m, M: BatchModel> {
    model: &'m M,
    tok: &'m Tokenizer,
    cfg: EngineConfig,
    pool: BlockPool,
    retainer: PrefixRetainer,
    waiting: VecDeque<Sequence<'m>>,
    /// In admission order.
    running: Vec<Sequence<'m>>,
    metrics: Arc<EngineMetrics>,
    vision: Arc<Mutex<VisionCache>>,
    next_admission: u64,
    draining: Option<Instant>,
}

impl<'m, M: BatchModel> Scheduler<'m, M> {
    pub fn new(
        model: &'m M,
        tok: &'m Tokenizer,
        mut cfg: EngineConfig,
        metrics: Arc<EngineMetrics>,
        vision: Arc<Mutex<VisionCache>>,
    ) -> Result<Self> {
        cfg.validate()?;
        super::adopt_device_kv(model, &mut cfg)?;
        let (layers, kv_heads, head_dim) = model.kv_shape();
        let layout = KvLayout::new(layers, kv_heads, head_dim, cfg.block_size)?;
        // A device model stores the blocks itself: the pool here only counts them.
        let pool = match model.device_kv() {
            Some(_) => BlockPool::accounting(layout, cfg.kv_blocks)?,
            None => BlockPool::new(layout, cfg.kv_blocks)?,
        };
        metrics.kv_blocks_total.store(cfg.kv_blocks as u64, Ordering::Relaxed);
        Ok(Scheduler {
            model,
            tok,
            cfg,
            pool,
            retainer: PrefixRetainer::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            metrics,
            vision,
            next_admission: 0,
            draining: None,
        })
    }

    /// Nothing waits and nothing runs.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }

    /// Blocks held by live sequences (not counting blocks kept only for prefix reuse).
    pub fn kv_blocks_used(&self) -> usize {
        self.pool.blocks_used() - self.retainer.idle(&self.pool)
    }

    /// Takes a request in, or answers it at once with `Failed` when it cannot run here.
    pub fn submit(&mut self, req: Request) {
        if self.draining.is_some() {
            let _ = req.events.send(Event::Failed(Failure::Shutdown("the server is shutting down".into())));
            return;
        }
        match self.admit_request(req) {
            Ok(seq) => self.waiting.push_back(seq),
            Err((events, failure)) => {
                bump(&self.metrics.failed);
                let _ = events.send(Event::Failed(failure));
            }
        }
        self.publish_gauges();
    }

    /// Checks a request against the model and the pool and makes its sequence.
    #[allow(clippy::result_large_err)]
    fn admit_request(
        &self,
        req: Request,
    ) -> std::result::Result<Sequence<'m>, (tokio::sync::mpsc::UnboundedSender<Event>, Failure)> {
        let Request { prompt, images, params, arrived, deadline, events, permit } = req;
        let fail = |msg: String| Err((events.clone(), Failure::Invalid(msg)));
        let (context, capacity) = (self.model.context(), self.cfg.kv_capacity_tokens());
        let n = prompt.len();
        if n == 0 {
            return fail("the prompt is empty".into());
        }
        if n >= context.min(capacity) {
            return fail(format!(
                "the prompt has {n} tokens; this model's context is {context} tokens and the KV cache holds \
                 {capacity}, and at least one token must be left for the answer"
            ));
        }
        if params.max_tokens == 0 {
            return fail("max_tokens must be at least 1".into());
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.model.vocab()) {
            return fail(format!(
                "the prompt holds token id {bad}, outside the model's {} embeddings",
                self.model.vocab()
            ));
        }
        let image_id = self.model.image_token_id();
        let image_tokens = prompt.iter().filter(|&&t| t == image_id).count();
        let feature_rows: usize = images.iter().map(|i| i.tiles * IMAGE_TOKENS_PER_TILE).sum();
        if image_tokens != feature_rows {
            return fail(format!(
                "the prompt has {image_tokens} image tokens but its {} images have {feature_rows} feature rows",
                images.len()
            ));
        }
        let sampler = match Sampler::new(params.sampling.clone()) {
            Ok(s) => s,
            Err(e) => return fail(e.to_string()),
        };
        let table = super::salted_table(&images);
        Ok(Sequence {
            tokens: prompt,
            prompt_len: n,
            table,
            images,
            features: None,
            budget: params.max_tokens.min(context - n).min(capacity - n),
            eos: params.eos_ids,
            sampler,
            stops: StopMatcher::new(&params.stop),
            decoder: self.tok.incremental_decoder(true),
            text: String::new(),
            generated: 0,
            cut_by_stop: false,
            cached_tokens: None,
            admitted: 0,
            events,
            arrived,
            deadline,
            last_token: None,
            _permit: permit,
        })
    }

    /// Stops admitting and fails everything waiting; running sequences may finish until `deadline`.
    pub fn drain(&mut self, deadline: Instant) {
        self.draining = Some(deadline);
        while let Some(seq) = self.waiting.pop_front() {
            self.end(seq, Outcome::Failed(Failure::Shutdown("the server is shutting down".into())));
        }
        self.publish_gauges();
    }

    /// Ends every sequence (the engine is stopping) and gives every block back.
    pub fn shutdown(&mut self) {
        let msg = "the server stopped before the answer was complete";
        while let Some(seq) = self.running.pop() {
            self.end(seq, Outcome::Failed(Failure::Shutdown(msg.into())));
        }
        while let Some(seq) = self.waiting.pop_front() {
            self.end(seq, Outcome::Failed(Failure::Shutdown(msg.into())));
        }
        if let Err(e) = self.retainer.clear(&mut self.pool) {
            eprintln!("error: engine: releasing cached prefix blocks: {e}");
        }
        self.publish_gauges();
    }

    /// One step: reap, admit, plan, find blocks, run one batched forward, sample and stream.
    pub fn step(&mut self) {
        self.reap(Instant::now());
        self.admit();
        if !self.running.is_empty() {
            if let Err(e) = self.run_step() {
                // A failed pass leaves no half-written state (the paged batch rolls its tables back), but
                // the sequences in it cannot go on: fail them rather than retry the same error forever.
                eprintln!("error: engine step: {e}");
                while let Some(seq) = self.running.pop() {
                    self.end(seq, Outcome::Failed(Failure::Internal(format!("engine step failed: {e}"))));
                }
            }
        }
        self.publish_gauges();
        #[cfg(debug_assertions)]
        self.audit();
    }

    /// Drops sequences whose client is gone or whose time is up.
    fn reap(&mut self, now: Instant) {
        let shutdown = self.draining.is_some_and(|d| now >= d);
        let verdict = |s: &Sequence, running: bool| -> Option<Outcome> {
            if s.events.is_closed() {
                return Some(Outcome::Cancelled);
            }
            if s.deadline.is_some_and(|d| now >= d) {
                return Some(Outcome::Failed(Failure::Timeout("the request timed out".into())));
            }
            (running && shutdown).then(|| {
                Outcome::Failed(Failure::Shutdown("the server shut down before the answer was complete".into()))
            })
        };
        let mut i = 0;
        while i < self.running.len() {
            match verdict(&self.running[i], true) {
                Some(out) => {
                    let seq = self.running.remove(i);
                    self.end(seq, out);
                }
                None => i += 1,
            }
        }
        let mut i = 0;
        while i < self.waiting.len() {
            match verdict(&self.waiting[i], false) {
                Some(out) => {
                    if let Some(seq) = self.waiting.remove(i) {
                        self.end(seq, out);
                    }
                }
                None => i += 1,
            }
        }
    }

    /// Moves waiting sequences into the batch, oldest (and preempted) first, while there is room: a place in
    /// the batch and blocks for the rest of the prompt after the cached prefix.
    fn admit(&mut self) {
        while self.draining.is_none() && self.running.len() < self.cfg.max_seqs {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            let matched = if seq.table.is_empty() {
                match self.pool.match_prefix(&mut seq.table, &seq.tokens) {
                    Ok(m) => m,
                    Err(e) => {
                        self.end(seq, Outcome::Failed(Failure::Internal(format!("prefix lookup: {e}"))));
                        continue;
                    }
                }
            } else {
                seq.table.len()
            };
            let need = self.pool.blocks_needed(&seq.table, seq.pending());
            let available = self.pool.blocks_free() + self.retainer.idle(&self.pool);
            if need > available && !self.running.is_empty() {
                // Not now: give back what the lookup took and keep the place in the queue.
                if let Err(e) = self.pool.free(&mut seq.table) {
                    eprintln!("error: engine: {e}");
                }
                self.waiting.push_front(seq);
                break;
            }
            self.retainer.touch(&seq.table);
            if seq.cached_tokens.is_none() {
                seq.cached_tokens = Some(matched);
                let m = &self.metrics;
                bump(&m.prefix_queries);
                m.prompt_tokens.fetch_add(seq.prompt_len as u64, Ordering::Relaxed);
                if matched > 0 {
                    bump(&m.prefix_hits);
                    m.prefix_hit_tokens.fetch_add(matched as u64, Ordering::Relaxed);
                }
            }
            seq.admitted = self.next_admission;
            self.next_admission += 1;
            self.running.push(seq);
        }
    }

    /// Tokens each running sequence runs this step: one per decoding sequence, and the prefill budget shared
    /// by the prefilling ones in admission order.
    fn plan(&self) -> Vec<usize> {
        let mut budget = self.cfg.prefill_chunk;
        self.running
            .iter()
            .map(|s| match s.pending() {
                0 | 1 => s.pending(),
                p => {
                    let n = p.min(budget);
                    budget -= n;
                    n
                }
            })
            .collect()
    }

    /// Makes sure the pool has the blocks `plan` needs: idle prefix blocks go first, then the newest
    /// sequences are preempted (removed from the batch and from `plan`).
    fn find_blocks(&mut self, plan: &mut Vec<usize>) -> Result<()> {
        loop {
            let need: usize =
                self.running.iter().zip(plan.iter()).map(|(s, &n)| self.pool.blocks_needed(&s.table, n)).sum();
            if need <= self.pool.blocks_free() {
                return Ok(());
            }
            self.retainer.evict(&mut self.pool, need)?;
            if need <= self.pool.blocks_free() {
                return Ok(());
            }
            if self.running.len() <= 1 {
                return Err(crate::Error::Invalid(format!(
                    "kv cache: one sequence needs {need} blocks and only {} are free",
                    self.pool.blocks_free()
                )));
            }
            let newest = (0..self.running.len()).max_by_key(|&i| self.running[i].admitted).unwrap_or(0);
            let mut seq = self.running.remove(newest);
            plan.remove(newest);
            // Its full blocks stay findable while nobody needs the room, so a quick return recomputes less.
            self.retainer.keep(&mut self.pool, &seq.table)?;
            self.pool.free(&mut seq.table)?;
            bump(&self.metrics.preemptions);
            self.waiting.push_front(seq);
        }
    }

    /// The feature rows of the image tokens among the prompt positions `from..to` of `seq`.
    fn feature_rows(&self, seq: &Sequence, from: usize, to: usize) -> Result<Option<Tensor>> {
        let (from, to) = (from.min(seq.prompt_len), to.min(seq.prompt_len));
        let id = self.model.image_token_id();
        let here = seq.tokens[from..to].iter().filter(|&&t| t == id).count();
        if here == 0 {
            return Ok(None);
        }
        let Some(f) = &seq.features else {
            return Err(crate::Error::Invalid("engine: image features missing for a prompt chunk".into()));
        };
        let before = seq.tokens[..from].iter().filter(|&&t| t == id).count();
        let d = f.shape()[1];
        let rows = f.f32s()?.get(before * d..(before + here) * d).ok_or_else(|| {
            crate::Error::Invalid(format!(
                "engine: {} feature rows, chunk wants {}..{}",
                f.shape()[0],
                before,
                before + here
            ))
        })?;
        Ok(Some(Tensor::from_f32([here, d], rows.to_vec())?))
    }

    fn run_step(&mut self) -> Result<()> {
        let mut plan = self.plan();
        self.find_blocks(&mut plan)?;
        // Image features for the chunks that reach image tokens; the tower runs for one sequence per step at
        // most, so a burst of new images cannot stall the running decodes for long.
        let mut tower_ran = false;
        let mut failed = Vec::new();
        let (model, vision, metrics) = (self.model, &self.vision, &self.metrics);
        for (i, (seq, n)) in self.running.iter_mut().zip(plan.iter_mut()).enumerate() {
            if *n == 0 || !needs_features(model.image_token_id(), seq, *n) {
                continue;
            }
            let needs_tower = seq.images.iter().any(|img| matches!(img.source, ImageSource::Pixels(_)));
            if needs_tower && tower_ran {
                *n = 0;
                continue;
            }
            match resolve_features(model, vision, metrics, seq) {
                Ok(ran) => tower_ran |= ran,
                Err(e) => failed.push((i, e)),
            }
        }
        // A sequence whose images fail ends alone; the rest of the batch goes on.
        for (i, e) in failed.into_iter().rev() {
            plan.remove(i);
            let seq = self.running.remove(i);
            self.end(seq, Outcome::Failed(Failure::Internal(format!("vision: {e}"))));
        }
        let mut feats = Vec::with_capacity(plan.len());
        for (s, &n) in self.running.iter().zip(&plan) {
            let start = s.table.len();
            feats.push(if n > 0 { self.feature_rows(s, start, start + n)? } else { None });
        }

        let row_invariant = self.cfg.row_invariant;
        let mut inputs = Vec::new();
        let mut kv_seqs = Vec::new();
        let mut wants = Vec::new();
        for ((s, &n), f) in self.running.iter_mut().zip(&plan).zip(&feats) {
            if n == 0 {
                continue;
            }
            let start = s.table.len();
            let Sequence { tokens, table, .. } = s;
            let ids = &tokens[start..start + n];
            let logits = start + n == tokens.len();
            inputs.push(BatchInput { ids, features: f.as_ref(), logits, greedy: s.sampler.is_argmax() });
            kv_seqs.push((table, ids));
            wants.push(logits);
        }
        if inputs.is_empty() {
            return Ok(());
        }
        let mut kv = PagedBatch::new(&mut self.pool, kv_seqs, row_invariant);
        let out = self.model.forward_batch(&inputs, &mut kv, row_invariant)?;
        drop(kv);
        drop(inputs);
        bump(&self.metrics.steps);

        let vocab = out.logits.as_ref().map_or(0, |l| l.shape()[1]);
        let logits = match &out.logits {
            Some(l) => l.f32s()?,
            None => &[],
        };
        let now = Instant::now();
        let mut outcomes: Vec<(usize, Outcome)> = Vec::new();
        let mut row = 0;
        for (i, &n) in plan.iter().enumerate() {
            let seq = &mut self.running[i];
            if n == 0 || seq.pending() != 0 {
                continue;
            }
            let argmax = out.argmax.as_ref().and_then(|a| a.get(row).copied()).filter(|_| seq.sampler.is_argmax());
            let choice = match (argmax, logits.get(row * vocab..(row + 1) * vocab)) {
                (Some(id), _) => Ok(id),
                (None, Some(l)) => seq.sampler.sample(l, &seq.tokens),
                (None, None) => {
                    outcomes.push((i, Outcome::Failed(Failure::Internal("engine: missing logits row".into()))));
                    row += 1;
                    continue;
                }
            };
            row += 1;
            if let Some(out) = self.accept(i, choice, now) {
                outcomes.push((i, out));
            }
        }
        debug_assert_eq!(row, wants.iter().filter(|&&w| w).count());
        for (i, out) in outcomes.into_iter().rev() {
            let seq = self.running.remove(i);
            self.end(seq, out);
        }
        Ok(())
    }

    /// Takes the next token of running sequence `i` (as sampled) and streams what it adds; returns how the
    /// sequence ends, if it does.
    fn accept(&mut self, i: usize, choice: Result<u32>, now: Instant) -> Option<Outcome> {
        let m = &self.metrics;
        let seq = &mut self.running[i];
        let id = match choice {
            Ok(id) => id,
            Err(e) => return Some(Outcome::Failed(Failure::Internal(format!("sampling: {e}")))),
        };
        match seq.last_token {
            None => m.ttft.observe((now - seq.arrived).as_secs_f64()),
            Some(t) => m.itl.observe((now - t).as_secs_f64()),
        }
        seq.last_token = Some(now);
        if seq.eos.contains(&id) {
            return Some(Outcome::Finished(FinishReason::Stop));
        }
        seq.tokens.push(id);
        seq.generated += 1;
        bump(&m.generation_tokens);
        seq.text.push_str(&seq.decoder.push(id));
        let (release, stopped) = match seq.stops.update(&seq.text) {
            StopState::Continue { release } => (release, false),
            StopState::Stopped { release, text } => {
                seq.text = text;
                seq.cut_by_stop = true;
                (release, true)
            }
        };
        if !release.is_empty() && seq.events.send(Event::Text(release)).is_err() {
            return Some(Outcome::Cancelled);
        }
        if stopped {
            return Some(Outcome::Finished(FinishReason::Stop));
        }
        (seq.generated >= seq.budget).then_some(Outcome::Finished(FinishReason::Length))
    }

    /// Sends a sequence's last event, keeps its full blocks for prefix reuse, and gives its blocks back.
    fn end(&mut self, mut seq: Sequence<'m>, out: Outcome) {
        let internal = matches!(out, Outcome::Failed(Failure::Internal(_)));
        let m = &self.metrics;
        match out {
            Outcome::Finished(reason) => {
                if !seq.cut_by_stop {
                    let tail = seq.decoder.finish();
                    seq.text.push_str(&tail);
                    let rest = seq.stops.finish(&seq.text);
                    if !rest.is_empty() {
                        let _ = seq.events.send(Event::Text(rest));
                    }
                }
                bump(if reason == FinishReason::Length { &m.finished_length } else { &m.finished_stop });
                let _ = seq.events.send(Event::Done(Summary {
                    finish_reason: reason,
                    prompt_tokens: seq.prompt_len,
                    completion_tokens: seq.generated,
                    cached_tokens: seq.cached_tokens.unwrap_or(0),
                    completion_ids: seq.tokens[seq.prompt_len..].to_vec(),
                }));
            }
            Outcome::Cancelled => bump(&m.cancelled),
            Outcome::Failed(f) => {
                bump(&m.failed);
                let _ = seq.events.send(Event::Failed(f));
            }
        }
        // What was computed stays findable (a client that retries, or asks again after hanging up, reuses
        // it), except after an internal error, when the blocks' contents are not to be trusted.
        if !internal {
            if let Err(e) = self.retainer.keep(&mut self.pool, &seq.table) {
                eprintln!("error: engine: keeping prefix blocks: {e}");
            }
        }
        if let Err(e) = self.pool.free(&mut seq.table) {
            eprintln!("error: engine: freeing a sequence's blocks: {e}");
        }
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        let idle = self.retainer.idle(&self.pool);
        m.running.store(self.running.len() as u64, Ordering::Relaxed);
        m.waiting.store(self.waiting.len() as u64, Ordering::Relaxed);
        m.kv_blocks_cached.store(idle as u64, Ordering::Relaxed);
        m.kv_blocks_used.store((self.pool.blocks_used() - idle) as u64, Ordering::Relaxed);
    }

    /// Debug builds check the pool's invariants after every step.
    #[cfg(debug_assertions)]
    fn audit(&self) {
        let tables = self.running.iter().chain(&self.waiting).map(|s| &s.table);
        if let Err(e) = self.pool.audit_with(tables, self.retainer.blocks()) {
            eprintln!("error: engine: {e}");
        }
    }
}

/// Whether the next `n` tokens of `seq` include prompt image tokens whose features are not ready.
fn needs_features(image_id: u32, seq: &Sequence, n: usize) -> bool {
    let (from, to) = (seq.table.len().min(seq.prompt_len), (seq.table.len() + n).min(seq.prompt_len));
    seq.features.is_none() && seq.tokens[from..to].contains(&image_id)
}

/// Fills `seq.features` from the vision cache or the tower; returns whether the tower ran.
fn resolve_features<M: BatchModel>(
    model: &M,
    vision: &Mutex<VisionCache>,
    metrics: &EngineMetrics,
    seq: &mut Sequence,
) -> Result<bool> {
    let mut parts = Vec::with_capacity(seq.images.len());
    let mut ran = false;
    for img in &seq.images {
        let f = match &img.source {
            ImageSource::Features(f) => f.clone(),
            ImageSource::Pixels(px) => {
                let cached = vision.lock().unwrap_or_else(|p| p.into_inner()).get(&img.digest);
                match cached {
                    Some((f, _)) => {
                        bump(&metrics.vision_hits);
                        f
                    }
                    None => {
                        let f = Arc::new(model.encode_images(px)?);
                        if f.shape().first() != Some(&(img.tiles * IMAGE_TOKENS_PER_TILE)) {
                            return Err(crate::Error::Invalid(format!(
                                "engine: the vision tower gave features {:?} for {} tiles",
                                f.shape(),
                                img.tiles
                            )));
                        }
                        ran = true;
                        bump(&metrics.vision_images_encoded);
                        metrics.vision_tiles_encoded.fetch_add(img.tiles as u64, Ordering::Relaxed);
                        vision.lock().unwrap_or_else(|p| p.into_inner()).insert(img.digest, f.clone(), img.tiles);
                        f
                    }
                }
            }
        };
        parts.push(f);
    }
    let d = parts.first().map_or(0, |f| f.shape().get(1).copied().unwrap_or(0));
    let mut rows = Vec::new();
    for f in &parts {
        rows.extend_from_slice(f.f32s()?);
    }
    seq.features = Some(Tensor::from_f32([rows.len() / d.max(1), d], rows)?);
    seq.images.clear();
    Ok(ran)
}
