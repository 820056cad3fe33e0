//! `facellm chat`: an interactive conversation about one or more face images. Each image goes through the
//! vision tower once; every turn re-renders the conversation with the chat template and only the tokens
//! after the cached prefix are computed. Reads one user turn per line, so it can be piped and scripted.
//!
//! Commands: `/image FILE` attaches an image to the next turn, `/system TEXT` sets the system prompt (and
//! restarts), `/reset` starts over, `/stats` prints the last answer's timings, `/quit` leaves.
//! Ctrl-C stops the current answer; at the prompt it leaves.

use std::io::{BufRead, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use facellm::engine::{GenerateOptions, GenerateOutput, Session, Timings};
use facellm::model::facellm::FaceLlm;
use facellm::tensor::Tensor;
use facellm::tokenizer::{ChatOptions, Message, Tokenizer};
use serde_json::json;

use super::common::{load_model, preprocess_images, select_device, user_turn, Device, RequestArgs};
use super::generate::Output;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    request: RequestArgs,
    /// text: answers on stdout, prompts and notices on stderr; json: one JSON object per answer.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

struct Conversation {
    system: Option<String>,
    messages: Vec<Message>,
    /// Tiles of every image in the conversation, in order.
    tiles: Vec<usize>,
    /// Images attached for the next user turn.
    pending: usize,
}

/// What runs the answers: the CPU model with its session cache, or (`--device cuda`) the batching engine on
/// the GPU, whose prefix cache keeps the conversation's KV blocks between turns.
trait Backend {
    /// Takes a new image (`[tiles, 3, 448, 448]`) for this and later turns.
    fn attach(&mut self, pixels: Tensor) -> anyhow::Result<()>;
    /// Keeps only the first `images` images and forgets the cached conversation.
    fn restart(&mut self, images: usize);
    /// Answers `ids` (the whole conversation, every image's tokens expanded), streaming through `on_text`;
    /// `cancel` ends the answer after the current token.
    fn answer(
        &mut self,
        ids: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
        cancel: &AtomicBool,
    ) -> anyhow::Result<GenerateOutput>;
    fn cached_tokens(&self) -> usize;
}

/// The CPU model and a session that keeps the conversation's KV cache.
struct CpuChat<'a> {
    model: &'a FaceLlm,
    tok: &'a Tokenizer,
    session: Session,
    /// Projector features of each image, in order.
    features: Vec<Tensor>,
}

impl Backend for CpuChat<'_> {
    fn attach(&mut self, pixels: Tensor) -> anyhow::Result<()> {
        self.features.push(self.model.encode_images(&pixels)?.features);
        Ok(())
    }
    fn restart(&mut self, images: usize) {
        self.features.truncate(images);
        self.session.reset(self.model);
    }
    fn answer(
        &mut self,
        ids: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
        cancel: &AtomicBool,
    ) -> anyhow::Result<GenerateOutput> {
        let features = match self.features.len() {
            0 => None,
            1 => Some(self.features[0].clone()),
            _ => {
                let d = self.features[0].shape()[1];
                let mut v = Vec::new();
                for f in &self.features {
                    v.extend_from_slice(f.f32s()?);
                }
                Some(Tensor::from_f32([v.len() / d, d], v)?)
            }
        };
        let tok = self.tok;
        let decode = |ids: &[u32]| tok.decode(ids, true);
        Ok(self.session.generate(self.model, ids, features.as_ref(), opts, &decode, on_text, Some(cancel))?)
    }
    fn cached_tokens(&self) -> usize {
        self.session.cached_tokens()
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let req = &args.request;
    if req.device == Device::Cuda {
        return run_cuda(&args);
    }
    select_device(req.device)?;
    let loaded = load_model(&req.model)?;
    let session = Session::new(&loaded.model);
    let mut backend = CpuChat { model: &loaded.model, tok: &loaded.tokenizer, session, features: Vec::new() };
    let opts = req.generate_options(&loaded.generation)?;
    chat_loop(&args, &loaded.tokenizer, &opts, &mut backend)
}

