/*
 * conv2d.cu — 2-D convolution (NCHW, torch's cross-correlation, no groups, no dilation) with ck_conv2d_f32's
 * contract (asymmetric padding; bias may be NULL), plus an optional residual added after the bias. f16/bf16 1×1
 * and 3×3 kernels run as an implicit GEMM on the tensor cores (conv2d_implicit_gemm_kernel below: the patches
 * are gathered into shared memory, never written out; bias and residual in the epilogue). Everything else (f32,
 * other kernel sizes, 64-bit indices) is im2col + cuBLAS:
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
 * loop reallocates nothing. The bias (plus the residual) is written into y first and the GEMMs accumulate
 * onto it (beta = 1), as in gemm.cu's linear.
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

/* ---------------------------------------------------------------------------------------------------- */
/* Implicit GEMM (f16/bf16, tensor cores)                                                                */

/* The GEMM of a convolution without the im2col round trip: y[b, m, oy, ox] = Σ_k w[m, k] · x̂[k, n] (+ bias[m])
 * (+ residual[b, m, oy, ox]) with M = Cout, N = B·Ho·Wo (n = (b·Ho + oy)·Wo + ox), K = Cin·kh·kw
 * (k = (c·kh + i)·kw + j, w's own layout) and x̂[k, n] = x[b, c, oy·sh − pt + i, ox·sw − pl + j] (zero outside
 * the image), gathered from x into shared memory a tile at a time. f32 accumulation; the epilogue adds the
 * bias and the residual in f32 and rounds once to T.
 *
 * Block (x, y) = the BN × BM tile of (n, m) from (x·BN, y·BM); (BM/32)·(BN/32) warps, warp (wm, wn) owning the
 * 32 × 32 sub-tile at rows wm·32, columns wn·32: 2 m-tiles × 4 n-tiles of mma.m16n8k16, lane (g, t) holding the
 * accumulators of rows g, g + 8 and columns 2t, 2t + 1 of each (pea_simt.h). K advances by CONV_BK = 32: the
 * w tile [BM][32] (row-major, the MMA's A) and the x̂ tile [32][BN] (k rows, n contiguous: the B operand read
 * with ldmatrix .trans) are double-buffered in shared memory, rows padded by 8 halves so the 8 rows of an
 * ldmatrix fall in different bank groups. Tile k + 1's copies and global loads are issued before tile k's MMAs
 * and the loaded chunks stored to shared memory after them, so the loads' latency overlaps the MMAs.
 *
 * Staging: thread e fills 16-byte chunks (8 halves). In w: chunk (row, e % 4) of rows e / 4, + THREADS / 4, …
 * — one cp.async when the 8 weights exist and are 16-byte aligned (K ≡ 0 mod 8), else 8 loads through
 * registers with zeros past Cout and K. In x̂: chunk e % (BN/8) of k rows e / (BN/8), + THREADS·8 / BN, …, so a
 * thread's 8 columns are fixed for the whole kernel: their image offset and top-left input position are
 * found once. A chunk whose 8 pixels exist at consecutive addresses of x (stride 1 along one input row, or any
 * run of a 1×1 unpadded plane) is one cp.async when 16-byte aligned, else two aligned 16-byte loads shifted
 * into place (x itself aligned); otherwise 8 loads, zero for padding. */
enum { CONV_BK = 32, CONV_PAD = 8 };

template <typename T>
static __device__ __forceinline__ void conv_mma(float c[4], const unsigned a[4], const unsigned b[2]);
template <>
__device__ __forceinline__ void conv_mma<__half>(float c[4], const unsigned a[4], const unsigned b[2]) {
    pea_mma_m16n8k16_f16(c, a, b);
}
template <>
__device__ __forceinline__ void conv_mma<__nv_bfloat16>(float c[4], const unsigned a[4], const unsigned b[2]) {
    pea_mma_m16n8k16_bf16(c, a, b);
}

