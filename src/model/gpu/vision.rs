//! InternViT + pixel shuffle + projector on the GPU: the device twin of `model::vision` and
//! `model::projector`, one kernel or GEMM per step, bf16 activations rounded where torch rounds them.
//!
//! Per layer (h = hidden, r = tiles * tokens rows):
//!   qkv [r, 3h]   = y · Wqkv^T + bqkv            one GEMM on the stacked q/k/v weights, bias in the epilogue
//!   (6B) qn, kn   = RMSNorm(q), RMSNorm(k)       strided reads of qkv's column ranges
//!   a [r, h]      = flash_attn(q, k, v)          bidirectional, per tile, no score matrix
//!   o             = a · Wo^T + bo
//!   x += λ1 ⊙ o ; y = norm2(x)                   one fused kernel
//!   m [r, inter]  = y · W1^T ; m = gelu(m + b1)  GEMM, then bias + exact GELU fused
//!   o             = m · W2^T + b2
//!   x += λ2 ⊙ o ; y = next layer's norm1(x)      one fused kernel (the last layer: the add alone)
//! then `z = LayerNorm(shuffle(x without CLS))` in one kernel and the projector's two GEMMs.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaView};
use half::bf16;

use super::{GpuLinear, WeightSource};
use crate::backend::cuda::{self, buffer, guarded, CudaDevice};
use crate::model::vision::VisionParams;
use crate::{Error, Result};

const PREFIX: &str = "model.vision_tower";
const PROJECTOR: &str = "model.multi_modal_projector";
const PROJECTOR_LN_EPS: f32 = 1e-5;

/// LayerNorm (weight + bias) or RMSNorm (weight), on the device.
struct GpuNorm {
    w: CudaSlice<bf16>,
    b: Option<CudaSlice<bf16>>,
}

impl GpuNorm {
    fn load(src: &WeightSource, dev: &CudaDevice, prefix: &str, n: usize, rms: bool) -> Result<GpuNorm> {
        let w = src.get(dev, &format!("{prefix}.weight"), &[n])?;
        let b = if rms { None } else { Some(src.get(dev, &format!("{prefix}.bias"), &[n])?) };
        Ok(GpuNorm { w, b })
    }
}

struct GpuVisionLayer {
    norm1: GpuNorm,
    qkv: GpuLinear,
    qk_norm: Option<(CudaSlice<bf16>, CudaSlice<bf16>)>,
    proj: GpuLinear,
    lambda1: CudaSlice<bf16>,
    norm2: GpuNorm,
    fc1: GpuLinear,
    fc2: GpuLinear,
    lambda2: CudaSlice<bf16>,
}

/// The vision tower and the projector, resident on one device.
pub struct GpuVision {
    p: VisionParams,
    text_hidden: usize,
    patch_w: CudaSlice<bf16>,
    patch_b: CudaSlice<bf16>,
    cls: CudaSlice<bf16>,
    pos: CudaSlice<bf16>,
    layers: Vec<GpuVisionLayer>,
    proj_norm: GpuNorm,
    linear1: GpuLinear,
    linear2: GpuLinear,
}

/// What one forward produced, on the device.
pub struct GpuImageFeatures {
    /// Last hidden state `[tiles * tokens, h]`.
    pub vision_out: CudaSlice<bf16>,
    /// Projector output `[tiles * (g/2)^2, D]`.
    pub features: CudaSlice<bf16>,
    pub tiles: usize,
}