/// The conversation: commands and turns read from stdin, answers from `backend`.
fn chat_loop(args: &Args, tok: &Tokenizer, opts: &GenerateOptions, backend: &mut dyn Backend) -> anyhow::Result<()> {
    let req = &args.request;
    let image_opts = req.image_options();
    let cancel = Arc::new(AtomicBool::new(false));
    let generating = Arc::new(AtomicBool::new(false));
    {
        let (cancel, generating) = (Arc::clone(&cancel), Arc::clone(&generating));
        ctrlc::set_handler(move || {
            if generating.load(Ordering::SeqCst) {
                cancel.store(true, Ordering::SeqCst);
            } else {
                std::process::exit(130);
            }
        })?;
    }
    let json_mode = args.output == Output::Json;
    let mut conv = Conversation { system: req.system.clone(), messages: Vec::new(), tiles: Vec::new(), pending: 0 };
    let mut last = Timings::default();

    let attach = |conv: &mut Conversation, backend: &mut dyn Backend, path: &PathBuf| -> anyhow::Result<()> {
        let (px, tiles) = preprocess_images(std::slice::from_ref(path), &image_opts)?;
        let px = px.ok_or_else(|| anyhow::anyhow!("no tiles"))?;
        backend.attach(px)?;
        conv.tiles.extend(tiles);
        conv.pending += 1;
        Ok(())
    };
    for path in &req.images {
        attach(&mut conv, backend, path)?;
    }
    // /reset and /system start over on the command line's images (attached to the next turn again).
    let restart = |system: Option<String>, from: &Conversation, backend: &mut dyn Backend| {
        backend.restart(req.images.len());
        Conversation {
            system,
            messages: Vec::new(),
            tiles: from.tiles[..req.images.len()].to_vec(),
            pending: req.images.len(),
        }
    };
    if !json_mode && !super::common::QUIET.load(Ordering::Relaxed) {
        eprintln!("facellm chat: type a question; /image FILE, /system TEXT, /reset, /stats, /quit");
    }

    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "quit" | "exit" => break,
                "reset" => {
                    conv = restart(conv.system.clone(), &conv, backend);
                    eprintln!("(conversation reset; the command line's images are attached to the next turn)");
                }
                "system" => {
                    conv = restart((!rest.trim().is_empty()).then(|| rest.trim().to_string()), &conv, backend);
                    eprintln!("(system prompt set; conversation restarted)");
                }
                "image" => match attach(&mut conv, backend, &PathBuf::from(rest.trim())) {
                    Ok(()) => eprintln!("(image attached: {} tile(s))", conv.tiles.last().copied().unwrap_or(0)),
                    Err(e) => eprintln!("error: {e:#}"),
                },
                "stats" => eprintln!(
                    "last answer: prefill {:.0} ms ({} cached tokens reused), decode {:.1} tok/s; {} tokens cached",
                    last.prefill_ms,
                    last.reused_tokens,
                    last.decode_tokens_per_s(),
                    backend.cached_tokens()
                ),
                other => eprintln!("error: unknown command /{other} (try /image, /system, /reset, /stats, /quit)"),
            }
            continue;
        }
        let mut messages = Vec::new();
        if let Some(s) = &conv.system {
            messages.push(Message::text("system", s.clone()));
        }
        messages.extend(conv.messages.iter().cloned());
        messages.push(user_turn(conv.pending, line));
        let prompt = match tok.encode_chat(&messages, &conv.tiles, &ChatOptions::default()) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        cancel.store(false, Ordering::SeqCst);
        generating.store(true, Ordering::SeqCst);
        let mut on_text = |s: &str| {
            if !json_mode && !s.is_empty() {
                let _ = stdout.write_all(s.as_bytes());
                let _ = stdout.flush();
            }
        };
        let result = backend.answer(&prompt.ids, opts, &mut on_text, &cancel);
        generating.store(false, Ordering::SeqCst);
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                eprintln!("\nerror: {e:#}");
                continue;
            }
        };
        if json_mode {
            let report = json!({ "text": out.text, "generated_ids": out.ids, "finish_reason": out.finish_reason,
                                 "prompt_tokens": prompt.ids.len(), "reused_tokens": out.timings.reused_tokens });
            println!("{report}");
        } else {
            println!();
        }
        conv.messages = messages.into_iter().filter(|m| m.role != "system").collect();
        conv.messages.push(Message::text("assistant", out.text.clone()));
        conv.pending = 0;
        last = out.timings;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_args: &Args) -> anyhow::Result<()> {
    select_device(Device::Cuda)
}

