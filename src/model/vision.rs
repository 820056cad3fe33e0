//! InternViT (MODEL_SPEC §3.2-3.4): patch embedding + CLS + absolute positions, then pre-norm layers with
//! layer scale. Both published variants run through this one file: the 300M tower (LayerNorm, q/k/v bias)
//! and the 6B tower (RMSNorm, no q/k/v bias, RMSNorm over the full q and k before the head split).

use super::linear::{Linear, Norm};
use super::{get_shaped, Weights};
use crate::backend;
use crate::tensor::Tensor;
use crate::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct VisionParams {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub patch: usize,
    pub image_size: usize,
    /// RMSNorm instead of LayerNorm (the 6B tower).
    pub rms_norm: bool,
    pub eps: f32,
    pub qkv_bias: bool,
    pub qk_norm: bool,
}

impl VisionParams {
    pub fn grid(&self) -> usize {
        self.image_size / self.patch
    }
    /// Tokens per tile, CLS included.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

struct VisionLayer {
    norm1: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    proj: Linear,
    lambda1: Tensor,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    lambda2: Tensor,
}

pub struct VisionTower {
    p: VisionParams,
    patch_w: Tensor,
    patch_b: Tensor,
    cls: Tensor,
    pos: Tensor,
    layers: Vec<VisionLayer>,
}

const PREFIX: &str = "model.vision_tower";

impl VisionTower {
    pub fn load(w: &dyn Weights, p: &VisionParams) -> Result<VisionTower> {
        let h = p.hidden;
        let e = format!("{PREFIX}.embeddings");
        let patch_w = get_shaped(w, &format!("{e}.patch_embeddings.projection.weight"), &[h, 3, p.patch, p.patch])?;
        let patch_b = get_shaped(w, &format!("{e}.patch_embeddings.projection.bias"), &[h])?;
        let cls = get_shaped(w, &format!("{e}.cls_token"), &[1, 1, h])?;
        let pos = get_shaped(w, &format!("{e}.position_embeddings"), &[1, p.tokens(), h])?;
        let norm = |name: &str| {
            if p.rms_norm {
                Norm::load_rms(w, name, h, p.eps)
            } else {
                Norm::load_layer(w, name, h, p.eps)
            }
        };
        let mut layers = Vec::with_capacity(p.layers);
        for i in 0..p.layers {
            let l = format!("{PREFIX}.encoder.layer.{i}");
            let a = format!("{l}.attention");
            let (q_norm, k_norm) = if p.qk_norm {
                (
                    Some(Norm::load_rms(w, &format!("{a}.q_norm"), h, p.eps)?),
                    Some(Norm::load_rms(w, &format!("{a}.k_norm"), h, p.eps)?),
                )
            } else {
                (None, None)
            };
            layers.push(VisionLayer {
                norm1: norm(&format!("{l}.layernorm_before"))?,
                q: Linear::load(w, &format!("{a}.q_proj"), h, h, p.qkv_bias)?,
                k: Linear::load(w, &format!("{a}.k_proj"), h, h, p.qkv_bias)?,
                v: Linear::load(w, &format!("{a}.v_proj"), h, h, p.qkv_bias)?,
                q_norm,
                k_norm,
                proj: Linear::load(w, &format!("{a}.projection_layer"), h, h, true)?,
                lambda1: get_shaped(w, &format!("{l}.lambda_1"), &[h])?,
                norm2: norm(&format!("{l}.layernorm_after"))?,
                fc1: Linear::load(w, &format!("{l}.mlp.fc1"), p.intermediate, h, true)?,
                fc2: Linear::load(w, &format!("{l}.mlp.fc2"), h, p.intermediate, true)?,
                lambda2: get_shaped(w, &format!("{l}.lambda_2"), &[h])?,
            });
        }
        Ok(VisionTower { p: p.clone(), patch_w, patch_b, cls, pos, layers })
    }

    pub fn params(&self) -> &VisionParams {
        &self.p
    }

    /// `pixels [n, 3, S, S]` -> last hidden state `[n, tokens, hidden]` (CLS first).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (h, t) = (self.p.hidden, self.p.tokens());
        let cls = self.cls.clone().reshape([h])?;
        let pos = self.pos.clone().reshape([t, h])?;
        let x = backend::patch_embed(pixels, &self.patch_w, &self.patch_b, &cls, &pos)?;
        let n = x.shape()[0];
        let mut x = x.reshape([n * t, h])?;
        for layer in &self.layers {
            layer.forward(&mut x, n, &self.p)?;
        }
        x.reshape([n, t, h])
    }
}

impl VisionLayer {
    /// One pre-norm layer on `x [n * tokens, hidden]`, in place.
    fn forward(&self, x: &mut Tensor, n: usize, p: &VisionParams) -> Result<()> {
        let (h, t, heads) = (p.hidden, p.tokens(), p.heads);
        let d = h / heads;
        let y = self.norm1.forward(x)?;
        let mut q = self.q.forward(&y)?;
        let mut k = self.k.forward(&y)?;
        let v = self.v.forward(&y)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let (q, k, v) = (q.into_f32_vec(), k.into_f32_vec(), v.into_f32_vec());
        let scale = (d as f32).powf(-0.5);
        let mut attn = Vec::with_capacity(n * t * h);
        for tile in 0..n {
            let span = tile * t * h..(tile + 1) * t * h;
            let qt = Tensor::from_f32([t, heads, d], q[span.clone()].to_vec())?;
            let kt = Tensor::from_f32([t, heads, d], k[span.clone()].to_vec())?;
            let vt = Tensor::from_f32([t, heads, d], v[span].to_vec())?;
            let a = backend::attention(&qt, &kt, &vt, None, scale)?;
            attn.extend_from_slice(a.f32s()?);
        }
        let attn = Tensor::from_f32([n * t, h], attn)?;
        let o = self.proj.forward(&attn)?;
        backend::add_scaled(x, &o, Some(&self.lambda1))?;
        let z = self.norm2.forward(x)?;
        let mut m = self.fc1.forward(&z)?;
        backend::gelu_erf(&mut m)?;
        let m = self.fc2.forward(&m)?;
        backend::add_scaled(x, &m, Some(&self.lambda2))
    }
}
