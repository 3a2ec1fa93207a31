/*
 * test_cublas.cpp — the cuBLAS stand-in against a naive column-major GEMM written from the cuBLAS
 * documentation: C = alpha·op(A)·op(B) + beta·C with X(i, j) = X[i + j·ldx], every transpose combination,
 * non-square shapes, leading dimensions equal to the rows (no padding) and larger (the padding holds NaN,
 * which must never be read), strided batches, f16/bf16 inputs with f32 or f16/bf16 outputs, the reduced
 * precision compute types, the argument errors cuBLAS documents, and the two row-major recipes a backend
 * uses; cublasLtMatmul with the default and the bias epilogue (bias on the rows of D, before D's rounding).
 */
#include "check.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

static const char *op_name(cublasOperation_t op) { return op == CUBLAS_OP_N ? "N" : op == CUBLAS_OP_T ? "T" : "C"; }

/* A column-major rows×cols matrix with leading dimension ld (≥ rows): padding rows hold NaN. */
static std::vector<float> matrix(int rows, int cols, int ld, unsigned seed) {
    std::vector<float> v = random_vector((size_t)ld * std::max(cols, 1), seed);
    for (int j = 0; j < cols; j++)
        for (int i = rows; i < ld; i++) v[i + (size_t)j * ld] = NAN;
    return v;
}

/* The documented definition, in double. */
static std::vector<double> reference(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, double alpha,
                                     const std::vector<float> &A, int lda, const std::vector<float> &B, int ldb,
                                     double beta, const std::vector<float> &C, int ldc) {
    std::vector<double> out((size_t)ldc * n);
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double s = 0;
            for (int p = 0; p < k; p++) {
                double a = ta == CUBLAS_OP_N ? A[i + (size_t)p * lda] : A[p + (size_t)i * lda];
                double b = tb == CUBLAS_OP_N ? B[p + (size_t)j * ldb] : B[j + (size_t)p * ldb];
                s += a * b;
            }
            out[i + (size_t)j * ldc] = alpha * s + (beta == 0 ? 0.0 : beta * C[i + (size_t)j * ldc]);
        }
    return out;
}

/* max relative error over the m×n part of C; NaN counts as infinitely wrong. */
static double c_error(const std::vector<float> &got, const std::vector<double> &ref, int m, int n, int ldc) {
    double e = 0;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            size_t x = i + (size_t)j * ldc;
            double d = std::fabs(got[x] - ref[x]) / std::max(1.0, std::fabs(ref[x]));
            e = std::max(e, std::isnan(d) ? INFINITY : d);
        }
    return e;
}

static void test_sgemm(cublasHandle_t h) {
    const int shapes[][3] = {{7, 5, 3}, {33, 17, 65}, {1, 9, 4}, {16, 16, 16}, {64, 1, 31}, {3, 70, 1}};
    const cublasOperation_t ops[] = {CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C};
    int cases = 0;
    double worst = 0;
    for (auto &s : shapes)
        for (cublasOperation_t ta : ops)
            for (cublasOperation_t tb : ops)
                for (int pad = 0; pad <= 3; pad += 3)
                    for (int beta_zero = 0; beta_zero < 2; beta_zero++) {
                        if ((ta == CUBLAS_OP_C || tb == CUBLAS_OP_C) && (pad || beta_zero)) continue;
                        int m = s[0], n = s[1], k = s[2];
                        int ar = ta == CUBLAS_OP_N ? m : k, ac = ta == CUBLAS_OP_N ? k : m;
                        int br = tb == CUBLAS_OP_N ? k : n, bc = tb == CUBLAS_OP_N ? n : k;
                        int lda = ar + pad, ldb = br + pad, ldc = m + pad;
                        std::vector<float> A = matrix(ar, ac, lda, 1), B = matrix(br, bc, ldb, 2),
                                           C = matrix(m, n, ldc, 3);
                        if (beta_zero)
                            for (float &c : C) c = NAN; /* beta = 0: C is not read */
                        float alpha = 1.5f, beta = beta_zero ? 0.0f : -0.5f;
                        float *dA = to_device(A), *dB = to_device(B), *dC = to_device(C);
                        cublasStatus_t st =
                            cublasSgemm(h, ta, tb, m, n, k, &alpha, dA, lda, dB, ldb, &beta, dC, ldc);
                        CHECK(st == CUBLAS_STATUS_SUCCESS, "cublasSgemm %s%s: %s", op_name(ta), op_name(tb),
                              cublasGetStatusName(st));
                        double e = c_error(to_host(dC, C.size()), reference(ta, tb, m, n, k, alpha, A, lda, B, ldb,
                                                                             beta, C, ldc), m, n, ldc);
                        CHECK(e <= 1e-5, "cublasSgemm %s%s m=%d n=%d k=%d lda=%d ldb=%d ldc=%d beta=%g: error %g",
                              op_name(ta), op_name(tb), m, n, k, lda, ldb, ldc, beta, e);
                        worst = std::max(worst, e);
                        cases++;
                        cudaFree(dA);
                        cudaFree(dB);
                        cudaFree(dC);
                    }
    say("ok   cublasSgemm: %d cases (NN NT TN TT, C as T; 6 non-square shapes; ld = rows and rows+3 with NaN "
        "padding; beta = 0 with NaN C), max rel err %.1e",
        cases, worst);
}

