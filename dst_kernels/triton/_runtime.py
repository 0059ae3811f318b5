"""What the Triton kernels share: where they can run, the launch grid of the elementwise
kernels, the estimator ``H`` in Triton, and the first-order-only check."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "BLOCK_C",
    "BLOCK_R",
    "MAX_PROGRAMS",
    "blocks",
    "check_first_order",
    "estimator_tl",
    "grid",
    "interpreting",
    "usable",
]

BLOCK_R, BLOCK_C = 16, 64
# A CUDA grid's y and z dimensions stop at 65535 programs; x goes to 2**31 - 1. The
# elementwise kernels use a 1-D grid over (row block, column block) pairs.
MAX_PROGRAMS = 2**31 - 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return device.type == "cpu" and interpreting()


@triton.jit
def estimator_tl(q):
    """H(q) in q's dtype: 2 - 4|q| for |q| <= 0.4, 0.4 for |q| <= 1, else 0 (NaN -> 0)."""
    a = tl.abs(q)
    # 0.4 rounded in q's own dtype (a bare literal would be float32's 0.4 in float64 maths).
    c04 = (tl.zeros_like(a) + 2.0) / 5.0
    return tl.where(a <= c04, 2.0 - 4.0 * a, tl.where(a <= 1.0, c04, tl.zeros_like(a)))


def blocks(rows: int, cols: int) -> tuple[int, int]:
    """(row blocks, column blocks) of a ``rows x cols`` weight."""
    return triton.cdiv(rows, BLOCK_R), triton.cdiv(cols, BLOCK_C)


def grid(rows: int, cols: int) -> tuple[int]:
    """The 1-D launch grid of the elementwise kernels: one program per (row, column) block."""
    row_blocks, col_blocks = blocks(rows, cols)
    programs = row_blocks * col_blocks
    if programs > MAX_PROGRAMS:
        raise ValueError(
            f"weight of shape [{rows}, {cols}] needs {programs} Triton programs, more than a "
            f"CUDA grid holds ({MAX_PROGRAMS}); use backend='native' for weights this large"
        )
    return (programs,)


def check_first_order(op: str, *tensors: torch.Tensor) -> None:
    """Refuse backward with create_graph=True: the kernels' outputs carry no second-order graph."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise NotImplementedError(
            f"{op}: double backward (create_graph=True) is not supported by the triton backend; "
            'use backend="reference" for higher-order gradients'
        )
