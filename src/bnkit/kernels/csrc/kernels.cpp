// bnkit: fused CPU Batch Normalization kernels.
//
// Drivers: shapes, parallelization (at::parallel_for: torch's own thread pool,
// honours torch.set_num_threads), statistics bookkeeping and argument checks.
// The innermost loops (`#pragma omp simd`) live in rowkernels_impl.h and are
// compiled per instruction set (see rowkernels.h).
//
// Numerics
//   Statistics are computed in ONE read of the input with *shifted sums*:
//   for each channel a shift K (the mean of a few of its first values) is
//   taken, and sum(x - K), sum((x - K)^2) are accumulated -- in the
//   accumulation dtype inside short blocks (a few thousand values) and in
//   float64 across blocks.  Since K is close to the mean, the classical
//   cancellation of E[x^2] - E[x]^2 does not occur (float32 data with mean
//   1e3 and std 0.1 keeps ~6 significant digits of the variance).
//   The mean is carried as a float32 pair (hi + lo) when centring, so that
//   (x - mean) is exact to float32 rounding even when |mean| >> std.
#include "bnkit_kernels.h"
#include "rowkernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>


namespace bnkit {
namespace {

using at::Tensor;

// Most rows accumulated in the accumulation dtype before flushing (channels-last).
constexpr int64_t kRows = 256;
// Minimum number of elements worth a task of their own.
constexpr int64_t kGrain = 32768;

template <typename A, typename T>
inline A cvt(T v) {
  return static_cast<A>(v);
}

// ------------------------------------------------------------ shape info --

struct Shape {
  int64_t N, C, S;
  int64_t M() const {
    return N * S;
  }
};

inline Shape shape_of(const Tensor& x3) {
  return Shape{x3.size(0), x3.size(1), x3.size(2)};
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Calls fn(n, c0, c1) for the runs of rows [r0, r1) (row r = n*C + c) that
// lie within one sample: each run is contiguous in memory.
template <typename F>
inline void for_runs(int64_t r0, int64_t r1, int64_t C, const F& fn) {
  while (r0 < r1) {
    const int64_t n = r0 / C, c0 = r0 % C;
    const int64_t c1 = std::min(C, c0 + (r1 - r0));
    fn(n, c0, c1);
    r0 += c1 - c0;
  }
}

// NCHW-like layouts with enough channels can be processed in channel blocks:
// one task computes the statistics of a block of consecutive channels over
// the whole batch (reading, for each sample, one contiguous span) and then
// normalizes the block (or applies the gradient) while it is still in the
// core's cache, so the input is read from memory once instead of twice.
// `budget` (tuning().block_bytes / block_bytes_grad) bounds a block's data;
// 0 turns the schedule off (defaults and measurements: cpu_config.cpp).
struct Blocks {
  int64_t cb = 0, nb = 0, grain = 1;
};

inline bool use_channel_blocks(const Shape& s, int64_t budget, int64_t bytes_per_value) {
  return budget > 0 && s.S > 1 && s.M() > 0 && s.C >= at::get_num_threads() &&
      s.M() * bytes_per_value <= budget;
}

inline Blocks channel_blocks(const Shape& s, int64_t budget, int64_t bytes_per_value) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_channel = std::max<int64_t>(1, s.M() * bytes_per_value);
  int64_t cb = std::max<int64_t>(1, budget / per_channel);
  cb = std::min(cb, ceil_div(s.C, threads));
  int64_t nb = ceil_div(s.C, cb);
  nb = std::min(s.C, ceil_div(nb, threads) * threads); // balance the threads
  Blocks b;
  b.cb = ceil_div(s.C, nb);
  b.nb = ceil_div(s.C, b.cb);
  b.grain = std::max<int64_t>(1, ceil_div(kGrain, b.cb * s.M()));
  return b;
}

// Reduces two per-channel float64 sums over an (N, C, S) tensor.
//   span_op(n, c0, c1, a, b):  S > 1: rows (n, c0..c1), adds into a[0..), b[0..)
//   cl_op(r0, r1, sa, sb):     S == 1: rows [r0, r1) into C-arrays of A.
// Deterministic: the partials are combined in a fixed order.
template <typename A, typename SpanOp, typename ClOp>
void reduce2(const Shape& s, double* out_a, double* out_b, const SpanOp& span_op, const ClOp& cl_op) {
  const int64_t N = s.N, C = s.C, S = s.S;
  std::fill(out_a, out_a + C, 0.0);
  std::fill(out_b, out_b + C, 0.0);
  if (N == 0 || C == 0 || S == 0) return;
  if (S > 1) {
    std::vector<double> pa(N * C, 0.0), pb(N * C, 0.0);
    const int64_t grain = std::max<int64_t>(1, kGrain / S);
    at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
      for_runs(r0, r1, C, [&](int64_t n, int64_t c0, int64_t c1) {
        span_op(n, c0, c1, pa.data() + n * C + c0, pb.data() + n * C + c0);
      });
    });
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        out_a[c] += pa[n * C + c];
        out_b[c] += pb[n * C + c];
      }
  } else {
    int64_t tasks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, N * C / kGrain));
    tasks = std::max<int64_t>(1, std::min(tasks, N));
    std::vector<double> pa(tasks * C, 0.0), pb(tasks * C, 0.0);
    const int64_t rows_blk = kRows;
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<A> sa(C), sb(C);
      for (int64_t t = t0; t < t1; ++t) {
        double* a = pa.data() + t * C;
        double* b = pb.data() + t * C;
        const int64_t r0 = N * t / tasks, r1 = N * (t + 1) / tasks;
        for (int64_t rb = r0; rb < r1; rb += rows_blk) {
          const int64_t re = std::min(r1, rb + rows_blk);
          std::fill(sa.begin(), sa.end(), A(0));
          std::fill(sb.begin(), sb.end(), A(0));
          cl_op(rb, re, sa.data(), sb.data());
          for (int64_t c = 0; c < C; ++c) {
            a[c] += static_cast<double>(sa[c]);
            b[c] += static_cast<double>(sb[c]);
          }
        }
      }
    });
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t c = 0; c < C; ++c) {
        out_a[c] += pa[t * C + c];
        out_b[c] += pb[t * C + c];
      }
  }
}