static void test_strided_batched(cublasHandle_t h) {
    int m = 9, n = 6, k = 13, batch = 3;
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    int lda = k + 2, ldb = k, ldc = m + 1;
    long long sA = (long long)lda * m + 7, sB = (long long)ldb * n + 5, sC = (long long)ldc * n + 3;
    std::vector<float> A = random_vector(sA * batch, 4), B = random_vector(sB * batch, 5), C = random_vector(sC * batch, 6);
    float *dA = to_device(A), *dB = to_device(B), *dC = to_device(C);
    float alpha = 0.75f, beta = 2.0f;
    CHECK(cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, &alpha, dA, CUDA_R_32F, lda, sA, dB, CUDA_R_32F, ldb, sB,
                                     &beta, dC, CUDA_R_32F, ldc, sC, batch, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS,
          "cublasGemmStridedBatchedEx");
    std::vector<float> got = to_host(dC, C.size());
    double worst = 0;
    for (int b = 0; b < batch; b++) {
        std::vector<float> Ab(A.begin() + b * sA, A.begin() + (b + 1) * sA), Bb(B.begin() + b * sB, B.begin() + (b + 1) * sB),
            Cb(C.begin() + b * sC, C.begin() + (b + 1) * sC), Gb(got.begin() + b * sC, got.begin() + (b + 1) * sC);
        double e = c_error(Gb, reference(ta, tb, m, n, k, alpha, Ab, lda, Bb, ldb, beta, Cb, ldc), m, n, ldc);
        worst = std::max(worst, e);
        /* rows m..ldc-1 of each column and the gap after the batch are untouched */
        int touched = 0;
        for (int j = 0; j < n; j++) touched += Gb[m + (size_t)j * ldc] != Cb[m + (size_t)j * ldc];
        for (long long x = (long long)ldc * n; x < sC; x++) touched += Gb[x] != Cb[x];
        CHECK(touched == 0, "batch %d: %d elements outside C were written", b, touched);
    }
    CHECK(worst <= 1e-5, "strided batched: error %g", worst);
    say("ok   cublasGemmStridedBatchedEx: 3 batches, strides with gaps, padding and gaps untouched, max rel err %.1e",
        worst);
    cudaFree(dA);
    cudaFree(dB);
    cudaFree(dC);

    /* The same through cublasSgemmStridedBatched. */
    dA = to_device(A);
    dB = to_device(B);
    dC = to_device(C);
    CHECK(cublasSgemmStridedBatched(h, ta, tb, m, n, k, &alpha, dA, lda, sA, dB, ldb, sB, &beta, dC, ldc, sC, batch) ==
              CUBLAS_STATUS_SUCCESS,
          "cublasSgemmStridedBatched");
    CHECK(to_host(dC, C.size()) == got, "cublasSgemmStridedBatched differs from cublasGemmStridedBatchedEx");
    cudaFree(dA);
    cudaFree(dB);
    cudaFree(dC);
}

