//! Self-checks of the attention kernels (flash_attn.cu, paged_attn.cu) against the CPU backend, and the cases
//! `facellm bench` times.
//!
//! References: dense attention is `backend::cpu::attention::attention` per sequence on the widened bf16
//! inputs. The paged kernels are compared with `backend::cpu::paged_attention` run on a `KvLayer` over an f32
//! copy of the very cache the GPU reads: same `[num_blocks, 16, hk, d]` layout, blocks handed out as a random
//! permutation (tables are not contiguous), every slot past a context NaN (in both copies), so a kernel that
//! reads outside a context turns its row NaN. `write_kv` is compared with `backend::cpu::paged_attention::
//! write_kv` on NaN-filled caches: written slots exactly, every other slot must stay NaN. Outputs are poisoned
//! with NaN before each launch, and padding columns of strided outputs must keep the poison.
//!
//! Tolerances (inputs: q, k uniform in [-2, 2] (or [-8, 8] for the large-magnitude case), v in [-1, 1], so
//! |out| <= 1):
//! - flash attention: atol 5e-3 + rtol 1e-2. The output is rounded to bf16 (half an ulp: <= 2^-9 |out|, 2e-3
//!   near 1) and, as in every flash kernel, P is rounded to bf16 before P·V (relative 2^-9 per probability,
//!   at most ~2^-9 max|v| = 2e-3 on the output). A naive bf16 implementation (scores, P and output in bf16)
//!   errs at least as much. Measured on a host emulation of the kernel: max abs error 2.5e-3.
//! - paged decode: atol 4e-3 + rtol 8e-3: P stays fp32, only the output rounding remains (measured 2e-3).
//! - write_kv: a copy, exact.

use cudarc::driver::{CudaSlice, CudaViewMut};
use half::bf16;

use super::KernelCase;
use crate::backend::cpu;
use crate::backend::cuda::attention::{self, AttnShape, FlashVersion, PagedPrefillInputs, PagedPrefillShape};
use crate::backend::cuda::paged_attention::{self, AttnVersion, DecodeInputs, DecodeShape, WriteKvShape};
use crate::backend::cuda::{buffer, CudaDevice, Result};
use crate::kv::{KvLayer, KvLayerMut};
use crate::selfcheck::{widen, Report, Rng};
use crate::tensor::Tensor;

const PAGE: usize = 16;
const FLASH_ATOL: f64 = 5e-3;
const FLASH_RTOL: f64 = 1e-2;
const DECODE_ATOL: f64 = 4e-3;
const DECODE_RTOL: f64 = 8e-3;

use super::{check, down, up, verdict};

/// Columns `col..col + width` of `rows` rows `ld` apart, widened to f32.
fn gather(x: &[bf16], rows: usize, ld: usize, col: usize, width: usize) -> Vec<f32> {
    (0..rows).flat_map(|r| x[r * ld + col..r * ld + col + width].iter().map(|v| v.to_f32())).collect()
}

/// Rows whose columns `width..ld` were written (they must keep the poison).
fn padding_written(x: &[bf16], rows: usize, ld: usize, width: usize) -> Option<usize> {
    (0..rows).find(|&r| x[r * ld + width..((r + 1) * ld).min(x.len())].iter().any(|v| !v.is_nan()))
}

