// bnkit: masked BN kernels (padded sequences), on the canonical view x3 = (outer, C, inner)
// with a bool validity mask m2 = (outer, inner) (True = valid; the same for every channel).
//
// Ops:
//   bnkit::masked_moments(x3, m2) -> (mean, biased var)        over the valid entries
//   bnkit::masked_train(x3, m2, weight?, bias?, eps) -> (y3, mean, biased var)
//       every entry (padded ones too) is normalized with the valid entries' statistics
//   bnkit::masked_backward(grad_y3, x3, m2, mean, var, weight?, eps)
//       -> (grad_x3, sum dy * xhat, sum dy)   (the last two: weight and bias gradients)
//       valid entries: BN's backward over the n valid values,
//         dx = w invstd (dy - sum(dy)/n - xhat sum(dy xhat)/n);
//       padded entries (constant statistics): dx = w invstd dy; their dy enters no sum.
//
// Statistics are two-pass and accumulate in float blocks of kBlock rows added to
// double per-thread partials (double for double inputs).  Padded entries are
// skipped (rows layout) or selected away (never multiplied by 0), so NaN/Inf in
// the padding cannot reach the statistics or the sums.  The autograd wrapper is
// in Python (bnkit.kernels._MaskedTrain); each op has a Meta kernel, from the
// same function template as its CPU kernel (op_def.h).
#include "bnkit_kernels.h"
#include "op_def.h"
#include "rowkernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace bnkit {
namespace {

using at::Tensor;

constexpr int64_t kBlock = 128;  // rows summed in the accumulation dtype before a double add

void check_args(const Tensor& x3, const Tensor& m2, const char* op) {
  TORCH_CHECK(x3.dim() == 3, op, ": expected the canonical 3-D view (outer, C, inner), got ", x3.dim(), "-D");
  TORCH_CHECK(m2.scalar_type() == at::kBool, op, ": the mask must be bool, got ", m2.scalar_type());
  TORCH_CHECK(m2.dim() == 2 && m2.size(0) == x3.size(0) && m2.size(1) == x3.size(2), op,
              ": the mask must have shape (outer, inner) = (", x3.size(0), ", ", x3.size(2), "), got ",
              m2.sizes());
}

int64_t count_valid(const bool* m, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += m[i] ? 1 : 0;
  return count;
}

// Per-channel sums over the valid entries of f(x[c], c) (two accumulators: a, b), into double.
// Rows layout (inner == 1): threads split the rows, partials per thread; else threads split channels.
template <typename scalar_t, typename Fn>
void masked_reduce(const scalar_t* x, const scalar_t* g, const bool* m, int64_t O, int64_t C, int64_t I,
                   double* out_a, double* out_b, const Fn& fn) {
  using acc_t = typename AccT<scalar_t>::type;
  if (I == 1) {
    const int nthreads = at::get_num_threads();
    std::vector<double> part(static_cast<size_t>(nthreads) * 2 * C, 0.0);
    at::parallel_for(0, O, 256, [&](int64_t begin, int64_t end) {
      double* pa = part.data() + static_cast<size_t>(at::get_thread_num()) * 2 * C;
      double* pb = pa + C;
      std::vector<acc_t> ba(C), bb(C);
      for (int64_t r0 = begin; r0 < end; r0 += kBlock) {
        std::fill(ba.begin(), ba.end(), acc_t(0));
        std::fill(bb.begin(), bb.end(), acc_t(0));
        const int64_t r1 = std::min(end, r0 + kBlock);
        for (int64_t r = r0; r < r1; ++r) {
          if (!m[r]) continue;
          const scalar_t* xr = x + r * C;
          const scalar_t* gr = (g ? g : x) + r * C;  // no gradient: x read twice (same line)
          acc_t* a = ba.data();
          acc_t* b = bb.data();
          for (int64_t c = 0; c < C; ++c) {
            acc_t va, vb;
            fn(static_cast<acc_t>(xr[c]), static_cast<acc_t>(gr[c]), c, va, vb);
            a[c] += va;
            b[c] += vb;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          pa[c] += ba[c];
          pb[c] += bb[c];
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double a = 0, b = 0;
      for (int t = 0; t < nthreads; ++t) {
        a += part[static_cast<size_t>(t) * 2 * C + c];
        b += part[static_cast<size_t>(t) * 2 * C + C + c];
      }
      out_a[c] = a;
      out_b[c] = b;
    }
    return;
  }
  at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      double a = 0, b = 0;
      for (int64_t o = 0; o < O; ++o) {
        const scalar_t* xr = x + (o * C + c) * I;
        const scalar_t* gr = (g ? g : x) + (o * C + c) * I;
        const bool* mr = m + o * I;
        acc_t ba = 0, bb = 0;
        for (int64_t i = 0; i < I; ++i) {
          acc_t va, vb;
          fn(static_cast<acc_t>(xr[i]), static_cast<acc_t>(gr[i]), c, va, vb);
          ba += mr[i] ? va : acc_t(0);
          bb += mr[i] ? vb : acc_t(0);
        }
        a += ba;
        b += bb;
      }
      out_a[c] = a;
      out_b[c] = b;
    }
  });
}

// mean and biased variance (two-pass) of the valid entries; count 0 gives zeros.
template <typename scalar_t>
void masked_stats(const scalar_t* x, const bool* m, int64_t O, int64_t C, int64_t I, int64_t count,
                  std::vector<double>& mean, std::vector<double>& var) {
  using acc_t = typename AccT<scalar_t>::type;
  std::vector<double> s(C), unused(C);
  masked_reduce<scalar_t>(x, nullptr, m, O, C, I, s.data(), unused.data(),
                          [](acc_t v, acc_t, int64_t, acc_t& a, acc_t& b) {
                            a = v;
                            b = 0;
                          });
  const double denom = static_cast<double>(std::max<int64_t>(count, 1));
  std::vector<acc_t> mu(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = s[c] / denom;
    mu[c] = static_cast<acc_t>(mean[c]);
  }
  const acc_t* mp = mu.data();
  masked_reduce<scalar_t>(x, nullptr, m, O, C, I, s.data(), unused.data(),
                          [mp](acc_t v, acc_t, int64_t c, acc_t& a, acc_t& b) {
                            const acc_t d = v - mp[c];
                            a = d * d;
                            b = 0;
                          });
  for (int64_t c = 0; c < C; ++c) var[c] = s[c] / denom;
}

// The element-wise pass of masked_train and masked_backward, in parallel:
// rows(r) for each row r of C values (inner == 1), else span(oc, c) for each
// run of `inner` values of (outer, channel) row oc, c = oc % C.
template <typename Rows, typename Span>
void masked_elementwise(int64_t O, int64_t C, int64_t I, const Rows& rows, const Span& span) {
  if (I == 1) {
    at::parallel_for(0, O, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rows(r);
    });
  } else {
    at::parallel_for(0, O * C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t oc = begin; oc < end; ++oc) span(oc, oc % C);
    });
  }
}

