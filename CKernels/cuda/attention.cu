/*
 * attention.cu — fused multi-head scaled-dot-product attention, flash-attention style, as ck_attention_f32.
 *
 *   out[b,h,i,:] = Σ_j softmax_j( scale · q[b,h,i,:]·k[b,h,j,:] + mask[b,h,i,j] (−∞ where causal j > i) ) · v[b,h,j,:]
 *
 * Every tensor is addressed through ck_attention_params' (b, h, t) element strides with a contiguous
 * feature axis, so [B, H, T, D] tensors and the [B, T, H·D] layout of the projections are read in place;
 * the additive mask is addressed by (m_sb, m_sh, m_st) and contiguous over j, a stride of 0 broadcasting.
 * Scores never reach global memory: each block streams key/value tiles through shared memory and keeps an
 * online softmax (running max m, running sum l, rescaled f32 accumulators) per query row. A row whose keys
 * are all masked yields zeros, as on the CPU. q, k, v, mask and out share the storage type (f32, f16, bf16);
 * all arithmetic is f32 (the tensor-core kernel rounds P to the storage type for its second MMA).
 *
 * Three kernels, chosen in attention_launch:
 *   flash_attention_tc_kernel f16/bf16 with D = Dv ≤ 160 (SD's 40, 64, 80, 160; D padded to a multiple of
 *                            16, except 33–40, kept at 40): FlashAttention-2 style on the tensor cores,
 *                            mma.sync m16n8k16 with f32 accumulation, K/V tiles double-buffered through
 *                            cp.async, fragments by ldmatrix (pea_simt.h; all emulated on the CPU), masks and
 *                            causal included.
 *   flash_attention_kernel   the rest with head dims D, Dv multiples of 8 up to 256 (all of f32): Q, K and V
 *                            tiles in shared memory, SIMT f32 FMAs, register accumulators; 16-byte vector
 *                            loads when the pointers and strides allow.
 *   attention_generic_kernel any other D, Dv (and devices without the shared memory the fast one needs):
 *                            one warp per query row, K and V read from global memory.
 *
 * Dimension legend: B batch, H heads, Tq queries, Tk keys, D the q/k head dim, Dv the v/out head dim.
 */
#include "internal.h"

template <typename T>
struct AttnArgs {
    const T *q, *k, *v, *mask;
    T *out;
    int64_t B, H, Tq, Tk, D, Dv;
    int64_t q_sb, q_sh, q_st;
    int64_t k_sb, k_sh, k_st;
    int64_t v_sb, v_sh, v_st;
    int64_t o_sb, o_sh, o_st;
    int64_t m_sb, m_sh, m_st;
    float scale;
    int causal;
};

enum {
    ATT_WARPS = 4,                   /* warps per block (fast kernel) */
    ATT_ROWS = 4,                    /* query rows per warp */
    ATT_BQ = ATT_WARPS * ATT_ROWS,   /* query rows per block */
    ATT_THREADS = 32 * ATT_WARPS,
    ATT_GENERIC_WARPS = 4,           /* warps (= query rows) per block (generic kernel) */
};

/* dst[r·dst_stride + d] = scale · src[(row0 + r)·src_stride + d] for r < rows, d < width, zero for rows at or
 * past `limit`. The block's threads share the work: with vec (width a multiple of 8, src rows 16-byte
 * aligned) thread t loads the 8-element chunks t, t + blockDim, … with one 16-byte load each (two for f32);
 * otherwise single elements. dst is shared memory (a checked pointer in the emulator, hence the template). */
template <typename T, typename S>
static __device__ __forceinline__ void load_tile(S dst, int dst_stride, const T *src, int64_t src_stride, int64_t row0,
                                                 int64_t limit, int rows, int width, float scale, int vec) {
    if (vec) {
        const int chunks = width / 8;
        for (int e = threadIdx.x; e < rows * chunks; e += blockDim.x) {
            const int r = e / chunks, d = (e - r * chunks) * 8;
            float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (row0 + r < limit) pea_ld8(src + (row0 + r) * src_stride + d, v);
            for (int k = 0; k < 8; k++) dst[r * dst_stride + d + k] = v[k] * scale;
        }
    } else {
        for (int e = threadIdx.x; e < rows * width; e += blockDim.x) {
            const int r = e / width, d = e - r * width;
            dst[r * dst_stride + d] = row0 + r < limit ? pea_ld(src + (row0 + r) * src_stride + d) * scale : 0.0f;
        }
    }
}

/* The fast kernel. Block (x, y) = (query tile, b·H + h) owns queries i0 … i0+15; warp w owns 4 of them and
 * keeps, per row, the running max m (warp-uniform), its lane's share of the running sum l, and the output
 * accumulators acc[row][t] for features lane + 32·t (t < NV = ⌈Dv/32⌉) in registers.
 * Shared memory (f32): Qs [16][D] (pre-multiplied by scale), Ks [BK][D+1] (the odd stride keeps the
 * lane-per-key reads free of bank conflicts), Vs [BK][Dv], Ps [warps][4][BK].
 * Per key tile of BK = 32·KPL keys: the block loads K and V; lane l computes the scores of keys l + 32·kk
 * (kk < KPL) for the warp's 4 rows (Q values are broadcast reads); masking, then per row the tile max (warp
 * shuffles), the rescale of l and acc by exp(m_old − m_new), p = exp(s − m_new) into Ps; then every lane
 * accumulates Σ_j p_j·V[j][lane + 32·t]. With causal, tiles past the block's last query are skipped. At the end
 * l is summed over the warp and out = acc / l (0 for a row with no unmasked key). */
