// bnkit: what the fused kernels' drivers share (kernels.cpp: the forward ops,
// kernels_backward.cpp: the backward ops, domain.cpp: the per-domain ops):
// shapes, the parallel schedules, the per-channel finishing steps, the choice
// of non-temporal stores, and the argument checks of the entry points.
// Parallelization is at::parallel_for (torch's own thread pool, honours
// torch.set_num_threads); the innermost loops (`#pragma omp simd`) live in
// rowkernels_impl.h and are compiled per instruction set (see rowkernels.h).
#pragma once

#include "bnkit_kernels.h"
#include "rowkernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace bnkit {

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

// The element-wise pass of the drivers, in parallel: NCHW-like layouts (S > 1)
// as span(off, c0, nch) for the runs of rows (n, c0 .. c0 + nch) within one
// sample (off: the run's first value), channels-last (S == 1) as rows(r0, r1)
// for the rows [r0, r1) of C values.
template <typename Span, typename Rows>
void elementwise(const Shape& s, const Span& span, const Rows& rows) {
  const int64_t N = s.N, C = s.C, S = s.S;
  if (S > 1) {
    const int64_t grain = std::max<int64_t>(1, kGrain / S);
    at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
      for_runs(r0, r1, C, [&](int64_t n, int64_t c0, int64_t c1) { span((n * C + c0) * S, c0, c1 - c0); });
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / C);
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) { rows(r0, r1); });
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
// that (x - hi) - lo is exact to A's rounding even when |mean| >> std.  An
// infinite hi (an infinite or, in A, overflowing mean) has lo = 0, so that
// x - mean is -/+inf as in torch, not inf - inf = NaN.
template <typename A, typename M>
void split_mean(int64_t n, const M* __restrict mean, A* __restrict hi, A* __restrict lo) {
  for (int64_t c = 0; c < n; ++c) {
    hi[c] = static_cast<A>(mean[c]);
    const double rest = static_cast<double>(mean[c]) - static_cast<double>(hi[c]);
    lo[c] = std::isinf(static_cast<double>(hi[c])) ? A(0) : static_cast<A>(rest);
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
template <typename A, typename V>
void backward_coefs(
    int64_t n, int64_t M, const V* __restrict var, const A* __restrict w, const double* __restrict sg,
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


// ------------------------------------------------------------ arg checks --

inline Tensor check_x3(const Tensor& x3, const char* op, const char* what = "x3") {
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
inline Tensor check_grad(const Tensor& grad_y3, const Tensor& x3, const char* op) {
  const Tensor g = check_x3(grad_y3, op, "grad_y3");
  TORCH_CHECK(
      g.sizes() == x3.sizes(), "bnkit::", op, ": grad_y3 has shape ", g.sizes(), " but x3 has shape ", x3.sizes());
  return g.to(x3.scalar_type()).contiguous();
}

// A per-channel parameter as a contiguous tensor of the accumulation dtype.
inline Tensor check_param(const Tensor& p, int64_t C, at::ScalarType acc, const char* op, const char* name) {
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

// The values of a contiguous float32 or float64 tensor, as double.
inline void copy_as_double(const Tensor& t, double* out) {
  const int64_t n = t.numel();
  if (t.scalar_type() == at::kDouble) {
    const double* q = t.const_data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) out[i] = q[i];
  } else {
    const float* q = t.const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) out[i] = q[i];
  }
}

// A per-channel parameter's values as double (checked as check_param does).
inline void param_as_double(const Tensor& p, int64_t C, const char* op, const char* name, std::vector<double>& out) {
  const Tensor t = check_param(p, C, p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat, op, name);
  out.resize(C);
  copy_as_double(t, out.data());
}

template <typename A>
const A* opt_ptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

// The output y3 must be a contiguous tensor of x3's shape and dtype (it may be
// a view of a larger tensor's memory, e.g. of a channels-last output).
inline void check_out(const Tensor& x3, const Tensor& out, const char* op, const char* what) {
  TORCH_CHECK(
      out.defined() && out.is_contiguous() && out.sizes() == x3.sizes() && out.scalar_type() == x3.scalar_type() &&
          out.device().is_cpu(),
      "bnkit::", op, ": ", what, " must be a contiguous CPU tensor of x3's shape ", x3.sizes(), " and dtype ",
      x3.scalar_type());
}


// An entry point's checked input: x3 contiguous, its shape, its accumulation
// dtype and the op's name for the messages (checks in the order of the calls).
struct Checked {
  Tensor x3;
  Shape s;
  at::ScalarType acc;
  const char* op;
  Checked(const Tensor& x3_, const char* op_)
      : x3(check_x3(x3_, op_)), s(shape_of(x3)), acc(acc_dtype(x3.scalar_type())), op(op_) {}
  // A per-channel parameter (check_param); absent: undefined.
  Tensor param(const Tensor& p, const char* name) const {
    return check_param(p, s.C, acc, op, name);
  }
  Tensor param(const std::optional<Tensor>& p, const char* name) const {
    return present(p) ? param(*p, name) : Tensor();
  }
  // grad_y3 checked against x3 (check_grad).
  Tensor grad(const Tensor& g) const {
    return check_grad(g, x3, op);
  }
  // A fresh per-channel result in the accumulation dtype.
  Tensor stat() const {
    return at::empty({s.C}, x3.options().dtype(acc));
  }
};

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

// The activation `act` over the per-channel values of one normalization.
template <typename A>
FusedAct<A> fused_act(const Activation& act, const A* mhi, const A* mlo, const A* sc, const A* sh) {
  return {mhi, mlo, sc, sh, static_cast<A>(act.lo), static_cast<A>(act.hi), act.kind};
}

} // namespace bnkit
