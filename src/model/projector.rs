//! Pixel shuffle (scale 0.5) and the MLP projector into the LLM's embedding space (MODEL_SPEC §3.5-3.6):
//! `Linear2(GELU_erf(Linear1(LayerNorm_{4h}(shuffle(x)))))`, LayerNorm eps 1e-5.

use super::linear::{Linear, Norm};
use super::Weights;
use crate::backend;
use crate::tensor::Tensor;
use crate::Result;

const PREFIX: &str = "model.multi_modal_projector";
/// `nn.LayerNorm`'s default, which the projector keeps (not the vision tower's 1e-6).
const PROJECTOR_LN_EPS: f32 = 1e-5;

pub struct Projector {
    norm: Norm,
    linear1: Linear,
    linear2: Linear,
}

impl Projector {
    /// `vision_hidden` is h; the shuffled width is 4h; `text_hidden` is the LLM's D.
    pub fn load(w: &dyn Weights, vision_hidden: usize, text_hidden: usize) -> Result<Projector> {
        let c = 4 * vision_hidden;
        Ok(Projector {
            norm: Norm::load_layer(w, &format!("{PREFIX}.layer_norm"), c, PROJECTOR_LN_EPS)?,
            linear1: Linear::load(w, &format!("{PREFIX}.linear_1"), text_hidden, c, true)?,
            linear2: Linear::load(w, &format!("{PREFIX}.linear_2"), text_hidden, text_hidden, true)?,
        })
    }

    /// Vision last hidden state `[n, 1 + g*g, h]` -> (shuffled `[n, (g/2)^2, 4h]`, features `[n*(g/2)^2, D]`).
    pub fn forward(&self, vision_out: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = vision_out.shape();
        let (n, t, h) = (s[0], s[1], s[2]);
        // Feature selection "default": drop the CLS row of every tile.
        let all = vision_out.f32s()?;
        let mut patches = Vec::with_capacity(n * (t - 1) * h);
        for tile in 0..n {
            patches.extend_from_slice(&all[(tile * t + 1) * h..(tile + 1) * t * h]);
        }
        let patches = Tensor::from_f32([n, t - 1, h], patches)?;
        let shuffled = backend::pixel_shuffle(&patches)?;
        let rows = shuffled.shape()[0] * shuffled.shape()[1];
        let flat = shuffled.clone().reshape([rows, 4 * h])?;
        let y = self.norm.forward(&flat)?;
        let mut y = self.linear1.forward(&y)?;
        backend::gelu_erf(&mut y)?;
        let f = self.linear2.forward(&y)?;
        Ok((shuffled, f))
    }
}
