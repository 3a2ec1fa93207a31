/*
 * planted_bugs.cu — kernels with one deliberate bug each: the mistakes that CUDA code actually makes.
 * They compile (with nvcc too) and would often "work" on a GPU; the emulator tests
 * (CKernels/emu/tests/test_samples.cpp) show that the emulated run catches every one, either as a launch
 * error that names the kernel or as wrong results.
 *
 * Dimension legend: M, N, K the GEMM dimensions; R rows; D the width of a row.
 */
#include <cuda_runtime.h>
#include <math.h>

#include "../../emu/pea_simt.h"
#include "samples.h"

#define TILE 16
#define FULL_MASK 0xffffffffu

/* BUG: no barrier between loading the tiles and reading them. C = A·B as tiled_gemm_kernel; thread
 * (tx, ty) reads a row of As and a column of Bs that other threads may not have written yet. */
__global__ void gemm_missing_sync_kernel(const float *A, const float *B, float *C, int M, int N, int K) {
    PEA_SHARED_ARRAY_2D(float, As, TILE, TILE);
    PEA_SHARED_ARRAY_2D(float, Bs, TILE, TILE);
    int tx = threadIdx.x, ty = threadIdx.y;
    int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TILE) {
        As[ty][tx] = (row < M && k0 + tx < K) ? A[(size_t)row * K + k0 + tx] : 0.0f;
        Bs[ty][tx] = (k0 + ty < K && col < N) ? B[(size_t)(k0 + ty) * N + col] : 0.0f;
        /* __syncthreads() missing here */
        for (int k = 0; k < TILE; k++) acc += As[ty][k] * Bs[k][tx];
        __syncthreads();
    }
    if (row < M && col < N) C[(size_t)row * N + col] = acc;
}

/* BUG: no barrier after the products, so a fast thread overwrites the tiles with the next step's data
 * while slower threads still read the current step's. */
__global__ void gemm_missing_second_sync_kernel(const float *A, const float *B, float *C, int M, int N, int K) {
    PEA_SHARED_ARRAY_2D(float, As, TILE, TILE);
    PEA_SHARED_ARRAY_2D(float, Bs, TILE, TILE);
    int tx = threadIdx.x, ty = threadIdx.y;
    int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TILE) {
        As[ty][tx] = (row < M && k0 + tx < K) ? A[(size_t)row * K + k0 + tx] : 0.0f;
        Bs[ty][tx] = (k0 + ty < K && col < N) ? B[(size_t)(k0 + ty) * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < TILE; k++) acc += As[ty][k] * Bs[k][tx];
        /* __syncthreads() missing here */
    }
    if (row < M && col < N) C[(size_t)row * N + col] = acc;
}

/* BUG: an off-by-one tile index: the inner loop runs to k ≤ TILE and reads As[ty][TILE], one past the row
 * (on a GPU it silently reads As[ty + 1][0], or past the array for the last row). */
__global__ void gemm_off_by_one_kernel(const float *A, const float *B, float *C, int M, int N, int K) {
    PEA_SHARED_ARRAY_2D(float, As, TILE, TILE);
    PEA_SHARED_ARRAY_2D(float, Bs, TILE, TILE);
    int tx = threadIdx.x, ty = threadIdx.y;
    int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TILE) {
        As[ty][tx] = (row < M && k0 + tx < K) ? A[(size_t)row * K + k0 + tx] : 0.0f;
        Bs[ty][tx] = (k0 + ty < K && col < N) ? B[(size_t)(k0 + ty) * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k <= TILE; k++) acc += As[ty][k] * Bs[k % TILE][tx];
        __syncthreads();
    }
    if (row < M && col < N) C[(size_t)row * N + col] = acc;
}

static dim3 gemm_grid(int M, int N) { return dim3((N + TILE - 1) / TILE, (M + TILE - 1) / TILE); }

cudaError_t bug_gemm_missing_sync(const float *A, const float *B, float *C, int M, int N, int K, cudaStream_t s) {
    PEA_LAUNCH(gemm_missing_sync_kernel, gemm_grid(M, N), dim3(TILE, TILE), 0, s, A, B, C, M, N, K);
    return cudaGetLastError();
}

cudaError_t bug_gemm_missing_second_sync(const float *A, const float *B, float *C, int M, int N, int K,
                                         cudaStream_t s) {
    PEA_LAUNCH(gemm_missing_second_sync_kernel, gemm_grid(M, N), dim3(TILE, TILE), 0, s, A, B, C, M, N, K);
    return cudaGetLastError();
}

cudaError_t bug_gemm_off_by_one(const float *A, const float *B, float *C, int M, int N, int K, cudaStream_t s) {
    PEA_LAUNCH(gemm_off_by_one_kernel, gemm_grid(M, N), dim3(TILE, TILE), 0, s, A, B, C, M, N, K);
    return cudaGetLastError();
}

/* BUG: a warp reduction with the lane mask of a half warp (0x0000ffff) while all 32 lanes call it. Lanes
 * 16-31 are not in the mask they pass. out[r] = Σ_d x[r, d], one warp per row. */
