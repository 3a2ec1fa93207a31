// libpea_mpi.so: the few MPI calls pea makes, behind a small C ABI that pea loads with dlopen when it runs under
// a launcher (mpirun, srun). Built by `make mpi` against the system's MPI (Open MPI or MPICH: only the MPI
// standard is used), so pea itself never links MPI. Every function returns 0 on success; on failure the MPI
// error's text is kept for pea_mpi_last_error.
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <limits.h>

#define PEA_MPI_ABI_VERSION 1

static char last_error[MPI_MAX_ERROR_STRING + 64];

static int failed(const char *call, int code) {
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) snprintf(text, sizeof text, "MPI error %d", code);
    snprintf(last_error, sizeof last_error, "%s: %s", call, text);
    return code == 0 ? -1 : code;
}

int pea_mpi_abi_version(void) { return PEA_MPI_ABI_VERSION; }

const char *pea_mpi_last_error(void) { return last_error; }

// MPI_Init, then errors returned rather than fatal (pea names the failing rank itself before aborting).
int pea_mpi_init(int *rank, int *size) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
        int code = MPI_Init(NULL, NULL);
        if (code != MPI_SUCCESS) return failed("MPI_Init", code);
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    int code = MPI_Comm_rank(MPI_COMM_WORLD, rank);
    if (code != MPI_SUCCESS) return failed("MPI_Comm_rank", code);
    code = MPI_Comm_size(MPI_COMM_WORLD, size);
    return code == MPI_SUCCESS ? 0 : failed("MPI_Comm_size", code);
}

// The element-wise sum over all ranks, in place; counts above INT_MAX go in pieces.
int pea_mpi_allreduce_sum_f32(float *buffer, int64_t count) {
    while (count > 0) {
        int piece = count > INT_MAX ? INT_MAX : (int)count;
        int code = MPI_Allreduce(MPI_IN_PLACE, buffer, piece, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        if (code != MPI_SUCCESS) return failed("MPI_Allreduce", code);
        buffer += piece;
        count -= piece;
    }
    return 0;
}

int pea_mpi_broadcast(void *buffer, int64_t bytes, int root) {
    char *at = buffer;
    while (bytes > 0) {
        int piece = bytes > INT_MAX ? INT_MAX : (int)bytes;
        int code = MPI_Bcast(at, piece, MPI_BYTE, root, MPI_COMM_WORLD);
        if (code != MPI_SUCCESS) return failed("MPI_Bcast", code);
        at += piece;
        bytes -= piece;
    }
    return 0;
}

int pea_mpi_barrier(void) {
    int code = MPI_Barrier(MPI_COMM_WORLD);
    return code == MPI_SUCCESS ? 0 : failed("MPI_Barrier", code);
}

// Ends every rank of the job (the launcher kills the others and exits non-zero).
void pea_mpi_abort(int code) { MPI_Abort(MPI_COMM_WORLD, code); }

int pea_mpi_finalize(void) {
    int code = MPI_Finalize();
    return code == MPI_SUCCESS ? 0 : failed("MPI_Finalize", code);
}
