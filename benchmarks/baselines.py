"""Implementations the fused kernels are measured against.

* ``PaperLinear`` / ``PaperConv2d``: the paper's algorithm as its official code runs
  it in plain PyTorch: a step-function autograd op on ``|W| - t``, and the reset
  rule as a Python branch on a device scalar (``sync=True``: one host round trip
  per layer per forward; ``sync=False``: the same maths with ``torch.where``).
* ``fake_sparsity``: a static mask applied through ``torch.nn.utils.parametrize``,
  as ``torch.ao.pruning`` masks weights today.
* ``IGemmConv2d``: ``DSTConv2d`` on the Triton implicit-GEMM conv
  (``dst_kernels.triton.conv2d_igemm``), a candidate for ``"auto"`` on some shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import dst_kernels as dst


class _BinaryStep(torch.autograd.Function):
    """Forward ``x > 0``; backward the long-tailed estimator, built from masked writes."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x > 0.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ax = x.abs()
        est = 2.0 - 4.0 * ax
        est[ax > 1.0] = 0.0
        est[(ax <= 1.0) & (ax > 0.4)] = 0.4
        return grad * est


class _PaperMasked:
    def _masked_weight(self):
        rows = self.weight.reshape(self.weight.shape[0], -1)
        mask = _BinaryStep.apply(rows.abs() - self.threshold.view(-1, 1))
        if self.training:
            ratio = mask.sum() / mask.numel()
            if self.sync:
                if ratio <= 0.01:  # a Python branch on a device value: a host sync
                    with torch.no_grad():
                        self.threshold.fill_(0.0)
                    mask = _BinaryStep.apply(rows.abs() - self.threshold.view(-1, 1))
            else:
                with torch.no_grad():
                    self.threshold.masked_fill_(ratio <= 0.01, 0.0)
                mask = _BinaryStep.apply(rows.abs() - self.threshold.view(-1, 1))
        return self.weight * mask.reshape(self.weight.shape)


class PaperLinear(_PaperMasked, nn.Linear):
    def __init__(self, *args, sync: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.sync = sync
        self.threshold = nn.Parameter(torch.zeros(self.out_features, device=self.weight.device))

    def forward(self, x):
        return F.linear(x, self._masked_weight(), self.bias)


class PaperConv2d(_PaperMasked, nn.Conv2d):
    def __init__(self, *args, sync: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.sync = sync
        self.threshold = nn.Parameter(torch.zeros(self.out_channels, device=self.weight.device))

    def forward(self, x):
        return self._conv_forward(x, self._masked_weight(), self.bias)


class _FakeSparsity(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight):
        return weight * self.mask


def fake_sparsity(layer: nn.Module, density: float = 0.1) -> nn.Module:
    """``layer`` with a static random mask keeping ``density`` of its weight, via parametrize."""
    w = layer.weight
    mask = (torch.rand(w.shape, device=w.device) < density).to(w.dtype)
    parametrize.register_parametrization(layer, "weight", _FakeSparsity(mask))
    return layer


class IGemmConv2d(dst.DSTConv2d):
    """A DSTConv2d whose forward is the Triton implicit-GEMM conv (integer padding, zeros mode)."""

    def forward(self, x):
        from dst_kernels.triton import conv2d_igemm

        return conv2d_igemm(
            x,
            self.weight,
            self.threshold,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            min_density=self._reset_bound(),
        )
