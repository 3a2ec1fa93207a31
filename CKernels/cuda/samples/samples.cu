/*
 * samples.cu — sample kernels written the way Pea's CUDA kernels are written: one source that nvcc builds
 * for the GPU and the host compiler builds against the SIMT emulator (CKernels/emu). They prove the
 * emulator (CKernels/emu/tests/test_samples.cpp compares them with plain C) and show the conventions:
 *   - include "pea_simt.h"; launch with PEA_LAUNCH; declare shared memory with PEA_SHARED_ARRAY(_2D) and
 *     PEA_DYNAMIC_SHARED;
 *   - a comment per kernel: what it computes and how threads map to data.
 *
 * Dimension legend: M, N, K the GEMM dimensions; R rows; D the width of a row.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "../../emu/pea_simt.h"
#include "samples.h"

#define TILE 16
#define FULL_MASK 0xffffffffu

/* ---------------------------------------------------------------------------------------------------- */
/* Tiled GEMM                                                                                            */

/* C[M,N] = A[M,K] · B[K,N].
 * A 16×16 block computes one 16×16 tile of C: thread (tx, ty) owns C[by·16 + ty, bx·16 + tx]. For each
 * 16-wide step along K, every thread loads one element of the A tile and one of the B tile into shared
 * memory (zero outside the matrices), the block waits, each thread accumulates its 16 products, and the
 * block waits again before the tiles are overwritten. */
__global__ void tiled_gemm_kernel(const float *A, const float *B, float *C, int M, int N, int K) {
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
        __syncthreads();
    }
    if (row < M && col < N) C[(size_t)row * N + col] = acc;
}

cudaError_t sample_tiled_gemm(const float *A, const float *B, float *C, int M, int N, int K, cudaStream_t stream) {
    dim3 block(TILE, TILE);
    dim3 grid((N + TILE - 1) / TILE, (M + TILE - 1) / TILE);
    PEA_LAUNCH(tiled_gemm_kernel, grid, block, 0, stream, A, B, C, M, N, K);
    return cudaGetLastError();
}

/* ---------------------------------------------------------------------------------------------------- */
/* Block reduction with warp shuffles                                                                    */

/* The sum of v over the 32 lanes of a warp, returned to every lane: a butterfly of __shfl_xor_sync. */
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

/* The sum of v over the block, returned to every thread. blockDim.x is a multiple of 32 (≤ 1024): each
 * warp reduces its lanes, lane 0 of warp w stores the warp's sum in partial[w], then every warp reduces
 * the partials. The trailing barrier lets a second call reuse `partial`. */
