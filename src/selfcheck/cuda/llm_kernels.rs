//! Self-checks of the language-model step kernels (rope_kv.cu, embed.cu, sampling.cu) against their CPU twins,
//! and the cases `facellm bench` times.
//!
//! - `qkv_bias_rope_write_kv`: the reference adds the bias to the same bf16 GEMM output in f32, rounds to bf16
//!   (as the kernel and HF's bf16 Linear do), runs `backend::cpu::rope` on it and rounds once to bf16. The
//!   kernel evaluates the same f32 formula with the same f32 angle and correctly rounded cos/sin, so q and k
//!   should agree to the bit; the tolerance allows one bf16 ulp (rtol 2^-7) for a last-ulp cos/sin difference
//!   moving a rounding, and atol 1e-5 for outputs near zero. v is a copy of `bf16(v + b)`: exact. Positions
//!   are scattered up to 32767 (fp32 angles near 3e4 rad), slots are a random permutation of a NaN-poisoned
//!   cache with some tokens skipped (-1): written slots are compared, every other slot must stay NaN.
//! - `embedding_gather`, `scatter_rows`: copies, exact; a bad id must give zeros and a bad row must be skipped,
//!   each setting its bit in the error word.
//! - `argmax_rows`: exact ids against the twin (first index on ties, NaN largest) and the CPU backend's argmax
//!   on NaN-free rows; 151,936- and 151,674-wide rows (the latter leaves every other f32 row misaligned).
//! - `sample_rows`: exact ids against the integer-exact CPU twin in backend/cuda/sampling.rs, over mixed
//!   per-row parameters, tie-heavy rows (the top-p tie cut), bf16 logits, awkward vocab sizes, and the step
//!   counter's advance; greedy rows (temperature 0, top_k 1 on tie-free rows) must equal `argmax_rows`. The
//!   mixed 151k-wide batches send some rows down the kernel's shared-memory fast path and others (ties at the
//!   top-k boundary, flat rows under top-p, top_k 20000) down its global path; vocab 1000 always fits the fast
//!   path; the uniform 64-row batches are a real decode batch (and what to time with ncu).

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use super::KernelCase;
use crate::backend::cuda::buffer;
use crate::backend::cuda::embed::{self, ERR_BAD_KV_SLOT, ERR_BAD_SCATTER_ROW, ERR_BAD_TOKEN_ID};
use crate::backend::cuda::rope_kv::{self, RopeKvInputs, RopeKvOutputs, RopeKvShape};
use crate::backend::cuda::sampling::{self, LogitElem, RowSampling, SampleParams};
use crate::backend::cuda::{CudaDevice, Result};
use crate::selfcheck::{widen, Report, Rng};
use crate::tensor::Tensor;

const QWEN_THETA: f32 = 1_000_000.0;
const VOCAB_PADDED: usize = 151_936;
const VOCAB: usize = 151_674;
const BLOCK_SIZE: usize = 16;

use super::{check, down, up, verdict};

fn zeros<T: DeviceRepr + ValidAsZeroBits>(dev: &CudaDevice, n: usize) -> crate::Result<CudaSlice<T>> {
    Ok(buffer::zeros(dev, n)?)
}

