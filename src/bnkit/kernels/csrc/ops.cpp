// bnkit: operator registration (TORCH_LIBRARY) and C++ autograd support.
//
// Ops (all on the canonical contiguous 3-D view x3 = (outer, C, inner)):
//   bnkit::batch_norm_train(x3, weight?, bias?, eps) -> (y3, mean, var)
//       mean and biased var are non-differentiable outputs (running stats).
//   bnkit::batch_norm_eval(x3, scale, shift) -> y3 = x3*scale[c] + shift[c]
//   bnkit::batch_norm_infer(x3, mean, var, weight?, bias?, eps) -> y3
//       inference with given (running) statistics, folded inside the op
//   bnkit::moments(x3) -> (mean, biased var)       (differentiable)
//   bnkit::batch_norm_backward(grad_y3, x3, mean, var, weight?, eps)
//       -> (grad_x3, grad_weight, grad_bias)
//   bnkit::batch_norm_eval_backward(grad_y3, x3, scale)
//       -> (grad_x3, grad_scale, grad_shift)
//   bnkit::batch_norm_backward_apply(grad_y3, x3, mean, var, weight?, sum_dy,
//       sum_dy_xhat, count, eps) -> grad_x3
//       the backward's apply phase with sums reduced by the caller (SyncBN)
//   bnkit::update_running_stats_(running_mean!, running_var!, mean, var, factor,
//       count, check_finite) -> bool   (eager running-average update)
//   bnkit::running_update_(running_mean!, running_var!, num_batches_tracked!?,
//       mean, var, momentum, count, check_finite) -> bool
//       the running-statistics phase of every layer call: factor (momentum < 0:
//       cumulative average), update, num_batches_tracked increment
//   bnkit::layer_constants() -> (handled, nonfinite, not_handled, ranks_from_2,
//       cumulative_momentum)   (the values Python shares with layer.cpp)
//   bnkit::cpu_isa() -> str   (instruction set of the inner loops in use)
//   bnkit::_tune(name, value) -> int   (sets a tuning knob, returns the old
//       value; value < 0 reads it: benchmarks A/B settings in one process)
//   bnkit::batch_norm_layer(input, weight?, bias?, running_mean!?, running_var!?,
//       num_batches_tracked!?, training, momentum, eps, axis, num_features,
//       ranks, check_finite) -> (output, status)
//       a BN layer's whole eager CPU forward on the input as it is (any rank
//       and layout; momentum < 0: cumulative average; ranks: bit d set when
//       a d-D input is accepted, 0 for any; num_features 0: any).  status 0:
//       done; 1: done, but the batch statistics were not finite and the
//       running statistics were left unchanged (check_finite); 2: not handled,
//       nothing was changed -- use the general path (layer.cpp).
//   bnkit::batch_norm_act_layer(<batch_norm_layer's arguments>, act_kind,
//       act_min, act_max) -> (output, status)
//       the same call with the output act(BN(x)): act_kind 0 clamp(., act_min,
//       act_max) (an infinite bound: none; ReLU, ReLU6, Hardtanh), 1
//       Hardswish, 2 SiLU; the backward that of both (BatchNormAct's
//       activation fused into the kernels' passes).  Training with a graph,
//       inference without one.
//
// Each has a CPU kernel and a Meta kernel (shapes only: lets torch.compile /
// torch.export trace them as single opaque ops), both from one function
// template below (op_def.h).  The forward ops have an Autograd kernel (a
// torch::autograd::Function, registered in autograd.cpp).
#include "bnkit_kernels.h"
#include "op_def.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace bnkit {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

// ------------------------------------------------- outputs of the ops ------
// The same for both keys; only the Meta kernels check x3 here (the CPU
// kernels check it in kernels.cpp / kernels_backward.cpp).  Symbolic sizes:
// the Meta kernels also serve dynamic shapes.

// A fresh contiguous tensor of x3's shape and dtype (an x3-shaped output;
// on CPU without empty_like's extra dispatch, which small inputs notice).
Tensor like_x3(const Tensor& x3, bool meta, const char* op) {
  if (!meta) return at::empty(x3.sizes(), x3.options().memory_format(at::MemoryFormat::Contiguous));
  TORCH_CHECK(
      x3.dim() == 3, "bnkit::", op, ": expected x3 to be the 3-D view (outer, C, inner), got ", x3.dim(), " dims");
  return at::empty_like(x3, at::MemoryFormat::Contiguous);
}

// A per-channel (C,) statistic of x3, in the accumulation dtype.
Tensor stat_of(const Tensor& x3) {
  return at::empty_symint({x3.sym_size(1)}, x3.options().dtype(acc_dtype(x3.scalar_type())));
}

// (x3-shaped, statistic, statistic): the training forward's and the backward ops' outputs.
std::tuple<Tensor, Tensor, Tensor> out_and_stats(const Tensor& x3, const char* op) {
  Tensor y = like_x3(x3, true, op);
  return {y, stat_of(x3), stat_of(x3)};
}

// ---------------------------------------- the ops' CPU and Meta kernels ----

