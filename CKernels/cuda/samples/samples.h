/*
 * samples.h — host launchers of the sample kernels (samples.cu) and of the planted bugs (planted_bugs.cu).
 * They exist to prove the SIMT emulator (CKernels/emu/tests) and compile with nvcc in the compile check;
 * they are not part of libpea_cuda.so. Each returns cudaGetLastError() after its launch.
 *
 * Dimension legend: M, N, K the GEMM dimensions; R rows; D the width of a row.
 * All matrices are row-major f32 device arrays unless the name says otherwise.
 */
#ifndef PEA_CUDA_SAMPLES_H
#define PEA_CUDA_SAMPLES_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

/* samples.cu */
cudaError_t sample_tiled_gemm(const float *A, const float *B, float *C, int M, int N, int K, cudaStream_t stream);
cudaError_t sample_row_sum(const float *x, float *out, int R, int D, int threads, cudaStream_t stream);
cudaError_t sample_softmax(const float *x, float *y, int R, int D, int threads, cudaStream_t stream);
cudaError_t sample_column_sum_atomic(const float *x, float *out, int R, int D, int blocks, cudaStream_t stream);
cudaError_t sample_convert(const float *x, __half *h, __nv_bfloat16 *b, float *h_back, float *b_back, int n,
                           cudaStream_t stream);

/* planted_bugs.cu: each launcher runs a kernel with one deliberate bug (see the comment of each kernel). */
cudaError_t bug_gemm_missing_sync(const float *A, const float *B, float *C, int M, int N, int K, cudaStream_t s);
cudaError_t bug_gemm_missing_second_sync(const float *A, const float *B, float *C, int M, int N, int K,
                                         cudaStream_t s);
cudaError_t bug_gemm_off_by_one(const float *A, const float *B, float *C, int M, int N, int K, cudaStream_t s);
cudaError_t bug_row_sum_half_mask(const float *x, float *out, int R, int D, cudaStream_t s);
cudaError_t bug_row_sum_divergent_shuffle(const float *x, float *out, int R, int D, cudaStream_t s);
cudaError_t bug_row_sum_early_exit(const float *x, float *out, int R, int D, int threads, cudaStream_t s);
cudaError_t bug_barrier_in_branch(float *out, cudaStream_t s);
cudaError_t bug_softmax_short_smem(const float *x, float *y, int R, int D, int threads, cudaStream_t s);
cudaError_t bug_row_sum_partial_warp(const float *x, float *out, int R, int D, int threads, cudaStream_t s);
cudaError_t bug_too_many_threads(float *out, cudaStream_t s);
cudaError_t bug_too_much_smem(const float *x, float *y, int R, int D, int threads, cudaStream_t s);

#endif
