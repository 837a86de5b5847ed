// bnkit: bnkit's kernels behind PyTorch's own batch-norm operators (bnkit.accelerate).
//
// In eager mode on CPU, F.batch_norm (and so every torch.nn.BatchNorm*d, its
// subclasses and torchvision/timm models) reaches
//   aten::batch_norm -> aten::_batch_norm_impl_index -> aten::native_batch_norm
// and its autograd node calls aten::native_batch_norm_backward.  While on,
// this file registers CPU-key kernels for exactly these two operators (as
// Intel's extension for PyTorch overrides ATen CPU kernels): the Autograd key
// (derivative formulas, double backward), the Meta/Fake kernels and the
// decompositions used by torch.compile / torch.export, and other devices are
// untouched.  Turning it off destroys the torch::Library, which removes the
// registrations and restores ATen's kernels.
//
// Each kernel serves the cases bnkit's fused kernels cover with ATen's exact
// return contract and calls ATen's own kernel (at::native::batch_norm_cpu,
// at::native::batch_norm_backward_cpu) for everything else:
//   - input float32/float64 with parameters/statistics of the same dtype, or
//     bfloat16/float16 with float32 ones (ATen's "mixed type"; at least one of
//     weight, bias, running stats present);
//   - 2-D to 63-D, non-empty, contiguous, or channels-last (4-D) /
//     channels-last-3d (5-D); outputs in that same memory format;
//   - per-channel tensors 1-D, contiguous, C values; eps > 0 and finite;
//     more than one value per channel in training; running stats in eval;
//   - forward returns (out, save_mean, save_invstd) in the statistics dtype
//     (float32 for mixed types), empty (0,) tensors in eval; the running
//     statistics are updated in place with torch's rule (unbiased variance);
//   - backward in training mode (train=True, save_mean/save_invstd given)
//     and in eval mode (train=False, the running statistics given: the
//     one-pass batch_norm_infer_backward_into); a weight gradient without
//     weight goes to ATen.
// The output_mask of the backward is honoured (undefined where false).
//
// Ops: bnkit::_accelerate(bool on) -> bool (previous state),
// bnkit::_accelerated() -> bool (current state), and
// bnkit::_accelerate_counts(bool reset) -> int[] (calls served by bnkit /
// sent to ATen: [forward, forward fallback, backward, backward fallback]).
#include "bnkit_kernels.h"
#include "layout.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/native_batch_norm_backward_native.h>
#include <ATen/ops/native_batch_norm_native.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace bnkit {
namespace {

using at::Tensor;

enum AtenLayout { kContig, kLast, kNone }; // the output formats of ATen's BN that the kernels serve

// The input's memory format when the kernels can serve it in place (the
// output keeps it, as ATen's empty_like(input, suggested format) does).
AtenLayout layout_of(const Tensor& x) {
  if (x.is_contiguous()) return kContig;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return kLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return kLast;
  return kNone;
}

// The canonical (outer, C, inner) view of t (x's shape) in layout l; copies
// only when t's strides differ (e.g. a gradient in another memory format).
Tensor view3(const Tensor& t, AtenLayout l) {
  return bnkit::view3(t, 1, l == kLast ? bnkit::kFeatureLast : bnkit::kContiguous);
}

// A fresh tensor of x's shape and dtype in layout l.
Tensor empty_in(const Tensor& x, AtenLayout l) {
  const auto fmt = l == kContig ? at::MemoryFormat::Contiguous
      : x.dim() == 4           ? at::MemoryFormat::ChannelsLast
                               : at::MemoryFormat::ChannelsLast3d;
  return at::empty(x.sizes(), x.options().memory_format(fmt));
}

// The input gradient's memory: in layout l, but for an input both contiguous
// and channels-last (C = 1 or all spatial sizes 1; l is kContig) in the format
// ATen picks from its and grad_out's strides (the kernels' view is the same).
Tensor empty_grad_in(const Tensor& x, const Tensor& grad_out, AtenLayout l) {
  if (l == kContig && bnkit::ambiguous_channels_last(x, 1))
    return at::empty(x.sizes(), x.options().memory_format(bnkit::ambiguous_grad_format(x, grad_out)));
  return empty_in(x, l);
}

bool is_half(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

// Per-channel tensors the kernels read as they are (absent ones are fine).
template <typename... Opts>
bool per_channel_ok(at::ScalarType acc, int64_t C, const Opts&... ts) {
  auto ok = [&](const std::optional<Tensor>& t) {
    return !present(t) ||
        (t->scalar_type() == acc && t->dim() == 1 && t->size(0) == C && t->is_contiguous() &&
         t->layout() == at::kStrided);
  };
  return (ok(ts) && ...);
}

// The input checks shared by the forward and the backward; kNone: not served.
AtenLayout served_input(const Tensor& x) {
  if (x.layout() != at::kStrided || !x.device().is_cpu()) return kNone;
  const auto dt = x.scalar_type();
  if (dt != at::kFloat && dt != at::kDouble && !is_half(dt)) return kNone;
  if (x.dim() < 2 || x.dim() >= 64 || x.numel() == 0 || x.size(1) == 0) return kNone;
  return layout_of(x);
}

std::atomic<int64_t> g_counts[4];

using OptT = std::optional<Tensor>;

// aten::native_batch_norm's CPU kernel while on.
std::tuple<Tensor, Tensor, Tensor> native_batch_norm_kernel(
    const Tensor& input, const OptT& weight, const OptT& bias, const OptT& running_mean, const OptT& running_var,
    bool training, double momentum, double eps) {
  const auto aten = [&] {
    g_counts[1].fetch_add(1, std::memory_order_relaxed);
    return at::native::batch_norm_cpu(input, weight, bias, running_mean, running_var, training, momentum, eps);
  };
  const AtenLayout layout = served_input(input);
  if (layout == kNone) return aten();
  const auto dt = input.scalar_type();
  const auto acc = acc_dtype(dt);
  const int64_t C = input.size(1);
  const bool track = present(running_mean);
  if (track != present(running_var) || (!training && !track)) return aten();
  // Half inputs are served with float32 parameters/statistics only (ATen's
  // mixed type: statistics in float32); pure half models go to ATen.
  if (is_half(dt) && !present(weight) && !present(bias) && !track) return aten();
  if (!per_channel_ok(acc, C, weight, bias, running_mean, running_var)) return aten();
  if (!(eps > 0) || !std::isfinite(eps) || !std::isfinite(momentum)) return aten();
  const int64_t count = input.numel() / C;
  if (training && count <= 1) return aten();

  g_counts[0].fetch_add(1, std::memory_order_relaxed);
  RECORD_FUNCTION("bnkit::accelerated_batch_norm", std::vector<c10::IValue>());
  Tensor out = empty_in(input, layout);
  const Tensor x3 = view3(input, layout);
  const Tensor y3 = view3(out, layout); // a view: out is in that layout
  if (!training) {
    batch_norm_infer_into(x3, y3, *running_mean, *running_var, weight, bias, eps);
    const auto opts = input.options().dtype(acc);
    return {out, at::empty({0}, opts), at::empty({0}, opts)};
  }
  auto [mean, var] = batch_norm_train_into(x3, y3, weight, bias, eps);
  if (track) {
    Tensor rm = *running_mean, rv = *running_var;
    update_running_stats_cpu(rm, rv, mean, var, momentum, count, /*check_finite=*/false);
  }
  // ATen saves 1 / sqrt(var + eps) (its backward's input), not the variance.
  Tensor invstd = at::empty({C}, var.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "bnkit::accelerated_batch_norm", [&] {
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    scalar_t* s = invstd.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) s[c] = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(v[c]) + eps));
  });
  return {out, mean, invstd};
}

