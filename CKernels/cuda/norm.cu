/*
 * norm.cu — group norm (optionally followed by SiLU), layer norm and softmax over the last axis, as
 * ck_group_norm_f32, ck_layer_norm_f32 and ck_softmax_f32 (cpu/norm.c), and their backward ops, as
 * ck_group_norm_backward_f32, ck_layer_norm_backward_f32 and ck_softmax_backward_f32 (each next to its
 * forward; outputs overwritten, statistics recomputed from x). Statistics accumulate in f32
 * (the CPU uses f64): for group norm two passes over a group held in registers (groups ≤ 128 KB), per-chunk
 * two-pass partials merged with Chan's formula (larger groups, and groups split over several blocks when there
 * are fewer groups than SMs — the forward and the backward), or Welford/Chan merges (the general kernel);
 * two passes over a cached row for layer norm, an online (max, sum) pass for softmax. No float atomics: every
 * reduction has a fixed order, so results are deterministic.
 *
 * Dimension legend: B batch, C channels, S = H·W, G groups (C/G channels each); R rows of D.
 */
#include "internal.h"

/* ---------------------------------------------------------------------------------------------------- */
/* Group norm                                                                                            */

/* Chan's merge of two partial (count, mean, M2) summaries: (n, mean, m2) ← (n, mean, m2) ∪ (nb, mb, m2b). */
static __device__ __forceinline__ void welford_merge(float &n, float &mean, float &m2, float nb, float mb, float m2b) {
    const float nn = n + nb;
    if (nn == 0.0f) return;
    const float d = mb - mean, f = nb / nn;
    mean += d * f;
    m2 += m2b + d * d * n * f;
    n = nn;
}

/* Welford triples merged across the 32 lanes of a warp (butterfly shuffles: every lane ends with the warp's). */
static __device__ __forceinline__ void warp_welford_merge(float &cnt, float &mean, float &m2) {
    for (int o = 16; o > 0; o >>= 1) {
        const float nb = __shfl_xor_sync(PEA_FULL_MASK, cnt, o);
        const float mb = __shfl_xor_sync(PEA_FULL_MASK, mean, o);
        const float m2b = __shfl_xor_sync(PEA_FULL_MASK, m2, o);
        welford_merge(cnt, mean, m2, nb, mb, m2b);
    }
}

/* The mean and rstd = 1/sqrt(biased variance + eps) of the n values at xg, for the whole block (every thread
 * gets both; all threads of the block must call it). Thread t folds the elements t, t + blockDim, … (with vec:
 * the 4-element chunks, each loaded with one vector load and summarised before the fold) into a Welford
 * summary in registers; summaries merge across the warp with shuffles, then across warps through shared
 * memory. The group's values are read once. */
template <typename T>
static __device__ void group_stats(const T *xg, int64_t n, float eps, int vec, float &mu, float &rstd) {
    PEA_SHARED_ARRAY(float, s_n, 32);
    PEA_SHARED_ARRAY(float, s_mean, 32);
    PEA_SHARED_ARRAY(float, s_m2, 32);
    PEA_SHARED_ARRAY(float, s_stat, 2);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;

    float cnt = 0.0f, mean = 0.0f, m2 = 0.0f;
    if (vec) {
        for (int64_t q = tid; q < n / 4; q += blockDim.x) {
            float v[4];
            pea_ld4(xg + 4 * q, v);
            const float cm = 0.25f * ((v[0] + v[1]) + (v[2] + v[3]));
            float cm2 = 0.0f;
            for (int k = 0; k < 4; k++) cm2 += (v[k] - cm) * (v[k] - cm);
            welford_merge(cnt, mean, m2, 4.0f, cm, cm2);
        }
    } else {
        for (int64_t i = tid; i < n; i += blockDim.x) {
            const float v = pea_ld(xg + i);
            cnt += 1.0f;
            const float d = v - mean;
            mean += d / cnt;
            m2 += d * (v - mean);
        }
    }
    warp_welford_merge(cnt, mean, m2);
    if (lane == 0) {
        s_n[warp] = cnt;
        s_mean[warp] = mean;
        s_m2[warp] = m2;
    }
    __syncthreads();
    if (warp == 0) {
        cnt = lane < warps ? s_n[lane] : 0.0f;
        mean = lane < warps ? s_mean[lane] : 0.0f;
        m2 = lane < warps ? s_m2[lane] : 0.0f;
        warp_welford_merge(cnt, mean, m2);
        if (lane == 0) {
            s_stat[0] = mean;
            s_stat[1] = rsqrtf(m2 / (float)n + eps);
        }
    }
    __syncthreads();
    mu = s_stat[0];
    rstd = s_stat[1];
}

/* y = γ[c]·(x − mean)·rstd + β[c] (then SiLU if silu) over the group (b, g) of x [B, C, S]: the group's Cg·S
 * values are contiguous. One block per (b, g) = blockIdx.x. Pass 1 (group_stats): mean and rstd, each thread
 * folding the elements t, t + blockDim, … (or 4-element chunks with vec). Pass 2 re-reads the group (from L2)
 * with the same mapping and writes y; with vec (S a multiple of 4, x and y aligned) a chunk never straddles
 * two channels. */
template <typename T>
__global__ void group_norm_kernel(const T *x, const T *gamma, const T *beta, T *y, int64_t C, int64_t S, int64_t G,
                                  float eps, int silu, int vec) {
    const int64_t u = blockIdx.x, g = u % G, Cg = C / G, n = Cg * S;
    const T *xg = x + u * n;
    T *yg = y + u * n;
    const int tid = threadIdx.x;
    float mu, rstd;
    group_stats(xg, n, eps, vec, mu, rstd);

    if (vec) {
        for (int64_t q = tid; q < n / 4; q += blockDim.x) {
            const int64_t c = g * Cg + (4 * q) / S;
            const float scale = rstd * (gamma ? pea_ld(gamma + c) : 1.0f), shift = beta ? pea_ld(beta + c) : 0.0f;
            float v[4];
            pea_ld4(xg + 4 * q, v);
            for (int k = 0; k < 4; k++) {
                float r = (v[k] - mu) * scale + shift;
                v[k] = silu ? r / (1.0f + expf(-r)) : r;
            }
            pea_st4(yg + 4 * q, v);
        }
    } else {
        for (int64_t i = tid; i < n; i += blockDim.x) {
            const int64_t c = g * Cg + i / S;
            const float scale = rstd * (gamma ? pea_ld(gamma + c) : 1.0f), shift = beta ? pea_ld(beta + c) : 0.0f;
            float r = (pea_ld(xg + i) - mu) * scale + shift;
            pea_st(yg + i, silu ? r / (1.0f + expf(-r)) : r);
        }
    }
}

static __device__ void block_sum2(float &a, float &b);

/* (v − mean)·scale + shift (then SiLU if silu): group norm's output for a value of a channel with scale =
 * rstd·γ[c], shift = β[c] (the subtraction first, as the CPU does, so a large mean cancels exactly). */
static __device__ __forceinline__ float gn_out(float v, float mu, float scale, float shift, int silu) {
    const float r = (v - mu) * scale + shift;
    return silu ? r / (1.0f + expf(-r)) : r;
}

/* scale = rstd·γ[c] and shift = β[c] for channel c (γ = 1, β = 0 when absent). */
template <typename T>
static __device__ __forceinline__ void gn_affine(const T *gamma, const T *beta, int64_t c, float rstd, float &scale,
                                                 float &shift) {
    scale = rstd * (gamma ? pea_ld(gamma + c) : 1.0f);
    shift = beta ? pea_ld(beta + c) : 0.0f;
}

