"""Audit: memory layouts, strides and dtypes of bnkit's BN against torch's own BN.

The oracle is always torch's BN on the same input (the same values *and* strides,
rebuilt from one seed), with the same weights and buffers: outputs, input / weight /
bias gradients, running statistics and ``num_batches_tracked`` must agree to rounding,
and the output's and the input gradient's strides must be torch's (a drop-in that
returns another layout silently changes the memory format of what follows: a conv
after a channels_last BN is slower on a contiguous tensor and vice versa).

Input gradients are read with ``torch.autograd.grad`` (the raw gradient that the
layer before BN receives in a network), not from ``.grad``, where AccumulateGrad's
layout contract would re-stride them and hide a difference.

Every case runs on both bnkit backends (the C++ kernels and the portable torch ops),
and a subset under ``bnkit.accelerated()`` against torch without it. Half-precision
results are compared with a float64 oracle: bnkit's error may be at most about
torch's own error (plus one rounding of the dtype).

Inputs torch 2.13 itself gets wrong (a channels-last input whose size-1 axis has a
non-canonical stride, with a standard-layout gradient: docs/differences.md) are not
used: every size-1 axis here has the stride ``.to(memory_format=...)`` gives it.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from _compare import BNKIT_BN_BY_RANK, TORCH_BN_BY_RANK, assert_close, input_grad_scale, output_scale
from torch import nn

import bnkit
from bnkit import kernels

CL, CL3 = torch.channels_last, torch.channels_last_3d
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
TOL = 1e-5
MODES = ("train", "eval")


@pytest.fixture
def backend(model_backend):
    """Each test once per backend a model runs on (conftest's model_backend)."""
    return model_backend


def rand(shape, seed, dtype=F32, loc=0.3, scale=1.7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale + loc).to(dtype)


def strides_of(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


# ----------------------------------------------------------------------------- the comparison
def twins(ndim: int, channels: int, dtype=F32, seed=0):
    """A torch layer and a bnkit layer with the same non-trivial weights and buffers."""
    t = TORCH_BN_BY_RANK[ndim](channels)
    with torch.no_grad():
        t.weight.copy_(rand(channels, seed + 100, scale=0.3, loc=1.0))
        t.bias.copy_(rand(channels, seed + 101, scale=0.5, loc=0.0))
        t.running_mean.copy_(rand(channels, seed + 102, scale=0.5, loc=0.0))
        t.running_var.copy_(rand(channels, seed + 103, scale=0.2, loc=0.0).abs() + 0.5)
        t.num_batches_tracked.fill_(3)
    b = BNKIT_BN_BY_RANK[ndim](channels)
    b.load_state_dict(t.state_dict())
    return t.to(dtype), b.to(dtype)


def run_layer(layer: nn.Module, make_x, make_g, train: bool, ctx=contextlib.nullcontext, temporary_grad=False):
    """One forward/backward: the output, raw gradients (x, weight, bias) and the buffers afterwards.

    ``temporary_grad``: the gradient reaching BN is made by autograd (the backward of ``(y * c).sum()``, held
    by the engine alone, as in a network) instead of being handed in by the caller.
    """
    layer.train(train)
    x = make_x().requires_grad_()
    with ctx():
        y = layer(x)
        params = [x, layer.weight, layer.bias]
        if temporary_grad:
            gx, gw, gb = torch.autograd.grad((y * make_g(y)).sum(), params)
        else:
            gx, gw, gb = torch.autograd.grad(y, params, make_g(y))
    return {
        "y": y.detach(), "gx": gx, "gw": gw, "gb": gb,
        "running_mean": layer.running_mean.clone(), "running_var": layer.running_var.clone(),
        "num_batches_tracked": layer.num_batches_tracked.clone(),
    }


def same_layout(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert strides_of(ours) == strides_of(theirs), f"{what}: strides {strides_of(ours)} != torch's {strides_of(theirs)}"
    for fmt in (torch.contiguous_format, CL, CL3):
        if fmt is CL and ours.dim() != 4 or fmt is CL3 and ours.dim() != 5:
            continue
        assert ours.is_contiguous(memory_format=fmt) == theirs.is_contiguous(memory_format=fmt), (what, fmt)


def compare(ours: dict, theirs: dict, x: torch.Tensor, g: torch.Tensor, train: bool, tol=TOL,
            check: str = "both") -> None:
    """Values and dtypes (``check`` "values"; the natural rounding scales of _compare) and/or the layout
    of y and gx (``check`` "layout")."""
    if check == "feature_last":  # the input's feature-last memory order kept (dense), torch's values aside
        for key in ("y", "gx"):
            assert ours[key].movedim(1, -1).is_contiguous(), (key, strides_of(ours[key]))
        return
    if check in ("both", "layout"):
        same_layout(ours["y"], theirs["y"], "output")
        same_layout(ours["gx"], theirs["gx"], "input gradient")
    if check == "layout":
        return
    y_scale = output_scale(x, 1e-5) if train else 1.0
    gx_scale = input_grad_scale(x, g, 1e-5) if train else 1.0
    scales = {"y": y_scale, "gx": gx_scale, "gw": g.abs().sum().item() / max(1, x.shape[1]), "gb": 1.0}
    for key in ("y", "gx", "gw", "gb", "running_mean", "running_var", "num_batches_tracked"):
        a, e = ours[key], theirs[key]
        assert a.dtype == e.dtype, f"{key}: dtype {a.dtype} != torch's {e.dtype}"
        assert a.shape == e.shape, key
        if key == "num_batches_tracked":
            assert torch.equal(a, e), f"num_batches_tracked {a} != torch's {e}"
        else:
            assert_close(a, e, tol, key, scales.get(key, 1.0))


def check_layer_case(make_x, make_g, train: bool, dtype=F32, ctx_ours=contextlib.nullcontext, ours_cls=None,
                     check="both"):
    x = make_x()
    ndim, channels = x.dim(), x.shape[1]
    t, b = twins(ndim, channels, dtype)
    if ours_cls == "torch":  # torch's own layer under bnkit.accelerated()
        b = TORCH_BN_BY_RANK[ndim](channels).to(dtype)
        b.load_state_dict(t.state_dict())
    if train and x.numel() // max(channels, 1) <= 1:
        pytest.skip("one value per channel in training: an error in both (tested elsewhere)")
    theirs = run_layer(t, make_x, make_g, train)
    ours = run_layer(b, make_x, make_g, train, ctx_ours)
    compare(ours, theirs, x, make_g(theirs["y"]), train, check=check)
    return ours, theirs


def plain_grad(seed=7):
    return lambda y: rand(y.shape, seed, y.dtype, loc=0.0, scale=1.0)


# ----------------------------------------------------------------------------- 1. input layouts
# name -> maker of the input (same values and strides on every call)
INPUTS = {
    # channels_last / channels_last_3d, and the ambiguous shapes several formats describe
    "cl": lambda: rand((3, 4, 3, 5), 1).to(memory_format=CL),
    "cl_n1": lambda: rand((1, 4, 3, 5), 1).to(memory_format=CL),
    "cl_hw1": lambda: rand((5, 4, 1, 1), 1).to(memory_format=CL),
    "cl_h1": lambda: rand((3, 4, 1, 5), 1).to(memory_format=CL),
    "cl_c1": lambda: rand((3, 1, 4, 5), 1).to(memory_format=CL),
    "cl_n1_h1": lambda: rand((1, 4, 1, 5), 1).to(memory_format=CL),
    "cl_n1_hw1_eval": lambda: rand((1, 4, 1, 1), 1).to(memory_format=CL),
    "cl3": lambda: rand((2, 4, 2, 3, 2), 1).to(memory_format=CL3),
    "cl3_n1": lambda: rand((1, 4, 2, 3, 2), 1).to(memory_format=CL3),
    "cl3_dhw1": lambda: rand((5, 4, 1, 1, 1), 1).to(memory_format=CL3),
    "cl3_c1": lambda: rand((2, 1, 2, 3, 2), 1).to(memory_format=CL3),
    # permuted views that are channels_last / not any format
    "permuted_to_cl": lambda: rand((3, 3, 5, 4), 1).permute(0, 3, 1, 2),
    "transposed_hw": lambda: rand((3, 4, 5, 3), 1).transpose(2, 3),
    "transposed_nc": lambda: rand((4, 3, 3, 5), 1).transpose(0, 1),
    # expanded (stride 0) along N, along H/W
    "expand_n": lambda: rand((1, 4, 3, 5), 1).expand(3, 4, 3, 5),
    "expand_hw": lambda: rand((3, 4, 1, 1), 1, scale=3.0).expand(3, 4, 3, 5),
    "expand_n_cl": lambda: rand((1, 4, 3, 5), 1).to(memory_format=CL).expand(3, 4, 3, 5),
    # strided views: channel slices, as_strided with gaps, narrow with a storage offset
    "channel_slice": lambda: rand((3, 8, 3, 5), 1)[:, ::2],
    "as_strided_gaps": lambda: rand(500, 1).as_strided((3, 4, 3, 5), (130, 31, 10, 3), 7),
    "narrow_offset": lambda: rand((5, 4, 3, 5), 1).narrow(0, 2, 3),
    "narrow_w_offset": lambda: rand((3, 4, 3, 9), 1).narrow(3, 2, 5),
    # channels_last tensors that are not dense (a slice or narrow of a bigger channels_last tensor)
    "cl_channel_slice": lambda: rand((3, 8, 3, 5), 1).to(memory_format=CL)[:, ::2],
    "cl_narrow_c": lambda: rand((3, 6, 3, 5), 1).to(memory_format=CL)[:, 1:5],
    "cl_w_slice": lambda: rand((3, 4, 3, 10), 1).to(memory_format=CL)[..., ::2],
    "cl_as_strided_gaps": lambda: rand(900, 1).as_strided((3, 4, 3, 5), (200, 1, 50, 9), 5),
    "cl3_channel_slice": lambda: rand((2, 8, 2, 3, 2), 1).to(memory_format=CL3)[:, ::2],
    "cl3_narrow_d": lambda: rand((2, 4, 4, 3, 2), 1).to(memory_format=CL3)[:, :, 1:3],
    # BatchNorm1d: (N, C) and (N, C, L) views
    "nc_transposed": lambda: rand((4, 6), 1).t(),
    "nc_channel_slice": lambda: rand((6, 8), 1)[:, ::2],
    "nc_narrow_offset": lambda: rand((9, 4), 1).narrow(0, 3, 5),
    "ncl_transposed": lambda: rand((3, 5, 4), 1).transpose(1, 2),
    "ncl_transposed_n1": lambda: rand((1, 6, 4), 1).transpose(1, 2),
    "ncl_l1_transposed": lambda: rand((5, 1, 4), 1).transpose(1, 2),
    "ncl_channel_slice": lambda: rand((3, 8, 5), 1)[:, ::2],
    "ncl_l_slice": lambda: rand((3, 4, 10), 1)[..., ::2],
    "ncl_expand_n": lambda: rand((1, 4, 5), 1).expand(3, 4, 5),
    "ncl_expand_l": lambda: rand((3, 4, 1), 1, scale=3.0).expand(3, 4, 5),
}

# A feature-last (N, C, L) input (a transpose(1, 2) of (N, L, C) memory) keeps that layout in the output and
# the input gradient: a deliberate difference (docs/differences.md, "Memory layout of outputs"; torch returns
# both contiguous), checked by "feature_last" instead of against torch's strides.
FEATURE_LAST_KEPT = {"ncl_transposed", "ncl_transposed_n1"}

def layer_params(cases):
    out = []
    for case in cases:
        for backend in ("cpp", "torch"):
            for mode in MODES:
                if case.endswith("_eval") and mode == "train":
                    continue
                out.append(pytest.param(case, backend, mode, "values", id=f"{case}-{backend}-{mode}-values"))
                layout = "feature_last" if case in FEATURE_LAST_KEPT else "layout"
                out.append(pytest.param(case, backend, mode, layout, id=f"{case}-{backend}-{mode}-{layout}"))
    return out


def _with_backend(name):
    if name == "cpp" and not kernels.cpp_available():
        pytest.skip("the C++ extension is not available here")
    return kernels.use_backend(name)


@pytest.mark.parametrize("case,backend_name,mode,check", layer_params(INPUTS))
def test_input_layout_matches_torch(case, backend_name, mode, check):
    """Output, gradients, buffers ("values") and the output's / input gradient's strides ("layout"), per input layout."""
    with _with_backend(backend_name):
        check_layer_case(INPUTS[case], plain_grad(), mode == "train", check=check)


def test_input_cases_are_the_layouts_they_claim():
    """The inputs above are what their names say (so a passing case tests the layout it names)."""
    assert INPUTS["cl_hw1"]().is_contiguous() and INPUTS["cl_hw1"]().is_contiguous(memory_format=CL)
    assert INPUTS["cl_c1"]().is_contiguous() and INPUTS["cl_c1"]().is_contiguous(memory_format=CL)
    assert INPUTS["cl3_dhw1"]().is_contiguous() and INPUTS["cl3_dhw1"]().is_contiguous(memory_format=CL3)
    assert INPUTS["permuted_to_cl"]().is_contiguous(memory_format=CL)
    for name in ("transposed_hw", "transposed_nc", "channel_slice", "as_strided_gaps", "cl_channel_slice",
                 "cl_w_slice", "cl_as_strided_gaps", "nc_transposed", "ncl_channel_slice"):
        x = INPUTS[name]()
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL), name
    assert 0 in INPUTS["expand_n"]().stride() and 0 in INPUTS["expand_hw"]().stride()
    assert INPUTS["narrow_offset"]().storage_offset() > 0 and INPUTS["as_strided_gaps"]().storage_offset() > 0
    x = INPUTS["cl_channel_slice"]()
    assert x.untyped_storage().nbytes() > x.numel() * x.element_size()  # gaps: not dense
    assert x.stride()[1] < x.stride()[3] < x.stride()[2] < x.stride()[0]  # channels_last order


def _random_view(draw, st):
    """A 3-D to 5-D tensor as a random permutation of its memory, sliced, narrowed or expanded on some dims."""
    nd = draw(st.integers(3, 5))
    sizes = draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd))
    # the memory order: standard, channels-last-like (feature axis innermost) or any
    perm = draw(st.sampled_from([list(range(nd)), [0, *range(2, nd), 1]]) | st.permutations(range(nd)))
    base = rand([sizes[d] * 2 for d in perm], draw(st.integers(0, 99)))
    x = base.permute(*[perm.index(d) for d in range(nd)])  # shape 2 * sizes, memory in perm's order
    for d in range(nd):
        how = draw(st.sampled_from(["all", "step", "narrow", "expand"] if sizes[d] == 1 else ["all", "step", "narrow"]))
        if how == "step":
            x = x.narrow(d, 0, 2 * sizes[d] - 1)[(slice(None),) * d + (slice(None, None, 2),)]
        elif how == "narrow":
            x = x.narrow(d, draw(st.integers(0, sizes[d])), sizes[d])
        elif how == "expand":
            x = x.narrow(d, 0, 1).expand(*x.shape[:d], 3, *x.shape[d + 1:])
    return x


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_suggested_format_is_torchs_rule(data):
    """``_engine_views.suggested_format`` is ATen's ``suggest_memory_format`` (mirrored by torch's
    ``_prims_common.suggest_memory_format``, which torch's meta kernels use)."""
    from torch._prims_common import suggest_memory_format

    from bnkit._engine_views import suggested_format

    x = _random_view(data.draw, st)
    assert suggested_format(x) == suggest_memory_format(x), (x.shape, x.stride())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), mode=st.sampled_from(MODES))
