//! `rmsnorm_bf16` and `add_rmsnorm_bf16` (kernels/rmsnorm.cu: the Qwen2 decoder's norms) against the CPU
//! `rms_norm` / `add_rms_norm` on the same bf16 values.
//!
//! Tolerances (u = 2^-8, bf16's relative spacing): the output is rounded twice as in Qwen2RMSNorm
//! (x * r, then * w), so rtol 4u; the fused residual is rounded once to bf16 where the CPU keeps f32, so the
//! normalised value it feeds differs by up to u/2 more: rtol 4u still holds with margin. atol 1e-4 covers
//! the fp32 mean of squares over up to 8192 values (summation order). The updated residual: rtol u.

use half::bf16;

use super::super::{widen, Report, Rng};
use super::KernelCase;
use crate::backend::cuda::{buffer, norm, CudaDevice, Result};
use crate::tensor::Tensor;

const EPS: f32 = 1e-6;
const U: f64 = 1.0 / 256.0;

fn case(dev: &CudaDevice, report: &mut Report, rng: &mut Rng, rows: usize, n: usize, fused: bool) {
    let op = if fused { "add_rmsnorm_bf16" } else { "rmsnorm_bf16" };
    let shape = format!("[{rows}, {n}]");
    // (gpu out, cpu out, the updated residual on both sides when fused)
    type Outputs = (Vec<f32>, Vec<f32>, Option<(Vec<f32>, Vec<f32>)>);
    let mut run = || -> crate::Result<Outputs> {
        let x = rng.bf16s(rows * n, 2.0, 0.0);
        let r = rng.bf16s(rows * n, 2.0, 0.0);
        let w = rng.bf16s(n, 1.0, 0.5);
        let (dx, dw) = (buffer::upload(dev, &x)?, buffer::upload(dev, &w)?);
        let mut out = buffer::poisoned_bf16(dev, rows * n)?;
        let wt = Tensor::from_bf16([n], w)?;
        let xt = Tensor::from_f32([rows, n], x.iter().map(|v| v.to_f32()).collect())?;
        if fused {
            let mut dr = buffer::upload(dev, &r)?;
            norm::add_rms_norm_bf16(
                dev,
                &mut dr.as_view_mut(),
                &dx.as_view(),
                &dw.as_view(),
                &mut out.as_view_mut(),
                rows,
                n,
                EPS,
            )?;
            let mut rt = Tensor::from_f32([rows, n], r.iter().map(|v| v.to_f32()).collect())?;
            let want = crate::backend::add_rms_norm(&mut rt, &xt, &wt, EPS)?;
            let got_r = widen(&buffer::download(dev, &dr)?);
            Ok((widen(&buffer::download(dev, &out)?), want.to_f32_vec(), Some((got_r, rt.to_f32_vec()))))
        } else {
            norm::rms_norm_bf16(dev, &dx.as_view(), &dw.as_view(), &mut out.as_view_mut(), rows, n, EPS)?;
            let want = crate::backend::rms_norm(&xt, &wt, EPS)?;
            Ok((widen(&buffer::download(dev, &out)?), want.to_f32_vec(), None))
        }
    };
    match run() {
        Ok((got, want, residual)) => {
            report.compare(op, &shape, &got, &want, 1e-4, 4.0 * U);
            if let Some((got_r, want_r)) = residual {
                report.compare(&format!("{op} (residual)"), &shape, &got_r, &want_r, 0.0, U);
            }
        }
        Err(e) => report.error(op, &shape, e),
    }
}

pub fn run(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    for (rows, n) in [(1, 896), (7, 3584), (33, 5120), (2, 8192), (3, 100), (5, 7), (300, 896), (1, 32768)] {
        case(dev, report, rng, rows, n, false);
        case(dev, report, rng, rows, n, true);
    }
    let bad = || -> Result<()> {
        let x = buffer::zeros::<bf16>(dev, 16)?;
        let w = buffer::zeros::<bf16>(dev, 7)?;
        let mut o = buffer::zeros::<bf16>(dev, 16)?;
        norm::rms_norm_bf16(dev, &x.as_view(), &w.as_view(), &mut o.as_view_mut(), 2, 8, EPS)
    };
    report.expect_err("rmsnorm_bf16", "weight of 7 for n 8", bad());
}

/// The decoder norms at prefill size (memory-bound: read x, residual, write both).
pub fn bench_cases(dev: &CudaDevice) -> Result<Vec<KernelCase<'_>>> {
    let mut out = Vec::new();
    for (rows, n, name) in [(4096, 896, "1B"), (4096, 3584, "8B")] {
        let x = buffer::zeros::<bf16>(dev, rows * n)?;
        let w = buffer::zeros::<bf16>(dev, n)?;
        let mut r = buffer::zeros::<bf16>(dev, rows * n)?;
        let mut o = buffer::zeros::<bf16>(dev, rows * n)?;
        out.push(KernelCase {
            op: "add_rmsnorm_bf16".into(),
            shape: format!("{name} [{rows}, {n}]"),
            bytes: 4.0 * (rows * n * 2) as f64,
            flops: 0.0,
            launch: Box::new(move || {
                norm::add_rms_norm_bf16(
                    dev,
                    &mut r.as_view_mut(),
                    &x.as_view(),
                    &w.as_view(),
                    &mut o.as_view_mut(),
                    rows,
                    n,
                    EPS,
                )
            }),
        });
    }
    Ok(out)
}