// Two per-channel double results into the op's (C,) output tensors, in acc_t.
template <typename acc_t>
void store(const std::vector<double>& a, const std::vector<double>& b, Tensor& out_a, Tensor& out_b) {
  acc_t* pa = out_a.data_ptr<acc_t>();
  acc_t* pb = out_b.data_ptr<acc_t>();
  for (size_t c = 0; c < a.size(); ++c) {
    pa[c] = static_cast<acc_t>(a[c]);
    pb[c] = static_cast<acc_t>(b[c]);
  }
}

// Per-channel acc_t copies of an optional parameter (default fill).
template <typename acc_t>
std::vector<acc_t> param(const c10::optional<Tensor>& t, int64_t C, acc_t fill) {
  std::vector<acc_t> out(C, fill);
  if (t.has_value() && t->defined()) {
    Tensor v = t->to(at::kDouble).contiguous();
    TORCH_CHECK(v.numel() == C, "bnkit masked op: weight/bias must have ", C, " elements, got ", v.numel());
    const double* p = v.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(p[c]);
  }
  return out;
}

// A masked op's checked arguments: x3 and the mask contiguous, the shape, and
// the op's two per-channel results (accumulation dtype, not yet written).
struct Masked {
  Tensor x3, m2;
  int64_t O, C, I;
  Tensor out_a, out_b;
  Masked(const Tensor& x3_in, const Tensor& m2_in, const char* op) {
    check_args(x3_in, m2_in, op);
    x3 = x3_in.contiguous();
    m2 = m2_in.contiguous();
    O = x3.size(0), C = x3.size(1), I = x3.size(2);
    const auto opts = x3.options().dtype(acc_dtype(x3.scalar_type()));
    out_a = at::empty({C}, opts);
    out_b = at::empty({C}, opts);
  }
  const bool* mask() const {
    return m2.data_ptr<bool>();
  }
  int64_t count() const {
    return count_valid(mask(), O * I);
  }
};

