"""``DSTTrainerCallback``: Dynamic Sparse Training in a HuggingFace ``Trainer``, one line.

    import dst_kernels as dst
    from dst_kernels.integrations.hf import DSTTrainerCallback

    dst.sparsify(model)                                    # or DSTTrainerCallback(..., sparsify=True)
    trainer = Trainer(model, args, train_dataset=data, callbacks=[DSTTrainerCallback(alpha=5e-4)])
    trainer.train()

The callback adds ``alpha * d/dt sum exp(-t)`` to the thresholds' gradients at the start of
every optimiser step (``on_step_begin``, before the step's first micro-batch: the backward
passes accumulate onto it, and under DDP every rank adds the same term, so the all-reduce
keeps it). Clipping and the optimiser then see ``task gradient + regulariser gradient``: the
result of ``loss + alpha * dst.sparsity_loss(model)``, the loss untouched. With a GradScaler
(fp16) the term is multiplied by the current scale, as the backward's gradients are.
``target_density=`` adapts alpha with a :class:`~dst_kernels.DensityController`; its state is
saved in the Trainer's checkpoints (``trainer_state.json``) and restored on resume.

The Trainer puts the thresholds in its weight-decay group (their names contain neither
"bias" nor "norm"). The callback undoes that decay exactly for the optimisers whose decay it
knows (``torch.optim.AdamW`` / ``Adam`` with decoupled decay: the step's ``lr * wd * t`` is
added back after it; ``SGD`` / ``Adam`` / ``RMSprop``: ``wd * t`` taken off their gradient
first), unless ``threshold_weight_decay=True``; with another optimiser and a weight decay it
raises. The model's and each layer's density and alpha are added to the Trainer's logs
(``on_log``, every ``logging_steps``): logging callbacks that come after this one in the
Trainer's list see them, and so does ``trainer.state.log_history``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as e:
    raise ImportError("dst_kernels.integrations.hf needs transformers: pip install transformers") from e

from dst_kernels.integrations._common import DSTRegulariser, _threshold_ids

__all__ = ["DSTTrainerCallback"]

_COUPLED = (torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad)


def _to_json(value):
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value):
    if isinstance(value, Mapping):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


class DSTTrainerCallback(TrainerCallback, ExportableState):
    """Dynamic Sparse Training for a HuggingFace ``Trainer``.

    Args:
        alpha: the regulariser's weight (the paper's alpha); with ``target_density`` its start.
        target_density: adapt alpha during training so that the model ends at this kept
            fraction (a :class:`~dst_kernels.DensityController`, ramped over ``max_steps``).
        controller: more keyword arguments of the controller (``every``, ``floors``, ...).
        sparsify: ``True`` (or ``sparsify``'s keyword arguments) converts the model's layers
            when the Trainer is built, before it builds the optimiser.
        threshold_weight_decay: let the Trainer's weight decay act on the thresholds.
        controller_state: a saved controller state (what a resumed Trainer passes back).
    """

    def __init__(
        self,
        alpha: float | None = None,
        target_density: float | None = None,
        controller: Mapping | None = None,
        sparsify: bool | Mapping = False,
        threshold_weight_decay: bool = False,
        controller_state: Mapping | None = None,
    ):
        self.reg = DSTRegulariser(
            alpha=alpha, target_density=target_density, controller=controller, sparsify=sparsify
        )
        self._args = {
            "alpha": alpha,
            "target_density": target_density,
            "controller": dict(controller) if controller is not None else None,
            "sparsify": dict(sparsify) if isinstance(sparsify, Mapping) else bool(sparsify),
            "threshold_weight_decay": threshold_weight_decay,
        }
        self.threshold_weight_decay = threshold_weight_decay
        self.controller_state = controller_state
        self._undo: list = []
        self._ids: set[int] = set()  # the thresholds' ids, found once in on_train_begin

    @property
    def controller(self):
        """The :class:`~dst_kernels.DensityController` (``target_density``), else None."""
        return self.reg.controller

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        state = self.reg.state_dict().get("controller")
        if state is None and self.controller_state is not None:
            state = _from_json(self.controller_state)
        return {"args": dict(self._args), "attributes": {"controller_state": _to_json(state)}}

    # ------------------------------------------------------------------ events

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.reg.prepare(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.reg.bind(model, total_steps=state.max_steps if state.max_steps and state.max_steps > 0 else None)
        if self.controller_state is None and state.global_step > 0:
            # A resumed run: trainer_state.json holds what state() returned at the checkpoint
            # (the Trainer restores callbacks itself only with restore_callback_states_from_checkpoint).
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            saved = saved[0] if isinstance(saved, list) and saved else saved
            if isinstance(saved, Mapping):
                self.controller_state = saved.get("attributes", {}).get("controller_state")
        if self.controller_state is not None and self.reg.controller is not None:
            self.reg.controller.load_state_dict(_from_json(self.controller_state))
            self.controller_state = None
        self._ids = _threshold_ids(model)
        if optimizer is not None and not self.threshold_weight_decay:
            self._check_decay(_inner(optimizer))

    def _decayed(self, opt):
        ids = self._ids
        for group in opt.param_groups:
            wd = group.get("weight_decay", 0.0)
            if wd:
                mine = [p for p in group["params"] if id(p) in ids]
                if mine:
                    yield group, wd, mine

    def _check_decay(self, opt) -> None:
        for _group, _wd, _mine in self._decayed(opt):
            if not isinstance(opt, (torch.optim.AdamW, *_COUPLED)):
                raise ValueError(
                    f"DSTTrainerCallback: the Trainer's {type(opt).__name__} applies weight decay to "
                    "the DST thresholds and the callback cannot undo it for this optimiser: pass "
                    "threshold_weight_decay=True, or build the optimiser with the thresholds "
                    "(dst.threshold_parameters(model)) in a group of weight_decay=0"
                )

    def _decoupled(self, opt, group) -> bool:
        return isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        scaler = getattr(optimizer, "scaler", None)
        factor = None
        if scaler is not None and scaler.is_enabled():
            scale = getattr(scaler, "_scale", None)  # a tensor once the scaler has run: no sync
            factor = scale if scale is not None else torch.tensor(float(scaler._init_scale))
        self.reg.add_grad(factor)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._undo = []
        if self.threshold_weight_decay or optimizer is None:
            return
        opt = _inner(optimizer)
        with torch.no_grad():
            for group, wd, mine in self._decayed(opt):
                if self._decoupled(opt, group):
                    self._undo += [(p, p.detach().clone(), group["lr"] * wd) for p in mine]
                else:
                    for p in mine:
                        if p.grad is not None:
                            p.grad.sub_(p.detach(), alpha=wd)

    def on_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            for p, before, amount in self._undo:
                p.add_(before, alpha=amount)  # AdamW's step scaled p by (1 - lr * wd) first
        self._undo = []

    def on_step_end(self, args, state, control, **kwargs):
        self.reg.after_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.reg.layers:
            return
        metrics = {k: float(v) for k, v in self.reg.metrics().items()}  # every logging_steps
        logs.update(metrics)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(metrics)  # the Trainer appended a copy of logs before this event