/* The mean and M2 = Σ(v − mean)² of the values a block holds as 16-byte vectors: thread t holds, in held[k],
 * vector first + t + k·blockDim.x of a range of nq vectors (those at or past nq count for nothing); count is the
 * number of values held. Two passes over the registers in f32, each ending in block_sum2's fixed-order sum;
 * every thread gets both results (all threads of the block must call it). */
template <typename T, int K>
static __device__ void gn_held_mean_m2(const uint4 (&held)[K], int64_t first, int64_t nq, float count, float &mean,
                                       float &m2) {
    constexpr int V = pea_v16<T>::N;
    float sum = 0.0f, unused = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        if (first + threadIdx.x + (int64_t)k * blockDim.x < nq) {
            float v[V];
            pea_unpack16(held[k], v, (const T *)nullptr);
            for (int j = 0; j < V; j++) sum += v[j];
        }
    }
    block_sum2(sum, unused);
    mean = sum / count;
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        if (first + threadIdx.x + (int64_t)k * blockDim.x < nq) {
            float v[V];
            pea_unpack16(held[k], v, (const T *)nullptr);
            for (int j = 0; j < V; j++) sq += (v[j] - mean) * (v[j] - mean);
        }
    }
    unused = 0.0f;
    block_sum2(sq, unused);
    m2 = sq;
}

/* Thread t's share of a chunk of 16-byte vectors starting at vector q0 of xq: vectors q0 + t, q0 + t + blockDim, …
 * (K of them) into registers, zeros past nq. */
template <int K>
static __device__ __forceinline__ void gn_hold(const uint4 *xq, int64_t q0, int64_t nq, uint4 (&held)[K]) {
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int64_t q = q0 + threadIdx.x + (int64_t)k * blockDim.x;
        held[k] = q < nq ? xq[q] : make_uint4(0u, 0u, 0u, 0u);
    }
}

/* Group norm with the group held in registers: x is read once. One block per (b, g) = blockIdx.x, whose n = Cg·S
 * values are contiguous and seen as nq = n/V 16-byte vectors (V = 4 f32 or 8 f16/bf16; S a multiple of V, so a
 * vector never straddles two channels). Thread t loads the vectors t, t + blockDim, …, t + (K−1)·blockDim
 * (K ≤ 8 compile-time, all loads issued before any use) and keeps them as raw uint4 registers; then, from the
 * held values, mean = block sum / n, var = block sum of (v − mean)² / n (two passes in f32, block_sum2's
 * fixed-order reduction), and y = (v − mean)·rstd·γ + β (then SiLU), written with 16-byte stores. */
template <typename T, int K>
__global__ void __launch_bounds__(1024) group_norm_regs_kernel(const T *x, const T *gamma, const T *beta, T *y,
                                                               int64_t C, int64_t S, int64_t G, float eps, int silu) {
    constexpr int V = pea_v16<T>::N;
    const int64_t u = blockIdx.x, g = u % G, Cg = C / G, n = Cg * S;
    const int nq = (int)(n / V), tid = threadIdx.x, threads = blockDim.x;
    const uint4 *xq = reinterpret_cast<const uint4 *>(x + u * n);
    uint4 *yq = reinterpret_cast<uint4 *>(y + u * n);
    uint4 held[K];
    gn_hold<K>(xq, 0, nq, held);
    float mu, sq;
    gn_held_mean_m2<T, K>(held, 0, nq, (float)n, mu, sq);
    const float rstd = rsqrtf(sq / (float)n + eps);
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int q = tid + k * threads;
        if (q < nq) {
            float scale, shift;
            gn_affine(gamma, beta, g * Cg + ((int64_t)q * V) / S, rstd, scale, shift);
            float v[V];
            pea_unpack16(held[k], v, (const T *)nullptr);
            for (int j = 0; j < V; j++) v[j] = gn_out(v[j], mu, scale, shift, silu);
            yq[q] = pea_pack16(v, (const T *)nullptr);
        }
    }
}

/* The split path, two kernels, for groups too big to hold in one block's registers (VAE shapes) and for too few
 * groups to fill the GPU (UNet shapes: B·G = 64 groups on 132 SMs). The n = Cg·S values of a group (b, g) are
 * cut into P chunks of K·blockDim 16-byte vectors (the host picks P, K ≤ 4 and blockDim ≤ 256 in
 * group_norm_split_plan); block L of the 1-D grid of B·G·P handles chunk p = L mod P of group u = L / P.
 * Pass 1 (group_norm_partial_kernel): the block loads its chunk into registers (thread t: vectors t,
 * t + blockDim, …, at most K; x read from DRAM once), and writes the chunk's (mean, M2 = Σ(v − mean)²) — two
 * passes over the held values, block_sum2 — to part[u·P + p]. Pass 2 (group_norm_apply_kernel) walks the chunks
 * in reverse (block L takes chunk B·G·P − 1 − L, so the chunks pass 1 read last, still in L2, are read again
 * first): the block merges the group's P partials in a fixed order (gn_merge_stats: every block of the group
 * computes identical statistics, no atomics), then normalises its chunk (16-byte loads, from L2, and stores). */
enum { GN_SPLIT_THREADS = 256, GN_SPLIT_MAX_K = 4, GN_SPLIT_MIN_CHUNK = 256 };

template <typename T, int K>
__global__ void __launch_bounds__(GN_SPLIT_THREADS) group_norm_partial_kernel(const T *x, float2 *part, int64_t n,
                                                                                int64_t P) {
    constexpr int V = pea_v16<T>::N;
    const int64_t L = blockIdx.x, u = L / P, p = L - u * P;
    const int64_t chunk_vecs = (int64_t)K * blockDim.x, nq = n / V;
    const int64_t q0 = p * chunk_vecs;
    const int64_t count = (nq - q0 < chunk_vecs ? nq - q0 : chunk_vecs) * V; /* values in this chunk */
    const uint4 *xq = reinterpret_cast<const uint4 *>(x + u * n);
    const int tid = threadIdx.x;
    uint4 held[K];
    gn_hold<K>(xq, q0, nq, held);
    float mean, m2;
    gn_held_mean_m2<T, K>(held, q0, nq, (float)count, mean, m2);
    if (tid == 0) part[L] = make_float2(mean, m2);
}

/* The mean and rstd = 1/√(M2/n + eps) of group u from its P chunk partials part[u·P + j] = (mean, M2) over chunks
 * of chunk_vecs 16-byte vectors of V values (the last one shorter) for the whole block (all threads must call
 * it). Warp 0 merges them in a fixed order — lane l folds partials l, l + 32, … with Chan's formula, then the
 * lanes fold into lane 0 in a fixed tree — so every block of the group gets identical statistics, no atomics. */
static __device__ void gn_merge_stats(const float2 *part, int64_t u, int64_t P, int64_t chunk_vecs, int64_t nq, int V,
                                      float eps, float &mu, float &rstd) {
    PEA_SHARED_ARRAY(float, s_stat, 2);
    const int tid = threadIdx.x;
    if (tid < 32) {
        float cnt = 0.0f, mean = 0.0f, m2 = 0.0f;
        for (int64_t j = tid; j < P; j += 32) {
            const int64_t left = nq - j * chunk_vecs;
            const float nb = (float)((left < chunk_vecs ? left : chunk_vecs) * V);
            const float2 pm = part[u * P + j];
            welford_merge(cnt, mean, m2, nb, pm.x, pm.y);
        }
        for (int o = 1; o < 32; o <<= 1) { /* lane l takes lane l + o's summary: lane 0 ends with all, in a fixed order */
            const float nb = __shfl_down_sync(PEA_FULL_MASK, cnt, o);
            const float mb = __shfl_down_sync(PEA_FULL_MASK, mean, o);
            const float m2b = __shfl_down_sync(PEA_FULL_MASK, m2, o);
            if (tid + o < 32) welford_merge(cnt, mean, m2, nb, mb, m2b);
        }
        if (tid == 0) {
            s_stat[0] = mean;
            s_stat[1] = rsqrtf(m2 / (float)(nq * V) + eps);
        }
    }
    __syncthreads();
    mu = s_stat[0];
    rstd = s_stat[1];
}

