/*
 * allocator.cu — device memory: a caching allocator, and the copies between host and device.
 *
 * Caching allocator. Requests are rounded up to a size class and served from a free list of blocks of
 * exactly that class; pea_cuda_free puts the block back on its list instead of calling cudaFree. So a
 * program that allocates the same sizes again and again (a diffusion loop: the same activations every
 * step) reaches a steady state with no cudaMalloc/cudaFree at all. Size classes:
 *   ≤ 512 B                 one class of 512 B
 *   512 B … 1 MB            four classes per power of two (1024, 1280, 1536, 1792, 2048, …): ≤ 25 % waste
 *   > 1 MB                  eight classes per power of two: ≤ 12.5 % waste
 * Blocks are never split or merged (cudaMalloc returns 256-byte aligned memory, which every kernel's
 * vector loads rely on). When cudaMalloc fails, the cache is released (cudaFree of every cached block) and
 * the request retried once before OUT_OF_MEMORY. Reuse is safe without events because the context has one
 * stream: work queued after the reuse runs after the work queued before the free.
 * Stats: in_use and peak count whole blocks (class sizes), device_allocations counts cudaMalloc calls.
 *
 * CUDA graphs (graph.cu). A captured graph writes the blocks it was captured with on every replay, so those
 * blocks must not go to other tensors while it lives: they belong to the graph's pool (like torch's graph
 * memory pool). While a capture runs, every allocation comes from the capture's pool (blocks the capture freed
 * earlier), else the cache, else cudaMalloc with the thread's capture mode switched to Relaxed (a capture forbids
 * cudaMalloc otherwise; torch's allocator does the same; there is no cache release, no cudaFree, on a failure
 * during a capture), and becomes the graph's. An eager run of the same work first fills the cache, so a capture
 * rarely reaches cudaMalloc. A block freed during the capture becomes the graph's too: one allocated in it may
 * serve a later allocation of the same capture (stream order makes that safe on every replay), one allocated
 * before it is only held (the graph may read what it held). After the capture, a graph's block that is freed
 * stays in its pool. Destroying the graph returns its free blocks to the cache and disowns its live ones (they
 * go to the cache when freed).
 *
 * Uploads are staged through pinned host memory: four 4 MB pinned slots used as a ring. An upload copies
 * its bytes into the current slot (memcpy on the host, so the caller may reuse `src` at once), queues a
 * cudaMemcpyAsync from the slot to the device on the stream, and records an event; it waits only when it
 * needs a slot whose previous copies are still in flight. Small uploads share a slot, large ones stream
 * through the ring 4 MB at a time (host memcpy overlapping the DMA of the previous chunk). If pinned memory
 * cannot be had, uploads fall back to a synchronous copy (the stream is drained, then cudaMemcpy).
 * Downloads queue the copy on the stream and wait for it (and so for all work before it).
 */
#include <string.h>

#include <mutex>
#include <unordered_map>
#include <vector>

#include "internal.h"

/* ---------------------------------------------------------------------------------------------------- */
/* Size classes                                                                                          */

static size_t size_class(size_t bytes) {
    if (bytes <= 512) return 512;
    size_t p = (size_t)1 << (63 - __builtin_clzll((unsigned long long)bytes)); /* largest power of two ≤ bytes */
    size_t step = bytes <= ((size_t)1 << 20) ? p / 4 : p / 8;
    return (bytes + step - 1) / step * step;
}

struct pea_graph_pool {
    std::unordered_map<size_t, std::vector<void *>> reusable; /* allocated and freed during the capture */
    std::unordered_map<void *, size_t> held;                   /* every free block the graph owns → class */
};

struct pea_allocator {
    std::mutex mutex;
    std::unordered_map<size_t, std::vector<void *>> free_lists; /* class size → cached blocks */
    std::unordered_map<void *, size_t> live;                    /* handed-out block → class size */
    std::unordered_map<void *, pea_graph_pool *> owner;         /* a graph's blocks (live or held) → its pool */
    pea_graph_pool *capturing = nullptr;                        /* the pool of the capture running now */
    size_t in_use = 0, peak = 0, cached = 0;
    uint64_t device_allocations = 0;
};

enum { STAGE_SLOTS = 4 };
static const size_t STAGE_BYTES = (size_t)4 << 20;

