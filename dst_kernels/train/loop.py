"""One training run (dense, or DST when the model holds DST layers): epochs of SGD/Adam with
the sparse regulariser, evaluation, per-epoch records, and a state that resumes bit-identically.

Extension points for callers (``dst-train`` uses them; a density controller plugs in here):

* ``alpha_fn(global_step) -> float | Tensor``: the regulariser weight, read once per step, the
  only place the loop reads alpha. A tensor on the device keeps the step free of host syncs.
  When it has ``state_dict``/``load_state_dict`` they are saved in and restored from
  checkpoints.
* ``on_step(trainer)``: called after every optimizer step (``trainer.global_step``, ``.epoch``,
  ``.batch``); must not read the device every step.
* ``on_epoch(record)``: called with each epoch's record.

The device is read once per epoch (the loss sum, the evaluation, the density report) and, when
a progress bar is shown, once every ``log_every`` steps for the running loss.

Under torchrun the model trains under DDP, or sharded by FSDP2 with ``RunConfig.fsdp``
(:func:`dst_kernels.distributed.fully_shard`). FSDP2 all-gathers parameters in every forward,
so there every rank evaluates the same number of batches (lock-step), checkpoints hold the
full state gathered on rank 0 (``torch.distributed.checkpoint.state_dict``), and BatchNorm
buffers are broadcast from rank 0 before each training forward, as DDP does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import dst_kernels as dst
from dst_kernels.distributed import full
from dst_kernels.regulariser import add_penalty_grad_
from dst_kernels.train import dist as D

__all__ = ["Interrupted", "RunConfig", "StopFlag", "Trainer", "evaluate", "train"]


@dataclass
class RunConfig:
    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0  # applies to every parameter, thresholds included (official code)
    optimizer: str = "sgd"
    alpha: float = 0.0  # weight of the sparse regulariser (DST runs only)
    milestones: list[int] = field(default_factory=list)  # lr x0.1 at these epochs
    device: str = "cpu"
    progress: bool | None = None  # None: only on a terminal
    amp: str | None = None  # None, "bf16" or "fp16" (autocast; fp16 adds a GradScaler)
    channels_last: bool = False
    compile: str | None = None  # a torch.compile backend ("inductor"), or None
    log_every: int = 50
    topk: tuple[int, ...] = (1,)
    fsdp: bool = False  # shard with FSDP2 (needs a process group: dist.setup(..., group=True))


class Interrupted(Exception):
    """Raised by :meth:`Trainer.run` when a stop was requested; the trainer's state is
    consistent (between two steps) and can be saved and resumed."""


class StopFlag:
    """SIGINT/SIGTERM handler that asks the loop to stop after the current step.

    A second signal raises KeyboardInterrupt at once. Use as a context manager; it installs
    itself only in the main thread and restores the previous handlers on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __call__(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker forked with this handler: the main process decides
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(
            f"\ndst-train: {signal.Signals(signum).name}: stopping after this step to save a checkpoint "
            "(send it again to abort without saving)",
            file=sys.stderr,
        )

    def __enter__(self) -> StopFlag:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AMP_DTYPES[amp])


def _threshold_stats(model: nn.Module) -> tuple[dict[str, float], float]:
    """Mean threshold per masked weight (keyed like ``sparsity_report`` rows) and over the model.
    One host read for all layers."""
    names, tensors = [], []
    for prefix, module in model.named_modules():
        if not dst.is_dst_layer(module):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if pname.startswith("threshold"):
                weight = "weight" + pname[len("threshold") :]
                names.append(f"{prefix}.{weight}" if prefix else weight)
                tensors.append(full(p.detach()).float().flatten())  # FSDP2: gathered (collective)
    if not tensors:
        return {}, 0.0
    means = torch.stack([t.mean() for t in tensors] + [torch.cat(tensors).mean()]).tolist()
    return dict(zip(names, means[:-1])), means[-1]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device, *, topk=(1,), amp=None, channels_last=False, stop=None, ctx=None
):
    """(mean loss, {k: top-k accuracy as a fraction}) over ``loader``; under torchrun (``ctx``)
    over every rank's share, summed across ranks. A lock-step sampler (FSDP2: every rank runs
    every batch) marks filler samples, whose outputs are dropped."""
    ctx = ctx or D.Context()
    device = torch.device(device)
    sampler = getattr(loader, "batch_sampler", None)
    shares = sampler.shares() if getattr(sampler, "lockstep", False) else None
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros(len(topk), device=device, dtype=torch.int64)
    count = 0
    kmax = max(topk)
    for i, (x, y) in enumerate(loader):
        if stop is not None and stop.requested:
            raise Interrupted
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            out = model(x)
        out = out.float()
        if shares is not None and shares[i] < len(y):  # a filler: the forward only keeps step
            out, y = out[: shares[i]], y[: shares[i]]
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        top = out.topk(min(kmax, out.shape[1]), dim=1).indices
        hits = top == y[:, None]
        correct += torch.stack([hits[:, :k].any(1).sum() for k in topk])
        count += len(y)
    totals = torch.cat(
        [loss_sum[None].double(), correct.double(), torch.tensor([count], device=device).double()]
    )
    values = ctx.all_reduce_sum(totals).tolist()
    count = values[-1]
    if count == 0:
        raise ValueError("evaluate: the test loader gave no batches")
    return values[0] / count, {k: c / count for k, c in zip(topk, values[1:-1])}


