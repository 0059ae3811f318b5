"""``DSTConv2d``: ``nn.Conv2d`` with a trainable threshold per output channel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dst_kernels import functional as DF
from dst_kernels.nn.base import DSTLayer, _outside_read_attribute

__all__ = ["DSTConv2d"]


class DSTConv2d(DSTLayer, nn.Conv2d):
    """``nn.Conv2d`` with a trainable threshold per output channel (docs/maths.md section 3)."""

    _dst_base = nn.Conv2d
    weight = _outside_read_attribute("weight")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        min_density: float | None = 0.01,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_dst(min_density, backend)
        self.threshold = self._new_threshold(self._parameters["weight"])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x, weight, padding = input, self._parameters["weight"], self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if x.numel() == 0:  # an empty batch: nn.Conv2d's answer's shape (the ops reject empty x)
            p = DF.masked_weight(
                weight, self.threshold, backend=self.backend, min_density=self._reset_bound()
            )
            return F.conv2d(x, p, self.bias, self.stride, padding, self.dilation, self.groups)
        return DF.dst_conv2d(
            x,
            weight,
            self.threshold,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            backend=self.backend,
            min_density=self._reset_bound(),
        )

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, min_density=0.01, backend="auto") -> DSTConv2d:
        w = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            min_density=min_density,
            backend=backend,
            device=w.device,
            dtype=w.dtype,
        )
        layer.load_state_dict(conv.state_dict())
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            layer.to(memory_format=torch.channels_last)
        layer.train(conv.training)
        return layer
