// bnkit: per-domain BN kernels (DomainBatchNorm), on the canonical view x3 = (outer, C, inner)
// whose outer rows belong to samples: row o is part of sample o / rows_per_sample, and sample n
// belongs to domain dom[n] (int64, 0 <= dom[n] < D).  Statistics are per (domain, channel).
//
// Ops:
//   bnkit::domain_train(x3, dom, rows_per_sample, D, weight?, bias?, eps)
//       -> (y3, mean [D, C], biased var [D, C], count [D])
//       one read of x3 for the statistics of every domain (shifted sums, as kernels.cpp), then
//       y = (x - mean[d, c]) / sqrt(var[d, c] + eps) * weight[d, c] + bias[d, c];
//       weight/bias: [D, C] (per domain) or absent.  count[d] = values per channel of domain d.
//   bnkit::domain_backward(grad_y3, x3, dom, rows_per_sample, mean, var, weight?, eps)
//       -> (grad_x3, sum dy * xhat [D, C], sum dy [D, C])   (the last two: weight and bias gradients)
//       per domain, BN's backward over its n_d values:
//       dx = w invstd (dy - sum(dy)/n_d - xhat sum(dy xhat)/n_d).
//   bnkit::domain_running_update_(running_mean!, running_var!, num_batches_tracked!?, mean, var, counts,
//                                 momentum, mode) -> int
//       bnkit::running_update_ (the one running-statistics rule) on the rows d with counts[d] > 0,
//       in one call; mode 0: no finiteness check, 1: a non-finite domain is skipped (the others are
//       updated), 2: nothing is written when any present domain is non-finite.  Returns the number
//       of domains left for non-finite statistics (mode 2: all present ones, or 0).
//
// The innermost loops are the row kernels of rowkernels.h (picked per instruction set) and the
// per-channel finishing steps those of the unmasked kernels (drivers.h); only the per-row choice
// of the (domain, channel) arrays is new.  Sums are taken per (row, channel)
// (NCHW-like layouts) or per task (channels-last) and combined in a fixed order: deterministic.
// A domain without samples gets mean 0 and var 0 (never used).  The autograd wrapper is in
// Python (bnkit.kernels.domain); each op has a Meta kernel.
#include "drivers.h"
#include "op_def.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace bnkit {
namespace {

using at::Tensor;

struct DomShape {
  int64_t O, C, I, N, R, D;
};

DomShape check_args(const Tensor& x3, const Tensor& dom, int64_t R, int64_t D, const char* op) {
  TORCH_CHECK(x3.dim() == 3, op, ": expected the canonical 3-D view (outer, C, inner), got ", x3.dim(), "-D");
  TORCH_CHECK(dom.scalar_type() == at::kLong && dom.dim() == 1, op, ": domains must be a 1-D int64 tensor");
  TORCH_CHECK(R >= 1 && D >= 1, op, ": rows_per_sample and num_domains must be positive");
  TORCH_CHECK(dom.size(0) * R == x3.size(0), op, ": ", dom.size(0), " samples of ", R, " rows do not make ",
              x3.size(0), " outer rows");
  return DomShape{x3.size(0), x3.size(1), x3.size(2), dom.size(0), R, D};
}

// dom as a checked vector (every value in [0, D)).
std::vector<int64_t> domains_of(const Tensor& dom_in, int64_t D, const char* op) {
  const Tensor dom = dom_in.contiguous();
  const int64_t* p = dom.data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + dom.numel());
  for (int64_t v : out) TORCH_CHECK(v >= 0 && v < D, op, ": domain ", v, " is out of range [0, ", D, ")");
  return out;
}

// A [D, C] parameter in the accumulation dtype (empty vector: absent).
template <typename A>
std::vector<A> param(const c10::optional<Tensor>& t, int64_t DC, const char* op) {
  if (!t.has_value() || !t->defined()) return {};
  Tensor v = t->to(at::kDouble).contiguous();
  TORCH_CHECK(v.numel() == DC, op, ": weight/bias must have num_domains * C = ", DC, " elements, got ", v.numel());
  const double* p = v.data_ptr<double>();
  std::vector<A> out(DC);
  for (int64_t i = 0; i < DC; ++i) out[i] = static_cast<A>(p[i]);
  return out;
}

