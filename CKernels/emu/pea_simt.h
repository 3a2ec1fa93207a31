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
 *
 *   pea_mma_m16n8k16_f16(float c[4], const unsigned a[4], const unsigned b[2])
 *   pea_mma_m16n8k16_bf16(float c[4], const unsigned a[4], const unsigned b[2])
 *       c += a·b for one warp on the tensor cores: PTX mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32
 *       (T = f16 / bf16; sm_80 and later). A is 16×16, B 16×8, C/D 16×8 f32. Every lane of the warp calls it
 *       (converged, none exited) with its fragments, each .b32 register holding two T values, the lower
 *       index in the low 16 bits. With g = lane >> 2 and t = lane % 4 (the PTX ISA's groupID and
 *       threadID_in_group):
 *         a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]    a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
 *         b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
 *         c[0], c[1] = C[g][2t, 2t+1]                          c[2], c[3] = C[g+8][2t, 2t+1]
 *       The emulator gathers the 32 lanes' fragments at a warp rendezvous (like a shuffle) and computes the
 *       product exactly, accumulating in double (cuda_emu.h).
 *
 *   pea_ldmatrix_x4(unsigned r[4], S smem, int at)         PTX ldmatrix.sync.aligned.m8n8.x4.shared.b16
 *   pea_ldmatrix_x4_trans(unsigned r[4], S smem, int at)   the same with .trans
 *       Four 8×8 matrices of 16-bit values from shared memory, one warp (all 32 lanes, converged). smem is a
 *       pointer to dynamic shared memory of 16-bit elements (PEA_DYNAMIC_SHARED(unsigned short, …)), and
 *       smem[at] the start of this lane's row: lane l names row l % 8 of matrix l / 8 (8 elements, 16-byte
 *       aligned). Lane l (g = l / 4, t = l % 4) gets in r[i] row g, elements 2t and 2t+1 of matrix i (the low
 *       16 bits the lower index) — an mma A/B fragment register — or with _trans rows 2t and 2t+1 of column g
 *       (a row-major [k][n] tile read as the B operand). sm_75 and later.
 *
 *   pea_cp_async16(S smem, int at, const void *src, int src_bytes)
 *   pea_cp_async_commit()      pea_cp_async_wait<N>()
 *       PTX cp.async.cg.shared.global (sm_80 and later): copy 16 bytes from global src to &smem[at] without
 *       passing through registers, reading src_bytes (0 or 16) and zero-filling the rest; both addresses
 *       16-byte aligned. commit closes the thread's group of copies; wait<N> blocks the thread until at most
 *       its N most recent committed groups are still in flight. Other threads see the bytes only after their
 *       writer's wait and a barrier. The emulator performs a copy only when a wait covers it, so a read that
 *       comes too early reads the old bytes.
 *
 *   pea_ex2(float x)
 *       2^x as PTX ex2.approx.ftz.f32 (one MUFU op; within 2 ulp, subnormal results 0). The emulator rounds
 *       exactly and flushes subnormals.
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

static __device__ __forceinline__ void pea_mma_m16n8k16_f16(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
static __device__ __forceinline__ void pea_mma_m16n8k16_bf16(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename S>
static __device__ __forceinline__ void pea_ldmatrix_x4(unsigned r[4], S smem, int at) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(&smem[at]);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
template <typename S>
static __device__ __forceinline__ void pea_ldmatrix_x4_trans(unsigned r[4], S smem, int at) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(&smem[at]);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
template <typename S>
static __device__ __forceinline__ void pea_cp_async16(S smem, int at, const void *src, int src_bytes) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(&smem[at]);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(src), "r"(src_bytes) : "memory");
}
static __device__ __forceinline__ void pea_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
static __device__ __forceinline__ void pea_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
static __device__ __forceinline__ float pea_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

#else /* the emulated build: the host C++ compiler with -ICKernels/emu/include */

#include "cuda_emu.h"

#endif

#endif /* PEA_SIMT_H */