struct pea_stager {
    std::mutex mutex; /* uploads from several host threads take turns with the ring */
    bool tried = false, ok = false;
    char *host[STAGE_SLOTS] = {};
    cudaEvent_t done[STAGE_SLOTS] = {};
    bool pending[STAGE_SLOTS] = {};
    size_t used[STAGE_SLOTS] = {};
    int cur = 0;
};

int pea_allocator_create(pea_cuda_context *ctx) {
    ctx->alloc = new pea_allocator();
    ctx->stager = new pea_stager();
    return PEA_CUDA_OK;
}

/* cudaFree every cached block. Caller holds the mutex. */
static void release_cached(pea_cuda_context *ctx) {
    pea_allocator *a = ctx->alloc;
    cudaStreamSynchronize(ctx->stream);
    for (auto &kv : a->free_lists)
        for (void *p : kv.second) cudaFree(p);
    a->free_lists.clear();
    a->cached = 0;
    cudaGetLastError();
}

void pea_allocator_destroy(pea_cuda_context *ctx) {
    if (ctx->alloc) {
        std::lock_guard<std::mutex> lock(ctx->alloc->mutex);
        release_cached(ctx);
        for (auto &kv : ctx->alloc->live) cudaFree(kv.first);
        ctx->alloc->live.clear();
    }
    delete ctx->alloc;
    ctx->alloc = NULL;
    ctx->workspace = NULL;
    ctx->workspace_bytes = 0;
    if (ctx->stager) {
        for (int i = 0; i < STAGE_SLOTS; i++) {
            if (ctx->stager->done[i]) cudaEventDestroy(ctx->stager->done[i]);
            if (ctx->stager->host[i]) cudaFreeHost(ctx->stager->host[i]);
        }
        delete ctx->stager;
        ctx->stager = NULL;
    }
    cudaGetLastError();
}

/* A block of class `cls` for a capture: one the capture freed earlier, else one from the cache (NULL: a miss,
 * to be cudaMalloc'ed). The block becomes the graph's. Caller holds the mutex. */
static void *capture_block(pea_allocator *a, size_t cls) {
    pea_graph_pool *pool = a->capturing;
    void *p = NULL;
    auto mine = pool->reusable.find(cls);
    if (mine != pool->reusable.end() && !mine->second.empty()) {
        p = mine->second.back();
        mine->second.pop_back();
        pool->held.erase(p);
        return p;
    }
    auto it = a->free_lists.find(cls);
    if (it == a->free_lists.end() || it->second.empty()) return NULL;
    p = it->second.back();
    it->second.pop_back();
    a->cached -= cls;
    a->owner[p] = pool;
    return p;
}

/* cudaMalloc of a block of class `cls` during a capture: the thread's capture mode is Relaxed for the call. */
static cudaError_t capture_malloc(void **p, size_t cls) {
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaError_t e = cudaThreadExchangeStreamCaptureMode(&mode);
    if (e != cudaSuccess) return e;
    e = cudaMalloc(p, cls);
    cudaThreadExchangeStreamCaptureMode(&mode);
    return e;
}

int pea_mem_alloc(pea_cuda_context *ctx, const char *op, size_t bytes, void **out) {
    pea_allocator *a = ctx->alloc;
    const size_t cls = size_class(bytes);
    std::lock_guard<std::mutex> lock(a->mutex);
    void *p = NULL;
    auto it = a->free_lists.find(cls);
    if (a->capturing) {
        p = capture_block(a, cls);
    } else if (it != a->free_lists.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        a->cached -= cls;
    }
    if (!p) {
        cudaError_t e = a->capturing ? capture_malloc(&p, cls) : cudaMalloc(&p, cls);
        if (e == cudaErrorMemoryAllocation && !a->capturing) { /* give the cache back to the driver, try again */
            cudaGetLastError();
            release_cached(ctx);
            e = cudaMalloc(&p, cls);
        }
        if (e != cudaSuccess) {
            cudaGetLastError();
            int code = e == cudaErrorMemoryAllocation ? PEA_CUDA_ERROR_OUT_OF_MEMORY : PEA_CUDA_ERROR_KERNEL;
            return pea_fail(ctx, code, op, "cudaMalloc of %zu bytes (%zu requested; %zu in use%s): %s (%s)", cls,
                            bytes, a->in_use, a->capturing ? "; during CUDA graph capture" : "", cudaGetErrorName(e),
                            cudaGetErrorString(e));
        }
        if (a->capturing) a->owner[p] = a->capturing;
        a->device_allocations++;
    }
    a->live[p] = cls;
    a->in_use += cls;
    if (a->in_use > a->peak) a->peak = a->in_use;
    *out = p;
    return PEA_CUDA_OK;
}

