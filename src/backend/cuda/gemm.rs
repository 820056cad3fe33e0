//! Dense bf16 GEMMs through cuBLASLt (fp32 accumulation, tensor cores), in the row-major convention of the
//! rest of the crate: `y [m, n] = x [m, k] · w [n, k]^T (+ b [n])`, the PyTorch `F.linear` layout, with the
//! bias added in cuBLASLt's epilogue before the single rounding to bf16, as torch's `addmm` does.
//!
//! cuBLASLt is column-major. A row-major `[r, c]` matrix with row stride `ld` is the column-major `[c, r]`
//! matrix with leading dimension `ld`, so the product is computed as `y^T [n, m] = w [n, k] · x^T [k, m]`:
//! A = w read transposed (`transa`), B = x^T as stored, C = y^T as stored. The bias epilogue adds a vector
//! over C's rows, which are y's columns: exactly `b [n]`.
//!
//! Row strides let a GEMM read a column range of a wider activation buffer and write into one (a fused QKV
//! output, a slice of a batch).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result, sys, MatmulConfig};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;

use super::{Error, Result};

/// The shape of one `linear`: `m` rows of `k` inputs to `n` outputs, with row strides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Row stride of `x` in elements (>= k).
    pub ld_x: usize,
    /// Row stride of `y` in elements (>= n).
    pub ld_y: usize,
}

impl LinearShape {
    /// Contiguous `x [m, k]` and `y [m, n]`.
    pub fn dense(m: usize, n: usize, k: usize) -> LinearShape {
        LinearShape { m, n, k, ld_x: k, ld_y: n }
    }

    /// Floating-point operations of the product (2mnk).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }

    /// Checks the buffers hold the strided matrices and builds cuBLASLt's column-major configuration.
    pub fn plan(&self, x_len: usize, w_len: usize, b_len: Option<usize>, y_len: usize) -> Result<MatmulConfig> {
        let invalid = |msg: String| Error::Invalid { op: "linear_bf16", msg };
        let LinearShape { m, n, k, ld_x, ld_y } = *self;
        if n == 0 || k == 0 {
            return Err(invalid(format!("n ({n}) and k ({k}) must be positive")));
        }
        if ld_x < k || ld_y < n {
            return Err(invalid(format!("row strides ld_x {ld_x} < k {k} or ld_y {ld_y} < n {n}")));
        }
        // The last row needs only its own width, not a whole stride.
        let need = |rows: usize, ld: usize, width: usize| {
            rows.checked_sub(1).map_or(Some(0), |r| r.checked_mul(ld).and_then(|v| v.checked_add(width)))
        };
        let x_need = need(m, ld_x, k).ok_or_else(|| invalid("x extent overflows".into()))?;
        let y_need = need(m, ld_y, n).ok_or_else(|| invalid("y extent overflows".into()))?;
        let w_need = n.checked_mul(k).ok_or_else(|| invalid("w extent overflows".into()))?;
        if x_len < x_need {
            return Err(invalid(format!("x holds {x_len} elements, [{m}, {k}] with row stride {ld_x} needs {x_need}")));
        }
        if y_len < y_need {
            return Err(invalid(format!("y holds {y_len} elements, [{m}, {n}] with row stride {ld_y} needs {y_need}")));
        }
        if w_len != w_need {
            return Err(invalid(format!("w holds {w_len} elements, expected [{n}, {k}] = {w_need}")));
        }
        if let Some(b) = b_len {
            if b != n {
                return Err(invalid(format!("bias holds {b} elements, expected {n}")));
            }
        }
        let fits = |v: usize| i32::try_from(v).is_ok();
        if !(fits(m) && fits(n) && fits(k) && fits(ld_x) && fits(ld_y)) {
            return Err(invalid(format!("dimensions beyond i32: m {m} n {n} k {k} ld_x {ld_x} ld_y {ld_y}")));
        }
        Ok(MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: ld_x as i64,
            beta: 0.0,
            ldc: ld_y as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        })
    }
}

/// A cuBLASLt handle, its workspace and the plans made so far, bound to the device's stream.
///
/// A plan (matmul descriptor, three matrix layouts and the algorithm the heuristic picked) is made once
/// per shape, stride and pointer alignment, then reused: building descriptors and asking the heuristic
/// costs several microseconds of host time per call, as much as a small GEMM takes on the GPU, and a
/// prefill issues ~100 GEMMs.
pub struct Blas {
    /// cudarc's own cuBLASLt wrapper (a heuristic query per call): the path verified first on the GPU, kept
    /// as the fallback that `FACELLM_BLAS=simple` selects.
    simple: Option<cudarc::cublaslt::CudaBlasLT>,
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    plans: Mutex<HashMap<PlanKey, Plan>>,
}