def test_random_views_match_torch(backend, data, mode):
    """Random permuted / sliced / narrowed / expanded 4-D and 5-D inputs: torch's layouts, and the values of
    torch on a contiguous copy (torch 2.13 itself is wrong for some size-1 strides: docs/differences.md)."""
    x0 = _random_view(data.draw, st)
    if x0.dim() == 3 or (mode == "train" and x0.shape[0] * math.prod(x0.shape[2:]) < 2):
        return  # (3-D feature-last inputs keep their layout, a documented difference; one value: an error)
    t, b = twins(x0.dim(), x0.shape[1])
    t_layout = copy.deepcopy(t)
    make_g = plain_grad()
    truth = run_layer(t, lambda: x0.contiguous(), make_g, mode == "train")
    theirs = run_layer(t_layout, lambda: x0.detach(), make_g, mode == "train")
    ours = run_layer(b, lambda: x0.detach(), make_g, mode == "train")
    compare(ours, truth, x0, make_g(truth["y"]), mode == "train", check="values")
    compare(ours, theirs, x0, make_g(truth["y"]), mode == "train", check="layout")


# ----------------------------------------------------------------------------- 2. gradient layouts
GRADS = {
    # (input maker, gradient maker)
    "cl_out_contiguous_grad": (INPUTS["cl"], lambda y: rand(y.shape, 7)),
    "contiguous_out_cl_grad": (lambda: rand((3, 4, 3, 5), 1), lambda y: rand(y.shape, 7).to(memory_format=CL)),
    "cl3_out_contiguous_grad": (INPUTS["cl3"], lambda y: rand(y.shape, 7)),
    "contiguous_out_cl3_grad": (lambda: rand((2, 4, 2, 3, 2), 1), lambda y: rand(y.shape, 7).to(memory_format=CL3)),
    "cl_out_transposed_grad": (INPUTS["cl"], lambda y: rand((3, 4, 5, 3), 7).transpose(2, 3)),
    "grad_expanded_scalar": (lambda: rand((3, 4, 3, 5), 1), lambda y: torch.full((), 0.7).expand(y.shape)),
    "cl_grad_expanded_scalar": (INPUTS["cl"], lambda y: torch.full((), 0.7).expand(y.shape)),
    "grad_expanded_per_channel": (lambda: rand((3, 4, 3, 5), 1), lambda y: rand((1, 4, 1, 1), 7).expand(y.shape)),
    "cl_grad_expanded_n": (INPUTS["cl"], lambda y: rand((1, 4, 3, 5), 7).expand(y.shape)),
    "grad_channel_slice": (lambda: rand((3, 4, 3, 5), 1), lambda y: rand((3, 8, 3, 5), 7)[:, ::2]),
    "nc_grad_transposed": (lambda: rand((5, 4), 1), lambda y: rand((4, 5), 7).t()),
    "ncl_grad_expanded": (lambda: rand((3, 4, 5), 1), lambda y: rand((3, 4, 1), 7).expand(y.shape)),
    "strided_in_cl_grad": (INPUTS["channel_slice"], lambda y: rand(y.shape, 7).to(memory_format=CL)),
}


