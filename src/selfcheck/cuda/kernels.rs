//! Self-checks of the vision-side and elementwise kernels (layernorm.cu, elementwise.cu, patch_embed.cu,
//! pixel_shuffle.cu, fill.cu) against their CPU twins, and the large cases `facellm bench` times for GB/s.
//!
//! Every check draws bf16 inputs from the seeded stream, poisons its output, launches, and compares with the
//! CPU twin run on the same bf16 values widened to f32. Where HF keeps an intermediate in a bf16 tensor (the
//! residual stream, the biased fc1 output, the conv output before `+ pos`), the reference rounds it at the same
//! point, so the remaining difference is the kernel's own output rounding and fp32 arithmetic.
//!
//! Tolerances, with u = 2^-8 the bf16 unit roundoff (one rounding moves a value by at most u of it):
//! - one output rounding (LayerNorm, GELU, the patch conv, the shuffle norm): |err| <= u|want| plus fp32
//!   noise; allowed rtol 2u (flash-attention's rule: twice a naive same-precision implementation);
//! - two roundings (RMSNorm's `w * bf16(x * r)`, silu's `bf16(silu(g)) * up`): rtol 4u;
//! - atol only for near-zero outputs: 1e-4 where a row statistic in fp32 (mean over up to 12800 values of
//!   magnitude up to ~100) shifts every output by up to ~1e-4 absolute; 1e-6 for pointwise ops (erff/expf
//!   errors on the negative tails, ~1e-7 absolute);
//! - the residual update and the fills are computed with the same IEEE f32 operations on both sides, so they
//!   must agree to the bit (the residual is allowed one ulp, rtol 2u, in case of a double rounding).

use cudarc::driver::CudaSlice;
use half::bf16;

use super::KernelCase;
use crate::backend;
use crate::backend::cuda::buffer::{self, POISON_BF16};
use crate::backend::cuda::{elementwise, fill, layernorm, patch_embed, pixel_shuffle, CudaDevice};
use crate::selfcheck::{widen, Report, Rng};
use crate::tensor::Tensor;

/// bf16 unit roundoff.
const U: f64 = 1.0 / 256.0;
const RTOL_1: f64 = 2.0 * U;
const RTOL_2: f64 = 4.0 * U;
const ATOL_ROW: f64 = 1e-4;
const ATOL_POINT: f64 = 1e-6;
/// InternViT's norm eps, and the projector LayerNorm's.
const EPS: f32 = 1e-6;
const EPS_PROJ: f32 = 1e-5;

type Check = crate::Result<()>;

/// Runs one check body; an error from a launcher, a download or a twin becomes a failed row.
fn check(report: &mut Report, op: &str, shape: &str, body: impl FnOnce(&mut Report) -> Check) {
    if let Err(e) = body(report) {
        report.error(op, shape, e);
    }
}

fn up(dev: &CudaDevice, host: &[bf16]) -> crate::Result<CudaSlice<bf16>> {
    Ok(buffer::upload(dev, host)?)
}

fn poisoned(dev: &CudaDevice, n: usize) -> crate::Result<CudaSlice<bf16>> {
    Ok(buffer::poisoned_bf16(dev, n)?)
}

fn down(dev: &CudaDevice, buf: &CudaSlice<bf16>) -> crate::Result<Vec<bf16>> {
    Ok(buffer::download(dev, buf)?)
}

