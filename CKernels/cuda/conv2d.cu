/*
 * conv2d.cu — 2-D convolution (NCHW, torch's cross-correlation, no groups, no dilation) as im2col + cuBLAS,
 * with ck_conv2d_f32's contract (asymmetric padding; bias may be NULL).
 *
 *   x [B, Cin, H, W], w [Cout, Cin, kh, kw], bias [Cout] → y [B, Cout, Ho, Wo]
 *   K = Cin·kh·kw, N = Ho·Wo:   y[b] (Cout × N) = w (Cout × K) · col[b] (K × N) (+ bias)
 *
 * A 1×1, stride-1, unpadded convolution is that GEMM with col[b] = x[b]: one strided-batched GEMM over the
 * batch, w broadcast (stride 0), no copy. Otherwise im2col_kernel unrolls the patches into the context's
 * workspace and the GEMM reads them:
 *   - when the whole batch fits the workspace limit (PEA_CUDA_CONV_WORKSPACE_BYTES, default 256 MB) — or as
 *     many images as fit — one im2col and one strided-batched GEMM per group of images;
 *   - when one image alone is larger (a VAE layer at 512×512), the N columns are cut into chunks of
 *     limit/K columns: im2col of a chunk, then a GEMM that writes that column block of y[b] (ldc = N).
 * The workspace belongs to the context and only grows (through the caching allocator), so a steady-state
 * loop reallocates nothing. The bias is written into y first and the GEMMs accumulate onto it (beta = 1),
 * as in gemm.cu's linear.
 */
#include "internal.h"

/* The geometry im2col needs, passed by value. */
struct ConvGeometry {
    int64_t Cin, H, W, kh, kw, sh, sw, pt, pl, Ho, Wo;
};

/* col[img, r, n] = x[b0 + img, c, oy·sh − pt + i, ox·sw − pl + j] (zero outside the image) for the images
 * b0 … b0+nimg−1, rows r = (c, i, j) of K = Cin·kh·kw, and columns n = n0 … n0+nc−1 of the output plane
 * (n = oy·Wo + ox); col is [nimg, K, nc]. One thread per element of col (grid-stride): consecutive threads
 * write consecutive columns, and read consecutive input pixels when the stride is 1. E is the element's bits. */
template <typename E>
__global__ void im2col_kernel(const E *x, E *col, ConvGeometry g, int64_t b0, int64_t nimg, int64_t n0, int64_t nc) {
    const int64_t K = g.Cin * g.kh * g.kw, per_image = K * nc, total = nimg * per_image;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t img = e / per_image, rem = e - img * per_image;
        const int64_t r = rem / nc, n = n0 + (rem - r * nc);
        const int64_t oy = n / g.Wo, ox = n - oy * g.Wo;
        const int64_t c = r / (g.kh * g.kw), ij = r - c * g.kh * g.kw, i = ij / g.kw, j = ij - i * g.kw;
        const int64_t iy = oy * g.sh - g.pt + i, ix = ox * g.sw - g.pl + j;
        E v = E();
        if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) v = x[(((b0 + img) * g.Cin + c) * g.H + iy) * g.W + ix];
        col[e] = v;
    }
}

template <typename E>
static int im2col_launch(pea_cuda_context *ctx, const void *x, void *col, const ConvGeometry &g, int64_t b0,
                         int64_t nimg, int64_t n0, int64_t nc) {
    const int64_t total = nimg * g.Cin * g.kh * g.kw * nc;
    PEA_KERNEL(ctx, "conv2d", im2col_kernel<E>, pea_grid_1d(ctx, total, 256), 256, 0, (const E *)x, (E *)col, g, b0,
               nimg, n0, nc);
    return PEA_CUDA_OK;
}

/* Makes the context's workspace at least `bytes` long (a bigger block from the allocator; the old one goes
 * back to its cache — safe on the one stream: queued work that reads it runs before anything that reuses it). */