impl GpuVision {
    pub fn load(src: &WeightSource, dev: &CudaDevice, p: &VisionParams, text_hidden: usize) -> Result<GpuVision> {
        let h = p.hidden;
        if !h.is_multiple_of(p.heads) || !matches!(h / p.heads, 64 | 128) {
            return Err(Error::Invalid(format!(
                "cuda vision tower: head dim {h}/{} is not 64 or 128, the flash-attention kernel's sizes",
                p.heads
            )));
        }
        let e = format!("{PREFIX}.embeddings");
        let patch_w = src.get(dev, &format!("{e}.patch_embeddings.projection.weight"), &[h, 3, p.patch, p.patch])?;
        let patch_b = src.get(dev, &format!("{e}.patch_embeddings.projection.bias"), &[h])?;
        let cls = src.get(dev, &format!("{e}.cls_token"), &[1, 1, h])?;
        let pos = src.get(dev, &format!("{e}.position_embeddings"), &[1, p.tokens(), h])?;
        let mut layers = Vec::with_capacity(p.layers);
        for i in 0..p.layers {
            let l = format!("{PREFIX}.encoder.layer.{i}");
            let a = format!("{l}.attention");
            let (q, k, v) = (format!("{a}.q_proj"), format!("{a}.k_proj"), format!("{a}.v_proj"));
            let w = src.get_stacked(
                dev,
                &[(&format!("{q}.weight"), h), (&format!("{k}.weight"), h), (&format!("{v}.weight"), h)],
                h,
            )?;
            let b = if p.qkv_bias {
                Some(src.get_stacked(
                    dev,
                    &[(&format!("{q}.bias"), h), (&format!("{k}.bias"), h), (&format!("{v}.bias"), h)],
                    1,
                )?)
            } else {
                None
            };
            let qk_norm = if p.qk_norm {
                Some((
                    src.get(dev, &format!("{a}.q_norm.weight"), &[h])?,
                    src.get(dev, &format!("{a}.k_norm.weight"), &[h])?,
                ))
            } else {
                None
            };
            layers.push(GpuVisionLayer {
                norm1: GpuNorm::load(src, dev, &format!("{l}.layernorm_before"), h, p.rms_norm)?,
                qkv: GpuLinear { w, b, n: 3 * h, k: h },
                qk_norm,
                proj: GpuLinear::load(src, dev, &format!("{a}.projection_layer"), h, h, true)?,
                lambda1: src.get(dev, &format!("{l}.lambda_1"), &[h])?,
                norm2: GpuNorm::load(src, dev, &format!("{l}.layernorm_after"), h, p.rms_norm)?,
                fc1: GpuLinear::load(src, dev, &format!("{l}.mlp.fc1"), p.intermediate, h, true)?,
                fc2: GpuLinear::load(src, dev, &format!("{l}.mlp.fc2"), h, p.intermediate, true)?,
                lambda2: src.get(dev, &format!("{l}.lambda_2"), &[h])?,
            });
        }
        let c = 4 * h;
        Ok(GpuVision {
            p: p.clone(),
            text_hidden,
            patch_w,
            patch_b,
            cls,
            pos,
            layers,
            proj_norm: GpuNorm::load(src, dev, &format!("{PROJECTOR}.layer_norm"), c, false)?,
            linear1: GpuLinear::load(src, dev, &format!("{PROJECTOR}.linear_1"), text_hidden, c, true)?,
            linear2: GpuLinear::load(src, dev, &format!("{PROJECTOR}.linear_2"), text_hidden, text_hidden, true)?,
        })
    }

    pub fn params(&self) -> &VisionParams {
        &self.p
    }

    /// Floating-point operations of one forward over `tiles` tiles (GEMMs and attention; norms ignored).
    pub fn flops(&self, tiles: usize) -> f64 {
        let (h, t, i) = (self.p.hidden as f64, self.p.tokens() as f64, self.p.intermediate as f64);
        let r = tiles as f64 * t;
        let per_layer = 2.0 * r * h * (3.0 * h + h + 2.0 * i) + 4.0 * tiles as f64 * t * t * h;
        let patch = 2.0 * tiles as f64 * (t - 1.0) * h * (3 * self.p.patch * self.p.patch) as f64;
        let g2 = (self.p.grid() / 2).pow(2) as f64 * tiles as f64;
        let d = self.text_hidden as f64;
        let projector = 2.0 * g2 * (4.0 * h * d + d * d);
        patch + per_layer * self.p.layers as f64 + projector
    }

    /// Tiles `[n, 3, S, S]` (f32 host values, rounded to bf16 as HF casts `pixel_values` to the model dtype)
    /// -> features on the device.
    pub fn forward_host(&self, dev: &CudaDevice, pixels: &[f32], tiles: usize) -> Result<GpuImageFeatures> {
        let s = self.p.image_size;
        if pixels.len() != tiles * 3 * s * s {
            return Err(Error::Invalid(format!(
                "cuda vision tower: {} pixel values for {tiles} tiles of 3x{s}x{s}",
                pixels.len()
            )));
        }
        let host: Vec<bf16> = pixels.iter().map(|&v| bf16::from_f32(v)).collect();
        let px = buffer::upload(dev, &host)?;
        self.forward(dev, &px.as_view(), tiles)
    }

