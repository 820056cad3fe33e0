// Flash attention forward (FlashAttention-2 style) on tensor cores, bf16 in and out, fp32 softmax and
// accumulation, never materialising the score matrix. The CPU twin is backend/cpu/attention.rs (scores in f32,
// softmax in f32, f32 output); here the scores are exact fp32 sums of bf16 products (mma.sync m16n8k16), the
// softmax is the online one in fp32 with exp2f and the log2(e)-prescaled scale, the probabilities are rounded
// to bf16 for the P·V product (as every flash kernel does) and the output is rounded to bf16 once.
//
// One block of kWarps warps owns kBlockM = 16 * kWarps query rows of one (sequence, query head); each warp
// owns 16 rows and keeps their Q fragments, the running max / sum and the fp32 output accumulator in
// registers. Keys and values stream through shared memory in tiles of kBlockN rows, double-buffered with
// cp.async so the next tile loads while the current one is multiplied. Shared memory rows are 16-byte chunks
// XOR-swizzled by (row & 7), which makes both the cp.async writes and the ldmatrix reads conflict-free.
//
// Three entry points per head dim (64, 128):
//   flash_attn_fwd_hd*_bf16          bidirectional over `batch` sequences of equal length (vision tower)
//   flash_attn_fwd_causal_hd*_bf16   causal, query i at key position q_offset + i (prefill, cached prefix)
//   flash_attn_paged_prefill_hd*_bf16 causal over several sequences whose keys and values are read from the
//                                    paged KV cache (layout of src/kv/mod.rs, block size kPage)
// Faster-candidate twins of the dense kernels, same contracts and per-row arithmetic (launcher: FACELLM_FLASH):
//   flash_attn_fwd_v2[_causal]_hd*_bf16  4 warps x 16 rows per block, several blocks resident per SM
//   flash_attn_fwd_v3[_causal]_hd64_bf16 4 warps x 32 rows per block (each K/V fragment feeds two row tiles)
// Global reads of K/V rows past the end of the keys are never issued (the rows are zero-filled), so a paged
// cache's unused slots (NaN in the self-check) are never touched.
//
// Pointers are base + row stride (elements), so q, k and v may be column ranges of one fused QKV buffer. The
// 16-byte paths need 16-byte aligned bases and strides that are multiples of 8; otherwise a slower scalar path
// (same math, same results) is taken. Minimum arch sm_80 (cp.async, bf16 mma, ldmatrix).
#include "common/common.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // query rows per block
constexpr int kBlockN = 64;           // keys per shared-memory tile
constexpr int kPage = 16;             // tokens per paged KV block (must equal the Rust side's check)
constexpr float kLog2e = 1.4426950408889634f;

// v2 (flash_attn_fwd_v2_*): the same tile loop with 4 warps, 64 query rows per block, and launch bounds that
// ask for several resident blocks per SM (v1's 8-warp blocks fit once per SM at head dim 64, limited by
// registers), so one block's barriers and loads overlap another block's math, and the 1025-row tail wastes
// 63 rows instead of 127.
constexpr int kWarpsV2 = 4;
constexpr int kMinBlocksV2Hd64 = 3;   // <= 168 registers (4 blocks, <= 128, spills)
constexpr int kMinBlocksV2Hd128 = 2;  // <= 255 registers, 2 x 80 KiB shared memory
// v3 (flash_attn_fwd_v3_*, head dim 64 only): 4 warps of 32 query rows (attend_block_mt, MT = 2), 128 rows and
// 48 KiB per block, 2 blocks per SM.
constexpr int kMtV3 = 2;
constexpr int kMinBlocksV3Hd64 = 2;

// Dynamic shared memory of one block of WARPS warps: Q tile, then K and V tiles, two buffers each.
template <int D, int WARPS = kWarps>
constexpr int smem_bytes() {
    return (16 * WARPS * D + 4 * kBlockN * D) * 2;
}

// PTX helpers. A host-side emulator of these few warp-level instructions may define FACELLM_HOST_EMU and
// supply its own versions; the CUDA build always takes these.
#ifndef FACELLM_HOST_EMU
__device__ inline uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (.cg); with `valid` false nothing is read and the 16 bytes
// are zero-filled (src-size 0), so rows past the end cost no memory traffic and hold finite values.
__device__ inline void cp_async_16(void* smem, const void* gmem, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
                 "r"(src_bytes)
                 : "memory");
}

__device__ inline void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ inline void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 bf16 matrices; lane t supplies the address of row (t % 8) of matrix (t / 8) and receives, per
// matrix i, r[i] = {M_i[t/4][2(t%4)], M_i[t/4][2(t%4)+1]} (the mma A/B fragment order).
__device__ inline void ldmatrix_x4(uint32_t r[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(smem)));
}

