// Choosing the next token on the device: `argmax_rows` (greedy, the InternVL3 default) and `sample_rows`
// (temperature, top-k, top-p, one seeded draw), one block per row of logits, so a whole batch of sequences
// is decided by one launch that a CUDA graph can replay: every per-step value (temperature, top_k, top_p, seed,
// step counter) is read from device arrays, nothing is synchronised with the host.
//
// Semantics follow HF `generate`'s warpers in their order, as the CPU Sampler (backend/cpu/sampling.rs) does:
// x = logits / temperature; top-k keeps every token whose x is >= the k-th largest x (ties at the boundary
// kept); top-p keeps the smallest set of most likely tokens (ties broken by lower index) whose probability
// mass is >= top_p, i.e. it drops tokens in ascending order while the dropped mass stays <= 1 - top_p, always
// keeping the most likely one; the draw walks ids in increasing order and returns the first whose cumulative
// mass exceeds u * kept_mass. temperature <= 0 (or NaN) means greedy, top_k <= 0 or >= vocab disables
// top-k, top_p >= 1 (or NaN) disables top-p.
//
// Exactness: probabilities are fixed-point integers, w_i = trunc(exp_det(x_i - max) * 2^40), where exp_det is
// a fixed sequence of IEEE fma/mul operations (Cody-Waite reduction, degree-7 Taylor polynomial) that the Rust
// twin (backend/cuda/sampling.rs) repeats bit for bit. Every mass, threshold and draw is then integer
// arithmetic, so the GPU's result does not depend on summation order and the twin reproduces every id
// exactly. Tokens whose probability is below 2^-40 of the most likely one's get weight 0 (never drawn).
// The uniform number is u = splitmix64 output number `step + 1` of the stream seeded with `seed`
// (z = seed + (step + 1) * 0x9E3779B97F4A7C15, then the SplitMix64 finaliser), scaled to the kept mass as
// U = floor(z * kept / 2^64).
//
// Algorithm per row (block of 1024 threads). Pass A: the maximum of x and its first index (greedy rows stop
// here). With top-k or top-p, the fast path (sample_fast) takes two more passes: a coarse histogram over
// bins of the distance below the maximum, which bounds a set of largest keys that surely holds every token
// the filters can keep, and a compaction of that set into shared memory (at most 2048 tokens), where it is
// sorted, cut and drawn from. When the set does not fit (a top-k in the thousands, a flat distribution under
// top-p, thousands of ties at the boundary), the global path runs instead: for top-k a 4-pass radix select
// of the k-th largest key over 8-bit digits of an order-preserving u32 key (counts), one pass for the total
// mass, for top-p a 4-pass radix select weighted by mass, an index cut among tokens tied at the top-p
// boundary, and one pass plus a warp- and lane-level refinement for the draw (the only path of plain
// temperature sampling). Both paths compute the same integers, so which one ran never changes the id.
// Radix histogram updates are warp-aggregated (__match_any_sync, then one leader per distinct digit adds
// __popc or a __reduce_add_sync sum); counts go to one u32 histogram (native shared atomics), masses to
// per-warp-pair u64 copies merged after the pass (u64 shared atomics are CAS loops on sm_90). No global
// workspace. Minimum arch sm_80 (redux.sync).
#include "common/common.cuh"

