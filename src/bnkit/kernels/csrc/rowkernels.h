// bnkit: the innermost loops ("row kernels"), compiled once per instruction
// set (baseline x86-64, AVX2+FMA, AVX-512) and picked at run time, so that a
// portable build still runs wide vector code where the CPU has it.
//
// A "row" is either one contiguous run of `inner` values of one channel
// (NCHW-like layouts; the loops run along the row) or, for channels-last,
// a block of rows of C contiguous channel values (the loops run along C).
// A is the accumulation dtype: float for float/bfloat16/float16, double for
// double.  Partial sums are returned in A over short blocks; the callers
// accumulate them in double.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace bnkit {

template <typename T>
struct AccT {
  using type = float;
};
template <>
struct AccT<double> {
  using type = double;
};

// The activations fused after the normalization (BatchNormAct's act), by kind:
//   kActClamp      clamp(pre, lo, hi), a NaN bound meaning none (a NaN value
//                  stays NaN): ReLU (lo 0, hi NaN), ReLU6, Hardtanh; the
//                  backward passes g where !(pre <= lo) && !(pre >= hi),
//                  torch's rule for ReLU (on its output) and Hardtanh;
//   kActHardswish  pre * clamp(pre + 3, 0, 6) / 6, torch's backward rule;
//                  (lo, hi) = (-3, 3), set by the caller;
//   kActSilu       pre * sigmoid(pre), its derivative; (lo, hi) are the range
//                  of its exponential's argument (rowkernels_act.h: act_exp),
//                  set by the caller.
// pre = ((p - mhi[c]) - mlo[c]) * sc[c] + sh[c], rounded to T as BN's output
// would be (torch applies the activation to that).  The backward recomputes
// pre from p by the same expression from the forward's own per-channel
// values, so that a mask is the forward's bit for bit.
enum ActKind : int { kActClamp = 0, kActHardswish = 1, kActSilu = 2, kActKinds = 3 };
// The eval-mode backward's kernels (infer_bwd) also come for BN alone, in slot kActKinds.
constexpr int kInferKinds = kActKinds + 1;

template <typename A>
struct FusedAct {
  const A* mhi;
  const A* mlo;
  const A* sc;
  const A* sh;
  A lo, hi;
  int kind;
  // The same activation from channel c0 on.
  FusedAct at(int64_t c0) const {
    return {mhi + c0, mlo + c0, sc + c0, sh + c0, lo, hi, kind};
  }
};

template <typename T>
struct RowKernels {
  using A = typename AccT<T>::type;
  // The element-wise kernels come in span (NCHW) and channels-last forms, with
  // and without streaming stores, each with one of these signatures; (d0, d1)
  // is (nch, n) for spans and (rows, C) for channels-last.
  //   o = ((p - mhi[c]) - mlo[c]) * sc[c] + sh[c]
  using NormalizeFn = void (*)(const T* p, T* o, int64_t d0, int64_t d1, const A* mhi, const A* mlo, const A* sc, const A* sh);
  //   dx = g*k1[c] - ((p - mhi[c]) - mlo[c])*k2[c] - k3[c]
  using BwdApplyFn = void (*)(
      const T* g,
      const T* p,
      T* dx,
      int64_t d0,
      int64_t d1,
      const A* mhi,
      const A* mlo,
      const A* k1,
      const A* k2,
      const A* k3);

  // NCHW spans: `nch` consecutive rows of n values (consecutive channels of
  // one sample); per-channel arrays are indexed by the row; sums are added.
  // s[c] += sum(p - K[c]), q[c] += sum((p - K[c])^2)
  void (*moments)(const T* p, int64_t nch, int64_t n, const A* K, double* s, double* q);
  // sg[c] += sum(g), sx[c] += sum(g * ((p - mhi[c]) - mlo[c]))
  void (*bwd_sums)(const T* g, const T* p, int64_t nch, int64_t n, const A* mhi, const A* mlo, double* sg, double* sx);
  NormalizeFn normalize;
  // o = p * sc[c] + sh[c]
  void (*scale_shift)(const T* p, T* o, int64_t nch, int64_t n, const A* sc, const A* sh);
  BwdApplyFn bwd_apply;
  // dx = g*sc[c]; sg[c] += sum(g); sx[c] += sum(g*p)
  void (*eval_bwd)(const T* g, const T* p, T* dx, int64_t nch, int64_t n, const A* sc, double* sg, double* sx);

  // Channels-last: `rows` rows of C values; per-channel A accumulators.
  void (*cl_moments)(const T* x, int64_t rows, int64_t C, const A* K, A* sa, A* sb);
  void (*cl_bwd_sums)(const T* g, const T* x, int64_t rows, int64_t C, const A* mhi, const A* mlo, A* sa, A* sb);
  NormalizeFn cl_normalize;
  void (*cl_scale_shift)(const T* x, T* y, int64_t rows, int64_t C, const A* sc, const A* sh);
  BwdApplyFn cl_bwd_apply;
  void (*cl_eval_bwd)(const T* g, const T* x, T* dx, int64_t rows, int64_t C, const A* sc, A* sa, A* sb);

  // Non-temporal-store variants for outputs larger than the caches (float on
  // AVX-512 and AVX2; nullptr elsewhere).  cl_*: rows of C % 16 == 0 values with
  // y/dx 64-byte aligned.  span_*: runs of n values of one channel, any
  // alignment.  Each ends with sfence.
  NormalizeFn cl_normalize_nt;
  BwdApplyFn cl_bwd_apply_nt;
  NormalizeFn span_normalize_nt;
  BwdApplyFn span_bwd_apply_nt;