fn round(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

fn tensor(shape: &[usize], data: Vec<f32>) -> crate::Result<Tensor> {
    Tensor::from_f32(shape.to_vec(), data)
}

/// Rows `0..rows` of `n` elements at stride `ld` from `buf` (starting at `off`), widened.
fn gather_rows(buf: &[bf16], off: usize, rows: usize, n: usize, ld: usize) -> Vec<f32> {
    (0..rows).flat_map(|r| buf[off + r * ld..off + r * ld + n].iter().map(|v| v.to_f32())).collect()
}

/// Counts elements of `buf` outside the strided rows that are no longer poison (a kernel writing between rows
/// or past the last one), and records a failed row when there are any.
fn untouched_outside_rows(report: &mut Report, op: &str, shape: &str, buf: &[bf16], rows: usize, n: usize, ld: usize) {
    let written = buf
        .iter()
        .enumerate()
        .filter(|&(i, v)| {
            let inside = i / ld < rows && i % ld < n;
            !inside && v.to_bits() != POISON_BF16.to_bits()
        })
        .count();
    if written > 0 {
        report.error(op, shape, format!("{written} elements outside the rows were written"));
    }
}

pub fn run(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    layernorm_checks(dev, report, rng);
    rmsnorm_checks(dev, report, rng);
    residual_norm_checks(dev, report, rng);
    gelu_checks(dev, report, rng);
    silu_checks(dev, report, rng);
    patch_embed_checks(dev, report, rng);
    shuffle_checks(dev, report, rng);
    fill_checks(dev, report, rng);
}

/// (rows, n, ld_x, ld_out, x element offset, x offset value).
type StridedCase = (usize, usize, usize, usize, usize, f32);

fn layernorm_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    const OP: &str = "layernorm_bf16";
    let cases: &[StridedCase] = &[
        (1, 1, 1, 1, 0, 0.0),
        (3, 7, 7, 7, 0, 0.0),
        (5, 72, 72, 72, 0, 0.0),
        (4, 100, 130, 110, 0, 0.0),
        (6, 64, 96, 64, 0, 0.0),
        (33, 1024, 1024, 1024, 1, 0.0), // unaligned rows: the scalar path with vector-sized blocks
        (7 * 1025, 1024, 1024, 1024, 0, 0.0), // 300M: 7 tiles of 1025 tokens
        (1025, 3200, 3200, 3200, 0, 0.0),
        (256, 4096, 4096, 4096, 0, 0.0),
        (64, 12800, 12800, 12800, 0, 0.0),
        (64, 1024, 1024, 1024, 0, 100.0), // large common offset: the two-pass variance must keep its digits
    ];
    for &(rows, n, ld_x, ld_out, off, mean) in cases {
        let shape = format!("[{rows}, {n}] ld {ld_x}/{ld_out} +{off} mean {mean}");
        check(report, OP, &shape, |report| {
            let x_len = off + (rows - 1) * ld_x + n;
            let out_len = (rows - 1) * ld_out + n;
            let xh = rng.bf16s(x_len, 2.0, mean);
            let wh = rng.bf16s(n, 0.5, 1.0);
            let bh = rng.bf16s(n, 0.5, 0.0);
            let (x, w, b) = (up(dev, &xh)?, up(dev, &wh)?, up(dev, &bh)?);
            let mut out = poisoned(dev, out_len)?;
            layernorm::layernorm_bf16(
                dev,
                &x.slice(off..),
                ld_x,
                &w.as_view(),
                &b.as_view(),
                &mut out.as_view_mut(),
                ld_out,
                rows,
                n,
                EPS,
            )?;
            let got = down(dev, &out)?;
            let xt = tensor(&[rows, n], gather_rows(&xh, off, rows, n, ld_x))?;
            let want = backend::layer_norm(&xt, &tensor(&[n], widen(&wh))?, &tensor(&[n], widen(&bh))?, EPS)?;
            report.compare(OP, &shape, &gather_rows(&got, 0, rows, n, ld_out), want.f32s()?, ATOL_ROW, RTOL_1);
            untouched_outside_rows(report, OP, &shape, &got, rows, n, ld_out);
            Ok(())
        });
    }
    check(report, OP, "ld_x < n", |report| {
        let (x, w) = (up(dev, &rng.bf16s(64, 1.0, 0.0))?, up(dev, &rng.bf16s(16, 1.0, 0.0))?);
        let mut out = poisoned(dev, 64)?;
        let got = layernorm::layernorm_bf16(
            dev,
            &x.as_view(),
            8,
            &w.as_view(),
            &w.as_view(),
            &mut out.as_view_mut(),
            16,
            4,
            16,
            EPS,
        );
        report.expect_err(OP, "[4, 16] ld_x 8", got);
        Ok(())
    });
}

fn rmsnorm_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    const OP: &str = "rmsnorm_strided_bf16";
    let cases: &[StridedCase] = &[
        (1, 1, 1, 1, 0, 0.0),
        (3, 7, 7, 7, 0, 0.0),
        (5, 72, 216, 72, 0, 0.0),                // q columns of a fused [rows, 3h] QKV
        (5, 72, 216, 72, 72, 0.0),               // k columns
        (4, 100, 300, 100, 100, 0.0),            // awkward h: scalar path
        (2 * 1025, 3200, 9600, 3200, 3200, 0.0), // 6B qk-norm, 2 tiles, k columns
        (33, 1024, 1024, 1024, 1, 0.0),
    ];
    for &(rows, n, ld_x, ld_out, off, mean) in cases {
        let shape = format!("[{rows}, {n}] ld {ld_x}/{ld_out} +{off}");
        check(report, OP, &shape, |report| {
            let x_len = off + (rows - 1) * ld_x + n;
            let xh = rng.bf16s(x_len, 2.0, mean);
            let wh = rng.bf16s(n, 0.5, 1.0);
            let (x, w) = (up(dev, &xh)?, up(dev, &wh)?);
            let mut out = poisoned(dev, (rows - 1) * ld_out + n)?;
            layernorm::rmsnorm_strided_bf16(
                dev,
                &x.slice(off..),
                ld_x,
                &w.as_view(),
                &mut out.as_view_mut(),
                ld_out,
                rows,
                n,
                EPS,
            )?;
            let got = down(dev, &out)?;
            let xt = tensor(&[rows, n], gather_rows(&xh, off, rows, n, ld_x))?;
            let want = backend::rms_norm(&xt, &tensor(&[n], widen(&wh))?, EPS)?;
            report.compare(OP, &shape, &gather_rows(&got, 0, rows, n, ld_out), want.f32s()?, ATOL_ROW, RTOL_2);
            untouched_outside_rows(report, OP, &shape, &got, rows, n, ld_out);
            Ok(())
        });
    }

    // In place on the q columns of a fused QKV buffer: q replaced by its norm, k and v untouched.
    const OP_IP: &str = "rmsnorm_strided_inplace_bf16";
    for &(rows, h) in &[(3usize, 72usize), (1025, 3200), (5, 100)] {
        let shape = format!("q of [{rows}, 3*{h}]");
        check(report, OP_IP, &shape, |report| {
            let qkvh = rng.bf16s(rows * 3 * h, 2.0, 0.0);
            let wh = rng.bf16s(h, 0.5, 1.0);
            let (mut qkv, w) = (up(dev, &qkvh)?, up(dev, &wh)?);
            layernorm::rmsnorm_strided_inplace_bf16(dev, &mut qkv.as_view_mut(), 3 * h, &w.as_view(), rows, h, EPS)?;
            let got = widen(&down(dev, &qkv)?);
            let q = backend::rms_norm(
                &tensor(&[rows, h], gather_rows(&qkvh, 0, rows, h, 3 * h))?,
                &tensor(&[h], widen(&wh))?,
                EPS,
            )?;
            let mut want = widen(&qkvh);
            for (r, qr) in q.f32s()?.chunks_exact(h).enumerate() {
                want[r * 3 * h..r * 3 * h + h].copy_from_slice(qr);
            }
            report.compare(OP_IP, &shape, &got, &want, ATOL_ROW, RTOL_2);
            Ok(())
        });
    }

    check(report, OP, "bad weight", |report| {
        let (x, w) = (up(dev, &rng.bf16s(64, 1.0, 0.0))?, up(dev, &rng.bf16s(16, 1.0, 0.0))?);
        let mut out = poisoned(dev, 64)?;
        let got = layernorm::rmsnorm_strided_bf16(
            dev,
            &x.as_view(),
            16,
            &w.slice(..15),
            &mut out.as_view_mut(),
            16,
            4,
            16,
            EPS,
        );
        report.expect_err(OP, "[4, 16] weight [15]", got);
        let mut xs = up(dev, &rng.bf16s(40, 1.0, 0.0))?;
        let got = layernorm::rmsnorm_strided_inplace_bf16(dev, &mut xs.as_view_mut(), 16, &w.as_view(), 4, 16, EPS);
        report.expect_err(OP_IP, "[4, 16] ld 16 in 40 elements", got);
        Ok(())
    });
}