/* f16 / bf16 inputs: values k/64 (|k| < 128) are exact in both types. */
template <class H>
static void test_half_inputs(cublasHandle_t h, cudaDataType t, const char *name, double out_tol) {
    int m = 20, n = 11, k = 37;
    const cublasOperation_t ops[] = {CUBLAS_OP_N, CUBLAS_OP_T};
    double worst32 = 0, worst16 = 0;
    for (cublasOperation_t ta : ops)
        for (cublasOperation_t tb : ops) {
            int ar = ta == CUBLAS_OP_N ? m : k, ac = ta == CUBLAS_OP_N ? k : m;
            int br = tb == CUBLAS_OP_N ? k : n, bc = tb == CUBLAS_OP_N ? n : k;
            std::vector<float> A = random_vector((size_t)ar * ac, 7), B = random_vector((size_t)br * bc, 8),
                               C = random_vector((size_t)m * n, 9);
            for (float &v : A) v = std::round(v * 127.0f) / 64.0f;
            for (float &v : B) v = std::round(v * 127.0f) / 64.0f;
            for (float &v : C) v = std::round(v * 127.0f) / 64.0f;
            std::vector<H> Ah(A.begin(), A.end()), Bh(B.begin(), B.end()), Ch(C.begin(), C.end());
            H *dA = to_device(Ah), *dB = to_device(Bh), *dCh = to_device(Ch);
            float *dC = to_device(C);
            float alpha = 1.0f, beta = 0.5f;
            std::vector<double> ref = reference(ta, tb, m, n, k, alpha, A, ar, B, br, beta, C, m);
            /* f32 output */
            CHECK(cublasGemmEx(h, ta, tb, m, n, k, &alpha, dA, t, ar, dB, t, br, &beta, dC, CUDA_R_32F, m,
                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS,
                  "cublasGemmEx %s → f32", name);
            worst32 = std::max(worst32, c_error(to_host(dC, C.size()), ref, m, n, m));
            /* output in the input type */
            CHECK(cublasGemmEx(h, ta, tb, m, n, k, &alpha, dA, t, ar, dB, t, br, &beta, dCh, t, m, CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT_TENSOR_OP) == CUBLAS_STATUS_SUCCESS,
                  "cublasGemmEx %s → %s", name, name);
            std::vector<H> got = to_host(dCh, C.size());
            std::vector<float> gotf(got.begin(), got.end());
            worst16 = std::max(worst16, c_error(gotf, ref, m, n, m));
            cudaFree(dA);
            cudaFree(dB);
            cudaFree(dC);
            cudaFree(dCh);
        }
    CHECK(worst32 <= 1e-5, "%s inputs, f32 output: error %g", name, worst32);
    CHECK(worst16 <= out_tol, "%s inputs, %s output: error %g", name, name, worst16);
    say("ok   cublasGemmEx %s inputs (NN NT TN TT): f32 output max rel err %.1e, %s output %.1e", name, worst32, name,
        worst16);

    /* Batched strided with half inputs. */
    int batch = 2;
    std::vector<float> A = random_vector((size_t)m * k * batch, 10), B = random_vector((size_t)k * n * batch, 11);
    for (float &v : A) v = std::round(v * 127.0f) / 64.0f;
    for (float &v : B) v = std::round(v * 127.0f) / 64.0f;
    std::vector<H> Ah(A.begin(), A.end()), Bh(B.begin(), B.end());
    H *dA = to_device(Ah), *dB = to_device(Bh);
    float *dC = device_alloc<float>((size_t)m * n * batch);
    float alpha = 2.0f, beta = 0.0f;
    CHECK(cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA, t, m, (long long)m * k, dB, t, k,
                                     (long long)k * n, &beta, dC, CUDA_R_32F, m, (long long)m * n, batch,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS,
          "strided batched %s", name);
    std::vector<float> got = to_host(dC, (size_t)m * n * batch);
    double worst = 0;
    for (int b = 0; b < batch; b++) {
        std::vector<float> Ab(A.begin() + b * m * k, A.begin() + (b + 1) * m * k),
            Bb(B.begin() + b * k * n, B.begin() + (b + 1) * k * n), Gb(got.begin() + b * m * n, got.begin() + (b + 1) * m * n),
            Cz((size_t)m * n, 0.0f);
        worst = std::max(worst, c_error(Gb, reference(CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, alpha, Ab, m, Bb, k, 0.0, Cz, m), m, n, m));
    }
    CHECK(worst <= 1e-5, "strided batched %s: error %g", name, worst);
    cudaFree(dA);
    cudaFree(dB);
    cudaFree(dC);
}

static void test_precision_modes(cublasHandle_t h) {
    /* 1 + 2^-12 is an f32 but not a TF32 (10-bit mantissa): TF32 compute sees 1. */
    float a = 1.0f + 1.0f / 4096.0f, b = 1.0f, c = 0.0f, alpha = 1.0f, beta = 0.0f;
    float *dA = to_device(std::vector<float>{a}), *dB = to_device(std::vector<float>{b}), *dC = to_device(std::vector<float>{c});
    auto run = [&](cublasComputeType_t ct) {
        CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &alpha, dA, CUDA_R_32F, 1, dB, CUDA_R_32F, 1, &beta, dC,
                           CUDA_R_32F, 1, ct, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS,
              "compute type %d", (int)ct);
        return to_host(dC, 1)[0];
    };
    CHECK(run(CUBLAS_COMPUTE_32F) == a, "COMPUTE_32F keeps f32 inputs");
    CHECK(run(CUBLAS_COMPUTE_32F_FAST_TF32) == 1.0f, "COMPUTE_32F_FAST_TF32 rounds inputs to TF32");
    CHECK(run(CUBLAS_COMPUTE_32F_FAST_16BF) == 1.0f, "COMPUTE_32F_FAST_16BF rounds inputs to bf16");
    CHECK(run(CUBLAS_COMPUTE_32F_FAST_16F) == 1.0f, "COMPUTE_32F_FAST_16F rounds inputs to f16 (1 + 2^-12 → 1)");
    CHECK(cublasSetMathMode(h, CUBLAS_TF32_TENSOR_OP_MATH) == CUBLAS_STATUS_SUCCESS, "set TF32 math");
    CHECK(run(CUBLAS_COMPUTE_32F) == 1.0f, "COMPUTE_32F under CUBLAS_TF32_TENSOR_OP_MATH uses TF32");
    CHECK(run(CUBLAS_COMPUTE_32F_PEDANTIC) == a, "COMPUTE_32F_PEDANTIC ignores the TF32 math mode");
    float r = 0;
    CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &alpha, dA, 1, dB, 1, &beta, dC, 1) == CUBLAS_STATUS_SUCCESS &&
              (r = to_host(dC, 1)[0]) == 1.0f,
          "cublasSgemm under TF32 math: %g", r);
    CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH) == CUBLAS_STATUS_SUCCESS, "set default math");
    say("ok   compute types: 32F exact, FAST_TF32 / FAST_16BF / FAST_16F and TF32 math mode round inputs, PEDANTIC "
        "does not");
    cudaFree(dA);
    cudaFree(dB);
    cudaFree(dC);
}