// Shift of channel c: mean of up to 16 of its first values, rounded to A (so
// that x - K is computed exactly as it is in the loops).
template <typename T, typename A>
A channel_shift(const T* x, const Shape& s, int64_t c) {
  if (s.M() == 0) return A(0);
  double acc = 0;
  int64_t k;
  if (s.S > 1) {
    k = std::min<int64_t>(s.S, 16);
    for (int64_t i = 0; i < k; ++i) acc += cvt<double>(x[c * s.S + i]);
  } else {
    k = std::min<int64_t>(s.N, 16);
    for (int64_t r = 0; r < k; ++r) acc += cvt<double>(x[r * s.C + c]);
  }
  return static_cast<A>(acc / k);
}

// The per-channel finishing steps below are plain loops over arrays so that
// they vectorize: for (N, C) inputs with C = 1024 the scalar versions were a
// fifth of the training forward's time on the calling thread (perf, cpu-clock),
// with the other threads waiting.

// mean = K + s/M, var = max(q/M - (s/M)^2, 0) for n channels (NaN when M == 0).
template <typename A>
void finish_moments(
    int64_t n, int64_t M, const A* __restrict K, const double* __restrict s, const double* __restrict q,
    double* __restrict mean, double* __restrict var) {
  if (M == 0) {
    std::fill(mean, mean + n, std::numeric_limits<double>::quiet_NaN());
    std::fill(var, var + n, std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const double Md = static_cast<double>(M);
  for (int64_t c = 0; c < n; ++c) {
    const double dm = s[c] / Md;
    mean[c] = static_cast<double>(K[c]) + dm;
    const double v = q[c] / Md - dm * dm;
    var[c] = v < 0.0 ? 0.0 : v; // NaN stays NaN
  }
}

// mean as a float pair hi + lo (hi = mean rounded to A, lo = the rest), so
// that (x - hi) - lo is exact to A's rounding even when |mean| >> std.
template <typename A, typename M>
void split_mean(int64_t n, const M* __restrict mean, A* __restrict hi, A* __restrict lo) {
  for (int64_t c = 0; c < n; ++c) {
    hi[c] = static_cast<A>(mean[c]);
    lo[c] = static_cast<A>(static_cast<double>(mean[c]) - static_cast<double>(hi[c]));
  }
}

// The training forward's per-channel outputs and normalization parameters for
// n channels: mean/var in A, the mean split (split_mean), sc = w / sqrt(var +
// eps) (w = 1 without weight), sh = b (0 without bias).
template <typename A>
void train_params(
    int64_t n, const double* __restrict mean, const double* __restrict var, const A* __restrict w,
    const A* __restrict b, double eps, A* __restrict mean_o, A* __restrict var_o, A* __restrict mhi,
    A* __restrict mlo, A* __restrict sc, A* __restrict sh) {
  for (int64_t c = 0; c < n; ++c) {
    mean_o[c] = static_cast<A>(mean[c]);
    var_o[c] = static_cast<A>(var[c]);
  }
  split_mean(n, mean, mhi, mlo);
  if (w != nullptr) {
    for (int64_t c = 0; c < n; ++c) sc[c] = static_cast<A>(static_cast<double>(w[c]) / std::sqrt(var[c] + eps));
  } else {
    for (int64_t c = 0; c < n; ++c) sc[c] = static_cast<A>(1.0 / std::sqrt(var[c] + eps));
  }
  if (b != nullptr)
    std::copy(b, b + n, sh);
  else
    std::fill(sh, sh + n, A(0));
}

// The backward's per-channel coefficients for n channels, from sg = sum(g) and
// sx = sum(g * (x - mean)) over M values: dx = k1*g - k2*(x - mean) - k3 with
// k1 = w*invstd, k2 = k1*invstd^2*sx/M, k3 = k1*sg/M; dw = sx*invstd, db = sg.
template <typename A>
void backward_coefs(
    int64_t n, int64_t M, const A* __restrict var, const A* __restrict w, const double* __restrict sg,
    const double* __restrict sx, double eps, A* __restrict dw, A* __restrict db, A* __restrict k1,
    A* __restrict k2, A* __restrict k3) {
  const double inv_m = 1.0 / static_cast<double>(M);
  auto loop = [&](auto has_w) { // a compile-time branch: the loop vectorizes
    for (int64_t c = 0; c < n; ++c) {
      const double invstd = 1.0 / std::sqrt(static_cast<double>(var[c]) + eps);
      const double kk = (has_w ? static_cast<double>(w[c]) : 1.0) * invstd;
      dw[c] = static_cast<A>(sx[c] * invstd);
      db[c] = static_cast<A>(sg[c]);
      k1[c] = static_cast<A>(kk);
      k2[c] = static_cast<A>(kk * invstd * invstd * sx[c] * inv_m);
      k3[c] = static_cast<A>(kk * sg[c] * inv_m);
    }
  };
  if (w != nullptr)
    loop(std::true_type());
  else
    loop(std::false_type());
}

// Inference: scale = w / sqrt(var + eps), shift = b - mean * scale for n
// channels (w = 1, b = 0 where absent), folded in double.
template <typename A>
void fold_params(
    int64_t n, const double* __restrict mean, const double* __restrict var, const double* __restrict w,
    const double* __restrict b, double eps, A* __restrict sc, A* __restrict sh) {
  auto loop = [&](auto has_w, auto has_b) { // compile-time branches: the loop vectorizes
    for (int64_t c = 0; c < n; ++c) {
      const double scale = (has_w ? w[c] : 1.0) / std::sqrt(var[c] + eps);
      sc[c] = static_cast<A>(scale);
      sh[c] = static_cast<A>((has_b ? b[c] : 0.0) - mean[c] * scale);
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (w != nullptr && b != nullptr)
    loop(yes(), yes());
  else if (w != nullptr)
    loop(yes(), no());
  else if (b != nullptr)
    loop(no(), yes());
  else
    loop(no(), no());
}

// Per-channel moments (double) for any layout: one read of x.
template <typename T>
void moments_impl(const T* x, const Shape& s, double* mean, double* var) {
  using A = typename AccT<T>::type;
  const RowKernels<T>& rk = row_kernels_for<T>();
  const int64_t C = s.C, S = s.S;
  std::vector<A> K(C);
  if (S == 1 && s.N > 0) {
    // Rows of C channels: the mean of the first (up to) 8 rows, read row by
    // row in A (a per-channel strided walk in double cost as much as a small
    // tensor's statistics).  K only has to be near the mean (the sums are
    // taken relative to K exactly as rounded); the first row alone was not
    // (float32 variance off by ~1e-6 relative when it lies 2-3 std away).
    const int64_t k = std::min<int64_t>(s.N, 8);
    std::fill(K.begin(), K.end(), A(0));
    for (int64_t r = 0; r < k; ++r) {
      const T* xr = x + r * C;
      A* Kp = K.data();
      for (int64_t c = 0; c < C; ++c) Kp[c] += cvt<A>(xr[c]);
    }
    const A inv_k = A(1) / static_cast<A>(k);
    for (int64_t c = 0; c < C; ++c) K[c] *= inv_k;
  } else {
    for (int64_t c = 0; c < C; ++c) K[c] = channel_shift<T, A>(x, s, c);
  }
  std::vector<double> sum(C), sumsq(C);
  reduce2<A>(
      s,
      sum.data(),
      sumsq.data(),
      [&](int64_t n, int64_t c0, int64_t c1, double* a, double* b) {
        rk.moments(x + (n * C + c0) * S, c1 - c0, S, K.data() + c0, a, b);
      },
      [&](int64_t r0, int64_t r1, A* sa, A* sb) { rk.cl_moments(x + r0 * C, r1 - r0, C, K.data(), sa, sb); });
  finish_moments(C, s.M(), K.data(), sum.data(), sumsq.data(), mean, var);
}

// Non-temporal stores (no read-for-ownership of the destination, no
// write-back through the caches) for large outputs, by pass:
//   kTrain  training forward output, from tuning().nt_bytes (default 3 MB,
//           more than a core's L2);
//   kGrad   backward input gradient, from tuning().nt_grad_bytes (3 MB);
//   kEval   inference output, from tuning().nt_eval_bytes (by the L2 size:
//           see the defaults in cpu_config.cpp).
// An output written through the cache is read back cheaply by the next layer,
// but evicts the inputs.  Measured on the 2-core EPYC VM (32 MB L3), whole
// benchmark runs: with 3 MB rather than 8 MB for training outputs the module
// forward+backward median was 1.36-1.44x ATen's rather than 1.27-1.29x.
enum class Pass { kTrain, kGrad, kEval };

template <typename T, typename P>
inline bool use_nt_stores(const Shape& s, const P* y, Pass pass) {
  (void)y;
  const int64_t bytes = s.N * s.C * s.S * static_cast<int64_t>(sizeof(T));
  const Tuning& t = tuning();
  const auto& knob = pass == Pass::kTrain ? t.nt_bytes : pass == Pass::kGrad ? t.nt_grad_bytes : t.nt_eval_bytes;
  return bytes >= knob.load(std::memory_order_relaxed);
}

// The channels-last non-temporal kernels need whole 64-byte rows, aligned.
template <typename F>
inline bool cl_nt_ok(F fn, const Shape& s, const void* y) {
  return fn != nullptr && s.C % 16 == 0 && (reinterpret_cast<uintptr_t>(y) & 63u) == 0;
}

// y = ((x - mhi) - mlo) * sc + sh  (kCenter) or y = x * sc + sh, any layout.
template <bool kCenter, typename T, typename A>
void apply_affine(const T* x, T* y, const Shape& s, const A* mhi, const A* mlo, const A* sc, const A* sh, bool eval = !kCenter) {
  const RowKernels<T>& rk = row_kernels_for<T>();
  const int64_t N = s.N, C = s.C, S = s.S;
  if (N == 0 || C == 0 || S == 0) return;
  std::vector<A> zeros;
  if (!kCenter && S == 1 && !std::is_same_v<T, float>) {
    // Channels-last bfloat16 eval: the centring kernel with zero means computes
    // the same values (x - 0 - 0 == x) with the vector bfloat16 conversion.
    // (float32: the plain row-by-row multiply-add was 1.1-1.3x faster in
    // same-process A/B runs on every channels-last and (N, C) shape.)
    zeros.assign(C, A(0));
    apply_affine<true, T, A>(x, y, s, zeros.data(), zeros.data(), sc, sh, /*eval=*/true);
    return;
  }
  if (use_nt_stores<T>(s, y, eval ? Pass::kEval : Pass::kTrain) && (S > 1 ? rk.span_normalize_nt != nullptr : cl_nt_ok(rk.cl_normalize_nt, s, y))) {
    if (!kCenter) {
      zeros.assign(C, A(0)); // x - 0 - 0 == x exactly: the same values as x * sc + sh
      mhi = mlo = zeros.data();
    }
    if (S > 1) {
      const int64_t grain = std::max<int64_t>(1, kGrain / S);
      at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
        for_runs(r0, r1, C, [&](int64_t n, int64_t c0, int64_t c1) {
          const int64_t off = (n * C + c0) * S;
          rk.span_normalize_nt(x + off, y + off, c1 - c0, S, mhi + c0, mlo + c0, sc + c0, sh + c0);
        });
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, kGrain / C);
      at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
        rk.cl_normalize_nt(x + r0 * C, y + r0 * C, r1 - r0, C, mhi, mlo, sc, sh);
      });
    }
    return;
  }
  if (S > 1) {
    const int64_t grain = std::max<int64_t>(1, kGrain / S);
    at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
      for_runs(r0, r1, C, [&](int64_t n, int64_t c0, int64_t c1) {
        const int64_t off = (n * C + c0) * S;
        if (kCenter)
          rk.normalize(x + off, y + off, c1 - c0, S, mhi + c0, mlo + c0, sc + c0, sh + c0);
        else
          rk.scale_shift(x + off, y + off, c1 - c0, S, sc + c0, sh + c0);
      });
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / C);
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      if (kCenter)
        rk.cl_normalize(x + r0 * C, y + r0 * C, r1 - r0, C, mhi, mlo, sc, sh);
      else
        rk.cl_scale_shift(x + r0 * C, y + r0 * C, r1 - r0, C, sc, sh);
    });
  }
}