@pytest.mark.parametrize("case,backend_name,mode,check", layer_params(GRADS))
def test_gradient_layout_matches_torch(case, backend_name, mode, check):
    """A gradient in another layout than the output, or with stride 0, or not dense."""
    make_x, make_g = GRADS[case]
    with _with_backend(backend_name):
        check_layer_case(make_x, make_g, mode == "train", check=check)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_sum_backward_stride0_gradient_matches_torch(backend, fmt, mode):
    """``y.sum().backward()``: the gradient arriving at BN is an expanded scalar (all strides 0)."""
    make_x = INPUTS["cl"] if fmt == "channels_last" else (lambda: rand((3, 4, 3, 5), 1))
    t, b = twins(4, 4)
    res = []
    for layer in (t, b):
        layer.train(mode == "train")
        x = make_x().requires_grad_()
        y = layer(x)
        y.sum().backward()
        res.append((y.detach(), x.grad, layer.weight.grad, layer.bias.grad, layer.running_var.clone()))
    x = make_x()
    for a, e, what in zip(res[1], res[0], ("y", "gx", "gw", "gb", "running_var")):
        assert_close(a, e, TOL, what, input_grad_scale(x, torch.ones(x.shape), 1e-5) if what == "gx" else 1.0)
    same_layout(res[1][0], res[0][0], "output")
    same_layout(res[1][1], res[0][1], "input .grad")


