//! One entry point to the `gemm` crate's f32 kernels, with strides in elements, so that `linear`, attention
//! and the patch embedding describe their operands (transposed weights, one head inside a `[t, heads, d]`
//! row) without copying them. Single-threaded: callers parallelise over their own blocks.

/// A strided f32 matrix view: element `(r, c)` at `ptr + r * rs + c * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// `dst = scale · a b` (or `dst += scale · a b` with `accumulate`), `a` of `m x k`, `b` of `k x n`,
/// `dst` of `m x n` at `dst` with strides `(dst_rs, dst_cs)`.
///
/// # Safety
/// Every element the views address must be in bounds of live allocations, `dst` must not alias `a`/`b`,
/// and no other thread may touch the `m x n` elements of `dst` during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    accumulate: bool,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: forwarded from the caller. gemm computes dst = alpha·dst + beta·a·b (dst read only when
    // `read_dst`), with (column stride, row stride) argument order.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
