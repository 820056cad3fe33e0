//! The batching engine without HTTP: the scheduler driven step by step (deterministic) and the engine
//! thread behind its handle. Answers must equal `engine::generate` (one sequence, contiguous cache) for
//! the same input, whatever else shares the batch, through preemption and recompute; cancellation and
//! timeouts must give every block back; a second question about the same image must reuse the vision
//! features and the prompt's KV blocks.

#[path = "support/events.rs"]
mod events;
use events::drain;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use facellm::backend::SamplingParams;
use facellm::engine::batch::{
    EngineConfig, EngineHandle, EngineMetrics, Event, Failure, ImageInput, ImageSource, Request, Scheduler, SeqParams,
    Slots, VisionCache,
};
use facellm::engine::{generate, FinishReason, GenerateOptions};
use facellm::image::{preprocess_file, ImageOptions};
use facellm::model::facellm::FaceLlm;
use facellm::tensor::Tensor;
use facellm::tokenizer::{ChatOptions, Message, Part, Tokenizer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const EOS: u32 = 151645;

struct Fixture {
    _dir: tempfile::TempDir,
    model: FaceLlm,
    tok: Tokenizer,
    /// The bundled face, preprocessed: pixels and tile count.
    face: (Tensor, usize),
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    facellm::model::random::write_demo_model(dir.path(), "engine-test").expect("demo model");
    let (_, model) = facellm::model::load_dir(dir.path()).expect("load");
    let tok = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let face = format!("{}/assets/demo/pd_astronaut_eileen_collins.jpg", env!("CARGO_MANIFEST_DIR"));
    let pre = preprocess_file(face.as_ref(), &ImageOptions::default()).expect("face");
    let pixels = Tensor::from_f32(pre.shape().to_vec(), pre.pixel_values).expect("pixels");
    Fixture { _dir: dir, model, tok, face: (pixels, pre.num_tiles) }
}

/// A question's prompt ids, with the face before the text when `image`.
fn prompt(f: &Fixture, question: &str, image: bool) -> Vec<u32> {
    let m = if image {
        Message::parts("user", vec![Part::image(), Part::text(question)])
    } else {
        Message::text("user", question)
    };
    let tiles = if image { vec![f.face.1] } else { vec![] };
    f.tok.encode_chat(&[m], &tiles, &ChatOptions::default()).expect("prompt").ids
}

fn greedy(max_tokens: usize) -> SeqParams {
    SeqParams { max_tokens, sampling: SamplingParams::greedy(), eos_ids: vec![EOS], stop: vec![] }
}

fn request(
    f: &Fixture,
    slots: &Arc<Slots>,
    ids: Vec<u32>,
    image: bool,
    params: SeqParams,
) -> (Request, UnboundedReceiver<Event>) {
    let (tx, rx) = unbounded_channel();
    let images = if image {
        vec![ImageInput { digest: [7; 32], tiles: f.face.1, source: ImageSource::Pixels(f.face.0.clone()) }]
    } else {
        vec![]
    };
    let req = Request {
        prompt: ids,
        images,
        params,
        arrived: Instant::now(),
        deadline: None,
        events: tx,
        permit: slots.try_acquire().expect("a free slot"),
    };
    (req, rx)
}

/// `engine::generate` on the same input: the reference answer.
fn reference(f: &Fixture, ids: &[u32], image: bool, params: &SeqParams) -> String {
    let opts = GenerateOptions {
        max_new_tokens: params.max_tokens,
        sampling: params.sampling.clone(),
        eos_ids: params.eos_ids.clone(),
        stop_strings: params.stop.clone(),
    };
    let decode = |ids: &[u32]| f.tok.decode(ids, true);
    let px = image.then_some(&f.face.0);
    generate(&f.model, ids, px, &opts, &decode, &mut |_| {}).expect("generate").text
}

fn scheduler<'a>(f: &'a Fixture, cfg: EngineConfig) -> (Scheduler<'a, FaceLlm>, Arc<EngineMetrics>) {
    let metrics = Arc::new(EngineMetrics::default());
    let vision = Arc::new(Mutex::new(VisionCache::new(8, 64 << 20)));
    (Scheduler::new(&f.model, &f.tok, cfg, metrics.clone(), vision).expect("scheduler"), metrics)
}