template <typename T, int NV, int KPL>
__global__ void __launch_bounds__(ATT_THREADS) flash_attention_kernel(AttnArgs<T> p, int vec) {
    constexpr int BK = 32 * KPL;
    PEA_DYNAMIC_SHARED(float, smem);
    const int D = (int)p.D, Dv = (int)p.Dv, KS = D + 1;
    auto Qs = smem;
    auto Ks = Qs + ATT_BQ * D;
    auto Vs = Ks + BK * KS;
    auto Ps = Vs + BK * Dv;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t b = blockIdx.y / p.H, h = blockIdx.y % p.H, i0 = (int64_t)blockIdx.x * ATT_BQ;
    const T *kb = p.k + b * p.k_sb + h * p.k_sh, *vb = p.v + b * p.v_sb + h * p.v_sh;

    load_tile(Qs, D, p.q + b * p.q_sb + h * p.q_sh, p.q_st, i0, p.Tq, ATT_BQ, D, p.scale, vec);

    float m[ATT_ROWS], l[ATT_ROWS], acc[ATT_ROWS][NV];
    for (int r = 0; r < ATT_ROWS; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int t = 0; t < NV; t++) acc[r][t] = 0.0f;
    }
    const int64_t q_end = p.Tq < i0 + ATT_BQ ? p.Tq : i0 + ATT_BQ;
    const int64_t key_end = p.causal ? (p.Tk < q_end ? p.Tk : q_end) : p.Tk;

    for (int64_t j0 = 0; j0 < key_end; j0 += BK) {
        __syncthreads(); /* the Q tile is written; the previous K/V/P tiles are no longer read */
        load_tile(Ks, KS, kb, p.k_st, j0, key_end, BK, D, 1.0f, vec);
        load_tile(Vs, Dv, vb, p.v_st, j0, key_end, BK, Dv, 1.0f, vec);
        __syncthreads();

        float s[ATT_ROWS][KPL];
        for (int r = 0; r < ATT_ROWS; r++)
            for (int kk = 0; kk < KPL; kk++) s[r][kk] = 0.0f;
        for (int d = 0; d < D; d++) {
            float kv[KPL];
            for (int kk = 0; kk < KPL; kk++) kv[kk] = Ks[(lane + 32 * kk) * KS + d];
            for (int r = 0; r < ATT_ROWS; r++) {
                const float qv = Qs[(warp * ATT_ROWS + r) * D + d];
                for (int kk = 0; kk < KPL; kk++) s[r][kk] += qv * kv[kk];
            }
        }

        const int cols = (int)(key_end - j0 < BK ? key_end - j0 : BK);
        for (int r = 0; r < ATT_ROWS; r++) {
            const int64_t i = i0 + warp * ATT_ROWS + r;
            float tmax = -INFINITY;
            for (int kk = 0; kk < KPL; kk++) {
                const int c = lane + 32 * kk;
                const int64_t j = j0 + c;
                float v = -INFINITY;
                if (i < p.Tq && c < cols && (!p.causal || j <= i)) {
                    v = s[r][kk];
                    if (p.mask) v += pea_ld(p.mask + b * p.m_sb + h * p.m_sh + i * p.m_st + j);
                }
                s[r][kk] = v;
                tmax = fmaxf(tmax, v);
            }
            tmax = pea_warp_max(tmax);
            const float m_new = fmaxf(m[r], tmax);
            float corr = 1.0f, sum = 0.0f;
            if (m_new != -INFINITY) {
                corr = expf(m[r] - m_new); /* 0 on the first unmasked tile (m = −∞) */
                for (int kk = 0; kk < KPL; kk++) {
                    s[r][kk] = expf(s[r][kk] - m_new);
                    sum += s[r][kk];
                }
            } else {
                for (int kk = 0; kk < KPL; kk++) s[r][kk] = 0.0f;
            }
            l[r] = l[r] * corr + sum;
            for (int t = 0; t < NV; t++) acc[r][t] *= corr;
            m[r] = m_new;
            for (int kk = 0; kk < KPL; kk++) Ps[(warp * ATT_ROWS + r) * BK + lane + 32 * kk] = s[r][kk];
        }
        __syncwarp();

        for (int c = 0; c < cols; c++) {
            float pr[ATT_ROWS];
            for (int r = 0; r < ATT_ROWS; r++) pr[r] = Ps[(warp * ATT_ROWS + r) * BK + c];
            for (int t = 0; t < NV; t++) {
                const int d = lane + 32 * t;
                if (d < Dv) {
                    const float vv = Vs[c * Dv + d];
                    for (int r = 0; r < ATT_ROWS; r++) acc[r][t] += pr[r] * vv;
                }
            }
        }
    }

    for (int r = 0; r < ATT_ROWS; r++) {
        const int64_t i = i0 + warp * ATT_ROWS + r;
        const float total = pea_warp_sum(l[r]);
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        if (i < p.Tq) {
            T *o = p.out + b * p.o_sb + h * p.o_sh + i * p.o_st;
            for (int t = 0; t < NV; t++) {
                const int d = lane + 32 * t;
                if (d < Dv) pea_st(o + d, acc[r][t] * inv);
            }
        }
    }
}

/* The generic kernel: any D and Dv. Block (x, y) = (group of 4 queries, b·H + h); warp w owns query
 * i = x·4 + w and keeps its scaled q row, its output accumulators and one tile of probabilities in dynamic
 * shared memory ([warps][D + Dv + 32] floats). Per tile of 32 keys, lane l computes the score of key j0 + l
 * (reading k from global memory), the warp takes the tile max, rescales, stores p = exp(s − m) to shared
 * memory, and then each lane updates the accumulators of features lane, lane + 32, … with Σ_j p_j·v[j][d]
 * (v rows read coalesced). Only warp-level synchronisation: a warp past the last query returns at once. */
