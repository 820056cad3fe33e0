//! The request scheduler of the GPU engine, written against [`StepModel`] (prefill a chunk, decode one token
//! for a batch) so the scheduling itself runs and is tested without a GPU (`tests` below use a fake model).
//!
//! Policy, deliberately simple: requests are admitted oldest first while the batch has a free row and the
//! pool has the blocks for the whole request (prompt + answer budget, reserved up front, so a running
//! sequence never stalls for memory or gets preempted); an admitted request's images are encoded at once and
//! its prompt is prefilled one chunk per engine step, between the decode steps of the running sequences;
//! every sequence past its prefill decodes together, one token per step. Sequences finish independently
//! (EOS, stop string, budget, context) and free their blocks at once, which lets the next waiting request in
//! on the following step.
//!
//! Greedy decoding takes the model's argmax; sampled decoding draws with the CPU `Sampler` from the model's
//! logits, so a seed gives the same answer on every backend.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Instant;

use super::generate::{FinishReason, GenerateOptions};
use super::stop::{StopMatcher, StopState};
use crate::backend::Sampler;
use crate::{Error, Result};

/// One sequence's part of a step: its new tokens, the number of tokens its cache already holds (the
/// position of the first new token) and its block table, which must already cover `start + tokens.len()`.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub blocks: &'a [u32],
}

/// What the scheduler needs from a model on a device.
pub trait StepModel {
    /// Image features of one request, kept on the device between its prefill chunks.
    type Features;
    /// Tokens per KV block.
    fn block_size(&self) -> usize;
    /// Prompt tokens one prefill step takes at most.
    fn prefill_chunk(&self) -> usize;
    fn image_token_id(&self) -> u32;
    /// Features of `tiles` tiles of `pixels` (`[tiles, 3, S, S]` f32) and how many rows they hold.
    fn encode_images(&mut self, pixels: &[f32], tiles: usize) -> Result<(Self::Features, usize)>;
    /// Prefills one chunk of one sequence, writing its keys and values; returns the greedy next token.
    /// `image`: feature rows `range` go to the chunk's rows `rows` (relative to the chunk), in order.
    fn prefill(&mut self, seq: SeqInput, image: Option<(&Self::Features, Range<usize>, &[i32])>) -> Result<u32>;
    /// One decode step: one token per sequence; the greedy next token of each.
    fn decode(&mut self, seqs: &[SeqInput]) -> Result<Vec<u32>>;
    /// The logits `[b, vocab]` of the first `b` sequences of the last step (for sampling).
    fn last_logits(&mut self, b: usize) -> Result<Vec<f32>>;
    /// Waits for the device (timings).
    fn synchronize(&mut self) -> Result<()>;
}

/// Sizes of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sequences decoding together at most.
    pub max_seqs: usize,
    /// Tokens per sequence at most (prompt + answer).
    pub max_context: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
}

