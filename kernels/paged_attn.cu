// Decode attention over the paged KV cache ("flash-decoding"), and the plain write of fresh keys and values
// into the cache. Two decode versions: v2 (paged_attn_decode_v2_*, the default; described at decode_v2) and v1
// (paged_attn_decode_v1_* + paged_attn_reduce_v1_*, kept as the FACELLM_ATTN=v1 fallback; described here). The CPU twins are backend/cpu/paged_attention.rs (`paged_attention`, `write_kv`); the cache
// layout is src/kv/mod.rs: per layer, k and v of [num_blocks, kPage, hk, D] bf16.
//
// Decode has one query token per sequence, so the work is reading the cached keys and values once. Each
// block takes one partition of kPart tokens of one sequence and all query heads of one kv head (GQA: up to
// kHeads of them, so k and v are read once for the whole group), scores every token for every head into
// shared memory (fp32, prescaled by scale * log2 e), takes the partition's max and sum, and accumulates
// P·V in fp32. A sequence that fits one partition writes its output directly; longer ones write the
// partition's (max, sum, unnormalised accumulator) to an fp32 workspace and a second kernel combines them.
// The grid depends only on num_seqs and max_parts (fixed when a CUDA graph is captured); partitions past a
// sequence's context exit at once and the reduce ignores them. Only slots below the context length are read,
// so unused slots (NaN in the self-check) never reach the arithmetic.
//
// Lane layout: one token is read by D/8 lanes, each holding one 16-byte chunk (the query chunks of all kHeads
// heads stay in registers); the per-token dot products are summed with xor shuffles within those lanes.
// Minimum arch sm_80.
#include "common/common.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kPart = 256;  // tokens per partition (must equal the Rust launcher's PARTITION)
constexpr int kHeads = 8;   // query heads per block (one kv head's group, or an 8-head slice of it)
constexpr int kPage = 16;   // tokens per cache block
constexpr int kUnroll = 4;  // tokens in flight per lane
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kHeads == kWarps, "phase 2 gives each head one warp");

// Eight consecutive bf16 as floats: one 16-byte load when `vec`, else eight scalar loads.
__device__ inline void load8(const __nv_bfloat16* p, bool vec, float f[8]) {
    if (vec) {
        facellm::bf16x8_to_f32(facellm::load_bf16x8(p), f);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            f[e] = __bfloat162float(p[e]);
        }
    }
}

