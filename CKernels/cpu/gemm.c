/*
 * gemm.c — single-precision GEMM: C = alpha · op(A) · op(B) + beta · C, row-major (see ckernels.h).
 *
 * The fast path is the GotoBLAS/BLIS loop nest, written for this project:
 *
 *   for jc in N step NC:                      columns of C that one packed B panel covers
 *     for pc in K step KC:                    one slice of the inner dimension
 *       pack B[pc:pc+KC, jc:jc+NC]  → Bp      NR-wide column slivers, each KC×NR, contiguous (L3/L2)
 *       for ic in M step MC:
 *         pack A[ic:ic+MC, pc:pc+KC] → Ap     MR-tall row slivers, each MR×KC, contiguous (L2)
 *         for jr in NC step NR:               one B sliver stays in L1 ...
 *           for ir in MC step MR:             ... while the A slivers stream past it
 *             micro-kernel: C[ir:ir+MR, jr:jr+NR] (+)= Ap sliver · Bp sliver
 *
 * The micro-kernel keeps the whole MR×NR tile of C in vector registers for the KC steps: per step it
 * loads one row of NR floats of the B sliver, broadcasts each of the MR floats of the A sliver and does
 * MR·NR/width fused multiply-adds. Packing makes both operands unit-stride whatever the transposes and
 * leading dimensions, and zero-pads the last sliver so that the kernel never checks bounds inside its
 * loop; only the write-out of an edge tile goes through a small temporary. A is packed in whichever of
 * two sliver layouts is a plain copy of its storage (so packing A never transposes, and the kernel comes
 * in two variants); B is packed in one layout, with 4×4 transposes when it is stored transposed.
 *
 * alpha and beta are applied when the tile is written back: the first KC slice writes
 * alpha·AB + beta·C (or alpha·AB alone when beta = 0, without reading C, which may hold NaN), later slices
 * add alpha·AB. Each dimension is cut into equal blocks no larger than KC, MC, NC (never a thin last one).
 *
 * Kernels (picked at run time with __builtin_cpu_supports; each compiled with its own target attribute so
 * this file builds for any x86-64 and, without the SIMD parts, for any other CPU):
 *   avx512    MR=12, NR=32  24 zmm accumulators (2 per row), like BLIS's 32×12 SKX kernel transposed
 *   avx2      MR=6,  NR=16  12 ymm accumulators (2 per row), the classic Haswell/Zen shape
 *   portable  MR=4,  NR=8   plain C loops the compiler vectorises for whatever the target has
 * The SIMD kernels share one body written with the compiler's generic vector type (16 floats); under
 * AVX2 each 16-float vector is a pair of ymm registers, under AVX-512 one zmm. The last sliver of a block
 * is often mostly padding (attention's products have 40 or 80 columns, 64 or 128 rows), so each SIMD kernel
 * also comes in edge variants that compute a third or two thirds of the rows, or (AVX-512) half the
 * columns, of the same packed slivers.
 *
 * Threads: C is cut into a grid of rectangles, one per thread, along M and/or N (whichever leaves the
 * least packing to repeat), and each thread runs the loop nest above on its rectangle with its own packing
 * buffers: one fork-join per GEMM, no barriers. Small products and single rows take a direct loop with no
 * packing. On a Zen 3 core the AVX2 path runs at ~92 GFLOP/s, 94% of the FMA peak (benchmarks/RESULTS.md).
 */
#include "ckernels.h"
#include "half.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------------- */
/* Reference: the plain triple loop, the definition the fast paths are tested against.                   */

void ck_sgemm_reference(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha,
                        const float *A, int64_t lda, const float *B, int64_t ldb,
                        float beta, float *C, int64_t ldc) {
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            float acc = 0;
            for (int64_t k = 0; k < K; k++)
                acc += (transA ? A[k * lda + i] : A[i * lda + k]) * (transB ? B[j * ldb + k] : B[k * ldb + j]);
            C[i * ldc + j] = alpha * acc + (beta == 0 ? 0 : beta * C[i * ldc + j]);
        }
}

/* ---------------------------------------------------------------------------------------------------- */
/* Kernel descriptions                                                                                   */

/* A packed A sliver (MR rows × kc columns of op(A)) comes in one of two layouts, whichever is a plain
 * copy of the source, so that packing A never transposes:
 *   by rows     (A not transposed): row i of the sliver is a[i·KC + p], p = 0 … kc−1, where KC is the
 *                                   kernel's maximum slice (a constant, so the kernel addresses the MR
 *                                   rows with fixed offsets; a shorter slice leaves the rows' tails unused)
 *   by columns  (A transposed):     column p of the sliver is a[p·MR + i], i = 0 … MR−1
 * A packed B sliver is always kc rows of NR floats: b[p·NR + j].
 *
 * A micro-kernel computes the MR×NR product of one A sliver and one B sliver over kc steps and writes it
 * to the mr×nr corner of C (mr ≤ MR, nr ≤ NR): C = alpha·AB + beta·C, where beta = 0 does not read C. */
typedef void (*microkernel_fn)(int64_t kc, const float *a, const float *b, float *c, int64_t ldc,
                               int mr, int nr, float alpha, float beta);

typedef struct {
    const char *name;
    int mr, nr;                  /* register tile */
    int64_t kc, mc, nc;          /* cache blocks: KC steps per slice, MC rows of A per block, NC columns of B */
    /* [A layout: 0 by rows, 1 by columns (= transA)][tile rows mr: ≤ MR/3, ≤ 2·MR/3, more][tile columns
     * nr: ≤ NR/2, more]: the kernel for a tile of C, the full-tile one or an edge variant that computes
     * fewer rows or columns of the same slivers (see tile_kernel). */
    microkernel_fn kernel[2][3][2];
} gemm_kernel_t;

/* Applies alpha/beta to an mr×nr tile computed into `ab` (row stride NR) and stores it into C. The edge
 * tiles of every kernel go through here. */
static void write_edge_tile(const float *ab, int NR, float *c, int64_t ldc, int mr, int nr, float alpha,
                            float beta) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float v = alpha * ab[i * NR + j];
            c[i * ldc + j] = beta == 0 ? v : v + beta * c[i * ldc + j];
        }
}

