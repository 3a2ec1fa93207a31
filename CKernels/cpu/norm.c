/*
 * norm.c — group norm (optionally fused with SiLU), layer norm and softmax, and their backward passes.
 *
 * Statistics are accumulated in double in two passes (mean, then the biased variance of the centred
 * values): exact enough for activations with a large mean, and these kernels are memory-bound anyway.
 * Work is split over the independent units: (sample, group) pairs for group norm, rows otherwise.
 */
#include "ckernels.h"

#include <math.h>
#include <stdlib.h>

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* ---- group norm: x [B, C, S], G groups; unit u = (b, g) covers channels g·C/G … (g+1)·C/G − 1 ---- */

typedef struct {
    const float *x, *gamma, *beta;
    float *y;
    int64_t C, S, G;
    float eps;
    int fuse_silu;
} group_norm_ctx;

static void group_norm_units(void *arg, int64_t begin, int64_t end) {
    const group_norm_ctx *ctx = arg;
    const int64_t Cg = ctx->C / ctx->G, n = Cg * ctx->S;
    for (int64_t u = begin; u < end; u++) {
        const int64_t g = u % ctx->G;
        const float *x = ctx->x + u * n;      /* the group's channels are contiguous in NCHW */
        float *y = ctx->y + u * n;
        double sum = 0;
        for (int64_t i = 0; i < n; i++) sum += x[i];
        const double mean = sum / (double)n;
        double sq = 0;
        for (int64_t i = 0; i < n; i++) { double d = x[i] - mean; sq += d * d; }
        const float rstd = (float)(1.0 / sqrt(sq / (double)n + ctx->eps));
        const float m = (float)mean;
        for (int64_t c = 0; c < Cg; c++) {
            const int64_t channel = g * Cg + c;
            const float scale = rstd * (ctx->gamma ? ctx->gamma[channel] : 1.0f);
            const float shift = ctx->beta ? ctx->beta[channel] : 0.0f;
            const float *xc = x + c * ctx->S;
            float *yc = y + c * ctx->S;
            if (ctx->fuse_silu) {
                for (int64_t s = 0; s < ctx->S; s++) yc[s] = silu((xc[s] - m) * scale + shift);
            } else {
                for (int64_t s = 0; s < ctx->S; s++) yc[s] = (xc[s] - m) * scale + shift;
            }
        }
    }
}

void ck_group_norm_f32(const float *x, const float *gamma, const float *beta, float *y,
                       int64_t B, int64_t C, int64_t S, int64_t G, float eps, int fuse_silu) {
    group_norm_ctx ctx = {x, gamma, beta, y, C, S, G, eps, fuse_silu};
    ck_parallel_for(B * G, 1, group_norm_units, &ctx);
}

/* ---- group norm backward: per unit (b, g), with x̂ = (x − μ)·rstd recomputed from x ----
 * Let dẑ = dy (or dy·silu'(z), z = γ·x̂ + β, with fuse_silu) and dx̂ = γ·dẑ. Over the group's n elements
 *   dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)).
 * Pass 1 writes dx̂ into dx and sums dx̂ and dx̂·x̂ (in double); pass 2 turns dx̂ into dx in place. */

typedef struct {
    const float *dy, *x, *gamma, *beta;
    float *dx;
    int64_t C, S, G;
    float eps;
    int fuse_silu;
} group_norm_backward_ctx;

/* d silu(z)/dz = σ(z)·(1 + z·(1 − σ(z))) */
static inline float silu_grad(float z) {
    const float s = 1.0f / (1.0f + expf(-z));
    return s * (1.0f + z * (1.0f - s));
}

static void group_norm_backward_units(void *arg, int64_t begin, int64_t end) {
    const group_norm_backward_ctx *ctx = arg;
    const int64_t Cg = ctx->C / ctx->G, n = Cg * ctx->S, S = ctx->S;
    for (int64_t u = begin; u < end; u++) {
        const int64_t g = u % ctx->G;
        const float *x = ctx->x + u * n, *dy = ctx->dy + u * n;
        float *dx = ctx->dx + u * n;
        double sum = 0;
        for (int64_t i = 0; i < n; i++) sum += x[i];
        const double mean = sum / (double)n;
        double sq = 0;
        for (int64_t i = 0; i < n; i++) { double d = x[i] - mean; sq += d * d; }
        const float rstd = (float)(1.0 / sqrt(sq / (double)n + ctx->eps));
        const float m = (float)mean;
        double sum_dxhat = 0, sum_dxhat_xhat = 0;
        for (int64_t c = 0; c < Cg; c++) {
            const int64_t channel = g * Cg + c;
            const float gamma = ctx->gamma ? ctx->gamma[channel] : 1.0f;
            const float beta = ctx->beta ? ctx->beta[channel] : 0.0f;
            const float *xc = x + c * S, *dyc = dy + c * S;
            float *dxc = dx + c * S;
            for (int64_t s = 0; s < S; s++) {
                const float xhat = (xc[s] - m) * rstd;
                float dz = dyc[s];
                if (ctx->fuse_silu) dz *= silu_grad(gamma * xhat + beta);
                const float dxhat = gamma * dz;
                dxc[s] = dxhat;
                sum_dxhat += dxhat;
                sum_dxhat_xhat += dxhat * xhat;
            }
        }
        const float mean_dxhat = (float)(sum_dxhat / (double)n);
        const float mean_dxhat_xhat = (float)(sum_dxhat_xhat / (double)n);
        for (int64_t i = 0; i < n; i++) {
            const float xhat = (x[i] - m) * rstd;
            dx[i] = rstd * (dx[i] - mean_dxhat - xhat * mean_dxhat_xhat);
        }
    }
}

