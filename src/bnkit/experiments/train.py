"""Training loop: SGD (or momentum/Adam) on in-memory tensors, periodic evaluation and probing, a JSON-lines
metrics stream and atomic checkpoints from which an interrupted run resumes bit-for-bit.

Determinism and resume: the model is initialised from the run's seed (:func:`models.init_weights`); the
data order is a pure function of (seed, epoch) -- epoch ``e`` visits ``randperm(N)`` drawn from a generator
seeded by ``seed`` and ``e``, in batches of ``batch_size`` (the last partial batch is dropped) -- so
the position in the data is a function of the step alone. A checkpoint holds the model, the optimizer,
the step, the loss accumulators, the evaluation history and torch's global RNG state; it is written to
a temporary file, flushed to disk (``fsync``) and moved into place with ``os.replace`` (then the directory
is synced), so a crash never leaves a half-written one; :func:`remove_stale_temp_files` deletes the
temporary files of writes that a crash interrupted. An unreadable checkpoint or run result raises
:class:`CheckpointError` (which names the file) instead of resuming from it.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field  # noqa: F401  (field: RunConfig defaults)
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import (_STATE_KEYS, _TMP, CheckpointError, _atomic_write, _damaged,  # noqa: F401  (re-exported)
                          _filter_jsonl, _fsync_dir, _pid_alive, _read_checkpoint, _read_result, _tmp_path,
                          append_jsonl, atomic_save, atomic_save_npy, strict_json, atomic_write_bytes,
                          atomic_write_text, check_resumable, percentiles_ok, remove_stale_temp_files)
from .data import Dataset
from .diagnostics import drift, all_unit_drifts, probe_percentiles, typical_unit
from .extension import RunExtension, make_extension
from .models import build_model

__all__ = ["RunConfig", "RunExtension", "make_extension", "RunInterrupted", "CheckpointError", "StepBudget", "train_run", "atomic_save",
           "atomic_write_text", "remove_stale_temp_files", "check_resumable", "make_optimizer", "make_model",
           "check_run",
           "steps_to_threshold", "eval_steps"]


@dataclass
class RunConfig:
    name: str                       # unique within the experiment, e.g. "bn-s0"
    norm: str = "none"
    seed: int = 0
    variant: str = ""               # label used by summaries ("bn", "baseline", ...); defaults to norm
    arch: str = "mlp"
    hidden: Sequence[int] = (100, 100, 100)
    activation: str = "sigmoid"
    init: str = "default"
    steps: int = 1000
    batch_size: int = 60
    lr: float = 0.5
    optimizer: str = "sgd"          # sgd | momentum | adam
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 100
    probe_size: int = 600           # the first probe_size test examples form the fixed probe batch
    probe_layer: int = -1           # index of the hidden block whose activation input is probed
    thresholds: Sequence[float] = (0.9,)
    # model options for the experiments' extra nets (bnkit.experiments.nets: dropout, init gain, channels,
    # norm keyword arguments, ...); empty: the plain MLP / SmallCNN of models.build_model
    options: Dict[str, Any] = field(default_factory=dict)
    # "raise": a non-finite loss is an error; "stop": the run ends there and records where it diverged
    # (learning-rate and initialization sweeps expect some arms to diverge)
    on_diverge: str = "raise"
    # > 0: also evaluate (eval mode) on the first train_eval_size training examples at every evaluation
    train_eval_size: int = 0
    # > 0: train on the first train_subset training examples only (a small training set, to show overfitting)
    train_subset: int = 0
    # "package.module:Class" of a RunExtension that customises this run (batch order, trainable parameters,
    # the training step, extra measurements), built as Class(**extension_options); "" for plain training
    extension: str = ""
    extension_options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.variant = self.variant or self.norm
        self.hidden = tuple(int(h) for h in self.hidden)
        self.thresholds = tuple(float(t) for t in self.thresholds)


class RunInterrupted(Exception):
    """Training stopped early (Ctrl-C or a step budget); a checkpoint for ``--resume`` has been written."""

    def __init__(self, msg: str, run: str, step: int):
        super().__init__(msg)
        self.run, self.step = run, step


class StepBudget:
    """Stop after ``n`` training steps in this process (shared across runs; used to test ``--resume``), or
    as soon as ``stop()`` says so (a parallel executor's stop signal)."""

    def __init__(self, n: Optional[int], stop: Optional[Callable[[], bool]] = None):
        self.left, self.stop = n, stop

    def take(self) -> bool:
        if self.stop is not None and self.stop():
            return False
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def eval_steps(steps: int, every: int) -> List[int]:
    every = max(1, int(every))
    s = list(range(0, steps + 1, every))
    if s[-1] != steps:
        s.append(steps)
    return s


def steps_to_threshold(steps: Sequence[int], acc: Sequence[float], thr: float) -> Optional[int]:
    for s, a in zip(steps, acc):
        if a >= thr:
            return int(s)
    return None


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed + 1) * 7_919_993 + epoch)
    return torch.randperm(n, generator=g)


