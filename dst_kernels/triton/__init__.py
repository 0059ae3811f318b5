"""The ``triton`` backend: Triton kernels for DST, registered as torch ops.

Usable on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported). One file per op family:
``mask.py``, ``weight_grad.py``, ``linear.py``, ``conv2d.py``; ``_runtime.py`` and
``_gemm.py`` hold what they share.
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here: the backend is unavailable)

from dst_kernels.triton._runtime import interpreting, usable
from dst_kernels.triton.conv2d import conv2d, conv2d_igemm
from dst_kernels.triton.linear import linear
from dst_kernels.triton.mask import masked_weight
from dst_kernels.triton.weight_grad import weight_grad

__all__ = ["usable", "interpreting", "masked_weight", "weight_grad", "linear", "conv2d", "conv2d_igemm"]
