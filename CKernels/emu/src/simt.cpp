/*
 * simt.cpp — the SIMT emulator's engine: fibers, the block scheduler with barrier and warp rendezvous,
 * shared memory, the launch and the pool of CPU threads that runs blocks.
 *
 * A block runs on one CPU thread. Each of its CUDA threads is a fiber (own stack, own registers). The
 * scheduler resumes the runnable fibers one after the other in the configured order (forward by default);
 * a fiber runs until it waits (barrier, warp intrinsic) or ends. When no fiber is runnable the scheduler
 * completes what can complete — warp intrinsics first, then the block barrier — and otherwise reports a
 * deadlock. Fibers switch only there, so a race on shared memory shows up deterministically.
 */
#include "internal.h"
#include "../emu_half.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if !defined(__x86_64__) && !defined(PEA_EMU_UCONTEXT)
#define PEA_EMU_UCONTEXT 1
#endif
#if PEA_EMU_UCONTEXT
#include <ucontext.h>
#endif

__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread uint3 blockDim;
__thread uint3 gridDim;

#if !PEA_EMU_UCONTEXT
/* pea_emu_ctx_switch(save, load): push the callee-saved registers (and MXCSR, the x87 control word) on
 * the current stack, store the stack pointer in *save, switch to the stack `load` and pop the same set. */
extern "C" __attribute__((visibility("hidden"))) void pea_emu_ctx_switch(void **save, void *load);
asm(R"(
    .pushsection .text
    .p2align 4
    .globl pea_emu_ctx_switch
    .hidden pea_emu_ctx_switch
    .type pea_emu_ctx_switch, @function
pea_emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size pea_emu_ctx_switch, .-pea_emu_ctx_switch
    .popsection
)");
#endif

namespace pea_emu {

/* ---------------------------------------------------------------------------------------------------- */
/* Settings                                                                                              */

static std::atomic<int> g_threads{0};          /* CPU threads for blocks (caller included) */
static std::atomic<int> g_schedule{PEA_EMU_FORWARD};
static std::atomic<unsigned long long> g_seed{0x9e3779b97f4a7c15ull};
static size_t g_stack_bytes = 256 * 1024;
static std::atomic<int> g_skip_kernels{0}; /* PEA_EMU_SKIP_KERNELS=1: launches checked, not run (host-cost timing) */
static std::once_flag g_env_once;

static void read_env() {
    std::call_once(g_env_once, [] {
        if (const char *s = getenv("PEA_EMU_THREADS")) g_threads = atoi(s);
        if (g_threads <= 0) g_threads = (int)std::max(1u, std::thread::hardware_concurrency());
        if (const char *s = getenv("PEA_EMU_SCHEDULE")) {
            if (!strcmp(s, "reverse")) g_schedule = PEA_EMU_REVERSE;
            else if (!strcmp(s, "random")) g_schedule = PEA_EMU_RANDOM;
        }
        if (const char *s = getenv("PEA_EMU_SEED")) g_seed = strtoull(s, nullptr, 0);
        if (const char *s = getenv("PEA_EMU_SKIP_KERNELS")) g_skip_kernels = atoi(s) != 0;
        if (const char *s = getenv("PEA_EMU_STACK_KB")) {
            long kb = atol(s);
            if (kb >= 16) g_stack_bytes = (size_t)kb * 1024;
        }
    });
}

/* ---------------------------------------------------------------------------------------------------- */
/* Fibers                                                                                                */

enum FiberState { F_RUN, F_BARRIER, F_WARP, F_EXIT };

struct Fiber {
#if PEA_EMU_UCONTEXT
    ucontext_t uc;
#else
    void *sp = nullptr;
#endif
    char *map = nullptr; /* guard page + stack */
    size_t map_bytes = 0;
    int linear = 0;
    uint3 tid{};
    int state = F_EXIT;
    const char *file = nullptr; /* where it waits */
    int line = 0;
    int op = 0;                 /* WarpOp, or BarrierMode at a barrier */
    unsigned mask = 0;
    unsigned long long value = 0;
    int arg = 0, width = 32;
    unsigned long long result = 0;
    /* cp.async copies issued but not yet completed, oldest first; `groups` holds, per committed group, the
     * number of copies in it (the copies after the last commit are the open group). */
    struct AsyncCopy {
        void *dst;
        const void *src;
        int bytes, src_bytes;
    };
    std::vector<AsyncCopy> async_copies;
    std::vector<size_t> async_groups;
};

struct SharedReg {
    const void *p;
    size_t bytes;
    const char *name, *file;
    int line;
};

struct Job;

/* The state of one CPU thread that runs blocks. */
struct Worker {
    std::vector<Fiber *> fibers;
#if PEA_EMU_UCONTEXT
    ucontext_t sched_uc;
#else
    void *sched_sp = nullptr;
#endif
    Fiber *cur = nullptr;
    Job *job = nullptr;
    uint3 block{};
    int nthreads = 0, nexited = 0;
    bool failed = false;
    cudaError_t err = cudaSuccess;
    std::string msg;
    std::vector<SharedReg> shared; /* static shared arrays seen by this block */
    size_t static_bytes = 0;
    std::vector<unsigned char> dyn; /* dynamic shared memory */
    size_t dyn_bytes = 0;
    std::vector<int> order;
    unsigned long long rng = 0;

