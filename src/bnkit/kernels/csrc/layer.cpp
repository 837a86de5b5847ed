// bnkit: the fused layer call, bnkit::batch_norm_layer.
//
// A BN layer's whole eager forward on CPU in one op call, for speed on small
// inputs (where the same steps as separate Python-level calls cost as much as
// the kernels).  It holds only two things: the accept predicate (below,
// `accepts` and the checks at the top of batch_norm_layer), which must decline
// whatever the general Python path (bnkit.engine) would treat differently, and
// the fused body, which is made of the same phases as every other caller: the
// training Function (autograd.cpp), inference, and the running-statistics
// phase (running_update, which owns the cumulative factor and the
// num_batches_tracked bookkeeping).
//
// The output and the input gradient are allocated in the input's own memory
// format and are not views (in-place ops after the layer, e.g.
// ReLU(inplace=True), work), and the training autograd graph is one node.
//
// Whatever it does not handle -- other devices, tensor subclasses and
// dispatch modes, shared (one-element) affine parameters, empty batches and
// every kind of bad input -- it returns untouched with status kNotHandled,
// and the caller takes the general Python path, which owns the error
// messages.  It is registered as CompositeImplicitAutograd and used in eager
// mode only (torch.compile traces the general path).
//
// bnkit::batch_norm_layer_moments is the same training call with the running
// update left out: it returns the batch moments the kernels computed, which
// engine.running_update hands to its hook (accumulate_stats) -- one kernel
// pass and no scratch buffers; bnkit::merge_moments_ is that hook's Chan
// merge of them into its float64 totals.
#include "bnkit_kernels.h"
#include "layout.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

namespace bnkit {
namespace {

using at::Tensor;

// A plain strided CPU tensor (no subclass, wrapper or functionalization).
bool plain_cpu(const Tensor& t) {
  if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu()) return false;
  const auto ks = t.key_set();
  return !ks.has(c10::DispatchKey::Python) && !ks.has(c10::DispatchKey::FuncTorchBatched) &&
      !ks.has(c10::DispatchKey::FuncTorchGradWrapper) && !ks.has(c10::DispatchKey::Functionalize) &&
      !ks.has(c10::DispatchKey::PythonTLSSnapshot);
}

// A per-channel tensor the general path would accept as is: 1-D, C values,
// the input's dtype (or float32 for half-precision inputs).
bool per_channel_ok(const std::optional<Tensor>& t, const Tensor& x, int64_t C) {
  if (!t.has_value() || !t->defined()) return true;
  if (!plain_cpu(*t) || t->dim() != 1 || t->size(0) != C) return false;
  const auto dt = t->scalar_type(), xt = x.scalar_type();
  return dt == xt || ((xt == at::kBFloat16 || xt == at::kHalf) && dt == at::kFloat);
}

bool defined(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined();
}

bool requires_grad(const std::optional<Tensor>& t) {
  return defined(t) && t->requires_grad();
}

// Whether every value of a [C] statistic is finite (NaN or Inf anywhere in
// a batch makes its variance so): the host check of the general path's
// running update, for the moments handed out unapplied.
bool all_finite(const Tensor& stat) {
  // The statistics are in the accumulation dtype (float32 or float64).
  const Tensor t = stat.scalar_type() == at::kFloat ? stat.contiguous() : stat.to(at::kDouble).contiguous();
  auto scan = [n = t.numel()](const auto* p) {
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(p[i])) return false;
    return true;
  };
  return t.scalar_type() == at::kFloat ? scan(t.const_data_ptr<float>()) : scan(t.const_data_ptr<double>());
}

