//! `linear`: `y = x · wᵀ (+ b)` with weights in their stored dtype.
//!
//! Two regimes. With a few input rows (decode, small batches) the op is bound by reading the weights, so
//! `gemv` streams each weight row once, widening bf16/f16 in registers, with rayon over blocks of output
//! rows. With many rows (prefill, vision) it is bound by arithmetic: rayon tasks own blocks of weight rows,
//! widen one block into a per-thread f32 scratch (about 512 KiB, so it stays in L2 while `gemm` packs it)
//! and run a single-threaded f32 GEMM into their columns of the output. No f32 copy of the whole matrix is
//! ever made. The bias is written into the output first and the GEMM accumulates onto it, which is the same
//! single addition after the dot product that torch's `addmm` performs.

use std::cell::RefCell;

use half::{bf16, f16};
use rayon::prelude::*;

use super::gemv::{gemv_rows, Elem};
use super::matmul::{gemm_f32, Mat};
use super::{f32_data, invalid, isa, param_f32, SyncPtr, Weights};
use crate::tensor::Tensor;
use crate::Result;

/// Largest number of input rows that still take the GEMV path. Measured single-threaded on Zen 5 (bf16 and
/// f32, 896x4864 and 4864x896): the GEMV, which streams the weights once and re-reads L1-resident rows per
/// group of four inputs, beats widen-then-GEMM up to about 48 rows (2x at 16), since the `gemm` crate is
/// slow at small m and the widening costs a pass over the weights. Batched decode lands here too.
pub(crate) const GEMV_MAX_M: usize = 32;

/// Weight elements per GEMV task: enough work to amortise a rayon task, small enough to balance.
const GEMV_TASK_ELEMS: usize = 1 << 16;

/// f32 elements of widened weights per GEMM task (512 KiB).
const GEMM_BLOCK_ELEMS: usize = 1 << 17;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `x [.., k] · w[n, k]ᵀ (+ b[n])` -> `[.., n]` f32. Leading dims of `x` are flattened into rows.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "linear";
    let (xs, ws) = (x.shape(), w.shape());
    if ws.len() != 2 {
        return Err(invalid(OP, format!("weight must be [n, k], got {ws:?} (x {xs:?})")));
    }
    let (n, k) = (ws[0], ws[1]);
    if xs.last() != Some(&k) {
        return Err(invalid(OP, format!("x {xs:?} must end in k = {k} of weight {ws:?}")));
    }
    let xd = f32_data(OP, "x", x)?;
    let bias = match b {
        Some(b) if b.shape() != [n] => {
            return Err(invalid(OP, format!("bias {:?} must be [{n}] for weight {ws:?}", b.shape())));
        }
        Some(b) => Some(param_f32(b)),
        None => None,
    };
    let m: usize = xs[..xs.len() - 1].iter().product();
    let mut out_shape = xs.to_vec();
    *out_shape.last_mut().expect("rank >= 1") = n;
    let mut out = vec![0f32; m * n];
    let bias = bias.as_deref();
    match Weights::of(w) {
        Weights::F32(w) => run::<f32>(xd, m, k, w, n, bias, &mut out),
        Weights::BF16(w) => run::<bf16>(xd, m, k, w, n, bias, &mut out),
        Weights::F16(w) => run::<f16>(xd, m, k, w, n, bias, &mut out),
    }
    Tensor::from_f32(out_shape, out)
}

fn run<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
    }
    if k == 0 {
        return;
    }
    if m <= GEMV_MAX_M {
        gemv(x, m, k, w, n, bias, out);
    } else {
        gemm_blocks(x, m, k, w, n, bias.is_some(), out);
    }
}

fn gemv<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    let isa = isa();
    let rows = (GEMV_TASK_ELEMS / k).max(8) / 8 * 8;
    // Results land weight-row-major ([n, m]) so each task owns one contiguous slice; m == 1 needs no transpose.
    let mut t_buf = if m == 1 { Vec::new() } else { vec![0f32; n * m] };
    let dst: &mut [f32] = if m == 1 { &mut *out } else { &mut t_buf };
    if rows >= n {
        gemv_rows(isa, x, m, k, w, dst);
    } else {
        dst.par_chunks_mut(rows * m).zip(w.par_chunks(rows * k)).for_each(|(o, wc)| gemv_rows(isa, x, m, k, wc, o));
    }
    if m == 1 {
        if let Some(b) = bias {
            for (o, &bv) in out.iter_mut().zip(b) {
                *o += bv;
            }
        }
    } else {
        for (j, col) in t_buf.chunks_exact(m).enumerate() {
            let bv = bias.map_or(0.0, |b| b[j]);
            for (i, &v) in col.iter().enumerate() {
                out[i * n + j] = v + bv;
            }
        }
    }
}

fn gemm_blocks<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, accumulate: bool, out: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let nb = (GEMM_BLOCK_ELEMS / k / 16 * 16).clamp(32, 512).min(n.div_ceil(threads).next_multiple_of(16));
    let col_blocks = n.div_ceil(nb);
    // Too few weight blocks to feed every thread (a narrow k/v projection): split the rows of x as well.
    let row_blocks = if col_blocks >= 2 * threads { 1 } else { (2 * threads).div_ceil(col_blocks).min(m.div_ceil(16)) };
    let mb = m.div_ceil(row_blocks);
    let dst = SyncPtr::new(out.as_mut_ptr());
    (0..col_blocks * row_blocks).into_par_iter().for_each(|task| {
        let (cb, rb) = (task / row_blocks, task % row_blocks);
        let (j0, j1) = (cb * nb, ((cb + 1) * nb).min(n));
        let (i0, i1) = (rb * mb, ((rb + 1) * mb).min(m));
        if i0 >= i1 {
            return;
        }
        let wblock = &w[j0 * k..j1 * k];
        let run = |wf: &[f32]| {
            // SAFETY: x, the weight block and out hold the addressed elements ([i0..i1) x k, [j0..j1) x k,
            // [i0..i1) x [j0..j1) of an m x n row-major output); tasks own disjoint (row, column) blocks
            // of out, and out outlives the parallel loop.
            unsafe {
                gemm_f32(
                    i1 - i0,
                    j1 - j0,
                    k,
                    Mat { ptr: x.as_ptr().add(i0 * k), rs: k as isize, cs: 1 },
                    Mat { ptr: wf.as_ptr(), rs: 1, cs: k as isize },
                    dst.get().add(i0 * n + j0),
                    n as isize,
                    1,
                    accumulate,
                    1.0,
                )
            }
        };
        match W::as_f32(wblock) {
            Some(wf) => run(wf),
            None => SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                s.resize(wblock.len(), 0.0);
                W::widen(wblock, &mut s);
                run(&s);
            }),
        }
    });
}
