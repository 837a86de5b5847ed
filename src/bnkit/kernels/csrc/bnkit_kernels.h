// bnkit: fused CPU Batch Normalization kernels (declarations).
//
// Every kernel takes the canonical contiguous 3-D view x3 of shape
// (outer, C, inner) and reduces over dims (0, 2) per channel C.
//   inner == 1  -> channels-last / BatchNorm1d: rows of C contiguous values,
//                  vectorized over C;
//   inner  > 1  -> NCHW-like: rows of `inner` contiguous values per (n, c),
//                  vectorized over inner.
// Statistics and parameters are float32 for float32/bfloat16/float16 inputs
// and float64 for float64 inputs ("the accumulation dtype").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace bnkit {

// The accumulation dtype of an input dtype (see above).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether an optional tensor argument is given (present and defined).
inline bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// An optional tensor argument as a tensor (undefined where absent), and back.
inline at::Tensor or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}
inline std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// A gradient in the dtype of the tensor it is for (undefined stays undefined).
inline at::Tensor cast_like(const at::Tensor& g, const at::Tensor& like) {
  if (!g.defined() || !like.defined() || g.scalar_type() == like.scalar_type()) return g;
  return g.to(like.scalar_type());
}

// ---- kernels.cpp (forward) and kernels_backward.cpp: the CPU kernels of the
// ops in ops.cpp (whose header comment gives each op's contract); the *_into
// ones write into given contiguous outputs of x3's shape and dtype (possibly
// views of a channels-last tensor).

// An activation fused after the normalization (BatchNormAct's act): kind
// 0, clamp(BN(x), lo, hi) with NaN for a missing bound (ReLU: lo = 0, hi =
// NaN; ReLU6; Hardtanh), 1 Hardswish, 2 SiLU (rowkernels.h: ActKind).  The
// backward is the activation's own rule (ReLU and Hardtanh pass no gradient
// at their bounds), at the pre-activation recomputed from x.
struct Activation {
  int kind;
  double lo, hi;
};

// Training forward: (mean, biased var); y3 undefined: statistics only.  With
// `act`, y3 = clamp(BN(x3)) and *act_params receives the forward's
// per-channel values, a (4, C) tensor in the accumulation dtype (the mean as a
// pair hi + lo, the scale, the shift), for the backward to recompute the
// pre-activation exactly.
std::tuple<at::Tensor, at::Tensor> batch_norm_train_into(
    const at::Tensor& x3, const at::Tensor& y3, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const Activation* act = nullptr,
    at::Tensor* act_params = nullptr);

// y3 = x3 * scale[c] + shift[c].
at::Tensor batch_norm_eval_cpu(const at::Tensor& x3, const at::Tensor& scale, const at::Tensor& shift);

// Inference with given statistics:
// y3 = (x3 - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c].
// With `act`: y3 = clamp(that).
void batch_norm_infer_into(
    const at::Tensor& x3, const at::Tensor& y3, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    const Activation* act = nullptr);

// (mean, biased var).
std::tuple<at::Tensor, at::Tensor> moments_cpu(const at::Tensor& x3);

// The training forward's backward from the saved batch mean and biased var:
// grad_x3 into dx3; returns (grad_weight, grad_bias).  With `act` and the
// forward's act_params: the backward of clamp(BN(x3)).
std::tuple<at::Tensor, at::Tensor> batch_norm_backward_into(
    const at::Tensor& grad_y3, const at::Tensor& x3, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, double eps, const at::Tensor& dx3, const Activation* act = nullptr,
    const at::Tensor* act_params = nullptr);

// The backward of batch_norm_infer_into (eval-mode BN with the running
// statistics, then `act`) in one pass: grad_x3 into dx3 (undefined: not
// computed); returns (grad_weight, grad_bias) in the accumulation dtype.  The
// running statistics get no gradient here.
std::tuple<at::Tensor, at::Tensor> batch_norm_infer_backward_into(
    const at::Tensor& grad_y3, const at::Tensor& x3, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    const Activation* act, const at::Tensor& dx3);

// (grad_x3, grad_scale, grad_shift) of the eval forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_eval_backward_cpu(
    const at::Tensor& grad_y3, const at::Tensor& x3, const at::Tensor& scale);

// In place: running = (1 - factor) * running + factor * batch, with the
// unbiased batch variance (var * count / (count - 1)).  With check_finite,
// nothing is written and false is returned when a batch statistic is NaN/Inf.
bool update_running_stats_cpu(
    at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean, const at::Tensor& var,
    double factor, int64_t count, bool check_finite);