template <typename T>
__global__ void attention_generic_kernel(AttnArgs<T> p) {
    PEA_DYNAMIC_SHARED(float, smem);
    const int D = (int)p.D, Dv = (int)p.Dv;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t b = blockIdx.y / p.H, h = blockIdx.y % p.H;
    const int64_t i = (int64_t)blockIdx.x * ATT_GENERIC_WARPS + warp;
    if (i >= p.Tq) return;
    auto qs = smem + warp * (D + Dv + 32);
    auto acc = qs + D;
    auto ps = acc + Dv;
    const T *q = p.q + b * p.q_sb + h * p.q_sh + i * p.q_st;
    const T *kb = p.k + b * p.k_sb + h * p.k_sh, *vb = p.v + b * p.v_sb + h * p.v_sh;
    for (int d = lane; d < D; d += 32) qs[d] = pea_ld(q + d) * p.scale;
    for (int d = lane; d < Dv; d += 32) acc[d] = 0.0f;
    __syncwarp();

    const int64_t key_end = p.causal ? (p.Tk < i + 1 ? p.Tk : i + 1) : p.Tk;
    float m = -INFINITY, l = 0.0f;
    for (int64_t j0 = 0; j0 < key_end; j0 += 32) {
        const int64_t j = j0 + lane;
        float s = -INFINITY;
        if (j < key_end) {
            const T *k = kb + j * p.k_st;
            float dot = 0.0f;
            for (int d = 0; d < D; d++) dot += qs[d] * pea_ld(k + d);
            s = dot;
            if (p.mask) s += pea_ld(p.mask + b * p.m_sb + h * p.m_sh + i * p.m_st + j);
        }
        const float m_new = fmaxf(m, pea_warp_max(s));
        float corr = 1.0f, pj = 0.0f;
        if (m_new != -INFINITY) {
            corr = expf(m - m_new);
            pj = expf(s - m_new);
        }
        l = l * corr + pj;
        m = m_new;
        ps[lane] = pj;
        __syncwarp();
        const int cols = (int)(key_end - j0 < 32 ? key_end - j0 : 32);
        for (int d = lane; d < Dv; d += 32) {
            float a = acc[d] * corr;
            for (int c = 0; c < cols; c++) a += ps[c] * pea_ld(vb + (j0 + c) * p.v_st + d);
            acc[d] = a;
        }
        __syncwarp();
    }
    const float total = pea_warp_sum(l);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    T *o = p.out + b * p.o_sb + h * p.o_sh + i * p.o_st;
    for (int d = lane; d < Dv; d += 32) pea_st(o + d, acc[d] * inv);
}

/* ---------------------------------------------------------------------------------------------------- */
/* The tensor-core kernel (f16 / bf16)                                                                   */

enum {
    ATT_TC_BK = 64,                      /* keys per tile */
    ATT_TC_WARPS = 4,                    /* warps per block; each owns MT m-tiles of 16 query rows */
    ATT_TC_MAX_D = 160,                  /* head dims up to this (padded to a multiple of 16) */
};
#define ATT_LOG2E 1.4426950408889634f

static __device__ __forceinline__ void att_mma(const __half *, float c[4], const unsigned a[4], const unsigned b[2]) {
    pea_mma_m16n8k16_f16(c, a, b);
}
static __device__ __forceinline__ void att_mma(const __nv_bfloat16 *, float c[4], const unsigned a[4],
                                               const unsigned b[2]) {
    pea_mma_m16n8k16_bf16(c, a, b);
}
/* Two f32 → one .b32 register of two f16 / bf16 (lo in the low half), rounded to nearest even. */
static __device__ __forceinline__ unsigned att_pack(const __half *, float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    unsigned u;
    memcpy(&u, &h, 4);
    return u;
}
static __device__ __forceinline__ unsigned att_pack(const __nv_bfloat16 *, float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    unsigned u;
    memcpy(&u, &h, 4);
    return u;
}

/* Row r, features d … d+7 of a 16-bit tensor as eight raw 16-bit values (one 16-byte load with vec, which
 * needs D % 8 == 0 and 16-byte aligned rows), zeros at or past feature D. */
template <typename T>
static __device__ __forceinline__ uint4 att_load8(const T *row, int d, int D, int vec) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (vec) {
        if (d < D) v = *reinterpret_cast<const uint4 *>(row + d);
    } else {
        const unsigned short *s = reinterpret_cast<const unsigned short *>(row) + d;
        unsigned x[8];
        for (int k = 0; k < 8; k++) x[k] = d + k < D ? s[k] : 0u;
        v = make_uint4(x[0] | (x[1] << 16), x[2] | (x[3] << 16), x[4] | (x[5] << 16), x[6] | (x[7] << 16));
    }
    return v;
}

/* Rows row0 … row0+rows-1 of a [*, D] 16-bit tensor into shared memory at halves base + r·RS,
 * as DC 16-byte chunks per row, zero past D and for rows at or past `limit`. The block's THREADS threads
 * cover RPP = THREADS / DC rows per pass: thread e takes chunk e % DC of rows e / DC, + RPP, …
 * (threads past RPP·DC idle), so a warp reads whole rows (coalesced) and each thread's source pointer just
 * steps by RPP rows. With vec (D % 8 == 0, rows 16-byte aligned) each chunk is one cp.async (zero-filled where
 * there is no data; it lands when the caller waits for its group); otherwise the thread loads it through
 * registers and stores it at once. */
template <int DC, int RS, int THREADS, typename T, typename S16, typename S128>
static __device__ __forceinline__ void att_stage_rows(S16 s16, S128 s128, int base, const T *src, int64_t src_stride,
                                                      int64_t row0, int64_t limit, int rows, int D, int vec) {
    constexpr int C = DC, RPP = THREADS / C;
    const int e = threadIdx.x, r0 = e / C, d = (e - r0 * C) * 8;
    if (r0 >= RPP) return;
    const int64_t have = limit - row0; /* rows with data */
    const T *from = src + (row0 + r0) * src_stride + d;
    const int64_t step = RPP * src_stride;
    for (int r = r0; r < rows; r += RPP, from += step) {
        const bool inside = r < have && d < D;
        if (vec) {
            pea_cp_async16(s16, base + r * RS + d, inside ? from : src, inside ? 16 : 0);
        } else {
            s128[(base + r * RS + d) / 8] = inside ? att_load8(from - d, d, D, 0) : make_uint4(0u, 0u, 0u, 0u);
        }
    }
}

