// InternViT's norms, bf16 in and out with fp32 statistics: LayerNorm (the 300M tower and the projector),
// RMSNorm over strided rows (the 6B tower's qk-norm, run in place on the q and k columns of a fused QKV
// buffer), and the layer-scale residual update fused with the next norm, which is where the vision tower
// spends its memory traffic between GEMMs.
//
// Rounding follows HF in bf16, op by op. LayerNorm rounds once: `(x - mean) * rstd * w + b` in fp32
// (nn.LayerNorm's CUDA kernel). RMSNorm rounds twice, as InternVLVisionRMSNorm writes it:
// `w * bf16(x * rsqrt(mean(x^2) + eps))`. The residual update is `residual = bf16(residual + bf16(lambda * x))`
// (`lambda_1 * attn` is a bf16 tensor, then the add), and the norm reads the rounded residual, as the next
// module does in torch. Mean and variance are two passes over the row held in registers, so a large common
// offset costs no digits (the CPU twin takes its sums in f64).
//
// One block per row. When the row is 16-byte aligned and a multiple of 8 long, each thread keeps up to kMaxVecs
// Bf16x8 vectors in registers between the reductions and the write (the launcher gives every thread kMaxVecs
// vectors where it can, which keeps the most bytes in flight per SM). Other rows take a scalar path that
// re-reads the row from global memory (L1/L2 hits) for each pass. Each element is read and written by the same
// thread in every pass, and all reads of a pass end before the barrier inside block_sum, so `out` may be `x`
// itself (in place) in layernorm_bf16 and rmsnorm_strided_bf16.
#include "common/common.cuh"

using facellm::Bf16x8;

namespace {

constexpr int kMaxVecs = 4;
// The launchers use up to 1024 threads per row; the bound keeps the compiler at <= 64 registers per thread.
constexpr int kMaxThreads = 1024;

// The per-row work of all three kernels.
//   res:    null for a plain norm of x; otherwise the residual row, updated in place to
//           bf16(res + bf16(lambda * x)) (or bf16(res + x) when lambda is null) and then normalised.
//   out:    null for the residual update alone (the last vision layer); no reductions are done then.
//   b:      LayerNorm only; null means no bias.
// kRms selects RMSNorm (w only) over LayerNorm (w, b).
template <bool kRms>
__device__ inline void norm_row(__nv_bfloat16* res, const __nv_bfloat16* x, const __nv_bfloat16* __restrict__ lambda,
                                const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ b,
                                __nv_bfloat16* out, int n, float eps) {
    __shared__ float scratch[32];
    const int nvec = n / 8;
    const int bd = static_cast<int>(blockDim.x);
    const int tid = static_cast<int>(threadIdx.x);
    const bool vec = (n % 8 == 0) && nvec <= kMaxVecs * bd && facellm::aligned16(x) && facellm::aligned16(w) &&
                     (b == nullptr || facellm::aligned16(b)) && (out == nullptr || facellm::aligned16(out)) &&
                     (res == nullptr || facellm::aligned16(res)) && (lambda == nullptr || facellm::aligned16(lambda));
    const float inv_n = 1.0f / static_cast<float>(n);

    if (vec) {
        float v[kMaxVecs][8];
        float acc = 0.0f;  // sum of x for LayerNorm, sum of x^2 for RMSNorm
#pragma unroll
        for (int k = 0; k < kMaxVecs; ++k) {
            const int i = tid + k * bd;
            if (i < nvec) {
                Bf16x8 a = facellm::load_bf16x8(x + 8 * i);
                if (res != nullptr) {
                    float xf[8], rf[8];
                    facellm::bf16x8_to_f32(a, xf);
                    facellm::bf16x8_to_f32(facellm::load_bf16x8(res + 8 * i), rf);
                    if (lambda != nullptr) {
                        float lf[8];
                        facellm::bf16x8_to_f32(facellm::load_bf16x8(lambda + 8 * i), lf);
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            xf[j] = facellm::round_bf16(lf[j] * xf[j]);
                        }
                    }
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        rf[j] += xf[j];
                    }
                    a = facellm::f32_to_bf16x8(rf);
                    facellm::store_bf16x8(res + 8 * i, a);
                }
                facellm::bf16x8_to_f32(a, v[k]);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    acc += kRms ? v[k][j] * v[k][j] : v[k][j];
                }
            }
        }
        if (out == nullptr) {
            return;  // uniform across the block: no thread is left waiting at a barrier
        }
        const float stat = facellm::block_sum(acc, scratch) * inv_n;
        if (kRms) {
            const float scale = 1.0f / sqrtf(stat + eps);
#pragma unroll
            for (int k = 0; k < kMaxVecs; ++k) {
                const int i = tid + k * bd;
                if (i < nvec) {
                    float wf[8];
                    facellm::bf16x8_to_f32(facellm::load_bf16x8(w + 8 * i), wf);
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        wf[j] *= facellm::round_bf16(v[k][j] * scale);
                    }
                    facellm::store_bf16x8(out + 8 * i, facellm::f32_to_bf16x8(wf));
                }
            }
        } else {
            const float mean = stat;
            float sq = 0.0f;
#pragma unroll
            for (int k = 0; k < kMaxVecs; ++k) {
                const int i = tid + k * bd;
                if (i < nvec) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        const float d = v[k][j] - mean;
                        sq += d * d;
                    }
                }
            }
            const float rstd = 1.0f / sqrtf(facellm::block_sum(sq, scratch) * inv_n + eps);
