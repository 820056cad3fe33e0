//! Scaled dot-product attention on `[t, heads, d]` tensors with GQA and an optional causal offset.
//!
//! The work is cut into (query head, block of query rows) tasks for rayon. A task materialises its scores
//! `[rows, keys]` in a per-thread buffer: `q kᵀ · scale` by GEMM reading the head's columns in place
//! (strides, no transposed copies), the causal mask as "only the first `p + i + 1` keys exist", a row
//! softmax in f32 like torch's (max subtraction, sum, multiply by the reciprocal), then `P v` by GEMM
//! written straight into the head's columns of the output. Causal blocks only touch the keys their last row
//! can see. A handful of query rows (decode) skip the GEMM and use dot/axpy loops.

use std::cell::RefCell;

use rayon::prelude::*;

use super::matmul::{gemm_f32, Mat};
use super::{f32_data, invalid, math, simd_dispatch, SyncPtr};
use crate::tensor::Tensor;
use crate::Result;

/// Query rows per task for the GEMM path: 128 x 1025 scores are 0.5 MiB, which stays in L2.
const Q_BLOCK: usize = 128;

/// At most this many query rows use the dot/axpy path.
pub(crate) const SMALL_TQ: usize = 4;

thread_local! {
    /// Scores of the task's block, then the contiguous copy of its key head.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `softmax(q kᵀ · scale + mask) v` for `q [tq, hq, d]`, `k`/`v [tk, hk, d]`; returns `[tq, hq, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: Option<usize>, scale: f32) -> Result<Tensor> {
    const OP: &str = "attention";
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    let shapes = || format!("q {qs:?}, k {ks:?}, v {vs:?}");
    if qs.len() != 3 || ks.len() != 3 || ks != vs || qs[2] != ks[2] {
        return Err(invalid(OP, format!("need q [tq, hq, d] and k = v [tk, hk, d]; got {}", shapes())));
    }
    let (tq, hq, d) = (qs[0], qs[1], qs[2]);
    let (tk, hk) = (ks[0], ks[1]);
    if hk == 0 || hq % hk != 0 {
        return Err(invalid(OP, format!("query heads must be a multiple of kv heads; got {}", shapes())));
    }
    if let Some(p) = causal {
        if p + tq > tk {
            return Err(invalid(
                OP,
                format!("causal offset {p} with {tq} queries needs >= {} keys; got {}", p + tq, shapes()),
            ));
        }
    } else if tk == 0 && tq > 0 {
        return Err(invalid(OP, format!("no keys to attend to; got {}", shapes())));
    }
    let (qd, kd, vd) = (f32_data(OP, "q", q)?, f32_data(OP, "k", k)?, f32_data(OP, "v", v)?);
    let mut out = vec![0f32; tq * hq * d];
    if tq == 0 || hq == 0 || d == 0 {
        return Tensor::from_f32(qs.to_vec(), out);
    }
    let group = hq / hk;
    // Keys visible to query row i.
    let visible = |i: usize| causal.map_or(tk, |p| p + i + 1);
    let dst = SyncPtr::new(out.as_mut_ptr());
    let q_block = if tq <= SMALL_TQ { tq } else { Q_BLOCK };
    let blocks = tq.div_ceil(q_block);
    (0..hq * blocks).into_par_iter().for_each(|task| {
        let (h, b) = (task / blocks, task % blocks);
        let kvh = h / group;
        let (i0, i1) = (b * q_block, ((b + 1) * q_block).min(tq));
        let keys = visible(i1 - 1);
        SCRATCH.with(|scratch| {
            let (s, kh) = &mut *scratch.borrow_mut();
            s.resize((i1 - i0) * keys, 0.0);
            if tq <= SMALL_TQ {
                let mut acc = vec![0f32; d];
                for i in i0..i1 {
                    let row = &mut s[(i - i0) * keys..(i - i0) * keys + visible(i)];
                    let qrow = &qd[(i * hq + h) * d..(i * hq + h + 1) * d];
                    attend_row(qrow, kd, vd, hk * d, kvh * d, scale, row, &mut acc);
                    // SAFETY: row i, head h of out belongs to this task alone (tasks own disjoint
                    // (head, row block) pairs), and out outlives the parallel loop.
                    unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), dst.get().add((i * hq + h) * d), d) };
                }
                return;
            }
            let (rows, ldq, ldk) = (i1 - i0, (hq * d) as isize, (hk * d) as isize);
            // Packing kᵀ straight from [t, heads, d] reads with a stride of hk·d floats (often 4 KiB, which
            // aliases in the caches) and halves the GEMM's speed; a contiguous copy of the head costs far less.
            kh.clear();
            for j in 0..keys {
                kh.extend_from_slice(&kd[(j * hk + kvh) * d..(j * hk + kvh + 1) * d]);
            }
            // SAFETY: q rows i0..i1 of head h are in bounds, kh holds keys x d, the scores buffer holds
            // rows x keys, and neither is aliased.
            unsafe {
                gemm_f32(
                    rows,
                    keys,
                    d,
                    Mat { ptr: qd.as_ptr().add((i0 * hq + h) * d), rs: ldq, cs: 1 },
                    Mat { ptr: kh.as_ptr(), rs: 1, cs: d as isize },
                    s.as_mut_ptr(),
                    keys as isize,
                    1,
                    false,
                    scale,
                );
            }
            for (r, row) in s.chunks_exact_mut(keys).enumerate() {
                let n = visible(i0 + r);
                math::softmax_row(&mut row[..n]);
                row[n..].fill(0.0);
            }
            // SAFETY: v rows 0..keys are in bounds; the destination is rows i0..i1, head h of out, which
            // only this task writes; out outlives the parallel loop.
            unsafe {
                gemm_f32(
                    rows,
                    d,
                    keys,
                    Mat { ptr: s.as_ptr(), rs: keys as isize, cs: 1 },
                    Mat { ptr: vd.as_ptr().add(kvh * d), rs: ldk, cs: 1 },
                    dst.get().add((i0 * hq + h) * d),
                    ldq,
                    1,
                    false,
                    1.0,
                );
            }
        });
    });
    Tensor::from_f32(qs.to_vec(), out)
}

/// One query row against the first `scores.len()` keys of one kv head (row `j` of that head at
/// `k[j * ld + off..][..d]`): scores, softmax, then the probability-weighted sum of values into `out`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_row_body(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    off: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    for (j, sc) in scores.iter_mut().enumerate() {
        *sc = math::dot_body(q, &k[j * ld + off..j * ld + off + d]) * scale;
    }
    math::softmax_body(scores);
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        math::axpy_body(out, p, &v[j * ld + off..j * ld + off + d]);
    }
}
simd_dispatch!(fn attend_row(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    ld: usize,
    off: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) => attend_row_body);
