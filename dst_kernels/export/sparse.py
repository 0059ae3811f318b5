"""Sparse inference: the kept weights in compressed form.

``to_sparse(model)`` gives inference modules that hold only the kept weights of each
``DSTLinear`` and ``DSTConv2d`` in CSR form (int32 indices) and run the sparse kernels of
``dst_kernels._C`` (``dst_sparse_mm``, ``dst_sparse_conv2d``); ``save_sparse`` /
``load_sparse`` store that form. (``dst_kernels.sparse`` re-exports these names: a
``SparseLinear`` pickled under that path loads.)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from dst_kernels import _ops
from dst_kernels.export.fold import fold
from dst_kernels.functional import rnn_layers
from dst_kernels.nn.base import is_dst_layer

__all__ = [
    "SparseLinear",
    "SparseConv2d",
    "SparseLSTM",
    "SparseGRU",
    "to_sparse",
    "save_sparse",
    "load_sparse",
    "SPARSE_FORMAT",
    "DEFAULT_MAX_DENSITY",
]

SPARSE_FORMAT = "dst_kernels.sparse"
_FORMAT_VERSION = 1
# Layers kept dense by to_sparse above this density: the inference product wins below it.
DEFAULT_MAX_DENSITY = 0.3


def _native() -> bool:
    return _SPARSE_MM is not None


# The product op, looked up once (SparseLinear.forward is on the per-call path).
_SPARSE_MM = torch.ops.dst_kernels.dst_sparse_mm.default if _ops.has_op("dst_sparse_mm") else None
# Its eager entry (the same op through the dispatcher, a microsecond less per call); traced
# code (torch.compile, torch.export) calls the op.
_SPARSE_MM_EAGER = _ops.eager_entry("sparse_mm") if _SPARSE_MM is not None else None
_SPARSE_CONV2D = torch.ops.dst_kernels.dst_sparse_conv2d.default if _ops.has_op("dst_sparse_conv2d") else None


def require_native(what: str) -> None:
    """Raise a clear RuntimeError when the compiled sparse ops are missing."""
    if not _native():
        reason = _ops.LOAD_ERROR or "this build of dst_kernels._C lacks the sparse ops"
        raise RuntimeError(f"{what} needs the compiled sparse ops ({reason}); {_ops.BUILD_HINT}")


def _csr_of(weight: torch.Tensor, threshold: torch.Tensor | None):
    """CSR (int32) of ``weight * (|weight| > threshold[row])`` over ``[rows, rest flattened]``."""
    weight = weight.detach()
    if threshold is None:
        threshold = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    threshold = threshold.detach()
    if _native() and weight.device.type == "cpu":
        return torch.ops.dst_kernels.dst_sparse_mask(weight.contiguous(), threshold)
    kept = weight.reshape(weight.shape[0], -1).abs() > threshold[:, None]
    crow = torch.cat([kept.new_zeros(1, dtype=torch.int64), kept.sum(1).cumsum(0)])
    col = kept.nonzero()[:, 1]
    values = weight.reshape(kept.shape)[kept]
    return crow, col, values


def _check_csr_args(rows: int, crow_indices, col_indices, values, bias) -> None:
    if crow_indices.shape != (rows + 1,):
        raise ValueError(
            f"crow_indices must have shape [{rows + 1}] (one more than the output rows), "
            f"got {tuple(crow_indices.shape)}"
        )
    if col_indices.dim() != 1 or values.shape != col_indices.shape:
        raise ValueError(
            f"col_indices and values must be 1-D of one length, got {tuple(col_indices.shape)} "
            f"and {tuple(values.shape)}"
        )
    if bias is not None and bias.shape != (rows,):
        raise ValueError(f"bias must have shape [{rows}], got {tuple(bias.shape)}")


def _dense_of_csr(crow_indices, col_indices, values, rows: int, cols: int) -> torch.Tensor:
    index = torch.repeat_interleave(
        torch.arange(rows, device=values.device), crow_indices[1:].long() - crow_indices[:-1].long()
    )
    out = values.new_zeros(rows, cols)
    out[index, col_indices.long()] = values
    return out


class _CsrModule(nn.Module):
    """Buffers ``crow_indices`` / ``col_indices`` / ``values`` / ``bias`` whose sizes a
    state dict may change (nnz differs from model to model)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *args):
        for name in ("col_indices", "values"):
            stored = state_dict.get(prefix + name)
            if isinstance(stored, torch.Tensor) and stored.shape != self._buffers[name].shape:
                self._buffers[name] = self._buffers[name].new_empty(stored.shape)
        stored_bias = state_dict.get(prefix + "bias")
        if self.bias is None and isinstance(stored_bias, torch.Tensor):
            self._buffers["bias"] = self.values.new_empty(stored_bias.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *args)

    def _register_csr(self, crow_indices, col_indices, values, bias) -> None:
        self.register_buffer("crow_indices", crow_indices.to(torch.int32).contiguous())
        self.register_buffer("col_indices", col_indices.to(torch.int32).contiguous())
        self.register_buffer("values", values.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().contiguous())

    @property
    def nnz(self) -> int:
        return self.col_indices.numel()


