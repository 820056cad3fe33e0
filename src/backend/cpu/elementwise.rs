//! Elementwise ops: the residual add with InternViT's layer scale, exact GELU (projector and vision MLP)
//! and Qwen2's `silu(gate) · up`. The math lives in `math.rs`; here are shape checks and the split of large
//! tensors into rayon chunks (each chunk a multiple of 64 elements so SIMD loops keep full vectors).

use rayon::prelude::*;

use super::{f32_data, invalid, math, param_f32};
use crate::tensor::Tensor;
use crate::Result;

/// Elements per rayon chunk; smaller tensors run on the calling thread.
const CHUNK: usize = 1 << 15;

/// `residual [.., n] += scale[n] ⊙ x`, or `+= x` without a scale.
pub fn add_scaled(residual: &mut Tensor, x: &Tensor, scale: Option<&Tensor>) -> Result<()> {
    const OP: &str = "add_scaled";
    if residual.shape() != x.shape() {
        return Err(invalid(OP, format!("residual {:?} and x {:?} differ", residual.shape(), x.shape())));
    }
    let xd = f32_data(OP, "x", x)?;
    f32_data(OP, "residual", residual)?;
    let n = x.shape().last().copied().unwrap_or(1);
    let scale = match scale {
        Some(s) if s.shape() != [n] => {
            return Err(invalid(OP, format!("scale {:?} must be [{n}] for x {:?}", s.shape(), x.shape())));
        }
        Some(s) => Some(param_f32(s)),
        None => None,
    };
    let res = residual.f32s_mut()?;
    match scale {
        None => {
            if res.len() <= CHUNK {
                math::add_slice(res, xd);
            } else {
                res.par_chunks_mut(CHUNK).zip(xd.par_chunks(CHUNK)).for_each(|(r, v)| math::add_slice(r, v));
            }
        }
        Some(s) if n > 0 => {
            // Whole rows per chunk so every chunk lines up with the scale vector.
            let rows_per = (CHUNK / n).max(1);
            res.par_chunks_mut(rows_per * n).zip(xd.par_chunks(rows_per * n)).for_each(|(r, v)| {
                for (rr, vr) in r.chunks_exact_mut(n).zip(v.chunks_exact(n)) {
                    math::add_scaled_slice(rr, vr, &s);
                }
            });
        }
        Some(_) => {}
    }
    Ok(())
}

/// In-place exact GELU, `x/2 · (1 + erf(x/√2))`.
pub fn gelu_erf(x: &mut Tensor) -> Result<()> {
    let (shape, dtype) = (x.shape().to_vec(), x.dtype());
    let v =
        x.f32s_mut().map_err(|_| invalid("gelu_erf", format!("x must be f32, got {dtype:?} of shape {shape:?}")))?;
    if v.len() <= CHUNK {
        math::gelu_slice(v);
    } else {
        v.par_chunks_mut(CHUNK).for_each(math::gelu_slice);
    }
    Ok(())
}

/// `silu(gate) ⊙ up`, both of one shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "silu_mul";
    if gate.shape() != up.shape() {
        return Err(invalid(OP, format!("gate {:?} and up {:?} differ", gate.shape(), up.shape())));
    }
    let (g, u) = (f32_data(OP, "gate", gate)?, f32_data(OP, "up", up)?);
    let mut out = vec![0f32; g.len()];
    if out.len() <= CHUNK {
        math::silu_mul_slice(g, u, &mut out);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| math::silu_mul_slice(g, u, o));
    }
    Tensor::from_f32(gate.shape().to_vec(), out)
}
