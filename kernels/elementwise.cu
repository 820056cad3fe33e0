// The activations between the MLP GEMMs, bf16 in and out with fp32 math, rounded where torch rounds:
//   gelu_bias_bf16: the vision MLP's and the projector's `GELU_erf(fc1(x))` when the GEMM wrote fc1 without its
//     bias: x = gelu(bf16(x + bias)) in place, exact erf GELU written as torch's CUDA kernel writes it,
//     `x * 0.5 * (1 + erf(x / sqrt(2)))` in fp32 (no tanh approximation, no fast-math erf).
//   silu_mul_bf16: Qwen2's `act(gate) * up`, which torch evaluates as two bf16 ops: bf16(silu(gate)), then the
//     product rounded again. gate and up are either the two halves of one fused [rows, 2n] gate/up GEMM output
//     or two separate [rows, n] buffers (the row stride ld_in says which).
//
// Memory-bound: each thread moves Bf16x8 vectors (16-byte loads and stores) of the same 8 columns in two rows
// at a time when every row is 16-byte aligned and n is a multiple of 8; otherwise the same thread handles the
// same columns one element at a time. Grid x covers a row's columns in units of 8, grid y pairs of rows
// (striding when there are more than gridDim.y pairs), so no thread divides an index.
#include "common/common.cuh"

using facellm::Bf16x8;

namespace {

// torch's GeluCUDAKernelImpl (approximate='none') in fp32: erff keeps its accuracy without --use_fast_math.
__device__ inline float gelu_erf(float x) {
    constexpr float kSqrt1_2 = 0.70710678118654752440f;
    return x * 0.5f * (1.0f + erff(x * kSqrt1_2));
}

// torch's silu in fp32: x / (1 + exp(-x)); exp overflowing to inf gives -0 for very negative x, as in torch.
__device__ inline float silu(float x) {
    return x / (1.0f + expf(-x));
}

// Rows per thread and step: two independent 16-byte loads per operand in flight per thread, which the
// register-limited occupancy of these erf/exp kernels needs to cover HBM latency.
constexpr int kRowsPerThread = 2;

}  // namespace

// gelu_bias_bf16: x = bf16(gelu_erf(bf16(x + bias))) in place.
//   x:    [rows, n] bf16 row-major, read and written
//   bias: [n] bf16, or null for a plain GELU
// Grid (ceil(ceil(n/8) / threads), min(ceil(rows/2), 65535), 1); block (threads, 1, 1), any threads <= 1024.
// Thread (bx * threads + tx) handles columns [8u, 8u + 8) of rows 2*by, 2*by + 1, then 2*(by + gridDim.y), ...
// (kRowsPerThread rows per step, their loads issued together). No shared memory. Minimum arch sm_80.
extern "C" __global__ void gelu_bias_bf16(__nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ bias,
                                          int rows, int n) {
    const int u = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    const int c0 = 8 * u;
    if (c0 >= n) {
        return;
    }
    const bool vec = (n % 8 == 0) && facellm::aligned16(x) && (bias == nullptr || facellm::aligned16(bias));
    float bf[8];
    if (vec) {
        if (bias != nullptr) {
            facellm::bf16x8_to_f32(facellm::load_bf16x8(bias + c0), bf);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                bf[j] = 0.0f;
            }
        }
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            bf[j] = (bias != nullptr && c0 + j < n) ? __bfloat162float(bias[c0 + j]) : 0.0f;
        }
    }
    const long long step = static_cast<long long>(gridDim.y) * kRowsPerThread;
    for (long long r0 = static_cast<long long>(blockIdx.y) * kRowsPerThread; r0 < rows; r0 += step) {
        if (vec) {
            float v[kRowsPerThread][8];
#pragma unroll
            for (int k = 0; k < kRowsPerThread; ++k) {
                if (r0 + k < rows) {
                    facellm::bf16x8_to_f32(facellm::load_bf16x8(x + (r0 + k) * n + c0), v[k]);
                }
            }
#pragma unroll
            for (int k = 0; k < kRowsPerThread; ++k) {
                if (r0 + k < rows) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        v[k][j] = gelu_erf(facellm::round_bf16(v[k][j] + bf[j]));
                    }
                    facellm::store_bf16x8(x + (r0 + k) * n + c0, facellm::f32_to_bf16x8(v[k]));
                }
            }
        } else {
            for (int k = 0; k < kRowsPerThread && r0 + k < rows; ++k) {
                __nv_bfloat16* xr = x + (r0 + k) * n + c0;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (c0 + j < n) {
                        xr[j] = __float2bfloat16_rn(gelu_erf(facellm::round_bf16(__bfloat162float(xr[j]) + bf[j])));
                    }
                }
            }
        }
    }
}

// silu_mul_bf16: out = bf16(bf16(silu(gate)) * up).
//   gate: rows of n bf16, row r at gate + r * ld_in
//   up:   rows of n bf16, row r at up + r * ld_in (for a fused [rows, 2n] gate/up buffer: up = gate + n,
//         ld_in = 2n; for separate [rows, n] buffers: ld_in = n)
//   out:  [rows, n] bf16 row-major; must not overlap gate or up
// Grid, block and row mapping as gelu_bias_bf16. No shared memory. Minimum arch sm_80.
extern "C" __global__ void silu_mul_bf16(const __nv_bfloat16* __restrict__ gate, const __nv_bfloat16* __restrict__ up,
                                         int ld_in, __nv_bfloat16* __restrict__ out, int rows, int n) {
    const int u = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    const int c0 = 8 * u;
    if (c0 >= n) {
        return;
    }
    const bool vec = (n % 8 == 0) && (ld_in % 8 == 0) && facellm::aligned16(gate) && facellm::aligned16(up) &&
                     facellm::aligned16(out);
    const long long step = static_cast<long long>(gridDim.y) * kRowsPerThread;
    for (long long r0 = static_cast<long long>(blockIdx.y) * kRowsPerThread; r0 < rows; r0 += step) {
        if (vec) {
            float g[kRowsPerThread][8], v[kRowsPerThread][8];
#pragma unroll
            for (int k = 0; k < kRowsPerThread; ++k) {
                if (r0 + k < rows) {
                    const long long in_off = (r0 + k) * ld_in + c0;
                    facellm::bf16x8_to_f32(facellm::load_bf16x8(gate + in_off), g[k]);
                    facellm::bf16x8_to_f32(facellm::load_bf16x8(up + in_off), v[k]);
                }
            }
#pragma unroll
            for (int k = 0; k < kRowsPerThread; ++k) {
                if (r0 + k < rows) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        v[k][j] *= facellm::round_bf16(silu(g[k][j]));
                    }
                    facellm::store_bf16x8(out + (r0 + k) * n + c0, facellm::f32_to_bf16x8(v[k]));
                }
            }
        } else {
            for (int k = 0; k < kRowsPerThread && r0 + k < rows; ++k) {
                const long long in_off = (r0 + k) * ld_in + c0;
                __nv_bfloat16* orow = out + (r0 + k) * n + c0;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (c0 + j < n) {
                        const float s = facellm::round_bf16(silu(__bfloat162float(gate[in_off + j])));
                        orow[j] = __float2bfloat16_rn(s * __bfloat162float(up[in_off + j]));
                    }
                }
            }
        }
    }
}
