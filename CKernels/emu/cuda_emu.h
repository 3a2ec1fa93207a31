/*
 * cuda_emu.h — the SIMT emulator: what a .cu file sees when it is compiled by the host C++ compiler instead
 * of nvcc. Included through the stand-in headers in CKernels/emu/include (cuda_runtime.h, …) and through
 * pea_simt.h; never include it under nvcc.
 *
 * The model (see README.md):
 *   - a launch runs its blocks on a pool of CPU threads (PEA_EMU_THREADS, default: every CPU); a block runs
 *     start to finish on one of them;
 *   - each CUDA thread of a block is a fiber with its own stack; a fiber runs until it reaches a
 *     __syncthreads, a warp intrinsic (__shfl_*_sync, __syncwarp, __ballot_sync, …) or its end, and only
 *     then does the next fiber run. So static __shared__ storage (`static thread_local`) is per block, and
 *     a missing barrier reads memory that the other threads have not written yet (poisoned with NaN);
 *   - a barrier completes when every thread of the block waits at it; a warp intrinsic when every
 *     non-exited lane named in its mask waits at the same intrinsic with the same mask. When no fiber can
 *     run and nothing can complete, the launch fails with an error that names the kernel, the block and
 *     where each thread waits: a deadlock is an error, never a hang.
 * Kernel failures are reported like CUDA's: cudaGetLastError() and the next synchronising call return an
 * error, and a message goes to stderr (pea_emu_last_message() returns it).
 */
#ifndef PEA_CUDA_EMU_H
#define PEA_CUDA_EMU_H

#ifndef __cplusplus
#error "cuda_emu.h: compile CUDA sources as C++ (g++ -x c++ -std=c++17)"
#endif
#if defined(__CUDACC__)
#error "cuda_emu.h is the CPU emulator; nvcc must use the real CUDA headers"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <memory> /* before __noinline__ is defined: libstdc++ spells an attribute with that name */
#include <tuple>
#include <type_traits>
#include <utility>

#define PEA_EMU 1
#ifndef PEA_EMU_CHECK
#define PEA_EMU_CHECK 1 /* bounds-checked shared memory; -DPEA_EMU_CHECK=0 for plain arrays */
#endif

/* ---------------------------------------------------------------------------------------------------- */
/* Qualifiers                                                                                            */

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static thread_local
#define __constant__
#define __managed__
#define __grid_constant__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(n) __attribute__((aligned(n)))
#define CUDARTAPI
#define CUDART_CB
#define CUBLASAPI

/* ---------------------------------------------------------------------------------------------------- */
/* Vector types (CUDA's alignments)                                                                      */

#define PEA_EMU_VEC(T, name, a2, a4)                                                                   \
    struct name##1 { T x; };                                                                           \
    struct __attribute__((aligned(a2))) name##2 { T x, y; };                                           \
    struct name##3 { T x, y, z; };                                                                     \
    struct __attribute__((aligned(a4))) name##4 { T x, y, z, w; };                                     \
    static inline name##1 make_##name##1(T x) { name##1 v; v.x = x; return v; }                        \
    static inline name##2 make_##name##2(T x, T y) { name##2 v; v.x = x; v.y = y; return v; }          \
    static inline name##3 make_##name##3(T x, T y, T z) { name##3 v; v.x = x; v.y = y; v.z = z; return v; } \
    static inline name##4 make_##name##4(T x, T y, T z, T w) {                                         \
        name##4 v; v.x = x; v.y = y; v.z = z; v.w = w; return v;                                       \
    }
PEA_EMU_VEC(signed char, char, 2, 4)
PEA_EMU_VEC(unsigned char, uchar, 2, 4)
PEA_EMU_VEC(short, short, 4, 8)
PEA_EMU_VEC(unsigned short, ushort, 4, 8)
PEA_EMU_VEC(int, int, 8, 16)
PEA_EMU_VEC(unsigned int, uint, 8, 16)
PEA_EMU_VEC(long long, longlong, 16, 16)
PEA_EMU_VEC(unsigned long long, ulonglong, 16, 16)
PEA_EMU_VEC(float, float, 8, 16)
PEA_EMU_VEC(double, double, 16, 16)
#undef PEA_EMU_VEC

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

/* ---------------------------------------------------------------------------------------------------- */
/* The runtime API (CPU stand-ins, src/runtime.cpp). Enumerator values are CUDA's.                       */

extern "C" {

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidPitchValue = 12,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorIllegalState = 401,
    cudaErrorNotReady = 600,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchTimeout = 702,
    cudaErrorAssert = 710,
    cudaErrorLaunchFailure = 719,
    cudaErrorNotSupported = 801,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
    cudaErrorStreamCaptureUnmatched = 903,
    cudaErrorCapturedEvent = 907,
    cudaErrorUnknown = 999
} cudaError_t;

typedef enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
} cudaMemcpyKind;