template <int D>
__device__ inline void decode(const __nv_bfloat16* __restrict__ q, int ld_q, const __nv_bfloat16* __restrict__ k_cache,
                              const __nv_bfloat16* __restrict__ v_cache, const uint32_t* __restrict__ block_tables,
                              int max_blocks, const uint32_t* __restrict__ context_lens, __nv_bfloat16* __restrict__ o,
                              int ld_o, float* __restrict__ ws, int num_blocks, int hq, int hk, int max_parts,
                              float scale) {
    constexpr int kTpt = D / 8;           // lanes per token
    constexpr int kTpw = 32 / kTpt;       // tokens per warp step
    constexpr int kStep = kWarps * kTpw;  // tokens per block step (phase 1)
    constexpr int kGroups = kThreads / kTpt;  // token groups (phase 3)
    __shared__ uint32_t s_blk[kPart / kPage];
    __shared__ float s_p[kHeads][kPart];
    __shared__ float s_red[kWarps][kHeads][D];
    __shared__ float s_ml[kHeads][2];

    const int seq = blockIdx.z;
    const int part = blockIdx.x;
    const int group = hq / hk;
    const int slices = (group + kHeads - 1) / kHeads;
    const int kvh = blockIdx.y / slices;
    const int slice = blockIdx.y % slices;
    const int h0 = kvh * group + slice * kHeads;  // first query head of this block
    const int nh = min(kHeads, group - slice * kHeads);
    const int ctx = static_cast<int>(context_lens[seq]);
    const int n_parts = (ctx + kPart - 1) / kPart;
    __nv_bfloat16* o_seq = o + static_cast<size_t>(seq) * ld_o + static_cast<size_t>(h0) * D;

    // An empty context (an idle batch slot) gives zeros; one longer than the table or the workspace would read
    // or write out of bounds, so it gives NaN instead.
    if (ctx == 0 || ctx > max_blocks * kPage || n_parts > max_parts) {
        if (part == 0) {
            const float fill = ctx == 0 ? 0.0f : NAN;
            for (int i = threadIdx.x; i < nh * D; i += kThreads) {
                o_seq[i] = __float2bfloat16_rn(fill);
            }
        }
        return;
    }
    if (part >= n_parts) {
        return;
    }
    const int t0 = part * kPart;
    const int n = min(kPart, ctx - t0);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int c = lane % kTpt;  // this lane's 16-byte chunk of a row (threadIdx.x % kTpt as well)
    const size_t row = static_cast<size_t>(hk) * D;
    const bool vec_cache = facellm::aligned16(k_cache) && facellm::aligned16(v_cache);
    const bool vec_q = facellm::aligned16(q) && (ld_q & 7) == 0;

    bool bad_block = false;
    if (threadIdx.x < (n + kPage - 1) / kPage) {
        const uint32_t b = block_tables[static_cast<size_t>(seq) * max_blocks + t0 / kPage + threadIdx.x];
        s_blk[threadIdx.x] = b;
        bad_block = b >= static_cast<uint32_t>(num_blocks);
    }
    float qv[kHeads][8];
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
        if (h < nh) {
            load8(q + static_cast<size_t>(seq) * ld_q + static_cast<size_t>(h0 + h) * D + 8 * c, vec_q, qv[h]);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                qv[h][e] *= scale * kLog2e;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                qv[h][e] = 0.0f;
            }
        }
    }
    // A block id past the pool poisons this partition: NaN output, or NaN (max, sum) that the reduce spreads.
    if (__syncthreads_or(bad_block)) {
        float* ws_ml = ws;
        float* ws_acc = ws + static_cast<size_t>(gridDim.z) * hq * max_parts * 2;
        for (int i = threadIdx.x; i < nh * D; i += kThreads) {
            if (n_parts == 1) {
                o_seq[i] = __float2bfloat16_rn(NAN);
            } else {
                const size_t slot = (static_cast<size_t>(seq) * hq + h0 + i / D) * max_parts + part;
                ws_acc[slot * D + i % D] = NAN;
                ws_ml[slot * 2] = NAN;
                ws_ml[slot * 2 + 1] = NAN;
            }
        }
        return;
    }

    // Token i of the partition: kv head kvh's row in cache block s_blk[i / kPage], slot i % kPage
    // (t0 is a multiple of kPage).
    auto token_ptr = [&](const __nv_bfloat16* cache, int i) {
        return cache + (static_cast<size_t>(s_blk[i / kPage]) * kPage + i % kPage) * row +
               static_cast<size_t>(kvh) * D + 8 * c;
    };

    // Phase 1: scores s_p[h][i] = q_h · k_i * scale * log2 e.
    for (int base = 0; base < n; base += kStep * kUnroll) {
        float kf[kUnroll][8];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kStep + warp * kTpw + lane / kTpt;
            if (i < n) {
                load8(token_ptr(k_cache, i), vec_cache, kf[u]);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    kf[u][e] = 0.0f;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kStep + warp * kTpw + lane / kTpt;
            float dot[kHeads];
#pragma unroll
            for (int h = 0; h < kHeads; ++h) {
                dot[h] = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    dot[h] = fmaf(qv[h][e], kf[u][e], dot[h]);
                }
            }
            // Every lane runs the shuffles (the loop bounds are block-uniform); xor offsets below kTpt stay
            // inside the token's lanes.
#pragma unroll
            for (int h = 0; h < kHeads; ++h) {
                if (h < nh) {
#pragma unroll
                    for (int off = kTpt / 2; off > 0; off /= 2) {
                        dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], off);
                    }
                }
            }
            if (i < n && c == 0) {
#pragma unroll
                for (int h = 0; h < kHeads; ++h) {
                    if (h < nh) {
                        s_p[h][i] = dot[h];
                    }
                }
            }
        }
    }
    __syncthreads();

    // Phase 2: warp h turns head h's scores into exp2(s - max) and keeps (max, sum).
    if (warp < nh) {
        float mx = -INFINITY;
        for (int i = lane; i < n; i += 32) {
            mx = fmaxf(mx, s_p[warp][i]);
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) {
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        }
        float sum = 0.0f;
        for (int i = lane; i < n; i += 32) {
            const float p = exp2f(s_p[warp][i] - mx);
            s_p[warp][i] = p;
            sum += p;
        }
        sum = facellm::warp_sum(sum);
        if (lane == 0) {
            s_ml[warp][0] = mx;
            s_ml[warp][1] = sum;
        }
    }
    __syncthreads();

    // Phase 3: acc[h] = sum_i p[h][i] v_i over this thread's tokens (token group tg, chunk c).
    const int tg = threadIdx.x / kTpt;
    float acc[kHeads][8];
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            acc[h][e] = 0.0f;
        }
    }
    for (int base = 0; base < n; base += kGroups * kUnroll) {
        float vf[kUnroll][8];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kGroups + tg;
            if (i < n) {
                load8(token_ptr(v_cache, i), vec_cache, vf[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kGroups + tg;
            if (i < n) {
#pragma unroll
                for (int h = 0; h < kHeads; ++h) {
                    if (h < nh) {
                        const float p = s_p[h][i];
#pragma unroll
                        for (int e = 0; e < 8; ++e) {
                            acc[h][e] = fmaf(p, vf[u][e], acc[h][e]);
                        }
                    }
                }
            }
        }
    }
    // Sum the token groups: first the lanes of a warp that share chunk c, then the warps through shared memory.
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
        if (h < nh) {
#pragma unroll
            for (int off = kTpt; off < 32; off *= 2) {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], off);
                }
            }
            if (lane < kTpt) {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    s_red[warp][h][8 * c + e] = acc[h][e];
                }
            }
        }
    }
    __syncthreads();

    float* ws_ml = ws;
    float* ws_acc = ws + static_cast<size_t>(gridDim.z) * hq * max_parts * 2;
    for (int i = threadIdx.x; i < nh * D; i += kThreads) {
        const int h = i / D;
        const int d = i % D;
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            a += s_red[w][h][d];
        }
        if (n_parts == 1) {
            o_seq[i] = __float2bfloat16_rn(a / s_ml[h][1]);
        } else {
            const size_t slot = (static_cast<size_t>(seq) * hq + h0 + h) * max_parts + part;
            ws_acc[slot * D + d] = a;
            if (d == 0) {
                ws_ml[slot * 2] = s_ml[h][0];
                ws_ml[slot * 2 + 1] = s_ml[h][1];
            }
        }
    }
}

