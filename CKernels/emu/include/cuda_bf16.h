/* cuda_bf16.h — stand-in for the CUDA toolkit header of this name: __half and __nv_bfloat16 for the emulated build
 * (CKernels/emu/emu_half.h). Under nvcc the toolkit's own header is used. */
#ifndef PEA_EMU_STANDIN_CUDA_BF16_H
#define PEA_EMU_STANDIN_CUDA_BF16_H
#include "../emu_half.h"
#endif
