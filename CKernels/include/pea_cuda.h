/*
 * pea_cuda.h — the C ABI of the CUDA backend library (libpea_cuda.so, built by nvcc from CKernels/cuda/;
 * libpea_cuda_emu.so, the same sources built by the host C++ compiler against CKernels/emu/).
 *
 * The Swift CUDABackend loads one of the two with dlopen and resolves every symbol below by name, so this
 * header is the whole contract between them; it mirrors ckernels.h's CPU kernels op for op, so the two
 * backends compute the same things with the same shape conventions (see ckernels.h for each op's meaning).
 *
 * Conventions
 *   - Every function returns PEA_CUDA_OK (0) or an error code; pea_cuda_last_error(ctx) then gives a message
 *     that names the op and the CUDA/cuBLAS error ("group_norm: cudaErrorInvalidConfiguration …").
 *   - All pointers to tensor data are device pointers from pea_cuda_alloc, except the host buffers of
 *     pea_cuda_upload/download. Work is queued on the context's one stream, in order; nothing waits for the
 *     GPU except pea_cuda_download and pea_cuda_synchronize.
 *   - `dtype` is CK_F32, CK_F16 or CK_BF16 (ckernels.h): the storage type of the float tensors of the call
 *     (inputs and outputs alike); arithmetic accumulates in f32. Parameters the kernels only read as
 *     parameters (norm weights, biases, masks) have the same dtype as the data. Ids are CK_I32 or CK_I64.
 *   - Strides and shapes are in elements, int64.
 */
#ifndef PEA_CUDA_H
#define PEA_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "ckernels.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
    PEA_CUDA_OK = 0,
    PEA_CUDA_ERROR_NO_DEVICE = 1,     /* no driver or no device: the backend is unavailable */
    PEA_CUDA_ERROR_OUT_OF_MEMORY = 2,
    PEA_CUDA_ERROR_INVALID = 3,       /* an argument the op cannot take (shape, dtype, null pointer) */
    PEA_CUDA_ERROR_KERNEL = 4,        /* a failed launch or a CUDA/cuBLAS error */
};

/* The ABI version this header describes; the Swift side refuses a library reporting another. */
#define PEA_CUDA_ABI_VERSION 4
int pea_cuda_abi_version(void);

typedef struct pea_cuda_context pea_cuda_context;

/* --- context ------------------------------------------------------------------------------------------ */

/* Opens `device` (0 for the first), creates the stream and the cuBLAS handle. On failure *out is NULL and
 * `message` (of `message_size` bytes) says why, e.g. "no CUDA device (cudaGetDeviceCount: …)". */
int pea_cuda_create(int device, pea_cuda_context **out, char *message, size_t message_size);
void pea_cuda_destroy(pea_cuda_context *ctx);
/* The message of the last failed call on this context (empty when none). Valid until the next call. */
const char *pea_cuda_last_error(pea_cuda_context *ctx);
/* Device name and compute capability, e.g. "NVIDIA H100 80GB HBM3", 9, 0. */
int pea_cuda_device_info(pea_cuda_context *ctx, char *name, size_t name_size, int *major, int *minor,
                         size_t *total_memory);
/* TF32 tensor cores for f32 GEMMs (default off: f32 GEMMs are exact f32). */
int pea_cuda_set_tf32(pea_cuda_context *ctx, int enabled);

/* --- memory (a caching allocator: freed blocks are kept for reuse, so steady-state generation does no
 *     cudaMalloc/cudaFree) ----------------------------------------------------------------------------- */

int pea_cuda_alloc(pea_cuda_context *ctx, size_t bytes, void **out);
int pea_cuda_free(pea_cuda_context *ctx, void *ptr);             /* returns the block to the cache */
int pea_cuda_release_cache(pea_cuda_context *ctx);               /* cudaFree every cached block */
/* Bytes currently handed out, the most ever handed out, and the number of cudaMalloc calls so far. */
int pea_cuda_memory_stats(pea_cuda_context *ctx, size_t *in_use, size_t *peak, uint64_t *device_allocations);
/* Host → device (may return before the copy ends; `src` may be reused at once: it is staged). */
int pea_cuda_upload(pea_cuda_context *ctx, void *dst, const void *src, size_t bytes);
/* Device → host; waits for all queued work first. */
int pea_cuda_download(pea_cuda_context *ctx, void *dst, const void *src, size_t bytes);
int pea_cuda_zero(pea_cuda_context *ctx, void *ptr, size_t bytes);
int pea_cuda_synchronize(pea_cuda_context *ctx);

