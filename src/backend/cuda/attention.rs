//! Launchers for `kernels/flash_attn.cu`, the bf16 twins of `backend::attention` (dense q/k/v, bidirectional
//! or causal with an offset) and of `backend::paged_attention` for prefill (causal, keys and values read from
//! the paged KV cache, several sequences per launch).
//!
//! Operands are given as a base view plus a row stride in elements, so q, k and v may be column ranges of one
//! fused `[tokens, (hq + 2 hk) d]` QKV buffer: row `i` of sequence `b`, head `j` of q starts at
//! `(b * tq + i) * ld_q + j * d` of its view. Shapes are checked here by pure functions (unit-tested without a
//! GPU); the kernels choose their 16-byte or scalar paths from the pointers' alignment themselves.
//!
//! The dense kernels come in versions with the same contract and per-row arithmetic ([`FlashVersion`]): v1 (the
//! verified default, blocks of 8 warps x 16 query rows), v2 (4 warps x 16 rows, several blocks resident per SM)
//! and v3 (head dim 64: 4 warps x 32 rows; head dim 128 runs v2), picked with `FACELLM_FLASH=v2` or `v3` (read
//! once). Paged prefill has one version.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{guarded, CudaDevice, Error, Result};

const MODULE: &str = "flash_attn";
/// Query rows per block (`kBlockM` in kernels/flash_attn.cu).
const BLOCK_M: usize = 128;
/// Keys per shared-memory tile (`kBlockN`).
const BLOCK_N: usize = 64;
const THREADS: u32 = 256;
/// Tokens per KV-cache block the paged kernels are built for (`kPage`).
pub const PAGE: usize = 16;
/// Sizes the kernels index with `int`; 2^30 leaves headroom for `n + BLOCK_M` style sums.
const MAX_DIM: usize = 1 << 30;
const MAX_GRID_YZ: usize = 65535;

/// Query rows per v2 block (`16 * kWarpsV2`) and per v3 block (`16 * kWarpsV2 * kMtV3`); both run 4 warps.
const V2_BLOCK_M: usize = 64;
const V3_BLOCK_M: usize = 128;
const V2_THREADS: u32 = 128;

/// Dynamic shared memory of one block: a Q tile and two K and two V tiles, bf16.
pub fn smem_bytes(head_dim: usize) -> usize {
    smem_bytes_rows(BLOCK_M, head_dim)
}

fn smem_bytes_rows(block_m: usize, head_dim: usize) -> usize {
    (block_m * head_dim + 4 * BLOCK_N * head_dim) * 2
}

/// Which dense flash kernels [`flash_attn_bf16`] launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashVersion {
    /// Blocks of 8 warps and 128 query rows (the first verified kernels, the default).
    V1,
    /// Blocks of 4 warps and 64 query rows, launch bounds for 3 (head dim 64) or 2 (128) blocks per SM.
    V2,
    /// Head dim 64: blocks of 4 warps of 32 query rows (each K/V fragment feeds two row tiles), 2 blocks per SM.
    /// Head dim 128: the v2 kernels.
    V3,
}

impl FlashVersion {
    pub fn label(self) -> &'static str {
        match self {
            FlashVersion::V1 => "v1",
            FlashVersion::V2 => "v2",
            FlashVersion::V3 => "v3",
        }
    }

    /// Query rows and threads per block at `head_dim`.
    fn block(self, head_dim: usize) -> (usize, u32) {
        match (self, head_dim) {
            (FlashVersion::V1, _) => (BLOCK_M, THREADS),
            (FlashVersion::V3, 64) => (V3_BLOCK_M, V2_THREADS),
            _ => (V2_BLOCK_M, V2_THREADS),
        }
    }
}

/// The dense kernels [`flash_attn_bf16`] launches: v1, or v2 / v3 when the environment variable `FACELLM_FLASH`
/// is `v2` / `v3` (read once).
pub fn flash_version() -> FlashVersion {
    static VERSION: std::sync::OnceLock<FlashVersion> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| match std::env::var("FACELLM_FLASH").as_deref() {
        Ok("v2") => FlashVersion::V2,
        Ok("v3") => FlashVersion::V3,
        _ => FlashVersion::V1,
    })
}

