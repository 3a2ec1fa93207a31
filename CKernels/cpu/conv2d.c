/*
 * conv2d.c — 2-D convolution (NCHW, torch's cross-correlation, no groups, no dilation) as im2col + GEMM.
 *
 *   x [B, Cin, H, W], w [Cout, Cin, kh, kw], bias [Cout] → y [B, Cout, Ho, Wo]
 *
 * For each image b the patches are unrolled into col [K = Cin·kh·kw, N = Ho·Wo], so that
 *   y[b] (Cout × N) = w (Cout × K) · col (K × N) + bias,
 * one GEMM per image. The bias (and a residual, y = conv + bias + residual as a ResNet block's skip adds it)
 * is written into y first and the GEMM accumulates onto it (beta = 1), so neither costs a pass of its own. A 1×1, stride-1, unpadded convolution needs no unrolling: x[b] already is the
 * K × N matrix. The weights may be stored in f32, bf16 or f16 (half-size weights): the GEMM widens them as
 * it packs them (ck_gemm_mixed). Padding may be asymmetric (diffusers' VAE downsampler pads right and bottom only).
 */
#include "ckernels.h"

#include <stdatomic.h>
#include <string.h>

int64_t ck_conv2d_out_h(const ck_conv2d_params *p) {
    return (p->H + p->padTop + p->padBottom - p->kh) / p->strideH + 1;
}

int64_t ck_conv2d_out_w(const ck_conv2d_params *p) {
    return (p->W + p->padLeft + p->padRight - p->kw) / p->strideW + 1;
}

static int is_pointwise(const ck_conv2d_params *p) {
    return p->kh == 1 && p->kw == 1 && p->strideH == 1 && p->strideW == 1 &&
           p->padTop == 0 && p->padBottom == 0 && p->padLeft == 0 && p->padRight == 0;
}

/* The unrolled patches of a large image would need K·Ho·Wo floats at once (2.4 GB for the 3×3, 256-channel
 * convolution of a VAE decoding 1024×1024); they are made and multiplied a band of output rows at a time, each
 * band at most this many floats (64 MB), so that memory stays bounded while every GEMM is still large. */
#define WORKSPACE_CAP_FLOATS ((int64_t)16 << 20)
static _Atomic int64_t band_cap_floats = WORKSPACE_CAP_FLOATS;   /* ck_conv2d_set_band_floats */

void ck_conv2d_set_band_floats(int64_t floats) { band_cap_floats = floats > 0 ? floats : WORKSPACE_CAP_FLOATS; }

/* Output rows per band: as many as fit the cap, at least one. */
static int64_t band_rows(const ck_conv2d_params *p) {
    int64_t row = p->Cin * p->kh * p->kw * ck_conv2d_out_w(p), rows = band_cap_floats / (row > 0 ? row : 1);
    int64_t Ho = ck_conv2d_out_h(p);
    return rows < 1 ? 1 : rows > Ho ? Ho : rows;
}

int64_t ck_conv2d_workspace_floats(const ck_conv2d_params *p) {
    if (is_pointwise(p)) return 0;
    return p->Cin * p->kh * p->kw * band_rows(p) * ck_conv2d_out_w(p);
}

typedef struct {
    const ck_conv2d_params *p;
    const float *x;      /* one image [Cin, H, W] */
    float *col;          /* [Cin·kh·kw, (oy1 − oy0)·Wo]: the band of output rows [oy0, oy1) */
    int64_t Wo, oy0, oy1;
} im2col_ctx;

/* One task per row r = (c, i, j) of col: col[r, (oy − oy0)·Wo + ox] = x[c, oy·sh − padTop + i, ox·sw − padLeft + j]
 * for the band's output rows oy, zero outside the image. */
