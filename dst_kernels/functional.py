"""Functional DST: argument checks and backend dispatch.

Every backend computes the same function (docs/maths.md section 1); this module checks
the arguments once, with the same messages for every backend, then hands the
call to the backend's implementation.
"""

from __future__ import annotations

import torch

from dst_kernels import _ops
from dst_kernels import reference as _reference
from dst_kernels._checks import (
    _check_bias,
    _check_input,
    _check_weight_threshold,
    check_conv2d_args,
    check_min_density,
)

__all__ = [
    "BACKENDS",
    "available_backends",
    "resolve_backend",
    "masked_weight",
    "mask",
    "density",
    "reset_thresholds_",
    "dst_linear",
    "dst_conv2d",
    "rnn_layer",
    "rnn_layers",
]

BACKENDS = ("reference", "native", "triton")
_CHOICES = ("auto",) + BACKENDS
# Preference of "auto", fastest first; the first available one is used. "triton" is
# chosen only by name until GPU measurements show where it wins (on the CPU it runs in
# the Triton interpreter, which is for testing).
_AUTO_ORDER = ("native", "reference")

# Ops a backend must provide to be usable.
_NATIVE_OPS = ("dst_mask", "dst_weight_grad")


def _native_ready() -> bool:
    return all(_ops.has_op(name) for name in _NATIVE_OPS)


def _triton_ready(device: torch.device) -> bool:
    try:
        from dst_kernels import triton as dst_triton
    except ImportError:
        return False
    return dst_triton.usable(device)


def _backend_impl(name: str):
    if name == "reference":
        return _reference
    if name == "native":
        from dst_kernels import native

        return native
    from dst_kernels import triton as dst_triton

    return dst_triton


_USABLE: dict[tuple[str, str], bool] = {}


def _usable(backend: str, device_type: str) -> bool:
    """Whether ``backend`` runs on ``device_type`` tensors, probed once per pair: the Triton
    backend (an import of triton and its kernels, some 0.3 s) only when it is asked for."""
    key = (backend, device_type)
    found = _USABLE.get(key)
    if found is None:
        if backend == "reference":
            found = True
        elif backend == "native":
            found = _native_ready() and device_type in ("cpu", "cuda")
        else:
            found = _triton_ready(torch.device(device_type))
        _USABLE[key] = found
    return found


def _available(device_type: str) -> tuple[str, ...]:
    return tuple(name for name in ("reference", "native", "triton") if _usable(name, device_type))


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backend names usable for tensors on ``device`` (default: CPU)."""
    device = torch.device("cpu" if device is None else device)
    return list(_available(device.type))


def check_backend_name(backend: str) -> str:
    """Validate a backend name (not its availability); returns it."""
    if not isinstance(backend, str) or backend not in _CHOICES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _CHOICES))}; got {backend!r}")
    return backend


def _unavailable_reason(backend: str, device: torch.device) -> str:
    if backend == "native":
        if not _ops.loaded():
            return f"the compiled extension is not loaded ({_ops.LOAD_ERROR}); {_ops.BUILD_HINT}"
        missing = [n for n in _NATIVE_OPS if not _ops.has_op(n)]
        if missing:
            return (
                f"this build of dst_kernels._C lacks the native DST ops ({', '.join(missing)}); "
                f"rebuild from a source tree that has them ({_ops.BUILD_HINT})"
            )
        return f"it has no kernels for {device.type} tensors"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install triton)"
        return (
            f"it has no kernels for {device.type} tensors here (it needs a CUDA device, or "
            f"TRITON_INTERPRET=1 set before import for the CPU interpreter)"
        )
    return "unknown"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` (possibly "auto") on ``device``; raises if unusable."""
    check_backend_name(backend)
    if backend == "auto":
        return next(name for name in _AUTO_ORDER if _usable(name, device.type))
    if not _usable(backend, device.type):
        raise RuntimeError(
            f"backend {backend!r} is not available for {device.type} tensors: "
            f"{_unavailable_reason(backend, device)}. Available here: {list(_available(device.type))}."
        )
    return backend


# ----------------------------------------------------------------------------- ops