__device__ float block_sum(float v) {
    PEA_SHARED_ARRAY(float, partial, 32);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < nwarps ? partial[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

/* out[r] = Σ_d x[r, d].
 * One block per row r = blockIdx.x; thread t sums x[r, t], x[r, t + blockDim.x], … and the block adds
 * the per-thread sums with block_sum; thread 0 writes the result. */
__global__ void row_sum_kernel(const float *x, float *out, int D) {
    const float *xr = x + (size_t)blockIdx.x * D;
    float s = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) s += xr[d];
    s = block_sum(s);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

cudaError_t sample_row_sum(const float *x, float *out, int R, int D, int threads, cudaStream_t stream) {
    PEA_LAUNCH(row_sum_kernel, R, threads, 0, stream, x, out, D);
    return cudaGetLastError();
}

/* ---------------------------------------------------------------------------------------------------- */
/* Online softmax                                                                                        */

/* Merge the softmax statistics (m2, s2) into (m, s): m the maximum seen, s = Σ exp(x - m). A side that has
 * seen nothing has m = -inf and s = 0 and contributes nothing. */
__device__ __forceinline__ void online_merge(float &m, float &s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    float a = m == -INFINITY ? 0.0f : s * __expf(m - mn);
    float b = m2 == -INFINITY ? 0.0f : s2 * __expf(m2 - mn);
    m = mn;
    s = a + b;
}

/* y[r, :] = softmax(x[r, :]) in one pass over x for the statistics and one for the output.
 * One block per row r = blockIdx.x (blockDim.x a multiple of 32). Thread t runs the online recurrence over
 * x[r, t], x[r, t + blockDim.x], …: when a larger value arrives the running sum is rescaled. The (max,
 * sum) pairs are merged within each warp by shuffles, then across warps through dynamic shared memory
 * (two floats per warp: 8·warps bytes at launch); every thread then writes exp(x - max) / sum. */
__global__ void softmax_online_kernel(const float *x, float *y, int D) {
    PEA_DYNAMIC_SHARED(float, stats); /* [warps][2]: max, sum */
    const float *xr = x + (size_t)blockIdx.x * D;
    float *yr = y + (size_t)blockIdx.x * D;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    float m = -INFINITY, s = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = xr[d];
        if (v > m) {
            s = (m == -INFINITY ? 0.0f : s * __expf(m - v)) + 1.0f;
            m = v;
        } else {
            s += __expf(v - m);
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        float m2 = __shfl_xor_sync(FULL_MASK, m, offset);
        float s2 = __shfl_xor_sync(FULL_MASK, s, offset);
        online_merge(m, s, m2, s2);
    }
    if (lane == 0) {
        stats[2 * warp] = m;
        stats[2 * warp + 1] = s;
    }
    __syncthreads();
    m = -INFINITY;
    s = 0.0f;
    for (int w = 0; w < nwarps; w++) online_merge(m, s, stats[2 * w], stats[2 * w + 1]);
    float inv = 1.0f / s;
    for (int d = threadIdx.x; d < D; d += blockDim.x) yr[d] = __expf(xr[d] - m) * inv;
}

cudaError_t sample_softmax(const float *x, float *y, int R, int D, int threads, cudaStream_t stream) {
    size_t smem = 2 * (size_t)(threads / 32) * sizeof(float);
    PEA_LAUNCH(softmax_online_kernel, R, threads, smem, stream, x, y, D);
    return cudaGetLastError();
}

/* ---------------------------------------------------------------------------------------------------- */
/* Atomics across blocks                                                                                 */

/* out[d] += Σ_r x[r, d]  (out must be zeroed first).
 * Thread t of block b covers column d = t (t < D; blockDim.x ≥ D) and rows b, b + gridDim.x, …; its partial
 * sum goes to out[d] with atomicAdd, which combines the blocks (they may run at the same time). */
__global__ void column_sum_atomic_kernel(const float *x, float *out, int R, int D) {
    int d = threadIdx.x;
    if (d >= D) return;
    float s = 0.0f;
    for (int r = blockIdx.x; r < R; r += gridDim.x) s += x[(size_t)r * D + d];
    atomicAdd(&out[d], s);
}

cudaError_t sample_column_sum_atomic(const float *x, float *out, int R, int D, int blocks, cudaStream_t stream) {
    int threads = (D + 31) / 32 * 32;
    PEA_LAUNCH(column_sum_atomic_kernel, blocks, threads, 0, stream, x, out, R, D);
    return cudaGetLastError();
}

/* ---------------------------------------------------------------------------------------------------- */
/* Half types                                                                                            */

/* h[i] = f16(x[i]), b[i] = bf16(x[i]) (round to nearest even), and back to f32 in h_back, b_back.
 * One thread per element, a grid-stride loop over i. */
__global__ void convert_kernel(const float *x, __half *h, __nv_bfloat16 *b, float *h_back, float *b_back, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        h[i] = __float2half(x[i]);
        b[i] = __float2bfloat16(x[i]);
        h_back[i] = __half2float(h[i]);
        b_back[i] = __bfloat162float(b[i]);
    }
}

cudaError_t sample_convert(const float *x, __half *h, __nv_bfloat16 *b, float *h_back, float *b_back, int n,
                           cudaStream_t stream) {
    PEA_LAUNCH(convert_kernel, 4, 128, 0, stream, x, h, b, h_back, b_back, n);
    return cudaGetLastError();
}
