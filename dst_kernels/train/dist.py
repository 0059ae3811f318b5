"""``dst-train`` under ``torchrun``: the process group, this rank's place in it, and reductions.

``torchrun --nproc_per_node N -m dst_kernels.train ...`` (or the ``dst-train`` script) sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` then joins the group (NCCL for CUDA,
gloo for the CPU) and every rank trains on its share of each global batch. Outside torchrun
nothing changes: one process, world size 1, and no process group unless ``--fsdp`` asks for one
(FSDP2 needs a device mesh even for a single process).
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

if dist.is_available():
    # Imported before any group exists: its functions take ``group=group.WORLD`` as a default,
    # and imported later (torch._dynamo imports it) they would hold that group for good.
    import torch.distributed.nn.functional  # noqa: F401

__all__ = ["Context", "setup", "current", "teardown", "broadcast_buffers"]


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0 alone writes files and prints the run's lines."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is set on any rank (a collective: every rank calls it)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


_CURRENT = Context()


def current() -> Context:
    return _CURRENT


def setup(device: str, *, group: bool = False) -> tuple[Context, str]:
    """Join the torchrun group if there is one; returns the context and this rank's device
    (``cuda`` becomes ``cuda:LOCAL_RANK``). ``group`` makes a process group even for a single
    process (a world of one, in memory) when torchrun did not start one."""
    global _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if group and not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if device.startswith("cuda"):
                index = torch.device(device).index
                device = f"cuda:{torch.cuda.current_device() if index is None else index}"
                torch.cuda.set_device(torch.device(device))  # NCCL's device (needs an index)
            if {"RANK", "MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):  # torchrun --nproc_per_node 1
                dist.init_process_group(backend)
            else:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _CURRENT = Context()
        return _CURRENT, device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    _CURRENT = Context(rank=rank, world=world, local_rank=local_rank)
    return _CURRENT, device


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, ctx: Context) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, one collective per
    dtype: what DDP does before each forward (``broadcast_buffers=True``). FSDP2 leaves buffers
    alone, and every rank updates its own copy from its own share of the batch."""
    if not ctx.distributed:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for buf in module.buffers():
        groups.setdefault((buf.dtype, buf.device), []).append(buf)
    for bufs in groups.values():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def teardown(*, release: bool = True) -> None:
    """Leave the process group. ``release`` (every rank is done with its collectives) also frees
    it at once, which joins gloo's worker threads; pass False on a way out that may leave a
    collective in flight (freeing would wait for it).

    A group still alive when the interpreter finalises can abort the process on its way out
    ("terminate called without an active exception"): a gloo worker that drops the last
    reference to a finished collective's tensor needs the GIL, and a finalising interpreter ends
    any thread that asks for it. Destroying the group does not free it while a device mesh holds
    it, and DTensor's caches keep the meshes of a model sharded with FSDP2."""
    global _CURRENT
    if dist.is_initialized():
        dist.destroy_process_group()
        if release:
            _forget_groups()
    _CURRENT = Context()


def _forget_groups() -> None:
    """Drop the device meshes' references to the (destroyed) process groups, then collect."""
    mesh_module = sys.modules.get("torch.distributed.device_mesh")
    mesh_type = getattr(mesh_module, "DeviceMesh", None)
    if isinstance(mesh_type, type):
        for obj in gc.get_objects():
            # type(obj).__mro__, not isinstance: no __class__ lookup on arbitrary objects
            registry = getattr(obj, "_pg_registry", None) if mesh_type in type(obj).__mro__ else None
            if isinstance(registry, dict):
                registry.clear()
    gc.collect()
