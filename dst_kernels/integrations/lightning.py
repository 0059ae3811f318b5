"""``DSTCallback``: Dynamic Sparse Training in a PyTorch Lightning ``Trainer``, one line.

    import dst_kernels as dst
    from dst_kernels.integrations.lightning import DSTCallback

    model = MyLightningModule()
    dst.sparsify(model)                                       # or DSTCallback(..., sparsify=True)
    trainer = L.Trainer(callbacks=[DSTCallback(alpha=5e-4)])  # or target_density=0.05
    trainer.fit(model, loader)

The callback adds ``alpha * d/dt sum exp(-t)`` to the thresholds' gradients in
``on_before_optimizer_step``: once per optimiser step, after every micro-batch's backward
(gradient accumulation), after Lightning unscales AMP's gradients and before it clips them.
The result is that of ``loss + alpha * dst.sparsity_loss(model)`` with the loss untouched.
``target_density=`` adapts alpha with a :class:`~dst_kernels.DensityController` (its state is
saved in Lightning's checkpoints and restored with them). Thresholds leave weight decay
(``threshold_weight_decay=False``, the default) by moving into a group of their own before
the first step. Every ``log_every`` steps the model's and each layer's density and alpha go
to Lightning's logger (``dst/density``, ``dst/density/<layer>``, ``dst/alpha``).
"""

from __future__ import annotations

from collections.abc import Mapping

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError(
            "dst_kernels.integrations.lightning needs PyTorch Lightning: pip install lightning"
        ) from e

from dst_kernels.integrations._common import DSTRegulariser, exclude_thresholds_from_weight_decay_

__all__ = ["DSTCallback"]


class DSTCallback(pl.Callback):
    """Dynamic Sparse Training for a Lightning ``Trainer``.

    Args:
        alpha: the regulariser's weight (the paper's alpha); with ``target_density`` its start.
        target_density: adapt alpha during training so that the model ends at this kept
            fraction (a :class:`~dst_kernels.DensityController`, ramped over the run's
            ``max_steps`` or estimated steps).
        controller: more keyword arguments of the controller (``every``, ``floors``, ...).
        sparsify: ``True`` (or ``sparsify``'s keyword arguments) converts the module's layers
            in ``setup``, before Lightning builds the optimiser.
        log_every: steps between two density logs (each is one count of the masks).
        threshold_weight_decay: keep the thresholds in their groups' weight decay.
    """

    def __init__(
        self,
        *,
        alpha: float | None = None,
        target_density: float | None = None,
        controller: Mapping | None = None,
        sparsify: bool | Mapping = False,
        log_every: int = 50,
        threshold_weight_decay: bool = False,
    ):
        super().__init__()
        self.reg = DSTRegulariser(
            alpha=alpha,
            target_density=target_density,
            controller=controller,
            sparsify=sparsify,
            log_every=log_every,
        )
        self.threshold_weight_decay = threshold_weight_decay
        self._steps_seen = None

    @property
    def controller(self):
        """The :class:`~dst_kernels.DensityController` (``target_density``), else None."""
        return self.reg.controller

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.reg.prepare(pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        total = trainer.estimated_stepping_batches
        total = int(total) if total is not None and total != float("inf") else None
        self.reg.bind(pl_module, total_steps=total)
        if not self.threshold_weight_decay:
            for optimizer in trainer.optimizers:
                exclude_thresholds_from_weight_decay_(optimizer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        self._steps_seen = trainer.global_step  # after a checkpoint's loops are restored

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.reg.add_grad()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._steps_seen:
            return  # an accumulation micro-batch: the optimiser did not step
        for _ in range(trainer.global_step - self._steps_seen):
            self.reg.after_step()
        self._steps_seen = trainer.global_step
        if trainer.global_step % self.reg.log_every == 0:
            pl_module.log_dict(self.reg.metrics(), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return self.reg.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.reg.load_state_dict(state_dict)