/* The Q·Kᵀ A fragment of m-tile `tile` (rows tile·16 + 0-15 of the Q tile), k-step kk, by one ldmatrix.x4 —
 * matrices rows 0-7 | 8-15 × features kk·16 + 0-7 | 8-15 → a0 … a3 — or, when `half` and kk is the last of kd
 * k-steps (features kk·16 + 0-7 only), rows 0-7 | 8-15 of those features for a0, a1 (the x4's other two matrices
 * repeat them) and zero a2, a3. */
template <bool half, typename S16>
static __device__ __forceinline__ void att_load_q(unsigned qf[4], S16 s16, int tile, int kk, int kd, int RS, int mat,
                                                  int mrow) {
    if (half && kk == kd - 1) {
        pea_ldmatrix_x4(qf, s16, (tile * 16 + (mat & 1) * 8 + mrow) * RS + kk * 16);
        qf[2] = qf[3] = 0u;
    } else {
        pea_ldmatrix_x4(qf, s16, (tile * 16 + (mat & 1) * 8 + mrow) * RS + kk * 16 + (mat >> 1) * 8);
    }
}

/* FlashAttention-2-style attention on the tensor cores, for f16/bf16 q, k, v, mask and out with D = Dv ≤ 160
 * as DC = ⌈D/8⌉ chunks of 8 features (the dispatcher rounds DC up to even, a multiple of 16 features, except for
 * DC = 5: SD1.5's head dim 40). All arithmetic is f32 except the two MMAs' f16/bf16 inputs.
 *
 * Block (x, y) = (tile of BQ = 64·MT queries from i0 = x·BQ, b·H + h); 4 warps. Warp w owns MT m-tiles of
 * 16 query rows, rows i0 + (w·MT + mt)·16 + 0…15. Lane (g = lane / 4, t = lane % 4) holds, per m-tile, the
 * mma.m16n8k16 fragments (pea_simt.h) of rows g and g + 8: the Q·Kᵀ A operand qf (Q rows, loaded once),
 * the score/probability tile S (16 × 64 keys: 8 n-tiles of 4 f32, columns 2t, 2t+1 of each), the output
 * accumulators o (16 × 8·DC: DC n-tiles of 4 f32), and per row the running max m (log2 domain, the same in
 * the 4 lanes of a group) and the lane's share of the running sum l.
 *
 * Shared memory, 16-bit values, rows of RS = 8·(DC | 1) halves: an odd number of 16-byte units puts the 8 rows
 * an ldmatrix reads in 8 different 16-byte bank groups (8 halves of padding for even DC, none for odd DC):
 * Qs [BQ][RS], then two buffers of Ks [64][RS] and Vs [64][RS],
 * all row-major as in global memory. Loads are cp.async (16 bytes, zero-filled past the data), double
 * buffered: while the warps compute on key tile j, tile j+1 is in flight into the other buffer.
 * Fragments come from shared memory with ldmatrix: Q's A operand and K's B operand (K·Qᵀ's B is 32-bit pairs
 * along a K row) plain, V's B operand (pairs along keys) with .trans; each ldmatrix.x4 serves two n-tiles.
 *
 * Per tile of 64 keys each warp computes S = Q·Kᵀ (8·⌈DC/2⌉ MMAs per m-tile; with odd DC the last k-step has
 * features 8·(DC−1) … 8·DC−1 only: its fragments' upper halves are zero registers, nothing is loaded for them,
 * and its K fragments come from one ldmatrix.x4 per 4 n-tiles), then per row the max over its
 * 16 values and the 4 lanes of the group (xor shuffles 1, 2), the new running max m, the rescale of l and o
 * by 2^(m_old − m_new), and P = 2^(S·scale·log2 e − m_new) (one FFMA and one ex2 per score; l += Σ P in f32).
 * A tile with no mask, all keys valid, no causal cut and scale > 0 takes this path with no per-element tests;
 * any other tile also adds mask·log2 e and sets −∞ past Tk and, with causal, where j > i. P is packed into
 * f16/bf16 A fragments (the accumulator layout of two adjacent n-tiles is exactly the A layout of one
 * k-step) and O += P·V (DC·4 MMAs per m-tile; n-tiles in pairs per ldmatrix.x4.trans, an odd last n-tile with
 * two k-steps per ldmatrix). A row whose keys are all masked keeps m = −∞ and l = 0 and
 * is written as zeros. At the end l is summed over the group and out = o / l, rounded once. */
