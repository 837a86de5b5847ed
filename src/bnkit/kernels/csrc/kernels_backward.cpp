// bnkit: fused CPU Batch Normalization kernels, the backward ops (the
// training backward, its apply phase with given sums, the eval backward);
// the numerics are those of kernels.cpp, what both share is in drivers.h.
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
#include <vector>

namespace bnkit {
namespace {

// -------------------------------------------------------------- backward --

// The backward's two per-channel sums, given (the backward-apply phase):
// sum_g = sum(g), sum_gxc = sum(g * (x - mean)) over `count` values.
struct Sums {
  const double* sum_g;
  const double* sum_gxc;
  int64_t count;
};

// With `act` (the forward's FusedAct, its arrays over all C channels): the
// backward of act(BN(x)), g times the activation's derivative (a clamp: masked),
// x centred with the forward's own mean (act->mhi, act->mlo).
template <typename T, typename A = typename AccT<T>::type>
void backward_kernel(
    const T* g, const T* x, T* dx, const Shape& s, const A* mean, const A* var, const A* w, double eps, A* dw, A* db,
    const Sums* given, const FusedAct<A>* act = nullptr) {
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
  std::vector<A> mhi, mlo; // the act kernels centre with the forward's own mean (act->mhi, act->mlo)
  if (act == nullptr) {
    mhi.resize(C);
    mlo.resize(C);
    split_mean(C, mean, mhi.data(), mlo.data());
  }
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
          if (act != nullptr)
            rk.bwd_sums_act[act->kind](g + off, x + off, m, S, act->at(c0), sg.data(), sx.data());
          else
            rk.bwd_sums(g + off, x + off, m, S, mhi.data() + c0, mlo.data() + c0, sg.data(), sx.data());
        }
        coefs(c0, m, sg.data(), sx.data(), k1.data(), k2.data(), k3.data());
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c0) * S;
          if (act != nullptr)
            rk.bwd_apply_act[act->kind](g + off, x + off, dx + off, m, S, act->at(c0), k1.data(), k2.data(), k3.data());
          else
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
  } else if (act != nullptr) {
    reduce2<A>(
        s, sg.data(), sx.data(),
        [&](int64_t n, int64_t c0, int64_t c1, double* a, double* b) {
          const int64_t off = (n * C + c0) * S;
          rk.bwd_sums_act[act->kind](g + off, x + off, c1 - c0, S, act->at(c0), a, b);
        },
        [&](int64_t r0, int64_t r1, A* sa, A* sb) {
          rk.cl_bwd_sums_act[act->kind](g + r0 * C, x + r0 * C, r1 - r0, C, *act, sa, sb);
        });
  } else {
    reduce2<A>(
        s, sg.data(), sx.data(),
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
  if (act != nullptr) {
    elementwise(
        s,
        [&](int64_t off, int64_t c0, int64_t nch) {
          rk.bwd_apply_act[act->kind](
              g + off, x + off, dx + off, nch, S, act->at(c0), k1.data() + c0, k2.data() + c0, k3.data() + c0);
        },
        [&](int64_t r0, int64_t r1) {
          rk.cl_bwd_apply_act[act->kind](g + r0 * C, x + r0 * C, dx + r0 * C, r1 - r0, C, *act, k1.data(), k2.data(), k3.data());
        });
    return;
  }
  const auto cl_apply =
      use_nt_stores<T>(s, dx, Pass::kGrad) && cl_nt_ok(rk.cl_bwd_apply_nt, s, dx) ? rk.cl_bwd_apply_nt : rk.cl_bwd_apply;
  elementwise(
      s,
      [&](int64_t off, int64_t c0, int64_t nch) {
        span_apply(
            g + off, x + off, dx + off, nch, S, mhi.data() + c0, mlo.data() + c0, k1.data() + c0, k2.data() + c0,
            k3.data() + c0);
      },
      [&](int64_t r0, int64_t r1) {
        cl_apply(
            g + r0 * C, x + r0 * C, dx + r0 * C, r1 - r0, C, mhi.data(), mlo.data(), k1.data(), k2.data(), k3.data());
      });
}

// Eval backward: dx = g*scale, dscale = sum(g*x), dshift = sum(g); one pass.
template <typename T, typename A = typename AccT<T>::type>
void eval_backward_kernel(const T* g, const T* x, T* dx, const Shape& s, const A* scale, double* dscale, double* dshift) {
  const RowKernels<T>& rk = row_kernels_for<T>();
  const int64_t C = s.C, S = s.S;
  reduce2<A>(
      s, dshift, dscale,
      [&](int64_t n, int64_t c0, int64_t c1, double* a, double* b) {
        const int64_t off = (n * C + c0) * S;
        rk.eval_bwd(g + off, x + off, dx + off, c1 - c0, S, scale + c0, a, b);
      },
      [&](int64_t r0, int64_t r1, A* sa, A* sb) {
        rk.cl_eval_bwd(g + r0 * C, x + r0 * C, dx + r0 * C, r1 - r0, C, scale, sa, sb);
      });
}

// The training backward for checked arguments: grad_x3 into dx, the weight and
// bias gradients into dw and db; with `given` the backward-apply phase, from
// sums reduced elsewhere (dw, db are then scratch: the global gradients are
// not this phase's result).
void run_backward(
    const Checked& in, const Tensor& gx, const Tensor& mean, const Tensor& var, const Tensor& w, double eps,
    const Tensor& dx, const Tensor& dw, const Tensor& db, const Sums* given = nullptr, const Activation* act = nullptr,
    const Tensor* act_params = nullptr) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x3.scalar_type(), "bnkit::batch_norm_backward", [&] {
    using A = typename AccT<scalar_t>::type;
    FusedAct<A> ca{};
    if (act != nullptr) {
      const A* p = act_params->const_data_ptr<A>();
      const int64_t C = in.s.C;
      ca = {p, p + C, p + 2 * C, p + 3 * C, static_cast<A>(act->lo), static_cast<A>(act->hi), act->kind};
    }
    backward_kernel<scalar_t>(
        gx.const_data_ptr<scalar_t>(), in.x3.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), in.s,
        mean.const_data_ptr<A>(), var.const_data_ptr<A>(), opt_ptr<A>(w), eps, dw.mutable_data_ptr<A>(),
        db.mutable_data_ptr<A>(), given, act != nullptr ? &ca : nullptr);
  });
}

} // namespace