/* --- device timing (benchmarks: pea bench kernels) ------------------------------------------------------
 * Records CUDA events on the context's stream so a benchmark can time queued work by the GPU's clock rather
 * than the host's. The context owns PEA_CUDA_TIMER_SLOTS events, created on first use. */
enum { PEA_CUDA_TIMER_SLOTS = 4 };
/* Records event `slot` (0 … PEA_CUDA_TIMER_SLOTS − 1) on the stream, after all work queued so far. */
int pea_cuda_timer_record(pea_cuda_context *ctx, int slot);
/* *ms = the GPU time between two recorded slots (start recorded before end); waits for `end_slot` first. */
int pea_cuda_timer_elapsed(pea_cuda_context *ctx, int start_slot, int end_slot, float *ms);
/* Queues a one-thread kernel that busy-waits `microseconds` (clock64 cycles at the device's clock rate,
 * cudaDevAttrClockRate), holding the stream so the host can queue what follows before it starts. */
int pea_cuda_spin(pea_cuda_context *ctx, double microseconds);

/* --- per-op profile (pea bench unet|train-step --profile) ------------------------------------------------
 * While a profile runs, each op call (the functions below, and upload/download) is bracketed by two CUDA
 * events on the stream: the GPU time between them is the time of the work that call queued. Calls are summed
 * per op name. A call made inside another (none are today) counts towards the outer one only. */
typedef struct {
    const char *op; /* the op's name, as in its error messages ("conv2d", "attention", …); static storage */
    uint64_t calls;
    double ms; /* GPU milliseconds, summed over the calls */
} pea_cuda_profile_entry;
/* Clears the totals and starts recording (a profile already running is restarted). */
int pea_cuda_profile_start(pea_cuda_context *ctx);
/* Waits for the recorded work, stops recording and writes up to `capacity` entries, largest time first;
 * *count = the number of ops seen (may exceed capacity), *span_ms = the GPU time from the first call's start
 * to the last call's end (0 when no call was recorded). Idle gaps between calls are in the span, not in the
 * entries: span − Σ entries is the time the GPU waited for the host. */
int pea_cuda_profile_stop(pea_cuda_context *ctx, pea_cuda_profile_entry *entries, int capacity, int *count,
                          double *span_ms);

/* --- CUDA graphs (the denoising loop: a UNet evaluation captured once, replayed every step) ----------------
 * pea_cuda_graph_begin starts capturing the stream: the ops called until pea_cuda_graph_end are recorded with
 * their arguments, not run (their outputs are allocated but not computed), and pea_cuda_graph_replay runs the
 * recording again, reading whatever its input buffers hold then (copy new inputs into them first; per-step
 * scalars must live in device memory, e.g. the timestep tensor). Memory: blocks allocated or freed during the
 * capture belong to the graph until it is destroyed, so no other tensor gets them while replays write them;
 * allocations during the capture must come from the cache (a capture cannot cudaMalloc): run the same work once
 * without capture first. During a capture, upload, download, synchronize and release_cache fail, and a failed
 * op fails the capture: pea_cuda_graph_end must still be called; it ends the capture and returns the first
 * failure's message. The profile counts a replay as one "graph_replay" call. */
typedef struct pea_cuda_graph pea_cuda_graph;
int pea_cuda_graph_begin(pea_cuda_context *ctx);
/* Ends the capture: *graph is the instantiated graph, or NULL on failure (nothing is kept). */
int pea_cuda_graph_end(pea_cuda_context *ctx, pea_cuda_graph **graph);
int pea_cuda_graph_replay(pea_cuda_context *ctx, pea_cuda_graph *graph);
/* Frees the graph; its blocks go back to the cache (live ones when they are freed). NULL is a no-op. */
int pea_cuda_graph_destroy(pea_cuda_context *ctx, pea_cuda_graph *graph);

/* --- ops (each mirrors its ckernels.h counterpart) ----------------------------------------------------- */

/* C[b] = alpha·op(A[b])·op(B[b]) + beta·C[b], row-major, as ck_sgemm_batched (stride 0 broadcasts; beta = 0
 * does not read C). Through cuBLAS; f16/bf16 accumulate in f32. */
