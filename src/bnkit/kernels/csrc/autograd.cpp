// bnkit: C++ autograd support of the forward ops (torch::autograd::Function).
//
// Each forward op's Autograd kernel runs the op below autograd and saves what
// the backward needs.  The backward calls the fused backward op; when a graph
// of the backward is requested (create_graph=True, i.e. double backward) it
// computes the same gradient with differentiable ATen ops instead,
// recomputing the statistics from x3 so that their dependence on x3 is on the
// graph.  Kept apart from ops.cpp so the two heavy header sets compile in
// parallel.  The Autograd kernels (and the composite running-statistics ops,
// which bump the buffers' version counters) are registered here, at the end.
#include "bnkit_kernels.h"
#include "layout.h"
#include "rowkernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/hardswish_backward.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/le.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace bnkit {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<Tensor>;

using TrainSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, double);
using EvalSig = Tensor(const Tensor&, const Tensor&, const Tensor&);
using InferSig = Tensor(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, double);
using MomentsSig = std::tuple<Tensor, Tensor>(const Tensor&);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, double);
using EvalBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The typed handle of a registered op, looked up once.
#define BNKIT_OP_HANDLE(fn, Sig, name)                      \
  const c10::TypedOperatorHandle<Sig>& fn() {               \
    static const auto op = find_op<Sig>("bnkit::" name);    \
    return op;                                              \
  }
BNKIT_OP_HANDLE(train_op, TrainSig, "batch_norm_train")
BNKIT_OP_HANDLE(eval_op, EvalSig, "batch_norm_eval")
BNKIT_OP_HANDLE(infer_op, InferSig, "batch_norm_infer")
BNKIT_OP_HANDLE(moments_op, MomentsSig, "moments")
BNKIT_OP_HANDLE(backward_op, BackwardSig, "batch_norm_backward")
BNKIT_OP_HANDLE(eval_backward_op, EvalBackwardSig, "batch_norm_eval_backward")
#undef BNKIT_OP_HANDLE

// An op's call below autograd (its CPU or Meta kernel): the Functions'
// forwards and fused backwards, and the calls that need no graph node.
template <typename Sig, typename... Args>
auto below_autograd(const c10::TypedOperatorHandle<Sig>& op, const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(args...);
}

bool requires_grad(const Tensor& t) {
  return t.requires_grad();
}
bool requires_grad(const OptT& t) {
  return present(t) && t->requires_grad();
}

// Whether a call records a graph node: grad mode on and an input requiring grad.
template <typename... Ts>
bool needs_graph(const Ts&... inputs) {
  return at::GradMode::is_enabled() && (requires_grad(inputs) || ...);
}

Tensor per_channel(const Tensor& t) {
  return t.reshape({1, -1, 1});
}

// Whether the input gradient may be written over the output gradient: when the
// autograd engine holds the only references to it (its input buffer and the
// list handed to backward; the rule by which AccumulateGrad steals a
// gradient), no view shares its storage, and it has the input's dtype, sizes
// and strides. That saves one input-sized allocation per backward (for a large
// layer, the fresh pages glibc maps for it); the knob reuse_grad turns it off.
// Safe because the backward kernel reduces a channel's dy before it writes any
// of that channel's dx, then maps each dy element to its dx in place; a
// gradient kept by the caller, a hook or retain_grad() has another reference.
// `strides`: those the input gradient gets (x's, but see input_grad_memory);
// dense only (the kernels write a non-dense one's copy).
bool reusable_grad(const Tensor& gy, const Tensor& x, c10::IntArrayRef strides) {
  return tuning().reuse_grad.load(std::memory_order_relaxed) != 0 && gy.use_count() == 2 && gy.has_storage() &&
      gy.storage().use_count() == 1 && gy.layout() == at::kStrided && gy.scalar_type() == x.scalar_type() &&
      gy.device() == x.device() && gy.sizes().equals(x.sizes()) && gy.strides().equals(strides) &&
      gy.is_non_overlapping_and_dense() && !gy.is_conj() && !gy.is_neg() && !gy.requires_grad();
}

