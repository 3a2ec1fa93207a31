/*
 * norm.cu — group norm (optionally followed by SiLU), layer norm and softmax over the last axis, as
 * ck_group_norm_f32, ck_layer_norm_f32 and ck_softmax_f32 (cpu/norm.c). Statistics accumulate in f32
 * (the CPU uses f64): Welford/Chan merges for group norm, two passes over a cached row for layer norm,
 * an online (max, sum) pass for softmax.
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

/* y = γ[c]·(x − mean)·rstd + β[c] (then SiLU if silu) over the group (b, g) of x [B, C, S]: the group's Cg·S
 * values are contiguous. One block per (b, g) = blockIdx.x. Pass 1: thread t folds the elements t,
 * t + blockDim, … (with vec: the 4-element chunks, each loaded with one vector load and summarised before the
 * fold) into a Welford summary in registers; summaries merge across the warp with shuffles, then across warps
 * through shared memory, giving mean and the biased variance. Pass 2 re-reads the group (from L2) with the same
 * mapping and writes y; with vec (S a multiple of 4, x and y aligned) a chunk never straddles two channels. */
template <typename T>
__global__ void group_norm_kernel(const T *x, const T *gamma, const T *beta, T *y, int64_t C, int64_t S, int64_t G,
                                  float eps, int silu, int vec) {
    PEA_SHARED_ARRAY(float, s_n, 32);
    PEA_SHARED_ARRAY(float, s_mean, 32);
    PEA_SHARED_ARRAY(float, s_m2, 32);
    PEA_SHARED_ARRAY(float, s_stat, 2);
    const int64_t u = blockIdx.x, g = u % G, Cg = C / G, n = Cg * S;
    const T *xg = x + u * n;
    T *yg = y + u * n;
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
    for (int o = 16; o > 0; o >>= 1) {
        const float nb = __shfl_xor_sync(PEA_FULL_MASK, cnt, o);
        const float mb = __shfl_xor_sync(PEA_FULL_MASK, mean, o);
        const float m2b = __shfl_xor_sync(PEA_FULL_MASK, m2, o);
        welford_merge(cnt, mean, m2, nb, mb, m2b);
    }
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
        for (int o = 16; o > 0; o >>= 1) {
            const float nb = __shfl_xor_sync(PEA_FULL_MASK, cnt, o);
            const float mb = __shfl_xor_sync(PEA_FULL_MASK, mean, o);
            const float m2b = __shfl_xor_sync(PEA_FULL_MASK, m2, o);
            welford_merge(cnt, mean, m2, nb, mb, m2b);
        }
        if (lane == 0) {
            s_stat[0] = mean;
            s_stat[1] = rsqrtf(m2 / (float)n + eps);
        }
    }
    __syncthreads();
    const float mu = s_stat[0], rstd = s_stat[1];

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

