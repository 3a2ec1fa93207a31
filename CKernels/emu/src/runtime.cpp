/*
 * runtime.cpp — CPU stand-ins for the CUDA runtime calls a backend makes: device memory, copies, streams,
 * events, errors, device properties, function attributes.
 *
 * Everything is synchronous (a stream is an ordering that a synchronous machine keeps trivially), so
 * stream and event calls only validate their handles; event timestamps are host wall-clock times.
 * Device memory is host memory from mmap with an inaccessible page after each allocation (and one before),
 * so a kernel that reads or writes past the end of a cudaMalloc buffer faults, and the fault handler
 * names the kernel, the thread and the allocation. Copies check that device pointers lie inside an
 * allocation and that the direction (cudaMemcpyKind) matches the pointers.
 *
 * Stream capture. While a stream captures (cudaStreamBeginCapture … cudaStreamEndCapture), the work queued on
 * it — launches, async copies and memsets, host functions, cuBLAS calls — is checked as usual and recorded
 * with its arguments by value instead of run; cudaGraphLaunch runs the recorded work in order, so a replay
 * reads whatever the buffers hold then. Calls a GPU refuses during capture are refused here with the same
 * errors, and invalidate the capture as they do there: synchronising the capturing stream or the device, and
 * the "potentially unsafe" calls (cudaMalloc, cudaFree, synchronous copies and memsets) by the rules of the
 * calling thread's mode (cudaThreadExchangeStreamCaptureMode): a Relaxed thread may make them, others not while
 * they capture themselves (not Relaxed), nor (Global, the default) while another thread has a Global capture.
 */
#include "internal.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

namespace pea_emu {
struct Capture {
    cudaStreamCaptureMode mode;
    std::thread::id thread; /* the thread that began it (ThreadLocal captures forbid unsafe calls there) */
    std::string invalidated_by; /* "" while valid, else the call that invalidated it */
    std::vector<CapturedOp> ops;
};
} // namespace pea_emu

struct CUstream_st {
    unsigned flags;
    pea_emu::Capture *capture; /* non-null while the stream captures */
};
struct CUevent_st {
    unsigned flags;
    bool recorded;
    bool captured; /* last recorded on a capturing stream: it has no time and cannot be waited for */
    double t_ms;
};
struct CUgraph_st {
    std::vector<pea_emu::CapturedOp> ops;
};
struct CUgraphExec_st {
    std::vector<pea_emu::CapturedOp> ops;
};