#[derive(Clone, Copy)]
enum Norm {
    None,
    Layer { bias: bool },
    Rms,
}

fn residual_norm_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    const OP: &str = "residual_norm_bf16";
    let cases: &[(usize, usize, bool, Norm)] = &[
        (3, 7, true, Norm::Layer { bias: true }),
        (5, 72, false, Norm::Layer { bias: true }),
        (9, 1000, true, Norm::Layer { bias: false }),
        (4, 100, true, Norm::Rms),
        (7 * 1025, 1024, true, Norm::Layer { bias: true }), // 300M: x += λ·attn; y = norm2(x)
        (2 * 1025, 3200, true, Norm::Rms),                  // 6B
        (7 * 1025, 1024, true, Norm::None),                 // last layer: the add alone
        (3, 7, false, Norm::None),
    ];
    for &(rows, n, with_lambda, norm) in cases {
        let kind = match norm {
            Norm::None => "add only",
            Norm::Layer { bias: true } => "LayerNorm",
            Norm::Layer { bias: false } => "LayerNorm, no bias",
            Norm::Rms => "RMSNorm",
        };
        let shape = format!("[{rows}, {n}] {kind}{}", if with_lambda { ", lambda" } else { "" });
        check(report, OP, &shape, |report| {
            let total = rows * n;
            let rh = rng.bf16s(total, 4.0, 0.0);
            let xh = rng.bf16s(total, 2.0, 0.0);
            let lh = rng.bf16s(n, 1.0, 0.0);
            let wh = rng.bf16s(n, 0.5, 1.0);
            let bh = rng.bf16s(n, 0.5, 0.0);
            let (mut res, x, l, w, b) = (up(dev, &rh)?, up(dev, &xh)?, up(dev, &lh)?, up(dev, &wh)?, up(dev, &bh)?);
            let mut out = poisoned(dev, total)?;
            let (lv, wv, bv) = (l.as_view(), w.as_view(), b.as_view());
            let mut ov = out.as_view_mut();
            let (w_arg, b_arg, out_arg, rms) = match norm {
                Norm::None => (None, None, None, false),
                Norm::Layer { bias } => (Some(&wv), bias.then_some(&bv), Some(&mut ov), false),
                Norm::Rms => (Some(&wv), None, Some(&mut ov), true),
            };
            let lambda = with_lambda.then_some(&lv);
            layernorm::residual_norm_bf16(
                dev,
                &mut res.as_view_mut(),
                &x.as_view(),
                lambda,
                w_arg,
                b_arg,
                out_arg,
                rows,
                n,
                EPS,
                rms,
            )?;
            // torch: residual + bf16(lambda * x), rounded to the bf16 residual stream.
            let want_res: Vec<f32> = (0..total)
                .map(|i| {
                    let xv = xh[i].to_f32();
                    let y = if with_lambda { round(lh[i % n].to_f32() * xv) } else { xv };
                    round(rh[i].to_f32() + y)
                })
                .collect();
            report.compare(OP, &format!("{shape}: residual"), &widen(&down(dev, &res)?), &want_res, 0.0, RTOL_1);
            let got = widen(&down(dev, &out)?);
            let rt = tensor(&[rows, n], want_res)?;
            let wt = tensor(&[n], widen(&wh))?;
            match norm {
                Norm::None => {
                    let written = got.iter().filter(|v| !v.is_nan()).count();
                    if written > 0 {
                        report.error(OP, &shape, format!("wrote {written} elements of an output it was not given"));
                    }
                }
                Norm::Layer { bias } => {
                    let bt = if bias { tensor(&[n], widen(&bh))? } else { tensor(&[n], vec![0.0; n])? };
                    let want = backend::layer_norm(&rt, &wt, &bt, EPS)?;
                    report.compare(OP, &format!("{shape}: out"), &got, want.f32s()?, ATOL_ROW, RTOL_1);
                }
                Norm::Rms => {
                    let want = backend::rms_norm(&rt, &wt, EPS)?;
                    report.compare(OP, &format!("{shape}: out"), &got, want.f32s()?, ATOL_ROW, RTOL_2);
                }
            }
            Ok(())
        });
    }
    check(report, OP, "bad arguments", |report| {
        let (mut res, x, w) = (
            up(dev, &rng.bf16s(64, 1.0, 0.0))?,
            up(dev, &rng.bf16s(64, 1.0, 0.0))?,
            up(dev, &rng.bf16s(16, 1.0, 0.0))?,
        );
        let mut out = poisoned(dev, 64)?;
        let (wv, mut ov) = (w.as_view(), out.as_view_mut());
        let got = layernorm::residual_norm_bf16(
            dev,
            &mut res.as_view_mut(),
            &x.as_view(),
            None,
            Some(&wv),
            Some(&wv),
            Some(&mut ov),
            4,
            16,
            EPS,
            true,
        );
        report.expect_err(OP, "RMSNorm with a bias", got);
        let got = layernorm::residual_norm_bf16(
            dev,
            &mut res.as_view_mut(),
            &x.slice(..60),
            None,
            None,
            None,
            None,
            4,
            16,
            EPS,
            false,
        );
        report.expect_err(OP, "x [60] for [4, 16]", got);
        Ok(())
    });
}