fn round(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

fn ids_f32(ids: &[u32]) -> Vec<f32> {
    ids.iter().map(|&i| i as f32).collect()
}

/// HF's `1 / theta^(2i/d)` in f32 (TextParams::inv_freq without scaling).
fn inv_freq(d: usize) -> Vec<f32> {
    (0..d / 2).map(|i| 1.0f32 / QWEN_THETA.powf((2 * i) as f32 / d as f32)).collect()
}

/// A random permutation of `0..n`.
fn permutation(rng: &mut Rng, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

// ---- qkv_bias_rope_write_kv ---------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct RopeCase {
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    bias_amp: f32,
    bias: bool,
    kv_out: bool,
    bad_slots: bool,
}

fn rope_case(dev: &CudaDevice, report: &mut Report, rng: &mut Rng, c: RopeCase) {
    let op = "qkv_bias_rope_write_kv";
    let shape = format!(
        "t {} hq {} hk {} d {}{}{}{}",
        c.t,
        c.heads,
        c.kv_heads,
        c.d,
        if c.bias { format!(" bias ±{}", c.bias_amp) } else { " no bias".into() },
        if c.kv_out { " +k/v out" } else { "" },
        if c.bad_slots { " bad slots" } else { "" }
    );
    check(report, op, &shape, |report| {
        let s = RopeKvShape { tokens: c.t, heads: c.heads, kv_heads: c.kv_heads, head_dim: c.d };
        let (t, hq, hk, d) = (c.t, c.heads, c.kv_heads, c.d);
        let width = s.qkv_width();
        let qkv = rng.bf16s(t * width, 2.0, 0.0);
        let bias = rng.bf16s(width, c.bias_amp, 0.0);
        let positions: Vec<i32> = (0..t)
            .map(|_| match rng.below(3) {
                0 => rng.below(64) as i32,
                1 => (30_000 + rng.below(2768)) as i32,
                _ => rng.below(32_768) as i32,
            })
            .collect();
        let freqs = inv_freq(d);
        let num_blocks = 2 * t.div_ceil(BLOCK_SIZE) + 3;
        let num_slots = num_blocks * BLOCK_SIZE;
        let perm = permutation(rng, num_slots);
        let mut slots: Vec<i32> = (0..t).map(|i| if i % 5 == 2 { -1 } else { perm[i] as i32 }).collect();
        if c.bad_slots {
            slots[0] = num_slots as i32;
            if t > 1 {
                slots[1] = -7;
            }
        }
        let row = hk * d;

        let (d_qkv, d_bias, d_pos, d_freq, d_slots) =
            (up(dev, &qkv)?, up(dev, &bias)?, up(dev, &positions)?, up(dev, &freqs)?, up(dev, &slots)?);
        let mut d_q = buffer::poisoned_bf16(dev, t * hq * d)?;
        let mut d_kc = buffer::poisoned_bf16(dev, num_slots * row)?;
        let mut d_vc = buffer::poisoned_bf16(dev, num_slots * row)?;
        let mut d_ko = buffer::poisoned_bf16(dev, t * row)?;
        let mut d_vo = buffer::poisoned_bf16(dev, t * row)?;
        let mut d_err = zeros::<u32>(dev, 1)?;
        {
            let (qkv_v, bias_v, pos_v, freq_v, slots_v) =
                (d_qkv.as_view(), d_bias.as_view(), d_pos.as_view(), d_freq.as_view(), d_slots.as_view());
            let inp = RopeKvInputs {
                qkv: &qkv_v,
                bias: c.bias.then_some(&bias_v),
                positions: &pos_v,
                inv_freq: &freq_v,
                slots: &slots_v,
            };
            let (mut q_v, mut kc_v, mut vc_v) = (d_q.as_view_mut(), d_kc.as_view_mut(), d_vc.as_view_mut());
            let (mut ko_v, mut vo_v, mut err_v) = (d_ko.as_view_mut(), d_vo.as_view_mut(), d_err.as_view_mut());
            let mut out = RopeKvOutputs {
                q: &mut q_v,
                k_cache: &mut kc_v,
                v_cache: &mut vc_v,
                kv: if c.kv_out { Some((&mut ko_v, &mut vo_v)) } else { None },
                err: &mut err_v,
            };
            rope_kv::qkv_bias_rope_write_kv_bf16(dev, s, &inp, &mut out)?;
        }
        let (q, kc, vc) = (down(dev, &d_q)?, down(dev, &d_kc)?, down(dev, &d_vc)?);
        let (ko, vo, err) = (down(dev, &d_ko)?, down(dev, &d_vo)?, down(dev, &d_err)?);

        // Reference: bf16(x + b), then the CPU rope on q and k.
        let biased = |tok: usize, col: usize| -> f32 {
            let x = qkv[tok * width + col].to_f32();
            if c.bias {
                round(x + bias[col].to_f32())
            } else {
                x
            }
        };
        let take = |first_col: usize, cols: usize| -> Vec<f32> {
            (0..t)
                .flat_map(|tok| (first_col..first_col + cols).map(move |col| (tok, col)))
                .map(|(a, b)| biased(a, b))
                .collect()
        };
        let pos_usize: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
        let mut q_ref = Tensor::from_f32([t, hq, d], take(0, hq * d))?;
        let mut k_ref = Tensor::from_f32([t, hk, d], take(hq * d, row))?;
        crate::backend::cpu::rope::rope(&mut q_ref, &pos_usize, &freqs)?;
        crate::backend::cpu::rope::rope(&mut k_ref, &pos_usize, &freqs)?;
        let q_want: Vec<f32> = q_ref.f32s()?.iter().map(|&v| round(v)).collect();
        let k_want: Vec<f32> = k_ref.f32s()?.iter().map(|&v| round(v)).collect();
        let v_want = take(hq * d + row, row);

        report.compare(&format!("{op} q"), &shape, &widen(&q), &q_want, 1e-5, 2.0 / 256.0);
        let written: Vec<(usize, usize)> = (0..t)
            .filter(|&i| slots[i] >= 0 && (slots[i] as usize) < num_slots)
            .map(|i| (i, slots[i] as usize))
            .collect();
        let gather = |cache: &[bf16]| -> Vec<f32> {
            written.iter().flat_map(|&(_, s)| cache[s * row..(s + 1) * row].iter().map(|v| v.to_f32())).collect()
        };
        let pick = |want: &[f32]| -> Vec<f32> {
            written.iter().flat_map(|&(i, _)| want[i * row..(i + 1) * row].iter().copied()).collect()
        };
        report.compare(&format!("{op} k cache"), &shape, &gather(&kc), &pick(&k_want), 1e-5, 2.0 / 256.0);
        report.compare(&format!("{op} v cache"), &shape, &gather(&vc), &pick(&v_want), 0.0, 0.0);
        let mut is_written = vec![false; num_slots];
        for &(_, s) in &written {
            is_written[s] = true;
        }
        let stray = (0..num_slots)
            .filter(|&s| !is_written[s])
            .map(|s| {
                kc[s * row..(s + 1) * row].iter().chain(&vc[s * row..(s + 1) * row]).filter(|v| !v.is_nan()).count()
            })
            .sum::<usize>();
        verdict(
            report,
            &format!("{op} untouched slots stay NaN"),
            &shape,
            stray == 0,
            format!("{stray} elements written outside the {} mapped slots of {num_slots}", written.len()),
        );
        if c.kv_out {
            report.compare(&format!("{op} k out"), &shape, &widen(&ko), &k_want, 1e-5, 2.0 / 256.0);
            report.compare(&format!("{op} v out"), &shape, &widen(&vo), &v_want, 0.0, 0.0);
        } else {
            let touched = ko.iter().chain(&vo).filter(|v| !v.is_nan()).count();
            verdict(report, &format!("{op} no k/v out"), &shape, touched == 0, format!("{touched} elements written"));
        }
        let want_err = if c.bad_slots { ERR_BAD_KV_SLOT } else { 0 };
        verdict(
            report,
            &format!("{op} error word"),
            &shape,
            err[0] == want_err,
            format!("error word {:#x}, expected {want_err:#x}", err[0]),
        );
        Ok(())
    });
}

fn rope_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    let base =
        RopeCase { t: 1, heads: 14, kv_heads: 2, d: 64, bias_amp: 1.0, bias: true, kv_out: false, bad_slots: false };
    for (heads, kv_heads, d) in [(14, 2, 64), (28, 4, 128)] {
        for t in [1, 3, 17, 333] {
            let c = RopeCase { t, heads, kv_heads, d, kv_out: t == 17, ..base };
            rope_case(dev, report, rng, c);
        }
        // Qwen2's k biases reach tens; no bias at all; out-of-range slots.
        rope_case(dev, report, rng, RopeCase { t: 33, heads, kv_heads, d, bias_amp: 40.0, ..base });
        rope_case(dev, report, rng, RopeCase { t: 9, heads, kv_heads, d, bias: false, kv_out: true, ..base });
        rope_case(dev, report, rng, RopeCase { t: 5, heads, kv_heads, d, bad_slots: true, ..base });
    }
    let op = "qkv_bias_rope_write_kv";
    let refuse = |s: RopeKvShape, slots_len: usize| -> Result<()> {
        let w = s.qkv_width();
        let qkv = buffer::zeros::<bf16>(dev, s.tokens * w)?;
        let pos = buffer::zeros::<i32>(dev, s.tokens)?;
        let freq = buffer::zeros::<f32>(dev, s.head_dim / 2)?;
        let slots = buffer::zeros::<i32>(dev, slots_len)?;
        let mut q = buffer::zeros::<bf16>(dev, s.tokens * s.heads * s.head_dim)?;
        let mut kc = buffer::zeros::<bf16>(dev, 64 * s.kv_heads * s.head_dim)?;
        let mut vc = buffer::zeros::<bf16>(dev, 64 * s.kv_heads * s.head_dim)?;
        let mut err = buffer::zeros::<u32>(dev, 1)?;
        let (qkv_v, pos_v, freq_v, slots_v) = (qkv.as_view(), pos.as_view(), freq.as_view(), slots.as_view());
        let inp = RopeKvInputs { qkv: &qkv_v, bias: None, positions: &pos_v, inv_freq: &freq_v, slots: &slots_v };
        let (mut q_v, mut kc_v, mut vc_v, mut err_v) =
            (q.as_view_mut(), kc.as_view_mut(), vc.as_view_mut(), err.as_view_mut());
        let mut out = RopeKvOutputs { q: &mut q_v, k_cache: &mut kc_v, v_cache: &mut vc_v, kv: None, err: &mut err_v };
        rope_kv::qkv_bias_rope_write_kv_bf16(dev, s, &inp, &mut out)
    };
    let s = RopeKvShape { tokens: 4, heads: 14, kv_heads: 2, head_dim: 80 };
    report.expect_err(op, "head_dim 80", refuse(s, 4));
    let s = RopeKvShape { tokens: 4, heads: 14, kv_heads: 2, head_dim: 64 };
    report.expect_err(op, "slots [3] for 4 tokens", refuse(s, 3));
}

