"""Ask for a density and get it: ``DensityController`` adapts alpha during training.

DST's only knob is the weight ``alpha`` of the sparse regulariser, and the alpha that
gives a wanted density differs by orders of magnitude between models and data sets.
The controller measures the model's density every ``every`` steps and moves
``log(alpha)`` by ``gain * (log(density) - log(target))``: up while the model is denser
than the target, down while it is sparser. The measurement and the update run on the
model's device; the controller never reads a tensor on the host.

    controller = dst.DensityController(model, 0.05, alpha=5e-4)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + controller.penalty()   # alpha * sparsity_loss
        opt.zero_grad(); loss.backward(); opt.step()
        controller.step()
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from dst_kernels.nn.base import is_dst_layer
from dst_kernels.regulariser import add_penalty_grad_, layer_penalties

__all__ = ["DensityController"]


def _positive_float(name: str, value, *, upper: float | None = None, open_upper: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if value <= 0 or (upper is not None and (value > upper or (open_upper and value == upper))):
        bound = "" if upper is None else (f" and < {upper:g}" if open_upper else f" and <= {upper:g}")
        raise ValueError(f"{name} must be > 0{bound}, got {value!r}")
    return value


class DensityController:
    """Adapts the regulariser weight ``alpha`` so that training ends at ``target`` density.

    Args:
        model: a model holding DST layers (``dst.sparsify`` / ``DSTLinear`` / ...).
        target: the wanted kept fraction of all masked weights, in (0, 1).
        alpha: the starting alpha (default 1e-4).
        every: steps between two measurements of the density (default 20). Each one
            computes the masks once: about the cost of one forward's mask pass.
        gain: how far ``log(alpha)`` moves per measurement per unit of
            ``log(density / setpoint)`` (default 0.1): the integral term.
        damping: how far it moves per unit of change of that error since the last
            measurement (default 5): the proportional term, which damps the lag between
            alpha and the density (thresholds integrate the regulariser's push).
        recovery: how many times faster the integral term acts while the model is sparser
            than the setpoint (default 4): an overshoot to too sparse is undone only by the
            task gradient, so alpha must fall further and sooner than it rose.
        alpha_min, alpha_max: bounds of alpha (default 1e-10 and 1).
        floors: per-layer minimum densities: ``"auto"`` (default: twice each layer's
            ``min_density``, which keeps layers clear of the reset rule), None (no floors),
            a float for every DST layer, or a mapping from layer name (as in
            ``model.named_modules()``) to a float. A layer below its floor gets a smaller
            share of alpha (its own factor, at most 1, adapted like alpha) until it is
            back above it. Floors whose size-weighted mean is not below ``target`` leave
            no way to reach it and raise ``ValueError``.
        reset_bounds: how the layers' reset rule (``min_density``) is made compatible with
            ``target``. The whole-model density cannot stay below the size-weighted mean
            of the layers' bounds: a layer at its bound resets its thresholds to 0 and
            jumps back to dense. ``"auto"`` (default) lowers every layer's ``min_density``
            that is above ``target / 4`` to ``target / 4`` (so the auto floors, twice the
            bound, are at most ``target / 2``), in place on the layers; the changes are in
            :attr:`lowered_reset_bounds`. ``"keep"`` leaves them and raises ``ValueError``
            when ``target`` is at or below that weighted mean.
        max_error: the largest ``|log(density / setpoint)|`` the controller acts on
            (default 0.5): a sudden density jump (a layer's reset sends it from its bound to
            dense) counts as an error of at most this, so it moves alpha by at most
            ``exp(damping * max_error)`` (a transient that goes when the density comes back)
            and winds the integral up by at most ``gain * max_error`` per update, instead of
            driving alpha by orders of magnitude.
        total_steps: the number of optimiser steps of the run, if known: the setpoint
            then ramps from 1 down to ``target`` (see :meth:`setpoint`).
        ramp: the fraction of ``total_steps`` the ramp takes (default 0.5).

    Use :meth:`penalty` (``alpha * sparsity_loss(model)``, with the floors' factors) or
    :attr:`alpha` (a 0-dim tensor on the model's device) in the loss, and call
    :meth:`step` once per optimiser step. :meth:`state_dict` / :meth:`load_state_dict`
    save and restore the adapted state.
    """

    def __init__(
        self,
        model: nn.Module,
        target: float,
        *,
        alpha: float = 1e-4,
        every: int = 20,
        gain: float = 0.1,
        damping: float = 5.0,
        recovery: float = 4.0,
        alpha_min: float = 1e-10,
        alpha_max: float = 1.0,
        floors: float | Mapping[str, float] | str | None = "auto",
        total_steps: int | None = None,
        ramp: float = 0.5,
        reset_bounds: str = "auto",
        max_error: float = 0.5,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        named = [(n, m) for n, m in model.named_modules() if is_dst_layer(m)]
        if not named:
            raise ValueError("model has no DST layers (use dst_kernels.sparsify first)")
        self.target = _positive_float("target", target, upper=1.0, open_upper=True)
        self.alpha_min = _positive_float("alpha_min", alpha_min)
        self.alpha_max = _positive_float("alpha_max", alpha_max)
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({alpha_min!r}) must be <= alpha_max ({alpha_max!r})")
        alpha = _positive_float("alpha", alpha)
        if not self.alpha_min <= alpha <= self.alpha_max:
            raise ValueError(
                f"alpha must lie in [alpha_min, alpha_max] = [{alpha_min:g}, {alpha_max:g}], got {alpha!r}"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every = every
        self.gain = _positive_float("gain", gain)
        if (
            isinstance(damping, bool)
            or not isinstance(damping, (int, float))
            or not 0.0 <= damping < math.inf
        ):
            raise ValueError(f"damping must be a float >= 0, got {damping!r}")
        self.damping = float(damping)
        self.recovery = _positive_float("recovery", recovery)
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"total_steps must be a positive int or None, got {total_steps!r}")
        self.total_steps = total_steps
        self.ramp = _positive_float("ramp", ramp, upper=1.0)
        self.max_error = _positive_float("max_error", max_error)
        self._names = [n for n, _ in named]
        self._layers = [m for _, m in named]
        self._sizes = [m.total() for m in self._layers]
        self._total = float(sum(self._sizes))
        self.lowered_reset_bounds = self._fit_reset_bounds(reset_bounds)
        self._floors = self._check_floors(floors)
        if self._floors is not None:
            least = float((self._floors * torch.tensor(self._sizes, dtype=torch.float64)).sum()) / self._total
            if least >= self.target:
                raise ValueError(
                    f"floors keep the model at a density of at least {least:.4g} (their size-weighted "
                    f"mean), not below target {self.target:g}: lower the floors or pass floors=None"
                )
        device = next(iter(self._layers[0].parameters())).device
        self._log_alpha = torch.tensor(math.log(alpha), dtype=torch.float64, device=device)
        self._layer_log_scale = torch.zeros(len(self._layers), dtype=torch.float64, device=device)
        self._density = torch.ones((), dtype=torch.float32, device=device)
        self._error = torch.zeros((), dtype=torch.float64, device=device)
        self._layer_density = torch.ones(len(self._layers), dtype=torch.float32, device=device)
        self._alpha = torch.empty((), dtype=torch.float32, device=device)
        self._scales = torch.empty(len(self._layers), dtype=torch.float32, device=device)
        self._size_t = torch.tensor(self._sizes, dtype=torch.float64, device=device)
        self._refresh()
        self.steps = 0
        self.updates = 0

    # ------------------------------------------------------------------ set-up

    def _fit_reset_bounds(self, mode) -> dict[str, tuple[float, float]]:
        if mode not in ("auto", "keep"):
            raise ValueError(f"reset_bounds must be 'auto' or 'keep', got {mode!r}")
        bounds = [getattr(m, "min_density", None) for m in self._layers]
        if mode == "keep":
            least = sum((b or 0.0) * n for b, n in zip(bounds, self._sizes)) / self._total
            if self.target <= least:
                raise ValueError(
                    f"target {self.target:g} is at or below {least:.4g}, the size-weighted mean of the "
                    "layers' reset bounds (min_density): a layer at its bound resets its thresholds "
                    "to 0, so the model cannot stay at the target; pass reset_bounds='auto' (lowers "
                    "each bound to target / 4) or build the layers with a smaller min_density"
                )
            return {}
        lowered = {}
        limit = self.target / 4.0
        for name, layer, bound in zip(self._names, self._layers, bounds):
            if bound is not None and bound > limit:
                layer.min_density = limit
                lowered[name] = (bound, limit)
        return lowered

    def _check_floors(self, floors) -> torch.Tensor | None:
        if floors is None:
            return None
        if isinstance(floors, str):
            if floors != "auto":
                raise ValueError(
                    f"floors must be 'auto', None, a float or a mapping of layer names, got {floors!r}"
                )
            values = [2.0 * (getattr(m, "min_density", None) or 0.0) for m in self._layers]
            return torch.tensor([min(v, 0.5) for v in values], dtype=torch.float64)
        if isinstance(floors, Mapping):
            unknown = sorted(set(floors) - set(self._names))
            if unknown:
                raise ValueError(
                    f"floors names {unknown} that are not DST layers of the model; DST layers: {self._names}"
                )
            values = [floors.get(n, 0.0) for n in self._names]
        else:
            values = [floors] * len(self._names)
        for name, v in zip(self._names, values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
                raise ValueError(f"floors: the floor of {name!r} must be a float in [0, 1), got {v!r}")
        return torch.tensor([float(v) for v in values], dtype=torch.float64)

    def _follow_device(self) -> None:
        device = next(iter(self._layers[0].parameters())).device
        if self._log_alpha.device != device:
            for attr in (
                "_log_alpha",
                "_layer_log_scale",
                "_density",
                "_error",
                "_layer_density",
                "_alpha",
                "_scales",
                "_size_t",
            ):
                setattr(self, attr, getattr(self, attr).to(device))

    @torch.no_grad()
    def _refresh(self) -> None:
        lo, hi = math.log(self.alpha_min), math.log(self.alpha_max)
        self._log_alpha.clamp_(lo, hi)
        self._alpha.copy_(self._log_alpha.exp())
        self._scales.copy_(self._layer_log_scale.exp())

    # ------------------------------------------------------------------ use

    @property
    def alpha(self) -> torch.Tensor:
        """The current alpha, a 0-dim float32 tensor on the model's device."""
        self._follow_device()
        return self._alpha

    def setpoint(self, steps: int | None = None) -> float:
        """The density aimed at after ``steps`` steps (default: now).

        Without ``total_steps`` this is ``target``. With it, the setpoint falls from 1 to
        ``target`` along ``target + (1 - target) * (1 - s / S)**3`` over the first
        ``S = ramp * total_steps`` steps, then stays at ``target``: the model is pruned
        gradually instead of as fast as a large alpha can.
        """
        steps = self.steps if steps is None else steps
        if self.total_steps is None:
            return self.target
        span = max(1.0, self.ramp * self.total_steps)
        left = max(0.0, 1.0 - steps / span)
        return self.target + (1.0 - self.target) * left**3

    @property
    def density(self) -> torch.Tensor:
        """The density measured at the last update (0-dim tensor; 1 before the first)."""
        return self._density

    def penalty(self) -> torch.Tensor:
        """``alpha * sum over DST layers of (layer factor) * sum exp(-t)``: add it to the loss.

        Without floors every factor is 1 and this is ``alpha * dst.sparsity_loss(model)``.
        """
        self._follow_device()
        terms = layer_penalties(self._layers)  # FSDP2: this rank's shards
        if self._floors is None:
            return self._alpha * sum(terms[1:], terms[0])
        total = terms[0] * self._scales[0]
        for i in range(1, len(terms)):
            total = total + terms[i] * self._scales[i]
        return self._alpha * total

    def add_penalty_grad_(self, factor: torch.Tensor | None = None) -> None:
        """Add the gradient of :meth:`penalty` to the thresholds' ``.grad`` in place (for loops
        that leave the loss alone; ``factor`` multiplies it, e.g. a GradScaler's scale)."""
        self._follow_device()
        add_penalty_grad_(
            self._layers, self._alpha, scales=None if self._floors is None else self._scales, factor=factor
        )

    @torch.no_grad()
    def measure(self) -> torch.Tensor:
        """Per-layer densities now, a float32 tensor on the device (no host sync)."""
        self._follow_device()
        kept = torch.stack([m.kept().to(torch.float64) for m in self._layers])
        return (kept / self._size_t).float()

    def __call__(self, global_step: int) -> torch.Tensor:
        """``alpha`` for a loop that counts its own steps (``dst_kernels.train``'s ``alpha_fn``).

        ``global_step`` is the number of optimiser steps done so far; the controller catches
        up to it (updating when a multiple of ``every`` is reached) and returns :attr:`alpha`.
        Calling it again with the same step changes nothing.
        """
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
        if global_step != self.steps:
            due = global_step // self.every > self.steps // self.every
            self.steps = global_step
            if due:
                self.update()
        return self.alpha

    @torch.no_grad()
    def step(self) -> None:
        """Count one optimiser step; every ``every`` steps, measure and update alpha."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        """Measure the density and move alpha (and the floors' factors) now."""
        self._follow_device()
        kept = torch.stack([m.kept().to(torch.float64) for m in self._layers])
        layer_density = (kept / self._size_t).float()
        density = kept.sum() / self._total
        tiny = 1e-12
        error = density.clamp(min=tiny).log() - math.log(self.setpoint())
        error = error.clamp(-self.max_error, self.max_error)
        # PI in velocity form: the integral term drives the error to 0; the proportional one
        # (on the change of the error) damps the lag between alpha and the density.
        # Too sparse is slower to undo than too dense (the regulariser only pushes thresholds
        # up): below the setpoint the integral term acts `recovery` times faster.
        gain = torch.where(error < 0, self.gain * self.recovery, self.gain)
        if self.updates:
            self._log_alpha.add_(gain * error + self.damping * (error - self._error))
        else:
            self._log_alpha.add_(gain * error)
        self._error.copy_(error)
        self.updates += 1
        if self._floors is not None:
            floors = self._floors.to(layer_density.device)
            has_floor = floors > 0
            below = layer_density.double().clamp(min=tiny).log() - floors.clamp(min=tiny).log()
            scale = (self._layer_log_scale + self.gain * below).clamp(max=0.0)
            self._layer_log_scale.copy_(torch.where(has_floor, scale, self._layer_log_scale))
        self._density.copy_(density)
        self._layer_density.copy_(layer_density)
        self._refresh()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "target": self.target,
            "steps": self.steps,
            "updates": self.updates,
            "log_alpha": self._log_alpha.detach().clone(),
            "layer_log_scale": self._layer_log_scale.detach().clone(),
            "density": self._density.detach().clone(),
            "error": self._error.detach().clone(),
            "layer_density": self._layer_density.detach().clone(),
            "layers": list(self._names),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the adapted state (the constructor's target and settings stay)."""
        missing = {"steps", "log_alpha", "layer_log_scale"} - set(state)
        if missing:
            raise KeyError(f"DensityController.load_state_dict: state lacks {sorted(missing)}")
        layers = state.get("layers")
        if layers is not None and list(layers) != self._names:
            raise ValueError(
                f"DensityController.load_state_dict: the state is for DST layers {list(layers)}, "
                f"this model has {self._names}"
            )
        self._follow_device()
        with torch.no_grad():
            self._log_alpha.copy_(torch.as_tensor(state["log_alpha"]))
            self._layer_log_scale.copy_(torch.as_tensor(state["layer_log_scale"]))
            if "error" in state:
                self._error.copy_(torch.as_tensor(state["error"]))
            if "density" in state:
                self._density.copy_(torch.as_tensor(state["density"]))
            if "layer_density" in state:
                self._layer_density.copy_(torch.as_tensor(state["layer_density"]))
        self.steps = int(state["steps"])
        self.updates = int(state.get("updates", self.steps // self.every))
        self._refresh()

    def __repr__(self) -> str:
        return (
            f"DensityController(target={self.target:g}, layers={len(self._layers)}, every={self.every}, "
            f"gain={self.gain:g}, steps={self.steps})"
        )