template <int D>
__device__ inline void reduce(const float* __restrict__ ws, const uint32_t* __restrict__ context_lens,
                              __nv_bfloat16* __restrict__ o, int ld_o, int hq, int max_parts, int max_blocks) {
    const int seq = blockIdx.y;
    const int h = blockIdx.x;
    const int d = threadIdx.x;
    const int ctx = static_cast<int>(context_lens[seq]);
    const int n_parts = (ctx + kPart - 1) / kPart;
    // One partition was written directly; bad contexts were written as NaN by the decode kernel.
    if (n_parts <= 1 || n_parts > max_parts || ctx > max_blocks * kPage) {
        return;
    }
    const float* ws_ml = ws;
    const float* ws_acc = ws + static_cast<size_t>(gridDim.y) * hq * max_parts * 2;
    const size_t base = (static_cast<size_t>(seq) * hq + h) * max_parts;
    float m = -INFINITY;
    for (int p = 0; p < n_parts; ++p) {
        m = fmaxf(m, ws_ml[(base + p) * 2]);
    }
    float l = 0.0f;
    float a = 0.0f;
    for (int p = 0; p < n_parts; ++p) {
        const float w = exp2f(ws_ml[(base + p) * 2] - m);
        l = fmaf(ws_ml[(base + p) * 2 + 1], w, l);
        a = fmaf(ws_acc[(base + p) * D + d], w, a);
    }
    o[static_cast<size_t>(seq) * ld_o + static_cast<size_t>(h) * D + d] = __float2bfloat16_rn(a / l);
}

// ---- v2: one launch, short partitions, fused combine ---------------------------------------------------------
//
// Decode at batch 1 is latency-bound: v1 walks a 256-token partition in dependent steps and needs a second
// launch to combine partitions. v2 cuts the dependent global round trips to about four: (1) the context length,
// the first block-table entries and q are read together; (2) one chunk of kV2Chunk = 64 tokens of k and v is
// copied to shared memory with cp.async in one go; (3) the partition's (max, sum, accumulator) go to the
// workspace; (4) the last block of a (sequence, kv head slice) to finish, found with an atomic counter, combines
// the partitions and writes the output. A sequence that fits one partition writes its output directly.
//
// Block: 128 threads (4 warps), one kv head and up to kV2Heads = 8 of its query heads; warp w owns heads 2w and
// 2w + 1 end to end (scores with lanes over tokens, online softmax with warp shuffles, P·V with lanes over
// head-dim elements), so the only block barriers are around the shared k/v chunk. A partition is 64 * chunks
// tokens, chosen per sequence from its own context (not from the launch's max_context, which a CUDA graph fixes
// for every replay): enough partitions that the launch has about kV2TargetBlocks blocks, at most the grid's
// max_parts (<= kV2MaxParts = 32) and no shorter than min_part_tokens; chunks are visited with the online softmax.
// So a 300-token context in a graph captured for 32k still spreads over 5 blocks per head at batch 1, and at
// batch 64 it keeps one or two longer partitions instead of paying for many combines.
//
// Workspace (fp32 words), per sequence s at s * seq_stride, seq_stride = gridDim.y + hq * max_parts * (D + 2)
// (independent of num_seqs, so a smaller batch never overwrites a larger batch's counters):
//   [gridDim.y] u32 counters (one per kv head slice; zero before the first launch, reset to zero by the last
//   block of every launch), then (max, sum) [hq][max_parts][2], then accumulators [hq][max_parts][D].

