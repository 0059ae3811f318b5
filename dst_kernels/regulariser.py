"""The sparse regulariser ``sum_i exp(-t_i)``, computed so that it never overflows.

``exp(-t)`` is exact for ``t >= -EXP_LINEAR_BELOW`` and continues as its tangent line
below (value and slope continuous at the joint), so a threshold that a bad step sent
far below zero gives a large but finite loss and a gradient of at most
``exp(EXP_LINEAR_BELOW)`` in magnitude instead of ``inf``. Half-precision thresholds
are summed in float32 (``sum exp(-t)`` over a few thousand thresholds leaves float16's
range as soon as they dip below about -2).

For every threshold above ``-EXP_LINEAR_BELOW`` the value and the gradient are
bit-identical to ``torch.exp(-t).sum()`` in float32 / float64.
"""

from __future__ import annotations

import torch

from dst_kernels._dtensor import check_sharded_reset, is_dtensor, local_share

__all__ = [
    "EXP_LINEAR_BELOW",
    "add_penalty_grad_",
    "layer_penalties",
    "layer_penalty",
    "threshold_penalty",
    "threshold_penalty_grad",
]

# Below t = -10 the penalty is linear in t. A threshold below -(max|W| + 1) keeps its whole
# row and gets no gradient from the task loss (the estimator H vanishes for |Q| > 1), so
# with weights of magnitude below 9 no threshold of a healthy run ever gets there.
EXP_LINEAR_BELOW = 10.0


def _clamped(threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, max(t, -EXP_LINEAR_BELOW))``, in float32 for float16 / bfloat16 thresholds."""
    t = threshold.float() if threshold.dtype in (torch.float16, torch.bfloat16) else threshold
    # torch.where saves only its condition for backward (clamp would save t itself): the reset
    # rule updates thresholds in place during the forward, which may run after this.
    return t, torch.where(t < -EXP_LINEAR_BELOW, -EXP_LINEAR_BELOW, t)


def threshold_penalty(threshold: torch.Tensor) -> torch.Tensor:
    """``sum_i exp(-t_i)`` with a linear tail below ``t = -EXP_LINEAR_BELOW``.

    Returns a 0-dim tensor in float32 for float16 / bfloat16 thresholds, else in the
    thresholds' dtype. No host synchronisation; traceable by ``torch.compile``.
    """
    t, clamped = _clamped(threshold)
    # (clamped - t) is 0 for t >= -c and -c - t > 0 below: exp(c) * (1 + (-c - t)) there.
    return (torch.exp(-clamped) * (1.0 + (clamped - t))).sum()


class _Penalties(torch.autograd.Function):
    """:func:`threshold_penalty` of every tensor of a list in one autograd node: the same ATen
    kernels run element for element (so the values and gradients are bit-identical), through
    ``torch._foreach_*`` calls instead of some ten dispatched ops and autograd nodes per
    threshold tensor. Returns one 0-dim sum per tensor."""

    @staticmethod
    def forward(ctx, *thresholds):
        ts = list(thresholds)
        clamped = torch._foreach_clamp_min(ts, -EXP_LINEAR_BELOW)
        e = torch._foreach_exp(torch._foreach_neg(clamped))
        # Only exp(-clamped) is saved: the reset rule may update the thresholds in place later
        # in the same forward.
        ctx.save_for_backward(*e)
        # (clamped - t) is 0 for t >= -c and -c - t > 0 below: exp(c) * (1 + (-c - t)) there.
        tail = torch._foreach_add(torch._foreach_sub(clamped, ts), 1.0)
        return tuple(v.sum() for v in torch._foreach_mul(e, tail))

    @staticmethod
    def backward(ctx, *grads):
        # d/dt = -exp(-max(t, -c)): what autograd gives through the unfused expression.
        return tuple(torch._foreach_neg(torch._foreach_mul(list(ctx.saved_tensors), list(grads))))


def _float_or_same(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def layer_penalties(layers) -> list[torch.Tensor]:
    """``sum exp(-t)`` over each DST layer's thresholds (under FSDP2, this rank's shards), one
    0-dim tensor per layer, from one fused autograd node for all of them."""
    per_layer = []
    for layer in layers:
        thresholds = layer.thresholds()
        if any(is_dtensor(t) for t in thresholds):  # FSDP2: each rank adds its own shards' terms
            check_sharded_reset(layer)
            thresholds = [local_share(t) for t in thresholds]
        per_layer.append([_float_or_same(t) for t in thresholds])
    flat = [t for ts in per_layer for t in ts]
    if torch.compiler.is_compiling():
        # Traced: the compiler fuses the per-tensor expressions itself (same values).
        sums = iter([threshold_penalty(t) for t in flat])
    else:
        sums = iter(_Penalties.apply(*flat) if flat else ())
    return [sum(next(sums) for _ in ts) for ts in per_layer]


def layer_penalty(layer) -> torch.Tensor:
    """``sum exp(-t)`` over one DST layer's thresholds (under FSDP2, this rank's shards)."""
    return layer_penalties([layer])[0]


def threshold_penalty_grad(threshold: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`threshold_penalty`: ``-exp(-t)``, ``-exp(EXP_LINEAR_BELOW)`` on
    the linear tail, in float32 for float16 / bfloat16 thresholds (what autograd gives)."""
    return -torch.exp(-_clamped(threshold)[1])


@torch.no_grad()
def add_penalty_grad_(layers, alpha, *, scales=None, factor=None) -> None:
    """Add ``alpha * d/dt sum exp(-t)`` to every threshold's ``.grad`` of ``layers`` (DST
    layers), in place: what ``loss + alpha * sparsity_loss`` would have added, for loops that
    leave the loss alone (the framework callbacks of ``dst_kernels.integrations``).

    ``alpha`` is a float or a 0-dim tensor; ``scales`` (a 1-D tensor, one per layer) multiplies
    each layer's term (the controller's floors); ``factor`` (a 0-dim tensor, e.g. a GradScaler's
    scale) multiplies every term, for gradients that are still scaled. No host sync.
    """
    thresholds, weights = [], []
    for i, layer in enumerate(layers):
        weight = alpha if scales is None else alpha * scales[i]
        if factor is not None:
            weight = weight * factor
        for t in layer.thresholds():
            if is_dtensor(t):
                raise NotImplementedError(
                    "add_penalty_grad_: sharded (FSDP2) thresholds are not supported; add "
                    "alpha * dst.sparsity_loss(model) to the loss instead"
                )
            thresholds.append(t)
            weights.append(weight)
    if not thresholds:
        return
    # -exp(-max(t, -c)) for every threshold at once (threshold_penalty_grad, in foreach calls).
    clamped = torch._foreach_clamp_min([_float_or_same(t) for t in thresholds], -EXP_LINEAR_BELOW)
    grads = torch._foreach_neg(torch._foreach_exp(torch._foreach_neg(clamped)))
    for t, w, g in zip(thresholds, weights, grads):
        g = (w * g).to(t.dtype)
        if t.grad is None:
            t.grad = g
        else:
            t.grad.add_(g)
