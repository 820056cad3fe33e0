//! The batching scheduler driving a model that keeps its KV blocks on a "device" (`BatchModel::device_kv`):
//! the scheduler's pool then only counts blocks (`BlockPool::accounting`), and every block id, prefix reuse,
//! preemption, rollback and copy-on-write copy it hands the model must be right, because the model reads
//! nothing else.
//!
//! The device here is a fake (`DeviceModel`): its storage is a vector of `blocks * block_size` slots, each
//! holding the token, the position, the image feature hash and a hash chain of the whole context up to that
//! position (what a real key/value vector depends on). Each pass it reserves, performs the queued block copies
//! before any write, writes the new tokens through `kv.blocks(i)`, then reads the whole context of every
//! sequence back from its own storage and fails (`Err`, naming the block and slot) on an empty slot, a slot of
//! another position, or a slot whose chain does not follow from the slots before it (another sequence's
//! token); a slot written in a pass by one sequence and read or written by another is an error too. It keeps
//! no per-sequence state: the next token is a function of the chain read back, so an answer
//! equals the one computed alone only if every block the scheduler handed over held the right context. It
//! returns the argmax always and logits only when a row samples, so both paths of the scheduler run.
//!
//! Checked: mixed requests (shared long prefixes, images with the same and with different digests, greedy,
//! repetition penalty, seeded sampling, a stop string) in a pool small enough to force preemptions answer as
//! they do alone and give every block back; a second question about the same image or prefix reuses full
//! blocks from the device storage and answers as alone; a failing pass fails its batch with
//! `Failure::Internal` and the engine goes on; the engine thread adopts the device's pool size; and
//! `BlockPool::accounting` queues exactly the copy-on-write copies a fork asks for (the scheduler itself never
//! shares a partial block, so it never asks for one), and a failed pass on an accounting pool gives the table
//! back its original partial block instead of a copy that was never made.

#[path = "support/events.rs"]
mod events;
use events::drain;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use facellm::backend::SamplingParams;
use facellm::engine::batch::{
    BatchModel, BatchOutput, DeviceKv, EngineConfig, EngineHandle, EngineMetrics, Event, Failure, ImageInput,
    ImageSource, Request, Scheduler, SeqParams, Slots, Summary, VisionCache,
};
use facellm::engine::FinishReason;
use facellm::kv::{BlockPool, BlockTable, KvLayout, PagedBatch};
use facellm::model::facellm::BatchInput;
use facellm::model::llm::BatchKvStore;
use facellm::model::IMAGE_TOKENS_PER_TILE;
use facellm::tensor::Tensor;
use facellm::tokenizer::{ChatOptions, Message, Part, Tokenizer};
use facellm::{Error, Result};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Tokens per device block.
const BS: usize = 16;
/// Embedding rows of InternVL3 (the tokenizer's ids below `<video>`).
const VOCAB: usize = 151_674;
const EOS: u32 = 151_645;
/// Width of the fake projector features.
const HIDDEN: usize = 4;
/// A prompt holding this id makes the fake model's pass fail.
const POISON: u32 = 77_777;
/// Predicted ids are ordinary Qwen2 text tokens from this range (or EOS); narrow, so that answers repeat
/// tokens and a repetition penalty changes them.
const TEXT_IDS: std::ops::Range<u64> = 1000..1100;
const TILE: usize = 3 * 448 * 448;

fn mix(mut x: u64) -> u64 {
    // splitmix64's finalizer: deterministic on every platform and run.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The chain value of position `pos` holding `token` (with image feature hash `feat`, 0 for text) after a
/// context whose chain is `prev`: what a real key/value vector depends on.
fn chain_step(prev: u64, token: u32, pos: usize, feat: u64) -> u64 {
    mix(prev ^ mix(((token as u64) << 32) | pos as u64) ^ feat.rotate_left(17))
}

/// The chain "before position 0".
const CHAIN_START: u64 = 0x5EED;

/// The fake model's next token for a context whose chain is `chain`, and the runner-up (a repetition penalty
/// of 1.1 on the best, when it was already seen, makes the runner-up win).
fn predict(chain: u64) -> (u32, u32) {
    let span = TEXT_IDS.end - TEXT_IDS.start;
    let best = if chain.is_multiple_of(13) { EOS } else { (TEXT_IDS.start + (chain >> 8) % span) as u32 };
    let mut runner = (TEXT_IDS.start + (chain >> 24) % span) as u32;
    if runner == best {
        runner += 1;
    }
    (best, runner)
}

/// What one slot of the fake device storage holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    token: u32,
    pos: usize,
    feat: u64,
    chain: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    passes: usize,
    /// Passes that returned logits (some wanted row sampled) and passes that returned the argmax alone.
    logits_passes: usize,
    argmax_only_passes: usize,
    copies: usize,
    /// Slots read back that this pass did not write (the context that came from earlier passes or requests).
    slots_read: usize,
}

