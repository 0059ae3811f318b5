"""DST under ``torch.distributed``: what sharded (FSDP2 / DTensor) parameters need.

DDP needs nothing: it all-reduces the gradients of ``W`` and ``t`` like any others, and the
reset rule is a function of the weights and thresholds, which DDP keeps identical on every rank.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards ``W`` and ``t`` of a layer along their
first dimension (the same rows on the same rank) and all-gathers them for the forward, so the
mask is computed on the unsharded weight. But the reset rule writes the thresholds in place
during the forward, and FSDP2 frees the unsharded copy after it: the write would be lost and
the sharded thresholds would keep their old values. :func:`fully_shard` (or
:func:`register_reset_hooks` after your own ``fully_shard`` calls) gives every root FSDP unit a
forward pre-hook that runs before FSDP2's all-gathers and applies the rule to the sharded
parameters themselves (one all-reduce of the kept count per layer; no host sync); the layers
then skip the rule in their own forward.
:func:`full` turns a DTensor into the full tensor for reporting and export.
"""

from __future__ import annotations

import torch

from dst_kernels._dtensor import check_sharded_reset, full, is_dtensor, local_share

__all__ = [
    "fully_shard",
    "register_reset_hooks",
    "is_dtensor",
    "full",
    "local_share",
    "reset_sharded_",
    "check_sharded_reset",
]


@torch.no_grad()
def reset_sharded_(weight, threshold, min_density: float) -> None:
    """The reset rule on row-sharded DTensors ``weight`` / ``threshold``, in place on the local
    threshold shard; no host synchronisation (the decision stays on the device). A rank may hold
    no rows at all (``torch.chunk`` leaves trailing ranks empty)."""
    from torch.distributed.tensor import Shard

    if weight.placements != threshold.placements or weight.device_mesh != threshold.device_mesh:
        raise ValueError(
            f"the reset rule on sharded parameters needs the weight and its thresholds sharded "
            f"alike (rows), got {weight.placements} and {threshold.placements}"
        )
    w = weight.to_local()
    t = threshold.to_local()
    # flatten(1) keeps an empty shard [0, ...] valid; the count stays on the shard's device.
    kept = (w.flatten(1).abs() > t.unsqueeze(1)).sum().to(torch.float64)
    mesh = threshold.device_mesh
    kept = kept.to(mesh.device_type)  # CPU-offloaded shards: the collective runs on the mesh's device
    for dim, placement in enumerate(threshold.placements):  # sum over the ranks that hold rows
        if isinstance(placement, Shard):
            torch.distributed.all_reduce(kept, group=mesh.get_group(dim))
    due = (kept <= min_density * weight.numel()).to(t.device)  # weight.numel(): the global size
    t.copy_(torch.where(due, torch.zeros_like(t), t))


def _dst_layers(module):
    from dst_kernels.nn.base import is_dst_layer

    return [m for m in module.modules() if is_dst_layer(m)]


def _fsdp_module_type():
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def _root_units(model, fsdp_type):
    """FSDP units with no FSDP ancestor: FSDP2 runs their pre-forward first, and only there does
    it order its all-gather streams after the current stream."""
    roots = []

    def walk(module):
        if isinstance(module, fsdp_type):
            roots.append(module)
            return
        for child in module.children():
            walk(child)

    walk(model)
    return roots


def _make_pre_hook(layers):
    def hook(unit, args):
        for layer in layers:
            if not layer.training or layer.min_density is None:
                continue
            for w_name, t_name in layer._dst_pairs:
                threshold = layer._parameters[t_name]  # the raw Parameters (DTensors between forwards)
                if is_dtensor(threshold):
                    reset_sharded_(layer._parameters[w_name], threshold, layer.min_density)

    return hook


def register_reset_hooks(model) -> int:
    """After ``torch.distributed.fsdp.fully_shard``: make the reset rule persist on the sharded
    thresholds (see the module docstring). Call it once, after every ``fully_shard`` call and
    before the first forward; returns the number of DST layers covered.

    Each root FSDP unit gets one forward pre-hook, ahead of FSDP2's own (which starts the
    all-gathers), that applies the rule to every DST layer below it. The layers then skip the
    rule in their own forward (it ran on the master parameters already, in their dtype, before
    any mixed-precision cast)."""
    fsdp_type = _fsdp_module_type()
    covered = 0
    for root in _root_units(model, fsdp_type):
        if getattr(root, "_dst_reset_hook", None) is not None:
            covered += len(_dst_layers(root))
            continue
        layers = _dst_layers(root)
        for layer in layers:
            if getattr(layer, "_dst_axes", None) and layer.min_density is not None:
                raise ValueError(
                    f"{type(layer).__name__}: the reset rule on FSDP-sharded parameters needs the "
                    f"output axis first (axes {layer._dst_axes}); set min_density=None for it"
                )
        if layers:
            root._dst_reset_hook = root.register_forward_pre_hook(_make_pre_hook(layers), prepend=True)
            for layer in layers:
                layer._dst_fsdp_ready = True
            covered += len(layers)
    return covered


def fully_shard(model, **kwargs):
    """``torch.distributed.fsdp.fully_shard`` for a model with DST layers: every DST layer (and
    every ``DSTLSTM``) becomes its own FSDP unit, then the root, then :func:`register_reset_hooks`.
    ``kwargs`` (``mesh``, ``mp_policy``, ``reshard_after_forward``, ...) go to every call."""
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    for layer in _dst_layers(model):
        if layer is not model:
            torch_fully_shard(layer, **kwargs)
    torch_fully_shard(model, **kwargs)
    register_reset_hooks(model)
    return model
