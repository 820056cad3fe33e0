//! Launchers for `kernels/gemv.cu`: decode-time products of a few rows (at most 8) with a weight matrix, plain
//! or with Qwen2's `silu(gate) * up` computed on the fly from the fused gate/up buffer. An experiment against
//! cuBLASLt's `linear` for small decode GEMMs, checked by the selfcheck and timed by `bench --kernels`; the
//! model does not use it yet. Twin: the CPU backend's `linear` (after `silu_mul` for the fused form).

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{guarded, CudaDevice, Error, LinearShape, Result};

const MODULE: &str = "gemv";
/// Must equal `kWarps` and `kMaxRows` in kernels/gemv.cu.
const FEATURES_PER_BLOCK: usize = 4;
pub const MAX_ROWS: usize = 8;

/// Checks the shape (`s.k` is the product's inner length; for the fused form `x` rows hold `2 k` values) and
/// returns the launch: one warp per output feature.
pub fn plan(
    op: &'static str,
    s: LinearShape,
    x_len: usize,
    w_len: usize,
    y_len: usize,
    fused: bool,
) -> Result<LaunchConfig> {
    let invalid = |msg: String| Error::Invalid { op, msg };
    if s.m == 0 || s.m > MAX_ROWS {
        return Err(invalid(format!("{} rows; the kernel takes 1..={MAX_ROWS}", s.m)));
    }
    if s.n == 0 || s.k == 0 || !s.k.is_multiple_of(8) || !s.ld_x.is_multiple_of(8) {
        return Err(invalid(format!("n {} and k {} must be positive, k and ld_x {} multiples of 8", s.n, s.k, s.ld_x)));
    }
    let row = if fused { 2 * s.k } else { s.k };
    if s.ld_x < row || s.ld_y < s.n {
        return Err(invalid(format!(
            "row strides ld_x {} (>= {row}) and ld_y {} (>= {}) too short",
            s.ld_x, s.ld_y, s.n
        )));
    }
    let need_x = (s.m - 1) * s.ld_x + row;
    let need_y = (s.m - 1) * s.ld_y + s.n;
    for (name, got, want) in [("x", x_len, need_x), ("w", w_len, s.n * s.k), ("y", y_len, need_y)] {
        if got < want {
            return Err(invalid(format!("{name} holds {got} elements, needs {want} for {s:?}")));
        }
    }
    if [s.n, s.k, s.ld_x, s.ld_y, need_x, need_y].iter().any(|&v| i32::try_from(v).is_err()) {
        return Err(invalid(format!("{s:?} exceeds the kernel's i32 indices")));
    }
    let grid = s.n.div_ceil(FEATURES_PER_BLOCK) as u32;
    Ok(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (32 * FEATURES_PER_BLOCK as u32, 1, 1), shared_mem_bytes: 0 })
}

/// `y [m, n] = x [m, k] · w [n, k]ᵀ (+ bias)`, rows of `s.ld_x` / `s.ld_y`, `m <= 8`. With `fused`, `x` is the
/// `[m, 2k]` gate/up buffer and the product takes `bf16(bf16(silu(gate)) * up)`. `x` and `w` must be 16-byte
/// aligned (an error otherwise: use cuBLASLt's `linear` for such operands).
pub fn gemv_bf16(
    dev: &CudaDevice,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    bias: Option<&CudaView<'_, bf16>>,
    y: &mut CudaViewMut<'_, bf16>,
    s: LinearShape,
    fused: bool,
) -> Result<()> {
    let op = if fused { "gemv_silu_bf16" } else { "gemv_bf16" };
    let cfg = plan(op, s, x.len(), w.len(), y.len(), fused)?;
    if let Some(b) = bias {
        if b.len() < s.n {
            return Err(Error::Invalid { op, msg: format!("bias holds {} elements, needs {}", b.len(), s.n) });
        }
    }
    use cudarc::driver::DevicePtr;
    let aligned = |p: u64| p.is_multiple_of(16);
    let (xp, _gx) = x.device_ptr(&dev.stream);
    let (wp, _gw) = w.device_ptr(&dev.stream);
    if !aligned(xp) || !aligned(wp) {
        return Err(Error::Invalid { op, msg: "x and w must be 16-byte aligned".into() });
    }
    let f = dev.kernels.function(MODULE, op)?;
    let [ld_x, ld_y, rows, n, k] = [s.ld_x, s.ld_y, s.m, s.n, s.k].map(|v| v as i32);
    let null: u64 = 0;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x).arg(&ld_x).arg(w);
    match bias {
        Some(b) => launch.arg(b),
        None => launch.arg(&null),
    };
    launch.arg(&mut *y).arg(&ld_y).arg(&rows).arg(&n).arg(&k);
    // SAFETY: the arguments match gemv_bf16 / gemv_silu_bf16(const bf16*, int, const bf16*, const bf16*, bf16*,
    // int, int, int, int); `plan` checked every length against the shape (x rows of ld_x holding k, or 2k for
    // the fused form; w n*k; y rows of ld_y holding n; bias n), that all indices fit i32, k and ld_x are
    // multiples of 8, and x, w are 16-byte aligned here, so every 16-byte load is aligned and in bounds; y is a
    // &mut view and cannot alias x, w or bias. The grid gives one warp per output feature, bounded by n.
    guarded("launch gemv", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_and_refusals() {
        let s = LinearShape::dense(1, 1152, 896);
        let p = plan("gemv_bf16", s, 896, 1152 * 896, 1152, false).expect("plan");
        assert_eq!((p.grid_dim, p.block_dim), ((288, 1, 1), (128, 1, 1)));
        let fused = LinearShape { m: 3, n: 896, k: 4864, ld_x: 2 * 4864, ld_y: 896 };
        assert!(plan("gemv_silu_bf16", fused, 3 * 2 * 4864, 896 * 4864, 3 * 896, true).is_ok());
        let err = |s: LinearShape, fused: bool| {
            plan("gemv_bf16", s, 1 << 20, 1 << 24, 1 << 20, fused).unwrap_err().to_string()
        };
        assert!(err(LinearShape::dense(9, 64, 64), false).contains("1..=8"));
        assert!(err(LinearShape::dense(1, 64, 60), false).contains("multiples of 8"));
        assert!(err(LinearShape { m: 2, n: 64, k: 64, ld_x: 64, ld_y: 64 }, true).contains("ld_x 64 (>= 128)"));
        assert!(plan("gemv_bf16", LinearShape::dense(2, 64, 64), 100, 64 * 64, 128, false)
            .unwrap_err()
            .to_string()
            .contains("x holds 100 elements, needs 128"));
    }
}
