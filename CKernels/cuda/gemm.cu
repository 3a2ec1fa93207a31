/*
 * gemm.cu — GEMM, batched GEMM and linear layers through cuBLAS.
 *
 *   C[b] = alpha · op(A[b]) · op(B[b]) + beta · C[b]     row-major, b < batch (ck_sgemm_batched's contract)
 *
 * Row-major callers, column-major cuBLAS, no copies: a row-major X (r × c, row stride ld) is, read
 * column-major with leading dimension ld, Xᵀ. So the row-major product C = op(A)·op(B) is computed as the
 * column-major product Cᵀ = op(B)ᵀ · op(A)ᵀ: cuBLAS gets B first (as it is stored: op N when B is not
 * transposed, T when it is), then A, with m = N, n = M, k = K and the callers' leading dimensions unchanged.
 * One cublasGemmStridedBatchedEx serves every case: strides are the callers' (0 broadcasts an operand),
 * storage CUDA_R_32F / 16F / 16BF for A, B and C alike, accumulation CUBLAS_COMPUTE_32F (f16/bf16 on the
 * tensor cores with f32 accumulation), or CUBLAS_COMPUTE_32F_FAST_TF32 for f32 data when the context's TF32
 * flag is on. alpha and beta are f32 host scalars; beta = 0 never reads C.
 *
 * Linear layers with a bias (y = x·Wᵀ + bias) are one cublasLtMatmul with the bias epilogue, planned once
 * per shape: y is written once and f16/bf16 outputs are rounded once (acc + bias in f32). Where cuBLASLt has
 * no algorithm (and for in_features = 0) the bias is written into y first (one broadcast kernel) and the GEMM
 * accumulates onto it with beta = 1, with the same single rounding but one more write and read of y. A residual
 * (y = x·Wᵀ + bias + residual) is cuBLASLt's C with beta = 1 (D = y); in the fallback it is written into y with
 * the bias (one rounding there, one after the GEMM).
 *
 * Dimension legend: M, N, K the GEMM dimensions; rows × in_features → rows × out_features for linear.
 */
#include "internal.h"

static cudaDataType_t cuda_type(int dtype) {
    return dtype == CK_F16 ? CUDA_R_16F : dtype == CK_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Kernels                                                                                               */

/* C[b] = beta · C[b] (beta = 0 writes zeros without reading): the K = 0 GEMM, where op(A)·op(B) is empty.
 * One thread per element of the batch × M × N index space (grid-stride); C rows have stride ldc. */
template <typename T>
__global__ void gemm_scale_c_kernel(T *C, int64_t M, int64_t N, int64_t ldc, int64_t strideC, int64_t batch,
                                    float beta) {
    const int64_t total = batch * M * N, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t b = e / (M * N), r = (e / N) % M, c = e % N;
        T *p = C + b * strideC + r * ldc + c;
        pea_st(p, beta == 0.0f ? 0.0f : beta * pea_ld(p));
    }
}

/* y[i] = bias[(i / inner) % nbias] for i < total: the bias of a linear layer (inner = 1, nbias = out) or of a
 * convolution (inner = Ho·Wo, nbias = Cout) broadcast over its output, as bits (E is the element's size).
 * One thread per element, grid-stride, coalesced writes. */
template <typename E>
__global__ void bias_prefill_kernel(E *y, const E *bias, int64_t total, int64_t inner, int64_t nbias) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride)
        y[i] = bias[(i / inner) % nbias];
}

/* y[i] = residual[i] + bias[(i / inner) % nbias] (no bias: residual[i]), summed in f32 and rounded once: the
 * start that a beta = 1 GEMM accumulates onto when a residual is fused. One thread per element, grid-stride. */
template <typename T>
__global__ void residual_prefill_kernel(T *y, const T *residual, const T *bias, int64_t total, int64_t inner,
                                        int64_t nbias) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride)
        pea_st(y + i, pea_ld(residual + i) + (bias ? pea_ld(bias + (i / inner) % nbias) : 0.0f));
}

template <typename T>
static int residual_prefill_launch(pea_cuda_context *ctx, const char *op, void *y, const void *residual,
                                   const void *bias, int64_t total, int64_t inner, int64_t nbias) {
    PEA_KERNEL(ctx, op, residual_prefill_kernel<T>, pea_grid_1d(ctx, total, 256), 256, 0, (T *)y,
               (const T *)residual, (const T *)bias, total, inner, nbias);
    return PEA_CUDA_OK;
}

int pea_residual_prefill(pea_cuda_context *ctx, const char *op, int dtype, void *y, const void *residual,
                         const void *bias, int64_t total, int64_t inner, int64_t nbias) {
    return PEA_FLOAT_SWITCH(dtype, residual_prefill_launch, ctx, op, y, residual, bias, total, inner, nbias);
}