// The memory the layer call's backward kernels write the input gradient
// into, in the layout torch's BN gives it: x's layout, but for an input both
// contiguous and channels-last (ambiguous_channels_last: the kernels' view is
// the same either way) the format ATen picks from x's and gy's strides. gy's
// own memory where reusable_grad allows.
Tensor input_grad_memory(const Tensor& gy, const Tensor& x, int64_t axis, Layout layout) {
  const bool ambiguous = layout == kContiguous && ambiguous_channels_last(x, axis);
  const auto fmt = ambiguous ? ambiguous_grad_format(x, gy) : at::MemoryFormat::Contiguous;
  const c10::DimVector fmt_strides = ambiguous ? strides_in_format(x.sizes(), fmt) : c10::DimVector();
  if (reusable_grad(gy, x, ambiguous ? c10::IntArrayRef(fmt_strides) : x.strides())) {
    RECORD_FUNCTION("bnkit::reuse_grad", std::vector<c10::IValue>()); // marks the reuse in a profile
    return gy;
  }
  return ambiguous ? at::empty(x.sizes(), x.options().memory_format(fmt)) : empty_in_layout(x, layout);
}

// dx (x's shape, from the differentiable composite: standard strides for
// kContiguous) in input_grad_memory's layout; a relabelling of the size-1
// axes' strides (one memory order), for ambiguous inputs only; not under
// torch.func (a vmapped gy or dx answers no memory-format queries).
Tensor composite_input_grad(const Tensor& dx, const Tensor& gy, const Tensor& x, int64_t axis, Layout layout) {
  if (layout != kContiguous || !ambiguous_channels_last(x, axis) || !gy.has_storage() || !dx.has_storage())
    return dx;
  const auto fmt = ambiguous_grad_format(x, gy);
  if (fmt == at::MemoryFormat::Contiguous || !dx.is_contiguous()) return dx;
  return dx.as_strided(x.sizes(), strides_in_format(x.sizes(), fmt));
}

// ------------------------------------------------------------ autograd fns --

// g * act'(pre) with differentiable ATen ops (the double backward's route),
// torch's rules at a clamp's bounds (no gradient on them); for SiLU and Hardswish pre has g's dtype.
Tensor act_grad_aten(const Tensor& g, const Tensor& pre, const Activation& act) {
  if (act.kind == kActClamp) {
    const Tensor stop = at::logical_or(at::le(pre, act.lo), at::ge(pre, act.hi));
    return at::where(stop, at::zeros_like(g), g);
  }
  if (act.kind == kActSilu) { // (aten::silu_backward has no derivative of its own)
    const Tensor s = at::sigmoid(pre);
    return g * s * (1 + pre * (1 - s));
  }
  return at::hardswish_backward(g, pre);
}

