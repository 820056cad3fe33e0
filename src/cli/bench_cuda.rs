//! The GPU half of `facellm bench` (feature `cuda`): device-resident random weights of the published
//! shapes, timed with CUDA events. Reported next to the copy bandwidth measured in the same run, so
//! memory-bound figures read as a fraction of what the card can move.
//!
//!   facellm bench --device cuda --vision 300m,6b --tiles 1,7,13
//!   facellm bench --device cuda --kernels

use facellm::backend::cuda::{buffer, CudaDevice};
use facellm::config::ModelConfig;
use facellm::model::gpu::vision::{GpuVision, VisionWorkspace};
use facellm::model::gpu::WeightSource;
use facellm::model::vision::VisionParams;
use half::bf16;
use serde_json::{json, Value};

/// Median and minimum of `repeat` timings of `f` (after `warmup` untimed runs), in ms of device time.
fn time(
    dev: &CudaDevice,
    warmup: usize,
    repeat: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Value> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut ms = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let mut err = None;
        let t = dev.time_ms(|| {
            if let Err(e) = f() {
                err = Some(e);
            }
            Ok(())
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        ms.push(t);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(json!({ "median_ms": ms[ms.len() / 2], "min_ms": ms[0], "runs": ms.len() }))
}

/// Device-to-device copy bandwidth in GB/s (read + write bytes), 1 GiB buffers.
pub fn copy_bandwidth(dev: &CudaDevice) -> anyhow::Result<f64> {
    let n = 1usize << 29; // bf16 elements: 1 GiB
    let src = buffer::zeros::<bf16>(dev, n)?;
    let mut dst = buffer::scratch::<bf16>(dev, n)?;
    let t = time(dev, 2, 10, || {
        facellm::backend::cuda::guarded("copy", || dev.stream.memcpy_dtod(&src, &mut dst))?;
        Ok(())
    })?;
    Ok(2.0 * (n * 2) as f64 / (t["median_ms"].as_f64().unwrap_or(f64::NAN) * 1e-3) / 1e9)
}

pub fn vision(dev: &CudaDevice, shapes: &[String], tiles: &[usize], repeat: usize) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    for shape in shapes {
        let (config, params) = super::bench::vision_shape(shape)?;
        let src = WeightSource::DeviceRandom { case: format!("bench-{shape}") };
        let t0 = std::time::Instant::now();
        let model = GpuVision::load(&src, dev, &params, config.text().hidden_size)?;
        dev.synchronize()?;
        let build_ms = t0.elapsed().as_secs_f64() * 1e3;
        for &n in tiles {
            let mut ws = VisionWorkspace::new(dev, &params, config.text().hidden_size, n)?;
            facellm::backend::cuda::fill::fill_uniform_bf16(dev, &mut ws.pixels.as_view_mut(), 7, 2.0, 0.0)?;
            let eager = time(dev, 2, repeat, || Ok(model.forward_ws(dev, &mut ws, false)?))?;
            let graph = time(dev, 2, repeat, || Ok(model.forward_ws(dev, &mut ws, true)?))?;
            let e = eager["median_ms"].as_f64().unwrap_or(f64::NAN);
            let ms = graph["median_ms"].as_f64().unwrap_or(f64::NAN).min(e);
            out.push(json!({
                "shape": shape, "tiles": n, "ms": ms, "eager": eager, "graph": graph,
                "tflop_per_s": model.flops(n) / (ms * 1e-3) / 1e12,
                "weights_build_ms": build_ms,
            }));
        }
    }
    Ok(Value::Array(out))
}

pub fn kernels(dev: &CudaDevice, copy_gbs: f64) -> anyhow::Result<Value> {
    use facellm::selfcheck::cuda as sc;
    let mut cases = sc::gemm::bench_cases(dev)?;
    cases.extend(sc::bench_cases(dev)?);
    let mut out = Vec::new();
    for mut c in cases {
        let t = time(dev, 3, 20, || Ok((c.launch)()?))?;
        let ms = t["median_ms"].as_f64().unwrap_or(f64::NAN);
        let gbs = c.bytes / (ms * 1e-3) / 1e9;
        out.push(json!({
            "op": c.op, "shape": c.shape, "us": ms * 1e3,
            "gb_per_s": gbs, "fraction_of_copy_bw": gbs / copy_gbs,
            "tflop_per_s": if c.flops > 0.0 { c.flops / (ms * 1e-3) / 1e12 } else { 0.0 },
        }));
    }
    Ok(Value::Array(out))
}

/// The language model of a published shape with random weights built on the device: TTFT (one 448 tile +
/// 41 text tokens: vision tower, projector, prefill of 297 tokens, first token), prefill tok/s (512
/// tokens), greedy decode tok/s at each batch size (41-token prompts, `decode_tokens` steps replayed from
/// CUDA graphs), and the device memory the run used.
pub fn llm(
    dev: &CudaDevice,
    targets: &[(String, ModelConfig, WeightSource)],
    batches: &[usize],
    decode_tokens: usize,
) -> anyhow::Result<Value> {
    use facellm::model::gpu::llm::{DecodeGraphs, GpuKvCache, GpuQwen2, SeqInput, Workspace, BLOCK_SIZE};
    use facellm::model::llm::TextParams;
    use std::time::Instant;

    let mut out = Vec::new();
    for (shape, config, src) in targets {
        let (free0, total) = facellm::backend::cuda::guarded("mem_get_info", || dev.ctx.mem_get_info())?;
        dev.synchronize()?;
        dev.reset_pool_peak();
        let p = TextParams::from_config(config.text(), config.tie_word_embeddings())?;
        let t0 = Instant::now();
        let model = GpuQwen2::load(src, dev, &p, "model.language_model")?;
        let vc =
            config.vision().ok_or_else(|| anyhow::anyhow!("{shape}: the bench needs a model with a vision tower"))?;
        let vp = VisionParams::from_config(vc)?;
        let vision = GpuVision::load(src, dev, &vp, p.hidden)?;
        dev.synchronize()?;
        let build_ms = t0.elapsed().as_secs_f64() * 1e3;
        let max_batch = batches.iter().copied().max().unwrap_or(1).max(1);
        let max_context = 640;
        let per_seq = max_context / BLOCK_SIZE;
        let mut kv = GpuKvCache::new(dev, &p, (max_batch + 1) * per_seq)?;
        let mut ws = Workspace::new(dev, &p, 512, max_batch.max(8), max_context)?;
        let table = |i: usize| -> Vec<u32> { (0..per_seq).map(|j| (i * per_seq + j) as u32).collect() };

        // TTFT: 1 tile through the vision tower and projector, then `<|im_start|>` + 256 image tokens + 40 text
        // tokens of prefill with the features scattered in, then the first token.
        let mut vws = VisionWorkspace::new(dev, &vp, p.hidden, 1)?;
        facellm::backend::cuda::fill::fill_uniform_bf16(dev, &mut vws.pixels.as_view_mut(), 7, 2.0, 0.0)?;
        let mut ids = vec![151644u32];
        ids.extend(std::iter::repeat_n(151667u32, 256));
        ids.extend(super::bench::bench_ids(40));
        let image_rows: Vec<i32> = (1..=256).collect();
        let t_seq = table(max_batch);
        let mut ttft = Vec::new();
        for _ in 0..8 {
            dev.synchronize()?;
            let t = Instant::now();
            vision.forward_ws(dev, &mut vws, true)?;
            let seq = [SeqInput { tokens: &ids, start: 0, blocks: &t_seq }];
            model.prefill(dev, &mut kv, &mut ws, &seq, Some((&vws.features.as_view(), &image_rows)))?;
            ttft.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ttft.drain(..3); // warm-up
        ttft.sort_by(|a, b| a.total_cmp(b));

        // Prefill throughput: 512 text tokens.
        let long = super::bench::bench_ids(512);
        let mut pre = Vec::new();
        for _ in 0..5 {
            dev.synchronize()?;
            let t = Instant::now();
            model.prefill(dev, &mut kv, &mut ws, &[SeqInput { tokens: &long, start: 0, blocks: &t_seq }], None)?;
            pre.push(t.elapsed().as_secs_f64() * 1e3);
        }
        pre.drain(..2);
        pre.sort_by(|a, b| a.total_cmp(b));

        // Decode at each batch size, graphs captured on the first steps (not timed).
        let prompt = super::bench::bench_ids(41);
        let mut graphs = DecodeGraphs::default();
        let mut decode = Vec::new();
        for &b in batches {
            let tables: Vec<Vec<u32>> = (0..b).map(table).collect();
            let seqs: Vec<SeqInput> =
                (0..b).map(|i| SeqInput { tokens: &prompt, start: 0, blocks: &tables[i] }).collect();
            for chunk in seqs.chunks(8) {
                model.prefill(dev, &mut kv, &mut ws, chunk, None)?;
            }
            let mut next: Vec<u32> = vec![1000; b];
            let warm = 3;
            let mut t_start = Instant::now();
            for step in 0..decode_tokens + warm {
                if step == warm {
                    dev.synchronize()?;
                    t_start = Instant::now();
                }
                let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                let seqs: Vec<SeqInput> = (0..b)
                    .map(|i| SeqInput { tokens: &toks[i], start: prompt.len() + step, blocks: &tables[i] })
                    .collect();
                next = model.decode(dev, &mut kv, &mut ws, &seqs, Some(&mut graphs))?;
            }
            let secs = t_start.elapsed().as_secs_f64();
            decode.push(json!({
                "batch": b, "steps": decode_tokens, "ms_per_step": secs * 1e3 / decode_tokens as f64,
                "tokens_per_s": (b * decode_tokens) as f64 / secs,
            }));
        }
        let (free1, _) = facellm::backend::cuda::guarded("mem_get_info", || dev.ctx.mem_get_info())?;
        out.push(json!({
            "shape": shape,
            "weights_gb": model.weight_bytes() as f64 / 1e9,
            "build_ms": build_ms,
            "ttft_ms": { "median": ttft[ttft.len() / 2], "min": ttft[0] },
            "prefill_512": { "median_ms": pre[pre.len() / 2], "tokens_per_s": 512e3 / pre[pre.len() / 2] },
            "decode": decode,
            "graphs_captured": graphs.captured(),
            // The allocator pool's high watermark: weights, KV cache, workspaces and the vision tower's buffers.
            "peak_device_memory_gb": dev.pool_peak_bytes().map(|b| b as f64 / 1e9),
            "kv_cache_gb": kv.bytes() as f64 / 1e9,
            "device_free_drop_gb": (free0 - free1.min(free0)) as f64 / 1e9,
            "device_memory_total_gb": total as f64 / 1e9,
            "decode_floor_ms_per_step": "weights_gb / copy bandwidth (see top level)",
        }));
        drop(kv);
        drop(ws);
        drop(model);
        drop(vision);
    }
    Ok(Value::Array(out))
}

/// The server's engine on the GPU (`engine::batch::Scheduler` over `GpuBatchModel`), for each published
/// shape: `b` greedy requests of a 41-token prompt and `decode_tokens` answers submitted together, run step by
/// step as `facellm serve --device cuda` runs them. Reports the median time to first token and the decode
/// throughput once every request has its first token, next to the raw decode loop of `llm` in the same
/// report: the difference is what scheduling, sampling bookkeeping and streaming cost per step.
pub fn engine(shapes: &[String], batches: &[usize], decode_tokens: usize) -> anyhow::Result<Value> {
    use facellm::backend::SamplingParams;
    use facellm::engine::batch::{
        EngineConfig, EngineMetrics, Event, Request, Scheduler, SeqParams, Slots, VisionCache,
    };
    use facellm::engine::gpu::{GpuBatchModel, GpuOptions};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    let tok = facellm::tokenizer::Tokenizer::internvl3()?;
    let max_batch = batches.iter().copied().max().unwrap_or(1).max(1);
    let mut out = Vec::new();
    for shape in shapes {
        let config = ModelConfig::from_json_str("published config", &published_config(shape)?)?;
        let dev = CudaDevice::new(0).map_err(|e| anyhow::anyhow!("bench --engine: {e}"))?;
        let opts = GpuOptions {
            max_seqs: max_batch,
            max_context: 2048,
            prefill_chunk: 512 + max_batch,
            kv_fraction: 0.5,
            kv_blocks: None,
            graphs: true,
        };
        let src = WeightSource::DeviceRandom { case: format!("bench-{shape}") };
        let model = GpuBatchModel::load(dev, &config, &src, &opts)?;
        let prompt = super::bench::bench_ids(41);
        let mut rows = Vec::new();
        for &b in batches {
            let cfg = EngineConfig {
                max_seqs: max_batch,
                max_queue: max_batch,
                prefill_chunk: 512,
                row_invariant: false,
                ..EngineConfig::default()
            };
            let metrics = Arc::new(EngineMetrics::default());
            let vision = Arc::new(Mutex::new(VisionCache::new(4, 1 << 20)));
            let mut sched = Scheduler::new(&model, &tok, cfg, metrics, vision)?;
            let slots = Slots::new(max_batch * 2);
            let mut rxs = Vec::new();
            let t0 = Instant::now();
            for i in 0..b {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let mut ids = prompt.clone();
                ids[0] += i as u32; // distinct prompts: no prefix sharing between the requests
                sched.submit(Request {
                    prompt: ids,
                    images: vec![],
                    params: SeqParams {
                        max_tokens: decode_tokens,
                        sampling: SamplingParams::greedy(),
                        eos_ids: vec![],
                        stop: vec![],
                    },
                    arrived: t0,
                    deadline: None,
                    events: tx,
                    permit: slots.try_acquire().ok_or_else(|| anyhow::anyhow!("no slot"))?,
                });
                rxs.push(rx);
            }
            let mut first: Vec<Option<f64>> = vec![None; b];
            let mut done = vec![0usize; b];
            let mut t_all_first = None;
            let mut steps = 0usize;
            let mut steps_after = 0usize;
            while !sched.is_idle() {
                sched.step();
                steps += 1;
                if t_all_first.is_some() {
                    steps_after += 1;
                }
                let now = t0.elapsed().as_secs_f64() * 1e3;
                for (i, rx) in rxs.iter_mut().enumerate() {
                    while let Ok(ev) = rx.try_recv() {
                        match ev {
                            Event::Text(_) => {
                                first[i].get_or_insert(now);
                            }
                            Event::Done(s) => {
                                first[i].get_or_insert(now);
                                done[i] = s.completion_tokens;
                            }
                            Event::Failed(f) => anyhow::bail!("bench --engine: request {i} failed: {}", f.message()),
                        }
                    }
                }
                if t_all_first.is_none() && first.iter().all(Option::is_some) {
                    t_all_first = Some(now);
                }
            }
            let end = t0.elapsed().as_secs_f64() * 1e3;
            let mut ttft: Vec<f64> = first.iter().map(|t| t.unwrap_or(end)).collect();
            ttft.sort_by(|a, b| a.total_cmp(b));
            let after = t_all_first.unwrap_or(end);
            // Tokens produced after every request had its first one.
            let later: usize = done.iter().map(|&n| n.saturating_sub(1)).sum();
            rows.push(json!({
                "batch": b,
                "engine_steps": steps,
                "ttft_ms_median": ttft[ttft.len() / 2],
                "decode_ms_per_step": (end - after) / steps_after.max(1) as f64,
                "decode_tokens_per_s": later as f64 * 1e3 / (end - after).max(1e-9),
                "completion_tokens": done.iter().sum::<usize>(),
            }));
        }
        out.push(json!({ "shape": shape, "max_context": 2048, "runs": rows }));
    }
    Ok(Value::Array(out))
}

fn published_config(shape: &str) -> anyhow::Result<String> {
    Ok(facellm::model::random::published_config_json(shape)?)
}