// --------------------------------------------------------------- forward --

template <typename T>
void train_kernel(
    const T* x,
    T* y,
    const Shape& s,
    const typename AccT<T>::type* w,
    const typename AccT<T>::type* b,
    double eps,
    typename AccT<T>::type* mean_o,
    typename AccT<T>::type* var_o) {
  using A = typename AccT<T>::type;
  const RowKernels<T>& rk = row_kernels_for<T>();
  const int64_t N = s.N, C = s.C, S = s.S, M = s.M();
  if (C == 0) return;
  const int64_t budget = tuning().block_bytes.load(std::memory_order_relaxed);
  if (use_channel_blocks(s, budget, sizeof(T))) {
    const Blocks bl = channel_blocks(s, budget, sizeof(T));
    at::parallel_for(0, bl.nb, bl.grain, [&](int64_t b0, int64_t b1) {
      std::vector<A> K(bl.cb), mhi(bl.cb), mlo(bl.cb), sc(bl.cb), sh(bl.cb);
      std::vector<double> sum(bl.cb), sumsq(bl.cb), mean(bl.cb), var(bl.cb);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t c0 = blk * bl.cb, c1 = std::min(C, c0 + bl.cb), m = c1 - c0;
        if (m <= 0) continue;
        for (int64_t c = c0; c < c1; ++c) K[c - c0] = channel_shift<T, A>(x, s, c);
        std::fill(sum.begin(), sum.end(), 0.0);
        std::fill(sumsq.begin(), sumsq.end(), 0.0);
        for (int64_t n = 0; n < N; ++n) rk.moments(x + (n * C + c0) * S, m, S, K.data(), sum.data(), sumsq.data());
        finish_moments(m, M, K.data(), sum.data(), sumsq.data(), mean.data(), var.data());
        train_params(
            m, mean.data(), var.data(), w ? w + c0 : nullptr, b ? b + c0 : nullptr, eps, mean_o + c0, var_o + c0,
            mhi.data(), mlo.data(), sc.data(), sh.data());
        if (y != nullptr) {
          for (int64_t n = 0; n < N; ++n) {
            const int64_t off = (n * C + c0) * S;
            rk.normalize(x + off, y + off, m, S, mhi.data(), mlo.data(), sc.data(), sh.data());
          }
        }
      }
    });
    return;
  }
  std::vector<double> mean(C), var(C);
  moments_impl<T>(x, s, mean.data(), var.data());
  std::vector<A> mhi(C), mlo(C), sc(C), sh(C);
  train_params(C, mean.data(), var.data(), w, b, eps, mean_o, var_o, mhi.data(), mlo.data(), sc.data(), sh.data());
  if (y != nullptr) apply_affine<true, T, A>(x, y, s, mhi.data(), mlo.data(), sc.data(), sh.data());
}

