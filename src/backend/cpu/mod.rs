//! The CPU backend: every op of `backend` in f32, multithreaded with rayon. It is both the engine on machines
//! without a GPU and the reference the CUDA kernels are tested against, so each op follows the formula of the
//! Hugging Face reference operation by operation (see MODEL_SPEC §3), with wider accumulators only where a
//! reduction would otherwise lose digits.
//!
//! Hot loops are written once as plain Rust and compiled several times: for AVX-512, for AVX2+FMA and for the
//! build target, picked at run time (`Isa`). Elementwise code never uses fused multiply-add and reductions
//! keep a fixed lane layout, so every ISA gives bit-identical results for those; only the matmul kernels
//! (GEMV intrinsics, the `gemm` crate) sum in an ISA-dependent order.

pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod linear;
pub mod norm;
pub mod paged_attention;
pub mod patch_embed;
pub mod pixel_shuffle;
pub mod rope;
pub mod sampling;

mod gemv;
mod math;
mod matmul;

use std::borrow::Cow;
use std::sync::OnceLock;

use half::{bf16, f16};

use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

/// The instruction set the hot loops run with, detected once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Whatever the build target allows (SSE2 on x86_64, NEON on aarch64).
    Base,
    /// AVX2 + FMA + F16C (Haswell, Zen 1 and later).
    Avx2,
    /// AVX-512 F/BW/VL on top of AVX2.
    Avx512,
}

pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(detect_isa)
}

#[cfg(target_arch = "x86_64")]
fn detect_isa() -> Isa {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
    let avx512 = avx2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl");
    // FACELLM_CPU_ISA=avx2|base caps the choice, to compare paths on one machine.
    let cap = match std::env::var("FACELLM_CPU_ISA").ok().as_deref() {
        Some("base") => Isa::Base,
        Some("avx2") => Isa::Avx2,
        _ => Isa::Avx512,
    };
    let best = if avx512 {
        Isa::Avx512
    } else if avx2 {
        Isa::Avx2
    } else {
        Isa::Base
    };
    best.min(cap)
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_isa() -> Isa {
    Isa::Base
}

/// Compiles `$body` (a plain function taking the same arguments) once per ISA and dispatches on `isa()`.
/// The wrappers only add target features: the arithmetic, and so the result, is the same on every path.
macro_rules! simd_dispatch {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                match crate::backend::cpu::isa() {
                    // SAFETY: `isa()` reported these features on this CPU.
                    crate::backend::cpu::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    crate::backend::cpu::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    crate::backend::cpu::Isa::Base => {}
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

pub(crate) fn invalid(op: &str, msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{op}: {msg}"))
}

/// The f32 values of an activation tensor; other dtypes are a caller bug reported as an error.
pub(crate) fn f32_data<'a>(op: &str, name: &str, t: &'a Tensor) -> Result<&'a [f32]> {
    t.f32s().map_err(|_| invalid(op, format!("{name} must be f32, got {:?} of shape {:?}", t.dtype(), t.shape())))
}

/// A small parameter vector (norm weight, bias, layer scale) widened to f32; borrowed when already f32.
pub(crate) fn param_f32(t: &Tensor) -> Cow<'_, [f32]> {
    match t.f32s() {
        Ok(v) => Cow::Borrowed(v),
        Err(_) => Cow::Owned(t.to_f32_vec()),
    }
}

/// A weight matrix in its stored dtype; rows are widened to f32 only where they are used.
#[derive(Clone, Copy)]
pub(crate) enum Weights<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Weights<'a> {
    pub(crate) fn of(t: &'a Tensor) -> Weights<'a> {
        match t.dtype() {
            DType::F32 => Weights::F32(t.f32s().expect("f32 storage")),
            DType::BF16 => Weights::BF16(t.bf16s().expect("bf16 storage")),
            DType::F16 => Weights::F16(t.f16s().expect("f16 storage")),
        }
    }

    /// Widens `self[start..start + dst.len()]` into `dst`.
    pub(crate) fn widen(&self, start: usize, dst: &mut [f32]) {
        let end = start + dst.len();
        match self {
            Weights::F32(w) => dst.copy_from_slice(&w[start..end]),
            Weights::BF16(w) => math::widen_bf16(&w[start..end], dst),
            Weights::F16(w) => math::widen_f16(&w[start..end], dst),
        }
    }
}

/// A raw pointer that rayon tasks may share, for outputs whose parts the tasks write are disjoint but not
/// contiguous (column blocks, heads inside rows). Every use states why its writes do not overlap.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(*mut f32);
// SAFETY: only a pointer; the users guarantee disjoint writes and that the buffer outlives the tasks.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    pub(crate) fn new(p: *mut f32) -> SyncPtr {
        SyncPtr(p)
    }

    /// Through a method, so that closures capture the whole `SyncPtr` (which is `Sync`), not its field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