fn permutation(rng: &mut Rng, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

// ---- dense flash attention ---------------------------------------------------------------------------------

struct DenseCase {
    s: AttnShape,
    causal: Option<usize>,
    /// q, k, v as column ranges of one fused QKV buffer (`s.ld_q == s.ld_k == s.ld_v`).
    fused: bool,
    /// Every view starts one element into its buffer: the kernels' scalar path.
    misalign: bool,
    /// q and k amplitude (2 normally; 8 gives near one-hot softmax rows).
    amp: f32,
}

fn dense_shape(c: &DenseCase) -> String {
    let s = &c.s;
    let mask = match c.causal {
        Some(p) => format!("causal+{p}"),
        None => "bidir".into(),
    };
    let mut t = format!("b{} tq{} tk{} h{}/{} d{} {mask}", s.batch, s.tq, s.tk, s.hq, s.hk, s.head_dim);
    if c.fused {
        t.push_str(&format!(" fused ld{}", s.ld_q));
    }
    if s.ld_o != s.hq * s.head_dim {
        t.push_str(&format!(" ld_o{}", s.ld_o));
    }
    if c.misalign {
        t.push_str(" misaligned");
    }
    if c.amp > 2.0 {
        t.push_str(&format!(" amp{}", c.amp));
    }
    t
}

/// Every dense kernel version on the same inputs against one reference (rows labelled v1, v2, v3; v3 at head
/// dim 128 launches the v2 kernels and is skipped).
fn dense_case(dev: &CudaDevice, report: &mut Report, rng: &mut Rng, c: DenseCase) {
    const OP: &str = "flash_attn_bf16";
    let base = dense_shape(&c);
    check(report, OP, &base, |report| {
        let s = c.s;
        let d = s.head_dim;
        let (qrows, krows) = (s.batch * s.tq, s.batch * s.tk);
        let (qw, kw) = (s.hq * d, s.hk * d);
        let m = usize::from(c.misalign);
        // Host copies, each with `m` leading elements, and where each operand's row r starts (after `m`).
        let (q, k, v, k_col, v_col) = if c.fused {
            let mut x = rng.bf16s(m + qrows * s.ld_q, c.amp, 0.0);
            // v columns in [-1, 1].
            for r in 0..qrows {
                for e in &mut x[m + r * s.ld_q + qw + kw..m + r * s.ld_q + qw + 2 * kw] {
                    *e = bf16::from_f32(e.to_f32() / c.amp);
                }
            }
            (x.clone(), x.clone(), x, qw, qw + kw)
        } else {
            let q = rng.bf16s(m + qrows * s.ld_q, c.amp, 0.0);
            let k = rng.bf16s(m + krows * s.ld_k, c.amp, 0.0);
            let v = rng.bf16s(m + krows * s.ld_v, 1.0, 0.0);
            (q, k, v, 0, 0)
        };
        let dq = up(dev, &q)?;
        let (dk, dv) = if c.fused { (None, None) } else { (Some(up(dev, &k)?), Some(up(dev, &v)?)) };

        let mut want = Vec::with_capacity(qrows * qw);
        for b in 0..s.batch {
            let rows = |x: &[bf16], t: usize, ld: usize, col: usize, w: usize, h: usize| {
                Tensor::from_f32([t, h, d], gather(&x[m + b * t * ld..], t, ld, col, w))
            };
            let qt = rows(&q, s.tq, s.ld_q, 0, qw, s.hq)?;
            let kt = rows(&k, s.tk, s.ld_k, k_col, kw, s.hk)?;
            let vt = rows(&v, s.tk, s.ld_v, v_col, kw, s.hk)?;
            let o = cpu::attention::attention(&qt, &kt, &vt, c.causal, 1.0 / (d as f32).sqrt())?;
            want.extend(o.to_f32_vec());
        }

        for version in [FlashVersion::V1, FlashVersion::V2, FlashVersion::V3] {
            if version == FlashVersion::V3 && d != 64 {
                continue;
            }
            let shape = format!("{} {base}", version.label());
            let mut dout = buffer::poisoned_bf16(dev, m + qrows * s.ld_o)?;
            {
                let qv = dq.slice(m..);
                let (kv, vv) = match (&dk, &dv) {
                    (Some(dk), Some(dv)) => (dk.slice(m..), dv.slice(m..)),
                    _ => (dq.slice(m + k_col..), dq.slice(m + v_col..)),
                };
                let mut ov = dout.slice_mut(m..);
                let scale = 1.0 / (d as f32).sqrt();
                attention::flash_attn_bf16_version(dev, &qv, &kv, &vv, &mut ov, s, c.causal, scale, version)?;
            }
            let out = down(dev, &dout)?;
            let out = &out[m..];
            let got = gather(out, qrows, s.ld_o, 0, qw);
            report.compare(OP, &shape, &got, &want, FLASH_ATOL, FLASH_RTOL);
            if let Some(r) = padding_written(out, qrows, s.ld_o, qw) {
                verdict(report, OP, &shape, false, format!("wrote into the padding columns of output row {r}"));
            }
        }
        Ok(())
    });
}

fn dense_checks(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    let d = |b, tq, tk, hq, hk, hd| AttnShape::dense(b, tq, tk, hq, hk, hd);
    let f = AttnShape::fused_qkv;
    let case = |s, causal, fused, misalign, amp| DenseCase { s, causal, fused, misalign, amp };
    let cases = [
        // The vision towers: InternViT-300M (16 heads of 64) and -6B (25 heads of 128), 1025 tokens per tile.
        case(f(1, 1025, 16, 16, 64), None, true, false, 2.0),
        case(d(7, 1025, 1025, 16, 16, 64), None, false, false, 2.0),
        case(f(2, 1025, 25, 25, 128), None, true, false, 2.0),
        // Awkward sizes: one row and one key, keys not a multiple of the 64-key tile, fewer keys than queries.
        case(d(1, 1, 1, 1, 1, 64), None, false, false, 2.0),
        case(d(1, 17, 130, 4, 2, 128), None, false, false, 2.0),
        case(d(1, 130, 77, 2, 1, 64), None, false, false, 2.0),
        case(d(3, 130, 130, 2, 2, 64), Some(0), false, false, 2.0),
        // Qwen2.5 prefill (GQA 14/2, 28/4, 40/8), from a fused QKV buffer and continuing a cached prefix.
        case(f(1, 41, 14, 2, 64), Some(0), true, false, 2.0),
        case(AttnShape { tk: 430, ..d(1, 130, 430, 28, 4, 128) }, Some(300), false, false, 2.0),
        case(AttnShape { tk: 1017, ld_o: 40 * 128 + 8, ..d(2, 17, 1017, 40, 8, 128) }, Some(1000), false, false, 2.0),
        // Scalar paths (views one element off 16-byte alignment), and near one-hot softmax rows.
        case(AttnShape { tk: 70, ..d(1, 33, 70, 4, 2, 64) }, Some(37), false, true, 2.0),
        case(d(1, 65, 65, 2, 2, 128), None, false, true, 2.0),
        case(f(1, 257, 16, 16, 64), None, true, false, 8.0),
    ];
    for c in cases {
        dense_case(dev, report, rng, c);
    }
}

// ---- the paged cache ---------------------------------------------------------------------------------------

/// One layer's cache with random, non-contiguous block tables; slots past each context are NaN.
struct Cache {
    k: Vec<bf16>,
    v: Vec<bf16>,
    /// `[num_seqs, max_blocks]`; entries past a context are u32::MAX (never read).
    tables: Vec<u32>,
    max_blocks: usize,
    hk: usize,
    d: usize,
}

impl Cache {
    fn new(rng: &mut Rng, contexts: &[usize], hk: usize, d: usize) -> Cache {
        let row = hk * d;
        let used: Vec<usize> = contexts.iter().map(|c| c.div_ceil(PAGE)).collect();
        let max_blocks = used.iter().copied().max().unwrap_or(0) + 1;
        // A few blocks nobody owns, so the pool is larger than the tables.
        let num_blocks = used.iter().sum::<usize>() + 3;
        let perm = permutation(rng, num_blocks);
        let nan = bf16::from_f32(f32::NAN);
        let mut k = vec![nan; num_blocks * PAGE * row];
        let mut v = k.clone();
        let mut tables = vec![u32::MAX; contexts.len() * max_blocks];
        let mut next = 0;
        for (s, &ctx) in contexts.iter().enumerate() {
            for j in 0..used[s] {
                tables[s * max_blocks + j] = perm[next] as u32;
                next += 1;
            }
            for t in 0..ctx {
                let at = (tables[s * max_blocks + t / PAGE] as usize * PAGE + t % PAGE) * row;
                for e in 0..row {
                    k[at + e] = bf16::from_f32(rng.sym(2.0));
                    v[at + e] = bf16::from_f32(rng.sym(1.0));
                }
            }
        }
        Cache { k, v, tables, max_blocks, hk, d }
    }

    fn table(&self, s: usize) -> &[u32] {
        &self.tables[s * self.max_blocks..(s + 1) * self.max_blocks]
    }

    /// The CPU reference's view: f32 copies (NaN kept) in the same layout.
    fn f32s(&self) -> (Vec<f32>, Vec<f32>) {
        (widen(&self.k), widen(&self.v))
    }

    fn layer<'a>(&self, k: &'a [f32], v: &'a [f32]) -> KvLayer<'a> {
        KvLayer { k, v, block_size: PAGE, kv_heads: self.hk, head_dim: self.d }
    }
}

struct Uploaded {
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    tables: CudaSlice<u32>,
}

fn upload_cache(dev: &CudaDevice, c: &Cache) -> crate::Result<Uploaded> {
    Ok(Uploaded { k: up(dev, &c.k)?, v: up(dev, &c.v)?, tables: up(dev, &c.tables)? })
}

// ---- paged prefill -----------------------------------------------------------------------------------------

/// Sequences of (context, new queries): the last `q_len` positions of each context are the queries.
fn paged_prefill_case(
    dev: &CudaDevice,
    report: &mut Report,
    rng: &mut Rng,
    seqs: &[(usize, usize)],
    hq: usize,
    hk: usize,
    d: usize,
) {
    const OP: &str = "flash_attn_paged_prefill_bf16";
    let shape = format!("seqs (ctx, q) {seqs:?} h{hq}/{hk} d{d}");
    check(report, OP, &shape, |report| {
        let contexts: Vec<usize> = seqs.iter().map(|s| s.0).collect();
        let cache = Cache::new(rng, &contexts, hk, d);
        let total_q: usize = seqs.iter().map(|s| s.1).sum();
        let max_q_len = seqs.iter().map(|s| s.1).max().unwrap_or(0);
        // q as the q columns of a fused QKV buffer.
        let ld_q = (hq + 2 * hk) * d;
        let q = rng.bf16s(total_q * ld_q, 2.0, 0.0);
        let mut cu_q = vec![0u32];
        for s in seqs {
            cu_q.push(cu_q[cu_q.len() - 1] + s.1 as u32);
        }
        let lens: Vec<u32> = contexts.iter().map(|&c| c as u32).collect();
        let dc = upload_cache(dev, &cache)?;
        let (dq, dcu, dlens) = (up(dev, &q)?, up(dev, &cu_q)?, up(dev, &lens)?);
        let mut dout = buffer::poisoned_bf16(dev, total_q * hq * d)?;
        let s = PagedPrefillShape {
            num_seqs: seqs.len(),
            total_q,
            max_q_len,
            hq,
            hk,
            head_dim: d,
            block_size: PAGE,
            max_blocks: cache.max_blocks,
            ld_q,
            ld_o: hq * d,
        };
        let scale = 1.0 / (d as f32).sqrt();
        {
            let inp = PagedPrefillInputs {
                q: &dq.as_view(),
                k_cache: &dc.k.as_view(),
                v_cache: &dc.v.as_view(),
                block_tables: &dc.tables.as_view(),
                cu_q: &dcu.as_view(),
                context_lens: &dlens.as_view(),
            };
            attention::flash_attn_paged_prefill_bf16(dev, &inp, &mut dout.as_view_mut(), s, scale)?;
        }
        let got = widen(&down(dev, &dout)?);
        let (kf, vf) = cache.f32s();
        let layer = cache.layer(&kf, &vf);
        let mut want = Vec::with_capacity(got.len());
        for (i, &(ctx, ql)) in seqs.iter().enumerate() {
            let rows = &q[cu_q[i] as usize * ld_q..];
            let qt = Tensor::from_f32([ql, hq, d], gather(rows, ql, ld_q, 0, hq * d))?;
            let o = cpu::paged_attention::paged_attention(&qt, &layer, cache.table(i), ctx, Some(ctx - ql), scale)?;
            want.extend(o.to_f32_vec());
        }
        report.compare(OP, &shape, &got, &want, FLASH_ATOL, FLASH_RTOL);
        Ok(())
    });
}

// ---- paged decode ------------------------------------------------------------------------------------------

/// One query per sequence against `contexts` (0: an idle slot, which must come out as zeros), through both
/// kernel versions on the same inputs (rows labelled v1 and v2; v2 is launched twice on the same workspace,
/// "v2 replay", which checks that its counters are left zero as a replayed graph needs).
fn decode_case(
    dev: &CudaDevice,
    report: &mut Report,
    rng: &mut Rng,
    contexts: &[usize],
    (hq, hk, d): (usize, usize, usize),
    max_context: usize,
) {
    const OP: &str = "paged_attention_decode_bf16";
    let base = format!("ctx {contexts:?} h{hq}/{hk} d{d} max_ctx {max_context}");
    check(report, OP, &base, |report| {
        let n = contexts.len();
        let cache = Cache::new(rng, contexts, hk, d);
        let ld_q = (hq + 2 * hk) * d;
        let ld_o = hq * d + 8;
        let q = rng.bf16s(n * ld_q, 2.0, 0.0);
        let lens: Vec<u32> = contexts.iter().map(|&c| c as u32).collect();
        let dc = upload_cache(dev, &cache)?;
        let (dq, dlens) = (up(dev, &q)?, up(dev, &lens)?);
        let s = DecodeShape {
            num_seqs: n,
            hq,
            hk,
            head_dim: d,
            block_size: PAGE,
            max_blocks: cache.max_blocks,
            max_context,
            ld_q,
            ld_o,
        };
        let (kf, vf) = cache.f32s();
        let layer = cache.layer(&kf, &vf);
        let mut want = Vec::with_capacity(n * hq * d);
        for (i, &ctx) in contexts.iter().enumerate() {
            if ctx == 0 {
                want.extend(std::iter::repeat_n(0.0, hq * d));
                continue;
            }
            let qt = Tensor::from_f32([1, hq, d], gather(&q[i * ld_q..], 1, ld_q, 0, hq * d))?;
            let o =
                cpu::paged_attention::paged_attention(&qt, &layer, cache.table(i), ctx, None, 1.0 / (d as f32).sqrt())?;
            want.extend(o.to_f32_vec());
        }
        for (version, launches) in [(AttnVersion::V1, 1), (AttnVersion::V2, 2)] {
            // A fresh workspace per version: NaN partials, zero v2 counters.
            let mut ws = match s.workspace_len() {
                0 => None,
                _ => Some(up(dev, &s.poisoned_workspace())?),
            };
            for launch in 0..launches {
                let shape = match launch {
                    0 => format!("{} {base}", version.label()),
                    _ => format!("{} replay {base}", version.label()),
                };
                let mut dout = buffer::poisoned_bf16(dev, n * ld_o)?;
                {
                    let inp = DecodeInputs {
                        q: &dq.as_view(),
                        k_cache: &dc.k.as_view(),
                        v_cache: &dc.v.as_view(),
                        block_tables: &dc.tables.as_view(),
                        context_lens: &dlens.as_view(),
                    };
                    let mut wv = ws.as_mut().map(|w| w.as_view_mut());
                    paged_attention::paged_attention_decode_bf16_version(
                        dev,
                        &inp,
                        &mut dout.as_view_mut(),
                        wv.as_mut(),
                        s,
                        1.0 / (d as f32).sqrt(),
                        version,
                    )?;
                }
                let out = down(dev, &dout)?;
                report.compare(OP, &shape, &gather(&out, n, ld_o, 0, hq * d), &want, DECODE_ATOL, DECODE_RTOL);
                if let Some(r) = padding_written(&out, n, ld_o, hq * d) {
                    verdict(report, OP, &shape, false, format!("wrote into the padding columns of output row {r}"));
                }
            }
        }
        Ok(())
    });
}

// ---- write_kv ----------------------------------------------------------------------------------------------

/// Writes `t` tokens at positions `start..start + t` of a random table, plus one padding token (slot -1) that
/// must be skipped; k and v are the k/v columns of a fused QKV buffer when `fused`.
fn write_kv_case(
    dev: &CudaDevice,
    report: &mut Report,
    rng: &mut Rng,
    (hk, d): (usize, usize),
    start: usize,
    t: usize,
    fused: bool,
) {
    const OP: &str = "write_kv_bf16";
    let shape = format!("t {t} (+1 padding) at {start} hk{hk} d{d}{}", if fused { " fused" } else { "" });
    check(report, OP, &shape, |report| {
        let row = hk * d;
        let ld = if fused { (14 + 2 * hk) * d } else { row };
        let (k_col, v_col) = if fused { (14 * d, 14 * d + row) } else { (0, 0) };
        let blocks = (start + t).div_ceil(PAGE);
        let num_blocks = blocks + 4;
        let table: Vec<u32> = permutation(rng, num_blocks)[..blocks].iter().map(|&b| b as u32).collect();
        let mut slots = paged_attention::slot_mapping(&table, PAGE, start, t)?;
        slots.push(-1);
        let n = t + 1;
        let (kx, vx) = if fused {
            let x = rng.bf16s(n * ld, 1.0, 0.0);
            (x.clone(), x)
        } else {
            (rng.bf16s(n * ld, 1.0, 0.0), rng.bf16s(n * ld, 1.0, 0.0))
        };
        let nan = bf16::from_f32(f32::NAN);
        let mut dkc = up(dev, &vec![nan; num_blocks * PAGE * row])?;
        let mut dvc = up(dev, &vec![nan; num_blocks * PAGE * row])?;
        let (dk, dv, ds) = (up(dev, &kx)?, up(dev, &vx)?, up(dev, &slots)?);
        let s = WriteKvShape { tokens: n, kv_heads: hk, head_dim: d, ld_k: ld, ld_v: ld };
        paged_attention::write_kv_bf16(
            dev,
            &dk.slice(k_col..),
            &dv.slice(v_col..),
            &ds.as_view(),
            &mut dkc.as_view_mut(),
            &mut dvc.as_view_mut(),
            s,
        )?;
        let (gk, gv) = (widen(&down(dev, &dkc)?), widen(&down(dev, &dvc)?));
        let mut wk = vec![f32::NAN; gk.len()];
        let mut wv = wk.clone();
        {
            let mut layer = KvLayerMut { k: &mut wk, v: &mut wv, block_size: PAGE, kv_heads: hk, head_dim: d };
            let kt = Tensor::from_f32([t, hk, d], gather(&kx, t, ld, k_col, row))?;
            let vt = Tensor::from_f32([t, hk, d], gather(&vx, t, ld, v_col, row))?;
            cpu::paged_attention::write_kv(&mut layer, &table, start, &kt, &vt)?;
        }
        // Written slots exactly; every slot the reference left NaN must still be NaN.
        let mut pairs = (Vec::new(), Vec::new());
        let mut stray = None;
        for (g, w) in gk.iter().zip(&wk).chain(gv.iter().zip(&wv)) {
            if w.is_nan() {
                if !g.is_nan() {
                    stray.get_or_insert(pairs.0.len());
                }
            } else {
                pairs.0.push(*g);
                pairs.1.push(*w);
            }
        }
        report.compare(OP, &shape, &pairs.0, &pairs.1, 0.0, 0.0);
        if let Some(i) = stray {
            verdict(report, OP, &shape, false, format!("wrote a slot outside the mapping (near written element {i})"));
        }
        Ok(())
    });
}

// ---- refusals ----------------------------------------------------------------------------------------------

fn refusals(dev: &CudaDevice, report: &mut Report) {
    const SCALE: f32 = 0.125;
    type Bufs = (CudaSlice<bf16>, CudaSlice<bf16>, CudaSlice<u32>, CudaSlice<f32>, CudaSlice<i32>);
    let alloc = || -> Result<Bufs> {
        Ok((
            buffer::zeros(dev, 1 << 16)?,
            buffer::zeros(dev, 1 << 16)?,
            buffer::zeros(dev, 64)?,
            buffer::zeros(dev, 64)?,
            buffer::zeros(dev, 3)?,
        ))
    };
    let (x, mut o, idx, mut ws, slots) = match alloc() {
        Ok(b) => b,
        Err(e) => return report.error("attention refusals", "scratch buffers", e),
    };
    let xv = x.as_view();

    let ok = AttnShape::dense(1, 8, 8, 4, 2, 64);
    let mut flash =
        |s: AttnShape, causal| attention::flash_attn_bf16(dev, &xv, &xv, &xv, &mut o.as_view_mut(), s, causal, SCALE);
    report.expect_err("flash_attn_bf16", "head_dim 96", flash(AttnShape::dense(1, 8, 8, 4, 2, 96), None));
    report.expect_err("flash_attn_bf16", "hq 4 over hk 3", flash(AttnShape { hk: 3, ..ok }, None));
    report.expect_err("flash_attn_bf16", "causal offset 1 with tq = tk = 8", flash(ok, Some(1)));
    let long = AttnShape::dense(1, 70_000, 8, 4, 2, 64);
    report.expect_err("flash_attn_bf16", "q of 70000 rows in a 65536 buffer", flash(long, None));
    report.expect_err("flash_attn_bf16", "ld_q below the row width", flash(AttnShape { ld_q: 100, ..ok }, None));

    let pp = PagedPrefillShape {
        num_seqs: 1,
        total_q: 8,
        max_q_len: 8,
        hq: 4,
        hk: 2,
        head_dim: 64,
        block_size: 32,
        max_blocks: 4,
        ld_q: 256,
        ld_o: 256,
    };
    let (t4, t2, t1) = (idx.slice(..4), idx.slice(..2), idx.slice(..1));
    let inp =
        PagedPrefillInputs { q: &xv, k_cache: &xv, v_cache: &xv, block_tables: &t4, cu_q: &t2, context_lens: &t1 };
    let mut prefill = |inp: &PagedPrefillInputs<'_, '_>, s| {
        attention::flash_attn_paged_prefill_bf16(dev, inp, &mut o.as_view_mut(), s, SCALE)
    };
    report.expect_err("flash_attn_paged_prefill_bf16", "block size 32", prefill(&inp, pp));
    let inp = PagedPrefillInputs { cu_q: &t1, ..inp };
    let pp16 = PagedPrefillShape { block_size: 16, ..pp };
    report.expect_err("flash_attn_paged_prefill_bf16", "cu_q of 1 entry for 1 sequence", prefill(&inp, pp16));

    let ds = DecodeShape {
        num_seqs: 2,
        hq: 4,
        hk: 2,
        head_dim: 64,
        block_size: 16,
        max_blocks: 8,
        max_context: 1000,
        ld_q: 256,
        ld_o: 256,
    };
    let (t16, all) = (idx.slice(..16), idx.as_view());
    let dinp = DecodeInputs { q: &xv, k_cache: &xv, v_cache: &xv, block_tables: &t16, context_lens: &t2 };
    let mut decode = |inp: &DecodeInputs<'_, '_>, ws: Option<&mut CudaViewMut<'_, f32>>, s| {
        paged_attention::paged_attention_decode_bf16(dev, inp, &mut o.as_view_mut(), ws, s, SCALE)
    };
    report.expect_err("paged_attention_decode_bf16", "max_context 1000 without a workspace", decode(&dinp, None, ds));
    let got = decode(&dinp, Some(&mut ws.as_view_mut()), ds);
    report.expect_err("paged_attention_decode_bf16", "workspace of 64 f32 (needs 2 x (2 + 4 x 16 x 66))", got);
    let dinp = DecodeInputs { block_tables: &all, ..dinp };
    let short = DecodeShape { max_context: 64, ..ds };
    report.expect_err(
        "paged_attention_decode_bf16",
        "block_tables of 64 entries for 2 x 8",
        decode(&dinp, None, short),
    );

    let s = WriteKvShape { tokens: 4, kv_heads: 2, head_dim: 64, ld_k: 128, ld_v: 128 };
    let (mut kc, mut vc) = o.split_at_mut(2048);
    let got = paged_attention::write_kv_bf16(dev, &xv, &xv, &slots.as_view(), &mut kc, &mut vc, s);
    report.expect_err("write_kv_bf16", "3 slots for 4 tokens", got);
}

