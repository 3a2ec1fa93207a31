/*
 * test_simt.cpp — the emulator's semantics, one feature at a time: built-in indices, per-thread kernel
 * arguments, per-block shared memory across CPU threads, barriers with predicates, every warp intrinsic
 * (with widths, partial masks, exited lanes), atomics across blocks running at the same time, launch
 * limits, misuse errors, and the runtime API (copies, their checks, streams, events, device properties).
 * Expected values come from the rules as NVIDIA's CUDA C++ Programming Guide states them, written out here
 * independently of the emulator's code.
 */
#include "check.h"

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <sys/wait.h>

#include <cmath>
#include <thread>

#include "../pea_simt.h"

#define FULL 0xffffffffu

/* ---------------------------------------------------------------------------------------------------- */
/* Kernels                                                                                               */

/* out[g] = packed (thread, block) indices of global thread g; a 3-D grid of 3-D blocks. */
__global__ void indices_kernel(unsigned *out) {
    unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned nt = blockDim.x * blockDim.y * blockDim.z;
    out[b * nt + t] = (threadIdx.x << 24) | (threadIdx.y << 16) | (threadIdx.z << 8) | (blockIdx.x << 4) |
                      (blockIdx.y << 2) | blockIdx.z;
}

/* Each thread gets its own copy of the arguments: n += t changes only this thread's n. */
__global__ void param_copy_kernel(int n, int *out) {
    n += threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = n;
}

/* Shared memory is per block: each block fills s with its own id, then reads it back reversed. */
__global__ void shared_per_block_kernel(int *out) {
    PEA_SHARED_ARRAY(int, s, 64);
    __shared__ int plain[64];
    int t = threadIdx.x;
    s[t] = (int)blockIdx.x * 1000 + t;
    plain[t] = (int)blockIdx.x * 1000 + t;
    __syncthreads();
    out[blockIdx.x * 64 + t] = s[63 - t] - plain[63 - t] + s[63 - t];
}

/* Every thread reads its own slot of shared memory before anyone wrote it (whatever the order the threads
 * run in): the emulator's poison, all bytes 0xFF. */
__global__ void poison_kernel(unsigned *out) {
    PEA_SHARED_ARRAY(unsigned, s, 32);
    PEA_DYNAMIC_SHARED(unsigned, d);
    unsigned before = s[threadIdx.x], dyn_before = d[threadIdx.x % 16];
    s[threadIdx.x] = threadIdx.x;
    __syncthreads();
    if (threadIdx.x == 0) {
        out[0] = before;
        out[1] = dyn_before;
        out[2] = s[31];
    }
}

/* __syncthreads_count / _and / _or of pred = (t % 3 == 0). */
__global__ void barrier_pred_kernel(int *out) {
    int t = threadIdx.x;
    int c = __syncthreads_count(t % 3 == 0);
    int a = __syncthreads_and(t % 3 == 0);
    int o = __syncthreads_or(t % 3 == 0);
    int all = __syncthreads_and(1);
    int none = __syncthreads_or(0);
    if (t == 0) {
        out[0] = c;
        out[1] = a;
        out[2] = o;
        out[3] = all;
        out[4] = none;
    }
}

enum { OP_IDX, OP_UP, OP_DOWN, OP_XOR };

/* out[t] = the shuffle `op` of value v = 3t + 1 with argument `arg` and width `width`, full mask. */
__global__ void shuffle_kernel(int *out, int op, int arg, int width) {
    int v = 3 * (int)threadIdx.x + 1;
    int r = 0;
    switch (op) {
    case OP_IDX: r = __shfl_sync(FULL, v, arg * (int)(threadIdx.x % 32) + 3, width); break;
    case OP_UP: r = __shfl_up_sync(FULL, v, (unsigned)arg, width); break;
    case OP_DOWN: r = __shfl_down_sync(FULL, v, (unsigned)arg, width); break;
    case OP_XOR: r = __shfl_xor_sync(FULL, v, arg, width); break;
    }
    out[threadIdx.x] = r;
}

/* 64-bit and half shuffles: out_d[t] = d of lane t ^ 5, out_h[t] = h of lane (t + 1) % 32. */
__global__ void shuffle_types_kernel(double *out_d, __half *out_h) {
    double d = 1e300 * (threadIdx.x + 1);
    __half h = __float2half((float)threadIdx.x);
    out_d[threadIdx.x] = __shfl_xor_sync(FULL, d, 5);
    out_h[threadIdx.x] = __shfl_sync(FULL, h, (threadIdx.x + 1) % 32);
}

/* Two independent half-warp groups at the same time: lanes 0-15 and 16-31 each exchange with lane ^ 1. */
__global__ void half_groups_kernel(int *out) {
    int lane = threadIdx.x % 32;
    unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    out[threadIdx.x] = __shfl_xor_sync(mask, (int)threadIdx.x * 10, 1);
}

/* Vote and reduce: ballot/any/all of (lane % 3 == 0), __reduce_*_sync of lane-dependent values. */
__global__ void vote_kernel(unsigned *out) {
    int lane = threadIdx.x % 32;
    int p = lane % 3 == 0;
    unsigned b = __ballot_sync(FULL, p);
    int any = __any_sync(FULL, p), all = __all_sync(FULL, p), all1 = __all_sync(FULL, 1), any0 = __any_sync(FULL, 0);
    unsigned sum = __reduce_add_sync(FULL, (unsigned)lane);
    int mn = __reduce_min_sync(FULL, 5 - lane), mx = __reduce_max_sync(FULL, lane * 2);
    unsigned orr = __reduce_or_sync(FULL, 1u << lane);
    __syncwarp();
    if (threadIdx.x == 0) {
        out[0] = b;
        out[1] = (unsigned)any;
        out[2] = (unsigned)all;
        out[3] = (unsigned)all1;
        out[4] = (unsigned)any0;
        out[5] = sum;
        out[6] = (unsigned)mn;
        out[7] = (unsigned)mx;
        out[8] = orr;
    }
}

/* Lanes 20-31 exit; the rest see __activemask() = lanes 0-19 and a full-mask __syncwarp / ballot excuses the
 * exited lanes (CUDA: "all non-exited threads named in mask must execute the same intrinsic"). Lane 0 then
 * reads lane 25's value with a shuffle: an exited lane, undefined in CUDA, the poison here. */
__global__ void exited_lanes_kernel(unsigned *out) {
    int lane = threadIdx.x % 32;
    if (lane >= 20) return;
    unsigned am = __activemask();
    __syncwarp(FULL);
    unsigned b = __ballot_sync(FULL, 1);
    float got = __shfl_sync(FULL, 1.0f, 25);
    if (lane == 0) {
        out[0] = am;
        out[1] = b;
        out[2] = __float_as_uint(got);
    }
}

/* Two lanes of one mask calling different intrinsics: an error. */
__global__ void mixed_intrinsics_kernel(int *out) {
    int v = (int)threadIdx.x;
    if (threadIdx.x % 2) v = __shfl_xor_sync(FULL, v, 1);
    else v = __shfl_down_sync(FULL, v, 1);
    out[threadIdx.x] = v;
}