/// `--device cuda`: the conversation through the batching engine on the GPU (the server's engine, driven step
/// by step on this thread). Each turn is a request with the whole conversation; the engine's prefix cache
/// keeps the previous turns' full KV blocks and its vision cache the images' features, so a turn computes
/// little more than its new tokens.
#[cfg(feature = "cuda")]
fn run_cuda(args: &Args) -> anyhow::Result<()> {
    use facellm::backend::cuda::CudaDevice;
    use facellm::engine::batch::{EngineConfig, EngineMetrics, Scheduler, VisionCache};
    use facellm::engine::gpu::{GpuBatchModel, GpuOptions};
    use facellm::model::gpu::WeightSource;
    use std::sync::Mutex;

    let req = &args.request;
    let dir = super::source::resolve(&req.model)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let (config, ckpt) = facellm::loader::open_model(&dir)?;
    let generation = facellm::config::GenerationConfig::load(&dir, &config)?;
    let opts = req.generate_options(&generation)?;
    let dev = CudaDevice::new(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    let gpu_opts = GpuOptions { max_seqs: 1, max_context: usize::MAX, ..GpuOptions::default() };
    let model = GpuBatchModel::load(dev, &config, &WeightSource::Host(&ckpt), &gpu_opts)?;
    drop(ckpt);
    let cfg = EngineConfig { max_seqs: 1, max_queue: 1, prefill_chunk: gpu_opts.prefill_chunk, ..Default::default() };
    let vision = Arc::new(Mutex::new(VisionCache::new(16, 256 << 20)));
    let sched = Scheduler::new(&model, &tok, cfg, Arc::new(EngineMetrics::default()), vision)?;
    let mut backend = engine_chat::EngineChat::new(sched);
    chat_loop(args, &tok, &opts, &mut backend)
}

/// The batching engine as the chat's backend (used for `--device cuda`; device-independent, so its tests run
/// it on the CPU model).
#[cfg(any(feature = "cuda", test))]
mod engine_chat {
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

    impl<M: BatchModel> super::Backend for EngineChat<'_, M> {
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
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    use facellm::backend::SamplingParams;
    use facellm::engine::batch::{EngineConfig, EngineMetrics, Scheduler, VisionCache};
    use facellm::engine::{FinishReason, GenerateOptions, Session};
    use facellm::image::{preprocess_file, ImageOptions};
    use facellm::tensor::Tensor;
    use facellm::tokenizer::{ChatOptions, Message, Part, Tokenizer};

    use super::engine_chat::EngineChat;
    use super::{Backend, CpuChat};

    /// The engine backend (what `--device cuda` runs), here on the CPU model: its turns answer as the session
    /// backend's do, the second turn reuses the first's KV blocks, and a cancelled answer frees its blocks.
    #[test]
    fn engine_backend_answers_as_the_session_backend_and_reuses_turns() {
        let dir = tempfile::tempdir().expect("tempdir");
        facellm::model::random::write_demo_model(dir.path(), "chat-engine").expect("demo model");
        let (_, model) = facellm::model::load_dir(dir.path()).expect("load");
        let tok = Tokenizer::from_dir(dir.path()).expect("tokenizer");
        let face = format!("{}/assets/demo/pd_astronaut_eileen_collins.jpg", env!("CARGO_MANIFEST_DIR"));
        let pre = preprocess_file(face.as_ref(), &ImageOptions::default()).expect("face");
        let tiles = pre.num_tiles;
        let pixels = Tensor::from_f32(pre.shape().to_vec(), pre.pixel_values).expect("pixels");
        let opts = GenerateOptions {
            max_new_tokens: 10,
            sampling: SamplingParams::greedy(),
            eos_ids: vec![151645],
            stop_strings: vec![],
        };

        let cfg = EngineConfig { max_seqs: 1, max_queue: 1, kv_blocks: 256, ..EngineConfig::default() };
        let vision = Arc::new(Mutex::new(VisionCache::new(4, 64 << 20)));
        let sched = Scheduler::new(&model, &tok, cfg, Arc::new(EngineMetrics::default()), vision).expect("scheduler");
        let mut engine = EngineChat::new(sched);
        let mut cpu = CpuChat { model: &model, tok: &tok, session: Session::new(&model), features: Vec::new() };
        engine.attach(pixels.clone()).expect("attach");
        cpu.attach(pixels).expect("attach");

        let no = AtomicBool::new(false);
        let mut turns = vec![Message::parts("user", vec![Part::image(), Part::text("How old is this person?")])];
        let ids = tok.encode_chat(&turns, &[tiles], &ChatOptions::default()).expect("prompt").ids;
        let a = engine.answer(&ids, &opts, &mut |_| {}, &no).expect("engine answer");
        let b = cpu.answer(&ids, &opts, &mut |_| {}, &no).expect("session answer");
        assert_eq!(a.text, b.text, "first turn");
        assert!(!a.ids.is_empty() && a.ids == b.ids);

        turns.push(Message::text("assistant", a.text.clone()));
        turns.push(Message::text("user", "And the expression?"));
        let ids = tok.encode_chat(&turns, &[tiles], &ChatOptions::default()).expect("prompt").ids;
        let a = engine.answer(&ids, &opts, &mut |_| {}, &no).expect("engine answer");
        let b = cpu.answer(&ids, &opts, &mut |_| {}, &no).expect("session answer");
        assert_eq!(a.text, b.text, "second turn");
        assert!(a.timings.reused_tokens >= 256, "the image turn's blocks are reused: {}", a.timings.reused_tokens);

        let stop = AtomicBool::new(true);
        let c = engine.answer(&ids, &opts, &mut |_| {}, &stop).expect("cancelled answer");
        assert_eq!(c.finish_reason, FinishReason::Cancelled);
        assert_eq!(engine.blocks_in_use(), 0, "a cancelled answer gives its blocks back");
    }
}
