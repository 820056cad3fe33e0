//! A linear layer. Quantization and LoRA will be properties of this type, not new model files.

use super::{get_shaped, Weights};
use crate::backend;
use crate::tensor::Tensor;
use crate::{Error, Result};

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

    /// `forward`, or with `row_invariant` `linear_row_invariant`: every row exactly as it would be alone.
    pub fn forward_rows(&self, x: &Tensor, row_invariant: bool) -> Result<Tensor> {
        if row_invariant {
            linear_row_invariant(x, &self.weight, self.bias.as_ref())
        } else {
            self.forward(x)
        }
    }
}

/// `backend::linear` of `x [m, k]` run in pieces of at most `backend::LINEAR_ROW_INVARIANT_MAX_ROWS` rows,
/// so that each row's result does not depend on the other rows (a batched step gives every sequence the
/// numbers it would get alone).
pub fn linear_row_invariant(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let piece = backend::LINEAR_ROW_INVARIANT_MAX_ROWS;
    let (m, k) = match x.shape() {
        &[m, k] => (m, k),
        other => return Err(Error::Invalid(format!("linear_row_invariant: x must be [m, k], got {other:?}"))),
    };
    if m <= piece {
        return backend::linear(x, w, b);
    }
    let data = x.f32s()?;
    let mut out = Vec::new();
    let mut n = 0;
    for rows in data.chunks(piece * k) {
        let y = backend::linear(&Tensor::from_f32([rows.len() / k, k], rows.to_vec())?, w, b)?;
        n = y.shape()[1];
        out.extend_from_slice(y.f32s()?);
    }
    Tensor::from_f32([m, n], out)
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
