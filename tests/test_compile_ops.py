"""The size of bnkit's compiled graphs: the ATen ops AOT autograd hands a backend, against torch's BN.

Oracle: torch's ``nn.BatchNorm2d`` compiled the same way (its training forward
is one ``_native_batch_norm_legit_functional`` node; bnkit's is ``var_mean`` and
elementwise ops, the form inductor's own BN decomposition produces). The bounds
are the counts measured with torch 2.13 (``docs/deploying.md``); the non-finite
policy ``"skip"`` (bnkit's default) must cost no more nodes than ``"propagate"``:
one finite flag for the batch, ``max(var) < inf``, and one ``where`` per buffer.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified
from torch import nn

import bnkit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# Forward nodes of a BatchNorm2d training step (torch 2.13); the backward is 4 nodes for torch, 31 for bnkit.
TORCH_TRAIN_FW = 7
BNKIT_TRAIN_FW = 26  # (was 30 with "skip", by isfinite's 4-node decomposition and a cast of the flag)
BNKIT_TRAIN_FW_CUMULATIVE = 30  # momentum=None: 1 / num_batches_tracked on the tensor (was 35)


def aot_graph_ops(layer: nn.Module, x: torch.Tensor) -> dict[str, Counter]:
    """The ``call_function`` targets of the forward and backward graphs AOT autograd produces for ``layer(x)``."""
    graphs: dict[str, Counter] = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm.forward)
        return compiler

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep("fw"), bw_compiler=keep("bw"))

    torch._dynamo.reset()
    y = torch.compile(layer, backend=backend, fullgraph=True)(x)
    if y.requires_grad:
        y.sum().backward()
    return graphs


def _x():
    return torch.randn(4, 3, 5, 5, requires_grad=True)


def test_training_graph_size_against_torch_bn():
    torch_ops = aot_graph_ops(nn.BatchNorm2d(3).train(), _x())
    skip = aot_graph_ops(bnkit.BatchNorm2d(3).train(), _x())
    propagate = aot_graph_ops(bnkit.BatchNorm2d(3, nonfinite="propagate").train(), _x())
    cumulative = aot_graph_ops(bnkit.BatchNorm2d(3, momentum=None).train(), _x())
    assert sum(torch_ops["fw"].values()) == TORCH_TRAIN_FW, torch_ops["fw"]
    assert sum(skip["fw"].values()) <= BNKIT_TRAIN_FW, skip["fw"]
    assert sum(skip["fw"].values()) <= sum(propagate["fw"].values()), (skip["fw"], propagate["fw"])
    assert sum(cumulative["fw"].values()) <= BNKIT_TRAIN_FW_CUMULATIVE, cumulative["fw"]
    # The policy: one flag (no isfinite decomposition, no cast of it), one where per buffer.
    fw = skip["fw"]
    assert fw["aten.max.default"] == 1 and fw["aten.where.self"] == 2, fw
    assert not {"aten.abs.default", "aten.ne.Scalar", "aten._to_copy.default"} & set(fw), fw
    assert skip["bw"] == propagate["bw"]  # (the policy is not differentiated)


def test_eval_graph_is_torch_bn_graph():
    torch_ops = aot_graph_ops(nn.BatchNorm2d(3).eval(), _x())
    ours = aot_graph_ops(bnkit.BatchNorm2d(3).eval(), _x())
    assert ours == torch_ops