static int ensure_workspace(pea_cuda_context *ctx, size_t bytes) {
    if (ctx->workspace_bytes >= bytes) return PEA_CUDA_OK;
    if (ctx->workspace) {
        PEA_TRY(pea_mem_free(ctx, "conv2d", ctx->workspace));
        ctx->workspace = NULL;
        ctx->workspace_bytes = 0;
    }
    PEA_TRY(pea_mem_alloc(ctx, "conv2d", bytes, &ctx->workspace));
    ctx->workspace_bytes = bytes;
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_conv2d(pea_cuda_context *ctx, int dtype, const ck_conv2d_params *p, const void *x,
                               const void *w, const void *bias, void *y) {
    static const char *op = "conv2d";
    PEA_BEGIN(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, p != NULL, "params are NULL");
    PEA_REQUIRE(ctx, op, p->B >= 0 && p->Cin >= 1 && p->H >= 1 && p->W >= 1 && p->Cout >= 0 && p->kh >= 1 &&
                             p->kw >= 1 && p->strideH >= 1 && p->strideW >= 1 && p->padTop >= 0 &&
                             p->padBottom >= 0 && p->padLeft >= 0 && p->padRight >= 0,
                "bad params (B %lld, Cin %lld, H %lld, W %lld, Cout %lld, kernel %lld×%lld, stride %lld×%lld, "
                "pad %lld/%lld/%lld/%lld)",
                (long long)p->B, (long long)p->Cin, (long long)p->H, (long long)p->W, (long long)p->Cout,
                (long long)p->kh, (long long)p->kw, (long long)p->strideH, (long long)p->strideW,
                (long long)p->padTop, (long long)p->padBottom, (long long)p->padLeft, (long long)p->padRight);
    PEA_REQUIRE(ctx, op, p->H + p->padTop + p->padBottom >= p->kh && p->W + p->padLeft + p->padRight >= p->kw,
                "the %lld×%lld kernel is larger than the padded %lld×%lld input", (long long)p->kh, (long long)p->kw,
                (long long)(p->H + p->padTop + p->padBottom), (long long)(p->W + p->padLeft + p->padRight));
    /* as ck_conv2d_out_h/_w (the library does not link the CPU kernels) */
    const int64_t Ho = (p->H + p->padTop + p->padBottom - p->kh) / p->strideH + 1;
    const int64_t Wo = (p->W + p->padLeft + p->padRight - p->kw) / p->strideW + 1;
    const int64_t N = Ho * Wo, K = p->Cin * p->kh * p->kw, B = p->B, Cout = p->Cout;
    if (B == 0 || Cout == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && w && y, "NULL tensor (x %p, w %p, y %p)", x, w, y);

    const size_t es = pea_dtype_size(dtype);
    if (bias) PEA_TRY(pea_bias_prefill(ctx, op, dtype, y, bias, B * Cout * N, N, Cout));
    const float beta = bias ? 1.0f : 0.0f;

    const bool pointwise = p->kh == 1 && p->kw == 1 && p->strideH == 1 && p->strideW == 1 && p->padTop == 0 &&
                           p->padBottom == 0 && p->padLeft == 0 && p->padRight == 0;
    if (pointwise) /* y[b] (Cout × HW) = w (Cout × Cin) · x[b] (Cin × HW), all images in one call */
        return pea_gemm_rowmajor(ctx, op, dtype, 0, 0, Cout, N, K, 1.0f, w, K, 0, x, N, K * N, beta, y, N, Cout * N, B);

    const ConvGeometry g = {p->Cin, p->H, p->W, p->kh, p->kw, p->strideH, p->strideW, p->padTop, p->padLeft, Ho, Wo};
    int64_t limit = (int64_t)(ctx->workspace_limit / es); /* elements of col at a time */
    if (limit < 1) limit = 1;
    char *yb = (char *)y;
    if (K * N <= limit) { /* whole images: groups of `images` per im2col + strided-batched GEMM */
        int64_t images = limit / (K * N);
        if (images > B) images = B;
        PEA_TRY(ensure_workspace(ctx, (size_t)(images * K * N) * es));
        for (int64_t b0 = 0; b0 < B; b0 += images) {
            const int64_t nb = B - b0 < images ? B - b0 : images;
            if (dtype == CK_F32) PEA_TRY(im2col_launch<uint32_t>(ctx, x, ctx->workspace, g, b0, nb, 0, N));
            else PEA_TRY(im2col_launch<uint16_t>(ctx, x, ctx->workspace, g, b0, nb, 0, N));
            PEA_TRY(pea_gemm_rowmajor(ctx, op, dtype, 0, 0, Cout, N, K, 1.0f, w, K, 0, ctx->workspace, N, K * N, beta,
                                      yb + (size_t)(b0 * Cout * N) * es, N, Cout * N, nb));
        }
        return PEA_CUDA_OK;
    }
    /* one image is larger than the limit: column chunks of y[b] */
    int64_t nc = limit / K;
    if (nc < 1) nc = 1;
    PEA_TRY(ensure_workspace(ctx, (size_t)(K * nc) * es));
    for (int64_t b = 0; b < B; b++) {
        for (int64_t n0 = 0; n0 < N; n0 += nc) {
            const int64_t c = N - n0 < nc ? N - n0 : nc;
            if (dtype == CK_F32) PEA_TRY(im2col_launch<uint32_t>(ctx, x, ctx->workspace, g, b, 1, n0, c));
            else PEA_TRY(im2col_launch<uint16_t>(ctx, x, ctx->workspace, g, b, 1, n0, c));
            PEA_TRY(pea_gemm_rowmajor(ctx, op, dtype, 0, 0, Cout, c, K, 1.0f, w, K, 0, ctx->workspace, c, 0, beta,
                                      yb + (size_t)(b * Cout * N + n0) * es, N, 0, 1));
        }
    }
    return PEA_CUDA_OK;
}