    ~Worker() {
        for (Fiber *f : fibers) {
            if (f->map) munmap(f->map, f->map_bytes);
            delete f;
        }
    }
};

static thread_local Worker *tls_worker = nullptr;
static thread_local std::unique_ptr<Worker> tls_worker_owner;

static Worker &this_worker() {
    if (!tls_worker) {
        tls_worker_owner.reset(new Worker());
        tls_worker = tls_worker_owner.get();
        /* The fault handler must run on its own stack to report a fiber's stack overflow. */
        stack_t old;
        if (sigaltstack(nullptr, &old) == 0 && (old.ss_flags & SS_DISABLE)) {
            stack_t ss;
            ss.ss_size = 64 * 1024;
            ss.ss_sp = malloc(ss.ss_size);
            ss.ss_flags = 0;
            if (ss.ss_sp) sigaltstack(&ss, nullptr);
        }
    }
    return *tls_worker;
}

/* Is addr in the guard page of one of this CPU thread's fiber stacks? (For the fault handler.) */
bool fiber_guard_hit(uintptr_t addr) {
    Worker *w = tls_worker;
    if (!w) return false;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (Fiber *f : w->fibers)
        if (f->map && addr >= (uintptr_t)f->map && addr < (uintptr_t)f->map + page) return true;
    return false;
}

struct Job {
    const Launch *L;
    unsigned long long nblocks;
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> abort{false};
    std::mutex m;
    bool failed = false;
    cudaError_t err = cudaSuccess;
    std::string msg;
};

static void fiber_entry();

static void fiber_prepare(Fiber *f) {
    if (!f->map) {
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        size_t bytes = ((g_stack_bytes + page - 1) / page) * page + page;
        void *m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "pea-emu: cannot map a %zu-byte fiber stack\n", bytes);
            abort();
        }
        mprotect(m, page, PROT_NONE); /* the guard page: a stack overflow faults instead of corrupting */
        f->map = (char *)m;
        f->map_bytes = bytes;
    }
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    char *lo = f->map + page;
    size_t size = f->map_bytes - page;
#if PEA_EMU_UCONTEXT
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = lo;
    f->uc.uc_stack.ss_size = size;
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, (void (*)())fiber_entry, 0);
#else
    uintptr_t top = ((uintptr_t)(lo + size)) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)(top - 72);
    uint32_t mxcsr;
    uint16_t fpucw;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(fpucw));
    memset(sp, 0, 72);
    memcpy((char *)sp, &mxcsr, 4);
    memcpy((char *)sp + 4, &fpucw, 2);
    sp[7] = (uint64_t)(uintptr_t)&fiber_entry; /* popped by `ret`: the fiber starts here */
    sp[8] = 0;                                 /* fiber_entry's return address: it never returns */
    f->sp = sp;
#endif
}

/* From the scheduler into fiber f; returns when f waits or ends. */
static void switch_to(Worker &w, Fiber *f) {
    w.cur = f;
    threadIdx = f->tid;
#if PEA_EMU_UCONTEXT
    swapcontext(&w.sched_uc, &f->uc);
#else
    pea_emu_ctx_switch(&w.sched_sp, f->sp);
#endif
    w.cur = nullptr;
}

/* From the running fiber back to the scheduler. */
static void yield_to_scheduler(Worker &w) {
    Fiber *f = w.cur;
#if PEA_EMU_UCONTEXT
    swapcontext(&f->uc, &w.sched_uc);
#else
    pea_emu_ctx_switch(&f->sp, w.sched_sp);
#endif
}

static void fiber_entry() {
    Worker &w = *tls_worker;
    w.job->L->entry(w.job->L->ctx);
    w.cur->state = F_EXIT;
    w.nexited++;
    yield_to_scheduler(w);
    abort(); /* never resumed */
}

/* ---------------------------------------------------------------------------------------------------- */
/* Messages                                                                                              */

std::string strprintf(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

static std::string block_prefix(const Worker &w) {
    const Launch &L = *w.job->L;
    return strprintf("kernel '%s' block (%u,%u,%u) [grid (%u,%u,%u), block (%u,%u,%u)]", L.name, w.block.x,
                     w.block.y, w.block.z, L.grid.x, L.grid.y, L.grid.z, L.block.x, L.block.y, L.block.z);
}

static std::string thread_name(const Fiber *f) {
    return strprintf("thread (%u,%u,%u) [warp %d lane %d]", f->tid.x, f->tid.y, f->tid.z, f->linear / 32,
                     f->linear % 32);
}

/* "0-15,32,40-47": linear thread ids as ranges. */
static std::string ranges(const std::vector<int> &ids) {
    std::string s;
    size_t i = 0;
    int shown = 0;
    while (i < ids.size()) {
        size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) j++;
        if (shown == 8) {
            s += ",…";
            break;
        }
        if (!s.empty()) s += ",";
        s += j == i ? strprintf("%d", ids[i]) : strprintf("%d-%d", ids[i], ids[j]);
        shown++;
        i = j + 1;
    }
    return s;
}

