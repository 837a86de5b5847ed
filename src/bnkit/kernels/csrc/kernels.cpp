// bnkit: fused CPU Batch Normalization kernels, the forward ops (training,
// moments, eval, inference, running statistics); the backward ops are in
// kernels_backward.cpp, what both share in drivers.h.
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
#include "drivers.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace bnkit {
namespace {

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
      s, sum.data(), sumsq.data(),
      [&](int64_t n, int64_t c0, int64_t c1, double* a, double* b) {
        rk.moments(x + (n * C + c0) * S, c1 - c0, S, K.data() + c0, a, b);
      },
      [&](int64_t r0, int64_t r1, A* sa, A* sb) { rk.cl_moments(x + r0 * C, r1 - r0, C, K.data(), sa, sb); });
  finish_moments(C, s.M(), K.data(), sum.data(), sumsq.data(), mean, var);
}

template <bool kCenter, typename T, typename A>
void apply_affine(
    const T* x, T* y, const Shape& s, const A* mhi, const A* mlo, const A* sc, const A* sh, bool eval = !kCenter) {
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
  const bool nt = S > 1 ? rk.span_normalize_nt != nullptr : cl_nt_ok(rk.cl_normalize_nt, s, y);
  if (nt && use_nt_stores<T>(s, y, eval ? Pass::kEval : Pass::kTrain)) {
    if (!kCenter) {
      zeros.assign(C, A(0)); // x - 0 - 0 == x exactly: the same values as x * sc + sh
      mhi = mlo = zeros.data();
    }
    elementwise(
        s,
        [&](int64_t off, int64_t c0, int64_t nch) {
          rk.span_normalize_nt(x + off, y + off, nch, S, mhi + c0, mlo + c0, sc + c0, sh + c0);
        },
        [&](int64_t r0, int64_t r1) { rk.cl_normalize_nt(x + r0 * C, y + r0 * C, r1 - r0, C, mhi, mlo, sc, sh); });
    return;
  }
  elementwise(
      s,
      [&](int64_t off, int64_t c0, int64_t nch) {
        if (kCenter)
          rk.normalize(x + off, y + off, nch, S, mhi + c0, mlo + c0, sc + c0, sh + c0);
        else
          rk.scale_shift(x + off, y + off, nch, S, sc + c0, sh + c0);
      },
      [&](int64_t r0, int64_t r1) {
        if (kCenter)
          rk.cl_normalize(x + r0 * C, y + r0 * C, r1 - r0, C, mhi, mlo, sc, sh);
        else
          rk.cl_scale_shift(x + r0 * C, y + r0 * C, r1 - r0, C, sc, sh);
      });
}

// y = act(((x - mhi) - mlo) * sc + sh) in parallel (BN + FusedAct; through
// the cache: the next layer reads y).
template <typename T, typename A>
void apply_act(const T* x, T* y, const Shape& s, const FusedAct<A>& ca) {
  const RowKernels<T>& rk = row_kernels_for<T>();
  const int64_t C = s.C, S = s.S;
  if (s.N == 0 || C == 0 || S == 0) return;
  elementwise(
      s, [&](int64_t off, int64_t c0, int64_t nch) { rk.normalize_act[ca.kind](x + off, y + off, nch, S, ca.at(c0)); },
      [&](int64_t r0, int64_t r1) { rk.cl_normalize_act[ca.kind](x + r0 * C, y + r0 * C, r1 - r0, C, ca); });
}

// --------------------------------------------------------------- forward --

