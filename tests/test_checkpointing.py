"""Activation checkpointing: one running update per training forward, the same step as without it.

Oracle: the same model and step without checkpointing, compared bitwise in
float64 (outputs, input and parameter gradients, every buffer), for
``checkpoint(use_reentrant=True/False)`` and ``checkpoint_sequential``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import bnkit

D = torch.float64


def _layers():
    return {
        "BatchNorm1d": lambda: bnkit.BatchNorm1d(6, dtype=D),
        "BatchNorm1d-cumulative": lambda: bnkit.BatchNorm1d(6, momentum=None, dtype=D),
        "BatchRenorm1d": lambda: bnkit.BatchRenorm1d(6, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=3,
                                                     d_max_steps=3, dtype=D),
        "GhostBatchNorm1d": lambda: bnkit.GhostBatchNorm1d(6, virtual_batch_size=4, dtype=D),
        "SyncBatchNorm": lambda: bnkit.SyncBatchNorm(6, dtype=D),
        "keras": lambda: bnkit.BatchNorm1d(6, convention="keras", dtype=D),
        "BatchRenorm1d-keras": lambda: bnkit.BatchRenorm1d(6, convention="keras", r_max=1.5, d_max=0.5, warmup_steps=0,
                                                           r_max_steps=3, d_max_steps=3, dtype=D),
    }


def make_model(name):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6, dtype=D), _layers()[name](), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(6, 6, dtype=D), _layers()[name](), nn.Tanh(), nn.Linear(6, 2, dtype=D),
    )


def run_step(model, x, mode):
    """One forward and backward of ``model`` on ``x`` (``mode``: how the middle of the model is checkpointed)."""
    head, body, tail = model[:1], model[1:6], model[6:]
    torch.manual_seed(1)  # dropout: checkpoint replays this RNG state in the recompute
    h = head(x)
    if mode == "none":
        h = body(h)
    elif mode == "sequential":
        h = checkpoint_sequential(body, 2, h, use_reentrant=False)
    else:
        h = checkpoint(body, h, use_reentrant=(mode == "reentrant"))
    y = tail(h)
    y.square().sum().backward()
    return y.detach()


def assert_same_step(a, b, xa, xb, ya, yb):
    assert torch.equal(ya, yb)
    assert torch.equal(xa.grad, xb.grad)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa.grad, pb.grad), name
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant", "sequential"])
@pytest.mark.parametrize("layer", sorted(_layers()))
def test_checkpointed_step_equals_plain_step(layer, mode):
    plain, ckpt = make_model(layer), make_model(layer)
    for step in range(3):  # num_batches_tracked moves Batch Renorm's limits and the cumulative average
        x = torch.randn(12, 5, dtype=D, generator=torch.Generator().manual_seed(step))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = run_step(plain, xa, "none")
        yb = run_step(ckpt, xb, mode)
        assert_same_step(plain, ckpt, xa, xb, ya, yb)
    assert int(ckpt[1].num_batches_tracked) == 3


def test_keras_renorm_updates_once():
    # Keras-convention Batch Renorm: the update happens once.
    torch.manual_seed(0)
    bn = bnkit.BatchRenorm1d(4, convention="keras", dtype=D)
    x = torch.randn(10, 4, dtype=D, requires_grad=True)
    checkpoint(bn, x, use_reentrant=False).sum().backward()
    ref = bnkit.BatchRenorm1d(4, convention="keras", dtype=D)
    ref(x.detach())
    for k, v in ref.state_dict().items():
        assert torch.equal(bn.state_dict()[k], v), k


def test_renorm_memory_is_consumed():
    model = make_model("BatchRenorm1d")
    x = torch.randn(12, 5, dtype=D, requires_grad=True)
    run_step(model, x, "non-reentrant")
    # kept for a second backward through a retained graph, spent at the next forward
    assert all(entry[4] for entry in model[1].__dict__.get("_recompute_memory"))
    with torch.no_grad():  # a training forward without gradients (as reentrant checkpointing runs it)
        model(torch.randn(12, 5, dtype=D))
    assert len(model[1].__dict__["_recompute_memory"]) == 1  # remembered, bounded ...
    plain, ckpt = copy.deepcopy(model), model  # ... and harmless: a later checkpoint of that batch takes its own
    x = torch.randn(12, 5, dtype=D)
    for m in (plain, ckpt):
        torch.manual_seed(2)  # the same dropout masks
        with torch.no_grad():
            m(x)
    for _ in range(2):
        for m in (plain, ckpt):
            m.zero_grad(set_to_none=True)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        assert_same_step(plain, ckpt, xa, xb, run_step(plain, xa, "none"), run_step(ckpt, xb, "non-reentrant"))


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_renorm_remembers_only_forwards_checkpointing_may_run_again(convention):
    bn = bnkit.BatchRenorm1d(4, convention=convention, dtype=D)
    x = torch.randn(8, 4, dtype=D, requires_grad=True)
    for _ in range(3):
        bn(x).sum().backward()  # plain training steps: nothing to recompute, nothing kept
    assert not bn.__dict__.get("_recompute_memory")
    for _ in range(3):  # remembered, served by the recompute (kept for a retained graph), spent at the next one
        checkpoint(bn, x, use_reentrant=False).sum().backward()
        memory = bn.__dict__.get("_recompute_memory")
        assert len(memory) == 1 and memory[0][4]


def test_renorm_checkpointing_one_batch_twice_in_a_step():
    """The backward recomputes the later call first: each recompute takes its own call's (r, d)."""
    grads = []
    for mode in ("none", "non-reentrant", "reentrant"):
        torch.manual_seed(0)
        bn = bnkit.BatchRenorm1d(3, momentum=0.5, schedule="fixed", dtype=D)
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
        x = torch.randn(6, 3, dtype=D) * 3 + 2
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        f = bn if mode == "none" else functools.partial(checkpoint, bn, use_reentrant=(mode == "reentrant"))
        (f(a) + 2 * f(b)).mul(torch.arange(18, dtype=D).view(6, 3)).sum().backward()
        grads.append((a.grad, b.grad, bn.weight.grad))
    for other in grads[1:]:  # (the weight gradient's two terms may be summed in another order)
        for g, ref in zip(other, grads[0]):
            torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant", "sequential"])