// Per-(domain, channel) double sums of two quantities over x3 (and g3).
//   span(o, a, b): rows o (all C channels), NCHW-like: adds into a[0..C), b[0..C)
//   cl(r0, r1, d, sa, sb): channels-last rows [r0, r1) of one domain into C-arrays of A
template <typename A, typename Span, typename Cl>
void domain_reduce2(const DomShape& s, const int64_t* dom, double* out_a, double* out_b, const Span& span,
                    const Cl& cl) {
  const int64_t O = s.O, C = s.C, I = s.I, R = s.R, DC = s.D * s.C;
  std::fill(out_a, out_a + DC, 0.0);
  std::fill(out_b, out_b + DC, 0.0);
  if (O == 0 || C == 0 || I == 0) return;
  if (I > 1) {
    std::vector<double> pa(O * C, 0.0), pb(O * C, 0.0);
    const int64_t grain = std::max<int64_t>(1, kGrain / (C * I));
    at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) span(o, pa.data() + o * C, pb.data() + o * C);
    });
    for (int64_t o = 0; o < O; ++o) {
      const int64_t d = dom[o / R];
      double* a = out_a + d * C;
      double* b = out_b + d * C;
      const double* qa = pa.data() + o * C;
      const double* qb = pb.data() + o * C;
      for (int64_t c = 0; c < C; ++c) {
        a[c] += qa[c];
        b[c] += qb[c];
      }
    }
    return;
  }
  int64_t tasks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, O * C / kGrain));
  tasks = std::max<int64_t>(1, std::min(tasks, O));
  std::vector<double> pa(tasks * DC, 0.0), pb(tasks * DC, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> sa(C), sb(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = O * t / tasks, r1 = O * (t + 1) / tasks;
      for (int64_t rb = r0; rb < r1;) {
        const int64_t n = rb / R, d = dom[n];
        const int64_t re = std::min({r1, (n + 1) * R, rb + kRows});  // one sample's rows, one block
        std::fill(sa.begin(), sa.end(), A(0));
        std::fill(sb.begin(), sb.end(), A(0));
        cl(rb, re, d, sa.data(), sb.data());
        double* a = pa.data() + t * DC + d * C;
        double* b = pb.data() + t * DC + d * C;
        for (int64_t c = 0; c < C; ++c) {
          a[c] += static_cast<double>(sa[c]);
          b[c] += static_cast<double>(sb[c]);
        }
        rb = re;
      }
    }
  });
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t i = 0; i < DC; ++i) {
      out_a[i] += pa[t * DC + i];
      out_b[i] += pb[t * DC + i];
    }
}

// Element-wise pass: fn_span(o, d) for NCHW-like rows, fn_cl(r0, r1, d) for channels-last runs of one sample.
template <typename Span, typename Cl>
void domain_apply(const DomShape& s, const int64_t* dom, const Span& fn_span, const Cl& fn_cl) {
  const int64_t O = s.O, C = s.C, I = s.I, R = s.R;
  if (O == 0 || C == 0 || I == 0) return;
  if (I > 1) {
    const int64_t grain = std::max<int64_t>(1, kGrain / (C * I));
    at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) fn_span(o, dom[o / R]);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrain / C);
  at::parallel_for(0, O, grain, [&](int64_t r0, int64_t r1) {
    while (r0 < r1) {
      const int64_t n = r0 / R;
      const int64_t re = std::min(r1, (n + 1) * R);
      fn_cl(r0, re, dom[n]);
      r0 = re;
    }
  });
}

// Values per channel of each domain.
std::vector<int64_t> domain_counts(const std::vector<int64_t>& dom, const DomShape& s) {
  std::vector<int64_t> count(s.D, 0);
  for (int64_t d : dom) count[d] += s.R * s.I;
  return count;
}