// With `act`: y = clamp(BN(x)), and the normalization's per-channel values
// (mhi, mlo, sc, sh: 4 arrays of C) into act_o.
template <typename T, typename A = typename AccT<T>::type>
void train_kernel(
    const T* x, T* y, const Shape& s, const A* w, const A* b, double eps, A* mean_o, A* var_o,
    const Activation* act = nullptr, A* act_o = nullptr) {
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
        if (act != nullptr) {
          for (int k = 0; k < 4; ++k) {
            const A* from = k == 0 ? mhi.data() : k == 1 ? mlo.data() : k == 2 ? sc.data() : sh.data();
            std::copy(from, from + m, act_o + k * C + c0);
          }
          const FusedAct<A> ca = fused_act(*act, mhi.data(), mlo.data(), sc.data(), sh.data());
          for (int64_t n = 0; n < N; ++n) {
            const int64_t off = (n * C + c0) * S;
            rk.normalize_act[ca.kind](x + off, y + off, m, S, ca);
          }
        } else if (y != nullptr) {
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
  if (act != nullptr) { // the per-channel values straight into act_o
    A *o_mhi = act_o, *o_mlo = act_o + C, *o_sc = act_o + 2 * C, *o_sh = act_o + 3 * C;
    train_params(C, mean.data(), var.data(), w, b, eps, mean_o, var_o, o_mhi, o_mlo, o_sc, o_sh);
    apply_act<T, A>(x, y, s, fused_act(*act, o_mhi, o_mlo, o_sc, o_sh));
    return;
  }
  train_params(C, mean.data(), var.data(), w, b, eps, mean_o, var_o, mhi.data(), mlo.data(), sc.data(), sh.data());
  if (y != nullptr) apply_affine<true, T, A>(x, y, s, mhi.data(), mlo.data(), sc.data(), sh.data());
}

// The training forward's statistics (and y3 where defined) for a checked x3:
// the kernel of batch_norm_train_into and moments_cpu.
std::tuple<Tensor, Tensor> train_stats(
    const Checked& in, const Tensor& y3, const Tensor& w, const Tensor& b, double eps, const Activation* act = nullptr,
    Tensor* act_params = nullptr) {
  Tensor mean = in.stat(), var = in.stat();
  if (act != nullptr) *act_params = at::empty({4, in.s.C}, in.x3.options().dtype(in.acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x3.scalar_type(), "bnkit::batch_norm_train", [&] {
    using A = typename AccT<scalar_t>::type;
    train_kernel<scalar_t>(
        in.x3.const_data_ptr<scalar_t>(), y3.defined() ? y3.mutable_data_ptr<scalar_t>() : nullptr, in.s,
        opt_ptr<A>(w), opt_ptr<A>(b), eps, mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>(), act,
        act != nullptr ? act_params->mutable_data_ptr<A>() : nullptr);
  });
  return {mean, var};
}

// y3 = x3 * sc[c] + sh[c] for a checked x3: the kernel of the eval and
// inference ops.  params(sc, sh) returns the (sc, sh) pointers in A, the
// given ones or ones it computes into the two scratch vectors.  With `act`:
// y3 = clamp(that).
template <typename Params>
void scale_shift_into(const Checked& in, const Tensor& y3, const Params& params, const Activation* act = nullptr) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x3.scalar_type(), "bnkit::batch_norm_eval", [&] {
    using A = typename AccT<scalar_t>::type;
    std::vector<A> scratch_sc, scratch_sh;
    const auto [sc, sh] = params(scratch_sc, scratch_sh);
    const scalar_t* x = in.x3.const_data_ptr<scalar_t>();
    scalar_t* y = y3.mutable_data_ptr<scalar_t>();
    if (act != nullptr) { // x - 0 - 0 == x exactly: the values of x * sc + sh, clamped
      const std::vector<A> zeros(in.s.C, A(0));
      apply_act<scalar_t, A>(x, y, in.s, fused_act(*act, zeros.data(), zeros.data(), sc, sh));
      return;
    }
    apply_affine<false, scalar_t, A>(x, y, in.s, nullptr, nullptr, sc, sh);
  });
}

} // namespace