pub fn run(dev: &CudaDevice, report: &mut Report, rng: &mut Rng) {
    dense_checks(dev, report, rng);

    // Paged prefill: a first prefill, prefixes continued by a few or many new tokens, a single new token.
    let seqs_1b = [(41, 41), (317, 17), (16, 1), (700, 130)];
    paged_prefill_case(dev, report, rng, &seqs_1b, 14, 2, 64);
    paged_prefill_case(dev, report, rng, &[(1000, 130), (33, 33)], 28, 4, 128);
    paged_prefill_case(dev, report, rng, &[(129, 129), (300, 1)], 40, 8, 128);

    // Decode: contexts around the block and partition edges in one batch, an idle slot (0), partitions past
    // every context (max_context above the longest), a group of 9 heads (two head slices), one partition
    // (no workspace).
    let ctx = [1, 15, 16, 17, 700, 3000, 0];
    decode_case(dev, report, rng, &ctx, (14, 2, 64), 3000);
    decode_case(dev, report, rng, &ctx[..6], (28, 4, 128), 4096);
    decode_case(dev, report, rng, &[300, 513, 256, 257], (40, 8, 128), 600);
    decode_case(dev, report, rng, &[255, 256, 257], (18, 2, 64), 512);
    decode_case(dev, report, rng, &[5, 200], (14, 2, 64), 256);
    // One partition for both versions (no workspace), and the 1B bench shape (10 v2 partitions of 64).
    decode_case(dev, report, rng, &[5, 64, 0], (14, 2, 64), 64);
    decode_case(dev, report, rng, &[300], (14, 2, 64), 640);
    // v2 sizes partitions per sequence: a short context in a 32k launch (5 partitions of 64), and 40 sequences
    // (fewer, longer partitions, whose first table entries are read again), with a long context among them.
    decode_case(dev, report, rng, &[300], (14, 2, 64), 32768);
    let many: Vec<usize> = (0..40).map(|i| 1 + (i * 97) % 700).chain([2500]).collect();
    decode_case(dev, report, rng, &many, (14, 2, 64), 3000);
    decode_case(dev, report, rng, &[2500, 1, 700], (28, 4, 128), 3000);

    write_kv_case(dev, report, rng, (2, 64), 0, 41, true);
    write_kv_case(dev, report, rng, (4, 128), 700, 1, true);
    write_kv_case(dev, report, rng, (8, 128), 5, 17, false);

    refusals(dev, report);
}

