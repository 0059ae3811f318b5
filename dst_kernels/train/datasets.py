"""The data sets ``dst-train --dataset`` knows, by name (the loaders are in ``data.py`` and
``imagenet.py``)."""

from __future__ import annotations

from collections.abc import Callable

from dst_kernels.train.data import DataSource, load_cifar10, load_mnist, load_mnist5k
from dst_kernels.train.imagenet import load_imagenet

__all__ = ["DATASETS", "load_dataset"]


def _preprocess(args) -> str:
    return getattr(args, "preprocess", "normalise")  # absent from checkpoints of older runs


def _load_imagenet(args) -> DataSource:
    return load_imagenet(args.data_dir)


DATASETS: dict[str, Callable[..., DataSource]] = {
    "mnist5k": lambda args: load_mnist5k(seed=args.seed, preprocess=_preprocess(args)),
    "mnist": lambda args: load_mnist(args.data_dir, preprocess=_preprocess(args)),
    "cifar10": lambda args: load_cifar10(args.data_dir),
    "imagenet": _load_imagenet,
}


def load_dataset(name: str, args) -> DataSource:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](args)