/// Dense attention shape: `batch` sequences of `tq` queries and `tk` keys each, `hq` query heads and `hk` kv
/// heads of `head_dim`; `ld_*` are the row strides (elements) of q, k, v and the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub hq: usize,
    pub hk: usize,
    /// 64 or 128.
    pub head_dim: usize,
    pub ld_q: usize,
    pub ld_k: usize,
    pub ld_v: usize,
    pub ld_o: usize,
}

impl AttnShape {
    /// Separate contiguous q, k, v and output buffers (`ld` = heads * head_dim).
    pub fn dense(batch: usize, tq: usize, tk: usize, hq: usize, hk: usize, head_dim: usize) -> AttnShape {
        let (q, kv) = (hq * head_dim, hk * head_dim);
        AttnShape { batch, tq, tk, hq, hk, head_dim, ld_q: q, ld_k: kv, ld_v: kv, ld_o: q }
    }

    /// q, k, v as the column ranges of one fused QKV buffer `[batch * t, (hq + 2 hk) head_dim]` (tq = tk = t),
    /// output contiguous.
    pub fn fused_qkv(batch: usize, t: usize, hq: usize, hk: usize, head_dim: usize) -> AttnShape {
        let ld = (hq + 2 * hk) * head_dim;
        AttnShape { ld_q: ld, ld_k: ld, ld_v: ld, ..AttnShape::dense(batch, t, t, hq, hk, head_dim) }
    }

    /// Multiply-adds of Q Kᵀ and P V counted as 2 flops each, over the (query, key) pairs the mask keeps.
    pub fn flops(&self, causal: Option<usize>) -> f64 {
        let pairs = match causal {
            // Query i sees min(p + i + 1, tk) keys.
            Some(p) => (0..self.tq).map(|i| (p + i + 1).min(self.tk) as f64).sum::<f64>(),
            None => (self.tq * self.tk) as f64,
        };
        4.0 * (self.batch * self.hq * self.head_dim) as f64 * pairs
    }
}

/// Elements a view must hold for `rows` rows of `width` elements, `ld` apart (the last row may be short of ld).
fn rows_len(op: &'static str, rows: usize, ld: usize, width: usize) -> Result<usize> {
    if rows == 0 {
        return Ok(0);
    }
    (rows - 1)
        .checked_mul(ld)
        .and_then(|n| n.checked_add(width))
        .ok_or(Error::Invalid { op, msg: format!("{rows} rows of stride {ld} overflow") })
}

fn check_lens(op: &'static str, lens: &[(&str, usize, usize)], what: &dyn std::fmt::Debug) -> Result<()> {
    for &(name, got, want) in lens {
        if got < want {
            return Err(Error::Invalid {
                op,
                msg: format!("{name} holds {got} elements, needs >= {want} for {what:?}"),
            });
        }
    }
    Ok(())
}

/// Checks shared by both entry points: head dim, head counts, strides against row widths.
fn check_heads(op: &'static str, hq: usize, hk: usize, head_dim: usize) -> Result<()> {
    let invalid = |msg: String| Error::Invalid { op, msg };
    if !matches!(head_dim, 64 | 128) {
        return Err(invalid(format!("head_dim {head_dim} is not supported (64 or 128)")));
    }
    if hq == 0 || hk == 0 || !hq.is_multiple_of(hk) {
        return Err(invalid(format!("query heads ({hq}) must be a positive multiple of kv heads ({hk})")));
    }
    if hq > MAX_GRID_YZ {
        return Err(invalid(format!("{hq} query heads exceed the grid limit {MAX_GRID_YZ}")));
    }
    Ok(())
}

fn check_strides(op: &'static str, strides: &[(&str, usize, usize)]) -> Result<()> {
    for &(name, ld, width) in strides {
        if ld < width {
            return Err(Error::Invalid { op, msg: format!("{name} row stride {ld} is less than its width {width}") });
        }
        if ld > MAX_DIM {
            return Err(Error::Invalid { op, msg: format!("{name} row stride {ld} exceeds 2^30") });
        }
    }
    Ok(())
}

/// A checked launch: which kernel, its grid and its dynamic shared memory.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub kernel: &'static str,
    pub cfg: LaunchConfig,
}

/// Checks a dense launch against the views' lengths `(q, k, v, out)` and picks the v1 kernel. `causal = Some(p)`:
/// query i sits at key position p + i. `None` launch means nothing to do (no queries).
pub fn plan(s: &AttnShape, causal: Option<usize>, lens: (usize, usize, usize, usize)) -> Result<Option<Plan>> {
    plan_version(s, causal, lens, FlashVersion::V1)
}