static const char *op_name(int op) {
    switch (op) {
    case W_SHFL_IDX: return "__shfl_sync";
    case W_SHFL_UP: return "__shfl_up_sync";
    case W_SHFL_DOWN: return "__shfl_down_sync";
    case W_SHFL_XOR: return "__shfl_xor_sync";
    case W_SYNCWARP: return "__syncwarp";
    case W_BALLOT: return "__ballot_sync";
    case W_ANY: return "__any_sync";
    case W_ALL: return "__all_sync";
    case W_REDUCE_ADD: return "__reduce_add_sync";
    case W_REDUCE_MIN: case W_REDUCE_UMIN: return "__reduce_min_sync";
    case W_REDUCE_MAX: case W_REDUCE_UMAX: return "__reduce_max_sync";
    case W_REDUCE_AND: return "__reduce_and_sync";
    case W_REDUCE_OR: return "__reduce_or_sync";
    case W_REDUCE_XOR: return "__reduce_xor_sync";
    case W_ACTIVEMASK: return "__activemask";
    case W_MMA: return "mma.sync.m16n8k16";
    case W_GATHER: return "ldmatrix";
    }
    return "?";
}

static const char *barrier_name(int mode) {
    switch (mode) {
    case B_COUNT: return "__syncthreads_count";
    case B_AND: return "__syncthreads_and";
    case B_OR: return "__syncthreads_or";
    }
    return "__syncthreads";
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* Where a fiber is, in words. */
static std::string where(const Fiber *f) {
    switch (f->state) {
    case F_EXIT: return "exited";
    case F_RUN: return "running";
    case F_BARRIER: return strprintf("wait at %s() %s:%d", barrier_name(f->op), base_name(f->file), f->line);
    case F_WARP:
        return strprintf("wait at %s(mask 0x%08x) %s:%d", op_name(f->op), f->mask, base_name(f->file), f->line);
    }
    return "?";
}

/* Every thread of the block grouped by where it is: one line per place. */
static std::string block_state(const Worker &w) {
    std::vector<std::pair<std::string, std::vector<int>>> groups;
    for (int i = 0; i < w.nthreads; i++) {
        std::string k = where(w.fibers[i]);
        auto it = std::find_if(groups.begin(), groups.end(), [&](const auto &g) { return g.first == k; });
        if (it == groups.end()) groups.push_back({k, {i}});
        else it->second.push_back(i);
    }
    std::string s;
    for (auto &g : groups) s += strprintf("\n    threads %s: %s", ranges(g.second).c_str(), g.first.c_str());
    return s;
}

static void block_fail(Worker &w, cudaError_t err, const std::string &msg) {
    if (w.failed) return;
    w.failed = true;
    w.err = err;
    w.msg = block_prefix(w) + ": " + msg;
}

/* A failure detected in the running fiber: record it and never come back. */
[[noreturn]] static void fiber_fail(cudaError_t err, const std::string &msg) {
    Worker *w = tls_worker;
    if (!w || !w->cur) {
        fprintf(stderr, "pea-emu: %s (outside a kernel launch)\n", msg.c_str());
        abort();
    }
    block_fail(*w, err, thread_name(w->cur) + ": " + msg);
    w->cur->state = F_EXIT;
    yield_to_scheduler(*w);
    abort();
}

static Worker &in_kernel(const char *what) {
    Worker *w = tls_worker;
    if (!w || !w->cur) {
        fprintf(stderr, "pea-emu: %s called outside a kernel launch\n", what);
        abort();
    }
    return *w;
}

std::string current_kernel_description() {
    Worker *w = tls_worker;
    if (!w || !w->job) return "";
    return block_prefix(*w) + (w->cur ? " " + thread_name(w->cur) : std::string());
}

void trap(const char *what, const char *file, int line) {
    in_kernel(what);
    fiber_fail(cudaErrorLaunchFailure, strprintf("%s at %s:%d", what, base_name(file), line));
}

/* ---------------------------------------------------------------------------------------------------- */
/* Barriers and warp intrinsics (called by fibers)                                                      */

int block_barrier(int mode, int pred, const char *file, int line) {
    Worker &w = in_kernel(barrier_name(mode));
    Fiber *f = w.cur;
    f->state = F_BARRIER;
    f->op = mode;
    f->value = pred != 0;
    f->file = file;
    f->line = line;
    yield_to_scheduler(w);
    return (int)f->result;
}

unsigned long long warp_op(int op, unsigned mask, unsigned long long value, int arg, int width, const char *file,
                           int line) {
    Worker &w = in_kernel(op_name(op));
    Fiber *f = w.cur;
    int lane = f->linear % 32;
    if (op != W_ACTIVEMASK && !(mask & (1u << lane)))
        fiber_fail(cudaErrorLaunchFailure,
                   strprintf("%s(mask 0x%08x) at %s:%d: the mask does not name the calling lane %d (CUDA requires "
                             "each calling thread's own bit)",
                             op_name(op), mask, base_name(file), line, lane));
    if (width < 1 || width > 32 || (width & (width - 1)))
        fiber_fail(cudaErrorLaunchFailure, strprintf("%s at %s:%d: width %d is not a power of two in [1, 32]",
                                                     op_name(op), base_name(file), line, width));
    f->state = F_WARP;
    f->op = op;
    f->mask = mask;
    f->value = value;
    f->arg = arg;
    f->width = width;
    f->file = file;
    f->line = line;
    yield_to_scheduler(w);
    return f->result;
}

/* One lane's operands of a warp MMA, on its fiber's stack while it waits; the scheduler writes D into c. */
struct MmaLane {
    unsigned a[4], b[2];
    float c[4];
};

void warp_mma(int kind, float c[4], const unsigned a[4], const unsigned b[2], const char *file, int line) {
    MmaLane m;
    memcpy(m.a, a, sizeof m.a);
    memcpy(m.b, b, sizeof m.b);
    memcpy(m.c, c, sizeof m.c);
    warp_op(W_MMA, 0xffffffffu, (unsigned long long)(uintptr_t)&m, kind, 32, file, line);
    memcpy(c, m.c, sizeof m.c);
}

/* One lane's part of a warp gather (ldmatrix): its own four words in, every lane's words out. */
struct GatherLane {
    unsigned mine[4];
    unsigned (*all)[4];
    int lane;
};

void warp_gather4(const unsigned mine[4], unsigned all[32][4], int *lane, const char *file, int line) {
    GatherLane g;
    memcpy(g.mine, mine, sizeof g.mine);
    g.all = all;
    g.lane = 0;
    warp_op(W_GATHER, 0xffffffffu, (unsigned long long)(uintptr_t)&g, 0, 32, file, line);
    *lane = g.lane;
}

/* cp.async: the copy is queued on the issuing thread and carried out only when a cp.async.wait_group makes
 * the thread wait for its group, so a kernel that reads shared memory before waiting reads the old bytes (the
 * poison of a fresh block, or the previous tile), as it may on a GPU. */
void cp_async(void *dst, const void *src, int bytes, int src_bytes, const char *file, int line) {
    Worker &w = in_kernel("cp.async");
    if (((uintptr_t)dst | (uintptr_t)src) % (uintptr_t)bytes != 0)
        fiber_fail(cudaErrorLaunchFailure,
                   strprintf("cp.async at %s:%d: addresses %p (shared) and %p (global) are not %d-byte aligned",
                             base_name(file), line, dst, src, bytes));
    if (src_bytes < 0 || src_bytes > bytes)
        fiber_fail(cudaErrorLaunchFailure, strprintf("cp.async at %s:%d: src-size %d is outside [0, %d]",
                                                     base_name(file), line, src_bytes, bytes));
    w.cur->async_copies.push_back({dst, src, bytes, src_bytes});
}

void cp_async_commit() {
    Worker &w = in_kernel("cp.async.commit_group");
    Fiber *f = w.cur;
    size_t committed = 0;
    for (size_t n : f->async_groups) committed += n;
    f->async_groups.push_back(f->async_copies.size() - committed);
}

void cp_async_wait(int pending) {
    Worker &w = in_kernel("cp.async.wait_group");
    Fiber *f = w.cur;
    while ((int)f->async_groups.size() > pending) {
        const size_t n = f->async_groups.front();
        for (size_t i = 0; i < n; i++) {
            const Fiber::AsyncCopy &c = f->async_copies[i];
            if (c.src_bytes) memcpy(c.dst, c.src, (size_t)c.src_bytes);
            memset((char *)c.dst + c.src_bytes, 0, (size_t)(c.bytes - c.src_bytes));
        }
        f->async_copies.erase(f->async_copies.begin(), f->async_copies.begin() + (long)n);
        f->async_groups.erase(f->async_groups.begin());
    }
}

/* One element of an MMA operand: the 16-bit half `hi` of a .b32 register as f16 or bf16. */
static double mma_element(unsigned reg, int hi, int kind) {
    unsigned bits = (reg >> (16 * hi)) & 0xffffu;
    if (kind == MMA_M16N8K16_F32_BF16) return (double)bf16_bits_to_f32((unsigned short)bits);
    return (double)f16_bits_to_f32((unsigned short)bits);
}

/* D = A·B + C for the warp whose 32 lanes (fibers base … base+31) wait at an m16n8k16 MMA. The fragments
 * are placed as the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type") says, with
 * groupID g = lane >> 2 and threadID_in_group t = lane % 4:
 *   A (16×16): a_i (i = 0…7, two per register, low half first) at row g (i < 2 or 4 ≤ i < 6), else g + 8;
 *              column 2t + (i & 1), plus 8 for i ≥ 4;
 *   B (16×8):  b_i (i = 0…3) at row 2t + (i & 1), plus 8 for i ≥ 2; column g;
 *   C, D:      c_i (i = 0…3) at row g (i < 2), else g + 8; column 2t + (i & 1).
 * Products are exact in double (11- or 8-bit significands) and so is their sum for any realistic exponent
 * spread; one rounding to f32 at the end. */
static void mma_compute(Worker &w, int base, int kind) {
    double A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; lane++) {
        const MmaLane *m = (const MmaLane *)(uintptr_t)w.fibers[base + lane]->value;
        const int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < 8; i++) {
            const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
            const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = mma_element(m->a[i / 2], i & 1, kind);
        }
        for (int i = 0; i < 4; i++) {
            B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = mma_element(m->b[i / 2], i & 1, kind);
            C[i < 2 ? g : g + 8][2 * t + (i & 1)] = (double)m->c[i];
        }
    }
    for (int lane = 0; lane < 32; lane++) {
        MmaLane *m = (MmaLane *)(uintptr_t)w.fibers[base + lane]->value;
        const int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < 4; i++) {
            const int row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
            double sum = 0.0;
            for (int k = 0; k < 16; k++) sum += A[row][k] * B[k][col];
            m->c[i] = (float)(sum + C[row][col]);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* Shared memory                                                                                         */

void shared_enter(void *p, size_t bytes, const char *name, const char *file, int line) {
    Worker &w = in_kernel("a __shared__ declaration");
    for (const SharedReg &r : w.shared)
        if (r.p == p) return;
    memset(p, 0xff, bytes); /* uninitialised shared memory reads as NaN */
    w.shared.push_back(SharedReg{p, bytes, name, file, line});
    w.static_bytes += bytes;
    if (w.static_bytes > kSharedDefault)
        fiber_fail(cudaErrorInvalidValue,
                   strprintf("static shared memory reaches %zu bytes with '%s' (%s:%d); the limit is %zu",
                             w.static_bytes, name, base_name(file), line, kSharedDefault));
    if (w.static_bytes + w.dyn_bytes > kSharedOptin)
        fiber_fail(cudaErrorInvalidValue,
                   strprintf("%zu bytes of static plus %zu bytes of dynamic shared memory exceed the device's %zu",
                             w.static_bytes, w.dyn_bytes, kSharedOptin));
}

void shared_oob(const void *base, long long i, long long j, long long n, long long m) {
    Worker &w = in_kernel("shared memory indexing");
    const SharedReg *r = nullptr;
    for (const SharedReg &s : w.shared)
        if (s.p == base) r = &s;
    std::string decl = r ? strprintf("'%s' (%s:%d)", r->name, base_name(r->file), r->line) : std::string("?");
    std::string msg;
    if (m < 0) msg = strprintf("shared array %s [%lld] indexed at [%lld]: out of bounds", decl.c_str(), n, i);
    else if (j == -2)
        msg = strprintf("shared array %s [%lld][%lld] indexed at row [%lld]: out of bounds", decl.c_str(), n, m, i);
    else
        msg = strprintf("shared array %s [%lld][%lld] indexed at [%lld][%lld]: out of bounds", decl.c_str(), n, m, i,
                        j);
    fiber_fail(cudaErrorIllegalAddress, msg);
}

void dynamic_oob(const char *name, long long i, long long n, size_t elem) {
    in_kernel("dynamic shared memory indexing");
    fiber_fail(cudaErrorIllegalAddress,
               strprintf("dynamic shared memory '%s' indexed at element %lld; the launch gave %lld elements of %zu "
                         "bytes: out of bounds",
                         name, i, n, elem));
}

void *dynamic_shared(size_t *bytes) {
    Worker &w = in_kernel("PEA_DYNAMIC_SHARED");
    *bytes = w.dyn_bytes;
    return w.dyn.data();
}

/* ---------------------------------------------------------------------------------------------------- */
/* The block scheduler                                                                                   */

static unsigned long long next_random(unsigned long long &s) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
}

