"""DTensor helpers the layers need under FSDP2 (``dst_kernels.distributed`` re-exports them).

Below the layers: nothing here imports a DST module.
"""

from __future__ import annotations

import torch

__all__ = ["check_sharded_reset", "full", "is_dtensor", "local_share"]


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the full tensor of a DTensor (a collective: call it on every rank)."""
    return t.full_tensor() if is_dtensor(t) else t


def local_share(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` whose gradient this rank owns: a sharded DTensor's local shard (so a sum
    over it, summed over ranks, counts every element once); ``t`` itself otherwise."""
    if is_dtensor(t):
        from torch.distributed.tensor import Shard

        if all(isinstance(p, Shard) for p in t.placements):
            return t.to_local()
        return t.full_tensor()
    return t


def check_sharded_reset(layer) -> None:
    """Raise if ``layer``'s thresholds are sharded with the reset rule on but no reset hook was
    registered: its resets would be silently lost (called by ``sparsity_loss``)."""
    if layer.min_density is not None and not getattr(layer, "_dst_fsdp_ready", False):
        raise RuntimeError(
            f"{type(layer).__name__} has FSDP-sharded thresholds but no reset hook: the reset rule "
            "would write into FSDP's unsharded copy and be lost. Shard with "
            "dst_kernels.distributed.fully_shard(model), or call "
            "dst_kernels.distributed.register_reset_hooks(model) after your fully_shard calls "
            "(or turn the rule off with min_density=None)"
        )
