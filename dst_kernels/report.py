"""Per-layer sparsity report."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dst_kernels.nn import is_dst_layer

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
    ``report.total`` and ``report.density`` the whole model's figures.
    """

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
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

        def line(row):
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *map(line, body[:-1]), rule, line(body[-1])])


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """One row per masked weight of every DST layer: name, shape, kept, total, density.

    Reading the counts synchronises with the device once (a single transfer for
    all layers); call it for logging, not inside the training step.
    """
    entries = []
    for name, module in model.named_modules():
        if not is_dst_layer(module):
            continue
        for w_name, mask in module.masks().items():
            full = f"{name}.{w_name}" if name else w_name
            entries.append((full, tuple(mask.shape), mask.sum(), mask.numel()))
    counts = torch.stack([e[2].cpu() for e in entries]).tolist() if entries else []
    return SparsityReport(
        LayerSparsity(name, shape, int(k), total, int(k) / total)
        for (name, shape, _, total), k in zip(entries, counts)
    )
