"""Audit: the recipes real training scripts use, on models with bnkit's BN, against the torch twin.

The oracle everywhere is the same model with torch's BN (same seed, same weights) run through the
same tool: Lightning's ``Tuner`` (``lr_find``, ``scale_batch_size`` in both modes) and its
``LearningRateFinder`` / ``BatchSizeFinder`` callbacks, followed by a ``fit``; timm's training-script
utilities (``ModelEmaV2``/``ModelEmaV3`` with their buffer options, ``distribute_bn`` in both modes,
``create_optimizer_v2``'s parameter groups, ``create_model(norm_layer=...)`` on a model that uses the
layer itself, ``timm.utils.freeze``/``unfreeze``); and torch's loop pieces (``GradScaler("cpu")`` with
CPU autocast, ``clip_grad_norm_``, ``OneCycleLR``, the "freeze BN" recipe of ``requires_grad_(False)`` and
``eval()`` on the BN layers found by torch's classes). Gaps left by test_lightning, test_integrations_edges
and test_torch_training_loops (those already cover a plain ``fit``, ``ModelEmaV3`` with its defaults,
``norm_layer=`` resolving to timm's own ``BatchNormAct2d``, GradScaler-free autocast and AdamW + clipping).

Lightning is imported before the torchvision stand-in that timm needs (tests/_timm_stub.py), as in
tests/test_integrations_edges.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnkit

try:  # before the torchvision stand-in (torchmetrics probes torchvision's spec)
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - depends on the environment
    pl = None

from _timm_stub import import_timm  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


# =========================================================================== helpers
def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (BN's running_mean, running_var, num_batches_tracked included), cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_states(got: dict, want: dict, exact: bool = False, what: str = "") -> None:
    assert list(got) == list(want), what
    for k in want:
        assert got[k].dtype == want[k].dtype, f"{what}{k}: dtype {got[k].dtype} != {want[k].dtype}"
        if exact or not want[k].is_floating_point():
            assert torch.equal(got[k], want[k]), f"{what}{k}: not bitwise equal"
        else:
            torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m, k=k: f"{what}{k}: {m}")


def _assert_same_model(new: nn.Module, ref: nn.Module, exact: bool = False, what: str = "") -> None:
    _assert_states(_state(new), _state(ref), exact, what)


def _bn_count(model: nn.Module) -> int:
    return sum(bnkit.family.bn_form(m) is not None for m in model.modules())


def _small_net(kind: str, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """conv -> BN2d -> ReLU -> pool -> linear -> BN1d -> linear, with torch's ("torch") or bnkit's BN."""
    bn2, bn1 = (nn.BatchNorm2d, nn.BatchNorm1d) if kind == "torch" else (bnkit.BatchNorm2d, bnkit.BatchNorm1d)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), bn2(6, momentum=0.3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 8, bias=False), bn1(8, momentum=None),
                        nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial affine parameters, the same in both
        for m in (net[1], net[6]):
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.uniform_(-0.5, 0.5, generator=g)
    return net.to(dtype)


def _twins(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    ref, new = _small_net("torch", dtype), _small_net("bnkit", dtype)
    assert type(new[1]) is bnkit.BatchNorm2d and type(ref[1]) is nn.BatchNorm2d
    _assert_same_model(new, ref, exact=True)
    return ref, new


_G = torch.Generator().manual_seed(0)
_X = torch.randn(48, 3, 6, 6, generator=_G) * 2 + 0.5
_Y = torch.randint(0, 3, (48,), generator=_G)
# Lightning's runs train for dozens of steps at the learning rates the finders pick, which amplifies float32
# rounding past 1e-5 (torch's kernels against bnkit's); they run in float64, where it stays far below.
_X64 = _X.double()


# =========================================================================== Lightning's Tuner
needs_pl = pytest.mark.skipif(pl is None, reason="pytorch_lightning is not installed")


if pl is not None:

    class _Tuned(pl.LightningModule):
        """``lr`` and ``batch_size`` attributes (what the tuner edits) and its own train_dataloader."""

        def __init__(self, model: nn.Module, lr: float = 0.05, batch_size: int = 4) -> None:
            super().__init__()
            self.model = model
            self.lr = lr
            self.batch_size = batch_size
            self.losses: list[float] = []

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.model(x), y)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

        def train_dataloader(self):
            # drop_last: a last batch of one sample would make BN1d raise (torch's and bnkit's alike)
            return DataLoader(TensorDataset(_X64, _Y), batch_size=self.batch_size, shuffle=False, drop_last=True)


def _trainer(root, callbacks=(), **kw):
    kw.setdefault("max_epochs", 1)
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(root),
                      callbacks=list(callbacks), **kw)


def _warm(model: nn.Module) -> nn.Module:
    """Two training forwards: running statistics and num_batches_tracked away from their initial values."""
    model.train()
    x = _X64.to(next(model.parameters()).dtype)
    with torch.no_grad():
        model(x[:16])
        model(x[16:32] * 0.5)
    return model


def _tuned_pair(**kw):
    ref, new = _twins(torch.float64)
    return _Tuned(_warm(ref), **kw), _Tuned(_warm(new), **kw)


@needs_pl
@pytest.mark.parametrize("mode", ["exponential", "linear"])
def test_tuner_lr_find_same_curve_suggestion_and_restores_params_and_buffers(quiet_lightning, tmp_path, mode):
    from pytorch_lightning.tuner import Tuner

    lms = _tuned_pair()
    before = [_state(lm) for lm in lms]
    _assert_states(before[1], before[0])  # rounding apart: the warm-up forwards ran two kernels
    assert int(lms[1].model[1].num_batches_tracked) == 2
    finders, trainers = [], []
    for i, lm in enumerate(lms):
        trainer = _trainer(tmp_path / str(i), max_epochs=2)
        finders.append(Tuner(trainer).lr_find(lm, min_lr=1e-3, max_lr=3.0, num_training=16, mode=mode,
                                              early_stop_threshold=None))
        trainers.append(trainer)
        # the finder trained 16 steps (statistics moved) and put everything back: bitwise as before
        assert len(lm.losses) == 16
        _assert_states(_state(lm), before[i], exact=True, what=f"model {i} after lr_find: ")
        assert lm.model.training
    (f_ref, f_new), (ref, new) = finders, lms
    assert f_new.results["lr"] == f_ref.results["lr"]
    torch.testing.assert_close(torch.tensor(f_new.results["loss"]), torch.tensor(f_ref.results["loss"]), **TOL)
    assert f_new.suggestion() == f_ref.suggestion() is not None
    assert new.lr == ref.lr == f_ref.suggestion()  # update_attr=True
    # a fit afterwards with the same trainer: the same run for both, and the run of a module that never ran
    # the finder with that learning rate (the finder left nothing behind: buffers, optimizer, loop state)
    for lm, trainer in zip(lms, trainers):
        lm.losses.clear()
        trainer.fit(lm)
    _assert_same_model(new, ref, what="fit after lr_find: ")
    torch.testing.assert_close(torch.tensor(new.losses), torch.tensor(ref.losses), **TOL)
    assert int(new.model[1].num_batches_tracked) == int(ref.model[1].num_batches_tracked) == 2 + 2 * 12
    fresh = _Tuned(_warm(_small_net("bnkit", torch.float64)), lr=new.lr)
    _trainer(tmp_path / "fresh", max_epochs=2).fit(fresh)
    _assert_same_model(new, fresh, exact=True, what="fit after lr_find vs fit without it: ")


@needs_pl
@pytest.mark.parametrize("mode", ["power", "binsearch"])
def test_tuner_scale_batch_size_same_size_and_restores_params_and_buffers(quiet_lightning, tmp_path, mode):
    from pytorch_lightning.tuner import Tuner

    lms = _tuned_pair(batch_size=2)
    before = [_state(lm) for lm in lms]
    sizes, trainers = [], []
    for i, lm in enumerate(lms):
        trainer = _trainer(tmp_path / str(i))
        sizes.append(Tuner(trainer).scale_batch_size(lm, mode=mode, init_val=2, max_trials=3, steps_per_trial=2))
        trainers.append(trainer)
        assert len(lm.losses) >= 6  # the trials did train
        _assert_states(_state(lm), before[i], exact=True, what=f"model {i} after scale_batch_size: ")
    (ref, new) = lms
    assert sizes[1] == sizes[0] == new.batch_size == ref.batch_size
    assert sizes[0] > 2
    for lm, trainer in zip(lms, trainers):
        lm.losses.clear()
        trainer.fit(lm)
    assert len(new.losses) == len(ref.losses) == len(_X) // sizes[0]
    _assert_same_model(new, ref, what="fit after scale_batch_size: ")
    torch.testing.assert_close(torch.tensor(new.losses), torch.tensor(ref.losses), **TOL)
    fresh = _Tuned(_warm(_small_net("bnkit", torch.float64)), batch_size=sizes[1])
    _trainer(tmp_path / "fresh").fit(fresh)
    _assert_same_model(new, fresh, exact=True, what="fit after scale_batch_size vs fit without it: ")


@needs_pl
@pytest.mark.parametrize("finder", ["lr", "batch_size_power", "batch_size_binsearch"])
def test_finder_callbacks_in_fit_match_the_torch_twin(quiet_lightning, tmp_path, finder):
    from pytorch_lightning.callbacks import BatchSizeFinder, LearningRateFinder

    def callback():
        if finder == "lr":
            return LearningRateFinder(min_lr=1e-3, max_lr=3.0, num_training_steps=14, early_stop_threshold=None)
        return BatchSizeFinder(mode=finder.rsplit("_", 1)[1], init_val=2, max_trials=2, steps_per_trial=2)

    lms = _tuned_pair(batch_size=2 if finder != "lr" else 4)
    cbs = [callback(), callback()]
    for i, (lm, cb) in enumerate(zip(lms, cbs)):
        _trainer(tmp_path / str(i), callbacks=[cb], max_epochs=2).fit(lm)
    (ref, new), (cb_ref, cb_new) = lms, cbs
    if finder == "lr":
        assert cb_new.optimal_lr.suggestion() == cb_ref.optimal_lr.suggestion() == new.lr == ref.lr
        found = dict(lr=new.lr)
    else:
        assert cb_new.optimal_batch_size == cb_ref.optimal_batch_size == new.batch_size == ref.batch_size > 2
        found = dict(batch_size=new.batch_size)
    _assert_same_model(new, ref, what="fit with the finder callback: ")
    # the finder's steps left no trace: the fit equals a fit with the found value and no finder
    fresh = _Tuned(_warm(_small_net("bnkit", torch.float64)), **found)
    _trainer(tmp_path / "fresh", max_epochs=2).fit(fresh)
    _assert_same_model(new, fresh, exact=True, what="fit with the finder vs without: ")


# =========================================================================== timm's training-script utilities
@pytest.fixture(scope="module")
def timm():
    return import_timm()


def _sgd_steps(models, n: int = 3, seed: int = 5, lr: float = 0.1, dtype=torch.float32, opts=None, after=None):
    """``n`` SGD (momentum) steps of each model on the same batches; ``after(i, step)`` after each step."""
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(8, 3, 6, 6, generator=g, dtype=dtype) * 2 + 0.5, torch.randint(0, 3, (8,), generator=g))
               for _ in range(n)]
    opts = opts or [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr, momentum=0.9)
                    for m in models]
    for step, (x, y) in enumerate(batches):
        for i, (m, opt) in enumerate(zip(models, opts)):
            m.train()
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            if after is not None:
                after(i, step)
    return batches


_EMA_CASES = {
    "v2": ("ModelEmaV2", {}),
    "v3": ("ModelEmaV3", {}),
    "v3_loop": ("ModelEmaV3", dict(foreach=False)),
    "v3_warmup": ("ModelEmaV3", dict(use_warmup=True, warmup_power=0.9)),
    "v3_no_buffers": ("ModelEmaV3", dict(exclude_buffers=True)),
    "v3_float64": ("ModelEmaV3", dict(dtype=torch.float64)),
}


@pytest.mark.parametrize("case", list(_EMA_CASES))
def test_model_ema_averages_params_and_bn_buffers_as_for_the_torch_twin(timm, case):
    from timm import utils

    cls_name, kw = _EMA_CASES[case]
    if not hasattr(utils, cls_name):
        pytest.skip(f"timm {timm.__version__} has no {cls_name}")
    cls = getattr(utils, cls_name)
    models = _twins()
    for m in models:
        _warm(m)
    emas = [cls(m, decay=0.6, **kw) for m in models]
    assert type(emas[1].module[1]) is bnkit.BatchNorm2d and not emas[1].module.training

    def update(i, step):
        if cls_name == "ModelEmaV3":
            emas[i].update(models[i], step=step + 1)
        else:
            emas[i].update(models[i])

    batches = _sgd_steps(models, n=4, after=update)
    ref, new = models
    _assert_same_model(new, ref, what="models: ")
    _assert_same_model(emas[1].module, emas[0].module, what="EMA models: ")
    ema_bn, model_bn = emas[1].module[6], new[6]
    if case == "v3_no_buffers":  # buffers copied from the model, parameters averaged
        assert torch.equal(ema_bn.running_var, model_bn.running_var)
    else:  # the buffers are averaged too: the EMA's statistics lag the model's
        assert not torch.allclose(ema_bn.running_var, model_bn.running_var.to(ema_bn.running_var))
    if cls_name == "ModelEmaV3":  # integer buffers copied (V2 averages them too, truncating: the twin's counts)
        assert int(ema_bn.num_batches_tracked) == int(model_bn.num_batches_tracked) == 2 + 4
    # the EMA model evaluates with its averaged statistics, as the twin's does
    x = batches[0][0].to(ema_bn.running_var.dtype)
    with torch.no_grad():
        torch.testing.assert_close(emas[1](x), emas[0](x), **TOL)


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group (world size 1), destroyed after the test."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp"])
@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse_act"])
@pytest.mark.parametrize("reduce", [False, True], ids=["broadcast", "reduce"])
def test_distribute_bn_edits_the_buffers_bnkit_evaluates_with(timm, gloo_group, reduce, fuse, ddp):
    """``distribute_bn`` reduces or broadcasts every ``running_mean``/``running_var`` buffer in place. On one
    process the broadcast leaves them, and the reduce with ``world_size=2`` halves them (the sum over the one
    rank, divided by 2): the eval outputs after it must follow the edited buffers, as the twin's do."""
    from timm.utils import distribute_bn

    ref = _small_net("torch")
    new = bnkit.convert(ref, fuse_activations=fuse)
    models = [ref, new]
    if ddp:
        models = [nn.parallel.DistributedDataParallel(m) for m in models]
    _sgd_steps(models, n=2)
    x = _X[:8]
    for m in models:
        m.eval()
        with torch.no_grad():
            m(x)  # an eval call before the edit (nothing cached may survive it)
    before = [_state(m) for m in models]
    for m in models:
        distribute_bn(m, 2 if reduce else 1, reduce=reduce)
    for m, b in zip(models, before):
        got = _state(m)
        for k in b:
            want = b[k] / 2 if reduce and ("running_mean" in k or "running_var" in k) else b[k]
            torch.testing.assert_close(got[k], want, rtol=0, atol=0, msg=k)
    _assert_same_model(models[1], models[0], what="after distribute_bn: ")
    with torch.no_grad():
        torch.testing.assert_close(models[1](x), models[0](x), **TOL)


