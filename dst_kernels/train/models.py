"""The paper's networks, as plain PyTorch modules (``dst.sparsify`` makes them DST)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["MODELS", "build_model"]


def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """LeNet-300-100: a 784-300-100-10 MLP with ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet_5_caffe(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """LeNet-5-Caffe: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10 (28x28 inputs)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * 4 * 4, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )


# name -> (builder, input kind it expects: "flat" vectors or "image" tensors)
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "lenet300": (lenet_300_100, "flat"),
    "lenet5": (lenet_5_caffe, "image"),
}


def build_model(name: str) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name][0]()
