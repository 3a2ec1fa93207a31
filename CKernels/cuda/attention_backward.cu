/*
 * attention_backward.cu — the gradients of attention.cu's unmasked, non-causal attention, FlashAttention-2
 * style, as pea_cuda_attention_backward: no Tq×Tk matrix in memory; P is recomputed per tile.
 *
 *   S_ij = scale · q_i·k_j,  P_ij = exp(S_ij − lse_i),  O_i = Σ_j P_ij v_j     (the forward)
 *   dV_j = Σ_i P_ij dO_i,  dS_ij = P_ij (dO_i·v_j − delta_i),  dQ_i = scale Σ_j dS_ij k_j,
 *   dK_j = scale Σ_i dS_ij q_i,  where lse_i = log Σ_j exp(S_ij) and delta_i = Σ_j P_ij (dO_i·v_j) = dO_i·O_i.
 *
 * q, k, v and dO (read through ck_attention_params' q, k, v and out strides) and dq, dk, dv (written through
 * the q, k and v strides) share the storage type (f32, f16, bf16); all arithmetic is f32, and every sum runs
 * in a fixed order, so results are deterministic.
 *
 * Three launches (two kernels, one of them in two forms), in order on the stream, with an f32 scratch of
 * 2·B·H·Tq floats (lse, delta) from the caching allocator between them:
 *   attn_bwd_rows_kernel        one warp per query row: streams the keys in tiles of 32 (lane l owns key j0 + l)
 *                               with an online softmax — running max m (warp-uniform), the lane's share of
 *                               l = Σ exp(S − m) and of a = Σ exp(S − m)·(dO_i·v_j) — then lse = m + log l,
 *                               delta = a / l. The forward saves neither lse nor O, so both are recomputed here;
 *                               delta from dO·v instead of dO·O keeps the backward independent of the forward's
 *                               rounded output.
 *   attn_bwd_tile_kernel<true>  key-parallel (FA2): block (x, y) = (key tile of 16, b·H + h) keeps its K and V
 *                               tile in shared memory and dK, dV for it in registers (thread t owns elements
 *                               t, t + 128, … of the [16][D] and [16][Dv] tiles); it streams the query tiles
 *                               (Q, dO, lse, delta), forms the 16×16 tiles of P and dS in shared memory (thread t
 *                               computes pairs t and t + 128) and accumulates dV += Pᵀ·dO, dK += dSᵀ·Q.
 *   attn_bwd_tile_kernel<false> query-parallel: block (x, y) = (query tile of 16, b·H + h) keeps Q, dO, lse and
 *                               delta, streams the key tiles, recomputes the same P and dS tiles and accumulates
 *                               dQ += dS·K in registers. FA2 instead adds dQ from the key-parallel kernel with f32
 *                               atomics; this second pass costs one more recomputation of S and dO·Vᵀ but gives
 *                               the same bits on every run (no atomics, no f32 scratch for dQ, no conversion).
 * All three are SIMT f32 FMAs (no tensor cores). Head dims D, Dv ≤ ATTB_MAX_D (SD's 40, 64, 80, 160), any
 * Tq, Tk (partial tiles are zero-padded and masked out of P). Shared memory per block stays under 48 KB:
 * Q [16][D], dO [16][Dv], K [16][D+1], V [16][Dv+1] (the odd strides keep the per-key reads of the P/dS pass
 * free of bank conflicts), P and dS [16][16], lse and delta [16].
 *
 * Dimension legend: B batch, H heads, Tq queries, Tk keys, D the q/k head dim, Dv the v/dO head dim.
 */
#include "internal.h"

static constexpr int ATTB_TILE = 16;                                        /* queries or keys per tile */
static constexpr int ATTB_THREADS = 128;                                    /* threads per block (tile kernels) */
static constexpr int ATTB_MAX_D = PEA_CUDA_ATTENTION_BACKWARD_MAX_D;        /* largest D and Dv */
static constexpr int ATTB_OWN = ATTB_TILE * ATTB_MAX_D / ATTB_THREADS;      /* accumulator elements per thread */
static constexpr int ATTB_ROW_WARPS = 4;                                    /* query rows per block (row kernel) */