// -------------------------------------------------------------- backward --

// The backward's two per-channel sums, given (the backward-apply phase):
// sum_g = sum(g), sum_gxc = sum(g * (x - mean)) over `count` values.
struct Sums {
  const double* sum_g;
  const double* sum_gxc;
  int64_t count;
};

template <typename T>
void backward_kernel(
    const T* g,
    const T* x,
    T* dx,
    const Shape& s,
    const typename AccT<T>::type* mean,
    const typename AccT<T>::type* var,
    const typename AccT<T>::type* w,
    double eps,
    typename AccT<T>::type* dw,
    typename AccT<T>::type* db,
    const Sums* given = nullptr) {
  using A = typename AccT<T>::type;
  const RowKernels<T>& rk = row_kernels_for<T>();
  const int64_t N = s.N, C = s.C, S = s.S;
  // The count the coefficients divide by: this tensor's, or (given sums) the
  // whole batch's that the sums were reduced over.
  const int64_t M = given ? given->count : s.M();
  if (C == 0) return;
  if (M == 0 || s.M() == 0) {
    for (int64_t c = 0; c < C; ++c) dw[c] = db[c] = A(0);
    return;
  }
  auto coefs = [&](int64_t c0, int64_t n, const double* sg, const double* sx, A* k1, A* k2, A* k3) {
    backward_coefs(n, M, var + c0, w ? w + c0 : nullptr, sg, sx, eps, dw + c0, db + c0, k1, k2, k3);
  };
  std::vector<A> mhi(C), mlo(C);
  split_mean(C, mean, mhi.data(), mlo.data());
  const int64_t budget = given ? 0 : tuning().block_bytes_grad.load(std::memory_order_relaxed);
  // dx of NCHW-like layouts: streamed past the caches from nt_grad_bytes (on the
  // 2 MB-L2 Xeon VM this made the 6-25 MB NCHW backward 1.2-1.35x faster).
  const auto span_apply = use_nt_stores<T>(s, dx, Pass::kGrad) && rk.span_bwd_apply_nt != nullptr ? rk.span_bwd_apply_nt : rk.bwd_apply;
  if (use_channel_blocks(s, budget, 2 * sizeof(T))) {
    const Blocks bl = channel_blocks(s, budget, 2 * sizeof(T));
    at::parallel_for(0, bl.nb, bl.grain, [&](int64_t b0, int64_t b1) {
      std::vector<A> k1(bl.cb), k2(bl.cb), k3(bl.cb);
      std::vector<double> sg(bl.cb), sx(bl.cb);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t c0 = blk * bl.cb, c1 = std::min(C, c0 + bl.cb), m = c1 - c0;
        if (m <= 0) continue;
        std::fill(sg.begin(), sg.end(), 0.0);
        std::fill(sx.begin(), sx.end(), 0.0);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c0) * S;
          rk.bwd_sums(g + off, x + off, m, S, mhi.data() + c0, mlo.data() + c0, sg.data(), sx.data());
        }
        coefs(c0, m, sg.data(), sx.data(), k1.data(), k2.data(), k3.data());
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c0) * S;
          span_apply(
              g + off, x + off, dx + off, m, S, mhi.data() + c0, mlo.data() + c0, k1.data(), k2.data(), k3.data());
        }
      }
    });
    return;
  }
  std::vector<double> sg(C), sx(C);
  if (given) { // the backward-apply phase: sums reduced elsewhere (e.g. across ranks)
    std::copy(given->sum_g, given->sum_g + C, sg.begin());
    std::copy(given->sum_gxc, given->sum_gxc + C, sx.begin());
  } else {
    reduce2<A>(
        s,
        sg.data(),
        sx.data(),
        [&](int64_t n, int64_t c0, int64_t c1, double* a, double* b) {
          const int64_t off = (n * C + c0) * S;
          rk.bwd_sums(g + off, x + off, c1 - c0, S, mhi.data() + c0, mlo.data() + c0, a, b);
        },
        [&](int64_t r0, int64_t r1, A* sa, A* sb) {
          rk.cl_bwd_sums(g + r0 * C, x + r0 * C, r1 - r0, C, mhi.data(), mlo.data(), sa, sb);
        });
  }
  std::vector<A> k1(C), k2(C), k3(C);
  coefs(0, C, sg.data(), sx.data(), k1.data(), k2.data(), k3.data());
  if (S > 1) {
    const int64_t grain = std::max<int64_t>(1, kGrain / S);
    at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
      for_runs(r0, r1, C, [&](int64_t n, int64_t c0, int64_t c1) {
        const int64_t off = (n * C + c0) * S;
        span_apply(
            g + off,
            x + off,
            dx + off,
            c1 - c0,
            S,
            mhi.data() + c0,
            mlo.data() + c0,
            k1.data() + c0,
            k2.data() + c0,
            k3.data() + c0);
      });
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / C);
    const auto apply = use_nt_stores<T>(s, dx, Pass::kGrad) && cl_nt_ok(rk.cl_bwd_apply_nt, s, dx) ? rk.cl_bwd_apply_nt : rk.cl_bwd_apply;
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      apply(g + r0 * C, x + r0 * C, dx + r0 * C, r1 - r0, C, mhi.data(), mlo.data(), k1.data(), k2.data(), k3.data());
    });
  }
}