// The valid entries' mean and biased variance (masked_stats), as double in
// mu and v and in acc_t into the op's two results (masked_moments and the
// first phase of masked_train).
template <typename scalar_t>
void stats_into(Masked& in, std::vector<double>& mu, std::vector<double>& v) {
  mu.resize(in.C);
  v.resize(in.C);
  masked_stats<scalar_t>(in.x3.data_ptr<scalar_t>(), in.mask(), in.O, in.C, in.I, in.count(), mu, v);
  store<typename AccT<scalar_t>::type>(mu, v, in.out_a, in.out_b);
}

// The ops' CPU kernels (kMeta false) and Meta kernels (kMeta true: outputs only).
template <bool kMeta>
std::tuple<Tensor, Tensor> masked_moments(const Tensor& x3_in, const Tensor& m2_in) {
  Masked in(x3_in, m2_in, "bnkit::masked_moments");
  if (!kMeta) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x3.scalar_type(), "bnkit::masked_moments", [&] {
      std::vector<double> mu, v;
      stats_into<scalar_t>(in, mu, v);
    });
  }
  return {in.out_a, in.out_b};
}

template <bool kMeta>
std::tuple<Tensor, Tensor, Tensor> masked_train(const Tensor& x3_in, const Tensor& m2_in,
                                                const c10::optional<Tensor>& weight,
                                                const c10::optional<Tensor>& bias, double eps) {
  Masked in(x3_in, m2_in, "bnkit::masked_train");
  const Tensor &x3 = in.x3, &mean = in.out_a, &var = in.out_b;
  Tensor y3 = at::empty_like(x3);
  if (kMeta) return {y3, mean, var};
  const int64_t O = in.O, C = in.C, I = in.I;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::masked_train", [&] {
    using acc_t = typename AccT<scalar_t>::type;
    std::vector<double> mu, v;
    stats_into<scalar_t>(in, mu, v);
    const scalar_t* x = x3.data_ptr<scalar_t>();
    scalar_t* y = y3.data_ptr<scalar_t>();
    const std::vector<acc_t> w = param<acc_t>(weight, C, acc_t(1)), b = param<acc_t>(bias, C, acc_t(0));
    const acc_t* pv = var.data_ptr<acc_t>();
    std::vector<acc_t> scale(C);
    for (int64_t c = 0; c < C; ++c) scale[c] = static_cast<acc_t>(w[c] / std::sqrt(static_cast<double>(pv[c]) + eps));
    const acc_t *mp = mean.data_ptr<acc_t>(), *sp = scale.data(), *bp = b.data();
    // Centred before scaling (as the unmasked kernels): x*scale + shift cancels when |mean| >> std.
    masked_elementwise(
        O, C, I,
        [&](int64_t r) {
          const scalar_t* xr = x + r * C;
          scalar_t* yr = y + r * C;
          for (int64_t c = 0; c < C; ++c)
            yr[c] = static_cast<scalar_t>((static_cast<acc_t>(xr[c]) - mp[c]) * sp[c] + bp[c]);
        },
        [&](int64_t oc, int64_t c) {
          const scalar_t* xr = x + oc * I;
          scalar_t* yr = y + oc * I;
          const acc_t mc = mp[c], sc = sp[c], bc = bp[c];
          for (int64_t i = 0; i < I; ++i) yr[i] = static_cast<scalar_t>((static_cast<acc_t>(xr[i]) - mc) * sc + bc);
        });
  });
  return {y3, mean, var};
}

