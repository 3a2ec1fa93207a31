/*
 * context.cu — the context of the CUDA backend: the device, the one stream every op is queued on, the
 * cuBLAS handle bound to that stream, error messages that name the op, device information, the TF32 flag,
 * and the synchronising calls (pea_cuda_synchronize; pea_cuda_download lives with the memory calls).
 *
 * Errors. Every pea_cuda_* call returns PEA_CUDA_OK or a code; on failure ctx->message holds
 * "<op>: <what went wrong>" (pea_cuda_last_error). A kernel that faults on the GPU (an illegal address, say)
 * is reported asynchronously by CUDA at the next synchronising call, which then names itself ("download:
 * a queued kernel failed: …"): CUDA cannot tell which queued kernel it was. Bad data found on the device
 * (an embedding id out of range) is written to a small device record and reported the same way, with the op
 * that found it named in the message.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

extern "C" int pea_cuda_abi_version(void) { return PEA_CUDA_ABI_VERSION; }

/* ---------------------------------------------------------------------------------------------------- */
/* Errors                                                                                                */

static void vformat(char *buf, size_t size, const char *op, const char *fmt, va_list ap) {
    int n = snprintf(buf, size, "%s: ", op ? op : "pea_cuda");
    if (n < 0 || (size_t)n >= size) return;
    vsnprintf(buf + n, size - (size_t)n, fmt, ap);
}

int pea_fail(pea_cuda_context *ctx, int code, const char *op, const char *fmt, ...) {
    if (!ctx) return code;
    va_list ap;
    va_start(ap, fmt);
    vformat(ctx->message, sizeof ctx->message, op, fmt, ap);
    va_end(ap);
    if (ctx->capture && !ctx->capture_failure[0]) /* the reason pea_cuda_graph_end will give */
        snprintf(ctx->capture_failure, sizeof ctx->capture_failure, "%s", ctx->message);
    return code;
}