// The whole call: the accept predicate, the forward and then either the
// running update (`apply`) or, for a training call, nothing but the batch
// moments in `mean_out`/`var_out` (mean, biased variance, in the kernels'
// accumulation dtype; kNonFinite when check_finite finds NaN/Inf).
std::tuple<Tensor, int64_t> layer_call(
    const Tensor& input,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked,
    bool training,
    double momentum,
    double eps,
    int64_t axis,
    int64_t num_features,
    int64_t ranks,
    bool check_finite,
    bool apply,
    Tensor& mean_out,
    Tensor& var_out) {
  const std::tuple<Tensor, int64_t> not_handled{input, kNotHandled};
  if (!plain_cpu(input) || c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python)) return not_handled;
  const auto dt = input.scalar_type();
  if (dt != at::kFloat && dt != at::kDouble && dt != at::kBFloat16 && dt != at::kHalf) return not_handled;
  const int64_t ndim = input.dim();
  if (ndim < 1 || ndim >= 64 || (ranks != 0 && ((ranks >> ndim) & 1) == 0)) return not_handled;
  if (axis < -ndim || axis >= ndim) return not_handled;
  axis = axis < 0 ? axis + ndim : axis;
  const int64_t C = input.size(axis);
  if ((num_features > 0 && C != num_features) || C == 0) return not_handled;
  if (!per_channel_ok(weight, input, C) || !per_channel_ok(bias, input, C)) return not_handled;
  const bool track = defined(running_mean);
  if (track != defined(running_var)) return not_handled;
  if (track &&
      (!per_channel_ok(running_mean, input, C) || !per_channel_ok(running_var, input, C) ||
       !running_mean->is_contiguous() || !running_var->is_contiguous() || running_mean->requires_grad() ||
       running_var->requires_grad()))
    return not_handled;
  const bool grad =
      at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) || requires_grad(bias));

  if (!training) {
    if (!track || !(eps >= 0) || (grad && (running_mean->requires_grad() || running_var->requires_grad())))
      return not_handled;
    const Layout layout = layout_of(input, axis);
    if (grad) { // rare (eval-mode layer in a trained graph): the op's autograd kernel on views
      const Tensor y3 = infer_autograd(view3(input, axis, layout), *running_mean, *running_var, weight, bias, eps);
      return {unview3(y3, input, axis, layout), kHandled};
    }
    Tensor y = empty_in_layout(input, layout);
    batch_norm_infer_into(
        view3(input, axis, layout), view3(y, axis, layout), *running_mean, *running_var, weight, bias, eps);
    return {y, kHandled};
  }

  if (!(eps > 0) || !std::isfinite(eps)) return not_handled;
  const int64_t count = input.numel() / C;
  if (count <= 1) return not_handled; // empty batches and the one-value error: the general path
  const bool cumulative = momentum < 0; // kCumulativeMomentum
  Tensor nbt = defined(num_batches_tracked) ? *num_batches_tracked : Tensor();
  if (nbt.defined() && (!plain_cpu(nbt) || nbt.scalar_type() != at::kLong || nbt.numel() != 1)) return not_handled;
  if (track && cumulative && !nbt.defined()) return not_handled;
  // Buffers made under torch.inference_mode may only be updated inside it; torch's
  // own error for the other case comes from the general path.
  if (!c10::InferenceMode::is_enabled() &&
      ((track && (running_mean->is_inference() || running_var->is_inference())) ||
       (nbt.defined() && nbt.is_inference())))
    return not_handled;

  Tensor y, mean, var;
  if (grad) {
    std::tie(y, mean, var) = train_layer_autograd(input, weight, bias, eps, axis);
  } else {
    const Layout layout = layout_of(input, axis);
    y = empty_in_layout(input, layout);
    std::tie(mean, var) =
        batch_norm_train_into(view3(input, axis, layout), view3(y, axis, layout), weight, bias, eps);
  }
  if (!apply) {
    mean_out = mean;
    var_out = var;
    return {y, check_finite && !all_finite(var) ? kNonFinite : kHandled};
  }
  if (!track) return {y, kHandled};
  Tensor rm = *running_mean, rv = *running_var;
  if (!running_update(rm, rv, num_batches_tracked, mean, var, momentum, count, check_finite)) return {y, kNonFinite};
  return {y, kHandled};
}

// bnkit::batch_norm_layer_moments: a training call of batch_norm_layer that
// applies no running update and returns the batch moments instead, for
// engine.running_update to hand on (the accumulate_stats hook).  The running
// buffers and momentum only take part in the accept predicate, so that it
// declines exactly what batch_norm_layer declines.
std::tuple<Tensor, Tensor, Tensor, int64_t> batch_norm_layer_moments(
    const Tensor& input,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked,
    double momentum,
    double eps,
    int64_t axis,
    int64_t num_features,
    int64_t ranks,
    bool check_finite) {
  Tensor mean = input, var = input; // placeholders where the call is not handled
  auto [y, status] = layer_call(
      input, weight, bias, running_mean, running_var, num_batches_tracked, true, momentum, eps, axis, num_features,
      ranks, check_finite, false, mean, var);
  return {y, mean, var, status};
}

