//! Launcher for `kernels/rope_kv.cu`: after the fused QKV GEMM, add the q/k/v biases, apply half-split RoPE
//! to q and k, write q out and k, v into one layer's paged cache (layout in `kv/mod.rs`), optionally also into
//! contiguous k/v buffers. Twin: `bf16(x + b)` then `backend/cpu/rope.rs`'s `rope` for q and k, and a plain
//! copy of `bf16(v + b)`; the kernel computes the CPU's f32 formula (rounding notes in the .cu header).
//! Positions and cache slots are device arrays, one per token, so tokens of many sequences share a launch and
//! a captured graph replays with new values.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{guarded, CudaDevice, Error, Result};

const MODULE: &str = "rope_kv";
const MAX_THREADS: usize = 1024;

/// The shape of one launch. The cache's slot count is derived from its length (`len / (kv_heads * head_dim)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeKvShape {
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// 64 or 128.
    pub head_dim: usize,
}

impl RopeKvShape {
    /// Width of a fused QKV row: `(heads + 2 kv_heads) * head_dim`.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// Checks the shape and every length; returns the launch and the cache's slot count. One block per token,
/// threads for every (head, group of 8 frequencies) and at least d/2 (the cos/sin table).
pub(crate) fn plan(
    op: &'static str,
    s: RopeKvShape,
    cache_len: usize,
    lens: &[(&str, usize, usize)],
) -> Result<(LaunchConfig, usize)> {
    let invalid = |msg: String| Error::Invalid { op, msg };
    match s.head_dim {
        64 | 128 => {}
        d => return Err(invalid(format!("head_dim {d} is not supported (64 or 128)"))),
    }
    if s.heads == 0 || s.kv_heads == 0 {
        return Err(invalid(format!("heads ({}) and kv_heads ({}) must be > 0", s.heads, s.kv_heads)));
    }
    let total_heads = s.heads.checked_add(2 * s.kv_heads).filter(|&h| h <= 4096);
    let Some(total_heads) = total_heads else {
        return Err(invalid(format!("{} + 2 * {} heads is too many", s.heads, s.kv_heads)));
    };
    let grid = u32::try_from(s.tokens).ok().filter(|&r| r <= i32::MAX as u32);
    let Some(grid) = grid else {
        return Err(invalid(format!("{} tokens exceed the grid limit 2^31-1", s.tokens)));
    };
    let row = s.kv_heads * s.head_dim;
    if !cache_len.is_multiple_of(row) {
        return Err(invalid(format!(
            "k/v cache of {cache_len} elements is not whole slots of {} kv heads x {}",
            s.kv_heads, s.head_dim
        )));
    }
    for &(name, got, want) in lens {
        if got != want {
            return Err(invalid(format!("{name} holds {got} elements, expected {want} for {s:?}")));
        }
    }
    let items = total_heads * s.head_dim / 16;
    let threads = items.max(s.head_dim / 2).next_multiple_of(32).min(MAX_THREADS) as u32;
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    Ok((cfg, cache_len / row))
}

fn numel(op: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or(Error::Invalid { op, msg: format!("{a} x {b} overflows") })
}

/// Inputs of [`qkv_bias_rope_write_kv_bf16`], all on the device.
pub struct RopeKvInputs<'a, 'b> {
    /// `[tokens, (heads + 2 kv_heads) * head_dim]`: q heads, k heads, v heads (a fused GEMM output, no bias).
    pub qkv: &'b CudaView<'a, bf16>,
    /// `[(heads + 2 kv_heads) * head_dim]` in the same order, or None.
    pub bias: Option<&'b CudaView<'a, bf16>>,
    /// `[tokens]`, each token's position.
    pub positions: &'b CudaView<'a, i32>,
    /// `[head_dim / 2]` (`TextParams::inv_freq`).
    pub inv_freq: &'b CudaView<'a, f32>,
    /// `[tokens]`, each token's cache slot `block * block_size + offset`; -1 skips the token's k/v write.
    pub slots: &'b CudaView<'a, i32>,
}

/// Outputs of [`qkv_bias_rope_write_kv_bf16`].
pub struct RopeKvOutputs<'a, 'b> {
    /// `[tokens, heads * head_dim]`.
    pub q: &'b mut CudaViewMut<'a, bf16>,
    /// One layer's `[num_blocks, block_size, kv_heads, head_dim]` each.
    pub k_cache: &'b mut CudaViewMut<'a, bf16>,
    pub v_cache: &'b mut CudaViewMut<'a, bf16>,
    /// Contiguous `[tokens, kv_heads * head_dim]` copies of k and v, or None.
    pub kv: Option<(&'b mut CudaViewMut<'a, bf16>, &'b mut CudaViewMut<'a, bf16>)>,
    /// `[1]` error word: a slot < -1 or past the cache sets `embed::ERR_BAD_KV_SLOT` (the token is not written).
    pub err: &'b mut CudaViewMut<'a, u32>,
}

/// `q = rope(bf16(q + bq))`, cache k = `rope(bf16(k + bk))`, cache v = `bf16(v + bv)` (module docs).
pub fn qkv_bias_rope_write_kv_bf16(
    dev: &CudaDevice,
    s: RopeKvShape,
    inp: &RopeKvInputs<'_, '_>,
    out: &mut RopeKvOutputs<'_, '_>,
) -> Result<()> {
    const OP: &str = "qkv_bias_rope_write_kv_bf16";
    let width = numel(OP, s.heads + 2 * s.kv_heads, s.head_dim)?;
    let kv_row = numel(OP, s.kv_heads, s.head_dim)?;
    let mut lens = vec![
        ("qkv", inp.qkv.len(), numel(OP, s.tokens, width)?),
        ("positions", inp.positions.len(), s.tokens),
        ("inv_freq", inp.inv_freq.len(), s.head_dim / 2),
        ("slots", inp.slots.len(), s.tokens),
        ("q", out.q.len(), numel(OP, s.tokens, numel(OP, s.heads, s.head_dim)?)?),
        ("v_cache", out.v_cache.len(), out.k_cache.len()),
        ("err", out.err.len(), 1),
    ];
    if let Some(b) = inp.bias {
        lens.push(("bias", b.len(), width));
    }
    if let Some((k, v)) = &out.kv {
        let n = numel(OP, s.tokens, kv_row)?;
        lens.push(("k_out", k.len(), n));
        lens.push(("v_out", v.len(), n));
    }
    let (cfg, num_slots) = plan(OP, s, out.k_cache.len(), &lens)?;
    if s.tokens == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "qkv_bias_rope_write_kv_bf16")?;
    let null: u64 = 0;
    let (hq, hk, d) = (s.heads as i32, s.kv_heads as i32, s.head_dim as i32);
    let num_slots = num_slots as i64;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(inp.qkv);
    match inp.bias {
        Some(b) => launch.arg(b),
        None => launch.arg(&null),
    };
    launch.arg(inp.positions).arg(inp.inv_freq).arg(inp.slots).arg(&mut *out.q);
    launch.arg(&mut *out.k_cache).arg(&mut *out.v_cache);
    match &mut out.kv {
        Some((k, v)) => launch.arg(&mut **k).arg(&mut **v),
        None => launch.arg(&null).arg(&null),
    };
    launch.arg(&mut *out.err).arg(&hq).arg(&hk).arg(&d).arg(&num_slots);
    // SAFETY: the arguments match qkv_bias_rope_write_kv_bf16(const bf16* qkv, const bf16* bias, const int*,
    // const float*, const int*, bf16* q, bf16* k_cache, bf16* v_cache, bf16* k_out, bf16* v_out, u32* err, int,
    // int, int, long long), absent buffers passed as null pointers (8-byte zero), which the kernel tests. `plan`
    // checked head_dim is 64 or 128 (d % 16 == 0, d/2 <= the kernel's 128-entry table), qkv holds
    // tokens * (hq + 2hk) * d, bias (hq + 2hk) * d, positions and slots tokens, inv_freq d/2, q tokens * hq * d,
    // k_out/v_out tokens * hk * d, the caches whole slots of hk * d (num_slots of them, which the kernel bounds
    // every slot by), err one word; the grid is one block per token. Every output is a distinct &mut view, so
    // none aliases another or an input.
    guarded("launch qkv_bias_rope_write_kv_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(tokens: usize, heads: usize, kv_heads: usize, head_dim: usize) -> RopeKvShape {
        RopeKvShape { tokens, heads, kv_heads, head_dim }
    }