// ---- bench cases -------------------------------------------------------------------------------------------

fn dense_bench<'a>(
    dev: &'a CudaDevice,
    version: FlashVersion,
    name: &str,
    s: AttnShape,
    causal: Option<usize>,
) -> Result<KernelCase<'a>> {
    let qkv = buffer::zeros::<bf16>(dev, s.batch * s.tq * s.ld_q)?;
    let mut out = buffer::zeros::<bf16>(dev, s.batch * s.tq * s.ld_o)?;
    let (qw, kw) = (s.hq * s.head_dim, s.hk * s.head_dim);
    let bytes = 2.0 * (s.batch * s.tq * (qw + 2 * kw + qw)) as f64;
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    Ok(KernelCase {
        op: "flash_attn_bf16".into(),
        shape: format!("{} {name} (b{} t{} h{}/{} d{})", version.label(), s.batch, s.tq, s.hq, s.hk, s.head_dim),
        bytes,
        flops: s.flops(causal),
        launch: Box::new(move || {
            let (q, k, v) = (qkv.slice(..), qkv.slice(qw..), qkv.slice(qw + kw..));
            attention::flash_attn_bf16_version(dev, &q, &k, &v, &mut out.as_view_mut(), s, causal, scale, version)
        }),
    })
}

/// One decode launch of `version` over `num_seqs` sequences of `ctx` tokens, `max_context` = `max_ctx`.
fn decode_bench<'a>(
    dev: &'a CudaDevice,
    version: AttnVersion,
    name: &str,
    (num_seqs, ctx, max_ctx): (usize, usize, usize),
    (hq, hk, d): (usize, usize, usize),
) -> Result<KernelCase<'a>> {
    let per_seq = max_ctx.max(ctx).div_ceil(PAGE);
    let num_blocks = num_seqs * per_seq;
    let k = buffer::zeros::<bf16>(dev, num_blocks * PAGE * hk * d)?;
    let v = buffer::zeros::<bf16>(dev, num_blocks * PAGE * hk * d)?;
    let tables: Vec<u32> = (0..num_blocks as u32).collect();
    let tables = buffer::upload(dev, &tables)?;
    let lens = buffer::upload(dev, &vec![ctx as u32; num_seqs])?;
    let ld_q = (hq + 2 * hk) * d;
    let q = buffer::zeros::<bf16>(dev, num_seqs * ld_q)?;
    let mut out = buffer::zeros::<bf16>(dev, num_seqs * hq * d)?;
    let s = DecodeShape {
        num_seqs,
        hq,
        hk,
        head_dim: d,
        block_size: PAGE,
        max_blocks: per_seq,
        max_context: max_ctx.max(ctx),
        ld_q,
        ld_o: hq * d,
    };
    // Zeroed: the v2 counters must start at zero.
    let mut ws = buffer::zeros::<f32>(dev, s.workspace_len().max(1))?;
    let bytes = s.kv_bytes(&vec![ctx; num_seqs]) + (num_seqs * 2 * hq * d * 2) as f64;
    let scale = 1.0 / (d as f32).sqrt();
    Ok(KernelCase {
        op: "paged_attention_decode_bf16".into(),
        shape: format!(
            "{} {name} (seqs {num_seqs} ctx {ctx} max_ctx {} h{hq}/{hk} d{d})",
            version.label(),
            s.max_context
        ),
        bytes,
        flops: 4.0 * (num_seqs * hq * ctx * d) as f64,
        launch: Box::new(move || {
            let inp = DecodeInputs {
                q: &q.as_view(),
                k_cache: &k.as_view(),
                v_cache: &v.as_view(),
                block_tables: &tables.as_view(),
                context_lens: &lens.as_view(),
            };
            paged_attention::paged_attention_decode_bf16_version(
                dev,
                &inp,
                &mut out.as_view_mut(),
                Some(&mut ws.as_view_mut()),
                s,
                scale,
                version,
            )
        }),
    })
}

