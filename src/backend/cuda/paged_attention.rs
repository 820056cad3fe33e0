//! Launchers for `kernels/paged_attn.cu`: decode attention over the paged KV cache (one query token per
//! sequence, split-K over partitions), the bf16 twin of `backend::paged_attention` for one token, and
//! `write_kv_bf16`, the twin of `backend::write_kv` addressed by a slot per token (vLLM's reshape_and_cache).
//!
//! Two decode kernels: v2 (default) runs partitions of 64 tokens (or a multiple, at most 32 partitions) in one
//! launch and combines them in the last block to finish (an atomic counter per sequence and kv head slice in
//! the workspace); v1 (`FACELLM_ATTN=v1`, read once) runs partitions of [`PARTITION`] tokens and a second
//! reduce launch. Both take the same inputs and the same workspace ([`DecodeShape::workspace_len`] covers
//! either).
//!
//! CUDA graphs: the decode grid depends only on `num_seqs`, the kv heads and the partition count, which is fixed
//! by the shape's `max_context`; block tables and context lengths are device arrays read at run time, so a
//! captured graph replays with new values. Keep `max_context` (hence the workspace size) fixed for a captured
//! graph. The workspace must be zeroed once before its first v2 launch (v2 leaves its counters zero after every
//! launch) and not be shared by launches that may run concurrently.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::attention::PAGE;
use super::{guarded, CudaDevice, Error, Result};

const MODULE: &str = "paged_attn";
/// Tokens per v1 partition (`kPart` in kernels/paged_attn.cu).
pub const PARTITION: usize = 256;
/// Query heads per decode block (`kHeads`, `kV2Heads`).
const HEADS_PER_BLOCK: usize = 8;
const THREADS: u32 = 256;
/// v2: tokens per shared-memory chunk (`kV2Chunk`); a partition is a whole number of chunks.
pub const V2_CHUNK: usize = 64;
/// v2: partitions per sequence at most (`kV2MaxParts`).
pub const V2_MAX_PARTS: usize = 32;
const V2_THREADS: u32 = 128;
const MAX_GRID_YZ: usize = 65535;

/// Which decode kernel a launch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnVersion {
    /// 256-token partitions and a separate reduce launch (the first verified kernel).
    V1,
    /// 64-token partitions, one launch, fused combine.
    V2,
}

impl AttnVersion {
    pub fn label(self) -> &'static str {
        match self {
            AttnVersion::V1 => "v1",
            AttnVersion::V2 => "v2",
        }
    }
}

/// The decode kernel launches use: v2, or v1 when the environment variable `FACELLM_ATTN` is `v1` (read once).
pub fn attn_version() -> AttnVersion {
    static VERSION: std::sync::OnceLock<AttnVersion> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| match std::env::var("FACELLM_ATTN").as_deref() {
        Ok("v1") => AttnVersion::V1,
        _ => AttnVersion::V2,
    })
}

/// v2 dynamic shared memory (`v2_smem_bytes<D>()`): k chunk with padded rows, v chunk, q and p in fp32.
fn v2_smem_bytes(head_dim: usize) -> usize {
    V2_CHUNK * (head_dim + 8) * 2
        + V2_CHUNK * head_dim * 2
        + HEADS_PER_BLOCK * head_dim * 4
        + HEADS_PER_BLOCK * V2_CHUNK * 4
}

/// Decode shape: `num_seqs` sequences of one query token each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeShape {
    pub num_seqs: usize,
    pub hq: usize,
    pub hk: usize,
    /// 64 or 128.
    pub head_dim: usize,
    /// Tokens per cache block; must be [`PAGE`].
    pub block_size: usize,
    /// Width of the `[num_seqs, max_blocks]` block-table array.
    pub max_blocks: usize,
    /// The longest context any sequence may have in this launch (or in every replay of a captured graph):
    /// sizes the partitions and the workspace. Longer contexts produce NaN.
    pub max_context: usize,
    /// Row strides (elements) of q `[num_seqs, >= hq * head_dim]` and the output.
    pub ld_q: usize,
    pub ld_o: usize,
}

impl DecodeShape {
    /// v1 partitions per sequence in the grid.
    pub fn max_parts(&self) -> usize {
        self.max_context.div_ceil(PARTITION).max(1)
    }

