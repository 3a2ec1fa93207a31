/* cuda_runtime_api.h — stand-in for the CUDA toolkit header of this name: the emulated build (CKernels/emu) gets the
 * SIMT emulator and the CPU runtime from it. Under nvcc the toolkit's own header is used. */
#ifndef PEA_EMU_STANDIN_CUDA_RUNTIME_API_H
#define PEA_EMU_STANDIN_CUDA_RUNTIME_API_H
#include "../cuda_emu.h"
#endif
