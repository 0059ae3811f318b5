"""The compiled extension: loading, build metadata, fake kernels.

``dst_kernels._C`` registers its ops under ``torch.ops.dst_kernels``. When it
is missing (a pure-Python install, or a build that failed) the package still
works on the ``reference`` backend and says so once, with how to build it.
"""

from __future__ import annotations

import os
import warnings

import torch

__all__ = ["BUILD_HINT", "CPU_ISA_CHOICES", "LOAD_ERROR", "build_info", "cpu_isa", "has_op", "loaded"]

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the dst_kernels source tree "
    "(see the README's 'Building' section)"
)

LOAD_ERROR: str | None = None
_loaded = False

# DST_KERNELS_CPU_ISA caps the instruction set of the CPU row kernels (csrc/include/dst/cpu_isa.h):
# "portable" runs the baseline x86-64 build that a machine without AVX2 runs.
CPU_ISA_CHOICES = ("auto", "avx512", "avx2", "portable")
_isa = os.environ.get("DST_KERNELS_CPU_ISA", "")
if _isa and _isa not in CPU_ISA_CHOICES:
    raise ValueError(f"DST_KERNELS_CPU_ISA must be one of {', '.join(CPU_ISA_CHOICES)}; got {_isa!r}")

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


def eager_entry(name: str):
    """The compiled library's direct entry ``_C.<name>`` (a dispatcher call of the op of that
    name without the boxed ``torch.ops`` call), or None when it lacks one."""
    if not _loaded:
        return None
    from dst_kernels import _C

    return getattr(_C, name, None)


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


def cpu_isa() -> str | None:
    """The instruction set the CPU kernels of ``_C`` run with: ``"avx512"``, ``"avx2"`` or
    ``"portable"`` (the best the CPU supports, capped by ``DST_KERNELS_CPU_ISA``), or None
    when ``_C`` is not loaded (or predates the switch)."""
    if not has_op("cpu_isa"):
        return None
    return torch.ops.dst_kernels.cpu_isa()


def _check_build_matches() -> None:
    info = build_info()
    if info is None:
        return
    built = info.get("torch", "")
    # Compare release numbers: a local suffix such as +cpu / +cu130 does not change the ABI.
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        warnings.warn(
            f"dst_kernels._C was built for torch {built}, but torch {torch.__version__} is "
            f"installed: the compiled ops may fail to load or misbehave. Install a dst_kernels "
            f"wheel built for torch {torch.__version__.split('+')[0]}, or install torch {built}, "
            f"or rebuild the extension ({BUILD_HINT}).",
            RuntimeWarning,
            stacklevel=3,
        )


_check_build_matches()


def _conv_out_size(x, channels, kernel, stride, padding, dilation) -> list:
    size = [x.shape[0], channels]
    for i in range(2):
        span = dilation[i] * (kernel[i] - 1) + 1
        size.append((x.shape[2 + i] + 2 * padding[i] - span) // stride[i] + 1)
    return size


def _conv_format(x) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _register() -> None:
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

    if has_op("dst_linear_weight_grad"):

        @torch.library.register_fake("dst_kernels::dst_linear_weight_grad")
        def _dst_linear_weight_grad_fake(grad_y, x, weight, threshold):
            torch._check(
                grad_y.shape[-1] == weight.shape[0], lambda: "dst_linear_weight_grad: grad_y features"
            )
            torch._check(x.shape[-1] == weight.shape[1], lambda: "dst_linear_weight_grad: x features")
            return torch.empty_like(weight, memory_format=torch.contiguous_format), torch.empty_like(
                threshold
            )

    @torch.library.register_fake("dst_kernels::dst_conv2d")
    def _dst_conv2d_fake(x, weight, threshold, bias, stride, padding, dilation, groups, min_density):
        torch._check(x.dim() == 4, lambda: "dst_conv2d: x must be 4-D")
        size = _conv_out_size(x, weight.shape[0], weight.shape[2:], stride, padding, dilation)
        y = x.new_empty(size).contiguous(memory_format=_conv_format(x))
        return y, torch.empty_like(weight), torch.empty_like(threshold)

    # Autograd of dst_mask, dst_linear and dst_conv2d is registered in C++ (csrc/autograd.cpp).
    if has_op("dst_sparse_mm"):
        _register_sparse()


def _register_sparse() -> None:
    """Fake kernels of the sparse op family (csrc/cpu/sparse.cpp)."""

    @torch.library.register_fake("dst_kernels::dst_linear_grad_input")
    def _dst_linear_grad_input_fake(grad_y, weight, threshold, masked=None):
        torch._check(grad_y.shape[-1] == weight.shape[0], lambda: "dst_linear_grad_input: grad_y features")
        return grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1]))

    @torch.library.register_fake("dst_kernels::dst_sparse_mask")
    def _dst_sparse_mask_fake(weight, threshold, transpose=False):
        torch._check(threshold.shape == (weight.shape[0],), lambda: "dst_sparse_mask: threshold shape")
        rows = weight.shape[0]
        n = weight.numel() // rows if transpose else rows
        nnz = torch.library.get_ctx().new_dynamic_size()
        index = weight.new_empty((n + 1,), dtype=torch.int32)
        return index, weight.new_empty((nnz,), dtype=torch.int32), weight.new_empty((nnz,))

    @torch.library.register_fake("dst_kernels::dst_sparse_mm")
    def _dst_sparse_mm_fake(x, crow_indices, col_indices, values, bias=None, relu=False):
        torch._check(values.dtype == x.dtype, lambda: "dst_sparse_mm: values must have x's dtype")
        return x.new_empty((*x.shape[:-1], crow_indices.shape[0] - 1))

    if not has_op("dst_sparse_conv2d"):
        return

    @torch.library.register_fake("dst_kernels::dst_conv2d_grad_input")
    def _dst_conv2d_grad_input_fake(grad_y, x, weight, threshold, stride, padding, dilation, groups):
        torch._check(grad_y.dim() == 4, lambda: "dst_conv2d_grad_input: grad_y must be 4-D")
        return torch.empty_like(x, memory_format=_conv_format(x))

    @torch.library.register_fake("dst_kernels::dst_sparse_conv2d")
    def _dst_sparse_conv2d_fake(
        x,
        crow_indices,
        col_indices,
        values,
        bias,
        kernel_size,
        stride,
        padding,
        dilation,
        relu=False,
        pool_kernel=(1, 1),
        pool_stride=(1, 1),
    ):
        torch._check(x.dim() == 4, lambda: "dst_sparse_conv2d: x must be 4-D")
        torch._check(values.dtype == x.dtype, lambda: "dst_sparse_conv2d: values must have x's dtype")
        size = _conv_out_size(x, crow_indices.shape[0] - 1, kernel_size, stride, padding, dilation)
        for i in range(2):
            torch._check(
                size[2 + i] >= pool_kernel[i],
                lambda: "dst_sparse_conv2d: the convolution's output is smaller than the pool window",
            )
            size[2 + i] = (size[2 + i] - pool_kernel[i]) // pool_stride[i] + 1
        return x.new_empty(size)

    if has_op("dst_sparse_rnn_train"):
        _register_sparse_rnn()


