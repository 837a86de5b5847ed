// Row kernels compiled for AVX-512 (F/VL/BW/DQ) + FMA, 512-bit vectors
// (selected at run time when supported). Headers come before the pragma.
#include "rowkernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 8
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")
#define BNKIT_ISA_FILL fill_row_kernels_avx512
#define BNKIT_ISA_NAME "avx512"
#define BNKIT_ISA_AVX512 1
#include "rowkernels_impl.h"
#pragma GCC pop_options
#else
namespace bnkit {
bool fill_row_kernels_avx512(RowKernelSet&) {
  return false;
}
} // namespace bnkit
#endif
