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
 *
 * The data gradient (pea_cuda_conv2d_backward_data, for training through the frozen UNet) runs the same plan
 * backwards: dcol[b] = wᵀ · dy[b] into the same workspace, then col2im_kernel gathers dcol into dx; the 1×1,
 * stride-1, unpadded case is again one strided-batched GEMM.
 */
#include "internal.h"

/* The geometry im2col needs, passed by value, in the kernel's index type I. */
template <typename I>
struct ConvGeometryOf {
    I Cin, H, W, kh, kw, sh, sw, pt, pl, Ho, Wo;
};
using ConvGeometry = ConvGeometryOf<int64_t>;

/* The index arithmetic (several divisions per element) dominates im2col/col2im; 64-bit division is emulated in
 * software on the GPU, so the kernels run in 32-bit indices whenever every index they form fits. */
static bool fits_int32(const pea_cuda_context *ctx, int64_t elements) {
    return !ctx->conv_index64 && elements + (int64_t(1) << 26) < int64_t(INT32_MAX);
}

static ConvGeometryOf<int32_t> narrowed(const ConvGeometry &g) {
    return {(int32_t)g.Cin, (int32_t)g.H, (int32_t)g.W, (int32_t)g.kh, (int32_t)g.kw, (int32_t)g.sh, (int32_t)g.sw,
            (int32_t)g.pt, (int32_t)g.pl, (int32_t)g.Ho, (int32_t)g.Wo};
}

/* col[img, r, n] = x[b0 + img, c, oy·sh − pt + i, ox·sw − pl + j] (zero outside the image) for the images
 * b0 … b0+nimg−1, rows r = (c, i, j) of K = Cin·kh·kw, and columns n = n0 … n0+nc−1 of the output plane
 * (n = oy·Wo + ox); col is [nimg, K, nc]. Threads (x, y) of a 2-D block: thread x takes IM2COL_V consecutive
 * columns (one division finds its first (oy, ox), then ox steps along the output row), thread y one input
 * plane (img, c) of blockDim.y per block (grid-stride over the planes), and writes that plane's kh·kw rows of
 * col for its columns: consecutive threads write consecutive 8-column chunks — one 16-byte store for
 * f16/bf16 (two for f32) when the chunk is whole and aligned — and, with stride 1, read consecutive input
 * pixels (the taps of one plane re-read the same lines, from L1). E is the element's bits, I the index type
 * (int32_t when every index fits: 64-bit division is emulated in software on the GPU). */
enum { IM2COL_V = 8 };
template <typename E, typename I>
__global__ void im2col_kernel(const E *x, E *col, ConvGeometryOf<I> g, I b0, I nimg, I n0, I nc) {
    const I taps = g.kh * g.kw, planes = nimg * g.Cin;
    const I first = ((I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x) * IM2COL_V;
    if (first >= nc) return;
    const int count = nc - first < IM2COL_V ? (int)(nc - first) : IM2COL_V;
    const I oy0 = (n0 + first) / g.Wo, ox0 = n0 + first - oy0 * g.Wo;
    for (I plane = (I)blockIdx.y * (I)blockDim.y + (I)threadIdx.y; plane < planes;
         plane += (I)gridDim.y * (I)blockDim.y) {
        const E *xc = x + (b0 * g.Cin + plane) * g.H * g.W; /* plane = img·Cin + c */
        E *dst = col + plane * taps * nc + first;           /* row (img, c, 0, 0) = img·K + c·taps */
        for (I i = 0; i < g.kh; i++)
            for (I j = 0; j < g.kw; j++, dst += nc) {
                E v[IM2COL_V];
                I oy = oy0, ox = ox0;
                for (int k = 0; k < IM2COL_V; k++) {
                    const I iy = oy * g.sh - g.pt + i, ix = ox * g.sw - g.pl + j;
                    v[k] = k < count && iy >= 0 && iy < g.H && ix >= 0 && ix < g.W ? xc[iy * g.W + ix] : E();
                    if (++ox == g.Wo) {
                        ox = 0;
                        ++oy;
                    }
                }
                if (count == IM2COL_V && (uintptr_t)dst % 16 == 0) {
                    unsigned w[IM2COL_V * sizeof(E) / 4]; /* the chunk as 32-bit words, lower element low */
                    for (int q = 0; q < (int)(IM2COL_V * sizeof(E) / 4); q++) {
                        if constexpr (sizeof(E) == 2) w[q] = (unsigned)v[2 * q] | ((unsigned)v[2 * q + 1] << 16);
                        else w[q] = (unsigned)v[q];
                    }
                    uint4 *d16 = reinterpret_cast<uint4 *>(dst);
                    for (int q = 0; q < (int)(IM2COL_V * sizeof(E) / 16); q++)
                        d16[q] = make_uint4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]);
                } else {
                    for (int k = 0; k < count; k++) dst[k] = v[k];
                }
            }
    }
}

