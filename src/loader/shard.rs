//! One safetensors file, memory-mapped, with its header parsed and checked against the file length.
//!
//! The safetensors crate's `read_metadata` does the structural checks (header length, JSON, contiguous
//! offsets, byte counts matching shapes, data covering the file exactly). When it fails, the header is read
//! again here only to name the tensor that runs past the end, which is what a truncated download looks like.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{SafeTensorError, SafeTensors};

use crate::{Error, Result};

pub(crate) struct Shard {
    pub path: PathBuf,
    /// Shared with the tensors that point into it (zero-copy weights).
    pub mmap: std::sync::Arc<Mmap>,
}

/// A tensor as stored: its on-disk name and its absolute byte range in the shard's mmap.
pub(crate) struct StoredTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

const LEN_BYTES: usize = 8;

pub(crate) fn open(path: &Path) -> Result<(Shard, Vec<StoredTensor>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < LEN_BYTES as u64 {
        return Err(checkpoint_err(path, format!("truncated: {len} bytes, too short for a safetensors header")));
    }
    // SAFETY: the map is read-only and lives as long as the `Shard`. Like every mmap-based loader, this relies
    // on nobody truncating or rewriting the file while it is open; a concurrent truncation would fault on
    // access rather than be caught here.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| diagnose(path, &mmap, e))?;
    let data_start = LEN_BYTES + header_len;
    let mut tensors: Vec<StoredTensor> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| StoredTensor {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: data_start + info.data_offsets.0,
            end: data_start + info.data_offsets.1,
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((Shard { path: path.to_path_buf(), mmap: std::sync::Arc::new(mmap) }, tensors))
}

fn checkpoint_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint { file: path.display().to_string(), msg: msg.into() }
}

fn diagnose(path: &Path, bytes: &[u8], err: SafeTensorError) -> Error {
    let file_len = bytes.len();
    match err {
        SafeTensorError::InvalidHeaderLength | SafeTensorError::HeaderTooLarge => {
            let stated = bytes.get(..LEN_BYTES).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
            checkpoint_err(
                path,
                format!(
                    "corrupt or truncated header: its length field says {stated} bytes but the file has {file_len} \
                     (not a safetensors file, or cut short)"
                ),
            )
        }
        SafeTensorError::InvalidOffset(name) => Error::Tensor {
            file: path.display().to_string(),
            tensor: name,
            msg: "data_offsets overlap or leave a gap".into(),
        },
        SafeTensorError::MetadataIncompleteBuffer => match first_out_of_bounds(bytes) {
            Some((name, end)) => Error::Tensor {
                file: path.display().to_string(),
                tensor: name,
                msg: format!(
                    "out of bounds: its data ends at byte {end} but the file has {file_len} bytes (truncated?)"
                ),
            },
            None => checkpoint_err(
                path,
                format!("file size {file_len} does not match the header's data size (truncated or trailing bytes)"),
            ),
        },
        other => checkpoint_err(path, format!("corrupt safetensors header: {other}")),
    }
}

/// The tensor (by storage order) whose data runs past the end of the file, if the header is readable.
fn first_out_of_bounds(bytes: &[u8]) -> Option<(String, usize)> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..LEN_BYTES)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(LEN_BYTES..LEN_BYTES.checked_add(n)?)?).ok()?;
    let data_start = LEN_BYTES + n;
    let mut ends: Vec<(usize, String)> = header
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(k, v)| {
            let end = v.get("data_offsets")?.get(1)?.as_u64()?;
            Some((data_start.checked_add(usize::try_from(end).ok()?)?, k.clone()))
        })
        .collect();
    ends.sort();
    ends.into_iter().find(|(end, _)| *end > bytes.len()).map(|(end, name)| (name, end))
}