class _Batches:
    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the training set ({n})")
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        e, i = divmod(step, self.per_epoch)
        if e != self._epoch:
            self._epoch, self._perm = e, _epoch_perm(self.n, self.seed, e)
        return self._perm[i * self.bs:(i + 1) * self.bs]


def make_optimizer(cfg: RunConfig, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (sgd|momentum|adam)")


_make_optimizer = make_optimizer  # the former private name


@torch.no_grad()
def evaluate(model, x, y, batch: int = 2000):
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch]).sum())
    model.train(was)
    return correct / len(y), loss / len(y)


class NullProgress:
    def start(self, name: str, total: int, completed: int = 0): ...
    def update(self, name: str, step: int, **info): ...
    def finish(self, name: str): ...


def make_model(cfg: RunConfig, data: Dataset) -> torch.nn.Module:
    """The run's initial model (seeded): the one place that maps a RunConfig to a network."""
    if cfg.options or cfg.arch not in ("mlp", "cnn"):
        from .nets import build_net
        return build_net(cfg, data.input_shape, data.num_classes)
    return build_model(cfg.arch, cfg.norm, input_shape=data.input_shape, num_classes=data.num_classes,
                       hidden=cfg.hidden, activation=cfg.activation, init=cfg.init, seed=cfg.seed)


def _train_tensors(cfg: RunConfig, data: Dataset):
    """The examples the run trains on."""
    if cfg.train_subset > 0:
        return data.x_train[:cfg.train_subset], data.y_train[:cfg.train_subset]
    return data.x_train, data.y_train


def check_run(cfg: RunConfig, data: Dataset) -> None:
    """Everything a run needs, tried before anything is written: the model, the optimizer, the batch
    schedule and one training-mode forward of one batch (on a throwaway model; no global state changes).
    Raises what training would raise (``ValueError``, ``RuntimeError``, ...)."""
    ext = make_extension(cfg)
    model = ext.prepare(make_model(cfg, data), cfg, data)
    make_optimizer(cfg, ext.parameters(model))
    x_tr, y_tr = _train_tensors(cfg, data)
    batches = _Batches(len(y_tr), cfg.batch_size, cfg.seed)
    model.train()
    with torch.no_grad():
        model(x_tr[ext.batch_indices(0, batches.indices(0), y_tr)])


