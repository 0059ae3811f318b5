"""Drop-in DST layers (and ``sparsify``, re-exported from ``dst_kernels.convert``).

``DSTLinear`` and ``DSTConv2d`` subclass ``nn.Linear`` / ``nn.Conv2d``: every
constructor argument, ``reset_parameters`` and code that does
``isinstance(m, nn.Conv2d)`` keep working. Each adds a trainable ``threshold``
of shape ``[out]`` (initialised to 0); the forward uses ``W * (|W| > t)``.
"""

from __future__ import annotations

from dst_kernels.convert import sparsify

# Private names that pickles written before the layers moved into this package refer to
# (a state dict's metadata, the hooks of a sparsified model).
from dst_kernels.nn.base import (  # noqa: F401
    _OUTSIDE_READS,
    DSTLayer,
    DSTStateDictWarning,
    _DSTStateMetadata,
    _enter_outside_reads,
    _leave_outside_reads,
    _OutsideReads,
    is_dst_layer,
    layer_penalty,
    masked_along,
    sparsity_loss,
    threshold_parameters,
    unwatch_outside_reads,
    watch_outside_reads,
)
from dst_kernels.nn.conv import DSTConv2d
from dst_kernels.nn.linear import DSTLinear
from dst_kernels.nn.rnn import _DSTRNN, DSTGRU, DSTLSTM  # noqa: F401

__all__ = [
    "DSTLinear",
    "DSTConv2d",
    "DSTLSTM",
    "DSTGRU",
    "DSTLayer",
    "DSTStateDictWarning",
    "sparsify",
    "is_dst_layer",
    "layer_penalty",
    "masked_along",
    "sparsity_loss",
    "threshold_parameters",
    "watch_outside_reads",
    "unwatch_outside_reads",
]
