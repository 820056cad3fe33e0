//! Pixel shuffle with scale 0.5 (MODEL_SPEC §3.5): each 2x2 block of patch features becomes one token of
//! four times the channels, in the order torch's view/permute sequence produces. Written in the closed
//! form `out[n, r·(g/2) + s, dy·2c + dx·c + ch] = x[n, (2r + dy)·g + 2s + dx, ch]`: four contiguous row copies
//! per output token.

use rayon::prelude::*;

use super::{f32_data, invalid};
use crate::tensor::Tensor;
use crate::Result;

/// `x [n, g·g, c]` (g even, patch grid row-major) -> `[n, (g/2)², 4c]`.
pub fn pixel_shuffle(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "pixel_shuffle";
    let xs = x.shape();
    let g = if xs.len() == 3 { (xs[1] as f64).sqrt().round() as usize } else { 0 };
    if xs.len() != 3 || g * g != xs[1] || g % 2 != 0 || g == 0 {
        return Err(invalid(OP, format!("x must be [n, g*g, c] with g even and > 0, got {xs:?}")));
    }
    let (n, c) = (xs[0], xs[2]);
    let xd = f32_data(OP, "x", x)?;
    let half = g / 2;
    let mut out = vec![0f32; n * half * half * 4 * c];
    if c > 0 {
        out.par_chunks_mut(4 * c).enumerate().for_each(|(idx, o)| {
            let (img, r, s) = (idx / (half * half), idx % (half * half) / half, idx % half);
            for dy in 0..2 {
                for dx in 0..2 {
                    let src = (img * g * g + (2 * r + dy) * g + 2 * s + dx) * c;
                    o[(dy * 2 + dx) * c..(dy * 2 + dx + 1) * c].copy_from_slice(&xd[src..src + c]);
                }
            }
        });
    }
    Tensor::from_f32([n, half * half, 4 * c], out)
}
