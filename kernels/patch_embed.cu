// InternViT's patch embedding as one implicit GEMM on the tensor cores: the 14x14 stride-14 convolution of
// pixels [n, 3, S, S] with w [h, 3, 14, 14] is C[m, c] = sum_k A[m, k] * W[c, k] over the g*g patches of every
// image (m = image * g*g + patch row * g + patch col, g = S/14) and the 588 taps k = (channel, kernel row,
// kernel col). A is never materialised: each k-tile is gathered from the image straight into shared memory.
//
// The K dimension is walked as 42 segments, one per (channel, kernel row): 14 contiguous pixels of one image
// row (28 bytes) and the matching 14 weights, padded with two zeros to 16 so that one segment is exactly the
// k16 step of `mma.sync.m16n8k16` (bf16 in, fp32 accumulate; 12.5% of the MMA work is the padding). Both
// operands are read as seven 4-byte bf16 pairs per segment (every run starts at an even element when the
// buffers are 4-byte aligned; otherwise single bf16 loads assemble the same pairs).
//
// Epilogue in torch's order and rounding: out[img, 1 + p, c] = bf16(bf16(conv + bias[c]) + pos[1 + p, c]) (the
// conv's bf16 output, then the bf16 add of the position embedding), and the CLS row out[img, 0, c] =
// bf16(cls[c] + pos[0, c]), written by the blocks whose M range holds that image's first patch.
//
// Tiling: 64 patches x 64 channels per block of 4 warps (2x2), each warp 32x32 = 2 m16 x 4 n8 MMA tiles, k-tile
// of 2 segments (32 taps) double-buffered through registers (global loads for tile k+1 are in flight while the
// MMAs of tile k run; one barrier per k-tile).
#include "common/common.cuh"

namespace {

constexpr int kPatch = 14;
constexpr int kChannels = 3;
constexpr int kTaps = kChannels * kPatch * kPatch;  // 588, the weight's row length
constexpr int kSegs = kChannels * kPatch;           // 42 (channel, kernel row) segments
constexpr int kSegsPerTile = 2;
constexpr int kKTiles = kSegs / kSegsPerTile;  // 21
static_assert(kSegs % kSegsPerTile == 0, "k-tiles must hold whole segments");
constexpr int kPairs = kPatch / 2;  // 7 bf16 pairs of data per segment, an 8th pair of zeros
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kThreads = 128;
static_assert(kThreads == kBM * kSegsPerTile && kThreads == kBN * kSegsPerTile, "one (row, segment) per thread");
// Shared-memory row: 2 segments x 8 words of data plus 4 words of padding. With a 20-word stride the fragment
// loads (8 rows x 4 consecutive words per warp) hit 32 distinct banks, and rows stay 16-byte aligned.
constexpr int kRowWords = 20;

// D += A * B for one 16x8x16 tile. a: 4 regs of the row-major A fragment, b: 2 regs of the column-major B
// fragment, d: 4 fp32 accumulators (PTX ISA "Matrix Fragments for mma.m16n8k16" with .bf16).
__device__ inline void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Seven bf16 pairs starting at p (an even element of its buffer): 4-byte loads when the buffer is 4-byte
// aligned, else pairs assembled from 2-byte loads (low half = lower address, as a 4-byte load would give).
__device__ inline void load_pairs(const __nv_bfloat16* p, bool aligned, uint32_t r[kPairs]) {
    if (aligned) {
        const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
#pragma unroll
        for (int j = 0; j < kPairs; ++j) {
            r[j] = q[j];
        }
    } else {
        const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
        for (int j = 0; j < kPairs; ++j) {
            r[j] = static_cast<uint32_t>(q[2 * j]) | (static_cast<uint32_t>(q[2 * j + 1]) << 16);
        }
    }
}

// One segment (7 data pairs + a zero pair) into its 8 words of a shared-memory row, as two 16-byte stores.
__device__ inline void store_segment(uint32_t* dst, const uint32_t r[kPairs]) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(r[0], r[1], r[2], r[3]);
    *reinterpret_cast<uint4*>(dst + 4) = make_uint4(r[4], r[5], r[6], 0u);
}

}  // namespace