int pea_cuda_gemm(pea_cuda_context *ctx, int dtype, int transA, int transB, int64_t M, int64_t N, int64_t K,
                  float alpha, const void *A, int64_t lda, int64_t strideA, const void *B, int64_t ldb,
                  int64_t strideB, float beta, void *C, int64_t ldc, int64_t strideC, int64_t batch);
/* y = x · weightᵀ + bias + residual (bias and residual may be NULL): x [rows, in], weight [out, in], residual
 * [rows, out] like y. Bias and residual fused into the epilogue (the residual as cuBLASLt's C, beta = 1). */
int pea_cuda_linear(pea_cuda_context *ctx, int dtype, const void *x, const void *weight, const void *bias,
                    const void *residual, void *y, int64_t rows, int64_t in_features, int64_t out_features);
/* As ck_conv2d_f32 (NCHW, asymmetric padding), plus residual (may be NULL; [B, Cout, Ho, Wo] like y) added
 * after the bias. f16/bf16 1×1 and 3×3 kernels: an implicit GEMM on the tensor cores, bias and residual in its
 * epilogue; otherwise im2col + cuBLAS, the im2col workspace owned by the context and reused. */
int pea_cuda_conv2d(pea_cuda_context *ctx, int dtype, const ck_conv2d_params *p, const void *x, const void *w,
                    const void *bias, const void *residual, void *y);
int pea_cuda_group_norm(pea_cuda_context *ctx, int dtype, const void *x, const void *gamma, const void *beta,
                        void *y, int64_t B, int64_t C, int64_t S, int64_t G, float eps, int fuse_silu);
int pea_cuda_layer_norm(pea_cuda_context *ctx, int dtype, const void *x, const void *gamma, const void *beta,
                        void *y, int64_t R, int64_t D, float eps);
int pea_cuda_softmax(pea_cuda_context *ctx, int dtype, const void *x, void *y, int64_t R, int64_t D);
/* As ck_attention_f32 (strided q/k/v/out/mask, scale, causal); p's float pointers are device pointers of
 * `dtype` (cast through void). Fused, flash-attention style: no Tq×Tk matrix in global memory. */
int pea_cuda_attention(pea_cuda_context *ctx, int dtype, const ck_attention_params *p);
/* The activation kinds are ckernels.h's (CK_ACT_*), named here as the ABI has always named them. */
enum {
    PEA_ACT_GELU_ERF = CK_ACT_GELU_ERF,
    PEA_ACT_GELU_TANH = CK_ACT_GELU_TANH,
    PEA_ACT_QUICK_GELU = CK_ACT_QUICK_GELU,
    PEA_ACT_SILU = CK_ACT_SILU,
};
int pea_cuda_activation(pea_cuda_context *ctx, int dtype, int kind, const void *x, void *y, int64_t n);
int pea_cuda_geglu(pea_cuda_context *ctx, int dtype, const void *x, void *y, int64_t R, int64_t D);
int pea_cuda_affine(pea_cuda_context *ctx, int dtype, const void *x, void *y, int64_t n, float alpha, float beta);
int pea_cuda_binary(pea_cuda_context *ctx, int dtype, int op, const void *a, const int64_t *a_strides,
                    const void *b, const int64_t *b_strides, void *y, const int64_t *shape, int rank);
/* Strided copy of any element size (permute, concat, split). Strides/shape are host arrays. */
int pea_cuda_copy_strided(pea_cuda_context *ctx, const void *src, const int64_t *src_strides, void *dst,
                          const int64_t *dst_strides, const int64_t *shape, int rank, int64_t elem_size);
int pea_cuda_upsample_nearest2x(pea_cuda_context *ctx, int dtype, const void *x, void *y, int64_t P, int64_t H,
                                int64_t W);
/* Ids out of range are an error reported by the call that waits next (the check runs on the device). */
int pea_cuda_embedding(pea_cuda_context *ctx, int dtype, const void *ids, int ids_are_i64, int64_t n,
                       const void *table, int64_t vocab, int64_t D, void *y);
/* t is `t_dtype` (any CK_ type), y is `dtype`. */
int pea_cuda_timestep_embedding(pea_cuda_context *ctx, int dtype, const void *t, int t_dtype, int64_t B,
                                int64_t dim, int flip_sin_to_cos, float downscale_freq_shift, float scale,
                                float max_period, void *y);
