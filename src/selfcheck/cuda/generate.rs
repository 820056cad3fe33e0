//! `GpuGenerator` end to end against the CPU model: several requests (one with an image) through the GPU
//! scheduler with fewer batch rows than requests (so one waits for a row), greedy, compared token by
//! token with the CPU model's logits along the GPU's own answer. A GPU token may differ from the CPU's
//! argmax only where the CPU scores it within the logits' bf16 error of its best (a near-tie); an answer
//! that wanders off on a clear choice fails.

use super::super::{Report, Rng, Row};
use crate::backend::cuda::CudaDevice;
use crate::backend::SamplingParams;
use crate::config::ModelConfig;
use crate::engine::generate::GenerateOptions;
use crate::engine::gpu::{GpuGenerator, GpuOptions, GpuRequest};
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

pub fn run(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    let op = "generate (GPU scheduler) vs CPU";
    let mut go = || -> Result<Vec<Row>> {
        let config = tiny()?;
        let weights = RandomWeights::for_config(&config, "selfcheck-generate");
        let cpu = crate::model::build(&config, &weights)?;
        let opts = GpuOptions { max_seqs: 2, max_context: 1024, prefill_chunk: 128, kv_fraction: 0.05, graphs: true };
        let mut gen = GpuGenerator::load(dev, &config, &WeightSource::Host(&weights), opts)?;
        let image_token = config.internvl().map(|c| c.image_token_id).unwrap_or(151667);
        let greedy = GenerateOptions {
            max_new_tokens: 12,
            sampling: SamplingParams::default(),
            eos_ids: vec![],
            stop_strings: vec![],
        };
        // Request 0: an image (1 tile = 256 tokens) between text, spanning prefill chunks of 128.
        let pixels: Vec<f32> = (0..3 * 448 * 448).map(|_| half::bf16::from_f32(rng.sym(2.0)).to_f32()).collect();
        let mut text = |n: usize| -> Vec<u32> { (0..n).map(|_| 100 + rng.below(150_000) as u32).collect() };
        let mut with_image = text(5);
        with_image.extend(std::iter::repeat_n(image_token, 256));
        with_image.extend(text(30));
        let reqs = vec![
            GpuRequest { ids: with_image, pixels: Some((pixels.clone(), 1)), opts: greedy.clone() },
            GpuRequest { ids: text(17), pixels: None, opts: greedy.clone() },
            GpuRequest { ids: text(300), pixels: None, opts: GenerateOptions { max_new_tokens: 5, ..greedy.clone() } },
        ];
        let decode = |ids: &[u32]| Ok(format!("{ids:?}"));
        let outs = gen.generate(&reqs, &decode, &mut |_, _| {})?;
        let mut rows = Vec::new();
        for (i, (r, o)) in reqs.iter().zip(&outs).enumerate() {
            // CPU logits along the GPU's answer (teacher forcing).
            let features = match &r.pixels {
                Some((px, tiles)) => {
                    Some(cpu.encode_images(&Tensor::from_f32([*tiles, 3, 448, 448], px.clone())?)?.features)
                }
                None => None,
            };
            let mut cache = cpu.new_cache();
            let mut logits = cpu.forward(&r.ids, features.as_ref(), &mut cache, false, None)?.to_f32_vec();
            let (mut agree, mut near, mut bad, mut worst) = (0, 0, 0, 0.0f64);
            for &g in &o.ids {
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
            let want_len = r.opts.max_new_tokens;
            let pass = bad == 0 && o.ids.len() == want_len;
            rows.push(Row {
                op: format!("{op}: request {i}"),
                shape: format!("prompt {} tokens{}, {} new", r.ids.len(), if r.pixels.is_some() { " + 1 tile" } else { "" }, o.ids.len()),
                max_abs: worst,
                max_rel: worst,
                atol: 5e-2,
                rtol: 0.0,
                pass,
                note: format!(
                    "{agree} tokens = CPU argmax, {near} near-ties, {bad} clear disagreements; {} of {want_len} tokens; worst shortfall {worst:.3e} x logit RMS",
                    o.ids.len()
                ),
            });
        }
        Ok(rows)
    };
    match go() {
        Ok(rows) => report.rows.extend(rows),
        Err(e) => report.error(op, "-", e),
    }
}
