"""The ``native`` backend: the fused C++ / CUDA ops of ``dst_kernels._C``.

``dst_mask`` writes the masked weight (and applies the reset rule on the device);
autograd recomputes the mask in backward from ``W`` and the effective thresholds
inside ``dst_weight_grad``, so neither the mask nor ``P`` is saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dst_kernels import _ops  # noqa: F401  (registers fake kernels and autograd)

__all__ = ["masked_weight", "linear", "conv2d"]


def masked_weight(weight, threshold, min_density=None):
    """``P = W * M``; with ``min_density`` set, the reset rule first (``threshold`` updated in place)."""
    masked, t_eff = torch.ops.dst_kernels.dst_mask(weight, threshold, min_density)
    if min_density is not None:
        with torch.no_grad():
            threshold.copy_(t_eff)
    return masked


def linear(x, weight, threshold, bias=None, min_density=None):
    if x.dtype != weight.dtype or torch.is_autocast_enabled(x.device.type):
        # Mixed precision: autocast casts P for the GEMM.
        return F.linear(x, masked_weight(weight, threshold, min_density), bias)
    y, _, t_eff = torch.ops.dst_kernels.dst_linear(x, weight, threshold, bias, min_density)
    if min_density is not None:
        with torch.no_grad():
            threshold.copy_(t_eff)
    return y


def conv2d(x, weight, threshold, bias, stride, padding, dilation, groups, min_density=None):
    masked = masked_weight(weight, threshold, min_density)
    return F.conv2d(x, masked, bias, stride, padding, dilation, groups)