    /// Tiles already on the device as bf16 `[n, 3, S, S]` -> features (in fresh buffers).
    pub fn forward(&self, dev: &CudaDevice, pixels: &CudaView<'_, bf16>, tiles: usize) -> Result<GpuImageFeatures> {
        let mut ws = VisionWorkspace::new(dev, &self.p, self.text_hidden, tiles)?;
        let s = self.p.image_size;
        if pixels.len() != tiles * 3 * s * s {
            return Err(Error::Invalid(format!("cuda vision tower: {} pixel values for {tiles} tiles", pixels.len())));
        }
        guarded("copy pixels", || dev.stream.memcpy_dtod(pixels, &mut ws.pixels))?;
        self.run(dev, &mut ws)?;
        Ok(GpuImageFeatures { vision_out: ws.x, features: ws.features, tiles })
    }

    /// Runs the tower on the pixels in `ws.pixels`, leaving the features in `ws.features`. With `graph`, the
    /// whole forward (~10 launches per layer) is captured into a CUDA graph on first use and replayed after:
    /// at one tile the launches, not the math, are most of the time.
    pub fn forward_ws(&self, dev: &CudaDevice, ws: &mut VisionWorkspace, graph: bool) -> Result<()> {
        if !graph {
            return self.run(dev, ws);
        }
        if ws.graph.is_none() {
            guarded("begin capture", || {
                dev.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            })?;
            let body = self.run(dev, ws);
            let captured = guarded("end capture", || dev.stream.end_capture(CUgraphInstantiate_flags(0)));
            body?;
            ws.graph = Some(captured?.ok_or_else(|| Error::Invalid("vision graph capture was empty".into()))?);
        }
        let g = ws.graph.as_ref().expect("captured above");
        Ok(guarded("launch vision graph", || g.launch())?)
    }

    fn run(&self, dev: &CudaDevice, ws: &mut VisionWorkspace) -> Result<()> {
        let p = &self.p;
        let (h, t, s) = (p.hidden, p.tokens(), p.image_size);
        let tiles = ws.tiles;
        let heads = p.heads;
        let d = h / heads;
        let rows = tiles * t;
        if ws.h != h || ws.inter != p.intermediate || ws.text_hidden != self.text_hidden {
            return Err(Error::Invalid("cuda vision tower: workspace built for another model".into()));
        }
        let VisionWorkspace { pixels, x, y, qkv, qkn, attn, o, m, z, a, features, .. } = ws;
        launch::patch_embed(
            dev,
            &pixels.as_view(),
            &self.patch_w,
            &self.patch_b,
            &self.cls,
            &self.pos,
            x,
            tiles,
            s,
            p.patch,
            h,
        )?;
        launch::norm(dev, &x.as_view(), &self.layers[0].norm1, y, rows, h, p.eps)?;
        let scale = (d as f32).powf(-0.5);
        for (i, layer) in self.layers.iter().enumerate() {
            layer.qkv.forward(dev, &y.as_view(), h, &mut qkv.as_view_mut(), 3 * h, rows, true)?;
            match (&layer.qk_norm, qkn.as_mut()) {
                (Some((qw, kw)), Some(qkn)) => {
                    let (mut qn, mut kn) = qkn.split_at_mut(rows * h);
                    launch::rms_strided(dev, &qkv.slice(0..), 3 * h, qw, &mut qn, h, rows, h, p.eps)?;
                    launch::rms_strided(dev, &qkv.slice(h..), 3 * h, kw, &mut kn, h, rows, h, p.eps)?;
                    let (qn, kn) = qkn.split_at(rows * h);
                    launch::attention(
                        dev,
                        &qn,
                        h,
                        &kn,
                        h,
                        &qkv.slice(2 * h..),
                        3 * h,
                        attn,
                        tiles,
                        t,
                        heads,
                        d,
                        scale,
                    )?;
                }
                _ => {
                    let (q, k, v) = (qkv.slice(0..), qkv.slice(h..), qkv.slice(2 * h..));
                    launch::attention(dev, &q, 3 * h, &k, 3 * h, &v, 3 * h, attn, tiles, t, heads, d, scale)?;
                }
            }
            layer.proj.forward(dev, &attn.as_view(), h, &mut o.as_view_mut(), h, rows, true)?;
            launch::residual_norm(
                dev,
                x,
                o,
                &layer.lambda1,
                Some((&layer.norm2, &mut *y)),
                rows,
                h,
                p.eps,
                p.rms_norm,
            )?;
            layer.fc1.forward(dev, &y.as_view(), h, &mut m.as_view_mut(), p.intermediate, rows, false)?;
            let b1 = layer.fc1.b.as_ref().ok_or_else(|| Error::Invalid("fc1 without bias".into()))?;
            launch::gelu_bias(dev, m, b1, rows, p.intermediate)?;
            layer.fc2.forward(dev, &m.as_view(), p.intermediate, &mut o.as_view_mut(), h, rows, true)?;
            let next = self.layers.get(i + 1).map(|l| (&l.norm1, &mut *y));
            launch::residual_norm(dev, x, o, &layer.lambda2, next, rows, h, p.eps, p.rms_norm)?;
        }

        // Projector: shuffle + LayerNorm(4h), linear_1 + GELU, linear_2.
        let g = p.grid();
        let prow = tiles * (g / 2) * (g / 2);
        let (c, dt) = (4 * h, self.text_hidden);
        launch::shuffle_norm(dev, x, &self.proj_norm, z, tiles, g, h, PROJECTOR_LN_EPS)?;
        self.linear1.forward(dev, &z.as_view(), c, &mut a.as_view_mut(), dt, prow, false)?;
        let b1 = self.linear1.b.as_ref().ok_or_else(|| Error::Invalid("linear_1 without bias".into()))?;
        launch::gelu_bias(dev, a, b1, prow, dt)?;
        self.linear2.forward(dev, &a.as_view(), dt, &mut features.as_view_mut(), dt, prow, true)?;
        Ok(())
    }
}