def _group_names(model: nn.Module, opt) -> list[tuple]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["weight_decay"], g.get("lr_scale")) for g in opt.param_groups]


@pytest.mark.parametrize("name, layer_decay", [
    ("small", None),  # (layer decay needs a timm model's group_matcher)
    ("resnet10t", None), ("resnet10t", 0.7), ("mobilenetv3_small_050", None), ("mobilenetv3_small_050", 0.7),
])
@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse_act"])
def test_create_optimizer_v2_filter_bias_and_bn_makes_the_twins_groups(timm, name, fuse, layer_decay):
    from timm.optim import create_optimizer_v2

    if name == "small":
        ref = _small_net("torch")
    else:
        torch.manual_seed(0)
        ref = timm.create_model(name, pretrained=False, num_classes=5)
    new = bnkit.convert(ref, fuse_activations=fuse)
    assert _bn_count(new) == _bn_count(ref) > 0
    kw = dict(lr=0.1, weight_decay=0.05, momentum=0.9, filter_bias_and_bn=True)
    if layer_decay is not None:
        kw["layer_decay"] = layer_decay
    opts = [create_optimizer_v2(m, "sgd", **kw) for m in (ref, new)]
    groups = [_group_names(m, o) for m, o in zip((ref, new), opts)]
    assert groups[1] == groups[0]
    # the BN layers' weights are in no-decay groups (for the twin by timm's rule: 1-d parameters)
    no_decay = {n for names, wd, _ in groups[1] if wd == 0.0 for n in names}
    bn_weights = {f"{n}.weight" for n, m in new.named_modules() if bnkit.family.bn_form(m) is not None}
    assert bn_weights and bn_weights <= no_decay
    if name == "small":  # and they step the same
        _sgd_steps([ref, new], n=2, opts=opts)
        _assert_same_model(new, ref, what="after create_optimizer_v2 steps: ")


