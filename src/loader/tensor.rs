//! A borrowed view of one tensor's bytes in a memory-mapped safetensors file, and conversions to f32 / bf16.
//!
//! Safetensors stores little-endian values packed after a JSON header of arbitrary length, so a tensor's
//! bytes can start at any address: the conversions never cast an unaligned slice, and `as_bf16_slice` only
//! borrows when the address happens to be aligned.

use std::path::Path;

use half::{bf16, f16};

pub use crate::tensor::DType;

#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// Canonical name (see `loader::names`).
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    /// Exactly `numel * dtype.size()` bytes, little-endian, straight from the mmap.
    pub bytes: &'a [u8],
    pub file: &'a Path,
}

impl<'a> TensorView<'a> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.dtype {
            DType::BF16 => self.u16s().map(|b| bf16::from_bits(b).to_f32()).collect(),
            DType::F16 => self.u16s().map(|b| f16::from_bits(b).to_f32()).collect(),
            DType::F32 => self.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        }
    }

    /// bf16 values; f16 and f32 are rounded to nearest-even (f16 -> bf16 goes through f32, which is exact).
    pub fn to_bf16_vec(&self) -> Vec<bf16> {
        match self.dtype {
            DType::BF16 => self.u16s().map(bf16::from_bits).collect(),
            DType::F16 => self.u16s().map(|b| bf16::from_f32(f16::from_bits(b).to_f32())).collect(),
            DType::F32 => self.to_f32_vec().into_iter().map(bf16::from_f32).collect(),
        }
    }

    /// Zero-copy bf16 slice when the tensor is bf16, the bytes are 2-byte aligned and the host is
    /// little-endian; None otherwise (use `to_bf16_vec`).
    pub fn as_bf16_slice(&self) -> Option<&'a [bf16]> {
        if self.dtype != DType::BF16 || cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(self.bytes).ok()
    }

    fn u16s(&self) -> impl Iterator<Item = u16> + 'a {
        self.bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]))
    }
}
