// The bfloat16 row kernels once more for AVX-512 with the BF16 extension
// (AMD Zen 4, Intel Cooper Lake / Sapphire Rapids): float -> bfloat16 in one
// instruction instead of seven.  Selected at run time over the AVX-512 set's
// bfloat16 kernels when the CPU has it; only the bfloat16 kernels are built.
#include "rowkernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 10
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,prefer-vector-width=512")
#define BNKIT_ISA_FILL fill_row_kernels_avx512bf16
#define BNKIT_ISA_NAME "avx512+bf16"
#define BNKIT_ISA_AVX512 1
#define BNKIT_ISA_AVX512BF16 1
#define BNKIT_ISA_BF16_ONLY 1
#include "rowkernels_impl.h"
#pragma GCC pop_options
#else
namespace bnkit {
bool fill_row_kernels_avx512bf16(RowKernelSet&) {
  return false;
}
} // namespace bnkit
#endif
