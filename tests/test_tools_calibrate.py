"""bnkit.recalibrate (PreciseBN) against statistics computed independently from the layer inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnkit


def make_model(dtype=torch.float64):
    f = {"dtype": dtype}
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, **f),
        nn.BatchNorm2d(4, momentum=0.5, **f),
        nn.ReLU(),
        nn.Dropout(0.5),  # must be off during recalibration
        nn.Conv2d(4, 5, 3, stride=2, **f),
        bnkit.BatchNorm2d(5, momentum=None, **f),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 6, **f),
        nn.BatchNorm1d(6, **f),
        nn.Unflatten(1, (1, 6)),
        bnkit.BatchNorm(6, axis=-1, **f),  # (N, 1, 6): channels last
        nn.Flatten(),
        nn.BatchNorm1d(6, track_running_stats=False, **f),  # no buffers: skipped
        nn.Linear(6, 3, **f),
    )


def make_data(sizes=(8, 5, 7, 3, 6), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for i, n in enumerate(sizes):
        x = torch.randn(n, 3, 5, 5, generator=g, dtype=dtype) * (1 + i) + i
        data.append((x, torch.zeros(n)) if i % 2 else x)  # tensors and (input, target) tuples
    return data


def oracle_inputs(model, data):
    """Each BN layer's inputs, collected with forward hooks on an independent copy in train mode."""
    ref = copy.deepcopy(model).eval()
    bns = {n: m for n, m in ref.named_modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, bnkit.BatchNorm))}
    seen = {n: [] for n in bns}
    for n, m in bns.items():
        m.train()
        m.register_forward_hook(lambda mod, inp, out, n=n: seen[n].append(inp[0].detach().clone()))
    with torch.no_grad():
        for b in data:
            ref(b[0] if isinstance(b, tuple) else b)
    return seen, {n: getattr(m, "axis", 1) for n, m in bns.items()}


def per_channel(x, axis):
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


def test_recalibrate_gives_exact_whole_data_statistics():
    torch.manual_seed(0)
    model = make_model()
    model.train()
    model[3].train()
    # something in the buffers, to see that only running_mean/var change
    with torch.no_grad():
        model(make_data(seed=9)[0])
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    momenta = [getattr(m, "momentum", "-") for m in model.modules()]
    data = make_data()
    seen, axes = oracle_inputs(model, data)

    out = bnkit.recalibrate(model, data)
    assert out is model
    assert [m.training for m in model.modules()] == flags
    assert [getattr(m, "momentum", "-") for m in model.modules()] == momenta
    after = model.state_dict()
    checked = 0
    for name, xs in seen.items():
        m = model.get_submodule(name)
        if m.running_mean is None:
            continue
        allx = per_channel(torch.cat(xs), axes[name])
        var, mean = torch.var_mean(allx, dim=0, correction=1)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.running_var, var, rtol=1e-10, atol=1e-10)
        assert torch.equal(after[f"{name}.num_batches_tracked"], before[f"{name}.num_batches_tracked"])
        checked += 1
    assert checked == 4
    # nothing else changed: parameters, other buffers
    for k, v in before.items():
        if not k.endswith(("running_mean", "running_var")):
            assert torch.equal(after[k], v), k


def test_recalibrate_records_no_autograd_graph():
    """The pass only measures: no graph is recorded (the layers' outputs carry no grad_fn), as for inference."""
    model = nn.Sequential(nn.Linear(3, 4), bnkit.BatchNorm1d(4), nn.Linear(4, 2))
    seen = []
    model[2].register_forward_hook(lambda m, args, out: seen.append((torch.is_grad_enabled(), out.grad_fn)))
    bnkit.recalibrate(model, [torch.randn(8, 3) for _ in range(2)])
    assert seen == [(False, None), (False, None)]


def test_recalibrate_float32_and_num_batches():
    torch.manual_seed(1)
    model = make_model(torch.float32).eval()
    data = make_data(dtype=torch.float32)
    pulled = []

    def stream():
        for i, b in enumerate(data):
            pulled.append(i)
            yield b

    bnkit.recalibrate(model, stream(), num_batches=3)
    assert pulled == [0, 1, 2]
    seen, axes = oracle_inputs(model, data[:3])  # train-mode BN: the running stats do not matter
    for name, xs in seen.items():
        m = model.get_submodule(name)
        if m.running_mean is None:
            continue
        x64 = per_channel(torch.cat(xs), axes[name]).double()
        var, mean = torch.var_mean(x64, dim=0, correction=1)
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.running_var.double(), var, rtol=1e-5, atol=1e-5)
    assert not model.training


def test_paper_estimator():
    torch.manual_seed(2)
    model = make_model()
    data = make_data(sizes=(6, 6, 6, 6))
    seen, axes = oracle_inputs(model, data)
    bnkit.recalibrate(model, data, estimator="paper")
    for name, xs in seen.items():
        m = model.get_submodule(name)
        if m.running_mean is None:
            continue
        per = [per_channel(x, axes[name]) for x in xs]
        mean = torch.stack([p.mean(0) for p in per]).mean(0)
        # m/(m-1) times the average biased variance = the average unbiased variance
        m_count = per[0].shape[0]
        var = torch.stack([p.var(0, correction=0) for p in per]).mean(0) * m_count / (m_count - 1)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.running_var, var, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="estimator"):
        bnkit.recalibrate(model, data, estimator="ema")