TEMP_GRAD_INPUTS = ["cl", "cl3", "cl_hw1", "cl_c1", "cl3_dhw1", "cl_n1", "nc_narrow_offset"]


def _temp_grad_params():
    out = []
    for case in TEMP_GRAD_INPUTS:
        for grad_fmt in ("same", "contiguous"):
            for route in ("cpp", "torch", "accelerated"):
                for mode in MODES:
                    pid = f"{case}-grad_{grad_fmt}-{route}-{mode}"
                    out.append(pytest.param(case, grad_fmt, route, mode, "values", id=pid + "-values"))
                    out.append(pytest.param(case, grad_fmt, route, mode, "layout", id=pid + "-layout"))
    return out


@pytest.mark.parametrize("case,grad_fmt,route,mode,check", _temp_grad_params())
def test_engine_made_gradient_layout_matches_torch(case, grad_fmt, route, mode, check):
    """The gradient reaching BN comes from autograd (``(y * c).sum()``), in the input's own strides ("same":
    the kernels may reuse its memory for the input gradient) or in the standard layout."""
    make_x = INPUTS[case]

    def make_g(y):
        g = rand(y.shape, 7, y.dtype, loc=0.0, scale=1.0)
        return torch.empty_like(make_x()).copy_(g) if grad_fmt == "same" else g

    x = make_x()
    t, b = twins(x.dim(), x.shape[1])
    if route == "accelerated":
        if not kernels.cpp_available():
            pytest.skip("bnkit.accelerate needs the C++ extension")
        b = TORCH_BN_BY_RANK[x.dim()](x.shape[1])
        b.load_state_dict(t.state_dict())
        bnkit.accelerate(False)
        try:
            ours = run_layer(b, make_x, make_g, mode == "train", bnkit.accelerated, temporary_grad=True)
        finally:
            bnkit.accelerate(False)
    else:
        with _with_backend(route):
            ours = run_layer(b, make_x, make_g, mode == "train", temporary_grad=True)
    theirs = run_layer(t, make_x, make_g, mode == "train", temporary_grad=True)
    compare(ours, theirs, x, make_g(x), mode == "train", check=check)