static bool is_shuffle(int op) { return op <= W_SHFL_XOR; }

/* The lane a shuffle reads for `lane`, or -1 when it keeps its own value (CUDA's rules for each kind). */
static int shuffle_source(int op, int lane, int arg, int width) {
    int base = lane & ~(width - 1);
    int src;
    switch (op) {
    case W_SHFL_IDX: return base + (arg & (width - 1));
    case W_SHFL_UP:
        src = lane - arg;
        return src < base ? -1 : src;
    case W_SHFL_DOWN:
        src = lane + arg;
        return src >= base + width ? -1 : src;
    case W_SHFL_XOR:
        src = lane ^ arg;
        return (src < 0 || src >= base + width) ? -1 : src;
    }
    return -1;
}

/* Complete every warp intrinsic whose participants have all arrived. Returns whether any completed. */
static bool resolve_warps(Worker &w) {
    bool progressed = false;
    int nwarps = (w.nthreads + 31) / 32;
    for (int wp = 0; wp < nwarps && !w.failed; wp++) {
        int base = wp * 32;
        int nl = std::min(32, w.nthreads - base);
        unsigned live = 0, waiting = 0;
        for (int l = 0; l < nl; l++) {
            Fiber *f = w.fibers[base + l];
            if (f->state != F_EXIT) live |= 1u << l;
            if (f->state == F_WARP) waiting |= 1u << l;
        }
        unsigned handled = 0;
        for (int l = 0; l < nl; l++) {
            if (!(waiting & (1u << l)) || (handled & (1u << l))) continue;
            Fiber *f = w.fibers[base + l];
            if (f->op == W_ACTIVEMASK) { /* the lanes waiting at this same __activemask() call */
                unsigned group = 0;
                for (int j = 0; j < nl; j++) {
                    Fiber *g = w.fibers[base + j];
                    if (g->state == F_WARP && g->op == W_ACTIVEMASK && g->line == f->line && !strcmp(g->file, f->file))
                        group |= 1u << j;
                }
                for (int j = 0; j < nl; j++)
                    if (group & (1u << j)) {
                        w.fibers[base + j]->result = group;
                        w.fibers[base + j]->state = F_RUN;
                    }
                handled |= group;
                progressed = true;
                continue;
            }
            unsigned P = f->mask & live; /* exited lanes named in the mask are excused, as CUDA says */
            bool ready = true;
            for (int j = 0; j < 32 && ready; j++) {
                if (!(P & (1u << j))) continue;
                Fiber *g = w.fibers[base + j];
                if (g->state != F_WARP || g->mask != f->mask) ready = false;
                else if (g->op != f->op || g->width != f->width) {
                    block_fail(w, cudaErrorLaunchFailure,
                               strprintf("warp %d: lanes with the same mask 0x%08x call different intrinsics: lane "
                                         "%d %s (width %d) %s:%d, lane %d %s (width %d) %s:%d",
                                         wp, f->mask, l, op_name(f->op), f->width, base_name(f->file), f->line, j,
                                         op_name(g->op), g->width, base_name(g->file), g->line));
                    return false;
                }
            }
            if (!ready) continue;
            if (f->op == W_MMA || f->op == W_GATHER) { /* .sync.aligned: the whole warp, converged, one instruction */
                if (P != 0xffffffffu) {
                    block_fail(w, cudaErrorLaunchFailure,
                               strprintf("warp %d: %s at %s:%d needs all 32 lanes of the warp, but lanes 0x%08x "
                                         "take part (the others exited, or the block ends mid-warp)",
                                         wp, op_name(f->op), base_name(f->file), f->line, P));
                    return false;
                }
                for (int j = 0; j < 32; j++) {
                    const Fiber *g = w.fibers[base + j];
                    if (g->arg != f->arg || g->line != f->line || strcmp(g->file, f->file) != 0) {
                        block_fail(w, cudaErrorLaunchFailure,
                                   strprintf("warp %d: lanes wait at different %s calls: lane %d %s:%d "
                                             "(kind %d), lane %d %s:%d (kind %d)",
                                             wp, op_name(f->op), l, base_name(f->file), f->line, f->arg, j, base_name(g->file),
                                             g->line, g->arg));
                        return false;
                    }
                }
                if (f->op == W_MMA) {
                    mma_compute(w, base, f->arg);
                } else {
                    for (int j = 0; j < 32; j++) {
                        GatherLane *gl = (GatherLane *)(uintptr_t)w.fibers[base + j]->value;
                        gl->lane = j;
                        for (int k = 0; k < 32; k++)
                            memcpy(gl->all[k], ((const GatherLane *)(uintptr_t)w.fibers[base + k]->value)->mine,
                                   sizeof gl->mine);
                    }
                }
                for (int j = 0; j < 32; j++) w.fibers[base + j]->state = F_RUN;
                handled |= P;
                progressed = true;
                continue;
            }
            /* Every participant is here: compute each one's result. */
            unsigned long long ballot = 0, acc = 0;
            bool first = true;
            for (int j = 0; j < 32; j++) {
                if (!(P & (1u << j))) continue;
                Fiber *g = w.fibers[base + j];
                if (g->value) ballot |= 1ull << j;
                unsigned v = (unsigned)g->value;
                switch (f->op) {
                case W_REDUCE_ADD: acc = first ? v : (unsigned)(acc + v); break;
                case W_REDUCE_MIN: acc = first ? v : (unsigned)std::min((int)acc, (int)v); break;
                case W_REDUCE_MAX: acc = first ? v : (unsigned)std::max((int)acc, (int)v); break;
                case W_REDUCE_UMIN: acc = first ? v : std::min((unsigned)acc, v); break;
                case W_REDUCE_UMAX: acc = first ? v : std::max((unsigned)acc, v); break;
                case W_REDUCE_AND: acc = first ? v : (acc & v); break;
                case W_REDUCE_OR: acc = first ? v : (acc | v); break;
                case W_REDUCE_XOR: acc = first ? v : (acc ^ v); break;
                }
                first = false;
            }
            for (int j = 0; j < 32; j++) {
                if (!(P & (1u << j))) continue;
                Fiber *g = w.fibers[base + j];
                if (is_shuffle(f->op)) {
                    int src = shuffle_source(f->op, j, g->arg, g->width);
                    if (src < 0 || src == j) g->result = g->value;
                    else if (src < 32 && (P & (1u << src))) g->result = w.fibers[base + src]->value;
                    else g->result = ~0ull; /* a lane that does not take part: undefined in CUDA, NaN here */
                } else if (f->op == W_BALLOT) {
                    g->result = ballot;
                } else if (f->op == W_ANY) {
                    g->result = ballot != 0;
                } else if (f->op == W_ALL) {
                    g->result = ballot == P;
                } else {
                    g->result = acc;
                }
                g->state = F_RUN;
            }
            handled |= P;
            progressed = true;
        }
    }
    return progressed;
}