std::tuple<Tensor, Tensor> batch_norm_backward_into(
    const Tensor& grad_y3, const Tensor& x3, const Tensor& mean_, const Tensor& var_,
    const std::optional<Tensor>& weight, double eps, const Tensor& dx, const Activation* act,
    const Tensor* act_params) {
  const Checked in(x3, "batch_norm_backward");
  check_out(in.x3, dx, in.op, "grad_x3");
  const Tensor gx = in.grad(grad_y3);
  const Tensor mean = in.param(mean_, "mean"), var = in.param(var_, "var"), w = in.param(weight, "weight");
  if (act != nullptr)
    TORCH_CHECK(
        act_params != nullptr && act_params->is_contiguous() && act_params->scalar_type() == in.acc &&
            act_params->numel() == 4 * in.s.C,
        "bnkit::batch_norm_backward: a fused activation needs the forward's (4, C) act_params");
  Tensor dw = in.stat(), db = in.stat();
  run_backward(in, gx, mean, var, w, eps, dx, dw, db, nullptr, act, act_params);
  return {dw, db};
}

Tensor batch_norm_backward_apply_cpu(
    const Tensor& grad_y3, const Tensor& x3, const Tensor& mean_, const Tensor& var_,
    const std::optional<Tensor>& weight, const Tensor& sum_dy, const Tensor& sum_dy_xhat, int64_t count, double eps) {
  const Checked in(x3, "batch_norm_backward_apply");
  const Tensor gx = in.grad(grad_y3);
  TORCH_CHECK(count >= 0, "bnkit::", in.op, ": count must be >= 0, got ", count);
  const Tensor mean = in.param(mean_, "mean"), var = in.param(var_, "var"), w = in.param(weight, "weight");
  std::vector<double> sg, sxhat, sx(in.s.C);
  param_as_double(sum_dy, in.s.C, in.op, "sum_dy", sg);
  param_as_double(sum_dy_xhat, in.s.C, in.op, "sum_dy_xhat", sxhat);
  Tensor dx = at::empty(in.x3.sizes(), in.x3.options().memory_format(at::MemoryFormat::Contiguous));
  // sum(g * (x - mean)) = sum(g * xhat) * sqrt(var + eps)
  copy_as_double(var, sx.data());
  for (int64_t c = 0; c < in.s.C; ++c) sx[c] = sxhat[c] * std::sqrt(sx[c] + eps);
  const Sums given{sg.data(), sx.data(), count};
  run_backward(in, gx, mean, var, w, eps, dx, in.stat(), in.stat(), &given);
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_eval_backward_cpu(
    const Tensor& grad_y3, const Tensor& x3, const Tensor& scale_) {
  const Checked in(x3, "batch_norm_eval_backward");
  const Tensor gx = in.grad(grad_y3);
  const Tensor scale = in.param(scale_, "scale");
  Tensor dx = at::empty_like(in.x3, at::MemoryFormat::Contiguous);
  Tensor dscale = at::empty({in.s.C}, in.x3.options().dtype(at::kDouble));
  Tensor dshift = at::empty({in.s.C}, in.x3.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x3.scalar_type(), "bnkit::batch_norm_eval_backward", [&] {
    using A = typename AccT<scalar_t>::type;
    eval_backward_kernel<scalar_t>(
        gx.const_data_ptr<scalar_t>(), in.x3.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), in.s,
        scale.const_data_ptr<A>(), dscale.mutable_data_ptr<double>(), dshift.mutable_data_ptr<double>());
  });
  return {dx, dscale.to(in.acc), dshift.to(in.acc)};
}

