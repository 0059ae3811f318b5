"""The ``native`` backend: the fused C++ / CUDA ops of ``dst_kernels._C``.

``dst_mask`` writes the masked weight (and applies the reset rule on the device);
autograd recomputes the mask in backward from ``W`` and the effective thresholds
inside ``dst_weight_grad``, so the mask is never saved, and ``P`` only by the CPU
``dst_linear`` while ``dX`` needs it (``csrc/autograd.cpp``).
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
    return linear_op(x, weight, threshold, bias, min_density)


def linear_op(x, weight, threshold, bias=None, min_density=None):
    """The ``dst_linear`` op for one dtype and no autocast (what :func:`linear` calls then);
    with ``min_density`` set, the effective thresholds written back."""
    y, _, t_eff = torch.ops.dst_kernels.dst_linear.default(x, weight, threshold, bias, min_density)
    if min_density is not None:
        with torch.no_grad():
            threshold.copy_(t_eff)
    return y


def _explicit_padding(padding, weight, dilation):
    """``padding`` as a pair of ints, or None when "same" needs uneven padding."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        spans = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
        if any(s % 2 for s in spans):
            return None
        return (spans[0] // 2, spans[1] // 2)
    return tuple(padding)


def conv2d(x, weight, threshold, bias, stride, padding, dilation, groups, min_density=None):
    pad = _explicit_padding(padding, weight, dilation)
    if pad is None or x.dtype != weight.dtype or torch.is_autocast_enabled(x.device.type):
        # Uneven "same" padding or mixed precision: the mask op, then ATen's conv2d.
        masked = masked_weight(weight, threshold, min_density)
        return F.conv2d(x, masked, bias, stride, padding, dilation, groups)
    batched = x.dim() == 4
    y, _, t_eff = torch.ops.dst_kernels.dst_conv2d(
        x if batched else x.unsqueeze(0),
        weight,
        threshold,
        bias,
        list(stride),
        list(pad),
        list(dilation),
        groups,
        min_density,
    )
    if min_density is not None:
        with torch.no_grad():
            threshold.copy_(t_eff)
    return y if batched else y.squeeze(0)