/* Release the block barrier if every thread waits at it; otherwise report why the block is stuck. */
static bool resolve_barrier(Worker &w) {
    std::vector<int> at_barrier, exited, at_warp;
    for (int i = 0; i < w.nthreads; i++) {
        int s = w.fibers[i]->state;
        if (s == F_BARRIER) at_barrier.push_back(i);
        else if (s == F_EXIT) exited.push_back(i);
        else at_warp.push_back(i);
    }
    if (!at_warp.empty()) {
        block_fail(w, cudaErrorLaunchFailure,
                   "deadlock: a warp intrinsic waits for lanes that never arrive (every lane named in the mask "
                   "must call the same intrinsic with the same mask):" + block_state(w));
        return false;
    }
    if (!exited.empty()) {
        block_fail(w, cudaErrorLaunchFailure,
                   strprintf("deadlock: %zu threads wait at a barrier that %zu threads exited without reaching "
                             "(__syncthreads must be reached by every thread of the block):",
                             at_barrier.size(), exited.size()) + block_state(w));
        return false;
    }
    const Fiber *f0 = w.fibers[at_barrier[0]];
    for (int i : at_barrier) {
        const Fiber *f = w.fibers[i];
        if (f->line != f0->line || f->op != f0->op || strcmp(f->file, f0->file) != 0) {
            block_fail(w, cudaErrorLaunchFailure,
                       "divergent barrier: threads of the block wait at different barriers (a barrier in code "
                       "that not every thread takes):" + block_state(w));
            return false;
        }
    }
    int count = 0;
    for (int i : at_barrier) count += (int)w.fibers[i]->value;
    int result = 0;
    switch (f0->op) {
    case B_COUNT: result = count; break;
    case B_AND: result = count == (int)at_barrier.size(); break;
    case B_OR: result = count != 0; break;
    }
    for (int i : at_barrier) {
        w.fibers[i]->result = (unsigned long long)result;
        w.fibers[i]->state = F_RUN;
    }
    return true;
}