// Eval backward: dx = g*scale, dscale = sum(g*x), dshift = sum(g); one pass.
template <typename T>
void eval_backward_kernel(
    const T* g,
    const T* x,
    T* dx,
    const Shape& s,
    const typename AccT<T>::type* scale,
    double* dscale,
    double* dshift) {
  using A = typename AccT<T>::type;
  const RowKernels<T>& rk = row_kernels_for<T>();
  const int64_t C = s.C, S = s.S;
  reduce2<A>(
      s,
      dshift,
      dscale,
      [&](int64_t n, int64_t c0, int64_t c1, double* a, double* b) {
        const int64_t off = (n * C + c0) * S;
        rk.eval_bwd(g + off, x + off, dx + off, c1 - c0, S, scale + c0, a, b);
      },
      [&](int64_t r0, int64_t r1, A* sa, A* sb) {
        rk.cl_eval_bwd(g + r0 * C, x + r0 * C, dx + r0 * C, r1 - r0, C, scale, sa, sb);
      });
}

// ------------------------------------------------------------ arg checks --

Tensor check_x3(const Tensor& x3, const char* op, const char* what = "x3") {
  TORCH_CHECK(x3.defined(), "bnkit::", op, ": ", what, " is undefined");
  TORCH_CHECK(
      x3.dim() == 3,
      "bnkit::",
      op,
      ": expected ",
      what,
      " to be the 3-D view (outer, C, inner), got a tensor of shape ",
      x3.sizes());
  TORCH_CHECK(
      x3.device().is_cpu(), "bnkit::", op, ": the C++ kernels run on CPU tensors, got ", what, " on ", x3.device());
  const auto t = x3.scalar_type();
  TORCH_CHECK(
      t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
      "bnkit::",
      op,
      ": unsupported dtype ",
      t,
      " for ",
      what,
      " (float32, float64, bfloat16 and float16 are supported)");
  return x3.contiguous();
}