/// A model whose KV cache lives in its own storage (see the module docs).
struct DeviceModel {
    blocks: usize,
    image_id: u32,
    storage: RefCell<Vec<Option<Slot>>>,
    stats: RefCell<Stats>,
}

fn bad(msg: String) -> Error {
    Error::Invalid(format!("fake device: {msg}"))
}

impl DeviceModel {
    fn new(blocks: usize, image_id: u32) -> DeviceModel {
        DeviceModel {
            blocks,
            image_id,
            storage: RefCell::new(vec![None; blocks * BS]),
            stats: RefCell::new(Stats::default()),
        }
    }

    fn stats(&self) -> Stats {
        *self.stats.borrow()
    }

    /// The storage index of position `pos` of a sequence with `blocks`.
    fn slot(&self, seq: usize, blocks: &[u32], pos: usize) -> Result<usize> {
        let b = *blocks
            .get(pos / BS)
            .ok_or_else(|| bad(format!("input {seq}: position {pos} is past its {} blocks", blocks.len())))?;
        if b as usize >= self.blocks {
            return Err(bad(format!("input {seq}: block {b} is outside the device's {} blocks", self.blocks)));
        }
        Ok(b as usize * BS + pos % BS)
    }

    /// Hashes of the feature rows of the image tokens among `input.ids`, in order; checks there is exactly one
    /// row per image token.
    fn feature_hashes(&self, seq: usize, input: &BatchInput) -> Result<Vec<u64>> {
        let images = input.ids.iter().filter(|&&t| t == self.image_id).count();
        let Some(f) = input.features else {
            if images > 0 {
                return Err(bad(format!("input {seq}: {images} image tokens and no features")));
            }
            return Ok(Vec::new());
        };
        if f.shape() != [images, HIDDEN] {
            return Err(bad(format!("input {seq}: {images} image tokens but features {:?}", f.shape())));
        }
        Ok(f.f32s()?
            .chunks(HIDDEN)
            .map(|row| row.iter().fold(0x1234_u64, |h, x| mix(h ^ x.to_bits() as u64)))
            .collect())
    }

    /// Reads positions `0..len` of a sequence back from the storage, checks every slot, and returns the chain
    /// of the last one.
    fn read_back(&self, storage: &[Option<Slot>], seq: usize, blocks: &[u32], len: usize) -> Result<u64> {
        let mut chain = CHAIN_START;
        for pos in 0..len {
            let idx = self.slot(seq, blocks, pos)?;
            let (b, s) = (blocks[pos / BS], pos % BS);
            let Some(slot) = storage[idx] else {
                return Err(bad(format!("input {seq}: position {pos} (block {b} slot {s}) is empty")));
            };
            if slot.pos != pos {
                return Err(bad(format!(
                    "input {seq}: position {pos} (block {b} slot {s}) holds position {} of another sequence",
                    slot.pos
                )));
            }
            if (slot.token == self.image_id) != (slot.feat != 0) {
                return Err(bad(format!("input {seq}: block {b} slot {s} has a feature hash that fits no token")));
            }
            let want = chain_step(chain, slot.token, pos, slot.feat);
            if slot.chain != want {
                return Err(bad(format!(
                    "input {seq}: position {pos} (block {b} slot {s}) holds token {} of another sequence (its \
                     context differs)",
                    slot.token
                )));
            }
            chain = slot.chain;
        }
        Ok(chain)
    }
}

impl BatchModel for DeviceModel {
    fn context(&self) -> usize {
        4096
    }

    fn vocab(&self) -> usize {
        VOCAB
    }

    fn image_token_id(&self) -> u32 {
        self.image_id
    }

    fn kv_shape(&self) -> (usize, usize, usize) {
        (2, 1, 8)
    }

    /// Features `[tiles * 256, HIDDEN]` sampled from the pixels: other pixels, other features.
    fn encode_images(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let shape = pixel_values.shape();
        if shape.len() != 4 || shape[1..] != [3, 448, 448] {
            return Err(bad(format!("pixel values {shape:?}, want [tiles, 3, 448, 448]")));
        }
        let px = pixel_values.f32s()?;
        let rows = shape[0] * IMAGE_TOKENS_PER_TILE;
        let mut out = Vec::with_capacity(rows * HIDDEN);
        for r in 0..rows {
            let tile = &px[(r / IMAGE_TOKENS_PER_TILE) * TILE..][..TILE];
            for j in 0..HIDDEN {
                out.push(tile[((r % IMAGE_TOKENS_PER_TILE) * HIDDEN + j) * 587 % TILE] + r as f32 * 1e-3);
            }
        }
        Tensor::from_f32([rows, HIDDEN], out)
    }

    fn device_kv(&self) -> Option<DeviceKv> {
        Some(DeviceKv { blocks: self.blocks, block_size: BS })
    }