// The training forward, one graph node.  Two callers: the bnkit::batch_norm_train
// op on x3 (`layer` false: the kernels are reached through the dispatcher, so
// that torch.compile's fake tensors meet the Meta kernels), and the fused layer
// call on the input in its own layout with feature dim `axis` (`layer` true:
// outputs written in place, no intermediate tensors).  The backward is the
// fused backward kernel, or, when a graph of the backward is requested,
// train_backward_composite.  With `act` (the fused layer call only), the node
// is clamp(BN(x)) (Activation); it also saves the forward's per-channel values
// (act_params), from which the backward recomputes the clamp's mask.
class TrainFn : public torch::autograd::Function<TrainFn> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const Tensor& x, const OptT& weight, const OptT& bias, double eps, int64_t axis,
      bool layer, int64_t act_kind, double act_lo, double act_hi) {
    const Layout layout = layer ? layout_of(x, axis) : kContiguous;
    const bool act = act_kind >= 0; // -1: none
    const Activation activation{static_cast<int>(act_kind), act_lo, act_hi};
    Tensor y, mean, var, act_params;
    if (layer) {
      y = empty_in_layout(x, layout);
      std::tie(mean, var) = batch_norm_train_into(
          view3(x, axis, layout), view3(y, axis, layout), weight, bias, eps, act ? &activation : nullptr,
          &act_params);
    } else {
      TORCH_CHECK(!act, "bnkit: a fused activation needs the layer call");
      std::tie(y, mean, var) = below_autograd(train_op(), x, weight, bias, eps);
    }
    ctx->save_for_backward({x, or_undefined(weight), mean, var, act_params, act ? or_undefined(bias) : Tensor()});
    ctx->saved_data["act_kind"] = act_kind;
    ctx->saved_data["act_lo"] = act_lo;
    ctx->saved_data["act_hi"] = act_hi;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["layout"] = static_cast<int64_t>(layout);
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["has_bias"] = present(bias);
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
    const bool layer = ctx->saved_data["layer"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const int64_t act_kind = ctx->saved_data["act_kind"].toInt();
    const bool act = act_kind >= 0;
    const Activation activation{
        static_cast<int>(act_kind), ctx->saved_data["act_lo"].toDouble(), ctx->saved_data["act_hi"].toDouble()};
    const Tensor& act_params = saved[4];
    const Tensor& gy = grads[0];
    if (!gy.defined()) return variable_list(9);
    Tensor dx, dw, db;
    // Double backward, or a gradient without storage (torch.func: a vmapped backward such as
    // jacrev / per-sample grads / gradcheck's batched check, or a tensor subclass): the
    // kernels cannot read it, the differentiable ATen composite has every rule.
    if (at::GradMode::is_enabled() || !gy.has_storage()) {
      if (layer) {
        Tensor dx3, g3 = view3(gy, axis, layout);
        const Tensor x3 = view3(x, axis, layout);
        if (act) g3 = activation_grad(g3, x3, w, saved[5], eps, act_params, activation);
        std::tie(dx3, dw, db) = train_backward_composite(g3, x3, w, eps);
        dx = composite_input_grad(unview3(dx3, x, axis, layout), gy, x, axis, layout);
      } else {
        std::tie(dx, dw, db) = train_backward_composite(gy, x, w, eps);
      }
    } else if (layer) {
      dx = input_grad_memory(gy, x, axis, layout);
      std::tie(dw, db) = batch_norm_backward_into(
          view3(gy, axis, layout), view3(x, axis, layout), saved[2], saved[3], opt(w), eps, view3(dx, axis, layout),
          act ? &activation : nullptr, &act_params);
    } else {
      std::tie(dx, dw, db) = below_autograd(backward_op(), gy, x, saved[2], saved[3], opt(w), eps);
    }
    return {
        ctx->needs_input_grad(0) ? dx : Tensor(),
        (w.defined() && ctx->needs_input_grad(1)) ? cast_like(dw, w) : Tensor(),
        // (needs_input_grad counts the tensors given: an absent weight shifts the bias's index)
        (has_bias && ctx->needs_input_grad(w.defined() ? 2 : 1)) ? db : Tensor(),
        Tensor(),
        Tensor(),
        Tensor(),
        Tensor(),
        Tensor(),
        Tensor()};
  }

  // g * act'(pre) with differentiable ATen ops (the double backward's route):
  // pre = BN(x3) recomputed on the graph from x3 (so that act' depends on x3
  // there, as it does for SiLU and Hardswish), a clamp's mask from the
  // forward's own per-channel values (the forward's mask; it is piecewise
  // constant).
  static Tensor activation_grad(
      const Tensor& g3, const Tensor& x3, const Tensor& w, const Tensor& b, double eps, const Tensor& act_params,
      const Activation& act) {
    const auto acc = act_params.scalar_type();
    auto row = [](const Tensor& t) { return t.reshape({1, -1, 1}); };
    const Tensor xa = x3.to(acc);
    if (act.kind == kActClamp) {
      const Tensor pre = ((xa - row(act_params[0])) - row(act_params[1])) * row(act_params[2]) + row(act_params[3]);
      return act_grad_aten(g3, pre, act);
    }
    const Tensor mean = xa.mean({0, 2}, /*keepdim=*/true);
    const Tensor xc = xa - mean;
    Tensor pre = xc * at::rsqrt(xc.pow(2).mean({0, 2}, /*keepdim=*/true) + eps);
    if (w.defined()) pre = pre * row(w.to(acc));
    if (b.defined()) pre = pre + row(b.to(acc));
    return act_grad_aten(g3.to(acc), pre, act).to(g3.scalar_type());
  }
};

class EvalFn : public torch::autograd::Function<EvalFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x3, const Tensor& scale, const Tensor& shift) {
    ctx->save_for_backward({x3, scale, shift});
    return {below_autograd(eval_op(), x3, scale, shift)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &scale = saved[1], &shift = saved[2], &gy = grads[0];
    if (!gy.defined()) return {Tensor(), Tensor(), Tensor()};
    Tensor dx, dscale, dshift;
    const bool need_params = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    if (at::GradMode::is_enabled() || !need_params || !gy.has_storage()) { // (no storage: as TrainFn)
      const auto acc = acc_dtype(x.scalar_type());
      const Tensor g = gy.to(acc);
      if (ctx->needs_input_grad(0)) dx = (g * per_channel(scale.to(acc))).to(x.scalar_type());
      if (ctx->needs_input_grad(1)) dscale = (g * x.to(acc)).sum({0, 2});
      if (ctx->needs_input_grad(2)) dshift = g.sum({0, 2});
    } else {
      std::tie(dx, dscale, dshift) = below_autograd(eval_backward_op(), gy, x, scale);
    }
    return {
        ctx->needs_input_grad(0) ? dx : Tensor(),
        ctx->needs_input_grad(1) ? cast_like(dscale, scale) : Tensor(),
        ctx->needs_input_grad(2) ? cast_like(dshift, shift) : Tensor()};
  }
};

