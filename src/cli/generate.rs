//! `facellm generate`: one answer about zero or more images, streamed to stdout, or as JSON with the ids
//! and timings.
//!
//!   facellm generate --model DIR --image face.jpg --prompt "Describe the expression." [--output json]

use clap::ValueEnum;
use facellm::engine::generate;
use facellm::tokenizer::{ChatOptions, Message, Prompt, Tokenizer};
use serde_json::json;

use super::common::{load_model, preprocess_images, select_device, stdout_streamer, user_turn, Device, RequestArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    request: RequestArgs,
    /// The question.
    #[arg(long)]
    prompt: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// The rendered chat prompt of the request: an optional system turn, then the user turn with its images.
fn chat_prompt(args: &Args, tokenizer: &Tokenizer, tiles: &[usize]) -> anyhow::Result<Prompt> {
    let mut messages = Vec::new();
    if let Some(system) = &args.request.system {
        messages.push(Message::text("system", system.clone()));
    }
    messages.push(user_turn(args.request.images.len(), &args.prompt));
    Ok(tokenizer.encode_chat(&messages, tiles, &ChatOptions::default())?)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let req = &args.request;
    if matches!(req.device, Device::Cuda) {
        return run_cuda(&args);
    }
    select_device(req.device)?;
    let loaded = load_model(&req.model)?;
    let (pixels, tiles) = preprocess_images(&req.images, &req.image_options())?;
    let prompt = chat_prompt(&args, &loaded.tokenizer, &tiles)?;
    let opts = req.generate_options(&loaded.generation)?;
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
    let timings = json!({
        "load_ms": loaded.load_ms,
        "vision_ms": t.vision_ms,
        "prefill_ms": t.prefill_ms,
        "prefill_tokens_per_s": prompt.ids.len() as f64 * 1e3 / t.prefill_ms.max(1e-9),
        "decode_ms": t.decode_ms,
        "decode_tokens_per_s": t.decode_tokens_per_s(),
    });
    print_report("cpu", &prompt, &tiles, &out, timings)
}

/// `--output json`: the prompt, the answer and `timings` (which differ by device) as one object.
fn print_report(
    device: &str,
    prompt: &Prompt,
    tiles: &[usize],
    out: &facellm::engine::GenerateOutput,
    timings: serde_json::Value,
) -> anyhow::Result<()> {
    let report = json!({
        "device": device,
        "prompt": prompt.text,
        "prompt_ids": prompt.ids,
        "tiles_per_image": tiles,
        "generated_ids": out.ids,
        "text": out.text,
        "finish_reason": out.finish_reason,
        "timings": timings,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_args: &Args) -> anyhow::Result<()> {
    select_device(Device::Cuda)
}

/// The same request on the GPU: the batching engine (as `serve --device cuda`) over the GPU models, weights
/// uploaded from the checkpoint; greedy decoding takes the GPU's argmax (sampling runs on the host from the
/// GPU's logits).
#[cfg(feature = "cuda")]
fn run_cuda(args: &Args) -> anyhow::Result<()> {
    use super::chat::Backend as _;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    let req = &args.request;
    let t0 = Instant::now();
    super::engine_chat::with_gpu_engine(&req.model, |engine, tokenizer, generation, device| {
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        let (pixels, tiles) = preprocess_images(&req.images, &req.image_options())?;
        let prompt = chat_prompt(args, tokenizer, &tiles)?;
        if let Some(px) = pixels {
            engine.attach(px)?;
        }
        let opts = req.generate_options(generation)?;
        let streaming = args.output == Output::Text;
        let mut on_text = stdout_streamer(streaming);
        let out = engine.answer(&prompt.ids, &opts, &mut on_text, &AtomicBool::new(false))?;
        if streaming {
            println!();
            return Ok(());
        }
        let decode_ms: f64 = out.timings.decode_ms.iter().sum();
        let timings = json!({
            "load_ms": load_ms,
            // Vision tower, prefill and the first token (the engine runs them as one step sequence).
            "ttft_ms": out.timings.prefill_ms,
            "decode_ms": decode_ms,
            "decode_tokens_per_s": out.timings.decode_tokens_per_s(),
        });
        print_report(device, &prompt, &tiles, &out, timings)?;
        Ok(())
    })
}