fn run_until_idle(s: &mut Scheduler<FaceLlm>) -> usize {
    let mut steps = 0;
    while !s.is_idle() {
        s.step();
        steps += 1;
        assert!(steps < 10_000, "the scheduler makes no progress");
    }
    steps
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// Mixed requests (image and text, greedy and seeded sampling, a stop string) in one batch with a small
/// prefill chunk, in a pool so small that sequences are preempted and recomputed: every answer equals the
/// one `generate` gives alone, and every block comes back.
#[test]
fn batched_answers_equal_generate_through_preemption() {
    let f = fixture();
    let slots = Slots::new(64);
    let sampled =
        SamplingParams { do_sample: true, temperature: 0.8, top_k: 50, top_p: 0.9, seed: 3, ..Default::default() };
    let mut cases: Vec<(Vec<u32>, bool, SeqParams)> = vec![
        (prompt(&f, "Hello there", false), false, greedy(40)),
        (prompt(&f, "Write a poem.", false), false, SeqParams { sampling: sampled, ..greedy(40) }),
        (prompt(&f, "Say something.", false), false, SeqParams { stop: vec!["e".into()], ..greedy(40) }),
    ];
    for i in 0..3 {
        cases.push((prompt(&f, &format!("Question {i}: what is a face?"), false), false, greedy(40)));
    }
    cases.push((prompt(&f, "Describe the facial expression.", true), true, greedy(16)));
    cases.push((prompt(&f, "How old is this person?", true), true, greedy(16)));
    let want: Vec<String> = cases.iter().map(|(ids, img, p)| reference(&f, ids, *img, p)).collect();
    // 28 blocks of 16 tokens: the six text sequences are admitted with one block each and the first image
    // prompt (~270 tokens, 17 blocks) after them; their decodes then outgrow the pool, so the newest
    // sequences are preempted and recomputed (the image's features are kept, its KV is not).
    let cfg = EngineConfig { kv_blocks: 28, prefill_chunk: 64, max_seqs: 8, ..EngineConfig::default() };
    let (mut s, metrics) = scheduler(&f, cfg);
    let mut rxs = Vec::new();
    for (ids, img, p) in &cases {
        let (req, rx) = request(&f, &slots, ids.clone(), *img, p.clone());
        s.submit(req);
        rxs.push(rx);
    }
    let steps = run_until_idle(&mut s);
    for (i, rx) in rxs.iter_mut().enumerate() {
        let (text, end) = drain(rx);
        let summary = end.expect("ended").expect("no failure");
        assert_eq!(text, want[i], "case {i}: batched answer vs generate alone");
        assert_eq!(summary.prompt_tokens, cases[i].0.len(), "case {i}: prompt tokens");
        assert!(summary.completion_tokens <= cases[i].2.max_tokens);
    }
    println!(
        "{steps} steps, {} preemptions, {} tokens generated, {} vision images encoded, {} vision hits",
        get(&metrics.preemptions),
        get(&metrics.generation_tokens),
        get(&metrics.vision_images_encoded),
        get(&metrics.vision_hits)
    );
    assert!(get(&metrics.preemptions) > 0, "the pool was small enough to force a preemption");
    assert_eq!(s.kv_blocks_used(), 0, "every live block was given back");
    assert_eq!(slots.in_use(), 0, "every request's slot was given back");
}

/// The second question about the same image: vision features from the cache, the image's KV blocks from
/// the prefix cache (cached_tokens in the summary), and the same answer as without any cache.
#[test]
fn second_question_reuses_vision_and_prefix() {
    let f = fixture();
    let slots = Slots::new(8);
    let (mut s, metrics) = scheduler(&f, EngineConfig { kv_blocks: 256, ..EngineConfig::default() });
    let mut summaries = Vec::new();
    for q in ["Describe the facial expression.", "How old is this person?"] {
        let ids = prompt(&f, q, true);
        let (req, mut rx) = request(&f, &slots, ids.clone(), true, greedy(12));
        s.submit(req);
        run_until_idle(&mut s);
        let (text, end) = drain(&mut rx);
        assert_eq!(text, reference(&f, &ids, true, &greedy(12)), "{q}");
        summaries.push(end.expect("ended").expect("ok"));
    }
    assert_eq!(summaries[0].cached_tokens, 0);
    // `<|im_start|>user\n<img>` + 256 image tokens + `</img>\n`: the shared prefix is 262 tokens, of which the
    // 16 full blocks (256 tokens) are reused.
    assert_eq!(summaries[1].cached_tokens, 256, "full blocks of the shared prefix");
    assert_eq!(get(&metrics.vision_images_encoded), 1, "the tower ran once");
    assert_eq!(get(&metrics.vision_hits), 1, "the second question found the features");
    assert_eq!((get(&metrics.prefix_queries), get(&metrics.prefix_hits)), (2, 1));
    assert_eq!(s.kv_blocks_used(), 0);
    assert!(get(&metrics.kv_blocks_cached) > 0, "the prefix is kept for the next question");
}

/// A dropped receiver cancels at the next step and frees the blocks; a passed deadline fails the request
/// with a timeout; the rest of the batch is unaffected.
#[test]
fn cancel_and_timeout_free_blocks() {
    let f = fixture();
    let slots = Slots::new(8);
    let (mut s, metrics) = scheduler(&f, EngineConfig { kv_blocks: 256, ..EngineConfig::default() });
    let ids = prompt(&f, "Tell me a long story.", false);
    let (keep, mut keep_rx) = request(&f, &slots, ids.clone(), false, greedy(30));
    let (gone, gone_rx) = request(&f, &slots, ids.clone(), false, greedy(30));
    let (mut late, mut late_rx) = request(&f, &slots, ids.clone(), false, greedy(30));
    late.deadline = Some(Instant::now() + Duration::from_millis(1));
    s.submit(keep);
    s.submit(gone);
    s.submit(late);
    s.step();
    s.step();
    assert!(s.kv_blocks_used() > 0);
    drop(gone_rx);
    std::thread::sleep(Duration::from_millis(5));
    s.step();
    assert_eq!(get(&metrics.cancelled), 1, "the dropped receiver cancelled its sequence");
    let (_, end) = drain(&mut late_rx);
    assert!(matches!(end, Some(Err(Failure::Timeout(_)))), "deadline: {end:?}");
    run_until_idle(&mut s);
    let (text, end) = drain(&mut keep_rx);
    assert_eq!(end.expect("ended").expect("ok").finish_reason, FinishReason::Length);
    assert_eq!(text, reference(&f, &ids, false, &greedy(30)));
    assert_eq!(s.kv_blocks_used(), 0);
    assert_eq!(slots.in_use(), 0);
}

/// The engine thread behind its handle: concurrent submissions stream their answers, a request over the
/// context is refused at once, and draining ends the thread.
#[test]
fn engine_thread_serves_and_drains() {
    let f = fixture();
    let ids = prompt(&f, "Hello", false);
    let want = reference(&f, &ids, false, &greedy(16));
    let tok = Arc::new(Tokenizer::from_dir(f._dir.path()).expect("tokenizer"));
    let (_, model) = facellm::model::load_dir(f._dir.path()).expect("load");
    let engine =
        EngineHandle::spawn(model, tok, EngineConfig { kv_blocks: 128, ..EngineConfig::default() }).expect("engine");
    let mut rxs = Vec::new();
    for _ in 0..4 {
        let (req, rx) = request(&f, &engine.slots, ids.clone(), false, greedy(16));
        engine.submit(req).expect("submit");
        rxs.push(rx);
    }
    let too_long = vec![ids[0]; 128 * 16];
    let (req, mut bad_rx) = request(&f, &engine.slots, too_long, false, greedy(4));
    engine.submit(req).expect("submit");
    for rx in &mut rxs {
        let mut text = String::new();
        loop {
            match rx.blocking_recv().expect("an event") {
                Event::Text(t) => text.push_str(&t),
                Event::Done(_) => break,
                Event::Failed(e) => panic!("failed: {e:?}"),
            }
        }
        assert_eq!(text, want);
    }
    assert!(matches!(bad_rx.blocking_recv(), Some(Event::Failed(Failure::Invalid(_)))));
    engine.drain(Duration::from_secs(1));
    engine.join();
}
