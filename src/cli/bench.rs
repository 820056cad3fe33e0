//! `facellm bench`: speed on this machine, as JSON. CPU figures for now: the vision tower of a published
//! shape with random weights (`--vision 300m|6b`), and prefill / decode of a model folder (`--model DIR`).
//! The same measurements for HF transformers come from tools/bench_cpu_hf.py, to be run in the same session
//! with the same thread count; compare ratios, not absolute numbers across machines.
//!
//!   facellm bench --vision 300m --model DIR --threads 2

use std::time::Instant;

use facellm::config::ModelConfig;
use facellm::model::random::{published_config_json, RandomWeights};
use facellm::model::vision::{VisionParams, VisionTower};
use facellm::tensor::Tensor;
use serde_json::{json, Value};

use super::common::{select_device, Device};

#[derive(clap::Args)]
pub struct Args {
    /// Backend: auto, cpu or cuda.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Model folder or hub id whose language model is timed (prefill and decode).
    #[arg(long)]
    model: Option<String>,
    /// Time vision towers of these published shapes with random weights: 300m, 6b (comma separated).
    #[arg(long, value_delimiter = ',')]
    vision: Vec<String>,
    /// Tiles per vision batch (comma separated: each is timed).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    tiles: Vec<usize>,
    /// With --device cuda: time the language model of these published shapes with random weights built on the
    /// device (1b, 8b, 38b; comma separated): TTFT, prefill and decode.
    #[arg(long, alias = "shape", value_delimiter = ',')]
    llm: Vec<String>,
    /// Accepted for clarity with --shape/--llm: published shapes always run on random weights built on the
    /// device (no files).
    #[arg(long)]
    random_weights: bool,
    /// With --llm: decode batch sizes (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    batch: Vec<usize>,
    /// With --device cuda: time every kernel's large-input case (GB/s against the copy bandwidth, TFLOP/s).
    #[arg(long)]
    kernels: bool,
    /// With --device cuda and --llm: also run the server's engine (scheduler + GPU model, as `serve --device
    /// cuda`) on each shape at each --batch size: time to first token and decode tok/s through it.
    #[arg(long)]
    engine: bool,
    /// Prompt lengths for prefill, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "40,512")]
    prompt_tokens: Vec<usize>,
    /// Decode steps timed after the first prompt.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Timed repetitions of each measurement (the minimum and median are reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// The published config carrying the vision tower `shape` (300m: FaceLLM-1B's, 6b: FaceLLM-38B's) and its
/// parameters.
pub fn vision_shape(shape: &str) -> anyhow::Result<(ModelConfig, VisionParams)> {
    let size = match shape {
        "300m" => "1b",
        "6b" => "38b",
        other => anyhow::bail!("unknown vision shape `{other}` (expected 300m or 6b)"),
    };
    let config = ModelConfig::from_json_str("published config", &published_config_json(size)?)?;
    let vc = config.vision().ok_or_else(|| anyhow::anyhow!("no vision config"))?;
    let params = VisionParams::from_config(vc)?;
    Ok((config, params))
}

/// The deterministic prompt both this bench and the HF script feed: ids spread over the vocabulary.
pub fn bench_ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| 1000 + ((i as u64 * 7919) % 100_000) as u32).collect()
}