void ck_group_norm_backward_f32(const float *dy, const float *x, const float *gamma, const float *beta,
                                float *dx, int64_t B, int64_t C, int64_t S, int64_t G, float eps, int fuse_silu) {
    group_norm_backward_ctx ctx = {dy, x, gamma, beta, dx, C, S, G, eps, fuse_silu};
    ck_parallel_for(B * G, 1, group_norm_backward_units, &ctx);
}

/* ---- layer norm: one row of D features per unit ---- */

/* A row's mean and 1/√(biased variance + eps), summed in double (the forward and the backward share it). */
static void layer_norm_stats(const float *x, int64_t D, float eps, float *mean_out, float *rstd_out) {
    double sum = 0;
    for (int64_t i = 0; i < D; i++) sum += x[i];
    const double mean = sum / (double)D;
    double sq = 0;
    for (int64_t i = 0; i < D; i++) { double d = x[i] - mean; sq += d * d; }
    *mean_out = (float)mean;
    *rstd_out = (float)(1.0 / sqrt(sq / (double)D + eps));
}


typedef struct {
    const float *x, *gamma, *beta;
    float *y;
    int64_t D;
    float eps;
} layer_norm_ctx;

static void layer_norm_rows(void *arg, int64_t begin, int64_t end) {
    const layer_norm_ctx *ctx = arg;
    const int64_t D = ctx->D;
    for (int64_t r = begin; r < end; r++) {
        const float *x = ctx->x + r * D;
        float *y = ctx->y + r * D;
        float m, rstd;
        layer_norm_stats(x, D, ctx->eps, &m, &rstd);
        for (int64_t i = 0; i < D; i++) {
            float v = (x[i] - m) * rstd;
            if (ctx->gamma) v *= ctx->gamma[i];
            if (ctx->beta) v += ctx->beta[i];
            y[i] = v;
        }
    }
}

void ck_layer_norm_f32(const float *x, const float *gamma, const float *beta, float *y,
                       int64_t R, int64_t D, float eps) {
    layer_norm_ctx ctx = {x, gamma, beta, y, D, eps};
    ck_parallel_for(R, 64, layer_norm_rows, &ctx);
}

/* ---- layer norm backward ----
 * Per row, with x̂ = (x − μ)·rstd and dx̂ = γ·dy:  dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)).
 * The parameter gradients dγ = Σ_rows dy·x̂ and dβ = Σ_rows dy are reduced by a second pass over column
 * blocks: each column is summed by one task in row order (in double), so the result does not depend on
 * the number of threads. The rows' (μ, rstd) are kept from the first pass. */

typedef struct {
    const float *dy, *x, *gamma;
    float *dx, *dgamma, *dbeta;
    float *stats;        /* [R, 2]: (μ, rstd) per row, or NULL: recomputed in the column pass */
    int64_t R, D;
    float eps;
} layer_norm_backward_ctx;

static void layer_norm_backward_rows(void *arg, int64_t begin, int64_t end) {
    const layer_norm_backward_ctx *ctx = arg;
    const int64_t D = ctx->D;
    for (int64_t r = begin; r < end; r++) {
        const float *x = ctx->x + r * D, *dy = ctx->dy + r * D;
        float *dx = ctx->dx + r * D;
        float m, rstd;
        layer_norm_stats(x, D, ctx->eps, &m, &rstd);
        if (ctx->stats) { ctx->stats[2 * r] = m; ctx->stats[2 * r + 1] = rstd; }
        double sum_dxhat = 0, sum_dxhat_xhat = 0;
        for (int64_t i = 0; i < D; i++) {
            const float dxhat = ctx->gamma ? ctx->gamma[i] * dy[i] : dy[i];
            sum_dxhat += dxhat;
            sum_dxhat_xhat += dxhat * ((x[i] - m) * rstd);
        }
        const float mean_dxhat = (float)(sum_dxhat / (double)D);
        const float mean_dxhat_xhat = (float)(sum_dxhat_xhat / (double)D);
        for (int64_t i = 0; i < D; i++) {
            const float dxhat = ctx->gamma ? ctx->gamma[i] * dy[i] : dy[i];
            const float xhat = (x[i] - m) * rstd;
            dx[i] = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
        }
    }
}