// ---- embedding_gather / scatter_rows ----------------------------------------------------------------------------

fn gather_case(dev: &CudaDevice, report: &mut Report, rng: &mut Rng, vocab: usize, d: usize, t: usize, misalign: bool) {
    let op = "embedding_gather_bf16";
    let bad = t >= 3;
    let shape = format!(
        "vocab {vocab} d {d} t {t}{}{}",
        if misalign { " misaligned" } else { "" },
        if bad { " +bad id" } else { "" }
    );
    check(report, op, &shape, |report| {
        let off = usize::from(misalign);
        let table = rng.bf16s(vocab * d + off, 1.0, 0.0);
        let mut ids: Vec<u32> = (0..t).map(|_| rng.below(vocab) as u32).collect();
        if bad {
            ids[t / 2] = (vocab + 5) as u32;
            ids[t - 1] = vocab as u32 - 1;
        }
        let (d_table, d_ids) = (up(dev, &table)?, up(dev, &ids)?);
        let mut d_out = buffer::poisoned_bf16(dev, t * d)?;
        let mut d_err = zeros::<u32>(dev, 1)?;
        embed::embedding_gather_bf16(
            dev,
            &d_ids.as_view(),
            &d_table.slice(off..),
            vocab,
            d,
            &mut d_out.as_view_mut(),
            &mut d_err.as_view_mut(),
        )?;
        let (out, err) = (down(dev, &d_out)?, down(dev, &d_err)?);
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&id| {
                let id = id as usize;
                (0..d).map(move |j| if id < vocab { Some(off + id * d + j) } else { None })
            })
            .map(|at| at.map_or(0.0, |a| table[a].to_f32()))
            .collect();
        report.compare(op, &shape, &widen(&out), &want, 0.0, 0.0);
        let want_err = if bad { ERR_BAD_TOKEN_ID } else { 0 };
        verdict(
            report,
            &format!("{op} error word"),
            &shape,
            err[0] == want_err,
            format!("{:#x}, expected {want_err:#x}", err[0]),
        );
        Ok(())
    });
}