def _rnn_fake_outputs(x, h0, c0, hidden, mode):
    y = x.new_empty((x.shape[0], x.shape[1], hidden))
    c_n = torch.empty_like(h0) if mode == "lstm" else h0.new_empty((0,))
    return y, torch.empty_like(h0), c_n


def _register_sparse_rnn() -> None:
    """Fake kernels and autograd of the sparse family's recurrent ops (one layer and direction)."""

    @torch.library.register_fake("dst_kernels::dst_sparse_rnn")
    def _dst_sparse_rnn_fake(
        x,
        h0,
        c0,
        ih_crow,
        ih_col,
        ih_values,
        hh_crow,
        hh_col,
        hh_values,
        bias_ih,
        bias_hh,
        mode,
        reverse=False,
        feature_major=False,
    ):
        torch._check(x.dim() == 3, lambda: "dst_sparse_rnn: x must be [steps, batch, input_size]")
        y, h_n, c_n = _rnn_fake_outputs(x, h0, c0, h0.shape[1], mode)
        if feature_major:  # a view of h^T [hidden, steps * batch]
            steps, batch = x.shape[0], x.shape[1]
            y = x.new_empty_strided((steps, batch, h0.shape[1]), (batch, 1, steps * batch))
        return y, h_n, c_n

    @torch.library.register_fake("dst_kernels::dst_sparse_rnn_train")
    def _dst_sparse_rnn_train_fake(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, mode, reverse=False):
        torch._check(x.dim() == 3, lambda: "dst_sparse_rnn_train: x must be [steps, batch, input_size]")
        hidden = weight_hh.shape[1]
        y, h_n, c_n = _rnn_fake_outputs(x, h0, c0, hidden, mode)
        # the gates of every step, then h^T (csrc/cpu/sparse.cpp, "recurrent layers")
        saved = x.new_empty((x.shape[0] * x.shape[1] * (7 if mode == "lstm" else 5) * hidden,))
        return y, h_n, c_n, saved

    @torch.library.register_fake("dst_kernels::dst_sparse_rnn_backward")
    def _dst_sparse_rnn_backward_fake(
        grad_y, grad_h_n, grad_c_n, x, h0, c0, weight_ih, weight_hh, y, saved, mode, reverse, input_grad
    ):
        dx = x.new_empty((x.shape[0], x.shape[1], x.shape[2] if input_grad else 0))
        dc0 = torch.empty_like(h0) if mode == "lstm" else h0.new_empty((0,))
        rows = weight_ih.shape[0]
        return (
            dx,
            torch.empty_like(h0),
            dc0,
            torch.empty_like(weight_ih),
            torch.empty_like(weight_hh),
            weight_ih.new_empty((rows,)),
            weight_ih.new_empty((rows,)),
        )

    def setup_context(ctx, inputs, output):
        x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, mode, reverse = inputs
        y, _, _, saved = output
        ctx.save_for_backward(x, h0, c0, weight_ih, weight_hh, y, saved)
        ctx.mode, ctx.reverse = mode, reverse
        ctx.biases = (bias_ih is not None, bias_hh is not None)
        ctx.mark_non_differentiable(saved)
        ctx.set_materialize_grads(False)  # unused outputs: no zero gradients to build and read

    def backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_saved):
        x, h0, c0, weight_ih, weight_hh, y, saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = torch.ops.dst_kernels.dst_sparse_rnn_backward(
            grad_y,
            grad_h_n,
            grad_c_n if ctx.mode == "lstm" else None,
            x,
            h0,
            c0,
            weight_ih,
            weight_hh,
            y,
            saved,
            ctx.mode,
            ctx.reverse,
            need[0],
        )
        return (
            dx if need[0] else None,
            dh0 if need[1] else None,
            dc0 if ctx.mode == "lstm" and need[2] else None,
            dw_ih if need[3] else None,
            dw_hh if need[4] else None,
            db_ih if ctx.biases[0] and need[5] else None,
            db_hh if ctx.biases[1] and need[6] else None,
            None,
            None,
        )

    torch.library.register_autograd(
        "dst_kernels::dst_sparse_rnn_train", backward, setup_context=setup_context
    )


if _loaded:
    _register()