/// Every buffer one forward over `tiles` tiles uses, allocated once, so a forward can be captured into a
/// CUDA graph and replayed (the graph keeps these addresses).
pub struct VisionWorkspace {
    pub tiles: usize,
    h: usize,
    inter: usize,
    text_hidden: usize,
    /// Input: bf16 `[tiles, 3, S, S]`; write the pixels here before `forward_ws`.
    pub pixels: CudaSlice<bf16>,
    x: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    qkn: Option<CudaSlice<bf16>>,
    attn: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    m: CudaSlice<bf16>,
    z: CudaSlice<bf16>,
    a: CudaSlice<bf16>,
    /// Output: `[tiles * (g/2)^2, D]`.
    pub features: CudaSlice<bf16>,
    graph: Option<CudaGraph>,
}

impl VisionWorkspace {
    pub fn new(dev: &CudaDevice, p: &VisionParams, text_hidden: usize, tiles: usize) -> Result<VisionWorkspace> {
        if tiles == 0 {
            return Err(Error::Invalid("cuda vision tower: no tiles".into()));
        }
        let (h, t, s) = (p.hidden, p.tokens(), p.image_size);
        let rows = tiles * t;
        let g = p.grid();
        let prow = tiles * (g / 2) * (g / 2);
        let b = |n: usize| buffer::scratch::<bf16>(dev, n);
        Ok(VisionWorkspace {
            tiles,
            h,
            inter: p.intermediate,
            text_hidden,
            pixels: b(tiles * 3 * s * s)?,
            x: b(rows * h)?,
            y: b(rows * h)?,
            qkv: b(rows * 3 * h)?,
            qkn: if p.qk_norm { Some(b(2 * rows * h)?) } else { None },
            attn: b(rows * h)?,
            o: b(rows * h)?,
            m: b(rows * p.intermediate)?,
            z: b(prow * 4 * h)?,
            a: b(prow * text_hidden)?,
            features: b(prow * text_hidden)?,
            graph: None,
        })
    }

    /// The last hidden state of the last forward, `[tiles * tokens, h]`.
    pub fn vision_out(&self) -> &CudaSlice<bf16> {
        &self.x
    }
}