// As ldmatrix_x4 but each matrix transposed: r[i] = {M_i[2(t%4)][t/4], M_i[2(t%4)+1][t/4]}. Turns row-major
// V tiles (rows = keys) into B fragments of P·V without a transposed copy.
__device__ inline void ldmatrix_x4_trans(uint32_t r[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(smem)));
}

// c[16x8] += a[16x16] · b[16x8], bf16 inputs, fp32 accumulators. Fragments (g = lane/4, t = lane%4):
// a = {A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]}, b = {B[2t..][g], B[2t+8..][g]},
// c = {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}.
__device__ inline void mma_bf16_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // FACELLM_HOST_EMU

// Two floats rounded to bf16 (nearest-even) in one register, `lo` in the low half (the lower column).
__device__ inline uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Element offset of 16-byte chunk `c` of row `r` in a swizzled [rows, D] bf16 tile.
template <int D>
__device__ inline int swz(int r, int c) {
    return (r * (D / 8) + (c ^ (r & 7))) * 8;
}

// Copies rows [0, ROWS) of a tile into swizzled shared memory; rows >= valid_rows become zeros. `row_ptr(r)`
// gives the global address of row r (called only for valid rows and row 0). valid_rows >= 1. vec: 16-byte
// cp.async, else scalar loads. THREADS: the block size.
template <int D, int ROWS, int THREADS, class RowPtr>
__device__ inline void load_tile(__nv_bfloat16* s, int valid_rows, bool vec, const RowPtr& row_ptr) {
    constexpr int kChunks = D / 8;
    static_assert((ROWS * kChunks) % THREADS == 0, "tile chunks must split evenly over the block");
#pragma unroll
    for (int k = 0; k < ROWS * kChunks / THREADS; ++k) {
        const int i = threadIdx.x + k * THREADS;
        const int r = i / kChunks;
        const int c = i % kChunks;
        __nv_bfloat16* dst = s + swz<D>(r, c);
        const bool ok = r < valid_rows;
        if (vec) {
            // An invalid row reads nothing (src-size 0) but still names a mapped address: row 0, which every
            // caller guarantees is valid (valid_rows >= 1).
            const __nv_bfloat16* src = row_ptr(ok ? r : 0) + 8 * c;
            cp_async_16(dst, src, ok);
        } else {
            float f[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                f[e] = ok ? __bfloat162float(row_ptr(r)[8 * c + e]) : 0.0f;
            }
            facellm::store_bf16x8(dst, facellm::f32_to_bf16x8(f));
        }
    }
}

// Keys and values of one (sequence, kv head) in a dense [tokens, ld] buffer.
struct DenseKv {
    const __nv_bfloat16* k;  // row 0 of the sequence, column of the kv head
    const __nv_bfloat16* v;
    int ld_k;
    int ld_v;
    __device__ const __nv_bfloat16* k_row(int j) const { return k + static_cast<size_t>(j) * ld_k; }
    __device__ const __nv_bfloat16* v_row(int j) const { return v + static_cast<size_t>(j) * ld_v; }
};

// Keys and values of one (sequence, kv head) in the paged cache [num_blocks, kPage, hk, D]: key j lives in
// block table[j / kPage], slot j % kPage. Only called for j < context length, so the table is read in bounds.
struct PagedKv {
    const __nv_bfloat16* k;  // cache base plus the kv head's column
    const __nv_bfloat16* v;
    const uint32_t* table;   // this sequence's block table
    int row;                 // hk * D: elements per cached token
    __device__ size_t off(int j) const {
        const size_t block = __ldg(table + j / kPage);
        return (block * kPage + static_cast<size_t>(j % kPage)) * static_cast<size_t>(row);
    }
    __device__ const __nv_bfloat16* k_row(int j) const { return k + off(j); }
    __device__ const __nv_bfloat16* v_row(int j) const { return v + off(j); }
};