/* A 16-bit value's bits (the low half of `bits`) as f32, and f32 rounded to those bits; the pointer picks the type. */
static __device__ __forceinline__ float conv_f32(const __half *, unsigned bits) { return pea_h2f(bits); }
static __device__ __forceinline__ float conv_f32(const __nv_bfloat16 *, unsigned bits) { return pea_b2f(bits); }
static __device__ __forceinline__ unsigned conv_bits(const __half *, float v) { return pea_f2h(v); }
static __device__ __forceinline__ unsigned conv_bits(const __nv_bfloat16 *, float v) { return pea_f2b(v); }

template <typename T, int BM, int BN>
__global__ void __launch_bounds__(BM * BN / 32)
    conv2d_implicit_gemm_kernel(const T *x, const T *w, const T *bias, const T *residual, T *y,
                                ConvGeometryOf<int32_t> g, int32_t Cout, int32_t N) {
    constexpr int THREADS = BM * BN / 32; /* a warp per 32 × 32 sub-tile */
    constexpr int AS = CONV_BK + CONV_PAD, BS = BN + CONV_PAD; /* row strides, halves */
    constexpr int A_TILE = BM * AS, STAGE = A_TILE + CONV_BK * BS;
    constexpr int A_ROWS = THREADS / 4, B_CHUNKS = BN / 8, B_ROWS = THREADS / B_CHUNKS;
    PEA_DYNAMIC_SHARED(unsigned short, s16);
    PEA_DYNAMIC_SHARED(uint4, s128);
    const unsigned short *xb = reinterpret_cast<const unsigned short *>(x);
    const unsigned short *wb = reinterpret_cast<const unsigned short *>(w);
    const int e = threadIdx.x, lane = e & 31, warp = e >> 5;
    const int wm = warp / (BN / 32), wn = warp % (BN / 32), gq = lane >> 2, tq = lane & 3;
    const int mrow = lane & 7, mat = lane >> 3; /* ldmatrix: lane l names row l % 8 of matrix l / 8 */
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int taps = g.kh * g.kw, K = g.Cin * taps, HW = g.H * g.W, NI = g.Ho * g.Wo;
    const bool w_vec = K % 8 == 0 && (uintptr_t)w % 16 == 0;
    const bool x_aligned = (uintptr_t)x % 16 == 0;
    const int x_end = (N / NI) * g.Cin * HW; /* elements of x */

    /* this thread's 8 columns of x̂: image offset in x and the input position of tap (0, 0) */
    const int bcol = (e % B_CHUNKS) * 8;
    int img_off[8], iy0[8], ix0[8];
    bool run = true; /* the 8 columns read consecutive addresses of x at every tap */
    #pragma unroll
    for (int q = 0; q < 8; q++) {
        const int n = n0 + bcol + q;
        if (n < N) {
            const int b = n / NI, pix = n - b * NI, oy = pix / g.Wo, ox = pix - oy * g.Wo;
            img_off[q] = b * g.Cin * HW;
            iy0[q] = oy * g.sh - g.pt;
            ix0[q] = ox * g.sw - g.pl;
            run = run && img_off[q] == img_off[0] && iy0[q] * g.W + ix0[q] == iy0[0] * g.W + ix0[0] + q;
        } else { /* past N: above every image, so zero */
            img_off[q] = 0;
            iy0[q] = -g.H - g.kh;
            ix0[q] = 0;
            run = false;
        }
    }

    /* Staging a tile is split in two so that the register path's global loads overlap the MMAs: gather(kt, buf)
     * issues the tile's cp.async copies into buffer buf and loads the other chunks into held_a/held_b; put(buf)
     * stores those into buffer buf once the MMAs of the current tile are queued. */
    constexpr int A_PER = BM / A_ROWS, B_PER = CONV_BK / B_ROWS; /* chunks per thread */
    uint4 held_a[A_PER], held_b[B_PER];
    bool is_held_a[A_PER], is_held_b[B_PER];
    auto pack = [](const unsigned short v[8]) {
        return make_uint4(v[0] | (unsigned)v[1] << 16, v[2] | (unsigned)v[3] << 16, v[4] | (unsigned)v[5] << 16,
                          v[6] | (unsigned)v[7] << 16);
    };
    auto gather = [&](int kt, int buf) {
        const int k0 = kt * CONV_BK, base = buf * STAGE;
        #pragma unroll
        for (int u = 0; u < A_PER; u++) { /* w tile */
            const int row = e / 4 + u * A_ROWS, m = m0 + row, k = k0 + (e % 4) * 8;
            is_held_a[u] = !(w_vec && m < Cout && k < K);
            if (!is_held_a[u]) {
                pea_cp_async16(s16, base + row * AS + (e % 4) * 8, wb + (int64_t)m * K + k, 16);
            } else {
                unsigned short v[8];
                #pragma unroll
                for (int q = 0; q < 8; q++) v[q] = m < Cout && k + q < K ? wb[(int64_t)m * K + k + q] : 0;
                held_a[u] = pack(v);
            }
        }
        #pragma unroll
        for (int u = 0; u < B_PER; u++) { /* x̂ tile */
            const int kr = e / B_CHUNKS + u * B_ROWS, k = k0 + kr;
            const int c = k / taps, r = k - c * taps, i = r / g.kw, j = r - i * g.kw;
            const bool krow = k < K;
            int off[8];
            bool inside[8], all = krow;
            #pragma unroll
            for (int q = 0; q < 8; q++) {
                const int iy = iy0[q] + i, ix = ix0[q] + j;
                inside[q] = krow && iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
                off[q] = inside[q] ? img_off[q] + c * HW + iy * g.W + ix : 0;
                all = all && inside[q];
            }
            const int o = off[0] & 7; /* the run's offset from a 16-byte boundary of x, elements */
            is_held_b[u] = !(all && run && x_aligned && o == 0);
            if (!is_held_b[u]) {
                pea_cp_async16(s16, base + A_TILE + kr * BS + bcol, xb + off[0], 16);
            } else if (all && run && x_aligned && off[0] - o + 16 <= x_end) {
                /* a run across a 16-byte boundary (a 3×3 tap left or right of the centre): the two aligned
                 * 16-byte words around it, shifted by o elements */
                const uint4 lo = *reinterpret_cast<const uint4 *>(xb + off[0] - o);
                const uint4 hi = *reinterpret_cast<const uint4 *>(xb + off[0] - o + 8);
                const unsigned w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
                const int sw = o >> 1;
                unsigned out[4];
                #pragma unroll
                for (int q = 0; q < 4; q++) {
                    const unsigned first = sw == 0 ? w[q] : sw == 1 ? w[q + 1] : sw == 2 ? w[q + 2] : w[q + 3];
                    const unsigned second = sw == 0 ? w[q + 1] : sw == 1 ? w[q + 2] : sw == 2 ? w[q + 3] : w[q + 4];
                    out[q] = o & 1 ? (first >> 16) | (second << 16) : first;
                }
                held_b[u] = make_uint4(out[0], out[1], out[2], out[3]);
            } else {
                unsigned short v[8];
                #pragma unroll
                for (int q = 0; q < 8; q++) v[q] = inside[q] ? xb[off[q]] : 0;
                held_b[u] = pack(v);
            }
        }
    };
    auto put = [&](int buf) {
        const int base = buf * STAGE;
        #pragma unroll
        for (int u = 0; u < A_PER; u++)
            if (is_held_a[u]) s128[(base + (e / 4 + u * A_ROWS) * AS + (e % 4) * 8) / 8] = held_a[u];
        #pragma unroll
        for (int u = 0; u < B_PER; u++)
            if (is_held_b[u]) s128[(base + A_TILE + (e / B_CHUNKS + u * B_ROWS) * BS + bcol) / 8] = held_b[u];
    };

    float acc[2][4][4];
    #pragma unroll
    for (int mt = 0; mt < 2; mt++)
        #pragma unroll
        for (int nt = 0; nt < 4; nt++)
            #pragma unroll
            for (int q = 0; q < 4; q++) acc[mt][nt][q] = 0.0f;

    const int tiles = (K + CONV_BK - 1) / CONV_BK;
    gather(0, 0);
    put(0);
    pea_cp_async_commit();
    for (int kt = 0; kt < tiles; kt++) {
        const bool next = kt + 1 < tiles;
        /* buffer (kt + 1) & 1 was last read by tile kt − 1's MMAs, before the barrier that ended that iteration */
        if (next) gather(kt + 1, (kt + 1) & 1);
        pea_cp_async_commit();
        pea_cp_async_wait<1>(); /* everything but tile kt + 1's copies has landed */
        __syncthreads();
        const int a_base = (kt & 1) * STAGE, b_base = a_base + A_TILE;
        #pragma unroll
        for (int kk = 0; kk < CONV_BK; kk += 16) {
            unsigned a[2][4], b[4][2];
            #pragma unroll
            for (int mt = 0; mt < 2; mt++)
                pea_ldmatrix_x4(a[mt], s16,
                                a_base + (wm * 32 + mt * 16 + (mat & 1) * 8 + mrow) * AS + kk + (mat >> 1) * 8);
            #pragma unroll
            for (int np = 0; np < 2; np++) {
                unsigned r[4];
                pea_ldmatrix_x4_trans(r, s16,
                                      b_base + (kk + (mat & 1) * 8 + mrow) * BS + wn * 32 + (np * 2 + (mat >> 1)) * 8);
                b[2 * np][0] = r[0];
                b[2 * np][1] = r[1];
                b[2 * np + 1][0] = r[2];
                b[2 * np + 1][1] = r[3];
            }
            #pragma unroll
            for (int mt = 0; mt < 2; mt++)
                #pragma unroll
                for (int nt = 0; nt < 4; nt++) conv_mma<T>(acc[mt][nt], a[mt], b[nt]);
        }
        if (next) put((kt + 1) & 1);
        __syncthreads(); /* buffer kt & 1 is restaged by the next iteration's gather */
    }

    /* epilogue: + bias[m] + residual, one rounding. A lane's two columns 2t, 2t + 1 of an n-tile are one 32-bit
     * load and store when they lie in one image (Ho·Wo even: n is even) and y and the residual are 4-byte
     * aligned; otherwise element by element. */
    const bool pairs = NI % 2 == 0 && (uintptr_t)y % 4 == 0 && (uintptr_t)residual % 4 == 0;
    #pragma unroll
    for (int mt = 0; mt < 2; mt++)
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            const int m = m0 + wm * 32 + mt * 16 + gq + h * 8;
            if (m >= Cout) continue;
            const float bm = bias ? pea_ld(bias + m) : 0.0f;
            #pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const int n = n0 + wn * 32 + nt * 8 + 2 * tq;
                if (n >= N) continue;
                const int b = n / NI;
                const int64_t at = ((int64_t)b * Cout + m) * NI + (n - b * NI);
                float v0 = acc[mt][nt][2 * h] + bm, v1 = acc[mt][nt][2 * h + 1] + bm;
                if (pairs && n + 1 < N) {
                    if (residual) {
                        const unsigned r = *reinterpret_cast<const unsigned *>(residual + at);
                        v0 += conv_f32(residual, r);
                        v1 += conv_f32(residual, r >> 16);
                    }
                    *reinterpret_cast<unsigned *>(y + at) = conv_bits(y, v0) | conv_bits(y, v1) << 16;
                    continue;
                }
                if (residual) v0 += pea_ld(residual + at);
                pea_st(y + at, v0);
                if (n + 1 >= N) continue;
                const int b1 = (n + 1) / NI;
                const int64_t at1 = ((int64_t)b1 * Cout + m) * NI + (n + 1 - b1 * NI);
                if (residual) v1 += pea_ld(residual + at1);
                pea_st(y + at1, v1);
            }
        }
}