@pytest.mark.parametrize("how", ["class", "partial"])
def test_create_model_with_bnkit_norm_layer_in_a_model_that_uses_it_as_given(timm, how):
    """timm's ResNet builds its BN from ``norm_layer`` itself (EfficientNet-style models resolve it to timm's
    BatchNormAct2d instead: tests/test_integrations_edges.py): bnkit's layers, the twin's initialisation
    (zero_init_last too) and the same training and eval runs."""
    import functools

    def layer(cls):
        return cls if how == "class" else functools.partial(cls, momentum=0.05, eps=1e-3)

    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=5, norm_layer=layer(nn.BatchNorm2d))
    torch.manual_seed(0)
    new = timm.create_model("resnet10t", pretrained=False, num_classes=5, norm_layer=layer(bnkit.BatchNorm2d))
    bns = [m for m in new.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m) is bnkit.BatchNorm2d for m in bns)
    assert len(bns) == sum(type(m) is nn.BatchNorm2d for m in ref.modules())
    assert {(m.momentum, m.eps) for m in bns} == {(0.1, 1e-5) if how == "class" else (0.05, 1e-3)}
    _assert_same_model(new, ref, exact=True, what="at creation: ")
    assert not torch.any(new.layer1[0].bn2.weight)  # zero_init_last reached bnkit's layer
    ref, new = ref.double(), new.double()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, new)]
    for x in xs:
        grads = []
        for m, opt in zip((ref, new), opts):
            m.train()
            opt.zero_grad()
            m(x).logsumexp(1).sum().backward()
            grads.append([p.grad.clone() for p in m.parameters()])
            opt.step()
        for a, b in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    _assert_same_model(new, ref, what="after steps: ")
    ref.eval(), new.eval()
    with torch.no_grad():
        torch.testing.assert_close(new(xs[0]), ref(xs[0]), rtol=1e-7, atol=1e-9)


