// Device-side initialisation, for building random-weight models of real size without uploading gigabytes:
//   fill_uniform_bf16: out[i] = bf16(offset + (2u - 1) * amp), u uniform in [0, 1) with 24 bits, drawn from a
//     counter-based SplitMix64 stream: u = (splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) >> 40) / 2^24.
//     That is exactly the i-th draw of selfcheck::Rng::new(seed), and the arithmetic is done with explicitly
//     rounded intrinsics (no FMA contraction), so `Rng::new(seed).bf16s(n, amp, offset)` on the host gives the
//     same bits: the host can rebuild any element to check a model built on the device.
//   f32_to_bf16: out[i] = bf16(in[i]), round to nearest even (torch's `.to(torch.bfloat16)`).
//
// Both are memory-bound grid-stride loops over 8-element units (one Bf16x8 store per unit when the output is
// 16-byte aligned; scalar otherwise), indices in 64 bits so a buffer may exceed 2^31 elements.
#include "common/common.cuh"

using facellm::Bf16x8;

namespace {

constexpr unsigned long long kGolden = 0x9E3779B97F4A7C15ull;

// SplitMix64's output function (Steele, Lea, Flood 2014), as selfcheck::Rng::next_u64 applies it.
__device__ inline unsigned long long splitmix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Element i of the stream, in the host's order of f32 operations (each rounded, none fused).
__device__ inline float uniform_at(unsigned long long seed, unsigned long long i, float amp, float offset) {
    const unsigned long long z = splitmix64(seed + (i + 1ull) * kGolden);
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // exact: a 24-bit integer times 2^-24
    const float sym = __fmul_rn(__fsub_rn(__fmul_rn(u, 2.0f), 1.0f), amp);
    return __fadd_rn(offset, sym);
}

}  // namespace

// fill_uniform_bf16: out[i] = bf16(offset + (2 u_i - 1) * amp), u_i the i-th SplitMix64 draw of `seed`.
//   out: [n] bf16
// Grid (any, 1, 1), block (any, 1, 1): a grid-stride loop over ceil(n / 8) units. No shared memory. sm_80.
extern "C" __global__ void fill_uniform_bf16(__nv_bfloat16* __restrict__ out, unsigned long long n,
                                             unsigned long long seed, float amp, float offset) {
    const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
    const unsigned long long units = (n + 7) / 8;
    const bool vec = facellm::aligned16(out);
    for (unsigned long long u = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
         u += stride) {
        const unsigned long long i0 = 8 * u;
        if (vec && i0 + 8 <= n) {
            float v[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                v[j] = uniform_at(seed, i0 + j, amp, offset);
            }
            facellm::store_bf16x8(out + i0, facellm::f32_to_bf16x8(v));
        } else {
            for (unsigned long long i = i0; i < n && i < i0 + 8; ++i) {
                out[i] = __float2bfloat16_rn(uniform_at(seed, i, amp, offset));
            }
        }
    }
}

// f32_to_bf16: out[i] = bf16(in[i]), round to nearest even.
//   in: [n] f32;  out: [n] bf16 (must not overlap in)
// Grid (any, 1, 1), block (any, 1, 1): a grid-stride loop over ceil(n / 8) units. No shared memory. sm_80.
extern "C" __global__ void f32_to_bf16(const float* __restrict__ in, __nv_bfloat16* __restrict__ out,
                                       unsigned long long n) {
    const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
    const unsigned long long units = (n + 7) / 8;
    const bool vec = facellm::aligned16(in) && facellm::aligned16(out);
    for (unsigned long long u = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
         u += stride) {
        const unsigned long long i0 = 8 * u;
        if (vec && i0 + 8 <= n) {
            const float4 a = *reinterpret_cast<const float4*>(in + i0);
            const float4 c = *reinterpret_cast<const float4*>(in + i0 + 4);
            const float v[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
            facellm::store_bf16x8(out + i0, facellm::f32_to_bf16x8(v));
        } else {
            for (unsigned long long i = i0; i < n && i < i0 + 8; ++i) {
                out[i] = __float2bfloat16_rn(in[i]);
            }
        }
    }
}