typedef enum cudaFuncAttribute {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
    cudaFuncAttributePreferredSharedMemoryCarveout = 9
} cudaFuncAttribute;

typedef enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxBlockDimX = 2,
    cudaDevAttrMaxBlockDimY = 3,
    cudaDevAttrMaxBlockDimZ = 4,
    cudaDevAttrMaxGridDimX = 5,
    cudaDevAttrMaxGridDimY = 6,
    cudaDevAttrMaxGridDimZ = 7,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrTotalConstantMemory = 9,
    cudaDevAttrWarpSize = 10,
    cudaDevAttrMaxRegistersPerBlock = 12,
    cudaDevAttrClockRate = 13,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrGlobalMemoryBusWidth = 37,
    cudaDevAttrL2CacheSize = 38,
    cudaDevAttrMaxThreadsPerMultiProcessor = 39,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
    cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
} cudaDeviceAttr;

typedef enum cudaDataType_t {
    CUDA_R_32F = 0,
    CUDA_R_64F = 1,
    CUDA_R_16F = 2,
    CUDA_R_8I = 3,
    CUDA_R_32I = 10,
    CUDA_R_16BF = 14
} cudaDataType_t;
typedef cudaDataType_t cudaDataType;

#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaStreamLegacy ((cudaStream_t)0x1)
#define cudaStreamPerThread ((cudaStream_t)0x2)
#define cudaEventDefault 0x00
#define cudaEventBlockingSync 0x01
#define cudaEventDisableTiming 0x02
#define cudaHostAllocDefault 0x00
#define cudaHostAllocPortable 0x01
#define cudaHostAllocMapped 0x02
#define cudaHostAllocWriteCombined 0x04
#define cudaHostRegisterDefault 0x00
#define cudaMemAttachGlobal 0x01

typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
typedef struct CUgraph_st *cudaGraph_t;          /* a captured sequence of work (cudaStreamEndCapture) */
typedef struct CUgraphExec_st *cudaGraphExec_t;  /* its instantiation, launched with cudaGraphLaunch */

/* Who may not make "potentially unsafe" calls (cudaMalloc, synchronous copies, …) while a capture runs:
 * everyone (Global), the capturing thread (ThreadLocal), nobody (Relaxed). */
typedef enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2
} cudaStreamCaptureMode;
typedef enum cudaStreamCaptureStatus {
    cudaStreamCaptureStatusNone = 0,
    cudaStreamCaptureStatusActive = 1,
    cudaStreamCaptureStatusInvalidated = 2
} cudaStreamCaptureStatus;
typedef void (*cudaHostFn_t)(void *userData);

/* The emulated device. Only fields that CUDA 11.8 and 13.x both have. */
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    int regsPerBlock;
    int warpSize;
    size_t memPitch;
    int maxThreadsPerBlock;
    int maxThreadsDim[3];
    int maxGridSize[3];
    size_t totalConstMem;
    int major;
    int minor;
    size_t textureAlignment;
    int multiProcessorCount;
    int integrated;
    int canMapHostMemory;
    int concurrentKernels;
    int ECCEnabled;
    int pciBusID;
    int pciDeviceID;
    int pciDomainID;
    int asyncEngineCount;
    int unifiedAddressing;
    int memoryBusWidth;
    int l2CacheSize;
    int maxThreadsPerMultiProcessor;
    size_t sharedMemPerMultiprocessor;
    int regsPerMultiprocessor;
    int managedMemory;
    int isMultiGpuBoard;
    size_t sharedMemPerBlockOptin;
    int cooperativeLaunch;
    int maxBlocksPerMultiProcessor;
};

cudaError_t cudaMalloc(void **devPtr, size_t size);
cudaError_t cudaFree(void *devPtr);
cudaError_t cudaMallocAsync(void **devPtr, size_t size, cudaStream_t stream);
cudaError_t cudaMallocManaged(void **devPtr, size_t size, unsigned int flags);
cudaError_t cudaFreeAsync(void *devPtr, cudaStream_t stream);
cudaError_t cudaMallocHost(void **ptr, size_t size);
cudaError_t cudaHostAlloc(void **ptr, size_t size, unsigned int flags);
cudaError_t cudaFreeHost(void *ptr);
cudaError_t cudaHostRegister(void *ptr, size_t size, unsigned int flags);
cudaError_t cudaHostUnregister(void *ptr);
cudaError_t cudaMemGetInfo(size_t *free, size_t *total);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaMemcpy2D(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height,
                         cudaMemcpyKind kind);
cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                              size_t height, cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaMemset(void *devPtr, int value, size_t count);
cudaError_t cudaMemsetAsync(void *devPtr, int value, size_t count, cudaStream_t stream);

cudaError_t cudaStreamCreate(cudaStream_t *stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamQuery(cudaStream_t stream);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags);
cudaError_t cudaLaunchHostFunc(cudaStream_t stream, cudaHostFn_t fn, void *userData);