/* Atomics from every thread of every block, with blocks on several CPU threads at once. */
__global__ void atomics_kernel(int *count, float *fsum, unsigned *umax, unsigned long long *cas_count, int *exch,
                               unsigned *wrap) {
    unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(count, 1);
    atomicAdd(fsum, 0.5f);
    atomicMax(umax, g * 7u % 1000003u);
    unsigned long long old = *cas_count, seen;
    while ((seen = atomicCAS(cas_count, old, old + 1)) != old) old = seen;
    atomicExch(exch, (int)g);
    atomicInc(wrap, 9u); /* counts 0..9 and wraps */
}

/* Static shared memory above 48 KB: an error when the block declares it. */
__global__ void big_static_shared_kernel(float *out) {
    PEA_SHARED_ARRAY(float, big, 13000); /* 52000 bytes */
    big[threadIdx.x] = 1.0f;
    out[0] = big[0];
}

/* Dynamic shared memory seen as two types; the last element, then one past it. */
__global__ void dynamic_views_kernel(float *out, int n, int past) {
    PEA_DYNAMIC_SHARED(float, f);
    PEA_DYNAMIC_SHARED(unsigned, u);
    if (threadIdx.x == 0) {
        f[n - 1] = 2.0f;
        out[0] = __uint_as_float(u[n - 1]);
        auto tail = f + (n - 2);
        out[1] = tail[1];
        if (past) out[2] = f[n];
    }
}

/* A __syncthreads outside any kernel never happens; a kernel that writes one past a cudaMalloc buffer
 * whose size is a multiple of 256 touches the guard page. */
__global__ void global_oob_kernel(float *x, int n) { x[n + threadIdx.x] = 1.0f; }

__device__ int deep(int d) {
    volatile char pad[1024];
    pad[0] = (char)d;
    return d == 0 ? pad[0] : deep(d - 1) + pad[0];
}

/* Recursion deep enough to overflow a fiber stack (256 KB). */
__global__ void stack_overflow_kernel(int *out) { out[0] = deep(100000); }

/* Tensor-core MMA: each warp of each block computes D = A·B + C on its own 16×16 A, 16×8 B, 16×8 C. Lane l
 * of warp w reads its fragments from fa[w][l][4], fb[w][l][2], fc[w][l][4] (w counting warps over the grid)
 * and writes its D fragment to fd[w][l][4]. Thread `exit_lane` (block 0) returns before the MMA. */
__global__ void mma_kernel(const unsigned *fa, const unsigned *fb, const float *fc, float *fd, int bf16,
                           int exit_lane) {
    const int t = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (t == exit_lane) return;
    unsigned a[4], b[2];
    float c[4];
    for (int i = 0; i < 4; i++) a[i] = fa[t * 4 + i];
    for (int i = 0; i < 2; i++) b[i] = fb[t * 2 + i];
    for (int i = 0; i < 4; i++) c[i] = fc[t * 4 + i];
    if (bf16) pea_mma_m16n8k16_bf16(c, a, b);
    else pea_mma_m16n8k16_f16(c, a, b);
    for (int i = 0; i < 4; i++) fd[t * 4 + i] = c[i];
}

/* ldmatrix: the warp stages 4 matrices of 8×8 16-bit values from m (matrix i row j at m[(8i + j)·8]) into
 * dynamic shared memory with a padded row stride of 16 elements, then lane l names row l % 8 of matrix
 * l / 8 (`skew` elements further on) and writes the four registers it gets to out[l][4]. */
__global__ void ldmatrix_kernel(const unsigned short *m, unsigned *out, int trans, int skew) {
    PEA_DYNAMIC_SHARED(unsigned short, s16);
    const int lane = (int)threadIdx.x;
    for (int e = lane; e < 256; e += 32) s16[(e / 8) * 16 + e % 8] = m[e];
    __syncwarp();
    unsigned r[4];
    if (trans) pea_ldmatrix_x4_trans(r, s16, lane * 16 + skew);
    else pea_ldmatrix_x4(r, s16, lane * 16 + skew);
    for (int i = 0; i < 4; i++) out[lane * 4 + i] = r[i];
}

/* cp.async, 64 threads: thread t copies the 16 bytes src[t] into shared chunk t (reading them only when
 * t % 3 != 0, else zero-fill) as its first group, and src[t + 64] into chunk t + 64 as its second. mode 0 waits
 * for both groups, mode 1 for none, mode 2 with wait<1> (the newer group may still be in flight). After a
 * barrier every thread writes shared chunks t and t + 64 to out. */
__global__ void cp_async_kernel(const uint4 *src, uint4 *out, int mode) {
    PEA_DYNAMIC_SHARED(uint4, s128);
    const int t = (int)threadIdx.x;
    pea_cp_async16(s128, t, src + t, t % 3 ? 16 : 0);
    pea_cp_async_commit();
    pea_cp_async16(s128, t + 64, src + t + 64, 16);
    pea_cp_async_commit();
    if (mode == 0) pea_cp_async_wait<0>();
    if (mode == 2) pea_cp_async_wait<1>();
    __syncthreads();
    out[t] = s128[t];
    out[t + 64] = s128[t + 64];
}

/* ---------------------------------------------------------------------------------------------------- */
/* Tests                                                                                                 */

static void test_indices() {
    dim3 grid(3, 2, 2), block(4, 3, 2);
    int nb = 12, nt = 24;
    unsigned *d = device_alloc<unsigned>(nb * nt);
    PEA_LAUNCH(indices_kernel, grid, block, 0, 0, d);
    CUDA_OK(cudaGetLastError());
    std::vector<unsigned> h = to_host(d, nb * nt);
    int bad = 0;
    for (unsigned bz = 0; bz < 2; bz++)
        for (unsigned by = 0; by < 2; by++)
            for (unsigned bx = 0; bx < 3; bx++)
                for (unsigned tz = 0; tz < 2; tz++)
                    for (unsigned ty = 0; ty < 3; ty++)
                        for (unsigned tx = 0; tx < 4; tx++) {
                            unsigned b = bx + 3 * (by + 2 * bz), t = tx + 4 * (ty + 3 * tz);
                            unsigned want = (tx << 24) | (ty << 16) | (tz << 8) | (bx << 4) | (by << 2) | bz;
                            bad += h[b * nt + t] != want;
                        }
    CHECK(bad == 0, "threadIdx/blockIdx/blockDim/gridDim: %d of %d threads wrong", bad, nb * nt);
    say("ok   built-in indices for grid (3,2,2) × block (4,3,2)");
    cudaFree(d);
}

/* pea_emu_set_skip_kernels(1) (PEA_EMU_SKIP_KERNELS=1): launches are checked, not run; 0 runs them again. */
static void test_skip_kernels() {
    unsigned *d = device_alloc<unsigned>(24);
    CUDA_OK(cudaMemset(d, 0, 24 * sizeof(unsigned)));
    pea_emu_set_skip_kernels(1);
    CHECK(pea_emu_skipping_kernels() == 1, "skipping reported");
    PEA_LAUNCH(indices_kernel, dim3(1), dim3(4, 3, 2), 0, 0, d);
    CUDA_OK(cudaGetLastError());
    std::vector<unsigned> h = to_host(d, 24);
    CHECK(std::count(h.begin(), h.end(), 0u) == 24, "a skipped kernel wrote to its output");
    PEA_LAUNCH(indices_kernel, dim3(0), dim3(4), 0, 0, d);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "a skipped launch is still checked (empty grid)");
    pea_emu_set_skip_kernels(0);
    PEA_LAUNCH(indices_kernel, dim3(1), dim3(4, 3, 2), 0, 0, d);
    CUDA_OK(cudaGetLastError());
    h = to_host(d, 24);
    CHECK(h[1] == 1u << 24, "the kernel runs again once skipping is off (thread 1 wrote %#x)", h[1]);
    say("ok   skipped kernels: checked, not run");
    cudaFree(d);
}

