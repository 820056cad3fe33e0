//! `facellm generate`: one answer about zero or more images, streamed to stdout, or as JSON with the ids
//! and timings.
//!
//!   facellm generate --model DIR --image face.jpg --prompt "Describe the expression." [--output json]

use std::path::PathBuf;

use clap::ValueEnum;
use facellm::engine::{generate, GenerateOptions};
use facellm::image::ImageOptions;
use facellm::tokenizer::{ChatOptions, Message};
use serde_json::json;

use super::common::{load_model, preprocess_images, select_device, stdout_streamer, user_turn, Device, SamplingArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(clap::Args)]
pub struct Args {
    /// Backend: auto, cpu or cuda.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer files) or hub id (owner/name).
    #[arg(long)]
    model: String,
    /// Image file, repeatable; the images come before the prompt, in order.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// The question.
    #[arg(long)]
    prompt: String,
    /// System message (none by default, as FaceLLM's own inference).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate. Default: the folder's generation_config, else 512.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Stop when the answer contains this text (repeatable); the answer is cut before it.
    #[arg(long = "stop")]
    stops: Vec<String>,
    /// Largest tile grid per image (1..=12).
    #[arg(long, default_value_t = 12)]
    max_tiles: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    select_device(args.device)?;
    let loaded = load_model(&args.model)?;
    let image_opts = ImageOptions { max_tiles: args.max_tiles, ..ImageOptions::default() };
    let (pixels, tiles) = preprocess_images(&args.images, &image_opts)?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::text("system", system.clone()));
    }
    messages.push(user_turn(args.images.len(), &args.prompt));
    let prompt = loaded.tokenizer.encode_chat(&messages, &tiles, &ChatOptions::default())?;

    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens.or(loaded.generation.max_new_tokens).unwrap_or(512),
        sampling: args.sampling.params(&loaded.generation)?,
        eos_ids: loaded.generation.eos_token_ids.clone(),
        stop_strings: args.stops.clone(),
    };
    let tok = &loaded.tokenizer;
    let decode = |ids: &[u32]| tok.decode(ids, true);
    let streaming = args.output == Output::Text;
    let mut on_text = stdout_streamer(streaming);
    let out = generate(&loaded.model, &prompt.ids, pixels.as_ref(), &opts, &decode, &mut on_text)?;
    if streaming {
        println!();
        return Ok(());
    }
    let t = &out.timings;
    let report = json!({
        "prompt": prompt.text,
        "prompt_ids": prompt.ids,
        "tiles_per_image": tiles,
        "generated_ids": out.ids,
        "text": out.text,
        "finish_reason": out.finish_reason,
        "timings": {
            "load_ms": loaded.load_ms,
            "vision_ms": t.vision_ms,
            "prefill_ms": t.prefill_ms,
            "prefill_tokens_per_s": prompt.ids.len() as f64 * 1e3 / t.prefill_ms.max(1e-9),
            "decode_ms": t.decode_ms,
            "decode_tokens_per_s": t.decode_tokens_per_s(),
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