template <typename T, int DC, int MT, int WARPS, int MINB, bool QREG>
__global__ void __launch_bounds__(32 * WARPS, MINB) flash_attention_tc_kernel(AttnArgs<T> p, int vec) {
    constexpr int BK = ATT_TC_BK, BQ = WARPS * 16 * MT;
    constexpr int KD = (DC + 1) / 2;    /* k-steps of Q·Kᵀ */
    constexpr bool HALF = DC % 2 != 0;  /* the last k-step has 8 features, not 16 */
    constexpr int NS = BK / 8;          /* n-tiles of S */
    constexpr int KC = BK / 16;         /* k-steps of P·V */
    constexpr int NO = DC;              /* n-tiles of O */
    constexpr int RS = 8 * (DC | 1);    /* row stride of every tile, halves */
    constexpr int KV = BK * RS; /* halves of one K or V tile */
    PEA_DYNAMIC_SHARED(unsigned short, s16);
    PEA_DYNAMIC_SHARED(uint4, s128);
    const T *tag = nullptr;
    const int D = (int)p.D, Dv = (int)p.Dv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int64_t b = blockIdx.y / p.H, h = blockIdx.y % p.H, i0 = (int64_t)blockIdx.x * BQ;
    const T *kb = p.k + b * p.k_sb + h * p.k_sh, *vb = p.v + b * p.v_sb + h * p.v_sh;
    const T *mb = p.mask ? p.mask + b * p.m_sb + h * p.m_sh : nullptr;
    const int64_t q_end = p.Tq < i0 + BQ ? p.Tq : i0 + BQ;
    const int64_t key_end = p.causal ? (p.Tk < q_end ? p.Tk : q_end) : p.Tk;
    const int tiles = (int)((key_end + BK - 1) / BK);
    /* ldmatrix row offsets of this lane: lane l names row l % 8 of matrix l / 8 */
    const int mrow = lane & 7, mat = lane >> 3;

    /* Q and key tile 0 (buffer 0) form the first group of copies. */
    att_stage_rows<DC, RS, 32 * WARPS>(s16, s128, 0, p.q + b * p.q_sb + h * p.q_sh, p.q_st, i0, p.Tq, BQ, D, vec);
    if (tiles > 0) {
        att_stage_rows<DC, RS, 32 * WARPS>(s16, s128, BQ * RS, kb, p.k_st, 0, key_end, BK, D, vec);
        att_stage_rows<DC, RS, 32 * WARPS>(s16, s128, BQ * RS + KV, vb, p.v_st, 0, key_end, BK, D, vec);
    }
    pea_cp_async_commit();

    constexpr int QK = QREG ? KD : 1; /* k-steps of Q fragments held at a time */
    unsigned qf[MT][QK][4];
    float m[MT][2], l[MT][2], o[MT][NO][4];
    #pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        #pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            m[mt][hr] = -INFINITY;
            l[mt][hr] = 0.0f;
        }
        #pragma unroll
        for (int n = 0; n < NO; n++)
            #pragma unroll
            for (int e = 0; e < 4; e++) o[mt][n][e] = 0.0f;
    }
    const float sl2 = p.scale * ATT_LOG2E;
    if (tiles == 0) { /* no keys: Q's copies still land before the block ends */
        pea_cp_async_wait<0>();
    }

    for (int it = 0; it < tiles; it++) {
        const int64_t j0 = (int64_t)it * BK;
        const int cur = BQ * RS + (it & 1) * 2 * KV; /* this tile's K; its V follows at + KV */
        if (it + 1 < tiles) {                        /* prefetch the next tile into the other buffer */
            const int nxt = BQ * RS + ((it + 1) & 1) * 2 * KV;
            att_stage_rows<DC, RS, 32 * WARPS>(s16, s128, nxt, kb, p.k_st, j0 + BK, key_end, BK, D, vec);
            att_stage_rows<DC, RS, 32 * WARPS>(s16, s128, nxt + KV, vb, p.v_st, j0 + BK, key_end, BK, D, vec);
        }
        pea_cp_async_commit();
        pea_cp_async_wait<1>(); /* everything but the prefetch has landed: Q and this tile */
        __syncthreads();

        if (QREG && it == 0) {
            #pragma unroll
            for (int mt = 0; mt < MT; mt++)
                #pragma unroll
                for (int kk = 0; kk < QK; kk++)
                    att_load_q<HALF>(qf[mt][kk], s16, warp * MT + mt, kk, KD, RS, mat, mrow);
        }

        float s[MT][NS][4];
        #pragma unroll
        for (int mt = 0; mt < MT; mt++)
            #pragma unroll
            for (int n = 0; n < NS; n++)
                #pragma unroll
                for (int e = 0; e < 4; e++) s[mt][n][e] = 0.0f;
        #pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            const int qk = QREG ? kk : 0;
            if (!QREG) {
                #pragma unroll
                for (int mt = 0; mt < MT; mt++) att_load_q<HALF>(qf[mt][0], s16, warp * MT + mt, kk, KD, RS, mat, mrow);
            }
            if (HALF && kk == KD - 1) {
                #pragma unroll
                for (int n = 0; n < NS; n += 4) {
                    /* matrices: keys of n-tiles n … n+3 × features kk·16 + 0-7 → the lower b register of each */
                    unsigned bk[4];
                    pea_ldmatrix_x4(bk, s16, cur + ((n + mat) * 8 + mrow) * RS + kk * 16);
                    #pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const unsigned b2[2] = {bk[e], 0u};
                        #pragma unroll
                        for (int mt = 0; mt < MT; mt++) att_mma(tag, s[mt][n + e], qf[mt][qk], b2);
                    }
                }
            } else {
                #pragma unroll
                for (int n = 0; n < NS; n += 2) {
                    /* matrices: keys of n-tile n | n+1 × features kk·16 + 0-7 | 8-15 → b of n, then b of n+1 */
                    unsigned bk[4];
                    pea_ldmatrix_x4(bk, s16, cur + ((n + (mat >> 1)) * 8 + mrow) * RS + kk * 16 + (mat & 1) * 8);
                    #pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        att_mma(tag, s[mt][n], qf[mt][qk], bk);
                        att_mma(tag, s[mt][n + 1], qf[mt][qk], bk + 2);
                    }
                }
            }
        }

        /* clean: no per-element test can change a score in this tile */
        const bool clean = !mb && sl2 > 0.0f && j0 + BK <= key_end && !(p.causal && j0 + BK - 1 > i0);
        unsigned pa[MT][KC][4];
        #pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            #pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                float mx = -INFINITY, m_new, sum = 0.0f;
                if (clean) {
                    #pragma unroll
                    for (int n = 0; n < NS; n++)
                        mx = fmaxf(mx, fmaxf(s[mt][n][2 * hr], s[mt][n][2 * hr + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(PEA_FULL_MASK, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(PEA_FULL_MASK, mx, 2));
                    m_new = fmaxf(m[mt][hr], mx * sl2);
                    #pragma unroll
                    for (int n = 0; n < NS; n++)
                        #pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const float pe = pea_ex2(fmaf(s[mt][n][2 * hr + e], sl2, -m_new));
                            s[mt][n][2 * hr + e] = pe;
                            sum += pe;
                        }
                } else {
                    const int64_t i = i0 + (warp * MT + mt) * 16 + g + 8 * hr;
                    #pragma unroll
                    for (int n = 0; n < NS; n++)
                        #pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const int64_t j = j0 + n * 8 + 2 * t + e;
                            float v = s[mt][n][2 * hr + e] * sl2;
                            if (j >= key_end || (p.causal && j > i)) v = -INFINITY;
                            else if (mb && i < p.Tq) v += pea_ld(mb + i * p.m_st + j) * ATT_LOG2E;
                            s[mt][n][2 * hr + e] = v;
                            mx = fmaxf(mx, v);
                        }
                    mx = fmaxf(mx, __shfl_xor_sync(PEA_FULL_MASK, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(PEA_FULL_MASK, mx, 2));
                    m_new = fmaxf(m[mt][hr], mx);
                    const float m_use = m_new == -INFINITY ? 0.0f : m_new; /* all masked so far: P = 0 */
                    #pragma unroll
                    for (int n = 0; n < NS; n++)
                        #pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const float pe = pea_ex2(s[mt][n][2 * hr + e] - m_use);
                            s[mt][n][2 * hr + e] = pe;
                            sum += pe;
                        }
                }
                /* 2^(m_old − m_new): 0 while m_old is −∞ (o and l are 0 then); 1 while both are −∞ */
                const float corr = m[mt][hr] == m_new ? 1.0f : pea_ex2(m[mt][hr] - m_new);
                m[mt][hr] = m_new;
                l[mt][hr] = l[mt][hr] * corr + sum;
                #pragma unroll
                for (int n = 0; n < NO; n++) {
                    o[mt][n][2 * hr] *= corr;
                    o[mt][n][2 * hr + 1] *= corr;
                }
            }
            #pragma unroll
            for (int kc = 0; kc < KC; kc++) {
                pa[mt][kc][0] = att_pack(tag, s[mt][2 * kc][0], s[mt][2 * kc][1]);
                pa[mt][kc][1] = att_pack(tag, s[mt][2 * kc][2], s[mt][2 * kc][3]);
                pa[mt][kc][2] = att_pack(tag, s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
                pa[mt][kc][3] = att_pack(tag, s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
            }
        }

        #pragma unroll
        for (int kc = 0; kc < KC; kc++)
            #pragma unroll
            for (int n = 0; n + 1 < NO; n += 2) {
                /* matrices: keys kc·16 + 0-7 | 8-15 × features of n-tile n | n+1, transposed → b of n, b of n+1 */
                unsigned bv[4];
                pea_ldmatrix_x4_trans(bv, s16, cur + KV + (kc * 16 + (mat & 1) * 8 + mrow) * RS + (n + (mat >> 1)) * 8);
                #pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    att_mma(tag, o[mt][n], pa[mt][kc], bv);
                    att_mma(tag, o[mt][n + 1], pa[mt][kc], bv + 2);
                }
            }
        if (NO % 2) {
            #pragma unroll
            for (int kc = 0; kc < KC; kc += 2) {
                /* matrices: keys kc·16 + 0-7 | 8-15 | 16-23 | 24-31 × the last n-tile's features, transposed → its b
                 * for k-steps kc and kc+1 (no pad column of V is read) */
                unsigned bv[4];
                pea_ldmatrix_x4_trans(bv, s16, cur + KV + (kc * 16 + mat * 8 + mrow) * RS + (NO - 1) * 8);
                #pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    att_mma(tag, o[mt][NO - 1], pa[mt][kc], bv);
                    att_mma(tag, o[mt][NO - 1], pa[mt][kc + 1], bv + 2);
                }
            }
        }
        __syncthreads(); /* this buffer is refilled by the next iteration's prefetch */
    }

    #pragma unroll
    for (int mt = 0; mt < MT; mt++)
        #pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            float total = l[mt][hr];
            total += __shfl_xor_sync(PEA_FULL_MASK, total, 1);
            total += __shfl_xor_sync(PEA_FULL_MASK, total, 2);
            const float inv = total > 0.0f ? 1.0f / total : 0.0f;
            const int64_t i = i0 + (warp * MT + mt) * 16 + g + 8 * hr;
            if (i >= p.Tq) continue;
            T *orow = p.out + b * p.o_sb + h * p.o_sh + i * p.o_st;
            #pragma unroll
            for (int n = 0; n < NO; n++) {
                const int d = n * 8 + 2 * t;
                const float v0 = o[mt][n][2 * hr] * inv, v1 = o[mt][n][2 * hr + 1] * inv;
                if (d + 1 < Dv && ((uintptr_t)(orow + d) & 3u) == 0) {
                    *reinterpret_cast<unsigned *>(orow + d) = att_pack(tag, v0, v1);
                } else {
                    if (d < Dv) pea_st(orow + d, v0);
                    if (d + 1 < Dv) pea_st(orow + d + 1, v1);
                }
            }
        }
}

