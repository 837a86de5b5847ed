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
// in Python (bnkit.kernels._MaskedTrain); each op has a Meta kernel.
#include "bnkit_kernels.h"

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

template <typename T>
struct AccOf {
  using type = T;
};
template <>
struct AccOf<c10::Half> {
  using type = float;
};
template <>
struct AccOf<c10::BFloat16> {
  using type = float;
};

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
  using acc_t = typename AccOf<scalar_t>::type;
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
  using acc_t = typename AccOf<scalar_t>::type;
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

std::tuple<Tensor, Tensor> masked_moments_cpu(const Tensor& x3_in, const Tensor& m2_in) {
  check_args(x3_in, m2_in, "bnkit::masked_moments");
  const Tensor x3 = x3_in.contiguous();
  const Tensor m2 = m2_in.contiguous();
  const int64_t O = x3.size(0), C = x3.size(1), I = x3.size(2);
  const auto opts = x3.options().dtype(acc_dtype(x3.scalar_type()));
  Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts);
  const bool* m = m2.data_ptr<bool>();
  const int64_t count = count_valid(m, O * I);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::masked_moments", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    std::vector<double> mu(C), v(C);
    masked_stats<scalar_t>(x3.data_ptr<scalar_t>(), m, O, C, I, count, mu, v);
    acc_t* pm = mean.data_ptr<acc_t>();
    acc_t* pv = var.data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      pm[c] = static_cast<acc_t>(mu[c]);
      pv[c] = static_cast<acc_t>(v[c]);
    }
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor, Tensor> masked_train_cpu(const Tensor& x3_in, const Tensor& m2_in,
                                                    const c10::optional<Tensor>& weight,
                                                    const c10::optional<Tensor>& bias, double eps) {
  check_args(x3_in, m2_in, "bnkit::masked_train");
  const Tensor x3 = x3_in.contiguous();
  const Tensor m2 = m2_in.contiguous();
  const int64_t O = x3.size(0), C = x3.size(1), I = x3.size(2);
  const auto opts = x3.options().dtype(acc_dtype(x3.scalar_type()));
  Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts);
  Tensor y3 = at::empty_like(x3);
  const bool* m = m2.data_ptr<bool>();
  const int64_t count = count_valid(m, O * I);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::masked_train", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    std::vector<double> mu(C), v(C);
    const scalar_t* x = x3.data_ptr<scalar_t>();
    masked_stats<scalar_t>(x, m, O, C, I, count, mu, v);
    std::vector<acc_t> w = param<acc_t>(weight, C, acc_t(1)), b = param<acc_t>(bias, C, acc_t(0));
    std::vector<acc_t> mean_a(C), scale(C);
    acc_t* pm = mean.data_ptr<acc_t>();
    acc_t* pv = var.data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      pm[c] = mean_a[c] = static_cast<acc_t>(mu[c]);
      pv[c] = static_cast<acc_t>(v[c]);
      scale[c] = static_cast<acc_t>(w[c] / std::sqrt(static_cast<double>(pv[c]) + eps));
    }
    scalar_t* y = y3.data_ptr<scalar_t>();
    const acc_t* mp = mean_a.data();
    const acc_t* sp = scale.data();
    const acc_t* bp = b.data();
    // Centred before scaling (as the unmasked kernels): x*scale + shift cancels when |mean| >> std.
    if (I == 1) {
      at::parallel_for(0, O, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* xr = x + r * C;
          scalar_t* yr = y + r * C;
          for (int64_t c = 0; c < C; ++c)
            yr[c] = static_cast<scalar_t>((static_cast<acc_t>(xr[c]) - mp[c]) * sp[c] + bp[c]);
        }
      });
    } else {
      at::parallel_for(0, O * C, 16, [&](int64_t begin, int64_t end) {
        for (int64_t oc = begin; oc < end; ++oc) {
          const int64_t c = oc % C;
          const scalar_t* xr = x + oc * I;
          scalar_t* yr = y + oc * I;
          const acc_t mc = mp[c], sc = sp[c], bc = bp[c];
          for (int64_t i = 0; i < I; ++i) yr[i] = static_cast<scalar_t>((static_cast<acc_t>(xr[i]) - mc) * sc + bc);
        }
      });
    }
  });
  return {y3, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> masked_backward_cpu(const Tensor& grad_in, const Tensor& x3_in,
                                                       const Tensor& m2_in, const Tensor& mean_in,
                                                       const Tensor& var_in, const c10::optional<Tensor>& weight,
                                                       double eps) {
  check_args(x3_in, m2_in, "bnkit::masked_backward");
  TORCH_CHECK(grad_in.sizes() == x3_in.sizes(), "bnkit::masked_backward: grad and input shapes differ");
  const Tensor x3 = x3_in.contiguous();
  const Tensor g3 = grad_in.to(x3.scalar_type()).contiguous();
  const Tensor m2 = m2_in.contiguous();
  const int64_t O = x3.size(0), C = x3.size(1), I = x3.size(2);
  const auto opts = x3.options().dtype(acc_dtype(x3.scalar_type()));
  Tensor sum_dy = at::empty({C}, opts), sum_dy_xhat = at::empty({C}, opts);
  Tensor dx3 = at::empty_like(x3);
  const bool* m = m2.data_ptr<bool>();
  const int64_t count = count_valid(m, O * I);
  const Tensor mean_d = mean_in.to(at::kDouble).contiguous(), var_d = var_in.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::masked_backward", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const scalar_t* x = x3.data_ptr<scalar_t>();
    const scalar_t* g = g3.data_ptr<scalar_t>();
    std::vector<acc_t> w = param<acc_t>(weight, C, acc_t(1));
    std::vector<acc_t> mu(C), invstd(C), scale(C), k1(C), k2(C);
    const double* pmd = mean_d.data_ptr<double>();
    const double* pvd = var_d.data_ptr<double>();
    std::vector<double> invstd_d(C);
    for (int64_t c = 0; c < C; ++c) {
      mu[c] = static_cast<acc_t>(pmd[c]);
      invstd_d[c] = 1.0 / std::sqrt(pvd[c] + eps);
      invstd[c] = static_cast<acc_t>(invstd_d[c]);
      scale[c] = static_cast<acc_t>(invstd_d[c] * static_cast<double>(w[c]));
    }
    std::vector<double> sdy(C), sdyc(C);
    const acc_t* mp = mu.data();
    masked_reduce<scalar_t>(x, g, m, O, C, I, sdy.data(), sdyc.data(),
                            [mp](acc_t v, acc_t dy, int64_t c, acc_t& a, acc_t& b) {
                              a = dy;
                              b = dy * (v - mp[c]);
                            });
    acc_t* p_sdy = sum_dy.data_ptr<acc_t>();
    acc_t* p_sdyx = sum_dy_xhat.data_ptr<acc_t>();
    const double n = static_cast<double>(std::max<int64_t>(count, 1));
    for (int64_t c = 0; c < C; ++c) {
      const double sx = sdyc[c] * invstd_d[c];
      p_sdy[c] = static_cast<acc_t>(sdy[c]);
      p_sdyx[c] = static_cast<acc_t>(sx);
      k1[c] = static_cast<acc_t>(sdy[c] / n);
      k2[c] = static_cast<acc_t>(sx / n * invstd_d[c]);  // multiplies (x - mean): xhat * invstd
    }
    scalar_t* dx = dx3.data_ptr<scalar_t>();
    const acc_t* sp = scale.data();
    const acc_t* k1p = k1.data();
    const acc_t* k2p = k2.data();
    if (I == 1) {
      at::parallel_for(0, O, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
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
        }
      });
    } else {
      at::parallel_for(0, O * C, 16, [&](int64_t begin, int64_t end) {
        for (int64_t oc = begin; oc < end; ++oc) {
          const int64_t c = oc % C;
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
        }
      });
    }
  });
  return {dx3, sum_dy_xhat, sum_dy};
}