static void run_block(Worker &w, Job &job, unsigned long long b) {
    const Launch &L = *job.L;
    w.job = &job;
    w.block = uint3{(unsigned)(b % L.grid.x), (unsigned)((b / L.grid.x) % L.grid.y),
                    (unsigned)(b / ((unsigned long long)L.grid.x * L.grid.y))};
    blockIdx = w.block;
    blockDim = uint3{L.block.x, L.block.y, L.block.z};
    gridDim = uint3{L.grid.x, L.grid.y, L.grid.z};
    w.nthreads = (int)(L.block.x * L.block.y * L.block.z);
    w.nexited = 0;
    w.failed = false;
    w.msg.clear();
    w.shared.clear();
    w.static_bytes = 0;
    w.dyn_bytes = L.smem;
    if (w.dyn.size() < L.smem) w.dyn.resize(L.smem);
    if (L.smem) memset(w.dyn.data(), 0xff, L.smem); /* uninitialised shared memory reads as NaN */

    while ((int)w.fibers.size() < w.nthreads) w.fibers.push_back(new Fiber());
    for (int i = 0; i < w.nthreads; i++) {
        Fiber *f = w.fibers[i];
        fiber_prepare(f);
        f->linear = i;
        f->tid = uint3{(unsigned)(i % L.block.x), (unsigned)((i / L.block.x) % L.block.y),
                       (unsigned)(i / (L.block.x * L.block.y))};
        f->state = F_RUN;
        f->result = 0;
        f->async_copies.clear(); /* copies a previous block left in flight are dropped with its shared memory */
        f->async_groups.clear();
    }
    w.order.resize(w.nthreads);
    int sched = g_schedule.load();
    for (int i = 0; i < w.nthreads; i++) w.order[i] = sched == PEA_EMU_REVERSE ? w.nthreads - 1 - i : i;
    w.rng = g_seed.load() ^ (b * 0x9e3779b97f4a7c15ull) ^ 0x5deece66dull;
    if (!w.rng) w.rng = 1;

    for (;;) {
        if (sched == PEA_EMU_RANDOM)
            for (int i = w.nthreads - 1; i > 0; i--) std::swap(w.order[i], w.order[next_random(w.rng) % (i + 1)]);
        for (int i : w.order) {
            Fiber *f = w.fibers[i];
            if (f->state != F_RUN) continue;
            switch_to(w, f);
            if (w.failed) break;
        }
        if (w.failed || w.nexited == w.nthreads) break;
        if (resolve_warps(w)) continue;
        if (w.failed || !resolve_barrier(w)) break;
    }
    w.job = nullptr;
}

