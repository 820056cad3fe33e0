// Helpers shared by every kernel: 16-byte bf16x8 vector loads and stores with fp32 widening, and warp/block
// sum reductions. Header-only and `__device__ inline`, so each .cu compiles on its own; build.rs recompiles
// every kernel when this file changes. Minimum arch sm_80 (bf16 conversions in hardware).
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

namespace facellm {

constexpr int kWarp = 32;

// Eight bf16 values moved as one 16-byte transaction (`ld.global.v4.u32`).
struct __align__(16) Bf16x8 {
    __nv_bfloat162 h[4];
};

// True when `p` may be read as Bf16x8: vector paths require 16-byte aligned rows.
__device__ inline bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// True when `p` may be read as a 4-byte word (a bf16 pair): im2col loads of odd-length runs use pairs.
__device__ inline bool aligned4(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 3u) == 0;
}

// The value torch would hold after storing `v` in a bf16 tensor: rounds to nearest even and widens back, so an
// intermediate that HF keeps in bf16 is rounded here at the same point.
__device__ inline float round_bf16(float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
}

// p must be 16-byte aligned.
__device__ inline Bf16x8 load_bf16x8(const __nv_bfloat16* p) {
    return *reinterpret_cast<const Bf16x8*>(p);
}

__device__ inline void store_bf16x8(__nv_bfloat16* p, const Bf16x8& v) {
    *reinterpret_cast<Bf16x8*>(p) = v;
}

// Widening is exact, so fp32 math on the result matches the CPU twin's f32 view of the same bf16 values.
__device__ inline void bf16x8_to_f32(const Bf16x8& v, float out[8]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __bfloat1622float2(v.h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Round-to-nearest-even, as torch's `.to(bfloat16)` and the `half` crate round.
__device__ inline Bf16x8 f32_to_bf16x8(const float in[8]) {
    Bf16x8 v;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v.h[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    }
    return v;
}

__device__ inline float warp_sum(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

// Sum over the whole block, returned to every thread. `scratch` holds one float per warp (<= 32); blockDim.x
// must be a multiple of 32. Safe to call repeatedly: the trailing barrier keeps scratch from being overwritten
// while a slow warp still reads it.
__device__ inline float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    const int nwarps = blockDim.x / kWarp;
    v = warp_sum(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

// Bits of the device error word: a u32 that kernels OR a bit into (atomicOr) when an input is out of range, so
// a whole step can run (and be replayed as a CUDA graph) without a host sync; the host reads the word after the
// step. The Rust side names the same bits in backend/cuda/embed.rs (ERR_*).
constexpr unsigned kErrBadTokenId = 1u << 0;     // embedding_gather: id >= vocab (row written as zeros)
constexpr unsigned kErrBadScatterRow = 1u << 1;  // scatter_rows: destination row outside [0, t) (row skipped)
constexpr unsigned kErrBadKvSlot = 1u << 2;      // qkv_bias_rope_write_kv: slot < -1 or >= cache slots (skipped)

}  // namespace facellm
