// libpea_nccl_emu.so: an NCCL stand-in for the emulated CUDA library, so that `pea train --collective nccl` runs its
// NCCL code path in `make test` without NCCL or a GPU. The emulator's device memory is host memory, so the
// all-reduce is the MPI shim's (pea_mpi_allreduce_sum_f32 from libpea_mpi.so, which pea loads with RTLD_GLOBAL
// under a launcher); a communicator of one rank needs no MPI (the op tests use that). Only what pea calls:
// float32 sums. Returns NCCL's codes: 0 success, 3 internal error, 4 invalid argument.
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct { char internal[128]; } ncclUniqueId;
typedef struct { int ranks, rank; } standin_comm;

int ncclGetUniqueId(ncclUniqueId *id) {
    if (!id) return 4;
    memset(id, 0, sizeof *id);
    snprintf(id->internal, sizeof id->internal, "pea-nccl-standin %ld %ld", (long)getpid(), (long)time(NULL));
    return 0;
}

int ncclCommInitRank(standin_comm **comm, int ranks, ncclUniqueId id, int rank) {
    (void)id;
    if (!comm || ranks < 1 || rank < 0 || rank >= ranks) return 4;
    *comm = malloc(sizeof **comm);
    if (!*comm) return 3;
    (*comm)->ranks = ranks;
    (*comm)->rank = rank;
    return 0;
}

int ncclAllReduce(const void *send, void *receive, size_t count, int datatype, int op, standin_comm *comm, void *stream) {
    (void)stream;
    if (!comm || datatype != 7 || op != 0) return 4;  /* ncclFloat32, ncclSum */
    if (send != receive) memmove(receive, send, count * sizeof(float));
    if (comm->ranks == 1) return 0;
    int (*allreduce)(float *, int64_t) = (int (*)(float *, int64_t))dlsym(RTLD_DEFAULT, "pea_mpi_allreduce_sum_f32");
    if (!allreduce) {
        fprintf(stderr, "nccl stand-in: pea_mpi_allreduce_sum_f32 is not loaded (libpea_mpi.so, under a launcher)\n");
        return 3;
    }
    return allreduce(receive, (int64_t)count) == 0 ? 0 : 3;
}

int ncclCommDestroy(standin_comm *comm) {
    free(comm);
    return 0;
}

const char *ncclGetErrorString(int result) {
    switch (result) {
    case 0: return "no error";
    case 3: return "internal error (the stand-in's MPI all-reduce failed)";
    case 4: return "invalid argument";
    default: return "unknown result";
    }
}