static void test_errors(cublasHandle_t h) {
    float one = 1.0f;
    float *d = device_alloc<float>(64);
    struct {
        const char *what;
        int ta, tb; /* not cublasOperation_t: one case holds an invalid value */
        int m, n, k, lda, ldb, ldc;
    } bad[] = {
        {"m < 0", CUBLAS_OP_N, CUBLAS_OP_N, -1, 2, 2, 2, 2, 2},
        {"k < 0", CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, -1, 2, 2, 2},
        {"lda < m (A not transposed)", CUBLAS_OP_N, CUBLAS_OP_N, 4, 2, 3, 3, 3, 4},
        {"lda < k (A transposed)", CUBLAS_OP_T, CUBLAS_OP_N, 4, 2, 3, 2, 3, 4},
        {"ldb < k (B not transposed)", CUBLAS_OP_N, CUBLAS_OP_N, 4, 2, 3, 4, 2, 4},
        {"ldb < n (B transposed)", CUBLAS_OP_N, CUBLAS_OP_T, 4, 5, 3, 4, 4, 4},
        {"ldc < m", CUBLAS_OP_N, CUBLAS_OP_N, 4, 2, 3, 4, 3, 3},
        {"lda = 0 for an empty A", CUBLAS_OP_N, CUBLAS_OP_N, 0, 2, 3, 0, 3, 1},
        {"an invalid operation", 5, CUBLAS_OP_N, 2, 2, 2, 2, 2, 2},
    };
    for (auto &b : bad) {
        cublasStatus_t st = cublasSgemm(h, (cublasOperation_t)b.ta, (cublasOperation_t)b.tb, b.m, b.n, b.k, &one, d, b.lda, d, b.ldb, &one, d, b.ldc);
        CHECK(st == CUBLAS_STATUS_INVALID_VALUE, "%s: %s", b.what, cublasGetStatusName(st));
    }
    CHECK(cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, d, CUDA_R_32F, 2, 4, d, CUDA_R_32F, 2, 4,
                                     &one, d, CUDA_R_32F, 2, 4, -1, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE,
          "batchCount < 0");
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, d, CUDA_R_16F, 2, d, CUDA_R_32F, 2, &one, d,
                       CUDA_R_32F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED,
          "A f16 with B f32");
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, d, CUDA_R_32F, 2, d, CUDA_R_32F, 2, &one, d,
                       CUDA_R_16F, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED,
          "f32 inputs with an f16 output");
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, d, CUDA_R_16F, 2, d, CUDA_R_16F, 2, &one, d,
                       CUDA_R_16F, 2, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED,
          "FAST_TF32 with f16 data");
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, d, CUDA_R_32F, 2, d, CUDA_R_32F, 2, &one, d,
                       CUDA_R_32F, 2, CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED,
          "COMPUTE_64F");
    /* Quick returns: m = 0 does nothing; k = 0 scales C by beta. */
    std::vector<float> c4 = {1, 2, 3, 4};
    float *dc = to_device(c4), half = 0.5f;
    CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 0, 2, 2, &one, d, 1, d, 2, &one, dc, 1) == CUBLAS_STATUS_SUCCESS,
          "m = 0");
    CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 0, &one, d, 2, d, 1, &half, dc, 2) == CUBLAS_STATUS_SUCCESS &&
              to_host(dc, 4) == std::vector<float>({0.5f, 1, 1.5f, 2}),
          "k = 0 gives C = beta·C");
    cublasHandle_t gone;
    CHECK(cublasCreate(&gone) == CUBLAS_STATUS_SUCCESS && cublasDestroy(gone) == CUBLAS_STATUS_SUCCESS, "create/destroy");
    CHECK(cublasSgemm(gone, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, d, 2, d, 2, &one, d, 2) ==
              CUBLAS_STATUS_NOT_INITIALIZED,
          "a destroyed handle");
    say("ok   cuBLAS errors: INVALID_VALUE for negative sizes, short leading dimensions, bad operations, negative "
        "batches; NOT_SUPPORTED for other type combinations; NOT_INITIALIZED for a destroyed handle; quick returns");
    cudaFree(d);
    cudaFree(dc);
}