/* ---------------------------------------------------------------------------------------------------- */
/* The pool of CPU threads                                                                               */

struct Pool {
    std::mutex run_mutex; /* one job at a time */
    std::mutex m;
    std::condition_variable cv_start, cv_done;
    int nthreads = 0; /* helper threads started */
    unsigned long long gen = 0;
    int want = 0, done = 0;
    void (*fn)(void *) = nullptr;
    void *arg = nullptr;

    void helper(int index) {
        unsigned long long seen = 0;
        for (;;) {
            void (*f)(void *);
            void *a;
            {
                std::unique_lock<std::mutex> lk(m);
                cv_start.wait(lk, [&] { return gen != seen; });
                seen = gen;
                if (index >= want) continue;
                f = fn;
                a = arg;
            }
            f(a);
            {
                std::lock_guard<std::mutex> lk(m);
                done++;
            }
            cv_done.notify_all();
        }
    }

    /* fn(arg) on `n` CPU threads at once, the caller being one of them. */
    void run(int n, void (*f)(void *), void *a) {
        int helpers = n - 1;
        {
            std::lock_guard<std::mutex> lk(m);
            while (nthreads < helpers) {
                int index = nthreads++;
                std::thread([this, index] { helper(index); }).detach();
            }
            fn = f;
            arg = a;
            want = helpers;
            done = 0;
            gen++;
        }
        if (helpers > 0) cv_start.notify_all();
        f(a);
        std::unique_lock<std::mutex> lk(m);
        cv_done.wait(lk, [&] { return done == want; });
    }
};

static Pool &pool() {
    static Pool *p = new Pool(); /* never destroyed: its threads outlive static destructors */
    return *p;
}

static void launch_worker(void *arg) {
    Job &job = *(Job *)arg;
    Worker &w = this_worker();
    while (!job.abort.load(std::memory_order_relaxed)) {
        unsigned long long b = job.next.fetch_add(1);
        if (b >= job.nblocks) break;
        run_block(w, job, b);
        if (w.failed) {
            std::lock_guard<std::mutex> lk(job.m);
            if (!job.failed) {
                job.failed = true;
                job.err = w.err;
                job.msg = w.msg;
            }
            job.abort = true;
        }
    }
}