int pea_check_cuda(pea_cuda_context *ctx, const char *op, cudaError_t e, const char *what) {
    if (e == cudaSuccess) return PEA_CUDA_OK;
    cudaGetLastError(); /* an API error is not a launch failure: keep the next launch check clean */
    int code = e == cudaErrorMemoryAllocation ? PEA_CUDA_ERROR_OUT_OF_MEMORY : PEA_CUDA_ERROR_KERNEL;
    return pea_fail(ctx, code, op, "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

int pea_check_cublas(pea_cuda_context *ctx, const char *op, cublasStatus_t s, const char *what) {
    if (s == CUBLAS_STATUS_SUCCESS) return PEA_CUDA_OK;
    int code = s == CUBLAS_STATUS_INVALID_VALUE ? PEA_CUDA_ERROR_INVALID
               : s == CUBLAS_STATUS_ALLOC_FAILED ? PEA_CUDA_ERROR_OUT_OF_MEMORY
                                                 : PEA_CUDA_ERROR_KERNEL;
    return pea_fail(ctx, code, op, "%s: %s (%s)", what, cublasGetStatusName(s), cublasGetStatusString(s));
}

int pea_check_launch(pea_cuda_context *ctx, const char *op, const char *kernel) {
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return PEA_CUDA_OK;
    return pea_fail(ctx, PEA_CUDA_ERROR_KERNEL, op, "launch of %s: %s (%s)", kernel, cudaGetErrorName(e),
                    cudaGetErrorString(e));
}

int pea_enter(pea_cuda_context *ctx, const char *op) {
    /* Cheap when the device is already current; needed when the caller's thread has another one. */
    return pea_check_cuda(ctx, op, cudaSetDevice(ctx->device), "cudaSetDevice");
}

int pea_check_device_error(pea_cuda_context *ctx, const char *op) {
    if (!ctx->error_check_pending) return PEA_CUDA_OK;
    /* The stream is idle (the caller synchronised), so the record is final. */
    PEA_TRY(pea_check_cuda(ctx, op, cudaMemcpy(ctx->h_error, ctx->d_error, sizeof(pea_device_error),
                                               cudaMemcpyDeviceToHost), "reading the device error record"));
    ctx->error_check_pending = 0;
    pea_device_error rec = *ctx->h_error;
    if (!rec.flag) return PEA_CUDA_OK;
    PEA_TRY(pea_check_cuda(ctx, op, cudaMemsetAsync(ctx->d_error, 0, sizeof(pea_device_error), ctx->stream),
                           "clearing the device error record"));
    PEA_TRY(pea_check_cuda(ctx, op, cudaStreamSynchronize(ctx->stream), "cudaStreamSynchronize"));
    if (rec.op == PEA_DEVERR_EMBEDDING)
        return pea_fail(ctx, PEA_CUDA_ERROR_INVALID, op,
                        "a queued embedding found token id %lld at position %lld out of range [0, %lld) "
                        "(checked on the device, reported at this synchronising call)",
                        rec.value, rec.index, rec.limit);
    return pea_fail(ctx, PEA_CUDA_ERROR_KERNEL, op, "a queued kernel reported error %d", rec.op);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Context                                                                                               */

static int create_message(char *message, size_t size, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int create_message(char *message, size_t size, int code, const char *fmt, ...) {
    if (message && size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(message, size, fmt, ap);
        va_end(ap);
    }
    return code;
}

extern "C" void pea_cuda_destroy(pea_cuda_context *ctx) {
    if (!ctx) return;
    cudaSetDevice(ctx->device);
    pea_graphs_destroy(ctx); /* before the allocator: their blocks go back to it */
    if (ctx->stream) cudaStreamSynchronize(ctx->stream);
    pea_allocator_destroy(ctx); /* frees the workspaces too: they came from the allocator */
    for (int i = 0; i < PEA_CUDA_TIMER_SLOTS; i++)
        if (ctx->timers[i]) cudaEventDestroy(ctx->timers[i]);
    if (ctx->d_error) cudaFree(ctx->d_error);
    if (ctx->h_error) cudaFreeHost(ctx->h_error);
    if (ctx->cublas) cublasDestroy(ctx->cublas);
    if (ctx->cublas_workspace) cudaFree(ctx->cublas_workspace);
    pea_lt_plans_destroy(ctx);
    pea_profile_destroy(ctx);
    pea_nccl_destroy(ctx);
    if (ctx->cublaslt) cublasLtDestroy(ctx->cublaslt);
    if (ctx->stream) cudaStreamDestroy(ctx->stream);
    cudaGetLastError(); /* leave no error behind for the next context on this thread */
    delete ctx;
}

extern "C" int pea_cuda_create(int device, pea_cuda_context **out, char *message, size_t message_size) {
    if (message && message_size) message[0] = 0;
    if (!out) return create_message(message, message_size, PEA_CUDA_ERROR_INVALID, "create: out is NULL");
    *out = NULL;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        cudaGetLastError();
        if (e != cudaSuccess)
            return create_message(message, message_size, PEA_CUDA_ERROR_NO_DEVICE,
                                  "no CUDA device (cudaGetDeviceCount: %s: %s)", cudaGetErrorName(e),
                                  cudaGetErrorString(e));
        return create_message(message, message_size, PEA_CUDA_ERROR_NO_DEVICE,
                              "no CUDA device (cudaGetDeviceCount found none)");
    }
    if (device < 0 || device >= count)
        return create_message(message, message_size, PEA_CUDA_ERROR_NO_DEVICE,
                              "no CUDA device %d (this machine has %d)", device, count);

    pea_cuda_context *ctx = new pea_cuda_context();
    memset(ctx->message, 0, sizeof ctx->message);
    ctx->device = device;
    ctx->workspace_limit = (size_t)256 << 20;
    if (const char *s = getenv("PEA_CUDA_CONV_WORKSPACE_BYTES")) {
        long long v = atoll(s);
        if (v > 0) ctx->workspace_limit = (size_t)v;
    }
    if (const char *s = getenv("PEA_CUDA_CONV_INDEX64")) ctx->conv_index64 = atoi(s) != 0;

#define CREATE_CHECK(call)                                                                             \
    do {                                                                                               \
        cudaError_t e_ = (call);                                                                       \
        if (e_ != cudaSuccess) {                                                                       \
            int code_ = e_ == cudaErrorMemoryAllocation ? PEA_CUDA_ERROR_OUT_OF_MEMORY                 \
                        : (e_ == cudaErrorNoDevice || e_ == cudaErrorInvalidDevice)                   \
                            ? PEA_CUDA_ERROR_NO_DEVICE                                                 \
                            : PEA_CUDA_ERROR_KERNEL;                                                   \
            create_message(message, message_size, code_, "create: %s: %s (%s)", #call, cudaGetErrorName(e_), \
                           cudaGetErrorString(e_));                                                    \
            cudaGetLastError();                                                                        \
            pea_cuda_destroy(ctx);                                                                     \
            return code_;                                                                              \
        }                                                                                              \
    } while (0)

    CREATE_CHECK(cudaSetDevice(device));
    cudaDeviceProp prop;
    CREATE_CHECK(cudaGetDeviceProperties(&prop, device));
    snprintf(ctx->device_name, sizeof ctx->device_name, "%s", prop.name);
    ctx->major = prop.major;
    ctx->minor = prop.minor;
    ctx->total_memory = prop.totalGlobalMem;
    ctx->sm_count = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    int optin = 0;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
        cudaGetLastError();
        optin = 48 * 1024;
    }
    ctx->max_smem_optin = optin > 48 * 1024 ? optin : 48 * 1024;

    CREATE_CHECK(cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking));
    CREATE_CHECK(cudaMalloc((void **)&ctx->d_error, sizeof(pea_device_error)));
    CREATE_CHECK(cudaMemsetAsync(ctx->d_error, 0, sizeof(pea_device_error), ctx->stream));
    CREATE_CHECK(cudaMallocHost((void **)&ctx->h_error, sizeof(pea_device_error)));
    CREATE_CHECK(cudaStreamSynchronize(ctx->stream));
#undef CREATE_CHECK

    cublasStatus_t s = cublasCreate(&ctx->cublas);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasSetStream(ctx->cublas, ctx->stream);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasSetPointerMode(ctx->cublas, CUBLAS_POINTER_MODE_HOST);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasSetMathMode(ctx->cublas, CUBLAS_DEFAULT_MATH);
    /* cuBLAS's workspace, ours (the size cuBLAS would pick: 32 MiB on Hopper, else 4 MiB; at most 1/256 of a small
     * device's memory), so that a GEMM in a CUDA graph capture allocates nothing, and eager and captured GEMMs run
     * the same algorithms */
    size_t cublas_workspace_bytes = (size_t)(prop.major >= 9 ? 32 : 4) << 20;
    if (cublas_workspace_bytes > prop.totalGlobalMem / 256) cublas_workspace_bytes = (prop.totalGlobalMem / 256) & ~(size_t)255;
    if (s == CUBLAS_STATUS_SUCCESS && cudaMalloc(&ctx->cublas_workspace, cublas_workspace_bytes) != cudaSuccess) {
        cudaGetLastError();
        s = CUBLAS_STATUS_ALLOC_FAILED;
    }
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasSetWorkspace(ctx->cublas, ctx->cublas_workspace, cublas_workspace_bytes);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtCreate(&ctx->cublaslt);
    if (s != CUBLAS_STATUS_SUCCESS) {
        create_message(message, message_size, PEA_CUDA_ERROR_KERNEL, "create: cuBLAS: %s (%s)",
                       cublasGetStatusName(s), cublasGetStatusString(s));
        if (s != CUBLAS_STATUS_SUCCESS && ctx->cublas) { cublasDestroy(ctx->cublas); ctx->cublas = NULL; }
        pea_cuda_destroy(ctx);
        return PEA_CUDA_ERROR_KERNEL;
    }
    if (pea_allocator_create(ctx) != PEA_CUDA_OK) {
        create_message(message, message_size, PEA_CUDA_ERROR_OUT_OF_MEMORY, "create: the allocator: out of memory");
        pea_cuda_destroy(ctx);
        return PEA_CUDA_ERROR_OUT_OF_MEMORY;
    }
    *out = ctx;
    return PEA_CUDA_OK;
}

extern "C" const char *pea_cuda_last_error(pea_cuda_context *ctx) { return ctx ? ctx->message : ""; }

extern "C" int pea_cuda_device_info(pea_cuda_context *ctx, char *name, size_t name_size, int *major, int *minor,
                                    size_t *total_memory) {
    if (!ctx) return PEA_CUDA_ERROR_INVALID;
    if (name && name_size) snprintf(name, name_size, "%s", ctx->device_name);
    if (major) *major = ctx->major;
    if (minor) *minor = ctx->minor;
    if (total_memory) *total_memory = ctx->total_memory;
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_set_tf32(pea_cuda_context *ctx, int enabled) {
    if (!ctx) return PEA_CUDA_ERROR_INVALID;
    ctx->tf32 = enabled != 0;
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_synchronize(pea_cuda_context *ctx) {
    PEA_BEGIN(ctx, "synchronize");
    PEA_REQUIRE(ctx, "synchronize", !ctx->capture, "during CUDA graph capture: a capture cannot wait for the device");
    cudaError_t e = cudaStreamSynchronize(ctx->stream);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return pea_check_cuda(ctx, "synchronize", e, "a queued kernel or copy failed");
    }
    return pea_check_device_error(ctx, "synchronize");
}

/* ---------------------------------------------------------------------------------------------------- */
/* Device timing                                                                                         */

extern "C" int pea_cuda_timer_record(pea_cuda_context *ctx, int slot) {
    static const char *op = "timer_record";
    PEA_BEGIN(ctx, op);
    PEA_REQUIRE(ctx, op, slot >= 0 && slot < PEA_CUDA_TIMER_SLOTS, "slot %d is not in 0…%d", slot,
                PEA_CUDA_TIMER_SLOTS - 1);
    if (!ctx->timers[slot])
        PEA_TRY(pea_check_cuda(ctx, op, cudaEventCreate(&ctx->timers[slot]), "cudaEventCreate"));
    PEA_TRY(pea_check_cuda(ctx, op, cudaEventRecord(ctx->timers[slot], ctx->stream), "cudaEventRecord"));
    ctx->timer_recorded[slot] = 1;
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_timer_elapsed(pea_cuda_context *ctx, int start_slot, int end_slot, float *ms) {
    static const char *op = "timer_elapsed";
    PEA_BEGIN(ctx, op);
    PEA_REQUIRE(ctx, op, ms, "ms is NULL");
    PEA_REQUIRE(ctx, op, start_slot >= 0 && start_slot < PEA_CUDA_TIMER_SLOTS && end_slot >= 0 &&
                             end_slot < PEA_CUDA_TIMER_SLOTS,
                "slots %d, %d are not in 0…%d", start_slot, end_slot, PEA_CUDA_TIMER_SLOTS - 1);
    PEA_REQUIRE(ctx, op, ctx->timer_recorded[start_slot] && ctx->timer_recorded[end_slot],
                "slot %d or %d was never recorded", start_slot, end_slot);
    cudaError_t e = cudaEventSynchronize(ctx->timers[end_slot]);
    if (e != cudaSuccess) return pea_check_cuda(ctx, op, e, "cudaEventSynchronize (a queued kernel failed?)");
    PEA_TRY(pea_check_cuda(ctx, op, cudaEventElapsedTime(ms, ctx->timers[start_slot], ctx->timers[end_slot]),
                           "cudaEventElapsedTime"));
    return PEA_CUDA_OK;
}

/* One thread busy-waits until its SM's cycle counter has advanced `cycles` (a gate that holds the stream). */
__global__ void spin_kernel(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
}

extern "C" int pea_cuda_spin(pea_cuda_context *ctx, double microseconds) {
    static const char *op = "spin";
    PEA_BEGIN(ctx, op);
    PEA_REQUIRE(ctx, op, microseconds >= 0 && microseconds <= 1e7, "%g µs is not in 0…1e7", microseconds);
    if (!ctx->clock_khz) {
        int khz = 0;
        PEA_TRY(pea_check_cuda(ctx, op, cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, ctx->device),
                               "cudaDeviceGetAttribute(cudaDevAttrClockRate)"));
        ctx->clock_khz = khz > 0 ? khz : 1000000;
    }
    const long long cycles = (long long)(microseconds * 1e-3 * (double)ctx->clock_khz);
    PEA_KERNEL(ctx, op, spin_kernel, 1, 1, 0, cycles);
    return PEA_CUDA_OK;
}
