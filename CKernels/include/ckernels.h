/*
 * ckernels.h — the one C ABI of Pea's kernels (prefix ck_).
 *
 * The CPU reference kernels (CKernels/cpu/) implement it and link into the Swift package; the CUDA backend
 * (CKernels/cuda/) will expose the same operations on device pointers. Swift imports this header as the
 * module `CKernels`.
 *
 * Conventions
 *   - Tensors are contiguous and row-major unless strides are passed explicitly. Strides count elements.
 *   - Images are NCHW; sequences are [B, T, D].
 *   - f32 is the compute type. f16/bf16 are storage types, converted with ck_convert.
 *   - Functions that can fail on data (an out-of-range token id, say) return 0 on success and a negative
 *     CK_E* code otherwise. Shape validation is the caller's (Swift's) job: kernels trust their arguments.
 *   - Dimension legend used in the comments: B batch, C channels, H/W height/width, G groups, T tokens,
 *     D feature width, M/N/K the GEMM dimensions.
 */
#ifndef PEA_CKERNELS_H
#define PEA_CKERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------------------- */
/* Status codes                                                                                          */

enum {
    CK_OK = 0,
    CK_EINVAL = -1,      /* an argument that the kernel cannot honour (bad ISA name, …) */
    CK_ERANGE = -2,      /* a data value out of range (token id ≥ vocabulary size, …) */
    CK_ENOMEM = -3,
};

/* ---------------------------------------------------------------------------------------------------- */
/* Threads. One persistent pool shared by every kernel; the calling thread takes part. A kernel called
 * from inside a pool task (or while another thread holds the pool) runs single-threaded, never deadlocks. */

void ck_set_num_threads(int n);          /* n ≤ 0: the number of online CPUs */
int ck_get_num_threads(void);

/* fn(ctx, begin, end) is called on disjoint ranges covering [0, n), each at least `grain` long (but the
 * last). With one thread, or when nested, fn(ctx, 0, n) runs on the caller. */
typedef void (*ck_range_fn)(void *ctx, int64_t begin, int64_t end);
void ck_parallel_for(int64_t n, int64_t grain, ck_range_fn fn, void *ctx);

/* ---------------------------------------------------------------------------------------------------- */
/* GEMM (row-major, BLAS semantics)
 *
 *   C[b] = alpha · op(A[b]) · op(B[b]) + beta · C[b]      for b in [0, batch)
 *
 * op(A) is M×K: A is M×K with row stride lda (transA = 0) or K×M with row stride lda (transA = 1);
 * op(B) is K×N: B is K×N with row stride ldb (transB = 0) or N×K with row stride ldb (transB = 1).
 * C is M×N with row stride ldc. A[b] = A + b·strideA, likewise B and C (a stride of 0 broadcasts).
 * beta = 0 means C is not read (it may hold NaN), as in BLAS. */
void ck_sgemm(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha,
              const float *A, int64_t lda, const float *B, int64_t ldb,
              float beta, float *C, int64_t ldc);
void ck_sgemm_batched(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha,
                      const float *A, int64_t lda, int64_t strideA,
                      const float *B, int64_t ldb, int64_t strideB,
                      float beta, float *C, int64_t ldc, int64_t strideC, int64_t batch);

/* ck_sgemm with A and B each stored as CK_F32, CK_BF16 or CK_F16 (half-size weights; C is f32): a 16-bit
 * operand is widened to f32 as it is packed, which is exact, so the result is bit for bit ck_sgemm's on
 * f32 copies of the operands. CK_OK; CK_EINVAL for another type; CK_ENOMEM when a buffer for widening
 * cannot be allocated (C is then partly written). */
int ck_gemm_mixed(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha,
                  const void *A, int typeA, int64_t lda, const void *B, int typeB, int64_t ldb,
                  float beta, float *C, int64_t ldc);