fn stats(ms: &mut [f64]) -> Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    json!({ "min_ms": ms[0], "median_ms": ms[ms.len() / 2], "all_ms": ms })
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if matches!(args.device, Device::Cuda) {
        return run_cuda(&args);
    }
    select_device(args.device)?;
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    if args.model.is_none() && args.vision.is_empty() {
        anyhow::bail!("nothing to measure: give --model DIR and/or --vision 300m|6b");
    }
    let repeat = args.repeat.max(1);
    let mut report = json!({
        "device": "cpu",
        "cpu": cpu_name(),
        "threads": rayon::current_num_threads(),
    });
    let mut vision_runs = Vec::new();
    for shape in &args.vision {
        for &n in &args.tiles {
            let (config, params) = vision_shape(shape)?;
            let tower = VisionTower::load(&RandomWeights::for_config(&config, "bench"), &params)?;
            let px: Vec<f32> = facellm::model::random::values_bf16(7, n * 3 * 448 * 448, 2.0, 0.0)
                .iter()
                .map(|v| v.to_f32())
                .collect();
            let px = Tensor::from_f32([n, 3, 448, 448], px)?;
            tower.forward(&px)?; // warm-up
            let mut ms = Vec::new();
            for _ in 0..repeat {
                let t = Instant::now();
                tower.forward(&px)?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let (h, i, t, l) =
                (params.hidden as f64, params.intermediate as f64, params.tokens() as f64, params.layers as f64);
            let flops =
                n as f64 * (l * (2.0 * t * (4.0 * h * h + 2.0 * h * i) + 4.0 * t * t * h) + 2.0 * t * h * 588.0);
            let best = ms.iter().cloned().fold(f64::INFINITY, f64::min);
            vision_runs.push(json!({
                "shape": shape, "tiles": n, "time": stats(&mut ms),
                "ms_per_tile": best / n as f64, "gflop_per_s": flops / best / 1e6,
            }));
        }
    }
    if !vision_runs.is_empty() {
        report["vision"] = Value::Array(vision_runs);
    }
    if let Some(name) = &args.model {
        let dir = super::source::resolve(name)?;
        let t0 = Instant::now();
        let (_, model) = facellm::model::load_dir(&dir)?;
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut prefill = Vec::new();
        for &n in &args.prompt_tokens {
            let ids = bench_ids(n);
            let mut ms = Vec::new();
            for _ in 0..repeat {
                let mut cache = model.new_cache();
                let t = Instant::now();
                model.forward(&ids, None, &mut cache, false, None)?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let s = stats(&mut ms);
            let tok_s = n as f64 * 1e3 / s["min_ms"].as_f64().unwrap_or(f64::INFINITY);
            prefill.push(json!({ "tokens": n, "time": s, "tokens_per_s": tok_s }));
        }
        let first = *args.prompt_tokens.first().unwrap_or(&40);
        let mut cache = model.new_cache();
        let logits = model.forward(&bench_ids(first), None, &mut cache, false, None)?;
        let mut next = facellm::backend::argmax(logits.f32s()?)? as u32;
        let mut ms = Vec::new();
        for _ in 0..args.decode_tokens {
            let t = Instant::now();
            let logits = model.forward(&[next], None, &mut cache, false, None)?;
            next = facellm::backend::argmax(logits.f32s()?)? as u32;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let total: f64 = ms.iter().sum();
        report["llm"] = json!({
            "model": dir.display().to_string(),
            "load_ms": load_ms,
            "prefill": prefill,
            "decode": { "after_prompt_tokens": first, "steps": ms.len(), "time": stats(&mut ms),
                        "tokens_per_s": ms.len() as f64 * 1e3 / total.max(1e-9) },
        });
    }
    report["peak_rss_mb"] = json!(peak_rss_mb());
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_args: &Args) -> anyhow::Result<()> {
    select_device(Device::Cuda)
}

#[cfg(feature = "cuda")]
fn run_cuda(args: &Args) -> anyhow::Result<()> {
    use facellm::backend::cuda::CudaDevice;
    if args.vision.is_empty() && !args.kernels && args.model.is_none() && args.llm.is_empty() {
        anyhow::bail!("nothing to measure: give --vision 300m,6b, --llm 1b,8b and/or --kernels");
    }
    let dev = CudaDevice::new(0).map_err(|e| anyhow::anyhow!("bench --device cuda: {e}"))?;
    use facellm::model::gpu::WeightSource;
    let mut ckpt = None;
    if let Some(name) = &args.model {
        let dir = super::source::resolve(name)?;
        ckpt = Some((dir.display().to_string(), facellm::loader::open_model(&dir)?));
    }
    let mut targets = Vec::new();
    for shape in &args.llm {
        let config = ModelConfig::from_json_str("published config", &published_config_json(shape)?)?;
        targets.push((shape.clone(), config, WeightSource::DeviceRandom { case: format!("bench-{shape}") }));
    }
    if let Some((name, (config, c))) = &ckpt {
        targets.push((name.clone(), config.clone(), WeightSource::Host(c)));
    }
    let copy = super::bench_cuda::copy_bandwidth(&dev)?;
    let mut report = json!({
        "device": "cuda",
        "gpu": dev.info.name,
        "compute_capability": format!("{}.{}", dev.info.compute_capability.0, dev.info.compute_capability.1),
        "copy_bandwidth_gb_per_s": copy,
    });
    if !args.vision.is_empty() {
        report["vision"] = super::bench_cuda::vision(&dev, &args.vision, &args.tiles, args.repeat.max(5))?;
    }
    if !targets.is_empty() {
        report["llm"] = super::bench_cuda::llm(&dev, &targets, &args.batch, args.decode_tokens)?;
    }
    if args.kernels {
        report["kernels"] = super::bench_cuda::kernels(&dev, copy)?;
    }
    if args.engine {
        if args.llm.is_empty() {
            anyhow::bail!("--engine needs --llm SHAPES (1b, 8b, 38b)");
        }
        report["engine"] = super::bench_cuda::engine(&args.llm, &args.batch, args.decode_tokens)?;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