__global__ void row_sum_half_mask_kernel(const float *x, float *out, int D) {
    const float *xr = x + (size_t)blockIdx.x * D;
    float s = 0.0f;
    for (int d = threadIdx.x; d < D; d += 32) s += xr[d];
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0x0000ffffu, s, offset);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

/* BUG: a full-mask shuffle inside a branch that only half the warp takes; the other half goes on to a
 * __syncthreads. Lanes 0-15 wait for lanes 16-31 at the shuffle, lanes 16-31 wait for them at the barrier:
 * a deadlock on a GPU (a hang), an error here. One warp per row, as above. */
__global__ void row_sum_divergent_shuffle_kernel(const float *x, float *out, int D) {
    PEA_SHARED_ARRAY(float, total, 1);
    const float *xr = x + (size_t)blockIdx.x * D;
    int lane = threadIdx.x % 32;
    float s = 0.0f;
    for (int d = threadIdx.x; d < D; d += 32) s += xr[d];
    if (lane < 16) {
        s += __shfl_xor_sync(FULL_MASK, s, 16);
        for (int offset = 8; offset > 0; offset >>= 1) s += __shfl_xor_sync(0x0000ffffu, s, offset);
    }
    if (threadIdx.x == 0) total[0] = s;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = total[0];
}

/* BUG: threads past the end of the row return before the block reduction, whose __syncthreads the rest of
 * the block then waits at forever. out[r] = Σ_d x[r, d] with one thread per element (D ≤ blockDim.x). */
__global__ void row_sum_early_exit_kernel(const float *x, float *out, int D) {
    PEA_SHARED_ARRAY(float, partial, 32);
    if ((int)threadIdx.x >= D) return;
    float s = x[(size_t)blockIdx.x * D + threadIdx.x];
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(FULL_MASK, s, offset);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int w = 0; w < (int)blockDim.x / 32; w++) t += partial[w];
        out[blockIdx.x] = t;
    }
}

/* BUG: barriers in the two arms of a branch that splits the block: odd threads wait at one __syncthreads,
 * even threads at another. out[t] = t. */
__global__ void barrier_in_branch_kernel(float *out) {
    int t = threadIdx.x;
    if (t % 2) {
        out[t] = (float)t;
        __syncthreads();
    } else {
        __syncthreads();
        out[t] = (float)t;
    }
}

/* BUG (in the launcher): softmax with dynamic shared memory for one warp fewer than the block has, so the
 * last warp writes its statistics past the end. The kernel is the correct one from samples.cu. */
__global__ void softmax_online_kernel(const float *x, float *y, int D);

/* BUG (in the launcher): the row sum of samples.cu launched with a block that is not a multiple of 32, so
 * the last warp is partial and its shuffles read lanes that do not exist. */
__global__ void row_sum_kernel(const float *x, float *out, int D);

cudaError_t bug_row_sum_half_mask(const float *x, float *out, int R, int D, cudaStream_t s) {
    PEA_LAUNCH(row_sum_half_mask_kernel, R, 32, 0, s, x, out, D);
    return cudaGetLastError();
}

cudaError_t bug_row_sum_divergent_shuffle(const float *x, float *out, int R, int D, cudaStream_t s) {
    PEA_LAUNCH(row_sum_divergent_shuffle_kernel, R, 32, 0, s, x, out, D);
    return cudaGetLastError();
}

cudaError_t bug_row_sum_early_exit(const float *x, float *out, int R, int D, int threads, cudaStream_t s) {
    PEA_LAUNCH(row_sum_early_exit_kernel, R, threads, 0, s, x, out, D);
    return cudaGetLastError();
}

cudaError_t bug_barrier_in_branch(float *out, cudaStream_t s) {
    PEA_LAUNCH(barrier_in_branch_kernel, 1, 64, 0, s, out);
    return cudaGetLastError();
}

cudaError_t bug_softmax_short_smem(const float *x, float *y, int R, int D, int threads, cudaStream_t s) {
    size_t smem = 2 * (size_t)(threads / 32 - 1) * sizeof(float);
    PEA_LAUNCH(softmax_online_kernel, R, threads, smem, s, x, y, D);
    return cudaGetLastError();
}

cudaError_t bug_row_sum_partial_warp(const float *x, float *out, int R, int D, int threads, cudaStream_t s) {
    PEA_LAUNCH(row_sum_kernel, R, threads, 0, s, x, out, D);
    return cudaGetLastError();
}

/* BUG (in the launcher): a 2048-thread block; the limit is 1024. */
cudaError_t bug_too_many_threads(float *out, cudaStream_t s) {
    PEA_LAUNCH(barrier_in_branch_kernel, 1, dim3(64, 32), 0, s, out);
    return cudaGetLastError();
}

/* BUG (in the launcher): 64 KB of dynamic shared memory without raising the kernel's limit (48 KB) with
 * cudaFuncSetAttribute. */
cudaError_t bug_too_much_smem(const float *x, float *y, int R, int D, int threads, cudaStream_t s) {
    PEA_LAUNCH(softmax_online_kernel, R, threads, 64 * 1024, s, x, y, D);
    return cudaGetLastError();
}