fn gelu_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    const OP: &str = "gelu_bias_bf16";
    // (rows, n, x element offset, amplitude of x)
    let cases: &[(usize, usize, usize, f32)] = &[
        (1, 1, 0, 4.0),
        (3, 7, 0, 4.0),
        (5, 72, 0, 4.0),
        (7 * 1025, 4096, 0, 4.0), // 300M fc1
        (1025, 12800, 0, 4.0),    // 6B fc1
        (7 * 256, 896, 0, 4.0),   // projector linear_1 into a 896-wide LLM
        (9, 1000, 1, 4.0),        // unaligned: scalar path
        (64, 1024, 0, 30.0),      // large magnitude: gelu(x) -> x or 0
        (150_001, 8, 0, 4.0),     // more row pairs than gridDim.y: the kernel strides
    ];
    for &(rows, n, off, amp) in cases {
        let shape = format!("[{rows}, {n}] +{off} |x|<{amp}");
        check(report, OP, &shape, |report| {
            let total = rows * n;
            let mut xh = vec![POISON_BF16; off];
            xh.extend(rng.bf16s(total, amp, 0.0));
            let bh = rng.bf16s(n, 1.0, 0.0);
            let (mut x, b) = (up(dev, &xh)?, up(dev, &bh)?);
            elementwise::gelu_bias_bf16(dev, &mut x.slice_mut(off..), &b.as_view(), rows, n)?;
            let got = widen(&down(dev, &x)?[off..]);
            let summed: Vec<f32> = (0..total).map(|i| round(xh[off + i].to_f32() + bh[i % n].to_f32())).collect();
            let mut want = tensor(&[rows, n], summed)?;
            backend::gelu_erf(&mut want)?;
            report.compare(OP, &shape, &got, want.f32s()?, ATOL_POINT, RTOL_1);
            Ok(())
        });
    }
    check(report, OP, "bad bias", |report| {
        let (mut x, b) = (up(dev, &rng.bf16s(64, 1.0, 0.0))?, up(dev, &rng.bf16s(15, 1.0, 0.0))?);
        let got = elementwise::gelu_bias_bf16(dev, &mut x.as_view_mut(), &b.as_view(), 4, 16);
        report.expect_err(OP, "[4, 16] bias [15]", got);
        Ok(())
    });
}

fn silu_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    const OP_F: &str = "silu_mul_fused_bf16";
    const OP: &str = "silu_mul_bf16";
    // (rows, n, fused)
    let cases: &[(usize, usize, bool)] = &[
        (1, 1, true),
        (3, 7, true),
        (5, 72, true),
        (2048, 4864, true), // InternVL3-1B (Qwen2.5-0.5B) prefill
        (512, 18944, true), // 8B
        (1, 18944, true),   // a decode step
        (3, 7, false),
        (100, 4864, false),
    ];
    for &(rows, n, fused) in cases {
        let op = if fused { OP_F } else { OP };
        let shape = format!("[{rows}, {n}]");
        check(report, op, &shape, |report| {
            let total = rows * n;
            let gh = rng.bf16s(total, 8.0, 0.0);
            let uh = rng.bf16s(total, 2.0, 0.0);
            let mut out = poisoned(dev, total)?;
            if fused {
                let gu: Vec<bf16> = (0..rows)
                    .flat_map(|r| gh[r * n..(r + 1) * n].iter().chain(&uh[r * n..(r + 1) * n]).copied())
                    .collect();
                let gu = up(dev, &gu)?;
                elementwise::silu_mul_fused_bf16(dev, &gu.as_view(), &mut out.as_view_mut(), rows, n)?;
            } else {
                let (g, u) = (up(dev, &gh)?, up(dev, &uh)?);
                elementwise::silu_mul_bf16(dev, &g.as_view(), &u.as_view(), &mut out.as_view_mut(), rows, n)?;
            }
            let got = widen(&down(dev, &out)?);
            let want = backend::silu_mul(&tensor(&[rows, n], widen(&gh))?, &tensor(&[rows, n], widen(&uh))?)?;
            report.compare(op, &shape, &got, want.f32s()?, ATOL_POINT, RTOL_2);
            Ok(())
        });
    }
    check(report, OP, "bad shapes", |report| {
        let gu = up(dev, &rng.bf16s(64, 1.0, 0.0))?;
        let mut out = poisoned(dev, 64)?;
        let got = elementwise::silu_mul_fused_bf16(dev, &gu.as_view(), &mut out.as_view_mut(), 4, 16);
        report.expect_err(OP_F, "gate_up [64] for [4, 2*16]", got);
        let got = elementwise::silu_mul_bf16(dev, &gu.as_view(), &gu.as_view(), &mut out.slice_mut(..32), 4, 16);
        report.expect_err(OP, "out [32] for [4, 16]", got);
        Ok(())
    });
}