fn scatter_case(dev: &CudaDevice, report: &mut Report, rng: &mut Rng, t: usize, d: usize, k: usize, bad: bool) {
    let op = "scatter_rows_bf16";
    let shape = format!("t {t} d {d} k {k}{}", if bad { " +bad rows" } else { "" });
    check(report, op, &shape, |report| {
        let mut rows: Vec<i32> = permutation(rng, t)[..k].iter().map(|&r| r as i32).collect();
        if bad {
            rows.push(t as i32);
            rows.push(-1);
        }
        let dst = rng.bf16s(t * d, 1.0, 0.0);
        let src = rng.bf16s(rows.len() * d, 1.0, 0.0);
        let (d_rows, d_src) = (up(dev, &rows)?, up(dev, &src)?);
        let mut d_dst = up(dev, &dst)?;
        let mut d_err = zeros::<u32>(dev, 1)?;
        embed::scatter_rows_bf16(
            dev,
            &d_rows.as_view(),
            &d_src.as_view(),
            &mut d_dst.as_view_mut(),
            t,
            d,
            &mut d_err.as_view_mut(),
        )?;
        let (got, err) = (down(dev, &d_dst)?, down(dev, &d_err)?);
        let mut want = widen(&dst);
        for (i, &r) in rows.iter().enumerate() {
            if r >= 0 && (r as usize) < t {
                let r = r as usize;
                for j in 0..d {
                    want[r * d + j] = src[i * d + j].to_f32();
                }
            }
        }
        report.compare(op, &shape, &widen(&got), &want, 0.0, 0.0);
        let want_err = if bad { ERR_BAD_SCATTER_ROW } else { 0 };
        verdict(
            report,
            &format!("{op} error word"),
            &shape,
            err[0] == want_err,
            format!("{:#x}, expected {want_err:#x}", err[0]),
        );
        Ok(())
    });
}

fn embed_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    gather_case(dev, report, rng, 5003, 896, 1, false);
    gather_case(dev, report, rng, 5003, 896, 333, false);
    gather_case(dev, report, rng, 1000, 3584, 17, false);
    gather_case(dev, report, rng, 777, 896, 17, true);
    gather_case(dev, report, rng, 50, 36, 3, false);
    scatter_case(dev, report, rng, 300, 896, 256, false);
    scatter_case(dev, report, rng, 40, 3584, 3, true);
    scatter_case(dev, report, rng, 9, 36, 1, false);
    let refuse_gather = || -> Result<()> {
        let ids = buffer::zeros::<u32>(dev, 4)?;
        let table = buffer::zeros::<bf16>(dev, 10 * 8)?;
        let mut out = buffer::zeros::<bf16>(dev, 31)?;
        let mut err = buffer::zeros::<u32>(dev, 1)?;
        embed::embedding_gather_bf16(
            dev,
            &ids.as_view(),
            &table.as_view(),
            10,
            8,
            &mut out.as_view_mut(),
            &mut err.as_view_mut(),
        )
    };
    report.expect_err("embedding_gather_bf16", "out [31] for 4 ids of 8", refuse_gather());
    let refuse_scatter = || -> Result<()> {
        let rows = buffer::zeros::<i32>(dev, 2)?;
        let src = buffer::zeros::<bf16>(dev, 3 * 8)?;
        let mut dst = buffer::zeros::<bf16>(dev, 10 * 8)?;
        let mut err = buffer::zeros::<u32>(dev, 1)?;
        embed::scatter_rows_bf16(
            dev,
            &rows.as_view(),
            &src.as_view(),
            &mut dst.as_view_mut(),
            10,
            8,
            &mut err.as_view_mut(),
        )
    };
    report.expect_err("scatter_rows_bf16", "src of 3 rows for 2 row ids", refuse_scatter());
}