// One block's work: query rows [m0, m0 + 16 * WARPS) of one (sequence, head). q and o point at row 0 of the
// sequence and the head's column; rows are ld_q / ld_o apart. Query i sees keys [0, tk) (bidirectional) or
// [0, min(q_offset + i + 1, tk)) (causal). WARPS: kWarps (v1) or kWarpsV2 (v2).
template <int D, bool CAUSAL, class Kv, int WARPS = kWarps>
__device__ inline void attend_block(const __nv_bfloat16* __restrict__ q, int ld_q, __nv_bfloat16* __restrict__ o,
                                    int ld_o, const Kv& kv, int tq, int tk, int q_offset, int m0, float scale,
                                    bool vec) {
    constexpr int kChunks = D / 8;
    constexpr int kTile = kBlockN * D;
    constexpr int kRows = 16 * WARPS;  // this block's query rows (kBlockM for v1)
    constexpr int kBlockThreads = 32 * WARPS;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* sK = sQ + kRows * D;  // two tiles
    __nv_bfloat16* sV = sK + 2 * kTile;  // two tiles

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;  // fragment row (and row + 8)
    const int t4 = lane % 4;
    const int row_w = m0 + 16 * warp;  // first query row of this warp
    const bool warp_live = row_w < tq;
    const float scale_log2 = scale * kLog2e;

    // Keys past kv_end are invisible to every row of the block.
    const int kv_end = CAUSAL ? min(tk, q_offset + min(m0 + kRows, tq)) : tk;
    const int n_tiles = (kv_end + kBlockN - 1) / kBlockN;

    auto load_kv = [&](int tile, int buf) {
        const int n0 = tile * kBlockN;
        const int valid = min(kBlockN, tk - n0);
        const auto k_row = [&](int r) { return kv.k_row(n0 + r); };
        const auto v_row = [&](int r) { return kv.v_row(n0 + r); };
        load_tile<D, kBlockN, kBlockThreads>(sK + buf * kTile, valid, vec, k_row);
        load_tile<D, kBlockN, kBlockThreads>(sV + buf * kTile, valid, vec, v_row);
    };

    load_tile<D, kRows, kBlockThreads>(sQ, tq - m0, vec,
                                       [&](int r) { return q + static_cast<size_t>(m0 + r) * ld_q; });
    if (n_tiles > 0) {
        load_kv(0, 0);
    }
    cp_async_commit();

    uint32_t qf[D / 16][4];
    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            acc[i][e] = 0.0f;
        }
    }
    // Running max of the raw scores (rows g and g + 8) and this thread's partial row sums.
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};

    for (int tile = 0; tile < n_tiles; ++tile) {
        // The buffer the next tile goes into was last read in iteration tile - 1, which every warp finished
        // before that iteration's trailing barrier.
        if (tile + 1 < n_tiles) {
            load_kv(tile + 1, (tile + 1) & 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (tile == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                ldmatrix_x4(qf[kk], sQ + swz<D>(16 * warp + (lane & 15), 2 * kk + (lane >> 4)));
            }
        }
        const int n0 = tile * kBlockN;
        // Warps whose rows are all padding, or all before this tile's first key (causal), skip the math.
        const bool work = warp_live && (!CAUSAL || n0 <= q_offset + row_w + 15);
        if (work) {
            const __nv_bfloat16* k_s = sK + (tile & 1) * kTile;
            const __nv_bfloat16* v_s = sV + (tile & 1) * kTile;

            // S = Q Kᵀ: s[nb] holds keys n0 + 8nb + 2t4 + {0, 1} for rows g (s[nb][0..1]) and g+8 (s[nb][2..3]).
            float s[kBlockN / 8][4];
#pragma unroll
            for (int nb = 0; nb < kBlockN / 8; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[nb][e] = 0.0f;
                }
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
                for (int np = 0; np < kBlockN / 16; ++np) {
                    // Matrices: keys +0..7 / dims +0..7, keys +0..7 / dims +8..15, keys +8..15 / dims +0..7, ...
                    uint32_t b[4];
                    ldmatrix_x4(b, k_s + swz<D>(16 * np + (lane & 7) + 8 * (lane >> 4), 2 * kk + ((lane >> 3) & 1)));
                    mma_bf16_16816(s[2 * np], qf[kk], b[0], b[1]);
                    mma_bf16_16816(s[2 * np + 1], qf[kk], b[2], b[3]);
                }
            }

            // Mask keys past the end and, causal, past each row's position. Warp-uniform test.
            const bool need_mask = n0 + kBlockN > tk || (CAUSAL && n0 + kBlockN - 1 > q_offset + row_w);
            if (need_mask) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = row_w + g + 8 * r;
                    const int limit = CAUSAL ? min(tk, q_offset + row + 1) : tk;
#pragma unroll
                    for (int nb = 0; nb < kBlockN / 8; ++nb) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            if (n0 + 8 * nb + 2 * t4 + e >= limit) {
                                s[nb][2 * r + e] = -INFINITY;
                            }
                        }
                    }
                }
            }

            // Online softmax. The four lanes of a quad share a row: max over the quad with two xor shuffles.
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = -INFINITY;
#pragma unroll
                for (int nb = 0; nb < kBlockN / 8; ++nb) {
                    mx = fmaxf(mx, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
                }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(row_max[r], mx);
                // A row with nothing visible yet keeps max -inf: subtract 0 so exp2 gives 0, not NaN.
                const float m_scaled = m_new == -INFINITY ? 0.0f : m_new * scale_log2;
                const float alpha = exp2f(row_max[r] * scale_log2 - m_scaled);
                row_max[r] = m_new;
                float sum = 0.0f;
#pragma unroll
                for (int nb = 0; nb < kBlockN / 8; ++nb) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float p = exp2f(fmaf(s[nb][2 * r + e], scale_log2, -m_scaled));
                        s[nb][2 * r + e] = p;
                        sum += p;
                    }
                }
                row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
                for (int db = 0; db < D / 8; ++db) {
                    acc[db][2 * r] *= alpha;
                    acc[db][2 * r + 1] *= alpha;
                }
            }

            // O += P V. The accumulators of key blocks 2kc and 2kc+1 are exactly the A fragment of keys
            // [16kc, 16kc + 16), so P never leaves registers.
