//! Launchers for `kernels/layernorm.cu`: LayerNorm and RMSNorm over strided bf16 rows, and the InternViT
//! layer-scale residual update fused with the following norm. Twins of `backend/cpu/norm.rs` (`layer_norm`,
//! `rms_norm`) and `backend/cpu/elementwise.rs` (`add_scaled`). Shapes and extents are checked on the host by
//! pure functions (tested without a GPU); the kernel picks its 16-byte register path or its scalar path from
//! the row length and the pointers' alignment, so any sub-range view is accepted.

use cudarc::driver::{CudaView, CudaViewMut, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{guarded, CudaDevice, Error, Result};

const MODULE: &str = "layernorm";
/// Must equal `kMaxVecs` in kernels/layernorm.cu and kernels/pixel_shuffle.cu.
pub(crate) const MAX_VECS_PER_THREAD: usize = 4;
const MAX_THREADS: usize = 1024;
/// Threads per row on the scalar path (rows not a multiple of 8 long).
const SCALAR_THREADS: usize = 256;
/// A null device pointer, for the kernels' optional arguments.
const NULL: u64 = 0;

/// Threads for one block per row of `n` elements. A row that is a multiple of 8 gives every thread
/// `MAX_VECS_PER_THREAD` Bf16x8 vectors (the fewest threads that hold the row in registers, which keeps the
/// most loads in flight per SM); rows up to 1024 * 32 elements fit. Other rows get up to 256 threads striding.
pub(crate) fn row_threads(n: usize, vectorizable: bool) -> u32 {
    let t = if vectorizable { (n / 8).div_ceil(MAX_VECS_PER_THREAD) } else { n.min(SCALAR_THREADS) };
    t.next_multiple_of(32).clamp(32, MAX_THREADS) as u32
}

/// One block per row: checks `n` and `rows` against the kernel's int arguments and the grid limit.
pub(crate) fn plan_rows(op: &'static str, rows: usize, n: usize, vectorizable: bool) -> Result<LaunchConfig> {
    let invalid = |msg: String| Error::Invalid { op, msg };
    if n == 0 {
        return Err(invalid("row length n must be > 0".into()));
    }
    if i32::try_from(n).is_err() {
        return Err(invalid(format!("row length {n} exceeds i32::MAX")));
    }
    let Some(grid) = u32::try_from(rows).ok().filter(|&r| r <= i32::MAX as u32) else {
        return Err(invalid(format!("{rows} rows exceed the grid limit 2^31-1")));
    };
    let threads = row_threads(n, vectorizable);
    Ok(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// Checks that a buffer of `len` elements holds `rows` rows of `n` with row stride `ld`: `ld >= n`, `ld` fits
/// the kernel's int, and `len >= (rows - 1) * ld + n` (the last row needs only its own width, so both a
/// `[rows, ld]` buffer and a column range of one, `buf.slice(col..)`, are accepted).
pub(crate) fn check_strided(op: &'static str, name: &str, len: usize, rows: usize, n: usize, ld: usize) -> Result<()> {
    let invalid = |msg: String| Error::Invalid { op, msg };
    if ld < n {
        return Err(invalid(format!("{name}: row stride {ld} is shorter than the row length {n}")));
    }
    if i32::try_from(ld).is_err() {
        return Err(invalid(format!("{name}: row stride {ld} exceeds i32::MAX")));
    }
    let need = match rows.checked_sub(1) {
        None => 0,
        Some(r) => {
            r.checked_mul(ld).and_then(|v| v.checked_add(n)).ok_or_else(|| invalid(format!("{name} overflows")))?
        }
    };
    if len < need {
        return Err(invalid(format!("{name} holds {len} elements, {rows} rows of {n} with stride {ld} need {need}")));
    }
    Ok(())
}

/// Checks exact lengths: `(name, got, want)`.
pub(crate) fn check_lens(op: &'static str, lens: &[(&str, usize, usize)]) -> Result<()> {
    for &(name, got, want) in lens {
        if got != want {
            return Err(Error::Invalid { op, msg: format!("{name} holds {got} elements, expected {want}") });
        }
    }
    Ok(())
}

fn numel(op: &'static str, rows: usize, n: usize) -> Result<usize> {
    rows.checked_mul(n).ok_or(Error::Invalid { op, msg: format!("[{rows}, {n}] overflows") })
}

/// `out = (x - mean) * rsqrt(var + eps) * w + b` over `rows` rows of `n`: row `r` of `x` at `r * ld_x`, of `out`
/// at `r * ld_out` (views may be column ranges of wider buffers). `w`, `b`: `[n]`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bf16(
    dev: &CudaDevice,
    x: &CudaView<'_, bf16>,
    ld_x: usize,
    w: &CudaView<'_, bf16>,
    b: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    ld_out: usize,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "layernorm_bf16";
    let cfg = plan_rows(OP, rows, n, n.is_multiple_of(8))?;
    check_strided(OP, "x", x.len(), rows, n, ld_x)?;
    check_strided(OP, "out", out.len(), rows, n, ld_out)?;
    check_lens(OP, &[("weight", w.len(), n), ("bias", b.len(), n)])?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "layernorm_bf16")?;
    let (n_i32, ld_x_i32, ld_out_i32) = (n as i32, ld_x as i32, ld_out as i32);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x).arg(&ld_x_i32).arg(w).arg(b).arg(&mut *out).arg(&ld_out_i32).arg(&n_i32).arg(&eps);
    // SAFETY: the arguments match layernorm_bf16(const bf16*, int, const bf16*, const bf16*, bf16*, int, int,
    // float); check_strided proved rows of n with strides ld_x / ld_out lie inside x and out, w and b hold n;
    // n, ld_x and ld_out fit i32; the grid is rows <= 2^31-1 blocks of a multiple of 32 threads <= 1024. out
    // is a &mut view, so it cannot overlap x, w or b.
    guarded("launch layernorm_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

/// `out = w * bf16(x * rsqrt(mean(x^2) + eps))` (InternVLVisionRMSNorm) over strided rows, as
/// [`layernorm_bf16`]. The 6B tower's qk-norm: `x` the q (or k) columns of a fused `[rows, 3h]` QKV buffer,
/// `ld_x = 3h`, `n = h`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_strided_bf16(
    dev: &CudaDevice,
    x: &CudaView<'_, bf16>,
    ld_x: usize,
    w: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    ld_out: usize,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rmsnorm_strided_bf16";
    let cfg = plan_rows(OP, rows, n, n.is_multiple_of(8))?;
    check_strided(OP, "x", x.len(), rows, n, ld_x)?;
    check_strided(OP, "out", out.len(), rows, n, ld_out)?;
    check_lens(OP, &[("weight", w.len(), n)])?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "rmsnorm_strided_bf16")?;
    let (n_i32, ld_x_i32, ld_out_i32) = (n as i32, ld_x as i32, ld_out as i32);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x).arg(&ld_x_i32).arg(w).arg(&mut *out).arg(&ld_out_i32).arg(&n_i32).arg(&eps);
    // SAFETY: the arguments match rmsnorm_strided_bf16(const bf16*, int, const bf16*, bf16*, int, int, float);
    // check_strided proved the strided rows lie inside x and out, w holds n, the ints fit, the grid is rows
    // <= 2^31-1 blocks of a multiple of 32 threads <= 1024; out is a &mut view distinct from x and w.
    guarded("launch rmsnorm_strided_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

/// [`rmsnorm_strided_bf16`] in place: each strided row of `x` is replaced by its norm (the kernel reads a whole
/// row before it writes any of it, element by element in the same thread).
pub fn rmsnorm_strided_inplace_bf16(
    dev: &CudaDevice,
    x: &mut CudaViewMut<'_, bf16>,
    ld: usize,
    w: &CudaView<'_, bf16>,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rmsnorm_strided_inplace_bf16";
    let cfg = plan_rows(OP, rows, n, n.is_multiple_of(8))?;
    check_strided(OP, "x", x.len(), rows, n, ld)?;
    check_lens(OP, &[("weight", w.len(), n)])?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "rmsnorm_strided_bf16")?;
    let (n_i32, ld_i32) = (n as i32, ld as i32);
    let (ptr, _record_write) = x.device_ptr_mut(&dev.stream);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(&ptr).arg(&ld_i32).arg(w).arg(&ptr).arg(&ld_i32).arg(&n_i32).arg(&eps);
    // SAFETY: as rmsnorm_strided_bf16 with out == x, which the kernel allows (every element is read and then
    // written by the same thread, all reads of a row precede the barrier before its writes); `ptr` is the
    // view's device address, and the view's exclusive borrow lasts until `_record_write` drops after the launch.
    guarded("launch rmsnorm_strided_bf16 (in place)", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

/// InternViT's layer-scale residual fused with the next norm, all `[rows, n]` contiguous:
/// `residual = bf16(residual + bf16(lambda * x))` (`lambda` `[n]`, or `None` for a plain add), then, when `out`
/// is given, `out = LayerNorm(residual; w, b)` or, with `rms`, `out = RMSNorm(residual; w)`. Without `out`
/// (the last layer) only the residual is updated and `w`, `b` must be `None`.
#[allow(clippy::too_many_arguments)]
pub fn residual_norm_bf16(
    dev: &CudaDevice,
    residual: &mut CudaViewMut<'_, bf16>,
    x: &CudaView<'_, bf16>,
    lambda: Option<&CudaView<'_, bf16>>,
    w: Option<&CudaView<'_, bf16>>,
    b: Option<&CudaView<'_, bf16>>,
    out: Option<&mut CudaViewMut<'_, bf16>>,
    rows: usize,
    n: usize,
    eps: f32,
    rms: bool,
) -> Result<()> {
    const OP: &str = "residual_norm_bf16";
    let invalid = |msg: &str| Error::Invalid { op: OP, msg: msg.to_string() };
    let cfg = plan_rows(OP, rows, n, n.is_multiple_of(8))?;
    let total = numel(OP, rows, n)?;
    check_lens(OP, &[("residual", residual.len(), total), ("x", x.len(), total)])?;
    if let Some(l) = lambda {
        check_lens(OP, &[("lambda", l.len(), n)])?;
    }
    match (&out, w, b) {
        (None, None, None) => {}
        (None, _, _) => return Err(invalid("norm weights given without an output")),
        (Some(_), None, _) => return Err(invalid("an output needs the norm weight")),
        (Some(_), Some(_), Some(_)) if rms => return Err(invalid("RMSNorm takes no bias")),
        (Some(o), Some(w), b) => {
            check_lens(OP, &[("out", o.len(), total), ("weight", w.len(), n)])?;
            if let Some(b) = b {
                check_lens(OP, &[("bias", b.len(), n)])?;
            }
        }
    }
    if rows == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "residual_norm_bf16")?;
    let (n_i32, kind) = (n as i32, i32::from(rms));
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(&mut *residual).arg(x);
    match lambda {
        Some(l) => launch.arg(l),
        None => launch.arg(&NULL),
    };
    match w {
        Some(w) => launch.arg(w),
        None => launch.arg(&NULL),
    };
    match b {
        Some(b) => launch.arg(b),
        None => launch.arg(&NULL),
    };
    match out {
        Some(o) => launch.arg(o),
        None => launch.arg(&NULL),
    };
    launch.arg(&n_i32).arg(&eps).arg(&kind);
    // SAFETY: the arguments match residual_norm_bf16(bf16*, const bf16*, const bf16*, const bf16*, const bf16*,
    // bf16*, int, float, int), absent pointers passed as null, which the kernel tests before any use; residual,
    // x and out hold rows*n, lambda, w and b hold n; out is given only with w, RMSNorm never with b; n fits i32
    // and the grid is rows <= 2^31-1 blocks of a multiple of 32 threads <= 1024. residual and out are &mut
    // views, so no pointer aliases another.
    guarded("launch residual_norm_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_rows_fit_the_register_path() {
        // InternViT 300M/6B hidden sizes, the projector's 4h and awkward multiples of 8.
        for n in [8, 64, 72, 1024, 3200, 4096, 12800, 32768] {
            let t = row_threads(n, true) as usize;
            assert!(t.is_multiple_of(32) && (32..=MAX_THREADS).contains(&t), "n={n}: {t} threads");
            assert!(t * MAX_VECS_PER_THREAD * 8 >= n, "n={n}: {t} threads cannot hold the row in registers");
        }
        // Few threads, each with all its vectors: the 300M row is one warp.
        assert_eq!(row_threads(1024, true), 32);
        assert_eq!(row_threads(3200, true), 128);
        assert_eq!(row_threads(12800, true), 416);
    }

    #[test]
    fn awkward_rows_get_a_valid_block() {
        for n in [1, 7, 9, 33, 895, 100_003] {
            let t = row_threads(n, false);
            assert!(t >= 32 && t.is_multiple_of(32) && t as usize <= MAX_THREADS, "n={n}: {t} threads");
        }
        // Rows too long for registers still get a legal block (the kernel strides on its scalar path).
        assert_eq!(row_threads(1 << 20, true), 1024);
    }

    #[test]
    fn plan_checks_n_and_rows() {
        assert!(plan_rows("t", 2, 0, true).is_err());
        assert!(plan_rows("t", 2, 1 << 31, true).is_err());
        assert!(plan_rows("t", 1 << 31, 8, true).is_err());
        let cfg = plan_rows("t", 7175, 1024, true).expect("300M shape");
        assert_eq!((cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes), ((7175, 1, 1), (32, 1, 1), 0));
    }

    #[test]
    fn strided_extents() {
        // q columns and k columns of a fused [rows, 3h] buffer.
        let (rows, h) = (5, 64);
        assert!(check_strided("t", "x", rows * 3 * h, rows, h, 3 * h).is_ok());
        assert!(check_strided("t", "x", rows * 3 * h - h, rows, h, 3 * h).is_ok());
        assert!(check_strided("t", "x", (rows - 1) * 3 * h + h - 1, rows, h, 3 * h).is_err());
        assert!(check_strided("t", "x", 100, 2, 64, 63).is_err());
        assert!(check_strided("t", "x", 0, 0, 64, 64).is_ok());
        assert!(check_strided("t", "x", usize::MAX, usize::MAX, 64, 64).is_err());
        let err = check_strided("layernorm_bf16", "out", 10, 2, 8, 8).unwrap_err().to_string();
        assert!(err.contains("out holds 10 elements, 2 rows of 8 with stride 8 need 16"), "{err}");
    }

    #[test]
    fn exact_lengths() {
        assert!(check_lens("t", &[("weight", 8, 8), ("bias", 8, 8)]).is_ok());
        let err = check_lens("t", &[("weight", 8, 8), ("bias", 7, 8)]).unwrap_err().to_string();
        assert!(err.contains("bias holds 7 elements, expected 8"), "{err}");
    }
}
