"""Turn a DST-trained model into a plain PyTorch model."""

from __future__ import annotations

import copy

from torch import nn

from dst_kernels.nn import is_dst_layer

__all__ = ["fold"]


def fold(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every DST layer replaced by its plain counterpart.

    ``DSTLinear`` / ``DSTConv2d`` / ``DSTLSTM`` become ``nn.Linear`` /
    ``nn.Conv2d`` / ``nn.LSTM`` whose weights are ``W * M``; thresholds are
    dropped. The folded model computes the same function as ``model`` does in
    eval mode. ``model`` itself is left unchanged.
    """
    if is_dst_layer(model):
        return model.to_dense()
    folded = copy.deepcopy(model)
    for module in list(folded.modules()):
        for name, child in list(module.named_children()):
            if is_dst_layer(child):
                setattr(module, name, child.to_dense())
    return folded
