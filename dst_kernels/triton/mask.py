"""The mask in Triton: ``P = W * M`` with the kept count, and the reset rule on the device;
its backward is the estimator gradient (``weight_grad.py``). Registered as torch ops."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dst_kernels.triton._runtime import BLOCK_C, BLOCK_R, check_first_order, grid
from dst_kernels.triton.weight_grad import weight_grad

__all__ = ["masked_weight", "reset_"]


@triton.jit
def _mask_kernel(
    w_ptr, t_ptr, out_ptr, count_ptr, rows, cols, WRITE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr
):
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(cols, BC)
    r = (pid // col_blocks) * BR + tl.arange(0, BR)
    c = (pid % col_blocks) * BC + tl.arange(0, BC)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    offs = r[:, None].to(tl.int64) * cols + c[None, :]
    w = tl.load(w_ptr + offs, mask=inside, other=0.0)
    t = tl.load(t_ptr + r, mask=r < rows, other=0.0)
    keep = (tl.abs(w) > t[:, None]) & inside  # in the weight's dtype, as the reference compares
    if WRITE:
        tl.store(out_ptr + offs, w * keep.to(w.dtype), mask=inside)
    # Integer: exact and order-free; int64, so a weight of 2**31 elements or more counts right.
    tl.atomic_add(count_ptr, tl.sum(keep.to(tl.int32)).to(tl.int64))


@triton.jit
def _reset_kernel(t_ptr, count_ptr, rows, limit, BLOCK: tl.constexpr):
    # limit = floor(min_density * numel) in float64 on the host: kept <= limit exactly
    # when kept <= min_density * numel, the reference's test.
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    kept = tl.load(count_ptr)
    due = kept <= limit
    t = tl.load(t_ptr + r, mask=r < rows, other=0.0)
    tl.store(t_ptr + r, tl.where(due, tl.zeros_like(t), t), mask=r < rows)


def _count(weight2d: torch.Tensor, threshold: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    rows, cols = weight2d.shape
    count = torch.zeros(1, dtype=torch.int64, device=weight2d.device)
    wrap_triton(_mask_kernel)[grid(rows, cols)](
        weight2d,
        threshold,
        weight2d if out is None else out,
        count,
        rows,
        cols,
        WRITE=out is not None,
        BR=BLOCK_R,
        BC=BLOCK_C,
    )
    return count


@triton_op("dst_kernels::triton_reset_", mutates_args={"threshold"})
def _reset_op(weight: torch.Tensor, threshold: torch.Tensor, min_density: float) -> None:
    w2 = weight.reshape(weight.shape[0], -1)
    count = _count(w2, threshold, None)
    rows = threshold.numel()
    limit = math.floor(min_density * w2.numel())
    wrap_triton(_reset_kernel)[(triton.cdiv(rows, 1024),)](threshold, count, rows, limit, BLOCK=1024)


def reset_(weight: torch.Tensor, threshold: torch.Tensor, min_density: float) -> None:
    """The reset rule in place on ``threshold``: a count pass and a device-side update."""
    with torch.no_grad():
        torch.ops.dst_kernels.triton_reset_(weight.detach().contiguous(), threshold.detach(), min_density)


@triton_op("dst_kernels::triton_masked_weight", mutates_args=())
def _masked_weight_op(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    w2 = weight.contiguous().reshape(weight.shape[0], -1)
    out = torch.empty_like(w2)
    _count(w2, threshold, out)
    return out.reshape(weight.shape)


def _setup(ctx, inputs, output):
    weight, threshold = inputs
    ctx.save_for_backward(weight, threshold.detach().clone())


def _backward(ctx, grad):
    weight, threshold = ctx.saved_tensors
    check_first_order("triton_masked_weight", grad, weight)
    grad_w, grad_t = weight_grad(grad, weight, threshold)
    return (grad_w if ctx.needs_input_grad[0] else None, grad_t if ctx.needs_input_grad[1] else None)


_masked_weight_op.register_autograd(_backward, setup_context=_setup)


def masked_weight(weight, threshold, min_density=None):
    """``P = W * M``; with ``min_density`` set, the reset rule first (``threshold`` in place)."""
    if min_density is not None:
        reset_(weight, threshold, min_density)
    return torch.ops.dst_kernels.triton_masked_weight(weight, threshold)
