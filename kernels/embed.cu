// Token embedding lookup and its inverse direction for bf16 activations: `embedding_gather_bf16` copies one
// table row per token id (the twin of backend/cpu/embedding.rs's `embedding`), `scatter_rows_bf16` writes
// rows of a source into chosen rows of a destination (the projected image features placed at the
// `<IMG_CONTEXT>` positions, MODEL_SPEC §3.7; twin of `scatter_rows`). Both are pure copies, so they match the
// CPU exactly.
//
// Bad indices cannot be refused on the device without a host sync, so they get a defined result instead and
// set a bit in a device error word the host reads after the step: an id >= vocab yields a row of zeros
// (kErrBadTokenId), a destination row outside [0, t) is skipped (kErrBadScatterRow).
//
// One block per output (gather) or source (scatter) row; threads stride over the row in 16-byte vectors when
// d % 8 == 0 and both base pointers are 16-byte aligned (then every row is), else element by element.
#include "common/common.cuh"

using facellm::Bf16x8;

// embedding_gather_bf16: out[i, :] = table[ids[i], :], or zeros when ids[i] >= vocab.
//   ids:   [t] u32
//   table: [vocab, d] bf16 row-major
//   out:   [t, d] bf16 row-major
//   err:   [1] u32 error word (atomicOr kErrBadTokenId)
// Grid (t, 1, 1), block (threads, 1, 1), any multiple of 32. No shared memory. Minimum arch sm_80.
extern "C" __global__ void embedding_gather_bf16(const unsigned* __restrict__ ids,
                                                 const __nv_bfloat16* __restrict__ table,
                                                 __nv_bfloat16* __restrict__ out, int vocab, int d,
                                                 unsigned* __restrict__ err) {
    const unsigned id = ids[blockIdx.x];
    const bool ok = id < static_cast<unsigned>(vocab);
    if (!ok && threadIdx.x == 0) {
        atomicOr(err, facellm::kErrBadTokenId);
    }
    const __nv_bfloat16* src = table + static_cast<size_t>(ok ? id : 0u) * d;
    __nv_bfloat16* dst = out + static_cast<size_t>(blockIdx.x) * d;
    if (d % 8 == 0 && facellm::aligned16(table) && facellm::aligned16(out)) {
        Bf16x8 zero;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            zero.h[j] = __float2bfloat162_rn(0.0f);
        }
        for (int v = threadIdx.x; v < d / 8; v += blockDim.x) {
            facellm::store_bf16x8(dst + 8 * v, ok ? facellm::load_bf16x8(src + 8 * v) : zero);
        }
    } else {
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            dst[i] = ok ? src[i] : __float2bfloat16_rn(0.0f);
        }
    }
}

// scatter_rows_bf16: dst[rows[i], :] = src[i, :] for every i; a row outside [0, t) is skipped. Rows must be
// distinct (two writes to one row race).
//   rows: [k] i32
//   src:  [k, d] bf16 row-major
//   dst:  [t, d] bf16 row-major, must not overlap src
//   err:  [1] u32 error word (atomicOr kErrBadScatterRow)
// Grid (k, 1, 1), block (threads, 1, 1), any multiple of 32. No shared memory. Minimum arch sm_80.
extern "C" __global__ void scatter_rows_bf16(const int* __restrict__ rows, const __nv_bfloat16* __restrict__ src,
                                             __nv_bfloat16* __restrict__ dst, int t, int d,
                                             unsigned* __restrict__ err) {
    const int r = rows[blockIdx.x];
    if (r < 0 || r >= t) {
        if (threadIdx.x == 0) {
            atomicOr(err, facellm::kErrBadScatterRow);
        }
        return;
    }
    const __nv_bfloat16* s = src + static_cast<size_t>(blockIdx.x) * d;
    __nv_bfloat16* o = dst + static_cast<size_t>(r) * d;
    if (d % 8 == 0 && facellm::aligned16(src) && facellm::aligned16(dst)) {
        for (int v = threadIdx.x; v < d / 8; v += blockDim.x) {
            facellm::store_bf16x8(o + 8 * v, facellm::load_bf16x8(s + 8 * v));
        }
    } else {
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            o[i] = s[i];
        }
    }
}