class SparseLinear(_CsrModule):
    """Inference ``Linear`` on the kept weights only: ``y = x P^T + b`` with ``P`` in CSR.

    Buffers: ``crow_indices`` (int32, ``[out_features + 1]``), ``col_indices`` (int32,
    ``[nnz]``), ``values`` (``[nnz]``) and ``bias`` (or None). On the CPU the product runs
    in ``dst_kernels._C`` (multithreaded, vectorised); elsewhere, or without the extension,
    the weight is expanded to a dense one for ``F.linear``. With ``relu=True`` the module
    computes ``relu(x P^T + b)``, the ReLU applied as the product stores its outputs (this is
    how :func:`to_sparse` fuses an ``nn.ReLU`` that follows the layer in an ``nn.Sequential``).
    No gradients: an inference module.
    """

    relu = False  # the class default, for modules pickled before the attribute existed

    def __init__(
        self,
        in_features: int,
        out_features: int,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        relu: bool = False,
    ):
        super().__init__()
        _check_csr_args(out_features, crow_indices, col_indices, values, bias)
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
        self.in_features = in_features
        self.out_features = out_features
        self.relu = relu
        self._register_csr(crow_indices, col_indices, values, bias)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, threshold: torch.Tensor | None = None, bias=None):
        """From a weight and its thresholds (kept: ``|W| > t[row]``), or without thresholds
        from the nonzeros of ``weight``."""
        crow, col, values = _csr_of(weight, threshold)
        return cls(weight.shape[1], weight.shape[0], crow, col, values, bias)

    def density(self) -> float:
        return self.nnz / max(1, self.in_features * self.out_features)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """``P`` as a dense ``[out_features, in_features]`` tensor."""
        return _dense_of_csr(
            self.crow_indices, self.col_indices, self.values, self.out_features, self.in_features
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers  # direct: Module.__getattr__ costs a microsecond per buffer
        values = buffers["values"]
        relu = self.relu
        if _SPARSE_MM is not None and input.is_cpu and input.dtype == values.dtype:
            if _SPARSE_MM_EAGER is not None and not torch.compiler.is_compiling():
                return _SPARSE_MM_EAGER(
                    input, buffers["crow_indices"], buffers["col_indices"], values, buffers["bias"], relu
                )
            return _SPARSE_MM(
                input, buffers["crow_indices"], buffers["col_indices"], values, buffers["bias"], relu
            )
        y = F.linear(
            input,
            self.dense_weight().to(input.dtype),
            None if self.bias is None else self.bias.to(input.dtype),
        )
        return torch.relu(y) if relu else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.nnz}, density={self.density():.4f}, bias={self.bias is not None}"
            + (", relu=True" if self.relu else "")
        )


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _positive_pair(name: str, v) -> tuple[int, int]:
    ok = isinstance(v, int) or (
        isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) for e in v)
    )
    if not ok or isinstance(v, bool) or min(_pair(v)) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return _pair(v)