# ----------------------------------------------------------------------------- 3. empty batch
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "channels_last_3d", "ncl"])
def test_empty_batch_matches_torch(backend, fmt, mode):
    """N=0: the output (layout kept), gradients (zeros), buffers untouched, nbt counted in training."""
    makers = {
        "contiguous": lambda: torch.empty(0, 4, 3, 5),
        "channels_last": lambda: torch.empty(0, 4, 3, 5).to(memory_format=CL),
        "channels_last_3d": lambda: torch.empty(0, 4, 2, 3, 2).to(memory_format=CL3),
        "ncl": lambda: torch.empty(0, 4, 5),
    }
    make_x = makers[fmt]
    x = make_x()
    t, b = twins(x.dim(), 4)
    res = [run_layer(m, make_x, lambda y: torch.ones(y.shape), mode == "train") for m in (t, b)]
    for key in res[0]:
        assert res[1][key].dtype == res[0][key].dtype, key
        assert torch.equal(res[1][key], res[0][key]), key
    same_layout(res[1]["y"], res[0]["y"], "output")
    same_layout(res[1]["gx"], res[0]["gx"], "input gradient")


# ----------------------------------------------------------------------------- 4. F-style, strided parameters
def _strided_copy(values: torch.Tensor, every: int = 2, offset: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, view): a view of ``values`` with stride ``every`` and a storage offset into a bigger base."""
    base = torch.full((values.numel() * every + offset,), -9.0, dtype=values.dtype)
    view = base[offset::every][: values.numel()]
    view.copy_(values)
    return base, view


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "ncl"])
def test_functional_strided_weight_bias_and_buffers(backend, fmt, mode):
    """weight, bias, running_mean/var as non-contiguous views of bigger tensors (F-style API).

    The running update must write through the views (the bases change at the view's
    positions only, as torch's do), the gradients of the views must be torch's.
    """
    C = 4
    make_x = {
        "contiguous": lambda: rand((3, C, 3, 5), 1),
        "channels_last": INPUTS["cl"],
        "ncl": lambda: rand((3, C, 5), 1),
    }[fmt]
    training = mode == "train"
    res = []
    for fn in (F.batch_norm, bnkit.functional.batch_norm):
        w_base, w = _strided_copy(rand(C, 2, scale=0.3, loc=1.0))
        b_base, b = _strided_copy(rand(C, 3, scale=0.5, loc=0.0))
        w_base.requires_grad_(), b_base.requires_grad_()
        w = w_base[1::2][:C]
        b = b_base[1::2][:C]
        rm_base, rm = _strided_copy(rand(C, 4, scale=0.5, loc=0.0), every=3)
        rv_base, rv = _strided_copy(rand(C, 5, scale=0.2, loc=0.0).abs() + 0.5, every=3)
        assert not (w.is_contiguous() or rm.is_contiguous())
        x = make_x().requires_grad_()
        y = fn(x, rm, rv, w, b, training, 0.3, 1e-5)
        g = plain_grad()(y)
        gx, gw, gb, gwb = torch.autograd.grad(y, (x, w, b, w_base), g)
        res.append({"y": y.detach(), "gx": gx, "gw": gw, "gb": gb, "gw_base": gwb, "rm_base": rm_base.clone(),
                    "rv_base": rv_base.clone()})
    theirs, ours = res
    x = make_x()
    for key in theirs:
        scale = input_grad_scale(x, plain_grad()(x), 1e-5) if key == "gx" and training else 1.0
        assert ours[key].dtype == theirs[key].dtype, key
        assert_close(ours[key], theirs[key], TOL, key, scale)
    same_layout(ours["y"], theirs["y"], "output")
    same_layout(ours["gx"], theirs["gx"], "input gradient")


# ----------------------------------------------------------------------------- 5. dtypes
def _oracle64(make_x, make_g, train, dtype_params):
    """torch's BN in float64 on the same (upcast) values: the exact result the others round."""
    x = make_x()
    t, _ = twins(x.dim(), x.shape[1], F32)
    t64 = TORCH_BN_BY_RANK[x.dim()](x.shape[1]).double()
    t64.load_state_dict({k: v.to(dtype_params).double() if v.is_floating_point() else v
                         for k, v in t.state_dict().items()})
    return run_layer(t64, lambda: make_x().double(), lambda y: make_g(y).double(), train)


def _half_case_params():
    out = []
    for dtype in (BF16, F16):
        for params in ("float32", "same"):
            for fmt in ("contiguous", "channels_last", "nc", "strided"):
                for mode in MODES:
                    out.append(pytest.param(dtype, params, fmt, mode,
                                            id=f"{str(dtype)[6:]}-params_{params}-{fmt}-{mode}"))
    return out


HALF_INPUTS = {
    "contiguous": lambda dt: (lambda: rand((3, 4, 3, 5), 1, dt)),
    "channels_last": lambda dt: (lambda: rand((3, 4, 3, 5), 1, dt).to(memory_format=CL)),
    "nc": lambda dt: (lambda: rand((6, 4), 1, dt)),
    "strided": lambda dt: (lambda: rand((3, 8, 3, 5), 1, dt)[:, ::2]),
}


@pytest.mark.parametrize("dtype,params,fmt,mode", _half_case_params())
def test_half_precision_matches_torch(backend, dtype, params, fmt, mode):
    """bfloat16/float16 inputs with float32 parameters (torch's mixed type) or with their own dtype.

    Each result is compared with the float64 oracle: bnkit's error may be at most twice
    torch's plus one rounding of the result's dtype; dtypes and layouts as torch's.
    """
    train = mode == "train"
    make_x = HALF_INPUTS[fmt](dtype)
    x = make_x()
    pdtype = F32 if params == "float32" else dtype

    def make_g(y):
        return rand(y.shape, 7, y.dtype, loc=0.0, scale=1.0)

    t, b = twins(x.dim(), x.shape[1], pdtype)
    theirs = run_layer(t, make_x, make_g, train)
    ours = run_layer(b, make_x, make_g, train)
    exact = _oracle64(make_x, make_g, train, pdtype)
    for key in ("y", "gx", "gw", "gb", "running_mean", "running_var", "num_batches_tracked"):
        a, e, r = ours[key], theirs[key], exact[key]
        assert a.dtype == e.dtype, f"{key}: dtype {a.dtype} != torch's {e.dtype}"
        if key == "num_batches_tracked":
            assert torch.equal(a, e)
            continue
        ulp = torch.finfo(a.dtype).eps
        scale = max(1.0, r.abs().max().item())
        if key == "gx" and train:
            scale = max(scale, input_grad_scale(x.double(), make_g(x).double(), 1e-5))
        err_ours = (a.double() - r).abs().max().item()
        err_torch = (e.double() - r).abs().max().item()
        assert err_ours <= 2 * err_torch + 2 * ulp * scale, f"{key}: error {err_ours:.3g} vs torch's {err_torch:.3g}"
    same_layout(ours["y"], theirs["y"], "output")
    same_layout(ours["gx"], theirs["gx"], "input gradient")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "expand_n", "channel_slice"])