template <typename T>
static int scale_c_launch(pea_cuda_context *ctx, const char *op, void *C, int64_t M, int64_t N, int64_t ldc,
                          int64_t strideC, int64_t batch, float beta) {
    PEA_KERNEL(ctx, op, gemm_scale_c_kernel<T>, pea_grid_1d(ctx, batch * M * N, 256), 256, 0, (T *)C, M, N, ldc,
               strideC, batch, beta);
    return PEA_CUDA_OK;
}

int pea_bias_prefill(pea_cuda_context *ctx, const char *op, int dtype, void *y, const void *bias, int64_t total,
                     int64_t inner, int64_t nbias) {
    const unsigned grid = pea_grid_1d(ctx, total, 256);
    if (dtype == CK_F32)
        PEA_KERNEL(ctx, op, bias_prefill_kernel<uint32_t>, grid, 256, 0, (uint32_t *)y, (const uint32_t *)bias, total,
                   inner, nbias);
    else
        PEA_KERNEL(ctx, op, bias_prefill_kernel<uint16_t>, grid, 256, 0, (uint16_t *)y, (const uint16_t *)bias, total,
                   inner, nbias);
    return PEA_CUDA_OK;
}

/* ---------------------------------------------------------------------------------------------------- */
/* GEMM                                                                                                  */

int pea_gemm_rowmajor(pea_cuda_context *ctx, const char *op, int dtype, int transA, int transB, int64_t M,
                      int64_t N, int64_t K, float alpha, const void *A, int64_t lda, int64_t strideA,
                      const void *B, int64_t ldb, int64_t strideB, float beta, void *C, int64_t ldc,
                      int64_t strideC, int64_t batch) {
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, M >= 0 && N >= 0 && K >= 0 && batch >= 0, "shape M %lld, N %lld, K %lld, batch %lld",
                (long long)M, (long long)N, (long long)K, (long long)batch);
    PEA_REQUIRE(ctx, op, M <= INT_MAX && N <= INT_MAX && K <= INT_MAX && batch <= INT_MAX,
                "shape M %lld, N %lld, K %lld, batch %lld exceeds cuBLAS's int range", (long long)M, (long long)N,
                (long long)K, (long long)batch);
    if (M == 0 || N == 0 || batch == 0) return PEA_CUDA_OK;
    const int64_t need_lda = transA ? M : K, need_ldb = transB ? K : N;
    PEA_REQUIRE(ctx, op, lda >= need_lda && lda <= INT_MAX, "lda %lld < %s %lld", (long long)lda,
                transA ? "M" : "K", (long long)need_lda);
    PEA_REQUIRE(ctx, op, ldb >= need_ldb && ldb <= INT_MAX, "ldb %lld < %s %lld", (long long)ldb,
                transB ? "K" : "N", (long long)need_ldb);
    PEA_REQUIRE(ctx, op, ldc >= N && ldc <= INT_MAX, "ldc %lld < N %lld", (long long)ldc, (long long)N);
    PEA_REQUIRE(ctx, op, strideC != 0 || batch == 1, "strideC = 0 with batch %lld: the products would race",
                (long long)batch);
    PEA_REQUIRE(ctx, op, C != NULL, "C is NULL");
    if (K == 0 || alpha == 0.0f) {
        if (beta == 1.0f) return PEA_CUDA_OK;
        return PEA_FLOAT_SWITCH(dtype, scale_c_launch, ctx, op, C, M, N, ldc, strideC, batch, beta);
    }
    PEA_REQUIRE(ctx, op, A && B, "NULL operand (A %p, B %p)", A, B);

    const cudaDataType_t t = cuda_type(dtype);
    const cublasComputeType_t compute =
        (dtype == CK_F32 && ctx->tf32) ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    /* Cᵀ (N × M, column-major, ldc) = op(B)ᵀ (N × K) · op(A)ᵀ (K × M) */
    cublasStatus_t s = cublasGemmStridedBatchedEx(
        ctx->cublas, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N, (int)N, (int)M, (int)K,
        &alpha, B, t, (int)ldb, (long long)strideB, A, t, (int)lda, (long long)strideA, &beta, C, t, (int)ldc,
        (long long)strideC, (int)batch, compute, CUBLAS_GEMM_DEFAULT);
    return pea_check_cublas(ctx, op, s, "cublasGemmStridedBatchedEx");
}

extern "C" int pea_cuda_gemm(pea_cuda_context *ctx, int dtype, int transA, int transB, int64_t M, int64_t N,
                             int64_t K, float alpha, const void *A, int64_t lda, int64_t strideA, const void *B,
                             int64_t ldb, int64_t strideB, float beta, void *C, int64_t ldc, int64_t strideC,
                             int64_t batch) {
    PEA_OP(ctx, "gemm");
    return pea_gemm_rowmajor(ctx, "gemm", dtype, transA, transB, M, N, K, alpha, A, lda, strideA, B, ldb, strideB,
                             beta, C, ldc, strideC, batch);
}