// Shift K[d, c] near the mean: the mean of a few first values of domain d's first sample.
template <typename T, typename A>
std::vector<A> domain_shifts(const T* x, const std::vector<int64_t>& dom, const DomShape& s) {
  const int64_t C = s.C, I = s.I, R = s.R;
  std::vector<A> K(s.D * C, A(0));
  std::vector<bool> done(s.D, false);
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t d = dom[n];
    if (done[d]) continue;
    done[d] = true;
    const T* xs = x + n * R * C * I;  // the sample's first row
    for (int64_t c = 0; c < C; ++c) {
      double acc = 0;
      int64_t k;
      if (I > 1) {
        k = std::min<int64_t>(I, 16);
        for (int64_t i = 0; i < k; ++i) acc += static_cast<double>(xs[c * I + i]);
      } else {
        k = std::min<int64_t>(R, 8);
        for (int64_t r = 0; r < k; ++r) acc += static_cast<double>(xs[r * C + c]);
      }
      K[d * C + c] = static_cast<A>(acc / static_cast<double>(k));
    }
  }
  return K;
}

// The ops' CPU kernels (kMeta false) and Meta kernels (kMeta true: outputs only).
template <bool kMeta>
std::tuple<Tensor, Tensor, Tensor, Tensor> domain_train(
    const Tensor& x3_in, const Tensor& dom_in, int64_t R, int64_t D, const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias, double eps) {
  const char* op = "bnkit::domain_train";
  const DomShape s = check_args(x3_in, dom_in, R, D, op);
  const Tensor x3 = x3_in.contiguous();
  const int64_t C = s.C, I = s.I, DC = D * C;
  const auto acc = acc_dtype(x3.scalar_type());
  Tensor mean = at::empty({D, C}, x3.options().dtype(acc)), var = at::empty({D, C}, x3.options().dtype(acc));
  Tensor count = at::empty({D}, x3.options().dtype(at::kLong));
  Tensor y3 = at::empty_like(x3);
  if (kMeta) return {y3, mean, var, count};
  const std::vector<int64_t> dom = domains_of(dom_in, D, op);
  const std::vector<int64_t> cnt = domain_counts(dom, s);
  std::copy(cnt.begin(), cnt.end(), count.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::domain", [&] {
    using A = typename AccT<scalar_t>::type;
    const RowKernels<scalar_t>& rk = row_kernels_for<scalar_t>();
    const scalar_t* x = x3.data_ptr<scalar_t>();
    scalar_t* y = y3.data_ptr<scalar_t>();
    const std::vector<A> K = domain_shifts<scalar_t, A>(x, dom, s);
    std::vector<double> sum(DC), sumsq(DC);
    domain_reduce2<A>(
        s, dom.data(), sum.data(), sumsq.data(),
        [&](int64_t o, double* a, double* b) { rk.moments(x + o * C * I, C, I, K.data() + dom[o / R] * C, a, b); },
        [&](int64_t r0, int64_t r1, int64_t d, A* sa, A* sb) {
          rk.cl_moments(x + r0 * C, r1 - r0, C, K.data() + d * C, sa, sb);
        });
    const std::vector<A> w = param<A>(weight, DC, op), b = param<A>(bias, DC, op);
    std::vector<A> mhi(DC), mlo(DC), sc(DC), sh(DC);
    std::vector<double> mu(C), v(C);
    for (int64_t d = 0; d < D; ++d) {
      // The finishing steps of the unmasked training forward, per domain (an
      // empty domain: mean 0, var 0).
      const int64_t p = d * C;
      if (cnt[d] > 0) {
        finish_moments(C, cnt[d], K.data() + p, sum.data() + p, sumsq.data() + p, mu.data(), v.data());
      } else {
        std::fill(mu.begin(), mu.end(), 0.0);
        std::fill(v.begin(), v.end(), 0.0);
      }
      train_params(
          C, mu.data(), v.data(), w.empty() ? nullptr : w.data() + p, b.empty() ? nullptr : b.data() + p, eps,
          mean.data_ptr<A>() + p, var.data_ptr<A>() + p, mhi.data() + p, mlo.data() + p, sc.data() + p,
          sh.data() + p);
    }
    domain_apply(
        s, dom.data(),
        [&](int64_t o, int64_t d) {
          const int64_t off = o * C * I, p = d * C;
          rk.normalize(x + off, y + off, C, I, mhi.data() + p, mlo.data() + p, sc.data() + p, sh.data() + p);
        },
        [&](int64_t r0, int64_t r1, int64_t d) {
          const int64_t p = d * C;
          rk.cl_normalize(x + r0 * C, y + r0 * C, r1 - r0, C, mhi.data() + p, mlo.data() + p, sc.data() + p,
                          sh.data() + p);
        });
  });
  return {y3, mean, var, count};
}

