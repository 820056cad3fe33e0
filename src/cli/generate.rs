//! `facellm generate`: one answer about zero or more images, streamed to stdout, or as JSON with the ids
//! and timings.
//!
//!   facellm generate --model DIR --image face.jpg --prompt "Describe the expression." [--output json]

use clap::ValueEnum;
use facellm::engine::generate;
use facellm::tokenizer::{ChatOptions, Message};
use serde_json::json;

use super::common::{load_model, preprocess_images, select_device, stdout_streamer, user_turn, RequestArgs};

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

pub fn run(args: Args) -> anyhow::Result<()> {
    let req = &args.request;
    select_device(req.device)?;
    let loaded = load_model(&req.model)?;
    let (pixels, tiles) = preprocess_images(&req.images, &req.image_options())?;
    let mut messages = Vec::new();
    if let Some(system) = &req.system {
        messages.push(Message::text("system", system.clone()));
    }
    messages.push(user_turn(req.images.len(), &args.prompt));
    let prompt = loaded.tokenizer.encode_chat(&messages, &tiles, &ChatOptions::default())?;
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