// aten::native_batch_norm_backward's CPU kernel while on.
std::tuple<Tensor, Tensor, Tensor> native_batch_norm_backward_kernel(
    const Tensor& grad_out, const Tensor& input, const OptT& weight, const OptT& running_mean,
    const OptT& running_var, const OptT& save_mean, const OptT& save_invstd, bool train, double eps,
    std::array<bool, 3> mask) {
  const auto aten = [&] {
    g_counts[3].fetch_add(1, std::memory_order_relaxed);
    return at::native::batch_norm_backward_cpu(
        grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps, mask);
  };
  const AtenLayout layout = served_input(input);
  if (layout == kNone) return aten();
  if (train ? !present(save_mean) || !present(save_invstd) : !present(running_mean) || !present(running_var))
    return aten();
  const auto dt = input.scalar_type();
  const auto acc = acc_dtype(dt);
  const int64_t C = input.size(1);
  if (!grad_out.defined() || grad_out.layout() != at::kStrided || !grad_out.device().is_cpu() ||
      grad_out.scalar_type() != dt || grad_out.sizes() != input.sizes())
    return aten();
  if (train ? !per_channel_ok(acc, C, weight, save_mean, save_invstd)
            : !per_channel_ok(acc, C, weight, running_mean, running_var))
    return aten();
  if (mask[1] && !present(weight)) return aten();
  if (!(eps > 0) || !std::isfinite(eps)) return aten();
  if (!mask[0] && !mask[1] && !mask[2]) return aten();

  g_counts[2].fetch_add(1, std::memory_order_relaxed);
  RECORD_FUNCTION("bnkit::accelerated_batch_norm_backward", std::vector<c10::IValue>());
  if (!train) { // eval mode in a graph: the running statistics normalized
    Tensor dx = mask[0] ? empty_grad_in(input, grad_out, layout) : Tensor();
    auto [dw, db] = batch_norm_infer_backward_into(
        view3(grad_out, layout), view3(input, layout), *running_mean, *running_var, weight, std::nullopt, eps,
        nullptr, mask[0] ? view3(dx, layout) : Tensor());
    return {dx, mask[1] ? dw : Tensor(), mask[2] ? db : Tensor()};
  }
  // The kernels take the biased variance; var + eps = 1 / invstd^2 (in double).
  Tensor var = at::empty({C}, save_invstd->options());
  AT_DISPATCH_FLOATING_TYPES(acc, "bnkit::accelerated_batch_norm_backward", [&] {
    const scalar_t* s = save_invstd->const_data_ptr<scalar_t>();
    scalar_t* v = var.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double is = static_cast<double>(s[c]);
      v[c] = static_cast<scalar_t>(1.0 / (is * is) - eps);
    }
  });
  Tensor dx = empty_grad_in(input, grad_out, layout);
  auto [dw, db] = batch_norm_backward_into(
      view3(grad_out, layout), view3(input, layout), *save_mean, var, weight, eps, view3(dx, layout));
  return {mask[0] ? dx : Tensor(), mask[1] ? dw : Tensor(), mask[2] ? db : Tensor()};
}

