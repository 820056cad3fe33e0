//! A plain n-dimensional array: a shape and a storage. No autograd, no strides (always row-major and
//! contiguous), no broadcasting: the ops in `backend` state their layouts explicitly.
//!
//! Activations on the CPU are f32. Weights keep the checkpoint's dtype and, when the file allows it, stay in
//! the memory map (zero copy): a bf16 checkpoint costs its file size in page cache and nothing more.

use std::sync::Arc;

use half::{bf16, f16};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The safetensors dtypes facellm loads; anything else in a checkpoint is refused when it is opened.
    pub(crate) fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::F32 => Some(DType::F32),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
        })
    }
}

/// Bytes that outlive the tensor view on them (a memory map, or an owned buffer).
pub trait ByteSource: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl ByteSource for memmap2::Mmap {
    fn bytes(&self) -> &[u8] {
        self
    }
}

#[derive(Clone)]
pub enum Storage {
    F32(Arc<Vec<f32>>),
    BF16(Arc<Vec<bf16>>),
    F16(Arc<Vec<f16>>),
    /// `len` elements of `dtype` at `offset` in a shared byte source, aligned for `dtype`.
    Mapped {
        source: Arc<dyn ByteSource>,
        offset: usize,
        len: usize,
        dtype: DType,
    },
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.shape, self.dtype())
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn checked_shape(shape: Vec<usize>, len: usize) -> Result<Vec<usize>> {
    if numel(&shape) != len {
        return Err(Error::Invalid(format!("tensor of shape {shape:?} needs {} values, got {len}", numel(&shape))));
    }
    Ok(shape)
}