#pragma unroll
            for (int kc = 0; kc < kBlockN / 16; ++kc) {
                uint32_t a[4];
                a[0] = pack_bf16x2(s[2 * kc][0], s[2 * kc][1]);
                a[1] = pack_bf16x2(s[2 * kc][2], s[2 * kc][3]);
                a[2] = pack_bf16x2(s[2 * kc + 1][0], s[2 * kc + 1][1]);
                a[3] = pack_bf16x2(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    // Matrices: keys +0..7 / dims +0..7, keys +8..15 / dims +0..7, keys +0..7 / dims +8..15, ...
                    uint32_t b[4];
                    ldmatrix_x4_trans(
                        b, v_s + swz<D>(16 * kc + (lane & 7) + 8 * ((lane >> 3) & 1), 2 * dp + (lane >> 4)));
                    mma_bf16_16816(acc[2 * dp], a, b[0], b[1]);
                    mma_bf16_16816(acc[2 * dp + 1], a, b[2], b[3]);
                }
            }
        }
        __syncthreads();
    }

    if (!warp_live) {
        return;
    }
    // Normalise, stage the warp's 16 rows in its own (no longer needed) rows of sQ, then store 16-byte chunks.
    // Only this warp touches those rows, and its own ldmatrix reads of them completed long ago.
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inv[r] = l > 0.0f ? 1.0f / l : 0.0f;
    }
    __nv_bfloat16* stage = sQ + 16 * warp * D;
#pragma unroll
    for (int db = 0; db < D / 8; ++db) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const uint32_t v = pack_bf16x2(acc[db][2 * r] * inv[r], acc[db][2 * r + 1] * inv[r]);
            *reinterpret_cast<uint32_t*>(stage + swz<D>(g + 8 * r, db) + 2 * t4) = v;
        }
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < 16 * kChunks / 32; ++k) {
        const int i = lane + 32 * k;
        const int r = i / kChunks;
        const int c = i % kChunks;
        const int row = row_w + r;
        if (row < tq) {
            const __nv_bfloat16* src = stage + swz<D>(r, c);
            __nv_bfloat16* dst = o + static_cast<size_t>(row) * ld_o + 8 * c;
            if (vec) {
                facellm::store_bf16x8(dst, facellm::load_bf16x8(src));
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    dst[e] = src[e];
                }
            }
        }
    }
}