/* How a backend with row-major tensors calls column-major cuBLAS:
 *   C[M,N] = A[M,K]·B[K,N]      → cublasSgemm(N, N, N, M, K, B, ldb = N, A, lda = K, C, ldc = N)
 *   y[T,O] = x[T,I]·W[O,I]ᵀ     → cublasSgemm(T, N, O, T, I, W, ldw = I, x, ldx = I, y, ldy = O)
 * (a row-major matrix is the column-major transpose, and (A·B)ᵀ = Bᵀ·Aᵀ). */
static void test_row_major_recipes(cublasHandle_t h) {
    int M = 13, N = 7, K = 19;
    std::vector<float> A = random_vector((size_t)M * K, 20), B = random_vector((size_t)K * N, 21);
    float *dA = to_device(A), *dB = to_device(B), *dC = device_alloc<float>((size_t)M * N), one = 1.0f, zero = 0.0f;
    CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, dB, N, dA, K, &zero, dC, N) == CUBLAS_STATUS_SUCCESS,
          "row-major GEMM");
    std::vector<float> C = to_host(dC, (size_t)M * N);
    double e = 0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int p = 0; p < K; p++) s += (double)A[(size_t)i * K + p] * B[(size_t)p * N + j];
            e = std::max(e, std::fabs(C[(size_t)i * N + j] - s));
        }
    CHECK(e <= 1e-5, "row-major C = A·B: error %g", e);

    int T = 5, I = 11, O = 6;
    std::vector<float> x = random_vector((size_t)T * I, 22), W = random_vector((size_t)O * I, 23);
    float *dx = to_device(x), *dW = to_device(W), *dy = device_alloc<float>((size_t)T * O);
    CHECK(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, O, T, I, &one, dW, I, dx, I, &zero, dy, O) == CUBLAS_STATUS_SUCCESS,
          "linear layer");
    std::vector<float> y = to_host(dy, (size_t)T * O);
    double e2 = 0;
    for (int t = 0; t < T; t++)
        for (int o = 0; o < O; o++) {
            double s = 0;
            for (int i = 0; i < I; i++) s += (double)x[(size_t)t * I + i] * W[(size_t)o * I + i];
            e2 = std::max(e2, std::fabs(y[(size_t)t * O + o] - s));
        }
    CHECK(e2 <= 1e-5, "row-major y = x·Wᵀ: error %g", e2);
    say("ok   row-major recipes: C = A·B (max err %.1e), y = x·Wᵀ (max err %.1e)", e, e2);
    cudaFree(dA);
    cudaFree(dB);
    cudaFree(dC);
    cudaFree(dx);
    cudaFree(dW);
    cudaFree(dy);
}

/* cublasLtMatmul: D = alpha·op(A)·op(B) + beta·C (+ bias[i] on row i), D apart from C, against the reference
 * (plus the bias) in f32, then with f16 data, where D must be the f32 result rounded once to f16 (the bias
 * added before the rounding: rounding twice would be off by an ulp somewhere in 1000 values). */
