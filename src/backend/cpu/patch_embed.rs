//! InternViT's patch embedding: a `p x p` stride-`p` convolution is a matmul of the non-overlapping patches
//! (im2col, each patch flattened as `[channel, row, col]` like the conv weight) with the weight seen as
//! `[h, 3·p·p]`, run through `linear` (bias included, as the conv adds it). Then the CLS row is prepended and
//! the position embeddings are added, in torch's order: `conv + bias`, then `+ pos`.

use rayon::prelude::*;

use super::{f32_data, invalid, linear, param_f32};
use crate::tensor::Tensor;
use crate::Result;

/// `pixels [n, 3, H, W]`, `w [h, 3, p, p]`, `b [h]`, `cls` of h values, `pos` of `(1 + (H/p)(W/p)) · h`
/// values -> `[n, 1 + (H/p)(W/p), h]`.
pub fn patch_embed(pixels: &Tensor, w: &Tensor, b: &Tensor, cls: &Tensor, pos: &Tensor) -> Result<Tensor> {
    const OP: &str = "patch_embed";
    let (ps, ws) = (pixels.shape(), w.shape());
    let shapes =
        || format!("pixels {ps:?}, weight {ws:?}, bias {:?}, cls {:?}, pos {:?}", b.shape(), cls.shape(), pos.shape());
    if ws.len() != 4 || ws[2] != ws[3] || ws.contains(&0) || ps.len() != 4 || ps[1] != ws[1] {
        return Err(invalid(OP, format!("need pixels [n, c, H, W] and weight [h, c, p, p]; got {}", shapes())));
    }
    let (n, c, hh, ww) = (ps[0], ps[1], ps[2], ps[3]);
    let (h, p) = (ws[0], ws[2]);
    if hh % p != 0 || ww % p != 0 {
        return Err(invalid(OP, format!("image {hh}x{ww} is not a multiple of the patch size {p}; got {}", shapes())));
    }
    let (gy, gx) = (hh / p, ww / p);
    let tokens = 1 + gy * gx;
    if b.shape() != [h] || cls.numel() != h || pos.numel() != tokens * h {
        return Err(invalid(
            OP,
            format!("need bias [{h}], cls of {h} and pos [{tokens}, {h}] values; got {}", shapes()),
        ));
    }
    let px = f32_data(OP, "pixels", pixels)?;
    let kdim = c * p * p;
    let mut cols = vec![0f32; n * gy * gx * kdim];
    cols.par_chunks_mut(kdim).enumerate().for_each(|(idx, patch)| {
        let (img, py, pxi) = (idx / (gy * gx), idx % (gy * gx) / gx, idx % gx);
        for ch in 0..c {
            for ky in 0..p {
                let src = ((img * c + ch) * hh + py * p + ky) * ww + pxi * p;
                patch[(ch * p + ky) * p..(ch * p + ky + 1) * p].copy_from_slice(&px[src..src + p]);
            }
        }
    });
    let cols = Tensor::from_f32([n * gy * gx, kdim], cols)?;
    let w2 = w.clone().reshape([h, kdim])?;
    let emb = linear::linear(&cols, &w2, Some(b))?;
    let emb = emb.f32s()?;
    let (cls, pos) = (param_f32(cls), param_f32(pos));
    let mut out = vec![0f32; n * tokens * h];
    out.par_chunks_mut(tokens * h).enumerate().for_each(|(img, o)| {
        for (t, row) in o.chunks_exact_mut(h).enumerate() {
            let src = if t == 0 { &cls[..] } else { &emb[(img * gy * gx + t - 1) * h..(img * gy * gx + t) * h] };
            for ((o, &s), &pv) in row.iter_mut().zip(src).zip(&pos[t * h..(t + 1) * h]) {
                *o = s + pv;
            }
        }
    });
    Tensor::from_f32([n, tokens, h], out)
}
