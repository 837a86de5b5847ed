// bnkit: one line per operator for the registrations of ops.cpp, masked.cpp
// and domain.cpp: the schema, and the one kernel template that serves both
// the CPU key (fn<false>: computes) and the Meta key (fn<true>: allocates the
// outputs only, shapes and dtypes, so that torch.compile / torch.export trace
// the op as one opaque node).
#pragma once

#include <torch/library.h>

// Defines bnkit::`name` with the schema `name args` (two string literals) in
// the library `m` (TORCH_LIBRARY / TORCH_LIBRARY_FRAGMENT) and registers its
// CPU and Meta kernels fn<false> and fn<true>.
#define BNKIT_DEF_OP(m, name, args, fn)                                            \
  do {                                                                             \
    (m).def(name args, torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(fn<false>))); \
    (m).impl(name, torch::dispatch(c10::DispatchKey::Meta, TORCH_FN(fn<true>)));   \
  } while (0)

// The same for an op with a CPU kernel only (`fn`, a plain function).
#define BNKIT_DEF_CPU_OP(m, name, args, fn) (m).def(name args, torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(fn)))