    fn forward_batch(
        &self,
        inputs: &[BatchInput],
        kv: &mut dyn BatchKvStore,
        _row_invariant: bool,
    ) -> Result<BatchOutput> {
        if kv.seqs() != inputs.len() {
            return Err(bad(format!("{} inputs but {} kv sequences", inputs.len(), kv.seqs())));
        }
        let mut storage = self.storage.borrow_mut();
        let mut stats = self.stats.borrow_mut();
        stats.passes += 1;

        // Blocks for every input first, as a device model launches one pass for the batch.
        let mut tables = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let (held, n) = (kv.held(i), input.ids.len());
            if n == 0 {
                return Err(bad(format!("input {i} has no tokens")));
            }
            kv.reserve(i, n)?;
            let blocks = kv.blocks(i)?.to_vec();
            if blocks.len() != (held + n).div_ceil(BS) {
                return Err(bad(format!("input {i}: {} blocks for {} tokens", blocks.len(), held + n)));
            }
            tables.push((held, blocks));
        }

        // Copy-on-write copies before any write.
        for (src, dst) in kv.take_copies() {
            let (s, d) = (src as usize, dst as usize);
            if s >= self.blocks || d >= self.blocks || s == d {
                return Err(bad(format!("copy of block {src} into block {dst}")));
            }
            for k in 0..BS {
                storage[d * BS + k] = storage[s * BS + k];
            }
            stats.copies += 1;
        }

        // A slot written in this pass belongs to one input alone: no other input writes or reads it.
        let mut writer: HashMap<usize, usize> = HashMap::new();
        for (i, (held, blocks)) in tables.iter().enumerate() {
            for pos in *held..held + inputs[i].ids.len() {
                if let Some(j) = writer.insert(self.slot(i, blocks, pos)?, i) {
                    let (b, s) = (blocks[pos / BS], pos % BS);
                    return Err(bad(format!("inputs {j} and {i} both write block {b} slot {s}")));
                }
            }
        }
        for (i, (held, blocks)) in tables.iter().enumerate() {
            for pos in 0..*held {
                if let Some(&j) = writer.get(&self.slot(i, blocks, pos)?) {
                    let (b, s) = (blocks[pos / BS], pos % BS);
                    return Err(bad(format!("input {i} reads block {b} slot {s}, which input {j} writes")));
                }
            }
        }

        let mut chains = Vec::new();
        let mut sampled = false;
        for (i, (input, (held, blocks))) in inputs.iter().zip(&tables).enumerate() {
            let feats = self.feature_hashes(i, input)?;
            let mut feats = feats.into_iter();
            // The chain of the context before the pass comes from the storage alone.
            let mut chain = match held.checked_sub(1) {
                None => CHAIN_START,
                Some(last) => {
                    storage[self.slot(i, blocks, last)?]
                        .ok_or_else(|| bad(format!("input {i}: position {last} (before the pass) is empty")))?
                        .chain
                }
            };
            for (k, &token) in input.ids.iter().enumerate() {
                let pos = held + k;
                let feat = if token == self.image_id {
                    feats.next().ok_or_else(|| bad(format!("input {i}: no feature row for position {pos}")))?
                } else {
                    0
                };
                chain = chain_step(chain, token, pos, feat);
                storage[self.slot(i, blocks, pos)?] = Some(Slot { token, pos, feat, chain });
            }
            // After its writes, so that the failed pass leaves slots behind that nobody may read.
            if input.ids.contains(&POISON) {
                return Err(bad(format!("input {i} holds the poison token {POISON}")));
            }
            let end = held + input.ids.len();
            let read = self.read_back(&storage, i, blocks, end)?;
            if read != chain {
                return Err(bad(format!("input {i}: the context read back does not end where the pass wrote")));
            }
            stats.slots_read += held;
            if input.logits {
                chains.push(read);
                sampled |= !input.greedy;
            }
        }
        drop(storage);
        for (i, input) in inputs.iter().enumerate() {
            kv.commit(i, input.ids.len())?;
        }

        let argmax = chains.iter().map(|&c| predict(c).0).collect();
        let logits = if sampled {
            stats.logits_passes += 1;
            let mut data = vec![-1e4f32; chains.len() * VOCAB];
            for (row, &c) in data.chunks_mut(VOCAB).zip(&chains) {
                row[TEXT_IDS.start as usize..TEXT_IDS.end as usize].fill(0.0);
                let (best, runner) = predict(c);
                row[runner as usize] = 5.7;
                row[best as usize] = 6.0;
            }
            Some(Tensor::from_f32([chains.len(), VOCAB], data)?)
        } else {
            stats.argmax_only_passes += 1;
            None
        };
        Ok(BatchOutput { logits, argmax: Some(argmax) })
    }
}

/// An image of the tests: its digest and one tile of pixels made from `seed`.
#[derive(Clone)]
struct Image {
    digest: [u8; 32],
    pixels: Tensor,
}

