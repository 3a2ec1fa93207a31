/*
 * elementwise.cu — the memory-bound ops: activations, GEGLU, affine, broadcasting binary ops, strided copy
 * (permute/concat/split), nearest 2× upsampling, embedding lookup, the sinusoidal timestep embedding, the
 * mean over an axis, and storage conversions; and the backward ops of the activations (GELU erf/tanh, SiLU),
 * GEGLU and upsampling, each next to its forward (dx overwritten, as ck_*_backward_f32). Each mirrors its
 * ckernels.h counterpart (cpu/elementwise.c, cpu/convert.c): same arguments, same results in f32; f16/bf16
 * tensors are loaded to f32, computed in f32 and rounded to nearest even once on the store.
 *
 * Launch shape: 1-D grid-stride loops with 256-thread blocks, at most 32 blocks per SM (a grid that covers
 * the data once when it is small, and persistent blocks when it is large). Indices are 64-bit. The hot
 * forward ops (activations, affine, GEGLU, binary ops of the common shapes) move 16-byte vectors (4 f32 or
 * 8 f16/bf16) per thread when their pointers are 16-byte aligned, falling back to one element per thread.
 *
 * Dimension legend: n elements; R rows of D; P planes of H×W; [outer, n, inner] for the mean.
 */
#include <string.h>

#include "internal.h"

enum { EW_THREADS = 256 };

/* ---------------------------------------------------------------------------------------------------- */
/* Activations and affine: y[i] = f(x[i])                                                                */

static __device__ __forceinline__ float gelu_erf(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }
static __device__ __forceinline__ float gelu_tanh(float v) {
    const float k = 0.79788456080286536f; /* sqrt(2/π) */
    return 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
}

struct ActivationFn {
    int kind; /* PEA_ACT_* */
    __device__ float operator()(float v) const {
        switch (kind) {
        case PEA_ACT_GELU_ERF: return gelu_erf(v);
        case PEA_ACT_GELU_TANH: return gelu_tanh(v);
        case PEA_ACT_QUICK_GELU: return v / (1.0f + expf(-1.702f * v));
        case PEA_ACT_SILU: return v / (1.0f + expf(-v));
        default: return v; /* unreachable: the kind is checked before the launch */
        }
    }
};

struct AffineFn {
    float alpha, beta;
    __device__ float operator()(float v) const { return alpha * v + beta; }
};

/* y[i] = f(x[i]) for i < n (y may alias x). With vec (x and y 16-byte aligned) the data is V = 16/sizeof(T)-element
 * vectors (4 f32 or 8 f16/bf16): thread t handles the vectors t, t + gridDim·blockDim, … with one 16-byte load
 * and store each, then the n mod V trailing elements one per thread; without vec single elements with the
 * same grid-stride mapping. */
template <typename T, typename F>
__global__ void map_kernel(const T *x, T *y, int64_t n, F f, int vec) {
    constexpr int V = pea_v16<T>::N;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (vec) {
        const int64_t nv = n / V;
        for (int64_t i = t; i < nv; i += stride) {
            float v[V];
            pea_ld16(x + V * i, v);
            for (int k = 0; k < V; k++) v[k] = f(v[k]);
            pea_st16(y + V * i, v);
        }
        done = nv * V;
    }
    for (int64_t i = done + t; i < n; i += stride) pea_st(y + i, f(pea_ld(x + i)));
}

template <typename T, typename F>
static int map_launch(pea_cuda_context *ctx, const char *op, const void *x, void *y, int64_t n, F f) {
    const int vec = (uintptr_t)x % 16 == 0 && (uintptr_t)y % 16 == 0;
    const int64_t work = vec ? n / pea_v16<T>::N + 1 : n;
    PEA_KERNEL(ctx, op, (map_kernel<T, F>), pea_grid_1d(ctx, work, EW_THREADS), EW_THREADS, 0, (const T *)x,
               (T *)y, n, f, vec);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_activation(pea_cuda_context *ctx, int dtype, int kind, const void *x, void *y, int64_t n) {
    static const char *op = "activation";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, kind >= 0 && kind < CK_ACT_COUNT, "unknown activation kind %d", kind);
    PEA_REQUIRE(ctx, op, n >= 0, "n = %lld", (long long)n);
    if (n == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && y, "NULL tensor (x %p, y %p)", x, y);
    ActivationFn f{kind};
    return PEA_FLOAT_SWITCH(dtype, map_launch, ctx, op, x, y, n, f);
}

/* Derivatives of the activations, for the backward ops (same constants as the forward functions above). */
static __device__ __forceinline__ float gelu_erf_grad(float v) {
    /* Φ(v) + v·φ(v) */
    const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * v * v); /* 1/sqrt(2π) */
    return cdf + v * pdf;
}
static __device__ __forceinline__ float gelu_tanh_grad(float v) {
    const float k = 0.79788456080286536f; /* sqrt(2/π) */
    const float t = tanhf(k * (v + 0.044715f * v * v * v));
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * v * v);
}
static __device__ __forceinline__ float silu_grad(float v) {
    const float s = 1.0f / (1.0f + expf(-v));
    return s * (1.0f + v * (1.0f - s));
}