class SparseConv2d(_CsrModule):
    """Inference ``Conv2d`` (groups 1) on the kept weights only: ``y = conv2d(x, P) + b`` with
    ``P`` in CSR over ``[out_channels, in_channels * kh * kw]``.

    Buffers as :class:`SparseLinear`'s. On the CPU the direct sparse convolution of
    ``dst_kernels._C`` (``dst_sparse_conv2d``) runs it; elsewhere, or without the extension,
    the weight is expanded to a dense one for ``F.conv2d``. No gradients: an inference module.

    With ``relu=True`` the module computes ``relu(y)``, and with ``pool_kernel_size`` (and
    ``pool_stride``, by default the kernel size) ``max_pool2d(relu(y), pool_kernel_size,
    pool_stride)`` with no padding and floor sizes: the ReLU and the pool run in the
    convolution's output pass, so the full-size output is never returned (this is how
    :func:`to_sparse` fuses an ``nn.ReLU`` and an ``nn.MaxPool2d`` that follow the layer in an
    ``nn.Sequential``).
    """

    # The class defaults, for modules pickled before the attributes existed.
    relu = False
    pool_kernel_size: tuple[int, int] | None = None
    pool_stride: tuple[int, int] | None = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride=1,
        padding=0,
        dilation=1,
        padding_mode: str = "zeros",
        *,
        relu: bool = False,
        pool_kernel_size=None,
        pool_stride=None,
    ):
        super().__init__()
        _check_csr_args(out_channels, crow_indices, col_indices, values, bias)
        if isinstance(padding, str):
            raise ValueError(f"padding must be integers, got {padding!r}; fold such a layer instead")
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
        if pool_kernel_size is None and pool_stride is not None:
            raise ValueError("pool_stride needs pool_kernel_size")
        if pool_kernel_size is not None:
            pool_kernel_size = _positive_pair("pool_kernel_size", pool_kernel_size)
            pool_stride = (
                pool_kernel_size if pool_stride is None else _positive_pair("pool_stride", pool_stride)
            )
        self.relu = relu
        self.pool_kernel_size = pool_kernel_size
        self.pool_stride = pool_stride
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.padding_mode = padding_mode
        self._register_csr(crow_indices, col_indices, values, bias)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, threshold: torch.Tensor | None = None, bias=None, **conv):
        """From a 4-D weight and its thresholds (kept: ``|W| > t[filter]``), or without
        thresholds from its nonzeros; ``conv`` takes stride, padding, dilation, padding_mode."""
        if weight.dim() != 4:
            raise ValueError(f"weight must be 4-D [out, in, kh, kw], got shape {tuple(weight.shape)}")
        crow, col, values = _csr_of(weight, threshold)
        return cls(weight.shape[1], weight.shape[0], weight.shape[2:], crow, col, values, bias, **conv)

    def density(self) -> float:
        kh, kw = self.kernel_size
        return self.nnz / max(1, self.in_channels * kh * kw * self.out_channels)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """``P`` as a dense ``[out_channels, in_channels, kh, kw]`` tensor."""
        kh, kw = self.kernel_size
        flat = _dense_of_csr(
            self.crow_indices, self.col_indices, self.values, self.out_channels, self.in_channels * kh * kw
        )
        return flat.reshape(self.out_channels, self.in_channels, kh, kw)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers
        values = buffers["values"]
        padding = self.padding
        if self.padding_mode != "zeros":
            ph, pw = padding
            input = F.pad(input, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = (0, 0)
        if (
            _SPARSE_CONV2D is not None
            and input.is_cpu
            and input.dtype == values.dtype
            and input.dim() == 4
            and input.numel() > 0
        ):
            pool = self.pool_kernel_size
            return _SPARSE_CONV2D(
                input,
                buffers["crow_indices"],
                buffers["col_indices"],
                values,
                buffers["bias"],
                self.kernel_size,
                self.stride,
                padding,
                self.dilation,
                self.relu,
                (1, 1) if pool is None else pool,
                (1, 1) if pool is None else self.pool_stride,
            )
        y = F.conv2d(
            input,
            self.dense_weight().to(input.dtype),
            None if self.bias is None else self.bias.to(input.dtype),
            self.stride,
            padding,
            self.dilation,
        )
        if self.relu:
            y = torch.relu(y)
        if self.pool_kernel_size is not None:
            y = F.max_pool2d(y, self.pool_kernel_size, self.pool_stride)
        return y

    def extra_repr(self) -> str:
        fused = ", relu=True" if self.relu else ""
        if self.pool_kernel_size is not None:
            fused += f", pool_kernel_size={self.pool_kernel_size}, pool_stride={self.pool_stride}"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"nnz={self.nnz}, density={self.density():.4f}, bias={self.bias is not None}" + fused
        )