template <typename T>
struct AttnBwdArgs {
    const T *q, *k, *v, *dout;
    T *dq, *dk, *dv;
    float *lse, *delta; /* [B·H·Tq] each */
    int64_t B, H, Tq, Tk, D, Dv;
    int64_t q_sb, q_sh, q_st;
    int64_t k_sb, k_sh, k_st;
    int64_t v_sb, v_sh, v_st;
    int64_t o_sb, o_sh, o_st;
    float scale;
};

/* The row kernel: lse and delta of query i = blockIdx.x·4 + warp of head blockIdx.y (see the header). */
template <typename T>
__global__ void attn_bwd_rows_kernel(AttnBwdArgs<T> p) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t b = blockIdx.y / p.H, h = blockIdx.y % p.H;
    const int64_t i = (int64_t)blockIdx.x * ATTB_ROW_WARPS + warp;
    if (i >= p.Tq) return;
    const T *qi = p.q + b * p.q_sb + h * p.q_sh + i * p.q_st;
    const T *doi = p.dout + b * p.o_sb + h * p.o_sh + i * p.o_st;
    const T *kb = p.k + b * p.k_sb + h * p.k_sh, *vb = p.v + b * p.v_sb + h * p.v_sh;
    float m = -INFINITY, l = 0.0f, a = 0.0f;
    for (int64_t j0 = 0; j0 < p.Tk; j0 += 32) {
        const int64_t j = j0 + lane;
        float s = -INFINITY, dp = 0.0f;
        if (j < p.Tk) {
            const T *kj = kb + j * p.k_st, *vj = vb + j * p.v_st;
            float dot = 0.0f;
            for (int d = 0; d < (int)p.D; d++) dot += pea_ld(qi + d) * pea_ld(kj + d);
            s = p.scale * dot;
            for (int d = 0; d < (int)p.Dv; d++) dp += pea_ld(doi + d) * pea_ld(vj + d);
        }
        const float m_new = fmaxf(m, pea_warp_max(s)); /* finite: key j0 exists */
        const float corr = expf(m - m_new);            /* 0 on the first tile (m = −∞) */
        const float e = j < p.Tk ? expf(s - m_new) : 0.0f;
        l = l * corr + e;
        a = a * corr + e * dp;
        m = m_new;
    }
    const float total = pea_warp_sum(l), weighted = pea_warp_sum(a);
    if (lane == 0) {
        const int64_t r = (int64_t)blockIdx.y * p.Tq + i;
        p.lse[r] = m + logf(total);
        p.delta[r] = weighted / total;
    }
}

/* dst[r·stride + d] = src[(row0 + r)·src_stride + d] for the tile's rows r < ATTB_TILE and d < width, zero for
 * rows at or past `limit` (the block's threads share the elements). */
template <typename T, typename S>
static __device__ __forceinline__ void attb_load(S dst, int stride, const T *src, int64_t src_stride, int64_t row0,
                                                 int64_t limit, int width) {
    for (int e = threadIdx.x; e < ATTB_TILE * width; e += blockDim.x) {
        const int r = e / width, d = e - r * width;
        dst[r * stride + d] = row0 + r < limit ? pea_ld(src + (row0 + r) * src_stride + d) : 0.0f;
    }
}

/* The P and dS tiles of one (query tile, key tile) pair: Ps[i][j] = exp(scale·Q_i·K_j − lse_i) and
 * dSs[i][j] = Ps[i][j]·(dO_i·V_j − delta_i), zero where query i0 + i or key j0 + j is past the end. Thread t
 * computes the pairs t and t + 128 (i = e / 16, j = e % 16). Qs, dOs rows of D and Dv floats; Ks, Vs rows
 * of D + 1 and Dv + 1. */