/* dx = dy · f'(x) for the activations that have a backward (GELU erf/tanh, SiLU). */
struct ActivationGradFn {
    int kind; /* PEA_ACT_GELU_ERF, PEA_ACT_GELU_TANH or PEA_ACT_SILU */
    __device__ float operator()(float dy, float v) const {
        switch (kind) {
        case PEA_ACT_GELU_ERF: return dy * gelu_erf_grad(v);
        case PEA_ACT_GELU_TANH: return dy * gelu_tanh_grad(v);
        case PEA_ACT_SILU: return dy * silu_grad(v);
        default: return dy; /* unreachable: the kind is checked before the launch */
        }
    }
};

/* y[i] = f(a[i], b[i]) for i < n (y may alias a or b), f32 arithmetic. The same mapping as map_kernel: with vec
 * (a, b and y 16-byte aligned) thread t handles the 16-byte vectors t, t + gridDim·blockDim, … with one load of
 * each operand and one store, then the trailing n mod V elements singly; otherwise single elements, grid-stride. */
template <typename T, typename F>
__global__ void map2_kernel(const T *a, const T *b, T *y, int64_t n, F f, int vec) {
    constexpr int V = pea_v16<T>::N;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (vec) {
        const int64_t nv = n / V;
        for (int64_t i = t; i < nv; i += stride) {
            float u[V], v[V];
            pea_ld16(a + V * i, u);
            pea_ld16(b + V * i, v);
            for (int k = 0; k < V; k++) u[k] = f(u[k], v[k]);
            pea_st16(y + V * i, u);
        }
        done = nv * V;
    }
    for (int64_t i = done + t; i < n; i += stride) pea_st(y + i, f(pea_ld(a + i), pea_ld(b + i)));
}

template <typename T, typename F>
static int map2_launch(pea_cuda_context *ctx, const char *op, const void *a, const void *b, void *y, int64_t n, F f) {
    const int vec = (uintptr_t)a % 16 == 0 && (uintptr_t)b % 16 == 0 && (uintptr_t)y % 16 == 0;
    const int64_t work = vec ? n / pea_v16<T>::N + 1 : n;
    PEA_KERNEL(ctx, op, (map2_kernel<T, F>), pea_grid_1d(ctx, work, EW_THREADS), EW_THREADS, 0, (const T *)a,
               (const T *)b, (T *)y, n, f, vec);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_activation_backward(pea_cuda_context *ctx, int dtype, int kind, const void *dy, const void *x,
                                            void *dx, int64_t n) {
    static const char *op = "activation_backward";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, CK_ACT_HAS_BACKWARD(kind), "activation kind %d has no backward (GELU erf/tanh and SiLU do)", kind);
    PEA_REQUIRE(ctx, op, n >= 0, "n = %lld", (long long)n);
    if (n == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, dy && x && dx, "NULL tensor (dy %p, x %p, dx %p)", dy, x, dx);
    ActivationGradFn f{kind};
    return PEA_FLOAT_SWITCH(dtype, map2_launch, ctx, op, dy, x, dx, n, f);
}

extern "C" int pea_cuda_affine(pea_cuda_context *ctx, int dtype, const void *x, void *y, int64_t n, float alpha,
                               float beta) {
    static const char *op = "affine";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, n >= 0, "n = %lld", (long long)n);
    if (n == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && y, "NULL tensor (x %p, y %p)", x, y);
    AffineFn f{alpha, beta};
    return PEA_FLOAT_SWITCH(dtype, map_launch, ctx, op, x, y, n, f);
}

/* ---------------------------------------------------------------------------------------------------- */
/* GEGLU                                                                                                 */

/* y[r, i] = x[r, i] · gelu_erf(x[r, D + i]) for x [R, 2D], y [R, D]. One thread per output element
 * (grid-stride over R·D): consecutive threads read consecutive values and gates and write consecutive y. */
template <typename T>
__global__ void geglu_kernel(const T *x, T *y, int64_t R, int64_t D) {
    const int64_t total = R * D, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t r = e / D, i = e - r * D;
        const T *row = x + r * 2 * D;
        pea_st(y + e, pea_ld(row + i) * gelu_erf(pea_ld(row + D + i)));
    }
}

/* The same with 16-byte vectors along D (D a multiple of V = 16/sizeof(T), x and y 16-byte aligned): thread t
 * handles the output vectors t, t + gridDim·blockDim, … of the R·D/V; vector e is row r = e / (D/V), columns
 * i … i + V − 1 (i = V·(e mod D/V)), read as one 16-byte load of values at x[r, i] and one of gates at
 * x[r, D + i], written with one 16-byte store. */
template <typename T>
__global__ void geglu_vec_kernel(const T *x, T *y, int64_t R, int64_t D) {
    constexpr int V = pea_v16<T>::N;
    const int64_t per_row = D / V, total = R * per_row, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t r = e / per_row, i = (e - r * per_row) * V;
        const T *row = x + r * 2 * D;
        float a[V], g[V];
        pea_ld16(row + i, a);
        pea_ld16(row + D + i, g);
        for (int k = 0; k < V; k++) a[k] *= gelu_erf(g[k]);
        pea_st16(y + r * D + i, a);
    }
}