static void test_params_and_shared() {
    int *d = device_alloc<int>(128);
    PEA_LAUNCH(param_copy_kernel, 1, 128, 0, 0, 1000, d);
    std::vector<int> h = to_host(d, 128);
    int bad = 0;
    for (int t = 0; t < 128; t++) bad += h[t] != 1000 + t;
    CHECK(bad == 0, "kernel arguments are per thread: %d wrong", bad);
    cudaFree(d);

    pea_emu_set_threads(4); /* more CPU threads than cores: blocks interleave */
    int nb = 300;
    int *o = device_alloc<int>(nb * 64);
    PEA_LAUNCH(shared_per_block_kernel, nb, 64, 0, 0, o);
    CUDA_OK(cudaGetLastError());
    h = to_host(o, nb * 64);
    bad = 0;
    for (int b = 0; b < nb; b++)
        for (int t = 0; t < 64; t++) bad += h[b * 64 + t] != b * 1000 + 63 - t;
    CHECK(bad == 0, "static shared memory is per block (%d blocks on 4 CPU threads): %d wrong", nb, bad);
    pea_emu_set_threads(0);
    cudaFree(o);
    say("ok   kernel arguments per thread; static __shared__ per block over %d blocks on 4 CPU threads", nb);

    unsigned *p = device_alloc<unsigned>(3);
    PEA_LAUNCH(poison_kernel, 1, 32, 64, 0, p);
    std::vector<unsigned> ph = to_host(p, 3);
    CHECK(ph[0] == 0xffffffffu && ph[1] == 0xffffffffu && ph[2] == 31, "poison: %08x %08x %u", ph[0], ph[1], ph[2]);
    say("ok   unwritten shared memory reads as the poison 0xffffffff (a NaN as f32)");
    cudaFree(p);

    int *bp = device_alloc<int>(5);
    PEA_LAUNCH(barrier_pred_kernel, 1, 100, 0, 0, bp);
    std::vector<int> bh = to_host(bp, 5);
    CHECK(bh[0] == 34 && bh[1] == 0 && bh[2] == 1 && bh[3] == 1 && bh[4] == 0,
          "__syncthreads_count/and/or: %d %d %d %d %d", bh[0], bh[1], bh[2], bh[3], bh[4]);
    say("ok   __syncthreads_count/_and/_or");
    cudaFree(bp);
}

/* The Programming Guide's rules, lane by lane, for a warp whose lane t holds 3t + 1. */
static int shuffle_expected(int op, int lane, int arg, int width) {
    int group = lane / width * width, pos = lane % width, src = lane;
    switch (op) {
    case OP_IDX: src = group + (arg * lane + 3) % width; break;             /* srcLane modulo width */
    case OP_UP: src = pos >= arg ? lane - arg : lane; break;                /* below the group: unchanged */
    case OP_DOWN: src = pos + arg < width ? lane + arg : lane; break;       /* past the group: unchanged */
    case OP_XOR: src = (lane ^ arg) / width > lane / width ? lane : lane ^ arg; break; /* later groups: own */
    }
    return 3 * src + 1;
}

static void test_shuffles() {
    int *d = device_alloc<int>(64);
    const char *names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
    const int args[][3] = {{OP_IDX, 5, 32}, {OP_IDX, 7, 8},  {OP_IDX, 1, 1},  {OP_UP, 3, 32},  {OP_UP, 1, 16},
                           {OP_UP, 5, 4},   {OP_DOWN, 5, 32}, {OP_DOWN, 2, 8}, {OP_DOWN, 16, 16}, {OP_XOR, 1, 32},
                           {OP_XOR, 6, 32}, {OP_XOR, 17, 32}, {OP_XOR, 9, 8},  {OP_XOR, 20, 16}};
    int cases = 0;
    for (auto &a : args) {
        PEA_LAUNCH(shuffle_kernel, 1, 64, 0, 0, d, a[0], a[1], a[2]);
        CUDA_OK(cudaGetLastError());
        std::vector<int> h = to_host(d, 64);
        int bad = 0;
        for (int t = 0; t < 64; t++) {
            int want = shuffle_expected(a[0], t % 32, a[1], a[2]) + 3 * (t / 32 * 32);
            bad += h[t] != want;
        }
        CHECK(bad == 0, "%s(arg %d, width %d): %d lanes wrong", names[a[0]], a[1], a[2], bad);
        cases++;
    }
    cudaFree(d);

    double *dd = device_alloc<double>(32);
    __half *dh = device_alloc<__half>(32);
    PEA_LAUNCH(shuffle_types_kernel, 1, 32, 0, 0, dd, dh);
    std::vector<double> hd = to_host(dd, 32);
    std::vector<__half> hh = to_host(dh, 32);
    int bad = 0;
    for (int t = 0; t < 32; t++) {
        bad += hd[t] != 1e300 * ((t ^ 5) + 1);
        bad += __half2float(hh[t]) != (float)((t + 1) % 32);
    }
    CHECK(bad == 0, "64-bit and __half shuffles: %d wrong", bad);
    cudaFree(dd);
    cudaFree(dh);

    int *g = device_alloc<int>(32);
    PEA_LAUNCH(half_groups_kernel, 1, 32, 0, 0, g);
    CUDA_OK(cudaGetLastError());
    std::vector<int> gh = to_host(g, 32);
    bad = 0;
    for (int t = 0; t < 32; t++) bad += gh[t] != (t ^ 1) * 10;
    CHECK(bad == 0, "two half-warp groups with their own masks: %d wrong", bad);
    cudaFree(g);
    say("ok   shuffles: %d (kind, argument, width) cases, double and __half values, concurrent half-warp masks", cases);
}

static void test_votes() {
    unsigned *d = device_alloc<unsigned>(9);
    PEA_LAUNCH(vote_kernel, 1, 32, 0, 0, d);
    CUDA_OK(cudaGetLastError());
    std::vector<unsigned> h = to_host(d, 9);
    unsigned ballot = 0;
    for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
    CHECK(h[0] == ballot, "__ballot_sync = %08x, expected %08x", h[0], ballot);
    CHECK(h[1] == 1 && h[2] == 0 && h[3] == 1 && h[4] == 0, "__any/__all: %u %u %u %u", h[1], h[2], h[3], h[4]);
    CHECK(h[5] == 496 && (int)h[6] == 5 - 31 && h[7] == 62 && h[8] == FULL, "__reduce_*: %u %d %u %08x", h[5],
          (int)h[6], h[7], h[8]);
    cudaFree(d);

    unsigned *e = device_alloc<unsigned>(3);
    PEA_LAUNCH(exited_lanes_kernel, 1, 32, 0, 0, e);
    CUDA_OK(cudaGetLastError());
    std::vector<unsigned> eh = to_host(e, 3);
    CHECK(eh[0] == 0x000fffffu && eh[1] == 0x000fffffu, "exited lanes: activemask %08x ballot %08x", eh[0], eh[1]);
    CHECK(std::isnan(__uint_as_float(eh[2])), "a shuffle from an exited lane reads %08x, not the poison", eh[2]);
    cudaFree(e);
    say("ok   __ballot/__any/__all/__reduce_*_sync; exited lanes excused, reading one gives NaN");

    int *m = device_alloc<int>(32);
    PEA_LAUNCH(mixed_intrinsics_kernel, 1, 32, 0, 0, m);
    cudaError_t err = cudaGetLastError();
    std::string msg = pea_emu_last_message();
    CHECK(err == cudaErrorLaunchFailure && msg.find("different intrinsics") != std::string::npos &&
              msg.find("mixed_intrinsics_kernel") != std::string::npos,
          "lanes of one mask in different intrinsics: %s: %s", cudaGetErrorName(err), msg.c_str());
    cudaDeviceSynchronize(); /* returns the kernel's failure once more, */
    cudaGetLastError();      /* and this clears it */
    cudaFree(m);
    say("ok   lanes of one mask calling different intrinsics → %s", cudaGetErrorName(err));
}