// ---- argmax_rows ----------------------------------------------------------------------------------------------

/// Rows of logits with planted cases by row index: 0 random, 1 a tie for the maximum, 2 constant, 3 a NaN,
/// 4 -0 before +0 as the maximum, then random.
fn logit_rows(rng: &mut Rng, rows: usize, vocab: usize, amp: f32) -> Vec<f32> {
    let mut x: Vec<f32> = (0..rows * vocab).map(|_| rng.sym(amp)).collect();
    for r in 0..rows {
        let row = &mut x[r * vocab..(r + 1) * vocab];
        let (i, j) = (rng.below(vocab), rng.below(vocab));
        match r {
            1 => {
                row[i] = 2.0 * amp;
                row[j] = 2.0 * amp;
            }
            2 => row.fill(0.5),
            3 => {
                row[i] = f32::NAN;
                row[j] = 3.0 * amp;
            }
            4 => {
                row.iter_mut().for_each(|v| *v = -v.abs() - 1.0);
                row[i.min(j)] = -0.0;
                row[i.max(j)] = 0.0;
            }
            _ => {}
        }
    }
    x
}

fn argmax_case<T: LogitElem>(
    dev: &CudaDevice,
    report: &mut Report,
    rng: &mut Rng,
    rows: usize,
    vocab: usize,
    conv: fn(f32) -> T,
    name: &str,
) {
    let op = format!("argmax_rows_{name}");
    let shape = format!("{rows} x {vocab}");
    check(report, &op, &shape, |report| {
        let host: Vec<T> = logit_rows(rng, rows, vocab, 8.0).into_iter().map(conv).collect();
        let wide: Vec<f32> = host.iter().map(|v| v.to_f32()).collect();
        let d_logits = up(dev, &host)?;
        let mut d_out = up(dev, &vec![u32::MAX; rows])?;
        sampling::argmax_rows(dev, &d_logits.as_view(), rows, vocab, &mut d_out.as_view_mut())?;
        let got = down(dev, &d_out)?;
        let want: Vec<u32> = wide.chunks_exact(vocab).map(sampling::argmax_twin).collect();
        // The twin agrees with the CPU backend wherever the backend accepts the row (no NaN).
        for (r, row) in wide.chunks_exact(vocab).enumerate() {
            if let Ok(i) = crate::backend::argmax(row) {
                if i as u32 != want[r] {
                    return Err(crate::Error::Invalid(format!(
                        "twin argmax {} != backend argmax {i} on row {r}",
                        want[r]
                    )));
                }
            }
        }
        report.compare(&op, &shape, &ids_f32(&got), &ids_f32(&want), 0.0, 0.0);
        Ok(())
    });
}

fn argmax_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    let f = |v: f32| v;
    let b = bf16::from_f32;
    argmax_case(dev, report, rng, 7, VOCAB_PADDED, f, "f32");
    argmax_case(dev, report, rng, 7, VOCAB, f, "f32");
    argmax_case(dev, report, rng, 6, VOCAB, b, "bf16");
    argmax_case(dev, report, rng, 6, VOCAB_PADDED, b, "bf16");
    for vocab in [1, 7, 33, 1000] {
        argmax_case(dev, report, rng, 6, vocab, f, "f32");
        argmax_case(dev, report, rng, 5, vocab, b, "bf16");
    }
    let refuse = || -> Result<()> {
        let x = buffer::zeros::<f32>(dev, 2 * 10)?;
        let mut out = buffer::zeros::<u32>(dev, 1)?;
        sampling::argmax_rows(dev, &x.as_view(), 2, 10, &mut out.as_view_mut())
    };
    report.expect_err("argmax_rows_f32", "out [1] for 2 rows", refuse());
}

// ---- sample_rows ------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Dist {
    /// Uniform in [-amp, amp): thousands of tokens inside the nucleus.
    Flat(f32),
    /// A few dominant tokens over a broad background, like a trained model's logits.
    Peaked,
    /// Multiples of 0.25 in [-4, 4]: massive ties at every threshold.
    Ties,
}

fn sample_logits(rng: &mut Rng, vocab: usize, dist: Dist) -> Vec<f32> {
    match dist {
        Dist::Flat(amp) => (0..vocab).map(|_| rng.sym(amp)).collect(),
        Dist::Peaked => {
            let mut x: Vec<f32> = (0..vocab).map(|_| rng.sym(3.0) + rng.sym(3.0) + rng.sym(3.0)).collect();
            for k in 0..5.min(vocab) {
                let i = rng.below(vocab);
                x[i] = 14.0 - k as f32 * 0.7 + rng.sym(0.2);
            }
            x
        }
        Dist::Ties => (0..vocab).map(|_| (rng.sym(4.0) * 4.0).round() / 4.0).collect(),
    }
}