// ------------------------------------------------------------ meta kernels --
at::TensorOptions meta_stat_options(const Tensor& x3) { return x3.options().dtype(acc_dtype(x3.scalar_type())); }

std::tuple<Tensor, Tensor> masked_moments_meta(const Tensor& x3, const Tensor& m2) {
  check_args(x3, m2, "bnkit::masked_moments");
  return {at::empty({x3.size(1)}, meta_stat_options(x3)), at::empty({x3.size(1)}, meta_stat_options(x3))};
}

std::tuple<Tensor, Tensor, Tensor> masked_train_meta(const Tensor& x3, const Tensor& m2,
                                                     const c10::optional<Tensor>&, const c10::optional<Tensor>&,
                                                     double) {
  check_args(x3, m2, "bnkit::masked_train");
  return {at::empty_like(x3, at::MemoryFormat::Contiguous), at::empty({x3.size(1)}, meta_stat_options(x3)),
          at::empty({x3.size(1)}, meta_stat_options(x3))};
}

std::tuple<Tensor, Tensor, Tensor> masked_backward_meta(const Tensor&, const Tensor& x3, const Tensor& m2,
                                                        const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                                        double) {
  check_args(x3, m2, "bnkit::masked_backward");
  return {at::empty_like(x3, at::MemoryFormat::Contiguous), at::empty({x3.size(1)}, meta_stat_options(x3)),
          at::empty({x3.size(1)}, meta_stat_options(x3))};
}

}  // namespace
}  // namespace bnkit

TORCH_LIBRARY_FRAGMENT(bnkit, m) {
  m.def("masked_moments(Tensor x3, Tensor mask) -> (Tensor, Tensor)");
  m.def("masked_train(Tensor x3, Tensor mask, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "masked_backward(Tensor grad_y3, Tensor x3, Tensor mask, Tensor mean, Tensor var, Tensor? weight, float eps)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnkit, CPU, m) {
  m.impl("masked_moments", TORCH_FN(bnkit::masked_moments_cpu));
  m.impl("masked_train", TORCH_FN(bnkit::masked_train_cpu));
  m.impl("masked_backward", TORCH_FN(bnkit::masked_backward_cpu));
}

TORCH_LIBRARY_IMPL(bnkit, Meta, m) {
  m.impl("masked_moments", TORCH_FN(bnkit::masked_moments_meta));
  m.impl("masked_train", TORCH_FN(bnkit::masked_train_meta));
  m.impl("masked_backward", TORCH_FN(bnkit::masked_backward_meta));
}
