//! Launchers for `kernels/elementwise.cu`: the bias + exact GELU after a vision/projector fc1 GEMM, and Qwen2's
//! `silu(gate) * up` from a fused gate/up GEMM output or from two buffers. Twins of `backend/cpu/elementwise.rs`
//! (`gelu_erf`, `silu_mul`). The launch shape is a pure function of `(rows, n)`; the kernel chooses 16-byte
//! vectors or scalar accesses from `n` and the pointers' alignment.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::layernorm::check_lens;
use super::{guarded, CudaDevice, Error, Result};

const MODULE: &str = "elementwise";
const MAX_THREADS: usize = 256;
/// CUDA's limit on gridDim.y; the kernels stride over rows beyond it.
const MAX_GRID_Y: usize = 65_535;
/// Must equal `kRowsPerThread` in kernels/elementwise.cu.
const ROWS_PER_THREAD: usize = 2;

/// Grid x covers a row's `ceil(n / 8)` units of 8 columns (one unit per thread), grid y the rows in groups of
/// `ROWS_PER_THREAD`.
pub(crate) fn plan(op: &'static str, rows: usize, n: usize) -> Result<LaunchConfig> {
    if n == 0 {
        return Err(Error::Invalid { op, msg: "row length n must be > 0".into() });
    }
    if i32::try_from(n).is_err() || i32::try_from(rows).is_err() {
        return Err(Error::Invalid { op, msg: format!("[{rows}, {n}] exceeds the kernel's i32 indices") });
    }
    let units = n.div_ceil(8);
    let threads = units.next_multiple_of(32).min(MAX_THREADS);
    let grid_x = units.div_ceil(threads) as u32;
    let grid_y = rows.div_ceil(ROWS_PER_THREAD).clamp(1, MAX_GRID_Y) as u32;
    Ok(LaunchConfig { grid_dim: (grid_x, grid_y, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 })
}

fn numel(op: &'static str, rows: usize, n: usize) -> Result<usize> {
    rows.checked_mul(n).ok_or(Error::Invalid { op, msg: format!("[{rows}, {n}] overflows") })
}

/// `x [rows, n] = gelu_erf(bf16(x + bias))` in place, `bias [n]` (torch's exact GELU on the bf16 sum).
pub fn gelu_bias_bf16(
    dev: &CudaDevice,
    x: &mut CudaViewMut<'_, bf16>,
    bias: &CudaView<'_, bf16>,
    rows: usize,
    n: usize,
) -> Result<()> {
    const OP: &str = "gelu_bias_bf16";
    let cfg = plan(OP, rows, n)?;
    check_lens(OP, &[("x", x.len(), numel(OP, rows, n)?), ("bias", bias.len(), n)])?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "gelu_bias_bf16")?;
    let (rows_i32, n_i32) = (rows as i32, n as i32);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(&mut *x).arg(bias).arg(&rows_i32).arg(&n_i32);
    // SAFETY: the arguments match gelu_bias_bf16(bf16*, const bf16*, int, int); x holds rows*n and bias n
    // elements, both fit i32; the grid covers ceil(n/8) units per row, the kernel bounds every column by n and
    // every row by rows (any gridDim.y is valid); x is a &mut view, so it does not alias bias.
    guarded("launch gelu_bias_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

#[allow(clippy::too_many_arguments)]
fn silu_mul_launch(
    dev: &CudaDevice,
    op: &'static str,
    gate: &CudaView<'_, bf16>,
    up: &CudaView<'_, bf16>,
    ld_in: usize,
    out: &mut CudaViewMut<'_, bf16>,
    rows: usize,
    n: usize,
    cfg: LaunchConfig,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "silu_mul_bf16")?;
    let (ld_i32, rows_i32, n_i32) = (ld_in as i32, rows as i32, n as i32);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(gate).arg(up).arg(&ld_i32).arg(&mut *out).arg(&rows_i32).arg(&n_i32);
    // SAFETY: the arguments match silu_mul_bf16(const bf16*, const bf16*, int, bf16*, int, int); the callers
    // checked that gate and up each hold rows rows of n with stride ld_in (ld_in fits i32), out holds rows*n;
    // the grid covers ceil(n/8) units per row, the kernel bounds columns by n and rows by rows (any gridDim.y
    // is valid); out is a &mut view, so it cannot overlap gate or up.
    guarded(op, || unsafe { launch.launch(cfg) }.map(|_| ()))
}

/// `out [rows, n] = bf16(bf16(silu(gate)) * up)` from a fused gate/up GEMM output `gate_up [rows, 2n]`
/// (gate in columns `0..n`, up in `n..2n` of each row).
pub fn silu_mul_fused_bf16(
    dev: &CudaDevice,
    gate_up: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    rows: usize,
    n: usize,
) -> Result<()> {
    const OP: &str = "silu_mul_fused_bf16";
    let cfg = plan(OP, rows, n)?;
    let ld = n.checked_mul(2).filter(|&v| i32::try_from(v).is_ok());
    let Some(ld) = ld else {
        return Err(Error::Invalid { op: OP, msg: format!("row stride 2n = 2*{n} exceeds i32::MAX") });
    };
    check_lens(OP, &[("gate_up", gate_up.len(), numel(OP, rows, ld)?), ("out", out.len(), numel(OP, rows, n)?)])?;
    if rows == 0 {
        return Ok(());
    }
    silu_mul_launch(dev, OP, &gate_up.slice(..), &gate_up.slice(n..), ld, out, rows, n, cfg)
}

/// `out [rows, n] = bf16(bf16(silu(gate)) * up)`, `gate` and `up` separate `[rows, n]` buffers.
pub fn silu_mul_bf16(
    dev: &CudaDevice,
    gate: &CudaView<'_, bf16>,
    up: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    rows: usize,
    n: usize,
) -> Result<()> {
    const OP: &str = "silu_mul_bf16";
    let cfg = plan(OP, rows, n)?;
    let total = numel(OP, rows, n)?;
    check_lens(OP, &[("gate", gate.len(), total), ("up", up.len(), total), ("out", out.len(), total)])?;
    silu_mul_launch(dev, OP, gate, up, n, out, rows, n, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_every_column_and_row() {
        for (rows, n) in [(1, 1), (3, 7), (5, 72), (7175, 4096), (7175, 12800), (1, 18944), (100_000, 8), (200_000, 8)]
        {
            let cfg = plan("t", rows, n).expect("valid shape");
            let (gx, gy, _) = cfg.grid_dim;
            let t = cfg.block_dim.0 as usize;
            assert!(t.is_multiple_of(32) && t <= MAX_THREADS, "[{rows}, {n}]: {t} threads");
            assert!(gx as usize * t * 8 >= n, "[{rows}, {n}]: grid x too small");
            assert!((gx as usize - 1) * t * 8 < n, "[{rows}, {n}]: an idle block");
            let gy = gy as usize;
            assert!((1..=MAX_GRID_Y).contains(&gy), "[{rows}, {n}]: grid y {gy}");
            // Every row is reached (the kernel strides by gridDim.y groups), and no group is empty.
            assert!(gy == MAX_GRID_Y || gy * ROWS_PER_THREAD >= rows, "[{rows}, {n}]: rows left over");
            assert!((gy - 1) * ROWS_PER_THREAD < rows.max(1), "[{rows}, {n}]: an idle row group");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(plan("t", 2, 0).is_err());
        assert!(plan("t", 2, 1 << 31).is_err());
        assert!(plan("t", 1 << 31, 8).is_err());
    }
}