    #[test]
    fn model_shapes_cover_every_item() {
        // (heads, kv_heads, head_dim, threads): 1B, 8B, 38B.
        for (h, kv, d, threads) in [(14, 2, 64, 96), (28, 4, 128, 288), (40, 8, 128, 448)] {
            let s = shape(17, h, kv, d);
            let (cfg, slots) = plan("t", s, 10 * 16 * kv * d, &[]).expect("valid");
            assert_eq!(cfg.block_dim.0, threads, "{s:?}");
            assert_eq!(cfg.grid_dim.0, 17);
            assert_eq!(slots, 160);
            assert!(cfg.block_dim.0 as usize >= d / 2);
            assert_eq!(s.qkv_width(), (h + 2 * kv) * d);
        }
        // One head of 64: the d/2 table still gets a thread per frequency.
        let (cfg, _) = plan("t", shape(1, 1, 1, 64), 64, &[]).expect("valid");
        assert_eq!(cfg.block_dim.0, 32);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(plan("t", shape(4, 14, 2, 80), 160, &[]).is_err());
        assert!(plan("t", shape(4, 14, 2, 256), 512, &[]).is_err());
        assert!(plan("t", shape(4, 0, 2, 64), 128, &[]).is_err());
        assert!(plan("t", shape(4, 14, 0, 64), 128, &[]).is_err());
        assert!(plan("t", shape(usize::MAX, 14, 2, 64), 128, &[]).is_err());
        assert!(plan("t", shape(4, 14, 2, 64), 129, &[]).is_err());
        let err = plan("rope", shape(4, 14, 2, 64), 128, &[("slots", 3, 4)]).unwrap_err().to_string();
        assert!(err.contains("slots holds 3 elements, expected 4"), "{err}");
        assert!(numel("t", usize::MAX, 2).is_err());
    }
}
