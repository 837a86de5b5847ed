// bnkit: the fused layer call, bnkit::batch_norm_layer.
//
// A BN layer's whole eager forward on CPU in one op call, for speed on small
// inputs (where the same steps as separate Python-level calls cost as much as
// the kernels).  It holds only two things: the accept predicate (below, the
// checks at the top of layer_call), which must decline whatever the general
// Python path (bnkit.engine) would treat differently, and
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
// Its training variants, for engine.running_update's hook (accumulate_stats),
// are the same call with the running update left out: one kernel pass and no
// scratch buffers.  bnkit::batch_norm_layer_moments returns the batch moments;
// bnkit::batch_norm_layer_accumulate_ merges them at once, in place, into the
// float64 totals the hook owns (so a micro-batch costs one op call and no
// tensor outlives it), as bnkit::merge_moments_ merges moments computed
// elsewhere.  They are boxed kernels that read the arguments they share with
// batch_norm_layer into the same LayerCall (bnkit_kernels.h).
#include "bnkit_kernels.h"
#include "layout.h"
#include "rowkernels.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <string>
#include <tuple>

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

// A training call's batch moments, left unapplied: mean and biased variance in
// the kernels' accumulation dtype, over `count` values per channel.
struct BatchMoments {
  Tensor mean, var;
  int64_t count = 0;
};

// The whole call: the accept predicate, the forward and then either the
// running update (`unapplied` null) or, for a training call, nothing but the
// batch moments in `*unapplied` (status kNonFinite when check_finite finds
// NaN/Inf in them).
std::tuple<Tensor, int64_t> layer_call(const LayerCall& c, BatchMoments* unapplied) {
  const Tensor& input = c.input;
  const auto &weight = c.weight, &bias = c.bias, &running_mean = c.running_mean, &running_var = c.running_var;
  const std::tuple<Tensor, int64_t> not_handled{input, kNotHandled};
  if (!plain_cpu(input) || c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python)) return not_handled;
  const auto dt = input.scalar_type();
  if (dt != at::kFloat && dt != at::kDouble && dt != at::kBFloat16 && dt != at::kHalf) return not_handled;
  const int64_t ndim = input.dim();
  if (ndim < 1 || ndim >= 64 || (c.ranks != 0 && ((c.ranks >> ndim) & 1) == 0)) return not_handled;
  if (c.axis < -ndim || c.axis >= ndim) return not_handled;
  const int64_t axis = c.axis < 0 ? c.axis + ndim : c.axis;
  const int64_t C = input.size(axis);
  if ((c.num_features > 0 && C != c.num_features) || C == 0) return not_handled;
  if (!per_channel_ok(weight, input, C) || !per_channel_ok(bias, input, C)) return not_handled;
  const bool track = defined(running_mean);
  if (track != defined(running_var)) return not_handled;
  if (track &&
      (!per_channel_ok(running_mean, input, C) || !per_channel_ok(running_var, input, C) ||
       !running_mean->is_contiguous() || !running_var->is_contiguous() || running_mean->requires_grad() ||
       running_var->requires_grad() ||
       // the op updates buffers of one dtype (a bf16 input may mix bf16 and float32 ones: the general path)
       running_mean->scalar_type() != running_var->scalar_type()))
    return not_handled;
  const bool grad =
      at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) || requires_grad(bias));
  const double eps = c.eps;

  if (!c.training) {
    if (!track || !(eps >= 0) || (grad && (running_mean->requires_grad() || running_var->requires_grad())))
      return not_handled;
    // An eval-mode layer in a graph (fine-tuning with frozen statistics, input gradients of an eval
    // model): one node whose backward is one pass.
    if (grad) return {infer_layer_autograd(input, *running_mean, *running_var, weight, bias, eps, axis, c.act), kHandled};
    const Layout layout = layout_of(input, axis);
    Tensor y = empty_in_layout(input, layout);
    batch_norm_infer_into(
        view3(input, axis, layout), view3(y, axis, layout), *running_mean, *running_var, weight, bias, eps, c.act);
    return {y, kHandled};
  }

  if (!(eps > 0) || !std::isfinite(eps)) return not_handled;
  const int64_t count = input.numel() / C;
  if (count <= 1) return not_handled; // empty batches and the one-value error: the general path
  const bool cumulative = c.momentum < 0; // kCumulativeMomentum
  const Tensor nbt = defined(c.num_batches_tracked) ? *c.num_batches_tracked : Tensor();
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
    std::tie(y, mean, var) = train_layer_autograd(input, weight, bias, eps, axis, c.act);
  } else {
    const Layout layout = layout_of(input, axis);
    y = empty_in_layout(input, layout);
    Tensor act_params; // (no backward: not kept)
    std::tie(mean, var) = batch_norm_train_into(
        view3(input, axis, layout), view3(y, axis, layout), weight, bias, eps, c.act, &act_params);
  }
  if (unapplied != nullptr) {
    *unapplied = {mean, var, count};
    return {y, c.check_finite && !all_finite(var) ? kNonFinite : kHandled};
  }
  if (!track) return {y, kHandled};
  Tensor rm = *running_mean, rv = *running_var;
  if (!running_update(rm, rv, c.num_batches_tracked, mean, var, c.momentum, count, c.check_finite))
    return {y, kNonFinite};
  return {y, kHandled};
}

