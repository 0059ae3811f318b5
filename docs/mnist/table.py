"""The README's MNIST results table, from the run summaries in this folder.

    python docs/mnist/table.py    # prints the Markdown rows

Each ``<model>-<run>[-seedN]-summary.json`` is the ``summary.json`` that ``dst-train``
wrote for that run (the command is in it). Accuracies in %, densities in % of the masked
weights; a LeNet-300-100 cell with three seeds is "mean (min-max)".
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAPER = {  # dense, DST density, DST accuracy (docs/maths.md section 2)
    "lenet300": (98.16, 2.48, 97.69),
    "lenet5": (99.18, 1.64, 99.11),
    "lstm_a": (98.64, 1.93, 98.70),
    "lstm_b": (98.87, 0.98, 98.89),
}
NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5-Caffe", "lstm_a": "LSTM-a", "lstm_b": "LSTM-b"}


def _load(model: str, run: str) -> list[dict]:
    files = sorted(HERE.glob(f"{model}-{run}-summary.json")) + sorted(
        HERE.glob(f"{model}-{run}-seed*-summary.json")
    )
    return [json.loads(f.read_text()) for f in files]


def _cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def rows() -> list[str]:
    header = [
        "model",
        "run",
        "dense",
        "DST, last epoch: accuracy at density",
        "DST, best accuracy at its density",
        "DST, best keep ratio (its accuracy)",
        "paper: dense; DST at density",
    ]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, (p_dense, p_density, p_acc) in PAPER.items():
        for run, label in (
            ("paper", "the paper's alpha and recipe"),
            ("target", f"`--target-density {p_density / 100:g}`"),
        ):
            runs = _load(model, run)
            if not runs:
                continue
            dense = [100 * s["dense"]["accuracy"] for s in runs if s.get("dense")]
            d = [s["dst"] for s in runs]
            last = f"{_cell([100 * x['accuracy'] for x in d])} at {_cell([100 * x['density'] for x in d])}"
            best_acc = _cell([100 * x["best_accuracy"]["accuracy"] for x in d])
            best = f"{best_acc} at {_cell([100 * x['best_accuracy']['density'] for x in d])}"
            keep_acc = _cell([100 * x["best_keep"]["accuracy"] for x in d])
            keep = f"{_cell([100 * x['best_keep']['density'] for x in d])} ({keep_acc})"
            seeds = f", {len(runs)} seeds" if len(runs) > 1 else ""
            out.append(
                f"| {NAMES[model]} | {label}{seeds} | {_cell(dense)} | {last} | {best} | {keep} | "
                f"{p_dense:.2f}; {p_acc:.2f} at {p_density:.2f} |"
            )
    return out


def speed_rows() -> list[str]:
    out = ["| model | phase | seconds per epoch | steps per second | runs |", "|---|---|---|---|---|"]
    for model in PAPER:
        runs = _load(model, "paper") + _load(model, "target")
        for phase in ("dense", "dst"):
            sps = [s[f"{phase}_train"]["steps_per_second"] for s in runs if s.get(f"{phase}_train")]
            spe = [
                s[f"{phase}_train"]["train_seconds"] / s["epochs"] for s in runs if s.get(f"{phase}_train")
            ]
            if sps:
                out.append(f"| {NAMES[model]} | {phase} | {_cell(spe, 1)} | {_cell(sps, 1)} | {len(sps)} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
    print()
    print("\n".join(speed_rows()))