fn patch_embed_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    const OP: &str = "patch_embed_bf16";
    const K: usize = patch_embed::CHANNELS * patch_embed::PATCH * patch_embed::PATCH;
    // (tiles, image size, h, pixel element offset: 1 takes the 2-byte load path)
    let cases: &[(usize, usize, usize, usize)] = &[
        (1, 14, 64, 0),
        (1, 28, 64, 0),
        (3, 56, 72, 0),
        (2, 28, 96, 0),
        (2, 56, 72, 1),
        (5, 42, 130, 0),   // g = 3: images straddle 64-patch tiles
        (7, 448, 1024, 0), // 300M, 7 tiles
        (1, 448, 3200, 0), // 6B
    ];
    for &(tiles, s, h, off) in cases {
        let shape = format!("{tiles} x [3, {s}, {s}] -> h {h} +{off}");
        check(report, OP, &shape, |report| {
            let g = s / patch_embed::PATCH;
            let tokens = g * g + 1;
            let npx = tiles * 3 * s * s;
            let mut ph = vec![POISON_BF16; off];
            ph.extend(rng.bf16s(npx, 2.0, 0.0));
            let wh = rng.bf16s(h * K, 0.05, 0.0);
            let bh = rng.bf16s(h, 0.5, 0.0);
            let ch = rng.bf16s(h, 1.0, 0.0);
            let posh = rng.bf16s(tokens * h, 1.0, 0.0);
            let zero_pos = vec![bf16::ZERO; tokens * h];
            let (px, w, b, cls) = (up(dev, &ph)?, up(dev, &wh)?, up(dev, &bh)?, up(dev, &ch)?);
            let (pos, pos0) = (up(dev, &posh)?, up(dev, &zero_pos)?);

            // Pass A, zero position embeddings: out = bf16(conv + b), checked against the CPU conv.
            let mut out_a = poisoned(dev, tiles * tokens * h)?;
            let pv = px.slice(off..);
            let (wv, bv, cv) = (w.as_view(), b.as_view(), cls.as_view());
            patch_embed::patch_embed_bf16(
                dev,
                &pv,
                &wv,
                &bv,
                &cv,
                &pos0.as_view(),
                &mut out_a.as_view_mut(),
                tiles,
                s,
                h,
            )?;
            let got_a = widen(&down(dev, &out_a)?);
            let want_a = backend::patch_embed(
                &tensor(&[tiles, 3, s, s], widen(&ph[off..]))?,
                &tensor(&[h, 3, patch_embed::PATCH, patch_embed::PATCH], widen(&wh))?,
                &tensor(&[h], widen(&bh))?,
                &tensor(&[h], widen(&ch))?,
                &tensor(&[tokens, h], vec![0.0; tokens * h])?,
            )?;
            report.compare(OP, &format!("{shape}: conv"), &got_a, want_a.f32s()?, ATOL_ROW, RTOL_1);

            // Pass B, real position embeddings: out = bf16(pass A + pos), CLS = bf16(cls + pos[0]).
            let mut out_b = poisoned(dev, tiles * tokens * h)?;
            patch_embed::patch_embed_bf16(
                dev,
                &pv,
                &wv,
                &bv,
                &cv,
                &pos.as_view(),
                &mut out_b.as_view_mut(),
                tiles,
                s,
                h,
            )?;
            let got_b = widen(&down(dev, &out_b)?);
            let want_b: Vec<f32> = (0..tiles * tokens * h)
                .map(|i| {
                    let (t, c) = (i / h % tokens, i % h);
                    let base = if t == 0 { ch[c].to_f32() } else { got_a[i] };
                    base + posh[t * h + c].to_f32()
                })
                .collect();
            report.compare(OP, &format!("{shape}: + pos"), &got_b, &want_b, ATOL_POINT, RTOL_1);
            Ok(())
        });
    }
    check(report, OP, "bad image size", |report| {
        let px = up(dev, &rng.bf16s(3 * 30 * 30, 1.0, 0.0))?;
        let w = up(dev, &rng.bf16s(8 * K, 1.0, 0.0))?;
        let v = up(dev, &rng.bf16s(8 * 5, 1.0, 0.0))?;
        let mut out = poisoned(dev, 8 * 5)?;
        let (bv, pv) = (v.slice(..8), v.slice(..8 * 5));
        let got = patch_embed::patch_embed_bf16(
            dev,
            &px.as_view(),
            &w.as_view(),
            &bv,
            &bv,
            &pv,
            &mut out.as_view_mut(),
            1,
            30,
            8,
        );
        report.expect_err(OP, "S = 30", got);
        Ok(())
    });
}

