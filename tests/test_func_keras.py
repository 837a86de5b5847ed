"""convention="keras" in training mode under torch.func (grad, jvp, vmap), forward-mode AD and torch.compile.

Oracles: reverse-mode autograd on the same function (``torch.autograd.grad``,
the double-vjp ``torch.autograd.functional.jvp``), central finite differences
in float64, the layer's own eager update (one update per call, the Keras rule)
and a loop over single models for stacked per-model buffers.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

import bnkit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

D = torch.float64
CLASSES = [bnkit.BatchNorm2d, bnkit.BatchRenorm2d]


def _data(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=D, generator=g) * 2 + 1


def _layer(cls, momentum=0.1, nonfinite="skip"):
    """A trained-a-little Keras-convention layer: running statistics away from the batch's (renorm's r, d != 1, 0)."""
    torch.manual_seed(0)
    kw = {"r_max": 1.5, "d_max": 0.5, "schedule": "fixed"} if cls is bnkit.BatchRenorm2d else {}
    layer = cls(3, momentum=momentum, nonfinite=nonfinite, convention="keras", **kw).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    layer(_data(4, 3, 3, 3, seed=7) * 0.5)
    return layer


def _assert_same_state(a, b):
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, sb[k], msg=k)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_keras_grad_matches_autograd_and_updates_once(cls, momentum):
    layer = _layer(cls, momentum)
    eager = copy.deepcopy(layer)
    x, w = _data(4, 3, 3, 3), _data(4, 3, 3, 3, seed=1)
    params = {k: v.detach().clone() for k, v in layer.named_parameters()}

    def loss(p, x):
        return (functional_call(layer, p, (x,)) * w).sum()

    g_params, g_x = grad(loss, argnums=(0, 1))(params, x)
    xe = x.clone().requires_grad_()
    ref = torch.autograd.grad((eager(xe) * w).sum(), (*eager.parameters(), xe))
    for (k, _), r in zip(eager.named_parameters(), ref):
        torch.testing.assert_close(g_params[k], r, msg=k)
    torch.testing.assert_close(g_x, ref[-1])
    assert g_x.abs().max() > 0.1
    _assert_same_state(layer, eager)
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("cls", CLASSES)
def test_keras_jvp_matches_reverse_mode_and_updates_once(cls):
    layer = _layer(cls)
    eager, reverse = copy.deepcopy(layer), copy.deepcopy(layer)
    x, t = _data(4, 3, 3, 3), _data(4, 3, 3, 3, seed=2)
    y, dy = jvp(layer, (x,), (t,))
    torch.testing.assert_close(y, eager(x))
    _, dy_ref = torch.autograd.functional.jvp(reverse, x, t)  # reverse mode only (the double-vjp trick)
    torch.testing.assert_close(dy, dy_ref)
    assert dy.abs().max() > 0.1
    _assert_same_state(layer, eager)


def test_keras_jvp_matches_finite_differences():
    # BN's training output does not depend on the moving statistics: the layer is a function of x alone.
    layer = _layer(bnkit.BatchNorm2d)
    x, t = _data(4, 3, 3, 3), _data(4, 3, 3, 3, seed=3)
    _, dy = jvp(layer, (x,), (t,))
    h = 1e-6
    with torch.no_grad():
        fd = (layer(x + h * t) - layer(x - h * t)) / (2 * h)
    torch.testing.assert_close(dy, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_keras_vmap_over_samples_with_unbatched_buffers_raises_and_changes_nothing(cls):
    layer = _layer(cls)
    before = copy.deepcopy(layer)
    params = dict(layer.named_parameters())
    with pytest.raises(RuntimeError, match="differ per mapped sample"):
        vmap(lambda x: functional_call(layer, params, (x,)))(_data(2, 4, 3, 3, 3))
    _assert_same_state(layer, before)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_keras_ensembling_with_stacked_buffers_matches_a_loop(cls, momentum):
    models = []
    for i in range(3):
        m = _layer(cls, momentum)
        with torch.no_grad():
            m.weight.add_(0.1 * i)
        models.append(m)
    loop = copy.deepcopy(models)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    for step in range(2):
        x = _data(3, 4, 3, 3, 3, seed=10 + step)
        if step == 1:
            x[1, 0, 2, 0, 0] = float("nan")  # model 1's batch is skipped ("skip": state and count kept)
        y = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            y_loop = torch.stack([m(xi) for m, xi in zip(loop, x)])
        torch.testing.assert_close(y, y_loop, equal_nan=True)
    for k, v in buffers.items():
        torch.testing.assert_close(v, torch.stack([dict(m.named_buffers())[k] for m in loop]), msg=k)
    assert buffers["num_batches_tracked"].tolist() == [3, 2, 3]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_keras_compiles_in_one_graph_and_equals_eager(cls, momentum):
    layer = _layer(cls, momentum).float()
    eager = copy.deepcopy(layer)
    x0 = _data(4, 3, 3, 3).float()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(copy.deepcopy(layer))(x0)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for step in range(3):
        x = _data(4, 3, 3, 3, seed=20 + step).float()
        if step == 1:
            x[0, 1, 0, 0] = float("inf")  # skipped in both (in the graph by torch.where)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            y_ref = eager(x)
        torch.testing.assert_close(compiled(x), y_ref, equal_nan=True)
    _assert_same_state(layer, eager)
    assert int(layer.num_batches_tracked) == 3