namespace {

using u64 = unsigned long long;
using u32 = unsigned int;

constexpr u32 kFull = 0xffffffffu;
constexpr int kThreads = 1024;
// Weight of the most likely token; every weight is <= this, so 20-bit halves of a weight sum exactly in u32.
constexpr float kWeightScale = 1099511627776.0f;  // 2^40
constexpr u64 kWeightMax = 1ull << 40;

// ---- order-preserving keys -------------------------------------------------------------------------------

// Monotone map of floats to u32: larger float, larger key. -0 maps to +0 (they compare equal, so the first
// index must win between them) and every NaN to the largest key (torch.argmax treats NaN as the maximum).
__device__ inline u32 order_key(float v) {
    if (isnan(v)) {
        return 0xffffffffu;
    }
    u32 b = __float_as_uint(v);
    if (b == 0x80000000u) {
        b = 0;
    }
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ inline float key_to_float(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// (key, index) packed so that one u64 max keeps the largest key and, among equal keys, the smallest index.
__device__ inline u64 pack_key_index(u32 key, int i) {
    return (static_cast<u64>(key) << 32) | static_cast<u64>(0xffffffffu - static_cast<u32>(i));
}

__device__ inline int unpack_index(u64 packed) {
    return static_cast<int>(0xffffffffu - static_cast<u32>(packed & 0xffffffffull));
}

// ---- the deterministic exponential and the fixed-point weight ---------------------------------------------

// exp(y) for y in [-32, 0] from explicit round-to-nearest fma/mul only (no contraction choices left to the
// compiler), so the Rust twin's f32::mul_add sequence gives the same bits.
__device__ inline float exp_det(float y) {
    const float n = floorf(__fmaf_rn(y, __uint_as_float(0x3fb8aa3bu), 0.5f));  // round(y * log2(e))
    float r = __fmaf_rn(-n, __uint_as_float(0x3f317200u), y);                  // y - n * ln2_hi (exact product)
    r = __fmaf_rn(-n, __uint_as_float(0x35bfbe8eu), r);                        // - n * ln2_lo
    float p = __uint_as_float(0x39500d01u);                                    // 1/5040
    p = __fmaf_rn(p, r, __uint_as_float(0x3ab60b61u));                         // 1/720
    p = __fmaf_rn(p, r, __uint_as_float(0x3c088889u));                         // 1/120
    p = __fmaf_rn(p, r, __uint_as_float(0x3d2aaaabu));                         // 1/24
    p = __fmaf_rn(p, r, __uint_as_float(0x3e2aaaabu));                         // 1/6
    p = __fmaf_rn(p, r, 0.5f);
    p = __fmaf_rn(p, r, 1.0f);
    p = __fmaf_rn(p, r, 1.0f);
    const float scale = __uint_as_float(static_cast<u32>(static_cast<int>(n) + 127) << 23);  // 2^n, n >= -47
    return __fmul_rn(p, scale);
}

// Fixed-point probability of `x` relative to the row maximum `m` (weight of the maximum: 2^40).
__device__ inline u64 weight(float x, float m) {
    const float y = __fsub_rn(x, m);
    if (!(y >= -32.0f)) {  // also -inf and NaN
        return 0;
    }
    const u64 w = __float2ull_rz(__fmul_rn(exp_det(y), kWeightScale));
    return w < kWeightMax ? w : kWeightMax;
}

// Output number `step + 1` of SplitMix64 seeded with `seed`.
__device__ inline u64 splitmix64(u64 seed, u64 step) {
    u64 z = seed + (step + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// ---- warp and block reductions over u64 --------------------------------------------------------------------

__device__ inline u64 warp_max_u64(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u64 t = __shfl_xor_sync(kFull, v, o);
        v = t > v ? t : v;
    }
    return v;
}

__device__ inline u64 warp_sum_u64(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(kFull, v, o);
    }
    return v;
}

// Inclusive prefix sum, lane 0 first.
__device__ inline u64 warp_scan_u64(u64 v) {
    const int lane = threadIdx.x % facellm::kWarp;
#pragma unroll
    for (int o = 1; o < facellm::kWarp; o <<= 1) {
        const u64 t = __shfl_up_sync(kFull, v, o);
        if (lane >= o) {
            v += t;
        }
    }
    return v;
}

// Block-wide max / sum returned to every thread; `scratch` holds 32 u64. blockDim.x is a multiple of 32.
// The trailing barrier lets the caller reuse `scratch` at once.
__device__ inline u64 block_max_u64(u64 v, u64* scratch) {
    const int lane = threadIdx.x % facellm::kWarp;
    const int warp = threadIdx.x / facellm::kWarp;
    v = warp_max_u64(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x / facellm::kWarp) ? scratch[lane] : 0;
    v = warp_max_u64(v);
    __syncthreads();
    return v;
}

__device__ inline u64 block_sum_u64(u64 v, u64* scratch) {
    const int lane = threadIdx.x % facellm::kWarp;
    const int warp = threadIdx.x / facellm::kWarp;
    v = warp_sum_u64(v);
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    v = lane < static_cast<int>(blockDim.x / facellm::kWarp) ? scratch[lane] : 0;
    v = warp_sum_u64(v);
    __syncthreads();
    return v;
}

// ---- reading a row -------------------------------------------------------------------------------------

template <typename T>
struct Row;

template <>
struct Row<float> {
    static constexpr int kVec = 4;
    using Vec = float4;
    __device__ static float load1(const float* p) { return *p; }
    __device__ static void widen(const Vec& v, float out[4]) {
        out[0] = v.x;
        out[1] = v.y;
        out[2] = v.z;
        out[3] = v.w;
    }
};

template <>
struct Row<__nv_bfloat16> {
    static constexpr int kVec = 8;
    using Vec = facellm::Bf16x8;
    __device__ static float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
    __device__ static void widen(const Vec& v, float out[8]) { facellm::bf16x8_to_f32(v, out); }
};

// Calls f(i, value, active) for every element of row[0, n) in some order, with 16-byte loads for the aligned
// body. Every lane of every warp makes the same number of calls (inactive ones with active = false), so `f`
// may use full-warp collectives. kUnroll vectors per thread are loaded before any is processed.
template <typename T, int kUnroll, typename F>
__device__ inline void scan_row(const T* __restrict__ row, int n, F&& f) {
    using R = Row<T>;
    constexpr int W = R::kVec;
    const int tid = threadIdx.x;
    const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(row) & 15u) / sizeof(T));
    const int head = min(n, mis == 0 ? 0 : W - mis);
    if (head > 0) {
        const bool a = tid < head;
        f(tid, a ? R::load1(row + tid) : 0.0f, a);
    }
    const int nvec = (n - head) / W;
    const typename R::Vec* body = reinterpret_cast<const typename R::Vec*>(row + head);
    const int stride = static_cast<int>(blockDim.x);
    for (int base = 0; base < nvec; base += kUnroll * stride) {
        float v[kUnroll][W];
        bool a[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int j = base + u * stride + tid;
            a[u] = j < nvec;
            if (a[u]) {
                R::widen(body[j], v[u]);
            } else {
#pragma unroll
                for (int e = 0; e < W; ++e) {
                    v[u][e] = 0.0f;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int j = base + u * stride + tid;
#pragma unroll
            for (int e = 0; e < W; ++e) {
                f(head + j * W + e, v[u][e], a[u]);
            }
        }
    }
    const int start = head + nvec * W;
    const int rem = n - start;
    if (rem > 0) {
        const bool a = tid < rem;
        f(start + tid, a ? R::load1(row + start + tid) : 0.0f, a);
    }
}

// ---- selection --------------------------------------------------------------------------------------------

// Mass histograms are private to pairs of warps (2 KiB each): a shared-memory u64 atomicAdd is a CAS loop
// on sm_90 (ATOMS.CAST.SPIN.64), and the first radix pass sends nearly every element to the few bins of the
// logits' exponent range, so one shared histogram would serialise all 32 warps on a handful of addresses.
constexpr int kMassCopies = 16;

// The fast path (see sample_fast) keeps at most this many candidate tokens in shared memory.
constexpr int kCap = 2048;
// Coarse bins of the fast path: 8 per nat of distance below the row maximum (bin 255 collects the rest).
constexpr float kBinsPerNat = 8.0f;
// Coarse masses are w >> kCoarseShift (<= 2^12), so a warp pair's u32 bin cannot overflow for vocab <= 2^23.
constexpr int kCoarseShift = 28;

struct Shared {
    u64 hist[256];   // the merged histogram of one radix pass
    u32 count[256];  // count passes (native 32-bit atomics)
    u64 scratch[32];
    // radix_select's choice of one pass
    u64 sel_above;
    u64 sel_at;
    u32 sel_digit;
    // find_cumulative's state
    u64 find_base;
    u64 find_target;
    int find_warp;
    int find_result;
    int cand_n;
    union {
        u64 mass[kMassCopies][256];    // radix mass passes, per warp pair
        u32 coarse[kMassCopies][256];  // fast path, coarse masses per warp pair
        struct {
            u64 cand[kCap];  // packed (key, index), then (index, sorted position)
            u64 w[kCap];     // weight of each sorted position
        } fast;
    } u;
};

// Adds every lane's contribution (digit 256 = none) to a histogram: one leader lane per distinct digit adds
// the count of its group (kMass false: `count`, u32) or the sum of its group's weights (kMass true: the warp
// pair's `mass` copy; w <= 2^40, so 20-bit halves sum exactly in u32 over 32 lanes). All 32 lanes must call it
// together; a warp where no lane contributes skips the collectives.
template <bool kMass>
__device__ inline void grouped_add(Shared& sh, u32 digit, u64 w) {
    if (!__any_sync(kFull, digit < 256)) {
        return;
    }
    const u32 group = __match_any_sync(kFull, digit);
    const int lane = threadIdx.x % facellm::kWarp;
    const bool leader = digit < 256 && lane == __ffs(group) - 1;
    if (kMass) {
        const u32 hi = __reduce_add_sync(group, static_cast<u32>(w >> 20));
        const u32 lo = __reduce_add_sync(group, static_cast<u32>(w & 0xfffffull));
        if (leader) {
            const int copy = (threadIdx.x / facellm::kWarp) % kMassCopies;
            atomicAdd(&sh.u.mass[copy][digit], (static_cast<u64>(hi) << 20) + lo);
        }
    } else if (leader) {
        atomicAdd(&sh.count[digit], static_cast<u32>(__popc(group)));
    }
}

struct Selected {
    u32 key;    // the selected key K
    u64 above;  // mass of keys > K
    u64 at;     // mass of keys == K
};

// The key K with mass{key > K} < need <= mass{key >= K}, where the mass of element i is wfn(i, x, key)
// (0 for elements that do not take part; kMass false: every taking part element counts 1, whatever wfn
// returns). Requires 1 <= need <= total mass. Four passes over the row, one per 8-bit digit of the key, most
// significant first.
template <bool kMass, typename T, typename X, typename Wf>
__device__ Selected radix_select(const T* row, int n, X xval, u64 need, Wf wfn, Shared& sh) {
    const int tid = threadIdx.x;
    const int lane = tid % facellm::kWarp;
    u32 prefix = 0;
    u32 mask = 0;
    u64 above = 0;
    u64 at = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        if (kMass) {
            for (int b = tid; b < kMassCopies * 256; b += blockDim.x) {
                sh.u.mass[b / 256][b % 256] = 0;
            }
        } else {
            for (int b = tid; b < 256; b += blockDim.x) {
                sh.count[b] = 0;
            }
        }
        __syncthreads();
        scan_row<T, 2>(row, n, [&](int i, float l, bool a) {
            u32 digit = 256;
            u64 w = 0;
            if (a) {
                const float x = xval(l);
                const u32 key = order_key(x);
                if ((key & mask) == prefix) {
                    w = wfn(i, x, key);
                    if (w != 0) {
                        digit = (key >> shift) & 255u;
                    }
                }
            }
            grouped_add<kMass>(sh, digit, w);
        });
        __syncthreads();
        for (int b = tid; b < 256; b += blockDim.x) {
            u64 s = 0;
            if (kMass) {
#pragma unroll
                for (int c = 0; c < kMassCopies; ++c) {
                    s += sh.u.mass[c][b];
                }
            } else {
                s = sh.count[b];
            }
            sh.hist[b] = s;
        }
        __syncthreads();
        if (tid < facellm::kWarp) {
            // Lane l holds bins 255 - 8l down to 248 - 8l; scanning lanes in order scans bins from the top.
            u64 s = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                s += sh.hist[255 - 8 * lane - j];
            }
            const u64 incl = warp_scan_u64(s);
            const u64 excl = incl - s;
            const u32 hit = __ballot_sync(kFull, excl < need && need <= incl);
            // Exactly one lane hits when need <= total; otherwise fall back to the lowest bin (never expected).
            const int src = hit ? __ffs(hit) - 1 : facellm::kWarp - 1;
            if (lane == src) {
                u64 acc = excl;
                u32 d = 255u - 8u * lane - 7u;
                u64 h = sh.hist[d];
                for (int j = 0; j < 8; ++j) {
                    const u32 bin = 255u - 8u * lane - j;
                    if (acc + sh.hist[bin] >= need) {
                        d = bin;
                        h = sh.hist[bin];
                        break;
                    }
                    acc += sh.hist[bin];
                }
                sh.sel_digit = d;
                sh.sel_above = acc;
                sh.sel_at = h;
            }
        }
        __syncthreads();
        // The next pass's writes to sh.hist and sh.sel_* come after its first barrier, by which time every
        // thread has read these.
        const u32 d = sh.sel_digit;
        above += sh.sel_above;
        need -= sh.sel_above;
        at = sh.sel_at;
        prefix |= d << shift;
        mask |= 255u << shift;
    }
    return Selected{prefix, above, at};
}

// The first index i of [0, n) whose inclusive cumulative sum of f (u64 per element) reaches target(total),
// total being the sum over the whole row; `fallback` when no index does (target 0 or above the total).
// Warp segments are summed with coalesced reads, then the one warp whose segment holds the crossing splits it
// into 32 contiguous lane chunks, and the one lane whose chunk holds it walks it. f must be a pure function
// of the index (it is called up to three times per element).
template <typename F, typename G>
__device__ int find_cumulative(int n, F f, G target_of, int fallback, Shared& sh) {
    const int tid = threadIdx.x;
    const int lane = tid % facellm::kWarp;
    const int warp = tid / facellm::kWarp;
    const int nwarps = static_cast<int>(blockDim.x) / facellm::kWarp;
    const long long seg = (static_cast<long long>(n) + nwarps - 1) / nwarps;
    {
        const long long lo = min(static_cast<long long>(n), warp * seg);
        const long long hi = min(static_cast<long long>(n), lo + seg);
        u64 s = 0;
        for (long long i = lo + lane; i < hi; i += facellm::kWarp) {
            s += f(static_cast<int>(i));
        }
        s = warp_sum_u64(s);
        if (lane == 0) {
            sh.scratch[warp] = s;
        }
    }
    __syncthreads();
    if (warp == 0) {
        const u64 v = lane < nwarps ? sh.scratch[lane] : 0;
        const u64 incl = warp_scan_u64(v);
        const u64 total = __shfl_sync(kFull, incl, facellm::kWarp - 1);
        const u64 target = target_of(total);
        const u32 hit = __ballot_sync(kFull, target > 0 && incl - v < target && target <= incl);
        if (lane == 0) {
            sh.find_warp = hit ? __ffs(hit) - 1 : -1;
            sh.find_target = target;
            sh.find_result = fallback;
        }
        if (hit && lane == __ffs(hit) - 1) {
            sh.find_base = incl - v;
        }
    }
    __syncthreads();
    if (warp == sh.find_warp) {
        const long long lo = min(static_cast<long long>(n), warp * seg);
        const long long hi = min(static_cast<long long>(n), lo + seg);
        const long long sub = (hi - lo + facellm::kWarp - 1) / facellm::kWarp;
        const long long llo = min(hi, lo + lane * sub);
        const long long lhi = min(hi, llo + sub);
        u64 s = 0;
#pragma unroll 4
        for (long long i = llo; i < lhi; ++i) {
            s += f(static_cast<int>(i));
        }
        const u64 incl = warp_scan_u64(s);
        const u64 excl = incl - s;
        const u64 base = sh.find_base;
        const u64 target = sh.find_target;
        const u32 hit = __ballot_sync(kFull, base + excl < target && target <= base + incl);
        if (hit && lane == __ffs(hit) - 1) {
            u64 acc = base + excl;
            for (long long i = llo; i < lhi; ++i) {
                acc += f(static_cast<int>(i));
                if (acc >= target) {
                    sh.find_result = static_cast<int>(i);
                    break;
                }
            }
        }
    }
    __syncthreads();
    return sh.find_result;
}

// ---- the shared-memory fast path ------------------------------------------------------------------------

// Sorts a[0, size) in shared memory, size a power of two; every thread of the block takes part.
__device__ void bitonic_sort(u64* a, int size, bool descending) {
    for (int k = 2; k <= size; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < size; i += blockDim.x) {
                const int ixj = i ^ j;
                if (ixj > i) {
                    const u64 x = a[i];
                    const u64 y = a[ixj];
                    const bool ascending = ((i & k) == 0) != descending;
                    if (ascending ? x > y : x < y) {
                        a[i] = y;
                        a[ixj] = x;
                    }
                }
            }
            __syncthreads();
        }
    }
}