/* Stream capture and graphs: while a stream captures, its launches, async copies/memsets, host functions and
 * cuBLAS calls are recorded (arguments by value) instead of run; a launched graph runs them in order. */
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus *status);
/* Swaps the calling thread's capture interaction mode (which unsafe calls it may make during a capture). */
cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode *mode);
cudaError_t cudaGraphInstantiateWithFlags(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);

cudaError_t cudaEventCreate(cudaEvent_t *event);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);

cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorString(cudaError_t error);
const char *cudaGetErrorName(cudaError_t error);

cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaDeviceReset(void);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device);
cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device);
cudaError_t cudaDriverGetVersion(int *version);
cudaError_t cudaRuntimeGetVersion(int *version);
cudaError_t cudaFuncSetAttribute(const void *func, cudaFuncAttribute attr, int value);

/* Emulator-only controls (tests, tools). Not part of CUDA: guard their use with #ifdef PEA_EMU. */
void pea_emu_set_threads(int n);          /* CPU threads that run blocks; n ≤ 0: PEA_EMU_THREADS or all CPUs */
int pea_emu_get_threads(void);
enum { PEA_EMU_FORWARD = 0, PEA_EMU_REVERSE = 1, PEA_EMU_RANDOM = 2 };
void pea_emu_set_schedule(int order, unsigned long long seed); /* the order fibers of a block run in */
void pea_emu_set_quiet(int quiet);        /* 1: do not print kernel/API errors to stderr */
const char *pea_emu_last_message(void);   /* the message of the last error on this host thread, or "" */
/* PEA_EMU_SKIP_KERNELS=1 (or pea_emu_set_skip_kernels(1)): kernel launches and cuBLAS GEMMs are checked but not
 * run (their outputs keep whatever they held), so a program's own host cost — what it spends per op to queue
 * work — can be timed without a GPU. Copies and memsets still run. */
void pea_emu_set_skip_kernels(int skip);
int pea_emu_skipping_kernels(void);

} /* extern "C" */

