// Row kernels compiled for AVX2 + FMA (selected at run time when supported).
// All headers come before the target pragma: only the internal-linkage row
// kernels are compiled for AVX2, so nothing AVX2 leaks into shared inline code.
#include "rowkernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define BNKIT_ISA_FILL fill_row_kernels_avx2
#define BNKIT_ISA_NAME "avx2"
#define BNKIT_ISA_AVX2
#include "rowkernels_impl.h"
#pragma GCC pop_options
#else
namespace bnkit {
bool fill_row_kernels_avx2(RowKernelSet&) {
  return false;
}
} // namespace bnkit
#endif