template <typename T>
static int geglu_launch(pea_cuda_context *ctx, const void *x, void *y, int64_t R, int64_t D) {
    constexpr int V = pea_v16<T>::N;
    if (D % V == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)y % 16 == 0) {
        PEA_KERNEL(ctx, "geglu", geglu_vec_kernel<T>, pea_grid_1d(ctx, R * (D / V), EW_THREADS), EW_THREADS, 0,
                   (const T *)x, (T *)y, R, D);
        return PEA_CUDA_OK;
    }
    PEA_KERNEL(ctx, "geglu", geglu_kernel<T>, pea_grid_1d(ctx, R * D, EW_THREADS), EW_THREADS, 0, (const T *)x,
               (T *)y, R, D);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_geglu(pea_cuda_context *ctx, int dtype, const void *x, void *y, int64_t R, int64_t D) {
    static const char *op = "geglu";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, R >= 0 && D >= 0, "shape R %lld, D %lld", (long long)R, (long long)D);
    if (R == 0 || D == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && y, "NULL tensor (x %p, y %p)", x, y);
    return PEA_FLOAT_SWITCH(dtype, geglu_launch, ctx, x, y, R, D);
}

/* The GEGLU backward for x [R, 2D] (value a = x[:, :D], gate g = x[:, D:]), dy [R, D] → dx [R, 2D]:
 *   dx[r, i] = dy[r, i]·gelu(g), dx[r, D + i] = dy[r, i]·a·gelu'(g).
 * One thread per (r, i) (grid-stride over R·D), writing both halves: consecutive threads read consecutive
 * values, gates and gradients and write consecutive elements of each half. */
template <typename T>
__global__ void geglu_backward_kernel(const T *dy, const T *x, T *dx, int64_t R, int64_t D) {
    const int64_t total = R * D, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t r = e / D, i = e - r * D;
        const T *row = x + r * 2 * D;
        T *drow = dx + r * 2 * D;
        const float a = pea_ld(row + i), g = pea_ld(row + D + i), d = pea_ld(dy + e);
        pea_st(drow + i, d * gelu_erf(g));
        pea_st(drow + D + i, d * a * gelu_erf_grad(g));
    }
}

template <typename T>
static int geglu_backward_launch(pea_cuda_context *ctx, const void *dy, const void *x, void *dx, int64_t R, int64_t D) {
    PEA_KERNEL(ctx, "geglu_backward", geglu_backward_kernel<T>, pea_grid_1d(ctx, R * D, EW_THREADS), EW_THREADS, 0,
               (const T *)dy, (const T *)x, (T *)dx, R, D);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_geglu_backward(pea_cuda_context *ctx, int dtype, const void *dy, const void *x, void *dx,
                                       int64_t R, int64_t D) {
    static const char *op = "geglu_backward";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, R >= 0 && D >= 0, "shape R %lld, D %lld", (long long)R, (long long)D);
    if (R == 0 || D == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, dy && x && dx, "NULL tensor (dy %p, x %p, dx %p)", dy, x, dx);
    return PEA_FLOAT_SWITCH(dtype, geglu_backward_launch, ctx, dy, x, dx, R, D);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Strided index spaces (binary ops, strided copy)                                                       */

/* An index space of rank ≤ CK_MAX_RANK with the strides of up to two operands (a, b). Passed by value. */
struct StridedSpace {
    int rank;
    int64_t shape[CK_MAX_RANK];
    int64_t a[CK_MAX_RANK];
    int64_t b[CK_MAX_RANK];
};

/* Simplifies a space without changing the elements it visits or their row-major order: drops axes of
 * extent 1, then merges each axis into the kept axis before it where both operands step through the two as
 * through one (stride[outer] == stride[inner]·shape[inner]). Returns the element count. */
static int64_t simplify_space(StridedSpace *s, int rank, const int64_t *shape, const int64_t *as, const int64_t *bs) {
    int64_t total = 1;
    int r = 0;
    for (int i = 0; i < rank; i++) {
        total *= shape[i];
        if (shape[i] == 1) continue;
        s->shape[r] = shape[i];
        s->a[r] = as[i];
        s->b[r] = bs[i];
        r++;
    }
    if (r == 0) {
        s->rank = 1;
        s->shape[0] = 1;
        s->a[0] = s->b[0] = 1;
        return total;
    }
    int m = 0; /* merge into the previous kept axis where possible */
    for (int i = 1; i < r; i++) {
        if (s->a[m] == s->a[i] * s->shape[i] && s->b[m] == s->b[i] * s->shape[i]) {
            s->shape[m] *= s->shape[i];
            s->a[m] = s->a[i];
            s->b[m] = s->b[i];
        } else {
            m++;
            s->shape[m] = s->shape[i];
            s->a[m] = s->a[i];
            s->b[m] = s->b[i];
        }
    }
    s->rank = m + 1;
    return total;
}

/* The offsets of element e (row-major over s.shape) in operand a and operand b. */
static __device__ __forceinline__ void space_offsets(const StridedSpace &s, int64_t e, int64_t &oa, int64_t &ob) {
    oa = 0;
    ob = 0;
    for (int axis = s.rank - 1; axis >= 0; axis--) {
        const int64_t extent = s.shape[axis];
        const int64_t q = e / extent, c = e - q * extent;
        oa += c * s.a[axis];
        ob += c * s.b[axis];
        e = q;
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* Binary ops with broadcasting                                                                          */

/* y[e] = a[offset_a(e)] ⊕ b[offset_b(e)] for e over the index space (y contiguous). One thread per element of
 * y, grid-stride; a broadcast operand (stride 0) is read by many threads from cache. */
template <typename T>
__global__ void binary_kernel(int op, const T *a, const T *b, T *y, StridedSpace s, int64_t total) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        int64_t oa, ob;
        space_offsets(s, e, oa, ob);
        const float u = pea_ld(a + oa), v = pea_ld(b + ob);
        float r;
        switch (op) {
        case CK_ADD: r = u + v; break;
        case CK_SUB: r = u - v; break;
        case CK_MUL: r = u * v; break;
        default: r = u / v; break;
        }
        pea_st(y + e, r);
    }
}

/* y = a ⊕ b over a space of ≤ 2 axes [rows, inner] in which each operand steps through inner with stride 0 or 1
 * (a contiguous operand, a per-row value broadcast along inner, or a row vector broadcast over rows), inner a
 * multiple of V = 16/sizeof(T) and every vector 16-byte aligned. Thread t handles the output vectors t,
 * t + gridDim·blockDim, … of the rows·inner/V: vector e is row r = e / (inner/V), columns i … i + V − 1; an
 * operand with inner stride 1 is read with one 16-byte load at r·row_stride + i, one with stride 0 as the
 * single value at r·row_stride; y (contiguous) is written with one 16-byte store. */
template <typename T>
__global__ void binary_vec_kernel(int op, const T *a, const T *b, T *y, int64_t rows, int64_t inner, int64_t a_row,
                                  int a_in, int64_t b_row, int b_in) {
    constexpr int V = pea_v16<T>::N;
    const int64_t per_row = inner / V, total = rows * per_row, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t r = e / per_row, i = (e - r * per_row) * V;
        float u[V], v[V];
        if (a_in) pea_ld16(a + r * a_row + i, u);
        else for (int k = 0; k < V; k++) u[k] = pea_ld(a + r * a_row);
        if (b_in) pea_ld16(b + r * b_row + i, v);
        else for (int k = 0; k < V; k++) v[k] = pea_ld(b + r * b_row);
        for (int k = 0; k < V; k++) {
            switch (op) {
            case CK_ADD: u[k] += v[k]; break;
            case CK_SUB: u[k] -= v[k]; break;
            case CK_MUL: u[k] *= v[k]; break;
            default: u[k] /= v[k]; break;
            }
        }
        pea_st16(y + r * inner + i, u);
    }
}

