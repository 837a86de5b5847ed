// bnkit: the machine-dependent configuration of the kernels -- which row
// kernels (instruction set) run, and the tuning knobs with their defaults.
//
// Each knob is declared once, in kKnobs: its name for bnkit::_tune, its
// environment variable, its default and its lower bound.  The kernels read
// the values from tuning() on every call (rowkernels.h documents each knob).
#include "bnkit_kernels.h"
#include "rowkernels.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#include <unistd.h>

namespace bnkit {

// ------------------------------------------------------- ISA selection --

namespace {
RowKernelSet select_row_kernels() {
  RowKernelSet set{};
  fill_row_kernels_default(set);
  const char* cap = std::getenv("BNKIT_CPU_ISA");
  const std::string want = cap ? cap : "";
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (want == "default") return set;
  if (avx512 && want != "avx2") {
    RowKernelSet s512 = set;
    if (fill_row_kernels_avx512(s512)) {
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
      if (want != "avx512" && __builtin_cpu_supports("avx512bf16")) fill_row_kernels_avx512bf16(s512);
#endif
      return s512;
    }
  }
  if (avx2) {
    RowKernelSet s2 = set;
    if (fill_row_kernels_avx2(s2)) return s2;
  }
#endif
  return set;
}
} // namespace

const RowKernelSet& row_kernels() {
  static const RowKernelSet set = select_row_kernels();
  return set;
}

const char* cpu_isa() {
  return row_kernels().isa;
}

// --------------------------------------------------------- tuning knobs --

namespace {
// Defaults that depend on the cache hierarchy, from two machines measured in
// same-process shuffled A/B runs (benchmarks/kernels.py cases):
//   2-core Xeon VM (Intel, 2 MB L2 per core, large shared L3): the blocked NCHW
//     backward (use_channel_blocks, g and x of a block in half the L2) made the
//     24.5 MB backward 1.15-1.2x faster and no case slower; streaming the 6 MB
//     eval outputs made them 1.2-1.8x faster (through the cache they were
//     0.83-1.04x ATen's), while 1 MB outputs were 1.3-2x slower streamed.
//   2-core EPYC VM (AMD Zen 4, 1 MB L2, 32 MB L3): blocking was slower than two
//     passes in memory order, and 6 MB eval outputs were up to 2x faster
//     written through the cache (streamed from 16 MB, half the L3).
//   the same EPYC class of VM without AVX-512 (AVX2 kernels, 512 KB L2): 6 MB
//     channels-last eval outputs were 1.4-1.6x faster streamed (two A/B runs,
//     2 threads: 1.55-1.66x ATen against 1.08-1.40x), as were the training
//     outputs; the NCHW eval is never streamed there (no AVX2 span kernels).
//   that VM class with 1 MB L2 (AVX2): inside networks, where the next layer
//     reads an eval output at once, streaming from 16 MB rather than 3 MB made
//     eval steps 1.5 points faster on average (8 of 11 model rows ahead, three
//     same-process A/B runs); the training outputs still gain from 3 MB.
// So the L2 size picks the class: 2 MB or more -> block the backward in half
// the L2 and stream inference outputs from twice the L2; otherwise neither,
// with inference outputs streamed from 16 MB (half the L3 of these VMs), or
// from 3 MB on AVX2 with an L2 under 1 MB.
// The blocked training forward was slower on both (its output goes through
// the cache; the two-pass forward streams it), so block_bytes is 0.
int64_t l2_bytes() {
#ifdef _SC_LEVEL2_CACHE_SIZE
  return std::max<int64_t>(0, static_cast<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE)));
#else
  return 0;
#endif
}
bool large_l2() {
  return l2_bytes() >= (int64_t(2) << 20);
}

constexpr int64_t kNoMin = std::numeric_limits<int64_t>::min();

struct Knob {
  const char* name; // for bnkit::_tune
  const char* env; // read once, at the first kernel call
  int64_t (*fallback)(); // the default without the environment variable
  int64_t min; // lower bound of a value set (environment or _tune)
  std::atomic<int64_t> Tuning::*field;
};

const Knob kKnobs[] = {
    {"sub_floats", "BNKIT_SUB_FLOATS", [] { return int64_t(8192); }, 16, &Tuning::sub_floats},
    {"sub_floats_grad", "BNKIT_SUB_FLOATS_GRAD", [] { return int64_t(65536); }, 16, &Tuning::sub_floats_grad},
    {"nt_bytes", "BNKIT_NT_BYTES", [] { return int64_t(3) << 20; }, kNoMin, &Tuning::nt_bytes},
    {"nt_grad_bytes", "BNKIT_NT_GRAD_BYTES", [] { return int64_t(3) << 20; }, kNoMin, &Tuning::nt_grad_bytes},
    {"nt_eval_bytes",
     "BNKIT_NT_EVAL_BYTES",
     [] {
       if (large_l2()) return 2 * l2_bytes();
       const bool small_avx2 = std::string(cpu_isa()) == "avx2" && l2_bytes() < (int64_t(1) << 20);
       return small_avx2 ? int64_t(3) << 20 : int64_t(16) << 20;
     },
     kNoMin,
     &Tuning::nt_eval_bytes},
    {"block_bytes", "BNKIT_BLOCK_BYTES", [] { return int64_t(0); }, 0, &Tuning::block_bytes},
    {"block_bytes_grad",
     "BNKIT_BLOCK_BYTES_GRAD",
     [] { return large_l2() ? l2_bytes() / 2 : int64_t(0); },
     0,
     &Tuning::block_bytes_grad},
    {"reuse_grad", "BNKIT_REUSE_GRAD", [] { return int64_t(1); }, 0, &Tuning::reuse_grad},
};

int64_t initial_value(const Knob& k) {
  const char* e = std::getenv(k.env);
  const int64_t v = e != nullptr && e[0] != '\0' ? std::atoll(e) : k.fallback();
  return std::max(k.min, v);
}
} // namespace

Tuning& tuning() {
  static Tuning* t = [] {
    auto* p = new Tuning();
    for (const Knob& k : kKnobs) (p->*k.field).store(initial_value(k));
    return p;
  }();
  return *t;
}

int64_t set_tuning(const std::string& name, int64_t value) {
  for (const Knob& k : kKnobs) {
    if (name != k.name) continue;
    std::atomic<int64_t>& knob = tuning().*k.field;
    return value < 0 ? knob.load() : knob.exchange(std::max(k.min, value));
  }
  std::string names;
  for (const Knob& k : kKnobs) names += (names.empty() ? "" : ", ") + std::string(k.name);
  TORCH_CHECK(false, "bnkit::_tune: unknown knob '", name, "' (", names, ")");
}

} // namespace bnkit