namespace pea_emu {

/* ---------------------------------------------------------------------------------------------------- */
/* Errors                                                                                                */

static thread_local cudaError_t t_last = cudaSuccess;
static thread_local std::string t_msg;
static std::atomic<int> g_async{0}; /* a kernel's failure, returned by the next synchronising call */
static std::atomic<int> g_quiet{-1};

bool rt_quiet() {
    int q = g_quiet.load();
    if (q < 0) {
        const char *s = getenv("PEA_EMU_QUIET");
        q = s && *s && strcmp(s, "0") != 0;
        g_quiet = q;
    }
    return q != 0;
}

static void report(cudaError_t e, const std::string &msg) {
    t_msg = msg;
    if (!rt_quiet()) fprintf(stderr, "pea-emu: %s [%s]\n", msg.c_str(), cudaGetErrorName(e));
}

void rt_api_error(cudaError_t e, const std::string &msg) {
    t_last = e;
    report(e, msg);
}

void rt_kernel_error(cudaError_t e, const std::string &msg) {
    t_last = e;
    g_async = e;
    report(e, msg);
}

static cudaError_t fail(cudaError_t e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static cudaError_t fail(cudaError_t e, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    rt_api_error(e, buf);
    return e;
}

/* A synchronising call returns a kernel failure that happened since the last one. */
static cudaError_t sync_point() {
    int e = g_async.exchange(0);
    if (e) t_last = (cudaError_t)e;
    return (cudaError_t)e;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Device memory                                                                                         */

struct Alloc {
    char *map;
    size_t map_bytes;
    char *ptr;
    size_t size, body; /* requested bytes; bytes up to the trailing guard page (size rounded to 256) */
};

static std::mutex g_mem_mutex;
static std::map<uintptr_t, Alloc> g_allocs; /* by ptr */
static size_t g_allocated = 0;
static struct {
    uintptr_t lo, hi;
    size_t size;
} g_freed[64];
static unsigned g_freed_next = 0;
static std::map<uintptr_t, size_t> g_host_allocs;      /* cudaMallocHost / cudaHostAlloc: start → bytes */
static std::map<uintptr_t, size_t> g_host_registered; /* cudaHostRegister: start → bytes */
static std::once_flag g_fault_once;
static struct sigaction g_prev_segv, g_prev_bus;

static size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

/* The allocation whose [ptr, ptr + body) holds p, or nullptr. Caller holds g_mem_mutex (or is crashing). */
static const Alloc *find_alloc(uintptr_t p) {
    auto it = g_allocs.upper_bound(p);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    const Alloc &a = it->second;
    return p < (uintptr_t)a.ptr + a.body ? &a : nullptr;
}

static void fault_write(const std::string &s) {
    ssize_t r = write(2, s.data(), s.size());
    (void)r;
}

static void on_fault(int sig, siginfo_t *si, void *uc) {
    uintptr_t a = (uintptr_t)si->si_addr;
    size_t page = page_size();
    std::string what;
    for (const auto &kv : g_allocs) {
        const Alloc &al = kv.second;
        uintptr_t map = (uintptr_t)al.map, ptr = (uintptr_t)al.ptr;
        if (a >= ptr + al.body && a < map + al.map_bytes) {
            what = strprintf("address 0x%lx is %lu bytes past the end of the %zu-byte device allocation at 0x%lx",
                             (unsigned long)a, (unsigned long)(a - ptr - al.size), al.size, (unsigned long)ptr);
            break;
        }
        if (a >= map && a < map + page) {
            what = strprintf("address 0x%lx lies before the %zu-byte device allocation at 0x%lx", (unsigned long)a,
                             al.size, (unsigned long)ptr);
            break;
        }
    }
    for (unsigned i = 1; what.empty() && i <= 64; i++) { /* the most recent free first */
        const auto &f = g_freed[(g_freed_next - i) % 64];
        if (a >= f.lo && a < f.hi)
            what = strprintf("address 0x%lx lies in a %zu-byte device allocation that was freed (cudaFree)",
                             (unsigned long)a, f.size);
    }
    if (what.empty() && fiber_guard_hit(a))
        what = "a CUDA thread overflowed its fiber stack (raise PEA_EMU_STACK_KB, default 256)";
    if (what.empty()) { /* not ours: let the previous handler see the fault */
        sigaction(sig, sig == SIGSEGV ? &g_prev_segv : &g_prev_bus, nullptr);
        (void)uc;
        return;
    }
    std::string k = current_kernel_description();
    fault_write("pea-emu: illegal memory access" + (k.empty() ? std::string() : " in " + k) + ": " + what + "\n");
    signal(SIGABRT, SIG_DFL);
    abort();
}

static void install_fault_handler() {
    std::call_once(g_fault_once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_prev_segv);
        sigaction(SIGBUS, &sa, &g_prev_bus);
    });
}

static bool in_ranges(const std::map<uintptr_t, size_t> &m, uintptr_t p) {
    auto it = m.upper_bound(p);
    if (it == m.begin()) return false;
    --it;
    return p <= it->first + it->second;
}

const char *rt_kernel_pointer_problem(const void *p) {
    std::lock_guard<std::mutex> lk(g_mem_mutex);
    uintptr_t a = (uintptr_t)p;
    if (find_alloc(a) || (a > 0 && find_alloc(a - 1))) return nullptr; /* inside, or one past the end */
    if (in_ranges(g_host_allocs, a) || in_ranges(g_host_registered, a)) return nullptr;
    for (const auto &f : g_freed)
        if (a >= f.lo && a < f.hi) return "device memory that was freed (cudaFree)";
    return "neither device memory (cudaMalloc) nor pinned host memory (cudaMallocHost, cudaHostRegister): a host "
           "pointer?";
}

static bool is_device(const void *p) {
    std::lock_guard<std::mutex> lk(g_mem_mutex);
    return find_alloc((uintptr_t)p) != nullptr;
}

/* `n` bytes at p must lie inside one device allocation. */
static cudaError_t check_device(const char *fn, const char *role, const void *p, size_t n) {
    std::lock_guard<std::mutex> lk(g_mem_mutex);
    const Alloc *a = find_alloc((uintptr_t)p);
    if (!a)
        return fail(cudaErrorInvalidValue, "%s: the %s %p is not device memory (from cudaMalloc)", fn, role, p);
    size_t off = (size_t)((const char *)p - a->ptr);
    if (off + n > a->size)
        return fail(cudaErrorInvalidValue,
                    "%s: %zu bytes at offset %zu of the %zu-byte device allocation %p (the %s) run past its end", fn,
                    n, off, a->size, (void *)a->ptr, role);
    return cudaSuccess;
}

static cudaError_t check_host(const char *fn, const char *role, const void *p) {
    if (is_device(p))
        return fail(cudaErrorInvalidValue, "%s: the %s %p is device memory, but the copy kind says host", fn, role, p);
    return cudaSuccess;
}

static cudaError_t check_copy(const char *fn, void *dst, const void *src, size_t dst_span, size_t src_span,
                              cudaMemcpyKind kind) {
    cudaError_t e = cudaSuccess;
    switch (kind) {
    case cudaMemcpyHostToHost:
        if (!(e = check_host(fn, "destination", dst))) e = check_host(fn, "source", src);
        break;
    case cudaMemcpyHostToDevice:
        if (!(e = check_device(fn, "destination", dst, dst_span))) e = check_host(fn, "source", src);
        break;
    case cudaMemcpyDeviceToHost:
        if (!(e = check_host(fn, "destination", dst))) e = check_device(fn, "source", src, src_span);
        break;
    case cudaMemcpyDeviceToDevice:
        if (!(e = check_device(fn, "destination", dst, dst_span))) e = check_device(fn, "source", src, src_span);
        break;
    case cudaMemcpyDefault:
        if (is_device(dst)) e = check_device(fn, "destination", dst, dst_span);
        if (!e && is_device(src)) e = check_device(fn, "source", src, src_span);
        break;
    default: return fail(cudaErrorInvalidMemcpyDirection, "%s: invalid cudaMemcpyKind %d", fn, (int)kind);
    }
    return e;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Streams, events, function attributes                                                                  */

static std::mutex g_obj_mutex;
static std::set<cudaStream_t> g_streams;
static std::set<cudaStream_t> g_capturing; /* streams with a capture, valid or invalidated */
static std::set<cudaEvent_t> g_events;
static std::set<cudaGraph_t> g_graphs;
static std::set<cudaGraphExec_t> g_graph_execs;
static std::map<const void *, size_t> g_func_smem;

static const char *mode_name(cudaStreamCaptureMode m) {
    switch (m) {
    case cudaStreamCaptureModeGlobal: return "Global";
    case cudaStreamCaptureModeThreadLocal: return "ThreadLocal";
    case cudaStreamCaptureModeRelaxed: return "Relaxed";
    }
    return "?";
}

bool rt_stream_capturing(cudaStream_t s) {
    std::lock_guard<std::mutex> lk(g_obj_mutex);
    return g_capturing.count(s) != 0;
}

CaptureResult rt_capture(cudaStream_t s, const char *what, CapturedOp op) {
    std::string why;
    {
        std::lock_guard<std::mutex> lk(g_obj_mutex);
        if (!g_capturing.count(s)) return CAPTURE_NONE;
        Capture *c = s->capture;
        if (c->invalidated_by.empty()) {
            c->ops.push_back(std::move(op));
            return CAPTURE_RECORDED;
        }
        why = c->invalidated_by;
    }
    fail(cudaErrorStreamCaptureInvalidated, "%s on a stream whose capture was invalidated by %s", what, why.c_str());
    return CAPTURE_REFUSED;
}

/* A call a GPU refuses while a capture runs: `fn` invalidates the captures `forbids` picks, and fails
 * (cudaErrorStreamCaptureUnsupported, naming the call and the capture) if there was one. */
template <class Forbids>
static cudaError_t refuse_during_capture(const char *fn, const char *rule, Forbids forbids) {
    cudaStream_t hit = nullptr;
    cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
    {
        std::lock_guard<std::mutex> lk(g_obj_mutex);
        for (cudaStream_t s : g_capturing) {
            Capture *c = s->capture;
            if (!forbids(s, c)) continue;
            if (c->invalidated_by.empty()) c->invalidated_by = fn;
            hit = s;
            mode = c->mode;
        }
    }
    if (!hit) return cudaSuccess;
    return fail(cudaErrorStreamCaptureUnsupported,
                "%s while stream %p captures (cudaStreamCaptureMode%s): %s; the capture is invalidated", fn,
                (void *)hit, mode_name(mode), rule);
}

/* The calling thread's capture interaction mode (cudaThreadExchangeStreamCaptureMode; Global by default). */
static thread_local cudaStreamCaptureMode t_capture_mode = cudaStreamCaptureModeGlobal;

/* The "potentially unsafe" calls (cudaMalloc, cudaFree, synchronous copies and memsets), as CUDA rules them
 * by the calling thread's mode: Relaxed may make them; otherwise not while this thread has a capture that
 * is not Relaxed, nor (in Global mode) while another thread has a Global capture. */
static cudaError_t unsafe_call(const char *fn) {
    if (t_capture_mode == cudaStreamCaptureModeRelaxed) return cudaSuccess;
    const std::thread::id me = std::this_thread::get_id();
    const bool global = t_capture_mode == cudaStreamCaptureModeGlobal;
    return refuse_during_capture(fn, "not permitted during stream capture (allocate and copy before capturing)",
                                 [me, global](cudaStream_t, Capture *c) {
                                     if (c->thread == me) return c->mode != cudaStreamCaptureModeRelaxed;
                                     return global && c->mode == cudaStreamCaptureModeGlobal;
                                 });
}

/* Waiting for a stream that captures (its work does not run until a graph of it is launched), or for the
 * device (every stream) while one does. */
static cudaError_t sync_of_capturing(const char *fn, cudaStream_t stream, bool whole_device) {
    return refuse_during_capture(fn, "a capturing stream cannot be waited for",
                                 [=](cudaStream_t s, Capture *) { return whole_device || s == stream; });
}

bool rt_stream_valid(cudaStream_t s) {
    if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return true;
    std::lock_guard<std::mutex> lk(g_obj_mutex);
    return g_streams.count(s) != 0;
}

static bool event_valid(cudaEvent_t e) {
    std::lock_guard<std::mutex> lk(g_obj_mutex);
    return e && g_events.count(e) != 0;
}

size_t rt_func_max_dynamic_smem(const void *func) {
    std::lock_guard<std::mutex> lk(g_obj_mutex);
    auto it = g_func_smem.find(func);
    return it == g_func_smem.end() ? kSharedDefault : it->second;
}

static double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

static size_t physical_memory() {
    long pages = sysconf(_SC_PHYS_PAGES);
    return pages > 0 ? (size_t)pages * page_size() : (size_t)16 << 30;
}

/* The device's memory: PEA_EMU_DEVICE_MEMORY_MB when set (a small GPU, to test running out of memory),
 * otherwise the host's physical memory. */
static size_t device_memory() {
    static const size_t bytes = [] {
        const char *s = getenv("PEA_EMU_DEVICE_MEMORY_MB");
        long long mb = s ? atoll(s) : 0;
        return mb > 0 ? (size_t)mb << 20 : physical_memory();
    }();
    return bytes;
}

static int device_count() {
    const char *s = getenv("PEA_EMU_DEVICE_COUNT"); /* 0: behave like a machine without a GPU */
    return s && atoi(s) == 0 ? 0 : 1;
}

} // namespace pea_emu

using namespace pea_emu;

extern "C" {

/* ---------------------------------------------------------------------------------------------------- */
/* Memory                                                                                                */

cudaError_t cudaMalloc(void **devPtr, size_t size) {
    if (!devPtr) return fail(cudaErrorInvalidValue, "cudaMalloc: devPtr is NULL");
    *devPtr = nullptr;
    if (cudaError_t e = unsafe_call("cudaMalloc")) return e;
    if (size == 0) return cudaSuccess;
    install_fault_handler();
    size_t page = page_size();
    size_t body = (size + 255) & ~(size_t)255;
    size_t pages = (body + page - 1) / page * page;
    size_t map_bytes = pages + 2 * page;
    if (body < size || map_bytes < body)
        return fail(cudaErrorMemoryAllocation, "cudaMalloc: %zu bytes: out of memory", size);
    void *m = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return fail(cudaErrorMemoryAllocation, "cudaMalloc: %zu bytes: out of memory", size);
    {
        std::lock_guard<std::mutex> lk(g_mem_mutex);
        if (g_allocated + size > device_memory()) {
            munmap(m, map_bytes);
            return fail(cudaErrorMemoryAllocation, "cudaMalloc: %zu bytes: out of memory (%zu of %zu bytes in use)", size,
                        g_allocated, device_memory());
        }
        g_allocated += size; /* counted now so that concurrent allocations cannot both pass the check */
    }
    char *map = (char *)m;
    mprotect(map, page, PROT_NONE);
    mprotect(map + page + pages, page, PROT_NONE);
    Alloc a{map, map_bytes, map + page + pages - body, size, body};
    if (body <= ((size_t)256 << 20)) memset(a.ptr, 0xcd, body); /* uninitialised: 0xCDCDCDCD, -4.3e8 as f32 */
    {
        std::lock_guard<std::mutex> lk(g_mem_mutex);
        g_allocs[(uintptr_t)a.ptr] = a;
    }
    *devPtr = a.ptr;
    return cudaSuccess;
}

cudaError_t cudaMallocManaged(void **devPtr, size_t size, unsigned int flags) {
    (void)flags; /* host and device share memory here: managed memory is device memory */
    return cudaMalloc(devPtr, size);
}

cudaError_t cudaFree(void *devPtr) {
    if (!devPtr) return cudaSuccess;
    if (cudaError_t e = unsafe_call("cudaFree")) return e;
    Alloc a;
    {
        std::lock_guard<std::mutex> lk(g_mem_mutex);
        auto it = g_allocs.find((uintptr_t)devPtr);
        if (it == g_allocs.end())
            return fail(cudaErrorInvalidValue, "cudaFree: %p is not a pointer returned by cudaMalloc (or was freed)",
                        devPtr);
        a = it->second;
        g_allocs.erase(it);
        g_allocated -= a.size;
        g_freed[g_freed_next++ % 64] = {(uintptr_t)a.map, (uintptr_t)a.map + a.map_bytes, a.size};
    }
    munmap(a.map, a.map_bytes); /* a later access faults: use after free */
    return cudaSuccess;
}

cudaError_t cudaMallocAsync(void **devPtr, size_t size, cudaStream_t stream) {
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaMallocAsync: invalid stream");
    return cudaMalloc(devPtr, size);
}

cudaError_t cudaFreeAsync(void *devPtr, cudaStream_t stream) {
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaFreeAsync: invalid stream");
    return cudaFree(devPtr);
}

cudaError_t cudaHostAlloc(void **ptr, size_t size, unsigned int flags) {
    (void)flags;
    if (!ptr) return fail(cudaErrorInvalidValue, "cudaHostAlloc: ptr is NULL");
    size_t page = page_size();
    *ptr = aligned_alloc(page, (size + page - 1) / page * page + (size == 0 ? page : 0));
    if (!*ptr) return fail(cudaErrorMemoryAllocation, "cudaHostAlloc: %zu bytes: out of memory", size);
    std::lock_guard<std::mutex> lk(g_mem_mutex);
    g_host_allocs[(uintptr_t)*ptr] = size;
    return cudaSuccess;
}

cudaError_t cudaMallocHost(void **ptr, size_t size) { return cudaHostAlloc(ptr, size, 0); }

cudaError_t cudaFreeHost(void *ptr) {
    if (!ptr) return cudaSuccess;
    {
        std::lock_guard<std::mutex> lk(g_mem_mutex);
        if (!g_host_allocs.erase((uintptr_t)ptr))
            return fail(cudaErrorInvalidValue, "cudaFreeHost: %p is not a pointer from cudaMallocHost/cudaHostAlloc",
                        ptr);
    }
    free(ptr);
    return cudaSuccess;
}

cudaError_t cudaHostRegister(void *ptr, size_t size, unsigned int flags) {
    (void)flags;
    if (!ptr || !size) return fail(cudaErrorInvalidValue, "cudaHostRegister: NULL pointer or zero size");
    std::lock_guard<std::mutex> lk(g_mem_mutex);
    g_host_registered[(uintptr_t)ptr] = size;
    return cudaSuccess;
}

cudaError_t cudaHostUnregister(void *ptr) {
    std::lock_guard<std::mutex> lk(g_mem_mutex);
    if (!ptr || !g_host_registered.erase((uintptr_t)ptr))
        return fail(cudaErrorInvalidValue, "cudaHostUnregister: %p was not registered", ptr);
    return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total) {
    if (!free_bytes || !total) return fail(cudaErrorInvalidValue, "cudaMemGetInfo: NULL argument");
    std::lock_guard<std::mutex> lk(g_mem_mutex);
    *total = device_memory();
    *free_bytes = g_allocated < *total ? *total - g_allocated : 0;
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, cudaMemcpyKind kind) {
    if (cudaError_t e = unsafe_call("cudaMemcpy")) return e;
    if (cudaError_t e = sync_point()) return e;
    if (count == 0) return cudaSuccess;
    if (!dst || !src) return fail(cudaErrorInvalidValue, "cudaMemcpy: NULL pointer with count %zu", count);
    if (cudaError_t e = check_copy("cudaMemcpy", dst, src, count, count, kind)) return e;
    memmove(dst, src, count);
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, cudaMemcpyKind kind, cudaStream_t stream) {
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaMemcpyAsync: invalid stream");
    if (count == 0) return cudaSuccess;
    if (!dst || !src) return fail(cudaErrorInvalidValue, "cudaMemcpyAsync: NULL pointer with count %zu", count);
    if (cudaError_t e = check_copy("cudaMemcpyAsync", dst, src, count, count, kind)) return e;
    switch (rt_capture(stream, "cudaMemcpyAsync",
                       [=](cudaStream_t s) { return cudaMemcpyAsync(dst, src, count, kind, s); })) {
    case CAPTURE_RECORDED: return cudaSuccess;
    case CAPTURE_REFUSED: return cudaErrorStreamCaptureInvalidated;
    case CAPTURE_NONE: break;
    }
    memmove(dst, src, count);
    return cudaSuccess;
}

static cudaError_t memcpy2d(const char *fn, void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                            size_t height, cudaMemcpyKind kind) {
    if (width == 0 || height == 0) return cudaSuccess;
    if (width > dpitch || width > spitch)
        return fail(cudaErrorInvalidPitchValue, "%s: width %zu exceeds a pitch (dpitch %zu, spitch %zu)", fn, width,
                    dpitch, spitch);
    if (!dst || !src) return fail(cudaErrorInvalidValue, "%s: NULL pointer", fn);
    if (cudaError_t e = check_copy(fn, dst, src, dpitch * (height - 1) + width, spitch * (height - 1) + width, kind))
        return e;
    for (size_t r = 0; r < height; r++) memmove((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
    return cudaSuccess;
}

cudaError_t cudaMemcpy2D(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height,
                         cudaMemcpyKind kind) {
    if (cudaError_t e = unsafe_call("cudaMemcpy2D")) return e;
    if (cudaError_t e = sync_point()) return e;
    return memcpy2d("cudaMemcpy2D", dst, dpitch, src, spitch, width, height, kind);
}

cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t stream) {
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaMemcpy2DAsync: invalid stream");
    switch (rt_capture(stream, "cudaMemcpy2DAsync", [=](cudaStream_t s) {
        return cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, s);
    })) {
    case CAPTURE_RECORDED: return cudaSuccess;
    case CAPTURE_REFUSED: return cudaErrorStreamCaptureInvalidated;
    case CAPTURE_NONE: break;
    }
    return memcpy2d("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, kind);
}

cudaError_t cudaMemset(void *devPtr, int value, size_t count) {
    if (cudaError_t e = unsafe_call("cudaMemset")) return e;
    if (count == 0) return cudaSuccess;
    if (cudaError_t e = check_device("cudaMemset", "destination", devPtr, count)) return e;
    memset(devPtr, value, count);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *devPtr, int value, size_t count, cudaStream_t stream) {
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaMemsetAsync: invalid stream");
    if (count == 0) return cudaSuccess;
    if (cudaError_t e = check_device("cudaMemsetAsync", "destination", devPtr, count)) return e;
    switch (rt_capture(stream, "cudaMemsetAsync",
                       [=](cudaStream_t s) { return cudaMemsetAsync(devPtr, value, count, s); })) {
    case CAPTURE_RECORDED: return cudaSuccess;
    case CAPTURE_REFUSED: return cudaErrorStreamCaptureInvalidated;
    case CAPTURE_NONE: break;
    }
    memset(devPtr, value, count);
    return cudaSuccess;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Streams and events                                                                                    */

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags) {
    if (!stream) return fail(cudaErrorInvalidValue, "cudaStreamCreate: stream is NULL");
    if (flags & ~1u) return fail(cudaErrorInvalidValue, "cudaStreamCreateWithFlags: flags 0x%x", flags);
    *stream = new CUstream_st{flags, nullptr};
    std::lock_guard<std::mutex> lk(g_obj_mutex);
    g_streams.insert(*stream);
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *stream) { return cudaStreamCreateWithFlags(stream, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    {
        std::lock_guard<std::mutex> lk(g_obj_mutex);
        if (!stream || !g_streams.erase(stream))
            return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy: invalid stream %p", (void *)stream);
        g_capturing.erase(stream); /* an unfinished capture goes with its stream */
    }
    delete stream->capture;
    delete stream;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize: invalid stream");
    if (cudaError_t e = sync_of_capturing("cudaStreamSynchronize", stream, false)) return e;
    return sync_point();
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamQuery: invalid stream");
    if (cudaError_t e = sync_of_capturing("cudaStreamQuery", stream, false)) return e;
    return sync_point();
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
    (void)flags;
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent: invalid stream");
    if (!event_valid(event)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent: invalid event");
    return cudaSuccess;
}

cudaError_t cudaLaunchHostFunc(cudaStream_t stream, cudaHostFn_t fn, void *userData) {
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaLaunchHostFunc: invalid stream");
    if (!fn) return fail(cudaErrorInvalidValue, "cudaLaunchHostFunc: fn is NULL");
    switch (rt_capture(stream, "cudaLaunchHostFunc",
                       [=](cudaStream_t s) { return cudaLaunchHostFunc(s, fn, userData); })) {
    case CAPTURE_RECORDED: return cudaSuccess;
    case CAPTURE_REFUSED: return cudaErrorStreamCaptureInvalidated;
    case CAPTURE_NONE: break;
    }
    fn(userData);
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags) {
    if (!event) return fail(cudaErrorInvalidValue, "cudaEventCreate: event is NULL");
    if (flags & ~7u) return fail(cudaErrorInvalidValue, "cudaEventCreateWithFlags: flags 0x%x", flags);
    *event = new CUevent_st{flags, false, false, 0.0};
    std::lock_guard<std::mutex> lk(g_obj_mutex);
    g_events.insert(*event);
    return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t *event) { return cudaEventCreateWithFlags(event, 0); }

cudaError_t cudaEventDestroy(cudaEvent_t event) {
    {
        std::lock_guard<std::mutex> lk(g_obj_mutex);
        if (!event || !g_events.erase(event))
            return fail(cudaErrorInvalidResourceHandle, "cudaEventDestroy: invalid event %p", (void *)event);
    }
    delete event;
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
    if (!event_valid(event)) return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord: invalid event");
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord: invalid stream");
    event->captured = rt_stream_capturing(stream); /* orders work inside the capture; nothing to time or wait for */
    event->recorded = !event->captured;
    event->t_ms = now_ms();
    return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
    if (!event_valid(event)) return fail(cudaErrorInvalidResourceHandle, "cudaEventSynchronize: invalid event");
    if (event->captured)
        return fail(cudaErrorCapturedEvent, "cudaEventSynchronize: the event was recorded during stream capture");
    return sync_point();
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
    if (!event_valid(event)) return fail(cudaErrorInvalidResourceHandle, "cudaEventQuery: invalid event");
    if (event->captured)
        return fail(cudaErrorCapturedEvent, "cudaEventQuery: the event was recorded during stream capture");
    return sync_point();
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    if (!ms) return fail(cudaErrorInvalidValue, "cudaEventElapsedTime: ms is NULL");
    if (!event_valid(start) || !event_valid(end))
        return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: invalid event");
    if ((start->flags | end->flags) & cudaEventDisableTiming)
        return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event was created with "
                                                    "cudaEventDisableTiming");
    if (!start->recorded || !end->recorded)
        return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event was never recorded");
    *ms = (float)(end->t_ms - start->t_ms);
    return cudaSuccess;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Stream capture and graphs                                                                             */

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamBeginCapture: invalid stream");
    if (stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread)
        return fail(cudaErrorStreamCaptureUnsupported,
                    "cudaStreamBeginCapture: the legacy/per-thread default stream cannot capture (create a stream)");
    if (mode != cudaStreamCaptureModeGlobal && mode != cudaStreamCaptureModeThreadLocal &&
        mode != cudaStreamCaptureModeRelaxed)
        return fail(cudaErrorInvalidValue, "cudaStreamBeginCapture: mode %d", (int)mode);
    std::lock_guard<std::mutex> lk(g_obj_mutex);
    if (g_capturing.count(stream))
        return fail(cudaErrorIllegalState, "cudaStreamBeginCapture: stream %p is already capturing", (void *)stream);
    stream->capture = new Capture{mode, std::this_thread::get_id(), std::string(), {}};
    g_capturing.insert(stream);
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph) {
    if (!graph) return fail(cudaErrorInvalidValue, "cudaStreamEndCapture: graph is NULL");
    *graph = nullptr;
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamEndCapture: invalid stream");
    Capture *c = nullptr;
    {
        std::lock_guard<std::mutex> lk(g_obj_mutex);
        if (g_capturing.erase(stream)) std::swap(c, stream->capture);
    }
    if (!c) return fail(cudaErrorIllegalState, "cudaStreamEndCapture: stream %p is not capturing", (void *)stream);
    std::unique_ptr<Capture> owned(c);
    if (!c->invalidated_by.empty())
        return fail(cudaErrorStreamCaptureInvalidated, "cudaStreamEndCapture: the capture was invalidated by %s",
                    c->invalidated_by.c_str());
    *graph = new CUgraph_st{std::move(c->ops)};
    std::lock_guard<std::mutex> lk(g_obj_mutex);
    g_graphs.insert(*graph);
    return cudaSuccess;
}

cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode *mode) {
    if (!mode) return fail(cudaErrorInvalidValue, "cudaThreadExchangeStreamCaptureMode: mode is NULL");
    if (*mode != cudaStreamCaptureModeGlobal && *mode != cudaStreamCaptureModeThreadLocal &&
        *mode != cudaStreamCaptureModeRelaxed)
        return fail(cudaErrorInvalidValue, "cudaThreadExchangeStreamCaptureMode: mode %d", (int)*mode);
    std::swap(*mode, t_capture_mode);
    return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus *status) {
    if (!status) return fail(cudaErrorInvalidValue, "cudaStreamIsCapturing: status is NULL");
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamIsCapturing: invalid stream");
    std::lock_guard<std::mutex> lk(g_obj_mutex);
    *status = !g_capturing.count(stream)                     ? cudaStreamCaptureStatusNone
              : stream->capture->invalidated_by.empty() ? cudaStreamCaptureStatusActive
                                                        : cudaStreamCaptureStatusInvalidated;
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiateWithFlags(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags) {
    if (!exec) return fail(cudaErrorInvalidValue, "cudaGraphInstantiateWithFlags: exec is NULL");
    *exec = nullptr;
    if (flags != 0) return fail(cudaErrorInvalidValue, "cudaGraphInstantiateWithFlags: flags 0x%llx are not emulated", flags);
    std::lock_guard<std::mutex> lk(g_obj_mutex);
    if (!graph || !g_graphs.count(graph))
        return fail(cudaErrorInvalidResourceHandle, "cudaGraphInstantiateWithFlags: invalid graph %p", (void *)graph);
    *exec = new CUgraphExec_st{graph->ops};
    g_graph_execs.insert(*exec);
    return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
    if (!rt_stream_valid(stream)) return fail(cudaErrorInvalidResourceHandle, "cudaGraphLaunch: invalid stream");
    std::vector<CapturedOp> ops;
    {
        std::lock_guard<std::mutex> lk(g_obj_mutex);
        if (!exec || !g_graph_execs.count(exec))
            return fail(cudaErrorInvalidResourceHandle, "cudaGraphLaunch: invalid graph exec %p", (void *)exec);
        ops = exec->ops;
    }
    auto run = [ops](cudaStream_t s) {
        for (const CapturedOp &op : ops)
            if (cudaError_t e = op(s)) return e;
        return cudaSuccess;
    };
    switch (rt_capture(stream, "cudaGraphLaunch", run)) {
    case CAPTURE_RECORDED: return cudaSuccess;
    case CAPTURE_REFUSED: return cudaErrorStreamCaptureInvalidated;
    case CAPTURE_NONE: break;
    }
    return run(stream);
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    {
        std::lock_guard<std::mutex> lk(g_obj_mutex);
        if (!exec || !g_graph_execs.erase(exec))
            return fail(cudaErrorInvalidResourceHandle, "cudaGraphExecDestroy: invalid graph exec %p", (void *)exec);
    }
    delete exec;
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
    {
        std::lock_guard<std::mutex> lk(g_obj_mutex);
        if (!graph || !g_graphs.erase(graph))
            return fail(cudaErrorInvalidResourceHandle, "cudaGraphDestroy: invalid graph %p", (void *)graph);
    }
    delete graph;
    return cudaSuccess;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Errors                                                                                                */

cudaError_t cudaGetLastError(void) {
    cudaError_t e = t_last;
    t_last = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void) { return t_last; }

const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
#define N(x) case x: return #x;
    N(cudaSuccess) N(cudaErrorInvalidValue) N(cudaErrorMemoryAllocation) N(cudaErrorInitializationError)
    N(cudaErrorInvalidConfiguration) N(cudaErrorInvalidPitchValue) N(cudaErrorInvalidDevicePointer)
    N(cudaErrorInvalidMemcpyDirection) N(cudaErrorInvalidDeviceFunction) N(cudaErrorNoDevice)
    N(cudaErrorInvalidDevice) N(cudaErrorInvalidResourceHandle) N(cudaErrorIllegalState) N(cudaErrorNotReady)
    N(cudaErrorIllegalAddress) N(cudaErrorLaunchOutOfResources) N(cudaErrorLaunchTimeout) N(cudaErrorAssert)
    N(cudaErrorLaunchFailure) N(cudaErrorNotSupported) N(cudaErrorStreamCaptureUnsupported)
    N(cudaErrorStreamCaptureInvalidated) N(cudaErrorStreamCaptureUnmatched) N(cudaErrorCapturedEvent)
    N(cudaErrorUnknown)
#undef N
    }
    return "cudaErrorUnknown";
}

const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidPitchValue: return "invalid pitch argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchTimeout: return "the launch timed out and was terminated";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureUnmatched: return "capture was not initiated in this stream";
    case cudaErrorCapturedEvent: return "operation not permitted on an event last recorded in a capturing stream";
    case cudaErrorUnknown: return "unknown error";
    }
    return "unrecognized error code";
}

/* ---------------------------------------------------------------------------------------------------- */
/* Device                                                                                                */

cudaError_t cudaDeviceSynchronize(void) {
    if (cudaError_t e = sync_of_capturing("cudaDeviceSynchronize", nullptr, true)) return e;
    return sync_point();
}

cudaError_t cudaDeviceReset(void) {
    g_async = 0;
    t_last = cudaSuccess;
    std::lock_guard<std::mutex> lk(g_obj_mutex);
    g_func_smem.clear();
    return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int *count) {
    if (!count) return fail(cudaErrorInvalidValue, "cudaGetDeviceCount: count is NULL");
    *count = device_count();
    return *count ? cudaSuccess : fail(cudaErrorNoDevice, "cudaGetDeviceCount: PEA_EMU_DEVICE_COUNT=0");
}

cudaError_t cudaGetDevice(int *device) {
    if (!device) return fail(cudaErrorInvalidValue, "cudaGetDevice: device is NULL");
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
    if (device != 0 || !device_count()) return fail(cudaErrorInvalidDevice, "cudaSetDevice(%d): no such device", device);
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int device) {
    if (!p) return fail(cudaErrorInvalidValue, "cudaGetDeviceProperties: prop is NULL");
    if (device != 0 || !device_count())
        return fail(cudaErrorInvalidDevice, "cudaGetDeviceProperties(%d): no such device", device);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "Pea SIMT emulator");
    p->totalGlobalMem = device_memory();
    p->sharedMemPerBlock = kSharedDefault;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->memPitch = 2147483647;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024;
    p->maxThreadsDim[1] = 1024;
    p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647;
    p->maxGridSize[1] = 65535;
    p->maxGridSize[2] = 65535;
    p->totalConstMem = 65536;
    p->major = 9;
    p->minor = 0;
    p->textureAlignment = 512;
    p->multiProcessorCount = kMultiProcessors;
    p->canMapHostMemory = 1;
    p->concurrentKernels = 1;
    p->asyncEngineCount = 2;
    p->unifiedAddressing = 1;
    p->memoryBusWidth = 5120;
    p->l2CacheSize = 50 << 20;
    p->maxThreadsPerMultiProcessor = 2048;
    p->sharedMemPerMultiprocessor = 233472;
    p->regsPerMultiprocessor = 65536;
    p->managedMemory = 1;
    p->sharedMemPerBlockOptin = kSharedOptin;
    p->maxBlocksPerMultiProcessor = 32;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device) {
    if (!value) return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: value is NULL");
    cudaDeviceProp p;
    if (cudaError_t e = cudaGetDeviceProperties(&p, device)) return e;
    switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX: *value = p.maxThreadsDim[0]; break;
    case cudaDevAttrMaxBlockDimY: *value = p.maxThreadsDim[1]; break;
    case cudaDevAttrMaxBlockDimZ: *value = p.maxThreadsDim[2]; break;
    case cudaDevAttrMaxGridDimX: *value = p.maxGridSize[0]; break;
    case cudaDevAttrMaxGridDimY: *value = p.maxGridSize[1]; break;
    case cudaDevAttrMaxGridDimZ: *value = p.maxGridSize[2]; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = (int)p.sharedMemPerBlock; break;
    case cudaDevAttrTotalConstantMemory: *value = (int)p.totalConstMem; break;
    case cudaDevAttrWarpSize: *value = p.warpSize; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = p.regsPerBlock; break;
    case cudaDevAttrClockRate: *value = 1000000; break;
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
    case cudaDevAttrGlobalMemoryBusWidth: *value = p.memoryBusWidth; break;
    case cudaDevAttrL2CacheSize: *value = p.l2CacheSize; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = p.maxThreadsPerMultiProcessor; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = (int)p.sharedMemPerMultiprocessor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = (int)p.sharedMemPerBlockOptin; break;
    default: return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute %d is not emulated", (int)attr);
    }
    return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int *version) {
    if (!version) return fail(cudaErrorInvalidValue, "cudaDriverGetVersion: NULL");
    *version = 12000;
    return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int *version) {
    if (!version) return fail(cudaErrorInvalidValue, "cudaRuntimeGetVersion: NULL");
    *version = 12000;
    return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void *func, cudaFuncAttribute attr, int value) {
    if (!func) return fail(cudaErrorInvalidDeviceFunction, "cudaFuncSetAttribute: func is NULL");
    switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize:
        if (value < 0 || (size_t)value > kSharedOptin)
            return fail(cudaErrorInvalidValue,
                        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d): the device allows at most %zu bytes",
                        value, kSharedOptin);
        {
            std::lock_guard<std::mutex> lk(g_obj_mutex);
            g_func_smem[func] = (size_t)value;
        }
        return cudaSuccess;
    case cudaFuncAttributePreferredSharedMemoryCarveout:
        if (value < -1 || value > 100)
            return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute(PreferredSharedMemoryCarveout, %d)", value);
        return cudaSuccess;
    }
    return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute %d is not emulated", (int)attr);
}

void pea_emu_set_quiet(int quiet) { g_quiet = quiet ? 1 : 0; }

const char *pea_emu_last_message(void) { return t_msg.c_str(); }

} // extern "C"
