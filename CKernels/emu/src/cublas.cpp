/*
 * cublas.cpp — the cuBLAS GEMMs on the CPU, with cuBLAS's semantics (column-major storage):
 *
 *   C[b] = alpha · op(A[b]) · op(B[b]) + beta · C[b]      op(A) m×k, op(B) k×n, C m×n
 *
 *   element (i, j) of a column-major matrix X with leading dimension ldx is X[i + j·ldx];
 *   op(A) = A (A is m×k, lda ≥ max(1, m)) or Aᵀ (A is k×m, lda ≥ max(1, k)); likewise B with k, n;
 *   ldc ≥ max(1, m); A[b] = A + b·strideA (in elements), likewise B and C.
 *
 * Inputs are converted to f32 (f16/bf16 exactly); products accumulate in f32; alpha and beta are f32 (the
 * scale type of every CUBLAS_COMPUTE_32F* mode). beta = 0 means C is not read; alpha = 0 means A and B are
 * not read. The reduced-precision compute modes round each input first, which is the precision the GPU's
 * tensor cores deliver (not their exact bits): CUBLAS_COMPUTE_32F_FAST_TF32 (and COMPUTE_32F on f32 data
 * with CUBLAS_TF32_TENSOR_OP_MATH) to TF32 (10-bit mantissa, nearest-even), FAST_16F to f16, FAST_16BF to
 * bf16. Type combinations are those cuBLAS lists for COMPUTE_32F: A and B of one type (32F, 16F or 16BF),
 * C of that type or 32F; the FAST modes take 32F only; anything else is CUBLAS_STATUS_NOT_SUPPORTED.
 * cublasLtMatmul (cublasLt.h) runs on the same GEMM, with the bias epilogue added before the rounding to D.
 * The stream is honoured trivially: every call completes before it returns.
 */
#include "internal.h"
#include "../include/cublasLt.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <mutex>
#include <set>
#include <vector>

struct cublasContext {
    cudaStream_t stream;
    cublasMath_t math;
    cublasPointerMode_t pointer_mode;
    void *workspace; /* cublasSetWorkspace's; stream capture needs one (cuBLAS must not allocate while capturing) */
};

namespace {

/* The live handles of one kind: create adds, destroy removes, every call checks. */
template <class H>
class HandleSet {
  public:
    void add(H h) {
        std::lock_guard<std::mutex> lk(mutex_);
        live_.insert(h);
    }
    bool remove(H h) {
        std::lock_guard<std::mutex> lk(mutex_);
        return h && live_.erase(h);
    }
    bool valid(H h) {
        std::lock_guard<std::mutex> lk(mutex_);
        return h && live_.count(h);
    }

