"""From training to inference on sklearn's digits: convert -> train -> recalibrate -> fuse.

    .venv/bin/python examples/deploy.py

A small CNN with torch BN layers is converted to bnkit, trained for a few
epochs with a large BN momentum (so the running averages are ~ the last
batch's statistics), recalibrated with PreciseBN on the training set, and
folded for inference. Prints the test accuracy at each stage, the fuse
report and the max difference between the fused and unfused models.
"""

from __future__ import annotations

import torch
from torch import nn

import bnkit


def load():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    return (X[perm[:1300]], y[perm[:1300]]), (X[perm[1300:]], y[perm[1300:]])


def accuracy(model, X, y) -> float:
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    (Xtr, ytr), (Xte, yte) = load()
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, momentum=0.9), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32, momentum=0.9), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(32, momentum=0.9), nn.Linear(32, 10),
    )
    model = bnkit.convert(model, to="bnkit")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(3):
        perm = torch.randperm(len(Xtr))
        for i in range(0, len(perm) - 15, 16):
            idx = perm[i : i + 16]
            loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    print(f"test accuracy, EMA statistics (momentum 0.9): {accuracy(model, Xte, yte):.4f}")
    loader = [(Xtr[i : i + 128], ytr[i : i + 128]) for i in range(0, len(Xtr), 128)]
    bnkit.recalibrate(model, loader)
    print(f"test accuracy, PreciseBN statistics:         {accuracy(model, Xte, yte):.4f}")
    fused, report = bnkit.fuse(model, report=True)
    print(f"test accuracy, fused model:                  {accuracy(fused, Xte, yte):.4f}")
    with torch.no_grad():
        print(f"max |fused - model| on the test set: {(fused(Xte) - model(Xte)).abs().max().item():.2e}")
    print(report)


if __name__ == "__main__":
    main()
