"""bnkit models (plain and ``convert(fuse_activations=True)``) on torch's paths, on the edges.

The oracle is always the same model with torch's own BN layers (same weights)
under the same path. Paths already covered elsewhere (fixed-shape compile,
fixed-shape export, TorchScript of plain layers, eager/FX quantization of
plain layers) are not repeated; this file adds dynamic shapes, train/eval
switches inside one compiled callable, the fused-activation layers, and
``torch.func``'s BN patching helper (and bnkit's, which knows bnkit's layers).
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import bnkit

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"
)


def torch_net(momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=momentum),
    )


def close(a, b, tol=1e-5, msg=""):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=msg or None)


def assert_same_state(model: nn.Module, oracle: nn.Module, tol=1e-5) -> None:
    ref = oracle.state_dict()
    got = model.state_dict()
    assert set(got) == set(ref)
    for k, v in got.items():
        close(v.to(ref[k].dtype), ref[k], tol, msg=k)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("fused,channels_last", [(True, False), (False, True)])
def test_compile_dynamic_fullgraph_train_eval_switch_matches_torch(fused, channels_last):
    # One compiled callable, varying batch sizes (dynamic=True), train -> eval -> train,
    # backward each step: outputs, input/parameter gradients and every buffer vs torch eager.
    ref = torch_net(momentum=None)
    model = bnkit.convert(copy.deepcopy(ref), fuse_activations=fused)
    if channels_last:
        model, ref = model.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(1)
    for i, (n, train) in enumerate([(4, True), (5, True), (6, False), (3, True)]):
        model.train(train)
        ref.train(train)
        x = torch.randn(n, 3, 6, 6, generator=g) * 2 + 1
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = compiled(xa), ref(xb)
        close(y, y_ref, msg=f"step {i}")
        r = torch.randn(y.shape, generator=g)
        (y * r).sum().backward()
        (y_ref * r).sum().backward()
        close(xa.grad, xb.grad, 1e-4, msg=f"input grad step {i}")
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        close(p.grad, q.grad, 1e-4, msg=k)
    assert_same_state(model, ref)
    assert int(model[4].num_batches_tracked) == 3


def test_explain_fused_model_has_no_graph_break_in_train_and_eval():
    model = bnkit.convert(torch_net(), fuse_activations=True)
    x = torch.randn(2, 3, 6, 6)
    for train in (True, False):
        torch._dynamo.reset()
        out = torch._dynamo.explain(model.train(train))(x)
        assert out.graph_break_count == 0 and out.graph_count == 1


def test_gradcheck_through_compiled_layer_float64_train_and_eval():
    layer = bnkit.BatchNorm2d(3, momentum=None).double()
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(compiled, (x,))
    layer.eval()
    assert torch.autograd.gradcheck(compiled, (x,))


# ---------------------------------------------------------------- torch.export / ONNX


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_export_dynamic_batch_matches_torch_program(fused, train):
    ref = torch_net().train(train)
    model = bnkit.convert(copy.deepcopy(ref), fuse_activations=fused).train(train)
    x = torch.randn(4, 3, 6, 6)
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).run_decompositions()
    ep_ref = torch.export.export(ref, (x,), dynamic_shapes=({0: batch},)).run_decompositions()
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("bnkit" in t for t in targets)
    assert sorted(ep.graph_signature.buffers_to_mutate.values()) == sorted(
        ep_ref.graph_signature.buffers_to_mutate.values()
    )
    mod, mod_ref = ep.module(), ep_ref.module()
    for n in (3, 7):
        x = torch.randn(n, 3, 6, 6) + 1
        close(mod(x), mod_ref(x), msg=f"batch {n}")
    assert_same_state(mod, mod_ref)


def test_onnx_dynamo_dynamic_batch_fused_model_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    ref = torch_net().eval()
    model = bnkit.convert(copy.deepcopy(ref), fuse_activations=True).eval()
    logging.disable(logging.WARNING)
    try:
        program = torch.onnx.export(
            model, (torch.randn(4, 3, 6, 6),), dynamo=True, verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        program.save(str(tmp_path / "m.onnx"))
    finally:
        logging.disable(logging.NOTSET)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    x = torch.randn(5, 3, 6, 6)
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    close(torch.from_numpy(y), ref(x))


# ---------------------------------------------------------------- torch.func


def test_vmap_ensemble_of_fused_models_matches_each_torch_model():
    from torch.func import functional_call, stack_module_state, vmap

    refs = [torch_net() for _ in range(3)]
    for i, r in enumerate(refs):  # distinct weights
        with torch.no_grad():
            r[0].weight.add_(0.1 * i)
    models = [bnkit.convert(copy.deepcopy(r), fuse_activations=True) for r in refs]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    xs = torch.randn(3, 4, 3, 6, 6)
    ys = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, xs)
    for i, r in enumerate(refs):
        close(ys[i], r(xs[i]), msg=f"model {i}")
        for k, v in r.named_buffers():
            close(buffers[k][i].to(v.dtype), v, msg=f"model {i} {k}")


def test_grad_of_functional_call_in_training_updates_buffers_once():
    from torch.func import functional_call, grad

    ref = torch_net()
    model = bnkit.convert(copy.deepcopy(ref), fuse_activations=True)
    x = torch.randn(4, 3, 6, 6)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = grad(lambda p: functional_call(model, p, (x,)).sin().sum())(params)
    ref(x).sin().sum().backward()
    for k, p in ref.named_parameters():
        close(grads[k], p.grad, 2e-4, msg=k)
    assert_same_state(model, ref)


def test_bnkits_replace_all_batch_norm_modules_makes_vmap_training_work():
    from torch.func import functional_call, replace_all_batch_norm_modules_, vmap

    from bnkit.integrations.func import replace_all_batch_norm_modules_ as bnkit_replace_all

    ref = torch_net()
    model = bnkit.convert(copy.deepcopy(ref))
    replace_all_batch_norm_modules_(ref)
    assert model[1].running_mean is not None  # torch's own helper finds torch's classes only ...
    assert bnkit_replace_all(model) is model  # ... bnkit's finds both
    xs = torch.randn(3, 4, 3, 6, 6)

    def run(m):
        p = {k: v.detach() for k, v in m.named_parameters()}
        return vmap(lambda x: functional_call(m, p, (x,)))(xs)

    y_ref = run(ref)  # torch: running stats removed, batch stats per mapped sample
    assert model[1].running_mean is None and not model[1].track_running_stats
    close(run(model), y_ref)


# ---------------------------------------------------------------- TorchScript / quantization of fused layers


@pytest.mark.parametrize("freeze", [False, True])
def test_jit_script_of_fused_model_matches_torch(freeze):
    ref = torch_net()
    model = bnkit.convert(copy.deepcopy(ref), fuse_activations=True)
    if freeze:
        ref.eval()
        model = bnkit.freeze(model.eval())
    scripted_ref = torch.jit.script(copy.deepcopy(ref))  # the torch model scripts
    scripted = torch.jit.script(model)
    x = torch.randn(4, 3, 6, 6)
    close(scripted(x), scripted_ref(x))


def test_eager_fuse_modules_on_fused_conversion():
    import torch.ao.quantization as tq

    ref = torch_net().eval()
    model = bnkit.convert(copy.deepcopy(ref), fuse_activations=True).eval()
    fused_ref = tq.fuse_modules(copy.deepcopy(ref), [["0", "1", "2"]])
    fused = tq.fuse_modules(model, [["0", "1"]])  # the ReLU's slot is an Identity now
    x = torch.randn(2, 3, 6, 6)
    close(fused(x), fused_ref(x))


def test_fx_prepare_qat_fused_conversion_respects_eval():
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from bnkit.integrations.quantization import fx_backend_config, fx_prepare_custom_config

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    model = bnkit.convert(ref, fuse_activations=True).train()
    x = torch.randn(4, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (x,),
                                  prepare_custom_config=fx_prepare_custom_config(),
                                  backend_config=fx_backend_config())
    prepared(x * 2 + 1)
    prepared.eval()
    before = {k: v.clone() for k, v in prepared.named_buffers() if "running" in k}
    assert before
    prepared(torch.randn(1, 3, 6, 6) * 3)
    for k, v in prepared.named_buffers():
        if k in before:
            assert torch.equal(v, before[k]), f"{k} changed in eval mode"
