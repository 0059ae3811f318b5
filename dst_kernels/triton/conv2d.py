"""DST conv2d in Triton as an implicit GEMM, with the mask in the weight prologue.

The forward treats the convolution as a GEMM over ``M = N*OH*OW`` output pixels,
``OC/groups`` output channels and ``K = C/groups*KH*KW`` taps: each program
gathers its input patches straight from ``x`` (any strides, so NCHW and
channels_last alike), loads the matching weight tiles with their rows'
thresholds, applies ``|W| > t`` in registers and ``tl.dot``s; bias in the
epilogue. ``P`` never exists in the forward. The backward is ATen's
``convolution_backward`` on a recomputed ``P`` followed by the Triton estimator
kernel (as in the default Triton conv path).

This is an alternative to the default path (the Triton mask kernel, then
ATen's convolution): ``"auto"`` never picks it and ``DSTConv2d(backend="triton")``
does not use it; call :func:`conv2d_igemm` directly, or time it with the
benchmark suite's ``triton-igemm`` implementation on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from dst_kernels._checks import check_conv2d_args, check_min_density
from dst_kernels.triton._gemm import acc_type, check_gemm_sizes, configs, precision, programs, prune
from dst_kernels.triton._runtime import check_first_order
from dst_kernels.triton.mask import masked_weight, reset_

__all__ = ["conv2d", "conv2d_igemm"]


@triton.autotune(configs=configs(), key=["M", "N", "K"], prune_configs_by={"early_config_prune": prune})
@triton.jit
def _igemm_fwd_kernel(
    x_ptr,
    w_ptr,
    t_ptr,
    b_ptr,
    y_ptr,
    M,  # N * OH * OW
    N,  # output channels per group
    K,  # input channels per group * KH * KW
    C_G,
    H,
    W,
    OH,
    OW,
    KH,
    KW,
    sxn,
    sxc,
    sxh,
    sxw,
    swo,
    swc,
    swh,
    sww,
    syn,
    syc,
    syh,
    syw,
    STRIDE_H,
    STRIDE_W,
    PAD_H,
    PAD_W,
    DIL_H,
    DIL_W,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    tl.static_assert(BK >= 16, "tl.dot needs K blocks of at least 16")
    group = tl.program_id(2)
    m_blocks = tl.cdiv(M, BM)  # (M, N) blocks on grid x: its y dimension stops at 65535
    rm = (tl.program_id(0) % m_blocks) * BM + tl.arange(0, BM)
    rn = (tl.program_id(0) // m_blocks) * BN + tl.arange(0, BN)
    oc = group * N + rn
    n = rm // (OH * OW)
    pix = rm % (OH * OW)
    oh = pix // OW
    ow = pix % OW
    t = tl.load(t_ptr + oc, mask=rn < N, other=0.0)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        c = kk // (KH * KW)
        tap = kk % (KH * KW)
        kh = tap // KW
        kw = tap % KW
        ih = oh[:, None] * STRIDE_H - PAD_H + kh[None, :] * DIL_H
        iw = ow[:, None] * STRIDE_W - PAD_W + kw[None, :] * DIL_W
        inside = (rm[:, None] < M) & (kk[None, :] < K) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offs = (
            n[:, None].to(tl.int64) * sxn
            + (group * C_G + c[None, :]).to(tl.int64) * sxc
            + ih.to(tl.int64) * sxh
            + iw.to(tl.int64) * sxw
        )
        x = tl.load(x_ptr + x_offs, mask=inside, other=0.0)
        w_offs = (
            oc[None, :].to(tl.int64) * swo
            + c[:, None].to(tl.int64) * swc
            + kh[:, None].to(tl.int64) * swh
            + kw[:, None].to(tl.int64) * sww
        )
        w = tl.load(w_ptr + w_offs, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        keep = tl.abs(w) > t[None, :]  # in the weight's dtype, as the reference compares
        w = (w * keep.to(w.dtype)).to(x.dtype)
        acc += tl.dot(x, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + oc, mask=rn < N, other=0.0).to(ACC)[None, :]
    y_offs = (
        n[:, None].to(tl.int64) * syn
        + oc[None, :].to(tl.int64) * syc
        + oh[:, None].to(tl.int64) * syh
        + ow[:, None].to(tl.int64) * syw
    )
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


@triton_op("dst_kernels::triton_conv2d_igemm", mutates_args=())
def _igemm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    batch, _, h, w = x.shape
    oc, c_g, kh, kw = weight.shape
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    y = torch.empty((batch, oc, oh, ow), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    m, n, k = batch * oh * ow, oc // groups, c_g * kh * kw
    check_gemm_sizes(m, n, k)
    if groups > 65535:
        raise ValueError(f"the triton implicit-GEMM conv supports groups <= 65535, got {groups}")

    def grid(meta):
        return (programs(triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"])), 1, groups)

    wrap_triton(_igemm_fwd_kernel)[grid](
        x,
        weight,
        threshold,
        bias if bias is not None else threshold,
        y,
        m,
        n,
        k,
        c_g,
        h,
        w,
        oh,
        ow,
        kh,
        kw,
        *x.stride(),
        *weight.stride(),
        *y.stride(),
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        HAS_BIAS=bias is not None,
        PRECISION=precision(x.dtype, conv=True),
        ACC=acc_type(x.dtype),
    )
    return y


def _setup(ctx, inputs, output):
    x, weight, threshold, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, threshold.detach().clone())
    ctx.conv = (stride, padding, dilation, groups)
    ctx.bias_sizes = None if bias is None else list(bias.shape)


def _backward(ctx, grad_y):
    x, weight, threshold = ctx.saved_tensors
    check_first_order("triton_conv2d_igemm", grad_y, x, weight)
    stride, padding, dilation, groups = ctx.conv
    need_x, need_w, need_t, need_b = ctx.needs_input_grad[:4]
    # P (cast to the compute dtype under autocast) only matters for dX.
    p = masked_weight(weight, threshold).to(x.dtype) if need_x else weight.to(x.dtype)
    mask = [need_x, need_w or need_t, need_b and ctx.bias_sizes is not None]
    grad_x, grad_p, grad_b = torch.ops.aten.convolution_backward(
        grad_y, x, p, ctx.bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask
    )
    grad_w = grad_t = None
    if mask[1]:
        grad_w, grad_t = torch.ops.dst_kernels.triton_weight_grad(grad_p, weight, threshold)
        grad_w = grad_w.contiguous(memory_format=_memory_format(weight))
    grad_b = grad_b.to(weight.dtype) if mask[2] else None
    return (
        grad_x if need_x else None,
        grad_w if need_w else None,
        grad_t if need_t else None,
        grad_b,
        None,
        None,
        None,
        None,
    )


_igemm_op.register_autograd(_backward, setup_context=_setup)


def conv2d_igemm(
    x, weight, threshold, bias=None, stride=1, padding=0, dilation=1, groups=1, min_density=None
):
    """``conv2d(x, W*M, b)`` as one Triton implicit GEMM (explicit integer padding only).

    Same contract and argument checks as ``dst_kernels.functional.dst_conv2d`` with
    ``backend="triton"`` (4-D ``x``; with ``min_density`` set the reset rule runs first,
    updating ``threshold`` in place). Under autocast, ``x`` runs in the autocast dtype
    and ``W`` is cast in registers.
    """
    stride, padding, dilation = check_conv2d_args(
        x, weight, threshold, bias, stride, padding, dilation, groups, "triton"
    )
    if isinstance(padding, str):
        raise ValueError(f"padding must be integers for the implicit-GEMM conv, got {padding!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    min_density = check_min_density(min_density)
    if min_density is not None:
        reset_(weight, threshold, min_density)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))  # W is cast in registers
        bias = bias.to(x.dtype) if bias is not None else None
    return torch.ops.dst_kernels.triton_conv2d_igemm(
        x, weight, threshold, bias, list(stride), list(padding), list(dilation), groups
    )


def conv2d(x, weight, threshold, bias, stride, padding, dilation, groups, min_density=None):
    """The Triton mask and estimator kernels around ATen's convolution."""
    return F.conv2d(x, masked_weight(weight, threshold, min_density), bias, stride, padding, dilation, groups)
