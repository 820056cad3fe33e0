//! `facellm serve`: the OpenAI-compatible server (`facellm::server`) on the batching engine.
//!
//!   facellm serve --model DIR [--host 127.0.0.1] [--port 8000] [--allow-local-images DIR] [--api-key K]
//!
//! `--model demo` serves the built-in tiny random model (the one `facellm demo` runs), so the server can be
//! tried and tested without any download.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use facellm::engine::batch::{EngineConfig, EngineHandle};
use facellm::image::{ImageOptions, MAX_TILES};
use facellm::server::{ImagePolicy, Limits, ServerConfig};

use super::common::{load_model, select_device, Device};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder, hub id, or `demo` (the built-in tiny model with random weights).
    #[arg(long)]
    model: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// TCP port; 0 picks a free one (the address is printed when the server listens).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The `model` name clients send. Default: the folder's name (`facellm-demo` for the demo model).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1/ endpoints.
    #[arg(long)]
    api_key: Option<String>,
    /// Also accept image_url paths (or file:// URLs) of files under this folder.
    #[arg(long)]
    allow_local_images: Option<PathBuf>,
    /// Backend: auto, cpu or cuda.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Largest encoded image in bytes.
    #[arg(long, default_value_t = 10 << 20)]
    max_image_bytes: usize,
    /// Largest image in pixels (refused from its header, before decoding).
    #[arg(long, default_value_t = 40_000_000)]
    max_image_pixels: u64,
    /// Largest tile grid per image (1..=12); a tiled image also gets a thumbnail tile.
    #[arg(long, default_value_t = 12)]
    max_tiles: usize,
    /// Tiles over all the images of one request.
    #[arg(long, default_value_t = 26)]
    max_tiles_per_request: usize,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Requests waiting for a place in the batch at most; beyond it the server answers 503.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Seconds a request may take from arrival to its last token.
    #[arg(long, default_value_t = 300)]
    request_timeout: u64,
    /// KV cache blocks (16 tokens each). Default: as many as --kv-cache-mb holds.
    #[arg(long)]
    kv_blocks: Option<usize>,
    /// KV cache size in MiB when --kv-blocks is not given.
    #[arg(long, default_value_t = 1024)]
    kv_cache_mb: usize,
    /// Prompt tokens computed per engine step at most (chunked prefill).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// `max_tokens` of requests that do not set it. Default: the folder's generation_config, else 512.
    #[arg(long)]
    default_max_tokens: Option<usize>,
    /// Images whose vision features are cached.
    #[arg(long, default_value_t = 64)]
    vision_cache_entries: usize,
    /// Let batched sequences take the faster GEMM kernels: answers then depend on the rest of the batch
    /// (to rounding) instead of being exactly what each request gets alone.
    #[arg(long)]
    no_batch_invariance: bool,
    /// Seconds running requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    select_device(args.device)?;
    if !(1..=MAX_TILES).contains(&args.max_tiles) {
        anyhow::bail!("--max-tiles must be in 1..={MAX_TILES}, got {}", args.max_tiles);
    }
    // The demo model is written to a temporary folder, removed again once loaded: the weights stay mapped
    // (on Unix an unlinked file lives on while mapped), so even a killed server leaves nothing behind.
    let mut demo_dir = None;
    let (model_dir, default_name) = if args.model == "demo" && !PathBuf::from("demo").is_dir() {
        let dir = tempfile::Builder::new().prefix("facellm-demo-").tempdir()?;
        facellm::model::random::write_demo_model(dir.path(), "demo")?;
        let path = dir.path().to_string_lossy().into_owned();
        demo_dir = Some(dir);
        (path, "facellm-demo".to_string())
    } else {
        let name = PathBuf::from(&args.model)
            .file_name()
            .map_or_else(|| args.model.clone(), |n| n.to_string_lossy().into_owned());
        (args.model.clone(), name)
    };
    let loaded = load_model(&model_dir)?;
    if let Some(dir) = demo_dir {
        // Where a mapped file cannot be removed (Windows), the folder stays behind.
        let _ = dir.close();
    }
    let local_dir = match &args.allow_local_images {
        Some(d) => Some(d.canonicalize().with_context(|| format!("--allow-local-images {}", d.display()))?),
        None => None,
    };
    let p = loaded.model.llm().params();
    let block_size = facellm::kv::DEFAULT_BLOCK_SIZE;
    let layout = facellm::kv::KvLayout::new(p.layers, p.kv_heads, p.head_dim, block_size)?;
    let kv_blocks = match args.kv_blocks {
        Some(n) => n,
        // The CPU pool keeps f32 keys and values.
        None => facellm::kv::blocks_for_budget(&layout, 4, (args.kv_cache_mb as u64) << 20, 1.0)?,
    };
    let engine_cfg = EngineConfig {
        max_seqs: args.max_seqs,
        max_queue: args.max_queue,
        kv_blocks,
        block_size,
        prefill_chunk: args.prefill_chunk,
        vision_cache_entries: args.vision_cache_entries,
        row_invariant: !args.no_batch_invariance,
        ..EngineConfig::default()
    };
    let default_max_tokens = args.default_max_tokens.or(loaded.generation.max_new_tokens).unwrap_or(512);
    let cfg = ServerConfig {
        host: args.host,
        port: args.port,
        model_name: args.served_model_name.unwrap_or(default_name),
        api_key: args.api_key,
        images: ImagePolicy {
            local_dir,
            max_bytes: args.max_image_bytes,
            options: ImageOptions {
                max_tiles: args.max_tiles,
                max_pixels: args.max_image_pixels,
                ..Default::default()
            },
        },
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            max_tiles_per_request: args.max_tiles_per_request,
            request_timeout: Duration::from_secs(args.request_timeout),
        },
        generation: loaded.generation.clone(),
        default_max_tokens,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
    };
    if !super::common::QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "facellm serve: {} loaded in {:.0} ms; KV cache {kv_blocks} blocks of {block_size} tokens ({:.0} MiB), \
             up to {} sequences per batch",
            cfg.model_name,
            loaded.load_ms,
            (kv_blocks * layout.block_bytes(4)) as f64 / (1 << 20) as f64,
            engine_cfg.max_seqs
        );
    }
    let tokenizer = Arc::new(loaded.tokenizer);
    let engine = EngineHandle::spawn(loaded.model, tokenizer.clone(), engine_cfg)?;
    facellm::server::run(cfg, engine, tokenizer)?;
    Ok(())
}