template <class T>
static inline cudaError_t cudaMalloc(T **devPtr, size_t size) {
    return cudaMalloc(reinterpret_cast<void **>(devPtr), size);
}
template <class T>
static inline cudaError_t cudaMallocHost(T **ptr, size_t size) {
    return cudaMallocHost(reinterpret_cast<void **>(ptr), size);
}
template <class T>
static inline cudaError_t cudaFuncSetAttribute(T *entry, cudaFuncAttribute attr, int value) {
    return cudaFuncSetAttribute(reinterpret_cast<const void *>(entry), attr, value);
}
template <class T>
static inline cudaError_t cudaMemcpyToSymbol(T &symbol, const void *src, size_t count, size_t offset = 0,
                                             cudaMemcpyKind kind = cudaMemcpyHostToDevice) {
    if (offset + count > sizeof(T)) return cudaErrorInvalidValue;
    (void)kind;
    memcpy(reinterpret_cast<char *>(&symbol) + offset, src, count);
    return cudaSuccess;
}
template <class T>
static inline cudaError_t cudaMemcpyFromSymbol(void *dst, const T &symbol, size_t count, size_t offset = 0,
                                               cudaMemcpyKind kind = cudaMemcpyDeviceToHost) {
    if (offset + count > sizeof(T)) return cudaErrorInvalidValue;
    (void)kind;
    memcpy(dst, reinterpret_cast<const char *>(&symbol) + offset, count);
    return cudaSuccess;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Built-in variables: set by the scheduler each time it switches to a fiber (fibers never change CPU
 * thread, so a thread-local variable is fiber-local while the fiber runs).                              */

extern __thread uint3 threadIdx;
extern __thread uint3 blockIdx;
extern __thread uint3 blockDim;
extern __thread uint3 gridDim;
static constexpr int warpSize = 32;

namespace pea_emu {

/* The emulator's internal entry points (src/simt.cpp). */
enum WarpOp {
    W_SHFL_IDX, W_SHFL_UP, W_SHFL_DOWN, W_SHFL_XOR, W_SYNCWARP, W_BALLOT, W_ANY, W_ALL,
    W_REDUCE_ADD, W_REDUCE_MIN, W_REDUCE_MAX, W_REDUCE_UMIN, W_REDUCE_UMAX,
    W_REDUCE_AND, W_REDUCE_OR, W_REDUCE_XOR, W_ACTIVEMASK, W_MMA, W_GATHER
};
/* The warp-level matrix multiply-accumulates (PTX mma.sync.aligned.*), by their PTX shape and types. */
enum MmaKind { MMA_M16N8K16_F32_F16 = 0, MMA_M16N8K16_F32_BF16 = 1 };
enum BarrierMode { B_SYNC, B_COUNT, B_AND, B_OR };
unsigned long long warp_op(int op, unsigned mask, unsigned long long value, int arg, int width,
                           const char *file, int line);
int block_barrier(int mode, int pred, const char *file, int line);
void shared_enter(void *p, size_t bytes, const char *name, const char *file, int line);
[[noreturn]] void shared_oob(const void *base, long long i, long long j, long long n, long long m);
[[noreturn]] void dynamic_oob(const char *name, long long i, long long n, size_t elem);
void *dynamic_shared(size_t *bytes);
[[noreturn]] void trap(const char *what, const char *file, int line);
/* c += a·b for one warp: every lane passes its fragments of A, B and C/D in the PTX layout of `kind`; the
 * call completes when all 32 lanes of the warp have made it (src/simt.cpp). */
void warp_mma(int kind, float c[4], const unsigned a[4], const unsigned b[2], const char *file, int line);
/* Every lane's four words to every lane (the exchange behind ldmatrix); *lane is the caller's lane. All 32
 * lanes of the warp must make the same call. */
void warp_gather4(const unsigned mine[4], unsigned all[32][4], int *lane, const char *file, int line);
/* cp.async: queue a copy of src_bytes from global memory to shared memory, zero-filling to `bytes`; commit
 * closes the thread's open group; wait(n) carries out the thread's oldest committed groups until at most n
 * remain in flight (src/simt.cpp). */
void cp_async(void *dst, const void *src, int bytes, int src_bytes, const char *file, int line);
void cp_async_commit();
void cp_async_wait(int pending);

template <class T>
static inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp intrinsics exchange values of at most 8 bytes");
    unsigned long long b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
static inline T from_bits(unsigned long long b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

} // namespace pea_emu

/* ---------------------------------------------------------------------------------------------------- */
/* Synchronisation and warp intrinsics. The call site (file:line) rides along for error messages.        */

static inline void __syncthreads(const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    pea_emu::block_barrier(pea_emu::B_SYNC, 0, file, line);
}
static inline int __syncthreads_count(int pred, const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    return pea_emu::block_barrier(pea_emu::B_COUNT, pred, file, line);
}
static inline int __syncthreads_and(int pred, const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    return pea_emu::block_barrier(pea_emu::B_AND, pred, file, line);
}
static inline int __syncthreads_or(int pred, const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    return pea_emu::block_barrier(pea_emu::B_OR, pred, file, line);
}
static inline void __syncwarp(unsigned mask = 0xffffffffu, const char *file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    pea_emu::warp_op(pea_emu::W_SYNCWARP, mask, 0, 0, 32, file, line);
}
/* The lanes of the warp that reach this __activemask() call together: the emulator's notion of convergence
 * (exited lanes, and lanes waiting elsewhere, are not in it). */
static inline unsigned __activemask(const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    return (unsigned)pea_emu::warp_op(pea_emu::W_ACTIVEMASK, 0, 0, 0, 32, file, line);
}

template <class T>
static inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32,
                            const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    return pea_emu::from_bits<T>(pea_emu::warp_op(pea_emu::W_SHFL_IDX, mask, pea_emu::to_bits(var), srcLane,
                                                  width, file, line));
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                               const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    return pea_emu::from_bits<T>(pea_emu::warp_op(pea_emu::W_SHFL_UP, mask, pea_emu::to_bits(var), (int)delta,
                                                  width, file, line));
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                                 const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    return pea_emu::from_bits<T>(pea_emu::warp_op(pea_emu::W_SHFL_DOWN, mask, pea_emu::to_bits(var),
                                                  (int)delta, width, file, line));
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32,
                                const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    return pea_emu::from_bits<T>(pea_emu::warp_op(pea_emu::W_SHFL_XOR, mask, pea_emu::to_bits(var), laneMask,
                                                  width, file, line));
}
static inline unsigned __ballot_sync(unsigned mask, int pred, const char *file = __builtin_FILE(),
                                     int line = __builtin_LINE()) {
    return (unsigned)pea_emu::warp_op(pea_emu::W_BALLOT, mask, pred != 0, 0, 32, file, line);
}
static inline int __any_sync(unsigned mask, int pred, const char *file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    return (int)pea_emu::warp_op(pea_emu::W_ANY, mask, pred != 0, 0, 32, file, line);
}
static inline int __all_sync(unsigned mask, int pred, const char *file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    return (int)pea_emu::warp_op(pea_emu::W_ALL, mask, pred != 0, 0, 32, file, line);
}
#define PEA_EMU_REDUCE(name, op, T)                                                                    \
    static inline T name(unsigned mask, T value, const char *file = __builtin_FILE(),                  \
                         int line = __builtin_LINE()) {                                                \
        return (T)pea_emu::warp_op(op, mask, (unsigned)value, 0, 32, file, line);                      \
    }
PEA_EMU_REDUCE(__reduce_add_sync, pea_emu::W_REDUCE_ADD, unsigned)
PEA_EMU_REDUCE(__reduce_add_sync, pea_emu::W_REDUCE_ADD, int)
PEA_EMU_REDUCE(__reduce_min_sync, pea_emu::W_REDUCE_UMIN, unsigned)
PEA_EMU_REDUCE(__reduce_min_sync, pea_emu::W_REDUCE_MIN, int)
PEA_EMU_REDUCE(__reduce_max_sync, pea_emu::W_REDUCE_UMAX, unsigned)
PEA_EMU_REDUCE(__reduce_max_sync, pea_emu::W_REDUCE_MAX, int)
PEA_EMU_REDUCE(__reduce_and_sync, pea_emu::W_REDUCE_AND, unsigned)
PEA_EMU_REDUCE(__reduce_or_sync, pea_emu::W_REDUCE_OR, unsigned)
PEA_EMU_REDUCE(__reduce_xor_sync, pea_emu::W_REDUCE_XOR, unsigned)
#undef PEA_EMU_REDUCE

/* Tensor-core matrix multiply-accumulate, one warp: D = A·B + C with A 16×16 (row), B 16×8 (col), C = D
 * 16×8 f32, as PTX `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 {c}, {a}, {b}, {c}`.
 * pea_simt.h documents the fragment layout; under nvcc the same functions are that inline PTX. Every lane of
 * the warp must call the same one (a warp of fewer than 32 live lanes is an error, as .aligned demands). The
 * emulator multiplies exactly and accumulates in double, then rounds once to f32 (the hardware's f32
 * accumulation order is unspecified: compare with tolerances). */
static inline void pea_mma_m16n8k16_f16(float c[4], const unsigned a[4], const unsigned b[2],
                                        const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    pea_emu::warp_mma(pea_emu::MMA_M16N8K16_F32_F16, c, a, b, file, line);
}
static inline void pea_mma_m16n8k16_bf16(float c[4], const unsigned a[4], const unsigned b[2],
                                         const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    pea_emu::warp_mma(pea_emu::MMA_M16N8K16_F32_BF16, c, a, b, file, line);
}

/* ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: four 8×8 matrices of 16-bit values from shared memory
 * into each lane's r[0..3]. Lane l gives, in `smem[at]`, the start of row l % 8 of matrix l / 8 (16 bytes,
 * 16-byte aligned). Lane l (g = l / 4, t = l % 4) receives in r[i] row g, columns 2t and 2t+1 of matrix i, or
 * with .trans the transposed matrix's: rows 2t and 2t+1 of column g. pea_simt.h documents the call. */
static inline void pea_emu_ldmatrix_x4(unsigned r[4], const void *row, bool trans, const char *file, int line) {
    if ((uintptr_t)row % 16 != 0) pea_emu::trap("ldmatrix: a row address that is not 16-byte aligned", file, line);
    unsigned mine[4], all[32][4];
    memcpy(mine, row, sizeof mine);
    int lane = 0;
    pea_emu::warp_gather4(mine, all, &lane, file, line);
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; i++) {
        if (!trans) {
            r[i] = all[8 * i + g][t];
        } else {
            const unsigned lo = (all[8 * i + 2 * t][g >> 1] >> (16 * (g & 1))) & 0xffffu;
            const unsigned hi = (all[8 * i + 2 * t + 1][g >> 1] >> (16 * (g & 1))) & 0xffffu;
            r[i] = lo | (hi << 16);
        }
    }
}
template <class S>
static inline void pea_ldmatrix_x4(unsigned r[4], S smem, int at, const char *file = __builtin_FILE(),
                                   int line = __builtin_LINE()) {
    (void)smem[at + 7]; /* the row's last element: bounds-checked like the first */
    pea_emu_ldmatrix_x4(r, &smem[at], false, file, line);
}
template <class S>
static inline void pea_ldmatrix_x4_trans(unsigned r[4], S smem, int at, const char *file = __builtin_FILE(),
                                         int line = __builtin_LINE()) {
    (void)smem[at + 7];
    pea_emu_ldmatrix_x4(r, &smem[at], true, file, line);
}
/* cp.async.cg.shared.global [smem + at], [src], 16, src_bytes: `smem[at]` is the first of 16 bytes of shared
 * memory (S's element may be 2, 4 or 16 bytes wide); src_bytes (0 or 16) are read, the rest zero-filled. */
