"""Experiment settings: the Option type and its checks, the common options, ConfigError and validate_config."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

if TYPE_CHECKING:
    from .registry import Experiment

__all__ = ["ConfigError", "Option", "common_options", "experiment_options", "flag", "validate_config"]


class ConfigError(ValueError):
    """A setting, the output directory or a saved experiment cannot be used; the message says which and why."""



_LIST_KINDS = {"ints": "int", "floats": "float", "strs": "str"}


@dataclass(frozen=True)
class Option:
    """One setting of an experiment: its type, the values it accepts and its help text.

    ``kind`` is ``int | float | str | bool`` or a list of one of the first three (``ints | floats | strs``:
    at least one item, given on the command line as ``0,1,2``), or ``json`` (any JSON value, e.g. a dict
    of per-network settings; given on the command line as JSON). Numbers (and list items) must be finite
    and at least ``low`` (greater than ``low`` with ``low_open``) and at most ``high``; strings must be
    one of ``choices`` when given; ``check`` raises ``ValueError`` for anything else it rejects.
    """
    kind: str
    help: str = ""
    low: Optional[float] = None
    low_open: bool = False
    high: Optional[float] = None
    choices: Optional[Tuple[str, ...]] = None
    unique: bool = False          # lists: no repeated items
    nullable: bool = False        # None (JSON null) is allowed: "use the built-in choice"
    check: Optional[Callable[[Any], None]] = None

    @property
    def item_kind(self) -> str:
        return _LIST_KINDS.get(self.kind, self.kind)

    def _scalar_text(self, s: str):
        k = self.item_kind
        if k == "int":
            try:
                return int(s)
            except ValueError:
                raise ValueError(f"expected an integer, got {s!r}") from None
        if k == "float":
            try:
                return float(s)
            except ValueError:
                raise ValueError(f"expected a number, got {s!r}") from None
        return s

    def parse(self, text: str):
        """A command-line string to a checked value; raises ``ValueError`` with the reason."""
        if self.kind == "json":
            try:
                return self.validate(json.loads(text))
            except json.JSONDecodeError:
                return self.validate(text)  # a plain string
        if self.nullable and text.strip().lower() in ("none", "null"):
            return None
        if self.kind in _LIST_KINDS and text.strip().startswith("["):  # a JSON list, e.g. [0.1, 1, 10]
            try:
                return self.validate(json.loads(text))
            except json.JSONDecodeError as e:
                raise ValueError(f"expected a JSON list or comma-separated values, got {text!r} ({e})") from None
        if self.kind in _LIST_KINDS:
            parts = text.split(",")
            if len(parts) > 1 and any(not part.strip() for part in parts):  # "100,,100": a value left out?
                raise ValueError(f"expected comma-separated values, got an empty one in {text!r}")
            items = text.replace(",", " ").split()
            if not items:
                raise ValueError(f"expected a comma-separated list of at least one value, got {text!r}")
            return self.validate([self._scalar_text(x) for x in items])
        if self.kind == "bool":
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {text!r}")
        return self.validate(self._scalar_text(text))

    def _bounds(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return " and ".join(parts)

    def _scalar(self, v):
        k = self.item_kind
        if k in ("int", "float"):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"expected {'an integer' if k == 'int' else 'a number'}, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"expected a finite number, got {v!r}")
            if k == "int":
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError(f"expected an integer, got {v!r}")
                v = int(v)
            else:
                v = float(v)
            bad = ((self.low is not None and (v <= self.low if self.low_open else v < self.low)) or
                   (self.high is not None and v > self.high))
            if bad:
                what = "an integer" if k == "int" else "a number"
                raise ValueError(f"expected {what} {self._bounds()}, got {v:g}")
            return v
        if k == "bool":
            if not isinstance(v, bool):
                raise ValueError(f"expected true or false, got {v!r}")
            return v
        if not isinstance(v, str):
            raise ValueError(f"expected a string, got {v!r}")
        if self.choices is not None and v not in self.choices:
            raise ValueError(f"unknown value {v!r}; choose from {', '.join(self.choices)}")
        return v

    def validate(self, v):
        """A value (from the command line, an override or ``config.json``) checked and normalized
        (tuples to lists, integral floats to ints); raises ``ValueError`` with the reason."""
        if v is None:
            if self.nullable:
                return None
            raise ValueError("a value is required")
        if self.kind == "json":
            out = v
        elif self.kind in _LIST_KINDS:
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
                raise ValueError(f"expected a list, got {v!r}")
            if not v:
                raise ValueError("expected at least one value, got an empty list")
            out = [self._scalar(x) for x in v]
            if self.unique and len(set(out)) != len(out):
                dup = sorted({x for x in out if out.count(x) > 1}, key=str)
                raise ValueError(f"repeated value(s) {', '.join(map(str, dup))}")
        else:
            out = self._scalar(v)
        if self.check is not None:
            self.check(out)
        return out

    def describe_default(self, default) -> str:
        if default is None:
            return "none"
        if isinstance(default, bool):
            return "on" if default else "off"
        if self.kind == "json":
            return json.dumps(default)
        if isinstance(default, (list, tuple)):
            return ",".join(str(x) for x in default)
        return str(default)


def _check_init(v: str) -> None:
    if v == "default":
        return
    if v.startswith("normal:"):
        try:
            std = float(v.split(":", 1)[1])
        except ValueError:
            std = float("nan")
        if math.isfinite(std) and std > 0:
            return
    raise ValueError(f"expected 'default' or 'normal:STD' with STD > 0, got {v!r}")


def common_options() -> Dict[str, Option]:
    """The settings shared by the experiments (an experiment offers those in its ``DEFAULTS``)."""
    from .data import DATASETS
    from .models import _ACTS, NORMS
    return {
        "data": Option("str", "dataset (see `bnkit list`)", choices=tuple(DATASETS)),
        "data_dir": Option("str", "directory with the dataset files (default: $BNKIT_DATA)", nullable=True),
        "steps": Option("int", "training steps per run", low=1),
        "lr": Option("float", "learning rate", low=0, low_open=True),
        "batch_size": Option("int", "mini-batch size (at most the training set's size)", low=1),
        "optimizer": Option("str", "optimizer", choices=("sgd", "momentum", "adam")),
        "init": Option("str", "weight init: default | normal:STD", check=_check_init),
        "seeds": Option("ints", "seeds, comma-separated (--seed S: one seed)", low=0, unique=True),
        "eval_every": Option("int", "evaluate every K steps", low=1),
        "threshold": Option("float", "accuracy threshold for steps-to-threshold", low=0, low_open=True, high=1),
        "thresholds": Option("floats", "further accuracy thresholds reported in the tables", low=0,
                             low_open=True, high=1, unique=True),
        "binarize": Option("bool", "binarize pixels at 0.5"),
        "normalize": Option("str", "input scaling", choices=("none", "unit", "center", "standard")),
        "norm": Option("str", "norm of the normalized network", choices=tuple(NORMS)),
        "norms": Option("strs", "norms to compare, comma-separated", choices=tuple(NORMS), unique=True),
        "arch": Option("str", "network", choices=("mlp", "cnn")),
        "hidden": Option("ints", "hidden layer widths of the MLP, comma-separated", low=1),
        "activation": Option("str", "activation (none: the network's own)", choices=tuple(_ACTS), nullable=True),
        "probe_size": Option("int", "test examples in the fixed probe batch", low=2),
        "skip_evals": Option("int", "evaluations (from step 0) ignored by the BN-ahead check", low=0),
        "threads": Option("int", "torch threads", low=1),
    }


def _inferred(default) -> Option:
    """The option of a setting that has no description, from its default value: its kind, and a
    non-negative default stays non-negative (an experiment declares stricter checks in ``OPTIONS``)."""
    def bound(x):
        return {"low": 0} if x >= 0 else {}
    if isinstance(default, bool):
        return Option("bool")
    if isinstance(default, int):
        return Option("int", **bound(default))
    if isinstance(default, float):
        return Option("float", **bound(default))
    if isinstance(default, str):
        return Option("str")
    if isinstance(default, (list, tuple)) and default:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in default):
            return Option("ints", **bound(min(default)))
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in default):
            return Option("floats", **bound(min(default)))
        if all(isinstance(x, str) for x in default):
            return Option("strs")
    return Option("json", nullable=default is None)  # None, a dict, an empty or mixed list


def experiment_options(exp: Experiment) -> Dict[str, Option]:
    """The settings of ``exp`` (its ``DEFAULTS`` keys, in order) with their checks.

    A setting described in :func:`common_options` uses that description, made nullable when its default
    is None; when the experiment's default lies outside it (``steps: 0`` for an experiment that does not
    train, an architecture of its own), the option is inferred from the default instead, keeping the
    help. ``OPTIONS`` of the experiment module then overrides any field.
    """
    mod = exp.load()
    common = common_options()
    extra = getattr(mod, "OPTIONS", {}) or {}
    out = {}
    for key, default in mod.DEFAULTS.items():
        opt = common.get(key)
        if opt is None:
            opt = _inferred(default)
        elif default is None:
            opt = dataclasses.replace(opt, nullable=True)
        else:
            try:
                opt.validate(default)
            except ValueError:
                opt = dataclasses.replace(_inferred(default), help=opt.help)
        if key in extra:
            kw = dict(extra[key])
            if kw.get("choices") is not None:
                kw["choices"] = tuple(kw["choices"])
            opt = dataclasses.replace(opt, **kw)
        out[key] = opt
    return out


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def validate_config(exp: Experiment, cfg: Dict, *, where: str = "") -> Dict:
    """``cfg`` checked against the experiment's options: every setting known and valid (a ``ConfigError``
    naming the first bad one otherwise); returns the normalized copy. ``where`` prefixes the message
    (e.g. the path of a saved config)."""
    opts = experiment_options(exp)
    pre = f"{where}: " if where else ""
    unknown = [k for k in cfg if k not in opts]
    if unknown:
        raise ConfigError(f"{pre}experiment {exp.name} has no setting(s) {', '.join(map(repr, unknown))}; "
                          f"its settings: {', '.join(opts)}")
    out = {}
    for k, opt in opts.items():
        if k not in cfg:
            raise ConfigError(f"{pre}setting {k!r} is missing")
        try:
            out[k] = opt.validate(cfg[k])
        except ValueError as e:
            raise ConfigError(f"{pre}{flag(k) if not where else repr(k)}: {e}") from None
    return out

