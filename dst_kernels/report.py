"""Per-layer sparsity report."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dst_kernels._dtensor import full as full_tensor
from dst_kernels.nn.base import is_dst_layer

__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report"]


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    kept: int
    total: int
    density: float


class SparsityReport(list):
    """A list of :class:`LayerSparsity` rows that prints as a table.

    ``report.rows()`` gives plain dicts (for JSON); ``report.kept``,
    ``report.total`` and ``report.density`` the figures over the masked weights
    only. What they do not cover: ``report.unmasked`` counts the model's other
    parameter elements (biases, norms, embeddings, layers left dense; thresholds not
    counted) and ``report.dense_weights`` names its weight matrices left dense.
    """

    unmasked: int = 0
    dense_weights: tuple[str, ...] = ()

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self)

    @property
    def total(self) -> int:
        return sum(r.total for r in self)

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0

    def rows(self) -> list[dict]:
        return [dict(asdict(r), shape=list(r.shape)) for r in self]

    def __str__(self) -> str:
        header = ("layer", "shape", "kept", "total", "density")
        body = [
            (
                r.name,
                "x".join(map(str, r.shape)),
                str(r.kept),
                str(r.total),
                f"{100 * r.density:.2f}%",
            )
            for r in self
        ]
        body.append(("total", "", str(self.kept), str(self.total), f"{100 * self.density:.2f}%"))
        note = f"  (masked weights only; {self.unmasked} other parameters not counted"
        if self.dense_weights:
            names = ", ".join(self.dense_weights[:3]) + (", ..." if len(self.dense_weights) > 3 else "")
            note += f", incl. {len(self.dense_weights)} weight matrices left dense: {names}"
        note += ")"
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

        def line(row):
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *map(line, body[:-1]), rule, line(body[-1]) + note])


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """One row per masked weight of every DST layer: name, shape, kept, total, density.

    The totals cover the masked weights only; ``unmasked`` and ``dense_weights`` say
    what else the model holds (printed after the total).

    Reading the counts synchronises with the device once (a single transfer for
    all layers); call it for logging, not inside the training step.
    """
    entries = []
    covered: set[int] = set()
    for name, module in model.named_modules():
        if not is_dst_layer(module):
            continue
        for w_name, mask in module.masks().items():
            full = f"{name}.{w_name}" if name else w_name
            entries.append((full, tuple(mask.shape), mask.sum(), mask.numel()))
            covered.add(id(module.dense_weight(w_name)))
        covered.update(id(t) for t in module.thresholds())
    unmasked, dense_weights = 0, []
    for name, p in model.named_parameters():
        if id(p) in covered:
            continue
        unmasked += p.numel()
        if p.dim() >= 2:
            dense_weights.append(name)
    counts = torch.stack([full_tensor(e[2]).cpu() for e in entries]).tolist() if entries else []
    report = SparsityReport(
        LayerSparsity(name, shape, int(k), total, int(k) / total)
        for (name, shape, _, total), k in zip(entries, counts)
    )
    report.unmasked = unmasked
    report.dense_weights = tuple(dense_weights)
    return report