// v3: attend_block with MT = 2 m-tiles (32 query rows) per warp. Each K and V fragment a warp loads with
// ldmatrix feeds MT times as many mma instructions, halving shared-memory read traffic per flop (as
// FlashAttention-2 does with 4 warps x 32 rows), at the cost of MT times the Q, score and accumulator
// registers. Same per-row arithmetic as attend_block. MT = 1 would be attend_block<.., WARPS> itself.
template <int D, bool CAUSAL, int WARPS, int MT>
__device__ inline void attend_block_mt(const __nv_bfloat16* __restrict__ q, int ld_q, __nv_bfloat16* __restrict__ o,
                                       int ld_o, const DenseKv& kv, int tq, int tk, int q_offset, int m0,
                                       float scale, bool vec) {
    constexpr int kChunks = D / 8;
    constexpr int kTile = kBlockN * D;
    constexpr int kWarpRows = 16 * MT;
    constexpr int kRows = kWarpRows * WARPS;
    constexpr int kBlockThreads = 32 * WARPS;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* sK = sQ + kRows * D;  // two tiles
    __nv_bfloat16* sV = sK + 2 * kTile;  // two tiles

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int t4 = lane % 4;
    const int row_w = m0 + kWarpRows * warp;  // first query row of this warp
    const bool warp_live = row_w < tq;
    const float scale_log2 = scale * kLog2e;

    const int kv_end = CAUSAL ? min(tk, q_offset + min(m0 + kRows, tq)) : tk;
    const int n_tiles = (kv_end + kBlockN - 1) / kBlockN;

    auto load_kv = [&](int tile, int buf) {
        const int n0 = tile * kBlockN;
        const int valid = min(kBlockN, tk - n0);
        const auto k_row = [&](int r) { return kv.k_row(n0 + r); };
        const auto v_row = [&](int r) { return kv.v_row(n0 + r); };
        load_tile<D, kBlockN, kBlockThreads>(sK + buf * kTile, valid, vec, k_row);
        load_tile<D, kBlockN, kBlockThreads>(sV + buf * kTile, valid, vec, v_row);
    };

    load_tile<D, kRows, kBlockThreads>(sQ, tq - m0, vec,
                                       [&](int r) { return q + static_cast<size_t>(m0 + r) * ld_q; });
    if (n_tiles > 0) {
        load_kv(0, 0);
    }
    cp_async_commit();

    uint32_t qf[MT][D / 16][4];
    float acc[MT][D / 8][4];
    float row_max[MT][2];
    float row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[mt][i][e] = 0.0f;
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            row_max[mt][r] = -INFINITY;
            row_sum[mt][r] = 0.0f;
        }
    }

    for (int tile = 0; tile < n_tiles; ++tile) {
        if (tile + 1 < n_tiles) {
            load_kv(tile + 1, (tile + 1) & 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (tile == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    const int row = kWarpRows * warp + 16 * mt + (lane & 15);
                    ldmatrix_x4(qf[mt][kk], sQ + swz<D>(row, 2 * kk + (lane >> 4)));
                }
            }
        }
        const int n0 = tile * kBlockN;
        const bool work = warp_live && (!CAUSAL || n0 <= q_offset + row_w + kWarpRows - 1);
        if (work) {
            const __nv_bfloat16* k_s = sK + (tile & 1) * kTile;
            const __nv_bfloat16* v_s = sV + (tile & 1) * kTile;

            float s[MT][kBlockN / 8][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int nb = 0; nb < kBlockN / 8; ++nb) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        s[mt][nb][e] = 0.0f;
                    }
                }
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
                for (int np = 0; np < kBlockN / 16; ++np) {
                    uint32_t b[4];
                    ldmatrix_x4(b, k_s + swz<D>(16 * np + (lane & 7) + 8 * (lane >> 4), 2 * kk + ((lane >> 3) & 1)));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_bf16_16816(s[mt][2 * np], qf[mt][kk], b[0], b[1]);
                        mma_bf16_16816(s[mt][2 * np + 1], qf[mt][kk], b[2], b[3]);
                    }
                }
            }

            const bool need_mask = n0 + kBlockN > tk || (CAUSAL && n0 + kBlockN - 1 > q_offset + row_w);
            if (need_mask) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const int row = row_w + 16 * mt + g + 8 * r;
                        const int limit = CAUSAL ? min(tk, q_offset + row + 1) : tk;
#pragma unroll
                        for (int nb = 0; nb < kBlockN / 8; ++nb) {
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                if (n0 + 8 * nb + 2 * t4 + e >= limit) {
                                    s[mt][nb][2 * r + e] = -INFINITY;
                                }
                            }
                        }
                    }
                }
            }

#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float mx = -INFINITY;
#pragma unroll
                    for (int nb = 0; nb < kBlockN / 8; ++nb) {
                        mx = fmaxf(mx, fmaxf(s[mt][nb][2 * r], s[mt][nb][2 * r + 1]));
                    }
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float m_new = fmaxf(row_max[mt][r], mx);
                    const float m_scaled = m_new == -INFINITY ? 0.0f : m_new * scale_log2;
                    const float alpha = exp2f(row_max[mt][r] * scale_log2 - m_scaled);
                    row_max[mt][r] = m_new;
                    float sum = 0.0f;
#pragma unroll
                    for (int nb = 0; nb < kBlockN / 8; ++nb) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float p = exp2f(fmaf(s[mt][nb][2 * r + e], scale_log2, -m_scaled));
                            s[mt][nb][2 * r + e] = p;
                            sum += p;
                        }
                    }
                    row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
                    for (int db = 0; db < D / 8; ++db) {
                        acc[mt][db][2 * r] *= alpha;
                        acc[mt][db][2 * r + 1] *= alpha;
                    }
                }
            }

#pragma unroll
            for (int kc = 0; kc < kBlockN / 16; ++kc) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    a[mt][0] = pack_bf16x2(s[mt][2 * kc][0], s[mt][2 * kc][1]);
                    a[mt][1] = pack_bf16x2(s[mt][2 * kc][2], s[mt][2 * kc][3]);
                    a[mt][2] = pack_bf16x2(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
                    a[mt][3] = pack_bf16x2(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(
                        b, v_s + swz<D>(16 * kc + (lane & 7) + 8 * ((lane >> 3) & 1), 2 * dp + (lane >> 4)));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_bf16_16816(acc[mt][2 * dp], a[mt], b[0], b[1]);
                        mma_bf16_16816(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
                    }
                }
            }
        }
        __syncthreads();
    }

    if (!warp_live) {
        return;
    }
    // Stage the warp's kWarpRows rows in its own rows of sQ (read only by this warp's tile-0 ldmatrix).
    __nv_bfloat16* stage = sQ + kWarpRows * warp * D;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = row_sum[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
            for (int db = 0; db < D / 8; ++db) {
                const uint32_t v = pack_bf16x2(acc[mt][db][2 * r] * inv, acc[mt][db][2 * r + 1] * inv);
                *reinterpret_cast<uint32_t*>(stage + swz<D>(16 * mt + g + 8 * r, db) + 2 * t4) = v;
            }
        }
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kWarpRows * kChunks / 32; ++k) {
        const int i = lane + 32 * k;
        const int r = i / kChunks;
        const int c = i % kChunks;
        const int row = row_w + r;
        if (row < tq) {
            const __nv_bfloat16* src = stage + swz<D>(r, c);
            __nv_bfloat16* dst = o + static_cast<size_t>(row) * ld_o + 8 * c;
            if (vec) {
                facellm::store_bf16x8(dst, facellm::load_bf16x8(src));
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    dst[e] = src[e];
                }
            }
        }
    }
}