def _timm_bnact_net(timm, kind: str) -> nn.Module:
    """conv -> timm's BatchNormAct2d (SiLU) -> pool -> linear; kind "torch": as built, else bnkit.convert of it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    return net if kind == "torch" else bnkit.convert(net)


@pytest.mark.parametrize("model, bn_stats", [
    pytest.param("resnet10t", True, id="resnet10t-bn_stats"),
    pytest.param("resnet10t", False, id="resnet10t-params_only"),
    pytest.param("bnact", False, id="bnact-params_only"),  # requires_grad only: nothing found by class
])
def test_timm_utils_freeze_then_unfreeze_trains_as_the_torch_twin(timm, model, bn_stats):
    from timm.utils import freeze, unfreeze

    if model == "resnet10t":
        torch.manual_seed(0)
        ref = timm.create_model("resnet10t", pretrained=False, num_classes=3)
        new = bnkit.convert(ref)
        subs = ["conv1", "bn1", "layer1"]  # a Sequential stem holding BN, a BN layer itself, a stage
    else:
        ref, new = _timm_bnact_net(timm, "torch"), _timm_bnact_net(timm, "bnkit")
        subs = ["0", "1"]
    ref, new = ref.double(), new.double()
    kinds = []
    for m in (ref, new):
        freeze(m, subs, include_bn_running_stats=bn_stats)
        kinds.append([(n, type(x).__name__, p.requires_grad) for n, x in m.named_modules()
                      for p in x.parameters(recurse=False)])
    assert kinds[1] == kinds[0]  # the same parameters frozen
    assert [type(x).__name__ for x in new.modules()].count("FrozenBatchNorm2d") == (
        [type(x).__name__ for x in ref.modules()].count("FrozenBatchNorm2d"))
    frozen_stats = _state(new)
    if model == "resnet10t":
        _resnet_steps([ref, new])
    else:
        _sgd_steps([ref, new], n=2, dtype=torch.float64, seed=7)
    _assert_same_model(new, ref, what="after steps with frozen parts: ")
    if bn_stats and model == "resnet10t":  # the frozen layers' statistics did not move
        for k in ("bn1.running_mean", "layer1.0.bn1.running_var"):
            assert torch.equal(_state(new)[k], frozen_stats[k]), k
    for m in (ref, new):
        unfreeze(m, subs, include_bn_running_stats=bn_stats)
    assert [type(x).__name__ for x in new.modules()] == [type(x).__name__ for x in ref.modules()]
    assert all(p.requires_grad for p in new.parameters())
    if model == "resnet10t":
        _resnet_steps([ref, new], seed=8)
    else:
        _sgd_steps([ref, new], n=2, dtype=torch.float64, seed=8)
    _assert_same_model(new, ref, what="after unfreeze and steps: ")


def test_timm_utils_freeze_keeps_a_fused_layers_activation_and_bnkits_freeze_matches_the_twin(timm):
    """timm.utils.freeze with BN statistics, on what bnkit.convert made of timm's BatchNormAct2d: timm's
    class-based helper passes bnkit's BN-with-activation layer by (it is no nn.BatchNorm2d, so timm cannot freeze
    it into a FrozenBatchNorm2d without its SiLU: docs/differences.md), the layer still computes BN + SiLU;
    bnkit.integrations.timm.freeze_batch_norm_2d freezes it as timm freezes the twin's."""
    from timm.utils import freeze

    from bnkit.integrations.timm import freeze_batch_norm_2d

    ref, new = (m.double() for m in (_timm_bnact_net(timm, "torch"), _timm_bnact_net(timm, "bnkit")))
    _sgd_steps([ref, new], n=2, dtype=torch.float64, seed=5)  # statistics away from their initial values
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    new.eval()
    with torch.no_grad():
        before = new(x)
    layer = new[1]
    freeze(new, ["1"], include_bn_running_stats=True)
    assert new[1] is layer and not isinstance(layer, nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        torch.testing.assert_close(new(x), before, rtol=0, atol=0)  # BN + SiLU, as before the call

    freeze(ref, ["1"], include_bn_running_stats=True)
    assert type(ref[1]).__name__ == "FrozenBatchNormAct2d"
    new[1] = freeze_batch_norm_2d(new[1])
    assert type(new[1]).__name__ == "FrozenBatchNormAct2d" and type(new[1]).__module__.startswith("bnkit")
    assert not list(new[1].parameters())
    for m in (ref, new):
        m.train()  # frozen layers compute their eval map in every mode
    with torch.no_grad():
        torch.testing.assert_close(new(x), ref(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new(x), before, rtol=1e-12, atol=1e-12)


def test_sync_batchnorm_converters_keep_a_fused_layers_activation(timm):
    """torch's convert_sync_batchnorm passes bnkit's BN-with-activation layer by (its SyncBatchNorm would drop
    the SiLU); bnkit's makes a SyncBatchNormAct with the same activation and the same eval output."""
    net = _timm_bnact_net(timm, "bnkit").eval()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = net(x)
    layer = net[1]
    assert nn.SyncBatchNorm.convert_sync_batchnorm(net)[1] is layer
    synced = bnkit.convert_sync_batchnorm(copy.deepcopy(net))
    assert type(synced[1]).__name__ == "SyncBatchNormAct" and isinstance(synced[1].act, nn.SiLU)
    with torch.no_grad():
        torch.testing.assert_close(synced(x), want, rtol=0, atol=0)


def _resnet_steps(models, seed: int = 7, n: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(n)]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9) for m in models]
    for x in xs:
        for m, opt in zip(models, opts):
            m.train()
            opt.zero_grad()
            m(x).logsumexp(1).sum().backward()
            opt.step()