std::tuple<Tensor, Tensor> batch_norm_train_into(
    const Tensor& x3, const Tensor& y3, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    double eps, const Activation* act, Tensor* act_params) {
  const Checked in(x3, "batch_norm_train");
  TORCH_CHECK(eps >= 0, "bnkit::batch_norm_train: eps must be >= 0, got ", eps);
  if (y3.defined()) check_out(in.x3, y3, in.op, "the output");
  TORCH_CHECK(
      act == nullptr || (y3.defined() && act_params != nullptr),
      "bnkit::batch_norm_train: a fused activation needs the output and act_params");
  const Tensor w = in.param(weight, "weight"), b = in.param(bias, "bias");
  return train_stats(in, y3, w, b, eps, act, act_params);
}

std::tuple<Tensor, Tensor> moments_cpu(const Tensor& x3) {
  return train_stats(Checked(x3, "moments"), Tensor(), Tensor(), Tensor(), 0.0);
}

Tensor batch_norm_eval_cpu(const Tensor& x3, const Tensor& scale_, const Tensor& shift_) {
  const Checked in(x3, "batch_norm_eval");
  const Tensor scale = in.param(scale_, "scale"), shift = in.param(shift_, "shift");
  Tensor y = at::empty_like(in.x3, at::MemoryFormat::Contiguous);
  scale_shift_into(in, y, [&](auto& sc, auto&) {
    using A = typename std::decay_t<decltype(sc)>::value_type;
    return std::make_pair(scale.const_data_ptr<A>(), shift.const_data_ptr<A>());
  });
  return y;
}

void batch_norm_infer_into(
    const Tensor& x3, const Tensor& y, const Tensor& mean_, const Tensor& var_, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps, const Activation* act) {
  const Checked in(x3, "batch_norm_infer");
  TORCH_CHECK(eps >= 0, "bnkit::batch_norm_infer: eps must be >= 0, got ", eps);
  const int64_t C = in.s.C;
  // The parameters read as double straight from float32/float64 tensors (no
  // conversion tensors: they cost more than the kernel on small inputs).
  std::vector<double> mean, var, w, b;
  param_as_double(mean_, C, in.op, "mean", mean);
  param_as_double(var_, C, in.op, "var", var);
  if (present(weight)) param_as_double(*weight, C, in.op, "weight", w);
  if (present(bias)) param_as_double(*bias, C, in.op, "bias", b);
  check_out(in.x3, y, in.op, "the output");
  // Folded in double, applied as one multiply-add per value (as ATen does).
  scale_shift_into(in, y, [&](auto& sc, auto& sh) {
    sc.resize(C);
    sh.resize(C);
    fold_params(
        C, mean.data(), var.data(), w.empty() ? nullptr : w.data(), b.empty() ? nullptr : b.data(), eps, sc.data(),
        sh.data());
    return std::make_pair(sc.data(), sh.data());
  }, act);
}

bool update_running_stats_cpu(
    Tensor& running_mean, Tensor& running_var, const Tensor& mean_, const Tensor& var_, double factor, int64_t count,
    bool check_finite) {
  const int64_t C = running_mean.numel();
  TORCH_CHECK(
      running_var.numel() == C && mean_.numel() == C && var_.numel() == C,
      "bnkit::update_running_stats_: running_mean, running_var, mean and var must have the same number of "
      "elements, got ", C, ", ", running_var.numel(), ", ", mean_.numel(), ", ", var_.numel());
  TORCH_CHECK(
      running_mean.is_contiguous() && running_var.is_contiguous() &&
          running_mean.scalar_type() == running_var.scalar_type() && running_mean.device().is_cpu() &&
          running_var.device().is_cpu(),
      "bnkit::update_running_stats_: running_mean and running_var must be contiguous CPU tensors of one dtype");
  if (count == 0) return true;
  // The batch statistics as double (no new tensor for the usual float32/float64).
  std::vector<double> m(C), v(C);
  auto read = [&](const Tensor& t, std::vector<double>& out) {
    copy_as_double(
        t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)
            ? t
            : t.to(at::kDouble).contiguous(),
        out.data());
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

} // namespace bnkit