def train_run(cfg: RunConfig, data: Dataset, out_dir: Path, *, resume: bool = False, progress=None,
              budget: Optional[StepBudget] = None, jsonl: Optional[Path] = None, monitor=None) -> Dict:
    """Train one run; returns its result dict (also written to ``out_dir/runs/<name>.json``).

    ``monitor`` (optional, e.g. :class:`.tblog.TensorBoardMonitor`) is called as ``start(cfg, step)``,
    ``on_eval(step, model, record)`` after every evaluation and ``finish(result)`` at the end.
    """
    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    result_path = out_dir / "runs" / f"{cfg.name}.json"
    ckpt_path = out_dir / "checkpoints" / f"{cfg.name}.pt"
    jsonl = Path(jsonl) if jsonl is not None else out_dir / "metrics.jsonl"
    progress = progress or NullProgress()
    budget = budget or StepBudget(None)

    if resume and result_path.exists():
        res = _read_result(cfg, result_path)
        if percentiles_ok(cfg, out_dir, res):
            progress.start(cfg.name, cfg.steps, cfg.steps)
            progress.finish(cfg.name)
            return res
        # else its probe series is damaged: train the run again (from its last checkpoint), same result

    ext = make_extension(cfg)
    model = ext.prepare(make_model(cfg, data), cfg, data)
    model.train()
    opt = make_optimizer(cfg, ext.parameters(model))
    probe_x = data.x_test[: cfg.probe_size]
    probe_mod = [b for b in model.blocks if hasattr(b, "act")][cfg.probe_layer].act
    schedule = eval_steps(cfg.steps, cfg.eval_every)

    state = {"step": 0, "hist": {"steps": [], "test_acc": [], "test_loss": [], "train_loss": []},
             "pct": [], "loss_sum": 0.0, "loss_n": 0, "ema": None, "train_seconds": 0.0, "interval_ms": [],
             "extra": {}, "step_records": []}
    if cfg.train_eval_size > 0:
        state["hist"].update(train_acc=[], train_eval_loss=[])
    ck = _read_checkpoint(cfg, ckpt_path) if resume and ckpt_path.exists() else None
    if ck is not None:
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            torch.set_rng_state(ck["torch_rng"])
            ext.load_state_dict(ck.get("extension", {}))
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(_damaged(ckpt_path, cfg.name, e)) from None
        state = ck["state"]
        state.setdefault("extra", {})
        state.setdefault("step_records", [])
        _filter_jsonl(jsonl, cfg.name, state["step"])
    else:
        torch.manual_seed(cfg.seed)
        _filter_jsonl(jsonl, cfg.name, None)

    def checkpoint():
        atomic_save({"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "torch_rng": torch.get_rng_state(), "state": state, "extension": ext.state_dict()}, ckpt_path)

    def do_eval(step):
        acc, tloss = evaluate(model, data.x_test, data.y_test)
        pct = probe_percentiles(model, probe_mod, probe_x).float().numpy()
        tr = state["loss_sum"] / state["loss_n"] if state["loss_n"] else None
        h = state["hist"]
        h["steps"].append(step); h["test_acc"].append(acc); h["test_loss"].append(tloss); h["train_loss"].append(tr)
        if cfg.train_eval_size > 0:
            tr_acc, tr_loss = evaluate(model, data.x_train[:cfg.train_eval_size], data.y_train[:cfg.train_eval_size])
            h["train_acc"].append(tr_acc); h["train_eval_loss"].append(tr_loss)
        state["pct"].append(pct)
        extra = {k: float(v) for k, v in ext.on_eval(model, step, data).items()}
        for k, v in extra.items():
            state["extra"].setdefault(k, []).append(v)
        state["loss_sum"], state["loss_n"] = 0.0, 0
        rec = {"run": cfg.name, "variant": cfg.variant, "seed": cfg.seed, "step": step, "test_acc": acc,
               "test_loss": tloss, "train_loss": tr,
               "p50_units_median": float(np.median(pct[1])), "p15_85_spread_mean": float(np.mean(pct[2] - pct[0])),
               **extra}
        append_jsonl(jsonl, rec)
        if monitor is not None:
            monitor.on_eval(step, model, rec)
        progress.update(cfg.name, step, loss=state["ema"], acc=acc)

    x_tr, y_tr = _train_tensors(cfg, data)
    batches = _Batches(len(y_tr), cfg.batch_size, cfg.seed)
    next_eval = [s for s in schedule if s >= state["step"] and s not in state["hist"]["steps"]]
    progress.start(cfg.name, cfg.steps, state["step"])
    if monitor is not None:
        monitor.start(cfg, state["step"])
    if state["step"] == 0 and not state["hist"]["steps"]:
        do_eval(0)
        checkpoint()
        next_eval = next_eval[1:] if next_eval and next_eval[0] == 0 else next_eval
    ei = 0
    step = state["step"]
    try:
        t_acc = 0.0
        while step < cfg.steps:
            if not budget.take():
                raise RunInterrupted(f"step budget exhausted in run {cfg.name} at step {step}", cfg.name, step)
            t0 = time.perf_counter()
            idx = ext.batch_indices(step, batches.indices(step), y_tr)
            loss = ext.train_step(model, x_tr[idx], y_tr[idx], opt)
            t_acc += time.perf_counter() - t0
            lv = loss.item() if torch.is_tensor(loss) else float(loss)
            if not math.isfinite(lv) and cfg.on_diverge == "stop":
                # the step has already written non-finite weights: evaluate that model (it predicts
                # garbage) and end the run here
                step += 1
                state["step"] = step
                state["diverged_at"] = step
                state["train_seconds"] += t_acc
                t_acc = 0.0
                do_eval(step)
                break
            if not math.isfinite(lv):
                raise FloatingPointError(f"run {cfg.name}: loss became {lv} at step {step}; lower --lr")
            step += 1
            state["step"] = step
            rec = ext.after_step(model, step, x_tr[idx], y_tr[idx], opt)
            if rec:
                state["step_records"].append({"step": step, **{k: float(v) for k, v in rec.items()}})
            state["loss_sum"] += lv
            state["loss_n"] += 1
            state["ema"] = lv if state["ema"] is None else 0.98 * state["ema"] + 0.02 * lv
            if ei < len(next_eval) and step == next_eval[ei]:
                ei += 1
                state["train_seconds"] += t_acc
                if state["loss_n"] >= 10:
                    state["interval_ms"].append(1000 * t_acc / state["loss_n"])
                t_acc = 0.0
                do_eval(step)
                checkpoint()
            elif step % 25 == 0:
                progress.update(cfg.name, step, loss=state["ema"])
        state["train_seconds"] += t_acc
    except RunInterrupted:
        # raised between steps, so the state is consistent: checkpoint exactly here
        state["train_seconds"] += t_acc
        checkpoint()
        raise
    except KeyboardInterrupt:
        # Ctrl-C may land in the middle of an optimizer step: keep the last (evaluation-time) checkpoint
        raise RunInterrupted(f"interrupted in run {cfg.name} at step {step}; the last checkpoint is from "
                             f"the last evaluation", cfg.name, step) from None
    progress.finish(cfg.name)

    text = strict_json(_result(cfg, state), indent=1)  # NaN/Infinity of a diverged run: null
    res = json.loads(text)  # the same plain-JSON form whether a run was just trained or read back on resume
    if monitor is not None:
        monitor.finish(res)
    # the result last: its presence is what marks the run finished on --resume
    atomic_save_npy(out_dir / "runs" / f"{cfg.name}-percentiles.npy", np.stack(state["pct"]))
    atomic_write_text(result_path, text)
    return res


def _result(cfg: RunConfig, state: Dict) -> Dict:
    h = state["hist"]
    series = np.stack(state["pct"])  # (T, 3, units)
    u = typical_unit(series)
    p15, p50, p85 = (series[:, i, u].astype(float).tolist() for i in range(3))
    unit_r = all_unit_drifts(series)
    spreads = (series[:, 2, :] - series[:, 0, :]).mean(0)
    rel_all = unit_r / np.maximum(spreads, 1e-12)
    acc = h["test_acc"]
    n_last = max(1, len(acc) // 10)
    extra = {k: h[k] for k in ("train_acc", "train_eval_loss") if k in h}
    return {
        "name": cfg.name, "variant": cfg.variant, "norm": cfg.norm, "seed": cfg.seed,
        "config": asdict(cfg),
        "steps": h["steps"], "test_acc": acc, "test_loss": h["test_loss"], "train_loss": h["train_loss"],
        **extra, "diverged_at": state.get("diverged_at"),
        "extra": state.get("extra", {}), "step_records": state.get("step_records", []),
        "typical_unit": u, "percentiles": {"p15": p15, "p50": p50, "p85": p85},
        "summary": {
            "final_acc": acc[-1], "best_acc": max(acc), "last10pct_mean_acc": float(np.mean(acc[-n_last:])),
            "steps_to": {f"{t:.2f}": steps_to_threshold(h["steps"], acc, t) for t in cfg.thresholds},
            "drift": drift(p15, p50, p85),
            "drift_all_units": {"median_range": float(np.median(unit_r)), "mean_range": float(np.mean(unit_r)),
                                "median_relative": float(np.median(rel_all))},
        },
        # best: the fastest evaluation interval, i.e. the cost of a step with the least interference from
        # other processes on a shared machine; mean: total training time / steps
        "timing": {"train_seconds": state["train_seconds"],
                   "ms_per_step_mean": 1000 * state["train_seconds"] / max(1, state["step"]),
                   "ms_per_step_median": float(np.median(state["interval_ms"])) if state["interval_ms"] else None,
                   "ms_per_step": (min(state["interval_ms"]) if state["interval_ms"]
                                   else 1000 * state["train_seconds"] / max(1, state["step"]))},
    }