// torch warns (once per process, on stderr) when a kernel replaces ATen's;
// that replacement is the point here, so the registration passes on every
// warning except that one to the handler in place.
class DropOverrideWarning : public c10::WarningHandler {
 public:
  explicit DropOverrideWarning(c10::WarningHandler* next) : next_(next) {}
  void process(const c10::Warning& w) override {
    if (w.msg().find("Overriding a previously registered kernel") == std::string::npos) next_->process(w);
  }

 private:
  c10::WarningHandler* next_;
};

std::mutex g_mutex;
torch::Library* g_library = nullptr; // never destroyed at exit (the dispatcher may be gone by then)

bool set_accelerate(bool on) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const bool was = g_library != nullptr;
  if (on && !was) {
    DropOverrideWarning quiet(c10::WarningUtils::get_warning_handler());
    c10::WarningUtils::WarningHandlerGuard guard(&quiet);
    auto lib = std::make_unique<torch::Library>(
        torch::Library::IMPL, "aten", c10::DispatchKey::CPU, __FILE__, static_cast<uint32_t>(__LINE__));
    lib->impl("native_batch_norm", TORCH_FN(native_batch_norm_kernel));
    lib->impl("native_batch_norm_backward", TORCH_FN(native_batch_norm_backward_kernel));
    g_library = lib.release();
  } else if (!on && was) {
    delete g_library; // deregisters: ATen's kernels serve the operators again
    g_library = nullptr;
  }
  return was;
}

std::vector<int64_t> accelerate_counts(bool reset) {
  std::vector<int64_t> out(4);
  for (int i = 0; i < 4; ++i) out[i] = reset ? g_counts[i].exchange(0) : g_counts[i].load();
  return out;
}

} // namespace
} // namespace bnkit

TORCH_LIBRARY_FRAGMENT(bnkit, m) {
  m.def("_accelerate(bool on) -> bool", [](bool on) { return bnkit::set_accelerate(on); });
  m.def("_accelerated() -> bool", [] {
    std::lock_guard<std::mutex> lock(bnkit::g_mutex);
    return bnkit::g_library != nullptr;
  });
  m.def("_accelerate_counts(bool reset=False) -> int[]", [](bool reset) { return bnkit::accelerate_counts(reset); });
}