int pea_mem_free(pea_cuda_context *ctx, const char *op, void *ptr) {
    if (!ptr) return PEA_CUDA_OK;
    pea_allocator *a = ctx->alloc;
    std::lock_guard<std::mutex> lock(a->mutex);
    auto it = a->live.find(ptr);
    if (it == a->live.end())
        return pea_fail(ctx, PEA_CUDA_ERROR_INVALID, op, "%p is not a live block of this context's allocator", ptr);
    const size_t cls = it->second;
    a->live.erase(it);
    a->in_use -= cls;
    auto owned = a->owner.find(ptr);
    pea_graph_pool *pool = owned != a->owner.end() ? owned->second : NULL;
    if (!pool && a->capturing) { /* allocated before the capture, freed in it: the graph may read it */
        pool = a->capturing;
        a->owner[ptr] = pool;
    } else if (pool && pool == a->capturing) {
        pool->reusable[cls].push_back(ptr);
    }
    if (pool) {
        pool->held[ptr] = cls;
        return PEA_CUDA_OK;
    }
    a->free_lists[cls].push_back(ptr);
    a->cached += cls;
    return PEA_CUDA_OK;
}

pea_graph_pool *pea_allocator_capture_begin(pea_cuda_context *ctx) {
    pea_allocator *a = ctx->alloc;
    std::lock_guard<std::mutex> lock(a->mutex);
    a->capturing = new pea_graph_pool();
    return a->capturing;
}

void pea_allocator_capture_end(pea_cuda_context *ctx) {
    pea_allocator *a = ctx->alloc;
    std::lock_guard<std::mutex> lock(a->mutex);
    if (a->capturing) a->capturing->reusable.clear(); /* later frees are only held */
    a->capturing = NULL;
}

void pea_allocator_pool_release(pea_cuda_context *ctx, pea_graph_pool *pool) {
    if (!pool) return;
    pea_allocator *a = ctx->alloc;
    std::lock_guard<std::mutex> lock(a->mutex);
    if (a->capturing == pool) a->capturing = NULL;
    for (auto &kv : pool->held) {
        a->free_lists[kv.second].push_back(kv.first);
        a->cached += kv.second;
    }
    for (auto it = a->owner.begin(); it != a->owner.end();) it = it->second == pool ? a->owner.erase(it) : std::next(it);
    delete pool;
}

extern "C" int pea_cuda_alloc(pea_cuda_context *ctx, size_t bytes, void **out) {
    PEA_BEGIN(ctx, "alloc");
    PEA_REQUIRE(ctx, "alloc", out != NULL, "out is NULL");
    *out = NULL;
    return pea_mem_alloc(ctx, "alloc", bytes, out);
}

extern "C" int pea_cuda_free(pea_cuda_context *ctx, void *ptr) {
    if (!ctx) return PEA_CUDA_ERROR_INVALID;
    return pea_mem_free(ctx, "free", ptr);
}

