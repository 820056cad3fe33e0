//! Launchers for `kernels/fill.cu`: random-uniform bf16 fills (random-weight models of real size built on the
//! device) and f32 -> bf16 conversion. `fill_uniform_bf16` reproduces `selfcheck::Rng::new(seed).bf16s(n, amp,
//! offset)` bit for bit, so the host can rebuild any filled tensor; [`uniform_host`] is that reference.
//!
//! Per-tensor seeds should be hashed from a name, not counted: seeds `s` and `s + k * 0x9E3779B97F4A7C15` give
//! the same stream shifted by `k` elements (it is SplitMix64's counter).

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::layernorm::check_lens;
use super::{guarded, CudaDevice, Error, Result};

const MODULE: &str = "fill";
const THREADS: usize = 256;
/// Enough blocks to fill every SM of an H200 several times over; larger buffers are covered by the kernels'
/// grid-stride loops.
const MAX_BLOCKS: usize = 8192;

/// A grid-stride launch over `ceil(n / 8)` units of 8 elements.
pub fn plan(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(8).div_ceil(THREADS).clamp(1, MAX_BLOCKS);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 }
}

/// The host twin of the device fill: exactly `Rng::new(seed).bf16s(n, amp, offset)`.
pub fn uniform_host(seed: u64, n: usize, amp: f32, offset: f32) -> Vec<bf16> {
    crate::selfcheck::Rng::new(seed).bf16s(n, amp, offset)
}

/// `out[i] = bf16(offset + (2u_i - 1) * amp)`, `u_i` the i-th 24-bit uniform of SplitMix64 seeded with `seed`
/// (uniform in `[offset - amp, offset + amp)` before the rounding to bf16).
pub fn fill_uniform_bf16(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, bf16>,
    seed: u64,
    amp: f32,
    offset: f32,
) -> Result<()> {
    const OP: &str = "fill_uniform_bf16";
    if !amp.is_finite() || !offset.is_finite() {
        return Err(Error::Invalid { op: OP, msg: format!("amp {amp} and offset {offset} must be finite") });
    }
    let n = out.len();
    if n == 0 {
        return Ok(());
    }
    let cfg = plan(n);
    let f = dev.kernels.function(MODULE, "fill_uniform_bf16")?;
    let n_u64 = n as u64;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(&mut *out).arg(&n_u64).arg(&seed).arg(&amp).arg(&offset);
    // SAFETY: the arguments match fill_uniform_bf16(bf16*, unsigned long long, unsigned long long, float,
    // float); n is the view's length and the kernel writes only indices < n; any grid is valid for its
    // grid-stride loop.
    guarded("launch fill_uniform_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

/// `out[i] = bf16(input[i])`, round to nearest even; equal lengths.
pub fn f32_to_bf16(dev: &CudaDevice, input: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, bf16>) -> Result<()> {
    const OP: &str = "f32_to_bf16";
    check_lens(OP, &[("out", out.len(), input.len())])?;
    let n = input.len();
    if n == 0 {
        return Ok(());
    }
    let cfg = plan(n);
    let f = dev.kernels.function(MODULE, "f32_to_bf16")?;
    let n_u64 = n as u64;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(input).arg(&mut *out).arg(&n_u64);
    // SAFETY: the arguments match f32_to_bf16(const float*, bf16*, unsigned long long); both views hold n
    // elements and the kernel touches only indices < n; out is a &mut view (of bf16, input of f32), so the
    // two are distinct allocations.
    guarded("launch f32_to_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_bounded_and_covers_small_buffers() {
        assert_eq!(plan(1).grid_dim, (1, 1, 1));
        assert_eq!(plan(8 * 256).grid_dim, (1, 1, 1));
        assert_eq!(plan(8 * 256 + 1).grid_dim, (2, 1, 1));
        assert_eq!(plan(1 << 34).grid_dim.0 as usize, MAX_BLOCKS);
    }

    #[test]
    fn host_twin_is_the_selfcheck_stream() {
        let v = uniform_host(42, 1000, 0.5, 2.0);
        assert_eq!(v, crate::selfcheck::Rng::new(42).bf16s(1000, 0.5, 2.0));
        assert!(v.iter().all(|x| (1.5..=2.5).contains(&x.to_f32())));
        // A prefix of a longer fill is the shorter fill.
        assert_eq!(uniform_host(42, 10, 0.5, 2.0), v[..10]);
    }
}