__device__ inline int next_pow2(int v) {
    int p = 1;
    while (p < v) {
        p <<= 1;
    }
    return p;
}

// Monotone non-increasing in x (IEEE subtraction, scaling and truncation are monotone), so a set of bins
// {bin <= b} is a set of keys {key >= K}: it never splits tokens with equal x.
__device__ inline u32 coarse_bin(float x, float m) {
    const float s = __fmul_rn(__fsub_rn(m, x), kBinsPerNat);
    return s < 255.0f ? static_cast<u32>(s) : 255u;
}

// Mass top-p must reach: total - floor((1 - top_p) * total), at least 1 (the CPU Sampler and HF drop tokens
// in ascending order while the dropped mass stays <= (1 - top_p) * total).
__device__ inline u64 top_p_need(u64 total, float top_p) {
    const u64 drop =
        __double2ull_rz(__dmul_rn(__dsub_rn(1.0, static_cast<double>(top_p)), __ull2double_rn(total)));
    return drop < total ? total - drop : 1;
}

// Warp 0: the first bin b (from 0) whose cumulative hist[0..=b] reaches need, or 255 when none does.
__device__ inline void first_bin_reaching(const u64* hist, u64 need, u32* out) {
    const int lane = threadIdx.x % facellm::kWarp;
    u64 s = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        s += hist[8 * lane + j];
    }
    const u64 incl = warp_scan_u64(s);
    const u64 excl = incl - s;
    const u32 hit = __ballot_sync(kFull, excl < need && need <= incl);
    if (hit == 0) {
        if (lane == 0) {
            *out = 255u;
        }
        return;
    }
    if (lane == __ffs(hit) - 1) {
        u64 acc = excl;
        u32 b = 8u * lane + 7u;
        for (int j = 0; j < 8; ++j) {
            acc += hist[8 * lane + j];
            if (acc >= need) {
                b = 8u * lane + j;
                break;
            }
        }
        *out = b;
    }
}