constexpr int kV2Warps = 4;
constexpr int kV2Threads = 32 * kV2Warps;
constexpr int kV2Chunk = 64;     // tokens per shared-memory chunk (4 cache pages)
constexpr int kV2Heads = 8;      // query heads per block (two per warp)
constexpr int kV2MaxParts = 32;  // partitions per sequence at most: the combine gives each one lane
constexpr int kV2TargetBlocks = 264;  // blocks a launch aims for (two per SM of an H100; a heuristic, unmeasured)
constexpr int kV2PagesPerChunk = kV2Chunk / kPage;
static_assert(kV2Heads == 2 * kV2Warps, "each warp owns two heads");
static_assert(kV2MaxParts <= 32, "the combine holds one partition per lane");

#ifndef FACELLM_HOST_EMU
__device__ inline uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy (.cg: bypasses L1); `valid` false reads nothing and zero-fills.
__device__ inline void cp_async_16(void* smem, const void* gmem, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
                 "r"(src_bytes)
                 : "memory");
}

__device__ inline void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ inline void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif  // FACELLM_HOST_EMU

// Dynamic shared memory: k chunk [kV2Chunk][D + 8] (rows padded by 16 bytes, so lanes reading 16-byte chunks of
// consecutive rows hit distinct banks), v chunk [kV2Chunk][D], q [kV2Heads][D] fp32 (prescaled), p [kV2Heads][kV2Chunk].
template <int D>
constexpr int v2_smem_bytes() {
    return kV2Chunk * (D + 8) * 2 + kV2Chunk * D * 2 + kV2Heads * D * 4 + kV2Heads * kV2Chunk * 4;
}

template <int D>
__device__ inline void decode_v2(const __nv_bfloat16* __restrict__ q, int ld_q, const __nv_bfloat16* __restrict__ k_cache,
                              const __nv_bfloat16* __restrict__ v_cache, const uint32_t* __restrict__ block_tables,
                              int max_blocks, const uint32_t* __restrict__ context_lens, __nv_bfloat16* __restrict__ o,
                              int ld_o, float* __restrict__ ws, int num_blocks, int hq, int hk, int max_parts,
                              int min_part_tokens, float scale) {
    constexpr int kLdk = D + 8;
    constexpr int kCpr = D / 8;                           // 16-byte chunks per row
    constexpr int kCopies = kV2Chunk * kCpr / kV2Threads;     // 16-byte copies per thread per operand and chunk
    constexpr int kE = D / 32;                            // output elements per lane
    static_assert((kV2Chunk * kCpr) % kV2Threads == 0, "k/v chunk copies split evenly");
    static_assert(kPage % (kV2Threads / kCpr) == 0, "a copy step's rows stay within one page");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ int s_last;
    __nv_bfloat16* s_k = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* s_v = s_k + kV2Chunk * kLdk;
    float* s_q = reinterpret_cast<float*>(s_v + kV2Chunk * D);
    float* s_p = s_q + kV2Heads * D;

    const int seq = blockIdx.z;
    const int part = blockIdx.x;
    const int group = hq / hk;
    const int slices = (group + kV2Heads - 1) / kV2Heads;
    const int kvh = blockIdx.y / slices;
    const int slice = blockIdx.y % slices;
    const int h0 = kvh * group + slice * kV2Heads;
    const int nh = min(kV2Heads, group - slice * kV2Heads);
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const uint32_t* table = block_tables + static_cast<size_t>(seq) * max_blocks;

    // Issued together: the context length, the first table entries of this partition as it is when partitions
    // are min_part_tokens long (any index below max_blocks is readable; entries past the context are ignored
    // below) and q.
    const int ctx = static_cast<int>(context_lens[seq]);
    int t0 = part * min_part_tokens;
    uint32_t blk[kV2PagesPerChunk];
#pragma unroll
    for (int pg = 0; pg < kV2PagesPerChunk; ++pg) {
        const int idx = t0 / kPage + pg;
        blk[pg] = idx < max_blocks ? table[idx] : 0u;
    }
    const bool vec_q = facellm::aligned16(q) && (ld_q & 7) == 0;
    for (int i = tid; i < kV2Heads * kCpr; i += kV2Threads) {
        const int h = i / kCpr;
        const int c = i % kCpr;
        float f[8];
        if (h < nh) {
            load8(q + static_cast<size_t>(seq) * ld_q + static_cast<size_t>(h0 + h) * D + 8 * c, vec_q, f);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                f[e] = 0.0f;
            }
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            s_q[h * D + 8 * c + e] = f[e] * (scale * kLog2e);
        }
    }

    // This sequence's partitions: as many as bring the launch near kV2TargetBlocks, within max_parts.
    const int chunks = (ctx + kV2Chunk - 1) / kV2Chunk;
    const int per_seq = (kV2TargetBlocks + gridDim.y * gridDim.z - 1) / (gridDim.y * gridDim.z);
    const int want_parts = max(1, min(max_parts, per_seq));
    const int part_tokens = max(min_part_tokens, kV2Chunk * ((chunks + want_parts - 1) / want_parts));
    const int n_parts = (ctx + part_tokens - 1) / part_tokens;
    __nv_bfloat16* o_seq = o + static_cast<size_t>(seq) * ld_o + static_cast<size_t>(h0) * D;
    // An empty context gives zeros; one longer than the table gives NaN.
    if (ctx == 0 || ctx > max_blocks * kPage || n_parts > max_parts) {
        if (part == 0) {
            const float fill = ctx == 0 ? 0.0f : NAN;
            for (int i = tid; i < nh * D; i += kV2Threads) {
                o_seq[i] = __float2bfloat16_rn(fill);
            }
        }
        return;
    }
    if (part >= n_parts) {
        return;
    }
    if (part_tokens != min_part_tokens) {
        // Longer partitions than the prefetch assumed: read this one's first table entries again.
        t0 = part * part_tokens;
#pragma unroll
        for (int pg = 0; pg < kV2PagesPerChunk; ++pg) {
            const int idx = t0 / kPage + pg;
            blk[pg] = idx < max_blocks ? table[idx] : 0u;
        }
    }
    const int t_end = min(ctx, t0 + part_tokens);
    const size_t row = static_cast<size_t>(hk) * D;
    const bool vec_cache = facellm::aligned16(k_cache) && facellm::aligned16(v_cache);

    // Warp w: heads 2w (x = 0) and 2w + 1 (x = 1); heads >= nh have zero q and are never stored.
    const bool warp_on = 2 * warp < nh;
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.0f, 0.0f};
    float acc[2][kE];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