/* Whether the implicit GEMM takes this convolution: f16/bf16, a 1×1 or 3×3 kernel (SD's; other shapes keep
 * im2col), and every index it forms within int32 (conv_index64 sends everything to the 64-bit im2col path). */
static bool implicit_gemm_takes(const pea_cuda_context *ctx, int dtype, const ck_conv2d_params *p, int64_t Ho,
                                int64_t Wo) {
    const bool shape = (p->kh == 1 && p->kw == 1) || (p->kh == 3 && p->kw == 3);
    const int64_t K = p->Cin * p->kh * p->kw, N = p->B * Ho * Wo;
    return dtype != CK_F32 && shape && fits_int32(ctx, p->B * p->Cin * p->H * p->W) &&
           fits_int32(ctx, p->B * p->Cout * Ho * Wo) && fits_int32(ctx, p->Cout * K) && fits_int32(ctx, N + 128) &&
           fits_int32(ctx, p->Cout + 128);
}

/* 128 × 128 tiles (16 warps) when they alone give every SM a block, else 64 × 64 (4 warps). */
template <typename T>
static int implicit_gemm_launch(pea_cuda_context *ctx, const char *op, const ConvGeometry &g, int64_t Cout, int64_t N,
                                const void *x, const void *w, const void *bias, const void *residual, void *y) {
    const int64_t big_blocks = ((N + 127) / 128) * ((Cout + 127) / 128);
    const ConvGeometryOf<int32_t> g32 = narrowed(g);
    if (big_blocks >= ctx->sm_count) {
        constexpr int BM = 128, BN = 128;
        const size_t smem = 2 * (BM * (CONV_BK + CONV_PAD) + CONV_BK * (BN + CONV_PAD)) * sizeof(unsigned short);
        const dim3 grid((unsigned)((N + BN - 1) / BN), (unsigned)((Cout + BM - 1) / BM));
        PEA_KERNEL(ctx, op, (conv2d_implicit_gemm_kernel<T, BM, BN>), grid, BM * BN / 32, smem, (const T *)x,
                   (const T *)w, (const T *)bias, (const T *)residual, (T *)y, g32, (int32_t)Cout, (int32_t)N);
    } else {
        constexpr int BM = 64, BN = 64;
        const size_t smem = 2 * (BM * (CONV_BK + CONV_PAD) + CONV_BK * (BN + CONV_PAD)) * sizeof(unsigned short);
        const dim3 grid((unsigned)((N + BN - 1) / BN), (unsigned)((Cout + BM - 1) / BM));
        PEA_KERNEL(ctx, op, (conv2d_implicit_gemm_kernel<T, BM, BN>), grid, BM * BN / 32, smem, (const T *)x,
                   (const T *)w, (const T *)bias, (const T *)residual, (T *)y, g32, (int32_t)Cout, (int32_t)N);
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
                               const void *w, const void *bias, const void *residual, void *y) {
    static const char *op = "conv2d";
    PEA_OP(ctx, op);
    int64_t Ho, Wo;
    PEA_TRY(conv_params(ctx, op, dtype, p, &Ho, &Wo));
    const int64_t N = Ho * Wo, K = p->Cin * p->kh * p->kw, B = p->B, Cout = p->Cout;
    if (B == 0 || Cout == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && w && y, "NULL tensor (x %p, w %p, y %p)", x, w, y);

    const ConvGeometry g = {p->Cin, p->H, p->W, p->kh, p->kw, p->strideH, p->strideW, p->padTop, p->padLeft, Ho, Wo};
    if (implicit_gemm_takes(ctx, dtype, p, Ho, Wo))
        return dtype == CK_F16 ? implicit_gemm_launch<__half>(ctx, op, g, Cout, B * N, x, w, bias, residual, y)
                               : implicit_gemm_launch<__nv_bfloat16>(ctx, op, g, Cout, B * N, x, w, bias, residual, y);

    /* im2col + cuBLAS: y starts as bias (+ residual) and the GEMMs accumulate onto it */
    const size_t es = pea_dtype_size(dtype);
    if (residual) PEA_TRY(pea_residual_prefill(ctx, op, dtype, y, residual, bias, B * Cout * N, N, Cout));
    else if (bias) PEA_TRY(pea_bias_prefill(ctx, op, dtype, y, bias, B * Cout * N, N, Cout));
    const float beta = bias || residual ? 1.0f : 0.0f;

    const bool pointwise = p->kh == 1 && p->kw == 1 && p->strideH == 1 && p->strideW == 1 && p->padTop == 0 &&
                           p->padBottom == 0 && p->padLeft == 0 && p->padRight == 0;
    if (pointwise) /* y[b] (Cout × HW) = w (Cout × Cin) · x[b] (Cin × HW), all images in one call */
        return pea_gemm_rowmajor(ctx, op, dtype, 0, 0, Cout, N, K, 1.0f, w, K, 0, x, N, K * N, beta, y, N, Cout * N, B);

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
