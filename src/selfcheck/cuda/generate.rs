//! The batching engine on the GPU (`engine::batch::Scheduler` over `GpuBatchModel`, what `generate`, `chat`
//! and `serve` run with `--device cuda`) end to end against the CPU model: several requests (two with one
//! image) with fewer batch rows than requests, greedy, compared token by token with the CPU model's logits
//! along the GPU's own answer. A GPU token may differ from the CPU's argmax only where the CPU scores it
//! within the logits' bf16 error of its best (a near-tie); an answer that wanders off on a clear choice fails.

use super::super::{Report, Rng, Row};
use crate::backend::cuda::CudaDevice;
use crate::backend::SamplingParams;
use crate::config::ModelConfig;
use crate::engine::gpu::GpuOptions;
use crate::model::gpu::WeightSource;
use crate::model::random::{published_config_json, RandomWeights};
use crate::tensor::Tensor;
use crate::Result;

fn tiny() -> Result<ModelConfig> {
    let mut v: serde_json::Value = serde_json::from_str(&published_config_json("1b")?).expect("valid json");
    let vc = &mut v["vision_config"];
    vc["num_hidden_layers"] = 2.into();
    vc["hidden_size"] = 128.into();
    vc["num_attention_heads"] = 2.into();
    vc["intermediate_size"] = 256.into();
    let tc = &mut v["text_config"];
    tc["hidden_size"] = 256.into();
    tc["num_hidden_layers"] = 2.into();
    tc["num_attention_heads"] = 4.into();
    tc["num_key_value_heads"] = 2.into();
    tc["intermediate_size"] = 512.into();
    ModelConfig::from_json_str("selfcheck-generate", &v.to_string())
}

/// Teacher-forces the CPU model along `answer` (the GPU's greedy tokens for `ids`) and scores each GPU
/// token against the CPU's argmax: equal, a near-tie (within 5e-2 logit RMS of the best), or a clear
/// disagreement, which fails the row, as does an answer shorter than `want`.
fn along(
    cpu: &crate::model::facellm::FaceLlm,
    ids: &[u32],
    pixels: Option<&(Vec<f32>, usize)>,
    answer: &[u32],
    want: usize,
    op: String,
) -> Result<Row> {
    let features = match pixels {
        Some((px, tiles)) => Some(cpu.encode_images(&Tensor::from_f32([*tiles, 3, 448, 448], px.clone())?)?.features),
        None => None,
    };
    let mut cache = cpu.new_cache();
    let mut logits = cpu.forward(ids, features.as_ref(), &mut cache, false, None)?.to_f32_vec();
    let (mut agree, mut near, mut bad, mut worst) = (0, 0, 0, 0.0f64);
    for &g in answer {
        let best = super::llm::argmax(&logits);
        let rms = super::models::rms(&logits);
        let short = (logits[best] - logits[g as usize]) as f64 / rms.max(1e-12);
        worst = worst.max(short);
        if g as usize == best {
            agree += 1;
        } else if short <= 5e-2 {
            near += 1;
        } else {
            bad += 1;
        }
        logits = cpu.forward(&[g], None, &mut cache, false, None)?.to_f32_vec();
    }
    Ok(Row {
        op,
        shape: format!(
            "prompt {} tokens{}, {} new",
            ids.len(),
            if pixels.is_some() { " + 1 tile" } else { "" },
            answer.len()
        ),
        max_abs: worst,
        max_rel: worst,
        atol: 5e-2,
        rtol: 0.0,
        pass: bad == 0 && answer.len() == want,
        note: format!(
            "{agree} tokens = CPU argmax, {near} near-ties, {bad} clear disagreements; {} of {want} tokens; worst \
             shortfall {worst:.3e} x logit RMS",
            answer.len()
        ),
    })
}

