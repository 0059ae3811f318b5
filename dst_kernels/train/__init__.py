"""The ``dst-train`` command: dense and DST training runs with metrics, plots and checkpoints."""

from dst_kernels.train.cli import main

__all__ = ["main"]