template <typename T, int K>
__global__ void __launch_bounds__(GN_SPLIT_THREADS) group_norm_apply_kernel(const T *x, const float2 *part,
                                                                              const T *gamma, const T *beta, T *y,
                                                                              int64_t C, int64_t S, int64_t G,
                                                                              int64_t P, float eps, int silu) {
    constexpr int V = pea_v16<T>::N;
    const int64_t L = (int64_t)gridDim.x - 1 - blockIdx.x, u = L / P, p = L - u * P;
    const int64_t g = u % G, Cg = C / G, n = Cg * S, nq = n / V;
    const int64_t chunk_vecs = (int64_t)K * blockDim.x, q0 = p * chunk_vecs;
    const int tid = threadIdx.x;
    float mu, rstd;
    gn_merge_stats(part, u, P, chunk_vecs, nq, V, eps, mu, rstd);
    const uint4 *xq = reinterpret_cast<const uint4 *>(x + u * n);
    uint4 *yq = reinterpret_cast<uint4 *>(y + u * n);
    uint4 held[K];
    gn_hold<K>(xq, q0, nq, held);
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int64_t q = q0 + tid + (int64_t)k * blockDim.x;
        if (q < nq) {
            float scale, shift;
            gn_affine(gamma, beta, g * Cg + (q * V) / S, rstd, scale, shift);
            float v[V];
            pea_unpack16(held[k], v, (const T *)nullptr);
            for (int j = 0; j < V; j++) v[j] = gn_out(v[j], mu, scale, shift, silu);
            yq[q] = pea_pack16(v, (const T *)nullptr);
        }
    }
}

/* The chunks per group that occupancy asks for, for `groups` groups of nq vectors: about 2·sm_count / groups when
 * there are fewer groups than SMs (each chunk at least GN_SPLIT_MIN_CHUNK vectors), else 1. */
static int64_t group_norm_occupancy_chunks(int64_t nq, int64_t groups, int64_t sms) {
    if (groups >= sms) return 1;
    const int64_t P = (2 * sms + groups - 1) / groups;
    return P < nq / GN_SPLIT_MIN_CHUNK ? P : nq / GN_SPLIT_MIN_CHUNK;
}

/* How the split path cuts a group of nq vectors: into the occupancy's P chunks or, if more, enough chunks of at most
 * GN_SPLIT_MAX_K·GN_SPLIT_THREADS vectors; K vectors per thread and `threads` threads per block (a multiple of 32,
 * ≤ GN_SPLIT_THREADS), so that K·threads covers ⌈nq/P⌉ with the fewest idle threads; P is then recomputed for
 * that chunk size (it can only shrink). */
struct GnSplit {
    int64_t P;
    int K, threads;
};
static GnSplit group_norm_split_plan(int64_t nq, int64_t P) {
    const int64_t max_chunk = (int64_t)GN_SPLIT_MAX_K * GN_SPLIT_THREADS, P_size = (nq + max_chunk - 1) / max_chunk;
    if (P < P_size) P = P_size;
    const int64_t want = (nq + P - 1) / P;
    GnSplit s;
    s.K = want <= GN_SPLIT_THREADS ? 1 : want <= 2 * GN_SPLIT_THREADS ? 2 : GN_SPLIT_MAX_K;
    s.threads = (int)(((want + s.K - 1) / s.K + 31) / 32 * 32);
    const int64_t chunk = (int64_t)s.K * s.threads;
    s.P = (nq + chunk - 1) / chunk;
    return s;
}

template <typename T, int K>
static int group_norm_split_launch(pea_cuda_context *ctx, const void *x, const void *gamma, const void *beta, void *y,
                                   int64_t B, int64_t C, int64_t S, int64_t G, float eps, int fuse_silu,
                                   const GnSplit &plan) {
    static const char *op = "group_norm";
    const int64_t n = C / G * S, blocks = B * G * plan.P;
    PEA_REQUIRE(ctx, op, blocks <= INT_MAX, "B·G·P = %lld blocks is too many", (long long)blocks);
    void *part = NULL;
    PEA_TRY(pea_mem_alloc(ctx, op, (size_t)blocks * sizeof(float2), &part));
    PEA_KERNEL(ctx, op, (group_norm_partial_kernel<T, K>), (unsigned)blocks, plan.threads, 0, (const T *)x,
               (float2 *)part, n, plan.P);
    PEA_KERNEL(ctx, op, (group_norm_apply_kernel<T, K>), (unsigned)blocks, plan.threads, 0, (const T *)x,
               (const float2 *)part, (const T *)gamma, (const T *)beta, (T *)y, C, S, G, plan.P, eps, fuse_silu);
    /* stream-ordered: a later user of the block runs after these kernels on the one stream */
    return pea_mem_free(ctx, op, part);
}

/* The group-norm paths, by the group's size n = Cg·S in vectors of V = 16/sizeof(T) elements (nq = n/V) and by
 * how many groups there are against the SM count:
 *   - S not a multiple of V or x/y not 16-byte aligned: group_norm_kernel (one block per group, x read twice);
 *   - fewer groups than SMs (B·G < sm_count: the UNet's 2·32 groups on an H100's 132 SMs would leave half of
 *     them idle with a block per group), groups of at least 2·GN_SPLIT_MIN_CHUNK vectors: the split path with
 *     P ≈ 2·sm_count / (B·G) chunks per group (at least GN_SPLIT_MIN_CHUNK vectors each, 4 KB, so that the
 *     second launch and the L2 re-read buy occupancy rather than overhead), so every SM gets about two blocks;
 *     x is read once from DRAM and once more from L2 (a UNet activation is a few MB);
 *   - nq ≤ 8·1024 vectors (128 KB of storage: 64 K f16 values, 32 K f32): group_norm_regs_kernel, the
 *     group in registers, K = the fewest of 1, 2, 4, 8 vectors per thread with ≤ 1024 threads;
 *   - larger groups (VAE shapes): the split path with chunks of up to GN_SPLIT_MAX_K·GN_SPLIT_THREADS vectors.
 * The emulator reports 16 SMs, so tests reach the occupancy split with B·G < 16. */
