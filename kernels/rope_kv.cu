// The Qwen2 attention prologue after the fused QKV GEMM, in one pass: add the q/k/v biases (rounded to bf16, as
// HF's bf16 Linear output is), rotate q and k with half-split (NeoX) RoPE, write q to its own buffer and k, v
// straight into one layer's paged cache (and, when asked, into contiguous k/v buffers for a prefill attention
// that reads them in place). Tokens of many sequences are batched: each row brings its own position and cache
// slot from device arrays, so a captured CUDA graph replays with new values.
//
// Rounding: the twin is backend/cpu/rope.rs, and this kernel computes what it computes: the angle is the f32
// product position * inv_freq[i], cos and sin are those of that f32 angle evaluated in double and rounded to
// f32 (the CPU's `(ang as f64).cos() as f32`), and `x1 c - x2 s`, `x2 c + x1 s` are evaluated in f32 with
// explicit round-to-nearest multiplies and adds (no fma), then rounded once to bf16. So q and k match the CPU
// bit for bit except where a last-ulp difference of the double cos/sin moves a bf16 rounding. HF differs: it
// rounds cos/sin to bf16 and rounds x*cos, rotate_half(x)*sin and their sum to bf16 separately (three bf16
// roundings and a 2^-9 relative error on cos/sin); the model-level comparison absorbs that, this kernel keeps
// the more accurate f32 formula of the CPU backend.
//
// One block per token. The block first fills a shared cos/sin table of the token's d/2 frequencies (one double
// sincos per frequency, not per head), then each thread takes one (head, group of 8 frequencies): it loads
// x[i..i+8] and x[i+d/2..i+d/2+8] of that head (16-byte vectors when every pointer is 16-byte aligned, else
// scalars) and writes 8 + 8 outputs.
#include "common/common.cuh"

using facellm::Bf16x8;

namespace {

constexpr int kMaxHalf = 128;  // head_dim <= 256

__device__ inline void load8(const __nv_bfloat16* p, bool vec, float out[8]) {
    if (vec) {
        facellm::bf16x8_to_f32(facellm::load_bf16x8(p), out);
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            out[j] = __bfloat162float(p[j]);
        }
    }
}

__device__ inline void store8(__nv_bfloat16* p, bool vec, const float in[8]) {
    if (vec) {
        facellm::store_bf16x8(p, facellm::f32_to_bf16x8(in));
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            p[j] = __float2bfloat16_rn(in[j]);
        }
    }
}

}  // namespace

// qkv_bias_rope_write_kv_bf16
//   qkv:       [t, (hq + 2 hk) * d] bf16, row-major: the q heads, then the k heads, then the v heads
//   bias:      [(hq + 2 hk) * d] bf16 in the same order, or null for no bias
//   positions: [t] i32, the position of each row
//   inv_freq:  [d / 2] f32
//   slots:     [t] i32, cache slot of each row = block * block_size + offset; -1 = do not write this row's k/v;
//              any other value outside [0, num_slots) is skipped and sets kErrBadKvSlot in *err
//   q_out:     [t, hq * d] bf16 = rope(bf16(q + bq))
//   k_cache:   [num_slots, hk, d] bf16 (one layer's [num_blocks, block_size, hk, d]); slot s, head h gets
//              rope(bf16(k + bk))
//   v_cache:   same layout, gets bf16(v + bv)
//   k_out, v_out: [t, hk * d] bf16 copies of the same k and v, or null
//   err:       [1] u32 error word (atomicOr)
// Requires d % 16 == 0, d <= 256. Grid (t, 1, 1); block (threads, 1, 1), any multiple of 32 (the launcher uses
// the smallest one >= max((hq + 2 hk) * d / 16, d / 2), at most 1024). Static shared memory: 1 KiB.
// Minimum arch sm_80.
extern "C" __global__ void qkv_bias_rope_write_kv_bf16(
    const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ bias, const int* __restrict__ positions,
    const float* __restrict__ inv_freq, const int* __restrict__ slots, __nv_bfloat16* __restrict__ q_out,
    __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache, __nv_bfloat16* __restrict__ k_out,
    __nv_bfloat16* __restrict__ v_out, unsigned* __restrict__ err, int hq, int hk, int d, long long num_slots) {
    __shared__ float cos_s[kMaxHalf];
    __shared__ float sin_s[kMaxHalf];
    const int tok = blockIdx.x;
    const int tid = threadIdx.x;
    const int half = d / 2;

    const float pos = __int2float_rn(positions[tok]);
    for (int i = tid; i < half; i += blockDim.x) {
        const float ang = __fmul_rn(pos, inv_freq[i]);
        double s;
        double c;
        sincos(static_cast<double>(ang), &s, &c);
        cos_s[i] = __double2float_rn(c);
        sin_s[i] = __double2float_rn(s);
    }

    const int slot = slots[tok];
    const bool slot_ok = slot >= 0 && static_cast<long long>(slot) < num_slots;
    if (tid == 0 && !slot_ok && slot != -1) {
        atomicOr(err, facellm::kErrBadKvSlot);
    }
    const bool vec = facellm::aligned16(qkv) && (bias == nullptr || facellm::aligned16(bias)) &&
                     facellm::aligned16(q_out) && facellm::aligned16(k_cache) && facellm::aligned16(v_cache) &&
                     (k_out == nullptr || facellm::aligned16(k_out)) && (v_out == nullptr || facellm::aligned16(v_out));
    const int heads = hq + 2 * hk;
    const int groups = half / 8;
    const __nv_bfloat16* row = qkv + static_cast<size_t>(tok) * heads * d;
    __syncthreads();

    for (int item = tid; item < heads * groups; item += blockDim.x) {
        const int h = item / groups;
        const int i0 = 8 * (item % groups);  // first frequency of this thread's group
        const int c0 = h * d + i0;           // its column in the first half of head h
        float a[8];
        float b[8];
        load8(row + c0, vec, a);
        load8(row + c0 + half, vec, b);
        if (bias != nullptr) {
            float ba[8];
            float bb[8];
            load8(bias + c0, vec, ba);
            load8(bias + c0 + half, vec, bb);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                a[j] = facellm::round_bf16(a[j] + ba[j]);
                b[j] = facellm::round_bf16(b[j] + bb[j]);
            }
        }
        if (h < hq + hk) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float c = cos_s[i0 + j];
                const float s = sin_s[i0 + j];
                const float x1 = a[j];
                const float x2 = b[j];
                a[j] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
                b[j] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
            }
        }
        if (h < hq) {
            __nv_bfloat16* dst = q_out + static_cast<size_t>(tok) * hq * d + c0;
            store8(dst, vec, a);
            store8(dst + half, vec, b);
            continue;
        }
        const bool is_k = h < hq + hk;
        const int kvh = is_k ? h - hq : h - hq - hk;
        if (slot_ok) {
            __nv_bfloat16* dst = (is_k ? k_cache : v_cache) + (static_cast<size_t>(slot) * hk + kvh) * d + i0;
            store8(dst, vec, a);
            store8(dst + half, vec, b);
        }
        __nv_bfloat16* copy = is_k ? k_out : v_out;
        if (copy != nullptr) {
            __nv_bfloat16* dst = copy + (static_cast<size_t>(tok) * hk + kvh) * d + i0;
            store8(dst, vec, a);
            store8(dst + half, vec, b);
        }
    }
}
