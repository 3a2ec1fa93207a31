/*
 * conv2d.c — 2-D convolution (NCHW, torch's cross-correlation, no groups, no dilation) as im2col + GEMM.
 *
 *   x [B, Cin, H, W], w [Cout, Cin, kh, kw], bias [Cout] → y [B, Cout, Ho, Wo]
 *
 * For each image b the patches are unrolled into col [K = Cin·kh·kw, N = Ho·Wo], so that
 *   y[b] (Cout × N) = w (Cout × K) · col (K × N) + bias,
 * one GEMM per image. The bias is written into y first and the GEMM accumulates onto it (beta = 1), so the
 * bias costs no extra pass. A 1×1, stride-1, unpadded convolution needs no unrolling: x[b] already is the
 * K × N matrix. The weights may be stored in f32, bf16 or f16 (half-size weights): the GEMM widens them as
 * it packs them (ck_gemm_mixed). Padding may be asymmetric (diffusers' VAE downsampler pads right and bottom only).
 */
#include "ckernels.h"

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

int64_t ck_conv2d_workspace_floats(const ck_conv2d_params *p) {
    if (is_pointwise(p)) return 0;
    return p->Cin * p->kh * p->kw * ck_conv2d_out_h(p) * ck_conv2d_out_w(p);
}

typedef struct {
    const ck_conv2d_params *p;
    const float *x;      /* one image [Cin, H, W] */
    float *col;          /* [Cin·kh·kw, Ho·Wo] */
    int64_t Ho, Wo;
} im2col_ctx;

/* One task per row r = (c, i, j) of col: col[r, oy·Wo + ox] = x[c, oy·sh − padTop + i, ox·sw − padLeft + j],
 * zero outside the image. */
static void im2col_rows(void *arg, int64_t begin, int64_t end) {
    const im2col_ctx *ctx = arg;
    const ck_conv2d_params *p = ctx->p;
    const int64_t Ho = ctx->Ho, Wo = ctx->Wo;
    for (int64_t r = begin; r < end; r++) {
        int64_t c = r / (p->kh * p->kw), i = (r / p->kw) % p->kh, j = r % p->kw;
        const float *plane = ctx->x + c * p->H * p->W;
        float *row = ctx->col + r * Ho * Wo;
        for (int64_t oy = 0; oy < Ho; oy++) {
            int64_t iy = oy * p->strideH - p->padTop + i;
            float *out = row + oy * Wo;
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
                  float *y, float *workspace) {
    const int64_t Ho = ck_conv2d_out_h(p), Wo = ck_conv2d_out_w(p);
    const int64_t N = Ho * Wo, K = p->Cin * p->kh * p->kw;
    for (int64_t b = 0; b < p->B; b++) {
        const float *xb = x + b * p->Cin * p->H * p->W;
        float *yb = y + b * p->Cout * N;
        const float *col = xb;
        if (!is_pointwise(p)) {
            im2col_ctx ctx = {p, xb, workspace, Ho, Wo};
            ck_parallel_for(K, 1, im2col_rows, &ctx);
            col = workspace;
        }
        if (bias) {
            for (int64_t o = 0; o < p->Cout; o++)
                for (int64_t n = 0; n < N; n++) yb[o * N + n] = bias[o];
        }
        int status = ck_gemm_mixed(0, 0, p->Cout, N, K, 1.0f, w, w_type, K, col, CK_F32, N, bias ? 1.0f : 0.0f, yb, N);
        if (status != CK_OK) return status;
    }
    return CK_OK;
}

/* ---- data gradient ----------------------------------------------------------------------------------
 * The forward is y[b] = w · col(x[b]), so dx[b] = col2im(wᵀ · dy[b]): one GEMM per image gives
 * dcol [K = Cin·kh·kw, N = Ho·Wo], and col2im scatters each dcol entry back onto the input pixel that
 * im2col read it from (summing where patches overlap, dropping the padding). The pointwise case is the
 * GEMM alone, written straight into dx. */

typedef struct {
    const ck_conv2d_params *p;
    const float *col;    /* dcol [Cin·kh·kw, Ho·Wo] */
    float *dx;           /* one image [Cin, H, W] */
    int64_t Ho, Wo;
} col2im_ctx;

/* One task per input channel c: its plane gathers the rows (c, i, j) of dcol, so planes never collide. */
static void col2im_channels(void *arg, int64_t begin, int64_t end) {
    const col2im_ctx *ctx = arg;
    const ck_conv2d_params *p = ctx->p;
    const int64_t Ho = ctx->Ho, Wo = ctx->Wo, H = p->H, W = p->W;
    for (int64_t c = begin; c < end; c++) {
        float *plane = ctx->dx + c * H * W;
        memset(plane, 0, (size_t)(H * W) * sizeof(float));
        for (int64_t i = 0; i < p->kh; i++) {
            for (int64_t j = 0; j < p->kw; j++) {
                const float *row = ctx->col + ((c * p->kh + i) * p->kw + j) * Ho * Wo;
                /* the output columns ox whose input column ox·sw − padLeft + j lies inside [0, W) */
                const int64_t ix0 = j - p->padLeft;
                int64_t lo = ix0 < 0 ? (-ix0 + p->strideW - 1) / p->strideW : 0;
                int64_t hi = ix0 < W ? (W - 1 - ix0) / p->strideW + 1 : 0;
                if (hi > Wo) hi = Wo;
                for (int64_t oy = 0; oy < Ho; oy++) {
                    const int64_t iy = oy * p->strideH - p->padTop + i;
                    if (iy < 0 || iy >= H) continue;
                    float *out = plane + iy * W;
                    const float *in = row + oy * Wo;
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
    const int64_t N = Ho * Wo, K = p->Cin * p->kh * p->kw;
    for (int64_t b = 0; b < p->B; b++) {
        const float *dyb = dy + b * p->Cout * N;
        float *dxb = dx + b * p->Cin * p->H * p->W;
        int status = ck_gemm_mixed(1, 0, K, N, p->Cout, 1.0f, w, w_type, K, dyb, CK_F32, N, 0.0f,
                                   is_pointwise(p) ? dxb : workspace, N);
        if (status != CK_OK) return status;
        if (is_pointwise(p)) continue;
        col2im_ctx ctx = {p, workspace, dxb, Ho, Wo};
        ck_parallel_for(p->Cin, 1, col2im_channels, &ctx);
    }
    return CK_OK;
}