impl Tensor {
    pub fn from_f32(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Result<Tensor> {
        let shape = checked_shape(shape.into(), data.len())?;
        Ok(Tensor { shape, storage: Storage::F32(Arc::new(data)) })
    }

    pub fn from_bf16(shape: impl Into<Vec<usize>>, data: Vec<bf16>) -> Result<Tensor> {
        let shape = checked_shape(shape.into(), data.len())?;
        Ok(Tensor { shape, storage: Storage::BF16(Arc::new(data)) })
    }

    pub fn zeros(shape: impl Into<Vec<usize>>) -> Tensor {
        let shape = shape.into();
        let n = numel(&shape);
        Tensor { shape, storage: Storage::F32(Arc::new(vec![0.0; n])) }
    }

    /// A view on `len` elements at `offset` of `source`. Misaligned data is copied into an owned buffer,
    /// since a typed slice cannot point at it.
    pub fn mapped(
        shape: impl Into<Vec<usize>>,
        source: Arc<dyn ByteSource>,
        offset: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let len = numel(&shape);
        let nbytes = len * dtype.size();
        let bytes = source.bytes();
        let Some(slice) = bytes.get(offset..offset + nbytes) else {
            return Err(Error::Invalid(format!(
                "tensor of shape {shape:?} at byte {offset} runs past the end of its data ({} bytes)",
                bytes.len()
            )));
        };
        if (slice.as_ptr() as usize).is_multiple_of(dtype.size()) {
            return Ok(Tensor { shape, storage: Storage::Mapped { source, offset, len, dtype } });
        }
        let storage = match dtype {
            DType::F32 => Storage::F32(Arc::new(
                slice.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            )),
            DType::BF16 => {
                Storage::BF16(Arc::new(slice.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect()))
            }
            DType::F16 => {
                Storage::F16(Arc::new(slice.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect()))
            }
        };
        Ok(Tensor { shape, storage })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
            Storage::Mapped { dtype, .. } => *dtype,
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(mut self, shape: impl Into<Vec<usize>>) -> Result<Tensor> {
        let shape = shape.into();
        if numel(&shape) != self.numel() {
            return Err(Error::Invalid(format!("cannot reshape {:?} to {shape:?}", self.shape)));
        }
        self.shape = shape;
        Ok(self)
    }

    fn mapped_bytes(&self) -> Option<&[u8]> {
        match &self.storage {
            Storage::Mapped { source, offset, len, dtype } => {
                Some(&source.bytes()[*offset..*offset + len * dtype.size()])
            }
            _ => None,
        }
    }

    /// The values as an f32 slice, when stored as f32 (no conversion).
    pub fn f32s(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Ok(v),
            Storage::Mapped { dtype: DType::F32, .. } => Ok(bytemuck::cast_slice(self.mapped_bytes().expect("mapped"))),
            _ => Err(Error::Invalid(format!("expected an f32 tensor, got {:?}", self.dtype()))),
        }
    }

    /// The values as a bf16 slice, when stored as bf16 (no conversion).
    pub fn bf16s(&self) -> Option<&[bf16]> {
        match &self.storage {
            Storage::BF16(v) => Some(v),
            Storage::Mapped { dtype: DType::BF16, .. } => {
                Some(bytemuck::cast_slice(self.mapped_bytes().expect("mapped")))
            }
            _ => None,
        }
    }

    /// The values as a f16 slice, when stored as f16 (no conversion).
    pub fn f16s(&self) -> Option<&[f16]> {
        match &self.storage {
            Storage::F16(v) => Some(v),
            Storage::Mapped { dtype: DType::F16, .. } => {
                Some(bytemuck::cast_slice(self.mapped_bytes().expect("mapped")))
            }
            _ => None,
        }
    }

    /// Mutable f32 values; clones the buffer first if it is shared. Errors for non-f32 tensors.
    pub fn f32s_mut(&mut self) -> Result<&mut [f32]> {
        let dtype = self.dtype();
        match &mut self.storage {
            Storage::F32(v) => Ok(Arc::make_mut(v).as_mut_slice()),
            _ => Err(Error::Invalid(format!("expected an f32 tensor, got {dtype:?}"))),
        }
    }

    /// Appends rows along the first dimension (`data` holds whole rows of `shape[1..]`), in place when the
    /// buffer is not shared: a growing KV cache costs only what it adds.
    pub fn append_rows(&mut self, data: &[f32]) -> Result<()> {
        let row: usize = self.shape[1..].iter().product();
        if row == 0 || !data.len().is_multiple_of(row) {
            return Err(Error::Invalid(format!(
                "cannot append {} values as rows of {:?}",
                data.len(),
                &self.shape[1..]
            )));
        }
        match &mut self.storage {
            Storage::F32(v) => Arc::make_mut(v).extend_from_slice(data),
            _ => return Err(Error::Invalid(format!("append_rows needs an f32 tensor, got {:?}", self.dtype()))),
        }
        self.shape[0] += data.len() / row;
        Ok(())
    }

    /// Keeps the first `rows` rows along the first dimension.
    pub fn truncate_rows(&mut self, rows: usize) -> Result<()> {
        if rows >= self.shape[0] {
            return Ok(());
        }
        let row: usize = self.shape[1..].iter().product();
        match &mut self.storage {
            Storage::F32(v) => Arc::make_mut(v).truncate(rows * row),
            _ => return Err(Error::Invalid(format!("truncate_rows needs an f32 tensor, got {:?}", self.dtype()))),
        }
        self.shape[0] = rows;
        Ok(())
    }

    /// The values widened to f32 (a copy).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        if let Ok(v) = self.f32s() {
            return v.to_vec();
        }
        if let Some(v) = self.bf16s() {
            return v.iter().map(|x| x.to_f32()).collect();
        }
        if let Some(v) = self.f16s() {
            return v.iter().map(|x| x.to_f32()).collect();
        }
        unreachable!("every storage is f32, bf16 or f16")
    }

    /// This tensor with f32 storage (no copy if it already is f32).
    pub fn to_f32(&self) -> Tensor {
        if self.f32s().is_ok() {
            return self.clone();
        }
        Tensor { shape: self.shape.clone(), storage: Storage::F32(Arc::new(self.to_f32_vec())) }
    }

    /// Consumes the tensor and returns its f32 values (no copy when uniquely owned f32).
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::F32(v) => Arc::try_unwrap(v).unwrap_or_else(|shared| (*shared).clone()),
            _ => self.to_f32_vec(),
        }
    }
}
