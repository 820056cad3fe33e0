//! Rotary position embedding, half-split (NeoX) layout, as HF Qwen2 applies it: the angle is the f32 product
//! `position · inv_freq[i]` (torch's f32 matmul of a k = 1 product), cos and sin of that f32 angle are
//! rounded to f32 (computed in f64, so correctly rounded), and `x · cos + rotate_half(x) · sin` is evaluated
//! in f32 without fused multiply-adds: `x1 c - x2 s` and `x2 c + x1 s` for the two halves.

use rayon::prelude::*;

use super::invalid;
use crate::tensor::Tensor;
use crate::Result;

/// In-place rotary embedding on `x [t, heads, d]`; token `i` at `positions[i]`, `inv_freq [d/2]`.
pub fn rope(x: &mut Tensor, positions: &[usize], inv_freq: &[f32]) -> Result<()> {
    const OP: &str = "rope";
    let xs = x.shape().to_vec();
    if xs.len() != 3 || !xs[2].is_multiple_of(2) || xs[2] / 2 != inv_freq.len() || positions.len() != xs[0] {
        return Err(invalid(
            OP,
            format!(
                "x {xs:?} must be [t, heads, d] with d even, t = {} positions and d/2 = {} inv_freq",
                positions.len(),
                inv_freq.len()
            ),
        ));
    }
    let (heads, d) = (xs[1], xs[2]);
    let half = d / 2;
    let v = x.f32s_mut().map_err(|_| invalid(OP, format!("x must be f32, got {xs:?}")))?;
    if heads * d == 0 {
        return Ok(());
    }
    let apply = |(tok, &pos): (&mut [f32], &usize)| {
        let mut cos = vec![0f32; half];
        let mut sin = vec![0f32; half];
        for i in 0..half {
            let ang = pos as f32 * inv_freq[i];
            cos[i] = (ang as f64).cos() as f32;
            sin[i] = (ang as f64).sin() as f32;
        }
        for h in tok.chunks_exact_mut(d) {
            let (x1, x2) = h.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    };
    if xs[0] < 16 {
        v.chunks_exact_mut(heads * d).zip(positions).for_each(apply);
    } else {
        v.par_chunks_exact_mut(heads * d).zip(positions.par_iter()).for_each(apply);
    }
    Ok(())
}