static void test_atomics() {
    pea_emu_set_threads(4);
    int nb = 64, nt = 256, n = nb * nt;
    int *count = device_alloc<int>(1), *exch = device_alloc<int>(1);
    float *fsum = device_alloc<float>(1);
    unsigned *umax = device_alloc<unsigned>(1), *wrap = device_alloc<unsigned>(1);
    unsigned long long *cas = device_alloc<unsigned long long>(1);
    CUDA_OK(cudaMemset(count, 0, 4));
    CUDA_OK(cudaMemset(exch, 0xff, 4));
    CUDA_OK(cudaMemset(fsum, 0, 4));
    CUDA_OK(cudaMemset(umax, 0, 4));
    CUDA_OK(cudaMemset(wrap, 0, 4));
    CUDA_OK(cudaMemset(cas, 0, 8));
    PEA_LAUNCH(atomics_kernel, nb, nt, 0, 0, count, fsum, umax, cas, exch, wrap);
    CUDA_OK(cudaGetLastError());
    unsigned want_max = 0;
    for (unsigned g = 0; g < (unsigned)n; g++) want_max = std::max(want_max, g * 7u % 1000003u);
    int c = to_host(count, 1)[0], x = to_host(exch, 1)[0];
    float f = to_host(fsum, 1)[0];
    unsigned m = to_host(umax, 1)[0], w = to_host(wrap, 1)[0];
    unsigned long long cc = to_host(cas, 1)[0];
    CHECK(c == n && f == 0.5f * n && m == want_max && cc == (unsigned long long)n && x >= 0 && x < n && w == (unsigned)(n % 10),
          "atomics: count %d, float sum %g, max %u (want %u), CAS count %llu, exch %d, inc-wrap %u", c, f, m, want_max,
          cc, x, w);
    say("ok   atomicAdd (int, float), atomicMax, atomicCAS loop, atomicExch, atomicInc: %d threads, 4 CPU threads", n);
    pea_emu_set_threads(0);
    cudaFree(count);
    cudaFree(exch);
    cudaFree(fsum);
    cudaFree(umax);
    cudaFree(wrap);
    cudaFree(cas);
}

static void expect_launch_error(const char *what, cudaError_t code, const char *needle) {
    cudaError_t e = cudaGetLastError();
    std::string msg = pea_emu_last_message();
    CHECK(e == code && msg.find(needle) != std::string::npos, "%s: %s (%s), expected %s with \"%s\"", what,
          cudaGetErrorName(e), msg.c_str(), cudaGetErrorName(code), needle);
    cudaDeviceSynchronize();
    cudaGetLastError();
    if (e == code) say("ok   %s → %s", what, cudaGetErrorName(e));
}

/* The m16n8k16 MMAs against a plain matrix product. The fragments are packed here from the PTX ISA's
 * layout, stated per register: with g = lane / 4, t = lane % 4, A register r holds A[g + 8·(r % 2)][2t +
 * 8·(r / 2) + {0, 1}], B register r holds B[2t + 8r + {0, 1}][g], c[i] is C[g + 8·(i / 2)][2t + i % 2]; the
 * lower column (row for B) in the low 16 bits. Random values everywhere, so a misplaced element fails. */
