"""What the framework callbacks share: the regulariser (a fixed alpha or a DensityController),
the thresholds' weight decay, the densities they log, and the state they checkpoint."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from dst_kernels.controller import DensityController
from dst_kernels.convert import sparsify as sparsify_model
from dst_kernels.nn.base import is_dst_layer
from dst_kernels.regulariser import add_penalty_grad_

__all__ = ["DSTRegulariser", "exclude_thresholds_from_weight_decay_"]


def _threshold_ids(model: nn.Module) -> set[int]:
    return {id(t) for m in model.modules() if is_dst_layer(m) for t in m.thresholds()}


def exclude_thresholds_from_weight_decay_(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Move the DST thresholds of ``model`` out of every param group of ``optimizer`` whose
    ``weight_decay`` is not 0 into a new group that copies its settings with ``weight_decay=0``.
    Call it before the optimiser's first step (its state must be empty for the moved
    parameters). Returns the number of thresholds moved."""
    ids = _threshold_ids(model)
    moved = 0
    for group in list(optimizer.param_groups):
        if not group.get("weight_decay", 0.0):
            continue
        mine = [p for p in group["params"] if id(p) in ids]
        if not mine:
            continue
        if any(optimizer.state.get(p) for p in mine):
            raise RuntimeError(
                "exclude_thresholds_from_weight_decay_: the optimiser has already stepped the "
                "thresholds; call it before the first step"
            )
        group["params"] = [p for p in group["params"] if id(p) not in ids]
        settings = {k: v for k, v in group.items() if k != "params"}
        optimizer.add_param_group({**settings, "params": mine, "weight_decay": 0.0})
        moved += len(mine)
    return moved


class DSTRegulariser:
    """The regulariser of a framework callback: a fixed ``alpha`` or, with ``target_density``,
    a :class:`~dst_kernels.DensityController` (``alpha`` is then its start).

    ``bind(model, total_steps)`` finds the DST layers (after ``sparsify`` when asked) and
    builds the controller; ``add_grad(factor)`` adds the regulariser's gradient to the
    thresholds; ``after_step()`` counts an optimiser step; ``metrics()`` gives the model's and
    each layer's density and alpha as tensors on the device.
    """

    def __init__(
        self,
        *,
        alpha: float | None = None,
        target_density: float | None = None,
        controller: Mapping | None = None,
        sparsify: bool | Mapping = False,
        log_every: int = 50,
    ):
        if alpha is None and target_density is None:
            raise ValueError(
                "pass alpha= (a fixed regulariser weight) or target_density= (a DensityController)"
            )
        if alpha is not None and (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not alpha >= 0
            or not math.isfinite(alpha)
        ):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if target_density is not None and (
            isinstance(target_density, bool)
            or not isinstance(target_density, (int, float))
            or not 0.0 < target_density < 1.0
        ):
            raise ValueError(f"target_density must be a fraction in (0, 1), got {target_density!r}")
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a positive int, got {log_every!r}")
        if controller is not None and target_density is None:
            raise ValueError("controller= settings need target_density=")
        self.alpha = None if alpha is None else float(alpha)
        self.target_density = target_density
        self.controller_kwargs = dict(controller or {})
        self.sparsify = sparsify
        self.log_every = log_every
        self.model: nn.Module | None = None
        self.layers: list[nn.Module] = []
        self.names: list[str] = []
        self.controller: DensityController | None = None
        self._pending_state: dict | None = None

    def prepare(self, model: nn.Module) -> None:
        """``sparsify`` the model in place when asked (before its optimiser is built)."""
        if self.sparsify and not any(is_dst_layer(m) for m in model.modules()):
            sparsify_model(model, **(self.sparsify if isinstance(self.sparsify, Mapping) else {}))

    def bind(self, model: nn.Module, total_steps: int | None = None) -> None:
        self.prepare(model)
        named = [(n, m) for n, m in model.named_modules() if is_dst_layer(m)]
        if not named:
            raise ValueError(
                "the model has no DST layers: call dst_kernels.sparsify(model) first, or pass sparsify=True"
            )
        self.model = model
        self.names = [n for n, _ in named]
        self.layers = [m for _, m in named]
        if self.target_density is not None and self.controller is None:
            kwargs = {"total_steps": total_steps, **self.controller_kwargs}
            if self.alpha is not None:
                kwargs.setdefault("alpha", max(self.alpha, 1e-10))
            self.controller = DensityController(model, self.target_density, **kwargs)
            if self._pending_state is not None:
                self.controller.load_state_dict(self._pending_state)
                self._pending_state = None

    def add_grad(self, factor: torch.Tensor | None = None) -> None:
        if self.controller is not None:
            self.controller.add_penalty_grad_(factor)
        elif self.alpha:
            add_penalty_grad_(self.layers, self.alpha, factor=factor)

    def after_step(self) -> None:
        if self.controller is not None:
            self.controller.step()

    def current_alpha(self) -> torch.Tensor | float:
        return self.controller.alpha if self.controller is not None else (self.alpha or 0.0)

    @torch.no_grad()
    def metrics(self) -> dict[str, torch.Tensor]:
        """Model and per-layer density and alpha: 0-dim tensors on the model's device."""
        kept = torch.stack([m.kept().to(torch.float64) for m in self.layers])
        sizes = torch.tensor([float(m.total()) for m in self.layers], dtype=torch.float64, device=kept.device)
        out = {"dst/density": (kept.sum() / sizes.sum()).float()}
        for name, k, n in zip(self.names, kept, sizes):
            out[f"dst/density/{name or 'model'}"] = (k / n).float()
        alpha = self.current_alpha()
        out["dst/alpha"] = (
            alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha, device=kept.device)
        )
        return out

    def state_dict(self) -> dict:
        state = {"alpha": self.alpha, "target_density": self.target_density}
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        elif self._pending_state is not None:
            state["controller"] = self._pending_state
        return state

    def load_state_dict(self, state: Mapping) -> None:
        controller = state.get("controller")
        if controller is None:
            return
        if self.controller is not None:
            self.controller.load_state_dict(controller)
        else:
            self._pending_state = dict(controller)  # restored once bind() builds the controller
