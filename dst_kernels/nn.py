"""Drop-in DST layers and ``sparsify``.

``DSTLinear`` and ``DSTConv2d`` subclass ``nn.Linear`` / ``nn.Conv2d``: every
constructor argument, ``reset_parameters`` and code that does
``isinstance(m, nn.Conv2d)`` keep working. Each adds a trainable ``threshold``
of shape ``[out]`` (initialised to 0); the forward uses ``W * (|W| > t)``.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from dst_kernels import functional as DF

__all__ = ["DSTLinear", "DSTConv2d", "DSTLSTM", "DSTLayer", "sparsify", "is_dst_layer"]


class DSTLayer:
    """What every DST layer has: thresholds, the reset rule, mask/density, dense conversion.

    A subclass lists its ``(weight_name, threshold_name)`` pairs in ``_dst_pairs``.
    """

    _dst_pairs: tuple[tuple[str, str], ...] = (("weight", "threshold"),)

    def _init_dst(self, min_density, backend):
        self.min_density = DF.check_min_density(min_density)
        self.backend = DF.check_backend_name(backend)

    def _new_threshold(self, weight: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype))

    def thresholds(self) -> list[nn.Parameter]:
        return [getattr(self, t) for _, t in self._dst_pairs]

    def _reset_bound(self) -> float | None:
        """``min_density`` in training mode (the reset rule applies), else None."""
        return self.min_density if self.training else None

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean mask per masked weight, keyed by the weight's name (no host sync)."""
        return {w: DF.mask(getattr(self, w), getattr(self, t)) for w, t in self._dst_pairs}

    @torch.no_grad()
    def kept(self) -> torch.Tensor:
        """Number of kept weights, as a 0-dim int64 tensor (no host sync)."""
        return sum(m.sum() for m in self.masks().values())

    def total(self) -> int:
        return sum(getattr(self, w).numel() for w, _ in self._dst_pairs)

    @torch.no_grad()
    def density(self) -> torch.Tensor:
        """Kept fraction over all masked weights, a 0-dim float32 tensor (no host sync)."""
        return self.kept().float() / self.total()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *args):
        # A dense layer's state dict has no thresholds: load it with thresholds at 0.
        for _, t in self._dst_pairs:
            key = prefix + t
            if key not in state_dict:
                state_dict[key] = torch.zeros_like(getattr(self, t))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_density={self.min_density}, backend={self.backend!r}"


def _regulariser(layer: DSTLayer) -> torch.Tensor:
    return sum(torch.exp(-t).sum() for t in layer.thresholds())


