//! Launcher for `kernels/patch_embed.cu`: InternViT's embeddings (14x14 stride-14 conv + bias, CLS row,
//! position embeddings) as one tensor-core implicit GEMM. Twin of `backend/cpu/patch_embed.rs`. The tile shape
//! is fixed in the kernel (64 patches x 64 channels, 128 threads); the host sizes the grid and checks shapes.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::layernorm::check_lens;
use super::{guarded, CudaDevice, Error, Result};

const MODULE: &str = "patch_embed";
/// The kernel's fixed patch size and input channels (`kPatch`, `kChannels`).
pub const PATCH: usize = 14;
pub const CHANNELS: usize = 3;
/// Must equal `kBM`, `kBN` and `kThreads` in kernels/patch_embed.cu.
const TILE_M: usize = 64;
const TILE_N: usize = 64;
const THREADS: u32 = 128;
const MAX_GRID_Y: usize = 65_535;

/// The checked geometry of one call.
#[derive(Debug, Clone, Copy)]
pub struct PatchGeometry {
    /// Patches per image side (`image_size / 14`).
    pub grid: usize,
    /// Tokens per image, CLS included (`1 + grid^2`).
    pub tokens: usize,
    pub cfg: LaunchConfig,
}

/// Checks `tiles` images of `image_size`^2 into `h` channels and sizes the grid: one block per 64 patches x 64
/// channels. Every int the kernel forms from these (patch index, block offsets, image index) fits i32.
pub fn plan(tiles: usize, image_size: usize, h: usize) -> Result<PatchGeometry> {
    let invalid = |msg: String| Error::Invalid { op: "patch_embed_bf16", msg };
    if image_size == 0 || !image_size.is_multiple_of(PATCH) {
        return Err(invalid(format!("image size {image_size} is not a positive multiple of the patch size {PATCH}")));
    }
    if h == 0 {
        return Err(invalid("hidden size h must be > 0".into()));
    }
    if image_size > i32::MAX as usize / 3 || h > i32::MAX as usize {
        return Err(invalid(format!("image size {image_size} or h {h} too large")));
    }
    let grid = image_size / PATCH;
    let tokens = grid * grid + 1;
    // The kernel forms patch indices up to tiles * g^2 and block offsets m0 + 64 + g^2 in int; bound them all
    // (with at least one tile, so that the host's products below cannot overflow either).
    let patches = tiles.max(1).checked_mul(tokens).filter(|&v| v.saturating_add(tokens + TILE_M) <= i32::MAX as usize);
    if patches.is_none() {
        return Err(invalid(format!("{tiles} tiles of {tokens} tokens exceed the kernel's i32 patch index")));
    }
    let grid_y = h.div_ceil(TILE_N);
    if grid_y > MAX_GRID_Y {
        return Err(invalid(format!("h {h} needs {grid_y} column blocks, more than {MAX_GRID_Y}")));
    }
    let grid_x = (tiles * grid * grid).div_ceil(TILE_M);
    let cfg =
        LaunchConfig { grid_dim: (grid_x as u32, grid_y as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    Ok(PatchGeometry { grid, tokens, cfg })
}

/// `out [tiles, 1 + g^2, h]`: row 0 of each tile `bf16(cls + pos[0])`, row `1 + p` the conv of patch `p`
/// (row-major) `bf16(bf16(conv + b) + pos[1 + p])`. `pixels [tiles, 3, S, S]`, `w [h, 3, 14, 14]`, `b`, `cls`
/// `[h]`, `pos [1 + g^2, h]`, `S = image_size`, `g = S / 14`.
#[allow(clippy::too_many_arguments)]
pub fn patch_embed_bf16(
    dev: &CudaDevice,
    pixels: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    b: &CudaView<'_, bf16>,
    cls: &CudaView<'_, bf16>,
    pos: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    tiles: usize,
    image_size: usize,
    h: usize,
) -> Result<()> {
    const OP: &str = "patch_embed_bf16";
    let geo = plan(tiles, image_size, h)?;
    // plan bounded tiles * tokens and image_size; these products fit usize on any 64-bit host.
    let s = image_size;
    let lens = [
        ("pixels", pixels.len(), tiles * CHANNELS * s * s),
        ("weight", w.len(), h * CHANNELS * PATCH * PATCH),
        ("bias", b.len(), h),
        ("cls", cls.len(), h),
        ("pos", pos.len(), geo.tokens * h),
        ("out", out.len(), tiles * geo.tokens * h),
    ];
    check_lens(OP, &lens)?;
    if tiles == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "patch_embed_bf16")?;
    let (n_img, s_i32, h_i32) = (tiles as i32, s as i32, h as i32);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(pixels).arg(w).arg(b).arg(cls).arg(pos).arg(&mut *out).arg(&n_img).arg(&s_i32).arg(&h_i32);
    // SAFETY: the arguments match patch_embed_bf16(const bf16* x5, bf16*, int, int, int); every buffer holds
    // exactly the elements of its documented shape, S is a multiple of 14, the ints and the kernel's patch
    // indices fit i32 (plan), the grid is ceil(tiles*g^2/64) x ceil(h/64) <= 65535 blocks of exactly 128
    // threads with 20 KiB of static shared memory; out is a &mut view, so it overlaps no input.
    guarded("launch patch_embed_bf16", || unsafe { launch.launch(geo.cfg) }.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_patches_and_channels() {
        for (tiles, s, h) in [(7, 448, 1024), (7, 448, 3200), (1, 28, 64), (3, 56, 72), (2, 14, 96), (13, 448, 3200)] {
            let geo = plan(tiles, s, h).expect("valid shape");
            let g = s / PATCH;
            assert_eq!(geo.grid, g);
            assert_eq!(geo.tokens, g * g + 1);
            let (gx, gy, gz) = geo.cfg.grid_dim;
            assert_eq!(gz, 1);
            assert!(gx as usize * TILE_M >= tiles * g * g && (gx as usize - 1) * TILE_M < tiles * g * g);
            assert!(gy as usize * TILE_N >= h && (gy as usize - 1) * TILE_N < h);
            assert_eq!(geo.cfg.block_dim, (THREADS, 1, 1));
        }
        assert_eq!(plan(7, 448, 1024).map(|g| g.cfg.grid_dim).ok(), Some((112, 16, 1)));
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(plan(1, 0, 64).is_err());
        assert!(plan(1, 449, 64).is_err());
        assert!(plan(1, 448, 0).is_err());
        assert!(plan(usize::MAX / 2, 448, 64).is_err());
        assert!(plan(1, 448, 64 * 65_536).is_err());
        let err = plan(1, 450, 64).unwrap_err().to_string();
        assert!(err.contains("not a positive multiple of the patch size 14"), "{err}");
    }
}
