/*
 * pea_cuda_functions.c — pea_cuda.h's function list (PEA_CUDA_FUNCTIONS) as data, for the Swift loader
 * (CUDALibrary binds every symbol of the library from it). Part of the Swift package's CKernels target, not of
 * the CUDA library.
 */
#include "pea_cuda.h"

#define PEA_REQUIRED(name) {#name, 1},
#define PEA_OPTIONAL(name) {#name, 0},
static const struct {
    const char *name;
    int required;
} functions[] = {PEA_CUDA_FUNCTIONS(PEA_REQUIRED, PEA_OPTIONAL)};
#undef PEA_REQUIRED
#undef PEA_OPTIONAL

const char *pea_cuda_function_name(int index, int *required) {
    if (index < 0 || index >= (int)(sizeof functions / sizeof functions[0])) return NULL;
    if (required) *required = functions[index].required;
    return functions[index].name;
}