// grad_y3 checked as x3 is and against x3's shape; contiguous, in x3's dtype.
Tensor check_grad(const Tensor& grad_y3, const Tensor& x3, const char* op) {
  const Tensor g = check_x3(grad_y3, op, "grad_y3");
  TORCH_CHECK(
      g.sizes() == x3.sizes(), "bnkit::", op, ": grad_y3 has shape ", g.sizes(), " but x3 has shape ", x3.sizes());
  return g.to(x3.scalar_type()).contiguous();
}

// A per-channel parameter as a contiguous tensor of the accumulation dtype.
Tensor check_param(const Tensor& p, int64_t C, at::ScalarType acc, const char* op, const char* name) {
  TORCH_CHECK(p.device().is_cpu(), "bnkit::", op, ": ", name, " must be a CPU tensor, got ", p.device());
  TORCH_CHECK(
      p.numel() == C && p.dim() <= 1,
      "bnkit::",
      op,
      ": expected ",
      name,
      " of shape (",
      C,
      ",) (one value per channel), got shape ",
      p.sizes());
  TORCH_CHECK(
      at::isFloatingType(p.scalar_type()), "bnkit::", op, ": ", name, " must be floating point, got ", p.scalar_type());
  if (p.dim() == 1 && p.scalar_type() == acc && p.is_contiguous()) return p; // the common case: no new tensor
  return p.reshape({C}).to(acc).contiguous();
}

// A per-channel parameter's values as double (checked as check_param does).
void param_as_double(const Tensor& p, int64_t C, const char* op, const char* name, std::vector<double>& out) {
  const Tensor t = check_param(p, C, p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat, op, name);
  out.resize(C);
  if (t.scalar_type() == at::kDouble) {
    const double* q = t.const_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) out[c] = q[c];
  } else {
    const float* q = t.const_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) out[c] = q[c];
  }
}

template <typename A>
const A* opt_ptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

// ------------------------------------------------------------- entry points --

// The output y3 must be a contiguous tensor of x3's shape and dtype (it may be
// a view of a larger tensor's memory, e.g. of a channels-last output).
inline void check_out(const Tensor& x3, const Tensor& out, const char* op, const char* what) {
  TORCH_CHECK(
      out.defined() && out.is_contiguous() && out.sizes() == x3.sizes() && out.scalar_type() == x3.scalar_type() &&
          out.device().is_cpu(),
      "bnkit::", op, ": ", what, " must be a contiguous CPU tensor of x3's shape ", x3.sizes(), " and dtype ",
      x3.scalar_type());
}

} // namespace

std::tuple<Tensor, Tensor> batch_norm_train_into(
    const Tensor& x3_,
    const Tensor& y3,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    double eps) {
  const Tensor x3 = check_x3(x3_, "batch_norm_train");
  TORCH_CHECK(eps >= 0, "bnkit::batch_norm_train: eps must be >= 0, got ", eps);
  if (y3.defined()) check_out(x3, y3, "batch_norm_train", "the output");
  const Shape s = shape_of(x3);
  const auto acc = acc_dtype(x3.scalar_type());
  Tensor w, b;
  if (weight.has_value() && weight->defined()) w = check_param(*weight, s.C, acc, "batch_norm_train", "weight");
  if (bias.has_value() && bias->defined()) b = check_param(*bias, s.C, acc, "batch_norm_train", "bias");
  Tensor mean = at::empty({s.C}, x3.options().dtype(acc));
  Tensor var = at::empty({s.C}, x3.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::batch_norm_train", [&] {
    using A = typename AccT<scalar_t>::type;
    train_kernel<scalar_t>(
        x3.const_data_ptr<scalar_t>(),
        y3.defined() ? y3.mutable_data_ptr<scalar_t>() : nullptr,
        s,
        opt_ptr<A>(w),
        opt_ptr<A>(b),
        eps,
        mean.mutable_data_ptr<A>(),
        var.mutable_data_ptr<A>());
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cpu(
    const Tensor& x3,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    double eps) {
  Tensor y = at::empty(x3.sizes(), x3.options().memory_format(at::MemoryFormat::Contiguous));
  auto [mean, var] = batch_norm_train_into(x3, y, weight, bias, eps);
  return {y, mean, var};
}

std::tuple<Tensor, Tensor> moments_cpu(const Tensor& x3_) {
  const Tensor x3 = check_x3(x3_, "moments");
  const Shape s = shape_of(x3);
  const auto acc = acc_dtype(x3.scalar_type());
  Tensor mean = at::empty({s.C}, x3.options().dtype(acc));
  Tensor var = at::empty({s.C}, x3.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::moments", [&] {
    using A = typename AccT<scalar_t>::type;
    train_kernel<scalar_t>(
        x3.const_data_ptr<scalar_t>(),
        nullptr,
        s,
        nullptr,
        nullptr,
        0.0,
        mean.mutable_data_ptr<A>(),
        var.mutable_data_ptr<A>());
  });
  return {mean, var};
}

Tensor batch_norm_eval_cpu(const Tensor& x3_, const Tensor& scale_, const Tensor& shift_) {
  const Tensor x3 = check_x3(x3_, "batch_norm_eval");
  const Shape s = shape_of(x3);
  const auto acc = acc_dtype(x3.scalar_type());
  const Tensor scale = check_param(scale_, s.C, acc, "batch_norm_eval", "scale");
  const Tensor shift = check_param(shift_, s.C, acc, "batch_norm_eval", "shift");
  Tensor y = at::empty_like(x3, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::batch_norm_eval", [&] {
    using A = typename AccT<scalar_t>::type;
    apply_affine<false, scalar_t, A>(
        x3.const_data_ptr<scalar_t>(),
        y.mutable_data_ptr<scalar_t>(),
        s,
        nullptr,
        nullptr,
        scale.const_data_ptr<A>(),
        shift.const_data_ptr<A>());
  });
  return y;
}