static void im2col_rows(void *arg, int64_t begin, int64_t end) {
    const im2col_ctx *ctx = arg;
    const ck_conv2d_params *p = ctx->p;
    const int64_t Wo = ctx->Wo, band = ctx->oy1 - ctx->oy0;
    for (int64_t r = begin; r < end; r++) {
        int64_t c = r / (p->kh * p->kw), i = (r / p->kw) % p->kh, j = r % p->kw;
        const float *plane = ctx->x + c * p->H * p->W;
        float *row = ctx->col + r * band * Wo;
        for (int64_t oy = ctx->oy0; oy < ctx->oy1; oy++) {
            int64_t iy = oy * p->strideH - p->padTop + i;
            float *out = row + (oy - ctx->oy0) * Wo;
            if (iy < 0 || iy >= p->H) {
                memset(out, 0, (size_t)Wo * sizeof(float));
                continue;
            }
            const float *in = plane + iy * p->W;
            if (p->strideW == 1) {
                /* contiguous run: zeros left of the image, a copy, zeros right of it */
                int64_t ix0 = j - p->padLeft;
                int64_t lo = ix0 < 0 ? -ix0 : 0;
                int64_t hi = p->W - ix0 < Wo ? p->W - ix0 : Wo;
                if (hi < lo) hi = lo;
                if (lo > 0) memset(out, 0, (size_t)lo * sizeof(float));
                if (hi > lo) memcpy(out + lo, in + ix0 + lo, (size_t)(hi - lo) * sizeof(float));
                if (Wo > hi) memset(out + hi, 0, (size_t)(Wo - hi) * sizeof(float));
            } else {
                for (int64_t ox = 0; ox < Wo; ox++) {
                    int64_t ix = ox * p->strideW - p->padLeft + j;
                    out[ox] = (ix >= 0 && ix < p->W) ? in[ix] : 0.0f;
                }
            }
        }
    }
}

int ck_conv2d_f32(const ck_conv2d_params *p, const float *x, const void *w, int w_type, const float *bias,
                  const float *residual, float *y, float *workspace) {
    const int64_t Ho = ck_conv2d_out_h(p), Wo = ck_conv2d_out_w(p);
    const int64_t N = Ho * Wo, K = p->Cin * p->kh * p->kw, rows = band_rows(p);
    const float beta = bias || residual ? 1.0f : 0.0f;
    for (int64_t b = 0; b < p->B; b++) {
        const float *xb = x + b * p->Cin * p->H * p->W;
        float *yb = y + b * p->Cout * N;
        if (residual) {
            const float *rb = residual + b * p->Cout * N;
            for (int64_t o = 0; o < p->Cout; o++) {
                const float add = bias ? bias[o] : 0.0f;
                for (int64_t n = 0; n < N; n++) yb[o * N + n] = rb[o * N + n] + add;
            }
        } else if (bias) {
            for (int64_t o = 0; o < p->Cout; o++)
                for (int64_t n = 0; n < N; n++) yb[o * N + n] = bias[o];
        }
        if (is_pointwise(p)) {
            int status = ck_gemm_mixed(0, 0, p->Cout, N, K, 1.0f, w, w_type, K, xb, CK_F32, N, beta, yb, N);
            if (status != CK_OK) return status;
            continue;
        }
        /* y[:, band] = w · col(band): the band's columns of y are a block of its rows (ldc N) */
        for (int64_t oy0 = 0; oy0 < Ho; oy0 += rows) {
            int64_t oy1 = oy0 + rows < Ho ? oy0 + rows : Ho, n = (oy1 - oy0) * Wo;
            im2col_ctx ctx = {p, xb, workspace, Wo, oy0, oy1};
            ck_parallel_for(K, 1, im2col_rows, &ctx);
            int status = ck_gemm_mixed(0, 0, p->Cout, n, K, 1.0f, w, w_type, K, workspace, CK_F32, n, beta, yb + oy0 * Wo, N);
            if (status != CK_OK) return status;
        }
    }
    return CK_OK;
}

