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
pub(crate) trait Backend {
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
    super::engine_chat::with_gpu_engine(&args.request.model, |engine, tok, generation, _| {
        let opts = args.request.generate_options(generation)?;
        chat_loop(args, tok, &opts, engine)
    })
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

    use super::super::engine_chat::EngineChat;
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