template <class S>
static inline void pea_cp_async16(S smem, int at, const void *src, int src_bytes,
                                  const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    using E = typename std::remove_reference<decltype(smem[at])>::type;
    (void)smem[at + (int)(16 / sizeof(E)) - 1];
    pea_emu::cp_async(&smem[at], src, 16, src_bytes, file, line);
}
static inline void pea_cp_async_commit() { pea_emu::cp_async_commit(); }
template <int N>
static inline void pea_cp_async_wait() { pea_emu::cp_async_wait(N); }
/* ex2.approx.ftz.f32: 2^x (here correctly rounded; the GPU's is within 2 ulp), subnormal results flushed to 0. */
static inline float pea_ex2(float x) {
    const float y = exp2f(x);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __nanosleep(unsigned ns) { (void)ns; } /* a spin-wait on another thread still hangs */
static inline void __trap(const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    pea_emu::trap("__trap()", file, line);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Atomics: real atomics, since blocks run on several CPU threads (CUDA's are relaxed).                  */

#define PEA_EMU_ATOMIC_INT(T)                                                                          \
    static inline T atomicAdd(T *a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }        \
    static inline T atomicSub(T *a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }        \
    static inline T atomicExch(T *a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }      \
    static inline T atomicAnd(T *a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }        \
    static inline T atomicOr(T *a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }          \
    static inline T atomicXor(T *a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }        \
    static inline T atomicCAS(T *a, T compare, T v) {                                                  \
        __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);        \
        return compare;                                                                                \
    }                                                                                                  \
    static inline T atomicMax(T *a, T v) {                                                             \
        T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                  \
        while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
        }                                                                                              \
        return old;                                                                                    \
    }                                                                                                  \
    static inline T atomicMin(T *a, T v) {                                                             \
        T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                  \
        while (old > v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
        }                                                                                              \
        return old;                                                                                    \
    }
PEA_EMU_ATOMIC_INT(int)
PEA_EMU_ATOMIC_INT(unsigned int)
PEA_EMU_ATOMIC_INT(unsigned long long)
PEA_EMU_ATOMIC_INT(long long)
#undef PEA_EMU_ATOMIC_INT

static inline unsigned short atomicCAS(unsigned short *a, unsigned short compare, unsigned short v) {
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;
}
/* ((old >= v) ? 0 : old + 1) and (((old == 0) || (old > v)) ? v : old - 1), as CUDA documents. */
static inline unsigned atomicInc(unsigned *a, unsigned v) {
    unsigned old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(a, &old, old >= v ? 0u : old + 1u, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
static inline unsigned atomicDec(unsigned *a, unsigned v) {
    unsigned old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(a, &old, (old == 0 || old > v) ? v : old - 1u, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
    return old;
}

namespace pea_emu {
/* f(old) applied atomically to the bits of a 4- or 8-byte value; returns the old value. */
template <class T, class U, class F>
static inline T atomic_update(T *a, F f) {
    static_assert(sizeof(T) == sizeof(U), "");
    U *p = reinterpret_cast<U *>(a);
    U old = __atomic_load_n(p, __ATOMIC_RELAXED);
    for (;;) {
        T o, n;
        memcpy(&o, &old, sizeof(T));
        n = f(o);
        U nb;
        memcpy(&nb, &n, sizeof(T));
        if (__atomic_compare_exchange_n(p, &old, nb, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return o;
    }
}
} // namespace pea_emu

static inline float atomicAdd(float *a, float v) {
    return pea_emu::atomic_update<float, uint32_t>(a, [v](float o) { return o + v; });
}
static inline double atomicAdd(double *a, double v) {
    return pea_emu::atomic_update<double, uint64_t>(a, [v](double o) { return o + v; });
}
static inline float atomicExch(float *a, float v) {
    return pea_emu::atomic_update<float, uint32_t>(a, [v](float) { return v; });
}
/* atomicMax/atomicMin on float are not CUDA intrinsics; kernels build them from atomicCAS on the bits. */

/* ---------------------------------------------------------------------------------------------------- */
/* Math. The float functions of <math.h> (expf, tanhf, erff, fmaxf, fmaf, …) are already global; the
 * device intrinsics map to the correctly rounded host functions (the GPU's fast ones are less accurate). */

static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
/* glibc's <math.h> declares (but does not export) these names as extern "C": define them to match. */
extern "C" {
inline float __expf(float x) noexcept { return expf(x); }
inline float __exp10f(float x) noexcept { return exp10f(x); }
inline float __logf(float x) noexcept { return logf(x); }
inline float __log2f(float x) noexcept { return log2f(x); }
inline float __log10f(float x) noexcept { return log10f(x); }
inline float __powf(float x, float y) noexcept { return powf(x, y); }
inline float __sinf(float x) noexcept { return sinf(x); }
inline float __cosf(float x) noexcept { return cosf(x); }
inline float __tanf(float x) noexcept { return tanf(x); }
inline void __sincosf(float x, float *s, float *c) noexcept { *s = sinf(x); *c = cosf(x); }
}
static inline float __fdividef(float a, float b) { return a / b; }
static inline float fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); } /* NaN → 0 */
static inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
static inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
static inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
static inline unsigned __float_as_uint(float x) { unsigned i; memcpy(&i, &x, 4); return i; }
static inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }
static inline long long __double_as_longlong(double x) { long long i; memcpy(&i, &x, 8); return i; }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)truncf(x); }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
static inline float __int2float_rn(int x) { return (float)x; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
static inline int __mul24(int a, int b) { return a * b; }
static inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
#if defined(__x86_64__) || defined(__i386__)
static inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }
#endif

template <class T>
static inline T __ldg(const T *p) { return *p; }
template <class T>
static inline T __ldcg(const T *p) { return *p; }
template <class T>
static inline T __ldcs(const T *p) { return *p; }
template <class T>
static inline T __ldlu(const T *p) { return *p; }
template <class T>
static inline void __stcg(T *p, T v) { *p = v; }
template <class T>
static inline void __stcs(T *p, T v) { *p = v; }
template <class T>
static inline void __stwt(T *p, T v) { *p = v; }

/* CUDA's max/min overloads: integer arguments compare as their common type; floating point ones follow
 * fmax/fmin (a NaN argument is ignored). */
template <class A, class B, class R = typename std::common_type<A, B>::type,
          class = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
static inline R max(A a, B b) {
    if constexpr (std::is_floating_point<R>::value) return (R)std::fmax((R)a, (R)b);
    else return (R)a > (R)b ? (R)a : (R)b;
}
template <class A, class B, class R = typename std::common_type<A, B>::type,
          class = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
static inline R min(A a, B b) {
    if constexpr (std::is_floating_point<R>::value) return (R)std::fmin((R)a, (R)b);
    else return (R)a < (R)b ? (R)a : (R)b;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Shared memory declarations (pea_simt.h documents the macros).                                         */

namespace pea_emu {

template <class T, long long N>
struct SharedArray {
    alignas(16) T data[N];
    template <class I>
    T &operator[](I i) {
        static_assert(std::is_integral<I>::value || std::is_enum<I>::value, "shared array index must be an integer");
        if ((unsigned long long)(long long)i >= (unsigned long long)N) shared_oob(data, (long long)i, -1, N, -1);
        return data[(long long)i];
    }
    operator T *() { return data; }
};

template <class T, long long R, long long C>
struct SharedArray2D {
    alignas(16) T data[R][C];
    struct Row {
        T *p;
        const void *base;
        long long r;
        template <class I>
        T &operator[](I c) const {
            static_assert(std::is_integral<I>::value || std::is_enum<I>::value, "shared array index must be an integer");
            if ((unsigned long long)(long long)c >= (unsigned long long)C) shared_oob(base, r, (long long)c, R, C);
            return p[(long long)c];
        }
        operator T *() const { return p; }
    };
    template <class I>
    Row operator[](I r) {
        static_assert(std::is_integral<I>::value || std::is_enum<I>::value, "shared array index must be an integer");
        if ((unsigned long long)(long long)r >= (unsigned long long)R) shared_oob(data, (long long)r, -2, R, C);
        return Row{data[(long long)r], data, (long long)r};
    }
    operator T *() { return &data[0][0]; }
};

template <class S>
static inline S &shared_bind(S &s, const char *name, const char *file, int line) {
    shared_enter(&s, sizeof(s), name, file, line);
    return s;
}

/* A checked pointer into the launch's dynamic shared memory: element `off` of `n` elements at `base`. */
template <class T>
struct SharedPtr {
    T *base;
    long long off, n;
    const char *name;
    template <class I>
    T &operator[](I i) const {
        static_assert(std::is_integral<I>::value || std::is_enum<I>::value, "shared memory index must be an integer");
        long long k = off + (long long)i;
        if (k < 0 || k >= n) dynamic_oob(name, k, n, sizeof(T));
        return base[k];
    }
    T &operator*() const { return (*this)[0]; }
    T *operator->() const { return &(*this)[0]; }
    template <class I, class = typename std::enable_if<std::is_integral<I>::value>::type>
    SharedPtr operator+(I d) const { return SharedPtr{base, off + (long long)d, n, name}; }
    template <class I, class = typename std::enable_if<std::is_integral<I>::value>::type>
    SharedPtr operator-(I d) const { return SharedPtr{base, off - (long long)d, n, name}; }
    template <class I, class = typename std::enable_if<std::is_integral<I>::value>::type>
    SharedPtr &operator+=(I d) { off += (long long)d; return *this; }
    template <class I, class = typename std::enable_if<std::is_integral<I>::value>::type>
    SharedPtr &operator-=(I d) { off -= (long long)d; return *this; }
    SharedPtr &operator++() { ++off; return *this; }
    SharedPtr &operator--() { --off; return *this; }
    operator T *() const { return reinterpret_cast<T *>(reinterpret_cast<uintptr_t>(base) + off * (long long)sizeof(T)); }
};

template <class T>
static inline SharedPtr<T> dynamic_shared_ptr(const char *name) {
    size_t bytes = 0;
    T *p = static_cast<T *>(dynamic_shared(&bytes));
    return SharedPtr<T>{p, 0, (long long)(bytes / sizeof(T)), name};
}
template <class T>
static inline T *dynamic_shared_raw() {
    size_t bytes = 0;
    return static_cast<T *>(dynamic_shared(&bytes));
}

} // namespace pea_emu

#if PEA_EMU_CHECK
#define PEA_SHARED_ARRAY(T, name, n)                                                                   \
    static thread_local ::pea_emu::SharedArray<T, (n)> pea_shared_##name;                              \
    ::pea_emu::SharedArray<T, (n)> &name = ::pea_emu::shared_bind(pea_shared_##name, #name, __FILE__, __LINE__)
#define PEA_SHARED_ARRAY_2D(T, name, rows, cols)                                                       \
    static thread_local ::pea_emu::SharedArray2D<T, (rows), (cols)> pea_shared_##name;                 \
    ::pea_emu::SharedArray2D<T, (rows), (cols)> &name =                                                \
        ::pea_emu::shared_bind(pea_shared_##name, #name, __FILE__, __LINE__)
#define PEA_DYNAMIC_SHARED(T, name) ::pea_emu::SharedPtr<T> name = ::pea_emu::dynamic_shared_ptr<T>(#name)
#else
#define PEA_SHARED_ARRAY(T, name, n)                                                                   \
    alignas(16) static thread_local T pea_shared_##name[n];                                            \
    auto &name = ::pea_emu::shared_bind(pea_shared_##name, #name, __FILE__, __LINE__)
#define PEA_SHARED_ARRAY_2D(T, name, rows, cols)                                                       \
    alignas(16) static thread_local T pea_shared_##name[rows][cols];                                   \
    auto &name = ::pea_emu::shared_bind(pea_shared_##name, #name, __FILE__, __LINE__)
#define PEA_DYNAMIC_SHARED(T, name) T *name = ::pea_emu::dynamic_shared_raw<T>()
#endif
#define PEA_SHARED_VAR(T, name)                                                                        \
    static thread_local T pea_shared_##name;                                                           \
    T &name = ::pea_emu::shared_bind(pea_shared_##name, #name, __FILE__, __LINE__)

/* ---------------------------------------------------------------------------------------------------- */
/* Launch                                                                                                */

namespace pea_emu {

struct Launch {
    const char *name;      /* the kernel expression as written in PEA_LAUNCH */
    const void *func;      /* the kernel's address: the key of cudaFuncSetAttribute */
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    void (*entry)(void *); /* runs the kernel body for the current fiber */
    void *ctx;
    void *(*clone)(const void *ctx); /* a heap copy of ctx (the converted arguments), for a captured launch */
    void (*release)(void *ctx);      /* frees a clone */
    const void *const *pointers; /* each argument that is a data pointer, else nullptr */
    int nargs;
};
void launch(const Launch &l);

/* A kernel argument as a data pointer (checked at launch: device memory or pinned host memory), or nullptr. */
template <class T>
static inline const void *data_pointer(const T &v) {
    if constexpr (std::is_pointer<T>::value && !std::is_function<typename std::remove_pointer<T>::type>::value)
        return (const void *)v;
    else
        return nullptr;
}
template <class Tuple, size_t... I>
static inline void data_pointers(const Tuple &t, const void **out, std::index_sequence<I...>) {
    ((out[I] = data_pointer(std::get<I>(t))), ...);
}

/* Arguments are converted to the kernel's parameter types once, on the host, as <<<>>> does; each thread
 * then receives its own copy. */
template <class... P, class... A>
static inline void launch_kernel(const char *name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                                 cudaStream_t stream, A &&...args) {
    static_assert(sizeof...(P) == sizeof...(A), "PEA_LAUNCH: wrong number of kernel arguments");
    struct Closure {
        void (*kernel)(P...);
        std::tuple<typename std::decay<P>::type...> params;
    };
    Closure c{kernel, std::tuple<typename std::decay<P>::type...>(std::forward<A>(args)...)};
    Launch l;
    l.name = name;
    l.func = reinterpret_cast<const void *>(kernel);
    l.grid = grid;
    l.block = block;
    l.smem = smem;
    l.stream = stream;
    l.entry = [](void *p) {
        Closure *cl = static_cast<Closure *>(p);
        std::apply(cl->kernel, cl->params);
    };
    l.ctx = &c;
    l.clone = [](const void *p) -> void * { return new Closure(*static_cast<const Closure *>(p)); };
    l.release = [](void *p) { delete static_cast<Closure *>(p); };
    const void *pointers[sizeof...(P) + 1] = {nullptr};
    data_pointers(c.params, pointers, std::index_sequence_for<P...>{});
    l.pointers = pointers;
    l.nargs = (int)sizeof...(P);
    launch(l);
}

} // namespace pea_emu

#define PEA_LAUNCH(kernel, grid, block, smem, stream, ...) \
    ::pea_emu::launch_kernel(#kernel, kernel, (grid), (block), (smem), (stream), ##__VA_ARGS__)

#endif /* PEA_CUDA_EMU_H */