/* Whether the simplified space takes binary_vec_kernel, and its [rows, inner] form with each operand's
 * (row stride, inner stride ∈ {0, 1}). */
template <typename T>
static bool binary_vec_form(const void *a, const void *b, const void *y, const StridedSpace &s, int64_t &rows,
                            int64_t &inner, int64_t &a_row, int &a_in, int64_t &b_row, int &b_in) {
    constexpr int V = pea_v16<T>::N;
    if (s.rank > 2) return false;
    const int last = s.rank - 1;
    inner = s.shape[last];
    rows = s.rank == 2 ? s.shape[0] : 1;
    const int64_t as = s.a[last], bs = s.b[last];
    if ((as != 0 && as != 1) || (bs != 0 && bs != 1) || (as == 0 && bs == 0)) return false;
    a_in = (int)as;
    b_in = (int)bs;
    a_row = s.rank == 2 ? s.a[0] : 0;
    b_row = s.rank == 2 ? s.b[0] : 0;
    if (inner % V != 0 || (uintptr_t)y % 16 != 0) return false;
    if (a_in && ((uintptr_t)a % 16 != 0 || a_row % V != 0)) return false;
    if (b_in && ((uintptr_t)b % 16 != 0 || b_row % V != 0)) return false;
    return true;
}

template <typename T>
static int binary_launch(pea_cuda_context *ctx, int op, const void *a, const void *b, void *y, const StridedSpace &s,
                         int64_t total) {
    int64_t rows, inner, a_row, b_row;
    int a_in, b_in;
    if (binary_vec_form<T>(a, b, y, s, rows, inner, a_row, a_in, b_row, b_in)) {
        PEA_KERNEL(ctx, "binary", binary_vec_kernel<T>, pea_grid_1d(ctx, total / pea_v16<T>::N, EW_THREADS),
                   EW_THREADS, 0, op, (const T *)a, (const T *)b, (T *)y, rows, inner, a_row, a_in, b_row, b_in);
        return PEA_CUDA_OK;
    }
    PEA_KERNEL(ctx, "binary", binary_kernel<T>, pea_grid_1d(ctx, total, EW_THREADS), EW_THREADS, 0, op,
               (const T *)a, (const T *)b, (T *)y, s, total);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_binary(pea_cuda_context *ctx, int dtype, int op, const void *a, const int64_t *a_strides,
                               const void *b, const int64_t *b_strides, void *y, const int64_t *shape, int rank) {
    static const char *name = "binary";
    PEA_OP(ctx, name);
    PEA_REQUIRE_DTYPE(ctx, name, dtype);
    PEA_REQUIRE(ctx, name, op >= 0 && op < CK_BINARY_COUNT, "unknown op %d", op);
    PEA_REQUIRE(ctx, name, rank >= 1 && rank <= CK_MAX_RANK, "rank %d is not in 1…%d", rank, CK_MAX_RANK);
    PEA_REQUIRE(ctx, name, shape && a_strides && b_strides, "NULL shape or strides");
    for (int i = 0; i < rank; i++) PEA_REQUIRE(ctx, name, shape[i] >= 0, "shape[%d] = %lld", i, (long long)shape[i]);
    /* Simplifying keeps the row-major order of the index space, so y (contiguous) stays y[e]. */
    StridedSpace s;
    const int64_t total = simplify_space(&s, rank, shape, a_strides, b_strides);
    if (total == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, name, a && b && y, "NULL tensor (a %p, b %p, y %p)", a, b, y);
    return PEA_FLOAT_SWITCH(dtype, binary_launch, ctx, op, a, b, y, s, total);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Strided copy                                                                                          */

struct Bytes16 { uint4 v; };
struct Bytes8 { uint2 v; };

/* dst[offset_dst(e)] = src[offset_src(e)] for e over the index space, elements of type E (1, 2, 4, 8 or 16
 * bytes). One thread per element, grid-stride; space.a holds the source strides, space.b the destination's. */
template <typename E>
__global__ void copy_strided_kernel(const E *src, E *dst, StridedSpace s, int64_t total) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        int64_t os, od;
        space_offsets(s, e, os, od);
        dst[od] = src[os];
    }
}