/// Per-row parameters cycling through greedy, plain, top-k, top-p, both, and disabled or extreme values.
fn row_params(rng: &mut Rng, r: usize, vocab: usize) -> RowSampling {
    let (temperature, top_k, top_p) = match r % 14 {
        0 => (0.0, 0, 1.0),
        1 => (1.0, 0, 1.0),
        2 => (0.7, 50, 0.9),
        3 => (0.7, 0, 0.9),
        4 => (1.3, 40, 1.0),
        5 => (0.8, 1, 1.0),
        6 => (1.0, 0, 0.0),
        7 => (1.0, vocab as i32 + 5, 0.5),
        8 => (0.5, 1000, 0.95),
        9 => (1.0, -3, f32::NAN),
        10 => (-1.0, 5, 0.5),
        11 => (2.0, 20_000, 0.999),
        12 => (1.0, 0, 0.3),
        _ => (0.9, 7, 0.6),
    };
    RowSampling { temperature, top_k, top_p, seed: rng.next_u64(), step: rng.below(1 << 20) as u64 }
}

/// Launches sample_rows three times (no advance, advance, no advance) and compares every id with the twin at
/// the step the kernel saw; rows that must be greedy are also compared with argmax_rows. `fixed`: one
/// (temperature, top_k, top_p) for every row instead of the cycle of `row_params`.
#[allow(clippy::too_many_arguments)]
fn sample_case<T: LogitElem>(
    dev: &CudaDevice,
    report: &mut Report,
    rng: &mut Rng,
    vocab: usize,
    dists: &[Dist],
    fixed: Option<(f32, i32, f32)>,
    conv: fn(f32) -> T,
    name: &str,
) {
    let rows = dists.len();
    let op = format!("sample_rows_{name}");
    let dist_names: Vec<&str> = dists
        .iter()
        .map(|d| match d {
            Dist::Flat(_) => "flat",
            Dist::Peaked => "peaked",
            Dist::Ties => "ties",
        })
        .collect();
    let mut shape = format!("{rows} x {vocab} ({})", dist_names.join(","));
    if let Some((t, k, p)) = fixed {
        shape = format!("{rows} x {vocab} ({}), all T {t} top_k {k} top_p {p}", dist_names[0]);
    }
    check(report, &op, &shape, |report| {
        let host: Vec<T> = dists.iter().flat_map(|&d| sample_logits(rng, vocab, d)).map(conv).collect();
        let wide: Vec<f32> = host.iter().map(|v| v.to_f32()).collect();
        let params: Vec<RowSampling> = (0..rows)
            .map(|r| match fixed {
                Some((temperature, top_k, top_p)) => {
                    RowSampling { temperature, top_k, top_p, seed: rng.next_u64(), step: rng.below(1 << 20) as u64 }
                }
                None => row_params(rng, r, vocab),
            })
            .collect();
        let d_logits = up(dev, &host)?;
        let d_t = up(dev, &params.iter().map(|p| p.temperature).collect::<Vec<_>>())?;
        let d_k = up(dev, &params.iter().map(|p| p.top_k).collect::<Vec<_>>())?;
        let d_p = up(dev, &params.iter().map(|p| p.top_p).collect::<Vec<_>>())?;
        let d_seed = up(dev, &params.iter().map(|p| p.seed).collect::<Vec<_>>())?;
        let steps0: Vec<u64> = params.iter().map(|p| p.step).collect();
        let mut d_step = up(dev, &steps0)?;
        let launch = |step: &mut CudaSlice<u64>, advance: bool| -> crate::Result<Vec<u32>> {
            let mut d_out = up(dev, &vec![u32::MAX; rows])?;
            let (tv, kv, pv, sv) = (d_t.as_view(), d_k.as_view(), d_p.as_view(), d_seed.as_view());
            let mut step_v = step.as_view_mut();
            let mut sp = SampleParams {
                temperature: &tv,
                top_k: &kv,
                top_p: &pv,
                seed: &sv,
                step: &mut step_v,
                advance_step: advance,
            };
            sampling::sample_rows(dev, &d_logits.as_view(), rows, vocab, &mut sp, &mut d_out.as_view_mut())?;
            down(dev, &d_out)
        };
        let twin = |step_add: u64| -> Vec<u32> {
            wide.chunks_exact(vocab)
                .zip(&params)
                .map(|(row, p)| sampling::sample_row_twin(row, &RowSampling { step: p.step + step_add, ..*p }).id)
                .collect()
        };
        let first = launch(&mut d_step, false)?;
        let steps_after_first = down(dev, &d_step)?;
        let second = launch(&mut d_step, true)?;
        let steps_after_second = down(dev, &d_step)?;
        let third = launch(&mut d_step, false)?;
        let (want0, want1) = (twin(0), twin(1));
        report.compare(&op, &shape, &ids_f32(&first), &ids_f32(&want0), 0.0, 0.0);
        report.compare(&format!("{op} (advancing)"), &shape, &ids_f32(&second), &ids_f32(&want0), 0.0, 0.0);
        report.compare(&format!("{op} (next step)"), &shape, &ids_f32(&third), &ids_f32(&want1), 0.0, 0.0);
        let advanced = steps_after_first == steps0 && steps_after_second.iter().zip(&steps0).all(|(a, b)| *a == b + 1);
        verdict(
            report,
            &format!("{op} step counter"),
            &shape,
            advanced,
            format!("steps {steps0:?} -> {steps_after_first:?} -> {steps_after_second:?}"),
        );

        // Greedy rows: temperature <= 0 always; top_k = 1 or top_p = 0 where the maximum is unique.
        let mut d_arg = up(dev, &vec![u32::MAX; rows])?;
        sampling::argmax_rows(dev, &d_logits.as_view(), rows, vocab, &mut d_arg.as_view_mut())?;
        let arg = down(dev, &d_arg)?;
        let (mut g_got, mut g_want) = (Vec::new(), Vec::new());
        for (r, (row, p)) in wide.chunks_exact(vocab).zip(&params).enumerate() {
            let mx = row[arg[r] as usize];
            let unique = row.iter().filter(|&&v| v == mx).count() == 1;
            let greedy = p.temperature.is_nan() || p.temperature <= 0.0 || (unique && (p.top_k == 1 || p.top_p == 0.0));
            if greedy {
                g_got.push(first[r]);
                g_want.push(arg[r]);
            }
        }
        if !g_got.is_empty() {
            let gshape = format!("{shape}, {} greedy rows", g_got.len());
            report.compare(
                &format!("{op} greedy == argmax_rows"),
                &gshape,
                &ids_f32(&g_got),
                &ids_f32(&g_want),
                0.0,
                0.0,
            );
        }
        Ok(())
    });
}

