"""The estimator gradient in Triton: ``dW = G*M + G*|W|*H(Q)`` and ``dt = -sum_j G*W*H(Q)``
in one elementwise pass, the row sums from per-block partials in a fixed order. Registered
as ``torch.ops.dst_kernels.triton_weight_grad``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dst_kernels.triton._runtime import BLOCK_C, BLOCK_R, blocks, estimator_tl, grid

__all__ = ["weight_grad"]


@triton.jit
def _weight_grad_kernel(
    g_ptr, w_ptr, t_ptr, dw_ptr, part_ptr, rows, cols, ACC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr
):
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(cols, BC)
    pid_c = pid % col_blocks
    r = (pid // col_blocks) * BR + tl.arange(0, BR)
    c = pid_c * BC + tl.arange(0, BC)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    offs = r[:, None].to(tl.int64) * cols + c[None, :]
    w = tl.load(w_ptr + offs, mask=inside, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(ACC)
    t = tl.load(t_ptr + r, mask=r < rows, other=0.0).to(ACC)
    aw = tl.abs(w)
    h = estimator_tl(aw - t[:, None])
    dw = tl.where(aw > t[:, None], g, tl.zeros_like(g)) + g * aw * h
    tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=inside)
    # A partial row sum per column block; summed in a fixed order afterwards.
    tl.store(part_ptr + pid_c.to(tl.int64) * rows + r, -tl.sum(g * w * h, axis=1), mask=r < rows)


@triton_op("dst_kernels::triton_weight_grad", mutates_args=())
def _weight_grad_op(
    grad_masked: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    w2 = weight.contiguous().reshape(weight.shape[0], -1)
    g2 = grad_masked.to(weight.dtype).contiguous().reshape(w2.shape)
    rows, cols = w2.shape
    launch = grid(rows, cols)
    grad_w = torch.empty_like(w2)
    wide = weight.dtype == torch.float64  # float64 stays float64; others compute in float32
    col_blocks = blocks(rows, cols)[1]  # every program writes its partial: no stale rows
    partial = torch.empty(
        (col_blocks, rows), dtype=torch.float64 if wide else torch.float32, device=w2.device
    )
    acc = tl.float64 if wide else tl.float32
    wrap_triton(_weight_grad_kernel)[launch](
        g2, w2, threshold, grad_w, partial, rows, cols, ACC=acc, BR=BLOCK_R, BC=BLOCK_C
    )
    return grad_w.reshape(weight.shape), partial.sum(0).to(threshold.dtype)


def weight_grad(grad_masked: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor):
    """``(dW, dt)`` of the masked weight's backward for ``G = grad_masked``."""
    return torch.ops.dst_kernels.triton_weight_grad(grad_masked, weight, threshold)