    /// v2's shortest partition (one 64-token chunk). The kernel picks each sequence's partition length from
    /// its own context and the launch's size (see `kernels/paged_attn.cu`, decode_v2), not from max_context.
    pub fn v2_part_tokens(&self) -> usize {
        V2_CHUNK
    }

    /// v2 partitions per sequence in the grid: one per 64-token chunk of max_context, at most 32.
    pub fn v2_max_parts(&self) -> usize {
        self.max_context.div_ceil(V2_CHUNK).clamp(1, V2_MAX_PARTS)
    }

    /// Decode blocks per (sequence, partition): one per kv head and 8-head slice of its query group.
    fn head_blocks(&self) -> usize {
        self.hk * (self.hq / self.hk.max(1)).div_ceil(HEADS_PER_BLOCK)
    }

    /// v2 workspace words per sequence: a u32 counter per head block, then `(max, sum)` and a `head_dim`
    /// accumulator per (head, partition). Independent of `num_seqs`, so a smaller batch's partials never land
    /// on a larger batch's counters.
    pub fn v2_seq_stride(&self) -> usize {
        self.head_blocks() + self.hq * self.v2_max_parts() * (self.head_dim + 2)
    }

    /// f32 elements of workspace a launch of either version needs (the larger of the two); zero when one
    /// partition of each covers `max_context` (then no workspace is used). v1: `(max, sum)` and a `head_dim`
    /// accumulator per (sequence, head, partition); v2: [`Self::v2_seq_stride`] per sequence.
    pub fn workspace_len(&self) -> usize {
        let v1 = match self.max_parts() {
            1 => 0,
            p => self.num_seqs * self.hq * p * (self.head_dim + 2),
        };
        let v2 = match self.v2_max_parts() {
            1 => 0,
            _ => self.num_seqs * self.v2_seq_stride(),
        };
        v1.max(v2)
    }

    /// A host image of a workspace for either version: NaN everywhere (so a partial read before it is written
    /// shows up) except the v2 counters, which must start at zero.
    pub fn poisoned_workspace(&self) -> Vec<f32> {
        let mut w = vec![f32::NAN; self.workspace_len()];
        if self.v2_max_parts() > 1 {
            for s in 0..self.num_seqs {
                let at = s * self.v2_seq_stride();
                w[at..at + self.head_blocks()].fill(0.0);
            }
        }
        w
    }

    /// Bytes of k and v read for contexts `ctx` (for GB/s in benches).
    pub fn kv_bytes(&self, contexts: &[usize]) -> f64 {
        contexts.iter().map(|&c| (2 * c * self.hk * self.head_dim * 2) as f64).sum()
    }
}

/// Lengths of the views a decode launch reads and writes.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLens {
    pub q: usize,
    pub k_cache: usize,
    pub v_cache: usize,
    pub block_tables: usize,
    pub context_lens: usize,
    pub out: usize,
    /// None: no workspace given.
    pub workspace: Option<usize>,
}

