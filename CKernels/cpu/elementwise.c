/*
 * elementwise.c — activations, broadcasting arithmetic, data movement, embeddings and reductions, and the
 * backward passes of the activations, GEGLU and upsampling.
 *
 * Every kernel here is memory-bound and trivially parallel: the index space is cut into contiguous ranges
 * (GRAIN elements or rows at least) handed to the thread pool. GELU computes erfc and exp with fastmath.h's
 * polynomials, and GEGLU's loops (the UNet's feed-forward) are compiled twice, for AVX2 + FMA (where they
 * vectorise) and for any CPU, the one to run picked at run time (RANGE_KERNEL): with libm's scalar erff and
 * expf, GEGLU and its gradient were 3% of a training step on the CPU.
 */
#include "ckernels.h"
#include "fastmath.h"

#include <math.h>
#include <string.h>

#define GRAIN 16384

/* ---- activations ---------------------------------------------------------------------------------- */

typedef struct {
    const float *x;
    float *y;
    int kind;
} unary_ctx;

/* gelu(v) = v·Φ(v) = ½·v·(1 + erf(v/√2)), written as ½·v·erfc(−v/√2) so that negative v keep their relative
 * accuracy (1 + erf cancels there). */
static inline float gelu_erf(float v) { return 0.5f * v * erfc_poly(-v * 0.70710678118654752f); }

static inline float gelu_tanh(float v) {
    const float k = 0.79788456080286536f;   /* sqrt(2/π) */
    return 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
}

static void unary_range(void *arg, int64_t begin, int64_t end) {
    const unary_ctx *ctx = arg;
    const float *x = ctx->x;
    float *y = ctx->y;
    switch (ctx->kind) {
    case CK_ACT_GELU_ERF: for (int64_t i = begin; i < end; i++) y[i] = gelu_erf(x[i]); break;
    case CK_ACT_GELU_TANH: for (int64_t i = begin; i < end; i++) y[i] = gelu_tanh(x[i]); break;
    case CK_ACT_QUICK_GELU: for (int64_t i = begin; i < end; i++) y[i] = x[i] / (1.0f + expf(-1.702f * x[i])); break;
    case CK_ACT_SILU: for (int64_t i = begin; i < end; i++) y[i] = x[i] / (1.0f + expf(-x[i])); break;
    }
}

int ck_activation_f32(int kind, const float *x, float *y, int64_t n) {
    if (kind < 0 || kind >= CK_ACT_COUNT) return CK_EINVAL;
    unary_ctx ctx = {x, y, kind};
    ck_parallel_for(n, GRAIN, unary_range, &ctx);
    return CK_OK;
}

/* ---- activation backward: dx = dy · f'(x), from the forward's input ----
 *   gelu (erf):  Φ(x) + x·φ(x)
 *   gelu (tanh): with u = k·(x + 0.044715x³), t = tanh u:  ½(1 + t) + ½x·(1 − t²)·k·(1 + 3·0.044715x²)
 *   silu:        σ(x)·(1 + x·(1 − σ(x)))                                                                 */

static inline float gelu_erf_grad(float v) {
    const float inv_sqrt_2pi = 0.39894228040143268f;
    return 0.5f * erfc_poly(-v * 0.70710678118654752f) + v * inv_sqrt_2pi * exp_poly(-0.5f * v * v);
}

static inline float gelu_tanh_grad(float v) {
    const float k = 0.79788456080286536f, c = 0.044715f;
    const float t = tanhf(k * (v + c * v * v * v));
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * k * (1.0f + 3.0f * c * v * v);
}

static inline float silu_grad(float v) {
    const float s = 1.0f / (1.0f + expf(-v));
    return s * (1.0f + v * (1.0f - s));
}

typedef struct {
    const float *dy, *x;
    float *dx;
    int kind;
} unary_backward_ctx;

static void unary_backward_range(void *arg, int64_t begin, int64_t end) {
    const unary_backward_ctx *ctx = arg;
    const float *dy = ctx->dy, *x = ctx->x;
    float *dx = ctx->dx;
    switch (ctx->kind) {
    case CK_ACT_GELU_ERF: for (int64_t i = begin; i < end; i++) dx[i] = dy[i] * gelu_erf_grad(x[i]); break;
    case CK_ACT_GELU_TANH: for (int64_t i = begin; i < end; i++) dx[i] = dy[i] * gelu_tanh_grad(x[i]); break;
    case CK_ACT_SILU: for (int64_t i = begin; i < end; i++) dx[i] = dy[i] * silu_grad(x[i]); break;
    }
}