fn image(seed: u8) -> Image {
    let data = (0..TILE).map(|i| (mix(((seed as u64) << 40) ^ i as u64) >> 40) as f32 / (1u64 << 24) as f32).collect();
    Image { digest: [seed; 32], pixels: Tensor::from_f32([1, 3, 448, 448], data).expect("pixels") }
}

#[derive(Clone)]
struct Case {
    name: String,
    ids: Vec<u32>,
    image: Option<Image>,
    params: SeqParams,
}

struct Fixture {
    tok: Tokenizer,
    image_id: u32,
}

fn fixture() -> Fixture {
    let tok = Tokenizer::internvl3().expect("bundled tokenizer");
    let image_id = tok.token_to_id("<IMG_CONTEXT>").expect("<IMG_CONTEXT> id");
    assert!((image_id as usize) < VOCAB && (EOS as usize) < VOCAB && (POISON as usize) < VOCAB);
    Fixture { tok, image_id }
}

/// A long system prompt shared by several requests (well over three full blocks).
fn system_prompt() -> String {
    (0..16).map(|i| format!("Rule {i}: describe faces precisely.")).collect::<Vec<_>>().join(" ")
}

fn chat(f: &Fixture, system: Option<&str>, question: &str, image: bool) -> Vec<u32> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message::text("system", s));
    }
    messages.push(if image {
        Message::parts("user", vec![Part::image(), Part::text(question)])
    } else {
        Message::text("user", question)
    });
    let tiles = if image { vec![1] } else { vec![] };
    f.tok.encode_chat(&messages, &tiles, &ChatOptions::default()).expect("prompt").ids
}

fn greedy(max_tokens: usize) -> SeqParams {
    SeqParams { max_tokens, sampling: SamplingParams::greedy(), eos_ids: vec![EOS], stop: vec![] }
}

fn case(name: &str, ids: Vec<u32>, image: Option<Image>, params: SeqParams) -> Case {
    Case { name: name.into(), ids, image, params }
}

fn request(slots: &Arc<Slots>, c: &Case) -> (Request, UnboundedReceiver<Event>) {
    let (tx, rx) = unbounded_channel();
    let images = c
        .image
        .iter()
        .map(|img| ImageInput { digest: img.digest, tiles: 1, source: ImageSource::Pixels(img.pixels.clone()) })
        .collect();
    let req = Request {
        prompt: c.ids.clone(),
        images,
        params: c.params.clone(),
        arrived: Instant::now(),
        deadline: None,
        events: tx,
        permit: slots.try_acquire().expect("a free slot"),
    };
    (req, rx)
}

fn scheduler<'a>(
    model: &'a DeviceModel,
    tok: &'a Tokenizer,
    cfg: EngineConfig,
) -> (Scheduler<'a, DeviceModel>, Arc<EngineMetrics>) {
    let metrics = Arc::new(EngineMetrics::default());
    let vision = Arc::new(Mutex::new(VisionCache::new(8, 64 << 20)));
    (Scheduler::new(model, tok, cfg, metrics.clone(), vision).expect("scheduler"), metrics)
}

