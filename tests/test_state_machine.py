"""Stateful audit: bnkit's drop-in BN layers and their torch twins through random operation sequences.

`TwinMachine` builds a ``torch.nn.BatchNormNd`` layer and its bnkit twin (``bnkit.convert`` or the same
constructor arguments plus the same ``state_dict``) and applies every rule to both: forwards in train and
eval mode (tiny, empty and channels_last batches, under ``no_grad`` and ``inference_mode``), backward of a
random linear functional, SGD steps, mode switches, ``momentum``/``eps``/``track_running_stats`` changed at
runtime, the reset methods, ``load_state_dict`` both ways (and the legacy dict without
``num_batches_tracked``), a ``torch.save``/``torch.load(weights_only=True)`` round trip into fresh layers,
``copy.deepcopy`` mid-sequence, dtype switches and ``requires_grad_(False)``. After every step the twins
must agree: outputs, gradients, parameters, buffers, ``state_dict`` keys and values, attributes and the
types of the exceptions raised (bnkit's must be instances of torch's type, as docs/differences.md promises).

The documented differences (docs/differences.md) are honoured: where torch raises in training it has
already counted the batch in ``num_batches_tracked`` while bnkit changes nothing; the machine checks
bnkit's state is unchanged and puts torch's count back.

`GenericAxisMachine` drives ``bnkit.BatchNorm(C, axis=a)`` on inputs of several ranks against the float64
formula written out here (mean and biased variance over every dim but ``axis``, the running averages with
the unbiased variance, ``momentum=None`` the cumulative average) and torch's ``F.batch_norm`` applied after
moving ``axis`` to dim 1 (for the gradients).
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import bnkit
from bnkit import kernels

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
TORCH_CLS = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
BNKIT_CLS = {1: bnkit.BatchNorm1d, 2: bnkit.BatchNorm2d, 3: bnkit.BatchNorm3d}
TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
MOMENTA = (0.0, 0.1, 0.5, 1.0, None)
EPSILONS = (1e-5, 1e-3, 0.1)
# Set at runtime, torch takes any value (bnkit checks the constructor's only: docs/differences.md); eps=0
# is then rejected in training by both.
RUNTIME_MOMENTA = (*MOMENTA, 1.5)
RUNTIME_EPSILONS = (*EPSILONS, 0.0)

MACHINE_SETTINGS = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# --------------------------------------------------------------------------- helpers
def close(actual, expected, dtype, what, scale=1.0):
    """``max|actual - expected| <= tol * max(scale, max|expected|)``, in float64; shapes and dtypes must agree."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.equal(torch.isfinite(a), torch.isfinite(e)), f"{what}: finite entries differ"
    fin = torch.isfinite(e)
    if not fin.any():
        return
    scale = max(scale, e[fin].abs().max().item())
    err = (a[fin] - e[fin]).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max abs diff {err:.3g} > {TOL[dtype]:.0g} * {scale:.3g}"


def attempt(fn):
    """``(result, None)`` or ``(None, exception)``."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - compared with torch's below
        return None, exc


def same_outcome(et, eb, what):
    """bnkit raises where torch raises, an instance of torch's exception type (so ``except`` keeps working)."""
    assert (et is None) == (eb is None), f"{what}: torch raised {et!r}, bnkit raised {eb!r}"
    if et is not None:
        assert isinstance(eb, type(et)), f"{what}: torch raised {type(et).__name__}, bnkit {type(eb).__name__}: {eb}"


def snapshot(layer):
    """Every tensor of the layer (None kept), and its grads, cloned."""
    out = {}
    for name in TENSORS:
        t = getattr(layer, name, None)
        out[name] = None if t is None else t.detach().clone()
        g = getattr(t, "grad", None)
        out[name + ".grad"] = None if g is None else g.clone()
    return out


def assert_snapshot_equal(layer, before, what):
    after = snapshot(layer)
    for k, v in before.items():
        w = after[k]
        assert (v is None) == (w is None), f"{what}: {k} became {'None' if w is None else 'a tensor'}"
        if v is not None:
            assert v.dtype == w.dtype and torch.equal(v, w), f"{what}: {k} changed"


def assert_same_layout(actual, expected, what):
    """The same memory format (and strides) as torch's tensor."""
    formats = [torch.contiguous_format]
    if expected.dim() in (4, 5):
        formats.append(torch.channels_last if expected.dim() == 4 else torch.channels_last_3d)
    for fmt in formats:
        assert actual.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt), f"{what}: {fmt}"
    assert actual.stride() == expected.stride(), f"{what}: strides {actual.stride()} != {expected.stride()}"


def per_channel_var(x, axis=1):
    dims = [d for d in range(x.dim()) if d != axis]
    if x.numel() == 0 or x.numel() // x.shape[axis] < 1:
        return None
    return x.double().var(dim=dims, unbiased=False)


