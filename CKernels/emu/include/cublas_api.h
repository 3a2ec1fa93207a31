/* cublas_api.h — stand-in for the CUDA toolkit header of this name (see cublas_v2.h). */
#include "cublas_v2.h"