fn shuffle_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    const OP: &str = "shuffle_layernorm_bf16";
    // (tiles, g, h, x element offset)
    let cases: &[(usize, usize, usize, usize)] = &[
        (1, 2, 8, 0),
        (3, 4, 72, 0),
        (2, 6, 100, 0),   // h % 8 != 0: scalar path
        (1, 4, 64, 1),    // unaligned: scalar path
        (7, 32, 1024, 0), // 300M: [7, 1025, 1024] -> [1792, 4096]
        (2, 32, 3200, 0), // 6B: -> [512, 12800]
    ];
    for &(tiles, g, h, off) in cases {
        let shape = format!("[{tiles}, 1+{g}^2, {h}] +{off}");
        check(report, OP, &shape, |report| {
            let (tokens, rows) = (g * g + 1, tiles * (g / 2) * (g / 2));
            let mut xh = vec![POISON_BF16; off];
            xh.extend(rng.bf16s(tiles * tokens * h, 3.0, 0.5));
            let wh = rng.bf16s(4 * h, 0.5, 1.0);
            let bh = rng.bf16s(4 * h, 0.5, 0.0);
            let (x, w, b) = (up(dev, &xh)?, up(dev, &wh)?, up(dev, &bh)?);
            let mut out = poisoned(dev, rows * 4 * h)?;
            pixel_shuffle::shuffle_layernorm_bf16(
                dev,
                &x.slice(off..),
                &w.as_view(),
                &b.as_view(),
                &mut out.as_view_mut(),
                tiles,
                g,
                h,
                EPS_PROJ,
            )?;
            let got = widen(&down(dev, &out)?);
            // The CPU path of model/projector.rs: drop CLS, shuffle, LayerNorm over 4h.
            let patches: Vec<f32> =
                (0..tiles).flat_map(|t| widen(&xh[off + (t * tokens + 1) * h..off + (t + 1) * tokens * h])).collect();
            let shuffled = backend::pixel_shuffle(&tensor(&[tiles, g * g, h], patches)?)?.reshape([rows, 4 * h])?;
            let want = backend::layer_norm(
                &shuffled,
                &tensor(&[4 * h], widen(&wh))?,
                &tensor(&[4 * h], widen(&bh))?,
                EPS_PROJ,
            )?;
            report.compare(OP, &shape, &got, want.f32s()?, ATOL_ROW, RTOL_1);
            Ok(())
        });
    }
    check(report, OP, "odd grid", |report| {
        let x = up(dev, &rng.bf16s(10 * 8, 1.0, 0.0))?;
        let w = up(dev, &rng.bf16s(32, 1.0, 0.0))?;
        let mut out = poisoned(dev, 32)?;
        let got = pixel_shuffle::shuffle_layernorm_bf16(
            dev,
            &x.as_view(),
            &w.as_view(),
            &w.as_view(),
            &mut out.as_view_mut(),
            1,
            3,
            8,
            EPS_PROJ,
        );
        report.expect_err(OP, "g = 3", got);
        Ok(())
    });
}

fn fill_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    const OP: &str = "fill_uniform_bf16";
    // (n, amp, offset, view offset)
    let cases: &[(usize, f32, f32, usize)] = &[
        (1, 1.0, 0.0, 0),
        (13, 0.02, 0.0, 0),
        (1_000_003, 0.02, 0.0, 0),
        (1 << 22, 1.0, 3.0, 0),
        (1001, 0.5, -1.0, 3),
    ];
    for &(n, amp, offset, off) in cases {
        let shape = format!("[{n}] ±{amp} +{offset} at +{off}");
        check(report, OP, &shape, |report| {
            let seed = rng.next_u64();
            let mut a = poisoned(dev, off + n)?;
            let mut b = poisoned(dev, off + n)?;
            fill::fill_uniform_bf16(dev, &mut a.slice_mut(off..), seed, amp, offset)?;
            fill::fill_uniform_bf16(dev, &mut b.slice_mut(off..), seed, amp, offset)?;
            let (ga, gb) = (down(dev, &a)?, down(dev, &b)?);
            let host = fill::uniform_host(seed, n, amp, offset);
            // Bit-identical: same stream, same f32 operations, same rounding. Before the view stays poison.
            report.compare(OP, &format!("{shape}: repeat"), &widen(&ga[off..]), &widen(&gb[off..]), 0.0, 0.0);
            report.compare(OP, &format!("{shape}: host twin"), &widen(&ga[off..]), &widen(&host), 0.0, 0.0);
            if ga[..off].iter().any(|v| v.to_bits() != POISON_BF16.to_bits()) {
                report.error(OP, &shape, "wrote before the start of its view");
            }
            let vals = widen(&ga[off..]);
            // [offset - amp, offset + amp) widened by the final rounding to bf16.
            let slack = (offset.abs() + amp) * U as f32;
            let range = offset - amp - slack..=offset + amp + slack;
            let out_of_range = vals.iter().filter(|&&v| !range.contains(&v)).count();
            report.compare(
                OP,
                &format!("{shape}: values outside offset ± amp"),
                &[out_of_range as f32],
                &[0.0],
                0.0,
                0.0,
            );
            if n >= 1 << 20 {
                // The mean of n uniforms has standard deviation amp / sqrt(3n); allow 6 of them.
                let mean = vals.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
                let sigma = amp as f64 / (3.0 * n as f64).sqrt();
                report.compare(OP, &format!("{shape}: mean"), &[mean as f32], &[offset], 6.0 * sigma, 0.0);
            }
            Ok(())
        });
    }
    check(report, OP, "non-finite amp", |report| {
        let mut a = poisoned(dev, 8)?;
        report.expect_err(OP, "amp NaN", fill::fill_uniform_bf16(dev, &mut a.as_view_mut(), 1, f32::NAN, 0.0));
        Ok(())
    });

    const OP_C: &str = "f32_to_bf16";
    for &(n, off) in &[(1usize, 0usize), (37, 0), (1 << 20, 0), (1001, 1)] {
        let shape = format!("[{n}] +{off}");
        check(report, OP_C, &shape, |report| {
            // Magnitudes from 2^-30 to 2^30, plus zeros and infinities: the rounding must be torch's RNE.
            let mut xs: Vec<f32> = (0..off + n).map(|i| rng.sym(1.0) * 2f32.powi((i % 61) as i32 - 30)).collect();
            for (i, special) in [0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY].into_iter().enumerate() {
                if off + i < xs.len() {
                    xs[off + i] = special;
                }
            }
            let input = buffer::upload(dev, &xs)?;
            let mut out = poisoned(dev, n)?;
            fill::f32_to_bf16(dev, &input.slice(off..), &mut out.as_view_mut())?;
            let want: Vec<f32> = xs[off..].iter().map(|&v| round(v)).collect();
            report.compare(OP_C, &shape, &widen(&down(dev, &out)?), &want, 0.0, 0.0);
            Ok(())
        });
    }
    check(report, OP_C, "length mismatch", |report| {
        let input = buffer::upload(dev, &[1.0f32; 9])?;
        let mut out = poisoned(dev, 8)?;
        report.expect_err(OP_C, "in [9] out [8]", fill::f32_to_bf16(dev, &input.as_view(), &mut out.as_view_mut()));
        Ok(())
    });
}