template <bool kMeta>
std::tuple<Tensor, Tensor, Tensor> masked_backward(const Tensor& grad_in, const Tensor& x3_in,
                                                   const Tensor& m2_in, const Tensor& mean_in,
                                                   const Tensor& var_in, const c10::optional<Tensor>& weight,
                                                   double eps) {
  Masked in(x3_in, m2_in, "bnkit::masked_backward");
  TORCH_CHECK(grad_in.sizes() == x3_in.sizes(), "bnkit::masked_backward: grad and input shapes differ");
  const Tensor& x3 = in.x3;
  Tensor &sum_dy = in.out_a, &sum_dy_xhat = in.out_b;
  Tensor dx3 = at::empty_like(x3);
  if (kMeta) return {dx3, sum_dy_xhat, sum_dy};
  const int64_t O = in.O, C = in.C, I = in.I;
  const Tensor g3 = grad_in.to(x3.scalar_type()).contiguous();
  const bool* m = in.mask();
  const int64_t count = in.count();
  const Tensor mean_d = mean_in.to(at::kDouble).contiguous(), var_d = var_in.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::masked_backward", [&] {
    using acc_t = typename AccT<scalar_t>::type;
    const scalar_t* x = x3.data_ptr<scalar_t>();
    const scalar_t* g = g3.data_ptr<scalar_t>();
    scalar_t* dx = dx3.data_ptr<scalar_t>();
    std::vector<acc_t> w = param<acc_t>(weight, C, acc_t(1));
    std::vector<acc_t> mu(C), scale(C), k1(C), k2(C);
    const double* pmd = mean_d.data_ptr<double>();
    const double* pvd = var_d.data_ptr<double>();
    std::vector<double> invstd_d(C);
    for (int64_t c = 0; c < C; ++c) {
      mu[c] = static_cast<acc_t>(pmd[c]);
      invstd_d[c] = 1.0 / std::sqrt(pvd[c] + eps);
      scale[c] = static_cast<acc_t>(invstd_d[c] * static_cast<double>(w[c]));
    }
    std::vector<double> sdy(C), sdyc(C);
    const acc_t* mp = mu.data();
    masked_reduce<scalar_t>(x, g, m, O, C, I, sdy.data(), sdyc.data(),
                            [mp](acc_t v, acc_t dy, int64_t c, acc_t& a, acc_t& b) {
                              a = dy;
                              b = dy * (v - mp[c]);
                            });
    std::vector<double> sx(C);  // sum dy * xhat
    for (int64_t c = 0; c < C; ++c) sx[c] = sdyc[c] * invstd_d[c];
    store<acc_t>(sdy, sx, sum_dy, sum_dy_xhat);
    const double n = static_cast<double>(std::max<int64_t>(count, 1));
    for (int64_t c = 0; c < C; ++c) {
      k1[c] = static_cast<acc_t>(sdy[c] / n);
      k2[c] = static_cast<acc_t>(sx[c] / n * invstd_d[c]);  // multiplies (x - mean): xhat * invstd
    }
    const acc_t *sp = scale.data(), *k1p = k1.data(), *k2p = k2.data();
    masked_elementwise(
        O, C, I,
        [&](int64_t r) {
          const scalar_t* xr = x + r * C;
          const scalar_t* gr = g + r * C;
          scalar_t* dr = dx + r * C;
          if (m[r]) {
            for (int64_t c = 0; c < C; ++c) {
              const acc_t d = static_cast<acc_t>(xr[c]) - mp[c];
              dr[c] = static_cast<scalar_t>(sp[c] * (static_cast<acc_t>(gr[c]) - k1p[c] - d * k2p[c]));
            }
          } else {
            for (int64_t c = 0; c < C; ++c) dr[c] = static_cast<scalar_t>(sp[c] * static_cast<acc_t>(gr[c]));
          }
        },
        [&](int64_t oc, int64_t c) {
          const bool* mr = m + (oc / C) * I;
          const scalar_t* xr = x + oc * I;
          const scalar_t* gr = g + oc * I;
          scalar_t* dr = dx + oc * I;
          const acc_t mc = mp[c], sc = sp[c], a = k1p[c], b = k2p[c];
          for (int64_t i = 0; i < I; ++i) {
            const acc_t dy = static_cast<acc_t>(gr[i]);
            const acc_t corr = a + (static_cast<acc_t>(xr[i]) - mc) * b;
            dr[i] = static_cast<scalar_t>(sc * (mr[i] ? dy - corr : dy));
          }
        });
  });
  return {dx3, sum_dy_xhat, sum_dy};
}

}  // namespace
}  // namespace bnkit

TORCH_LIBRARY_FRAGMENT(bnkit, m) {
  BNKIT_DEF_OP(m, "masked_moments", "(Tensor x3, Tensor mask) -> (Tensor, Tensor)", bnkit::masked_moments);
  BNKIT_DEF_OP(m, "masked_train",
               "(Tensor x3, Tensor mask, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
               bnkit::masked_train);
  BNKIT_DEF_OP(m, "masked_backward",
               "(Tensor grad_y3, Tensor x3, Tensor mask, Tensor mean, Tensor var, Tensor? weight, float eps)"
               " -> (Tensor, Tensor, Tensor)",
               bnkit::masked_backward);
}
