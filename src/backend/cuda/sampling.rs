//! Launchers for `kernels/sampling.cu` (`argmax_rows`, `sample_rows`, logits in f32 or bf16) and the CPU twin
//! of `sample_rows`, which reproduces every id the kernel draws.
//!
//! The rules are the CPU [`Sampler`](crate::backend::Sampler)'s where they overlap: temperature divides the
//! logits; top-k keeps every logit >= the k-th largest (ties kept); top-p drops tokens in ascending order while
//! the dropped mass stays <= `1 - top_p`, always keeping the most likely; the draw walks ids in increasing
//! order. What differs, on purpose: probabilities are fixed-point (`trunc(exp(x - max) * 2^40)` with an exp
//! both sides compute from the same f32 fma sequence), so sums are exact integers and this twin matches the
//! GPU id for id; ties at the top-p boundary are broken by lower index (the Sampler's sort leaves them
//! unspecified); tokens below `2^-40` of the most likely one are never drawn; the uniform number is SplitMix64
//! output number `step + 1` of the stream seeded with `seed` (the Sampler draws from ChaCha8, so the two pick
//! different ids for the same seed); a non-finite maximum after the temperature returns its index instead of
//! an error. Per-row parameters and the step counter live in device arrays so a CUDA graph can replay a step.

use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{guarded, CudaDevice, Error, Result};

const MODULE: &str = "sampling";
/// Must equal `kThreads` in kernels/sampling.cu (`__launch_bounds__`).
const THREADS: u32 = 1024;
/// The largest vocabulary `sample_rows` accepts: `vocab * 2^40` must fit u64.
pub const MAX_SAMPLE_VOCAB: usize = 1 << 23;
/// Fixed-point weight of the most likely token.
const WEIGHT_MAX: u64 = 1 << 40;

/// A logits element type the kernels read: f32 (an lm_head GEMM with f32 output) or bf16.
pub trait LogitElem: DeviceRepr + Copy {
    const ARGMAX: &'static str;
    const SAMPLE: &'static str;
    fn to_f32(self) -> f32;
}

impl LogitElem for f32 {
    const ARGMAX: &'static str = "argmax_rows_f32";
    const SAMPLE: &'static str = "sample_rows_f32";
    fn to_f32(self) -> f32 {
        self
    }
}

