/*
 * internal.h — what the .cu files of the CUDA backend share (not part of the ABI; pea_cuda.h is):
 *   - the context (one device, one stream, one cuBLAS handle, the allocator, the conv2d workspace, the
 *     device-side error record),
 *   - error reporting: every failure becomes a PEA_CUDA_ERROR_* code plus a message that names the op,
 *   - the launch macro PEA_KERNEL (PEA_LAUNCH + cudaGetLastError, turned into an error naming the op),
 *   - device helpers: f32/f16/bf16 loads and stores through f32, 4- and 8-wide vector loads, warp reductions.
 *
 * Every .cu file is built twice: by nvcc for the GPU (make cuda) and by the host C++ compiler against the
 * SIMT emulator (make cuda-emu; CKernels/emu/README.md). Nothing here branches on which build it is.
 *
 * Dimension legend (as ckernels.h): B batch, C channels, H/W height/width, G groups, T tokens, D feature
 * width, M/N/K the GEMM dimensions, R rows, S spatial size H·W.
 */
#ifndef PEA_CUDA_INTERNAL_H
#define PEA_CUDA_INTERNAL_H

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "../emu/pea_simt.h"
#include "../include/pea_cuda.h"

#define PEA_FULL_MASK 0xffffffffu

/* ---------------------------------------------------------------------------------------------------- */
/* The context                                                                                           */

struct pea_allocator; /* allocator.cu: the caching allocator */
struct pea_graph_pool; /* allocator.cu: the blocks a CUDA graph owns */
struct pea_stager;    /* allocator.cu: pinned staging buffers for uploads */

/* Written by the first device thread that finds bad data (today: an embedding id out of range); read and
 * cleared by the host at the next synchronising call (pea_cuda_download, pea_cuda_synchronize). */
struct pea_device_error {
    int flag;        /* 0: no error; the first failing thread sets 1 with atomicCAS and fills the rest */
    int op;          /* PEA_DEVERR_* */
    long long value; /* the offending value (the id) */
    long long index; /* its position (in ids) */
    long long limit; /* the bound it broke (vocab) */
};
enum { PEA_DEVERR_NONE = 0, PEA_DEVERR_EMBEDDING = 1 };

struct pea_profile; /* profile.cu */

/* A linear layer's cublasLtMatmul, planned once per problem (gemm.cu): the descriptors and the algo the
 * heuristic picked for (dtype, TF32, rows, in, out) and the alignments of x, weight, y and the residual (C; 0
 * without one: C is y, unread) it was told. */
struct pea_lt_key {
    int dtype, tf32;
    int64_t rows, in, out;
    uint32_t align_x, align_w, align_y, align_r;
    bool operator==(const pea_lt_key &o) const {
        return dtype == o.dtype && tf32 == o.tf32 && rows == o.rows && in == o.in && out == o.out &&
               align_x == o.align_x && align_w == o.align_w && align_y == o.align_y && align_r == o.align_r;
    }
};
struct pea_lt_plan {
    int used;
    pea_lt_key key;
    int supported; /* 0: the heuristic found no algo (the caller falls back to bias prefill + GEMM) */
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, ld;
    cublasLtMatmulAlgo_t algo;
};
enum { PEA_LT_PLANS = 64 }; /* SD-sized UNets have about 20 linear shapes per resolution and batch */

struct pea_cuda_context {
    int device;
    cudaStream_t stream; /* every op is queued here, in order (non-blocking w.r.t. the legacy stream) */
    cublasHandle_t cublas;
    cublasLtHandle_t cublaslt; /* linear with bias: the bias epilogue of cublasLtMatmul */
    void *lt_workspace;        /* cublasLtMatmul's workspace (PEA_LT_WORKSPACE_BYTES, from the allocator on first use) */
    pea_lt_plan lt_plans[PEA_LT_PLANS]; /* reused round-robin once full */
    int lt_next;
    int tf32; /* pea_cuda_set_tf32 */
    int sm_count;
    int max_smem_optin; /* cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes */
    char device_name[256];
    int major, minor;
    size_t total_memory;
    char message[1024]; /* pea_cuda_last_error */

    pea_allocator *alloc;
    pea_stager *stager;