static void test_lt() {
    cublasLtHandle_t lt;
    CHECK(cublasLtCreate(&lt) == CUBLAS_STATUS_SUCCESS, "cublasLtCreate");
    const int m = 19, n = 23, k = 37;
    const float alpha = 1.5f, beta = 0.5f;
    for (int half = 0; half <= 1; half++)
        for (int epi = 0; epi <= 1; epi++) {
            const cudaDataType t = half ? CUDA_R_16F : CUDA_R_32F;
            /* op(A) = Aᵀ (A stored k×m), op(B) = B (k×n): the linear layer's recipe */
            std::vector<float> A = matrix(k, m, k, 71), B = matrix(k, n, k, 72), C = matrix(m, n, m, 73),
                               bias = random_vector(m, 74);
            auto round16 = [&](std::vector<float> &v) {
                if (half)
                    for (float &x : v) x = __half2float(__float2half_rn(x));
            };
            round16(A);
            round16(B);
            round16(C);
            round16(bias);
            std::vector<double> want = reference(CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, alpha, A, k, B, k, beta, C, m);
            auto dev = [&](const std::vector<float> &v) -> void * {
                if (!half) return to_device(v);
                std::vector<__half> h(v.size());
                for (size_t i = 0; i < v.size(); i++) h[i] = __float2half_rn(v[i]);
                return to_device(h);
            };
            void *dA = dev(A), *dB = dev(B), *dC = dev(C), *dbias = dev(bias), *dD = dev(C);
            cublasLtMatmulDesc_t desc;
            CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS, "desc");
            const int32_t opT = CUBLAS_OP_T;
            const uint32_t e = epi ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
            CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opT, sizeof opT) == 0, "TRANSA");
            CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &e, sizeof e) == 0, "EPILOGUE");
            CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &dbias, sizeof dbias) == 0,
                  "BIAS_POINTER");
            cublasLtMatrixLayout_t la, lb, lc;
            CHECK(cublasLtMatrixLayoutCreate(&la, t, k, m, k) == 0 && cublasLtMatrixLayoutCreate(&lb, t, k, n, k) == 0 &&
                      cublasLtMatrixLayoutCreate(&lc, t, m, n, m) == 0,
                  "layouts");
            CHECK(cublasLtMatmul(lt, desc, &alpha, dA, la, dB, lb, &beta, dC, lc, dD, lc, nullptr, nullptr, 0, 0) ==
                      CUBLAS_STATUS_SUCCESS,
                  "cublasLtMatmul");
            std::vector<float> got(m * n);
            if (half) {
                std::vector<__half> h = to_host((const __half *)dD, got.size());
                for (size_t i = 0; i < got.size(); i++) got[i] = __half2float(h[i]);
            } else {
                got = to_host((const float *)dD, got.size());
            }
            double worst = 0;
            int unrounded = 0;
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) {
                    const double w = want[i + (size_t)j * m] + (epi ? bias[i] : 0.0);
                    worst = std::max(worst, std::fabs(got[i + (size_t)j * m] - w) / (1.0 + std::fabs(w)));
                    if (half) unrounded += got[i + (size_t)j * m] != __half2float(__float2half_rn((float)w));
                }
            CHECK(worst <= (half ? 1e-3 : 1e-5), "cublasLtMatmul %s %s: error %g", half ? "f16" : "f32",
                  epi ? "bias" : "default", worst);
            CHECK(unrounded <= 2, "cublasLtMatmul f16 %s: %d of %d values are not the f32 result rounded once",
                  epi ? "bias" : "default", unrounded, m * n);
            std::vector<unsigned char> c_after(C.size() * (half ? 2 : 4)), c_before(c_after.size());
            CUDA_OK(cudaMemcpy(c_after.data(), dC, c_after.size(), cudaMemcpyDeviceToHost));
            void *dC0 = dev(C); /* C as uploaded */
            CUDA_OK(cudaMemcpy(c_before.data(), dC0, c_before.size(), cudaMemcpyDeviceToHost));
            cudaFree(dC0);
            CHECK(c_after == c_before, "cublasLtMatmul wrote into C (D is a separate matrix)");
            cublasLtMatrixLayoutDestroy(la);
            cublasLtMatrixLayoutDestroy(lb);
            cublasLtMatrixLayoutDestroy(lc);
            cublasLtMatmulDescDestroy(desc);
            cudaFree(dA);
            cudaFree(dB);
            cudaFree(dC);
            cudaFree(dbias);
            cudaFree(dD);
        }
    /* the bias epilogue without a bias pointer, and mismatched shapes, are errors */
    cublasLtMatmulDesc_t desc;
    cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    const uint32_t e = CUBLASLT_EPILOGUE_BIAS;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &e, sizeof e);
    cublasLtMatrixLayout_t l2, l3;
    cublasLtMatrixLayoutCreate(&l2, CUDA_R_32F, 2, 2, 2);
    cublasLtMatrixLayoutCreate(&l3, CUDA_R_32F, 3, 3, 3);
    float *d = device_alloc<float>(9);
    const float one = 1.0f, zero = 0.0f;
    CHECK(cublasLtMatmul(lt, desc, &one, d, l2, d, l2, &zero, d, l2, d, l2, nullptr, nullptr, 0, 0) ==
              CUBLAS_STATUS_INVALID_VALUE,
          "bias epilogue without a bias pointer");
    const uint32_t none = CUBLASLT_EPILOGUE_DEFAULT;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &none, sizeof none);
    CHECK(cublasLtMatmul(lt, desc, &one, d, l2, d, l3, &zero, d, l2, d, l2, nullptr, nullptr, 0, 0) ==
              CUBLAS_STATUS_INVALID_VALUE,
          "k of A ≠ k of B");
    cudaFree(d);
    cublasLtMatrixLayoutDestroy(l2);
    cublasLtMatrixLayoutDestroy(l3);
    cublasLtMatmulDescDestroy(desc);
    CHECK(cublasLtDestroy(lt) == CUBLAS_STATUS_SUCCESS, "cublasLtDestroy");
}

/* cublasLtMatmulAlgoGetHeuristic: one algo for a supported problem, none (NOT_SUPPORTED) for an unsupported
 * one; the algo runs its problem (the same result as algo = NULL) and is refused, as the header states, for
 * another problem or for a pointer less aligned than the preference promised. */
