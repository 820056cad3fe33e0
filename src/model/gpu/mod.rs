//! FaceLLM on the CUDA backend (feature `cuda`): the same models as `model::{vision, projector, llm}`, with
//! weights resident on the device in bf16 and every op a kernel of `backend::cuda` or a cuBLASLt GEMM.
//! The CPU modules stay the reference: `selfcheck` runs both on the same weights and compares.
//!
//! Weights come from any [`Weights`] source (a checkpoint, `RandomWeights`) by upload, or, for benchmarks of
//! real-size shapes without files, are generated on the device ([`WeightSource::DeviceRandom`]).

pub mod llm;
pub mod vision;

use cudarc::driver::{CudaSlice, CudaView};
use half::bf16;

use crate::backend::cuda::{buffer, CudaDevice, LinearShape};
use crate::model::random::{rule, tensor_seed, RecipeGains};
use crate::model::Weights;
use crate::{Error, Result};

/// Where device weights come from.
pub enum WeightSource<'a> {
    /// Uploaded from host tensors (any dtype, converted to bf16).
    Host(&'a dyn Weights),
    /// Generated on the device with the recipe's amplitude and offset per tensor name (no host copy); the
    /// values are not those of `RandomWeights` for the same case (different stream), only their statistics.
    DeviceRandom { case: String },
}

impl WeightSource<'_> {
    /// The tensor `name` of exactly `shape`, as bf16 on `dev`.
    pub fn get(&self, dev: &CudaDevice, name: &str, shape: &[usize]) -> Result<CudaSlice<bf16>> {
        match self {
            WeightSource::Host(w) => {
                let t = w.weight(name)?;
                if t.shape() != shape {
                    return Err(Error::Invalid(format!(
                        "tensor `{name}`: expected shape {shape:?}, found {:?}",
                        t.shape()
                    )));
                }
                let host: Vec<bf16> = match t.bf16s() {
                    Some(v) => v.to_vec(),
                    None => t.to_f32_vec().into_iter().map(bf16::from_f32).collect(),
                };
                Ok(buffer::upload(dev, &host)?)
            }
            WeightSource::DeviceRandom { case } => {
                let (offset, amp) = rule(name, shape, &RecipeGains::default())?;
                let n: usize = shape.iter().product();
                let mut out = buffer::zeros::<bf16>(dev, n)?;
                let seed = tensor_seed(case, name);
                crate::backend::cuda::fill::fill_uniform_bf16(dev, &mut out.as_view_mut(), seed, amp, offset)?;
                Ok(out)
            }
        }
    }

    /// Several tensors of `[rows_i, cols]` stacked along rows into one buffer (a fused QKV weight).
    pub fn get_stacked(&self, dev: &CudaDevice, names: &[(&str, usize)], cols: usize) -> Result<CudaSlice<bf16>> {
        let total: usize = names.iter().map(|(_, r)| r * cols).sum();
        let mut out = buffer::zeros::<bf16>(dev, total)?;
        let mut at = 0;
        for &(name, rows) in names {
            let shape: Vec<usize> = if cols == 1 { vec![rows] } else { vec![rows, cols] };
            let part = self.get(dev, name, &shape)?;
            let n = rows * cols;
            crate::backend::cuda::guarded("stack weights", || {
                dev.stream.memcpy_dtod(&part, &mut out.slice_mut(at..at + n))
            })?;
            at += n;
        }
        Ok(out)
    }
}

/// A linear layer on the device: `w [n, k]` and an optional bias `[n]`, bf16.
pub struct GpuLinear {
    pub w: CudaSlice<bf16>,
    pub b: Option<CudaSlice<bf16>>,
    pub n: usize,
    pub k: usize,
}

impl GpuLinear {
    pub fn load(src: &WeightSource, dev: &CudaDevice, prefix: &str, n: usize, k: usize, bias: bool) -> Result<Self> {
        let w = src.get(dev, &format!("{prefix}.weight"), &[n, k])?;
        let b = if bias { Some(src.get(dev, &format!("{prefix}.bias"), &[n])?) } else { None };
        Ok(GpuLinear { w, b, n, k })
    }

    /// `y[m, n] = x[m, k] · w^T (+ b)` with row strides; `with_bias = false` leaves the bias to a fused
    /// epilogue kernel that follows.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        dev: &CudaDevice,
        x: &CudaView<'_, bf16>,
        ld_x: usize,
        y: &mut cudarc::driver::CudaViewMut<'_, bf16>,
        ld_y: usize,
        m: usize,
        with_bias: bool,
    ) -> Result<()> {
        let shape = LinearShape { m, n: self.n, k: self.k, ld_x, ld_y };
        let b = if with_bias { self.b.as_ref().map(|b| b.as_view()) } else { None };
        Ok(dev.blas.linear(x, &self.w.as_view(), b.as_ref(), y, shape)?)
    }

    /// `forward` without the bias for a decode step of `m` rows: with `gemv`, through the decode GEMV kernel
    /// (`backend::cuda::gemv`) where it applies (m <= 8, k and ld_x multiples of 8), else cuBLASLt. With
    /// `fused_silu`, `x` is the `[m, 2k]` gate/up buffer and the product takes `silu(gate) * up` (GEMV only:
    /// an error otherwise, so the caller decides before it skips its `silu_mul`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_decode(
        &self,
        dev: &CudaDevice,
        x: &CudaView<'_, bf16>,
        ld_x: usize,
        y: &mut cudarc::driver::CudaViewMut<'_, bf16>,
        ld_y: usize,
        m: usize,
        gemv: bool,
        fused_silu: bool,
    ) -> Result<()> {
        let shape = LinearShape { m, n: self.n, k: self.k, ld_x, ld_y };
        if gemv && gemv_applies(m, self.k, ld_x) {
            return Ok(crate::backend::cuda::gemv::gemv_bf16(dev, x, &self.w.as_view(), None, y, shape, fused_silu)?);
        }
        if fused_silu {
            return Err(Error::Invalid(format!("decode GEMV: the fused SwiGLU form does not apply to {shape:?}")));
        }
        self.forward(dev, x, ld_x, y, ld_y, m, false)
    }
}

/// Whether the decode GEMV kernel takes a product of `m` rows over `k` with rows of `ld_x`.
pub fn gemv_applies(m: usize, k: usize, ld_x: usize) -> bool {
    (1..=crate::backend::cuda::gemv::MAX_ROWS).contains(&m) && k.is_multiple_of(8) && ld_x.is_multiple_of(8)
}