#pragma unroll
            for (int k = 0; k < kMaxVecs; ++k) {
                const int i = tid + k * bd;
                if (i < nvec) {
                    float wf[8], bf[8];
                    facellm::bf16x8_to_f32(facellm::load_bf16x8(w + 8 * i), wf);
                    if (b != nullptr) {
                        facellm::bf16x8_to_f32(facellm::load_bf16x8(b + 8 * i), bf);
                    } else {
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            bf[j] = 0.0f;
                        }
                    }
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        wf[j] = (v[k][j] - mean) * rstd * wf[j] + bf[j];
                    }
                    facellm::store_bf16x8(out + 8 * i, facellm::f32_to_bf16x8(wf));
                }
            }
        }
        return;
    }

    // Scalar path.
    float acc = 0.0f;
    for (int i = tid; i < n; i += bd) {
        float a = __bfloat162float(x[i]);
        if (res != nullptr) {
            if (lambda != nullptr) {
                a = facellm::round_bf16(__bfloat162float(lambda[i]) * a);
            }
            const __nv_bfloat16 s = __float2bfloat16_rn(__bfloat162float(res[i]) + a);
            res[i] = s;
            a = __bfloat162float(s);
        }
        acc += kRms ? a * a : a;
    }
    if (out == nullptr) {
        return;
    }
    const __nv_bfloat16* src = res != nullptr ? res : x;
    const float stat = facellm::block_sum(acc, scratch) * inv_n;
    if (kRms) {
        const float scale = 1.0f / sqrtf(stat + eps);
        for (int i = tid; i < n; i += bd) {
            const float y = facellm::round_bf16(__bfloat162float(src[i]) * scale);
            out[i] = __float2bfloat16_rn(__bfloat162float(w[i]) * y);
        }
    } else {
        const float mean = stat;
        float sq = 0.0f;
        for (int i = tid; i < n; i += bd) {
            const float d = __bfloat162float(src[i]) - mean;
            sq += d * d;
        }
        const float rstd = 1.0f / sqrtf(facellm::block_sum(sq, scratch) * inv_n + eps);
        for (int i = tid; i < n; i += bd) {
            const float bias = b != nullptr ? __bfloat162float(b[i]) : 0.0f;
            out[i] = __float2bfloat16_rn((__bfloat162float(src[i]) - mean) * rstd * __bfloat162float(w[i]) + bias);
        }
    }
}

}  // namespace

// layernorm_bf16: out = (x - mean) * rsqrt(var + eps) * w + b per row, biased variance.
//   x:   rows of n bf16, row r at x + r * ld_x (ld_x >= n; a sub-range of a wider buffer is fine)
//   w:   [n] bf16;  b: [n] bf16 or null (no bias)
//   out: rows of n bf16, row r at out + r * ld_out; may be x itself (in place), must not partially overlap it
// Grid (rows, 1, 1); block (threads, 1, 1), threads a multiple of 32, <= 1024, threads * kMaxVecs * 8 >= n for
// the register path. Static shared memory: 32 floats. Minimum arch sm_80.
extern "C" __global__ void __launch_bounds__(kMaxThreads)
    layernorm_bf16(const __nv_bfloat16* x, int ld_x, const __nv_bfloat16* __restrict__ w,
                   const __nv_bfloat16* __restrict__ b, __nv_bfloat16* out, int ld_out, int n, float eps) {
    const size_t row = blockIdx.x;
    norm_row<false>(nullptr, x + row * static_cast<size_t>(ld_x), nullptr, w, b,
                    out + row * static_cast<size_t>(ld_out), n, eps);
}

// rmsnorm_strided_bf16: out = w * bf16(x * rsqrt(mean(x^2) + eps)) per row (InternVLVisionRMSNorm).
//   x:   rows of n bf16, row r at x + r * ld_x (e.g. the q or k columns of a fused [rows, 3h] QKV buffer)
//   w:   [n] bf16
//   out: rows of n bf16, row r at out + r * ld_out; may be x itself (in place), must not partially overlap it
// Grid, block, shared memory and arch as layernorm_bf16.
extern "C" __global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_strided_bf16(const __nv_bfloat16* x, int ld_x, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* out,
                         int ld_out, int n, float eps) {
    const size_t row = blockIdx.x;
    norm_row<true>(nullptr, x + row * static_cast<size_t>(ld_x), nullptr, w, nullptr,
                   out + row * static_cast<size_t>(ld_out), n, eps);
}

// residual_norm_bf16: the layer-scale residual of an InternViT layer fused with the norm that follows it.
//   residual: [rows, n] bf16, read and written: residual = bf16(residual + bf16(lambda * x))
//   x:        [rows, n] bf16, the sublayer output (attention projection or fc2)
//   lambda:   [n] bf16 layer scale, or null for a plain add
//   w:        [n] bf16 norm weight (unused when out is null)
//   b:        [n] bf16 LayerNorm bias or null; must be null for RMSNorm
//   out:      [rows, n] bf16 = norm(residual), or null to only update the residual (last layer)
//   kind:     0 LayerNorm, 1 RMSNorm
// Grid, block, shared memory and arch as layernorm_bf16. No pointer may alias another.
extern "C" __global__ void __launch_bounds__(kMaxThreads)
    residual_norm_bf16(__nv_bfloat16* __restrict__ residual, const __nv_bfloat16* __restrict__ x,
                       const __nv_bfloat16* __restrict__ lambda, const __nv_bfloat16* __restrict__ w,
                       const __nv_bfloat16* __restrict__ b, __nv_bfloat16* __restrict__ out, int n, float eps,
                       int kind) {
    const size_t base = static_cast<size_t>(blockIdx.x) * static_cast<size_t>(n);
    __nv_bfloat16* o = out != nullptr ? out + base : nullptr;
    if (kind == 1) {
        norm_row<true>(residual + base, x + base, lambda, w, nullptr, o, n, eps);
    } else {
        norm_row<false>(residual + base, x + base, lambda, w, b, o, n, eps);
    }
}