/* ---- data gradient ----------------------------------------------------------------------------------
 * The forward is y[b] = w · col(x[b]), so dx[b] = col2im(wᵀ · dy[b]): a GEMM gives dcol [K = Cin·kh·kw, N = Ho·Wo],
 * and col2im scatters each dcol entry back onto the input pixel that im2col read it from (summing where patches
 * overlap, dropping the padding). As in the forward this runs a band of output rows at a time (dx is zeroed
 * first and every band adds into it). The pointwise case is the GEMM alone, written straight into dx. */

typedef struct {
    const ck_conv2d_params *p;
    const float *col;    /* dcol [Cin·kh·kw, (oy1 − oy0)·Wo]: the band of output rows [oy0, oy1) */
    float *dx;           /* one image [Cin, H, W], added to */
    int64_t Wo, oy0, oy1;
} col2im_ctx;

/* One task per input channel c: its plane gathers the rows (c, i, j) of dcol, so planes never collide. */
static void col2im_channels(void *arg, int64_t begin, int64_t end) {
    const col2im_ctx *ctx = arg;
    const ck_conv2d_params *p = ctx->p;
    const int64_t Wo = ctx->Wo, band = ctx->oy1 - ctx->oy0, H = p->H, W = p->W;
    for (int64_t c = begin; c < end; c++) {
        float *plane = ctx->dx + c * H * W;
        for (int64_t i = 0; i < p->kh; i++) {
            for (int64_t j = 0; j < p->kw; j++) {
                const float *row = ctx->col + ((c * p->kh + i) * p->kw + j) * band * Wo;
                /* the output columns ox whose input column ox·sw − padLeft + j lies inside [0, W) */
                const int64_t ix0 = j - p->padLeft;
                int64_t lo = ix0 < 0 ? (-ix0 + p->strideW - 1) / p->strideW : 0;
                int64_t hi = ix0 < W ? (W - 1 - ix0) / p->strideW + 1 : 0;
                if (hi > Wo) hi = Wo;
                for (int64_t oy = ctx->oy0; oy < ctx->oy1; oy++) {
                    const int64_t iy = oy * p->strideH - p->padTop + i;
                    if (iy < 0 || iy >= H) continue;
                    float *out = plane + iy * W;
                    const float *in = row + (oy - ctx->oy0) * Wo;
                    if (p->strideW == 1) {
                        for (int64_t ox = lo; ox < hi; ox++) out[ox + ix0] += in[ox];
                    } else {
                        for (int64_t ox = lo; ox < hi; ox++) out[ox * p->strideW + ix0] += in[ox];
                    }
                }
            }
        }
    }
}

int ck_conv2d_backward_data_f32(const ck_conv2d_params *p, const float *dy, const void *w, int w_type, float *dx,
                                float *workspace) {
    const int64_t Ho = ck_conv2d_out_h(p), Wo = ck_conv2d_out_w(p);
    const int64_t N = Ho * Wo, K = p->Cin * p->kh * p->kw, rows = band_rows(p);
    for (int64_t b = 0; b < p->B; b++) {
        const float *dyb = dy + b * p->Cout * N;
        float *dxb = dx + b * p->Cin * p->H * p->W;
        if (is_pointwise(p)) {
            int status = ck_gemm_mixed(1, 0, K, N, p->Cout, 1.0f, w, w_type, K, dyb, CK_F32, N, 0.0f, dxb, N);
            if (status != CK_OK) return status;
            continue;
        }
        memset(dxb, 0, (size_t)(p->Cin * p->H * p->W) * sizeof(float));
        for (int64_t oy0 = 0; oy0 < Ho; oy0 += rows) {
            int64_t oy1 = oy0 + rows < Ho ? oy0 + rows : Ho, n = (oy1 - oy0) * Wo;
            int status = ck_gemm_mixed(1, 0, K, n, p->Cout, 1.0f, w, w_type, K, dyb + oy0 * Wo, CK_F32, N, 0.0f, workspace, n);
            if (status != CK_OK) return status;
            col2im_ctx ctx = {p, workspace, dxb, Wo, oy0, oy1};
            ck_parallel_for(p->Cin, 1, col2im_channels, &ctx);
        }
    }
    return CK_OK;
}
