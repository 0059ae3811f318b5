"""Elementwise DST kernels in Triton: the mask (P = W * M, kept count), the reset rule
on the device, and the estimator gradient (dW, dt). Registered as torch ops."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["masked_weight", "reset_", "estimator_tl"]

BLOCK_R, BLOCK_C = 16, 64
# A CUDA grid's y and z dimensions stop at 65535 programs; x goes to 2**31 - 1. The
# elementwise kernels use a 1-D grid over (row block, column block) pairs.
MAX_PROGRAMS = 2**31 - 1


@triton.jit
def estimator_tl(q):
    """H(q) in q's dtype: 2 - 4|q| for |q| <= 0.4, 0.4 for |q| <= 1, else 0 (NaN -> 0)."""
    a = tl.abs(q)
    # 0.4 rounded in q's own dtype (a bare literal would be float32's 0.4 in float64 maths).
    c04 = (tl.zeros_like(a) + 2.0) / 5.0
    return tl.where(a <= c04, 2.0 - 4.0 * a, tl.where(a <= 1.0, c04, tl.zeros_like(a)))


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


def _blocks(rows: int, cols: int) -> tuple[int, int]:
    """(row blocks, column blocks) of a ``rows x cols`` weight."""
    return triton.cdiv(rows, BLOCK_R), triton.cdiv(cols, BLOCK_C)


def _grid(rows: int, cols: int) -> tuple[int]:
    """The 1-D launch grid of the elementwise kernels: one program per (row, column) block."""
    row_blocks, col_blocks = _blocks(rows, cols)
    programs = row_blocks * col_blocks
    if programs > MAX_PROGRAMS:
        raise ValueError(
            f"weight of shape [{rows}, {cols}] needs {programs} Triton programs, more than a "
            f"CUDA grid holds ({MAX_PROGRAMS}); use backend='native' for weights this large"
        )
    return (programs,)


def _count(weight2d: torch.Tensor, threshold: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    rows, cols = weight2d.shape
    count = torch.zeros(1, dtype=torch.int64, device=weight2d.device)
    wrap_triton(_mask_kernel)[_grid(rows, cols)](
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


@triton_op("dst_kernels::triton_weight_grad", mutates_args=())
def _weight_grad_op(
    grad_masked: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    w2 = weight.contiguous().reshape(weight.shape[0], -1)
    g2 = grad_masked.to(weight.dtype).contiguous().reshape(w2.shape)
    rows, cols = w2.shape
    grid = _grid(rows, cols)
    grad_w = torch.empty_like(w2)
    wide = weight.dtype == torch.float64  # float64 stays float64; others compute in float32
    col_blocks = _blocks(rows, cols)[1]  # every program writes its partial: no stale rows
    partial = torch.empty(
        (col_blocks, rows), dtype=torch.float64 if wide else torch.float32, device=w2.device
    )
    acc = tl.float64 if wide else tl.float32
    wrap_triton(_weight_grad_kernel)[grid](
        g2, w2, threshold, grad_w, partial, rows, cols, ACC=acc, BR=BLOCK_R, BC=BLOCK_C
    )
    return grad_w.reshape(weight.shape), partial.sum(0).to(threshold.dtype)


def check_first_order(op: str, *tensors: torch.Tensor) -> None:
    """Refuse backward with create_graph=True: the kernels' outputs carry no second-order graph."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise NotImplementedError(
            f"{op}: double backward (create_graph=True) is not supported by the triton backend; "
            'use backend="reference" for higher-order gradients'
        )


def _setup(ctx, inputs, output):
    weight, threshold = inputs
    ctx.save_for_backward(weight, threshold.detach().clone())


def _backward(ctx, grad):
    weight, threshold = ctx.saved_tensors
    check_first_order("triton_masked_weight", grad, weight)
    grad_w, grad_t = torch.ops.dst_kernels.triton_weight_grad(grad, weight, threshold)
    return (grad_w if ctx.needs_input_grad[0] else None, grad_t if ctx.needs_input_grad[1] else None)


_masked_weight_op.register_autograd(_backward, setup_context=_setup)


def masked_weight(weight, threshold, min_density=None):
    """``P = W * M``; with ``min_density`` set, the reset rule first (``threshold`` in place)."""
    if min_density is not None:
        reset_(weight, threshold, min_density)
    return torch.ops.dst_kernels.triton_masked_weight(weight, threshold)