def mask(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``|W| > t[row]`` shaped like ``weight`` (no host sync)."""
    _check_weight_threshold(weight, threshold)
    return _reference.mask(weight.detach(), threshold.detach())


def density(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Kept fraction of ``weight`` as a 0-dim float32 tensor (no host sync)."""
    _check_weight_threshold(weight, threshold)
    return _reference.density(weight.detach(), threshold.detach())


def masked_weight(
    weight: torch.Tensor,
    threshold: torch.Tensor,
    *,
    backend: str = "auto",
    min_density: float | None = None,
) -> torch.Tensor:
    """``P = W * M``, differentiable in ``W`` and ``t`` through the estimator ``H``.

    ``min_density`` (training mode; None = off) applies the reset rule first: if
    at most that fraction of ``weight`` is kept, ``threshold`` is set to 0 in
    place and the mask is recomputed, all on the device.
    """
    name = resolve_backend(backend, weight.device) if isinstance(weight, torch.Tensor) else backend
    _check_weight_threshold(weight, threshold, name)
    min_density = check_min_density(min_density)
    return _backend_impl(name).masked_weight(weight, threshold, min_density)


def reset_thresholds_(
    weight: torch.Tensor, threshold: torch.Tensor, min_density: float | None
) -> torch.Tensor | None:
    """The reset rule, in place on ``threshold``, with no host sync.

    If the kept fraction of ``weight`` is ``<= min_density`` the whole threshold
    vector is set to 0. Returns a 0-dim bool tensor (reset or not), or None
    when ``min_density`` is None (the rule is off).
    """
    if min_density is None:
        return None
    _check_weight_threshold(weight, threshold)
    min_density = check_min_density(min_density)
    return _reference.reset_thresholds_(weight.detach(), threshold.detach(), min_density)


_FAST_NAMES = ("auto", "native")
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _native_cpu_linear_ok(x, weight, threshold, bias, min_density) -> bool:
    """Whether a dst_linear call is the common eager one that every check below passes and the
    native backend takes on the CPU (plain CPU tensors of one floating dtype, a contiguous 2-D
    weight, the shapes right, no autocast): one expression instead of the checks' dozens of
    calls, which cost a small layer's forward as much as its kernel. Anything else (and every
    call under torch.compile) goes through the checks, which name what is wrong."""
    if not (type(x) is torch.Tensor and type(weight) in _PLAIN and type(threshold) in _PLAIN):
        return False
    dtype = weight.dtype
    if not (dtype.is_floating_point and weight.ndim == 2 and threshold.ndim == 1 and x.ndim >= 1):
        return False
    rows, cols = weight.shape
    return (
        (min_density is None or (type(min_density) is float and 0.0 <= min_density < 1.0))
        and x.dtype is dtype
        and threshold.dtype is dtype
        and threshold.shape[0] == rows
        and x.shape[-1] == cols
        and rows > 0
        and cols > 0
        and x.numel() > 0
        and weight.is_cpu
        and x.is_cpu
        and threshold.is_cpu
        and weight.is_contiguous()
        and threshold.is_contiguous()
        and (
            bias is None
            or (
                type(bias) in _PLAIN
                and bias.dtype is dtype
                and bias.ndim == 1
                and bias.shape[0] == rows
                and bias.is_cpu
            )
        )
        and _usable("native", "cpu")
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def dst_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    min_density: float | None = None,
) -> torch.Tensor:
    """``y = x @ (W * M)^T + b`` with DST's gradients for ``W`` and ``t``.

    ``min_density`` applies the reset rule first (see :func:`masked_weight`).
    """
    if backend in _FAST_NAMES and _native_cpu_linear_ok(x, weight, threshold, bias, min_density):
        # Every check below holds, and native.linear would call the op (see _native_cpu_linear_ok).
        return _backend_impl("native").linear_op(x, weight, threshold, bias, min_density)
    name = resolve_backend(backend, weight.device) if isinstance(weight, torch.Tensor) else backend
    _check_weight_threshold(weight, threshold, name)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
    _check_bias(bias, weight)
    _check_input(x, weight)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x must have in_features={weight.shape[1]} in its last dimension, got shape {tuple(x.shape)}"
        )
    min_density = check_min_density(min_density)
    return _backend_impl(name).linear(x, weight, threshold, bias, min_density)


def dst_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    backend: str = "auto",
    min_density: float | None = None,
) -> torch.Tensor:
    """``conv2d(x, W * M, b, ...)`` with DST's gradients for ``W`` and ``t``.

    ``padding`` may be an int, a pair, or "same" / "valid" as in ``F.conv2d``;
    ``min_density`` applies the reset rule first (see :func:`masked_weight`).
    """
    name = resolve_backend(backend, weight.device) if isinstance(weight, torch.Tensor) else backend
    stride, padding, dilation = check_conv2d_args(
        x, weight, threshold, bias, stride, padding, dilation, groups, name
    )
    min_density = check_min_density(min_density)
    return _backend_impl(name).conv2d(
        x, weight, threshold, bias, stride, padding, dilation, groups, min_density
    )