/* One op(B) used by many products, packed once (attention's keys and values, shared by every block of
 * queries): ck_sgemm_pack_b packs the K×N op(B) into `packed` (ck_sgemm_packed_b_floats(K, N) floats, a
 * multiple of 16; 64-byte aligned; for the active kernel), and ck_sgemm_packed computes C = alpha·op(A)·B + beta·C from it, on the calling thread,
 * with the arithmetic of ck_sgemm's blocked path (ck_sgemm sends products under 32³ multiply-adds and single
 * rows down a direct loop instead, which sums in another order). Packing and products must see the same active kernel
 * (ck_gemm_set_kernel) and the same K and N. ck_sgemm_packed aborts if its A-packing buffer (a few hundred KB
 * per thread, kept) cannot be allocated. */
size_t ck_sgemm_packed_b_floats(int64_t K, int64_t N);
void ck_sgemm_pack_b(int transB, int64_t K, int64_t N, const float *B, int64_t ldb, float *packed);
void ck_sgemm_packed(int transA, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                     const float *packed_b, float beta, float *C, int64_t ldc);

/* The plain triple loop with the same contract: the reference the fast GEMM is tested against. */
void ck_sgemm_reference(int transA, int transB, int64_t M, int64_t N, int64_t K, float alpha,
                        const float *A, int64_t lda, const float *B, int64_t ldb,
                        float beta, float *C, int64_t ldc);

/* The SIMD path of the fast GEMM: "avx512", "avx2" (AVX2+FMA) or "portable" (plain C, any machine).
 * By default the best one the CPU supports is chosen at first use. ck_gemm_set_kernel forces one (for
 * tests and benchmarks); it returns CK_EINVAL for an unknown name or one the CPU cannot run. NULL restores
 * the automatic choice. */
const char *ck_gemm_kernel(void);
int ck_gemm_set_kernel(const char *name);

/* ---------------------------------------------------------------------------------------------------- */
/* Convolution (NCHW, cross-correlation as torch.nn.functional.conv2d, no groups, no dilation).
 *   x [B, Cin, H, W], w [Cout, Cin, kh, kw], bias [Cout] or NULL → y [B, Cout, Ho, Wo]
 *   Ho = (H + padTop + padBottom − kh) / strideH + 1, likewise Wo.
 * Implemented as im2col + GEMM; a 1×1, stride-1, unpadded convolution is a plain GEMM without a copy.
 * `workspace` holds ck_conv2d_workspace_floats(...) floats (0 for the 1×1 case; may be NULL then): the patches
 * are unrolled and multiplied a band of output rows at a time, each band at most 64 MB of floats (at least one row).
 * w is stored as w_type: CK_F32, CK_BF16 or CK_F16 (x, bias and y are f32). Returns ck_gemm_mixed's status. */
typedef struct {
    int64_t B, Cin, H, W, Cout, kh, kw;
    int64_t strideH, strideW;
    int64_t padTop, padBottom, padLeft, padRight;
} ck_conv2d_params;

int64_t ck_conv2d_out_h(const ck_conv2d_params *p);
int64_t ck_conv2d_out_w(const ck_conv2d_params *p);
int64_t ck_conv2d_workspace_floats(const ck_conv2d_params *p);
/* The band limit in floats (≤ 0: the default 16 Mi floats), process-wide: for tests, which make bands of one row. */
void ck_conv2d_set_band_floats(int64_t floats);
/* y = conv(x, w) + bias + residual; bias [Cout] and residual [B, Cout, Ho, Wo] may be NULL. */
int ck_conv2d_f32(const ck_conv2d_params *p, const float *x, const void *w, int w_type, const float *bias,
                  const float *residual, float *y, float *workspace);

/* ---------------------------------------------------------------------------------------------------- */
/* Normalisation and softmax                                                                            */

/* Group norm over x [B, C, S] (S = H·W), G groups of C/G channels: each (b, g) normalised by its mean
 * and biased variance, then y = γ[c]·x̂ + β[c] (γ, β may be NULL: 1 and 0). fuse_silu applies SiLU after. */