/* op(A)(i, p) of a packed sliver in either layout. */
#define A_AT(a, by_rows, i, p, MR, KC) ((by_rows) ? (a)[(i) * (KC) + (p)] : (a)[(p) * (MR) + (i)])

/* ---------------------------------------------------------------------------------------------------- */
/* Portable micro-kernel: 4×8 in plain C. The compiler vectorises the j loop and keeps the 32 accumulators
 * in 8 registers of 4 floats, which leaves room in the 16 of SSE2 for B and the broadcast (a 4×16 tile
 * spills there and ran at 17 GFLOP/s against 30 for 4×8 on Zen 3 without FMA); NEON has 32 registers.    */

#define PORTABLE_MR 4
#define PORTABLE_NR 8
#define PORTABLE_KC 256

static inline __attribute__((always_inline)) void
microkernel_portable_body(const int a_by_rows, int64_t kc, const float *restrict a, const float *restrict b,
                          float *restrict c, int64_t ldc, int mr, int nr, float alpha, float beta) {
    float ab[PORTABLE_MR * PORTABLE_NR] = {0};
    for (int64_t p = 0; p < kc; p++) {
        for (int i = 0; i < PORTABLE_MR; i++) {
            float aip = A_AT(a, a_by_rows, i, p, PORTABLE_MR, PORTABLE_KC);
            for (int j = 0; j < PORTABLE_NR; j++) ab[i * PORTABLE_NR + j] += aip * b[p * PORTABLE_NR + j];
        }
    }
    write_edge_tile(ab, PORTABLE_NR, c, ldc, mr, nr, alpha, beta);
}

static void microkernel_portable_rows(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, int mr,
                                      int nr, float alpha, float beta) {
    microkernel_portable_body(1, kc, a, b, c, ldc, mr, nr, alpha, beta);
}

static void microkernel_portable_cols(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, int mr,
                                      int nr, float alpha, float beta) {
    microkernel_portable_body(0, kc, a, b, c, ldc, mr, nr, alpha, beta);
}

/* ---------------------------------------------------------------------------------------------------- */
/* SIMD micro-kernels (x86-64). One body, instantiated per ISA and A layout.                             */

#if defined(__x86_64__)

typedef float v16 __attribute__((vector_size(64)));                  /* 16 floats, 64-byte aligned */
typedef float v16u __attribute__((vector_size(64), aligned(4)));     /* the same, at any float address */

#define SIMD_MAX_MR 12
#define SIMD_MAX_NV 2

/* x in all 16 lanes (one vbroadcastss). */
#define SPLAT16(x) ((v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x})

/* The register-tile body: MR rows × NV vectors of 16 floats of slivers packed MRP tall and NRP wide (an
 * edge variant computes only the first MR ≤ MRP rows and 16·NV ≤ NRP columns of its slivers). MR, NV, MRP,
 * NRP, KC and the A layout are compile-time constants at each (always-inlined) use, so the loops unroll
 * completely and acc[][] lives in registers. Per k step: NV loads of B, MR broadcasts of A, MR·NV FMAs (the
 * compiler fuses acc + a·b under its default -ffp-contract=on; the caller's target attribute provides the
 * FMA instructions). */
static inline __attribute__((always_inline)) void
microkernel_simd_body(const int MR, const int NV, const int MRP, const int NRP, const int KC, const int a_by_rows,
                      int64_t kc, const float *restrict a, const float *restrict b, float *restrict c, int64_t ldc,
                      int mr, int nr, float alpha, float beta) {
    const int NR = 16 * NV;
    v16 acc[SIMD_MAX_MR][SIMD_MAX_NV];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = (v16){0};

    /* Bring the C tile towards L1 while the products are computed. */
    for (int i = 0; i < mr; i++) __builtin_prefetch(c + i * ldc, 1, 3);

    for (int64_t p = 0; p < kc; p++) {
        v16 bv[SIMD_MAX_NV];
        for (int v = 0; v < NV; v++) bv[v] = *(const v16 *)(b + p * NRP + 16 * v);
        for (int i = 0; i < MR; i++) {
            const float aip = A_AT(a, a_by_rows, i, p, MRP, KC);
            const v16 ai = SPLAT16(aip);
            for (int v = 0; v < NV; v++) acc[i][v] += ai * bv[v];
        }
    }

    if (mr == MR && nr == NR) {
        for (int i = 0; i < MR; i++)
            for (int v = 0; v < NV; v++) {
                v16u *cp = (v16u *)(c + i * ldc + 16 * v);
                v16 r = acc[i][v] * alpha;
                if (beta != 0) r += *cp * beta;
                *cp = r;
            }
    } else {
        float ab[SIMD_MAX_MR * 16 * SIMD_MAX_NV] __attribute__((aligned(64)));
        for (int i = 0; i < MR; i++)
            for (int v = 0; v < NV; v++) *(v16 *)(ab + i * NR + 16 * v) = acc[i][v];
        write_edge_tile(ab, NR, c, ldc, mr, nr, alpha, beta);
    }
}

/* One micro-kernel function per (ISA, rows, vectors, A layout): NAME_rows reads A slivers by rows, NAME_cols
 * by columns (see "Kernel descriptions"). */
#define SIMD_MICROKERNELS(NAME, TARGET, MR, NV, MRP, NRP, KC)                                                  \
    __attribute__((target(TARGET))) static void NAME##_rows(int64_t kc, const float *a, const float *b, float *c, \
                                                            int64_t ldc, int mr, int nr, float alpha, float beta) { \
        microkernel_simd_body(MR, NV, MRP, NRP, KC, 1, kc, a, b, c, ldc, mr, nr, alpha, beta);               \
    }                                                                                                          \
    __attribute__((target(TARGET))) static void NAME##_cols(int64_t kc, const float *a, const float *b, float *c, \
                                                            int64_t ldc, int mr, int nr, float alpha, float beta) { \
        microkernel_simd_body(MR, NV, MRP, NRP, KC, 0, kc, a, b, c, ldc, mr, nr, alpha, beta);               \
    }