// SAFETY: the handle and the plans' descriptors are only used under the `plans` mutex (`linear` holds it
// across the whole call), and cuBLASLt handles may be used from any thread when calls are serialised.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    shape: (usize, usize, usize, usize, usize),
    bias: bool,
    /// Largest power of two (<= 256) dividing every pointer: the heuristic is told, so the algorithm it
    /// picks never assumes more alignment than a view at an offset has.
    align: u32,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

const WORKSPACE_BYTES: usize = 32 << 20;

fn blas_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Blas { what: what.to_string(), msg: e.to_string() }
}

impl Blas {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Blas> {
        let handle = result::create_handle().map_err(|e| blas_err("create cuBLASLt handle", e))?;
        // SAFETY: the bytes are only handed to cuBLASLt as scratch space.
        let workspace = super::guarded("alloc cuBLASLt workspace", || unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) });
        let workspace = match workspace {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: the handle was created above and is not used again.
                unsafe { result::destroy_handle(handle) }.ok();
                return Err(e);
            }
        };
        let simple = if std::env::var("FACELLM_BLAS").is_ok_and(|v| v == "simple") {
            // CudaBlasLT::new unwraps its workspace allocation: a panic there becomes an Err here.
            match std::panic::catch_unwind(|| cudarc::cublaslt::CudaBlasLT::new(stream.clone())) {
                Ok(Ok(lt)) => Some(lt),
                Ok(Err(e)) => return Err(blas_err("create cuBLASLt handle (simple)", e)),
                Err(_) => return Err(blas_err("create cuBLASLt handle (simple)", "workspace allocation panicked")),
            }
        } else {
            None
        };
        Ok(Blas { simple, handle, workspace, stream: stream.clone(), plans: Mutex::new(HashMap::new()) })
    }

    /// Plans made so far (one per distinct shape, stride, bias and alignment).
    pub fn plans(&self) -> usize {
        self.plans.lock().map(|p| p.len()).unwrap_or(0)
    }

    fn make_plan(&self, cfg: &MatmulConfig, key: &PlanKey) -> Result<Plan> {
        let bf = sys::cudaDataType_t::CUDA_R_16BF;
        let what = "make cuBLASLt plan";
        let e = |err| blas_err(what, err);
        // A = w read transposed: stored [k rows, n cols] column-major with ld k; B = x^T [k, m] with ld ld_x;
        // C = y^T [n, m] with ld ld_y.
        let a = result::create_matrix_layout(bf, cfg.k, cfg.m, cfg.lda).map_err(e)?;
        let b = result::create_matrix_layout(bf, cfg.k, cfg.n, cfg.ldb).map_err(e)?;
        let c = result::create_matrix_layout(bf, cfg.m, cfg.n, cfg.ldc).map_err(e)?;
        let desc =
            result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(e)?;
        let plan = Plan { desc, a, b, c, algo: unsafe { std::mem::zeroed() } };
        let set = |attr, v: &i32| unsafe {
            result::set_matmul_desc_attribute(plan.desc, attr, v as *const i32 as *const _, std::mem::size_of::<i32>())
        };
        set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &1).map_err(e)?;
        set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &0).map_err(e)?;
        let epilogue = if key.bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        // SAFETY: the attribute's value is a cublasLtEpilogue_t, passed with its size.
        unsafe {
            result::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as *const _,
                std::mem::size_of::<sys::cublasLtEpilogue_t>(),
            )
        }
        .map_err(e)?;
        let pref = result::create_matmul_pref().map_err(e)?;
        let ws = WORKSPACE_BYTES;
        let align = key.align;
        // SAFETY: each attribute gets a value of its documented type and size; `pref` is destroyed below.
        let heuristic = unsafe {
            let mut r = result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const _,
                std::mem::size_of::<usize>(),
            );
            for attr in [
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                r = r.and_then(|_| result::set_matmul_pref_attribute(pref, attr, &align as *const u32 as *const _, 4));
            }
            let h = r.and_then(|_| {
                result::get_matmul_algo_heuristic(self.handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref)
            });
            result::destroy_matmul_pref(pref).ok();
            h
        }
        .map_err(|err| blas_err(&format!("no cuBLASLt algorithm for {key:?}"), err))?;
        Ok(Plan { algo: heuristic.algo, ..plan })
    }

    /// `y = x · w^T (+ b)`, all bf16, fp32 accumulation.
    pub fn linear(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        b: Option<&CudaView<'_, bf16>>,
        y: &mut CudaViewMut<'_, bf16>,
        shape: LinearShape,
    ) -> Result<()> {
        let cfg = shape.plan(x.len(), w.len(), b.map(|b| b.len()), y.len())?;
        if shape.m == 0 {
            return Ok(());
        }
        if let Some(lt) = &self.simple {
            use cudarc::cublaslt::Matmul as _;
            // SAFETY: as below: `shape.plan` checked every buffer against the layouts `cfg` describes.
            return unsafe { lt.matmul(cfg, w, x, y, b, None) }.map_err(|e| blas_err(&format!("linear {shape:?}"), e));
        }
        let (xp, _rx) = x.device_ptr(&self.stream);
        let (wp, _rw) = w.device_ptr(&self.stream);
        let (yp, _ry) = y.device_ptr_mut(&self.stream);
        let bp = b.map(|b| b.device_ptr(&self.stream).0);
        let align =
            [xp, wp, yp, bp.unwrap_or(256)].iter().map(|p| 1u64 << p.trailing_zeros().min(8)).min().unwrap_or(2);
        let key = PlanKey {
            shape: (shape.m, shape.n, shape.k, shape.ld_x, shape.ld_y),
            bias: b.is_some(),
            align: align as u32,
        };
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.make_plan(&cfg, &key)?),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (wsp, _rws) = self.workspace.device_ptr(&self.stream);
        // SAFETY: `shape.plan` checked that w holds [n, k], x holds m rows of k with stride ld_x, y holds m rows
        // of n with stride ld_y and the bias n elements, which are the layouts of this plan, so cuBLASLt reads
        // and writes inside the buffers; y is a distinct &mut view, so it aliases no input. The bias pointer is
        // set on the plan's descriptor under the lock, right before the call that uses it; the workspace is
        // this handle's own and calls on the stream are serialised.
        unsafe {
            if let Some(bp) = bp {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bp as *const u64 as *const _,
                    std::mem::size_of::<u64>(),
                )
                .map_err(|e| blas_err("set bias pointer", e))?;
            }
            result::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const _,
                &beta as *const f32 as *const _,
                wp as *const _,
                plan.a,
                xp as *const _,
                plan.b,
                yp as *const _,
                plan.c,
                yp as *mut _,
                plan.c,
                &plan.algo,
                wsp as *mut _,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as *mut _,
            )
        }
        .map_err(|e| blas_err(&format!("linear {shape:?}"), e))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        let plans = std::mem::take(self.plans.get_mut().unwrap_or_else(|p| p.into_inner()));
        // SAFETY: every handle below was created by this Blas and is destroyed once; errors at teardown are
        // ignored (the context may already be gone).
        unsafe {
            for (_, p) in plans {
                result::destroy_matrix_layout(p.a).ok();
                result::destroy_matrix_layout(p.b).ok();
                result::destroy_matrix_layout(p.c).ok();
                result::destroy_matmul_desc(p.desc).ok();
            }
            result::destroy_handle(self.handle).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_maps_row_major_to_column_major() {
        let s = LinearShape { m: 5, n: 7, k: 3, ld_x: 4, ld_y: 9 };
        let c = s.plan(4 * 4 + 3, 21, Some(7), 4 * 9 + 7).expect("valid");
        assert_eq!((c.m, c.n, c.k, c.lda, c.ldb, c.ldc), (7, 5, 3, 3, 4, 9));
        assert!(c.transa && !c.transb);
    }

    #[test]
    fn plan_refuses_short_buffers_and_bad_strides() {
        let s = LinearShape::dense(4, 8, 16);
        assert!(s.plan(64, 128, None, 32).is_ok());
        assert!(s.plan(63, 128, None, 32).unwrap_err().to_string().contains("x holds 63"));
        assert!(s.plan(64, 127, None, 32).unwrap_err().to_string().contains("w holds 127"));
        assert!(s.plan(64, 128, Some(7), 32).unwrap_err().to_string().contains("bias holds 7"));
        assert!(s.plan(64, 128, None, 31).unwrap_err().to_string().contains("y holds 31"));
        assert!(LinearShape { ld_x: 15, ..s }.plan(64, 128, None, 32).is_err());
        assert!(LinearShape::dense(4, 0, 16).plan(0, 0, None, 0).is_err());
        // Zero rows is a valid no-op shape.
        assert!(LinearShape::dense(0, 8, 16).plan(0, 128, None, 0).is_ok());
    }
}
