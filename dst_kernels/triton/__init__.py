"""The ``triton`` backend: Triton kernels for DST, registered as torch ops.

Usable on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton  # noqa: F401  (ImportError here: the backend is unavailable)

__all__ = ["usable", "interpreting", "masked_weight", "linear", "conv2d", "conv2d_igemm"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return device.type == "cpu" and interpreting()


from dst_kernels.triton.conv import conv2d_igemm  # noqa: E402
from dst_kernels.triton.linear import linear  # noqa: E402
from dst_kernels.triton.mask import masked_weight  # noqa: E402


def conv2d(x, weight, threshold, bias, stride, padding, dilation, groups, min_density=None):
    """The Triton mask and estimator kernels around ATen's convolution."""
    return F.conv2d(x, masked_weight(weight, threshold, min_density), bias, stride, padding, dilation, groups)