/* The same for elements of any size: one thread per element copies its `size` bytes. */
__global__ void copy_strided_bytes_kernel(const unsigned char *src, unsigned char *dst, StridedSpace s, int64_t total,
                                          int64_t size) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        int64_t os, od;
        space_offsets(s, e, os, od);
        for (int64_t k = 0; k < size; k++) dst[od * size + k] = src[os * size + k];
    }
}

template <typename E>
static int copy_launch(pea_cuda_context *ctx, const void *src, void *dst, const StridedSpace &s, int64_t total) {
    PEA_KERNEL(ctx, "copy_strided", copy_strided_kernel<E>, pea_grid_1d(ctx, total, EW_THREADS), EW_THREADS, 0,
               (const E *)src, (E *)dst, s, total);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_copy_strided(pea_cuda_context *ctx, const void *src, const int64_t *src_strides, void *dst,
                                     const int64_t *dst_strides, const int64_t *shape, int rank, int64_t elem_size) {
    static const char *op = "copy_strided";
    PEA_OP(ctx, op);
    PEA_REQUIRE(ctx, op, rank >= 1 && rank <= CK_MAX_RANK, "rank %d is not in 1…%d", rank, CK_MAX_RANK);
    PEA_REQUIRE(ctx, op, elem_size >= 1, "elem_size %lld", (long long)elem_size);
    PEA_REQUIRE(ctx, op, shape && src_strides && dst_strides, "NULL shape or strides");
    for (int i = 0; i < rank; i++) PEA_REQUIRE(ctx, op, shape[i] >= 0, "shape[%d] = %lld", i, (long long)shape[i]);
    StridedSpace s;
    int64_t total = simplify_space(&s, rank, shape, src_strides, dst_strides);
    if (total == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, src && dst, "NULL tensor (src %p, dst %p)", src, dst);

    /* Widen the element where the innermost axis is contiguous in both: 2-byte elements copied 8 at a time as
     * 16-byte vectors, and so on, when the extent, the other strides and both addresses allow it. */
    int64_t size = elem_size;
    const int last = s.rank - 1;
    if (s.a[last] == 1 && s.b[last] == 1) {
        for (int64_t w = 16; w > size; w /= 2) {
            if (w % size) continue;
            const int64_t f = w / size;
            bool ok = s.shape[last] % f == 0 && (uintptr_t)src % w == 0 && (uintptr_t)dst % w == 0;
            for (int i = 0; ok && i < last; i++) ok = s.a[i] % f == 0 && s.b[i] % f == 0;
            if (!ok) continue;
            s.shape[last] /= f;
            for (int i = 0; i < last; i++) { s.a[i] /= f; s.b[i] /= f; }
            total /= f;
            size = w;
            break;
        }
    }
    const bool aligned = (uintptr_t)src % size == 0 && (uintptr_t)dst % size == 0;
    if (aligned) {
        switch (size) {
        case 1: return copy_launch<uint8_t>(ctx, src, dst, s, total);
        case 2: return copy_launch<uint16_t>(ctx, src, dst, s, total);
        case 4: return copy_launch<uint32_t>(ctx, src, dst, s, total);
        case 8: return copy_launch<Bytes8>(ctx, src, dst, s, total);
        case 16: return copy_launch<Bytes16>(ctx, src, dst, s, total);
        }
    }
    PEA_KERNEL(ctx, op, copy_strided_bytes_kernel, pea_grid_1d(ctx, total, EW_THREADS), EW_THREADS, 0,
               (const unsigned char *)src, (unsigned char *)dst, s, total, size);
    return PEA_CUDA_OK;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Nearest 2× upsampling                                                                                 */

/* y[p, oy, ox] = x[p, oy/2, ox/2] for x [P, H, W], y [P, 2H, 2W]. One thread per output element (grid-stride):
 * writes are coalesced, and neighbouring threads read the same or the next input element. */
template <typename T>
__global__ void upsample_nearest2x_kernel(const T *x, T *y, int64_t P, int64_t H, int64_t W) {
    const int64_t W2 = 2 * W, plane = 4 * H * W, total = P * plane, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t p = e / plane, r = e - p * plane;
        const int64_t oy = r / W2, ox = r - oy * W2;
        y[e] = x[p * H * W + (oy >> 1) * W + (ox >> 1)];
    }
}

template <typename T>
static int upsample_launch(pea_cuda_context *ctx, const void *x, void *y, int64_t P, int64_t H, int64_t W) {
    PEA_KERNEL(ctx, "upsample_nearest2x", upsample_nearest2x_kernel<T>, pea_grid_1d(ctx, 4 * P * H * W, EW_THREADS),
               EW_THREADS, 0, (const T *)x, (T *)y, P, H, W);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_upsample_nearest2x(pea_cuda_context *ctx, int dtype, const void *x, void *y, int64_t P,
                                           int64_t H, int64_t W) {
    static const char *op = "upsample_nearest2x";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, P >= 0 && H >= 0 && W >= 0, "shape P %lld, H %lld, W %lld", (long long)P, (long long)H,
                (long long)W);
    if (P == 0 || H == 0 || W == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && y, "NULL tensor (x %p, y %p)", x, y);
    /* a pure copy: the storage type only fixes the element size */
    if (dtype == CK_F32) return upsample_launch<uint32_t>(ctx, x, y, P, H, W);
    return upsample_launch<uint16_t>(ctx, x, y, P, H, W);
}

/* dx[p, y, x] = Σ of the 2×2 block dy[p, 2y + {0,1}, 2x + {0,1}] for dy [P, 2H, 2W], dx [P, H, W] (the gradient
 * of nearest 2× upsampling), summed in f32 in a fixed order. One thread per dx element (grid-stride):
 * consecutive threads write consecutive dx and read the two dy rows of their blocks side by side. */
template <typename T>
__global__ void upsample_nearest2x_backward_kernel(const T *dy, T *dx, int64_t P, int64_t H, int64_t W) {
    const int64_t W2 = 2 * W, plane = H * W, total = P * plane, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t p = e / plane, r = e - p * plane;
        const int64_t y = r / W, x = r - y * W;
        const T *top = dy + (p * 2 * H + 2 * y) * W2 + 2 * x, *bottom = top + W2;
        pea_st(dx + e, (pea_ld(top) + pea_ld(top + 1)) + (pea_ld(bottom) + pea_ld(bottom + 1)));
    }
}