int pea_cuda_mean(pea_cuda_context *ctx, int dtype, const void *x, void *y, int64_t outer, int64_t n,
                  int64_t inner);
int pea_cuda_convert(pea_cuda_context *ctx, const void *src, int src_dtype, void *dst, int dst_dtype, int64_t n);

/* --- backward ops (each mirrors its ckernels.h counterpart; outputs overwritten, f32 accumulation) ------ */
int pea_cuda_conv2d_backward_data(pea_cuda_context *ctx, int dtype, const ck_conv2d_params *p, const void *dy,
                                  const void *w, void *dx);
int pea_cuda_group_norm_backward(pea_cuda_context *ctx, int dtype, const void *dy, const void *x,
                                 const void *gamma, const void *beta, void *dx, int64_t B, int64_t C, int64_t S,
                                 int64_t G, float eps, int fuse_silu);
/* dgamma/dbeta (either may be NULL) are `dtype` like the rest. */
int pea_cuda_layer_norm_backward(pea_cuda_context *ctx, int dtype, const void *dy, const void *x,
                                 const void *gamma, void *dx, void *dgamma, void *dbeta, int64_t R, int64_t D,
                                 float eps);
int pea_cuda_softmax_backward(pea_cuda_context *ctx, int dtype, const void *dy, const void *y, void *dx,
                              int64_t R, int64_t D);
/* kind: PEA_ACT_GELU_ERF, PEA_ACT_GELU_TANH or PEA_ACT_SILU. */
int pea_cuda_activation_backward(pea_cuda_context *ctx, int dtype, int kind, const void *dy, const void *x,
                                 void *dx, int64_t n);
int pea_cuda_geglu_backward(pea_cuda_context *ctx, int dtype, const void *dy, const void *x, void *dx, int64_t R,
                            int64_t D);
int pea_cuda_upsample_nearest2x_backward(pea_cuda_context *ctx, int dtype, const void *dy, void *dx, int64_t P,
                                         int64_t H, int64_t W);
/* The gradients of pea_cuda_attention with mask NULL and causal 0 (the only case accepted; anything else is
 * PEA_CUDA_ERROR_INVALID), head dims D, Dv ≤ PEA_CUDA_ATTENTION_BACKWARD_MAX_D: given dout (the gradient of its output, read through p's out
 * strides; p->out itself is not read), writes dq, dk, dv through p's q, k and v strides. FlashAttention-2 style
 * (attention_backward.cu): the softmax is recomputed per tile from a per-row log-sum-exp, so no Tq×Tk matrix
 * is formed; deterministic (no atomics). With Tk = 0, dq = 0; with Tq = 0, dk = dv = 0. */
#define PEA_CUDA_ATTENTION_BACKWARD_MAX_D 160
int pea_cuda_attention_backward(pea_cuda_context *ctx, int dtype, const ck_attention_params *p, const void *dout,
                                void *dq, void *dk, void *dv);

/* --- optimizer (the adapter's AdamW, f32 only) ---------------------------------------------------------- */

/* p_out, m_out, v_out = ck_adamw_f32's update of p, m, v by g (n values each; the outputs may be the inputs),
 * bit for bit: the same two fmas, every other operation rounded on its own. */
int pea_cuda_adamw(pea_cuda_context *ctx, const float *p, const float *m, const float *v, const float *g,
                   float *p_out, float *m_out, float *v_out, int64_t n, const ck_adamw_hyper *h);
/* *sum = ck_sum_squares_f32(x, n) bit for bit (the same blocks and order, in f64); waits for the result. */
int pea_cuda_sum_squares(pea_cuda_context *ctx, const float *x, int64_t n, double *sum);

/* --- collectives (NCCL, loaded at run time) -------------------------------------------------------------- */

/* The library never links NCCL: it dlopens `library` (a path; NULL: $PEA_NCCL_LIB, else libnccl.so.2, which the
 * nvidia-nccl-cu12/cu13 wheels ship) on first use; NO_DEVICE when it cannot (the caller falls back to MPI). */
#define PEA_CUDA_NCCL_ID_BYTES 128
/* A new communicator's id (ncclGetUniqueId), PEA_CUDA_NCCL_ID_BYTES bytes: rank 0 makes it, every rank gets it. */
int pea_cuda_nccl_unique_id(pea_cuda_context *ctx, const char *library, unsigned char *id);
/* Joins the communicator `id` names as `rank` of `ranks` on ctx's device (ncclCommInitRank; every rank calls it). */
int pea_cuda_nccl_init(pea_cuda_context *ctx, const char *library, const unsigned char *id, int ranks, int rank);
/* The sum over the communicator's ranks of n f32 values at x (device memory), in place, ordered after the ops
 * queued on ctx's stream; returns when it is done. */