fn run_until_idle(s: &mut Scheduler<DeviceModel>) -> usize {
    let mut steps = 0;
    while !s.is_idle() {
        s.step();
        steps += 1;
        assert!(steps < 10_000, "the scheduler makes no progress");
    }
    steps
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Runs one request to the end on a scheduler of its own and returns its text and summary (or failure).
fn run_one(
    s: &mut Scheduler<DeviceModel>,
    slots: &Arc<Slots>,
    c: &Case,
) -> (String, std::result::Result<Summary, Failure>) {
    let (req, mut rx) = request(slots, c);
    s.submit(req);
    run_until_idle(s);
    let (text, end) = drain(&mut rx);
    (text, end.unwrap_or_else(|| panic!("{}: the request never ended", c.name)))
}

/// The answer of `c` computed alone, on a fresh device of 128 blocks with the default prefill chunk.
fn alone(f: &Fixture, c: &Case) -> (String, Summary) {
    let model = DeviceModel::new(128, f.image_id);
    let (mut s, _) = scheduler(&model, &f.tok, EngineConfig::default());
    let (text, end) = run_one(&mut s, &Slots::new(4), c);
    let summary = end.unwrap_or_else(|e| panic!("{} alone failed: {e:?}", c.name));
    assert_eq!(s.kv_blocks_used(), 0, "{} alone: blocks left", c.name);
    (text, summary)
}

/// Tokens `match_prefix` can reuse when `second` follows `first`: the full blocks of their common prefix,
/// leaving at least one token of `second` to run.
fn reusable(first: &[u32], second: &[u32]) -> usize {
    let common = first.iter().zip(second).take_while(|(a, b)| a == b).count();
    common.min(second.len() - 1) / BS * BS
}

/// The twelve requests of the batch test.
fn mixed_cases(f: &Fixture) -> Vec<Case> {
    let sys = system_prompt();
    let sampled =
        SamplingParams { do_sample: true, temperature: 0.8, top_k: 50, top_p: 0.9, seed: 11, ..Default::default() };
    let penalized = SamplingParams { repetition_penalty: 1.1, ..SamplingParams::greedy() };
    let long_text = (0..40).map(|i| format!("item {i} is blue")).collect::<Vec<_>>().join(", ");
    let (a, b) = (image(1), image(2));
    vec![
        case("sys-a", chat(f, Some(&sys), "What is a face?", false), None, greedy(24)),
        case("sys-b", chat(f, Some(&sys), "Name three facial features.", false), None, greedy(30)),
        case(
            "sys-penalty",
            chat(f, Some(&sys), "Describe a smile.", false),
            None,
            SeqParams { sampling: penalized, ..greedy(40) },
        ),
        case(
            "sys-sampled",
            chat(f, Some(&sys), "Write a short poem.", false),
            None,
            SeqParams { sampling: sampled, ..greedy(30) },
        ),
        case("sys-c", chat(f, Some(&sys), "Why do eyes blink?", false), None, greedy(20)),
        case("short", f.tok.encode("Hello there, how are you?").expect("encode"), None, greedy(24)),
        case(
            "short-stop",
            f.tok.encode("Say something nice.").expect("encode"),
            None,
            SeqParams { stop: vec!["e".into()], ..greedy(24) },
        ),
        case("long", chat(f, None, &long_text, false), None, greedy(16)),
        case("face-a-1", chat(f, None, "Describe the facial expression.", true), Some(a.clone()), greedy(16)),
        case("face-a-2", chat(f, None, "How old is this person?", true), Some(a), greedy(16)),
        // The same ids as face-a-1 with another image: the prefix salt must keep their blocks apart.
        case("face-b-1", chat(f, None, "Describe the facial expression.", true), Some(b), greedy(16)),
        case("sys-d", chat(f, Some(&sys), "Is this a portrait?", false), None, greedy(28)),
    ]
}

/// Twelve mixed requests together on a device of 24 blocks with `max_seqs` 4 and a prefill chunk of 32:
/// sequences are preempted and recomputed, prefixes are shared, both the argmax and the logits path run, and
/// every answer equals the one computed alone; every block comes back.
#[test]
fn batched_answers_equal_alone_through_preemption() {
    let f = fixture();
    let cases = mixed_cases(&f);
    let lens: Vec<usize> = cases.iter().map(|c| c.ids.len()).collect();
    assert!(lens.iter().any(|&n| n <= 10) && lens.iter().any(|&n| (150..=200).contains(&n)), "lengths {lens:?}");
    assert!(reusable(&cases[0].ids, &cases[1].ids) > 3 * BS, "the system prompt spans over three full blocks");
    assert_eq!(cases[8].ids, cases[10].ids, "face-a-1 and face-b-1 differ only by their image");

    let want: Vec<(String, Summary)> = cases.iter().map(|c| alone(&f, c)).collect();
    assert_ne!(want[8].0, want[10].0, "another image gives another answer");
    // The scheduler must sample these on the logits, not take the model's argmax.
    for i in [2, 3] {
        let plain = Case { params: greedy(cases[i].params.max_tokens), ..cases[i].clone() };
        assert_ne!(alone(&f, &plain).0, want[i].0, "{}: its sampling parameters change the answer", cases[i].name);
    }
    assert!(want.iter().any(|(_, s)| s.finish_reason == FinishReason::Stop), "some answer ends by EOS or stop");
    assert!(want.iter().any(|(_, s)| s.finish_reason == FinishReason::Length), "some answer runs to its budget");

    let model = DeviceModel::new(24, f.image_id);
    let cfg = EngineConfig { max_seqs: 4, prefill_chunk: 32, ..EngineConfig::default() };
    let (mut s, metrics) = scheduler(&model, &f.tok, cfg);
    let slots = Slots::new(64);
    let mut rxs = Vec::new();
    for c in &cases {
        let (req, rx) = request(&slots, c);
        s.submit(req);
        rxs.push(rx);
    }
    let started = Instant::now();
    let steps = run_until_idle(&mut s);
    for ((c, rx), (want_text, want_summary)) in cases.iter().zip(&mut rxs).zip(&want) {
        let (text, end) = drain(rx);
        let summary = end.unwrap_or_else(|| panic!("{}: never ended", c.name)).unwrap_or_else(|e| {
            panic!("{}: failed: {e:?}", c.name);
        });
        assert_eq!(&text, want_text, "{}: batched answer vs alone", c.name);
        assert_eq!(
            (summary.finish_reason, summary.prompt_tokens, summary.completion_tokens),
            (want_summary.finish_reason, want_summary.prompt_tokens, want_summary.completion_tokens),
            "{}: summary",
            c.name
        );
    }
    let st = model.stats();
    println!(
        "{steps} steps in {:?}, {} preemptions, {} prefix hits ({} tokens), {} tokens generated, {st:?}",
        started.elapsed(),
        get(&metrics.preemptions),
        get(&metrics.prefix_hits),
        get(&metrics.prefix_hit_tokens),
        get(&metrics.generation_tokens),
    );
    assert!(get(&metrics.preemptions) > 0, "the pool was small enough to force preemptions");
    assert!(get(&metrics.prefix_hits) > 0, "the shared system prompt was found in the prefix cache");
    assert_eq!(get(&metrics.vision_images_encoded), 2, "one tower run per image digest");
    assert!(st.logits_passes > 0 && st.argmax_only_passes > 0, "both output paths ran: {st:?}");
    assert_eq!(s.kv_blocks_used(), 0, "every live block was given back");
    assert_eq!(slots.in_use(), 0, "every request's slot was given back");
    s.shutdown();
    assert_eq!(s.kv_blocks_used(), 0, "no block is held after the cached prefixes are released");
    assert_eq!(get(&metrics.kv_blocks_cached), 0);
}

/// A second question about the same image, or after the same long system prompt, once the first has finished:
/// the full blocks of the shared prefix come from the device storage (`cached_tokens`) and the answer equals
/// the one computed alone. The same question about another image shares nothing.
#[test]
fn second_question_reuses_device_blocks() {
    let f = fixture();
    let cases = mixed_cases(&f);
    let by_name = |n: &str| cases.iter().find(|c| c.name == n).expect("case").clone();
    let model = DeviceModel::new(64, f.image_id);
    let (mut s, metrics) = scheduler(&model, &f.tok, EngineConfig::default());
    let slots = Slots::new(8);
    let mut answers = Vec::new();
    let mut earlier: Vec<Case> = Vec::new();
    for name in ["face-a-1", "face-a-2", "sys-a", "sys-b", "sys-sampled", "face-b-1"] {
        let c = by_name(name);
        let before = model.stats().slots_read;
        let (text, end) = run_one(&mut s, &slots, &c);
        let summary = end.unwrap_or_else(|e| panic!("{name}: failed: {e:?}"));
        let (want_text, want_summary) = alone(&f, &c);
        assert_eq!(text, want_text, "{name}: answer vs alone");
        assert_eq!(summary.completion_tokens, want_summary.completion_tokens, "{name}");
        // Every earlier prompt's full blocks are still cached (the pool is large): the longest common prefix with
        // one of the same images (or none) counts.
        let digest = |c: &Case| c.image.as_ref().map(|i| i.digest);
        let cached =
            earlier.iter().filter(|e| digest(e) == digest(&c)).map(|e| reusable(&e.ids, &c.ids)).max().unwrap_or(0);
        assert_eq!(summary.cached_tokens, cached, "{name}: prompt tokens from the prefix cache");
        if cached > 0 {
            assert!(model.stats().slots_read - before >= cached, "{name}: the cached blocks were read back");
        }
        assert_eq!(s.kv_blocks_used(), 0, "{name}: blocks left");
        answers.push(text);
        earlier.push(c);
    }
    assert!(reusable(&earlier[0].ids, &earlier[1].ids) >= IMAGE_TOKENS_PER_TILE, "the image's blocks were reused");
    assert!(reusable(&earlier[2].ids, &earlier[3].ids) > 3 * BS, "the system prompt's blocks were reused");
    assert_ne!(answers[0], answers[5], "the other image's answer is its own");
    assert_eq!(get(&metrics.vision_images_encoded), 2, "the tower ran once per image");
    assert_eq!(get(&metrics.vision_hits), 1, "the second question about the face found its features");
    assert_eq!((get(&metrics.prefix_queries), get(&metrics.prefix_hits)), (6, 3));
    assert!(get(&metrics.kv_blocks_cached) > 0, "the prefixes are kept for the next question");
}

/// A pass that fails (a poison token in a prompt) fails the sequences of that step with `Failure::Internal`;
/// the others answer as alone, later requests (one repeating an earlier prompt) are served correctly, and every
/// block comes back.
#[test]
fn model_error_fails_the_step_and_the_engine_goes_on() {
    let f = fixture();
    let sys = system_prompt();
    let mut poisoned = chat(&f, Some(&sys), "What is a face?", false);
    let at = poisoned.len() - 4;
    poisoned.insert(at, POISON);
    // `short` is prefilled in the first step and done after its third token, long before the prefill of
    // `poisoned` (behind the whole of `sys-a` in the shared prefill chunk) reaches the poison.
    let first = [
        case("short", f.tok.encode("Hello there, how are you?").expect("encode"), None, greedy(3)),
        case("sys-a", chat(&f, Some(&sys), "What is a face?", false), None, greedy(24)),
        case("poisoned", poisoned, None, greedy(8)),
    ];
    let later = [
        case("sys-b", chat(&f, Some(&sys), "Name three facial features.", false), None, greedy(30)),
        first[1].clone(),
        case("face-a-1", chat(&f, None, "Describe the facial expression.", true), Some(image(1)), greedy(16)),
    ];
    let model = DeviceModel::new(64, f.image_id);
    let cfg = EngineConfig { max_seqs: 4, prefill_chunk: 32, ..EngineConfig::default() };
    let (mut s, metrics) = scheduler(&model, &f.tok, cfg);
    let slots = Slots::new(8);
    let mut rxs: Vec<_> = first
        .iter()
        .map(|c| {
            let (req, rx) = request(&slots, c);
            s.submit(req);
            rx
        })
        .collect();
    run_until_idle(&mut s);
    let mut failed = 0;
    for (c, rx) in first.iter().zip(&mut rxs) {
        let (text, end) = drain(rx);
        match end.unwrap_or_else(|| panic!("{}: never ended", c.name)) {
            Err(Failure::Internal(msg)) => {
                failed += 1;
                if c.name == "poisoned" {
                    assert!(msg.contains("poison token"), "poisoned: the message names the cause: {msg}");
                }
            }
            Err(e) => panic!("{}: failed otherwise: {e:?}", c.name),
            Ok(_) => {
                assert_ne!(c.name, "poisoned", "the poisoned request cannot succeed");
                assert_eq!(text, alone(&f, c).0, "{}: a survivor answers as alone", c.name);
            }
        }
    }
    println!("{failed} of {} requests failed with the poisoned step", first.len());
    assert!((1..first.len()).contains(&failed), "the poisoned step failed, the request done before it did not");
    assert_eq!(get(&metrics.failed), failed as u64);
    assert_eq!(s.kv_blocks_used(), 0, "the failed step gave its blocks back");
    for c in &later {
        let (text, end) = run_one(&mut s, &slots, c);
        end.unwrap_or_else(|e| panic!("{}: failed after the error: {e:?}", c.name));
        assert_eq!(text, alone(&f, c).0, "{}: answer after the error vs alone", c.name);
    }
    assert_eq!(get(&metrics.failed), failed as u64, "nothing failed after the error");
    assert_eq!(s.kv_blocks_used(), 0);
    s.shutdown();
    assert_eq!(s.kv_blocks_used(), 0, "no block is held after the cached prefixes are released");
}

/// The engine thread takes the device's pool size and block size over the configured ones, refuses a prompt
/// the device cannot hold, and serves answers equal to the scheduler's alone; an empty device is refused.
#[test]
fn engine_thread_adopts_the_device_pool() {
    let f = fixture();
    let c = case("sys-a", chat(&f, Some(&system_prompt()), "What is a face?", false), None, greedy(24));
    let want = alone(&f, &c).0;
    let image_id = f.image_id;
    let cfg = EngineConfig { kv_blocks: 2048, block_size: 32, ..EngineConfig::default() };
    let engine = EngineHandle::spawn(
        DeviceModel::new(20, image_id),
        Arc::new(Tokenizer::internvl3().expect("tokenizer")),
        cfg.clone(),
    )
    .expect("engine");
    assert_eq!(engine.kv_capacity_tokens, 20 * BS, "the device's pool, not the configured one");
    let (req, mut rx) = request(&engine.slots, &c);
    engine.submit(req).expect("submit");
    let too_long = case("too-long", vec![c.ids[0]; 20 * BS], None, greedy(4));
    let (req, mut bad_rx) = request(&engine.slots, &too_long);
    engine.submit(req).expect("submit");
    let mut text = String::new();
    loop {
        match rx.blocking_recv().expect("an event") {
            Event::Text(t) => text.push_str(&t),
            Event::Done(_) => break,
            Event::Failed(e) => panic!("failed: {e:?}"),
        }
    }
    assert_eq!(text, want);
    match bad_rx.blocking_recv() {
        Some(Event::Failed(Failure::Invalid(msg))) => assert!(msg.contains("KV cache holds 320"), "{msg}"),
        other => panic!("a prompt over the device's pool: {other:?}"),
    }
    engine.drain(Duration::from_secs(1));
    engine.join();
    assert!(!engine.is_alive());

    let empty = DeviceModel::new(0, image_id);
    let metrics = Arc::new(EngineMetrics::default());
    let vision = Arc::new(Mutex::new(VisionCache::new(8, 64 << 20)));
    assert!(Scheduler::new(&empty, &f.tok, cfg.clone(), metrics, vision).is_err(), "a device of no blocks");
    assert!(EngineHandle::spawn(
        DeviceModel::new(0, image_id),
        Arc::new(Tokenizer::internvl3().expect("tokenizer")),
        cfg
    )
    .is_err());
}

/// `BlockPool::accounting` counts blocks without storage: appending to a fork whose last block is partial
/// queues exactly one (old, new) copy, taken once; `layer`/`layer_mut` refuse; the audit holds; a failed pass
/// drops its queued copies. A pool with storage copies at once and queues nothing.
#[test]
fn accounting_pool_queues_copy_on_write() {
    let layout = KvLayout::new(2, 1, 8, 4).expect("layout");
    let mut pool = BlockPool::accounting(layout, 8).expect("accounting pool");
    assert!(!pool.has_storage());
    assert!(pool.layer(0).is_err() && pool.layer_mut(0).is_err(), "an accounting pool has no host storage");
    let mut a = BlockTable::new(0);
    pool.append(&mut a, &[1, 2, 3, 4, 5, 6]).expect("append");
    assert_eq!(a.blocks(), [0, 1]);
    assert!(pool.take_copies().is_empty(), "appending to a fresh table copies nothing");
    let mut b = pool.fork(&a).expect("fork");
    assert_eq!((pool.refcount(0), pool.refcount(1)), (2, 2));
    pool.append(&mut b, &[7]).expect("append to the fork");
    assert_eq!(b.blocks(), [0, 2], "the fork's partial last block was replaced by a private copy");
    assert_eq!(pool.take_copies(), [(1, 2)], "exactly the copy of the old partial block into the new one");
    assert!(pool.take_copies().is_empty(), "copies are handed over once");
    pool.append(&mut a, &[8, 9, 10]).expect("append to the original");
    assert_eq!(a.blocks(), [0, 1, 3]);
    assert!(pool.take_copies().is_empty(), "the original's last block is its own again");
    pool.audit([&a, &b]).expect("audit");

    // The same through a pass: `PagedBatch` hands the queued copy to the model and publishes on commit.
    let mut c = pool.fork(&b).expect("fork");
    {
        let tokens = [10u32];
        let mut batch = PagedBatch::new(&mut pool, vec![(&mut c, &tokens[..])], true);
        batch.reserve(0, 1).expect("reserve");
        assert_eq!(batch.blocks(0).expect("blocks"), [0, 4]);
        assert_eq!(batch.take_copies(), [(2, 4)], "the pass hands over the fork's copy");
        batch.commit(0, 1).expect("commit");
    }
    assert_eq!((c.len(), c.blocks()), (8, &[0, 4][..]));
    assert_eq!((pool.refcount(2), pool.refcount(4)), (1, 1));
    assert!(pool.take_copies().is_empty());
    pool.audit([&a, &b, &c]).expect("audit after the pass");
    for t in [&mut a, &mut b, &mut c] {
        pool.free(t).expect("free");
    }
    assert_eq!(pool.blocks_used(), 0);
    pool.audit([]).expect("audit when empty");

    let mut host = BlockPool::new(layout, 8).expect("host pool");
    assert!(host.has_storage() && host.layer(0).is_ok() && host.layer_mut(1).is_ok());
    let mut a = BlockTable::new(0);
    host.append(&mut a, &[1, 2, 3, 4, 5, 6]).expect("append");
    let mut b = host.fork(&a).expect("fork");
    host.append(&mut b, &[7]).expect("append to the fork");
    assert_eq!(b.blocks(), [0, 2], "copy-on-write happened");
    assert!(host.take_copies().is_empty(), "a pool with storage copies at once and queues nothing");
    host.audit([&a, &b]).expect("audit");
}

/// A pass on an accounting pool that reserves (queuing a copy-on-write copy) and fails before the model takes
/// the copies: `PagedBatch::drop` drops the queued copy, so the rollback must also give the table its original
/// partial block back; keeping the copy's target would leave the table naming a block whose first slots were
/// never copied on the device. (Found by this file; the scheduler was not affected, as it never shares a
/// partial block and fails every running sequence after a failed pass.)
#[test]
fn failed_pass_rollback_restores_the_original_block() {
    let layout = KvLayout::new(2, 1, 8, 4).expect("layout");
    let mut pool = BlockPool::accounting(layout, 8).expect("accounting pool");
    let mut a = BlockTable::new(0);
    pool.append(&mut a, &[1, 2, 3, 4, 5, 6]).expect("append");
    let mut b = pool.fork(&a).expect("fork");
    {
        let tokens = [7u32];
        let mut batch = PagedBatch::new(&mut pool, vec![(&mut b, &tokens[..])], true);
        batch.reserve(0, 1).expect("reserve");
        assert_eq!(batch.blocks(0).expect("blocks"), [0, 2], "copy-on-write of block 1 into block 2");
        // The model fails here, before `take_copies`: the batch is dropped without a commit.
    }
    let copies = pool.take_copies();
    assert_eq!(b.len(), 6, "the fork is back to its old length");
    pool.audit([&a, &b]).expect("audit after the rollback");
    assert_eq!(pool.blocks_used(), 2, "the copy's block is free again");
    assert!(
        b.blocks() == [0, 1] || copies.contains(&(1, 2)),
        "after the rollback the fork names blocks {:?}, but block 2 never received block 1's slots (queued \
         copies: {copies:?})",
        b.blocks()
    );
}