static void test_lt_heuristic() {
    cublasLtHandle_t lt;
    CHECK(cublasLtCreate(&lt) == CUBLAS_STATUS_SUCCESS, "cublasLtCreate");
    const int m = 6, n = 5, k = 4;
    std::vector<float> A = matrix(m, k, m, 81), B = matrix(k, n, k, 82);
    float *dA = to_device(A), *dB = to_device(B);
    float *dD = device_alloc<float>(m * n + 1), *dD0 = device_alloc<float>(m * n);
    cublasLtMatmulDesc_t desc;
    cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    cublasLtMatrixLayout_t la, lb, ld, lother;
    cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, m, k, m);
    cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, k, n, k);
    cublasLtMatrixLayoutCreate(&ld, CUDA_R_32F, m, n, m);
    cublasLtMatrixLayoutCreate(&lother, CUDA_R_32F, m, n + 1, m);
    cublasLtMatmulPreference_t pref;
    CHECK(cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS, "preference");
    const uint64_t ws = 1 << 20;
    CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws) == 0,
          "MAX_WORKSPACE_BYTES");
    CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, 4) ==
              CUBLAS_STATUS_INVALID_VALUE,
          "MAX_WORKSPACE_BYTES of the wrong size");
    cublasLtMatmulHeuristicResult_t r[2];
    int count = -1;
    CHECK(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, ld, ld, pref, 2, r, &count) == CUBLAS_STATUS_SUCCESS &&
              count == 1 && r[0].state == CUBLAS_STATUS_SUCCESS && r[0].workspaceSize <= ws,
          "heuristic: one algo (count %d)", count);
    const float one = 1.0f, zero = 0.0f;
    CHECK(cublasLtMatmul(lt, desc, &one, dA, la, dB, lb, &zero, dD, ld, dD, ld, &r[0].algo, nullptr, 0, 0) == 0,
          "matmul with the heuristic's algo");
    CHECK(cublasLtMatmul(lt, desc, &one, dA, la, dB, lb, &zero, dD0, ld, dD0, ld, nullptr, nullptr, 0, 0) == 0,
          "matmul with algo NULL");
    CHECK(to_host(dD, m * n) == to_host(dD0, m * n), "the algo's result differs from algo = NULL's");
    CHECK(cublasLtMatmul(lt, desc, &one, dA, la, dB, lother, &zero, dD, ld, dD, ld, &r[0].algo, nullptr, 0, 0) ==
              CUBLAS_STATUS_INVALID_VALUE,
          "an algo used for another problem");
    CHECK(cublasLtMatmul(lt, desc, &one, dA, la, dB, lb, &zero, dD + 1, ld, dD + 1, ld, &r[0].algo, nullptr, 0, 0) ==
              CUBLAS_STATUS_INVALID_VALUE,
          "an algo chosen for 256-byte alignment given D at 4 bytes");
    /* told that D may sit at 4 bytes, the heuristic's algo takes it */
    const uint32_t four = 4;
    CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &four, sizeof four) ==
                  0 &&
              cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &four,
                                                   sizeof four) == 0,
          "MIN_ALIGNMENT_C/D_BYTES");
    CHECK(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, ld, ld, pref, 1, r, &count) == 0 && count == 1,
          "heuristic with 4-byte C and D");
    CHECK(cublasLtMatmul(lt, desc, &one, dA, la, dB, lb, &zero, dD + 1, ld, dD + 1, ld, &r[0].algo, nullptr, 0, 0) ==
              0,
          "an algo chosen for 4-byte alignment given D at 4 bytes");
    CHECK(to_host(dD + 1, m * n) == to_host(dD0, m * n), "the offset result differs");
    /* an unsupported problem (f16 A with f32 B) has no algo */
    cublasLtMatrixLayout_t lh;
    cublasLtMatrixLayoutCreate(&lh, CUDA_R_16F, m, k, m);
    count = -1;
    CHECK(cublasLtMatmulAlgoGetHeuristic(lt, desc, lh, lb, ld, ld, pref, 1, r, &count) ==
                  CUBLAS_STATUS_NOT_SUPPORTED &&
              count == 0,
          "heuristic for mixed input types: NOT_SUPPORTED and no algo (count %d)", count);
    CHECK(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, ld, ld, pref, 0, r, &count) == CUBLAS_STATUS_INVALID_VALUE,
          "heuristic asked for 0 algos");
    for (cublasLtMatrixLayout_t l : {la, lb, ld, lother, lh}) cublasLtMatrixLayoutDestroy(l);
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatmulDescDestroy(desc);
    for (float *p : {dA, dB, dD, dD0}) cudaFree(p);
    CHECK(cublasLtDestroy(lt) == CUBLAS_STATUS_SUCCESS, "cublasLtDestroy");
}