  // BN + activation (FusedAct), one kernel per ActKind: spans and
  // channels-last rows as above, the per-channel arrays in the FusedAct.
  //   o = act(pre)
  void (*normalize_act[kActKinds])(const T* p, T* o, int64_t nch, int64_t n, const FusedAct<A>& a);
  void (*cl_normalize_act[kActKinds])(const T* x, T* y, int64_t rows, int64_t C, const FusedAct<A>& a);
  //   with gm = g * act'(pre) (xc = (p - mhi[c]) - mlo[c]):
  //   sg[c] += sum(gm), sx[c] += sum(gm * xc)
  void (*bwd_sums_act[kActKinds])(
      const T* g, const T* p, int64_t nch, int64_t n, const FusedAct<A>& a, double* sg, double* sx);
  void (*cl_bwd_sums_act[kActKinds])(
      const T* g, const T* x, int64_t rows, int64_t C, const FusedAct<A>& a, A* sa, A* sb);
  //   dx = gm*k1[c] - xc*k2[c] - k3[c]
  void (*bwd_apply_act[kActKinds])(
      const T* g, const T* p, T* dx, int64_t nch, int64_t n, const FusedAct<A>& a, const A* k1, const A* k2,
      const A* k3);
  void (*cl_bwd_apply_act[kActKinds])(
      const T* g, const T* x, T* dx, int64_t rows, int64_t C, const FusedAct<A>& a, const A* k1, const A* k2,
      const A* k3);

  // The backward of eval-mode BN (+ activation) in a graph, one pass: `a` is the
  // inference forward's (mhi = mlo = 0, sc = w / sqrt(var + eps), sh = b - mean * sc),
  // so pre is the forward's bit for bit; gm = g * act'(pre), gm = g in slot
  // kActKinds (no activation); mh + ml: the running mean, split.
  //   dx = gm * sc[c] (not written when dx is null), sg[c] += sum(gm),
  //   sx[c] += sum(gm * ((p - mh[c]) - ml[c]))
  void (*infer_bwd[kInferKinds])(
      const T* g, const T* p, T* dx, int64_t nch, int64_t n, const FusedAct<A>& a, const A* mh, const A* ml,
      double* sg, double* sx);
  void (*cl_infer_bwd[kInferKinds])(
      const T* g, const T* x, T* dx, int64_t rows, int64_t C, const FusedAct<A>& a, const A* mh, const A* ml, A* sa,
      A* sb);
};

// Tuning knobs, read by the kernels on every call (set once from the
// environment, or at run time through bnkit::_tune for same-process A/B
// measurements):
//   sub_floats     channels-last forward row kernels walk sub-blocks of about
//                  this many values per 64-channel chunk (BNKIT_SUB_FLOATS);
//   sub_floats_grad  the same for the backward kernels, over both inputs
//                  (BNKIT_SUB_FLOATS_GRAD);
//   nt_bytes       training outputs at least this large are written with
//                  non-temporal stores (BNKIT_NT_BYTES);
//   nt_grad_bytes  the same for input gradients (BNKIT_NT_GRAD_BYTES);
//   nt_eval_bytes  the same for inference outputs (BNKIT_NT_EVAL_BYTES);
//   block_bytes    NCHW-like training forward: channel blocks whose data is
//                  at most this many bytes are read once from memory
//                  (statistics, then normalization from the core's cache);
//                  0 = two passes in memory order (BNKIT_BLOCK_BYTES);
//   block_bytes_grad  the same for the backward, over both inputs
//                  (BNKIT_BLOCK_BYTES_GRAD);
//   reuse_grad     1: the layer's backward writes the input gradient over the
//                  output gradient when only autograd holds it; 0: always a
//                  fresh tensor (BNKIT_REUSE_GRAD).
// Defaults: cpu_config.cpp (kKnobs); measurements: there and at sub_rows.
struct Tuning {
  std::atomic<int64_t> sub_floats;
  std::atomic<int64_t> sub_floats_grad;
  std::atomic<int64_t> nt_bytes;
  std::atomic<int64_t> nt_grad_bytes;
  std::atomic<int64_t> nt_eval_bytes;
  std::atomic<int64_t> block_bytes;
  std::atomic<int64_t> block_bytes_grad;
  std::atomic<int64_t> reuse_grad;
};
Tuning& tuning();

struct RowKernelSet {
  RowKernels<float> f32;
  RowKernels<double> f64;
  RowKernels<c10::BFloat16> bf16;
  RowKernels<c10::Half> f16;
  const char* isa;
};

// Each returns false when that instruction set was not compiled in.
bool fill_row_kernels_default(RowKernelSet& set);
bool fill_row_kernels_avx2(RowKernelSet& set);
bool fill_row_kernels_avx512(RowKernelSet& set);
// Replaces only set.bf16 (and names the set "avx512+bf16").
bool fill_row_kernels_avx512bf16(RowKernelSet& set);

// The set for this CPU (chosen once; BNKIT_CPU_ISA=default|avx2|avx512 caps it,
// avx512 leaving out the AVX512-BF16 bfloat16 kernels).
const RowKernelSet& row_kernels();

template <typename T>
const RowKernels<T>& row_kernels_for();
template <>
inline const RowKernels<float>& row_kernels_for<float>() {
  return row_kernels().f32;
}
template <>
inline const RowKernels<double>& row_kernels_for<double>() {
  return row_kernels().f64;
}
template <>
inline const RowKernels<c10::BFloat16>& row_kernels_for<c10::BFloat16>() {
  return row_kernels().bf16;
}
template <>
inline const RowKernels<c10::Half>& row_kernels_for<c10::Half>() {
  return row_kernels().f16;
}

} // namespace bnkit