template <typename E>
static int im2col_launch(pea_cuda_context *ctx, const void *x, void *col, const ConvGeometry &g, int64_t b0,
                         int64_t nimg, int64_t n0, int64_t nc) {
    const int64_t total = nimg * g.Cin * g.kh * g.kw * nc, rows = nimg * g.Cin; /* rows of threads: planes */
    const int64_t chunks = (nc + IM2COL_V - 1) / IM2COL_V; /* threads along a row */
    unsigned tx = 32;
    while (tx < 256 && (int64_t)tx < chunks) tx *= 2;
    const dim3 block(tx, 256 / tx);
    const int64_t gy = (rows + block.y - 1) / block.y;
    const dim3 grid((unsigned)((chunks + tx - 1) / tx), (unsigned)(gy < 65535 ? gy : 65535));
    if (fits_int32(ctx, total) && fits_int32(ctx, (b0 + nimg) * g.Cin * g.H * g.W)) {
        PEA_KERNEL(ctx, "conv2d", (im2col_kernel<E, int32_t>), grid, block, 0, (const E *)x, (E *)col, narrowed(g),
                   (int32_t)b0, (int32_t)nimg, (int32_t)n0, (int32_t)nc);
    } else {
        PEA_KERNEL(ctx, "conv2d", (im2col_kernel<E, int64_t>), grid, block, 0, (const E *)x, (E *)col, g, b0, nimg,
                   n0, nc);
    }
    return PEA_CUDA_OK;
}

/* Makes the context's workspace at least `bytes` long (a bigger block from the allocator; the old one goes
 * back to its cache — safe on the one stream: queued work that reads it runs before anything that reuses it). */
static int ensure_workspace(pea_cuda_context *ctx, const char *op, size_t bytes) {
    if (ctx->workspace_bytes >= bytes) return PEA_CUDA_OK;
    if (ctx->workspace) {
        PEA_TRY(pea_mem_free(ctx, op, ctx->workspace));
        ctx->workspace = NULL;
        ctx->workspace_bytes = 0;
    }
    PEA_TRY(pea_mem_alloc(ctx, op, bytes, &ctx->workspace));
    ctx->workspace_bytes = bytes;
    return PEA_CUDA_OK;
}

/* The checks both directions make on the dtype and the params (as ck_conv2d_f32's contract); on success *Ho,
 * *Wo are the output size (as ck_conv2d_out_h/_w: the library does not link the CPU kernels). */
