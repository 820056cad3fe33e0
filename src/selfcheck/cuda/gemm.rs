//! cuBLASLt `linear` (bf16, fp32 accumulation, bias epilogue) and the decode GEMV experiment (`gemv_bf16`,
//! `gemv_silu_bf16`) against the CPU backend's `linear`; the fused SwiGLU form also against the unfused GPU
//! pair (`silu_mul_fused_bf16` then `gemv_bf16`), which it must equal bit for bit.
//!
//! Tolerance: the CPU sums the same bf16 products in f32 (another order) and keeps f32; the GPU rounds the
//! result once to bf16 (relative 2^-9 = 2e-3). rtol 8e-3 covers the rounding with margin; atol 1e-2 covers
//! outputs near zero, where summation order dominates (inputs are in [-1, 1], k <= 4864).

use half::bf16;

use super::super::{widen, Report, Rng};
use super::KernelCase;
use crate::backend::cuda::{buffer, gemv, CudaDevice, LinearShape, Result};
use crate::tensor::Tensor;

/// The `m` output rows of `y` (rows of `s.ld_y`), after checking that the padding between them is untouched
/// (still the poison).
fn output_rows(y: &[bf16], s: LinearShape) -> crate::Result<Vec<bf16>> {
    let pad_ok = (0..s.m.saturating_sub(1)).all(|r| y[r * s.ld_y + s.n..(r + 1) * s.ld_y].iter().all(|v| v.is_nan()));
    if !pad_ok {
        return Err(crate::Error::Invalid("wrote into the padding between output rows".into()));
    }
    Ok((0..s.m).flat_map(|r| y[r * s.ld_y..r * s.ld_y + s.n].to_vec()).collect())
}

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
        Ok((widen(&output_rows(&y, s)?), want.to_f32_vec()))
    };
    match run() {
        Ok((got, want)) => {
            report.compare(op, &shape, &got, &want, 1e-2, 8e-3);
        }
        Err(e) => report.error(op, &shape, e),
    }
}

/// `gemv_bf16` (or the fused `gemv_silu_bf16`) on random inputs against the CPU `linear` of the same bf16
/// operands (for the fused form, of the SwiGLU input rounded as the GPU rounds it: bf16(bf16(silu(g)) * u)).
fn gemv_case(dev: &CudaDevice, report: &mut Report, rng: &mut Rng, s: LinearShape, bias: bool, fused: bool) {
    let op = match (fused, bias) {
        (true, _) => "gemv_silu_bf16",
        (false, true) => "gemv_bf16 (+bias)",
        (false, false) => "gemv_bf16",
    };
    let shape = format!("m {} n {} k {} ld_x {} ld_y {}", s.m, s.n, s.k, s.ld_x, s.ld_y);
    // (got, CPU reference, and for the fused form: (fused, unfused GPU pair))
    type Outputs = (Vec<f32>, Vec<f32>, Option<(Vec<f32>, Vec<f32>)>);
    let mut run = || -> crate::Result<Outputs> {
        let row = if fused { 2 * s.k } else { s.k };
        let x_len = (s.m - 1) * s.ld_x + row;
        let y_len = (s.m - 1) * s.ld_y + s.n;
        let x = rng.bf16s(x_len, if fused { 3.0 } else { 1.0 }, 0.0);
        let w = rng.bf16s(s.n * s.k, 1.0, 0.0);
        let b = rng.bf16s(s.n, 1.0, 0.0);
        let (dx, dw, db) = (buffer::upload(dev, &x)?, buffer::upload(dev, &w)?, buffer::upload(dev, &b)?);
        let mut dy = buffer::poisoned_bf16(dev, y_len)?;
        let bv = db.as_view();
        gemv::gemv_bf16(dev, &dx.as_view(), &dw.as_view(), bias.then_some(&bv), &mut dy.as_view_mut(), s, fused)?;
        let y = buffer::download(dev, &dy)?;
        let got = output_rows(&y, s)?;
        let rb = |v: f32| bf16::from_f32(v).to_f32();
        let xs: Vec<f32> = (0..s.m)
            .flat_map(|r| {
                let xr = &x[r * s.ld_x..r * s.ld_x + row];
                (0..s.k).map(move |i| match fused {
                    true => {
                        let g = xr[i].to_f32();
                        rb(rb(g / (1.0 + (-g).exp())) * xr[s.k + i].to_f32())
                    }
                    false => xr[i].to_f32(),
                })
            })
            .collect();
        let want = crate::backend::linear(
            &Tensor::from_f32([s.m, s.k], xs)?,
            &Tensor::from_bf16([s.n, s.k], w)?,
            if bias { Some(Tensor::from_bf16([s.n], b)?) } else { None }.as_ref(),
        )?;
        // The fused form against the unfused GPU pair, which must give the same bits.
        let pair = if fused {
            let mut mid = buffer::poisoned_bf16(dev, s.m * s.k)?;
            let mut y2 = buffer::poisoned_bf16(dev, y_len)?;
            let dense = LinearShape { ld_x: s.k, ..s };
            if s.ld_x == 2 * s.k {
                crate::backend::cuda::elementwise::silu_mul_fused_bf16(
                    dev,
                    &dx.as_view(),
                    &mut mid.as_view_mut(),
                    s.m,
                    s.k,
                )?;
                gemv::gemv_bf16(dev, &mid.as_view(), &dw.as_view(), None, &mut y2.as_view_mut(), dense, false)?;
                let y2 = buffer::download(dev, &y2)?;
                Some((widen(&got), widen(&output_rows(&y2, s)?)))
            } else {
                None
            }
        } else {
            None
        };
        Ok((widen(&got), want.to_f32_vec(), pair))
    };
    match run() {
        Ok((got, want, pair)) => {
            report.compare(op, &shape, &got, &want, 1e-2, 8e-3);
            if let Some((fused, unfused)) = pair {
                report.compare(&format!("{op} == silu_mul then gemv"), &shape, &fused, &unfused, 0.0, 0.0);
            }
        }
        Err(e) => report.error(op, &shape, e),
    }
}