// Inference BN with given statistics (eval mode in a graph), one node.  Two
// callers, as for TrainFn: the bnkit::batch_norm_infer op on x3 (`layer`
// false) and the fused layer call on the input in its own layout (`layer`
// true), which may also fuse an activation (act_kind >= 0: y = act(BN(x))).
// The layer call's backward is one pass of the infer-backward kernels; the
// op's (which torch.compile's fake tensors may meet), a graph of the backward
// (double backward), a gradient without storage and gradients for the
// statistics take a few differentiable ATen ops.
class InferFn : public torch::autograd::Function<InferFn> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const Tensor& x, const Tensor& mean, const Tensor& var, const OptT& weight,
      const OptT& bias, double eps, int64_t axis, bool layer, int64_t act_kind, double act_lo, double act_hi) {
    const Layout layout = layer ? layout_of(x, axis) : kContiguous;
    const bool act = act_kind >= 0; // -1: none
    const Activation activation{static_cast<int>(act_kind), act_lo, act_hi};
    Tensor y;
    if (layer) {
      y = empty_in_layout(x, layout);
      batch_norm_infer_into(
          view3(x, axis, layout), view3(y, axis, layout), mean, var, weight, bias, eps, act ? &activation : nullptr);
    } else {
      TORCH_CHECK(!act, "bnkit: a fused activation needs the layer call");
      y = below_autograd(infer_op(), x, mean, var, weight, bias, eps);
    }
    ctx->save_for_backward({x, mean, var, or_undefined(weight), or_undefined(bias)});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["layout"] = static_cast<int64_t>(layout);
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["act_kind"] = act_kind;
    ctx->saved_data["act_lo"] = act_lo;
    ctx->saved_data["act_hi"] = act_hi;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &mean = saved[1], &var = saved[2], &w = saved[3], &b = saved[4], &gy = grads[0];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t axis = ctx->saved_data["axis"].toInt();
    const Layout layout = static_cast<Layout>(ctx->saved_data["layout"].toInt());
    const bool layer = ctx->saved_data["layer"].toBool();
    const int64_t act_kind = ctx->saved_data["act_kind"].toInt();
    const Activation activation{
        static_cast<int>(act_kind), ctx->saved_data["act_lo"].toDouble(), ctx->saved_data["act_hi"].toDouble()};
    const Activation* act = act_kind >= 0 ? &activation : nullptr;
    variable_list out(11);
    if (!gy.defined()) return out;
    const bool need_x = ctx->needs_input_grad(0), need_w = w.defined() && ctx->needs_input_grad(3),
               need_b = b.defined() && ctx->needs_input_grad(w.defined() ? 4 : 3); // (an absent weight: one less)
    const bool need_stats = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    const Tensor x3 = layer ? view3(x, axis, layout) : x;
    if (layer && !at::GradMode::is_enabled() && gy.has_storage() && !need_stats) {
      Tensor dx; // (the one-pass kernel; gy's memory is reused for dx where only autograd holds it)
      if (need_x) dx = input_grad_memory(gy, x, axis, layout);
      auto [dw, db] = batch_norm_infer_backward_into(
          view3(gy, axis, layout), x3, mean, var, opt(w), opt(b), eps, act,
          need_x ? view3(dx, axis, layout) : Tensor());
      out[0] = dx;
      if (need_w) out[3] = cast_like(dw, w);
      if (need_b) out[4] = cast_like(db, b);
      return out;
    }
    const auto acc = acc_dtype(x3.scalar_type());
    Tensor g = (layer ? view3(gy, axis, layout) : gy).to(acc);
    const Tensor invstd = at::rsqrt(var.to(acc) + eps);
    const Tensor scale = w.defined() ? invstd * w.to(acc) : invstd;
    const Tensor xc = x3.to(acc) - per_channel(mean.to(acc));
    if (act != nullptr) g = activation_grad(g, xc, scale, b, x3.scalar_type(), *act);
    if (need_x) {
      const Tensor dx3 = (g * per_channel(scale)).to(x3.scalar_type());
      out[0] = layer ? composite_input_grad(unview3(dx3, x, axis, layout), gy, x, axis, layout) : dx3;
    }
    Tensor gsum;
    if (need_stats || need_b) gsum = g.sum({0, 2});
    if (need_w || need_stats) {
      const Tensor gxc = (g * xc).sum({0, 2});
      if (need_w) out[3] = cast_like(gxc * invstd, w);
      if (ctx->needs_input_grad(1)) out[1] = cast_like(-gsum * scale, mean);
      if (ctx->needs_input_grad(2)) out[2] = cast_like(-0.5 * gxc * scale * invstd * invstd, var);
    }
    if (need_b) out[4] = cast_like(gsum, b);
    return out;
  }

  // g * act'(pre) with differentiable ATen ops, pre = xc * scale + b as BN's
  // output in `dtype` (on the graph, for SiLU's and Hardswish's second
  // derivatives; a clamp's mask is piecewise constant).
  static Tensor activation_grad(
      const Tensor& g, const Tensor& xc, const Tensor& scale, const Tensor& b, at::ScalarType dtype,
      const Activation& act) {
    Tensor pre = xc * per_channel(scale);
    if (b.defined()) pre = pre + per_channel(b.to(g.scalar_type()));
    return act_grad_aten(g, pre.to(dtype).to(g.scalar_type()), act);
  }
};

