//! Every CPU backend op against a deliberately naive reference written here: f64 loops that follow the
//! formula of MODEL_SPEC §3 literally, on seeded random inputs. Shapes include 1, odd sizes and the real
//! model sizes (InternViT-300M, Qwen2.5-0.5B, the 38B's 40/8 GQA); a large-magnitude case per op family.
//!
//! Tolerances are stated per op from the f32 rounding the kernel performs (`EPS` = f32 epsilon) times the
//! magnitude of the terms involved; a failure prints max abs/rel error, the first offending index, the
//! shape and the seed.

use facellm::backend::{
    self,
    cpu::sampling::{apply_repetition_penalty, Sampler, SamplingParams},
};
use facellm::tensor::Tensor;
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const EPS: f64 = f32::EPSILON as f64;

struct Gen(ChaCha8Rng);

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen(ChaCha8Rng::seed_from_u64(seed))
    }
    fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.0.random_range(lo..hi)).collect()
    }
    /// Standard normal values (Box-Muller) times `scale`.
    fn normal(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = self.0.random_range(1e-12..1.0);
                let u2: f64 = self.0.random();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * scale
            })
            .collect()
    }
}

/// Asserts `|got - want| <= tol[i]` everywhere, or panics with a report that debugs itself.
fn check(what: &str, seed: u64, shape: &[usize], got: &[f32], want: &[f64], tol: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs reference {} (shape {shape:?})", got.len(), want.len());
    let (mut max_abs, mut max_rel, mut worst_ratio) = (0f64, 0f64, 0f64);
    let mut first_bad = None;
    for i in 0..got.len() {
        let (g, w) = (got[i] as f64, want[i]);
        let err = if g == w { 0.0 } else { (g - w).abs() };
        let err = if err.is_nan() { f64::INFINITY } else { err };
        max_abs = max_abs.max(err);
        if w != 0.0 {
            max_rel = max_rel.max(err / w.abs());
        }
        worst_ratio = worst_ratio.max(err / tol[i].max(f64::MIN_POSITIVE));
        if err > tol[i] && first_bad.is_none() {
            first_bad = Some(i);
        }
    }
    if let Some(i) = first_bad {
        panic!(
            "{what}: shape {shape:?}, seed {seed}: max abs err {max_abs:.3e}, max rel err {max_rel:.3e}, \
             worst err/tol {worst_ratio:.2}; first mismatch at flat index {i}: got {} want {} (tol {:.3e})",
            got[i], want[i], tol[i]
        );
    }
}

/// DESIGN's rule: a kernel's error may be at most about twice that of a naive implementation in the same
/// precision. Errors are measured against the f64 reference, each divided by `norm[i]` (the magnitude of
/// the terms that produced element i), and the largest of the kernel's must not exceed twice the naive
/// f32 loop's (plus one f32 epsilon, for outputs the naive loop happens to get exact).
fn check_vs_naive(what: &str, seed: u64, shape: &[usize], got: &[f32], naive: &[f32], want: &[f64], norm: &[f64]) {
    let worst = |v: &[f32]| {
        (0..v.len())
            .map(|i| ((v[i] as f64 - want[i]).abs() / norm[i].max(f64::MIN_POSITIVE), i))
            .fold((0f64, 0usize), |a, b| if b.0 > a.0 || b.0.is_nan() { b } else { a })
    };
    let ((kernel, ki), (naive_err, _)) = (worst(got), worst(naive));
    assert!(
        kernel <= 2.0 * naive_err + EPS,
        "{what}: shape {shape:?}, seed {seed}: normalised max error {kernel:.3e} at flat index {ki} (got {} want {}) \
         exceeds twice the naive f32 loop's {naive_err:.3e}",
        got[ki],
        want[ki]
    );
}

fn f32t(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::from_f32(shape.to_vec(), v).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Dt {
    F32,
    BF16,
    F16,
}

/// A tensor of `dt` holding `v` rounded to it, and the rounded values as f32 (what the kernel sees).
fn typed(shape: &[usize], v: &[f32], dt: Dt) -> (Tensor, Vec<f32>) {
    match dt {
        Dt::F32 => (f32t(shape, v.to_vec()), v.to_vec()),
        Dt::BF16 => {
            let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            let r = b.iter().map(|x| x.to_f32()).collect();
            (Tensor::from_bf16(shape.to_vec(), b).unwrap(), r)
        }
        Dt::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let r: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
            let bytes: Vec<u8> = h.iter().flat_map(|x| x.to_le_bytes()).collect();
            let src: std::sync::Arc<dyn facellm::tensor::ByteSource> = std::sync::Arc::new(Bytes(bytes));
            (Tensor::mapped(shape.to_vec(), src, 0, facellm::tensor::DType::F16).unwrap(), r)
        }
    }
}