/// As [`plan`], for the kernels of `version` (same checks).
pub fn plan_version(
    s: &AttnShape,
    causal: Option<usize>,
    lens: (usize, usize, usize, usize),
    version: FlashVersion,
) -> Result<Option<Plan>> {
    const OP: &str = "flash_attn_bf16";
    let invalid = |msg: String| Error::Invalid { op: OP, msg };
    check_heads(OP, s.hq, s.hk, s.head_dim)?;
    let (qw, kw) = (s.hq * s.head_dim, s.hk * s.head_dim);
    check_strides(OP, &[("q", s.ld_q, qw), ("k", s.ld_k, kw), ("v", s.ld_v, kw), ("out", s.ld_o, qw)])?;
    for (name, n) in [("tq", s.tq), ("tk", s.tk), ("causal offset", causal.unwrap_or(0))] {
        if n > MAX_DIM {
            return Err(invalid(format!("{name} {n} exceeds 2^30")));
        }
    }
    if s.batch > MAX_GRID_YZ {
        return Err(invalid(format!("batch {} exceeds the grid limit {MAX_GRID_YZ}", s.batch)));
    }
    match causal {
        Some(p) if p + s.tq > s.tk => {
            return Err(invalid(format!(
                "causal offset {p} with {} queries needs >= {} keys, got tk {}",
                s.tq,
                p + s.tq,
                s.tk
            )))
        }
        None if s.tk == 0 && s.tq > 0 => return Err(invalid("no keys to attend to (tk = 0)".into())),
        _ => {}
    }
    let qrows = s.batch * s.tq;
    let krows = s.batch * s.tk;
    check_lens(
        OP,
        &[
            ("q", lens.0, rows_len(OP, qrows, s.ld_q, qw)?),
            ("k", lens.1, rows_len(OP, krows, s.ld_k, kw)?),
            ("v", lens.2, rows_len(OP, krows, s.ld_v, kw)?),
            ("out", lens.3, rows_len(OP, qrows, s.ld_o, qw)?),
        ],
        s,
    )?;
    if qrows == 0 {
        return Ok(None);
    }
    let kernel = match (version, s.head_dim, causal.is_some()) {
        // check_heads admitted 64 and 128 only.
        (FlashVersion::V1, 64, false) => "flash_attn_fwd_hd64_bf16",
        (FlashVersion::V1, _, false) => "flash_attn_fwd_hd128_bf16",
        (FlashVersion::V1, 64, true) => "flash_attn_fwd_causal_hd64_bf16",
        (FlashVersion::V1, _, true) => "flash_attn_fwd_causal_hd128_bf16",
        (FlashVersion::V2, 64, false) => "flash_attn_fwd_v2_hd64_bf16",
        (FlashVersion::V3, 64, false) => "flash_attn_fwd_v3_hd64_bf16",
        (_, _, false) => "flash_attn_fwd_v2_hd128_bf16",
        (FlashVersion::V2, 64, true) => "flash_attn_fwd_v2_causal_hd64_bf16",
        (FlashVersion::V3, 64, true) => "flash_attn_fwd_v3_causal_hd64_bf16",
        (_, _, true) => "flash_attn_fwd_v2_causal_hd128_bf16",
    };
    let (block_m, threads) = version.block(s.head_dim);
    let cfg = LaunchConfig {
        grid_dim: (s.tq.div_ceil(block_m) as u32, s.hq as u32, s.batch as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem_bytes_rows(block_m, s.head_dim) as u32,
    };
    Ok(Some(Plan { kernel, cfg }))
}

/// The kernel, with its dynamic shared memory limit raised to what the plan needs (96 KiB for head dim 128
/// is above the default 48 KiB; the attribute sticks to the function, so repeating it is cheap).
fn function(dev: &CudaDevice, p: &Plan) -> Result<CudaFunction> {
    let f = dev.kernels.function(MODULE, p.kernel)?;
    let bytes = p.cfg.shared_mem_bytes as i32;
    // cudarc's set_attribute (unlike get_attribute) does not make the context current first.
    guarded("raise flash attention shared memory limit", || {
        dev.ctx.bind_to_thread()?;
        f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)
    })?;
    Ok(f)
}