template <typename T>
static int upsample_backward_launch(pea_cuda_context *ctx, const void *dy, void *dx, int64_t P, int64_t H, int64_t W) {
    PEA_KERNEL(ctx, "upsample_nearest2x_backward", upsample_nearest2x_backward_kernel<T>,
               pea_grid_1d(ctx, P * H * W, EW_THREADS), EW_THREADS, 0, (const T *)dy, (T *)dx, P, H, W);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_upsample_nearest2x_backward(pea_cuda_context *ctx, int dtype, const void *dy, void *dx,
                                                    int64_t P, int64_t H, int64_t W) {
    static const char *op = "upsample_nearest2x_backward";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, P >= 0 && H >= 0 && W >= 0, "shape P %lld, H %lld, W %lld", (long long)P, (long long)H,
                (long long)W);
    if (P == 0 || H == 0 || W == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, dy && dx, "NULL tensor (dy %p, dx %p)", dy, dx);
    return PEA_FLOAT_SWITCH(dtype, upsample_backward_launch, ctx, dy, dx, P, H, W);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Embedding                                                                                             */

/* y[i, :] = table[ids[i], :] for ids [n] (int32 or int64), table [vocab, D], y [n, D]. One thread per output
 * element (grid-stride over n·D; consecutive threads copy consecutive features of a row). An id outside
 * [0, vocab) zeroes its row, and the first thread to find one records it in the context's device error
 * record (atomicCAS on the flag), which the next synchronising call reports. */
template <typename E, typename I>
__global__ void embedding_kernel(const I *ids, int64_t n, const E *table, int64_t vocab, int64_t D, E *y,
                                 pea_device_error *err) {
    const int64_t total = n * D, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t i = e / D, d = e - i * D;
        const int64_t id = (int64_t)ids[i];
        if (id < 0 || id >= vocab) {
            if (d == 0 && atomicCAS(&err->flag, 0, 1) == 0) {
                err->op = PEA_DEVERR_EMBEDDING;
                err->value = id;
                err->index = i;
                err->limit = vocab;
            }
            y[e] = E();
            continue;
        }
        y[e] = table[id * D + d];
    }
}