template <typename T>
static int group_norm_launch(pea_cuda_context *ctx, const void *x, const void *gamma, const void *beta, void *y,
                             int64_t B, int64_t C, int64_t S, int64_t G, float eps, int fuse_silu) {
    static const char *op = "group_norm";
    constexpr int V = pea_v16<T>::N;
    const int64_t n = C / G * S, nq = n / V, groups = B * G;
    const bool vec16 = S % V == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)y % 16 == 0;
    const int64_t P = group_norm_occupancy_chunks(nq, groups, ctx->sm_count);
    if (vec16 && (P >= 2 || nq > 8 * 1024)) {
        const GnSplit plan = group_norm_split_plan(nq, P);
        switch (plan.K) {
        case 1: return group_norm_split_launch<T, 1>(ctx, x, gamma, beta, y, B, C, S, G, eps, fuse_silu, plan);
        case 2: return group_norm_split_launch<T, 2>(ctx, x, gamma, beta, y, B, C, S, G, eps, fuse_silu, plan);
        default:
            return group_norm_split_launch<T, GN_SPLIT_MAX_K>(ctx, x, gamma, beta, y, B, C, S, G, eps, fuse_silu, plan);
        }
    }
    if (vec16) {
        const int K = nq <= 1024 ? 1 : nq <= 2048 ? 2 : nq <= 4096 ? 4 : 8;
        int threads = (int)((nq + K - 1) / K);
        threads = (threads + 31) / 32 * 32;
        const unsigned grid = (unsigned)groups;
        const T *xt = (const T *)x, *gt = (const T *)gamma, *bt = (const T *)beta;
        T *yt = (T *)y;
        switch (K) {
        case 1: PEA_KERNEL(ctx, op, (group_norm_regs_kernel<T, 1>), grid, threads, 0, xt, gt, bt, yt, C, S, G, eps, fuse_silu); break;
        case 2: PEA_KERNEL(ctx, op, (group_norm_regs_kernel<T, 2>), grid, threads, 0, xt, gt, bt, yt, C, S, G, eps, fuse_silu); break;
        case 4: PEA_KERNEL(ctx, op, (group_norm_regs_kernel<T, 4>), grid, threads, 0, xt, gt, bt, yt, C, S, G, eps, fuse_silu); break;
        default: PEA_KERNEL(ctx, op, (group_norm_regs_kernel<T, 8>), grid, threads, 0, xt, gt, bt, yt, C, S, G, eps, fuse_silu); break;
        }
        return PEA_CUDA_OK;
    }
    const size_t align = 4 * sizeof(T);
    const int vec = S % 4 == 0 && (uintptr_t)x % align == 0 && (uintptr_t)y % align == 0;
    const int threads = n >= 16384 ? 512 : 256;
    PEA_KERNEL(ctx, op, group_norm_kernel<T>, (unsigned)groups, threads, 0, (const T *)x,
               (const T *)gamma, (const T *)beta, (T *)y, C, S, G, eps, fuse_silu, vec);
    return PEA_CUDA_OK;
}