fn sample_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    let f = |v: f32| v;
    let b = bf16::from_f32;
    use Dist::{Flat, Peaked, Ties};
    let mixed: Vec<Dist> = (0..28).map(|r| [Flat(8.0), Peaked, Ties, Flat(2.0)][r % 4]).collect();
    // Mixed rows take both the shared-memory fast path and the global path (ties at the top-k boundary, flat
    // rows under top-p, top_k 20000); small vocabularies always fit the fast path.
    sample_case(dev, report, rng, VOCAB_PADDED, &mixed, None, f, "f32");
    sample_case(dev, report, rng, VOCAB, &mixed[..14], None, f, "f32");
    sample_case(dev, report, rng, VOCAB, &[Peaked; 14], None, b, "bf16");
    sample_case(dev, report, rng, VOCAB_PADDED, &[Ties; 14], None, b, "bf16");
    for vocab in [1, 3, 1000] {
        sample_case(dev, report, rng, vocab, &mixed[..14], None, f, "f32");
    }
    // A decode batch with one setting for every row: the fast path, top-p alone, and plain temperature.
    for fixed in [(0.7, 50, 0.9), (1.0, 0, 0.95), (1.0, 0, 1.0)] {
        sample_case(dev, report, rng, VOCAB_PADDED, &[Peaked; 64], Some(fixed), f, "f32");
    }
    let refuse = |vocab: usize, top_p_len: usize| -> Result<()> {
        let rows = 2;
        let x = buffer::zeros::<f32>(dev, rows * vocab)?;
        let (t, k) = (buffer::zeros::<f32>(dev, rows)?, buffer::zeros::<i32>(dev, rows)?);
        let (p, s) = (buffer::zeros::<f32>(dev, top_p_len)?, buffer::zeros::<u64>(dev, rows)?);
        let mut step = buffer::zeros::<u64>(dev, rows)?;
        let mut out = buffer::zeros::<u32>(dev, rows)?;
        let (tv, kv, pv, sv) = (t.as_view(), k.as_view(), p.as_view(), s.as_view());
        let mut step_v = step.as_view_mut();
        let mut sp = SampleParams {
            temperature: &tv,
            top_k: &kv,
            top_p: &pv,
            seed: &sv,
            step: &mut step_v,
            advance_step: false,
        };
        sampling::sample_rows(dev, &x.as_view(), rows, vocab, &mut sp, &mut out.as_view_mut())
    };
    report.expect_err("sample_rows_f32", "top_p [1] for 2 rows", refuse(16, 1));
    report.expect_err("sample_rows_f32", "vocab 2^23 + 1", refuse(sampling::MAX_SAMPLE_VOCAB + 1, 2));
}

pub fn run(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    rope_checks(dev, report, rng);
    embed_checks(dev, report, rng);
    argmax_checks(dev, report, rng);
    sample_checks(dev, report, rng);
}

// ---- bench cases ----------------------------------------------------------------------------------------------

