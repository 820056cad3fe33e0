// RMSNorm over the last dim, bf16 in and out, as Qwen2RMSNorm computes it in bf16: the mean of squares and
// `x * rsqrt(mean + eps)` in fp32, that product rounded to bf16 (`hidden_states.to(input_dtype)`), then
// multiplied by the bf16 weight and rounded again. The CPU twin (backend/cpu/norm.rs) computes the formula in
// f32 throughout; the two roundings are within the selfcheck's tolerance of it. The fused variant first adds the
// sublayer output into the residual stream in place (rounded to bf16, as torch's bf16 `residual + x` is) and
// normalises that rounded sum, so the residual never makes a separate trip through global memory.
//
// One block per row. When the row is 16-byte aligned and a multiple of 8 long, each thread keeps its
// Bf16x8 vectors of the row in registers between the reduction and the scaling pass (at most kMaxVecs per
// thread; the launcher sizes the block so that the model's rows fit). Other rows take a scalar path that
// reads the row twice (the second read hits L1/L2).
#include "common/common.cuh"

using facellm::Bf16x8;

namespace {

constexpr int kMaxVecs = 4;

// Shared by both kernels: `residual` is null for plain RMSNorm; otherwise `residual += x` first, in place.
__device__ inline void rmsnorm_row(__nv_bfloat16* __restrict__ residual, const __nv_bfloat16* __restrict__ x,
                                   const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ out, int n,
                                   float eps) {
    __shared__ float scratch[32];
    const size_t base = static_cast<size_t>(blockIdx.x) * static_cast<size_t>(n);
    const __nv_bfloat16* xr = x + base;
    __nv_bfloat16* rr = residual ? residual + base : nullptr;
    __nv_bfloat16* orow = out + base;
    const int nvec = n / 8;
    const bool vec = (n % 8 == 0) && nvec <= kMaxVecs * static_cast<int>(blockDim.x) &&
                     facellm::aligned16(xr) && facellm::aligned16(w) && facellm::aligned16(orow) &&
                     (rr == nullptr || facellm::aligned16(rr));

    float sq = 0.0f;
    if (vec) {
        float v[kMaxVecs][8];
#pragma unroll
        for (int k = 0; k < kMaxVecs; ++k) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < nvec) {
                Bf16x8 a = facellm::load_bf16x8(xr + 8 * i);
                if (rr) {
                    float b[8];
                    facellm::bf16x8_to_f32(a, v[k]);
                    facellm::bf16x8_to_f32(facellm::load_bf16x8(rr + 8 * i), b);
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        b[j] += v[k][j];
                    }
                    a = facellm::f32_to_bf16x8(b);
                    facellm::store_bf16x8(rr + 8 * i, a);
                }
                facellm::bf16x8_to_f32(a, v[k]);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    sq += v[k][j] * v[k][j];
                }
            }
        }
        const float scale = 1.0f / sqrtf(facellm::block_sum(sq, scratch) / static_cast<float>(n) + eps);
#pragma unroll
        for (int k = 0; k < kMaxVecs; ++k) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < nvec) {
                float wf[8];
                facellm::bf16x8_to_f32(facellm::load_bf16x8(w + 8 * i), wf);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    wf[j] *= facellm::round_bf16(v[k][j] * scale);
                }
                facellm::store_bf16x8(orow + 8 * i, facellm::f32_to_bf16x8(wf));
            }
        }
        return;
    }

    // Scalar path: each thread re-reads exactly the elements it wrote to the residual, so no barrier is needed
    // between the two passes for that.
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float a = __bfloat162float(xr[i]);
        if (rr) {
            const __nv_bfloat16 s = __float2bfloat16_rn(__bfloat162float(rr[i]) + a);
            rr[i] = s;
            a = __bfloat162float(s);
        }
        sq += a * a;
    }
    const float scale = 1.0f / sqrtf(facellm::block_sum(sq, scratch) / static_cast<float>(n) + eps);
    const __nv_bfloat16* src = rr ? rr : xr;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        orow[i] = __float2bfloat16_rn(__bfloat162float(w[i]) * facellm::round_bf16(__bfloat162float(src[i]) * scale));
    }
}

}  // namespace

// rmsnorm_bf16: out = w * (x * rsqrt(mean(x^2) + eps)) per row.
//   x:   [rows, n] bf16 row-major
//   w:   [n] bf16
//   out: [rows, n] bf16 row-major (must not alias x)
// Grid (rows, 1, 1), block (threads, 1, 1) with threads a multiple of 32, <= 1024, and
// threads * kMaxVecs * 8 >= n for the register path. Static shared memory: 32 floats. Minimum arch sm_80.
extern "C" __global__ void rmsnorm_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                        __nv_bfloat16* __restrict__ out, int n, float eps) {
    rmsnorm_row(nullptr, x, w, out, n, eps);
}

// add_rmsnorm_bf16: residual = bf16(residual + x) in place, then out = rmsnorm(residual) as above.
//   residual: [rows, n] bf16 row-major, read and written
//   x:        [rows, n] bf16 row-major
//   w:        [n] bf16
//   out:      [rows, n] bf16 row-major (must not alias residual or x)
// Grid, block, shared memory and arch as rmsnorm_bf16.
extern "C" __global__ void add_rmsnorm_bf16(__nv_bfloat16* __restrict__ residual,
                                            const __nv_bfloat16* __restrict__ x,
                                            const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ out,
                                            int n, float eps) {
    rmsnorm_row(residual, x, w, out, n, eps);
}