void ck_group_norm_f32(const float *x, const float *gamma, const float *beta, float *y,
                       int64_t B, int64_t C, int64_t S, int64_t G, float eps, int fuse_silu);

/* Layer norm over the last dimension: x [R, D] → y [R, D]; γ, β [D] or NULL. */
void ck_layer_norm_f32(const float *x, const float *gamma, const float *beta, float *y,
                       int64_t R, int64_t D, float eps);

/* Softmax over the last dimension: x [R, D] → y [R, D] (y may alias x). */
void ck_softmax_f32(const float *x, float *y, int64_t R, int64_t D);

/* ---------------------------------------------------------------------------------------------------- */
/* Scaled-dot-product attention, multi-head, f32 accumulation, online softmax over key tiles, so no
 * Tq×Tk score matrix is ever formed.
 *
 *   out[b,h,i,:] = Σ_j softmax_j( scale · q[b,h,i,:]·k[b,h,j,:] + mask[b,h,i,j] (+ −∞ where causal j > i) )
 *                  · v[b,h,j,:]
 *
 * Every tensor is addressed by element strides for (b, h, t); the feature axis is contiguous. So the same
 * kernel reads [B, H, T, D] tensors or the [B, T, H·D] layout that linear projections produce.
 * mask (additive, may be NULL) is addressed by strides (b, h, i) and is contiguous over j; a stride of 0
 * broadcasts. A row whose keys are all masked to −∞ yields zeros (torch yields NaN; we avoid NaNs). */
typedef struct {
    const float *q, *k, *v, *mask;
    float *out;
    int64_t B, H, Tq, Tk, D, Dv;
    int64_t q_sb, q_sh, q_st;
    int64_t k_sb, k_sh, k_st;
    int64_t v_sb, v_sh, v_st;
    int64_t o_sb, o_sh, o_st;
    int64_t m_sb, m_sh, m_st;
    float scale;
    int causal;
} ck_attention_params;

void ck_attention_f32(const ck_attention_params *p);

/* The gradients of ck_attention_f32's output with respect to q, k and v, given d_out (the gradient of out,
 * addressed by the o_* strides); dq, dk, dv are written with q, k, v's strides. No mask and not causal
 * (CK_EINVAL otherwise: the cases the training step needs). Blockwise: each (b, h) recomputes its scores
 * a block of query rows at a time in a per-thread buffer (kept across calls) of 2·128·Tk floats, at most
 * 4 MB unless a single row is longer, never a Tq×Tk matrix. Results do not depend on the number of threads.
 * CK_ENOMEM when that buffer cannot be allocated (the outputs are then partly written). */
int ck_attention_backward_f32(const ck_attention_params *p, const float *d_out, float *dq, float *dk, float *dv);

/* ---------------------------------------------------------------------------------------------------- */
/* Elementwise and data movement                                                                        */

/* The activations, one code each (pea_cuda.h's PEA_ACT_* are the same codes): gelu with erf, gelu's tanh
 * approximation, quick gelu x·σ(1.702x) (CLIP's), silu x·σ(x). Every kind but quick gelu has a backward (the
 * UNet does not use quick gelu). A new activation is a code here and a case in each kernel's switch (this
 * file's kernels, CKernels/cuda/elementwise.cu). */
enum { CK_ACT_GELU_ERF = 0, CK_ACT_GELU_TANH = 1, CK_ACT_QUICK_GELU = 2, CK_ACT_SILU = 3, CK_ACT_COUNT = 4 };
#define CK_ACT_HAS_BACKWARD(kind) ((kind) >= 0 && (kind) < CK_ACT_COUNT && (kind) != CK_ACT_QUICK_GELU)
/* y = f(x) for activation `kind` (y may alias x); CK_EINVAL for an unknown kind. */
int ck_activation_f32(int kind, const float *x, float *y, int64_t n);

