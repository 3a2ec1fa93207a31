/*
 * optimizer.cu — the adapter's AdamW step and the sums of squares behind gradient clipping, on the device,
 * bit for bit as CKernels/cpu/optimizer.c computes them (ck_adamw_f32, ck_sum_squares_f32): every product, sum,
 * quotient and root is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, …), so nvcc fuses nothing but the
 * two fmas the formula has (it would otherwise contract a·b + c into an FMA).
 *
 * Dimension legend: n values per tensor; blocks = ⌈n / CK_SUM_SQUARES_BLOCK⌉.
 */
#include "internal.h"

/* p_out, m_out, v_out = AdamW(p, m, v, g), ckernels.h's formula. One thread per element, grid-stride; the
 * outputs may alias the inputs (each thread reads its element before writing it). */
__global__ void adamw_kernel(const float *p, const float *m, const float *v, const float *g, float *p_out,
                             float *m_out, float *v_out, int64_t n, ck_adamw_hyper h) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float gi = g[i], mi = m[i], vi = v[i], pi = p[i];
        const float d = __fsub_rn(gi, mi);
        const float m2 = h.weight1 < 0.5f ? __fmaf_rn(h.weight1, d, mi) : __fmaf_rn(__fsub_rn(h.weight1, 1.0f), d, gi);
        const float v2 = __fmaf_rn(__fmul_rn(h.weight2, gi), gi, __fmul_rn(vi, h.keep2));
        const float den = __fadd_rn(__fdiv_rn(__fsqrt_rn(v2), h.correction2_root), h.eps);
        m_out[i] = m2;
        v_out[i] = v2;
        p_out[i] = __fadd_rn(__fmul_rn(pi, h.decay), __fdiv_rn(__fmul_rn(h.step_size, m2), den));
    }
}

/* block_sums[k] = Σ x² over block k (CK_SUM_SQUARES_BLOCK values) in ck_sum_squares_f32's order: value i of
 * the block into partial i mod 4, sequentially. One warp per block: the lanes load 32 consecutive values at a
 * time (coalesced), then every lane folds the 32 in order, taking each from its lane with a shuffle (so all
 * lanes hold the same partials; lane 0 writes). The tail past the last multiple of 4 goes to partial 0. */
__global__ void block_squares_kernel(const float *x, int64_t n, int64_t blocks, double *block_sums) {
    const int lane = threadIdx.x & 31;
    const int64_t k = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (k >= blocks) return; /* whole warps: blockDim is a multiple of 32 */
    const int64_t start = k * CK_SUM_SQUARES_BLOCK;
    const int64_t end = start + CK_SUM_SQUARES_BLOCK < n ? start + CK_SUM_SQUARES_BLOCK : n;
    const int64_t body_end = start + (end - start) / 4 * 4; /* values before it go to partial i mod 4 */
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t base = start; base < end; base += 32) {
        const float mine = base + lane < end ? x[base + lane] : 0.0f;
        const int count = end - base < 32 ? (int)(end - base) : 32;
        #pragma unroll
        for (int j = 0; j < 32; j++) { /* base − start is a multiple of 32, so value base + j is in partial j mod 4 */
            const double v = (double)__shfl_sync(PEA_FULL_MASK, mine, j);
            if (j < count) {
                if (base + j < body_end) s[j & 3] = __dadd_rn(s[j & 3], __dmul_rn(v, v));
                else s[0] = __dadd_rn(s[0], __dmul_rn(v, v));
            }
        }
    }
    if (lane == 0) block_sums[k] = __dadd_rn(__dadd_rn(s[0], s[1]), __dadd_rn(s[2], s[3]));
}

/* *total = the block sums added in index order (one thread). */
__global__ void sum_in_order_kernel(const double *block_sums, int64_t blocks, double *total) {
    double t = 0.0;
    for (int64_t k = 0; k < blocks; k++) t = __dadd_rn(t, block_sums[k]);
    *total = t;
}

extern "C" int pea_cuda_adamw(pea_cuda_context *ctx, const float *p, const float *m, const float *v, const float *g,
                              float *p_out, float *m_out, float *v_out, int64_t n, const ck_adamw_hyper *h) {
    static const char *op = "adamw";
    PEA_OP(ctx, op);
    PEA_REQUIRE(ctx, op, n >= 0 && h, "n %lld, hyperparameters %p", (long long)n, (const void *)h);
    if (n == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, p && m && v && g && p_out && m_out && v_out, "NULL tensor");
    PEA_KERNEL(ctx, op, adamw_kernel, pea_grid_1d(ctx, n, 256), 256, 0, p, m, v, g, p_out, m_out, v_out, n, *h);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_sum_squares(pea_cuda_context *ctx, const float *x, int64_t n, double *sum) {
    static const char *op = "sum_squares";
    PEA_OP(ctx, op);
    PEA_REQUIRE(ctx, op, n >= 0 && sum, "n %lld, sum %p", (long long)n, (void *)sum);
    *sum = 0.0;
    if (n == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x, "x is NULL");
    const int64_t blocks = (n + CK_SUM_SQUARES_BLOCK - 1) / CK_SUM_SQUARES_BLOCK;
    void *work = NULL;
    PEA_TRY(pea_mem_alloc(ctx, op, (size_t)(blocks + 1) * sizeof(double), &work));
    double *block_sums = (double *)work, *total = block_sums + blocks;
    const int threads = 128, warps_per_block = threads / 32;
    PEA_KERNEL(ctx, op, block_squares_kernel, (unsigned)((blocks + warps_per_block - 1) / warps_per_block), threads, 0,
               x, n, blocks, block_sums);
    PEA_KERNEL(ctx, op, sum_in_order_kernel, 1, 1, 0, (const double *)block_sums, blocks, total);
    const int rc = pea_cuda_download(ctx, sum, total, sizeof(double));
    PEA_TRY(pea_mem_free(ctx, op, work));
    return rc;
}