/* ---------------------------------------------------------------------------------------------------- */
/* Host side                                                                                             */

/* The tensor-core kernel's 8-feature chunks per row for head dim D: ⌈D/8⌉ rounded up to even (whole k16 steps
 * of Q·Kᵀ), except 5 (D 33–40, SD1.5's 40), whose last k-step is half zeros either way: kept at 5, it leaves out
 * the pad column of shared memory, its copies and ldmatrix loads, and a sixth n-tile of O·V MMAs. */
static int tc_chunks(int64_t D) {
    const int dc = (int)((D + 7) / 8);
    return dc == 5 || dc % 2 == 0 ? dc : dc + 1;
}

/* Shared memory of the tensor-core kernel: Qs and two buffers of Ks and Vs, rows of 8·(DC | 1) 16-bit values. */
static size_t tc_smem_bytes(int DC, int MT, int warps) {
    return 2 * (size_t)(8 * (DC | 1)) * ((size_t)warps * 16 * MT + 4 * (size_t)ATT_TC_BK);
}

template <typename T, int DC, int MT, int WARPS, int MINB, bool QREG>
static int tc_launch(pea_cuda_context *ctx, const AttnArgs<T> &a, int vec) {
    constexpr int BQ = WARPS * 16 * MT;
    const size_t smem = tc_smem_bytes(DC, MT, WARPS);
    auto kernel = flash_attention_tc_kernel<T, DC, MT, WARPS, MINB, QREG>;
    if (smem > 48 * 1024)
        PEA_TRY(pea_check_cuda(ctx, "attention",
                               cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                               "cudaFuncSetAttribute"));
    dim3 grid((unsigned)((a.Tq + BQ - 1) / BQ), (unsigned)(a.B * a.H));
    PEA_KERNEL(ctx, "attention", kernel, grid, 32 * WARPS, smem, a, vec);
    return PEA_CUDA_OK;
}

