/*
 * cublasLt.h — stand-in for the cuBLASLt header in the emulated build: what a backend uses, cublasLtMatmul
 * with the default or the bias epilogue (and the heuristic query that picks its algo), computed on the CPU
 * (CKernels/emu/src/cublas.cpp)
 * with cuBLASLt's documented semantics: column-major layouts (type, rows, cols, ld) of the stored matrices,
 * D = alpha·op(A)·op(B) + beta·C (+ bias[i] on row i of D with CUBLASLT_EPILOGUE_BIAS, added in the compute
 * type before D is rounded; the bias has D's type), C and D of one layout, beta = 0 → C not read; the type
 * combinations of cublasGemmEx under the descriptor's compute type (f32 scale). Descriptor attributes other
 * than TRANSA, TRANSB, EPILOGUE, BIAS_POINTER and BIAS_DATA_TYPE, and layouts with a batch, are
 * CUBLAS_STATUS_NOT_SUPPORTED.
 *
 * cublasLtMatmulAlgoGetHeuristic returns one algo for a supported problem (none, and NOT_SUPPORTED, for an
 * unsupported one), honouring the preference's MAX_WORKSPACE_BYTES and MIN_ALIGNMENT_{A,B,C,D}_BYTES (default
 * 256, as cuBLASLt's). The algo records the problem it was chosen for and those alignments; cublasLtMatmul
 * given it refuses, with CUBLAS_STATUS_INVALID_VALUE, a different problem or a pointer less aligned than
 * recorded. cuBLASLt leaves both undefined (a wrong kernel, a misaligned-address fault); the stand-in makes a
 * cache of algos keyed too loosely fail in the tests. Enumerator and struct layouts are cuBLASLt's. Under nvcc
 * the toolkit's header is used.
 */
#ifndef PEA_EMU_STANDIN_CUBLASLT_H
#define PEA_EMU_STANDIN_CUBLASLT_H

#include "cublas_v2.h"

extern "C" {

typedef struct cublasLtContext *cublasLtHandle_t;
typedef struct cublasLtMatmulDescOpaque_st *cublasLtMatmulDesc_t;
typedef struct cublasLtMatrixLayoutOpaque_st *cublasLtMatrixLayout_t;
typedef struct {
    uint64_t data[8];
} cublasLtMatmulAlgo_t;

typedef enum {
    CUBLASLT_MATMUL_DESC_TRANSA = 3,
    CUBLASLT_MATMUL_DESC_TRANSB = 4,
    CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
    CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26
} cublasLtMatmulDescAttributes_t;

typedef enum { CUBLASLT_EPILOGUE_DEFAULT = 1, CUBLASLT_EPILOGUE_BIAS = 4 } cublasLtEpilogue_t;

typedef struct cublasLtMatmulPreferenceOpaque_st *cublasLtMatmulPreference_t;
typedef enum {
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1, /* uint64_t, default 0 */
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5, /* uint32_t, default 256 (likewise B, C, D) */
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8
} cublasLtMatmulPreferenceAttributes_t;

typedef struct {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
} cublasLtMatmulHeuristicResult_t;

cublasStatus_t cublasLtCreate(cublasLtHandle_t *handle);
cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle);
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *desc, cublasComputeType_t computeType,
                                        cudaDataType_t scaleType);
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc);
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t sizeInBytes);
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *layout, cudaDataType type, uint64_t rows,
                                          uint64_t cols, int64_t ld);
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout);
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *pref);
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref);
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void *buf,
                                                    size_t sizeInBytes);
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                              cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                              cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                              cublasLtMatmulPreference_t preference, int requestedAlgoCount,
                                              cublasLtMatmulHeuristicResult_t heuristicResultsArray[],
                                              int *returnAlgoCount);
cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t Adesc, const void *B, cublasLtMatrixLayout_t Bdesc,
                              const void *beta, const void *C, cublasLtMatrixLayout_t Cdesc, void *D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t *algo, void *workspace,
                              size_t workspaceSizeInBytes, cudaStream_t stream);

} /* extern "C" */

#endif /* PEA_EMU_STANDIN_CUBLASLT_H */
