/*
 * test_samples.cpp — the sample kernels (CKernels/cuda/samples/samples.cu), run by the emulator, against
 * plain C references; then the planted bugs (planted_bugs.cu), each of which the emulated run must catch:
 * as a launch error that names the kernel, or as wrong results. Everything runs under the three fiber
 * orders (forward, reverse, random), so a result does not hang on one lucky interleaving.
 */
#include "../../cuda/samples/samples.h"
#include "check.h"

#include <cmath>

/* The kernel from samples.cu, for cudaFuncSetAttribute. */
void softmax_online_kernel(const float *x, float *y, int D);

static const char *kOrder[] = {"forward", "reverse", "random"};

/* ---------------------------------------------------------------------------------------------------- */
/* References (double accumulation)                                                                      */

static std::vector<double> gemm_ref(const std::vector<float> &A, const std::vector<float> &B, int M, int N, int K) {
    std::vector<double> C((size_t)M * N);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int k = 0; k < K; k++) s += (double)A[(size_t)i * K + k] * B[(size_t)k * N + j];
            C[(size_t)i * N + j] = s;
        }
    return C;
}

static std::vector<double> row_sum_ref(const std::vector<float> &x, int R, int D) {
    std::vector<double> out(R);
    for (int r = 0; r < R; r++) {
        double s = 0;
        for (int d = 0; d < D; d++) s += x[(size_t)r * D + d];
        out[r] = s;
    }
    return out;
}

static std::vector<double> softmax_ref(const std::vector<float> &x, int R, int D) {
    std::vector<double> y((size_t)R * D);
    for (int r = 0; r < R; r++) {
        double m = -INFINITY, s = 0;
        for (int d = 0; d < D; d++) m = std::max(m, (double)x[(size_t)r * D + d]);
        for (int d = 0; d < D; d++) s += std::exp((double)x[(size_t)r * D + d] - m);
        for (int d = 0; d < D; d++) y[(size_t)r * D + d] = std::exp((double)x[(size_t)r * D + d] - m) / s;
    }
    return y;
}

/* max |got - ref| / max(1, |ref|); a NaN counts as infinitely wrong. */
static double max_err(const std::vector<float> &got, const std::vector<double> &ref, size_t *wrong = nullptr,
                      double tol = 1e-5) {
    double e = 0;
    size_t bad = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        double d = std::fabs((double)got[i] - ref[i]) / std::max(1.0, std::fabs(ref[i]));
        if (std::isnan(d)) d = INFINITY;
        if (d > tol) bad++;
        e = std::max(e, d);
    }
    if (wrong) *wrong = bad;
    return e;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Correct kernels                                                                                       */

static void test_gemm(const char *order) {
    const int shapes[][3] = {{37, 29, 41}, {64, 48, 32}, {1, 1, 1}, {16, 33, 70}, {5, 80, 3}};
    for (auto &s : shapes) {
        int M = s[0], N = s[1], K = s[2];
        std::vector<float> A = random_vector((size_t)M * K, 1), B = random_vector((size_t)K * N, 2);
        float *dA = to_device(A), *dB = to_device(B), *dC = device_alloc<float>((size_t)M * N);
        CUDA_OK(sample_tiled_gemm(dA, dB, dC, M, N, K, 0));
        CUDA_OK(cudaDeviceSynchronize());
        double e = max_err(to_host(dC, (size_t)M * N), gemm_ref(A, B, M, N, K));
        CHECK(e <= 1e-5, "tiled_gemm %dx%dx%d [%s]: max error %g", M, N, K, order, e);
        say("ok   tiled_gemm       M=%-3d N=%-3d K=%-3d [%s] max rel err %.1e", M, N, K, order, e);
        cudaFree(dA);
        cudaFree(dB);
        cudaFree(dC);
    }
}

static void test_row_sum(const char *order) {
    const int cases[][3] = {{7, 1000, 256}, {3, 31, 96}, {2, 1, 32}, {4, 5000, 1024}}; /* R, D, threads */
    for (auto &c : cases) {
        int R = c[0], D = c[1], T = c[2];
        std::vector<float> x = random_vector((size_t)R * D, 3);
        float *dx = to_device(x), *dout = device_alloc<float>(R);
        CUDA_OK(sample_row_sum(dx, dout, R, D, T, 0));
        double e = max_err(to_host(dout, R), row_sum_ref(x, R, D));
        CHECK(e <= 1e-5, "row_sum R=%d D=%d threads=%d [%s]: max error %g", R, D, T, order, e);
        say("ok   row_sum          R=%-3d D=%-4d threads=%-4d [%s] max rel err %.1e", R, D, T, order, e);
        cudaFree(dx);
        cudaFree(dout);
    }
}