/* AVX2 + FMA: 6×16, 12 ymm accumulators (each 16-float vector is a pair of ymm registers); edge variants
 * for a last sliver of at most 2 or 4 rows. */
#define AVX2_KC 320
SIMD_MICROKERNELS(microkernel_avx2, "avx2,fma", 6, 1, 6, 16, AVX2_KC)
SIMD_MICROKERNELS(microkernel_avx2_4x16, "avx2,fma", 4, 1, 6, 16, AVX2_KC)
SIMD_MICROKERNELS(microkernel_avx2_2x16, "avx2,fma", 2, 1, 6, 16, AVX2_KC)

/* AVX-512F: 12×32, 24 zmm accumulators; and edge variants on the same 12×32 slivers for a last sliver of
 * at most 4 or 8 rows and/or at most 16 columns, which compute only those (a 12×32 tile spent on the 64×40
 * products of attention's P·V did 64·40 useful multiply-adds of 72·64, 56%; the variants make it 83%). */
#define AVX512_KC 160
SIMD_MICROKERNELS(microkernel_avx512, "avx512f,fma", 12, 2, 12, 32, AVX512_KC)
SIMD_MICROKERNELS(microkernel_avx512_12x16, "avx512f,fma", 12, 1, 12, 32, AVX512_KC)
SIMD_MICROKERNELS(microkernel_avx512_8x32, "avx512f,fma", 8, 2, 12, 32, AVX512_KC)
SIMD_MICROKERNELS(microkernel_avx512_8x16, "avx512f,fma", 8, 1, 12, 32, AVX512_KC)
SIMD_MICROKERNELS(microkernel_avx512_4x32, "avx512f,fma", 4, 2, 12, 32, AVX512_KC)
SIMD_MICROKERNELS(microkernel_avx512_4x16, "avx512f,fma", 4, 1, 12, 32, AVX512_KC)

#endif /* __x86_64__ */

/* Cache blocks. KC·NR·4 bytes (one B sliver) must sit in a 32 KiB L1 next to the streaming A sliver
 * (MR·KC·4 bytes); MC·KC·4 bytes (the packed A block) in L2 (512 KiB–2 MiB on the CPUs this targets);
 * KC·NC·4 bytes (the packed B panel, per thread) in a share of L3.
 *   avx2:   B sliver 320·16·4 = 20 KiB + A sliver 7.5 KiB; A block 144·320·4 = 180 KiB. Measured on Zen 3
 *           (32 KiB L1d, 512 KiB L2): KC 256…384 and MC 72…288 are within a few percent of each other;
 *           KC = 320 was the best on the UNet shapes (benchmarks/gemm_vs_numpy.py), by ~3%.
 *   avx512: B sliver 160·32·4 = 20 KiB + A sliver 7.5 KiB; A block 192·160·4 = 120 KiB. Chosen by the
 *           same rules. On a Zen 4 (which splits each 512-bit FMA in two) it runs level with the avx2 kernel:
 *           190 and 189 GFLOP/s at 2048³ on 2 threads, 192–205 at the UNet's shapes.
 *   portable: the same rules for a 4×8 tile. */