class MomentsFn : public torch::autograd::Function<MomentsFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x3) {
    auto [mean, var] = below_autograd(moments_op(), x3);
    ctx->save_for_backward({x3});
    return {mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor x = ctx->get_saved_variables()[0];
    const Tensor& gm = grads[0];
    const Tensor& gv = grads[1];
    const int64_t count = x.size(0) * x.size(2);
    if ((!gm.defined() && !gv.defined()) || count == 0) return {at::zeros_like(x)};
    // d mean / dx = 1/M;  d var / dx = 2 (x - mean) / M.
    const auto acc = acc_dtype(x.scalar_type());
    const Tensor xa = x.to(acc);
    Tensor dx;
    if (gv.defined()) {
      const Tensor xc = xa - xa.mean({0, 2}, /*keepdim=*/true);
      dx = per_channel(gv.to(acc)) * xc * (2.0 / count);
    }
    if (gm.defined()) {
      const Tensor t = per_channel(gm.to(acc)) / count;
      dx = dx.defined() ? dx + t : t.expand(x.sizes());
    }
    return {dx.to(x.scalar_type()).contiguous()};
  }
};

} // namespace

std::tuple<Tensor, Tensor, Tensor> train_backward_composite(
    const Tensor& gy,
    const Tensor& x,
    const Tensor& w,
    double eps) {
  const auto acc = acc_dtype(x.scalar_type());
  const Tensor xa = x.to(acc);
  const Tensor g = gy.to(acc);
  const int64_t count = x.size(0) * x.size(2);
  const Tensor mean = xa.mean({0, 2}, /*keepdim=*/true);
  const Tensor xc = xa - mean;
  const Tensor var = xc.pow(2).mean({0, 2}, /*keepdim=*/true);
  const Tensor invstd = at::rsqrt(var + eps);
  const Tensor xhat = xc * invstd;
  Tensor db = g.sum({0, 2});
  Tensor dw = (g * xhat).sum({0, 2});
  Tensor dx;
  if (count == 0) {
    dx = at::zeros_like(x);
  } else {
    const Tensor k = w.defined() ? invstd * per_channel(w.to(acc)) : invstd;
    dx = (k * (g - per_channel(db) / count - xhat * per_channel(dw) / count)).to(x.scalar_type());
  }
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> train_layer_autograd(
    const Tensor& input, const OptT& weight, const OptT& bias, double eps, int64_t axis, const Activation* act) {
  auto out = act != nullptr ? TrainFn::apply(input, weight, bias, eps, axis, true, act->kind, act->lo, act->hi)
                            : TrainFn::apply(input, weight, bias, eps, axis, true, -1, 0.0, 0.0);
  return {out[0], out[1], out[2]};
}

Tensor infer_autograd(
    const Tensor& x3, const Tensor& mean, const Tensor& var, const OptT& weight, const OptT& bias, double eps) {
  if (!needs_graph(x3, mean, var, weight, bias)) return below_autograd(infer_op(), x3, mean, var, weight, bias, eps);
  return InferFn::apply(x3, mean, var, weight, bias, eps, 1, false, -1, 0.0, 0.0)[0];
}

Tensor infer_layer_autograd(
    const Tensor& input, const Tensor& mean, const Tensor& var, const OptT& weight, const OptT& bias, double eps,
    int64_t axis, const Activation* act) {
  return act != nullptr ? InferFn::apply(input, mean, var, weight, bias, eps, axis, true, act->kind, act->lo, act->hi)[0]
                        : InferFn::apply(input, mean, var, weight, bias, eps, axis, true, -1, 0.0, 0.0)[0];
}

namespace {

// The Autograd kernels of the other forward ops.
std::tuple<Tensor, Tensor, Tensor> train_autograd(const Tensor& x3, const OptT& weight, const OptT& bias, double eps) {
  // inference / no_grad: skip the autograd Function machinery
  if (!needs_graph(x3, weight, bias)) return below_autograd(train_op(), x3, weight, bias, eps);
  auto out = TrainFn::apply(x3, weight, bias, eps, 1, false, -1, 0.0, 0.0);
  return {out[0], out[1], out[2]};
}

Tensor eval_autograd(const Tensor& x3, const Tensor& scale, const Tensor& shift) {
  return EvalFn::apply(x3, scale, shift)[0];
}

std::tuple<Tensor, Tensor> moments_autograd(const Tensor& x3) {
  auto out = MomentsFn::apply(x3);
  return {out[0], out[1]};
}

// bnkit::update_running_stats_: update_running_stats_cpu plus the buffers'
// version counters (the op has no autograd formula; the buffers must not
// require grad).
bool update_running_stats_inplace(
    Tensor& running_mean, Tensor& running_var, const Tensor& mean, const Tensor& var, double factor, int64_t count,
    bool check_finite) {
  TORCH_CHECK(
      !running_mean.requires_grad() && !running_var.requires_grad(),
      "bnkit::update_running_stats_: the running statistics must not require grad");
  const bool ok = update_running_stats_cpu(running_mean, running_var, mean, var, factor, count, check_finite);
  if (ok && count > 0) {
    torch::autograd::impl::bump_version(running_mean);
    torch::autograd::impl::bump_version(running_var);
  }
  return ok;
}

} // namespace

bool running_update(
    Tensor& running_mean, Tensor& running_var, const OptT& num_batches_tracked, const Tensor& mean,
    const Tensor& var, double momentum, int64_t count, bool check_finite) {
  const Tensor nbt = or_undefined(num_batches_tracked);
  TORCH_CHECK(
      !nbt.defined() || (nbt.device().is_cpu() && nbt.scalar_type() == at::kLong && nbt.numel() == 1),
      "bnkit::running_update_: num_batches_tracked must be a one-element int64 CPU tensor");
  if (count > 0) { // an empty batch has no statistics; it is still counted
    const bool cumulative = momentum < 0;
    TORCH_CHECK(
        !cumulative || nbt.defined(),
        "bnkit::running_update_: the cumulative average (momentum < 0) needs num_batches_tracked");
    const double factor = cumulative ? 1.0 / static_cast<double>(*nbt.const_data_ptr<int64_t>() + 1) : momentum;
    if (!update_running_stats_inplace(running_mean, running_var, mean, var, factor, count, check_finite))
      return false;
  }
  if (nbt.defined()) { // not part of any graph: incremented through its data
    *nbt.mutable_data_ptr<int64_t>() += 1;
    torch::autograd::impl::bump_version(nbt);
  }
  return true;
}

} // namespace bnkit

TORCH_LIBRARY_IMPL(bnkit, Autograd, m) {
  m.impl("batch_norm_train", TORCH_FN(bnkit::train_autograd));
  m.impl("batch_norm_eval", TORCH_FN(bnkit::eval_autograd));
  m.impl("batch_norm_infer", TORCH_FN(bnkit::infer_autograd));
  m.impl("moments", TORCH_FN(bnkit::moments_autograd));
}

TORCH_LIBRARY_IMPL(bnkit, CompositeImplicitAutograd, m) {
  m.impl("update_running_stats_", TORCH_FN(bnkit::update_running_stats_inplace));
  m.impl("running_update_", TORCH_FN(bnkit::running_update));
}
