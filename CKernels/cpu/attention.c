/*
 * attention.c — multi-head scaled-dot-product attention with an online softmax ("flash" order).
 *
 *   out[b,h,i,:] = Σ_j p_ij · v[b,h,j,:],   p_ij = softmax_j(scale · q_i·k_j + mask_ij), −∞ where causal j > i
 *
 * Work unit: a run of query tiles of QT rows of one (b, h). The unit first packs its head's keys and values
 * for the GEMM, key tile by key tile (ck_sgemm_pack_b: Kᵀ and V in the micro-kernel's layout, in a scratch
 * kept by the thread), since every query tile reads all of them. Then, per query tile and for each key tile
 * of KT keys, it computes the QT×KT score tile with a GEMM, folds it into a running row maximum m, row sum l
 * and output accumulator acc (rescaling both by exp(m_old − m_new)), and moves on; out = acc / l at the end.
 * Memory per unit is O(QT·(KT + Dv)) plus the packed head, never O(Tq·Tk). The GEMMs run single-threaded
 * inside the unit while the pool spreads units over cores; a head's query tiles are split into as many runs
 * as it takes to give every thread two units.
 *
 * The backward (ck_attention_backward_f32, below) recomputes the scores blockwise as well.
 */
#include "ckernels.h"
#include "fastmath.h"

#include <math.h>
#include <stdlib.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* 128 query rows per tile: packing a head's keys once and 128-row tiles took the forward at SD1.5's 4096
 * tokens (8 heads of 40) from 515 to about 330 ms on 2 threads of a Zen 4 (64 rows, keys packed per tile). */
enum { QT = 128, KT = 256 };

/* s[c] = exp(s[c] − shift) for c < n; returns Σ s[c] (eight partial sums, so the loop vectorises). exp_poly
 * (fastmath.h): the exp of the scores was the largest cost of attention with libm's scalar expf. */
#define EXP_SHIFT_SUM_BODY                                                          \
    float partial[8] = {0};                                                         \
    int64_t c = 0;                                                                  \
    for (; c + 8 <= n; c += 8)                                                      \
        for (int lane = 0; lane < 8; lane++) {                                      \
            s[c + lane] = exp_poly(s[c + lane] - shift);                            \
            partial[lane] += s[c + lane];                                           \
        }                                                                           \
    float sum = 0.0f;                                                               \
    for (; c < n; c++) { s[c] = exp_poly(s[c] - shift); sum += s[c]; }              \
    for (int lane = 0; lane < 8; lane++) sum += partial[lane];                      \
    return sum;

#if defined(__x86_64__)
/* The same values and the same sum, eight lanes at a time written out with vector types: left to the
 * auto-vectoriser, the lane loop came out as shuffles and blends at ~1 ns per exp (7% of a training step).
 * Clamping with max/min and flooring with one vroundps (instead of blends and a truncate-and-fix) took it
 * from 0.65 to 0.53 ns per element, the same bits (checked on 2^20 values with ±∞, NaN and the clamps). */
typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));

__attribute__((target("avx2,fma"))) static inline v8f softmax_exp8(v8f x) {
    const v8f lo = (v8f){0} - 87.3f, hi = (v8f){0} + 88.3f;
    const v8i below = x < lo;                      /* −1 where exp underflows to 0 (and −∞) */
    /* max(lo, x), then min(hi, ·): the instructions return their second operand when one is NaN, so a NaN x
     * stays NaN, as in exp_poly's selects */
    const v8f clamped = (v8f)_mm256_min_ps((__m256)hi, _mm256_max_ps((__m256)lo, (__m256)x));
    const v8f t = clamped * 1.44269504088896341f + 0.5f;
    const v8f n = (v8f)_mm256_floor_ps((__m256)t);
    const v8f y = EXP_POLY_REDUCED(v8f, clamped, n);
    const v8i scale = (__builtin_convertvector(n, v8i) + 127) << 23;
    return (v8f)(~below & (v8i)(y * (v8f)scale));
}

__attribute__((target("avx2,fma"))) static float exp_shift_sum_avx2(float *s, int64_t n, float shift) {
    v8f partial = {0};
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const v8f e = softmax_exp8(*(v8fu *)(s + c) - shift);
        *(v8fu *)(s + c) = e;
        partial += e;
    }
    float sum = 0.0f;
    for (; c < n; c++) { s[c] = exp_poly(s[c] - shift); sum += s[c]; }
    for (int lane = 0; lane < 8; lane++) sum += partial[lane];
    return sum;
}
#endif
static float exp_shift_sum_portable(float *s, int64_t n, float shift) { EXP_SHIFT_SUM_BODY }