# =========================================================================== torch's loop pieces
def _batches(n: int, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g) * 2 + 0.5, torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse_act"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_grad_scaler_autocast_clip_loop_with_a_skipped_step_matches_torch(dtype, fuse):
    """GradScaler("cpu") + CPU autocast + unscale_ + clip_grad_norm_: the first step's scaled gradients
    overflow, so the step is skipped and the scale backs off; the forward still moved the
    running statistics. Every scale, every clipped norm, the parameters and the buffers as the twin's."""
    ref = _small_net("torch")
    new = bnkit.convert(ref, fuse_activations=fuse)
    models = (ref, new)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    # fp16 gradients overflow above ~2**16 times these; bf16 has float32's range: a loss scaled to inf
    init = 2.0**20 if dtype is torch.float16 else 3e38
    scalers = [torch.amp.GradScaler("cpu", init_scale=init, backoff_factor=2.0**-7, growth_interval=2)
               for _ in models]
    start = [_state(m) for m in models]
    record = [[], []]
    for step, (x, y) in enumerate(_batches(4)):
        for i, (m, opt, scaler) in enumerate(zip(models, opts, scalers)):
            m.train()
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                out = m(x)
                loss = nn.functional.cross_entropy(out.float(), y)
            assert out.dtype == dtype
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            norm = nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            record[i].append((scaler.get_scale(), float(norm)))
            if step == 0:  # skipped: no parameter moved, the statistics did
                got = _state(m)
                assert all(torch.equal(got[k], start[i][k]) for k in got if "running" not in k and "num_b" not in k)
                assert not torch.equal(got["1.running_mean"], start[i]["1.running_mean"])
                assert not torch.isfinite(norm)
    scales = [[s for s, _ in r] for r in record]
    assert scales[1] == scales[0]
    assert scales[0][0] == pytest.approx(init * 2.0**-7, rel=1e-6) and scales[0][-1] > scales[0][0]  # backed off once, grown since
    norms = [[n for _, n in r] for r in record]
    torch.testing.assert_close(torch.tensor(norms[1][1:]), torch.tensor(norms[0][1:]), **TOL)
    _assert_same_model(new, ref, what=f"after {dtype} GradScaler steps: ")  # float32 weights and buffers


