/*
 * test_ops.cpp — every pea_cuda_* op of the CUDA backend against its ck_* CPU reference (CKernels/cpu), at
 * awkward shapes, in f32, f16 and bf16; the caching allocator; the staged uploads; the error paths.
 *
 * The library is loaded the way the Swift CUDABackend loads it: dlopen + dlsym by name, plain C calls
 * (pea_cuda.h is the whole contract). So the same program tests either build of the same sources:
 *
 *     test_ops ./libpea_cuda_emu.so              the SIMT emulator on the CPU (make cuda-test, in make test)
 *     test_ops .build-cuda/libpea_cuda.so        a real GPU (make gpu-check)
 *
 * It is built by the host C++ compiler alone (no CUDA headers) and linked with the CPU reference kernels.
 * Under the emulator (detected by its pea_emu_* entry points) it also checks the no-device path and reruns
 * the kernels that use block barriers under the reverse and random fiber orders.
 *
 * Tolerances (relative L2 error ‖got − ref‖ / ‖ref‖, the CPU result on the same inputs as reference):
 *   f32   1e-5: the two sides differ only in summation order (and the GPU's libm ulps) —
 *         typically 1e-7 … 1e-6. Bit-exact where nothing is computed: copies, conversions, embedding,
 *         upsampling.
 *   f16   3e-3, bf16 2e-2: the inputs are rounded to the storage type first and the CPU computes in f32
 *         on exactly those values; the GPU rounds its output once more (f16: 2^-11 relative per element,
 *         bf16: 2^-8), which is what the tolerance allows for (≈6× the expected error).
 *   TF32 GEMM 5e-3 (10-bit mantissa inputs). Group norm of data with a large mean (≈1000) in f32: 1e-4, since
 *   both sides round the mean to f32 (half an ulp of 1000 is 3e-5, which (x − mean)·rstd carries).
 *   timestep embedding in f32: 1e-4 (sin/cos of arguments up to 1000 amplify an ulp of exp).
 *
 * Backward ops (test_backward_*): the same tolerances against ck_*_backward_f32 on the same (rounded) inputs;
 * the norms' gradients recompute the statistics, so group norm backward of data with a large mean gets the
 * forward's 1e-4 in f32 for the same reason. Upsampling backward sums each 2×2 block in the CPU's order: exact
 * in f32.
 */
#include <dlfcn.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <string>
#include <vector>

#include "ckernels.h"
#include "pea_cuda.h"

/* ---------------------------------------------------------------------------------------------------- */
/* The library, through dlsym                                                                            */

/* Every function of pea_cuda.h's PEA_CUDA_FUNCTIONS list, resolved by name and counted: a call through
 * L.name(...) counts, and the run fails when a function on the list was never called (a new function needs a
 * test here). */
template <typename F> struct Counted;
template <typename R, typename... A> struct Counted<R (*)(A...)> {
    R (*fn)(A...) = nullptr;
    long calls = 0;
    R operator()(A... args) {
        calls++;
        return fn(args...);
    }
};

struct Api {
#define DECLARE(name) Counted<decltype(&::name)> name;
    PEA_CUDA_FUNCTIONS(DECLARE, DECLARE)
#undef DECLARE
    void (*emu_set_quiet)(int) = nullptr;
    void (*emu_set_schedule)(int, unsigned long long) = nullptr;
    long long (*emu_lt_heuristic_queries)(void) = nullptr; /* the emulator's cuBLASLt stand-in */
};
static Api L;
static pea_cuda_context *g_ctx = nullptr;
static bool g_emu = false;

/* ---------------------------------------------------------------------------------------------------- */
/* Checks                                                                                                */

static int g_checks = 0, g_failures = 0;
static const char *g_phase = "";