struct Bytes(Vec<u8>);
impl facellm::tensor::ByteSource for Bytes {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

// ---------------------------------------------------------------------------------------------------------
// linear

fn linear_case(seed: u64, m: usize, k: usize, n: usize, dt: Dt, with_bias: bool, x_scale: f32) {
    let mut g = Gen::new(seed);
    let x = g.normal(m * k, x_scale);
    let w = g.normal(n * k, 0.05);
    let b = g.normal(n, 0.5);
    let (wt, wr) = typed(&[n, k], &w, dt);
    let (bt, br) = typed(&[n], &b, Dt::BF16);
    let xt = f32t(&[m, k], x.clone());
    let y = backend::linear(&xt, &wt, with_bias.then_some(&bt)).unwrap();
    assert_eq!(y.shape(), [m, n]);
    let mut want = vec![0f64; m * n];
    let mut tol = vec![0f64; m * n];
    let mut naive = vec![0f32; m * n];
    let mut norm = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut mag, mut s32) = (0f64, 0f64, 0f32);
            for t in 0..k {
                let p = x[i * k + t] as f64 * wr[j * k + t] as f64;
                s += p;
                mag += p.abs();
                s32 += x[i * k + t] * wr[j * k + t];
            }
            let bias = if with_bias { br[j] as f64 } else { 0.0 };
            want[i * n + j] = s + bias;
            naive[i * n + j] = s32 + bias as f32;
            norm[i * n + j] = mag + bias.abs();
            // Blocked f32 sums: error grows like sqrt(k) roundings of the partial sums' magnitude.
            tol[i * n + j] = 4.0 * EPS * (k as f64).sqrt() * mag + 2.0 * EPS * bias.abs();
        }
    }
    let what = format!("linear m={m} k={k} n={n} {dt:?} bias={with_bias}");
    check(&what, seed, &[m, k, n], y.f32s().unwrap(), &want, &tol);
    check_vs_naive(&what, seed, &[m, k, n], y.f32s().unwrap(), &naive, &want, &norm);
}

#[test]
fn linear_decode_gemv_real_sizes() {
    for (i, dt) in [Dt::BF16, Dt::F32, Dt::F16].into_iter().enumerate() {
        linear_case(10 + i as u64, 1, 896, 896, dt, true, 1.0);
        linear_case(20 + i as u64, 1, 896, 4864, dt, false, 1.0);
        linear_case(30 + i as u64, 1, 4864, 896, dt, false, 1.0);
        linear_case(40 + i as u64, 1, 896, 128, dt, true, 1.0);
    }
}

#[test]
fn linear_odd_sizes_every_path() {
    let mut seed = 100;
    for &(m, k, n) in &[
        (1, 1, 1),
        (1, 19, 99),
        (2, 99, 19),
        (3, 19, 99),
        (4, 99, 37),
        (5, 19, 99),
        (19, 99, 19),
        (99, 19, 101),
        (7, 1, 3),
        (33, 64, 17),
    ] {
        for dt in [Dt::F32, Dt::BF16, Dt::F16] {
            for bias in [false, true] {
                linear_case(seed, m, k, n, dt, bias, 1.0);
                seed += 1;
            }
        }
    }
}

#[test]
fn linear_prefill_and_vision_sizes() {
    linear_case(200, 300, 896, 896, Dt::BF16, true, 1.0);
    linear_case(201, 64, 896, 4864, Dt::BF16, false, 1.0);
    linear_case(202, 37, 4864, 896, Dt::BF16, false, 1.0);
    linear_case(203, 256, 4096, 896, Dt::BF16, true, 1.0);
    linear_case(204, 1025, 1024, 64, Dt::F16, true, 1.0);
    linear_case(205, 130, 896, 128, Dt::F32, true, 1.0);
}

#[test]
fn linear_large_magnitude() {
    linear_case(300, 1, 896, 896, Dt::BF16, true, 1e4);
    linear_case(301, 20, 896, 300, Dt::BF16, true, 1e4);
    linear_case(302, 3, 4864, 77, Dt::F32, false, 3e3);
}

