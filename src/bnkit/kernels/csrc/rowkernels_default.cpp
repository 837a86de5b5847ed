// Row kernels for the baseline instruction set of the build (x86-64: SSE2).
#include "rowkernels.h"

#define BNKIT_ISA_FILL fill_row_kernels_default
#define BNKIT_ISA_NAME "default"
#include "rowkernels_impl.h"