static void test_softmax(const char *order) {
    const int cases[][3] = {{5, 777, 128}, {3, 5, 32}, {2, 4096, 1024}, {4, 100, 64}};
    for (auto &c : cases) {
        int R = c[0], D = c[1], T = c[2];
        std::vector<float> x = random_vector((size_t)R * D, 4);
        for (float &v : x) v *= 30.0f; /* large logits: the online rescaling must hold */
        float *dx = to_device(x), *dy = device_alloc<float>((size_t)R * D);
        CUDA_OK(sample_softmax(dx, dy, R, D, T, 0));
        double e = max_err(to_host(dy, (size_t)R * D), softmax_ref(x, R, D));
        CHECK(e <= 1e-5, "softmax R=%d D=%d threads=%d [%s]: max error %g", R, D, T, order, e);
        say("ok   softmax_online   R=%-3d D=%-4d threads=%-4d [%s] max rel err %.1e", R, D, T, order, e);
        cudaFree(dx);
        cudaFree(dy);
    }
}

static void test_column_sum(const char *order) {
    int R = 300, D = 50, blocks = 7;
    std::vector<float> x = random_vector((size_t)R * D, 5);
    float *dx = to_device(x), *dout = device_alloc<float>(D);
    CUDA_OK(cudaMemset(dout, 0, D * sizeof(float)));
    CUDA_OK(sample_column_sum_atomic(dx, dout, R, D, blocks, 0));
    std::vector<double> ref(D, 0.0);
    for (int r = 0; r < R; r++)
        for (int d = 0; d < D; d++) ref[d] += x[(size_t)r * D + d];
    double e = max_err(to_host(dout, D), ref, nullptr, 1e-4);
    CHECK(e <= 1e-4, "column_sum_atomic [%s]: max error %g", order, e);
    say("ok   column_sum_atomic R=%d D=%d blocks=%d [%s] max rel err %.1e", R, D, blocks, order, e);
    cudaFree(dx);
    cudaFree(dout);
}