// Exactly the global path's draw when the tokens that can matter fit in shared memory, in three passes over
// the row instead of up to eleven: (B) coarse histograms over bins of the distance below the maximum (counts,
// and masses truncated to w >> 28, which never exceed the exact ones) plus the exact total mass; the first
// bin bc at which the count reaches top_k (top-k on) or the coarse mass reaches ceil(need / 2^28) (top-p
// only) bounds a set of keys {key >= K} that holds every top-k survivor, or mass >= need; (C) those
// candidates are compacted into shared memory, sorted by (key desc, index asc), weighed, cut by top-k and
// top-p, re-sorted by index and drawn from. Returns the id, or -1 when the candidates do not fit (the caller
// then runs the global path), uniformly across the block.
template <typename T, typename X>
__device__ int sample_fast(const T* __restrict__ row, int n, X xval, float m, bool use_k, int top_k, bool use_p,
                           float top_p, u64 z, Shared& sh) {
    const int tid = threadIdx.x;
    const int lane = tid % facellm::kWarp;

    // (B) coarse histograms.
    for (int b = tid; b < 256; b += blockDim.x) {
        sh.count[b] = 0;
    }
    for (int b = tid; b < kMassCopies * 256; b += blockDim.x) {
        sh.u.coarse[b / 256][b % 256] = 0;
    }
    if (tid == 0) {
        sh.cand_n = 0;
    }
    __syncthreads();
    const int copy = (tid / facellm::kWarp) % kMassCopies;
    u64 total = 0;
    scan_row<T, 2>(row, n, [&](int, float l, bool a) {
        if (a) {
            const float x = xval(l);
            const u32 b = coarse_bin(x, m);
            if (use_k) {
                atomicAdd(&sh.count[b], 1u);
            } else {
                const u64 w = weight(x, m);
                total += w;
                const u32 wc = static_cast<u32>(w >> kCoarseShift);
                atomicAdd(&sh.count[b], 1u);
                if (wc != 0) {
                    atomicAdd(&sh.u.coarse[copy][b], wc);
                }
            }
        }
    });
    total = block_sum_u64(total, sh.scratch);  // its barriers also complete the histograms
    for (int b = tid; b < 256; b += blockDim.x) {
        u64 s = 0;
        if (use_k) {
            s = sh.count[b];
        } else {
#pragma unroll
            for (int c = 0; c < kMassCopies; ++c) {
                s += sh.u.coarse[c][b];
            }
        }
        sh.hist[b] = s;
    }
    __syncthreads();
    if (tid < facellm::kWarp) {
        const u64 need = use_k ? static_cast<u64>(top_k)
                               : (top_p_need(total, top_p) + (1ull << kCoarseShift) - 1) >> kCoarseShift;
        first_bin_reaching(sh.hist, need, &sh.sel_digit);
        __syncwarp();
        const u32 bc = sh.sel_digit;
        u64 c = 0;
        for (u32 b = lane; b <= bc; b += facellm::kWarp) {
            c += sh.count[b];
        }
        c = warp_sum_u64(c);
        if (lane == 0) {
            sh.sel_above = c;
        }
    }
    __syncthreads();
    const u32 bc = sh.sel_digit;
    const u64 ncand = sh.sel_above;
    if (ncand > static_cast<u64>(kCap)) {
        return -1;
    }
    const int cnt = static_cast<int>(ncand);

    // (C) compaction of {bin <= bc}, in any order.
    u64* cand = sh.u.fast.cand;
    u64* wts = sh.u.fast.w;
    scan_row<T, 2>(row, n, [&](int i, float l, bool a) {
        bool pred = false;
        u64 item = 0;
        if (a) {
            const float x = xval(l);
            if (coarse_bin(x, m) <= bc) {
                pred = true;
                item = pack_key_index(order_key(x), i);
            }
        }
        const u32 ballot = __ballot_sync(kFull, pred);
        if (ballot != 0) {
            int base = 0;
            if (lane == 0) {
                base = atomicAdd(&sh.cand_n, __popc(ballot));
            }
            base = __shfl_sync(kFull, base, 0);
            const int at = base + __popc(ballot & ((1u << lane) - 1u));
            if (pred && at < kCap) {  // at < cnt <= kCap: pass B counted the same predicate
                cand[at] = item;
            }
        }
    });
    const int size = next_pow2(cnt);
    for (int i = cnt + tid; i < size; i += blockDim.x) {
        cand[i] = 0;  // sorts last
    }
    __syncthreads();
    bitonic_sort(cand, size, true);

    // top-k: the k-th largest key; survivors are the sorted prefix [0, kept_k).
    const u32 k_key = use_k ? static_cast<u32>(cand[top_k - 1] >> 32) : 0u;
    u64 kept_k = 0;
    for (int i = tid; i < cnt; i += blockDim.x) {
        const u32 key = static_cast<u32>(cand[i] >> 32);
        const u64 w = key >= k_key ? weight(key_to_float(key), m) : 0;
        wts[i] = w;
        kept_k += key >= k_key ? 1 : 0;
    }
    kept_k = block_sum_u64(kept_k, sh.scratch);
    int kept_end = static_cast<int>(kept_k);

    // top-p: the shortest sorted prefix whose mass reaches need (ties in index order, as sorted).
    if (use_p) {
        u64 zk = total;
        if (use_k) {
            u64 s = 0;
            for (int i = tid; i < cnt; i += blockDim.x) {
                s += wts[i];
            }
            zk = block_sum_u64(s, sh.scratch);
        }
        const u64 need = top_p_need(zk, top_p);
        const auto w_at = [=](int i) -> u64 { return wts[i]; };
        const auto target = [=](u64) { return need; };
        const int c = find_cumulative(kept_end, w_at, target, -1, sh);
        if (c < 0) {
            return -1;
        }
        kept_end = c + 1;
    }

    // The draw, over the kept prefix in index order.
    for (int i = tid; i < kept_end; i += blockDim.x) {
        cand[i] = (static_cast<u64>(unpack_index(cand[i])) << 32) | static_cast<u64>(i);
    }
    const int size2 = next_pow2(kept_end);
    for (int i = kept_end + tid; i < size2; i += blockDim.x) {
        cand[i] = ~0ull;  // sorts last
    }
    __syncthreads();
    bitonic_sort(cand, size2, false);
    const auto w_by_index = [=](int i) -> u64 { return wts[static_cast<u32>(cand[i] & 0xffffffffull)]; };
    const auto draw = [=](u64 t) { return __umul64hi(z, t) + 1; };
    const int pos = find_cumulative(kept_end, w_by_index, draw, -1, sh);
    return pos < 0 ? -1 : static_cast<int>(cand[pos] >> 32);
}