class Trainer:
    """A training run that can stop between any two steps and continue bit-identically.

    ``train_loader.batch_sampler`` must have ``set_epoch(epoch, start)`` (see
    :class:`dst_kernels.train.data.EpochBatchSampler`): batches are a function of the epoch,
    so a resumed run only needs the epoch and the batches already done.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader,
        test_loader,
        cfg: RunConfig,
        *,
        label: str,
        alpha_fn: Callable[[int], float | torch.Tensor] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        on_step: Callable[[Trainer], None] | None = None,
        on_best: Callable[[Trainer, dict], None] | None = None,
        stop: StopFlag | None = None,
        ctx: D.Context | None = None,
    ) -> None:
        self.cfg, self.label = cfg, label
        self.ctx = ctx or D.current()
        self.device = torch.device(cfg.device)
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        forward = self.model
        if cfg.fsdp:  # W and t sharded alike; the reset rule runs on the shards (a pre-hook)
            from torch.distributed.device_mesh import init_device_mesh

            from dst_kernels.distributed import fully_shard

            # The mesh on the run's device: FSDP2's default is the machine's accelerator, which
            # would move a --device cpu model to the GPU.
            mesh = init_device_mesh(self.device.type, (torch.distributed.get_world_size(),))
            fully_shard(self.model, mesh=mesh)
        elif self.ctx.distributed:  # gradients of W and t all-reduced by DDP: nothing DST-specific
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(forward, backend=cfg.compile) if cfg.compile else forward
        self._dst_layers = [m for m in model.modules() if dst.is_dst_layer(m)]
        self.sparse = bool(self._dst_layers)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.opt = _optimizer(self.model, cfg)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=cfg.milestones, gamma=0.1)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.alpha_fn, self.on_epoch, self.on_step, self.on_best = alpha_fn, on_epoch, on_step, on_best
        self.stop = stop
        # Position and running sums (all in state_dict).
        self.epoch, self.batch, self.global_step = 1, 0, 0
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.seen = 0
        self.epoch_seconds = 0.0  # training time of the current epoch so far
        self.train_seconds, self.train_steps = 0.0, 0  # whole run
        self.best: dict | None = None
        self.last_record: dict = {}
        self.done = False

    # ------------------------------------------------------------------ state

    def model_state_dict(self) -> dict:
        """The model's state dict; under FSDP2 the full tensors, on the CPU, on rank 0 (the other
        ranks get an empty dict). A collective then: every rank calls it."""
        if not self.cfg.fsdp:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def _model_and_optimizer_state(self) -> tuple[dict, dict | None]:
        if not self.cfg.fsdp:
            return self.model.state_dict(), self.opt.state_dict()
        if self.global_step == 0:  # get_state_dict would first step the fresh optimizer (lr 0),
            return self.model_state_dict(), None  # which starts Adam's step count: nothing to save
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # The optimizer state keyed by parameter names, full tensors: loadable by any world size.
        return get_state_dict(
            self.model, self.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def state_dict(self) -> dict:
        """Everything a resumed run needs. Under torchrun a collective (every rank calls it: the
        running loss is summed over the ranks; under FSDP2 the state is gathered too, full
        tensors on rank 0)."""
        model_state, optimizer_state = self._model_and_optimizer_state()
        loss_sum, seen = self._running_totals()  # over every rank: a resumed rank 0 carries them
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "batch": self.batch,
            "global_step": self.global_step,
            "loss_sum": torch.tensor(loss_sum, dtype=torch.float64),
            "seen": int(seen),
            "epoch_seconds": self.epoch_seconds,
            "train_seconds": self.train_seconds,
            "train_steps": self.train_steps,
            "best": self.best,
            "last_record": self.last_record,
            "done": self.done,
        }
        if hasattr(self.alpha_fn, "state_dict"):
            state["alpha_fn"] = self.alpha_fn.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (under FSDP2 every rank passes the full state)."""
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            if state["optimizer"] is None:  # saved before the first step: a fresh optimizer
                set_model_state_dict(self.model, state["model"], options=options)
            else:
                set_state_dict(
                    self.model,
                    self.opt,
                    model_state_dict=state["model"],
                    optim_state_dict=state["optimizer"],
                    options=options,
                )
        else:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        for key in ("epoch", "batch", "global_step", "seen", "epoch_seconds", "train_seconds", "train_steps"):
            setattr(self, key, state[key])
        self.loss_sum = state["loss_sum"].to(self.device, torch.float64)
        if self.ctx.rank != 0:  # the sums are over every rank: rank 0 carries them
            self.loss_sum, self.seen = torch.zeros_like(self.loss_sum), 0
        self.best, self.last_record, self.done = state["best"], state["last_record"], state["done"]
        if "alpha_fn" in state and hasattr(self.alpha_fn, "load_state_dict"):
            self.alpha_fn.load_state_dict(state["alpha_fn"])

    # ------------------------------------------------------------------ steps

    def alpha(self) -> float | torch.Tensor:
        """The regulariser weight for the current step: the one place the loop reads it."""
        return self.alpha_fn(self.global_step) if self.alpha_fn is not None else self.cfg.alpha

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.cfg.fsdp:
            D.broadcast_buffers(self.model, self.ctx)  # DDP's broadcast_buffers, for FSDP2
        with _autocast(self.device, self.cfg.amp):
            out = self.forward(x)
        task = F.cross_entropy(out.float(), y)
        loss = task
        if self.ctx.distributed:
            # DDP averages the ranks' gradients: weigh each rank's mean by its share of the global
            # batch so that the average is the global batch's mean (exact for uneven shares too).
            n = self.train_loader.batch_sampler.global_batch_size(self.batch)
            loss = task * (len(y) * self.ctx.world / n)
        # The regulariser: its exact gradient added to the thresholds' after the backward (one
        # fused pass, bit-identical to autograd through alpha * sparsity_loss); under FSDP2 (whose
        # thresholds are sharded) its term in the loss.
        add_penalty = None
        if self.sparse:
            alpha = self.alpha()
            controller = self.alpha_fn if hasattr(self.alpha_fn, "penalty") else None  # with its floors
            if self.cfg.fsdp:
                if controller is not None:
                    loss = loss + controller.penalty()
                elif isinstance(alpha, torch.Tensor) or alpha != 0:
                    loss = loss + alpha * dst.sparsity_loss(self.model)
            elif controller is not None:
                add_penalty = controller.add_penalty_grad_
            elif isinstance(alpha, torch.Tensor) or alpha != 0:
                add_penalty = functools.partial(add_penalty_grad_, self._dst_layers, alpha)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if add_penalty is not None:  # the gradients are still scaled (None: scaler disabled)
                add_penalty(factor=self.scaler._scale)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            if add_penalty is not None:
                add_penalty()
            self.opt.step()
        self.loss_sum += task.detach().double() * len(y)  # float64: exact whatever the ranks' split
        self.seen += len(y)
        return task

    def _check_stop(self, force: bool = False) -> None:
        if self.stop is None:
            return
        if not self.ctx.distributed:
            if self.stop.requested:
                raise Interrupted
            return
        # Every rank must stop after the same step: agree on the flag (one collective) at
        # epoch ends and every log_every steps.
        if (force or self.global_step % self.cfg.log_every == 0) and self.ctx.any(
            self.stop.requested, self.device
        ):
            raise Interrupted

    def _train_epoch(self) -> None:
        self.model.train()
        sampler = self.train_loader.batch_sampler
        sampler.set_epoch(self.epoch, self.batch)
        bar = tqdm(
            total=sampler.batches_per_epoch(),
            initial=self.batch,
            desc=f"{self.label} {self.epoch}/{self.cfg.epochs}",
            leave=False,
            disable=(None if self.cfg.progress is None else not self.cfg.progress) if self.ctx.main else True,
            unit="batch",
        )
        started = time.perf_counter()
        try:
            it = iter(self.train_loader)
            while True:
                self._check_stop()
                try:
                    x, y = next(it)
                except StopIteration:
                    break
                except Exception:
                    if self.stop is not None and self.stop.requested:
                        raise Interrupted from None  # a worker that died of the same Ctrl-C
                    raise
                task = self._step(x, y)
                self.batch += 1
                self.global_step += 1
                self.train_steps += 1
                bar.update(1)
                if not bar.disable and self.global_step % self.cfg.log_every == 0:
                    bar.set_postfix(loss=f"{task.item():.4f}")  # one read per log_every steps
                if self.on_step is not None:
                    self.on_step(self)
        finally:
            bar.close()
            elapsed = time.perf_counter() - started
            self.epoch_seconds += elapsed
            self.train_seconds += elapsed
        self._check_stop(force=True)

    def _running_totals(self) -> tuple[float, float]:
        """The epoch's running loss sum and sample count over every rank (one collective under
        torchrun, one host read: it waits for the last step)."""
        totals = torch.stack([self.loss_sum, torch.tensor(float(self.seen), device=self.device).double()])
        loss_sum, seen = self.ctx.all_reduce_sum(totals).tolist()
        return loss_sum, seen

    def _finish_epoch(self) -> dict:
        lr = self.opt.param_groups[0]["lr"]
        loss_sum, seen = self._running_totals()
        mean_loss = loss_sum / max(seen, 1)
        steps = self.train_loader.batch_sampler.batches_per_epoch()
        eval_started = time.perf_counter()
        D.broadcast_buffers(self.model, self.ctx)  # every rank evaluates rank 0's model
        test_loss, acc = evaluate(
            self.model if self.ctx.distributed else self.forward,  # no DDP collectives in eval
            self.test_loader,
            self.device,
            topk=self.cfg.topk,
            amp=self.cfg.amp,
            channels_last=self.cfg.channels_last,
            stop=None if self.ctx.distributed else self.stop,  # ranks may hold different batches
            ctx=self.ctx,
        )
        record = {
            "run": self.label,
            "epoch": self.epoch,
            "loss": mean_loss,
            "test_loss": test_loss,
            "accuracy": acc[1],
        }
        for k in self.cfg.topk:
            if k != 1:
                record[f"top{k}"] = acc[k]
        if self.sparse:
            report = dst.sparsity_report(self.model)
            per_layer, mean_t = _threshold_stats(self.model)
            record["density"] = report.density
            record["mean_threshold"] = mean_t
            record["layers"] = [
                {"name": r.name, "density": r.density, "threshold": per_layer.get(r.name)} for r in report
            ]
            alpha = self.alpha()
            record["alpha"] = float(alpha)  # once per epoch
        else:
            record["density"] = 1.0
            record["layers"] = []
        record["lr"] = lr
        record["steps"] = steps
        record["step_time"] = self.epoch_seconds / max(steps, 1)
        record["seconds"] = self.epoch_seconds + time.perf_counter() - eval_started
        with warnings.catch_warnings():
            # A run resumed right after an epoch's last step steps the scheduler before the
            # fresh optimizer object has stepped; the schedule itself is the restored one.
            warnings.filterwarnings(
                "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
            )
            self.sched.step()
        self.last_record = record
        if self.best is None or record["accuracy"] > self.best["accuracy"]:
            self.best = {"epoch": self.epoch, "accuracy": record["accuracy"]}
            if self.on_best is not None:
                self.on_best(self, record)
        self.epoch += 1
        self.batch, self.seen, self.epoch_seconds = 0, 0, 0.0
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        if self.cfg.progress is not False and self.ctx.main:
            tqdm.write(
                f"{self.label} epoch {record['epoch']:3d}/{self.cfg.epochs}: loss {record['loss']:.4f}  "
                f"test acc {100 * record['accuracy']:6.2f}%  density {100 * record['density']:6.2f}%"
            )
        if self.on_epoch is not None:
            self.on_epoch(record)
        return record

    def run(self) -> dict:
        """Train until ``cfg.epochs`` are done; returns the last epoch's record. Raises
        :class:`Interrupted` (state consistent) when the stop flag is set."""
        while self.epoch <= self.cfg.epochs:
            self._train_epoch()
            self._finish_epoch()
        self.done = True
        return self.last_record


def train(model, train_loader, test_loader, cfg: RunConfig, *, label: str, on_epoch=None, **kwargs) -> dict:
    """Train ``model`` to the end and return the last epoch's record (see :class:`Trainer`)."""
    return Trainer(model, train_loader, test_loader, cfg, label=label, on_epoch=on_epoch, **kwargs).run()