class DSTLinear(DSTLayer, nn.Linear):
    """``nn.Linear`` with a trainable per-output-row threshold (SPEC section 3)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        min_density: float | None = 0.01,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_dst(min_density, backend)
        self.threshold = self._new_threshold(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.dst_linear(
            x,
            self.weight,
            self.threshold,
            self.bias,
            backend=self.backend,
            min_density=self._reset_bound(),
        )

    def mask(self) -> torch.Tensor:
        """Boolean mask shaped like ``weight`` (no host sync)."""
        return self.masks()["weight"]

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, min_density=0.01, backend="auto") -> DSTLinear:
        """A DSTLinear sharing nothing with ``linear`` but holding copies of its weights."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            min_density=min_density,
            backend=backend,
            device=w.device,
            dtype=w.dtype,
        )
        layer.load_state_dict(linear.state_dict())
        layer.train(linear.training)
        return layer

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is ``W * M``."""
        w = self.weight
        out = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        out.weight.copy_(w * self.mask())
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.train(self.training)
        return out


class DSTConv2d(DSTLayer, nn.Conv2d):
    """``nn.Conv2d`` with a trainable threshold per output channel (SPEC section 3)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        min_density: float | None = 0.01,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_dst(min_density, backend)
        self.threshold = self._new_threshold(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return DF.dst_conv2d(
            x,
            self.weight,
            self.threshold,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            backend=self.backend,
            min_density=self._reset_bound(),
        )

    def mask(self) -> torch.Tensor:
        """Boolean mask shaped like ``weight`` (no host sync)."""
        return self.masks()["weight"]

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, min_density=0.01, backend="auto") -> DSTConv2d:
        w = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            min_density=min_density,
            backend=backend,
            device=w.device,
            dtype=w.dtype,
        )
        layer.load_state_dict(conv.state_dict())
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            layer.to(memory_format=torch.channels_last)
        layer.train(conv.training)
        return layer

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` whose weight is ``W * M``."""
        w = self.weight
        out = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        out.weight.copy_(w * self.mask())
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.train(self.training)
        return out


class DSTLSTM(DSTLayer, nn.LSTM):
    """``nn.LSTM`` whose gate matrices are DST-masked (SPEC section 3).

    Every ``weight_ih_l{k}`` / ``weight_hh_l{k}`` (``[4H, *]``) gets a threshold
    ``threshold_ih_l{k}`` / ``threshold_hh_l{k}`` of shape ``[4H]``: one per unit
    per gate; likewise ``*_reverse`` for a bidirectional LSTM and
    ``threshold_hr_l{k}`` (``[proj_size]``) for the projections of one with
    ``proj_size > 0``. The masks are computed once per forward, for all layers,
    and the masked weights run through PyTorch's fused LSTM.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        min_density: float | None = 0.01,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            proj_size=proj_size,
            device=device,
            dtype=dtype,
        )
        self._init_dst(min_density, backend)
        pairs = []
        for w_name in self._flat_weights_names:  # nn.LSTM's order: per layer and direction
            if w_name.startswith("weight_"):
                t_name = "threshold_" + w_name.removeprefix("weight_")
                setattr(self, t_name, self._new_threshold(getattr(self, w_name)))
                pairs.append((w_name, t_name))
        self._dst_pairs = tuple(pairs)

    def forward(self, input, hx=None):
        bound = self._reset_bound()
        masked = {
            w: DF.masked_weight(getattr(self, w), getattr(self, t), backend=self.backend, min_density=bound)
            for w, t in self._dst_pairs
        }
        self._update_flat_weights()
        dense = self._flat_weights
        self._flat_weights = [masked.get(name, param) for name, param in zip(self._flat_weights_names, dense)]
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = dense

    def flatten_parameters(self) -> None:
        # The LSTM runs on masked copies of the weights; there is nothing to flatten.
        return None

    @classmethod
    def from_dense(cls, lstm: nn.LSTM, *, min_density=0.01, backend="auto") -> DSTLSTM:
        w = lstm.weight_ih_l0
        layer = cls(
            lstm.input_size,
            lstm.hidden_size,
            lstm.num_layers,
            lstm.bias,
            lstm.batch_first,
            lstm.dropout,
            lstm.bidirectional,
            lstm.proj_size,
            min_density=min_density,
            backend=backend,
            device=w.device,
            dtype=w.dtype,
        )
        layer.load_state_dict(lstm.state_dict())
        layer.train(lstm.training)
        return layer

    @torch.no_grad()
    def to_dense(self) -> nn.LSTM:
        """A plain ``nn.LSTM`` whose gate matrices are ``W * M``."""
        w = self.weight_ih_l0
        out = nn.LSTM(
            self.input_size,
            self.hidden_size,
            self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
            device=w.device,
            dtype=w.dtype,
        )
        masks = self.masks()
        for name, param in out.named_parameters():
            src = getattr(self, name)
            param.copy_(src * masks[name] if name in masks else src)
        out.train(self.training)
        return out


def is_dst_layer(module: nn.Module) -> bool:
    return isinstance(module, DSTLayer)


_CONVERTERS = ((nn.LSTM, DSTLSTM), (nn.Conv2d, DSTConv2d), (nn.Linear, DSTLinear))


def _excluded(name: str, module: nn.Module, exclude) -> bool:
    for item in exclude:
        if isinstance(item, str):
            if fnmatch.fnmatchcase(name, item):
                return True
        elif isinstance(item, type) and isinstance(module, item):
            return True
    return False


def sparsify(
    model: nn.Module,
    *,
    include=(nn.Linear, nn.Conv2d, nn.LSTM),
    exclude=(),
    min_density: float | None = 0.01,
    backend: str = "auto",
) -> nn.Module:
    """Swap ``nn.Linear`` / ``nn.Conv2d`` / ``nn.LSTM`` submodules for DST layers, in place.

    Weights are kept (the new layers hold the same values), thresholds start at
    0. ``include`` lists the layer types to convert; ``exclude`` holds layer
    types or qualified-name patterns (``fnmatch``, e.g. ``"classifier.*"``) to
    leave dense. Returns ``model`` (or the new layer if ``model`` itself is
    converted).
    """
    DF.check_min_density(min_density)
    DF.check_backend_name(backend)
    include = tuple(include) if isinstance(include, (tuple, list)) else (include,)
    exclude = tuple(exclude) if isinstance(exclude, (tuple, list)) else (exclude,)
    for item in include:
        if not (isinstance(item, type) and any(issubclass(item, src) for src, _ in _CONVERTERS)):
            raise TypeError(f"include must hold nn.Linear, nn.Conv2d or nn.LSTM types, got {item!r}")
    for item in exclude:
        if not isinstance(item, (str, type)):
            raise TypeError(f"exclude must hold layer types or name patterns, got {item!r}")

    def convert(name: str, module: nn.Module) -> nn.Module | None:
        if is_dst_layer(module) or type(module) not in include and not isinstance(module, include):
            return None
        if _excluded(name, module, exclude):
            return None
        for src, dst_cls in _CONVERTERS:
            if isinstance(module, src):
                return dst_cls.from_dense(module, min_density=min_density, backend=backend)
        return None

    root = convert("", model)
    if root is not None:
        return root
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            new = convert(full, child)
            if new is not None:
                setattr(module, child_name, new)
    return model


def sparsity_loss(model: nn.Module) -> torch.Tensor:
    """``sum over DST layers of sum_i exp(-t_i)``; multiply by alpha and add to the loss."""
    terms = [_regulariser(m) for m in model.modules() if is_dst_layer(m)]
    if not terms:
        raise ValueError("sparsity_loss: the model has no DST layers (use dst_kernels.sparsify)")
    return sum(terms[1:], terms[0])