def test_recalibrate_restores_on_error_and_skips_frozen():
    model = make_model()
    model.train()
    state = copy.deepcopy(model.state_dict())
    bad = [make_data()[0], torch.randn(2, 7, 5, 5, dtype=torch.float64)]  # wrong channel count
    with pytest.raises(Exception):
        bnkit.recalibrate(model, bad)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    variants = pytest.importorskip("bnkit.variants")
    frozen = nn.Sequential(nn.Linear(3, 3), variants.FrozenBatchNorm1d(3))
    before = copy.deepcopy(frozen.state_dict())
    with pytest.warns(RuntimeWarning, match="no BN layer"):
        bnkit.recalibrate(frozen, [torch.randn(4, 3)])
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in before.items())


def test_recalibrate_per_site_statistics():
    variants = pytest.importorskip("bnkit.variants")
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, dtype=torch.float64)
            self.bn = variants.SharedBatchNorm(4, sites=3, dtype=torch.float64)

        def forward(self, x):
            h = x
            for t in range(3):
                h = torch.tanh(self.bn(self.lin(h), site=t))
            return h

    model = Net()
    data = [torch.randn(n, 4, dtype=torch.float64) + 1 for n in (5, 9, 4)]
    ins = {t: [] for t in range(3)}
    ref = copy.deepcopy(model).train()
    ref.bn.register_forward_pre_hook(lambda m, a, k: ins[k["site"]].append(a[0].clone()), with_kwargs=True)
    with torch.no_grad():
        for x in data:
            ref(x)
    bnkit.recalibrate(model, data)
    for t in range(3):
        var, mean = torch.var_mean(torch.cat(ins[t]), dim=0, correction=1)
        torch.testing.assert_close(model.bn.running_mean[t], mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model.bn.running_var[t], var, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["torch", "bnkit"])
def test_recalibrated_accuracy_beats_large_momentum_ema(kind):
    """Digits, a BN MLP trained briefly with momentum 0.9: the EMA is ~ the last small batch's statistics."""
    from sklearn.datasets import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead on a shared machine
    try:
        _digits_run(kind, load_digits)
    finally:
        torch.set_num_threads(threads)


def _digits_run(kind, load_digits):
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1300], perm[1300:]
    torch.manual_seed(0)
    BN = nn.BatchNorm1d if kind == "torch" else bnkit.BatchNorm1d
    model = nn.Sequential(
        nn.Linear(64, 64), BN(64, momentum=0.9), nn.ReLU(), nn.Linear(64, 64), BN(64, momentum=0.9), nn.ReLU(), nn.Linear(64, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for _ in range(3):
        p = tr[torch.randperm(len(tr))]
        for i in range(0, len(p) - 15, 16):
            idx = p[i : i + 16]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc_ema = (model(X[te]).argmax(1) == y[te]).float().mean().item()
        loader = [(X[tr[i : i + 100]], y[tr[i : i + 100]]) for i in range(0, len(tr), 100)]
        bnkit.recalibrate(model, loader)
        acc_precise = (model(X[te]).argmax(1) == y[te]).float().mean().item()
    assert not model.training
    assert acc_precise >= acc_ema, (acc_precise, acc_ema)
    assert acc_precise > 0.9


def test_recalibrate_and_fuse_bn_family_variants():
    """Ghost BN, Batch Renorm and SyncBN (single process): exact statistics, then a full fold."""
    variants = pytest.importorskip("bnkit.variants")
    sync = pytest.importorskip("bnkit.sync")
    torch.manual_seed(4)
    f = {"dtype": torch.float64}
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, **f),
        variants.GhostBatchNorm2d(4, virtual_batch_size=3, **f),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1, **f),
        variants.BatchRenorm2d(4, **f),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1, **f),
        sync.SyncBatchNorm(4, **f),
    )
    data = [torch.randn(7, 3, 6, 6, **f) * (i + 1) + i for i in range(3)]
    ins = {i: [] for i in (1, 4, 7)}
    ref = copy.deepcopy(model).train()
    for i in ins:
        ref[i].register_forward_pre_hook(lambda m, a, i=i: ins[i].append(a[0].clone()))
    with torch.no_grad():
        for x in data:
            ref(x)
    bnkit.recalibrate(model, data)
    for i, xs in ins.items():
        var, mean = torch.var_mean(torch.cat(xs), dim=(0, 2, 3), correction=1)
        torch.testing.assert_close(model[i].running_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model[i].running_var, var, rtol=1e-10, atol=1e-10)
        assert int(model[i].num_batches_tracked) == 0
    model.eval()
    fused, report = bnkit.fuse(model, report=True)
    assert report.num_fused == 3
    torch.testing.assert_close(fused(data[1]), model(data[1]), rtol=1e-10, atol=1e-10)
