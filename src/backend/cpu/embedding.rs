//! Token embedding lookup (rows of a table in any float dtype, widened to f32) and its inverse direction,
//! writing rows into an activation, which places the projected image features at the `<IMG_CONTEXT>`
//! positions (MODEL_SPEC §3.7).

use super::{f32_data, invalid, Weights};
use crate::tensor::Tensor;
use crate::Result;

/// Rows of `table [vocab, d]` for `ids` -> `[ids.len(), d]` f32.
pub fn embedding(ids: &[u32], table: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    let ts = table.shape();
    if ts.len() != 2 {
        return Err(invalid(OP, format!("table must be [vocab, d], got {ts:?}")));
    }
    let (vocab, d) = (ts[0], ts[1]);
    if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(invalid(OP, format!("id {id} at index {i} is out of range for a table of {vocab} rows ({ts:?})")));
    }
    let w = Weights::of(table);
    let mut out = vec![0f32; ids.len() * d];
    if d > 0 {
        for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
            w.widen(id as usize * d, row);
        }
    }
    Tensor::from_f32([ids.len(), d], out)
}

/// `dst[rows[i], :] = src[i, :]`; `dst [t, d]`, `src [rows.len(), d]`.
pub fn scatter_rows(dst: &mut Tensor, rows: &[usize], src: &Tensor) -> Result<()> {
    const OP: &str = "scatter_rows";
    let (ds, ss) = (dst.shape().to_vec(), src.shape());
    if ds.len() != 2 || ss.len() != 2 || ss[1] != ds[1] || ss[0] != rows.len() {
        return Err(invalid(
            OP,
            format!("need dst [t, d] and src [{}, d] for {} rows; got dst {ds:?}, src {ss:?}", rows.len(), rows.len()),
        ));
    }
    if let Some((i, &r)) = rows.iter().enumerate().find(|(_, &r)| r >= ds[0]) {
        return Err(invalid(OP, format!("row {r} at index {i} is out of range for dst {ds:?}")));
    }
    let s = f32_data(OP, "src", src)?;
    f32_data(OP, "dst", dst)?;
    let d = ds[1];
    let dv = dst.f32s_mut()?;
    for (i, &r) in rows.iter().enumerate() {
        dv[r * d..(r + 1) * d].copy_from_slice(&s[i * d..(i + 1) * d]);
    }
    Ok(())
}