#pragma unroll
        for (int e = 0; e < kE; ++e) {
            acc[x][e] = 0.0f;
        }
    }
    bool bad = false;

    for (int tc = t0; tc < t_end; tc += kV2Chunk) {
        const int rows = min(kV2Chunk, t_end - tc);
        if (tc != t0) {
            __syncthreads();  // every warp is done with the previous chunk's k, v and p
#pragma unroll
            for (int pg = 0; pg < kV2PagesPerChunk; ++pg) {
                const int idx = tc / kPage + pg;
                blk[pg] = idx < max_blocks ? table[idx] : 0u;
            }
        }
        // Copy rows [0, rows) of k and v; rows past them are zero-filled. A table entry past the pool (for a
        // page holding tokens of the context) poisons the partition and is not read.
#pragma unroll
        for (int j = 0; j < kCopies; ++j) {
            const int i = tid + j * kV2Threads;
            const int r = i / kCpr;
            const int c = i % kCpr;
            // r / kPage, known at compile time (rows per copy step divide the page), keeps blk in registers.
            const uint32_t b = blk[(j * (kV2Threads / kCpr)) / kPage];
            bool ok = r < rows;
            if (ok && b >= static_cast<uint32_t>(num_blocks)) {
                bad = true;
                ok = false;
            }
            // An unread row still names a mapped address: block 0 (the pool is never empty).
            const size_t off = (static_cast<size_t>(ok ? b : 0u) * kPage + r % kPage) * row +
                               static_cast<size_t>(kvh) * D + 8 * c;
            __nv_bfloat16* dk = s_k + r * kLdk + 8 * c;
            __nv_bfloat16* dv = s_v + r * D + 8 * c;
            if (vec_cache) {
                cp_async_16(dk, k_cache + off, ok);
                cp_async_16(dv, v_cache + off, ok);
            } else {
                float fk[8];
                float fv[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    fk[e] = ok ? __bfloat162float(k_cache[off + e]) : 0.0f;
                    fv[e] = ok ? __bfloat162float(v_cache[off + e]) : 0.0f;
                }
                facellm::store_bf16x8(dk, facellm::f32_to_bf16x8(fk));
                facellm::store_bf16x8(dv, facellm::f32_to_bf16x8(fv));
            }
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        if (warp_on) {
            // Scores of tokens lane and lane + 32 for both heads.
            float s[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
            const float* qa = s_q + (2 * warp) * D;
            const float* qb = qa + D;
#pragma unroll 4
            for (int c = 0; c < kCpr; ++c) {
                float k0[8];
                float k1[8];
                facellm::bf16x8_to_f32(facellm::load_bf16x8(s_k + lane * kLdk + 8 * c), k0);
                facellm::bf16x8_to_f32(facellm::load_bf16x8(s_k + (lane + 32) * kLdk + 8 * c), k1);
                const float4 a0 = *reinterpret_cast<const float4*>(qa + 8 * c);
                const float4 a1 = *reinterpret_cast<const float4*>(qa + 8 * c + 4);
                const float4 b0 = *reinterpret_cast<const float4*>(qb + 8 * c);
                const float4 b1 = *reinterpret_cast<const float4*>(qb + 8 * c + 4);
                const float qav[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                const float qbv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    s[0][0] = fmaf(qav[e], k0[e], s[0][0]);
                    s[0][1] = fmaf(qav[e], k1[e], s[0][1]);
                    s[1][0] = fmaf(qbv[e], k0[e], s[1][0]);
                    s[1][1] = fmaf(qbv[e], k1[e], s[1][1]);
                }
            }
            // Online softmax per head over this chunk (rows >= 1, so the chunk max is finite).
#pragma unroll
            for (int x = 0; x < 2; ++x) {
                const float v0 = lane < rows ? s[x][0] : -INFINITY;
                const float v1 = lane + 32 < rows ? s[x][1] : -INFINITY;
                float cm = fmaxf(v0, v1);
#pragma unroll
                for (int off = 16; off > 0; off /= 2) {
                    cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, off));
                }
                const float m_new = fmaxf(m[x], cm);
                const float alpha = exp2f(m[x] - m_new);  // 0 on the first chunk (m = -inf)
                const float p0 = exp2f(v0 - m_new);
                const float p1 = exp2f(v1 - m_new);
                l[x] = l[x] * alpha + facellm::warp_sum(p0 + p1);
                m[x] = m_new;
#pragma unroll
                for (int e = 0; e < kE; ++e) {
                    acc[x][e] *= alpha;
                }
                s_p[(2 * warp + x) * kV2Chunk + lane] = p0;
                s_p[(2 * warp + x) * kV2Chunk + lane + 32] = p1;
            }
            __syncwarp();
            // acc[x][e] += sum_r p[x][r] v[r][kE * lane + e]; rows past `rows` are zero with p = 0.
            const float* pa = s_p + (2 * warp) * kV2Chunk;
            const float* pb = pa + kV2Chunk;
#pragma unroll 4
            for (int r = 0; r < rows; ++r) {
                float vv[kE];
                const __nv_bfloat16* vp = s_v + r * D + kE * lane;
                if constexpr (kE == 2) {
                    const float2 f2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(vp));
                    vv[0] = f2.x;
                    vv[1] = f2.y;
                } else {
                    const uint2 u = *reinterpret_cast<const uint2*>(vp);
                    const float2 f0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
                    const float2 f1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
                    vv[0] = f0.x;
                    vv[1] = f0.y;
                    vv[2] = f1.x;
                    vv[3] = f1.y;
                }
                const float wa = pa[r];
                const float wb = pb[r];
#pragma unroll
                for (int e = 0; e < kE; ++e) {
                    acc[0][e] = fmaf(wa, vv[e], acc[0][e]);
                    acc[1][e] = fmaf(wb, vv[e], acc[1][e]);
                }
            }
        }
    }
    // Any bad table entry of the partition, seen by any thread, poisons all of its heads.
    bad = __syncthreads_or(bad);

    if (n_parts == 1) {
#pragma unroll
        for (int x = 0; x < 2; ++x) {
            if (2 * warp + x < nh) {
#pragma unroll
                for (int e = 0; e < kE; ++e) {
                    o_seq[(2 * warp + x) * D + kE * lane + e] = __float2bfloat16_rn(bad ? NAN : acc[x][e] / l[x]);
                }
            }
        }
        return;
    }

    // Several partitions: store this one's partials, then the last block to finish combines them.
    const size_t seq_stride = gridDim.y + static_cast<size_t>(hq) * max_parts * (D + 2);
    float* w_seq = ws + seq * seq_stride;
    uint32_t* counter = reinterpret_cast<uint32_t*>(w_seq) + blockIdx.y;
    float* w_ml = w_seq + gridDim.y;
    float* w_acc = w_ml + static_cast<size_t>(hq) * max_parts * 2;
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        const int h = 2 * warp + x;
        if (h < nh) {
            const size_t slot = static_cast<size_t>(h0 + h) * max_parts + part;
#pragma unroll
            for (int e = 0; e < kE; ++e) {
                w_acc[slot * D + kE * lane + e] = bad ? NAN : acc[x][e];
            }
            if (lane == 0) {
                w_ml[slot * 2] = bad ? NAN : m[x];
                w_ml[slot * 2 + 1] = bad ? NAN : l[x];
            }
        }
    }
    __threadfence();  // partials visible device-wide before the counter moves
    __syncthreads();
    if (tid == 0) {
        s_last = atomicAdd(counter, 1u) == static_cast<uint32_t>(n_parts - 1);
    }
    __syncthreads();
    if (!s_last) {
        return;
    }
    __threadfence();
    // o = sum_p acc_p 2^(m_p - M) / sum_p l_p 2^(m_p - M); lane p holds partition p's weight. A NaN partial
    // (bad block) makes its weight, hence the output, NaN (fmaxf skips it in M).