void batch_norm_infer_into(
    const Tensor& x3_,
    const Tensor& y,
    const Tensor& mean_,
    const Tensor& var_,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    double eps) {
  const Tensor x3 = check_x3(x3_, "batch_norm_infer");
  TORCH_CHECK(eps >= 0, "bnkit::batch_norm_infer: eps must be >= 0, got ", eps);
  const Shape s = shape_of(x3);
  const auto acc = acc_dtype(x3.scalar_type());
  // The parameters read as double straight from float32/float64 tensors (no
  // conversion tensors: they cost more than the kernel on small inputs).
  std::vector<double> mean, var, w, b;
  param_as_double(mean_, s.C, "batch_norm_infer", "mean", mean);
  param_as_double(var_, s.C, "batch_norm_infer", "var", var);
  if (weight.has_value() && weight->defined()) param_as_double(*weight, s.C, "batch_norm_infer", "weight", w);
  if (bias.has_value() && bias->defined()) param_as_double(*bias, s.C, "batch_norm_infer", "bias", b);
  check_out(x3, y, "batch_norm_infer", "the output");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::batch_norm_infer", [&] {
    using A = typename AccT<scalar_t>::type;
    const double* m = mean.data();
    const double* v = var.data();
    const double* wp = w.empty() ? nullptr : w.data();
    const double* bp = b.empty() ? nullptr : b.data();
    // Folded in double, applied as one multiply-add per value (as ATen does).
    std::vector<A> sc(s.C), sh(s.C);
    fold_params(s.C, m, v, wp, bp, eps, sc.data(), sh.data());
    apply_affine<false, scalar_t, A>(
        x3.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), s, nullptr, nullptr, sc.data(), sh.data());
  });
  (void)acc;
}

Tensor batch_norm_infer_cpu(
    const Tensor& x3,
    const Tensor& mean,
    const Tensor& var,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    double eps) {
  Tensor y = at::empty(x3.sizes(), x3.options().memory_format(at::MemoryFormat::Contiguous));
  batch_norm_infer_into(x3, y, mean, var, weight, bias, eps);
  return y;
}

std::tuple<Tensor, Tensor> batch_norm_backward_into(
    const Tensor& grad_y3_,
    const Tensor& x3_,
    const Tensor& mean_,
    const Tensor& var_,
    const std::optional<Tensor>& weight,
    double eps,
    const Tensor& dx) {
  const Tensor x3 = check_x3(x3_, "batch_norm_backward");
  check_out(x3, dx, "batch_norm_backward", "grad_x3");
  const Tensor gx = check_grad(grad_y3_, x3, "batch_norm_backward");
  const Shape s = shape_of(x3);
  const auto acc = acc_dtype(x3.scalar_type());
  const Tensor mean = check_param(mean_, s.C, acc, "batch_norm_backward", "mean");
  const Tensor var = check_param(var_, s.C, acc, "batch_norm_backward", "var");
  Tensor w;
  if (weight.has_value() && weight->defined()) w = check_param(*weight, s.C, acc, "batch_norm_backward", "weight");
  Tensor dw = at::empty({s.C}, x3.options().dtype(acc));
  Tensor db = at::empty({s.C}, x3.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::batch_norm_backward", [&] {
    using A = typename AccT<scalar_t>::type;
    backward_kernel<scalar_t>(
        gx.const_data_ptr<scalar_t>(),
        x3.const_data_ptr<scalar_t>(),
        dx.mutable_data_ptr<scalar_t>(),
        s,
        mean.const_data_ptr<A>(),
        var.const_data_ptr<A>(),
        opt_ptr<A>(w),
        eps,
        dw.mutable_data_ptr<A>(),
        db.mutable_data_ptr<A>());
  });
  return {dw, db};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_y3,
    const Tensor& x3,
    const Tensor& mean,
    const Tensor& var,
    const std::optional<Tensor>& weight,
    double eps) {
  Tensor dx = at::empty(x3.sizes(), x3.options().memory_format(at::MemoryFormat::Contiguous));
  auto [dw, db] = batch_norm_backward_into(grad_y3, x3, mean, var, weight, eps, dx);
  return {dx, dw, db};
}

