"""Pure-PyTorch DST: the oracle every other backend is tested against.

Implements docs/maths.md section 1 exactly, for weights of any rank: a weight with
``O`` output rows is viewed as ``[O, -1]`` and row ``i`` is compared with
``threshold[i]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "estimator",
    "mask",
    "density",
    "masked_weight",
    "weight_grad",
    "reset_thresholds_",
    "linear",
    "conv2d",
]


def _rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def estimator(x: torch.Tensor) -> torch.Tensor:
    """The long-tailed derivative estimator ``H`` of the step function."""
    ax = x.abs()
    near = 2.0 - 4.0 * ax
    tail = torch.where(ax <= 1.0, torch.full_like(ax, 0.4), torch.zeros_like(ax))
    return torch.where(ax <= 0.4, near, tail)


def mask(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``|W| > t[row]`` shaped like ``weight`` (ties are masked out)."""
    return (_rows(weight).abs() > threshold.unsqueeze(1)).reshape(weight.shape)


def density(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Kept fraction ``sum(M) / numel(M)`` as a 0-dim float32 tensor (no host sync)."""
    return mask(weight, threshold).float().mean()


def weight_grad(
    grad_masked: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``P = W * M`` w.r.t. ``W`` and ``t`` given ``G = dL/dP``.

    ``dW = G*M + G*|W|*H(Q)`` and ``dt[i] = -sum_j G*W*H(Q)``, computed in
    float32 (or float64) and returned in the dtypes of ``weight`` / ``threshold``.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = _rows(weight).to(acc)
    g = _rows(grad_masked).to(acc)
    q = w.abs() - threshold.to(acc).unsqueeze(1)
    h = estimator(q)
    m = (q > 0).to(acc)
    gw = g * w
    grad_w = g * m + gw * torch.sign(w) * h
    grad_t = -(gw * h).sum(dim=1)
    return grad_w.to(weight.dtype).reshape(weight.shape), grad_t.to(threshold.dtype)


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(weight, threshold):
        return weight * mask(weight, threshold)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, threshold = inputs
        # A copy: the reset rule updates the threshold parameter in place, and a layer
        # used twice before backward must keep the thresholds each call saw.
        ctx.save_for_backward(weight, threshold.detach().clone())

    @staticmethod
    def backward(ctx, grad):
        weight, threshold = ctx.saved_tensors
        if not any(ctx.needs_input_grad):
            return None, None
        grad_w, grad_t = weight_grad(grad, weight, threshold)
        return (
            grad_w if ctx.needs_input_grad[0] else None,
            grad_t if ctx.needs_input_grad[1] else None,
        )


def masked_weight(
    weight: torch.Tensor, threshold: torch.Tensor, min_density: float | None = None
) -> torch.Tensor:
    """``P = W * M``, differentiable in ``W`` and ``t`` through the estimator ``H``.

    With ``min_density`` set, the reset rule runs first (``threshold`` is updated
    in place) and the mask uses the thresholds after it.
    """
    if min_density is not None:
        reset_thresholds_(weight.detach(), threshold.detach(), min_density)
    return _MaskedWeight.apply(weight, threshold)


@torch.no_grad()
def reset_thresholds_(weight: torch.Tensor, threshold: torch.Tensor, min_density: float) -> torch.Tensor:
    """The reset rule, in place and without a host sync.

    If the kept fraction is ``<= min_density`` the whole threshold vector is
    set to 0. The test is ``kept <= min_density * numel`` in float64. Returns
    the 0-dim bool tensor saying whether it was reset.
    """
    kept = mask(weight, threshold).sum(dtype=torch.float64)
    reset = kept <= min_density * weight.numel()
    threshold.masked_fill_(reset, 0)
    return reset


def linear(x, weight, threshold, bias=None, min_density=None):
    return F.linear(x, masked_weight(weight, threshold, min_density), bias)


def conv2d(x, weight, threshold, bias=None, stride=1, padding=0, dilation=1, groups=1, min_density=None):
    masked = masked_weight(weight, threshold, min_density)
    return F.conv2d(x, masked, bias, stride, padding, dilation, groups)
