/*
 * optimizer.c — the AdamW update of the adapter's f32 master weights (ck_adamw_f32; ckernels.h states the
 * formula, Training/AdamW.swift where it comes from), and the sums of squares behind gradient clipping
 * (ck_sum_squares_f32). Memory-bound and elementwise: contiguous ranges of the
 * tensor go to the thread pool; with AVX2+FMA (checked at run time, as gemm.c does) the loop runs 8 lanes
 * wide with the two fmas as vfmadd, without them as scalar code with fmaf.
 *
 * Results must be torch's to the bit (OptimizerTests), so nothing may be contracted into an FMA beyond the
 * two fmaf calls: contraction is switched off for this file.
 */
#include "ckernels.h"

#include <math.h>
#include <stdlib.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define GRAIN 16384

typedef struct {
    float *p, *m, *v;
    const float *g;
    ck_adamw_hyper h;
} adamw_ctx;

/* Elements [b, e). The lerp's form depends on a scalar only (torch: fma(w, g − m, m) for w < 0.5, else
 * fma(w − 1, g − m, g)), so the loop stays branch-free per element and vectorises. */
static inline __attribute__((always_inline)) void adamw_range(const adamw_ctx *c, int64_t b, int64_t e) {
    float *restrict p = c->p, *restrict m = c->m, *restrict v = c->v;
    const float *restrict g = c->g;
    const ck_adamw_hyper h = c->h;
    const int low = h.weight1 < 0.5f;
    const float lerp_w = low ? h.weight1 : h.weight1 - 1.0f;
    for (int64_t i = b; i < e; i++) {
        const float mi = fmaf(lerp_w, g[i] - m[i], low ? m[i] : g[i]);
        const float vi = fmaf(h.weight2 * g[i], g[i], v[i] * h.keep2);
        const float pi = p[i] * h.decay;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi + (h.step_size * mi) / (sqrtf(vi) / h.correction2_root + h.eps);
    }
}

__attribute__((target("avx2,fma"))) static void adamw_avx2(void *ctx, int64_t b, int64_t e) {
    adamw_range((const adamw_ctx *)ctx, b, e);
}

static void adamw_generic(void *ctx, int64_t b, int64_t e) { adamw_range((const adamw_ctx *)ctx, b, e); }

void ck_adamw_f32(float *p, float *m, float *v, const float *g, int64_t n, const ck_adamw_hyper *h) {
    if (n <= 0) return;
    adamw_ctx c = {p, m, v, g, *h};
    const int fast = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    ck_parallel_for(n, GRAIN, fast ? adamw_avx2 : adamw_generic, &c);
}

/* ---- sums of squares ------------------------------------------------------------------------------ */

typedef struct {
    const float *x;
    int64_t n;
    double *block_sums;
} squares_ctx;

/* Block k's Σ x² with four interleaved partials: a fixed order (contraction is off, so also no FMAs), which
 * the compiler may still vectorise as written. */
static inline __attribute__((always_inline)) double block_squares(const float *x, int64_t n, int64_t k) {
    const int64_t start = k * CK_SUM_SQUARES_BLOCK, end = start + CK_SUM_SQUARES_BLOCK < n ? start + CK_SUM_SQUARES_BLOCK : n;
    double s[4] = {0, 0, 0, 0};
    int64_t i = start;
    for (; i + 4 <= end; i += 4)
        for (int j = 0; j < 4; j++) s[j] += (double)x[i + j] * (double)x[i + j];
    for (; i < end; i++) s[0] += (double)x[i] * (double)x[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

__attribute__((target("avx2,fma"))) static void squares_avx2(void *ctx, int64_t b, int64_t e) {
    const squares_ctx *c = (const squares_ctx *)ctx;
    for (int64_t k = b; k < e; k++) c->block_sums[k] = block_squares(c->x, c->n, k);
}

static void squares_generic(void *ctx, int64_t b, int64_t e) {
    const squares_ctx *c = (const squares_ctx *)ctx;
    for (int64_t k = b; k < e; k++) c->block_sums[k] = block_squares(c->x, c->n, k);
}

double ck_sum_squares_f32(const float *x, int64_t n) {
    if (n <= 0) return 0.0;
    const int64_t blocks = (n + CK_SUM_SQUARES_BLOCK - 1) / CK_SUM_SQUARES_BLOCK;
    double total = 0.0, stack[64], *sums = blocks <= 64 ? stack : (double *)malloc((size_t)blocks * sizeof(double));
    if (!sums) { /* no room for the block sums: the same blocks in the same order, on this thread */
        for (int64_t k = 0; k < blocks; k++) total += block_squares(x, n, k);
        return total;
    }
    squares_ctx c = {x, n, sums};
    const int fast = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    ck_parallel_for(blocks, 16, fast ? squares_avx2 : squares_generic, &c);
    for (int64_t k = 0; k < blocks; k++) total += sums[k];
    if (sums != stack) free(sums);
    return total;
}
