"""ONNX export of DST-trained models: ``to_onnx`` checks what ONNX can hold, then runs
``torch.onnx.export(..., dynamo=True)``.

ONNX has operators for what ``fold`` and ``compact`` give (plain Linear, Conv2d, LSTM, ...),
not for dst_kernels' own ops: a model that still has DST layers, or a ``to_sparse`` model
(its CSR kernels are ``torch.ops.dst_kernels``), is refused with a message that says to fold
it first. ``torch.export.export`` takes all three forms; the graph of a ``to_sparse`` model
calls ``torch.ops.dst_kernels.dst_sparse_mm`` and runs where dst_kernels is installed.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from dst_kernels.export.sparse import SparseConv2d, SparseGRU, SparseLinear, SparseLSTM
from dst_kernels.nn.base import is_dst_layer

__all__ = ["to_onnx"]


def _check_exportable(model: nn.Module) -> None:
    dst_layers = [n or type(model).__name__ for n, m in model.named_modules() if is_dst_layer(m)]
    if dst_layers:
        shown = ", ".join(dst_layers[:4]) + (", ..." if len(dst_layers) > 4 else "")
        raise ValueError(
            f"to_onnx: the model still has DST layers ({shown}), whose masked ops ONNX has no "
            "operator for: export dst_kernels.export.fold(model) (or .compact(model)) instead"
        )
    kinds = (SparseLinear, SparseConv2d, SparseLSTM, SparseGRU)
    found = [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, kinds)]
    if found:
        sparse = [n or type(model).__name__ for n, _ in found]
        names = "/".join(sorted({k for _, k in found}))
        raise ValueError(
            f"to_onnx: {', '.join(sparse[:4])} {'is a' if len(sparse) == 1 else 'are'} to_sparse "
            f"{names} layer(s), whose CSR kernels are dst_kernels ops that ONNX has no operator "
            "for: export dst_kernels.export.fold(model) of the DST model instead (torch.export.export "
            "takes the to_sparse model as it is)"
        )


def to_onnx(model: nn.Module, args: tuple, path=None, **kwargs):
    """``torch.onnx.export(model, args, path, dynamo=True, **kwargs)`` after checking that
    ONNX can hold every layer (``ValueError`` naming the layers and what to do otherwise).
    Returns the ``torch.onnx.ONNXProgram`` (saved to ``path`` when given)."""
    _check_exportable(model)
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"to_onnx needs {' and '.join(missing)}: pip install onnx onnxscript")
    import torch

    return torch.onnx.export(model, args, path, dynamo=True, **kwargs)