#pragma unroll
    for (int x = 0; x < 2; ++x) {
        const int h = 2 * warp + x;
        if (2 * warp < nh) {  // warp-uniform: every lane of an active warp takes the shuffles
            const size_t slot0 = static_cast<size_t>(h0 + min(h, nh - 1)) * max_parts;
            const float mp = lane < n_parts ? __ldcg(w_ml + (slot0 + lane) * 2) : -INFINITY;
            const float lp = lane < n_parts ? __ldcg(w_ml + (slot0 + lane) * 2 + 1) : 0.0f;
            float mx = mp;
#pragma unroll
            for (int off = 16; off > 0; off /= 2) {
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            }
            const float wp = lane < n_parts ? exp2f(mp - mx) : 0.0f;
            const float lsum = facellm::warp_sum(lp * wp);
            float a[kE];
#pragma unroll
            for (int e = 0; e < kE; ++e) {
                a[e] = 0.0f;
            }
#pragma unroll 4
            for (int p = 0; p < n_parts; ++p) {
                const float w = __shfl_sync(0xffffffffu, wp, p);
#pragma unroll
                for (int e = 0; e < kE; ++e) {
                    a[e] = fmaf(w, __ldcg(w_acc + (slot0 + p) * D + kE * lane + e), a[e]);
                }
            }
            if (h < nh) {
#pragma unroll
                for (int e = 0; e < kE; ++e) {
                    o_seq[h * D + kE * lane + e] = __float2bfloat16_rn(a[e] / lsum);
                }
            }
        }
    }
    if (tid == 0) {
        *counter = 0u;  // ready for the next launch (or graph replay)
    }
}


}  // namespace