/* f32 → f16 / bf16 conversions (round to nearest even) against bit patterns worked out by hand. */
static void test_convert() {
    struct {
        uint32_t f;
        uint16_t h, b;
    } cases[] = {
        {0x3f800000u, 0x3c00, 0x3f80}, /* 1 */
        {0xc0000000u, 0xc000, 0xc000}, /* -2 */
        {0x3dcccccdu, 0x2e66, 0x3dcd}, /* 0.1 */
        {0x477fe000u, 0x7bff, 0x4780}, /* 65504, the largest half */
        {0x477ff000u, 0x7c00, 0x4780}, /* 65520: halfway to 65536 → even → inf */
        {0x477fefffu, 0x7bff, 0x4780}, /* just below 65520 */
        {0x33800000u, 0x0001, 0x3380}, /* 2^-24, the smallest half subnormal */
        {0x33000000u, 0x0000, 0x3300}, /* 2^-25: a tie → 0 */
        {0x33400000u, 0x0001, 0x3340}, /* 3·2^-26 = 0.75 units → 1 */
        {0x33c00000u, 0x0002, 0x33c0}, /* 3·2^-25 = 1.5 units: a tie → 2 */
        {0x33a00000u, 0x0001, 0x33a0}, /* 1.25 units → 1 */
        {0x38800000u, 0x0400, 0x3880}, /* 2^-14, the smallest half normal */
        {0x3f801000u, 0x3c00, 0x3f80}, /* 1 + 2^-11: half tie → even; bf16 rounds down */
        {0x3f803000u, 0x3c02, 0x3f80}, /* 1 + 3·2^-11: half tie → even (up) */
        {0x3f808000u, 0x3c04, 0x3f80}, /* 1 + 2^-8: bf16 tie → even (down) */
        {0x3f818000u, 0x3c0c, 0x3f82}, /* 1 + 3·2^-8: bf16 tie → even (up) */
        {0x3f808001u, 0x3c04, 0x3f81}, /* just above the bf16 tie */
        {0x7f7fffffu, 0x7c00, 0x7f80}, /* FLT_MAX: both overflow to inf */
        {0x80000000u, 0x8000, 0x8000}, /* -0 */
        {0x7f800000u, 0x7c00, 0x7f80}, /* inf */
        {0x7fc00000u, 0x7fff, 0x7fff}, /* NaN → canonical */
    };
    int n = (int)(sizeof cases / sizeof cases[0]);
    std::vector<float> x(n);
    for (int i = 0; i < n; i++) memcpy(&x[i], &cases[i].f, 4);
    float *dx = to_device(x), *hb = device_alloc<float>(n), *bb = device_alloc<float>(n);
    __half *dh = device_alloc<__half>(n);
    __nv_bfloat16 *db = device_alloc<__nv_bfloat16>(n);
    CUDA_OK(sample_convert(dx, dh, db, hb, bb, n, 0));
    std::vector<__half> h = to_host(dh, n);
    std::vector<__nv_bfloat16> b = to_host(db, n);
    std::vector<float> hback = to_host(hb, n), bback = to_host(bb, n);
    for (int i = 0; i < n; i++) {
        uint16_t hbits, bbits;
        memcpy(&hbits, &h[i], 2);
        memcpy(&bbits, &b[i], 2);
        CHECK(hbits == cases[i].h, "f32 0x%08x → f16 0x%04x, expected 0x%04x", cases[i].f, hbits, cases[i].h);
        CHECK(bbits == cases[i].b, "f32 0x%08x → bf16 0x%04x, expected 0x%04x", cases[i].f, bbits, cases[i].b);
        uint32_t bb32;
        memcpy(&bb32, &bback[i], 4);
        CHECK(bb32 == (uint32_t)cases[i].b << 16, "bf16 0x%04x → f32 0x%08x", cases[i].b, bb32);
    }
    /* f16 → f32 is exact: spot values */
    CHECK(hback[0] == 1.0f && hback[3] == 65504.0f && hback[6] == 5.9604644775390625e-08f && std::isinf(hback[4]) &&
              std::isnan(hback[20]),
          "f16 → f32");
    say("ok   convert f32 → f16/bf16 (RNE, subnormals, ties, overflow, NaN): %d values", n);
    cudaFree(dx);
    cudaFree(hb);
    cudaFree(bb);
    cudaFree(dh);
    cudaFree(db);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Planted bugs                                                                                          */

/* The launch (or its kernel) must fail with `code`, and the message must contain every `needles`. */
static void expect_error(const char *bug, cudaError_t got, cudaError_t code, std::vector<const char *> needles,
                         const char *order) {
    std::string msg = pea_emu_last_message();
    CHECK(got == code, "planted bug '%s' [%s]: expected %s, got %s (%s)", bug, order, cudaGetErrorName(code),
          cudaGetErrorName(got), msg.c_str());
    for (const char *n : needles)
        CHECK(msg.find(n) != std::string::npos, "planted bug '%s' [%s]: message lacks \"%s\": %s", bug, order, n,
              msg.c_str());
    if (got == code) say("ok   planted bug caught [%s] %s → %s\n       %s", order, bug, cudaGetErrorName(got), msg.c_str());
    /* A kernel failure is also returned by the next synchronising call; then the slate is clean. */
    cudaDeviceSynchronize();
    cudaGetLastError();
    CHECK(cudaDeviceSynchronize() == cudaSuccess && cudaGetLastError() == cudaSuccess, "errors are not cleared");
}

static void test_planted_bugs(const char *order) {
    int M = 32, N = 32, K = 48;
    std::vector<float> A = random_vector((size_t)M * K, 6), B = random_vector((size_t)K * N, 7);
    std::vector<double> C = gemm_ref(A, B, M, N, K);
    float *dA = to_device(A), *dB = to_device(B), *dC = device_alloc<float>((size_t)M * N);
    size_t wrong;

    /* Races: the launch succeeds, the results are wrong. */
    CUDA_OK(bug_gemm_missing_sync(dA, dB, dC, M, N, K, 0));
    max_err(to_host(dC, (size_t)M * N), C, &wrong);
    CHECK(wrong > 0, "planted bug 'missing __syncthreads after the tile loads' [%s] was not exposed", order);
    say("ok   planted bug exposed [%s] missing __syncthreads after the tile loads → %zu of %d outputs wrong", order,
        wrong, M * N);

    CUDA_OK(bug_gemm_missing_second_sync(dA, dB, dC, M, N, K, 0));
    max_err(to_host(dC, (size_t)M * N), C, &wrong);
    CHECK(wrong > 0, "planted bug 'missing __syncthreads before the tiles are overwritten' [%s] was not exposed",
          order);
    say("ok   planted bug exposed [%s] missing __syncthreads before the tiles are overwritten → %zu of %d outputs "
        "wrong",
        order, wrong, M * N);

    expect_error("off-by-one tile index", bug_gemm_off_by_one(dA, dB, dC, M, N, K, 0), cudaErrorIllegalAddress,
                 {"gemm_off_by_one_kernel", "'As'", "[16]"}, order);

    int R = 3, D = 100;
    std::vector<float> x = random_vector((size_t)R * D, 8);
    float *dx = to_device(x), *dout = device_alloc<float>((size_t)R * D);
    expect_error("shuffle with a half-warp lane mask", bug_row_sum_half_mask(dx, dout, R, D, 0),
                 cudaErrorLaunchFailure, {"row_sum_half_mask_kernel", "__shfl_down_sync", "does not name"}, order);
    expect_error("full-mask shuffle in a branch half the warp takes",
                 bug_row_sum_divergent_shuffle(dx, dout, R, D, 0), cudaErrorLaunchFailure,
                 {"row_sum_divergent_shuffle_kernel", "deadlock", "__shfl_xor_sync", "__syncthreads"}, order);
    expect_error("early return before a __syncthreads", bug_row_sum_early_exit(dx, dout, R, 40, 64, 0),
                 cudaErrorLaunchFailure, {"row_sum_early_exit_kernel", "deadlock", "exited"}, order);
    expect_error("__syncthreads in both arms of a divergent branch", bug_barrier_in_branch(dout, 0),
                 cudaErrorLaunchFailure, {"barrier_in_branch_kernel", "divergent barrier"}, order);
    expect_error("dynamic shared memory one warp short", bug_softmax_short_smem(dx, dout, R, D, 128, 0),
                 cudaErrorIllegalAddress, {"softmax_online_kernel", "dynamic shared memory 'stats'"}, order);

    /* A partial last warp: the full-mask shuffles read lanes that do not exist (undefined; NaN here). */
    CUDA_OK(bug_row_sum_partial_warp(dx, dout, R, D, 48, 0));
    std::vector<float> sums = to_host(dout, R);
    max_err(sums, row_sum_ref(x, R, D), &wrong);
    CHECK(wrong > 0, "planted bug 'block of 48 threads with full-warp shuffles' [%s] was not exposed", order);
    say("ok   planted bug exposed [%s] block of 48 threads with full-warp shuffles → %zu of %d sums wrong (%g)", order,
        wrong, R, sums[0]);

    /* The emulator is still sound after all that. */
    CUDA_OK(sample_row_sum(dx, dout, R, D, 64, 0));
    double e = max_err(to_host(dout, R), row_sum_ref(x, R, D));
    CHECK(e <= 1e-5, "row_sum after the planted bugs [%s]: %g", order, e);

    cudaFree(dA);
    cudaFree(dB);
    cudaFree(dC);
    cudaFree(dx);
    cudaFree(dout);
}

static void test_launch_limits() {
    int R = 2, D = 64;
    std::vector<float> x = random_vector((size_t)R * D, 9);
    float *dx = to_device(x), *dy = device_alloc<float>((size_t)R * D);
    expect_error("a 2048-thread block", bug_too_many_threads(dy, 0), cudaErrorInvalidConfiguration,
                 {"barrier_in_branch_kernel", "2048 threads"}, "-");
    expect_error("64 KB of dynamic shared memory without opting in", bug_too_much_smem(dx, dy, R, D, 64, 0),
                 cudaErrorInvalidValue, {"softmax_online_kernel", "65536 bytes", "cudaFuncSetAttribute"}, "-");
    CUDA_OK(cudaFuncSetAttribute(softmax_online_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
    CUDA_OK(bug_too_much_smem(dx, dy, R, D, 64, 0));
    double e = max_err(to_host(dy, (size_t)R * D), softmax_ref(x, R, D));
    CHECK(e <= 1e-5, "softmax with 64 KB after cudaFuncSetAttribute: %g", e);
    say("ok   64 KB of dynamic shared memory launches after cudaFuncSetAttribute (max rel err %.1e)", e);
    cudaFree(dx);
    cudaFree(dy);
}

int main() {
    check_start("emu samples", 300);
    pea_emu_set_quiet(1); /* the test prints the messages it expects */
    pea_emu_set_threads(0);
    say("emulator threads: %d", pea_emu_get_threads());
    for (int order = 0; order < 3; order++) {
        pea_emu_set_schedule(order, 1234);
        test_gemm(kOrder[order]);
        test_row_sum(kOrder[order]);
        test_softmax(kOrder[order]);
        test_column_sum(kOrder[order]);
        test_planted_bugs(kOrder[order]);
    }
    pea_emu_set_schedule(PEA_EMU_FORWARD, 0);
    test_convert();
    test_launch_limits();
    return check_summary("emu samples");
}