def rnn_layer(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor | None,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None,
    bias_hh: torch.Tensor | None,
    *,
    mode: str,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM (``mode="lstm"``) or GRU (``"gru"``) layer and direction on masked gate matrices.

    ``x`` is ``[steps, batch, input]``, ``h0`` / ``c0`` ``[batch, hidden]`` (``c0`` None for the
    GRU); ``weight_ih`` / ``weight_hh`` are ``P = W * M`` in PyTorch's gate order. The native CPU
    kernel multiplies each matrix through its compressed form below the density crossover of
    its product (dense above it); differentiable in everything but ``mode``. Returns
    ``(y, h_n, c_n)`` (``c_n`` empty for the GRU). CPU, float32 / float64.
    """
    if mode not in ("lstm", "gru"):
        raise ValueError(f"rnn_layer: mode must be 'lstm' or 'gru', got {mode!r}")
    if not _ops.has_op("dst_sparse_rnn_train"):
        raise RuntimeError(f"rnn_layer needs the compiled extension: {_ops.BUILD_HINT}")
    y, h_n, c_n, _ = torch.ops.dst_kernels.dst_sparse_rnn_train(
        x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, mode, reverse
    )
    return y, h_n, c_n


def rnn_layers(
    input,
    hx,
    layer,
    *,
    mode,
    num_layers,
    bidirectional,
    batch_first,
    hidden_size,
    dropout=0.0,
    pass_feature_major=False,
):
    """``nn.LSTM`` / ``nn.GRU``'s walk over layers and directions around ``layer``.

    ``layer(suffix, x, h0, c0, reverse) -> (y, h_n, c_n)`` runs one layer and direction
    (``suffix`` names its weights, e.g. ``"_l1_reverse"``; x is ``[steps, batch, features]``).
    With ``pass_feature_major`` (one direction, no dropout) every layer but the last is called
    with ``feature_major=True`` as well: its y may be laid out as the next layer reads it.
    ``input`` is batched (3-D, ``batch_first`` as given) or unbatched (2-D); ``hx`` is None,
    ``h0`` (GRU) or ``(h0, c0)`` (LSTM), shaped as PyTorch's. ``dropout`` (training only) is
    applied between layers. Returns what ``nn.LSTM`` / ``nn.GRU`` return.
    """
    lstm = mode == "lstm"
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if batch_first and batched:
        x = x.transpose(0, 1)
    directions = 2 if bidirectional else 1
    expected = (num_layers * directions, x.shape[1], hidden_size)
    if hx is None:
        zeros = x.new_zeros(expected)
        h0, c0 = zeros, zeros
    else:
        h0, c0 = hx if lstm else (hx, None)
        if not batched:
            h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
        for name, h in (("h0" if lstm else "hx", h0), ("c0", c0)):
            if h is not None and tuple(h.shape) != expected:
                raise RuntimeError(f"Expected hidden size {expected} for {name}, got {tuple(h.shape)}")
    layer_in = x.contiguous()
    hs, cs = [], []
    inner = pass_feature_major and directions == 1 and not dropout
    for k in range(num_layers):
        outs = []
        for d in range(directions):
            i = k * directions + d
            args = (f"_l{k}" + ("_reverse" if d else ""), layer_in, h0[i], c0[i] if lstm else None, bool(d))
            y, h_n, c_n = layer(*args, feature_major=True) if inner and k < num_layers - 1 else layer(*args)
            outs.append(y)
            hs.append(h_n)
            cs.append(c_n)
        layer_in = outs[0] if directions == 1 else torch.cat(outs, 2)
        if dropout and k < num_layers - 1:
            layer_in = torch.nn.functional.dropout(layer_in, dropout, True)
    out = layer_in.transpose(0, 1) if batch_first and batched else layer_in
    h_n = torch.stack(hs)
    if not batched:
        out, h_n = out.squeeze(1), h_n.squeeze(1)
    if not lstm:
        return out, h_n
    c_n = torch.stack(cs)
    return out, (h_n, c_n if batched else c_n.squeeze(1))
