"""Copy semantics of models that bnkit's layers and tools have touched: ``copy.deepcopy``, a pickle /
``torch.save`` round trip of the whole model, and ``state_dict()`` into a fresh model.

The oracle, for every case: a copy behaves like the original would on the same inputs (the copy is run first,
then the original, or a second independent deepcopy, on the same inputs: outputs and state_dicts bitwise
equal); nothing done to the copy changes the original's state_dict (bitwise), and nothing done to the
original changes the copy's; a tool's ``restore()``/``remove()`` on the original acts on the original only.
For torch's own layers copied the same way, torch's behaviour is the oracle for bnkit's drop-ins.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnkit
from bnkit.variants import BatchNormAct2d


# ------------------------------------------------------------------ helpers
def _sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_sd_equal(a: dict, b: dict, what: str = "") -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _pickled(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


def _torch_saved(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": _pickled, "torch_save": _torch_saved}


def _inputs(shape: tuple, n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 2 + 0.5 for _ in range(n)]


def _train(model: nn.Module, xs: list, call=None) -> list[torch.Tensor]:
    """A few SGD steps (a fresh optimizer: deterministic); returns the outputs."""
    call = call or (lambda m, x: m(x))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1) if any(
        p.requires_grad for p in model.parameters()) else None
    outs = []
    for x in xs:
        y = call(model, x)
        outs.append(y.detach().clone())
        if opt is not None and y.requires_grad:
            opt.zero_grad()
            (y * y).mean().backward()
            opt.step()
    return outs


def _infer(model: nn.Module, xs: list, call=None) -> list[torch.Tensor]:
    call = call or (lambda m, x: m(x))
    with torch.no_grad():
        return [call(model, x).clone() for x in xs]


def _check_independent(orig: nn.Module, cp: nn.Module, run, xs: list, what: str = "") -> None:
    """``run`` on the copy leaves the original as it was; then ``run`` on the original (same inputs) gives the
    copy's outputs and state, and leaves the copy as it was."""
    before = _sd(orig)
    out_c = run(cp, xs)
    after_c = _sd(cp)
    _assert_sd_equal(_sd(orig), before, f"{what}: the original changed when the copy ran")
    out_o = run(orig, xs)
    _assert_sd_equal(_sd(cp), after_c, f"{what}: the copy changed when the original ran")
    _assert_sd_equal(_sd(orig), after_c, f"{what}: the copy and the original disagree")
    for a, b in zip(out_c, out_o):
        assert torch.equal(a, b), f"{what}: outputs differ"


# ------------------------------------------------------------------ plain layers and variants
def _net(bn: nn.Module, c: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 1), bn, nn.Conv2d(c, 2, 1))