/* A kernel table entry (see gemm_kernel_t.kernel) for the tile classes of one A layout. */
#define EVERY_TILE(f) {{f, f}, {f, f}, {f, f}}
#define TILES(NAME, SUFFIX)                                                                                   \
    {{NAME##_4x16##SUFFIX, NAME##_4x32##SUFFIX}, {NAME##_8x16##SUFFIX, NAME##_8x32##SUFFIX},                  \
     {NAME##_12x16##SUFFIX, NAME##SUFFIX}}

static const gemm_kernel_t kernel_portable = {"portable", PORTABLE_MR, PORTABLE_NR, PORTABLE_KC, 128, 2048,
                                              {EVERY_TILE(microkernel_portable_rows),
                                               EVERY_TILE(microkernel_portable_cols)}};
#if defined(__x86_64__)
static const gemm_kernel_t kernel_avx2 = {"avx2", 6, 16, AVX2_KC, 144, 4096,
                                          {{{microkernel_avx2_2x16_rows, microkernel_avx2_2x16_rows},
                                            {microkernel_avx2_4x16_rows, microkernel_avx2_4x16_rows},
                                            {microkernel_avx2_rows, microkernel_avx2_rows}},
                                           {{microkernel_avx2_2x16_cols, microkernel_avx2_2x16_cols},
                                            {microkernel_avx2_4x16_cols, microkernel_avx2_4x16_cols},
                                            {microkernel_avx2_cols, microkernel_avx2_cols}}}};
static const gemm_kernel_t kernel_avx512 = {"avx512", 12, 32, AVX512_KC, 192, 4096,
                                            {TILES(microkernel_avx512, _rows), TILES(microkernel_avx512, _cols)}};
#endif

/* The kernel for an mr×nr tile of C (mr ≤ MR, nr ≤ NR) with A slivers in `layout`. */
static microkernel_fn tile_kernel(const gemm_kernel_t *kern, int layout, int mr, int nr) {
    int rows = 3 * mr <= kern->mr ? 0 : (3 * mr <= 2 * kern->mr ? 1 : 2);
    return kern->kernel[layout][rows][2 * nr <= kern->nr ? 0 : 1];
}

/* ---------------------------------------------------------------------------------------------------- */
/* Packing                                                                                               */

/* Packs the mc×kc block of op(A) at (row i0, column p0) into MR-tall slivers, in the layout that copies
 * the source without transposing (see "Kernel descriptions"): by rows, with rows KC floats apart, when A is
 * not transposed; by columns otherwise. Rows past mc are zero. Sliver s starts at dst + s·a_sliver_floats
 * (MR·KC or MR·kc). MR is a constant at each use (see pack_a), so the column copies unroll. */
static int64_t a_sliver_floats(int transA, int MR, int64_t KC, int64_t kc) { return MR * (transA ? kc : KC); }

static inline __attribute__((always_inline)) void
pack_a_body(const int MR, int transA, const float *A, int64_t lda, int64_t i0, int64_t p0, int64_t mc,
            int64_t kc, int64_t KC, float *restrict dst) {
    for (int64_t is = 0; is < mc; is += MR) {
        int rows = mc - is < MR ? (int)(mc - is) : MR;
        if (!transA) {
            /* by rows: op(A)(i, p) = A[i·lda + p], so each sliver row is a run of a row of A */
            const float *src = A + (i0 + is) * lda + p0;
            for (int i = 0; i < MR; i++) {
                if (i < rows) memcpy(dst + i * KC, src + i * lda, (size_t)kc * sizeof(float));
                else memset(dst + i * KC, 0, (size_t)kc * sizeof(float));
            }
        } else {
            /* by columns: op(A)(i, p) = A[p·lda + i], so each sliver column is a run of a row of A */
            const float *src = A + p0 * lda + i0 + is;
            if (rows == MR) {
                for (int64_t p = 0; p < kc; p++)
                    for (int i = 0; i < MR; i++) dst[p * MR + i] = src[p * lda + i];
            } else {
                for (int64_t p = 0; p < kc; p++)
                    for (int i = 0; i < MR; i++) dst[p * MR + i] = i < rows ? src[p * lda + i] : 0.0f;
            }
        }
        dst += a_sliver_floats(transA, MR, KC, kc);
    }
}

static void pack_a(int transA, const float *A, int64_t lda, int64_t i0, int64_t p0, int64_t mc, int64_t kc,
                   int MR, int64_t KC, float *restrict dst) {
    switch (MR) {
    case 4: pack_a_body(4, transA, A, lda, i0, p0, mc, kc, KC, dst); break;
    case 6: pack_a_body(6, transA, A, lda, i0, p0, mc, kc, KC, dst); break;
    case 12: pack_a_body(12, transA, A, lda, i0, p0, mc, kc, KC, dst); break;
    default: pack_a_body(MR, transA, A, lda, i0, p0, mc, kc, KC, dst); break;
    }
}

typedef float v4 __attribute__((vector_size(16)));
typedef float v4u __attribute__((vector_size(16), aligned(4)));

/* dst[r·ldd + c] = src[c·lds + r] for r, c < 4: a 4×4 transpose in eight shuffles (SSE, NEON, …). */
static inline void transpose4x4(const float *src, int64_t lds, float *dst, int64_t ldd) {
    v4 r0 = *(const v4u *)(src), r1 = *(const v4u *)(src + lds);
    v4 r2 = *(const v4u *)(src + 2 * lds), r3 = *(const v4u *)(src + 3 * lds);
    v4 t0 = __builtin_shufflevector(r0, r1, 0, 4, 1, 5), t1 = __builtin_shufflevector(r0, r1, 2, 6, 3, 7);
    v4 t2 = __builtin_shufflevector(r2, r3, 0, 4, 1, 5), t3 = __builtin_shufflevector(r2, r3, 2, 6, 3, 7);
    *(v4u *)(dst) = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
    *(v4u *)(dst + ldd) = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
    *(v4u *)(dst + 2 * ldd) = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
    *(v4u *)(dst + 3 * ldd) = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
}

/* Packs the kc×nc block of op(B) at (row p0, column j0) into NR-wide slivers: sliver s holds columns
 * s·NR … s·NR+NR−1 as kc consecutive rows of NR floats. Columns past nc are zero. NR is a constant at
 * each use (see pack_b), so the row copies of whole slivers unroll. */
static inline __attribute__((always_inline)) void
pack_b_body(const int NR, int transB, const float *B, int64_t ldb, int64_t p0, int64_t j0, int64_t kc, int64_t nc,
            float *restrict dst) {
    for (int64_t js = 0; js < nc; js += NR) {
        int cols = nc - js < NR ? (int)(nc - js) : NR;
        if (!transB) {
            /* op(B)(p, j) = B[p·ldb + j]: each row of the sliver is a run of a row of B. */
            const float *src = B + p0 * ldb + j0 + js;
            if (cols == NR) {
                for (int64_t p = 0; p < kc; p++)
                    for (int j = 0; j < NR; j++) dst[p * NR + j] = src[p * ldb + j];
            } else {
                for (int64_t p = 0; p < kc; p++)
                    for (int j = 0; j < NR; j++) dst[p * NR + j] = j < cols ? src[p * ldb + j] : 0.0f;
            }
        } else {
            /* op(B)(p, j) = B[j·ldb + p]: the sliver is a transposed block of B, done in 4×4 tiles where
             * whole tiles fit and element by element elsewhere. */
            const float *src = B + (j0 + js) * ldb + p0;
            int64_t p4 = cols == NR && NR % 4 == 0 ? kc / 4 * 4 : 0;
            for (int64_t p = 0; p < p4; p += 4)
                for (int j = 0; j < NR; j += 4) transpose4x4(src + j * ldb + p, ldb, dst + p * NR + j, NR);
            for (int j = 0; j < cols; j++)
                for (int64_t p = p4; p < kc; p++) dst[p * NR + j] = src[j * ldb + p];
            for (int j = cols; j < NR; j++)
                for (int64_t p = p4; p < kc; p++) dst[p * NR + j] = 0.0f;
        }
        dst += NR * kc;
    }
}

static void pack_b(int transB, const float *B, int64_t ldb, int64_t p0, int64_t j0, int64_t kc, int64_t nc,
                   int NR, float *restrict dst) {
    switch (NR) {
    case 8: pack_b_body(8, transB, B, ldb, p0, j0, kc, nc, dst); break;
    case 16: pack_b_body(16, transB, B, ldb, p0, j0, kc, nc, dst); break;
    case 32: pack_b_body(32, transB, B, ldb, p0, j0, kc, nc, dst); break;
    default: pack_b_body(NR, transB, B, ldb, p0, j0, kc, nc, dst); break;
    }
}

/* Widening packs, for an operand stored in bf16 or f16 (ck_gemm_mixed: half-size weights): the same
 * sliver layouts as pack_a and pack_b, each element widened to f32 as it is copied. Widening is exact, so the
 * micro-kernels see the very floats an f32 copy of the operand would give them. Every weight element is packed
 * at least once per product, so the copies run over contiguous runs that the compiler vectorises: a run of a
 * row of the operand becomes a run of a sliver, except for a transposed B (a linear layer's weight), whose
 * rows are widened NR at a time into a small buffer and transposed from there by pack_b. */

/* dst[i] = src[i] widened, i < n. bf16 is the top half of an f32. f16 without branches: its exponent and
 * mantissa shifted into f32 position and scaled by 2^112 (exact for normals and subnormals alike), with the
 * all-ones exponent (inf, NaN) moved to f32's first. */
static inline __attribute__((always_inline)) void widen_run(float *restrict dst, const uint16_t *restrict src,
                                                             int64_t n, int type) {
    if (type == CK_BF16) {
        for (int64_t i = 0; i < n; i++) dst[i] = ck_f32_from_bits((uint32_t)src[i] << 16);
    } else {
        for (int64_t i = 0; i < n; i++) {
            uint32_t h = src[i], body = (h & 0x7fff) << 13;
            body = body >= 0x0f800000 ? body | 0x70000000 : body;
            dst[i] = ck_f32_from_bits(ck_f32_bits(ck_f32_from_bits(body) * 0x1p112f) | (h & 0x8000) << 16);
        }
    }
}

static void pack_a_widened(int transA, const void *A, int type, int64_t lda, int64_t i0, int64_t p0, int64_t mc,
                           int64_t kc, int MR, int64_t KC, float *restrict dst) {
    const uint16_t *a = A;
    for (int64_t is = 0; is < mc; is += MR) {
        int rows = mc - is < MR ? (int)(mc - is) : MR;
        if (!transA) {   /* by rows: sliver row i is a run of row i0 + is + i of A */
            for (int i = 0; i < MR; i++) {
                if (i < rows) widen_run(dst + i * KC, a + (i0 + is + i) * lda + p0, kc, type);
                else memset(dst + i * KC, 0, (size_t)kc * sizeof(float));
            }
        } else {         /* by columns: sliver column p is a run of row p0 + p of A */
            for (int64_t p = 0; p < kc; p++) {
                widen_run(dst + p * MR, a + (p0 + p) * lda + i0 + is, rows, type);
                for (int i = rows; i < MR; i++) dst[p * MR + i] = 0.0f;
            }
        }
        dst += a_sliver_floats(transA, MR, KC, kc);
    }
}

/* The largest NR·KC of the kernels (avx512: 32 × 160; avx2: 16 × 320; portable: 8 × 256). */
#define WIDEN_BUFFER_FLOATS 5120
_Static_assert(PORTABLE_NR * PORTABLE_KC <= WIDEN_BUFFER_FLOATS, "pack_b_widened's buffer");
#if defined(__x86_64__)
_Static_assert(32 * AVX512_KC <= WIDEN_BUFFER_FLOATS && 16 * AVX2_KC <= WIDEN_BUFFER_FLOATS, "pack_b_widened's buffer");
#endif

static void pack_b_widened(int transB, const void *B, int type, int64_t ldb, int64_t p0, int64_t j0, int64_t kc,
                           int64_t nc, int NR, float *restrict dst) {
    const uint16_t *b = B;
    float rows[WIDEN_BUFFER_FLOATS];
    for (int64_t js = 0; js < nc; js += NR) {
        int cols = nc - js < NR ? (int)(nc - js) : NR;
        if (!transB) {   /* sliver row p is a run of row p0 + p of B */
            for (int64_t p = 0; p < kc; p++) {
                widen_run(dst + p * NR, b + (p0 + p) * ldb + j0 + js, cols, type);
                for (int j = cols; j < NR; j++) dst[p * NR + j] = 0.0f;
            }
        } else {         /* the sliver's columns are rows of B: widen them (kc floats each), then transpose */
            for (int j = 0; j < cols; j++) widen_run(rows + j * kc, b + (j0 + js + j) * ldb + p0, kc, type);
            pack_b(1, rows, kc, 0, 0, kc, cols, NR, dst);
        }
        dst += NR * kc;
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* Packing buffers: one pair per thread, kept for the thread's life (the pool's workers are persistent)
 * and freed when the thread exits.                                                                      */

typedef struct {
    float *a, *b;
    size_t a_floats, b_floats;
} pack_buffers_t;

static pthread_key_t buffers_key;
static pthread_once_t buffers_once = PTHREAD_ONCE_INIT;

static void free_buffers(void *p) {
    pack_buffers_t *buf = p;
    free(buf->a);
    free(buf->b);
    free(buf);
}

static void make_buffers_key(void) { pthread_key_create(&buffers_key, free_buffers); }

/* Grows *ptr to hold at least n floats, 64-byte aligned. Returns 0 on allocation failure. */
static int reserve(float **ptr, size_t *have, size_t n) {
    if (*have >= n) return 1;
    free(*ptr);
    size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
    *ptr = aligned_alloc(64, bytes);
    *have = *ptr ? n : 0;
    return *ptr != NULL;
}

static pack_buffers_t *thread_buffers(size_t a_floats, size_t b_floats) {
    pthread_once(&buffers_once, make_buffers_key);
    pack_buffers_t *buf = pthread_getspecific(buffers_key);
    if (!buf) {
        buf = calloc(1, sizeof *buf);
        if (!buf) return NULL;
        pthread_setspecific(buffers_key, buf);
    }
    if (!reserve(&buf->a, &buf->a_floats, a_floats) || !reserve(&buf->b, &buf->b_floats, b_floats)) return NULL;
    return buf;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Drivers                                                                                               */

/* The arguments of one GEMM call. */
typedef struct {
    int transA, transB;
    int64_t M, N, K;
    float alpha, beta;
    const float *A, *B;
    float *C;
    int64_t lda, ldb, ldc;
    int typeA, typeB;   /* how A and B are stored: CK_F32, or CK_BF16 / CK_F16 (ck_gemm_mixed only; A or B
                         * then points at 16-bit elements, which only the widening packs read) */
} gemm_args_t;

/* Direct path for small products and for a single row (M = 1, a matrix-vector product, where packing B
 * would cost as much as the product): no packing, one thread.
 *   B not transposed: row i of C is built 64 columns at a time in a local accumulator as a sum of rows
 *                     of B scaled by a_ik (unit stride over j: vectorises).
 *   B transposed:     c_ij is the dot product of row i of op(A) and row j of B (unit stride over k),
 *                     kept in 8 partial sums so that it vectorises without reassociating. */
static void sgemm_small(const gemm_args_t *g) {
    for (int64_t i = 0; i < g->M; i++) {
        float *c = g->C + i * g->ldc;
        if (g->transB) {
            for (int64_t j = 0; j < g->N; j++) {
                const float *b = g->B + j * g->ldb;
                float part[8] = {0}, v = 0;
                int64_t k = 0;
                if (!g->transA) {
                    const float *a = g->A + i * g->lda;
                    for (; k + 8 <= g->K; k += 8)
                        for (int l = 0; l < 8; l++) part[l] += a[k + l] * b[k + l];
                }
                for (; k < g->K; k++) v += (g->transA ? g->A[k * g->lda + i] : g->A[i * g->lda + k]) * b[k];
                for (int l = 0; l < 8; l++) v += part[l];
                v *= g->alpha;
                c[j] = g->beta == 0 ? v : v + g->beta * c[j];
            }
            continue;
        }
        for (int64_t j0 = 0; j0 < g->N; j0 += 64) {
            int64_t nj = g->N - j0 < 64 ? g->N - j0 : 64;
            float acc[64] = {0};
            for (int64_t k = 0; k < g->K; k++) {
                float a = g->transA ? g->A[k * g->lda + i] : g->A[i * g->lda + k];
                const float *b = g->B + k * g->ldb + j0;
                for (int64_t j = 0; j < nj; j++) acc[j] += a * b[j];
            }
            for (int64_t j = 0; j < nj; j++) {
                float v = g->alpha * acc[j];
                c[j0 + j] = g->beta == 0 ? v : v + g->beta * c[j0 + j];
            }
        }
    }
}

static int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* The block size for cutting `total` into as few blocks of at most `max` as possible, all about the same
 * size, a multiple of `unit` (max is one). With KC = 320, K = 400 becomes two slices of 200 rather than
 * 320 + 80: no thin last block paying the C write-out, call and packing overheads for little work. */
static int64_t even_block(int64_t total, int64_t max, int64_t unit) {
    int64_t blocks = (total + max - 1) / max;
    return round_up((total + blocks - 1) / blocks, unit);
}

/* The layout of a whole op(B) packed ahead (ck_sgemm_pack_b): K cut into slices of even_block(K, KC) rows,
 * slice after slice; each slice is what pack_b makes of it over all N columns, round_up(N, NR)/NR slivers.
 * So the first `rows` rows take rows·round_up(N, NR) floats: the offset of the slice that starts at row
 * `rows`, and for rows = K the size of the whole. */
static int64_t packed_b_rows_floats(const gemm_kernel_t *kern, int64_t rows, int64_t N) {
    return rows * round_up(N, kern->nr);
}

/* The blocked loop nest of the file comment, on the rectangle rows [m0, m1) × columns [n0, n1) of C,
 * on the calling thread. With `packed_b` (op(B) packed whole by ck_sgemm_pack_b, n0 a multiple of NR) it
 * reads B's slivers from there instead of packing them. Returns CK_ENOMEM if its packing buffers cannot be
 * allocated. */
static int sgemm_blocked(const gemm_kernel_t *kern, const gemm_args_t *g, int64_t m0, int64_t m1, int64_t n0,
                         int64_t n1, const float *packed_b) {
    const int MR = kern->mr, NR = kern->nr;
    int64_t M = m1 - m0, N = n1 - n0, K = g->K;
    int64_t KC = even_block(K, kern->kc, 1);
    int64_t MC = even_block(M, kern->mc, MR);
    int64_t NC = packed_b ? N : even_block(N, kern->nc, NR);
    pack_buffers_t *buf = thread_buffers((size_t)(MC * kern->kc), packed_b ? 1 : (size_t)(KC * NC));
    if (!buf) return CK_ENOMEM;

    for (int64_t jc = 0; jc < N; jc += NC) {
        int64_t nc = N - jc < NC ? N - jc : NC;
        for (int64_t pc = 0; pc < K; pc += KC) {
            int64_t kc = K - pc < KC ? K - pc : KC;
            float beta = pc == 0 ? g->beta : 1.0f;     /* the first slice applies beta, later ones add */
            const float *panel = buf->b;
            if (packed_b) panel = packed_b + packed_b_rows_floats(kern, pc, g->N) + (n0 + jc) * kc;
            else if (g->typeB == CK_F32) pack_b(g->transB, g->B, g->ldb, pc, n0 + jc, kc, nc, NR, buf->b);
            else pack_b_widened(g->transB, g->B, g->typeB, g->ldb, pc, n0 + jc, kc, nc, NR, buf->b);
            for (int64_t ic = 0; ic < M; ic += MC) {
                int64_t mc = M - ic < MC ? M - ic : MC;
                if (g->typeA == CK_F32) pack_a(g->transA, g->A, g->lda, m0 + ic, pc, mc, kc, MR, kern->kc, buf->a);
                else pack_a_widened(g->transA, g->A, g->typeA, g->lda, m0 + ic, pc, mc, kc, MR, kern->kc, buf->a);
                const int64_t a_step = a_sliver_floats(g->transA, MR, kern->kc, kc);
                for (int64_t jr = 0; jr < nc; jr += NR) {
                    int nr = nc - jr < NR ? (int)(nc - jr) : NR;
                    const float *bp = panel + jr * kc;
                    for (int64_t ir = 0; ir < mc; ir += MR) {
                        int mr = mc - ir < MR ? (int)(mc - ir) : MR;
                        float *c = g->C + (m0 + ic + ir) * g->ldc + n0 + jc + jr;
                        tile_kernel(kern, g->transA, mr, nr)(kc, buf->a + ir / MR * a_step, bp, c, g->ldc, mr, nr,
                                                             g->alpha, beta);
                    }
                }
            }
        }
    }
    return CK_OK;
}

/* Fallback when a packing buffer cannot be allocated: correct, slow, and allocation-free. */
static void sgemm_unpacked(const gemm_args_t *g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    ck_sgemm_reference(g->transA, g->transB, m1 - m0, n1 - n0, g->K, g->alpha,
                       g->A + (g->transA ? m0 : m0 * g->lda), g->lda,
                       g->B + (g->transB ? n0 * g->ldb : n0), g->ldb, g->beta, g->C + m0 * g->ldc + n0, g->ldc);
}

/* One thread's share of a threaded GEMM: task t of a tm×tn grid of rectangles of C. */
typedef struct {
    const gemm_kernel_t *kern;
    const gemm_args_t *g;
    int tn;
    int64_t rows, cols;     /* rectangle size (multiples of MR and NR), the last ones clipped */
    atomic_int failed;      /* a rectangle with a 16-bit operand could not get its packing buffers */
} grid_t;

static void grid_task(void *ctx, int64_t begin, int64_t end) {
    grid_t *grid = ctx;
    const gemm_args_t *g = grid->g;
    for (int64_t t = begin; t < end; t++) {
        int64_t m0 = (t / grid->tn) * grid->rows, n0 = (t % grid->tn) * grid->cols;
        int64_t m1 = m0 + grid->rows < g->M ? m0 + grid->rows : g->M;
        int64_t n1 = n0 + grid->cols < g->N ? n0 + grid->cols : g->N;
        if (m0 >= m1 || n0 >= n1) continue;
        if (sgemm_blocked(grid->kern, g, m0, m1, n0, n1, NULL) == CK_OK) continue;
        /* the unpacked fallback reads f32 only */
        if (g->typeA == CK_F32 && g->typeB == CK_F32) sgemm_unpacked(g, m0, m1, n0, n1);
        else atomic_store(&grid->failed, 1);
    }
}

/* op(X) of a 16-bit operand widened into a new, compact f32 matrix (rows × cols as stored, row stride cols),
 * for the direct path, which reads its operands in place. NULL if it cannot be allocated. */
static float *widened_copy(const void *X, int type, int64_t rows, int64_t cols, int64_t ld) {
    float *copy = malloc((size_t)(rows * cols) * sizeof(float));
    if (!copy) return NULL;
    for (int64_t r = 0; r < rows; r++) widen_run(copy + r * cols, (const uint16_t *)X + r * ld, cols, type);
    return copy;
}

/* sgemm_small with 16-bit operands widened first: the same arithmetic on the same f32 values. */
static int sgemm_small_mixed(const gemm_args_t *g) {
    gemm_args_t f = *g;
    float *a = NULL, *b = NULL;
    if (g->typeA != CK_F32) {
        int64_t rows = g->transA ? g->K : g->M, cols = g->transA ? g->M : g->K;
        if (!(a = widened_copy(g->A, g->typeA, rows, cols, g->lda))) return CK_ENOMEM;
        f.A = a, f.lda = cols, f.typeA = CK_F32;
    }
    if (g->typeB != CK_F32) {
        int64_t rows = g->transB ? g->N : g->K, cols = g->transB ? g->K : g->N;
        if (!(b = widened_copy(g->B, g->typeB, rows, cols, g->ldb))) {
            free(a);
            return CK_ENOMEM;
        }
        f.B = b, f.ldb = cols, f.typeB = CK_F32;
    }
    sgemm_small(&f);
    free(a);
    free(b);
    return CK_OK;
}

/* Products below this many multiply-adds take sgemm_small; a thread is given at least PER_THREAD_MACS. */
#define SMALL_MACS (32 * 32 * 32)
#define PER_THREAD_MACS (64 * 64 * 64)

/* One GEMM with at most `threads` threads. Returns CK_ENOMEM only for a 16-bit operand whose buffers
 * cannot be allocated (an f32 product then falls back to the unpacked loop). */
static int sgemm_run(const gemm_kernel_t *kern, const gemm_args_t *g, int threads) {
    if (g->M <= 0 || g->N <= 0) return CK_OK;
    double macs = (double)g->M * (double)g->N * (double)g->K;
    if (g->K <= 0 || macs < SMALL_MACS || g->M == 1) {
        if (g->typeA != CK_F32 || g->typeB != CK_F32) return sgemm_small_mixed(g);
        sgemm_small(g);  /* K = 0 lands here too: C = beta·C */
        return CK_OK;
    }
    int64_t useful = (int64_t)(macs / PER_THREAD_MACS);
    if (threads > useful) threads = useful < 1 ? 1 : (int)useful;

    /* Choose the tm×tn grid (tm·tn = threads) that minimises each thread's work: its multiply-adds
     * rows·cols·K plus the packing it repeats, about K·(rows + cols) loads and stores at a fraction of the
     * FMA rate; the weight 8 is that ratio for the AVX2 kernel (16 MACs per cycle vs ~2 packed floats). */
    int best_tm = 1;
    double best_cost = -1;
    for (int tm = 1; tm <= threads; tm++) {
        if (threads % tm) continue;
        int tn = threads / tm;
        double rows = (double)round_up((g->M + tm - 1) / tm, kern->mr);
        double cols = (double)round_up((g->N + tn - 1) / tn, kern->nr);
        double cost = rows * cols + 8.0 * (rows + cols);
        if (best_cost < 0 || cost < best_cost) best_cost = cost, best_tm = tm;
    }
    int tm = best_tm, tn = threads / best_tm;
    grid_t grid = {kern, g, tn, round_up((g->M + tm - 1) / tm, kern->mr), round_up((g->N + tn - 1) / tn, kern->nr), 0};
    if (threads == 1) grid_task(&grid, 0, 1);
    else ck_parallel_for(tm * tn, 1, grid_task, &grid);
    return atomic_load(&grid.failed) ? CK_ENOMEM : CK_OK;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Kernel selection                                                                                      */

static _Atomic(const gemm_kernel_t *) forced_kernel;   /* set by ck_gemm_set_kernel; NULL = automatic */

static int cpu_supports(const gemm_kernel_t *k) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (k == &kernel_avx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    if (k == &kernel_avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return k == &kernel_portable;
}

static const gemm_kernel_t *const all_kernels[] = {
#if defined(__x86_64__)
    &kernel_avx512, &kernel_avx2,
#endif
    &kernel_portable,
};

static const gemm_kernel_t *active_kernel(void) {
    const gemm_kernel_t *k = atomic_load_explicit(&forced_kernel, memory_order_acquire);
    if (k) return k;
    static _Atomic(const gemm_kernel_t *) automatic;
    k = atomic_load_explicit(&automatic, memory_order_acquire);
    if (k) return k;
    for (size_t i = 0; i < sizeof all_kernels / sizeof all_kernels[0]; i++)
        if (cpu_supports(all_kernels[i])) { k = all_kernels[i]; break; }
    atomic_store_explicit(&automatic, k, memory_order_release);
    return k;
}

const char *ck_gemm_kernel(void) { return active_kernel()->name; }

int ck_gemm_set_kernel(const char *name) {
    if (!name) {
        atomic_store_explicit(&forced_kernel, NULL, memory_order_release);
        return CK_OK;
    }
    for (size_t i = 0; i < sizeof all_kernels / sizeof all_kernels[0]; i++)
        if (strcmp(name, all_kernels[i]->name) == 0) {
            if (!cpu_supports(all_kernels[i])) return CK_EINVAL;
            atomic_store_explicit(&forced_kernel, all_kernels[i], memory_order_release);
            return CK_OK;
        }
    return CK_EINVAL;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Public entry points                                                                                   */

void ck_sgemm(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
              const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    gemm_args_t g = {transA, transB, M, N, K, alpha, beta, A, B, C, lda, ldb, ldc, CK_F32, CK_F32};
    sgemm_run(active_kernel(), &g, ck_get_num_threads());
}

int ck_gemm_mixed(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha, const void *A, int typeA,
                  int64_t lda, const void *B, int typeB, int64_t ldb, float beta, float *C, int64_t ldc) {
    for (int i = 0; i < 2; i++) {
        int type = i ? typeB : typeA;
        if (type != CK_F32 && type != CK_BF16 && type != CK_F16) return CK_EINVAL;
    }
    gemm_args_t g = {transA, transB, M, N, K, alpha, beta, A, B, C, lda, ldb, ldc, typeA, typeB};
    return sgemm_run(active_kernel(), &g, ck_get_num_threads());
}

/* B packed ahead, for products that share it (attention's keys and values, read by every block of queries). */

size_t ck_sgemm_packed_b_floats(int64_t K, int64_t N) {
    const gemm_kernel_t *kern = active_kernel();
    if (K <= 0 || N <= 0) return 16;
    /* a multiple of 16, so that a packing placed after another stays 64-byte aligned */
    return (size_t)round_up(packed_b_rows_floats(kern, K, N), 16);
}

void ck_sgemm_pack_b(int transB, int64_t K, int64_t N, const float *B, int64_t ldb, float *packed) {
    const gemm_kernel_t *kern = active_kernel();
    if (K <= 0 || N <= 0) return;
    int64_t KC = even_block(K, kern->kc, 1);
    for (int64_t pc = 0; pc < K; pc += KC) {
        const int64_t kc = K - pc < KC ? K - pc : KC;
        pack_b(transB, B, ldb, pc, 0, kc, N, kern->nr, packed + packed_b_rows_floats(kern, pc, N));
    }
}

void ck_sgemm_packed(int transA, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                     const float *packed_b, float beta, float *C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    gemm_args_t g = {transA, 0, M, N, K, alpha, beta, A, NULL, C, lda, 0, ldc, CK_F32, CK_F32};
    if (K <= 0) {   /* C = beta·C, through the direct path (which reads no B when K = 0) */
        sgemm_small(&g);
        return;
    }
    if (sgemm_blocked(active_kernel(), &g, 0, M, 0, N, packed_b) != CK_OK) abort();   /* MC·KC floats: fatal */
}

/* Batched: many small products are spread over the threads one whole product each; otherwise the
 * products run one after another, each using every thread. */
typedef struct {
    const gemm_kernel_t *kern;
    gemm_args_t g;
    int64_t strideA, strideB, strideC;
} batch_t;

static void batch_task(void *ctx, int64_t begin, int64_t end) {
    const batch_t *bt = ctx;
    for (int64_t b = begin; b < end; b++) {
        gemm_args_t g = bt->g;
        g.A += b * bt->strideA;
        g.B += b * bt->strideB;
        g.C += b * bt->strideC;
        sgemm_run(bt->kern, &g, 1);
    }
}

/* A product of at most this many multiply-adds is "small" for batching: one thread per product. */
#define BATCH_SMALL_MACS (256 * 256 * 256)

void ck_sgemm_batched(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha,
                      const float *A, int64_t lda, int64_t strideA, const float *B, int64_t ldb, int64_t strideB,
                      float beta, float *C, int64_t ldc, int64_t strideC, int64_t batch) {
    if (batch <= 0) return;
    batch_t bt = {active_kernel(), {transA, transB, M, N, K, alpha, beta, A, B, C, lda, ldb, ldc, CK_F32, CK_F32},
                  strideA, strideB, strideC};
    int threads = ck_get_num_threads();
    /* Items may run concurrently only if their C blocks are disjoint (a stride of 0, say, accumulates
     * every item into one C, in order). */
    int64_t extentC = (M - 1) * ldc + N;
    int disjoint = strideC >= extentC || strideC <= -extentC;
    if (threads > 1 && batch >= threads && disjoint && (double)M * N * K <= BATCH_SMALL_MACS) {
        ck_parallel_for(batch, 1, batch_task, &bt);
    } else {
        for (int64_t b = 0; b < batch; b++) {
            gemm_args_t g = bt.g;
            g.A += b * strideA;
            g.B += b * strideB;
            g.C += b * strideC;
            sgemm_run(bt.kern, &g, threads);
        }
    }
}
