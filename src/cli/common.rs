//! What several subcommands share: loading a model folder with its tokenizer and generation defaults,
//! preprocessing the images of a request, and the sampling flags.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use facellm::backend::cpu::sampling::SamplingParams;
use facellm::config::GenerationConfig;
use facellm::image::{preprocess_file, ImageOptions};
use facellm::model::facellm::FaceLlm;
use facellm::tensor::Tensor;
use facellm::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Loaded {
    pub model: FaceLlm,
    pub tokenizer: Tokenizer,
    pub generation: GenerationConfig,
    pub load_ms: f64,
}

/// Resolves `model` (a folder or a hub id) and loads config, weights (validated before any compute), tokenizer and generation defaults of `dir`.
pub fn load_model(model: &str) -> anyhow::Result<Loaded> {
    let t0 = Instant::now();
    let dir = &super::source::resolve(model)?;
    let (config, ckpt) = facellm::loader::open_model(dir)?;
    let bar = progress_bar(ckpt.file_bytes(), "loading weights");
    ckpt.prefetch(&mut |done, _| bar.set_position(done));
    bar.finish_and_clear();
    let model = facellm::model::build(&config, &ckpt)?;
    let tokenizer = Tokenizer::from_dir(dir).with_context(|| format!("tokenizer of {}", dir.display()))?;
    let generation = GenerationConfig::load(dir, &config)?;
    Ok(Loaded { model, tokenizer, generation, load_ms: t0.elapsed().as_secs_f64() * 1e3 })
}

/// Set by `--quiet`: no progress bars or notices on stderr.
pub static QUIET: AtomicBool = AtomicBool::new(false);

/// A byte progress bar on stderr; hidden with `--quiet` and when stderr is not a terminal.
pub fn progress_bar(total: u64, what: &str) -> ProgressBar {
    if QUIET.load(Ordering::Relaxed) || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// The tiles of every image, concatenated in order, and the tile count of each.
pub fn preprocess_images(paths: &[PathBuf], opts: &ImageOptions) -> anyhow::Result<(Option<Tensor>, Vec<usize>)> {
    if paths.is_empty() {
        return Ok((None, Vec::new()));
    }
    let mut values = Vec::new();
    let mut tiles = Vec::with_capacity(paths.len());
    for path in paths {
        let pre = preprocess_file(path, opts)?;
        tiles.push(pre.num_tiles);
        values.extend_from_slice(&pre.pixel_values);
    }
    let n: usize = tiles.iter().sum();
    let side = facellm::image::TILE;
    Ok((Some(Tensor::from_f32([n, 3, side, side], values)?), tiles))
}

/// Sampling flags shared by `generate`, `chat` and the server's defaults.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy; > 0 samples at that temperature. Default: the folder's generation_config (greedy for FaceLLM).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens when sampling (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Penalty on tokens already in the sequence (1 = off).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self, g: &GenerationConfig) -> anyhow::Result<SamplingParams> {
        let mut p = SamplingParams {
            do_sample: g.do_sample,
            temperature: g.temperature as f32,
            top_k: g.top_k,
            top_p: g.top_p as f32,
            repetition_penalty: g.repetition_penalty as f32,
            seed: self.seed,
        };
        if let Some(t) = self.temperature {
            p.temperature = t;
            p.do_sample = t > 0.0;
        }
        if let Some(k) = self.top_k {
            p.top_k = k;
        }
        if let Some(tp) = self.top_p {
            p.top_p = tp;
        }
        if let Some(r) = self.repetition_penalty {
            p.repetition_penalty = r;
        }
        p.validate()?;
        Ok(p)
    }
}

/// Writes streamed answer text to stdout as it arrives (flushed, so a terminal shows every token), or
/// nothing when the command prints JSON at the end instead.
pub fn stdout_streamer(enabled: bool) -> impl FnMut(&str) {
    let mut stdout = std::io::stdout();
    move |s: &str| {
        if enabled && !s.is_empty() {
            use std::io::Write as _;
            let _ = stdout.write_all(s.as_bytes());
            let _ = stdout.flush();
        }
    }
}

/// Which backend runs the model.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA when this build has it and a GPU is found, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Checks that `device` can run here (today: the CPU backend; CUDA arrives behind feature `cuda`).
pub fn select_device(device: Device) -> anyhow::Result<()> {
    match device {
        Device::Auto | Device::Cpu => Ok(()),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => anyhow::bail!(
            "--device cuda: this build of facellm has no CUDA backend (build with `cargo build --release --features cuda`; use --device cpu)"
        ),
        #[cfg(feature = "cuda")]
        Device::Cuda => anyhow::bail!(
            "--device cuda: this command runs on the CPU only so far (`generate`, `serve` and `bench` run on the GPU); use --device cpu"
        ),
    }
}

/// A user turn: `images` image parts, then the text. Without images the content is a plain string, which
/// every template accepts (text-only templates such as Qwen2.5's concatenate `content` as a string).
pub fn user_turn(images: usize, text: &str) -> facellm::tokenizer::Message {
    use facellm::tokenizer::{Message, Part};
    if images == 0 {
        return Message::text("user", text.to_string());
    }
    let mut parts: Vec<Part> = (0..images).map(|_| Part::image()).collect();
    parts.push(Part::text(text.to_string()));
    Message::parts("user", parts)
}

/// The flags every request-running command shares (`generate`, `chat`).
#[derive(clap::Args, Debug, Clone)]
pub struct RequestArgs {
    /// Backend: auto, cpu or cuda.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer files) or hub id (owner/name).
    #[arg(long)]
    pub model: String,
    /// Image file, repeatable; the images come before the text of the (first) turn, in order.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// System message (none by default, as FaceLLM's own inference).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer. Default: the folder's generation_config, else 512.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Stop when the answer contains this text (repeatable); the answer is cut before it.
    #[arg(long = "stop")]
    pub stops: Vec<String>,
    /// Largest tile grid per image (1..=12).
    #[arg(long, default_value_t = 12)]
    pub max_tiles: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

impl RequestArgs {
    pub fn image_options(&self) -> ImageOptions {
        ImageOptions { max_tiles: self.max_tiles, ..ImageOptions::default() }
    }

    /// Generation options: these flags over the folder's generation_config.
    pub fn generate_options(&self, g: &GenerationConfig) -> anyhow::Result<facellm::engine::GenerateOptions> {
        Ok(facellm::engine::GenerateOptions {
            max_new_tokens: self.max_new_tokens.or(g.max_new_tokens).unwrap_or(512),
            sampling: self.sampling.params(g)?,
            eos_ids: g.eos_token_ids.clone(),
            stop_strings: self.stops.clone(),
        })
    }
}
