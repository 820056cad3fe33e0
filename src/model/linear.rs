//! A linear layer. Quantization and LoRA will be properties of this type, not new model files.

use super::{get_shaped, Weights};
use crate::backend;
use crate::tensor::Tensor;
use crate::Result;

pub struct Linear {
    /// `[out, in]`, in the checkpoint's dtype.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias` `[out]`.
    pub fn load(w: &dyn Weights, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = get_shaped(w, &format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias { Some(get_shaped(w, &format!("{prefix}.bias"), &[out])?) } else { None };
        Ok(Linear { weight, bias })
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// `x [m, in]` -> `[m, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        backend::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// LayerNorm (weight + bias) or RMSNorm (weight only), as the config chooses.
pub enum Norm {
    Layer { weight: Tensor, bias: Tensor, eps: f32 },
    Rms { weight: Tensor, eps: f32 },
}

impl Norm {
    pub fn load_layer(w: &dyn Weights, prefix: &str, n: usize, eps: f32) -> Result<Norm> {
        Ok(Norm::Layer {
            weight: get_shaped(w, &format!("{prefix}.weight"), &[n])?,
            bias: get_shaped(w, &format!("{prefix}.bias"), &[n])?,
            eps,
        })
    }

    pub fn load_rms(w: &dyn Weights, prefix: &str, n: usize, eps: f32) -> Result<Norm> {
        Ok(Norm::Rms { weight: get_shaped(w, &format!("{prefix}.weight"), &[n])?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer { weight, bias, eps } => backend::layer_norm(x, weight, bias, *eps),
            Norm::Rms { weight, eps } => backend::rms_norm(x, weight, *eps),
        }
    }
}