/* GEGLU as diffusers: x [R, 2D] → y [R, D], y = x[:, :D] · gelu_erf(x[:, D:]). */
void ck_geglu_f32(const float *x, float *y, int64_t R, int64_t D);

/* y = alpha·x + beta (y may alias x). */
void ck_affine_f32(const float *x, float *y, int64_t n, float alpha, float beta);

/* Binary op with broadcasting: y[i] = a[i·as] ⊕ b[i·bs] over an index space `shape` of rank ≤ CK_MAX_RANK
 * with y contiguous; a stride of 0 broadcasts that axis. The op codes are pea_cuda_binary's too. */
#define CK_MAX_RANK 8
enum { CK_ADD = 0, CK_SUB = 1, CK_MUL = 2, CK_DIV = 3, CK_BINARY_COUNT = 4 };
void ck_binary_f32(int op, const float *a, const int64_t *a_strides, const float *b, const int64_t *b_strides,
                   float *y, const int64_t *shape, int rank);

/* Strided copy of elements of `elem_size` bytes: dst[idx·ds] = src[idx·ss] for every idx in `shape`
 * (rank ≤ CK_MAX_RANK). One kernel serves permute, concat, split and slicing. */
void ck_copy_strided(const void *src, const int64_t *src_strides, void *dst, const int64_t *dst_strides,
                     const int64_t *shape, int rank, int64_t elem_size);

/* Nearest-neighbour 2× upsampling: x [P, H, W] → y [P, 2H, 2W] (P = B·C). */
void ck_upsample_nearest2x_f32(const float *x, float *y, int64_t P, int64_t H, int64_t W);

/* Embedding lookup: y[i, :] = table[ids[i], :]; ids are int32 (ids_are_i64 = 0) or int64.
 * Returns CK_ERANGE (and leaves y partly written) when an id is negative or ≥ vocab. */
int ck_embedding_f32(const void *ids, int ids_are_i64, int64_t n, const float *table, int64_t vocab,
                     int64_t D, float *y);

/* Sinusoidal timestep embedding as diffusers' get_timestep_embedding:
 *   half = dim/2, freq_i = exp(−ln(max_period)·i / (half − shift)),  arg = scale · t · freq_i
 *   y = [sin(arg), cos(arg)]  (flip_sin_to_cos: [cos, sin]), zero-padded by one column when dim is odd. */
void ck_timestep_embedding_f32(const float *t, int64_t B, int64_t dim, int flip_sin_to_cos,
                               float downscale_freq_shift, float scale, float max_period, float *y);

/* Mean over the middle axis of x viewed as [outer, n, inner] → y [outer, inner]. */
void ck_mean_f32(const float *x, float *y, int64_t outer, int64_t n, int64_t inner);

/* ---------------------------------------------------------------------------------------------------- */
/* Backward (training the PEA adapter through the frozen UNet). The gradient rule, as llm.c: every output
 * here is overwritten (=), never accumulated. Only the data gradients the UNet needs, plus the parameter
 * gradients of the adapter's layer norm. Each recomputes what it needs from the forward's input (norm
 * statistics, activations) rather than keeping it from the forward pass.                                */

/* Data gradient of ck_conv2d_f32: dy [B, Cout, Ho, Wo], w [Cout, Cin, kh, kw] → dx [B, Cin, H, W]
 * (dx = col2im(wᵀ · dy), a plain GEMM for the 1×1, stride-1, unpadded case). `workspace`, w_type and the
 * status as for the forward. */
int ck_conv2d_backward_data_f32(const ck_conv2d_params *p, const float *dy, const void *w, int w_type, float *dx,
                                float *workspace);

/* Data gradient of ck_group_norm_f32 (γ may be NULL; β only matters with fuse_silu, for the SiLU's input):
 * dy, x [B, C, S] → dx [B, C, S]. The statistics are recomputed from x. */