__device__ inline bool strides_vec(int a, int b, int c, int d) {
    return ((a | b | c | d) & 7) == 0;
}

template <int D, bool CAUSAL, int WARPS = kWarps, int MT = 1>
__device__ inline void fwd(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                           const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int ld_q, int ld_k,
                           int ld_v, int ld_o, int tq, int tk, int hq, int hk, int q_offset, float scale) {
    const int b = blockIdx.z;
    const int h = blockIdx.y;
    const int kvh = h / (hq / hk);
    // Causal blocks further down have more keys: start those first so the tail of the grid is short ones.
    const int m_block = CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const bool vec = strides_vec(ld_q, ld_k, ld_v, ld_o) && facellm::aligned16(q) && facellm::aligned16(k) &&
                     facellm::aligned16(v) && facellm::aligned16(o);
    const size_t q_row0 = static_cast<size_t>(b) * tq;
    const size_t k_row0 = static_cast<size_t>(b) * tk;
    const DenseKv kv{k + k_row0 * ld_k + kvh * D, v + k_row0 * ld_v + kvh * D, ld_k, ld_v};
    if constexpr (MT == 1) {
        attend_block<D, CAUSAL, DenseKv, WARPS>(q + q_row0 * ld_q + h * D, ld_q, o + q_row0 * ld_o + h * D, ld_o,
                                                kv, tq, tk, q_offset, m_block * 16 * WARPS, scale, vec);
    } else {
        attend_block_mt<D, CAUSAL, WARPS, MT>(q + q_row0 * ld_q + h * D, ld_q, o + q_row0 * ld_o + h * D, ld_o, kv,
                                              tq, tk, q_offset, m_block * 16 * MT * WARPS, scale, vec);
    }
}

template <int D>
__device__ inline void paged_prefill(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
                                     const __nv_bfloat16* __restrict__ v_cache, __nv_bfloat16* __restrict__ o, int ld_q,
                                     int ld_o, const uint32_t* __restrict__ block_tables, int max_blocks,
                                     const uint32_t* __restrict__ cu_q, const uint32_t* __restrict__ context_lens,
                                     int total_q, int num_blocks, int hq, int hk, float scale) {
    const int seq = blockIdx.z;
    const int h = blockIdx.y;
    const int kvh = h / (hq / hk);
    const uint32_t q_begin = cu_q[seq];
    const uint32_t q_end = cu_q[seq + 1];
    // Rows outside [0, total_q) cannot even be marked: such a sequence is left unwritten.
    if (q_end < q_begin || q_end > static_cast<uint32_t>(total_q)) {
        return;
    }
    const int q_start = static_cast<int>(q_begin);
    const int q_len = static_cast<int>(q_end - q_begin);
    const uint32_t ctx_u = context_lens[seq];
    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int m0 = m_block * kBlockM;
    if (m0 >= q_len) {
        return;
    }
    const uint32_t* table = block_tables + static_cast<size_t>(seq) * max_blocks;
    // Metadata that would read outside the table or the cache (more queries than context, a context longer
    // than the table, a block id past the pool) gives NaN rows, so the failure is loud.
    bool bad = ctx_u < static_cast<uint32_t>(q_len) || ctx_u > static_cast<uint32_t>(max_blocks) * kPage;
    if (!bad) {
        for (int i = threadIdx.x; i < static_cast<int>((ctx_u + kPage - 1) / kPage); i += kThreads) {
            bad |= table[i] >= static_cast<uint32_t>(num_blocks);
        }
    }
    bad = __syncthreads_or(bad);
    const int ctx = static_cast<int>(ctx_u);
    __nv_bfloat16* o_seq = o + static_cast<size_t>(q_start) * ld_o + h * D;
    if (bad) {
        for (int i = threadIdx.x; i < min(kBlockM, q_len - m0) * D; i += kThreads) {
            o_seq[static_cast<size_t>(m0 + i / D) * ld_o + i % D] = __float2bfloat16_rn(NAN);
        }
        return;
    }
    const bool vec = strides_vec(ld_q, ld_o, 0, 0) && facellm::aligned16(q) && facellm::aligned16(o) &&
                     facellm::aligned16(k_cache) && facellm::aligned16(v_cache);
    const PagedKv kv{k_cache + kvh * D, v_cache + kvh * D, table, hk * D};
    attend_block<D, true>(q + static_cast<size_t>(q_start) * ld_q + h * D, ld_q, o_seq, ld_o, kv, q_len, ctx,
                          ctx - q_len, m0, scale, vec);
}

}  // namespace