@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse_act"])
def test_one_cycle_lr_with_timm_style_no_decay_groups_matches_torch(fuse):
    """OneCycleLR (cycling SGD's momentum too) over 1-d-parameters-no-decay groups: lr/momentum schedule,
    parameters and buffers as the twin's at every step."""
    ref = _small_net("torch")
    new = bnkit.convert(ref, fuse_activations=fuse)
    models = (ref, new)

    def groups(m):
        return [{"params": [p for p in m.parameters() if p.ndim > 1], "weight_decay": 0.05},
                {"params": [p for p in m.parameters() if p.ndim <= 1], "weight_decay": 0.0}]

    opts = [torch.optim.SGD(groups(m), lr=0.1, momentum=0.9, nesterov=True) for m in models]
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.5, 0.2], total_steps=5) for o in opts]
    for x, y in _batches(5, seed=12):
        for m, opt, sched in zip(models, opts, scheds):
            m.train()
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            nn.utils.clip_grad_norm_(m.parameters(), 2.0)
            opt.step()
            sched.step()
        assert [(g["lr"], g["momentum"]) for g in opts[1].param_groups] == [
            (g["lr"], g["momentum"]) for g in opts[0].param_groups]
        _assert_same_model(new, ref)
    assert int(new[1].num_batches_tracked) == 5