static void test_mma() {
    const int blocks = 2, warps_per_block = 2, warps = blocks * warps_per_block;
    for (int bf16 = 0; bf16 < 2; bf16++) {
        std::vector<unsigned> fa(warps * 32 * 4), fb(warps * 32 * 2);
        std::vector<float> fc(warps * 32 * 4), want(warps * 32 * 4);
        auto bits = [&](float v, float *rounded) -> unsigned {
            unsigned short h;
            if (bf16) {
                __nv_bfloat16 x = __float2bfloat16_rn(v);
                h = __bfloat16_as_ushort(x);
                *rounded = __bfloat162float(x);
            } else {
                __half x = __float2half_rn(v);
                h = __half_as_ushort(x);
                *rounded = __half2float(x);
            }
            return h;
        };
        for (int w = 0; w < warps; w++) {
            std::vector<float> A = random_vector(16 * 16, 100 + w + 10 * bf16), B = random_vector(16 * 8, 200 + w),
                               C = random_vector(16 * 8, 300 + w);
            for (int i = 0; i < 16 * 16; i++) A[i] *= 4.0f;
            for (int lane = 0; lane < 32; lane++) {
                const int g = lane / 4, t = lane % 4, at = w * 32 + lane;
                for (int r = 0; r < 4; r++) {
                    const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
                    float lo, hi;
                    fa[at * 4 + r] = bits(A[row * 16 + col], &lo) | (bits(A[row * 16 + col + 1], &hi) << 16);
                    A[row * 16 + col] = lo;
                    A[row * 16 + col + 1] = hi;
                }
                for (int r = 0; r < 2; r++) {
                    const int k = 2 * t + 8 * r;
                    float lo, hi;
                    fb[at * 2 + r] = bits(B[k * 8 + g], &lo) | (bits(B[(k + 1) * 8 + g], &hi) << 16);
                    B[k * 8 + g] = lo;
                    B[(k + 1) * 8 + g] = hi;
                }
                for (int i = 0; i < 4; i++) fc[at * 4 + i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
            }
            for (int lane = 0; lane < 32; lane++) {
                const int g = lane / 4, t = lane % 4;
                for (int i = 0; i < 4; i++) {
                    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
                    double d = C[row * 8 + col];
                    for (int k = 0; k < 16; k++) d += (double)A[row * 16 + k] * B[k * 8 + col];
                    want[(w * 32 + lane) * 4 + i] = (float)d;
                }
            }
        }
        unsigned *da = to_device(fa), *db = to_device(fb);
        float *dc = to_device(fc), *dd = device_alloc<float>(fc.size());
        PEA_LAUNCH(mma_kernel, blocks, 32 * warps_per_block, 0, 0, da, db, dc, dd, bf16, -1);
        CUDA_OK(cudaGetLastError());
        std::vector<float> got = to_host(dd, fc.size());
        int bad = 0;
        double maxd = 0;
        for (size_t i = 0; i < got.size(); i++) {
            double d = fabs((double)got[i] - want[i]);
            maxd = d > maxd ? d : maxd;
            bad += !(d <= 1e-6 * (1.0 + fabs(want[i])));
        }
        CHECK(bad == 0, "mma m16n8k16 %s: %d of %zu outputs differ from A·B + C (max |d| %g)", bf16 ? "bf16" : "f16",
              bad, got.size(), maxd);

        /* A lane that exited cannot take part: the MMA is an error, not garbage. */
        PEA_LAUNCH(mma_kernel, blocks, 32 * warps_per_block, 0, 0, da, db, dc, dd, bf16, 37);
        expect_launch_error("mma.sync with an exited lane", cudaErrorLaunchFailure, "needs all 32 lanes");
        /* A block that ends mid-warp (48 threads): the second warp is partial. */
        PEA_LAUNCH(mma_kernel, 1, 48, 0, 0, da, db, dc, dd, bf16, -1);
        expect_launch_error("mma.sync in a partial warp", cudaErrorLaunchFailure, "needs all 32 lanes");
        cudaFree(da);
        cudaFree(db);
        cudaFree(dc);
        cudaFree(dd);
    }
    say("ok   mma.sync m16n8k16 f16/bf16 (f32 accumulate) against A·B + C, 4 warps; exited lane, partial warp");
}

/* ldmatrix against the PTX ISA's statement: lane l (g = l / 4, t = l % 4) holds in register i elements
 * (g, 2t) and (g, 2t+1) of matrix i, low half first; with .trans elements (2t, g) and (2t+1, g). */
static void test_ldmatrix() {
    std::vector<unsigned short> m(256);
    for (int e = 0; e < 256; e++) m[e] = (unsigned short)(0x1000 + 37 * e);
    unsigned short *dm = to_device(m);
    unsigned *dout = device_alloc<unsigned>(128);
    for (int trans = 0; trans < 2; trans++) {
        PEA_LAUNCH(ldmatrix_kernel, 1, 32, 32 * 16 * 2, 0, dm, dout, trans, 0);
        CUDA_OK(cudaGetLastError());
        std::vector<unsigned> got = to_host(dout, 128);
        int bad = 0;
        for (int lane = 0; lane < 32; lane++) {
            const int g = lane / 4, t = lane % 4;
            for (int i = 0; i < 4; i++) {
                auto at = [&](int row, int col) { return (unsigned)m[(8 * i + row) * 8 + col]; };
                const unsigned want = trans ? at(2 * t, g) | (at(2 * t + 1, g) << 16)
                                            : at(g, 2 * t) | (at(g, 2 * t + 1) << 16);
                bad += got[lane * 4 + i] != want;
            }
        }
        CHECK(bad == 0, "ldmatrix.x4%s: %d of 128 registers differ from the PTX layout", trans ? ".trans" : "", bad);
    }
    /* A row address that is not 16-byte aligned is an error. */
    PEA_LAUNCH(ldmatrix_kernel, 1, 32, 32 * 16 * 2 + 64, 0, dm, dout, 0, 4);
    expect_launch_error("ldmatrix row not 16-byte aligned", cudaErrorLaunchFailure, "16-byte aligned");
    cudaFree(dm);
    cudaFree(dout);
    say("ok   ldmatrix.x4 and .x4.trans against the PTX fragment layout; a misaligned row is an error");
}

/* cp.async: the bytes arrive (zero-filled where src-size is 0) once a wait covers their group, and not before:
 * without a wait the shared memory still holds the block's poison (0xFF bytes). */
static void test_cp_async() {
    std::vector<unsigned> src(128 * 4);
    for (size_t i = 0; i < src.size(); i++) src[i] = 0x01020304u * (unsigned)(i + 1);
    uint4 *dsrc = (uint4 *)to_device(src);
    uint4 *dout = device_alloc<uint4>(128);
    for (int mode = 0; mode < 3; mode++) {
        PEA_LAUNCH(cp_async_kernel, 1, 64, 128 * 16, 0, dsrc, dout, mode);
        CUDA_OK(cudaGetLastError());
        std::vector<unsigned> got(128 * 4);
        CUDA_OK(cudaMemcpy(got.data(), dout, got.size() * 4, cudaMemcpyDeviceToHost));
        int bad = 0;
        for (int chunk = 0; chunk < 128; chunk++) {
            const bool arrived = mode == 0 || (mode == 2 && chunk < 64);
            for (int k = 0; k < 4; k++) {
                unsigned want = 0xffffffffu;
                if (arrived) want = (chunk < 64 && chunk % 3 == 0) ? 0u : src[chunk * 4 + k];
                bad += got[chunk * 4 + k] != want;
            }
        }
        CHECK(bad == 0, "cp.async mode %d: %d of 512 words differ", mode, bad);
    }
    cudaFree(dsrc);
    cudaFree(dout);
    say("ok   cp.async: zero-fill, wait_group 0 / 1, and no bytes before a wait");
}

static void test_limits() {
    int *d = device_alloc<int>(2048);
    PEA_LAUNCH(param_copy_kernel, 1, 1025, 0, 0, 1, d);
    expect_launch_error("block of 1025 threads", cudaErrorInvalidConfiguration, "1025 threads");
    PEA_LAUNCH(param_copy_kernel, 1, dim3(1, 1, 65), 0, 0, 1, d);
    expect_launch_error("block z of 65", cudaErrorInvalidConfiguration, "z ≤ 64");
    PEA_LAUNCH(param_copy_kernel, dim3(1, 65536), 32, 0, 0, 1, d);
    expect_launch_error("grid y of 65536", cudaErrorInvalidConfiguration, "grid");
    PEA_LAUNCH(param_copy_kernel, 0, 32, 0, 0, 1, d);
    expect_launch_error("empty grid", cudaErrorInvalidConfiguration, "grid");
    PEA_LAUNCH(param_copy_kernel, 1, 32, 48 * 1024 + 4, 0, 1, d);
    expect_launch_error("48 KB + 4 bytes of dynamic shared memory", cudaErrorInvalidValue, "49156 bytes");
    PEA_LAUNCH(param_copy_kernel, 1, 32, 48 * 1024, 0, 1, d);
    CUDA_OK(cudaGetLastError());
    CHECK(cudaFuncSetAttribute(param_copy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 232449) ==
              cudaErrorInvalidValue,
          "cudaFuncSetAttribute above 227 KB must fail");
    cudaGetLastError();
    CUDA_OK(cudaFuncSetAttribute(param_copy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100000));
    PEA_LAUNCH(param_copy_kernel, 1, 32, 100000, 0, 1, d);
    CUDA_OK(cudaGetLastError());
    PEA_LAUNCH(param_copy_kernel, 1, 32, 100001, 0, 1, d);
    expect_launch_error("100001 bytes after opting in to 100000", cudaErrorInvalidValue, "100001 bytes");
    float *f = device_alloc<float>(1);
    PEA_LAUNCH(big_static_shared_kernel, 1, 32, 0, 0, f);
    expect_launch_error("52 KB of static shared memory", cudaErrorInvalidValue, "'big'");
    cudaStream_t s;
    CUDA_OK(cudaStreamCreate(&s));
    CUDA_OK(cudaStreamDestroy(s));
    PEA_LAUNCH(param_copy_kernel, 1, 32, 0, s, 1, d);
    expect_launch_error("a launch on a destroyed stream", cudaErrorInvalidResourceHandle, "invalid stream");

    std::vector<float> host(64);
    PEA_LAUNCH(global_oob_kernel, 1, 32, 0, 0, host.data(), 0);
    expect_launch_error("a host pointer passed to a kernel", cudaErrorIllegalAddress, "argument 1");
    float *freed = device_alloc<float>(64);
    cudaFree(freed);
    PEA_LAUNCH(global_oob_kernel, 1, 32, 0, 0, freed, 0);
    expect_launch_error("a freed device pointer passed to a kernel", cudaErrorIllegalAddress, "freed");
    float *pinned = nullptr;
    CUDA_OK(cudaMallocHost(&pinned, 64 * sizeof(float)));
    PEA_LAUNCH(global_oob_kernel, 1, 32, 0, 0, pinned, 0);
    CUDA_OK(cudaGetLastError());
    CHECK(pinned[31] == 1.0f, "a kernel writing pinned host memory");
    CUDA_OK(cudaFreeHost(pinned));

    float *v = device_alloc<float>(3);
    PEA_LAUNCH(dynamic_views_kernel, 1, 32, 10 * sizeof(float), 0, v, 10, 0);
    CUDA_OK(cudaGetLastError());
    std::vector<float> vh = to_host(v, 2);
    CHECK(vh[0] == 2.0f && vh[1] == 2.0f, "dynamic shared memory aliasing through two types: %g %g", vh[0], vh[1]);
    PEA_LAUNCH(dynamic_views_kernel, 1, 32, 10 * sizeof(float), 0, v, 10, 1);
    expect_launch_error("dynamic shared memory one past the end", cudaErrorIllegalAddress, "element 10");
    cudaFree(v);
    cudaFree(f);
    cudaFree(d);
}

/* Run `body` in a child process; it must die of SIGABRT with `needle` on stderr. */
template <class F>
static void expect_crash(const char *what, const char *needle, F body) {
    int fds[2];
    if (pipe(fds) != 0) return;
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        pea_emu_set_threads(1); /* the pool's threads do not survive fork */
        body();
        _exit(0);
    }
    close(fds[1]);
    std::string err;
    char buf[512];
    ssize_t r;
    while ((r = read(fds[0], buf, sizeof buf)) > 0) err.append(buf, (size_t)r);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    bool crashed = WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
    CHECK(crashed && err.find(needle) != std::string::npos, "%s: status %d, stderr: %s", what, status, err.c_str());
    if (crashed) say("ok   %s → aborted:\n       %s", what, err.substr(0, err.find('\n')).c_str());
}