template <bool kMeta>
std::tuple<Tensor, Tensor, Tensor> domain_backward(
    const Tensor& grad_in, const Tensor& x3_in, const Tensor& dom_in, int64_t R, const Tensor& mean_in,
    const Tensor& var_in, const c10::optional<Tensor>& weight, double eps) {
  const char* op = "bnkit::domain_backward";
  const int64_t D = mean_in.dim() == 2 ? mean_in.size(0) : 0;
  TORCH_CHECK(D >= 1 && var_in.sizes() == mean_in.sizes() && mean_in.size(1) == x3_in.size(1), op,
              ": mean and var must have shape (num_domains, C)");
  TORCH_CHECK(grad_in.sizes() == x3_in.sizes(), op, ": grad and input shapes differ");
  const DomShape s = check_args(x3_in, dom_in, R, D, op);
  const Tensor x3 = x3_in.contiguous();
  const int64_t C = s.C, I = s.I, DC = D * C;
  const auto acc = acc_dtype(x3.scalar_type());
  Tensor sum_dy = at::empty({D, C}, x3.options().dtype(acc)), sum_dy_xhat = at::empty({D, C}, x3.options().dtype(acc));
  Tensor dx3 = at::empty_like(x3);
  if (kMeta) return {dx3, sum_dy_xhat, sum_dy};
  const Tensor g3 = grad_in.to(x3.scalar_type()).contiguous();
  const std::vector<int64_t> dom = domains_of(dom_in, D, op);
  const std::vector<int64_t> cnt = domain_counts(dom, s);
  const Tensor mean_d = mean_in.to(at::kDouble).contiguous(), var_d = var_in.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "bnkit::domain", [&] {
    using A = typename AccT<scalar_t>::type;
    const RowKernels<scalar_t>& rk = row_kernels_for<scalar_t>();
    const scalar_t* x = x3.data_ptr<scalar_t>();
    const scalar_t* g = g3.data_ptr<scalar_t>();
    scalar_t* dx = dx3.data_ptr<scalar_t>();
    const double* pvd = var_d.data_ptr<double>();
    std::vector<A> mhi(DC), mlo(DC);
    split_mean(DC, mean_d.data_ptr<double>(), mhi.data(), mlo.data());
    std::vector<double> sg(DC), sx(DC);
    domain_reduce2<A>(
        s, dom.data(), sg.data(), sx.data(),
        [&](int64_t o, double* a, double* b) {
          const int64_t off = o * C * I, p = dom[o / R] * C;
          rk.bwd_sums(g + off, x + off, C, I, mhi.data() + p, mlo.data() + p, a, b);
        },
        [&](int64_t r0, int64_t r1, int64_t d, A* sa, A* sb) {
          const int64_t p = d * C;
          rk.cl_bwd_sums(g + r0 * C, x + r0 * C, r1 - r0, C, mhi.data() + p, mlo.data() + p, sa, sb);
        });
    const std::vector<A> w = param<A>(weight, DC, op);
    std::vector<A> k1(DC), k2(DC), k3(DC);
    for (int64_t d = 0; d < D; ++d) { // the unmasked backward's coefficients, per domain
      const int64_t p = d * C;
      backward_coefs(
          C, std::max<int64_t>(cnt[d], 1), pvd + p, w.empty() ? nullptr : w.data() + p, sg.data() + p,
          sx.data() + p, eps, sum_dy_xhat.data_ptr<A>() + p, sum_dy.data_ptr<A>() + p, k1.data() + p,
          k2.data() + p, k3.data() + p);
    }
    domain_apply(
        s, dom.data(),
        [&](int64_t o, int64_t d) {
          const int64_t off = o * C * I, p = d * C;
          rk.bwd_apply(g + off, x + off, dx + off, C, I, mhi.data() + p, mlo.data() + p, k1.data() + p,
                       k2.data() + p, k3.data() + p);
        },
        [&](int64_t r0, int64_t r1, int64_t d) {
          const int64_t p = d * C;
          rk.cl_bwd_apply(g + r0 * C, x + r0 * C, dx + r0 * C, r1 - r0, C, mhi.data() + p, mlo.data() + p,
                          k1.data() + p, k2.data() + p, k3.data() + p);
        });
  });
  return {dx3, sum_dy_xhat, sum_dy};
}

