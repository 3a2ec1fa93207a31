/*
 * attention.c — multi-head scaled-dot-product attention with an online softmax ("flash" order).
 *
 *   out[b,h,i,:] = Σ_j p_ij · v[b,h,j,:],   p_ij = softmax_j(scale · q_i·k_j + mask_ij), −∞ where causal j > i
 *
 * Work unit: one query tile of QT rows of one (b, h). For each key tile of KT keys the unit computes the
 * QT×KT score tile with a GEMM, folds it into a running row maximum m, row sum l and output accumulator
 * acc (rescaling both by exp(m_old − m_new)), and moves on; out = acc / l at the end. Memory per unit is
 * O(QT·(KT + Dv)), never O(Tq·Tk). Tiles nest their GEMMs inside a pool task, so those run single-threaded
 * while the pool spreads units over cores.
 */
#include "ckernels.h"

#include <math.h>
#include <stdlib.h>

enum { QT = 64, KT = 256 };

typedef struct {
    const ck_attention_params *p;
    int64_t q_tiles;
} attention_ctx;

static void attention_units(void *arg, int64_t begin, int64_t end) {
    const attention_ctx *ctx = arg;
    const ck_attention_params *p = ctx->p;
    float *scores = malloc(sizeof(float) * QT * KT);
    float *acc = malloc(sizeof(float) * QT * (size_t)p->Dv);
    float *row_max = malloc(sizeof(float) * QT);
    float *row_sum = malloc(sizeof(float) * QT);
    if (!scores || !acc || !row_max || !row_sum) abort();   /* a few hundred KB: treat as fatal */

    for (int64_t u = begin; u < end; u++) {
        const int64_t bh = u / ctx->q_tiles, tile = u % ctx->q_tiles;
        const int64_t b = bh / p->H, h = bh % p->H;
        const int64_t i0 = tile * QT;
        const int64_t rows = p->Tq - i0 < QT ? p->Tq - i0 : QT;
        const float *q = p->q + b * p->q_sb + h * p->q_sh + i0 * p->q_st;
        const float *k = p->k + b * p->k_sb + h * p->k_sh;
        const float *v = p->v + b * p->v_sb + h * p->v_sh;
        const float *mask = p->mask ? p->mask + b * p->m_sb + h * p->m_sh + i0 * p->m_st : NULL;

        for (int64_t r = 0; r < rows; r++) { row_max[r] = -INFINITY; row_sum[r] = 0.0f; }
        for (int64_t x = 0; x < rows * p->Dv; x++) acc[x] = 0.0f;

        /* with a causal mask, keys past the tile's last query row contribute nothing */
        const int64_t key_end = p->causal ? (i0 + rows < p->Tk ? i0 + rows : p->Tk) : p->Tk;
        for (int64_t j0 = 0; j0 < key_end; j0 += KT) {
            const int64_t cols = key_end - j0 < KT ? key_end - j0 : KT;
            /* scores (rows × cols) = scale · q_tile · k_tileᵀ */
            ck_sgemm(0, 1, rows, cols, p->D, p->scale, q, p->q_st, k + j0 * p->k_st, p->k_st, 0.0f, scores, cols);
            for (int64_t r = 0; r < rows; r++) {
                float *s = scores + r * cols;
                if (mask) {
                    const float *m = mask + r * p->m_st + j0;
                    for (int64_t c = 0; c < cols; c++) s[c] += m[c];
                }
                if (p->causal) {
                    for (int64_t c = (i0 + r + 1) - j0 < 0 ? 0 : (i0 + r + 1) - j0; c < cols; c++) s[c] = -INFINITY;
                }
                float tile_max = -INFINITY;
                for (int64_t c = 0; c < cols; c++) tile_max = s[c] > tile_max ? s[c] : tile_max;
                const float new_max = tile_max > row_max[r] ? tile_max : row_max[r];
                if (new_max == -INFINITY) {            /* everything so far masked: nothing to add */
                    for (int64_t c = 0; c < cols; c++) s[c] = 0.0f;
                    continue;
                }
                const float correction = expf(row_max[r] - new_max);   /* exp(−∞) = 0 on the first tile */
                float sum = 0.0f;
                for (int64_t c = 0; c < cols; c++) { s[c] = expf(s[c] - new_max); sum += s[c]; }
                row_sum[r] = row_sum[r] * correction + sum;
                row_max[r] = new_max;
                float *a = acc + r * p->Dv;
                if (correction != 1.0f)
                    for (int64_t d = 0; d < p->Dv; d++) a[d] *= correction;
            }
            /* acc (rows × Dv) += p_tile (rows × cols) · v_tile (cols × Dv) */
            ck_sgemm(0, 0, rows, p->Dv, cols, 1.0f, scores, cols, v + j0 * p->v_st, p->v_st, 1.0f, acc, p->Dv);
        }

        float *out = p->out + b * p->o_sb + h * p->o_sh + i0 * p->o_st;
        for (int64_t r = 0; r < rows; r++) {
            const float inv = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;   /* fully masked row → zeros */
            for (int64_t d = 0; d < p->Dv; d++) out[r * p->o_st + d] = acc[r * p->Dv + d] * inv;
        }
    }
    free(scores);
    free(acc);
    free(row_max);
    free(row_sum);
}

void ck_attention_f32(const ck_attention_params *p) {
    attention_ctx ctx = {p, (p->Tq + QT - 1) / QT};
    ck_parallel_for(p->B * p->H * ctx.q_tiles, 1, attention_units, &ctx);
}
