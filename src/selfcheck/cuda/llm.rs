//! The language model end to end on the GPU against the CPU model on the same bf16 weights: chunked
//! prefill through the paged flash kernel, then greedy decode steps through the split-K decode kernel,
//! kernel by kernel and replayed from CUDA graphs, one sequence and a batch of sequences of different
//! lengths with non-contiguous block tables.
//!
//! Teacher forcing keeps the two devices on the same tokens: every step feeds the CPU's greedy token to
//! both, and compares the logits (relative L2, bf16 drift) and the greedy choice. A choice may differ only
//! where the CPU's top two logits are closer than the logits' measured error (a near-tie); any other
//! difference fails.

use super::super::{Report, Rng, Row};
use crate::backend::cuda::CudaDevice;
use crate::config::ModelConfig;
use crate::model::gpu::llm::{DecodeGraphs, GpuKvCache, GpuQwen2, SeqInput, Workspace, BLOCK_SIZE};
use crate::model::gpu::WeightSource;
use crate::model::llm::TextParams;
use crate::model::random::{published_config_json, RandomWeights};
use crate::Result;

fn tiny_config(hidden: usize, heads: usize, kv_heads: usize, layers: usize) -> Result<ModelConfig> {
    let mut v: serde_json::Value = serde_json::from_str(&published_config_json("1b")?).expect("valid json");
    let vc = &mut v["vision_config"];
    vc["num_hidden_layers"] = 1.into();
    vc["hidden_size"] = 64.into();
    vc["num_attention_heads"] = 1.into();
    vc["intermediate_size"] = 128.into();
    let tc = &mut v["text_config"];
    tc["hidden_size"] = hidden.into();
    tc["num_hidden_layers"] = layers.into();
    tc["num_attention_heads"] = heads.into();
    tc["num_key_value_heads"] = kv_heads.into();
    tc["intermediate_size"] = (3 * hidden).into();
    ModelConfig::from_json_str("selfcheck-llm", &v.to_string())
}

/// Index of the largest value, the first on ties.
pub fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold(0, |b, (i, &v)| if v > x[b] { i } else { b })
}

/// Top-1 minus top-2 of `x`.
fn gap(x: &[f32]) -> f32 {
    let a = argmax(x);
    let second = x.iter().enumerate().filter(|(i, _)| *i != a).map(|(_, &v)| v).fold(f32::NEG_INFINITY, f32::max);
    x[a] - second
}

struct Tally {
    steps: usize,
    agree: usize,
    near_ties: usize,
    bad: usize,
    worst_l2: f64,
}

impl Tally {
    fn new() -> Tally {
        Tally { steps: 0, agree: 0, near_ties: 0, bad: 0, worst_l2: 0.0 }
    }
    fn add(&mut self, gpu: &[f32], cpu: &[f32]) {
        let e = super::models::rel_l2(gpu, cpu);
        self.worst_l2 = self.worst_l2.max(if e.is_finite() { e } else { f64::INFINITY });
        self.steps += 1;
        let (g, c) = (argmax(gpu), argmax(cpu));
        if g == c {
            self.agree += 1;
        } else {
            // The logits' absolute error scale: rel L2 times the RMS of the CPU logits.
            let rms = super::models::rms(cpu);
            if (gap(cpu) as f64) < 4.0 * e * rms {
                self.near_ties += 1;
            } else {
                self.bad += 1;
            }
        }
    }
    fn row(&self, op: &str, shape: &str, max_l2: f64) -> Row {
        let pass = self.bad == 0 && self.worst_l2 <= max_l2 && self.steps > 0;
        Row {
            op: op.to_string(),
            shape: shape.to_string(),
            max_abs: self.worst_l2,
            max_rel: self.worst_l2,
            atol: max_l2,
            rtol: 0.0,
            pass,
            note: format!(
                "{} steps: greedy equal {}, near-ties {}, real disagreements {}; worst logits rel L2 {:.2e}",
                self.steps, self.agree, self.near_ties, self.bad, self.worst_l2
            ),
        }
    }
}

