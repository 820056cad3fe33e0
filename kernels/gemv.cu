// Decode-time matrix products for a few rows: y[m, j] = sum_k x[m, k] * w[j, k] (+ bias[j]) for m < M <= 8,
// bf16 in, fp32 accumulation, one bf16 rounding at the end (as cuBLASLt's bias epilogue). An experiment against
// cuBLASLt for the decode GEMMs of the 1B shape, where the weights are small (1.6 to 17 MB per matrix) and a
// step is latency-bound; not used by the model yet (`facellm bench --kernels` times both side by side).
//
//   gemv_bf16:      x is [M, K] rows of ld_x.
//   gemv_silu_bf16: x is Qwen2's SwiGLU input computed on the fly from a fused [M, 2K] gate/up buffer (rows of
//                   ld_x): x[m, k] = bf16(bf16(silu(gate[m, k])) * up[m, k]), as silu_mul_bf16 rounds it, so
//                   the fused product equals silu_mul_bf16 followed by gemv_bf16 bit for bit and saves a launch.
//
// Block: kWarps warps, one output feature j per warp; the lanes stride over K in 16-byte chunks of eight
// elements (weights read once, streamed past L1; x rows re-read by every warp from L1/L2), then each of the M
// sums is reduced across the warp. Requires K % 8 == 0, ld_x % 8 == 0 and 16-byte aligned x and w (the
// launcher checks; a caller falls back to cuBLASLt otherwise). Minimum arch sm_80.
#include "common/common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kMaxRows = 8;

// torch's silu in fp32, as kernels/elementwise.cu.
__device__ inline float silu(float v) {
    return v / (1.0f + expf(-v));
}

// A 16-byte weight chunk, read through the non-coherent path without allocating in L1 (each is read once).
__device__ inline facellm::Bf16x8 load_stream(const __nv_bfloat16* p) {
    const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
    facellm::Bf16x8 v;
    memcpy(&v, &u, sizeof v);  // a register move; no type-punned read
    return v;
}

template <bool kSilu>
__device__ inline void gemv(const __nv_bfloat16* __restrict__ x, int ld_x, const __nv_bfloat16* __restrict__ w,
                            const __nv_bfloat16* __restrict__ bias, __nv_bfloat16* __restrict__ y, int ld_y, int rows,
                            int n, int k) {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int j = blockIdx.x * kWarps + warp;
    if (j >= n) {
        return;
    }
    const __nv_bfloat16* wj = w + static_cast<size_t>(j) * k;
    float acc[kMaxRows];
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
        acc[m] = 0.0f;
    }
    const int chunks = k / 8;
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
        float wv[8];
        facellm::bf16x8_to_f32(load_stream(wj + 8 * c), wv);
#pragma unroll
        for (int m = 0; m < kMaxRows; ++m) {
            if (m < rows) {
                const __nv_bfloat16* xm = x + static_cast<size_t>(m) * ld_x + 8 * c;
                float xv[8];
                if constexpr (kSilu) {
                    float up[8];
                    facellm::bf16x8_to_f32(facellm::load_bf16x8(xm), xv);
                    facellm::bf16x8_to_f32(facellm::load_bf16x8(xm + k), up);
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        xv[e] = facellm::round_bf16(facellm::round_bf16(silu(xv[e])) * up[e]);
                    }
                } else {
                    facellm::bf16x8_to_f32(facellm::load_bf16x8(xm), xv);
                }
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    acc[m] = fmaf(wv[e], xv[e], acc[m]);
                }
            }
        }
    }
    const float b = bias != nullptr ? __bfloat162float(bias[j]) : 0.0f;
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
        if (m < rows) {  // block-uniform: every lane of the warp takes the shuffles
            const float s = facellm::warp_sum(acc[m]);
            if (lane == 0) {
                y[static_cast<size_t>(m) * ld_y + j] = __float2bfloat16_rn(s + b);
            }
        }
    }
}

}  // namespace

// gemv_bf16: y[m, j] = bf16(sum_k x[m, k] w[j, k] + bias[j]).
//   x:    [rows, >= k] bf16, rows of ld_x (ld_x % 8 == 0, 16-byte aligned)
//   w:    [n, k] bf16 row-major (k % 8 == 0, 16-byte aligned)
//   bias: [n] bf16 or null
//   y:    [rows, >= n] bf16, rows of ld_y; must not overlap x or w
//   rows: 1..=8
// Grid ceil(n / 4), block 128, no shared memory.
extern "C" __global__ void __launch_bounds__(kWarps * 32) gemv_bf16(const __nv_bfloat16* __restrict__ x, int ld_x,
                                                                    const __nv_bfloat16* __restrict__ w,
                                                                    const __nv_bfloat16* __restrict__ bias,
                                                                    __nv_bfloat16* __restrict__ y, int ld_y, int rows,
                                                                    int n, int k) {
    gemv<false>(x, ld_x, w, bias, y, ld_y, rows, n, k);
}

// gemv_silu_bf16: as gemv_bf16 with x[m, k] = bf16(bf16(silu(gu[m, k])) * gu[m, k + K]) from the fused gate/up
// buffer gu [rows, >= 2k] (rows of ld_x).
extern "C" __global__ void __launch_bounds__(kWarps * 32) gemv_silu_bf16(const __nv_bfloat16* __restrict__ gu,
                                                                         int ld_x, const __nv_bfloat16* __restrict__ w,
                                                                         const __nv_bfloat16* __restrict__ bias,
                                                                         __nv_bfloat16* __restrict__ y, int ld_y,
                                                                         int rows, int n, int k) {
    gemv<true>(gu, ld_x, w, bias, y, ld_y, rows, n, k);
}