/* y [rows, out] = x [rows, in] · weightᵀ + bias in one cublasLtMatmul with the bias epilogue: column-major
 * D (out × rows, ld out) = op(A)·B, A the weight [out, in] seen column-major (in × out, ld in) and transposed,
 * B = x seen column-major (in × rows, ld in); the epilogue adds bias[i] to row i of D (output feature i) in
 * f32 before D is rounded, so y is written once: no bias prefill, no read of C.
 *
 * The descriptors and the heuristic's algo are built once per problem and kept in ctx->lt_plans (a heuristic
 * query costs more host time than the launch it plans). The key holds the alignments of x, weight and y the
 * heuristic was told (up to 256 bytes, cuBLASLt's default assumption): an algo chosen for aligned pointers
 * may need the alignment, so a view at an odd offset gets its own plan. Only the bias pointer changes per
 * call. Returns CUBLAS_STATUS_NOT_SUPPORTED in *status, and nothing queued, when cuBLASLt has no algorithm
 * for the case (the caller falls back). */
enum { PEA_LT_WORKSPACE_BYTES = 4 << 20 };

static uint32_t lt_alignment(const void *p) { /* the largest power of two ≤ 256 dividing the address */
    const uintptr_t a = (uintptr_t)p | 256;
    return (uint32_t)(a & (~a + 1));
}

static void lt_plan_release(pea_lt_plan *plan) {
    if (plan->ld) cublasLtMatrixLayoutDestroy(plan->ld);
    if (plan->lb) cublasLtMatrixLayoutDestroy(plan->lb);
    if (plan->la) cublasLtMatrixLayoutDestroy(plan->la);
    if (plan->desc) cublasLtMatmulDescDestroy(plan->desc);
    *plan = pea_lt_plan();
}

void pea_lt_plans_destroy(pea_cuda_context *ctx) {
    for (pea_lt_plan &plan : ctx->lt_plans) lt_plan_release(&plan);
}

/* Fills plan (its key already set): descriptors, layouts, and the heuristic's first algo under the workspace
 * and alignment preferences. A problem with no algo is a plan too (supported = 0), so it is asked once. */
static cublasStatus_t lt_plan_build(pea_cuda_context *ctx, pea_lt_plan *plan) {
    const pea_lt_key &k = plan->key;
    const cudaDataType_t t = cuda_type(k.dtype);
    const cublasComputeType_t compute = k.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const int32_t transpose = CUBLAS_OP_T;
    const uint32_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    const uint64_t workspace = PEA_LT_WORKSPACE_BYTES;
    const void *no_bias_yet = ctx->lt_workspace; /* any device pointer: the heuristic does not read it */
    cublasStatus_t s = cublasLtMatmulDescCreate(&plan->desc, compute, CUDA_R_32F);
    if (!s) s = cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof transpose);
    if (!s) s = cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue);
    if (!s)
        s = cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &no_bias_yet,
                                           sizeof no_bias_yet);
    if (!s) s = cublasLtMatrixLayoutCreate(&plan->la, t, (uint64_t)k.in, (uint64_t)k.out, k.in);
    if (!s) s = cublasLtMatrixLayoutCreate(&plan->lb, t, (uint64_t)k.in, (uint64_t)k.rows, k.in);
    if (!s) s = cublasLtMatrixLayoutCreate(&plan->ld, t, (uint64_t)k.out, (uint64_t)k.rows, k.out);
    cublasLtMatmulPreference_t pref = NULL;
    if (!s) s = cublasLtMatmulPreferenceCreate(&pref);
    if (!s) s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                     sizeof workspace);
    /* A is the weight, B is x, C and D are y */
    const struct {
        cublasLtMatmulPreferenceAttributes_t attr;
        uint32_t bytes;
    } alignments[] = {{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, k.align_w},
                      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, k.align_x},
                      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, k.align_r ? k.align_r : k.align_y},
                      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, k.align_y}};
    for (const auto &a : alignments)
        if (!s) s = cublasLtMatmulPreferenceSetAttribute(pref, a.attr, &a.bytes, sizeof a.bytes);
    cublasLtMatmulHeuristicResult_t result;
    int found = 0;
    if (!s) s = cublasLtMatmulAlgoGetHeuristic(ctx->cublaslt, plan->desc, plan->la, plan->lb, plan->ld, plan->ld, pref,
                                               1, &result, &found);
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED || (!s && (found < 1 || result.state != CUBLAS_STATUS_SUCCESS))) {
        plan->supported = 0;
        return CUBLAS_STATUS_SUCCESS;
    }
    if (!s) {
        plan->algo = result.algo;
        plan->supported = 1;
    }
    return s;
}