// ---- the two row kernels ---------------------------------------------------------------------------------

template <typename T>
__device__ void argmax_row(const T* __restrict__ row, int n, u32* __restrict__ out) {
    __shared__ u64 scratch[32];
    u64 best = 0;
    scan_row<T, 4>(row, n, [&](int i, float v, bool a) {
        if (a) {
            const u64 p = pack_key_index(order_key(v), i);
            best = p > best ? p : best;
        }
    });
    best = block_max_u64(best, scratch);
    if (threadIdx.x == 0) {
        *out = static_cast<u32>(unpack_index(best));
    }
}

template <typename T>
__device__ void sample_row(const T* __restrict__ row, int n, float temperature, int top_k, float top_p, u64 seed,
                           u64 step, u32* __restrict__ out) {
    __shared__ Shared sh;
    const bool greedy = !(temperature > 0.0f);
    const bool divide = !greedy && temperature != 1.0f;
    const auto xval = [=](float l) { return divide ? __fdiv_rn(l, temperature) : l; };

    // 1. The maximum of x and its first index.
    u64 best = 0;
    scan_row<T, 4>(row, n, [&](int i, float l, bool a) {
        if (a) {
            const u64 p = pack_key_index(order_key(xval(l)), i);
            best = p > best ? p : best;
        }
    });
    best = block_max_u64(best, sh.scratch);
    const u32 max_key = static_cast<u32>(best >> 32);
    const int max_index = unpack_index(best);
    const float m = key_to_float(max_key);
    if (greedy || !isfinite(m)) {
        if (threadIdx.x == 0) {
            *out = static_cast<u32>(max_index);
        }
        return;
    }

    const u64 z = splitmix64(seed, step);
    const bool use_k = top_k > 0 && top_k < n;
    const bool use_p = top_p < 1.0f;
    if (use_k || use_p) {
        const int id = sample_fast(row, n, xval, m, use_k, top_k, use_p, top_p, z, sh);
        if (id >= 0) {
            if (threadIdx.x == 0) {
                *out = static_cast<u32>(id);
            }
            return;
        }
    }

    // The global path. 2. top-k: the k-th largest key; every key >= it is kept.
    u32 k_key = 0;
    if (use_k) {
        const auto one = [](int, float, u32) -> u64 { return 1; };
        k_key = radix_select<false>(row, n, xval, static_cast<u64>(top_k), one, sh).key;
    }
    const auto kept_weight = [=](int, float x, u32 key) -> u64 { return key >= k_key ? weight(x, m) : 0; };

    // 3. top-p: the smallest prefix of (key desc, index asc) whose mass reaches `need`.
    u32 p_key = 0;             // keys above it are kept...
    u32 tie_cut = 0xffffffffu;  // ...and keys equal to it up to this index
    if (use_p) {
        u64 total = 0;
        scan_row<T, 2>(row, n, [&](int i, float l, bool a) {
            if (a) {
                const float x = xval(l);
                total += kept_weight(i, x, order_key(x));
            }
        });
        total = block_sum_u64(total, sh.scratch);
        const u64 need = top_p_need(total, top_p);
        const Selected s = radix_select<true>(row, n, xval, need, kept_weight, sh);
        p_key = s.key;
        const u64 w_tie = weight(key_to_float(p_key), m);
        if (w_tie > 0) {
            const u64 ties_needed = (need - s.above + w_tie - 1) / w_tie;
            const u64 ties = s.at / w_tie;
            if (ties_needed < ties) {
                const auto is_tie = [=](int i) -> u64 { return order_key(xval(Row<T>::load1(row + i))) == p_key; };
                const auto target = [=](u64) { return ties_needed; };
                tie_cut = static_cast<u32>(find_cumulative(n, is_tie, target, n - 1, sh));
            }
        }
    }

    // 4. The draw over the kept tokens in id order.
    const auto kept = [=](int i) -> u64 {
        const float x = xval(Row<T>::load1(row + i));
        const u32 key = order_key(x);
        const bool in = key >= k_key && (key > p_key || (key == p_key && static_cast<u32>(i) <= tie_cut));
        return in ? weight(x, m) : 0;
    };
    const auto target = [=](u64 total) { return __umul64hi(z, total) + 1; };
    const int id = find_cumulative(n, kept, target, max_index, sh);
    if (threadIdx.x == 0) {
        *out = static_cast<u32>(id);
    }
}

}  // namespace

