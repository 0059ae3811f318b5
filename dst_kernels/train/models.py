"""The paper's networks, as plain PyTorch modules (``dst.sparsify`` makes them DST)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "ModelSpec",
    "ResNet50",
    "RowLSTM",
    "VGG16",
    "WideResNet",
    "build_model",
    "count_parameters",
    "input_problem",
]


def lenet_300_100(num_classes: int = 10, in_features: int = 784) -> nn.Module:
    """LeNet-300-100: a 784-300-100-10 MLP with ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet_5_caffe(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
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
    then a linear classifier on the last step's output. LSTM-a has two layers of 128 hidden
    units, LSTM-b two of 256."""

    def __init__(self, hidden_size: int, row_size: int = 28, num_classes: int = 10, num_layers: int = 1):
        super().__init__()
        self.lstm = nn.LSTM(row_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, C, H, W] -> [N, C*H, W]
        out, _ = self.lstm(rows)
        return self.fc(out[:, -1])


# ----------------------------------------------------------------------------- CIFAR-10

# The official DST code's CIFAR VGG-16 (``cifar/models/masked_vgg.py``, depth 16): 13 conv
# 3x3 (no bias) + BatchNorm + ReLU, max-pool after blocks 1-4, a 2x2 average pool, then
# Linear(512, 512) + BatchNorm1d + ReLU + Linear(512, classes).
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG16(nn.Module):
    """The CIFAR VGG-16 of the paper's official code; every conv and linear layer is masked
    by ``dst.sparsify``. Needs 32x32 inputs (the classifier takes 512 features)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                in_channels = v
        self.feature = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, num_classes)
        )
        for m in self.modules():  # the official code starts BatchNorm2d scales at 0.5
            if isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.feature(x), 2)
        return self.classifier(torch.flatten(x, 1))

    def compact_chain(self) -> list[tuple[str, nn.Module]]:
        """The forward as a chain, for ``dst_kernels.export.compact``."""
        return [
            ("feature", self.feature),
            ("forward: avg_pool2d(2)", nn.AvgPool2d(2)),
            ("forward: flatten(1)", nn.Flatten()),
            ("classifier", self.classifier),
        ]


class _WideBasic(nn.Module):
    """Pre-activation basic block of the official code's WideResNet (dropout 0)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        if not self.equal_in_out:  # the shortcut also starts from the activated input
            x = out
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + (x if self.convShortcut is None else self.convShortcut(x))


class WideResNet(nn.Module):
    """WideResNet-depth-k for 32x32 inputs, as the official DST code (``masked_wideresnet.py``):
    pre-activation basic blocks, widths 16, 16k, 32k, 64k, dropout 0, an 8x8 average pool and
    a Linear classifier with bias. Every conv and the classifier are masked by ``dst.sparsify``."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for i, stride in enumerate((1, 2, 2)):
            layer = [
                _WideBasic(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1)
                for j in range(n)
            ]
            blocks.append(nn.Sequential(*layer))
        self.block1, self.block2, self.block3 = blocks
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(torch.flatten(out, 1))


# ----------------------------------------------------------------------------- ImageNet


class _Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (ResNet v1.5: the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision's ``resnet50()`` written in plain PyTorch (same module names, shapes and
    initialisation, so its state dicts load either way): 25,557,032 parameters with 1000
    classes. Every conv and the fc are masked by ``dst.sparsify``."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, 2)
        self.layer3 = self._make_layer(256, 6, 2)
        self.layer4 = self._make_layer(512, 3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * 4, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        layers = [_Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [_Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and what input it takes.

    ``channels``: input channels; ``size``: the exact (H, W) it needs, or None for any size
    of at least ``min_size``; ``exclude``: name patterns ``dst.sparsify`` leaves dense.
    """

    builder: Callable[..., nn.Module]
    channels: int
    size: tuple[int, int] | None
    min_size: int = 1
    exclude: tuple[str, ...] = field(default=())
    family: str = ""


MODELS: dict[str, ModelSpec] = {
    "lenet300": ModelSpec(lenet_300_100, 1, (28, 28), family="MNIST"),
    "lenet5": ModelSpec(lenet_5_caffe, 1, (28, 28), family="MNIST"),
    # docs/maths.md section 1: the LSTMs' gate matrices are masked, the final classifier is dense.
    # docs/maths.md section 1 and the official mnist_lstm/model/lstm.py: two stacked LSTM layers.
    "lstm_a": ModelSpec(partial(RowLSTM, 128, num_layers=2), 1, (28, 28), exclude=("fc",), family="MNIST"),
    "lstm_b": ModelSpec(partial(RowLSTM, 256, num_layers=2), 1, (28, 28), exclude=("fc",), family="MNIST"),
    "vgg16": ModelSpec(VGG16, 3, (32, 32), family="CIFAR"),
    "wrn16_8": ModelSpec(partial(WideResNet, 16, 8), 3, (32, 32), family="CIFAR"),
    "wrn28_10": ModelSpec(partial(WideResNet, 28, 10), 3, (32, 32), family="CIFAR"),
    "resnet50": ModelSpec(ResNet50, 3, None, min_size=32, family="ImageNet"),
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name].builder(num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, DST thresholds excluded."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad and "threshold" not in n.split(".")[-1]
    )


def input_problem(name: str, shape: tuple[int, int, int]) -> str | None:
    """Why model ``name`` cannot take images of ``shape`` (C, H, W), or None when it can."""
    spec = MODELS[name]
    c, h, w = shape
    fits = c == spec.channels and (
        (h, w) == spec.size if spec.size is not None else min(h, w) >= spec.min_size
    )
    if fits:
        return None
    want = (
        f"{spec.channels}x{spec.size[0]}x{spec.size[1]}"
        if spec.size is not None
        else f"{spec.channels}xHxW (H, W >= {spec.min_size})"
    )
    return f"--model {name} takes {want} images ({spec.family})"