  private:
    std::mutex mutex_;
    std::set<H> live_;
};

HandleSet<cublasHandle_t> g_handles;
HandleSet<cublasLtHandle_t> g_lt_handles;

enum Round { ROUND_NONE, ROUND_TF32, ROUND_F16, ROUND_BF16 };

float round_input(float x, int r) {
    switch (r) {
    case ROUND_TF32: {
        uint32_t b;
        memcpy(&b, &x, 4);
        if ((b & 0x7f800000u) != 0x7f800000u) { /* finite: keep 10 mantissa bits, nearest-even */
            b += 0xfffu + ((b >> 13) & 1u);
            b &= ~0x1fffu;
        }
        memcpy(&x, &b, 4);
        return x;
    }
    case ROUND_F16: return pea_emu::f16_bits_to_f32(pea_emu::f32_to_f16_bits(x, pea_emu::RN));
    case ROUND_BF16: return pea_emu::bf16_bits_to_f32(pea_emu::f32_to_bf16_bits(x, pea_emu::RN));
    }
    return x;
}

float load(const void *p, cudaDataType t, long long i) {
    switch (t) {
    case CUDA_R_16F: return pea_emu::f16_bits_to_f32(((const unsigned short *)p)[i]);
    case CUDA_R_16BF: return pea_emu::bf16_bits_to_f32(((const unsigned short *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

void store(void *p, cudaDataType t, long long i, float v) {
    switch (t) {
    case CUDA_R_16F: ((unsigned short *)p)[i] = pea_emu::f32_to_f16_bits(v, pea_emu::RN); break;
    case CUDA_R_16BF: ((unsigned short *)p)[i] = pea_emu::f32_to_bf16_bits(v, pea_emu::RN); break;
    default: ((float *)p)[i] = v; break;
    }
}

struct Gemm {
    int ta, tb, m, n, k;
    float alpha, beta;
    const void *A, *B;
    void *C;
    const void *Cin = nullptr;  /* the C that beta scales, when not C itself (cublasLtMatmul's C ≠ D) */
    const void *bias = nullptr; /* cuBLASLt's bias epilogue: bias[i] (type ct) added to row i before rounding */
    cudaDataType at, bt, ct;
    long long lda, ldb, ldc;
    int round;
    std::vector<float> Ap; /* op(A) as f32, column-major m×k (lda = m) */
};

/* Columns [j0, j1) of C. */
void gemm_columns(void *ctx, long long j0, long long j1) {
    Gemm &g = *(Gemm *)ctx;
    std::vector<float> acc(g.m), bcol(g.k);
    for (long long j = j0; j < j1; j++) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        if (g.alpha != 0.0f) {
            for (int p = 0; p < g.k; p++)
                bcol[p] = round_input(load(g.B, g.bt, g.tb == CUBLAS_OP_N ? p + j * g.ldb : j + (long long)p * g.ldb),
                                      g.round);
            for (int p = 0; p < g.k; p++) {
                const float *a = &g.Ap[(size_t)p * g.m];
                float b = bcol[p];
                for (int i = 0; i < g.m; i++) acc[i] += a[i] * b;
            }
        }
        const void *cin = g.Cin ? g.Cin : g.C;
        for (int i = 0; i < g.m; i++) {
            float c = g.alpha * acc[i];
            if (g.beta != 0.0f) c += g.beta * load(cin, g.ct, i + j * g.ldc);
            if (g.bias) c += load(g.bias, g.ct, i);
            store(g.C, g.ct, i + j * g.ldc, c);
        }
    }
}

void gemm_one(Gemm &g) {
    if (g.m == 0 || g.n == 0 || pea_emu_skipping_kernels()) return;
    if (g.alpha != 0.0f) {
        g.Ap.resize((size_t)g.m * g.k);
        for (int p = 0; p < g.k; p++)
            for (int i = 0; i < g.m; i++)
                g.Ap[(size_t)p * g.m + i] = round_input(
                    load(g.A, g.at, g.ta == CUBLAS_OP_N ? i + (long long)p * g.lda : p + (long long)i * g.lda), g.round);
    }
    long long flops_per_col = 2LL * g.m * std::max(g.k, 1);
    long long grain = std::max(1LL, (1LL << 18) / flops_per_col);
    pea_emu::parallel_for(g.n, grain, gemm_columns, &g);
}

size_t elem_size(cudaDataType t) { return t == CUDA_R_32F ? 4 : 2; }

cublasStatus_t check_dims(cublasHandle_t h, int ta, int tb, int m, int n, int k, long long lda, long long ldb,
                          long long ldc, const void *alpha, const void *beta) {
    if (!g_handles.valid(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (ta < 0 || ta > 2 || tb < 0 || tb > 2) return CUBLAS_STATUS_INVALID_VALUE;
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k)) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldb < std::max(1, tb == CUBLAS_OP_N ? k : n)) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldc < std::max(1, m)) return CUBLAS_STATUS_INVALID_VALUE;
    if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}

/* The rounding of a (types, compute type) combination, or -1 when cuBLAS does not support it. */
int combination(cublasHandle_t h, cudaDataType at, cudaDataType bt, cudaDataType ct, cublasComputeType_t ctype) {
    bool f32 = at == CUDA_R_32F && bt == CUDA_R_32F && ct == CUDA_R_32F;
    switch (ctype) {
    case CUBLAS_COMPUTE_32F_FAST_TF32: return f32 ? ROUND_TF32 : -1;
    case CUBLAS_COMPUTE_32F_FAST_16F: return f32 ? ROUND_F16 : -1;
    case CUBLAS_COMPUTE_32F_FAST_16BF: return f32 ? ROUND_BF16 : -1;
    case CUBLAS_COMPUTE_32F:
    case CUBLAS_COMPUTE_32F_PEDANTIC:
        if (at != bt) return -1;
        if (at == CUDA_R_32F && ct != CUDA_R_32F) return -1;
        if (at != CUDA_R_32F && at != CUDA_R_16F && at != CUDA_R_16BF) return -1;
        if (ct != at && ct != CUDA_R_32F) return -1;
        if (at == CUDA_R_32F && ctype == CUBLAS_COMPUTE_32F && (h->math & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH)
            return ROUND_TF32;
        return ROUND_NONE;
    default: return -1;
    }
}

using pea_emu::CAPTURE_NONE;
using pea_emu::CAPTURE_RECORDED;
using pea_emu::CAPTURE_REFUSED;

/* A GEMM queued on `stream`: recorded instead of run while the stream captures. cuBLAS needs a workspace
 * of the caller's (cublasSetWorkspace) to be captured: without one it would allocate during capture, which a
 * GPU refuses, so the call is refused here (CAPTURE_REFUSED). cublasLtMatmul takes its workspace as an
 * argument and never allocates. */
pea_emu::CaptureResult captured(cudaStream_t stream, bool has_workspace, const char *what, pea_emu::CapturedOp op) {
    if (!pea_emu::rt_stream_capturing(stream)) return CAPTURE_NONE;
    if (!has_workspace) {
        if (!pea_emu::rt_quiet())
            fprintf(stderr, "pea-emu: %s during stream capture without a workspace (set one with "
                            "cublasSetWorkspace before capturing) [CUBLAS_STATUS_NOT_SUPPORTED]\n", what);
        return CAPTURE_REFUSED;
    }
    return pea_emu::rt_capture(stream, what, std::move(op));
}

cublasStatus_t gemm_batched(cublasHandle_t h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A,
                            cudaDataType at, int lda, long long sA, const void *B, cudaDataType bt, int ldb,
                            long long sB, const void *beta, void *C, cudaDataType ct, int ldc, long long sC,
                            int batch, cublasComputeType_t ctype, const void *const *Aarr, const void *const *Barr,
                            void *const *Carr) {
    if (cublasStatus_t s = check_dims(h, ta, tb, m, n, k, lda, ldb, ldc, alpha, beta)) return s;
    if (batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    int round = combination(h, at, bt, ct, ctype);
    if (round < 0) return CUBLAS_STATUS_NOT_SUPPORTED;
    Gemm g;
    g.ta = ta;
    g.tb = tb;
    g.m = m;
    g.n = n;
    g.k = k;
    g.at = at;
    g.bt = bt;
    g.ct = ct;
    g.lda = lda;
    g.ldb = ldb;
    g.ldc = ldc;
    g.round = round;
    /* Host-mode scalars are read now (as cuBLAS does), device-mode ones when the GEMM runs. */
    const bool device_scalars = h->pointer_mode == CUBLAS_POINTER_MODE_DEVICE;
    const float alpha_now = *(const float *)alpha, beta_now = *(const float *)beta;
    auto run = [=](cudaStream_t) mutable {
        g.alpha = device_scalars ? *(const float *)alpha : alpha_now;
        g.beta = device_scalars ? *(const float *)beta : beta_now;
        for (int b = 0; b < batch; b++) {
            if (Aarr) {
                g.A = Aarr[b];
                g.B = Barr[b];
                g.C = Carr[b];
            } else {
                g.A = (const char *)A + b * sA * (long long)elem_size(at);
                g.B = (const char *)B + b * sB * (long long)elem_size(bt);
                g.C = (char *)C + b * sC * (long long)elem_size(ct);
            }
            gemm_one(g);
        }
        return cudaSuccess;
    };
    switch (captured(h->stream, h->workspace != nullptr, "cuBLAS GEMM", run)) {
    case CAPTURE_REFUSED: return CUBLAS_STATUS_NOT_SUPPORTED;
    case CAPTURE_RECORDED: return CUBLAS_STATUS_SUCCESS;
    case CAPTURE_NONE: break;
    }
    run(h->stream);
    return CUBLAS_STATUS_SUCCESS;
}

} // namespace

extern "C" {

cublasStatus_t cublasCreate(cublasHandle_t *handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = new cublasContext{nullptr, CUBLAS_DEFAULT_MATH, CUBLAS_POINTER_MODE_HOST, nullptr};
    g_handles.add(*handle);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
    if (!g_handles.remove(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetVersion(cublasHandle_t handle, int *version) {
    if (!g_handles.valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!version) return CUBLAS_STATUS_INVALID_VALUE;
    *version = 120000;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
    if (!g_handles.valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!pea_emu::rt_stream_valid(stream)) return CUBLAS_STATUS_INVALID_VALUE;
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream(cublasHandle_t handle, cudaStream_t *stream) {
    if (!g_handles.valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!stream) return CUBLAS_STATUS_INVALID_VALUE;
    *stream = handle->stream;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
    if (!g_handles.valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    int base = (int)mode & ~CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
    if (base < 0 || base > 3) return CUBLAS_STATUS_INVALID_VALUE;
    handle->math = mode;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t *mode) {
    if (!g_handles.valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
    *mode = handle->math;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetPointerMode(cublasHandle_t handle, cublasPointerMode_t mode) {
    if (!g_handles.valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE) return CUBLAS_STATUS_INVALID_VALUE;
    handle->pointer_mode = mode; /* host and device memory are one here: alpha and beta read the same way */
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetPointerMode(cublasHandle_t handle, cublasPointerMode_t *mode) {
    if (!g_handles.valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
    *mode = handle->pointer_mode;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void *workspace, size_t bytes) {
    if (!g_handles.valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (workspace && (bytes == 0 || pea_emu::rt_kernel_pointer_problem(workspace))) return CUBLAS_STATUS_INVALID_VALUE;
    handle->workspace = bytes ? workspace : nullptr;
    return CUBLAS_STATUS_SUCCESS;
}

const char *cublasGetStatusName(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}

const char *cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "license error";
    }
    return "unknown error";
}

cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                           int k, const float *alpha, const float *A, int lda, const float *B, int ldb,
                           const float *beta, float *C, int ldc) {
    return gemm_batched(handle, transa, transb, m, n, k, alpha, A, CUDA_R_32F, lda, 0, B, CUDA_R_32F, ldb, 0, beta,
                        C, CUDA_R_32F, ldc, 0, 1, CUBLAS_COMPUTE_32F, nullptr, nullptr, nullptr);
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                         int m, int n, int k, const float *alpha, const float *A, int lda,
                                         long long int strideA, const float *B, int ldb, long long int strideB,
                                         const float *beta, float *C, int ldc, long long int strideC,
                                         int batchCount) {
    return gemm_batched(handle, transa, transb, m, n, k, alpha, A, CUDA_R_32F, lda, strideA, B, CUDA_R_32F, ldb,
                        strideB, beta, C, CUDA_R_32F, ldc, strideC, batchCount, CUBLAS_COMPUTE_32F, nullptr, nullptr,
                        nullptr);
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void *alpha, const void *A, cudaDataType Atype, int lda, const void *B,
                            cudaDataType Btype, int ldb, const void *beta, void *C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
    (void)algo;
    return gemm_batched(handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype, ldb, 0, beta, C, Ctype,
                        ldc, 0, 1, computeType, nullptr, nullptr, nullptr);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa,
                                          cublasOperation_t transb, int m, int n, int k, const void *alpha,
                                          const void *A, cudaDataType Atype, int lda, long long int strideA,
                                          const void *B, cudaDataType Btype, int ldb, long long int strideB,
                                          const void *beta, void *C, cudaDataType Ctype, int ldc,
                                          long long int strideC, int batchCount, cublasComputeType_t computeType,
                                          cublasGemmAlgo_t algo) {
    (void)algo;
    return gemm_batched(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb, strideB, beta,
                        C, Ctype, ldc, strideC, batchCount, computeType, nullptr, nullptr, nullptr);
}

cublasStatus_t cublasGemmBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                                   int n, int k, const void *alpha, const void *const Aarray[], cudaDataType Atype,
                                   int lda, const void *const Barray[], cudaDataType Btype, int ldb,
                                   const void *beta, void *const Carray[], cudaDataType Ctype, int ldc,
                                   int batchCount, cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
    (void)algo;
    if (batchCount > 0 && (!Aarray || !Barray || !Carray)) return CUBLAS_STATUS_INVALID_VALUE;
    return gemm_batched(handle, transa, transb, m, n, k, alpha, nullptr, Atype, lda, 0, nullptr, Btype, ldb, 0, beta,
                        nullptr, Ctype, ldc, 0, batchCount, computeType, Aarray, Barray, Carray);
}

} // extern "C"

/* ---------------------------------------------------------------------------------------------------- */
/* cuBLASLt: cublasLtMatmul on the same GEMM (cublasLt.h says what is supported).                        */

struct cublasLtContext {
    int unused;
};
struct cublasLtMatmulDescOpaque_st {
    cublasComputeType_t compute;
    int ta, tb;
    int epilogue;
    const void *bias;
    int bias_type; /* -1: D's type */
};
struct cublasLtMatrixLayoutOpaque_st {
    cudaDataType type;
    uint64_t rows, cols;
    int64_t ld;
};

struct cublasLtMatmulPreferenceOpaque_st {
    uint64_t max_workspace;
    uint32_t min_alignment[4]; /* A, B, C, D, bytes */
};

namespace {
std::atomic<long long> g_lt_heuristic_queries{0};

/* The problem a descriptor and four layouts describe, checked and filled into g (all but the scalars and the
 * pointers); CUBLAS_STATUS_SUCCESS, or why cuBLASLt would refuse it. */
cublasStatus_t lt_problem(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                          cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc, Gemm &g) {
    if (!desc || !Adesc || !Bdesc || !Cdesc || !Ddesc) return CUBLAS_STATUS_INVALID_VALUE;
    /* op(A) m×k, op(B) k×n, C and D m×n */
    const uint64_t m = desc->ta == CUBLAS_OP_N ? Adesc->rows : Adesc->cols;
    const uint64_t k = desc->ta == CUBLAS_OP_N ? Adesc->cols : Adesc->rows;
    const uint64_t kb = desc->tb == CUBLAS_OP_N ? Bdesc->rows : Bdesc->cols;
    const uint64_t n = desc->tb == CUBLAS_OP_N ? Bdesc->cols : Bdesc->rows;
    if (k != kb || Ddesc->rows != m || Ddesc->cols != n || Cdesc->rows != m || Cdesc->cols != n)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (Cdesc->type != Ddesc->type || Cdesc->ld != Ddesc->ld) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (desc->epilogue == CUBLASLT_EPILOGUE_BIAS) {
        if (!desc->bias) return CUBLAS_STATUS_INVALID_VALUE;
        if (desc->bias_type != -1 && desc->bias_type != (int)Ddesc->type) return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    int round = -1;
    const bool f32 = Adesc->type == CUDA_R_32F && Bdesc->type == CUDA_R_32F && Ddesc->type == CUDA_R_32F;
    if (desc->compute == CUBLAS_COMPUTE_32F_FAST_TF32) {
        round = f32 ? ROUND_TF32 : -1;
    } else if (desc->compute == CUBLAS_COMPUTE_32F) {
        const cudaDataType t = Adesc->type;
        const bool ok = t == Bdesc->type && (t == CUDA_R_32F || t == CUDA_R_16F || t == CUDA_R_16BF) &&
                        (Ddesc->type == t || (t != CUDA_R_32F && Ddesc->type == CUDA_R_32F));
        round = ok ? ROUND_NONE : -1;
    }
    if (round < 0) return CUBLAS_STATUS_NOT_SUPPORTED;
    g.ta = desc->ta;
    g.tb = desc->tb;
    g.m = (int)m;
    g.n = (int)n;
    g.k = (int)k;
    g.at = Adesc->type;
    g.bt = Bdesc->type;
    g.ct = Ddesc->type;
    g.lda = Adesc->ld;
    g.ldb = Bdesc->ld;
    g.ldc = Ddesc->ld;
    g.round = round;
    return CUBLAS_STATUS_SUCCESS;
}

/* The stand-in's algo: a tag, the problem (words 1-4 and 6) and the alignments it may assume (word 5, 16 bits
 * each for A, B, C, D). */
cublasLtMatmulAlgo_t lt_algo(cublasLtMatmulDesc_t desc, const Gemm &g, const uint32_t align[4]) {
    cublasLtMatmulAlgo_t a;
    memset(&a, 0, sizeof a);
    a.data[0] = 0x504541456d754c74ull; /* "PEAEmuLt" */
    a.data[1] = (uint64_t)(uint32_t)g.m | (uint64_t)(uint32_t)g.n << 32;
    a.data[2] = (uint64_t)(uint32_t)g.k | (uint64_t)(uint32_t)desc->compute << 32;
    a.data[3] = (uint64_t)g.at | (uint64_t)g.bt << 8 | (uint64_t)g.ct << 16 | (uint64_t)g.ta << 24 |
                (uint64_t)g.tb << 32 | (uint64_t)desc->epilogue << 40;
    a.data[4] = (uint64_t)g.lda | (uint64_t)g.ldb << 32;
    a.data[6] = (uint64_t)g.ldc;
    for (int i = 0; i < 4; i++) a.data[5] |= (uint64_t)align[i] << (16 * i);
    return a;
}
} // namespace

extern "C" {

cublasStatus_t cublasLtCreate(cublasLtHandle_t *handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = new cublasLtContext{0};
    g_lt_handles.add(*handle);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
    if (!g_lt_handles.remove(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *desc, cublasComputeType_t computeType,
                                        cudaDataType_t scaleType) {
    if (!desc) return CUBLAS_STATUS_INVALID_VALUE;
    if (scaleType != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    *desc = new cublasLtMatmulDescOpaque_st{computeType, CUBLAS_OP_N, CUBLAS_OP_N, CUBLASLT_EPILOGUE_DEFAULT,
                                            nullptr, -1};
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
    delete desc;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t size) {
    if (!desc || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB: {
        int32_t v;
        if (size != sizeof v) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&v, buf, sizeof v);
        if (v != CUBLAS_OP_N && v != CUBLAS_OP_T) return CUBLAS_STATUS_NOT_SUPPORTED;
        (attr == CUBLASLT_MATMUL_DESC_TRANSA ? desc->ta : desc->tb) = v;
        return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_DESC_EPILOGUE: {
        uint32_t v;
        if (size != sizeof v) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&v, buf, sizeof v);
        if (v != CUBLASLT_EPILOGUE_DEFAULT && v != CUBLASLT_EPILOGUE_BIAS) return CUBLAS_STATUS_NOT_SUPPORTED;
        desc->epilogue = (int)v;
        return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
        if (size != sizeof(void *)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&desc->bias, buf, sizeof(void *));
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: {
        int32_t v;
        if (size != sizeof v) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&v, buf, sizeof v);
        desc->bias_type = v;
        return CUBLAS_STATUS_SUCCESS;
    }
    }
    return CUBLAS_STATUS_NOT_SUPPORTED;
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *layout, cudaDataType type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
    if (!layout) return CUBLAS_STATUS_INVALID_VALUE;
    if (rows > (uint64_t)INT_MAX || cols > (uint64_t)INT_MAX || ld < (int64_t)std::max<uint64_t>(1, rows))
        return CUBLAS_STATUS_INVALID_VALUE;
    *layout = new cublasLtMatrixLayoutOpaque_st{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
    delete layout;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *pref) {
    if (!pref) return CUBLAS_STATUS_INVALID_VALUE;
    *pref = new cublasLtMatmulPreferenceOpaque_st{0, {256, 256, 256, 256}};
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
    delete pref;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void *buf,
                                                    size_t size) {
    if (!pref || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
        if (size != sizeof(uint64_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&pref->max_workspace, buf, sizeof(uint64_t));
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
        if (size != sizeof(uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&pref->min_alignment[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, sizeof(uint32_t));
        return CUBLAS_STATUS_SUCCESS;
    }
    return CUBLAS_STATUS_NOT_SUPPORTED;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                              cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                              cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t results[], int *returned) {
    if (!g_lt_handles.valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!pref || requested <= 0 || !results || !returned) return CUBLAS_STATUS_INVALID_VALUE;
    g_lt_heuristic_queries++;
    *returned = 0;
    Gemm g;
    const cublasStatus_t s = lt_problem(desc, Adesc, Bdesc, Cdesc, Ddesc, g);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    for (uint32_t a : pref->min_alignment)
        if (a == 0 || (a & (a - 1)) || a > 256) return CUBLAS_STATUS_INVALID_VALUE;
    memset(&results[0], 0, sizeof results[0]);
    results[0].algo = lt_algo(desc, g, pref->min_alignment);
    results[0].workspaceSize = 0; /* the CPU GEMM needs none, within any MAX_WORKSPACE_BYTES */
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t Adesc, const void *B, cublasLtMatrixLayout_t Bdesc,
                              const void *beta, const void *C, cublasLtMatrixLayout_t Cdesc, void *D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t *algo, void *workspace,
                              size_t workspaceSizeInBytes, cudaStream_t stream) {
    (void)workspace;
    (void)workspaceSizeInBytes;
    if (!g_lt_handles.valid(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!alpha || !beta || !D) return CUBLAS_STATUS_INVALID_VALUE;
    Gemm g;
    const cublasStatus_t s = lt_problem(desc, Adesc, Bdesc, Cdesc, Ddesc, g);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    g.alpha = *(const float *)alpha;
    g.beta = *(const float *)beta;
    if (g.beta != 0.0f && !C) return CUBLAS_STATUS_INVALID_VALUE;
    if (algo) {
        /* an algo from the heuristic: for this problem, and for pointers at least as aligned as it was told */
        const uint32_t none[4] = {1, 1, 1, 1};
        const cublasLtMatmulAlgo_t same = lt_algo(desc, g, none);
        for (int i = 0; i < 8; i++)
            if (i != 5 && algo->data[i] != same.data[i]) return CUBLAS_STATUS_INVALID_VALUE;
        const void *ptrs[4] = {A, B, C, D};
        for (int i = 0; i < 4; i++) {
            const uint64_t need = (algo->data[5] >> (16 * i)) & 0xffff;
            if (ptrs[i] && (uintptr_t)ptrs[i] % need != 0) return CUBLAS_STATUS_INVALID_VALUE;
        }
    }
    g.A = A;
    g.B = B;
    g.C = D;
    g.Cin = g.beta != 0.0f ? C : nullptr;
    g.bias = desc->epilogue == CUBLASLT_EPILOGUE_BIAS ? desc->bias : nullptr;
    auto run = [g](cudaStream_t) mutable {
        gemm_one(g);
        return cudaSuccess;
    };
    switch (captured(stream, true, "cublasLtMatmul", run)) {
    case CAPTURE_REFUSED: return CUBLAS_STATUS_NOT_SUPPORTED;
    case CAPTURE_RECORDED: return CUBLAS_STATUS_SUCCESS;
    case CAPTURE_NONE: break;
    }
    run(stream);
    return CUBLAS_STATUS_SUCCESS;
}

/* Stand-in only: how many heuristic queries have been made in this process (tests check that a backend
 * caches its algos). */
long long pea_emu_cublaslt_heuristic_queries(void) { return g_lt_heuristic_queries.load(); }

} // extern "C"