def test_float64_matches_torch(backend, fmt, mode):
    make_x = {
        "contiguous": lambda: rand((3, 4, 3, 5), 1, F64),
        "channels_last": lambda: rand((3, 4, 3, 5), 1, F64).to(memory_format=CL),
        "expand_n": lambda: rand((1, 4, 3, 5), 1, F64).expand(3, 4, 3, 5),
        "channel_slice": lambda: rand((3, 8, 3, 5), 1, F64)[:, ::2],
    }[fmt]
    x = make_x()
    t, b = twins(4, 4, F64)
    train = mode == "train"

    def g(y):
        return rand(y.shape, 7, F64, loc=0.0, scale=1.0)

    compare(run_layer(b, make_x, g, train), run_layer(t, make_x, g, train), x, g(x), train, tol=1e-10)


# Half inputs with float32 and half tensors mixed: torch raises "mixed dtype"; bnkit accepts each tensor in
# float32 or the input's dtype on its own (docs/differences.md, "Dtype rules"), a deliberate difference.
_MIXED_HALF_ACCEPTED = [(x_dtype, name, dts) for x_dtype in (BF16, F16) for name, dts in {
    "weight_half_bias_f32": (x_dtype, F32, F32, F32),
    "params_f32_buffers_half": (F32, F32, x_dtype, x_dtype),
    "params_half_buffers_f32": (x_dtype, x_dtype, F32, F32),
}.items()]


def _mixed_param_cases():
    out = []
    out.append(pytest.param(F32, (F32, F32, F64, F64), "train", id="f32-buffers_f64-train"))
    out.append(pytest.param(F32, (F32, F32, F64, F64), "eval", id="f32-buffers_f64-eval"))
    out.append(pytest.param(F32, (F64, F64, F32, F32), "train", id="f32-params_f64-train"))
    out.append(pytest.param(F32, (F32, F32, F16, F16), "eval", id="f32-buffers_f16-eval"))
    out.append(pytest.param(F64, (F32, F32, F32, F32), "train", id="f64-params_f32-train"))
    out.append(pytest.param(F64, (F64, F64, F32, F32), "eval", id="f64-buffers_f32-eval"))
    return out


@pytest.mark.parametrize("x_dtype,dtypes,mode", _mixed_param_cases())
def test_mixed_parameter_dtypes_fail_as_torch(backend, x_dtype, dtypes, mode):
    """Parameter/buffer dtypes torch rejects (e.g. float64 running buffers with a float32 input): the same error type."""
    C = 3
    wd, bd, rmd, rvd = dtypes

    def call(fn):
        x = rand((4, C, 2, 3), 1, x_dtype)
        return fn(x, torch.zeros(C, dtype=rmd), torch.ones(C, dtype=rvd), torch.ones(C, dtype=wd),
                  torch.zeros(C, dtype=bd), mode == "train")

    with pytest.raises(Exception) as theirs:
        call(F.batch_norm)
    with pytest.raises(Exception) as ours:
        call(bnkit.functional.batch_norm)
    assert isinstance(ours.value, type(theirs.value)), (type(ours.value), type(theirs.value))


@pytest.mark.parametrize("x_dtype,name,dtypes", _MIXED_HALF_ACCEPTED,
                         ids=[f"{str(x)[6:]}-{n}" for x, n, _ in _MIXED_HALF_ACCEPTED])
@pytest.mark.parametrize("mode", MODES)
def test_mixed_half_and_float32_parameters_are_accepted_as_documented(backend, x_dtype, name, dtypes, mode):
    """torch rejects these mixtures; bnkit computes them as torch does with every tensor in float32 (the half
    tensors' values are exact in float32), and each running buffer keeps its dtype."""
    C = 3
    wd, bd, rmd, rvd = dtypes
    x = rand((4, C, 2, 3), 1, x_dtype)
    w, b = rand((C,), 2).to(wd), rand((C,), 3).to(bd)
    rm, rv = rand((C,), 4).to(rmd), (rand((C,), 5).abs() + 0.5).to(rvd)
    with pytest.raises(RuntimeError):  # "mixed dtype", or "expected scalar type ..."
        F.batch_norm(x, rm.clone(), rv.clone(), w, b, mode == "train")
    ours_rm, ours_rv = rm.clone(), rv.clone()
    y = bnkit.functional.batch_norm(x, ours_rm, ours_rv, w, b, mode == "train")
    ref_rm, ref_rv = rm.float(), rv.float()
    want = F.batch_norm(x, ref_rm, ref_rv, w.float(), b.float(), mode == "train")
    assert y.dtype == x_dtype and ours_rm.dtype == rmd and ours_rv.dtype == rvd
    tol = dict(rtol=1e-2, atol=1e-2) if x_dtype == BF16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y.float(), want.float(), **tol)
    torch.testing.assert_close(ours_rm.float(), ref_rm.to(rmd).float(), rtol=0, atol=0) if mode == "eval" else \
        torch.testing.assert_close(ours_rm.float(), ref_rm.to(rmd).float(), **tol)
    torch.testing.assert_close(ours_rv.float(), ref_rv.to(rvd).float(), **tol)


