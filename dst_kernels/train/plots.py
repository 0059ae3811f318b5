"""Figures of a run (matplotlib, PNG): the paper's Figures 4-7 for one model."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_accuracy", "plot_density", "plot_layer_bars"]


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_density(records: list[dict], path: str, title: str) -> None:
    """Per-layer remaining ratio (%) against epoch, and the whole model's."""
    records = [r for r in records if r.get("layers")]
    if not records:
        return
    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    names = [layer["name"] for layer in records[0]["layers"]]
    many = len(names) > 12
    for i, name in enumerate(names):
        ax.plot(
            epochs,
            [100 * r["layers"][i]["density"] for r in records],
            label=None if many else name,
            lw=1.0 if many else 1.5,
            alpha=0.6 if many else 1.0,
        )
    ax.plot(epochs, [100 * r["density"] for r in records], "k--", label="whole model", lw=2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("remaining weights (%)")
    ax.set_yscale("log")
    ax.set_title(title + (f" ({len(names)} layers)" if many else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_accuracy(records: list[dict], path: str, title: str) -> None:
    """Test accuracy (%) against epoch of the dense and the DST run."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for run, style in (("dense", "C0-"), ("dst", "C3-")):
        rs = [r for r in records if r["run"] == run]
        if rs:
            ax.plot(
                [r["epoch"] for r in rs], [100 * r["accuracy"] for r in rs], style, label=run.upper(), lw=1.5
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_layer_bars(records: list[dict], path: str, title: str) -> None:
    """The last epoch's remaining ratio (%) of every layer, as bars."""
    records = [r for r in records if r.get("layers")]
    if not records:
        return
    layers = records[-1]["layers"]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.25 * len(layers) + 2), 4.2), dpi=120)
    ax.bar(range(len(layers)), [100 * layer["density"] for layer in layers], color="C3")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(
        [layer["name"] for layer in layers], rotation=90, fontsize=6 if len(layers) > 12 else 8
    )
    ax.set_ylabel("remaining weights (%)")
    ax.set_title(
        f"{title} (epoch {records[-1]['epoch']}, whole model {100 * records[-1]['density']:.2f}%)",
        fontsize=10,
    )
    ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path)