def test_torch_layers_with_checkpoint_safe(mode):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 6, dtype=D), nn.BatchNorm1d(6, dtype=D), nn.ReLU(), nn.Linear(6, 6, dtype=D),
                             nn.BatchNorm1d(6, momentum=None, dtype=D), nn.Tanh(), nn.Linear(6, 2, dtype=D))

    plain, ckpt, unsafe = model(), model(), model()
    handle = bnkit.checkpoint_safe(ckpt)
    for step in range(2):
        x = torch.randn(12, 5, dtype=D, generator=torch.Generator().manual_seed(step))
        xa, xb, xc = (x.clone().requires_grad_() for _ in range(3))
        ya = run_step(plain, xa, "none")
        yb = run_step(ckpt, xb, mode)
        run_step(unsafe, xc, mode)
        assert_same_step(plain, ckpt, xa, xb, ya, yb)
    # Without the helper torch's layers update twice per step (what the helper is for).
    assert int(unsafe[1].num_batches_tracked) == 4
    handle.remove()
    assert not ckpt[1]._forward_hooks and not ckpt[1]._forward_pre_hooks


def test_checkpoint_safe_as_context_manager():
    bn = nn.BatchNorm1d(3, dtype=D)
    x = torch.randn(6, 3, dtype=D, requires_grad=True)
    with bnkit.checkpoint_safe(bn):
        checkpoint(bn, x, use_reentrant=True).sum().backward()
    assert int(bn.num_batches_tracked) == 1 and not bn._forward_hooks
    with pytest.raises(TypeError, match="nn.Module"):
        bnkit.checkpoint_safe("model")


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_fused_and_general_path_and_shared(use_reentrant, backend):
    # A bnkit layer (both backends) under checkpoint, per-site statistics of SharedBatchNorm too.
    torch.manual_seed(0)
    bn = bnkit.SharedBatchNorm(4, sites=2, dtype=D)
    ref = copy.deepcopy(bn)
    x = torch.randn(8, 4, 3, dtype=D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ref(xa, site=1)
    ya.sum().backward()
    yb = checkpoint(functools.partial(bn, site=1), xb, use_reentrant=use_reentrant)
    yb.sum().backward()
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    for k, v in ref.state_dict().items():
        assert torch.equal(bn.state_dict()[k], v), k


def test_eval_forward_in_backward_untouched():
    # in_recompute is only about training forwards: eval-mode layers are unaffected.
    bn = bnkit.BatchNorm1d(3, dtype=D).eval()
    x = torch.randn(6, 3, dtype=D, requires_grad=True)
    y = checkpoint(bn, x, use_reentrant=False)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 1 / (1 + 1e-5) ** 0.5))


def test_torch_layer_last_in_the_region():
    # Non-reentrant checkpointing stops its recompute inside the last layer that saved tensors.
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 6, dtype=D), nn.BatchNorm1d(6, dtype=D))
    ref = copy.deepcopy(body)
    bnkit.checkpoint_safe(body)
    x = torch.randn(10, 4, dtype=D, requires_grad=True)
    for _ in range(2):
        checkpoint(body, x, use_reentrant=False).sum().backward()
        ref(x).sum().backward()
    for k, v in ref.state_dict().items():
        assert torch.equal(body.state_dict()[k], v), k


@pytest.mark.parametrize("kind", ["bnkit", "torch"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_compiled_model_that_checkpoints_updates_once(kind, use_reentrant):
    """torch.compile of a model whose forward calls checkpoint: the step without checkpointing."""

    class Net(nn.Module):
        def __init__(self, ckpt):
            super().__init__()
            bn = bnkit.BatchNorm1d(6, dtype=D) if kind == "bnkit" else nn.BatchNorm1d(6, dtype=D)
            self.body, self.ckpt = nn.Sequential(nn.Linear(5, 6, dtype=D), bn, nn.ReLU()), ckpt

        def forward(self, x):
            return checkpoint(self.body, x, use_reentrant=use_reentrant) if self.ckpt else self.body(x)

    torch.manual_seed(0)
    net, plain = Net(True), Net(False)
    plain.load_state_dict(net.state_dict())
    bnkit.checkpoint_safe(net)
    compiled = torch.compile(net, backend="aot_eager")
    x = torch.randn(8, 5, dtype=D)
    for _ in range(2):
        compiled(x).square().sum().backward()
        plain(x).square().sum().backward()
    for (k, a), b in zip(net.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=k)
    for a, b in zip(net.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