/* Two m-tiles per warp (128 queries per block, each K/V fragment read from shared memory serves two MMAs)
 * where the registers allow it and there are enough queries to fill the block; one otherwise. nvcc 11.8 for
 * sm_90, no spills: two m-tiles with Q fragments held take 174 registers at D 48 (then also D 40's padded
 * width), 235 at 80, 252 at 96; one takes 168–227 at D 112–160. At D 64 the block is limited to 168 registers
 * so that three blocks (12 warps) share an SM, with Q's fragments re-read from shared memory per k-step instead
 * of held (80 bytes spill): on an H100 at B 2, H 5, T 4096 that ran in 0.216 ms against 0.305 ms with two
 * blocks per SM and Q held (0.231 ms with three and Q held: 232 bytes spill). At D 40, then padded to 48, three
 * blocks per SM was slower (0.319 ms against 0.303 ms), so the smaller head dims keep the default (D 40 too,
 * unmeasured since it kept its 5 chunks). */
enum { ATT_TC_TWO_MTILES_MAX_DC = 12 };
template <typename T>
static int tc_dispatch(pea_cuda_context *ctx, const AttnArgs<T> &a, int vec) {
    const int DC = tc_chunks(a.D);
    const bool two = DC <= ATT_TC_TWO_MTILES_MAX_DC && a.Tq > 64;
    /* <T, DC (8-feature chunks), m-tiles per warp, warps, min blocks per SM, Q fragments held in registers> */
    switch (DC) {
    case 2: return two ? tc_launch<T, 2, 2, 4, 1, true>(ctx, a, vec) : tc_launch<T, 2, 1, 4, 1, true>(ctx, a, vec);
    case 4: return two ? tc_launch<T, 4, 2, 4, 1, true>(ctx, a, vec) : tc_launch<T, 4, 1, 4, 1, true>(ctx, a, vec);
    case 5: return two ? tc_launch<T, 5, 2, 4, 1, true>(ctx, a, vec) : tc_launch<T, 5, 1, 4, 1, true>(ctx, a, vec);
    case 6: return two ? tc_launch<T, 6, 2, 4, 1, true>(ctx, a, vec) : tc_launch<T, 6, 1, 4, 1, true>(ctx, a, vec);
    case 8: return two ? tc_launch<T, 8, 2, 4, 3, false>(ctx, a, vec) : tc_launch<T, 8, 1, 4, 1, true>(ctx, a, vec);
    case 10: return two ? tc_launch<T, 10, 2, 4, 1, true>(ctx, a, vec) : tc_launch<T, 10, 1, 4, 1, true>(ctx, a, vec);
    case 12: return two ? tc_launch<T, 12, 2, 4, 1, true>(ctx, a, vec) : tc_launch<T, 12, 1, 4, 1, true>(ctx, a, vec);
    case 14: return tc_launch<T, 14, 1, 4, 1, true>(ctx, a, vec);
    case 16: return tc_launch<T, 16, 1, 4, 1, true>(ctx, a, vec);
    case 18: return tc_launch<T, 18, 1, 4, 1, true>(ctx, a, vec);
    case 20: return tc_launch<T, 20, 1, 4, 1, true>(ctx, a, vec);
    }
    return pea_fail(ctx, PEA_CUDA_ERROR_INVALID, "attention", "internal: no tensor-core kernel for D %lld",
                    (long long)a.D);
}
template <>
int tc_dispatch<float>(pea_cuda_context *ctx, const AttnArgs<float> &, int) {
    return pea_fail(ctx, PEA_CUDA_ERROR_INVALID, "attention", "internal: no tensor-core kernel for f32");
}

static size_t flash_smem_bytes(int64_t D, int64_t Dv, int kpl) {
    const int64_t BK = 32 * kpl;
    return (size_t)(ATT_BQ * D + BK * (D + 1) + BK * Dv + ATT_WARPS * ATT_ROWS * BK) * sizeof(float);
}

template <typename T, int NV, int KPL>
static int flash_launch(pea_cuda_context *ctx, const AttnArgs<T> &a, int vec) {
    const size_t smem = flash_smem_bytes(a.D, a.Dv, KPL);
    auto kernel = flash_attention_kernel<T, NV, KPL>;
    if (smem > 48 * 1024)
        PEA_TRY(pea_check_cuda(ctx, "attention",
                               cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                               "cudaFuncSetAttribute"));
    dim3 grid((unsigned)((a.Tq + ATT_BQ - 1) / ATT_BQ), (unsigned)(a.B * a.H));
    PEA_KERNEL(ctx, "attention", kernel, grid, ATT_THREADS, smem, a, vec);
    return PEA_CUDA_OK;
}

template <typename T, int KPL>
static int flash_dispatch_nv(pea_cuda_context *ctx, const AttnArgs<T> &a, int vec) {
    switch ((a.Dv + 31) / 32) {
    case 1: return flash_launch<T, 1, KPL>(ctx, a, vec);
    case 2: return flash_launch<T, 2, KPL>(ctx, a, vec);
    case 3: return flash_launch<T, 3, KPL>(ctx, a, vec);
    case 4: return flash_launch<T, 4, KPL>(ctx, a, vec);
    }
    if (KPL == 1) {
        switch ((a.Dv + 31) / 32) {
        case 5: return flash_launch<T, 5, 1>(ctx, a, vec);
        case 6: return flash_launch<T, 6, 1>(ctx, a, vec);
        case 7: return flash_launch<T, 7, 1>(ctx, a, vec);
        case 8: return flash_launch<T, 8, 1>(ctx, a, vec);
        }
    }
    return pea_fail(ctx, PEA_CUDA_ERROR_INVALID, "attention", "internal: no fast kernel for Dv %lld",
                    (long long)a.Dv);
}