#[test]
fn linear_keeps_leading_dims_and_checks_shapes() {
    let x = f32t(&[2, 3, 5], vec![1.0; 30]);
    let w = f32t(&[4, 5], vec![0.5; 20]);
    let y = backend::linear(&x, &w, None).unwrap();
    assert_eq!(y.shape(), [2, 3, 4]);
    assert!(y.f32s().unwrap().iter().all(|&v| v == 2.5));
    let bad_w = f32t(&[4, 6], vec![0.0; 24]);
    let e = backend::linear(&x, &bad_w, None).unwrap_err().to_string();
    assert!(e.contains("linear") && e.contains("[2, 3, 5]") && e.contains("[4, 6]"), "{e}");
    let bad_b = f32t(&[5], vec![0.0; 5]);
    let e = backend::linear(&x, &w, Some(&bad_b)).unwrap_err().to_string();
    assert!(e.contains("linear") && e.contains("bias"), "{e}");
    let w_bf = Tensor::from_bf16([4, 5], vec![bf16::ONE; 20]).unwrap();
    let e = backend::linear(&w_bf, &w, None).unwrap_err().to_string();
    assert!(e.contains("linear") && e.contains("f32"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// norms

fn layer_norm_case(seed: u64, m: usize, n: usize, eps: f32, offset: f32, scale: f32, dt: Dt) {
    let mut g = Gen::new(seed);
    let x: Vec<f32> = g.normal(m * n, scale).into_iter().map(|v| v + offset).collect();
    let (wt, w) = typed(&[n], &g.normal(n, 1.0), dt);
    let (bt, b) = typed(&[n], &g.normal(n, 0.3), dt);
    let y = backend::layer_norm(&f32t(&[m, n], x.clone()), &wt, &bt, eps).unwrap();
    let mut want = vec![0f64; m * n];
    let mut tol = vec![0f64; m * n];
    for i in 0..m {
        let row = &x[i * n..(i + 1) * n];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for j in 0..n {
            let normed = (row[j] as f64 - mean) * rstd;
            want[i * n + j] = normed * w[j] as f64 + b[j] as f64;
            // Rounded: x - mean, rstd, two products, one sum.
            tol[i * n + j] = 3.0 * EPS * (normed * w[j] as f64).abs() + EPS * (b[j] as f64).abs() + 1e-30;
        }
    }
    check(
        &format!("layer_norm eps={eps} offset={offset} scale={scale}"),
        seed,
        &[m, n],
        y.f32s().unwrap(),
        &want,
        &tol,
    );
}

#[test]
fn layer_norm_sizes_and_magnitudes() {
    layer_norm_case(400, 1025, 1024, 1e-6, 0.0, 1.0, Dt::BF16);
    layer_norm_case(401, 256, 4096, 1e-5, 0.0, 3.0, Dt::BF16);
    layer_norm_case(402, 1, 1, 1e-6, 0.0, 1.0, Dt::F32);
    layer_norm_case(403, 19, 99, 1e-6, 0.0, 1.0, Dt::F16);
    layer_norm_case(404, 7, 1024, 1e-6, 1e3, 1.0, Dt::F32);
    layer_norm_case(405, 3, 896, 1e-6, -5e4, 20.0, Dt::BF16);
    layer_norm_case(406, 2, 64, 1e-6, 0.0, 1e-4, Dt::F32);
}

fn rms_reference(x: &[f32], w: &[f32], n: usize, eps: f32) -> (Vec<f64>, Vec<f64>) {
    let m = x.len() / n;
    let mut want = vec![0f64; m * n];
    let mut tol = vec![0f64; m * n];
    for i in 0..m {
        let row = &x[i * n..(i + 1) * n];
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..n {
            want[i * n + j] = row[j] as f64 * r * w[j] as f64;
            // Rounded: mean, + eps, sqrt, reciprocal, two products.
            tol[i * n + j] = 4.0 * EPS * want[i * n + j].abs() + 1e-30;
        }
    }
    (want, tol)
}

#[test]
fn rms_norm_sizes_and_magnitudes() {
    for &(seed, m, n, scale, dt) in &[
        (500, 1, 896, 1.0, Dt::BF16),
        (501, 300, 896, 1.0, Dt::BF16),
        (502, 19, 99, 1.0, Dt::F32),
        (503, 1025, 3200, 1.0, Dt::BF16),
        (504, 5, 5120, 1e4, Dt::F16),
        (505, 3, 64, 1e-3, Dt::F32),
    ] {
        let mut g = Gen::new(seed);
        let x = g.normal(m * n, scale);
        let (wt, w) = typed(&[n], &g.normal(n, 1.0), dt);
        let y = backend::rms_norm(&f32t(&[m, n], x.clone()), &wt, 1e-6).unwrap();
        let (want, tol) = rms_reference(&x, &w, n, 1e-6);
        check(&format!("rms_norm scale={scale} {dt:?}"), seed, &[m, n], y.f32s().unwrap(), &want, &tol);
    }
}

#[test]
fn add_rms_norm_updates_residual_then_normalises() {
    for &(seed, m, n) in &[(600, 1, 896), (601, 77, 896), (602, 3, 19)] {
        let mut g = Gen::new(seed);
        let r0 = g.normal(m * n, 2.0);
        let x = g.normal(m * n, 1.0);
        let (wt, w) = typed(&[n], &g.normal(n, 1.0), Dt::BF16);
        let mut res = f32t(&[m, n], r0.clone());
        let y = backend::add_rms_norm(&mut res, &f32t(&[m, n], x.clone()), &wt, 1e-6).unwrap();
        let summed: Vec<f32> = r0.iter().zip(&x).map(|(a, b)| a + b).collect();
        assert_eq!(res.f32s().unwrap(), &summed[..], "add_rms_norm residual, seed {seed}");
        let (want, tol) = rms_reference(&summed, &w, n, 1e-6);
        check("add_rms_norm", seed, &[m, n], y.f32s().unwrap(), &want, &tol);
    }
    let mut res = f32t(&[2, 4], vec![0.0; 8]);
    let e =
        backend::add_rms_norm(&mut res, &f32t(&[2, 5], vec![0.0; 10]), &f32t(&[5], vec![1.0; 5]), 1e-6).unwrap_err();
    assert!(e.to_string().contains("add_rms_norm"), "{e}");
}

#[test]
fn norm_shape_errors() {
    let x = f32t(&[2, 4], vec![0.0; 8]);
    let w3 = f32t(&[3], vec![1.0; 3]);
    let w4 = f32t(&[4], vec![1.0; 4]);
    let e = backend::layer_norm(&x, &w4, &w3, 1e-6).unwrap_err().to_string();
    assert!(e.contains("layer_norm") && e.contains("[3]") && e.contains("[2, 4]"), "{e}");
    let e = backend::rms_norm(&x, &w3, 1e-6).unwrap_err().to_string();
    assert!(e.contains("rms_norm") && e.contains("[3]"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// elementwise

#[test]
fn add_scaled_is_exact() {
    for &(seed, m, n) in &[(700, 1025, 1024), (701, 3, 19), (702, 1, 1)] {
        let mut g = Gen::new(seed);
        let r0 = g.normal(m * n, 10.0);
        let x = g.normal(m * n, 1.0);
        let (st, s) = typed(&[n], &g.normal(n, 0.1), Dt::BF16);
        let mut res = f32t(&[m, n], r0.clone());
        backend::add_scaled(&mut res, &f32t(&[m, n], x.clone()), Some(&st)).unwrap();
        let want: Vec<f32> = (0..m * n).map(|i| r0[i] + s[i % n] * x[i]).collect();
        assert_eq!(res.f32s().unwrap(), &want[..], "add_scaled with scale, seed {seed}");
        let mut res = f32t(&[m, n], r0.clone());
        backend::add_scaled(&mut res, &f32t(&[m, n], x.clone()), None).unwrap();
        let want: Vec<f32> = (0..m * n).map(|i| r0[i] + x[i]).collect();
        assert_eq!(res.f32s().unwrap(), &want[..], "add_scaled plain, seed {seed}");
    }
    let mut res = f32t(&[2, 4], vec![0.0; 8]);
    let e = backend::add_scaled(&mut res, &f32t(&[2, 4], vec![0.0; 8]), Some(&f32t(&[2], vec![0.0; 2]))).unwrap_err();
    assert!(e.to_string().contains("add_scaled"), "{e}");
}

fn gelu_reference(x: f64) -> f64 {
    // 1 + erf(z) = erfc(-z): no cancellation in the negative tail.
    0.5 * x * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

#[test]
fn gelu_erf_matches_f64_erf() {
    let seed = 800;
    let mut g = Gen::new(seed);
    let mut x = g.normal(4096 * 3 + 17, 3.0);
    x.extend(g.uniform(1000, -15.0, 15.0));
    x.extend([0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4, 5.0, -5.0, 9.0, -9.0, 1e4, -1e4, 3e38, -3e38, -14.0]);
    let n = x.len();
    let mut t = f32t(&[n], x.clone());
    backend::gelu_erf(&mut t).unwrap();
    let want: Vec<f64> = x.iter().map(|&v| gelu_reference(v as f64)).collect();
    // erfc fit 1.2e-7, exp within 2 ulp, final roundings (measured worst 2.9e-7); values below f32's normal
    // range count absolutely.
    let tol: Vec<f64> = want.iter().map(|w| 3.5e-7 * w.abs() + 1e-37).collect();
    check("gelu_erf", seed, &[n], t.f32s().unwrap(), &want, &tol);
    let mut t = f32t(&[3], vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
    backend::gelu_erf(&mut t).unwrap();
    let v = t.f32s().unwrap();
    assert!(v[0].is_nan() && v[1] == f32::INFINITY, "{v:?}");
}

#[test]
fn silu_mul_matches_f64() {
    for &(seed, m, n, scale) in &[(900, 1, 4864, 2.0), (901, 300, 4864, 3.0), (902, 3, 19, 50.0)] {
        let mut g = Gen::new(seed);
        let gate = g.normal(m * n, scale);
        let up = g.normal(m * n, 1.0);
        let y = backend::silu_mul(&f32t(&[m, n], gate.clone()), &f32t(&[m, n], up.clone())).unwrap();
        let want: Vec<f64> = (0..m * n)
            .map(|i| {
                let gv = gate[i] as f64;
                gv / (1.0 + (-gv).exp()) * up[i] as f64
            })
            .collect();
        // exp within 2 ulp, then +1, a division and a product.
        let tol: Vec<f64> = want.iter().map(|w| 6.0 * EPS * w.abs() + 1e-38).collect();
        check(&format!("silu_mul scale={scale}"), seed, &[m, n], y.f32s().unwrap(), &want, &tol);
    }
    let e = backend::silu_mul(&f32t(&[2], vec![0.0; 2]), &f32t(&[3], vec![0.0; 3])).unwrap_err();
    assert!(e.to_string().contains("silu_mul"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// rope

fn inv_freq(d: usize, theta: f64) -> Vec<f32> {
    (0..d / 2).map(|i| (1.0 / theta.powf((2 * i) as f64 / d as f64)) as f32).collect()
}

#[test]
fn rope_half_split_like_hf() {
    for &(seed, t, heads, d, start) in
        &[(1000, 1, 14, 64, 511), (1001, 19, 2, 64, 0), (1002, 5, 40, 128, 32000), (1003, 300, 14, 64, 7)]
    {
        let mut g = Gen::new(seed);
        let x = g.normal(t * heads * d, 1.0);
        let positions: Vec<usize> = (0..t).map(|i| start + i * 3).collect();
        let freq = inv_freq(d, 1e6);
        let mut xt = f32t(&[t, heads, d], x.clone());
        backend::rope(&mut xt, &positions, &freq).unwrap();
        let half = d / 2;
        let mut want = vec![0f64; x.len()];
        let mut tol = vec![0f64; x.len()];
        for (i, &pos) in positions.iter().enumerate() {
            for h in 0..heads {
                let base = (i * heads + h) * d;
                for j in 0..half {
                    // The angle is an f32 product, as in HF; only what follows is exact here.
                    let ang = (pos as f32 * freq[j]) as f64;
                    let (c, s) = (ang.cos(), ang.sin());
                    let (a, b) = (x[base + j] as f64, x[base + half + j] as f64);
                    want[base + j] = a * c - b * s;
                    want[base + half + j] = b * c + a * s;
                    let mag = a.abs() + b.abs();
                    tol[base + j] = 3.0 * EPS * mag;
                    tol[base + half + j] = 3.0 * EPS * mag;
                }
            }
        }
        check(&format!("rope t={t} heads={heads} d={d}"), seed, &[t, heads, d], xt.f32s().unwrap(), &want, &tol);
    }
    let mut xt = f32t(&[2, 1, 8], vec![0.0; 16]);
    let e = backend::rope(&mut xt, &[0], &inv_freq(8, 1e6)).unwrap_err().to_string();
    assert!(e.contains("rope") && e.contains("[2, 1, 8]"), "{e}");
    let e = backend::rope(&mut xt, &[0, 1], &inv_freq(6, 1e6)).unwrap_err().to_string();
    assert!(e.contains("rope"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// attention

#[allow(clippy::too_many_arguments)]
fn attention_case(
    seed: u64,
    tq: usize,
    tk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    causal: Option<usize>,
    q_scale: f32,
) {
    let mut g = Gen::new(seed);
    let q = g.normal(tq * hq * d, q_scale);
    let k = g.normal(tk * hk * d, 1.0);
    let v = g.normal(tk * hk * d, 1.0);
    let scale = 1.0 / (d as f32).sqrt();
    let out = backend::attention(
        &f32t(&[tq, hq, d], q.clone()),
        &f32t(&[tk, hk, d], k.clone()),
        &f32t(&[tk, hk, d], v.clone()),
        causal,
        scale,
    )
    .unwrap();
    assert_eq!(out.shape(), [tq, hq, d]);
    let mut want = vec![0f64; tq * hq * d];
    let mut tol = vec![0f64; tq * hq * d];
    let mut naive = vec![0f32; tq * hq * d];
    let mut norm = vec![0f64; tq * hq * d];
    let group = hq / hk;
    for i in 0..tq {
        let visible = causal.map_or(tk, |p| p + i + 1);
        for h in 0..hq {
            let kvh = h / group;
            let qr = &q[(i * hq + h) * d..(i * hq + h + 1) * d];
            let mut s = vec![0f64; visible];
            let mut mag = 0f64;
            for (j, sj) in s.iter_mut().enumerate() {
                let kr = &k[(j * hk + kvh) * d..(j * hk + kvh + 1) * d];
                *sj = qr.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale as f64;
                mag =
                    mag.max(qr.iter().zip(kr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>() * scale as f64);
            }
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|&x| (x - mx).exp()).collect();
            let sum: f64 = e.iter().sum();
            // The same in f32, one operation at a time.
            let s32: Vec<f32> = (0..visible)
                .map(|j| {
                    let kr = &k[(j * hk + kvh) * d..(j * hk + kvh + 1) * d];
                    qr.iter().zip(kr).fold(0f32, |a, (&x, &y)| a + x * y) * scale
                })
                .collect();
            let mx32 = s32.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e32: Vec<f32> = s32.iter().map(|&x| (x - mx32).exp()).collect();
            let sum32: f32 = e32.iter().sum();
            for c in 0..d {
                let (mut o, mut vmag, mut o32) = (0f64, 0f64, 0f32);
                for j in 0..visible {
                    let vv = v[(j * hk + kvh) * d + c] as f64;
                    o += e[j] / sum * vv;
                    vmag = vmag.max(vv.abs());
                    o32 += e32[j] / sum32 * v[(j * hk + kvh) * d + c];
                }
                want[(i * hq + h) * d + c] = o;
                naive[(i * hq + h) * d + c] = o32;
                norm[(i * hq + h) * d + c] = vmag;
                // A score error of δ moves the weights by about δ relative; scores carry sqrt(d) roundings of
                // their magnitude, the exp 2 ulp, the weighted sum sqrt(keys) roundings.
                let ds = 8.0 * EPS * (d as f64).sqrt() * mag + 4.0 * EPS;
                tol[(i * hq + h) * d + c] = (2.0 * ds + 8.0 * EPS * (visible as f64).sqrt()) * vmag + 1e-30;
            }
        }
    }
    let what = format!("attention tq={tq} tk={tk} hq={hq} hk={hk} d={d} causal={causal:?} q_scale={q_scale}");
    check(&what, seed, &[tq, tk, hq, hk, d], out.f32s().unwrap(), &want, &tol);
    check_vs_naive(&what, seed, &[tq, tk, hq, hk, d], out.f32s().unwrap(), &naive, &want, &norm);
}

#[test]
fn attention_vision_bidirectional_1025() {
    attention_case(1100, 1025, 1025, 16, 16, 64, None, 1.0);
}

#[test]
fn attention_decode_against_longer_cache() {
    attention_case(1200, 1, 512, 14, 2, 64, Some(511), 1.0);
    attention_case(1201, 1, 77, 40, 8, 128, Some(76), 1.0);
    attention_case(1202, 3, 8, 14, 2, 64, Some(5), 1.0);
    attention_case(1203, 1, 1, 14, 2, 64, Some(0), 1.0);
}

#[test]
fn attention_prefill_causal_with_offset() {
    attention_case(1300, 19, 56, 14, 2, 64, Some(37), 1.0);
    attention_case(1301, 300, 300, 4, 2, 64, Some(0), 1.0);
    attention_case(1302, 130, 200, 40, 8, 128, Some(70), 1.0);
    attention_case(1303, 99, 99, 1, 1, 19, Some(0), 1.0);
}

#[test]
fn attention_odd_bidirectional_and_large_magnitude() {
    attention_case(1400, 5, 99, 2, 1, 64, None, 1.0);
    attention_case(1401, 19, 19, 3, 3, 99, None, 1.0);
    attention_case(1402, 64, 130, 14, 2, 64, Some(66), 30.0);
    attention_case(1403, 2, 300, 16, 16, 64, None, 30.0);
}

#[test]
fn attention_shape_errors() {
    let t = |s: &[usize]| f32t(s, vec![0.0; s.iter().product()]);
    let e = backend::attention(&t(&[2, 4, 8]), &t(&[3, 2, 7]), &t(&[3, 2, 7]), None, 1.0).unwrap_err().to_string();
    assert!(e.contains("attention") && e.contains("[2, 4, 8]") && e.contains("[3, 2, 7]"), "{e}");
    let e = backend::attention(&t(&[2, 3, 8]), &t(&[3, 2, 8]), &t(&[3, 2, 8]), None, 1.0).unwrap_err().to_string();
    assert!(e.contains("multiple"), "{e}");
    let e = backend::attention(&t(&[2, 4, 8]), &t(&[3, 2, 8]), &t(&[3, 2, 8]), Some(2), 1.0).unwrap_err().to_string();
    assert!(e.contains("causal") && e.contains("4"), "{e}");
    let e = backend::attention(&t(&[2, 4, 8]), &t(&[3, 2, 8]), &t(&[4, 2, 8]), None, 1.0).unwrap_err().to_string();
    assert!(e.contains("attention"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// patch embedding, pixel shuffle, embedding

fn patch_embed_case(seed: u64, n: usize, hh: usize, ww: usize, h: usize, p: usize) {
    let mut g = Gen::new(seed);
    let px = g.normal(n * 3 * hh * ww, 1.0);
    let (wt, w) = typed(&[h, 3, p, p], &g.normal(h * 3 * p * p, 0.05), Dt::BF16);
    let (bt, b) = typed(&[h], &g.normal(h, 0.1), Dt::BF16);
    let (gy, gx) = (hh / p, ww / p);
    let tokens = 1 + gy * gx;
    let (ct, cls) = typed(&[1, 1, h], &g.normal(h, 0.5), Dt::BF16);
    let (pt, pos) = typed(&[1, tokens, h], &g.normal(tokens * h, 0.5), Dt::BF16);
    let out = backend::patch_embed(&f32t(&[n, 3, hh, ww], px.clone()), &wt, &bt, &ct, &pt).unwrap();
    assert_eq!(out.shape(), [n, tokens, h]);
    let mut want = vec![0f64; n * tokens * h];
    let mut tol = vec![0f64; n * tokens * h];
    for img in 0..n {
        for o in 0..h {
            let at = (img * tokens) * h + o;
            want[at] = cls[o] as f64 + pos[o] as f64;
            tol[at] = EPS * want[at].abs();
        }
        for py in 0..gy {
            for pxi in 0..gx {
                let t = 1 + py * gx + pxi;
                for o in 0..h {
                    let (mut s, mut mag) = (0f64, 0f64);
                    for c in 0..3 {
                        for ky in 0..p {
                            for kx in 0..p {
                                let a = px[((img * 3 + c) * hh + py * p + ky) * ww + pxi * p + kx] as f64;
                                let term = a * w[((o * 3 + c) * p + ky) * p + kx] as f64;
                                s += term;
                                mag += term.abs();
                            }
                        }
                    }
                    let at = (img * tokens + t) * h + o;
                    want[at] = s + b[o] as f64 + pos[t * h + o] as f64;
                    tol[at] = 8.0 * EPS * ((3 * p * p) as f64).sqrt() * mag
                        + 2.0 * EPS * (b[o].abs() + pos[t * h + o].abs()) as f64;
                }
            }
        }
    }
    check(
        &format!("patch_embed n={n} {hh}x{ww} h={h} p={p}"),
        seed,
        &[n, 3, hh, ww, h],
        out.f32s().unwrap(),
        &want,
        &tol,
    );
}

#[test]
fn patch_embed_matches_direct_convolution() {
    patch_embed_case(1500, 2, 28, 42, 19, 14);
    patch_embed_case(1501, 1, 448, 448, 1024, 14);
    patch_embed_case(1502, 3, 6, 4, 5, 2);
}

#[test]
fn patch_embed_shape_errors() {
    let t = |s: &[usize]| f32t(s, vec![0.0; s.iter().product()]);
    let e =
        backend::patch_embed(&t(&[1, 3, 30, 28]), &t(&[8, 3, 14, 14]), &t(&[8]), &t(&[8]), &t(&[5, 8])).unwrap_err();
    assert!(e.to_string().contains("patch_embed") && e.to_string().contains("multiple"), "{e}");
    let e =
        backend::patch_embed(&t(&[1, 3, 28, 28]), &t(&[8, 3, 14, 14]), &t(&[8]), &t(&[8]), &t(&[4, 8])).unwrap_err();
    assert!(e.to_string().contains("pos"), "{e}");
    let e =
        backend::patch_embed(&t(&[1, 1, 28, 28]), &t(&[8, 3, 14, 14]), &t(&[8]), &t(&[8]), &t(&[5, 8])).unwrap_err();
    assert!(e.to_string().contains("patch_embed"), "{e}");
}

/// `x.permute(0, 2, 1, 3)` of a contiguous `[a, b, c, d]` array, made contiguous.
fn permute_0213(x: &[f32], a: usize, b: usize, c: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for i in 0..a {
        for j in 0..b {
            for k in 0..c {
                for l in 0..d {
                    // out has shape [a, c, b, d]
                    out[((i * c + k) * b + j) * d + l] = x[((i * b + j) * c + k) * d + l];
                }
            }
        }
    }
    out
}

/// MODEL_SPEC §3.4/3.5 literally: reshape to [N, g, g, C]; view [N, g, g/2, 2C]; permute; view
/// [N, g/2, g/2, 4C]; permute; reshape [N, (g/2)², 4C]. Views of contiguous data are free.
fn pixel_shuffle_reference(x: &[f32], n: usize, g: usize, c: usize) -> Vec<f32> {
    let x = permute_0213(x, n, g, g / 2, 2 * c); // [N, g/2, g, 2C]
    permute_0213(&x, n, g / 2, g / 2, 4 * c) // viewed as [N, g/2, g/2, 4C] -> [N, g/2, g/2, 4C]
}

#[test]
fn pixel_shuffle_matches_view_permute_sequence() {
    for &(seed, n, g, c) in &[(1600, 2, 32, 1024), (1601, 1, 4, 3), (1602, 3, 2, 1), (1603, 1, 32, 19)] {
        let x = Gen::new(seed).normal(n * g * g * c, 1.0);
        let out = backend::pixel_shuffle(&f32t(&[n, g * g, c], x.clone())).unwrap();
        assert_eq!(out.shape(), [n, (g / 2) * (g / 2), 4 * c]);
        let want = pixel_shuffle_reference(&x, n, g, c);
        assert_eq!(out.f32s().unwrap(), &want[..], "pixel_shuffle n={n} g={g} c={c}, seed {seed}");
    }
    for bad in [[1usize, 9, 4], [1, 8, 4], [1, 0, 4]] {
        let e = backend::pixel_shuffle(&f32t(&bad, vec![0.0; bad.iter().product()])).unwrap_err().to_string();
        assert!(e.contains("pixel_shuffle") && e.contains(&format!("{bad:?}")), "{e}");
    }
}

#[test]
fn embedding_and_scatter_rows() {
    let (vocab, d) = (1000, 19);
    let v = Gen::new(1700).normal(vocab * d, 1.0);
    for dt in [Dt::F32, Dt::BF16, Dt::F16] {
        let (table, r) = typed(&[vocab, d], &v, dt);
        let ids = [0u32, 999, 5, 5, 42];
        let e = backend::embedding(&ids, &table).unwrap();
        assert_eq!(e.shape(), [5, d]);
        let want: Vec<f32> = ids.iter().flat_map(|&i| r[i as usize * d..(i as usize + 1) * d].to_vec()).collect();
        assert_eq!(e.f32s().unwrap(), &want[..], "embedding {dt:?}");
        let err = backend::embedding(&[3, 1000], &table).unwrap_err().to_string();
        assert!(err.contains("embedding") && err.contains("1000") && err.contains("index 1"), "{err}");
    }
    let mut dst = f32t(&[6, 3], vec![0.0; 18]);
    let src = f32t(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    backend::scatter_rows(&mut dst, &[4, 1], &src).unwrap();
    let got = dst.f32s().unwrap();
    assert_eq!(&got[12..15], &[1.0, 2.0, 3.0]);
    assert_eq!(&got[3..6], &[4.0, 5.0, 6.0]);
    assert_eq!(got.iter().filter(|&&x| x != 0.0).count(), 6);
    let e = backend::scatter_rows(&mut dst, &[4, 6], &src).unwrap_err().to_string();
    assert!(e.contains("scatter_rows") && e.contains("6"), "{e}");
    let e = backend::scatter_rows(&mut dst, &[4], &src).unwrap_err().to_string();
    assert!(e.contains("scatter_rows"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// argmax and sampling

#[test]
fn argmax_first_max_and_nan() {
    assert_eq!(backend::argmax(&[1.0, 3.0, 3.0, -1.0]).unwrap(), 1);
    assert_eq!(backend::argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]).unwrap(), 0);
    assert_eq!(backend::argmax(&[-5.0]).unwrap(), 0);
    let e = backend::argmax(&[1.0, f32::NAN, 2.0]).unwrap_err().to_string();
    assert!(e.contains("NaN") && e.contains("index 1"), "{e}");
    assert!(backend::argmax(&[]).is_err());
}

fn sampling(temperature: f32, top_k: usize, top_p: f32, repetition_penalty: f32, seed: u64) -> SamplingParams {
    SamplingParams { do_sample: true, temperature, top_k, top_p, repetition_penalty, seed }
}

#[test]
fn sampler_is_deterministic_for_a_seed() {
    let logits = Gen::new(1800).normal(151_674, 2.0);
    let run = |seed| {
        let mut s = Sampler::new(sampling(0.8, 0, 0.95, 1.1, seed)).unwrap();
        let mut prev = vec![1u32, 2, 3];
        for _ in 0..20 {
            let id = s.sample(&logits, &prev).unwrap();
            prev.push(id);
        }
        prev
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn sampler_narrow_filters_equal_argmax() {
    for seed in 0..20 {
        let logits = Gen::new(1900 + seed).normal(5000, 3.0);
        let best = backend::argmax(&logits).unwrap() as u32;
        let mut k1 = Sampler::new(sampling(0.7, 1, 1.0, 1.0, seed)).unwrap();
        let mut p0 = Sampler::new(sampling(1.3, 0, 1e-6, 1.0, seed)).unwrap();
        let mut greedy = Sampler::new(SamplingParams { temperature: 0.0, ..sampling(1.0, 0, 1.0, 1.0, seed) }).unwrap();
        let mut no_sample =
            Sampler::new(SamplingParams { do_sample: false, ..sampling(1.0, 0, 0.5, 1.0, seed) }).unwrap();
        for _ in 0..5 {
            assert_eq!(k1.sample(&logits, &[]).unwrap(), best, "top_k = 1, seed {seed}");
            assert_eq!(p0.sample(&logits, &[]).unwrap(), best, "top_p tiny, seed {seed}");
            assert_eq!(greedy.sample(&logits, &[]).unwrap(), best, "temperature 0, seed {seed}");
            assert_eq!(no_sample.sample(&logits, &[]).unwrap(), best, "do_sample false, seed {seed}");
        }
    }
}

#[test]
fn repetition_penalty_divides_positive_multiplies_negative() {
    let mut l = vec![2.0f32, -2.0, 1.0, 0.5, 0.0];
    apply_repetition_penalty(&mut l, &[0, 1, 1, 4, 0], 2.0).unwrap();
    assert_eq!(l, vec![1.0, -4.0, 1.0, 0.5, 0.0]);
    assert!(apply_repetition_penalty(&mut l, &[5], 2.0).is_err());
    // Greedy decoding applies the penalty too (it is a logits processor, not a warper).
    let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.3, ..SamplingParams::greedy() }).unwrap();
    assert_eq!(s.sample(&[3.0, 2.9], &[]).unwrap(), 0);
    assert_eq!(s.sample(&[3.0, 2.9], &[0]).unwrap(), 1);
}

#[test]
fn top_k_keeps_ties_and_top_p_follows_hf_rule() {
    let mut s = Sampler::new(sampling(1.0, 2, 1.0, 1.0, 3)).unwrap();
    let p = s.processed(&[1.0, 1.0, 1.0, 0.0], &[]).unwrap();
    assert_eq!(p, &[1.0, 1.0, 1.0, f32::NEG_INFINITY]);
    // probs 0.5, 0.3, 0.15, 0.05; top_p 0.75 drops ascending cumsum <= 0.25: 0.05 and 0.15.
    let logits: Vec<f32> = [0.5f64, 0.3, 0.15, 0.05].iter().map(|p| p.ln() as f32).collect();
    let mut s = Sampler::new(sampling(1.0, 0, 0.75, 1.0, 4)).unwrap();
    let p = s.processed(&logits, &[]).unwrap().to_vec();
    assert!(p[0].is_finite() && p[1].is_finite() && p[2] == f32::NEG_INFINITY && p[3] == f32::NEG_INFINITY, "{p:?}");
    let mut counts = [0usize; 4];
    for _ in 0..20_000 {
        counts[s.sample(&logits, &[]).unwrap() as usize] += 1;
    }
    assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
    let f0 = counts[0] as f64 / 20_000.0;
    assert!((f0 - 0.625).abs() < 0.015, "renormalised 0.5/0.8 expected, got {f0} ({counts:?})");
}

/// HF's TopPLogitsWarper on the full vocabulary, sorted naively, against the sampler's shortcut.
#[test]
fn top_p_on_full_vocabulary_matches_full_sort() {
    for (seed, top_p, scale) in [(2000u64, 0.9f32, 2.0f32), (2001, 0.5, 4.0), (2002, 0.99, 1.0), (2003, 0.3, 0.2)] {
        let logits = Gen::new(seed).normal(151_674, scale);
        let mut s = Sampler::new(sampling(1.0, 0, top_p, 1.0, seed)).unwrap();
        let got = s.processed(&logits, &[]).unwrap().to_vec();
        let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let total: f64 = logits.iter().map(|&l| (l as f64 - mx).exp()).sum();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
        let mut removed = vec![false; logits.len()];
        let mut cum = 0.0;
        for (pos, &i) in order.iter().enumerate() {
            cum += (logits[i] as f64 - mx).exp() / total;
            if cum > 1.0 - top_p as f64 || pos == order.len() - 1 {
                break;
            }
            removed[i] = true;
        }
        let mismatches = (0..logits.len()).filter(|&i| removed[i] != (got[i] == f32::NEG_INFINITY)).count();
        assert_eq!(
            mismatches,
            0,
            "top_p {top_p} seed {seed}: kept {} tokens",
            got.iter().filter(|v| v.is_finite()).count()
        );
    }
}

#[test]
fn sampler_draws_follow_the_softmax() {
    let logits: Vec<f32> = [0.1f64, 0.2, 0.7].iter().map(|p| p.ln() as f32).collect();
    let mut s = Sampler::new(sampling(1.0, 0, 1.0, 1.0, 11)).unwrap();
    let mut counts = [0usize; 3];
    for _ in 0..30_000 {
        counts[s.sample(&logits, &[]).unwrap() as usize] += 1;
    }
    for (i, want) in [0.1, 0.2, 0.7].iter().enumerate() {
        let f = counts[i] as f64 / 30_000.0;
        assert!((f - want).abs() < 0.012, "token {i}: frequency {f}, expected {want} ({counts:?})");
    }
}

#[test]
fn sampler_rejects_bad_parameters_and_logits() {
    assert!(Sampler::new(sampling(-1.0, 0, 1.0, 1.0, 0)).is_err());
    assert!(Sampler::new(sampling(1.0, 0, 0.0, 1.0, 0)).is_err());
    assert!(Sampler::new(sampling(1.0, 0, 1.5, 1.0, 0)).is_err());
    assert!(Sampler::new(sampling(1.0, 0, 1.0, 0.0, 0)).is_err());
    let mut s = Sampler::new(sampling(1.0, 0, 1.0, 1.0, 0)).unwrap();
    assert!(s.sample(&[1.0, f32::NAN], &[]).is_err());
    assert!(s.sample(&[f32::NEG_INFINITY; 3], &[]).is_err());
}