// grad_x3 of the training forward from the backward's sums given by the
// caller (sum_dy = sum(g), sum_dy_xhat = sum(g * xhat) over `count` values,
// e.g. all-reduced across ranks): the backward-apply phase.
at::Tensor batch_norm_backward_apply_cpu(
    const at::Tensor& grad_y3, const at::Tensor& x3, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
    int64_t count, double eps);

// ---- values shared with Python (read there once through bnkit::layer_constants) --
// Status of bnkit::batch_norm_layer.
constexpr int64_t kHandled = 0;
constexpr int64_t kNonFinite = 1; // handled; the running statistics were left unchanged
constexpr int64_t kNotHandled = 2; // nothing changed: the caller takes the general path
// Rank mask with bits 2, 3, ... set: "at least (N, C)", the F-style API's rule.
constexpr int64_t kRanksFrom2 = -4;
// The momentum that asks for the cumulative average (momentum=None in Python).
constexpr double kCumulativeMomentum = -1.0;

// ---- autograd.cpp (which also registers the forward ops' Autograd kernels)

// bnkit::batch_norm_infer's Autograd kernel (inference with given statistics).
at::Tensor infer_autograd(
    const at::Tensor& x3, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);

// Eval mode in a graph: the inference forward of a layer on `input` in its own
// layout (feature dim `axis`), then `act` (may be null), as one autograd node
// whose backward is one pass (batch_norm_infer_backward_into).
at::Tensor infer_layer_autograd(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t axis, const Activation* act);

// The training forward of a layer on `input` in its own layout (feature dim
// `axis`), as one autograd node: the one training Function of the C++
// backend (bnkit::batch_norm_train's Autograd kernel is it on x3 with axis 1).
// Returns (y, mean, var).
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_layer_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, int64_t axis, const Activation* act = nullptr);

// bnkit::running_update_, the running-statistics phase of every layer call:
// the factor (momentum, or 1 / (num_batches_tracked + 1) for the cumulative
// average, momentum < 0), the update (update_running_stats_cpu plus the
// buffers' version counters), and the num_batches_tracked increment (also for
// an empty batch, count 0, which has no statistics to average).  Returns
// false, changing nothing, when check_finite finds NaN/Inf.
bool running_update(
    at::Tensor& running_mean, at::Tensor& running_var, const std::optional<at::Tensor>& num_batches_tracked,
    const at::Tensor& mean, const at::Tensor& var, double momentum, int64_t count, bool check_finite);

// The differentiable (ATen ops) gradient of the training forward on the 3-D
// view, with the statistics recomputed from x3 on the graph: the double
// backward of every training op.  Returns (grad_x3, grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_backward_composite(
    const at::Tensor& grad_y3, const at::Tensor& x3, const at::Tensor& weight, double eps);

// The fused layer call's arguments, in the order of bnkit::batch_norm_layer's
// schema (ops.cpp): built once per call, by batch_norm_layer below or by the
// boxed kernels of its training variants (layer.cpp), and read by the accept
// predicate and the body alike.
struct LayerCall {
  at::Tensor input;
  std::optional<at::Tensor> weight, bias, running_mean, running_var, num_batches_tracked;
  bool training;
  double momentum, eps;
  int64_t axis, num_features, ranks;
  bool check_finite;
  // bnkit::batch_norm_act_layer: y = clamp(BN(x)) (Activation).
  const Activation* act = nullptr;
};

// The fused layer call (layer.cpp): (output, status), the running update applied.
std::tuple<at::Tensor, int64_t> layer_forward(const LayerCall& call);

// bnkit::batch_norm_act_layer (layer.cpp): batch_norm_layer's call with y =
// act(BN(x)), act_kind an ActKind (0: clamp to [act_min, act_max], an
// infinite bound: none; 1: Hardswish; 2: SiLU).
std::tuple<at::Tensor, int64_t> batch_norm_act_layer(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training, double momentum, double eps, int64_t axis,
    int64_t num_features, int64_t ranks, bool check_finite, int64_t act_kind, double act_min, double act_max);

// bnkit::batch_norm_layer's kernel as ops.cpp registers it (unboxed).
inline std::tuple<at::Tensor, int64_t> batch_norm_layer(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked,
    bool training,
    double momentum,
    double eps,
    int64_t axis,
    int64_t num_features,
    int64_t ranks,
    bool check_finite) {
  return layer_forward(
      {input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, axis,
       num_features, ranks, check_finite});
}

// Instruction set of the row kernels in use: "default", "avx2" or "avx512".
const char* cpu_isa();

// Sets a tuning knob (see Tuning in rowkernels.h) and returns its previous
// value; a negative value only reads it.
int64_t set_tuning(const std::string& name, int64_t value);

} // namespace bnkit