/* The shape checks group norm and its backward share: B, C, S ≥ 0, G ≥ 1 dividing C, one block per (b, g). */
static int group_norm_shape(pea_cuda_context *ctx, const char *op, int64_t B, int64_t C, int64_t S, int64_t G) {
    PEA_REQUIRE(ctx, op, B >= 0 && C >= 0 && S >= 0 && G >= 1, "shape B %lld, C %lld, S %lld, G %lld", (long long)B,
                (long long)C, (long long)S, (long long)G);
    PEA_REQUIRE(ctx, op, C % G == 0, "C %lld is not a multiple of G %lld", (long long)C, (long long)G);
    PEA_REQUIRE(ctx, op, B * G <= INT_MAX, "B·G = %lld blocks is too many", (long long)(B * G));
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_group_norm(pea_cuda_context *ctx, int dtype, const void *x, const void *gamma,
                                   const void *beta, void *y, int64_t B, int64_t C, int64_t S, int64_t G, float eps,
                                   int fuse_silu) {
    static const char *op = "group_norm";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_TRY(group_norm_shape(ctx, op, B, C, S, G));
    if (B == 0 || C == 0 || S == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && y, "NULL tensor (x %p, y %p)", x, y);
    return PEA_FLOAT_SWITCH(dtype, group_norm_launch, ctx, x, gamma, beta, y, B, C, S, G, eps, fuse_silu);
}

/* The sum over the block of (a, b), returned to every thread (all threads of the block must call it; blockDim a
 * multiple of 32). Warp butterflies, one partial per warp in shared memory, then warp 0 adds the partials in
 * warp order: the same order on every run, so the result is deterministic. */
static __device__ void block_sum2(float &a, float &b) {
    PEA_SHARED_ARRAY(float, s_a, 32);
    PEA_SHARED_ARRAY(float, s_b, 32);
    PEA_SHARED_ARRAY(float, s_out, 2);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    a = pea_warp_sum(a);
    b = pea_warp_sum(b);
    if (lane == 0) {
        s_a[warp] = a;
        s_b[warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        a = pea_warp_sum(lane < warps ? s_a[lane] : 0.0f);
        b = pea_warp_sum(lane < warps ? s_b[lane] : 0.0f);
        if (lane == 0) {
            s_out[0] = a;
            s_out[1] = b;
        }
    }
    __syncthreads();
    a = s_out[0];
    b = s_out[1];
}

/* d/dz silu(z) = s·(1 + z·(1 − s)), s = sigmoid(z). */
static __device__ __forceinline__ float silu_grad(float z) {
    const float s = 1.0f / (1.0f + expf(-z));
    return s * (1.0f + z * (1.0f - s));
}

/* dx̂ = γ[c]·dy (·silu'(z) with silu) and x̂ = (x − mean)·rstd for one value of channel c (gm = γ[c], bt = β[c]). */
static __device__ __forceinline__ void gn_backward_terms(float xv, float dyv, float mu, float rstd, float gm, float bt,
                                                         int silu, float &xh, float &dxh) {
    xh = (xv - mu) * rstd;
    float dz = dyv;
    if (silu) dz *= silu_grad(gm * xh + bt);
    dxh = __fmul_rn(dz, gm); /* rounded, never fused into an FMA: dx subtracts its mean from exactly this value */
}

/* dx for y = group_norm(x) (then SiLU if silu) over the group (b, g) of x, dy, dx [B, C, S]:
 *   x̂ = (x − mean)·rstd, z = γ[c]·x̂ + β[c], dz = dy (·silu'(z) if silu), dx̂ = γ[c]·dz,
 *   dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))       (means over the group's n = Cg·S values).
 * One block per (b, g) = blockIdx.x, the group's values contiguous. Pass 1 recomputes mean and rstd from x
 * (group_stats); pass 2: thread t accumulates Σ dx̂ and Σ dx̂·x̂ over the elements t, t + blockDim, …, summed
 * over the block (block_sum2); pass 3 re-reads x and dy with the same mapping and writes dx. f32 throughout. */
template <typename T>
__global__ void group_norm_backward_kernel(const T *dy, const T *x, const T *gamma, const T *beta, T *dx, int64_t C,
                                           int64_t S, int64_t G, float eps, int silu, int vec) {
    const int64_t u = blockIdx.x, g = u % G, Cg = C / G, n = Cg * S;
    const T *xg = x + u * n, *dyg = dy + u * n;
    T *dxg = dx + u * n;
    const int tid = threadIdx.x;
    float mu, rstd;
    group_stats(xg, n, eps, vec, mu, rstd);

    float sum_dxh = 0.0f, sum_dxh_xh = 0.0f;
    for (int64_t i = tid; i < n; i += blockDim.x) {
        const int64_t c = g * Cg + i / S;
        const float gm = gamma ? pea_ld(gamma + c) : 1.0f, bt = silu && beta ? pea_ld(beta + c) : 0.0f;
        float xh, dxh;
        gn_backward_terms(pea_ld(xg + i), pea_ld(dyg + i), mu, rstd, gm, bt, silu, xh, dxh);
        sum_dxh += dxh;
        sum_dxh_xh += dxh * xh;
    }
    block_sum2(sum_dxh, sum_dxh_xh);
    const float mean_dxh = sum_dxh / (float)n, mean_dxh_xh = sum_dxh_xh / (float)n;
    for (int64_t i = tid; i < n; i += blockDim.x) {
        const int64_t c = g * Cg + i / S;
        const float gm = gamma ? pea_ld(gamma + c) : 1.0f, bt = silu && beta ? pea_ld(beta + c) : 0.0f;
        float xh, dxh;
        gn_backward_terms(pea_ld(xg + i), pea_ld(dyg + i), mu, rstd, gm, bt, silu, xh, dxh);
        /* dxh − mean: exactly 0 for a group of one element (the CPU's value), where an FMA would leave the
         * product's rounding error, amplified by rstd = 1/√eps */
        pea_st(dxg + i, rstd * (__fsub_rn(dxh, mean_dxh) - xh * mean_dxh_xh));
    }
}

/* The backward's split path, three kernels, for the forward's split shapes (fewer groups than SMs, or groups
 * past 8192 vectors), with the forward's chunks: block L of the 1-D grid of B·G·P handles chunk p = L mod P
 * (K·blockDim 16-byte vectors) of group u = L / P.
 * Pass 1 is the forward's group_norm_partial_kernel: each chunk's (mean, M2) of x.
 * Pass 2 (group_norm_backward_partial_kernel): the block merges the group's statistics (gn_merge_stats), loads
 * its chunk of x and dy into registers (16-byte loads, K per thread) and writes the chunk's (Σ dx̂, Σ dx̂·x̂)
 * — group_norm_backward_kernel's terms, block_sum2's fixed-order sums — to sums[L].
 * Pass 3 (group_norm_backward_apply_kernel), chunks in reverse as the forward's pass 2: the statistics again,
 * the group's P sums added in a fixed order (gn_merge_sums), then dx for its chunk (x and dy from L2). */

/* The sums (Σ a, Σ b) of group u's P chunk partials sums[u·P + j] for the whole block (all threads must call
 * it): warp 0, lane l adding partials l, l + 32, … in order, then the lanes folded into lane 0 in a fixed tree. */
static __device__ void gn_merge_sums(const float2 *sums, int64_t u, int64_t P, float &a, float &b) {
    PEA_SHARED_ARRAY(float, s_sum, 2);
    const int tid = threadIdx.x;
    if (tid < 32) {
        float sa = 0.0f, sb = 0.0f;
        for (int64_t j = tid; j < P; j += 32) {
            const float2 v = sums[u * P + j];
            sa += v.x;
            sb += v.y;
        }
        for (int o = 1; o < 32; o <<= 1) {
            const float oa = __shfl_down_sync(PEA_FULL_MASK, sa, o), ob = __shfl_down_sync(PEA_FULL_MASK, sb, o);
            if (tid + o < 32) {
                sa += oa;
                sb += ob;
            }
        }
        if (tid == 0) {
            s_sum[0] = sa;
            s_sum[1] = sb;
        }
    }
    __syncthreads();
    a = s_sum[0];
    b = s_sum[1];
}

template <typename T, int K>
__global__ void __launch_bounds__(GN_SPLIT_THREADS)
    group_norm_backward_partial_kernel(const T *dy, const T *x, const float2 *stats, const T *gamma, const T *beta,
                                       float2 *sums, int64_t C, int64_t S, int64_t G, int64_t P, float eps, int silu) {
    constexpr int V = pea_v16<T>::N;
    const int64_t L = blockIdx.x, u = L / P, p = L - u * P;
    const int64_t g = u % G, Cg = C / G, n = Cg * S, nq = n / V;
    const int64_t chunk_vecs = (int64_t)K * blockDim.x, q0 = p * chunk_vecs;
    const int tid = threadIdx.x;
    const uint4 *xq = reinterpret_cast<const uint4 *>(x + u * n), *dyq = reinterpret_cast<const uint4 *>(dy + u * n);
    uint4 hx[K] = {}, hdy[K] = {}; /* zeroed only for g++'s -Wuninitialized (the emulated build) */
    gn_hold<K>(xq, q0, nq, hx); /* loads in flight while warp 0 merges the partials */
    gn_hold<K>(dyq, q0, nq, hdy);
    float mu, rstd;
    gn_merge_stats(stats, u, P, chunk_vecs, nq, V, eps, mu, rstd);
    float sum_dxh = 0.0f, sum_dxh_xh = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int64_t q = q0 + tid + (int64_t)k * blockDim.x;
        if (q < nq) {
            const int64_t c = g * Cg + (q * V) / S;
            const float gm = gamma ? pea_ld(gamma + c) : 1.0f, bt = beta ? pea_ld(beta + c) : 0.0f;
            float xv[V], dyv[V];
            pea_unpack16(hx[k], xv, (const T *)nullptr);
            pea_unpack16(hdy[k], dyv, (const T *)nullptr);
            for (int j = 0; j < V; j++) {
                float xh, dxh;
                gn_backward_terms(xv[j], dyv[j], mu, rstd, gm, bt, silu, xh, dxh);
                sum_dxh += dxh;
                sum_dxh_xh += dxh * xh;
            }
        }
    }
    block_sum2(sum_dxh, sum_dxh_xh);
    if (tid == 0) sums[L] = make_float2(sum_dxh, sum_dxh_xh);
}

template <typename T, int K>
__global__ void __launch_bounds__(GN_SPLIT_THREADS)
    group_norm_backward_apply_kernel(const T *dy, const T *x, const float2 *stats, const float2 *sums, const T *gamma,
                                     const T *beta, T *dx, int64_t C, int64_t S, int64_t G, int64_t P, float eps,
                                     int silu) {
    constexpr int V = pea_v16<T>::N;
    const int64_t L = (int64_t)gridDim.x - 1 - blockIdx.x, u = L / P, p = L - u * P;
    const int64_t g = u % G, Cg = C / G, n = Cg * S, nq = n / V;
    const int64_t chunk_vecs = (int64_t)K * blockDim.x, q0 = p * chunk_vecs;
    const int tid = threadIdx.x;
    const uint4 *xq = reinterpret_cast<const uint4 *>(x + u * n), *dyq = reinterpret_cast<const uint4 *>(dy + u * n);
    uint4 *dxq = reinterpret_cast<uint4 *>(dx + u * n);
    uint4 hx[K] = {}, hdy[K] = {}; /* zeroed only for g++'s -Wuninitialized (the emulated build) */
    gn_hold<K>(xq, q0, nq, hx); /* loads in flight while warp 0 merges the partials */
    gn_hold<K>(dyq, q0, nq, hdy);
    float mu, rstd, sum_dxh, sum_dxh_xh;
    gn_merge_stats(stats, u, P, chunk_vecs, nq, V, eps, mu, rstd);
    gn_merge_sums(sums, u, P, sum_dxh, sum_dxh_xh);
    const float mean_dxh = sum_dxh / (float)n, mean_dxh_xh = sum_dxh_xh / (float)n;
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int64_t q = q0 + tid + (int64_t)k * blockDim.x;
        if (q < nq) {
            const int64_t c = g * Cg + (q * V) / S;
            const float gm = gamma ? pea_ld(gamma + c) : 1.0f, bt = beta ? pea_ld(beta + c) : 0.0f;
            float xv[V], dyv[V];
            pea_unpack16(hx[k], xv, (const T *)nullptr);
            pea_unpack16(hdy[k], dyv, (const T *)nullptr);
            for (int j = 0; j < V; j++) {
                float xh, dxh;
                gn_backward_terms(xv[j], dyv[j], mu, rstd, gm, bt, silu, xh, dxh);
                xv[j] = rstd * (__fsub_rn(dxh, mean_dxh) - xh * mean_dxh_xh); /* as group_norm_backward_kernel */
            }
            dxq[q] = pea_pack16(xv, (const T *)nullptr);
        }
    }
}