static int conv_params(pea_cuda_context *ctx, const char *op, int dtype, const ck_conv2d_params *p,
                       int64_t *Ho_out, int64_t *Wo_out) {
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
    const int64_t Ho = (p->H + p->padTop + p->padBottom - p->kh) / p->strideH + 1;
    const int64_t Wo = (p->W + p->padLeft + p->padRight - p->kw) / p->strideW + 1;
    *Ho_out = Ho;
    *Wo_out = Wo;
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_conv2d(pea_cuda_context *ctx, int dtype, const ck_conv2d_params *p, const void *x,
                               const void *w, const void *bias, void *y) {
    static const char *op = "conv2d";
    PEA_OP(ctx, op);
    int64_t Ho, Wo;
    PEA_TRY(conv_params(ctx, op, dtype, p, &Ho, &Wo));
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
        PEA_TRY(ensure_workspace(ctx, op, (size_t)(images * K * N) * es));
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
    PEA_TRY(ensure_workspace(ctx, op, (size_t)(K * nc) * es));
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

/* ---------------------------------------------------------------------------------------------------- */
/* Backward: the data gradient                                                                           */

/* col2im: dx[b0 + img, c, iy, ix] = Σ dcol[img, (c, i, j), n − n0] over the kernel taps (i, j) whose output
 * position (oy, ox) — oy·sh − pt + i = iy, ox·sw − pl + j = ix — exists and has n = oy·Wo + ox in [n0, n0 + nc);
 * with accumulate, added to what dx holds. dcol is [nimg, K, nc]. A gather rather than a scatter: one thread
 * per dx element (grid-stride over the images' rows y0 … y0+rows−1, all channels and columns), each summing its
 * at most kh·kw taps in f32 in a fixed order — no atomics, the same result on every run. Consecutive threads
 * write consecutive pixels of a row. */
template <typename T, typename I>
__global__ void col2im_kernel(const T *col, T *dx, ConvGeometryOf<I> g, I b0, I nimg, I n0, I nc, I y0, I rows,
                              int accumulate) {
    const I taps = g.kh * g.kw, K = g.Cin * taps;
    const I per_c = rows * g.W, per_image = g.Cin * per_c, total = nimg * per_image;
    const I stride = (I)gridDim.x * (I)blockDim.x;
    for (I e = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; e < total; e += stride) {
        const I img = e / per_image, rem = e - img * per_image;
        const I c = rem / per_c, pix = rem - c * per_c;
        const I iy = y0 + pix / g.W, ix = pix - (pix / g.W) * g.W;
        const T *colc = col + (img * K + c * taps) * nc;
        float acc = 0.0f;
        for (I i = 0; i < g.kh; i++) {
            const I ty = iy + g.pt - i;
            if (ty < 0) break; /* and for every larger i */
            if (ty % g.sh) continue;
            const I oy = ty / g.sh;
            if (oy >= g.Ho) continue;
            for (I j = 0; j < g.kw; j++) {
                const I tx = ix + g.pl - j;
                if (tx < 0) break;
                if (tx % g.sw) continue;
                const I ox = tx / g.sw;
                if (ox >= g.Wo) continue;
                const I n = oy * g.Wo + ox - n0;
                if (n < 0 || n >= nc) continue;
                acc += pea_ld(colc + (i * g.kw + j) * nc + n);
            }
        }
        T *out = dx + (((b0 + img) * g.Cin + c) * g.H + iy) * g.W + ix;
        pea_st(out, accumulate ? pea_ld(out) + acc : acc);
    }
}

template <typename T>
static int col2im_launch(pea_cuda_context *ctx, const void *col, void *dx, const ConvGeometry &g, int64_t b0,
                         int64_t nimg, int64_t n0, int64_t nc, int64_t y0, int64_t rows, int accumulate) {
    const int64_t total = nimg * g.Cin * rows * g.W;
    if (fits_int32(ctx, nimg * g.Cin * g.kh * g.kw * nc) && fits_int32(ctx, (b0 + nimg) * g.Cin * g.H * g.W)) {
        PEA_KERNEL(ctx, "conv2d_backward_data", (col2im_kernel<T, int32_t>), pea_grid_1d(ctx, total, 256), 256, 0,
                   (const T *)col, (T *)dx, narrowed(g), (int32_t)b0, (int32_t)nimg, (int32_t)n0, (int32_t)nc,
                   (int32_t)y0, (int32_t)rows, accumulate);
    } else {
        PEA_KERNEL(ctx, "conv2d_backward_data", (col2im_kernel<T, int64_t>), pea_grid_1d(ctx, total, 256), 256, 0,
                   (const T *)col, (T *)dx, g, b0, nimg, n0, nc, y0, rows, accumulate);
    }
    return PEA_CUDA_OK;
}

/* dx = the gradient of conv2d with respect to x, as ck_conv2d_backward_data_f32:
 *   dcol[b] (K × N) = wᵀ (K × Cout) · dy[b] (Cout × N),   dx[b] = col2im(dcol[b]).
 * The 1×1, stride-1, unpadded case is dx[b] (Cin × HW) = wᵀ · dy[b]: one strided-batched GEMM, no workspace.
 * Otherwise dcol goes to the context's workspace under the forward's limit: whole images in groups (one
 * strided-batched GEMM and one col2im per group), or, when one image's dcol is larger than the limit, column
 * chunks of one image — dx is zeroed first and each chunk's col2im adds its taps to the input rows it reaches
 * (f16/bf16 dx is then rounded once per chunk that reaches it). */
extern "C" int pea_cuda_conv2d_backward_data(pea_cuda_context *ctx, int dtype, const ck_conv2d_params *p,
                                             const void *dy, const void *w, void *dx) {
    static const char *op = "conv2d_backward_data";
    PEA_OP(ctx, op);
    int64_t Ho, Wo;
    PEA_TRY(conv_params(ctx, op, dtype, p, &Ho, &Wo));
    const int64_t N = Ho * Wo, K = p->Cin * p->kh * p->kw, B = p->B, Cout = p->Cout, Cin = p->Cin;
    const int64_t HW = p->H * p->W;
    if (B == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, dx != NULL, "NULL tensor (dx %p)", dx);
    const size_t es = pea_dtype_size(dtype);
    if (Cout == 0) /* no output channels: nothing flows back */
        return pea_check_cuda(ctx, op, cudaMemsetAsync(dx, 0, (size_t)(B * Cin * HW) * es, ctx->stream),
                              "cudaMemsetAsync");
    PEA_REQUIRE(ctx, op, dy && w, "NULL tensor (dy %p, w %p)", dy, w);

    const bool pointwise = p->kh == 1 && p->kw == 1 && p->strideH == 1 && p->strideW == 1 && p->padTop == 0 &&
                           p->padBottom == 0 && p->padLeft == 0 && p->padRight == 0;
    if (pointwise) /* dx[b] (Cin × HW) = wᵀ (Cin × Cout) · dy[b] (Cout × HW), all images in one call */
        return pea_gemm_rowmajor(ctx, op, dtype, 1, 0, Cin, N, Cout, 1.0f, w, Cin, 0, dy, N, Cout * N, 0.0f, dx, N,
                                 Cin * N, B);

    const ConvGeometry g = {p->Cin, p->H, p->W, p->kh, p->kw, p->strideH, p->strideW, p->padTop, p->padLeft, Ho, Wo};
    int64_t limit = (int64_t)(ctx->workspace_limit / es); /* elements of dcol at a time */
    if (limit < 1) limit = 1;
    const char *dyb = (const char *)dy;
#define PEA_COL2IM(...) \
    (dtype == CK_F32 ? col2im_launch<float>(__VA_ARGS__) \
                     : dtype == CK_F16 ? col2im_launch<__half>(__VA_ARGS__) : col2im_launch<__nv_bfloat16>(__VA_ARGS__))
    if (K * N <= limit) { /* whole images: groups of `images` per strided-batched GEMM + col2im */
        int64_t images = limit / (K * N);
        if (images > B) images = B;
        PEA_TRY(ensure_workspace(ctx, op, (size_t)(images * K * N) * es));
        for (int64_t b0 = 0; b0 < B; b0 += images) {
            const int64_t nb = B - b0 < images ? B - b0 : images;
            PEA_TRY(pea_gemm_rowmajor(ctx, op, dtype, 1, 0, K, N, Cout, 1.0f, w, K, 0,
                                      dyb + (size_t)(b0 * Cout * N) * es, N, Cout * N, 0.0f, ctx->workspace, N, K * N,
                                      nb));
            PEA_TRY(PEA_COL2IM(ctx, ctx->workspace, dx, g, b0, nb, 0, N, 0, p->H, 0));
        }
        return PEA_CUDA_OK;
    }
    /* one image's dcol is larger than the limit: column chunks, each adding onto the zeroed dx */
    int64_t nc = limit / K;
    if (nc < 1) nc = 1;
    PEA_TRY(ensure_workspace(ctx, op, (size_t)(K * nc) * es));
    PEA_TRY(pea_check_cuda(ctx, op, cudaMemsetAsync(dx, 0, (size_t)(B * Cin * HW) * es, ctx->stream),
                           "cudaMemsetAsync"));
    for (int64_t b = 0; b < B; b++) {
        for (int64_t n0 = 0; n0 < N; n0 += nc) {
            const int64_t c = N - n0 < nc ? N - n0 : nc;
            PEA_TRY(pea_gemm_rowmajor(ctx, op, dtype, 1, 0, K, c, Cout, 1.0f, w, K, 0,
                                      dyb + (size_t)(b * Cout * N + n0) * es, N, 0, 0.0f, ctx->workspace, c, 0, 1));
            /* the input rows these output rows reach */
            const int64_t oy0 = n0 / Wo, oy1 = (n0 + c - 1) / Wo;
            int64_t y0 = oy0 * p->strideH - p->padTop, y1 = oy1 * p->strideH - p->padTop + p->kh; /* [y0, y1) */
            if (y0 < 0) y0 = 0;
            if (y1 > p->H) y1 = p->H;
            if (y1 <= y0) continue; /* only padding */
            PEA_TRY(PEA_COL2IM(ctx, ctx->workspace, dx, g, b, 1, n0, c, y0, y1 - y0, 1));
        }
    }
#undef PEA_COL2IM
    return PEA_CUDA_OK;
}