    /* conv2d's im2col workspace: grown through the allocator when a call needs more, never per call */
    void *workspace;
    size_t workspace_bytes;
    size_t workspace_limit; /* the most conv2d unrolls at once (PEA_CUDA_CONV_WORKSPACE_BYTES, default 256 MB) */
    int conv_index64;       /* im2col/col2im always in 64-bit indices (PEA_CUDA_CONV_INDEX64=1; tests reach that
                               path with it, as real tensors need 2³¹ elements to) */

    pea_device_error *d_error; /* device record */
    pea_device_error *h_error; /* pinned host mirror */
    int error_check_pending;   /* a kernel that may set d_error ran since the last check */

    /* device timing (pea_cuda_timer_*, pea_cuda_spin): events created on first use, the SM clock in kHz */
    cudaEvent_t timers[PEA_CUDA_TIMER_SLOTS];
    int timer_recorded[PEA_CUDA_TIMER_SLOTS];
    int clock_khz; /* 0 until pea_cuda_spin first asks */

    pea_profile *profile; /* the profile's events and totals, from the first pea_cuda_profile_start on */

    /* CUDA graphs (graph.cu) */
    void *cublas_workspace;    /* cublasSetWorkspace's (cuBLAS must not allocate inside a capture), set at create */
    pea_cuda_graph *capture;   /* the graph being captured (pea_cuda_graph_begin … _end), else NULL */
    pea_cuda_graph *graphs;    /* the live graphs, a list through pea_cuda_graph::next (destroyed with the context) */
    char capture_failure[1024]; /* the first op failure during the capture: why pea_cuda_graph_end fails */

    struct pea_nccl *nccl; /* NCCL's functions and communicator (collective.cu), from the first pea_cuda_nccl_* call on */
};

/* ---------------------------------------------------------------------------------------------------- */
/* Errors (context.cu)                                                                                   */

