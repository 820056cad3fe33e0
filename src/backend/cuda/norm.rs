//! Launchers for `kernels/rmsnorm.cu`, the twins of `backend/cpu/norm.rs`'s `rms_norm` and `add_rms_norm`
//! for bf16 activations. Shapes are checked on the host (pure functions, tested without a GPU); the kernel
//! itself picks its 16-byte vector path or its scalar path from the row length and the pointers' alignment.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{guarded, CudaDevice, Error, Result};

const MODULE: &str = "rmsnorm";
/// Must equal `kMaxVecs` in kernels/rmsnorm.cu: Bf16x8 vectors a thread keeps in registers.
const MAX_VECS_PER_THREAD: usize = 4;
const MAX_THREADS: usize = 1024;

/// Checks lengths against `[rows, n]` and sizes the launch: one block per row, enough threads that a row
/// fits the kernel's registers (rows too long for that still run, on the kernel's scalar path).
fn plan(op: &'static str, rows: usize, n: usize, lens: &[(&str, usize, usize)]) -> Result<LaunchConfig> {
    let invalid = |msg: String| Error::Invalid { op, msg };
    if n == 0 {
        return Err(invalid("row length n must be > 0".into()));
    }
    if i32::try_from(n).is_err() {
        return Err(invalid(format!("row length {n} exceeds i32::MAX")));
    }
    let grid = u32::try_from(rows).ok().filter(|&r| r <= i32::MAX as u32);
    let Some(grid) = grid else {
        return Err(invalid(format!("{rows} rows exceed the grid limit 2^31-1")));
    };
    for &(name, got, want) in lens {
        if got != want {
            return Err(invalid(format!("{name} holds {got} elements, expected {want} for [{rows}, {n}]")));
        }
    }
    let units = if n.is_multiple_of(8) { n / 8 } else { n };
    let threads = if units <= 256 * MAX_VECS_PER_THREAD { units.min(256) } else { units.div_ceil(MAX_VECS_PER_THREAD) };
    let threads = threads.next_multiple_of(32).clamp(32, MAX_THREADS) as u32;
    Ok(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// `out [rows, n] = w * (x * rsqrt(mean(x^2) + eps))`, `x [rows, n]`, `w [n]`, all bf16.
pub fn rms_norm_bf16(
    dev: &CudaDevice,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rms_norm_bf16";
    let numel = rows.checked_mul(n).ok_or(Error::Invalid { op: OP, msg: format!("[{rows}, {n}] overflows") })?;
    let cfg = plan(OP, rows, n, &[("x", x.len(), numel), ("weight", w.len(), n), ("out", out.len(), numel)])?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "rmsnorm_bf16")?;
    let n_i32 = n as i32;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x).arg(w).arg(&mut *out).arg(&n_i32).arg(&eps);
    // SAFETY: the argument list matches rmsnorm_bf16(const bf16*, const bf16*, bf16*, int, float); `plan`
    // checked x and out hold rows*n elements and w holds n, n fits i32, the grid is rows blocks of a multiple
    // of 32 threads <= 1024; out is a distinct &mut allocation, so it cannot alias x or w.
    guarded("launch rmsnorm_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

/// `residual = bf16(residual + x)` in place, then `out = rms_norm(residual)`; all `[rows, n]` bf16, `w [n]`.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_bf16(
    dev: &CudaDevice,
    residual: &mut CudaViewMut<'_, bf16>,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "add_rms_norm_bf16";
    let numel = rows.checked_mul(n).ok_or(Error::Invalid { op: OP, msg: format!("[{rows}, {n}] overflows") })?;
    let lens =
        [("residual", residual.len(), numel), ("x", x.len(), numel), ("weight", w.len(), n), ("out", out.len(), numel)];
    let cfg = plan(OP, rows, n, &lens)?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "add_rmsnorm_bf16")?;
    let n_i32 = n as i32;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(&mut *residual).arg(x).arg(w).arg(&mut *out).arg(&n_i32).arg(&eps);
    // SAFETY: the argument list matches add_rmsnorm_bf16(bf16*, const bf16*, const bf16*, bf16*, int, float);
    // `plan` checked residual, x and out hold rows*n elements and w holds n, n fits i32, the grid is rows
    // blocks of a multiple of 32 threads <= 1024; residual and out are distinct &mut allocations, so neither
    // aliases the other inputs.
    guarded("launch add_rmsnorm_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads(n: usize) -> u32 {
        plan("t", 3, n, &[]).expect("valid shape").block_dim.0
    }

    #[test]
    fn model_rows_fit_the_register_path() {
        for n in [896, 1024, 2048, 3200, 3584, 4096, 5120, 8192, 32768] {
            let t = threads(n) as usize;
            assert!(t.is_multiple_of(32) && t <= MAX_THREADS, "n={n}: {t} threads");
            assert!(t * MAX_VECS_PER_THREAD * 8 >= n, "n={n}: {t} threads cannot hold the row in registers");
        }
    }

    #[test]
    fn awkward_rows_get_a_valid_block() {
        for n in [1, 7, 9, 33, 895, 100_003] {
            let t = threads(n);
            assert!(t >= 32 && t.is_multiple_of(32) && t as usize <= MAX_THREADS, "n={n}: {t} threads");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(plan("t", 2, 0, &[]).is_err());
        assert!(plan("t", 2, 8, &[("x", 15, 16)]).is_err());
        assert!(plan("t", usize::MAX, 8, &[]).is_err());
        let err = plan("rms_norm_bf16", 2, 8, &[("weight", 7, 8)]).unwrap_err().to_string();
        assert!(err.contains("weight holds 7 elements, expected 8"), "{err}");
    }
}
