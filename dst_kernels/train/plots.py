"""Figures of a run (matplotlib, PNG)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_density"]


def plot_density(records: list[dict], path: str, title: str) -> None:
    """Per-layer remaining ratio (%) against epoch, as in the paper's figures."""
    records = [r for r in records if r.get("layers")]
    if not records:
        return
    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    names = [layer["name"] for layer in records[0]["layers"]]
    for i, name in enumerate(names):
        ax.plot(epochs, [100 * r["layers"][i]["density"] for r in records], label=name, lw=1.5)
    ax.plot(epochs, [100 * r["density"] for r in records], "k--", label="whole model", lw=1.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("remaining weights (%)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