void launch(const Launch &L) {
    read_env();
    if (tls_worker && tls_worker->job) {
        fiber_fail(cudaErrorNotSupported,
                   strprintf("kernel '%s' launched from device code: dynamic parallelism is not emulated", L.name));
    }
    const dim3 &g = L.grid, &b = L.block;
    unsigned long long threads = (unsigned long long)b.x * b.y * b.z;
    if (!rt_stream_valid(L.stream)) {
        rt_api_error(cudaErrorInvalidResourceHandle, strprintf("launch of kernel '%s': invalid stream", L.name));
        return;
    }
    if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024) {
        rt_api_error(cudaErrorInvalidConfiguration,
                     strprintf("launch of kernel '%s': block (%u,%u,%u) = %llu threads; a block has 1 to 1024 "
                               "threads (x, y ≤ 1024, z ≤ 64)",
                               L.name, b.x, b.y, b.z, threads));
        return;
    }
    if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
        rt_api_error(cudaErrorInvalidConfiguration,
                     strprintf("launch of kernel '%s': grid (%u,%u,%u); a grid is 1 to 2^31-1 × 65535 × 65535 blocks",
                               L.name, g.x, g.y, g.z));
        return;
    }
    size_t limit = rt_func_max_dynamic_smem(L.func);
    if (L.smem > limit) {
        rt_api_error(cudaErrorInvalidValue,
                     strprintf("launch of kernel '%s': %zu bytes of dynamic shared memory, above the kernel's limit "
                               "of %zu (raise it with cudaFuncSetAttribute(kernel, "
                               "cudaFuncAttributeMaxDynamicSharedMemorySize, n), n ≤ %zu)",
                               L.name, L.smem, limit, kSharedOptin));
        return;
    }
    for (int i = 0; i < L.nargs; i++) {
        const char *why = L.pointers[i] ? rt_kernel_pointer_problem(L.pointers[i]) : nullptr;
        if (why) {
            rt_kernel_error(cudaErrorIllegalAddress, strprintf("launch of kernel '%s': argument %d is %p, %s", L.name,
                                                               i + 1, L.pointers[i], why));
            return;
        }
    }
    /* A capturing stream records the launch: the converted arguments are copied, and a replay launches
     * that copy (checked again then, on the stream the graph is launched on). */
    if (rt_stream_capturing(L.stream)) {
        std::shared_ptr<void> args(L.clone(L.ctx), L.release);
        auto pointers = std::make_shared<std::vector<const void *>>(L.pointers, L.pointers + L.nargs);
        CaptureResult captured = rt_capture(L.stream, L.name, [L, args, pointers](cudaStream_t s) {
            Launch replay = L;
            replay.ctx = args.get();
            replay.pointers = pointers->data();
            replay.stream = s;
            launch(replay);
            return cudaSuccess;
        });
        if (captured != CAPTURE_NONE) return;
    }
    if (g_skip_kernels) return;
    Job job;
    job.L = &L;
    job.nblocks = (unsigned long long)g.x * g.y * g.z;
    int n = (int)std::min<unsigned long long>((unsigned long long)std::max(1, g_threads.load()), job.nblocks);
    {
        Pool &p = pool();
        std::lock_guard<std::mutex> lk(p.run_mutex);
        p.run(n, launch_worker, &job);
    }
    if (job.failed) rt_kernel_error(job.err, job.msg);
}

struct ForJob {
    long long n, grain;
    void (*fn)(void *, long long, long long);
    void *ctx;
    std::atomic<long long> next{0};
};

static void for_worker(void *arg) {
    ForJob &j = *(ForJob *)arg;
    for (;;) {
        long long b = j.next.fetch_add(j.grain);
        if (b >= j.n) break;
        j.fn(j.ctx, b, std::min(j.n, b + j.grain));
    }
}

void parallel_for(long long n, long long grain, void (*fn)(void *, long long, long long), void *ctx) {
    read_env();
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    long long chunks = (n + grain - 1) / grain;
    int t = (int)std::min<long long>(std::max(1, g_threads.load()), chunks);
    if (t <= 1) {
        fn(ctx, 0, n);
        return;
    }
    ForJob j;
    j.n = n;
    j.grain = grain;
    j.fn = fn;
    j.ctx = ctx;
    Pool &p = pool();
    std::lock_guard<std::mutex> lk(p.run_mutex);
    p.run(t, for_worker, &j);
}

} // namespace pea_emu

extern "C" {

void pea_emu_set_threads(int n) {
    pea_emu::read_env();
    if (n <= 0) {
        const char *s = getenv("PEA_EMU_THREADS");
        n = s ? atoi(s) : 0;
        if (n <= 0) n = (int)std::max(1u, std::thread::hardware_concurrency());
    }
    pea_emu::g_threads = n;
}

int pea_emu_get_threads(void) {
    pea_emu::read_env();
    return pea_emu::g_threads;
}

void pea_emu_set_schedule(int order, unsigned long long seed) {
    pea_emu::read_env();
    pea_emu::g_schedule = order;
    pea_emu::g_seed = seed ? seed : 0x9e3779b97f4a7c15ull;
}

void pea_emu_set_skip_kernels(int skip) {
    pea_emu::read_env();
    pea_emu::g_skip_kernels = skip != 0;
}

int pea_emu_skipping_kernels(void) {
    pea_emu::read_env();
    return pea_emu::g_skip_kernels.load();
}

} // extern "C"