// paged_attn_decode_v1_hd{64,128}_bf16 (v1, kept as the FACELLM_ATTN=v1 fallback): one query token per sequence against its cached context.
//   q: [num_seqs, >= hq*D] rows of ld_q (head j at column j*D); scale applied here
//   k_cache, v_cache: [num_blocks, 16, hk, D] bf16
//   block_tables: [num_seqs, max_blocks] u32; context_lens: [num_seqs] u32 (tokens, the new one included)
//   o: [num_seqs, >= hq*D] rows of ld_o
//   ws: fp32 workspace, [num_seqs, hq, max_parts, 2] (max, sum) then [num_seqs, hq, max_parts, D]
//       (unused when max_parts == 1)
// Device-side metadata is checked: context 0 gives zeros (an idle batch slot); a context longer than the table
// or than max_parts partitions, or a table entry >= num_blocks, gives NaN.
// Grid (max_parts, hk * ceil((hq/hk) / 8), num_seqs), block 256, static shared memory
// 64 + 8*256*4 + 8*8*D*4 + 64 bytes (24.1 KiB for D 64, 40.1 KiB for D 128). Arch sm_80.
extern "C" __global__ void __launch_bounds__(kThreads)
    paged_attn_decode_v1_hd64_bf16(const __nv_bfloat16* __restrict__ q, int ld_q, const __nv_bfloat16* __restrict__ k_cache,
                                const __nv_bfloat16* __restrict__ v_cache, const uint32_t* __restrict__ block_tables,
                                int max_blocks, const uint32_t* __restrict__ context_lens, __nv_bfloat16* __restrict__ o,
                                int ld_o, float* __restrict__ ws, int num_blocks, int hq, int hk, int max_parts,
                                float scale) {
    decode<64>(q, ld_q, k_cache, v_cache, block_tables, max_blocks, context_lens, o, ld_o, ws, num_blocks, hq, hk,
               max_parts, scale);
}

extern "C" __global__ void __launch_bounds__(kThreads) paged_attn_decode_v1_hd128_bf16(
    const __nv_bfloat16* __restrict__ q, int ld_q, const __nv_bfloat16* __restrict__ k_cache,
    const __nv_bfloat16* __restrict__ v_cache, const uint32_t* __restrict__ block_tables, int max_blocks,
    const uint32_t* __restrict__ context_lens, __nv_bfloat16* __restrict__ o, int ld_o, float* __restrict__ ws,
    int num_blocks, int hq, int hk, int max_parts, float scale) {
    decode<128>(q, ld_q, k_cache, v_cache, block_tables, max_blocks, context_lens, o, ld_o, ws, num_blocks, hq, hk,
                max_parts, scale);
}

// paged_attn_reduce_v1_hd{64,128}_bf16: combines the partitions of sequences longer than one partition:
// o = sum_p acc_p 2^(m_p - M) / sum_p l_p 2^(m_p - M). ws, context_lens, o, ld_o, hq, max_parts and max_blocks
// as given to the decode kernel. Grid (hq, num_seqs), block D, no shared memory. Arch sm_80.
extern "C" __global__ void paged_attn_reduce_v1_hd64_bf16(const float* __restrict__ ws,
                                                          const uint32_t* __restrict__ context_lens,
                                                          __nv_bfloat16* __restrict__ o, int ld_o, int hq,
                                                          int max_parts, int max_blocks) {
    reduce<64>(ws, context_lens, o, ld_o, hq, max_parts, max_blocks);
}