template <typename T>
static int attention_launch(pea_cuda_context *ctx, const ck_attention_params *p) {
    AttnArgs<T> a;
    a.q = (const T *)p->q;
    a.k = (const T *)p->k;
    a.v = (const T *)p->v;
    a.mask = (const T *)p->mask;
    a.out = (T *)p->out;
    a.B = p->B; a.H = p->H; a.Tq = p->Tq; a.Tk = p->Tk; a.D = p->D; a.Dv = p->Dv;
    a.q_sb = p->q_sb; a.q_sh = p->q_sh; a.q_st = p->q_st;
    a.k_sb = p->k_sb; a.k_sh = p->k_sh; a.k_st = p->k_st;
    a.v_sb = p->v_sb; a.v_sh = p->v_sh; a.v_st = p->v_st;
    a.o_sb = p->o_sb; a.o_sh = p->o_sh; a.o_st = p->o_st;
    a.m_sb = p->m_sb; a.m_sh = p->m_sh; a.m_st = p->m_st;
    a.scale = p->scale;
    a.causal = p->causal;

    /* f16/bf16 with D = Dv ≤ 160: the tensor-core kernel (any D; 16-byte loads when D % 8 == 0 and q, k, v
     * and their strides are 16-byte aligned). */
    const int tc_dc = tc_chunks(p->D);
    if (sizeof(T) == 2 && p->D == p->Dv && p->D <= ATT_TC_MAX_D &&
        tc_smem_bytes(tc_dc, tc_dc <= ATT_TC_TWO_MTILES_MAX_DC ? 2 : 1, ATT_TC_WARPS) <= (size_t)ctx->max_smem_optin) {
        const int64_t e = 8;
        const int vec = p->D % 8 == 0 && (uintptr_t)p->q % 16 == 0 && (uintptr_t)p->k % 16 == 0 &&
                        (uintptr_t)p->v % 16 == 0 && p->q_sb % e == 0 && p->q_sh % e == 0 && p->q_st % e == 0 &&
                        p->k_sb % e == 0 && p->k_sh % e == 0 && p->k_st % e == 0 && p->v_sb % e == 0 &&
                        p->v_sh % e == 0 && p->v_st % e == 0;
        return tc_dispatch<T>(ctx, a, vec);
    }
    const int kpl = (p->D <= 128 && p->Dv <= 128) ? 2 : 1;
    const bool fast = p->D % 8 == 0 && p->Dv % 8 == 0 && p->D <= 256 && p->Dv <= 256 &&
                      flash_smem_bytes(p->D, p->Dv, kpl) <= (size_t)ctx->max_smem_optin;
    if (fast) {
        /* 16-byte loads need every row start of q, k and v 16-byte aligned */
        const int64_t e = 16 / (int64_t)sizeof(T);
        const int vec = (uintptr_t)p->q % 16 == 0 && (uintptr_t)p->k % 16 == 0 && (uintptr_t)p->v % 16 == 0 &&
                        p->q_sb % e == 0 && p->q_sh % e == 0 && p->q_st % e == 0 && p->k_sb % e == 0 &&
                        p->k_sh % e == 0 && p->k_st % e == 0 && p->v_sb % e == 0 && p->v_sh % e == 0 &&
                        p->v_st % e == 0;
        return kpl == 2 ? flash_dispatch_nv<T, 2>(ctx, a, vec) : flash_dispatch_nv<T, 1>(ctx, a, vec);
    }
    const size_t smem = (size_t)ATT_GENERIC_WARPS * (size_t)(p->D + p->Dv + 32) * sizeof(float);
    if (smem > 48 * 1024) {
        if (smem > (size_t)ctx->max_smem_optin)
            return pea_fail(ctx, PEA_CUDA_ERROR_INVALID, "attention",
                            "head dims D %lld + Dv %lld need %zu bytes of shared memory; the device has %d",
                            (long long)p->D, (long long)p->Dv, smem, ctx->max_smem_optin);
        PEA_TRY(pea_check_cuda(ctx, "attention",
                               cudaFuncSetAttribute(attention_generic_kernel<T>,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                               "cudaFuncSetAttribute"));
    }
    dim3 grid((unsigned)((p->Tq + ATT_GENERIC_WARPS - 1) / ATT_GENERIC_WARPS), (unsigned)(p->B * p->H));
    PEA_KERNEL(ctx, "attention", attention_generic_kernel<T>, grid, 32 * ATT_GENERIC_WARPS, smem, a);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_attention(pea_cuda_context *ctx, int dtype, const ck_attention_params *p) {
    static const char *op = "attention";
    PEA_OP(ctx, op);
    PEA_REQUIRE_ATTENTION(ctx, op, dtype, p);
    if (p->B == 0 || p->H == 0 || p->Tq == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, p->B * p->H <= 65535, "B·H = %lld exceeds the grid's y limit (65535)",
                (long long)(p->B * p->H));
    PEA_REQUIRE(ctx, op, p->D <= 65536 && p->Dv <= 65536, "head dims D %lld, Dv %lld are too large",
                (long long)p->D, (long long)p->Dv);
    PEA_REQUIRE(ctx, op, p->q && p->out && (p->Tk == 0 || (p->k && p->v)), "NULL tensor (q %p, k %p, v %p, out %p)",
                (const void *)p->q, (const void *)p->k, (const void *)p->v, (const void *)p->out);
    return PEA_FLOAT_SWITCH(dtype, attention_launch, ctx, p);
}