// flash_attn_fwd_hd{64,128}_bf16: bidirectional attention over `batch` sequences of tq queries and tk keys.
//   q: row (b*tq + i), head j at q + (b*tq + i)*ld_q + j*D          bf16, [batch*tq, >= hq*D] rows
//   k, v: row (b*tk + n), kv head j/(hq/hk) at k + (b*tk + n)*ld_k + (j/(hq/hk))*D
//   o: [batch*tq, >= hq*D] rows of ld_o; only the hq*D head columns of rows < batch*tq are written
// Grid (ceil(tq / 128), hq, batch), block 256, dynamic shared memory smem_bytes<D>() (48 KiB for D 64, 96 KiB
// for D 128: the launcher raises the function's limit). Host checks: hq % hk == 0, tk >= 1. Arch sm_80.
extern "C" __global__ void __launch_bounds__(kThreads)
    flash_attn_fwd_hd64_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                             const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int ld_q, int ld_k,
                             int ld_v, int ld_o, int tq, int tk, int hq, int hk, float scale) {
    fwd<64, false>(q, k, v, o, ld_q, ld_k, ld_v, ld_o, tq, tk, hq, hk, 0, scale);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    flash_attn_fwd_hd128_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                              const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int ld_q, int ld_k,
                              int ld_v, int ld_o, int tq, int tk, int hq, int hk, float scale) {
    fwd<128, false>(q, k, v, o, ld_q, ld_k, ld_v, ld_o, tq, tk, hq, hk, 0, scale);
}

// flash_attn_fwd_causal_hd{64,128}_bf16: as above, causal: query i of each sequence sits at key position
// q_offset + i and sees keys [0, q_offset + i]. Host checks q_offset + tq <= tk. Grid, block, shared memory
// and arch as the bidirectional kernels (blocks run last-rows-first).
extern "C" __global__ void __launch_bounds__(kThreads)
    flash_attn_fwd_causal_hd64_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                    const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int ld_q,
                                    int ld_k, int ld_v, int ld_o, int tq, int tk, int hq, int hk, int q_offset,
                                    float scale) {
    fwd<64, true>(q, k, v, o, ld_q, ld_k, ld_v, ld_o, tq, tk, hq, hk, q_offset, scale);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    flash_attn_fwd_causal_hd128_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                     const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int ld_q,
                                     int ld_k, int ld_v, int ld_o, int tq, int tk, int hq, int hk, int q_offset,
                                     float scale) {
    fwd<128, true>(q, k, v, o, ld_q, ld_k, ld_v, ld_o, tq, tk, hq, hk, q_offset, scale);
}

// flash_attn_paged_prefill_hd{64,128}_bf16: causal prefill of num_seqs sequences whose keys and values (the
// cached prefix and the new tokens, already written) are read from one layer's paged cache.
//   q: [total_q, >= hq*D] rows of ld_q; sequence s owns rows cu_q[s] .. cu_q[s+1]
//   k_cache, v_cache: [num_blocks, 16, hk, D] bf16 (src/kv/mod.rs)
//   block_tables: [num_seqs, max_blocks] u32; context_lens: [num_seqs] u32 (cached + new tokens)
//   cu_q: [num_seqs + 1] u32, non-decreasing, cu_q[num_seqs] <= total_q
//   o: [total_q, >= hq*D] rows of ld_o
// Query i of sequence s sits at position context_lens[s] - q_len + i. Grid (ceil(max_q_len / 128), hq,
// num_seqs), block 256, shared memory as above. Device-side metadata is checked: a sequence whose context is
// shorter than its queries or longer than its table, or whose table names a block >= num_blocks, gets NaN
// rows; one whose rows fall outside [0, total_q) is not written. Arch sm_80.
extern "C" __global__ void __launch_bounds__(kThreads)
    flash_attn_paged_prefill_hd64_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
                                       const __nv_bfloat16* __restrict__ v_cache, __nv_bfloat16* __restrict__ o,
                                       int ld_q, int ld_o, const uint32_t* __restrict__ block_tables, int max_blocks,
                                       const uint32_t* __restrict__ cu_q, const uint32_t* __restrict__ context_lens,
                                       int total_q, int num_blocks, int hq, int hk, float scale) {
    paged_prefill<64>(q, k_cache, v_cache, o, ld_q, ld_o, block_tables, max_blocks, cu_q, context_lens, total_q,
                      num_blocks, hq, hk, scale);
}