#define LN_COLUMN_BLOCK 64

static void layer_norm_backward_columns(void *arg, int64_t begin, int64_t end) {
    const layer_norm_backward_ctx *ctx = arg;
    const int64_t D = ctx->D;
    for (int64_t c0 = begin; c0 < end; c0 += LN_COLUMN_BLOCK) {
        const int64_t c1 = c0 + LN_COLUMN_BLOCK < end ? c0 + LN_COLUMN_BLOCK : end;
        double sg[LN_COLUMN_BLOCK] = {0}, sb[LN_COLUMN_BLOCK] = {0};
        for (int64_t r = 0; r < ctx->R; r++) {
            const float *x = ctx->x + r * D, *dy = ctx->dy + r * D;
            float m, rstd;
            if (ctx->stats) { m = ctx->stats[2 * r]; rstd = ctx->stats[2 * r + 1]; }
            else layer_norm_stats(x, D, ctx->eps, &m, &rstd);
            for (int64_t c = c0; c < c1; c++) {
                sg[c - c0] += (double)(dy[c] * ((x[c] - m) * rstd));
                sb[c - c0] += dy[c];
            }
        }
        for (int64_t c = c0; c < c1; c++) {
            if (ctx->dgamma) ctx->dgamma[c] = (float)sg[c - c0];
            if (ctx->dbeta) ctx->dbeta[c] = (float)sb[c - c0];
        }
    }
}

void ck_layer_norm_backward_f32(const float *dy, const float *x, const float *gamma, float *dx,
                                float *dgamma, float *dbeta, int64_t R, int64_t D, float eps) {
    const int params = dgamma != NULL || dbeta != NULL;
    /* without memory for the statistics the column pass recomputes them (slower, same result) */
    float *stats = params && R > 0 ? malloc((size_t)R * 2 * sizeof(float)) : NULL;
    layer_norm_backward_ctx ctx = {dy, x, gamma, dx, dgamma, dbeta, stats, R, D, eps};
    ck_parallel_for(R, 64, layer_norm_backward_rows, &ctx);
    if (params) ck_parallel_for(D, LN_COLUMN_BLOCK, layer_norm_backward_columns, &ctx);
    free(stats);
}

/* ---- softmax over the last dimension; a row that is entirely −∞ gives zeros rather than NaN ---- */

typedef struct {
    const float *x;
    float *y;
    int64_t D;
} softmax_ctx;

static void softmax_rows(void *arg, int64_t begin, int64_t end) {
    const softmax_ctx *ctx = arg;
    const int64_t D = ctx->D;
    for (int64_t r = begin; r < end; r++) {
        const float *x = ctx->x + r * D;
        float *y = ctx->y + r * D;
        float max = -INFINITY;
        for (int64_t i = 0; i < D; i++) max = x[i] > max ? x[i] : max;
        if (max == -INFINITY) {
            for (int64_t i = 0; i < D; i++) y[i] = 0.0f;
            continue;
        }
        double sum = 0;
        for (int64_t i = 0; i < D; i++) { float e = expf(x[i] - max); y[i] = e; sum += e; }
        const float inv = (float)(1.0 / sum);
        for (int64_t i = 0; i < D; i++) y[i] *= inv;
    }
}

void ck_softmax_f32(const float *x, float *y, int64_t R, int64_t D) {
    softmax_ctx ctx = {x, y, D};
    ck_parallel_for(R, 16, softmax_rows, &ctx);
}

/* ---- softmax backward from the output y: dx = y ⊙ (dy − Σ_j dy_j·y_j), per row ---- */

typedef struct {
    const float *dy, *y;
    float *dx;
    int64_t D;
} softmax_backward_ctx;

static void softmax_backward_rows(void *arg, int64_t begin, int64_t end) {
    const softmax_backward_ctx *ctx = arg;
    const int64_t D = ctx->D;
    for (int64_t r = begin; r < end; r++) {
        const float *dy = ctx->dy + r * D, *y = ctx->y + r * D;
        float *dx = ctx->dx + r * D;
        double dot = 0;
        for (int64_t i = 0; i < D; i++) dot += dy[i] * y[i];
        const float d = (float)dot;
        for (int64_t i = 0; i < D; i++) dx[i] = y[i] * (dy[i] - d);
    }
}

void ck_softmax_backward_f32(const float *dy, const float *y, float *dx, int64_t R, int64_t D) {
    softmax_backward_ctx ctx = {dy, y, dx, D};
    ck_parallel_for(R, 16, softmax_backward_rows, &ctx);
}
