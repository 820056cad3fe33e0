//! Launcher for `kernels/pixel_shuffle.cu`: CLS drop + pixel shuffle (scale 0.5) + the projector's LayerNorm
//! over 4h, fused. Twin of `backend/cpu/pixel_shuffle.rs` followed by `backend/cpu/norm.rs`'s `layer_norm`.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::layernorm::{check_lens, row_threads};
use super::{guarded, CudaDevice, Error, Result};

const MODULE: &str = "pixel_shuffle";

/// One block per shuffled token (`tiles * (g/2)^2` rows of `4h`). The register path needs `h % 8 == 0` (a
/// vector never straddles two source patches), so threads are sized for it only then.
pub fn plan(tiles: usize, g: usize, h: usize) -> Result<LaunchConfig> {
    let invalid = |msg: String| Error::Invalid { op: "shuffle_layernorm_bf16", msg };
    if g == 0 || !g.is_multiple_of(2) {
        return Err(invalid(format!("patch grid side g = {g} must be even and > 0")));
    }
    if h == 0 {
        return Err(invalid("hidden size h must be > 0".into()));
    }
    let n = h.checked_mul(4).filter(|&v| i32::try_from(v).is_ok());
    let Some(n) = n else {
        return Err(invalid(format!("4h = 4*{h} exceeds i32::MAX")));
    };
    // The kernel forms g*g and g*h (row offsets) in int before widening; keep both well inside i32.
    let g2 = g.checked_mul(g).filter(|&v| v < i32::MAX as usize);
    if g2.is_none() || g.checked_mul(h).is_none_or(|v| v > i32::MAX as usize) {
        return Err(invalid(format!("grid {g} x hidden {h} too large")));
    }
    let rows = tiles.checked_mul((g / 2) * (g / 2)).filter(|&r| r <= i32::MAX as usize);
    let Some(rows) = rows else {
        return Err(invalid(format!("{tiles} tiles of {} tokens exceed the grid limit", (g / 2) * (g / 2))));
    };
    let threads = row_threads(n, h.is_multiple_of(8));
    Ok(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// `out [tiles * (g/2)^2, 4h] = LayerNorm_4h(pixel_shuffle(x without its CLS rows); w, b, eps)`, `x [tiles, 1 +
/// g^2, h]` (the vision tower's last hidden state), `w`, `b` `[4h]`; column `dy*2h + dx*h + ch` of token
/// `r*(g/2) + s` is channel `ch` of patch `(2r + dy, 2s + dx)`.
#[allow(clippy::too_many_arguments)]
pub fn shuffle_layernorm_bf16(
    dev: &CudaDevice,
    x: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    b: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    tiles: usize,
    g: usize,
    h: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "shuffle_layernorm_bf16";
    let cfg = plan(tiles, g, h)?;
    let rows = cfg.grid_dim.0 as usize;
    let x_len = tiles.checked_mul(g * g + 1).and_then(|v| v.checked_mul(h));
    let Some(x_len) = x_len else {
        return Err(Error::Invalid { op: OP, msg: format!("[{tiles}, {}, {h}] overflows", g * g + 1) });
    };
    check_lens(OP, &[("x", x.len(), x_len), ("weight", w.len(), 4 * h), ("bias", b.len(), 4 * h)])?;
    check_lens(OP, &[("out", out.len(), rows * 4 * h)])?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "shuffle_layernorm_bf16")?;
    let (g_i32, h_i32) = (g as i32, h as i32);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x).arg(w).arg(b).arg(&mut *out).arg(&g_i32).arg(&h_i32).arg(&eps);
    // SAFETY: the arguments match shuffle_layernorm_bf16(const bf16*, const bf16*, const bf16*, bf16*, int,
    // int, float); x holds [tiles, 1 + g^2, h], w and b 4h, out [tiles * (g/2)^2, 4h] elements; g is even;
    // g*g, g*h and 4h fit i32; the grid is one block per output row (<= 2^31-1) of a multiple of 32 threads
    // <= 1024; out is a &mut view, so it does not overlap x, w or b.
    guarded("launch shuffle_layernorm_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::layernorm::MAX_VECS_PER_THREAD;

    #[test]
    fn one_block_per_token_and_rows_in_registers() {
        for (tiles, g, h) in [(7, 32, 1024), (7, 32, 3200), (1, 2, 64), (3, 4, 72), (2, 6, 8)] {
            let cfg = plan(tiles, g, h).expect("valid shape");
            assert_eq!(cfg.grid_dim, ((tiles * (g / 2) * (g / 2)) as u32, 1, 1));
            let t = cfg.block_dim.0 as usize;
            assert!(t.is_multiple_of(32) && t <= 1024, "h={h}: {t} threads");
            if h.is_multiple_of(8) {
                assert!(t * MAX_VECS_PER_THREAD * 8 >= 4 * h, "h={h}: row does not fit {t} threads");
            }
        }
        assert_eq!(plan(7, 32, 1024).map(|c| c.block_dim.0).ok(), Some(128));
        assert_eq!(plan(7, 32, 3200).map(|c| c.block_dim.0).ok(), Some(416));
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(plan(1, 3, 64).is_err());
        assert!(plan(1, 0, 64).is_err());
        assert!(plan(1, 32, 0).is_err());
        assert!(plan(1, 32, 1 << 30).is_err());
        assert!(plan(usize::MAX, 32, 64).is_err());
        assert!(plan(0, 32, 64).is_ok());
    }
}
