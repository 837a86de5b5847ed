// bnkit: the fused layer call, bnkit::batch_norm_layer.
//
// A BN layer's whole eager forward on CPU in one op call: the input checks,
// the canonical (outer, C, inner) view, the training kernel (or inference with
// the running statistics), the running-average update and the
// num_batches_tracked increment.  It exists for speed on small inputs, where
// the same steps as separate Python-level calls cost as much as the kernels.
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

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

namespace bnkit {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kHandled = 0;
constexpr int64_t kNonFinite = 1; // handled; the running statistics were left unchanged
constexpr int64_t kNotHandled = 2;

// How the input maps to the kernels' contiguous (outer, C, inner) view.
enum Layout : int64_t {
  kContiguous = 0, // a view: (prod(shape[:axis]), C, prod(shape[axis+1:]))
  kFeatureLast = 1, // channels-last-like: movedim(axis, -1) is contiguous; (rest, C, 1)
  kCopied = 2, // neither: a contiguous copy
};

Layout layout_of(const Tensor& x, int64_t axis) {
  if (x.is_contiguous()) return kContiguous;
  if (x.movedim(axis, -1).is_contiguous()) return kFeatureLast;
  return kCopied;
}

// t (x's shape) as the 3-D view in x's layout; copies only when t's memory
// order differs.  Differentiable (plain ATen view ops) when grad mode is on.
Tensor view3(const Tensor& t, int64_t axis, Layout layout) {
  const auto sizes = t.sizes();
  const int64_t C = sizes[axis];
  if (layout == kFeatureLast) return t.movedim(axis, -1).contiguous().view({-1, C, 1});
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= sizes[d];
  for (int64_t d = axis + 1; d < static_cast<int64_t>(sizes.size()); ++d) inner *= sizes[d];
  return t.contiguous().view({outer, C, inner});
}

// A fresh tensor of x's shape whose memory is in x's layout order (so that
// view3 of it is a view, and the kernels can write into it).
Tensor empty_in_layout(const Tensor& x, Layout layout) {
  if (layout == kFeatureLast) return at::empty_like(x, at::MemoryFormat::Preserve); // dense: strides kept
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

// The inverse of view3 for a 3-D result.
Tensor unview3(const Tensor& t3, const Tensor& like, int64_t axis, Layout layout) {
  if (layout == kFeatureLast) return t3.view(like.movedim(axis, -1).sizes()).movedim(-1, axis);
  return t3.view(like.sizes());
}

std::optional<Tensor> opt(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// Training forward of the layer on its input in its own layout; one graph node.
class LayerTrainFn : public torch::autograd::Function<LayerTrainFn> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& x,
      const std::optional<Tensor>& weight,
      const std::optional<Tensor>& bias,
      double eps,
      int64_t axis) {
    const Layout layout = layout_of(x, axis);
    Tensor y = empty_in_layout(x, layout);
    auto [mean, var] = batch_norm_train_into(view3(x, axis, layout), view3(y, axis, layout), weight, bias, eps);
    ctx->save_for_backward({x, weight.has_value() ? *weight : Tensor(), mean, var});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["layout"] = static_cast<int64_t>(layout);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false); // mean and var get no gradient: no zeros for them
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& w = saved[1];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t axis = ctx->saved_data["axis"].toInt();
    const Layout layout = static_cast<Layout>(ctx->saved_data["layout"].toInt());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const Tensor& gy = grads[0];
    if (!gy.defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) { // double backward: differentiable views and composite
      Tensor dx3;
      std::tie(dx3, dw, db) = train_backward_composite(view3(gy, axis, layout), view3(x, axis, layout), w, eps);
      dx = unview3(dx3, x, axis, layout);
    } else {
      dx = empty_in_layout(x, layout);
      std::tie(dw, db) = batch_norm_backward_into(
          view3(gy, axis, layout), view3(x, axis, layout), saved[2], saved[3], opt(w), eps, view3(dx, axis, layout));
    }
    return {
        ctx->needs_input_grad(0) ? dx : Tensor(),
        (w.defined() && ctx->needs_input_grad(1)) ? cast_like(dw, w) : Tensor(),
        (has_bias && ctx->needs_input_grad(2)) ? db : Tensor(),
        Tensor(),
        Tensor()};
  }
};

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
  const bool cumulative = momentum < 0;
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
    auto out = LayerTrainFn::apply(input, weight, bias, eps, axis);
    y = out[0];
    mean = out[1];
    var = out[2];
  } else {
    const Layout layout = layout_of(input, axis);
    y = empty_in_layout(input, layout);
    std::tie(mean, var) =
        batch_norm_train_into(view3(input, axis, layout), view3(y, axis, layout), weight, bias, eps);
  }
  if (!track) return {y, kHandled};
  const double factor =
      cumulative ? 1.0 / static_cast<double>(*nbt.const_data_ptr<int64_t>() + 1) : momentum;
  Tensor rm = *running_mean, rv = *running_var;
  if (!update_running_stats_autograd(rm, rv, mean, var, factor, count, check_finite)) return {y, kNonFinite};
  if (nbt.defined()) { // not part of any graph: incremented through its data
    *nbt.mutable_data_ptr<int64_t>() += 1;
    torch::autograd::impl::bump_version(nbt);
  }
  return {y, kHandled};
}

} // namespace bnkit
