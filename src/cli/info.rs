//! `facellm info`: what a model folder holds, before running it: architecture, parameters and bytes per
//! component, dtypes, memory needed, context length and the tokenizer's special tokens.
//!
//!   facellm info --model DIR [--output json]

use std::collections::BTreeMap;

use facellm::config::ModelConfig;
use facellm::loader::open_model;
use facellm::tokenizer::Tokenizer;
use serde_json::{json, Value};

use super::generate::Output;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder or hub id (owner/name).
    #[arg(long)]
    model: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Bytes in the largest binary unit that keeps the number at least 1.
fn human(bytes: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = super::source::resolve(&args.model)?;
    let (config, ckpt) = open_model(&dir)?;
    let summary = ckpt.summary();
    let text = config.text();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for name in ckpt.names() {
        if let Some(t) = ckpt.get(name) {
            *dtypes.entry(t.dtype.to_string()).or_default() += 1;
        }
    }
    let kv_elems_per_token = 2 * text.num_hidden_layers * text.kv_dim();
    let context = text.max_position_embeddings;
    let weights = summary.total_bytes as f64;
    let kv_cpu = (kv_elems_per_token * 4) as f64;
    let kv_gpu = (kv_elems_per_token * 2) as f64;
    let special = match Tokenizer::from_dir(&dir) {
        Ok(tok) => {
            let sp = tok.special_tokens();
            let roles = [
                ("eos", &sp.eos),
                ("pad", &sp.pad),
                ("bos", &sp.bos),
                ("image_start", &sp.image_start),
                ("image_end", &sp.image_end),
                ("image_context", &sp.image_context),
                ("video", &sp.video),
            ];
            let map: serde_json::Map<String, Value> = roles
                .iter()
                .map(|(role, t)| {
                    (role.to_string(), t.as_ref().map_or(Value::Null, |t| json!({ "token": t.content, "id": t.id })))
                })
                .collect();
            json!({ "vocab_size": tok.vocab_size(), "special_tokens": map })
        }
        Err(e) => json!({ "error": e.to_string() }),
    };
    let architecture = match &config {
        ModelConfig::InternVl(c) => {
            let v = &c.vision_config;
            json!({
                "class": "InternVLForConditionalGeneration",
                "vision": format!("InternViT: {} layers, hidden {}, {} heads, {:?}, {} tokens per tile",
                                  v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.norm_type, c.tokens_per_tile()),
                "text": format!("Qwen2: {} layers, hidden {}, {} heads / {} kv heads, head_dim {}, vocab {}",
                                text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
                                text.num_key_value_heads, text.head_dim, text.vocab_size),
            })
        }
        ModelConfig::Qwen2(_) => json!({
            "class": "Qwen2ForCausalLM",
            "text": format!("Qwen2: {} layers, hidden {}, {} heads / {} kv heads, head_dim {}, vocab {}",
                            text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
                            text.num_key_value_heads, text.head_dim, text.vocab_size),
        }),
    };
    let report = json!({
        "model": args.model,
        "architecture": architecture,
        "components": summary.components,
        "total_params": summary.total_params,
        "weights_bytes": summary.total_bytes,
        "dtypes": dtypes,
        "files": ckpt.files().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "context_length": context,
        "memory": {
            "cpu": { "weights_bytes": weights, "kv_bytes_per_token": kv_cpu,
                     "note": "weights are memory-mapped in their stored dtype; the KV cache is f32" },
            "cuda": { "weights_bytes": weights, "kv_bytes_per_token": kv_gpu, "note": "bf16 weights and KV cache" },
        },
        "tokenizer": special,
    });
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model        {} ({})", args.model, dir.display());
    for (k, v) in report["architecture"].as_object().into_iter().flatten() {
        println!("{k:<12} {}", v.as_str().unwrap_or_default());
    }
    println!("parameters   {} ({} in {:?})", summary.total_params, human(weights), dtypes);
    for c in &summary.components {
        println!("  {:<22} {:>14} params {:>12}", format!("{:?}", c.component), c.params, human(c.bytes as f64));
    }
    println!("context      {context} tokens");
    println!(
        "memory cpu   {} weights (mmap) + {} KV per token ({} at full context)",
        human(weights),
        human(kv_cpu),
        human(weights + kv_cpu * context as f64)
    );
    println!(
        "memory cuda  {} weights + {} KV per token ({} at full context)",
        human(weights),
        human(kv_gpu),
        human(weights + kv_gpu * context as f64)
    );
    if let Some(sp) = report["tokenizer"]["special_tokens"].as_object() {
        let list: Vec<String> = sp
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| format!("{k}={}({})", v["token"].as_str().unwrap_or(""), v["id"]))
            .collect();
        println!("tokens       {}", list.join(" "));
    }
    Ok(())
}
