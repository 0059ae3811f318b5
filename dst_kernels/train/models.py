"""The paper's networks, as plain PyTorch modules (``dst.sparsify`` makes them DST)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

__all__ = ["MODELS", "RowLSTM", "build_model"]


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


class RowLSTM(nn.Module):
    """The paper's MNIST LSTMs: an image read row by row (28 steps of 28 pixels) by an LSTM,
    then a linear classifier on the last step's output. LSTM-a has 128 hidden units,
    LSTM-b 256."""

    def __init__(self, hidden_size: int, row_size: int = 28, num_classes: int = 10, num_layers: int = 1):
        super().__init__()
        self.lstm = nn.LSTM(row_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, C, H, W] -> [N, C*H, W]
        out, _ = self.lstm(rows)
        return self.fc(out[:, -1])


# name -> (builder, input kind it expects: "flat" vectors or "image" tensors)
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "lenet300": (lenet_300_100, "flat"),
    "lenet5": (lenet_5_caffe, "image"),
    "lstm_a": (partial(RowLSTM, 128), "image"),
    "lstm_b": (partial(RowLSTM, 256), "image"),
}


def build_model(name: str) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name][0]()
