"""``fold`` and ``dense_state_dict``: a DST-trained model as plain PyTorch layers holding ``W * M``."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dst_kernels.nn.base import is_dst_layer, unwatch_outside_reads

__all__ = ["dense_state_dict", "fold"]


def fold(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every DST layer is its plain PyTorch class again.

    ``DSTLinear`` / ``DSTConv2d`` / ``DSTLSTM`` / ``DSTGRU`` become ``nn.Linear`` /
    ``nn.Conv2d`` / ``nn.LSTM`` / ``nn.GRU``, and a layer that ``sparsify`` masked
    through its own class (a subclass such as ``nn.MultiheadAttention``'s
    ``out_proj``, ``nn.Conv1d``, a registered type) becomes that class again; the
    masked weights hold ``W * M`` and the thresholds are dropped. The copy keeps
    the model's hooks, shared modules, tied weights and ``requires_grad`` flags,
    computes the same function as ``model`` does in eval mode, and its
    ``state_dict`` loads into the original architecture. ``model`` itself is left
    unchanged.
    """
    folded = copy.deepcopy(model)
    for module in list(folded.modules()):
        if is_dst_layer(module):
            module._dst_unmask_()
        unwatch_outside_reads(module)  # sparsify's hooks: the copy has no DST layer left
    return folded


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state dict of the original (dense) architecture: ``W * M`` for every masked
    weight, no thresholds. Load it into the model before ``sparsify`` (or the same
    architecture built anew), save it with ``torch.save``, or give it to HuggingFace's
    ``save_pretrained(..., state_dict=...)``. Equal to ``fold(model).state_dict()``,
    without copying the model.
    """
    state = model.state_dict()
    metadata = getattr(state, "_metadata", None)
    for prefix, module in model.named_modules(remove_duplicate=False):
        if not is_dst_layer(module):
            continue
        dot = prefix + "." if prefix else ""
        masks = module.masks()
        for w, t in module._dst_pairs:
            state[dot + w] = module.dense_weight(w).detach() * masks[w]
            state.pop(dot + t, None)
        if metadata is not None and prefix in metadata:
            metadata[prefix] = dict(metadata[prefix])  # plain: no DST-state warning on load
    return state