template <typename S>
static __device__ __forceinline__ void attb_p_ds(S Ps, S dSs, S Qs, S dOs, S Ks, S Vs, S Ls, S Ds, int D, int Dv,
                                                 int rows, int cols, float scale) {
    for (int e = threadIdx.x; e < ATTB_TILE * ATTB_TILE; e += blockDim.x) {
        const int i = e / ATTB_TILE, j = e % ATTB_TILE;
        float pv = 0.0f, ds = 0.0f;
        if (i < rows && j < cols) {
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < D; d++) s += Qs[i * D + d] * Ks[j * (D + 1) + d];
            for (int d = 0; d < Dv; d++) dp += dOs[i * Dv + d] * Vs[j * (Dv + 1) + d];
            pv = expf(scale * s - Ls[i]);
            ds = pv * (dp - Ds[i]);
        }
        Ps[e] = pv;
        dSs[e] = ds;
    }
}

/* acc[n] += Σ_{c < count} M[c·ms + r·mr] · X[c·xs + d] for the elements e = threadIdx.x + 128·n of an
 * [rows][width] accumulator tile (r = e / width, d = e % width): one product of a 16×16 tile of P or dS (read
 * transposed or not through ms, mr) and a tile in shared memory. */
template <typename S>
static __device__ __forceinline__ void attb_accumulate(float *acc, S M, int ms, int mr, S X, int xs, int width, int count) {
#pragma unroll /* constant indices keep acc in registers */
    for (int n = 0; n < ATTB_OWN; n++) {
        const int e = threadIdx.x + n * ATTB_THREADS, r = e / width, d = e - r * width;
        if (e < ATTB_TILE * width)
            for (int c = 0; c < count; c++) acc[n] += M[c * ms + r * mr] * X[c * xs + d];
    }
}

/* dst[(r0 + r)·stride + d] = scale · acc[n] for the accumulator's elements (as attb_accumulate) with r < rows. */
template <typename T>
static __device__ __forceinline__ void attb_store(T *dst, int64_t stride, int64_t r0, int rows, const float *acc,
                                                  int width, float scale) {
#pragma unroll
    for (int n = 0; n < ATTB_OWN; n++) {
        const int e = threadIdx.x + n * ATTB_THREADS, r = e / width, d = e - r * width;
        if (e < ATTB_TILE * width && r < rows) pea_st(dst + (r0 + r) * stride + d, scale * acc[n]);
    }
}

/* The four input tiles, P, dS, lse and delta in dynamic shared memory (see the header). */
static inline size_t attb_smem_bytes(int64_t D, int64_t Dv) {
    return (size_t)(ATTB_TILE * (D + Dv + (D + 1) + (Dv + 1)) + 2 * ATTB_TILE * ATTB_TILE + 2 * ATTB_TILE) *
           sizeof(float);
}

#define ATTB_SHARED_TILES                                                                              \
    PEA_DYNAMIC_SHARED(float, smem);                                                                   \
    const int D = (int)p.D, Dv = (int)p.Dv;                                                            \
    auto Qs = smem;                                                                                    \
    auto dOs = Qs + ATTB_TILE * D;                                                                     \
    auto Ks = dOs + ATTB_TILE * Dv;                                                                    \
    auto Vs = Ks + ATTB_TILE * (D + 1);                                                                \
    auto Ps = Vs + ATTB_TILE * (Dv + 1);                                                               \
    auto dSs = Ps + ATTB_TILE * ATTB_TILE;                                                             \
    auto Ls = dSs + ATTB_TILE * ATTB_TILE;                                                             \
    auto Ds = Ls + ATTB_TILE;                                                                          \
    const int64_t b = blockIdx.y / p.H, h = blockIdx.y % p.H;                                          \
    const float *lse = p.lse + (int64_t)blockIdx.y * p.Tq, *delta = p.delta + (int64_t)blockIdx.y * p.Tq

/* Loads the query tile at i0 (Q, dO, lse, delta) into shared memory (with no keys there is no lse or delta). */
#define ATTB_LOAD_QUERIES(i0)                                                                          \
    attb_load(Qs, D, p.q + b * p.q_sb + h * p.q_sh, p.q_st, (i0), p.Tq, D);                            \
    attb_load(dOs, Dv, p.dout + b * p.o_sb + h * p.o_sh, p.o_st, (i0), p.Tq, Dv);                      \
    for (int r = threadIdx.x; r < ATTB_TILE; r += blockDim.x) {                                        \
        Ls[r] = (i0) + r < p.Tq && p.Tk > 0 ? lse[(i0) + r] : 0.0f;                                    \
        Ds[r] = (i0) + r < p.Tq && p.Tk > 0 ? delta[(i0) + r] : 0.0f;                                  \
    }