pub fn run(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    // The decode GEMV experiment: the 1B decode shapes at batch 1, 3 and 8, strided rows, an odd n.
    let d = LinearShape::dense;
    for (s, bias, fused) in [
        (d(1, 1152, 896), true, false),
        (d(3, 896, 896), false, false),
        (d(8, 9728, 896), false, false),
        (LinearShape { m: 2, n: 1000, k: 64, ld_x: 200, ld_y: 1003 }, true, false),
        (LinearShape { m: 1, n: 896, k: 4864, ld_x: 2 * 4864, ld_y: 896 }, false, true),
        (LinearShape { m: 5, n: 896, k: 4864, ld_x: 2 * 4864, ld_y: 900 }, false, true),
    ] {
        gemv_case(dev, report, rng, s, bias, fused);
    }

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
        ("1B qkv, decode batch 1", LinearShape::dense(1, 1152, 896)),
        ("1B o, decode batch 1", LinearShape::dense(1, 896, 896)),
        ("1B mlp gate_up, decode batch 1", LinearShape::dense(1, 2 * 4864, 896)),
        ("1B mlp down, decode batch 1", LinearShape::dense(1, 896, 4864)),
        ("1B mlp gate_up, decode batch 8", LinearShape::dense(8, 2 * 4864, 896)),
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
    // The GEMV experiment on the same 1B decode shapes (compare with the linear_bf16 rows above), and the
    // fused SwiGLU + down projection (compare with silu_mul_fused_bf16 + the down row).
    for (name, s, fused) in [
        ("1B qkv, decode batch 1", LinearShape::dense(1, 1152, 896), false),
        ("1B o, decode batch 1", LinearShape::dense(1, 896, 896), false),
        ("1B mlp gate_up, decode batch 1", LinearShape::dense(1, 2 * 4864, 896), false),
        ("1B mlp down, decode batch 1", LinearShape::dense(1, 896, 4864), false),
        ("1B mlp gate_up, decode batch 8", LinearShape::dense(8, 2 * 4864, 896), false),
        (
            "1B silu(gate)*up + down, decode batch 1",
            LinearShape { ld_x: 2 * 4864, ..LinearShape::dense(1, 896, 4864) },
            true,
        ),
    ] {
        let row = if fused { 2 * s.k } else { s.k };
        let x = buffer::zeros::<bf16>(dev, s.m * row)?;
        let w = buffer::zeros::<bf16>(dev, s.n * s.k)?;
        let mut y = buffer::zeros::<bf16>(dev, s.m * s.n)?;
        let bytes = 2.0 * (s.m * row + s.n * s.k + s.m * s.n) as f64;
        out.push(KernelCase {
            op: if fused { "gemv_silu_bf16" } else { "gemv_bf16" }.into(),
            shape: name.into(),
            bytes,
            flops: s.flops(),
            launch: Box::new(move || {
                gemv::gemv_bf16(dev, &x.as_view(), &w.as_view(), None, &mut y.as_view_mut(), s, fused)
            }),
        });
    }
    Ok(out)
}
