//! Whole-model checks: the vision tower + projector on the GPU against the CPU model on the same bf16
//! weights and the same bf16-rounded pixels. A tiny model of each published variant (LayerNorm + q/k/v bias;
//! RMSNorm + qk-norm, no bias) and the real InternViT-300M shape.
//!
//! bf16 activations drift from the f32 CPU reference layer by layer (each op rounds to 8 bits of mantissa),
//! so these rows are judged by the relative L2 error of the whole output, with an element tolerance that
//! only catches gross errors (unwritten rows, a wrong tile, NaN).

use half::bf16;

use super::super::{Report, Rng};
use crate::backend::cuda::{buffer, CudaDevice};
use crate::config::ModelConfig;
use crate::model::gpu::vision::{GpuVision, VisionWorkspace};
use crate::model::gpu::WeightSource;
use crate::model::projector::Projector;
use crate::model::random::{published_config_json, RandomWeights};
use crate::model::vision::{VisionParams, VisionTower};
use crate::tensor::Tensor;

/// A config with the published geometry of `size` but the vision tower shrunk to `layers` layers of width
/// `hidden` (head dim `hidden / heads`) and the text width `text_hidden`.
fn shrunk(size: &str, layers: usize, hidden: usize, heads: usize, text_hidden: usize) -> crate::Result<ModelConfig> {
    let mut v: serde_json::Value = serde_json::from_str(&published_config_json(size)?).expect("valid json");
    let vc = &mut v["vision_config"];
    vc["num_hidden_layers"] = layers.into();
    vc["hidden_size"] = hidden.into();
    vc["num_attention_heads"] = heads.into();
    vc["intermediate_size"] = (4 * hidden).into();
    let tc = &mut v["text_config"];
    tc["hidden_size"] = text_hidden.into();
    tc["num_hidden_layers"] = 1.into();
    tc["num_attention_heads"] = (text_hidden / 64).into();
    tc["num_key_value_heads"] = 1.into();
    tc["intermediate_size"] = (2 * text_hidden).into();
    ModelConfig::from_json_str("selfcheck", &v.to_string())
}

/// Relative L2 error `||got - want|| / ||want||`.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += ((g - w) as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// Root mean square of `x` (the scale the model checks measure errors against).
pub fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len().max(1) as f64).sqrt()
}

/// Compares one model output: element rows with a loose tolerance scaled to the output's RMS, then the
/// relative L2 error against `max_l2`.
fn compare_output(report: &mut Report, op: &str, shape: &str, got: &[f32], want: &[f32], max_l2: f64) {
    let scale = rms(want);
    report.compare(op, shape, got, want, 0.25 * scale, 0.25);
    let e = rel_l2(got, want);
    let pass = e.is_finite() && e <= max_l2;
    report.rows.push(super::super::Row {
        op: format!("{op} (rel L2)"),
        shape: shape.to_string(),
        max_abs: e,
        max_rel: e,
        atol: max_l2,
        rtol: 0.0,
        pass,
        note: if pass { String::new() } else { format!("relative L2 error {e:.3e} > {max_l2:.0e}") },
    });
}

fn vision_case(dev: &CudaDevice, report: &mut Report, rng: &mut Rng, name: &str, config: &ModelConfig, tiles: usize) {
    let op = format!("vision+projector {name}");
    let Some(ivl) = config.internvl() else {
        report.error(&op, "-", "config has no vision tower");
        return;
    };
    // (shape, gpu vision_out, cpu vision_out, gpu features, cpu features, eager features on the graph's
    // workspace, graph-replayed features)
    type Outputs = (String, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
    let mut run = || -> crate::Result<Outputs> {
        let vp = VisionParams::from_config(&ivl.vision_config)?;
        let text_hidden = config.text().hidden_size;
        let weights = RandomWeights::for_config(config, &format!("selfcheck-{name}"));
        let s = vp.image_size;
        let pixels: Vec<f32> = (0..tiles * 3 * s * s).map(|_| bf16::from_f32(rng.sym(2.0)).to_f32()).collect();
        let gpu = GpuVision::load(&WeightSource::Host(&weights), dev, &vp, text_hidden)?;
        let out = gpu.forward_host(dev, &pixels, tiles)?;
        let g_vis = super::super::widen(&buffer::download(dev, &out.vision_out)?);
        let g_feat = super::super::widen(&buffer::download(dev, &out.features)?);
        // The same forward on a second workspace, eager, then captured into a CUDA graph and replayed twice:
        // the replay must give the eager features on that workspace exactly (same buffers, same GEMM plans).
        let mut ws = VisionWorkspace::new(dev, &vp, text_hidden, tiles)?;
        let host: Vec<bf16> = pixels.iter().map(|&v| bf16::from_f32(v)).collect();
        crate::backend::cuda::guarded("upload pixels", || dev.stream.memcpy_htod(&host, &mut ws.pixels))?;
        gpu.forward_ws(dev, &mut ws, false)?;
        let eager_ws = super::super::widen(&buffer::download(dev, &ws.features)?);
        let poison = vec![buffer::POISON_BF16; ws.features.len()];
        crate::backend::cuda::guarded("poison features", || dev.stream.memcpy_htod(&poison, &mut ws.features))?;
        gpu.forward_ws(dev, &mut ws, true)?;
        gpu.forward_ws(dev, &mut ws, true)?;
        let replay = super::super::widen(&buffer::download(dev, &ws.features)?);
        let tower = VisionTower::load(&weights, &vp)?;
        let projector = Projector::load(&weights, vp.hidden, text_hidden)?;
        let px = Tensor::from_f32([tiles, 3, s, s], pixels)?;
        let vision_out = tower.forward(&px)?;
        let (_, features) = projector.forward(&vision_out)?;
        let shape = format!("{tiles} tiles, h {} x{} layers, D {text_hidden}", vp.hidden, vp.layers);
        Ok((shape, g_vis, vision_out.to_f32_vec(), g_feat, features.to_f32_vec(), eager_ws, replay))
    };
    match run() {
        Ok((shape, g_vis, c_vis, g_feat, c_feat, eager_ws, replay)) => {
            compare_output(report, &format!("{op}: vision_out"), &shape, &g_vis, &c_vis, 3e-2);
            compare_output(report, &format!("{op}: features"), &shape, &g_feat, &c_feat, 5e-2);
            // Two workspaces may get GEMM plans of different alignment classes: within rounding, and the
            // row's max error says whether they were bit-equal.
            compare_output(report, &format!("{op}: eager, second workspace"), &shape, &eager_ws, &g_feat, 5e-2);
            report.compare(&format!("{op}: CUDA graph replay == eager"), &shape, &replay, &eager_ws, 0.0, 0.0);
        }
        Err(e) => report.error(&op, "-", e),
    }
}

pub fn run(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    let cases: Vec<(&str, crate::Result<ModelConfig>, usize)> = vec![
        ("tiny-300m-like (LN, bias, d64)", shrunk("1b", 2, 128, 2, 128), 2),
        ("tiny-6b-like (RMS, qk-norm, d128)", shrunk("38b", 2, 256, 2, 128), 3),
        (
            "InternViT-300M + 1B projector",
            published_config_json("1b").and_then(|j| ModelConfig::from_json_str("1b", &j)),
            1,
        ),
    ];
    for (name, config, tiles) in cases {
        match config {
            Ok(c) => vision_case(dev, report, rng, name, &c, tiles),
            Err(e) => report.error(name, "-", e),
        }
    }
}