def _recipe_twins(timm, model: str):
    if model == "bnact":
        return _timm_bnact_net(timm, "torch"), _timm_bnact_net(timm, "bnkit")
    ref = _small_net("torch")
    return ref, bnkit.convert(ref, fuse_activations=model == "fuse_act")


def _torch_bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    """The finder docs/differences.md gives for models with bnkit's BN-with-activation layers."""
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, bnkit.BatchNorm))]


# A BN layer fused with its activation (convert(fuse_activations=True), or what convert makes of timm's
# BatchNormAct2d) is deliberately no torch BN instance (docs/differences.md): torch's and timm's class-based
# helpers would treat it as plain BN and drop its activation. By torch's class alone the recipes find only
# the drop-ins; with bnkit.BatchNorm added they find every layer.
_RECIPE_MODELS = [
    pytest.param("convert", _torch_bn_layers, id="convert-by_torch_class"),
    pytest.param("convert", _bn_layers, id="convert"),
    pytest.param("fuse_act", _bn_layers, id="fuse_act"),
    pytest.param("bnact", _bn_layers, id="bnact"),
]


@pytest.mark.parametrize("model, find", _RECIPE_MODELS)
def test_freeze_bn_recipe_requires_grad_false_and_eval_on_bn_only_matches_torch(timm, model, find):
    """The fine-tuning recipe: after every ``model.train()``, each layer that is an ``nn.BatchNorm2d``-family
    module gets ``requires_grad_(False)`` and ``eval()``; the optimizer takes what still requires grad."""
    ref, new = _recipe_twins(timm, model)
    for m in (ref, new):
        _warm(m)
    models = (ref, new)
    before = [_state(m) for m in models]

    def freeze_bn(m):
        for layer in find(m):
            layer.eval()
            layer.requires_grad_(False)

    for m in models:
        freeze_bn(m)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9) for m in models]
    assert [len(o.param_groups[0]["params"]) for o in opts[1:]] == [len(opts[0].param_groups[0]["params"])]
    for x, y in _batches(3, seed=13):
        outs = []
        for m, opt in zip(models, opts):
            m.train()
            freeze_bn(m)
            opt.zero_grad()
            out = m(x)
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], **TOL)
    _assert_same_model(new, ref, what="after freeze-BN steps: ")
    got = _state(new)
    for k in got:  # the statistics and the affine parameters of every BN layer as before
        if any(s in k for s in ("running", "num_batches")) or k.startswith("1."):
            assert torch.equal(got[k], before[1][k]), k


@pytest.mark.parametrize("model, find", _RECIPE_MODELS)
def test_no_decay_groups_by_torch_bn_class_match_torch(timm, model, find):
    """Weight-decay groups built by class (BN layers' parameters without decay), AdamW: as the twin's."""
    ref, new = _recipe_twins(timm, model)
    models = (ref, new)

    def groups(m):
        bn = {id(p) for layer in find(m) for p in layer.parameters(recurse=False)}
        return [{"params": [p for p in m.parameters() if id(p) not in bn], "weight_decay": 0.5},
                {"params": [p for p in m.parameters() if id(p) in bn], "weight_decay": 0.0}]

    opts = [torch.optim.AdamW(groups(m), lr=0.05) for m in models]
    assert [len(g["params"]) for g in opts[1].param_groups] == [len(g["params"]) for g in opts[0].param_groups]
    for x, y in _batches(3, seed=14):
        for m, opt in zip(models, opts):
            m.train()
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    _assert_same_model(new, ref, what="after AdamW steps: ")