/// The server's engine (`engine::batch::Scheduler`) on `GpuBatchModel`: more requests than batch rows (3, not
/// a decode bucket), a small pool, two questions about one image and two prompts with a long shared text
/// prefix (prefix blocks shared between sequences on the device), chunked prefill; each answer checked
/// along the CPU model as above, and every block back at the end.
pub fn run(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    use crate::engine::batch::{
        EngineConfig, EngineMetrics, Event, ImageInput, ImageSource, Request, Scheduler, SeqParams, Slots, VisionCache,
    };
    use crate::engine::gpu::GpuBatchModel;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    let op = "server engine on the GPU vs CPU";
    let mut go = || -> Result<Vec<Row>> {
        let config = tiny()?;
        let weights = RandomWeights::for_config(&config, "selfcheck-engine");
        let cpu = crate::model::build(&config, &weights)?;
        let opts = GpuOptions {
            max_seqs: 3,
            max_context: 1024,
            prefill_chunk: 64 + 3,
            kv_fraction: 0.05,
            kv_blocks: Some(48),
            graphs: true,
        };
        let gpu =
            GpuBatchModel::load(CudaDevice::new(dev.info.ordinal)?, &config, &WeightSource::Host(&weights), &opts)?;
        let tok = crate::tokenizer::Tokenizer::internvl3()?;
        let image_token = config.internvl().map(|c| c.image_token_id).unwrap_or(151667);
        let pixels: Vec<f32> = (0..3 * 448 * 448).map(|_| half::bf16::from_f32(rng.sym(2.0)).to_f32()).collect();
        let mut text = |n: usize| -> Vec<u32> { (0..n).map(|_| 100 + rng.below(150_000) as u32).collect() };
        let image_prompt = |before: &[u32], after: &[u32]| -> Vec<u32> {
            let mut v = before.to_vec();
            v.extend(std::iter::repeat_n(image_token, 256));
            v.extend_from_slice(after);
            v
        };
        let (head, shared) = (text(5), text(200));
        let mut long_a = shared.clone();
        long_a.extend(text(40));
        let mut long_b = shared;
        long_b.extend(text(25));
        // (prompt, with the image, new tokens)
        let prompts: Vec<(Vec<u32>, bool, usize)> = vec![
            (image_prompt(&head, &text(30)), true, 12),
            (text(17), false, 12),
            (long_a, false, 10),
            (image_prompt(&head, &text(22)), true, 12),
            (long_b, false, 10),
            (text(3), false, 8),
        ];
        let metrics = Arc::new(EngineMetrics::default());
        let cfg = EngineConfig {
            max_seqs: 3,
            max_queue: 16,
            prefill_chunk: 64,
            row_invariant: false,
            ..EngineConfig::default()
        };
        let vision = Arc::new(Mutex::new(VisionCache::new(8, 64 << 20)));
        let mut sched = Scheduler::new(&gpu, &tok, cfg, metrics.clone(), vision)?;
        let slots = Slots::new(32);
        let tile = Tensor::from_f32([1, 3, 448, 448], pixels.clone())?;
        let mut rxs = Vec::new();
        for (ids, image, new) in &prompts {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let images = if *image {
                vec![ImageInput { digest: [9; 32], tiles: 1, source: ImageSource::Pixels(tile.clone()) }]
            } else {
                vec![]
            };
            let params =
                SeqParams { max_tokens: *new, sampling: SamplingParams::default(), eos_ids: vec![], stop: vec![] };
            let permit = slots.try_acquire().ok_or_else(|| crate::Error::Invalid("no slot".into()))?;
            sched.submit(Request {
                prompt: ids.clone(),
                images,
                params,
                arrived: std::time::Instant::now(),
                deadline: None,
                events: tx,
                permit,
            });
            rxs.push(rx);
        }
        let mut steps = 0;
        while !sched.is_idle() {
            sched.step();
            steps += 1;
            if steps > 10_000 {
                return Err(crate::Error::Invalid("the engine did not finish in 10000 steps".into()));
            }
        }
        let mut rows = Vec::new();
        for (i, ((ids, image, new), rx)) in prompts.iter().zip(&mut rxs).enumerate() {
            let mut answer = None;
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    Event::Done(s) => answer = Some(Ok(s.completion_ids)),
                    Event::Failed(f) => answer = Some(Err(f.message().to_string())),
                    Event::Text(_) => {}
                }
            }
            let name = format!("{op}: request {i}");
            match answer {
                Some(Ok(ids_out)) => {
                    let px = image.then(|| (pixels.clone(), 1));
                    rows.push(along(&cpu, ids, px.as_ref(), &ids_out, *new, name)?);
                }
                other => rows.push(Row {
                    op: name,
                    shape: format!("prompt {} tokens", ids.len()),
                    max_abs: f64::NAN,
                    max_rel: f64::NAN,
                    atol: 0.0,
                    rtol: 0.0,
                    pass: false,
                    note: format!("no answer: {other:?}"),
                }),
            }
        }
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let (pre, hits, used) = (get(&metrics.preemptions), get(&metrics.prefix_hits), sched.kv_blocks_used());
        rows.push(Row {
            op: format!("{op}: bookkeeping"),
            shape: format!("{} requests, 3 rows, 48 blocks, {steps} steps", prompts.len()),
            max_abs: used as f64,
            max_rel: 0.0,
            atol: 0.0,
            rtol: 0.0,
            pass: used == 0 && hits > 0,
            note: format!(
                "{hits} prefix hits (want > 0), {used} blocks held at the end (want 0), {pre} preemptions (as the \
                 pool allows; preemption itself is tested on the CPU with a fake device model)"
            ),
        });
        Ok(rows)
    };
    match go() {
        Ok(rows) => report.rows.extend(rows),
        Err(e) => report.error(op, "-", e),
    }
}
