// The projector's input in one pass: drop each tile's CLS row, pixel-shuffle the g x g patch grid with scale 0.5
// (each 2x2 block of patches becomes one token of 4h channels) and LayerNorm the 4h values (eps 1e-5), so the
// shuffled tensor never goes through global memory. The shuffle is MODEL_SPEC §3.5's closed form (the same as
// backend/cpu/pixel_shuffle.rs):
//   out[img * (g/2)^2 + r * (g/2) + s, dy * 2h + dx * h + ch] = LN(x[img, 1 + (2r + dy) * g + 2s + dx, ch])
// LayerNorm as layernorm.cu: fp32 mean, then the centred variance from the values held in registers, output
// `(v - mean) * rstd * w + b` rounded to bf16 once, as nn.LayerNorm does in bf16.
//
// One block per output token. When h is a multiple of 8 and the buffers are 16-byte aligned, thread t holds
// Bf16x8 vectors t, t + blockDim, ... (at most kMaxVecs) of the 4h-long output row in registers; a vector never
// straddles two source patches because h % 8 == 0. Otherwise a scalar path re-reads the gathered values from
// global memory for each pass.
#include "common/common.cuh"

using facellm::Bf16x8;

namespace {

constexpr int kMaxVecs = 4;
// The launchers use up to 1024 threads per row; the bound keeps the compiler at <= 64 registers per thread.
constexpr int kMaxThreads = 1024;

}  // namespace

// shuffle_layernorm_bf16:
//   x:   [n_img, 1 + g*g, h] bf16, the vision tower's last hidden state (CLS first, patches row-major)
//   w:   [4h] bf16;  b: [4h] bf16
//   out: [n_img * (g/2)^2, 4h] bf16 (must not overlap x)
//   g:   the patch grid side, even; h: the vision hidden size
// Grid (n_img * (g/2)^2, 1, 1); block (threads, 1, 1), threads a multiple of 32, <= 1024, and
// threads * kMaxVecs * 8 >= 4h for the register path. Static shared memory: 32 floats. Minimum arch sm_80.
extern "C" __global__ void __launch_bounds__(kMaxThreads)
    shuffle_layernorm_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                           const __nv_bfloat16* __restrict__ b, __nv_bfloat16* __restrict__ out, int g, int h,
                           float eps) {
    __shared__ float scratch[32];
    const int half = g / 2;
    const int per_img = half * half;
    const int row = static_cast<int>(blockIdx.x);
    const int img = row / per_img;
    const int rs = row - img * per_img;
    const int r = rs / half;
    const int s = rs - r * half;
    // Source of quadrant q = 2*dy + dx: patch (2r + dy, 2s + dx), token 1 + its row-major index.
    const __nv_bfloat16* tile = x + static_cast<size_t>(img) * (static_cast<size_t>(g) * g + 1) * h;
    const __nv_bfloat16* src00 = tile + (1 + static_cast<size_t>(2 * r) * g + 2 * s) * h;
    const size_t down = static_cast<size_t>(g) * h;  // dy = 1: one patch row further
    __nv_bfloat16* orow = out + static_cast<size_t>(row) * 4 * h;

    const int n = 4 * h;
    const int bd = static_cast<int>(blockDim.x);
    const int tid = static_cast<int>(threadIdx.x);
    const float inv_n = 1.0f / static_cast<float>(n);
    const int hv = h / 8;
    const bool vec = (h % 8 == 0) && 4 * hv <= kMaxVecs * bd && facellm::aligned16(x) && facellm::aligned16(w) &&
                     facellm::aligned16(b) && facellm::aligned16(out);

    if (vec) {
        float v[kMaxVecs][8];
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < kMaxVecs; ++k) {
            const int i = tid + k * bd;
            if (i < 4 * hv) {
                const int q = i / hv;
                const int cv = i - q * hv;
                const __nv_bfloat16* src = src00 + (q >> 1) * down + (q & 1) * static_cast<size_t>(h) + 8 * cv;
                facellm::bf16x8_to_f32(facellm::load_bf16x8(src), v[k]);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    sum += v[k][j];
                }
            }
        }
        const float mean = facellm::block_sum(sum, scratch) * inv_n;
        float sq = 0.0f;
#pragma unroll
        for (int k = 0; k < kMaxVecs; ++k) {
            const int i = tid + k * bd;
            if (i < 4 * hv) {
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
            if (i < 4 * hv) {
                float wf[8], bf[8];
                facellm::bf16x8_to_f32(facellm::load_bf16x8(w + 8 * i), wf);
                facellm::bf16x8_to_f32(facellm::load_bf16x8(b + 8 * i), bf);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    wf[j] = (v[k][j] - mean) * rstd * wf[j] + bf[j];
                }
                facellm::store_bf16x8(orow + 8 * i, facellm::f32_to_bf16x8(wf));
            }
        }
        return;
    }

    // Scalar path: output column i = q * h + ch reads quadrant q's patch at channel ch.
    auto at = [&](int i) {
        const int q = i / h;
        const int ch = i - q * h;
        return __bfloat162float(src00[(q >> 1) * down + (q & 1) * static_cast<size_t>(h) + ch]);
    };
    float sum = 0.0f;
    for (int i = tid; i < n; i += bd) {
        sum += at(i);
    }
    const float mean = facellm::block_sum(sum, scratch) * inv_n;
    float sq = 0.0f;
    for (int i = tid; i < n; i += bd) {
        const float d = at(i) - mean;
        sq += d * d;
    }
    const float rstd = 1.0f / sqrtf(facellm::block_sum(sq, scratch) * inv_n + eps);
    for (int i = tid; i < n; i += bd) {
        orow[i] = __float2bfloat16_rn((at(i) - mean) * rstd * __bfloat162float(w[i]) + __bfloat162float(b[i]));
    }
}