static void test_crashes() {
    expect_crash("a kernel writing past the end of a cudaMalloc buffer", "global_oob_kernel", [] {
        float *x = nullptr;
        cudaMalloc(&x, 64 * sizeof(float));
        PEA_LAUNCH(global_oob_kernel, 1, 32, 0, 0, x, 64);
    });
    expect_crash("a CUDA thread overflowing its fiber stack", "fiber stack", [] {
        int *o = nullptr;
        cudaMalloc(&o, 4);
        PEA_LAUNCH(stack_overflow_kernel, 1, 2, 0, 0, o);
    });
}

static void test_runtime() {
    int n = 1000;
    std::vector<float> h = random_vector(n, 11), back(n, 0.0f);
    float *a = device_alloc<float>(n), *b = device_alloc<float>(n);
    CUDA_OK(cudaMemcpy(a, h.data(), n * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(b, a, n * 4, cudaMemcpyDeviceToDevice));
    CUDA_OK(cudaMemcpy(back.data(), b, n * 4, cudaMemcpyDefault));
    CHECK(back == h, "H2D, D2D, D2H (Default) round trip");
    cudaStream_t s;
    CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CUDA_OK(cudaMemsetAsync(b, 0, n * 4, s));
    CUDA_OK(cudaMemcpyAsync(back.data(), b, n * 4, cudaMemcpyDeviceToHost, s));
    CUDA_OK(cudaStreamSynchronize(s));
    CHECK(back[0] == 0.0f && back[n - 1] == 0.0f, "memset + async copy");
    /* 2-D copy: a 3×4 block out of a pitched host array */
    std::vector<float> src(5 * 8);
    for (int i = 0; i < 40; i++) src[i] = (float)i;
    CUDA_OK(cudaMemcpy2D(a, 4 * sizeof(float), src.data(), 8 * sizeof(float), 4 * sizeof(float), 3,
                         cudaMemcpyHostToDevice));
    std::vector<float> got = to_host(a, 12);
    CHECK(got[0] == 0 && got[3] == 3 && got[4] == 8 && got[11] == 19, "cudaMemcpy2D");

    pea_emu_set_quiet(1);
    CHECK(cudaMemcpy(a, h.data(), n * 4, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue,
          "a copy whose kind contradicts its pointers must fail");
    CHECK(cudaMemcpy(a + 1, h.data(), n * 4, cudaMemcpyHostToDevice) == cudaErrorInvalidValue &&
              std::string(pea_emu_last_message()).find("run past its end") != std::string::npos,
          "a copy past the end of an allocation must fail: %s", pea_emu_last_message());
    CHECK(cudaMemcpy(back.data(), h.data(), 4, (cudaMemcpyKind)7) == cudaErrorInvalidMemcpyDirection, "bad kind");
    CHECK(cudaMemset(h.data(), 0, 4) == cudaErrorInvalidValue, "cudaMemset on host memory must fail");
    CHECK(cudaFree(h.data()) == cudaErrorInvalidValue, "cudaFree of a host pointer must fail");
    CHECK(cudaStreamDestroy(s) == cudaSuccess && cudaStreamDestroy(s) == cudaErrorInvalidResourceHandle,
          "destroying a stream twice");
    CHECK(cudaGetLastError() == cudaErrorInvalidResourceHandle && cudaGetLastError() == cudaSuccess,
          "cudaGetLastError returns the last error once");
    say("ok   copies (all kinds, async, 2-D), memset; wrong kind, overrun, bad kind, host memset, bad free rejected");

    cudaEvent_t e0, e1, e2;
    CUDA_OK(cudaEventCreate(&e0));
    CUDA_OK(cudaEventCreate(&e1));
    CUDA_OK(cudaEventCreateWithFlags(&e2, cudaEventDisableTiming));
    CUDA_OK(cudaEventRecord(e0, 0));
    int *d = device_alloc<int>(256);
    PEA_LAUNCH(param_copy_kernel, 1, 256, 0, 0, 1, d);
    CUDA_OK(cudaEventRecord(e1, 0));
    CUDA_OK(cudaEventSynchronize(e1));
    float ms = -1;
    CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
    CHECK(ms >= 0.0f, "elapsed time %g", ms);
    CUDA_OK(cudaEventRecord(e2, 0));
    CHECK(cudaEventElapsedTime(&ms, e0, e2) == cudaErrorInvalidResourceHandle, "timing a DisableTiming event");
    cudaGetLastError();
    CUDA_OK(cudaEventDestroy(e0));
    CUDA_OK(cudaEventDestroy(e1));
    CUDA_OK(cudaEventDestroy(e2));
    say("ok   events: record, synchronize, elapsed time (%.3f ms for a launch)", ms);

    int count = 0;
    cudaDeviceProp p;
    CUDA_OK(cudaGetDeviceCount(&count));
    CUDA_OK(cudaGetDeviceProperties(&p, 0));
    CHECK(count == 1 && !strcmp(p.name, "Pea SIMT emulator") && p.warpSize == 32 && p.maxThreadsPerBlock == 1024 &&
              p.sharedMemPerBlock == 48 * 1024 && p.sharedMemPerBlockOptin == 232448 && p.multiProcessorCount > 0,
          "device properties");
    int v = 0;
    CUDA_OK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
    CHECK(v == 232448, "cudaDevAttrMaxSharedMemoryPerBlockOptin = %d", v);
    CHECK(cudaGetDeviceProperties(&p, 1) == cudaErrorInvalidDevice, "device 1 does not exist");
    cudaGetLastError();
    CHECK(!strcmp(cudaGetErrorString(cudaErrorInvalidValue), "invalid argument") &&
              !strcmp(cudaGetErrorName(cudaErrorIllegalAddress), "cudaErrorIllegalAddress"),
          "error strings");
    say("ok   device '%s': %d SMs, warp %d, %zu B shared per block (%zu opt-in)", p.name, p.multiProcessorCount,
        p.warpSize, p.sharedMemPerBlock, p.sharedMemPerBlockOptin);
    cudaFree(a);
    cudaFree(b);
    cudaFree(d);
}

/* y[i] = a·x[i] + y[i]; a thread per element. */
__global__ void axpy_kernel(float a, const float *x, float *y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}

/* The work the graph tests capture: upload x from pinned memory, y = 0, y += a·x, z = y, z += 3·x. */
static void graph_work(cudaStream_t s, const float *pinned, float *x, float *y, float *z, float a, int n) {
    CUDA_OK(cudaMemcpyAsync(x, pinned, n * 4, cudaMemcpyHostToDevice, s));
    CUDA_OK(cudaMemsetAsync(y, 0, n * 4, s));
    PEA_LAUNCH(axpy_kernel, (n + 63) / 64, 64, 0, s, a, x, y, n);
    CUDA_OK(cudaMemcpyAsync(z, y, n * 4, cudaMemcpyDeviceToDevice, s));
    PEA_LAUNCH(axpy_kernel, (n + 63) / 64, 64, 0, s, 3.0f, x, z, n);
}

static bool message_has(const char *needle) { return strstr(pea_emu_last_message(), needle) != nullptr; }

static void test_graphs() {
    const int n = 200; /* a partial last block */
    cudaStream_t s;
    CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    float *pinned = nullptr;
    CUDA_OK(cudaMallocHost(&pinned, n * 4));
    std::vector<float> in = random_vector(n, 31);
    memcpy(pinned, in.data(), n * 4);
    float *x = device_alloc<float>(n), *y = device_alloc<float>(n), *z = device_alloc<float>(n);
    float *ex = device_alloc<float>(n), *ey = device_alloc<float>(n), *ez = device_alloc<float>(n);
    CUDA_OK(cudaMemset(z, 0x7f, n * 4));

    /* Captured work is recorded, not run; the scalar is taken by value at capture. */
    float a = 2.0f;
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    CUDA_OK(cudaStreamIsCapturing(s, &st));
    CHECK(st == cudaStreamCaptureStatusActive, "capturing: status %d", (int)st);
    graph_work(s, pinned, x, y, z, a, n);
    a = -100.0f;
    cudaGraph_t graph = nullptr;
    CUDA_OK(cudaStreamEndCapture(s, &graph));
    CUDA_OK(cudaStreamIsCapturing(s, &st));
    CHECK(st == cudaStreamCaptureStatusNone && graph, "capture ended with a graph");
    std::vector<float> untouched = to_host(z, n);
    CHECK(std::all_of(untouched.begin(), untouched.end(), [&](float v) { return v == untouched[0]; }) &&
              untouched[0] != 0.0f,
          "capturing ran nothing: z keeps its 0x7f bytes (%g)", untouched[0]);
    cudaGraphExec_t exec = nullptr;
    CUDA_OK(cudaGraphInstantiateWithFlags(&exec, graph, 0));
    CUDA_OK(cudaGraphDestroy(graph)); /* the exec keeps what it needs */

    /* A replay equals the same work run eagerly, bit for bit, and both equal the plain loop. */
    CUDA_OK(cudaGraphLaunch(exec, s));
    graph_work(s, pinned, ex, ey, ez, 2.0f, n);
    CUDA_OK(cudaStreamSynchronize(s));
    std::vector<float> gy = to_host(y, n), gz = to_host(z, n), ey_h = to_host(ey, n), ez_h = to_host(ez, n);
    bool loop_ok = true;
    for (int i = 0; i < n; i++) {
        float yy = 2.0f * in[i] + 0.0f, zz = 3.0f * in[i] + yy;
        loop_ok = loop_ok && gy[i] == yy && gz[i] == zz;
    }
    CHECK(loop_ok, "replay equals the plain loop");
    CHECK(!memcmp(gy.data(), ey_h.data(), n * 4) && !memcmp(gz.data(), ez_h.data(), n * 4),
          "replay equals eager, bit for bit");

    /* A replay reads the buffers as they are then: new host input, new results. */
    for (int i = 0; i < n; i++) pinned[i] = (float)i;
    CUDA_OK(cudaGraphLaunch(exec, s));
    CUDA_OK(cudaStreamSynchronize(s));
    gz = to_host(z, n);
    bool replay_ok = true;
    for (int i = 0; i < n; i++) replay_ok = replay_ok && gz[i] == 5.0f * (float)i;
    CHECK(replay_ok, "a second replay sees the new input values (z[7] = %g, expected 35)", gz[7]);

    /* A host function and a 2-D copy are recorded too; a graph launched into a capture is part of the new graph. */
    static int host_calls = 0;
    host_calls = 0;
    cudaGraph_t outer_graph = nullptr;
    cudaGraphExec_t outer = nullptr;
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    CUDA_OK(cudaLaunchHostFunc(s, [](void *) { host_calls++; }, nullptr));
    CUDA_OK(cudaMemcpy2DAsync(ey, 8, x, 16, 8, 4, cudaMemcpyDeviceToDevice, s)); /* ey[2r, 2r+1] = x[4r, 4r+1] */
    CUDA_OK(cudaGraphLaunch(exec, s));
    CUDA_OK(cudaStreamEndCapture(s, &outer_graph));
    CHECK(host_calls == 0, "a captured host function does not run at capture");
    CUDA_OK(cudaGraphInstantiateWithFlags(&outer, outer_graph, 0));
    CUDA_OK(cudaGraphDestroy(outer_graph));
    for (int i = 0; i < n; i++) pinned[i] = 2.0f * (float)i;
    CUDA_OK(cudaGraphLaunch(outer, s));
    CUDA_OK(cudaGraphLaunch(outer, s));
    CUDA_OK(cudaStreamSynchronize(s));
    std::vector<float> ey8 = to_host(ey, 8);
    gz = to_host(z, n);
    CHECK(host_calls == 2, "the host function ran once per launch (%d)", host_calls);
    /* the copy reads x before the inner graph rewrites it: at the second launch x[i] = 2i from the first */
    CHECK(ey8[0] == 0.0f && ey8[1] == 2.0f && ey8[2] == 8.0f && ey8[3] == 10.0f && ey8[7] == 26.0f,
          "the captured 2-D copy (ey[2] = %g, expected 8)", ey8[2]);
    CHECK(gz[7] == 70.0f, "the inner graph ran inside the outer one (z[7] = %g, expected 70)", gz[7]);
    CUDA_OK(cudaGraphExecDestroy(outer));
    say("ok   stream capture: recorded not run, arguments by value; replay = eager = loop; replay sees new inputs; "
        "host functions, 2-D copies and graphs launched into a capture");

    /* Calls a GPU refuses during capture: an error naming the call, and the capture is invalidated. */
    struct Illegal {
        const char *what;
        cudaStreamCaptureMode mode;
        cudaError_t (*call)(cudaStream_t s, float *x);
    } illegal[] = {
        {"cudaMalloc", cudaStreamCaptureModeGlobal,
         [](cudaStream_t, float *) { void *p; return cudaMalloc(&p, 64); }},
        {"cudaMalloc", cudaStreamCaptureModeThreadLocal,
         [](cudaStream_t, float *) { void *p; return cudaMalloc(&p, 64); }},
        {"cudaFree", cudaStreamCaptureModeGlobal, [](cudaStream_t, float *x) { return cudaFree(x); }},
        {"cudaMemcpy", cudaStreamCaptureModeGlobal,
         [](cudaStream_t, float *x) { float h[4]; return cudaMemcpy(h, x, 16, cudaMemcpyDeviceToHost); }},
        {"cudaMemset", cudaStreamCaptureModeGlobal, [](cudaStream_t, float *x) { return cudaMemset(x, 0, 16); }},
        {"cudaStreamSynchronize", cudaStreamCaptureModeRelaxed,
         [](cudaStream_t s, float *) { return cudaStreamSynchronize(s); }},
        {"cudaStreamQuery", cudaStreamCaptureModeRelaxed, [](cudaStream_t s, float *) { return cudaStreamQuery(s); }},
        {"cudaDeviceSynchronize", cudaStreamCaptureModeRelaxed,
         [](cudaStream_t, float *) { return cudaDeviceSynchronize(); }},
    };
    for (const Illegal &c : illegal) {
        CUDA_OK(cudaStreamBeginCapture(s, c.mode));
        PEA_LAUNCH(axpy_kernel, 1, 64, 0, s, 1.0f, x, y, 64);
        cudaError_t e = c.call(s, x);
        CHECK(e == cudaErrorStreamCaptureUnsupported && message_has(c.what) && message_has("capture"),
              "%s during capture: %s, %s", c.what, cudaGetErrorName(e), pea_emu_last_message());
        cudaStreamIsCapturing(s, &st);
        CHECK(st == cudaStreamCaptureStatusInvalidated, "%s invalidates the capture (status %d)", c.what, (int)st);
        CHECK(cudaMemsetAsync(y, 0, 16, s) == cudaErrorStreamCaptureInvalidated && message_has(c.what),
              "work after %s is refused: %s", c.what, pea_emu_last_message());
        cudaGraph_t g = (cudaGraph_t)1;
        CHECK(cudaStreamEndCapture(s, &g) == cudaErrorStreamCaptureInvalidated && g == nullptr && message_has(c.what),
              "ending a capture %s invalidated: %s", c.what, pea_emu_last_message());
        cudaGetLastError();
    }
    /* Relaxed captures allow the unsafe calls; a ThreadLocal capture allows them on other threads. */
    float *p = nullptr;
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    CUDA_OK(cudaMalloc(&p, 64));
    CUDA_OK(cudaFree(p));
    CUDA_OK(cudaStreamEndCapture(s, &graph));
    CUDA_OK(cudaGraphDestroy(graph));
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    cudaError_t other = cudaErrorUnknown;
    std::thread([&] {
        other = cudaMalloc(&p, 64);
        if (other == cudaSuccess) other = cudaFree(p);
    }).join();
    CHECK(other == cudaSuccess, "cudaMalloc and cudaFree on another thread during a ThreadLocal capture: %s",
          cudaGetErrorName(other));
    /* a Relaxed thread may allocate during its own Global capture (as torch's allocator does) */
    CUDA_OK(cudaStreamEndCapture(s, &graph));
    CUDA_OK(cudaGraphDestroy(graph));
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    CUDA_OK(cudaThreadExchangeStreamCaptureMode(&mode));
    CHECK(mode == cudaStreamCaptureModeGlobal, "a thread's mode is Global by default (%d)", (int)mode);
    CUDA_OK(cudaMalloc(&p, 64));
    CUDA_OK(cudaThreadExchangeStreamCaptureMode(&mode));
    CHECK(mode == cudaStreamCaptureModeRelaxed, "the exchange returns the mode it replaces (%d)", (int)mode);
    CHECK(cudaFree(p) == cudaErrorStreamCaptureUnsupported, "back in Global mode, cudaFree is refused again");
    cudaGetLastError();
    CHECK(cudaStreamEndCapture(s, &graph) == cudaErrorStreamCaptureInvalidated, "and the capture is invalidated");
    cudaGetLastError();
    CUDA_OK(cudaFree(p));
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    /* an event recorded inside a capture cannot be waited for */
    cudaEvent_t ev;
    CUDA_OK(cudaEventCreate(&ev));
    CUDA_OK(cudaEventRecord(ev, s));
    CUDA_OK(cudaStreamEndCapture(s, &graph));
    CHECK(cudaEventSynchronize(ev) == cudaErrorCapturedEvent, "waiting for an event recorded during capture");
    CUDA_OK(cudaEventDestroy(ev));
    CUDA_OK(cudaGraphDestroy(graph));
    /* misuse of the capture calls themselves */
    CHECK(cudaStreamBeginCapture(0, cudaStreamCaptureModeGlobal) == cudaErrorStreamCaptureUnsupported,
          "the legacy stream cannot capture");
    CHECK(cudaStreamEndCapture(s, &graph) == cudaErrorIllegalState, "ending a capture that never began");
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal) == cudaErrorIllegalState, "beginning twice");
    CUDA_OK(cudaStreamEndCapture(s, &graph));
    CUDA_OK(cudaGraphDestroy(graph));
    CHECK(cudaGraphLaunch((cudaGraphExec_t)&graph, s) == cudaErrorInvalidResourceHandle, "launching a bad exec");
    cudaGetLastError();
    say("ok   illegal calls during capture (cudaMalloc, cudaFree, cudaMemcpy, cudaMemset, stream/device sync) → "
        "cudaErrorStreamCaptureUnsupported, capture invalidated; Relaxed / other-thread / thread-mode rules; captured events");

    CUDA_OK(cudaGraphExecDestroy(exec));
    CHECK(cudaGraphExecDestroy(exec) == cudaErrorInvalidResourceHandle, "destroying an exec twice");
    cudaGetLastError();
    CUDA_OK(cudaFreeHost(pinned));
    for (float *d : {x, y, z, ex, ey, ez}) cudaFree(d);
    CUDA_OK(cudaStreamDestroy(s));
}

int main() {
    check_start("emu simt", 300);
    pea_emu_set_quiet(1);
    for (int order = 0; order < 3; order++) {
        pea_emu_set_schedule(order, 99);
        test_indices();
        test_params_and_shared();
        test_shuffles();
        test_votes();
        test_atomics();
    }
    pea_emu_set_schedule(PEA_EMU_FORWARD, 0);
    test_mma();
    test_ldmatrix();
    test_cp_async();
    test_limits();
    test_runtime();
    test_graphs();
    test_skip_kernels();
    test_crashes();
    return check_summary("emu simt");
}