int64_t domain_running_update_cpu(Tensor& running_mean, Tensor& running_var,
                                  const c10::optional<Tensor>& num_batches_tracked, const Tensor& mean,
                                  const Tensor& var, at::IntArrayRef counts, double momentum, int64_t mode) {
  const char* op = "bnkit::domain_running_update_";
  const int64_t D = static_cast<int64_t>(counts.size());
  TORCH_CHECK(running_mean.dim() == 2 && running_mean.size(0) == D && running_var.sizes() == running_mean.sizes() &&
                  mean.sizes() == running_mean.sizes() && var.sizes() == running_mean.sizes(),
              op, ": the buffers and statistics must have shape (num_domains, C) with one count per domain");
  TORCH_CHECK(!num_batches_tracked.has_value() || !num_batches_tracked->defined() ||
                  (num_batches_tracked->dim() == 1 && num_batches_tracked->size(0) == D),
              op, ": num_batches_tracked must have shape (num_domains,)");
  const bool has_nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  int64_t present = 0, nonfinite = 0;
  if (mode == 2) {  // all-or-nothing: every present domain checked before any is written
    const Tensor v = var.to(at::kDouble).contiguous();
    const double* pv = v.data_ptr<double>();
    const int64_t C = var.size(1);
    for (int64_t d = 0; d < D; ++d) {
      if (counts[d] <= 0) continue;
      ++present;
      for (int64_t c = 0; c < C; ++c)
        if (!std::isfinite(pv[d * C + c])) {
          ++nonfinite;
          break;
        }
    }
    if (nonfinite) return present;
  }
  int64_t skipped = 0;
  for (int64_t d = 0; d < D; ++d) {
    if (counts[d] <= 0) continue;
    Tensor rm = running_mean.select(0, d), rv = running_var.select(0, d);
    c10::optional<Tensor> nbt;
    if (has_nbt) nbt = num_batches_tracked->select(0, d);
    if (!running_update(rm, rv, nbt, mean.select(0, d), var.select(0, d), momentum, counts[d], mode != 0)) ++skipped;
  }
  return skipped;
}

}  // namespace
}  // namespace bnkit

TORCH_LIBRARY_FRAGMENT(bnkit, m) {
  BNKIT_DEF_OP(m, "domain_train",
               "(Tensor x3, Tensor domains, int rows_per_sample, int num_domains, Tensor? weight, Tensor? bias, "
               "float eps) -> (Tensor, Tensor, Tensor, Tensor)",
               bnkit::domain_train);
  BNKIT_DEF_OP(m, "domain_backward",
               "(Tensor grad_y3, Tensor x3, Tensor domains, int rows_per_sample, Tensor mean, Tensor var, "
               "Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)",
               bnkit::domain_backward);
  BNKIT_DEF_CPU_OP(m, "domain_running_update_",
                   "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, "
                   "Tensor mean, Tensor var, int[] counts, float momentum, int mode) -> int",
                   bnkit::domain_running_update_cpu);
}