int pea_cuda_nccl_allreduce_sum_f32(pea_cuda_context *ctx, float *x, int64_t n);

/* --- the function list ------------------------------------------------------------------------------------ */

/* Every function above, once: REQUIRED(name) for those a loader refuses a library without (context, memory),
 * OPTIONAL(name) for those a library built before they existed may lack (its ops are then unsupported). The
 * loaders bind from this list and nothing else: the Swift CUDALibrary through pea_cuda_function_name
 * (CKernels/abi/pea_cuda_functions.c), tests/test_ops.cpp directly, and test_ops fails when a function on it
 * is never called by a test. A new function goes into this list and the header above, nowhere else. */
#define PEA_CUDA_FUNCTIONS(REQUIRED, OPTIONAL)                                                              \
    REQUIRED(pea_cuda_abi_version) REQUIRED(pea_cuda_create) REQUIRED(pea_cuda_destroy)                    \
    REQUIRED(pea_cuda_last_error) REQUIRED(pea_cuda_alloc) REQUIRED(pea_cuda_free) REQUIRED(pea_cuda_upload) \
    REQUIRED(pea_cuda_download) REQUIRED(pea_cuda_synchronize)                                               \
    OPTIONAL(pea_cuda_device_info) OPTIONAL(pea_cuda_set_tf32) OPTIONAL(pea_cuda_release_cache)              \
    OPTIONAL(pea_cuda_memory_stats) OPTIONAL(pea_cuda_zero) OPTIONAL(pea_cuda_timer_record)                  \
    OPTIONAL(pea_cuda_timer_elapsed) OPTIONAL(pea_cuda_spin) OPTIONAL(pea_cuda_profile_start)                \
    OPTIONAL(pea_cuda_profile_stop) OPTIONAL(pea_cuda_graph_begin) OPTIONAL(pea_cuda_graph_end)              \
    OPTIONAL(pea_cuda_graph_replay) OPTIONAL(pea_cuda_graph_destroy)                                         \
    OPTIONAL(pea_cuda_gemm) OPTIONAL(pea_cuda_linear) OPTIONAL(pea_cuda_conv2d) OPTIONAL(pea_cuda_group_norm) \
    OPTIONAL(pea_cuda_layer_norm) OPTIONAL(pea_cuda_softmax) OPTIONAL(pea_cuda_attention)                    \
    OPTIONAL(pea_cuda_activation) OPTIONAL(pea_cuda_geglu) OPTIONAL(pea_cuda_affine) OPTIONAL(pea_cuda_binary) \
    OPTIONAL(pea_cuda_copy_strided) OPTIONAL(pea_cuda_upsample_nearest2x) OPTIONAL(pea_cuda_embedding)        \
    OPTIONAL(pea_cuda_timestep_embedding) OPTIONAL(pea_cuda_mean) OPTIONAL(pea_cuda_convert)                 \
    OPTIONAL(pea_cuda_conv2d_backward_data) OPTIONAL(pea_cuda_group_norm_backward)                           \
    OPTIONAL(pea_cuda_layer_norm_backward) OPTIONAL(pea_cuda_softmax_backward)                               \
    OPTIONAL(pea_cuda_activation_backward) OPTIONAL(pea_cuda_geglu_backward)                                 \
    OPTIONAL(pea_cuda_upsample_nearest2x_backward) OPTIONAL(pea_cuda_attention_backward)                   \
    OPTIONAL(pea_cuda_adamw) OPTIONAL(pea_cuda_sum_squares)                                                \
    OPTIONAL(pea_cuda_nccl_unique_id) OPTIONAL(pea_cuda_nccl_init) OPTIONAL(pea_cuda_nccl_allreduce_sum_f32)

/* The name of function `index` of PEA_CUDA_FUNCTIONS (NULL past the end) and, in *required, whether it is
 * required. Compiled into the Swift package (which never links the library itself), so the Swift loader binds
 * from the same list; not exported by the library. */
const char *pea_cuda_function_name(int index, int *required);

#ifdef __cplusplus
}
#endif

#endif /* PEA_CUDA_H */
