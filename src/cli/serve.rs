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
    /// Backend: auto (the CPU), cpu or cuda (a build with feature `cuda`: weights, vision tower and KV
    /// cache on GPU 0).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// With --device cuda: the fraction of the GPU memory left after loading that the KV cache takes.
    #[arg(long, default_value_t = 0.8)]
    gpu_memory_fraction: f64,
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
    /// KV cache blocks (16 tokens each). Default: as many as --kv-cache-mb holds (on the GPU: as many as
    /// --gpu-memory-fraction leaves room for).
    #[arg(long)]
    kv_blocks: Option<usize>,
    /// KV cache size in MiB when --kv-blocks is not given (CPU).
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
    if args.device != Device::Cuda {
        select_device(args.device)?;
    }
    if !(1..=MAX_TILES).contains(&args.max_tiles) {
        anyhow::bail!("--max-tiles must be in 1..={MAX_TILES}, got {}", args.max_tiles);
    }
    // The demo model is written to a temporary folder, removed again once loaded: the weights stay mapped
    // (on Unix an unlinked file lives on while mapped), so even a killed server leaves nothing behind.
    let mut demo_dir = None;
    let (model_dir, default_name) = if args.model == "demo" && !PathBuf::from("demo").is_dir() {
        let dir = tempfile::Builder::new().prefix("facellm-demo-").tempdir()?;
        // On the GPU, the same tiny model in the head dims the kernels take.
        let config = if args.device == Device::Cuda {
            facellm::model::random::demo_config_json_gpu()
        } else {
            facellm::model::random::demo_config_json()
        };
        facellm::model::random::write_demo_model_with(dir.path(), "demo", &config)?;
        let path = dir.path().to_string_lossy().into_owned();
        demo_dir = Some(dir);
        (path, "facellm-demo".to_string())
    } else {
        let name = PathBuf::from(&args.model)
            .file_name()
            .map_or_else(|| args.model.clone(), |n| n.to_string_lossy().into_owned());
        (args.model.clone(), name)
    };
    let local_dir = match &args.allow_local_images {
        Some(d) => Some(d.canonicalize().with_context(|| format!("--allow-local-images {}", d.display()))?),
        None => None,
    };
    if args.device == Device::Cuda {
        return run_cuda(args, &model_dir, default_name, local_dir, demo_dir);
    }
    let loaded = load_model(&model_dir)?;
    if let Some(dir) = demo_dir {
        // Where a mapped file cannot be removed (Windows), the folder stays behind.
        let _ = dir.close();
    }
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
    let generation = loaded.generation.clone();
    let (max_seqs, quiet) = (engine_cfg.max_seqs, super::common::QUIET.load(std::sync::atomic::Ordering::Relaxed));
    let cfg = server_config(args, default_name, local_dir, generation);
    if !quiet {
        eprintln!(
            "facellm serve: {} loaded in {:.0} ms; KV cache {kv_blocks} blocks of {block_size} tokens ({:.0} MiB), \
             up to {} sequences per batch",
            cfg.model_name,
            loaded.load_ms,
            (kv_blocks * layout.block_bytes(4)) as f64 / (1 << 20) as f64,
            max_seqs
        );
    }
    let tokenizer = Arc::new(loaded.tokenizer);
    let engine = EngineHandle::spawn(loaded.model, tokenizer.clone(), engine_cfg)?;
    facellm::server::run(cfg, engine, tokenizer)?;
    Ok(())
}

/// The server's settings from the command line.
fn server_config(
    args: Args,
    default_name: String,
    local_dir: Option<PathBuf>,
    generation: facellm::config::GenerationConfig,
) -> ServerConfig {
    let default_max_tokens = args.default_max_tokens.or(generation.max_new_tokens).unwrap_or(512);
    ServerConfig {
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
        generation,
        default_max_tokens,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
    }
}

/// `--device cuda`: the same engine and server, with the model on GPU 0 (`engine::gpu::GpuBatchModel`),
/// built on the engine thread; the KV pool is sized from the GPU's free memory.
#[cfg(feature = "cuda")]
fn run_cuda(
    args: Args,
    model_dir: &str,
    default_name: String,
    local_dir: Option<PathBuf>,
    demo_dir: Option<tempfile::TempDir>,
) -> anyhow::Result<()> {
    use facellm::backend::cuda::CudaDevice;
    use facellm::engine::gpu::{GpuBatchModel, GpuOptions};
    use facellm::model::gpu::WeightSource;

    let t0 = std::time::Instant::now();
    let dir = super::source::resolve(model_dir)?;
    let tokenizer = Arc::new(
        facellm::tokenizer::Tokenizer::from_dir(&dir).with_context(|| format!("tokenizer of {}", dir.display()))?,
    );
    let config = facellm::config::ModelConfig::load(&dir)?; // the weights are opened on the engine thread
    let generation = facellm::config::GenerationConfig::load(&dir, &config)?;
    let opts = GpuOptions {
        max_seqs: args.max_seqs,
        // One-token prompt rows ride along outside the chunk budget (see the scheduler's plan).
        prefill_chunk: args.prefill_chunk + args.max_seqs,
        max_context: usize::MAX,
        kv_fraction: args.gpu_memory_fraction,
        kv_blocks: args.kv_blocks,
        graphs: true,
    };
    let engine_cfg = EngineConfig {
        max_seqs: args.max_seqs,
        max_queue: args.max_queue,
        prefill_chunk: args.prefill_chunk,
        vision_cache_entries: args.vision_cache_entries,
        row_invariant: !args.no_batch_invariance,
        ..EngineConfig::default()
    };
    let build = {
        let dir = dir.clone();
        move || -> facellm::Result<GpuBatchModel> {
            let dev = CudaDevice::new(0)?;
            let (config, ckpt) = facellm::loader::open_model(&dir)?;
            GpuBatchModel::load(dev, &config, &WeightSource::Host(&ckpt), &opts)
        }
    };
    let engine = EngineHandle::spawn_with(build, tokenizer.clone(), engine_cfg)
        .map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    if let Some(d) = demo_dir {
        // The weights are on the GPU now.
        let _ = d.close();
    }
    let max_seqs = args.max_seqs;
    let cfg = server_config(args, default_name, local_dir, generation);
    if !super::common::QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "facellm serve: {} loaded on the GPU in {:.0} ms; KV cache {} tokens, up to {max_seqs} sequences per batch",
            cfg.model_name,
            t0.elapsed().as_secs_f64() * 1e3,
            engine.kv_capacity_tokens,
        );
    }
    facellm::server::run(cfg, engine, tokenizer)?;
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(
    _args: Args,
    _model_dir: &str,
    _default_name: String,
    _local_dir: Option<PathBuf>,
    _demo_dir: Option<tempfile::TempDir>,
) -> anyhow::Result<()> {
    select_device(Device::Cuda)
}