extern "C" __global__ void paged_attn_reduce_v1_hd128_bf16(const float* __restrict__ ws,
                                                           const uint32_t* __restrict__ context_lens,
                                                           __nv_bfloat16* __restrict__ o, int ld_o, int hq,
                                                           int max_parts, int max_blocks) {
    reduce<128>(ws, context_lens, o, ld_o, hq, max_parts, max_blocks);
}

// paged_attn_decode_v2_hd{64,128}_bf16 (default): the decode above in one launch. Arguments as v1's, plus
//   max_parts: partitions per sequence in the grid, 1..=32 (a context takes at most that many)
//   min_part_tokens: the shortest partition, a positive multiple of 64
//   ws: fp32 workspace of num_seqs * (gridDim.y + hq * max_parts * (D + 2)) words, laid out per sequence as
//       described at decode_v2 (counters first; they must be zero before the first launch and are left zero);
//       unused when max_parts == 1
// Grid (max_parts, hk * ceil((hq/hk) / 8), num_seqs), block 128, dynamic shared memory v2_smem_bytes<D>()
// (21,504 bytes for D 64, 39,936 for D 128), plus 4 static bytes. Arch sm_80.
extern "C" __global__ void __launch_bounds__(kV2Threads) paged_attn_decode_v2_hd64_bf16(
    const __nv_bfloat16* __restrict__ q, int ld_q, const __nv_bfloat16* __restrict__ k_cache,
    const __nv_bfloat16* __restrict__ v_cache, const uint32_t* __restrict__ block_tables, int max_blocks,
    const uint32_t* __restrict__ context_lens, __nv_bfloat16* __restrict__ o, int ld_o, float* __restrict__ ws,
    int num_blocks, int hq, int hk, int max_parts, int min_part_tokens, float scale) {
    decode_v2<64>(q, ld_q, k_cache, v_cache, block_tables, max_blocks, context_lens, o, ld_o, ws, num_blocks, hq, hk,
                  max_parts, min_part_tokens, scale);
}

extern "C" __global__ void __launch_bounds__(kV2Threads) paged_attn_decode_v2_hd128_bf16(
    const __nv_bfloat16* __restrict__ q, int ld_q, const __nv_bfloat16* __restrict__ k_cache,
    const __nv_bfloat16* __restrict__ v_cache, const uint32_t* __restrict__ block_tables, int max_blocks,
    const uint32_t* __restrict__ context_lens, __nv_bfloat16* __restrict__ o, int ld_o, float* __restrict__ ws,
    int num_blocks, int hq, int hk, int max_parts, int min_part_tokens, float scale) {
    decode_v2<128>(q, ld_q, k_cache, v_cache, block_tables, max_blocks, context_lens, o, ld_o, ws, num_blocks, hq,
                   hk, max_parts, min_part_tokens, scale);
}

// write_kv_bf16: k_cache[slot[i]] = k[i], v_cache[slot[i]] = v[i] for every token i (vLLM's reshape_and_cache).
//   k, v: [t, row] rows of ld_k / ld_v, row = hk*D (a multiple of 8)
//   slots: [t] i32, slot = block * block_size + offset (as rope_kv.cu takes them); a negative slot (padding)
//          or one >= num_slots is skipped
//   k_cache, v_cache: [num_slots, row] bf16
// Grid (ceil(t * row / 8 / 256)), block 256: one thread per 16-byte chunk. No shared memory. Arch sm_80.
extern "C" __global__ void __launch_bounds__(256)
    write_kv_bf16(const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v, int ld_k, int ld_v,
                  const int* __restrict__ slots, __nv_bfloat16* __restrict__ k_cache,
                  __nv_bfloat16* __restrict__ v_cache, int t, int row, long long num_slots) {
    const int chunks = row / 8;
    const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= static_cast<long long>(t) * chunks) {
        return;
    }
    const int i = static_cast<int>(idx / chunks);
    const int c = static_cast<int>(idx % chunks);
    const long long slot = slots[i];  // widened: slot * row may pass 2^31
    if (slot < 0 || slot >= num_slots) {
        return;
    }
    const __nv_bfloat16* ks = k + static_cast<size_t>(i) * ld_k + 8 * c;
    const __nv_bfloat16* vs = v + static_cast<size_t>(i) * ld_v + 8 * c;
    __nv_bfloat16* kd = k_cache + static_cast<size_t>(slot) * row + 8 * c;
    __nv_bfloat16* vd = v_cache + static_cast<size_t>(slot) * row + 8 * c;
    const bool vec = facellm::aligned16(k) && facellm::aligned16(v) && facellm::aligned16(k_cache) &&
                     facellm::aligned16(v_cache) && ((ld_k | ld_v) & 7) == 0;
    if (vec) {
        facellm::store_bf16x8(kd, facellm::load_bf16x8(ks));
        facellm::store_bf16x8(vd, facellm::load_bf16x8(vs));
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            kd[e] = ks[e];
            vd[e] = vs[e];
        }
    }
}
