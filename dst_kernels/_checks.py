"""Argument checks shared by the dispatcher and the backends.

They sit below both ``dst_kernels.functional`` (which checks every call once,
with the same messages for every backend) and the backends that have entry
points of their own (the Triton implicit-GEMM conv), so neither imports the other.
"""

from __future__ import annotations

import os

import torch

__all__ = ["check_min_density", "check_conv2d_args"]

_CHECK_FINITE_CUDA = os.environ.get("DST_KERNELS_CHECK_FINITE", "0") == "1"


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def _check_weight_threshold(
    weight: torch.Tensor, threshold: torch.Tensor, backend: str = "reference"
) -> None:
    _check_float("weight", weight)
    _check_float("threshold", threshold)
    if weight.dim() < 2:
        raise ValueError(
            f"weight must have at least 2 dimensions [out, ...], got shape {tuple(weight.shape)}"
        )
    rows = weight.shape[0]
    if threshold.shape != (rows,):
        raise ValueError(
            f"threshold must have shape [{rows}] (one per output row of weight "
            f"{tuple(weight.shape)}), got {tuple(threshold.shape)}"
        )
    if threshold.device != weight.device:
        raise ValueError(
            f"threshold is on {threshold.device} but weight is on {weight.device}; "
            f"move them to the same device"
        )
    if threshold.dtype != weight.dtype:
        raise TypeError(
            f"threshold has dtype {threshold.dtype} but weight has {weight.dtype}; they must match"
        )
    if not (
        weight.is_contiguous()
        or (weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last))
    ):
        raise ValueError(
            f"weight must be contiguous (or channels_last for a 4-D conv weight); got strides "
            f"{weight.stride()} for shape {tuple(weight.shape)}. Try weight.contiguous()."
        )
    if not threshold.is_contiguous():
        raise ValueError("threshold must be contiguous; try threshold.contiguous()")
    if not (backend == "native" and weight.device.type == "cpu"):
        _check_finite_threshold(threshold)  # the native CPU kernel checks the values itself


def _check_finite_threshold(threshold: torch.Tensor) -> None:
    # Policy: thresholds must be finite. The check reads the values, so it runs where that
    # costs no device round trip (CPU tensors, eager mode); on CUDA only when
    # DST_KERNELS_CHECK_FINITE=1, since it synchronises with the device.
    if torch.compiler.is_compiling():
        return
    if threshold.device.type != "cpu" and not _CHECK_FINITE_CUDA:
        return
    if not bool(torch.isfinite(threshold.detach()).all()):
        raise ValueError(
            "threshold contains NaN or inf; thresholds must be finite (a NaN threshold would "
            "silently mask out its whole row)"
        )


def _check_bias(bias: torch.Tensor | None, weight: torch.Tensor) -> None:
    if bias is None:
        return
    _check_float("bias", bias)
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if bias.device != weight.device:
        raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}; they must match")


def _check_input(x: torch.Tensor, weight: torch.Tensor) -> None:
    _check_float("x", x)
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"x has dtype {x.dtype} but weight has {weight.dtype}; cast one of them "
            f"(or run under torch.autocast)"
        )


def check_min_density(min_density):
    """``min_density`` as a float in [0, 1), or None (the reset rule off)."""
    if min_density is None:
        return None
    if isinstance(min_density, bool) or not isinstance(min_density, (int, float)):
        raise TypeError(f"min_density must be a float in [0, 1) or None, got {min_density!r}")
    if not 0.0 <= float(min_density) < 1.0:
        raise ValueError(f"min_density must be in [0, 1) or None, got {min_density!r}")
    return float(min_density)


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if (
        not isinstance(v, (tuple, list))
        or len(v) != 2
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)
    ):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return tuple(v)


def check_conv2d_args(x, weight, threshold, bias, stride, padding, dilation, groups, backend: str):
    """Every argument check of :func:`dst_conv2d`; returns ``(stride, padding, dilation)`` as
    pairs of ints (``padding`` may stay "same" / "valid")."""
    _check_weight_threshold(weight, threshold, backend)
    if weight.dim() != 4:
        raise ValueError(
            f"weight must be 4-D [out_channels, in_channels/groups, kh, kw], got {tuple(weight.shape)}"
        )
    _check_bias(bias, weight)
    _check_input(x, weight)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups:
        raise ValueError(f"out_channels={weight.shape[0]} must be divisible by groups={groups}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be 3-D [C, H, W] or 4-D [N, C, H, W], got {tuple(x.shape)}")
    channels = x.shape[-3]
    if channels != weight.shape[1] * groups:
        raise ValueError(
            f"x has {channels} channels but weight expects in_channels/groups * groups = "
            f"{weight.shape[1]} * {groups} = {weight.shape[1] * groups}"
        )
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        padding = _pair(padding, "padding")
    return stride, padding, dilation
