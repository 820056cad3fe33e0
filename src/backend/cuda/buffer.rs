//! Device buffers: uploads, downloads and poisoned allocations, each a checked call returning this backend's
//! `Error`. Activations are bf16 `CudaSlice`s; launchers take `&CudaView` inputs and `&mut CudaViewMut`
//! outputs so a caller can pass a whole buffer (`.as_view()`) or a sub-range (`.slice(a..b)`).

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use super::{guarded, CudaDevice, Result};

/// The bf16 NaN written into outputs before a checked launch: any element a kernel fails to write stays NaN.
pub const POISON_BF16: bf16 = bf16::from_bits(0x7FC1);

pub fn upload<T: DeviceRepr>(dev: &CudaDevice, host: &[T]) -> Result<CudaSlice<T>> {
    guarded("upload", || dev.stream.clone_htod(host))
}

pub fn download<T: DeviceRepr + Clone + Default, S: DevicePtr<T>>(dev: &CudaDevice, src: &S) -> Result<Vec<T>> {
    guarded("download", || dev.stream.clone_dtoh(src))
}

pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    guarded("alloc_zeros", || dev.stream.alloc_zeros::<T>(n))
}

/// `n` bf16 elements, every one [`POISON_BF16`].
pub fn poisoned_bf16(dev: &CudaDevice, n: usize) -> Result<CudaSlice<bf16>> {
    upload(dev, &vec![POISON_BF16; n])
}

/// `n` f32 elements, every one NaN.
pub fn poisoned_f32(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    upload(dev, &vec![f32::NAN; n])
}

/// `n` elements of undefined content, for work buffers that a forward writes before it reads them (no memset:
/// at 13 tiles of InternViT-6B the MLP buffer alone is 340 MB).
pub fn scratch<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is only exposed as a CudaSlice of plain-old-data `T`; every caller writes an element
    // before reading it (the selfcheck poisons outputs to prove that for every kernel).
    guarded("alloc", || unsafe { dev.stream.alloc::<T>(n) })
}