// patch_embed_bf16: conv14x14/s14 + bias, CLS row, position embeddings.
//   pixels: [n_img, 3, S, S] bf16 (S a multiple of 14, g = S/14)
//   w:      [h, 3, 14, 14] bf16 (row c is W[c, k], k = (channel*14 + kernel row)*14 + kernel col)
//   bias:   [h] bf16;  cls: [h] bf16;  pos: [1 + g*g, h] bf16
//   out:    [n_img, 1 + g*g, h] bf16 (must not overlap any input)
// Grid (ceil(n_img*g*g / 64), ceil(h / 64), 1); block (128, 1, 1) exactly. Static shared memory 20480 bytes.
// Minimum arch sm_80 (mma.sync bf16).
extern "C" __global__ void __launch_bounds__(kThreads)
    patch_embed_bf16(const __nv_bfloat16* __restrict__ pixels, const __nv_bfloat16* __restrict__ w,
                     const __nv_bfloat16* __restrict__ bias, const __nv_bfloat16* __restrict__ cls,
                     const __nv_bfloat16* __restrict__ pos, __nv_bfloat16* __restrict__ out, int n_img, int S,
                     int h) {
    __shared__ __align__(16) uint32_t As[2][kBM][kRowWords];
    __shared__ __align__(16) uint32_t Bs[2][kBN][kRowWords];

    const int g = S / kPatch;
    const int gg = g * g;
    const int M = n_img * gg;  // the launcher checks that n_img * (g*g + 1) fits in an int
    const int m0 = static_cast<int>(blockIdx.x) * kBM;
    const int n0 = static_cast<int>(blockIdx.y) * kBN;
    const int tid = static_cast<int>(threadIdx.x);
    const bool aligned = facellm::aligned4(pixels) && facellm::aligned4(w);

    // This thread's loads: row `lrow` of both tiles, segment `seg` of each k-tile.
    const int lrow = tid >> 1;
    const int seg = tid & 1;
    const int m_load = m0 + lrow;
    const int c_load = n0 + lrow;
    const bool a_ok = m_load < M;
    const bool b_ok = c_load < h;
    const __nv_bfloat16* a_base = pixels;
    if (a_ok) {
        const int img = m_load / gg;
        const int p = m_load - img * gg;
        const int py = p / g;
        const int px = p - py * g;
        a_base = pixels + (static_cast<size_t>(img) * kChannels * S + static_cast<size_t>(py) * kPatch) * S +
                 static_cast<size_t>(px) * kPatch;
    }
    const __nv_bfloat16* b_base = w + static_cast<size_t>(b_ok ? c_load : 0) * kTaps;

    uint32_t ra[kPairs];
    uint32_t rb[kPairs];
    auto load_tile = [&](int kt) {
        const int s = kt * kSegsPerTile + seg;  // (channel, kernel row) = (s / 14, s % 14)
        const int ch = s / kPatch;
        const int ky = s - ch * kPatch;
        if (a_ok) {
            load_pairs(a_base + (static_cast<size_t>(ch) * S + ky) * S, aligned, ra);
        } else {
#pragma unroll
            for (int j = 0; j < kPairs; ++j) {
                ra[j] = 0u;
            }
        }
        if (b_ok) {
            load_pairs(b_base + s * kPatch, aligned, rb);
        } else {
#pragma unroll
            for (int j = 0; j < kPairs; ++j) {
                rb[j] = 0u;
            }
        }
    };
    auto store_tile = [&](int buf) {
        store_segment(&As[buf][lrow][seg * 8], ra);
        store_segment(&Bs[buf][lrow][seg * 8], rb);
    };

    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wm = (warp >> 1) * 32;  // warp's row offset in the block tile
    const int wn = (warp & 1) * 32;   // warp's column offset
    const int gq = lane >> 2;         // fragment "groupID"
    const int tq = lane & 3;          // fragment "threadID_in_group"

    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[mi][ni][e] = 0.0f;
            }
        }
    }

    load_tile(0);
    store_tile(0);
    __syncthreads();
    for (int kt = 0; kt < kKTiles; ++kt) {
        const int buf = kt & 1;
        if (kt + 1 < kKTiles) {
            load_tile(kt + 1);
        }
#pragma unroll
        for (int kk = 0; kk < kSegsPerTile; ++kk) {
            const int kw = kk * 8 + tq;  // word of columns (2*tq, 2*tq+1) of this k16 step
            uint32_t a[2][4];
            uint32_t b[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const int r = wm + mi * 16 + gq;
                a[mi][0] = As[buf][r][kw];
                a[mi][1] = As[buf][r + 8][kw];
                a[mi][2] = As[buf][r][kw + 4];
                a[mi][3] = As[buf][r + 8][kw + 4];
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int c = wn + ni * 8 + gq;
                b[ni][0] = Bs[buf][c][kw];
                b[ni][1] = Bs[buf][c][kw + 4];
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    mma_bf16_16816(acc[mi][ni], a[mi], b[ni]);
                }
            }
        }
        if (kt + 1 < kKTiles) {
            // Buffer buf ^ 1 was last read in iteration kt - 1, which every warp finished before the barrier.
            store_tile(buf ^ 1);
        }
        __syncthreads();
    }

    // Epilogue. Accumulator e of tile (mi, ni) is row gq + 8 * (e / 2), column 2 * tq + e % 2 of that tile.
    const bool pair_store = (h % 2 == 0) && facellm::aligned4(out);
    const size_t tokens = static_cast<size_t>(gg) + 1;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + wm + mi * 16 + gq + 8 * half;
            if (m >= M) {
                continue;
            }
            const int img = m / gg;
            const int token = 1 + (m - img * gg);
            __nv_bfloat16* orow = out + (static_cast<size_t>(img) * tokens + token) * h;
            const __nv_bfloat16* prow = pos + static_cast<size_t>(token) * h;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int c = n0 + wn + ni * 8 + 2 * tq;
                if (c >= h) {
                    continue;
                }
                float v[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int ce = c + e < h ? c + e : c;  // clamp keeps the read in bounds; the value is unused
                    const float conv = facellm::round_bf16(acc[mi][ni][2 * half + e] + __bfloat162float(bias[ce]));
                    v[e] = conv + __bfloat162float(prow[ce]);
                }
                if (pair_store) {
                    // h even and c even: c + 1 < h, and the pair is 4-byte aligned.
                    *reinterpret_cast<__nv_bfloat162*>(orow + c) = __floats2bfloat162_rn(v[0], v[1]);
                } else {
                    orow[c] = __float2bfloat16_rn(v[0]);
                    if (c + 1 < h) {
                        orow[c + 1] = __float2bfloat16_rn(v[1]);
                    }
                }
            }
        }
    }

    // CLS rows of the images whose first patch (m = img * gg) falls in this block's M range, for its columns.
    const int m_end = min(m0 + kBM, M);
    const int img_lo = (m0 + gg - 1) / gg;
    const int img_hi = min((m_end + gg - 1) / gg, n_img);
    for (int i = tid; i < (img_hi - img_lo) * kBN; i += kThreads) {
        const int img = img_lo + i / kBN;
        const int c = n0 + i % kBN;
        if (c < h) {
            out[static_cast<size_t>(img) * tokens * h + c] =
                __float2bfloat16_rn(__bfloat162float(cls[c]) + __bfloat162float(pos[c]));
        }
    }
}