std::tuple<Tensor, Tensor> batch_norm_infer_backward_into(
    const Tensor& grad_y3, const Tensor& x3, const Tensor& mean_, const Tensor& var_,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps, const Activation* act,
    const Tensor& dx) {
  const Checked in(x3, "batch_norm_infer_backward");
  const Tensor gx = in.grad(grad_y3);
  if (dx.defined()) check_out(in.x3, dx, in.op, "grad_x3");
  const int64_t C = in.s.C, S = in.s.S;
  std::vector<double> mean, var, w, b;
  param_as_double(mean_, C, in.op, "mean", mean);
  param_as_double(var_, C, in.op, "var", var);
  if (present(weight)) param_as_double(*weight, C, in.op, "weight", w);
  if (present(bias)) param_as_double(*bias, C, in.op, "bias", b);
  std::vector<double> sg(C), sx(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x3.scalar_type(), "bnkit::batch_norm_infer_backward", [&] {
    using A = typename AccT<scalar_t>::type;
    const RowKernels<scalar_t>& rk = row_kernels_for<scalar_t>();
    // The forward's folded values (batch_norm_infer_into), so that pre and its mask are the forward's.
    std::vector<A> sc(C), sh(C), zeros(C, A(0)), mh(C), ml(C);
    fold_params(
        C, mean.data(), var.data(), w.empty() ? nullptr : w.data(), b.empty() ? nullptr : b.data(), eps, sc.data(),
        sh.data());
    split_mean(C, mean.data(), mh.data(), ml.data());
    const int slot = act != nullptr ? act->kind : kActKinds;
    const FusedAct<A> ca = act != nullptr ? fused_act(*act, zeros.data(), zeros.data(), sc.data(), sh.data())
                                          : FusedAct<A>{zeros.data(), zeros.data(), sc.data(), sh.data(), A(0), A(0), slot};
    const scalar_t* g = gx.const_data_ptr<scalar_t>();
    const scalar_t* x = in.x3.const_data_ptr<scalar_t>();
    scalar_t* d = dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    reduce2<A>(
        in.s, sg.data(), sx.data(),
        [&](int64_t n, int64_t c0, int64_t c1, double* sa, double* sb) {
          const int64_t off = (n * C + c0) * S;
          rk.infer_bwd[slot](
              g + off, x + off, d != nullptr ? d + off : nullptr, c1 - c0, S, ca.at(c0), mh.data() + c0,
              ml.data() + c0, sa, sb);
        },
        [&](int64_t r0, int64_t r1, A* sa, A* sb) {
          rk.cl_infer_bwd[slot](
              g + r0 * C, x + r0 * C, d != nullptr ? d + r0 * C : nullptr, r1 - r0, C, ca, mh.data(), ml.data(), sa,
              sb);
        });
  });
  // grad_weight = sum(gm * (x - mean)) / sqrt(var + eps), grad_bias = sum(gm)
  Tensor dw = at::empty({C}, in.x3.options().dtype(at::kDouble)), db = at::empty({C}, in.x3.options().dtype(at::kDouble));
  double* pw = dw.mutable_data_ptr<double>();
  double* pb = db.mutable_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    pw[c] = sx[c] / std::sqrt(var[c] + eps);
    pb[c] = sg[c];
  }
  return {dw.to(in.acc), db.to(in.acc)};
}

} // namespace bnkit