/// Thin adapters from this model's calls to the launchers of `backend::cuda`, in one place.
mod launch {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    pub fn patch_embed(
        dev: &CudaDevice,
        pixels: &CudaView<'_, bf16>,
        w: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        cls: &CudaSlice<bf16>,
        pos: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        tiles: usize,
        image_size: usize,
        patch: usize,
        h: usize,
    ) -> Result<()> {
        let _ = patch;
        Ok(cuda::patch_embed::patch_embed_bf16(
            dev,
            pixels,
            &w.as_view(),
            &b.as_view(),
            &cls.as_view(),
            &pos.as_view(),
            &mut out.as_view_mut(),
            tiles,
            image_size,
            h,
        )?)
    }

    pub fn norm(
        dev: &CudaDevice,
        x: &CudaView<'_, bf16>,
        n: &GpuNorm,
        out: &mut CudaSlice<bf16>,
        rows: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        match &n.b {
            Some(b) => Ok(cuda::layernorm::layernorm_bf16(
                dev,
                x,
                h,
                &n.w.as_view(),
                &b.as_view(),
                &mut out.as_view_mut(),
                h,
                rows,
                h,
                eps,
            )?),
            None => Ok(cuda::layernorm::rmsnorm_strided_bf16(
                dev,
                x,
                h,
                &n.w.as_view(),
                &mut out.as_view_mut(),
                h,
                rows,
                h,
                eps,
            )?),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rms_strided(
        dev: &CudaDevice,
        x: &CudaView<'_, bf16>,
        ld_x: usize,
        w: &CudaSlice<bf16>,
        out: &mut cudarc::driver::CudaViewMut<'_, bf16>,
        ld_out: usize,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        Ok(cuda::layernorm::rmsnorm_strided_bf16(dev, x, ld_x, &w.as_view(), out, ld_out, rows, n, eps)?)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        dev: &CudaDevice,
        q: &CudaView<'_, bf16>,
        ld_q: usize,
        k: &CudaView<'_, bf16>,
        ld_k: usize,
        v: &CudaView<'_, bf16>,
        ld_v: usize,
        out: &mut CudaSlice<bf16>,
        tiles: usize,
        t: usize,
        heads: usize,
        d: usize,
        scale: f32,
    ) -> Result<()> {
        let shape = cuda::attention::AttnShape {
            ld_q,
            ld_k,
            ld_v,
            ..cuda::attention::AttnShape::dense(tiles, t, t, heads, heads, d)
        };
        Ok(cuda::attention::flash_attn_bf16(dev, q, k, v, &mut out.as_view_mut(), shape, None, scale)?)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn residual_norm(
        dev: &CudaDevice,
        x: &mut CudaSlice<bf16>,
        o: &CudaSlice<bf16>,
        lambda: &CudaSlice<bf16>,
        norm: Option<(&GpuNorm, &mut CudaSlice<bf16>)>,
        rows: usize,
        h: usize,
        eps: f32,
        rms: bool,
    ) -> Result<()> {
        let (w, b, mut out) = match norm {
            Some((n, out)) => (Some(n.w.as_view()), n.b.as_ref().map(|b| b.as_view()), Some(out.as_view_mut())),
            None => (None, None, None),
        };
        Ok(cuda::layernorm::residual_norm_bf16(
            dev,
            &mut x.as_view_mut(),
            &o.as_view(),
            Some(&lambda.as_view()),
            w.as_ref(),
            b.as_ref(),
            out.as_mut(),
            rows,
            h,
            eps,
            rms,
        )?)
    }

    pub fn gelu_bias(
        dev: &CudaDevice,
        x: &mut CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        Ok(cuda::elementwise::gelu_bias_bf16(dev, &mut x.as_view_mut(), &b.as_view(), rows, n)?)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn shuffle_norm(
        dev: &CudaDevice,
        x: &CudaSlice<bf16>,
        n: &GpuNorm,
        out: &mut CudaSlice<bf16>,
        tiles: usize,
        g: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        let b = n.b.as_ref().ok_or_else(|| Error::Invalid("projector LayerNorm without bias".into()))?;
        Ok(cuda::pixel_shuffle::shuffle_layernorm_bf16(
            dev,
            &x.as_view(),
            &n.w.as_view(),
            &b.as_view(),
            &mut out.as_view_mut(),
            tiles,
            g,
            h,
            eps,
        )?)
    }
}