void ck_group_norm_backward_f32(const float *dy, const float *x, const float *gamma, const float *beta,
                                float *dx, int64_t B, int64_t C, int64_t S, int64_t G, float eps, int fuse_silu);

/* Gradients of ck_layer_norm_f32: dy, x [R, D] → dx [R, D]; dgamma, dbeta [D] (either may be NULL) are the
 * sums over rows of dy·x̂ and dy. γ may be NULL (1). */
void ck_layer_norm_backward_f32(const float *dy, const float *x, const float *gamma, float *dx,
                                float *dgamma, float *dbeta, int64_t R, int64_t D, float eps);

/* Softmax backward from the forward's output: y, dy [R, D] → dx = y ⊙ (dy − Σ_j dy_j·y_j) per row. */
void ck_softmax_backward_f32(const float *dy, const float *y, float *dx, int64_t R, int64_t D);

/* dx = dy·f'(x) for activation `kind`, from the forward's input x; CK_EINVAL for a kind without a backward. */
int ck_activation_backward_f32(int kind, const float *dy, const float *x, float *dx, int64_t n);

/* GEGLU backward: x [R, 2D], dy [R, D] → dx [R, 2D] (dx[:, :D] = dy·gelu(g), dx[:, D:] = dy·a·gelu'(g)). */
void ck_geglu_backward_f32(const float *dy, const float *x, float *dx, int64_t R, int64_t D);

/* Nearest 2× upsampling backward: dy [P, 2H, 2W] → dx [P, H, W], each dx the sum of its 2×2 block. */
void ck_upsample_nearest2x_backward_f32(const float *dy, float *dx, int64_t P, int64_t H, int64_t W);

/* ---------------------------------------------------------------------------------------------------- */
/* torch.optim.AdamW's update of one f32 tensor of n values, in place (Training/AdamW.swift forms the scalars):
 *   p ← p · decay;  m ← lerp(m, g, weight1);  v ← fma(weight2·g, g, v·keep2);
 *   p ← p + (step_size·m) / (√v / correction2_root + eps)
 * where lerp(a, b, w) = fma(w, b − a, a) for w < 0.5, else fma(w − 1, b − a, b) (torch's, fused). Only those
 * two fmas are fused; every other operation is rounded on its own, as torch's CPU kernels do. */
typedef struct {
    float decay, weight1, keep2, weight2, step_size, correction2_root, eps;
} ck_adamw_hyper;
void ck_adamw_f32(float *p, float *m, float *v, const float *g, int64_t n, const ck_adamw_hyper *h);
/* Σ x[i]² over n f32 values, in f64: blocks of CK_SUM_SQUARES_BLOCK values, each summed in a fixed order (four
 * interleaved f64 partials: value i of the block goes to partial i mod 4, the tail past the last multiple of 4
 * to partial 0; block sum = (s0 + s1) + (s2 + s3)), the block sums added in index order, no FMAs, so the result
 * does not depend on the thread count (or the device: pea_cuda_sum_squares gives the same bits). Non-finite iff
 * some x[i] is (f32 squares cannot overflow f64). */
enum { CK_SUM_SQUARES_BLOCK = 4096 };
double ck_sum_squares_f32(const float *x, int64_t n);

/* ---------------------------------------------------------------------------------------------------- */
/* Storage conversions. f16 is IEEE binary16, bf16 the top half of binary32; f32 → f16/bf16 rounds to
 * nearest even (as torch's .half() / .bfloat16()); NaN stays NaN. Integer → f32 converts the value. */
enum { CK_F32 = 0, CK_F16 = 1, CK_BF16 = 2, CK_I32 = 3, CK_I64 = 4 };
int ck_convert(const void *src, int src_type, void *dst, int dst_type, int64_t n);

#ifdef __cplusplus
}
#endif
#endif /* PEA_CKERNELS_H */
