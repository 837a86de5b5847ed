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
#include "bnkit_kernels.h"
#include "layout.h"

#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
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
  if (!track) return {y, kHandled};
  Tensor rm = *running_mean, rv = *running_var;
  if (!running_update(rm, rv, num_batches_tracked, mean, var, momentum, count, check_finite)) return {y, kNonFinite};
  return {y, kHandled};
}

} // namespace bnkit
