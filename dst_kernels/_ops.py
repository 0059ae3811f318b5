"""The compiled extension: loading, build metadata, fake kernels, autograd.

``dst_kernels._C`` registers its ops under ``torch.ops.dst_kernels``. When it
is missing (a pure-Python install, or a build that failed) the package still
works on the ``reference`` backend and says so once, with how to build it.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["BUILD_HINT", "LOAD_ERROR", "build_info", "has_op", "loaded"]

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the dst_kernels source tree "
    "(see the README's 'Building' section)"
)

LOAD_ERROR: str | None = None
_loaded = False

try:
    from dst_kernels import _C  # noqa: F401  (registers torch.ops.dst_kernels.*)

    _loaded = True
except (ImportError, OSError) as exc:  # missing, or built against another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    if os.environ.get("DST_KERNELS_QUIET") != "1":
        warnings.warn(
            f"dst_kernels: the compiled extension dst_kernels._C could not be loaded "
            f"({LOAD_ERROR}); only the 'reference' backend is available. To get the native "
            f"kernels, {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=2,
        )


def loaded() -> bool:
    """Whether ``dst_kernels._C`` is loaded."""
    return _loaded


def has_op(name: str) -> bool:
    """Whether the compiled library registered ``torch.ops.dst_kernels.<name>``."""
    return _loaded and hasattr(torch.ops.dst_kernels, name)


def build_info() -> dict[str, str] | None:
    """What ``_C`` was built against: ``{"torch", "cuda", "archs", "with_cuda"}``, or None."""
    if not _loaded:
        return None
    items = torch.ops.dst_kernels.build_info().split(";")
    return dict(item.split("=", 1) for item in items if "=" in item)


def _check_build_matches() -> None:
    info = build_info()
    if info is None:
        return
    built = info.get("torch", "")
    # Compare release numbers: a local suffix such as +cpu / +cu130 does not change the ABI.
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        warnings.warn(
            f"dst_kernels._C was built for torch {built}, but torch {torch.__version__} is "
            f"installed; rebuild it ({BUILD_HINT}).",
            RuntimeWarning,
            stacklevel=3,
        )


_check_build_matches()


def _register() -> None:
    @torch.library.register_fake("dst_kernels::estimator")
    def _estimator_fake(x):
        torch._check(x.is_floating_point(), lambda: "estimator: x must be floating-point")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    if not has_op("dst_mask"):
        return  # an older build: only the reference backend

    @torch.library.register_fake("dst_kernels::dst_mask")
    def _dst_mask_fake(weight, threshold, min_density):
        torch._check(threshold.shape == (weight.shape[0],), lambda: "dst_mask: threshold must be [out]")
        return torch.empty_like(weight), torch.empty_like(threshold)

    @torch.library.register_fake("dst_kernels::dst_weight_grad")
    def _dst_weight_grad_fake(grad_masked, weight, threshold):
        torch._check(grad_masked.shape == weight.shape, lambda: "dst_weight_grad: grad shape")
        return torch.empty_like(weight), torch.empty_like(threshold)

    @torch.library.register_fake("dst_kernels::dst_weight_grad_")
    def _dst_weight_grad_inplace_fake(grad_masked, weight, threshold):
        torch._check(grad_masked.shape == weight.shape, lambda: "dst_weight_grad_: grad shape")
        return torch.empty_like(threshold)

    @torch.library.register_fake("dst_kernels::dst_linear")
    def _dst_linear_fake(x, weight, threshold, bias, min_density):
        torch._check(x.shape[-1] == weight.shape[1], lambda: "dst_linear: x features")
        y = x.new_empty((*x.shape[:-1], weight.shape[0]))
        return y, torch.empty_like(weight), torch.empty_like(threshold)

    @torch.library.register_fake("dst_kernels::dst_conv2d")
    def _dst_conv2d_fake(x, weight, threshold, bias, stride, padding, dilation, groups, min_density):
        torch._check(x.dim() == 4, lambda: "dst_conv2d: x must be 4-D")
        size = [x.shape[0], weight.shape[0]]
        for i in range(2):
            span = dilation[i] * (weight.shape[2 + i] - 1) + 1
            size.append((x.shape[2 + i] + 2 * padding[i] - span) // stride[i] + 1)
        fmt = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format
        )
        y = x.new_empty(size).contiguous(memory_format=fmt)
        return y, torch.empty_like(weight), torch.empty_like(threshold)

    def _dst_mask_setup(ctx, inputs, output):
        weight, _, _ = inputs
        # Only W and the effective thresholds: the mask is recomputed in backward.
        ctx.save_for_backward(weight, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero-filled gradient for t_eff

    def _dst_mask_backward(ctx, grad_masked, _grad_threshold):
        weight, t_eff = ctx.saved_tensors
        if grad_masked is None or not any(ctx.needs_input_grad[:2]):
            return None, None, None
        grad_w, grad_t = torch.ops.dst_kernels.dst_weight_grad(grad_masked, weight, t_eff)
        return (
            grad_w if ctx.needs_input_grad[0] else None,
            grad_t if ctx.needs_input_grad[1] else None,
            None,
        )

    torch.library.register_autograd(
        "dst_kernels::dst_mask", _dst_mask_backward, setup_context=_dst_mask_setup
    )

    def _dst_linear_setup(ctx, inputs, output):
        x, weight, _, bias, _ = inputs
        _, masked, t_eff = output
        # x, W and the effective thresholds only: P and the mask are recomputed in backward,
        # so a layer holds no weight-sized tensor between forward and backward.
        ctx.save_for_backward(x, weight, t_eff)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(masked, t_eff)
        ctx.set_materialize_grads(False)  # no weight-sized zero gradient for P

    def _dst_linear_backward(ctx, grad_y, _grad_masked, _grad_threshold):
        x, weight, t_eff = ctx.saved_tensors
        need_x, need_w, need_t, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_t = grad_b = None
        if grad_y is None:  # only y is differentiable
            return grad_x, grad_w, grad_t, grad_b, None
        grad_2d = grad_y.reshape(-1, grad_y.shape[-1])
        if need_x:
            masked, _ = torch.ops.dst_kernels.dst_mask(weight, t_eff, None)
            grad_x = grad_y.matmul(masked)
        if need_w or need_t:
            # G = dY^T X lands in a fresh buffer; dW overwrites it in place.
            grad = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))
            grad_t = torch.ops.dst_kernels.dst_weight_grad_(grad, weight, t_eff)
            grad_w = grad if need_w else None
            grad_t = grad_t if need_t else None
        if need_b and ctx.has_bias:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_t, grad_b, None

    torch.library.register_autograd(
        "dst_kernels::dst_linear", _dst_linear_backward, setup_context=_dst_linear_setup
    )

    def _dst_conv2d_setup(ctx, inputs, output):
        x, weight, _, bias, stride, padding, dilation, groups, _ = inputs
        _, masked, t_eff = output
        ctx.save_for_backward(x, weight, t_eff)  # P and the mask are recomputed in backward
        ctx.conv = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.mark_non_differentiable(masked, t_eff)
        ctx.set_materialize_grads(False)  # no weight-sized zero gradient for P

    def _dst_conv2d_backward(ctx, grad_y, _grad_masked, _grad_threshold):
        x, weight, t_eff = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_t, need_b = ctx.needs_input_grad[:4]
        if grad_y is None:  # only y is differentiable
            return (None,) * 9
        # P only matters for dX; the weight and bias gradients read W's shape and layout alone.
        masked = torch.ops.dst_kernels.dst_mask(weight, t_eff, None)[0] if need_x else weight
        mask_out = [need_x, need_w or need_t, need_b and ctx.bias_sizes is not None]
        grad_x, grad_p, grad_b = torch.ops.aten.convolution_backward(
            grad_y, x, masked, ctx.bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask_out
        )
        grad_w = grad_t = None
        if mask_out[1]:
            if grad_p.stride() == weight.stride():  # dW over the gradient's own buffer
                grad_t = torch.ops.dst_kernels.dst_weight_grad_(grad_p, weight, t_eff)
                grad_w = grad_p
            else:
                grad_w, grad_t = torch.ops.dst_kernels.dst_weight_grad(grad_p, weight, t_eff)
        return (
            grad_x if need_x else None,
            grad_w if need_w else None,
            grad_t if need_t else None,
            grad_b if mask_out[2] else None,
            None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(
        "dst_kernels::dst_conv2d", _dst_conv2d_backward, setup_context=_dst_conv2d_setup
    )


if _loaded:
    _register()