template <typename E>
static int embedding_launch(pea_cuda_context *ctx, const void *ids, int ids_are_i64, int64_t n, const void *table,
                            int64_t vocab, int64_t D, void *y) {
    const unsigned grid = pea_grid_1d(ctx, n * D, EW_THREADS);
    if (ids_are_i64)
        PEA_KERNEL(ctx, "embedding", (embedding_kernel<E, int64_t>), grid, EW_THREADS, 0, (const int64_t *)ids, n,
                   (const E *)table, vocab, D, (E *)y, ctx->d_error);
    else
        PEA_KERNEL(ctx, "embedding", (embedding_kernel<E, int32_t>), grid, EW_THREADS, 0, (const int32_t *)ids, n,
                   (const E *)table, vocab, D, (E *)y, ctx->d_error);
    ctx->error_check_pending = 1;
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_embedding(pea_cuda_context *ctx, int dtype, const void *ids, int ids_are_i64, int64_t n,
                                  const void *table, int64_t vocab, int64_t D, void *y) {
    static const char *op = "embedding";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, n >= 0 && vocab >= 0 && D >= 0, "shape n %lld, vocab %lld, D %lld", (long long)n,
                (long long)vocab, (long long)D);
    if (n == 0 || D == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, ids && table && y, "NULL tensor (ids %p, table %p, y %p)", ids, table, y);
    if (dtype == CK_F32) return embedding_launch<uint32_t>(ctx, ids, ids_are_i64, n, table, vocab, D, y);
    return embedding_launch<uint16_t>(ctx, ids, ids_are_i64, n, table, vocab, D, y);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Timestep embedding                                                                                    */

/* Element i of a tensor of CK_ type `type` as f32 (integers convert their value). */
static __device__ __forceinline__ float load_any(const void *p, int type, int64_t i) {
    switch (type) {
    case CK_F16: return __half2float(((const __half *)p)[i]);
    case CK_BF16: return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    case CK_I32: return (float)((const int32_t *)p)[i];
    case CK_I64: return (float)((const long long *)p)[i];
    default: return ((const float *)p)[i];
    }
}

/* y[b, :] = [sin(arg_0 … arg_{half-1}), cos(…)] (flip: cos first), arg_k = scale · (t[b] · exp(k·log_period /
 * (half − shift))), log_period = −ln(max_period); an odd dim gets a zero last column. The same f32
 * operations in the same order as ck_timestep_embedding_f32. One thread per output element (grid-stride over
 * B·dim): each computes its own arg and one of sin/cos. */
template <typename T>
__global__ void timestep_embedding_kernel(const void *t, int t_type, int64_t B, int64_t dim, int flip, float shift,
                                          float scale, float log_period, T *y) {
    const int64_t half = dim / 2, total = B * dim, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t b = e / dim, i = e - b * dim;
        float v = 0.0f;
        if (i < 2 * half) {
            const int64_t k = i < half ? i : i - half;
            const float exponent = ((float)k * log_period) / ((float)half - shift);
            const float arg = scale * (load_any(t, t_type, b) * expf(exponent));
            const bool first = i < half;
            v = (first != (flip != 0)) ? sinf(arg) : cosf(arg);
        }
        pea_st(y + e, v);
    }
}

template <typename T>
static int timestep_launch(pea_cuda_context *ctx, const void *t, int t_dtype, int64_t B, int64_t dim, int flip,
                           float shift, float scale, float log_period, void *y) {
    PEA_KERNEL(ctx, "timestep_embedding", timestep_embedding_kernel<T>, pea_grid_1d(ctx, B * dim, EW_THREADS),
               EW_THREADS, 0, t, t_dtype, B, dim, flip, shift, scale, log_period, (T *)y);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_timestep_embedding(pea_cuda_context *ctx, int dtype, const void *t, int t_dtype, int64_t B,
                                           int64_t dim, int flip_sin_to_cos, float downscale_freq_shift, float scale,
                                           float max_period, void *y) {
    static const char *op = "timestep_embedding";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, pea_dtype_size(t_dtype) != 0, "t_dtype %d is not a CK_ type", t_dtype);
    PEA_REQUIRE(ctx, op, B >= 0 && dim >= 0, "shape B %lld, dim %lld", (long long)B, (long long)dim);
    if (B == 0 || dim == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, t && y, "NULL tensor (t %p, y %p)", t, y);
    const float log_period = -(float)log((double)max_period); /* as the CPU computes it */
    return PEA_FLOAT_SWITCH(dtype, timestep_launch, ctx, t, t_dtype, B, dim, flip_sin_to_cos, downscale_freq_shift,
                            scale, log_period, y);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Mean over the middle axis                                                                             */

/* y[o, i] = (1/n) Σ_k x[o, k, i] for x [outer, n, inner], when inner is wide: one thread per output element
 * (grid-stride over outer·inner); at each k consecutive threads read consecutive i (coalesced). */
template <typename T>
__global__ void mean_columns_kernel(const T *x, T *y, int64_t outer, int64_t n, int64_t inner) {
    const int64_t total = outer * inner, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t o = e / inner, i = e - o * inner;
        const T *p = x + o * n * inner + i;
        float s = 0.0f;
        for (int64_t k = 0; k < n; k++) s += pea_ld(p + k * inner);
        pea_st(y + e, s / (float)n);
    }
}

/* The same when inner is narrow and n long: one block per output element (blockIdx.x = o·inner + i); thread t
 * sums k = t, t + blockDim, …; the block adds the partial sums (warp shuffles, then one value per warp in
 * shared memory). */
template <typename T>
__global__ void mean_rows_kernel(const T *x, T *y, int64_t n, int64_t inner) {
    PEA_SHARED_ARRAY(float, partial, 32);
    const int64_t e = blockIdx.x, o = e / inner, i = e - o * inner;
    const T *p = x + o * n * inner + i;
    float s = 0.0f;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) s += pea_ld(p + k * inner);
    s = pea_warp_sum(s);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < warps ? partial[lane] : 0.0f;
        s = pea_warp_sum(s);
        if (lane == 0) pea_st(y + e, s / (float)n);
    }
}