extern "C" __global__ void __launch_bounds__(kThreads) flash_attn_paged_prefill_hd128_bf16(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
    const __nv_bfloat16* __restrict__ v_cache, __nv_bfloat16* __restrict__ o, int ld_q, int ld_o,
    const uint32_t* __restrict__ block_tables, int max_blocks, const uint32_t* __restrict__ cu_q,
    const uint32_t* __restrict__ context_lens, int total_q, int num_blocks, int hq, int hk, float scale) {
    paged_prefill<128>(q, k_cache, v_cache, o, ld_q, ld_o, block_tables, max_blocks, cu_q, context_lens, total_q,
                       num_blocks, hq, hk, scale);
}

// flash_attn_fwd_v2_hd{64,128}_bf16 and flash_attn_fwd_v2_causal_hd{64,128}_bf16: the same contracts, arguments
// and results (same per-row arithmetic) as the v1 kernels above, with blocks of 4 warps and 64 query rows:
// grid (ceil(tq / 64), hq, batch), block 128, dynamic shared memory smem_bytes<D, kWarpsV2>() (40 KiB for D 64,
// 80 KiB for D 128). Launch bounds ask for 4 (D 64) or 2 (D 128) resident blocks per SM.
extern "C" __global__ void __launch_bounds__(32 * kWarpsV2, kMinBlocksV2Hd64)
    flash_attn_fwd_v2_hd64_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int ld_q,
                                int ld_k, int ld_v, int ld_o, int tq, int tk, int hq, int hk, float scale) {
    fwd<64, false, kWarpsV2>(q, k, v, o, ld_q, ld_k, ld_v, ld_o, tq, tk, hq, hk, 0, scale);
}

extern "C" __global__ void __launch_bounds__(32 * kWarpsV2, kMinBlocksV2Hd128)
    flash_attn_fwd_v2_hd128_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                 const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int ld_q,
                                 int ld_k, int ld_v, int ld_o, int tq, int tk, int hq, int hk, float scale) {
    fwd<128, false, kWarpsV2>(q, k, v, o, ld_q, ld_k, ld_v, ld_o, tq, tk, hq, hk, 0, scale);
}

extern "C" __global__ void __launch_bounds__(32 * kWarpsV2, kMinBlocksV2Hd64)
    flash_attn_fwd_v2_causal_hd64_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                       const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int ld_q,
                                       int ld_k, int ld_v, int ld_o, int tq, int tk, int hq, int hk, int q_offset,
                                       float scale) {
    fwd<64, true, kWarpsV2>(q, k, v, o, ld_q, ld_k, ld_v, ld_o, tq, tk, hq, hk, q_offset, scale);
}

extern "C" __global__ void __launch_bounds__(32 * kWarpsV2, kMinBlocksV2Hd128)
    flash_attn_fwd_v2_causal_hd128_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                        const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int ld_q,
                                        int ld_k, int ld_v, int ld_o, int tq, int tk, int hq, int hk, int q_offset,
                                        float scale) {
    fwd<128, true, kWarpsV2>(q, k, v, o, ld_q, ld_k, ld_v, ld_o, tq, tk, hq, hk, q_offset, scale);
}

// flash_attn_fwd_v3_hd64_bf16 and flash_attn_fwd_v3_causal_hd64_bf16: the v1/v2 contracts and arguments, blocks
// of 4 warps x 32 query rows: grid (ceil(tq / 128), hq, batch), block 128, dynamic shared memory
// smem_bytes<64, kWarpsV2 * kMtV3>() (48 KiB).
extern "C" __global__ void __launch_bounds__(32 * kWarpsV2, kMinBlocksV3Hd64)
    flash_attn_fwd_v3_hd64_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int ld_q,
                                int ld_k, int ld_v, int ld_o, int tq, int tk, int hq, int hk, float scale) {
    fwd<64, false, kWarpsV2, kMtV3>(q, k, v, o, ld_q, ld_k, ld_v, ld_o, tq, tk, hq, hk, 0, scale);
}

extern "C" __global__ void __launch_bounds__(32 * kWarpsV2, kMinBlocksV3Hd64)
    flash_attn_fwd_v3_causal_hd64_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                       const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int ld_q,
                                       int ld_k, int ld_v, int ld_o, int tq, int tk, int hq, int hk, int q_offset,
                                       float scale) {
    fwd<64, true, kWarpsV2, kMtV3>(q, k, v, o, ld_q, ld_k, ld_v, ld_o, tq, tk, hq, hk, q_offset, scale);
}