def _sparse_linear_of(layer: nn.Module) -> SparseLinear | None:
    """A SparseLinear for a DST layer that masks a Linear's weight by rows, else None."""
    pairs = dict(getattr(layer, "_dst_pairs", ()))
    if "weight" not in pairs or getattr(layer, "_dst_axes", {}).get("weight", 0) != 0:
        return None
    weight = layer.dense_weight("weight") if hasattr(layer, "dense_weight") else layer.weight
    if weight.dim() != 2:
        return None
    return SparseLinear.from_dense(weight, getattr(layer, pairs["weight"]), layer.bias)


def _sparse_conv_of(layer: nn.Module) -> SparseConv2d | None:
    """A SparseConv2d for a DST layer that masks a groups-1 Conv2d's weight by filters, else None."""
    pairs = dict(getattr(layer, "_dst_pairs", ()))
    if "weight" not in pairs or getattr(layer, "_dst_axes", {}).get("weight", 0) != 0:
        return None
    if getattr(layer, "groups", 1) != 1 or isinstance(getattr(layer, "padding", 0), str):
        return None
    weight = layer.dense_weight("weight") if hasattr(layer, "dense_weight") else layer.weight
    if weight.dim() != 4:
        return None
    return SparseConv2d.from_dense(
        weight,
        getattr(layer, pairs["weight"]),
        layer.bias,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        padding_mode=layer.padding_mode,
    )


class _SparseRNN(nn.Module):
    """Inference LSTM / GRU on the kept gate weights only: per layer and direction the CSR of
    ``W_ih * M`` and ``W_hh * M`` (buffers ``{crow,col,values}_{ih,hh}_l{k}[_reverse]``) and the
    biases, run by the sparse family's recurrent kernel (``dst_sparse_rnn``, CPU, float32 /
    float64). Takes ``(input, hx)`` as ``nn.LSTM`` / ``nn.GRU`` do (batched or unbatched, not
    packed); eval mode only (no dropout). Made by :func:`to_sparse`."""

    _mode = ""

    def __init__(self, rnn: nn.Module, thresholds: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if getattr(rnn, "proj_size", 0):
            raise ValueError("the sparse recurrent kernel has no projections (proj_size > 0)")
        self.input_size, self.hidden_size = rnn.input_size, rnn.hidden_size
        self.num_layers, self.bidirectional = rnn.num_layers, rnn.bidirectional
        self.batch_first, self.has_bias = rnn.batch_first, rnn.bias
        self._kept = 0
        self._total = 0
        thresholds = thresholds or {}
        for name in rnn._flat_weights_names:
            param = rnn._parameters[name].detach()
            if name.startswith("weight_"):
                part = name.removeprefix("weight_")
                crow, col, values = _csr_of(param, thresholds.get(name))
                self.register_buffer("crow_" + part, crow.to(torch.int32).contiguous())
                self.register_buffer("col_" + part, col.to(torch.int32).contiguous())
                self.register_buffer("values_" + part, values.contiguous())
                self._kept += col.numel()
                self._total += param.numel()
            else:
                self.register_buffer(name, param.clone().contiguous())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *args):
        for name, buf in self._buffers.items():
            stored = state_dict.get(prefix + name)
            if isinstance(stored, torch.Tensor) and buf is not None and stored.shape != buf.shape:
                self._buffers[name] = buf.new_empty(stored.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *args)

    @property
    def nnz(self) -> int:
        return sum(b.numel() for n, b in self._buffers.items() if n.startswith("col_"))

    def density(self) -> float:
        return self.nnz / max(1, self._total)

    def forward(self, input, hx=None):
        if not isinstance(input, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__} takes a tensor input (packed sequences: fold the model instead)"
            )
        require_native(type(self).__name__)
        if input.dim() not in (2, 3):
            raise ValueError(
                f"{type(self).__name__}: input must be 2-D or 3-D, got shape {tuple(input.shape)}"
            )
        b = self._buffers

        def layer(suffix, x, h0, c0, reverse, feature_major=False):
            # (feature_major: a layer's y as h^T, which the next layer reads without a copy.)
            return torch.ops.dst_kernels.dst_sparse_rnn(
                x,
                h0,
                c0,
                b["crow_ih" + suffix],
                b["col_ih" + suffix],
                b["values_ih" + suffix],
                b["crow_hh" + suffix],
                b["col_hh" + suffix],
                b["values_hh" + suffix],
                b.get("bias_ih" + suffix),
                b.get("bias_hh" + suffix),
                self._mode,
                reverse,
                feature_major,
            )

        return rnn_layers(
            input,
            hx,
            layer,
            mode=self._mode,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
            hidden_size=self.hidden_size,
            pass_feature_major=True,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bidirectional={self.bidirectional}, batch_first={self.batch_first}, "
            f"nnz={self.nnz}, density={self.density():.4f}, bias={self.has_bias}"
        )


