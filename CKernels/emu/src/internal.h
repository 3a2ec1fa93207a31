/* internal.h — what the emulator's sources share (not seen by kernels). */
#ifndef PEA_EMU_INTERNAL_H
#define PEA_EMU_INTERNAL_H

#include "../cuda_emu.h"

#include <functional>
#include <string>

namespace pea_emu {

constexpr size_t kSharedDefault = 48 * 1024; /* dynamic shared memory without opting in */
constexpr size_t kSharedOptin = 232448;      /* 227 KB: sharedMemPerBlockOptin of the emulated device */
/* A small SM count: backends size grid-stride launches by it, and fewer, fuller blocks emulate faster. */
constexpr int kMultiProcessors = 16;

/* runtime.cpp */
void rt_api_error(cudaError_t e, const std::string &msg);    /* a failed call: last error + message */
void rt_kernel_error(cudaError_t e, const std::string &msg); /* a failed kernel: also the next sync call */
bool rt_stream_valid(cudaStream_t s);
/* A piece of stream work as a graph records it: run on the stream a graph is launched on. */
using CapturedOp = std::function<cudaError_t(cudaStream_t)>;
enum CaptureResult { CAPTURE_NONE, CAPTURE_RECORDED, CAPTURE_REFUSED };
/* Work `what` queued on stream s: CAPTURE_NONE when s does not capture (run it now); CAPTURE_RECORDED when s
 * captures and op was added to its graph; CAPTURE_REFUSED (error reported: cudaErrorStreamCaptureInvalidated)
 * when s's capture was invalidated by an earlier illegal call. */
CaptureResult rt_capture(cudaStream_t s, const char *what, CapturedOp op);
bool rt_stream_capturing(cudaStream_t s);
/* nullptr if a kernel may use p (device memory or one past it, pinned or registered host memory), else why not */
const char *rt_kernel_pointer_problem(const void *p);
size_t rt_func_max_dynamic_smem(const void *func);
bool rt_quiet();
std::string strprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* simt.cpp: fn(ctx, begin, end) over [0, n) in chunks of `grain`, on the emulator's CPU threads. */
void parallel_for(long long n, long long grain, void (*fn)(void *ctx, long long begin, long long end), void *ctx);
/* The kernel, block and thread running on this CPU thread, for a crash report ("" outside a kernel). */
std::string current_kernel_description();
bool fiber_guard_hit(uintptr_t addr);

} // namespace pea_emu

#endif