/* With kernels skipped (pea_emu_set_skip_kernels), a GEMM is checked but leaves C as it was. */
static void test_skip(cublasHandle_t h) {
    std::vector<float> A = matrix(3, 2, 3, 91), B = matrix(2, 4, 2, 92), C(12, 7.0f);
    float *dA = to_device(A), *dB = to_device(B), *dC = to_device(C);
    const float one = 1.0f, zero = 0.0f;
    pea_emu_set_skip_kernels(1);
    CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 3, 4, 2, &one, dA, 3, dB, 2, &zero, dC, 3) == 0, "skipped sgemm");
    CHECK(to_host(dC, 12) == C, "a skipped GEMM wrote C");
    CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 3, 4, 2, &one, dA, 2, dB, 2, &zero, dC, 3) ==
              CUBLAS_STATUS_INVALID_VALUE,
          "a skipped GEMM is still checked (lda < m)");
    pea_emu_set_skip_kernels(0);
    CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 3, 4, 2, &one, dA, 3, dB, 2, &zero, dC, 3) == 0, "sgemm");
    CHECK(to_host(dC, 12) != C, "the GEMM runs again once skipping is off");
    for (float *p : {dA, dB, dC}) cudaFree(p);
}

/* A GEMM on a capturing stream is recorded (host scalars by value) and run by each graph launch, reading A and B
 * as they are then; without a workspace (cublasSetWorkspace) the capture is refused, as cuBLAS would allocate. */
static void test_capture(cublasHandle_t h, cudaStream_t s) {
    const int m = 9, n = 7, k = 5;
    std::vector<float> A = matrix(m, k, m, 95), B = matrix(k, n, k, 96), A2 = matrix(m, k, m, 97);
    float *dA = to_device(A), *dB = to_device(B), *dC = device_alloc<float>((size_t)m * n);
    float *dE = device_alloc<float>((size_t)m * n), *ws = device_alloc<float>(1024);
    float alpha = 1.5f, zero = 0.0f;
    cudaGraph_t g = nullptr;
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA, m, dB, k, &zero, dC, m) ==
              CUBLAS_STATUS_NOT_SUPPORTED,
          "a GEMM captured without a workspace is refused");
    CUDA_OK(cudaStreamEndCapture(s, &g));
    CUDA_OK(cudaGraphDestroy(g));
    CHECK(cublasSetWorkspace(h, ws, 4096) == CUBLAS_STATUS_SUCCESS, "cublasSetWorkspace");
    CUDA_OK(cudaMemset(dC, 0, (size_t)m * n * 4));
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA, m, dB, k, &zero, dC, m) ==
              CUBLAS_STATUS_SUCCESS,
          "a GEMM captured with a workspace");
    alpha = -7.0f; /* the captured GEMM keeps 1.5 */
    CUDA_OK(cudaStreamEndCapture(s, &g));
    CHECK(to_host(dC, (size_t)m * n) == std::vector<float>((size_t)m * n, 0.0f), "capturing ran no GEMM");
    cudaGraphExec_t exec;
    CUDA_OK(cudaGraphInstantiateWithFlags(&exec, g, 0));
    alpha = 1.5f;
    for (const std::vector<float> *a : {&A, &A2}) {
        CUDA_OK(cudaMemcpy(dA, a->data(), a->size() * 4, cudaMemcpyHostToDevice));
        CUDA_OK(cudaGraphLaunch(exec, s));
        CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA, m, dB, k, &zero, dE, m) == 0, "eager");
        CHECK(to_host(dC, (size_t)m * n) == to_host(dE, (size_t)m * n), "replayed GEMM equals the eager one");
    }
    CHECK(c_error(to_host(dC, (size_t)m * n), reference(CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, 1.5, A2, m, B, k, 0.0, {}, m),
                  m, n, m) < 1e-6,
          "the second replay used the new A");
    CUDA_OK(cudaGraphExecDestroy(exec));
    CUDA_OK(cudaGraphDestroy(g));
    CHECK(cublasSetWorkspace(h, nullptr, 0) == CUBLAS_STATUS_SUCCESS, "workspace reset");
    for (float *p : {dA, dB, dC, dE, ws}) cudaFree(p);
    say("ok   stream capture: a GEMM is recorded with its scalars and replayed on new inputs; none without a workspace");
}

int main() {
    check_start("emu cublas", 300);
    pea_emu_set_quiet(1);
    cublasHandle_t h;
    CHECK(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS, "cublasCreate");
    cudaStream_t s;
    CUDA_OK(cudaStreamCreate(&s));
    CHECK(cublasSetStream(h, s) == CUBLAS_STATUS_SUCCESS, "cublasSetStream");
    test_sgemm(h);
    test_strided_batched(h);
    test_half_inputs<__half>(h, CUDA_R_16F, "f16", 1e-3);
    test_half_inputs<__nv_bfloat16>(h, CUDA_R_16BF, "bf16", 8e-3);
    test_precision_modes(h);
    test_errors(h);
    test_row_major_recipes(h);
    test_lt();
    test_lt_heuristic();
    test_skip(h);
    test_capture(h, s);
    CUDA_OK(cudaStreamSynchronize(s));
    CHECK(cublasDestroy(h) == CUBLAS_STATUS_SUCCESS, "cublasDestroy");
    CUDA_OK(cudaStreamDestroy(s));
    return check_summary("emu cublas");
}
