/*
 * test_dlopen.c — libpea_cuda_emu.so loads the way the Swift CUDA backend loads libpea_cuda.so: dlopen,
 * dlsym by name, plain C calls. (A C program: it sees none of the emulator's headers.)
 * Usage: test_dlopen path/to/libpea_cuda_emu.so
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "./libpea_cuda_emu.so";
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "FAIL: dlopen %s: %s\n", path, dlerror());
        return 1;
    }
    int (*get_count)(int *) = (int (*)(int *))dlsym(lib, "cudaGetDeviceCount");
    int (*dev_malloc)(void **, size_t) = (int (*)(void **, size_t))dlsym(lib, "cudaMalloc");
    int (*dev_free)(void *) = (int (*)(void *))dlsym(lib, "cudaFree");
    int (*copy)(void *, const void *, size_t, int) = (int (*)(void *, const void *, size_t, int))dlsym(lib, "cudaMemcpy");
    if (!get_count || !dev_malloc || !dev_free || !copy) {
        fprintf(stderr, "FAIL: %s lacks the CUDA runtime entry points\n", path);
        return 1;
    }
    int n = -1;
    float in[4] = {1, 2, 3, 4}, out[4] = {0};
    void *d = NULL;
    if (get_count(&n) != 0 || n != 1 || dev_malloc(&d, sizeof in) != 0 || copy(d, in, sizeof in, 1) != 0 ||
        copy(out, d, sizeof out, 2) != 0 || memcmp(in, out, sizeof in) != 0 || dev_free(d) != 0) {
        fprintf(stderr, "FAIL: calls through dlsym (device count %d)\n", n);
        return 1;
    }
    printf("== emu dlopen\nok   %s: dlopen, dlsym, 1 device, a round trip through device memory\n", path);
    dlclose(lib);
    return 0;
}
