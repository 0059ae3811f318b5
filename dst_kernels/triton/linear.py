"""The fused DST linear layer in Triton: the masked weight never exists in memory.

* forward ``y = x @ (W*M)^T + b``: each program loads W tiles and their rows'
  thresholds, applies ``|W| > t`` in registers (casting W to x's dtype there),
  and ``tl.dot``s; bias in the epilogue;
* ``dX = dY @ (W*M)``: the same prologue;
* ``G = dY^T @ X`` with the estimator in the epilogue: each tile writes
  ``dW = G*M + G*|W|*H(Q)`` directly and a partial ``-sum_j G*W*H(Q)`` per row,
  summed in a fixed order (deterministic); ``G`` is never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dst_kernels.triton._gemm import acc_type, check_gemm_sizes, configs, precision, programs, prune
from dst_kernels.triton._runtime import check_first_order, estimator_tl
from dst_kernels.triton.mask import reset_

__all__ = ["linear"]


@triton.autotune(configs=configs(), key=["M", "N", "K"], prune_configs_by={"early_config_prune": prune})
@triton.jit
def _fwd_kernel(
    x_ptr,
    w_ptr,
    t_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    sxm,
    sxk,
    swn,
    swk,
    sym,
    syn,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    tl.static_assert(BK >= 16, "tl.dot needs K blocks of at least 16")
    # A 1-D grid (a CUDA grid's y dimension stops at 65535), M blocks fastest as in a 2-D grid.
    m_blocks = tl.cdiv(M, BM)
    rm = (tl.program_id(0) % m_blocks) * BM + tl.arange(0, BM)
    rn = (tl.program_id(0) // m_blocks) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    t = tl.load(t_ptr + rn, mask=rn < N, other=0.0)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None].to(tl.int64) * sxm + kk[None, :].to(tl.int64) * sxk,
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        w = tl.load(
            w_ptr + rn[:, None].to(tl.int64) * swn + kk[None, :].to(tl.int64) * swk,
            mask=(rn[:, None] < N) & (kk[None, :] < K),
            other=0.0,
        )
        keep = tl.abs(w) > t[:, None]  # in the weight's dtype, as the reference compares
        w = (w * keep.to(w.dtype)).to(x.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(ACC)[None, :]
    tl.store(
        y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :].to(tl.int64) * syn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


@triton.autotune(configs=configs(), key=["M", "N", "K"], prune_configs_by={"early_config_prune": prune})
@triton.jit
def _dx_kernel(
    dy_ptr,
    w_ptr,
    t_ptr,
    dx_ptr,
    M,
    N,
    K,
    sdm,
    sdn,
    swn,
    swk,
    sxm,
    sxk,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    # dX[M, K] = dY[M, N] @ P[N, K]: tiles over (M, K), reduction over N.
    tl.static_assert(BN >= 16, "tl.dot needs K blocks of at least 16")
    m_blocks = tl.cdiv(M, BM)
    rm = (tl.program_id(0) % m_blocks) * BM + tl.arange(0, BM)
    rk = (tl.program_id(0) // m_blocks) * BK + tl.arange(0, BK)
    rn0 = tl.arange(0, BN)
    acc = tl.zeros((BM, BK), dtype=ACC)
    for n0 in range(0, N, BN):
        rn = n0 + rn0
        dy = tl.load(
            dy_ptr + rm[:, None].to(tl.int64) * sdm + rn[None, :].to(tl.int64) * sdn,
            mask=(rm[:, None] < M) & (rn[None, :] < N),
            other=0.0,
        )
        w = tl.load(
            w_ptr + rn[:, None].to(tl.int64) * swn + rk[None, :].to(tl.int64) * swk,
            mask=(rn[:, None] < N) & (rk[None, :] < K),
            other=0.0,
        )
        t = tl.load(t_ptr + rn, mask=rn < N, other=0.0)
        keep = tl.abs(w) > t[:, None]
        w = (w * keep.to(w.dtype)).to(dy.dtype)
        acc += tl.dot(dy, w, input_precision=PRECISION)
    tl.store(
        dx_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :].to(tl.int64) * sxk,
        acc.to(dx_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rk[None, :] < K),
    )


# Each config writes one dt partial per K block into `part_ptr`, and a larger BK writes fewer
# rows: the autotuner zeroes the buffer before every benchmarked run and before the winner's
# run, so rows an earlier config wrote are never summed again.
@triton.autotune(
    configs=configs(),
    key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": prune},
    reset_to_zero=["part_ptr"],
)
@triton.jit
def _dw_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    t_ptr,
    dw_ptr,
    part_ptr,
    M,
    N,
    K,
    sdm,
    sdn,
    sxm,
    sxk,
    swn,
    swk,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    # G[N, K] = dY^T @ X in registers, then the estimator epilogue.
    tl.static_assert(BM >= 16, "tl.dot needs K blocks of at least 16")
    n_blocks = tl.cdiv(N, BN)
    pid_k = tl.program_id(0) // n_blocks
    rn = (tl.program_id(0) % n_blocks) * BN + tl.arange(0, BN)
    rk = pid_k * BK + tl.arange(0, BK)
    rm0 = tl.arange(0, BM)
    acc = tl.zeros((BN, BK), dtype=ACC)
    for m0 in range(0, M, BM):
        rm = m0 + rm0
        dyt = tl.load(
            dy_ptr + rm[None, :].to(tl.int64) * sdm + rn[:, None].to(tl.int64) * sdn,
            mask=(rm[None, :] < M) & (rn[:, None] < N),
            other=0.0,
        )
        x = tl.load(
            x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :].to(tl.int64) * sxk,
            mask=(rm[:, None] < M) & (rk[None, :] < K),
            other=0.0,
        )
        acc += tl.dot(dyt, x.to(dyt.dtype), input_precision=PRECISION)
    inside = (rn[:, None] < N) & (rk[None, :] < K)
    w = tl.load(
        w_ptr + rn[:, None].to(tl.int64) * swn + rk[None, :].to(tl.int64) * swk, mask=inside, other=0.0
    )
    w = w.to(ACC)
    t = tl.load(t_ptr + rn, mask=rn < N, other=0.0).to(ACC)
    aw = tl.abs(w)
    h = estimator_tl(aw - t[:, None])
    dw = tl.where(aw > t[:, None], acc, tl.zeros_like(acc)) + acc * aw * h
    tl.store(
        dw_ptr + rn[:, None].to(tl.int64) * swn + rk[None, :].to(tl.int64) * swk,
        dw.to(dw_ptr.dtype.element_ty),
        mask=inside,
    )
    tl.store(part_ptr + pid_k.to(tl.int64) * N + rn, -tl.sum(acc * w * h, axis=1), mask=rn < N)


@triton_op("dst_kernels::triton_linear", mutates_args=())
def _linear_op(
    x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = weight.shape[0]
    check_gemm_sizes(M, N, K)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)

    def grid(meta):
        return (programs(triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"])),)

    wrap_triton(_fwd_kernel)[grid](
        x2,
        weight,
        threshold,
        bias if bias is not None else threshold,
        y,
        M,
        N,
        K,
        x2.stride(0),
        x2.stride(1),
        weight.stride(0),
        weight.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        PRECISION=precision(x.dtype),
        ACC=acc_type(x.dtype),
    )
    return y.reshape(*x.shape[:-1], N)


@triton_op("dst_kernels::triton_linear_backward", mutates_args=())
def _linear_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor, need_x: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = weight.shape[0]
    input_precision = precision(grad_y.dtype)
    if need_x:
        grad_x = torch.empty((M, K), dtype=x.dtype, device=x.device)

        def grid_x(meta):
            return (programs(triton.cdiv(M, meta["BM"]), triton.cdiv(K, meta["BK"])),)

        wrap_triton(_dx_kernel)[grid_x](
            g2,
            weight,
            threshold,
            grad_x,
            M,
            N,
            K,
            g2.stride(0),
            g2.stride(1),
            weight.stride(0),
            weight.stride(1),
            grad_x.stride(0),
            grad_x.stride(1),
            PRECISION=input_precision,
            ACC=acc_type(grad_y.dtype),
        )
        grad_x = grad_x.reshape(x.shape)
    else:
        grad_x = x.new_empty(0)
    grad_w = torch.empty_like(weight)
    # One partial row sum per K block; the largest grid (smallest BK) bounds the rows needed.
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    partial = torch.zeros((triton.cdiv(K, 16), N), dtype=acc_dtype, device=weight.device)

    def grid_w(meta):
        return (programs(triton.cdiv(N, meta["BN"]), triton.cdiv(K, meta["BK"])),)

    wrap_triton(_dw_kernel)[grid_w](
        g2,
        x2,
        weight,
        threshold,
        grad_w,
        partial,
        M,
        N,
        K,
        g2.stride(0),
        g2.stride(1),
        x2.stride(0),
        x2.stride(1),
        weight.stride(0),
        weight.stride(1),
        PRECISION=input_precision,
        ACC=acc_type(weight.dtype),
    )
    return grad_x, grad_w, partial.sum(0).to(threshold.dtype)


def _setup(ctx, inputs, output):
    x, weight, threshold, bias = inputs
    ctx.save_for_backward(x, weight, threshold.detach().clone())
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, threshold = ctx.saved_tensors
    check_first_order("triton_linear", grad_y, x, weight)
    need_x, need_w, need_t, need_b = ctx.needs_input_grad
    grad_x, grad_w, grad_t = torch.ops.dst_kernels.triton_linear_backward(
        grad_y.contiguous(), x, weight, threshold, need_x
    )
    grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(weight.dtype) if ctx.has_bias and need_b else None
    return (grad_x if need_x else None, grad_w if need_w else None, grad_t if need_t else None, grad_b)


_linear_op.register_autograd(_backward, setup_context=_setup)


def linear(x, weight, threshold, bias=None, min_density=None):
    """``x @ (W*M)^T + b`` with the mask applied in the GEMM's prologue."""
    if min_density is not None:
        reset_(weight, threshold, min_density)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))  # W is cast in registers
        bias = bias.to(x.dtype) if bias is not None else None
    elif x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has {weight.dtype}")
    return torch.ops.dst_kernels.triton_linear(x, weight.contiguous(), threshold, bias)