// argmax_rows_{f32,bf16}: out[r] = the index of the largest logits[r, :], the first one on ties; NaN counts
// as the largest value (torch.argmax), -0 equals +0.
//   logits: [rows, vocab] row-major (any alignment; 16-byte loads for the aligned part of each row)
//   out:    [rows] u32
// Grid (rows, 1, 1), block (1024, 1, 1). Static shared memory: 256 bytes. Minimum arch sm_80.
extern "C" __global__ void __launch_bounds__(kThreads) argmax_rows_f32(const float* __restrict__ logits, int vocab,
                                                                     u32* __restrict__ out) {
    argmax_row(logits + static_cast<size_t>(blockIdx.x) * vocab, vocab, out + blockIdx.x);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    argmax_rows_bf16(const __nv_bfloat16* __restrict__ logits, int vocab, u32* __restrict__ out) {
    argmax_row(logits + static_cast<size_t>(blockIdx.x) * vocab, vocab, out + blockIdx.x);
}

// sample_rows_{f32,bf16}: out[r] = one draw from row r's logits under its own temperature[r], top_k[r],
// top_p[r], seed[r], step[r] (rules in the header). A row whose maximum after the temperature is not finite
// (NaN, +-inf) returns that maximum's first index, as greedy does. advance_step != 0: step[r] += 1 after the
// draw, so a replayed graph draws fresh numbers.
//   logits:      [rows, vocab] row-major, vocab <= 2^23 (so the fixed-point mass fits u64)
//   temperature: [rows] f32;  top_k: [rows] i32;  top_p: [rows] f32;  seed, step: [rows] u64
//   out:         [rows] u32
// Grid (rows, 1, 1), block (1024, 1, 1) (any multiple of 32 works; 1024 is what the launcher uses). Static
// shared memory: about 36 KiB. Minimum arch sm_80.
template <typename T>
__device__ void sample_rows(const T* __restrict__ logits, int vocab, const float* __restrict__ temperature,
                            const int* __restrict__ top_k, const float* __restrict__ top_p,
                            const u64* __restrict__ seed, u64* __restrict__ step, int advance_step,
                            u32* __restrict__ out) {
    const int r = blockIdx.x;
    const u64 s = step[r];
    sample_row(logits + static_cast<size_t>(r) * vocab, vocab, temperature[r], top_k[r], top_p[r], seed[r], s,
               out + r);
    // Every thread read step[r] before sample_row's first barrier.
    if (advance_step != 0 && threadIdx.x == 0) {
        step[r] = s + 1;
    }
}

extern "C" __global__ void __launch_bounds__(kThreads)
    sample_rows_f32(const float* __restrict__ logits, int vocab, const float* __restrict__ temperature,
                    const int* __restrict__ top_k, const float* __restrict__ top_p, const u64* __restrict__ seed,
                    u64* __restrict__ step, int advance_step, u32* __restrict__ out) {
    sample_rows(logits, vocab, temperature, top_k, top_p, seed, step, advance_step, out);
}

extern "C" __global__ void __launch_bounds__(kThreads)
    sample_rows_bf16(const __nv_bfloat16* __restrict__ logits, int vocab, const float* __restrict__ temperature,
                     const int* __restrict__ top_k, const float* __restrict__ top_p, const u64* __restrict__ seed,
                     u64* __restrict__ step, int advance_step, u32* __restrict__ out) {
    sample_rows(logits, vocab, temperature, top_k, top_p, seed, step, advance_step, out);
}
