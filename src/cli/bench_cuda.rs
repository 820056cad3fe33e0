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