@pytest.mark.parametrize("mode", MODES)
def test_layer_float64_buffers_float32_input_fails_as_torch(backend, mode):
    """A layer whose running buffers were cast to float64 by hand, fed float32: torch raises, so must bnkit."""
    errors = []
    for cls in (nn.BatchNorm2d, bnkit.BatchNorm2d):
        m = cls(3).train(mode == "train")
        m.running_mean = m.running_mean.double()
        m.running_var = m.running_var.double()
        with pytest.raises(Exception) as info:
            m(rand((4, 3, 2, 2), 1))
        errors.append(info.value)
    assert isinstance(errors[1], type(errors[0])), [type(e) for e in errors]


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_on_strided_float64_input(backend, mode):
    """Double precision gradcheck (and gradgradcheck) through a transposed channel slice, with affine."""
    torch.manual_seed(0)
    base = torch.randn(2, 6, 3, 2, dtype=F64, requires_grad=True)  # x: (2, 3, 2, 3), strides (36, 12, 1, 2)
    w = (torch.rand(3, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=F64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5

    def f(base, w, b):
        x = base[:, ::2].transpose(2, 3)
        return bnkit.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, mode == "train")

    assert torch.autograd.gradcheck(f, (base, w, b))
    assert torch.autograd.gradgradcheck(f, (base, w, b))
    x = base.detach()[:, ::2].transpose(2, 3)  # and torch's analytic gradient is the same
    g = torch.randn(x.shape, dtype=F64)
    ours = torch.autograd.grad(f(base, w, b), (base, w, b), g)
    theirs = torch.autograd.grad(F.batch_norm(base[:, ::2].transpose(2, 3), rm.clone(), rv.clone(), w, b,
                                              mode == "train"), (base, w, b), g)
    for a, e in zip(ours, theirs):
        assert_close(a, e, 1e-10, "grad")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["cl_hw1", "cl_c1", "cl3_dhw1"])
def test_gradcheck_on_an_input_both_contiguous_and_channels_last(backend, case, mode):
    """The input-gradient layout choice for C=1 / HW=1 inputs keeps the gradient right: gradcheck (with its
    undefined-gradient check), gradgradcheck, and torch's analytic gradient, in float64."""
    x = INPUTS[case]().double().requires_grad_()
    c = x.shape[1]
    w = (torch.rand(c, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=F64, requires_grad=True)
    rm, rv = torch.randn(c, dtype=F64), torch.rand(c, dtype=F64) + 0.5

    def f(x, w, b, fn=bnkit.functional.batch_norm):
        return fn(x, rm.clone(), rv.clone(), w, b, mode == "train")

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    g = rand(x.shape, 7, F64)
    ours = torch.autograd.grad(f(x, w, b), (x, w, b), g)
    theirs = torch.autograd.grad(f(x, w, b, F.batch_norm), (x, w, b), g)
    for a, e in zip(ours, theirs):
        assert_close(a, e, 1e-10, "grad")


# ----------------------------------------------------------------------------- 6. under bnkit.accelerated()
ACCEL_CASES = ["cl", "cl_n1", "cl_hw1", "cl_c1", "cl3", "cl3_dhw1", "permuted_to_cl", "transposed_hw",
               "expand_n", "channel_slice", "as_strided_gaps", "narrow_offset", "cl_channel_slice", "nc_transposed",
               "ncl_transposed"]


def _accel_params():
    out = []
    for case in ACCEL_CASES + [f"grad:{c}" for c in GRADS]:
        for mode in MODES:
            out.append(pytest.param(case, mode, "values", id=f"{case}-{mode}-values"))
            out.append(pytest.param(case, mode, "layout", id=f"{case}-{mode}-layout"))
    return out


@pytest.fixture
def accel_off():
    if not kernels.cpp_available():
        pytest.skip("bnkit.accelerate needs the C++ extension")
    bnkit.accelerate(False)
    yield
    bnkit.accelerate(False)


def _served(x: torch.Tensor) -> bool:
    """Whether accelerate's kernels serve this input (csrc/accelerate.cpp: contiguous or 4-D/5-D channels-last)."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=CL)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=CL3))


@pytest.mark.parametrize("case,mode,check", _accel_params())
def test_accelerated_torch_layer_matches_plain_torch(accel_off, case, mode, check):
    """torch's nn.BatchNorm*d under bnkit.accelerated() against the same layer without it."""
    if case.startswith("grad:"):
        make_x, make_g = GRADS[case[5:]]
    else:
        make_x, make_g = INPUTS[case], plain_grad()
    bnkit.accelerate_counts(reset=True)
    check_layer_case(make_x, make_g, mode == "train", ctx_ours=bnkit.accelerated, ours_cls="torch", check=check)
    counts = bnkit.accelerate_counts()
    assert counts["forward"] + counts["forward_aten"] == 1  # the block really routed torch's op
    if _served(make_x()):  # bnkit's kernels, not ATen's, computed it (forward and backward)
        assert counts["forward"] == 1 and counts["backward"] == 1, counts
    assert not bnkit.is_accelerated()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "bf16_channels_last"])