/// One or more sequences: CPU reference logits per step (prefill's last row, then each decode step) under
/// teacher forcing, against the GPU's, with and without graphs.
fn case(
    dev: &CudaDevice,
    report: &mut Report,
    rng: &mut Rng,
    name: &str,
    config: &ModelConfig,
    prompts: &[usize],
    gemv: bool,
) {
    let op = format!("llm end to end {name}{}", if gemv { " [decode GEMV]" } else { "" });
    let decode_steps = 12;
    let mut run = || -> Result<Vec<Row>> {
        let p = TextParams::from_config(config.text(), config.tie_word_embeddings())?;
        let weights = RandomWeights::for_config(config, &format!("selfcheck-llm-{name}"));
        let cpu = crate::model::build(config, &weights)?;
        let mut gpu = GpuQwen2::load(&WeightSource::Host(&weights), dev, &p, "model.language_model")?;
        gpu.set_decode_gemv(gemv);
        let max_context = 512;
        let blocks_per_seq = max_context / BLOCK_SIZE;
        let mut kv = GpuKvCache::new(dev, &p, prompts.len() * blocks_per_seq + 7)?;
        let mut ws = Workspace::new(dev, &p, 256, 8, max_context)?;
        // Non-contiguous tables: sequence i takes every n-th block, offset, in reverse.
        let n = prompts.len();
        let tables: Vec<Vec<u32>> =
            (0..n).map(|i| (0..blocks_per_seq).rev().map(|j| (7 + j * n + i) as u32).collect()).collect();
        let prompts: Vec<Vec<u32>> =
            prompts.iter().map(|&len| (0..len).map(|_| 100 + rng.below(150_000) as u32).collect()).collect();
        let mut rows = Vec::new();
        let mut tally_prefill = Tally::new();
        let mut tally_eager = Tally::new();
        let mut tally_graph = Tally::new();
        let mut caches: Vec<_> = prompts.iter().map(|_| cpu.new_cache()).collect();
        let mut cpu_logits = Vec::new();
        for (i, pr) in prompts.iter().enumerate() {
            cpu_logits.push(cpu.forward(pr, None, &mut caches[i], false, None)?.to_f32_vec());
        }
        // GPU prefill in two chunks per sequence (the second continues a cached prefix), all sequences in one
        // step per chunk.
        let cut: Vec<usize> = prompts.iter().map(|p| p.len() / 2).collect();
        let first: Vec<SeqInput> =
            (0..n).map(|i| SeqInput { tokens: &prompts[i][..cut[i]], start: 0, blocks: &tables[i] }).collect();
        gpu.prefill(dev, &mut kv, &mut ws, &first, None)?;
        let second: Vec<SeqInput> =
            (0..n).map(|i| SeqInput { tokens: &prompts[i][cut[i]..], start: cut[i], blocks: &tables[i] }).collect();
        gpu.prefill(dev, &mut kv, &mut ws, &second, None)?;
        let g = gpu.last_logits(dev, &ws, n)?;
        let v = p.vocab;
        for i in 0..n {
            tally_prefill.add(&g[i * v..(i + 1) * v], &cpu_logits[i]);
        }
        // Decode: teacher-forced with the CPU's greedy tokens; eager and graph replays alternate per step, so
        // both run on the same cache contents.
        let mut graphs = DecodeGraphs::default();
        let mut lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        for step in 0..decode_steps {
            let next: Vec<u32> = cpu_logits.iter().map(|l| argmax(l) as u32).collect();
            let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let seqs: Vec<SeqInput> =
                (0..n).map(|i| SeqInput { tokens: &toks[i], start: lens[i], blocks: &tables[i] }).collect();
            let use_graph = step % 2 == 1;
            gpu.decode(dev, &mut kv, &mut ws, &seqs, if use_graph { Some(&mut graphs) } else { None })?;
            let g = gpu.last_logits(dev, &ws, n)?;
            for i in 0..n {
                cpu_logits[i] = cpu.forward(&toks[i], None, &mut caches[i], false, None)?.to_f32_vec();
                let t = if use_graph { &mut tally_graph } else { &mut tally_eager };
                t.add(&g[i * v..(i + 1) * v], &cpu_logits[i]);
                lens[i] += 1;
            }
        }
        let shape = format!(
            "{} seqs (prompts {:?}), {} layers, {}/{} heads d{}",
            n,
            prompts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            p.layers,
            p.heads,
            p.kv_heads,
            p.head_dim
        );
        rows.push(tally_prefill.row(&format!("{op}: chunked prefill logits"), &shape, 3e-2));
        rows.push(tally_eager.row(&format!("{op}: decode logits (eager)"), &shape, 3e-2));
        rows.push(tally_graph.row(&format!("{op}: decode logits (CUDA graph)"), &shape, 3e-2));
        if graphs.captured() == 0 {
            rows.push(Row {
                op: format!("{op}: graphs captured"),
                shape,
                max_abs: 0.0,
                max_rel: 0.0,
                atol: 0.0,
                rtol: 0.0,
                pass: false,
                note: "no decode graph was captured".into(),
            });
        }
        Ok(rows)
    };
    match run() {
        Ok(rows) => report.rows.extend(rows),
        Err(e) => report.error(&op, "-", e),
    }
}

pub fn run(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    let cases: Vec<(&str, Result<ModelConfig>, Vec<usize>)> = vec![
        ("d64 GQA 4/2", tiny_config(256, 4, 2, 2), vec![37]),
        ("d64 GQA 4/2 batch", tiny_config(256, 4, 2, 2), vec![37, 5, 130]),
        ("d128 GQA 4/1 batch", tiny_config(512, 4, 1, 2), vec![200, 17]),
    ];
    for (name, config, prompts) in cases {
        match config {
            Ok(c) => {
                case(dev, report, rng, name, &c, &prompts, false);
                // The decode GEMV experiment (kernels/gemv.cu) in the same model, eager and from graphs.
                if prompts.len() > 1 {
                    case(dev, report, rng, name, &c, &prompts, true);
                }
            }
            Err(e) => report.error(name, "-", e),
        }
    }
}