LAYERS = {
    "BatchNorm2d": lambda: _net(bnkit.BatchNorm2d(4)),
    "BatchRenorm2d": lambda: _net(bnkit.BatchRenorm2d(4, warmup_steps=0)),
    "GhostBatchNorm2d": lambda: _net(bnkit.GhostBatchNorm2d(4, virtual_batch_size=4)),
    "BatchNormAct2d": lambda: _net(BatchNormAct2d(4)),
    "SyncBatchNorm": lambda: _net(bnkit.SyncBatchNorm(4)),
    "BatchNorm2d_shared_affine": lambda: _net(bnkit.BatchNorm2d(4, share_affine="all")),
    "frozen": lambda: bnkit.freeze(_net(bnkit.BatchNorm2d(4))),
    "torch.BatchNorm2d": lambda: _net(nn.BatchNorm2d(4)),
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_copy_independent(model_backend, name, mode, how):
    """Each layer in a model, warmed up, copied: train steps (or eval forwards) on the copy and on the original
    agree bitwise and never cross over."""
    torch.manual_seed(0)
    model = LAYERS[name]()
    _train(model.train(), _inputs((8, 3, 5, 5), 2, seed=1))
    model.train(mode == "train")
    cp = COPIES[how](model)
    assert cp.training == model.training
    _check_independent(model, cp, _train if mode == "train" else _infer, _inputs((8, 3, 5, 5)), f"{name}/{how}")


@pytest.mark.parametrize("how", list(COPIES))
def test_bnkit_matches_torch_copy(how):
    """A copied bnkit.BatchNorm2d trains like a copied torch.nn.BatchNorm2d (the torch oracle), at float rounding."""
    torch.manual_seed(0)
    t = _net(nn.BatchNorm2d(4))
    b = _net(bnkit.BatchNorm2d(4))
    b.load_state_dict(t.state_dict())
    tc, bc = COPIES[how](t), COPIES[how](b)
    xs = _inputs((8, 3, 5, 5))
    yt, yb = _train(tc, xs), _train(bc, xs)
    for a, c in zip(yt, yb):
        torch.testing.assert_close(a, c)
    for k, v in _sd(tc).items():
        torch.testing.assert_close(_sd(bc)[k], v)


@pytest.mark.parametrize("how", list(COPIES))
def test_shared_across_sites_copy(how):
    """SharedBatchNorm (per-site statistics) and its frozen form: copies are independent per site."""
    torch.manual_seed(0)

    def call(m, x):
        return m[1](m[0](x), site=0) + m[1](m[0](x) * 2, site=1)

    model = nn.Sequential(nn.Linear(3, 4), bnkit.SharedBatchNorm(4, sites=2))
    _train(model, _inputs((8, 3), 2, seed=1), call)
    cp = COPIES[how](model)
    _check_independent(model, cp, lambda m, xs: _train(m, xs, call), _inputs((8, 3)), "shared")
    frozen = bnkit.freeze(copy.deepcopy(model))
    _check_independent(frozen, COPIES[how](frozen), lambda m, xs: _infer(m, xs, call), _inputs((8, 3)), "frozen")


@pytest.mark.parametrize("how", list(COPIES))
def test_domain_bn_copy_inside_domain_block(how):
    """A copy made inside ``bnkit.domain(model, 1)`` keeps domain 1 after the block exits (it is the model as
    it was when copied) and trains independently; leaving the block resets the original only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bnkit.DomainBatchNorm2d(4, num_domains=2))
    with bnkit.domain(model, 1):
        cp = COPIES[how](model)
        twin, pristine = copy.deepcopy(model), copy.deepcopy(model)
    assert model[1].__dict__.get("current_domain") != 1
    assert cp[1].current_domain == 1
    _check_independent(twin, cp, _train, _inputs((8, 3, 5, 5)), "domain")
    with bnkit.domain(model, 1):
        ref = _train(model, _inputs((8, 3, 5, 5)))
    for a, b in zip(ref, _train(pristine, _inputs((8, 3, 5, 5)))):
        assert torch.equal(a, b)
    _assert_sd_equal(_sd(model), _sd(pristine), "domain 1 in the block vs the copy made in it")


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("lib", ["bnkit", "torch"])
def test_lazy_copy_before_first_call(lib, how):
    """A lazy layer copied before its first call: the copy infers its own size; the original stays lazy and
    infers a different one later (torch's LazyBatchNorm2d is the oracle: its uninitialized buffers refuse a
    deepcopy, and bnkit's must do the same)."""
    cls = bnkit.LazyBatchNorm2d if lib == "bnkit" else nn.LazyBatchNorm2d
    lazy = cls()
    if how == "deepcopy":
        with pytest.raises(ValueError, match="uninitialized parameter"):
            copy.deepcopy(nn.LazyBatchNorm2d())
        with pytest.raises(ValueError, match="uninitialized parameter"):
            copy.deepcopy(lazy)
        cp = _pickled(lazy)
    else:
        cp = COPIES[how](lazy)
    cp(torch.randn(4, 3, 2, 2))
    assert cp.num_features == 3 and cp.running_mean.shape == (3,)
    assert isinstance(lazy, cls) and lazy.has_uninitialized_params()
    lazy(torch.randn(4, 5, 2, 2))
    assert lazy.num_features == 5 and cp.running_mean.shape == (3,)
    cp2 = COPIES[how](lazy)
    _check_independent(lazy, cp2, _train, _inputs((4, 5, 2, 2)), f"lazy/{lib}")


def test_state_dict_into_fresh_model(model_backend):
    """state_dict() into a freshly built model: the fresh model trains like the original, and neither shares
    a tensor with the other."""
    torch.manual_seed(0)
    for name, build in LAYERS.items():
        model = build()
        _train(model, _inputs((8, 3, 5, 5), 2, seed=1))
        fresh = build()
        fresh.load_state_dict(model.state_dict())
        _check_independent(model, fresh, _train, _inputs((8, 3, 5, 5)), name)


def test_freeze_copy_then_unfreeze_copy():
    """Unfreezing a deepcopy of a frozen model gives back a trainable model of its own: the original stays
    frozen and, unfrozen in turn, trains exactly like the copy."""
    torch.manual_seed(0)
    model = bnkit.freeze(_net(bnkit.BatchNorm2d(4)))
    cp = bnkit.unfreeze(copy.deepcopy(model))
    assert isinstance(model[1], bnkit.FrozenBatchNorm) and isinstance(cp[1], bnkit.BatchNorm2d)
    before = _sd(model)
    _train(cp.train(), _inputs((8, 3, 5, 5)))
    _assert_sd_equal(_sd(model), before)
    orig = bnkit.unfreeze(model)
    fresh = bnkit.unfreeze(bnkit.freeze(_net(bnkit.BatchNorm2d(4))))
    fresh.load_state_dict(before)
    _check_independent(orig.train(), fresh.train(), _train, _inputs((8, 3, 5, 5)), "unfrozen")


# ------------------------------------------------------------------ adapt
def _source_model(lib: str = "bnkit") -> nn.Module:
    torch.manual_seed(0)
    bn = bnkit.BatchNorm2d(4) if lib == "bnkit" else nn.BatchNorm2d(4)
    model = _net(bn)
    _train(model, _inputs((8, 3, 5, 5), 3, seed=1))
    return model.eval()


def _target(n: int = 3, seed: int = 7) -> list[torch.Tensor]:
    return [x * 3 - 1 for x in _inputs((8, 3, 5, 5), n, seed=seed)]


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("lib", ["bnkit", "torch"])
def test_adapt_online_copy_adapts_itself(lib, how):
    """An online-adapted model, copied: the copy's forwards adapt the copy's statistics only (the bug just
    fixed: the copy's hook wrote into the original's buffers), exactly as the original's own forwards do."""
    model = _source_model(lib)
    h = bnkit.adapt(model, _target(1, seed=3), mode="online")
    cp = COPIES[how](model)
    _check_independent(model, cp, _infer, _target(), f"online/{lib}/{how}")
    h.restore()


@pytest.mark.parametrize("lib", ["bnkit", "torch"])
def test_adapt_online_restore_original_only(lib):
    """``handle.restore()`` on the original restores the source statistics of the original only: the copy keeps
    its statistics and its hooks, and adapts on like a twin copy."""
    model = _source_model(lib)
    source = _sd(model)
    h = bnkit.adapt(model, _target(1, seed=3), mode="online", window=2)
    cp, twin = copy.deepcopy(model), copy.deepcopy(model)
    state = _sd(cp)
    h.restore()
    _assert_sd_equal(_sd(model), source, "restore")
    _assert_sd_equal(_sd(cp), state, "the copy changed on the original's restore")
    assert not model[1]._forward_pre_hooks and cp[1]._forward_pre_hooks
    ys = _infer(cp, _target())
    assert not torch.equal(_sd(cp)["1.running_mean"], state["1.running_mean"])  # still adapting
    for a, b in zip(ys, _infer(twin, _target())):
        assert torch.equal(a, b)
    _assert_sd_equal(_sd(model), source, "the copy's forwards reached the restored original")


@pytest.mark.parametrize("mode", ["reestimate", "prior"])
def test_adapt_offline_copy_and_restore(mode):
    """After reestimate/prior: no hook is left; a copy is a plain model and the original's restore leaves it."""
    model = _source_model()
    source = _sd(model)
    h = bnkit.adapt(model, _target(), mode=mode)
    cp = copy.deepcopy(model)
    adapted = _sd(cp)
    assert not cp[1]._forward_pre_hooks
    h.restore()
    _assert_sd_equal(_sd(model), source)
    _assert_sd_equal(_sd(cp), adapted)
    ref = _source_model()
    ref.load_state_dict(adapted)
    _check_independent(ref, cp, _train, _inputs((8, 3, 5, 5)), mode)


def test_adapt_online_pickle_vs_torch_closure_hook():
    """Pickling an online-adapted model works (its hooks are objects); a torch model carrying a closure hook is
    what fails to pickle, so bnkit makes no picklable model unpicklable."""
    model = _source_model()
    h = bnkit.adapt(model, mode="online")
    pickle.dumps(model)
    h.restore()
    pickle.dumps(model)
    plain = _source_model("torch")
    k = 0
    plain[1].register_forward_pre_hook(lambda m, a: k)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(plain)


@pytest.mark.parametrize("how", list(COPIES))
def test_tent_copy_and_restore(how):
    """tent leaves no hook, the layers' momenta and modes as they were; a copy of the tented model trains like
    the original, and ``restore()`` on the original leaves the copy as it was."""
    model = _source_model()
    momentum = model[1].momentum
    model, h = bnkit.tent(model, _target(2), steps=1)
    assert not model[1]._forward_hooks and not model[1]._forward_pre_hooks and model[1].momentum == momentum
    cp, twin = COPIES[how](model), copy.deepcopy(model)
    tented = _sd(cp)
    h.restore()
    _assert_sd_equal(_sd(cp), tented, "the copy changed on the original's restore")
    _check_independent(twin, cp, _infer, _target(), "tent")
    _check_independent(twin, cp, _train, _inputs((8, 3, 5, 5)), "tent/train")


# ------------------------------------------------------------------ loop tools
def _ckpt_call(m, x):
    return checkpoint(m, x.requires_grad_(), use_reentrant=False)


@pytest.mark.parametrize("how", list(COPIES))
def test_checkpoint_safe_copy_keeps_hooks(how):
    """checkpoint_safe's hooks travel with a copy (module-level functions): under checkpointing the copy counts
    each step once, like the original; ``remove()`` on the original leaves the copy's hooks."""
    model = _source_model("torch").train()
    handle = bnkit.checkpoint_safe(model)
    cp = COPIES[how](model)
    run = lambda m, xs: _train(m, xs, _ckpt_call)  # noqa: E731
    _check_independent(model, cp, run, _inputs((8, 3, 5, 5)), "ckpt")
    twin = copy.deepcopy(cp)
    handle.remove()
    assert not model[1]._forward_pre_hooks
    nbt = int(twin[1].num_batches_tracked)
    _check_independent(twin, cp, run, _inputs((8, 3, 5, 5), 2, seed=5), "ckpt after remove")
    assert int(cp[1].num_batches_tracked) == nbt + 2


@pytest.mark.parametrize("lib", ["bnkit", "torch"])
def test_preserve_stats_copy_inside_block(lib):
    """A copy taken inside preserve_stats (after a training forward) is the model as it was then; leaving the
    block restores the original only, and the copy trains like a second copy taken at the same moment."""
    model = _source_model(lib).train()
    entry = _sd(model)
    with bnkit.preserve_stats(model):
        model(_inputs((8, 3, 5, 5), 1, seed=9)[0])
        cp, twin = copy.deepcopy(model), _pickled(model)
        inside = _sd(model)
    _assert_sd_equal(_sd(model), entry, "preserve_stats")
    _assert_sd_equal(_sd(cp), inside, "leaving the block touched the copy")
    _check_independent(twin, cp, _train, _inputs((8, 3, 5, 5)), "preserve")


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("lib", ["bnkit", "torch"])
def test_accumulate_stats_copy_inside_block(lib, how):
    """A copy taken inside accumulate_stats is the model as it was at the block's entry (momentum, buffers,
    forward); its forwards update its own buffers as outside a block; leaving the block applies the one update
    to the original only, as in a block where no copy was made."""
    model = _source_model(lib).train()
    before_block = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    micro = _inputs((4, 3, 5, 5), 3, seed=11)
    with bnkit.accumulate_stats(ref):
        for x in micro:
            ref(x).sum().backward()
    with bnkit.accumulate_stats(model):
        model(micro[0]).sum().backward()
        cp = COPIES[how](model)
        _assert_sd_equal(_sd(cp), _sd(before_block), "the copy is not the model at entry")
        assert cp[1].momentum == before_block[1].momentum and "forward" not in cp[1].__dict__
        ys = _train(cp, _inputs((8, 3, 5, 5)))
        for x in micro[1:]:
            model(x).sum().backward()
        in_copy = _sd(cp)
    _assert_sd_equal(_sd(cp), in_copy, "leaving the block touched the copy")
    for k, v in _sd(ref).items():
        assert torch.equal(_sd(model)[k], v), k
    for a, b in zip(ys, _train(before_block, _inputs((8, 3, 5, 5)))):
        assert torch.equal(a, b)
    _assert_sd_equal(in_copy, _sd(before_block), "the copy's forwards inside the block")


@pytest.mark.parametrize("how", list(COPIES))
def test_accelerate_torch_model_copy(accelerate_off, how):
    """Under bnkit.accelerate() a copied torch BN model trains like the original and independently of it."""
    model = _source_model("torch").train()
    bnkit.accelerate(True)
    cp = COPIES[how](model)
    _check_independent(model, cp, _train, _inputs((8, 3, 5, 5)), "accelerate")
    bnkit.accelerate(False)
    cp2 = COPIES[how](cp)
    _check_independent(cp, cp2, _train, _inputs((8, 3, 5, 5)), "accelerate off")


# ------------------------------------------------------------------ model-editing tools
def test_recalibrate_leaves_a_plain_copyable_model():
    """After recalibrate no hook is left; copies train independently."""
    model = _source_model()
    bnkit.recalibrate(model, _target())
    assert not model[1]._forward_pre_hooks and not model[1]._forward_hooks
    _check_independent(model.train(), copy.deepcopy(model), _train, _inputs((8, 3, 5, 5)), "recalibrate")
    _check_independent(model, _pickled(model), _train, _inputs((8, 3, 5, 5)), "recalibrate/pickle")


@pytest.mark.parametrize(
    "tool",
    [
        lambda m: bnkit.convert(m),
        lambda m: bnkit.convert(bnkit.convert(m), to="torch"),
        lambda m: bnkit.convert_domain_bn(m, 2),
    ],
    ids=["convert", "convert_back", "convert_domain_bn"],
)
@pytest.mark.parametrize("lib", ["bnkit", "torch"])
def test_not_inplace_tools_share_nothing(tool, lib):
    """convert / convert_domain_bn (inplace=False) return a model sharing no tensor with the input: training the
    result leaves the input as it was, and vice versa; the result copies independently too."""
    model = _source_model(lib).train()
    before = _sd(model)
    out = tool(model)
    xs = _inputs((8, 3, 5, 5))
    has_domain = any(isinstance(m, bnkit.DomainBatchNorm) for m in out.modules())
    with bnkit.domain(out, 0) if has_domain else contextlib.nullcontext():
        _train(out.train(), xs)
        after = _sd(out)
        _assert_sd_equal(_sd(model), before, "the input changed when the result trained")
        _train(model, xs)
        _assert_sd_equal(_sd(out), after, "the result changed when the input trained")
        _check_independent(out, copy.deepcopy(out), _train, xs, "result copy")


@pytest.mark.parametrize("lib", ["bnkit", "torch"])
def test_fuse_not_inplace_shares_nothing(lib):
    """fuse (inplace=False) returns a model sharing no tensor with the input; the fused model equals the input's
    eval output at float rounding, before and after the input trains on."""
    model = _source_model(lib)
    x = _inputs((8, 3, 5, 5), 1, seed=4)[0]
    with torch.no_grad():
        y = model(x)
    fused = bnkit.fuse(model)
    fused_sd = _sd(fused)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), y, rtol=1e-5, atol=1e-5)
    before = _sd(model)
    _train(fused.train(), _inputs((8, 3, 5, 5)))
    _assert_sd_equal(_sd(model), before, "the input changed when the fused model trained")
    fused = bnkit.fuse(model)
    _train(model.train(), _inputs((8, 3, 5, 5)))
    _assert_sd_equal(_sd(fused), fused_sd, "the fused model changed when the input trained")
    _check_independent(fused, copy.deepcopy(fused), _train, _inputs((8, 3, 5, 5)), "fused copy")


@pytest.mark.parametrize("how", list(COPIES))
def test_adapt_online_domain_bn_copy(how):
    """Online adaptation of a DomainBatchNorm model inside ``bnkit.domain``: a copy adapts its own row of its
    own statistics, as the original does on the same inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bnkit.DomainBatchNorm2d(4, num_domains=2)).eval()
    h = bnkit.adapt(model, mode="online")
    with bnkit.domain(model, 1):
        cp = COPIES[how](model)
        _check_independent(model, cp, _infer, _target(), f"domain online/{how}")
    h.restore()