extern "C" int pea_cuda_release_cache(pea_cuda_context *ctx) {
    PEA_BEGIN(ctx, "release_cache");
    PEA_REQUIRE(ctx, "release_cache", !ctx->capture, "during CUDA graph capture");
    std::lock_guard<std::mutex> lock(ctx->alloc->mutex);
    release_cached(ctx);
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_memory_stats(pea_cuda_context *ctx, size_t *in_use, size_t *peak, uint64_t *device_allocations) {
    if (!ctx) return PEA_CUDA_ERROR_INVALID;
    std::lock_guard<std::mutex> lock(ctx->alloc->mutex);
    if (in_use) *in_use = ctx->alloc->in_use;
    if (peak) *peak = ctx->alloc->peak;
    if (device_allocations) *device_allocations = ctx->alloc->device_allocations;
    return PEA_CUDA_OK;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Copies                                                                                                */

static bool stager_ready(pea_cuda_context *ctx) {
    pea_stager *s = ctx->stager;
    if (s->tried) return s->ok;
    s->tried = true;
    for (int i = 0; i < STAGE_SLOTS; i++) {
        if (cudaHostAlloc((void **)&s->host[i], STAGE_BYTES, cudaHostAllocDefault) != cudaSuccess ||
            cudaEventCreateWithFlags(&s->done[i], cudaEventDisableTiming) != cudaSuccess) {
            cudaGetLastError();
            return s->ok = false; /* uploads stay synchronous; whatever was made is freed at destroy */
        }
    }
    return s->ok = true;
}

extern "C" int pea_cuda_upload(pea_cuda_context *ctx, void *dst, const void *src, size_t bytes) {
    static const char *op = "upload";
    PEA_OP(ctx, op);
    if (bytes == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, op, dst && src, "NULL pointer (dst %p, src %p) for %zu bytes", dst, src, bytes);
    PEA_REQUIRE(ctx, op, !ctx->capture,
                "%zu bytes from the host during CUDA graph capture: a graph cannot capture host data (upload "
                "before pea_cuda_graph_begin, into a tensor the graph reads)", bytes);
    std::lock_guard<std::mutex> lock(ctx->stager->mutex);
    if (!stager_ready(ctx)) {
        PEA_TRY(pea_check_cuda(ctx, op, cudaStreamSynchronize(ctx->stream), "cudaStreamSynchronize"));
        return pea_check_cuda(ctx, op, cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    }
    pea_stager *s = ctx->stager;
    const char *from = (const char *)src;
    char *to = (char *)dst;
    while (bytes > 0) {
        size_t avail = STAGE_BYTES - s->used[s->cur];
        if (avail == 0 || (avail < bytes && avail < ((size_t)64 << 10))) {
            /* move on to the next slot, once the copies that read it have finished */
            s->cur = (s->cur + 1) % STAGE_SLOTS;
            if (s->pending[s->cur]) {
                PEA_TRY(pea_check_cuda(ctx, op, cudaEventSynchronize(s->done[s->cur]), "cudaEventSynchronize"));
                s->pending[s->cur] = false;
            }
            s->used[s->cur] = 0;
            continue;
        }
        size_t n = bytes < avail ? bytes : avail;
        char *slot = s->host[s->cur] + s->used[s->cur];
        memcpy(slot, from, n);
        PEA_TRY(pea_check_cuda(ctx, op, cudaMemcpyAsync(to, slot, n, cudaMemcpyHostToDevice, ctx->stream),
                               "cudaMemcpyAsync"));
        PEA_TRY(pea_check_cuda(ctx, op, cudaEventRecord(s->done[s->cur], ctx->stream), "cudaEventRecord"));
        s->pending[s->cur] = true;
        s->used[s->cur] += (n + 255) & ~(size_t)255; /* keep each staged piece 256-byte aligned */
        if (s->used[s->cur] > STAGE_BYTES) s->used[s->cur] = STAGE_BYTES;
        from += n;
        to += n;
        bytes -= n;
    }
    return PEA_CUDA_OK;
}

extern "C" int pea_cuda_download(pea_cuda_context *ctx, void *dst, const void *src, size_t bytes) {
    static const char *op = "download";
    PEA_OP(ctx, op);
    PEA_REQUIRE(ctx, op, !ctx->capture, "during CUDA graph capture: a capture cannot wait for the device");
    if (bytes > 0) {
        PEA_REQUIRE(ctx, op, dst && src, "NULL pointer (dst %p, src %p) for %zu bytes", dst, src, bytes);
        PEA_TRY(pea_check_cuda(ctx, op, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, ctx->stream),
                               "cudaMemcpyAsync (or a queued kernel before it)"));
    }
    cudaError_t e = cudaStreamSynchronize(ctx->stream);
    if (e != cudaSuccess) return pea_check_cuda(ctx, op, e, "a queued kernel or copy failed");
    return pea_check_device_error(ctx, op);
}

extern "C" int pea_cuda_zero(pea_cuda_context *ctx, void *ptr, size_t bytes) {
    PEA_OP(ctx, "zero");
    if (bytes == 0) return PEA_CUDA_OK;
    PEA_REQUIRE(ctx, "zero", ptr != NULL, "ptr is NULL for %zu bytes", bytes);
    return pea_check_cuda(ctx, "zero", cudaMemsetAsync(ptr, 0, bytes, ctx->stream), "cudaMemsetAsync");
}