/// rope_kv at an 8B prefill of 512 tokens; argmax and sampling over 64 rows of the padded vocabulary.
pub fn bench_cases<'a>(dev: &'a CudaDevice) -> Result<Vec<KernelCase<'a>>> {
    let mut out = Vec::new();
    let mut rng = Rng::new(0x5eed);

    let s = RopeKvShape { tokens: 512, heads: 28, kv_heads: 4, head_dim: 128 };
    let row = s.kv_heads * s.head_dim;
    let qkv = buffer::upload(dev, &rng.bf16s(s.tokens * s.qkv_width(), 1.0, 0.0))?;
    let bias = buffer::upload(dev, &rng.bf16s(s.qkv_width(), 1.0, 0.0))?;
    let pos = buffer::upload(dev, &(0..s.tokens as i32).collect::<Vec<_>>())?;
    let freq = buffer::upload(dev, &inv_freq(s.head_dim))?;
    let slots = buffer::upload(dev, &(0..s.tokens as i32).collect::<Vec<_>>())?;
    let mut q = buffer::zeros::<bf16>(dev, s.tokens * s.heads * s.head_dim)?;
    let mut kc = buffer::zeros::<bf16>(dev, s.tokens * row)?;
    let mut vc = buffer::zeros::<bf16>(dev, s.tokens * row)?;
    let mut err = buffer::zeros::<u32>(dev, 1)?;
    let bytes = 2.0 * (s.tokens * s.qkv_width() * 2 + s.qkv_width()) as f64;
    out.push(KernelCase {
        op: "qkv_bias_rope_write_kv_bf16".into(),
        shape: format!("8B prefill t {} ({}/{} heads, d {})", s.tokens, s.heads, s.kv_heads, s.head_dim),
        bytes,
        flops: 0.0,
        launch: Box::new(move || {
            let (qkv_v, bias_v, pos_v, freq_v, slots_v) =
                (qkv.as_view(), bias.as_view(), pos.as_view(), freq.as_view(), slots.as_view());
            let inp = RopeKvInputs {
                qkv: &qkv_v,
                bias: Some(&bias_v),
                positions: &pos_v,
                inv_freq: &freq_v,
                slots: &slots_v,
            };
            let (mut q_v, mut kc_v, mut vc_v, mut err_v) =
                (q.as_view_mut(), kc.as_view_mut(), vc.as_view_mut(), err.as_view_mut());
            let mut o =
                RopeKvOutputs { q: &mut q_v, k_cache: &mut kc_v, v_cache: &mut vc_v, kv: None, err: &mut err_v };
            rope_kv::qkv_bias_rope_write_kv_bf16(dev, s, &inp, &mut o)
        }),
    });

    let (rows, vocab) = (64, VOCAB_PADDED);
    let logits: Vec<f32> = (0..rows).flat_map(|_| sample_logits(&mut rng, vocab, Dist::Peaked)).collect();
    let d_logits = buffer::upload(dev, &logits)?;
    let mut ids = buffer::zeros::<u32>(dev, rows)?;
    let logits_bytes = (rows * vocab * 4) as f64;
    let argmax_logits = d_logits.clone();
    out.push(KernelCase {
        op: "argmax_rows_f32".into(),
        shape: format!("{rows} x {vocab}"),
        bytes: logits_bytes,
        flops: 0.0,
        launch: Box::new(move || {
            sampling::argmax_rows(dev, &argmax_logits.as_view(), rows, vocab, &mut ids.as_view_mut())
        }),
    });
    for (name, temperature, top_k, top_p) in
        [("T 0.7, top-k 50, top-p 0.9", 0.7f32, 50i32, 0.9f32), ("T 1, top-p 0.95", 1.0, 0, 0.95)]
    {
        let t = buffer::upload(dev, &vec![temperature; rows])?;
        let k = buffer::upload(dev, &vec![top_k; rows])?;
        let p = buffer::upload(dev, &vec![top_p; rows])?;
        let seed = buffer::upload(dev, &(0..rows as u64).collect::<Vec<_>>())?;
        let mut step = buffer::zeros::<u64>(dev, rows)?;
        let mut ids = buffer::zeros::<u32>(dev, rows)?;
        let logits = d_logits.clone();
        out.push(KernelCase {
            op: "sample_rows_f32".into(),
            shape: format!("{rows} x {vocab}, {name} (bytes: one read of the logits)"),
            bytes: logits_bytes,
            flops: 0.0,
            launch: Box::new(move || {
                let (tv, kv, pv, sv) = (t.as_view(), k.as_view(), p.as_view(), seed.as_view());
                let mut step_v = step.as_view_mut();
                let mut sp = SampleParams {
                    temperature: &tv,
                    top_k: &kv,
                    top_p: &pv,
                    seed: &sv,
                    step: &mut step_v,
                    advance_step: true,
                };
                sampling::sample_rows(dev, &logits.as_view(), rows, vocab, &mut sp, &mut ids.as_view_mut())
            }),
        });
    }
    Ok(out)
}