/* The plan for this problem: found in the cache, or built in the next slot (the oldest plan released). */
static int lt_plan_for(pea_cuda_context *ctx, const char *op, const pea_lt_key &key, pea_lt_plan **found) {
    for (pea_lt_plan &plan : ctx->lt_plans)
        if (plan.used && plan.key == key) {
            *found = &plan;
            return PEA_CUDA_OK;
        }
    pea_lt_plan *plan = &ctx->lt_plans[ctx->lt_next];
    ctx->lt_next = (ctx->lt_next + 1) % PEA_LT_PLANS;
    lt_plan_release(plan);
    plan->key = key;
    const cublasStatus_t s = lt_plan_build(ctx, plan);
    if (s != CUBLAS_STATUS_SUCCESS) {
        lt_plan_release(plan);
        return pea_check_cublas(ctx, op, s, "cuBLASLt plan");
    }
    plan->used = 1;
    *found = plan;
    return PEA_CUDA_OK;
}

static int linear_bias_lt(pea_cuda_context *ctx, const char *op, int dtype, const void *x, const void *weight,
                          const void *bias, const void *residual, void *y, int64_t rows, int64_t in, int64_t out,
                          cublasStatus_t *status) {
    *status = CUBLAS_STATUS_NOT_SUPPORTED;
    if (!ctx->lt_workspace) PEA_TRY(pea_mem_alloc(ctx, op, PEA_LT_WORKSPACE_BYTES, &ctx->lt_workspace));
    const pea_lt_key key = {dtype, dtype == CK_F32 && ctx->tf32, rows, in, out, lt_alignment(x), lt_alignment(weight),
                            lt_alignment(y), residual ? lt_alignment(residual) : 0};
    pea_lt_plan *plan = NULL;
    PEA_TRY(lt_plan_for(ctx, op, key, &plan));
    if (!plan->supported) return PEA_CUDA_OK;
    /* with a residual: D = y, C = the residual, beta = 1 (same layout as D) */
    const float alpha = 1.0f, beta = residual ? 1.0f : 0.0f;
    const void *c = residual ? residual : y;
    cublasStatus_t s =
        cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    if (!s)
        s = cublasLtMatmul(ctx->cublaslt, plan->desc, &alpha, weight, plan->la, x, plan->lb, &beta, c, plan->ld, y,
                           plan->ld, &plan->algo, ctx->lt_workspace, PEA_LT_WORKSPACE_BYTES, ctx->stream);
    *status = s;
    if (s == CUBLAS_STATUS_NOT_SUPPORTED) return PEA_CUDA_OK;
    return pea_check_cublas(ctx, op, s, "cublasLtMatmul");
}

extern "C" int pea_cuda_linear(pea_cuda_context *ctx, int dtype, const void *x, const void *weight, const void *bias,
                               const void *residual, void *y, int64_t rows, int64_t in_features, int64_t out_features) {
    static const char *op = "linear";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, rows >= 0 && in_features >= 0 && out_features >= 0, "shape rows %lld, in %lld, out %lld",
                (long long)rows, (long long)in_features, (long long)out_features);
    if (rows == 0 || out_features == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && weight && y, "NULL tensor (x %p, weight %p, y %p)", x, weight, y);
    PEA_REQUIRE(ctx, op, rows <= INT_MAX && in_features <= INT_MAX && out_features <= INT_MAX,
                "shape rows %lld, in %lld, out %lld exceeds cuBLAS's int range", (long long)rows,
                (long long)in_features, (long long)out_features);
    /* cuBLASLt's preferences take no alignment for the bias, so a bias at an odd offset (a view) is not handed
     * to an algo chosen for an aligned one: it takes the fallback */
    if (bias && in_features > 0 && lt_alignment(bias) >= 16) {
        cublasStatus_t s;
        PEA_TRY(linear_bias_lt(ctx, op, dtype, x, weight, bias, residual, y, rows, in_features, out_features, &s));
        if (s == CUBLAS_STATUS_SUCCESS) return PEA_CUDA_OK;
    }
    /* no bias, no input features, or no cuBLASLt algorithm: the bias (+ residual) written first, the GEMM adding
     * onto it */
    if (residual) PEA_TRY(pea_residual_prefill(ctx, op, dtype, y, residual, bias, rows * out_features, 1, out_features));
    else if (bias) PEA_TRY(pea_bias_prefill(ctx, op, dtype, y, bias, rows * out_features, 1, out_features));
    /* y [rows, out] = x [rows, in] · weightᵀ, weight stored [out, in] (transB) */
    const int64_t ld_in = in_features > 0 ? in_features : 1;
    return pea_gemm_rowmajor(ctx, op, dtype, 0, 1, rows, out_features, in_features, 1.0f, x, ld_in, 0, weight, ld_in,
                             0, bias || residual ? 1.0f : 0.0f, y, out_features, 0, 1);
}
