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
//
// Each has a CPU kernel and a Meta kernel (shapes only: lets torch.compile /
// torch.export trace them as single opaque ops).  The forward ops have an
// Autograd kernel (a torch::autograd::Function, in autograd.cpp).
#include "bnkit_kernels.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace bnkit {
namespace {

using at::Tensor;

// ------------------------------------------------------------ meta kernels --

at::TensorOptions stat_options(const Tensor& x3) {
  return x3.options().dtype(acc_dtype(x3.scalar_type()));
}

void meta_check(const Tensor& x3, const char* op) {
  TORCH_CHECK(
      x3.dim() == 3, "bnkit::", op, ": expected x3 to be the 3-D view (outer, C, inner), got ", x3.dim(), " dims");
}

std::tuple<Tensor, Tensor, Tensor> train_meta(
    const Tensor& x3,
    const std::optional<Tensor>&,
    const std::optional<Tensor>&,
    double) {
  meta_check(x3, "batch_norm_train");
  auto C = x3.sym_size(1);
  return {
      at::empty_like(x3, at::MemoryFormat::Contiguous),
      at::empty_symint({C}, stat_options(x3)),
      at::empty_symint({C}, stat_options(x3))};
}

Tensor eval_meta(const Tensor& x3, const Tensor&, const Tensor&) {
  meta_check(x3, "batch_norm_eval");
  return at::empty_like(x3, at::MemoryFormat::Contiguous);
}

Tensor infer_meta(
    const Tensor& x3,
    const Tensor&,
    const Tensor&,
    const std::optional<Tensor>&,
    const std::optional<Tensor>&,
    double) {
  meta_check(x3, "batch_norm_infer");
  return at::empty_like(x3, at::MemoryFormat::Contiguous);
}

std::tuple<Tensor, Tensor> moments_meta(const Tensor& x3) {
  meta_check(x3, "moments");
  auto C = x3.sym_size(1);
  return {at::empty_symint({C}, stat_options(x3)), at::empty_symint({C}, stat_options(x3))};
}

std::tuple<Tensor, Tensor, Tensor> backward_meta(
    const Tensor&,
    const Tensor& x3,
    const Tensor&,
    const Tensor&,
    const std::optional<Tensor>&,
    double) {
  meta_check(x3, "batch_norm_backward");
  auto C = x3.sym_size(1);
  return {
      at::empty_like(x3, at::MemoryFormat::Contiguous),
      at::empty_symint({C}, stat_options(x3)),
      at::empty_symint({C}, stat_options(x3))};
}

Tensor backward_apply_meta(
    const Tensor&,
    const Tensor& x3,
    const Tensor&,
    const Tensor&,
    const std::optional<Tensor>&,
    const Tensor&,
    const Tensor&,
    int64_t,
    double) {
  meta_check(x3, "batch_norm_backward_apply");
  return at::empty_like(x3, at::MemoryFormat::Contiguous);
}

std::tuple<Tensor, Tensor, Tensor> eval_backward_meta(const Tensor&, const Tensor& x3, const Tensor&) {
  meta_check(x3, "batch_norm_eval_backward");
  auto C = x3.sym_size(1);
  return {
      at::empty_like(x3, at::MemoryFormat::Contiguous),
      at::empty_symint({C}, stat_options(x3)),
      at::empty_symint({C}, stat_options(x3))};
}

} // namespace
} // namespace bnkit

TORCH_LIBRARY(bnkit, m) {
  m.def("batch_norm_train(Tensor x3, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_eval(Tensor x3, Tensor scale, Tensor shift) -> Tensor");
  m.def(
      "batch_norm_infer(Tensor x3, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def("moments(Tensor x3) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_backward(Tensor grad_y3, Tensor x3, Tensor mean, Tensor var, Tensor? weight, float eps)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_eval_backward(Tensor grad_y3, Tensor x3, Tensor scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_backward_apply(Tensor grad_y3, Tensor x3, Tensor mean, Tensor var, Tensor? weight,"
      " Tensor sum_dy, Tensor sum_dy_xhat, int count, float eps) -> Tensor");
  m.def(
      "update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var,"
      " float factor, int count, bool check_finite) -> bool");
  m.def(
      "running_update_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked,"
      " Tensor mean, Tensor var, float momentum, int count, bool check_finite) -> bool");
  m.def("layer_constants() -> (int, int, int, int, float)", [] {
    return std::make_tuple(
        bnkit::kHandled, bnkit::kNonFinite, bnkit::kNotHandled, bnkit::kRanksFrom2, bnkit::kCumulativeMomentum);
  });
  m.def("cpu_isa() -> str", [] { return std::string(bnkit::cpu_isa()); });
  m.def("_tune(str name, int value) -> int", [](std::string name, int64_t value) {
    return bnkit::set_tuning(name, value);
  });
  m.def(
      "batch_norm_layer(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
      " Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, float momentum, float eps,"
      " int axis, int num_features, int ranks, bool check_finite) -> (Tensor, int)");
}

TORCH_LIBRARY_IMPL(bnkit, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_layer", TORCH_FN(bnkit::batch_norm_layer));
  m.impl("update_running_stats_", TORCH_FN(bnkit::update_running_stats_inplace));
  m.impl("running_update_", TORCH_FN(bnkit::running_update));
}

TORCH_LIBRARY_IMPL(bnkit, CPU, m) {
  m.impl("batch_norm_train", TORCH_FN(bnkit::batch_norm_train_cpu));
  m.impl("batch_norm_eval", TORCH_FN(bnkit::batch_norm_eval_cpu));
  m.impl("batch_norm_infer", TORCH_FN(bnkit::batch_norm_infer_cpu));
  m.impl("moments", TORCH_FN(bnkit::moments_cpu));
  m.impl("batch_norm_backward", TORCH_FN(bnkit::batch_norm_backward_cpu));
  m.impl("batch_norm_eval_backward", TORCH_FN(bnkit::batch_norm_eval_backward_cpu));
  m.impl("batch_norm_backward_apply", TORCH_FN(bnkit::batch_norm_backward_apply_cpu));
}

TORCH_LIBRARY_IMPL(bnkit, Meta, m) {
  m.impl("batch_norm_train", TORCH_FN(bnkit::train_meta));
  m.impl("batch_norm_eval", TORCH_FN(bnkit::eval_meta));
  m.impl("batch_norm_infer", TORCH_FN(bnkit::infer_meta));
  m.impl("moments", TORCH_FN(bnkit::moments_meta));
  m.impl("batch_norm_backward", TORCH_FN(bnkit::backward_meta));
  m.impl("batch_norm_eval_backward", TORCH_FN(bnkit::eval_backward_meta));
  m.impl("batch_norm_backward_apply", TORCH_FN(bnkit::backward_apply_meta));
}

TORCH_LIBRARY_IMPL(bnkit, Autograd, m) {
  m.impl("batch_norm_train", TORCH_FN(bnkit::train_autograd));
  m.impl("batch_norm_eval", TORCH_FN(bnkit::eval_autograd));
  m.impl("batch_norm_infer", TORCH_FN(bnkit::infer_autograd));
  m.impl("moments", TORCH_FN(bnkit::moments_autograd));
}