#define CHECK(cond, ...)                                                                               \
    do {                                                                                               \
        g_checks++;                                                                                    \
        if (!(cond)) {                                                                                 \
            g_failures++;                                                                              \
            fprintf(stderr, "FAIL %s:%d [%s]: %s: ", __FILE__, __LINE__, g_phase, #cond);              \
            fprintf(stderr, __VA_ARGS__);                                                              \
            fputc('\n', stderr);                                                                       \
        }                                                                                              \
    } while (0)

/* A call that must succeed. */
#define OK(call)                                                                                       \
    do {                                                                                               \
        int rc_ = (call);                                                                              \
        CHECK(rc_ == PEA_CUDA_OK, "%s returned %d: %s", #call, rc_, L.pea_cuda_last_error(g_ctx));     \
    } while (0)

static bool g_verbose = false;
static void say(const char *fmt, ...) {
    if (!g_verbose) return;
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Data                                                                                                  */

static unsigned long long g_seed = 12345;
static float urand() { /* [-1, 1) */
    g_seed = g_seed * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((g_seed >> 40) & 0xffffff) / (float)(1 << 23) - 1.0f;
}
static std::vector<float> rvec(size_t n, float scale = 1.0f, float offset = 0.0f) {
    std::vector<float> v(n);
    for (auto &x : v) x = offset + scale * urand();
    return v;
}

static const int kFloatTypes[] = {CK_F32, CK_F16, CK_BF16};
static const char *tname(int t) {
    switch (t) {
    case CK_F32: return "f32";
    case CK_F16: return "f16";
    case CK_BF16: return "bf16";
    case CK_I32: return "i32";
    case CK_I64: return "i64";
    }
    return "?";
}
static size_t tsize(int t) { return t == CK_F32 || t == CK_I32 ? 4 : t == CK_I64 ? 8 : 2; }
static double tol_for(int t) { return t == CK_F32 ? 1e-5 : t == CK_F16 ? 3e-3 : 2e-2; }

/* v rounded to storage type t and back (the values a t tensor holds). */
static std::vector<float> rounded(const std::vector<float> &v, int t) {
    if (t == CK_F32) return v;
    std::vector<uint16_t> bits(v.size());
    std::vector<float> out(v.size());
    ck_convert(v.data(), CK_F32, bits.data(), t, (int64_t)v.size());
    ck_convert(bits.data(), t, out.data(), CK_F32, (int64_t)v.size());
    return out;
}

/* A device buffer freed at scope exit. */
struct Dev {
    void *p = nullptr;
    size_t bytes = 0;
    Dev() = default;
    explicit Dev(size_t n) : bytes(n) { OK(L.pea_cuda_alloc(g_ctx, n ? n : 1, &p)); }
    Dev(const Dev &) = delete;
    Dev &operator=(const Dev &) = delete;
    Dev(Dev &&o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
    ~Dev() {
        if (p) L.pea_cuda_free(g_ctx, p);
    }
    template <class U = void>
    U *at(size_t byte_offset = 0) const { return (U *)((char *)p + byte_offset); }
};

/* Upload f32 values as storage type t. */
static Dev up(const std::vector<float> &v, int t) {
    Dev d(v.size() * tsize(t));
    std::vector<char> bytes(v.size() * tsize(t) + 1);
    ck_convert(v.data(), CK_F32, bytes.data(), t, (int64_t)v.size());
    OK(L.pea_cuda_upload(g_ctx, d.p, bytes.data(), v.size() * tsize(t)));
    return d;
}
static Dev up_raw(const void *src, size_t bytes) {
    Dev d(bytes);
    OK(L.pea_cuda_upload(g_ctx, d.p, src, bytes));
    return d;
}
/* Download n elements of storage type t as f32. */
static std::vector<float> down(const void *p, size_t n, int t) {
    std::vector<char> bytes(n * tsize(t) + 1);
    std::vector<float> out(n);
    OK(L.pea_cuda_download(g_ctx, bytes.data(), p, n * tsize(t)));
    ck_convert(bytes.data(), t, out.data(), CK_F32, (int64_t)n);
    return out;
}

/* Relative L2 error, with NaN/inf anywhere counting as a failure; also reports max |Δ|. */
static bool compare(const char *what, const std::vector<float> &got, const std::vector<float> &ref, double tol) {
    double num = 0, den = 0, maxd = 0;
    bool finite = got.size() == ref.size();
    for (size_t i = 0; i < ref.size() && i < got.size(); i++) {
        if (std::isnan(got[i]) != std::isnan(ref[i]) || std::isinf(got[i]) != std::isinf(ref[i])) finite = false;
        if (!std::isfinite(ref[i]) || !std::isfinite(got[i])) continue;
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
        maxd = std::max(maxd, fabs(d));
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    bool pass = finite && rel <= tol;
    CHECK(pass, "%s: rel-L2 %.3g (tol %.1g), max |d| %.3g%s, %zu vs %zu elements", what, rel, tol, maxd,
          finite ? "" : ", non-finite mismatch", got.size(), ref.size());
    say("  %-4s %-60s rel-L2 %.2e  max|d| %.2e", pass ? "ok" : "FAIL", what, rel, maxd);
    return pass;
}

static bool same_bytes(const char *what, const void *a, const void *b, size_t n) {
    bool pass = memcmp(a, b, n) == 0;
    CHECK(pass, "%s: bytes differ", what);
    say("  %-4s %-60s bit-exact", pass ? "ok" : "FAIL", what);
    return pass;
}

/* The call must fail with `code` and a message that starts with "<op>:". */
static void expect_error(const char *what, int rc, int code, const char *op) {
    const char *msg = L.pea_cuda_last_error(g_ctx);
    std::string prefix = std::string(op) + ":";
    CHECK(rc == code, "%s: returned %d, expected %d (%s)", what, rc, code, msg);
    CHECK(strncmp(msg, prefix.c_str(), prefix.size()) == 0, "%s: message \"%s\" does not name the op \"%s\"", what,
          msg, op);
    say("  ok   %-60s → %d \"%s\"", what, rc, msg);
}

static char g_name[512];
static const char *fmt(const char *f, ...) {
    va_list ap;
    va_start(ap, f);
    vsnprintf(g_name, sizeof g_name, f, ap);
    va_end(ap);
    return g_name;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Context, memory, copies                                                                               */

static void test_context() {
    g_phase = "context";
    CHECK(L.pea_cuda_abi_version() == PEA_CUDA_ABI_VERSION, "abi %d", L.pea_cuda_abi_version());
    char name[256] = {0};
    int major = -1, minor = -1;
    size_t total = 0;
    OK(L.pea_cuda_device_info(g_ctx, name, sizeof name, &major, &minor, &total));
    CHECK(name[0] && major >= 1 && total > 0, "device info %s %d.%d %zu", name, major, minor, total);
    printf("device: %s, compute capability %d.%d, %.1f GiB\n", name, major, minor, total / 1073741824.0);

    if (g_emu) { /* the emulator can pretend there is no device */
        L.emu_set_quiet(1);
        setenv("PEA_EMU_DEVICE_COUNT", "0", 1);
        pea_cuda_context *c = (pea_cuda_context *)1;
        char msg[256] = {0};
        int rc = L.pea_cuda_create(0, &c, msg, sizeof msg);
        unsetenv("PEA_EMU_DEVICE_COUNT");
        L.emu_set_quiet(0);
        CHECK(rc == PEA_CUDA_ERROR_NO_DEVICE && c == nullptr && strstr(msg, "no CUDA device"),
              "create without a device: rc %d, ctx %p, \"%s\"", rc, (void *)c, msg);
        say("  ok   create without a device → %d \"%s\"", rc, msg);
    }
    pea_cuda_context *c = (pea_cuda_context *)1;
    char msg[256] = {0};
    int rc = L.pea_cuda_create(1000, &c, msg, sizeof msg);
    CHECK(rc == PEA_CUDA_ERROR_NO_DEVICE && c == nullptr && msg[0], "create(1000): rc %d \"%s\"", rc, msg);
}

/* The device timer: events around a spin gate measure at least the spin on a GPU (clock64 at the device's
 * clock rate, which is its highest, so the spin lasts no less), and a positive time under the emulator (its
 * events read the host clock, its rdtsc clock64 ticks faster than the emulated 1 GHz); bad slots fail. */
static void test_timer() {
    g_phase = "timer";
    const double spin_us = 1000.0;
    OK(L.pea_cuda_timer_record(g_ctx, 0));
    OK(L.pea_cuda_spin(g_ctx, spin_us));
    OK(L.pea_cuda_timer_record(g_ctx, 1));
    float ms = -1.0f;
    OK(L.pea_cuda_timer_elapsed(g_ctx, 0, 1, &ms));
    if (g_emu)
        CHECK(ms > 0.0f && ms < 1e4f, "timer around a %g µs spin (emulator): %g ms", spin_us, ms);
    else
        CHECK(ms >= 0.9 * spin_us * 1e-3 && ms < 1e3f, "timer around a %g µs spin: %g ms", spin_us, ms);
    say("  ok   timer around a %g µs spin: %g ms", spin_us, ms);
    /* a sample as pea bench kernels takes one: gate, start, queued work, end */
    const size_t n = 4096;
    std::vector<float> x = rvec(n);
    Dev dx = up(x, CK_F32), dy(n * 4);
    OK(L.pea_cuda_spin(g_ctx, 50.0));
    OK(L.pea_cuda_timer_record(g_ctx, 2));
    for (int i = 0; i < 3; i++) OK(L.pea_cuda_activation(g_ctx, CK_F32, PEA_ACT_SILU, dx.p, dy.p, (int64_t)n));
    OK(L.pea_cuda_timer_record(g_ctx, 3));
    ms = -1.0f;
    OK(L.pea_cuda_timer_elapsed(g_ctx, 2, 3, &ms));
    CHECK(ms >= 0.0f && ms < 1e4f, "timer around 3 activations: %g ms", ms);
    expect_error("timer_record with slot 4", L.pea_cuda_timer_record(g_ctx, PEA_CUDA_TIMER_SLOTS),
                 PEA_CUDA_ERROR_INVALID, "timer_record");
    expect_error("timer_elapsed with a NULL ms", L.pea_cuda_timer_elapsed(g_ctx, 0, 1, nullptr),
                 PEA_CUDA_ERROR_INVALID, "timer_elapsed");
    expect_error("timer_elapsed with slot -1", L.pea_cuda_timer_elapsed(g_ctx, -1, 1, &ms), PEA_CUDA_ERROR_INVALID,
                 "timer_elapsed");
    expect_error("spin of -1 µs", L.pea_cuda_spin(g_ctx, -1.0), PEA_CUDA_ERROR_INVALID, "spin");
}

/* The per-op profile: calls counted per op name (also past the event ring's 1024 pairs), entries sorted by
 * time, the GPU's idle time (a spin between two ops, which is not an op) in the span but in no entry, a
 * restart clearing the totals, nothing recorded once stopped. */
static const pea_cuda_profile_entry *find_op(const std::vector<pea_cuda_profile_entry> &e, int count, const char *op) {
    for (int i = 0; i < count && i < (int)e.size(); i++)
        if (strcmp(e[i].op, op) == 0) return &e[i];
    return nullptr;
}
static void test_profile() {
    g_phase = "profile";
    const size_t n = 4096;
    Dev dx = up(rvec(n), CK_F32), dy(n * 4);
    std::vector<pea_cuda_profile_entry> e(8);
    int count = -1;
    double span = -1.0;
    expect_error("profile_stop before a start", L.pea_cuda_profile_stop(g_ctx, e.data(), 8, &count, &span),
                 PEA_CUDA_ERROR_INVALID, "profile_stop");
    const double spin_us = 2000.0;
    OK(L.pea_cuda_profile_start(g_ctx));
    for (int i = 0; i < 3; i++) OK(L.pea_cuda_activation(g_ctx, CK_F32, PEA_ACT_SILU, dx.p, dy.p, (int64_t)n));
    OK(L.pea_cuda_spin(g_ctx, spin_us));
    for (int i = 0; i < 2; i++) OK(L.pea_cuda_zero(g_ctx, dy.p, n * 4));
    expect_error("profile_stop with a NULL count", L.pea_cuda_profile_stop(g_ctx, e.data(), 8, nullptr, &span),
                 PEA_CUDA_ERROR_INVALID, "profile_stop");
    OK(L.pea_cuda_profile_start(g_ctx)); /* the failed stop left it running; a restart clears the totals */
    for (int i = 0; i < 3; i++) OK(L.pea_cuda_activation(g_ctx, CK_F32, PEA_ACT_SILU, dx.p, dy.p, (int64_t)n));
    OK(L.pea_cuda_spin(g_ctx, spin_us));
    for (int i = 0; i < 2; i++) OK(L.pea_cuda_zero(g_ctx, dy.p, n * 4));
    OK(L.pea_cuda_profile_stop(g_ctx, e.data(), 8, &count, &span));
    CHECK(count == 2, "%d ops profiled, not 2 (activation, zero)", count);
    const pea_cuda_profile_entry *act = find_op(e, count, "activation"), *zero = find_op(e, count, "zero");
    CHECK(act && act->calls == 3, "activation: %llu calls, not 3", act ? (unsigned long long)act->calls : 0ull);
    CHECK(zero && zero->calls == 2, "zero: %llu calls, not 2", zero ? (unsigned long long)zero->calls : 0ull);
    CHECK(count < 2 || e[0].ms >= e[1].ms, "entries not sorted by time: %g, %g ms", e[0].ms, e[1].ms);
    const double sum = (act ? act->ms : 0) + (zero ? zero->ms : 0);
    CHECK(sum >= 0.0 && sum <= span * 1.001 + 1e-4, "the ops' %g ms exceed the span %g ms", sum, span);
    if (g_emu)
        CHECK(span > sum, "the span (%g ms) does not hold the spin between the ops (ops: %g ms)", span, sum);
    else
        CHECK(span >= 0.9 * spin_us * 1e-3 && sum < span - 0.5 * spin_us * 1e-3,
              "span %g ms, ops %g ms around a %g µs spin that is not an op", span, sum, spin_us);
    say("  ok   profile: activation 3 calls %g ms, zero 2 calls %g ms, span %g ms", act ? act->ms : -1,
        zero ? zero->ms : -1, span);

    /* more calls than the ring's pairs, and fewer entries asked for than ops seen */
    OK(L.pea_cuda_profile_start(g_ctx));
    OK(L.pea_cuda_activation(g_ctx, CK_F32, PEA_ACT_SILU, dx.p, dy.p, (int64_t)n));
    for (int i = 0; i < 2500; i++) OK(L.pea_cuda_zero(g_ctx, dy.p, 4));
    std::vector<pea_cuda_profile_entry> one(1);
    OK(L.pea_cuda_profile_stop(g_ctx, one.data(), 1, &count, &span));
    CHECK(count == 2, "%d ops profiled, not 2", count);
    OK(L.pea_cuda_profile_start(g_ctx));
    for (int i = 0; i < 2500; i++) OK(L.pea_cuda_zero(g_ctx, dy.p, 4));
    OK(L.pea_cuda_profile_stop(g_ctx, e.data(), 8, &count, &span));
    CHECK(count == 1 && e[0].calls == 2500, "zero past the ring: %d ops, %llu calls (2500 made)", count,
          (unsigned long long)e[0].calls);

    /* stopped: nothing is recorded */
    OK(L.pea_cuda_zero(g_ctx, dy.p, 4));
    OK(L.pea_cuda_profile_start(g_ctx));
    OK(L.pea_cuda_profile_stop(g_ctx, e.data(), 8, &count, &span));
    CHECK(count == 0 && span == 0.0, "an empty profile: %d ops, span %g ms", count, span);
}

/* The adapter's AdamW step and clipping's sums of squares: bit for bit the CPU's (ck_adamw_f32,
 * ck_sum_squares_f32), out of place and in place, both lerp branches, several blocks and a tail. */
static std::vector<uint32_t> bits(const std::vector<float> &v) {
    std::vector<uint32_t> b(v.size());
    memcpy(b.data(), v.data(), v.size() * 4);
    return b;
}
static void test_optimizer() {
    g_phase = "optimizer";
    const int64_t n = 3 * CK_SUM_SQUARES_BLOCK + 37;
    for (float weight1 : {0.1f, 0.7f}) {
        const ck_adamw_hyper h = {0.9999f, weight1, 0.999f, 0.001f, -3.3e-4f, 0.0706f, 1e-8f};
        std::vector<float> p = rvec(n), m = rvec(n, 0.01f), v = rvec(n, 1e-4f, 1e-4f), g = rvec(n, 0.05f);
        std::vector<float> rp = p, rm = m, rv = v;
        ck_adamw_f32(rp.data(), rm.data(), rv.data(), g.data(), n, &h);
        Dev dp = up(p, CK_F32), dm = up(m, CK_F32), dv = up(v, CK_F32), dg = up(g, CK_F32);
        Dev op(n * 4), om(n * 4), ov(n * 4);
        OK(L.pea_cuda_adamw(g_ctx, dp.at<float>(), dm.at<float>(), dv.at<float>(), dg.at<float>(), op.at<float>(),
                            om.at<float>(), ov.at<float>(), n, &h));
        CHECK(bits(down(op.p, n, CK_F32)) == bits(rp), "adamw (w1 %g): parameters differ from the CPU's bits", weight1);
        CHECK(bits(down(om.p, n, CK_F32)) == bits(rm), "adamw (w1 %g): first moments differ", weight1);
        CHECK(bits(down(ov.p, n, CK_F32)) == bits(rv), "adamw (w1 %g): second moments differ", weight1);
        /* in place */
        OK(L.pea_cuda_adamw(g_ctx, dp.at<float>(), dm.at<float>(), dv.at<float>(), dg.at<float>(), dp.at<float>(),
                            dm.at<float>(), dv.at<float>(), n, &h));
        CHECK(bits(down(dp.p, n, CK_F32)) == bits(rp) && bits(down(dv.p, n, CK_F32)) == bits(rv),
              "adamw in place (w1 %g) differs from the CPU's bits", weight1);
    }
    /* values over 23 binades, so that the f64 sums round and a different order of additions shows in the bits;
     * 40 blocks for the chance of it */
    for (int64_t len : {(int64_t)1, (int64_t)5, (int64_t)CK_SUM_SQUARES_BLOCK, n, 40 * (int64_t)CK_SUM_SQUARES_BLOCK + 37}) {
        std::vector<float> x = rvec(len, 3.0f);
        for (int64_t i = 0; i < len; i++) x[i] = ldexpf(x[i], (int)(i % 23) - 11);
        Dev dx = up(x, CK_F32);
        double got = -1.0;
        OK(L.pea_cuda_sum_squares(g_ctx, dx.at<float>(), len, &got));
        const double want = ck_sum_squares_f32(x.data(), len);
        CHECK(memcmp(&got, &want, 8) == 0, "sum_squares n=%lld: %.17g, the CPU %.17g", (long long)len, got, want);
    }
    std::vector<float> x = rvec(100);
    x[57] = NAN;
    Dev dx = up(x, CK_F32);
    double got = 0.0;
    OK(L.pea_cuda_sum_squares(g_ctx, dx.at<float>(), 100, &got));
    CHECK(std::isnan(got), "sum_squares with a NaN: %g", got);
    OK(L.pea_cuda_sum_squares(g_ctx, nullptr, 0, &got));
    CHECK(got == 0.0, "sum_squares of nothing: %g", got);
    expect_error("adamw without hyperparameters", L.pea_cuda_adamw(g_ctx, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                                   nullptr, nullptr, 4, nullptr),
                 PEA_CUDA_ERROR_INVALID, "adamw");
    expect_error("sum_squares with a NULL result", L.pea_cuda_sum_squares(g_ctx, dx.at<float>(), 100, nullptr),
                 PEA_CUDA_ERROR_INVALID, "sum_squares");
}

/* The NCCL all-reduce (collective.cu) on a communicator of one rank, where the sum is the values themselves, in
 * place, after queued work. NCCL comes from $PEA_NCCL_LIB (make cuda-test: the emulator's stand-in,
 * libpea_nccl_emu.so) or libnccl.so.2; without either, every call must say so (NO_DEVICE, naming the op). */
static void test_collective() {
    g_phase = "collective";
    const int64_t n = 1000;
    std::vector<float> x = rvec(n);
    Dev dx = up(x, CK_F32), dy(n * 4);
    expect_error("nccl_allreduce before nccl_init", L.pea_cuda_nccl_allreduce_sum_f32(g_ctx, dx.at<float>(), n),
                 PEA_CUDA_ERROR_INVALID, "nccl_allreduce_sum_f32");
    unsigned char id[PEA_CUDA_NCCL_ID_BYTES] = {0};
    const int rc = L.pea_cuda_nccl_unique_id(g_ctx, nullptr, id);
    if (rc == PEA_CUDA_ERROR_NO_DEVICE) {
        expect_error("nccl_unique_id without NCCL", rc, PEA_CUDA_ERROR_NO_DEVICE, "nccl_unique_id");
        expect_error("nccl_init without NCCL", L.pea_cuda_nccl_init(g_ctx, nullptr, id, 1, 0), PEA_CUDA_ERROR_NO_DEVICE,
                     "nccl_init");
        printf("     (no NCCL here: set PEA_NCCL_LIB to test the all-reduce)\n");
        return;
    }
    OK(rc);
    expect_error("nccl_init of rank 1 of 1", L.pea_cuda_nccl_init(g_ctx, nullptr, id, 1, 1), PEA_CUDA_ERROR_INVALID, "nccl_init");
    OK(L.pea_cuda_nccl_init(g_ctx, nullptr, id, 1, 0));
    /* queued work first: y = x · 1 on the stream, then the all-reduce of y */
    OK(L.pea_cuda_affine(g_ctx, CK_F32, dx.p, dy.p, n, 1.0f, 0.0f));
    OK(L.pea_cuda_nccl_allreduce_sum_f32(g_ctx, dy.at<float>(), n));
    CHECK(bits(down(dy.p, n, CK_F32)) == bits(x), "nccl all-reduce over one rank changed the values");
    OK(L.pea_cuda_nccl_allreduce_sum_f32(g_ctx, nullptr, 0));
    expect_error("nccl_init twice", L.pea_cuda_nccl_init(g_ctx, nullptr, id, 1, 0), PEA_CUDA_ERROR_INVALID, "nccl_init");
}


static void test_memory() {
    g_phase = "memory";
    const size_t sizes[] = {1, 1000, 4096, 4097, (size_t)1 << 20, 3000000, 33};
    uint64_t allocs_after_first = 0, allocs = 0;
    size_t in_use = 0, peak = 0, base_in_use = 0;
    OK(L.pea_cuda_memory_stats(g_ctx, &base_in_use, &peak, &allocs));
    for (int round = 0; round < 5; round++) {
        std::vector<void *> ptrs;
        for (size_t s : sizes) {
            void *p = nullptr;
            OK(L.pea_cuda_alloc(g_ctx, s, &p));
            CHECK(p != nullptr && (uintptr_t)p % 256 == 0, "alloc %zu → %p", s, p);
            ptrs.push_back(p);
        }
        OK(L.pea_cuda_memory_stats(g_ctx, &in_use, &peak, &allocs));
        size_t want = 0;
        for (size_t s : sizes) want += s;
        CHECK(in_use - base_in_use >= want && peak >= in_use, "in_use %zu (base %zu) peak %zu for %zu bytes", in_use,
              base_in_use, peak, want);
        for (void *p : ptrs) OK(L.pea_cuda_free(g_ctx, p));
        if (round == 0) allocs_after_first = allocs;
    }
    OK(L.pea_cuda_memory_stats(g_ctx, &in_use, &peak, &allocs));
    CHECK(allocs == allocs_after_first, "steady state: %llu device allocations after round 1, %llu after round 5",
          (unsigned long long)allocs_after_first, (unsigned long long)allocs);
    CHECK(in_use == base_in_use, "in_use %zu after freeing everything (base %zu)", in_use, base_in_use);
    say("  ok   allocator steady state: %llu cudaMalloc calls, none after the first round",
        (unsigned long long)allocs);
    OK(L.pea_cuda_release_cache(g_ctx));
    void *p = nullptr;
    OK(L.pea_cuda_alloc(g_ctx, 4096, &p));
    uint64_t allocs2 = 0;
    OK(L.pea_cuda_memory_stats(g_ctx, nullptr, nullptr, &allocs2));
    CHECK(allocs2 == allocs + 1, "after release_cache an alloc reaches cudaMalloc (%llu → %llu)",
          (unsigned long long)allocs, (unsigned long long)allocs2);
    OK(L.pea_cuda_free(g_ctx, p));
    int x = 0;
    expect_error("free of a pointer the allocator never gave", L.pea_cuda_free(g_ctx, &x), PEA_CUDA_ERROR_INVALID,
                 "free");
    expect_error("free twice", L.pea_cuda_free(g_ctx, p), PEA_CUDA_ERROR_INVALID, "free");
    OK(L.pea_cuda_free(g_ctx, nullptr));
}

static void test_copies() {
    g_phase = "upload/download";
    /* large: 10 MB through the 4 MB staging ring; the host buffer is overwritten right after the call */
    {
        const size_t n = (size_t)10 << 20;
        std::vector<unsigned char> host(n), keep;
        for (size_t i = 0; i < n; i++) host[i] = (unsigned char)(i * 131 + (i >> 12));
        keep = host;
        Dev d(n);
        OK(L.pea_cuda_upload(g_ctx, d.p, host.data(), n));
        memset(host.data(), 0xAB, n);
        std::vector<unsigned char> back(n);
        OK(L.pea_cuda_download(g_ctx, back.data(), d.p, n));
        same_bytes("10 MB upload staged, source reused at once", back.data(), keep.data(), n);
    }
    /* many small uploads into one buffer, more than the ring holds in total */
    {
        const size_t piece = 100003, count = 200;
        Dev d(piece * count);
        std::vector<unsigned char> all(piece * count);
        std::vector<unsigned char> buf(piece);
        for (size_t k = 0; k < count; k++) {
            for (size_t i = 0; i < piece; i++) buf[i] = (unsigned char)(k * 7 + i);
            memcpy(&all[k * piece], buf.data(), piece);
            OK(L.pea_cuda_upload(g_ctx, d.at(k * piece), buf.data(), piece));
        }
        std::vector<unsigned char> back(piece * count);
        OK(L.pea_cuda_download(g_ctx, back.data(), d.p, back.size()));
        same_bytes("200 uploads of 100003 bytes (the ring wraps)", back.data(), all.data(), all.size());
    }
    {
        unsigned char one = 0x5A, got = 0;
        Dev d(1);
        OK(L.pea_cuda_upload(g_ctx, d.p, &one, 1));
        OK(L.pea_cuda_download(g_ctx, &got, d.p, 1));
        CHECK(got == one, "one byte: %d", got);
        std::vector<float> ones(1000, 1.0f);
        Dev z = up(ones, CK_F32);
        OK(L.pea_cuda_zero(g_ctx, z.at(4 * 10), 4 * 990));
        std::vector<float> r = down(z.p, 1000, CK_F32);
        bool ok = true;
        for (int i = 0; i < 1000; i++) ok &= r[i] == (i < 10 ? 1.0f : 0.0f);
        CHECK(ok, "zero of a sub-range");
        OK(L.pea_cuda_synchronize(g_ctx));
    }
}

static void test_convert() {
    g_phase = "convert";
    /* special values: NaN (with payload), ±inf, ±0, f16 subnormals and their ties, the f16 overflow edge,
     * bf16 ties, integers */
    std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.5f, 65504.0f, 65519.99f, 65520.0f, 1e9f, -1e9f, INFINITY,
                            -INFINITY, 3.0e-5f, 6.0e-8f, 5.9604644775390625e-08f, 2.9802322387695312e-08f,
                            8.940696716308594e-08f, 6.103515625e-05f, 6.1e-05f, 1.00048828125f, 1.00146484375f,
                            1.0078125f, 1.01171875f, 3.14159265f, -2.71828f, 123456.789f, 1e-40f, 0.1f, 0.5f,
                            -0.5f, 2.5f, 1000.75f, 16777217.0f};
    uint32_t nan_bits[] = {0x7fc00000u, 0x7f800001u, 0xffc12345u, 0x7fa00000u};
    for (uint32_t b : nan_bits) {
        float f;
        memcpy(&f, &b, 4);
        v.push_back(f);
    }
    for (int i = 0; i < 300; i++) v.push_back(urand() * powf(2.0f, (float)(i % 40 - 30)));
    const int n = (int)v.size();
    const int types[] = {CK_F32, CK_F16, CK_BF16, CK_I32, CK_I64};
    for (int st : types) {
        /* the source tensor in type st, made on the host (ints from finite values) */
        std::vector<float> src_vals = v;
        if (st == CK_I32 || st == CK_I64)
            for (auto &x : src_vals) x = std::isfinite(x) ? std::max(-2e9f, std::min(2e9f, roundf(x * 1000.0f))) : 7.0f;
        std::vector<char> src(n * tsize(st));
        if (st == CK_I32) for (int i = 0; i < n; i++) ((int32_t *)src.data())[i] = (int32_t)src_vals[i];
        else if (st == CK_I64) for (int i = 0; i < n; i++) ((int64_t *)src.data())[i] = (int64_t)src_vals[i] * 3 + 1;
        else ck_convert(src_vals.data(), CK_F32, src.data(), st, n);
        Dev dsrc = up_raw(src.data(), src.size());
        for (int dt : types) {
            if ((dt == CK_I32 || dt == CK_I64) && (st == CK_F32 || st == CK_F16 || st == CK_BF16)) {
                /* float → int of non-finite or huge values is undefined in C: use finite, in-range sources */
                continue;
            }
            std::vector<char> ref(n * tsize(dt)), got(n * tsize(dt));
            ck_convert(src.data(), st, ref.data(), dt, n);
            Dev ddst(got.size());
            OK(L.pea_cuda_convert(g_ctx, dsrc.p, st, ddst.p, dt, n));
            OK(L.pea_cuda_download(g_ctx, got.data(), ddst.p, got.size()));
            same_bytes(fmt("convert %s → %s (%d values incl. NaN payloads, subnormals, ties)", tname(st), tname(dt), n),
                       got.data(), ref.data(), got.size());
        }
    }
    /* float → int on finite in-range values */
    std::vector<float> f(257);
    for (int i = 0; i < 257; i++) f[i] = (i - 128) * 3.7f;
    for (int st : kFloatTypes) {
        std::vector<char> src(f.size() * tsize(st));
        ck_convert(f.data(), CK_F32, src.data(), st, (int64_t)f.size());
        Dev dsrc = up_raw(src.data(), src.size());
        for (int dt : {CK_I32, CK_I64}) {
            std::vector<char> ref(f.size() * tsize(dt)), got(f.size() * tsize(dt));
            ck_convert(src.data(), st, ref.data(), dt, (int64_t)f.size());
            Dev ddst(got.size());
            OK(L.pea_cuda_convert(g_ctx, dsrc.p, st, ddst.p, dt, (int64_t)f.size()));
            OK(L.pea_cuda_download(g_ctx, got.data(), ddst.p, got.size()));
            same_bytes(fmt("convert %s → %s (finite values)", tname(st), tname(dt)), got.data(), ref.data(), got.size());
        }
    }
    expect_error("convert with an unknown dtype", L.pea_cuda_convert(g_ctx, g_ctx, 9, g_ctx, CK_F32, 4),
                 PEA_CUDA_ERROR_INVALID, "convert");
}

/* ---------------------------------------------------------------------------------------------------- */
/* Strided copy and binary ops                                                                           */

static void test_copy_strided() {
    g_phase = "copy_strided";
    struct Case {
        const char *name;
        int rank;
        int64_t shape[8], ss[8], ds[8];
        int64_t src_elems, dst_elems, src_off, dst_off;
    };
    std::vector<Case> cases = {
        /* permute [2,3,5,7] → [2,5,3,7] written through the source's index space */
        {"permute (0,2,1,3)", 4, {2, 3, 5, 7}, {105, 35, 7, 1}, {105, 7, 21, 1}, 210, 210, 0, 0},
        /* transpose of a matrix [9, 13] */
        {"transpose 9×13", 2, {9, 13}, {13, 1}, {1, 9}, 117, 117, 0, 0},
        /* concat along the channel axis: write [2,3,4,5] into channels 2..4 of [2,8,4,5] */
        {"concat slice", 4, {2, 3, 4, 5}, {60, 20, 5, 1}, {160, 20, 5, 1}, 120, 320, 0, 40},
        /* split: read channels 1..3 of [3,6,10] into a contiguous [3,3,10] */
        {"split slice", 3, {3, 3, 10}, {60, 10, 1}, {30, 10, 1}, 180, 90, 10, 0},
        /* one element, rank 1 */
        {"one element", 1, {1}, {1}, {1}, 1, 1, 0, 0},
        /* rank 8 with extents 1 and 2 and a broadcast source stride */
        {"rank 8", 8, {2, 1, 2, 3, 1, 2, 2, 3}, {0, 0, 36, 12, 0, 6, 3, 1}, {144, 144, 72, 24, 24, 12, 6, 2}, 72, 288,
         0, 1},
        /* a flip: negative stride */
        {"reverse", 1, {50}, {-1}, {1}, 50, 50, 49, 0},
        /* contiguous inner runs that can be widened (also when elem_size is 2: 8 at a time) */
        {"rows of 64", 2, {7, 64}, {80, 1}, {64, 1}, 560, 448, 0, 0},
    };
    const int64_t sizes[] = {1, 2, 4, 8, 3, 16, 12};
    for (const Case &c : cases) {
        for (int64_t es : sizes) {
            std::vector<unsigned char> src(c.src_elems * es), dst(c.dst_elems * es), ref;
            for (size_t i = 0; i < src.size(); i++) src[i] = (unsigned char)(i * 37 + 11);
            for (size_t i = 0; i < dst.size(); i++) dst[i] = (unsigned char)(i * 5 + 3);
            ref = dst;
            ck_copy_strided(src.data() + c.src_off * es, c.ss, ref.data() + c.dst_off * es, c.ds, c.shape, c.rank, es);
            Dev ds = up_raw(src.data(), src.size()), dd = up_raw(dst.data(), dst.size());
            OK(L.pea_cuda_copy_strided(g_ctx, ds.at(c.src_off * es), c.ss, dd.at(c.dst_off * es), c.ds, c.shape, c.rank,
                                       es));
            std::vector<unsigned char> got(dst.size());
            OK(L.pea_cuda_download(g_ctx, got.data(), dd.p, got.size()));
            same_bytes(fmt("copy_strided %s, %lld-byte elements", c.name, (long long)es), got.data(), ref.data(),
                       got.size());
        }
    }
    int64_t shape[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1}, st[9] = {0};
    expect_error("copy_strided of rank 9", L.pea_cuda_copy_strided(g_ctx, g_ctx, st, g_ctx, st, shape, 9, 4),
                 PEA_CUDA_ERROR_INVALID, "copy_strided");
}

static void test_binary() {
    g_phase = "binary";
    struct Case {
        const char *name;
        int rank;
        int64_t shape[8], as[8], bs[8];
        int64_t a_elems, b_elems;
    };
    std::vector<Case> cases = {
        {"same shape", 1, {1001}, {1}, {1}, 1001, 1001},
        {"bias over channels [2,5,7,3] + [5]", 4, {2, 5, 7, 3}, {105, 21, 3, 1}, {0, 1, 0, 0}, 210, 5},
        {"row vector [9,13] ⊕ [13]", 2, {9, 13}, {13, 1}, {0, 1}, 117, 13},
        {"scalar", 3, {3, 4, 5}, {20, 5, 1}, {0, 0, 0}, 60, 1},
        {"transposed a", 2, {6, 7}, {1, 6}, {7, 1}, 42, 42},
        {"rank 8 mixed broadcast", 8, {2, 2, 1, 3, 2, 1, 2, 3}, {72, 36, 36, 12, 6, 6, 3, 1}, {0, 18, 0, 6, 0, 0, 3, 1},
         144, 36},
        {"one element", 1, {1}, {1}, {1}, 1, 1},
        /* the 16-byte vector path (inner extent a multiple of 8 elements, operands with inner stride 0 or 1) */
        {"same shape [4,8,33] (vector)", 3, {4, 8, 33}, {264, 33, 1}, {264, 33, 1}, 1056, 1056},
        {"per-channel [1,6,16] + [6,1] (vector)", 3, {1, 6, 16}, {96, 16, 1}, {0, 1, 0}, 96, 6},
        {"row vector [9,24] + [24] (vector)", 2, {9, 24}, {24, 1}, {0, 1}, 216, 24},
        {"broadcast a [24] + [9,24] (vector)", 2, {9, 24}, {0, 1}, {24, 1}, 24, 216},
        {"row vector [5,12] + [12] (f32 vector only)", 2, {5, 12}, {12, 1}, {0, 1}, 60, 12},
    };
    for (int t : kFloatTypes)
        for (const Case &c : cases)
            for (int op = 0; op < CK_BINARY_COUNT; op++) {
                std::vector<float> a = rounded(rvec(c.a_elems), t), b = rounded(rvec(c.b_elems, 1.0f, 2.5f), t);
                int64_t n = 1;
                for (int i = 0; i < c.rank; i++) n *= c.shape[i];
                std::vector<float> ref(n);
                ck_binary_f32(op, a.data(), c.as, b.data(), c.bs, ref.data(), c.shape, c.rank);
                Dev da = up(a, t), db = up(b, t), dy(n * tsize(t));
                OK(L.pea_cuda_binary(g_ctx, t, op, da.p, c.as, db.p, c.bs, dy.p, c.shape, c.rank));
                compare(fmt("binary %s op %d %s", c.name, op, tname(t)), down(dy.p, n, t), ref, tol_for(t));
            }
    int64_t shape[1] = {4}, s[1] = {1};
    expect_error("binary with an unknown op", L.pea_cuda_binary(g_ctx, CK_F32, 7, g_ctx, s, g_ctx, s, g_ctx, shape, 1),
                 PEA_CUDA_ERROR_INVALID, "binary");
    expect_error("binary with dtype i32", L.pea_cuda_binary(g_ctx, CK_I32, 0, g_ctx, s, g_ctx, s, g_ctx, shape, 1),
                 PEA_CUDA_ERROR_INVALID, "binary");
}

/* ---------------------------------------------------------------------------------------------------- */
/* Elementwise                                                                                           */

static void test_elementwise() {
    g_phase = "elementwise";
    const int64_t sizes[] = {1, 1000, 100003, 4096};
    for (int t : kFloatTypes) {
        for (int64_t n : sizes) {
            std::vector<float> x = rounded(rvec(n, 4.0f), t);
            Dev dx = up(x, t), dy(n * tsize(t));
            for (int kind = 0; kind < CK_ACT_COUNT; kind++) {
                std::vector<float> ref(n);
                ck_activation_f32(kind, x.data(), ref.data(), n);
                OK(L.pea_cuda_activation(g_ctx, t, kind, dx.p, dy.p, n));
                compare(fmt("activation %d n=%lld %s", kind, (long long)n, tname(t)), down(dy.p, n, t), ref, tol_for(t));
            }
            std::vector<float> ref(n);
            ck_affine_f32(x.data(), ref.data(), n, -0.75f, 0.125f);
            OK(L.pea_cuda_affine(g_ctx, t, dx.p, dy.p, n, -0.75f, 0.125f));
            compare(fmt("affine n=%lld %s", (long long)n, tname(t)), down(dy.p, n, t), ref, tol_for(t));
            OK(L.pea_cuda_affine(g_ctx, t, dx.p, dx.p, n, -0.75f, 0.125f)); /* in place */
            compare(fmt("affine in place n=%lld %s", (long long)n, tname(t)), down(dx.p, n, t), ref, tol_for(t));
        }
        /* misaligned view: the vector path must not be taken */
        {
            std::vector<float> x = rounded(rvec(1001, 3.0f), t), ref(1000);
            Dev dx = up(x, t), dy(1001 * tsize(t));
            ck_activation_f32(CK_ACT_SILU, x.data() + 1, ref.data(), 1000);
            OK(L.pea_cuda_activation(g_ctx, t, PEA_ACT_SILU, dx.at(tsize(t)), dy.at(tsize(t)), 1000));
            std::vector<float> got = down(dy.p, 1001, t);
            compare(fmt("silu on a view at offset 1 %s", tname(t)), std::vector<float>(got.begin() + 1, got.end()), ref,
                    tol_for(t));
        }
        /* GEGLU */
        const int64_t shapes[][2] = {{3, 77}, {1, 1}, {65, 320}, {7, 16}, {5, 12}};
        for (auto &s : shapes) {
            const int64_t R = s[0], D = s[1];
            std::vector<float> x = rounded(rvec(R * 2 * D, 3.0f), t), ref(R * D);
            ck_geglu_f32(x.data(), ref.data(), R, D);
            Dev dx = up(x, t), dy(R * D * tsize(t));
            OK(L.pea_cuda_geglu(g_ctx, t, dx.p, dy.p, R, D));
            compare(fmt("geglu R=%lld D=%lld %s", (long long)R, (long long)D, tname(t)), down(dy.p, R * D, t), ref,
                    tol_for(t));
        }
        /* upsample (a copy: exact) */
        const int64_t ups[][3] = {{3, 5, 7}, {1, 1, 1}, {2, 8, 8}};
        for (auto &u : ups) {
            const int64_t P = u[0], H = u[1], W = u[2];
            std::vector<float> x = rounded(rvec(P * H * W), t), ref(4 * P * H * W);
            ck_upsample_nearest2x_f32(x.data(), ref.data(), P, H, W);
            Dev dx = up(x, t), dy(4 * P * H * W * tsize(t));
            OK(L.pea_cuda_upsample_nearest2x(g_ctx, t, dx.p, dy.p, P, H, W));
            compare(fmt("upsample P=%lld H=%lld W=%lld %s", (long long)P, (long long)H, (long long)W, tname(t)),
                    down(dy.p, 4 * P * H * W, t), ref, 0.0);
        }
        /* mean */
        const int64_t means[][3] = {{2, 77, 1}, {3, 5, 64}, {1, 1, 1}, {2, 4096, 1}, {4, 300, 3}, {2, 7, 33}};
        for (auto &m : means) {
            const int64_t O = m[0], N = m[1], I = m[2];
            std::vector<float> x = rounded(rvec(O * N * I, 1.0f, 0.5f), t), ref(O * I);
            ck_mean_f32(x.data(), ref.data(), O, N, I);
            Dev dx = up(x, t), dy(O * I * tsize(t));
            OK(L.pea_cuda_mean(g_ctx, t, dx.p, dy.p, O, N, I));
            compare(fmt("mean [%lld, %lld, %lld] %s", (long long)O, (long long)N, (long long)I, tname(t)),
                    down(dy.p, O * I, t), ref, tol_for(t));
        }
    }
    expect_error("activation of an unknown kind", L.pea_cuda_activation(g_ctx, CK_F32, 9, g_ctx, g_ctx, 4),
                 PEA_CUDA_ERROR_INVALID, "activation");
    expect_error("geglu with a NULL tensor", L.pea_cuda_geglu(g_ctx, CK_F32, nullptr, g_ctx, 2, 2),
                 PEA_CUDA_ERROR_INVALID, "geglu");
    expect_error("mean with n = 0", L.pea_cuda_mean(g_ctx, CK_F32, g_ctx, g_ctx, 1, 0, 1), PEA_CUDA_ERROR_INVALID,
                 "mean");
}

static void test_embedding() {
    g_phase = "embedding";
    const int64_t vocab = 50, D = 33, n = 19;
    for (int t : kFloatTypes)
        for (int i64 = 0; i64 <= 1; i64++) {
            std::vector<float> table = rounded(rvec(vocab * D), t), ref(n * D);
            std::vector<int64_t> ids64(n);
            std::vector<int32_t> ids32(n);
            for (int64_t i = 0; i < n; i++) ids64[i] = ids32[i] = (int32_t)((i * 17 + 3) % vocab);
            ids64[0] = ids32[0] = 0;
            ids64[n - 1] = ids32[n - 1] = vocab - 1;
            const void *ids = i64 ? (const void *)ids64.data() : (const void *)ids32.data();
            CHECK(ck_embedding_f32(ids, i64, n, table.data(), vocab, D, ref.data()) == CK_OK, "cpu embedding");
            Dev dt = up(table, t), di = up_raw(ids, n * (i64 ? 8 : 4)), dy(n * D * tsize(t));
            OK(L.pea_cuda_embedding(g_ctx, t, di.p, i64, n, dt.p, vocab, D, dy.p));
            compare(fmt("embedding %s ids %s", tname(t), i64 ? "i64" : "i32"), down(dy.p, n * D, t), ref, 0.0);
        }
    /* an id out of range: the call is queued; the next synchronising call reports it, once */
    std::vector<int32_t> ids = {1, 2, 50, 3};
    std::vector<float> table = rvec(vocab * D);
    Dev dt = up(table, CK_F32), di = up_raw(ids.data(), 16), dy(4 * D * 4);
    OK(L.pea_cuda_embedding(g_ctx, CK_F32, di.p, 0, 4, dt.p, vocab, D, dy.p));
    int rc = L.pea_cuda_synchronize(g_ctx);
    const char *msg = L.pea_cuda_last_error(g_ctx);
    CHECK(rc == PEA_CUDA_ERROR_INVALID && strstr(msg, "embedding") && strstr(msg, "50"),
          "out-of-range id: synchronize → %d \"%s\"", rc, msg);
    say("  ok   embedding id 50 of vocab 50 → synchronize %d \"%s\"", rc, msg);
    OK(L.pea_cuda_synchronize(g_ctx));
    std::vector<int64_t> neg = {-1};
    Dev dn = up_raw(neg.data(), 8), dy1(D * 4);
    OK(L.pea_cuda_embedding(g_ctx, CK_F32, dn.p, 1, 1, dt.p, vocab, D, dy1.p));
    std::vector<float> out(D);
    rc = L.pea_cuda_download(g_ctx, out.data(), dy1.p, D * 4);
    msg = L.pea_cuda_last_error(g_ctx);
    CHECK(rc == PEA_CUDA_ERROR_INVALID && strstr(msg, "embedding") && strstr(msg, "-1"),
          "negative id: download → %d \"%s\"", rc, msg);
    say("  ok   embedding id -1 → download %d \"%s\"", rc, msg);
    OK(L.pea_cuda_synchronize(g_ctx));
}

static void test_timestep_embedding() {
    g_phase = "timestep_embedding";
    const float ts[] = {0.0f, 1.0f, 999.0f, 500.5f, 17.0f};
    const int64_t B = 5;
    const int64_t dims[] = {320, 7, 1, 256};
    for (int t_type : {CK_F32, CK_I64, CK_I32, CK_F16})
        for (int64_t dim : dims)
            for (int flip = 0; flip <= 1; flip++)
                for (float shift : {1.0f, 0.0f}) {
                    std::vector<float> tv(ts, ts + B);
                    if (t_type == CK_I32 || t_type == CK_I64 || t_type == CK_F16) tv[3] = 500.0f;
                    std::vector<char> traw(B * tsize(t_type));
                    ck_convert(tv.data(), CK_F32, traw.data(), t_type, B);
                    std::vector<float> tf(B), ref(B * dim);
                    ck_convert(traw.data(), t_type, tf.data(), CK_F32, B);
                    ck_timestep_embedding_f32(tf.data(), B, dim, flip, shift, 1.0f, 10000.0f, ref.data());
                    Dev dtt = up_raw(traw.data(), traw.size());
                    for (int yt : kFloatTypes) {
                        Dev dy(B * dim * tsize(yt));
                        OK(L.pea_cuda_timestep_embedding(g_ctx, yt, dtt.p, t_type, B, dim, flip, shift, 1.0f, 10000.0f,
                                                         dy.p));
                        /* sin/cos of arguments up to 1000: a 1-ulp difference in exp gives ~1e-4 absolute */
                        compare(fmt("timestep_embedding t %s dim %lld flip %d shift %g → %s", tname(t_type),
                                    (long long)dim, flip, shift, tname(yt)),
                                down(dy.p, B * dim, yt), yt == CK_F32 ? ref : rounded(ref, yt),
                                yt == CK_F32 ? 1e-4 : tol_for(yt));
                    }
                }
}

/* ---------------------------------------------------------------------------------------------------- */
/* GEMM, linear, conv2d                                                                                  */

static void test_gemm() {
    g_phase = "gemm";
    struct Case {
        int64_t M, N, K, batch;
        int ta, tb;
        int64_t pad; /* extra leading-dimension padding */
        float alpha, beta;
        bool bcastA, bcastB;
    };
    std::vector<Case> cases = {
        {1, 1, 1, 1, 0, 0, 0, 1.0f, 0.0f, false, false},    {17, 33, 65, 1, 0, 0, 0, 1.0f, 0.0f, false, false},
        {17, 33, 65, 1, 1, 0, 3, 0.5f, 0.0f, false, false}, {17, 33, 65, 1, 0, 1, 1, 1.0f, 0.7f, false, false},
        {64, 48, 40, 1, 1, 1, 0, -1.0f, 1.0f, false, false}, {7, 9, 11, 3, 0, 0, 0, 1.0f, 0.0f, true, false},
        {7, 9, 11, 4, 0, 1, 2, 2.0f, 0.5f, false, true},    {5, 80, 3, 2, 1, 0, 0, 1.0f, 0.0f, false, false},
        {33, 1, 77, 2, 0, 0, 0, 1.0f, 0.0f, false, false},   {9, 8, 0, 2, 0, 0, 0, 1.0f, 0.5f, false, false},
    };
    for (int t : kFloatTypes)
        for (const Case &c : cases) {
            const int64_t rA = c.ta ? c.K : c.M, cA = c.ta ? c.M : c.K, rB = c.tb ? c.N : c.K, cB = c.tb ? c.K : c.N;
            const int64_t lda = cA + c.pad, ldb = cB + c.pad, ldc = c.N + c.pad;
            const int64_t sA = c.bcastA ? 0 : rA * lda, sB = c.bcastB ? 0 : rB * ldb, sC = c.M * ldc;
            const int64_t nA = std::max<int64_t>(1, c.bcastA ? rA * lda : rA * lda * c.batch);
            const int64_t nB = std::max<int64_t>(1, c.bcastB ? rB * ldb : rB * ldb * c.batch);
            const int64_t nC = c.M * ldc * c.batch;
            std::vector<float> A = rounded(rvec(nA), t), B = rounded(rvec(nB), t), C = rounded(rvec(nC), t);
            if (c.beta == 0.0f)
                for (auto &x : C) x = NAN; /* beta = 0 must not read C */
            std::vector<float> ref = C;
            ck_sgemm_batched(c.ta, c.tb, c.M, c.N, c.K, c.alpha, A.data(), lda, sA, B.data(), ldb, sB, c.beta,
                             ref.data(), ldc, sC, c.batch);
            Dev dA = up(A, t), dB = up(B, t), dC = up(C, t);
            OK(L.pea_cuda_gemm(g_ctx, t, c.ta, c.tb, c.M, c.N, c.K, c.alpha, dA.p, lda, sA, dB.p, ldb, sB, c.beta,
                               dC.p, ldc, sC, c.batch));
            std::vector<float> got = down(dC.p, nC, t);
            /* compare only the M×N blocks (padding columns keep their NaN/values on both sides) */
            std::vector<float> g2, r2;
            for (int64_t b = 0; b < c.batch; b++)
                for (int64_t i = 0; i < c.M; i++)
                    for (int64_t j = 0; j < c.N; j++) {
                        g2.push_back(got[b * sC + i * ldc + j]);
                        r2.push_back(t == CK_F32 ? ref[b * sC + i * ldc + j] : rounded({ref[b * sC + i * ldc + j]}, t)[0]);
                    }
            compare(fmt("gemm %s%s M=%lld N=%lld K=%lld batch=%lld ld+%lld α=%g β=%g%s%s %s", c.ta ? "T" : "N",
                        c.tb ? "T" : "N", (long long)c.M, (long long)c.N, (long long)c.K, (long long)c.batch,
                        (long long)c.pad, c.alpha, c.beta, c.bcastA ? " A-bcast" : "", c.bcastB ? " B-bcast" : "",
                        tname(t)),
                    g2, r2, tol_for(t));
        }
    /* TF32: close to f32 but (on the emulator, which rounds the inputs to TF32) not identical */
    {
        const int64_t M = 31, N = 29, K = 70;
        std::vector<float> A = rvec(M * K), B = rvec(K * N), ref(M * N);
        ck_sgemm(0, 0, M, N, K, 1.0f, A.data(), K, B.data(), N, 0.0f, ref.data(), N);
        Dev dA = up(A, CK_F32), dB = up(B, CK_F32), dC(M * N * 4);
        OK(L.pea_cuda_set_tf32(g_ctx, 1));
        OK(L.pea_cuda_gemm(g_ctx, CK_F32, 0, 0, M, N, K, 1.0f, dA.p, K, 0, dB.p, N, 0, 0.0f, dC.p, N, 0, 1));
        OK(L.pea_cuda_set_tf32(g_ctx, 0));
        std::vector<float> got = down(dC.p, M * N, CK_F32);
        compare("gemm f32 with TF32 on", got, ref, 5e-3);
        if (g_emu) {
            double num = 0;
            for (size_t i = 0; i < got.size(); i++) num += fabs(got[i] - ref[i]);
            CHECK(num > 0, "TF32 on gave the exact f32 result: the flag did not reach cuBLAS");
        }
    }
    expect_error("gemm with lda < K", L.pea_cuda_gemm(g_ctx, CK_F32, 0, 0, 4, 4, 8, 1, g_ctx, 4, 0, g_ctx, 4, 0, 0,
                                                      g_ctx, 4, 0, 1),
                 PEA_CUDA_ERROR_INVALID, "gemm");
    expect_error("gemm with dtype 7", L.pea_cuda_gemm(g_ctx, 7, 0, 0, 4, 4, 4, 1, g_ctx, 4, 0, g_ctx, 4, 0, 0, g_ctx,
                                                      4, 0, 1),
                 PEA_CUDA_ERROR_INVALID, "gemm");
    expect_error("gemm with strideC 0 over a batch", L.pea_cuda_gemm(g_ctx, CK_F32, 0, 0, 4, 4, 4, 1, g_ctx, 4, 16,
                                                                     g_ctx, 4, 16, 0, g_ctx, 4, 0, 2),
                 PEA_CUDA_ERROR_INVALID, "gemm");
    expect_error("gemm with M < 0", L.pea_cuda_gemm(g_ctx, CK_F32, 0, 0, -1, 4, 4, 1, g_ctx, 4, 0, g_ctx, 4, 0, 0,
                                                    g_ctx, 4, 0, 1),
                 PEA_CUDA_ERROR_INVALID, "gemm");
}

static void test_linear() {
    g_phase = "linear";
    const int64_t shapes[][3] = {{1, 40, 33}, {77, 64, 48}, {5, 1, 7}, {130, 320, 20}};
    for (int t : kFloatTypes)
        for (auto &s : shapes)
            for (int with_bias = 0; with_bias <= 1; with_bias++)
                for (int with_residual = 0; with_residual <= 1; with_residual++) {
                    const int64_t R = s[0], I = s[1], O = s[2];
                    std::vector<float> x = rounded(rvec(R * I), t), w = rounded(rvec(O * I), t),
                                       bias = rounded(rvec(O), t), residual = rounded(rvec(R * O, 2.0f), t),
                                       ref(R * O);
                    /* reference: y = x·wᵀ + bias + residual through the CPU GEMM (beta = 1 onto the broadcast
                     * bias plus the residual) */
                    for (int64_t r = 0; r < R; r++)
                        for (int64_t o = 0; o < O; o++)
                            ref[r * O + o] = (with_bias ? bias[o] : 0.0f) + (with_residual ? residual[r * O + o] : 0.0f);
                    ck_sgemm(0, 1, R, O, I, 1.0f, x.data(), I, w.data(), I, 1.0f, ref.data(), O);
                    Dev dx = up(x, t), dw = up(w, t), db = up(bias, t), dr = up(residual, t), dy(R * O * tsize(t));
                    OK(L.pea_cuda_linear(g_ctx, t, dx.p, dw.p, with_bias ? db.p : nullptr,
                                         with_residual ? dr.p : nullptr, dy.p, R, I, O));
                    compare(fmt("linear rows=%lld in=%lld out=%lld bias=%d residual=%d %s", (long long)R,
                                (long long)I, (long long)O, with_bias, with_residual, tname(t)),
                            down(dy.p, R * O, t), ref, tol_for(t));
                }
    expect_error("linear with a NULL weight", L.pea_cuda_linear(g_ctx, CK_F32, g_ctx, nullptr, nullptr, nullptr, g_ctx, 2, 2, 2),
                 PEA_CUDA_ERROR_INVALID, "linear");
}

/* Linear layers with a bias go through cached cuBLASLt plans (gemm.cu). Each call must use the bias it is given,
 * a repeated shape must not ask the heuristic again, a view at an odd offset (less aligned than the plan it
 * would otherwise share) must get its own plan, and a plan evicted from the full cache must be rebuilt. The
 * results are checked on any build; the heuristic counts only under the emulator, whose stand-in also
 * refuses an algo used for another problem or for pointers less aligned than it was chosen for. */
static void test_linear_plans() {
    g_phase = "linear plans";
    auto queries = [] { return L.emu_lt_heuristic_queries ? L.emu_lt_heuristic_queries() : 0; };
    const bool counted = L.emu_lt_heuristic_queries != nullptr;
    /* y = x·wᵀ + bias (+ residual when ores ≥ 0) on the CPU; x, y and the residual may sit at element offsets
     * ox, oy, ores inside their device buffers */
    auto run = [&](int t, int64_t R, int64_t I, int64_t O, const Dev &dw, const std::vector<float> &w,
                   const std::vector<float> &bias, int64_t ox, int64_t oy, const char *label, int64_t ores = -1) {
        const std::vector<float> x = rounded(rvec(R * I), t), residual = rounded(rvec(R * O), t);
        std::vector<float> xpad(ox, 0.0f), rpad(ores > 0 ? ores : 0, 0.0f), ref(R * O);
        xpad.insert(xpad.end(), x.begin(), x.end());
        rpad.insert(rpad.end(), residual.begin(), residual.end());
        for (int64_t r = 0; r < R; r++)
            for (int64_t o = 0; o < O; o++) ref[r * O + o] = bias[o] + (ores >= 0 ? residual[r * O + o] : 0.0f);
        ck_sgemm(0, 1, R, O, I, 1.0f, x.data(), I, w.data(), I, 1.0f, ref.data(), O);
        Dev dx = up(xpad, t), db = up(bias, t), dr = up(rpad, t), dy((oy + R * O) * tsize(t));
        OK(L.pea_cuda_linear(g_ctx, t, dx.at(ox * tsize(t)), dw.p, db.p, ores >= 0 ? dr.at(ores * tsize(t)) : nullptr,
                             dy.at(oy * tsize(t)), R, I, O));
        compare(fmt("%s rows=%lld in=%lld out=%lld x+%lld y+%lld residual %lld %s", label, (long long)R, (long long)I,
                    (long long)O, (long long)ox, (long long)oy, (long long)ores, tname(t)),
                down(dy.at(oy * tsize(t)), R * O, t), ref, tol_for(t));
    };
    for (int t : kFloatTypes) {
        const int64_t R = 37, I = 72, O = 56;
        const std::vector<float> w = rounded(rvec(O * I), t);
        const Dev dw = up(w, t);
        long long before = queries();
        run(t, R, I, O, dw, w, rounded(rvec(O), t), 0, 0, "first call");
        CHECK(!counted || queries() - before == 1, "a new linear shape asked the heuristic %lld times, not once",
              queries() - before);
        before = queries();
        for (int i = 0; i < 2; i++) run(t, R, I, O, dw, w, rounded(rvec(O), t), 0, 0, "same plan, new bias");
        CHECK(!counted || queries() == before, "a repeated linear shape asked the heuristic %lld times",
              queries() - before);
        before = queries();
        run(t, R, I, O, dw, w, rounded(rvec(O), t), 1, 0, "x at an odd offset");
        run(t, R, I, O, dw, w, rounded(rvec(O), t), 0, 3, "y at an odd offset");
        CHECK(!counted || queries() - before == 2, "odd-offset views asked the heuristic %lld times, not twice",
              queries() - before);
        /* the residual (cuBLASLt's C) is part of the key: with one, again, and at an odd offset */
        before = queries();
        run(t, R, I, O, dw, w, rounded(rvec(O), t), 0, 0, "with a residual", 0);
        run(t, R, I, O, dw, w, rounded(rvec(O), t), 0, 0, "with a residual again", 0);
        run(t, R, I, O, dw, w, rounded(rvec(O), t), 0, 0, "residual at an odd offset", 1);
        CHECK(!counted || queries() - before == 2, "residual plans asked the heuristic %lld times, not twice",
              queries() - before);
        /* a bias view at an odd offset takes the fallback (bias written first, GEMM onto it): still right */
        const std::vector<float> bias = rounded(rvec(O + 1), t), x = rounded(rvec(R * I), t);
        std::vector<float> ref(R * O);
        for (int64_t r = 0; r < R; r++)
            for (int64_t o = 0; o < O; o++) ref[r * O + o] = bias[1 + o];
        ck_sgemm(0, 1, R, O, I, 1.0f, x.data(), I, w.data(), I, 1.0f, ref.data(), O);
        Dev dx = up(x, t), db = up(bias, t), dy(R * O * tsize(t));
        OK(L.pea_cuda_linear(g_ctx, t, dx.p, dw.p, db.at(tsize(t)), nullptr, dy.p, R, I, O));
        compare(fmt("bias at an odd offset %s", tname(t)), down(dy.p, R * O, t), ref, tol_for(t));
    }
    /* more shapes than the cache holds, then the first again: evicted, planned anew, still right */
    const int t = CK_F16;
    const std::vector<float> w = rounded(rvec(8 * 16), t);
    const Dev dw = up(w, t);
    for (int64_t r = 1; r <= 70; r++) run(t, r, 16, 8, dw, w, rounded(rvec(8), t), 0, 0, "cache churn");
    const long long before = queries();
    run(t, 1, 16, 8, dw, w, rounded(rvec(8), t), 0, 0, "evicted plan");
    CHECK(!counted || queries() - before == 1, "an evicted plan asked the heuristic %lld times, not once",
          queries() - before);
}

static void run_conv(const ck_conv2d_params &p, int t, bool with_bias, const char *label, bool with_residual = false) {
    const int64_t Ho = ck_conv2d_out_h(&p), Wo = ck_conv2d_out_w(&p);
    std::vector<float> x = rounded(rvec(p.B * p.Cin * p.H * p.W), t), w = rounded(rvec(p.Cout * p.Cin * p.kh * p.kw, 0.5f), t),
                       bias = rounded(rvec(p.Cout), t), ref(p.B * p.Cout * Ho * Wo);
    const std::vector<float> residual = rounded(rvec(ref.size(), 2.0f), t);
    std::vector<float> ws(std::max<int64_t>(1, ck_conv2d_workspace_floats(&p)));
    ck_conv2d_f32(&p, x.data(), w.data(), CK_F32, with_bias ? bias.data() : nullptr, nullptr, ref.data(), ws.data());
    if (with_residual)
        for (size_t i = 0; i < ref.size(); i++) ref[i] += residual[i];
    Dev dx = up(x, t), dw = up(w, t), db = up(bias, t), dr = up(residual, t), dy(ref.size() * tsize(t));
    OK(L.pea_cuda_conv2d(g_ctx, t, &p, dx.p, dw.p, with_bias ? db.p : nullptr, with_residual ? dr.p : nullptr, dy.p));
    compare(fmt("conv2d %s B=%lld Cin=%lld %lldx%lld Cout=%lld k=%lldx%lld s=%lldx%lld pad=%lld/%lld/%lld/%lld "
                "bias=%d residual=%d %s",
                label, (long long)p.B, (long long)p.Cin, (long long)p.H, (long long)p.W, (long long)p.Cout,
                (long long)p.kh, (long long)p.kw, (long long)p.strideH, (long long)p.strideW, (long long)p.padTop,
                (long long)p.padBottom, (long long)p.padLeft, (long long)p.padRight, with_bias, with_residual,
                tname(t)),
            down(dy.p, ref.size(), t), ref, tol_for(t));
}

static void test_conv2d() {
    g_phase = "conv2d";
    std::vector<ck_conv2d_params> ps = {
        {2, 5, 9, 11, 7, 3, 3, 1, 1, 1, 1, 1, 1},  /* 3×3, pad 1 */
        {2, 4, 9, 10, 6, 3, 3, 2, 2, 0, 1, 0, 1},  /* the VAE downsampler: stride 2, pad right/bottom only */
        {3, 6, 5, 7, 4, 1, 1, 1, 1, 0, 0, 0, 0},   /* 1×1: straight to GEMM */
        {1, 3, 8, 8, 5, 1, 1, 2, 2, 0, 0, 0, 0},   /* 1×1 stride 2: im2col */
        {2, 3, 7, 6, 2, 4, 3, 1, 2, 2, 1, 0, 2},   /* odd kernel, mixed strides, asymmetric pads */
        {1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0},   /* one element */
        {5, 2, 4, 4, 3, 3, 3, 1, 1, 1, 1, 1, 1},   /* larger batch */
    };
    for (int t : kFloatTypes)
        for (const auto &p : ps)
            for (int b = 0; b <= 1; b++) run_conv(p, t, b, "", b); /* the residual rides with the bias */
    /* steady state: repeated convolutions of a shape reuse the workspace (no new device allocations) */
    uint64_t a0 = 0, a1 = 0;
    run_conv(ps[0], CK_F32, true, "warm-up");
    OK(L.pea_cuda_memory_stats(g_ctx, nullptr, nullptr, &a0));
    for (int i = 0; i < 3; i++) run_conv(ps[0], CK_F32, true, "repeat");
    OK(L.pea_cuda_memory_stats(g_ctx, nullptr, nullptr, &a1));
    CHECK(a0 == a1, "conv2d steady state: %llu → %llu device allocations", (unsigned long long)a0,
          (unsigned long long)a1);
    ck_conv2d_params bad = {1, 2, 2, 2, 1, 5, 5, 1, 1, 0, 0, 0, 0};
    expect_error("conv2d with a kernel larger than the input", L.pea_cuda_conv2d(g_ctx, CK_F32, &bad, g_ctx, g_ctx,
                                                                                 nullptr, nullptr, g_ctx),
                 PEA_CUDA_ERROR_INVALID, "conv2d");
    expect_error("conv2d with NULL params", L.pea_cuda_conv2d(g_ctx, CK_F32, nullptr, g_ctx, g_ctx, nullptr, nullptr, g_ctx),
                 PEA_CUDA_ERROR_INVALID, "conv2d");
}

/* The implicit-GEMM convolution (f16/bf16, 1×1 and 3×3) against a plain loop over the definition in double:
 * y[b, m, oy, ox] = bias[m] + residual[b, m, oy, ox] + Σ_{c,i,j} w[m, c, i, j] · x[b, c, oy·sh − pt + i, ox·sw − pl + j].
 * The shapes reach both tile sizes (64 × 64; 128 × 128 once there are as many of those blocks as SMs), partial
 * tiles in M (Cout) and N (B·Ho·Wo, whose tiles cross images), K tails (Cin·kh·kw not a multiple of 32 or 8),
 * the cp.async runs (stride 1, W ≡ 0 mod 8; a 1×1 plane) and their fallbacks (x at an odd offset, padding,
 * stride 2, runs across rows). */
static void run_conv_implicit(const ck_conv2d_params &p, int t, bool with_bias, bool with_residual, int64_t x_offset,
                              const char *label) {
    const int64_t Ho = ck_conv2d_out_h(&p), Wo = ck_conv2d_out_w(&p), Kk = p.Cin * p.kh * p.kw;
    std::vector<float> x = rounded(rvec(x_offset + p.B * p.Cin * p.H * p.W), t), w = rounded(rvec(p.Cout * Kk, 0.5f), t),
                       bias = rounded(rvec(p.Cout), t), residual = rounded(rvec(p.B * p.Cout * Ho * Wo, 2.0f), t),
                       ref(p.B * p.Cout * Ho * Wo);
    const float *xs = x.data() + x_offset;
    for (int64_t b = 0; b < p.B; b++)
        for (int64_t m = 0; m < p.Cout; m++)
            for (int64_t oy = 0; oy < Ho; oy++)
                for (int64_t ox = 0; ox < Wo; ox++) {
                    const int64_t at = ((b * p.Cout + m) * Ho + oy) * Wo + ox;
                    double v = (with_bias ? bias[m] : 0.0) + (with_residual ? residual[at] : 0.0);
                    for (int64_t c = 0; c < p.Cin; c++)
                        for (int64_t i = 0; i < p.kh; i++)
                            for (int64_t j = 0; j < p.kw; j++) {
                                const int64_t iy = oy * p.strideH - p.padTop + i, ix = ox * p.strideW - p.padLeft + j;
                                if (iy < 0 || iy >= p.H || ix < 0 || ix >= p.W) continue;
                                v += (double)w[((m * p.Cin + c) * p.kh + i) * p.kw + j] *
                                     xs[((b * p.Cin + c) * p.H + iy) * p.W + ix];
                            }
                    ref[at] = (float)v;
                }
    Dev dx = up(x, t), dw = up(w, t), db = up(bias, t), dr = up(residual, t), dy(ref.size() * tsize(t));
    OK(L.pea_cuda_conv2d(g_ctx, t, &p, dx.at(x_offset * tsize(t)), dw.p, with_bias ? db.p : nullptr,
                         with_residual ? dr.p : nullptr, dy.p));
    compare(fmt("implicit-GEMM conv2d %s B=%lld Cin=%lld %lldx%lld Cout=%lld k=%lldx%lld s=%lld pad=%lld/%lld "
                "bias=%d residual=%d x+%lld %s",
                label, (long long)p.B, (long long)p.Cin, (long long)p.H, (long long)p.W, (long long)p.Cout,
                (long long)p.kh, (long long)p.kw, (long long)p.strideH, (long long)p.padTop, (long long)p.padBottom,
                with_bias, with_residual, (long long)x_offset, tname(t)),
            down(dy.p, ref.size(), t), ref, tol_for(t));
}

static void test_conv2d_implicit_gemm() {
    g_phase = "conv2d implicit GEMM";
    struct Case {
        ck_conv2d_params p;
        const char *label;
    };
    const Case cases[] = {
        {{2, 16, 5, 16, 72, 3, 3, 1, 1, 1, 1, 1, 1}, "3x3 s1, W = 16 (aligned runs), Cout tail over 64"},
        {{1, 8, 9, 9, 40, 3, 3, 2, 2, 0, 1, 0, 1}, "3x3 s2 downsampler, odd H, W"},
        {{2, 8, 6, 7, 20, 3, 3, 1, 1, 1, 1, 1, 1}, "3x3 s1, W = 7 (runs across rows)"},
        {{2, 24, 7, 8, 33, 1, 1, 1, 1, 0, 0, 0, 0}, "1x1, plane of 56 (aligned runs), K = 24"},
        {{3, 40, 5, 5, 16, 1, 1, 1, 1, 0, 0, 0, 0}, "1x1, plane of 25 (tiles across images), K tail"},
        {{1, 4, 6, 10, 12, 3, 3, 1, 1, 1, 1, 1, 1}, "3x3, Cin = 4 (K = 36: no 16-byte weight rows)"},
        {{2, 8, 24, 24, 130, 3, 3, 1, 1, 1, 1, 1, 1}, "3x3 s1 on 128x128 tiles, Cout tail over 128"},
    };
    for (int t : {CK_F16, CK_BF16})
        for (const Case &c : cases)
            for (int v = 0; v < 3; v++) run_conv_implicit(c.p, t, v != 1, v != 0, 0, c.label);
    /* x at an odd element offset: no 16-byte runs, every x̂ chunk through registers */
    for (int t : {CK_F16, CK_BF16}) {
        run_conv_implicit(cases[0].p, t, true, true, 1, "x misaligned");
        run_conv_implicit(cases[3].p, t, true, true, 3, "x misaligned");
    }
}

/* A second context with a tiny workspace limit: whole-image groups and column chunks of one image. */
static void test_conv2d_chunked(const char *libpath) {
    (void)libpath;
    g_phase = "conv2d chunked";
    pea_cuda_context *saved = g_ctx;
    char msg[256];
    setenv("PEA_CUDA_CONV_WORKSPACE_BYTES", "2000", 1); /* 500 f32: less than one image's columns */
    pea_cuda_context *small = nullptr;
    int rc = L.pea_cuda_create(0, &small, msg, sizeof msg);
    unsetenv("PEA_CUDA_CONV_WORKSPACE_BYTES");
    CHECK(rc == PEA_CUDA_OK, "create: %s", msg);
    if (rc) return;
    g_ctx = small;
    /* K = 2·3·3 = 18: 2000 bytes hold 27 columns of f32 (55 of f16) out of 7·9 = 63 per image */
    ck_conv2d_params p = {3, 2, 7, 9, 4, 3, 3, 1, 1, 1, 1, 1, 1};
    for (int t : kFloatTypes) run_conv(p, t, true, "column chunks");
    /* K = 1·2·2 = 4, N = 4·4 = 16: 2000 bytes hold 7 whole f32 images, so 10 images take two groups */
    ck_conv2d_params q = {10, 1, 5, 5, 3, 2, 2, 1, 1, 0, 0, 0, 0};
    for (int t : kFloatTypes) run_conv(q, t, false, "image groups");
    L.pea_cuda_destroy(small);
    g_ctx = saved;
}

/* A context whose im2col/col2im use 64-bit indices (PEA_CUDA_CONV_INDEX64): real tensors reach that path only
 * past 2³¹ elements. Forward and data-gradient cases, whole images and column chunks. */
static void run_conv_backward(const ck_conv2d_params &p, int t, const char *label);
static void test_conv2d_index64() {
    g_phase = "conv2d 64-bit indices";
    pea_cuda_context *saved = g_ctx;
    char msg[256];
    setenv("PEA_CUDA_CONV_INDEX64", "1", 1);
    setenv("PEA_CUDA_CONV_WORKSPACE_BYTES", "2000", 1);
    pea_cuda_context *wide = nullptr;
    int rc = L.pea_cuda_create(0, &wide, msg, sizeof msg);
    unsetenv("PEA_CUDA_CONV_INDEX64");
    unsetenv("PEA_CUDA_CONV_WORKSPACE_BYTES");
    CHECK(rc == PEA_CUDA_OK, "create: %s", msg);
    if (rc) return;
    g_ctx = wide;
    const ck_conv2d_params chunks = {3, 2, 7, 9, 4, 3, 3, 1, 1, 1, 1, 1, 1};   /* column chunks */
    const ck_conv2d_params groups = {10, 1, 5, 5, 3, 2, 2, 1, 1, 0, 0, 0, 0};  /* whole-image groups, a 2×2 kernel */
    for (int t : kFloatTypes) {
        run_conv(chunks, t, true, "64-bit indices, column chunks", true);
        run_conv(groups, t, false, "64-bit indices, image groups", true);
        run_conv(chunks, t, false, "64-bit indices, column chunks");
        run_conv_backward(chunks, t, "64-bit indices, column chunks");
        run_conv_backward(groups, t, "64-bit indices, image groups");
    }
    L.pea_cuda_destroy(wide);
    g_ctx = saved;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Norms and softmax                                                                                     */

static void test_norms() {
    g_phase = "norms";
    struct GN {
        int64_t B, C, S, G;
        float offset;
    };
    const GN gns[] = {{2, 6, 35, 3, 0.0f}, {1, 64, 16, 32, 0.0f}, {2, 32, 64, 32, 1000.0f}, {1, 4, 1, 4, 0.0f},
                      {3, 12, 13, 1, -3.0f}, {1, 20, 1000, 4, 0.0f}, {2, 8, 36, 2, 50.0f}};
    for (int t : kFloatTypes)
        for (const GN &g : gns)
            for (int affine = 0; affine <= 1; affine++)
                for (int silu = 0; silu <= 1; silu++) {
                    std::vector<float> x = rounded(rvec(g.B * g.C * g.S, 2.0f, g.offset), t);
                    std::vector<float> gamma = rounded(rvec(g.C, 0.5f, 1.0f), t), beta = rounded(rvec(g.C), t);
                    std::vector<float> ref(x.size());
                    ck_group_norm_f32(x.data(), affine ? gamma.data() : nullptr, affine ? beta.data() : nullptr,
                                      ref.data(), g.B, g.C, g.S, g.G, 1e-5f, silu);
                    Dev dx = up(x, t), dg = up(gamma, t), db = up(beta, t), dy(x.size() * tsize(t));
                    OK(L.pea_cuda_group_norm(g_ctx, t, dx.p, affine ? dg.p : nullptr, affine ? db.p : nullptr, dy.p,
                                             g.B, g.C, g.S, g.G, 1e-5f, silu));
                    /* with a large mean, f32 statistics cost more than f64's: allow for it */
                    double tol = tol_for(t) * (g.offset >= 100.0f && t == CK_F32 ? 10.0 : 1.0);
                    compare(fmt("group_norm B=%lld C=%lld S=%lld G=%lld mean≈%g affine=%d silu=%d %s", (long long)g.B,
                                (long long)g.C, (long long)g.S, (long long)g.G, g.offset, affine, silu, tname(t)),
                            down(dy.p, x.size(), t), ref, tol);
                }
    /* Shapes that reach each group-norm path (V = 8 f16/bf16 or 4 f32 elements per 16-byte vector, nq = Cg·S/V;
     * the emulator has 16 SMs):
     *   - B·G ≥ 16: the group held in registers with K = 1, 2, 4, 8 vectors per thread (nq ≤ 1024·K), and past
     *     nq = 8192 the split path with chunks of 1024 vectors (f32 [1,16,49152] G=16: 12 chunks per group);
     *   - B·G < 16 with nq ≥ 512: the split path for occupancy, about 32 blocks in all, chunks of 1, 2 or 4
     *     vectors per thread with a partial last chunk ([2,20,1000] G=4: f16 2 chunks of 320 vectors, the last
     *     305; [2,12,6000] G=4: f16 4 chunks of 640, the last 330; f32 5 of 1024, the last 404), exact chunks
     *     with a large mean ([1,4,4096] G=2), more than 32 chunks per group ([1,2,69632] G=1, f32: 34);
     *   - B·G < 16 with nq < 512: too small to split, the register kernel ([1,8,512] G=4). */
    const GN paths[] = {{1, 32, 6144, 16, 0.0f}, {1, 16, 24584, 16, 0.0f}, {1, 16, 49152, 16, -2.0f},
                        {2, 20, 1000, 4, 0.0f},  {2, 12, 6000, 4, -2.0f},  {1, 4, 4096, 2, 500.0f},
                        {1, 2, 69632, 1, 1.0f},  {1, 8, 512, 4, 0.0f}};
    for (int t : kFloatTypes)
        for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
            const GN &g = paths[i];
            const int affine = i % 3 != 1, silu = i % 2 == 0;
            std::vector<float> x = rounded(rvec(g.B * g.C * g.S, 2.0f, g.offset), t);
            std::vector<float> gamma = rounded(rvec(g.C, 0.5f, 1.0f), t), beta = rounded(rvec(g.C), t);
            std::vector<float> ref(x.size());
            ck_group_norm_f32(x.data(), affine ? gamma.data() : nullptr, affine ? beta.data() : nullptr, ref.data(),
                              g.B, g.C, g.S, g.G, 1e-5f, silu);
            Dev dx = up(x, t), dg = up(gamma, t), db = up(beta, t), dy(x.size() * tsize(t));
            OK(L.pea_cuda_group_norm(g_ctx, t, dx.p, affine ? dg.p : nullptr, affine ? db.p : nullptr, dy.p, g.B, g.C,
                                     g.S, g.G, 1e-5f, silu));
            double tol = tol_for(t) * (g.offset >= 100.0f && t == CK_F32 ? 10.0 : 1.0);
            compare(fmt("group_norm path B=%lld C=%lld S=%lld G=%lld mean≈%g affine=%d silu=%d %s", (long long)g.B,
                        (long long)g.C, (long long)g.S, (long long)g.G, g.offset, affine, silu, tname(t)),
                    down(dy.p, x.size(), t), ref, tol);
        }
    /* 320, 768 (CLIP), 1000, 1024, 8, 40: the register kernel with 1–4 vectors per lane in f16/bf16 (and f32
     * up to 512 features), partly idle lanes; 77 and the f32 rows past 512: the three-pass kernel */
    const int64_t lns[][2] = {{5, 77}, {1, 1}, {33, 320}, {3, 1000}, {17, 8}, {9, 768}, {4, 1024}, {6, 40}};
    for (int t : kFloatTypes)
        for (auto &l : lns)
            for (int affine = 0; affine <= 1; affine++) {
                const int64_t R = l[0], D = l[1];
                std::vector<float> x = rounded(rvec(R * D, 3.0f, 1.0f), t), gamma = rounded(rvec(D, 0.5f, 1.0f), t),
                                   beta = rounded(rvec(D), t), ref(R * D);
                ck_layer_norm_f32(x.data(), affine ? gamma.data() : nullptr, affine ? beta.data() : nullptr,
                                  ref.data(), R, D, 1e-5f);
                Dev dx = up(x, t), dg = up(gamma, t), db = up(beta, t), dy(R * D * tsize(t));
                OK(L.pea_cuda_layer_norm(g_ctx, t, dx.p, affine ? dg.p : nullptr, affine ? db.p : nullptr, dy.p, R, D,
                                         1e-5f));
                compare(fmt("layer_norm R=%lld D=%lld affine=%d %s", (long long)R, (long long)D, affine, tname(t)),
                        down(dy.p, R * D, t), ref, tol_for(t));
            }
    const int64_t sms[][2] = {{7, 1}, {7, 33}, {5, 300}, {1, 4096}, {40, 77}};
    for (int t : kFloatTypes)
        for (auto &s : sms)
            for (int inplace = 0; inplace <= 1; inplace++) {
                const int64_t R = s[0], D = s[1];
                std::vector<float> x = rvec(R * D, 8.0f);
                /* row 1 entirely −∞ (→ zeros), row 2 partly −∞ */
                if (R > 2) {
                    for (int64_t d = 0; d < D; d++) x[1 * D + d] = -INFINITY;
                    for (int64_t d = 0; d < D; d += 2) x[2 * D + d] = -INFINITY;
                }
                x = rounded(x, t);
                std::vector<float> ref(R * D);
                ck_softmax_f32(x.data(), ref.data(), R, D);
                Dev dx = up(x, t), dy(R * D * tsize(t));
                OK(L.pea_cuda_softmax(g_ctx, t, dx.p, inplace ? dx.p : dy.p, R, D));
                compare(fmt("softmax R=%lld D=%lld%s %s", (long long)R, (long long)D, inplace ? " in place" : "",
                            tname(t)),
                        down(inplace ? dx.p : dy.p, R * D, t), ref, tol_for(t));
            }
    expect_error("group_norm with C % G != 0", L.pea_cuda_group_norm(g_ctx, CK_F32, g_ctx, nullptr, nullptr, g_ctx, 1, 6,
                                                                     4, 4, 1e-5f, 0),
                 PEA_CUDA_ERROR_INVALID, "group_norm");
    expect_error("layer_norm with D < 0", L.pea_cuda_layer_norm(g_ctx, CK_F32, g_ctx, nullptr, nullptr, g_ctx, 1, -2,
                                                                1e-5f),
                 PEA_CUDA_ERROR_INVALID, "layer_norm");
    expect_error("softmax with dtype i64", L.pea_cuda_softmax(g_ctx, CK_I64, g_ctx, g_ctx, 1, 2), PEA_CUDA_ERROR_INVALID,
                 "softmax");
}

/* ---------------------------------------------------------------------------------------------------- */
/* Attention                                                                                             */

enum Layout { BHTD, BTHD, FUSED_QKV };
enum MaskKind { NO_MASK, FULL_MASK, BCAST_MASK, KEYPAD_MASK };

struct AttnCase {
    int64_t B, H, Tq, Tk, D, Dv;
    Layout layout;
    MaskKind mask;
    int causal;
    int64_t q_offset; /* elements: a misaligned q view */
};

/* p's shape, scale and strides for case c: q, k and v at element offsets *oq, *ok, *ov of one buffer of *total
 * elements; out (and its gradient) [B, Tq, H, Dv]. Returns the number of output elements. */
static int64_t attention_layout(const AttnCase &c, ck_attention_params &p, int64_t *oq, int64_t *ok, int64_t *ov,
                                int64_t *total) {
    const int64_t B = c.B, H = c.H, Tq = c.Tq, Tk = c.Tk, D = c.D, Dv = c.Dv;
    memset(&p, 0, sizeof p);
    p.B = B; p.H = H; p.Tq = Tq; p.Tk = Tk; p.D = D; p.Dv = Dv;
    p.scale = 1.0f / sqrtf((float)D);
    p.causal = c.causal;
    if (c.layout == BHTD) {
        p.q_sb = H * Tq * D; p.q_sh = Tq * D; p.q_st = D;
        p.k_sb = H * Tk * D; p.k_sh = Tk * D; p.k_st = D;
        p.v_sb = H * Tk * Dv; p.v_sh = Tk * Dv; p.v_st = Dv;
        *oq = c.q_offset; *ok = *oq + B * H * Tq * D; *ov = *ok + B * H * Tk * D; *total = *ov + B * H * Tk * Dv;
    } else if (c.layout == BTHD) {
        p.q_sb = Tq * H * D; p.q_sh = D; p.q_st = H * D;
        p.k_sb = Tk * H * D; p.k_sh = D; p.k_st = H * D;
        p.v_sb = Tk * H * Dv; p.v_sh = Dv; p.v_st = H * Dv;
        *oq = c.q_offset; *ok = *oq + B * Tq * H * D; *ov = *ok + B * Tk * H * D; *total = *ov + B * Tk * H * Dv;
    } else { /* [B, T, 3, H, D] from one fused projection (Tq = Tk, D = Dv) */
        const int64_t row = 3 * H * D;
        p.q_sb = p.k_sb = p.v_sb = Tq * row;
        p.q_sh = p.k_sh = p.v_sh = D;
        p.q_st = p.k_st = p.v_st = row;
        *oq = 0; *ok = H * D; *ov = 2 * H * D; *total = B * Tq * row;
    }
    p.o_sb = Tq * H * Dv; p.o_sh = Dv; p.o_st = H * Dv;
    return B * Tq * H * Dv;
}

static void run_attention(const AttnCase &c, int t) {
    const int64_t B = c.B, H = c.H, Tq = c.Tq, Tk = c.Tk, D = c.D, Dv = c.Dv;
    ck_attention_params p;
    /* element offsets of q, k, v inside one buffer, and its size */
    int64_t oq = 0, ok = 0, ov = 0, total = 0;
    const int64_t n_out = attention_layout(c, p, &oq, &ok, &ov, &total);

    std::vector<float> buf = rounded(rvec(total, 1.5f), t);
    std::vector<float> mask;
    if (c.mask != NO_MASK) {
        if (c.mask == FULL_MASK) {
            mask = rvec(B * H * Tq * Tk, 2.0f);
            p.m_sb = H * Tq * Tk; p.m_sh = Tq * Tk; p.m_st = Tk;
            /* query 0 of (0, 0) sees no key at all: its output must be zeros */
            for (int64_t j = 0; j < Tk; j++) mask[j] = -INFINITY;
            for (int64_t j = 0; j < Tk; j += 3) mask[(B * H * Tq - 1) * Tk + j] = -INFINITY;
        } else if (c.mask == BCAST_MASK) {
            mask = rvec(Tq * Tk, 2.0f);
            p.m_sb = 0; p.m_sh = 0; p.m_st = Tk;
        } else { /* key padding [B, 1, 1, Tk]: the last keys of batch 0 masked */
            mask.assign(B * Tk, 0.0f);
            for (int64_t j = Tk / 2; j < Tk; j++) mask[j] = -INFINITY;
            p.m_sb = Tk; p.m_sh = 0; p.m_st = 0;
        }
        mask = rounded(mask, t);
    }
    std::vector<float> ref(n_out, 0.0f);
    ck_attention_params hp = p;
    hp.q = buf.data() + oq; hp.k = buf.data() + ok; hp.v = buf.data() + ov;
    hp.mask = mask.empty() ? nullptr : mask.data();
    hp.out = ref.data();
    ck_attention_f32(&hp);

    Dev dbuf = up(buf, t), dmask = up(mask.empty() ? std::vector<float>{0.0f} : mask, t), dout(n_out * tsize(t));
    ck_attention_params dp = p;
    const size_t es = tsize(t);
    dp.q = dbuf.at<const float>(oq * es);
    dp.k = dbuf.at<const float>(ok * es);
    dp.v = dbuf.at<const float>(ov * es);
    dp.mask = mask.empty() ? nullptr : dmask.at<const float>();
    dp.out = dout.at<float>();
    OK(L.pea_cuda_attention(g_ctx, t, &dp));
    static const char *layouts[] = {"[B,H,T,D]", "[B,T,H,D]", "fused qkv"};
    static const char *masks[] = {"", " mask", " mask[1,1,Tq,Tk]", " keypad[B,1,1,Tk]"};
    compare(fmt("attention B=%lld H=%lld Tq=%lld Tk=%lld D=%lld Dv=%lld %s%s%s%s %s", (long long)B, (long long)H,
                (long long)Tq, (long long)Tk, (long long)D, (long long)Dv, layouts[c.layout], masks[c.mask],
                c.causal ? " causal" : "", c.q_offset ? " q+1" : "", tname(t)),
            down(dout.p, n_out, t), t == CK_F32 ? ref : rounded(ref, t), tol_for(t));
    if (c.mask == FULL_MASK) { /* the fully masked row is exactly zero */
        std::vector<float> got = down(dout.p, Dv, t);
        bool zero = true;
        for (float v : got) zero &= v == 0.0f;
        CHECK(zero, "attention: a row with every key masked is not zero");
    }
}

static void test_attention(bool quick) {
    g_phase = "attention";
    std::vector<AttnCase> f32_cases = {
        {2, 2, 37, 77, 40, 40, BHTD, NO_MASK, 0, 0},        /* SD1.5 cross-attention head dim */
        {1, 2, 70, 70, 64, 64, BTHD, NO_MASK, 1, 0},        /* causal, projection layout */
        {2, 1, 77, 5, 80, 80, BHTD, FULL_MASK, 0, 0},       /* fully masked row, few keys */
        {1, 2, 33, 77, 160, 160, BTHD, BCAST_MASK, 0, 0},   /* broadcast mask, one key per lane */
        {2, 2, 17, 19, 8, 8, BHTD, KEYPAD_MASK, 0, 0},      /* head dim 8, key padding */
        {1, 1, 20, 40, 256, 256, BHTD, NO_MASK, 1, 0},      /* head dim 256, causal with Tk > Tq */
        {1, 2, 21, 23, 20, 20, BHTD, KEYPAD_MASK, 1, 0},    /* odd head dim: the generic kernel */
        {2, 1, 9, 13, 12, 24, BTHD, FULL_MASK, 0, 0},       /* generic with D ≠ Dv */
        {1, 1, 1, 1, 64, 64, BHTD, NO_MASK, 0, 0},          /* one query, one key */
        {2, 2, 30, 30, 64, 64, FUSED_QKV, NO_MASK, 1, 0},   /* self-attention from a fused qkv projection */
        {1, 2, 25, 31, 64, 32, BHTD, BCAST_MASK, 0, 0},     /* fast kernel with D ≠ Dv */
        {1, 1, 20, 300, 64, 64, BTHD, FULL_MASK, 0, 0},     /* several key tiles: online rescaling */
        {1, 1, 19, 100, 160, 160, BHTD, KEYPAD_MASK, 0, 0}, /* several key tiles, KPL = 1 */
        {16, 4, 3, 5, 40, 40, BTHD, NO_MASK, 0, 0},         /* large batch·heads */
        {1, 2, 18, 21, 64, 64, BHTD, NO_MASK, 0, 1},        /* misaligned q: scalar loads */
        {1, 1, 5, 0, 64, 64, BHTD, NO_MASK, 0, 0},          /* no keys: zeros */
        {1, 1, 7, 9, 264, 264, BHTD, NO_MASK, 0, 0},        /* head dim above 256: generic */
    };
    for (size_t i = 0; i < f32_cases.size(); i++)
        if (!quick || i % 3 == 0) run_attention(f32_cases[i], CK_F32);
    const int half_cases[] = {0, 1, 3, 6, 9, 11, 14};
    for (int i : half_cases) {
        run_attention(f32_cases[i], CK_F16);
        if (!quick || i % 2 == 0) run_attention(f32_cases[i], CK_BF16);
    }
    /* f16/bf16 on the tensor-core kernel (D = Dv ≤ 160, padded to a multiple of 16 but 33–40 kept at 40, whose
     * last Q·Kᵀ k-step is half a step and last O n-tile odd): 64-key tiles, 64- or
     * 128-query blocks (two m-tiles per warp for D ≤ 64 and Tq > 64), with Tq and Tk off the tile edges;
     * then shapes it hands to the FMA kernels (D ≠ Dv, D > 160). */
    const std::vector<AttnCase> tc_cases = {
        {2, 3, 150, 77, 40, 40, BTHD, NO_MASK, 0, 0},       /* SD cross-attention: Tk = 77, 128 + 22 queries */
        {1, 2, 129, 130, 64, 64, BHTD, NO_MASK, 0, 0},      /* 3 key tiles (the last of 2 keys), 1 query past 128 */
        {2, 1, 65, 64, 80, 80, BTHD, NO_MASK, 0, 0},        /* D 80, one full key tile, a block of one query */
        {1, 2, 63, 129, 160, 160, BHTD, NO_MASK, 0, 0},     /* D 160, 3 key tiles */
        {1, 1, 40, 50, 128, 128, BTHD, KEYPAD_MASK, 0, 0},  /* D 128, key padding */
        {1, 2, 70, 90, 72, 72, BHTD, BCAST_MASK, 0, 0},     /* D 72 padded to 80, broadcast mask */
        {2, 2, 17, 33, 24, 24, BHTD, FULL_MASK, 0, 0},      /* D 24 padded to 32, a fully masked row */
        {2, 2, 17, 19, 8, 8, BHTD, KEYPAD_MASK, 0, 0},      /* D 8 padded to 16 */
        {1, 2, 100, 100, 40, 40, BTHD, NO_MASK, 1, 0},      /* causal, two m-tiles per warp */
        {1, 1, 90, 70, 36, 36, BTHD, NO_MASK, 0, 0},        /* D 36: scalar loads, kept at 40 (5 chunks), two m-tiles */
        {1, 2, 50, 140, 40, 40, BHTD, KEYPAD_MASK, 0, 0},   /* D 40, one m-tile, 3 key tiles (the last of 12 keys) */
        {2, 1, 130, 65, 40, 40, BHTD, FULL_MASK, 0, 1},     /* D 40, misaligned q, 2 query blocks, 64 + 1 keys */
        {1, 2, 260, 260, 64, 64, BTHD, NO_MASK, 1, 0},      /* causal D 64: key tiles wholly below the diagonal */
        {2, 1, 200, 256, 80, 80, BHTD, NO_MASK, 0, 0},      /* D 80, two m-tiles, 4 full (unmasked) key tiles */
        {1, 1, 70, 192, 96, 96, BHTD, KEYPAD_MASK, 0, 0},   /* D 96, two m-tiles, 3 full key tiles, masked */
        {1, 1, 66, 130, 64, 64, BHTD, NO_MASK, 0, 1},       /* misaligned q, D 64: loads through registers */
        {1, 2, 25, 31, 64, 32, BHTD, BCAST_MASK, 0, 0},     /* D ≠ Dv: the FMA kernel */
        {1, 1, 20, 40, 256, 256, BHTD, NO_MASK, 1, 0},      /* D 256: the FMA kernel */
    };
    for (size_t i = 0; i < tc_cases.size(); i++) {
        if (quick && i % 3 != 0) continue;
        run_attention(tc_cases[i], CK_F16);
        if (!quick || i % 2 == 0) run_attention(tc_cases[i], CK_BF16);
    }
    ck_attention_params bad;
    memset(&bad, 0, sizeof bad);
    bad.B = bad.H = bad.Tq = bad.Tk = 1;
    expect_error("attention with D = 0", L.pea_cuda_attention(g_ctx, CK_F32, &bad), PEA_CUDA_ERROR_INVALID, "attention");
    bad.D = bad.Dv = 8;
    expect_error("attention with NULL q", L.pea_cuda_attention(g_ctx, CK_F32, &bad), PEA_CUDA_ERROR_INVALID, "attention");
}

/* The plain-loop reference of pea_cuda_attention_backward (no mask, not causal), in double: per (b, h, i) the
 * row of probabilities P_i· = softmax(scale·q_i·k_·), dP_ij = dO_i·v_j, dS_ij = P_ij (dP_ij − Σ_j P_ij dP_ij);
 * dq_i = scale Σ_j dS_ij k_j, dk_j += scale dS_ij q_i, dv_j += P_ij dO_i. Gradients go where p's q, k, v strides
 * put their inputs, into g (g's q, k and v regions are zeroed first). */
static void attention_backward_reference(const ck_attention_params &p, const float *x, const float *dout, int64_t oq,
                                         int64_t ok, int64_t ov, std::vector<float> &g) {
    const int64_t Tq = p.Tq, Tk = p.Tk, D = p.D, Dv = p.Dv;
    std::vector<double> dq(D), dk(p.B * p.H * Tk * D, 0.0), dv(p.B * p.H * Tk * Dv, 0.0), P(Tk), dP(Tk);
    for (int64_t b = 0; b < p.B; b++)
        for (int64_t h = 0; h < p.H; h++) {
            const float *q = x + oq + b * p.q_sb + h * p.q_sh, *k = x + ok + b * p.k_sb + h * p.k_sh,
                        *v = x + ov + b * p.v_sb + h * p.v_sh, *dO = dout + b * p.o_sb + h * p.o_sh;
            double *dkb = dk.data() + (b * p.H + h) * Tk * D, *dvb = dv.data() + (b * p.H + h) * Tk * Dv;
            for (int64_t i = 0; i < Tq; i++) {
                double m = -INFINITY, sum = 0, delta = 0;
                for (int64_t j = 0; j < Tk; j++) {
                    double s = 0, dp = 0;
                    for (int64_t d = 0; d < D; d++) s += (double)q[i * p.q_st + d] * k[j * p.k_st + d];
                    for (int64_t d = 0; d < Dv; d++) dp += (double)dO[i * p.o_st + d] * v[j * p.v_st + d];
                    P[j] = p.scale * s;
                    dP[j] = dp;
                    m = std::max(m, P[j]);
                }
                for (int64_t j = 0; j < Tk; j++) sum += P[j] = exp(P[j] - m);
                for (int64_t j = 0; j < Tk; j++) delta += (P[j] /= sum) * dP[j];
                std::fill(dq.begin(), dq.end(), 0.0);
                for (int64_t j = 0; j < Tk; j++) {
                    const double ds = P[j] * (dP[j] - delta);
                    for (int64_t d = 0; d < D; d++) {
                        dq[d] += p.scale * ds * k[j * p.k_st + d];
                        dkb[j * D + d] += p.scale * ds * q[i * p.q_st + d];
                    }
                    for (int64_t d = 0; d < Dv; d++) dvb[j * Dv + d] += P[j] * dO[i * p.o_st + d];
                }
                for (int64_t d = 0; d < D; d++) g[oq + b * p.q_sb + h * p.q_sh + i * p.q_st + d] = (float)dq[d];
            }
            for (int64_t j = 0; j < Tk; j++) {
                for (int64_t d = 0; d < D; d++) g[ok + b * p.k_sb + h * p.k_sh + j * p.k_st + d] = (float)dkb[j * D + d];
                for (int64_t d = 0; d < Dv; d++) g[ov + b * p.v_sb + h * p.v_sh + j * p.v_st + d] = (float)dvb[j * Dv + d];
            }
        }
}

static void run_attention_backward(const AttnCase &c, int t) {
    ck_attention_params p;
    int64_t oq = 0, ok = 0, ov = 0, total = 0;
    const int64_t n_out = attention_layout(c, p, &oq, &ok, &ov, &total);
    const std::vector<float> x = rounded(rvec(total, 1.5f), t), dout = rounded(rvec(n_out), t);
    std::vector<float> ref(total, 0.0f);
    attention_backward_reference(p, x.data(), dout.data(), oq, ok, ov, ref);

    const size_t es = tsize(t);
    Dev dx = up(x, t), ddout = up(dout, t), dg(total * es);
    OK(L.pea_cuda_zero(g_ctx, dg.p, total * es)); /* what no gradient covers (a q offset) reads as zero */
    ck_attention_params dp = p;
    dp.q = dx.at<const float>(oq * es);
    dp.k = dx.at<const float>(ok * es);
    dp.v = dx.at<const float>(ov * es);
    OK(L.pea_cuda_attention_backward(g_ctx, t, &dp, ddout.p, dg.at(oq * es), dg.at(ok * es), dg.at(ov * es)));
    static const char *layouts[] = {"[B,H,T,D]", "[B,T,H,D]", "fused qkv"};
    compare(fmt("attention_backward B=%lld H=%lld Tq=%lld Tk=%lld D=%lld Dv=%lld %s %s", (long long)c.B, (long long)c.H,
                (long long)c.Tq, (long long)c.Tk, (long long)c.D, (long long)c.Dv, layouts[c.layout], tname(t)),
            down(dg.p, total, t), t == CK_F32 ? ref : rounded(ref, t), tol_for(t));
}

static void test_attention_backward() {
    g_phase = "attention_backward";
    const std::vector<AttnCase> cases = {
        {1, 2, 37, 29, 40, 40, BTHD, NO_MASK, 0, 0},     /* SD head dim 40, tails on both tiles */
        {2, 1, 37, 13, 64, 64, BHTD, NO_MASK, 0, 0},     /* cross-attention: fewer keys than a tile */
        {1, 1, 5, 3, 160, 160, BTHD, NO_MASK, 0, 0},     /* head dim 160 */
        {1, 2, 20, 35, 24, 80, BHTD, NO_MASK, 0, 1},     /* D ≠ Dv, a q offset, several key tiles */
        {1, 1, 18, 18, 80, 80, FUSED_QKV, NO_MASK, 0, 0}, /* fused qkv: dq, dk, dv interleaved */
        {1, 1, 4, 0, 8, 8, BHTD, NO_MASK, 0, 0},         /* no keys: dq = 0 */
        {1, 1, 0, 6, 8, 8, BHTD, NO_MASK, 0, 0},         /* no queries: dk = dv = 0 */
    };
    for (size_t i = 0; i < cases.size(); i++) run_attention_backward(cases[i], CK_F32);
    for (int i : {0, 1, 2}) {
        run_attention_backward(cases[i], CK_F16);
        run_attention_backward(cases[i], CK_BF16);
    }
    ck_attention_params bad;
    int64_t oq, ok, ov, total;
    attention_layout({1, 1, 2, 2, 8, 8, BHTD, NO_MASK, 0, 0}, bad, &oq, &ok, &ov, &total);
    bad.q = bad.k = bad.v = (const float *)g_ctx;
    bad.causal = 1;
    expect_error("attention_backward causal", L.pea_cuda_attention_backward(g_ctx, CK_F32, &bad, g_ctx, g_ctx, g_ctx, g_ctx),
                 PEA_CUDA_ERROR_INVALID, "attention_backward");
    bad.causal = 0;
    bad.mask = (const float *)g_ctx;
    expect_error("attention_backward with a mask", L.pea_cuda_attention_backward(g_ctx, CK_F32, &bad, g_ctx, g_ctx, g_ctx, g_ctx),
                 PEA_CUDA_ERROR_INVALID, "attention_backward");
    bad.mask = nullptr;
    bad.D = bad.Dv = 168;
    expect_error("attention_backward with D = 168", L.pea_cuda_attention_backward(g_ctx, CK_F32, &bad, g_ctx, g_ctx, g_ctx, g_ctx),
                 PEA_CUDA_ERROR_INVALID, "attention_backward");
    bad.D = bad.Dv = 8;
    expect_error("attention_backward with NULL dout", L.pea_cuda_attention_backward(g_ctx, CK_F32, &bad, nullptr, g_ctx, g_ctx, g_ctx),
                 PEA_CUDA_ERROR_INVALID, "attention_backward");
}

/* ---------------------------------------------------------------------------------------------------- */
/* Bigger shapes, scaled-down SD blocks: many blocks per launch, several tiles per block                 */

static void test_sd_like() {
    g_phase = "sd-like shapes";
    /* ResNet block: group norm + SiLU over 320 channels in 32 groups, 3×3 conv, 1×1 conv */
    for (int t : {CK_F32, CK_F16}) {
        const int64_t B = 2, C = 320, H = 12, W = 12, S = H * W;
        std::vector<float> x = rounded(rvec(B * C * S, 2.0f, 0.3f), t), gamma = rounded(rvec(C, 0.5f, 1.0f), t),
                           beta = rounded(rvec(C), t), ref(x.size());
        ck_group_norm_f32(x.data(), gamma.data(), beta.data(), ref.data(), B, C, S, 32, 1e-5f, 1);
        Dev dx = up(x, t), dg = up(gamma, t), db = up(beta, t), dy(x.size() * tsize(t));
        OK(L.pea_cuda_group_norm(g_ctx, t, dx.p, dg.p, db.p, dy.p, B, C, S, 32, 1e-5f, 1));
        compare(fmt("group_norm+silu B=2 C=320 12x12 G=32 %s", tname(t)), down(dy.p, x.size(), t), ref, tol_for(t));
        ck_conv2d_params p = {B, C, H, W, 64, 3, 3, 1, 1, 1, 1, 1, 1};
        run_conv(p, t, true, "resnet 3x3");
        ck_conv2d_params q = {B, C, H, W, 96, 1, 1, 1, 1, 0, 0, 0, 0};
        run_conv(q, t, true, "resnet 1x1");
    }
    /* transformer block: layer norm, q/k/v projections, self- and cross-attention, GEGLU */
    for (int t : {CK_F32, CK_F16}) {
        const int64_t rows = 2 * 144, D = 320;
        std::vector<float> x = rounded(rvec(rows * D, 1.0f), t), w = rounded(rvec(3 * D * D, 0.05f), t),
                           ref(rows * 3 * D, 0.0f);
        ck_sgemm(0, 1, rows, 3 * D, D, 1.0f, x.data(), D, w.data(), D, 0.0f, ref.data(), 3 * D);
        Dev dx = up(x, t), dw = up(w, t), dy(rows * 3 * D * tsize(t));
        OK(L.pea_cuda_linear(g_ctx, t, dx.p, dw.p, nullptr, nullptr, dy.p, rows, D, 3 * D));
        compare(fmt("linear qkv rows=288 320→960 %s", tname(t)), down(dy.p, rows * 3 * D, t), ref, tol_for(t));
    }
    run_attention({2, 8, 144, 144, 40, 40, FUSED_QKV, NO_MASK, 0, 0}, CK_F32);
    run_attention({2, 8, 144, 77, 40, 40, BTHD, KEYPAD_MASK, 0, 0}, CK_F16);
    run_attention({2, 5, 256, 256, 64, 64, BTHD, NO_MASK, 0, 0}, CK_F16);
    run_attention({1, 4, 100, 77, 160, 160, BTHD, BCAST_MASK, 0, 0}, CK_BF16);
    run_attention({2, 2, 130, 130, 80, 80, BHTD, NO_MASK, 1, 0}, CK_F32);
}

/* ---------------------------------------------------------------------------------------------------- */
/* CUDA graphs                                                                                           */

/* One "evaluation" for the graph tests: y = gemm(silu(group_norm(linear(x))), w2ᵀ) with temporaries allocated
 * and freed inside, as a model's forward does; the temporaries' pointers are appended to `blocks`. */
struct GraphModel {
    int64_t rows = 24, in = 40, hidden = 64, out = 24;
    Dev w1 = up(rvec(hidden * in, 0.2f), CK_F32), b1 = up(rvec(hidden), CK_F32),
        gamma = up(rvec(hidden, 0.5f, 1.0f), CK_F32), beta = up(rvec(hidden), CK_F32),
        w2 = up(rvec(out * hidden, 0.2f), CK_F32);
};
static void graph_step(const GraphModel &m, const void *x, void *y, std::vector<void *> *blocks) {
    const int t = CK_F32;
    Dev h((size_t)m.rows * m.hidden * 4), n((size_t)m.rows * m.hidden * 4);
    if (blocks) blocks->insert(blocks->end(), {h.p, n.p});
    OK(L.pea_cuda_linear(g_ctx, t, x, m.w1.p, m.b1.p, nullptr, h.p, m.rows, m.in, m.hidden));
    OK(L.pea_cuda_group_norm(g_ctx, t, h.p, m.gamma.p, m.beta.p, n.p, m.rows, m.hidden, 1, 8, 1e-5f, 0));
    OK(L.pea_cuda_activation(g_ctx, t, CK_ACT_SILU, n.p, h.p, m.rows * m.hidden));
    OK(L.pea_cuda_gemm(g_ctx, t, 0, 1, m.rows, m.out, m.hidden, 1.0f, h.p, m.hidden, 0, m.w2.p, m.hidden, 0, 0.0f, y,
                       m.out, 0, 1));
}

static void test_graphs() {
    g_phase = "graphs";
    const GraphModel m;
    const size_t xn = (size_t)m.rows * m.in, yn = (size_t)m.rows * m.out;
    const std::vector<float> x1 = rvec(xn), x2 = rvec(xn, 3.0f);

    /* eager: a warm-up that fills the cache, and the references */
    Dev gx = up(x1, CK_F32), ex(xn * 4), ey(yn * 4);
    graph_step(m, gx.p, ey.p, nullptr);
    const std::vector<float> ref1 = down(ey.p, yn, CK_F32);
    OK(L.pea_cuda_upload(g_ctx, ex.p, x2.data(), xn * 4));
    graph_step(m, ex.p, ey.p, nullptr);
    const std::vector<float> ref2 = down(ey.p, yn, CK_F32);

    /* capture: the input buffer is the graph's (made before), the output is allocated inside */
    uint64_t allocs0 = 0;
    OK(L.pea_cuda_memory_stats(g_ctx, nullptr, nullptr, &allocs0));
    std::vector<void *> captured;
    void *gy = nullptr;
    pea_cuda_graph *graph = nullptr;
    OK(L.pea_cuda_graph_begin(g_ctx));
    OK(L.pea_cuda_alloc(g_ctx, yn * 4, &gy));
    graph_step(m, gx.p, gy, &captured);
    void *fresh = nullptr; /* a size no test allocated before: the capture reaches cudaMalloc (in Relaxed mode) */
    OK(L.pea_cuda_alloc(g_ctx, ((size_t)37 << 20) + 1, &fresh));
    OK(L.pea_cuda_zero(g_ctx, fresh, 4096));
    OK(L.pea_cuda_free(g_ctx, fresh));
    OK(L.pea_cuda_graph_end(g_ctx, &graph));
    CHECK(graph != nullptr, "a graph");
    captured.insert(captured.end(), {gy, fresh});
    uint64_t allocs1 = 0;
    OK(L.pea_cuda_memory_stats(g_ctx, nullptr, nullptr, &allocs1));
    CHECK(allocs1 > allocs0, "the capture's cache miss reached cudaMalloc (%llu calls before, %llu after)",
          (unsigned long long)allocs0, (unsigned long long)allocs1);

    /* a replay computes what the eager run did, bit for bit; after new input values, the new result */
    OK(L.pea_cuda_graph_replay(g_ctx, graph));
    std::vector<float> got = down(gy, yn, CK_F32);
    same_bytes("graph replay = eager (input 1)", got.data(), ref1.data(), yn * 4);
    OK(L.pea_cuda_upload(g_ctx, gx.p, x2.data(), xn * 4));
    size_t in_use0 = 0, in_use1 = 0;
    OK(L.pea_cuda_memory_stats(g_ctx, &in_use0, nullptr, nullptr));
    for (int i = 0; i < 3; i++) OK(L.pea_cuda_graph_replay(g_ctx, graph));
    got = down(gy, yn, CK_F32);
    same_bytes("graph replay = eager (input 2, third replay)", got.data(), ref2.data(), yn * 4);
    OK(L.pea_cuda_memory_stats(g_ctx, &in_use1, nullptr, nullptr));
    CHECK(in_use1 == in_use0, "replays allocate nothing: %zu bytes in use before, %zu after", in_use0, in_use1);

    /* the graph's blocks go to no other tensor while it lives: the same sizes allocated now get other blocks */
    std::vector<void *> later;
    for (int i = 0; i < 3; i++) {
        for (size_t bytes : {(size_t)m.rows * m.hidden * 4, yn * 4}) {
            void *p = nullptr;
            OK(L.pea_cuda_alloc(g_ctx, bytes, &p));
            later.push_back(p);
        }
    }
    bool disjoint = true;
    for (void *p : later)
        for (void *q : captured) disjoint = disjoint && p != q;
    CHECK(disjoint, "a block of the graph was handed to another tensor while the graph lives");
    for (void *p : later) OK(L.pea_cuda_free(g_ctx, p));
    OK(L.pea_cuda_free(g_ctx, gy)); /* the graph's output block stays the graph's */
    /* the profile counts a replay as one call of its own */
    std::vector<pea_cuda_profile_entry> entries(64);
    int count = 0;
    double span = 0;
    OK(L.pea_cuda_profile_start(g_ctx));
    OK(L.pea_cuda_graph_replay(g_ctx, graph));
    OK(L.pea_cuda_profile_stop(g_ctx, entries.data(), (int)entries.size(), &count, &span));
    const pea_cuda_profile_entry *replays = find_op(entries, count, "graph_replay");
    CHECK(count == 1 && replays && replays->calls == 1, "profile of one replay: %d ops, graph_replay %s", count,
          replays ? "counted" : "missing");
    say("  ok   graph: captured from the cache, replays bit-exact on new inputs, its blocks kept from others");

    /* destroyed: its blocks are the cache's again (the same sizes come back without cudaMalloc) */
    OK(L.pea_cuda_graph_destroy(g_ctx, graph));
    uint64_t allocs2 = 0, allocs3 = 0;
    OK(L.pea_cuda_memory_stats(g_ctx, nullptr, nullptr, &allocs2));
    std::vector<void *> again;
    bool reused = false;
    for (int i = 0; i < 2; i++) {
        void *p = nullptr;
        OK(L.pea_cuda_alloc(g_ctx, (size_t)m.rows * m.hidden * 4, &p));
        again.push_back(p);
        for (void *q : captured) reused = reused || p == q;
    }
    OK(L.pea_cuda_memory_stats(g_ctx, nullptr, nullptr, &allocs3));
    CHECK(reused && allocs3 == allocs2, "after destroy the graph's blocks serve new allocations (reused %d, %llu → %llu)",
          (int)reused, (unsigned long long)allocs2, (unsigned long long)allocs3);
    for (void *p : again) OK(L.pea_cuda_free(g_ctx, p));
    expect_error("replay of a destroyed graph", L.pea_cuda_graph_replay(g_ctx, graph), PEA_CUDA_ERROR_INVALID,
                 "graph_replay");

    /* conv2d's workspace grown inside a capture (a larger im2col than any before): the graph keeps the old block,
     * the context the new one, which eager convolutions then share with the graph's replays (scratch, in stream
     * order); replays stay right around an eager convolution */
    {
        const ck_conv2d_params p = {1, 64, 64, 64, 8, 3, 3, 1, 1, 1, 1, 1, 1};
        const int64_t yn_conv = p.B * p.Cout * ck_conv2d_out_h(&p) * ck_conv2d_out_w(&p);
        std::vector<float> x = rvec(p.B * p.Cin * p.H * p.W), x2 = rvec(x.size()), w = rvec(p.Cout * p.Cin * 9, 0.1f),
                           ref(yn_conv), ref2(yn_conv), ws(ck_conv2d_workspace_floats(&p));
        ck_conv2d_f32(&p, x.data(), w.data(), CK_F32, nullptr, nullptr, ref.data(), ws.data());
        ck_conv2d_f32(&p, x2.data(), w.data(), CK_F32, nullptr, nullptr, ref2.data(), ws.data());
        Dev dx = up(x, CK_F32), dx2 = up(x2, CK_F32), dw = up(w, CK_F32), dy(yn_conv * 4), dy2(yn_conv * 4);
        pea_cuda_graph *conv = nullptr;
        OK(L.pea_cuda_graph_begin(g_ctx));
        OK(L.pea_cuda_conv2d(g_ctx, CK_F32, &p, dx.p, dw.p, nullptr, nullptr, dy.p));
        OK(L.pea_cuda_graph_end(g_ctx, &conv));
        OK(L.pea_cuda_graph_replay(g_ctx, conv));
        compare("conv2d replayed, workspace grown in the capture", down(dy.p, yn_conv, CK_F32), ref, tol_for(CK_F32));
        OK(L.pea_cuda_conv2d(g_ctx, CK_F32, &p, dx2.p, dw.p, nullptr, nullptr, dy2.p));
        OK(L.pea_cuda_zero(g_ctx, dy.p, yn_conv * 4));
        OK(L.pea_cuda_graph_replay(g_ctx, conv));
        compare("conv2d eager after the capture", down(dy2.p, yn_conv, CK_F32), ref2, tol_for(CK_F32));
        compare("conv2d replayed after an eager conv2d", down(dy.p, yn_conv, CK_F32), ref, tol_for(CK_F32));
        OK(L.pea_cuda_graph_destroy(g_ctx, conv));
    }

    /* what a capture cannot do fails the op, and then the capture, naming the op */
    struct Refused {
        const char *what, *op;
        int (*call)(void *dev);
    } refused[] = {
        {"upload during capture", "upload", [](void *d) { float v = 1; return L.pea_cuda_upload(g_ctx, d, &v, 4); }},
        {"download during capture", "download", [](void *d) { float v; return L.pea_cuda_download(g_ctx, &v, d, 4); }},
        {"synchronize during capture", "synchronize", [](void *) { return L.pea_cuda_synchronize(g_ctx); }},
        {"profile_start during capture", "profile_start", [](void *) { return L.pea_cuda_profile_start(g_ctx); }},
        {"release_cache during capture", "release_cache", [](void *) { return L.pea_cuda_release_cache(g_ctx); }},
    };
    for (const Refused &r : refused) {
        OK(L.pea_cuda_graph_begin(g_ctx));
        int rc = r.call(gx.p);
        CHECK(rc != PEA_CUDA_OK && strstr(L.pea_cuda_last_error(g_ctx), "capture"), "%s: rc %d, \"%s\"", r.what, rc,
              L.pea_cuda_last_error(g_ctx));
        pea_cuda_graph *none = (pea_cuda_graph *)&rc;
        expect_error(fmt("%s fails the capture", r.what), L.pea_cuda_graph_end(g_ctx, &none), PEA_CUDA_ERROR_KERNEL,
                     "graph_end");
        CHECK(none == nullptr && strstr(L.pea_cuda_last_error(g_ctx), r.op), "graph_end names %s: \"%s\"", r.op,
              L.pea_cuda_last_error(g_ctx));
    }
    expect_error("graph_end without a capture", L.pea_cuda_graph_end(g_ctx, &graph), PEA_CUDA_ERROR_INVALID,
                 "graph_end");
    OK(L.pea_cuda_graph_begin(g_ctx));
    expect_error("graph_begin twice", L.pea_cuda_graph_begin(g_ctx), PEA_CUDA_ERROR_INVALID, "graph_begin");
    expect_error("... fails that capture", L.pea_cuda_graph_end(g_ctx, &graph), PEA_CUDA_ERROR_KERNEL, "graph_end");
    OK(L.pea_cuda_graph_begin(g_ctx));
    OK(L.pea_cuda_graph_end(g_ctx, &graph)); /* an empty graph */
    OK(L.pea_cuda_graph_replay(g_ctx, graph));
    OK(L.pea_cuda_graph_destroy(g_ctx, graph));
    OK(L.pea_cuda_graph_destroy(g_ctx, nullptr));
    /* the eager path still works after all that */
    graph_step(m, gx.p, ey.p, nullptr);
    got = down(ey.p, yn, CK_F32);
    same_bytes("eager after the failed captures", got.data(), ref2.data(), yn * 4);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Backward ops (training through the frozen UNet): each against its ck_*_backward_f32 reference          */

static void test_backward_elementwise() {
    g_phase = "backward elementwise";
    const int64_t sizes[] = {1, 1000, 4097, 100003};
    for (int t : kFloatTypes) {
        for (int64_t n : sizes) {
            std::vector<float> x = rounded(rvec(n, 4.0f), t), dy = rounded(rvec(n, 1.5f), t);
            Dev dx = up(x, t), ddy = up(dy, t), dgx(n * tsize(t));
            for (int kind = 0; kind < CK_ACT_COUNT; kind++) {
                if (!CK_ACT_HAS_BACKWARD(kind)) continue;
                std::vector<float> ref(n);
                ck_activation_backward_f32(kind, dy.data(), x.data(), ref.data(), n);
                OK(L.pea_cuda_activation_backward(g_ctx, t, kind, ddy.p, dx.p, dgx.p, n));
                compare(fmt("activation_backward %d n=%lld %s", kind, (long long)n, tname(t)), down(dgx.p, n, t), ref,
                        tol_for(t));
            }
        }
        /* misaligned views (scalar path) and dx written over dy */
        {
            const int64_t n = 1001;
            std::vector<float> x = rounded(rvec(n, 3.0f), t), dy = rounded(rvec(n), t), ref(n - 1);
            ck_activation_backward_f32(CK_ACT_GELU_ERF, dy.data() + 1, x.data() + 1, ref.data(), n - 1);
            Dev dx = up(x, t), ddy = up(dy, t);
            OK(L.pea_cuda_activation_backward(g_ctx, t, PEA_ACT_GELU_ERF, ddy.at(tsize(t)), dx.at(tsize(t)),
                                              ddy.at(tsize(t)), n - 1));
            std::vector<float> got = down(ddy.p, n, t);
            compare(fmt("gelu backward on views at offset 1, in place %s", tname(t)),
                    std::vector<float>(got.begin() + 1, got.end()), ref, tol_for(t));
        }
        /* GEGLU */
        const int64_t shapes[][2] = {{3, 77}, {1, 1}, {65, 320}, {200, 3}};
        for (auto &sh : shapes) {
            const int64_t R = sh[0], D = sh[1];
            std::vector<float> x = rounded(rvec(R * 2 * D, 3.0f), t), dy = rounded(rvec(R * D), t), ref(R * 2 * D);
            ck_geglu_backward_f32(dy.data(), x.data(), ref.data(), R, D);
            Dev dx = up(x, t), ddy = up(dy, t), dgx(R * 2 * D * tsize(t));
            OK(L.pea_cuda_geglu_backward(g_ctx, t, ddy.p, dx.p, dgx.p, R, D));
            compare(fmt("geglu_backward R=%lld D=%lld %s", (long long)R, (long long)D, tname(t)),
                    down(dgx.p, R * 2 * D, t), ref, tol_for(t));
        }
        /* upsample: each dx the sum of its 2×2 block (the CPU's order: exact in f32) */
        const int64_t ups[][3] = {{3, 5, 7}, {1, 1, 1}, {2, 8, 8}, {130, 3, 1}};
        for (auto &u : ups) {
            const int64_t P = u[0], H = u[1], W = u[2];
            std::vector<float> dy = rounded(rvec(4 * P * H * W), t), ref(P * H * W);
            ck_upsample_nearest2x_backward_f32(dy.data(), ref.data(), P, H, W);
            Dev ddy = up(dy, t), dgx(P * H * W * tsize(t));
            OK(L.pea_cuda_upsample_nearest2x_backward(g_ctx, t, ddy.p, dgx.p, P, H, W));
            compare(fmt("upsample_backward P=%lld H=%lld W=%lld %s", (long long)P, (long long)H, (long long)W, tname(t)),
                    down(dgx.p, P * H * W, t), ref, t == CK_F32 ? 0.0 : tol_for(t));
        }
    }
    expect_error("activation_backward of quick GELU",
                 L.pea_cuda_activation_backward(g_ctx, CK_F32, PEA_ACT_QUICK_GELU, g_ctx, g_ctx, g_ctx, 4),
                 PEA_CUDA_ERROR_INVALID, "activation_backward");
    expect_error("geglu_backward with a NULL x", L.pea_cuda_geglu_backward(g_ctx, CK_F32, g_ctx, nullptr, g_ctx, 2, 2),
                 PEA_CUDA_ERROR_INVALID, "geglu_backward");
    expect_error("upsample_nearest2x_backward with dtype i32",
                 L.pea_cuda_upsample_nearest2x_backward(g_ctx, CK_I32, g_ctx, g_ctx, 1, 1, 1), PEA_CUDA_ERROR_INVALID,
                 "upsample_nearest2x_backward");
}

static void test_backward_norms() {
    g_phase = "backward norms";
    struct GN {
        int64_t B, C, S, G;
        float offset;
    };
    const GN gns[] = {{2, 6, 35, 3, 0.0f}, {1, 64, 16, 32, 0.0f}, {2, 32, 64, 32, 1000.0f}, {1, 4, 1, 4, 0.0f},
                      {3, 12, 13, 1, -3.0f}, {1, 20, 1000, 4, 0.0f}, {9, 8, 36, 2, 50.0f}};
    for (int t : kFloatTypes)
        for (const GN &g : gns)
            for (int affine = 0; affine <= 1; affine++)
                for (int silu = 0; silu <= 1; silu++) {
                    const size_t n = g.B * g.C * g.S;
                    std::vector<float> x = rounded(rvec(n, 2.0f, g.offset), t), dy = rounded(rvec(n), t);
                    std::vector<float> gamma = rounded(rvec(g.C, 0.5f, 1.0f), t), beta = rounded(rvec(g.C), t);
                    std::vector<float> ref(n);
                    ck_group_norm_backward_f32(dy.data(), x.data(), affine ? gamma.data() : nullptr,
                                               affine ? beta.data() : nullptr, ref.data(), g.B, g.C, g.S, g.G, 1e-5f,
                                               silu);
                    Dev dx = up(x, t), ddy = up(dy, t), dg = up(gamma, t), db = up(beta, t), dgx(n * tsize(t));
                    OK(L.pea_cuda_group_norm_backward(g_ctx, t, ddy.p, dx.p, affine ? dg.p : nullptr,
                                                      affine ? db.p : nullptr, dgx.p, g.B, g.C, g.S, g.G, 1e-5f, silu));
                    double tol = tol_for(t) * (g.offset >= 100.0f && t == CK_F32 ? 10.0 : 1.0);
                    compare(fmt("group_norm_backward B=%lld C=%lld S=%lld G=%lld mean≈%g affine=%d silu=%d %s",
                                (long long)g.B, (long long)g.C, (long long)g.S, (long long)g.G, g.offset, affine, silu,
                                tname(t)),
                            down(dgx.p, n, t), ref, tol);
                }
    /* the split path (fewer groups than the emulator's 16 SMs, nq = Cg·S/V ≥ 512 vectors; the forward's chunks):
     * [1,20,1000] G=4 above (f16 2 chunks, the last partial), chunks of 4 vectors per thread with a partial last
     * one ([2,12,6000] G=4), exact chunks with a large mean ([1,4,4096] G=2), more than 32 chunks per group
     * ([1,2,69632] G=1: f16 28, f32 34); and a group too small to split ([1,8,512] G=4: one block per group) */
    const GN paths[] = {{2, 12, 6000, 4, -2.0f}, {1, 4, 4096, 2, 500.0f}, {1, 2, 69632, 1, 1.0f}, {1, 8, 512, 4, 0.0f}};
    for (int t : kFloatTypes)
        for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++)
            for (int silu = 0; silu <= 1; silu++) {
                const GN &g = paths[i];
                const int affine = (i + silu) % 2 == 0;
                const size_t n = g.B * g.C * g.S;
                std::vector<float> x = rounded(rvec(n, 2.0f, g.offset), t), dy = rounded(rvec(n), t);
                std::vector<float> gamma = rounded(rvec(g.C, 0.5f, 1.0f), t), beta = rounded(rvec(g.C), t);
                std::vector<float> ref(n);
                ck_group_norm_backward_f32(dy.data(), x.data(), affine ? gamma.data() : nullptr,
                                           affine ? beta.data() : nullptr, ref.data(), g.B, g.C, g.S, g.G, 1e-5f, silu);
                Dev dx = up(x, t), ddy = up(dy, t), dg = up(gamma, t), db = up(beta, t), dgx(n * tsize(t));
                OK(L.pea_cuda_group_norm_backward(g_ctx, t, ddy.p, dx.p, affine ? dg.p : nullptr,
                                                  affine ? db.p : nullptr, dgx.p, g.B, g.C, g.S, g.G, 1e-5f, silu));
                double tol = tol_for(t) * (g.offset >= 100.0f && t == CK_F32 ? 10.0 : 1.0);
                compare(fmt("group_norm_backward path B=%lld C=%lld S=%lld G=%lld mean≈%g affine=%d silu=%d %s",
                            (long long)g.B, (long long)g.C, (long long)g.S, (long long)g.G, g.offset, affine, silu,
                            tname(t)),
                        down(dgx.p, n, t), ref, tol);
            }
    /* layer norm: dx, and dγ/dβ as column sums (both, one of them, none) */
    const int64_t lns[][2] = {{5, 77}, {1, 1}, {33, 320}, {3, 1000}, {17, 8}, {300, 40}};
    for (int t : kFloatTypes)
        for (auto &l : lns)
            for (int affine = 0; affine <= 1; affine++)
                for (int params = 0; params <= 3; params++) { /* bit 0: dγ, bit 1: dβ */
                    const int64_t R = l[0], D = l[1];
                    std::vector<float> x = rounded(rvec(R * D, 3.0f, 1.0f), t), dy = rounded(rvec(R * D), t),
                                       gamma = rounded(rvec(D, 0.5f, 1.0f), t), ref(R * D), rg(D), rb(D);
                    ck_layer_norm_backward_f32(dy.data(), x.data(), affine ? gamma.data() : nullptr, ref.data(),
                                               params & 1 ? rg.data() : nullptr, params & 2 ? rb.data() : nullptr, R, D,
                                               1e-5f);
                    Dev dx = up(x, t), ddy = up(dy, t), dg = up(gamma, t), dgx(R * D * tsize(t)), ddg(D * tsize(t)),
                        ddb(D * tsize(t));
                    OK(L.pea_cuda_layer_norm_backward(g_ctx, t, ddy.p, dx.p, affine ? dg.p : nullptr, dgx.p,
                                                      params & 1 ? ddg.p : nullptr, params & 2 ? ddb.p : nullptr, R, D,
                                                      1e-5f));
                    const char *what = fmt("layer_norm_backward R=%lld D=%lld affine=%d%s%s", (long long)R,
                                           (long long)D, affine, params & 1 ? " +dgamma" : "",
                                           params & 2 ? " +dbeta" : "");
                    std::string base = what;
                    compare((base + " dx " + tname(t)).c_str(), down(dgx.p, R * D, t), ref, tol_for(t));
                    if (params & 1) compare((base + " dgamma " + tname(t)).c_str(), down(ddg.p, D, t), rg, tol_for(t));
                    if (params & 2) compare((base + " dbeta " + tname(t)).c_str(), down(ddb.p, D, t), rb, tol_for(t));
                }
    /* no rows: dγ = dβ = 0 (overwritten, not left as they were) */
    {
        std::vector<float> ones(7, 1.0f);
        Dev ddg = up(ones, CK_F32), ddb = up(ones, CK_F32);
        OK(L.pea_cuda_layer_norm_backward(g_ctx, CK_F32, nullptr, nullptr, nullptr, nullptr, ddg.p, ddb.p, 0, 7, 1e-5f));
        compare("layer_norm_backward R=0: dgamma zeroed", down(ddg.p, 7, CK_F32), std::vector<float>(7, 0.0f), 0.0);
        compare("layer_norm_backward R=0: dbeta zeroed", down(ddb.p, 7, CK_F32), std::vector<float>(7, 0.0f), 0.0);
    }
    /* softmax: from the forward's output y (with an all −∞ row → y = 0 → dx = 0) */
    const int64_t sms[][2] = {{7, 1}, {7, 33}, {5, 300}, {1, 4096}, {40, 77}};
    for (int t : kFloatTypes)
        for (auto &sm : sms)
            for (int inplace = 0; inplace <= 1; inplace++) {
                const int64_t R = sm[0], D = sm[1];
                std::vector<float> x = rvec(R * D, 8.0f), y(R * D);
                if (R > 2) {
                    for (int64_t d = 0; d < D; d++) x[1 * D + d] = -INFINITY;
                    for (int64_t d = 0; d < D; d += 2) x[2 * D + d] = -INFINITY;
                }
                ck_softmax_f32(x.data(), y.data(), R, D);
                y = rounded(y, t);
                std::vector<float> dy = rounded(rvec(R * D), t), ref(R * D);
                ck_softmax_backward_f32(dy.data(), y.data(), ref.data(), R, D);
                Dev dyv = up(y, t), ddy = up(dy, t), dgx(R * D * tsize(t));
                void *out = inplace ? ddy.p : dgx.p;
                OK(L.pea_cuda_softmax_backward(g_ctx, t, ddy.p, dyv.p, out, R, D));
                compare(fmt("softmax_backward R=%lld D=%lld%s %s", (long long)R, (long long)D,
                            inplace ? " in place" : "", tname(t)),
                        down(out, R * D, t), ref, tol_for(t));
            }
    expect_error("group_norm_backward with C % G != 0",
                 L.pea_cuda_group_norm_backward(g_ctx, CK_F32, g_ctx, g_ctx, nullptr, nullptr, g_ctx, 1, 6, 4, 4, 1e-5f, 0),
                 PEA_CUDA_ERROR_INVALID, "group_norm_backward");
    expect_error("group_norm_backward with a NULL dy",
                 L.pea_cuda_group_norm_backward(g_ctx, CK_F32, nullptr, g_ctx, nullptr, nullptr, g_ctx, 1, 4, 4, 2, 1e-5f, 0),
                 PEA_CUDA_ERROR_INVALID, "group_norm_backward");
    expect_error("layer_norm_backward with D < 0",
                 L.pea_cuda_layer_norm_backward(g_ctx, CK_F32, g_ctx, g_ctx, nullptr, g_ctx, nullptr, nullptr, 1, -2, 1e-5f),
                 PEA_CUDA_ERROR_INVALID, "layer_norm_backward");
    expect_error("softmax_backward with dtype i64", L.pea_cuda_softmax_backward(g_ctx, CK_I64, g_ctx, g_ctx, g_ctx, 1, 2),
                 PEA_CUDA_ERROR_INVALID, "softmax_backward");
}

static void run_conv_backward(const ck_conv2d_params &p, int t, const char *label) {
    const int64_t Ho = ck_conv2d_out_h(&p), Wo = ck_conv2d_out_w(&p);
    const int64_t nx = p.B * p.Cin * p.H * p.W;
    std::vector<float> dy = rounded(rvec(p.B * p.Cout * Ho * Wo), t), w = rounded(rvec(p.Cout * p.Cin * p.kh * p.kw, 0.5f), t),
                       ref(nx);
    std::vector<float> ws(std::max<int64_t>(1, ck_conv2d_workspace_floats(&p)));
    ck_conv2d_backward_data_f32(&p, dy.data(), w.data(), CK_F32, ref.data(), ws.data());
    Dev ddy = up(dy, t), dw = up(w, t);
    /* dx starts as NaN: every element must be written */
    Dev ddx = up(std::vector<float>(nx, NAN), t);
    OK(L.pea_cuda_conv2d_backward_data(g_ctx, t, &p, ddy.p, dw.p, ddx.p));
    compare(fmt("conv2d_backward_data %s B=%lld Cin=%lld %lldx%lld Cout=%lld k=%lldx%lld s=%lldx%lld "
                "pad=%lld/%lld/%lld/%lld %s",
                label, (long long)p.B, (long long)p.Cin, (long long)p.H, (long long)p.W, (long long)p.Cout,
                (long long)p.kh, (long long)p.kw, (long long)p.strideH, (long long)p.strideW, (long long)p.padTop,
                (long long)p.padBottom, (long long)p.padLeft, (long long)p.padRight, tname(t)),
            down(ddx.p, nx, t), ref, tol_for(t));
}

static void test_backward_conv2d() {
    g_phase = "backward conv2d";
    std::vector<ck_conv2d_params> ps = {
        {2, 5, 9, 11, 7, 3, 3, 1, 1, 1, 1, 1, 1},  /* 3×3, pad 1 */
        {2, 4, 9, 10, 6, 3, 3, 2, 2, 0, 1, 0, 1},  /* the VAE downsampler: stride 2, pad right/bottom only */
        {3, 6, 5, 7, 4, 1, 1, 1, 1, 0, 0, 0, 0},   /* 1×1: straight to GEMM */
        {1, 3, 8, 8, 5, 1, 1, 2, 2, 0, 0, 0, 0},   /* 1×1 stride 2: input pixels no output reads get 0 */
        {2, 3, 7, 6, 2, 4, 3, 1, 2, 2, 1, 0, 2},   /* odd kernel, mixed strides, asymmetric pads */
        {1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0},   /* one element */
        {1, 2, 9, 9, 3, 2, 2, 3, 3, 0, 0, 0, 0},   /* stride larger than the kernel: gaps */
        {17, 2, 4, 4, 3, 3, 3, 1, 1, 1, 1, 1, 1},  /* larger batch */
        {2, 3, 5, 5, 0, 3, 3, 1, 1, 1, 1, 1, 1},   /* no output channels: dx = 0 */
    };
    for (int t : kFloatTypes)
        for (const auto &p : ps) run_conv_backward(p, t, "");
    /* steady state: the workspace is reused */
    uint64_t a0 = 0, a1 = 0;
    run_conv_backward(ps[0], CK_F32, "warm-up");
    OK(L.pea_cuda_memory_stats(g_ctx, nullptr, nullptr, &a0));
    for (int i = 0; i < 3; i++) run_conv_backward(ps[0], CK_F32, "repeat");
    OK(L.pea_cuda_memory_stats(g_ctx, nullptr, nullptr, &a1));
    CHECK(a0 == a1, "conv2d_backward_data steady state: %llu → %llu device allocations", (unsigned long long)a0,
          (unsigned long long)a1);
    ck_conv2d_params bad = {1, 2, 2, 2, 1, 5, 5, 1, 1, 0, 0, 0, 0};
    expect_error("conv2d_backward_data with a kernel larger than the input",
                 L.pea_cuda_conv2d_backward_data(g_ctx, CK_F32, &bad, g_ctx, g_ctx, g_ctx), PEA_CUDA_ERROR_INVALID,
                 "conv2d_backward_data");
    expect_error("conv2d_backward_data with NULL params",
                 L.pea_cuda_conv2d_backward_data(g_ctx, CK_F32, nullptr, g_ctx, g_ctx, g_ctx), PEA_CUDA_ERROR_INVALID,
                 "conv2d_backward_data");
    ck_conv2d_params ok = {1, 2, 4, 4, 1, 3, 3, 1, 1, 1, 1, 1, 1};
    expect_error("conv2d_backward_data with a NULL w",
                 L.pea_cuda_conv2d_backward_data(g_ctx, CK_F32, &ok, g_ctx, nullptr, g_ctx), PEA_CUDA_ERROR_INVALID,
                 "conv2d_backward_data");
}

/* The data gradient under a tiny workspace limit: whole-image groups and column chunks of one image. */
static void test_backward_conv2d_chunked() {
    g_phase = "backward conv2d chunked";
    pea_cuda_context *saved = g_ctx;
    char msg[256];
    setenv("PEA_CUDA_CONV_WORKSPACE_BYTES", "2000", 1);
    pea_cuda_context *small = nullptr;
    int rc = L.pea_cuda_create(0, &small, msg, sizeof msg);
    unsetenv("PEA_CUDA_CONV_WORKSPACE_BYTES");
    CHECK(rc == PEA_CUDA_OK, "create: %s", msg);
    if (rc) return;
    g_ctx = small;
    /* K = 18, N = 63 per image: 27 (f32) / 55 (f16) columns per chunk, chunks that end inside an output row */
    ck_conv2d_params p = {3, 2, 7, 9, 4, 3, 3, 1, 1, 1, 1, 1, 1};
    for (int t : kFloatTypes) run_conv_backward(p, t, "column chunks");
    /* stride 2, kernel 5, asymmetric padding: a chunk's rows reach input rows of its neighbours */
    ck_conv2d_params s = {2, 3, 11, 10, 2, 5, 5, 2, 2, 2, 1, 0, 2};
    for (int t : kFloatTypes) run_conv_backward(s, t, "column chunks, stride 2");
    /* K = 4, N = 16: 7 whole f32 images per group, so 10 images take two groups */
    ck_conv2d_params q = {10, 1, 5, 5, 3, 2, 2, 1, 1, 0, 0, 0, 0};
    for (int t : kFloatTypes) run_conv_backward(q, t, "image groups");
    L.pea_cuda_destroy(small);
    g_ctx = saved;
}

/* SD-sized blocks backwards: a ResNet block's group norm + SiLU and convolutions, a transformer block's norms */
static void test_backward_sd_like() {
    g_phase = "backward sd-like shapes";
    for (int t : {CK_F32, CK_F16}) {
        const int64_t B = 2, C = 320, H = 12, W = 12, S = H * W;
        std::vector<float> x = rounded(rvec(B * C * S, 2.0f, 0.3f), t), dy = rounded(rvec(B * C * S), t),
                           gamma = rounded(rvec(C, 0.5f, 1.0f), t), beta = rounded(rvec(C), t), ref(x.size());
        ck_group_norm_backward_f32(dy.data(), x.data(), gamma.data(), beta.data(), ref.data(), B, C, S, 32, 1e-5f, 1);
        Dev dx = up(x, t), ddy = up(dy, t), dg = up(gamma, t), db = up(beta, t), dgx(x.size() * tsize(t));
        OK(L.pea_cuda_group_norm_backward(g_ctx, t, ddy.p, dx.p, dg.p, db.p, dgx.p, B, C, S, 32, 1e-5f, 1));
        compare(fmt("group_norm+silu backward B=2 C=320 12x12 G=32 %s", tname(t)), down(dgx.p, x.size(), t), ref,
                tol_for(t));
        ck_conv2d_params p = {B, C, H, W, 64, 3, 3, 1, 1, 1, 1, 1, 1};
        run_conv_backward(p, t, "resnet 3x3");
        ck_conv2d_params q = {B, C, H, W, 96, 1, 1, 1, 1, 0, 0, 0, 0};
        run_conv_backward(q, t, "resnet 1x1");
        const int64_t R = 2 * 77, D = 768;
        std::vector<float> lx = rounded(rvec(R * D, 2.0f, 0.5f), t), ldy = rounded(rvec(R * D), t),
                           lg = rounded(rvec(D, 0.5f, 1.0f), t), lref(R * D), rg(D), rb(D);
        ck_layer_norm_backward_f32(ldy.data(), lx.data(), lg.data(), lref.data(), rg.data(), rb.data(), R, D, 1e-5f);
        Dev dlx = up(lx, t), dldy = up(ldy, t), dlg = up(lg, t), dlgx(R * D * tsize(t)), ddg(D * tsize(t)),
            ddb(D * tsize(t));
        OK(L.pea_cuda_layer_norm_backward(g_ctx, t, dldy.p, dlx.p, dlg.p, dlgx.p, ddg.p, ddb.p, R, D, 1e-5f));
        compare(fmt("layer_norm_backward adapter [2,77,768] dx %s", tname(t)), down(dlgx.p, R * D, t), lref, tol_for(t));
        compare(fmt("layer_norm_backward adapter [2,77,768] dgamma %s", tname(t)), down(ddg.p, D, t), rg, tol_for(t));
        compare(fmt("layer_norm_backward adapter [2,77,768] dbeta %s", tname(t)), down(ddb.p, D, t), rb, tol_for(t));
    }
}

/* ---------------------------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    const char *path = "./libpea_cuda_emu.so";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-v")) g_verbose = true;
        else path = argv[i];
    }
    if (getenv("PEA_TEST_VERBOSE")) g_verbose = true;
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "FAIL: dlopen %s: %s\n", path, dlerror());
        return 1;
    }
#define RESOLVE(name)                                                                                  \
    L.name.fn = (decltype(L.name.fn))dlsym(lib, #name);                                                \
    if (!L.name.fn) {                                                                                  \
        fprintf(stderr, "FAIL: %s does not export %s\n", path, #name);                                 \
        return 1;                                                                                      \
    }
    PEA_CUDA_FUNCTIONS(RESOLVE, RESOLVE)
#undef RESOLVE
    L.emu_set_quiet = (void (*)(int))dlsym(lib, "pea_emu_set_quiet");
    L.emu_set_schedule = (void (*)(int, unsigned long long))dlsym(lib, "pea_emu_set_schedule");
    L.emu_lt_heuristic_queries = (long long (*)(void))dlsym(lib, "pea_emu_cublaslt_heuristic_queries");
    g_emu = L.emu_set_quiet != nullptr && L.emu_set_schedule != nullptr;
    printf("== cuda ops: %s (%s)\n", path, g_emu ? "SIMT emulator" : "GPU");
    fflush(stdout);

    char msg[512];
    if (L.pea_cuda_create(0, &g_ctx, msg, sizeof msg) != PEA_CUDA_OK) {
        fprintf(stderr, "FAIL: pea_cuda_create: %s\n", msg);
        return 1;
    }
    struct Step {
        const char *name;
        void (*fn)();
    };
    const Step steps[] = {
        {"context", test_context},
        {"memory", test_memory},
        {"timer", test_timer},
        {"upload/download", test_copies},
        {"convert", test_convert},
        {"copy_strided", test_copy_strided},
        {"binary", test_binary},
        {"elementwise", test_elementwise},
        {"embedding", test_embedding},
        {"timestep_embedding", test_timestep_embedding},
        {"gemm", test_gemm},
        {"linear", test_linear},
        {"linear plans", test_linear_plans},
        {"profile", test_profile},
        {"optimizer", test_optimizer},
        {"collective", test_collective},
        {"conv2d", test_conv2d},
        {"conv2d implicit GEMM", test_conv2d_implicit_gemm},
        {"conv2d chunked", [] { test_conv2d_chunked(nullptr); }},
        {"conv2d 64-bit indices", test_conv2d_index64},
        {"norms", test_norms},
        {"attention", [] { test_attention(false); }},
        {"sd-like shapes", test_sd_like},
        {"graphs", test_graphs},
        {"backward elementwise", test_backward_elementwise},
        {"backward norms", test_backward_norms},
        {"backward conv2d", test_backward_conv2d},
        {"backward conv2d chunk", test_backward_conv2d_chunked},
        {"backward sd-like", test_backward_sd_like},
        {"backward attention", test_attention_backward},
    };
    const char *only = getenv("PEA_TEST_ONLY"); /* run the steps whose name contains this (and no reorderings) */
    for (const Step &s : steps) {
        if (only && !strstr(s.name, only)) continue;
        const int before = g_failures, checks = g_checks;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        s.fn();
        clock_gettime(CLOCK_MONOTONIC, &t1);
        printf("%-4s %-22s %5d checks  %6.2f s\n", g_failures == before ? "ok" : "FAIL", s.name, g_checks - checks,
               (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec));
        fflush(stdout);
    }
    if (g_emu && !only) { /* the kernels with block barriers and shared memory, under the other fiber orders */
        const char *orders[] = {"reverse", "random"};
        for (int o = 1; o <= 2; o++) {
            const int before = g_failures, checks = g_checks;
            L.emu_set_schedule(o, 7 + o);
            test_norms();
            test_backward_norms();
            test_attention(true);
            test_attention_backward();
            L.emu_set_schedule(0, 0);
            printf("%-4s %-22s %5d checks\n", g_failures == before ? "ok" : "FAIL",
                   (std::string("norms(+bw)+attention(+bw) ") + orders[o - 1]).c_str(), g_checks - checks);
        }
    }
    L.pea_cuda_destroy(g_ctx);
    if (!only) { /* the list is the contract: every function on it has a test above */
#define UNCALLED(name)                                                                                 \
    if (L.name.calls == 0) {                                                                           \
        fprintf(stderr, "FAIL: no test calls %s (pea_cuda.h's PEA_CUDA_FUNCTIONS lists it)\n", #name); \
        g_failures++;                                                                                  \
    }
        PEA_CUDA_FUNCTIONS(UNCALLED, UNCALLED)
#undef UNCALLED
    }
    if (g_failures) {
        fprintf(stderr, "cuda ops: %d of %d checks FAILED\n", g_failures, g_checks);
        return 1;
    }
    printf("cuda ops: all %d checks passed\n", g_checks);
    return 0;
}