// A layer's accumulated moments (accumulate_stats' totals): one contiguous
// float64 CPU tensor of 2C + 1 values, the C means, the C M2s and the count
// (a float64 integer, exact to 2^53).  Checks it and returns its data.
double* totals_data(const Tensor& totals, int64_t C, const char* op) {
  TORCH_CHECK(
      totals.scalar_type() == at::kDouble && totals.dim() == 1 && totals.is_contiguous() && totals.device().is_cpu(),
      op, ": the totals must be a contiguous 1-D float64 CPU tensor");
  TORCH_CHECK(
      totals.numel() == 2 * C + 1, op, ": the totals must hold 2C + 1 values for the batch moments' size C = ", C,
      ", got ", totals.numel());
  return totals.mutable_data_ptr<double>();
}

// Chan's merge, in place and in float64, of one batch's moments (count n_b,
// mean, variance: biased, or unbiased for `unbiased`, as torch's buffers hold
// it) into the totals (count n_a, mean, M2) of stats.merge:
//   d = mean_b - mean_a,  mean <- mean_a + d n_b / n,  M2 <- M2_a + M2_b + d^2 n_a n_b / n.
// The batch moments are read in place (no converted copies: a few small
// tensors per call cost as much as the merge).
void merge_batch(
    double* totals,
    int64_t C,
    const Tensor& batch_mean,
    const Tensor& batch_var,
    int64_t batch_count,
    bool unbiased) {
  if (batch_count == 0) return;
  const bool direct = batch_var.scalar_type() == batch_mean.scalar_type() && batch_mean.is_contiguous() &&
      batch_var.is_contiguous() && batch_mean.is_floating_point();
  const Tensor bm = direct ? batch_mean : batch_mean.to(at::kDouble).contiguous();
  const Tensor bv = direct ? batch_var : batch_var.to(at::kDouble).contiguous();
  double* am = totals;
  double* a2 = totals + C;
  const double na = totals[2 * C], nb = static_cast<double>(batch_count), n = na + nb;
  const double to_m2 = unbiased ? nb - 1.0 : nb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bm.scalar_type(), "bnkit::merge_moments_", [&] {
    const scalar_t* pm = bm.const_data_ptr<scalar_t>();
    const scalar_t* pv = bv.const_data_ptr<scalar_t>();
    for (int64_t ch = 0; ch < C; ++ch) {
      const double mean_b = static_cast<double>(pm[ch]), m2_b = static_cast<double>(pv[ch]) * to_m2;
      if (na == 0) {
        am[ch] = mean_b;
        a2[ch] = m2_b;
      } else {
        const double d = mean_b - am[ch];
        am[ch] += d * (nb / n);
        a2[ch] += m2_b + d * d * (na * nb / n);
      }
    }
  });
  totals[2 * C] = n;
}

// bnkit::merge_moments_: merge_batch of moments computed elsewhere (the
// general path's, torch layers' buffers).
void merge_moments(
    Tensor& totals,
    const Tensor& batch_mean,
    const Tensor& batch_var,
    int64_t batch_count,
    bool unbiased) {
  const int64_t C = batch_mean.numel();
  TORCH_CHECK(
      batch_var.numel() == C && batch_mean.device().is_cpu() && batch_var.device().is_cpu(),
      "bnkit::merge_moments_: the batch mean and variance must be CPU tensors of one size, got ", C, " and ",
      batch_var.numel());
  TORCH_CHECK(batch_count >= 0, "bnkit::merge_moments_: counts must be non-negative");
  merge_batch(totals_data(totals, C, "bnkit::merge_moments_"), C, batch_mean, batch_var, batch_count, unbiased);
}

// ---- the training variants (boxed kernels) ----
// The arguments they share, first in their schemas: batch_norm_layer's
// without `training` (always true).  The running buffers and momentum only
// take part in the accept predicate, so that a variant declines exactly what
// batch_norm_layer declines.
constexpr const char* kVariantArgs =
    "Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
    "Tensor? num_batches_tracked, float momentum, float eps, int axis, int num_features, int ranks, "
    "bool check_finite";

constexpr size_t count_args(const char* schema) {
  size_t n = 1;
  for (; *schema != '\0'; ++schema) n += *schema == ',';
  return n;
}
constexpr size_t kVariantArgCount = count_args(kVariantArgs);
static_assert(kVariantArgCount == 12, "training_call reads 12 shared arguments");

