/*
 * pea_simt.h — the few macros that let one .cu source build with nvcc (for the GPU) and with the host C++
 * compiler against the SIMT emulator in CKernels/emu (for the CPU). Every kernel source includes it:
 *
 *     #include "../emu/pea_simt.h"        (from a .cu file in CKernels/cuda; the path is relative to that file)
 *
 * Under nvcc (__CUDACC__) the macros are plain CUDA; otherwise the emulator provides them.
 *
 *   PEA_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)
 *       kernel<<<grid, block, smem_bytes, stream>>>(args...). A template kernel with several template
 *       arguments must be named first (`auto k = gemm<64, 4>; PEA_LAUNCH(k, ...)`) or parenthesised
 *       (`PEA_LAUNCH((gemm<64, 4>), ...)`): the macro would split at the comma.
 *
 *   PEA_SHARED_ARRAY(T, name, n)              __shared__ T name[n]        (16-byte aligned)
 *   PEA_SHARED_ARRAY_2D(T, name, rows, cols)  __shared__ T name[rows][cols]
 *   PEA_SHARED_VAR(T, name)                   __shared__ T name
 *       Static shared memory, one copy per block. In the emulator each is poisoned (all bytes 0xFF, a NaN
 *       for f32/f16/bf16) when the block starts, and indexing is bounds-checked (PEA_EMU_CHECK, on by
 *       default). Plain `__shared__` declarations compile too, but get neither check.
 *
 *   PEA_DYNAMIC_SHARED(T, name)
 *       extern __shared__ T name[]: the dynamic shared memory of the launch, seen as T. Several
 *       declarations (of different types) alias the same bytes, as in CUDA. In the emulator `name` is a
 *       checked pointer; keep it checked with `auto p = name + offset;` (a `T*` copy is unchecked).
 */
#ifndef PEA_SIMT_H
#define PEA_SIMT_H

#if defined(__CUDACC__)

#define PEA_LAUNCH(kernel, grid, block, smem, stream, ...) \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)

#define PEA_SHARED_ARRAY(T, name, n) __shared__ __align__(16) T name[n]
#define PEA_SHARED_ARRAY_2D(T, name, rows, cols) __shared__ __align__(16) T name[rows][cols]
#define PEA_SHARED_VAR(T, name) __shared__ T name
#define PEA_DYNAMIC_SHARED(T, name)                                      \
    extern __shared__ __align__(16) unsigned char pea_dsmem_##name[];    \
    T *name = reinterpret_cast<T *>(pea_dsmem_##name)

#else /* the emulated build: the host C++ compiler with -ICKernels/emu/include */

#include "cuda_emu.h"

#endif

#endif /* PEA_SIMT_H */