template <typename T>
static int group_norm_launch(pea_cuda_context *ctx, const void *x, const void *gamma, const void *beta, void *y,
                             int64_t B, int64_t C, int64_t S, int64_t G, float eps, int fuse_silu) {
    const int64_t n = C / G * S;
    const size_t align = 4 * sizeof(T);
    const int vec = S % 4 == 0 && (uintptr_t)x % align == 0 && (uintptr_t)y % align == 0;
    const int threads = n >= 16384 ? 512 : 256;
    PEA_KERNEL(ctx, "group_norm", group_norm_kernel<T>, (unsigned)(B * G), threads, 0, (const T *)x,
               (const T *)gamma, (const T *)beta, (T *)y, C, S, G, eps, fuse_silu, vec);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_group_norm(pea_cuda_context *ctx, int dtype, const void *x, const void *gamma,
                                   const void *beta, void *y, int64_t B, int64_t C, int64_t S, int64_t G, float eps,
                                   int fuse_silu) {
    static const char *op = "group_norm";
    PEA_BEGIN(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, B >= 0 && C >= 0 && S >= 0 && G >= 1, "shape B %lld, C %lld, S %lld, G %lld", (long long)B,
                (long long)C, (long long)S, (long long)G);
    PEA_REQUIRE(ctx, op, C % G == 0, "C %lld is not a multiple of G %lld", (long long)C, (long long)G);
    PEA_REQUIRE(ctx, op, B * G <= INT_MAX, "B·G = %lld blocks is too many", (long long)(B * G));
    if (B == 0 || C == 0 || S == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && y, "NULL tensor (x %p, y %p)", x, y);
    return PEA_FLOAT_SWITCH(dtype, group_norm_launch, ctx, x, gamma, beta, y, B, C, S, G, eps, fuse_silu);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Layer norm                                                                                            */

enum { ROWS_PER_BLOCK = 8 }; /* warps per block for the warp-per-row kernels */

/* y[r, :] = (x[r, :] − mean)·rstd·γ + β over rows of D. One warp per row (row = blockIdx.x·8 + warp); lane l
 * handles features l, l + 32, …: a pass for the mean, a pass for the biased variance of the centred values
 * (the row is in L1/L2 by then), a pass that writes y. A warp past the last row returns as a whole. */
template <typename T>
__global__ void layer_norm_kernel(const T *x, const T *gamma, const T *beta, T *y, int64_t R, int64_t D, float eps) {
    const int lane = threadIdx.x % 32;
    const int64_t r = (int64_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32;
    if (r >= R) return;
    const T *xr = x + r * D;
    T *yr = y + r * D;
    float s = 0.0f;
    for (int64_t i = lane; i < D; i += 32) s += pea_ld(xr + i);
    const float mean = pea_warp_sum(s) / (float)D;
    float sq = 0.0f;
    for (int64_t i = lane; i < D; i += 32) {
        const float d = pea_ld(xr + i) - mean;
        sq += d * d;
    }
    const float rstd = rsqrtf(pea_warp_sum(sq) / (float)D + eps);
    for (int64_t i = lane; i < D; i += 32) {
        float v = (pea_ld(xr + i) - mean) * rstd;
        if (gamma) v *= pea_ld(gamma + i);
        if (beta) v += pea_ld(beta + i);
        pea_st(yr + i, v);
    }
}

template <typename T>
static int layer_norm_launch(pea_cuda_context *ctx, const void *x, const void *gamma, const void *beta, void *y,
                             int64_t R, int64_t D, float eps) {
    PEA_KERNEL(ctx, "layer_norm", layer_norm_kernel<T>, (unsigned)((R + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK),
               32 * ROWS_PER_BLOCK, 0, (const T *)x, (const T *)gamma, (const T *)beta, (T *)y, R, D, eps);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_layer_norm(pea_cuda_context *ctx, int dtype, const void *x, const void *gamma,
                                   const void *beta, void *y, int64_t R, int64_t D, float eps) {
    static const char *op = "layer_norm";
    PEA_BEGIN(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, R >= 0 && D >= 0, "shape R %lld, D %lld", (long long)R, (long long)D);
    PEA_REQUIRE(ctx, op, (R + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK <= INT_MAX, "R %lld rows is too many", (long long)R);
    if (R == 0 || D == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && y, "NULL tensor (x %p, y %p)", x, y);
    return PEA_FLOAT_SWITCH(dtype, layer_norm_launch, ctx, x, gamma, beta, y, R, D, eps);
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
    PEA_BEGIN(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, R >= 0 && D >= 0, "shape R %lld, D %lld", (long long)R, (long long)D);
    PEA_REQUIRE(ctx, op, (R + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK <= INT_MAX, "R %lld rows is too many", (long long)R);
    if (R == 0 || D == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && y, "NULL tensor (x %p, y %p)", x, y);
    return PEA_FLOAT_SWITCH(dtype, softmax_launch, ctx, x, y, R, D);
}