/* Loads the key tile at j0 (K, V) into shared memory. */
#define ATTB_LOAD_KEYS(j0)                                                                             \
    attb_load(Ks, D + 1, p.k + b * p.k_sb + h * p.k_sh, p.k_st, (j0), p.Tk, D);                        \
    attb_load(Vs, Dv + 1, p.v + b * p.v_sb + h * p.v_sh, p.v_st, (j0), p.Tk, Dv)

/* The two tile kernels (see the header), one template: KEYS, the key-parallel one — the block owns the key
 * tile at o0 and streams query tiles, accumulating dV and dK —; else the query-parallel one — it owns the
 * query tile at o0 and streams key tiles, accumulating dQ. */
template <typename T, bool KEYS>
__global__ void __launch_bounds__(ATTB_THREADS) attn_bwd_tile_kernel(AttnBwdArgs<T> p) {
    ATTB_SHARED_TILES;
    const int64_t o0 = (int64_t)blockIdx.x * ATTB_TILE;
    const int64_t own_end = KEYS ? p.Tk : p.Tq, other_end = KEYS ? p.Tq : p.Tk;
    const int own = (int)(own_end - o0 < ATTB_TILE ? own_end - o0 : ATTB_TILE);
    float acc[ATTB_OWN], acc2[ATTB_OWN]; /* dV and dK, or dQ (and acc2 unused) */
    for (int n = 0; n < ATTB_OWN; n++) acc[n] = acc2[n] = 0.0f;
    if (KEYS) {
        ATTB_LOAD_KEYS(o0);
    } else {
        ATTB_LOAD_QUERIES(o0);
    }
    for (int64_t s0 = 0; s0 < other_end; s0 += ATTB_TILE) {
        __syncthreads(); /* the owned tile is written; the previous streamed tile, P and dS are no longer read */
        if (KEYS) {
            ATTB_LOAD_QUERIES(s0);
        } else {
            ATTB_LOAD_KEYS(s0);
        }
        __syncthreads();
        const int other = (int)(other_end - s0 < ATTB_TILE ? other_end - s0 : ATTB_TILE);
        attb_p_ds(Ps, dSs, Qs, dOs, Ks, Vs, Ls, Ds, D, Dv, KEYS ? other : own, KEYS ? own : other, p.scale);
        __syncthreads();
        if (KEYS) { /* dV[j][d] += Σ_i P[i][j]·dO[i][d], dK[j][d] += Σ_i dS[i][j]·Q[i][d] */
            attb_accumulate(acc, Ps, ATTB_TILE, 1, dOs, Dv, Dv, other);
            attb_accumulate(acc2, dSs, ATTB_TILE, 1, Qs, D, D, other);
        } else { /* dQ[i][d] += Σ_j dS[i][j]·K[j][d] */
            attb_accumulate(acc, dSs, 1, ATTB_TILE, Ks, D + 1, D, other);
        }
    }
    if (KEYS) {
        attb_store(p.dv + b * p.v_sb + h * p.v_sh, p.v_st, o0, own, acc, Dv, 1.0f);
        attb_store(p.dk + b * p.k_sb + h * p.k_sh, p.k_st, o0, own, acc2, D, p.scale);
    } else {
        attb_store(p.dq + b * p.q_sb + h * p.q_sh, p.q_st, o0, own, acc, D, p.scale);
    }
}