class SparseLSTM(_SparseRNN):
    """Inference ``nn.LSTM`` on the kept gate weights (see ``_SparseRNN``)."""

    _mode = "lstm"


class SparseGRU(_SparseRNN):
    """Inference ``nn.GRU`` on the kept gate weights (see ``_SparseRNN``)."""

    _mode = "gru"


def _sparse_rnn_of(layer: nn.Module) -> _SparseRNN | None:
    """A SparseLSTM / SparseGRU for a DSTLSTM / DSTGRU without projections, else None."""
    if getattr(layer, "proj_size", 0) or not hasattr(layer, "_flat_weights_names"):
        return None
    cls = SparseLSTM if isinstance(layer, nn.LSTM) else SparseGRU if isinstance(layer, nn.GRU) else None
    if cls is None:
        return None
    weights = {w: layer._parameters[w] for w, _ in layer._dst_pairs}
    if any(w.dtype not in (torch.float32, torch.float64) or w.device.type != "cpu" for w in weights.values()):
        return None
    thresholds = {w: getattr(layer, t) for w, t in layer._dst_pairs}
    return cls(layer, thresholds)


# The plain class a DST layer folds to, and the sparse module it can become.
_SPARSE_OF = {
    nn.Linear: _sparse_linear_of,
    nn.Conv2d: _sparse_conv_of,
    nn.LSTM: _sparse_rnn_of,
    nn.GRU: _sparse_rnn_of,
}