/// `out = softmax(q kᵀ · scale + mask) v` per sequence and head (bf16 in/out, fp32 softmax); twin of
/// `backend::attention` applied to each of the `batch` sequences. `causal = Some(p)`: query i sits at key
/// position p + i and sees keys `0..=p + i`; `None`: bidirectional. Only the `hq * head_dim` head columns of
/// the output rows are written. Launches the kernels of [`flash_version`].
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_bf16(
    dev: &CudaDevice,
    q: &CudaView<'_, bf16>,
    k: &CudaView<'_, bf16>,
    v: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    s: AttnShape,
    causal: Option<usize>,
    scale: f32,
) -> Result<()> {
    flash_attn_bf16_version(dev, q, k, v, out, s, causal, scale, flash_version())
}

/// [`flash_attn_bf16`] with the kernel version given (the self-check and bench run every version).
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_bf16_version(
    dev: &CudaDevice,
    q: &CudaView<'_, bf16>,
    k: &CudaView<'_, bf16>,
    v: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    s: AttnShape,
    causal: Option<usize>,
    scale: f32,
    version: FlashVersion,
) -> Result<()> {
    let Some(p) = plan_version(&s, causal, (q.len(), k.len(), v.len(), out.len()), version)? else {
        return Ok(());
    };
    let f = function(dev, &p)?;
    let [ld_q, ld_k, ld_v, ld_o, tq, tk, hq, hk] =
        [s.ld_q, s.ld_k, s.ld_v, s.ld_o, s.tq, s.tk, s.hq, s.hk].map(|x| x as i32);
    let q_offset = causal.unwrap_or(0) as i32;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(q).arg(k).arg(v).arg(&mut *out);
    launch.arg(&ld_q).arg(&ld_k).arg(&ld_v).arg(&ld_o).arg(&tq).arg(&tk).arg(&hq).arg(&hk);
    if causal.is_some() {
        launch.arg(&q_offset);
    }
    launch.arg(&scale);
    // SAFETY: the arguments match flash_attn_fwd[_v2][_causal]_hd{64,128}_bf16(const bf16* q, const bf16* k,
    // const bf16* v, bf16* o, int ld_q, int ld_k, int ld_v, int ld_o, int tq, int tk, int hq, int hk,
    // [int q_offset,] float scale). `plan` checked: head_dim is the kernel's (64/128), hq is a positive multiple
    // of hk, every stride covers its row width and fits i32, tq/tk/q_offset <= 2^30 with q_offset + tq <= tk
    // (causal) or tk >= 1, q/out hold batch*tq rows and k/v batch*tk rows at their strides, and the grid
    // (ceil(tq/128), hq <= 65535, batch <= 65535) of 256 threads (v2: ceil(tq/64) blocks of 128 threads; v3 at
    // head dim 64: ceil(tq/128) of 128) with the shared memory whose limit `function` raised. `out` is a &mut view, so it aliases none of the inputs.
    guarded("launch flash attention", || unsafe { launch.launch(p.cfg) }.map(|_| ()))
}

/// Paged prefill: `num_seqs` sequences, sequence s owning query rows `cu_q[s]..cu_q[s + 1]` of q (at most
/// `max_q_len` of them) and attending causally to the first `context_lens[s]` tokens of its block table (the
/// cached prefix and the new tokens, already written), so query i sits at position
/// `context_lens[s] - q_len + i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedPrefillShape {
    pub num_seqs: usize,
    /// Rows of q and out (`cu_q[num_seqs]` must not exceed it).
    pub total_q: usize,
    /// The longest sequence's query count: sizes the grid; rows past it are not computed.
    pub max_q_len: usize,
    pub hq: usize,
    pub hk: usize,
    pub head_dim: usize,
    /// Tokens per cache block; must be [`PAGE`].
    pub block_size: usize,
    /// Width of the `[num_seqs, max_blocks]` block-table array.
    pub max_blocks: usize,
    pub ld_q: usize,
    pub ld_o: usize,
}

/// Lengths of the views a paged prefill reads and writes.
#[derive(Debug, Clone, Copy)]
pub struct PagedPrefillLens {
    pub q: usize,
    pub k_cache: usize,
    pub v_cache: usize,
    pub block_tables: usize,
    pub cu_q: usize,
    pub context_lens: usize,
    pub out: usize,
}