def test_accelerated_functional_strided_params(accel_off, fmt, mode):
    """F.batch_norm under bnkit.accelerated() with strided weight/bias/buffers (views), vs torch without."""
    C = 4
    dtype = BF16 if fmt.startswith("bf16") else F32
    make_x = (lambda: rand((3, C, 3, 5), 1, dtype).to(memory_format=CL)) if "channels_last" in fmt else (
        lambda: rand((3, C, 3, 5), 1, dtype))
    res = []
    for ctx in (contextlib.nullcontext, bnkit.accelerated):
        w_base, _ = _strided_copy(rand(C, 2, scale=0.3, loc=1.0))
        b_base, _ = _strided_copy(rand(C, 3, scale=0.5, loc=0.0))
        w_base.requires_grad_(), b_base.requires_grad_()
        w, b = w_base[1::2][:C], b_base[1::2][:C]
        rm_base, rm = _strided_copy(rand(C, 4, scale=0.5, loc=0.0), every=3)
        rv_base, rv = _strided_copy(rand(C, 5, scale=0.2, loc=0.0).abs() + 0.5, every=3)
        x = make_x().requires_grad_()
        with ctx():
            y = F.batch_norm(x, rm, rv, w, b, mode == "train", 0.3, 1e-5)
            g = rand(y.shape, 7, dtype, loc=0.0, scale=1.0)
            grads = torch.autograd.grad(y, (x, w, b), g)
        res.append((y.detach(), *grads, rm_base.clone(), rv_base.clone()))
    tol = TOL if dtype == F32 else 2e-2
    x = make_x()
    for a, e, what in zip(res[1], res[0], ("y", "gx", "gw", "gb", "rm_base", "rv_base")):
        assert a.dtype == e.dtype, what
        scale = input_grad_scale(x, rand(x.shape, 7, F32), 1e-5) if what == "gx" and mode == "train" else 1.0
        assert_close(a, e, tol, what, scale)
    same_layout(res[1][0], res[0][0], "output")
    same_layout(res[1][1], res[0][1], "input gradient")


# ----------------------------------------------------------------------------- 7. in-place ops after BN
INPLACE = {
    "add_": lambda y: y.add_(1.0),
    "relu_": lambda y: torch.relu_(y),
    "F.relu(inplace)": lambda y: F.relu(y, inplace=True),
    "mul_": lambda y: y.mul_(2.0),
    "sigmoid_": lambda y: y.sigmoid_(),
    "slice_relu_": lambda y: torch.relu_(y[:, :2]),
}


def _inplace_run(layer, make_x, op, train, ctx=contextlib.nullcontext):
    layer.train(train)
    x = make_x().requires_grad_()
    try:
        with ctx():
            y = layer(x)
            z = op(y)
            g = rand(y.shape, 7, loc=0.0, scale=1.0)
            y.backward(g)
    except Exception as e:  # noqa: BLE001 - compared with torch's
        return e
    return {"y": y.detach(), "z_is_y": z is y or z.data_ptr() == y.data_ptr(), "gx": x.grad,
            "gw": layer.weight.grad, "gb": layer.bias.grad}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("op", list(INPLACE))
def test_inplace_op_after_bn_matches_torch(backend, op, fmt, mode):
    """y.add_ / relu_ / sigmoid_ ... on BN's output, then backward: as torch (values or the same error type)."""
    make_x = {"contiguous": lambda: rand((3, 4, 3, 5), 1), "channels_last": INPUTS["cl"],
              "strided": INPUTS["channel_slice"]}[fmt]
    t, b = twins(4, 4)
    theirs = _inplace_run(t, make_x, INPLACE[op], mode == "train")
    ours = _inplace_run(b, make_x, INPLACE[op], mode == "train")
    if isinstance(theirs, Exception):
        assert isinstance(ours, type(theirs)), ours
        return
    assert not isinstance(ours, Exception), repr(ours)
    assert ours["z_is_y"] == theirs["z_is_y"]
    x = make_x()
    for key in ("y", "gx", "gw", "gb"):
        scale = input_grad_scale(x, torch.ones(x.shape), 1e-5) if key == "gx" and mode == "train" else 1.0
        assert_close(ours[key], theirs[key], TOL, key, scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["add_", "relu_"])
def test_inplace_op_after_accelerated_bn_matches_torch(accel_off, op, mode):
    make_x = INPUTS["cl"]
    t, _ = twins(4, 4)
    t2 = nn.BatchNorm2d(4)
    t2.load_state_dict(t.state_dict())
    theirs = _inplace_run(t, make_x, INPLACE[op], mode == "train")
    ours = _inplace_run(t2, make_x, INPLACE[op], mode == "train", bnkit.accelerated)
    assert not isinstance(theirs, Exception) and not isinstance(ours, Exception)
    for key in ("y", "gx", "gw", "gb"):
        assert_close(ours[key], theirs[key], TOL, key, input_grad_scale(make_x(), torch.ones(3, 4, 3, 5), 1e-5))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_inplace_change_of_bn_input_raises_as_torch(backend, fmt, mode):
    """Modifying BN's (saved) input in place before backward: torch raises RuntimeError, so must bnkit."""
    errors = []
    for layer in twins(4, 4):
        layer.train(mode == "train")
        leaf = rand((3, 4, 3, 5), 1).requires_grad_()
        x = leaf * 1.0
        if fmt == "channels_last":
            x = x.contiguous(memory_format=CL)
        y = layer(x)
        x.add_(1.0)
        with pytest.raises(Exception) as info:
            y.sum().backward()
        errors.append(info.value)
    assert isinstance(errors[1], type(errors[0])), [type(e) for e in errors]