Tensor batch_norm_backward_apply_cpu(
    const Tensor& grad_y3_,
    const Tensor& x3_,
    const Tensor& mean_,
    const Tensor& var_,
    const std::optional<Tensor>& weight,
    const Tensor& sum_dy,
    const Tensor& sum_dy_xhat,
    int64_t count,
    double eps) {
  const char* op = "batch_norm_backward_apply";
  const Tensor x3 = check_x3(x3_, op);
  const Tensor gx = check_grad(grad_y3_, x3, op);
  TORCH_CHECK(count >= 0, "bnkit::", op, ": count must be >= 0, got ", count);
  const Shape s = shape_of(x3);
  const auto acc = acc_dtype(x3.scalar_type());
  const Tensor mean = check_param(mean_, s.C, acc, op, "mean");
  const Tensor var = check_param(var_, s.C, acc, op, "var");
  Tensor w;
  if (weight.has_value() && weight->defined()) w = check_param(*weight, s.C, acc, op, "weight");
  std::vector<double> sg, sxhat;
  param_as_double(sum_dy, s.C, op, "sum_dy", sg);
  param_as_double(sum_dy_xhat, s.C, op, "sum_dy_xhat", sxhat);
  Tensor dx = at::empty(x3.sizes(), x3.options().memory_format(at::MemoryFormat::Contiguous));
  std::vector<double> sx(s.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::batch_norm_backward_apply", [&] {
    using A = typename AccT<scalar_t>::type;
    const A* v = var.const_data_ptr<A>();
    // sum(g * (x - mean)) = sum(g * xhat) * sqrt(var + eps)
    for (int64_t c = 0; c < s.C; ++c) sx[c] = sxhat[c] * std::sqrt(static_cast<double>(v[c]) + eps);
    const Sums given{sg.data(), sx.data(), count};
    std::vector<A> dw(s.C), db(s.C); // the global dw, db: not this phase's result
    backward_kernel<scalar_t>(
        gx.const_data_ptr<scalar_t>(),
        x3.const_data_ptr<scalar_t>(),
        dx.mutable_data_ptr<scalar_t>(),
        s,
        mean.const_data_ptr<A>(),
        v,
        opt_ptr<A>(w),
        eps,
        dw.data(),
        db.data(),
        &given);
  });
  return dx;
}

bool update_running_stats_cpu(
    Tensor& running_mean,
    Tensor& running_var,
    const Tensor& mean_,
    const Tensor& var_,
    double factor,
    int64_t count,
    bool check_finite) {
  const int64_t C = running_mean.numel();
  TORCH_CHECK(
      running_var.numel() == C && mean_.numel() == C && var_.numel() == C,
      "bnkit::update_running_stats_: running_mean, running_var, mean and var must have the same number of "
      "elements, got ",
      C,
      ", ",
      running_var.numel(),
      ", ",
      mean_.numel(),
      ", ",
      var_.numel());
  TORCH_CHECK(
      running_mean.is_contiguous() && running_var.is_contiguous() &&
          running_mean.scalar_type() == running_var.scalar_type() && running_mean.device().is_cpu() &&
          running_var.device().is_cpu(),
      "bnkit::update_running_stats_: running_mean and running_var must be contiguous CPU tensors of one dtype");
  if (count == 0) return true;
  // The batch statistics as double (no new tensor for the usual float32/float64).
  std::vector<double> m(C), v(C);
  auto read = [&](const Tensor& t, std::vector<double>& out) {
    const Tensor tc = t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)
        ? t
        : t.to(at::kDouble).contiguous();
    if (tc.scalar_type() == at::kFloat) {
      const float* p = tc.const_data_ptr<float>();
      for (int64_t c = 0; c < C; ++c) out[c] = p[c];
    } else {
      const double* p = tc.const_data_ptr<double>();
      for (int64_t c = 0; c < C; ++c) out[c] = p[c];
    }
  };
  read(mean_, m);
  read(var_, v);
  if (check_finite) {
    double acc = 0;
    for (int64_t c = 0; c < C; ++c) acc += v[c] + m[c] * 0.0;
    if (!std::isfinite(acc)) return false;
  }
  const double unbias = count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1)
                                  : std::numeric_limits<double>::infinity();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, running_mean.scalar_type(), "bnkit::update_running_stats_", [&] {
        scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
        scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
        for (int64_t c = 0; c < C; ++c) {
          rm[c] = static_cast<scalar_t>(factor * m[c] + (1.0 - factor) * static_cast<double>(rm[c]));
          rv[c] = static_cast<scalar_t>(factor * v[c] * unbias + (1.0 - factor) * static_cast<double>(rv[c]));
        }
      });
  return true;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_eval_backward_cpu(
    const Tensor& grad_y3_,
    const Tensor& x3_,
    const Tensor& scale_) {
  const Tensor x3 = check_x3(x3_, "batch_norm_eval_backward");
  const Tensor gx = check_grad(grad_y3_, x3, "batch_norm_eval_backward");
  const Shape s = shape_of(x3);
  const auto acc = acc_dtype(x3.scalar_type());
  const Tensor scale = check_param(scale_, s.C, acc, "batch_norm_eval_backward", "scale");
  Tensor dx = at::empty_like(x3, at::MemoryFormat::Contiguous);
  Tensor dscale = at::empty({s.C}, x3.options().dtype(at::kDouble));
  Tensor dshift = at::empty({s.C}, x3.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::batch_norm_eval_backward", [&] {
    using A = typename AccT<scalar_t>::type;
    eval_backward_kernel<scalar_t>(
        gx.const_data_ptr<scalar_t>(),
        x3.const_data_ptr<scalar_t>(),
        dx.mutable_data_ptr<scalar_t>(),
        s,
        scale.const_data_ptr<A>(),
        dscale.mutable_data_ptr<double>(),
        dshift.mutable_data_ptr<double>());
  });
  return {dx, dscale.to(acc), dshift.to(acc)};
}

} // namespace bnkit
