//! cuBLASLt `linear` (bf16, fp32 accumulation, bias epilogue) against the CPU backend's `linear`.
//!
//! Tolerance: the CPU sums the same bf16 products in f32 (another order) and keeps f32; the GPU rounds the
//! result once to bf16 (relative 2^-9 = 2e-3). rtol 8e-3 covers the rounding with margin; atol 1e-2 covers
//! outputs near zero, where summation order dominates (inputs are in [-1, 1], k <= 4864).

use half::bf16;

use super::super::{widen, Report, Rng};
use super::KernelCase;
use crate::backend::cuda::{buffer, CudaDevice, LinearShape, Result};
use crate::tensor::Tensor;

fn case(dev: &CudaDevice, report: &mut Report, rng: &mut Rng, s: LinearShape, bias: bool) {
    let op = if bias { "linear_bf16 (+bias)" } else { "linear_bf16" };
    let shape = format!("m {} n {} k {} ld_x {} ld_y {}", s.m, s.n, s.k, s.ld_x, s.ld_y);
    let mut run = || -> crate::Result<(Vec<f32>, Vec<f32>)> {
        let x_len = if s.m == 0 { 0 } else { (s.m - 1) * s.ld_x + s.k };
        let y_len = if s.m == 0 { 0 } else { (s.m - 1) * s.ld_y + s.n };
        let x = rng.bf16s(x_len, 1.0, 0.0);
        let w = rng.bf16s(s.n * s.k, 1.0, 0.0);
        let b = rng.bf16s(s.n, 1.0, 0.0);
        let (dx, dw, db) = (buffer::upload(dev, &x)?, buffer::upload(dev, &w)?, buffer::upload(dev, &b)?);
        let mut dy = buffer::poisoned_bf16(dev, y_len)?;
        let bv = db.as_view();
        dev.blas.linear(&dx.as_view(), &dw.as_view(), bias.then_some(&bv), &mut dy.as_view_mut(), s)?;
        let y = buffer::download(dev, &dy)?;
        // Gather the strided rows on both sides.
        let xs: Vec<f32> = (0..s.m).flat_map(|r| x[r * s.ld_x..r * s.ld_x + s.k].iter().map(|v| v.to_f32())).collect();
        let want = crate::backend::linear(
            &Tensor::from_f32([s.m, s.k], xs)?,
            &Tensor::from_bf16([s.n, s.k], w)?,
            if bias { Some(Tensor::from_bf16([s.n], b)?) } else { None }.as_ref(),
        )?;
        let got: Vec<bf16> = (0..s.m).flat_map(|r| y[r * s.ld_y..r * s.ld_y + s.n].to_vec()).collect();
        // Padding between strided output rows must stay untouched (still the poison).
        let pad_ok =
            (0..s.m.saturating_sub(1)).all(|r| y[r * s.ld_y + s.n..(r + 1) * s.ld_y].iter().all(|v| v.is_nan()));
        if !pad_ok {
            return Err(crate::Error::Invalid("wrote into the padding between output rows".into()));
        }
        Ok((widen(&got), want.to_f32_vec()))
    };
    match run() {
        Ok((got, want)) => {
            report.compare(op, &shape, &got, &want, 1e-2, 8e-3);
        }
        Err(e) => report.error(op, &shape, e),
    }
}

pub fn run(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    let d = LinearShape::dense;
    let shapes = [
        (d(1, 896, 896), true),
        (d(7, 4864, 896), false),
        (d(41, 896, 4864), false),
        (d(2050, 3072, 1024), true),
        (d(17, 33, 40), true),
        (d(3, 151, 64), false),
        (LinearShape { m: 9, n: 64, k: 128, ld_x: 384, ld_y: 200 }, true),
        (LinearShape { m: 1025, n: 1024, k: 1024, ld_x: 3072, ld_y: 1024 }, false),
    ];
    for (s, bias) in shapes {
        case(dev, report, rng, s, bias);
    }
    // Refusals: w of the wrong size, output too short.
    let bad = || -> Result<()> {
        let x = buffer::zeros::<bf16>(dev, 64)?;
        let w = buffer::zeros::<bf16>(dev, 63)?;
        let mut y = buffer::zeros::<bf16>(dev, 64)?;
        dev.blas.linear(&x.as_view(), &w.as_view(), None, &mut y.as_view_mut(), d(8, 8, 8))
    };
    report.expect_err("linear_bf16", "w [8, 8] given 63 elements", bad());
}

/// Large GEMMs for `facellm bench --kernels`: the vision tower's and the 1B/8B LLM's.
pub fn bench_cases(dev: &CudaDevice) -> Result<Vec<KernelCase<'_>>> {
    let mut out = Vec::new();
    for (name, s) in [
        ("vision 300M qkv, 7 tiles", LinearShape::dense(7 * 1025, 3072, 1024)),
        ("vision 300M fc1, 7 tiles", LinearShape::dense(7 * 1025, 4096, 1024)),
        ("vision 6B fc1, 7 tiles", LinearShape::dense(7 * 1025, 12800, 3200)),
        ("8B mlp gate_up, decode batch 1", LinearShape::dense(1, 2 * 18944, 3584)),
        ("8B mlp gate_up, decode batch 64", LinearShape::dense(64, 2 * 18944, 3584)),
    ] {
        let x = buffer::zeros::<bf16>(dev, s.m * s.k)?;
        let w = buffer::zeros::<bf16>(dev, s.n * s.k)?;
        let mut y = buffer::zeros::<bf16>(dev, s.m * s.n)?;
        let bytes = 2.0 * (s.m * s.k + s.n * s.k + s.m * s.n) as f64;
        out.push(KernelCase {
            op: "linear_bf16".into(),
            shape: name.into(),
            bytes,
            flops: s.flops(),
            launch: Box::new(move || dev.blas.linear(&x.as_view(), &w.as_view(), None, &mut y.as_view_mut(), s)),
        });
    }
    Ok(out)
}