LayerCall training_call(const c10::IValue* a) {
  return {a[0].toTensor(),          a[1].toOptional<Tensor>(), a[2].toOptional<Tensor>(),
          a[3].toOptional<Tensor>(), a[4].toOptional<Tensor>(), a[5].toOptional<Tensor>(),
          /*training=*/true,         a[6].toDouble(),           a[7].toDouble(),
          a[8].toInt(),              a[9].toInt(),              a[10].toInt(),
          a[11].toBool()};
}

// bnkit::batch_norm_layer_moments(<shared>) -> (output, mean, var, status):
// the batch moments unapplied, for engine.running_update to hand to its hook.
std::tuple<Tensor, Tensor, Tensor, int64_t> moments_variant(const LayerCall& call, const c10::IValue*) {
  BatchMoments batch{call.input, call.input}; // placeholders where the call is not handled
  auto [y, status] = layer_call(call, &batch);
  return {y, batch.mean, batch.var, status};
}

// bnkit::batch_norm_layer_accumulate_(<shared>, totals!) -> (output, status):
// the batch moments merged into `totals` (merge_batch) when the call is
// handled and they pass the non-finite check; nothing else changes.
std::tuple<Tensor, int64_t> accumulate_variant(const LayerCall& call, const c10::IValue* extra) {
  BatchMoments batch;
  auto [y, status] = layer_call(call, &batch);
  if (status != kNotHandled) {
    const int64_t C = batch.mean.numel();
    double* totals = totals_data(extra[0].toTensor(), C, "bnkit::batch_norm_layer_accumulate_");
    if (status == kHandled) merge_batch(totals, C, batch.mean, batch.var, batch.count, false);
  }
  return {y, status};
}

// The boxed kernel of a variant: one LayerCall from the shared arguments, the
// rest (`extra`) left on the stack for the variant, then its outputs pushed.
template <auto Variant>
void boxed_variant(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  const c10::IValue* args = stack->data() + (stack->size() - n);
  auto outputs = Variant(training_call(args), args + kVariantArgCount);
  torch::jit::drop(*stack, n);
  std::apply([&](auto&... out) { torch::jit::push(*stack, std::move(out)...); }, outputs);
}

// Defines a variant, `name(<shared>extra) -> returns`, with its boxed kernel
// (CompositeImplicitAutograd, as batch_norm_layer: eager mode only).
template <auto Variant>
void def_variant(torch::Library& m, const char* name, const char* extra, const char* returns) {
  const std::string schema = std::string(name) + "(" + kVariantArgs + extra + ") -> " + returns;
  m.def(schema.c_str(), torch::CppFunction::makeFromBoxedFunction<&boxed_variant<Variant>>());
}

} // namespace

std::tuple<Tensor, int64_t> layer_forward(const LayerCall& call) {
  return layer_call(call, nullptr);
}

std::tuple<Tensor, int64_t> batch_norm_act_layer(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked, bool training, double momentum, double eps, int64_t axis,
    int64_t num_features, int64_t ranks, bool check_finite, int64_t act_kind, double act_min, double act_max) {
  TORCH_CHECK(
      act_kind >= 0 && act_kind < kActKinds, "bnkit::batch_norm_act_layer: act_kind must be 0 (clamp), 1 (Hardswish) "
      "or 2 (SiLU), got ", act_kind);
  // A bound that is not a number bounds nothing (the kernels' comparisons are then false); +-inf would too,
  // but +inf must pass +inf through as ReLU does: NaN for both.
  Activation act{
      static_cast<int>(act_kind), std::isfinite(act_min) ? act_min : std::nan(""),
      std::isfinite(act_max) ? act_max : std::nan("")};
  // The constants of SiLU and Hardswish as run-time values (rowkernels_act.h: act_exp says why).
  if (act.kind == kActSilu) act = {kActSilu, -87.3, 88.3}; // the range of its e^x
  if (act.kind == kActHardswish) act = {kActHardswish, -3.0, 3.0}; // where it bends
  LayerCall call{input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, axis,
                 num_features, ranks, check_finite, &act};
  return layer_call(call, nullptr);
}

} // namespace bnkit

TORCH_LIBRARY_FRAGMENT(bnkit, m) {
  bnkit::def_variant<bnkit::moments_variant>(m, "batch_norm_layer_moments", "", "(Tensor, Tensor, Tensor, int)");
  bnkit::def_variant<bnkit::accumulate_variant>(
      m, "batch_norm_layer_accumulate_", ", Tensor(a!) totals", "(Tensor, int)");
  m.def(
      "merge_moments_(Tensor(a!) totals, Tensor batch_mean, Tensor batch_var, int batch_count, bool unbiased) -> ()",
      TORCH_FN(bnkit::merge_moments));
}
