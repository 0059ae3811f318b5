"""Sparse execution in training: when the native CPU ``dst_linear`` uses the sparse kernels.

In training, the native CPU kernels of ``dst_linear`` switch to the sparse product below a
measured density crossover; ``sparse_mode`` forces the choice (tests, measurements) and
``crossover`` gives the density for a layer's shape. The inference side (``SparseLinear``,
``to_sparse``, ``save_sparse``, ``load_sparse``) lives in ``dst_kernels.export.sparse`` and
is re-exported here, so objects pickled under ``dst_kernels.sparse`` load.
"""

from __future__ import annotations

import contextlib

import torch

from dst_kernels.export.sparse import (
    DEFAULT_MAX_DENSITY,
    SPARSE_FORMAT,
    SparseConv2d,
    SparseGRU,
    SparseLinear,
    SparseLSTM,
    load_sparse,
    require_native,
    save_sparse,
    to_sparse,
)

__all__ = [
    "SparseLinear",
    "SparseConv2d",
    "SparseLSTM",
    "SparseGRU",
    "to_sparse",
    "save_sparse",
    "load_sparse",
    "sparse_mode",
    "crossover",
    "conv_crossover",
    "SPARSE_FORMAT",
    "DEFAULT_MAX_DENSITY",
]

_MODES = {"auto": 0, "always": 1, "never": 2}


class _Mode(contextlib.ContextDecorator):
    def __init__(self, mode: str):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        require_native("sparse_mode")
        self._old = torch.ops.dst_kernels.sparse_mode(_MODES[mode])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        torch.ops.dst_kernels.sparse_mode(self._old)
        return False


def sparse_mode(mode: str | None = None):
    """When the native CPU ``dst_linear`` and ``dst_conv2d`` use the sparse kernels.

    ``"auto"`` (default): below the measured density crossover of the layer's shape;
    ``"always"``; ``"never"`` (dense GEMMs). With no argument, returns the mode in force.
    Called with a mode it sets it process-wide and returns a context manager that
    restores the previous mode on exit::

        with dst.sparse.sparse_mode("never"):
            loss.backward()
    """
    if mode is None:
        require_native("sparse_mode")
        current = torch.ops.dst_kernels.sparse_mode(-1)
        return next(name for name, value in _MODES.items() if value == current)
    return _Mode(mode)


def conv_crossover(batch: int, in_channels: int, out_channels: int, kernel: int, out_pixels: int) -> float:
    """The density below which ``dst_conv2d``'s CPU kernels take the sparse path (forward and
    dX) for a groups-1 convolution of this shape (``kernel`` = kh * kw weights per input
    channel, ``out_pixels`` = OH * OW outputs per image)."""
    require_native("conv_crossover")
    return torch.ops.dst_kernels.sparse_conv_crossover(batch, in_channels, out_channels, kernel, out_pixels)


def crossover(tokens: int, in_features: int, out_features: int) -> float:
    """The density below which ``dst_linear``'s CPU kernels take the sparse path for a layer
    of this shape (``tokens`` rows of input)."""
    require_native("crossover")
    return torch.ops.dst_kernels.sparse_crossover(tokens, in_features, out_features)