/// Checks a paged prefill launch; returns the plan (None: nothing to do) and the pool's block count.
pub fn plan_paged_prefill(s: &PagedPrefillShape, l: &PagedPrefillLens) -> Result<(Option<Plan>, usize)> {
    const OP: &str = "flash_attn_paged_prefill_bf16";
    let invalid = |msg: String| Error::Invalid { op: OP, msg };
    check_heads(OP, s.hq, s.hk, s.head_dim)?;
    if s.block_size != PAGE {
        return Err(invalid(format!(
            "block size {} is not supported (the kernels are built for {PAGE})",
            s.block_size
        )));
    }
    let (qw, row) = (s.hq * s.head_dim, s.hk * s.head_dim);
    check_strides(OP, &[("q", s.ld_q, qw), ("out", s.ld_o, qw)])?;
    if s.total_q > MAX_DIM || s.max_q_len > s.total_q {
        return Err(invalid(format!("max_q_len {} must be <= total_q {} <= 2^30", s.max_q_len, s.total_q)));
    }
    if s.num_seqs > MAX_GRID_YZ {
        return Err(invalid(format!("{} sequences exceed the grid limit {MAX_GRID_YZ}", s.num_seqs)));
    }
    if s.max_blocks.checked_mul(PAGE).is_none_or(|n| n > i32::MAX as usize) {
        return Err(invalid(format!("block tables of {} blocks exceed 2^31 tokens", s.max_blocks)));
    }
    let block = PAGE * row;
    if l.k_cache != l.v_cache || l.k_cache == 0 || !l.k_cache.is_multiple_of(block) {
        return Err(invalid(format!(
            "k/v caches of {} and {} elements are not the same whole number of blocks of {PAGE} x {} x {}",
            l.k_cache, l.v_cache, s.hk, s.head_dim
        )));
    }
    let num_blocks = l.k_cache / block;
    if num_blocks > i32::MAX as usize {
        return Err(invalid(format!("{num_blocks} cache blocks exceed i32")));
    }
    let table = s.num_seqs.checked_mul(s.max_blocks).ok_or(invalid("block tables overflow".into()))?;
    for (name, got, want) in [
        ("block_tables", l.block_tables, table),
        ("cu_q", l.cu_q, s.num_seqs + 1),
        ("context_lens", l.context_lens, s.num_seqs),
    ] {
        if got != want {
            return Err(invalid(format!("{name} holds {got} elements, expected {want} for {s:?}")));
        }
    }
    check_lens(
        OP,
        &[("q", l.q, rows_len(OP, s.total_q, s.ld_q, qw)?), ("out", l.out, rows_len(OP, s.total_q, s.ld_o, qw)?)],
        s,
    )?;
    if s.num_seqs == 0 || s.max_q_len == 0 {
        return Ok((None, num_blocks));
    }
    let kernel = match s.head_dim {
        64 => "flash_attn_paged_prefill_hd64_bf16",
        _ => "flash_attn_paged_prefill_hd128_bf16",
    };
    let cfg = LaunchConfig {
        grid_dim: (s.max_q_len.div_ceil(BLOCK_M) as u32, s.hq as u32, s.num_seqs as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem_bytes(s.head_dim) as u32,
    };
    Ok((Some(Plan { kernel, cfg }), num_blocks))
}

/// Device-side inputs of [`flash_attn_paged_prefill_bf16`].
pub struct PagedPrefillInputs<'a, 'b> {
    /// `[total_q, >= hq * head_dim]` rows of `ld_q`.
    pub q: &'b CudaView<'a, bf16>,
    /// One layer's `[num_blocks, block_size, hk, head_dim]` each.
    pub k_cache: &'b CudaView<'a, bf16>,
    pub v_cache: &'b CudaView<'a, bf16>,
    /// `[num_seqs, max_blocks]` block ids.
    pub block_tables: &'b CudaView<'a, u32>,
    /// `[num_seqs + 1]`, non-decreasing query row offsets.
    pub cu_q: &'b CudaView<'a, u32>,
    /// `[num_seqs]`, cached + new tokens of each sequence.
    pub context_lens: &'b CudaView<'a, u32>,
}

/// Causal prefill over the paged cache (see [`PagedPrefillShape`]); twin of `backend::paged_attention` with
/// `causal = Some(context_len - q_len)` per sequence. The device arrays are checked by the kernel: a sequence
/// whose context is shorter than its queries or longer than its table, or whose table names a block past the
/// pool, gets NaN rows; one whose rows fall outside `0..total_q` is not written.
pub fn flash_attn_paged_prefill_bf16(
    dev: &CudaDevice,
    inp: &PagedPrefillInputs<'_, '_>,
    out: &mut CudaViewMut<'_, bf16>,
    s: PagedPrefillShape,
    scale: f32,
) -> Result<()> {
    let lens = PagedPrefillLens {
        q: inp.q.len(),
        k_cache: inp.k_cache.len(),
        v_cache: inp.v_cache.len(),
        block_tables: inp.block_tables.len(),
        cu_q: inp.cu_q.len(),
        context_lens: inp.context_lens.len(),
        out: out.len(),
    };
    let (Some(p), num_blocks) = plan_paged_prefill(&s, &lens)? else {
        return Ok(());
    };
    let f = function(dev, &p)?;
    let [ld_q, ld_o, max_blocks, total_q, num_blocks, hq, hk] =
        [s.ld_q, s.ld_o, s.max_blocks, s.total_q, num_blocks, s.hq, s.hk].map(|x| x as i32);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(inp.q).arg(inp.k_cache).arg(inp.v_cache).arg(&mut *out).arg(&ld_q).arg(&ld_o);
    launch.arg(inp.block_tables).arg(&max_blocks).arg(inp.cu_q).arg(inp.context_lens);
    launch.arg(&total_q).arg(&num_blocks).arg(&hq).arg(&hk).arg(&scale);
    // SAFETY: the arguments match flash_attn_paged_prefill_hd{64,128}_bf16(const bf16* q, const bf16* k_cache,
    // const bf16* v_cache, bf16* o, int ld_q, int ld_o, const u32* block_tables, int max_blocks, const u32* cu_q,
    // const u32* context_lens, int total_q, int num_blocks, int hq, int hk, float scale). `plan_paged_prefill`
    // checked: head_dim 64/128, hq a positive multiple of hk, block size 16, q/out hold total_q rows at strides
    // that cover hq*d and fit i32, the caches are num_blocks (< 2^31) whole blocks, block_tables holds
    // num_seqs*max_blocks entries with max_blocks*16 < 2^31, cu_q num_seqs+1 and context_lens num_seqs; the kernel
    // bounds every device-side value (rows by total_q, contexts by the table, block ids by num_blocks) before
    // using it. Grid (ceil(max_q_len/128), hq, num_seqs <= 65535) of 256 threads, shared memory limit raised by
    // `function`. `out` is a &mut view, so it aliases no input.
    guarded("launch paged prefill attention", || unsafe { launch.launch(p.cfg) }.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens_for(s: &AttnShape) -> (usize, usize, usize, usize) {
        let q = rows_len("t", s.batch * s.tq, s.ld_q, s.hq * s.head_dim).expect("q");
        let k = rows_len("t", s.batch * s.tk, s.ld_k, s.hk * s.head_dim).expect("k");
        let o = rows_len("t", s.batch * s.tq, s.ld_o, s.hq * s.head_dim).expect("o");
        (q, k, k, o)
    }

    #[test]
    fn vision_and_llm_shapes_plan() {
        // InternViT-300M, 7 tiles: 9 row blocks (1025 = 8 * 128 + 1), 16 heads, 7 sequences.
        let s = AttnShape::fused_qkv(7, 1025, 16, 16, 64);
        let p = plan(&s, None, lens_for(&s)).expect("valid").expect("work");
        assert_eq!(p.kernel, "flash_attn_fwd_hd64_bf16");
        assert_eq!(p.cfg.grid_dim, (9, 16, 7));
        assert_eq!(p.cfg.block_dim, (256, 1, 1));
        assert_eq!(p.cfg.shared_mem_bytes, 48 * 1024);
        // InternViT-6B: 25 heads of 128; 96 KiB needs the raised limit.
        let s = AttnShape::dense(13, 1025, 1025, 25, 25, 128);
        let p = plan(&s, None, lens_for(&s)).expect("valid").expect("work");
        assert_eq!(
            (p.kernel, p.cfg.grid_dim, p.cfg.shared_mem_bytes),
            ("flash_attn_fwd_hd128_bf16", (9, 25, 13), 98304)
        );
        // Qwen2.5 prefill continuing a cached prefix.
        let s = AttnShape { tk: 300 + 41, ..AttnShape::dense(1, 41, 41, 28, 4, 128) };
        let p = plan(&s, Some(300), lens_for(&s)).expect("valid").expect("work");
        assert_eq!((p.kernel, p.cfg.grid_dim), ("flash_attn_fwd_causal_hd128_bf16", (1, 28, 1)));
        // No queries: nothing to launch, still checked.
        let s = AttnShape::dense(0, 5, 5, 14, 2, 64);
        assert!(plan(&s, None, lens_for(&s)).expect("valid").is_none());
    }

    #[test]
    fn v2_plans_smaller_blocks() {
        let v2 = FlashVersion::V2;
        let s = AttnShape::fused_qkv(7, 1025, 16, 16, 64);
        let p = plan_version(&s, None, lens_for(&s), v2).expect("valid").expect("work");
        assert_eq!(p.kernel, "flash_attn_fwd_v2_hd64_bf16");
        assert_eq!(p.cfg.grid_dim, (17, 16, 7));
        assert_eq!(p.cfg.block_dim, (128, 1, 1));
        assert_eq!(p.cfg.shared_mem_bytes, 40 * 1024);
        let s = AttnShape::dense(7, 1025, 1025, 25, 25, 128);
        let p = plan_version(&s, Some(0), lens_for(&s), v2).expect("valid").expect("work");
        assert_eq!(
            (p.kernel, p.cfg.grid_dim, p.cfg.shared_mem_bytes),
            ("flash_attn_fwd_v2_causal_hd128_bf16", (17, 25, 7), 80 * 1024)
        );
        // The same refusals as v1.
        let bad = AttnShape { hk: 3, ..AttnShape::dense(2, 17, 17, 14, 2, 64) };
        assert!(plan_version(&bad, None, lens_for(&bad), v2).is_err());
        assert_eq!(FlashVersion::V2.label(), "v2");
        // v3: 128 rows per block of 128 threads at head dim 64, the v2 kernels at 128.
        let s = AttnShape::fused_qkv(7, 1025, 16, 16, 64);
        let p = plan_version(&s, Some(0), lens_for(&s), FlashVersion::V3).expect("valid").expect("work");
        assert_eq!(p.kernel, "flash_attn_fwd_v3_causal_hd64_bf16");
        assert_eq!((p.cfg.grid_dim, p.cfg.block_dim, p.cfg.shared_mem_bytes), ((9, 16, 7), (128, 1, 1), 48 * 1024));
        let s = AttnShape::dense(7, 1025, 1025, 25, 25, 128);
        let p = plan_version(&s, None, lens_for(&s), FlashVersion::V3).expect("valid").expect("work");
        assert_eq!((p.kernel, p.cfg.grid_dim), ("flash_attn_fwd_v2_hd128_bf16", (17, 25, 7)));
    }

    #[test]
    fn flops_count_visible_pairs() {
        let s = AttnShape::dense(2, 3, 5, 1, 1, 64);
        assert_eq!(s.flops(None), 4.0 * 2.0 * 64.0 * 15.0);
        // Offset 2: rows see 3, 4, 5 keys.
        assert_eq!(s.flops(Some(2)), 4.0 * 2.0 * 64.0 * 12.0);
    }

    #[test]
    fn bad_dense_shapes_are_errors() {
        let ok = AttnShape::dense(2, 17, 17, 14, 2, 64);
        let l = lens_for(&ok);
        let err = |s: AttnShape, c: Option<usize>, l| plan(&s, c, l).unwrap_err().to_string();
        assert!(err(AttnShape { head_dim: 96, ..ok }, None, l).contains("head_dim 96"));
        assert!(err(AttnShape { hk: 3, ..ok }, None, l).contains("multiple of kv heads"));
        assert!(err(AttnShape { hk: 0, ..ok }, None, l).contains("multiple of kv heads"));
        assert!(err(AttnShape { ld_q: 14 * 64 - 1, ..ok }, None, l).contains("q row stride"));
        assert!(err(ok, Some(1), l).contains("causal offset 1"));
        assert!(err(AttnShape { tk: 0, ..ok }, None, l).contains("no keys"));
        assert!(err(AttnShape { batch: 70_000, ..ok }, None, l).contains("grid limit"));
        let short = (l.0, l.1 - 1, l.2, l.3);
        assert!(err(ok, None, short).contains("k holds"), "{}", err(ok, None, short));
        let short = (l.0, l.1, l.2, l.3 - 1);
        assert!(err(ok, None, short).contains("out holds"));
        assert!(plan(&ok, Some(0), l).is_ok());
    }

    fn paged_shape() -> (PagedPrefillShape, PagedPrefillLens) {
        let s = PagedPrefillShape {
            num_seqs: 3,
            total_q: 200,
            max_q_len: 130,
            hq: 14,
            hk: 2,
            head_dim: 64,
            block_size: 16,
            max_blocks: 70,
            ld_q: 18 * 64,
            ld_o: 14 * 64,
        };
        let cache = 100 * 16 * 2 * 64;
        let l = PagedPrefillLens {
            q: 199 * 18 * 64 + 14 * 64,
            k_cache: cache,
            v_cache: cache,
            block_tables: 210,
            cu_q: 4,
            context_lens: 3,
            out: 200 * 14 * 64,
        };
        (s, l)
    }

    #[test]
    fn paged_prefill_plans_and_refuses() {
        let (s, l) = paged_shape();
        let (p, blocks) = plan_paged_prefill(&s, &l).expect("valid");
        let p = p.expect("work");
        assert_eq!(blocks, 100);
        assert_eq!((p.kernel, p.cfg.grid_dim), ("flash_attn_paged_prefill_hd64_bf16", (2, 14, 3)));
        let err = |s: PagedPrefillShape, l: PagedPrefillLens| plan_paged_prefill(&s, &l).unwrap_err().to_string();
        assert!(err(PagedPrefillShape { block_size: 32, ..s }, l).contains("block size 32"));
        assert!(err(s, PagedPrefillLens { cu_q: 3, ..l }).contains("cu_q holds 3"));
        assert!(err(s, PagedPrefillLens { block_tables: 209, ..l }).contains("block_tables"));
        assert!(err(s, PagedPrefillLens { v_cache: l.k_cache - 16 * 128, ..l }).contains("caches"));
        assert!(err(s, PagedPrefillLens { k_cache: 1, v_cache: 1, ..l }).contains("whole number"));
        assert!(err(PagedPrefillShape { max_q_len: 201, ..s }, l).contains("max_q_len"));
        assert!(err(s, PagedPrefillLens { out: l.out - 1, ..l }).contains("out holds"));
        assert!(err(PagedPrefillShape { hq: 15, ..s }, l).contains("multiple"));
        let (none, _) = plan_paged_prefill(&PagedPrefillShape { max_q_len: 0, ..s }, &l).expect("valid");
        assert!(none.is_none());
    }

    #[test]
    fn module_exports_every_planned_kernel() {
        use super::super::registry::KERNELS;
        let (_, ptx, _) = KERNELS.iter().find(|k| k.0 == MODULE).expect("module flash_attn embedded");
        let mut names = Vec::new();
        for d in [64, 128] {
            for causal in [None, Some(0)] {
                let s = AttnShape::dense(1, 4, 4, 2, 1, d);
                for version in [FlashVersion::V1, FlashVersion::V2, FlashVersion::V3] {
                    let p = plan_version(&s, causal, lens_for(&s), version).expect("valid").expect("work");
                    names.push(p.kernel);
                }
            }
            let (s, l) = paged_shape();
            let s = PagedPrefillShape { head_dim: d, ld_q: 18 * d, ld_o: 14 * d, ..s };
            let l = PagedPrefillLens {
                q: 200 * 18 * d,
                out: 200 * 14 * d,
                k_cache: 100 * 16 * 2 * d,
                v_cache: 100 * 16 * 2 * d,
                ..l
            };
            names.push(plan_paged_prefill(&s, &l).expect("valid").0.expect("work").kernel);
        }
        assert_eq!(names.len(), 14);
        for f in names {
            assert!(ptx.contains(&format!(".entry {f}(")), "flash_attn PTX lacks entry {f}");
        }
    }

    #[test]
    fn shared_memory_fits_the_opt_in_limits() {
        // sm_80's opt-in limit is 163 KiB, sm_86/89's 99 KiB; head dim 64 fits the default 48 KiB.
        assert_eq!(smem_bytes(64), 49152);
        assert!(smem_bytes(128) <= 99 * 1024);
    }
}