/// The launches of a decode: the partitions, then (v1 with more than one partition) the reduce.
#[derive(Debug, Clone, Copy)]
pub struct DecodePlan {
    pub version: AttnVersion,
    pub decode_kernel: &'static str,
    pub decode: LaunchConfig,
    pub reduce: Option<(&'static str, LaunchConfig)>,
    pub num_blocks: usize,
    pub max_parts: usize,
    /// Tokens per partition.
    pub part_tokens: usize,
    /// Whether the kernels touch the workspace (more than one partition).
    pub uses_workspace: bool,
}

fn rows_len(op: &'static str, rows: usize, ld: usize, width: usize) -> Result<usize> {
    if rows == 0 {
        return Ok(0);
    }
    (rows - 1)
        .checked_mul(ld)
        .and_then(|n| n.checked_add(width))
        .ok_or(Error::Invalid { op, msg: format!("{rows} rows of stride {ld} overflow") })
}

/// Checks a decode launch of `version`; `None` when there are no sequences.
pub fn plan_decode(s: &DecodeShape, l: &DecodeLens, version: AttnVersion) -> Result<Option<DecodePlan>> {
    const OP: &str = "paged_attention_decode_bf16";
    let invalid = |msg: String| Error::Invalid { op: OP, msg };
    if !matches!(s.head_dim, 64 | 128) {
        return Err(invalid(format!("head_dim {} is not supported (64 or 128)", s.head_dim)));
    }
    if s.hq == 0 || s.hk == 0 || !s.hq.is_multiple_of(s.hk) {
        return Err(invalid(format!("query heads ({}) must be a positive multiple of kv heads ({})", s.hq, s.hk)));
    }
    if s.block_size != PAGE {
        return Err(invalid(format!(
            "block size {} is not supported (the kernels are built for {PAGE})",
            s.block_size
        )));
    }
    let (qw, row) = (s.hq * s.head_dim, s.hk * s.head_dim);
    for (name, ld) in [("q", s.ld_q), ("out", s.ld_o)] {
        if ld < qw || ld > i32::MAX as usize {
            return Err(invalid(format!("{name} row stride {ld} must be in {qw}..=2^31-1")));
        }
    }
    if s.max_blocks.checked_mul(PAGE).is_none_or(|n| n > i32::MAX as usize) {
        return Err(invalid(format!("block tables of {} blocks exceed 2^31 tokens", s.max_blocks)));
    }
    if s.max_context > i32::MAX as usize {
        return Err(invalid(format!("max_context {} exceeds 2^31-1", s.max_context)));
    }
    let slices = (s.hq / s.hk).div_ceil(HEADS_PER_BLOCK);
    let grid_y = s.hk * slices;
    if s.num_seqs > MAX_GRID_YZ || grid_y > MAX_GRID_YZ {
        return Err(invalid(format!("{} sequences or {} kv heads exceed the grid limit", s.num_seqs, s.hk)));
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
    for (name, got, want) in [("block_tables", l.block_tables, table), ("context_lens", l.context_lens, s.num_seqs)] {
        if got != want {
            return Err(invalid(format!("{name} holds {got} elements, expected {want} for {s:?}")));
        }
    }
    for (name, got, want) in
        [("q", l.q, rows_len(OP, s.num_seqs, s.ld_q, qw)?), ("out", l.out, rows_len(OP, s.num_seqs, s.ld_o, qw)?)]
    {
        if got < want {
            return Err(invalid(format!("{name} holds {got} elements, needs >= {want} for {s:?}")));
        }
    }
    let need = s.workspace_len();
    match l.workspace {
        Some(got) if got < need => {
            return Err(invalid(format!("workspace holds {got} f32, needs >= {need} for {s:?}")));
        }
        None if need > 0 => {
            return Err(invalid(format!("max_context {} needs a workspace of {need} f32", s.max_context)));
        }
        _ => {}
    }
    if s.num_seqs == 0 {
        return Ok(None);
    }
    if version == AttnVersion::V2 {
        let max_parts = s.v2_max_parts();
        let decode_kernel =
            if s.head_dim == 64 { "paged_attn_decode_v2_hd64_bf16" } else { "paged_attn_decode_v2_hd128_bf16" };
        let decode = LaunchConfig {
            grid_dim: (max_parts as u32, grid_y as u32, s.num_seqs as u32),
            block_dim: (V2_THREADS, 1, 1),
            shared_mem_bytes: v2_smem_bytes(s.head_dim) as u32,
        };
        return Ok(Some(DecodePlan {
            version,
            decode_kernel,
            decode,
            reduce: None,
            num_blocks,
            max_parts,
            part_tokens: s.v2_part_tokens(),
            uses_workspace: max_parts > 1,
        }));
    }
    let max_parts = s.max_parts();
    let (decode_kernel, reduce_kernel) = match s.head_dim {
        64 => ("paged_attn_decode_v1_hd64_bf16", "paged_attn_reduce_v1_hd64_bf16"),
        _ => ("paged_attn_decode_v1_hd128_bf16", "paged_attn_reduce_v1_hd128_bf16"),
    };
    let decode = LaunchConfig {
        grid_dim: (max_parts as u32, grid_y as u32, s.num_seqs as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let reduce = (max_parts > 1).then_some((
        reduce_kernel,
        LaunchConfig {
            grid_dim: (s.hq as u32, s.num_seqs as u32, 1),
            block_dim: (s.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        },
    ));
    Ok(Some(DecodePlan {
        version,
        decode_kernel,
        decode,
        reduce,
        num_blocks,
        max_parts,
        part_tokens: PARTITION,
        uses_workspace: max_parts > 1,
    }))
}

/// Device-side inputs of [`paged_attention_decode_bf16`].
pub struct DecodeInputs<'a, 'b> {
    /// `[num_seqs, >= hq * head_dim]` rows of `ld_q` (e.g. the q columns of a fused QKV buffer).
    pub q: &'b CudaView<'a, bf16>,
    /// One layer's `[num_blocks, block_size, hk, head_dim]` each.
    pub k_cache: &'b CudaView<'a, bf16>,
    pub v_cache: &'b CudaView<'a, bf16>,
    /// `[num_seqs, max_blocks]` block ids.
    pub block_tables: &'b CudaView<'a, u32>,
    /// `[num_seqs]` tokens in each sequence's cache, the current token included.
    pub context_lens: &'b CudaView<'a, u32>,
}

/// One decode step: `out[s, j] = softmax(q[s, j] · k[s, ..ctx]ᵀ · scale) v[s, ..ctx]` with `k`, `v` the first
/// `context_lens[s]` tokens of sequence s's table (GQA: head j reads kv head `j / (hq / hk)`). `workspace`
/// holds at least `s.workspace_len()` f32 (None allowed when that is 0). The kernel checks the device arrays: a
/// context of 0 gives zeros (an idle batch slot); one longer than the table (v1: or than `max_context`), or a
/// table entry past the pool, gives NaN. Runs the kernel [`attn_version`] picks; the workspace must have been zeroed once
/// (see the module notes).
pub fn paged_attention_decode_bf16(
    dev: &CudaDevice,
    inp: &DecodeInputs<'_, '_>,
    out: &mut CudaViewMut<'_, bf16>,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
    s: DecodeShape,
    scale: f32,
) -> Result<()> {
    paged_attention_decode_bf16_version(dev, inp, out, workspace, s, scale, attn_version())
}

/// [`paged_attention_decode_bf16`] with the kernel version chosen by the caller (self-checks, benches).
pub fn paged_attention_decode_bf16_version(
    dev: &CudaDevice,
    inp: &DecodeInputs<'_, '_>,
    out: &mut CudaViewMut<'_, bf16>,
    workspace: Option<&mut CudaViewMut<'_, f32>>,
    s: DecodeShape,
    scale: f32,
    version: AttnVersion,
) -> Result<()> {
    let lens = DecodeLens {
        q: inp.q.len(),
        k_cache: inp.k_cache.len(),
        v_cache: inp.v_cache.len(),
        block_tables: inp.block_tables.len(),
        context_lens: inp.context_lens.len(),
        out: out.len(),
        workspace: workspace.as_ref().map(|w| w.len()),
    };
    let Some(p) = plan_decode(&s, &lens, version)? else {
        return Ok(());
    };
    let null: u64 = 0;
    let [ld_q, ld_o, max_blocks, num_blocks, hq, hk, max_parts, part_tokens] =
        [s.ld_q, s.ld_o, s.max_blocks, p.num_blocks, s.hq, s.hk, p.max_parts, p.part_tokens].map(|x| x as i32);
    // With one partition the kernels never touch the workspace.
    let mut ws = workspace.filter(|_| p.uses_workspace);

    let f = dev.kernels.function(MODULE, p.decode_kernel)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(inp.q).arg(&ld_q).arg(inp.k_cache).arg(inp.v_cache).arg(inp.block_tables).arg(&max_blocks);
    launch.arg(inp.context_lens).arg(&mut *out).arg(&ld_o);
    match ws.as_deref_mut() {
        Some(w) => launch.arg(w),
        None => launch.arg(&null),
    };
    launch.arg(&num_blocks).arg(&hq).arg(&hk).arg(&max_parts);
    if p.version == AttnVersion::V2 {
        launch.arg(&part_tokens);
    }
    launch.arg(&scale);
    // SAFETY: v1: the arguments match paged_attn_decode_v1_hd{64,128}_bf16(const bf16* q, int ld_q, const bf16* k_cache,
    // const bf16* v_cache, const u32* block_tables, int max_blocks, const u32* context_lens, bf16* o, int ld_o,
    // float* ws, int num_blocks, int hq, int hk, int max_parts, float scale). `plan_decode` checked: head_dim
    // 64/128, hq a positive multiple of hk, block size 16, q/out hold num_seqs rows at strides covering hq*d, the
    // caches are num_blocks whole blocks, block_tables num_seqs*max_blocks entries (max_blocks*16 < 2^31),
    // context_lens num_seqs, and the workspace num_seqs*hq*max_parts*(d+2) f32 whenever max_parts > 1 (a null
    // pointer otherwise, never dereferenced since every context the kernel accepts has one partition). The
    // kernel bounds each context by the table and max_parts and each block id by num_blocks before reading.
    // Grid (max_parts, hk*ceil(group/8) <= 65535, num_seqs <= 65535) of 256 threads, static shared memory.
    // v2: paged_attn_decode_v2_hd{64,128}_bf16 takes the same arguments plus `int min_part_tokens` before
    // `scale`; min_part_tokens is 64, max_parts = min(32, ceil(max_context / 64)) (the kernel sizes each
    // sequence's partitions from its context so that it never takes more than max_parts), the
    // workspace (needed whenever max_parts > 1, checked above) holds num_seqs * v2_seq_stride f32 laid out as
    // the kernel computes it (counters per grid row y, then partials), grid as v1 with 128 threads and
    // v2_smem_bytes (< 48 KiB) of dynamic shared memory.
    guarded("launch paged attention decode", || unsafe { launch.launch(p.decode) }.map(|_| ()))?;

    let (Some((name, cfg)), Some(w)) = (p.reduce, ws) else {
        return Ok(());
    };
    let f = dev.kernels.function(MODULE, name)?;
    let mut launch = dev.stream.launch_builder(&f);
    let w = w.as_view();
    launch.arg(&w).arg(inp.context_lens).arg(&mut *out).arg(&ld_o).arg(&hq).arg(&max_parts).arg(&max_blocks);
    // SAFETY: the arguments match paged_attn_reduce_v1_hd{64,128}_bf16(const float* ws, const u32* context_lens,
    // bf16* o, int ld_o, int hq, int max_parts, int max_blocks) with the same workspace, contexts and output the
    // decode launch was checked with; it reads only partitions the decode kernel wrote (contexts it accepted),
    // and writes out rows the plan sized. Grid (hq, num_seqs) of head_dim threads, no shared memory.
    guarded("launch paged attention reduce", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

/// The cache slot (`block * block_size + offset`) of positions `start..start + t` of a block table, as
/// `backend::write_kv` places them; the slot array [`write_kv_bf16`] and the rope/kv kernel take.
pub fn slot_mapping(blocks: &[u32], block_size: usize, start: usize, t: usize) -> Result<Vec<i32>> {
    const OP: &str = "slot_mapping";
    let need = (start + t).div_ceil(block_size.max(1));
    if block_size == 0 || need > blocks.len() {
        return Err(Error::Invalid {
            op: OP,
            msg: format!(
                "positions {start}..{} need {need} blocks of {block_size}; the table has {}",
                start + t,
                blocks.len()
            ),
        });
    }
    (start..start + t)
        .map(|pos| {
            let slot = blocks[pos / block_size] as usize * block_size + pos % block_size;
            i32::try_from(slot).map_err(|_| Error::Invalid { op: OP, msg: format!("slot {slot} exceeds i32") })
        })
        .collect()
}

/// Shape of a [`write_kv_bf16`]: `tokens` rows of `kv_heads * head_dim` in k and v, `ld_k`/`ld_v` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteKvShape {
    pub tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ld_k: usize,
    pub ld_v: usize,
}

/// Checks a write_kv launch against `(k, v, slots, k_cache, v_cache)` lengths; returns the launch (None: no
/// tokens) and the cache's slot count.
pub fn plan_write_kv(
    s: &WriteKvShape,
    lens: (usize, usize, usize, usize, usize),
) -> Result<(Option<LaunchConfig>, usize)> {
    const OP: &str = "write_kv_bf16";
    let invalid = |msg: String| Error::Invalid { op: OP, msg };
    let row = s.kv_heads.checked_mul(s.head_dim).filter(|&r| r > 0 && r <= i32::MAX as usize);
    let Some(row) = row else {
        return Err(invalid(format!("kv_heads {} x head_dim {} must be in 1..2^31", s.kv_heads, s.head_dim)));
    };
    if !s.head_dim.is_multiple_of(8) {
        return Err(invalid(format!("head_dim {} must be a multiple of 8", s.head_dim)));
    }
    for (name, ld) in [("k", s.ld_k), ("v", s.ld_v)] {
        if ld < row || ld > i32::MAX as usize {
            return Err(invalid(format!("{name} row stride {ld} must be in {row}..=2^31-1")));
        }
    }
    if s.tokens > i32::MAX as usize {
        return Err(invalid(format!("{} tokens exceed 2^31-1", s.tokens)));
    }
    let (k, v, slots, kc, vc) = lens;
    for (name, got, want) in
        [("k", k, rows_len(OP, s.tokens, s.ld_k, row)?), ("v", v, rows_len(OP, s.tokens, s.ld_v, row)?)]
    {
        if got < want {
            return Err(invalid(format!("{name} holds {got} elements, needs >= {want} for {s:?}")));
        }
    }
    if slots != s.tokens {
        return Err(invalid(format!("slots holds {slots} entries, expected one per token ({})", s.tokens)));
    }
    if kc != vc || !kc.is_multiple_of(row) {
        return Err(invalid(format!(
            "k/v caches of {kc} and {vc} elements are not the same whole number of {row}-element slots"
        )));
    }
    if s.tokens == 0 {
        return Ok((None, kc / row));
    }
    let chunks = s.tokens * (row / 8);
    let grid = u32::try_from(chunks.div_ceil(256)).ok().filter(|&g| g <= i32::MAX as u32);
    let Some(grid) = grid else {
        return Err(invalid(format!("{chunks} chunks exceed the grid limit")));
    };
    Ok((Some(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }), kc / row))
}

/// `k_cache[slots[i]] = k[i]`, `v_cache[slots[i]] = v[i]` for every token i; a negative slot (padding) or one
/// past the cache is skipped. Caches are one layer's `[num_blocks, block_size, kv_heads, head_dim]`, so slot
/// `block * block_size + offset` is the cache row [`slot_mapping`] gives.
pub fn write_kv_bf16(
    dev: &CudaDevice,
    k: &CudaView<'_, bf16>,
    v: &CudaView<'_, bf16>,
    slots: &CudaView<'_, i32>,
    k_cache: &mut CudaViewMut<'_, bf16>,
    v_cache: &mut CudaViewMut<'_, bf16>,
    s: WriteKvShape,
) -> Result<()> {
    let (cfg, num_slots) = plan_write_kv(&s, (k.len(), v.len(), slots.len(), k_cache.len(), v_cache.len()))?;
    let Some(cfg) = cfg else {
        return Ok(());
    };
    let f = dev.kernels.function(MODULE, "write_kv_bf16")?;
    let [ld_k, ld_v, t, row] = [s.ld_k, s.ld_v, s.tokens, s.kv_heads * s.head_dim].map(|x| x as i32);
    let num_slots = num_slots as i64;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(k).arg(v).arg(&ld_k).arg(&ld_v).arg(slots).arg(&mut *k_cache).arg(&mut *v_cache);
    launch.arg(&t).arg(&row).arg(&num_slots);
    // SAFETY: the arguments match write_kv_bf16(const bf16* k, const bf16* v, int ld_k, int ld_v, const int*
    // slots, bf16* k_cache, bf16* v_cache, int t, int row, long long num_slots). `plan_write_kv` checked: row =
    // kv_heads*head_dim is a multiple of 8 in i32, k and v hold `tokens` rows of `row` at strides >= row, slots
    // holds one entry per token, the caches are num_slots whole rows each (the kernel skips any slot outside
    // 0..num_slots); the grid covers tokens*row/8 chunks with 256 threads and the kernel bounds the last block.
    // The caches are distinct &mut views, so they alias neither each other nor an input.
    guarded("launch write_kv", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_shape() -> (DecodeShape, DecodeLens) {
        let s = DecodeShape {
            num_seqs: 6,
            hq: 14,
            hk: 2,
            head_dim: 64,
            block_size: 16,
            max_blocks: 200,
            max_context: 3000,
            ld_q: 18 * 64,
            ld_o: 14 * 64,
        };
        let cache = 1000 * 16 * 2 * 64;
        let l = DecodeLens {
            q: 5 * 18 * 64 + 14 * 64,
            k_cache: cache,
            v_cache: cache,
            block_tables: 1200,
            context_lens: 6,
            out: 6 * 14 * 64,
            workspace: Some(s.workspace_len()),
        };
        (s, l)
    }

    const V1: AttnVersion = AttnVersion::V1;
    const V2: AttnVersion = AttnVersion::V2;

    #[test]
    fn decode_grid_is_fixed_by_num_seqs_and_max_context() {
        let (s, l) = decode_shape();
        assert_eq!(s.max_parts(), 12);
        // v2: 47 chunks of 64, a grid of 32 partitions (each sequence's length is chosen in the kernel).
        assert_eq!((s.v2_part_tokens(), s.v2_max_parts()), (64, 32));
        assert_eq!(s.v2_seq_stride(), 2 + 14 * 32 * 66);
        // v2's partials (32 partitions) outweigh v1's (12).
        assert_eq!(s.workspace_len(), 6 * (2 + 14 * 32 * 66));
        let p = plan_decode(&s, &l, V1).expect("valid").expect("work");
        assert_eq!(p.decode.grid_dim, (12, 2, 6));
        assert_eq!(p.decode.block_dim, (256, 1, 1));
        let (name, cfg) = p.reduce.expect("several partitions");
        assert_eq!((name, cfg.grid_dim, cfg.block_dim), ("paged_attn_reduce_v1_hd64_bf16", (14, 6, 1), (64, 1, 1)));
        assert_eq!(p.num_blocks, 1000);
        let p = plan_decode(&s, &l, V2).expect("valid").expect("work");
        assert_eq!((p.decode_kernel, p.decode.grid_dim), ("paged_attn_decode_v2_hd64_bf16", (32, 2, 6)));
        assert_eq!((p.decode.block_dim, p.decode.shared_mem_bytes), ((128, 1, 1), 21504));
        assert!(p.reduce.is_none() && p.uses_workspace && p.part_tokens == 64);
        // The bench's 640-token graphs: 10 partitions.
        let bench = DecodeShape { max_context: 640, ..s };
        assert_eq!((bench.v2_part_tokens(), bench.v2_max_parts()), (64, 10));
        // Serving at 32k: still a grid of 32 partitions; a short context uses as many as it has chunks.
        let long = DecodeShape { max_context: 32768, ..s };
        assert_eq!((long.v2_part_tokens(), long.v2_max_parts()), (64, 32));
        // One partition of each: no reduce, no workspace needed.
        let short = DecodeShape { max_context: 64, ..s };
        assert_eq!(short.workspace_len(), 0);
        for v in [V1, V2] {
            let p = plan_decode(&short, &DecodeLens { workspace: None, ..l }, v).expect("valid").expect("work");
            assert_eq!(p.decode.grid_dim, (1, 2, 6));
            assert!(p.reduce.is_none() && !p.uses_workspace);
        }
        // 256 tokens: one v1 partition but four v2 ones, so a workspace is needed.
        let mid = DecodeShape { max_context: 256, ..s };
        assert_eq!(mid.workspace_len(), 6 * (2 + 14 * 4 * 66));
        let w = mid.poisoned_workspace();
        assert!(w[0] == 0.0 && w[1] == 0.0 && w[2].is_nan() && w[mid.v2_seq_stride()] == 0.0);
        // A group of 9 query heads per kv head takes two blocks per kv head.
        let wide = DecodeShape { hq: 18, ld_o: 18 * 64, ld_q: 18 * 64, ..s };
        let l9 = DecodeLens { out: 6 * 18 * 64, q: 6 * 18 * 64, workspace: Some(wide.workspace_len()), ..l };
        assert_eq!(plan_decode(&wide, &l9, V1).expect("valid").expect("work").decode.grid_dim, (12, 4, 6));
        assert_eq!(plan_decode(&wide, &l9, V2).expect("valid").expect("work").decode.grid_dim, (32, 4, 6));
        // 8B: 28 heads over 4 kv heads of 128.
        let big = DecodeShape { hq: 28, hk: 4, head_dim: 128, ld_q: 36 * 128, ld_o: 28 * 128, ..s };
        let lb = DecodeLens {
            q: 6 * 36 * 128,
            out: 6 * 28 * 128,
            k_cache: 1000 * 16 * 4 * 128,
            v_cache: 1000 * 16 * 4 * 128,
            workspace: Some(big.workspace_len()),
            ..l
        };
        let p = plan_decode(&big, &lb, V1).expect("valid").expect("work");
        assert_eq!((p.decode_kernel, p.decode.grid_dim), ("paged_attn_decode_v1_hd128_bf16", (12, 4, 6)));
        let p = plan_decode(&big, &lb, V2).expect("valid").expect("work");
        assert_eq!((p.decode_kernel, p.decode.grid_dim), ("paged_attn_decode_v2_hd128_bf16", (32, 4, 6)));
        assert_eq!(p.decode.shared_mem_bytes, 39936);
    }

    #[test]
    fn bad_decode_shapes_are_errors() {
        let (s, l) = decode_shape();
        let err = |s: DecodeShape, l: DecodeLens| plan_decode(&s, &l, V2).unwrap_err().to_string();
        assert!(err(DecodeShape { head_dim: 80, ..s }, l).contains("head_dim 80"));
        assert!(err(DecodeShape { hk: 4, ..s }, l).contains("multiple"));
        assert!(err(DecodeShape { block_size: 8, ..s }, l).contains("block size 8"));
        assert!(err(DecodeShape { ld_o: 14 * 64 - 1, ..s }, l).contains("out row stride"));
        assert!(err(s, DecodeLens { block_tables: 1199, ..l }).contains("block_tables holds 1199"));
        assert!(err(s, DecodeLens { context_lens: 5, ..l }).contains("context_lens"));
        assert!(err(s, DecodeLens { workspace: Some(10), ..l }).contains("workspace holds 10"));
        assert!(err(s, DecodeLens { workspace: None, ..l }).contains("needs a workspace"));
        assert!(err(s, DecodeLens { v_cache: 5, ..l }).contains("caches"));
        assert!(err(s, DecodeLens { q: l.q - 1, ..l }).contains("q holds"));
        assert!(err(DecodeShape { num_seqs: 70_000, ..s }, l).contains("grid limit"));
        let none = DecodeLens { block_tables: 0, context_lens: 0, ..l };
        assert!(plan_decode(&DecodeShape { num_seqs: 0, ..s }, &none, V1).expect("valid").is_none());
    }

    #[test]
    fn module_exports_every_planned_kernel() {
        use super::super::registry::KERNELS;
        let (_, ptx, _) = KERNELS.iter().find(|k| k.0 == MODULE).expect("module paged_attn embedded");
        let (s, l) = decode_shape();
        let mut names = vec!["write_kv_bf16"];
        for d in [64, 128] {
            let s = DecodeShape { head_dim: d, ld_q: 18 * d, ld_o: 14 * d, ..s };
            let cache = 1000 * 16 * 2 * d;
            let l = DecodeLens {
                q: 6 * 18 * d,
                out: 6 * 14 * d,
                k_cache: cache,
                v_cache: cache,
                workspace: Some(s.workspace_len()),
                ..l
            };
            let p = plan_decode(&s, &l, V1).expect("valid").expect("work");
            names.push(p.decode_kernel);
            names.push(p.reduce.expect("several partitions").0);
            names.push(plan_decode(&s, &l, V2).expect("valid").expect("work").decode_kernel);
        }
        for f in names {
            assert!(ptx.contains(&format!(".entry {f}(")), "paged_attn PTX lacks entry {f}");
        }
    }

    #[test]
    fn slots_follow_the_block_table() {
        assert_eq!(slot_mapping(&[7, 2], 16, 14, 4).expect("fits"), vec![126, 127, 32, 33]);
        assert_eq!(slot_mapping(&[3], 16, 0, 0).expect("empty"), Vec::<i32>::new());
        assert!(slot_mapping(&[7, 2], 16, 30, 3).is_err());
        assert!(slot_mapping(&[1], 0, 0, 1).is_err());
    }

    #[test]
    fn write_kv_plans_and_refuses() {
        let s = WriteKvShape { tokens: 41, kv_heads: 2, head_dim: 64, ld_k: 18 * 64, ld_v: 18 * 64 };
        let kv = 40 * 18 * 64 + 128;
        let cache = 100 * 16 * 128;
        let (cfg, slots) = plan_write_kv(&s, (kv, kv, 41, cache, cache)).expect("valid");
        assert_eq!(slots, 1600);
        assert_eq!(cfg.expect("work").grid_dim, ((41 * 16u32).div_ceil(256), 1, 1));
        let err = |s: WriteKvShape, l| plan_write_kv(&s, l).unwrap_err().to_string();
        assert!(err(s, (kv, kv, 40, cache, cache)).contains("slots holds 40"));
        assert!(err(s, (kv - 1, kv, 41, cache, cache)).contains("k holds"));
        assert!(err(s, (kv, kv, 41, cache + 1, cache + 1)).contains("whole number"));
        assert!(err(WriteKvShape { head_dim: 60, ..s }, (kv, kv, 41, cache, cache)).contains("multiple of 8"));
        assert!(err(WriteKvShape { ld_v: 100, ..s }, (kv, kv, 41, cache, cache)).contains("v row stride"));
        let (none, _) = plan_write_kv(&WriteKvShape { tokens: 0, ..s }, (0, 0, 0, cache, cache)).expect("valid");
        assert!(none.is_none());
    }
}