/* Sets ctx->message to "op: <formatted text>" and returns code. */
int pea_fail(pea_cuda_context *ctx, int code, const char *op, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* 0 when e is cudaSuccess; otherwise the message "op: what: cudaErrorX (text)" and KERNEL (OUT_OF_MEMORY for
 * cudaErrorMemoryAllocation). */
int pea_check_cuda(pea_cuda_context *ctx, const char *op, cudaError_t e, const char *what);
/* Likewise for a cuBLAS status (INVALID for CUBLAS_STATUS_INVALID_VALUE, else KERNEL). */
int pea_check_cublas(pea_cuda_context *ctx, const char *op, cublasStatus_t s, const char *what);
/* After a launch: cudaGetLastError, reported as "op: launch of <kernel>: …". */
int pea_check_launch(pea_cuda_context *ctx, const char *op, const char *kernel);
/* Makes ctx's device current on the calling thread (the Swift side may call from any thread). */
int pea_enter(pea_cuda_context *ctx, const char *op);
/* Reads and clears the device error record; called by the synchronising calls after the stream is idle. */
int pea_check_device_error(pea_cuda_context *ctx, const char *op);

/* ---------------------------------------------------------------------------------------------------- */
/* Per-op profile (profile.cu)                                                                           */

void pea_profile_begin(pea_cuda_context *ctx, const char *op);
void pea_profile_end(pea_cuda_context *ctx);
void pea_profile_destroy(pea_cuda_context *ctx);
/* Frees the NCCL communicator (collective.cu); the library stays loaded. */
void pea_nccl_destroy(pea_cuda_context *ctx);
/* Brackets an op call while a profile runs (PEA_OP): an event pair around the outermost call's queued work. */
struct pea_op_scope {
    pea_cuda_context *ctx;
    pea_op_scope(pea_cuda_context *c, const char *op);
    ~pea_op_scope();
    pea_op_scope(const pea_op_scope &) = delete;
    pea_op_scope &operator=(const pea_op_scope &) = delete;
};

/* Destroys the cached cuBLASLt plans (gemm.cu; pea_cuda_destroy). */
void pea_lt_plans_destroy(pea_cuda_context *ctx);

/* Bytes per element of a CK_ type (0 for an unknown one). */
static inline size_t pea_dtype_size(int dtype) {
    switch (dtype) {
    case CK_F32: case CK_I32: return 4;
    case CK_F16: case CK_BF16: return 2;
    case CK_I64: return 8;
    }
    return 0;
}
static inline int pea_is_float_dtype(int dtype) { return dtype == CK_F32 || dtype == CK_F16 || dtype == CK_BF16; }
static inline const char *pea_dtype_name(int dtype) {
    switch (dtype) {
    case CK_F32: return "f32";
    case CK_F16: return "f16";
    case CK_BF16: return "bf16";
    case CK_I32: return "i32";
    case CK_I64: return "i64";
    }
    return "unknown";
}

/* The usual prologue of an op: a context, its device current, a float dtype. */
#define PEA_BEGIN(ctx, op)                                                                             \
    do {                                                                                               \
        if (!(ctx)) return PEA_CUDA_ERROR_INVALID;                                                     \
        int pea_rc_ = pea_enter((ctx), (op));                                                          \
        if (pea_rc_) return pea_rc_;                                                                   \
    } while (0)
/* PEA_BEGIN for an op: also brackets the call's queued work for the profile (profile.cu) while one runs. */
#define PEA_OP(ctx, op)                                                                                \
    PEA_BEGIN(ctx, op);                                                                                \
    pea_op_scope pea_op_scope_((ctx), (op))
#define PEA_REQUIRE(ctx, op, cond, ...)                                                                \
    do {                                                                                               \
        if (!(cond)) return pea_fail((ctx), PEA_CUDA_ERROR_INVALID, (op), __VA_ARGS__);                \
    } while (0)
#define PEA_REQUIRE_DTYPE(ctx, op, dtype)                                                              \
    PEA_REQUIRE(ctx, op, pea_is_float_dtype(dtype), "dtype %d is not CK_F32, CK_F16 or CK_BF16", (int)(dtype))
/* What every attention entry point (attention.cu, attention_backward.cu) first requires of its call: a float
 * dtype, params, extents ≥ 0 and head dims ≥ 1. */
#define PEA_REQUIRE_ATTENTION(ctx, op, dtype, p)                                                       \
    PEA_REQUIRE_DTYPE(ctx, op, dtype);                                                                 \
    PEA_REQUIRE(ctx, op, (p) != NULL, "params are NULL");                                              \
    PEA_REQUIRE(ctx, op, (p)->B >= 0 && (p)->H >= 0 && (p)->Tq >= 0 && (p)->Tk >= 0 && (p)->D >= 1 &&   \
                             (p)->Dv >= 1,                                                             \
                "shape B %lld, H %lld, Tq %lld, Tk %lld, D %lld, Dv %lld", (long long)(p)->B,          \
                (long long)(p)->H, (long long)(p)->Tq, (long long)(p)->Tk, (long long)(p)->D,          \
                (long long)(p)->Dv)
#define PEA_TRY(expr)                                                                                  \
    do {                                                                                               \
        int pea_rc_ = (expr);                                                                          \
        if (pea_rc_) return pea_rc_;                                                                   \
    } while (0)

/* Launch on the context's stream and turn a launch failure into an error that names the op and kernel. */
#define PEA_KERNEL(ctx, op, kernel, grid, block, smem, ...)                                            \
    do {                                                                                               \
        PEA_LAUNCH(kernel, grid, block, smem, (ctx)->stream, __VA_ARGS__);                             \
        int pea_rc_ = pea_check_launch((ctx), (op), #kernel);                                          \
        if (pea_rc_) return pea_rc_;                                                                   \
    } while (0)

/* fn<T>(args…) for the storage type named by a float dtype (checked before). */
#define PEA_FLOAT_SWITCH(dtype, fn, ...)                                                               \
    ((dtype) == CK_F32 ? fn<float>(__VA_ARGS__)                                                        \
                       : (dtype) == CK_F16 ? fn<__half>(__VA_ARGS__) : fn<__nv_bfloat16>(__VA_ARGS__))

/* A 1-D launch: blocks of `threads`, enough blocks to cover n elements once, but at most `per_sm` blocks
 * per SM (kernels use grid-stride loops, so a capped grid still covers everything). */
static inline unsigned pea_grid_1d(const pea_cuda_context *ctx, int64_t n, int threads, int per_sm = 32) {
    int64_t blocks = (n + threads - 1) / threads;
    int64_t cap = (int64_t)ctx->sm_count * per_sm;
    if (blocks > cap) blocks = cap;
    if (blocks < 1) blocks = 1;
    return (unsigned)blocks;
}

/* Row-major GEMM through cuBLAS for the ops that need one (gemm.cu): the pea_cuda_gemm contract, with the
 * op's name in errors. */
int pea_gemm_rowmajor(pea_cuda_context *ctx, const char *op, int dtype, int transA, int transB, int64_t M,
                      int64_t N, int64_t K, float alpha, const void *A, int64_t lda, int64_t strideA,
                      const void *B, int64_t ldb, int64_t strideB, float beta, void *C, int64_t ldc,
                      int64_t strideC, int64_t batch);
/* y[i] = bias[(i / inner) % nbias] for i < total: the bias prefill that a beta = 1 GEMM accumulates onto. */
int pea_bias_prefill(pea_cuda_context *ctx, const char *op, int dtype, void *y, const void *bias, int64_t total,
                     int64_t inner, int64_t nbias);

/* y[i] = residual[i] (+ bias[(i / inner) % nbias] when bias is not NULL), rounded once: the start of a beta = 1
 * GEMM that fuses a residual. */
int pea_residual_prefill(pea_cuda_context *ctx, const char *op, int dtype, void *y, const void *residual,
                         const void *bias, int64_t total, int64_t inner, int64_t nbias);

/* The allocator's internal entry points (allocator.cu), for buffers the library owns (the workspace). */
int pea_mem_alloc(pea_cuda_context *ctx, const char *op, size_t bytes, void **out);
/* From now on allocations come from (and frees go to) a new graph pool, until pea_allocator_capture_end. */
pea_graph_pool *pea_allocator_capture_begin(pea_cuda_context *ctx);
void pea_allocator_capture_end(pea_cuda_context *ctx);
/* The graph is gone: its free blocks go back to the cache, its live ones are disowned. */
void pea_allocator_pool_release(pea_cuda_context *ctx, pea_graph_pool *pool);
/* Destroys every graph of the context (pea_cuda_destroy, before the allocator goes). */
void pea_graphs_destroy(pea_cuda_context *ctx);
int pea_mem_free(pea_cuda_context *ctx, const char *op, void *ptr);
int pea_allocator_create(pea_cuda_context *ctx);
void pea_allocator_destroy(pea_cuda_context *ctx);

/* ---------------------------------------------------------------------------------------------------- */
/* Device helpers                                                                                        */

/* Storage ↔ f32. f16/bf16 stores round to nearest even. */
static __device__ __forceinline__ float pea_ld(const float *p) { return *p; }
static __device__ __forceinline__ float pea_ld(const __half *p) { return __half2float(*p); }
static __device__ __forceinline__ float pea_ld(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
static __device__ __forceinline__ void pea_st(float *p, float v) { *p = v; }
static __device__ __forceinline__ void pea_st(__half *p, float v) { *p = __float2half_rn(v); }
static __device__ __forceinline__ void pea_st(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

/* The bits of one f16/bf16 as f32, and f32 → the bits of one f16/bf16 (round to nearest even). */
static __device__ __forceinline__ float pea_h2f(unsigned bits) {
    return __half2float(__ushort_as_half((unsigned short)(bits & 0xffffu)));
}
static __device__ __forceinline__ float pea_b2f(unsigned bits) { return __uint_as_float((bits & 0xffffu) << 16); }
static __device__ __forceinline__ unsigned pea_f2h(float v) { return __half_as_ushort(__float2half_rn(v)); }
static __device__ __forceinline__ unsigned pea_f2b(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

/* Four consecutive elements at p, p aligned to 4 elements (16 bytes for f32, 8 for f16/bf16). */
static __device__ __forceinline__ void pea_ld4(const float *p, float v[4]) {
    float4 t = *reinterpret_cast<const float4 *>(p);
    v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
static __device__ __forceinline__ void pea_ld4(const __half *p, float v[4]) {
    uint2 t = *reinterpret_cast<const uint2 *>(p);
    v[0] = pea_h2f(t.x); v[1] = pea_h2f(t.x >> 16); v[2] = pea_h2f(t.y); v[3] = pea_h2f(t.y >> 16);
}
static __device__ __forceinline__ void pea_ld4(const __nv_bfloat16 *p, float v[4]) {
    uint2 t = *reinterpret_cast<const uint2 *>(p);
    v[0] = pea_b2f(t.x); v[1] = __uint_as_float(t.x & 0xffff0000u);
    v[2] = pea_b2f(t.y); v[3] = __uint_as_float(t.y & 0xffff0000u);
}
static __device__ __forceinline__ void pea_st4(float *p, const float v[4]) {
    *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
static __device__ __forceinline__ void pea_st4(__half *p, const float v[4]) {
    *reinterpret_cast<uint2 *>(p) = make_uint2(pea_f2h(v[0]) | (pea_f2h(v[1]) << 16), pea_f2h(v[2]) | (pea_f2h(v[3]) << 16));
}
static __device__ __forceinline__ void pea_st4(__nv_bfloat16 *p, const float v[4]) {
    *reinterpret_cast<uint2 *>(p) = make_uint2(pea_f2b(v[0]) | (pea_f2b(v[1]) << 16), pea_f2b(v[2]) | (pea_f2b(v[3]) << 16));
}

/* Eight consecutive elements at p, p aligned to 16 bytes (and, for f32, 8 elements = two 16-byte loads). */
static __device__ __forceinline__ void pea_ld8(const float *p, float v[8]) {
    pea_ld4(p, v);
    pea_ld4(p + 4, v + 4);
}
static __device__ __forceinline__ void pea_ld8(const __half *p, float v[8]) {
    uint4 t = *reinterpret_cast<const uint4 *>(p);
    unsigned w[4] = {t.x, t.y, t.z, t.w};
    for (int i = 0; i < 4; i++) { v[2 * i] = pea_h2f(w[i]); v[2 * i + 1] = pea_h2f(w[i] >> 16); }
}
static __device__ __forceinline__ void pea_ld8(const __nv_bfloat16 *p, float v[8]) {
    uint4 t = *reinterpret_cast<const uint4 *>(p);
    unsigned w[4] = {t.x, t.y, t.z, t.w};
    for (int i = 0; i < 4; i++) { v[2 * i] = pea_b2f(w[i]); v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u); }
}

/* 16 bytes of storage held in registers (uint4) ↔ its PEA_V16<T> elements as f32: 4 floats or 8 f16/bf16.
 * Loads/stores of the uint4 itself are one 16-byte access (the address must be 16-byte aligned). */
template <typename T> struct pea_v16 { enum { N = 16 / (int)sizeof(T) }; };
static __device__ __forceinline__ void pea_unpack16(uint4 r, float *v, const float *) {
    v[0] = __uint_as_float(r.x); v[1] = __uint_as_float(r.y); v[2] = __uint_as_float(r.z); v[3] = __uint_as_float(r.w);
}
static __device__ __forceinline__ void pea_unpack16(uint4 r, float *v, const __half *) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
    for (int i = 0; i < 4; i++) { v[2 * i] = pea_h2f(w[i]); v[2 * i + 1] = pea_h2f(w[i] >> 16); }
}
static __device__ __forceinline__ void pea_unpack16(uint4 r, float *v, const __nv_bfloat16 *) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
    for (int i = 0; i < 4; i++) { v[2 * i] = pea_b2f(w[i]); v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u); }
}
static __device__ __forceinline__ uint4 pea_pack16(const float *v, const float *) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
}
static __device__ __forceinline__ uint4 pea_pack16(const float *v, const __half *) {
    return make_uint4(pea_f2h(v[0]) | (pea_f2h(v[1]) << 16), pea_f2h(v[2]) | (pea_f2h(v[3]) << 16),
                      pea_f2h(v[4]) | (pea_f2h(v[5]) << 16), pea_f2h(v[6]) | (pea_f2h(v[7]) << 16));
}
static __device__ __forceinline__ uint4 pea_pack16(const float *v, const __nv_bfloat16 *) {
    return make_uint4(pea_f2b(v[0]) | (pea_f2b(v[1]) << 16), pea_f2b(v[2]) | (pea_f2b(v[3]) << 16),
                      pea_f2b(v[4]) | (pea_f2b(v[5]) << 16), pea_f2b(v[6]) | (pea_f2b(v[7]) << 16));
}
/* The pea_v16<T>::N elements at p (16-byte aligned) as f32, and their store. */
template <typename T>
static __device__ __forceinline__ void pea_ld16(const T *p, float *v) {
    pea_unpack16(*reinterpret_cast<const uint4 *>(p), v, (const T *)nullptr);
}
template <typename T>
static __device__ __forceinline__ void pea_st16(T *p, const float *v) {
    *reinterpret_cast<uint4 *>(p) = pea_pack16(v, (const T *)nullptr);
}

/* Sum / maximum over the 32 lanes of a warp, returned to every lane (butterfly of xor shuffles). */
static __device__ __forceinline__ float pea_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(PEA_FULL_MASK, v, o);
    return v;
}
static __device__ __forceinline__ float pea_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(PEA_FULL_MASK, v, o));
    return v;
}

#endif /* PEA_CUDA_INTERNAL_H */