def output_amplification(x, layer_t, training):
    """How much BN amplifies the rounding of its inputs: max|x| (and |mean|) over the smallest std."""
    if x.numel() == 0:
        return 1.0
    if training or layer_t.running_var is None or layer_t.running_mean is None:
        var = per_channel_var(x)
        mean_abs = 0.0
    else:
        var = layer_t.running_var.detach().double()
        mean_abs = layer_t.running_mean.detach().double().abs().max().item()
    std = max(max(var.min().item() + layer_t.eps, 0.0) ** 0.5, 1e-12) if var is not None else 1.0
    w = 1.0 if layer_t.weight is None else max(1.0, layer_t.weight.detach().double().abs().max().item())
    b = 0.0 if layer_t.bias is None else layer_t.bias.detach().double().abs().max().item()
    return max(1.0, (x.detach().double().abs().max().item() + mean_abs) / std) * w + b


# --------------------------------------------------------------------------- the twin machine
class TwinMachine(RuleBasedStateMachine):
    """A torch BN layer and its bnkit twin under the same random sequence of operations."""

    @initialize(
        dim=st.sampled_from((1, 2, 3)),
        c=st.integers(1, 4),
        affine=st.booleans(),
        trs=st.booleans(),
        momentum=st.sampled_from(MOMENTA),
        eps=st.sampled_from(EPSILONS),
        dtype=st.sampled_from((torch.float32, torch.float64)),
        by_convert=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def build(self, dim, c, affine, trs, momentum, eps, dtype, by_convert, seed):
        torch.manual_seed(seed)
        self.dim, self.c, self.dtype = dim, c, dtype
        self.ctor = {"eps": eps, "momentum": momentum, "affine": affine, "track_running_stats": trs}
        t = TORCH_CLS[dim](c, **self.ctor).to(dtype)
        with torch.no_grad():  # non-trivial parameters and statistics
            if affine:
                t.weight.uniform_(0.5, 1.5)
                t.bias.uniform_(-0.5, 0.5)
            if trs:
                t.running_mean.uniform_(-1, 1)
                t.running_var.uniform_(0.5, 2)
                t.num_batches_tracked.fill_(int(torch.randint(0, 5, ())))
        if by_convert:
            b = bnkit.convert(t)
            assert type(b) is BNKIT_CLS[dim]
        else:
            b = BNKIT_CLS[dim](c, **self.ctor).to(dtype)
            b.load_state_dict(t.state_dict())
        for name in TENSORS:  # independent twins
            tt, bt = getattr(t, name), getattr(b, name)
            if tt is not None:
                assert tt.data_ptr() != bt.data_ptr(), f"{name} shared between the twins"
        self.t, self.b = t, b
        self.pending = []  # the last forwards that have a graph (see forward)
        self.gen = torch.Generator().manual_seed(seed + 1)

    # ---------------------------------------------------------------- the invariant
    @invariant()
    def twins_agree(self):
        t, b = self.t, self.b
        assert type(b) is BNKIT_CLS[self.dim]
        assert t.training == b.training
        for attr in ("momentum", "eps", "track_running_stats", "affine", "num_features"):
            assert getattr(t, attr) == getattr(b, attr), attr
        assert [n for n, _ in t.named_parameters()] == [n for n, _ in b.named_parameters()]
        assert [n for n, _ in t.named_buffers()] == [n for n, _ in b.named_buffers()]
        st_t, st_b = t.state_dict(), b.state_dict()
        assert list(st_t) == list(st_b), f"state_dict keys {list(st_t)} != {list(st_b)}"
        assert st_t._metadata[""]["version"] == st_b._metadata[""]["version"]
        for k in st_t:
            if k == "num_batches_tracked":
                assert st_b[k].dtype == torch.long and st_b[k].shape == ()
                assert int(st_t[k]) == int(st_b[k]), f"num_batches_tracked {int(st_t[k])} != {int(st_b[k])}"
            else:
                close(st_b[k], st_t[k], self.dtype, f"state_dict[{k!r}]", scale=10.0)
        for name in TENSORS:
            tt, bt = getattr(t, name), getattr(b, name)
            assert (tt is None) == (bt is None), f"{name}: {tt!r} vs {bt!r}"
            if tt is None:
                continue
            assert isinstance(bt, torch.nn.Parameter) == isinstance(tt, torch.nn.Parameter), name
            assert tt.requires_grad == bt.requires_grad, f"{name}.requires_grad"
            assert (tt.grad is None) == (bt.grad is None), f"{name}.grad: {tt.grad!r} vs {bt.grad!r}"
            if tt.grad is not None:
                close(bt.grad, tt.grad, self.dtype, f"{name}.grad", scale=10.0)
        self.resync()

    def resync(self):
        """Put bnkit's values into the torch twin (without version bumps), so that the next step's check
        measures that step alone, not the float32 rounding accumulated over the sequence."""
        for name in TENSORS:
            tt, bt = getattr(self.t, name), getattr(self.b, name)
            if tt is None or name == "num_batches_tracked":
                continue
            tt.data.copy_(bt.data)
            if tt.grad is not None:
                tt.grad.data.copy_(bt.grad.data)

    def current_dtype(self):
        return self.dtype

    # ---------------------------------------------------------------- forwards
    def make_input(self, data, n, channels_last):
        spatial = [data.draw(st.integers(1, 3), label="spatial") for _ in range(self.dim if self.dim > 1 else 0)]
        if self.dim == 1 and data.draw(st.booleans(), label="ncl"):
            spatial = [data.draw(st.integers(1, 4), label="L")]
        shape = (n, self.c, *spatial)
        spread = data.draw(st.sampled_from((0.5, 1.0, 3.0)), label="spread")
        shift = data.draw(st.sampled_from((-2.0, 0.0, 1.5)), label="shift")
        x = torch.randn(shape, generator=self.gen, dtype=torch.float64) * spread + shift
        x = x.to(self.current_dtype())
        if channels_last and self.dim in (2, 3):
            x = x.contiguous(memory_format=torch.channels_last if self.dim == 2 else torch.channels_last_3d)
        return x

    @rule(
        data=st.data(),
        n=st.sampled_from((0, 1, 1, 2, 3, 5)),
        channels_last=st.booleans(),
        mode=st.sampled_from(("grad", "grad", "no_grad", "inference_mode")),
    )
    def forward(self, data, n, channels_last, mode):
        self._forward(data, n, channels_last, mode)

    @rule(
        data=st.data(),
        n=st.sampled_from((0, 1, 2, 3, 5)),
        channels_last=st.booleans(),
        lr=st.sampled_from((None, 0.1)),
    )
    def forward_backward(self, data, n, channels_last, lr):
        """A training-loop step: forward with a graph, at once the backward of it, then maybe an SGD step."""
        if self._forward(data, n, channels_last, "grad"):
            self._backward(data, len(self.pending) - 1)
            if lr is not None:
                self.sgd_step(lr, 0.0, True)

    def _forward(self, data, n, channels_last, mode):
        """One forward of both twins; True when it left an output with a graph at the end of ``pending``."""
        x = self.make_input(data, n, channels_last)
        training = self.t.training
        x_t = x.clone(memory_format=torch.preserve_format)
        x_b = x.clone(memory_format=torch.preserve_format)
        ref = None
        if mode == "grad":
            x_t.requires_grad_()
            x_b.requires_grad_()
            # An independent copy of the torch twin's call: the gradients of this forward as it was made,
            # whatever happens to the twins' tensors before the backward.
            ref_layer = copy.deepcopy(self.t)
            for p in ref_layer.parameters():
                p.grad = None
            x_r = x.clone(memory_format=torch.preserve_format).requires_grad_()
            y_r, er = attempt(lambda: ref_layer(x_r))
            ref = None if er is not None else (ref_layer, x_r, y_r)
        before_b = snapshot(self.b)
        amp = output_amplification(x, self.t, training)
        ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
        with ctx():
            y_t, et = attempt(lambda: self.t(x_t))
        with ctx():
            y_b, eb = attempt(lambda: self.b(x_b))
        same_outcome(et, eb, f"forward {tuple(x.shape)} training={training} mode={mode}")
        event("forward", f"training={training} empty={x.numel() == 0} raised={type(et).__name__ if et else None}")
        if et is not None:
            nbt_t, nbt_b = self.t.num_batches_tracked, self.b.num_batches_tracked
            if nbt_b is not None and int(nbt_b) != int(before_b["num_batches_tracked"]):
                # bnkit counted the batch as torch did (both running buffers None: only the count exists);
                # docs/differences.md says bnkit changes nothing, torch's count is the oracle here.
                assert int(nbt_b) == int(nbt_t), "num_batches_tracked after a rejected forward"
                before_b["num_batches_tracked"] = nbt_b.detach().clone()
            assert_snapshot_equal(self.b, before_b, "bnkit after a rejected forward")
            if nbt_t is not None:  # documented: torch counted the batch before raising; bnkit did not
                nbt_t.data.copy_(nbt_b.data)
            return False
        if training and self.t.track_running_stats and self.t.running_mean is not None:
            # bnkit's running update bumps the buffers' version counters (torch's kernel does not), so the
            # backward of an earlier eval-mode output raises in bnkit alone, a documented difference
            # (test_backward_of_eval_output_after_training_forward). Such outputs are dropped here.
            self.pending = [p for p in self.pending if p["training"] or p["no_running"]]
        close(y_b, y_t, self.dtype, f"output {tuple(x.shape)} training={training}", scale=amp)
        assert y_b.dtype == y_t.dtype
        assert_same_layout(y_b, y_t, "output")
        assert y_b.requires_grad == y_t.requires_grad
        assert y_b.is_inference() == y_t.is_inference()
        if y_t.requires_grad:
            self.pending = self.pending[-2:] + [{
                "x_t": x_t, "x_b": x_b, "y_t": y_t, "y_b": y_b, "amp": amp, "ref": ref, "training": training,
                "no_running": self.t.running_mean is None,
            }]
            return True
        return False

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def backward(self, data):
        """Backward of a random linear functional of one of the last outputs (possibly not the newest)."""
        self._backward(data, data.draw(st.integers(0, len(self.pending) - 1), label="which output"))

    def _backward(self, data, which):
        p = self.pending.pop(which)
        x_t, x_b, y_t, y_b, amp = p["x_t"], p["x_b"], p["y_t"], p["y_b"], p["amp"]
        g = torch.randn(y_t.shape, generator=self.gen, dtype=torch.float64).to(y_t.dtype)
        if data.draw(st.booleans(), label="channels_last grad") and y_t.dim() in (4, 5):
            g = g.contiguous(memory_format=torch.channels_last if y_t.dim() == 4 else torch.channels_last_3d)
        grads_before = {name: snapshot(self.b)[name + ".grad"] for name in ("weight", "bias")}
        _, et = attempt(lambda: (y_t * g).sum().backward())
        _, eb = attempt(lambda: (y_b * g).sum().backward())
        gs = g.double().abs().max().item() if g.numel() else 1.0
        n_per_c = max(1, x_t.numel() // self.c)
        spurious = (et is not None and eb is None and p["ref"] is not None
                    and "modified by an inplace operation" in str(et))
        event("backward", "spurious torch error" if spurious else f"raised={type(et).__name__ if et else None}")
        if spurious:
            # torch saved a tensor changed in place since (its training-mode backward saves the running buffers,
            # which it does not use; reset_running_stats changes them) and refuses. bnkit saved none of them
            # (training; in eval the reference backend saves the folded scale): it must give the gradients of
            # the forward as it was made, the reference copy's.
            ref_layer, x_r, y_r = p["ref"]
            (y_r * g).sum().backward()
            close(x_b.grad, x_r.grad, self.dtype, "input grad (stale)", scale=amp * amp * gs)
            for name in ("weight", "bias"):
                pr, pb = getattr(ref_layer, name), getattr(self.b, name)
                if pr is None or pr.grad is None:
                    continue
                before = grads_before[name]
                if not pb.requires_grad:  # requires_grad_(False) since the forward: autograd accumulates nothing
                    assert (pb.grad is None) == (before is None) and (before is None or torch.equal(pb.grad, before))
                    continue
                increment = pb.grad - (0 if before is None else before)
                close(increment, pr.grad, self.dtype, f"{name}.grad (stale)", scale=amp * gs * n_per_c)
                pt = getattr(self.t, name)
                pt.grad = pb.grad.detach().clone()  # torch's twin raised: give it bnkit's checked gradient
            return
        same_outcome(et, eb, "backward")
        if et is not None:
            return  # (what either accumulated before its failing node, the invariant compares)
        close(x_b.grad, x_t.grad, self.dtype, "input grad", scale=amp * amp * gs)
        assert_same_layout(x_b.grad, x_t.grad, "input grad")
        for name in ("weight", "bias"):
            pt, pb = getattr(self.t, name), getattr(self.b, name)
            if pt is not None and pt.grad is not None:
                close(pb.grad, pt.grad, self.dtype, f"{name}.grad", scale=amp * gs * n_per_c)
                pt.grad.data.copy_(pb.grad.data)  # compared with this step's scale; resynced

    # ---------------------------------------------------------------- training steps
    @rule(lr=st.sampled_from((0.01, 0.1, 1.0)), weight_decay=st.sampled_from((0.0, 0.01)),
          set_to_none=st.booleans())
    def sgd_step(self, lr, weight_decay, set_to_none):
        for layer in (self.t, self.b):
            params = [p for p in layer.parameters() if p.requires_grad]
            if not params:
                continue
            opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)

    @rule(training=st.booleans())
    def set_mode(self, training):
        for layer in (self.t, self.b):
            assert (layer.train() if training else layer.eval()) is layer

    @rule(momentum=st.sampled_from(RUNTIME_MOMENTA))
    def set_momentum(self, momentum):
        self.t.momentum = momentum
        self.b.momentum = momentum

    @rule(eps=st.sampled_from(RUNTIME_EPSILONS))
    def set_eps(self, eps):
        self.t.eps = eps
        self.b.eps = eps

    @rule(value=st.booleans())
    def set_track_running_stats(self, value):
        """torch lets the attribute change at runtime; the buffers stay (or stay None)."""
        self.t.track_running_stats = value
        self.b.track_running_stats = value

    @precondition(lambda self: self.t.running_mean is not None or self.t.num_batches_tracked is not None)
    @rule(which=st.sampled_from(("running_mean", "running_var", "both", "num_batches_tracked")))
    def drop_buffers(self, which):
        """``bn.running_mean = None`` etc.: torch allows it (eval then fails for one missing buffer; training
        with both gone counts the batch only)."""
        names = ("running_mean", "running_var") if which == "both" else (which,)
        for layer in (self.t, self.b):
            for name in names:
                setattr(layer, name, None)

    @rule()
    def reset_running_stats(self):
        _, et = attempt(self.t.reset_running_stats)
        _, eb = attempt(self.b.reset_running_stats)
        same_outcome(et, eb, "reset_running_stats")  # (what either zeroed before failing, the invariant compares)
        event("reset_running_stats", f"raised={type(et).__name__ if et else None}")

    @rule()
    def reset_parameters(self):
        _, et = attempt(self.t.reset_parameters)
        _, eb = attempt(self.b.reset_parameters)
        same_outcome(et, eb, "reset_parameters")

    @precondition(lambda self: self.t.weight is not None)
    @rule(flag=st.booleans())
    def weight_requires_grad(self, flag):
        self.t.weight.requires_grad_(flag)
        self.b.weight.requires_grad_(flag)

    @rule(to_double=st.booleans())
    def switch_dtype(self, to_double):
        self.pending = []  # the layers are replaced: the old graphs lead to the old tensors
        self.t = self.t.double() if to_double else self.t.float()
        self.b = self.b.double() if to_double else self.b.float()
        self.dtype = torch.float64 if to_double else torch.float32
        for name in ("weight", "bias", "running_mean", "running_var"):
            for layer in (self.t, self.b):
                tensor = getattr(layer, name)
                if tensor is not None:
                    assert tensor.dtype == self.dtype
        if self.t.num_batches_tracked is not None:
            assert self.b.num_batches_tracked.dtype == self.t.num_batches_tracked.dtype == torch.long

    # ---------------------------------------------------------------- state_dict traffic
    @rule(direction=st.sampled_from(("t<-b", "b<-t", "swap")), assign=st.booleans())
    def load_from_other(self, direction, assign):
        sd_t, sd_b = self.t.state_dict(), self.b.state_dict()
        # (copies: with assign=True the layers take the dict's tensors, which the twins must not share)
        src_for_t = copy.deepcopy(sd_b if direction in ("t<-b", "swap") else sd_t)
        src_for_b = copy.deepcopy(sd_t if direction in ("b<-t", "swap") else sd_b)
        rt, et = attempt(lambda: self.t.load_state_dict(src_for_t, assign=assign))
        rb, eb = attempt(lambda: self.b.load_state_dict(src_for_b, assign=assign))
        same_outcome(et, eb, f"load_state_dict {direction}")
        event("load_state_dict", f"raised={type(et).__name__ if et else None}")
        if et is None:
            assert list(rt.missing_keys) == list(rb.missing_keys)
            assert list(rt.unexpected_keys) == list(rb.unexpected_keys)

    @rule(strict=st.booleans(), keep_metadata=st.booleans(), count=st.integers(0, 7))
    def load_without_count(self, strict, keep_metadata, count):
        """An old checkpoint: no num_batches_tracked (a plain dict, or a version-2 dict that lost the key)."""
        for layer in (self.t, self.b):  # a count that the load must keep
            if layer.num_batches_tracked is not None:
                layer.num_batches_tracked.fill_(count)
        results = []
        for layer in (self.t, self.b):
            sd = layer.state_dict()
            partial = type(sd)((k, v.clone()) for k, v in sd.items() if k != "num_batches_tracked")
            if keep_metadata:
                partial._metadata = copy.deepcopy(sd._metadata)
            else:
                partial = dict(partial)
            results.append(attempt(lambda layer=layer, partial=partial: layer.load_state_dict(partial, strict=strict)))
        (rt, et), (rb, eb) = results
        same_outcome(et, eb, f"load without num_batches_tracked strict={strict} metadata={keep_metadata}")
        event("load without count", f"raised={type(et).__name__ if et else None}")
        if et is None:
            assert list(rt.missing_keys) == list(rb.missing_keys)
            assert list(rt.unexpected_keys) == list(rb.unexpected_keys)

    @rule(cross=st.booleans(), strict=st.booleans())
    def save_load_roundtrip(self, cross, strict):
        """state_dict through torch.save/torch.load(weights_only=True) into fresh layers (same constructor)."""
        self.pending = []  # the layers are replaced: the old graphs lead to the old tensors
        loaded = []
        for layer in (self.t, self.b):
            buf = io.BytesIO()
            torch.save(layer.state_dict(), buf)
            buf.seek(0)
            loaded.append(torch.load(buf, weights_only=True))
        sd_t, sd_b = loaded
        if cross:
            sd_t, sd_b = sd_b, sd_t
        fresh_t = TORCH_CLS[self.dim](self.c, **self.ctor).to(self.dtype)
        fresh_b = BNKIT_CLS[self.dim](self.c, **self.ctor).to(self.dtype)
        rt, et = attempt(lambda: fresh_t.load_state_dict(sd_t, strict=strict))
        rb, eb = attempt(lambda: fresh_b.load_state_dict(sd_b, strict=strict))
        same_outcome(et, eb, f"load into a fresh layer strict={strict}")
        event("fresh load", f"raised={type(et).__name__ if et else None}")
        if et is not None:
            return
        assert list(rt.missing_keys) == list(rb.missing_keys)
        assert list(rt.unexpected_keys) == list(rb.unexpected_keys)
        for old, new in ((self.t, fresh_t), (self.b, fresh_b)):  # the runtime attributes carry over by hand
            new.train(old.training)
            new.momentum, new.eps, new.track_running_stats = old.momentum, old.eps, old.track_running_stats
            if old.weight is not None:
                new.weight.requires_grad_(old.weight.requires_grad)
        self.t, self.b = fresh_t, fresh_b

    @rule(touch_original=st.booleans())
    def deepcopy(self, touch_original):
        self.pending = []  # the layers are replaced: the old graphs lead to the old tensors
        ct, cb = copy.deepcopy(self.t), copy.deepcopy(self.b)
        assert type(cb) is type(self.b)
        for name in TENSORS:
            for old, new in ((self.t, ct), (self.b, cb)):
                o, n = getattr(old, name), getattr(new, name)
                assert (o is None) == (n is None)
                if o is not None:
                    assert o.data_ptr() != n.data_ptr() and torch.equal(o, n)
        if touch_original:  # the copies do not see the originals' later changes
            before_t, before_b = snapshot(ct), snapshot(cb)
            x = torch.randn((4, self.c) + (2,) * (self.dim if self.dim > 1 else 0), generator=self.gen).to(self.dtype)
            for layer in (self.t, self.b):
                layer.train()
                with torch.no_grad():
                    attempt(lambda layer=layer: layer(x))  # (eps may be 0 now: then it raises, changing nothing)
                    for p in layer.parameters():
                        p.add_(1.0)
            assert_snapshot_equal(ct, before_t, "torch copy")
            assert_snapshot_equal(cb, before_b, "bnkit copy")
        self.t, self.b = ct, cb


TwinMachine.TestCase.settings = MACHINE_SETTINGS
test_twin_machine = TwinMachine.TestCase


# --------------------------------------------------------------------------- the generic-axis machine
def reference_bn(x, axis, state, training, trs, momentum, eps):
    """The float64 formula, in NumPy: ``(y, new_running_mean, new_running_var, new_count)``; ``None`` for
    the statistics it leaves alone. Raises ValueError for one value per channel in batch-statistics mode."""
    xn = np.moveaxis(x.detach().double().numpy(), axis, -1).reshape(-1, x.shape[axis])  # (values, C)
    count = xn.shape[0]
    rm, rv, nbt, w, b = (None if state[k] is None else state[k].detach().double().numpy() if k != "nbt"
                         else int(state[k]) for k in ("running_mean", "running_var", "nbt", "weight", "bias"))
    batch_stats = training or rm is None
    new_rm, new_rv, new_nbt = rm, rv, nbt
    if training and trs and nbt is not None:
        new_nbt = nbt + 1
    if count == 0:
        return np.empty(x.shape), new_rm, new_rv, new_nbt
    if batch_stats:
        if count == 1:
            raise ValueError("one value per channel")
        mean, var = xn.mean(0), xn.var(0)
        if training and trs and rm is not None:
            factor = 1.0 / new_nbt if momentum is None else momentum
            new_rm = (1 - factor) * rm + factor * mean
            new_rv = (1 - factor) * rv + factor * var * count / (count - 1)
    else:
        mean, var = rm, rv
    yn = (xn - mean) / np.sqrt(var + eps)
    if w is not None:
        yn = yn * w + b
    moved = list(np.moveaxis(np.empty(x.shape), axis, -1).shape)
    y = np.moveaxis(yn.reshape(moved), -1, axis)
    return y, new_rm, new_rv, new_nbt


class GenericAxisMachine(RuleBasedStateMachine):
    """``bnkit.BatchNorm(C, axis=a)`` on inputs of several ranks against the float64 formula (NumPy) and,
    for the gradients, torch's ``F.batch_norm`` after moving ``axis`` to dim 1. Each step starts the
    reference from the layer's own state (in float64), so each step is checked on its own."""

    @initialize(
        c=st.integers(1, 4), axis=st.integers(-4, 3), affine=st.booleans(), trs=st.booleans(),
        momentum=st.sampled_from(MOMENTA), eps=st.sampled_from(EPSILONS),
        dtype=st.sampled_from((torch.float32, torch.float64)), seed=st.integers(0, 2**16),
    )
    def build(self, c, axis, affine, trs, momentum, eps, dtype, seed):
        self.c, self.axis, self.dtype = c, axis, dtype
        self.layer = bnkit.BatchNorm(c, eps=eps, momentum=momentum, affine=affine, track_running_stats=trs,
                                     dtype=dtype, axis=axis)
        self.gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if affine:
                self.layer.weight.uniform_(0.5, 1.5, generator=self.gen)
                self.layer.bias.uniform_(-0.5, 0.5, generator=self.gen)
            if trs:
                self.layer.running_mean.uniform_(-1, 1, generator=self.gen)
                self.layer.running_var.uniform_(0.5, 2, generator=self.gen)
        expected = ([] if not affine else ["weight", "bias"]) + (
            [] if not trs else ["running_mean", "running_var", "num_batches_tracked"])
        assert list(self.layer.state_dict()) == expected

    def state(self):
        layer = self.layer
        return {"running_mean": layer.running_mean, "running_var": layer.running_var,
                "nbt": layer.num_batches_tracked, "weight": layer.weight, "bias": layer.bias}

    @invariant()
    def dtypes_and_keys(self):
        layer = self.layer
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(layer, name)
            assert t is None or (t.dtype == self.dtype and t.shape == (self.c,)), name
        if layer.num_batches_tracked is not None:
            assert layer.num_batches_tracked.dtype == torch.long

    @rule(data=st.data(), mode=st.sampled_from(("grad", "grad", "no_grad")), backward=st.booleans())
    def forward(self, data, mode, backward):
        layer, axis = self.layer, self.axis
        lo = axis + 1 if axis >= 0 else -axis
        rank = data.draw(st.integers(max(2, lo), max(2, lo) + 2), label="rank")
        dim = axis % rank
        shape = [data.draw(st.sampled_from((0, 1, 1, 2, 3)) if d == 0 else st.integers(1, 3), label=f"size{d}")
                 for d in range(rank)]
        shape[dim] = self.c
        x = (torch.randn(shape, generator=self.gen, dtype=torch.float64) * 2 + 1).to(self.dtype)
        x = x.requires_grad_(mode == "grad")
        before = {k: (None if v is None else v.detach().clone()) for k, v in self.state().items()}
        training, trs = layer.training, layer.track_running_stats
        expected, ee = attempt(lambda: reference_bn(x, dim, before, training, trs, layer.momentum, layer.eps))
        with torch.enable_grad() if mode == "grad" else torch.no_grad():
            y, eb = attempt(lambda: layer(x))
        if ee is not None:
            assert isinstance(eb, ValueError), f"{tuple(x.shape)} axis={axis}: expected ValueError, got {eb!r}"
            for k, v in before.items():  # bnkit's documented rule: nothing changes
                now = self.state()[k]
                assert v is None or torch.equal(v, now), f"{k} changed by a rejected call"
            return
        assert eb is None, f"{tuple(x.shape)} axis={axis}: {eb!r}"
        y_ref, rm_ref, rv_ref, nbt_ref = expected
        var = per_channel_var(x, dim)
        std = 1.0 if var is None else (min(var.min().item(), float("inf")) + layer.eps) ** 0.5
        if not (training or layer.running_var is None):
            std = (layer.running_var.double().min().item() + layer.eps) ** 0.5
        amp = max(1.0, 4.0 / std) * 2
        assert y.shape == x.shape and y.dtype == x.dtype
        close(y.detach().double(), torch.from_numpy(np.ascontiguousarray(y_ref)), self.dtype, "output", scale=amp)
        for name, ref in (("running_mean", rm_ref), ("running_var", rv_ref)):
            now = getattr(layer, name)
            if ref is None:
                assert now is None
            else:
                close(now.double(), torch.from_numpy(np.asarray(ref)), self.dtype, name, scale=16.0)
        if nbt_ref is not None:
            assert int(layer.num_batches_tracked) == nbt_ref
        if mode == "grad" and backward and x.numel() > 0:
            self.check_backward(x, y, before, training, dim, amp)

    def check_backward(self, x, y, before, training, dim, amp):
        """Gradients of a random linear functional against torch's F.batch_norm on the moved input (float64)."""
        layer = self.layer
        g = torch.randn(y.shape, generator=self.gen, dtype=torch.float64)
        grads_before = {n: (None if getattr(layer, n) is None or getattr(layer, n).grad is None
                            else getattr(layer, n).grad.clone()) for n in ("weight", "bias")}
        (y * g.to(y.dtype)).sum().backward()
        xd = x.detach().double().requires_grad_()
        w = None if before["weight"] is None else before["weight"].double().requires_grad_()
        b = None if before["bias"] is None else before["bias"].double().requires_grad_()
        batch_stats = training or before["running_mean"] is None
        rm = None if batch_stats else before["running_mean"].double()
        rv = None if batch_stats else before["running_var"].double()
        y_ref = F.batch_norm(xd.movedim(dim, 1), rm, rv, w, b, training=batch_stats, eps=layer.eps).movedim(1, dim)
        close(y.detach().double(), y_ref.detach(), self.dtype, "output vs F.batch_norm", scale=amp)
        (y_ref * g).sum().backward()
        n_per_c = x.numel() // self.c
        close(x.grad.double(), xd.grad, self.dtype, "input grad", scale=amp * amp * 4)
        for name, ref in (("weight", w), ("bias", b)):
            p = getattr(layer, name)
            if p is None:
                continue
            increment = p.grad.double() - (0 if grads_before[name] is None else grads_before[name].double())
            close(increment, ref.grad, self.dtype, f"{name}.grad", scale=amp * 4 * n_per_c)

    @rule(training=st.booleans())
    def set_mode(self, training):
        self.layer.train(training)

    @rule(momentum=st.sampled_from(MOMENTA))
    def set_momentum(self, momentum):
        self.layer.momentum = momentum

    @rule(eps=st.sampled_from(EPSILONS))
    def set_eps(self, eps):
        self.layer.eps = eps

    @rule(value=st.booleans())
    def set_track_running_stats(self, value):
        self.layer.track_running_stats = value

    @precondition(lambda self: self.layer.running_mean is not None)
    @rule()
    def reset_running_stats(self):
        layer = self.layer
        before = [layer.running_mean.clone(), layer.running_var.clone(), int(layer.num_batches_tracked)]
        layer.reset_running_stats()  # torch's rule: a no-op while track_running_stats is False
        expected = before if not layer.track_running_stats else [
            torch.zeros(self.c, dtype=self.dtype), torch.ones(self.c, dtype=self.dtype), 0]
        assert torch.equal(layer.running_mean, expected[0]) and torch.equal(layer.running_var, expected[1])
        assert int(layer.num_batches_tracked) == expected[2]

    @rule(lr=st.sampled_from((0.01, 0.1)))
    def sgd_step(self, lr):
        params = [p for p in self.layer.parameters() if p.grad is not None]
        expected = [(p.detach() - lr * p.grad).clone() for p in params]
        if params:
            torch.optim.SGD(params, lr=lr).step()
        for p, e in zip(params, expected):
            close(p.detach(), e, self.dtype, "SGD step")
        self.layer.zero_grad()

    @rule()
    def deepcopy_and_roundtrip(self):
        clone = copy.deepcopy(self.layer)
        buf = io.BytesIO()
        torch.save(self.layer.state_dict(), buf)
        buf.seek(0)
        clone.load_state_dict(torch.load(buf, weights_only=True))
        for k, v in self.layer.state_dict().items():
            assert torch.equal(clone.state_dict()[k], v), k
        assert clone.axis == self.layer.axis and clone.training == self.layer.training
        self.layer = clone


GenericAxisMachine.TestCase.settings = MACHINE_SETTINGS
test_generic_axis_machine = GenericAxisMachine.TestCase


# --------------------------------------------------------------------------- regressions the machines found
@pytest.fixture
def cpp_backend():
    """The default backend where the C++ extension is built (its fused layer call is where the first two bugs are);
    fixed here (the path these cases took before they were fixed)."""
    if not kernels.cpp_available():
        pytest.skip("the C++ extension is not available on this machine")
    with kernels.use_backend("cpp"):
        yield


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("grad", [False, True])
def test_empty_channels_last_eval_keeps_layout(dim, grad, cpp_backend):
    fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
    x = torch.randn((0, 3) + (2,) * dim).contiguous(memory_format=fmt).requires_grad_(grad)
    theirs = TORCH_CLS[dim](3).eval()(x)
    ours = BNKIT_CLS[dim](3).eval()(x)
    assert theirs.is_contiguous(memory_format=fmt)
    assert ours.is_contiguous(memory_format=fmt) and ours.stride() == theirs.stride()


def test_backward_of_empty_eval_output_after_reset(cpp_backend):
    outcomes = []
    for cls in (torch.nn.BatchNorm1d, bnkit.BatchNorm1d):
        layer = cls(3, affine=False).eval()
        x = torch.randn(0, 3, requires_grad=True)
        y = layer(x)
        layer.reset_running_stats()
        _, error = attempt(lambda y=y: y.sum().backward())
        outcomes.append((error is None, x.grad))
    (ok_t, grad_t), (ok_b, grad_b) = outcomes
    assert ok_t  # the oracle: torch's empty output does not depend on the buffers
    assert ok_b and torch.equal(grad_b, grad_t)


@pytest.mark.parametrize("dim", [1, 2])
def test_backward_of_eval_output_after_training_forward(dim):
    """docs/differences.md: a training forward writes the running buffers as in-place ops (their version
    counters move), so the backward of an eval output computed before it raises autograd's in-place error in
    bnkit; torch's kernel writes them unseen and its backward silently uses the updated statistics (oracle:
    the gradient of an eval forward with the updated statistics)."""
    torch.manual_seed(0)
    shape = (4, 3) + (2,) * (dim if dim > 1 else 0)
    x_eval, x_train, g = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    for cls in (TORCH_CLS[dim], BNKIT_CLS[dim]):
        torch.manual_seed(1)
        layer = cls(3)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
        x = x_eval.clone().requires_grad_()
        y = layer.eval()(x)  # e.g. a teacher / consistency term computed in eval mode ...
        layer.train()(x_train)  # ... then a training forward updates the running statistics
        _, error = attempt(lambda y=y: (y * g).sum().backward())
        if cls is BNKIT_CLS[dim]:
            assert isinstance(error, RuntimeError) and "inplace operation" in str(error), error
            continue
        assert error is None
        x2 = x_eval.clone().requires_grad_()
        (layer.eval()(x2) * g).sum().backward()  # the updated statistics' gradient
        close(x.grad, x2.grad, torch.float32, "torch's stale-graph input grad")


@pytest.mark.parametrize(("trs", "training"), [(True, True), (False, True), (False, False)])
def test_empty_batch_with_eps_zero(trs, training):
    for cls, must_raise in ((torch.nn.BatchNorm1d, True), (bnkit.BatchNorm1d, True)):
        layer = cls(3, track_running_stats=trs).train(training)
        layer.eps = 0.0
        _, error = attempt(lambda layer=layer: layer(torch.empty(0, 3)))
        assert isinstance(error, ValueError) == must_raise, f"{cls.__module__}: {error!r}"


def test_empty_batch_counted_without_running_mean():
    counts = []
    for cls in (torch.nn.BatchNorm1d, bnkit.BatchNorm1d):
        layer = cls(3)
        layer.running_mean = None
        y = layer(torch.empty(0, 3))
        assert y.shape == (0, 3)
        counts.append(int(layer.num_batches_tracked))
    assert counts[0] == 1
    assert counts[1] == counts[0]


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_one_running_buffer_missing_cumulative_raises(missing):
    for cls in (torch.nn.BatchNorm1d, bnkit.BatchNorm1d):
        layer = cls(3, momentum=None)
        layer.num_batches_tracked = None
        setattr(layer, missing, None)
        _, error = attempt(lambda layer=layer: layer(torch.randn(4, 3)))
        assert isinstance(error, ValueError), f"{cls.__module__}: {error!r}"
