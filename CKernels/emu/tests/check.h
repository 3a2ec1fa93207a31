/* check.h — the emulator tests' assertions: CHECK(cond, fmt, …) reports and counts a failure and goes on;
 * main returns check_summary(). A watchdog turns a hang into a failure. */
#ifndef PEA_EMU_CHECK_H
#define PEA_EMU_CHECK_H

#include <cuda_runtime.h>

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <string>
#include <vector>

static int g_checks = 0, g_failures = 0;

#define CHECK(cond, ...)                                                                               \
    do {                                                                                               \
        g_checks++;                                                                                    \
        if (!(cond)) {                                                                                 \
            g_failures++;                                                                              \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                            \
            fprintf(stderr, __VA_ARGS__);                                                              \
            fputc('\n', stderr);                                                                       \
        }                                                                                              \
    } while (0)

/* A CUDA call that must succeed. */
#define CUDA_OK(call)                                                                                  \
    do {                                                                                               \
        cudaError_t e_ = (call);                                                                       \
        CHECK(e_ == cudaSuccess, "%s returned %s: %s", #call, cudaGetErrorName(e_), pea_emu_last_message()); \
    } while (0)

static void on_watchdog(int) {
    const char msg[] = "FAIL: the test did not finish in time (a hang?)\n";
    ssize_t r = write(2, msg, sizeof msg - 1);
    (void)r;
    _exit(2);
}

static void check_start(const char *name, unsigned seconds) {
    signal(SIGALRM, on_watchdog);
    alarm(seconds);
    printf("== %s\n", name);
    fflush(stdout);
}

static int check_summary(const char *name) {
    if (g_failures) fprintf(stderr, "%s: %d of %d checks FAILED\n", name, g_failures, g_checks);
    else printf("%s: all %d checks passed\n", name, g_checks);
    return g_failures ? 1 : 0;
}

static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* Device buffers. */
template <class T>
static T *to_device(const std::vector<T> &h) {
    T *d = nullptr;
    CUDA_OK(cudaMalloc(&d, h.size() * sizeof(T)));
    CUDA_OK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
template <class T>
static T *device_alloc(size_t n) {
    T *d = nullptr;
    CUDA_OK(cudaMalloc(&d, n * sizeof(T)));
    return d;
}
template <class T>
static std::vector<T> to_host(const T *d, size_t n) {
    std::vector<T> h(n);
    CUDA_OK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

/* Deterministic inputs in [-1, 1). */
static std::vector<float> random_vector(size_t n, unsigned seed) {
    std::vector<float> v(n);
    unsigned long long s = seed * 2654435761ull + 1;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = (float)((s >> 40) & 0xffffff) / (float)(1 << 23) - 1.0f;
    }
    return v;
}

#endif