int ck_activation_backward_f32(int kind, const float *dy, const float *x, float *dx, int64_t n) {
    if (!CK_ACT_HAS_BACKWARD(kind)) return CK_EINVAL;
    unary_backward_ctx ctx = {dy, x, dx, kind};
    ck_parallel_for(n, GRAIN, unary_backward_range, &ctx);
    return CK_OK;
}

/* ---- GEGLU: row r of x is [value (D) | gate (D)] ---- */

/* A pool task `name` that runs `name_body` (always inlined) compiled for AVX2 + FMA where the CPU has them,
 * and for any x86-64 (or other CPU) otherwise. */
#if defined(__x86_64__)
#define RANGE_KERNEL(name)                                                                                     \
    __attribute__((target("avx2,fma"))) static void name##_avx2(void *arg, int64_t begin, int64_t end) {   \
        name##_body(arg, begin, end);                                                                    \
    }                                                                                                    \
    static void name##_plain(void *arg, int64_t begin, int64_t end) { name##_body(arg, begin, end); }    \
    static void name(void *arg, int64_t begin, int64_t end) {                                            \
        if (ck_cpu_has_avx2_fma()) name##_avx2(arg, begin, end);                                         \
        else name##_plain(arg, begin, end);                                                              \
    }
#else
#define RANGE_KERNEL(name) \
    static void name(void *arg, int64_t begin, int64_t end) { name##_body(arg, begin, end); }
#endif

typedef struct {
    const float *x;
    float *y;
    int64_t D;
} geglu_ctx;

static inline __attribute__((always_inline)) void geglu_rows_body(void *arg, int64_t begin, int64_t end) {
    const geglu_ctx *ctx = arg;
    for (int64_t r = begin; r < end; r++) {
        const float *restrict value = ctx->x + r * 2 * ctx->D, *restrict gate = value + ctx->D;
        float *restrict y = ctx->y + r * ctx->D;
        for (int64_t i = 0; i < ctx->D; i++) y[i] = value[i] * gelu_erf(gate[i]);
    }
}
RANGE_KERNEL(geglu_rows)

void ck_geglu_f32(const float *x, float *y, int64_t R, int64_t D) {
    geglu_ctx ctx = {x, y, D};
    ck_parallel_for(R, GRAIN / (D > 0 ? D : 1) + 1, geglu_rows, &ctx);
}

typedef struct {
    const float *dy, *x;
    float *dx;
    int64_t D;
} geglu_backward_ctx;

/* GEGLU backward: d value = dy · gelu(gate), d gate = dy · value · gelu'(gate). */
static inline __attribute__((always_inline)) void geglu_backward_rows_body(void *arg, int64_t begin, int64_t end) {
    const geglu_backward_ctx *ctx = arg;
    const int64_t D = ctx->D;
    for (int64_t r = begin; r < end; r++) {
        const float *restrict value = ctx->x + r * 2 * D, *restrict gate = value + D, *restrict dy = ctx->dy + r * D;
        float *restrict dvalue = ctx->dx + r * 2 * D, *restrict dgate = dvalue + D;
        for (int64_t i = 0; i < D; i++) {
            dvalue[i] = dy[i] * gelu_erf(gate[i]);
            dgate[i] = dy[i] * value[i] * gelu_erf_grad(gate[i]);
        }
    }
}
RANGE_KERNEL(geglu_backward_rows)

void ck_geglu_backward_f32(const float *dy, const float *x, float *dx, int64_t R, int64_t D) {
    geglu_backward_ctx ctx = {dy, x, dx, D};
    ck_parallel_for(R, GRAIN / (D > 0 ? D : 1) + 1, geglu_backward_rows, &ctx);
}

/* ---- affine: y = alpha·x + beta ---- */

typedef struct {
    const float *x;
    float *y;
    float alpha, beta;
} affine_ctx;

static void affine_range(void *arg, int64_t begin, int64_t end) {
    const affine_ctx *ctx = arg;
    for (int64_t i = begin; i < end; i++) ctx->y[i] = ctx->alpha * ctx->x[i] + ctx->beta;
}

void ck_affine_f32(const float *x, float *y, int64_t n, float alpha, float beta) {
    affine_ctx ctx = {x, y, alpha, beta};
    ck_parallel_for(n, GRAIN, affine_range, &ctx);
}

/* ---- strided index spaces ---------------------------------------------------------------------------
 * The index space `shape` (rank ≥ 1) is walked as rows of its last axis: row index → the element offset of
 * the row's start in an operand, from that operand's strides. */

static int64_t row_offset(int64_t row, const int64_t *shape, const int64_t *strides, int rank) {
    int64_t offset = 0;
    for (int axis = rank - 2; axis >= 0; axis--) {
        offset += (row % shape[axis]) * strides[axis];
        row /= shape[axis];
    }
    return offset;
}

static int64_t product(const int64_t *shape, int count) {
    int64_t n = 1;
    for (int i = 0; i < count; i++) n *= shape[i];
    return n;
}

/* ---- binary ops with broadcasting ---- */

typedef struct {
    int op;
    const float *a, *b;
    const int64_t *as, *bs, *shape;
    float *y;
    int rank;
} binary_ctx;

static void binary_rows(void *arg, int64_t begin, int64_t end) {
    const binary_ctx *ctx = arg;
    const int last = ctx->rank - 1;
    const int64_t n = ctx->shape[last], sa = ctx->as[last], sb = ctx->bs[last];
    for (int64_t row = begin; row < end; row++) {
        const float *a = ctx->a + row_offset(row, ctx->shape, ctx->as, ctx->rank);
        const float *b = ctx->b + row_offset(row, ctx->shape, ctx->bs, ctx->rank);
        float *y = ctx->y + row * n;
        switch (ctx->op) {
        case CK_ADD: for (int64_t i = 0; i < n; i++) y[i] = a[i * sa] + b[i * sb]; break;
        case CK_SUB: for (int64_t i = 0; i < n; i++) y[i] = a[i * sa] - b[i * sb]; break;
        case CK_MUL: for (int64_t i = 0; i < n; i++) y[i] = a[i * sa] * b[i * sb]; break;
        case CK_DIV: for (int64_t i = 0; i < n; i++) y[i] = a[i * sa] / b[i * sb]; break;
        }
    }
}

void ck_binary_f32(int op, const float *a, const int64_t *a_strides, const float *b, const int64_t *b_strides,
                   float *y, const int64_t *shape, int rank) {
    binary_ctx ctx = {op, a, b, a_strides, b_strides, shape, y, rank};
    const int64_t rows = product(shape, rank - 1), n = shape[rank - 1];
    ck_parallel_for(rows, GRAIN / (n > 0 ? n : 1) + 1, binary_rows, &ctx);
}

/* ---- strided copy ---- */

typedef struct {
    const char *src;
    char *dst;
    const int64_t *ss, *ds, *shape;
    int rank;
    int64_t size;
} copy_ctx;

static void copy_rows(void *arg, int64_t begin, int64_t end) {
    const copy_ctx *ctx = arg;
    const int last = ctx->rank - 1;
    const int64_t n = ctx->shape[last], s = ctx->ss[last], d = ctx->ds[last], size = ctx->size;
    for (int64_t row = begin; row < end; row++) {
        const char *src = ctx->src + row_offset(row, ctx->shape, ctx->ss, ctx->rank) * size;
        char *dst = ctx->dst + row_offset(row, ctx->shape, ctx->ds, ctx->rank) * size;
        if (s == 1 && d == 1) {
            memcpy(dst, src, (size_t)(n * size));
        } else if (size == 4) {
            for (int64_t i = 0; i < n; i++) memcpy(dst + i * d * 4, src + i * s * 4, 4);
        } else {
            for (int64_t i = 0; i < n; i++) memcpy(dst + i * d * size, src + i * s * size, (size_t)size);
        }
    }
}

void ck_copy_strided(const void *src, const int64_t *src_strides, void *dst, const int64_t *dst_strides,
                     const int64_t *shape, int rank, int64_t elem_size) {
    copy_ctx ctx = {src, dst, src_strides, dst_strides, shape, rank, elem_size};
    const int64_t rows = product(shape, rank - 1), n = shape[rank - 1];
    ck_parallel_for(rows, GRAIN / (n > 0 ? n : 1) + 1, copy_rows, &ctx);
}

/* ---- nearest 2× upsampling: one task row per input row (plane p, row i) → two output rows ---- */

typedef struct {
    const float *x;
    float *y;
    int64_t H, W;
} upsample_ctx;

static void upsample_rows(void *arg, int64_t begin, int64_t end) {
    const upsample_ctx *ctx = arg;
    const int64_t W = ctx->W;
    for (int64_t row = begin; row < end; row++) {       /* row = p·H + i */
        const float *in = ctx->x + row * W;
        float *out = ctx->y + row * 4 * W;               /* output rows 2i and 2i+1 of plane p */
        for (int64_t j = 0; j < W; j++) out[2 * j] = out[2 * j + 1] = in[j];
        memcpy(out + 2 * W, out, (size_t)(2 * W) * sizeof(float));
    }
}

void ck_upsample_nearest2x_f32(const float *x, float *y, int64_t P, int64_t H, int64_t W) {
    upsample_ctx ctx = {x, y, H, W};
    ck_parallel_for(P * H, GRAIN / (4 * W + 1) + 1, upsample_rows, &ctx);
}

/* Upsampling backward: dx[p, i, j] = the sum of the 2×2 block dy[p, 2i…2i+1, 2j…2j+1]; one task row per
 * output row (p, i). */
static void upsample_backward_rows(void *arg, int64_t begin, int64_t end) {
    const upsample_ctx *ctx = arg;
    const int64_t W = ctx->W;
    for (int64_t row = begin; row < end; row++) {
        const float *top = ctx->x + row * 4 * W, *bottom = top + 2 * W;
        float *out = ctx->y + row * W;
        for (int64_t j = 0; j < W; j++) out[j] = (top[2 * j] + top[2 * j + 1]) + (bottom[2 * j] + bottom[2 * j + 1]);
    }
}

void ck_upsample_nearest2x_backward_f32(const float *dy, float *dx, int64_t P, int64_t H, int64_t W) {
    upsample_ctx ctx = {dy, dx, H, W};
    ck_parallel_for(P * H, GRAIN / (4 * W + 1) + 1, upsample_backward_rows, &ctx);
}

/* ---- embedding lookup ---- */

int ck_embedding_f32(const void *ids, int ids_are_i64, int64_t n, const float *table, int64_t vocab,
                     int64_t D, float *y) {
    for (int64_t i = 0; i < n; i++) {
        int64_t id = ids_are_i64 ? ((const int64_t *)ids)[i] : ((const int32_t *)ids)[i];
        if (id < 0 || id >= vocab) return CK_ERANGE;
        memcpy(y + i * D, table + id * D, (size_t)D * sizeof(float));
    }
    return CK_OK;
}

/* ---- sinusoidal timestep embedding, computed in f32 in the same order as diffusers ---- */

void ck_timestep_embedding_f32(const float *t, int64_t B, int64_t dim, int flip_sin_to_cos,
                               float downscale_freq_shift, float scale, float max_period, float *y) {
    const int64_t half = dim / 2;
    const float log_period = -(float)log((double)max_period);
    for (int64_t b = 0; b < B; b++) {
        float *row = y + b * dim;
        for (int64_t i = 0; i < half; i++) {
            const float exponent = ((float)i * log_period) / ((float)half - downscale_freq_shift);
            const float arg = scale * (t[b] * expf(exponent));
            const float s = sinf(arg), c = cosf(arg);
            row[i] = flip_sin_to_cos ? c : s;
            row[half + i] = flip_sin_to_cos ? s : c;
        }
        if (dim % 2 == 1) row[dim - 1] = 0.0f;
    }
}

/* ---- mean over the middle axis of [outer, n, inner] ---- */

typedef struct {
    const float *x;
    float *y;
    int64_t n, inner;
} mean_ctx;

static void mean_outer(void *arg, int64_t begin, int64_t end) {
    const mean_ctx *ctx = arg;
    for (int64_t o = begin; o < end; o++) {
        for (int64_t i = 0; i < ctx->inner; i++) {
            double sum = 0;
            for (int64_t k = 0; k < ctx->n; k++) sum += ctx->x[(o * ctx->n + k) * ctx->inner + i];
            ctx->y[o * ctx->inner + i] = (float)(sum / (double)ctx->n);
        }
    }
}

void ck_mean_f32(const float *x, float *y, int64_t outer, int64_t n, int64_t inner) {
    mean_ctx ctx = {x, y, n, inner};
    ck_parallel_for(outer, 1, mean_outer, &ctx);
}