@torch.no_grad()
def to_sparse(
    model: nn.Module,
    *,
    max_density: float = DEFAULT_MAX_DENSITY,
    fuse_relu: bool = True,
    fuse_pool: bool = True,
) -> nn.Module:
    """A copy of ``model`` for inference on the kept weights.

    Every DST layer that folds to a plain ``nn.Linear``, a groups-1 ``nn.Conv2d``, an
    ``nn.LSTM`` without projections or an ``nn.GRU`` (CPU, float32 / float64) and keeps at most
    ``max_density`` of its weights becomes a :class:`SparseLinear`, :class:`SparseConv2d`,
    :class:`SparseLSTM` or :class:`SparseGRU` (CSR of ``W * M``; the products run in
    ``dst_kernels._C`` on the CPU); the other DST layers (denser ones, grouped convolutions,
    projected LSTMs) are folded to their plain classes as :func:`dst_kernels.export.fold` does.
    The copy computes ``model``'s eval-mode function; ``model`` is unchanged.

    With ``fuse_relu`` (the default), an ``nn.ReLU`` that directly follows a new
    :class:`SparseLinear` or :class:`SparseConv2d` in an ``nn.Sequential`` is fused into it
    (``relu=True``) and its slot holds an ``nn.Identity``, as
    ``torch.ao.quantization.fuse_modules`` does: the indices of the ``Sequential`` stay, one
    module call and one pass over the activations go. With ``fuse_pool`` (the default), an
    ``nn.MaxPool2d`` (no padding, dilation 1, floor sizes, no indices) that follows a new
    :class:`SparseConv2d` (directly or after its fused ReLU) is fused the same way: the
    layer returns the pooled output. Layers used at more than one place and modules with
    hooks are left unfused.
    """
    if not 0.0 <= max_density <= 1.0:
        raise ValueError(f"max_density must be in [0, 1], got {max_density!r}")
    for name, flag in (("fuse_relu", fuse_relu), ("fuse_pool", fuse_pool)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if is_dst_layer(model):
        make = _SPARSE_OF.get(type(fold(model)))
        sparse = make(model) if make is not None else None
        if sparse is not None and sparse.density() <= max_density:
            return sparse.train(model.training)
    folded = fold(model)
    originals = dict(model.named_modules(remove_duplicate=False))
    replaced: dict[int, nn.Module] = {}
    for parent_name, parent in list(folded.named_modules(remove_duplicate=False)):
        # _modules, not named_children(): that lists a module shared by two slots once.
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            full = f"{parent_name}.{name}" if parent_name else name
            original = originals.get(full)
            make = _SPARSE_OF.get(type(child))
            if make is None or original is None or not is_dst_layer(original):
                continue
            if id(child) not in replaced:
                sparse = make(original)
                if sparse is None or sparse.density() > max_density:
                    continue
                replaced[id(child)] = sparse.train(child.training)
            setattr(parent, name, replaced[id(child)])
    if fuse_relu or fuse_pool:
        _fuse_epilogues(folded, {id(m) for m in replaced.values()}, fuse_relu, fuse_pool)
    return folded


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fusable_pool(pool: nn.Module) -> bool:
    """An ``nn.MaxPool2d`` that the sparse convolution's epilogue computes exactly."""
    return (
        type(pool) is nn.MaxPool2d
        and not _has_hooks(pool)
        and _pair(pool.padding) == (0, 0)
        and _pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
        and not pool.return_indices
    )


def _fuse_epilogues(model: nn.Module, new: set[int], relu: bool, pool: bool) -> None:
    """Fuse the ``nn.ReLU`` (and, after a SparseConv2d, the ``nn.MaxPool2d``) that follow one of
    the new sparse modules in a Sequential into it; their slots get an ``nn.Identity``."""
    uses: dict[int, int] = {}
    for m in model.modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for seq in list(model.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for i, first in enumerate(names):
            layer = seq._modules[first]
            if (
                type(layer) not in (SparseLinear, SparseConv2d)
                or id(layer) not in new
                or uses[id(layer)] != 1
                or _has_hooks(layer)
                or layer.relu
                or getattr(layer, "pool_kernel_size", None) is not None
            ):
                continue
            for second in names[i + 1 :]:
                nxt = seq._modules[second]
                if relu and not layer.relu and type(nxt) is nn.ReLU and not _has_hooks(nxt):
                    layer.relu = True
                elif (
                    pool
                    and type(layer) is SparseConv2d
                    and layer.pool_kernel_size is None
                    and _fusable_pool(nxt)
                ):
                    layer.pool_kernel_size = _pair(nxt.kernel_size)
                    layer.pool_stride = _pair(nxt.kernel_size if nxt.stride is None else nxt.stride)
                else:
                    break
                seq._modules[second] = nn.Identity().train(nxt.training)


def save_sparse(model: nn.Module, path) -> None:
    """Write ``to_sparse(model)`` (or ``model`` if it has no DST layers left) to ``path``.

    The file holds the pickled inference model (its CSR buffers stored once) under
    ``"model"``, and ``"format"`` / ``"version"``; :func:`load_sparse` reads it back.
    """
    sparse = to_sparse(model) if any(is_dst_layer(m) for m in model.modules()) else model
    torch.save({"format": SPARSE_FORMAT, "version": _FORMAT_VERSION, "model": sparse}, path)


def load_sparse(path, map_location=None) -> nn.Module:
    """The inference model :func:`save_sparse` wrote to ``path``.

    It is unpickled (``torch.load(..., weights_only=False)``): load only files you trust,
    with the model's classes importable.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no sparse checkpoint at {path!r}")
    obj = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(obj, dict) or obj.get("format") != SPARSE_FORMAT:
        raise ValueError(f"{path!r} is not a file written by dst_kernels.export.save_sparse")
    if obj.get("version", 0) > _FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has sparse format version {obj['version']}; this dst_kernels reads "
            f"up to {_FORMAT_VERSION}"
        )
    return obj["model"]