/// A device buffer of `n` random bf16 values, filled on the device.
fn random_dev(dev: &CudaDevice, n: usize, seed: u64, amp: f32, offset: f32) -> backend::cuda::Result<CudaSlice<bf16>> {
    let mut buf = buffer::zeros::<bf16>(dev, n)?;
    fill::fill_uniform_bf16(dev, &mut buf.as_view_mut(), seed, amp, offset)?;
    Ok(buf)
}

/// Large launches of the memory-bound kernels at the vision tower's real sizes, for GB/s against the copy
/// bandwidth. `bytes` counts the activation traffic (every read and write of a `[rows, n]` operand once);
/// the `[n]` parameter vectors are left out (they stay in L2).
pub fn bench_cases<'a>(dev: &'a CudaDevice) -> backend::cuda::Result<Vec<KernelCase<'a>>> {
    const BF16: f64 = 2.0;
    let mut cases: Vec<KernelCase<'a>> = Vec::new();
    let mut seed = 0x5EED_u64;
    let mut next_seed = || {
        seed = seed.wrapping_add(1);
        seed
    };

    // (label, rows, n): the 300M and 6B towers over 7 tiles of 1025 tokens.
    for (label, rows, n) in [("300M", 7 * 1025, 1024), ("6B", 7 * 1025, 3200)] {
        let elems = (rows * n) as f64;
        let x = random_dev(dev, rows * n, next_seed(), 2.0, 0.0)?;
        let w = random_dev(dev, n, next_seed(), 0.5, 1.0)?;
        let b = random_dev(dev, n, next_seed(), 0.5, 0.0)?;
        let mut out = buffer::zeros::<bf16>(dev, rows * n)?;
        cases.push(KernelCase {
            op: "layernorm_bf16".into(),
            shape: format!("{label} [{rows}, {n}]"),
            bytes: 2.0 * elems * BF16,
            flops: 0.0,
            launch: Box::new(move || {
                layernorm::layernorm_bf16(
                    dev,
                    &x.as_view(),
                    n,
                    &w.as_view(),
                    &b.as_view(),
                    &mut out.as_view_mut(),
                    n,
                    rows,
                    n,
                    EPS,
                )
            }),
        });

        let mut res = random_dev(dev, rows * n, next_seed(), 2.0, 0.0)?;
        let x = random_dev(dev, rows * n, next_seed(), 2.0, 0.0)?;
        // A small layer scale keeps the residual bounded over thousands of timed launches.
        let lambda = random_dev(dev, n, next_seed(), 1e-3, 0.0)?;
        let w = random_dev(dev, n, next_seed(), 0.5, 1.0)?;
        let b = random_dev(dev, n, next_seed(), 0.5, 0.0)?;
        let mut out = buffer::zeros::<bf16>(dev, rows * n)?;
        let rms = label == "6B";
        cases.push(KernelCase {
            op: "residual_norm_bf16".into(),
            shape: format!("{label} [{rows}, {n}] {}", if rms { "RMSNorm" } else { "LayerNorm" }),
            bytes: 4.0 * elems * BF16,
            flops: 0.0,
            launch: Box::new(move || {
                let (lv, wv, bv) = (lambda.as_view(), w.as_view(), b.as_view());
                let mut ov = out.as_view_mut();
                layernorm::residual_norm_bf16(
                    dev,
                    &mut res.as_view_mut(),
                    &x.as_view(),
                    Some(&lv),
                    Some(&wv),
                    (!rms).then_some(&bv),
                    Some(&mut ov),
                    rows,
                    n,
                    EPS,
                    rms,
                )
            }),
        });
    }

    // fc1 outputs of the two towers (intermediate 4096 and 12800).
    for (label, rows, n) in [("300M fc1", 7 * 1025, 4096), ("6B fc1", 7 * 1025, 12800)] {
        let mut x = random_dev(dev, rows * n, next_seed(), 3.0, 0.0)?;
        let bias = random_dev(dev, n, next_seed(), 0.1, 0.0)?;
        cases.push(KernelCase {
            op: "gelu_bias_bf16".into(),
            shape: format!("{label} [{rows}, {n}]"),
            bytes: 2.0 * (rows * n) as f64 * BF16,
            flops: 0.0,
            launch: Box::new(move || elementwise::gelu_bias_bf16(dev, &mut x.as_view_mut(), &bias.as_view(), rows, n)),
        });
    }

    // Qwen2.5 MLPs at a 4096-token prefill (InternVL3-1B: 4864, 8B: 18944).
    for (label, rows, n) in [("1B", 4096, 4864), ("8B", 4096, 18944)] {
        let gate_up = random_dev(dev, rows * 2 * n, next_seed(), 4.0, 0.0)?;
        let mut out = buffer::zeros::<bf16>(dev, rows * n)?;
        cases.push(KernelCase {
            op: "silu_mul_fused_bf16".into(),
            shape: format!("{label} [{rows}, 2*{n}]"),
            bytes: 3.0 * (rows * n) as f64 * BF16,
            flops: 0.0,
            launch: Box::new(move || {
                elementwise::silu_mul_fused_bf16(dev, &gate_up.as_view(), &mut out.as_view_mut(), rows, n)
            }),
        });
    }

    for (label, tiles, g, h) in [("300M", 7, 32, 1024), ("6B", 7, 32, 3200)] {
        let x = random_dev(dev, tiles * (g * g + 1) * h, next_seed(), 2.0, 0.0)?;
        let w = random_dev(dev, 4 * h, next_seed(), 0.5, 1.0)?;
        let b = random_dev(dev, 4 * h, next_seed(), 0.5, 0.0)?;
        let rows = tiles * (g / 2) * (g / 2);
        let mut out = buffer::zeros::<bf16>(dev, rows * 4 * h)?;
        cases.push(KernelCase {
            op: "shuffle_layernorm_bf16".into(),
            shape: format!("{label} [{tiles}, 1+{g}^2, {h}] -> [{rows}, {}]", 4 * h),
            bytes: 2.0 * (rows * 4 * h) as f64 * BF16,
            flops: 0.0,
            launch: Box::new(move || {
                pixel_shuffle::shuffle_layernorm_bf16(
                    dev,
                    &x.as_view(),
                    &w.as_view(),
                    &b.as_view(),
                    &mut out.as_view_mut(),
                    tiles,
                    g,
                    h,
                    EPS_PROJ,
                )
            }),
        });
    }

    // Compute-bound, for TFLOP/s: the conv as a GEMM of [tiles * 1024, 588] x [588, h].
    for (label, tiles, s, h) in [("300M", 7, 448, 1024), ("6B", 7, 448, 3200)] {
        const K: usize = patch_embed::CHANNELS * patch_embed::PATCH * patch_embed::PATCH;
        let g = s / patch_embed::PATCH;
        let tokens = g * g + 1;
        let px = random_dev(dev, tiles * 3 * s * s, next_seed(), 2.0, 0.0)?;
        let w = random_dev(dev, h * K, next_seed(), 0.05, 0.0)?;
        let b = random_dev(dev, h, next_seed(), 0.5, 0.0)?;
        let cls = random_dev(dev, h, next_seed(), 1.0, 0.0)?;
        let pos = random_dev(dev, tokens * h, next_seed(), 1.0, 0.0)?;
        let mut out = buffer::zeros::<bf16>(dev, tiles * tokens * h)?;
        cases.push(KernelCase {
            op: "patch_embed_bf16".into(),
            shape: format!("{label} {tiles} x [3, {s}, {s}] -> [{tiles}, {tokens}, {h}]"),
            bytes: ((tiles * 3 * s * s) + h * K + tokens * h + tiles * tokens * h) as f64 * BF16,
            flops: 2.0 * (tiles * g * g) as f64 * h as f64 * K as f64,
            launch: Box::new(move || {
                patch_embed::patch_embed_bf16(
                    dev,
                    &px.as_view(),
                    &w.as_view(),
                    &b.as_view(),
                    &cls.as_view(),
                    &pos.as_view(),
                    &mut out.as_view_mut(),
                    tiles,
                    s,
                    h,
                )
            }),
        });
    }

    let n = 1usize << 28;
    let mut big = buffer::zeros::<bf16>(dev, n)?;
    cases.push(KernelCase {
        op: "fill_uniform_bf16".into(),
        shape: format!("[{n}]"),
        bytes: n as f64 * BF16,
        flops: 0.0,
        launch: Box::new(move || fill::fill_uniform_bf16(dev, &mut big.as_view_mut(), 7, 0.02, 0.0)),
    });
    Ok(cases)
}