// bnkit::merge_moments_: Chan's merge, in place and in float64, of one batch's
// moments (count n_b, mean, variance: biased, or unbiased for `unbiased`, as
// torch's buffers hold it) into the running totals (count n_a, mean, M2) of
// stats.merge:
//   d = mean_b - mean_a,  mean <- mean_a + d n_b / n,  M2 <- M2_a + M2_b + d^2 n_a n_b / n.
// accumulate_stats' per-batch step: the batch's tensors are not kept (small
// tensors kept alive between the layer's large ones fragment the heap, so
// that every output then faults in fresh pages).
void merge_moments(
    Tensor& mean,
    Tensor& m2,
    int64_t count,
    const Tensor& batch_mean,
    const Tensor& batch_var,
    int64_t batch_count,
    bool unbiased) {
  const int64_t C = mean.numel();
  TORCH_CHECK(
      mean.scalar_type() == at::kDouble && m2.scalar_type() == at::kDouble && mean.is_contiguous() &&
          m2.is_contiguous() && mean.device().is_cpu() && m2.device().is_cpu() && m2.numel() == C,
      "bnkit::merge_moments_: the totals must be contiguous float64 CPU tensors of one size");
  TORCH_CHECK(
      batch_mean.numel() == C && batch_var.numel() == C && batch_mean.device().is_cpu() &&
          batch_var.device().is_cpu(),
      "bnkit::merge_moments_: the batch moments must be CPU tensors of the totals' size, got ",
      batch_mean.numel(), " and ", batch_var.numel(), " for ", C);
  TORCH_CHECK(count >= 0 && batch_count >= 0, "bnkit::merge_moments_: counts must be non-negative");
  if (batch_count == 0) return;
  // Read in place (no converted copies: a few small tensors per call cost as much as the merge).
  const bool direct = batch_var.scalar_type() == batch_mean.scalar_type() && batch_mean.is_contiguous() &&
      batch_var.is_contiguous() && batch_mean.is_floating_point();
  const Tensor bm = direct ? batch_mean : batch_mean.to(at::kDouble).contiguous();
  const Tensor bv = direct ? batch_var : batch_var.to(at::kDouble).contiguous();
  double* am = mean.mutable_data_ptr<double>();
  double* a2 = m2.mutable_data_ptr<double>();
  const double nb = static_cast<double>(batch_count), na = static_cast<double>(count), n = na + nb;
  const double to_m2 = unbiased ? nb - 1.0 : nb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bm.scalar_type(), "bnkit::merge_moments_", [&] {
    const scalar_t* pm = bm.const_data_ptr<scalar_t>();
    const scalar_t* pv = bv.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double mean_b = static_cast<double>(pm[c]), m2_b = static_cast<double>(pv[c]) * to_m2;
      if (count == 0) {
        am[c] = mean_b;
        a2[c] = m2_b;
      } else {
        const double d = mean_b - am[c];
        am[c] += d * (nb / n);
        a2[c] += m2_b + d * d * (na * nb / n);
      }
    }
  });
}

} // namespace

std::tuple<Tensor, int64_t> batch_norm_layer(
    const Tensor& input,
    const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked,
    bool training,
    double momentum,
    double eps,
    int64_t axis,
    int64_t num_features,
    int64_t ranks,
    bool check_finite) {
  Tensor unused_mean, unused_var;
  return layer_call(
      input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, axis,
      num_features, ranks, check_finite, true, unused_mean, unused_var);
}

} // namespace bnkit

TORCH_LIBRARY_FRAGMENT(bnkit, m) {
  m.def(
      "batch_norm_layer_moments(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean,"
      " Tensor? running_var, Tensor? num_batches_tracked, float momentum, float eps, int axis, int num_features,"
      " int ranks, bool check_finite) -> (Tensor, Tensor, Tensor, int)");
  m.def(
      "merge_moments_(Tensor(a!) mean, Tensor(b!) m2, int count, Tensor batch_mean, Tensor batch_var,"
      " int batch_count, bool unbiased) -> ()");
}

TORCH_LIBRARY_IMPL(bnkit, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_layer_moments", TORCH_FN(bnkit::batch_norm_layer_moments));
  m.impl("merge_moments_", TORCH_FN(bnkit::merge_moments));
}
