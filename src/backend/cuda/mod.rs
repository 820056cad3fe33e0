//! The CUDA backend (feature `cuda`): a device probe that never panics, a registry of the kernels build.rs
//! embedded, and one typed launcher per kernel (in `<op>.rs`, twins of `backend/cpu/<op>.rs`).
//!
//! cudarc loads libcuda with dlopen on first use and panics when it is missing, so [`probe`] checks for the
//! library first and turns every failure (no library, no device, an old driver without a symbol) into an
//! [`Error`]; callers fall back to the CPU or report it. Nothing here runs at build time or needs a GPU to
//! compile.

pub mod attention;
pub mod buffer;
pub mod elementwise;
pub mod embed;
pub mod fill;
pub mod gemm;
pub mod gemv;
pub mod layernorm;
pub mod norm;
pub mod paged_attention;
pub mod patch_embed;
pub mod pixel_shuffle;
pub mod registry;
pub mod rope_kv;
pub mod sampling;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, DriverError};

pub use gemm::{Blas, LinearShape};
pub use registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cuda: no NVIDIA driver (libcuda.so.1 not found by dlopen); run with --device cpu")]
    NoDriver,
    #[error("cuda: {what}: {err}")]
    Driver { what: String, err: DriverError },
    /// cudarc panicked inside the driver binding (typically a symbol missing from an old libcuda).
    #[error("cuda: {what}: the driver binding panicked: {msg}")]
    Panicked { what: String, msg: String },
    #[error("cuda: device {ordinal} requested, {count} present")]
    NoDevice { ordinal: usize, count: usize },
    #[error("cuda: kernel module `{module}` is not embedded in this binary")]
    MissingModule { module: String },
    #[error("cuda: cuBLAS: {what}: {msg}")]
    Blas { what: String, msg: String },
    /// A launcher's shape, length or size check failed.
    #[error("cuda {op}: {msg}")]
    Invalid { op: &'static str, msg: String },
}

impl From<Error> for crate::Error {
    fn from(e: Error) -> Self {
        crate::Error::Invalid(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Runs a driver call, turning both its error and a panic inside cudarc into an [`Error`].
pub fn guarded<T>(what: &str, f: impl FnOnce() -> std::result::Result<T, DriverError>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(err)) => Err(Error::Driver { what: what.to_string(), err }),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(Error::Panicked { what: what.to_string(), msg })
        }
    }
}

/// What [`probe`] found: the device count and the first device's name and compute capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub count: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
}

fn driver_present() -> bool {
    // SAFETY: only dlopen()s the candidate library names and drops the handle; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    let n = guarded("cuDeviceGetCount", CudaContext::device_count)?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Looks for a usable CUDA device without panicking; `Err` says why there is none.
pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
    CudaDevice::new(ordinal).map(|d| d.info)
}

/// One GPU: its context, the stream every launch goes to, and the kernels loaded into it.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub info: DeviceInfo,
    pub kernels: Registry,
    /// cuBLASLt on `stream`, for the dense GEMMs.
    pub blas: Blas,
}

impl CudaDevice {
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = guarded("create context", || CudaContext::new(ordinal))?;
        let name = guarded("device name", || ctx.name())?;
        let compute_capability = guarded("compute capability", || ctx.compute_capability())?;
        // One stream per device, created (not the legacy default stream) so it can be captured into CUDA graphs;
        // every buffer lives on that one stream, so cudarc's cross-stream event tracking is pure overhead.
        // SAFETY: called before any buffer of this context exists; all work goes to `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = guarded("create stream", || ctx.new_stream())?;
        let kernels = Registry::load(&ctx, compute_capability)?;
        let blas = Blas::new(&stream)?;
        let info = DeviceInfo { ordinal, count, name, compute_capability };
        Ok(CudaDevice { ctx, stream, info, kernels, blas })
    }

    /// Device time of the work `f` enqueues, from CUDA events recorded around it (waits for it to finish).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = guarded("record event", || self.stream.record_event(timed))?;
        f()?;
        let end = guarded("record event", || self.stream.record_event(timed))?;
        Ok(guarded("event elapsed", || start.elapsed_ms(&end))? as f64)
    }

    /// Peak bytes in use in the device's default memory pool (where the stream-ordered allocations of this
    /// backend come from) since the last [`CudaDevice::reset_pool_peak`]; `None` when the driver has no pools.
    /// `cuMemGetInfo` cannot give this: memory freed into the pool stays reserved and reused.
    pub fn pool_peak_bytes(&self) -> Option<u64> {
        self.pool_attr(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)
    }

    /// Starts a new peak measurement (best effort).
    pub fn reset_pool_peak(&self) {
        let _ = self.pool_attr(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0));
    }

    fn pool_attr(&self, attr: cudarc::driver::sys::CUmemPool_attribute, set: Option<u64>) -> Option<u64> {
        use cudarc::driver::sys;
        let run = || -> Option<u64> {
            self.ctx.bind_to_thread().ok()?;
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            let mut value: u64 = set.unwrap_or(0);
            // SAFETY: plain driver queries on this context's device; `value` is the u64 (cuuint64_t) that the
            // USED_MEM_HIGH attribute reads and writes.
            unsafe {
                sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()).result().ok()?;
                let ptr = &mut value as *mut u64 as *mut std::ffi::c_void;
                match set {
                    Some(_) => sys::cuMemPoolSetAttribute(pool, attr, ptr).result().ok()?,
                    None => sys::cuMemPoolGetAttribute(pool, attr, ptr).result().ok()?,
                }
            }
            Some(value)
        };
        // A driver without the pool entry points makes cudarc's loader panic: that is a `None` too.
        catch_unwind(AssertUnwindSafe(run)).ok().flatten()
    }

    pub fn synchronize(&self) -> Result<()> {
        guarded("synchronize", || self.stream.synchronize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs everywhere: without a driver the probe must be a clear `Err`, never a panic.
    #[test]
    fn probe_never_panics() {
        let got = probe(0);
        if !driver_present() {
            assert!(matches!(got, Err(Error::NoDriver)), "{got:?}");
        }
        assert!(probe(usize::MAX).is_err());
    }
}
