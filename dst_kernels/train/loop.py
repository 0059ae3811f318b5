"""One training run: epochs of SGD/Adam with the sparse regulariser, evaluation, metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import dst_kernels as dst

__all__ = ["RunConfig", "evaluate", "train"]


@dataclass
class RunConfig:
    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    alpha: float = 0.0  # weight of the sparse regulariser (DST runs only)
    milestones: list[int] = field(default_factory=list)  # lr x0.1 at these epochs
    device: str = "cpu"
    progress: bool | None = None  # None: only on a terminal


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str) -> tuple[float, float]:
    """(mean loss, accuracy as a fraction) over ``loader``."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        count += len(y)
    return loss_sum.item() / count, correct.item() / count


def train(
    model: nn.Module,
    train_loader,
    test_loader,
    cfg: RunConfig,
    *,
    label: str,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``model`` (dense, or DST when it holds DST layers) and return the last epoch's record.

    Each epoch's record (``run``, ``epoch``, ``loss``, ``accuracy``, ``test_loss``,
    ``density``, ``layers``, ``seconds``) is passed to ``on_epoch``.
    """
    model.to(cfg.device)
    sparse = any(dst.is_dst_layer(m) for m in model.modules())
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=0.1)
    record: dict = {}
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=cfg.device)
        seen = 0
        bar = tqdm(
            train_loader,
            desc=f"{label} {epoch}/{cfg.epochs}",
            leave=False,
            disable=None if cfg.progress is None else not cfg.progress,
            unit="batch",
        )
        for x, y in bar:
            x, y = x.to(cfg.device, non_blocking=True), y.to(cfg.device, non_blocking=True)
            task = F.cross_entropy(model(x), y)
            loss = task + cfg.alpha * dst.sparsity_loss(model) if sparse and cfg.alpha else task
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += task.detach() * len(y)
            seen += len(y)
        sched.step()
        test_loss, accuracy = evaluate(model, test_loader, cfg.device)
        record = {
            "run": label,
            "epoch": epoch,
            "loss": loss_sum.item() / seen,
            "test_loss": test_loss,
            "accuracy": accuracy,
            "seconds": time.perf_counter() - start,
        }
        if sparse:
            report = dst.sparsity_report(model)
            record["density"] = report.density
            record["layers"] = [{"name": r.name, "density": r.density} for r in report]
        else:
            record["density"] = 1.0
            record["layers"] = []
        if cfg.progress is not False:
            tqdm.write(
                f"{label} epoch {epoch:3d}/{cfg.epochs}: loss {record['loss']:.4f}  "
                f"test acc {100 * accuracy:6.2f}%  density {100 * record['density']:6.2f}%"
            )
        if on_epoch is not None:
            on_epoch(record)
    return record