template <bool kMeta>
std::tuple<Tensor, Tensor, Tensor> train(const Tensor& x3, const OptT& weight, const OptT& bias, double eps) {
  if (kMeta) return out_and_stats(x3, "batch_norm_train");
  Tensor y = like_x3(x3, false, "batch_norm_train");
  auto [mean, var] = batch_norm_train_into(x3, y, weight, bias, eps);
  return {y, mean, var};
}

template <bool kMeta>
Tensor eval(const Tensor& x3, const Tensor& scale, const Tensor& shift) {
  return kMeta ? like_x3(x3, true, "batch_norm_eval") : batch_norm_eval_cpu(x3, scale, shift);
}

template <bool kMeta>
Tensor infer(const Tensor& x3, const Tensor& mean, const Tensor& var, const OptT& weight, const OptT& bias, double eps) {
  Tensor y = like_x3(x3, kMeta, "batch_norm_infer");
  if (!kMeta) batch_norm_infer_into(x3, y, mean, var, weight, bias, eps);
  return y;
}

template <bool kMeta>
std::tuple<Tensor, Tensor> moments(const Tensor& x3) {
  if (!kMeta) return moments_cpu(x3);
  like_x3(x3, true, "moments"); // the check only
  return {stat_of(x3), stat_of(x3)};
}

template <bool kMeta>
std::tuple<Tensor, Tensor, Tensor> backward(
    const Tensor& grad_y3, const Tensor& x3, const Tensor& mean, const Tensor& var, const OptT& weight, double eps) {
  if (kMeta) return out_and_stats(x3, "batch_norm_backward");
  Tensor dx = like_x3(x3, false, "batch_norm_backward");
  auto [dw, db] = batch_norm_backward_into(grad_y3, x3, mean, var, weight, eps, dx);
  return {dx, dw, db};
}

template <bool kMeta>
std::tuple<Tensor, Tensor, Tensor> eval_backward(const Tensor& grad_y3, const Tensor& x3, const Tensor& scale) {
  return kMeta ? out_and_stats(x3, "batch_norm_eval_backward") : batch_norm_eval_backward_cpu(grad_y3, x3, scale);
}

template <bool kMeta>
Tensor backward_apply(
    const Tensor& grad_y3, const Tensor& x3, const Tensor& mean, const Tensor& var, const OptT& weight,
    const Tensor& sum_dy, const Tensor& sum_dy_xhat, int64_t count, double eps) {
  if (kMeta) return like_x3(x3, true, "batch_norm_backward_apply");
  return batch_norm_backward_apply_cpu(grad_y3, x3, mean, var, weight, sum_dy, sum_dy_xhat, count, eps);
}

} // namespace
} // namespace bnkit

TORCH_LIBRARY(bnkit, m) {
  using namespace bnkit;
  BNKIT_DEF_OP(m, "batch_norm_train", "(Tensor x3, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
               train);
  BNKIT_DEF_OP(m, "batch_norm_eval", "(Tensor x3, Tensor scale, Tensor shift) -> Tensor", eval);
  BNKIT_DEF_OP(m, "batch_norm_infer",
               "(Tensor x3, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> Tensor", infer);
  BNKIT_DEF_OP(m, "moments", "(Tensor x3) -> (Tensor, Tensor)", moments);
  BNKIT_DEF_OP(m, "batch_norm_backward",
               "(Tensor grad_y3, Tensor x3, Tensor mean, Tensor var, Tensor? weight, float eps)"
               " -> (Tensor, Tensor, Tensor)",
               backward);
  BNKIT_DEF_OP(m, "batch_norm_eval_backward", "(Tensor grad_y3, Tensor x3, Tensor scale) -> (Tensor, Tensor, Tensor)",
               eval_backward);
  BNKIT_DEF_OP(m, "batch_norm_backward_apply",
               "(Tensor grad_y3, Tensor x3, Tensor mean, Tensor var, Tensor? weight,"
               " Tensor sum_dy, Tensor sum_dy_xhat, int count, float eps) -> Tensor",
               backward_apply);
  // Composite ops (CompositeImplicitAutograd kernels; update_running_stats_ and
  // running_update_ are registered with their kernels in autograd.cpp).
  m.def(
      "update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var,"
      " float factor, int count, bool check_finite) -> bool");
  m.def(
      "running_update_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked,"
      " Tensor mean, Tensor var, float momentum, int count, bool check_finite) -> bool");
  m.def("layer_constants() -> (int, int, int, int, float)", [] {
    return std::make_tuple(kHandled, kNonFinite, kNotHandled, kRanksFrom2, kCumulativeMomentum);
  });
  m.def("cpu_isa() -> str", [] { return std::string(cpu_isa()); });
  m.def("_tune(str name, int value) -> int", [](std::string name, int64_t value) { return set_tuning(name, value); });
  m.def(
      "batch_norm_layer(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
      " Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, float momentum, float eps,"
      " int axis, int num_features, int ranks, bool check_finite) -> (Tensor, int)",
      torch::dispatch(c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(batch_norm_layer)));
  m.def(
      "batch_norm_act_layer(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
      " Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, float momentum, float eps,"
      " int axis, int num_features, int ranks, bool check_finite, int act_kind, float act_min, float act_max)"
      " -> (Tensor, int)",
      torch::dispatch(c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(batch_norm_act_layer)));
}