/// The vision towers' attention, LLM prefill and decode attention at the model shapes.
pub fn bench_cases<'a>(dev: &'a CudaDevice) -> Result<Vec<KernelCase<'a>>> {
    let f = AttnShape::fused_qkv;
    let denses = [
        ("vision 300M, 7 tiles", f(7, 1025, 16, 16, 64), None),
        ("vision 6B, 7 tiles", f(7, 1025, 25, 25, 128), None),
        ("1B prefill, 1 tile + 41 tokens", f(1, 297, 14, 2, 64), Some(0)),
        ("8B prefill, 1 tile + 41 tokens", f(1, 297, 28, 4, 128), Some(0)),
    ];
    // Each dense shape with every kernel version (shape labels start with v1 / v2 / v3; v3 only at head dim 64,
    // where it differs from v2).
    let mut cases = Vec::new();
    for (name, s, causal) in denses {
        for version in [FlashVersion::V1, FlashVersion::V2, FlashVersion::V3] {
            if version == FlashVersion::V3 && s.head_dim != 64 {
                continue;
            }
            cases.push(dense_bench(dev, version, name, s, causal)?);
        }
    }
    // Each decode shape with both kernels (shape labels start with v1 / v2). (seqs, ctx, max_context): the
    // bench's decode graphs use max_context 640; the batch-16 and long rows keep max_context = ctx.
    type Dims = (usize, usize, usize);
    let decodes: [(&str, Dims, Dims); 9] = [
        ("1B decode, batch 1", (1, 300, 640), (14, 2, 64)),
        // What `serve` and `generate` capture: graphs sized for a long context, replayed at a short one.
        ("1B decode, batch 1, 32k graph", (1, 300, 32768), (14, 2, 64)),
        ("1B decode, batch 64, 32k graph", (64, 300, 32768), (14, 2, 64)),
        ("1B decode, batch 1, short", (1, 50, 640), (14, 2, 64)),
        ("1B decode, batch 16", (16, 1000, 1000), (14, 2, 64)),
        ("1B decode, batch 64", (64, 100, 640), (14, 2, 64)),
        ("8B decode, batch 1", (1, 300, 640), (28, 4, 128)),
        ("8B decode, batch 16", (16, 2000, 2000), (28, 4, 128)),
        ("38B decode, batch 1, long context", (1, 4000, 4000), (40, 8, 128)),
    ];
    for (name, sizes, heads) in decodes {
        for version in [AttnVersion::V1, AttnVersion::V2] {
            cases.push(decode_bench(dev, version, name, sizes, heads)?);
        }
    }
    Ok(cases)
}