template <typename T>
static int attention_backward_launch(pea_cuda_context *ctx, const char *op, const ck_attention_params *p,
                                     const void *dout, void *dq, void *dk, void *dv, float *scratch) {
    AttnBwdArgs<T> a;
    a.q = (const T *)p->q; a.k = (const T *)p->k; a.v = (const T *)p->v; a.dout = (const T *)dout;
    a.dq = (T *)dq; a.dk = (T *)dk; a.dv = (T *)dv;
    a.B = p->B; a.H = p->H; a.Tq = p->Tq; a.Tk = p->Tk; a.D = p->D; a.Dv = p->Dv;
    a.lse = scratch;
    a.delta = scratch ? scratch + p->B * p->H * p->Tq : NULL;
    a.q_sb = p->q_sb; a.q_sh = p->q_sh; a.q_st = p->q_st;
    a.k_sb = p->k_sb; a.k_sh = p->k_sh; a.k_st = p->k_st;
    a.v_sb = p->v_sb; a.v_sh = p->v_sh; a.v_st = p->v_st;
    a.o_sb = p->o_sb; a.o_sh = p->o_sh; a.o_st = p->o_st;
    a.scale = p->scale;
    const unsigned bh = (unsigned)(p->B * p->H);
    const size_t smem = attb_smem_bytes(p->D, p->Dv);
    const unsigned q_tiles = (unsigned)((p->Tq + ATTB_TILE - 1) / ATTB_TILE);
    const unsigned k_tiles = (unsigned)((p->Tk + ATTB_TILE - 1) / ATTB_TILE);
    if (p->Tq > 0 && p->Tk > 0) {
        dim3 grid((unsigned)((p->Tq + ATTB_ROW_WARPS - 1) / ATTB_ROW_WARPS), bh);
        PEA_KERNEL(ctx, op, attn_bwd_rows_kernel<T>, grid, 32 * ATTB_ROW_WARPS, 0, a);
    }
    if (k_tiles > 0) /* with no queries this writes dK = dV = 0 */
        PEA_KERNEL(ctx, op, (attn_bwd_tile_kernel<T, true>), dim3(k_tiles, bh), ATTB_THREADS, smem, a);
    if (q_tiles > 0) /* with no keys this writes dQ = 0 */
        PEA_KERNEL(ctx, op, (attn_bwd_tile_kernel<T, false>), dim3(q_tiles, bh), ATTB_THREADS, smem, a);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_attention_backward(pea_cuda_context *ctx, int dtype, const ck_attention_params *p,
                                           const void *dout, void *dq, void *dk, void *dv) {
    static const char *op = "attention_backward";
    PEA_OP(ctx, op);
    PEA_REQUIRE_ATTENTION(ctx, op, dtype, p);
    PEA_REQUIRE(ctx, op, p->mask == NULL && !p->causal, "only unmasked, non-causal attention has a backward here");
    PEA_REQUIRE(ctx, op, p->D <= ATTB_MAX_D && p->Dv <= ATTB_MAX_D, "head dims D %lld, Dv %lld exceed %d",
                (long long)p->D, (long long)p->Dv, ATTB_MAX_D);
    if (p->B == 0 || p->H == 0 || (p->Tq == 0 && p->Tk == 0)) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, p->B * p->H <= 65535, "B·H = %lld exceeds the grid's y limit (65535)",
                (long long)(p->B * p->H));
    PEA_REQUIRE(ctx, op, (p->Tq == 0 || (p->q && dout && dq)) && (p->Tk == 0 || (p->k && p->v && dk && dv)),
                "NULL tensor (q %p, k %p, v %p, dout %p, dq %p, dk %p, dv %p)", (const void *)p->q,
                (const void *)p->k, (const void *)p->v, dout, (void *)dq, (void *)dk, (void *)dv);
    /* lse and delta: a block from the caching allocator, handed back right after the launches (safe on the one
     * stream: whatever reuses it is queued after them) */
    float *scratch = NULL;
    if (p->Tq > 0 && p->Tk > 0)
        PEA_TRY(pea_mem_alloc(ctx, op, (size_t)(2 * p->B * p->H * p->Tq) * sizeof(float), (void **)&scratch));
    const int rc = PEA_FLOAT_SWITCH(dtype, attention_backward_launch, ctx, op, p, dout, dq, dk, dv, scratch);
    if (scratch) {
        const int frc = pea_mem_free(ctx, op, scratch);
        if (!rc) return frc;
    }
    return rc;
}
