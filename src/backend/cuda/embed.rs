//! Launchers for `kernels/embed.cu`: the token embedding gather (twin of `backend/cpu/embedding.rs`'s
//! `embedding`) and the row scatter that places image features at the `<IMG_CONTEXT>` positions (twin of
//! `scatter_rows`), both bf16 copies. Also the bits of the device error word, which kernels set instead of
//! failing when an index read from the device is out of range (the CPU twins return `Err` there).

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{guarded, CudaDevice, Error, Result};

const MODULE: &str = "embed";
const MAX_THREADS: usize = 256;

/// `embedding_gather_bf16`: an id >= vocab (its output row is zeros). Same value as `kErrBadTokenId`.
pub const ERR_BAD_TOKEN_ID: u32 = 1 << 0;
/// `scatter_rows_bf16`: a destination row outside `[0, t)` (skipped). Same value as `kErrBadScatterRow`.
pub const ERR_BAD_SCATTER_ROW: u32 = 1 << 1;
/// `qkv_bias_rope_write_kv_bf16`: a slot < -1 or past the cache (not written). Same value as `kErrBadKvSlot`.
pub const ERR_BAD_KV_SLOT: u32 = 1 << 2;

/// What the bits of an error word read back from the device mean (empty for 0).
pub fn describe_error_word(word: u32) -> Vec<&'static str> {
    let names = [
        (ERR_BAD_TOKEN_ID, "token id >= vocab (embedded as zeros)"),
        (ERR_BAD_SCATTER_ROW, "scatter row out of range (skipped)"),
        (ERR_BAD_KV_SLOT, "kv cache slot out of range (not written)"),
    ];
    let mut out: Vec<&str> = names.iter().filter(|(b, _)| word & b != 0).map(|(_, s)| *s).collect();
    if word & !(ERR_BAD_TOKEN_ID | ERR_BAD_SCATTER_ROW | ERR_BAD_KV_SLOT) != 0 {
        out.push("unknown error bits");
    }
    out
}

/// One block per row of `d` elements (`rows` blocks); threads cover the row in 8-element vectors.
pub(crate) fn plan(op: &'static str, rows: usize, d: usize, lens: &[(&str, usize, usize)]) -> Result<LaunchConfig> {
    let invalid = |msg: String| Error::Invalid { op, msg };
    if d == 0 {
        return Err(invalid("row length d must be > 0".into()));
    }
    if i32::try_from(d).is_err() {
        return Err(invalid(format!("row length {d} exceeds i32::MAX")));
    }
    let grid = u32::try_from(rows).ok().filter(|&r| r <= i32::MAX as u32);
    let Some(grid) = grid else {
        return Err(invalid(format!("{rows} rows exceed the grid limit 2^31-1")));
    };
    for &(name, got, want) in lens {
        if got != want {
            return Err(invalid(format!("{name} holds {got} elements, expected {want}")));
        }
    }
    let threads = d.div_ceil(8).next_multiple_of(32).min(MAX_THREADS) as u32;
    Ok(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

fn numel(op: &'static str, rows: usize, d: usize) -> Result<usize> {
    rows.checked_mul(d).ok_or(Error::Invalid { op, msg: format!("[{rows}, {d}] overflows") })
}

/// `out [ids.len(), d] = table [vocab, d][ids]`; an id >= vocab gives zeros and sets [`ERR_BAD_TOKEN_ID`] in
/// `err [1]`.
pub fn embedding_gather_bf16(
    dev: &CudaDevice,
    ids: &CudaView<'_, u32>,
    table: &CudaView<'_, bf16>,
    vocab: usize,
    d: usize,
    out: &mut CudaViewMut<'_, bf16>,
    err: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    const OP: &str = "embedding_gather_bf16";
    let t = ids.len();
    if i32::try_from(vocab).is_err() {
        return Err(Error::Invalid { op: OP, msg: format!("vocab {vocab} exceeds i32::MAX") });
    }
    let lens =
        [("table", table.len(), numel(OP, vocab, d)?), ("out", out.len(), numel(OP, t, d)?), ("err", err.len(), 1)];
    let cfg = plan(OP, t, d, &lens)?;
    if t == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "embedding_gather_bf16")?;
    let (vocab_i32, d_i32) = (vocab as i32, d as i32);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(ids).arg(table).arg(&mut *out).arg(&vocab_i32).arg(&d_i32).arg(&mut *err);
    // SAFETY: the arguments match embedding_gather_bf16(const u32*, const bf16*, bf16*, int, int, u32*); `plan`
    // checked table holds vocab * d elements, out ids.len() * d, err one word, vocab and d fit i32, the grid is
    // one block per id; the kernel reads table rows only for ids < vocab. out and err are &mut views, so they
    // alias neither each other nor the inputs.
    guarded("launch embedding_gather_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

/// `dst [t, d][rows[i]] = src [rows.len(), d][i]`; a row outside `[0, t)` is skipped and sets
/// [`ERR_BAD_SCATTER_ROW`] in `err [1]`. Rows must be distinct (duplicates race).
pub fn scatter_rows_bf16(
    dev: &CudaDevice,
    rows: &CudaView<'_, i32>,
    src: &CudaView<'_, bf16>,
    dst: &mut CudaViewMut<'_, bf16>,
    t: usize,
    d: usize,
    err: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    const OP: &str = "scatter_rows_bf16";
    let k = rows.len();
    if i32::try_from(t).is_err() {
        return Err(Error::Invalid { op: OP, msg: format!("t {t} exceeds i32::MAX") });
    }
    let lens = [("src", src.len(), numel(OP, k, d)?), ("dst", dst.len(), numel(OP, t, d)?), ("err", err.len(), 1)];
    let cfg = plan(OP, k, d, &lens)?;
    if k == 0 {
        return Ok(());
    }
    let f = dev.kernels.function(MODULE, "scatter_rows_bf16")?;
    let (t_i32, d_i32) = (t as i32, d as i32);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(rows).arg(src).arg(&mut *dst).arg(&t_i32).arg(&d_i32).arg(&mut *err);
    // SAFETY: the arguments match scatter_rows_bf16(const int*, const bf16*, bf16*, int, int, u32*); `plan`
    // checked src holds rows.len() * d elements, dst t * d, err one word, t and d fit i32, the grid is one
    // block per source row; the kernel writes dst rows only for 0 <= row < t. dst and err are &mut views, so
    // they alias neither each other nor src.
    guarded("launch scatter_rows_bf16", || unsafe { launch.launch(cfg) }.map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_rows_get_one_vector_per_thread() {
        for (d, threads) in [(896, 128), (3584, 256), (5120, 256), (8, 32), (7, 32), (1, 32)] {
            let cfg = plan("t", 3, d, &[]).expect("valid");
            assert_eq!(cfg.block_dim.0, threads, "d={d}");
            assert_eq!(cfg.grid_dim.0, 3);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(plan("t", 2, 0, &[]).is_err());
        assert!(plan("t", usize::MAX, 8, &[]).is_err());
        assert!(plan("t", 1, 1 << 31, &[]).is_err());
        let err = plan("embedding_gather_bf16", 2, 8, &[("out", 15, 16)]).unwrap_err().to_string();
        assert!(err.contains("out holds 15 elements, expected 16"), "{err}");
        assert!(numel("t", usize::MAX, 2).is_err());
    }

    #[test]
    fn error_words_are_described() {
        assert!(describe_error_word(0).is_empty());
        assert_eq!(describe_error_word(ERR_BAD_TOKEN_ID | ERR_BAD_KV_SLOT).len(), 2);
        assert_eq!(describe_error_word(1 << 9), ["unknown error bits"]);
    }
}