template <typename T, int K>
static int group_norm_backward_split_launch(pea_cuda_context *ctx, const void *dy, const void *x, const void *gamma,
                                            const void *beta, void *dx, int64_t B, int64_t C, int64_t S, int64_t G,
                                            float eps, int fuse_silu, const GnSplit &plan) {
    static const char *op = "group_norm_backward";
    const int64_t n = C / G * S, blocks = B * G * plan.P;
    PEA_REQUIRE(ctx, op, blocks <= INT_MAX, "B·G·P = %lld blocks is too many", (long long)blocks);
    void *part = NULL; /* [blocks] (mean, M2) of x, then [blocks] (Σ dx̂, Σ dx̂·x̂) */
    PEA_TRY(pea_mem_alloc(ctx, op, 2 * (size_t)blocks * sizeof(float2), &part));
    float2 *stats = (float2 *)part, *sums = stats + blocks;
    const T *dyt = (const T *)dy, *xt = (const T *)x, *gt = (const T *)gamma, *bt = (const T *)beta;
    PEA_KERNEL(ctx, op, (group_norm_partial_kernel<T, K>), (unsigned)blocks, plan.threads, 0, xt, stats, n, plan.P);
    PEA_KERNEL(ctx, op, (group_norm_backward_partial_kernel<T, K>), (unsigned)blocks, plan.threads, 0, dyt, xt,
               (const float2 *)stats, gt, bt, sums, C, S, G, plan.P, eps, fuse_silu);
    PEA_KERNEL(ctx, op, (group_norm_backward_apply_kernel<T, K>), (unsigned)blocks, plan.threads, 0, dyt, xt,
               (const float2 *)stats, (const float2 *)sums, gt, bt, (T *)dx, C, S, G, plan.P, eps, fuse_silu);
    return pea_mem_free(ctx, op, part); /* stream-ordered, as in the forward */
}

/* The forward's rule (group_norm_launch): the split path for fewer groups than SMs or groups past 8192 vectors
 * when S is a multiple of V and x, dy, dx are 16-byte aligned; otherwise one block per group. */
