"""Turn a DST-trained model into a plain PyTorch model, a smaller one, or a sparse one.

``fold`` / ``dense_state_dict`` (``export/fold.py``), ``compact`` (``export/compact.py``),
``to_sparse`` / ``SparseLinear`` / ``SparseConv2d`` / ``save_sparse`` / ``load_sparse``
(``export/sparse.py``),
``to_onnx`` (``export/onnx.py``), ``save_safetensors`` / ``load_safetensors`` /
``save_pretrained`` (``export/files.py``).
"""

from __future__ import annotations

from dst_kernels.export.compact import compact
from dst_kernels.export.files import load_safetensors, save_pretrained, save_safetensors
from dst_kernels.export.fold import dense_state_dict, fold
from dst_kernels.export.onnx import to_onnx
from dst_kernels.export.sparse import (
    SparseConv2d,
    SparseGRU,
    SparseLinear,
    SparseLSTM,
    load_sparse,
    save_sparse,
    to_sparse,
)

__all__ = [
    "compact",
    "fold",
    "dense_state_dict",
    "to_sparse",
    "save_sparse",
    "load_sparse",
    "SparseLinear",
    "SparseConv2d",
    "SparseLSTM",
    "SparseGRU",
    "to_onnx",
    "save_safetensors",
    "load_safetensors",
    "save_pretrained",
]
