"""The ``dst-train`` command: dense and DST training runs with metrics, plots and checkpoints.

It needs the ``train`` extra (numpy, tqdm, matplotlib): ``pip install 'dst_kernels[train]'``.
The library itself needs torch only.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["main"]

EXTRA = ("numpy", "tqdm", "matplotlib")


def missing_extra() -> list[str]:
    """The packages of the ``train`` extra that are not installed."""
    return [name for name in EXTRA if importlib.util.find_spec(name) is None]


def main(argv=None, **kwargs) -> int:
    """``dst-train``: says which extra to install when one of its packages is missing."""
    missing = missing_extra()
    if missing:
        print(
            f"dst-train needs {', '.join(missing)} (the train extra): pip install 'dst_kernels[train]'",
            file=sys.stderr,
        )
        return 2
    from dst_kernels.train.cli import main as cli_main

    return cli_main(argv, **kwargs)