template <typename T>
static int mean_launch(pea_cuda_context *ctx, const void *x, void *y, int64_t outer, int64_t n, int64_t inner) {
    if (inner < 16 && n >= 64 && outer * inner <= INT_MAX) {
        PEA_KERNEL(ctx, "mean", mean_rows_kernel<T>, (unsigned)(outer * inner), 256, 0, (const T *)x, (T *)y, n, inner);
    } else {
        PEA_KERNEL(ctx, "mean", mean_columns_kernel<T>, pea_grid_1d(ctx, outer * inner, EW_THREADS), EW_THREADS, 0,
                   (const T *)x, (T *)y, outer, n, inner);
    }
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_mean(pea_cuda_context *ctx, int dtype, const void *x, void *y, int64_t outer, int64_t n,
                             int64_t inner) {
    static const char *op = "mean";
    PEA_OP(ctx, op);
    PEA_REQUIRE_DTYPE(ctx, op, dtype);
    PEA_REQUIRE(ctx, op, outer >= 0 && n >= 1 && inner >= 0, "shape outer %lld, n %lld, inner %lld",
                (long long)outer, (long long)n, (long long)inner);
    if (outer == 0 || inner == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, x && y, "NULL tensor (x %p, y %p)", x, y);
    return PEA_FLOAT_SWITCH(dtype, mean_launch, ctx, x, y, outer, n, inner);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Storage conversions, bit for bit as cpu/convert.c                                                     */

static __device__ __forceinline__ float cvt_f16_to_f32(unsigned h) {
    const unsigned sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return __uint_as_float(sign | 0x7f800000u | (man << 13)); /* inf / NaN (payload kept) */
    if (exp == 0) {                                                            /* zero / subnormal */
        const float v = (float)man * 5.9604644775390625e-08f;                  /* man · 2^-24, exact */
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112) << 23) | (man << 13));
}

static __device__ __forceinline__ unsigned cvt_f32_to_f16(float f) {
    const unsigned u = __float_as_uint(f);
    const unsigned sign = (u >> 16) & 0x8000u, abs = u & 0x7fffffffu;
    if (abs >= 0x7f800000u) return sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u); /* inf / NaN */
    if (abs >= 0x477ff000u) return sign | 0x7c00u;                                     /* ≥ 65520 → inf */
    if (abs < 0x38800000u) {                                /* below 2^-14: a subnormal f16, nearest even */
        const float scaled = __uint_as_float(abs) * 16777216.0f; /* · 2^24, exact */
        return sign | (unsigned)rintf(scaled);
    }
    const unsigned rounded = abs + 0xfffu + ((abs >> 13) & 1u);
    return sign | ((rounded - (112u << 23)) >> 13);
}

static __device__ __forceinline__ unsigned cvt_f32_to_bf16(float f) {
    const unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return ((u >> 16) | 0x40u) & 0xffffu; /* quiet NaN */
    return ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) & 0xffffu;
}

/* dst[i] = convert(src[i]) between any two CK_ types: integer ↔ integer exactly, everything else through f32
 * with the conversions above. One thread per element, grid-stride; the type switches are uniform. */
__global__ void convert_kernel(const void *src, int st, void *dst, int dt, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        if (st == CK_I64 && dt == CK_I32) { ((int32_t *)dst)[i] = (int32_t)((const long long *)src)[i]; continue; }
        if (st == CK_I32 && dt == CK_I64) { ((long long *)dst)[i] = ((const int32_t *)src)[i]; continue; }
        float v;
        switch (st) {
        case CK_F16: v = cvt_f16_to_f32(((const unsigned short *)src)[i]); break;
        case CK_BF16: v = __uint_as_float((unsigned)((const unsigned short *)src)[i] << 16); break;
        case CK_I32: v = (float)((const int32_t *)src)[i]; break;
        case CK_I64: v = (float)((const long long *)src)[i]; break;
        default: v = ((const float *)src)[i]; break;
        }
        switch (dt) {
        case CK_F16: ((unsigned short *)dst)[i] = (unsigned short)cvt_f32_to_f16(v); break;
        case CK_BF16: ((unsigned short *)dst)[i] = (unsigned short)cvt_f32_to_bf16(v); break;
        case CK_I32: ((int32_t *)dst)[i] = (int32_t)v; break;
        case CK_I64: ((long long *)dst)[i] = (long long)v; break;
        default: ((float *)dst)[i] = v; break;
        }
    }
}

extern "C" int pea_cuda_convert(pea_cuda_context *ctx, const void *src, int src_dtype, void *dst, int dst_dtype,
                                int64_t n) {
    static const char *op = "convert";
    PEA_OP(ctx, op);
    PEA_REQUIRE(ctx, op, pea_dtype_size(src_dtype) && pea_dtype_size(dst_dtype), "unknown dtype (src %d, dst %d)",
                src_dtype, dst_dtype);
    PEA_REQUIRE(ctx, op, n >= 0, "n = %lld", (long long)n);
    if (n == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, src && dst, "NULL tensor (src %p, dst %p)", src, dst);
    if (src_dtype == dst_dtype) {
        if (src == dst) return PEA_CUDA_OK;
        return pea_check_cuda(ctx, op, cudaMemcpyAsync(dst, src, (size_t)n * pea_dtype_size(src_dtype),
                                                       cudaMemcpyDeviceToDevice, ctx->stream),
                              "cudaMemcpyAsync");
    }
    PEA_KERNEL(ctx, op, convert_kernel, pea_grid_1d(ctx, n, EW_THREADS), EW_THREADS, 0, src, src_dtype, dst, dst_dtype,
               n);
    return PEA_CUDA_OK;
}
