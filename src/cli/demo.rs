//! `facellm demo`: the whole pipeline on a tiny built-in model, with no download and no GPU. It writes a
//! FaceLLM-architecture model with deterministic random weights (real on-disk format, real tokenizer) to a
//! temporary folder, loads it through the same loader as a real checkpoint, and answers a question about a
//! bundled public-domain face photo. The answer is noise: the weights are random.

use std::io::Write as _;
use std::time::Instant;

use facellm::engine::{generate, GenerateOptions};
use facellm::image::ImageOptions;
use facellm::tokenizer::{ChatOptions, Message, Part};
use serde_json::json;

use super::common::{load_model, preprocess_images, stdout_streamer, SamplingArgs};
use super::generate::Output;

const FACE: &[u8] = include_bytes!("../../assets/demo/pd_astronaut_eileen_collins.jpg");

#[derive(clap::Args)]
pub struct Args {
    /// The question about the bundled face photo.
    #[arg(long, default_value = "Describe the facial expression of this person.")]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Also keep the demo model folder here (to try `generate`, `chat`, `info` on it).
    #[arg(long)]
    save_model: Option<std::path::PathBuf>,
    /// Use the demo model in the shapes the CUDA kernels take (head dims 64, no RoPE scaling), e.g. to save
    /// one for `--device cuda`; the demo itself still runs on the CPU.
    #[arg(long)]
    gpu_shapes: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::Builder::new().prefix("facellm-demo-").tempdir()?;
    let config = if args.gpu_shapes {
        facellm::model::random::demo_config_json_gpu()
    } else {
        facellm::model::random::demo_config_json()
    };
    facellm::model::random::write_demo_model_with(dir.path(), "demo", &config)?;
    let image = dir.path().join("pd_astronaut_eileen_collins.jpg");
    std::fs::write(&image, FACE)?;
    let build_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(keep) = &args.save_model {
        facellm::model::random::write_demo_model_with(keep, "demo", &config)?;
        std::fs::write(keep.join("pd_astronaut_eileen_collins.jpg"), FACE)?;
    }

    let loaded = load_model(&dir.path().to_string_lossy())?;
    let (pixels, tiles) = preprocess_images(std::slice::from_ref(&image), &ImageOptions::default())?;
    let messages = vec![Message::parts("user", vec![Part::image(), Part::text(args.prompt.clone())])];
    let prompt = loaded.tokenizer.encode_chat(&messages, &tiles, &ChatOptions::default())?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.params(&loaded.generation)?,
        eos_ids: loaded.generation.eos_token_ids.clone(),
        stop_strings: Vec::new(),
    };
    let text_mode = args.output == Output::Text;
    if text_mode {
        println!("facellm demo: a tiny FaceLLM-architecture model with RANDOM weights (built in {build_ms:.0} ms)");
        println!("image : bundled NASA portrait (public domain), {} tile(s) of 448x448", tiles[0]);
        println!("prompt: {} tokens, {} of them image tokens", prompt.ids.len(), 256 * tiles[0]);
        let shown = prompt.text.replacen("<IMG_CONTEXT>", &format!("<img><IMG_CONTEXT>x{}</img>", 256 * tiles[0]), 1);
        println!("{}", shown.trim_end());
        print!("answer: ");
        let _ = std::io::stdout().flush();
    }
    let tok = &loaded.tokenizer;
    let decode = |ids: &[u32]| tok.decode(ids, true);
    let mut on_text = stdout_streamer(text_mode);
    let out = generate(&loaded.model, &prompt.ids, pixels.as_ref(), &opts, &decode, &mut on_text)?;
    let t = &out.timings;
    if text_mode {
        println!();
        println!(
            "timings: load {:.0} ms, vision {:.0} ms, prefill {:.0} ms ({} tokens), decode {:.1} tok/s ({} tokens)",
            loaded.load_ms,
            t.vision_ms,
            t.prefill_ms,
            prompt.ids.len(),
            t.decode_tokens_per_s(),
            out.ids.len()
        );
        println!("note: the weights are random, so the answer is noise; the pipeline around it is the real one.");
        println!(
            "      For real answers run a FaceLLM checkpoint (a local Hugging Face folder, e.g. Idiap/FaceLLM-1B):"
        );
        println!(
            "      facellm generate --model /path/to/FaceLLM-1B --image face.jpg --prompt \"Describe the expression.\""
        );
        return Ok(());
    }
    let report = json!({
        "random_weights": true,
        "prompt": prompt.text,
        "prompt_tokens": prompt.ids.len(),
        "tiles": tiles,
        "generated_ids": out.ids,
        "text": out.text,
        "finish_reason": out.finish_reason,
        "timings": { "build_ms": build_ms, "load_ms": loaded.load_ms, "vision_ms": t.vision_ms,
                     "prefill_ms": t.prefill_ms, "decode_tokens_per_s": t.decode_tokens_per_s() },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
