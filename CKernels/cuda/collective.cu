// The NCCL all-reduce of `pea train` under mpirun/srun on the CUDA backend: NCCL is loaded at run time with dlopen
// (never linked, so the library builds and runs without it), its communicator lives in the context, and the
// all-reduce runs on the context's stream. The few NCCL declarations needed are written here from NCCL's
// stable C ABI (nccl.h: ncclUniqueId is 128 bytes passed by value, ncclFloat32 = 7, ncclSum = 0), so building
// needs no NCCL headers either.
#include "internal.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace {

struct nccl_unique_id { char internal[PEA_CUDA_NCCL_ID_BYTES]; };
typedef void *nccl_comm;
enum { NCCL_FLOAT32 = 7, NCCL_SUM = 0 };

typedef int (*GetUniqueIdFn)(nccl_unique_id *);
typedef int (*CommInitRankFn)(nccl_comm *, int, nccl_unique_id, int);
typedef int (*AllReduceFn)(const void *, void *, size_t, int, int, nccl_comm, cudaStream_t);
typedef int (*CommDestroyFn)(nccl_comm);
typedef const char *(*GetErrorStringFn)(int);

}  // namespace

struct pea_nccl {
    void *handle;
    char path[512];
    GetUniqueIdFn get_unique_id;
    CommInitRankFn comm_init_rank;
    AllReduceFn all_reduce;
    CommDestroyFn comm_destroy;
    GetErrorStringFn error_string;
    nccl_comm comm; /* NULL until pea_cuda_nccl_init */
};

/* ctx->nccl, loading the library on first use. */
static int load_nccl(pea_cuda_context *ctx, const char *op, const char *library) {
    if (ctx->nccl) return 0;
    const char *path = library && *library ? library : getenv("PEA_NCCL_LIB");
    if (!path || !*path) path = "libnccl.so.2";
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) return pea_fail(ctx, PEA_CUDA_ERROR_NO_DEVICE, op, "cannot load NCCL (%s): %s", path, dlerror());
    pea_nccl *nccl = new pea_nccl();
    nccl->handle = handle;
    snprintf(nccl->path, sizeof nccl->path, "%s", path);
    nccl->get_unique_id = (GetUniqueIdFn)dlsym(handle, "ncclGetUniqueId");
    nccl->comm_init_rank = (CommInitRankFn)dlsym(handle, "ncclCommInitRank");
    nccl->all_reduce = (AllReduceFn)dlsym(handle, "ncclAllReduce");
    nccl->comm_destroy = (CommDestroyFn)dlsym(handle, "ncclCommDestroy");
    nccl->error_string = (GetErrorStringFn)dlsym(handle, "ncclGetErrorString");
    if (!nccl->get_unique_id || !nccl->comm_init_rank || !nccl->all_reduce || !nccl->comm_destroy || !nccl->error_string) {
        delete nccl;  /* the library stays loaded: unloading CUDA-related libraries is not safe */
        return pea_fail(ctx, PEA_CUDA_ERROR_NO_DEVICE, op, "%s is not NCCL (it lacks ncclGetUniqueId, ncclCommInitRank, "
                        "ncclAllReduce, ncclCommDestroy or ncclGetErrorString)", path);
    }
    ctx->nccl = nccl;
    return 0;
}

static int nccl_check(pea_cuda_context *ctx, const char *op, int result, const char *call) {
    if (result == 0) return 0;
    return pea_fail(ctx, PEA_CUDA_ERROR_KERNEL, op, "%s: %s (NCCL error %d, %s)", call, ctx->nccl->error_string(result), result,
                    ctx->nccl->path);
}

void pea_nccl_destroy(pea_cuda_context *ctx) {
    if (!ctx->nccl) return;
    if (ctx->nccl->comm) ctx->nccl->comm_destroy(ctx->nccl->comm);
    delete ctx->nccl;
    ctx->nccl = NULL;
}

extern "C" int pea_cuda_nccl_unique_id(pea_cuda_context *ctx, const char *library, unsigned char *id) {
    const char *op = "nccl_unique_id";
    PEA_BEGIN(ctx, op);
    if (!id) return pea_fail(ctx, PEA_CUDA_ERROR_INVALID, op, "id is NULL");
    if (int rc = load_nccl(ctx, op, library)) return rc;
    nccl_unique_id unique;
    if (int rc = nccl_check(ctx, op, ctx->nccl->get_unique_id(&unique), "ncclGetUniqueId")) return rc;
    memcpy(id, unique.internal, sizeof unique.internal);
    return 0;
}

extern "C" int pea_cuda_nccl_init(pea_cuda_context *ctx, const char *library, const unsigned char *id, int ranks, int rank) {
    const char *op = "nccl_init";
    PEA_BEGIN(ctx, op);
    if (!id || ranks < 1 || rank < 0 || rank >= ranks)
        return pea_fail(ctx, PEA_CUDA_ERROR_INVALID, op, "rank %d of %d (or a NULL id)", rank, ranks);
    if (int rc = load_nccl(ctx, op, library)) return rc;
    if (ctx->nccl->comm) return pea_fail(ctx, PEA_CUDA_ERROR_INVALID, op, "the context already joined a communicator");
    nccl_unique_id unique;
    memcpy(unique.internal, id, sizeof unique.internal);
    nccl_comm comm = NULL;
    if (int rc = nccl_check(ctx, op, ctx->nccl->comm_init_rank(&comm, ranks, unique, rank), "ncclCommInitRank")) return rc;
    ctx->nccl->comm = comm;
    return 0;
}

extern "C" int pea_cuda_nccl_allreduce_sum_f32(pea_cuda_context *ctx, float *x, int64_t n) {
    const char *op = "nccl_allreduce_sum_f32";
    PEA_BEGIN(ctx, op);
    if (!ctx->nccl || !ctx->nccl->comm) return pea_fail(ctx, PEA_CUDA_ERROR_INVALID, op, "no communicator (pea_cuda_nccl_init first)");
    if (n < 0 || (n > 0 && !x)) return pea_fail(ctx, PEA_CUDA_ERROR_INVALID, op, "%lld values at %p", (long long)n, (void *)x);
    if (n == 0) return 0;
    /* Queued work first: NCCL's kernel is ordered after it on the stream anyway, but a stand-in that reduces on the
     * host (the emulator's, CKernels/emu/nccl_standin.c) reads the memory at once. */
    if (int rc = pea_cuda_synchronize(ctx)) return rc;
    if (int rc = nccl_check(ctx, op, ctx->nccl->all_reduce(x, x, (size_t)n, NCCL_FLOAT32, NCCL_SUM, ctx->nccl->comm, ctx->stream),
                            "ncclAllReduce"))
        return rc;
    return pea_cuda_synchronize(ctx);
}
