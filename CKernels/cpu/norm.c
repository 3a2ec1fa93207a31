/*
 * norm.c — group norm (optionally fused with SiLU), layer norm and softmax.
 *
 * Statistics are accumulated in double in two passes (mean, then the biased variance of the centred
 * values): exact enough for activations with a large mean, and these kernels are memory-bound anyway.
 * Work is split over the independent units: (sample, group) pairs for group norm, rows otherwise.
 */
#include "ckernels.h"

#include <math.h>

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

/* ---- layer norm: one row of D features per unit ---- */

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
        double sum = 0;
        for (int64_t i = 0; i < D; i++) sum += x[i];
        const double mean = sum / (double)D;
        double sq = 0;
        for (int64_t i = 0; i < D; i++) { double d = x[i] - mean; sq += d * d; }
        const float rstd = (float)(1.0 / sqrt(sq / (double)D + ctx->eps));
        const float m = (float)mean;
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
