//! LayerNorm and RMSNorm over the last dim, as torch writes them: LayerNorm with the biased variance and
//! `(x - mean) · rsqrt(var + eps) · w + b`; RMSNorm as Qwen2's `x · rsqrt(mean(x²) + eps)` rounded to f32,
//! then `· w`. Row sums are taken in f64 (mean, then the centred second moment) and `x - mean` is rounded
//! once from f64, so a large common offset costs no digits; the rest of the per-element arithmetic is f32.
//! Rows run in parallel once there is enough work.

use rayon::prelude::*;

use super::{f32_data, invalid, math, param_f32};
use crate::tensor::Tensor;
use crate::Result;

/// Below this many elements a norm runs on the calling thread (a decode step's 896 values).
const PAR_MIN_ELEMS: usize = 1 << 15;

fn rows_of(op: &str, x: &Tensor, what: &[(&str, &Tensor)]) -> Result<usize> {
    let xs = x.shape();
    let Some(&n) = xs.last() else {
        return Err(invalid(op, format!("x must have at least one dim, got {xs:?}")));
    };
    for (name, t) in what {
        if t.shape() != [n] {
            return Err(invalid(op, format!("{name} {:?} must be [{n}] for x {xs:?}", t.shape())));
        }
    }
    Ok(n)
}

fn for_rows(out: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if n == 0 {
        return;
    }
    if out.len() < PAR_MIN_ELEMS {
        out.chunks_exact_mut(n).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        out.par_chunks_exact_mut(n).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// LayerNorm over the last dim of `x [.., n]` with `w`, `b` of `[n]` (any float dtype).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let n = rows_of(OP, x, &[("weight", w), ("bias", b)])?;
    let xd = f32_data(OP, "x", x)?;
    let (w, b) = (param_f32(w), param_f32(b));
    let mut out = vec![0f32; xd.len()];
    for_rows(&mut out, n, |i, o| {
        let row = &xd[i * n..(i + 1) * n];
        let (sum, _) = math::sum_and_sq(row);
        let mean = sum / n as f64;
        let var = math::centered_sq(row, mean) / n as f64;
        let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
        for (((o, &v), &wv), &bv) in o.iter_mut().zip(row).zip(w.iter()).zip(b.iter()) {
            *o = ((v as f64 - mean) as f32) * rstd * wv + bv;
        }
    });
    Tensor::from_f32(x.shape().to_vec(), out)
}

/// The per-row scale of RMSNorm, rounded as torch rounds it: `mean(x²)` to f32, `+ eps` and `rsqrt` in f32.
fn rms_scale(row: &[f32], eps: f32) -> f32 {
    let (_, sq) = math::sum_and_sq(row);
    let ms = (sq / row.len() as f64) as f32;
    1.0 / (ms + eps).sqrt()
}

fn rms_row(row: &[f32], w: &[f32], eps: f32, o: &mut [f32]) {
    let r = rms_scale(row, eps);
    for ((o, &v), &wv) in o.iter_mut().zip(row).zip(w) {
        *o = wv * (v * r);
    }
}

/// RMSNorm over the last dim of `x [.., n]`, `w [n]`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    let n = rows_of(OP, x, &[("weight", w)])?;
    let xd = f32_data(OP, "x", x)?;
    let w = param_f32(w);
    let mut out = vec![0f32; xd.len()];
    for_rows(&mut out, n, |i, o| rms_row(&xd[i * n..(i + 1) * n], &w, eps, o));
    Tensor::from_f32(x.shape().to_vec(), out)
}

/// `residual += x`, then RMSNorm of the new residual.
pub fn add_rms_norm(residual: &mut Tensor, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "add_rms_norm";
    if residual.shape() != x.shape() {
        return Err(invalid(OP, format!("residual {:?} and x {:?} differ", residual.shape(), x.shape())));
    }
    let n = rows_of(OP, x, &[("weight", w)])?;
    let xd = f32_data(OP, "x", x)?;
    f32_data(OP, "residual", residual)?;
    let w = param_f32(w);
    let shape = x.shape().to_vec();
    let res = residual.f32s_mut()?;
    let mut out = vec![0f32; xd.len()];
    if n > 0 {
        let body = |((r, o), xr): ((&mut [f32], &mut [f32]), &[f32])| {
            math::add_slice(r, xr);
            rms_row(r, &w, eps, o);
        };
        if out.len() < PAR_MIN_ELEMS {
            res.chunks_exact_mut(n).zip(out.chunks_exact_mut(n)).zip(xd.chunks_exact(n)).for_each(body);
        } else {
            res.par_chunks_exact_mut(n).zip(out.par_chunks_exact_mut(n)).zip(xd.par_chunks_exact(n)).for_each(body);
        }
    }
    Tensor::from_f32(shape, out)
}