/// One request: prompt ids (image tokens expanded) and the tiles of its images, `[tiles, 3, S, S]` f32.
pub struct Request {
    pub ids: Vec<u32>,
    pub pixels: Option<(Vec<f32>, usize)>,
    pub opts: GenerateOptions,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Output {
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

/// An admitted request whose prompt is still being prefilled, one chunk per engine step.
struct Prefilling<F> {
    req: usize,
    blocks: Vec<u32>,
    features: Option<F>,
    /// Positions of the prompt's image tokens, in order (feature row k goes to `image_pos[k]`).
    image_pos: Vec<usize>,
    /// Prompt tokens already in the cache.
    done: usize,
    started: Instant,
    vision_ms: f64,
}

/// Runs every request to completion, `max_seqs` at a time; `decode` turns ids into text (for stop strings
/// and the output), `on_text(request, text)` streams each answer as it becomes final. Every block is free
/// again when it returns, with or without an error.
///
/// Each engine step runs at most one prefill chunk (of the oldest request still prefilling) and then one
/// decode step for every sequence past its prefill, so a long prompt delays running answers by one chunk
/// per step, never by its whole prefill.
pub fn run<M: StepModel>(
    model: &mut M,
    limits: Limits,
    reqs: &[Request],
    decode: &dyn Fn(&[u32]) -> Result<String>,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Output>> {
    if limits.max_seqs == 0 || limits.max_context == 0 || limits.num_blocks == 0 {
        return Err(Error::Invalid("scheduler: max_seqs, max_context and the pool must be positive".into()));
    }
    for (i, r) in reqs.iter().enumerate() {
        if r.ids.is_empty() {
            return Err(Error::Invalid(format!("request {i}: empty prompt")));
        }
        if r.ids.len() + 1 > limits.max_context {
            return Err(Error::Invalid(format!(
                "request {i}: the prompt has {} tokens; the engine's context is {}",
                r.ids.len(),
                limits.max_context
            )));
        }
    }
    let bs = model.block_size();
    let chunk = model.prefill_chunk().max(1);
    let mut free: Vec<u32> = (0..limits.num_blocks as u32).rev().collect();
    let mut waiting: VecDeque<usize> = (0..reqs.len()).collect();
    let mut prefilling: VecDeque<Prefilling<M::Features>> = VecDeque::new();
    let mut active: Vec<Active> = Vec::new();
    let mut done: Vec<Option<Output>> = (0..reqs.len()).map(|_| None).collect();
    while !waiting.is_empty() || !prefilling.is_empty() || !active.is_empty() {
        // Admit: oldest first, while a row and the blocks for the whole request are free.
        while active.len() + prefilling.len() < limits.max_seqs {
            let Some(&i) = waiting.front() else { break };
            let r = &reqs[i];
            let need = (r.ids.len() + r.opts.max_new_tokens).min(limits.max_context).div_ceil(bs);
            if need > limits.num_blocks {
                return Err(Error::Invalid(format!(
                    "request {i}: needs {need} KV blocks, the cache has {}",
                    limits.num_blocks
                )));
            }
            if need > free.len() {
                break;
            }
            waiting.pop_front();
            let blocks: Vec<u32> = free.split_off(free.len() - need);
            prefilling.push_back(encode(model, i, r, blocks)?);
        }
        // One prefill chunk.
        if let Some(p) = prefilling.front_mut() {
            let r = &reqs[p.req];
            let first = prefill_chunk(model, p, r, chunk)?;
            if p.done == r.ids.len() {
                let p = prefilling.pop_front().expect("front exists");
                match start_answer(model, p, r, first, limits.max_context, decode, on_text)? {
                    Ok(a) => active.push(a),
                    Err((a, out)) => {
                        free.extend(a.blocks.iter().rev());
                        done[a.req] = Some(out);
                    }
                }
            }
        }
        if active.is_empty() {
            continue;
        }
        // One decode step for every sequence past its prefill.
        let last: Vec<[u32; 1]> = active.iter().map(|a| [*a.tokens.last().expect("non-empty")]).collect();
        let seqs: Vec<SeqInput> =
            active.iter().zip(&last).map(|(a, t)| SeqInput { tokens: t, start: a.cached, blocks: &a.blocks }).collect();
        let greedy = model.decode(&seqs)?;
        let logits =
            if active.iter().any(|a| a.sampler.is_some()) { Some(model.last_logits(active.len())?) } else { None };
        let vocab = logits.as_ref().map_or(0, |l| l.len() / active.len());
        let mut finished = Vec::with_capacity(active.len());
        for (k, a) in active.iter_mut().enumerate() {
            a.cached += 1;
            let next = match (&mut a.sampler, &logits) {
                (Some(s), Some(l)) => s.sample(&l[k * vocab..(k + 1) * vocab], &a.tokens)?,
                _ => greedy[k],
            };
            finished.push(push_token(a, next, &reqs[a.req].opts, limits.max_context, decode, on_text)?);
        }
        for (a, f) in std::mem::take(&mut active).into_iter().zip(finished) {
            match f {
                Some(reason) => {
                    free.extend(a.blocks.iter().rev());
                    done[a.req] = Some(output(&a, reason));
                }
                None => active.push(a),
            }
        }
    }
    done.into_iter().enumerate().map(|(i, o)| o.ok_or_else(|| Error::Invalid(format!("request {i} lost")))).collect()
}

/// Admission of request `i`: its images through the vision tower (features stay on the device until its
/// prefill ends).
fn encode<M: StepModel>(model: &mut M, i: usize, r: &Request, blocks: Vec<u32>) -> Result<Prefilling<M::Features>> {
    let started = Instant::now();
    let image_token = model.image_token_id();
    let image_pos: Vec<usize> = r.ids.iter().enumerate().filter(|(_, &t)| t == image_token).map(|(p, _)| p).collect();
    let features = match &r.pixels {
        Some((px, tiles)) => {
            let (f, rows) = model.encode_images(px, *tiles)?;
            if rows != image_pos.len() {
                return Err(Error::Invalid(format!(
                    "request {i}: the prompt has {} image tokens but its {tiles} tiles give {rows} feature rows",
                    image_pos.len()
                )));
            }
            Some(f)
        }
        None => None,
    };
    model.synchronize()?;
    let vision_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(Prefilling { req: i, blocks, features, image_pos, done: 0, started, vision_ms })
}

/// Prefills the next chunk of `p`'s prompt; returns the greedy token after it.
fn prefill_chunk<M: StepModel>(
    model: &mut M,
    p: &mut Prefilling<M::Features>,
    r: &Request,
    chunk: usize,
) -> Result<u32> {
    let (start, end) = (p.done, (p.done + chunk).min(r.ids.len()));
    // Image rows of this chunk (relative) and the feature rows they take, which are consecutive.
    let lo = p.image_pos.partition_point(|&q| q < start);
    let hi = p.image_pos.partition_point(|&q| q < end);
    let rows: Vec<i32> = p.image_pos[lo..hi].iter().map(|&q| (q - start) as i32).collect();
    let seq = SeqInput { tokens: &r.ids[start..end], start, blocks: &p.blocks };
    let image = match &p.features {
        Some(f) if hi > lo => Some((f, lo..hi, rows.as_slice())),
        _ => None,
    };
    let next = model.prefill(seq, image)?;
    p.done = end;
    Ok(next)
}

/// The first token of a request whose prefill just ended. `Ok(Err(..))`: it finished on that token (EOS,
/// stop string or a budget of one).
#[allow(clippy::type_complexity)]
fn start_answer<M: StepModel>(
    model: &mut M,
    p: Prefilling<M::Features>,
    r: &Request,
    greedy: u32,
    max_context: usize,
    decode: &dyn Fn(&[u32]) -> Result<String>,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<std::result::Result<Active, (Active, Output)>> {
    let sp = &r.opts.sampling;
    // Greedy without a repetition penalty is the model's argmax; anything else samples on the host.
    let sampler = if sp.is_greedy() && sp.repetition_penalty == 1.0 { None } else { Some(Sampler::new(sp.clone())?) };
    let mut a = Active {
        req: p.req,
        tokens: r.ids.clone(),
        prompt_len: r.ids.len(),
        cached: r.ids.len(),
        blocks: p.blocks,
        stop: StopMatcher::new(&r.opts.stop_strings),
        sampler,
        started: p.started,
        first_token: None,
        vision_ms: p.vision_ms,
        text: String::new(),
    };
    let first = match &mut a.sampler {
        Some(s) => {
            let l = model.last_logits(1)?;
            s.sample(&l, &r.ids)?
        }
        None => greedy,
    };
    Ok(match push_token(&mut a, first, &r.opts, max_context, decode, on_text)? {
        None => Ok(a),
        Some(reason) => {
            let out = output(&a, reason);
            Err((a, out))
        }
    })
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

fn output(a: &Active, reason: FinishReason) -> Output {
    let first = a.first_token.unwrap_or(a.started);
    Output {
        ids: a.tokens[a.prompt_len..].to_vec(),
        text: a.text.clone(),
        finish_reason: reason,
        vision_ms: a.vision_ms,
        ttft_ms: (first - a.started).as_secs_f64() * 1e3,
        decode_ms: first.elapsed().as_secs_f64() * 1e3,
    }
}

#[cfg(test)]
mod tests {
    //! The scheduler against a fake model whose "KV cache" stores the token ids themselves in the blocks the
    //! scheduler hands out, and whose next token is a hash of every id it reads back through the block
    //! table: a block shared by two live sequences, a table that does not cover a position, a chunk written
    //! at the wrong offset or an image row placed wrong all change the answers, which are compared with a
    //! plain one-sequence simulation.

    use std::collections::HashMap;

    use super::*;
    use crate::backend::SamplingParams;

    const IMAGE: u32 = 999;
    const VOCAB: usize = 6000;

    /// The rule both the fake model and the reference use: a hash of the whole sequence so far.
    fn rule(seq: &[u32]) -> u32 {
        let h = seq.iter().fold(7u64, |h, &t| h.wrapping_mul(1_000_003).wrapping_add(t as u64));
        10 + (h % (VOCAB as u64 - 20)) as u32
    }

    #[derive(Default)]
    struct Fake {
        slots: HashMap<usize, u32>,
        max_batch: usize,
        max_chunk: usize,
        last: Vec<u32>,
        /// 'P' per prefill chunk, 'D' per decode step, in call order.
        calls: String,
    }

    impl Fake {
        fn write(&mut self, seq: &SeqInput, tokens: &[u32]) {
            for (j, &t) in tokens.iter().enumerate() {
                let p = seq.start + j;
                let slot = seq.blocks[p / 4] as usize * 4 + p % 4;
                self.slots.insert(slot, t);
            }
        }
        fn read(&self, seq: &SeqInput) -> Vec<u32> {
            let n = seq.start + seq.tokens.len();
            (0..n).map(|p| self.slots.get(&(seq.blocks[p / 4] as usize * 4 + p % 4)).copied().unwrap_or(0)).collect()
        }
    }

    impl StepModel for Fake {
        type Features = Vec<u32>;
        fn block_size(&self) -> usize {
            4
        }
        fn prefill_chunk(&self) -> usize {
            5
        }
        fn image_token_id(&self) -> u32 {
            IMAGE
        }
        fn encode_images(&mut self, pixels: &[f32], tiles: usize) -> Result<(Vec<u32>, usize)> {
            // Three "feature rows" per tile, derived from the pixels.
            let f: Vec<u32> =
                (0..tiles * 3).map(|r| 5000 + (pixels[r % pixels.len()] as u32) * 10 + r as u32).collect();
            let n = f.len();
            Ok((f, n))
        }
        fn prefill(&mut self, seq: SeqInput, image: Option<(&Vec<u32>, Range<usize>, &[i32])>) -> Result<u32> {
            self.max_chunk = self.max_chunk.max(seq.tokens.len());
            self.calls.push('P');
            let mut toks = seq.tokens.to_vec();
            if let Some((f, range, rows)) = image {
                assert_eq!(range.len(), rows.len());
                for (&r, &v) in rows.iter().zip(&f[range]) {
                    assert_eq!(toks[r as usize], IMAGE, "feature placed on a non-image row");
                    toks[r as usize] = v;
                }
            }
            self.write(&seq, &toks);
            let next = rule(&self.read(&seq));
            self.last = vec![next];
            Ok(next)
        }
        fn decode(&mut self, seqs: &[SeqInput]) -> Result<Vec<u32>> {
            self.max_batch = self.max_batch.max(seqs.len());
            self.calls.push('D');
            for s in seqs {
                self.write(s, s.tokens);
            }
            self.last = seqs.iter().map(|s| rule(&self.read(s))).collect();
            Ok(self.last.clone())
        }
        fn last_logits(&mut self, b: usize) -> Result<Vec<f32>> {
            // A peak at the greedy token with a slope around it, so sampling has a real distribution.
            let mut out = Vec::with_capacity(b * VOCAB);
            for &g in &self.last[..b] {
                out.extend((0..VOCAB).map(|v| -((v as f32 - g as f32).abs() * 0.7)));
            }
            Ok(out)
        }
        fn synchronize(&mut self) -> Result<()> {
            Ok(())
        }
    }

    fn opts(max_new: usize) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: max_new,
            sampling: SamplingParams::default(),
            eos_ids: vec![],
            stop_strings: vec![],
        }
    }

    fn text(ids: &[u32]) -> Result<String> {
        Ok(ids.iter().map(|i| format!("a{i} ")).collect())
    }

    fn requests() -> Vec<Request> {
        let mut reqs = Vec::new();
        for (i, len) in [3usize, 17, 1, 9, 26, 4, 12].into_iter().enumerate() {
            let mut ids: Vec<u32> = (0..len as u32).map(|t| 100 + 7 * t + i as u32).collect();
            let pixels = if i % 3 == 1 {
                // One "tile" = 3 image tokens in the middle of the prompt (crossing a chunk boundary for 17).
                ids.splice(len / 2..len / 2, [IMAGE; 3]);
                Some((vec![i as f32 + 1.0; 8], 1))
            } else {
                None
            };
            reqs.push(Request { ids, pixels, opts: opts(3 + i % 4) });
        }
        reqs
    }

    /// The answer of one request computed directly: image tokens replaced by their features, then `rule`.
    fn reference(r: &Request) -> Vec<u32> {
        let mut seq = r.ids.clone();
        if let Some((px, tiles)) = &r.pixels {
            let (f, _) = Fake::default().encode_images(px, *tiles).unwrap();
            for (t, &v) in seq.iter_mut().filter(|t| **t == IMAGE).zip(&f) {
                *t = v;
            }
        }
        let mut out = Vec::new();
        for _ in 0..r.opts.max_new_tokens {
            let next = rule(&seq);
            out.push(next);
            seq.push(next);
        }
        out
    }

    fn limits(max_seqs: usize, num_blocks: usize) -> Limits {
        Limits { max_seqs, max_context: 64, num_blocks }
    }

    #[test]
    fn batched_answers_equal_the_direct_computation() {
        let reqs = requests();
        let mut fake = Fake::default();
        let mut streamed: Vec<String> = vec![String::new(); reqs.len()];
        let outs = run(&mut fake, limits(3, 40), &reqs, &text, &mut |i, s| streamed[i].push_str(s)).unwrap();
        for (i, (r, o)) in reqs.iter().zip(&outs).enumerate() {
            assert_eq!(o.ids, reference(r), "request {i}");
            assert_eq!(o.finish_reason, FinishReason::Length);
            assert_eq!(streamed[i], text(&o.ids).unwrap(), "request {i}: streamed text");
            assert_eq!(o.text, streamed[i]);
        }
        assert!(fake.max_batch <= 3 && fake.max_batch >= 2, "batch {}", fake.max_batch);
        assert!(fake.max_chunk <= 5);
    }

    #[test]
    fn a_small_pool_admits_one_at_a_time_and_frees_blocks() {
        let reqs = requests();
        // The largest request needs ceil((29 + 3) / 4) = 8 blocks: with 9 only one fits at a time.
        let mut fake = Fake::default();
        let outs = run(&mut fake, limits(8, 9), &reqs, &text, &mut |_, _| {}).unwrap();
        for (r, o) in reqs.iter().zip(&outs) {
            assert_eq!(o.ids, reference(r));
        }
        assert!(fake.max_batch <= 2, "batch {}", fake.max_batch);
    }

    #[test]
    fn stops_on_eos_stop_strings_and_the_budget() {
        let base = Request { ids: vec![5, 6, 7], pixels: None, opts: opts(6) };
        let want = reference(&base);
        let mut fake = Fake::default();
        let eos = Request { opts: GenerateOptions { eos_ids: vec![want[2]], ..opts(6) }, ..base_clone(&base) };
        let stop = Request {
            opts: GenerateOptions { stop_strings: vec![format!("a{}", want[3])], ..opts(6) },
            ..base_clone(&base)
        };
        let outs = run(&mut fake, limits(4, 40), &[eos, stop, base_clone(&base)], &text, &mut |_, _| {}).unwrap();
        assert_eq!((outs[0].ids.as_slice(), outs[0].finish_reason), (&want[..2], FinishReason::Stop));
        assert_eq!(outs[1].finish_reason, FinishReason::Stop);
        assert_eq!(outs[1].text, text(&want[..3]).unwrap(), "cut before the stop string");
        assert_eq!((outs[2].ids.as_slice(), outs[2].finish_reason), (&want[..], FinishReason::Length));
    }

    fn base_clone(r: &Request) -> Request {
        Request { ids: r.ids.clone(), pixels: r.pixels.clone(), opts: r.opts.clone() }
    }

    #[test]
    fn seeded_sampling_does_not_depend_on_the_batch() {
        let sampled = |seed: u64| GenerateOptions {
            sampling: SamplingParams { do_sample: true, temperature: 1.0, seed, ..SamplingParams::default() },
            ..opts(5)
        };
        let reqs: Vec<Request> =
            requests().into_iter().enumerate().map(|(i, r)| Request { opts: sampled(i as u64), ..r }).collect();
        let together = run(&mut Fake::default(), limits(4, 60), &reqs, &text, &mut |_, _| {}).unwrap();
        let greedy: Vec<Vec<u32>> = requests().iter().map(reference).collect();
        let mut differs = false;
        for (i, r) in reqs.iter().enumerate() {
            let alone =
                run(&mut Fake::default(), limits(1, 60), std::slice::from_ref(r), &text, &mut |_, _| {}).unwrap();
            assert_eq!(together[i].ids, alone[0].ids, "request {i}");
            let n = together[i].ids.len().min(greedy[i].len());
            differs |= together[i].ids[..n] != greedy[i][..n];
        }
        assert!(differs, "temperature 1 never left the greedy path: the sampler was not used");
    }

    #[test]
    fn a_long_prompt_is_prefilled_between_decode_steps() {
        let short = Request { ids: vec![1, 2, 3], pixels: None, opts: opts(12) };
        let long = Request { ids: (0..26).collect(), pixels: None, opts: opts(2) };
        let reqs = [short, long];
        let mut fake = Fake::default();
        let outs = run(&mut fake, limits(2, 40), &reqs, &text, &mut |_, _| {}).unwrap();
        // 1 chunk for the short prompt, 6 of 5 tokens for the long one, each followed by a decode step.
        assert!(fake.calls.starts_with("PDPDPDPDPDPDPD"), "{}", fake.calls);
        assert!(!fake.calls.contains("PP"), "{}", fake.calls);
        for (r, o) in reqs.iter().zip(&outs) {
            assert_eq!(o.ids, reference(r));
        }
    }

    #[test]
    fn bad_requests_are_errors() {
        let mut fake = Fake::default();
        let empty = Request { ids: vec![], pixels: None, opts: opts(2) };
        assert!(run(&mut fake, limits(2, 40), &[empty], &text, &mut |_, _| {}).is_err());
        let long = Request { ids: vec![1; 64], pixels: None, opts: opts(2) };
        let err = run(&mut fake, limits(2, 40), &[long], &text, &mut |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("context"), "{err}");
        let big = Request { ids: vec![1; 40], pixels: None, opts: opts(20) };
        let err = run(&mut fake, limits(2, 10), &[big], &text, &mut |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("KV blocks"), "{err}");
        // Two tiles' features (6 rows) for a prompt with 3 image tokens.
        let wrong = Request { ids: vec![1, IMAGE, IMAGE, IMAGE, 2], pixels: Some((vec![1.0; 8], 2)), opts: opts(2) };
        let err = run(&mut fake, limits(2, 40), &[wrong], &text, &mut |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("feature rows"), "{err}");
        assert!(
            run(&mut fake, Limits { max_seqs: 0, max_context: 8, num_blocks: 4 }, &[], &text, &mut |_, _| {}).is_err()
        );
    }
}