static float exp_shift_sum(float *s, int64_t n, float shift) {
#if defined(__x86_64__)
    if (ck_cpu_has_avx2_fma()) return exp_shift_sum_avx2(s, n, shift);
#endif
    return exp_shift_sum_portable(s, n, shift);
}

/* max of s[0..n), −∞ when n = 0 (eight partial maxima, so the loop vectorises). */
static float row_maximum(const float *s, int64_t n) {
    float partial[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t c = 0;
    for (; c + 8 <= n; c += 8)
        for (int lane = 0; lane < 8; lane++) partial[lane] = s[c + lane] > partial[lane] ? s[c + lane] : partial[lane];
    float best = -INFINITY;
    for (; c < n; c++) best = s[c] > best ? s[c] : best;
    for (int lane = 0; lane < 8; lane++) best = partial[lane] > best ? partial[lane] : best;
    return best;
}

/* Scratch of at least `floats` floats (at least one), 64-byte aligned (ck_sgemm_pack_b's alignment), for one
 * pool task: the forward's packed keys and values, the backward's score blocks and packed keys and values;
 * NULL when it cannot be allocated. Up to SCRATCH_KEEP_FLOATS it is a buffer the thread keeps across calls
 * (pool threads live as long as the process, so it is allocated about once per thread); a larger request gets
 * a buffer of its own, which scratch_release frees, so that a one-off such as the VAE's single 512-wide head
 * over 4096 positions (17 MB packed) does not stay resident in every thread. */
enum { SCRATCH_KEEP_FLOATS = 4 << 20 };   /* 16 MB: the UNet's attention, forward and backward, fits */
static _Thread_local float *kept_scratch;
static _Thread_local size_t kept_floats;

static float *scratch_acquire(size_t floats) {
    if (floats < 1) floats = 1;
    const size_t bytes = (floats * sizeof(float) + 63) & ~(size_t)63;
    if (floats > SCRATCH_KEEP_FLOATS) return aligned_alloc(64, bytes);
    if (kept_floats < floats) {
        free(kept_scratch);
        kept_scratch = aligned_alloc(64, bytes);
        kept_floats = kept_scratch ? floats : 0;
    }
    return kept_scratch;
}

static void scratch_release(float *buffer) {
    if (buffer != kept_scratch) free(buffer);
}

typedef struct {
    const ck_attention_params *p;
    int64_t q_tiles, runs;        /* query tiles per (b, h), split into `runs` runs of about q_tiles / runs */
    int64_t key_tiles, kt_floats, v_floats;   /* packed sizes of one full key tile's Kᵀ and V */
} attention_ctx;

static void attention_units(void *arg, int64_t begin, int64_t end) {
    const attention_ctx *ctx = arg;
    const ck_attention_params *p = ctx->p;
    float *scores = malloc(sizeof(float) * QT * KT);
    float *acc = malloc(sizeof(float) * QT * (size_t)p->Dv);
    float *row_max = malloc(sizeof(float) * QT);
    float *row_sum = malloc(sizeof(float) * QT);
    float *packed = scratch_acquire((size_t)(ctx->key_tiles * (ctx->kt_floats + ctx->v_floats)));
    if (!scores || !acc || !row_max || !row_sum || !packed) abort();   /* MBs to tens of MB: treat as fatal */

    for (int64_t u = begin; u < end; u++) {
        const int64_t bh = u / ctx->runs, run = u % ctx->runs;
        const int64_t b = bh / p->H, h = bh % p->H;
        const float *k = p->k + b * p->k_sb + h * p->k_sh;
        const float *v = p->v + b * p->v_sb + h * p->v_sh;

        /* key tile t: Kᵀ (D × cols) at packed_k(t), V (cols × Dv) at packed_v(t) */
        float *packed_k = packed, *packed_v = packed + ctx->key_tiles * ctx->kt_floats;
        for (int64_t t = 0; t < ctx->key_tiles; t++) {
            const int64_t j0 = t * KT, cols = p->Tk - j0 < KT ? p->Tk - j0 : KT;
            ck_sgemm_pack_b(1, p->D, cols, k + j0 * p->k_st, p->k_st, packed_k + t * ctx->kt_floats);
            ck_sgemm_pack_b(0, cols, p->Dv, v + j0 * p->v_st, p->v_st, packed_v + t * ctx->v_floats);
        }

        const int64_t first = run * ctx->q_tiles / ctx->runs, last = (run + 1) * ctx->q_tiles / ctx->runs;
        for (int64_t tile = first; tile < last; tile++) {
            const int64_t i0 = tile * QT;
            const int64_t rows = p->Tq - i0 < QT ? p->Tq - i0 : QT;
            const float *q = p->q + b * p->q_sb + h * p->q_sh + i0 * p->q_st;
            const float *mask = p->mask ? p->mask + b * p->m_sb + h * p->m_sh + i0 * p->m_st : NULL;

            for (int64_t r = 0; r < rows; r++) { row_max[r] = -INFINITY; row_sum[r] = 0.0f; }
            for (int64_t x = 0; x < rows * p->Dv; x++) acc[x] = 0.0f;

            /* with a causal mask, keys past the tile's last query row contribute nothing */
            const int64_t key_end = p->causal ? (i0 + rows < p->Tk ? i0 + rows : p->Tk) : p->Tk;
            for (int64_t j0 = 0; j0 < key_end; j0 += KT) {
                const int64_t t = j0 / KT, tile_keys = p->Tk - j0 < KT ? p->Tk - j0 : KT;
                const int64_t cols = key_end - j0 < KT ? key_end - j0 : KT;
                /* scores (rows × tile_keys) = scale · q_tile · k_tileᵀ; only the first `cols` are used */
                ck_sgemm_packed(0, rows, tile_keys, p->D, p->scale, q, p->q_st, packed_k + t * ctx->kt_floats,
                                0.0f, scores, tile_keys);
                for (int64_t r = 0; r < rows; r++) {
                    float *s = scores + r * tile_keys;
                    if (mask) {
                        const float *m = mask + r * p->m_st + j0;
                        for (int64_t c = 0; c < cols; c++) s[c] += m[c];
                    }
                    if (p->causal) {
                        for (int64_t c = (i0 + r + 1) - j0 < 0 ? 0 : (i0 + r + 1) - j0; c < cols; c++) s[c] = -INFINITY;
                    }
                    const float tile_max = row_maximum(s, cols);
                    const float new_max = tile_max > row_max[r] ? tile_max : row_max[r];
                    if (new_max == -INFINITY) {            /* everything so far masked: nothing to add */
                        for (int64_t c = 0; c < cols; c++) s[c] = 0.0f;
                        continue;
                    }
                    const float correction = expf(row_max[r] - new_max);   /* exp(−∞) = 0 on the first tile */
                    const float sum = exp_shift_sum(s, cols, new_max);
                    row_sum[r] = row_sum[r] * correction + sum;
                    row_max[r] = new_max;
                    float *a = acc + r * p->Dv;
                    if (correction != 1.0f)
                        for (int64_t d = 0; d < p->Dv; d++) a[d] *= correction;
                }
                /* acc (rows × Dv) += p_tile (rows × cols) · v_tile (cols × Dv); a causal tile cut short at
                 * key_end reads V unpacked, so that the keys past it are not even multiplied by zero */
                if (cols == tile_keys)
                    ck_sgemm_packed(0, rows, p->Dv, cols, 1.0f, scores, tile_keys, packed_v + t * ctx->v_floats,
                                    1.0f, acc, p->Dv);
                else
                    ck_sgemm(0, 0, rows, p->Dv, cols, 1.0f, scores, tile_keys, v + j0 * p->v_st, p->v_st, 1.0f, acc,
                             p->Dv);
            }

            float *out = p->out + b * p->o_sb + h * p->o_sh + i0 * p->o_st;
            for (int64_t r = 0; r < rows; r++) {
                const float inv = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;   /* fully masked row → zeros */
                for (int64_t d = 0; d < p->Dv; d++) out[r * p->o_st + d] = acc[r * p->Dv + d] * inv;
            }
        }
    }
    free(scores);
    free(acc);
    free(row_max);
    free(row_sum);
    scratch_release(packed);
}

void ck_attention_f32(const ck_attention_params *p) {
    const int64_t heads = p->B * p->H, q_tiles = (p->Tq + QT - 1) / QT;
    if (heads <= 0 || q_tiles <= 0) return;
    const int64_t key_tiles = (p->Tk + KT - 1) / KT;
    const int64_t full = p->Tk < KT ? p->Tk : KT;   /* the longest key tile */
    int64_t runs = (2 * ck_get_num_threads() + heads - 1) / heads;
    runs = runs < 1 ? 1 : (runs > q_tiles ? q_tiles : runs);
    attention_ctx ctx = {p, q_tiles, runs, key_tiles, (int64_t)ck_sgemm_packed_b_floats(p->D, full),
                         (int64_t)ck_sgemm_packed_b_floats(full, p->Dv)};
    ck_parallel_for(heads * runs, 1, attention_units, &ctx);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Backward (no mask, not causal). With S = scale·Q·Kᵀ, P = softmax(S) row-wise and O = P·V per head:
 *
 *   dV = Pᵀ·dO,   dP = dO·Vᵀ,   dS = P ∘ (dP − rowsum(dP ∘ P)),   dQ = scale·dS·K,   dK = scale·dSᵀ·Q
 *
 * Work unit: one (b, h), which owns its dK and dV rows, so no two threads write the same output and a
 * unit's arithmetic is the same on any thread (results do not depend on the thread count). The unit walks
 * its queries in blocks of at most BWD_QB rows; a block's S/P and dP/dS are full rows (rows × Tk) in this
 * thread's scratch, at most BWD_SCORE_FLOATS each unless a single row is longer: P's max and sum come from
 * the whole row, no statistics are carried between blocks. Per block: S (GEMM), P in place, dV += Pᵀ·dO_blk,
 * dP, dS in place, dQ_blk = scale·dS·K, dK += scale·dSᵀ·Q_blk — five GEMMs, single-threaded inside the
 * unit. The three whose B is the head's K or V (S reads Kᵀ, dP Vᵀ, dQ K) read it packed once per unit
 * (ck_sgemm_pack_b) instead of repacking it for every block: that repacking was a tenth of the backward.
 * Fewer units than threads (B·H = 1) leave threads idle. */

/* 128 query rows make the dK, dV accumulations (GEMMs whose inner dimension is the block's rows) long
 * enough to amortise reading and writing Tk×D outputs each block: at SD1.5's 4096 tokens 64 rows took about
 * 1.1× and 16 rows 2.5× the time of 128 (2 threads, a shared machine). The two row
 * buffers (2 MB each at 4096 keys) then live in L2/L3, not DRAM. */
enum { BWD_QB = 128, BWD_SCORE_FLOATS = 512 * 1024 };

/* Query rows per block for Tk keys: BWD_QB, fewer when a full-row block would not fit BWD_SCORE_FLOATS. */
static int64_t backward_block_rows(int64_t Tk) {
    int64_t rows = Tk > 0 ? BWD_SCORE_FLOATS / Tk : BWD_QB;
    return rows < 1 ? 1 : (rows > BWD_QB ? BWD_QB : rows);
}

/* p[c] = exp(s[c] − max s) / Σ exp(s − max s) in place: one softmax row. */
static void softmax_row(float *s, int64_t n) {
    const float sum = exp_shift_sum(s, n, row_maximum(s, n));
    const float inv = 1.0f / sum;   /* sum ≥ 1: the maximum contributes exp(0) */
    for (int64_t c = 0; c < n; c++) s[c] *= inv;
}

/* d[c] = p[c] · (d[c] − Σ d∘p) in place: a row of dP becomes the row of dS (eight partial sums, so the
 * dot vectorises). */
static void softmax_backward_row(float *d, const float *p, int64_t n) {
    float partial[8] = {0};
    int64_t c = 0;
    for (; c + 8 <= n; c += 8)
        for (int lane = 0; lane < 8; lane++) partial[lane] += d[c + lane] * p[c + lane];
    float dot = 0.0f;
    for (; c < n; c++) dot += d[c] * p[c];
    for (int lane = 0; lane < 8; lane++) dot += partial[lane];
    for (c = 0; c < n; c++) d[c] = p[c] * (d[c] - dot);
}

typedef struct {
    const ck_attention_params *p;
    const float *d_out;
    float *dq, *dk, *dv;
    int64_t block_rows;
    int64_t kt_floats, k_floats, vt_floats;   /* packed sizes of Kᵀ (D × Tk), K (Tk × D), Vᵀ (Dv × Tk) */
    int failed;   /* set (atomically) when a thread's scratch cannot be allocated */
} attention_backward_ctx;

static void attention_backward_units(void *arg, int64_t begin, int64_t end) {
    attention_backward_ctx *ctx = arg;
    const ck_attention_params *p = ctx->p;
    const int64_t Tq = p->Tq, Tk = p->Tk, D = p->D, Dv = p->Dv, QB = ctx->block_rows;
    const size_t block_floats = ((size_t)QB * (size_t)Tk + 15) & ~(size_t)15;   /* keeps the packs aligned */
    float *probs = scratch_acquire(2 * block_floats + (size_t)(ctx->kt_floats + ctx->k_floats + ctx->vt_floats));
    if (!probs) { __atomic_store_n(&ctx->failed, 1, __ATOMIC_RELAXED); return; }
    float *dscores = probs + block_floats;
    float *packed_kt = dscores + block_floats, *packed_k = packed_kt + ctx->kt_floats;
    float *packed_vt = packed_k + ctx->k_floats;

    for (int64_t u = begin; u < end; u++) {
        const int64_t b = u / p->H, h = u % p->H;
        const float *q = p->q + b * p->q_sb + h * p->q_sh, *k = p->k + b * p->k_sb + h * p->k_sh;
        const float *v = p->v + b * p->v_sb + h * p->v_sh, *dout = ctx->d_out + b * p->o_sb + h * p->o_sh;
        float *dq = ctx->dq + b * p->q_sb + h * p->q_sh, *dk = ctx->dk + b * p->k_sb + h * p->k_sh;
        float *dv = ctx->dv + b * p->v_sb + h * p->v_sh;

        for (int64_t j = 0; j < Tk; j++) {   /* dK, dV accumulate over the query blocks */
            for (int64_t d = 0; d < D; d++) dk[j * p->k_st + d] = 0.0f;
            for (int64_t d = 0; d < Dv; d++) dv[j * p->v_st + d] = 0.0f;
        }
        if (Tk == 0) {                       /* no keys: the output is constant, dQ = 0 */
            for (int64_t i = 0; i < Tq; i++)
                for (int64_t d = 0; d < D; d++) dq[i * p->q_st + d] = 0.0f;
            continue;
        }
        ck_sgemm_pack_b(1, D, Tk, k, p->k_st, packed_kt);
        ck_sgemm_pack_b(0, Tk, D, k, p->k_st, packed_k);
        ck_sgemm_pack_b(1, Dv, Tk, v, p->v_st, packed_vt);
        for (int64_t i0 = 0; i0 < Tq; i0 += QB) {
            const int64_t rows = Tq - i0 < QB ? Tq - i0 : QB;
            const float *q_blk = q + i0 * p->q_st, *dout_blk = dout + i0 * p->o_st;
            /* P (rows × Tk) = softmax(scale · Q_blk · Kᵀ) */
            ck_sgemm_packed(0, rows, Tk, D, p->scale, q_blk, p->q_st, packed_kt, 0.0f, probs, Tk);
            for (int64_t r = 0; r < rows; r++) softmax_row(probs + r * Tk, Tk);
            /* dV (Tk × Dv) += Pᵀ · dO_blk */
            ck_sgemm(1, 0, Tk, Dv, rows, 1.0f, probs, Tk, dout_blk, p->o_st, 1.0f, dv, p->v_st);
            /* dS (rows × Tk) = P ∘ (dP − rowsum(dP ∘ P)), dP = dO_blk · Vᵀ */
            ck_sgemm_packed(0, rows, Tk, Dv, 1.0f, dout_blk, p->o_st, packed_vt, 0.0f, dscores, Tk);
            for (int64_t r = 0; r < rows; r++) softmax_backward_row(dscores + r * Tk, probs + r * Tk, Tk);
            /* dQ_blk (rows × D) = scale · dS · K;  dK (Tk × D) += scale · dSᵀ · Q_blk */
            ck_sgemm_packed(0, rows, D, Tk, p->scale, dscores, Tk, packed_k, 0.0f, dq + i0 * p->q_st, p->q_st);
            ck_sgemm(1, 0, Tk, D, rows, p->scale, dscores, Tk, q_blk, p->q_st, 1.0f, dk, p->k_st);
        }
    }
    scratch_release(probs);
}

int ck_attention_backward_f32(const ck_attention_params *p, const float *d_out, float *dq, float *dk, float *dv) {
    if (p->mask || p->causal) return CK_EINVAL;
    attention_backward_ctx ctx = {p, d_out, dq, dk, dv, backward_block_rows(p->Tk),
                                  (int64_t)ck_sgemm_packed_b_floats(p->D, p->Tk),
                                  (int64_t)ck_sgemm_packed_b_floats(p->Tk, p->D),
                                  (int64_t)ck_sgemm_packed_b_floats(p->Dv, p->Tk), 0};
    ck_parallel_for(p->B * p->H, 1, attention_backward_units, &ctx);
    return __atomic_load_n(&ctx.failed, __ATOMIC_RELAXED) ? CK_ENOMEM : CK_OK;
}