impl LogitElem for bf16 {
    const ARGMAX: &'static str = "argmax_rows_bf16";
    const SAMPLE: &'static str = "sample_rows_bf16";
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Checks `[rows, vocab]` and the buffer lengths; one block of 1024 threads per row.
pub(crate) fn plan(
    op: &'static str,
    rows: usize,
    vocab: usize,
    max_vocab: usize,
    lens: &[(&str, usize, usize)],
) -> Result<LaunchConfig> {
    let invalid = |msg: String| Error::Invalid { op, msg };
    if vocab == 0 {
        return Err(invalid("vocab must be > 0".into()));
    }
    if vocab > max_vocab {
        return Err(invalid(format!("vocab {vocab} exceeds this kernel's limit {max_vocab}")));
    }
    let grid = u32::try_from(rows).ok().filter(|&r| r <= i32::MAX as u32);
    let Some(grid) = grid else {
        return Err(invalid(format!("{rows} rows exceed the grid limit 2^31-1")));
    };
    for &(name, got, want) in lens {
        if got != want {
            return Err(invalid(format!("{name} holds {got} elements, expected {want} for {rows} rows of {vocab}")));
        }
    }
    Ok(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

fn numel(op: &'static str, rows: usize, vocab: usize) -> Result<usize> {
    rows.checked_mul(vocab).ok_or(Error::Invalid { op, msg: format!("[{rows}, {vocab}] overflows") })
}

/// `out[r]` = index of the largest `logits[r, :]`, the first on ties; NaN counts as largest (torch.argmax).
pub fn argmax_rows<T: LogitElem>(
    dev: &CudaDevice,
    logits: &CudaView<'_, T>,
    rows: usize,
    vocab: usize,
    out: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    const OP: &str = "argmax_rows";
    let n = numel(OP, rows, vocab)?;
    let cfg = plan(OP, rows, vocab, i32::MAX as usize, &[("logits", logits.len(), n), ("out", out.len(), rows)])?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, T::ARGMAX)?;
    let vocab_i32 = vocab as i32;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(logits).arg(&vocab_i32).arg(&mut *out);
    // SAFETY: the arguments match argmax_rows_{f32,bf16}(const T*, int, u32*); `plan` checked logits holds
    // rows * vocab elements and out rows, vocab fits i32, the grid is one 1024-thread block per row (the
    // kernel's launch bounds); out is a &mut view, so it does not alias logits.
    guarded("launch argmax_rows", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

/// Per-row sampling parameters on the device, `[rows]` each. `step` is read (and advanced by one after the
/// draw when `advance_step`), so a replayed CUDA graph draws a fresh number every step.
pub struct SampleParams<'a, 'b> {
    /// <= 0 (or NaN): greedy.
    pub temperature: &'b CudaView<'a, f32>,
    /// <= 0 or >= vocab: no top-k.
    pub top_k: &'b CudaView<'a, i32>,
    /// >= 1 (or NaN): no top-p.
    pub top_p: &'b CudaView<'a, f32>,
    pub seed: &'b CudaView<'a, u64>,
    pub step: &'b mut CudaViewMut<'a, u64>,
    pub advance_step: bool,
}

/// `out[r]` = one draw from row `r` of `logits [rows, vocab]` under row `r`'s parameters (module docs).
pub fn sample_rows<T: LogitElem>(
    dev: &CudaDevice,
    logits: &CudaView<'_, T>,
    rows: usize,
    vocab: usize,
    params: &mut SampleParams<'_, '_>,
    out: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    const OP: &str = "sample_rows";
    let n = numel(OP, rows, vocab)?;
    let lens = [
        ("logits", logits.len(), n),
        ("temperature", params.temperature.len(), rows),
        ("top_k", params.top_k.len(), rows),
        ("top_p", params.top_p.len(), rows),
        ("seed", params.seed.len(), rows),
        ("step", params.step.len(), rows),
        ("out", out.len(), rows),
    ];
    let cfg = plan(OP, rows, vocab, MAX_SAMPLE_VOCAB, &lens)?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, T::SAMPLE)?;
    let vocab_i32 = vocab as i32;
    let advance = i32::from(params.advance_step);
    let mut launch = dev.stream.launch_builder(&f);
    launch
        .arg(logits)
        .arg(&vocab_i32)
        .arg(params.temperature)
        .arg(params.top_k)
        .arg(params.top_p)
        .arg(params.seed)
        .arg(&mut *params.step)
        .arg(&advance)
        .arg(&mut *out);
    // SAFETY: the arguments match sample_rows_{f32,bf16}(const T*, int, const float*, const int*, const float*,
    // const u64*, u64*, int, u32*); `plan` checked logits holds rows * vocab elements, every parameter array
    // and out hold rows, vocab <= 2^23 (the kernel's fixed-point limit), the grid is one 1024-thread block per
    // row; step and out are &mut views, so neither aliases an input or the other.
    guarded("launch sample_rows", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

// ---- the CPU twin -------------------------------------------------------------------------------------------

/// One row's parameters, as the device arrays hold them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub seed: u64,
    pub step: u64,
}

impl RowSampling {
    pub fn greedy() -> RowSampling {
        RowSampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 }
    }
}

/// The kernel's order-preserving key: larger float, larger key; -0 as +0; NaN largest.
pub fn order_key(v: f32) -> u32 {
    if v.is_nan() {
        return u32::MAX;
    }
    let b = if v.to_bits() == 0x8000_0000 { 0 } else { v.to_bits() };
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

fn key_to_float(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 { k & 0x7fff_ffff } else { !k })
}

/// `exp(y)` for `y` in [-32, 0], the kernel's exact sequence of round-to-nearest fma and multiply.
fn exp_det(y: f32) -> f32 {
    let n = y.mul_add(f32::from_bits(0x3fb8_aa3b), 0.5).floor();
    let r = (-n).mul_add(f32::from_bits(0x3f31_7200), y);
    let r = (-n).mul_add(f32::from_bits(0x35bf_be8e), r);
    let mut p = f32::from_bits(0x3950_0d01);
    for c in [0x3ab6_0b61u32, 0x3c08_8889, 0x3d2a_aaab, 0x3e2a_aaab] {
        p = p.mul_add(r, f32::from_bits(c));
    }
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Fixed-point probability of `x` relative to the row maximum `m` (the maximum's weight is 2^40).
fn weight(x: f32, m: f32) -> u64 {
    let y = x - m;
    if y.is_nan() || y < -32.0 {
        return 0;
    }
    ((exp_det(y) * WEIGHT_MAX as f32) as u64).min(WEIGHT_MAX)
}

/// SplitMix64 output number `step + 1` of the stream seeded with `seed` (the same value as the `step + 1`-th
/// `next_u64` of `selfcheck::Rng::new(seed)`).
pub fn splitmix64(seed: u64, step: u64) -> u64 {
    let mut z = seed.wrapping_add(step.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What the twin decided for a row, for tests that look inside.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinDraw {
    pub id: u32,
    /// Kept tokens and their fixed-point weights, in id order (empty on the greedy path).
    pub kept: Vec<(u32, u64)>,
}

/// The CPU twin of `argmax_rows`: first index of the largest value, NaN largest, -0 equal to +0.
pub fn argmax_twin(logits: &[f32]) -> u32 {
    let mut best = (0u32, 0usize);
    for (i, &v) in logits.iter().enumerate() {
        let k = order_key(v);
        if i == 0 || k > best.0 {
            best = (k, i);
        }
    }
    best.1 as u32
}

/// The CPU twin of one row of `sample_rows`: a sort-based walk of the kernel's rules, integer-exact.
pub fn sample_row_twin(logits: &[f32], p: &RowSampling) -> TwinDraw {
    let greedy = p.temperature.is_nan() || p.temperature <= 0.0;
    let divide = !greedy && p.temperature != 1.0;
    let x: Vec<f32> = logits.iter().map(|&l| if divide { l / p.temperature } else { l }).collect();
    let max_index = argmax_twin(&x);
    let m = key_to_float(x.get(max_index as usize).map_or(0, |&v| order_key(v)));
    if greedy || !m.is_finite() {
        return TwinDraw { id: max_index, kept: Vec::new() };
    }
    let n = x.len();
    let keys: Vec<u32> = x.iter().map(|&v| order_key(v)).collect();
    let k_key = if p.top_k > 0 && (p.top_k as usize) < n {
        let mut sorted = keys.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        sorted[p.top_k as usize - 1]
    } else {
        0
    };
    let w: Vec<u64> = (0..n).map(|i| if keys[i] >= k_key { weight(x[i], m) } else { 0 }).collect();
    let mut kept_mask: Vec<bool> = w.iter().map(|&v| v > 0).collect();
    if p.top_p < 1.0 {
        let total: u64 = w.iter().sum();
        let drop = ((1.0 - p.top_p as f64) * total as f64) as u64;
        let need = if drop < total { total - drop } else { 1 };
        let mut order: Vec<usize> = (0..n).filter(|&i| w[i] > 0).collect();
        order.sort_unstable_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
        kept_mask = vec![false; n];
        let mut acc = 0u64;
        for &i in &order {
            kept_mask[i] = true;
            acc += w[i];
            if acc >= need {
                break;
            }
        }
    }
    let kept: Vec<(u32, u64)> = (0..n).filter(|&i| kept_mask[i]).map(|i| (i as u32, w[i])).collect();
    let total: u64 = kept.iter().map(|k| k.1).sum();
    let target = ((splitmix64(p.seed, p.step) as u128 * total as u128) >> 64) as u64 + 1;
    let mut acc = 0u64;
    let mut id = max_index;
    for &(i, wi) in &kept {
        acc += wi;
        if acc >= target {
            id = i;
            break;
        }
    }
    TwinDraw { id, kept }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Sampler, SamplingParams};

    /// Seeded test rows without pulling in the selfcheck module.
    fn row(seed: u64, n: usize, amp: f32) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let z = splitmix64(seed, i);
                ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    #[test]
    fn plan_checks_shapes() {
        let cfg = plan("t", 64, 151_936, MAX_SAMPLE_VOCAB, &[("out", 64, 64)]).expect("valid");
        assert_eq!((cfg.grid_dim, cfg.block_dim), ((64, 1, 1), (THREADS, 1, 1)));
        assert!(plan("t", 1, 0, MAX_SAMPLE_VOCAB, &[]).is_err());
        assert!(plan("t", 1, MAX_SAMPLE_VOCAB + 1, MAX_SAMPLE_VOCAB, &[]).is_err());
        assert!(plan("t", usize::MAX, 8, MAX_SAMPLE_VOCAB, &[]).is_err());
        let err = plan("sample_rows", 2, 8, MAX_SAMPLE_VOCAB, &[("top_p", 1, 2)]).unwrap_err().to_string();
        assert!(err.contains("top_p holds 1 elements, expected 2"), "{err}");
        assert!(numel("t", usize::MAX, 2).is_err());
    }

    #[test]
    fn keys_order_floats() {
        let vals = [f32::NEG_INFINITY, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, f32::INFINITY, f32::NAN];
        for w in vals.windows(2) {
            assert!(order_key(w[0]) <= order_key(w[1]), "{w:?}");
        }
        assert_eq!(order_key(-0.0), order_key(0.0));
        assert_eq!(order_key(-f32::NAN), u32::MAX);
        for v in [f32::NEG_INFINITY, -3.5, 0.0, 7.25, f32::INFINITY] {
            assert_eq!(key_to_float(order_key(v)).to_bits(), v.to_bits());
        }
    }

    #[test]
    fn argmax_twin_ties_nan_and_signed_zero() {
        assert_eq!(argmax_twin(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax_twin(&[-0.0, 0.0]), 0);
        assert_eq!(argmax_twin(&[1.0, f32::NAN, 5.0, f32::NAN]), 1);
        assert_eq!(argmax_twin(&[f32::NEG_INFINITY; 3]), 0);
        let r = row(3, 1000, 4.0);
        assert_eq!(argmax_twin(&r) as usize, crate::backend::argmax(&r).expect("no NaN"));
    }

    #[test]
    fn exp_det_is_accurate() {
        let mut worst = 0f64;
        let mut y = -32.0f32;
        while y <= 0.0 {
            let got = exp_det(y) as f64;
            let want = (y as f64).exp();
            worst = worst.max((got - want).abs() / want);
            y += 0.000_731;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp_det(0.0), 1.0);
        assert_eq!(weight(1.5, 1.5), WEIGHT_MAX);
        assert_eq!(weight(f32::NEG_INFINITY, 0.0), 0);
        assert_eq!(weight(-40.0, 0.0), 0);
        assert!(weight(-1e-7, 0.0) <= WEIGHT_MAX);
    }

    #[test]
    fn splitmix_matches_the_selfcheck_stream() {
        let mut rng = crate::selfcheck::Rng::new(99);
        for step in 0..5 {
            assert_eq!(splitmix64(99, step), rng.next_u64());
        }
    }

    /// Where the twin and the CPU Sampler overlap (continuous logits, so no ties and no probability within
    /// rounding of the top-p boundary), the twin keeps exactly the tokens the Sampler leaves finite.
    #[test]
    fn kept_sets_equal_the_cpu_samplers() {
        let cases = [(1.0, 0, 0.9), (0.7, 50, 1.0), (0.7, 50, 0.8), (1.3, 0, 0.5), (0.5, 7, 0.95), (2.0, 1000, 0.99)];
        for (c, &(temperature, top_k, top_p)) in cases.iter().enumerate() {
            let logits = row(c as u64, 5000, 5.0);
            let params = SamplingParams { do_sample: true, temperature, top_k, top_p, ..SamplingParams::default() };
            let mut s = Sampler::new(params).expect("valid params");
            let processed = s.processed(&logits, &[]).expect("processed").to_vec();
            let want: Vec<u32> = (0..logits.len() as u32).filter(|&i| processed[i as usize].is_finite()).collect();
            let rs = RowSampling { temperature, top_k: top_k as i32, top_p, seed: 1, step: 0 };
            let got: Vec<u32> = sample_row_twin(&logits, &rs).kept.iter().map(|k| k.0).collect();
            assert_eq!(got, want, "case {c}: T {temperature} top_k {top_k} top_p {top_p}");
        }
    }

    #[test]
    fn greedy_parameters_give_the_argmax() {
        let logits = row(11, 3000, 6.0);
        let best = argmax_twin(&logits);
        for p in [
            RowSampling::greedy(),
            RowSampling { temperature: -1.0, ..RowSampling::greedy() },
            RowSampling { temperature: f32::NAN, ..RowSampling::greedy() },
            RowSampling { temperature: 0.8, top_k: 1, top_p: 1.0, seed: 5, step: 3 },
            RowSampling { temperature: 0.8, top_k: 0, top_p: 0.0, seed: 5, step: 4 },
        ] {
            assert_eq!(sample_row_twin(&logits, &p).id, best, "{p:?}");
        }
        // A non-finite maximum short-circuits to its index.
        let mut inf = logits.clone();
        inf[17] = f32::INFINITY;
        let p = RowSampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 1, step: 0 };
        assert_eq!(sample_row_twin(&inf, &p).id, 17);
    }

    #[test]
    fn top_p_ties_keep_the_lowest_indices() {
        // Four equal logits of probability 0.229 each: top_p 0.4 needs two of them, the two lowest ids; 0.5
        // needs three.
        let logits = [0.0f32, 1.0, 1.0, -5.0, 1.0, 1.0];
        let p = RowSampling { temperature: 1.0, top_k: 0, top_p: 0.4, seed: 0, step: 0 };
        let kept: Vec<u32> = sample_row_twin(&logits, &p).kept.iter().map(|k| k.0).collect();
        assert_eq!(kept, [1, 2]);
        let p = RowSampling { top_p: 0.5, ..p };
        let kept: Vec<u32> = sample_row_twin(&logits, &p).kept.iter().map(|k| k.0).collect();
        assert_eq!(kept, [1, 2, 4]);
        // top-k keeps every tie of the k-th value.
        let p = RowSampling { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 0, step: 0 };
        let kept: Vec<u32> = sample_row_twin(&logits, &p).kept.iter().map(|k| k.0).collect();
        assert_eq!(kept, [1, 2, 4, 5]);
    }

    /// Draw frequencies follow the softmax: 200k steps over 4 tokens, each within 1% (absolute) of its
    /// probability.
    #[test]
    fn draws_follow_the_distribution() {
        let logits = [0.5f32, 1.5, -0.25, 1.0];
        let mx = 1.5f64;
        let e: Vec<f64> = logits.iter().map(|&l| (l as f64 - mx).exp()).collect();
        let total: f64 = e.iter().sum();
        let mut counts = [0usize; 4];
        let steps = 200_000;
        for step in 0..steps {
            let p = RowSampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 42, step };
            counts[sample_row_twin(&logits, &p).id as usize] += 1;
        }
        for i in 0..4 {
            let f = counts[i] as f64 / steps as f64;
            assert!((f - e[i] / total).abs() < 0.01, "token {i}: {f} vs {}", e[i] / total);
        }
    }
}