template <typename T>
static int group_norm_backward_launch(pea_cuda_context *ctx, const void *dy, const void *x, const void *gamma,
                                      const void *beta, void *dx, int64_t B, int64_t C, int64_t S, int64_t G, float eps,
                                      int fuse_silu) {
    constexpr int V = pea_v16<T>::N;
    const int64_t n = C / G * S, nq = n / V;
    const bool vec16 = S % V == 0 && ((uintptr_t)x | (uintptr_t)dy | (uintptr_t)dx) % 16 == 0;
    const int64_t P = group_norm_occupancy_chunks(nq, B * G, ctx->sm_count);
    if (vec16 && (P >= 2 || nq > 8 * 1024)) {
        const GnSplit plan = group_norm_split_plan(nq, P);
        switch (plan.K) {
        case 1: return group_norm_backward_split_launch<T, 1>(ctx, dy, x, gamma, beta, dx, B, C, S, G, eps, fuse_silu, plan);
        case 2: return group_norm_backward_split_launch<T, 2>(ctx, dy, x, gamma, beta, dx, B, C, S, G, eps, fuse_silu, plan);
        default:
            return group_norm_backward_split_launch<T, GN_SPLIT_MAX_K>(ctx, dy, x, gamma, beta, dx, B, C, S, G, eps,
                                                                      fuse_silu, plan);
        }
    }
    const int vec = S % 4 == 0 && (uintptr_t)x % (4 * sizeof(T)) == 0;
    const int threads = n >= 16384 ? 512 : 256;
    PEA_KERNEL(ctx, "group_norm_backward", group_norm_backward_kernel<T>, (unsigned)(B * G), threads, 0,
               (const T *)dy, (const T *)x, (const T *)gamma, (const T *)beta, (T *)dx, C, S, G, eps, fuse_silu, vec);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_group_norm_backward(pea_cuda_context *ctx, int dtype, const void *dy, const void *x,
                                            const void *gamma, const void *beta, void *dx, int64_t B, int64_t C,
                                            int64_t S, int64_t G, float eps, int fuse_silu) {
    static const char *op = "group_norm_backward";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_TRY(group_norm_shape(ctx, op, B, C, S, G));
    if (B == 0 || C == 0 || S == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, dy && x && dx, "NULL tensor (dy %p, x %p, dx %p)", dy, x, dx);
    return PEA_FLOAT_SWITCH(dtype, group_norm_backward_launch, ctx, dy, x, gamma, beta, dx, B, C, S, G, eps, fuse_silu);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Layer norm                                                                                            */

enum { ROWS_PER_BLOCK = 8 }; /* warps per block for the warp-per-row kernels */

/* The shape checks of an op over R rows of D run by the warp-per-row kernels (one block per ROWS_PER_BLOCK rows). */
#define PEA_REQUIRE_ROWS(ctx, op, R, D)                                                                  \
    do {                                                                                                 \
        PEA_REQUIRE(ctx, op, (R) >= 0 && (D) >= 0, "shape R %lld, D %lld", (long long)(R), (long long)(D)); \
        PEA_REQUIRE(ctx, op, ((R) + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK <= INT_MAX, "R %lld rows is too many",  \
                    (long long)(R));                                                                     \
    } while (0)

/* y[r, :] = (x[r, :] − mean)·rstd·γ + β over rows of D. One warp per row (row = blockIdx.x·8 + warp); lane l
 * handles features l, l + 32, …: a pass for the mean, a pass for the biased variance of the centred values
 * (the row is in L1/L2 by then), a pass that writes y. A warp past the last row returns as a whole. */
/* A row's mean and 1/√(biased variance + eps), by the 32 lanes of a warp (lane l sums features l, l + 32, …;
 * two passes, each ending in a warp sum); every lane gets both. Shared by the forward and the backward. */
template <typename T>
static __device__ void layer_norm_row_stats(const T *xr, int64_t D, int lane, float eps, float *mean_out, float *rstd_out) {
    float s = 0.0f;
    for (int64_t i = lane; i < D; i += 32) s += pea_ld(xr + i);
    const float mean = pea_warp_sum(s) / (float)D;
    float sq = 0.0f;
    for (int64_t i = lane; i < D; i += 32) {
        const float d = pea_ld(xr + i) - mean;
        sq += d * d;
    }
    *mean_out = mean;
    *rstd_out = rsqrtf(pea_warp_sum(sq) / (float)D + eps);
}

template <typename T>
__global__ void layer_norm_kernel(const T *x, const T *gamma, const T *beta, T *y, int64_t R, int64_t D, float eps) {
    const int lane = threadIdx.x % 32;
    const int64_t r = (int64_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
    if (r >= R) return;
    const T *xr = x + r * D;
    T *yr = y + r * D;
    float mean, rstd;
    layer_norm_row_stats(xr, D, lane, eps, &mean, &rstd);
    for (int64_t i = lane; i < D; i += 32) {
        float v = (pea_ld(xr + i) - mean) * rstd;
        if (gamma) v *= pea_ld(gamma + i);
        if (beta) v += pea_ld(beta + i);
        pea_st(yr + i, v);
    }
}

/* The same for rows that fit in registers: D a multiple of V = 16/sizeof(T), at most 32·K vectors, x, y (and
 * γ, β) 16-byte aligned. One warp per row (row = blockIdx.x·8 + warp); lane l loads vectors l, l + 32, … (at
 * most K, 16 bytes each) once, and the mean, the biased variance of the centred values (two passes over the
 * held values, each ending in a warp sum, as in layer_norm_row_stats) and the output all come from registers:
 * x is read once, y written with 16-byte stores. */
template <typename T, int K>
__global__ void layer_norm_regs_kernel(const T *x, const T *gamma, const T *beta, T *y, int64_t R, int64_t D,
                                       float eps) {
    constexpr int V = pea_v16<T>::N;
    const int lane = threadIdx.x % 32;
    const int64_t r = (int64_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
    if (r >= R) return;
    const int nq = (int)(D / V);
    const uint4 *xq = reinterpret_cast<const uint4 *>(x + r * D);
    uint4 *yq = reinterpret_cast<uint4 *>(y + r * D);
    float v[K][V];
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int q = lane + 32 * k;
        if (q < nq) {
            pea_unpack16(xq[q], v[k], (const T *)nullptr);
            for (int j = 0; j < V; j++) s += v[k][j];
        }
    }
    const float mean = pea_warp_sum(s) / (float)D;
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++)
        if (lane + 32 * k < nq)
            for (int j = 0; j < V; j++) {
                const float d = v[k][j] - mean;
                sq += d * d;
            }
    const float rstd = rsqrtf(pea_warp_sum(sq) / (float)D + eps);
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int q = lane + 32 * k;
        if (q < nq) {
            float g[V], b[V];
            if (gamma) pea_unpack16(reinterpret_cast<const uint4 *>(gamma)[q], g, (const T *)nullptr);
            if (beta) pea_unpack16(reinterpret_cast<const uint4 *>(beta)[q], b, (const T *)nullptr);
            for (int j = 0; j < V; j++) {
                float o = (v[k][j] - mean) * rstd;
                if (gamma) o *= g[j];
                if (beta) o += b[j];
                v[k][j] = o;
            }
            yq[q] = pea_pack16(v[k], (const T *)nullptr);
        }
    }
}

/* Rows of up to 32·4 vectors (1024 f16/bf16 features, 512 f32: every transformer width of SD) with aligned
 * pointers take the register kernel; the rest the three-pass one. */
enum { LN_REGS_MAX_K = 4 };
template <typename T>
static int layer_norm_launch(pea_cuda_context *ctx, const void *x, const void *gamma, const void *beta, void *y,
                             int64_t R, int64_t D, float eps) {
    constexpr int V = pea_v16<T>::N;
    const unsigned grid = (unsigned)((R + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK), threads = 32 * ROWS_PER_BLOCK;
    const T *xt = (const T *)x, *gt = (const T *)gamma, *bt = (const T *)beta;
    T *yt = (T *)y;
    const bool aligned = ((uintptr_t)x | (uintptr_t)y | (uintptr_t)gamma | (uintptr_t)beta) % 16 == 0;
    const int64_t nq = D / V, K = (nq + 31) / 32;
    if (D % V == 0 && aligned && K <= LN_REGS_MAX_K) {
        switch (K) {
        case 1: PEA_KERNEL(ctx, "layer_norm", (layer_norm_regs_kernel<T, 1>), grid, threads, 0, xt, gt, bt, yt, R, D, eps); break;
        case 2: PEA_KERNEL(ctx, "layer_norm", (layer_norm_regs_kernel<T, 2>), grid, threads, 0, xt, gt, bt, yt, R, D, eps); break;
        case 3: PEA_KERNEL(ctx, "layer_norm", (layer_norm_regs_kernel<T, 3>), grid, threads, 0, xt, gt, bt, yt, R, D, eps); break;
        default: PEA_KERNEL(ctx, "layer_norm", (layer_norm_regs_kernel<T, 4>), grid, threads, 0, xt, gt, bt, yt, R, D, eps); break;
        }
        return PEA_CUDA_OK;
    }
    PEA_KERNEL(ctx, "layer_norm", layer_norm_kernel<T>, grid, threads, 0, xt, gt, bt, yt, R, D, eps);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_layer_norm(pea_cuda_context *ctx, int dtype, const void *x, const void *gamma,
                                   const void *beta, void *y, int64_t R, int64_t D, float eps) {
    static const char *op = "layer_norm";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE_ROWS(ctx, op, R, D);
    if (R == 0 || D == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && y, "NULL tensor (x %p, y %p)", x, y);
    return PEA_FLOAT_SWITCH(dtype, layer_norm_launch, ctx, x, gamma, beta, y, R, D, eps);
}

/* dx for y = layer_norm(x) over rows of D (x, dy, dx [R, D]): with x̂ = (x − mean)·rstd and dx̂ = dy·γ,
 *   dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))       (means over the row).
 * One warp per row (row = blockIdx.x·8 + warp), lane l handling features l, l + 32, … as in the forward: a pass
 * for the mean, one for the variance (both recomputed from x), one for Σ dx̂ and Σ dx̂·x̂, one that writes dx.
 * When stats is not NULL lane 0 also stores the row's (mean, rstd) in stats[2r], stats[2r + 1] for
 * layer_norm_param_grad_kernel. A warp past the last row returns as a whole. */
template <typename T>
__global__ void layer_norm_backward_kernel(const T *dy, const T *x, const T *gamma, T *dx, float *stats, int64_t R,
                                           int64_t D, float eps) {
    const int lane = threadIdx.x % 32;
    const int64_t r = (int64_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
    if (r >= R) return;
    const T *xr = x + r * D, *dyr = dy + r * D;
    T *dxr = dx + r * D;
    float mean, rstd;
    layer_norm_row_stats(xr, D, lane, eps, &mean, &rstd);
    float a = 0.0f, b = 0.0f;
    for (int64_t i = lane; i < D; i += 32) {
        const float xh = (pea_ld(xr + i) - mean) * rstd;
        const float dxh = __fmul_rn(pea_ld(dyr + i), gamma ? pea_ld(gamma + i) : 1.0f); /* never an FMA: as below */
        a += dxh;
        b += dxh * xh;
    }
    const float mean_dxh = pea_warp_sum(a) / (float)D, mean_dxh_xh = pea_warp_sum(b) / (float)D;
    for (int64_t i = lane; i < D; i += 32) {
        const float xh = (pea_ld(xr + i) - mean) * rstd;
        const float dxh = __fmul_rn(pea_ld(dyr + i), gamma ? pea_ld(gamma + i) : 1.0f);
        /* dxh − mean: exactly 0 for a row of one feature (the CPU's value), where an FMA would leave the
         * product's rounding error, amplified by rstd = 1/√eps (as in group_norm_backward_kernel) */
        pea_st(dxr + i, rstd * (__fsub_rn(dxh, mean_dxh) - xh * mean_dxh_xh));
    }
    if (stats && lane == 0) {
        stats[2 * r] = mean;
        stats[2 * r + 1] = rstd;
    }
}

enum { PG_COLS = 32, PG_ROWS = 8 }; /* layer_norm_param_grad_kernel's block: 32 columns × 8 row lanes */

/* dγ[d] = Σ_r dy[r, d]·x̂[r, d] and dβ[d] = Σ_r dy[r, d] (either output may be NULL), x̂ from the row statistics
 * that layer_norm_backward_kernel stored. A column reduction without atomics, so the sums are the same on
 * every run: block (32, 8) owns the columns blockIdx.x·32 + tx; thread (tx, ty) sums rows ty, ty + 8, … of its
 * column (a warp reads 32 consecutive columns of one row: coalesced), then thread (tx, 0) adds the 8 partials
 * of its column from shared memory in ty order. */
template <typename T>
__global__ void layer_norm_param_grad_kernel(const T *dy, const T *x, const float *stats, T *dgamma, T *dbeta,
                                             int64_t R, int64_t D) {
    PEA_SHARED_ARRAY_2D(float, s_g, PG_ROWS, PG_COLS);
    PEA_SHARED_ARRAY_2D(float, s_b, PG_ROWS, PG_COLS);
    const int tx = threadIdx.x % PG_COLS, ty = threadIdx.x / PG_COLS;
    const int64_t d = (int64_t)blockIdx.x * PG_COLS + tx;
    float g = 0.0f, b = 0.0f;
    if (d < D) {
        for (int64_t r = ty; r < R; r += PG_ROWS) {
            const float v = pea_ld(dy + r * D + d);
            g += v * (pea_ld(x + r * D + d) - stats[2 * r]) * stats[2 * r + 1];
            b += v;
        }
    }
    s_g[ty][tx] = g;
    s_b[ty][tx] = b;
    __syncthreads();
    if (ty == 0 && d < D) {
        for (int k = 1; k < PG_ROWS; k++) {
            g += s_g[k][tx];
            b += s_b[k][tx];
        }
        if (dgamma) pea_st(dgamma + d, g);
        if (dbeta) pea_st(dbeta + d, b);
    }
}

template <typename T>
static int layer_norm_backward_launch(pea_cuda_context *ctx, const void *dy, const void *x, const void *gamma,
                                      void *dx, void *dgamma, void *dbeta, int64_t R, int64_t D, float eps,
                                      float *stats) {
    static const char *op = "layer_norm_backward";
    PEA_KERNEL(ctx, op, layer_norm_backward_kernel<T>, (unsigned)((R + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK),
               32 * ROWS_PER_BLOCK, 0, (const T *)dy, (const T *)x, (const T *)gamma, (T *)dx, stats, R, D, eps);
    if (stats)
        PEA_KERNEL(ctx, op, layer_norm_param_grad_kernel<T>, (unsigned)((D + PG_COLS - 1) / PG_COLS),
                   PG_COLS * PG_ROWS, 0, (const T *)dy, (const T *)x, (const float *)stats, (T *)dgamma, (T *)dbeta,
                   R, D);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_layer_norm_backward(pea_cuda_context *ctx, int dtype, const void *dy, const void *x,
                                            const void *gamma, void *dx, void *dgamma, void *dbeta, int64_t R,
                                            int64_t D, float eps) {
    static const char *op = "layer_norm_backward";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE_ROWS(ctx, op, R, D);
    PEA_REQUIRE(ctx, op, (D + PG_COLS - 1) / PG_COLS <= INT_MAX, "D %lld columns is too many", (long long)D);
    if (D == 0) return PEA_CUDA_OK;
    const bool params = dgamma || dbeta;
    if (R == 0) { /* empty sums: dγ = dβ = 0 */
        const size_t bytes = (size_t)D * pea_dtype_size(dtype);
        if (dgamma) PEA_TRY(pea_check_cuda(ctx, op, cudaMemsetAsync(dgamma, 0, bytes, ctx->stream), "cudaMemsetAsync"));
        if (dbeta) PEA_TRY(pea_check_cuda(ctx, op, cudaMemsetAsync(dbeta, 0, bytes, ctx->stream), "cudaMemsetAsync"));
        return PEA_CUDA_OK;
    }
    PEA_REQUIRE(ctx, op, dy && x && dx, "NULL tensor (dy %p, x %p, dx %p)", dy, x, dx);
    /* the rows' (mean, rstd) for the parameter gradients: a block from the caching allocator, handed back right
     * after the launches (safe on the one stream: whatever reuses it is queued after them) */
    float *stats = NULL;
    if (params) PEA_TRY(pea_mem_alloc(ctx, op, (size_t)(2 * R) * sizeof(float), (void **)&stats));
    const int rc = PEA_FLOAT_SWITCH(dtype, layer_norm_backward_launch, ctx, dy, x, gamma, dx, dgamma, dbeta, R, D, eps,
                                    stats);
    if (stats) {
        const int frc = pea_mem_free(ctx, op, stats);
        if (!rc) return frc;
    }
    return rc;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Softmax                                                                                               */

/* (m, s) ← the softmax statistics of both sides: m the maximum, s = Σ exp(v − m). A side that has seen only −∞
 * has m = −∞, s = 0 and adds nothing. */
static __device__ __forceinline__ void softmax_merge(float &m, float &s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return;
    s = (m == -INFINITY ? 0.0f : s * expf(m - mn)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mn));
    m = mn;
}

/* y[r, :] = softmax(x[r, :]); a row that is all −∞ gives zeros (as the CPU). One warp per row (row =
 * blockIdx.x·8 + warp); lane l runs the online recurrence over x[r, l], x[r, l + 32], … keeping its own
 * (max, sum), the lanes merge theirs with shuffles, then every lane writes exp(x − max)/sum for its
 * elements. Each lane reads an element before writing it, so y may alias x. */
template <typename T>
__global__ void softmax_kernel(const T *x, T *y, int64_t R, int64_t D) {
    const int lane = threadIdx.x % 32;
    const int64_t r = (int64_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
    if (r >= R) return;
    const T *xr = x + r * D;
    T *yr = y + r * D;
    float m = -INFINITY, s = 0.0f;
    for (int64_t i = lane; i < D; i += 32) {
        const float v = pea_ld(xr + i);
        if (v > m) {
            s = (m == -INFINITY ? 0.0f : s * expf(m - v)) + 1.0f;
            m = v;
        } else if (v != -INFINITY) {
            s += expf(v - m);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(PEA_FULL_MASK, m, o);
        const float s2 = __shfl_xor_sync(PEA_FULL_MASK, s, o);
        softmax_merge(m, s, m2, s2);
    }
    const float inv = m == -INFINITY ? 0.0f : 1.0f / s;
    for (int64_t i = lane; i < D; i += 32) {
        const float v = pea_ld(xr + i);
        pea_st(yr + i, m == -INFINITY ? 0.0f : expf(v - m) * inv);
    }
}

template <typename T>
static int softmax_launch(pea_cuda_context *ctx, const void *x, void *y, int64_t R, int64_t D) {
    PEA_KERNEL(ctx, "softmax", softmax_kernel<T>, (unsigned)((R + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK),
               32 * ROWS_PER_BLOCK, 0, (const T *)x, (T *)y, R, D);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_softmax(pea_cuda_context *ctx, int dtype, const void *x, void *y, int64_t R, int64_t D) {
    static const char *op = "softmax";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE_ROWS(ctx, op, R, D);
    if (R == 0 || D == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && y, "NULL tensor (x %p, y %p)", x, y);
    return PEA_FLOAT_SWITCH(dtype, softmax_launch, ctx, x, y, R, D);
}

/* dx = y ⊙ (dy − Σ_j dy_j·y_j) per row of D, from the forward's output y (dy, y, dx [R, D]). One warp per row
 * (row = blockIdx.x·8 + warp): lane l sums dy·y over features l, l + 32, …, the warp adds the lanes' sums with
 * shuffles, then each lane writes its features. Every element is read before any is written, so dx may alias
 * dy or y. */
template <typename T>
__global__ void softmax_backward_kernel(const T *dy, const T *y, T *dx, int64_t R, int64_t D) {
    const int lane = threadIdx.x % 32;
    const int64_t r = (int64_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
    if (r >= R) return;
    const T *dyr = dy + r * D, *yr = y + r * D;
    T *dxr = dx + r * D;
    float s = 0.0f;
    for (int64_t i = lane; i < D; i += 32) s += pea_ld(dyr + i) * pea_ld(yr + i);
    const float dot = pea_warp_sum(s);
    for (int64_t i = lane; i < D; i += 32) {
        const float yv = pea_ld(yr + i);
        pea_st(dxr + i, yv * (pea_ld(dyr + i) - dot));
    }
}

template <typename T>
static int softmax_backward_launch(pea_cuda_context *ctx, const void *dy, const void *y, void *dx, int64_t R, int64_t D) {
    PEA_KERNEL(ctx, "softmax_backward", softmax_backward_kernel<T>, (unsigned)((R + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK),
               32 * ROWS_PER_BLOCK, 0, (const T *)dy, (const T *)y, (T *)dx, R, D);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_softmax_backward(pea_cuda_context *ctx, int dtype, const void *dy, const void *y, void *dx,
                                         int64_t R, int64_t D) {
    static const char *op = "softmax_backward";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE_ROWS(ctx, op, R, D);
    if (R == 0 || D == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, dy && y && dx, "NULL tensor (dy %p, y %p, dx %p)", dy, y, dx);
    return PEA_FLOAT_SWITCH(dtype, softmax_backward_launch, ctx, dy, y, dx, R, D);
}
